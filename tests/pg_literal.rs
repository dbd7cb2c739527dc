//! The literals of the gate that travels with the `BEGIN` (`PgStore::with_gate_in_begin`),
//! proved over arbitrary strings: the literal is a fixed frame around escapes only, so nothing
//! in a value can leave it; and the live server decodes every one to exactly the value, as one
//! statement returning one row, under each setting that changes how string literals are read.
//! `fuzz/fuzz_targets/pg_literal.rs` checks the first property with a fuzzer.

use std::cell::Cell;

use idem_runtime::sqlx::{self, Either, Executor as _};
use idem_runtime::store::literal::{LiteralError, pg_text};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Strings rich in what breaks literals (quotes, backslashes, dollars, semicolons, comment
/// starts, newlines, `E`/`U&` prefixes), among any characters, NUL included.
fn hostile() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("'".to_owned()),
        Just("\\".to_owned()),
        Just("''".to_owned()),
        Just("\\'".to_owned()),
        Just("$$".to_owned()),
        Just("$tag$".to_owned()),
        Just(";".to_owned()),
        Just("--".to_owned()),
        Just("/*".to_owned()),
        Just("\n".to_owned()),
        Just("E'".to_owned()),
        Just("U&'".to_owned()),
        Just("\\u0027".to_owned()),
        Just("'; DROP TABLE idem_records; --".to_owned()),
        any::<char>().prop_map(String::from),
        "[a-z0-9]{1,4}",
    ];
    prop_oneof![
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat()),
        any::<String>(),
    ]
}

/// Reads a literal of `pg_text` back, independently of it: `E'`, then only `\uXXXX` and
/// `\UXXXXXXXX` escapes of hex digits, then `'::text`. `None` when anything else is there.
fn decode(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix("E'")?.strip_suffix("'::text")?;
    let mut decoded = String::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (digits, after) = if let Some(after) = rest.strip_prefix("\\u") {
            (after.get(..4)?, after.get(4..)?)
        } else if let Some(after) = rest.strip_prefix("\\U") {
            (after.get(..8)?, after.get(8..)?)
        } else {
            return None;
        };
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        decoded.push(char::from_u32(u32::from_str_radix(digits, 16).ok()?)?);
        rest = after;
    }
    Some(decoded)
}

proptest! {
    #![proptest_config(Config { cases: 4096, ..Config::default() })]

    /// Nothing but escapes inside a fixed frame, decoding to exactly the value; NUL refused.
    #[test]
    fn a_literal_is_escapes_in_a_frame_that_decode_to_the_value(value in hostile()) {
        match pg_text(&value) {
            Ok(literal) => {
                prop_assert!(!value.contains('\0'));
                prop_assert_eq!(decode(&literal), Some(value));
            }
            Err(error) => {
                prop_assert_eq!(error, LiteralError::Nul);
                prop_assert!(value.contains('\0'));
            }
        }
    }
}

/// The live server reads every literal back as exactly its value, in one statement with one
/// row (nothing else executed), whatever `standard_conforming_strings` and `backslash_quote`
/// say.
#[test]
fn every_literal_reads_back_exactly_on_the_live_server_whatever_its_settings() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The pool returns its connection from a task of this runtime when the test ends.
    let _entered = runtime.enter();
    let store = runtime.block_on(idem_tests::pg::connect());
    // Taken out for each statement and put back: the proptest closure is `Fn`.
    let connection = Cell::new(Some(
        runtime
            .block_on(store.pool().acquire())
            .expect("a connection"),
    ));
    for settings in [
        "SET standard_conforming_strings = on; SET backslash_quote = safe_encoding",
        "SET standard_conforming_strings = off; SET backslash_quote = on; SET escape_string_warning = on",
        "SET standard_conforming_strings = off; SET backslash_quote = off",
    ] {
        let mut session = connection.take().expect("the connection");
        runtime
            .block_on(session.execute(settings))
            .expect("change the session's settings");
        connection.set(Some(session));
        let mut runner = TestRunner::new(Config {
            cases: 512,
            ..Config::default()
        });
        runner
            .run(&hostile(), |value| {
                let Ok(literal) = pg_text(&value) else {
                    prop_assert!(value.contains('\0'));
                    return Ok(());
                };
                let sql = format!("SELECT {literal} AS value");
                let mut session = connection.take().expect("the connection");
                let results = runtime.block_on(async {
                    use futures_util::TryStreamExt as _;
                    session
                        .fetch_many(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)))
                        .try_collect::<Vec<_>>()
                        .await
                });
                connection.set(Some(session));
                let results = results.map_err(|error| {
                    TestCaseError::fail(format!("{settings}: the server refused it: {error}"))
                })?;
                let rows: Vec<String> = results
                    .iter()
                    .filter_map(|result| match result {
                        Either::Right(row) => {
                            Some(sqlx::Row::try_get::<String, _>(row, 0).expect("text"))
                        }
                        Either::Left(_) => None,
                    })
                    .collect();
                let statements = results.iter().filter(|result| result.is_left()).count();
                prop_assert_eq!(statements, 1, "{}: one statement ran", settings);
                prop_assert_eq!(rows, vec![value], "{}", settings);
                Ok(())
            })
            .unwrap_or_else(|failure| panic!("{settings}: {failure}"));
    }
}

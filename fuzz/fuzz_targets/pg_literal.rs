//! The literals of `PgStore::with_gate_in_begin`'s gate, fuzzed: for any string, the literal is
//! `E'`, escapes of hex digits only, `'::text` (so nothing in the value can end the string or start
//! a statement, whatever the server's settings), and it decodes to exactly the value; a string
//! with a NUL is refused. Run with `cargo +nightly fuzz run pg_literal` in `fuzz/`
//! (`cargo install cargo-fuzz` once). `tests/pg_literal.rs` checks the same with proptest, and
//! against the live server.
#![no_main]

use idem_runtime::store::literal::{LiteralError, pg_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    match pg_text(value) {
        Ok(literal) => {
            assert!(!value.contains('\0'));
            assert_eq!(decode(&literal).as_deref(), Some(value), "{literal}");
        }
        Err(error) => {
            assert_eq!(error, LiteralError::Nul);
            assert!(value.contains('\0'));
        }
    }
});

/// `E'`, then only `\uXXXX` and `\UXXXXXXXX` escapes, then `'::text`; `None` for anything else.
fn decode(literal: &str) -> Option<String> {
    let mut rest = literal.strip_prefix("E'")?.strip_suffix("'::text")?;
    let mut decoded = String::new();
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

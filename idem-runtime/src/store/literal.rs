//! Values as SQL literals, for the one statement that cannot bind parameters.
//!
//! With [`PgStore::with_gate_in_begin`](crate::PgStore::with_gate_in_begin), the gate rides on
//! the round trip that opens the transaction: sqlx's [`Pool::begin_with`](sqlx::Pool::begin_with)
//! sends its statement as one *simple* query, and a simple query binds nothing, so the key,
//! the scope and the other values of the gate travel inside the SQL text. Quote-doubling is not
//! enough to make that safe (it depends on `standard_conforming_strings`, on `backslash_quote`,
//! on the client encoding), so no character of a value is ever written into the statement as
//! itself: each is written as its Unicode code point in hexadecimal, in an escape string that
//! the server's lexer decodes,
//!
//! ```sql
//! E'\u006f\u0072\u0064\u0065\u0072'::text   -- 'order'
//! ```
//!
//! The literal holds only `\`, `u` or `U`, and hex digits, then `'::text`: an escape string
//! (`E'…'`) reads its escapes whatever `standard_conforming_strings` says, nothing in it can end
//! the string or start another statement, and the server decodes exactly the characters given.
//! A property test and a fuzz target check both (`tests/pg_literal.rs`,
//! `fuzz/fuzz_targets/pg_literal.rs`). It is cast to `text`, the type sqlx binds a `&str` as,
//! so it meets a column as the bound parameter of the default path would: a `varchar` column's
//! index serves it, and a column of another type (an integer, a UUID) refuses it alike. The
//! store sends such literals only to a UTF-8 database: elsewhere the server may be unable to
//! convert an escape (`SQL_ASCII`, or any other encoding before PostgreSQL 13) that it would
//! convert in a bound parameter. Integers are written as digits in a typed literal, UUIDs as
//! their hyphenated hex. A text that PostgreSQL cannot hold, one with a NUL character, is
//! refused with [`LiteralError`] (keys with one never get here: [`KeyError::Nul`] refuses them
//! first).
//!
//! [`KeyError::Nul`]: crate::KeyError::Nul

use std::fmt::Write as _;

/// A value that cannot be written as a PostgreSQL literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LiteralError {
    /// PostgreSQL's `text` cannot hold a NUL character (`\0`).
    #[error(
        "a value for the gate statement contains a NUL character, which PostgreSQL's text cannot hold; remove it from the key"
    )]
    Nul,
}

/// `value` as a PostgreSQL `text` literal that decodes to exactly `value`: an escape string of
/// `\uXXXX` (and, past U+FFFF, `\UXXXXXXXX`) escapes, cast to `text`.
///
/// ```
/// use idem_runtime::store::literal::pg_text;
///
/// assert_eq!(pg_text("a'b").unwrap(), r"E'\u0061\u0027\u0062'::text");
/// assert!(pg_text("a\0b").is_err());
/// ```
pub fn pg_text(value: &str) -> Result<String, LiteralError> {
    let mut sql = String::with_capacity(value.len() * 6 + 3);
    push_pg_text(&mut sql, value)?;
    Ok(sql)
}

/// Appends [`pg_text`]`(value)` to `sql`.
pub fn push_pg_text(sql: &mut String, value: &str) -> Result<(), LiteralError> {
    if value.contains('\0') {
        return Err(LiteralError::Nul);
    }
    sql.reserve(value.len() * 6 + 3);
    sql.push_str("E'");
    for character in value.chars() {
        let code = u32::from(character);
        // Writing to a String cannot fail.
        let _ = if code <= 0xffff {
            write!(sql, "\\u{code:04x}")
        } else {
            write!(sql, "\\U{code:08x}")
        };
    }
    // Typed, as sqlx binds a `&str`: compared with a column of another type, the literal fails
    // as the bound parameter would, instead of being coerced where the bound one is not.
    sql.push_str("'::text");
    Ok(())
}

/// Appends `value` as a PostgreSQL `text` expression, or `NULL`.
pub fn push_pg_optional_text(sql: &mut String, value: Option<&str>) -> Result<(), LiteralError> {
    match value {
        Some(value) => push_pg_text(sql, value),
        None => {
            sql.push_str("NULL");
            Ok(())
        }
    }
}

/// Appends `value` as a PostgreSQL `int8` literal (`'-42'::int8`): digits and a sign only, in
/// a typed literal so that `i64::MIN` stays an `int8` (a bare `-9223372036854775808` parses as
/// `numeric`, which would keep an index on an integer column from being used).
pub fn push_pg_int8(sql: &mut String, value: i64) {
    // Writing to a String cannot fail.
    let _ = write!(sql, "'{value}'::int8");
}

/// Appends `value` as a PostgreSQL `int8` literal, or `NULL`.
pub fn push_pg_optional_int8(sql: &mut String, value: Option<i64>) {
    match value {
        Some(value) => push_pg_int8(sql, value),
        None => sql.push_str("NULL"),
    }
}

/// Appends `value` as a PostgreSQL `uuid` literal (`'…'::uuid`, hex digits and hyphens).
#[cfg(feature = "uuid")]
pub fn push_pg_uuid(sql: &mut String, value: &uuid::Uuid) {
    let _ = write!(sql, "'{}'::uuid", value.hyphenated());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escapes_inside_a_fixed_frame() {
        assert_eq!(pg_text("").unwrap(), "E''::text");
        assert_eq!(
            pg_text("é'\\$;🦀").unwrap(),
            r"E'\u00e9\u0027\u005c\u0024\u003b\U0001f980'::text"
        );
        assert_eq!(pg_text("\0"), Err(LiteralError::Nul));
    }

    #[test]
    fn integers_are_typed_literals() {
        let mut sql = String::new();
        push_pg_int8(&mut sql, i64::MIN);
        sql.push(' ');
        push_pg_optional_int8(&mut sql, None);
        assert_eq!(sql, "'-9223372036854775808'::int8 NULL");
    }
}

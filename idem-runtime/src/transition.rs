//! One step of an entity's lifecycle, as `state_machine` gates it: the [`Transition`] the
//! macro builds from the attribute, the key value bound with its SQL type ([`StateKey`]), and
//! the guarded `UPDATE` and classifying `SELECT` built from them in each store's dialect.
//!
//! The statements are built once per handler from identifiers the macro validated and the
//! store quotes; every value (key, states) is a bound parameter, except in the guarded update
//! that [`PgStore::with_gate_in_begin`](crate::PgStore::with_gate_in_begin) sends with the
//! `BEGIN`, where they are literals (see [`store::literal`](crate::store::literal)).

use std::sync::Arc;

/// The value a state-machine gate compares the key column with, bound with its SQL type.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateKey {
    /// A text key (`TEXT`, `VARCHAR` column).
    Text(String),
    /// An integer key (`INTEGER`, `BIGINT` column).
    Integer(i64),
    /// A UUID key (feature `uuid`): bound as PostgreSQL's `uuid`; on MySQL and SQLite, which
    /// have no UUID type, as its hyphenated text (`CHAR(36)` columns).
    #[cfg(feature = "uuid")]
    Uuid(uuid::Uuid),
}

/// A key field type a `state_machine` gate can bind: strings, integers and (feature `uuid`)
/// [`uuid::Uuid`].
///
/// Implement it for an id newtype by converting to the column's type:
///
/// ```
/// use idem_runtime::transition::{StateKey, StateKeyPart};
///
/// struct OrderId(i64);
///
/// impl StateKeyPart for OrderId {
///     fn state_key(&self) -> StateKey {
///         StateKey::Integer(self.0)
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be bound as the key of a `state_machine` transition",
    label = "the key column is compared with this field",
    note = "key on a string or integer field (or a `uuid::Uuid` with the `uuid` feature), or implement `idem_runtime::transition::StateKeyPart` for `{Self}`"
)]
pub trait StateKeyPart {
    /// The value to compare the key column with.
    fn state_key(&self) -> StateKey;
}

impl StateKeyPart for str {
    fn state_key(&self) -> StateKey {
        StateKey::Text(self.to_owned())
    }
}

impl StateKeyPart for String {
    fn state_key(&self) -> StateKey {
        StateKey::Text(self.clone())
    }
}

impl<T: StateKeyPart + ?Sized> StateKeyPart for &T {
    fn state_key(&self) -> StateKey {
        (**self).state_key()
    }
}

macro_rules! state_key_from_integer {
    ($($ty:ty),*) => {$(
        impl StateKeyPart for $ty {
            fn state_key(&self) -> StateKey {
                StateKey::Integer(i64::from(*self))
            }
        }
    )*};
}

// Every integer type that converts to `i64` without loss.
state_key_from_integer!(i8, i16, i32, i64, u8, u16, u32);

#[cfg(feature = "uuid")]
impl StateKeyPart for uuid::Uuid {
    fn state_key(&self) -> StateKey {
        StateKey::Uuid(*self)
    }
}

/// What to do when the entity's row does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnMissing {
    /// Requeue: the creating message may not have arrived yet (the default).
    Retry,
    /// Dead-letter: the entity must exist before this message is sent.
    DeadLetter,
}

/// One step of an entity's lifecycle: `table.column` moves `from` → `to` for the row whose
/// `key_column` is the message's key.
#[derive(Debug, Clone, Copy)]
pub struct Transition {
    table: &'static str,
    column: &'static str,
    key_column: &'static str,
    from: &'static [&'static str],
    to: &'static str,
    done: &'static [&'static str],
    early: &'static [&'static str],
    on_missing: OnMissing,
}

impl Transition {
    /// A step that moves `column` of `table` from one of `from` to `to`, finding the row by
    /// `key_column`. Identifiers may be `schema.table`; the store quotes them.
    pub const fn new(
        table: &'static str,
        column: &'static str,
        key_column: &'static str,
        from: &'static [&'static str],
        to: &'static str,
    ) -> Self {
        Self {
            table,
            column,
            key_column,
            from,
            to,
            done: &[],
            early: &[],
            on_missing: OnMissing::Retry,
        }
    }

    /// States that mean "already past this step" (besides `to`): a delivery that finds one is a
    /// duplicate.
    pub const fn with_done(mut self, done: &'static [&'static str]) -> Self {
        self.done = done;
        self
    }

    /// States that come before `from` in the lifecycle: a delivery that finds one arrived
    /// before its predecessor step, and is retried ([`Error::TooEarly`](crate::Error::TooEarly))
    /// rather than dead-lettered.
    pub const fn with_early(mut self, early: &'static [&'static str]) -> Self {
        self.early = early;
        self
    }

    /// What to do when the row does not exist.
    pub const fn on_missing(mut self, on_missing: OnMissing) -> Self {
        self.on_missing = on_missing;
        self
    }

    /// The table.
    pub const fn table(&self) -> &'static str {
        self.table
    }

    /// The status column.
    pub const fn column(&self) -> &'static str {
        self.column
    }

    /// The column holding the key.
    pub const fn key_column(&self) -> &'static str {
        self.key_column
    }

    /// The states this step moves from.
    pub const fn from(&self) -> &'static [&'static str] {
        self.from
    }

    /// The state this step moves to.
    pub const fn to(&self) -> &'static str {
        self.to
    }

    /// Whether `state` means this step was already made: `to`, or one of `done`.
    pub fn is_done(&self, state: &str) -> bool {
        state == self.to || self.done.contains(&state)
    }

    /// Whether `state` comes before this step's `from` (one of `early`).
    pub fn is_early(&self, state: &str) -> bool {
        self.early.contains(&state)
    }

    /// What to do when the row does not exist.
    pub const fn missing(&self) -> OnMissing {
        self.on_missing
    }
}

/// The statements of one [`Transition`] in a store's dialect, built once per handler.
#[derive(Debug, Clone)]
pub struct TransitionSql {
    /// The guarded update: `$1` = `to`, `$2` = key, `$3…` = `from`.
    pub update: Arc<str>,
    /// The read that classifies a delivery that moved nothing: `$1` = key.
    pub select: Arc<str>,
}

/// What the guarded update found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionOutcome {
    /// The row moved: this delivery owns the transition.
    Moved,
    /// Nothing moved. `current`: `None` = no row; `Some(state)` = the row's status (`None` if NULL).
    Unmoved {
        /// What the read found.
        current: Option<Option<String>>,
    },
}

/// Quotes a validated identifier (`name` or `schema.name`) with `quote`, part by part,
/// doubling any `quote` inside: `"…"` for PostgreSQL and SQLite, `` `…` `` for MySQL. The macro
/// admits only `[A-Za-z_][A-Za-z0-9_]*` parts; the doubling is defence in depth.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) fn quote_identifier(name: &str, quote: char) -> String {
    let doubled = format!("{quote}{quote}");
    name.split('.')
        .map(|part| format!("{quote}{}{quote}", part.replace(quote, &doubled)))
        .collect::<Vec<_>>()
        .join(".")
}

/// The guarded update and the read for `transition` in a dialect: `quote` quotes identifiers,
/// `placeholder(n)` gives the n-th (1-based) parameter marker.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) fn transition_statements(
    transition: &Transition,
    quote: char,
    placeholder: impl Fn(usize) -> String,
) -> TransitionSql {
    let table = quote_identifier(transition.table(), quote);
    let column = quote_identifier(transition.column(), quote);
    let key_column = quote_identifier(transition.key_column(), quote);
    TransitionSql {
        update: guarded_update(transition, quote, &placeholder).into(),
        select: format!(
            "SELECT {column} FROM {table} WHERE {key_column} = {key}",
            key = placeholder(1)
        )
        .into(),
    }
}

/// The guarded update of `transition` (`$1` = `to`, `$2` = key, `$3…` = `from`, as
/// `placeholder` writes them: parameter markers, or, for PostgreSQL's one-round-trip gate,
/// literals).
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) fn guarded_update(
    transition: &Transition,
    quote: char,
    placeholder: impl Fn(usize) -> String,
) -> String {
    let table = quote_identifier(transition.table(), quote);
    let column = quote_identifier(transition.column(), quote);
    let key_column = quote_identifier(transition.key_column(), quote);
    let from = (0..transition.from().len())
        .map(|i| placeholder(i + 3))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "UPDATE {table} SET {column} = {to} WHERE {key_column} = {key} AND {column} IN ({from})",
        to = placeholder(1),
        key = placeholder(2),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_identifiers_and_bind_values() {
        const STEP: Transition = Transition::new(
            "shop.orders",
            "status",
            "order_id",
            &["new", "held"],
            "paid",
        );
        let sql = transition_statements(&STEP, '"', |n| format!("${n}"));
        assert_eq!(
            &*sql.update,
            r#"UPDATE "shop"."orders" SET "status" = $1 WHERE "order_id" = $2 AND "status" IN ($3, $4)"#
        );
        assert_eq!(
            &*sql.select,
            r#"SELECT "status" FROM "shop"."orders" WHERE "order_id" = $1"#
        );
        assert_eq!(quote_identifier(r#"a"b"#, '"'), r#""a""b""#);
        assert_eq!(quote_identifier("a`b", '`'), "`a``b`");
    }
}

//! `strategy = "state_machine"` (状态机判断): the entity's own status is the dedup record.
//!
//! When a business row has a status that only moves forward (`pending → paid → shipped`), the
//! step "pay" is idempotent if it only ever moves `pending` to `paid`. The gate is one guarded
//! statement, in the handler's transaction, before the body:
//!
//! ```sql
//! UPDATE orders SET status = 'paid' WHERE order_id = $1 AND status IN ('pending')
//! ```
//!
//! One row moved: this delivery owns the transition, and the body runs. No row moved: one read
//! of the status classifies the delivery —
//!
//! - in `to` or another `done` state: an earlier delivery already made this step: a duplicate,
//!   acked, the body does not run;
//! - no row: the entity does not exist yet (its creating message has not arrived): a retryable
//!   [`Error::NotFound`](crate::Error::NotFound), or a dead-letter with
//!   `on_missing = "dead_letter"`;
//! - in one of `early` (states before `from`, e.g. `pending` for "ship"): the step arrived before
//!   its predecessor; a retryable [`Error::TooEarly`](crate::Error::TooEarly), requeued;
//! - any other state: a permanent [`Error::InvalidTransition`](crate::Error::InvalidTransition)
//!   with the current state, dead-lettered.
//!
//! What happens to a twin in flight: the guarded `UPDATE` waits on the row lock the first
//! delivery's update holds; when that commits, the twin's `WHERE` no longer matches (the status
//! is now `to`) and its read finds a done state. If the first rolls back, the twin moves the row.
//!
//! Compared with `dedup_table`: no extra table, no records to expire, and out-of-order
//! delivery is detected (a step whose entity is in an unexpected state is refused, not run).
//! The price: it needs a status column that only moves forward, and the key column must be
//! unique in the table. There is nothing to store a result or fingerprint in, so `replay`,
//! `fingerprint` and `ttl` are compile errors here.
//!
//! The statements are built once per handler, in the store's dialect, from identifiers the
//! macro validated and the store quotes; every value (key, states) is a bound parameter. The
//! status column must hold text (`TEXT`, `VARCHAR`); PostgreSQL enum columns are not supported
//! yet.

use std::sync::OnceLock;

use super::{Delivery, Gate, Refusal, Strategy};
use crate::store::{TransitionOutcome, TransitionSql, TransitionStore};

/// The value a state-machine gate compares the key column with, bound with its SQL type.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateKey {
    /// A text key (`TEXT`, `VARCHAR` column).
    Text(String),
    /// An integer key (`INTEGER`, `BIGINT` column).
    Integer(i64),
}

/// A key field type a `state_machine` gate can bind: strings and integers.
///
/// Implement it for an id newtype by converting to the column's type:
///
/// ```
/// use idem_runtime::strategy::state_machine::{StateKey, StateKeyPart};
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
    note = "key on a string or integer field, or implement `idem_runtime::strategy::state_machine::StateKeyPart` for `{Self}`"
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
}

/// The state-machine gate for one delivery: the handler's [`Transition`], its statements
/// (built on first use, then shared by every delivery), and the message's key value, bound
/// with its own SQL type.
#[derive(Debug)]
pub struct StateMachine<'h> {
    transition: &'h Transition,
    statements: &'h OnceLock<TransitionSql>,
    key: StateKey,
}

impl<'h> StateMachine<'h> {
    /// The gate of `transition` for the entity whose key column holds `key`.
    pub fn new(
        transition: &'h Transition,
        statements: &'h OnceLock<TransitionSql>,
        key: StateKey,
    ) -> Self {
        Self {
            transition,
            statements,
            key,
        }
    }
}

impl<S: TransitionStore> Strategy<S> for StateMachine<'_> {
    const NAME: &'static str = "state_machine";

    async fn enter(
        &self,
        store: &S,
        tx: &mut S::Tx,
        _delivery: &Delivery<'_>,
    ) -> Result<Gate, sqlx::Error> {
        let statements = self
            .statements
            .get_or_init(|| S::transition_sql(self.transition));
        let outcome = store
            .transition(tx, statements, self.transition, &self.key)
            .await?;
        Ok(classify(self.transition, outcome))
    }

    async fn leave(
        &self,
        _store: &S,
        _tx: &mut S::Tx,
        _delivery: &Delivery<'_>,
        _response: Option<&str>,
    ) -> Result<Gate, sqlx::Error> {
        Ok(Gate::Open)
    }

    fn is_duplicate_failure(&self, _store: &S, _error: &(dyn std::error::Error + 'static)) -> bool {
        false
    }
}

/// The gate's verdict from what the guarded update and the read found.
fn classify(transition: &Transition, outcome: TransitionOutcome) -> Gate {
    match outcome {
        TransitionOutcome::Moved => Gate::Open,
        TransitionOutcome::Unmoved { current: None } => Gate::Refused(Refusal::NotFound {
            table: transition.table().to_owned(),
            retryable: transition.on_missing == OnMissing::Retry,
        }),
        TransitionOutcome::Unmoved {
            current: Some(Some(state)),
        } if transition.is_done(&state) => Gate::Duplicate(None),
        TransitionOutcome::Unmoved {
            current: Some(Some(state)),
        } if transition.early.contains(&state.as_str()) => {
            Gate::Refused(Refusal::TooEarly { current: state })
        }
        TransitionOutcome::Unmoved {
            current: Some(current),
        } => Gate::Refused(Refusal::InvalidTransition {
            current,
            expected: transition.from().iter().map(|s| (*s).to_owned()).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAY: Transition = Transition::new("orders", "status", "order_id", &["pending"], "paid")
        .with_done(&["shipped"])
        .with_early(&["draft"]);

    fn unmoved(state: Option<&str>) -> TransitionOutcome {
        TransitionOutcome::Unmoved {
            current: Some(state.map(str::to_owned)),
        }
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&PAY, TransitionOutcome::Moved), Gate::Open);
        assert_eq!(classify(&PAY, unmoved(Some("paid"))), Gate::Duplicate(None));
        assert_eq!(
            classify(&PAY, unmoved(Some("shipped"))),
            Gate::Duplicate(None)
        );
        assert_eq!(
            classify(&PAY, unmoved(Some("cancelled"))),
            Gate::Refused(Refusal::InvalidTransition {
                current: Some("cancelled".into()),
                expected: vec!["pending".into()],
            })
        );
        assert_eq!(
            classify(&PAY, unmoved(None)),
            Gate::Refused(Refusal::InvalidTransition {
                current: None,
                expected: vec!["pending".into()],
            })
        );
        assert_eq!(
            classify(&PAY, TransitionOutcome::Unmoved { current: None }),
            Gate::Refused(Refusal::NotFound {
                table: "orders".into(),
                retryable: true,
            })
        );
        let strict = PAY.on_missing(OnMissing::DeadLetter);
        assert_eq!(
            classify(&strict, TransitionOutcome::Unmoved { current: None }),
            Gate::Refused(Refusal::NotFound {
                table: "orders".into(),
                retryable: false,
            })
        );
    }
}

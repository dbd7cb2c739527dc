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
//! The step, its key binding and its statements are in [`transition`](crate::transition). The
//! status column must hold text (`TEXT`, `VARCHAR`); PostgreSQL enum columns are not supported
//! yet. The key column may be text, an integer, or (feature `uuid`) a UUID.

use std::sync::OnceLock;

use super::{Delivery, Gate, Refusal, Strategy};
use crate::store::{Begun, TransitionStore};
use crate::transition::{OnMissing, StateKey, Transition, TransitionOutcome, TransitionSql};

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

impl super::sealed::Sealed for StateMachine<'_> {}

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

    async fn open(
        &self,
        store: &S,
        _delivery: &Delivery<'_>,
    ) -> Result<Begun<S::Tx, Gate>, sqlx::Error> {
        let statements = self
            .statements
            .get_or_init(|| S::transition_sql(self.transition));
        let begun = store
            .begin_transition(statements, self.transition, &self.key)
            .await?;
        Ok(Begun {
            tx: begun.tx,
            verdict: begun
                .verdict
                .map(|outcome| classify(self.transition, outcome)),
        })
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

    fn writes_after_body(&self, _delivery: &Delivery<'_>, _response: Option<&str>) -> bool {
        false
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
            retryable: transition.missing() == OnMissing::Retry,
        }),
        TransitionOutcome::Unmoved {
            current: Some(Some(state)),
        } if transition.is_done(&state) => Gate::Duplicate(None),
        TransitionOutcome::Unmoved {
            current: Some(Some(state)),
        } if transition.is_early(&state) => Gate::Refused(Refusal::TooEarly { current: state }),
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

//! `strategy = "unique_constraint"` (数据库唯一约束): the *optimistic* gate.
//!
//! No statement before the body: the body's own insert into a table with a unique constraint
//! on the message's key is the gate. A first delivery costs exactly what the hand-written
//! handler costs. A duplicate's insert violates the constraint; the runtime finds that
//! violation in the body's error (anywhere in its `source()` chain) or in the commit's error
//! (a deferred constraint), rolls the transaction back, and reports a duplicate, which is
//! acked. A twin in flight makes the insert wait on the twin's uncommitted row, as with any
//! unique index.
//!
//! Only a violation of the named `constraint` counts, which is why `constraint` is required: a
//! violation of any other unique index the body writes to (an audit table, a secondary key) is
//! an ordinary error, rolled back and retried or dead-lettered, never mistaken for a duplicate.
//!
//! The violation is found in the handler's error only if the error keeps the database error in
//! its [`source()`](std::error::Error::source) chain (`#[from] sqlx::Error`, or
//! `#[error(transparent)]`). An error that drops it (`map_err(|e| AppError::Db(e.to_string()))`)
//! hides the duplicate: the delivery then fails like any other error of that type (retried by
//! default, dead-lettered after `max_attempts`), and is never acked as a duplicate.
//!
//! With `replay` or `fingerprint`, the dedup record is written after the body, in the same
//! transaction (one extra statement), so that a duplicate can be checked and answered. A
//! duplicate whose record is gone (expired, purged, or the row predates `fingerprint`) cannot
//! be checked: with `fingerprint` it is an [`Error::UnverifiableDuplicate`](crate::Error::UnverifiableDuplicate),
//! dead-lettered for a person to look at; with `replay` alone it is a duplicate with no
//! replayed result.

use std::error::Error as StdError;

use super::{Delivery, Gate, Strategy};
use crate::store::Store;

/// The unique-constraint gate. See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct UniqueConstraint {
    constraint: &'static str,
}

impl UniqueConstraint {
    /// Treats violations of `constraint` as duplicates. See the store's `is_unique_violation`
    /// for how names are matched.
    pub const fn new(constraint: &'static str) -> Self {
        Self { constraint }
    }
}

impl super::sealed::Sealed for UniqueConstraint {}

impl<S: Store> Strategy<S> for UniqueConstraint {
    const NAME: &'static str = "unique_constraint";

    async fn enter(
        &self,
        _store: &S,
        _tx: &mut S::Tx,
        _delivery: &Delivery<'_>,
    ) -> Result<Gate, sqlx::Error> {
        Ok(Gate::Open)
    }

    async fn leave(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
        response: Option<&str>,
    ) -> Result<Gate, sqlx::Error> {
        if !delivery.wants_record {
            return Ok(Gate::Open);
        }
        Ok(store.claim(tx, &delivery.record(response)).await?.into())
    }

    fn writes_after_body(&self, delivery: &Delivery<'_>, _response: Option<&str>) -> bool {
        delivery.wants_record
    }

    fn is_duplicate_failure(&self, store: &S, error: &(dyn StdError + 'static)) -> bool {
        crate::classify::find_database_error(error)
            .and_then(|found| found.database())
            .is_some_and(|db| store.is_unique_violation(db, self.constraint))
    }
}

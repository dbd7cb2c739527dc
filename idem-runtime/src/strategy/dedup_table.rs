//! `strategy = "dedup_table"` (去重表): the *pessimistic* gate.
//!
//! Before the body, inside the handler's transaction, the gate writes the message's dedup
//! record with the store's [`claim`](crate::store::Store::claim). If a live record exists, the
//! message was processed: the body does not run, the transaction rolls back, the broker gets an
//! ack. If a twin delivery is in flight, the claim waits on its uncommitted record, so the twin
//! either commits (this one is a duplicate) or rolls back (this one proceeds). The body never
//! runs twice to commit.
//!
//! Cost over a hand-written handler: one `INSERT` on the happy path, plus one `UPDATE` of the
//! record with `replay`. On PostgreSQL the claim returns a taken key's record in the same
//! statement, so a duplicate costs `BEGIN` and that one statement (with
//! [`PgStore::with_gate_in_begin`](crate::PgStore::with_gate_in_begin), the claim travels with
//! the `BEGIN`); elsewhere a duplicate costs the `INSERT` and one `SELECT`. BENCHMARKS.md lists
//! every statement per store.
//!
//! In a batch (`batch`), every key of the batch is claimed in one call,
//! [`claim_batch`](crate::store::Store::claim_batch), in key order, so that two batches sharing
//! keys wait for each other instead of deadlocking.

use super::{Delivery, Gate, Strategy};
use crate::store::{Begun, Store};

/// The dedup-table gate. See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct DedupTable;

impl super::sealed::Sealed for DedupTable {}

impl<S: Store> Strategy<S> for DedupTable {
    const NAME: &'static str = "dedup_table";

    async fn enter(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
    ) -> Result<Gate, sqlx::Error> {
        Ok(store.claim(tx, &delivery.record(None)).await?.into())
    }

    async fn open(
        &self,
        store: &S,
        delivery: &Delivery<'_>,
    ) -> Result<Begun<S::Tx, Gate>, sqlx::Error> {
        let begun = store
            .begin_claim(&delivery.record(None), delivery.wants_record)
            .await?;
        Ok(Begun {
            tx: begun.tx,
            verdict: begun.verdict.map(|claim| match claim {
                Some(claim) => claim.into(),
                // Taken, and the caller did not ask for the record.
                None => Gate::Duplicate(None),
            }),
        })
    }

    async fn enter_batch(
        &self,
        store: &S,
        tx: &mut S::Tx,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Gate>, sqlx::Error> {
        let records: Vec<_> = deliveries
            .iter()
            .map(|delivery| delivery.record(None))
            .collect();
        let claims = store.claim_batch(tx, &records).await?;
        Ok(claims.into_iter().map(Gate::from).collect())
    }

    async fn leave(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
        response: Option<&str>,
    ) -> Result<Gate, sqlx::Error> {
        if let Some(response) = response {
            store.save_response(tx, delivery.key, response).await?;
        }
        Ok(Gate::Open)
    }

    fn writes_after_body(&self, _delivery: &Delivery<'_>, response: Option<&str>) -> bool {
        response.is_some()
    }

    fn is_duplicate_failure(&self, _store: &S, _error: &(dyn std::error::Error + 'static)) -> bool {
        // The gate already decided; a failure after it is a real failure.
        false
    }
}

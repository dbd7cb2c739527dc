//! Batch mode (`#[idempotent(.., batch)]`): many deliveries, one transaction, each message
//! still processed exactly once.
//!
//! 1. Each delivery's key and fingerprint are built as for one delivery (a bad key is
//!    dead-lettered on its own). A key given twice in the batch is gated once: the later
//!    deliveries ("twins") follow the first.
//! 2. A part (at first the whole batch) begins one transaction and gates every key in one
//!    call ([`Strategy::enter_batch`]: one statement on PostgreSQL, SQLite and MariaDB under
//!    `dedup_table`). Keys an earlier delivery committed are duplicates; the body gets only
//!    the fresh messages, as a slice.
//! 3. The body succeeds: the part commits once, then every delivery of the part is acked,
//!    duplicates and twins included ([`Acknowledger::ack_all`]).
//! 4. Anything fails after the transaction began (the gate, the body, a panic, the commit):
//!    the part rolls back and is split in two, and each half runs again, down to single
//!    messages, which follow the rules of a single delivery (retry with backoff, dead-letter,
//!    a unique violation that means a duplicate). One poison message in a batch of 100 costs
//!    about 14 extra transactions; the other 99 commit.
//! 5. The transaction cannot even begin (the database is down, the pool is exhausted): every
//!    delivery of the part is requeued (or dead-lettered, out of attempts) with that error,
//!    without splitting: halves would fail the same way.
//!
//! Why splitting is always safe: a half re-runs its gate. A key whose first run committed
//! (a commit whose outcome was unknown) is then a duplicate; one whose run rolled back is
//! fresh again.

use std::collections::HashMap;

use tracing::Instrument as _;

use super::{
    Attempt, Entered, HandlerSpec, Handling, PanicPayload, Prepared, Settled, accept_duplicate,
    commit_failure, complete, conclude, prepare, rollback,
};
use crate::ack::{Acknowledger, Committed};
use crate::error::{Error, HandlerErrors};
use crate::key::{Key, KeyError};
use crate::outcome::Outcome;
use crate::payload::NoReplay;
use crate::store::{CommitFailure, Store, StoredRecord};
use crate::strategy::{Delivery, Gate, Strategy};

/// A batch handler's return type: `Result<(), E>`. A batch has one body run for many
/// messages, so there is no per-message result to return or replay.
#[diagnostic::on_unimplemented(
    message = "a `batch` handler must return `Result<(), E>`, not `{Self}`",
    label = "not `Result<(), E>`",
    note = "one body run handles many messages, so it has no per-message result: return `Result<(), E>`, where `E: idem_runtime::HandlerError`"
)]
pub trait BatchOutput {}

impl<E> BatchOutput for Result<(), E> {}

/// One delivery of the batch, its message set apart (the body borrows messages as a slice).
struct Item<G, M, A> {
    message: M,
    entry: Entry<G, M, A>,
}

/// Everything about a delivery but its message.
struct Entry<G, M, A> {
    /// Its position in the batch, where its result goes.
    index: usize,
    ack: A,
    entered: Entered<G, NoReplay>,
    handling: Handling,
    span: tracing::Span,
    /// Later deliveries of the same key in this batch.
    twins: Vec<Item<G, M, A>>,
}

/// A delivery whose end is known before its part ends: a duplicate, or a refusal.
struct Decided<G, M, A, E> {
    entry: Entry<G, M, A>,
    attempt: Attempt<(), E>,
}

/// A batch being handled: made by [`open_batch`], driven by the generated code, which runs
/// the body on every part [`next_part`](Self::next_part) hands it and gives the result back to
/// [`finish_part`](Self::finish_part).
#[must_use = "a batch does nothing until its parts run"]
pub struct BatchRun<'s, S: Store, G, M, A, E> {
    store: &'s S,
    errors: HandlerErrors<E>,
    /// Groups of deliveries waiting for a part of their own, the next on top.
    pending: Vec<Vec<Item<G, M, A>>>,
    results: Vec<Option<Settled<(), E>>>,
    span: tracing::Span,
    /// Transactions begun so far: 1 for a batch that committed at once.
    parts: u64,
}

impl<S: Store, G, M, A, E> std::fmt::Debug for BatchRun<'_, S, G, M, A, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchRun")
            .field("store", &S::NAME)
            .field("pending", &self.pending.iter().map(Vec::len).sum::<usize>())
            .finish_non_exhaustive()
    }
}

/// A part of a batch whose gate opened: a transaction, and the fresh messages the body
/// handles in it.
#[must_use = "a part holds a transaction: give it back to `finish_part`"]
pub struct BatchPart<S: Store, G, M, A, E> {
    tx: S::Tx,
    messages: Vec<M>,
    fresh: Vec<Entry<G, M, A>>,
    decided: Vec<Decided<G, M, A, E>>,
    span: tracing::Span,
}

impl<S: Store, G, M, A, E> std::fmt::Debug for BatchPart<S, G, M, A, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPart")
            .field("store", &S::NAME)
            .field("fresh", &self.fresh.len())
            .field("duplicates", &self.decided.len())
            .finish_non_exhaustive()
    }
}

impl<S: Store, G, M, A, E> BatchPart<S, G, M, A, E> {
    /// The transaction, the fresh messages for the body, and the span to run the body in.
    pub fn parts(&mut self) -> (&mut S::Tx, &[M], tracing::Span) {
        (&mut self.tx, &self.messages, self.span.clone())
    }
}

/// Step one of a batch: builds every delivery's key and fingerprint (settling, at once, those
/// that cannot go on: a bad key, a panic in user code) and groups the deliveries by key.
#[allow(clippy::too_many_arguments)] // called once, by generated code
pub async fn open_batch<'s, S, G, M, A, E>(
    store: &'s S,
    spec: &'static HandlerSpec,
    errors: HandlerErrors<E>,
    deliveries: Vec<(M, A)>,
    strategy: impl Fn() -> G,
    key: impl Fn(&M, Option<&str>) -> Result<Key, KeyError>,
    fingerprint: impl Fn(&M) -> Option<Result<String, serde_json::Error>>,
) -> BatchRun<'s, S, G, M, A, E>
where
    S: Store,
    G: Strategy<S>,
    A: Acknowledger,
{
    let span = tracing::info_span!(
        "idem.handle_batch",
        scope = spec.scope(),
        strategy = G::NAME,
        store = S::NAME,
        size = deliveries.len(),
        parts = tracing::field::Empty,
    );
    let mut results = Vec::with_capacity(deliveries.len());
    results.resize_with(deliveries.len(), || None);
    let mut items = Vec::with_capacity(deliveries.len());
    let now_ms = store.now_ms();
    for (index, (message, ack)) in deliveries.into_iter().enumerate() {
        let handling = Handling::start(spec, G::NAME, S::NAME);
        let delivery_span = span.in_scope(|| handling.span(&ack));
        let prepared = Prepared::new(
            &strategy,
            || key(&message, ack.message_id()),
            || fingerprint(&message),
        );
        let entered = delivery_span.in_scope(|| prepare(now_ms, spec, prepared, NoReplay));
        match entered {
            Ok(entered) => items.push(Item {
                message,
                entry: Entry {
                    index,
                    ack,
                    entered,
                    handling,
                    span: delivery_span,
                    twins: Vec::new(),
                },
            }),
            Err(attempt) => {
                let settled = conclude(ack, handling, errors, attempt)
                    .instrument(delivery_span)
                    .await;
                results[index] = Some(settled);
            }
        }
    }
    let group = group_twins(items);
    BatchRun {
        store,
        errors,
        pending: if group.is_empty() {
            Vec::new()
        } else {
            vec![group]
        },
        results,
        span,
        parts: 0,
    }
}

/// The first delivery of each key, in batch order, each holding the later ones of its key.
fn group_twins<G, M, A>(items: Vec<Item<G, M, A>>) -> Vec<Item<G, M, A>> {
    let mut first: HashMap<(String, String), usize> = HashMap::new();
    let mut leaders: Vec<Item<G, M, A>> = Vec::with_capacity(items.len());
    for item in items {
        let key = &item.entry.entered.key;
        let id = (key.scope().to_owned(), key.value().to_owned());
        match first.get(&id) {
            Some(&leader) => leaders[leader].entry.twins.push(item),
            None => {
                first.insert(id, leaders.len());
                leaders.push(item);
            }
        }
    }
    leaders
}

impl<'s, S, G, M, A, E> BatchRun<'s, S, G, M, A, E>
where
    S: Store,
    G: Strategy<S>,
    A: Acknowledger,
{
    /// The next part whose body should run, or `None` when every delivery is settled. Parts
    /// whose keys all turn out to be duplicates are settled here, without a body run.
    pub async fn next_part(&mut self) -> Option<BatchPart<S, G, M, A, E>> {
        let span = self.span.clone();
        async {
            while let Some(group) = self.pending.pop() {
                if let Some(part) = self.begin_part(group).await {
                    return Some(part);
                }
            }
            None
        }
        .instrument(span)
        .await
    }

    /// Every delivery's result, in the batch's order.
    pub fn into_results(self) -> Vec<Settled<(), E>> {
        self.span.record("parts", self.parts);
        self.results
            .into_iter()
            .map(|result| result.expect("every delivery of a finished batch is settled"))
            .collect()
    }

    /// Begins a transaction for `group` and gates its keys; `None` when the group is settled
    /// already (all duplicates, or the transaction could not begin) or was split.
    async fn begin_part(
        &mut self,
        mut group: Vec<Item<G, M, A>>,
    ) -> Option<BatchPart<S, G, M, A, E>> {
        let store = self.store;
        let now_ms = store.now_ms();
        for item in &mut group {
            item.entry.refresh(now_ms);
        }
        self.parts += 1;
        let mut tx = match store.begin().await {
            Ok(tx) => tx,
            Err(error) => {
                tracing::warn!(%error, size = group.len(), "could not begin the batch's transaction; requeueing its deliveries");
                for item in group {
                    self.fail_all(item, &error).await;
                }
                return None;
            }
        };
        let strategy = &group[0].entry.entered.strategy;
        let deliveries: Vec<Delivery<'_>> = group
            .iter()
            .map(|item| item.entry.entered.delivery())
            .collect();
        let gates = strategy.enter_batch(store, &mut tx, &deliveries).await;
        drop(deliveries);
        let gates = gates.and_then(|gates| {
            if gates.len() == group.len() {
                Ok(gates)
            } else {
                Err(sqlx::Error::Protocol(format!(
                    "the batch gate returned {} verdicts for {} keys",
                    gates.len(),
                    group.len()
                )))
            }
        });
        let gates = match gates {
            Ok(gates) => gates,
            Err(error) => {
                rollback(store, tx).await;
                if group.len() == 1 {
                    let item = group.pop().expect("one item");
                    let delivery = item.entry.entered.delivery();
                    let attempt = Err(commit_failure(CommitFailure::Database(error), &delivery));
                    self.settle_failed_single(item, attempt).await;
                } else {
                    tracing::info!(%error, size = group.len(), "the batch's gate failed; splitting the batch");
                    self.split(group);
                }
                return None;
            }
        };
        let mut messages = Vec::new();
        let mut fresh = Vec::new();
        let mut decided = Vec::new();
        for (item, gate) in group.into_iter().zip(gates) {
            let Item { message, entry } = item;
            let delivery = entry.entered.delivery();
            let attempt = match gate {
                Gate::Open => {
                    messages.push(message);
                    fresh.push(entry);
                    continue;
                }
                Gate::Duplicate(record) => {
                    let attempt = accept_duplicate(&delivery, &NoReplay, record.clone());
                    // Twins of a committed message are duplicates of the same record.
                    let mut entry = entry;
                    for twin in std::mem::take(&mut entry.twins) {
                        let twin_delivery = twin.entry.entered.delivery();
                        let attempt = accept_duplicate(&twin_delivery, &NoReplay, record.clone());
                        decided.push(Decided {
                            entry: twin.entry,
                            attempt,
                        });
                    }
                    decided.push(Decided { entry, attempt });
                    continue;
                }
                Gate::Refused(refusal) => Err(refusal.into_error(delivery.key)),
            };
            decided.push(Decided { entry, attempt });
        }
        if fresh.is_empty() {
            // Nothing to write: the gate wrote nothing either.
            rollback(store, tx).await;
            self.settle_decided(decided).await;
            return None;
        }
        failpoint!(crate::failpoints::AFTER_GATE);
        let span = if fresh.len() == 1 {
            fresh[0].span.clone()
        } else {
            tracing::info_span!("idem.batch_part", size = fresh.len())
        };
        Some(BatchPart {
            tx,
            messages,
            fresh,
            decided,
            span,
        })
    }

    /// Step two, after the body ran on a part: commit and ack it, or roll it back and split
    /// it (a single message: settle it as a single delivery).
    pub async fn finish_part(
        &mut self,
        part: BatchPart<S, G, M, A, E>,
        result: Result<Result<(), E>, PanicPayload>,
    ) {
        let span = self.span.clone();
        self.finish(part, result).instrument(span).await;
    }

    async fn finish(
        &mut self,
        part: BatchPart<S, G, M, A, E>,
        result: Result<Result<(), E>, PanicPayload>,
    ) {
        let BatchPart {
            mut tx,
            mut messages,
            mut fresh,
            decided,
            span: _,
        } = part;
        let store = self.store;
        if fresh.len() == 1 {
            // One message: exactly the single-delivery rules.
            let entry = fresh.pop().expect("one entry");
            let message = messages.pop().expect("one message");
            let attempt = complete(store, &entry.entered, self.errors, tx, result)
                .instrument(entry.span.clone())
                .await;
            self.settle_decided(decided).await;
            match attempt {
                Ok((outcome, _proof)) => self.settle_committed(vec![(entry, outcome)]).await,
                Err(error) => {
                    self.settle_failed_single(Item { message, entry }, Err(error))
                        .await;
                }
            }
            return;
        }
        let size = fresh.len();
        failpoint!(crate::failpoints::AFTER_BODY);
        let failure = match result {
            Ok(Ok(())) => {
                // The entries hold acknowledgers, which need not be `Sync`: lend only the gates.
                let entered: Vec<&Entered<G, NoReplay>> =
                    fresh.iter().map(|entry| &entry.entered).collect();
                keep(store, &mut tx, &entered).await.err()
            }
            Ok(Err(error)) => {
                let errors = self.errors;
                // The error's `Display` is user code.
                let text = crate::unwind::catch_sync(|| errors.as_error(&error).to_string())
                    .unwrap_or_else(|message| format!("(its Display panicked: {message})"));
                Some(format!("the body returned an error: {text}"))
            }
            Err(payload) => Some(format!(
                "the body panicked: {}",
                crate::unwind::panic_message(&payload)
            )),
        };
        let committed = match failure {
            Some(reason) => {
                rollback(store, tx).await;
                Err(reason)
            }
            None => {
                failpoint!(crate::failpoints::BEFORE_COMMIT);
                store.commit(tx).await.map_err(|failure| match failure {
                    CommitFailure::Aborted => "the transaction was aborted".to_owned(),
                    CommitFailure::Database(error) => format!("the commit failed: {error}"),
                })
            }
        };
        self.settle_decided(decided).await;
        match committed {
            Ok(()) => {
                let processed = fresh
                    .into_iter()
                    .map(|entry| (entry, Outcome::Processed(())))
                    .collect();
                self.settle_committed(processed).await;
            }
            Err(reason) => {
                tracing::info!(%reason, size, "a batch part failed; rolled back, splitting it to find the failing message");
                let group = messages
                    .into_iter()
                    .zip(fresh)
                    .map(|(message, entry)| Item { message, entry })
                    .collect();
                self.split(group);
            }
        }
    }

    /// Rolled back: each half of `group` runs again in a part of its own, the first half first.
    fn split(&mut self, mut group: Vec<Item<G, M, A>>) {
        let second = group.split_off(group.len() / 2);
        self.pending.push(second);
        self.pending.push(group);
    }

    /// Acks the deliveries of a committed part, and the twins of each (duplicates of it), all
    /// at once; a twin whose payload differs is dead-lettered.
    async fn settle_committed(&mut self, committed: Vec<(Entry<G, M, A>, Outcome<()>)>) {
        let mut acks = Vec::new();
        let mut settled = Vec::new();
        let mut mismatched = Vec::new();
        for (mut entry, outcome) in committed {
            let written = StoredRecord {
                fingerprint: entry.entered.fingerprint.clone(),
                response: None,
                created_at_ms: entry.entered.now_ms,
            };
            for twin in std::mem::take(&mut entry.twins) {
                let delivery = twin.entry.entered.delivery();
                match accept_duplicate::<(), E, _>(&delivery, &NoReplay, Some(written.clone())) {
                    Ok((outcome, _)) => push_ack(&mut acks, &mut settled, twin.entry, outcome),
                    Err(error) => mismatched.push((twin.entry, error)),
                }
            }
            push_ack(&mut acks, &mut settled, entry, outcome);
        }
        self.ack_all(acks, settled).await;
        for (entry, error) in mismatched {
            self.conclude(entry, Err(error)).await;
        }
    }

    /// Settles the duplicates and refusals a part's gate found.
    async fn settle_decided(&mut self, decided: Vec<Decided<G, M, A, E>>) {
        let mut acks = Vec::new();
        let mut settled = Vec::new();
        for Decided { entry, attempt } in decided {
            match attempt {
                Ok((outcome, _proof)) => push_ack(&mut acks, &mut settled, entry, outcome),
                Err(error) => self.conclude(entry, Err(error)).await,
            }
        }
        self.ack_all(acks, settled).await;
    }

    /// One message's failure, settled by the single-delivery rules; its twins then run on
    /// their own, since nothing committed their message.
    async fn settle_failed_single(&mut self, item: Item<G, M, A>, attempt: Attempt<(), E>) {
        let Item {
            message: _,
            mut entry,
        } = item;
        let twins = std::mem::take(&mut entry.twins);
        self.conclude(entry, attempt).await;
        if !twins.is_empty() {
            self.pending.push(group_twins(twins));
        }
    }

    /// The transaction could not begin: `item` and its twins fail with `error`.
    async fn fail_all(&mut self, item: Item<G, M, A>, error: &sqlx::Error) {
        let Item {
            message: _,
            mut entry,
        } = item;
        // Twins have none of their own.
        for twin in std::mem::take(&mut entry.twins) {
            self.conclude(twin.entry, Err(Error::Database(replicate(error))))
                .await;
        }
        self.conclude(entry, Err(Error::Database(replicate(error))))
            .await;
    }

    async fn conclude(&mut self, entry: Entry<G, M, A>, attempt: Attempt<(), E>) {
        let Entry {
            index,
            ack,
            handling,
            span,
            ..
        } = entry;
        let settled = conclude(ack, handling, self.errors, attempt)
            .instrument(span)
            .await;
        self.results[index] = Some(settled);
    }

    /// Acks `acks` after the commit that covered them, at once, and records each outcome.
    async fn ack_all(&mut self, acks: Vec<A>, settled: Vec<Acked>) {
        if acks.is_empty() {
            return;
        }
        failpoint!(crate::failpoints::AFTER_COMMIT);
        let told = A::ack_all(acks, Committed::new()).await;
        for (acked, told) in settled.into_iter().zip(told) {
            let Acked {
                index,
                outcome,
                handling,
                span,
                attempt,
            } = acked;
            span.record("outcome", outcome.as_str());
            if let Err(error) = told {
                span.in_scope(|| {
                    tracing::warn!(
                        %error,
                        "ack failed after commit; the broker will redeliver and the gate will report a duplicate"
                    );
                });
            }
            handling.acked(&outcome, attempt);
            self.results[index] = Some(Ok(outcome));
        }
        failpoint!(crate::failpoints::AFTER_ACK);
    }
}

/// The gate after the body, for every fresh message of a part that succeeded.
async fn keep<S, G>(
    store: &S,
    tx: &mut S::Tx,
    fresh: &[&Entered<G, NoReplay>],
) -> Result<(), String>
where
    S: Store,
    G: Strategy<S>,
{
    let writes = fresh.iter().any(|entered| {
        entered
            .strategy
            .writes_after_body(&entered.delivery(), None)
    });
    if writes {
        store
            .ensure_open(tx)
            .await
            .map_err(|failure| match failure {
                CommitFailure::Aborted => "the transaction was aborted".to_owned(),
                CommitFailure::Database(error) => error.to_string(),
            })?;
    }
    for entered in fresh {
        let delivery = entered.delivery();
        match entered.strategy.leave(store, tx, &delivery, None).await {
            Ok(Gate::Open) => {}
            Ok(_) => {
                return Err(format!(
                    "the gate after the body found `{}` taken",
                    delivery.key.value()
                ));
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(())
}

/// A delivery whose ack is in flight, with what to record once it is told.
struct Acked {
    index: usize,
    outcome: Outcome<()>,
    handling: Handling,
    span: tracing::Span,
    attempt: u32,
}

fn push_ack<G, M, A: Acknowledger>(
    acks: &mut Vec<A>,
    settled: &mut Vec<Acked>,
    entry: Entry<G, M, A>,
    outcome: Outcome<()>,
) {
    let attempt = entry.ack.attempt().unwrap_or(1).max(1);
    acks.push(entry.ack);
    settled.push(Acked {
        index: entry.index,
        outcome,
        handling: entry.handling,
        span: entry.span,
        attempt,
    });
}

impl<G, M, A> Entry<G, M, A> {
    /// A new part's time: the record's creation and expiry are when the part runs.
    fn refresh(&mut self, now_ms: i64) {
        let entered = &mut self.entered;
        if let Some(expires) = entered.expires_at_ms {
            let ttl = expires.saturating_sub(entered.now_ms);
            entered.expires_at_ms = Some(now_ms.saturating_add(ttl));
        }
        entered.now_ms = now_ms;
        for twin in &mut self.twins {
            twin.entry.refresh(now_ms);
        }
    }
}

/// An error like `error`, for each of the deliveries a failed begin fails (sqlx errors are not
/// `Clone`): of the same retryable kind.
fn replicate(error: &sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    }
}

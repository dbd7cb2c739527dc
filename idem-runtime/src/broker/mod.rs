//! Consuming from a real broker: acknowledgers for each broker's delivery handle, and consumer
//! runners that fetch, decode, handle and settle, acking only after the commit.
//!
//! Each broker lives in its own module, behind its own cargo feature, on the broker's standard
//! client:
//!
//! | feature         | module             | client       | runner | batch runner |
//! |-----------------|--------------------|--------------|--------|--------------|
//! | `rabbitmq`      | `broker::rabbitmq`     | `lapin`      | `RabbitMqConsumer` | `RabbitMqBatchConsumer` |
//! | `nats`          | `broker::nats`         | `async-nats` | `NatsConsumer` | `NatsBatchConsumer` |
//! | `redis-streams` | `broker::redis_streams`| `redis`      | `RedisStreamConsumer` | `RedisStreamsBatchConsumer` |
//!
//! Every module offers the same three levels:
//!
//! - an [`Acknowledger`] for the broker's delivery, so that a service keeps its own consumer
//!   loop and adds idem one handler at a time;
//! - a consumer runner that does the loop: fetch with bounded prefetch, decode
//!   ([`Json`] by default, any [`Decode`]), call the [`Handler`] on up to
//!   [`ConsumerOptions::concurrency`] deliveries at once, settle, and stop gracefully when its
//!   [`CancellationToken`] is cancelled;
//! - the same runner in batch mode, for a `batch` handler
//!   ([`BatchHandler`](crate::handler::BatchHandler)): it collects up to
//!   [`BatchOptions::max_size`] deliveries (or what arrives within [`BatchOptions::max_wait`]
//!   of the first), runs them in one transaction, and settles each delivery as the
//!   single-delivery runner does, each only after the part of the batch it belongs to
//!   committed.
//!
//! What each outcome becomes, on every broker:
//!
//! | outcome | the broker is told |
//! |---|---|
//! | processed, duplicate, observed duplicate | ack, after the commit |
//! | retryable failure, attempts left | requeue after the backoff delay, attempt count carried |
//! | retryable failure, out of attempts | dead-letter, with the reason and the attempt count |
//! | permanent failure, undecodable payload, bad key | dead-letter, with the reason and the attempt count |
//! | cancelled at the shutdown deadline, or the process died | nothing: the broker redelivers |
//!
//! Deliveries of one key may run at once, on one consumer or many: the gate, not the runner,
//! makes sure one of them runs the body.

// The runner's pieces are used by the broker modules; with none enabled, only the public
// options and decoders remain.
#![cfg_attr(
    not(any(feature = "rabbitmq", feature = "nats", feature = "redis-streams")),
    allow(dead_code)
)]

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub use tokio_util::sync::CancellationToken;

use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue};
use crate::handler::Handler;

/// A boxed error, as a [`Decode`] returns it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Turns a delivery's payload into the handler's message type. [`Json`] is the default;
/// implement it for another format (protobuf, MessagePack, a versioned envelope).
///
/// A payload that does not decode can never succeed, so the runner dead-letters it with the
/// decoder's error as the reason. A panic in `decode` is treated the same way.
///
/// ```
/// use idem_runtime::broker::{BoxError, Decode};
///
/// /// Messages that are a bare order id in UTF-8.
/// struct OrderId;
///
/// impl Decode<String> for OrderId {
///     fn decode(&self, payload: &[u8]) -> Result<String, BoxError> {
///         Ok(std::str::from_utf8(payload)?.to_owned())
///     }
/// }
///
/// assert_eq!(OrderId.decode(b"o-1").unwrap(), "o-1");
/// assert!(OrderId.decode(&[0xff]).is_err());
/// ```
pub trait Decode<M>: Send + Sync + 'static {
    /// Decodes one payload.
    fn decode(&self, payload: &[u8]) -> Result<M, BoxError>;
}

/// Payloads are JSON, decoded with `serde_json` into the message type.
///
/// ```
/// use idem_runtime::broker::{Decode, Json};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPaid { order_id: String }
///
/// let paid: OrderPaid = Json.decode(br#"{"order_id": "o-1"}"#).unwrap();
/// assert_eq!(paid.order_id, "o-1");
/// assert!(Decode::<OrderPaid>::decode(&Json, b"{").is_err());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<M: serde::de::DeserializeOwned> Decode<M> for Json {
    fn decode(&self, payload: &[u8]) -> Result<M, BoxError> {
        serde_json::from_slice(payload).map_err(Into::into)
    }
}

/// How a consumer runner fetches and runs deliveries. The defaults are bounded: 16 handlers
/// at once, 32 deliveries fetched ahead, 30 seconds for in-flight handlers at shutdown.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::broker::ConsumerOptions;
///
/// let options = ConsumerOptions::default()
///     .concurrency(64)
///     .prefetch(128)
///     .shutdown_grace(Duration::from_secs(10));
/// assert_eq!(options.concurrency_limit(), 64);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerOptions {
    concurrency: usize,
    prefetch: u16,
    shutdown_grace: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            prefetch: 32,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl ConsumerOptions {
    /// At most this many handlers run at once (at least 1). Size it with the store's pool:
    /// each running handler holds one connection.
    #[must_use]
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// At most this many deliveries are fetched ahead of the handlers (at least 1): RabbitMQ's
    /// `basic.qos` prefetch count, JetStream's batch size, the Redis `XREADGROUP` `COUNT`.
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// How long, after shutdown is requested, handlers already running may take to finish
    /// and settle. Past it they are cancelled, and their deliveries are left unacknowledged,
    /// for the broker to redeliver (never acked).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// [`concurrency`](Self::concurrency).
    pub fn concurrency_limit(&self) -> usize {
        self.concurrency
    }

    /// [`prefetch`](Self::prefetch).
    pub fn prefetch_count(&self) -> u16 {
        self.prefetch
    }

    /// [`shutdown_grace`](Self::shutdown_grace).
    pub fn grace(&self) -> Duration {
        self.shutdown_grace
    }
}

/// The largest [`BatchOptions::max_size`]: the largest prefetch a broker takes (RabbitMQ's is
/// 16 bits), so a larger batch could never fill.
pub const MAX_BATCH_SIZE: usize = u16::MAX as usize;

/// How many deliveries a batch being collected makes room for at first: batches that stay small
/// (a short `max_wait`) do not allocate for a large `max_size`.
pub(crate) const BATCH_CAPACITY: usize = 1024;

/// The longest [`BatchOptions::max_wait`]: a batch never waits longer than this for its last
/// delivery (its first would hold its prefetch slot meanwhile).
pub const MAX_BATCH_WAIT: Duration = Duration::from_secs(60);

/// How a runner in batch mode collects deliveries for a `batch` handler
/// ([`BatchHandler`](crate::handler::BatchHandler)): up to [`max_size`](Self::max_size)
/// deliveries, or whatever arrived within [`max_wait`](Self::max_wait) of the first, whichever
/// comes first. The defaults: 100 deliveries, 20 ms.
///
/// Each batch runs in one transaction (see [`pipeline::batch`](crate::pipeline::batch)), and
/// [`ConsumerOptions::concurrency`] batches run at once, each holding one connection. The
/// runner raises the prefetch to at least `max_size` × concurrency, so that batches can fill.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::broker::BatchOptions;
///
/// let batches = BatchOptions::default().max_size(500).max_wait(Duration::from_millis(50));
/// assert_eq!(batches.size_limit(), 500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    max_size: usize,
    max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_size: 100,
            max_wait: Duration::from_millis(20),
        }
    }
}

impl BatchOptions {
    /// At most this many deliveries per batch (at least 1, at most [`MAX_BATCH_SIZE`]; a
    /// larger size is cut to it, so that `usize::MAX` means "as many as arrive within
    /// `max_wait`").
    #[must_use]
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size.clamp(1, MAX_BATCH_SIZE);
        self
    }

    /// How long a batch waits for more deliveries after its first, before it runs with what it
    /// has (at most [`MAX_BATCH_WAIT`]; a longer wait is cut to it).
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait.min(MAX_BATCH_WAIT);
        self
    }

    /// [`max_size`](Self::max_size).
    pub fn size_limit(&self) -> usize {
        self.max_size
    }

    /// [`max_wait`](Self::max_wait).
    pub fn wait_limit(&self) -> Duration {
        self.max_wait
    }

    /// The prefetch a runner needs so that `concurrency` batches can fill: at least
    /// `prefetch`, raised to `max_size` × `concurrency`, at most what the broker accepts.
    pub(crate) fn prefetch_for(&self, options: &ConsumerOptions) -> u16 {
        let wanted = self.max_size.saturating_mul(options.concurrency_limit());
        u16::try_from(wanted)
            .unwrap_or(u16::MAX)
            .max(options.prefetch_count())
    }
}

/// What a consumer runner did, counted as it settled each delivery. Shared, so a service can
/// read it while the runner runs ([`ConsumerStats::snapshot`]).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    processed: AtomicU64,
    duplicates: AtomicU64,
    requeued: AtomicU64,
    dead_lettered: AtomicU64,
    unsettled: AtomicU64,
    settle_failures: AtomicU64,
    /// Woken at every count, for [`ConsumerStats::wait_until`].
    changed: tokio::sync::Notify,
}

/// A [`ConsumerStats`] reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Deliveries whose body ran and committed (observed duplicates included), then acked.
    pub processed: u64,
    /// Deliveries recognised as duplicates, acked without running the body.
    pub duplicates: u64,
    /// Failed deliveries handed back for a later attempt.
    pub requeued: u64,
    /// Deliveries moved to the dead-letter destination: permanent failures, undecodable
    /// payloads, bad keys, retryable failures out of attempts.
    pub dead_lettered: u64,
    /// Deliveries left unsettled: cancelled at the shutdown deadline. The broker redelivers them.
    pub unsettled: u64,
    /// Deliveries whose settling the broker refused (a closed channel, a lost connection). The
    /// broker redelivers them; after a commit, the redelivery is a duplicate.
    pub settle_failures: u64,
}

impl ConsumerStats {
    /// The counts so far.
    pub fn snapshot(&self) -> ConsumerReport {
        ConsumerReport {
            processed: self.processed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            unsettled: self.unsettled.load(Ordering::Relaxed),
            settle_failures: self.settle_failures.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count(&self, settled: Settled) {
        let counter = match settled {
            Settled::Processed => &self.processed,
            Settled::Duplicate => &self.duplicates,
            Settled::Requeued => &self.requeued,
            Settled::DeadLettered => &self.dead_lettered,
            Settled::Unsettled => &self.unsettled,
            Settled::Refused => &self.settle_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Waits until a reading satisfies `done`, and returns it: woken by each settled delivery,
    /// never polling. Wrap it in [`tokio::time::timeout`] to bound the wait.
    ///
    /// ```
    /// use idem_runtime::broker::ConsumerStats;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let stats = ConsumerStats::default();
    /// // Nothing settled yet: a wait for zero deliveries returns at once.
    /// let report = stats.wait_until(|report| report.processed == 0).await;
    /// assert_eq!(report.duplicates, 0);
    /// # });
    /// ```
    pub async fn wait_until(
        &self,
        mut done: impl FnMut(&ConsumerReport) -> bool,
    ) -> ConsumerReport {
        loop {
            // Registered before the reading, so a count between the two still wakes us.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let report = self.snapshot();
            if done(&report) {
                return report;
            }
            changed.await;
        }
    }
}

/// How one delivery ended, as the runner counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub(crate) enum Settled {
    Processed,
    Duplicate,
    Requeued,
    DeadLettered,
    Unsettled,
    Refused,
}

/// Which settling call the pipeline made, and whether the broker took it.
#[derive(Debug, Default)]
struct SettleRecord(AtomicU8);

const ACKED: u8 = 1;
const REQUEUED: u8 = 2;
const DEAD_LETTERED: u8 = 3;
const REFUSED: u8 = 4;

/// Wraps a broker's acknowledger to see how the pipeline settled the delivery.
struct Recording<'r, A> {
    inner: A,
    record: &'r SettleRecord,
}

impl<A: Acknowledger> Acknowledger for Recording<'_, A> {
    type Error = A::Error;

    fn attempt(&self) -> Option<u32> {
        self.inner.attempt()
    }
    fn delivery_limit(&self) -> Option<u32> {
        self.inner.delivery_limit()
    }
    fn message_id(&self) -> Option<&str> {
        self.inner.message_id()
    }
    async fn ack(self, proof: Committed) -> Result<(), Self::Error> {
        let told = self.inner.ack(proof).await;
        Recording::<()>::store(self.record, &told, ACKED);
        told
    }
    async fn requeue(self, requeue: Requeue) -> Result<(), Self::Error> {
        let told = self.inner.requeue(requeue).await;
        Recording::<()>::store(self.record, &told, REQUEUED);
        told
    }
    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        let told = self.inner.dead_letter(letter).await;
        Recording::<()>::store(self.record, &told, DEAD_LETTERED);
        told
    }
}

impl Recording<'_, ()> {
    fn store<E>(record: &SettleRecord, told: &Result<(), E>, what: u8) {
        let value = if told.is_ok() { what } else { REFUSED };
        record.0.store(value, Ordering::Relaxed);
    }
}

/// Decodes one delivery, hands it to the handler and counts how it was settled: what every
/// runner does with each delivery. An undecodable payload is dead-lettered here, with the
/// decoder's error.
pub(crate) async fn deliver<H, D, A>(
    handler: &H,
    decoder: &D,
    store: &H::Store,
    payload: &[u8],
    ack: A,
    stats: &ConsumerStats,
) where
    H: Handler,
    D: Decode<H::Message>,
    A: Acknowledger,
{
    let record = SettleRecord::default();
    let ack = Recording {
        inner: ack,
        record: &record,
    };
    // `decode` is user code: a panic there is a payload that cannot be decoded.
    let decoded = crate::unwind::catch_sync(|| decoder.decode(payload))
        .unwrap_or_else(|message| Err(format!("the decoder panicked: {message}").into()));
    let outcome = match decoded {
        Ok(message) => handler.handle(store, message, ack).await.ok(),
        Err(source) => {
            crate::handler::dead_letter_undecodable::<H::Message, _>(ack, source).await;
            None
        }
    };
    let settled = match (record.0.load(Ordering::Relaxed), outcome) {
        (ACKED, Some(outcome)) if outcome.is_duplicate() => Settled::Duplicate,
        (ACKED, _) => Settled::Processed,
        (REQUEUED, _) => Settled::Requeued,
        (DEAD_LETTERED, _) => Settled::DeadLettered,
        (REFUSED, _) => Settled::Refused,
        _ => Settled::Unsettled,
    };
    stats.count(settled);
}

/// Decodes each delivery of a batch, hands the decoded ones to the batch handler at once and
/// counts how each was settled: what every runner's batch mode does with a batch. An
/// undecodable payload is dead-lettered on its own, before the batch runs.
pub(crate) async fn deliver_batch<H, D, P, A>(
    handler: &H,
    decoder: &D,
    store: &H::Store,
    deliveries: Vec<(P, A)>,
    stats: &ConsumerStats,
) where
    H: crate::handler::BatchHandler,
    D: Decode<H::Message>,
    P: std::ops::Deref<Target = [u8]>,
    A: Acknowledger,
{
    for settled in handle_batch(handler, decoder, store, deliveries).await {
        stats.count(settled);
    }
}

/// [`deliver_batch`] without the counting: how each delivery was settled, in order, for a
/// runner that finishes settling them itself (RabbitMQ sends the acks after the batch).
pub(crate) async fn handle_batch<H, D, P, A>(
    handler: &H,
    decoder: &D,
    store: &H::Store,
    deliveries: Vec<(P, A)>,
) -> Vec<Settled>
where
    H: crate::handler::BatchHandler,
    D: Decode<H::Message>,
    P: std::ops::Deref<Target = [u8]>,
    A: Acknowledger,
{
    let records: Vec<SettleRecord> = deliveries.iter().map(|_| SettleRecord::default()).collect();
    let mut batch: Vec<(H::Message, Box<dyn crate::handler::DynAcknowledger + '_>)> =
        Vec::with_capacity(deliveries.len());
    let mut positions = Vec::with_capacity(deliveries.len());
    for (position, ((payload, ack), record)) in deliveries.into_iter().zip(&records).enumerate() {
        let ack = Recording { inner: ack, record };
        let decoded = crate::unwind::catch_sync(|| decoder.decode(&payload))
            .unwrap_or_else(|message| Err(format!("the decoder panicked: {message}").into()));
        match decoded {
            Ok(message) => {
                batch.push((message, Box::new(ack)));
                positions.push(position);
            }
            Err(source) => {
                crate::handler::dead_letter_undecodable::<H::Message, _>(ack, source).await;
            }
        }
    }
    let mut duplicate = vec![false; records.len()];
    if !batch.is_empty() {
        let results = handler.handle_batch(store, batch).await;
        for (position, result) in positions.into_iter().zip(results) {
            duplicate[position] = matches!(result, Ok(outcome) if outcome.is_duplicate());
        }
    }
    records
        .iter()
        .zip(duplicate)
        .map(
            |(record, duplicate)| match record.0.load(Ordering::Relaxed) {
                ACKED if duplicate => Settled::Duplicate,
                ACKED => Settled::Processed,
                REQUEUED => Settled::Requeued,
                DEAD_LETTERED => Settled::DeadLettered,
                REFUSED => Settled::Refused,
                _ => Settled::Unsettled,
            },
        )
        .collect()
}

/// The handlers a runner has in flight: at most `concurrency` at once, drained at shutdown.
pub(crate) struct Workers {
    tasks: JoinSet<()>,
    permits: Arc<Semaphore>,
    stats: Arc<ConsumerStats>,
    /// How many deliveries each running batch holds ([`Workers::spawn_batch`]): what a batch
    /// cancelled at the shutdown deadline counts as unsettled. A task not in it holds one.
    batch_sizes: HashMap<tokio::task::Id, u64>,
}

impl Workers {
    pub(crate) fn new(concurrency: usize, stats: Arc<ConsumerStats>) -> Self {
        Self {
            tasks: JoinSet::new(),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            stats,
            batch_sizes: HashMap::new(),
        }
    }

    /// Waits for a free slot, reaping handlers that have finished. Cancel-safe.
    pub(crate) async fn ready(&mut self) -> OwnedSemaphorePermit {
        while let Some(result) = self.tasks.try_join_next_with_id() {
            self.forget(&result);
            Self::reaped(result.map(|(_, ())| ()));
        }
        // The semaphore is never closed.
        match Arc::clone(&self.permits).acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the workers' semaphore is never closed"),
        }
    }

    /// Runs one delivery's handling in the slot `permit` holds.
    pub(crate) fn spawn<F>(&mut self, permit: OwnedSemaphorePermit, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(async move {
            work.await;
            drop(permit);
        });
    }

    /// Runs one batch of `deliveries` deliveries in the slot `permit` holds: as
    /// [`spawn`](Self::spawn), but cancelled at the shutdown deadline it counts `deliveries`
    /// unsettled deliveries, not one (all of them: a batch counts how its deliveries settled
    /// only when it ends, so one a part of it had already settled counts as unsettled too).
    pub(crate) fn spawn_batch<F>(
        &mut self,
        permit: OwnedSemaphorePermit,
        deliveries: usize,
        work: F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = self.tasks.spawn(async move {
            work.await;
            drop(permit);
        });
        if deliveries != 1 {
            let deliveries = u64::try_from(deliveries).unwrap_or(u64::MAX);
            self.batch_sizes.insert(task.id(), deliveries);
        }
    }

    /// Forgets the size of a batch that ended.
    fn forget(&mut self, result: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        if !self.batch_sizes.is_empty() {
            let id = match result {
                Ok((id, ())) => *id,
                Err(error) => error.id(),
            };
            self.batch_sizes.remove(&id);
        }
    }

    /// Lets the handlers in flight finish and settle, for at most `grace`; then cancels the
    /// rest, leaving their deliveries unacknowledged, and counts them as unsettled.
    pub(crate) async fn drain(mut self, grace: Duration) {
        let all_done = async {
            while let Some(result) = self.tasks.join_next_with_id().await {
                self.forget(&result);
                Self::reaped(result.map(|(_, ())| ()));
            }
        };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            let left = self.tasks.len();
            tracing::warn!(
                target: "idem",
                left,
                "shutdown grace over: cancelling the handlers still running; their deliveries stay unacknowledged and will be redelivered"
            );
            self.tasks.abort_all();
            while let Some(result) = self.tasks.join_next_with_id().await {
                match result {
                    Err(error) if error.is_cancelled() => {
                        let deliveries = self.batch_sizes.remove(&error.id()).unwrap_or(1);
                        for _ in 0..deliveries {
                            self.stats.count(Settled::Unsettled);
                        }
                    }
                    result => {
                        self.forget(&result);
                        Self::reaped(result.map(|(_, ())| ()));
                    }
                }
            }
        }
    }

    fn reaped(result: Result<(), tokio::task::JoinError>) {
        if let Err(error) = result
            && error.is_panic()
        {
            // The pipeline catches the handler's panics; this is a runner bug.
            tracing::error!(target: "idem", %error, "a delivery's task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_on_the_stats_is_woken_by_the_count_it_waits_for() {
        let stats = Arc::new(ConsumerStats::default());
        let waiting = tokio::spawn({
            let stats = Arc::clone(&stats);
            async move { stats.wait_until(|report| report.processed == 2).await }
        });
        tokio::task::yield_now().await;
        stats.count(Settled::Processed);
        stats.count(Settled::Duplicate);
        assert!(!waiting.is_finished());
        stats.count(Settled::Processed);
        let report = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("the waiting task");
        assert_eq!((report.processed, report.duplicates), (2, 1));
    }

    #[tokio::test]
    async fn a_batch_cancelled_at_the_deadline_counts_each_of_its_deliveries() {
        let stats = Arc::new(ConsumerStats::default());
        let mut workers = Workers::new(3, Arc::clone(&stats));
        let permit = workers.ready().await;
        workers.spawn_batch(permit, 5, std::future::pending());
        let permit = workers.ready().await;
        workers.spawn(permit, std::future::pending());
        // A batch that ended is forgotten: nothing of it is counted at the deadline.
        let permit = workers.ready().await;
        workers.spawn_batch(permit, 7, async {});
        tokio::task::yield_now().await;
        let _reaped = workers.ready().await;
        workers.drain(Duration::from_millis(10)).await;
        assert_eq!(stats.snapshot().unsettled, 6);
    }
}

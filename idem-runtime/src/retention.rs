//! Deleting old dedup records without hurting the live path: a bounded purge, and a purger
//! that runs it in the background.
//!
//! A record that counts forever (no `ttl`) or an expired one that nobody deletes stays in the
//! records table. [`purge`] deletes them in batches of [`PurgeOptions::batch_size`] records,
//! each committed on its own, with a pause between batches ([`DEFAULT_PAUSE`]), until none is
//! left: purging ten million records is two thousand short transactions, never one long lock
//! or one huge transaction; a gate waits for at most one batch (on PostgreSQL a batch of
//! expired records does not even make it wait: it skips the rows a gate holds), and the pause
//! leaves the database to the live path (measured in BENCHMARKS.md, `pg-purge`).
//!
//! What is deleted:
//!
//! - by default, records whose `ttl` has passed: they no longer make a delivery a duplicate,
//!   so deleting them changes nothing but the table's size. The expiry index finds them.
//! - with [`older_than`](PurgeOptions::older_than), also every record created longer ago than
//!   that, expired or not, with or without a `ttl`: a redelivery of such a message is then
//!   processed again. For tables of records kept forever, with a horizon past which no broker
//!   redelivers (the longest retention of the queues and of the dead-letter replays). Found by
//!   walking the primary key, so no index on `created_at_ms` is needed.
//! - with [`in_scope`](PurgeOptions::in_scope), only one handler's records.
//!
//! ```no_run
//! # async fn demo(store: idem_runtime::PgStore) -> Result<(), sqlx::Error> {
//! use std::time::Duration;
//! use idem_runtime::retention::{purge, PurgeOptions};
//!
//! let options = PurgeOptions::new()
//!     .in_scope("billing.order_paid")
//!     .older_than(Duration::from_secs(90 * 24 * 3600));
//! let done = purge(&store, &options, |progress| {
//!     println!("{} records deleted in {} batches", progress.deleted, progress.batches)
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! A service purges in the background with one call, and stops it gracefully on shutdown:
//!
//! ```no_run
//! # async fn demo(store: idem_runtime::PgStore) {
//! use std::time::Duration;
//! use idem_runtime::retention::{PurgeOptions, Purger};
//!
//! let purger = Purger::new(store, PurgeOptions::new())
//!     .every(Duration::from_secs(600))
//!     .spawn();
//! // ... on shutdown: the batch in flight finishes, then the purger ends.
//! let report = purger.stop().await;
//! # }
//! ```
//!
//! For volumes where even bounded deletes cost too much (hundreds of millions of records a
//! day), partition the table by time and drop whole partitions: the README's "Operating"
//! section shows it for PostgreSQL.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Records;

/// Records per batch unless told otherwise: about 50 ms of work per statement on PostgreSQL
/// (BENCHMARKS.md, `pg-purge`), a short lock.
pub const DEFAULT_BATCH_SIZE: u32 = 5_000;

/// The pause between batches unless told otherwise. Measured on PostgreSQL (BENCHMARKS.md):
/// without a pause, a purge deletes about 99,000 records/s and the gate keeps 0.87 of its
/// throughput while it runs; with this pause, about 31,000 records/s (2.6 billion a day) and the
/// gate keeps 0.99.
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(100);

/// What a purge deletes and how ([module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOptions {
    scope: Option<String>,
    older_than: Option<Duration>,
    batch_size: u32,
    pause: Duration,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl PurgeOptions {
    /// Expired records of every scope, in batches of [`DEFAULT_BATCH_SIZE`] with
    /// [`DEFAULT_PAUSE`] between them.
    pub fn new() -> Self {
        Self {
            scope: None,
            older_than: None,
            batch_size: DEFAULT_BATCH_SIZE,
            pause: DEFAULT_PAUSE,
        }
    }

    /// Only the records of `scope` (the handler's scope, as its logs show it).
    #[must_use]
    pub fn in_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Also every record created longer ago than `age`, expired or not: a redelivery of its
    /// message is then processed again. Choose an age past which no broker or operator
    /// redelivers.
    #[must_use]
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// At most `records` per statement (and transaction); at least 1.
    #[must_use]
    pub fn batch_size(mut self, records: u32) -> Self {
        self.batch_size = records.max(1);
        self
    }

    /// Waits `pause` (real time, not the store's clock) between batches, to leave the
    /// database's CPU and I/O to the live path; `Duration::ZERO` purges at full speed. A stop
    /// cuts a pause short.
    #[must_use]
    pub fn pause_between_batches(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// The scope, if the purge is limited to one.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The age past which every record goes, if any.
    pub fn age(&self) -> Option<Duration> {
        self.older_than
    }

    /// Records per batch.
    pub fn records_per_batch(&self) -> u32 {
        self.batch_size
    }
}

/// How far a purge has come: passed to the progress callback after every batch, and returned
/// at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PurgeProgress {
    /// Batches run, each a bounded delete (of expired records, or of one window of a purge by
    /// age), counting those that deleted nothing (the last of each phase, and windows without
    /// old records).
    pub batches: u64,
    /// Records deleted so far.
    pub deleted: u64,
    /// Records the last batch deleted.
    pub last_batch: u64,
}

/// Deletes what `options` selects, in batches, calling `progress` after each; returns the
/// totals. A failed batch ends the purge with its error; the batches before it stay
/// committed, so running it again continues where it stopped.
pub async fn purge<S: Records>(
    store: &S,
    options: &PurgeOptions,
    progress: impl FnMut(&PurgeProgress) + Send,
) -> Result<PurgeProgress, sqlx::Error> {
    purge_until(store, options, progress, &CancellationToken::new()).await
}

/// What the SQL stores' `purge_expired()` runs: every expired record, default batches.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) async fn purge_expired<S: Records>(store: &S) -> Result<u64, sqlx::Error> {
    Ok(purge(store, &PurgeOptions::new(), |_| {}).await?.deleted)
}

/// [`purge`], ending early (after the batch in flight) once `stop` is cancelled.
async fn purge_until<S: Records>(
    store: &S,
    options: &PurgeOptions,
    mut progress: impl FnMut(&PurgeProgress) + Send,
    stop: &CancellationToken,
) -> Result<PurgeProgress, sqlx::Error> {
    let mut done = PurgeProgress::default();
    let limit = options.batch_size;
    let scope = options.scope();
    // One "now" for the whole purge: a record that expires while it runs waits for the next.
    let now_ms = store.now_ms();
    let mut record = |done: &mut PurgeProgress, deleted: u64| {
        done.batches += 1;
        done.deleted += deleted;
        done.last_batch = deleted;
        progress(done);
    };
    while !stop.is_cancelled() {
        let deleted = retrying(|| store.purge_expired_batch(now_ms, scope, limit)).await?;
        record(&mut done, deleted);
        // Fewer than asked: none left (a row a gate held was skipped; the next purge takes it).
        if deleted < u64::from(limit) {
            break;
        }
        pause(options.pause, stop).await;
    }
    let Some(age) = options.older_than else {
        return Ok(done);
    };
    let cutoff_ms = now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
    // The walk starts before every key of the scope (or of the table: scopes are never empty).
    let mut after = (scope.unwrap_or_default().to_owned(), String::new());
    while !stop.is_cancelled() {
        let batch = retrying(|| {
            store.purge_created_before_batch(cutoff_ms, scope, (&after.0, &after.1), limit)
        })
        .await?;
        record(&mut done, batch.deleted);
        match batch.last {
            Some(last) => after = last,
            None => break,
        }
        pause(options.pause, stop).await;
    }
    Ok(done)
}

/// Runs one batch, again at once (up to three times in all) when the database chose it as a
/// deadlock victim or it timed out waiting for a lock a gate held: a batch is one statement, and
/// the gate's transaction is short.
async fn retrying<T, F, Fut>(batch: F) -> Result<T, sqlx::Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match batch().await {
            Err(error) if attempt < 3 && is_contention(&error) => attempt += 1,
            done => return done,
        }
    }
}

/// A deadlock, a lock wait time-out, a serialization failure: what a retry of the same
/// statement can get past.
fn is_contention(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_))
        && crate::classify_sqlx_error(error) == crate::Disposition::Retry
}

async fn pause(pause: Duration, stop: &CancellationToken) {
    if !pause.is_zero() {
        stop.run_until_cancelled(tokio::time::sleep(pause)).await;
    }
}

/// What a [`Purger`] has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PurgerReport {
    /// Purges that ran to the end (not one a stop cut short).
    pub runs: u64,
    /// Purges that failed (logged at `warn`; the next one runs at the next interval).
    pub failed_runs: u64,
    /// Records deleted, over every run.
    pub deleted: u64,
    /// The last failure's message, if any.
    pub last_error: Option<String>,
}

/// Purges in the background: a [`purge`] now, then every [`every`](Self::every) interval (on
/// the store's clock), until stopped ([module docs](self)).
#[derive(Debug)]
pub struct Purger<S> {
    store: S,
    options: PurgeOptions,
    interval: Duration,
}

impl<S: Records + 'static> Purger<S> {
    /// A purger of what `options` selects, every hour unless told otherwise.
    pub fn new(store: S, options: PurgeOptions) -> Self {
        Self {
            store,
            options,
            interval: Duration::from_secs(3600),
        }
    }

    /// The time from the end of one purge to the start of the next.
    #[must_use]
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Runs until `shutdown` is cancelled, then returns what it did. A purge in progress stops
    /// after its current batch; what it deleted stays deleted. A failed purge is logged and
    /// counted, and the next one runs at the next interval (a database restart does not end
    /// the purger).
    pub async fn run(self, shutdown: CancellationToken) -> PurgerReport {
        self.run_reporting(shutdown, &watch::Sender::new(PurgerReport::default()))
            .await
    }

    /// Starts [`run`](Self::run) on a tokio task: the one call a service makes at start-up.
    /// Dropping the handle stops the purger too, after its batch in flight.
    pub fn spawn(self) -> PurgerHandle {
        let shutdown = CancellationToken::new();
        let (report, watched) = watch::channel(PurgerReport::default());
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { self.run_reporting(shutdown, &report).await }
        });
        PurgerHandle {
            shutdown: shutdown.drop_guard(),
            task,
            report: watched,
        }
    }

    async fn run_reporting(
        self,
        shutdown: CancellationToken,
        report: &watch::Sender<PurgerReport>,
    ) -> PurgerReport {
        while !shutdown.is_cancelled() {
            let result = purge_until(&self.store, &self.options, |_| {}, &shutdown).await;
            // The next run's time is fixed before anyone hears of this one: whoever watches
            // the report and then moves a manual clock moves it past a deadline already set.
            let next = self.store.sleep(self.interval);
            report.send_modify(|report| match result {
                Ok(done) => {
                    report.runs += u64::from(!shutdown.is_cancelled());
                    report.deleted += done.deleted;
                    if done.deleted > 0 {
                        tracing::info!(deleted = done.deleted, "purged dedup records");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "purging dedup records failed; trying again at the next interval");
                    report.failed_runs += 1;
                    report.last_error = Some(error.to_string());
                }
            });
            shutdown.run_until_cancelled(next).await;
        }
        report.borrow().clone()
    }
}

/// A running [`Purger`], from [`Purger::spawn`].
#[derive(Debug)]
pub struct PurgerHandle {
    shutdown: tokio_util::sync::DropGuard,
    task: tokio::task::JoinHandle<PurgerReport>,
    report: watch::Receiver<PurgerReport>,
}

impl PurgerHandle {
    /// What the purger has done so far; `changed()` on it waits for the next purge to end.
    pub fn report(&self) -> watch::Receiver<PurgerReport> {
        self.report.clone()
    }

    /// Stops the purger after its batch in flight and returns what it did.
    pub async fn stop(self) -> PurgerReport {
        let last = self.report.borrow().clone();
        drop(self.shutdown);
        // The task only ends by returning; a panic in it (none is expected) keeps the last report.
        self.task.await.unwrap_or(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::memory::MemoryStore;
    use crate::{Key, Store};

    const HOUR: Duration = Duration::from_secs(3600);

    async fn store_with(
        clock: &ManualClock,
        scope: &'static str,
        keys: std::ops::Range<u32>,
        ttl: Option<Duration>,
    ) -> MemoryStore {
        let store = MemoryStore::new().with_clock(clock.clone());
        add(&store, scope, keys, ttl).await;
        store
    }

    async fn add(
        store: &MemoryStore,
        scope: &'static str,
        keys: std::ops::Range<u32>,
        ttl: Option<Duration>,
    ) {
        let keys = keys
            .map(|n| Key::new(scope, &[("id", &n.to_string())]).expect("key"))
            .collect::<Vec<_>>();
        store.mark_processed(keys, ttl).await.expect("mark");
    }

    #[tokio::test]
    async fn a_purge_deletes_expired_records_in_bounded_batches() {
        let clock = ManualClock::starting_now();
        let store = store_with(&clock, "a", 0..23, Some(HOUR)).await;
        add(&store, "a", 100..105, None).await;
        clock.advance(HOUR);
        let mut seen = Vec::new();
        let options = PurgeOptions::new().batch_size(5);
        let done = purge(&store, &options, |p| seen.push(p.last_batch))
            .await
            .expect("purge");
        assert_eq!(seen, [5, 5, 5, 5, 3], "batches of at most five");
        assert_eq!((done.deleted, done.batches), (23, 5));
        assert_eq!(store.len(), 5, "records without a ttl stay");
    }

    #[tokio::test]
    async fn a_purge_of_one_scope_leaves_the_others() {
        let clock = ManualClock::starting_now();
        let store = store_with(&clock, "a", 0..4, Some(HOUR)).await;
        add(&store, "b", 0..6, Some(HOUR)).await;
        clock.advance(HOUR);
        let done = purge(&store, &PurgeOptions::new().in_scope("b"), |_| {})
            .await
            .expect("purge");
        assert_eq!(done.deleted, 6);
        let stats = store.stats().await.expect("stats");
        assert_eq!(stats.scopes.len(), 1);
        assert_eq!((stats.scopes[0].scope.as_str(), stats.records()), ("a", 4));
    }

    #[tokio::test]
    async fn older_than_also_deletes_records_without_a_ttl() {
        let clock = ManualClock::starting_now();
        let store = store_with(&clock, "a", 0..7, None).await;
        add(&store, "b", 0..3, None).await;
        clock.advance(2 * HOUR);
        add(&store, "a", 50..52, None).await; // young: stays
        let mut batches = Vec::new();
        let options = PurgeOptions::new().older_than(HOUR).batch_size(3);
        let done = purge(&store, &options, |p| batches.push(p.last_batch))
            .await
            .expect("purge");
        assert_eq!(done.deleted, 10);
        // One (empty) expired batch, then the walk in windows of three keys, in key order:
        // [a0 a1 a2] [a3 a4 a5] [a50 a51 a6] (two of them young) [b0 b1 b2], and the empty end.
        assert_eq!(batches, [0, 3, 3, 1, 3, 0]);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test]
    async fn the_purger_runs_at_once_then_every_interval_until_stopped() {
        let clock = ManualClock::starting_now();
        let store = store_with(&clock, "a", 0..3, Some(HOUR)).await;
        clock.advance(HOUR);
        let purger = Purger::new(store.clone(), PurgeOptions::new())
            .every(HOUR)
            .spawn();
        let mut report = purger.report();
        report
            .wait_for(|report| report.runs == 1)
            .await
            .expect("first run");
        assert_eq!(report.borrow().deleted, 3);
        add(&store, "a", 10..12, Some(HOUR)).await;
        // The next run was due an hour after the first (set before the report said so).
        clock.advance(HOUR);
        report
            .wait_for(|report| report.runs >= 2 && report.deleted == 5)
            .await
            .expect("second run");
        let last = purger.stop().await;
        assert_eq!((last.deleted, last.failed_runs), (5, 0));
        assert_eq!(store.len(), 0);
    }

    #[tokio::test]
    async fn a_stopped_purge_ends_after_its_batch_in_flight() {
        let clock = ManualClock::starting_now();
        let store = store_with(&clock, "a", 0..10, Some(HOUR)).await;
        clock.advance(HOUR);
        let stop = CancellationToken::new();
        let options = PurgeOptions::new().batch_size(2);
        let done = purge_until(
            &store,
            &options,
            |p| {
                if p.batches == 2 {
                    stop.cancel()
                }
            },
            &stop,
        )
        .await
        .expect("purge");
        assert_eq!(done.deleted, 4, "two batches, then the stop");
        assert_eq!(store.len(), 6);
    }
}

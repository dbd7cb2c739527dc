//! Shared harness for idem's integration tests: live services, a recording acknowledger,
//! failure injection, and the store conformance suite ([`conformance_suite!`]).
//!
//! Services are real. A missing service is a loud failure, never a skip: the test command
//! (`scripts/test`) starts the ones that are installed but stopped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::store::{Claim, NewRecord};
use idem_runtime::{Acknowledger, Committed, DeadLetter, HandlerError, Key, Requeue, Store};

pub mod batch;
pub mod conformance;
pub mod effects;
pub mod memory;
pub mod mysql;
pub mod pg;
pub mod sqlite;
pub mod ui;

/// A message for the conformance handlers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Payment {
    /// The idempotency key.
    pub order_id: String,
    /// Written to the business table.
    pub amount: i64,
    /// The receipt number (unique in `idem_conf_payments`); a fresh one per delivery when `None`.
    pub receipt: Option<String>,
}

impl Payment {
    /// A payment of `amount` for `order_id`.
    pub fn new(order_id: impl Into<String>, amount: i64) -> Self {
        Self {
            order_id: order_id.into(),
            amount,
            receipt: None,
        }
    }
}

/// The conformance handlers' error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A database error from the body.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// An injected transient failure (see [`fail_once`]).
    #[error("injected transient failure for order {0}")]
    Transient(String),
}

impl HandlerError for AppError {}

/// A prefix unique to this test process, so runs never see each other's keys.
pub fn run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("r{}-{nanos:x}", std::process::id())
    })
}

/// A key unique to this run and call: `<run>-<label>-<n>`.
pub fn unique_key(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{label}-{n}", run_id())
}

/// An integer unique to this run and call (for integer-keyed tables).
pub fn unique_int() -> i64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    // Microseconds since the epoch fit in 52 bits; the counter separates calls within one.
    i64::try_from(base).unwrap_or(0).saturating_mul(1024) + i64::try_from(n % 1024).unwrap_or(0)
}

/// A message keyed on an integer, for integer-keyed tables.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    /// The key, a BIGINT in the table.
    pub id: i64,
}

/// A set of keys that the conformance bodies consult: which ones fail, panic or swallow.
struct KeySet(OnceLock<Mutex<HashSet<String>>>);

impl KeySet {
    const fn new() -> Self {
        Self(OnceLock::new())
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, key: &str) {
        self.keys().insert(key.to_owned());
    }

    /// Whether `key` is in the set, removing it.
    fn take(&self, key: &str) -> bool {
        self.keys().remove(key)
    }

    fn contains(&self, key: &str) -> bool {
        self.keys().contains(key)
    }
}

static FAIL_ONCE: KeySet = KeySet::new();
static FAIL_ALWAYS: KeySet = KeySet::new();
static SWALLOW_ONCE: KeySet = KeySet::new();
static PANICKING: KeySet = KeySet::new();

/// Makes the next handling of `key` fail in the body, after its business write, once.
pub fn fail_once(key: &str) {
    FAIL_ONCE.insert(key);
}

/// Makes every handling of `key` fail in the body, after its business write: a failure that
/// never heals.
pub fn fail_always(key: &str) {
    FAIL_ALWAYS.insert(key);
}

/// Makes the next handling of `key` run a failing statement and ignore its error, once.
pub fn swallow_once(key: &str) {
    SWALLOW_ONCE.insert(key);
}

/// Whether this handling of `key` should swallow a failure (see [`swallow_once`]).
pub fn should_swallow(key: &str) -> bool {
    SWALLOW_ONCE.take(key)
}

/// Makes the bodies panic for `key` until [`stop_panicking`].
pub fn panic_on(key: &str) {
    PANICKING.insert(key);
}

/// Ends [`panic_on`].
pub fn stop_panicking(key: &str) {
    PANICKING.take(key);
}

/// Called by the bodies after their business write: panics for a key given to [`panic_on`].
///
/// # Panics
///
/// That is its purpose.
pub fn maybe_panic(key: &str) {
    assert!(!PANICKING.contains(key), "injected panic for order {key}");
}

fn counted_runs() -> &'static Mutex<HashMap<String, u64>> {
    static RUNS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    RUNS.get_or_init(Mutex::default)
}

/// Counts one run of a body for `key` (called first thing in every conformance body), whether
/// or not it commits.
pub fn count_run(key: &str) {
    *counted_runs()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key.to_owned())
        .or_default() += 1;
}

/// How many times a body started for `key`.
pub fn runs(key: &str) -> u64 {
    counted_runs()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .copied()
        .unwrap_or(0)
}

/// Called by the handlers' bodies after their business write: fails once for a poisoned key,
/// and every time for a key given to [`fail_always`].
pub fn maybe_fail(key: &str) -> Result<(), AppError> {
    // Both sets are consulted, so that a key in both is taken from FAIL_ONCE either way.
    let once = FAIL_ONCE.take(key);
    if once || FAIL_ALWAYS.contains(key) {
        Err(AppError::Transient(key.to_owned()))
    } else {
        Ok(())
    }
}

/// What an acknowledger was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckEvent {
    /// Acked after commit.
    Ack,
    /// Requeued after the failure of delivery `attempt`, to come back after `delay`.
    Requeue {
        /// The delivery that failed.
        attempt: u32,
        /// The backoff the runtime asked for.
        delay: Duration,
    },
    /// Dead-lettered, with the reason.
    DeadLetter(String),
}

/// An acknowledger that records what it was told, says which delivery it is, and can fail its
/// ack (a consumer that crashed between commit and ack, or a lost ack).
#[derive(Debug, Clone, Default)]
pub struct RecordingAck {
    events: Arc<Mutex<Vec<AckEvent>>>,
    fail_ack: bool,
    attempt: Option<u32>,
    message_id: Option<String>,
}

/// The error of a [`RecordingAck`] told to fail.
#[derive(Debug, thiserror::Error)]
#[error("simulated broker failure: connection lost before the ack reached the broker")]
pub struct AckLost;

impl RecordingAck {
    /// Records and succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records, but its ack fails as if the connection dropped after the commit.
    pub fn losing_acks() -> Self {
        Self {
            fail_ack: true,
            ..Self::default()
        }
    }

    /// Records, as delivery number `attempt` of its message.
    pub fn at_attempt(attempt: u32) -> Self {
        Self {
            attempt: Some(attempt),
            ..Self::default()
        }
    }

    /// Records, for a delivery that carries the broker message id `id`.
    pub fn with_message_id(id: &str) -> Self {
        Self {
            message_id: Some(id.to_owned()),
            ..Self::default()
        }
    }

    /// Whether it was told exactly one thing: requeue.
    pub fn requeued_once(&self) -> bool {
        matches!(self.events().as_slice(), [AckEvent::Requeue { .. }])
    }

    /// Whether it was told exactly one thing: dead-letter, with a reason containing `text`.
    pub fn dead_lettered_with(&self, text: &str) -> bool {
        matches!(self.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains(text))
    }

    /// Everything it was told, in order.
    pub fn events(&self) -> Vec<AckEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, event: AckEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }
}

impl Acknowledger for RecordingAck {
    type Error = AckLost;

    fn attempt(&self) -> Option<u32> {
        self.attempt
    }

    fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    async fn ack(self, _proof: Committed) -> Result<(), AckLost> {
        self.record(AckEvent::Ack);
        if self.fail_ack { Err(AckLost) } else { Ok(()) }
    }

    async fn requeue(self, requeue: Requeue) -> Result<(), AckLost> {
        self.record(AckEvent::Requeue {
            attempt: requeue.attempt,
            delay: requeue.delay,
        });
        Ok(())
    }

    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), AckLost> {
        self.record(AckEvent::DeadLetter(letter.reason.to_owned()));
        Ok(())
    }
}

/// Claims `key` now, by the store's clock, in a transaction that is then rolled back: what a
/// delivery's gate finds, without running a handler.
///
/// # Panics
///
/// When the store fails.
pub async fn claim_and_roll_back<S: Store>(store: &S, key: &Key) -> Claim {
    let mut tx = store.begin().await.expect("begin");
    let record = NewRecord {
        key,
        fingerprint: None,
        response: None,
        now_ms: store.now_ms(),
        expires_at_ms: None,
    };
    let claim = store.claim(&mut tx, &record).await.expect("claim");
    S::rollback(tx).await.expect("roll back");
    claim
}

/// Runs the shipped migration directory `idem-runtime/migrations/<database>/` with sqlx's
/// migrator (what `sqlx migrate run --source …` does) on the database of `pool`.
///
/// # Panics
///
/// When the directory is not a valid sqlx migration source or a migration fails.
pub async fn run_shipped_migrations<DB>(database: &str, pool: &sqlx::Pool<DB>)
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
{
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../idem-runtime/migrations")
        .join(database);
    let migrator = sqlx::migrate::Migrator::new(source)
        .await
        .expect("a valid sqlx migration directory");
    assert_eq!(migrator.iter().count(), 1, "one migration: {database}");
    migrator
        .run(pool)
        .await
        .expect("run the shipped migrations");
}

/// Installs a tracing subscriber once (controlled by `RUST_LOG`), so failing tests can show
/// the handlers' spans.
pub fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// A one-way gate a test opens for a handler body (or a body for the test), so that neither
/// waits for time to pass: a "slow" body waits on the test's latch, a test waits on the body's.
#[derive(Debug, Default)]
pub struct Latch {
    open: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

impl Latch {
    /// Opens it: every waiter, present and future, goes on.
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Waits until it is open.
    pub async fn wait(&self) {
        loop {
            let opened = self.opened.notified();
            let mut opened = std::pin::pin!(opened);
            opened.as_mut().enable();
            if self.open.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }
}

/// The latch named `name` (a key, plus a suffix saying what it is for), made on first use.
///
/// # Panics
///
/// Never: a poisoned lock is recovered.
pub fn latch(name: &str) -> Arc<Latch> {
    static LATCHES: OnceLock<Mutex<HashMap<String, Arc<Latch>>>> = OnceLock::new();
    let mut latches = LATCHES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Arc::clone(latches.entry(name.to_owned()).or_default())
}

/// Awaits `work`, failing the test with `what` when it takes longer than 30 s.
///
/// # Panics
///
/// When `work` does not finish in time.
pub async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), work)
        .await
        .unwrap_or_else(|_| panic!("timed out after 30 s waiting for {what}"))
}

/// Polls `check` until it holds, for state only another system knows and cannot announce (a
/// queue's depth on the broker, a stream's pending list): every 20 ms for up to 30 s.
///
/// # Panics
///
/// When `check` does not hold in time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

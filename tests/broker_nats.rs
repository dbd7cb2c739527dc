//! `broker::nats` against the live NATS JetStream (127.0.0.1:4222, `IDEM_TEST_NATS_URL`) and
//! the live PostgreSQL: duplicates, a consumer killed between commit and ack, poison payloads,
//! retries spaced by the backoff, `max_deliver`, in-progress signals, graceful shutdown and
//! `$message_id` keys.
//!
//! Every test has its own streams, consumers and keys (suffixed with the run id) and deletes
//! its own streams when it passes. Bodies count their runs in process (`idem_tests::runs`) and
//! write one row per run into a table of this process inside the transaction, so the committed
//! runs are the rows.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use idem_runtime::broker::nats::{
    ATTEMPT_HEADER, NatsBatchConsumer, NatsConsumer, NatsError, REASON_HEADER, STREAM_HEADER,
    STREAM_SEQUENCE_HEADER, SUBJECT_HEADER, ensure_dead_letter_stream,
};
use idem_runtime::broker::{
    BatchOptions, CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats,
};
use idem_runtime::handler::Handler;
use idem_runtime::{
    Acknowledger, Disposition, Error, HandlerError, Outcome, PgStore, PgTx, idempotent,
};
use idem_tests::{Payment, count_run, latch, run_id, runs, unique_key, within};

// ---------------------------------------------------------------------------------------------
// PostgreSQL: one runs table for this process.

fn runs_table() -> &'static str {
    static TABLE: OnceLock<String> = OnceLock::new();
    TABLE.get_or_init(|| format!("idem_nats_runs_{}", run_id().replace('-', "_")))
}

async fn pg() -> PgStore {
    let store = idem_tests::pg::connect().await;
    store.migrate().await.expect("migrate idem_records");
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735003)")
        .execute(&mut *tx)
        .await
        .expect("lock the catalog");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {} (key TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())",
        runs_table()
    )))
    .execute(&mut *tx)
    .await
    .expect("create the runs table");
    tx.commit().await.expect("commit");
    store
}

/// Committed body runs per key.
async fn rows(store: &PgStore, keys: &[String]) -> HashMap<String, i64> {
    let found: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT key, count(*) FROM {} WHERE key = ANY($1) GROUP BY key",
        runs_table()
    )))
    .bind(keys)
    .fetch_all(store.pool())
    .await
    .expect("count rows");
    found.into_iter().collect()
}

async fn rows_of(store: &PgStore, key: &str) -> i64 {
    rows(store, &[key.to_owned()])
        .await
        .get(key)
        .copied()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Messages and handlers.

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    poison: bool,
}

impl Order {
    fn new(order_id: &str) -> Self {
        Self {
            order_id: order_id.to_owned(),
            poison: false,
        }
    }

    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialize")
    }
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("transient failure for order {0}")]
    Transient(String),
    #[error("order {0} is poison: it can never succeed")]
    Poison(String),
}

impl HandlerError for AppError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Poison(_) => Disposition::DeadLetter,
            Self::Db(error) => idem_runtime::classify_sqlx_error(error),
            Self::Transient(_) => Disposition::Retry,
        }
    }
}

/// What every body does first: count the run, write its row (committed only with the body).
async fn record(tx: &mut PgTx<'_>, key: &str) -> Result<(), AppError> {
    count_run(key);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (key) VALUES ($1)",
        runs_table()
    )))
    .bind(key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.bulk"
)]
async fn on_bulk(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await
}

// The same scope as the `nats_consumer` binary's handler: the second consumer of the kill test.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "idem_tests.nats.kill"
)]
async fn on_kill(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.poison"
)]
async fn on_poison(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    if msg.poison {
        return Err(AppError::Poison(msg.order_id));
    }
    Ok(())
}

#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.by_id"
)]
async fn on_by_id(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await
}

#[idempotent(
    key = "$message_id, order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.by_id_and_field"
)]
async fn on_by_id_and_field(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await
}

/// Fails (retryably, after its write) on the first two runs, then succeeds.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.heal",
    max_attempts = 5
)]
async fn on_heal(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    if runs(&msg.order_id) < 3 {
        return Err(AppError::Transient(msg.order_id));
    }
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.never",
    max_attempts = 3
)]
async fn on_never(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    Err(AppError::Transient(msg.order_id))
}

/// Never heals, with the default 10 attempts: the consumer's `max_deliver` ends it.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.capped"
)]
async fn on_capped(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    Err(AppError::Transient(msg.order_id))
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.slow"
)]
async fn on_slow(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    latch(&format!("{}.started", msg.order_id)).open();
    latch(&format!("{}.release", msg.order_id)).wait().await;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.graceful"
)]
async fn on_graceful(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    record(tx, &msg.order_id).await?;
    latch(&format!("{}.started", msg.order_id)).open();
    latch(&format!("{}.release", msg.order_id)).wait().await;
    Ok(())
}

/// The first run is stuck for good (before its commit); later runs are quick.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.stuck"
)]
async fn on_stuck(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    count_run(&msg.order_id);
    if runs(&msg.order_id) == 1 {
        latch(&format!("{}.started", msg.order_id)).open();
        std::future::pending::<()>().await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (key) VALUES ($1)",
        runs_table()
    )))
    .bind(&msg.order_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Each call's delivery number and when it came.
type Seen = Arc<Mutex<Vec<(Option<u32>, Instant)>>>;

/// A handler that notes which delivery (`attempt`) each call got, and when.
struct Observed<H> {
    inner: H,
    seen: Seen,
}

impl<H> Observed<H> {
    fn new(inner: H) -> (Self, Seen) {
        let seen = Arc::default();
        (
            Self {
                inner,
                seen: Arc::clone(&seen),
            },
            seen,
        )
    }
}

fn attempts(seen: &Mutex<Vec<(Option<u32>, Instant)>>) -> Vec<Option<u32>> {
    locked(seen).iter().map(|(attempt, _)| *attempt).collect()
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<H: Handler> Handler for Observed<H> {
    type Store = H::Store;
    type Message = H::Message;
    type Output = H::Output;
    type Error = H::Error;

    fn handle<'a, A: Acknowledger + 'a>(
        &'a self,
        store: &'a Self::Store,
        message: Self::Message,
        ack: A,
    ) -> impl Future<Output = Result<Outcome<Self::Output>, Error<Self::Error>>> + Send + 'a {
        locked(&self.seen).push((ack.attempt(), Instant::now()));
        self.inner.handle(store, message, ack)
    }
}

// ---------------------------------------------------------------------------------------------
// NATS.

fn nats_url() -> String {
    std::env::var("IDEM_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

async fn js() -> jetstream::Context {
    let url = nats_url();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .max_reconnects(3)
        .connect(&url)
        .await
        .unwrap_or_else(|error| {
            panic!("NATS is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it (with JetStream), or set IDEM_TEST_NATS_URL.")
        });
    jetstream::new(client)
}

/// A stream, its dead-letter stream and a durable pull consumer, all unique to this test.
struct Topic {
    js: jetstream::Context,
    stream: String,
    subject: String,
    dead_letter_stream: String,
    consumer_name: String,
}

impl Topic {
    async fn new(label: &str, ack_wait: Duration, max_deliver: i64) -> Self {
        let js = js().await;
        let run = run_id();
        let stream = format!("IDEM_T_{run}_{label}");
        let subject = format!("idem-t.{run}.{label}");
        js.create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|error| {
            panic!("create the stream {stream} (is JetStream enabled?): {error}")
        });
        let dead_letter_subject = ensure_dead_letter_stream(&js, &stream)
            .await
            .expect("create the dead-letter stream");
        assert_eq!(dead_letter_subject, format!("{stream}.dead-letter"));
        let topic = Self {
            dead_letter_stream: format!("{stream}_DEAD_LETTER"),
            consumer_name: format!("idem-t-{label}"),
            js,
            stream,
            subject,
        };
        topic
            .js
            .get_stream(&topic.stream)
            .await
            .expect("get the stream")
            .create_consumer(pull::Config {
                durable_name: Some(topic.consumer_name.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver,
                ..Default::default()
            })
            .await
            .expect("create the consumer");
        topic
    }

    async fn consumer(&self) -> PullConsumer {
        self.js
            .get_stream(&self.stream)
            .await
            .expect("get the stream")
            .get_consumer(&self.consumer_name)
            .await
            .expect("get the consumer")
    }

    async fn publish(&self, payload: Vec<u8>, message_id: Option<&str>) {
        let mut publish = PublishMessage::build().payload(payload.into());
        if let Some(id) = message_id {
            publish = publish.message_id(id);
        }
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .expect("publish")
            .await
            .expect("the stream stores the message");
        assert!(
            !ack.duplicate,
            "a publish the stream dropped as a duplicate"
        );
    }

    /// Publishes many, awaiting the stream's acks together.
    async fn publish_all(&self, payloads: Vec<Vec<u8>>) {
        let mut acks = Vec::with_capacity(payloads.len());
        for payload in payloads {
            acks.push(
                self.js
                    .publish(self.subject.clone(), payload.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("the stream stores the message");
        }
    }

    /// Starts a runner on this topic's consumer.
    async fn run<H>(&self, handler: H, store: PgStore, options: ConsumerOptions) -> Running
    where
        H: Handler<Store = PgStore>,
        H::Message: serde::de::DeserializeOwned,
    {
        let runner = NatsConsumer::new(self.consumer().await, self.js.clone(), handler, store)
            .with_options(options);
        let stats = runner.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(runner.run(shutdown.clone()));
        Running {
            shutdown,
            task,
            stats,
        }
    }

    /// Waits until the consumer has nothing pending: every message delivered and settled (the
    /// server's state, which it cannot announce: polled).
    async fn assert_drained(&self) {
        let consumer = self.consumer().await;
        let what = format!("no message left pending or unacked on {}", self.stream);
        idem_tests::eventually(&what, || async {
            let info = consumer.get_info().await.expect("consumer info");
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await;
    }

    async fn consumer_info(&self) -> jetstream::consumer::Info {
        self.consumer()
            .await
            .get_info()
            .await
            .expect("consumer info")
    }

    /// The dead letters, in order.
    async fn dead_letters(&self) -> Vec<Letter> {
        let stream = self
            .js
            .get_stream(&self.dead_letter_stream)
            .await
            .expect("get the dead-letter stream");
        let state = stream.get_info().await.expect("stream info").state;
        let mut letters = Vec::new();
        for sequence in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            let message = stream
                .get_raw_message(sequence)
                .await
                .expect("read a dead letter");
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|value| value.as_str().to_owned())
                    .unwrap_or_default()
            };
            letters.push(Letter {
                payload: message.payload.to_vec(),
                reason: header(REASON_HEADER),
                attempt: header(ATTEMPT_HEADER).parse().expect("an attempt count"),
                stream: header(STREAM_HEADER),
                stream_sequence: header(STREAM_SEQUENCE_HEADER)
                    .parse()
                    .expect("a stream sequence"),
                subject: header(SUBJECT_HEADER),
            });
        }
        letters
    }

    /// Deletes this test's streams (and with them its consumer).
    async fn delete(self) {
        for stream in [&self.stream, &self.dead_letter_stream] {
            self.js
                .delete_stream(stream)
                .await
                .expect("delete the test's stream");
        }
    }
}

#[derive(Debug)]
struct Letter {
    payload: Vec<u8>,
    reason: String,
    attempt: u32,
    stream: String,
    stream_sequence: u64,
    subject: String,
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<ConsumerReport, NatsError>>,
    stats: Arc<ConsumerStats>,
}

impl Running {
    /// Waits until `done` holds of the runner's counts (woken by each settled delivery); fails
    /// when the runner stops first.
    async fn until(&mut self, what: &str, done: impl FnMut(&ConsumerReport) -> bool) {
        let stats = Arc::clone(&self.stats);
        let task = &mut self.task;
        within(what, async {
            tokio::select! {
                biased;
                _ = stats.wait_until(done) => {}
                ended = task => panic!(
                    "{what}: the runner stopped early: {ended:?}, {:?}",
                    stats.snapshot()
                ),
            }
        })
        .await;
    }

    /// Cancels the runner and waits for `run` to return its report.
    async fn stop(self) -> ConsumerReport {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits for `run` to return (after a cancellation) its report.
    async fn join(self) -> ConsumerReport {
        within("the runner to return after cancellation", self.task)
            .await
            .expect("the runner's task")
            .expect("the runner ends without error")
    }
}

fn report_of(processed: u64, duplicates: u64, requeued: u64, dead_lettered: u64) -> ConsumerReport {
    let mut report = ConsumerReport::default();
    report.processed = processed;
    report.duplicates = duplicates;
    report.requeued = requeued;
    report.dead_lettered = dead_lettered;
    report
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// 200 orders, each published twice and every tenth four times, consumed 8 at a time: every
/// body runs once, every message is acked, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_body_runs_once_under_duplicate_publishes() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("bulk", Duration::from_secs(10), -1).await;
    let keys: Vec<String> = (0..200).map(|_| unique_key("nats-bulk")).collect();
    let mut payloads = Vec::new();
    for round in 0..4 {
        for (i, key) in keys.iter().enumerate() {
            if round < 2 || i % 10 == 0 {
                payloads.push(Order::new(key).json());
            }
        }
    }
    let published = payloads.len() as u64;
    assert_eq!(published, 440);
    topic.publish_all(payloads).await;

    let mut running = topic
        .run(
            idem_runtime::handler!(on_bulk),
            store.clone(),
            ConsumerOptions::default().concurrency(8).prefetch(32),
        )
        .await;
    running
        .until("all deliveries settled", |r| {
            r.processed + r.duplicates >= published
        })
        .await;
    let report = running.stop().await;

    assert_eq!(report, report_of(200, 240, 0, 0));
    for key in &keys {
        assert_eq!(runs(key), 1, "body runs of {key}");
    }
    let rows = rows(&store, &keys).await;
    assert_eq!(rows.len(), 200, "a row for every order");
    assert!(
        rows.values().all(|&n| n == 1),
        "one row per order: {rows:?}"
    );
    topic.assert_drained().await;
    assert!(topic.dead_letters().await.is_empty());
    topic.delete().await;
}

/// A consumer process is killed inside `ack()`, after the commit; another consumer gets the
/// message again, recognises the duplicate without running the body, and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_commit_and_ack_leaves_a_duplicate() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("kill", Duration::from_secs(2), -1).await;
    let keys: Vec<String> = (0..5).map(|_| unique_key("nats-kill")).collect();
    for key in &keys {
        topic.publish(Order::new(key).json(), None).await;
    }
    let victim = &keys[2];

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nats_consumer"))
        .args([
            topic.stream.as_str(),
            topic.consumer_name.as_str(),
            runs_table(),
            victim.as_str(),
            nats_url().as_str(),
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("run the consumer process");
    // The child also gives up by itself after 30 s (exit code 3).
    let status = within("the consumer process to exit", child.wait())
        .await
        .expect("wait for the consumer process");
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            status.signal(),
            Some(6),
            "the consumer process aborted in ack(): {status:?}"
        );
    }
    // It committed the first three, and died before acking the third.
    let committed = rows(&store, &keys).await;
    for key in &keys[..3] {
        assert_eq!(
            committed.get(key),
            Some(&1),
            "committed by the killed consumer: {key}"
        );
    }
    for key in &keys[3..] {
        assert_eq!(
            committed.get(key),
            None,
            "not reached by the killed consumer: {key}"
        );
    }

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_kill));
    let mut running = topic
        .run(
            handler,
            store.clone(),
            ConsumerOptions::default().concurrency(2),
        )
        .await;
    running
        .until("the victim and the rest settled", |r| {
            r.processed + r.duplicates >= 3
        })
        .await;
    let report = running.stop().await;

    assert_eq!(report, report_of(2, 1, 0, 0), "the victim is a duplicate");
    assert_eq!(runs(victim), 0, "this process never ran the victim's body");
    for key in &keys[3..] {
        assert_eq!(runs(key), 1);
    }
    assert!(
        attempts(&seen).contains(&Some(2)),
        "the victim was a redelivery: {:?}",
        attempts(&seen)
    );
    let rows = rows(&store, &keys).await;
    assert!(keys.iter().all(|key| rows.get(key) == Some(&1)), "{rows:?}");
    topic.assert_drained().await;
    assert!(topic.dead_letters().await.is_empty());
    topic.delete().await;
}

/// An undecodable payload and a permanent failure are dead-lettered at once, with their
/// reasons and attempt 1; the runner keeps consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_payloads_are_dead_lettered_with_their_reasons() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("poison", Duration::from_secs(10), -1).await;
    let good = [
        unique_key("nats-good"),
        unique_key("nats-good"),
        unique_key("nats-good"),
    ];
    let poison_key = unique_key("nats-poison");
    let garbage = b"{not json".to_vec();
    let poison = Order {
        order_id: poison_key.clone(),
        poison: true,
    }
    .json();
    topic.publish(Order::new(&good[0]).json(), None).await;
    topic.publish(garbage.clone(), None).await;
    topic.publish(poison.clone(), None).await;
    topic.publish(Order::new(&good[1]).json(), None).await;

    let mut running = topic
        .run(
            idem_runtime::handler!(on_poison),
            store.clone(),
            ConsumerOptions::default().concurrency(4),
        )
        .await;
    running
        .until("poison dead-lettered", |r| {
            r.dead_lettered >= 2 && r.processed >= 2
        })
        .await;
    // Still consuming.
    topic.publish(Order::new(&good[2]).json(), None).await;
    running.until("the next order", |r| r.processed >= 3).await;
    let report = running.stop().await;

    assert_eq!(report, report_of(3, 0, 0, 2));
    let letters = topic.dead_letters().await;
    assert_eq!(letters.len(), 2, "exactly the poison: {letters:?}");
    let undecodable = letters
        .iter()
        .find(|letter| letter.payload == garbage)
        .expect("the undecodable payload is dead-lettered");
    assert!(
        undecodable.reason.contains("does not decode"),
        "{}",
        undecodable.reason
    );
    assert_eq!(undecodable.attempt, 1);
    assert_eq!(undecodable.stream_sequence, 2);
    let failed = letters
        .iter()
        .find(|letter| letter.payload == poison)
        .expect("the permanent failure is dead-lettered");
    assert!(
        failed.reason.contains("can never succeed"),
        "{}",
        failed.reason
    );
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.stream_sequence, 3);
    for letter in &letters {
        assert_eq!(letter.stream, topic.stream);
        assert_eq!(letter.subject, topic.subject);
    }
    assert_eq!(runs(&poison_key), 1, "a permanent failure is not retried");
    assert_eq!(rows_of(&store, &poison_key).await, 0, "rolled back");
    let good_rows = rows(&store, &good).await;
    assert!(good.iter().all(|key| good_rows.get(key) == Some(&1)));
    topic.assert_drained().await;
    topic.delete().await;
}

/// A handler that fails twice, retryably, then succeeds: deliveries 1, 2, 3, spaced at least
/// by the backoff's lower bounds (0.5 s, then 1 s), one committed effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_spaced_by_the_backoff_and_carry_the_attempt() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("heal", Duration::from_secs(10), -1).await;
    let key = unique_key("nats-heal");
    topic.publish(Order::new(&key).json(), None).await;

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_heal));
    let mut running = topic
        .run(handler, store.clone(), ConsumerOptions::default())
        .await;
    running.until("healed", |r| r.processed >= 1).await;
    let report = running.stop().await;

    assert_eq!(report, report_of(1, 0, 2, 0));
    assert_eq!(attempts(&seen), [Some(1), Some(2), Some(3)]);
    let times: Vec<Instant> = locked(&seen).iter().map(|(_, at)| *at).collect();
    let first_gap = times[1] - times[0];
    let second_gap = times[2] - times[1];
    assert!(
        first_gap >= Duration::from_millis(500),
        "first retry after {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1000),
        "second retry after {second_gap:?}"
    );
    assert_eq!(runs(&key), 3);
    assert_eq!(rows_of(&store, &key).await, 1, "one committed effect");
    topic.assert_drained().await;
    assert!(topic.dead_letters().await.is_empty());
    topic.delete().await;
}

/// A retryable failure that never heals is dead-lettered after `max_attempts` (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_never_heals_is_dead_lettered_after_max_attempts() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("never", Duration::from_secs(10), -1).await;
    let key = unique_key("nats-never");
    let payload = Order::new(&key).json();
    topic.publish(payload.clone(), None).await;

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_never));
    let mut running = topic
        .run(handler, store.clone(), ConsumerOptions::default())
        .await;
    running
        .until("dead-lettered", |r| r.dead_lettered >= 1)
        .await;
    let report = running.stop().await;

    assert_eq!(report, report_of(0, 0, 2, 1));
    assert_eq!(attempts(&seen), [Some(1), Some(2), Some(3)]);
    let letters = topic.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload, payload);
    assert_eq!(letters[0].attempt, 3);
    assert!(
        letters[0].reason.contains("gave up after 3 attempts")
            && letters[0].reason.contains("transient failure"),
        "{}",
        letters[0].reason
    );
    assert_eq!(runs(&key), 3);
    assert_eq!(rows_of(&store, &key).await, 0);
    topic.assert_drained().await;
    topic.delete().await;
}

/// The consumer's `max_deliver` (3) is lower than the handler's `max_attempts` (10): the third
/// delivery, the server's last, is dead-lettered instead of being silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_is_honoured() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("capped", Duration::from_secs(10), 3).await;
    let key = unique_key("nats-capped");
    topic.publish(Order::new(&key).json(), None).await;

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_capped));
    let mut running = topic
        .run(handler, store.clone(), ConsumerOptions::default())
        .await;
    running
        .until("dead-lettered", |r| r.dead_lettered >= 1)
        .await;
    let report = running.stop().await;

    assert_eq!(report, report_of(0, 0, 2, 1));
    assert_eq!(attempts(&seen), [Some(1), Some(2), Some(3)]);
    let letters = topic.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].attempt, 3);
    assert!(
        letters[0].reason.contains("gave up after 3 attempts"),
        "{}",
        letters[0].reason
    );
    topic.assert_drained().await;
    topic.delete().await;
}

/// A body of 5 s under an `ack_wait` of 2 s: the in-progress signals keep the server from
/// redelivering it meanwhile; it is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_is_kept_in_progress() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("slow", Duration::from_secs(2), -1).await;
    let key = unique_key("nats-slow");
    topic.publish(Order::new(&key).json(), None).await;

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_slow));
    let mut running = topic
        .run(handler, store.clone(), ConsumerOptions::default())
        .await;
    within("the body started", latch(&format!("{key}.started")).wait()).await;
    // The broker's AckWait (2 s), a server timer no clock of ours drives: the body is held past
    // it twice over, and only the in-progress signals keep the server from redelivering.
    tokio::time::sleep(Duration::from_secs(5)).await;
    latch(&format!("{key}.release")).open();
    running.until("processed", |r| r.processed >= 1).await;
    let report = running.stop().await;

    assert_eq!(report, report_of(1, 0, 0, 0));
    assert_eq!(attempts(&seen), [Some(1)], "delivered once");
    assert_eq!(topic.consumer_info().await.num_redelivered, 0);
    assert_eq!(runs(&key), 1);
    assert_eq!(rows_of(&store, &key).await, 1);
    topic.assert_drained().await;
    topic.delete().await;
}

/// Cancelled while a body runs: the runner stops pulling, lets it finish, acks it, returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_handler_finish_and_ack() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("graceful", Duration::from_secs(10), -1).await;
    let key = unique_key("nats-graceful");
    topic.publish(Order::new(&key).json(), None).await;

    let running = topic
        .run(
            idem_runtime::handler!(on_graceful),
            store.clone(),
            ConsumerOptions::default().shutdown_grace(Duration::from_secs(20)),
        )
        .await;
    within("the body started", latch(&format!("{key}.started")).wait()).await;
    assert_eq!(runs(&key), 1, "the body started");
    running.shutdown.cancel();
    assert!(
        !running.task.is_finished(),
        "run waits for the running body"
    );
    latch(&format!("{key}.release")).open();
    let report = running.join().await;

    assert_eq!(
        report,
        report_of(1, 0, 0, 0),
        "finished and acked during the grace"
    );
    assert_eq!(rows_of(&store, &key).await, 1);
    let info = topic.consumer_info().await;
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "acked before run returned"
    );
    topic.delete().await;
}

/// A body stuck past the shutdown grace is cancelled and its message left unacked: a new
/// consumer gets it again (delivery 2) and runs the body to its one commit. Had the runner
/// acked it, nothing would be pending and the new consumer would never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_cancelled_at_the_deadline_is_redelivered_not_acked() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("stuck", Duration::from_secs(2), -1).await;
    let key = unique_key("nats-stuck");
    topic.publish(Order::new(&key).json(), None).await;

    let (handler, _) = Observed::new(idem_runtime::handler!(on_stuck));
    let running = topic
        .run(
            handler,
            store.clone(),
            ConsumerOptions::default().shutdown_grace(Duration::from_millis(100)),
        )
        .await;
    within("the body started", latch(&format!("{key}.started")).wait()).await;
    assert_eq!(runs(&key), 1, "the body started");
    let report = running.stop().await;
    let mut unsettled = ConsumerReport::default();
    unsettled.unsettled = 1;
    assert_eq!(report, unsettled, "cancelled, not settled");
    assert_eq!(
        rows_of(&store, &key).await,
        0,
        "cancelled before its commit"
    );
    assert_eq!(
        topic.consumer_info().await.num_ack_pending,
        1,
        "left unacked"
    );

    let (handler, seen) = Observed::new(idem_runtime::handler!(on_stuck));
    let mut running = topic
        .run(handler, store.clone(), ConsumerOptions::default())
        .await;
    running
        .until("redelivered and processed", |r| r.processed >= 1)
        .await;
    let report = running.stop().await;

    assert_eq!(report, report_of(1, 0, 0, 0));
    assert_eq!(attempts(&seen), [Some(2)], "the server's second delivery");
    assert_eq!(runs(&key), 2);
    assert_eq!(rows_of(&store, &key).await, 1);
    topic.assert_drained().await;
    topic.delete().await;
}

/// `key = "$message_id"`: the `Nats-Msg-Id` header is the key. The same ids on a second stream
/// (past the first stream's duplicate window) are duplicates; a message without an id is
/// dead-lettered with the reason. Combined with a field, the id and the field make the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_id_is_the_key() {
    idem_tests::init_tracing();
    let store = pg().await;
    let first = Topic::new("id-a", Duration::from_secs(10), -1).await;
    let second = Topic::new("id-b", Duration::from_secs(10), -1).await;
    let ids: Vec<String> = (0..3).map(|_| unique_key("nats-msg-id")).collect();
    let firsts: Vec<String> = (0..3).map(|_| unique_key("nats-id-first")).collect();
    let seconds: Vec<String> = (0..2).map(|_| unique_key("nats-id-second")).collect();
    let anonymous = Order::new(&unique_key("nats-id-none")).json();
    for (id, order) in ids.iter().zip(&firsts) {
        first.publish(Order::new(order).json(), Some(id)).await;
    }
    first.publish(anonymous.clone(), None).await;
    for (id, order) in ids.iter().zip(&seconds) {
        second.publish(Order::new(order).json(), Some(id)).await;
    }

    let mut running = first
        .run(
            idem_runtime::handler!(on_by_id),
            store.clone(),
            ConsumerOptions::default(),
        )
        .await;
    running
        .until("first stream handled", |r| {
            r.processed >= 3 && r.dead_lettered >= 1
        })
        .await;
    assert_eq!(running.stop().await, report_of(3, 0, 0, 1));
    let mut running = second
        .run(
            idem_runtime::handler!(on_by_id),
            store.clone(),
            ConsumerOptions::default(),
        )
        .await;
    running
        .until("second stream handled", |r| r.duplicates >= 2)
        .await;
    assert_eq!(
        running.stop().await,
        report_of(0, 2, 0, 0),
        "same ids: duplicates"
    );
    for order in &firsts {
        assert_eq!(runs(order), 1);
    }
    for order in &seconds {
        assert_eq!(runs(order), 0);
    }
    let letters = first.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload, anonymous);
    assert_eq!(letters[0].attempt, 1);
    assert!(
        letters[0].reason.contains("has no message id"),
        "{}",
        letters[0].reason
    );
    first.assert_drained().await;
    second.assert_drained().await;
    first.delete().await;
    second.delete().await;

    // `$message_id, order_id`: one stream per publish of the same id (the duplicate window).
    let id = unique_key("nats-idf");
    let other_id = unique_key("nats-idf");
    let order = unique_key("nats-idf-order");
    let other_order = unique_key("nats-idf-order");
    let streams = [
        // (label, publishes, expected report)
        ("idf-a", vec![(&id, &order)], report_of(1, 0, 0, 0)),
        (
            "idf-b",
            vec![(&id, &order), (&other_id, &order)], // same id and field; other id
            report_of(1, 1, 0, 0),
        ),
        ("idf-c", vec![(&id, &other_order)], report_of(1, 0, 0, 0)), // same id, other field
    ];
    for (label, publishes, expected) in streams {
        let topic = Topic::new(label, Duration::from_secs(10), -1).await;
        let count = publishes.len() as u64;
        for (id, order) in publishes {
            topic.publish(Order::new(order).json(), Some(id)).await;
        }
        let mut running = topic
            .run(
                idem_runtime::handler!(on_by_id_and_field),
                store.clone(),
                ConsumerOptions::default(),
            )
            .await;
        running
            .until(label, |r| r.processed + r.duplicates >= count)
            .await;
        assert_eq!(running.stop().await, expected, "{label}");
        topic.assert_drained().await;
        topic.delete().await;
    }
    assert_eq!(runs(&order), 2, "once per id");
    assert_eq!(runs(&other_order), 1);
}

/// The runner refuses a consumer without explicit acks and a dead-letter subject no stream
/// keeps, before pulling anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_checks_its_set_up() {
    let store = pg().await;
    let topic = Topic::new("setup", Duration::from_secs(10), -1).await;
    let runner = NatsConsumer::new(
        topic.consumer().await,
        topic.js.clone(),
        idem_runtime::handler!(on_bulk),
        store.clone(),
    )
    .with_dead_letter_subject(format!("idem-t.{}.nowhere", run_id()));
    let error = runner
        .run(CancellationToken::new())
        .await
        .expect_err("no stream keeps the dead letters");
    assert!(
        matches!(error, NatsError::NoDeadLetterStream { .. }),
        "{error}"
    );

    let runner = NatsConsumer::new(
        topic.consumer().await,
        topic.js.clone(),
        idem_runtime::handler!(on_bulk),
        store.clone(),
    )
    .with_dead_letter_subject(topic.subject.clone());
    let error = runner
        .run(CancellationToken::new())
        .await
        .expect_err("dead letters into the consumed stream");
    assert!(matches!(error, NatsError::DeadLetterLoop { .. }), "{error}");

    let unacked = topic
        .js
        .get_stream(&topic.stream)
        .await
        .expect("get the stream")
        .create_consumer(pull::Config {
            durable_name: Some("idem-t-ack-none".into()),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("create the consumer");
    let error = NatsConsumer::new(
        unacked,
        topic.js.clone(),
        idem_runtime::handler!(on_bulk),
        store,
    )
    .run(CancellationToken::new())
    .await
    .expect_err("acks are not explicit");
    assert!(matches!(error, NatsError::AckPolicy { .. }), "{error}");
    topic.delete().await;
}

// ---------------------------------------------------------------------------------------------
// Batch mode.

/// Body runs of the batch handler (one per part of a batch).
static BATCH_BODIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "nats.batch",
    batch
)]
async fn on_batch(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    BATCH_BODIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for msg in msgs {
        record(tx, &msg.order_id).await?;
        if msg.amount < 0 {
            return Err(AppError::Poison(msg.order_id.clone()));
        }
    }
    Ok(())
}

/// Batch mode: 300 orders, each published twice (every third copy right behind its original,
/// the rest one pass later), a permanent failure and an undecodable payload among them,
/// consumed in batches of up to 100, two at once. Each effect once, the two poison messages
/// dead-lettered with their reasons, every other message acked (nothing pending), in far fewer
/// body runs than messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_each_effect_once_and_poison_dead_lettered() {
    idem_tests::init_tracing();
    let store = pg().await;
    let topic = Topic::new("batch", Duration::from_secs(30), -1).await;

    const N: usize = 300;
    let keys: Vec<String> = (0..N).map(|_| unique_key("nats-batch")).collect();
    let poison_key = unique_key("nats-batch-poison");
    let undecodable = format!(
        r#"{{"order_id": "{}""#,
        unique_key("nats-batch-undecodable")
    )
    .into_bytes();
    let json = |key: &str, amount: i64| {
        serde_json::to_vec(&Payment::new(key, amount)).expect("serialize a payment")
    };
    let poison = json(&poison_key, -1);
    let mut payloads = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        payloads.push(json(key, 1));
        if i == N / 2 {
            payloads.push(poison.clone());
            payloads.push(undecodable.clone());
        }
        // Every third key's copy right behind it (the same batch), the rest one pass later.
        if i % 3 == 0 {
            payloads.push(json(key, 1));
        }
    }
    for (i, key) in keys.iter().enumerate() {
        if i % 3 != 0 {
            payloads.push(json(key, 1));
        }
    }
    let published = payloads.len() as u64;
    assert_eq!(published, 2 * N as u64 + 2);
    topic.publish_all(payloads).await;

    let runner = NatsBatchConsumer::new(
        topic.consumer().await,
        topic.js.clone(),
        idem_runtime::batch_handler!(on_batch),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(2))
    .with_batch(
        BatchOptions::default()
            .max_size(100)
            .max_wait(Duration::from_millis(50)),
    );
    let stats = runner.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    let mut running = Running {
        shutdown,
        task,
        stats,
    };
    running
        .until("every delivery settled", |r| {
            r.processed + r.duplicates + r.dead_lettered >= published
        })
        .await;
    let report = running.stop().await;

    // Nothing requeued, unsettled or refused.
    assert_eq!(report, report_of(N as u64, N as u64, 0, 2), "{report:?}");
    let rows = rows(&store, &keys).await;
    assert_eq!(rows.len(), N, "a row for every order");
    for key in &keys {
        assert_eq!(rows.get(key), Some(&1), "{key}: one committed run");
        assert!(runs(key) <= 8, "{key}: {} runs", runs(key));
    }
    assert_eq!(rows_of(&store, &poison_key).await, 0, "rolled back");
    let bodies = BATCH_BODIES.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        bodies < 60,
        "{bodies} body runs for {published} messages: the runner batches"
    );
    let letters = topic.dead_letters().await;
    assert_eq!(letters.len(), 2, "exactly the poison: {letters:?}");
    let failed = letters
        .iter()
        .find(|letter| letter.payload == poison)
        .expect("the permanent failure is dead-lettered");
    assert!(
        failed
            .reason
            .contains(&format!("order {poison_key} is poison")),
        "{}",
        failed.reason
    );
    assert_eq!(failed.attempt, 1);
    let garbage = letters
        .iter()
        .find(|letter| letter.payload == undecodable)
        .expect("the undecodable payload is dead-lettered");
    assert!(
        garbage.reason.contains("does not decode"),
        "{}",
        garbage.reason
    );
    assert_eq!(garbage.attempt, 1);
    topic.assert_drained().await;
    topic.delete().await;
}

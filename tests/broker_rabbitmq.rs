//! RabbitMQ, live: the `broker::rabbitmq` runner and acknowledger against the local broker and
//! PostgreSQL (`dedup_table`). Every queue is unique to this run; the dead-letter queue is read
//! back message by message; "nothing left unacked" is checked after the consumer's channel is
//! closed (RabbitMQ then requeues whatever was not acked), by the queues' message counts.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::{AMQPValue, FieldTable};
use idem_runtime::broker::rabbitmq::lapin::{BasicProperties, Channel, Connection};
use idem_runtime::broker::rabbitmq::{
    ATTEMPT_HEADER, QUEUE_HEADER, REASON_HEADER, RabbitMqAcknowledger, RabbitMqConsumer,
    RabbitMqError, RabbitMqTopology, lapin,
};
use idem_runtime::broker::{CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats};
use idem_runtime::handler::Handler;
use idem_runtime::{
    Acknowledger as _, Disposition, HandlerError, PgStore, PgTx, handler, idempotent,
};
use idem_tests::effects::{Effects as _, TestStore as _};
use idem_tests::{Latch, Payment, count_run, latch, run_id, runs, unique_key, within};

// ---------------------------------------------------------------------------------------------
// Handlers

#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Db(#[from] idem_runtime::sqlx::Error),
    #[error("order {0} is invalid: negative amount")]
    Permanent(String),
    #[error("injected transient failure for order {0}")]
    Transient(String),
}

impl HandlerError for TestError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Db(error) => idem_runtime::classify_error_chain(error),
            Self::Permanent(_) => Disposition::DeadLetter,
            Self::Transient(_) => Disposition::Retry,
        }
    }
}

impl From<idem_tests::AppError> for TestError {
    fn from(error: idem_tests::AppError) -> Self {
        match error {
            idem_tests::AppError::Db(error) => Self::Db(error),
            idem_tests::AppError::Transient(key) => Self::Transient(key),
        }
    }
}

/// Keys whose bodies fail (retryable) this many more times.
fn failures() -> &'static Mutex<HashMap<String, u32>> {
    static FAILURES: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    FAILURES.get_or_init(Mutex::default)
}

fn fail_times(key: &str, times: u32) {
    failures()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned(), times);
}

fn maybe_fail(key: &str) -> Result<(), TestError> {
    let mut failures = failures().lock().unwrap_or_else(PoisonError::into_inner);
    match failures.get_mut(key) {
        Some(left) if *left > 0 => {
            *left -= 1;
            Err(TestError::Transient(key.to_owned()))
        }
        _ => Ok(()),
    }
}

/// Keys whose next body is held: it opens [`started`] and waits for [`released`].
fn held() -> &'static Mutex<HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(Mutex::default)
}

/// Holds the next body for `key` after its business write, until the test opens
/// [`released`]`(key)` (a slow body), or for good (a stuck one).
fn hold_in_body(key: &str) {
    held()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned());
}

/// Opened by a held body for `key` once it is inside the transaction.
fn started(key: &str) -> Arc<Latch> {
    latch(&format!("{key}.started"))
}

/// Opened by the test to let a held body for `key` go on.
fn released(key: &str) -> Arc<Latch> {
    latch(&format!("{key}.released"))
}

async fn maybe_hold(key: &str) {
    let hold = held()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(key);
    if hold {
        started(key).open();
        released(key).wait().await;
    }
}

/// The body every handler runs: count the run, write the ledger row (no unique key: a second
/// committed run shows), then fail or wait on a latch as the test asked.
async fn body(tx: &mut PgTx<'_>, counted: &str, msg: &Payment) -> Result<(), TestError> {
    count_run(counted);
    tx.ledger(counted, msg.amount).await?;
    if msg.amount < 0 {
        return Err(TestError::Permanent(msg.order_id.clone()));
    }
    maybe_hold(counted).await;
    maybe_fail(counted)
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.basic"
)]
async fn on_basic(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

/// The same scope as the `rabbitmq_consumer` process's handler.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.kill"
)]
async fn on_kill(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.poison"
)]
async fn on_poison(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.retry",
    max_attempts = 5
)]
async fn on_retry(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.gave_up",
    max_attempts = 3
)]
async fn on_gave_up(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.shutdown"
)]
async fn on_shutdown(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

/// Keyed on the AMQP `message_id` alone: runs and rows are counted under the order id.
#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.by_id"
)]
async fn on_by_id(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

#[idempotent(
    key = "$message_id, order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.by_id_and_field"
)]
async fn on_by_id_and_field(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), TestError> {
    body(tx, &msg.order_id, &msg).await
}

// ---------------------------------------------------------------------------------------------
// The broker

fn amqp_url() -> String {
    std::env::var("IDEM_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn connect() -> Connection {
    let url = amqp_url();
    Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|error| {
            panic!(
                "RabbitMQ is not reachable at {url}: {error}. Run the tests with scripts/test, which starts it, or set IDEM_TEST_AMQP_URL."
            )
        })
}

/// A channel with publisher confirms.
async fn confirmed_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("create a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    channel
}

/// A topology on a queue unique to this run, declared.
async fn topology(connection: &Connection, label: &str) -> RabbitMqTopology {
    let topology = RabbitMqTopology::for_queue(&format!("idem-test.{}.{label}", run_id()))
        .expect("a valid queue name");
    let channel = connection.create_channel().await.expect("create a channel");
    topology
        .declare(&channel)
        .await
        .expect("declare the topology");
    channel.close(200, "declared".into()).await.expect("close");
    topology
}

/// Publishes `body` to the work queue, with `message_id` if given, and waits for the confirm.
async fn publish(
    channel: &Channel,
    topology: &RabbitMqTopology,
    body: &[u8],
    message_id: Option<&str>,
) {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    let confirmation = channel
        .basic_publish(
            "".into(),
            topology.queue().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm");
    assert_eq!(
        confirmation,
        lapin::Confirmation::Ack(None),
        "the broker stored the message"
    );
}

async fn publish_payment(
    channel: &Channel,
    topology: &RabbitMqTopology,
    payment: &Payment,
    message_id: Option<&str>,
) {
    let body = serde_json::to_vec(payment).expect("serialize");
    publish(channel, topology, &body, message_id).await;
}

/// What a passive declare says of `queue`: (ready messages, consumers); `None` when it does
/// not exist (a 404). Any other error fails the test.
async fn queue_state(connection: &Connection, queue: &str) -> Option<(u32, u32)> {
    // A passive declare of a missing queue closes the channel: use one per look.
    let channel = connection.create_channel().await.expect("create a channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(declared) => {
            let _ = channel.close(200, "looked".into()).await;
            Some((declared.message_count(), declared.consumer_count()))
        }
        Err(error) => {
            let text = error.to_string();
            assert!(
                text.contains("NOT_FOUND") || text.contains("404"),
                "{queue}: {text}"
            );
            None
        }
    }
}

/// Messages ready in `queue` (not counting unacked ones), which must exist.
async fn depth(connection: &Connection, queue: &str) -> u32 {
    queue_state(connection, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
        .0
}

/// Nothing is left: the work queue exists, has no consumer (so nothing is held unacked: the
/// deliveries of a closed channel are back among the ready ones) and no ready message; every
/// retry tier queue the topology can use (0 to 32, for delays up to the longest `expiration`)
/// is either absent or empty and unconsumed.
async fn assert_nothing_left(connection: &Connection, topology: &RabbitMqTopology) {
    let work = queue_state(connection, topology.queue()).await;
    assert_eq!(
        work,
        Some((0, 0)),
        "work queue {} (ready, consumers)",
        topology.queue()
    );
    for tier in 0..=32_u32 {
        let delay =
            Duration::from_millis(1_u64 << tier).min(Duration::from_millis(u32::MAX.into()));
        let retry = topology.retry_queue(delay);
        assert!(
            retry.ends_with(&format!(".{tier}")),
            "{retry} is tier {tier}"
        );
        let state = queue_state(connection, &retry).await;
        assert!(
            matches!(state, None | Some((0, 0))),
            "retry queue {retry}: {state:?}"
        );
    }
}

/// A dead letter, read back.
#[derive(Debug)]
struct Letter {
    body: String,
    reason: String,
    attempt: i64,
    queue: String,
    message_id: Option<String>,
    delivery_mode: Option<u8>,
    headers: FieldTable,
}

fn header_text(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

/// Takes every message out of the dead-letter queue.
async fn dead_letters(connection: &Connection, topology: &RabbitMqTopology) -> Vec<Letter> {
    let channel = connection.create_channel().await.expect("create a channel");
    let mut letters = Vec::new();
    while let Some(message) = channel
        .basic_get(
            topology.dead_letter_queue().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let delivery = message.delivery;
        let headers = delivery
            .properties
            .headers()
            .clone()
            .expect("a dead letter has headers");
        let attempt = match headers.inner().get(ATTEMPT_HEADER) {
            Some(AMQPValue::LongLongInt(n)) => *n,
            other => panic!("{ATTEMPT_HEADER}: {other:?}"),
        };
        letters.push(Letter {
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
            reason: header_text(&headers, REASON_HEADER),
            attempt,
            queue: header_text(&headers, QUEUE_HEADER),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string),
            delivery_mode: *delivery.properties.delivery_mode(),
            headers,
        });
    }
    let _ = channel.close(200, "read".into()).await;
    letters
}

struct Running {
    shutdown: CancellationToken,
    stats: Arc<ConsumerStats>,
    task: tokio::task::JoinHandle<Result<ConsumerReport, RabbitMqError>>,
}

impl Running {
    /// Cancels and waits for `run` to return.
    async fn stop(self) -> ConsumerReport {
        self.shutdown.cancel();
        within("run to return after cancellation", self.task)
            .await
            .expect("the runner's task")
            .expect("run ends without an error")
    }

    /// Waits (woken by each settled delivery) until at least `count` deliveries are settled:
    /// processed, duplicates or dead-lettered.
    async fn settled(&self, what: &str, count: u64) -> ConsumerReport {
        within(
            what,
            self.stats.wait_until(|report| {
                report.processed + report.duplicates + report.dead_lettered >= count
            }),
        )
        .await
    }
}

async fn start<H>(
    connection: &Connection,
    topology: &RabbitMqTopology,
    handler: H,
    store: PgStore,
    options: ConsumerOptions,
) -> Running
where
    H: Handler<Store = PgStore>,
    H::Message: serde::de::DeserializeOwned,
{
    let channel = connection.create_channel().await.expect("create a channel");
    let consumer =
        RabbitMqConsumer::new(channel, topology.clone(), handler, store).with_options(options);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    Running {
        shutdown,
        stats,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// a. Every business message published twice, some three or four times, some copies back to
/// back: each body runs once, one row each, the report counts them all, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_effect_once_under_duplicates() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "basic").await;
    let publisher = confirmed_channel(&connection).await;

    const N: usize = 200;
    let keys: Vec<String> = (0..N).map(|_| unique_key("rmq-basic")).collect();
    let copies =
        |i: usize| 2 + usize::from(i.is_multiple_of(5)) + usize::from(i.is_multiple_of(10));
    let mut published = 0_u64;
    // Back to back for every seventh key, so that twins run at once; spread out for the rest.
    for (i, key) in keys.iter().enumerate() {
        if i.is_multiple_of(7) {
            for _ in 0..copies(i) {
                publish_payment(&publisher, &topology, &Payment::new(key, 10), None).await;
                published += 1;
            }
        }
    }
    for round in 0..4 {
        for (i, key) in keys.iter().enumerate() {
            if !i.is_multiple_of(7) && round < copies(i) {
                publish_payment(&publisher, &topology, &Payment::new(key, 10), None).await;
                published += 1;
            }
        }
    }
    // The broker holds every copy before the consumer starts (so all of them are settled below).
    assert_eq!(
        u64::from(depth(&connection, topology.queue()).await),
        published
    );

    let running = start(
        &connection,
        &topology,
        handler!(on_basic),
        store.clone(),
        ConsumerOptions::default().concurrency(8).prefetch(32),
    )
    .await;
    running.settled("every copy settled", published).await;
    let report = running.stop().await;

    assert_eq!(report.processed, N as u64, "{report:?}");
    assert_eq!(report.duplicates, published - N as u64, "{report:?}");
    assert_eq!(
        (
            report.requeued,
            report.dead_lettered,
            report.unsettled,
            report.settle_failures
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
    for key in &keys {
        assert_eq!(runs(key), 1, "{key}: the body ran once");
        assert_eq!(store.ledger_rows(key).await, 1, "{key}: one row");
    }
    assert_nothing_left(&connection, &topology).await;
    assert!(dead_letters(&connection, &topology).await.is_empty());
}

/// b. A consumer process (its own loop, with the acknowledger) dies between commit and ack;
/// another consumer gets the redelivery as a duplicate and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_commit_and_ack() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "kill").await;
    let publisher = confirmed_channel(&connection).await;
    let keys: Vec<String> = (0..4).map(|_| unique_key("rmq-kill")).collect();
    for key in &keys {
        publish_payment(&publisher, &topology, &Payment::new(key, 7), None).await;
    }
    let victim = &keys[2];

    // Killed when dropped: a test that times out below does not leave it running.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbitmq_consumer"))
        .env("IDEM_RMQ_QUEUE", topology.queue())
        .env("IDEM_RMQ_ABORT_ON", victim)
        .env("IDEM_TEST_AMQP_URL", amqp_url())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer process");
    let status = within(
        "the consumer process to abort at the victim's ack",
        child.wait(),
    )
    .await
    .expect("wait for the consumer process");
    assert!(!status.success(), "the consumer aborted: {status:?}");
    // It processed the first two and the victim (committed, not acked), in order (prefetch 1).
    for key in &keys[..3] {
        assert_eq!(
            store.ledger_rows(key).await,
            1,
            "{key}: committed by the dead consumer"
        );
    }
    assert_eq!(store.ledger_rows(&keys[3]).await, 0);

    let running = start(
        &connection,
        &topology,
        handler!(on_kill),
        store.clone(),
        ConsumerOptions::default().concurrency(2),
    )
    .await;
    running.settled("the victim and the last one", 2).await;
    let report = running.stop().await;
    assert_eq!((report.processed, report.duplicates), (1, 1), "{report:?}");
    assert_eq!(runs(victim), 0, "the redelivery did not run the body again");
    assert_eq!(runs(&keys[3]), 1);
    for key in &keys {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}: one row");
    }
    assert_nothing_left(&connection, &topology).await;
}

/// c + g. Poison: an undecodable payload, a permanent failure, a `$message_id` handler given a
/// message without an id. The dead-letter queues hold exactly those, with their reasons and
/// attempt counts; the consumers go on processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_reasons() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let poison = topology(&connection, "poison").await;
    let by_id = topology(&connection, "by-id").await;
    let publisher = confirmed_channel(&connection).await;

    let good: Vec<String> = (0..2).map(|_| unique_key("rmq-good")).collect();
    let invalid = unique_key("rmq-invalid");
    let undecodable = format!(
        r#"{{"order_id": "{}", "amount": "#,
        unique_key("rmq-undecodable")
    );
    publish_payment(&publisher, &poison, &Payment::new(&good[0], 1), None).await;
    publish(&publisher, &poison, undecodable.as_bytes(), None).await;
    publish_payment(&publisher, &poison, &Payment::new(&invalid, -1), None).await;
    publish_payment(&publisher, &poison, &Payment::new(&good[1], 1), None).await;

    let with_id = unique_key("rmq-with-id");
    let without_id = unique_key("rmq-without-id");
    let message_id = unique_key("rmq-mid");
    publish_payment(&publisher, &by_id, &Payment::new(&without_id, 1), None).await;
    publish_payment(
        &publisher,
        &by_id,
        &Payment::new(&with_id, 1),
        Some(&message_id),
    )
    .await;

    let options = ConsumerOptions::default().concurrency(2);
    let poison_runner = start(
        &connection,
        &poison,
        handler!(on_poison),
        store.clone(),
        options,
    )
    .await;
    let by_id_runner = start(
        &connection,
        &by_id,
        handler!(on_by_id),
        store.clone(),
        options,
    )
    .await;
    poison_runner.settled("the poison queue settled", 4).await;
    by_id_runner.settled("the by-id queue settled", 2).await;
    // Still consuming after the poison.
    let late = unique_key("rmq-late");
    publish_payment(&publisher, &poison, &Payment::new(&late, 1), None).await;
    poison_runner.settled("a message after the poison", 5).await;
    let poison_report = poison_runner.stop().await;
    let by_id_report = by_id_runner.stop().await;

    assert_eq!(
        (poison_report.processed, poison_report.dead_lettered),
        (3, 2),
        "{poison_report:?}"
    );
    assert_eq!(
        (by_id_report.processed, by_id_report.dead_lettered),
        (1, 1),
        "{by_id_report:?}"
    );
    for key in good.iter().chain([&late, &with_id]) {
        assert_eq!((runs(key), store.ledger_rows(key).await), (1, 1), "{key}");
    }
    assert_eq!(runs(&invalid), 1, "the permanent failure ran once");
    assert_eq!(store.ledger_rows(&invalid).await, 0, "and rolled back");
    assert_eq!(runs(&without_id), 0, "no id, no body");

    let mut letters = dead_letters(&connection, &poison).await;
    letters.sort_by(|a, b| a.reason.cmp(&b.reason));
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters[0]
            .reason
            .contains(&format!("order {invalid} is invalid")),
        "{letters:?}"
    );
    assert_eq!(
        serde_json::from_str::<Payment>(&letters[0].body).expect("the invalid order"),
        Payment::new(&invalid, -1)
    );
    assert!(letters[1].reason.contains("does not decode"), "{letters:?}");
    assert_eq!(letters[1].body, undecodable);
    for letter in &letters {
        assert_eq!(
            (letter.attempt, letter.queue.as_str()),
            (1, poison.queue()),
            "{letter:?}"
        );
    }

    let letters = dead_letters(&connection, &by_id).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].reason.contains("has no message id"),
        "{letters:?}"
    );
    assert!(letters[0].reason.contains("rmq.by_id"), "{letters:?}");
    assert_eq!(
        (letters[0].attempt, letters[0].message_id.as_deref()),
        (1, None)
    );
    assert_eq!(
        serde_json::from_str::<Payment>(&letters[0].body).expect("the payment"),
        Payment::new(&without_id, 1)
    );
    assert_nothing_left(&connection, &poison).await;
    assert_nothing_left(&connection, &by_id).await;
}

/// d. A retryable failure, twice, then success, through a service's own consumer loop: the
/// attempts seen are 1, 2, 3, spaced by at least the backoff's lower bound; one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_spaced_by_the_backoff_and_carry_the_attempt() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "retry").await;
    let publisher = confirmed_channel(&connection).await;
    let key = unique_key("rmq-retry");
    let message_id = unique_key("rmq-retry-mid");
    fail_times(&key, 2);
    publish_payment(
        &publisher,
        &topology,
        &Payment::new(&key, 5),
        Some(&message_id),
    )
    .await;

    let channel = confirmed_channel(&connection).await;
    channel
        .basic_qos(4, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut deliveries = channel
        .basic_consume(
            topology.queue().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen: Vec<(u32, Instant)> = Vec::new();
    // Each redelivery waits out a RabbitMQ per-message TTL in a retry tier queue.
    let outcome = within("the third attempt to succeed", async {
        loop {
            let delivery = deliveries
                .next()
                .await
                .expect("the consumer runs")
                .expect("a delivery");
            let msg: Payment = serde_json::from_slice(&delivery.data).expect("a payment");
            let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
            assert_eq!(
                ack.message_id(),
                Some(message_id.as_str()),
                "the copy keeps the id"
            );
            seen.push((ack.attempt().expect("counted"), Instant::now()));
            match on_retry(&store, msg, ack).await {
                Ok(outcome) => break outcome,
                Err(error) => assert!(error.to_string().contains("transient"), "{error}"),
            }
        }
    })
    .await;
    assert!(outcome.is_processed());
    channel.close(200, "done".into()).await.expect("close");

    let attempts: Vec<u32> = seen.iter().map(|(attempt, _)| *attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // Equal jitter, base 1 s: the delay after attempt n is in [2^(n-1)/2, 2^(n-1)] s.
    let gap_1 = seen[1].1 - seen[0].1;
    let gap_2 = seen[2].1 - seen[1].1;
    assert!(gap_1 >= Duration::from_millis(500), "{gap_1:?}");
    assert!(gap_2 >= Duration::from_millis(1000), "{gap_2:?}");
    assert!(
        gap_1 < Duration::from_secs(5) && gap_2 < Duration::from_secs(6),
        "{gap_1:?} {gap_2:?}"
    );
    assert_eq!(runs(&key), 3);
    assert_eq!(store.ledger_rows(&key).await, 1);
    assert_nothing_left(&connection, &topology).await;
    assert!(dead_letters(&connection, &topology).await.is_empty());
}

/// e. A retryable failure that never heals: requeued twice, then dead-lettered with "gave up
/// after 3 attempts" and the attempt count 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_never_heals_is_dead_lettered_after_max_attempts() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "gave-up").await;
    let publisher = confirmed_channel(&connection).await;
    let key = unique_key("rmq-gave-up");
    let healthy = unique_key("rmq-healthy");
    fail_times(&key, u32::MAX);
    let began = Instant::now();
    publish_payment(&publisher, &topology, &Payment::new(&key, 3), None).await;
    publish_payment(&publisher, &topology, &Payment::new(&healthy, 3), None).await;

    let running = start(
        &connection,
        &topology,
        handler!(on_gave_up),
        store.clone(),
        ConsumerOptions::default().concurrency(2),
    )
    .await;
    // Waits out RabbitMQ's per-message TTLs in the retry tier queues (two backoffs).
    within(
        "the dead letter",
        running.stats.wait_until(|report| report.dead_lettered >= 1),
    )
    .await;
    let took = began.elapsed();
    let report = running.stop().await;
    assert_eq!(
        (report.processed, report.requeued, report.dead_lettered),
        (1, 2, 1),
        "{report:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "two backoffs: {took:?}"
    );
    assert_eq!(runs(&key), 3);
    assert_eq!(store.ledger_rows(&key).await, 0);
    let letters = dead_letters(&connection, &topology).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]
            .reason
            .starts_with("gave up after 3 attempts: handler failed: injected transient failure"),
        "{letters:?}"
    );
    assert_eq!(letters[0].attempt, 3);
    assert_nothing_left(&connection, &topology).await;
}

/// f. Shutdown: a slow handler finishes and is acked; one stuck past a tiny grace is cancelled,
/// not acked, and the next consumer gets it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_settles_or_leaves_unacked() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "shutdown").await;
    let publisher = confirmed_channel(&connection).await;

    // A slow body, inside the grace: it finishes, commits, is acked; `run` then returns.
    let slow = unique_key("rmq-slow");
    hold_in_body(&slow);
    publish_payment(&publisher, &topology, &Payment::new(&slow, 1), None).await;
    let running = start(
        &connection,
        &topology,
        handler!(on_shutdown),
        store.clone(),
        ConsumerOptions::default().shutdown_grace(Duration::from_secs(20)),
    )
    .await;
    within("the slow body to start", started(&slow).wait()).await;
    assert_eq!(runs(&slow), 1);
    running.shutdown.cancel();
    // The runner took the cancellation (it stopped fetching: the queue has no consumer left),
    // and is still waiting for the body.
    idem_tests::eventually("the runner to stop fetching", || async {
        matches!(
            queue_state(&connection, topology.queue()).await,
            Some((_, 0))
        )
    })
    .await;
    assert!(!running.task.is_finished(), "it waited for the body");
    released(&slow).open();
    let report = running.stop().await;
    assert_eq!((report.processed, report.unsettled), (1, 0), "{report:?}");
    assert_eq!(store.ledger_rows(&slow).await, 1);
    assert_nothing_left(&connection, &topology).await;

    // A stuck body, past a tiny grace: cancelled, its transaction rolled back, not acked.
    let stuck = unique_key("rmq-stuck");
    // Never released: stuck for good.
    hold_in_body(&stuck);
    publish_payment(&publisher, &topology, &Payment::new(&stuck, 1), None).await;
    let running = start(
        &connection,
        &topology,
        handler!(on_shutdown),
        store.clone(),
        ConsumerOptions::default().shutdown_grace(Duration::from_millis(200)),
    )
    .await;
    within("the stuck body to start", started(&stuck).wait()).await;
    assert_eq!(runs(&stuck), 1);
    let cancelled = Instant::now();
    let report = running.stop().await;
    assert!(
        cancelled.elapsed() < Duration::from_secs(10),
        "the grace was short"
    );
    assert_eq!((report.processed, report.unsettled), (0, 1), "{report:?}");
    // Not acked: back in the queue as soon as the runner's channel closed.
    assert_eq!(
        depth(&connection, topology.queue()).await,
        1,
        "the stuck delivery is back"
    );
    assert_eq!(store.ledger_rows(&stuck).await, 0, "rolled back");

    let running = start(
        &connection,
        &topology,
        handler!(on_shutdown),
        store.clone(),
        ConsumerOptions::default(),
    )
    .await;
    running.settled("the redelivery", 1).await;
    let report = running.stop().await;
    assert_eq!((report.processed, report.duplicates), (1, 0), "{report:?}");
    assert_eq!(runs(&stuck), 2, "the body ran again, to commit");
    assert_eq!(store.ledger_rows(&stuck).await, 1);
    assert_nothing_left(&connection, &topology).await;
}

/// g. The AMQP `message_id` as the key, alone and with a field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_id_is_the_key() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let alone = topology(&connection, "mid").await;
    let combined = topology(&connection, "mid-field").await;
    let publisher = confirmed_channel(&connection).await;

    // Alone: two different bodies under one id are one message.
    let id = unique_key("rmq-mid");
    let (first, second) = (unique_key("rmq-mid-a"), unique_key("rmq-mid-b"));
    publish_payment(&publisher, &alone, &Payment::new(&first, 1), Some(&id)).await;
    publish_payment(&publisher, &alone, &Payment::new(&second, 1), Some(&id)).await;
    // With a field: one id, two orders, one order again.
    let shared = unique_key("rmq-mid-shared");
    let (a, b) = (unique_key("rmq-mid-fa"), unique_key("rmq-mid-fb"));
    for order in [&a, &b, &a] {
        publish_payment(
            &publisher,
            &combined,
            &Payment::new(order, 1),
            Some(&shared),
        )
        .await;
    }

    let options = ConsumerOptions::default().concurrency(1);
    let alone_runner = start(
        &connection,
        &alone,
        handler!(on_by_id),
        store.clone(),
        options,
    )
    .await;
    let combined_runner = start(
        &connection,
        &combined,
        handler!(on_by_id_and_field),
        store.clone(),
        options,
    )
    .await;
    alone_runner.settled("alone", 2).await;
    combined_runner.settled("combined", 3).await;
    let alone_report = alone_runner.stop().await;
    let combined_report = combined_runner.stop().await;

    assert_eq!(
        (alone_report.processed, alone_report.duplicates),
        (1, 1),
        "{alone_report:?}"
    );
    assert_eq!(
        (runs(&first), runs(&second)),
        (1, 0),
        "the first is processed, in order"
    );
    assert_eq!(
        (combined_report.processed, combined_report.duplicates),
        (2, 1),
        "{combined_report:?}"
    );
    assert_eq!((runs(&a), runs(&b)), (1, 1));
    assert_eq!(
        (store.ledger_rows(&a).await, store.ledger_rows(&b).await),
        (1, 1)
    );
    assert_nothing_left(&connection, &alone).await;
    assert_nothing_left(&connection, &combined).await;
    assert!(dead_letters(&connection, &alone).await.is_empty());
}

/// A consumer of `topology`'s work queue on `channel`, with a prefetch of `prefetch`.
async fn consume(channel: &Channel, topology: &RabbitMqTopology, prefetch: u16) -> lapin::Consumer {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    channel
        .basic_consume(
            topology.queue().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

async fn next_delivery(deliveries: &mut lapin::Consumer) -> lapin::message::Delivery {
    within("a delivery", deliveries.next())
        .await
        .expect("the consumer runs")
        .expect("a delivery")
}

/// h. A retry copy the broker does not take (here: the acknowledger's channel has no publisher
/// confirms) hands the original back only after the retry's delay, never at once: the same
/// attempt comes again, spaced by the backoff, not in a hot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_not_stored_is_handed_back_after_the_delay() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "not-stored").await;
    let publisher = confirmed_channel(&connection).await;
    let key = unique_key("rmq-not-stored");
    fail_times(&key, 1);
    publish_payment(&publisher, &topology, &Payment::new(&key, 2), None).await;

    // No confirm_select: every copy fails with ConfirmsNotEnabled.
    let channel = connection.create_channel().await.expect("create a channel");
    let mut deliveries = consume(&channel, &topology, 1).await;
    let mut seen: Vec<(u32, bool, Instant)> = Vec::new();
    // The second delivery waits out the acknowledger's give-back wait (the retry's delay).
    loop {
        let delivery = next_delivery(&mut deliveries).await;
        let msg: Payment = serde_json::from_slice(&delivery.data).expect("a payment");
        let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
        seen.push((
            ack.attempt().expect("counted"),
            ack.redelivered(),
            Instant::now(),
        ));
        match on_retry(&store, msg, ack).await {
            Ok(outcome) => {
                assert!(outcome.is_processed());
                break;
            }
            // The handler's error; the settling error (ConfirmsNotEnabled) is logged.
            Err(error) => assert!(error.to_string().contains("transient"), "{error}"),
        }
    }
    channel.close(200, "done".into()).await.expect("close");
    let attempts: Vec<(u32, bool)> = seen.iter().map(|(a, r, _)| (*a, *r)).collect();
    assert_eq!(attempts, [(1, false), (1, true)], "handed back, not stored");
    let gap = seen[1].2 - seen[0].2;
    // The first retry's delay is at least 500 ms (base 1 s, equal jitter).
    assert!(
        gap >= Duration::from_millis(500),
        "redelivered after {gap:?}"
    );
    assert_eq!((runs(&key), store.ledger_rows(&key).await), (2, 1));
    assert_nothing_left(&connection, &topology).await;
}

/// i. A dead-letter copy that comes back unroutable (the dead-letter queue was deleted)
/// re-declares the dead-letter exchange and queue and is published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_dead_letter_redeclares_the_dead_letter_queue() {
    idem_tests::init_tracing();
    let connection = connect().await;
    let topology = topology(&connection, "dl-gone").await;
    let publisher = confirmed_channel(&connection).await;
    publisher
        .queue_delete(
            topology.dead_letter_queue().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the dead-letter queue");
    let key = unique_key("rmq-dl-gone");
    publish_payment(&publisher, &topology, &Payment::new(&key, 1), None).await;

    let channel = confirmed_channel(&connection).await;
    let mut deliveries = consume(&channel, &topology, 1).await;
    let delivery = next_delivery(&mut deliveries).await;
    let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
    ack.dead_letter_now("test: dead-lettered by hand")
        .await
        .expect("the dead letter is stored after the re-declaration");
    channel.close(200, "done".into()).await.expect("close");

    let letters = dead_letters(&connection, &topology).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "test: dead-lettered by hand");
    assert_eq!(
        serde_json::from_str::<Payment>(&letters[0].body).expect("the payment"),
        Payment::new(&key, 1)
    );
    assert_nothing_left(&connection, &topology).await;
}

/// RabbitMQ's own dead-lettering headers, as a message that went through the work queue's
/// dead-lettering before would carry them, plus a quorum delivery count.
fn dead_lettering_headers(work_queue: &str) -> FieldTable {
    let mut death = FieldTable::default();
    death.insert("queue".into(), AMQPValue::LongString(work_queue.into()));
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert("exchange".into(), AMQPValue::LongString("".into()));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    for (name, value) in [
        ("x-first-death-queue", work_queue),
        ("x-first-death-reason", "expired"),
        ("x-first-death-exchange", ""),
        ("x-last-death-queue", work_queue),
        ("x-last-death-reason", "expired"),
        ("x-last-death-exchange", ""),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    headers.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
    headers.insert("x-app".into(), AMQPValue::LongString("kept".into()));
    headers
}

const DEAD_LETTERING_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// j. Retry and dead-letter copies of a transient message that carries RabbitMQ's
/// dead-lettering headers are persistent and carry none of those headers: the retry comes back
/// (RabbitMQ's cycle detection would drop it if the work queue were still in its `x-death`),
/// counts its attempt from `x-idem-attempt` alone, and the dead letter starts clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_are_persistent_and_drop_the_dead_lettering_headers() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "copies").await;
    let publisher = confirmed_channel(&connection).await;
    let retried = unique_key("rmq-copies-retried");
    let invalid = unique_key("rmq-copies-invalid");
    fail_times(&retried, 1);
    for payment in [Payment::new(&retried, 1), Payment::new(&invalid, -1)] {
        let confirmation = publisher
            .basic_publish(
                "".into(),
                topology.queue().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &serde_json::to_vec(&payment).expect("serialize"),
                BasicProperties::default()
                    .with_delivery_mode(1)
                    .with_headers(dead_lettering_headers(topology.queue())),
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert_eq!(confirmation, lapin::Confirmation::Ack(None));
    }

    let channel = confirmed_channel(&connection).await;
    let mut deliveries = consume(&channel, &topology, 1).await;
    let mut attempts = Vec::new();
    // The retry copy waits out a RabbitMQ per-message TTL in a retry tier queue.
    loop {
        let delivery = next_delivery(&mut deliveries).await;
        let msg: Payment = serde_json::from_slice(&delivery.data).expect("a payment");
        let properties = delivery.properties.clone();
        let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
        if msg.order_id == retried {
            attempts.push(ack.attempt().expect("counted"));
        }
        if msg.order_id == retried && attempts.len() == 2 {
            // The retry copy, back from its tier queue: RabbitMQ's x-death names only that.
            assert_eq!(*properties.delivery_mode(), Some(2), "{properties:?}");
            let headers = properties.headers().clone().expect("headers");
            assert!(!headers.contains_key("x-delivery-count"), "{headers:?}");
            let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
                panic!("the tier queue's x-death: {headers:?}");
            };
            assert_eq!(deaths.as_slice().len(), 1, "{headers:?}");
            assert_ne!(
                headers.inner().get("x-first-death-queue"),
                Some(&AMQPValue::LongString(topology.queue().into())),
                "{headers:?}"
            );
            assert_eq!(
                headers.inner().get("x-app"),
                Some(&AMQPValue::LongString("kept".into()))
            );
        }
        let outcome = on_retry(&store, msg, ack).await;
        if attempts.len() == 2 {
            assert!(outcome.expect("the retry succeeds").is_processed());
            break;
        }
    }
    channel.close(200, "done".into()).await.expect("close");
    // 1 + the x-delivery-count of 2; then x-idem-attempt alone.
    assert_eq!(attempts, [3, 4]);

    let letters = dead_letters(&connection, &topology).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert!(letter.reason.contains(&invalid), "{letter:?}");
    assert_eq!(letter.delivery_mode, Some(2), "{letter:?}");
    for name in DEAD_LETTERING_HEADERS {
        assert!(!letter.headers.contains_key(name), "{name}: {letter:?}");
    }
    assert_eq!(
        letter.headers.inner().get("x-app"),
        Some(&AMQPValue::LongString("kept".into()))
    );
    assert_eq!(runs(&retried), 2);
    assert_eq!(store.ledger_rows(&retried).await, 1);
    assert_nothing_left(&connection, &topology).await;
}

/// k. Many copies in flight on one channel at once, to two topologies: each lands where it
/// belongs, once (copy publishes are serialized per channel, so that a returned copy is never
/// taken for another's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_on_one_channel_each_land_once() {
    idem_tests::init_tracing();
    let connection = connect().await;
    let first = topology(&connection, "concurrent-a").await;
    let second = topology(&connection, "concurrent-b").await;
    let publisher = confirmed_channel(&connection).await;
    const N: usize = 12;
    let keys: Vec<String> = (0..N).map(|_| unique_key("rmq-concurrent")).collect();
    for (i, key) in keys.iter().enumerate() {
        let topology = if i % 2 == 0 { &first } else { &second };
        publish_payment(&publisher, topology, &Payment::new(key, 1), None).await;
    }

    let channel = confirmed_channel(&connection).await;
    let mut acks = Vec::new();
    for topology in [&first, &second] {
        let mut deliveries = consume(&channel, topology, 0).await;
        for _ in 0..N / 2 {
            let delivery = next_delivery(&mut deliveries).await;
            acks.push(RabbitMqAcknowledger::new(
                delivery,
                channel.clone(),
                topology.clone(),
            ));
        }
    }
    let settled = futures_util::future::join_all(
        acks.into_iter()
            .map(|ack| ack.dead_letter_now("test: concurrent")),
    )
    .await;
    for result in settled {
        result.expect("stored");
    }
    channel.close(200, "done".into()).await.expect("close");

    for (i, topology) in [&first, &second].into_iter().enumerate() {
        let mut bodies: Vec<String> = dead_letters(&connection, topology)
            .await
            .into_iter()
            .map(|letter| {
                serde_json::from_str::<Payment>(&letter.body)
                    .expect("a payment")
                    .order_id
            })
            .collect();
        bodies.sort();
        let mut expected: Vec<String> = keys.iter().skip(i).step_by(2).cloned().collect();
        expected.sort();
        assert_eq!(bodies, expected, "{}", topology.queue());
        assert_nothing_left(&connection, topology).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Batch mode

/// Body runs of the batch handler (one per part of a batch).
static BATCH_BODIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.batch",
    batch
)]
async fn on_batch(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), TestError> {
    BATCH_BODIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for msg in msgs {
        body(tx, &msg.order_id, msg).await?;
    }
    Ok(())
}

/// g. Batch mode: every message twice (some copies in one batch, some in two batches running
/// at once), a permanent failure and an undecodable payload among them. Each effect once, the
/// poison and the undecodable payload dead-lettered on their own, every other delivery acked
/// (nothing left), in far fewer body runs than messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_each_effect_once_and_poison_dead_lettered() {
    idem_tests::init_tracing();
    let store = idem_tests::pg::store().await;
    let connection = connect().await;
    let topology = topology(&connection, "batch").await;
    let publisher = confirmed_channel(&connection).await;

    const N: usize = 300;
    let keys: Vec<String> = (0..N).map(|_| unique_key("rmq-batch")).collect();
    let poison = unique_key("rmq-batch-poison");
    let undecodable = format!(r#"{{"order_id": "{}""#, unique_key("rmq-batch-undecodable"));
    for (i, key) in keys.iter().enumerate() {
        publish_payment(&publisher, &topology, &Payment::new(key, 1), None).await;
        if i == N / 2 {
            publish_payment(&publisher, &topology, &Payment::new(&poison, -1), None).await;
            publish(&publisher, &topology, undecodable.as_bytes(), None).await;
        }
        // Every third key's copy right behind it (the same batch), the rest one pass later.
        if i % 3 == 0 {
            publish_payment(&publisher, &topology, &Payment::new(key, 1), None).await;
        }
    }
    for (i, key) in keys.iter().enumerate() {
        if i % 3 != 0 {
            publish_payment(&publisher, &topology, &Payment::new(key, 1), None).await;
        }
    }
    let published = 2 * N as u64 + 2;
    assert_eq!(
        u64::from(depth(&connection, topology.queue()).await),
        published
    );

    let channel = connection.create_channel().await.expect("create a channel");
    let consumer = idem_runtime::broker::rabbitmq::RabbitMqBatchConsumer::new(
        channel,
        topology.clone(),
        idem_runtime::batch_handler!(on_batch),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(2))
    .with_batch(
        idem_runtime::broker::BatchOptions::default()
            .max_size(100)
            .max_wait(Duration::from_millis(50)),
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let running = Running {
        shutdown,
        stats,
        task,
    };
    running.settled("every delivery settled", published).await;
    let report = running.stop().await;

    assert_eq!(
        (
            report.processed,
            report.duplicates,
            report.dead_lettered,
            report.requeued,
            report.unsettled,
            report.settle_failures
        ),
        (N as u64, N as u64, 2, 0, 0, 0),
        "{report:?}"
    );
    for key in &keys {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}: one committed run");
        assert!(runs(key) <= 8, "{key}: {} runs", runs(key));
    }
    assert_eq!(store.ledger_rows(&poison).await, 0);
    let bodies = BATCH_BODIES.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        bodies < 60,
        "{bodies} body runs for {published} deliveries: the runner batches"
    );
    let letters = dead_letters(&connection, &topology).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().any(|letter| letter
            .reason
            .contains(&format!("order {poison} is invalid"))),
        "{letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|letter| letter.reason.contains("does not decode")),
        "{letters:?}"
    );
    assert_nothing_left(&connection, &topology).await;
}

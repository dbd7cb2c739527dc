//! Redis Streams against the live Redis (127.0.0.1:6379, or `IDEM_TEST_REDIS_URL`) and the
//! live PostgreSQL: duplicates, a consumer killed between commit and ack, poison entries,
//! retries spaced by the backoff, a retry that never heals, graceful shutdown, and the entry
//! id as the key.
//!
//! Every stream, group, table and key is unique to the run; nothing shared is deleted. Each
//! body counts its runs in process ([`idem_tests::count_run`]) and writes one row, in its
//! transaction, to a table of the test's own with no unique key: rows are committed runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use idem_runtime::broker::redis_streams::{
    ATTEMPT_FIELD, ID_FIELD, REASON_FIELD, RedisStreamAcknowledger, RedisStreamConsumer,
    RedisStreamsBatchConsumer, STREAM_FIELD, StreamGroup,
};
use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions, ConsumerReport};
use idem_runtime::{Disposition, HandlerError, PgStore, PgTx, idempotent};
use idem_tests::effects::{Effects as _, TestStore as _};
use idem_tests::{Payment, count_run, runs};
use redis::Value;
use redis::aio::ConnectionManager;

// ---------------------------------------------------------------------------------------------
// Services

fn redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn client() -> redis::Client {
    redis::Client::open(redis_url()).expect("a valid Redis URL")
}

/// A connection, or a loud failure.
async fn redis() -> ConnectionManager {
    let url = redis_url();
    client().get_connection_manager().await.unwrap_or_else(|error| {
        panic!(
            "Redis is not reachable at {url}: {error}. Run scripts/services (or scripts/test), which starts it, or set IDEM_TEST_REDIS_URL."
        )
    })
}

/// The store, and a table of this test's own for the bodies' rows.
async fn pg(label: &str) -> (PgStore, String) {
    init_tracing();
    let store = idem_tests::pg::store().await;
    let table = format!("rs_{label}_{}", idem_tests::unique_int());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (key TEXT NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .expect("create the test's table");
    (store, table)
}

async fn drop_table(store: &PgStore, table: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(store.pool())
        .await
        .expect("drop the test's table");
}

/// Rows per key in `table`.
async fn rows(store: &PgStore, table: &str) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT key, count(*) FROM {table} GROUP BY key"
    )))
    .fetch_all(store.pool())
    .await
    .expect("count the rows");
    rows.into_iter().collect()
}

/// A stream and group unique to this run.
fn fresh_group(label: &str) -> StreamGroup {
    StreamGroup::new(
        format!("idem-test:{}:{label}", idem_tests::unique_key("rs")),
        "idem-test",
    )
}

// ---------------------------------------------------------------------------------------------
// Messages and handlers

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    key: String,
    table: String,
}

impl Order {
    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialize an order")
    }
}

#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the order {0} is refused for good")]
    Refused(String),
    #[error("the order {0} failed for now")]
    Transient(String),
}

impl HandlerError for TestError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Refused(_) => Disposition::DeadLetter,
            Self::Transient(_) => Disposition::Retry,
            Self::Db(error) => idem_runtime::classify_error_chain(error),
        }
    }
}

/// The body every handler shares: count the run, write one row.
async fn record(tx: &mut PgTx<'_>, msg: &Order) -> Result<(), TestError> {
    count_run(&msg.key);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (key) VALUES ($1)",
        msg.table
    )))
    .bind(&msg.key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[idempotent(
    key = "key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.order"
)]
async fn on_order(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

/// The handler of the kill test; the consumer process has the same one.
#[idempotent(key = "key", store = "pg", strategy = "dedup_table", scope = "rs.kill")]
async fn on_kill(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

/// Refuses keys containing `permanent`.
#[idempotent(
    key = "key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.poison"
)]
async fn on_poison(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await?;
    if msg.key.contains("permanent") {
        return Err(TestError::Refused(msg.key));
    }
    Ok(())
}

/// `$message_id` from the producer's `msg-id` field.
#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.by_field"
)]
async fn on_by_field(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

/// Fails (retryably) on its first two runs of a key, then succeeds.
#[idempotent(
    key = "key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.flaky",
    max_attempts = 5
)]
async fn on_flaky(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await?;
    seen(&msg.key);
    if runs(&msg.key) < 3 {
        return Err(TestError::Transient(msg.key));
    }
    Ok(())
}

/// Always fails, retryably.
#[idempotent(
    key = "key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.broken",
    max_attempts = 3
)]
async fn on_broken(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await?;
    seen(&msg.key);
    Err(TestError::Transient(msg.key))
}

/// Slow: after its write, opens the latch `<key>:started` and waits until the test opens
/// `<key>:release`.
#[idempotent(key = "key", store = "pg", strategy = "dedup_table", scope = "rs.slow")]
async fn on_slow(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await?;
    idem_tests::latch(&started_latch(&msg.key)).open();
    idem_tests::latch(&release_latch(&msg.key)).wait().await;
    Ok(())
}

/// Hangs for good on its first run of a key, after its write (and after opening the latch
/// `<key>:started`).
#[idempotent(
    key = "key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.stuck"
)]
async fn on_stuck(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await?;
    idem_tests::latch(&started_latch(&msg.key)).open();
    if runs(&msg.key) == 1 {
        std::future::pending::<()>().await;
    }
    Ok(())
}

#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.by_id"
)]
async fn on_by_id(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

#[idempotent(
    key = "$message_id, key",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.by_id_and_key"
)]
async fn on_by_id_and_key(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

// ---------------------------------------------------------------------------------------------
// Observations

/// When each body ran, per key.
fn seen(key: &str) {
    static_times()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key.to_owned())
        .or_default()
        .push(Instant::now());
}

fn times(key: &str) -> Vec<Instant> {
    static_times()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .cloned()
        .unwrap_or_default()
}

fn static_times() -> &'static Mutex<HashMap<String, Vec<Instant>>> {
    static TIMES: OnceLock<Mutex<HashMap<String, Vec<Instant>>>> = OnceLock::new();
    TIMES.get_or_init(Mutex::default)
}

/// The latch a held body opens once it has started (after its write).
fn started_latch(key: &str) -> String {
    format!("{key}:started")
}

/// The latch the test opens to let a slow body finish.
fn release_latch(key: &str) -> String {
    format!("{key}:release")
}

/// The `attempt` of every `idem.handle` span, per handler scope, in order: the attempt
/// numbers the pipeline saw.
fn attempts(scope: &str) -> Vec<u64> {
    attempts_seen()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(scope)
        .cloned()
        .unwrap_or_default()
}

fn attempts_seen() -> &'static Mutex<HashMap<String, Vec<u64>>> {
    static SEEN: OnceLock<Mutex<HashMap<String, Vec<u64>>>> = OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

/// Records the `scope` and `attempt` of each new `idem.handle` span.
struct AttemptLayer;

#[derive(Default)]
struct HandleFields {
    scope: Option<String>,
    attempt: Option<u64>,
}

impl tracing::field::Visit for HandleFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "scope" {
            self.scope = Some(value.to_owned());
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "attempt" {
            self.attempt = Some(value);
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "attempt" {
            self.attempt = u64::try_from(value).ok();
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "scope" {
            self.scope = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AttemptLayer {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "idem.handle" {
            return;
        }
        let mut fields = HandleFields::default();
        attrs.record(&mut fields);
        if let (Some(scope), Some(attempt)) = (fields.scope, fields.attempt) {
            attempts_seen()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(scope)
                .or_default()
                .push(attempt);
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(AttemptLayer).with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::from_default_env()),
        );
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

// ---------------------------------------------------------------------------------------------
// Redis inspection

async fn pending(conn: &mut ConnectionManager, group: &StreamGroup) -> u64 {
    group.pending(conn).await.expect("XPENDING")
}

/// `(id, delivery count)` of each pending entry.
async fn pending_entries(conn: &mut ConnectionManager, group: &StreamGroup) -> Vec<(String, i64)> {
    let reply: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(group.stream())
        .arg(group.group())
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(conn)
        .await
        .expect("XPENDING detail");
    reply
        .into_iter()
        .map(|(id, _consumer, _idle, count)| (id, count))
        .collect()
}

/// Every entry of a stream, as `(id, field -> value)`.
async fn entries(
    conn: &mut ConnectionManager,
    stream: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    let Value::Array(entries) = reply else {
        panic!("XRANGE replied {reply:?}");
    };
    entries
        .into_iter()
        .map(|entry| {
            let (id, fields): (String, Vec<(String, Vec<u8>)>) =
                redis::from_redis_value(entry).expect("an entry");
            let fields = fields
                .into_iter()
                .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
                .collect();
            (id, fields)
        })
        .collect()
}

async fn xadd(conn: &mut ConnectionManager, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(*value);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// Makes Redis count the pending entries `ids` of `consumer` as idle for an hour (`XCLAIM …
/// IDLE … JUSTID` to the consumer that holds them: no move, no delivery counted), if they have
/// been idle for at least `min_idle`: Redis's clock moved on, instead of a wait for it.
/// Returns the ids it aged.
async fn age(
    conn: &mut ConnectionManager,
    group: &StreamGroup,
    consumer: &str,
    min_idle: Duration,
    ids: &[&str],
) -> Vec<String> {
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(group.stream())
        .arg(group.group())
        .arg(consumer)
        .arg(u64::try_from(min_idle.as_millis()).expect("ms"));
    for id in ids {
        cmd.arg(*id);
    }
    cmd.arg("IDLE").arg(3_600_000).arg("JUSTID");
    cmd.query_async(conn).await.expect("XCLAIM IDLE")
}

/// Waits until the runner has settled `settled` deliveries and the group has nothing
/// pending, then shuts it down and returns its report.
async fn drain_and_stop(
    conn: &mut ConnectionManager,
    group: &StreamGroup,
    stats: &idem_runtime::broker::ConsumerStats,
    settled: u64,
    shutdown: &CancellationToken,
    run: tokio::task::JoinHandle<
        Result<ConsumerReport, idem_runtime::broker::redis_streams::RedisStreamError>,
    >,
) -> ConsumerReport {
    idem_tests::within(
        "the runner to settle the deliveries",
        stats.wait_until(|report| {
            report.processed + report.duplicates + report.dead_lettered >= settled
        }),
    )
    .await;
    idem_tests::eventually("the group has nothing pending", || {
        let mut conn = conn.clone();
        async move { pending(&mut conn, group).await == 0 }
    })
    .await;
    shutdown.cancel();
    idem_tests::within("the runner to return", run)
        .await
        .expect("the runner's task")
        .expect("the runner")
}

// ---------------------------------------------------------------------------------------------
// Tests

/// (a) 200 business messages, each published two to four times, consumed with 8 handlers at
/// once: every body runs once, one row per key, nothing pending, the counts match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_run_once_under_concurrency() {
    let (store, table) = pg("dups").await;
    let mut conn = redis().await;
    let group = fresh_group("dups").with_reclaim_idle(Duration::from_secs(10));
    let keys: Vec<String> = (0..200).map(|_| idem_tests::unique_key("rs-dup")).collect();
    let mut published = 0_u64;
    // Duplicates close together and far apart: two rounds of everything, then extra copies.
    for round in 0..4 {
        for (index, key) in keys.iter().enumerate() {
            let copies = match round {
                0 | 1 => true,
                2 => index % 5 == 0,
                _ => index % 20 == 0,
            };
            if copies {
                let order = Order {
                    key: key.clone(),
                    table: table.clone(),
                };
                group.publish(&mut conn, &order.json()).await.expect("XADD");
                published += 1;
            }
        }
    }
    // Two full rounds, every fifth key once more, every twentieth once more again.
    assert_eq!(published, 200 + 200 + 40 + 10);

    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "dups-1",
        idem_runtime::handler!(on_order),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(8).prefetch(16));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, published, &shutdown, run).await;

    assert_eq!(report.processed, 200, "{report:?}");
    assert_eq!(report.duplicates, published - 200, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.requeued, 0, "{report:?}");
    assert_eq!(report.unsettled, 0, "{report:?}");
    assert_eq!(report.settle_failures, 0, "{report:?}");
    let rows = rows(&store, &table).await;
    assert_eq!(rows.len(), 200);
    for key in &keys {
        assert_eq!(runs(key), 1, "body runs of {key}");
        assert_eq!(rows.get(key), Some(&1), "rows of {key}");
    }
    assert_eq!(pending(&mut conn, &group).await, 0);
    assert!(
        entries(&mut conn, group.dead_letter_stream())
            .await
            .is_empty()
    );
    drop_table(&store, &table).await;
}

/// (b) A consumer process dies after a commit, before its `XACK`; another consumer takes the
/// entry (and those the dead one had read but not handled) over with `XAUTOCLAIM`: the entry
/// is a duplicate, the others run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_commit_and_ack_is_a_duplicate_on_reclaim() {
    let (store, table) = pg("kill").await;
    let mut conn = redis().await;
    let group = fresh_group("kill").with_reclaim_idle(Duration::from_secs(1));
    let keys: Vec<String> = (0..5).map(|_| idem_tests::unique_key("rs-kill")).collect();
    group
        .create(&mut conn, Default::default())
        .await
        .expect("XGROUP CREATE");
    for key in &keys {
        let order = Order {
            key: key.clone(),
            table: table.clone(),
        };
        group.publish(&mut conn, &order.json()).await.expect("XADD");
    }

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis_streams_consumer"))
        .args([group.stream(), group.group(), "doomed", keys[2].as_str()])
        .env("IDEM_TEST_REDIS_URL", redis_url())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer process");
    let status = idem_tests::within("the consumer process to exit", child.wait())
        .await
        .expect("wait for the consumer process");
    assert!(!status.success(), "the consumer process aborts: {status:?}");
    assert_ne!(
        status.code(),
        Some(2),
        "it never saw the message to abort on"
    );

    // The dead consumer committed the first three, acked two, and held the last two unread.
    let committed = rows(&store, &table).await;
    assert_eq!(committed.len(), 3, "{committed:?}");
    for key in &keys[..3] {
        assert_eq!(committed.get(key), Some(&1));
    }
    let held = pending_entries(&mut conn, &group).await;
    assert_eq!(
        held.len(),
        3,
        "the aborted one and the two read after it: {held:?}"
    );
    assert!(held.iter().all(|(_, count)| *count == 1), "{held:?}");
    // The dead consumer's entries idle past the reclaim idle time on Redis's clock, not ours.
    let held_ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        age(&mut conn, &group, "doomed", Duration::ZERO, &held_ids)
            .await
            .len(),
        3
    );

    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "survivor",
        idem_runtime::handler!(on_kill),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(4))
    .with_reclaim_interval(Duration::from_millis(100));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 3, &shutdown, run).await;

    assert_eq!(report.duplicates, 1, "{report:?}");
    assert_eq!(report.processed, 2, "{report:?}");
    assert_eq!(report.dead_lettered + report.requeued + report.unsettled, 0);
    // In this process: the aborted message's body never ran, the two others once.
    assert_eq!(runs(&keys[2]), 0);
    assert_eq!(runs(&keys[3]), 1);
    assert_eq!(runs(&keys[4]), 1);
    let rows = rows(&store, &table).await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.values().all(|count| *count == 1), "{rows:?}");
    assert_eq!(pending(&mut conn, &group).await, 0);
    // The reclaimed ones were second deliveries.
    assert_eq!(attempts("rs.kill").iter().filter(|a| **a == 2).count(), 3);
    drop_table(&store, &table).await;
}

/// (c, g) Undecodable payloads, an entry without the payload field, a permanent failure, and
/// a `$message_id` handler given an entry without an id go to the dead-letter stream, exactly
/// those, with reasons and attempt counts; the good entries around them are processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_entries_are_dead_lettered_with_reasons() {
    let (store, table) = pg("poison").await;
    let mut conn = redis().await;
    let group = fresh_group("poison");
    let order = |label: &str| Order {
        key: idem_tests::unique_key(label),
        table: table.clone(),
    };
    let good_before = order("rs-good");
    let permanent = order("rs-permanent");
    let good_after = order("rs-good");
    let mut poison: HashMap<String, &str> = HashMap::new();
    group
        .publish(&mut conn, &good_before.json())
        .await
        .expect("XADD");
    let id = group.publish(&mut conn, b"{not json").await.expect("XADD");
    poison.insert(id, "does not decode");
    let id = group
        .publish(&mut conn, br#"{"key": "no table"}"#)
        .await
        .expect("XADD");
    poison.insert(id, "does not decode into the handler's message type `broker_redis_streams::Order`: missing field `table`");
    let id = xadd(&mut conn, group.stream(), &[("body", b"{}")]).await;
    poison.insert(id, "does not decode");
    let id = group
        .publish(&mut conn, &permanent.json())
        .await
        .expect("XADD");
    poison.insert(id, "is refused for good");
    group
        .publish(&mut conn, &good_after.json())
        .await
        .expect("XADD");

    // `$message_id` from a producer's field: one entry without it.
    let by_field = fresh_group("by-field").with_message_id_field("msg-id");
    let first = order("rs-field");
    let again = Order {
        key: idem_tests::unique_key("rs-field-again"),
        table: table.clone(),
    };
    let anonymous = order("rs-anonymous");
    let message_id = idem_tests::unique_key("msg");
    xadd(
        &mut conn,
        by_field.stream(),
        &[
            ("payload", &first.json()),
            ("msg-id", message_id.as_bytes()),
        ],
    )
    .await;
    // A re-publish of the same message (same producer id, new entry): a duplicate.
    xadd(
        &mut conn,
        by_field.stream(),
        &[
            ("payload", &again.json()),
            ("msg-id", message_id.as_bytes()),
        ],
    )
    .await;
    let anonymous_id = xadd(
        &mut conn,
        by_field.stream(),
        &[("payload", &anonymous.json())],
    )
    .await;

    let shutdown = CancellationToken::new();
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "poison-1",
        idem_runtime::handler!(on_poison),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(3));
    let stats = consumer.stats();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let by_field_consumer = RedisStreamConsumer::new(
        client(),
        by_field.clone(),
        "by-field-1",
        idem_runtime::handler!(on_by_field),
        store.clone(),
    );
    let by_field_stats = by_field_consumer.stats();
    let by_field_shutdown = CancellationToken::new();
    let by_field_run = tokio::spawn(by_field_consumer.run(by_field_shutdown.clone()));

    let report = drain_and_stop(&mut conn, &group, &stats, 6, &shutdown, run).await;
    assert_eq!(report.processed, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 4, "{report:?}");
    assert_eq!(
        report.duplicates + report.requeued + report.unsettled,
        0,
        "{report:?}"
    );
    let by_field_report = drain_and_stop(
        &mut conn,
        &by_field,
        &by_field_stats,
        3,
        &by_field_shutdown,
        by_field_run,
    )
    .await;
    assert_eq!(by_field_report.processed, 1, "{by_field_report:?}");
    assert_eq!(by_field_report.duplicates, 1, "{by_field_report:?}");
    assert_eq!(by_field_report.dead_lettered, 1, "{by_field_report:?}");

    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    for (_, fields) in &letters {
        let original = &fields[ID_FIELD];
        let expected = poison
            .remove(original)
            .unwrap_or_else(|| panic!("only poison is dead-lettered: {fields:?}"));
        assert!(
            fields[REASON_FIELD].contains(expected),
            "{expected:?} in {fields:?}"
        );
        assert_eq!(fields[ATTEMPT_FIELD], "1", "{fields:?}");
        assert_eq!(fields[STREAM_FIELD], group.stream());
    }
    assert!(poison.is_empty(), "not dead-lettered: {poison:?}");
    // The permanent failure's body ran and rolled back; the good ones committed once.
    assert_eq!(runs(&permanent.key), 1);
    let rows = rows(&store, &table).await;
    assert_eq!(rows.get(&good_before.key), Some(&1));
    assert_eq!(rows.get(&good_after.key), Some(&1));
    assert_eq!(rows.get(&permanent.key), None);

    let letters = entries(&mut conn, by_field.dead_letter_stream()).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let fields = &letters[0].1;
    assert_eq!(fields[ID_FIELD], anonymous_id);
    assert!(
        fields[REASON_FIELD].contains("keys on `$message_id`, but the delivery has no message id"),
        "{fields:?}"
    );
    assert_eq!(fields[ATTEMPT_FIELD], "1");
    assert_eq!(
        fields["payload"],
        String::from_utf8_lossy(&anonymous.json())
    );
    // `first` and its re-publish share a message id: whichever the consumer ran first is
    // processed, the other is a duplicate (they may run at once; the gate picks one).
    assert_eq!(
        runs(&first.key) + runs(&again.key),
        1,
        "a re-publish with the same message id"
    );
    assert_eq!(runs(&anonymous.key), 0);
    assert_eq!(
        rows.get(&first.key).copied().unwrap_or(0) + rows.get(&again.key).copied().unwrap_or(0),
        1
    );
    assert_eq!(pending(&mut conn, &group).await, 0);
    assert_eq!(pending(&mut conn, &by_field).await, 0);
    drop_table(&store, &table).await;
}

/// (d) A handler that fails twice, then succeeds: attempts 1, 2, 3, spaced by at least the
/// backoff's lower bounds (0.5 s, then 1 s), one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_are_spaced_by_the_backoff_and_counted() {
    let (store, table) = pg("flaky").await;
    let mut conn = redis().await;
    let group = fresh_group("flaky").with_reclaim_idle(Duration::from_secs(5));
    let order = Order {
        key: idem_tests::unique_key("rs-flaky"),
        table: table.clone(),
    };
    let entry_id = group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "flaky-1",
        idem_runtime::handler!(on_flaky),
        store.clone(),
    )
    .with_reclaim_interval(Duration::from_millis(20));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    // Waits for Redis's reclaim idle time: each requeue leaves the entry reclaimable after its
    // backoff delay, on the server's clock; the spacing it gives is what this test measures.
    let report = drain_and_stop(&mut conn, &group, &stats, 1, &shutdown, run).await;

    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(report.requeued, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(runs(&order.key), 3);
    assert_eq!(attempts("rs.flaky"), [1, 2, 3]);
    let times = times(&order.key);
    assert_eq!(times.len(), 3);
    let first_gap = times[1] - times[0];
    let second_gap = times[2] - times[1];
    assert!(first_gap >= Duration::from_millis(500), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(1000), "{second_gap:?}");
    // Not stuck (loose: a loaded machine stretches the sweeps; the lower bounds are the point).
    assert!(first_gap < Duration::from_secs(10), "{first_gap:?}");
    assert!(second_gap < Duration::from_secs(10), "{second_gap:?}");
    assert_eq!(rows(&store, &table).await.get(&order.key), Some(&1));
    assert_eq!(pending(&mut conn, &group).await, 0);
    // The same entry all along (never re-published): the stream holds the original entry and
    // nothing else, gone from the pending list, never dead-lettered.
    assert!(
        entries(&mut conn, group.dead_letter_stream())
            .await
            .is_empty()
    );
    let ids: Vec<String> = entries(&mut conn, group.stream())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, [entry_id]);
    drop_table(&store, &table).await;
}

/// (e) A retryable failure that never heals is dead-lettered after `max_attempts` (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_that_never_heals_is_dead_lettered_after_max_attempts() {
    let (store, table) = pg("broken").await;
    let mut conn = redis().await;
    // Running entries are touched every 10 s; requeued ones idle for at least 28 s (30 s less a
    // backoff of at most 2 s): aging entries idle for 20 s takes only requeued ones.
    let group = fresh_group("broken").with_reclaim_idle(Duration::from_secs(30));
    let order = Order {
        key: idem_tests::unique_key("rs-broken"),
        table: table.clone(),
    };
    let entry_id = group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "broken-1",
        idem_runtime::handler!(on_broken),
        store.clone(),
    )
    .with_reclaim_interval(Duration::from_millis(20));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    // Each requeue's backoff is run out on Redis's clock rather than waited for. An entry the
    // runner has already reclaimed is idle for less than 20 s, and is left alone.
    for requeues in 1..=2 {
        idem_tests::within(
            "the runner to requeue the entry",
            stats.wait_until(|report| report.requeued >= requeues),
        )
        .await;
        age(
            &mut conn,
            &group,
            "broken-1",
            Duration::from_secs(20),
            &[entry_id.as_str()],
        )
        .await;
    }
    let report = drain_and_stop(&mut conn, &group, &stats, 1, &shutdown, run).await;

    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.requeued, 2, "{report:?}");
    assert_eq!(report.processed, 0, "{report:?}");
    assert_eq!(runs(&order.key), 3);
    assert_eq!(attempts("rs.broken"), [1, 2, 3]);
    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let fields = &letters[0].1;
    assert_eq!(fields[ID_FIELD], entry_id);
    assert_eq!(fields[ATTEMPT_FIELD], "3");
    assert!(
        fields[REASON_FIELD].starts_with("gave up after 3 attempts: "),
        "{fields:?}"
    );
    assert!(
        fields[REASON_FIELD].contains("failed for now"),
        "{fields:?}"
    );
    assert_eq!(fields["payload"], String::from_utf8_lossy(&order.json()));
    assert_eq!(rows(&store, &table).await.get(&order.key), None);
    assert_eq!(pending(&mut conn, &group).await, 0);
    drop_table(&store, &table).await;
}

/// (f) Shutdown while a slow handler runs: it finishes, is acked, `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_a_running_handler_finish_and_ack() {
    let (store, table) = pg("slow").await;
    let mut conn = redis().await;
    let group = fresh_group("slow");
    let order = Order {
        key: idem_tests::unique_key("rs-slow"),
        table: table.clone(),
    };
    group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "slow-1",
        idem_runtime::handler!(on_slow),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().shutdown_grace(Duration::from_secs(20)));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    idem_tests::within(
        "the slow body to start",
        idem_tests::latch(&started_latch(&order.key)).wait(),
    )
    .await;
    let cancelled_at = Instant::now();
    shutdown.cancel();
    // The body is held: its entry is not acked yet (a round trip for the runner to see the
    // cancellation), and `run` has not returned without it.
    assert_eq!(
        pending(&mut conn, &group).await,
        1,
        "acked before the body ended"
    );
    assert!(!run.is_finished(), "run waited for the handler");
    idem_tests::latch(&release_latch(&order.key)).open();
    let report = idem_tests::within("the runner to return", run)
        .await
        .expect("the runner's task")
        .expect("the runner");
    assert!(
        cancelled_at.elapsed() <= Duration::from_secs(10),
        "run returned promptly"
    );
    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(report.unsettled, 0, "{report:?}");
    assert_eq!(
        pending(&mut conn, &group).await,
        0,
        "acked before run returned"
    );
    assert_eq!(rows(&store, &table).await.get(&order.key), Some(&1));
    drop_table(&store, &table).await;
}

/// (f) Shutdown with a tiny grace while a handler hangs: the entry is not acked, and the next
/// consumer gets it (its body runs again, as the first never committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_cancelled_at_the_deadline_leaves_its_entry_pending() {
    let (store, table) = pg("stuck").await;
    let mut conn = redis().await;
    let group = fresh_group("stuck").with_reclaim_idle(Duration::from_secs(30));
    let order = Order {
        key: idem_tests::unique_key("rs-stuck"),
        table: table.clone(),
    };
    let entry_id = group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "stuck-1",
        idem_runtime::handler!(on_stuck),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().shutdown_grace(Duration::from_millis(200)));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    idem_tests::within(
        "the stuck body to start",
        idem_tests::latch(&started_latch(&order.key)).wait(),
    )
    .await;
    shutdown.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns after the grace")
        .expect("the runner's task")
        .expect("the runner");
    assert_eq!(report.unsettled, 1, "{report:?}");
    assert_eq!(report.processed, 0, "{report:?}");
    // Still pending, delivered once: not acked.
    assert_eq!(
        pending_entries(&mut conn, &group).await,
        [(entry_id.clone(), 1)]
    );
    // Handed back: idle for the whole reclaim idle time already, reclaimable at once.
    let idle = pending_idle(&mut conn, &group).await;
    assert_eq!(idle.len(), 1);
    assert!(idle[0].1 >= 30_000, "{idle:?}");

    // The next consumer reclaims it at once and runs it: well within the 30 s idle time.
    let started = Instant::now();
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "stuck-2",
        idem_runtime::handler!(on_stuck),
        store.clone(),
    )
    .with_reclaim_interval(Duration::from_millis(50));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 1, &shutdown, run).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "reclaimed after {:?}",
        started.elapsed()
    );
    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(runs(&order.key), 2);
    assert_eq!(rows(&store, &table).await.get(&order.key), Some(&1));
    assert_eq!(pending(&mut conn, &group).await, 0);
    drop_table(&store, &table).await;
}

/// (g) `$message_id` is `<stream>/<entry id>`, alone and with a field: distinct entries of one payload
/// are distinct messages; two deliveries of one entry are one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_entry_id_is_the_message_id() {
    let (store, table) = pg("by_id").await;
    let mut conn = redis().await;
    let alone = fresh_group("by-id");
    let combined = fresh_group("by-id-and-key");
    let twin = Order {
        key: idem_tests::unique_key("rs-twin"),
        table: table.clone(),
    };
    let combined_twin = Order {
        key: idem_tests::unique_key("rs-combined-twin"),
        table: table.clone(),
    };
    for _ in 0..2 {
        alone.publish(&mut conn, &twin.json()).await.expect("XADD");
        combined
            .publish(&mut conn, &combined_twin.json())
            .await
            .expect("XADD");
    }

    let alone_consumer = RedisStreamConsumer::new(
        client(),
        alone.clone(),
        "by-id-1",
        idem_runtime::handler!(on_by_id),
        store.clone(),
    );
    let alone_stats = alone_consumer.stats();
    let alone_shutdown = CancellationToken::new();
    let alone_run = tokio::spawn(alone_consumer.run(alone_shutdown.clone()));
    let combined_consumer = RedisStreamConsumer::new(
        client(),
        combined.clone(),
        "by-id-and-key-1",
        idem_runtime::handler!(on_by_id_and_key),
        store.clone(),
    );
    let combined_stats = combined_consumer.stats();
    let combined_shutdown = CancellationToken::new();
    let combined_run = tokio::spawn(combined_consumer.run(combined_shutdown.clone()));
    let report = drain_and_stop(
        &mut conn,
        &alone,
        &alone_stats,
        2,
        &alone_shutdown,
        alone_run,
    )
    .await;
    assert_eq!(report.processed, 2, "two entries, two messages: {report:?}");
    let report = drain_and_stop(
        &mut conn,
        &combined,
        &combined_stats,
        2,
        &combined_shutdown,
        combined_run,
    )
    .await;
    assert_eq!(report.processed, 2, "{report:?}");
    assert_eq!(runs(&twin.key), 2);
    assert_eq!(runs(&combined_twin.key), 2);

    // One entry delivered twice, through a service's own loop: the second is a duplicate.
    for (group, label) in [(&alone, "rs-own"), (&combined, "rs-own-combined")] {
        let order = Order {
            key: idem_tests::unique_key(label),
            table: table.clone(),
        };
        let entry_id = group.publish(&mut conn, &order.json()).await.expect("XADD");
        let mut read = group
            .read(&mut conn, "own-loop", 10, None)
            .await
            .expect("XREADGROUP");
        assert_eq!(read.len(), 1);
        let delivery = read.remove(0);
        assert_eq!(delivery.id(), entry_id);
        assert_eq!(delivery.delivery_count(), 1);
        let first = RedisStreamAcknowledger::new(conn.clone(), group, "own-loop", delivery.clone());
        let second = RedisStreamAcknowledger::new(conn.clone(), group, "own-loop", delivery);
        assert_eq!(
            idem_runtime::Acknowledger::message_id(&first),
            Some(format!("{}/{entry_id}", group.stream()).as_str())
        );
        let handle = |ack| {
            let store = store.clone();
            let order = order.clone();
            let by_id_alone = std::ptr::eq(group, &alone);
            async move {
                if by_id_alone {
                    on_by_id(&store, order, ack).await
                } else {
                    on_by_id_and_key(&store, order, ack).await
                }
            }
        };
        assert!(handle(first).await.expect("first").is_processed());
        assert!(handle(second).await.expect("second").is_duplicate());
        assert_eq!(runs(&order.key), 1);
        assert_eq!(pending(&mut conn, group).await, 0);
    }
    let rows = rows(&store, &table).await;
    assert_eq!(rows.get(&twin.key), Some(&2));
    assert_eq!(rows.values().sum::<i64>(), 6, "{rows:?}");
    drop_table(&store, &table).await;
}

#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rs.sharded"
)]
async fn on_sharded(tx: &mut PgTx<'_>, msg: Order) -> Result<(), TestError> {
    record(tx, &msg).await
}

/// (g) One handler keyed on `$message_id` consumes two shards of a stream whose entries have
/// the same id: the message id names the stream, so both are processed (neither is taken for
/// a duplicate of the other and acked without its effects).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn equal_entry_ids_on_two_streams_are_two_messages() {
    let (store, table) = pg("sharded").await;
    let mut conn = redis().await;
    let base = idem_tests::unique_key("rs-shards");
    let shards = [0, 1]
        .map(|shard| StreamGroup::new(format!("idem-test:{base}:orders:{{{shard}}}"), "idem-test"));
    let orders = [0, 1].map(|_| Order {
        key: idem_tests::unique_key("rs-shard"),
        table: table.clone(),
    });
    for (group, order) in shards.iter().zip(&orders) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(group.stream())
            .arg("1700000000000-0")
            .arg(group.payload_field())
            .arg(order.json());
        let id: String = cmd.query_async(&mut conn).await.expect("XADD");
        assert_eq!(id, "1700000000000-0");
    }
    let mut reports = Vec::new();
    for (index, group) in shards.iter().enumerate() {
        let consumer = RedisStreamConsumer::new(
            client(),
            group.clone(),
            format!("shard-{index}"),
            idem_runtime::handler!(on_sharded),
            store.clone(),
        );
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(consumer.run(shutdown.clone()));
        reports.push(drain_and_stop(&mut conn, group, &stats, 1, &shutdown, run).await);
    }
    for report in &reports {
        assert_eq!(report.processed, 1, "{reports:?}");
        assert_eq!(report.duplicates, 0, "{reports:?}");
    }
    let rows = rows(&store, &table).await;
    for order in &orders {
        assert_eq!(runs(&order.key), 1, "{rows:?}");
        assert_eq!(rows.get(&order.key), Some(&1), "{rows:?}");
    }
    drop_table(&store, &table).await;
}

/// A dead letter that cannot be written (the dead-letter key holds a string: `WRONGTYPE`)
/// leaves the entry pending, never acked without its dead letter; the settle is counted as
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_that_cannot_be_written_leaves_the_entry_pending() {
    let mut conn = redis().await;
    let (store, table) = pg("dl_refused").await;
    let group = fresh_group("dl-refused");
    let _: () = redis::cmd("SET")
        .arg(group.dead_letter_stream())
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let entry_id = group.publish(&mut conn, b"{not json").await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "dl-refused-1",
        idem_runtime::handler!(on_poison),
        store.clone(),
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    idem_tests::within(
        "the dead letter to be refused",
        stats.wait_until(|report| report.settle_failures >= 1),
    )
    .await;
    shutdown.cancel();
    let report = run.await.expect("the runner's task").expect("the runner");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.settle_failures, 1, "{report:?}");
    // Not lost: still pending, and still in the stream.
    assert_eq!(
        pending_entries(&mut conn, &group).await,
        [(entry_id.clone(), 1)]
    );
    assert_eq!(
        entries(&mut conn, group.stream())
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
        [entry_id]
    );
    let _: () = redis::cmd("DEL")
        .arg(group.dead_letter_stream())
        .query_async(&mut conn)
        .await
        .expect("DEL");
    drop_table(&store, &table).await;
}

/// An entry with thousands of fields is dead-lettered with its payload, the idem fields and
/// a truncation marker (copying every field would overflow the script's argument unpacking).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_with_thousands_of_fields_is_dead_lettered_truncated() {
    let mut conn = redis().await;
    let (store, table) = pg("dl_wide").await;
    let group = fresh_group("dl-wide");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(group.stream())
        .arg("*")
        .arg("payload")
        .arg("{not json");
    for index in 0..5000 {
        cmd.arg(format!("f{index}")).arg(index);
    }
    let entry_id: String = cmd.query_async(&mut conn).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "dl-wide-1",
        idem_runtime::handler!(on_poison),
        store.clone(),
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 1, &shutdown, run).await;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 1);
    let fields = &letters[0].1;
    assert_eq!(fields[ID_FIELD], entry_id);
    assert_eq!(fields["payload"], "{not json");
    assert!(fields.contains_key("idem-truncated"), "{fields:?}");
    assert!(!fields.contains_key("f0"), "{fields:?}");
    drop_table(&store, &table).await;
}

/// An entry whose field name is not UTF-8, read in one batch between good ones: the good
/// ones are processed, the odd one (no payload field) is dead-lettered with its fields copied
/// byte for byte; the batch is not failed, nothing is stranded in the pending list.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_utf8_field_name_does_not_fail_the_batch() {
    let (store, table) = pg("bytes").await;
    let mut conn = redis().await;
    let group = fresh_group("bytes");
    let order = |label: &str| Order {
        key: idem_tests::unique_key(label),
        table: table.clone(),
    };
    let good = [order("rs-bytes"), order("rs-bytes")];
    group
        .publish(&mut conn, &good[0].json())
        .await
        .expect("XADD");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(group.stream())
        .arg("*")
        .arg(&b"\xff\xfename"[..])
        .arg("value");
    let odd_id: String = cmd.query_async(&mut conn).await.expect("XADD");
    group
        .publish(&mut conn, &good[1].json())
        .await
        .expect("XADD");

    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "bytes-1",
        idem_runtime::handler!(on_order),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().prefetch(16));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 3, &shutdown, run).await;
    assert_eq!(report.processed, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    for order in &good {
        assert_eq!(runs(&order.key), 1);
    }
    let letters: Value = redis::cmd("XRANGE")
        .arg(group.dead_letter_stream())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    type RawFields = Vec<(Vec<u8>, Vec<u8>)>;
    let letters: Vec<(String, RawFields)> = redis::from_redis_value(letters).expect("entries");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let fields = &letters[0].1;
    assert!(
        fields.contains(&(b"\xff\xfename".to_vec(), b"value".to_vec())),
        "{fields:?}"
    );
    assert!(
        fields.contains(&(ID_FIELD.as_bytes().to_vec(), odd_id.into_bytes())),
        "{fields:?}"
    );
    drop_table(&store, &table).await;
}

/// A service's own loop reads the same mix: `read` returns all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_loop_reads_an_entry_with_a_non_utf8_field_name() {
    let mut conn = redis().await;
    let group = fresh_group("bytes-own");
    group
        .create(&mut conn, Default::default())
        .await
        .expect("XGROUP CREATE");
    group.publish(&mut conn, b"1").await.expect("XADD");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(group.stream()).arg("*").arg(&b"\xff"[..]).arg("v");
    let _: String = cmd.query_async(&mut conn).await.expect("XADD");
    group.publish(&mut conn, b"3").await.expect("XADD");
    let read = group
        .read(&mut conn, "own", 10, None)
        .await
        .expect("XREADGROUP");
    assert_eq!(read.len(), 3);
    assert_eq!(read[0].payload(&group), b"1");
    assert_eq!(read[1].field("payload"), None);
    assert_eq!(read[2].payload(&group), b"3");
}

/// Out-of-range durations in the configuration are clamped: no overflow panic in `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_durations_do_not_panic() {
    let (store, table) = pg("huge").await;
    let mut conn = redis().await;
    // Touches every second: the reads block no longer than that.
    let group = fresh_group("huge").with_reclaim_idle(Duration::from_secs(3));
    let order = Order {
        key: idem_tests::unique_key("rs-huge"),
        table: table.clone(),
    };
    group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "huge-1",
        idem_runtime::handler!(on_order),
        store.clone(),
    )
    .with_block(Duration::MAX)
    .with_reclaim_interval(Duration::MAX);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 1, &shutdown, run).await;
    assert_eq!(report.processed, 1, "{report:?}");
    drop_table(&store, &table).await;
}

/// `(id, idle ms)` of each pending entry.
async fn pending_idle(conn: &mut ConnectionManager, group: &StreamGroup) -> Vec<(String, i64)> {
    let reply: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(group.stream())
        .arg(group.group())
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(conn)
        .await
        .expect("XPENDING detail");
    reply
        .into_iter()
        .map(|(id, _consumer, idle, _count)| (id, idle))
        .collect()
}

/// While shutdown waits for a running handler, its entry is still kept fresh: its idle time
/// stays under the reclaim idle time, so no other consumer takes it over mid-drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_are_kept_fresh_while_shutdown_drains() {
    let (store, table) = pg("drain_touch").await;
    let mut conn = redis().await;
    let reclaim_idle = Duration::from_millis(900);
    let group = fresh_group("drain-touch").with_reclaim_idle(reclaim_idle);
    let order = Order {
        key: idem_tests::unique_key("rs-drain-touch"),
        table: table.clone(),
    };
    let entry_id = group.publish(&mut conn, &order.json()).await.expect("XADD");
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "drain-touch-1",
        idem_runtime::handler!(on_slow),
        store.clone(),
    )
    .with_options(
        // One handler: while it runs, the runner only waits for a free slot (no reads, no
        // reclaims), so it sees the cancellation at once.
        ConsumerOptions::default()
            .concurrency(1)
            .shutdown_grace(Duration::from_secs(20)),
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    idem_tests::within(
        "the slow body to start",
        idem_tests::latch(&started_latch(&order.key)).wait(),
    )
    .await;
    shutdown.cancel();
    // Instead of a drain longer than the reclaim idle time: the entry is aged on Redis's clock
    // (as if it had gone an hour untouched), and the draining runner must touch it within the
    // reclaim idle time. Twice: a touch already under way at the cancellation may answer the
    // first.
    let reclaim_idle_ms = i64::try_from(reclaim_idle.as_millis()).expect("ms");
    for _ in 0..2 {
        let aged = age(
            &mut conn,
            &group,
            "drain-touch-1",
            Duration::ZERO,
            &[entry_id.as_str()],
        )
        .await;
        assert_eq!(aged, std::slice::from_ref(&entry_id));
        let aged_at = Instant::now();
        idem_tests::eventually("the draining runner to touch its entry", || {
            let mut conn = conn.clone();
            let group = &group;
            async move {
                matches!(
                    pending_idle(&mut conn, group).await.as_slice(),
                    [(_, idle)] if *idle < reclaim_idle_ms
                )
            }
        })
        .await;
        let most_idle = aged_at.elapsed();
        assert!(!run.is_finished(), "the drain waits for the held body");
        assert!(
            most_idle < reclaim_idle,
            "the entry went {most_idle:?} untouched during the drain"
        );
    }
    idem_tests::latch(&release_latch(&order.key)).open();
    let report = idem_tests::within("the runner to return", run)
        .await
        .expect("the runner's task")
        .expect("the runner");
    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(pending(&mut conn, &group).await, 0);
    drop_table(&store, &table).await;
}

/// An entry deleted from the stream (`XDEL`, `XTRIM`, `MAXLEN`) while pending: the reclaim
/// that finds it gone writes a stub dead letter with its id, so nothing disappears silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_deleted_while_pending_leaves_a_stub_dead_letter() {
    let mut conn = redis().await;
    let group = fresh_group("deleted").with_reclaim_idle(Duration::from_millis(1));
    group
        .create(&mut conn, Default::default())
        .await
        .expect("XGROUP CREATE");
    let entry_id = group.publish(&mut conn, b"{}").await.expect("XADD");
    let read = group
        .read(&mut conn, "own", 10, None)
        .await
        .expect("XREADGROUP");
    assert_eq!(read.len(), 1);
    // Idle past the (1 ms) reclaim idle time on Redis's clock, rather than after a wait.
    assert_eq!(
        age(
            &mut conn,
            &group,
            "own",
            Duration::ZERO,
            &[entry_id.as_str()]
        )
        .await,
        std::slice::from_ref(&entry_id)
    );
    let deleted: i64 = redis::cmd("XDEL")
        .arg(group.stream())
        .arg(&entry_id)
        .query_async(&mut conn)
        .await
        .expect("XDEL");
    assert_eq!(deleted, 1);
    let reclaimed = group
        .reclaim(&mut conn, "other", 10)
        .await
        .expect("XAUTOCLAIM");
    assert!(reclaimed.is_empty(), "{reclaimed:?}");
    assert_eq!(pending(&mut conn, &group).await, 0);
    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let fields = &letters[0].1;
    assert_eq!(fields[ID_FIELD], entry_id);
    assert_eq!(fields[STREAM_FIELD], group.stream());
    assert_eq!(
        fields[REASON_FIELD],
        "entry deleted from the stream before it was settled"
    );
}

/// A service's own loop dead-letters an entry it cannot decode with `dead_letter_now`, and
/// sweeps the pending list with `reclaim_from`, continuing from the cursor it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_loop_dead_letters_now_and_sweeps_with_a_cursor() {
    let mut conn = redis().await;
    let group = fresh_group("own-dl").with_reclaim_idle(Duration::from_millis(1));
    group
        .create(&mut conn, Default::default())
        .await
        .expect("XGROUP CREATE");
    let entry_id = group.publish(&mut conn, b"{not json").await.expect("XADD");
    let mut read = group
        .read(&mut conn, "own", 10, None)
        .await
        .expect("XREADGROUP");
    let delivery = read.remove(0);
    let error = serde_json::from_slice::<Order>(delivery.payload(&group)).expect_err("poison");
    RedisStreamAcknowledger::new(conn.clone(), &group, "own", delivery)
        .dead_letter_now(&format!("undecodable: {error}"))
        .await
        .expect("dead-lettered");
    assert_eq!(pending(&mut conn, &group).await, 0);
    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].1[ID_FIELD], entry_id);
    assert_eq!(letters[0].1[ATTEMPT_FIELD], "1");
    assert!(letters[0].1[REASON_FIELD].starts_with("undecodable: "));

    // 25 pending entries, swept 2 at a time (XAUTOCLAIM looks at 20 per call): the cursor
    // carries the sweep past the first page.
    let mut ids = Vec::new();
    for index in 0..25 {
        ids.push(
            group
                .publish(&mut conn, format!("{index}").as_bytes())
                .await
                .expect("XADD"),
        );
    }
    assert_eq!(
        group
            .read(&mut conn, "own", 100, None)
            .await
            .expect("XREADGROUP")
            .len(),
        25
    );
    // Idle past the (1 ms) reclaim idle time on Redis's clock, rather than after a wait.
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        age(&mut conn, &group, "own", Duration::ZERO, &ids)
            .await
            .len(),
        25
    );
    let mut cursor = String::from("0-0");
    let mut reclaimed = 0;
    for _ in 0..100 {
        let (next, page) = group
            .reclaim_from(&mut conn, "other", &cursor, 2)
            .await
            .expect("XAUTOCLAIM");
        reclaimed += page.len();
        cursor = next;
        if cursor == "0-0" {
            break;
        }
    }
    assert_eq!(cursor, "0-0");
    assert_eq!(reclaimed, 25);
}

// ---------------------------------------------------------------------------------------------
// A Redis `lock` handler under the runner

/// Gated on Redis, not PostgreSQL: the handler takes only the message.
#[idempotent(
    key = "key",
    store = "redis",
    strategy = "lock",
    scope = "rs.redis_lock"
)]
async fn on_locked(msg: Order) -> Result<(), TestError> {
    count_run(&msg.key);
    // Yield a few times, so that twins handled by the two runners overlap in the body.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Handlers on the Redis store run under the broker runners like any other (`store::Backend`):
/// 100 business messages, each published three times in a row, consumed by 8 handlers at once,
/// so that copies of one key overlap: every body runs once, every copy is acked as processed or
/// duplicate (a copy that found its twin's live lease was requeued, and came back a duplicate),
/// nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_lock_handler_runs_under_the_runner() {
    let store = idem_runtime::RedisStore::connect(&redis_url())
        .await
        .expect("the Redis store");
    let mut conn = redis().await;
    let group = fresh_group("lock").with_reclaim_idle(Duration::from_secs(10));
    let keys: Vec<String> = (0..100)
        .map(|_| idem_tests::unique_key("rs-lock"))
        .collect();
    for key in &keys {
        for _ in 0..3 {
            let order = Order {
                key: key.clone(),
                table: String::new(),
            };
            group.publish(&mut conn, &order.json()).await.expect("XADD");
        }
    }
    let consumer = RedisStreamConsumer::new(
        client(),
        group.clone(),
        "lock-1",
        idem_runtime::handler!(on_locked),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(8).prefetch(16))
    .with_reclaim_interval(Duration::from_millis(100));
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, 300, &shutdown, run).await;

    assert_eq!(report.processed, 100, "{report:?}");
    assert_eq!(report.duplicates, 200, "{report:?}");
    assert_eq!(report.dead_lettered + report.unsettled, 0, "{report:?}");
    assert_eq!(report.settle_failures, 0, "{report:?}");
    // Adjacent copies under 8 handlers overlap: some found a live lease (162 of 200 here).
    assert!(
        report.requeued > 0,
        "no copy met its twin's lease: {report:?}"
    );
    for key in &keys {
        assert_eq!(runs(key), 1, "body runs of {key}");
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
    scope = "rs.batch",
    batch
)]
async fn on_batch(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), TestError> {
    BATCH_BODIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for msg in msgs {
        count_run(&msg.order_id);
        tx.ledger(&msg.order_id, msg.amount)
            .await
            .map_err(|error| match error {
                idem_tests::AppError::Db(error) => TestError::Db(error),
                idem_tests::AppError::Transient(key) => TestError::Transient(key),
            })?;
        if msg.amount < 0 {
            return Err(TestError::Refused(msg.order_id.clone()));
        }
    }
    Ok(())
}

/// Batch mode: 300 orders, each published twice (every third copy right behind its original,
/// the rest one pass later), a permanent failure and an undecodable payload among them,
/// consumed in batches of up to 100, two at once. Each effect once, the two poison entries
/// dead-lettered with their reasons, every other entry acked (nothing pending), in far fewer
/// body runs than entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_mode_each_effect_once_and_poison_dead_lettered() {
    let (store, table) = pg("batch").await;
    let mut conn = redis().await;
    let group = fresh_group("batch");

    const N: usize = 300;
    let keys: Vec<String> = (0..N).map(|_| idem_tests::unique_key("rs-batch")).collect();
    let poison = idem_tests::unique_key("rs-batch-poison");
    let undecodable = format!(
        r#"{{"order_id": "{}""#,
        idem_tests::unique_key("rs-batch-undecodable")
    );
    let json = |key: &str, amount: i64| {
        serde_json::to_vec(&Payment::new(key, amount)).expect("serialize a payment")
    };
    let mut letters_expected: HashMap<String, String> = HashMap::new();
    let mut published = 0_u64;
    for (i, key) in keys.iter().enumerate() {
        group.publish(&mut conn, &json(key, 1)).await.expect("XADD");
        if i == N / 2 {
            let id = group
                .publish(&mut conn, &json(&poison, -1))
                .await
                .expect("XADD");
            letters_expected.insert(id, format!("the order {poison} is refused for good"));
            let id = group
                .publish(&mut conn, undecodable.as_bytes())
                .await
                .expect("XADD");
            letters_expected.insert(id, "does not decode".to_owned());
            published += 2;
        }
        // Every third key's copy right behind it (the same batch), the rest one pass later.
        if i % 3 == 0 {
            group.publish(&mut conn, &json(key, 1)).await.expect("XADD");
            published += 1;
        }
        published += 1;
    }
    for (i, key) in keys.iter().enumerate() {
        if i % 3 != 0 {
            group.publish(&mut conn, &json(key, 1)).await.expect("XADD");
            published += 1;
        }
    }
    assert_eq!(published, 2 * N as u64 + 2);

    let consumer = RedisStreamsBatchConsumer::new(
        client(),
        group.clone(),
        "batch-1",
        idem_runtime::batch_handler!(on_batch),
        store.clone(),
    )
    .with_options(ConsumerOptions::default().concurrency(2))
    .with_batch(
        BatchOptions::default()
            .max_size(100)
            .max_wait(Duration::from_millis(50)),
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));
    let report = drain_and_stop(&mut conn, &group, &stats, published, &shutdown, run).await;

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
    assert_eq!(store.ledger_rows(&poison).await, 0, "rolled back");
    let bodies = BATCH_BODIES.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        bodies < 60,
        "{bodies} body runs for {published} entries: the runner batches"
    );
    let letters = entries(&mut conn, group.dead_letter_stream()).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (_, fields) in &letters {
        let expected = letters_expected
            .remove(&fields[ID_FIELD])
            .unwrap_or_else(|| panic!("only the poison is dead-lettered: {fields:?}"));
        assert!(
            fields[REASON_FIELD].contains(&expected),
            "{expected:?} in {fields:?}"
        );
        assert_eq!(fields[ATTEMPT_FIELD], "1", "{fields:?}");
        assert_eq!(fields[STREAM_FIELD], group.stream());
    }
    assert!(
        letters_expected.is_empty(),
        "not dead-lettered: {letters_expected:?}"
    );
    assert_eq!(pending(&mut conn, &group).await, 0);
    drop_table(&store, &table).await;
}

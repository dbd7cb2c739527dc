//! Orders through NATS JetStream into PostgreSQL, each paid exactly once.
//!
//! ```text
//! cargo run --example nats_orders
//! ```
//!
//! Needs NATS with JetStream on `127.0.0.1:4222` (`IDEM_TEST_NATS_URL`) and PostgreSQL on
//! `127.0.0.1:5432` (`IDEM_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//! Everything it creates is unique to the run and removed at the end: a stream, its
//! dead-letter stream, a durable pull consumer and a ledger table.
//!
//! It publishes 40 orders, 12 of them a second time and 4 of those a third time (a producer
//! retrying), and one payload that is not JSON; runs a `NatsConsumer` 8 handlers wide until
//! every message is settled; shuts it down gracefully; and checks the ledger: one row per
//! order, the poison message in the dead-letter stream. The last line is the summary; the exit
//! code is non-zero when the ledger does not match.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull, stream};
use idem_runtime::broker::nats::{NatsConsumer, ensure_dead_letter_stream};
use idem_runtime::broker::{CancellationToken, ConsumerOptions, ConsumerReport};
use idem_runtime::{HandlerError, PgStore, PgTx, idempotent};

const ORDERS: usize = 40;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OrderPaid {
    order_id: String,
    amount_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for AppError {}

/// The ledger table of this run, set once in `main`.
static LEDGER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "examples.nats_orders.order_paid"
)]
async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    let ledger = LEDGER.get().map_or("nats_orders_ledger", String::as_str);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {ledger} (order_id, amount_cents) VALUES ($1, $2)"
    )))
    .bind(&msg.order_id)
    .bind(msg.amount_cents)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr) // stdout carries only the summary line
        .init();
    let run = format!(
        "{}_{:x}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros()
    );
    let ledger = LEDGER.get_or_init(|| format!("nats_orders_ledger_{run}"));

    let pg_url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let store = PgStore::connect(&pg_url)
        .await
        .map_err(|error| format!("PostgreSQL at {pg_url}: {error}"))?;
    store.migrate().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {ledger} (order_id TEXT PRIMARY KEY, amount_cents BIGINT NOT NULL)"
    )))
    .execute(store.pool())
    .await?;

    let nats_url =
        std::env::var("IDEM_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let client = async_nats::connect(&nats_url)
        .await
        .map_err(|error| format!("NATS at {nats_url}: {error}"))?;
    let js = jetstream::new(client);
    let stream_name = format!("NATS_ORDERS_{run}");
    let subject = format!("nats-orders.{run}.paid");
    let orders = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    ensure_dead_letter_stream(&js, &stream_name).await?;
    let consumer = orders
        .create_consumer(pull::Config {
            durable_name: Some("billing".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(10),
            max_deliver: 5,
            ..Default::default()
        })
        .await?;

    // Publish: every order, then 12 again, 4 of those a third time, and a poison payload.
    let order = |i: usize| OrderPaid {
        order_id: format!("order-{run}-{i}"),
        amount_cents: 100 * i64::try_from(i).unwrap_or(0),
    };
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for i in 0..ORDERS {
        payloads.push(serde_json::to_vec(&order(i))?);
    }
    for i in 0..12 {
        payloads.push(serde_json::to_vec(&order(i * 3))?);
    }
    for i in 0..4 {
        payloads.push(serde_json::to_vec(&order(i * 3))?);
    }
    payloads.push(b"{\"order_id\": 42, oops".to_vec());
    let published = payloads.len() as u64;
    for payload in payloads {
        js.publish(subject.clone(), payload.into()).await?.await?;
    }

    // Consume until every message is settled, then shut down gracefully.
    let runner = NatsConsumer::new(
        consumer,
        js.clone(),
        idem_runtime::handler!(on_order_paid),
        store.clone(),
    )
    .with_options(
        ConsumerOptions::default()
            .concurrency(8)
            .prefetch(32)
            .shutdown_grace(Duration::from_secs(5)),
    );
    let stats = runner.stats();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(runner.run(shutdown.clone()));
    // Until every message is settled (woken by each settlement), for 30 s at most.
    let settled =
        |now: &ConsumerReport| now.processed + now.duplicates + now.dead_lettered >= published;
    if tokio::time::timeout(Duration::from_secs(30), stats.wait_until(settled))
        .await
        .is_err()
    {
        eprintln!("not drained after 30 s: {:?}", stats.snapshot());
    }
    shutdown.cancel();
    let report = running.await??;

    // Check the ledger and the dead letters.
    let (rows, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT order_id) FROM {ledger}"
    )))
    .fetch_one(store.pool())
    .await?;
    let dead_letters = js
        .get_stream(format!("{stream_name}_DEAD_LETTER"))
        .await?
        .get_info()
        .await?
        .state
        .messages;
    let settled = report.processed + report.duplicates + report.dead_lettered;
    let lost = (ORDERS as u64).saturating_sub(u64::try_from(distinct).unwrap_or(0))
        + published.saturating_sub(settled);

    // Clean up what this run created.
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {ledger}")))
        .execute(store.pool())
        .await?;
    js.delete_stream(&stream_name).await?;
    js.delete_stream(format!("{stream_name}_DEAD_LETTER"))
        .await?;

    println!(
        "published={published} processed={} duplicates={} dead_lettered={} lost={lost}",
        report.processed, report.duplicates, report.dead_lettered
    );
    let expected = rows == ORDERS as i64
        && distinct == ORDERS as i64
        && report.processed == ORDERS as u64
        && report.duplicates == 16
        && report.dead_lettered == 1
        && dead_letters == 1
        && lost == 0;
    if !expected {
        eprintln!(
            "the ledger does not match: {rows} rows for {distinct} orders (expected {ORDERS}), {dead_letters} dead letters (expected 1), report {report:?}"
        );
        std::process::exit(1);
    }
    Ok(())
}

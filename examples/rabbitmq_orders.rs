//! Orders from RabbitMQ into PostgreSQL, each effect once, acked only after the commit.
//!
//! ```text
//! cargo run -p idem-examples --example rabbitmq_orders
//! ```
//!
//! Needs RabbitMQ on `127.0.0.1:5672` (guest/guest; `IDEM_TEST_AMQP_URL` overrides) and
//! PostgreSQL on `127.0.0.1:5432` (`IDEM_TEST_PG_URL` overrides). Every run uses a queue and a
//! ledger table of its own, and removes them at the end.
//!
//! It publishes 20 orders, each twice and every fourth a third time, plus one payload that is
//! not JSON; runs a [`RabbitMqConsumer`] until everything is settled; shuts it down gracefully;
//! then checks the ledger (one row per order), the dead-letter queue (the poison message, with
//! its reason) and the work queue (empty), and prints one line:
//!
//! ```text
//! published=46 processed=20 duplicates=25 dead_lettered=1 lost=0
//! ```
//!
//! The exit code is non-zero when anything does not match.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::{AMQPValue, FieldTable};
use idem_runtime::broker::rabbitmq::lapin::{self, BasicProperties, Channel};
use idem_runtime::broker::rabbitmq::{REASON_HEADER, RabbitMqConsumer, RabbitMqTopology};
use idem_runtime::broker::{CancellationToken, ConsumerOptions, ConsumerReport};
use idem_runtime::{HandlerError, PgStore, PgTx, handler, idempotent, sqlx};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for AppError {}

/// This run's ledger table.
static LEDGER: OnceLock<String> = OnceLock::new();

fn ledger() -> &'static str {
    LEDGER
        .get()
        .map_or("rabbitmq_orders_ledger", String::as_str)
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "examples.rabbitmq_orders"
)]
async fn on_order_placed(tx: &mut PgTx<'_>, msg: OrderPlaced) -> Result<(), AppError> {
    // The table name is this program's own (letters, digits and underscores).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, amount) VALUES ($1, $2)",
        ledger()
    )))
    .bind(&msg.order_id)
    .bind(msg.amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const ORDERS: usize = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let run = format!("{}_{nanos:x}", std::process::id());
    LEDGER
        .set(format!("rabbitmq_orders_{run}"))
        .map_err(|_| "the ledger table is set once")?;

    let pg_url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let amqp_url = std::env::var("IDEM_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let store = PgStore::connect(&pg_url)
        .await
        .map_err(|error| format!("PostgreSQL is not reachable at {pg_url}: {error}"))?;
    store.migrate().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {} (order_id TEXT NOT NULL, amount BIGINT NOT NULL)",
        ledger()
    )))
    .execute(store.pool())
    .await?;
    let connection = lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
        .await
        .map_err(|error| format!("RabbitMQ is not reachable at {amqp_url}: {error}"))?;

    let topology = RabbitMqTopology::for_queue(&format!("idem-example.orders.{run}"))?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology.declare(&publisher).await?;

    // Orders, each twice and every fourth three times (a producer retrying, a replay), and
    // one poison payload.
    let mut published = 0_u64;
    for copy in 0..3 {
        for n in 0..ORDERS {
            if copy < 2 || n % 4 == 0 {
                let order = OrderPlaced {
                    order_id: format!("order-{run}-{n}"),
                    amount: 100 + i64::try_from(n)?,
                };
                publish(&publisher, &topology, &serde_json::to_vec(&order)?).await?;
                published += 1;
            }
        }
    }
    publish(
        &publisher,
        &topology,
        br#"{"order_id": "order-poison", "amount": "#,
    )
    .await?;
    published += 1;

    let consumer = RabbitMqConsumer::new(
        connection.create_channel().await?,
        topology.clone(),
        handler!(on_order_placed),
        store.clone(),
    )
    .with_options(
        ConsumerOptions::default()
            .concurrency(4)
            .prefetch(16)
            .shutdown_grace(Duration::from_secs(5)),
    );
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    // Until every message is settled (woken by each settlement), for 20 s at most.
    let settled =
        |now: &ConsumerReport| now.processed + now.duplicates + now.dead_lettered >= published;
    if tokio::time::timeout(Duration::from_secs(20), stats.wait_until(settled))
        .await
        .is_err()
    {
        eprintln!("not drained after 20 s: {:?}", stats.snapshot());
    }
    shutdown.cancel();
    let report = running.await??;

    // The ledger: one row per order, nothing else.
    let (rows, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM {}",
        ledger()
    )))
    .fetch_one(store.pool())
    .await?;
    // The dead-letter queue: the poison message, with its reason.
    let mut dead_letters = Vec::new();
    while let Some(message) = publisher
        .basic_get(
            topology.dead_letter_queue().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
    {
        let headers = message.delivery.properties.headers().clone();
        let reason = match headers.as_ref().and_then(|h| h.inner().get(REASON_HEADER)) {
            Some(AMQPValue::LongString(reason)) => reason.to_string(),
            _ => String::new(),
        };
        dead_letters.push(reason);
    }
    let left = publisher
        .queue_declare(
            topology.queue().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();

    let settled = report.processed + report.duplicates + report.dead_lettered;
    let lost = published.saturating_sub(settled) + u64::from(left);
    println!(
        "published={published} processed={} duplicates={} dead_lettered={} lost={lost}",
        report.processed, report.duplicates, report.dead_lettered
    );

    // This run's queues and table are its own: remove them.
    for queue in [topology.queue(), topology.dead_letter_queue()] {
        publisher
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    publisher
        .exchange_delete(
            topology.dead_letter_exchange().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {}", ledger())))
        .execute(store.pool())
        .await?;
    publisher.close(200, "done".into()).await?;
    connection.close(200, "done".into()).await?;

    let orders = i64::try_from(ORDERS)?;
    let expected_duplicates = published - 1 - u64::try_from(ORDERS)?;
    let poison_reason_ok = dead_letters.len() == 1 && dead_letters[0].contains("does not decode");
    if lost != 0
        || rows != orders
        || distinct != orders
        || report.processed != u64::try_from(ORDERS)?
        || report.duplicates != expected_duplicates
        || report.dead_lettered != 1
        || !poison_reason_ok
    {
        eprintln!(
            "mismatch: ledger rows={rows} distinct={distinct} (expected {orders}), dead letters {dead_letters:?}, report {report:?}"
        );
        std::process::exit(1);
    }
    Ok(())
}

async fn publish(
    channel: &Channel,
    topology: &RabbitMqTopology,
    body: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    let confirmation = channel
        .basic_publish(
            "".into(),
            topology.queue().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    if confirmation.is_ack() {
        Ok(())
    } else {
        Err("RabbitMQ did not confirm a published order".into())
    }
}

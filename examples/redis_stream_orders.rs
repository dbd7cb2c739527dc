//! Orders from a Redis stream into a PostgreSQL ledger, each exactly once, with
//! `RedisStreamConsumer`.
//!
//! ```text
//! cargo run -p idem-examples --example redis_stream_orders
//! ```
//!
//! Against the local Redis (`IDEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) and
//! PostgreSQL (`IDEM_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`). Each run
//! uses a stream, a dead-letter stream and a ledger table of its own, and removes them at the
//! end.
//!
//! Forty orders are published, a third of them twice and every tenth three times (a producer
//! retrying), plus one payload that is not JSON. One consumer with eight handlers at once reads
//! them: each order is written to the ledger once and acked after the commit, every copy is
//! acked as a duplicate, the bad payload lands in the dead-letter stream with its reason. Then
//! the consumer shuts down gracefully, the ledger is checked, and one line reports it; the exit
//! code is non-zero if the ledger does not match.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::broker::redis_streams::{RedisStreamConsumer, StreamGroup};
use idem_runtime::broker::{CancellationToken, ConsumerOptions, ConsumerReport};
use idem_runtime::{HandlerError, PgStore, PgTx, idempotent};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
    amount: i64,
    /// The ledger table of this run.
    ledger: String,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct AppError(#[from] sqlx::Error);

impl HandlerError for AppError {}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "example.redis_stream_orders"
)]
async fn on_order_placed(tx: &mut PgTx<'_>, msg: OrderPlaced) -> Result<(), AppError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, amount) VALUES ($1, $2)",
        msg.ledger
    )))
    .bind(&msg.order_id)
    .bind(msg.amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let redis_url =
        std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg_url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let run = format!(
        "{}_{:x}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );

    let client = redis::Client::open(redis_url.as_str())?;
    let mut conn = client
        .get_connection_manager()
        .await
        .map_err(|error| format!("Redis is not reachable at {redis_url}: {error}"))?;
    let store = PgStore::connect(&pg_url)
        .await
        .map_err(|error| format!("PostgreSQL is not reachable at {pg_url}: {error}"))?;
    store.migrate().await?;
    let ledger = format!("redis_orders_{run}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {ledger} (order_id TEXT NOT NULL, amount BIGINT NOT NULL)"
    )))
    .execute(store.pool())
    .await?;
    let group = StreamGroup::new(format!("idem-example:orders:{run}"), "ledger");

    // The producer: forty orders, some published more than once, and one bad payload.
    let orders = 40_i64;
    let mut published = 0_u64;
    for n in 0..orders {
        let order = OrderPlaced {
            order_id: format!("order-{run}-{n}"),
            amount: 100 + n,
            ledger: ledger.clone(),
        };
        let copies = 1 + u64::from(n % 3 == 0) + u64::from(n % 10 == 0);
        for _ in 0..copies {
            group
                .publish(&mut conn, &serde_json::to_vec(&order)?)
                .await?;
            published += 1;
        }
    }
    group.publish(&mut conn, b"{\"order_id\": ").await?;
    published += 1;

    // The consumer.
    let consumer = RedisStreamConsumer::new(
        client,
        group.clone(),
        "ledger-1",
        idem_runtime::handler!(on_order_placed),
        store.clone(),
    )
    .with_options(
        ConsumerOptions::default()
            .concurrency(8)
            .prefetch(32)
            .shutdown_grace(Duration::from_secs(10)),
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

    // The ledger: each order exactly once.
    let (distinct, rows): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(DISTINCT order_id), count(*) FROM {ledger}"
    )))
    .fetch_one(store.pool())
    .await?;
    let dead_letters: u64 = redis::cmd("XLEN")
        .arg(group.dead_letter_stream())
        .query_async(&mut conn)
        .await?;
    let pending = group.pending(&mut conn).await?;
    let lost = orders - distinct;

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {ledger}")))
        .execute(store.pool())
        .await?;
    let _: u64 = redis::cmd("DEL")
        .arg(group.stream())
        .arg(group.dead_letter_stream())
        .query_async(&mut conn)
        .await?;

    println!(
        "published={published} processed={} duplicates={} dead_lettered={} lost={lost}",
        report.processed, report.duplicates, report.dead_lettered
    );
    let expected_duplicates = published - 1 - u64::try_from(orders)?;
    let ok = lost == 0
        && rows == orders
        && report.processed == u64::try_from(orders)?
        && report.duplicates == expected_duplicates
        && report.dead_lettered == 1
        && dead_letters == 1
        && pending == 0;
    if !ok {
        eprintln!(
            "the ledger does not match: {rows} rows for {orders} orders, {dead_letters} dead letters, {pending} pending, {report:?}"
        );
        std::process::exit(1);
    }
    Ok(())
}

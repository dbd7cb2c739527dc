//! A consumer process for the `broker_redis_streams` kill test: a service's own loop over a
//! consumer group, with idem's [`RedisStreamAcknowledger`], that aborts the process inside
//! `ack` for one chosen message, after its transaction committed and before its `XACK`.
//!
//! Usage: `redis_streams_consumer <stream> <group> <consumer> <abort-key>`. Exits 2 when it
//! never saw the chosen message in 30 s; it never exits 0.

use std::time::{Duration, Instant};

use idem_runtime::broker::redis_streams::{RedisStreamAcknowledger, RedisStreamError, StreamGroup};
use idem_runtime::{Acknowledger, Committed, DeadLetter, PgTx, Requeue, idempotent};
use idem_tests::AppError;

/// The message of the kill test (the same shape as the test's).
#[derive(Debug, serde::Deserialize)]
struct Order {
    key: String,
    table: String,
}

/// The same handler, in the same scope, as the test's `on_kill`.
#[idempotent(key = "key", store = "pg", strategy = "dedup_table", scope = "rs.kill")]
async fn on_kill(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (key) VALUES ($1)",
        msg.table
    )))
    .bind(&msg.key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Aborts the process in `ack` when told to: the commit happened, the `XACK` never does.
struct AbortOnAck {
    inner: RedisStreamAcknowledger,
    abort: bool,
}

impl Acknowledger for AbortOnAck {
    type Error = RedisStreamError;

    fn attempt(&self) -> Option<u32> {
        self.inner.attempt()
    }
    fn message_id(&self) -> Option<&str> {
        self.inner.message_id()
    }
    async fn ack(self, proof: Committed) -> Result<(), Self::Error> {
        if self.abort {
            eprintln!("aborting between the commit and the ack");
            std::process::abort();
        }
        self.inner.ack(proof).await
    }
    async fn requeue(self, requeue: Requeue) -> Result<(), Self::Error> {
        self.inner.requeue(requeue).await
    }
    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        self.inner.dead_letter(letter).await
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, stream, group, consumer, abort_key] = args.as_slice() else {
        eprintln!("usage: redis_streams_consumer <stream> <group> <consumer> <abort-key>");
        std::process::exit(64);
    };
    let store = idem_tests::pg::connect().await;
    let client = redis::Client::open(idem_tests_redis_url()).expect("a Redis URL");
    let conn = client
        .get_connection_manager()
        .await
        .expect("Redis is reachable");
    // The reads block (waiting on Redis for new entries): a connection of their own, with a
    // response timeout past the block.
    let block = Duration::from_secs(1);
    let mut reader = client
        .get_connection_manager_with_config(
            redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(block + Duration::from_secs(5))),
        )
        .await
        .expect("Redis is reachable");
    let group = StreamGroup::new(stream.as_str(), group.as_str());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // Read everything there is: the entries after the chosen one stay pending under this
        // consumer when it dies, for the next consumer to reclaim.
        let deliveries = group
            .read(&mut reader, consumer, 100, Some(block))
            .await
            .expect("XREADGROUP");
        for delivery in deliveries {
            let message: Order =
                serde_json::from_slice(delivery.payload(&group)).expect("a JSON order");
            let abort = message.key == *abort_key;
            let ack = AbortOnAck {
                inner: RedisStreamAcknowledger::new(
                    conn.clone(),
                    &group,
                    consumer.as_str(),
                    delivery,
                ),
                abort,
            };
            let outcome = on_kill(&store, message, ack).await.expect("handled");
            assert!(outcome.is_processed(), "a fresh message");
        }
    }
    eprintln!("never saw the message to abort on");
    std::process::exit(2);
}

fn idem_tests_redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

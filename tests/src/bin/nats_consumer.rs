//! A JetStream consumer process for the `broker_nats` kill test: a service's own consumer loop
//! with idem added through `NatsAcknowledger`. It handles messages one by one and aborts the
//! process inside `ack()` for the chosen order, that is after that order's commit and before
//! its ack reaches the server.
//!
//! ```text
//! nats_consumer STREAM CONSUMER RUNS_TABLE ABORT_ORDER_ID NATS_URL
//! ```
//!
//! Exits with 3 if it never meets the chosen order within 30 s.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt as _;
use idem_runtime::broker::nats::{NatsAckOptions, NatsAcknowledger};
use idem_runtime::{Acknowledger, Committed, DeadLetter, HandlerError, PgTx, Requeue, idempotent};

#[derive(Debug, serde::Deserialize)]
struct Order {
    order_id: String,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for AppError {}

static RUNS_TABLE: OnceLock<String> = OnceLock::new();

// The same scope and body as `on_kill` in tests/broker_nats.rs.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "idem_tests.nats.kill"
)]
async fn on_kill(tx: &mut PgTx<'_>, msg: Order) -> Result<(), AppError> {
    let table = RUNS_TABLE
        .get()
        .map_or("missing_runs_table", String::as_str);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (key) VALUES ($1)"
    )))
    .bind(&msg.order_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Dies inside `ack()` when told to: after the commit, before the ack.
struct AbortOnAck {
    inner: NatsAcknowledger,
    abort: bool,
}

impl Acknowledger for AbortOnAck {
    type Error = <NatsAcknowledger as Acknowledger>::Error;

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
        if self.abort {
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, stream, consumer, table, abort_order, url] = args.as_slice() else {
        return Err(
            "usage: nats_consumer STREAM CONSUMER RUNS_TABLE ABORT_ORDER_ID NATS_URL".into(),
        );
    };
    RUNS_TABLE.get_or_init(|| table.clone());
    let store = idem_tests::pg::connect().await;
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await?);
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_stream(stream).await?.get_consumer(consumer).await?;
    let settle = NatsAckOptions::for_consumer(consumer.cached_info());
    let mut messages = consumer.messages().await?;
    let loop_ = async {
        while let Some(message) = messages.next().await {
            let ack = NatsAcknowledger::new(message?, &settle);
            let order: Order = serde_json::from_slice(ack.payload())?;
            let abort = order.order_id == *abort_order;
            on_kill(&store, order, AbortOnAck { inner: ack, abort }).await?;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(Duration::from_secs(30), loop_).await {
        Ok(result) => result?,
        Err(_) => eprintln!("nats_consumer: never met order {abort_order}"),
    }
    std::process::exit(3);
}

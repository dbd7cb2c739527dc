//! idem in one file, on SQLite: no server needed.
//!
//! ```text
//! cargo run --example quickstart [DB_FILE]
//! ```
//!
//! `DB_FILE` defaults to `idem-quickstart.db` in the system's temporary directory. A small
//! in-process broker delivers a deterministic stream of `OrderPaid` messages at least once:
//!
//! - every order once, in order;
//! - orders 1–5 again, one after another (their acks were lost);
//! - orders 21–24 four times each, at the same moment (a redelivery racing the original);
//! - orders 25–27, whose consumer "crashes" after the commit and before the ack: the broker
//!   never hears the ack and delivers them again;
//! - one order with an empty id: it can never be deduplicated, so it is dead-lettered (kept
//!   for inspection), never dropped and never processed.
//!
//! The handler inserts one payment row per order. The last line reports what happened; the
//! `payments` table ends with exactly one row per order. Run it twice on the same file: the
//! second run processes nothing (`processed=0`), because the dedup records persist.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use idem_runtime::{
    Acknowledger, Committed, DeadLetter, HandlerError, Outcome, Requeue, SqliteStore, SqliteTx,
    idempotent,
};

/// The message: an order was paid.
#[derive(Debug, Clone, serde::Serialize)]
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

/// The handler: exactly one payment row per order, however often the order is delivered.
#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "quickstart.order_paid",
    fingerprint
)]
async fn on_order_paid(tx: &mut SqliteTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id, amount_cents) VALUES (?1, ?2)")
        .bind(&msg.order_id)
        .bind(msg.amount_cents)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A stand-in for RabbitMQ, NATS or Redis Streams: a queue that redelivers what was not acked.
#[derive(Default)]
struct Broker {
    queue: Mutex<VecDeque<OrderPaid>>,
    crash_before_ack: Mutex<HashSet<String>>,
    dead_letters: Mutex<Vec<(OrderPaid, String)>>,
    redelivered_after_crash: Mutex<usize>,
    /// Deliveries so far, per order: what a broker reports as the delivery count.
    deliveries: Mutex<HashMap<String, u32>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Broker {
    fn publish(&self, message: OrderPaid) {
        locked(&self.queue).push_back(message);
    }

    fn next(&self) -> Option<OrderPaid> {
        locked(&self.queue).pop_front()
    }

    fn delivery(self: &Arc<Self>, message: &OrderPaid) -> BrokerAck {
        let crashes = locked(&self.crash_before_ack).remove(&message.order_id);
        let attempt = {
            let mut deliveries = locked(&self.deliveries);
            let count = deliveries.entry(message.order_id.clone()).or_default();
            *count += 1;
            *count
        };
        BrokerAck {
            broker: Arc::clone(self),
            message: message.clone(),
            crashes,
            attempt,
        }
    }
}

/// One delivery's handle on the broker.
struct BrokerAck {
    broker: Arc<Broker>,
    message: OrderPaid,
    crashes: bool,
    attempt: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("the consumer crashed before its ack reached the broker")]
struct ConsumerCrashed;

impl Acknowledger for BrokerAck {
    type Error = ConsumerCrashed;

    fn attempt(&self) -> Option<u32> {
        Some(self.attempt)
    }

    async fn ack(self, _proof: Committed) -> Result<(), ConsumerCrashed> {
        if self.crashes {
            // The broker never hears this ack, so it delivers the message again.
            *locked(&self.broker.redelivered_after_crash) += 1;
            self.broker.publish(self.message);
            return Err(ConsumerCrashed);
        }
        Ok(())
    }

    async fn requeue(self, _requeue: Requeue) -> Result<(), ConsumerCrashed> {
        // A real broker would wait `_requeue.delay` before delivering it again.
        self.broker.publish(self.message);
        Ok(())
    }

    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), ConsumerCrashed> {
        locked(&self.broker.dead_letters).push((self.message, letter.reason.to_owned()));
        Ok(())
    }
}

fn order(n: u32) -> OrderPaid {
    OrderPaid {
        order_id: format!("order-{n}"),
        amount_cents: i64::from(n) * 1_000 + 99,
    }
}

#[derive(Default)]
struct Tally {
    processed: usize,
    duplicates: usize,
    failed: usize,
}

impl Tally {
    fn count(&mut self, result: Result<Outcome<()>, idem_runtime::Error<AppError>>) {
        match result {
            Ok(outcome) if outcome.is_processed() => self.processed += 1,
            Ok(_) => self.duplicates += 1,
            Err(error) => {
                tracing::info!(%error, "delivery failed");
                self.failed += 1;
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr) // stdout carries only the summary line
        .init();
    let path = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join("idem-quickstart.db"),
        Into::into,
    );

    let store = SqliteStore::open(&path).await?;
    store.migrate().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (
            order_id     TEXT    NOT NULL,
            amount_cents INTEGER NOT NULL
        )",
    )
    .execute(store.pool())
    .await?;

    let broker = Arc::new(Broker::default());
    for n in 1..=20 {
        broker.publish(order(n));
    }
    for n in 1..=5 {
        broker.publish(order(n)); // acks lost: redelivered
    }
    for n in 25..=27 {
        locked(&broker.crash_before_ack).insert(order(n).order_id);
        broker.publish(order(n));
    }
    broker.publish(OrderPaid {
        order_id: String::new(),
        amount_cents: 500,
    });

    let mut tally = Tally::default();
    // Concurrent redeliveries: four copies of each of orders 21-24 handled at once.
    let mut racing = tokio::task::JoinSet::new();
    for n in 21..=24 {
        for _ in 0..4 {
            let (store, broker, message) = (store.clone(), Arc::clone(&broker), order(n));
            racing.spawn(async move {
                let ack = broker.delivery(&message);
                on_order_paid(&store, message, ack).await
            });
        }
    }
    while let Some(joined) = racing.join_next().await {
        tally.count(joined?);
    }
    // The rest, one at a time, until the broker has nothing left to deliver.
    while let Some(message) = broker.next() {
        let ack = broker.delivery(&message);
        tally.count(on_order_paid(&store, message, ack).await);
    }

    let (payments, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT order_id) FROM payments")
            .fetch_one(store.pool())
            .await?;
    let redelivered_after_crash = *locked(&broker.redelivered_after_crash);
    let dead_lettered = locked(&broker.dead_letters).len();
    if payments != distinct {
        return Err(format!(
            "{payments} payment rows for {distinct} orders: a duplicate got through"
        )
        .into());
    }
    println!(
        "processed={} duplicates={} redelivered_after_crash={redelivered_after_crash} failed={} dead_lettered={dead_lettered} payments={payments} db={}",
        tally.processed,
        tally.duplicates,
        tally.failed,
        path.display()
    );
    Ok(())
}

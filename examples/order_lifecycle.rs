//! An order lifecycle driven by `strategy = "state_machine"`, on SQLite.
//!
//! ```text
//! cargo run --example order_lifecycle [DB_FILE]
//! ```
//!
//! `DB_FILE` (default: `idem-order-lifecycle.db` in the system's temporary directory) is
//! recreated on every run. Twelve orders each go `created → pending`, `paid`, `shipped`. The
//! events are shuffled (a fixed seed, so every run is the same), every third one is delivered
//! twice, and the broker redelivers whatever a handler asks to retry, at the back of the queue:
//!
//! - "paid" or "shipped" before "created": the order does not exist yet — retried
//!   (`on_missing` defaults to retry);
//! - "shipped" while the order is still `pending`: too early — retried (`early = ["pending"]`);
//! - a duplicate of any step: acked, its body does not run (the status is the record);
//! - at the end, two "cancelled" events for orders already shipped: an invalid transition,
//!   dead-lettered with the state it found.
//!
//! The last line reports it; the run fails if any order did not end `shipped` with exactly one
//! payment and one shipment.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use idem_runtime::{
    Acknowledger, Committed, DeadLetter, Error, HandlerError, Outcome, Requeue, SqliteStore,
    SqliteTx, idempotent,
};

#[derive(Debug, Clone)]
struct OrderEvent {
    order_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Created,
    Paid,
    Shipped,
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for AppError {}

/// Creates the order. Nothing to move yet, so the gate is a dedup record.
#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "lifecycle.created"
)]
async fn on_order_created(tx: &mut SqliteTx<'_>, msg: OrderEvent) -> Result<(), AppError> {
    sqlx::query("INSERT INTO orders (order_id, status) VALUES (?1, 'pending')")
        .bind(&msg.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `pending → paid`; a redelivery after shipping is still a duplicate.
#[idempotent(key = "order_id", store = "sqlite", strategy = "state_machine", scope = "lifecycle.paid",
             table = "orders", column = "status", from = "pending", to = "paid", done = ["shipped"])]
async fn on_payment_captured(tx: &mut SqliteTx<'_>, msg: OrderEvent) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id) VALUES (?1)")
        .bind(&msg.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `paid → shipped`; arriving while still `pending` is too early, not invalid.
#[idempotent(key = "order_id", store = "sqlite", strategy = "state_machine", scope = "lifecycle.shipped",
             table = "orders", column = "status", from = "paid", to = "shipped", early = ["pending"])]
async fn on_order_shipped(tx: &mut SqliteTx<'_>, msg: OrderEvent) -> Result<(), AppError> {
    sqlx::query("INSERT INTO shipments (order_id) VALUES (?1)")
        .bind(&msg.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `pending | paid → cancelled`: invalid once shipped.
#[idempotent(key = "order_id", store = "sqlite", strategy = "state_machine", scope = "lifecycle.cancelled",
             table = "orders", column = "status", from = ["pending", "paid"], to = "cancelled")]
async fn on_order_cancelled(_tx: &mut SqliteTx<'_>, _msg: OrderEvent) -> Result<(), AppError> {
    Ok(())
}

/// The in-process broker: a queue that takes requeued events back at the end.
#[derive(Default)]
struct Broker {
    queue: Mutex<VecDeque<(Step, OrderEvent, u32)>>,
    retried: Mutex<usize>,
    dead_letters: Mutex<Vec<String>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Delivery {
    broker: Arc<Broker>,
    step: Step,
    event: OrderEvent,
    /// Which delivery of this event this is, as a broker counts it.
    attempt: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("unreachable: the in-process broker does not fail")]
struct Never;

impl Acknowledger for Delivery {
    type Error = Never;

    fn attempt(&self) -> Option<u32> {
        Some(self.attempt)
    }

    async fn ack(self, _proof: Committed) -> Result<(), Never> {
        Ok(())
    }

    async fn requeue(self, requeue: Requeue) -> Result<(), Never> {
        // A real broker would hold the event back for `requeue.delay`; this one puts it at the
        // back of the queue, behind the events it is waiting for.
        *locked(&self.broker.retried) += 1;
        locked(&self.broker.queue).push_back((self.step, self.event, requeue.attempt + 1));
        Ok(())
    }

    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), Never> {
        locked(&self.broker.dead_letters).push(letter.reason.to_owned());
        Ok(())
    }
}

/// A fixed-seed Fisher–Yates shuffle (a linear congruential generator): the same stream on
/// every run, without a dependency.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = usize::try_from((seed >> 33) % (i as u64 + 1)).unwrap_or(0);
        items.swap(i, j);
    }
}

async fn deliver(
    store: &SqliteStore,
    broker: &Arc<Broker>,
    step: Step,
    event: OrderEvent,
    attempt: u32,
) -> Result<Outcome<()>, Error<AppError>> {
    let ack = Delivery {
        broker: Arc::clone(broker),
        step,
        event: event.clone(),
        attempt,
    };
    match step {
        Step::Created => on_order_created(store, event, ack).await,
        Step::Paid => on_payment_captured(store, event, ack).await,
        Step::Shipped => on_order_shipped(store, event, ack).await,
        Step::Cancelled => on_order_cancelled(store, event, ack).await,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr) // stdout carries only the summary line
        .init();
    let path = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join("idem-order-lifecycle.db"),
        Into::into,
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let store = SqliteStore::open(&path).await?;
    store.migrate().await?;
    for ddl in [
        "CREATE TABLE orders (order_id TEXT PRIMARY KEY, status TEXT NOT NULL)",
        "CREATE TABLE payments (order_id TEXT NOT NULL)",
        "CREATE TABLE shipments (order_id TEXT NOT NULL)",
    ] {
        sqlx::query(ddl).execute(store.pool()).await?;
    }

    const ORDERS: usize = 12;
    let event = |n: usize| OrderEvent {
        order_id: format!("order-{n:02}"),
    };
    let mut stream: Vec<(Step, OrderEvent)> = (1..=ORDERS)
        .flat_map(|n| [Step::Created, Step::Paid, Step::Shipped].map(|step| (step, event(n))))
        .collect();
    let duplicates: Vec<_> = stream.iter().step_by(3).cloned().collect();
    stream.extend(duplicates);
    shuffle(&mut stream, 42);

    let broker = Arc::new(Broker::default());
    locked(&broker.queue).extend(stream.into_iter().map(|(step, event)| (step, event, 1)));
    let (mut processed, mut duplicate_outcomes, mut deliveries) = (0, 0, 0);
    loop {
        let next = locked(&broker.queue).pop_front();
        let Some((step, event, attempt)) = next else {
            break;
        };
        deliveries += 1;
        if deliveries > 10_000 {
            return Err("more than 10,000 deliveries: something keeps requeueing".into());
        }
        match deliver(&store, &broker, step, event, attempt).await {
            Ok(outcome) if outcome.is_processed() => processed += 1,
            Ok(_) => duplicate_outcomes += 1,
            Err(error) => tracing::info!(%error, ?step, "delivery not done"),
        }
    }
    // Late cancellations of shipped orders: invalid, dead-lettered with the state found.
    for n in [3, 7] {
        if let Err(error) = deliver(&store, &broker, Step::Cancelled, event(n), 1).await {
            tracing::info!(%error, "cancellation refused");
        }
    }

    let shipped: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE status = 'shipped'")
        .fetch_one(store.pool())
        .await?;
    let (payments, shipments): (i64, i64) =
        sqlx::query_as("SELECT (SELECT COUNT(*) FROM payments), (SELECT COUNT(*) FROM shipments)")
            .fetch_one(store.pool())
            .await?;
    let invalid = locked(&broker.dead_letters).len();
    let retried = *locked(&broker.retried);
    let orders = i64::try_from(ORDERS)?;
    if (shipped, payments, shipments) != (orders, orders, orders) {
        return Err(format!(
            "{orders} orders: {shipped} shipped, {payments} payments, {shipments} shipments"
        )
        .into());
    }
    println!(
        "processed={processed} duplicates={duplicate_outcomes} retried={retried} invalid={invalid} orders={orders} shipped={shipped} db={}",
        path.display()
    );
    Ok(())
}

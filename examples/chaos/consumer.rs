//! One consumer process (`chaos consume …`): the handler under test, on PostgreSQL through the
//! harness's proxy, fed by the broker through the other proxy, reconnecting whenever either is
//! cut or restarted. It runs until its stdin closes (a graceful stop: the runner drains) or the
//! harness kills it.
//!
//! When the harness arms a kill point (`--kill-at NAME --kill-after N`), the process stops
//! dead at the N-th time it passes that point: it prints `FAILPOINT NAME` on stdout and parks
//! the thread, and the harness, reading that line, SIGKILLs it. For the `idem::*` names the
//! point is the runtime's own failpoint (`idem_runtime::failpoints`); the control handlers have
//! one of their own between their ack and their commit.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use idem_runtime::broker::nats::{NatsBatchConsumer, NatsConsumer, ensure_dead_letter_stream};
use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::FieldTable;
use idem_runtime::broker::rabbitmq::{
    RabbitMqBatchConsumer, RabbitMqConsumer, RabbitMqTopology, lapin,
};
use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions};
use idem_runtime::failpoints::{self, fail};
use idem_runtime::{HandlerError, PgStore, PgTx, batch_handler, handler, idempotent, sqlx};
use tokio::io::AsyncReadExt;

use crate::{BoxError, BrokerKind, ConsumeArgs, HandlerKind, Order, names};

/// The handler under test: the business write (a ledger row and an account balance) behind a
/// `dedup_table` gate, with a fingerprint so that the same order id with another payload is
/// dead-lettered. Orders whose id starts with `panic-` make it panic.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "chaos.orders",
    fingerprint,
    max_attempts = 5
)]
async fn apply_order(tx: &mut PgTx<'_>, msg: Order) -> Result<(), ChaosError> {
    assert!(
        !msg.order_id.starts_with("panic-"),
        "chaos: the handler panics on order {}",
        msg.order_id
    );
    business_write(tx, &msg).await
}

/// [`apply_order`] as a `batch` handler: the same gate (one claim for the whole batch), the same
/// fingerprint, the same write per order, the same panic.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "chaos.orders.batch",
    fingerprint,
    max_attempts = 5,
    batch
)]
async fn apply_orders(tx: &mut PgTx<'_>, msgs: &[Order]) -> Result<(), ChaosError> {
    for msg in msgs {
        assert!(
            !msg.order_id.starts_with("panic-"),
            "chaos: the handler panics on order {}",
            msg.order_id
        );
        business_write(tx, msg).await?;
    }
    Ok(())
}

/// The business effect: one ledger row, and the amount added to the account's balance. The
/// ledger has no unique constraint, so a second application shows up as a second row.
async fn business_write(tx: &mut PgTx<'_>, order: &Order) -> Result<(), ChaosError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, account, amount) VALUES ($1, $2, $3)",
        names::LEDGER
    )))
    .bind(&order.order_id)
    .bind(order.account)
    .bind(order.amount)
    .execute(&mut **tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET balance = balance + $1 WHERE id = $2",
        names::ACCOUNTS
    )))
    .bind(order.amount)
    .bind(order.account)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The consumer's error: the database's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChaosError {
    /// From the business write.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for ChaosError {}

/// The name of the control handlers' own kill point, between their ack and their commit.
pub(crate) const AFTER_ACK_BEFORE_COMMIT: &str = "chaos::after_ack_before_commit";

/// The armed kill point, if any: its name, the hit that kills, the hits so far.
struct KillSwitch {
    name: String,
    after: u64,
    hits: AtomicU64,
}

impl KillSwitch {
    fn pass(&self) {
        if self.hits.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            // The harness kills this process when it reads the line.
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "FAILPOINT {}", self.name);
            let _ = stdout.flush();
            drop(stdout);
            loop {
                std::thread::park();
            }
        }
    }
}

static KILL_SWITCH: std::sync::OnceLock<Arc<KillSwitch>> = std::sync::OnceLock::new();

/// Passes the control handlers' kill point.
fn pass(name: &str) {
    if let Some(switch) = KILL_SWITCH.get()
        && switch.name == name
    {
        switch.pass();
    }
}

/// Runs one consumer process until stdin closes.
pub(crate) async fn run(args: ConsumeArgs) -> Result<(), BoxError> {
    if let (Some(name), Some(after)) = (args.kill_at.clone(), args.kill_after) {
        let switch = Arc::new(KillSwitch {
            name: name.clone(),
            after,
            hits: AtomicU64::new(0),
        });
        if failpoints::ALL.contains(&name.as_str()) {
            let armed = Arc::clone(&switch);
            fail::cfg_callback(name, move || armed.pass())?;
        }
        let _ = KILL_SWITCH.set(switch);
    }

    // A graceful stop: the harness closes our stdin.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            shutdown.cancel();
        }
    });

    let store = loop {
        match PgStore::connect(&args.pg_url).await {
            Ok(store) => break store,
            Err(error) => {
                tracing::warn!(%error, "PostgreSQL not reachable yet");
                if pause(&shutdown).await {
                    return Ok(());
                }
            }
        }
    };
    while !shutdown.is_cancelled() {
        let ended = match (args.broker, args.handler) {
            (BrokerKind::Rabbitmq, HandlerKind::Idem) => {
                rabbitmq_idem(&args, &store, &shutdown).await
            }
            (BrokerKind::Nats, HandlerKind::Idem) => nats_idem(&args, &store, &shutdown).await,
            (BrokerKind::Rabbitmq, HandlerKind::IdemBatch) => {
                rabbitmq_idem_batch(&args, &store, &shutdown).await
            }
            (BrokerKind::Nats, HandlerKind::IdemBatch) => {
                nats_idem_batch(&args, &store, &shutdown).await
            }
            (BrokerKind::Rabbitmq, control) => {
                rabbitmq_control(&args, &store, control, &shutdown).await
            }
            (BrokerKind::Nats, control) => nats_control(&args, &store, control, &shutdown).await,
        };
        if let Err(error) = ended {
            tracing::warn!(%error, "consumer stopped; reconnecting");
        }
        if pause(&shutdown).await {
            break;
        }
    }
    Ok(())
}

/// A short wait before reconnecting; true when the stop came meanwhile.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(Duration::from_millis(200)) => false,
    }
}

fn options() -> ConsumerOptions {
    ConsumerOptions::default()
        .concurrency(8)
        .prefetch(16)
        .shutdown_grace(Duration::from_secs(10))
}

async fn rabbitmq_idem(
    args: &ConsumeArgs,
    store: &PgStore,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let connection =
        lapin::Connection::connect(&args.broker_url, lapin::ConnectionProperties::default())
            .await?;
    let topology = RabbitMqTopology::for_queue(names::QUEUE)?;
    let consumer = RabbitMqConsumer::new(
        connection.create_channel().await?,
        topology,
        handler!(apply_order),
        store.clone(),
    )
    .with_options(options());
    consumer.run(shutdown.clone()).await?;
    let _ = connection.close(200, "stopping".into()).await;
    Ok(())
}

async fn nats_idem(
    args: &ConsumeArgs,
    store: &PgStore,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let client = async_nats::connect(&args.broker_url).await?;
    let js = async_nats::jetstream::new(client);
    ensure_dead_letter_stream(&js, names::STREAM).await?;
    let consumer = js
        .get_stream(names::STREAM)
        .await?
        .get_consumer(names::NATS_CONSUMER)
        .await?;
    NatsConsumer::new(consumer, js.clone(), handler!(apply_order), store.clone())
        .with_options(options())
        .run(shutdown.clone())
        .await?;
    Ok(())
}

fn batches() -> BatchOptions {
    BatchOptions::default()
        .max_size(32)
        .max_wait(Duration::from_millis(20))
}

async fn rabbitmq_idem_batch(
    args: &ConsumeArgs,
    store: &PgStore,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let connection =
        lapin::Connection::connect(&args.broker_url, lapin::ConnectionProperties::default())
            .await?;
    let topology = RabbitMqTopology::for_queue(names::QUEUE)?;
    let consumer = RabbitMqBatchConsumer::new(
        connection.create_channel().await?,
        topology,
        batch_handler!(apply_orders),
        store.clone(),
    )
    .with_options(options().concurrency(4))
    .with_batch(batches());
    consumer.run(shutdown.clone()).await?;
    let _ = connection.close(200, "stopping".into()).await;
    Ok(())
}

async fn nats_idem_batch(
    args: &ConsumeArgs,
    store: &PgStore,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let client = async_nats::connect(&args.broker_url).await?;
    let js = async_nats::jetstream::new(client);
    ensure_dead_letter_stream(&js, names::STREAM).await?;
    let consumer = js
        .get_stream(names::STREAM)
        .await?
        .get_consumer(names::NATS_CONSUMER)
        .await?;
    NatsBatchConsumer::new(
        consumer,
        js.clone(),
        batch_handler!(apply_orders),
        store.clone(),
    )
    .with_options(options().concurrency(4))
    .with_batch(batches())
    .run(shutdown.clone())
    .await?;
    Ok(())
}

/// What a hand-written control handler does with one payload: `Ok(true)` to ack.
async fn control_handle(
    store: &PgStore,
    handler: HandlerKind,
    payload: &[u8],
    ack: impl AsyncFnOnce() -> Result<(), BoxError>,
) -> Result<(), BoxError> {
    let Ok(order) = serde_json::from_slice::<Order>(payload) else {
        // Not an order: a control does not care; ack it away.
        return ack().await;
    };
    match handler {
        // A correct gate (an inbox row in the same transaction), but the ack goes first: a
        // death or a failed commit after it loses the message.
        HandlerKind::AckBeforeCommit => {
            ack().await?;
            pass(AFTER_ACK_BEFORE_COMMIT);
            let mut tx = store.pool().begin().await?;
            let fresh = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (order_id) VALUES ($1) ON CONFLICT DO NOTHING",
                names::CONTROL_INBOX
            )))
            .bind(&order.order_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if fresh {
                business_write(&mut tx, &order).await?;
            }
            tx.commit().await?;
        }
        // Commit, then ack, but no gate: every redelivery applies the order again.
        HandlerKind::NoGate => {
            let mut tx = store.pool().begin().await?;
            business_write(&mut tx, &order).await?;
            tx.commit().await?;
            ack().await?;
        }
        HandlerKind::Idem | HandlerKind::IdemBatch => {
            unreachable!("the idem handlers run under the idem runners")
        }
    }
    Ok(())
}

async fn rabbitmq_control(
    args: &ConsumeArgs,
    store: &PgStore,
    handler: HandlerKind,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let connection =
        lapin::Connection::connect(&args.broker_url, lapin::ConnectionProperties::default())
            .await?;
    let channel = connection.create_channel().await?;
    RabbitMqTopology::for_queue(names::QUEUE)?
        .declare(&channel)
        .await?;
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            names::QUEUE.into(),
            "chaos-control".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = deliveries.next() => next,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let acker = delivery.acker.clone();
        let handled = control_handle(store, handler, &delivery.data, async || {
            acker.ack(BasicAckOptions::default()).await?;
            Ok(())
        })
        .await;
        if let Err(error) = handled {
            tracing::warn!(%error, "control handler failed; requeueing");
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
    let _ = connection.close(200, "stopping".into()).await;
    Ok(())
}

async fn nats_control(
    args: &ConsumeArgs,
    store: &PgStore,
    handler: HandlerKind,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let client = async_nats::connect(&args.broker_url).await?;
    let js = async_nats::jetstream::new(client);
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(names::STREAM)
        .await?
        .get_consumer(names::NATS_CONSUMER)
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let Some(message) = next else { break };
        let message = message?;
        let handled = control_handle(store, handler, &message.payload, async || {
            message.ack().await?;
            Ok(())
        })
        .await;
        if let Err(error) = handled {
            tracing::warn!(%error, "control handler failed; requeueing");
            let _ = message
                .ack_with(async_nats::jetstream::AckKind::Nak(None))
                .await;
        }
    }
    Ok(())
}

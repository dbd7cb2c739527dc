//! End-to-end scenarios: messages published to a broker, consumed, handled on PostgreSQL and
//! acked after the commit. The idempotent side is idem's consumer runner with the
//! `dedup_table` handler; the baseline is a hand-written consumer doing the same insert and the
//! same manual ack after the commit, at the same concurrency and prefetch; the ceiling is the
//! broker alone (consume and ack, no database), reported as `broker_ceiling_per_s`.
//!
//! Each side consumes its own freshly filled queue (or JetStream consumer), so only consuming
//! is timed: from the first fetch to the last message settled.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idem_runtime::broker::nats::NatsConsumer;
use idem_runtime::broker::rabbitmq::lapin;
use idem_runtime::broker::rabbitmq::{RabbitMqConsumer, RabbitMqTopology};
use idem_runtime::broker::{CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats};
use idem_runtime::handler;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Semaphore;

use super::{BoxError, Config, Measurement, Side, bench_msg, pg_dedup_handler, pg_store};

const LEDGER_INSERT: &str = "INSERT INTO bench_ledger (order_id, amount) VALUES ($1, $2)";

/// Which side of a round is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Idem,
    Baseline,
    Ceiling,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Idem => "idem",
            Self::Baseline => "base",
            Self::Ceiling => "ceiling",
        }
    }

    /// Idem and baseline alternate who goes first; the ceiling runs last.
    fn order(round: usize) -> [Self; 3] {
        if round.is_multiple_of(2) {
            [Self::Idem, Self::Baseline, Self::Ceiling]
        } else {
            [Self::Baseline, Self::Idem, Self::Ceiling]
        }
    }
}

fn payloads(config: &Config, role: Role, round: usize, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| {
            let key = format!("{}-{}-{round}-{n}", config.run_id, role.name());
            let msg = bench_msg(key);
            serde_json::to_vec(
                &serde_json::json!({ "order_id": msg.order_id, "amount": msg.amount }),
            )
            .unwrap_or_default()
        })
        .collect()
}

/// Times idem's runner (`run`, already given `shutdown`) until it has processed `messages`
/// deliveries, woken by each settlement; then shuts it down.
pub(super) async fn time_runner<E>(
    stats: Arc<ConsumerStats>,
    run: impl Future<Output = Result<ConsumerReport, E>> + Send + 'static,
    shutdown: CancellationToken,
    messages: usize,
) -> Result<Side, BoxError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let expected = messages as u64;
    let started = Instant::now();
    let running = tokio::spawn(run);
    let report = tokio::time::timeout(
        Duration::from_secs(300),
        stats.wait_until(|report| {
            report.processed >= expected || report.requeued + report.dead_lettered > 0
        }),
    )
    .await?;
    let elapsed = started.elapsed();
    shutdown.cancel();
    running.await??;
    if report.processed < expected {
        return Err(format!("the benchmark handler failed: {report:?}").into());
    }
    Ok(Side {
        messages,
        elapsed,
        latencies_us: Vec::new(),
    })
}

// ---- RabbitMQ -------------------------------------------------------------------------------

pub(super) fn amqp_url() -> String {
    std::env::var("IDEM_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub(super) async fn rabbitmq_pg(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let prefetch = u16::try_from(config.tasks * 2).unwrap_or(u16::MAX);
    let mut measurement = Measurement {
        idem: Side::default(),
        baseline: Side::default(),
        extra: Vec::new(),
    };
    let mut ceiling = Side::default();
    let per_round = config.messages.div_ceil(config.rounds);
    for round in 0..config.rounds {
        for role in Role::order(round) {
            let queue = format!("bench.{}.{}.{round}", config.run_id, role.name());
            let topology = RabbitMqTopology::for_queue(&queue)?;
            topology.declare(&publisher).await?;
            let mut confirms = Vec::with_capacity(per_round);
            for payload in payloads(config, role, round, per_round) {
                confirms.push(
                    publisher
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &payload,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                confirm.await?;
            }
            let channel = connection.create_channel().await?;
            let side = match role {
                Role::Idem => {
                    let consumer = RabbitMqConsumer::new(
                        channel,
                        topology.clone(),
                        handler!(pg_dedup_handler),
                        store.clone(),
                    )
                    .with_options(
                        ConsumerOptions::default()
                            .concurrency(config.tasks)
                            .prefetch(prefetch),
                    );
                    let shutdown = CancellationToken::new();
                    time_runner(
                        consumer.stats(),
                        consumer.run(shutdown.clone()),
                        shutdown,
                        per_round,
                    )
                    .await?
                }
                Role::Baseline | Role::Ceiling => {
                    let pool = (role == Role::Baseline).then(|| store.pool().clone());
                    rabbitmq_hand_written(&channel, &queue, config.tasks, prefetch, per_round, pool)
                        .await?
                }
            };
            match role {
                Role::Idem => measurement.idem.add(side),
                Role::Baseline => measurement.baseline.add(side),
                Role::Ceiling => ceiling.add(side),
            }
            for name in [queue.clone(), topology.dead_letter_queue().to_owned()] {
                publisher
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
    }
    measurement.extra.push((
        "broker_ceiling_per_s".to_owned(),
        format!("{:.0}", ceiling.per_second()),
    ));
    Ok(measurement)
}

/// The consumer a user writes by hand: manual acks, `tasks` deliveries at once; with a pool,
/// `BEGIN; INSERT; COMMIT` and then the ack; without one, the ack alone (the ceiling).
async fn rabbitmq_hand_written(
    channel: &lapin::Channel,
    queue: &str,
    tasks: usize,
    prefetch: u16,
    messages: usize,
    pool: Option<sqlx::PgPool>,
) -> Result<Side, BoxError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let side = consume_by_hand(
        consumer,
        tasks,
        messages,
        |delivery: lapin::message::Delivery| {
            let pool = pool.clone();
            async move {
                insert_into_ledger(pool, &delivery.data).await?;
                delivery.ack(BasicAckOptions::default()).await?;
                Ok(())
            }
        },
    )
    .await?;
    channel.close(200, "done".into()).await?;
    Ok(side)
}

/// What both hand-written consumers do with a delivery before acking it: with a pool,
/// `BEGIN; INSERT; COMMIT`; without one (the ceiling), nothing.
async fn insert_into_ledger(pool: Option<sqlx::PgPool>, payload: &[u8]) -> Result<(), BoxError> {
    let Some(pool) = pool else { return Ok(()) };
    let msg: serde_json::Value = serde_json::from_slice(payload)?;
    let mut tx = pool.begin().await?;
    sqlx::query(LEDGER_INSERT)
        .bind(msg["order_id"].as_str().unwrap_or_default())
        .bind(msg["amount"].as_i64().unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Takes `messages` deliveries from `deliveries` and settles each with `settle`, `tasks` at
/// once, as a hand-written consumer does; timed until the last is settled.
async fn consume_by_hand<T, E, F, Fut>(
    mut deliveries: impl futures_util::Stream<Item = Result<T, E>> + Unpin,
    tasks: usize,
    messages: usize,
    settle: F,
) -> Result<Side, BoxError>
where
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(tasks));
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..messages {
        let delivery = deliveries
            .next()
            .await
            .ok_or("the consumer's stream ended")??;
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let work = settle(delivery);
        running.spawn(async move {
            let settled = work.await;
            drop(permit);
            settled
        });
    }
    while let Some(settled) = running.join_next().await {
        settled??;
    }
    Ok(Side {
        messages,
        elapsed: started.elapsed(),
        latencies_us: Vec::new(),
    })
}

// ---- NATS JetStream -------------------------------------------------------------------------

fn nats_url() -> String {
    std::env::var("IDEM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

pub(super) async fn nats_pg(config: &Config) -> Result<Measurement, BoxError> {
    use async_nats::jetstream::{self, consumer, stream};

    let store = pg_store(config).await?;
    let client = async_nats::connect(nats_url()).await?;
    let context = jetstream::new(client);
    let stream_name = format!("BENCH_{}", config.run_id.replace(['-', '.'], "_"));
    let subjects = format!("bench.{}.>", config.run_id);
    let stream = context
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subjects],
            ..Default::default()
        })
        .await?;
    // idem's runner refuses to start without a stream for its dead letters.
    idem_runtime::broker::nats::ensure_dead_letter_stream(&context, &stream_name).await?;
    let mut measurement = Measurement {
        idem: Side::default(),
        baseline: Side::default(),
        extra: Vec::new(),
    };
    let mut ceiling = Side::default();
    let per_round = config.messages.div_ceil(config.rounds);
    let prefetch = u16::try_from(config.tasks * 2).unwrap_or(u16::MAX);
    for round in 0..config.rounds {
        for role in Role::order(round) {
            let subject = format!("bench.{}.{}.{round}", config.run_id, role.name());
            let mut acks = Vec::with_capacity(per_round);
            for payload in payloads(config, role, round, per_round) {
                acks.push(context.publish(subject.clone(), payload.into()).await?);
            }
            for ack in acks {
                ack.await?;
            }
            let durable = format!("{}-{round}", role.name());
            let pull = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: subject.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: i64::from(prefetch) * 4,
                    ..Default::default()
                })
                .await?;
            let side = match role {
                Role::Idem => {
                    let consumer = NatsConsumer::new(
                        pull,
                        context.clone(),
                        handler!(pg_dedup_handler),
                        store.clone(),
                    )
                    .with_options(
                        ConsumerOptions::default()
                            .concurrency(config.tasks)
                            .prefetch(prefetch),
                    );
                    let shutdown = CancellationToken::new();
                    time_runner(
                        consumer.stats(),
                        consumer.run(shutdown.clone()),
                        shutdown,
                        per_round,
                    )
                    .await?
                }
                Role::Baseline | Role::Ceiling => {
                    let pool = (role == Role::Baseline).then(|| store.pool().clone());
                    nats_hand_written(pull, config.tasks, prefetch, per_round, pool).await?
                }
            };
            match role {
                Role::Idem => measurement.idem.add(side),
                Role::Baseline => measurement.baseline.add(side),
                Role::Ceiling => ceiling.add(side),
            }
            stream.delete_consumer(&durable).await?;
        }
    }
    context.delete_stream(&stream_name).await?;
    context
        .delete_stream(idem_runtime::broker::nats::dead_letter_stream_name(
            &stream_name,
        ))
        .await?;
    measurement.extra.push((
        "broker_ceiling_per_s".to_owned(),
        format!("{:.0}", ceiling.per_second()),
    ));
    Ok(measurement)
}

/// The JetStream consumer a user writes by hand: a pull consumer, `tasks` messages at once;
/// with a pool, `BEGIN; INSERT; COMMIT` and then the ack the server confirms (as idem's runner
/// acks by default); without one, the ack alone (the ceiling).
async fn nats_hand_written(
    pull: async_nats::jetstream::consumer::PullConsumer,
    tasks: usize,
    prefetch: u16,
    messages: usize,
    pool: Option<sqlx::PgPool>,
) -> Result<Side, BoxError> {
    let fetched = pull
        .stream()
        .max_messages_per_batch(usize::from(prefetch))
        .messages()
        .await?;
    consume_by_hand(
        fetched,
        tasks,
        messages,
        |message: async_nats::jetstream::Message| {
            let pool = pool.clone();
            async move {
                insert_into_ledger(pool, &message.payload).await?;
                message.double_ack().await?;
                Ok(())
            }
        },
    )
    .await
}

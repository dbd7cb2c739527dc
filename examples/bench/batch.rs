//! Batch mode (`#[idempotent(.., batch)]`): `pg-batch` and `rabbitmq-pg-batch`.
//!
//! Batches of [`BATCH`] messages. The idempotent side gates every key of a batch in one
//! statement, runs the same multi-row insert as the baseline and commits once; the baseline is
//! a hand-written batch, `BEGIN; INSERT … SELECT FROM unnest(…); COMMIT`. Also measured in the
//! same run, as extra fields: the per-message `dedup_table` handler (`per_message_per_s`,
//! `vs_per_message` = idem ÷ it), and, for `pg-batch`, a hand-written batch *with* a gate of
//! its own, the inbox people write (`INSERT … ON CONFLICT DO NOTHING RETURNING` on a key table,
//! then the rows of the keys it returned; `gated_baseline_per_s`, `vs_gated`), and the same
//! in a key table shaped as idem's records, `(consumer, message_id)` (`inbox_baseline_per_s`,
//! `vs_inbox`).
//!
//! The latencies of `pg-batch` are per batch, not per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idem_runtime::broker::rabbitmq::lapin;
use idem_runtime::broker::rabbitmq::{RabbitMqBatchConsumer, RabbitMqConsumer, RabbitMqTopology};
use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions};
use idem_runtime::{NoAck, PgTx, batch_handler, handler, idempotent};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Semaphore;

use super::{
    BenchError, BenchMsg, BoxError, Config, Measurement, Side, bench_msg, drive, pg_dedup_handler,
    pg_store, processed,
};

/// Messages per batch.
const BATCH: usize = 100;

const ROWS_INSERT: &str =
    "INSERT INTO bench_ledger (order_id, amount) SELECT * FROM unnest($1::text[], $2::bigint[])";

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "bench.pg.batch",
    batch
)]
async fn pg_batch_handler(tx: &mut PgTx<'_>, msgs: &[BenchMsg]) -> Result<(), BenchError> {
    insert_rows(tx, msgs).await?;
    Ok(())
}

/// The business write of a batch, the same on every side: one multi-row insert.
async fn insert_rows(conn: &mut sqlx::PgConnection, msgs: &[BenchMsg]) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
    let amounts: Vec<i64> = msgs.iter().map(|msg| msg.amount).collect();
    sqlx::query(ROWS_INSERT)
        .bind(ids)
        .bind(amounts)
        .execute(conn)
        .await?;
    Ok(())
}

fn batch_of(batch_id: &str) -> Vec<BenchMsg> {
    (0..BATCH)
        .map(|n| bench_msg(format!("{batch_id}-{n}")))
        .collect()
}

/// A side driven batch by batch, counted in messages.
fn in_messages(mut side: Side) -> Side {
    side.messages *= BATCH;
    side
}

pub(super) async fn pg_batch(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    let pool = store.pool().clone();
    let mut measurement = Measurement {
        idem: Side::default(),
        baseline: Side::default(),
        extra: Vec::new(),
    };
    let (mut per_message, mut gated, mut inbox) =
        (Side::default(), Side::default(), Side::default());
    let per_round = config.messages.div_ceil(config.rounds);
    let batches = per_round.div_ceil(BATCH);
    for round in 0..config.rounds {
        let ids = |side: &str, count: usize| -> Vec<String> {
            (0..count)
                .map(|n| format!("{}-pgb-{side}-{round}-{n}", config.run_id))
                .collect()
        };
        // Five sides, each first in turn.
        for turn in 0..5 {
            match (round + turn) % 5 {
                0 => {
                    let store = store.clone();
                    let side = drive(config.tasks, ids("idem", batches), move |id| {
                        let store = store.clone();
                        async move {
                            let deliveries: Vec<_> =
                                batch_of(&id).into_iter().map(|msg| (msg, NoAck)).collect();
                            for result in pg_batch_handler(&store, deliveries).await {
                                processed(&result?)?;
                            }
                            Ok(())
                        }
                    })
                    .await?;
                    measurement.idem.add(in_messages(side));
                }
                1 => {
                    let pool = pool.clone();
                    let side = drive(config.tasks, ids("base", batches), move |id| {
                        let pool = pool.clone();
                        async move {
                            let mut tx = pool.begin().await?;
                            insert_rows(&mut tx, &batch_of(&id)).await?;
                            tx.commit().await?;
                            Ok(())
                        }
                    })
                    .await?;
                    measurement.baseline.add(in_messages(side));
                }
                2 => {
                    let pool = pool.clone();
                    let side = drive(config.tasks, ids("gated", batches), move |id| {
                        let pool = pool.clone();
                        async move { gated_batch(&pool, &batch_of(&id)).await }
                    })
                    .await?;
                    gated.add(in_messages(side));
                }
                3 => {
                    let pool = pool.clone();
                    let side = drive(config.tasks, ids("inbox", batches), move |id| {
                        let pool = pool.clone();
                        async move { inbox_batch(&pool, &batch_of(&id)).await }
                    })
                    .await?;
                    inbox.add(in_messages(side));
                }
                _ => {
                    // Fewer messages one by one: the per-message rate is what is compared.
                    let store = store.clone();
                    let side =
                        drive(config.tasks, ids("single", per_round / 4), move |key| {
                            let store = store.clone();
                            async move {
                                processed(&pg_dedup_handler(&store, bench_msg(key), NoAck).await?)
                            }
                        })
                        .await?;
                    per_message.add(side);
                }
            }
        }
    }
    let idem = measurement.idem.per_second();
    measurement.extra.extend([
        ("batch".to_owned(), BATCH.to_string()),
        (
            "per_message_per_s".to_owned(),
            format!("{:.0}", per_message.per_second()),
        ),
        (
            "vs_per_message".to_owned(),
            format!("{:.2}", idem / per_message.per_second().max(f64::EPSILON)),
        ),
        (
            "gated_baseline_per_s".to_owned(),
            format!("{:.0}", gated.per_second()),
        ),
        (
            "vs_gated".to_owned(),
            format!("{:.3}", idem / gated.per_second().max(f64::EPSILON)),
        ),
        (
            "inbox_baseline_per_s".to_owned(),
            format!("{:.0}", inbox.per_second()),
        ),
        (
            "vs_inbox".to_owned(),
            format!("{:.3}", idem / inbox.per_second().max(f64::EPSILON)),
        ),
    ]);
    Ok(measurement)
}

/// The inbox written by hand for a batch: claim the keys in one statement, write the rows of
/// the keys it claimed, commit.
async fn gated_batch(pool: &sqlx::PgPool, msgs: &[BenchMsg]) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    let keys: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO bench_dedup (dedup_key) SELECT * FROM unnest($1::text[]) \
         ON CONFLICT DO NOTHING RETURNING dedup_key",
    )
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    if claimed.len() != msgs.len() {
        return Err("the gated baseline found a duplicate: keys are not unique".into());
    }
    insert_rows(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

/// The same, in a key table shaped as idem's records and as many services' inboxes are: the
/// consumer's name and the message's key, `PRIMARY KEY (consumer, message_id)`.
async fn inbox_batch(pool: &sqlx::PgPool, msgs: &[BenchMsg]) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    let keys: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO bench_inbox (consumer, message_id) SELECT 'bench.orders', k FROM unnest($1::text[]) k \
         ON CONFLICT DO NOTHING RETURNING message_id",
    )
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    if claimed.len() != msgs.len() {
        return Err("the inbox baseline found a duplicate: keys are not unique".into());
    }
    insert_rows(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

// ---- RabbitMQ -------------------------------------------------------------------------------

/// Which consumer a queue is filled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    IdemBatch,
    HandWrittenBatch,
    IdemPerMessage,
}

impl Consumer {
    fn name(self) -> &'static str {
        match self {
            Self::IdemBatch => "idem",
            Self::HandWrittenBatch => "base",
            Self::IdemPerMessage => "single",
        }
    }
}

pub(super) async fn rabbitmq_pg_batch(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    let connection =
        Connection::connect(&super::brokers::amqp_url(), ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let batches = BatchOptions::default()
        .max_size(BATCH)
        .max_wait(Duration::from_millis(20));
    let options = ConsumerOptions::default().concurrency(config.tasks);
    let prefetch = u16::try_from(BATCH * config.tasks).unwrap_or(u16::MAX);
    let mut measurement = Measurement {
        idem: Side::default(),
        baseline: Side::default(),
        extra: Vec::new(),
    };
    let mut per_message = Side::default();
    let per_round = config.messages.div_ceil(config.rounds);
    let order = [
        Consumer::IdemBatch,
        Consumer::HandWrittenBatch,
        Consumer::IdemPerMessage,
    ];
    for round in 0..config.rounds {
        for turn in 0..order.len() {
            let consumer = order[(round + turn) % order.len()];
            // The per-message consumer is slower: fewer messages, the same rate compared.
            let count = if consumer == Consumer::IdemPerMessage {
                per_round / 4
            } else {
                per_round
            };
            let queue = format!("bench.{}.batch.{}.{round}", config.run_id, consumer.name());
            let topology = RabbitMqTopology::for_queue(&queue)?;
            topology.declare(&publisher).await?;
            let mut confirms = Vec::with_capacity(count);
            for n in 0..count {
                let msg = bench_msg(format!("{queue}-{n}"));
                confirms.push(
                    publisher
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &serde_json::to_vec(&msg)?,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                confirm.await?;
            }
            let channel = connection.create_channel().await?;
            let side = match consumer {
                Consumer::IdemBatch => {
                    let runner = RabbitMqBatchConsumer::new(
                        channel,
                        topology.clone(),
                        batch_handler!(pg_batch_handler),
                        store.clone(),
                    )
                    .with_options(options)
                    .with_batch(batches);
                    let shutdown = CancellationToken::new();
                    super::brokers::time_runner(
                        runner.stats(),
                        runner.run(shutdown.clone()),
                        shutdown,
                        count,
                    )
                    .await?
                }
                Consumer::IdemPerMessage => {
                    let runner = RabbitMqConsumer::new(
                        channel,
                        topology.clone(),
                        handler!(pg_dedup_handler),
                        store.clone(),
                    )
                    .with_options(options.prefetch(u16::try_from(config.tasks * 2)?));
                    let shutdown = CancellationToken::new();
                    super::brokers::time_runner(
                        runner.stats(),
                        runner.run(shutdown.clone()),
                        shutdown,
                        count,
                    )
                    .await?
                }
                Consumer::HandWrittenBatch => {
                    rabbitmq_batch_by_hand(
                        &channel,
                        &queue,
                        config.tasks,
                        prefetch,
                        count,
                        store.pool().clone(),
                    )
                    .await?
                }
            };
            match consumer {
                Consumer::IdemBatch => measurement.idem.add(side),
                Consumer::HandWrittenBatch => measurement.baseline.add(side),
                Consumer::IdemPerMessage => per_message.add(side),
            }
            for name in [queue.clone(), topology.dead_letter_queue().to_owned()] {
                publisher
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
    }
    measurement.extra.extend([
        ("batch".to_owned(), BATCH.to_string()),
        (
            "per_message_per_s".to_owned(),
            format!("{:.0}", per_message.per_second()),
        ),
        (
            "vs_per_message".to_owned(),
            format!(
                "{:.2}",
                measurement.idem.per_second() / per_message.per_second().max(f64::EPSILON)
            ),
        ),
    ]);
    Ok(measurement)
}

/// The batch consumer a user writes by hand: up to [`BATCH`] deliveries or 20 ms, `tasks`
/// batches at once, each `BEGIN; INSERT … unnest; COMMIT`, then an ack per delivery.
async fn rabbitmq_batch_by_hand(
    channel: &lapin::Channel,
    queue: &str,
    tasks: usize,
    prefetch: u16,
    messages: usize,
    pool: sqlx::PgPool,
) -> Result<Side, BoxError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let permits = Arc::new(Semaphore::new(tasks));
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut taken = 0;
    while taken < messages {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let first = consumer
            .next()
            .await
            .ok_or("the consumer's stream ended")??;
        let mut deliveries = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        while deliveries.len() < BATCH && taken + deliveries.len() < messages {
            tokio::select! {
                next = consumer.next() => deliveries.push(next.ok_or("the consumer's stream ended")??),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        taken += deliveries.len();
        let pool = pool.clone();
        running.spawn(async move {
            let msgs = deliveries
                .iter()
                .map(|delivery| serde_json::from_slice::<BenchMsg>(&delivery.data))
                .collect::<Result<Vec<_>, _>>()?;
            let mut tx = pool.begin().await?;
            insert_rows(&mut tx, &msgs).await?;
            tx.commit().await?;
            for delivery in deliveries {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            drop(permit);
            Ok::<(), BoxError>(())
        });
    }
    while let Some(settled) = running.join_next().await {
        settled??;
    }
    let side = Side {
        messages,
        elapsed: started.elapsed(),
        latencies_us: Vec::new(),
    };
    channel.close(200, "done".into()).await?;
    Ok(side)
}

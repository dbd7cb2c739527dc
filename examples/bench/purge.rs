//! `pg-purge`: what a purge of 5,000,000 expired records costs the live path on PostgreSQL.
//!
//! The gate (`dedup_table` with its business insert, 16 tasks) runs without a purge, then while
//! `purge_expired` deletes 5,000,000 expired records in batches of 5,000 (one statement and one
//! commit per batch, on a connection of its own), then without again. The idempotent side of
//! the BENCH line is the gate during the purge, the baseline the gate without it (both halves
//! pooled), so `ratio` is the throughput the gate keeps while a purge runs and `p50_us`/
//! `p99_us` against `p50_us_without`/`p99_us_without` its latency. `purge_per_s` is the purge's
//! own throughput. The records live in `idem_bench_purge.idem_records`, reloaded every run.
//!
//! `pg-purge-paced` is the same with `pause_between_batches(100 ms)`: what pacing buys the
//! live path, and what it costs the purge.

use std::time::Instant;

use std::time::Duration;

use idem_runtime::retention::{PurgeOptions, purge};
use idem_runtime::store::RecordsTable;
use idem_runtime::{NoAck, PgStore};
use sqlx::postgres::PgPoolOptions;

use super::{BoxError, Config, Measurement, Side, bench_msg, drive, pg_dedup_handler, processed};

const RECORDS: i64 = 5_000_000;

/// The pause of `pg-purge-paced`.
const PACED: Duration = Duration::from_millis(100);

pub(crate) async fn pg_purge(config: &Config) -> Result<Measurement, BoxError> {
    purge_while_gating(config, Duration::ZERO).await
}

pub(crate) async fn pg_purge_paced(config: &Config) -> Result<Measurement, BoxError> {
    purge_while_gating(config, PACED).await
}

async fn purge_while_gating(config: &Config, pause: Duration) -> Result<Measurement, BoxError> {
    let admin = super::pg_store(config).await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS idem_bench_purge")
        .execute(admin.pool())
        .await?;
    let table = RecordsTable::parse("idem_bench_purge.idem_records")?;
    let gate = PgStore::new(admin.pool().clone()).with_records_table(table.clone());
    gate.migrate().await?;
    sqlx::query("TRUNCATE idem_bench_purge.idem_records")
        .execute(admin.pool())
        .await?;
    let loading = Instant::now();
    eprintln!("pg-purge: loading {RECORDS} expired records…");
    sqlx::query(
        "INSERT INTO idem_bench_purge.idem_records (scope, record_key, created_at_ms, expires_at_ms) \
         SELECT 'bench.pg.purge', 'order-' || g, 0, 1 FROM generate_series(1, $1) g",
    )
    .bind(RECORDS)
    .execute(admin.pool())
    .await?;
    sqlx::query("VACUUM ANALYZE idem_bench_purge.idem_records")
        .execute(admin.pool())
        .await?;
    eprintln!("pg-purge: loaded in {:.0?}", loading.elapsed());

    // The purge has a connection of its own, as a purger in a service would.
    let purge_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(admin.pool().connect_options().as_ref().clone())
        .await?;
    let purger = PgStore::new(purge_pool).with_records_table(table);

    let gate_work = |gate: PgStore| {
        move |key: String| {
            let store = gate.clone();
            async move { processed(&pg_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        }
    };
    let keys = |phase: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}-pg-purge-{phase}-{i}", config.run_id))
            .collect()
    };
    let half = config.messages.div_ceil(2);
    let mut without = drive(config.tasks, keys("before", half), gate_work(gate.clone())).await?;

    let purge_started = Instant::now();
    let options = PurgeOptions::new().pause_between_batches(pause);
    let purge = tokio::spawn(async move {
        purge(&purger, &options, |_| {})
            .await
            .map(|done| done.deleted)
    });
    let during = drive(
        config.tasks,
        keys("during", config.messages),
        gate_work(gate.clone()),
    )
    .await?;
    let purge_outlived_the_gates = !purge.is_finished();
    let purged = purge.await??;
    let purge_elapsed = purge_started.elapsed();
    if !purge_outlived_the_gates {
        eprintln!("pg-purge: the purge ended before the gates did: raise --messages");
    }
    without.add(drive(config.tasks, keys("after", half), gate_work(gate)).await?);

    let purge_per_s = purged as f64 / purge_elapsed.as_secs_f64().max(f64::EPSILON);
    let mut measurement = Measurement {
        idem: during,
        baseline: Side::default(),
        extra: Vec::new(),
    };
    measurement.extra.extend([
        ("purged".into(), purged.to_string()),
        (
            "purge_s".into(),
            format!("{:.1}", purge_elapsed.as_secs_f64()),
        ),
        ("purge_per_s".into(), format!("{purge_per_s:.0}")),
        (
            "batch".into(),
            idem_runtime::retention::DEFAULT_BATCH_SIZE.to_string(),
        ),
        (
            "p50_us_without".into(),
            without.percentile(0.50).to_string(),
        ),
        (
            "p99_us_without".into(),
            without.percentile(0.99).to_string(),
        ),
        (
            "purge_outlived_the_gates".into(),
            purge_outlived_the_gates.to_string(),
        ),
    ]);
    measurement.baseline = without;
    Ok(measurement)
}

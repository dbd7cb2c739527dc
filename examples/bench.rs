//! The cost of idempotency: each scenario runs an `#[idempotent]` handler and a hand-written
//! baseline doing the same business write, on the same pool, with the same concurrency,
//! interleaved in the same run.
//!
//! ```text
//! cargo run --release -p idem-examples --example bench -- <scenario>|--all [--messages N] [--tasks T] [--runs R]
//! ```
//!
//! Each run ends with one line per scenario:
//!
//! ```text
//! BENCH scenario=<name> idem_per_s=<x> baseline_per_s=<y> ratio=<x/y> p50_us=<…> p99_us=<…>
//! ```
//!
//! (`p50_us`/`p99_us`: the idempotent side's latency per message; the broker scenarios,
//! `rabbitmq-pg` and `nats-pg` (in `bench/brokers.rs`), time whole consumptions instead and add
//! `broker_ceiling_per_s`; `redis-lock` (in `bench/redis.rs`) compares with the physical floor
//! of its Redis round trips and adds its own fields, see there). With `--runs R`, the line
//! carries the median run's figures and `ratio_min`/`ratio_max` over the runs. Keys are unique
//! per run, so repeating a run never measures duplicates by accident; `pg-duplicates` measures
//! duplicates on purpose. Services: PostgreSQL, MariaDB and Redis as in the tests
//! (`IDEM_TEST_PG_URL`, `IDEM_TEST_MYSQL_URL`, `IDEM_TEST_REDIS_URL`); SQLite in a temporary
//! file.
//!
//! Adding a scenario: write an `async fn(&Config) -> Result<Measurement, BoxError>` and add it
//! to [`SCENARIOS`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::{
    HandlerError, MySqlStore, MySqlTx, NoAck, PgStore, PgTx, SqliteStore, SqliteTx, idempotent,
};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ScenarioFuture<'a> = Pin<Box<dyn Future<Output = Result<Measurement, BoxError>> + 'a>>;
type ScenarioFn = fn(&Config) -> ScenarioFuture<'_>;

/// Every scenario: name, what it measures, how to run it.
const SCENARIOS: &[(&str, &str, ScenarioFn)] = &[
    (
        "pg-unique-constraint",
        "unique_constraint vs BEGIN; INSERT; COMMIT",
        |c| Box::pin(pg_unique_constraint(c)),
    ),
    (
        "pg-dedup-table",
        "dedup_table vs the same insert without a gate",
        |c| Box::pin(pg_dedup_table(c)),
    ),
    (
        "pg-state-machine",
        "state_machine vs a hand-written guarded UPDATE",
        |c| Box::pin(pg_state_machine(c)),
    ),
    (
        "pg-duplicates",
        "redeliveries only: dedup_table rejecting vs a hand-written ON CONFLICT check",
        |c| Box::pin(pg_duplicates(c)),
    ),
    (
        "pg-growth",
        "the dedup_table gate with 5,000,000 existing records vs an empty table",
        |c| Box::pin(pg_growth(c)),
    ),
    (
        "pg-purge",
        "the dedup_table gate while purge_expired deletes 5,000,000 expired records vs without a purge",
        |c| Box::pin(purge::pg_purge(c)),
    ),
    (
        "pg-purge-paced",
        "pg-purge with 100 ms between batches",
        |c| Box::pin(purge::pg_purge_paced(c)),
    ),
    (
        "sqlite-dedup-table",
        "dedup_table vs the same insert without a gate, SQLite file",
        |c| Box::pin(sqlite_dedup_table(c)),
    ),
    (
        "sqlite-unique-constraint",
        "unique_constraint vs BEGIN IMMEDIATE; INSERT; COMMIT, SQLite file",
        |c| Box::pin(sqlite_unique_constraint(c)),
    ),
    (
        "sqlite-durability",
        "dedup_table with synchronous = FULL (the default) vs NORMAL, SQLite files",
        |c| Box::pin(sqlite_durability(c)),
    ),
    (
        "mysql-dedup-table",
        "dedup_table vs the same insert without a gate, MariaDB",
        |c| Box::pin(mysql_dedup_table(c)),
    ),
    (
        "rabbitmq-pg",
        "RabbitMQ -> idem's consumer, dedup_table on PostgreSQL, ack after commit vs a hand-written consumer",
        |c| Box::pin(brokers::rabbitmq_pg(c)),
    ),
    (
        "nats-pg",
        "JetStream -> idem's consumer, dedup_table on PostgreSQL, ack after commit vs a hand-written consumer",
        |c| Box::pin(brokers::nats_pg(c)),
    ),
    (
        "pg-batch",
        "batches of 100 with the dedup_table gate vs a hand-written batch insert (and vs per-message dedup_table, and a hand-gated batch)",
        |c| Box::pin(batch::pg_batch(c)),
    ),
    (
        "rabbitmq-pg-batch",
        "RabbitMQ -> idem's batch consumer (batches of 100, dedup_table on PostgreSQL) vs a hand-written batch consumer (and vs idem's per-message consumer)",
        |c| Box::pin(batch::rabbitmq_pg_batch(c)),
    ),
    (
        "redis-lock",
        "lock on Redis (first deliveries, duplicates, 32 tasks) vs raw SET NX PX and the marker script alone",
        |c| Box::pin(redis_lock::redis_lock(c)),
    ),
];

#[path = "bench/batch.rs"]
mod batch;
#[path = "bench/brokers.rs"]
mod brokers;
#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/purge.rs"]
mod purge;
#[path = "bench/redis.rs"]
mod redis_lock;

/// Command-line settings.
#[derive(Debug, Clone)]
struct Config {
    messages: usize,
    tasks: usize,
    /// Rounds per run: idem and baseline alternate who goes first.
    rounds: usize,
    run_id: String,
    /// `--pg-latency-us`: added to each direction of every PostgreSQL round trip (0: none).
    pg_latency_us: u64,
    /// `--gate-in-begin`: `PgStore::with_gate_in_begin(true)` for the idempotent side.
    gate_in_begin: bool,
}

/// One message of the benchmark.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct BenchMsg {
    order_id: String,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl HandlerError for BenchError {}

// ---- the handlers under test -------------------------------------------------------------

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "unique_constraint",
    scope = "bench.pg.unique",
    constraint = "bench_payments_order_id_key"
)]
async fn pg_unique_handler(tx: &mut PgTx<'_>, msg: BenchMsg) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO bench_payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "bench.pg.dedup"
)]
async fn pg_dedup_handler(tx: &mut PgTx<'_>, msg: BenchMsg) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO bench_ledger (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "state_machine",
    scope = "bench.pg.sm",
    table = "bench_orders",
    column = "status",
    from = "pending",
    to = "paid"
)]
async fn pg_state_handler(_tx: &mut PgTx<'_>, _msg: BenchMsg) -> Result<(), BenchError> {
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "bench.pg.growth"
)]
async fn pg_gate_only(_tx: &mut PgTx<'_>, _msg: BenchMsg) -> Result<(), BenchError> {
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "bench.sqlite.dedup"
)]
async fn sqlite_dedup_handler(tx: &mut SqliteTx<'_>, msg: BenchMsg) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO bench_ledger (order_id, amount) VALUES (?1, ?2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "unique_constraint",
    scope = "bench.sqlite.unique",
    constraint = "bench_payments.order_id"
)]
async fn sqlite_unique_handler(tx: &mut SqliteTx<'_>, msg: BenchMsg) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO bench_payments (order_id, amount) VALUES (?1, ?2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "mysql",
    strategy = "dedup_table",
    scope = "bench.mysql.dedup"
)]
async fn mysql_dedup_handler(tx: &mut MySqlTx<'_>, msg: BenchMsg) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO bench_ledger (order_id, amount) VALUES (?, ?)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// ---- measuring ----------------------------------------------------------------------------

/// What one side did: messages, wall time, per-message latencies.
#[derive(Debug, Default)]
struct Side {
    messages: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Side {
    fn add(&mut self, other: Side) {
        self.messages += other.messages;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
    }

    fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or(0)
    }
}

/// The idempotent side and the baseline side of one run.
struct Measurement {
    idem: Side,
    baseline: Side,
    /// Extra `name=value` fields for the BENCH line.
    extra: Vec<(String, String)>,
}

impl Measurement {
    fn ratio(&self) -> f64 {
        self.idem.per_second() / self.baseline.per_second().max(f64::EPSILON)
    }
}

/// Runs `work` for every key, from `tasks` concurrent tasks, timing each call.
async fn drive<F, Fut>(tasks: usize, keys: Vec<String>, work: F) -> Result<Side, BoxError>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (keys, next, work) = (Arc::clone(&keys), Arc::clone(&next), Arc::clone(&work));
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(key) = keys.get(i) else { break };
                let t = Instant::now();
                work(key.clone()).await?;
                latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            Ok::<_, BoxError>(latencies)
        });
    }
    let mut latencies_us = Vec::with_capacity(keys.len());
    while let Some(joined) = workers.join_next().await {
        latencies_us.extend(joined??);
    }
    Ok(Side {
        messages: keys.len(),
        elapsed: started.elapsed(),
        latencies_us,
    })
}

/// Interleaves the two sides in `config.rounds` rounds (alternating who goes first), each side
/// handling `config.messages` keys in all, named `<run>-<label>-<side>-<n>`.
async fn compare<I, IF, B, BF>(
    config: &Config,
    label: &str,
    idem: I,
    baseline: B,
) -> Result<Measurement, BoxError>
where
    I: Fn(String) -> IF + Clone + Send + Sync + 'static,
    IF: Future<Output = Result<(), BoxError>> + Send + 'static,
    B: Fn(String) -> BF + Clone + Send + Sync + 'static,
    BF: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let mut measurement = Measurement {
        idem: Side::default(),
        baseline: Side::default(),
        extra: Vec::new(),
    };
    let per_round = config.messages.div_ceil(config.rounds);
    for round in 0..config.rounds {
        let keys = |side: &str| -> Vec<String> {
            (0..per_round)
                .map(|n| format!("{}-{label}-{side}-{}", config.run_id, round * per_round + n))
                .collect()
        };
        let (idem_keys, base_keys) = (keys("idem"), keys("base"));
        if round % 2 == 0 {
            measurement
                .idem
                .add(drive(config.tasks, idem_keys, idem.clone()).await?);
            measurement
                .baseline
                .add(drive(config.tasks, base_keys, baseline.clone()).await?);
        } else {
            measurement
                .baseline
                .add(drive(config.tasks, base_keys, baseline.clone()).await?);
            measurement
                .idem
                .add(drive(config.tasks, idem_keys, idem.clone()).await?);
        }
    }
    Ok(measurement)
}

fn bench_msg(order_id: String) -> BenchMsg {
    BenchMsg {
        order_id,
        amount: 100,
    }
}

fn processed(outcome: &idem_runtime::Outcome<()>) -> Result<(), BoxError> {
    if outcome.is_processed() {
        Ok(())
    } else {
        Err("expected a fresh message, got a duplicate: keys are not unique".into())
    }
}

// ---- PostgreSQL ---------------------------------------------------------------------------

/// The PostgreSQL to connect to: `IDEM_TEST_PG_URL`, through the latency proxy when
/// `--pg-latency-us` asks for one (started once per process).
fn pg_connect_options(config: &Config) -> Result<sqlx::postgres::PgConnectOptions, BoxError> {
    static PROXY_PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    if config.pg_latency_us == 0 {
        return Ok(options);
    }
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let port = match PROXY_PORT.get() {
        Some(port) => *port,
        None => *PROXY_PORT.get_or_init(|| {
            latency::start(upstream, Duration::from_micros(config.pg_latency_us))
                .expect("start the latency proxy")
        }),
    };
    Ok(options.host("127.0.0.1").port(port))
}

async fn pg_store(config: &Config) -> Result<PgStore, BoxError> {
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(config.tasks)?)
        .connect_with(pg_connect_options(config)?)
        .await?;
    let store = PgStore::new(pool).with_gate_in_begin(config.gate_in_begin);
    store.migrate().await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS bench_payments (order_id VARCHAR(255) NOT NULL, amount BIGINT NOT NULL, CONSTRAINT bench_payments_order_id_key UNIQUE (order_id))",
        "CREATE TABLE IF NOT EXISTS bench_ledger (order_id VARCHAR(255) NOT NULL, amount BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS bench_orders (order_id VARCHAR(255) PRIMARY KEY, status VARCHAR(32) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS bench_dedup (dedup_key VARCHAR(255) PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS bench_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (consumer, message_id))",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(store.pool())
            .await?;
    }
    Ok(store)
}

/// The hand-written baseline of the insert scenarios: `BEGIN; INSERT; COMMIT`.
async fn pg_insert_baseline(
    pool: sqlx::PgPool,
    sql: &'static str,
    key: String,
) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    sqlx::query(sql)
        .bind(&key)
        .bind(100_i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn pg_unique_constraint(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "pg-unique",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&pg_unique_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            pg_insert_baseline(
                pool.clone(),
                "INSERT INTO bench_payments (order_id, amount) VALUES ($1, $2)",
                key,
            )
        },
    )
    .await
}

async fn pg_dedup_table(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "pg-dedup",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&pg_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            pg_insert_baseline(
                pool.clone(),
                "INSERT INTO bench_ledger (order_id, amount) VALUES ($1, $2)",
                key,
            )
        },
    )
    .await
}

async fn pg_state_machine(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    // Every key of this run exists as a pending order, for both sides.
    for side in ["idem", "base"] {
        sqlx::query(
            "INSERT INTO bench_orders (order_id, status) \
             SELECT $1 || '-pg-sm-' || $2 || '-' || g, 'pending' FROM generate_series(0, $3) g",
        )
        .bind(&config.run_id)
        .bind(side)
        .bind(i64::try_from(config.messages + config.rounds)?)
        .execute(store.pool())
        .await?;
    }
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "pg-sm",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&pg_state_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await?;
                let moved = sqlx::query(
                    "UPDATE bench_orders SET status = $1 WHERE order_id = $2 AND status IN ($3)",
                )
                .bind("paid")
                .bind(&key)
                .bind("pending")
                .execute(&mut *tx)
                .await?;
                if moved.rows_affected() != 1 {
                    return Err("the baseline's order was not pending".into());
                }
                tx.commit().await?;
                Ok(())
            }
        },
    )
    .await
}

async fn pg_duplicates(config: &Config) -> Result<Measurement, BoxError> {
    let store = pg_store(config).await?;
    // First deliveries, not timed: afterwards every measured delivery is a duplicate.
    let per_round = config.messages.div_ceil(config.rounds);
    let total = per_round * config.rounds;
    for n in 0..total {
        let key = |side: &str| format!("{}-pg-dup-{side}-{n}", config.run_id);
        pg_dedup_handler(&store, bench_msg(key("idem")), NoAck).await?;
        sqlx::query("INSERT INTO bench_dedup (dedup_key) VALUES ($1)")
            .bind(key("base"))
            .execute(store.pool())
            .await?;
    }
    let idem_store = store.clone();
    let pool = store.pool().clone();
    let mut measurement = compare(
        config,
        "pg-dup",
        move |key| {
            let store = idem_store.clone();
            async move {
                let outcome = pg_dedup_handler(&store, bench_msg(key), NoAck).await?;
                if outcome.is_duplicate() {
                    Ok(())
                } else {
                    Err("a redelivery was processed again".into())
                }
            }
        },
        move |key| {
            let pool = pool.clone();
            async move {
                // The hand-written gate: claim the key; 0 rows means duplicate, skip the work.
                let mut tx = pool.begin().await?;
                let claimed = sqlx::query(
                    "INSERT INTO bench_dedup (dedup_key) VALUES ($1) ON CONFLICT DO NOTHING",
                )
                .bind(&key)
                .execute(&mut *tx)
                .await?;
                if claimed.rows_affected() != 0 {
                    return Err("the baseline's key was not a duplicate".into());
                }
                tx.commit().await?;
                Ok(())
            }
        },
    )
    .await?;
    measurement
        .extra
        .push(("measures".into(), "duplicates".into()));
    Ok(measurement)
}

/// The gate alone (empty body), first on an empty `idem_records`, then with 5,000,000 records,
/// in a schema of its own so the other scenarios' table stays small.
async fn pg_growth(config: &Config) -> Result<Measurement, BoxError> {
    const RECORDS: i64 = 5_000_000;
    let url = std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool_in = |schema: &'static str| {
        let url = url.clone();
        let tasks = u32::try_from(config.tasks);
        async move {
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            let pool = PgPoolOptions::new()
                .max_connections(tasks?)
                .connect_with(options.options([("search_path", schema)]))
                .await?;
            Ok::<_, BoxError>(PgStore::new(pool))
        }
    };
    let admin = pg_store(config).await?;
    for schema in ["idem_bench_empty", "idem_bench_full"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(admin.pool())
        .await?;
    }
    sqlx::query("DROP TABLE IF EXISTS idem_bench_empty.idem_records")
        .execute(admin.pool())
        .await?;
    let empty = pool_in("idem_bench_empty").await?;
    empty.migrate().await?;
    let full = pool_in("idem_bench_full").await?;
    full.migrate().await?;
    let existing: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM idem_bench_full.idem_records WHERE scope = 'bench.pg.preload'",
    )
    .fetch_one(admin.pool())
    .await?;
    if existing < RECORDS {
        eprintln!("pg-growth: loading {RECORDS} records (once; kept for later runs)…");
        sqlx::query("DELETE FROM idem_bench_full.idem_records WHERE scope = 'bench.pg.preload'")
            .execute(admin.pool())
            .await?;
        sqlx::query(
            "INSERT INTO idem_bench_full.idem_records (scope, record_key, created_at_ms) \
             SELECT 'bench.pg.preload', 'order-' || g, 0 FROM generate_series(1, $1) g",
        )
        .bind(RECORDS)
        .execute(admin.pool())
        .await?;
        sqlx::query("VACUUM ANALYZE idem_bench_full.idem_records")
            .execute(admin.pool())
            .await?;
    }
    let (bytes, rows): (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('idem_bench_full.idem_records'), COUNT(*) FROM idem_bench_full.idem_records",
    )
    .fetch_one(admin.pool())
    .await?;
    let mut measurement = compare(
        config,
        "pg-growth",
        move |key| {
            let store = full.clone();
            async move { processed(&pg_gate_only(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            let store = empty.clone();
            async move { processed(&pg_gate_only(&store, bench_msg(key), NoAck).await?) }
        },
    )
    .await?;
    measurement.extra.extend([
        ("records".into(), rows.to_string()),
        ("bytes_per_record".into(), (bytes / rows.max(1)).to_string()),
        (
            "p50_us_empty".into(),
            measurement.baseline.percentile(0.50).to_string(),
        ),
        (
            "p99_us_empty".into(),
            measurement.baseline.percentile(0.99).to_string(),
        ),
    ]);
    Ok(measurement)
}

// ---- SQLite -------------------------------------------------------------------------------

async fn sqlite_store(config: &Config) -> Result<SqliteStore, BoxError> {
    sqlite_store_with(config, "", idem_runtime::Synchronous::Full).await
}

async fn sqlite_store_with(
    config: &Config,
    suffix: &str,
    synchronous: idem_runtime::Synchronous,
) -> Result<SqliteStore, BoxError> {
    let path = std::env::temp_dir().join(format!("idem-bench-{}{suffix}.db", config.run_id));
    let store = SqliteStore::open_with(&path, synchronous).await?;
    store.migrate().await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS bench_payments (order_id TEXT NOT NULL UNIQUE, amount INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS bench_ledger (order_id TEXT NOT NULL, amount INTEGER NOT NULL)",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(store.pool())
            .await?;
    }
    Ok(store)
}

async fn sqlite_insert_baseline(
    pool: sqlx::SqlitePool,
    table: &'static str,
    key: String,
) -> Result<(), BoxError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let sql = if table == "bench_ledger" {
        "INSERT INTO bench_ledger (order_id, amount) VALUES (?1, ?2)"
    } else {
        "INSERT INTO bench_payments (order_id, amount) VALUES (?1, ?2)"
    };
    sqlx::query(sql)
        .bind(&key)
        .bind(100_i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn sqlite_dedup_table(config: &Config) -> Result<Measurement, BoxError> {
    let store = sqlite_store(config).await?;
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "sqlite-dedup",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&sqlite_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| sqlite_insert_baseline(pool.clone(), "bench_ledger", key),
    )
    .await
}

async fn sqlite_unique_constraint(config: &Config) -> Result<Measurement, BoxError> {
    let store = sqlite_store(config).await?;
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "sqlite-unique",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&sqlite_unique_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| sqlite_insert_baseline(pool.clone(), "bench_payments", key),
    )
    .await
}

/// The price of `synchronous = FULL`, the default: the same idempotent handler on two files,
/// one opened with the default and one with `Synchronous::Normal` ("baseline").
async fn sqlite_durability(config: &Config) -> Result<Measurement, BoxError> {
    let full = sqlite_store_with(config, "-full", idem_runtime::Synchronous::Full).await?;
    let normal = sqlite_store_with(config, "-normal", idem_runtime::Synchronous::Normal).await?;
    compare(
        config,
        "sqlite-durability",
        move |key| {
            let store = full.clone();
            async move { processed(&sqlite_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            let store = normal.clone();
            async move { processed(&sqlite_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        },
    )
    .await
}

// ---- MySQL / MariaDB ----------------------------------------------------------------------

async fn mysql_dedup_table(config: &Config) -> Result<Measurement, BoxError> {
    let url = std::env::var("IDEM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let pool = MySqlPoolOptions::new()
        .max_connections(u32::try_from(config.tasks)?)
        .connect(&url)
        .await?;
    let store = MySqlStore::new(pool);
    store.migrate().await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_ledger (order_id VARCHAR(255) NOT NULL, amount BIGINT NOT NULL)")
        .execute(store.pool())
        .await?;
    let idem_store = store.clone();
    let pool = store.pool().clone();
    compare(
        config,
        "mysql-dedup",
        move |key| {
            let store = idem_store.clone();
            async move { processed(&mysql_dedup_handler(&store, bench_msg(key), NoAck).await?) }
        },
        move |key| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_ledger (order_id, amount) VALUES (?, ?)")
                    .bind(&key)
                    .bind(100_i64)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        },
    )
    .await
}

// ---- the command --------------------------------------------------------------------------

fn usage() -> String {
    let names: Vec<String> = SCENARIOS
        .iter()
        .map(|(name, what, _)| format!("  {name:<26} {what}"))
        .collect();
    format!(
        "usage: bench <scenario>|--all [--messages N] [--tasks T] [--runs R] [--rounds K] [--pg-latency-us N] [--gate-in-begin]\n\nscenarios:\n{}",
        names.join("\n")
    )
}

fn parse_args() -> Result<(Vec<&'static str>, Config, usize), String> {
    let mut chosen = Vec::new();
    let mut config = Config {
        messages: 10_000,
        tasks: 16,
        rounds: 4,
        run_id: String::new(),
        pg_latency_us: 0,
        gate_in_begin: false,
    };
    let mut runs = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number\n\n{}", usage()))
        };
        match arg.as_str() {
            "--all" => chosen.extend(SCENARIOS.iter().map(|(name, _, _)| *name)),
            "--messages" => config.messages = number("--messages")?,
            "--tasks" => config.tasks = number("--tasks")?,
            "--runs" => runs = number("--runs")?,
            "--rounds" => config.rounds = number("--rounds")?,
            "--pg-latency-us" => config.pg_latency_us = number("--pg-latency-us")? as u64,
            "--gate-in-begin" => config.gate_in_begin = true,
            name => match SCENARIOS.iter().find(|(n, _, _)| *n == name) {
                Some((name, _, _)) => chosen.push(*name),
                None => return Err(format!("unknown scenario `{name}`\n\n{}", usage())),
            },
        }
    }
    if chosen.is_empty() {
        return Err(usage());
    }
    Ok((chosen, config, runs))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Off unless asked for (RUST_LOG=...): logging would be part of what is measured.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let (chosen, mut config, runs) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    for name in chosen {
        let Some((_, _, scenario)) = SCENARIOS.iter().find(|(n, _, _)| *n == name) else {
            continue;
        };
        let mut results = Vec::new();
        for run in 0..runs {
            config.run_id = format!(
                "b{}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis(),
                run
            );
            let measurement = scenario(&config).await?;
            eprintln!(
                "run {}/{runs} {name}: idem {:.0}/s, baseline {:.0}/s, ratio {:.3}",
                run + 1,
                measurement.idem.per_second(),
                measurement.baseline.per_second(),
                measurement.ratio()
            );
            results.push(measurement);
        }
        results.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        let (low, high) = (results[0].ratio(), results[results.len() - 1].ratio());
        let median = &results[results.len() / 2];
        let mut line = format!(
            "BENCH scenario={name} idem_per_s={:.0} baseline_per_s={:.0} ratio={:.3}",
            median.idem.per_second(),
            median.baseline.per_second(),
            median.ratio(),
        );
        // The broker scenarios time the whole consumption, not each message.
        if !median.idem.latencies_us.is_empty() {
            line.push_str(&format!(
                " p50_us={} p99_us={}",
                median.idem.percentile(0.50),
                median.idem.percentile(0.99)
            ));
        }
        for (key, value) in &median.extra {
            line.push_str(&format!(" {key}={value}"));
        }
        if runs > 1 {
            line.push_str(&format!(
                " runs={runs} ratio_min={low:.3} ratio_max={high:.3}"
            ));
        }
        line.push_str(&format!(" messages={}", config.messages));
        // A scenario with fixed task counts reports them itself.
        if !median.extra.iter().any(|(key, _)| key == "tasks") {
            line.push_str(&format!(" tasks={}", config.tasks));
        }
        println!("{line}");
    }
    Ok(())
}

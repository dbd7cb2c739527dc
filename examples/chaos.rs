//! A chaos harness: many messages, consumer processes killed at every failpoint and at random,
//! connections cut, PostgreSQL and the broker restarted, producers that publish twice and an
//! operator who replays; then a ledger check that each business effect happened exactly once
//! and nothing was lost.
//!
//! ```text
//! cargo run --release -p idem-examples --example chaos -- [--messages N] [--consumers C] [--seconds S] [--broker rabbitmq|nats]
//! ```
//!
//! The harness starts its own PostgreSQL cluster and broker (RabbitMQ node or NATS server) in a
//! temporary directory, on free ports, so that it can crash and restart them without touching
//! the machine's shared services; it needs their binaries installed (`initdb`/`pg_ctl`,
//! `rabbitmq-server`/`rabbitmqctl`, `nats-server`). Consumers are OS processes (this binary,
//! `chaos consume …`) that reach both servers through TCP proxies the harness can sever.
//!
//! Timeline (`--seconds S`): the messages are published over the first 60% of S; the kills,
//! cuts and restarts are spread over 5% to 90% of S; at 50% an operator moves the dead-letter
//! queue back into the work queue; at 70% the operator replays a stretch of orders already
//! processed. Then the harness waits until nothing is in flight, stops the consumers
//! gracefully, checks the ledger and prints one line:
//!
//! ```text
//! CHAOS messages=… duplicates_injected=… kills=… severed=… db_restarts=… broker_restarts=… effects_exactly_once=true lost=0 double_effects=0
//! ```
//!
//! It exits non-zero when the ledger does not match. `--handler idem-batch` runs the same gate
//! as a `batch` handler under the batch runners (batches of up to 32, 4 at once, so that
//! batches share accounts and deadlock on them, and split). `--handler ack-before-commit` and
//! `--handler no-gate` run the same workload through hand-written controls that must fail it.

#[path = "chaos/broker.rs"]
mod broker;
#[path = "chaos/consumer.rs"]
mod consumer;
#[path = "chaos/ledger.rs"]
mod ledger;
#[path = "chaos/proxy.rs"]
mod proxy;
#[path = "chaos/services.rs"]
mod services;
#[path = "chaos/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use idem_runtime::broker::CancellationToken;
use idem_runtime::{PgStore, failpoints, sqlx};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::proxy::Proxy;
use crate::services::{Nats, Postgres, RabbitMq};
use crate::workload::{Shape, Workload};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accounts the orders credit.
pub(crate) const ACCOUNTS: i32 = 16;

/// The names the harness and its consumers share.
pub(crate) mod names {
    pub(crate) const LEDGER: &str = "chaos_ledger";
    pub(crate) const ACCOUNTS: &str = "chaos_accounts";
    pub(crate) const QUEUE: &str = "chaos.orders";
    pub(crate) const STREAM: &str = "CHAOS_ORDERS";
    pub(crate) const SUBJECT: &str = "chaos.orders";
    pub(crate) const NATS_CONSUMER: &str = "chaos";
    /// The `ack-before-commit` control's own hand-written gate.
    pub(crate) const CONTROL_INBOX: &str = "chaos_control_inbox";
}

/// A business message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Order {
    pub(crate) order_id: String,
    pub(crate) account: i32,
    pub(crate) amount: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BrokerKind {
    Rabbitmq,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum HandlerKind {
    /// `#[idempotent(strategy = "dedup_table")]` under idem's runner.
    Idem,
    /// The same gate and write as a `batch` handler, under idem's batch runner (batches of up
    /// to 32, 4 at once).
    IdemBatch,
    /// Control: acks, then commits (no runner).
    AckBeforeCommit,
    /// Control: commits, then acks, with no gate (no runner).
    NoGate,
}

#[derive(Debug, Parser)]
#[command(about = "idem's chaos harness: exactly-once effects under crashes, cuts and restarts")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One consumer process (started by the harness).
    #[command(hide = true)]
    Consume(ConsumeArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumeArgs {
    #[arg(long, value_enum)]
    pub(crate) broker: BrokerKind,
    #[arg(long, value_enum)]
    pub(crate) handler: HandlerKind,
    #[arg(long)]
    pub(crate) pg_url: String,
    #[arg(long)]
    pub(crate) broker_url: String,
    /// Stop dead at this point…
    #[arg(long)]
    pub(crate) kill_at: Option<String>,
    /// …the N-th time it is passed.
    #[arg(long)]
    pub(crate) kill_after: Option<u64>,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Distinct business orders.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Consumer processes.
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// The chaos window, in seconds (publishing takes its first 60%).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, value_enum, default_value_t = BrokerKind::Rabbitmq)]
    broker: BrokerKind,
    /// The handler under test, or a control that must fail.
    #[arg(long, value_enum, default_value_t = HandlerKind::Idem)]
    handler: HandlerKind,
    /// Share of orders a producer publishes two or three times.
    #[arg(long, default_value_t = 0.3)]
    duplicates: f64,
    /// Share of orders an operator replays after they were processed.
    #[arg(long, default_value_t = 0.05)]
    replays: f64,
    /// Consumer kills (SIGKILL): half at failpoints, half at random moments.
    #[arg(long, default_value_t = 20)]
    kills: u64,
    /// Connection cuts, in turn: every connection through the broker's proxy, every one through
    /// the database's, one of the broker's, one of the database's.
    #[arg(long, default_value_t = 10)]
    severs: u64,
    /// PostgreSQL crash-restarts.
    #[arg(long, default_value_t = 1)]
    db_restarts: u64,
    /// Broker crash-restarts.
    #[arg(long, default_value_t = 1)]
    broker_restarts: u64,
    /// Bad messages of each kind (undecodable, empty key, over-long key, panicking handler,
    /// payload mismatch pair).
    #[arg(long, default_value_t = 5)]
    bad_each: usize,
    /// How long to wait for the queue to drain after the chaos window, in seconds.
    #[arg(long, default_value_t = 180)]
    drain_seconds: u64,
    /// Random seed (printed; the default is the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the temporary directory (servers' data and logs, consumers' logs).
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<(), BoxError> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::Consume(args)) => runtime.block_on(consumer::run(args)),
        None => {
            let exactly_once = runtime.block_on(harness(cli.run))?;
            if !exactly_once {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The broker server under test.
enum BrokerServer {
    Rabbitmq(RabbitMq),
    Nats(Nats),
}

impl BrokerServer {
    fn port(&self) -> u16 {
        match self {
            Self::Rabbitmq(server) => server.port(),
            Self::Nats(server) => server.port(),
        }
    }
    /// The URL for the harness's own connections, straight to the server.
    fn url(&self) -> String {
        match self {
            Self::Rabbitmq(server) => server.url(),
            Self::Nats(server) => server.url(),
        }
    }
    /// The URL for the consumers, through the proxy on `port`.
    fn url_via(&self, port: u16) -> String {
        match self {
            Self::Rabbitmq(_) => format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=5"),
            Self::Nats(_) => format!("nats://127.0.0.1:{port}"),
        }
    }
    async fn restart(&mut self) -> Result<(), BoxError> {
        match self {
            Self::Rabbitmq(server) => server.restart().await,
            Self::Nats(server) => server.restart().await,
        }
    }
    async fn stop(&mut self) {
        match self {
            Self::Rabbitmq(server) => server.stop().await,
            Self::Nats(server) => server.stop().await,
        }
    }
}

/// What the chaos did, counted.
#[derive(Debug, Default)]
struct Counts {
    kills: AtomicU64,
    failpoint_kills: AtomicU64,
    severed: AtomicU64,
    db_restarts: AtomicU64,
    broker_restarts: AtomicU64,
    spawned: AtomicU64,
    /// Kills at each failpoint, by name.
    at_failpoint: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn killed_at(&self, point: &str) {
        self.kills.fetch_add(1, Ordering::Relaxed);
        self.failpoint_kills.fetch_add(1, Ordering::Relaxed);
        *self
            .at_failpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(point.to_owned())
            .or_default() += 1;
    }
}

async fn harness(args: RunArgs) -> Result<bool, BoxError> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = std::env::temp_dir().join(format!("idem-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("chaos: seed {seed}, working in {}", dir.display());
    let outcome = run(&args, &dir, &mut rng).await;
    // A control is meant to fail: its directory goes unless asked for.
    let failed = !outcome.as_ref().is_ok_and(|ok| *ok);
    if args.keep || (failed && matches!(args.handler, HandlerKind::Idem | HandlerKind::IdemBatch)) {
        eprintln!("chaos: kept {} (server and consumer logs)", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

async fn run(args: &RunArgs, dir: &Path, rng: &mut fastrand::Rng) -> Result<bool, BoxError> {
    let started = Instant::now();
    let mut postgres = Postgres::start(&dir.join("postgres")).await?;
    let mut broker_server = match args.broker {
        BrokerKind::Rabbitmq => {
            BrokerServer::Rabbitmq(RabbitMq::start(&dir.join("rabbitmq")).await?)
        }
        BrokerKind::Nats => BrokerServer::Nats(Nats::start(&dir.join("nats")).await?),
    };
    let node = match &broker_server {
        BrokerServer::Rabbitmq(server) => server.node_name().to_owned(),
        BrokerServer::Nats(_) => String::new(),
    };
    eprintln!("chaos: servers up in {:.1?}", started.elapsed());

    // The schema, directly.
    let store = PgStore::connect(&postgres.url()).await?;
    store.migrate().await?;
    for statement in [
        format!(
            "CREATE TABLE {} (order_id TEXT NOT NULL, account INT NOT NULL, amount BIGINT NOT NULL)",
            names::LEDGER
        ),
        format!(
            "CREATE TABLE {} (id INT PRIMARY KEY, balance BIGINT NOT NULL)",
            names::ACCOUNTS
        ),
        format!(
            "CREATE TABLE {} (order_id TEXT PRIMARY KEY)",
            names::CONTROL_INBOX
        ),
        format!(
            "INSERT INTO {} SELECT g, 0 FROM generate_series(0, {}) g",
            names::ACCOUNTS,
            ACCOUNTS - 1
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(store.pool())
            .await?;
    }
    store.pool().close().await;

    let pg_proxy = Arc::new(Proxy::start(postgres.port()).await?);
    let broker_proxy = Arc::new(Proxy::start(broker_server.port()).await?);
    let broker = Broker::setup(args.broker, broker_server.url(), node).await?;

    let workload = Workload::build(
        Shape {
            orders: args.messages,
            duplicate_share: args.duplicates,
            replay_share: args.replays,
            bad_each: args.bad_each,
        },
        rng,
    );

    // The consumers.
    let counts = Arc::new(Counts::default());
    let kill_points: Vec<&'static str> = match args.handler {
        HandlerKind::Idem | HandlerKind::IdemBatch => failpoints::ALL.to_vec(),
        HandlerKind::AckBeforeCommit => vec![consumer::AFTER_ACK_BEFORE_COMMIT],
        HandlerKind::NoGate => Vec::new(),
    };
    let failpoint_kills = if kill_points.is_empty() {
        0
    } else {
        args.kills / 2
    };
    let random_kills = args.kills - failpoint_kills;
    let fleet = Fleet {
        exe: std::env::current_exe()?,
        dir: dir.to_owned(),
        consume: ConsumeArgs {
            broker: args.broker,
            handler: args.handler,
            pg_url: format!("postgres://postgres@127.0.0.1:{}/postgres", pg_proxy.port()),
            broker_url: broker_server.url_via(broker_proxy.port()),
            kill_at: None,
            kill_after: None,
        },
        kill_points,
        armings_left: AtomicU64::new(failpoint_kills),
        next_point: AtomicU64::new(0),
        // The fleet passes a point about once per delivery: arm the N-th pass so that the
        // failpoint kills are spent within the first half of the publishing.
        mean_hits: (workload.sends.len() as u64 / (2 * failpoint_kills).max(1)).max(2),
        counts: Arc::clone(&counts),
        stopping: CancellationToken::new(),
        arming: CancellationToken::new(),
    };
    let fleet = Arc::new(fleet);
    let mut slots = Vec::new();
    for slot in 0..args.consumers {
        let (kill, kills) = mpsc::unbounded_channel();
        let seed = rng.u64(..);
        slots.push((
            kill,
            tokio::spawn(Arc::clone(&fleet).keep_running(slot, kills, seed)),
        ));
    }
    let killers: Vec<_> = slots.iter().map(|(kill, _)| kill.clone()).collect();

    // The producer: everything over 60% of the window, the operator's replay at 70%.
    let window = Duration::from_secs(args.seconds);
    let t0 = Instant::now();
    let sends: Vec<Vec<u8>> = workload
        .sends
        .iter()
        .map(|&index| workload.messages[index].payload.clone())
        .collect();
    let replays: Vec<Vec<u8>> = workload
        .replays
        .iter()
        .map(|&index| workload.messages[index].payload.clone())
        .collect();

    // The chaos schedule.
    let mut events: Vec<(Duration, Event)> = Vec::new();
    let at = |share: f64| window.mul_f64(share);
    for _ in 0..random_kills {
        events.push((at(0.05 + rng.f64() * 0.85), Event::Kill));
    }
    for n in 0..args.severs {
        let event = match n % 4 {
            0 => Event::SeverBroker,
            1 => Event::SeverDatabase,
            2 => Event::SeverOneBroker,
            _ => Event::SeverOneDatabase,
        };
        events.push((at(0.05 + rng.f64() * 0.85), event));
    }
    for n in 0..args.db_restarts {
        let share = 0.05 + 0.85 * (n as f64 + 0.33) / args.db_restarts as f64;
        events.push((at(share), Event::RestartDatabase));
    }
    for n in 0..args.broker_restarts {
        let share = 0.05 + 0.85 * (n as f64 + 0.8) / args.broker_restarts as f64;
        events.push((at(share), Event::RestartBroker));
    }
    events.push((at(0.5), Event::ReplayDeadLetters));
    events.sort_by_key(|(when, _)| *when);

    let producer = tokio::spawn(async move {
        let publish_window = window.mul_f64(0.6);
        let total = sends.len().max(1);
        let mut broker = broker;
        for (n, payload) in sends.iter().enumerate() {
            let due = publish_window.mul_f64(n as f64 / total as f64);
            tokio::time::sleep_until((t0 + due).into()).await;
            broker.publish(payload).await?;
        }
        tokio::time::sleep_until((t0 + window.mul_f64(0.7)).into()).await;
        for payload in &replays {
            broker.publish(payload).await?;
        }
        Ok::<_, BoxError>(broker)
    });

    let mut dead_letters_replayed = 0_usize;
    let mut operator: Option<Broker> = None;
    for (when, event) in events {
        tokio::time::sleep_until((t0 + when).into()).await;
        match event {
            Event::Kill => {
                let slot = rng.usize(..killers.len());
                let _ = killers[slot].send(());
            }
            Event::SeverBroker => {
                counts
                    .severed
                    .fetch_add(broker_proxy.sever_all() as u64, Ordering::Relaxed);
            }
            Event::SeverDatabase => {
                counts
                    .severed
                    .fetch_add(pg_proxy.sever_all() as u64, Ordering::Relaxed);
            }
            Event::SeverOneBroker => {
                if broker_proxy.sever_one() {
                    counts.severed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::SeverOneDatabase => {
                if pg_proxy.sever_one() {
                    counts.severed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::RestartDatabase => {
                let took = Instant::now();
                postgres.restart().await?;
                counts.db_restarts.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "chaos: PostgreSQL crashed and restarted in {:.1?}",
                    took.elapsed()
                );
            }
            Event::RestartBroker => {
                let took = Instant::now();
                broker_server.restart().await?;
                counts.broker_restarts.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "chaos: broker crashed and restarted in {:.1?}",
                    took.elapsed()
                );
            }
            Event::ReplayDeadLetters => {
                let operator = match &mut operator {
                    Some(operator) => operator,
                    None => operator.insert(
                        Broker::setup(args.broker, broker_server.url(), node_of(&broker_server))
                            .await?,
                    ),
                };
                let letters = operator.take_dead_letters().await?;
                for letter in &letters {
                    operator.publish(&letter.payload).await?;
                }
                dead_letters_replayed += letters.len();
                eprintln!("chaos: an operator replayed {} dead letters", letters.len());
            }
        }
    }
    let mut broker = producer.await??;
    fleet.arming.cancel();
    eprintln!(
        "chaos: chaos window over after {:.1?}; draining",
        t0.elapsed()
    );

    // Drain: nothing in flight twice in a row, a second apart.
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_seconds);
    let mut quiet = 0;
    let mut drained = false;
    while Instant::now() < drain_deadline {
        match broker.in_flight().await {
            Ok(0) => {
                quiet += 1;
                if quiet >= 3 {
                    drained = true;
                    break;
                }
            }
            Ok(_) => quiet = 0,
            Err(error) => {
                eprintln!("chaos: could not read the broker's queues: {error}");
                quiet = 0;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !drained {
        eprintln!("chaos: not drained after {} s", args.drain_seconds);
    }
    fleet.stopping.cancel();
    for (kill, task) in slots {
        drop(kill);
        task.await?;
    }
    let left = broker.in_flight().await?;
    let dead_letters = broker.take_dead_letters().await?;

    let pool = sqlx::PgPool::connect(&postgres.url()).await?;
    let verdict = ledger::check(&pool, &workload, &dead_letters).await?;
    pool.close().await;
    broker_server.stop().await;
    postgres.stop().await;

    let exactly_once = verdict.exactly_once(left);
    for problem in &verdict.problems {
        eprintln!("chaos: {problem}");
    }
    eprintln!(
        "chaos: {} orders applied, {} bad messages dead-lettered ({} with the wrong reason), {} dead letters replayed by the operator, {} publishes retried, {} consumer processes started, {} killed at failpoints {:?}, money off by {}, {} left in flight, {:.1?} in all",
        verdict.applied,
        verdict.dead_lettered,
        verdict.wrong_reasons,
        dead_letters_replayed,
        broker.publish_retries,
        counts.spawned.load(Ordering::Relaxed),
        counts.failpoint_kills.load(Ordering::Relaxed),
        counts
            .at_failpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        verdict.money_off,
        left,
        started.elapsed()
    );
    println!(
        "CHAOS messages={} duplicates_injected={} kills={} severed={} db_restarts={} broker_restarts={} effects_exactly_once={} lost={} double_effects={}",
        workload.messages.len(),
        workload.duplicates_injected,
        counts.kills.load(Ordering::Relaxed),
        counts.severed.load(Ordering::Relaxed),
        counts.db_restarts.load(Ordering::Relaxed),
        counts.broker_restarts.load(Ordering::Relaxed),
        exactly_once,
        verdict.lost + left,
        verdict.double_effects,
    );
    Ok(exactly_once)
}

fn node_of(server: &BrokerServer) -> String {
    match server {
        BrokerServer::Rabbitmq(server) => server.node_name().to_owned(),
        BrokerServer::Nats(_) => String::new(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Kill,
    /// Every connection through the broker's proxy.
    SeverBroker,
    /// Every connection through the database's proxy.
    SeverDatabase,
    SeverOneBroker,
    SeverOneDatabase,
    RestartDatabase,
    RestartBroker,
    ReplayDeadLetters,
}

/// The consumer processes: each slot keeps one running, respawning it when it dies.
struct Fleet {
    exe: PathBuf,
    dir: PathBuf,
    consume: ConsumeArgs,
    kill_points: Vec<&'static str>,
    /// Failpoint kills still to arm.
    armings_left: AtomicU64,
    next_point: AtomicU64,
    mean_hits: u64,
    counts: Arc<Counts>,
    /// Stop every consumer gracefully.
    stopping: CancellationToken,
    /// Cancelled when the chaos window is over: no more failpoint arming.
    arming: CancellationToken,
}

impl Fleet {
    /// Takes one arming, if any is left: a kill point and the pass that kills.
    fn arm(&self, rng: &mut fastrand::Rng) -> Option<(&'static str, u64)> {
        if self.kill_points.is_empty() || self.arming.is_cancelled() {
            return None;
        }
        self.armings_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .ok()?;
        let point =
            self.next_point.fetch_add(1, Ordering::SeqCst) as usize % self.kill_points.len();
        Some((self.kill_points[point], rng.u64(1..=2 * self.mean_hits)))
    }

    async fn keep_running(
        self: Arc<Self>,
        slot: usize,
        mut kills: mpsc::UnboundedReceiver<()>,
        seed: u64,
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let log_path = self.dir.join(format!("consumer-{slot}.log"));
        while !self.stopping.is_cancelled() {
            let armed = self.arm(&mut rng);
            let log = match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
            {
                Ok(log) => log,
                Err(error) => {
                    eprintln!("chaos: cannot open {}: {error}", log_path.display());
                    return;
                }
            };
            let mut command = tokio::process::Command::new(&self.exe);
            command
                .arg("consume")
                .args(["--broker", arg_name(self.consume.broker).as_str()])
                .args(["--handler", arg_name(self.consume.handler).as_str()])
                .args(["--pg-url", &self.consume.pg_url])
                .args(["--broker-url", &self.consume.broker_url])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log)
                .kill_on_drop(true);
            if let Some((point, after)) = armed {
                command.args(["--kill-at", point, "--kill-after", &after.to_string()]);
            }
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(error) => {
                    eprintln!("chaos: cannot start a consumer: {error}");
                    return;
                }
            };
            self.counts.spawned.fetch_add(1, Ordering::Relaxed);
            let mut stdin = child.stdin.take();
            let mut kills_open = true;
            // Armed when the graceful stop begins: a consumer that does not stop in time is
            // killed.
            let stop_deadline = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(stop_deadline);
            let mut lines = child.stdout.take().map(|out| BufReader::new(out).lines());
            let mut died_at_failpoint = false;
            let mut graceful = false;
            loop {
                tokio::select! {
                    line = async {
                        match &mut lines {
                            Some(lines) => lines.next_line().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        match line {
                            Ok(Some(line)) if line.starts_with("FAILPOINT ") => {
                                let _ = child.start_kill();
                                died_at_failpoint = true;
                                self.counts.killed_at(line.trim_start_matches("FAILPOINT "));
                            }
                            Ok(Some(_)) => {}
                            _ => lines = None,
                        }
                    }
                    kill = kills.recv(), if kills_open => {
                        match kill {
                            Some(()) if child.try_wait().ok().flatten().is_none() => {
                                let _ = child.start_kill();
                                self.counts.kills.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(()) => {}
                            None => kills_open = false,
                        }
                    }
                    () = self.stopping.cancelled(), if !graceful => {
                        // Closing stdin stops the consumer gracefully.
                        graceful = true;
                        drop(stdin.take());
                        stop_deadline
                            .as_mut()
                            .reset((Instant::now() + Duration::from_secs(30)).into());
                    }
                    () = &mut stop_deadline, if graceful => {
                        eprintln!("chaos: consumer {slot} did not stop within 30 s; killing it");
                        let _ = child.start_kill();
                    }
                    status = child.wait() => {
                        if !died_at_failpoint && armed.is_some() {
                            // Its arming was not used: give it back.
                            self.armings_left.fetch_add(1, Ordering::SeqCst);
                        }
                        if let Ok(status) = status
                            && !status.success()
                            && !died_at_failpoint
                            && status.code().is_some()
                        {
                            eprintln!("chaos: consumer {slot} exited with {status}; see {}", log_path.display());
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// How a value enum is spelled on the command line.
fn arg_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_default()
}

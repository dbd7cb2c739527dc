//! idem's metrics (feature `metrics`) in Prometheus text format, on SQLite.
//!
//! ```text
//! cargo run --example metrics_prometheus [-- --db FILE] [-- --listen 127.0.0.1:9464]
//! ```
//!
//! Installs the Prometheus exporter (`metrics-exporter-prometheus`, without its HTTP listener)
//! as the `metrics` recorder, then handles a few deliveries on a fresh SQLite file (default:
//! `idem-metrics.db` in the system's temporary directory, recreated on every run):
//!
//! - five orders, once each: `processed`;
//! - two of them again (their acks were lost): `duplicate`;
//! - one order whose payment service is down at the first delivery: `retried`, then
//!   `processed` at the second delivery (attempt 2);
//! - one order with an empty id, which can never be deduplicated: `dead_lettered`.
//!
//! It prints the rendered text (what a scrape of `/metrics` returns), then checks it: the
//! counts of `idem_handlings_total` by outcome, one `idem_handling_duration_seconds` per
//! handling, and `idem_attempts_at_success` (six messages processed, at attempts 1, 1, 1, 1, 1
//! and 2). It exits non-zero when a number is wrong. With `--listen ADDR` it then serves the
//! text over HTTP on `ADDR` until Ctrl-C, for `curl` or a Prometheus to scrape.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use idem_runtime::metrics::{
    ATTEMPTS_AT_SUCCESS, ATTEMPTS_BUCKETS, DURATION_SECONDS_BUCKETS, HANDLING_DURATION_SECONDS,
};
use idem_runtime::{
    Acknowledger, Committed, DeadLetter, HandlerError, Requeue, SqliteStore, SqliteTx, idempotent,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SCOPE: &str = "metrics_example.order_paid";

#[derive(Debug, Parser)]
#[command(about = "idem's metrics in Prometheus text format")]
struct Args {
    /// The SQLite database file (recreated).
    #[arg(long)]
    db: Option<PathBuf>,
    /// After the checks, serve the metrics over HTTP on this address until Ctrl-C.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
struct OrderPaid {
    order_id: String,
    /// The payment service is down for this delivery.
    service_down: bool,
}

fn paid(order_id: &str) -> OrderPaid {
    OrderPaid {
        order_id: order_id.to_owned(),
        service_down: false,
    }
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the payment service is unavailable")]
    ServiceDown,
}

// Both are retryable: a database error by its kind, the outage always.
impl HandlerError for AppError {}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "metrics_example.order_paid"
)]
async fn on_order_paid(tx: &mut SqliteTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id) VALUES (?1)")
        .bind(&msg.order_id)
        .execute(&mut **tx)
        .await?;
    if msg.service_down {
        return Err(AppError::ServiceDown);
    }
    Ok(())
}

/// One delivery, numbered as a broker would; settling it does nothing here.
struct Delivery {
    attempt: u32,
}

impl Acknowledger for Delivery {
    type Error = std::convert::Infallible;

    fn attempt(&self) -> Option<u32> {
        Some(self.attempt)
    }

    async fn ack(self, _proof: Committed) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn requeue(self, _requeue: Requeue) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn dead_letter(self, _letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

fn first() -> Delivery {
    Delivery { attempt: 1 }
}

/// The Prometheus recorder, installed for the whole process, with histogram buckets (without
/// them the exporter renders histograms as summaries).
fn install_prometheus() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(HANDLING_DURATION_SECONDS.to_owned()),
            DURATION_SECONDS_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ATTEMPTS_AT_SUCCESS.to_owned()),
            ATTEMPTS_BUCKETS,
        )?
        .install_recorder()?;
    // Descriptions (HELP lines) before the first message arrives.
    idem_runtime::metrics::describe();
    Ok(handle)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr) // stdout carries only the metrics
        .init();
    let args = Args::parse();
    let prometheus = install_prometheus()?;

    let path = args
        .db
        .unwrap_or_else(|| std::env::temp_dir().join("idem-metrics.db"));
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    let store = SqliteStore::open(&path).await?;
    store.migrate().await?;
    sqlx::query("CREATE TABLE payments (order_id TEXT NOT NULL)")
        .execute(store.pool())
        .await?;

    for n in 1..=5 {
        on_order_paid(&store, paid(&format!("order-{n}")), first()).await?;
    }
    for n in [1, 2] {
        on_order_paid(&store, paid(&format!("order-{n}")), Delivery { attempt: 2 }).await?;
    }
    let down = OrderPaid {
        service_down: true,
        ..paid("order-6")
    };
    if on_order_paid(&store, down, first()).await.is_ok() {
        return Err("the outage did not fail the delivery".into());
    }
    on_order_paid(&store, paid("order-6"), Delivery { attempt: 2 }).await?;
    if on_order_paid(&store, paid(""), first()).await.is_ok() {
        return Err("an order without an id was processed".into());
    }

    let text = prometheus.render();
    print!("{text}");
    check(&text)?;

    if let Some(addr) = args.listen {
        serve(addr, prometheus).await?;
    }
    Ok(())
}

/// The value of the sample `name{...}` of this example's scope whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (inside, value) = rest.split_once("} ")?;
        let pairs: Vec<(&str, &str)> = inside
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels
            .iter()
            .chain(&[("scope", SCOPE)])
            .all(|label| pairs.contains(label))
        {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// The example's invariants on the rendered text.
fn check(text: &str) -> Result<(), String> {
    let expected = [
        ("processed", 6.0),
        ("duplicate", 2.0),
        ("observed_duplicate", 0.0),
        ("retried", 1.0),
        ("dead_lettered", 1.0),
        ("failed", 0.0),
    ];
    let mut wrong = Vec::new();
    let mut handlings = 0.0;
    for (outcome, want) in expected {
        let labels = [("outcome", outcome)];
        let counted = sample(text, "idem_handlings_total", &labels).unwrap_or(0.0);
        let timed = sample(text, "idem_handling_duration_seconds_count", &labels).unwrap_or(0.0);
        if counted != want || timed != want {
            wrong.push(format!(
                "{outcome}: counted {counted}, timed {timed}, expected {want}"
            ));
        }
        handlings += counted;
    }
    let attempts = (
        sample(text, "idem_attempts_at_success_count", &[]),
        sample(text, "idem_attempts_at_success_sum", &[]),
    );
    if attempts != (Some(6.0), Some(7.0)) {
        wrong.push(format!(
            "attempts at success (count, sum): {attempts:?}, expected 6 and 7"
        ));
    }
    if !wrong.is_empty() {
        return Err(format!(
            "metrics_prometheus: wrong metrics: {}",
            wrong.join("; ")
        ));
    }
    eprintln!("metrics_prometheus: {handlings} handlings counted as expected");
    Ok(())
}

/// Serves the current text to every request (any path) until Ctrl-C.
async fn serve(addr: SocketAddr, prometheus: PrometheusHandle) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "serving the metrics on http://{}/metrics (Ctrl-C to stop)",
        listener.local_addr()?
    );
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let body = prometheus.render();
        tokio::spawn(async move {
            // The request itself does not matter: read what came, answer with the text.
            let mut request = [0_u8; 1024];
            let _ = socket.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        });
    }
}

//! Scratch: the chaos harness's private services and its TCP proxy, tried alone.
//!
//! ```text
//! cargo run -p idem-examples --example chaos_smoke
//! ```
//!
//! Starts a private PostgreSQL, RabbitMQ and NATS in a temporary directory, cuts connections
//! through a proxy, crash-restarts each server and checks that what was committed (a row, a
//! confirmed persistent message, an acknowledged JetStream message) survived. Prints each step
//! and its time; exits non-zero on the first failure.

#[path = "chaos/proxy.rs"]
mod proxy;
#[path = "chaos/services.rs"]
mod services;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::FieldTable;
use idem_runtime::broker::rabbitmq::lapin::{self, BasicProperties};
use idem_runtime::sqlx::{self, Connection as _};

use crate::proxy::Proxy;
use crate::services::{BoxError, Nats, Postgres, RabbitMq};

/// Messages published (and acknowledged) right before a crash, to see how many survive it.
const BURST: u32 = 1000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("idem-chaos-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("working in {}", dir.display());
    let outcome = smoke(&dir).await;
    match &outcome {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
            println!("all good");
        }
        Err(_) => eprintln!("kept {}", dir.display()),
    }
    outcome
}

async fn smoke(dir: &Path) -> Result<(), BoxError> {
    postgres(dir).await?;
    rabbitmq(dir).await?;
    nats(dir).await?;
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

async fn postgres(dir: &Path) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut pg = Postgres::start(&dir.join("postgres")).await?;
    println!(
        "postgres: started on port {} in {:.2?} ({})",
        pg.port(),
        started.elapsed(),
        pg.url()
    );

    let proxy = Proxy::start(pg.port()).await?;
    let via = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let pool = sqlx::PgPool::connect(&via).await?;
    let mut held = pool.acquire().await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *held).await?;
    println!(
        "proxy: SELECT 1 = {one} through port {}, {} open",
        proxy.port(),
        proxy.open_connections()
    );
    let cut = proxy.sever_all();
    println!(
        "proxy: sever_all cut {cut}, {} open",
        proxy.open_connections()
    );
    check(cut >= 1, "sever_all cut the pool's connection")?;
    let after = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut *held)
        .await;
    println!("proxy: next query on the held connection: {after:?}");
    check(after.is_err(), "a query on a severed connection fails")?;
    held.close_on_drop();
    drop(held);
    pool.close().await;

    let mut fresh = sqlx::PgConnection::connect(&via).await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut fresh).await?;
    println!(
        "proxy: a new connection works (SELECT 1 = {one}), {} open",
        proxy.open_connections()
    );
    check(proxy.sever_one(), "sever_one cut the new connection")?;
    let after = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut fresh)
        .await;
    println!("proxy: sever_one, then the query: {after:?}");
    check(after.is_err(), "a query on a severed connection fails")?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "proxy: {} open, sever_one again: {}",
        proxy.open_connections(),
        proxy.sever_one()
    );
    check(proxy.open_connections() == 0, "nothing open")?;

    // A committed row, then a crash.
    let mut direct = sqlx::PgConnection::connect(&pg.url()).await?;
    sqlx::query("CREATE TABLE smoke (id INT PRIMARY KEY, note TEXT NOT NULL)")
        .execute(&mut direct)
        .await?;
    sqlx::query("INSERT INTO smoke VALUES (1, 'committed before the crash')")
        .execute(&mut direct)
        .await?;
    let mut via_proxy = sqlx::PgConnection::connect(&via).await?;
    let restarting = Instant::now();
    pg.restart().await?;
    println!(
        "postgres: crash-restarted (immediate stop, WAL recovery) in {:.2?}",
        restarting.elapsed()
    );
    let old = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut direct)
        .await;
    println!("postgres: a connection from before the restart: {old:?}");
    check(old.is_err(), "a connection from before the restart fails")?;
    let old = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&mut via_proxy)
        .await;
    println!("postgres: a proxied connection from before the restart: {old:?}");
    check(
        old.is_err(),
        "a proxied connection from before the restart fails",
    )?;
    let mut fresh = sqlx::PgConnection::connect(&via).await?;
    let note: String = sqlx::query_scalar("SELECT note FROM smoke WHERE id = 1")
        .fetch_one(&mut fresh)
        .await?;
    println!("postgres: through the proxy after the restart: row 1 = {note:?}");
    fresh.close().await?;

    let restarting = Instant::now();
    pg.restart().await?;
    println!(
        "postgres: crash-restarted again in {:.2?}",
        restarting.elapsed()
    );
    pg.stop().await;
    println!("postgres: stopped");
    Ok(())
}

async fn rabbitmq(dir: &Path) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut rabbit = RabbitMq::start(&dir.join("rabbitmq")).await?;
    println!(
        "rabbitmq: node {} started on port {} in {:.2?} ({})",
        rabbit.node_name(),
        rabbit.port(),
        started.elapsed(),
        rabbit.url()
    );
    let queue = "idem-chaos-smoke";
    let connection =
        lapin::Connection::connect(&rabbit.url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for n in 0..=BURST {
        let body = if n == 0 {
            b"persistent before the crash".to_vec()
        } else {
            format!("burst {n}").into_bytes()
        };
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        check(confirmation.is_ack(), "the publish is confirmed")?;
    }
    println!("rabbitmq: published 1 + {BURST} persistent messages, each confirmed");

    // What the harness does: rabbitmqctl with only the node name.
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-n",
            rabbit.node_name(),
            "-q",
            "list_queues",
            "--no-table-headers",
        ])
        .args(["name", "messages_ready"])
        .output()
        .await?;
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|id| id.stdout.starts_with(b"0\n"));
    if listed.status.success() {
        println!(
            "rabbitmq: rabbitmqctl -n {} list_queues: {}",
            rabbit.node_name(),
            String::from_utf8_lossy(&listed.stdout).trim()
        );
    } else if root {
        return Err(format!(
            "rabbitmqctl -n {} list_queues failed: {}",
            rabbit.node_name(),
            String::from_utf8_lossy(&listed.stderr).trim()
        )
        .into());
    } else {
        // The Debian wrapper lets only root and `rabbitmq` through.
        println!("rabbitmq: (not root: rabbitmqctl from PATH refused, as expected)");
    }

    let restarting = Instant::now();
    rabbit.restart().await?;
    println!(
        "rabbitmq: crash-restarted (kill -9) in {:.2?}; old connection connected: {}",
        restarting.elapsed(),
        connection.status().connected()
    );
    let connection =
        lapin::Connection::connect(&rabbit.url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    println!(
        "rabbitmq: after the crash the queue holds {} of {} confirmed messages",
        declared.message_count(),
        BURST + 1
    );
    let first = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?;
    let body = first.map(|message| String::from_utf8_lossy(&message.delivery.data).into_owned());
    println!("rabbitmq: basic_get after the restart: {body:?}");
    check(
        body.as_deref() == Some("persistent before the crash"),
        "the persistent message survived",
    )?;
    check(
        declared.message_count() == BURST + 1,
        "every confirmed message survived",
    )?;
    connection.close(200, "done".into()).await?;

    let stopping = Instant::now();
    rabbit.stop().await;
    println!("rabbitmq: stopped in {:.2?}", stopping.elapsed());
    Ok(())
}

async fn nats(dir: &Path) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut nats = Nats::start(&dir.join("nats")).await?;
    println!(
        "nats: started on port {} in {:.2?} ({})",
        nats.port(),
        started.elapsed(),
        nats.url()
    );
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "SMOKE".to_owned(),
        subjects: vec!["smoke.>".to_owned()],
        ..Default::default()
    })
    .await?;
    for n in 0..=BURST {
        js.publish("smoke.orders", format!("message {n}").into())
            .await?
            .await?;
    }
    println!("nats: published 1 + {BURST} messages to JetStream, each acknowledged");

    let restarting = Instant::now();
    nats.restart().await?;
    println!(
        "nats: crash-restarted (SIGKILL) in {:.2?}",
        restarting.elapsed()
    );
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream("SMOKE").await?;
    let kept = stream.info().await?.state.messages;
    println!(
        "nats: after the crash the stream holds {kept} of {} acknowledged messages",
        BURST + 1
    );
    if kept != u64::from(BURST + 1) {
        println!("nats: WARNING: acknowledged messages were lost in the crash");
    }
    check(kept > 0, "the stream survived")?;
    client_flush(&js).await?;

    nats.stop().await;
    println!("nats: stopped");
    Ok(())
}

/// A round trip on the new connection, to show it works.
async fn client_flush(js: &jetstream::Context) -> Result<(), BoxError> {
    js.publish("smoke.orders", "after the restart".into())
        .await?
        .await?;
    println!("nats: published on a new connection after the restart");
    Ok(())
}

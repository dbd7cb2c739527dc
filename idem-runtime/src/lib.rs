//! # idem: exactly-once effects for message handlers
//!
//! Brokers deliver at least once: a lost ack, a consumer crash, a failover, a producer retry or
//! a manual replay all deliver the same message again. `idem` makes the *handler* idempotent
//! with one attribute: it takes a key from the message, gates the work on it inside the
//! handler's own database transaction, commits, and only then acknowledges the message.
//!
//! ```
//! use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck, Outcome};
//!
//! #[derive(serde::Serialize)]
//! struct OrderPaid { order_id: String, amount: i64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("payment failed")]
//! struct AppError;
//! impl idem_runtime::HandlerError for AppError {}
//!
//! #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "billing.paid")]
//! async fn on_order_paid(tx: &mut MemoryTx, msg: OrderPaid) -> Result<i64, AppError> {
//!     Ok(msg.amount) // business writes go through `tx`
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = MemoryStore::new();
//! let paid = || OrderPaid { order_id: "o-1".into(), amount: 250 };
//! // The generated function takes the store, the message and an acknowledger.
//! let first = on_order_paid(&store, paid(), NoAck).await?;
//! let again = on_order_paid(&store, paid(), NoAck).await?;
//! assert_eq!(first, Outcome::Processed(250));
//! assert!(again.is_duplicate());
//! # Ok::<(), idem_runtime::Error<AppError>>(())
//! # }).unwrap();
//! ```
//!
//! See [`idempotent`] for every argument and the exact expansion, [`strategy`] for how each
//! strategy recognises a duplicate, and [`store`] for the backends. Adding idem to a service
//! that already runs: [the adoption guide](guide::adoption).
//!
//! ## Cargo features
//!
//! - `pg`: the PostgreSQL store, [`PgStore`].
//! - `mysql`: the MySQL / MariaDB store, [`MySqlStore`].
//! - `sqlite`: the SQLite store, [`SqliteStore`].
//! - `uuid`: [`uuid::Uuid`] key fields, also as `state_machine` keys on UUID columns.
//! - `ulid`: [`ulid::Ulid`] key fields.
//! - `anyhow`, `eyre`: handlers may return `anyhow::Error` / `eyre::Report`
//!   ([`HandlerFailure`]).
//! - `redis`: the Redis store, [`RedisStore`], for `strategy = "lock"` (a fenced lease) and
//!   `strategy = "token"` (single-use tokens); see [`strategy::lock`] and [`strategy::token`].
//! - `rabbitmq`, `nats`, `redis-streams`: consumers for RabbitMQ (lapin), NATS JetStream
//!   (async-nats) and Redis Streams (redis); see [`broker`].
//! - `failpoints`: named [`fail`](https://docs.rs/fail) failpoints in the pipeline (after the
//!   gate, after the body, before the commit, after the commit, after the ack), for chaos
//!   tests; see `failpoints`. Never enable it in production builds.
//! - `metrics`: handlings counted by scope, strategy, store and outcome, their duration, and the
//!   attempt at which messages succeed, through the [`metrics`](https://docs.rs/metrics) facade
//!   for any exporter; see `metrics`.
//!
//! The [`MemoryStore`], for unit tests, is always available.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// Evaluates a [`failpoints`] site; nothing at all without the `failpoints` feature.
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit($name);
    };
}

// The module graph runs one way. At the bottom, `classify`, `clock`, `key`, `outcome`,
// `payload`, `retry`, `transition` and `unwind` use nothing of ours but each other's leaves;
// `error` uses `classify` and `key`; `store` uses those; `strategy` uses `store`; `ack` uses
// `error` and `retry`; `metrics` uses `ack` and `outcome`; `pipeline` uses all of them and is
// used by none.
pub mod ack;
pub mod broker;
pub mod classify;
pub mod clock;
pub mod error;
#[cfg(feature = "failpoints")]
#[cfg_attr(docsrs, doc(cfg(feature = "failpoints")))]
pub mod failpoints;
pub mod guide;
pub mod handler;
pub mod key;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod outcome;
pub mod payload;
pub mod pipeline;
pub mod retention;
pub mod retry;
pub mod store;
pub mod strategy;
pub mod transition;
mod unwind;

#[doc(hidden)]
pub mod __private;

/// The sqlx this crate is built with: use it for your queries, so that your transactions and
/// ours are of one version.
pub use sqlx;

pub use ack::{Acknowledger, Committed, DeadLetter, NoAck, Requeue, RequeueReason};
pub use classify::{classify_error_chain, classify_sqlx_error};
pub use error::{Disposition, Error, HandlerError, HandlerFailure};
pub use key::{Key, KeyError, KeyPart};
pub use outcome::Outcome;
pub use payload::fingerprint;
pub use pipeline::observed_duplicates;
pub use retry::RetryPolicy;
pub use store::Store;
pub use store::memory::{MemoryStore, MemoryTx};
#[cfg(feature = "mysql")]
pub use store::mysql::{MySqlStore, MySqlTx};
#[cfg(feature = "pg")]
pub use store::pg::{PgStore, PgTx};
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
#[cfg(feature = "sqlite")]
pub use store::sqlite::{SqliteStore, SqliteTx, Synchronous};

#[doc = include_str!("idempotent.md")]
pub use idem_macros::idempotent;

//! User code under `clippy::pedantic`, `missing_docs` and `forbid(unsafe_code)`: the expansion
//! must trigger no lint. `scripts/test` runs clippy with `-D warnings` over this target; the
//! test itself checks the handler works.
#![deny(clippy::pedantic, missing_docs, unreachable_pub, warnings)]
#![forbid(unsafe_code)]

use idem_runtime::{HandlerError, MemoryStore, MemoryTx, NoAck, idempotent};

/// A message.
#[derive(serde::Serialize)]
pub struct Ping {
    /// Its key.
    pub id: u64,
}

/// The handler's error.
#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;

impl HandlerError for AppError {}

/// Handles a ping, once.
///
/// # Errors
///
/// When the store fails or the body does.
#[idempotent(
    key = "id",
    store = "memory",
    strategy = "dedup_table",
    scope = "lint.ping",
    ttl = "1h",
    replay,
    fingerprint
)]
pub async fn on_ping(_tx: &mut MemoryTx, msg: Ping) -> Result<u64, AppError> {
    Ok(msg.id + 1)
}

/// The same with the default scope (the expansion then adds the scope probe next to it) and
/// a retry limit.
///
/// # Errors
///
/// When the store fails or the body does.
#[idempotent(
    key = "id",
    store = "memory",
    strategy = "dedup_table",
    max_attempts = 3
)]
pub async fn on_ping_default_scope(_tx: &mut MemoryTx, msg: Ping) -> Result<u64, AppError> {
    Ok(msg.id + 2)
}

#[tokio::test]
async fn pedantic_user_code_runs() {
    let store = MemoryStore::new();
    let outcome = on_ping(&store, Ping { id: 1 }, NoAck).await;
    assert!(matches!(outcome, Ok(idem_runtime::Outcome::Processed(2))));
    let outcome = on_ping_default_scope(&store, Ping { id: 1 }, NoAck).await;
    assert!(matches!(outcome, Ok(idem_runtime::Outcome::Processed(3))));
}

//! User code under strict lints: the expansion triggers none.
#![deny(warnings, missing_docs, unused, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

use idem_runtime::{idempotent, MemoryTx};

/// A message.
pub struct Ping {
    /// Its id.
    pub id: u64,
}

/// The error.
#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

/// Handles a ping, once.
#[idempotent(key = "id", store = "memory", strategy = "dedup_table", ttl = "12h")]
pub async fn on_ping(_tx: &mut MemoryTx, _msg: Ping) -> Result<(), AppError> {
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = idem_runtime::MemoryStore::new();
    let outcome = on_ping(&store, Ping { id: 1 }, idem_runtime::NoAck).await;
    assert!(outcome.is_ok_and(|o| o.is_processed()));
}

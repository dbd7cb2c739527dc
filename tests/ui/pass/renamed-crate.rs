// idem-runtime under another name, as `idem = { package = "idem-runtime" }` in Cargo.toml
// would give; the generated code must use `crate = "idem"`, not `::idem_runtime`.
extern crate idem_runtime as idem;

use idem::{MemoryStore, MemoryTx, NoAck};

pub struct Ping {
    pub id: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem::HandlerError for AppError {}

#[idem::idempotent(key = "id", store = "memory", strategy = "dedup_table", crate = "idem")]
async fn on_ping(_tx: &mut MemoryTx, _msg: Ping) -> Result<(), AppError> {
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(on_ping(&MemoryStore::new(), Ping { id: 1 }, NoAck).await.unwrap().is_processed());
}

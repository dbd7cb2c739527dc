//! Keys on tuple fields: `key = "0"` and `key = "1.id"`.
use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};

pub struct Inner {
    pub id: u32,
}

pub struct Pair(pub String, pub Inner);

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "0, 1.id", store = "memory", strategy = "dedup_table")]
async fn on_pair(_tx: &mut MemoryTx, _msg: Pair) -> Result<(), AppError> {
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let pair = || Pair("a".into(), Inner { id: 1 });
    assert!(on_pair(&store, pair(), NoAck).await.unwrap().is_processed());
    assert!(on_pair(&store, pair(), NoAck).await.unwrap().is_duplicate());
}

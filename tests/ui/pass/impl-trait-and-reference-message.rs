use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};

pub struct Ping {
    pub id: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "id", store = "memory", strategy = "dedup_table")]
async fn by_reference(_tx: &mut MemoryTx, msg: &Ping) -> Result<u64, AppError> {
    Ok(msg.id)
}

#[idempotent(key = "id", store = "memory", strategy = "dedup_table")]
async fn with_callback(_tx: &mut MemoryTx, msg: Ping) -> Result<u64, AppError> {
    let double = |n: u64| n * 2;
    Ok(apply(double, msg.id))
}

fn apply(f: impl Fn(u64) -> u64, n: u64) -> u64 {
    f(n)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let ping = Ping { id: 4 };
    assert!(by_reference(&store, &ping, NoAck).await.unwrap().is_processed());
    assert!(with_callback(&store, ping, NoAck).await.unwrap().is_processed());
}

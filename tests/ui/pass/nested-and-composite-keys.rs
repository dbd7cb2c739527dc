use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};

pub struct Order {
    pub id: u64,
}

pub struct Refund {
    pub order: Order,
    pub user_id: String,
    pub op: &'static str,
    pub seq: (u32, u32),
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "order.id", store = "memory", strategy = "dedup_table")]
async fn by_nested(_tx: &mut MemoryTx, _msg: Refund) -> Result<(), AppError> {
    Ok(())
}

#[idempotent(key = "user_id, op, seq.1", store = "memory", strategy = "dedup_table")]
async fn by_composite(_tx: &mut MemoryTx, _msg: Refund) -> Result<(), AppError> {
    Ok(())
}

fn refund(op: &'static str) -> Refund {
    Refund { order: Order { id: 9 }, user_id: "u".into(), op, seq: (0, 1) }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    assert!(by_nested(&store, refund("a"), NoAck).await.unwrap().is_processed());
    assert!(by_nested(&store, refund("b"), NoAck).await.unwrap().is_duplicate());
    assert!(by_composite(&store, refund("a"), NoAck).await.unwrap().is_processed());
    assert!(by_composite(&store, refund("b"), NoAck).await.unwrap().is_processed());
    assert!(by_composite(&store, refund("a"), NoAck).await.unwrap().is_duplicate());
}

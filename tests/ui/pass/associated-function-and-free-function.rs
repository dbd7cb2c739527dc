//! An associated function without `self` keeps the default scope; a collision with a free
//! function of the same name would be caught at its first delivery (store_memory tests that).
use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};
use idem_tests::ui::{AppError, OrderPaid};

pub struct Ledger;

impl Ledger {
    #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "ledger.handle")]
    pub async fn handle(_tx: &mut MemoryTx, msg: OrderPaid) -> Result<i64, AppError> {
        Ok(msg.amount)
    }
}

#[idempotent(key = "order_id", store = "memory", strategy = "dedup_table")]
async fn handle(_tx: &mut MemoryTx, msg: OrderPaid) -> Result<i64, AppError> {
    Ok(msg.amount)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let msg = || OrderPaid { order_id: "o-1".into(), amount: 3 };
    assert!(Ledger::handle(&store, msg(), NoAck).await.unwrap().is_processed());
    assert!(handle(&store, msg(), NoAck).await.unwrap().is_processed(), "its own scope");
}

//! An inner attribute at the top of the body stays an inner attribute of the function.
use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", max_attempts = 5)]
async fn handler(_tx: &mut MemoryTx, msg: OrderPaid) -> Result<i64, AppError> {
    #![allow(unused_variables, clippy::let_and_return)]
    let unused = 1;
    let amount = msg.amount;
    amount
        .checked_add(0)
        .ok_or_else(|| unreachable!())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let msg = OrderPaid { order_id: "o-1".into(), amount: 3 };
    assert!(handler(&store, msg, NoAck).await.unwrap().is_processed());
}

use idem_runtime::{idempotent, MemoryTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "billing\0paid")]
async fn handler(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

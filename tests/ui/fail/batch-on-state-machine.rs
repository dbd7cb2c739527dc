use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "pg", strategy = "state_machine", table = "orders", column = "status", from = "pending", to = "paid", batch)]
async fn handler(_tx: &mut PgTx<'_>, _msgs: &[OrderPaid]) -> Result<(), AppError> { Ok(()) }

fn main() {}

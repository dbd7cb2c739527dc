use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "$message_id", store = "pg", strategy = "state_machine", table = "orders", column = "status", from = "pending", to = "paid")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "redis", strategy = "state_machine", table = "orders", column = "status", from = "pending", to = "paid")]
async fn handler(_msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id, amount", store = "redis", strategy = "token")]
async fn handler(_msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

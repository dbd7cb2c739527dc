use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "redis", strategy = "lock")]
async fn handler(_msg: OrderPaid, _retries: u32) -> Result<(), AppError> { Ok(()) }

fn main() {}

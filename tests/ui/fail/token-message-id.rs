use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "$message_id", store = "redis", strategy = "token")]
async fn handler(_msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

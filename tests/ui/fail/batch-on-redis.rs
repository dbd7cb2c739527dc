use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "redis", strategy = "lock", scope = "ui.batch.redis", batch)]
async fn handler(_msgs: &[OrderPaid]) -> Result<(), AppError> { Ok(()) }

fn main() {}

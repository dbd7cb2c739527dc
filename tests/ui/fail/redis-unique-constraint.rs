use idem_runtime::idempotent;
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "redis", strategy = "unique_constraint", constraint = "payments_order_id_key")]
async fn handler(_msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

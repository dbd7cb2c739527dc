use idem_runtime::{idempotent, SqliteTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "sqlite", strategy = "token")]
async fn handler(_tx: &mut SqliteTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

use idem_runtime::{idempotent, SqliteTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "sqlit", strategy = "dedup_table")]
async fn handler(_tx: &mut SqliteTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

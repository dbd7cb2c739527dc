use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "$routing_key", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

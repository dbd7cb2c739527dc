use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "ui.batch.vec", batch)]
async fn handler(_tx: &mut PgTx<'_>, _msgs: Vec<OrderPaid>) -> Result<(), AppError> { Ok(()) }

fn main() {}

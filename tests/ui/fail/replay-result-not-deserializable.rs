use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[derive(serde::Serialize)]
pub struct Receipt(pub i64);

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", replay)]
async fn handler(_tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<Receipt, AppError> { Ok(Receipt(msg.amount)) }

fn main() {}

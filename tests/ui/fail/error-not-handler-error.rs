use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::OrderPaid;

#[derive(Debug)]
pub struct PlainError;

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), PlainError> { Ok(()) }

fn main() {}

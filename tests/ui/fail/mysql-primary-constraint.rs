use idem_runtime::{idempotent, MySqlTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "mysql", strategy = "unique_constraint", constraint = "PRIMARY")]
async fn handler(_tx: &mut MySqlTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

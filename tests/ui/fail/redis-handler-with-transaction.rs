use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "redis", strategy = "lock")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

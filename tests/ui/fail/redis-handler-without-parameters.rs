use idem_runtime::idempotent;
use idem_tests::ui::AppError;

#[idempotent(key = "order_id", store = "redis", strategy = "lock")]
async fn handler() -> Result<(), AppError> { Ok(()) }

fn main() {}

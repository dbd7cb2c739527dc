use idem_runtime::{idempotent};
use idem_tests::ui::AppError;

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table")]
async fn handler() -> Result<(), AppError> { Ok(()) }

fn main() {}

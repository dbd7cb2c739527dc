use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::AppError;

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>) -> Result<(), AppError> { Ok(()) }

fn main() {}

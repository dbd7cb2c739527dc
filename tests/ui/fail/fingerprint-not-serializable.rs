use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::AppError;

pub struct Opaque {
    pub order_id: String,
}

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", fingerprint)]
async fn handler(_tx: &mut PgTx<'_>, _msg: Opaque) -> Result<(), AppError> { Ok(()) }

fn main() {}

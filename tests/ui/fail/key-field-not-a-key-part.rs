use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::AppError;

#[derive(serde::Serialize)]
pub struct Reading {
    pub value: f64,
}

#[idempotent(key = "value", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>, _msg: Reading) -> Result<(), AppError> { Ok(()) }

fn main() {}

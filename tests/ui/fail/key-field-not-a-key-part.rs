use idem_runtime::{idempotent, PgTx};

#[derive(serde::Serialize)]
pub struct OrderPaid {
    pub order_id: String,
    pub amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[derive(serde::Serialize)]
pub struct Reading {
    pub value: f64,
}

#[idempotent(key = "value", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>, _msg: Reading) -> Result<(), AppError> { Ok(()) }

fn main() {}

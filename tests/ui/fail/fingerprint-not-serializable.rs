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

pub struct Opaque {
    pub order_id: String,
}

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", fingerprint)]
async fn handler(_tx: &mut PgTx<'_>, _msg: Opaque) -> Result<(), AppError> { Ok(()) }

fn main() {}

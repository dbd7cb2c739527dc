use idem_runtime::{idempotent, SqliteTx};

#[derive(serde::Serialize)]
pub struct OrderPaid {
    pub order_id: String,
    pub amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "", store = "postgres", strategy = "dedup_tabel", ttl = "soon")]
async fn handler(_tx: &mut SqliteTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

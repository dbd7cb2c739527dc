use idem_runtime::{idempotent, MemoryTx};

#[derive(serde::Serialize)]
pub struct OrderPaid {
    pub order_id: String,
    pub amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "order_id", store = "memory", strategy = "unique_constraint")]
async fn handler(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

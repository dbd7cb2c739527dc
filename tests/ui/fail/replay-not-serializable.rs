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

pub struct Receipt(pub i64);

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", replay)]
async fn handler(_tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<Receipt, AppError> { Ok(Receipt(msg.amount)) }

fn main() {}

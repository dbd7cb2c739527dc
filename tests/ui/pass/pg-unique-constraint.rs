//! The README's first example.
use idem_runtime::{idempotent, PgTx};

pub struct OrderPaid {
    pub order_id: String,
    pub amount: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "order_id", store = "pg", strategy = "unique_constraint", constraint = "payments_order_id_key")]
async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn main() {
    // Type-checks the call; running it needs a server (the store_pg tests do that).
    let _ = |store: idem_runtime::PgStore| async move {
        let msg = OrderPaid { order_id: "o-1".into(), amount: 250 };
        on_order_paid(&store, msg, idem_runtime::NoAck).await
    };
}

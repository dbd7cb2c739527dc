use idem_runtime::{idempotent, PgStore, PgTx, NoAck};

pub struct OrderPaid {
    pub order_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table")]
async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("SELECT $1").bind(&msg.order_id).execute(&mut **tx).await?;
    Ok(())
}

fn assert_send<F: std::future::Future + Send>(_: F) {}

fn main() {
    // tokio::spawn needs this: the generated future is Send.
    let _ = |store: PgStore| assert_send(async move {
        on_order_paid(&store, OrderPaid { order_id: "o".into() }, NoAck).await
    });
}

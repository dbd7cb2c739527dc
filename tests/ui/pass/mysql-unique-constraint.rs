use idem_runtime::{idempotent, MySqlTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "mysql", strategy = "unique_constraint", constraint = "payments_order_id_key")]
async fn on_order_paid(tx: &mut MySqlTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id, amount) VALUES (?, ?)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn main() {
    let _ = |store: idem_runtime::MySqlStore, msg: OrderPaid| async move {
        on_order_paid(&store, msg, idem_runtime::NoAck).await
    };
}

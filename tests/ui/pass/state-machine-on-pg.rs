use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

/// Every state-machine argument, list and single-state forms.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "state_machine",
    scope = "orders.pay",
    table = "shop.orders",
    column = "status",
    key_column = "id",
    from = ["pending", "authorized"],
    to = "paid",
    done = ["shipped", "delivered"],
    on_missing = "dead_letter",
)]
async fn on_payment_captured(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn main() {
    let _ = |store: idem_runtime::PgStore, msg: OrderPaid| async move {
        on_payment_captured(&store, msg, idem_runtime::NoAck).await
    };
}

//! Batch handlers: a free function, a method, `unique_constraint`, a composite key with the
//! message id, and the future is `Send`.
use idem_runtime::handler::BatchHandler as _;
use idem_runtime::{idempotent, NoAck, PgStore, PgTx, SqliteTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "ui.batch.free", batch, fingerprint, ttl = "7d", max_attempts = 3)]
async fn on_orders(tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<(), AppError> {
    let ids: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
    sqlx::query("SELECT $1::text[]").bind(&ids).execute(&mut **tx).await?;
    Ok(())
}

#[idempotent(key = "order_id", store = "sqlite", strategy = "unique_constraint", constraint = "payments.order_id", scope = "ui.batch.unique", batch)]
async fn on_payments(_tx: &mut SqliteTx<'_>, _msgs: &[OrderPaid]) -> Result<(), AppError> {
    Ok(())
}

struct Ledger;

impl Ledger {
    #[idempotent(key = "order_id, $message_id", store = "pg", strategy = "dedup_table", scope = "ui.batch.method", batch)]
    async fn on_entries(&self, _tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<(), AppError> {
        if msgs.is_empty() {
            return Ok(());
        }
        Ok(())
    }
}

fn assert_send<F: std::future::Future + Send>(_: F) {}

fn main() {
    let _ = |store: PgStore| {
        assert_send(async move {
            let results = on_orders(&store, vec![(OrderPaid { order_id: "o".into(), amount: 1 }, NoAck)]).await;
            let _ = Ledger.on_entries(&store, vec![(OrderPaid { order_id: "o".into(), amount: 1 }, NoAck)]).await;
            results
        })
    };
    let handler = idem_runtime::batch_handler!(on_orders);
    let _ = |store: PgStore| assert_send(async move { handler.handle_batch(&store, Vec::new()).await });
    let _ = |store: idem_runtime::SqliteStore| {
        assert_send(async move { on_payments(&store, Vec::<(OrderPaid, NoAck)>::new()).await })
    };
}

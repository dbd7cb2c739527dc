use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "ui.batch.value", batch)]
async fn handler(_tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<i64, AppError> {
    Ok(msgs.iter().map(|msg| msg.amount).sum())
}

fn main() {}

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

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "billing.order_paid",
    ttl = "7d",
    replay,
    fingerprint = true,
    crate = "idem_runtime",
)]
async fn on_order_paid(_tx: &mut SqliteTx<'_>, msg: OrderPaid) -> Result<i64, AppError> {
    Ok(msg.amount)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let path = std::env::temp_dir().join(format!("idem-ui-{}.db", std::process::id()));
    let store = idem_runtime::SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    let msg = || OrderPaid { order_id: "o-1".into(), amount: 250 };
    let first = on_order_paid(&store, msg(), idem_runtime::NoAck).await.unwrap();
    let again = on_order_paid(&store, msg(), idem_runtime::NoAck).await.unwrap();
    assert_eq!(first, idem_runtime::Outcome::Processed(250));
    assert_eq!(again, idem_runtime::Outcome::Duplicate { replayed: Some(250) });
    drop(store);
    let _ = std::fs::remove_file(&path);
}

//! A message that borrows, a result that borrows from it, named lifetimes on the parameters.
use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck, Outcome};

pub struct Ping<'a> {
    pub id: &'a str,
    pub note: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "id", store = "memory", strategy = "dedup_table")]
async fn on_ping<'a, 't>(_tx: &'t mut MemoryTx, msg: Ping<'a>) -> Result<&'a str, AppError> {
    Ok(msg.note)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let id = String::from("p-1");
    let note = String::from("hello");
    let outcome = on_ping(&store, Ping { id: &id, note: &note }, NoAck).await.unwrap();
    assert_eq!(outcome, Outcome::Processed("hello"));
}

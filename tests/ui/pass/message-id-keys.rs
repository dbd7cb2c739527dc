//! `$message_id` alone and with a field; the in-transaction companion takes the id.
use idem_runtime::{idempotent, Acknowledger, Committed, DeadLetter, MemoryStore, MemoryTx, Requeue, Store};

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

pub struct Refund {
    pub user_id: String,
}

struct WithId(&'static str);

impl Acknowledger for WithId {
    type Error = std::convert::Infallible;
    fn attempt(&self) -> Option<u32> {
        None
    }
    fn message_id(&self) -> Option<&str> {
        Some(self.0)
    }
    async fn ack(self, _proof: Committed) -> Result<(), Self::Error> {
        Ok(())
    }
    async fn requeue(self, _requeue: Requeue) -> Result<(), Self::Error> {
        Ok(())
    }
    async fn dead_letter(self, _letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[idempotent(key = "$message_id", store = "memory", strategy = "dedup_table")]
async fn by_id(_tx: &mut MemoryTx, _msg: Refund) -> Result<(), AppError> {
    Ok(())
}

#[idempotent(key = "user_id, $message_id", store = "memory", strategy = "dedup_table")]
async fn by_user_and_id(_tx: &mut MemoryTx, _msg: Refund) -> Result<(), AppError> {
    Ok(())
}

fn refund(user: &str) -> Refund {
    Refund { user_id: user.into() }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    assert!(by_id(&store, refund("a"), WithId("m-1")).await.unwrap().is_processed());
    assert!(by_id(&store, refund("b"), WithId("m-1")).await.unwrap().is_duplicate());
    assert!(by_user_and_id(&store, refund("a"), WithId("m-1")).await.unwrap().is_processed());
    assert!(by_user_and_id(&store, refund("b"), WithId("m-1")).await.unwrap().is_processed());
    assert!(by_user_and_id(&store, refund("a"), WithId("m-1")).await.unwrap().is_duplicate());

    let mut tx = store.begin().await.unwrap();
    assert!(by_id_in_transaction(&store, &mut tx, refund("a"), "m-2").await.unwrap().is_processed());
    store.commit(tx).await.unwrap();
    assert!(by_id(&store, refund("a"), WithId("m-2")).await.unwrap().is_duplicate());
}

use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};

pub struct Envelope<T> {
    pub message_id: String,
    pub body: T,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "message_id", store = "memory", strategy = "dedup_table", scope = "envelopes")]
async fn on_envelope<T: Send + std::fmt::Debug>(_tx: &mut MemoryTx, msg: Envelope<T>) -> Result<String, AppError>
where
    T: 'static,
{
    Ok(format!("{:?}", msg.body))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let env = Envelope { message_id: "m-1".into(), body: 5_u8 };
    assert!(on_envelope(&store, env, NoAck).await.unwrap().is_processed());
}

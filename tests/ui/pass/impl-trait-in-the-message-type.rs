//! An `impl Trait` argument: the message is an envelope around any payload. (A bare
//! `msg: impl Trait` cannot be keyed: a key is a field path, which needs a concrete type.)
use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};

pub struct Envelope<P> {
    pub message_id: String,
    pub payload: P,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

#[idempotent(key = "message_id", store = "memory", strategy = "dedup_table", scope = "envelopes")]
async fn on_envelope(_tx: &mut MemoryTx, msg: Envelope<impl std::fmt::Debug + Send>) -> Result<String, AppError> {
    Ok(format!("{:?}", msg.payload))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let envelope = Envelope { message_id: "m-1".into(), payload: vec![1, 2] };
    let outcome = on_envelope(&store, envelope, NoAck).await.unwrap();
    assert_eq!(outcome, idem_runtime::Outcome::Processed("[1, 2]".to_owned()));
}

use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck, Outcome};

pub struct Ping {
    pub id: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("app error")]
pub struct AppError;
impl idem_runtime::HandlerError for AppError {}

pub struct Service {
    factor: u64,
}

impl Service {
    #[idempotent(key = "id", store = "memory", strategy = "dedup_table", scope = "service.ping")]
    pub async fn on_ping(&self, _tx: &mut MemoryTx, msg: Ping) -> Result<u64, AppError> {
        Ok(msg.id * self.factor)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let service = Service { factor: 3 };
    let store = MemoryStore::new();
    let first = service.on_ping(&store, Ping { id: 2 }, NoAck).await.unwrap();
    assert_eq!(first, Outcome::Processed(6));
    assert!(service.on_ping(&store, Ping { id: 2 }, NoAck).await.unwrap().is_duplicate());
}

use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck, Outcome};

pub struct Job {
    pub id: u64,
    pub input: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("bad number: {0}")]
    Parse(#[from] std::num::ParseIntError),
}
impl idem_runtime::HandlerError for AppError {}

type Result<T> = std::result::Result<T, AppError>;

#[idempotent(key = "id", store = "memory", strategy = "dedup_table")]
async fn on_job(_tx: &mut MemoryTx, msg: Job) -> Result<i64> {
    if msg.input.is_empty() {
        return Ok(0); // returns from the body, not from the generated function
    }
    let n: i64 = msg.input.parse()?;
    Ok(n)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let job = |id, input: &str| Job { id, input: input.into() };
    assert_eq!(on_job(&store, job(1, ""), NoAck).await.unwrap(), Outcome::Processed(0));
    assert_eq!(on_job(&store, job(2, "42"), NoAck).await.unwrap(), Outcome::Processed(42));
    assert!(on_job(&store, job(3, "x"), NoAck).await.is_err());
}

use idem_runtime::{idempotent, MemoryTx};
use idem_tests::ui::AppError;

pub struct Envelope<T> {
    pub message_id: String,
    pub body: T,
}

#[idempotent(key = "message_id", store = "memory", strategy = "dedup_table")]
async fn on_envelope(_tx: &mut MemoryTx, _msg: Envelope<impl Send>) -> Result<(), AppError> {
    Ok(())
}

fn main() {}

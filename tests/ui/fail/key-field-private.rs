use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::AppError;

mod messages {
    pub struct Shipped {
        secret_id: String,
    }
}

#[idempotent(key = "secret_id", store = "pg", strategy = "dedup_table")]
async fn handler(_tx: &mut PgTx<'_>, _msg: messages::Shipped) -> Result<(), AppError> { Ok(()) }

fn main() {}

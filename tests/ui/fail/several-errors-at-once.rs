use idem_runtime::{idempotent, SqliteTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "", store = "postgres", strategy = "dedup_tabel", ttl = "soon")]
async fn handler(_tx: &mut SqliteTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

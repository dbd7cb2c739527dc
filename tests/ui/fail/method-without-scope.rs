//! Two services' `handle` methods in one module would share the default scope.
use idem_runtime::{idempotent, MemoryTx};
use idem_tests::ui::{AppError, OrderPaid};

pub struct Emailer;

impl Emailer {
    #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table")]
    pub async fn handle(&self, _tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
        Ok(())
    }
}

fn main() {}

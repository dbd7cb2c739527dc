//! A handler nested in a function body: two such functions of one name in a module would
//! share the default scope, so an explicit `scope` is required.
use idem_runtime::{idempotent, MemoryTx};
use idem_tests::ui::{AppError, OrderPaid};

fn main() {
    #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table")]
    async fn on_order_paid(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
        Ok(())
    }
}

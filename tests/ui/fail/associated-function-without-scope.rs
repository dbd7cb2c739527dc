//! An associated function (no `self`) in an `impl` block shares the default scope with every
//! other type's function of that name in the module, and a generic `impl` with every
//! instantiation: an explicit `scope` is required.
use idem_runtime::{idempotent, MemoryTx};
use idem_tests::ui::{AppError, OrderPaid};

pub struct Emailer<T>(pub T);

impl<T> Emailer<T> {
    #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table")]
    pub async fn on_order_paid(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
        Ok(())
    }
}

fn main() {}

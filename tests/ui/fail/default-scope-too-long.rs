//! The default scope (module path and name) is checked at compile time, like an explicit one.
mod a_module_whose_name_is_long_enough_to_matter_when_it_is_nested_inside_others {
    pub mod another_module_whose_name_is_long_enough_to_matter_when_it_is_nested_too {
        pub mod and_a_third_one_so_that_the_default_scope_goes_past_two_hundred_bytes {
            use idem_runtime::{idempotent, MemoryTx};
            use idem_tests::ui::{AppError, OrderPaid};

            #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table")]
            pub async fn on_order_paid(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
                Ok(())
            }
        }
    }
}

fn main() {}

use idem_runtime::{idempotent, PgTx};
use idem_tests::ui::{AppError, OrderPaid};

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "billing.this_scope_name_keeps_going_and_going_well_past_the_two_hundred_bytes_that_fit_in_one_index_entry_next_to_the_key_on_every_supported_database_which_is_why_the_macro_rejects_it_before_any_database_could_ever_see_it")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

use idem_runtime::{idempotent, KeyPart, PgTx};
use idem_tests::ui::AppError;

#[derive(Clone)]
pub struct OrderId(pub u64);

impl KeyPart for OrderId {
    fn write_key_part(&self, out: &mut String) {
        self.0.write_key_part(out);
    }
}

pub struct OrderPaid {
    pub order_id: OrderId,
}

#[idempotent(key = "order_id", store = "pg", strategy = "state_machine", table = "orders", column = "status", from = "pending", to = "paid")]
async fn handler(_tx: &mut PgTx<'_>, _msg: OrderPaid) -> Result<(), AppError> { Ok(()) }

fn main() {}

//! Every Redis argument together, a method, a handler value and a `Send` future: all compile.
//! (Nothing here talks to Redis: tests/store_redis.rs runs these strategies live.)

use idem_runtime::handler::Handler as _;
use idem_runtime::{NoAck, RedisStore, handler, idempotent};
use idem_tests::ui::{AppError, OrderPaid};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Charge {
    token: String,
    amount: i64,
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "ui.redis.lock",
    lease = "2m",
    fixed_lease,
    ttl = "7d",
    replay,
    fingerprint,
    max_attempts = 4
)]
async fn on_paid(msg: OrderPaid) -> Result<i64, AppError> {
    Ok(msg.amount)
}

#[idempotent(key = "token", store = "redis", strategy = "token", scope = "ui.redis.token", spend_on_error)]
async fn on_charge(msg: &Charge) -> Result<(), AppError> {
    let _ = msg.amount;
    Ok(())
}

struct Ledger;

impl Ledger {
    #[idempotent(key = "order.order_id", store = "redis", strategy = "lock", scope = "ui.redis.method")]
    async fn record(&self, msg: Wrapped) -> Result<(), AppError> {
        let _ = msg.order.amount;
        Ok(())
    }
}

struct Wrapped {
    order: OrderPaid,
}

fn is_send<T: Send>(_: &T) {}

fn main() {
    // Built, never run: the futures are `Send`, and the functions have the generated shape.
    let store: Option<&RedisStore> = None;
    if let Some(store) = store {
        let paid = OrderPaid { order_id: "o-1".into(), amount: 1 };
        is_send(&on_paid(store, paid.clone(), NoAck));
        let charge = Charge { token: "t".into(), amount: 1 };
        is_send(&on_charge(store, &charge, NoAck));
        is_send(&Ledger.record(store, Wrapped { order: paid.clone() }, NoAck));
        let value = handler!(on_paid);
        is_send(&value.handle(store, paid, NoAck));
        let _body = on_paid_body(OrderPaid { order_id: "o-2".into(), amount: 2 });
    }
}

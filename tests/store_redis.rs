//! The Redis store (`store = "redis"`): `lock` (a fenced lease, then a done marker) and `token`
//! (single-use tokens), against the live Redis on 127.0.0.1:6379.

use idem_runtime::{NoAck, RedisStore, idempotent};
use idem_tests::{AppError, Payment, count_run, runs, unique_key};

async fn store() -> RedisStore {
    RedisStore::connect("redis://127.0.0.1:6379")
        .await
        .expect("Redis on 127.0.0.1:6379 (scripts/services starts it)")
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.smoke"
)]
async fn smoke(msg: Payment) -> Result<i64, AppError> {
    count_run(&msg.order_id);
    Ok(msg.amount)
}

#[tokio::test]
async fn a_lock_runs_the_body_once() {
    let store = store().await;
    let key = unique_key("redis-smoke");
    let first = smoke(&store, Payment::new(&key, 5), NoAck).await.unwrap();
    assert!(first.is_processed());
    let again = smoke(&store, Payment::new(&key, 5), NoAck).await.unwrap();
    assert!(again.is_duplicate());
    assert_eq!(runs(&key), 1);
}

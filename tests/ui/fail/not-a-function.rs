use idem_runtime::{idempotent};

#[idempotent(key = "order_id", store = "pg", strategy = "dedup_table")]
struct Handler;

fn main() {}

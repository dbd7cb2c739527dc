//! `mode = "observe"` on `dedup_table`: a duplicate is counted and its body runs anyway;
//! `mode = "enforce"`, the default written out, drops it.
use std::sync::atomic::{AtomicUsize, Ordering};

use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck, Outcome};
use idem_tests::ui::{AppError, OrderPaid};

static OBSERVED_RUNS: AtomicUsize = AtomicUsize::new(0);
static ENFORCED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "ui.mode.observe", mode = "observe")]
async fn observed(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
    OBSERVED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "ui.mode.enforce", mode = "enforce")]
async fn enforced(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
    ENFORCED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = MemoryStore::new();
    let msg = || OrderPaid { order_id: "o-1".into(), amount: 250 };
    for _ in 0..2 {
        observed(&store, msg(), NoAck).await.unwrap();
    }
    assert_eq!(OBSERVED_RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(idem_runtime::observed_duplicates("ui.mode.observe"), 1);

    assert_eq!(enforced(&store, msg(), NoAck).await.unwrap(), Outcome::Processed(()));
    assert!(enforced(&store, msg(), NoAck).await.unwrap().is_duplicate());
    assert_eq!(ENFORCED_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(idem_runtime::observed_duplicates("ui.mode.enforce"), 0);
}

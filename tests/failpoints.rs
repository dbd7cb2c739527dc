//! The `failpoints` feature: every named failpoint is passed, in order, by a delivery on live
//! PostgreSQL, and a crash at the two that matter most does what the docs say: killed after the
//! commit, the effect stays and the redelivery is a duplicate; killed before it, nothing stays
//! and the redelivery runs the body.
//!
//! A "crash" here is a panic configured at the failpoint: it unwinds out of the pipeline (only
//! the body's panics are caught), so nothing after the failpoint runs, as if the process died.
//! The chaos harness (`examples/chaos.rs`) kills real consumer processes at the same points.
//!
//! The failpoint registry is process-wide: each test holds a `fail::FailScenario`, which
//! serializes them.

use std::sync::{Arc, Mutex, PoisonError};

use idem_runtime::failpoints::{self, fail};
use idem_runtime::{Outcome, PgStore, PgTx, idempotent, sqlx};
use idem_tests::{AckEvent, AppError, Payment, RecordingAck, count_run, runs, unique_key};

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.failpoints.paid"
)]
async fn on_paid(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    sqlx::query("INSERT INTO idem_failpoint_payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn store() -> PgStore {
    let store = idem_tests::pg::store().await;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idem_failpoint_payments (order_id TEXT NOT NULL, amount BIGINT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .expect("create the business table");
    store
}

async fn rows(store: &PgStore, key: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM idem_failpoint_payments WHERE order_id = $1")
        .bind(key)
        .fetch_one(store.pool())
        .await
        .expect("count the business rows")
}

/// Arms every failpoint with a callback that records its name.
fn record_every_failpoint() -> Arc<Mutex<Vec<&'static str>>> {
    let passed = Arc::new(Mutex::new(Vec::new()));
    for name in failpoints::ALL {
        let passed = Arc::clone(&passed);
        fail::cfg_callback(name, move || {
            passed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(name);
        })
        .expect("arm the failpoint");
    }
    passed
}

fn taken(passed: &Mutex<Vec<&'static str>>) -> Vec<&'static str> {
    std::mem::take(&mut *passed.lock().unwrap_or_else(PoisonError::into_inner))
}

#[tokio::test]
async fn a_processed_delivery_passes_every_failpoint_in_order_and_a_duplicate_only_the_ack_ones() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let key = unique_key("fp-order");
    let passed = record_every_failpoint();

    let first = on_paid(&store, Payment::new(&key, 10), RecordingAck::new()).await;
    assert!(matches!(first, Ok(Outcome::Processed(()))), "{first:?}");
    assert_eq!(taken(&passed), failpoints::ALL);

    let again = on_paid(&store, Payment::new(&key, 10), RecordingAck::new()).await;
    assert!(
        matches!(again, Ok(ref outcome) if outcome.is_duplicate()),
        "{again:?}"
    );
    assert_eq!(
        taken(&passed),
        [failpoints::AFTER_COMMIT, failpoints::AFTER_ACK]
    );
    scenario.teardown();
}

#[tokio::test]
async fn a_crash_after_the_commit_keeps_the_effect_and_the_redelivery_is_a_duplicate() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let key = unique_key("fp-after-commit");
    fail::cfg(failpoints::AFTER_COMMIT, "1*panic").expect("arm the failpoint");

    let ack = RecordingAck::new();
    let crashed = tokio::spawn({
        let (store, key, ack) = (store.clone(), key.clone(), ack.clone());
        async move { on_paid(&store, Payment::new(&key, 10), ack).await }
    })
    .await;
    assert!(crashed.is_err_and(|error| error.is_panic()));
    assert_eq!(ack.events(), [], "the crash came before the ack");
    assert_eq!(rows(&store, &key).await, 1, "the effect was committed");

    let redelivered = RecordingAck::new();
    let again = on_paid(&store, Payment::new(&key, 10), redelivered.clone()).await;
    assert!(
        matches!(again, Ok(ref outcome) if outcome.is_duplicate()),
        "{again:?}"
    );
    assert_eq!(redelivered.events(), [AckEvent::Ack]);
    assert_eq!(runs(&key), 1, "the body ran once");
    assert_eq!(rows(&store, &key).await, 1);
    scenario.teardown();
}

#[tokio::test]
async fn a_crash_before_the_commit_leaves_nothing_and_the_redelivery_runs_the_body() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let key = unique_key("fp-before-commit");
    fail::cfg(failpoints::BEFORE_COMMIT, "1*panic").expect("arm the failpoint");

    let ack = RecordingAck::new();
    let crashed = tokio::spawn({
        let (store, key, ack) = (store.clone(), key.clone(), ack.clone());
        async move { on_paid(&store, Payment::new(&key, 10), ack).await }
    })
    .await;
    assert!(crashed.is_err_and(|error| error.is_panic()));
    assert_eq!(ack.events(), []);
    assert_eq!(rows(&store, &key).await, 0, "nothing was committed");

    let redelivered = RecordingAck::new();
    let again = on_paid(&store, Payment::new(&key, 10), redelivered.clone()).await;
    assert!(matches!(again, Ok(Outcome::Processed(()))), "{again:?}");
    assert_eq!(redelivered.events(), [AckEvent::Ack]);
    assert_eq!(runs(&key), 2, "the body ran again");
    assert_eq!(rows(&store, &key).await, 1);
    scenario.teardown();
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.failpoints.paid_batch",
    batch
)]
async fn on_paid_batch(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    for msg in msgs {
        count_run(&msg.order_id);
        sqlx::query("INSERT INTO idem_failpoint_payments (order_id, amount) VALUES ($1, $2)")
            .bind(&msg.order_id)
            .bind(msg.amount)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn batch_of(keys: &[String]) -> (Vec<(Payment, RecordingAck)>, Vec<RecordingAck>) {
    let acks: Vec<RecordingAck> = keys.iter().map(|_| RecordingAck::new()).collect();
    let batch = keys
        .iter()
        .zip(&acks)
        .map(|(key, ack)| (Payment::new(key, 10), ack.clone()))
        .collect();
    (batch, acks)
}

#[tokio::test]
async fn a_batch_passes_every_failpoint_in_order() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let keys: Vec<String> = (0..3).map(|_| unique_key("fp-batch-order")).collect();
    let passed = record_every_failpoint();
    let (batch, _) = batch_of(&keys);
    let results = on_paid_batch(&store, batch).await;
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Ok(Outcome::Processed(()))))
    );
    assert_eq!(taken(&passed), failpoints::ALL, "once for the whole batch");
    scenario.teardown();
}

#[tokio::test]
async fn a_crash_after_a_batch_commit_keeps_every_effect_and_the_redelivery_is_all_duplicates() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let keys: Vec<String> = (0..5)
        .map(|_| unique_key("fp-batch-after-commit"))
        .collect();
    fail::cfg(failpoints::AFTER_COMMIT, "1*panic").expect("arm the failpoint");

    let (batch, acks) = batch_of(&keys);
    let crashed = tokio::spawn({
        let store = store.clone();
        async move { on_paid_batch(&store, batch).await }
    })
    .await;
    assert!(crashed.is_err_and(|error| error.is_panic()));
    for (key, ack) in keys.iter().zip(&acks) {
        assert_eq!(ack.events(), [], "the crash came before any ack");
        assert_eq!(
            rows(&store, key).await,
            1,
            "{key}: the effect was committed"
        );
    }

    let (again, acks) = batch_of(&keys);
    let results = on_paid_batch(&store, again).await;
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Ok(outcome) if outcome.is_duplicate())),
        "{results:?}"
    );
    for (key, ack) in keys.iter().zip(&acks) {
        assert_eq!(ack.events(), [AckEvent::Ack]);
        assert_eq!(runs(key), 1, "{key}: the body ran once");
        assert_eq!(rows(&store, key).await, 1);
    }
    scenario.teardown();
}

#[tokio::test]
async fn a_crash_before_a_batch_commit_leaves_nothing_and_the_redelivery_runs_the_body() {
    let scenario = fail::FailScenario::setup();
    let store = store().await;
    let keys: Vec<String> = (0..5)
        .map(|_| unique_key("fp-batch-before-commit"))
        .collect();
    fail::cfg(failpoints::BEFORE_COMMIT, "1*panic").expect("arm the failpoint");

    let (batch, acks) = batch_of(&keys);
    let crashed = tokio::spawn({
        let store = store.clone();
        async move { on_paid_batch(&store, batch).await }
    })
    .await;
    assert!(crashed.is_err_and(|error| error.is_panic()));
    for (key, ack) in keys.iter().zip(&acks) {
        assert_eq!(ack.events(), []);
        assert_eq!(rows(&store, key).await, 0, "{key}: nothing was committed");
    }

    let (again, acks) = batch_of(&keys);
    let results = on_paid_batch(&store, again).await;
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Ok(Outcome::Processed(()))))
    );
    for (key, ack) in keys.iter().zip(&acks) {
        assert_eq!(ack.events(), [AckEvent::Ack]);
        assert_eq!(runs(key), 2, "{key}: the body ran again");
        assert_eq!(rows(&store, key).await, 1);
    }
    scenario.teardown();
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.failpoints.checked",
    fingerprint
)]
async fn on_checked(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    record_payment(tx, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "state_machine",
    scope = "tests.failpoints.ship",
    table = "idem_failpoint_orders",
    column = "status",
    from = "paid",
    to = "shipped"
)]
async fn on_ship(_tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    Ok(())
}

async fn record_payment(tx: &mut PgTx<'_>, msg: &Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    sqlx::query("INSERT INTO idem_failpoint_payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Runs `delivery` with [`failpoints::BEFORE_TAKEN_KEY_READ`] armed to run `sql`, with `key`
/// bound, between the gate that travels with the `BEGIN` and its second statement.
async fn with_statement_before_the_read<T>(
    sql: &'static str,
    key: &str,
    delivery: impl std::future::Future<Output = T>,
) -> T {
    let key = key.to_owned();
    fail::cfg_callback(failpoints::BEFORE_TAKEN_KEY_READ, move || {
        run_blocking(sql, key.clone());
    })
    .expect("arm the failpoint");
    let output = delivery.await;
    fail::remove(failpoints::BEFORE_TAKEN_KEY_READ);
    output
}

/// Runs `sql` with `key` bound on a connection of its own, from a failpoint callback (which is
/// synchronous): on a thread and a runtime of its own, joined before the callback returns.
fn run_blocking(sql: &'static str, key: String) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the callback");
        runtime.block_on(async move {
            let store = idem_tests::pg::connect().await;
            sqlx::query(sql)
                .bind(key)
                .execute(store.pool())
                .await
                .expect("the callback's statement");
        });
    })
    .join()
    .expect("the callback's thread");
}

/// With the gate in the `BEGIN`, a taken key's record is read by a second statement. A record
/// deleted between the two (a purge, `forget`) leaves the key free: the delivery claims it on
/// the two-step path and runs, once.
#[tokio::test]
async fn a_record_deleted_between_the_gate_and_its_read_leaves_the_key_to_claim() {
    let scenario = fail::FailScenario::setup();
    let store = store().await.with_gate_in_begin(true);
    let key = unique_key("fp-vanish");
    let payment = Payment::new(&key, 100);
    idem_runtime::Store::mark_processed(
        &store,
        [idem_runtime::Key::new("tests.failpoints.checked", &[("order_id", &key)]).expect("key")],
        None,
    )
    .await
    .expect("an earlier delivery's record");
    let outcome = with_statement_before_the_read(
        "DELETE FROM idem_records WHERE scope = 'tests.failpoints.checked' AND record_key = $1",
        &key,
        on_checked(&store, payment, RecordingAck::new()),
    )
    .await;
    assert!(matches!(outcome, Ok(Outcome::Processed(()))), "{outcome:?}");
    assert_eq!(runs(&key), 1);
    assert_eq!(rows(&store, &key).await, 1);
    scenario.teardown();
}

/// With the gate in the `BEGIN`, a step whose row did not move reads the row's state with a
/// second statement. A row moved back into the step's `from` between the two (another
/// process's correction) is not refused as an invalid transition: the step runs again on the
/// two-step path, and moves it.
#[tokio::test]
async fn a_row_moved_back_between_the_step_and_its_read_is_moved_again() {
    let scenario = fail::FailScenario::setup();
    let store = store().await.with_gate_in_begin(true);
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idem_failpoint_orders (order_id TEXT PRIMARY KEY, status TEXT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .expect("create the orders table");
    let key = unique_key("fp-moved-back");
    sqlx::query("INSERT INTO idem_failpoint_orders (order_id, status) VALUES ($1, 'shipped')")
        .bind(&key)
        .execute(store.pool())
        .await
        .expect("an order already shipped");
    let outcome = with_statement_before_the_read(
        "UPDATE idem_failpoint_orders SET status = 'paid' WHERE order_id = $1",
        &key,
        on_ship(&store, Payment::new(&key, 100), RecordingAck::new()),
    )
    .await;
    assert!(matches!(outcome, Ok(Outcome::Processed(()))), "{outcome:?}");
    assert_eq!(runs(&key), 1);
    let status: String =
        sqlx::query_scalar("SELECT status FROM idem_failpoint_orders WHERE order_id = $1")
            .bind(&key)
            .fetch_one(store.pool())
            .await
            .expect("read the order");
    assert_eq!(status, "shipped");
    scenario.teardown();
}

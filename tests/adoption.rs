//! Adopting idem in a service that already runs: the handler inside a transaction the caller
//! owns (`<name>_in_transaction`), the undecorated body (`<name>_body`), the handler as a value
//! (`handler!`), observe mode, importing the keys it processed before (`mark_processed`), and
//! reprocessing one on purpose (`forget`, by scope and key as logged), on PostgreSQL, MariaDB,
//! SQLite and the memory store.

use idem_runtime::{
    Key, MemoryStore, MemoryTx, MySqlTx, NoAck, PgTx, SqliteTx, Store as _, idempotent,
};
use idem_tests::effects::{Effects as _, TestStore as _};
use idem_tests::{AppError, Payment, runs, unique_key};

const SCOPE_PG: &str = "adoption.pg";
const SCOPE_MYSQL: &str = "adoption.mysql";
const SCOPE_SQLITE: &str = "adoption.sqlite";
const SCOPE_MEMORY: &str = "adoption.memory";

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "adoption.pg"
)]
async fn on_pg(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await?;
    idem_tests::maybe_fail(&msg.order_id)
}

#[idempotent(
    key = "order_id",
    store = "mysql",
    strategy = "dedup_table",
    scope = "adoption.mysql"
)]
async fn on_mysql(tx: &mut MySqlTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await?;
    idem_tests::maybe_fail(&msg.order_id)
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "adoption.sqlite"
)]
async fn on_sqlite(tx: &mut SqliteTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await?;
    idem_tests::maybe_fail(&msg.order_id)
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "adoption.memory"
)]
async fn on_memory(tx: &mut MemoryTx, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await
}

fn key(scope: &'static str, order_id: &str) -> Key {
    Key::new(scope, &[("order_id", &order_id)]).expect("a valid key")
}

/// The cases, for any store: keys imported before the switch are duplicates (their bodies do
/// not run); an import is idempotent; a forgotten key is processed again, once.
macro_rules! adoption_cases {
    ($store:expr, $scope:expr, $handler:path) => {{
        let store = $store;
        let handled_before: Vec<String> = (0..5).map(|_| unique_key("imported")).collect();
        let imported = store
            .mark_processed(handled_before.iter().map(|id| key($scope, id)), None)
            .await
            .expect("import");
        assert_eq!(imported, 5);
        let again = store
            .mark_processed(handled_before.iter().map(|id| key($scope, id)), None)
            .await
            .expect("import again");
        assert_eq!(again, 0, "an import is idempotent");
        for id in &handled_before {
            let outcome = $handler(&store, Payment::new(id, 1), NoAck)
                .await
                .expect("delivery");
            assert!(outcome.is_duplicate(), "{id}: {outcome:?}");
            assert_eq!(runs(id), 0, "the body of an imported key does not run");
        }
        let fresh = unique_key("fresh");
        assert!(
            $handler(&store, Payment::new(&fresh, 1), NoAck)
                .await
                .expect("fresh")
                .is_processed()
        );

        let replayed = &handled_before[0];
        let logged = key($scope, replayed);
        assert!(
            store
                .forget(logged.scope(), logged.value())
                .await
                .expect("forget"),
            "the record existed"
        );
        let outcome = $handler(&store, Payment::new(replayed, 1), NoAck)
            .await
            .expect("replay");
        assert!(outcome.is_processed(), "a forgotten key is processed again");
        let outcome = $handler(&store, Payment::new(replayed, 1), NoAck)
            .await
            .expect("again");
        assert!(outcome.is_duplicate(), "and only once");
        assert_eq!(runs(replayed), 1);
        assert_eq!(store.ledger_rows(replayed).await, 1);
        assert_eq!(store.records($scope, replayed).await, 1);
    }};
}

#[tokio::test]
async fn postgres_imports_and_forgets() {
    adoption_cases!(idem_tests::pg::store().await, SCOPE_PG, on_pg);
}

#[tokio::test]
async fn mysql_imports_and_forgets() {
    adoption_cases!(idem_tests::mysql::store().await, SCOPE_MYSQL, on_mysql);
}

#[tokio::test]
async fn sqlite_imports_and_forgets() {
    adoption_cases!(idem_tests::sqlite::store().await, SCOPE_SQLITE, on_sqlite);
}

#[tokio::test]
async fn memory_imports_and_forgets() {
    adoption_cases!(MemoryStore::new(), SCOPE_MEMORY, on_memory);
}

/// Importing a key whose record expired renews it, as a first delivery would.
#[tokio::test]
async fn an_expired_record_is_renewed_by_an_import() {
    use idem_runtime::clock::ManualClock;
    let clock = ManualClock::starting_now();
    let store = idem_tests::sqlite::store().await.with_clock(clock.clone());
    let id = unique_key("renewed");
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(
        store
            .mark_processed([key(SCOPE_SQLITE, &id)], Some(hour))
            .await
            .expect("import"),
        1
    );
    clock.advance(hour * 2);
    assert_eq!(
        store
            .mark_processed([key(SCOPE_SQLITE, &id)], Some(hour))
            .await
            .expect("import again"),
        1,
        "the expired record is taken over"
    );
    let outcome = on_sqlite(&store, Payment::new(&id, 1), NoAck)
        .await
        .expect("delivery");
    assert!(outcome.is_duplicate());
}

// ---------------------------------------------------------------------------------------------
// The handler inside a transaction the caller owns, and the undecorated body.

/// The caller's own write in its transaction, next to the handler's.
async fn caller_write<T: idem_tests::effects::Effects>(tx: &mut T, id: &str) {
    tx.ledger(&format!("caller-{id}"), 1)
        .await
        .expect("the caller's own write");
}

/// The cases, for a SQL store whose pool begins the caller's transaction.
macro_rules! caller_transaction_cases {
    ($store:expr, $scope:expr, $handler:ident, $in_transaction:ident, $body:ident) => {{
        let store = $store;

        // The caller commits: the handler's effects and record are durable with the caller's.
        let id = unique_key("caller-commits");
        let mut tx = store.pool().begin().await.expect("begin");
        caller_write(&mut tx, &id).await;
        let outcome = $in_transaction(&store, &mut tx, Payment::new(&id, 5))
            .await
            .expect("in the caller's transaction");
        assert!(outcome.is_processed(), "{outcome:?}");
        assert_eq!(
            store.records($scope, &id).await,
            0,
            "nothing is committed before the caller commits"
        );
        tx.commit().await.expect("the caller commits");
        assert_eq!(store.ledger_rows(&id).await, 1);
        assert_eq!(store.ledger_rows(&format!("caller-{id}")).await, 1);
        let next = $handler(&store, Payment::new(&id, 5), NoAck)
            .await
            .expect("redelivery");
        assert!(
            next.is_duplicate(),
            "the caller's commit made the record durable: {next:?}"
        );
        let mut tx = store.pool().begin().await.expect("begin");
        let again = $in_transaction(&store, &mut tx, Payment::new(&id, 5))
            .await
            .expect("a duplicate in the caller's transaction");
        assert!(again.is_duplicate(), "{again:?}");
        tx.commit().await.expect("commit");
        assert_eq!(runs(&id), 1, "the body ran once");
        assert_eq!(store.ledger_rows(&id).await, 1);

        // The caller rolls back: nothing is recorded, and the next delivery processes.
        let id = unique_key("caller-rolls-back");
        let mut tx = store.pool().begin().await.expect("begin");
        let outcome = $in_transaction(&store, &mut tx, Payment::new(&id, 5))
            .await
            .expect("in the caller's transaction");
        assert!(outcome.is_processed());
        tx.rollback().await.expect("the caller rolls back");
        assert_eq!(store.records($scope, &id).await, 0, "nothing recorded");
        assert_eq!(store.ledger_rows(&id).await, 0);
        let next = $handler(&store, Payment::new(&id, 5), NoAck)
            .await
            .expect("redelivery");
        assert!(next.is_processed(), "{next:?}");
        assert_eq!(runs(&id), 2);
        assert_eq!(store.ledger_rows(&id).await, 1);

        // The body fails: its writes and the gate's record are rolled back to the savepoint;
        // the caller's own write stays, and a caller that commits anyway records nothing.
        let id = unique_key("caller-body-fails");
        idem_tests::fail_once(&id);
        let mut tx = store.pool().begin().await.expect("begin");
        caller_write(&mut tx, &id).await;
        let failed = $in_transaction(&store, &mut tx, Payment::new(&id, 5)).await;
        assert!(
            matches!(
                failed,
                Err(idem_runtime::Error::Handler(AppError::Transient(_)))
            ),
            "{failed:?}"
        );
        tx.commit().await.expect("the caller commits its own write");
        assert_eq!(store.ledger_rows(&format!("caller-{id}")).await, 1);
        assert_eq!(
            store.ledger_rows(&id).await,
            0,
            "the body's write was rolled back"
        );
        assert_eq!(
            store.records($scope, &id).await,
            0,
            "so was the gate's record"
        );
        let next = $handler(&store, Payment::new(&id, 5), NoAck)
            .await
            .expect("redelivery");
        assert!(
            next.is_processed(),
            "the message is processed on redelivery: {next:?}"
        );
        assert_eq!(store.ledger_rows(&id).await, 1);

        // The undecorated body: no gate, no record, the caller's transaction.
        let id = unique_key("body-alone");
        let mut tx = store.pool().begin().await.expect("begin");
        let result: Result<(), AppError> = $body(&mut tx, Payment::new(&id, 5)).await;
        result.expect("the body alone");
        tx.commit().await.expect("commit");
        assert_eq!(store.ledger_rows(&id).await, 1);
        assert_eq!(
            store.records($scope, &id).await,
            0,
            "the body alone writes no record"
        );
        assert_eq!(runs(&id), 1);
    }};
}

#[tokio::test]
async fn postgres_runs_in_the_callers_transaction() {
    caller_transaction_cases!(
        idem_tests::pg::store().await,
        SCOPE_PG,
        on_pg,
        on_pg_in_transaction,
        on_pg_body
    );
}

#[tokio::test]
async fn mysql_runs_in_the_callers_transaction() {
    caller_transaction_cases!(
        idem_tests::mysql::store().await,
        SCOPE_MYSQL,
        on_mysql,
        on_mysql_in_transaction,
        on_mysql_body
    );
}

#[tokio::test]
async fn sqlite_runs_in_the_callers_transaction() {
    caller_transaction_cases!(
        idem_tests::sqlite::store().await,
        SCOPE_SQLITE,
        on_sqlite,
        on_sqlite_in_transaction,
        on_sqlite_body
    );
}

/// Twins racing in callers' transactions: one runs the body, the others are duplicates once
/// it commits.
#[tokio::test]
async fn postgres_twins_in_callers_transactions_run_the_body_once() {
    let store = idem_tests::pg::store().await;
    let id = unique_key("caller-twins");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut tx = store.pool().begin().await.expect("begin");
                let outcome = on_pg_in_transaction(&store, &mut tx, Payment::new(&id, 1))
                    .await
                    .expect("in the caller's transaction");
                tx.commit().await.expect("commit");
                outcome
            })
        })
        .collect();
    let mut processed = 0;
    for task in tasks {
        if task.await.expect("task").is_processed() {
            processed += 1;
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(runs(&id), 1);
    assert_eq!(store.ledger_rows(&id).await, 1);
}

// ---------------------------------------------------------------------------------------------
// Observe mode: the gate records as it would, a would-be duplicate is counted, the body runs.

const SCOPE_OBSERVED_PG: &str = "adoption.observed.pg";
const SCOPE_OBSERVED_SQLITE: &str = "adoption.observed.sqlite";

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "adoption.observed.pg",
    mode = "observe"
)]
async fn observed_pg(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "adoption.observed.sqlite",
    mode = "observe"
)]
async fn observed_sqlite(tx: &mut SqliteTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await
}

macro_rules! observe_cases {
    ($store:expr, $scope:expr, $observed:ident) => {{
        use idem_runtime::clock::{Clock as _, ManualClock};
        let clock = ManualClock::starting_now();
        let store = $store.with_clock(clock.clone());
        let id = unique_key("observed");
        let before = idem_runtime::observed_duplicates($scope);
        let first_at = clock.now_ms();
        let first = $observed(&store, Payment::new(&id, 3), NoAck)
            .await
            .expect("first");
        assert!(
            first.is_processed() && !first.is_observed_duplicate(),
            "{first:?}"
        );
        assert_eq!(
            store.records($scope, &id).await,
            1,
            "the gate records as it would"
        );
        for delivery in 2..=3 {
            clock.advance(std::time::Duration::from_secs(60));
            let again = $observed(&store, Payment::new(&id, 3), NoAck)
                .await
                .expect("again");
            assert!(again.is_processed(), "the body ran anyway");
            assert_eq!(
                again,
                idem_runtime::Outcome::ObservedDuplicate {
                    value: (),
                    first_seen_ms: Some(first_at)
                },
                "observed, with the first delivery's time"
            );
            assert_eq!(runs(&id), delivery);
        }
        assert_eq!(
            store.ledger_rows(&id).await,
            3,
            "every delivery committed its effects"
        );
        assert_eq!(store.records($scope, &id).await, 1, "one record");
        assert!(
            idem_runtime::observed_duplicates($scope) >= before + 2,
            "would-be duplicates are counted"
        );
    }};
}

#[tokio::test]
async fn postgres_observe_mode_counts_duplicates_and_runs_the_body() {
    observe_cases!(
        idem_tests::pg::store().await,
        SCOPE_OBSERVED_PG,
        observed_pg
    );
}

/// The same with the gate sent in the `BEGIN`'s round trip, whose duplicate has no transaction
/// left to run the body in, and reads the record for when it was first seen.
#[tokio::test]
async fn postgres_observe_mode_with_the_gate_in_begin_runs_the_body_and_knows_the_first_delivery() {
    observe_cases!(
        idem_tests::pg::store().await.with_gate_in_begin(true),
        SCOPE_OBSERVED_PG,
        observed_pg
    );
}

#[tokio::test]
async fn sqlite_observe_mode_counts_duplicates_and_runs_the_body() {
    observe_cases!(
        idem_tests::sqlite::store().await,
        SCOPE_OBSERVED_SQLITE,
        observed_sqlite
    );
}

// ---------------------------------------------------------------------------------------------
// The handler as a value: one consumer dispatching several handlers.

#[tokio::test]
async fn one_consumer_dispatches_several_handlers_by_route() {
    use idem_runtime::handler::{DynHandler, Handler as _};
    use std::collections::HashMap;

    let store = idem_tests::sqlite::store().await;
    let mut routes: HashMap<&str, Box<dyn DynHandler<idem_runtime::SqliteStore>>> = HashMap::new();
    routes.insert("payments", idem_runtime::handler!(on_sqlite).into_dyn());
    routes.insert(
        "observed",
        idem_runtime::handler!(observed_sqlite).into_dyn(),
    );

    let id = unique_key("routed");
    let payload = serde_json::to_vec(&Payment::new(&id, 7)).expect("payload");
    let first = routes["payments"]
        .handle_payload(&store, &payload, Box::new(NoAck))
        .await
        .expect("routed");
    assert!(first.is_processed());
    let again = routes["payments"]
        .handle_payload(&store, &payload, Box::new(NoAck))
        .await
        .expect("routed again");
    assert!(again.is_duplicate());
    assert_eq!(runs(&id), 1);

    // A payload that does not decode is dead-lettered, with the reason.
    let ack = idem_tests::RecordingAck::new();
    let undecodable = routes["payments"]
        .handle_payload(&store, b"{not json", Box::new(ack.clone()))
        .await;
    assert!(
        matches!(undecodable, Err(idem_runtime::Error::Decode { .. })),
        "{undecodable:?}"
    );
    assert!(
        ack.dead_lettered_with("does not decode"),
        "{:?}",
        ack.events()
    );

    // The typed value does what the function does.
    let typed = idem_runtime::handler!(on_sqlite);
    let id = unique_key("typed");
    assert!(
        typed
            .handle(&store, Payment::new(&id, 1), NoAck)
            .await
            .expect("typed")
            .is_processed()
    );
    assert_eq!(runs(&id), 1);
}

// ---------------------------------------------------------------------------------------------
// anyhow and eyre as handler errors: classified by the sqlx error in their chain.

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "adoption.anyhow"
)]
async fn with_anyhow(_tx: &mut MemoryTx, msg: Payment) -> anyhow::Result<i64> {
    use anyhow::Context as _;
    if msg.amount < 0 {
        // A missing column is permanent: the chain holds the sqlx error under the context.
        return Err(sqlx::Error::ColumnNotFound("amount".into())).context("reading the amount");
    }
    if msg.amount == 0 {
        anyhow::bail!("the ledger is busy");
    }
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "adoption.eyre"
)]
async fn with_eyre(_tx: &mut MemoryTx, msg: Payment) -> eyre::Result<i64> {
    use eyre::WrapErr as _;
    if msg.amount < 0 {
        return Err(sqlx::Error::ColumnNotFound("amount".into())).wrap_err("reading the amount");
    }
    Ok(msg.amount)
}

#[tokio::test]
async fn anyhow_and_eyre_errors_are_classified_by_their_chain() {
    use idem_runtime::Disposition;
    let store = MemoryStore::new();

    let ack = idem_tests::RecordingAck::new();
    let permanent = with_anyhow(&store, Payment::new(unique_key("anyhow"), -1), ack.clone()).await;
    let error = permanent.expect_err("a missing column");
    assert_eq!(error.disposition(), Disposition::DeadLetter);
    assert!(
        ack.dead_lettered_with("reading the amount"),
        "{:?}",
        ack.events()
    );

    let ack = idem_tests::RecordingAck::new();
    let retried = with_anyhow(&store, Payment::new(unique_key("anyhow"), 0), ack.clone()).await;
    assert_eq!(retried.expect_err("busy").disposition(), Disposition::Retry);
    assert!(ack.requeued_once(), "{:?}", ack.events());

    let processed = with_anyhow(&store, Payment::new(unique_key("anyhow"), 4), NoAck)
        .await
        .expect("processed");
    assert_eq!(processed.into_value(), Some(4));

    let ack = idem_tests::RecordingAck::new();
    let permanent = with_eyre(&store, Payment::new(unique_key("eyre"), -1), ack.clone()).await;
    assert_eq!(
        permanent.expect_err("a missing column").disposition(),
        Disposition::DeadLetter
    );
    assert!(
        ack.dead_lettered_with("reading the amount"),
        "{:?}",
        ack.events()
    );
}

// ---------------------------------------------------------------------------------------------
// The caller's transaction under stress: nested calls, and a transaction that had ended.

static NESTED_MYSQL: std::sync::OnceLock<idem_runtime::MySqlStore> = std::sync::OnceLock::new();

#[idempotent(
    key = "order_id",
    store = "mysql",
    strategy = "dedup_table",
    scope = "adoption.mysql.outer"
)]
async fn outer_mysql(tx: &mut MySqlTx<'static>, msg: Payment) -> Result<(), AppError> {
    let outer = format!("outer-{}", msg.order_id);
    tx.ledger(&outer, 1).await?;
    let store = NESTED_MYSQL.get().expect("the test sets the store");
    // Another handler, on the same transaction: its own savepoint inside ours.
    let inner = on_mysql_in_transaction(store, tx, msg.clone()).await;
    assert!(inner.expect("the inner handler").is_processed());
    idem_tests::maybe_fail(&outer)
}

/// A body that calls another handler's `_in_transaction` and then fails: everything of both
/// is rolled back, the caller's transaction stays usable, and the redelivery processes both.
#[tokio::test]
async fn mysql_nested_calls_roll_back_together() {
    let store = idem_tests::mysql::store().await;
    let _ = NESTED_MYSQL.set(store.clone());
    let id = unique_key("nested");
    let outer = format!("outer-{id}");
    idem_tests::fail_once(&outer);
    let mut tx = store.pool().begin().await.expect("begin");
    caller_write(&mut tx, &id).await;
    let failed = outer_mysql_in_transaction(&store, &mut tx, Payment::new(&id, 1)).await;
    assert!(
        matches!(failed, Err(idem_runtime::Error::Handler(_))),
        "{failed:?}"
    );
    tx.commit().await.expect("the caller commits its own write");
    assert_eq!(store.ledger_rows(&format!("caller-{id}")).await, 1);
    assert_eq!(
        store.ledger_rows(&outer).await,
        0,
        "the outer body's write rolled back"
    );
    assert_eq!(
        store.ledger_rows(&id).await,
        0,
        "the inner body's write rolled back"
    );
    assert_eq!(store.records("adoption.mysql.outer", &id).await, 0);
    assert_eq!(
        store.records(SCOPE_MYSQL, &id).await,
        0,
        "the inner record rolled back"
    );

    let mut tx = store.pool().begin().await.expect("begin");
    let outcome = outer_mysql_in_transaction(&store, &mut tx, Payment::new(&id, 1))
        .await
        .expect("the redelivery");
    assert!(outcome.is_processed());
    tx.commit().await.expect("commit");
    assert_eq!(store.ledger_rows(&outer).await, 1);
    assert_eq!(store.ledger_rows(&id).await, 1);
    assert_eq!(store.records(SCOPE_MYSQL, &id).await, 1);
}

/// A caller's transaction the database had already ended (here: rolled back behind sqlx's
/// back) leaves MySQL and SQLite in autocommit mode, where the gate's record would commit on
/// its own: the call refuses with `TransactionAborted`, and nothing is recorded.
macro_rules! ended_transaction_case {
    ($store:expr, $scope:expr, $in_transaction:ident) => {{
        let store = $store;
        let id = unique_key("ended");
        let mut tx = store.pool().begin().await.expect("begin");
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *tx)
            .await
            .expect("end the transaction behind the caller's back");
        let refused = $in_transaction(&store, &mut tx, Payment::new(&id, 1)).await;
        assert!(
            matches!(refused, Err(idem_runtime::Error::TransactionAborted { .. })),
            "{refused:?}"
        );
        let _ = tx.rollback().await;
        assert_eq!(
            store.records($scope, &id).await,
            0,
            "no record autocommitted"
        );
        assert_eq!(store.ledger_rows(&id).await, 0, "no effect autocommitted");
        assert_eq!(runs(&id), 0, "the body did not run");
    }};
}

#[tokio::test]
async fn mysql_refuses_a_callers_transaction_that_had_ended() {
    ended_transaction_case!(
        idem_tests::mysql::store().await,
        SCOPE_MYSQL,
        on_mysql_in_transaction
    );
}

#[tokio::test]
async fn sqlite_refuses_a_callers_transaction_that_had_ended() {
    ended_transaction_case!(
        idem_tests::sqlite::store().await,
        SCOPE_SQLITE,
        on_sqlite_in_transaction
    );
}

/// The memory store: a failed call releases its key, so the same task can deliver the message
/// again while it still holds its transaction; nested savepoints unwind in order.
#[tokio::test]
async fn memory_savepoints_release_keys_and_nest() {
    use idem_runtime::Store as _;
    let store = MemoryStore::new();
    let id = unique_key("memory-caller");
    idem_tests::fail_once(&id);
    let mut tx = store.begin().await.expect("begin");
    let failed = on_memory_failing_in_transaction(&store, &mut tx, Payment::new(&id, 1)).await;
    assert!(failed.is_err(), "{failed:?}");
    // Would wait forever on the key this transaction locked, were it kept.
    let outcome = on_memory_failing(&store, Payment::new(&id, 1), NoAck)
        .await
        .expect("a delivery while the caller still holds its transaction");
    assert!(outcome.is_processed());
    store.commit(tx).await.expect("commit");
    assert_eq!(store.ledger_rows(&id).await, 1);
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "adoption.memory.failing"
)]
async fn on_memory_failing(tx: &mut MemoryTx, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await?;
    idem_tests::maybe_fail(&msg.order_id)
}

/// A key listed twice in one import is one key, on every store (the second claim finds the
/// transaction's own record; the memory store does not wait on its own lock).
#[tokio::test]
async fn a_key_listed_twice_is_imported_once() {
    let id = unique_key("twice");
    let memory = MemoryStore::new();
    let keys = || [key(SCOPE_MEMORY, &id), key(SCOPE_MEMORY, &id)];
    assert_eq!(
        memory.mark_processed(keys(), None).await.expect("memory"),
        1
    );
    let sqlite = idem_tests::sqlite::store().await;
    let keys = || [key(SCOPE_SQLITE, &id), key(SCOPE_SQLITE, &id)];
    assert_eq!(
        sqlite.mark_processed(keys(), None).await.expect("sqlite"),
        1
    );
    let pg = idem_tests::pg::store().await;
    let keys = || [key(SCOPE_PG, &id), key(SCOPE_PG, &id)];
    assert_eq!(pg.mark_processed(keys(), None).await.expect("pg"), 1);
    let mysql = idem_tests::mysql::store().await;
    let keys = || [key(SCOPE_MYSQL, &id), key(SCOPE_MYSQL, &id)];
    assert_eq!(mysql.mark_processed(keys(), None).await.expect("mysql"), 1);
}

#[idempotent(
    key = "$message_id, order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "adoption.message_id"
)]
async fn on_memory_by_message_id(_tx: &mut MemoryTx, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    Ok(())
}

/// `key = "$message_id, order_id"`: the broker's id, from the acknowledger, is part of the key;
/// a delivery without one is dead-lettered with a typed reason, and its body never runs.
#[tokio::test]
async fn the_broker_message_id_is_part_of_the_key_and_its_absence_is_dead_lettered() {
    use idem_tests::RecordingAck;
    let store = MemoryStore::new();
    let order = unique_key("message-id");
    let payment = || Payment::new(&order, 5);

    let first = on_memory_by_message_id(&store, payment(), RecordingAck::with_message_id("m-1"));
    assert!(first.await.expect("first delivery").is_processed());
    let again = on_memory_by_message_id(&store, payment(), RecordingAck::with_message_id("m-1"));
    assert!(again.await.expect("same id").is_duplicate());
    // Another message id is another message, even for the same order.
    let other = on_memory_by_message_id(&store, payment(), RecordingAck::with_message_id("m-2"));
    assert!(other.await.expect("other id").is_processed());
    assert_eq!(runs(&order), 2);

    let without_id = RecordingAck::new();
    let missing = on_memory_by_message_id(&store, payment(), without_id.clone()).await;
    assert!(
        matches!(
            &missing,
            Err(idem_runtime::Error::Key(idem_runtime::KeyError::MissingMessageId { scope }))
                if scope == "adoption.message_id"
        ),
        "{missing:?}"
    );
    assert!(
        without_id.dead_lettered_with("has no message id"),
        "{:?}",
        without_id.events()
    );
    let direct = on_memory_by_message_id(&store, payment(), NoAck).await;
    assert!(matches!(
        direct,
        Err(idem_runtime::Error::Key(
            idem_runtime::KeyError::MissingMessageId { .. }
        ))
    ));
    assert_eq!(runs(&order), 2, "no body ran without a message id");
}

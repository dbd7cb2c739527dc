//! Adopting idem in a service that already handled messages before it (issue 11, in progress):
//! importing the keys it processed (`mark_processed`), and reprocessing one on purpose
//! (`forget`, by scope and key as logged), on PostgreSQL, MariaDB, SQLite and the memory store.

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
    tx.ledger(&msg.order_id, msg.amount).await
}

#[idempotent(
    key = "order_id",
    store = "mysql",
    strategy = "dedup_table",
    scope = "adoption.mysql"
)]
async fn on_mysql(tx: &mut MySqlTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "adoption.sqlite"
)]
async fn on_sqlite(tx: &mut SqliteTx<'_>, msg: Payment) -> Result<(), AppError> {
    idem_tests::count_run(&msg.order_id);
    tx.ledger(&msg.order_id, msg.amount).await
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

//! The conformance suite on SQLite files (`cargo test -p idem-tests --test store_sqlite`).

idem_tests::conformance_suite! {
    store = "sqlite",
    tx = idem_runtime::SqliteTx<'_>,
    open = idem_tests::sqlite::store().await,
    constraint = "idem_conf_payments.order_id",
    placeholders = ["?1", "?2", "?3"],
    skip = [],
}

/// Records persist in the file: a store reopened on the same file (a restarted consumer)
/// still recognises the duplicate.
#[tokio::test]
async fn records_survive_reopening_the_file() {
    use idem_runtime::{NoAck, SqliteStore};
    let path = idem_tests::sqlite::db_path("reopen");
    let key = idem_tests::unique_key("reopen");
    {
        let store = SqliteStore::open(&path).await.expect("open");
        store.migrate().await.expect("migrate");
        for ddl in idem_tests::conformance::BUSINESS_TABLES {
            sqlx::query(*ddl).execute(store.pool()).await.expect("ddl");
        }
        let first = handlers::dedup(&store, idem_tests::Payment::new(&key, 1), NoAck)
            .await
            .expect("first");
        assert!(first.is_processed());
        store.pool().close().await;
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    store.migrate().await.expect("migrate twice is harmless");
    let again = handlers::dedup(&store, idem_tests::Payment::new(&key, 1), NoAck)
        .await
        .expect("after restart");
    assert!(again.is_duplicate(), "{again:?}");
}

/// A committed, acked message must survive a power loss: `synchronous = FULL` unless the user
/// opts into `NORMAL`.
#[tokio::test]
async fn durable_after_the_ack_by_default() {
    use idem_runtime::{SqliteStore, Synchronous};
    let full = SqliteStore::open(idem_tests::sqlite::db_path("durable"))
        .await
        .expect("open");
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(full.pool())
        .await
        .expect("pragma");
    assert_eq!(level, 2, "FULL");
    let normal = SqliteStore::open_with(idem_tests::sqlite::db_path("normal"), Synchronous::Normal)
        .await
        .expect("open");
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(normal.pool())
        .await
        .expect("pragma");
    assert_eq!(level, 1, "NORMAL, when asked for");
}

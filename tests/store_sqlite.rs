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

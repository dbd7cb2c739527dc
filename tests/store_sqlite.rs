//! The conformance suite on SQLite files (`cargo test -p idem-tests --test store_sqlite`).

idem_tests::conformance_suite! {
    store = "sqlite",
    tx = idem_runtime::SqliteTx<'_>,
    open = idem_tests::sqlite::store().await,
    constraint = "idem_conf_payments.order_id",
    placeholders = ["?1", "?2", "?3"],
    skip = [],
}

/// The shipped migration directory, run by another tool (sqlx's migrator, as `sqlx migrate
/// run` would) on an empty database, makes a table the store uses as it is, without
/// `migrate()`; and so does the text made for another table, applied with `raw_sql`.
#[tokio::test]
async fn the_shipped_migration_makes_a_table_the_store_accepts() {
    use idem_runtime::store::{RecordsTable, migrations};
    let store = idem_tests::sqlite::fresh_database().await;
    idem_tests::run_shipped_migrations("sqlite", store.pool()).await;
    idem_tests::exercise_records_table!(store.clone());

    let custom = RecordsTable::parse("main.Shipped").expect("a valid table name");
    sqlx::raw_sql(sqlx::AssertSqlSafe(migrations::sqlite(&custom)))
        .execute(store.pool())
        .await
        .expect("apply the text made for another table");
    idem_tests::exercise_records_table!(store.clone().with_records_table(custom));
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

/// A `StateKeyPart` that panics while the gate is built: caught, settled, nothing moved.
#[tokio::test]
async fn a_panicking_state_key_is_settled() {
    use idem_runtime::transition::{StateKey, StateKeyPart};
    use idem_runtime::{Error, SqliteTx, idempotent};

    struct PanickyId;

    impl StateKeyPart for PanickyId {
        fn state_key(&self) -> StateKey {
            panic!("state key exploded")
        }
    }

    impl idem_runtime::KeyPart for PanickyId {
        fn write_key_part(&self, out: &mut String) {
            out.push_str("panicky");
        }
    }

    struct Step {
        id: PanickyId,
    }

    #[idempotent(
        key = "id",
        store = "sqlite",
        strategy = "state_machine",
        scope = "sqlite.panicky_key",
        table = "idem_conf_orders",
        column = "status",
        key_column = "order_id",
        from = "pending",
        to = "paid"
    )]
    async fn on_step(_tx: &mut SqliteTx<'_>, _msg: Step) -> Result<(), idem_tests::AppError> {
        Ok(())
    }

    let store = idem_tests::sqlite::store().await;
    let ack = idem_tests::RecordingAck::new();
    let result = on_step(&store, Step { id: PanickyId }, ack.clone()).await;
    assert!(
        matches!(&result, Err(Error::Panicked { message, .. }) if message.contains("state key exploded")),
        "{result:?}"
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());
}

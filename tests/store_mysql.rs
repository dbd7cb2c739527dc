//! The conformance suite on MariaDB / MySQL (`cargo test -p idem-tests --test store_mysql`),
//! against the live server at `IDEM_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`).

idem_tests::conformance_suite! {
    store = "mysql",
    tx = idem_runtime::MySqlTx<'_>,
    open = idem_tests::mysql::store().await,
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["?", "?", "?"],
    skip = [],
}

/// The shipped migration directory for this server, run by another tool (sqlx's migrator, as
/// `sqlx migrate run` would) on an empty database, makes a table the store uses as it is,
/// without `migrate()`; and so does the text made for another table, applied with `raw_sql`.
#[tokio::test]
async fn the_shipped_migration_makes_a_table_the_store_accepts() {
    use idem_runtime::store::{RecordsTable, migrations};
    let (store, database) = idem_tests::mysql::fresh_database().await;
    let mariadb = idem_tests::mysql::is_mariadb(&store).await;
    let directory = if mariadb { "mariadb" } else { "mysql" };
    idem_tests::run_shipped_migrations(directory, store.pool()).await;
    idem_tests::exercise_records_table!(store.clone());

    let custom = RecordsTable::new("Shipped")
        .and_then(|table| table.in_schema(&database))
        .expect("a valid table name");
    let sql = if mariadb {
        migrations::mariadb(&custom)
    } else {
        migrations::mysql(&custom)
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("apply the text made for another table");
    idem_tests::exercise_records_table!(store.clone().with_records_table(custom));
    idem_tests::mysql::drop_database(&database).await;
}

/// Deadlocks and lock wait time-outs are retryable; duplicate entries on other keys are not.
#[tokio::test]
async fn mysql_errors_are_classified() {
    use idem_runtime::{Disposition, HandlerError};
    let store = idem_tests::mysql::store().await;
    let deadlock = sqlx::query(
        "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'Deadlock found'",
    )
    .execute(store.pool())
    .await
    .unwrap_err();
    assert_eq!(
        idem_tests::AppError::Db(deadlock).disposition(),
        Disposition::Retry
    );
    let timeout = sqlx::query("SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1205, MESSAGE_TEXT = 'Lock wait timeout exceeded'")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert_eq!(
        idem_tests::AppError::Db(timeout).disposition(),
        Disposition::Retry
    );
    let not_null = sqlx::query("INSERT INTO idem_conf_ledger (order_id, amount) VALUES (NULL, 1)")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert_eq!(
        idem_tests::AppError::Db(not_null).disposition(),
        Disposition::DeadLetter
    );
}

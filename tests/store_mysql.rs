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

//! The conformance suite on PostgreSQL (`cargo test -p idem-tests --test store_pg`), against the
//! live server at `IDEM_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

idem_tests::conformance_suite! {
    store = "pg",
    tx = idem_runtime::PgTx<'_>,
    open = idem_tests::pg::store().await,
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["$1", "$2", "$3"],
}

/// A serialization failure and a lost connection are retryable; classification reads the
/// driver's error through `#[error(transparent)]` wrappers.
#[tokio::test]
async fn database_errors_are_classified_through_transparent_wrappers() {
    use idem_runtime::{Disposition, HandlerError};
    let store = idem_tests::pg::store().await;
    let error = sqlx::query("SELECT 1/0")
        .execute(store.pool())
        .await
        .unwrap_err();
    // division_by_zero (22012) is not a known transient state: retried, not dropped.
    assert_eq!(
        idem_tests::AppError::Db(error).disposition(),
        Disposition::Retry
    );
    let violation = sqlx::query("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert_eq!(
        idem_tests::AppError::Db(violation).disposition(),
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

//! The conformance suite on PostgreSQL (`cargo test -p idem-tests --test store_pg`), against the
//! live server at `IDEM_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

idem_tests::conformance_suite! {
    store = "pg",
    tx = idem_runtime::PgTx<'_>,
    open = idem_tests::pg::store().await,
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["$1", "$2", "$3"],
    skip = [],
}

/// Classification by SQLSTATE class, through `#[error(transparent)]` wrappers: errors that
/// no redelivery can fix are dead-lettered (each of these was retried forever before), the
/// transient ones retried.
#[tokio::test]
async fn database_errors_are_classified_by_their_class() {
    use idem_runtime::{Disposition, HandlerError};
    let store = idem_tests::pg::store().await;
    let cases = [
        (
            "SELECT convert_from('\\x00'::bytea, 'UTF8')",
            "22021",
            Disposition::DeadLetter,
        ),
        (
            "INSERT INTO idem_conf_orders (order_id, status) VALUES ('x', repeat('s', 100))",
            "22001",
            Disposition::DeadLetter,
        ),
        ("SELECT 'abc'::int", "22P02", Disposition::DeadLetter),
        ("SELECT 1/0", "22012", Disposition::DeadLetter),
        (
            "SELECT nope FROM idem_conf_orders",
            "42703",
            Disposition::DeadLetter,
        ),
        (
            "SELECT gen_random_uuid() = 'text'::text",
            "42883",
            Disposition::DeadLetter,
        ),
        (
            "INSERT INTO idem_conf_ledger (order_id, amount) VALUES (NULL, 1)",
            "23502",
            Disposition::DeadLetter,
        ),
        (
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$",
            "40001",
            Disposition::Retry,
        ),
        (
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01'; END $$",
            "40P01",
            Disposition::Retry,
        ),
        (
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '55P03'; END $$",
            "55P03",
            Disposition::Retry,
        ),
        (
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '57014'; END $$",
            "57014",
            Disposition::Retry,
        ),
        (
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '23503'; END $$",
            "23503",
            Disposition::Retry,
        ),
    ];
    for (sql, code, expected) in cases {
        let error = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap_err();
        let got = error
            .as_database_error()
            .and_then(|db| db.code())
            .map(|c| c.into_owned());
        assert_eq!(got.as_deref(), Some(code), "{sql}");
        assert_eq!(
            idem_tests::AppError::Db(error).disposition(),
            expected,
            "{code}: {sql}"
        );
    }
}

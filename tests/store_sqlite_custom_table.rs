//! The conformance suite on SQLite, with the records in a table of another name and schema
//! (`idem_tests::sqlite::custom_table()`: a reserved word in mixed case, so that a statement
//! that does not quote and qualify it fails): `cargo test -p idem-tests --test
//! store_sqlite_custom_table`. A test target of its own, because the suite's handlers' scopes
//! may appear once per binary.

idem_tests::conformance_suite! {
    store = "sqlite",
    tx = idem_runtime::SqliteTx<'_>,
    open = idem_tests::sqlite::store_on(idem_tests::sqlite::custom_table()).await,
    constraint = "idem_conf_payments.order_id",
    placeholders = ["?1", "?2", "?3"],
    skip = [],
}

//! The conformance suite on PostgreSQL, with the records in a table of another name and schema
//! (`idem_tests::pg::custom_table()`: a reserved word in mixed case, so that a statement
//! that does not quote and qualify it fails): `cargo test -p idem-tests --test
//! store_pg_custom_table`. A test target of its own, because the suite's handlers' scopes
//! may appear once per binary.

idem_tests::conformance_suite! {
    store = "pg",
    tx = idem_runtime::PgTx<'_>,
    open = idem_tests::pg::store_on(idem_tests::pg::custom_table()).await,
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["$1", "$2", "$3"],
    skip = [],
}

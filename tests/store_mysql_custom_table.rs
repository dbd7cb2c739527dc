//! The conformance suite on MariaDB/MySQL, with the records in a table of another name and schema
//! (`idem_tests::mysql::custom_table()`: a reserved word in mixed case, so that a statement
//! that does not quote and qualify it fails): `cargo test -p idem-tests --test
//! store_mysql_custom_table`. A test target of its own, because the suite's handlers' scopes
//! may appear once per binary.

idem_tests::conformance_suite! {
    store = "mysql",
    tx = idem_runtime::MySqlTx<'_>,
    open = idem_tests::mysql::store_on(idem_tests::mysql::custom_table()).await,
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["?", "?", "?"],
    skip = [],
}

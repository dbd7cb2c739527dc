//! The conformance suite on PostgreSQL with the gate sent in the `BEGIN`'s round trip
//! (`PgStore::with_gate_in_begin(true)`): every case the default path passes (first delivery,
//! duplicates in sequence and racing, failures, crashes, bad input, expiry, replay,
//! fingerprints), through the one-round-trip claim and guarded update, on the records table of
//! another name and schema (so the statement built for it is exercised too): `cargo test -p
//! idem-tests --test store_pg_gate_in_begin`.

idem_tests::conformance_suite! {
    store = "pg",
    tx = idem_runtime::PgTx<'_>,
    open = idem_tests::pg::store_on(idem_tests::pg::custom_table())
        .await
        .with_gate_in_begin(true),
    constraint = "idem_conf_payments_order_id_key",
    placeholders = ["$1", "$2", "$3"],
    skip = [],
}

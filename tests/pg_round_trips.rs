//! Round trips on PostgreSQL, counted on the wire: each handler and the hand-written code it
//! replaces run through a proxy that counts the times the client waited for the server
//! ([`idem_tests::pg::RoundTrips`]), on the same one-connection pool. The gate travels with the
//! `BEGIN`, so a first delivery under `dedup_table` costs what `BEGIN; INSERT; COMMIT` costs, a
//! `state_machine` step one round trip less than `BEGIN; UPDATE; COMMIT`, and a duplicate one
//! statement. BENCHMARKS.md lists what each round trip carries.

use idem_runtime::{Outcome, PgStore, PgTx, idempotent, sqlx};
use idem_tests::pg::RoundTrips;
use idem_tests::{AppError, Payment, count_run, runs, unique_key};

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.rt.ledger"
)]
async fn ledger(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    insert_ledger_row(tx, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.rt.ledger_fingerprinted",
    fingerprint
)]
async fn fingerprinted(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    insert_ledger_row(tx, &msg).await
}

/// The body of the `dedup_table` handlers: one business insert.
async fn insert_ledger_row(tx: &mut PgTx<'_>, msg: &Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    sqlx::query("INSERT INTO idem_rt_ledger (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "unique_constraint",
    scope = "tests.rt.payments",
    constraint = "idem_rt_payments_order_id_key"
)]
async fn payment(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    sqlx::query("INSERT INTO idem_rt_payments (order_id, amount) VALUES ($1, $2)")
        .bind(&msg.order_id)
        .bind(msg.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "state_machine",
    scope = "tests.rt.pay",
    table = "idem_rt_orders",
    column = "status",
    from = "pending",
    to = "paid"
)]
async fn pay(_tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    count_run(&msg.order_id);
    Ok(())
}

async fn setup() -> (RoundTrips, sqlx::PgPool, PgStore) {
    // Tables and the records table through a direct connection, before anything is counted.
    let direct = idem_tests::pg::store().await;
    let mut tx = direct.pool().begin().await.expect("begin");
    // Tests run in parallel; DDL races on the catalog without a lock.
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735002)")
        .execute(&mut *tx)
        .await
        .expect("lock the catalog");
    for ddl in [
        "CREATE TABLE IF NOT EXISTS idem_rt_ledger (order_id TEXT NOT NULL, amount BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS idem_rt_payments (order_id TEXT NOT NULL, amount BIGINT NOT NULL, CONSTRAINT idem_rt_payments_order_id_key UNIQUE (order_id))",
        "CREATE TABLE IF NOT EXISTS idem_rt_orders (order_id TEXT PRIMARY KEY, status TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS idem_rt_inbox (message_id TEXT PRIMARY KEY)",
    ] {
        sqlx::query(ddl)
            .execute(&mut *tx)
            .await
            .expect("create a table");
    }
    tx.commit().await.expect("commit");
    let proxy = RoundTrips::start().await;
    let pool = proxy.pool().await;
    (proxy, pool.clone(), PgStore::new(pool))
}

/// The hand-written transaction the handlers are measured against: `BEGIN`, one statement,
/// `COMMIT`; returns the rows it affected.
async fn by_hand(pool: &sqlx::PgPool, sql: &'static str, key: &str) -> u64 {
    let mut tx = pool.begin().await.expect("begin");
    let done = sqlx::query(sql)
        .bind(key)
        .execute(&mut *tx)
        .await
        .expect("the statement");
    tx.commit().await.expect("commit");
    done.rows_affected()
}

async fn pending_order(store: &PgStore, key: &str) {
    sqlx::query("INSERT INTO idem_rt_orders (order_id, status) VALUES ($1, 'pending')")
        .bind(key)
        .execute(store.pool())
        .await
        .expect("insert a pending order");
}

const LEDGER: &str = "INSERT INTO idem_rt_ledger (order_id, amount) VALUES ($1, 100)";
const INBOX: &str = "INSERT INTO idem_rt_inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING";
const GUARDED: &str =
    "UPDATE idem_rt_orders SET status = 'paid' WHERE order_id = $1 AND status IN ('pending')";

/// What one store's handlers took, and the hand-written code beside them, on one counted
/// connection.
#[derive(Debug)]
struct Counts {
    hand_insert: u64,
    hand_check: u64,
    hand_update: u64,
    first: u64,
    duplicate: u64,
    fingerprinted_duplicate: u64,
    unique_first: u64,
    step: u64,
    step_duplicate: u64,
}

fn ack() -> idem_tests::RecordingAck {
    idem_tests::RecordingAck::new()
}

/// Runs every handler on `store` (whose pool is `pool`, through `proxy`) and the hand-written
/// code, each measurement from warm prepared statements (a statement's first use takes a round
/// trip more, to prepare it), and checks each outcome.
async fn count(proxy: &RoundTrips, pool: &sqlx::PgPool, store: &PgStore) -> Counts {
    let warm = unique_key("rt-warm");
    for _ in 0..2 {
        ledger(store, Payment::new(&warm, 100), ack())
            .await
            .expect("warm");
        fingerprinted(store, Payment::new(&warm, 100), ack())
            .await
            .expect("warm");
    }
    payment(store, Payment::new(&warm, 100), ack())
        .await
        .expect("warm");
    pending_order(store, &warm).await;
    for _ in 0..2 {
        pay(store, Payment::new(&warm, 100), ack())
            .await
            .expect("warm");
    }
    by_hand(pool, LEDGER, &warm).await;
    by_hand(pool, INBOX, &warm).await;
    by_hand(pool, GUARDED, &warm).await;

    let key = unique_key("rt-ledger");
    let (_, hand_insert) = proxy
        .of(pool, by_hand(pool, LEDGER, &format!("{key}-hand")))
        .await;
    let (outcome, first) = proxy
        .of(pool, ledger(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(matches!(outcome, Ok(Outcome::Processed(()))), "{outcome:?}");
    by_hand(pool, INBOX, &key).await;
    let (claimed, hand_check) = proxy.of(pool, by_hand(pool, INBOX, &key)).await;
    assert_eq!(claimed, 0, "the hand-written check sees a duplicate");
    let (outcome, duplicate) = proxy
        .of(pool, ledger(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(
        matches!(outcome, Ok(Outcome::Duplicate { .. })),
        "{outcome:?}"
    );
    assert_eq!(runs(&key), 1, "the body ran once");

    let key = unique_key("rt-fingerprinted");
    fingerprinted(store, Payment::new(&key, 100), ack())
        .await
        .expect("first delivery");
    let (outcome, fingerprinted_duplicate) = proxy
        .of(pool, fingerprinted(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(
        matches!(outcome, Ok(Outcome::Duplicate { .. })),
        "{outcome:?}"
    );
    assert_eq!(runs(&key), 1);

    let key = unique_key("rt-payment");
    let (outcome, unique_first) = proxy
        .of(pool, payment(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(matches!(outcome, Ok(Outcome::Processed(()))), "{outcome:?}");

    let key = unique_key("rt-order");
    pending_order(store, &key).await;
    pending_order(store, &format!("{key}-hand")).await;
    let (moved, hand_update) = proxy
        .of(pool, by_hand(pool, GUARDED, &format!("{key}-hand")))
        .await;
    assert_eq!(moved, 1);
    let (outcome, step) = proxy
        .of(pool, pay(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(matches!(outcome, Ok(Outcome::Processed(()))), "{outcome:?}");
    let (outcome, step_duplicate) = proxy
        .of(pool, pay(store, Payment::new(&key, 100), ack()))
        .await;
    assert!(
        matches!(outcome, Ok(Outcome::Duplicate { .. })),
        "{outcome:?}"
    );
    assert_eq!(runs(&key), 1);

    Counts {
        hand_insert,
        hand_check,
        hand_update,
        first,
        duplicate,
        fingerprinted_duplicate,
        unique_first,
        step,
        step_duplicate,
    }
}

/// The default path binds every value: `BEGIN`, then the gate, each a round trip; a duplicate
/// is recognised by the gate's one statement, which also returns its record.
#[tokio::test]
async fn by_default_the_gate_takes_one_round_trip_after_the_begin() {
    let (proxy, pool, store) = setup().await;
    let counts = count(&proxy, &pool, &store).await;
    // BEGIN, the statement, COMMIT, and the ping with which the pool takes the connection back.
    assert_eq!(counts.hand_insert, 4, "{counts:?}");
    assert_eq!(counts.hand_check, 4, "{counts:?}");
    assert_eq!(counts.hand_update, 4, "{counts:?}");
    // BEGIN, the claim, the body's insert, the checked commit, the ping (with the ROLLBACK of
    // the empty transaction the commit leaves).
    assert_eq!(counts.first, counts.hand_insert + 1, "{counts:?}");
    // BEGIN, the claim, the ping with the ROLLBACK: the claim statement alone recognises it,
    // and returns the record for the fingerprint check in the same statement.
    assert_eq!(counts.duplicate, 3, "{counts:?}");
    assert_eq!(counts.fingerprinted_duplicate, 3, "{counts:?}");
    assert_eq!(counts.unique_first, counts.hand_insert, "{counts:?}");
    assert_eq!(counts.step, counts.hand_update, "{counts:?}");
    // BEGIN, the guarded update, the read that classifies it, the ping with the ROLLBACK.
    assert_eq!(counts.step_duplicate, 4, "{counts:?}");
    assert!(
        proxy
            .simple_queries()
            .iter()
            .all(|query| !query.contains("INSERT INTO idem_records")),
        "by default no gate travels as a simple query"
    );
}

/// `with_gate_in_begin(true)`: the gate rides on the `BEGIN`'s round trip.
#[tokio::test]
async fn with_the_gate_in_begin_a_first_delivery_costs_what_the_hand_written_transaction_costs() {
    let (proxy, pool, store) = setup().await;
    let store = store.with_gate_in_begin(true);
    let counts = count(&proxy, &pool, &store).await;
    assert_eq!(
        counts.first, counts.hand_insert,
        "a first delivery under dedup_table takes the round trips of BEGIN; INSERT; COMMIT: {counts:?}"
    );
    // The gate's statement, and the ping that returns the connection it failed on.
    assert_eq!(counts.duplicate, 2, "{counts:?}");
    // … then the read of the record for the fingerprint check, on a connection of its own.
    assert_eq!(counts.fingerprinted_duplicate, 4, "{counts:?}");
    assert_eq!(counts.unique_first, counts.hand_insert, "{counts:?}");
    assert_eq!(
        counts.step,
        counts.hand_update - 1,
        "a state_machine step takes one round trip fewer than BEGIN; UPDATE; COMMIT: {counts:?}"
    );
    assert_eq!(counts.step_duplicate, 4, "{counts:?}");

    // What travelled: the gate in the BEGIN's query string, the key only as escapes.
    let queries = proxy.simple_queries();
    let opening = queries
        .iter()
        .find(|query| query.contains("INSERT INTO idem_records") && query.ends_with("; BEGIN"))
        .expect("the claim travelled with the BEGIN");
    assert!(opening.contains("E'\\u"), "{opening}");
    assert!(
        queries.iter().all(|query| !query.contains("rt-ledger")),
        "no key travels as raw text: {queries:#?}"
    );
    assert!(
        queries
            .iter()
            .any(|query| query.contains("UPDATE \"idem_rt_orders\"") && query.ends_with("; BEGIN")),
        "the guarded update travelled with the BEGIN: {queries:#?}"
    );
}

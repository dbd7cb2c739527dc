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

/// The shipped migration directory, run by another tool (sqlx's migrator, as `sqlx migrate
/// run` would) on an empty schema, makes a table the store uses as it is, without `migrate()`;
/// and so does the text made for another table, applied with `raw_sql`.
#[tokio::test]
async fn the_shipped_migration_makes_a_table_the_store_accepts() {
    use idem_runtime::store::{RecordsTable, migrations};
    let (store, schema) = idem_tests::pg::fresh_schema().await;
    idem_tests::run_shipped_migrations("postgres", store.pool()).await;
    idem_tests::exercise_records_table!(store.clone());

    let custom = RecordsTable::new("Shipped")
        .and_then(|table| table.in_schema(&schema))
        .expect("a valid table name");
    let sql = migrations::postgres(&custom);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("apply the text made for another table");
    idem_tests::exercise_records_table!(store.clone().with_records_table(custom));
    idem_tests::pg::drop_schema(&schema).await;
}

/// The hash-partitioned records table the README offers for large volumes
/// (`idem-runtime/sql/postgres_hash_partitioned.sql`) is one the store uses as it is: claims,
/// duplicates, take-overs, replay, purge and forget; `migrate()` leaves it alone; a bounded
/// purge and a purge by age go through every partition; and a time-partitioned table, whose
/// primary key would have to include the time, is refused by the gate instead of letting
/// redeliveries through.
#[tokio::test]
async fn a_hash_partitioned_records_table_works_as_it_is() {
    use idem_runtime::clock::ManualClock;
    use idem_runtime::retention::{PurgeOptions, purge};
    use idem_runtime::{Key, Store as _};
    let (store, schema) = idem_tests::pg::fresh_schema().await;
    sqlx::raw_sql(include_str!(
        "../idem-runtime/sql/postgres_hash_partitioned.sql"
    ))
    .execute(store.pool())
    .await
    .expect("create the partitioned table");
    store
        .migrate()
        .await
        .expect("migrate finds the table and changes nothing");
    idem_tests::exercise_records_table!(store.clone());

    let clock = ManualClock::starting_now();
    let timed = store.clone().with_clock(clock.clone());
    let keys = |scope: &'static str, n: u32| {
        (0..n)
            .map(|i| Key::new(scope, &[("order_id", &format!("k{i}"))]).expect("key"))
            .collect::<Vec<_>>()
    };
    timed
        .mark_processed(
            keys("part.expiring", 40),
            Some(std::time::Duration::from_secs(60)),
        )
        .await
        .expect("mark");
    timed
        .mark_processed(keys("part.kept", 30), None)
        .await
        .expect("mark");
    let partitions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT tableoid) FROM idem_records WHERE scope LIKE 'part.%'",
    )
    .fetch_one(store.pool())
    .await
    .expect("count partitions");
    assert!(
        partitions > 1,
        "the records spread over partitions: {partitions}"
    );
    clock.advance(std::time::Duration::from_secs(7200));
    let expired = purge(&timed, &PurgeOptions::new().batch_size(7), |_| {})
        .await
        .expect("purge");
    assert_eq!(expired.deleted, 40);
    let aged = purge(
        &timed,
        &PurgeOptions::new()
            .in_scope("part.kept")
            .older_than(std::time::Duration::from_secs(3600))
            .batch_size(7),
        |_| {},
    )
    .await
    .expect("purge by age");
    assert_eq!(aged.deleted, 30);

    // By time instead: the primary key must take the time in, and the gate's
    // `ON CONFLICT (scope, record_key)` then has no unique index to arbitrate on.
    sqlx::raw_sql(
        "CREATE TABLE by_time (scope TEXT NOT NULL, record_key TEXT NOT NULL, fingerprint TEXT, \
         response TEXT, created_at_ms BIGINT NOT NULL, expires_at_ms BIGINT, \
         PRIMARY KEY (scope, record_key, created_at_ms)) PARTITION BY RANGE (created_at_ms); \
         CREATE TABLE by_time_all PARTITION OF by_time FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
    )
    .execute(store.pool())
    .await
    .expect("create a table partitioned by time");
    let by_time = store
        .clone()
        .with_records_table(idem_runtime::store::RecordsTable::new("by_time").expect("name"));
    let refused = by_time.mark_processed(keys("part.time", 1), None).await;
    let error = refused.expect_err("the gate needs a unique (scope, record_key)");
    assert!(
        error.to_string().contains("ON CONFLICT"),
        "refused for want of an arbiter index: {error}"
    );
    idem_tests::pg::drop_schema(&schema).await;
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

/// `state_machine` on a table whose key column is a PostgreSQL `uuid`, keyed on a `Uuid` field:
/// bound as a `uuid`, not as text (which PostgreSQL would refuse with 42883).
#[tokio::test]
async fn state_machine_on_a_uuid_key_column() {
    use idem_runtime::{NoAck, PgTx, idempotent};

    #[derive(Debug, Clone)]
    struct Shipped {
        shipment_id: uuid::Uuid,
    }

    #[idempotent(
        key = "shipment_id",
        store = "pg",
        strategy = "state_machine",
        scope = "pg.uuid.ship",
        table = "idem_conf_shipments",
        column = "status",
        from = "packed",
        to = "shipped"
    )]
    async fn on_shipped(
        _tx: &mut PgTx<'_>,
        msg: Shipped,
    ) -> Result<uuid::Uuid, idem_tests::AppError> {
        Ok(msg.shipment_id)
    }

    let store = idem_tests::pg::store().await;
    sqlx::query("CREATE TABLE IF NOT EXISTS idem_conf_shipments (id UUID PRIMARY KEY, shipment_id UUID UNIQUE NOT NULL, status TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("table");
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO idem_conf_shipments (id, shipment_id, status) VALUES ($1, $1, 'packed')",
    )
    .bind(id)
    .execute(store.pool())
    .await
    .expect("row");
    let message = Shipped { shipment_id: id };
    let first = on_shipped(&store, message.clone(), NoAck)
        .await
        .expect("first");
    assert!(first.is_processed(), "{first:?}");
    let again = on_shipped(&store, message, NoAck).await.expect("again");
    assert!(again.is_duplicate(), "{again:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM idem_conf_shipments WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("status");
    assert_eq!(status, "shipped");
}

/// `unique_constraint` on a `DEFERRABLE INITIALLY DEFERRED` constraint: the duplicate's insert
/// succeeds and the violation is raised by `COMMIT`. It is still a duplicate: acked, and
/// nothing of its transaction committed.
#[tokio::test]
async fn unique_violation_raised_at_commit_is_a_duplicate() {
    use idem_runtime::{NoAck, Outcome, PgTx, idempotent};
    use idem_tests::effects::{Effects as _, TestStore as _};
    use idem_tests::{AckEvent, AppError, Payment, RecordingAck, unique_key};

    #[idempotent(
        key = "order_id",
        store = "pg",
        strategy = "unique_constraint",
        scope = "pg.deferred",
        constraint = "idem_conf_deferred_order_id_key"
    )]
    async fn on_payment(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
        sqlx::query("INSERT INTO idem_conf_deferred (order_id) VALUES ($1)")
            .bind(&msg.order_id)
            .execute(&mut **tx)
            .await?;
        tx.ledger(&msg.order_id, msg.amount).await
    }

    let store = idem_tests::pg::store().await;
    sqlx::raw_sql(
        "DO $$ BEGIN
            CREATE TABLE IF NOT EXISTS idem_conf_deferred (order_id TEXT NOT NULL,
                CONSTRAINT idem_conf_deferred_order_id_key UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED);
        EXCEPTION WHEN duplicate_table OR unique_violation THEN NULL; END $$",
    )
    .execute(store.pool())
    .await
    .expect("table");
    let key = unique_key("deferred");
    assert!(
        on_payment(&store, Payment::new(&key, 1), NoAck)
            .await
            .expect("first")
            .is_processed()
    );
    let ack = RecordingAck::new();
    let again = on_payment(&store, Payment::new(&key, 1), ack.clone())
        .await
        .expect("again");
    assert_eq!(again, Outcome::Duplicate { replayed: None });
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(
        store.ledger_rows(&key).await,
        1,
        "the duplicate's ledger row rolled back"
    );
}

const TWIN_SCOPE: &str = "tests.pg.twin_snapshot";

#[idem_runtime::idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.pg.twin_snapshot",
    fingerprint
)]
async fn twin_checked(
    _tx: &mut idem_runtime::PgTx<'_>,
    msg: idem_tests::Payment,
) -> Result<(), idem_tests::AppError> {
    idem_tests::count_run(&msg.order_id);
    Ok(())
}

/// The twin race of the gate's one statement: a redelivery whose claim waits on a twin's
/// uncommitted record, and reads it after the twin commits. The claim statement's snapshot was
/// taken before that commit, so the record it returns in the same statement is not there: a
/// second statement must read it (here, for the fingerprint check, whose verdict proves it was
/// read: a payload that differs from the twin's is dead-lettered, not acked unverified). On the
/// default path and with the gate in the `BEGIN`.
#[tokio::test]
async fn a_twin_committing_after_the_claims_snapshot_is_read_by_a_second_statement() {
    use idem_runtime::{Error, Store as _};
    let base = idem_tests::pg::store().await;
    for store in [base.clone(), base.clone().with_gate_in_begin(true)] {
        let key = idem_tests::unique_key("twin-snapshot");
        let first = idem_tests::Payment::new(&key, 100);
        let fingerprint = idem_runtime::fingerprint(&first).expect("fingerprint");
        let (twin, twin_xid) =
            idem_tests::pg::hold_key(&store, TWIN_SCOPE, &key, Some(&fingerprint)).await;
        let redelivery = tokio::spawn({
            let store = store.clone();
            let other = idem_tests::Payment::new(&key, 999);
            async move { twin_checked(&store, other, idem_tests::RecordingAck::new()).await }
        });
        idem_tests::pg::wait_for_a_waiter_on(&base, &twin_xid).await;
        store.commit(twin).await.expect("the twin commits");

        let outcome = idem_tests::within("the redelivery", redelivery)
            .await
            .expect("the redelivery's task");
        assert!(
            matches!(outcome, Err(Error::PayloadMismatch { .. })),
            "the twin's record was read and its fingerprint compared (gate in begin: {}): {outcome:?}",
            store.gate_in_begin()
        );
        assert_eq!(idem_tests::runs(&key), 0, "the body never ran");
    }
}

/// A delivery dropped while its gate travels with the `BEGIN` (a timeout, a shutdown that
/// aborts the worker) leaves nothing behind: the begin runs to completion on a task of its own,
/// and a claim it made is rolled back with it. Without that, the connection would go back to
/// the pool inside a transaction sqlx does not know about, the claim in it, and the next
/// delivery of the message would wait on it, or (on that very connection) find it and call
/// itself a duplicate. A pool of one connection, so that the next delivery gets that one.
#[tokio::test]
async fn a_delivery_dropped_while_its_gate_travels_with_the_begin_leaves_no_claim() {
    use idem_runtime::Store as _;
    let options: sqlx::postgres::PgConnectOptions = idem_tests::pg::url()
        .parse()
        .expect("a valid IDEM_TEST_PG_URL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connect");
    let store = idem_runtime::PgStore::new(pool).with_gate_in_begin(true);
    let holder = idem_tests::pg::store().await;
    let key = idem_tests::unique_key("dropped-gate");
    // A twin holds the key, so that the delivery's gate waits, sent but unanswered.
    let (twin, twin_xid) = idem_tests::pg::hold_key(&holder, DROPPED_SCOPE, &key, None).await;
    let delivery = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move {
            dropped_gate(
                &store,
                idem_tests::Payment::new(&key, 100),
                idem_tests::RecordingAck::new(),
            )
            .await
        }
    });
    idem_tests::pg::wait_for_a_waiter_on(&holder, &twin_xid).await;
    delivery.abort();
    assert!(delivery.await.is_err_and(|ended| ended.is_cancelled()));
    // The twin gives up: the dropped delivery's gate, still running, claims the key.
    idem_runtime::PgStore::rollback(twin)
        .await
        .expect("the twin rolls back");

    let outcome = idem_tests::within(
        "the redelivery",
        dropped_gate(
            &store,
            idem_tests::Payment::new(&key, 100),
            idem_tests::RecordingAck::new(),
        ),
    )
    .await;
    assert!(
        matches!(outcome, Ok(idem_runtime::Outcome::Processed(()))),
        "the dropped delivery's claim did not survive it: {outcome:?}"
    );
    assert_eq!(idem_tests::runs(&key), 1);
}

const DROPPED_SCOPE: &str = "tests.pg.dropped_gate";

#[idem_runtime::idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "tests.pg.dropped_gate"
)]
async fn dropped_gate(
    _tx: &mut idem_runtime::PgTx<'_>,
    msg: idem_tests::Payment,
) -> Result<(), idem_tests::AppError> {
    idem_tests::count_run(&msg.order_id);
    Ok(())
}

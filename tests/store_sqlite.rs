//! The conformance suite on SQLite files (`cargo test -p idem-tests --test store_sqlite`).

idem_tests::conformance_suite! {
    store = "sqlite",
    tx = idem_runtime::SqliteTx<'_>,
    open = idem_tests::sqlite::store().await,
    constraint = "idem_conf_payments.order_id",
    placeholders = ["?1", "?2", "?3"],
    skip = [],
}

/// The shipped migration directory, run by another tool (sqlx's migrator, as `sqlx migrate
/// run` would) on an empty database, makes a table the store uses as it is, without
/// `migrate()`; and so does the text made for another table, applied with `raw_sql`.
#[tokio::test]
async fn the_shipped_migration_makes_a_table_the_store_accepts() {
    use idem_runtime::store::{RecordsTable, migrations};
    let store = idem_tests::sqlite::fresh_database().await;
    idem_tests::run_shipped_migrations("sqlite", store.pool()).await;
    idem_tests::exercise_records_table!(store.clone());

    let custom = RecordsTable::parse("main.Shipped").expect("a valid table name");
    sqlx::raw_sql(sqlx::AssertSqlSafe(migrations::sqlite(&custom)))
        .execute(store.pool())
        .await
        .expect("apply the text made for another table");
    idem_tests::exercise_records_table!(store.clone().with_records_table(custom));
}

/// Records persist in the file: a store reopened on the same file (a restarted consumer)
/// still recognises the duplicate.
#[tokio::test]
async fn records_survive_reopening_the_file() {
    use idem_runtime::{NoAck, SqliteStore};
    let path = idem_tests::sqlite::db_path("reopen");
    let key = idem_tests::unique_key("reopen");
    {
        let store = SqliteStore::open(&path).await.expect("open");
        store.migrate().await.expect("migrate");
        for ddl in idem_tests::conformance::BUSINESS_TABLES {
            sqlx::query(*ddl).execute(store.pool()).await.expect("ddl");
        }
        let first = handlers::dedup(&store, idem_tests::Payment::new(&key, 1), NoAck)
            .await
            .expect("first");
        assert!(first.is_processed());
        store.pool().close().await;
    }
    let store = SqliteStore::open(&path).await.expect("reopen");
    store.migrate().await.expect("migrate twice is harmless");
    let again = handlers::dedup(&store, idem_tests::Payment::new(&key, 1), NoAck)
        .await
        .expect("after restart");
    assert!(again.is_duplicate(), "{again:?}");
}

/// A committed, acked message must survive a power loss: `synchronous = FULL` unless the user
/// opts into `NORMAL`.
#[tokio::test]
async fn durable_after_the_ack_by_default() {
    use idem_runtime::{SqliteStore, Synchronous};
    let full = SqliteStore::open(idem_tests::sqlite::db_path("durable"))
        .await
        .expect("open");
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(full.pool())
        .await
        .expect("pragma");
    assert_eq!(level, 2, "FULL");
    let normal = SqliteStore::open_with(idem_tests::sqlite::db_path("normal"), Synchronous::Normal)
        .await
        .expect("open");
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(normal.pool())
        .await
        .expect("pragma");
    assert_eq!(level, 1, "NORMAL, when asked for");
}

/// A `StateKeyPart` that panics while the gate is built: caught, settled, nothing moved.
#[tokio::test]
async fn a_panicking_state_key_is_settled() {
    use idem_runtime::transition::{StateKey, StateKeyPart};
    use idem_runtime::{Error, SqliteTx, idempotent};

    struct PanickyId;

    impl StateKeyPart for PanickyId {
        fn state_key(&self) -> StateKey {
            panic!("state key exploded")
        }
    }

    impl idem_runtime::KeyPart for PanickyId {
        fn write_key_part(&self, out: &mut String) {
            out.push_str("panicky");
        }
    }

    struct Step {
        id: PanickyId,
    }

    #[idempotent(
        key = "id",
        store = "sqlite",
        strategy = "state_machine",
        scope = "sqlite.panicky_key",
        table = "idem_conf_orders",
        column = "status",
        key_column = "order_id",
        from = "pending",
        to = "paid"
    )]
    async fn on_step(_tx: &mut SqliteTx<'_>, _msg: Step) -> Result<(), idem_tests::AppError> {
        Ok(())
    }

    let store = idem_tests::sqlite::store().await;
    let ack = idem_tests::RecordingAck::new();
    let result = on_step(&store, Step { id: PanickyId }, ack.clone()).await;
    assert!(
        matches!(&result, Err(Error::Panicked { message, .. }) if message.contains("state key exploded")),
        "{result:?}"
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());
}

/// `claim_batch` on SQLite: one multi-row `INSERT … ON CONFLICT DO NOTHING RETURNING` per
/// `CLAIM_BATCH_ROWS` keys, one read of the keys found taken per such statement.
mod batch_claim {
    use idem_runtime::clock::ManualClock;
    use idem_runtime::store::sqlite::CLAIM_BATCH_ROWS;
    use idem_runtime::store::{Claim, NewRecord, StoredRecord};
    use idem_runtime::{Key, Store};
    use std::time::Duration;

    fn own_scope(label: &str) -> &'static str {
        Box::leak(format!("sqlite.batch.{}", idem_tests::unique_key(label)).into_boxed_str())
    }

    fn keys(scope: &'static str, ids: impl IntoIterator<Item = String>) -> Vec<Key> {
        ids.into_iter()
            .map(|id| Key::new(scope, &[("order_id", &id)]).expect("key"))
            .collect()
    }

    fn records(keys: &[Key], now_ms: i64, ttl_ms: Option<i64>) -> Vec<NewRecord<'_>> {
        keys.iter()
            .map(|key| NewRecord {
                key,
                fingerprint: None,
                response: None,
                now_ms,
                expires_at_ms: ttl_ms.map(|ttl| now_ms + ttl),
            })
            .collect()
    }

    async fn claim_and_commit<S: Store>(
        store: &S,
        keys: &[Key],
        ttl_ms: Option<i64>,
    ) -> Vec<Claim> {
        let mut tx = store.begin().await.expect("begin");
        let claims = store
            .claim_batch(&mut tx, &records(keys, store.now_ms(), ttl_ms))
            .await
            .expect("claim the batch");
        store.commit(tx).await.expect("commit");
        claims
    }

    /// Batches whose statements are padded (3, 5, 6, 7 keys: rows to 4 and 8, the last key
    /// repeated), with that last key fresh, live and expired: each key claimed or found once.
    async fn claim_padded_batches<S: Store>(store: &S, clock: &ManualClock) {
        for size in [1, 3, 5, 6, 7] {
            let scope = own_scope("padded");
            let batch = keys(scope, (0..size).map(|n| format!("p{n}")));
            let shape = |claims: &[Claim]| {
                claims
                    .iter()
                    .map(|claim| matches!(claim, Claim::Claimed))
                    .collect::<Vec<_>>()
            };
            let fresh = claim_and_commit(store, &batch, Some(60_000)).await;
            assert_eq!(shape(&fresh), vec![true; size], "fresh, {size} keys");
            let live = claim_and_commit(store, &batch, Some(60_000)).await;
            assert_eq!(shape(&live), vec![false; size], "live, {size} keys");
            clock.advance(Duration::from_secs(61));
            let expired = claim_and_commit(store, &batch, None).await;
            assert_eq!(shape(&expired), vec![true; size], "expired, {size} keys");
            let again = claim_and_commit(store, &batch, None).await;
            assert_eq!(shape(&again), vec![false; size], "taken over, {size} keys");
        }
    }

    #[tokio::test]
    async fn padded_statements_claim_each_key_once() {
        let clock = ManualClock::starting_now();
        let store = idem_tests::sqlite::store().await.with_clock(clock.clone());
        claim_padded_batches(&store, &clock).await;
    }

    /// A batch of more keys than one statement takes (`rows` a statement: two chunks and
    /// some), in reverse order, with twins, and with live and expired records on both sides of
    /// each chunk boundary: each key is claimed once, in input order; live records are found,
    /// expired ones taken over; afterwards every key is taken.
    async fn claim_across_chunks<S: Store>(store: &S, clock: &ManualClock, rows: usize) {
        let scope = own_scope("chunks");
        let total = 2 * rows + 7;
        // Zero-padded: the keys' byte order is their numbers' order, so the chunks are known.
        let id = |n: usize| format!("k{n:06}");
        let live = [0, rows - 1, rows + 1, 2 * rows + 6];
        let expiring = [1, rows, 2 * rows, 2 * rows + 5];
        let earlier = store.now_ms();
        let before = claim_and_commit(store, &keys(scope, live.map(id)), None).await;
        assert!(before.iter().all(|claim| *claim == Claim::Claimed));
        let before = claim_and_commit(store, &keys(scope, expiring.map(id)), Some(60_000)).await;
        assert!(before.iter().all(|claim| *claim == Claim::Claimed));
        clock.advance(Duration::from_secs(61));

        // Every key, last first, then the twins of a key taken over and of a live one.
        let mut order: Vec<usize> = (0..total).rev().collect();
        order.extend([rows, 0]);
        let batch = keys(scope, order.iter().map(|&n| id(n)));
        let now = store.now_ms();
        let claims = claim_and_commit(store, &batch, None).await;
        let found = Claim::Existing(StoredRecord {
            fingerprint: None,
            response: None,
            created_at_ms: earlier,
        });
        for (position, (&n, claim)) in order.iter().zip(&claims).enumerate() {
            let expected = if position >= total && n == rows {
                // The twin of a key this batch took over: what the batch wrote.
                Claim::Existing(StoredRecord {
                    fingerprint: None,
                    response: None,
                    created_at_ms: now,
                })
            } else if live.contains(&n) {
                found.clone()
            } else {
                Claim::Claimed
            };
            assert_eq!(*claim, expected, "key {n} at {position}");
        }
        let again = claim_and_commit(store, &keys(scope, (0..total).map(id)), None).await;
        assert!(
            again
                .iter()
                .all(|claim| matches!(claim, Claim::Existing(_))),
            "every key of the batch is taken"
        );
    }

    /// More keys than SQLite binds parameters for in one statement: claimed in several, in the
    /// default table and in one of another name and schema.
    #[tokio::test]
    async fn a_batch_larger_than_one_statement_is_claimed_in_chunks() {
        let clock = ManualClock::starting_now();
        let store = idem_tests::sqlite::store().await.with_clock(clock.clone());
        claim_across_chunks(&store, &clock, CLAIM_BATCH_ROWS).await;
        let clock = ManualClock::starting_now();
        let store = idem_tests::sqlite::store_on(idem_tests::sqlite::custom_table())
            .await
            .with_clock(clock.clone());
        claim_across_chunks(&store, &clock, CLAIM_BATCH_ROWS).await;
    }
}

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

/// The shipped migration directory for this server, run by another tool (sqlx's migrator, as
/// `sqlx migrate run` would) on an empty database, makes a table the store uses as it is,
/// without `migrate()`; and so does the text made for another table, applied with `raw_sql`.
#[tokio::test]
async fn the_shipped_migration_makes_a_table_the_store_accepts() {
    use idem_runtime::store::{RecordsTable, migrations};
    let (store, database) = idem_tests::mysql::fresh_database().await;
    let mariadb = idem_tests::mysql::is_mariadb(&store).await;
    let directory = if mariadb { "mariadb" } else { "mysql" };
    idem_tests::run_shipped_migrations(directory, store.pool()).await;
    idem_tests::exercise_records_table!(store.clone());

    let custom = RecordsTable::new("Shipped")
        .and_then(|table| table.in_schema(&database))
        .expect("a valid table name");
    let sql = if mariadb {
        migrations::mariadb(&custom)
    } else {
        migrations::mysql(&custom)
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("apply the text made for another table");
    idem_tests::exercise_records_table!(store.clone().with_records_table(custom));
    idem_tests::mysql::drop_database(&database).await;
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

/// `claim_batch` on this server: on MariaDB (10.5+) one `INSERT IGNORE … RETURNING` for the
/// batch's keys and one `SELECT` of those found taken; on MySQL the one-key gate, key by key.
mod batch_claim {
    use idem_runtime::clock::ManualClock;
    use idem_runtime::store::mysql::CLAIM_BATCH_ROWS;
    use idem_runtime::store::{Claim, NewRecord, StoredRecord};
    use idem_runtime::{Key, Store};
    use std::time::Duration;

    fn own_scope(label: &str) -> &'static str {
        Box::leak(format!("mysql.batch.{}", idem_tests::unique_key(label)).into_boxed_str())
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

    /// A counter of this session's statements (`Com_insert`, `Com_select`), read with the text
    /// protocol so that the read is no prepared statement of its own.
    async fn session_count(conn: &mut sqlx::MySqlConnection, counter: &str) -> u64 {
        use sqlx::Row as _;
        let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SHOW SESSION STATUS LIKE '{counter}'"
        )))
        .fetch_one(conn)
        .await
        .expect("read a status counter");
        row.get::<String, _>(1).parse().expect("a count")
    }

    /// A batch of 50 fresh keys is one statement on MariaDB: one `INSERT`, no `SELECT`; a batch
    /// of 50 of which 20 were taken is one `INSERT` and one `SELECT`. On MySQL, 50 `INSERT`s
    /// (and a `SELECT` for each key taken).
    #[tokio::test]
    async fn a_batch_is_one_insert_and_one_select_on_mariadb() {
        let store = idem_tests::mysql::store().await;
        let mariadb = idem_tests::mysql::is_mariadb(&store).await;
        let scope = own_scope("statements");
        let fresh = keys(scope, (0..50).map(|n| format!("f{n:02}")));
        let mut tx = store.begin().await.expect("begin");
        let (inserts, selects) = (
            session_count(&mut tx, "Com_insert").await,
            session_count(&mut tx, "Com_select").await,
        );
        let claims = store
            .claim_batch(&mut tx, &records(&fresh, store.now_ms(), None))
            .await
            .expect("claim");
        assert!(claims.iter().all(|claim| *claim == Claim::Claimed));
        let inserted = session_count(&mut tx, "Com_insert").await - inserts;
        let selected = session_count(&mut tx, "Com_select").await - selects;
        store.commit(tx).await.expect("commit");
        assert_eq!(
            (inserted, selected),
            if mariadb { (1, 0) } else { (50, 0) },
            "statements for 50 fresh keys"
        );

        // 20 of those and 30 new ones.
        let mixed = keys(scope, (30..80).map(|n| format!("f{n:02}")));
        let mut tx = store.begin().await.expect("begin");
        let (inserts, selects) = (
            session_count(&mut tx, "Com_insert").await,
            session_count(&mut tx, "Com_select").await,
        );
        let claims = store
            .claim_batch(&mut tx, &records(&mixed, store.now_ms(), None))
            .await
            .expect("claim");
        let inserted = session_count(&mut tx, "Com_insert").await - inserts;
        let selected = session_count(&mut tx, "Com_select").await - selects;
        store.commit(tx).await.expect("commit");
        let existing = claims
            .iter()
            .filter(|claim| matches!(claim, Claim::Existing(_)))
            .count();
        assert_eq!(existing, 20);
        assert_eq!(
            (inserted, selected),
            if mariadb { (1, 1) } else { (50, 20) },
            "statements for 50 keys, 20 of them taken"
        );
    }

    /// `INSERT IGNORE` would truncate a fingerprint wider than the table's `CHAR(64)` without an
    /// error: a batch carrying one is claimed key by key, with the plain `INSERT`, which fails
    /// on it (strict mode, the default) and writes nothing truncated. The counter shows the
    /// path: one `INSERT` a key up to the failing one.
    #[tokio::test]
    async fn a_value_insert_ignore_would_truncate_is_refused_not_truncated() {
        let store = idem_tests::mysql::store().await;
        let scope = own_scope("too-wide");
        let batch = keys(scope, ["a", "b", "c"].map(String::from));
        let wide = "f".repeat(65);
        let mut records = records(&batch, store.now_ms(), None);
        records[2].fingerprint = Some(&wide);
        let mut tx = store.begin().await.expect("begin");
        let inserts = session_count(&mut tx, "Com_insert").await;
        let error = store
            .claim_batch(&mut tx, &records)
            .await
            .expect_err("a fingerprint wider than its column");
        let inserted = session_count(&mut tx, "Com_insert").await - inserts;
        idem_tests::effects::rollback(&store, tx).await;
        let code = error
            .as_database_error()
            .and_then(|db| db.code().map(|code| code.into_owned()));
        assert_eq!(code.as_deref(), Some("22001"), "data too long: {error}");
        assert_eq!(inserted, 3, "key by key");
        for key in &batch {
            assert_eq!(
                store.find_record(key, store.now_ms()).await.expect("read"),
                None
            );
        }
    }

    /// A batch sharing a key with a transaction in flight waits for it (its insert blocks on
    /// the uncommitted row: seen in `information_schema.INNODB_TRX`), then finds the key taken
    /// when that transaction commits, or claims it when it rolls back; the batch's other keys
    /// are claimed either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_waits_for_a_twin_in_flight() {
        let store = idem_tests::mysql::store().await;
        for commit in [true, false] {
            let scope = own_scope(if commit {
                "twin-commits"
            } else {
                "twin-rolls-back"
            });
            let twin_key = Key::new(scope, &[("order_id", &"b")]).expect("key");
            let twin_now = store.now_ms();
            let mut twin = store.begin().await.expect("begin");
            let claimed = store
                .claim(
                    &mut twin,
                    &NewRecord {
                        key: &twin_key,
                        fingerprint: Some("twin"),
                        response: None,
                        now_ms: twin_now,
                        expires_at_ms: None,
                    },
                )
                .await
                .expect("the twin claims");
            assert_eq!(claimed, Claim::Claimed);

            let (connection_tx, connection) = tokio::sync::oneshot::channel::<u64>();
            let batch = tokio::spawn({
                let store = store.clone();
                async move {
                    let batch = keys(scope, ["c", "b", "a"].map(String::from));
                    let mut tx = store.begin().await.expect("begin");
                    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                        .fetch_one(&mut *tx)
                        .await
                        .expect("connection id");
                    connection_tx.send(id).expect("the test waits for it");
                    let claims = store
                        .claim_batch(&mut tx, &records(&batch, store.now_ms(), None))
                        .await
                        .expect("claim the batch");
                    store.commit(tx).await.expect("commit");
                    claims
                }
            });
            let id = connection.await.expect("the batch's connection");
            // The batch's connection, seen live by the server (`PROCESSLIST`; InnoDB's
            // `INNODB_TRX` is a cache refreshed at most every 100 ms): its claim is running,
            // and the twin's uncommitted row makes it wait there.
            idem_tests::eventually("the batch to wait on the twin's row", || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                     WHERE ID = ? AND STATE = 'Update' AND INFO LIKE 'INSERT%'",
                )
                .bind(id)
                .fetch_one(store.pool())
                .await
                .expect("read PROCESSLIST");
                waiting == 1
            })
            .await;
            assert!(!batch.is_finished(), "the batch waits for the twin");

            if commit {
                store.commit(twin).await.expect("the twin commits");
            } else {
                idem_tests::effects::rollback(&store, twin).await;
            }
            let claims = idem_tests::within("the batch", batch).await.expect("task");
            let b = if commit {
                Claim::Existing(StoredRecord {
                    fingerprint: Some("twin".into()),
                    response: None,
                    created_at_ms: twin_now,
                })
            } else {
                Claim::Claimed
            };
            assert_eq!(
                claims,
                [Claim::Claimed, b, Claim::Claimed],
                "commit: {commit}"
            );
        }
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
        let store = idem_tests::mysql::store().await.with_clock(clock.clone());
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

    #[tokio::test]
    async fn a_batch_larger_than_one_statement_is_claimed_in_chunks() {
        let clock = ManualClock::starting_now();
        let store = idem_tests::mysql::store().await.with_clock(clock.clone());
        claim_across_chunks(&store, &clock, CLAIM_BATCH_ROWS).await;
        let clock = ManualClock::starting_now();
        let store = idem_tests::mysql::store_on(idem_tests::mysql::custom_table())
            .await
            .with_clock(clock.clone());
        claim_across_chunks(&store, &clock, CLAIM_BATCH_ROWS).await;
    }
}

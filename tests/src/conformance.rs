//! The store conformance suite: the same cases, through real `#[idempotent]` handlers, on
//! every SQL store. A store's test target instantiates it with [`conformance_suite!`]:
//!
//! ```ignore
//! idem_tests::conformance_suite! {
//!     store = "pg",
//!     tx = idem_runtime::PgTx<'_>,
//!     open = idem_tests::pg::store().await,
//!     constraint = "idem_conf_payments_order_id_key",
//!     placeholders = ["$1", "$2", "$3"],
//! }
//! ```
//!
//! Cases, for `dedup_table` and `unique_constraint` alike: first delivery; sequential
//! duplicate; 16 concurrent deliveries of one key; a failure in the body (nothing committed,
//! the redelivery succeeds); a lost ack after commit (the redelivery is a duplicate); payload
//! mismatch (dead-lettered); replay of the first result; bad input (an empty key is
//! dead-lettered); plus expiry for `dedup_table`, constraint matching for `unique_constraint`,
//! the `state_machine` cases, and `migrate()` run twice and concurrently.

/// The business tables the conformance handlers write to. Portable DDL (PostgreSQL, MySQL,
/// SQLite): `VARCHAR`, because MySQL cannot index `TEXT` without a prefix length.
///
/// `idem_conf_ledger` has no unique constraint: a second row for a key means the body ran
/// twice to commit, so it is what proves a gate. `idem_conf_payments` has a unique order id
/// (the `unique_constraint` gate) and a second unique column, `receipt`, which must not be
/// mistaken for a duplicate when the gate names its constraint.
pub const BUSINESS_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS idem_conf_tickets (
        id     BIGINT      NOT NULL PRIMARY KEY,
        status VARCHAR(64) NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS idem_conf_orders (
        order_id VARCHAR(255) NOT NULL PRIMARY KEY,
        status   VARCHAR(64)  NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS idem_conf_ledger (
        order_id VARCHAR(255) NOT NULL,
        amount   BIGINT       NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS idem_conf_payments (
        order_id VARCHAR(255) NOT NULL,
        amount   BIGINT       NOT NULL,
        receipt  VARCHAR(255) NOT NULL,
        CONSTRAINT idem_conf_payments_order_id_key UNIQUE (order_id),
        CONSTRAINT idem_conf_payments_receipt_key UNIQUE (receipt)
    )",
];

/// Instantiates the conformance suite for one SQL store. See the [module docs](self).
#[macro_export]
macro_rules! conformance_suite {
    (
        store = $store:tt,
        tx = $tx:ty,
        open = $open:expr,
        constraint = $constraint:tt,
        placeholders = [$p1:literal, $p2:literal, $p3:literal] $(,)?
    ) => {
        mod handlers {
            use ::idem_runtime::idempotent;
            use $crate::{AppError, Payment};

            async fn write_ledger(tx: &mut $tx, msg: &Payment) -> Result<(), AppError> {
                ::sqlx::query(concat!("INSERT INTO idem_conf_ledger (order_id, amount) VALUES (", $p1, ", ", $p2, ")"))
                    .bind(&msg.order_id)
                    .bind(msg.amount)
                    .execute(&mut **tx)
                    .await?;
                $crate::maybe_fail(&msg.order_id)
            }

            async fn write_payment(tx: &mut $tx, msg: &Payment) -> Result<(), AppError> {
                // A fresh receipt per delivery unless the test sets one: a duplicate then
                // violates the order id's constraint only.
                let receipt = msg.receipt.clone().unwrap_or_else(|| $crate::unique_key("receipt"));
                ::sqlx::query(
                    concat!("INSERT INTO idem_conf_payments (order_id, amount, receipt) VALUES (", $p1, ", ", $p2, ", ", $p3, ")"),
                )
                .bind(&msg.order_id)
                .bind(msg.amount)
                .bind(receipt)
                .execute(&mut **tx)
                .await?;
                $crate::maybe_fail(&msg.order_id)
            }

            /// One ledger row per body run of a lifecycle step: `<order>/<step>`.
            async fn write_step(tx: &mut $tx, order_id: &str, step: &str) -> Result<(), AppError> {
                let entry = format!("{order_id}/{step}");
                ::sqlx::query(concat!("INSERT INTO idem_conf_ledger (order_id, amount) VALUES (", $p1, ", 0)"))
                    .bind(&entry)
                    .execute(&mut **tx)
                    .await?;
                $crate::maybe_fail(&entry)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.sm.create")]
            pub async fn sm_create(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
                ::sqlx::query(concat!("INSERT INTO idem_conf_orders (order_id, status) VALUES (", $p1, ", 'pending')"))
                    .bind(&msg.order_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            #[idempotent(key = "order_id", store = $store, strategy = "state_machine", scope = "conf.sm.pay",
                         table = "idem_conf_orders", column = "status", from = "pending", to = "paid", done = ["shipped"])]
            pub async fn sm_pay(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
                write_step(tx, &msg.order_id, "paid").await
            }

            #[idempotent(key = "order_id", store = $store, strategy = "state_machine", scope = "conf.sm.ship",
                         table = "idem_conf_orders", column = "status", from = ["paid"], to = "shipped")]
            pub async fn sm_ship(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
                write_step(tx, &msg.order_id, "shipped").await
            }

            #[idempotent(key = "order_id", store = $store, strategy = "state_machine", scope = "conf.sm.ship_patient",
                         table = "idem_conf_orders", column = "status", from = "paid", to = "shipped", early = ["pending"])]
            pub async fn sm_ship_patient(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
                write_step(tx, &msg.order_id, "shipped").await
            }

            #[idempotent(key = "order_id", store = $store, strategy = "state_machine", scope = "conf.sm.pay_strict",
                         table = "idem_conf_orders", column = "status", key_column = "order_id",
                         from = "pending", to = "paid", on_missing = "dead_letter")]
            pub async fn sm_pay_strict(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
                write_step(tx, &msg.order_id, "paid").await
            }

            #[idempotent(key = "id", store = $store, strategy = "state_machine", scope = "conf.sm.close",
                         table = "idem_conf_tickets", column = "status", from = "open", to = "closed")]
            pub async fn sm_close_ticket(_tx: &mut $tx, _msg: $crate::Ticket) -> Result<(), AppError> {
                Ok(())
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup")]
            pub async fn dedup(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_ledger(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.replay", replay)]
            pub async fn dedup_replay(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_ledger(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.fingerprint", fingerprint)]
            pub async fn dedup_fingerprint(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_ledger(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.ttl", ttl = "300ms")]
            pub async fn dedup_ttl(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_ledger(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique", constraint = $constraint)]
            pub async fn unique(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_payment(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.any")]
            pub async fn unique_any(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_payment(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.replay", constraint = $constraint, replay)]
            pub async fn unique_replay(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_payment(tx, &msg).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.fingerprint", constraint = $constraint, fingerprint)]
            pub async fn unique_fingerprint(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                write_payment(tx, &msg).await?;
                Ok(msg.amount)
            }
        }

        /// Rows for `key` in a business table.
        async fn business_rows(store: &impl HasPool, table: &str, key: &str) -> i64 {
            let sql = match table {
                "ledger" => concat!("SELECT COUNT(*) FROM idem_conf_ledger WHERE order_id = ", $p1),
                _ => concat!("SELECT COUNT(*) FROM idem_conf_payments WHERE order_id = ", $p1),
            };
            store.count(sql, &[key]).await
        }

        /// Dedup records for `key` in `scope`.
        async fn dedup_records(store: &impl HasPool, scope: &str, key: &str) -> i64 {
            store
                .count(
                    concat!("SELECT COUNT(*) FROM idem_records WHERE scope = ", $p1, " AND record_key = ", $p2),
                    &[scope, key],
                )
                .await
        }

        trait HasPool {
            async fn count(&self, sql: &'static str, binds: &[&str]) -> i64;
            async fn status(&self, order_id: &str) -> Option<String>;
            async fn execute_with_int(&self, sql: &'static str, value: i64);
        }

        $crate::__impl_has_pool!($store, $p1);

        /// `migrate()` twice, and from several tasks at once, is harmless.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn migrate_is_idempotent_and_safe_concurrently() {
            let store = $open;
            let runs: Vec<_> = (0..4)
                .map(|_| {
                    let store = store.clone();
                    ::tokio::spawn(async move { store.migrate().await })
                })
                .collect();
            for run in runs {
                run.await.expect("task").expect("concurrent migrate");
            }
            store.migrate().await.expect("migrate again");
        }

        mod dedup_table {
            use super::*;
            $crate::__strategy_cases!(
                open = $open,
                plain = handlers::dedup,
                replay = handlers::dedup_replay,
                fingerprint = handlers::dedup_fingerprint,
                table = "ledger",
                plain_scope = "conf.dedup",
            );

            #[tokio::test]
            async fn expired_record_no_longer_deduplicates() {
                $crate::init_tracing();
                let store = $open;
                let key = $crate::unique_key("ttl");
                let first = handlers::dedup_ttl(&store, $crate::Payment::new(&key, 1), ::idem_runtime::NoAck)
                    .await
                    .expect("first delivery");
                assert!(first.is_processed());
                let live = handlers::dedup_ttl(&store, $crate::Payment::new(&key, 1), ::idem_runtime::NoAck)
                    .await
                    .expect("redelivery within the ttl");
                assert!(live.is_duplicate(), "within the ttl the record counts: {live:?}");
                ::tokio::time::sleep(::std::time::Duration::from_millis(400)).await;
                let after = handlers::dedup_ttl(&store, $crate::Payment::new(&key, 1), ::idem_runtime::NoAck)
                    .await
                    .expect("redelivery after the ttl");
                assert!(after.is_processed(), "an expired record must not deduplicate: {after:?}");
                assert_eq!(business_rows(&store, "ledger", &key).await, 2);
                assert_eq!(dedup_records(&store, "conf.dedup.ttl", &key).await, 1, "the expired record is taken over, not duplicated");
            }

            #[tokio::test]
            async fn purge_expired_deletes_expired_records_only() {
                let store = $open;
                let expiring = $crate::unique_key("purge");
                let lasting = $crate::unique_key("keep");
                handlers::dedup_ttl(&store, $crate::Payment::new(&expiring, 1), ::idem_runtime::NoAck)
                    .await
                    .expect("delivery with a ttl");
                handlers::dedup(&store, $crate::Payment::new(&lasting, 1), ::idem_runtime::NoAck)
                    .await
                    .expect("delivery without a ttl");
                ::tokio::time::sleep(::std::time::Duration::from_millis(400)).await;
                let purged = store.purge_expired().await.expect("purge");
                assert!(purged >= 1, "at least this test's expired record is purged: {purged}");
                assert_eq!(dedup_records(&store, "conf.dedup.ttl", &expiring).await, 0);
                assert_eq!(dedup_records(&store, "conf.dedup", &lasting).await, 1, "records without a ttl stay");
            }

            #[tokio::test]
            async fn dedup_record_is_written_in_the_transaction() {
                let store = $open;
                let key = $crate::unique_key("record");
                handlers::dedup(&store, $crate::Payment::new(&key, 3), ::idem_runtime::NoAck)
                    .await
                    .expect("first delivery");
                assert_eq!(dedup_records(&store, "conf.dedup", &key).await, 1);
            }
        }

        mod state_machine {
            use super::*;
            use ::idem_runtime::{Error, NoAck, Outcome, RequeueReason};
            use $crate::{AckEvent, Payment, RecordingAck, unique_key};

            async fn steps(store: &impl HasPool, key: &str, step: &str) -> i64 {
                business_rows(store, "ledger", &format!("{key}/{step}")).await
            }

            #[tokio::test]
            async fn lifecycle_with_a_duplicate_of_every_step() {
                $crate::init_tracing();
                let store = $open;
                let key = unique_key("life");
                let msg = || Payment::new(&key, 0);
                assert!(handlers::sm_create(&store, msg(), NoAck).await.expect("create").is_processed());
                assert!(handlers::sm_create(&store, msg(), NoAck).await.expect("create again").is_duplicate());
                assert_eq!(store.status(&key).await.as_deref(), Some("pending"));

                let ack = RecordingAck::new();
                assert_eq!(handlers::sm_pay(&store, msg(), ack.clone()).await.expect("pay"), Outcome::Processed(()));
                assert_eq!(handlers::sm_pay(&store, msg(), ack.clone()).await.expect("pay again"), Outcome::Duplicate { replayed: None });
                assert_eq!(ack.events(), vec![AckEvent::Ack, AckEvent::Ack]);
                assert_eq!(store.status(&key).await.as_deref(), Some("paid"));

                assert!(handlers::sm_ship(&store, msg(), NoAck).await.expect("ship").is_processed());
                assert!(handlers::sm_ship(&store, msg(), NoAck).await.expect("ship again").is_duplicate());
                // `shipped` is in pay's `done`: a late redelivery of "pay" is a duplicate too.
                assert!(handlers::sm_pay(&store, msg(), NoAck).await.expect("late pay").is_duplicate());
                assert_eq!(store.status(&key).await.as_deref(), Some("shipped"));
                assert_eq!(steps(&store, &key, "paid").await, 1, "pay's body ran once");
                assert_eq!(steps(&store, &key, "shipped").await, 1, "ship's body ran once");
            }

            #[tokio::test]
            async fn integer_key_column_is_compared_as_an_integer() {
                let store = $open;
                let id = $crate::unique_int();
                store.execute_with_int(concat!("INSERT INTO idem_conf_tickets (id, status) VALUES (", $p1, ", 'open')"), id).await;
                let ticket = $crate::Ticket { id };
                assert!(handlers::sm_close_ticket(&store, ticket.clone(), NoAck).await.expect("close").is_processed());
                assert!(handlers::sm_close_ticket(&store, ticket, NoAck).await.expect("close again").is_duplicate());
            }

            #[tokio::test]
            async fn step_before_its_entity_exists_is_retried_then_succeeds() {
                let store = $open;
                let key = unique_key("early");
                let ack = RecordingAck::new();
                let early = handlers::sm_pay(&store, Payment::new(&key, 0), ack.clone()).await;
                match &early {
                    Err(Error::NotFound { retryable: true, table, .. }) => assert_eq!(table, "idem_conf_orders"),
                    other => panic!("expected a retryable NotFound, got {other:?}"),
                }
                assert!(early.as_ref().unwrap_err().is_retryable());
                assert_eq!(ack.events(), vec![AckEvent::Requeue(RequeueReason::Retryable)]);
                assert_eq!(steps(&store, &key, "paid").await, 0);

                handlers::sm_create(&store, Payment::new(&key, 0), NoAck).await.expect("create lands");
                let retried = handlers::sm_pay(&store, Payment::new(&key, 0), NoAck).await.expect("redelivery");
                assert!(retried.is_processed());
                assert_eq!(store.status(&key).await.as_deref(), Some("paid"));
            }

            #[tokio::test]
            async fn step_finding_an_early_state_is_retried_until_its_predecessor_lands() {
                let store = $open;
                let key = unique_key("patient");
                handlers::sm_create(&store, Payment::new(&key, 0), NoAck).await.expect("create");
                let ack = RecordingAck::new();
                let early = handlers::sm_ship_patient(&store, Payment::new(&key, 0), ack.clone()).await;
                match &early {
                    Err(Error::TooEarly { current, .. }) => assert_eq!(current, "pending"),
                    other => panic!("expected TooEarly, got {other:?}"),
                }
                assert_eq!(ack.events(), vec![AckEvent::Requeue(RequeueReason::Retryable)]);
                handlers::sm_pay(&store, Payment::new(&key, 0), NoAck).await.expect("pay lands");
                let shipped = handlers::sm_ship_patient(&store, Payment::new(&key, 0), NoAck).await.expect("redelivery");
                assert!(shipped.is_processed());
                assert_eq!(store.status(&key).await.as_deref(), Some("shipped"));
                assert_eq!(steps(&store, &key, "shipped").await, 1);
            }

            #[tokio::test]
            async fn missing_entity_is_dead_lettered_with_on_missing_dead_letter() {
                let store = $open;
                let key = unique_key("strict");
                let ack = RecordingAck::new();
                let result = handlers::sm_pay_strict(&store, Payment::new(&key, 0), ack.clone()).await;
                assert!(matches!(result, Err(Error::NotFound { retryable: false, .. })), "{result:?}");
                assert!(matches!(ack.events().as_slice(), [AckEvent::DeadLetter(_)]), "{:?}", ack.events());
            }

            #[tokio::test]
            async fn invalid_transition_is_dead_lettered_with_the_current_state() {
                let store = $open;
                let key = unique_key("invalid");
                handlers::sm_create(&store, Payment::new(&key, 0), NoAck).await.expect("create");
                let ack = RecordingAck::new();
                // Ship moves only from `paid`; the order is still `pending`.
                let result = handlers::sm_ship(&store, Payment::new(&key, 0), ack.clone()).await;
                match &result {
                    Err(Error::InvalidTransition { current, expected, .. }) => {
                        assert_eq!(current.as_deref(), Some("pending"));
                        assert_eq!(expected, &vec!["paid".to_owned()]);
                    }
                    other => panic!("expected InvalidTransition, got {other:?}"),
                }
                assert!(
                    matches!(ack.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains("`pending`")),
                    "{:?}",
                    ack.events()
                );
                assert_eq!(store.status(&key).await.as_deref(), Some("pending"), "nothing moved");
                assert_eq!(steps(&store, &key, "shipped").await, 0);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_deliveries_of_one_transition_process_exactly_once() {
                let store = $open;
                let key = unique_key("sm-race");
                handlers::sm_create(&store, Payment::new(&key, 0), NoAck).await.expect("create");
                let tasks: Vec<_> = (0..16)
                    .map(|_| {
                        let store = store.clone();
                        let message = Payment::new(&key, 0);
                        ::tokio::spawn(async move { handlers::sm_pay(&store, message, NoAck).await })
                    })
                    .collect();
                let mut processed = 0;
                let mut duplicates = 0;
                for task in tasks {
                    match task.await.expect("task panicked") {
                        Ok(Outcome::Processed(())) => processed += 1,
                        Ok(Outcome::Duplicate { .. }) => duplicates += 1,
                        other => panic!("unexpected result under contention: {other:?}"),
                    }
                }
                assert_eq!((processed, duplicates), (1, 15));
                assert_eq!(steps(&store, &key, "paid").await, 1);
                assert_eq!(store.status(&key).await.as_deref(), Some("paid"));
            }

            #[tokio::test]
            async fn body_failure_rolls_the_transition_back() {
                let store = $open;
                let key = unique_key("sm-fail");
                handlers::sm_create(&store, Payment::new(&key, 0), NoAck).await.expect("create");
                $crate::fail_once(&format!("{key}/paid"));
                let ack = RecordingAck::new();
                let failed = handlers::sm_pay(&store, Payment::new(&key, 0), ack.clone()).await;
                assert!(matches!(failed, Err(Error::Handler($crate::AppError::Transient(_)))), "{failed:?}");
                assert_eq!(ack.events(), vec![AckEvent::Requeue(RequeueReason::Retryable)]);
                assert_eq!(store.status(&key).await.as_deref(), Some("pending"), "the transition rolled back");
                assert_eq!(steps(&store, &key, "paid").await, 0);

                let retried = handlers::sm_pay(&store, Payment::new(&key, 0), NoAck).await.expect("redelivery");
                assert!(retried.is_processed());
                assert_eq!(store.status(&key).await.as_deref(), Some("paid"));
            }
        }

        mod unique_constraint {
            use super::*;
            $crate::__strategy_cases!(
                open = $open,
                plain = handlers::unique,
                replay = handlers::unique_replay,
                fingerprint = handlers::unique_fingerprint,
                table = "payments",
                plain_scope = "conf.unique",
            );

            #[tokio::test]
            async fn writes_no_dedup_record_without_replay_or_fingerprint() {
                let store = $open;
                let key = $crate::unique_key("norecord");
                handlers::unique(&store, $crate::Payment::new(&key, 3), ::idem_runtime::NoAck)
                    .await
                    .expect("first delivery");
                assert_eq!(dedup_records(&store, "conf.unique", &key).await, 0);
                assert_eq!(business_rows(&store, "payments", &key).await, 1);
            }

            #[tokio::test]
            async fn violation_of_another_constraint_is_an_error_not_a_duplicate() {
                let store = $open;
                let receipt = $crate::unique_key("receipt");
                let mut first = $crate::Payment::new($crate::unique_key("a"), 1);
                first.receipt = Some(receipt.clone());
                let mut second = $crate::Payment::new($crate::unique_key("b"), 2);
                second.receipt = Some(receipt);
                handlers::unique(&store, first, ::idem_runtime::NoAck).await.expect("first");
                let ack = $crate::RecordingAck::new();
                let result = handlers::unique(&store, second.clone(), ack.clone()).await;
                match &result {
                    Err(::idem_runtime::Error::Handler($crate::AppError::Db(_))) => {}
                    other => panic!("a receipt clash is not a duplicate of this order: {other:?}"),
                }
                assert!(matches!(ack.events().as_slice(), [$crate::AckEvent::DeadLetter(_)]), "{:?}", ack.events());
                assert_eq!(business_rows(&store, "payments", &second.order_id).await, 0);
            }

            #[tokio::test]
            async fn without_a_named_constraint_any_unique_violation_is_a_duplicate() {
                let store = $open;
                let receipt = $crate::unique_key("receipt-any");
                let mut first = $crate::Payment::new($crate::unique_key("a"), 1);
                first.receipt = Some(receipt.clone());
                let mut second = $crate::Payment::new($crate::unique_key("b"), 2);
                second.receipt = Some(receipt);
                handlers::unique_any(&store, first, ::idem_runtime::NoAck).await.expect("first");
                let outcome = handlers::unique_any(&store, second, ::idem_runtime::NoAck)
                    .await
                    .expect("documented: any unique violation counts when no constraint is named");
                assert!(outcome.is_duplicate());
            }
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: counting rows through the store's pool.
#[doc(hidden)]
#[macro_export]
macro_rules! __impl_has_pool {
    ("pg", $p1:literal) => {
        $crate::__impl_has_pool!(@impl ::idem_runtime::PgStore, $p1);
    };
    ("mysql", $p1:literal) => {
        $crate::__impl_has_pool!(@impl ::idem_runtime::MySqlStore, $p1);
    };
    ("sqlite", $p1:literal) => {
        $crate::__impl_has_pool!(@impl ::idem_runtime::SqliteStore, $p1);
    };
    (@impl $store:ty, $p1:literal) => {
        impl HasPool for $store {
            async fn count(&self, sql: &'static str, binds: &[&str]) -> i64 {
                let mut query = ::sqlx::query_scalar::<_, i64>(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_one(self.pool()).await.expect("count rows")
            }

            async fn status(&self, order_id: &str) -> Option<String> {
                ::sqlx::query_scalar(concat!("SELECT status FROM idem_conf_orders WHERE order_id = ", $p1))
                    .bind(order_id)
                    .fetch_optional(self.pool())
                    .await
                    .expect("read the order's status")
            }

            async fn execute_with_int(&self, sql: &'static str, value: i64) {
                ::sqlx::query(sql)
                    .bind(value)
                    .execute(self.pool())
                    .await
                    .expect("execute a setup statement");
            }
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: the cases every strategy passes.
#[doc(hidden)]
#[macro_export]
macro_rules! __strategy_cases {
    (
        open = $open:expr,
        plain = $plain:path,
        replay = $replay:path,
        fingerprint = $fingerprint:path,
        table = $table:literal,
        plain_scope = $scope:literal $(,)?
    ) => {
        use ::idem_runtime::{Error, NoAck, Outcome, RequeueReason};
        use $crate::{AckEvent, Payment, RecordingAck, unique_key};

        #[tokio::test]
        async fn first_delivery_is_processed_then_acked() {
            $crate::init_tracing();
            let store = $open;
            let key = unique_key("first");
            let ack = RecordingAck::new();
            let outcome = $plain(&store, Payment::new(&key, 250), ack.clone())
                .await
                .expect("first delivery");
            assert_eq!(outcome, Outcome::Processed(250));
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            assert_eq!(business_rows(&store, $table, &key).await, 1);
        }

        #[tokio::test]
        async fn sequential_duplicate_is_acked_without_running_the_body() {
            let store = $open;
            let key = unique_key("seq");
            $plain(&store, Payment::new(&key, 10), NoAck).await.expect("first delivery");
            let ack = RecordingAck::new();
            let again = $plain(&store, Payment::new(&key, 10), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(again, Outcome::Duplicate { replayed: None });
            assert_eq!(ack.events(), vec![AckEvent::Ack], "a duplicate is acked");
            assert_eq!(business_rows(&store, $table, &key).await, 1, "the body ran once");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_duplicates_process_exactly_once() {
            let store = $open;
            let key = unique_key("race");
            let acks: Vec<RecordingAck> = (0..16).map(|_| RecordingAck::new()).collect();
            let tasks: Vec<_> = acks
                .iter()
                .map(|ack| {
                    let store = store.clone();
                    let message = Payment::new(&key, 7);
                    let ack = ack.clone();
                    ::tokio::spawn(async move { $plain(&store, message, ack).await })
                })
                .collect();
            let mut processed = 0;
            let mut duplicates = 0;
            for task in tasks {
                match task.await.expect("task panicked") {
                    Ok(Outcome::Processed(7)) => processed += 1,
                    Ok(Outcome::Duplicate { .. }) => duplicates += 1,
                    other => panic!("unexpected result under contention: {other:?}"),
                }
            }
            assert_eq!((processed, duplicates), (1, 15));
            assert_eq!(business_rows(&store, $table, &key).await, 1);
            for ack in &acks {
                assert_eq!(ack.events(), vec![AckEvent::Ack], "every twin is acked once");
            }
        }

        #[tokio::test]
        async fn body_failure_commits_nothing_and_redelivery_succeeds() {
            let store = $open;
            let key = unique_key("fail");
            $crate::fail_once(&key);
            let ack = RecordingAck::new();
            let failed = $plain(&store, Payment::new(&key, 5), ack.clone()).await;
            assert!(
                matches!(failed, Err(Error::Handler($crate::AppError::Transient(_)))),
                "{failed:?}"
            );
            assert_eq!(ack.events(), vec![AckEvent::Requeue(RequeueReason::Retryable)]);
            assert_eq!(business_rows(&store, $table, &key).await, 0, "the write rolled back");
            assert_eq!(dedup_records(&store, $scope, &key).await, 0, "the record rolled back");

            let ack = RecordingAck::new();
            let retried = $plain(&store, Payment::new(&key, 5), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(retried, Outcome::Processed(5));
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            assert_eq!(business_rows(&store, $table, &key).await, 1);
        }

        #[tokio::test]
        async fn lost_ack_after_commit_makes_the_redelivery_a_duplicate() {
            let store = $open;
            let key = unique_key("lostack");
            let ack = RecordingAck::losing_acks();
            let first = $plain(&store, Payment::new(&key, 9), ack.clone())
                .await
                .expect("a lost ack after commit is not a handling failure");
            assert_eq!(first, Outcome::Processed(9));
            assert_eq!(ack.events(), vec![AckEvent::Ack], "the ack was attempted after commit");

            // The broker never heard the ack, so it redelivers.
            let ack = RecordingAck::new();
            let redelivered = $plain(&store, Payment::new(&key, 9), ack.clone())
                .await
                .expect("redelivery");
            assert!(redelivered.is_duplicate(), "{redelivered:?}");
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            assert_eq!(business_rows(&store, $table, &key).await, 1);
        }

        #[tokio::test]
        async fn same_key_with_a_different_payload_is_dead_lettered() {
            let store = $open;
            let key = unique_key("mismatch");
            $fingerprint(&store, Payment::new(&key, 100), NoAck).await.expect("first");
            let same = $fingerprint(&store, Payment::new(&key, 100), NoAck)
                .await
                .expect("an identical redelivery");
            assert!(same.is_duplicate());
            let ack = RecordingAck::new();
            let changed = $fingerprint(&store, Payment::new(&key, 200), ack.clone()).await;
            match &changed {
                Err(Error::PayloadMismatch { key: k, .. }) => assert_eq!(k, &key),
                other => panic!("expected PayloadMismatch, got {other:?}"),
            }
            assert!(!changed.as_ref().unwrap_err().is_retryable());
            assert!(
                matches!(ack.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains("payload mismatch")),
                "{:?}",
                ack.events()
            );
            assert_eq!(business_rows(&store, $table, &key).await, 1);
        }

        #[tokio::test]
        async fn duplicate_replays_the_first_result() {
            let store = $open;
            let key = unique_key("replay");
            let first = $replay(&store, Payment::new(&key, 41), NoAck).await.expect("first");
            assert_eq!(first, Outcome::Processed(41));
            // No fingerprint: a redelivery with other fields still gets the first result.
            let again = $replay(&store, Payment::new(&key, 99), NoAck).await.expect("again");
            assert_eq!(again, Outcome::Duplicate { replayed: Some(41) });
            assert_eq!(business_rows(&store, $table, &key).await, 1);
        }

        /// A broker's-eye view: 40 keys, each delivered 4 times, all at once from 16 tasks;
        /// every fifth key's body fails once (requeued), every seventh key's first ack is lost
        /// (redelivered). Afterwards each key has exactly one business row.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn storm_of_redeliveries_with_failures_ends_exactly_once() {
            use ::std::sync::{Arc, Mutex};
            let store = $open;
            let keys: Vec<String> = (0..40).map(|_| unique_key("storm")).collect();
            for (i, key) in keys.iter().enumerate() {
                if i % 5 == 0 {
                    $crate::fail_once(key);
                }
            }
            let queue: Arc<Mutex<Vec<(String, bool)>>> = Arc::new(Mutex::new(
                keys.iter()
                    .enumerate()
                    .flat_map(|(i, key)| (0..4).map(move |copy| (key.clone(), i % 7 == 0 && copy == 0)))
                    .collect(),
            ));
            let processed = Arc::new(Mutex::new(Vec::new()));
            let workers: Vec<_> = (0..16)
                .map(|_| {
                    let (store, queue, processed) = (store.clone(), Arc::clone(&queue), Arc::clone(&processed));
                    ::tokio::spawn(async move {
                        let mut deliveries = 0;
                        loop {
                            let next = queue.lock().expect("queue").pop();
                            let Some((key, lose_ack)) = next else { break };
                            deliveries += 1;
                            assert!(deliveries < 1_000, "the storm does not settle");
                            let ack = if lose_ack { RecordingAck::losing_acks() } else { RecordingAck::new() };
                            match $plain(&store, Payment::new(&key, 1), ack.clone()).await {
                                Ok(Outcome::Processed(_)) => processed.lock().expect("processed").push(key.clone()),
                                Ok(_) => {}
                                Err(error) => assert!(error.is_retryable(), "{error}"),
                            }
                            // The broker's side: what was not acked comes back.
                            let acked = ack.events() == vec![AckEvent::Ack];
                            if !acked || lose_ack {
                                queue.lock().expect("queue").insert(0, (key, false));
                            }
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.await.expect("worker panicked");
            }
            let mut processed = processed.lock().expect("processed").clone();
            processed.sort();
            let mut expected = keys.clone();
            expected.sort();
            assert_eq!(processed, expected, "each key processed exactly once");
            for key in &keys {
                assert_eq!(business_rows(&store, $table, key).await, 1, "one row for {key}");
            }
        }

        #[tokio::test]
        async fn empty_key_is_dead_lettered_not_dropped() {
            let store = $open;
            let ack = RecordingAck::new();
            let result = $plain(&store, Payment::new("", 1), ack.clone()).await;
            match &result {
                Err(Error::Key(error)) => {
                    assert!(error.to_string().contains("`order_id` is empty"), "{error}")
                }
                other => panic!("expected a key error, got {other:?}"),
            }
            assert!(
                matches!(ack.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains("order_id")),
                "{:?}",
                ack.events()
            );
        }
    };
}

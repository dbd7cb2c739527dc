//! The store conformance suite: the same cases, through real `#[idempotent]` handlers, on
//! every store. A store's test target instantiates it with [`conformance_suite!`](crate::conformance_suite):
//!
//! ```ignore
//! idem_tests::conformance_suite! {
//!     store = "pg",
//!     tx = idem_runtime::PgTx<'_>,
//!     open = idem_tests::pg::store().await,
//!     constraint = "idem_conf_payments_order_id_key",
//!     placeholders = ["$1", "$2", "$3"],
//!     skip = [],
//! }
//! ```
//!
//! `skip` names the groups a store cannot run: `unique_constraint`, `state_machine` (no
//! business tables) and `sql` (statements against the database itself). The memory store
//! skips all three and runs the rest.
//!
//! Cases, for `dedup_table` and `unique_constraint` alike: first delivery; sequential
//! duplicate; 16 concurrent deliveries of one key; a failure in the body (nothing committed,
//! the redelivery succeeds); a lost ack after commit (the redelivery is a duplicate); payload
//! mismatch (dead-lettered); replay of the first result; bad input (an empty key and a NUL in
//! a key are dead-lettered); a storm of redeliveries; the handler in a transaction its caller
//! owns (`<name>_in_transaction`), committed (the next delivery is a duplicate) and rolled
//! back (nothing recorded). The effect counted is a ledger entry
//! per committed body run, in a table with no unique key, and the body runs themselves:
//! a unique constraint's own row count proves nothing about a gate. `dedup_table` adds expiry
//! under a controlled clock, a concurrent take-over of an expired record, purging while
//! claims run, retries that end after `max_attempts`, and a panicking body; `unique_constraint`
//! adds constraint matching and duplicates whose record is gone; `state_machine` its lifecycle
//! cases; `sql` adds `migrate()` run twice and concurrently, a failed statement the body
//! ignores (the commit must not be acked), and a stored result that no longer decodes.

/// The business tables the conformance handlers write to. Portable DDL (PostgreSQL, MySQL,
/// SQLite): `VARCHAR`, because MySQL cannot index `TEXT` without a prefix length.
///
/// `idem_conf_ledger` has no unique constraint: a second row for a key means the body ran
/// twice to commit, so it is what proves a gate. `idem_conf_payments` has a unique order id
/// (the `unique_constraint` gate) and a second unique column, `receipt`, which must not be
/// mistaken for a duplicate when the gate names its constraint.
pub const BUSINESS_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS idem_conf_probe (
        id BIGINT NOT NULL PRIMARY KEY
    )",
    "CREATE TABLE IF NOT EXISTS idem_conf_locks (
        id BIGINT NOT NULL PRIMARY KEY,
        v  BIGINT NOT NULL
    )",
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

/// Instantiates the conformance suite for one store. See the [module docs](self).
#[macro_export]
macro_rules! conformance_suite {
    (
        store = $store:tt,
        tx = $tx:ty,
        open = $open:expr,
        constraint = $constraint:tt,
        placeholders = [$p1:literal, $p2:literal, $p3:literal],
        skip = [$($skip:ident),* $(,)?] $(,)?
    ) => {
        #[allow(unused_imports)]
        use $crate::effects::{Effects as _, TestStore as _};

        mod handlers {
            #![allow(dead_code)]
            use ::idem_runtime::idempotent;
            use $crate::effects::Effects as _;
            use $crate::{AppError, Payment};

            /// Every conformance body: counts its run, writes one ledger entry, then fails or
            /// panics where a test asked it to.
            async fn work(tx: &mut $tx, entry: &str, amount: i64) -> Result<(), AppError> {
                $crate::count_run(entry);
                tx.ledger(entry, amount).await?;
                $crate::maybe_panic(entry);
                $crate::maybe_fail(entry)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup")]
            pub async fn dedup(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                work(tx, &msg.order_id, msg.amount).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.replay", replay)]
            pub async fn dedup_replay(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                work(tx, &msg.order_id, msg.amount).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.fingerprint", fingerprint)]
            pub async fn dedup_fingerprint(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                work(tx, &msg.order_id, msg.amount).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.ttl", ttl = "1h")]
            pub async fn dedup_ttl(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                work(tx, &msg.order_id, msg.amount).await?;
                Ok(msg.amount)
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.attempts", max_attempts = 3)]
            pub async fn dedup_three_attempts(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                work(tx, &msg.order_id, msg.amount).await?;
                Ok(msg.amount)
            }

            /// Every batch body: counts each message's run and writes its ledger entry, then
            /// fails or panics where a test asked it to, for any message of the batch.
            async fn work_batch(tx: &mut $tx, msgs: &[Payment]) -> Result<(), AppError> {
                for msg in msgs {
                    $crate::count_run(&msg.order_id);
                    tx.ledger(&msg.order_id, msg.amount).await?;
                }
                for msg in msgs {
                    $crate::maybe_panic(&msg.order_id);
                    $crate::maybe_fail(&msg.order_id)?;
                }
                Ok(())
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.batch.dedup", batch)]
            pub async fn dedup_batch(tx: &mut $tx, msgs: &[Payment]) -> Result<(), AppError> {
                work_batch(tx, msgs).await
            }

            #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.batch.dedup.fingerprint", batch, fingerprint)]
            pub async fn dedup_batch_fingerprint(tx: &mut $tx, msgs: &[Payment]) -> Result<(), AppError> {
                work_batch(tx, msgs).await
            }

            $crate::__unless_skipped!(sql, [$($skip),*],
                #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.batch.dedup.swallow", batch)]
                pub async fn dedup_batch_swallowing(tx: &mut $tx, msgs: &[Payment]) -> Result<(), AppError> {
                    work_batch(tx, msgs).await?;
                    if msgs.iter().any(|msg| $crate::should_swallow(&msg.order_id)) {
                        $crate::effects::SwallowsAFailure::swallow_a_failed_statement(tx).await;
                    }
                    Ok(())
                }
            );

            $crate::__unless_skipped!(sql, [$($skip),*],
                #[idempotent(key = "order_id", store = $store, strategy = "dedup_table", scope = "conf.dedup.swallow")]
                pub async fn dedup_swallowing(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    work(tx, &msg.order_id, msg.amount).await?;
                    if $crate::should_swallow(&msg.order_id) {
                        $crate::effects::SwallowsAFailure::swallow_a_failed_statement(tx).await;
                    }
                    Ok(msg.amount)
                }
            );

            $crate::__unless_skipped!(unique_constraint, [$($skip),*],
                async fn write_payment(tx: &mut $tx, msg: &Payment) -> Result<(), AppError> {
                    $crate::count_run(&msg.order_id);
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
                    // The ledger has no unique key: it counts the body runs that committed.
                    tx.ledger(&msg.order_id, msg.amount).await?;
                    $crate::maybe_panic(&msg.order_id);
                    $crate::maybe_fail(&msg.order_id)
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.batch.unique", constraint = $constraint, batch)]
                pub async fn unique_batch(tx: &mut $tx, msgs: &[Payment]) -> Result<(), AppError> {
                    for msg in msgs {
                        write_payment(tx, msg).await?;
                    }
                    Ok(())
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique", constraint = $constraint)]
                pub async fn unique(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    write_payment(tx, &msg).await?;
                    Ok(msg.amount)
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.replay", constraint = $constraint, replay, ttl = "1h")]
                pub async fn unique_replay(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    write_payment(tx, &msg).await?;
                    Ok(msg.amount)
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.fingerprint", constraint = $constraint, fingerprint, ttl = "1h")]
                pub async fn unique_fingerprint(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    write_payment(tx, &msg).await?;
                    Ok(msg.amount)
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.swallow_fp", constraint = $constraint, fingerprint)]
                pub async fn unique_fingerprint_swallowing(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    write_payment(tx, &msg).await?;
                    if $crate::should_swallow(&msg.order_id) {
                        $crate::effects::SwallowsAFailure::swallow_a_failed_statement(tx).await;
                    }
                    Ok(msg.amount)
                }

                #[idempotent(key = "order_id", store = $store, strategy = "unique_constraint", scope = "conf.unique.swallow", constraint = $constraint)]
                pub async fn unique_swallowing(tx: &mut $tx, msg: Payment) -> Result<i64, AppError> {
                    write_payment(tx, &msg).await?;
                    if $crate::should_swallow(&msg.order_id) {
                        $crate::effects::SwallowsAFailure::swallow_a_failed_statement(tx).await;
                    }
                    Ok(msg.amount)
                }
            );

            $crate::__unless_skipped!(state_machine, [$($skip),*],
                /// One ledger entry per body run of a lifecycle step: `<order>/<step>`.
                async fn write_step(tx: &mut $tx, order_id: &str, step: &str) -> Result<(), AppError> {
                    work(tx, &format!("{order_id}/{step}"), 0).await
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

                #[idempotent(key = "order_id", store = $store, strategy = "state_machine", scope = "conf.sm.pay_patiently",
                             table = "idem_conf_orders", column = "status", from = "pending", to = "paid", max_attempts = 2)]
                pub async fn sm_pay_twice_at_most(tx: &mut $tx, msg: Payment) -> Result<(), AppError> {
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
            );
        }

        mod dedup_table {
            use super::*;
            $crate::__strategy_cases!(
                open = $open,
                plain = handlers::dedup,
                plain_in_transaction = handlers::dedup_in_transaction,
                replay = handlers::dedup_replay,
                fingerprint = handlers::dedup_fingerprint,
                plain_scope = "conf.dedup",
                duplicates_run_the_body = false,
            );
            $crate::__dedup_table_cases!(open = $open);
        }

        $crate::__unless_skipped!(unique_constraint, [$($skip),*],
            mod unique_constraint {
                use super::*;
                $crate::__strategy_cases!(
                    open = $open,
                    plain = handlers::unique,
                    plain_in_transaction = handlers::unique_in_transaction,
                    replay = handlers::unique_replay,
                    fingerprint = handlers::unique_fingerprint,
                    plain_scope = "conf.unique",
                    duplicates_run_the_body = true,
                );
                $crate::__unique_constraint_cases!(open = $open, p1 = $p1);
            }
        );

        $crate::__unless_skipped!(state_machine, [$($skip),*],
            mod state_machine {
                use super::*;
                $crate::__state_machine_cases!(open = $open, p1 = $p1);
            }
        );

        mod batch_dedup_table {
            use super::*;
            $crate::__batch_cases!(
                open = $open,
                batch = handlers::dedup_batch,
                fingerprint = handlers::dedup_batch_fingerprint,
                scope = "conf.batch.dedup",
                duplicates_run_the_body = false,
            );
            $crate::__unless_skipped!(sql, [$($skip),*],
                $crate::__batch_commit_failure_case!(open = $open, batch = handlers::dedup_batch_swallowing);
            );
        }

        $crate::__unless_skipped!(unique_constraint, [$($skip),*],
            mod batch_unique_constraint {
                use super::*;
                $crate::__batch_cases!(
                    open = $open,
                    batch = handlers::unique_batch,
                    fingerprint = handlers::dedup_batch_fingerprint,
                    scope = "conf.batch.unique",
                    duplicates_run_the_body = true,
                );
            }
        );

        mod retention {
            use super::*;
            $crate::__retention_cases!(open = $open);
        }

        mod batch_gate {
            use super::*;
            $crate::__batch_gate_cases!(open = $open);
        }

        $crate::__unless_skipped!(sql, [$($skip),*],
            mod sql {
                use super::*;
                $crate::__sql_cases!(open = $open);
            }
        );
    };
}

/// Implementation detail of [`conformance_suite!`]: the operator's side of the records table
/// (bounded purges, the background purger, stats, inspect), on every store. Each case keeps to
/// a scope of its own, so that the cases of a binary running at once do not see each other's
/// records.
#[doc(hidden)]
#[macro_export]
macro_rules! __retention_cases {
    (open = $open:expr) => {
        use ::idem_runtime::clock::{Clock as _, ManualClock};
        use ::idem_runtime::retention::{PurgeOptions, Purger, purge};
        use ::idem_runtime::store::Records as _;
        use ::idem_runtime::{Key, NoAck, Store as _};
        use ::std::time::Duration;
        use $crate::{Payment, unique_key};

        const HOUR: Duration = Duration::from_secs(3600);

        /// A scope no other case (or run) uses.
        fn own_scope(label: &str) -> &'static str {
            Box::leak(format!("conf.retention.{}", unique_key(label)).into_boxed_str())
        }

        async fn mark<S: ::idem_runtime::Store>(
            store: &S,
            scope: &'static str,
            keys: ::std::ops::Range<u32>,
            ttl: Option<Duration>,
        ) {
            let keys = keys
                .map(|n| Key::new(scope, &[("order_id", &format!("k{n:03}"))]).expect("key"))
                .collect::<Vec<_>>();
            store
                .mark_processed(keys, ttl)
                .await
                .expect("mark processed");
        }

        async fn scope_records<S: ::idem_runtime::store::Records>(
            store: &S,
            scope: &str,
        ) -> (u64, u64) {
            let stats = store.stats().await.expect("stats");
            stats
                .scopes
                .iter()
                .find(|line| line.scope == scope)
                .map_or((0, 0), |line| (line.records, line.expired))
        }

        /// 25 expired records go in batches of ten (10, 10, 5), each batch its own statement;
        /// the scope's records without a `ttl` stay.
        #[tokio::test]
        async fn a_purge_deletes_expired_records_in_bounded_batches() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let scope = own_scope("batches");
            mark(&store, scope, 0..25, Some(HOUR)).await;
            mark(&store, scope, 100..103, None).await;
            assert_eq!(scope_records(&store, scope).await, (28, 0));
            clock.advance(HOUR);
            assert_eq!(
                scope_records(&store, scope).await,
                (28, 25),
                "expired at the ttl"
            );
            let mut batches = Vec::new();
            let options = PurgeOptions::new().in_scope(scope).batch_size(10);
            let done = purge(&store, &options, |progress| {
                batches.push(progress.last_batch)
            })
            .await
            .expect("purge");
            assert_eq!(batches, [10, 10, 5]);
            assert_eq!(done.deleted, 25);
            assert_eq!(scope_records(&store, scope).await, (3, 0));
            let key = |n: u32| Key::new(scope, &[("order_id", &format!("k{n:03}"))]).expect("key");
            assert!(
                store
                    .inspect(scope, key(0).value())
                    .await
                    .expect("inspect")
                    .is_none()
            );
            assert!(
                store
                    .inspect(scope, key(100).value())
                    .await
                    .expect("inspect")
                    .is_some()
            );
        }

        /// `older_than` walks the scope's records by key and deletes those created before the
        /// cutoff, with or without a `ttl`; younger ones stay.
        #[tokio::test]
        async fn a_purge_by_age_deletes_old_records_kept_forever() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let scope = own_scope("age");
            mark(&store, scope, 0..9, None).await;
            clock.advance(2 * HOUR);
            mark(&store, scope, 50..53, None).await;
            let options = PurgeOptions::new()
                .in_scope(scope)
                .older_than(HOUR)
                .batch_size(4);
            let mut batches = Vec::new();
            let done = purge(&store, &options, |progress| {
                batches.push(progress.last_batch)
            })
            .await
            .expect("purge");
            assert_eq!(done.deleted, 9);
            // No expired record; then 4 + 4 + 1 old ones and the walk's empty end.
            assert_eq!(batches, [0, 4, 4, 1, 0]);
            assert_eq!(scope_records(&store, scope).await, (3, 0));
        }

        /// Stats count a scope's records, expired ones, oldest and newest; inspect shows one
        /// record's fingerprint, stored result and times.
        #[tokio::test]
        async fn stats_and_inspect_show_what_the_handlers_recorded() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let scope = own_scope("stats");
            let start = clock.now_ms();
            mark(&store, scope, 0..2, Some(HOUR)).await;
            clock.advance(HOUR);
            mark(&store, scope, 2..5, None).await;
            let stats = store.stats().await.expect("stats");
            let line = stats
                .scopes
                .iter()
                .find(|line| line.scope == scope)
                .expect("the scope's line");
            assert_eq!((line.records, line.expired), (5, 2));
            assert_eq!(
                (line.oldest_created_at_ms, line.newest_created_at_ms),
                (start, start + 3_600_000)
            );
            assert!(stats.records() >= 5 && stats.expired() >= 2);

            let key = unique_key("inspect");
            handlers::dedup_replay(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("replay");
            handlers::dedup_fingerprint(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("fingerprint");
            let replayed = store
                .inspect("conf.dedup.replay", &key)
                .await
                .expect("inspect")
                .expect("recorded");
            assert_eq!(replayed.response.as_deref(), Some("5"));
            assert_eq!(
                (
                    replayed.created_at_ms,
                    replayed.expires_at_ms,
                    replayed.expired
                ),
                (start + 3_600_000, None, false)
            );
            let fingerprinted = store
                .inspect("conf.dedup.fingerprint", &key)
                .await
                .expect("inspect")
                .expect("recorded");
            let expected =
                ::idem_runtime::fingerprint(&Payment::new(&key, 5)).expect("fingerprint");
            assert_eq!(
                fingerprinted.fingerprint.as_deref(),
                Some(expected.as_str())
            );
            assert!(
                store
                    .inspect("conf.dedup.replay", "never-seen")
                    .await
                    .expect("inspect")
                    .is_none()
            );
        }

        /// The background purger purges at once, then at every interval of the store's clock,
        /// and stops when asked.
        #[tokio::test]
        async fn the_purger_purges_in_the_background_until_stopped() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let scope = own_scope("purger");
            mark(&store, scope, 0..4, Some(HOUR)).await;
            clock.advance(HOUR);
            let purger = Purger::new(store.clone(), PurgeOptions::new().in_scope(scope))
                .every(HOUR)
                .spawn();
            let mut report = purger.report();
            $crate::within(
                "the first purge",
                report.wait_for(|report| report.runs >= 1),
            )
            .await
            .expect("first purge");
            assert_eq!(scope_records(&store, scope).await, (0, 0));
            mark(&store, scope, 10..13, Some(HOUR)).await;
            clock.advance(2 * HOUR);
            $crate::within(
                "a purge at the next interval",
                report.wait_for(|report| report.deleted == 7),
            )
            .await
            .expect("a purge at the next interval");
            let last = purger.stop().await;
            assert_eq!((last.deleted, last.failed_runs), (7, 0));
            assert_eq!(scope_records(&store, scope).await, (0, 0));
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: `Store::claim_batch`, the gate of a batch
/// of deliveries, on every store: duplicates inside a batch, a batch overlapping an earlier
/// one, a rolled-back batch, expired records in a batch, and concurrent batches sharing keys
/// (each key claimed once, no deadlock left unhandled).
#[doc(hidden)]
#[macro_export]
macro_rules! __batch_gate_cases {
    (open = $open:expr) => {
        use ::idem_runtime::clock::{Clock as _, ManualClock};
        use ::idem_runtime::store::{Claim, NewRecord};
        use ::idem_runtime::{Key, Store};
        use ::std::time::Duration;
        use $crate::unique_key;

        fn own_scope(label: &str) -> &'static str {
            Box::leak(format!("conf.batch.{}", unique_key(label)).into_boxed_str())
        }

        fn keys(scope: &'static str, ids: &[&str]) -> Vec<Key> {
            ids.iter()
                .map(|id| Key::new(scope, &[("order_id", id)]).expect("key"))
                .collect()
        }

        fn records<'k>(keys: &'k [Key], now_ms: i64, ttl_ms: Option<i64>) -> Vec<NewRecord<'k>> {
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

        /// Claims `keys` in one transaction and commits it.
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

        fn shape(claims: &[Claim]) -> Vec<&'static str> {
            claims
                .iter()
                .map(|claim| match claim {
                    Claim::Claimed => "claimed",
                    Claim::Existing(_) => "existing",
                })
                .collect()
        }

        #[tokio::test]
        async fn a_key_given_twice_in_a_batch_is_claimed_once() {
            let store = $open;
            let scope = own_scope("twice");
            let batch = keys(scope, &["a", "b", "a", "c", "b"]);
            let claims = claim_and_commit(&store, &batch, None).await;
            assert_eq!(
                shape(&claims),
                ["claimed", "claimed", "existing", "claimed", "existing"]
            );
            let again = claim_and_commit(&store, &keys(scope, &["c", "b", "a"]), None).await;
            assert_eq!(
                shape(&again),
                ["existing"; 3],
                "every key is recorded once, committed"
            );
        }

        /// Keys of two scopes in one batch (`mark_processed` takes any keys): the same id in
        /// each scope is two keys; what an earlier batch recorded in one scope is found there
        /// only, with its fingerprint. (On PostgreSQL a batch of one scope takes a shorter
        /// statement; this one takes the general one.)
        #[tokio::test]
        async fn a_batch_across_scopes_claims_each_scopes_key() {
            let store = $open;
            let (first, second) = (own_scope("scopes-1"), own_scope("scopes-2"));
            let earlier = keys(first, &["a"]);
            let mut tx = store.begin().await.expect("begin");
            let fingerprinted: Vec<NewRecord<'_>> = records(&earlier, store.now_ms(), None)
                .into_iter()
                .map(|record| NewRecord {
                    fingerprint: Some("f-1"),
                    ..record
                })
                .collect();
            store
                .claim_batch(&mut tx, &fingerprinted)
                .await
                .expect("claim");
            store.commit(tx).await.expect("commit");
            let mut batch = keys(second, &["a", "b"]);
            batch.extend(keys(first, &["b", "a"]));
            let claims = claim_and_commit(&store, &batch, None).await;
            assert_eq!(
                shape(&claims),
                ["claimed", "claimed", "claimed", "existing"]
            );
            match &claims[3] {
                Claim::Existing(found) => assert_eq!(found.fingerprint.as_deref(), Some("f-1")),
                other => panic!("{other:?}"),
            }
        }

        #[tokio::test]
        async fn a_batch_overlapping_an_earlier_one_claims_only_the_new_keys() {
            let store = $open;
            let scope = own_scope("overlap");
            claim_and_commit(&store, &keys(scope, &["a", "b", "c"]), None).await;
            let claims = claim_and_commit(&store, &keys(scope, &["d", "b", "e", "a"]), None).await;
            assert_eq!(
                shape(&claims),
                ["claimed", "existing", "claimed", "existing"]
            );
        }

        #[tokio::test]
        async fn a_rolled_back_batch_leaves_every_key_free() {
            let store = $open;
            let scope = own_scope("rollback");
            let batch = keys(scope, &["a", "b", "c"]);
            let mut tx = store.begin().await.expect("begin");
            let claims = store
                .claim_batch(&mut tx, &records(&batch, store.now_ms(), None))
                .await
                .expect("claim");
            assert_eq!(shape(&claims), ["claimed"; 3]);
            $crate::effects::rollback(&store, tx).await;
            let after = claim_and_commit(&store, &batch, None).await;
            assert_eq!(
                shape(&after),
                ["claimed"; 3],
                "nothing of the rolled-back batch stays"
            );
        }

        #[tokio::test]
        async fn expired_records_in_a_batch_are_taken_over() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let scope = own_scope("expired");
            claim_and_commit(&store, &keys(scope, &["a", "b"]), Some(3_600_000)).await;
            clock.advance(Duration::from_secs(3600));
            let claims =
                claim_and_commit(&store, &keys(scope, &["b", "c", "a"]), Some(3_600_000)).await;
            assert_eq!(shape(&claims), ["claimed"; 3]);
            let live = claim_and_commit(&store, &keys(scope, &["a"]), None).await;
            assert_eq!(
                shape(&live),
                ["existing"],
                "the take-over renewed the expiry"
            );
        }

        /// Four batches of the same 40 keys, each in its own order, at once: every key is
        /// claimed by exactly one of them, and none waits forever (a deadlock the database
        /// breaks is a retryable error: the batch runs again, as a broker would redeliver it).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_batches_sharing_keys_claim_each_key_once() {
            let store = $open;
            let scope = own_scope("concurrent");
            // Mixed case and accents: byte order and a database collation's order differ, and
            // the lock order must not depend on either.
            let ids: Vec<String> = (0..400)
                .map(|n| match n % 4 {
                    0 => format!("k{n:02}"),
                    1 => format!("K{n:02}"),
                    2 => format!("é{n:02}"),
                    _ => format!("e{n:02}ß"),
                })
                .collect();
            fn name_of<S: Store>(_: &S) -> &'static str {
                S::NAME
            }
            // Every batch opens its transaction, then all claim at once, so that their statements
            // overlap (not on SQLite, whose `BEGIN IMMEDIATE` admits one writer at a time).
            let overlap = name_of(&store) != "sqlite";
            let start = ::std::sync::Arc::new(::tokio::sync::Barrier::new(4));
            let tasks: Vec<_> = (0..4u64)
                .map(|task| {
                    let store = store.clone();
                    let start = ::std::sync::Arc::clone(&start);
                    // Each batch its own order: rotated, and every other one reversed.
                    let mut order: Vec<&str> = ids.iter().map(String::as_str).collect();
                    order.rotate_left(usize::try_from(task * 101).expect("small"));
                    if task % 2 == 1 {
                        order.reverse();
                    }
                    let batch = keys(scope, &order);
                    ::tokio::spawn(async move {
                        for attempt in 0..10 {
                            let mut tx = store.begin().await.expect("begin");
                            if attempt == 0 && overlap {
                                start.wait().await;
                            }
                            let claimed = store
                                .claim_batch(&mut tx, &records(&batch, store.now_ms(), None))
                                .await;
                            match claimed {
                                Ok(claims) => {
                                    store.commit(tx).await.expect("commit");
                                    let won = batch
                                        .iter()
                                        .zip(claims)
                                        .filter(|(_, claim)| matches!(claim, Claim::Claimed))
                                        .map(|(key, _)| key.value().to_owned())
                                        .collect::<Vec<_>>();
                                    return (won, attempt);
                                }
                                Err(error) => {
                                    assert!(
                                        ::idem_runtime::classify_sqlx_error(&error)
                                            == ::idem_runtime::Disposition::Retry,
                                        "only a retryable error may end a batch: {error}"
                                    );
                                    $crate::effects::rollback(&store, tx).await;
                                }
                            }
                        }
                        panic!("a batch kept failing");
                    })
                })
                .collect();
            let mut claimed: Vec<String> = Vec::new();
            let mut retries = 0;
            for task in tasks {
                let (won, retried) = $crate::within("a batch", task).await.expect("task");
                claimed.extend(won);
                retries += retried;
            }
            // PostgreSQL claims a batch's keys in one statement, in key order: batches sharing
            // keys wait for each other and never deadlock here (nothing expires or vanishes).
            // MariaDB may end one twin's lock upgrade as a deadlock (retried above).
            if name_of(&store) == "pg" {
                assert_eq!(retries, 0, "no PostgreSQL batch may deadlock or fail here");
            }
            claimed.sort();
            let mut expected: Vec<String> = ids
                .iter()
                .map(|id| {
                    Key::new(scope, &[("order_id", id)])
                        .expect("key")
                        .value()
                        .to_owned()
                })
                .collect();
            expected.sort();
            assert_eq!(claimed, expected, "each key claimed by exactly one batch");
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: emits its items unless `group` is in the
/// skip list.
#[doc(hidden)]
#[macro_export]
macro_rules! __unless_skipped {
    ($group:ident, [], $($items:tt)*) => { $($items)* };
    (unique_constraint, [unique_constraint $(, $rest:ident)*], $($items:tt)*) => {};
    (state_machine, [state_machine $(, $rest:ident)*], $($items:tt)*) => {};
    (sql, [sql $(, $rest:ident)*], $($items:tt)*) => {};
    ($group:ident, [$other:ident $(, $rest:ident)*], $($items:tt)*) => {
        $crate::__unless_skipped!($group, [$($rest),*], $($items)*);
    };
}

/// Implementation detail of [`conformance_suite!`]: the cases every strategy passes.
#[doc(hidden)]
#[macro_export]
macro_rules! __strategy_cases {
    (
        open = $open:expr,
        plain = $plain:path,
        plain_in_transaction = $in_transaction:path,
        replay = $replay:path,
        fingerprint = $fingerprint:path,
        plain_scope = $scope:literal,
        duplicates_run_the_body = $runs_on_duplicate:literal $(,)?
    ) => {
        use ::idem_runtime::{Error, NoAck, Outcome};
        use $crate::{AckEvent, Payment, RecordingAck, runs, unique_key};

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
            assert_eq!(runs(&key), 1);
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn sequential_duplicate_is_acked_and_commits_nothing() {
            let store = $open;
            let key = unique_key("seq");
            $plain(&store, Payment::new(&key, 10), NoAck)
                .await
                .expect("first delivery");
            let ack = RecordingAck::new();
            let again = $plain(&store, Payment::new(&key, 10), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(again, Outcome::Duplicate { replayed: None });
            assert_eq!(ack.events(), vec![AckEvent::Ack], "a duplicate is acked");
            // The pessimistic gate never runs the body of a duplicate; the optimistic one runs
            // it, and the constraint rolls it back.
            assert_eq!(runs(&key), if $runs_on_duplicate { 2 } else { 1 });
            assert_eq!(store.ledger_rows(&key).await, 1, "one body run committed");
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
            assert_eq!(store.ledger_rows(&key).await, 1, "one body run committed");
            if !$runs_on_duplicate {
                assert_eq!(
                    runs(&key),
                    1,
                    "twins wait on the gate and never run the body"
                );
            }
            for ack in &acks {
                assert_eq!(
                    ack.events(),
                    vec![AckEvent::Ack],
                    "every twin is acked once"
                );
            }
        }

        #[tokio::test]
        async fn in_the_callers_transaction_its_commit_makes_the_next_delivery_a_duplicate() {
            use ::idem_runtime::Store as _;
            let store = $open;
            let key = unique_key("caller-commits");
            let mut tx = store.begin().await.expect("the caller begins");
            let outcome = $in_transaction(&store, &mut tx, Payment::new(&key, 7))
                .await
                .expect("in the caller's transaction");
            assert_eq!(outcome, Outcome::Processed(7));
            assert_eq!(
                store.records($scope, &key).await,
                0,
                "nothing durable before the caller commits"
            );
            store.commit(tx).await.expect("the caller commits");
            assert_eq!(store.ledger_rows(&key).await, 1);
            let ack = RecordingAck::new();
            let again = $plain(&store, Payment::new(&key, 7), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(again, Outcome::Duplicate { replayed: None });
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            let mut tx = store.begin().await.expect("the caller begins");
            let in_caller = $in_transaction(&store, &mut tx, Payment::new(&key, 7))
                .await
                .expect("a duplicate in the caller's transaction");
            assert_eq!(in_caller, Outcome::Duplicate { replayed: None });
            store.commit(tx).await.expect("the caller commits");
            assert_eq!(runs(&key), if $runs_on_duplicate { 3 } else { 1 });
            assert_eq!(store.ledger_rows(&key).await, 1, "one body run committed");
        }

        #[tokio::test]
        async fn in_the_callers_transaction_its_rollback_records_nothing() {
            use ::idem_runtime::Store as _;
            let store = $open;
            let key = unique_key("caller-rolls-back");
            let mut tx = store.begin().await.expect("the caller begins");
            let outcome = $in_transaction(&store, &mut tx, Payment::new(&key, 7))
                .await
                .expect("in the caller's transaction");
            assert_eq!(outcome, Outcome::Processed(7));
            $crate::effects::rollback(&store, tx).await;
            assert_eq!(store.records($scope, &key).await, 0, "nothing recorded");
            assert_eq!(store.ledger_rows(&key).await, 0, "nothing written");
            let retried = $plain(&store, Payment::new(&key, 7), NoAck)
                .await
                .expect("the next delivery");
            assert_eq!(retried, Outcome::Processed(7), "is processed");
            assert_eq!(store.ledger_rows(&key).await, 1);
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
            assert!(ack.requeued_once(), "{:?}", ack.events());
            assert_eq!(store.ledger_rows(&key).await, 0, "the write rolled back");
            assert_eq!(
                store.records($scope, &key).await,
                0,
                "the record rolled back"
            );

            let ack = RecordingAck::at_attempt(2);
            let retried = $plain(&store, Payment::new(&key, 5), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(retried, Outcome::Processed(5));
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            assert_eq!(runs(&key), 2);
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn panicking_body_is_rolled_back_and_requeued() {
            let store = $open;
            let key = unique_key("panic");
            $crate::panic_on(&key);
            let ack = RecordingAck::new();
            let result = $plain(&store, Payment::new(&key, 5), ack.clone()).await;
            match &result {
                Err(Error::Panicked {
                    during: "body",
                    message,
                    ..
                }) => {
                    assert!(message.contains("injected panic"), "{message}")
                }
                other => panic!("expected Panicked, got {other:?}"),
            }
            assert!(result.as_ref().unwrap_err().is_retryable());
            assert!(
                ack.requeued_once(),
                "a panic settles the delivery: {:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 0, "the write rolled back");
            assert_eq!(
                store.records($scope, &key).await,
                0,
                "the record rolled back"
            );
            $crate::stop_panicking(&key);
            let retried = $plain(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("redelivery");
            assert!(retried.is_processed());
            assert_eq!(store.ledger_rows(&key).await, 1);
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
            assert_eq!(
                ack.events(),
                vec![AckEvent::Ack],
                "the ack was attempted after commit"
            );

            // The broker never heard the ack, so it redelivers.
            let ack = RecordingAck::at_attempt(2);
            let redelivered = $plain(&store, Payment::new(&key, 9), ack.clone())
                .await
                .expect("redelivery");
            assert!(redelivered.is_duplicate(), "{redelivered:?}");
            assert_eq!(ack.events(), vec![AckEvent::Ack]);
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn same_key_with_a_different_payload_is_dead_lettered() {
            let store = $open;
            let key = unique_key("mismatch");
            $fingerprint(&store, Payment::new(&key, 100), NoAck)
                .await
                .expect("first");
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
                ack.dead_lettered_with("payload mismatch"),
                "{:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn duplicate_replays_the_first_result() {
            let store = $open;
            let key = unique_key("replay");
            let first = $replay(&store, Payment::new(&key, 41), NoAck)
                .await
                .expect("first");
            assert_eq!(first, Outcome::Processed(41));
            // No fingerprint: a redelivery with other fields still gets the first result.
            let again = $replay(&store, Payment::new(&key, 99), NoAck)
                .await
                .expect("again");
            assert_eq!(again, Outcome::Duplicate { replayed: Some(41) });
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        /// A broker's-eye view: 40 keys, each delivered 4 times, all at once from 16 tasks;
        /// every fifth key's body fails once (requeued), every seventh key's first ack is lost
        /// (redelivered). Afterwards each key's body committed exactly once.
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
                    .flat_map(|(i, key)| {
                        (0..4).map(move |copy| (key.clone(), i % 7 == 0 && copy == 0))
                    })
                    .collect(),
            ));
            let processed = Arc::new(Mutex::new(Vec::new()));
            let workers: Vec<_> = (0..16)
                .map(|_| {
                    let (store, queue, processed) =
                        (store.clone(), Arc::clone(&queue), Arc::clone(&processed));
                    ::tokio::spawn(async move {
                        let mut deliveries = 0;
                        loop {
                            let next = queue.lock().expect("queue").pop();
                            let Some((key, lose_ack)) = next else { break };
                            deliveries += 1;
                            assert!(deliveries < 1_000, "the storm does not settle");
                            let ack = if lose_ack {
                                RecordingAck::losing_acks()
                            } else {
                                RecordingAck::new()
                            };
                            match $plain(&store, Payment::new(&key, 1), ack.clone()).await {
                                Ok(Outcome::Processed(_)) => {
                                    processed.lock().expect("processed").push(key.clone())
                                }
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
                assert_eq!(
                    store.ledger_rows(key).await,
                    1,
                    "one committed body run for {key}"
                );
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
            assert!(ack.dead_lettered_with("order_id"), "{:?}", ack.events());
        }

        #[tokio::test]
        async fn key_with_a_nul_is_dead_lettered_before_the_database_sees_it() {
            let store = $open;
            let key = format!("{}\0tail", unique_key("nul"));
            let ack = RecordingAck::new();
            let result = $plain(&store, Payment::new(&key, 1), ack.clone()).await;
            assert!(
                matches!(
                    &result,
                    Err(Error::Key(::idem_runtime::KeyError::Nul { .. }))
                ),
                "{result:?}"
            );
            assert!(ack.dead_lettered_with("NUL"), "{:?}", ack.events());
            assert_eq!(runs(&key), 0);
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: `dedup_table`'s own cases: expiry under a
/// controlled clock, take-overs and purges racing claims, retries that end.
#[doc(hidden)]
#[macro_export]
macro_rules! __dedup_table_cases {
    (open = $open:expr) => {
        use ::idem_runtime::clock::ManualClock;
        use ::std::time::Duration;

        const HOUR: Duration = Duration::from_secs(3600);

        #[tokio::test]
        async fn expired_record_no_longer_deduplicates() {
            $crate::init_tracing();
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let key = unique_key("ttl");
            let first = handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("first delivery");
            assert!(first.is_processed());
            clock.advance(HOUR - Duration::from_millis(1));
            let live = handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("redelivery within the ttl");
            assert!(
                live.is_duplicate(),
                "within the ttl the record counts: {live:?}"
            );
            clock.advance(Duration::from_millis(1));
            let after = handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("redelivery at the ttl");
            assert!(
                after.is_processed(),
                "an expired record must not deduplicate: {after:?}"
            );
            assert_eq!(store.ledger_rows(&key).await, 2);
            assert_eq!(
                store.records("conf.dedup.ttl", &key).await,
                1,
                "the expired record is taken over, not duplicated"
            );
            let renewed = handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("again");
            assert!(
                renewed.is_duplicate(),
                "the take-over renewed the expiry: {renewed:?}"
            );
        }

        #[tokio::test]
        async fn purge_expired_deletes_expired_records_only() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let expiring = unique_key("purge");
            let lasting = unique_key("keep");
            handlers::dedup_ttl(&store, Payment::new(&expiring, 1), NoAck)
                .await
                .expect("with a ttl");
            handlers::dedup(&store, Payment::new(&lasting, 1), NoAck)
                .await
                .expect("without a ttl");
            assert_eq!(store.records("conf.dedup.ttl", &expiring).await, 1);
            clock.advance(HOUR);
            let purged = store.purge().await;
            assert!(
                purged >= 1,
                "at least this test's expired record is purged: {purged}"
            );
            assert_eq!(store.records("conf.dedup.ttl", &expiring).await, 0);
            assert_eq!(
                store.records("conf.dedup", &lasting).await,
                1,
                "records without a ttl stay"
            );
        }

        /// Eight twins find the same expired record at once: exactly one takes it over and
        /// runs its body to commit; each other one is a duplicate, or a retryable error whose
        /// redelivery is a duplicate (MariaDB resolves the twins' lock upgrade as a deadlock).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_take_over_of_an_expired_record_runs_the_body_once() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let key = unique_key("takeover");
            handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("first");
            clock.advance(HOUR);
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (store, key) = (store.clone(), key.clone());
                    ::tokio::spawn(async move {
                        handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck).await
                    })
                })
                .collect();
            let (mut processed, mut retried) = (0, 0);
            for task in tasks {
                match task.await.expect("task") {
                    Ok(Outcome::Processed(_)) => processed += 1,
                    Ok(Outcome::Duplicate { .. }) => {}
                    Ok(other) => panic!("unexpected outcome {other:?}"),
                    Err(error) => {
                        assert!(error.is_retryable(), "{error}");
                        retried += 1;
                    }
                }
            }
            for _ in 0..retried {
                let again = handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                    .await
                    .expect("redelivery");
                assert!(again.is_duplicate(), "{again:?}");
            }
            assert_eq!(
                processed, 1,
                "exactly one twin takes the expired record over"
            );
            assert_eq!(
                store.ledger_rows(&key).await,
                2,
                "the first delivery and one take-over"
            );
        }

        /// Expired records being purged while their keys are redelivered: every redelivery
        /// processes (the key is free, whether purged or taken over) exactly once, and the
        /// purge never deletes a record a claim just renewed.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn purge_racing_claims_never_loses_or_doubles_a_key() {
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let keys: Vec<String> = (0..24).map(|_| unique_key("purge-race")).collect();
            for key in &keys {
                handlers::dedup_ttl(&store, Payment::new(key, 1), NoAck)
                    .await
                    .expect("first");
            }
            clock.advance(HOUR);
            let purger = {
                let store = store.clone();
                ::tokio::spawn(async move {
                    for _ in 0..20 {
                        store.purge().await;
                        ::tokio::task::yield_now().await;
                    }
                })
            };
            let deliveries: Vec<_> = keys
                .iter()
                .map(|key| {
                    let (store, key) = (store.clone(), key.clone());
                    ::tokio::spawn(async move {
                        loop {
                            match handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck).await {
                                Ok(outcome) => break outcome,
                                Err(error) => assert!(error.is_retryable(), "{error}"),
                            }
                        }
                    })
                })
                .collect();
            for delivery in deliveries {
                let outcome = delivery.await.expect("delivery");
                assert!(
                    outcome.is_processed(),
                    "an expired key is processed again: {outcome:?}"
                );
            }
            purger.await.expect("purger");
            store.purge().await;
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 2, "{key}");
                assert_eq!(
                    store.records("conf.dedup.ttl", key).await,
                    1,
                    "the renewed record survives purging"
                );
                let again = handlers::dedup_ttl(&store, Payment::new(key, 1), NoAck)
                    .await
                    .expect("again");
                assert!(again.is_duplicate());
            }
        }

        /// Keys are compared byte for byte on every store: a trailing space makes another key
        /// (MySQL's default PAD SPACE collations would make them one, and skip the second).
        #[tokio::test]
        async fn keys_differing_only_by_trailing_spaces_are_different_messages() {
            let store = $open;
            let key = unique_key("pad");
            let padded = format!("{key} ");
            let first = handlers::dedup(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("first");
            let second = handlers::dedup(&store, Payment::new(&padded, 1), NoAck)
                .await
                .expect("second");
            assert!(
                first.is_processed() && second.is_processed(),
                "{first:?} {second:?}"
            );
            assert_eq!((runs(&key), runs(&padded)), (1, 1));
            let again = handlers::dedup(&store, Payment::new(&padded, 1), NoAck)
                .await
                .expect("again");
            assert!(again.is_duplicate());
        }

        /// An operator forgets one message by its scope and its key as logged
        /// (`Store::forget`): its next delivery runs the body again, once; the first run's
        /// business rows stay; other scopes are untouched.
        #[tokio::test]
        async fn a_forgotten_key_is_processed_again() {
            use ::idem_runtime::Store as _;
            let store = $open;
            let order_id = unique_key("forget");
            handlers::dedup(&store, Payment::new(&order_id, 1), NoAck)
                .await
                .expect("first");
            let logged = ::idem_runtime::Key::new("conf.dedup", &[("order_id", &order_id)])
                .expect("a valid key");
            assert!(
                !store
                    .forget("conf.dedup.replay", logged.value())
                    .await
                    .expect("forget in another scope"),
                "another scope holds no record of this key"
            );
            assert!(
                handlers::dedup(&store, Payment::new(&order_id, 1), NoAck)
                    .await
                    .expect("duplicate")
                    .is_duplicate()
            );
            assert!(
                store
                    .forget(logged.scope(), logged.value())
                    .await
                    .expect("forget"),
                "the record existed"
            );
            assert_eq!(store.records("conf.dedup", &order_id).await, 0);
            assert!(
                !store
                    .forget(logged.scope(), logged.value())
                    .await
                    .expect("forget again"),
                "nothing left to forget"
            );
            let again = handlers::dedup(&store, Payment::new(&order_id, 1), NoAck)
                .await
                .expect("after forget");
            assert!(again.is_processed(), "{again:?}");
            assert_eq!(runs(&order_id), 2, "the body ran again");
            assert_eq!(
                store.ledger_rows(&order_id).await,
                2,
                "the first run's business rows stay"
            );
            let last = handlers::dedup(&store, Payment::new(&order_id, 1), NoAck)
                .await
                .expect("after the reprocessing");
            assert!(last.is_duplicate(), "{last:?}");
            assert_eq!(runs(&order_id), 2, "and only once");
        }

        /// The record keeps the store clock's time of the first write: read back by
        /// `find_record`, and returned by a later claim that finds it.
        #[tokio::test]
        async fn the_time_of_the_first_write_is_read_back() {
            use ::idem_runtime::Store as _;
            let clock = ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let order_id = unique_key("created");
            let first_write = store.now_ms();
            handlers::dedup_ttl(&store, Payment::new(&order_id, 1), NoAck)
                .await
                .expect("first");
            clock.advance(Duration::from_secs(90));
            assert!(
                handlers::dedup_ttl(&store, Payment::new(&order_id, 1), NoAck)
                    .await
                    .expect("duplicate")
                    .is_duplicate()
            );
            let key = ::idem_runtime::Key::new("conf.dedup.ttl", &[("order_id", &order_id)])
                .expect("a valid key");
            let record = store
                .find_record(&key, store.now_ms())
                .await
                .expect("read the record")
                .expect("a live record");
            assert_eq!(record.created_at_ms, first_write);
            match $crate::claim_and_roll_back(&store, &key).await {
                ::idem_runtime::store::Claim::Existing(existing) => {
                    assert_eq!(existing.created_at_ms, first_write);
                }
                other => panic!("the record exists: {other:?}"),
            }
            // A delivery that takes an expired record over writes it anew.
            clock.advance(HOUR);
            let take_over = store.now_ms();
            assert!(
                handlers::dedup_ttl(&store, Payment::new(&order_id, 1), NoAck)
                    .await
                    .expect("after expiry")
                    .is_processed()
            );
            let renewed = store
                .find_record(&key, store.now_ms())
                .await
                .expect("read the record")
                .expect("a live record");
            assert_eq!(renewed.created_at_ms, take_over);
        }

        /// A failure that never heals: requeued with a growing delay, then dead-lettered with
        /// the attempt count on the last attempt.
        #[tokio::test]
        async fn retries_end_after_max_attempts_with_growing_delays() {
            let store = $open;
            let key = unique_key("attempts");
            $crate::fail_always(&key);
            let mut delays = Vec::new();
            for attempt in 1..=2 {
                let ack = RecordingAck::at_attempt(attempt);
                let result =
                    handlers::dedup_three_attempts(&store, Payment::new(&key, 1), ack.clone())
                        .await;
                assert!(result.is_err());
                match ack.events().as_slice() {
                    [
                        AckEvent::Requeue {
                            attempt: told,
                            delay,
                        },
                    ] => {
                        assert_eq!(*told, attempt);
                        delays.push(*delay);
                    }
                    other => panic!("attempt {attempt} must be requeued: {other:?}"),
                }
            }
            assert!(
                delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1),
                "{delays:?}"
            );
            assert!(
                delays[1] >= Duration::from_secs(1) && delays[1] <= Duration::from_secs(2),
                "{delays:?}"
            );
            let ack = RecordingAck::at_attempt(3);
            let last =
                handlers::dedup_three_attempts(&store, Payment::new(&key, 1), ack.clone()).await;
            assert!(matches!(last, Err(Error::Handler(_))), "{last:?}");
            assert!(
                ack.dead_lettered_with("gave up after 3 attempts"),
                "{:?}",
                ack.events()
            );
            assert!(
                ack.dead_lettered_with("injected transient failure"),
                "{:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 0);
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: `unique_constraint`'s own cases.
#[doc(hidden)]
#[macro_export]
macro_rules! __unique_constraint_cases {
    (open = $open:expr, p1 = $p1:literal) => {
        #[tokio::test]
        async fn writes_no_dedup_record_without_replay_or_fingerprint() {
            let store = $open;
            let key = unique_key("norecord");
            handlers::unique(&store, Payment::new(&key, 3), NoAck)
                .await
                .expect("first delivery");
            assert_eq!(store.records("conf.unique", &key).await, 0);
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn violation_of_another_constraint_is_an_error_not_a_duplicate() {
            let store = $open;
            let receipt = unique_key("receipt");
            let mut first = Payment::new(unique_key("a"), 1);
            first.receipt = Some(receipt.clone());
            let mut second = Payment::new(unique_key("b"), 2);
            second.receipt = Some(receipt);
            handlers::unique(&store, first, NoAck).await.expect("first");
            let ack = RecordingAck::new();
            let result = handlers::unique(&store, second.clone(), ack.clone()).await;
            match &result {
                Err(Error::Handler($crate::AppError::Db(_))) => {}
                other => panic!("a receipt clash is not a duplicate of this order: {other:?}"),
            }
            assert!(
                matches!(ack.events().as_slice(), [AckEvent::DeadLetter(_)]),
                "{:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&second.order_id).await, 0);
        }

        /// With `fingerprint`, a duplicate whose record expired cannot be compared: a typed,
        /// permanent error, never a silent pass.
        #[tokio::test]
        async fn duplicate_whose_record_is_gone_cannot_pass_the_fingerprint_check() {
            let clock = ::idem_runtime::clock::ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let key = unique_key("gone-fp");
            handlers::unique_fingerprint(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("first");
            clock.advance(::std::time::Duration::from_secs(7200));
            let ack = RecordingAck::new();
            let result =
                handlers::unique_fingerprint(&store, Payment::new(&key, 6), ack.clone()).await;
            assert!(
                matches!(&result, Err(Error::UnverifiableDuplicate { .. })),
                "{result:?}"
            );
            assert!(
                ack.dead_lettered_with("cannot be compared"),
                "{:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        /// With `replay` alone, it is still a duplicate (the constraint proves it), with nothing
        /// to replay.
        #[tokio::test]
        async fn duplicate_whose_record_is_gone_replays_nothing() {
            let clock = ::idem_runtime::clock::ManualClock::starting_now();
            let store = $open.with_clock(clock.clone());
            let key = unique_key("gone-replay");
            handlers::unique_replay(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("first");
            clock.advance(::std::time::Duration::from_secs(7200));
            let again = handlers::unique_replay(&store, Payment::new(&key, 5), NoAck)
                .await
                .expect("again");
            assert_eq!(again, Outcome::Duplicate { replayed: None });
            assert_eq!(store.ledger_rows(&key).await, 1);
        }
    };
}

/// Implementation detail of [`conformance_suite!`]: `state_machine`'s cases.
#[doc(hidden)]
#[macro_export]
macro_rules! __state_machine_cases {
    (open = $open:expr, p1 = $p1:literal) => {
    use ::idem_runtime::{Error, NoAck, Outcome};
    use $crate::effects::SqlTestStore as _;
    use $crate::{AckEvent, Payment, RecordingAck, unique_key};

    async fn steps(store: &impl $crate::effects::TestStore, key: &str, step: &str) -> i64 {
        store.ledger_rows(&format!("{key}/{step}")).await
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
            assert!(ack.requeued_once(), "{:?}", ack.events());
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
            assert!(ack.requeued_once(), "{:?}", ack.events());
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
            assert!(ack.requeued_once(), "{:?}", ack.events());
            assert_eq!(store.status(&key).await.as_deref(), Some("pending"), "the transition rolled back");
            assert_eq!(steps(&store, &key, "paid").await, 0);

            let retried = handlers::sm_pay(&store, Payment::new(&key, 0), NoAck).await.expect("redelivery");
            assert!(retried.is_processed());
            assert_eq!(store.status(&key).await.as_deref(), Some("paid"));
        }

    /// `NotFound` and `TooEarly` follow the same retry policy as any retryable failure.
    #[tokio::test]
    async fn missing_entity_is_dead_lettered_after_max_attempts() {
        let store = $open;
        let key = unique_key("never");
        let ack = RecordingAck::at_attempt(1);
        let first = handlers::sm_pay_twice_at_most(&store, Payment::new(&key, 0), ack.clone()).await;
        assert!(matches!(first, Err(Error::NotFound { retryable: true, .. })), "{first:?}");
        assert!(ack.requeued_once(), "{:?}", ack.events());
        let ack = RecordingAck::at_attempt(2);
        let last = handlers::sm_pay_twice_at_most(&store, Payment::new(&key, 0), ack.clone()).await;
        assert!(matches!(last, Err(Error::NotFound { .. })), "{last:?}");
        assert!(ack.dead_lettered_with("gave up after 2 attempts"), "{:?}", ack.events());
    }
    };
}

/// Implementation detail of [`conformance_suite!`]: cases that need SQL against the store's
/// own database.
#[doc(hidden)]
#[macro_export]
macro_rules! __sql_cases {
    (open = $open:expr) => {
        use ::idem_runtime::{Error, NoAck, Outcome};
        use $crate::effects::SqlTestStore as _;
        use $crate::{Payment, RecordingAck, unique_key};

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

        /// A body that runs a failing statement and ignores the error: the database ends the
        /// transaction (PostgreSQL aborts it, MariaDB rolls it back on a deadlock, SQLite on
        /// `OR ROLLBACK`). The delivery must fail and be requeued, never acked; nothing is
        /// recorded; the redelivery with a healthy body processes once.
        async fn swallowed_failure_is_never_acked<S: $crate::effects::TestStore>(
            store: S,
            handler: impl AsyncFn(
                &S,
                Payment,
                RecordingAck,
            ) -> Result<Outcome<i64>, Error<$crate::AppError>>,
            scope: &str,
        ) {
            let key = unique_key("swallow");
            $crate::swallow_once(&key);
            let ack = RecordingAck::new();
            let result = handler(&store, Payment::new(&key, 3), ack.clone()).await;
            match &result {
                Err(error @ Error::TransactionAborted { .. }) => {
                    assert!(error.is_retryable());
                    assert!(
                        error
                            .to_string()
                            .contains("aborted by a failed statement the handler ignored"),
                        "{error}"
                    );
                }
                other => panic!(
                    "a transaction the database aborted must not count as committed: {other:?}"
                ),
            }
            assert!(
                ack.requeued_once(),
                "requeued, never acked: {:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 0, "nothing committed");
            assert_eq!(store.records(scope, &key).await, 0, "nothing recorded");
            let ack = RecordingAck::at_attempt(2);
            let healthy = handler(&store, Payment::new(&key, 3), ack.clone())
                .await
                .expect("redelivery");
            assert_eq!(healthy, Outcome::Processed(3));
            assert_eq!(ack.events(), vec![$crate::AckEvent::Ack]);
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn dedup_table_swallowed_failure_is_never_acked() {
            swallowed_failure_is_never_acked(
                $open,
                async |store, msg, ack| handlers::dedup_swallowing(store, msg, ack).await,
                "conf.dedup.swallow",
            )
            .await;
        }

        #[tokio::test]
        async fn unique_constraint_swallowed_failure_is_never_acked() {
            swallowed_failure_is_never_acked(
                $open,
                async |store, msg, ack| handlers::unique_swallowing(store, msg, ack).await,
                "conf.unique.swallow",
            )
            .await;
        }

        /// `unique_constraint` with `fingerprint` writes its record after the body: where the
        /// database runs statements in autocommit mode once it rolled the transaction back
        /// (MySQL, SQLite), that write must not commit on its own, or the redelivery would
        /// find the record and be acked as a duplicate of a message that never committed.
        #[tokio::test]
        async fn unique_constraint_record_is_not_written_after_a_swallowed_failure() {
            swallowed_failure_is_never_acked(
                $open,
                async |store, msg, ack| {
                    handlers::unique_fingerprint_swallowing(store, msg, ack).await
                },
                "conf.unique.swallow_fp",
            )
            .await;
        }

        /// The connection that carried an aborted transaction goes back to the pool in a state
        /// every later delivery can use.
        #[tokio::test]
        async fn the_connection_of_an_aborted_transaction_stays_usable() {
            let store = $open.single_connection().await;
            let key = unique_key("reuse");
            $crate::swallow_once(&key);
            let aborted = handlers::dedup_swallowing(&store, Payment::new(&key, 1), NoAck).await;
            assert!(
                matches!(aborted, Err(Error::TransactionAborted { .. })),
                "{aborted:?}"
            );
            for n in 0..3 {
                let next = unique_key("reuse-next");
                let outcome = handlers::dedup(&store, Payment::new(&next, n), NoAck)
                    .await
                    .expect("the next delivery on the same connection");
                assert!(outcome.is_processed());
            }
            let again = handlers::dedup_swallowing(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("redelivery");
            assert!(again.is_processed());
        }

        /// A stored result that no longer decodes into the handler's result type (it changed
        /// since the record was written) is a typed, permanent error: dead-lettered.
        #[tokio::test]
        async fn stored_result_that_no_longer_decodes_is_dead_lettered() {
            let store = $open;
            let key = unique_key("replay-type");
            handlers::dedup_replay(&store, Payment::new(&key, 41), NoAck)
                .await
                .expect("first");
            store
                .set_response("conf.dedup.replay", &key, "\"not a number\"")
                .await;
            let ack = RecordingAck::new();
            let result = handlers::dedup_replay(&store, Payment::new(&key, 41), ack.clone()).await;
            assert!(matches!(&result, Err(Error::Replay { .. })), "{result:?}");
            assert!(
                ack.dead_lettered_with("does not decode"),
                "{:?}",
                ack.events()
            );
            assert_eq!(store.ledger_rows(&key).await, 1);
        }
    };
}

/// Runs every statement a store makes on its records table (claim, read, take-over of an
/// expired record, stored result, purge, forget) through the conformance handlers
/// (`handlers::…` of the calling test target, which instantiates [`conformance_suite!`]), on
/// `$store`: proves that a table made some other way than the store's `migrate()` (the shipped
/// migration file, applied by another tool) is one the store accepts.
#[macro_export]
macro_rules! exercise_records_table {
    ($store:expr) => {{
        use ::idem_runtime::clock::ManualClock;
        use ::idem_runtime::{NoAck, Outcome, Store as _};
        use $crate::Payment;
        use $crate::effects::TestStore as _;

        let clock = ManualClock::starting_now();
        let store = $store.with_clock(clock.clone());
        let key = $crate::unique_key("records-table");
        let first = handlers::dedup_replay(&store, Payment::new(&key, 5), NoAck)
            .await
            .expect("first delivery");
        assert_eq!(first, Outcome::Processed(5));
        let again = handlers::dedup_replay(&store, Payment::new(&key, 6), NoAck)
            .await
            .expect("duplicate");
        assert_eq!(again, Outcome::Duplicate { replayed: Some(5) });

        let hours = |n: u64| ::std::time::Duration::from_secs(3600 * n);
        assert!(
            handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("with a ttl")
                .is_processed()
        );
        clock.advance(hours(2));
        assert!(
            handlers::dedup_ttl(&store, Payment::new(&key, 1), NoAck)
                .await
                .expect("after expiry")
                .is_processed(),
            "the expired record is taken over"
        );
        assert_eq!(store.records("conf.dedup.ttl", &key).await, 1);
        clock.advance(hours(2));
        assert!(store.purge().await >= 1);
        assert_eq!(store.records("conf.dedup.ttl", &key).await, 0);

        assert!(
            store
                .forget("conf.dedup.replay", &key)
                .await
                .expect("forget")
        );
        assert!(
            handlers::dedup_replay(&store, Payment::new(&key, 7), NoAck)
                .await
                .expect("after forget")
                .is_processed()
        );
        assert_eq!(
            store.ledger_rows(&key).await,
            4,
            "every processed delivery's row"
        );
    }};
}

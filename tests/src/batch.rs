//! The batch cases of the conformance suite (`#[idempotent(.., batch)]`), run on every store
//! for `dedup_table`, and for `unique_constraint` where the store has business tables.
//!
//! Each case counts body runs per message and ledger rows (the ledger has no unique key, so a
//! second committed run of a message shows), and what each delivery's acknowledger was told.

use idem_runtime::Outcome;

use crate::{AckEvent, Payment, RecordingAck};

/// A batch of deliveries of `ids`, each with an acknowledger to inspect afterwards.
pub fn deliveries(
    ids: &[String],
    amount: i64,
) -> (Vec<(Payment, RecordingAck)>, Vec<RecordingAck>) {
    let acks: Vec<RecordingAck> = ids.iter().map(|_| RecordingAck::new()).collect();
    let batch = ids
        .iter()
        .zip(&acks)
        .map(|(id, ack)| (Payment::new(id, amount), ack.clone()))
        .collect();
    (batch, acks)
}

/// `n` fresh keys with `label`.
pub fn fresh_keys(label: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| crate::unique_key(&format!("{label}-{i}")))
        .collect()
}

/// Whether every acknowledger was told exactly one thing: ack.
pub fn all_acked_once(acks: &[RecordingAck]) -> bool {
    acks.iter().all(|ack| ack.events() == vec![AckEvent::Ack])
}

/// What a batch's results come to: (processed, duplicates, failed).
pub fn tally<E>(results: &[Result<Outcome<()>, E>]) -> (usize, usize, usize) {
    let processed = results
        .iter()
        .filter(|result| matches!(result, Ok(outcome) if outcome.is_processed()))
        .count();
    let duplicates = results
        .iter()
        .filter(|result| matches!(result, Ok(outcome) if outcome.is_duplicate()))
        .count();
    (
        processed,
        duplicates,
        results.len() - processed - duplicates,
    )
}

/// Implementation detail of [`conformance_suite!`](crate::conformance_suite): the batch cases.
#[doc(hidden)]
#[macro_export]
macro_rules! __batch_cases {
    (
        open = $open:expr,
        batch = $batch:path,
        fingerprint = $fingerprint:path,
        scope = $scope:literal,
        duplicates_run_the_body = $runs_on_duplicate:literal $(,)?
    ) => {
        use ::idem_runtime::{Error, Outcome};
        use $crate::batch::{all_acked_once, deliveries, fresh_keys, tally};
        use $crate::{AckEvent, RecordingAck, runs};

        #[tokio::test]
        async fn a_batch_runs_the_body_once_commits_and_acks_every_delivery() {
            $crate::init_tracing();
            let store = $open;
            let keys = fresh_keys("batch-first", 10);
            let (batch, acks) = deliveries(&keys, 3);
            let results = $batch(&store, batch).await;
            assert_eq!(tally(&results), (10, 0, 0), "{results:?}");
            assert!(all_acked_once(&acks));
            for key in &keys {
                assert_eq!(runs(key), 1, "{key}: one body run");
                assert_eq!(store.ledger_rows(key).await, 1, "{key}");
            }
            // The whole batch again: every delivery a duplicate, and no body run.
            let (again, acks) = deliveries(&keys, 3);
            let results = $batch(&store, again).await;
            assert_eq!(tally(&results), (0, 10, 0), "{results:?}");
            assert!(all_acked_once(&acks));
            for key in &keys {
                if $runs_on_duplicate {
                    // The constraint refuses a part's write without saying which message's:
                    // the part is split down to each duplicate (10, 5, 3, 2, 1).
                    assert!((2..=6).contains(&runs(key)), "{key}: {}", runs(key));
                } else {
                    assert_eq!(runs(key), 1, "{key}: a duplicate never reaches the body");
                }
                assert_eq!(store.ledger_rows(key).await, 1, "{key}");
            }
        }

        #[tokio::test]
        async fn a_key_twice_in_a_batch_is_processed_once() {
            let store = $open;
            let keys = fresh_keys("batch-twins", 3);
            let ids = [&keys[0], &keys[1], &keys[0], &keys[2], &keys[0]].map(Clone::clone);
            let (batch, acks) = deliveries(&ids, 4);
            let results = $batch(&store, batch).await;
            assert_eq!(results[0].as_ref().ok(), Some(&Outcome::Processed(())));
            assert_eq!(
                results[2].as_ref().ok(),
                Some(&Outcome::Duplicate { replayed: None })
            );
            assert_eq!(
                results[4].as_ref().ok(),
                Some(&Outcome::Duplicate { replayed: None })
            );
            assert_eq!(tally(&results), (3, 2, 0), "{results:?}");
            assert!(all_acked_once(&acks), "twins are acked too");
            assert_eq!(runs(&keys[0]), 1, "the body got the key once");
            assert_eq!(store.ledger_rows(&keys[0]).await, 1);
        }

        #[tokio::test]
        async fn a_batch_overlapping_an_earlier_one_processes_only_the_new_keys() {
            let store = $open;
            let keys = fresh_keys("batch-overlap", 4);
            let (first, _) = deliveries(&keys[..3], 5);
            assert_eq!(tally(&$batch(&store, first).await), (3, 0, 0));
            let (second, acks) = deliveries(&keys[1..], 5);
            let results = $batch(&store, second).await;
            let outcomes: Vec<Option<&Outcome<()>>> =
                results.iter().map(|result| result.as_ref().ok()).collect();
            assert_eq!(
                outcomes,
                [
                    Some(&Outcome::Duplicate { replayed: None }),
                    Some(&Outcome::Duplicate { replayed: None }),
                    Some(&Outcome::Processed(())),
                ]
            );
            assert!(all_acked_once(&acks));
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 1, "{key}");
            }
            assert_eq!(runs(&keys[3]), 1);
            if !$runs_on_duplicate {
                assert_eq!(runs(&keys[1]), 1, "a duplicate never reaches the body");
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_batches_sharing_keys_process_each_key_once() {
            let store = $open;
            let keys = fresh_keys("batch-race", 20);
            // Four batches of the same keys, each in another order.
            let orders: Vec<Vec<String>> = (0..4)
                .map(|turn| {
                    let mut ids = keys.clone();
                    ids.rotate_left(turn * 5);
                    if turn % 2 == 1 {
                        ids.reverse();
                    }
                    ids
                })
                .collect();
            let tasks: Vec<_> = orders
                .into_iter()
                .map(|ids| {
                    let store = store.clone();
                    ::tokio::spawn(async move {
                        let (batch, acks) = deliveries(&ids, 6);
                        ($batch(&store, batch).await, acks)
                    })
                })
                .collect();
            let mut processed = 0;
            let mut duplicates = 0;
            for task in tasks {
                let (results, acks) = $crate::within("a racing batch", task)
                    .await
                    .expect("the batch's task");
                let (p, d, failed) = tally(&results);
                assert_eq!(
                    failed, 0,
                    "no delivery failed (no deadlock escaped): {results:?}"
                );
                assert!(all_acked_once(&acks));
                processed += p;
                duplicates += d;
            }
            assert_eq!((processed, duplicates), (20, 60));
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 1, "{key}: one committed run");
                if !$runs_on_duplicate {
                    assert_eq!(runs(key), 1, "{key}: the gate held the racing batches back");
                }
            }
        }

        #[tokio::test]
        async fn one_poison_message_in_a_batch_of_100_does_not_block_the_rest() {
            let store = $open;
            let keys = fresh_keys("batch-poison", 100);
            let poison = &keys[37];
            $crate::fail_always(poison);
            let (batch, acks) = deliveries(&keys, 1);
            let results = $batch(&store, batch).await;
            assert_eq!(tally(&results), (99, 0, 1), "{results:?}");
            assert!(
                matches!(
                    &results[37],
                    Err(Error::Handler($crate::AppError::Transient(_)))
                ),
                "{:?}",
                results[37]
            );
            assert!(
                acks[37].requeued_once(),
                "the poison follows the usual rules: {:?}",
                acks[37].events()
            );
            for (i, key) in keys.iter().enumerate() {
                if i != 37 {
                    assert_eq!(acks[i].events(), vec![AckEvent::Ack], "{key}");
                    assert_eq!(store.ledger_rows(key).await, 1, "{key}: committed once");
                }
            }
            assert_eq!(
                store.ledger_rows(poison).await,
                0,
                "the poison's write rolled back"
            );
            // Split in halves: the poison ran in at most 8 parts (100, 50, 25, 13, 7, 4, 2, 1).
            assert!(runs(poison) <= 8, "{}", runs(poison));
            // Its last delivery dead-letters it, on its own.
            let last = RecordingAck::at_attempt(10);
            let (mut batch, _) = deliveries(&keys[30..40], 1);
            batch[7].1 = last.clone();
            let results = $batch(&store, batch).await;
            assert_eq!(tally(&results), (0, 9, 1), "{results:?}");
            assert!(
                last.dead_lettered_with("injected transient failure"),
                "{:?}",
                last.events()
            );
            assert_eq!(store.ledger_rows(poison).await, 0);
        }

        #[tokio::test]
        async fn a_panic_in_a_batch_settles_only_its_message() {
            let store = $open;
            let keys = fresh_keys("batch-panic", 6);
            $crate::panic_on(&keys[2]);
            let (batch, acks) = deliveries(&keys, 1);
            let results = $batch(&store, batch).await;
            $crate::stop_panicking(&keys[2]);
            assert_eq!(tally(&results), (5, 0, 1), "{results:?}");
            assert!(
                matches!(&results[2], Err(Error::Panicked { during: "body", .. })),
                "{:?}",
                results[2]
            );
            assert!(acks[2].requeued_once(), "{:?}", acks[2].events());
            assert_eq!(store.ledger_rows(&keys[2]).await, 0);
            let (again, _) = deliveries(&keys[2..3], 1);
            assert_eq!(tally(&$batch(&store, again).await), (1, 0, 0));
            assert_eq!(store.ledger_rows(&keys[2]).await, 1);
        }

        #[tokio::test]
        async fn a_lost_ack_after_a_batch_commit_makes_the_redelivery_a_duplicate() {
            let store = $open;
            let keys = fresh_keys("batch-lostack", 5);
            let acks: Vec<RecordingAck> =
                keys.iter().map(|_| RecordingAck::losing_acks()).collect();
            let batch = keys
                .iter()
                .zip(&acks)
                .map(|(key, ack)| ($crate::Payment::new(key, 2), ack.clone()))
                .collect();
            let results = $batch(&store, batch).await;
            assert_eq!(
                tally(&results),
                (5, 0, 0),
                "a lost ack is not a handling failure"
            );
            assert!(
                all_acked_once(&acks),
                "every ack was attempted after the commit"
            );
            let (again, acks) = deliveries(&keys, 2);
            assert_eq!(tally(&$batch(&store, again).await), (0, 5, 0));
            assert!(all_acked_once(&acks));
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 1, "{key}");
            }
        }

        #[tokio::test]
        async fn a_bad_key_in_a_batch_is_dead_lettered_alone() {
            let store = $open;
            let keys = fresh_keys("batch-badkey", 3);
            let ids = [
                keys[0].clone(),
                String::new(),
                keys[1].clone(),
                keys[2].clone(),
            ];
            let (batch, acks) = deliveries(&ids, 1);
            let results = $batch(&store, batch).await;
            assert!(
                matches!(&results[1], Err(Error::Key(_))),
                "{:?}",
                results[1]
            );
            assert!(
                matches!(acks[1].events().as_slice(), [AckEvent::DeadLetter(_)]),
                "{:?}",
                acks[1].events()
            );
            assert_eq!(tally(&results), (3, 0, 1));
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 1, "{key}");
            }
        }

        #[tokio::test]
        async fn a_twin_with_another_payload_is_dead_lettered() {
            let store = $open;
            let key = $crate::unique_key("batch-mismatch");
            let acks: Vec<RecordingAck> = (0..3).map(|_| RecordingAck::new()).collect();
            let batch = vec![
                ($crate::Payment::new(&key, 1), acks[0].clone()),
                ($crate::Payment::new(&key, 2), acks[1].clone()),
                ($crate::Payment::new(&key, 1), acks[2].clone()),
            ];
            let results = $fingerprint(&store, batch).await;
            assert_eq!(results[0].as_ref().ok(), Some(&Outcome::Processed(())));
            assert!(
                matches!(&results[1], Err(Error::PayloadMismatch { .. })),
                "{:?}",
                results[1]
            );
            assert_eq!(
                results[2].as_ref().ok(),
                Some(&Outcome::Duplicate { replayed: None })
            );
            assert!(
                acks[1].dead_lettered_with("payload"),
                "{:?}",
                acks[1].events()
            );
            // And against a committed record, in a later batch.
            let later = vec![($crate::Payment::new(&key, 3), RecordingAck::new())];
            let results = $fingerprint(&store, later).await;
            assert!(
                matches!(&results[0], Err(Error::PayloadMismatch { .. })),
                "{results:?}"
            );
            assert_eq!(store.ledger_rows(&key).await, 1);
        }

        #[tokio::test]
        async fn an_empty_batch_does_nothing() {
            let store = $open;
            let results = $batch(&store, Vec::<($crate::Payment, RecordingAck)>::new()).await;
            assert!(results.is_empty());
        }
    };
}

/// Implementation detail of [`conformance_suite!`](crate::conformance_suite): a batch whose
/// commit fails (the body swallowed a failed statement, so the transaction is gone) acks
/// nothing of it, and its messages are processed once each, in smaller parts.
#[doc(hidden)]
#[macro_export]
macro_rules! __batch_commit_failure_case {
    (open = $open:expr, batch = $batch:path) => {
        #[tokio::test]
        async fn a_batch_whose_commit_fails_is_split_and_nothing_is_acked_before_a_commit() {
            let store = $open;
            let keys = $crate::batch::fresh_keys("batch-commit-fails", 8);
            $crate::swallow_once(&keys[5]);
            let (batch, acks) = $crate::batch::deliveries(&keys, 1);
            let results = $batch(&store, batch).await;
            assert_eq!($crate::batch::tally(&results), (8, 0, 0), "{results:?}");
            assert!(
                $crate::batch::all_acked_once(&acks),
                "acked once each, after a commit"
            );
            for key in &keys {
                assert_eq!(store.ledger_rows(key).await, 1, "{key}: committed once");
                assert_eq!(
                    $crate::runs(key),
                    2,
                    "{key}: the failed part, then a half that committed"
                );
            }
        }
    };
}

//! A review of batch mode (`#[idempotent(.., batch)]`), against the live services: cases the
//! batch suites do not cover, each trying to make a plausible batch handler lose a message,
//! process one twice, ack before a commit, leave a delivery unsettled or panic.
//!
//! Four of them failed when written, each on a defect since fixed: RabbitMQ `multiple` acks of
//! two batches racing (a batch's tags were forgotten before its ack was sent), runners
//! panicking on `max_size(usize::MAX)`, a deferred RabbitMQ ack that failed counted as acked,
//! and the batch span's `parts` never recorded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions, ConsumerStats};
use idem_runtime::{Error, Outcome, PgStore, PgTx, idempotent};
use idem_tests::batch::{all_acked_once, deliveries, fresh_keys, tally};
use idem_tests::effects::{Effects as _, TestStore as _};
use idem_tests::{AckEvent, AppError, Payment, RecordingAck, count_run, latch, runs, within};

// ---------------------------------------------------------------------------------------------
// Handlers

/// Keys whose next body runs panic, and how many more times.
fn panics() -> &'static Mutex<HashMap<String, u32>> {
    static KEYS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    KEYS.get_or_init(Mutex::default)
}

fn panic_times(key: &str, times: u32) {
    panics()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned(), times);
}

/// Whether this run of `key` panics (counting it down).
fn should_panic(key: &str) -> bool {
    let mut panics = panics().lock().unwrap_or_else(PoisonError::into_inner);
    match panics.get_mut(key) {
        Some(left) if *left > 0 => {
            *left -= 1;
            true
        }
        _ => false,
    }
}

/// Keys whose next body run waits: it opens `<key>.started` and waits for `<key>.released`.
fn held() -> &'static Mutex<HashSet<String>> {
    static KEYS: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    KEYS.get_or_init(Mutex::default)
}

fn take(set: &Mutex<HashSet<String>>, key: &str) -> bool {
    set.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(key)
}

fn put(set: &Mutex<HashSet<String>>, key: &str) {
    set.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned());
}

/// Counts each message's run, writes its ledger row, then panics or waits where a test asked.
async fn work(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    for msg in msgs {
        count_run(&msg.order_id);
        tx.ledger(&msg.order_id, msg.amount).await?;
    }
    for msg in msgs {
        assert!(
            !should_panic(&msg.order_id),
            "injected panic for order {}",
            msg.order_id
        );
        if take(held(), &msg.order_id) {
            latch(&format!("{}.started", msg.order_id)).open();
            latch(&format!("{}.released", msg.order_id)).wait().await;
        }
        idem_tests::maybe_fail(&msg.order_id)?;
    }
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "review.batch.dedup",
    batch
)]
async fn review_batch(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    work(tx, msgs).await
}

#[idempotent(
    key = "$message_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "review.batch.message_id",
    batch
)]
async fn review_by_message_id(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    work(tx, msgs).await
}

/// The payment row (unique order id: the gate), then the ledger row.
async fn pay(tx: &mut PgTx<'_>, table: &str, msgs: &[Payment]) -> Result<(), AppError> {
    for msg in msgs {
        count_run(&msg.order_id);
        let receipt = msg
            .receipt
            .clone()
            .unwrap_or_else(|| idem_tests::unique_key("receipt"));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (order_id, amount, receipt) VALUES ($1, $2, $3)"
        )))
        .bind(&msg.order_id)
        .bind(msg.amount)
        .bind(receipt)
        .execute(&mut **tx)
        .await?;
        tx.ledger(&msg.order_id, msg.amount).await?;
    }
    Ok(())
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "unique_constraint",
    constraint = "idem_conf_payments_order_id_key",
    scope = "review.batch.unique.fingerprint",
    fingerprint,
    batch
)]
async fn review_unique_fingerprint(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    pay(tx, "idem_conf_payments", msgs).await
}

/// A table whose order id is unique at commit only (`DEFERRABLE INITIALLY DEFERRED`): the
/// violation surfaces as the commit's error.
const DEFERRED_TABLE: &str = "review_deferred_payments";

async fn create_deferred_table(store: &PgStore) {
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(7280321149621735099)")
        .execute(&mut *tx)
        .await
        .expect("lock");
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS review_deferred_payments (
            order_id VARCHAR(255) NOT NULL,
            amount   BIGINT       NOT NULL,
            receipt  VARCHAR(255) NOT NULL,
            CONSTRAINT review_deferred_payments_order_id_key UNIQUE (order_id)
                DEFERRABLE INITIALLY DEFERRED
        )",
    )
    .execute(&mut *tx)
    .await
    .expect("create the deferred table");
    tx.commit().await.expect("commit");
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "unique_constraint",
    constraint = "review_deferred_payments_order_id_key",
    scope = "review.batch.unique.deferred",
    batch
)]
async fn review_deferred(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    pay(tx, DEFERRED_TABLE, msgs).await
}

// ---------------------------------------------------------------------------------------------
// The pipeline, on PostgreSQL (what held)

/// `unique_constraint` with `fingerprint` in a batch (the batch suites check twins with another
/// payload under `dedup_table` only): the first copy is processed, a copy with another payload
/// is dead-lettered, a copy with the same payload is a duplicate; later, against the committed
/// record, another payload is dead-lettered and the same one is a duplicate.
#[tokio::test]
async fn unique_constraint_with_fingerprint_twins_follow_their_first_copy() {
    let store = idem_tests::pg::store().await;
    let key = idem_tests::unique_key("review-unique-fp");
    let other = idem_tests::unique_key("review-unique-fp-other");
    let acks: Vec<RecordingAck> = (0..4).map(|_| RecordingAck::new()).collect();
    let batch = vec![
        (Payment::new(&key, 1), acks[0].clone()),
        (Payment::new(&key, 2), acks[1].clone()),
        (Payment::new(&other, 7), acks[2].clone()),
        (Payment::new(&key, 1), acks[3].clone()),
    ];
    let results = review_unique_fingerprint(&store, batch).await;
    assert_eq!(results[0].as_ref().ok(), Some(&Outcome::Processed(())));
    assert!(
        matches!(&results[1], Err(Error::PayloadMismatch { .. })),
        "{results:?}"
    );
    assert_eq!(results[2].as_ref().ok(), Some(&Outcome::Processed(())));
    assert_eq!(
        results[3].as_ref().ok(),
        Some(&Outcome::Duplicate { replayed: None })
    );
    assert!(
        acks[1].dead_lettered_with("payload"),
        "{:?}",
        acks[1].events()
    );
    for i in [0, 2, 3] {
        assert_eq!(acks[i].events(), [AckEvent::Ack], "{i}");
    }
    assert_eq!(store.ledger_rows(&key).await, 1);
    assert_eq!(store.ledger_rows(&other).await, 1);

    let later = vec![
        (Payment::new(&key, 3), RecordingAck::new()),
        (Payment::new(&other, 7), RecordingAck::new()),
    ];
    let results = review_unique_fingerprint(&store, later).await;
    assert!(
        matches!(&results[0], Err(Error::PayloadMismatch { .. })),
        "{results:?}"
    );
    assert_eq!(
        results[1].as_ref().ok(),
        Some(&Outcome::Duplicate { replayed: None })
    );
    assert_eq!(store.ledger_rows(&key).await, 1);
    assert_eq!(store.ledger_rows(&other).await, 1);
}

/// A deferred unique constraint: a redelivered message hidden among fresh ones fails the
/// batch's commit, not its body. The batch is split; the fresh ones commit, the redelivery is
/// a duplicate, acked, and nothing was acked before a commit.
#[tokio::test]
async fn a_deferred_constraint_failing_the_batch_commit_splits_it_and_finds_the_duplicate() {
    let store = idem_tests::pg::store().await;
    create_deferred_table(&store).await;
    let keys = fresh_keys("review-deferred", 5);
    let (first, _) = deliveries(&keys[2..3], 1);
    assert_eq!(tally(&review_deferred(&store, first).await), (1, 0, 0));

    let (batch, acks) = deliveries(&keys, 1);
    let results = review_deferred(&store, batch).await;
    assert_eq!(tally(&results), (4, 1, 0), "{results:?}");
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&Outcome::Duplicate { replayed: None })
    );
    assert!(all_acked_once(&acks));
    for key in &keys {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}");
    }
}

/// `key = "$message_id"` in a batch: two deliveries of one broker message (a producer's
/// retried publish) are one message; a delivery without an id is dead-lettered alone.
#[tokio::test]
async fn message_id_keys_in_a_batch() {
    let store = idem_tests::pg::store().await;
    let ids = [
        idem_tests::unique_key("review-mid-a"),
        idem_tests::unique_key("review-mid-b"),
    ];
    let orders = fresh_keys("review-mid-order", 4);
    let acks = [
        RecordingAck::with_message_id(&ids[0]),
        RecordingAck::with_message_id(&ids[1]),
        RecordingAck::new(),
        RecordingAck::with_message_id(&ids[0]),
    ];
    let batch: Vec<(Payment, RecordingAck)> = orders
        .iter()
        .zip(&acks)
        .map(|(order, ack)| (Payment::new(order, 1), ack.clone()))
        .collect();
    let results = review_by_message_id(&store, batch).await;
    assert_eq!(results[0].as_ref().ok(), Some(&Outcome::Processed(())));
    assert_eq!(results[1].as_ref().ok(), Some(&Outcome::Processed(())));
    assert!(matches!(&results[2], Err(Error::Key(_))), "{results:?}");
    assert_eq!(
        results[3].as_ref().ok(),
        Some(&Outcome::Duplicate { replayed: None })
    );
    assert!(matches!(
        acks[2].events().as_slice(),
        [AckEvent::DeadLetter(_)]
    ));
    assert_eq!(runs(&orders[3]), 0, "the copy never reached the body");
}

/// The first copy of a key panics in every part it runs in, down to its own (the batch of
/// three, then a half of two, then alone: three runs); its later copy in the same batch then
/// runs on its own and commits, the panicking copy is requeued, and its redelivery is a
/// duplicate.
#[tokio::test]
async fn a_twin_whose_first_copy_panics_is_processed_once() {
    let store = idem_tests::pg::store().await;
    let keys = fresh_keys("review-twin-panic", 3);
    panic_times(&keys[1], 3);
    let ids = [&keys[0], &keys[1], &keys[2], &keys[1]].map(Clone::clone);
    let (batch, acks) = deliveries(&ids, 1);
    let results = review_batch(&store, batch).await;
    assert!(
        matches!(&results[1], Err(Error::Panicked { during: "body", .. })),
        "{results:?}"
    );
    assert!(acks[1].requeued_once(), "{:?}", acks[1].events());
    assert_eq!(results[3].as_ref().ok(), Some(&Outcome::Processed(())));
    assert_eq!(tally(&results), (3, 0, 1));
    for key in &keys {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}");
    }
    let (again, acks) = deliveries(&keys[1..2], 1);
    assert_eq!(tally(&review_batch(&store, again).await), (0, 1, 0));
    assert!(all_acked_once(&acks));
}

/// A key twice in a batch whose first copy is at its last attempt and fails: the first copy is
/// dead-lettered, and the later copy (a delivery of its own, attempt 1) runs on its own and is
/// requeued; nothing is committed, nothing acked.
#[tokio::test]
async fn a_twin_whose_first_copy_is_dead_lettered_runs_on_its_own() {
    let store = idem_tests::pg::store().await;
    let keys = fresh_keys("review-twin-dl", 3);
    idem_tests::fail_always(&keys[0]);
    let last = RecordingAck::at_attempt(10);
    let later = RecordingAck::at_attempt(1);
    let ok = [RecordingAck::new(), RecordingAck::new()];
    let batch = vec![
        (Payment::new(&keys[0], 1), last.clone()),
        (Payment::new(&keys[1], 1), ok[0].clone()),
        (Payment::new(&keys[0], 1), later.clone()),
        (Payment::new(&keys[2], 1), ok[1].clone()),
    ];
    let results = review_batch(&store, batch).await;
    assert_eq!(tally(&results), (2, 0, 2), "{results:?}");
    assert!(last.dead_lettered_with("injected"), "{:?}", last.events());
    assert!(later.requeued_once(), "{:?}", later.events());
    assert!(all_acked_once(&ok));
    assert_eq!(store.ledger_rows(&keys[0]).await, 0);
}

/// An order id whose key text panics for ids starting with `boom`: user code (`KeyPart`).
#[derive(Debug, Clone)]
struct OddId(String);

impl idem_runtime::KeyPart for OddId {
    fn write_key_part(&self, out: &mut String) {
        assert!(
            !self.0.starts_with("boom"),
            "KeyPart panicked for {}",
            self.0
        );
        out.push_str(&self.0);
    }
}

/// A message whose `Serialize` (its fingerprint) panics when `boom_fingerprint`, and whose body
/// fails with an error whose `Display` panics when `boom_display`.
#[derive(Debug, Clone)]
struct Odd {
    id: OddId,
    boom_fingerprint: bool,
    boom_display: bool,
}

impl serde::Serialize for Odd {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        assert!(
            !self.boom_fingerprint,
            "Serialize panicked for {}",
            self.id.0
        );
        serializer.serialize_str(&self.id.0)
    }
}

#[derive(Debug)]
enum OddError {
    Db(sqlx::Error),
    Shy,
}

impl std::fmt::Display for OddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Db(error) => write!(f, "{error}"),
            Self::Shy => panic!("Display panicked"),
        }
    }
}

impl std::error::Error for OddError {}

impl idem_runtime::HandlerError for OddError {}

#[idempotent(
    key = "id",
    store = "pg",
    strategy = "dedup_table",
    scope = "review.batch.odd",
    fingerprint,
    batch
)]
async fn review_odd(tx: &mut PgTx<'_>, msgs: &[Odd]) -> Result<(), OddError> {
    for msg in msgs {
        count_run(&msg.id.0);
        tx.ledger(&msg.id.0, 1).await.map_err(|error| match error {
            AppError::Db(error) => OddError::Db(error),
            AppError::Transient(_) => OddError::Shy,
        })?;
        if msg.boom_display {
            return Err(OddError::Shy);
        }
    }
    Ok(())
}

/// User code panics while a batch is prepared and run: a key part, a payload's `Serialize` (the
/// fingerprint), an error's `Display`. Each panic settles its own delivery; the rest commit.
#[tokio::test]
async fn panics_in_user_code_settle_only_their_delivery() {
    let store = idem_tests::pg::store().await;
    let ok = fresh_keys("review-odd-ok", 3);
    let odd = |id: String, boom_fingerprint: bool, boom_display: bool| Odd {
        id: OddId(id),
        boom_fingerprint,
        boom_display,
    };
    let shy = idem_tests::unique_key("review-odd-shy");
    let acks: Vec<RecordingAck> = (0..6).map(|_| RecordingAck::new()).collect();
    let batch = vec![
        (odd(ok[0].clone(), false, false), acks[0].clone()),
        (
            odd(format!("boom-{}", ok[0]), false, false),
            acks[1].clone(),
        ),
        (odd(ok[1].clone(), false, false), acks[2].clone()),
        (
            odd(idem_tests::unique_key("review-odd-fp"), true, false),
            acks[3].clone(),
        ),
        (odd(shy.clone(), false, true), acks[4].clone()),
        (odd(ok[2].clone(), false, false), acks[5].clone()),
    ];
    let results = review_odd(&store, batch).await;
    assert!(
        matches!(&results[1], Err(Error::Panicked { during: "key", .. })),
        "{results:?}"
    );
    assert!(
        matches!(
            &results[3],
            Err(Error::Panicked {
                during: "fingerprint",
                ..
            })
        ),
        "{results:?}"
    );
    assert!(matches!(&results[4], Err(Error::Handler(OddError::Shy))));
    assert!(acks[4].requeued_once(), "{:?}", acks[4].events());
    for i in [0, 2, 5] {
        assert_eq!(
            results[i].as_ref().ok(),
            Some(&Outcome::Processed(())),
            "{i}"
        );
        assert_eq!(acks[i].events(), [AckEvent::Ack], "{i}");
    }
    for i in [1, 3] {
        assert_eq!(
            acks[i].events().len(),
            1,
            "{i}: settled once: {:?}",
            acks[i].events()
        );
    }
    for key in &ok {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}");
    }
    assert_eq!(store.ledger_rows(&shy).await, 0);
}

/// Rendezvous points for bodies, by the order id of a batch's first message: used once each.
fn rendezvous() -> &'static Mutex<HashMap<String, Arc<tokio::sync::Barrier>>> {
    static POINTS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Barrier>>>> = OnceLock::new();
    POINTS.get_or_init(Mutex::default)
}

/// Each message moves a business row (`idem_conf_locks`, id = the amount); after the first row
/// of a batch, the body waits at its rendezvous (once) so that two batches lock their rows in
/// opposite orders: a deadlock the database breaks.
#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "review.batch.rows",
    batch
)]
async fn review_rows(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    for (i, msg) in msgs.iter().enumerate() {
        count_run(&msg.order_id);
        tx.ledger(&msg.order_id, msg.amount).await?;
        sqlx::query("UPDATE idem_conf_locks SET v = v + 1 WHERE id = $1")
            .bind(msg.amount)
            .execute(&mut **tx)
            .await?;
        if i == 0 {
            let point = rendezvous()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&msg.order_id);
            if let Some(point) = point {
                point.wait().await;
            }
        }
    }
    Ok(())
}

/// Two batches moving the same two business rows in opposite orders deadlock; the database
/// ends one. It is rolled back and split: its halves (one row each) wait for the other batch's
/// commit and commit after it. Every message once, nothing requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batches_deadlocking_on_business_rows_both_end_processed() {
    let store = idem_tests::pg::store().await;
    let rows = [idem_tests::unique_int(), idem_tests::unique_int()];
    for row in rows {
        sqlx::query("INSERT INTO idem_conf_locks (id, v) VALUES ($1, 0)")
            .bind(row)
            .execute(store.pool())
            .await
            .expect("a business row");
    }
    let keys = fresh_keys("review-rows", 4);
    let point = Arc::new(tokio::sync::Barrier::new(2));
    for key in [&keys[0], &keys[2]] {
        rendezvous()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), Arc::clone(&point));
    }
    let batch = |pairs: [(usize, i64); 2]| {
        let acks: Vec<RecordingAck> = pairs.iter().map(|_| RecordingAck::new()).collect();
        let batch: Vec<(Payment, RecordingAck)> = pairs
            .iter()
            .zip(&acks)
            .map(|((key, row), ack)| (Payment::new(&keys[*key], *row), ack.clone()))
            .collect();
        (batch, acks)
    };
    let (first, first_acks) = batch([(0, rows[0]), (1, rows[1])]);
    let (second, second_acks) = batch([(2, rows[1]), (3, rows[0])]);
    let tasks = [first, second].map(|deliveries| {
        let store = store.clone();
        tokio::spawn(async move { review_rows(&store, deliveries).await })
    });
    for task in tasks {
        let results = within("a batch", task).await.expect("the batch's task");
        assert_eq!(tally(&results), (2, 0, 0), "{results:?}");
    }
    assert!(all_acked_once(&first_acks) && all_acked_once(&second_acks));
    for key in &keys {
        assert_eq!(store.ledger_rows(key).await, 1, "{key}");
    }
    for row in rows {
        let v: i64 = sqlx::query_scalar("SELECT v FROM idem_conf_locks WHERE id = $1")
            .bind(row)
            .fetch_one(store.pool())
            .await
            .expect("read the row");
        assert_eq!(v, 2, "row {row}: moved once by each of its two messages");
    }
}

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "review.batch.metrics",
    batch
)]
async fn review_metrics(tx: &mut PgTx<'_>, msgs: &[Payment]) -> Result<(), AppError> {
    work(tx, msgs).await
}

/// The value of `name{…}` whose labels include `labels` (0 when absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((inside, value)) = rest.split_once("} ") else {
            continue;
        };
        let pairs: Vec<(&str, &str)> = inside
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|wanted| pairs.contains(wanted)) {
            total += value.trim().parse::<f64>().expect("a number");
        }
    }
    total
}

/// Every delivery of a batch is counted once in `idem_handlings_total`, by how it ended
/// (processed, duplicate twin, retried, dead-lettered bad key), with the attempt of each
/// processed one. (The only test of this binary that installs a recorder.)
#[tokio::test]
async fn each_delivery_of_a_batch_is_counted_once_by_outcome() {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");
    let store = idem_tests::pg::store().await;
    let keys = fresh_keys("review-metrics", 3);
    idem_tests::fail_always(&keys[2]);
    let acks = [
        RecordingAck::new(),
        RecordingAck::at_attempt(2),
        RecordingAck::new(),
        RecordingAck::new(),
        RecordingAck::new(),
    ];
    let ids = [&keys[0], &keys[1], &keys[0], &keys[2], &String::new()];
    let batch: Vec<(Payment, RecordingAck)> = ids
        .iter()
        .zip(&acks)
        .map(|(id, ack)| (Payment::new(*id, 1), ack.clone()))
        .collect();
    let results = review_metrics(&store, batch).await;
    assert_eq!(tally(&results), (2, 1, 2), "{results:?}");
    let text = prometheus.render();
    let scope = ("scope", "review.batch.metrics");
    let count = |outcome: &str| {
        sample(
            &text,
            idem_runtime::metrics::HANDLINGS_TOTAL,
            &[scope, ("outcome", outcome)],
        )
    };
    assert_eq!(
        [
            count("processed"),
            count("duplicate"),
            count("retried"),
            count("dead_lettered")
        ],
        [2.0, 1.0, 1.0, 1.0],
        "{text}"
    );
    let attempts = idem_runtime::metrics::ATTEMPTS_AT_SUCCESS;
    assert_eq!(
        sample(&text, &format!("{attempts}_count"), &[scope]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("{attempts}_sum"), &[scope]),
        3.0,
        "{text}"
    );
}

/// Field names recorded on `idem.handle_batch` spans, whenever they were recorded.
#[derive(Clone, Default)]
struct BatchSpanFields(Arc<Mutex<Vec<String>>>);

struct Names<'a>(&'a mut Vec<String>);

impl tracing::field::Visit for Names<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {
        self.0.push(field.name().to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for BatchSpanFields
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "idem.handle_batch" {
            let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            attrs.record(&mut Names(&mut names));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if ctx
            .span(id)
            .is_some_and(|span| span.name() == "idem.handle_batch")
        {
            let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            values.record(&mut Names(&mut names));
        }
    }
}

/// The batch's span, `idem.handle_batch`, declares a `parts` field: how many parts the batch
/// took (one, or more when it was split). A batch split around a failing message must report
/// it.
#[tokio::test]
async fn the_batch_span_reports_how_many_parts_it_took() {
    use tracing_subscriber::layer::SubscriberExt as _;
    // The process's subscriber, not this thread's: a thread-local one loses the race in which
    // another test's thread, with no subscriber, registers the span's callsite first and caches
    // "never interested" for it. Other tests' batch spans are collected too; the assertion
    // holds only if `parts` is recorded on some `idem.handle_batch`, which is the regression.
    static FIELDS: std::sync::OnceLock<BatchSpanFields> = std::sync::OnceLock::new();
    let fields = FIELDS.get_or_init(|| {
        let fields = BatchSpanFields::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(fields.clone()),
        )
        .expect("the only global subscriber of this test binary");
        fields
    });
    let store = idem_tests::pg::store().await;
    let keys = fresh_keys("review-span", 4);
    idem_tests::fail_once(&keys[1]);
    let (batch, _) = deliveries(&keys, 1);
    let results = review_batch(&store, batch).await;
    // Failed once, in the whole batch's part: split, then each half committed.
    assert_eq!(tally(&results), (4, 0, 0), "{results:?}");
    assert!(runs(&keys[1]) >= 2, "the batch was split");
    let names = fields
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(names.iter().any(|name| name == "size"), "{names:?}");
    assert!(
        names.iter().any(|name| name == "parts"),
        "recorded on idem.handle_batch: {names:?}"
    );
}

/// The transaction cannot begin (the pool is exhausted): every delivery, twins included, is
/// requeued with that error, once, without a body run and without splitting.
#[tokio::test]
async fn a_batch_whose_transaction_cannot_begin_requeues_every_delivery_once() {
    idem_tests::pg::store().await; // the tables exist
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(200))
        .connect(&idem_tests::pg::url())
        .await
        .expect("connect");
    let store = PgStore::new(pool.clone());
    let taken = pool.acquire().await.expect("the only connection");
    let keys = fresh_keys("review-nobegin", 3);
    let ids = [&keys[0], &keys[1], &keys[0], &keys[2]].map(Clone::clone);
    let (batch, acks) = deliveries(&ids, 1);
    let results = review_batch(&store, batch).await;
    drop(taken);
    assert_eq!(tally(&results), (0, 0, 4), "{results:?}");
    for (i, ack) in acks.iter().enumerate() {
        assert!(ack.requeued_once(), "{i}: {:?}", ack.events());
        assert!(
            matches!(&results[i], Err(Error::Database(_))),
            "{i}: {:?}",
            results[i]
        );
    }
    for key in &keys {
        assert_eq!(runs(key), 0, "{key}: no body run");
    }
}

// ---------------------------------------------------------------------------------------------
// Runners: `BatchOptions::max_size` taken at its word

/// What a service writes for batches bounded by time only: `max_size(usize::MAX)`. The options
/// accept it (`max_size` is "at most this many", and the prefetch it raises saturates at the
/// broker's limit), so the runner must handle a message with it.
fn time_bounded_batches() -> BatchOptions {
    BatchOptions::default()
        .max_size(usize::MAX)
        .max_wait(Duration::from_millis(20))
}

/// Waits until `stats` count one processed delivery, failing the test (with the runner's panic
/// or error, if it stopped) when the runner stops first.
async fn one_processed<T: std::fmt::Debug>(
    stats: &Arc<ConsumerStats>,
    task: &mut tokio::task::JoinHandle<T>,
) {
    within("the message to be processed", async {
        tokio::select! {
            biased;
            _ = stats.wait_until(|report| report.processed == 1) => {}
            ended = task => panic!("the runner stopped before processing the message: {ended:?}"),
        }
    })
    .await;
}

mod rabbitmq {
    use super::*;
    use idem_runtime::broker::rabbitmq::lapin::options::{
        BasicPublishOptions, QueueDeclareOptions,
    };
    use idem_runtime::broker::rabbitmq::lapin::types::FieldTable;
    use idem_runtime::broker::rabbitmq::lapin::{BasicProperties, Channel, Connection};
    use idem_runtime::broker::rabbitmq::{RabbitMqBatchConsumer, RabbitMqTopology, lapin};

    async fn connect() -> Connection {
        let url = std::env::var("IDEM_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|error| panic!("RabbitMQ is not reachable at {url}: {error}"))
    }

    async fn topology(connection: &Connection, label: &str) -> RabbitMqTopology {
        let topology = RabbitMqTopology::for_queue(&format!(
            "idem-test.{}.review.{label}",
            idem_tests::run_id()
        ))
        .expect("a valid queue name");
        let channel = connection.create_channel().await.expect("create a channel");
        topology.declare(&channel).await.expect("declare");
        channel.close(200, "declared".into()).await.expect("close");
        topology
    }

    async fn publisher(connection: &Connection) -> Channel {
        let channel = connection.create_channel().await.expect("create a channel");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        channel
    }

    async fn publish(channel: &Channel, topology: &RabbitMqTopology, payment: &Payment) {
        let body = serde_json::to_vec(payment).expect("serialize");
        let confirmation = channel
            .basic_publish(
                "".into(),
                topology.queue().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert_eq!(confirmation, lapin::Confirmation::Ack(None));
    }

    /// (ready messages, consumers) of `queue`.
    async fn queue_state(connection: &Connection, queue: &str) -> (u32, u32) {
        let channel = connection.create_channel().await.expect("create a channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = channel.close(200, "looked".into()).await;
        (declared.message_count(), declared.consumer_count())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]

    async fn a_batch_bounded_by_time_only_is_handled() {
        let store = idem_tests::pg::store().await;
        let connection = connect().await;
        let topology = topology(&connection, "unbounded").await;
        let key = idem_tests::unique_key("review-rmq-unbounded");
        publish(
            &publisher(&connection).await,
            &topology,
            &Payment::new(&key, 1),
        )
        .await;

        let consumer = RabbitMqBatchConsumer::new(
            connection.create_channel().await.expect("create a channel"),
            topology.clone(),
            idem_runtime::batch_handler!(review_batch),
            store.clone(),
        )
        .with_batch(time_bounded_batches());
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(consumer.run(shutdown.clone()));
        one_processed(&stats, &mut task).await;
        shutdown.cancel();
        within("the runner to return", task)
            .await
            .expect("the runner's task")
            .expect("the runner");
        assert_eq!(store.ledger_rows(&key).await, 1);
    }

    /// The channel dies while a batch's body runs (a broker restart, a network cut): the batch
    /// commits, and its ack, deferred to the end of the batch, cannot reach the broker. The
    /// runner's report must say so, as the single-delivery runner's does
    /// (`ConsumerReport::settle_failures`: "deliveries whose settling the broker refused (a
    /// closed channel, a lost connection)"), not count it as processed, which means acked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]

    async fn a_deferred_ack_that_cannot_reach_the_broker_is_not_counted_as_acked() {
        let store = idem_tests::pg::store().await;
        let connection = connect().await;
        let topology = topology(&connection, "closed").await;
        let key = idem_tests::unique_key("review-rmq-closed");
        put(held(), &key);
        publish(
            &publisher(&connection).await,
            &topology,
            &Payment::new(&key, 1),
        )
        .await;

        let channel = connection.create_channel().await.expect("create a channel");
        let consumer = RabbitMqBatchConsumer::new(
            channel.clone(),
            topology.clone(),
            idem_runtime::batch_handler!(review_batch),
            store.clone(),
        )
        .with_batch(BatchOptions::default().max_size(1));
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(shutdown.clone()));
        within("the body to start", latch(&format!("{key}.started")).wait()).await;
        channel
            .close(200, "the test cuts the channel".into())
            .await
            .expect("close the runner's channel");
        latch(&format!("{key}.released")).open();
        let _ended = within("the runner to return", task).await;
        assert_eq!(store.ledger_rows(&key).await, 1, "the body committed");
        // The delivery went back to the queue (the channel closed before any ack).
        assert_eq!(queue_state(&connection, topology.queue()).await, (1, 0));
        let report = stats.snapshot();
        assert_eq!(
            (report.processed, report.settle_failures),
            (0, 1),
            "the ack never reached the broker: {report:?}"
        );
    }

    /// Many small batches at once, finishing close together: each one's acks go out as one
    /// `multiple` ack when that acks exactly its own deliveries. Two batches deciding that in
    /// turn, whose acks then reach the channel in the other order, ack the first batch's tags
    /// twice: RabbitMQ closes the channel (PRECONDITION_FAILED, unknown delivery tag). With
    /// `concurrency(1)` it passes; with 2 or more it fails within a few hundred deliveries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]

    async fn many_small_batches_at_once_never_break_the_channel() {
        let store = idem_tests::pg::store().await;
        let connection = connect().await;
        let topology = topology(&connection, "many").await;
        let publisher = publisher(&connection).await;
        const N: usize = 1500;
        let keys = fresh_keys("review-rmq-many", N);
        for key in &keys {
            publish(&publisher, &topology, &Payment::new(key, 1)).await;
        }
        let consumer = RabbitMqBatchConsumer::new(
            connection.create_channel().await.expect("create a channel"),
            topology.clone(),
            idem_runtime::batch_handler!(review_batch),
            store.clone(),
        )
        // Four batches at once, as the README's example runs them.
        .with_options(ConsumerOptions::default().concurrency(4))
        .with_batch(
            BatchOptions::default()
                .max_size(2)
                .max_wait(Duration::from_millis(1)),
        );
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(consumer.run(shutdown.clone()));
        within("every message processed", async {
            tokio::select! {
                biased;
                _ = stats.wait_until(|report| report.processed == N as u64) => {}
                ended = &mut task => panic!("the runner stopped: {ended:?} {:?}", stats.snapshot()),
            }
        })
        .await;
        shutdown.cancel();
        let report = within("the runner to return", task)
            .await
            .expect("the runner's task")
            .expect("the runner ends without error (its channel never closed under it)");
        assert_eq!(report.processed, N as u64, "{report:?}");
        assert_eq!(
            queue_state(&connection, topology.queue()).await,
            (0, 0),
            "every delivery acked"
        );
        for key in &keys {
            assert_eq!(store.ledger_rows(key).await, 1, "{key}");
        }
    }
}

mod redis_streams {
    use super::*;
    use idem_runtime::broker::redis_streams::{RedisStreamsBatchConsumer, StreamGroup};

    fn client() -> redis::Client {
        let url = std::env::var("IDEM_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        redis::Client::open(url).expect("a valid Redis URL")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]

    async fn a_batch_bounded_by_time_only_is_handled() {
        let store = idem_tests::pg::store().await;
        let mut conn = client()
            .get_connection_manager()
            .await
            .expect("Redis is reachable");
        let group = StreamGroup::new(
            format!("idem-test:{}:review", idem_tests::unique_key("rs")),
            "idem-test",
        );
        let key = idem_tests::unique_key("review-rs-unbounded");
        let payload = serde_json::to_vec(&Payment::new(&key, 1)).expect("serialize");
        group.publish(&mut conn, &payload).await.expect("XADD");

        let consumer = RedisStreamsBatchConsumer::new(
            client(),
            group.clone(),
            "review-1",
            idem_runtime::batch_handler!(review_batch),
            store.clone(),
        )
        .with_batch(time_bounded_batches());
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(consumer.run(shutdown.clone()));
        one_processed(&stats, &mut task).await;
        shutdown.cancel();
        within("the runner to return", task)
            .await
            .expect("the runner's task")
            .expect("the runner");
        assert_eq!(store.ledger_rows(&key).await, 1);
    }
}

mod nats {
    use super::*;
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use async_nats::jetstream::{self, stream};
    use idem_runtime::broker::nats::{NatsBatchConsumer, ensure_dead_letter_stream};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]

    async fn a_batch_bounded_by_time_only_is_handled() {
        let store = idem_tests::pg::store().await;
        let url =
            std::env::var("IDEM_TEST_NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
        let client = async_nats::connect(&url).await.expect("NATS is reachable");
        let js = jetstream::new(client);
        let run = idem_tests::run_id();
        let stream_name = format!("IDEM_T_{run}_REVIEW");
        let subject = format!("idem-t.{run}.review");
        js.create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("create the stream");
        ensure_dead_letter_stream(&js, &stream_name)
            .await
            .expect("create the dead-letter stream");
        let consumer = js
            .get_stream(&stream_name)
            .await
            .expect("get the stream")
            .create_consumer(pull::Config {
                durable_name: Some("idem-t-review".to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .expect("create the consumer");
        let key = idem_tests::unique_key("review-nats-unbounded");
        let payload = serde_json::to_vec(&Payment::new(&key, 1)).expect("serialize");
        js.publish(subject.clone(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");

        let runner = NatsBatchConsumer::new(
            consumer,
            js.clone(),
            idem_runtime::batch_handler!(review_batch),
            store.clone(),
        )
        .with_batch(time_bounded_batches());
        let stats = runner.stats();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(runner.run(shutdown.clone()));
        one_processed(&stats, &mut task).await;
        shutdown.cancel();
        within("the runner to return", task)
            .await
            .expect("the runner's task")
            .expect("the runner");
        assert_eq!(store.ledger_rows(&key).await, 1);
        for name in [stream_name.clone(), format!("{stream_name}_DEAD_LETTER")] {
            js.delete_stream(&name).await.expect("delete the stream");
        }
    }
}

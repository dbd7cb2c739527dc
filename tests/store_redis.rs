//! The Redis store (`store = "redis"`): `lock` (a fenced lease, then a done marker) and `token`
//! (single-use tokens), against the live Redis on 127.0.0.1:6379. Never mocked: a missing Redis
//! fails every test loudly (scripts/services starts it).
//!
//! Time is a [`ManualClock`] the tests move past leases, `ttl`s and token lifetimes; slow and
//! stuck bodies wait on latches; body runs are counted (`count_run`/`runs`), not only records.
//! The restart tests run a `redis-server` of their own, without persistence, on a free port,
//! and kill it for real.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use idem_runtime::clock::{Clock as _, ManualClock};
use idem_runtime::store::redis::RedisStoreError;
use idem_runtime::{
    Acknowledger, Committed, DeadLetter, Disposition, Error, Key, KeyError, NoAck, Outcome,
    RedisStore, Requeue, RequeueReason, idempotent,
};
use idem_tests::{
    AckEvent, AckLost, AppError, Payment, RecordingAck, count_run, eventually, fail_always,
    fail_once, latch, maybe_fail, maybe_panic, panic_on, runs, stop_panicking, unique_key, within,
};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A store on the shared Redis, on the system clock.
async fn store() -> RedisStore {
    RedisStore::connect(REDIS_URL)
        .await
        .expect("Redis on 127.0.0.1:6379 (scripts/services starts it)")
}

/// A store on the shared Redis whose time moves only when the test moves it.
async fn clocked() -> (RedisStore, ManualClock) {
    let clock = ManualClock::starting_now();
    (store().await.with_clock(clock.clone()), clock)
}

/// The Redis key of `raw` (the message's field, before encoding) in `scope`.
fn redis_key(store: &RedisStore, scope: &str, raw: &str) -> String {
    let key = Key::new(scope.to_owned(), &[("order_id", &raw)]).expect("a valid key");
    store.record_key(scope, key.value())
}

/// The record of `raw` in `scope`, read with HGETALL: empty when there is none.
async fn read_record(store: &RedisStore, scope: &str, raw: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(redis_key(store, scope, raw))
        .query_async(&mut store.connection())
        .await
        .expect("HGETALL")
}

/// The Redis expiry of the record of `raw` in `scope`, in ms (`-1`: none, `-2`: no key).
async fn pttl(store: &RedisStore, scope: &str, raw: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(redis_key(store, scope, raw))
        .query_async(&mut store.connection())
        .await
        .expect("PTTL")
}

fn field<'r>(record: &'r HashMap<String, String>, name: &str) -> Option<&'r str> {
    record.get(name).map(String::as_str)
}

fn millis_field(record: &HashMap<String, String>, name: &str) -> i64 {
    field(record, name)
        .unwrap_or_else(|| panic!("no `{name}` in {record:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("`{name}` is not a number in {record:?}"))
}

// ---------------------------------------------------------------------------------------------
// Bodies that block

/// Keys whose next body run blocks: it opens `<key>/started`, then waits for `<key>/release`.
fn held() -> std::sync::MutexGuard<'static, HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Makes the next body run for `key` (only that one) wait for [`release`].
fn hold_next_run(key: &str) {
    held().insert(key.to_owned());
}

/// Waits until the held body run for `key` has started (it holds the lease then).
async fn started(key: &str) {
    within(
        &format!("the body for {key} to start"),
        latch(&format!("{key}/started")).wait(),
    )
    .await;
}

/// Lets the held body run for `key` go on.
fn release(key: &str) {
    latch(&format!("{key}/release")).open();
}

/// Every body here: counts its run, blocks if the test asked, then panics or fails where a test
/// asked it to.
async fn work(key: &str) -> Result<(), AppError> {
    count_run(key);
    let hold = held().remove(key);
    if hold {
        latch(&format!("{key}/started")).open();
        latch(&format!("{key}/release")).wait().await;
    }
    maybe_panic(key);
    maybe_fail(key)
}

// ---------------------------------------------------------------------------------------------
// An acknowledger that also keeps why it was requeued

/// A [`RecordingAck`] that also records each requeue's [`RequeueReason`] (the shared one keeps
/// only the attempt and the delay).
#[derive(Debug, Clone, Default)]
struct ReasonAck {
    inner: RecordingAck,
    reasons: Arc<Mutex<Vec<RequeueReason>>>,
}

impl ReasonAck {
    fn new() -> Self {
        Self::default()
    }

    fn at_attempt(attempt: u32) -> Self {
        Self {
            inner: RecordingAck::at_attempt(attempt),
            reasons: Arc::default(),
        }
    }

    fn events(&self) -> Vec<AckEvent> {
        self.inner.events()
    }

    fn reasons(&self) -> Vec<RequeueReason> {
        self.reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Told exactly one thing: requeue, because another delivery holds the lease, with a delay
    /// no longer than `lease_remaining`.
    fn requeued_in_progress(&self, lease_remaining: Duration) -> bool {
        matches!(
            self.events().as_slice(),
            [AckEvent::Requeue { delay, .. }] if *delay <= lease_remaining
        ) && self.reasons() == [RequeueReason::InProgressElsewhere]
    }
}

impl Acknowledger for ReasonAck {
    type Error = AckLost;

    fn attempt(&self) -> Option<u32> {
        self.inner.attempt()
    }

    async fn ack(self, proof: Committed) -> Result<(), AckLost> {
        self.inner.ack(proof).await
    }

    async fn requeue(self, requeue: Requeue) -> Result<(), AckLost> {
        self.reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(requeue.reason);
        self.inner.requeue(requeue).await
    }

    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), AckLost> {
        self.inner.dead_letter(letter).await
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers (each its own scope)

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock"
)]
async fn lock_plain(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.replay",
    replay
)]
async fn lock_replay(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.fingerprint",
    fingerprint
)]
async fn lock_fingerprint(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.ttl",
    ttl = "1h"
)]
async fn lock_ttl(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

/// A lease the body outlives (on the test's clock), never renewed; the result is kept so that
/// the record says whose marker it is.
#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.fixed",
    lease = "10s",
    fixed_lease,
    replay
)]
async fn lock_fixed(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

/// A lease renewed every third of it while the body runs; the renewal waits on the store's
/// clock, so a test drives it by advancing a `ManualClock`.
#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.renewed",
    lease = "30s"
)]
async fn lock_renewed(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.attempts",
    max_attempts = 2
)]
async fn lock_two_attempts(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

const TOKEN_SCOPE: &str = "redis.token";
const SPENDING_SCOPE: &str = "redis.token.spend";

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "token",
    scope = "redis.token"
)]
async fn token_plain(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "token",
    scope = "redis.token.spend",
    spend_on_error
)]
async fn token_spending(msg: Payment) -> Result<i64, AppError> {
    work(&msg.order_id).await?;
    Ok(msg.amount)
}

// ---------------------------------------------------------------------------------------------
// lock

#[tokio::test]
async fn lock_first_delivery_is_processed_and_leaves_a_done_marker() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-first");
    let ack = RecordingAck::new();
    let outcome = lock_plain(&store, Payment::new(&key, 250), ack.clone())
        .await
        .expect("first delivery");
    assert_eq!(outcome, Outcome::Processed(250));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 1);

    let record = read_record(&store, "redis.lock", &key).await;
    assert_eq!(field(&record, "state"), Some("done"), "{record:?}");
    assert_eq!(millis_field(&record, "created"), clock.now_ms());
    for gone in ["owner", "until", "fp", "resp", "expires"] {
        assert!(!record.contains_key(gone), "`{gone}` in {record:?}");
    }
    assert_eq!(
        pttl(&store, "redis.lock", &key).await,
        -1,
        "without `ttl` a marker is kept forever"
    );
}

#[tokio::test]
async fn lock_sequential_duplicate_is_acked_without_running_the_body() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-seq");
    lock_plain(&store, Payment::new(&key, 10), NoAck)
        .await
        .expect("first delivery");
    let ack = RecordingAck::new();
    let again = lock_plain(&store, Payment::new(&key, 10), ack.clone())
        .await
        .expect("redelivery");
    assert_eq!(again, Outcome::Duplicate { replayed: None });
    assert_eq!(ack.events(), vec![AckEvent::Ack], "a duplicate is acked");
    assert_eq!(runs(&key), 1, "the body did not run again");
}

#[tokio::test]
async fn lock_duplicate_replays_the_first_result() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-replay");
    let first = lock_replay(&store, Payment::new(&key, 41), NoAck)
        .await
        .expect("first");
    assert_eq!(first, Outcome::Processed(41));
    // No fingerprint: a redelivery with other fields still gets the first result.
    let ack = RecordingAck::new();
    let again = lock_replay(&store, Payment::new(&key, 99), ack.clone())
        .await
        .expect("again");
    assert_eq!(again, Outcome::Duplicate { replayed: Some(41) });
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 1);
    let record = read_record(&store, "redis.lock.replay", &key).await;
    assert_eq!(field(&record, "resp"), Some("41"), "{record:?}");
}

#[tokio::test]
async fn lock_same_key_with_a_different_payload_is_dead_lettered() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-mismatch");
    lock_fingerprint(&store, Payment::new(&key, 100), NoAck)
        .await
        .expect("first");
    let record = read_record(&store, "redis.lock.fingerprint", &key).await;
    assert!(
        field(&record, "fp").is_some_and(|fp| !fp.is_empty()),
        "{record:?}"
    );
    let same = lock_fingerprint(&store, Payment::new(&key, 100), NoAck)
        .await
        .expect("an identical redelivery");
    assert!(same.is_duplicate(), "{same:?}");

    let ack = RecordingAck::new();
    let changed = lock_fingerprint(&store, Payment::new(&key, 200), ack.clone()).await;
    match &changed {
        Err(Error::PayloadMismatch { key: k, scope }) => {
            assert_eq!(
                (k.as_str(), scope.as_str()),
                (key.as_str(), "redis.lock.fingerprint")
            );
        }
        other => panic!("expected PayloadMismatch, got {other:?}"),
    }
    assert_eq!(
        changed.as_ref().expect_err("mismatch").disposition(),
        Disposition::DeadLetter
    );
    assert!(
        ack.dead_lettered_with("payload mismatch"),
        "{:?}",
        ack.events()
    );
    assert_eq!(runs(&key), 1);
}

/// 32 deliveries of one key at once, on a multi-thread runtime. The winner's body waits on a
/// latch until every other delivery has settled, so they truly overlap: each of those finds the
/// live lease (in progress elsewhere: requeued, never acked). Redelivered after the winner
/// finished, each is a duplicate. The body ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_32_concurrent_deliveries_run_the_body_once() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-race");
    hold_next_run(&key);
    let acks: Vec<ReasonAck> = (0..32).map(|_| ReasonAck::new()).collect();
    let (done, mut settled) = tokio::sync::mpsc::unbounded_channel();
    for (index, ack) in acks.iter().enumerate() {
        let (store, message, ack, done) = (
            store.clone(),
            Payment::new(&key, 7),
            ack.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let result = lock_plain(&store, message, ack).await;
            done.send((index, result)).expect("the test is listening");
        });
    }
    let mut in_progress = Vec::new();
    for _ in 0..31 {
        let (index, result) = within("the losers to settle", settled.recv())
            .await
            .expect("a result");
        match result {
            Err(Error::InProgress {
                key: k,
                lease_remaining,
                ..
            }) => {
                assert_eq!(k, key);
                assert!(
                    lease_remaining > Duration::ZERO && lease_remaining <= Duration::from_secs(30),
                    "{lease_remaining:?}"
                );
                assert!(
                    acks[index].requeued_in_progress(lease_remaining),
                    "{:?} {:?}",
                    acks[index].events(),
                    acks[index].reasons()
                );
                in_progress.push(index);
            }
            other => panic!("while the winner's body runs, got {other:?}"),
        }
    }
    started(&key).await;
    assert_eq!(runs(&key), 1, "only the winner's body started");
    release(&key);
    let (winner, result) = within("the winner to finish", settled.recv())
        .await
        .expect("the winner's result");
    assert_eq!(result.expect("the winner"), Outcome::Processed(7));
    assert_eq!(acks[winner].events(), vec![AckEvent::Ack]);
    assert!(!in_progress.contains(&winner));

    // The broker redelivers every requeued one.
    let redeliveries: Vec<_> = in_progress
        .iter()
        .map(|_| {
            let (store, message, ack) = (
                store.clone(),
                Payment::new(&key, 7),
                ReasonAck::at_attempt(2),
            );
            tokio::spawn(async move {
                let result = lock_plain(&store, message, ack.clone()).await;
                (result, ack)
            })
        })
        .collect();
    for redelivery in redeliveries {
        let (result, ack) = within("a redelivery", redelivery)
            .await
            .expect("redelivery task");
        assert_eq!(
            result.expect("redelivery"),
            Outcome::Duplicate { replayed: None }
        );
        assert_eq!(ack.events(), vec![AckEvent::Ack]);
    }
    assert_eq!(runs(&key), 1, "exactly one body run");
}

/// A failing body releases its own lease at once: the key is gone from Redis, and the
/// redelivery runs without waiting for any expiry (the clock never moves here).
#[tokio::test]
async fn lock_body_error_releases_the_lease_at_once() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-fail");
    fail_once(&key);
    let ack = RecordingAck::new();
    let failed = lock_plain(&store, Payment::new(&key, 5), ack.clone()).await;
    assert!(
        matches!(failed, Err(Error::Handler(AppError::Transient(_)))),
        "{failed:?}"
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());
    assert!(
        read_record(&store, "redis.lock", &key).await.is_empty(),
        "the lease was released"
    );
    assert_eq!(pttl(&store, "redis.lock", &key).await, -2, "no key at all");

    let ack = RecordingAck::at_attempt(2);
    let retried = lock_plain(&store, Payment::new(&key, 5), ack.clone())
        .await
        .expect("redelivery");
    assert_eq!(retried, Outcome::Processed(5));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 2, "one failed run, one success");
}

#[tokio::test]
async fn lock_panic_in_the_body_releases_the_lease_at_once() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-panic");
    panic_on(&key);
    let ack = RecordingAck::new();
    let result = lock_plain(&store, Payment::new(&key, 5), ack.clone()).await;
    match &result {
        Err(Error::Panicked {
            during: "body",
            message,
            scope,
        }) => {
            assert!(message.contains("injected panic"), "{message}");
            assert_eq!(scope, "redis.lock");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert!(result.as_ref().expect_err("panicked").is_retryable());
    assert!(ack.requeued_once(), "{:?}", ack.events());
    assert!(
        read_record(&store, "redis.lock", &key).await.is_empty(),
        "the lease was released"
    );
    stop_panicking(&key);
    let retried = lock_plain(&store, Payment::new(&key, 5), NoAck)
        .await
        .expect("redelivery");
    assert_eq!(retried, Outcome::Processed(5));
    assert_eq!(runs(&key), 2);
}

/// The consumer crashed between the marker and the ack (the ack never reached the broker):
/// the broker redelivers, and the marker makes it a duplicate.
#[tokio::test]
async fn lock_lost_ack_after_the_marker_makes_the_redelivery_a_duplicate() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-lostack");
    let ack = RecordingAck::losing_acks();
    let first = lock_plain(&store, Payment::new(&key, 9), ack.clone())
        .await
        .expect("a lost ack after the marker is not a handling failure");
    assert_eq!(first, Outcome::Processed(9));
    assert_eq!(ack.events(), vec![AckEvent::Ack], "the ack was attempted");
    let record = read_record(&store, "redis.lock", &key).await;
    assert_eq!(field(&record, "state"), Some("done"), "{record:?}");

    let ack = RecordingAck::at_attempt(2);
    let redelivered = lock_plain(&store, Payment::new(&key, 9), ack.clone())
        .await
        .expect("redelivery");
    assert_eq!(redelivered, Outcome::Duplicate { replayed: None });
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 1);
}

/// A consumer that dies mid-body (its future dropped) leaves its lease: redeliveries are in
/// progress elsewhere until the lease ends on the store's clock, then one takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_consumer_dying_mid_body_blocks_the_key_until_its_lease_ends() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-dies");
    hold_next_run(&key);
    let dying = {
        let (store, message) = (store.clone(), Payment::new(&key, 3));
        tokio::spawn(async move { lock_plain(&store, message, NoAck).await })
    };
    started(&key).await;
    dying.abort();
    let aborted = within("the consumer to die", dying).await;
    assert!(
        aborted
            .as_ref()
            .is_err_and(tokio::task::JoinError::is_cancelled),
        "{aborted:?}"
    );

    let lease = read_record(&store, "redis.lock", &key).await;
    assert_eq!(field(&lease, "state"), Some("lease"), "{lease:?}");
    assert!(field(&lease, "owner").is_some(), "{lease:?}");
    assert_eq!(
        millis_field(&lease, "until"),
        clock.now_ms() + 30_000,
        "the default lease, 30 s"
    );

    let ack = ReasonAck::new();
    let blocked = lock_plain(&store, Payment::new(&key, 3), ack.clone()).await;
    assert!(
        matches!(&blocked, Err(Error::InProgress { lease_remaining, .. }) if *lease_remaining == Duration::from_secs(30)),
        "{blocked:?}"
    );
    assert!(
        ack.requeued_in_progress(Duration::from_secs(30)),
        "{:?}",
        ack.events()
    );

    clock.advance(Duration::from_secs(20));
    let ack = ReasonAck::at_attempt(2);
    let still = lock_plain(&store, Payment::new(&key, 3), ack.clone()).await;
    assert!(
        matches!(&still, Err(Error::InProgress { lease_remaining, .. }) if *lease_remaining == Duration::from_secs(10)),
        "{still:?}"
    );
    assert!(
        ack.requeued_in_progress(Duration::from_secs(10)),
        "{:?}",
        ack.events()
    );
    assert_eq!(runs(&key), 1, "no body ran while the lease held");

    clock.advance(Duration::from_secs(11));
    let ack = RecordingAck::at_attempt(3);
    let taken_over = lock_plain(&store, Payment::new(&key, 3), ack.clone())
        .await
        .expect("the take-over");
    assert_eq!(taken_over, Outcome::Processed(3));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 2, "the dead consumer's run and the take-over");
    let again = lock_plain(&store, Payment::new(&key, 3), NoAck)
        .await
        .expect("a later redelivery");
    assert!(again.is_duplicate(), "{again:?}");
}

/// `fixed_lease`: body A outlives its lease (on the store's clock) and delivery B takes the key
/// over and writes its marker first. When A finishes, its body has run, and B's marker is
/// there: A writes nothing over it (B's time and result stay) and is acked, an ordinary
/// duplicate of B's work; its redelivery is a duplicate too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_fixed_lease_outlived_finds_the_takers_marker_and_keeps_it() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-leaselost");
    hold_next_run(&key);
    let ack_a = RecordingAck::new();
    let slow = {
        let (store, message, ack) = (store.clone(), Payment::new(&key, 1), ack_a.clone());
        tokio::spawn(async move { lock_fixed(&store, message, ack).await })
    };
    started(&key).await;
    let early = lock_fixed(&store, Payment::new(&key, 2), NoAck).await;
    assert!(
        matches!(&early, Err(Error::InProgress { .. })),
        "within the lease: {early:?}"
    );

    clock.advance(Duration::from_secs(11));
    let ack_b = RecordingAck::new();
    let b = lock_fixed(&store, Payment::new(&key, 2), ack_b.clone())
        .await
        .expect("B takes the key over");
    assert_eq!(b, Outcome::Processed(2));
    assert_eq!(ack_b.events(), vec![AckEvent::Ack]);
    let b_created = clock.now_ms();

    // A finishes later, by the clock too: its marker would carry another time.
    clock.advance(Duration::from_secs(5));
    release(&key);
    let a = within("A to finish", slow).await.expect("A's task");
    assert_eq!(a.expect("A's body ran"), Outcome::Processed(1));
    assert_eq!(ack_a.events(), vec![AckEvent::Ack]);

    let record = read_record(&store, "redis.lock.fixed", &key).await;
    assert_eq!(field(&record, "state"), Some("done"), "{record:?}");
    assert_eq!(millis_field(&record, "created"), b_created, "B's marker");
    assert_eq!(field(&record, "resp"), Some("2"), "B's result: {record:?}");
    assert!(!record.contains_key("owner"), "{record:?}");

    let redelivered = lock_fixed(&store, Payment::new(&key, 1), RecordingAck::at_attempt(2))
        .await
        .expect("A's redelivery");
    assert_eq!(redelivered, Outcome::Duplicate { replayed: Some(2) });
    assert_eq!(runs(&key), 2, "A's run and B's");
}

/// The fence: body A outlives its lease and another delivery now holds a *live* lease on the
/// key (written here as that delivery's claim would write it). A's marker is refused:
/// `LeaseLost`, requeued (never acked), and the other delivery's lease is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_fixed_lease_outlived_while_another_holds_the_key_writes_no_marker() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-fenced");
    hold_next_run(&key);
    let ack_a = RecordingAck::new();
    let slow = {
        let (store, message, ack) = (store.clone(), Payment::new(&key, 1), ack_a.clone());
        tokio::spawn(async move { lock_fixed(&store, message, ack).await })
    };
    started(&key).await;
    clock.advance(Duration::from_secs(11));
    let other_until = clock.now_ms() + 10_000;
    let _: () = redis::cmd("HSET")
        .arg(redis_key(&store, "redis.lock.fixed", &key))
        .arg("state")
        .arg("lease")
        .arg("owner")
        .arg("another-delivery")
        .arg("until")
        .arg(other_until)
        .query_async(&mut store.connection())
        .await
        .expect("HSET the other delivery's lease");

    release(&key);
    let a = within("A to finish", slow).await.expect("A's task");
    match &a {
        Err(Error::LeaseLost { key: k, scope }) => {
            assert_eq!(
                (k.as_str(), scope.as_str()),
                (key.as_str(), "redis.lock.fixed")
            );
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert!(a.as_ref().expect_err("lease lost").is_retryable());
    assert!(ack_a.requeued_once(), "not acked: {:?}", ack_a.events());
    let record = read_record(&store, "redis.lock.fixed", &key).await;
    assert_eq!(field(&record, "state"), Some("lease"), "{record:?}");
    assert_eq!(
        field(&record, "owner"),
        Some("another-delivery"),
        "{record:?}"
    );
    assert_eq!(millis_field(&record, "until"), other_until, "{record:?}");
    assert_eq!(runs(&key), 1);
}

/// A body whose lease lapsed with no one taking the key over still records its success: the
/// marker is written, the delivery acked, and a redelivery is a duplicate (its body ran once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lapsed_lease_with_no_taker_still_writes_the_marker() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-lapsed");
    hold_next_run(&key);
    let ack_a = RecordingAck::new();
    let slow = {
        let (store, message, ack) = (store.clone(), Payment::new(&key, 3), ack_a.clone());
        tokio::spawn(async move { lock_fixed(&store, message, ack).await })
    };
    started(&key).await;
    clock.advance(Duration::from_secs(11));
    release(&key);
    let a = within("A to finish", slow).await.expect("A's task");
    assert_eq!(a.expect("A's marker"), Outcome::Processed(3));
    assert_eq!(ack_a.events(), vec![AckEvent::Ack]);
    let again = lock_fixed(&store, Payment::new(&key, 3), NoAck)
        .await
        .expect("the redelivery");
    assert!(again.is_duplicate(), "{again:?}");
    assert_eq!(runs(&key), 1);
}

/// Renewal: a 30 s lease, extended every 10 s of the store's clock while the body runs. The
/// clock jumps 40 s, past the lease, which wakes the renewal at once (no real time passes); a renewal moves the deadline past the new "now", so a second delivery is
/// still in progress elsewhere, and the first finishes with its marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lease_is_renewed_while_a_slow_body_runs() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-renew");
    hold_next_run(&key);
    let ack_a = RecordingAck::new();
    let slow = {
        let (store, message, ack) = (store.clone(), Payment::new(&key, 4), ack_a.clone());
        tokio::spawn(async move { lock_renewed(&store, message, ack).await })
    };
    started(&key).await;
    let claimed_at = clock.now_ms();
    let lease = read_record(&store, "redis.lock.renewed", &key).await;
    assert_eq!(
        millis_field(&lease, "until"),
        claimed_at + 30_000,
        "{lease:?}"
    );

    clock.advance(Duration::from_secs(40));
    let now = clock.now_ms();
    eventually(
        "a renewal to push the lease past the advanced clock",
        || {
            let store = store.clone();
            let key = key.clone();
            async move {
                let lease = read_record(&store, "redis.lock.renewed", &key).await;
                field(&lease, "until")
                    .and_then(|until| until.parse::<i64>().ok())
                    .is_some_and(|until| until > now)
            }
        },
    )
    .await;

    let ack_b = ReasonAck::new();
    let b = lock_renewed(&store, Payment::new(&key, 4), ack_b.clone()).await;
    match &b {
        Err(Error::InProgress {
            lease_remaining, ..
        }) => {
            assert!(
                *lease_remaining > Duration::ZERO && *lease_remaining <= Duration::from_secs(30),
                "{lease_remaining:?}"
            );
            assert!(
                ack_b.requeued_in_progress(*lease_remaining),
                "{:?}",
                ack_b.events()
            );
        }
        other => panic!("the renewed lease still holds: {other:?}"),
    }

    release(&key);
    let a = within("A to finish", slow).await.expect("A's task");
    assert_eq!(a.expect("A keeps its lease"), Outcome::Processed(4));
    assert_eq!(ack_a.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 1);
    let record = read_record(&store, "redis.lock.renewed", &key).await;
    assert_eq!(field(&record, "state"), Some("done"), "{record:?}");
}

#[tokio::test]
async fn lock_marker_with_ttl_expires_on_the_stores_clock() {
    let (store, clock) = clocked().await;
    let key = unique_key("redis-ttl");
    let first = lock_ttl(&store, Payment::new(&key, 8), NoAck)
        .await
        .expect("first");
    assert_eq!(first, Outcome::Processed(8));
    let record = read_record(&store, "redis.lock.ttl", &key).await;
    assert_eq!(
        millis_field(&record, "expires"),
        millis_field(&record, "created") + 3_600_000,
        "{record:?}"
    );
    let expiry = pttl(&store, "redis.lock.ttl", &key).await;
    assert!(
        expiry > 3_500_000 && expiry <= 3_600_000,
        "Redis expires the key too: {expiry}"
    );
    let again = lock_ttl(&store, Payment::new(&key, 8), NoAck)
        .await
        .expect("within the ttl");
    assert!(again.is_duplicate(), "{again:?}");

    clock.advance(Duration::from_secs(2 * 3600));
    let ack = RecordingAck::new();
    let later = lock_ttl(&store, Payment::new(&key, 8), ack.clone())
        .await
        .expect("after the ttl");
    assert_eq!(later, Outcome::Processed(8), "the marker no longer counts");
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&key), 2);
}

#[tokio::test]
async fn lock_bad_keys_are_dead_lettered_without_running_the_body() {
    let store = store().await;

    let ack = RecordingAck::new();
    let empty = lock_plain(&store, Payment::new("", 1), ack.clone()).await;
    match &empty {
        Err(Error::Key(KeyError::EmptyPart { field, scope })) => {
            assert_eq!((field.as_str(), scope.as_str()), ("order_id", "redis.lock"));
        }
        other => panic!("expected an empty key error, got {other:?}"),
    }
    assert_eq!(
        empty.as_ref().expect_err("empty").disposition(),
        Disposition::DeadLetter
    );
    assert!(ack.dead_lettered_with("order_id"), "{:?}", ack.events());
    assert_eq!(runs(""), 0);

    let long = format!("{}-{}", unique_key("redis-long"), "x".repeat(500));
    let ack = RecordingAck::new();
    let too_long = lock_plain(&store, Payment::new(&long, 1), ack.clone()).await;
    assert!(
        matches!(&too_long, Err(Error::Key(KeyError::TooLong { .. }))),
        "{too_long:?}"
    );
    assert!(ack.dead_lettered_with("bytes"), "{:?}", ack.events());
    assert_eq!(runs(&long), 0);

    let nul = format!("{}\0tail", unique_key("redis-nul"));
    let ack = RecordingAck::new();
    let with_nul = lock_plain(&store, Payment::new(&nul, 1), ack.clone()).await;
    assert!(
        matches!(&with_nul, Err(Error::Key(KeyError::Nul { .. }))),
        "{with_nul:?}"
    );
    assert!(ack.dead_lettered_with("NUL"), "{:?}", ack.events());
    assert_eq!(runs(&nul), 0);
}

/// Keys with the characters that matter to Redis key names and to the encoding (`:`, the hash
/// tag's braces, the escape `\`), unicode, spaces, and 400 bytes: each is processed once, then a
/// duplicate, under its own record; two keys that differ only by an escape do not collide.
#[tokio::test]
async fn lock_keys_with_odd_bytes_round_trip() {
    let store = store().await;
    let base = unique_key("redis-odd");
    let mut long = format!("{base} :{{}}\\ é 日本 🦀 ");
    while long.len() < 400 {
        long.push('x');
    }
    assert_eq!(long.len(), 400);
    let keys = [
        format!("{base} a:b{{c}}d\\e é 日本 🦀 "),
        format!("{base}-a:b"),
        format!("{base}-a\\:b"),
        format!("{{{base}}}"),
        format!("  {base}  "),
        long,
    ];
    for (amount, key) in (1..).zip(&keys) {
        let first = lock_plain(&store, Payment::new(key, amount), NoAck)
            .await
            .unwrap_or_else(|error| panic!("{key:?}: {error}"));
        assert_eq!(first, Outcome::Processed(amount), "{key:?}");
    }
    for key in &keys {
        let ack = RecordingAck::new();
        let again = lock_plain(&store, Payment::new(key, 0), ack.clone())
            .await
            .unwrap_or_else(|error| panic!("{key:?}: {error}"));
        assert!(again.is_duplicate(), "{key:?}: {again:?}");
        assert_eq!(ack.events(), vec![AckEvent::Ack]);
        assert_eq!(runs(key), 1, "{key:?}");
        let record = read_record(&store, "redis.lock", key).await;
        assert_eq!(field(&record, "state"), Some("done"), "{key:?}: {record:?}");
    }
    let names: HashSet<String> = keys
        .iter()
        .map(|key| redis_key(&store, "redis.lock", key))
        .collect();
    assert_eq!(names.len(), keys.len(), "one record per key: {names:?}");
}

/// Redis unreachable: `connect` fails with a typed error; a store that could not reach Redis at
/// delivery time fails the delivery with `Error::Redis`, retryable: requeued, never acked, the
/// body not run.
#[tokio::test]
async fn redis_unreachable_is_a_typed_or_retryable_error() {
    let refused = within(
        "connect to a closed port",
        RedisStore::connect("redis://127.0.0.1:1"),
    )
    .await;
    assert!(
        matches!(&refused, Err(RedisStoreError::Redis(_))),
        "{refused:?}"
    );

    let client = redis::Client::open("redis://127.0.0.1:1").expect("a valid url");
    let lazy = redis::aio::ConnectionManager::new_lazy_with_config(
        client,
        redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(Duration::from_secs(1))),
    )
    .expect("a lazy connection manager");
    let store = RedisStore::from_connection_manager(lazy);

    let key = unique_key("redis-unreachable");
    let ack = RecordingAck::new();
    let result = within(
        "a delivery against a closed port",
        lock_plain(&store, Payment::new(&key, 1), ack.clone()),
    )
    .await;
    assert!(matches!(&result, Err(Error::Redis(_))), "{result:?}");
    assert_eq!(
        result.as_ref().expect_err("unreachable").disposition(),
        Disposition::Retry
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());

    let ack = RecordingAck::new();
    let result = within(
        "a token delivery against a closed port",
        token_plain(&store, Payment::new(&key, 1), ack.clone()),
    )
    .await;
    assert!(matches!(&result, Err(Error::Redis(_))), "{result:?}");
    assert!(ack.requeued_once(), "{:?}", ack.events());
    assert_eq!(runs(&key), 0);

    let issued = within(
        "issuing a token against a closed port",
        store.issue_token(TOKEN_SCOPE, Duration::from_secs(60)),
    )
    .await;
    assert!(
        matches!(&issued, Err(RedisStoreError::Redis(_))),
        "{issued:?}"
    );
}

/// A `redis-server` of the test's own, without persistence (`--save ""`, `--appendonly no`),
/// on a free port: the restart tests kill it for real (SIGKILL) and start it again on the same
/// port. Killed when dropped.
struct OwnRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self { port, child: None };
        server.spawn().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let dir = std::env::temp_dir();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("a valid url");
        eventually(&format!("redis-server on port {port} to answer"), || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    Ok(mut conn) => redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    async fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().await.expect("kill redis-server");
    }
}

/// Waits until `store`'s own connection answers again (its connection manager reconnects by
/// itself after a restart), as a consumer's health check would.
async fn until_reconnected(store: &RedisStore) {
    eventually("the store to reconnect", || {
        let mut conn = store.connection();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        }
    })
    .await;
}

/// A Redis restart mid-run. While Redis is down every delivery fails with `Error::Redis`:
/// retryable, requeued, never acked, no panic (a duplicate too: it cannot be told from a first
/// delivery then). Once Redis is back, the same store reconnects by itself and the requeued
/// message is processed. Without persistence the restart forgot every marker, as the store's
/// docs say: a key processed before the restart runs its body again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_redis_restart_requeues_then_recovers_forgetting_markers() {
    let mut server = OwnRedis::start().await;
    let store = RedisStore::connect(&server.url())
        .await
        .expect("the test's own redis-server");
    let before = unique_key("redis-restart-before");
    let during = unique_key("redis-restart-during");
    assert_eq!(
        lock_plain(&store, Payment::new(&before, 1), NoAck)
            .await
            .expect("before the restart"),
        Outcome::Processed(1)
    );
    assert!(
        lock_plain(&store, Payment::new(&before, 1), NoAck)
            .await
            .expect("a duplicate before the restart")
            .is_duplicate()
    );

    server.kill().await;
    for (key, what) in [(&during, "a new message"), (&before, "a duplicate")] {
        let ack = RecordingAck::new();
        let result = within(
            "a delivery while Redis is down",
            lock_plain(&store, Payment::new(key, 1), ack.clone()),
        )
        .await;
        assert!(
            matches!(&result, Err(Error::Redis(_))),
            "{what}: {result:?}"
        );
        assert_eq!(
            result.as_ref().expect_err("down").disposition(),
            Disposition::Retry
        );
        assert!(ack.requeued_once(), "{what}: {:?}", ack.events());
    }
    assert_eq!(runs(&during), 0);

    server.spawn().await;
    until_reconnected(&store).await;
    let ack = RecordingAck::at_attempt(2);
    let recovered = lock_plain(&store, Payment::new(&during, 1), ack.clone())
        .await
        .expect("the requeued message after the restart");
    assert_eq!(recovered, Outcome::Processed(1));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&during), 1);

    // The documented cost of running Redis without persistence: the marker is gone.
    let forgotten = lock_plain(&store, Payment::new(&before, 1), NoAck)
        .await
        .expect("a redelivery of a message processed before the restart");
    assert_eq!(forgotten, Outcome::Processed(1));
    assert_eq!(runs(&before), 2, "the body ran again after the restart");
    assert!(
        lock_plain(&store, Payment::new(&before, 1), NoAck)
            .await
            .expect("and then")
            .is_duplicate()
    );
}

/// Redis dies while a body runs: the body's effects happened, but its marker cannot be written,
/// so the delivery is requeued (never acked); after the restart (no persistence) the redelivery
/// runs the body again: the documented window of `lock` on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_redis_dying_mid_body_requeues_and_the_redelivery_runs_again() {
    let mut server = OwnRedis::start().await;
    let store = RedisStore::connect(&server.url())
        .await
        .expect("the test's own redis-server");
    let key = unique_key("redis-dies-mid-body");
    hold_next_run(&key);
    let ack = RecordingAck::new();
    let running = {
        let (store, message, ack) = (store.clone(), Payment::new(&key, 6), ack.clone());
        tokio::spawn(async move { lock_plain(&store, message, ack).await })
    };
    started(&key).await;
    server.kill().await;
    release(&key);
    let result = within("the body to finish", running)
        .await
        .expect("the delivery's task");
    assert!(matches!(&result, Err(Error::Redis(_))), "{result:?}");
    assert!(result.as_ref().expect_err("no marker").is_retryable());
    assert!(ack.requeued_once(), "{:?}", ack.events());

    server.spawn().await;
    until_reconnected(&store).await;
    let redelivered = lock_plain(&store, Payment::new(&key, 6), RecordingAck::at_attempt(2))
        .await
        .expect("the redelivery");
    assert_eq!(redelivered, Outcome::Processed(6));
    assert_eq!(runs(&key), 2, "the marker was lost with Redis");
}

/// `max_attempts = 2`: a body that always fails is dead-lettered at the second attempt (its
/// lease released each time); a delivery that finds the key in progress elsewhere is requeued
/// even at attempt 50, since that does not count against `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_max_attempts_counts_failures_not_in_progress() {
    let (store, _clock) = clocked().await;
    let key = unique_key("redis-attempts");
    fail_always(&key);
    let ack = RecordingAck::at_attempt(1);
    let first = lock_two_attempts(&store, Payment::new(&key, 1), ack.clone()).await;
    assert!(matches!(&first, Err(Error::Handler(_))), "{first:?}");
    assert!(ack.requeued_once(), "{:?}", ack.events());
    let ack = RecordingAck::at_attempt(2);
    let second = lock_two_attempts(&store, Payment::new(&key, 1), ack.clone()).await;
    assert!(matches!(&second, Err(Error::Handler(_))), "{second:?}");
    assert!(
        ack.dead_lettered_with("gave up after 2 attempts"),
        "{:?}",
        ack.events()
    );
    assert_eq!(runs(&key), 2);
    assert!(
        read_record(&store, "redis.lock.attempts", &key)
            .await
            .is_empty()
    );

    let busy = unique_key("redis-attempts-busy");
    hold_next_run(&busy);
    let holder = {
        let (store, message) = (store.clone(), Payment::new(&busy, 2));
        tokio::spawn(async move { lock_two_attempts(&store, message, RecordingAck::new()).await })
    };
    started(&busy).await;
    let ack = ReasonAck::at_attempt(50);
    let late = lock_two_attempts(&store, Payment::new(&busy, 2), ack.clone()).await;
    assert!(matches!(&late, Err(Error::InProgress { .. })), "{late:?}");
    assert!(
        ack.requeued_in_progress(Duration::from_secs(30)),
        "requeued, not dead-lettered: {:?} {:?}",
        ack.events(),
        ack.reasons()
    );
    assert!(
        matches!(
            ack.events().as_slice(),
            [AckEvent::Requeue { attempt: 50, .. }]
        ),
        "{:?}",
        ack.events()
    );
    release(&busy);
    let held = within("the holder to finish", holder)
        .await
        .expect("the holder's task");
    assert_eq!(held.expect("the holder"), Outcome::Processed(2));
    let ack = RecordingAck::at_attempt(51);
    let after = lock_two_attempts(&store, Payment::new(&busy, 2), ack.clone())
        .await
        .expect("after the holder");
    assert!(after.is_duplicate(), "{after:?}");
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&busy), 1);
}

// ---------------------------------------------------------------------------------------------
// token

async fn issue(store: &RedisStore, scope: &str, ttl: Duration) -> String {
    store.issue_token(scope, ttl).await.expect("issue a token")
}

#[tokio::test]
async fn token_first_delivery_processes_then_duplicates() {
    let (store, clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(15 * 60)).await;
    // A hyphenated UUID: what `KeyPart` writes for a `uuid::Uuid` field, so either type works.
    let parsed = uuid::Uuid::parse_str(&token).expect("a UUID");
    assert_eq!(parsed.hyphenated().to_string(), token);
    let issued = read_record(&store, TOKEN_SCOPE, &token).await;
    assert_eq!(field(&issued, "state"), Some("issued"), "{issued:?}");
    assert_eq!(millis_field(&issued, "expires"), clock.now_ms() + 900_000);
    assert!(pttl(&store, TOKEN_SCOPE, &token).await > 0);

    let ack = RecordingAck::new();
    let first = token_plain(&store, Payment::new(&token, 12), ack.clone())
        .await
        .expect("first delivery");
    assert_eq!(first, Outcome::Processed(12));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    let done = read_record(&store, TOKEN_SCOPE, &token).await;
    assert_eq!(field(&done, "state"), Some("done"), "{done:?}");

    let ack = RecordingAck::new();
    let again = token_plain(&store, Payment::new(&token, 12), ack.clone())
        .await
        .expect("redelivery");
    assert_eq!(again, Outcome::Duplicate { replayed: None });
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&token), 1);
}

#[tokio::test]
async fn token_never_issued_is_dead_lettered_without_running_the_body() {
    let (store, _clock) = clocked().await;
    let token = unique_key("redis-never-issued");
    let ack = RecordingAck::new();
    let result = token_plain(&store, Payment::new(&token, 1), ack.clone()).await;
    match &result {
        Err(Error::UnknownToken { key, scope }) => {
            assert_eq!(
                (key.as_str(), scope.as_str()),
                (token.as_str(), TOKEN_SCOPE)
            );
        }
        other => panic!("expected UnknownToken, got {other:?}"),
    }
    assert_eq!(
        result.as_ref().expect_err("unknown").disposition(),
        Disposition::DeadLetter
    );
    assert!(ack.dead_lettered_with("unknown"), "{:?}", ack.events());
    assert_eq!(runs(&token), 0);
    assert!(
        read_record(&store, TOKEN_SCOPE, &token).await.is_empty(),
        "no record made"
    );
}

#[tokio::test]
async fn token_expired_is_unknown() {
    let (store, clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(60)).await;
    clock.advance(Duration::from_secs(120));
    let ack = RecordingAck::new();
    let result = token_plain(&store, Payment::new(&token, 1), ack.clone()).await;
    assert!(
        matches!(&result, Err(Error::UnknownToken { key, .. }) if *key == token),
        "{result:?}"
    );
    assert!(ack.dead_lettered_with("unknown"), "{:?}", ack.events());
    assert_eq!(runs(&token), 0);
}

#[tokio::test]
async fn token_body_error_puts_the_token_back() {
    let (store, _clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(600)).await;
    let issued = read_record(&store, TOKEN_SCOPE, &token).await;
    fail_once(&token);
    let ack = RecordingAck::new();
    let failed = token_plain(&store, Payment::new(&token, 3), ack.clone()).await;
    assert!(
        matches!(&failed, Err(Error::Handler(AppError::Transient(_)))),
        "{failed:?}"
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());
    let restored = read_record(&store, TOKEN_SCOPE, &token).await;
    assert_eq!(field(&restored, "state"), Some("issued"), "{restored:?}");
    assert!(!restored.contains_key("owner") && !restored.contains_key("until"));
    assert_eq!(
        field(&restored, "expires"),
        field(&issued, "expires"),
        "its lifetime is kept"
    );

    let ack = RecordingAck::at_attempt(2);
    let retried = token_plain(&store, Payment::new(&token, 3), ack.clone())
        .await
        .expect("the retry");
    assert_eq!(retried, Outcome::Processed(3));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&token), 2);
    assert!(
        token_plain(&store, Payment::new(&token, 3), NoAck)
            .await
            .expect("then")
            .is_duplicate()
    );
}

#[tokio::test]
async fn token_spent_on_error_is_unknown_to_the_retry() {
    let (store, _clock) = clocked().await;
    let token = issue(&store, SPENDING_SCOPE, Duration::from_secs(600)).await;
    fail_once(&token);
    let ack = RecordingAck::new();
    let failed = token_spending(&store, Payment::new(&token, 3), ack.clone()).await;
    assert!(matches!(&failed, Err(Error::Handler(_))), "{failed:?}");
    assert!(ack.requeued_once(), "{:?}", ack.events());
    assert!(
        read_record(&store, SPENDING_SCOPE, &token).await.is_empty(),
        "spent"
    );

    let ack = RecordingAck::at_attempt(2);
    let retried = token_spending(&store, Payment::new(&token, 3), ack.clone()).await;
    assert!(
        matches!(&retried, Err(Error::UnknownToken { .. })),
        "{retried:?}"
    );
    assert!(ack.dead_lettered_with("unknown"), "{:?}", ack.events());
    assert_eq!(runs(&token), 1);
}

/// 32 deliveries of one token at once: one takes it, the others find it in use (requeued,
/// never acked); redelivered, they are duplicates. The body ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_32_concurrent_deliveries_take_it_once() {
    let (store, _clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(600)).await;
    hold_next_run(&token);
    let acks: Vec<ReasonAck> = (0..32).map(|_| ReasonAck::new()).collect();
    let (done, mut settled) = tokio::sync::mpsc::unbounded_channel();
    for (index, ack) in acks.iter().enumerate() {
        let (store, message, ack, done) = (
            store.clone(),
            Payment::new(&token, 7),
            ack.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let result = token_plain(&store, message, ack).await;
            done.send((index, result)).expect("the test is listening");
        });
    }
    let mut in_progress = Vec::new();
    for _ in 0..31 {
        let (index, result) = within("the losers to settle", settled.recv())
            .await
            .expect("a result");
        match result {
            Err(Error::InProgress {
                lease_remaining, ..
            }) => {
                assert!(
                    acks[index].requeued_in_progress(lease_remaining),
                    "{:?} {:?}",
                    acks[index].events(),
                    acks[index].reasons()
                );
                in_progress.push(index);
            }
            other => panic!("while the winner's body runs, got {other:?}"),
        }
    }
    started(&token).await;
    release(&token);
    let (winner, result) = within("the winner to finish", settled.recv())
        .await
        .expect("the winner's result");
    assert_eq!(result.expect("the winner"), Outcome::Processed(7));
    assert_eq!(acks[winner].events(), vec![AckEvent::Ack]);

    let redeliveries: Vec<_> = in_progress
        .iter()
        .map(|_| {
            let (store, message) = (store.clone(), Payment::new(&token, 7));
            tokio::spawn(async move { token_plain(&store, message, NoAck).await })
        })
        .collect();
    for redelivery in redeliveries {
        let result = within("a redelivery", redelivery)
            .await
            .expect("redelivery task");
        assert!(result.expect("redelivery").is_duplicate());
    }
    assert_eq!(runs(&token), 1, "exactly one body run");
}

/// A consumer that dies while using a token does not burn it: after `Token::LEASE` (30 s, on
/// the store's clock) the redelivery takes the token and processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_consumer_dying_mid_body_does_not_burn_it() {
    let (store, clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(600)).await;
    hold_next_run(&token);
    let dying = {
        let (store, message) = (store.clone(), Payment::new(&token, 5));
        tokio::spawn(async move { token_plain(&store, message, NoAck).await })
    };
    started(&token).await;
    dying.abort();
    let aborted = within("the consumer to die", dying).await;
    assert!(
        aborted
            .as_ref()
            .is_err_and(tokio::task::JoinError::is_cancelled),
        "{aborted:?}"
    );
    let lease = read_record(&store, TOKEN_SCOPE, &token).await;
    assert_eq!(field(&lease, "state"), Some("lease"), "{lease:?}");
    assert_eq!(
        millis_field(&lease, "until"),
        clock.now_ms() + 30_000,
        "Token::LEASE"
    );

    let ack = ReasonAck::new();
    let blocked = token_plain(&store, Payment::new(&token, 5), ack.clone()).await;
    assert!(
        matches!(&blocked, Err(Error::InProgress { lease_remaining, .. }) if *lease_remaining == Duration::from_secs(30)),
        "{blocked:?}"
    );
    assert!(
        ack.requeued_in_progress(Duration::from_secs(30)),
        "{:?}",
        ack.events()
    );

    clock.advance(Duration::from_secs(31));
    let ack = RecordingAck::at_attempt(2);
    let taken = token_plain(&store, Payment::new(&token, 5), ack.clone())
        .await
        .expect("the redelivery takes the token");
    assert_eq!(taken, Outcome::Processed(5));
    assert_eq!(ack.events(), vec![AckEvent::Ack]);
    assert_eq!(runs(&token), 2);
    assert!(
        token_plain(&store, Payment::new(&token, 5), NoAck)
            .await
            .expect("then")
            .is_duplicate()
    );
}

// ---------------------------------------------------------------------------------------------
// prefix and hash tag

#[tokio::test]
async fn a_custom_prefix_moves_the_records() {
    let plain = store().await;
    let custom = store().await.with_prefix("custom").expect("a valid prefix");

    let token = issue(&custom, TOKEN_SCOPE, Duration::from_secs(600)).await;
    let at = format!("custom:{{{TOKEN_SCOPE}}}:{token}");
    assert_eq!(custom.record_key(TOKEN_SCOPE, &token), at);
    let processed = token_plain(&custom, Payment::new(&token, 1), NoAck)
        .await
        .expect("a token under the custom prefix");
    assert_eq!(processed, Outcome::Processed(1));
    let done: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&at)
        .query_async(&mut custom.connection())
        .await
        .expect("HGETALL");
    assert_eq!(field(&done, "state"), Some("done"), "{done:?}");
    assert!(read_record(&plain, TOKEN_SCOPE, &token).await.is_empty());
    let elsewhere = token_plain(&plain, Payment::new(&token, 1), NoAck).await;
    assert!(
        matches!(&elsewhere, Err(Error::UnknownToken { .. })),
        "the default prefix does not see it: {elsewhere:?}"
    );

    let key = unique_key("redis-prefix");
    lock_plain(&custom, Payment::new(&key, 1), NoAck)
        .await
        .expect("a lock under the custom prefix");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("custom:{{redis.lock}}:{key}"))
        .query_async(&mut custom.connection())
        .await
        .expect("EXISTS");
    assert_eq!(exists, 1);
    assert!(read_record(&plain, "redis.lock", &key).await.is_empty());

    let untagged = store().await.without_hash_tag();
    assert_eq!(
        untagged.record_key("redis.lock", &key),
        format!("idem:redis.lock:{key}")
    );
    lock_plain(&untagged, Payment::new(&key, 1), NoAck)
        .await
        .expect("a lock without the hash tag");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("idem:redis.lock:{key}"))
        .query_async(&mut untagged.connection())
        .await
        .expect("EXISTS");
    assert_eq!(exists, 1);
    assert_eq!(runs(&key), 2, "custom prefix, then no hash tag");

    for bad in ["a:b", "", "a{b", "a}b", "a b"] {
        let refused = store().await.with_prefix(bad);
        assert!(
            matches!(&refused, Err(RedisStoreError::InvalidPrefix(prefix)) if prefix == bad),
            "{bad:?}: {refused:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Found in review

/// A token expires at its `ttl` even while a delivery holds it: once both the holder's lease and
/// the token's lifetime have passed, a takeover finds the token unknown instead of using it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired_under_a_dead_holders_lease_is_unknown() {
    let (store, clock) = clocked().await;
    let token = issue(&store, TOKEN_SCOPE, Duration::from_secs(60)).await;
    hold_next_run(&token);
    let holder = {
        let (store, message) = (store.clone(), Payment::new(&token, 7));
        tokio::spawn(async move { token_plain(&store, message, NoAck).await })
    };
    started(&token).await;
    holder.abort(); // the consumer dies mid-body: its lease stays
    let _ = holder.await;
    clock.advance(Duration::from_secs(120)); // past the 30 s lease and the 60 s token
    let ack = RecordingAck::new();
    let late = token_plain(&store, Payment::new(&token, 7), ack.clone()).await;
    assert!(
        matches!(&late, Err(Error::UnknownToken { .. })),
        "an expired token was used: {late:?}"
    );
    assert!(ack.dead_lettered_with("unknown"), "{:?}", ack.events());
    assert_eq!(runs(&token), 1, "only the dead holder's run");
}

/// A result `replay` cannot serialize, after the body ran: the marker is still written (without
/// the result), so no redelivery runs the body again; the delivery is dead-lettered with the
/// serializer's error for a person to look at.
#[derive(Debug, serde::Deserialize)]
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this result cannot be serialized",
        ))
    }
}

#[idempotent(
    key = "order_id",
    store = "redis",
    strategy = "lock",
    scope = "redis.lock.unserializable",
    replay
)]
async fn lock_unserializable(msg: Payment) -> Result<Unserializable, AppError> {
    count_run(&msg.order_id);
    Ok(Unserializable)
}

#[tokio::test]
async fn lock_result_that_cannot_be_stored_still_marks_the_message_done() {
    let store = store().await;
    let key = unique_key("redis-unserializable");
    let ack = RecordingAck::new();
    let first = lock_unserializable(&store, Payment::new(&key, 1), ack.clone()).await;
    assert!(
        matches!(&first, Err(Error::Serialize { what: "result", .. })),
        "{first:?}"
    );
    assert!(ack.dead_lettered_with("serialize"), "{:?}", ack.events());
    let record = read_record(&store, "redis.lock.unserializable", &key).await;
    assert_eq!(field(&record, "state"), Some("done"), "{record:?}");
    assert!(!record.contains_key("resp"), "{record:?}");
    let _ = lock_unserializable(&store, Payment::new(&key, 1), NoAck).await;
    assert_eq!(runs(&key), 1, "the body ran once");
}

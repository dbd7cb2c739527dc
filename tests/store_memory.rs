//! The memory store (`store = "memory"`, for unit tests): dedup_table semantics in-process.

use idem_runtime::{Error, MemoryStore, MemoryTx, NoAck, Outcome, RequeueReason, idempotent};
use idem_tests::{AckEvent, AppError, Payment, RecordingAck, fail_once, maybe_fail, unique_key};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Body runs of `raced`, which only `concurrent_twins_run_the_body_once` calls.
static RACED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.plain"
)]
async fn plain(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
    maybe_fail(&msg.order_id)?;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.raced"
)]
async fn raced(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
    RACED_RUNS.fetch_add(1, Ordering::SeqCst);
    // Yield while holding the key: twins must wait on it, not run.
    tokio::task::yield_now().await;
    Ok(msg.amount)
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.replay",
    replay,
    fingerprint
)]
async fn replaying(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
    Ok(msg.amount * 10)
}

#[tokio::test]
async fn first_then_duplicate() {
    let store = MemoryStore::new();
    let key = unique_key("mem");
    let ack = RecordingAck::new();
    assert_eq!(
        plain(&store, Payment::new(&key, 1), ack.clone())
            .await
            .unwrap(),
        Outcome::Processed(1)
    );
    assert_eq!(
        plain(&store, Payment::new(&key, 1), ack.clone())
            .await
            .unwrap(),
        Outcome::Duplicate { replayed: None }
    );
    assert_eq!(ack.events(), vec![AckEvent::Ack, AckEvent::Ack]);
    assert_eq!(store.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_run_the_body_once() {
    let store = MemoryStore::new();
    let key = unique_key("mem-race");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let message = Payment::new(&key, 2);
            tokio::spawn(async move { raced(&store, message, NoAck).await })
        })
        .collect();
    let mut processed = 0;
    for task in tasks {
        if task.await.unwrap().unwrap().is_processed() {
            processed += 1;
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(RACED_RUNS.load(Ordering::SeqCst), 1, "the body ran once");
}

#[tokio::test]
async fn failure_rolls_back_the_record() {
    let store = MemoryStore::new();
    let key = unique_key("mem-fail");
    fail_once(&key);
    let ack = RecordingAck::new();
    let failed = plain(&store, Payment::new(&key, 3), ack.clone()).await;
    assert!(matches!(
        failed,
        Err(Error::Handler(AppError::Transient(_)))
    ));
    assert_eq!(
        ack.events(),
        vec![AckEvent::Requeue(RequeueReason::Retryable)]
    );
    assert!(store.is_empty(), "no record after a failed body");
    assert!(
        plain(&store, Payment::new(&key, 3), NoAck)
            .await
            .unwrap()
            .is_processed()
    );
}

#[tokio::test]
async fn replay_and_fingerprint() {
    let store = MemoryStore::new();
    let key = unique_key("mem-replay");
    assert_eq!(
        replaying(&store, Payment::new(&key, 4), NoAck)
            .await
            .unwrap(),
        Outcome::Processed(40)
    );
    assert_eq!(
        replaying(&store, Payment::new(&key, 4), NoAck)
            .await
            .unwrap(),
        Outcome::Duplicate { replayed: Some(40) }
    );
    let mismatch = replaying(&store, Payment::new(&key, 5), NoAck).await;
    assert!(matches!(mismatch, Err(Error::PayloadMismatch { .. })));
}

/// The documented limit of this store: a restart forgets, and the body runs again.
#[tokio::test]
async fn a_restart_forgets_everything() {
    let store = MemoryStore::new();
    let key = unique_key("mem-restart");
    assert!(
        plain(&store, Payment::new(&key, 6), NoAck)
            .await
            .unwrap()
            .is_processed()
    );
    store.clear();
    assert!(
        plain(&store, Payment::new(&key, 6), NoAck)
            .await
            .unwrap()
            .is_processed()
    );
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.ttl",
    ttl = "50ms"
)]
async fn short_lived(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
    Ok(msg.amount)
}

#[tokio::test]
async fn expired_records_stop_counting_and_are_purged() {
    let store = MemoryStore::new();
    let key = unique_key("mem-ttl");
    assert!(
        short_lived(&store, Payment::new(&key, 1), NoAck)
            .await
            .unwrap()
            .is_processed()
    );
    assert!(
        short_lived(&store, Payment::new(&key, 1), NoAck)
            .await
            .unwrap()
            .is_duplicate()
    );
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    assert_eq!(store.purge_expired(), 1);
    assert!(store.is_empty());
    assert!(
        short_lived(&store, Payment::new(&key, 1), NoAck)
            .await
            .unwrap()
            .is_processed()
    );
}

/// An error whose type says which failures a redelivery cannot fix.
#[derive(Debug, thiserror::Error)]
enum StrictError {
    #[error("amount must be positive, got {0}")]
    BadAmount(i64),
}

impl idem_runtime::HandlerError for StrictError {
    fn disposition(&self) -> idem_runtime::Disposition {
        idem_runtime::Disposition::DeadLetter
    }
}

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.strict"
)]
async fn strict(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, StrictError> {
    if msg.amount <= 0 {
        return Err(StrictError::BadAmount(msg.amount));
    }
    Ok(msg.amount)
}

#[tokio::test]
async fn a_permanent_handler_error_is_dead_lettered_and_leaves_no_record() {
    let store = MemoryStore::new();
    let key = unique_key("mem-strict");
    let ack = RecordingAck::new();
    let result = strict(&store, Payment::new(&key, -5), ack.clone()).await;
    assert!(matches!(
        result,
        Err(Error::Handler(StrictError::BadAmount(-5)))
    ));
    assert!(
        matches!(ack.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains("must be positive")),
        "{:?}",
        ack.events()
    );
    assert!(store.is_empty(), "a failed delivery leaves no record");
}

mod spans {
    //! Each handling runs in a span `idem.handle` with scope, key, strategy, store and outcome.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    use super::*;

    type Fields = HashMap<String, String>;

    /// Records the fields of every `idem.handle` span, as set at creation and recorded later.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<HashMap<u64, Fields>>>);

    struct Visitor<'a>(&'a mut Fields);

    impl Visit for Visitor<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Capture {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
            if attrs.metadata().name() == "idem.handle" {
                let mut fields = Fields::new();
                attrs.record(&mut Visitor(&mut fields));
                self.0
                    .lock()
                    .expect("capture lock")
                    .insert(id.into_u64(), fields);
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
            if let Some(fields) = self.0.lock().expect("capture lock").get_mut(&id.into_u64()) {
                values.record(&mut Visitor(fields));
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_handling_has_a_span_with_scope_key_and_outcome() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let _guard = tracing::subscriber::set_default(subscriber);

        let store = MemoryStore::new();
        plain(&store, Payment::new("span-1", 1), NoAck)
            .await
            .unwrap();
        plain(&store, Payment::new("span-1", 1), NoAck)
            .await
            .unwrap();
        let _ = plain(&store, Payment::new("", 1), NoAck).await;

        let spans: Vec<Fields> = capture.0.lock().unwrap().values().cloned().collect();
        let outcome_of = |outcome: &str| {
            spans
                .iter()
                .filter(|f| f.get("outcome").map(String::as_str) == Some(outcome))
                .count()
        };
        assert_eq!(spans.len(), 3, "{spans:?}");
        assert_eq!(
            (
                outcome_of("processed"),
                outcome_of("duplicate"),
                outcome_of("key")
            ),
            (1, 1, 1),
            "{spans:?}"
        );
        for fields in spans
            .iter()
            .filter(|f| f.get("outcome").map(String::as_str) != Some("key"))
        {
            assert_eq!(fields.get("scope").map(String::as_str), Some("mem.plain"));
            assert_eq!(fields.get("key").map(String::as_str), Some("span-1"));
            assert_eq!(
                fields.get("strategy").map(String::as_str),
                Some("dedup_table")
            );
            assert_eq!(fields.get("store").map(String::as_str), Some("memory"));
        }
    }
}

//! The memory store (`store = "memory"`, for unit tests): the conformance suite, less what it
//! cannot do (no business tables, no SQL), plus what only this store has.

idem_tests::conformance_suite! {
    store = "memory",
    tx = idem_runtime::MemoryTx,
    open = idem_tests::memory::store(),
    constraint = "unused",
    placeholders = ["?1", "?2", "?3"],
    skip = [unique_constraint, state_machine, sql],
}

use idem_runtime::{Error, MemoryStore, MemoryTx, NoAck, idempotent};
use idem_tests::{AppError, Payment, RecordingAck, maybe_fail, unique_key};

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
        ack.dead_lettered_with("must be positive"),
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

#[idempotent(
    key = "order_id",
    store = "memory",
    strategy = "dedup_table",
    scope = "mem.panics"
)]
async fn panics(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
    assert!(msg.amount >= 0, "negative amount {}", msg.amount);
    Ok(msg.amount)
}

/// A panicking body rolls back: its key lock is released, so the next delivery of the key is
/// not stuck behind it, and nothing is recorded.
#[tokio::test]
async fn a_panic_releases_the_key_lock() {
    let store = MemoryStore::new();
    let key = unique_key("mem-panic");
    let ack = RecordingAck::new();
    let result = panics(&store, Payment::new(&key, -1), ack.clone()).await;
    assert!(
        matches!(&result, Err(Error::Panicked { message, .. }) if message.contains("negative amount")),
        "{result:?}"
    );
    assert!(ack.requeued_once(), "{:?}", ack.events());
    assert_eq!(store.locked_keys(), 0, "no key lock outlives the panic");
    assert!(!store.has_record("mem.panics", &key));
    // Would wait forever on a lock the panicked delivery kept: `locked_keys` above says none.
    let next = panics(&store, Payment::new(&key, 1), NoAck)
        .await
        .expect("redelivery");
    assert!(next.is_processed());
}

/// A handler future dropped mid-body (a cancelled consumer) rolls back too.
#[tokio::test]
async fn a_cancelled_handler_releases_the_key_lock() {
    /// Tells the test that the body is running (and so holds the key's lock).
    static ENTERED: tokio::sync::Notify = tokio::sync::Notify::const_new();

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.slow"
    )]
    async fn stuck(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
        ENTERED.notify_one();
        std::future::pending::<()>().await;
        Ok(msg.amount)
    }
    let store = MemoryStore::new();
    let key = unique_key("mem-cancel");
    let handler = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { stuck(&store, Payment::new(&key, 1), NoAck).await })
    };
    ENTERED.notified().await;
    assert_eq!(store.locked_keys(), 1, "the body holds the key");
    handler.abort();
    let cancelled = handler.await.expect_err("the handler was cancelled");
    assert!(cancelled.is_cancelled());
    assert_eq!(store.locked_keys(), 0);
    assert!(!store.has_record("mem.slow", &key));
}

mod collision {
    //! Two handlers that share a scope by mistake: their deliveries fail, loudly, instead of
    //! one being acked as a duplicate of the other's messages.
    use super::*;

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.shared"
    )]
    pub async fn emailer(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
        Ok(msg.amount)
    }

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.shared"
    )]
    pub async fn ledger(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
        Ok(msg.amount)
    }

    /// Two handlers that one `macro_rules!` invocation emits share its `file:line:column`:
    /// their names still tell them apart.
    macro_rules! two_handlers_sharing_a_scope {
        ($($name:ident),*) => {$(
            #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "mem.macro_shared")]
            async fn $name(_tx: &mut MemoryTx, msg: Payment) -> Result<i64, AppError> {
                Ok(msg.amount)
            }
        )*};
    }
    two_handlers_sharing_a_scope!(from_a_macro, from_the_same_macro);

    #[tokio::test]
    async fn handlers_from_one_macro_invocation_sharing_a_scope_both_fail() {
        let store = MemoryStore::new();
        let key = unique_key("macro");
        let first = from_a_macro(&store, Payment::new(&key, 1), NoAck).await;
        assert!(
            matches!(&first, Err(Error::ScopeCollision { .. })),
            "{first:?}"
        );
        let second = from_the_same_macro(&store, Payment::new(&key, 1), NoAck).await;
        assert!(
            matches!(&second, Err(Error::ScopeCollision { .. })),
            "{second:?}"
        );
        // A colliding handler's companion collides too.
        let mut tx = idem_runtime::Store::begin(&store).await.expect("begin");
        let in_tx = emailer_in_transaction(&store, &mut tx, Payment::new(&key, 1)).await;
        assert!(
            matches!(&in_tx, Err(Error::ScopeCollision { .. })),
            "emailer shares mem.shared with ledger: {in_tx:?}"
        );
    }

    /// Both fail, whichever is delivered first, in every process: no replica can let one of
    /// them win and then skip the other's messages as duplicates.
    #[tokio::test]
    async fn a_scope_shared_by_two_handlers_fails_both_of_them() {
        let store = MemoryStore::new();
        let key = unique_key("fan-out");
        for attempt in 0..2 {
            let ack = RecordingAck::new();
            let first = emailer(&store, Payment::new(&key, 1), ack.clone()).await;
            assert!(
                matches!(&first, Err(Error::ScopeCollision { scope }) if scope == "mem.shared"),
                "{attempt}: {first:?}"
            );
            assert!(ack.requeued_once(), "{:?}", ack.events());
            let ack = RecordingAck::new();
            let second = ledger(&store, Payment::new(&key, 1), ack.clone()).await;
            assert!(
                matches!(&second, Err(Error::ScopeCollision { .. })),
                "{second:?}"
            );
            assert!(
                ack.requeued_once(),
                "never acked as a duplicate: {:?}",
                ack.events()
            );
        }
        assert!(
            !store.has_record("mem.shared", &key),
            "neither wrote a record"
        );
    }
}

mod user_code_that_panics {
    //! Panics in user code the runtime calls outside the body still settle the delivery.
    use super::*;

    /// A result whose `Serialize` panics (for `replay`).
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Receipt(i64);

    impl serde::Serialize for Receipt {
        fn serialize<S: serde::Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
            panic!("receipt serializer exploded")
        }
    }

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.panicky_result",
        replay
    )]
    async fn with_replay(_tx: &mut MemoryTx, msg: Payment) -> Result<Receipt, AppError> {
        Ok(Receipt(msg.amount))
    }

    /// An error whose `Display` panics, and whose `disposition` does too.
    #[derive(Debug)]
    struct Rude;

    impl std::fmt::Display for Rude {
        fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            panic!("display exploded")
        }
    }

    impl std::error::Error for Rude {}

    impl idem_runtime::HandlerError for Rude {
        fn disposition(&self) -> idem_runtime::Disposition {
            panic!("disposition exploded")
        }
    }

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.rude"
    )]
    async fn rude(_tx: &mut MemoryTx, _msg: Payment) -> Result<(), Rude> {
        Err(Rude)
    }

    #[tokio::test]
    async fn a_panicking_result_serializer_is_rolled_back_and_requeued() {
        let store = MemoryStore::new();
        let key = unique_key("mem-serialize");
        let ack = RecordingAck::new();
        let result = with_replay(&store, Payment::new(&key, 1), ack.clone()).await;
        assert!(
            matches!(
                &result,
                Err(Error::Panicked {
                    during: "result's serialization",
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(ack.requeued_once(), "{:?}", ack.events());
        assert!(!store.has_record("mem.panicky_result", &key));
        assert_eq!(store.locked_keys(), 0);
    }

    #[idempotent(
        key = "order_id",
        store = "memory",
        strategy = "dedup_table",
        scope = "mem.panicky_effect"
    )]
    async fn panicky_effect(tx: &mut MemoryTx, _msg: Payment) -> Result<(), AppError> {
        tx.on_commit(|| panic!("effect exploded"));
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_on_commit_effect_fails_the_commit_and_is_settled() {
        let store = MemoryStore::new();
        let key = unique_key("mem-effect");
        let ack = RecordingAck::new();
        let result = panicky_effect(&store, Payment::new(&key, 1), ack.clone()).await;
        assert!(
            matches!(&result, Err(Error::Database(e)) if e.to_string().contains("effect exploded")),
            "{result:?}"
        );
        assert!(ack.requeued_once(), "{:?}", ack.events());
        assert!(!store.has_record("mem.panicky_effect", &key));
        assert_eq!(store.locked_keys(), 0);
    }

    #[tokio::test]
    async fn an_error_whose_display_and_disposition_panic_is_still_settled() {
        let store = MemoryStore::new();
        let ack = RecordingAck::new();
        let result = rude(&store, Payment::new(unique_key("mem-rude"), 1), ack.clone()).await;
        assert!(matches!(&result, Err(Error::Handler(Rude))), "{result:?}");
        assert!(
            ack.requeued_once(),
            "retried, as when nothing is known: {:?}",
            ack.events()
        );
    }
}

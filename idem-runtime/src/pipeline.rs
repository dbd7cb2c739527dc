//! The order that makes the guarantee, for every strategy on every store:
//!
//! 1. build the key and the fingerprint (an invalid key is a permanent error: dead-letter);
//! 2. begin the store's transaction;
//! 3. [`Strategy::enter`]: the gate before the body (may find a duplicate);
//! 4. run the body with the transaction (generated code, between [`open`] and
//!    [`OpenGate::finish`]), catching a panic;
//! 5. [`Strategy::leave`]: the gate after the body (may write the record, may find a duplicate);
//! 6. commit, after checking that the transaction is still the one step 2 opened (a body that
//!    ignored a failed statement may have let the database abort it);
//! 7. only then acknowledge, with the [`Committed`] proof the commit produced.
//!
//! In a transaction the caller owns ([`open_in`], `<name>_in_transaction`) the steps are the
//! same, with a savepoint of the call's own in place of begin, commit and rollback, and no ack.
//!
//! A failure anywhere rolls back, then requeues with a growing delay (retryable, until the
//! handler's `max_attempts`) or dead-letters (permanent, or out of attempts). A failure that the
//! strategy recognises as "an earlier delivery committed" (a unique violation under
//! `unique_constraint`) becomes a duplicate instead, and is acked.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;

pub mod batch;
#[cfg(feature = "redis")]
pub mod lease;
use tracing::Instrument as _;

use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue, Settlement};
use crate::error::{Error, HandlerErrors};
use crate::key::{Key, KeyError};
use crate::outcome::Outcome;
use crate::payload::ResultCodec;
use crate::retry::RetryPolicy;
use crate::store::{CommitFailure, Store, StoredRecord};
use crate::strategy::{Delivery, Gate, Strategy};

/// What the macro knows about a handler. The generated code keeps it in a `static`, whose
/// address identifies the handler (see [`Error::ScopeCollision`]).
#[derive(Debug)]
pub struct HandlerSpec {
    scope: &'static str,
    /// Where the handler is declared (`file:line:column` of its attribute): the generated
    /// entry points of one handler (the function, `_in_transaction`) each keep a spec, and
    /// share this.
    site: Option<&'static str>,
    ttl: Option<Duration>,
    retry: RetryPolicy,
    observe: bool,
    observed: AtomicU64,
    registered: AtomicBool,
}

impl HandlerSpec {
    /// A handler in `scope`, whose records never expire, with the default [`RetryPolicy`].
    pub const fn new(scope: &'static str) -> Self {
        Self {
            scope,
            site: None,
            ttl: None,
            retry: RetryPolicy::DEFAULT,
            observe: false,
            observed: AtomicU64::new(0),
            registered: AtomicBool::new(false),
        }
    }

    /// `mode = "observe"`: the gate runs and records as it would, but a delivery it would drop
    /// as a duplicate is logged, counted and processed anyway.
    #[must_use]
    pub const fn observing(mut self) -> Self {
        self.observe = true;
        self
    }

    /// Whether the handler is in `mode = "observe"`.
    pub const fn is_observing(&self) -> bool {
        self.observe
    }

    /// How many deliveries this handler, in `mode = "observe"`, processed although its gate
    /// found an earlier delivery of the message (in this process, since it started).
    pub fn observed_duplicates(&self) -> u64 {
        self.observed.load(Ordering::Relaxed)
    }

    /// The handler is the one declared at `site` (`file:line:column`): specs with the same
    /// site are one handler's, never a scope collision.
    #[must_use]
    pub const fn at(mut self, site: &'static str) -> Self {
        self.site = Some(site);
        self
    }

    /// What tells handlers apart: the declaration site, or else the spec's address.
    fn identity(&'static self) -> Identity {
        match self.site {
            Some(site) => Identity::Site(site),
            None => Identity::Address(std::ptr::from_ref(self) as usize),
        }
    }

    /// Records expire `millis` after they are written.
    #[must_use]
    pub const fn with_ttl_millis(mut self, millis: u64) -> Self {
        self.ttl = Some(Duration::from_millis(millis));
        self
    }

    /// At most `max_attempts` deliveries before a retryable failure is dead-lettered.
    #[must_use]
    pub const fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.retry = RetryPolicy::with_max_attempts(max_attempts);
        self
    }

    /// The handler's scope.
    pub const fn scope(&self) -> &'static str {
        self.scope
    }

    /// How long records count, `None` = forever.
    pub const fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// When to give up, and how long to wait between attempts.
    pub const fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Checks, once, that no other handler in this binary uses this handler's scope. Every
    /// handler registers its spec at compile time ([`Registration`]), so the answer is the
    /// same in every process, whatever order the deliveries come in: all the handlers that
    /// share a scope fail, none of them silently wins.
    fn register(&'static self) -> Result<(), ()> {
        if self.registered.load(Ordering::Acquire) {
            return Ok(());
        }
        if handlers_sharing(self.scope) > 1 {
            return Err(());
        }
        self.registered.store(true, Ordering::Release);
        Ok(())
    }
}

/// A handler's entry in the binary-wide list of handlers (through `inventory`), emitted by
/// `#[idempotent]` next to the handler's [`HandlerSpec`].
#[derive(Debug)]
pub struct Registration {
    spec: &'static HandlerSpec,
}

impl Registration {
    /// The entry of the handler whose spec is `spec`.
    pub const fn of(spec: &'static HandlerSpec) -> Self {
        Self { spec }
    }
}

inventory::collect!(Registration);

/// How many deliveries the handler(s) in `scope` processed in `mode = "observe"` although
/// their gate found an earlier delivery of the message: what enforcing would have dropped. In
/// this process, since it started; 0 for an unknown scope.
///
/// ```
/// assert_eq!(idem_runtime::observed_duplicates("no.such.scope"), 0);
/// ```
pub fn observed_duplicates(scope: &str) -> u64 {
    // Each spec is submitted once: one handler's entry points count separately, and add up.
    inventory::iter::<Registration>
        .into_iter()
        .filter(|registration| registration.spec.scope == scope)
        .map(|registration| registration.spec.observed_duplicates())
        .sum()
}

/// One handler, however many specs its entry points keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Site(&'static str),
    Address(usize),
}

/// How many distinct handlers of this binary use `scope`.
fn handlers_sharing(scope: &str) -> usize {
    static SCOPES: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    let scopes = SCOPES.get_or_init(|| {
        let mut specs: HashMap<&'static str, Vec<Identity>> = HashMap::new();
        for registration in inventory::iter::<Registration> {
            let identity = registration.spec.identity();
            let owners = specs.entry(registration.spec.scope).or_default();
            if !owners.contains(&identity) {
                owners.push(identity);
            }
        }
        specs
            .into_iter()
            .map(|(scope, owners)| (scope, owners.len()))
            .collect()
    });
    scopes.get(scope).copied().unwrap_or(0)
}

/// A handler's return type: `Result<T, E>`.
#[diagnostic::on_unimplemented(
    message = "an `#[idempotent]` handler must return `Result<T, E>`, not `{Self}`",
    label = "not a `Result`",
    note = "return `Result<(), E>` (or `Result<T, E>` with a result to replay), where `E: idem_runtime::HandlerError`"
)]
pub trait HandlerResult {
    /// `T`.
    type Ok;
    /// `E`.
    type Err;
    /// The `Result` itself.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
}

impl<T, E> HandlerResult for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Self {
        self
    }
}

pub use crate::unwind::PanicPayload;
use crate::unwind::{catch_sync, panic_message};

/// The strategy, key and fingerprint of a delivery, built (and any panic caught) before the
/// gate: they run user code (`StateKeyPart`, `KeyPart`, `Serialize`).
#[derive(Debug)]
pub struct Prepared<G> {
    /// The gate, the key and the fingerprint; or what panicked, and its message.
    built: Result<Built<G>, (&'static str, String)>,
}

/// The gate, the key and the fingerprint, each as user code produced it.
type Built<G> = (
    G,
    Result<Key, KeyError>,
    Result<Option<String>, serde_json::Error>,
);

impl<G> Prepared<G> {
    /// Builds the strategy's gate with `strategy`, the key with `key` and the fingerprint with
    /// `fingerprint` (`None` without `fingerprint`), catching a panic in any of them.
    pub fn new(
        strategy: impl FnOnce() -> G,
        key: impl FnOnce() -> Result<Key, KeyError>,
        fingerprint: impl FnOnce() -> Option<Result<String, serde_json::Error>>,
    ) -> Self {
        let built = catch_sync(|| (strategy(), key()))
            .map_err(|message| ("key", message))
            .and_then(|(strategy, key)| {
                let fingerprint = catch_sync(fingerprint)
                    .map_err(|message| ("fingerprint", message))?
                    .transpose();
                Ok((strategy, key, fingerprint))
            });
        Self { built }
    }
}

type Settled<T, E> = Result<Outcome<T>, Error<E>>;
type Attempt<T, E> = Result<(Outcome<T>, Committed), Error<E>>;

/// A delivery whose gate opened: it holds the transaction the body runs in, and everything
/// [`finish`](Self::finish) needs to record, commit and acknowledge.
///
/// Made by [`open`]. The generated code runs the body between the two, as an ordinary async
/// block borrowing [`parts`](Self::parts): no closure, so no higher-ranked bound that would
/// defeat the `Send` check of the handler's future.
#[must_use = "an open gate holds a transaction: finish it"]
pub struct OpenGate<'s, S: Store, G, C, A, E> {
    store: &'s S,
    handling: Handling,
    entered: Entered<G, C>,
    ack: A,
    errors: HandlerErrors<E>,
    tx: S::Tx,
    span: tracing::Span,
}

impl<S: Store, G, C, A, E> std::fmt::Debug for OpenGate<'_, S, G, C, A, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenGate")
            .field("store", &S::NAME)
            .field("key", &self.entered.key)
            .finish_non_exhaustive()
    }
}

/// Step one: checks the key, begins the transaction and runs the gate before the body.
///
/// `Ok` means the body should run (see [`OpenGate`]). `Err` carries the final result of a
/// delivery that is already settled with the broker: a duplicate (acked), or a failure
/// (requeued or dead-lettered).
#[allow(clippy::too_many_arguments)] // called once, by generated code
pub async fn open<'s, S, G, C, A, T, E>(
    store: &'s S,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
    errors: HandlerErrors<E>,
    ack: A,
) -> Result<OpenGate<'s, S, G, C, A, E>, Settled<T, E>>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
    A: Acknowledger,
{
    let handling = Handling::start(spec, G::NAME, S::NAME);
    let span = handling.span(&ack);
    let opened = enter(store, spec, prepared, codec)
        .instrument(span.clone())
        .await;
    match opened {
        Ok((entered, tx)) => Ok(OpenGate {
            store,
            handling,
            entered,
            ack,
            errors,
            tx,
            span,
        }),
        Err(attempt) => Err(conclude(ack, handling, errors, attempt)
            .instrument(span)
            .await),
    }
}

/// One handling of a delivery, from its start to its settlement: the handler, the strategy and
/// the store it is labelled with (in its span and its metrics), and when it started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handling {
    spec: &'static HandlerSpec,
    strategy: &'static str,
    store: &'static str,
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Handling {
    /// A handling by the handler of `spec`, with `strategy` on `store`, starting now.
    pub(crate) fn start(
        spec: &'static HandlerSpec,
        strategy: &'static str,
        store: &'static str,
    ) -> Self {
        Self {
            spec,
            strategy,
            store,
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    /// The handler's spec.
    pub(crate) fn spec(&self) -> &'static HandlerSpec {
        self.spec
    }

    /// The span of one delivery's handling, `idem.handle`; `key` and `outcome` are recorded as
    /// they become known.
    pub(crate) fn span(&self, ack: &impl Acknowledger) -> tracing::Span {
        tracing::info_span!(
            "idem.handle",
            scope = self.spec.scope(),
            key = tracing::field::Empty,
            strategy = self.strategy,
            store = self.store,
            attempt = ack.attempt().unwrap_or(1).max(1),
            outcome = tracing::field::Empty,
        )
    }

    /// The delivery was acked with `outcome`, at delivery number `attempt`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn acked<T>(&self, outcome: &Outcome<T>, attempt: u32) {
        #[cfg(feature = "metrics")]
        crate::metrics::record(
            self.labels(),
            crate::metrics::acked(outcome),
            self.started.elapsed(),
            outcome.is_processed().then_some(attempt),
        );
    }

    /// The delivery failed, and was settled as `settlement` says.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn failed(&self, settlement: &Settlement) {
        #[cfg(feature = "metrics")]
        crate::metrics::record(
            self.labels(),
            crate::metrics::settled(settlement),
            self.started.elapsed(),
            None,
        );
    }

    /// A call in the caller's transaction ended, with no broker to tell: its outcome, or
    /// `failed`; no attempt number.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn ended_in_transaction<T, E>(&self, attempt: &Attempt<T, E>) {
        #[cfg(feature = "metrics")]
        crate::metrics::record(
            self.labels(),
            match attempt {
                Ok((outcome, _)) => crate::metrics::acked(outcome),
                Err(_) => crate::metrics::OUTCOME_FAILED,
            },
            self.started.elapsed(),
            None,
        );
    }

    #[cfg(feature = "metrics")]
    fn labels(&self) -> crate::metrics::Labels {
        crate::metrics::Labels {
            scope: self.spec.scope(),
            strategy: self.strategy,
            store: self.store,
        }
    }
}

/// What `enter` hands to the gate.
struct Entered<G, C> {
    strategy: G,
    key: Key,
    fingerprint: Option<String>,
    now_ms: i64,
    expires_at_ms: Option<i64>,
    wants_record: bool,
    codec: C,
    /// Observe mode: the gate found an earlier delivery, and the body runs anyway.
    observed: Option<Observed>,
}

/// What observe mode saw: an earlier delivery's record.
#[derive(Debug, Clone, Copy)]
struct Observed {
    first_seen_ms: Option<i64>,
}

impl<G, C> Entered<G, C> {
    fn delivery(&self) -> Delivery<'_> {
        Delivery {
            key: &self.key,
            fingerprint: self.fingerprint.as_deref(),
            now_ms: self.now_ms,
            expires_at_ms: self.expires_at_ms,
            wants_record: self.wants_record,
        }
    }
}

/// The key, the fingerprint and the expiry of a delivery, before any transaction; `Err` when
/// the delivery cannot go on (a panic in user code, a shared scope, an invalid key).
fn prepare<G, C, T, E>(
    now_ms: i64,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
) -> Result<Entered<G, C>, Attempt<T, E>>
where
    C: ResultCodec<T>,
{
    let (strategy, key, fingerprint) = prepared.built.map_err(|(during, message)| {
        Err(Error::Panicked {
            scope: spec.scope().to_owned(),
            during,
            message,
        })
    })?;
    if spec.register().is_err() {
        return Err(Err(Error::ScopeCollision {
            scope: spec.scope().to_owned(),
        }));
    }
    let key = key.map_err(|error| Err(Error::Key(error)))?;
    tracing::Span::current().record("key", key.value());
    let fingerprint = fingerprint.map_err(|source| {
        Err(Error::Serialize {
            what: "payload",
            source,
        })
    })?;
    let expires_at_ms = spec.ttl().map(|ttl| {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(ttl_ms)
    });
    // Observe mode reports when an earlier delivery was first seen: that is in the record too.
    let wants_record = fingerprint.is_some() || C::STORES_RESULTS || spec.is_observing();
    Ok(Entered {
        strategy,
        key,
        fingerprint,
        now_ms,
        expires_at_ms,
        wants_record,
        codec,
        observed: None,
    })
}

/// `Ok`: run the body in this transaction. `Err`: the delivery already ended (a duplicate, an
/// invalid key, a refused or failed gate), and only needs settling with the broker.
async fn enter<S, G, C, T, E>(
    store: &S,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
) -> Result<(Entered<G, C>, S::Tx), Attempt<T, E>>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let mut entered = prepare(store.now_ms(), spec, prepared, codec)?;
    let delivery = entered.delivery();
    // The gate may travel with the BEGIN (PostgreSQL); a failure to begin is a database error
    // like any other: the delivery is retried.
    let begun = entered
        .strategy
        .open(store, &delivery)
        .await
        .map_err(|error| Err(Error::Database(error)))?;
    match judge(spec, begun.verdict, &delivery, &entered.codec) {
        Ok(observed) => {
            let tx = match begun.tx {
                Some(tx) => tx,
                // Observe mode met a duplicate that a one-round-trip gate already ended the
                // transaction of: the body runs in a transaction of its own.
                None if observed.is_some() => store
                    .begin()
                    .await
                    .map_err(|error| Err(Error::Database(error)))?,
                None => {
                    return Err(Err(Error::Database(sqlx::Error::Protocol(
                        "idem: the gate opened without a transaction (a store bug; please report it)"
                            .into(),
                    ))));
                }
            };
            entered.observed = observed;
            failpoint!(crate::failpoints::AFTER_GATE);
            Ok((entered, tx))
        }
        Err(ended) => {
            if let Some(tx) = begun.tx {
                rollback(store, tx).await;
            }
            Err(ended)
        }
    }
}

/// The gate's verdict before the body: `Ok` to run the body (in observe mode, also on a
/// duplicate, with what was observed); `Err` with how the delivery ends (a duplicate, a
/// refusal, or the gate's own database error), after which the caller undoes the gate's writes.
fn judge<C: ResultCodec<T>, T, E>(
    spec: &HandlerSpec,
    verdict: Result<Gate, sqlx::Error>,
    delivery: &Delivery<'_>,
    codec: &C,
) -> Result<Option<Observed>, Attempt<T, E>> {
    match verdict {
        Ok(Gate::Open) => Ok(None),
        Ok(Gate::Duplicate(record)) if spec.is_observing() => {
            Ok(Some(observe(spec, delivery, record)))
        }
        Ok(Gate::Duplicate(record)) => Err(accept_duplicate(delivery, codec, record)),
        Ok(Gate::Refused(refusal)) => Err(Err(refusal.into_error(delivery.key))),
        Err(error) => Err(Err(commit_failure(
            CommitFailure::Database(error),
            delivery,
        ))),
    }
}

/// Observe mode met a delivery that enforcing would drop: log it, count it, let the body run.
fn observe(spec: &HandlerSpec, delivery: &Delivery<'_>, record: Option<StoredRecord>) -> Observed {
    let first_seen_ms = record.as_ref().and_then(first_seen_ms);
    let mismatch = matches!(
        (delivery.fingerprint, record.as_ref().and_then(|r| r.fingerprint.as_deref())),
        (Some(ours), Some(theirs)) if ours != theirs
    );
    tracing::warn!(
        target: "idem",
        scope = spec.scope(),
        key = delivery.key.value(),
        first_seen_ms,
        payload_mismatch = mismatch,
        "observe mode: an earlier delivery of this message committed, so enforcing would {}; running the body anyway",
        if mismatch { "dead-letter it (its payload differs)" } else { "ack it without running the body" }
    );
    Observed { first_seen_ms }
}

/// When the record was first written.
fn first_seen_ms(record: &StoredRecord) -> Option<i64> {
    Some(record.created_at_ms)
}

impl<'s, S, G, C, A, E> OpenGate<'s, S, G, C, A, E>
where
    S: Store,
    G: Strategy<S>,
    A: Acknowledger,
{
    /// The transaction for the body, and the delivery's span to run the body in.
    pub fn parts(&mut self) -> (&mut S::Tx, tracing::Span) {
        (&mut self.tx, self.span.clone())
    }

    /// Step two, after the body: on success, the gate after the body, the commit, then the
    /// ack; on failure or panic, the rollback, then requeue or dead-letter (or, when the
    /// strategy recognises the failure as a duplicate, the ack).
    pub async fn finish<T>(self, result: Result<Result<T, E>, PanicPayload>) -> Settled<T, E>
    where
        C: ResultCodec<T>,
    {
        let Self {
            store,
            handling,
            entered,
            ack,
            errors,
            tx,
            span,
        } = self;
        async move {
            let attempt = complete(store, &entered, errors, tx, result).await;
            count_observed(handling.spec(), &attempt);
            conclude(ack, handling, errors, attempt).await
        }
        .instrument(span)
        .await
    }
}

/// A delivery gated inside a transaction its caller owns (`in_transaction`): it holds the
/// caller's transaction, with the savepoint `open_in` took, until [`finish`](Self::finish).
/// Nothing here begins, commits or acknowledges: the caller's commit makes the gate's record
/// and the body's writes durable together, its rollback undoes both.
#[must_use = "a gate holds a savepoint in your transaction: finish it"]
pub struct CallerGate<'s, 't, S: Store, G, C, E> {
    store: &'s S,
    handling: Handling,
    savepoint: String,
    entered: Entered<G, C>,
    errors: HandlerErrors<E>,
    tx: &'t mut S::Tx,
    span: tracing::Span,
}

impl<S: Store, G, C, E> std::fmt::Debug for CallerGate<'_, '_, S, G, C, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerGate")
            .field("store", &S::NAME)
            .field("key", &self.entered.key)
            .finish_non_exhaustive()
    }
}

/// Step one of `in_transaction`: checks the key, takes a savepoint in the caller's
/// transaction and runs the gate before the body there. `Err` carries the final result when
/// the body must not run: a duplicate (`Ok`), or a failure, after the savepoint was rolled
/// back.
pub async fn open_in<'s, 't, S, G, C, T, E>(
    store: &'s S,
    tx: &'t mut S::Tx,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
    errors: HandlerErrors<E>,
) -> Result<CallerGate<'s, 't, S, G, C, E>, Settled<T, E>>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let handling = Handling::start(spec, G::NAME, S::NAME);
    let span = tracing::info_span!(
        "idem.handle_in_transaction",
        scope = spec.scope(),
        key = tracing::field::Empty,
        strategy = G::NAME,
        store = S::NAME,
        outcome = tracing::field::Empty,
    );
    // A name of its own, so that calls nest (a body that calls another handler's
    // `_in_transaction` on the same transaction).
    static SAVEPOINTS: AtomicU64 = AtomicU64::new(0);
    let savepoint = format!("idem_call_{}", SAVEPOINTS.fetch_add(1, Ordering::Relaxed));
    let name = savepoint.as_str();
    let opened = async {
        let mut entered = prepare(store.now_ms(), spec, prepared, codec)?;
        let delivery = entered.delivery();
        store
            .savepoint(tx, name)
            .await
            .map_err(|failure| Err(commit_failure(failure, &delivery)))?;
        let verdict = entered.strategy.enter(store, tx, &delivery).await;
        match judge(spec, verdict, &delivery, &entered.codec) {
            Ok(observed) => {
                entered.observed = observed;
                Ok(entered)
            }
            Err(ended) => match rollback_to_savepoint(store, tx, name, &delivery).await {
                Ok(()) => Err(ended),
                Err(gone) => Err(Err(gone)),
            },
        }
    }
    .instrument(span.clone())
    .await;
    match opened {
        Ok(entered) => Ok(CallerGate {
            store,
            handling,
            savepoint,
            entered,
            errors,
            tx,
            span,
        }),
        Err(attempt) => Err(record_outcome(&span, handling, attempt)),
    }
}

impl<S, G, C, E> CallerGate<'_, '_, S, G, C, E>
where
    S: Store,
    G: Strategy<S>,
{
    /// The caller's transaction for the body, and the span to run the body in.
    pub fn parts(&mut self) -> (&mut S::Tx, tracing::Span) {
        (&mut *self.tx, self.span.clone())
    }

    /// Step two, after the body: on success, the gate after the body and the release of the
    /// savepoint (the writes are now the caller's to commit); on failure or panic, the rollback
    /// to the savepoint, so that nothing of this call stays in the caller's transaction.
    pub async fn finish<T>(self, result: Result<Result<T, E>, PanicPayload>) -> Settled<T, E>
    where
        C: ResultCodec<T>,
    {
        let Self {
            store,
            handling,
            savepoint,
            entered,
            errors,
            tx,
            span,
        } = self;
        let attempt = complete_in(store, &entered, errors, tx, &savepoint, result)
            .instrument(span.clone())
            .await;
        count_observed(handling.spec(), &attempt);
        record_outcome(&span, handling, attempt)
    }
}

/// Records the outcome on the span and in the metrics; no broker to tell.
fn record_outcome<T, E>(
    span: &tracing::Span,
    handling: Handling,
    attempt: Attempt<T, E>,
) -> Settled<T, E> {
    handling.ended_in_transaction(&attempt);
    match attempt {
        Ok((outcome, _proof)) => {
            span.record("outcome", outcome.as_str());
            Ok(outcome)
        }
        Err(error) => {
            span.record("outcome", error.kind_str());
            Err(error)
        }
    }
}

async fn complete_in<S, G, C, T, E>(
    store: &S,
    entered: &Entered<G, C>,
    errors: HandlerErrors<E>,
    tx: &mut S::Tx,
    name: &str,
    result: Result<Result<T, E>, PanicPayload>,
) -> Attempt<T, E>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let delivery = entered.delivery();
    match after_body(store, entered, tx, Alive::Savepoint(name), result).await {
        AfterBody::Keep(value) => match store.release_savepoint(tx, name).await {
            // Not committed yet: the proof is dropped, nothing acknowledges.
            Ok(()) => Ok((outcome_of(entered.observed, value), Committed::new())),
            Err(failure) => {
                rollback_to_savepoint(store, tx, name, &delivery).await?;
                Err(commit_failure(failure, &delivery))
            }
        },
        AfterBody::Undo(undo) => {
            rollback_to_savepoint(store, tx, name, &delivery).await?;
            undone(store, entered, errors, undo).await
        }
    }
}

async fn rollback_to_savepoint<S: Store, E>(
    store: &S,
    tx: &mut S::Tx,
    name: &str,
    delivery: &Delivery<'_>,
) -> Result<(), Error<E>> {
    // When the savepoint cannot be rolled back to, the database ended the caller's whole
    // transaction (a deadlock on MySQL, `OR ROLLBACK` on SQLite): the caller must know, since
    // a commit there would commit nothing (or, in autocommit mode, succeed on nothing) while
    // the caller's own writes are gone.
    store
        .rollback_to_savepoint(tx, name)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "the caller's transaction is gone: it must be rolled back");
            Error::TransactionAborted {
                scope: delivery.key.scope().to_owned(),
                key: delivery.key.value().to_owned(),
            }
        })
}

/// Observe mode counts a would-be duplicate once its body's effects are committed (or, in a
/// caller's transaction, released into it).
fn count_observed<T, E>(spec: &HandlerSpec, attempt: &Attempt<T, E>) {
    if let Ok((Outcome::ObservedDuplicate { .. }, _)) = attempt {
        spec.observed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the body in the delivery's span and catches a panic in it, so that the delivery is
/// still rolled back and settled. `R` is the handler's declared return type, given explicitly
/// so that `?` inside the body's async block knows what to convert into.
pub fn body<R, F: Future<Output = R>>(
    span: tracing::Span,
    body: F,
) -> impl Future<Output = Result<R, PanicPayload>> {
    // After a panic the transaction is rolled back and nothing the body touched is used again.
    AssertUnwindSafe(body.instrument(span)).catch_unwind()
}

use std::future::Future;

async fn complete<S, G, C, T, E>(
    store: &S,
    entered: &Entered<G, C>,
    errors: HandlerErrors<E>,
    mut tx: S::Tx,
    result: Result<Result<T, E>, PanicPayload>,
) -> Attempt<T, E>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let delivery = entered.delivery();
    failpoint!(crate::failpoints::AFTER_BODY);
    let value = match after_body(store, entered, &mut tx, Alive::Transaction, result).await {
        AfterBody::Keep(value) => value,
        AfterBody::Undo(undo) => {
            rollback(store, tx).await;
            return undone(store, entered, errors, undo).await;
        }
    };
    failpoint!(crate::failpoints::BEFORE_COMMIT);
    match store.commit(tx).await {
        Ok(()) => Ok((outcome_of(entered.observed, value), Committed::new())),
        Err(CommitFailure::Database(error))
            if entered.strategy.is_duplicate_failure(store, &error) =>
        {
            accept_duplicate(
                &delivery,
                &entered.codec,
                read_record(store, &delivery).await?,
            )
        }
        // The commit's outcome may be unknown (connection lost mid-commit): requeue, and let
        // the gate sort the redelivery out.
        Err(failure) => Err(commit_failure(failure, &delivery)),
    }
}

/// How the runtime proves a transaction still open before it writes after the body (on MySQL
/// and SQLite a write in a transaction the database ended would autocommit alone).
enum Alive<'n> {
    /// The runtime's own transaction: [`Store::ensure_open`].
    Transaction,
    /// A caller's transaction, holding the call's savepoint `name`: a probe savepoint of its
    /// own (taking one proves the transaction open), so that the call's stays in place and a
    /// failure after this still undoes the body's writes.
    Savepoint(&'n str),
}

/// What the body's result comes to, before its transaction (or savepoint) ends.
enum AfterBody<T, E> {
    /// Keep the writes: commit, or release the caller's savepoint.
    Keep(T),
    /// Undo the writes, then end as this says.
    Undo(Undo<T, E>),
}

/// How a delivery ends once its writes are undone.
enum Undo<T, E> {
    /// The body failed: a duplicate if the strategy says so (read after the rollback), else
    /// the handler's error.
    Handler(E),
    /// Decided already.
    Ended(Attempt<T, E>),
}

/// The steps after the body, the same in the runtime's own transaction and in a caller's: the
/// body's result (a panic and an error undo), its encoding for `replay`, then the gate after
/// the body, skipped for an observed duplicate (the record is the first delivery's).
async fn after_body<S, G, C, T, E>(
    store: &S,
    entered: &Entered<G, C>,
    tx: &mut S::Tx,
    alive: Alive<'_>,
    result: Result<Result<T, E>, PanicPayload>,
) -> AfterBody<T, E>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let delivery = entered.delivery();
    let panicked = |during, message| {
        AfterBody::Undo(Undo::Ended(Err(Error::Panicked {
            scope: delivery.key.scope().to_owned(),
            during,
            message,
        })))
    };
    let value = match result {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => return AfterBody::Undo(Undo::Handler(error)),
        Err(payload) => return panicked("body", panic_message(&payload)),
    };
    let response = match catch_sync(|| entered.codec.encode(&value)) {
        Ok(Ok(response)) => response,
        Ok(Err(source)) => {
            return AfterBody::Undo(Undo::Ended(Err(Error::Serialize {
                what: "result",
                source,
            })));
        }
        Err(message) => return panicked("result's serialization", message),
    };
    if entered.observed.is_some() {
        return AfterBody::Keep(value);
    }
    let strategy = &entered.strategy;
    if strategy.writes_after_body(&delivery, response.as_deref()) {
        let open = match alive {
            Alive::Transaction => store.ensure_open(tx).await,
            Alive::Savepoint(name) => {
                let probe = format!("{name}_probe");
                match store.savepoint(tx, &probe).await {
                    Ok(()) => store.release_savepoint(tx, &probe).await,
                    Err(failure) => Err(failure),
                }
            }
        };
        if let Err(failure) = open {
            return AfterBody::Undo(Undo::Ended(Err(commit_failure(failure, &delivery))));
        }
    }
    let verdict = strategy
        .leave(store, tx, &delivery, response.as_deref())
        .await;
    match judge_after_body(verdict, &delivery, &entered.codec) {
        Ok(()) => AfterBody::Keep(value),
        Err(ended) => AfterBody::Undo(Undo::Ended(ended)),
    }
}

/// The end of a delivery whose writes were undone.
async fn undone<S, G, C, T, E>(
    store: &S,
    entered: &Entered<G, C>,
    errors: HandlerErrors<E>,
    undo: Undo<T, E>,
) -> Attempt<T, E>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    match undo {
        Undo::Ended(attempt) => attempt,
        Undo::Handler(error) => {
            // The error's `source()` chain is user code: a panic there means "not a duplicate".
            let duplicate = catch_sync(|| {
                entered
                    .strategy
                    .is_duplicate_failure(store, errors.as_error(&error))
            })
            .unwrap_or(false);
            if duplicate {
                let delivery = entered.delivery();
                let record = read_record(store, &delivery).await?;
                return accept_duplicate(&delivery, &entered.codec, record);
            }
            Err(Error::Handler(error))
        }
    }
}

/// The gate's verdict after the body: a duplicate there (a twin committed first) is one even in
/// observe mode, since the body's writes and the twin's cannot both stand.
fn judge_after_body<C: ResultCodec<T>, T, E>(
    verdict: Result<Gate, sqlx::Error>,
    delivery: &Delivery<'_>,
    codec: &C,
) -> Result<(), Attempt<T, E>> {
    match verdict {
        Ok(Gate::Open) => Ok(()),
        Ok(Gate::Duplicate(record)) => Err(accept_duplicate(delivery, codec, record)),
        Ok(Gate::Refused(refusal)) => Err(Err(refusal.into_error(delivery.key))),
        Err(error) => Err(Err(commit_failure(
            CommitFailure::Database(error),
            delivery,
        ))),
    }
}

/// A body that ran and committed: processed, or, in observe mode, an observed duplicate.
fn outcome_of<T>(observed: Option<Observed>, value: T) -> Outcome<T> {
    match observed {
        None => Outcome::Processed(value),
        Some(Observed { first_seen_ms }) => Outcome::ObservedDuplicate {
            value,
            first_seen_ms,
        },
    }
}

/// The error of a transaction that could not commit.
fn commit_failure<E>(failure: CommitFailure, delivery: &Delivery<'_>) -> Error<E> {
    match failure {
        CommitFailure::Aborted => Error::TransactionAborted {
            scope: delivery.key.scope().to_owned(),
            key: delivery.key.value().to_owned(),
        },
        CommitFailure::Database(error) if crate::classify::is_transaction_gone(&error) => {
            Error::TransactionAborted {
                scope: delivery.key.scope().to_owned(),
                key: delivery.key.value().to_owned(),
            }
        }
        CommitFailure::Database(error) => Error::Database(error),
    }
}

/// Records the outcome on the span, then tells the broker: ack a committed outcome, requeue a
/// retryable failure with a delay until the policy's last attempt, dead-letter the rest. A
/// failure to tell it is logged, not returned: after a commit, the redelivery it causes is a
/// duplicate; after a failure, the broker redelivers anyway. Every delivery settles here, so
/// this is where the handling's metrics are recorded, once it is settled.
async fn conclude<T, E, A: Acknowledger>(
    ack: A,
    handling: Handling,
    errors: HandlerErrors<E>,
    attempt: Attempt<T, E>,
) -> Settled<T, E> {
    let span = tracing::Span::current();
    let spec = handling.spec();
    let number = ack.attempt().unwrap_or(1).max(1);
    match attempt {
        Ok((outcome, proof)) => {
            span.record("outcome", outcome.as_str());
            failpoint!(crate::failpoints::AFTER_COMMIT);
            if let Err(error) = ack.ack(proof).await {
                tracing::warn!(
                    %error,
                    "ack failed after commit; the broker will redeliver and the gate will report a duplicate"
                );
            }
            handling.acked(&outcome, number);
            failpoint!(crate::failpoints::AFTER_ACK);
            Ok(outcome)
        }
        Err(error) => {
            span.record("outcome", error.kind_str());
            // The handler error's own `disposition` and `Display` are user code too.
            let disposition =
                catch_sync(|| errors.disposition(&error)).unwrap_or(crate::Disposition::Retry);
            let text = catch_sync(|| errors.display(&error).to_string())
                .unwrap_or_else(|message| format!("(the error's Display panicked: {message})"));
            let settlement = match &error {
                // Not the handler's failure: only the broker's own limit ends it.
                Error::InProgress {
                    lease_remaining, ..
                } => Settlement::in_progress(
                    number,
                    spec.retry_policy(),
                    ack.delivery_limit(),
                    *lease_remaining,
                    &text,
                    fastrand::f64(),
                ),
                _ => {
                    let policy = spec.retry_policy().capped_at(ack.delivery_limit());
                    Settlement::of_failure(disposition, number, &policy, &text, fastrand::f64())
                }
            };
            let told = match &settlement {
                &Settlement::Requeue {
                    attempt,
                    delay,
                    reason,
                } => {
                    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    if reason == crate::ack::RequeueReason::InProgressElsewhere {
                        // Expected under concurrent redelivery: not a failure.
                        tracing::info!(attempt, delay_ms, "in progress elsewhere; requeueing");
                    } else {
                        tracing::warn!(error = %text, attempt, delay_ms, "handling failed; requeueing");
                    }
                    ack.requeue(Requeue {
                        reason,
                        attempt,
                        delay,
                    })
                    .await
                }
                Settlement::DeadLetter { attempt, reason } => {
                    tracing::error!(error = %reason, attempt, "handling failed for good; dead-lettering");
                    ack.dead_letter(DeadLetter {
                        reason,
                        attempt: *attempt,
                    })
                    .await
                }
            };
            if let Err(ack_error) = told {
                tracing::warn!(error = %ack_error, "could not settle the failed delivery with the broker");
            }
            handling.failed(&settlement);
            Err(error)
        }
    }
}

async fn read_record<S: Store, E>(
    store: &S,
    delivery: &Delivery<'_>,
) -> Result<Option<StoredRecord>, Error<E>> {
    if !delivery.wants_record {
        return Ok(None);
    }
    store
        .find_record(delivery.key, delivery.now_ms)
        .await
        .map_err(Error::Database)
}

/// A duplicate: check its fingerprint, decode its replayed result. `record` is `None` when
/// the strategy keeps none (`state_machine`) or when it is gone (`unique_constraint` after the
/// record expired): then a fingerprint cannot be checked, and that is an error, not a pass.
fn accept_duplicate<T, E, C: ResultCodec<T>>(
    delivery: &Delivery<'_>,
    codec: &C,
    record: Option<StoredRecord>,
) -> Attempt<T, E> {
    let scope_and_key = || {
        (
            delivery.key.scope().to_owned(),
            delivery.key.value().to_owned(),
        )
    };
    let Some(record) = record else {
        if delivery.fingerprint.is_some() {
            let (scope, key) = scope_and_key();
            return Err(Error::UnverifiableDuplicate { scope, key });
        }
        if delivery.wants_record {
            tracing::warn!(
                "duplicate without a dedup record (expired or purged): no result to replay"
            );
        }
        return Ok((Outcome::Duplicate { replayed: None }, Committed::new()));
    };
    if let (Some(ours), Some(theirs)) = (delivery.fingerprint, record.fingerprint.as_deref())
        && ours != theirs
    {
        let (scope, key) = scope_and_key();
        return Err(Error::PayloadMismatch { scope, key });
    }
    let replayed = match catch_sync(|| codec.decode(record.response.as_deref())) {
        Ok(decoded) => decoded.map_err(|source| {
            let (scope, key) = scope_and_key();
            Error::Replay { scope, key, source }
        })?,
        Err(message) => {
            return Err(Error::Panicked {
                scope: delivery.key.scope().to_owned(),
                during: "replayed result's deserialization",
                message,
            });
        }
    };
    // The record we read was committed by an earlier delivery: its effects are durable.
    Ok((Outcome::Duplicate { replayed }, Committed::new()))
}

async fn rollback<S: Store>(_store: &S, tx: S::Tx) {
    // A failed rollback leaves nothing committed either: the connection drops the transaction.
    if let Err(error) = S::rollback(tx).await {
        tracing::debug!(%error, "rollback failed; the transaction is abandoned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_messages() {
        assert_eq!(catch_sync(|| 7), Ok(7));
        let caught = catch_sync(|| -> i32 { panic!("boom {}", 1) });
        assert_eq!(caught, Err("boom 1".to_owned()));
    }

    static FIRST: HandlerSpec = HandlerSpec::new("pipeline.test.shared");
    static SECOND: HandlerSpec = HandlerSpec::new("pipeline.test.shared");
    static ALONE: HandlerSpec = HandlerSpec::new("pipeline.test.alone");
    inventory::submit! { Registration::of(&FIRST) }
    inventory::submit! { Registration::of(&SECOND) }
    inventory::submit! { Registration::of(&ALONE) }

    #[test]
    fn a_shared_scope_fails_every_handler_that_shares_it() {
        assert_eq!(ALONE.register(), Ok(()));
        assert_eq!(ALONE.register(), Ok(()), "a handler may handle again");
        assert_eq!(FIRST.register(), Err(()), "the first comer does not win");
        assert_eq!(SECOND.register(), Err(()));
        assert_eq!(handlers_sharing("pipeline.test.shared"), 2);
    }

    // One handler's two entry points (same site), and a different handler at another site.
    static ENTRY: HandlerSpec = HandlerSpec::new("pipeline.test.sited").at("a.rs:1:1");
    static IN_TRANSACTION: HandlerSpec = HandlerSpec::new("pipeline.test.sited").at("a.rs:1:1");
    static ELSEWHERE: HandlerSpec = HandlerSpec::new("pipeline.test.sited2").at("a.rs:1:1");
    static OTHER: HandlerSpec = HandlerSpec::new("pipeline.test.sited2").at("b.rs:9:1");
    inventory::submit! { Registration::of(&ENTRY) }
    inventory::submit! { Registration::of(&IN_TRANSACTION) }
    inventory::submit! { Registration::of(&ELSEWHERE) }
    inventory::submit! { Registration::of(&OTHER) }

    #[test]
    fn the_entry_points_of_one_handler_share_its_scope() {
        assert_eq!(handlers_sharing("pipeline.test.sited"), 1);
        assert_eq!(ENTRY.register(), Ok(()));
        assert_eq!(IN_TRANSACTION.register(), Ok(()));
        assert_eq!(handlers_sharing("pipeline.test.sited2"), 2);
        assert_eq!(OTHER.register(), Err(()));
    }
}

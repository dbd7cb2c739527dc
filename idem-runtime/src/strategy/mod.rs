//! Idempotency strategies: how a duplicate is recognised. One file per strategy.
//!
//! Every strategy runs inside the same pipeline, [`open`] then [`OpenGate::finish`], which owns
//! the order that makes the guarantee:
//!
//! 1. build the key (an invalid key is a permanent error: dead-letter);
//! 2. begin the store's transaction;
//! 3. [`Strategy::enter`]: the gate before the body (may find a duplicate);
//! 4. run the body with the transaction (generated code, between `open` and `finish`);
//! 5. [`Strategy::leave`]: the gate after the body (may write the record, may find a duplicate);
//! 6. commit;
//! 7. only then acknowledge, with the [`Committed`] proof the commit produced.
//!
//! A failure anywhere rolls back, then requeues (retryable) or dead-letters (permanent). A
//! failure that the strategy recognises as "an earlier delivery committed" (a unique violation
//! under `unique_constraint`) becomes a duplicate instead, and is acked.

use std::error::Error as StdError;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Instrument as _;

use crate::ack::{self, Acknowledger, Committed};
use crate::error::{Error, HandlerErrors};
use crate::key::{Key, KeyError};
use crate::outcome::Outcome;
use crate::payload::ResultCodec;
use crate::store::{Claim, NewRecord, Store, StoredRecord};

pub mod dedup_table;
pub mod state_machine;
pub mod unique_constraint;

pub use dedup_table::DedupTable;
pub use state_machine::{OnMissing, StateMachine, Transition};
pub use unique_constraint::UniqueConstraint;

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// This delivery owns the message: go on.
    Open,
    /// An earlier delivery committed this message; its record, when one was read.
    Duplicate(Option<StoredRecord>),
    /// The delivery cannot proceed (`state_machine`: the entity is missing or in another state).
    Refused(Refusal),
}

/// Why a gate refused a delivery that is not a duplicate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The entity is in a state this step does not move from (`None`: NULL).
    InvalidTransition {
        /// Its state.
        current: Option<String>,
        /// The states the step moves from.
        expected: Vec<String>,
    },
    /// The entity is in a state before this step's `from`: its predecessor has not landed.
    TooEarly {
        /// Its state.
        current: String,
    },
    /// The entity's row does not exist.
    NotFound {
        /// Where it was looked for.
        table: String,
        /// Whether to retry (`on_missing = "retry"`) or dead-letter.
        retryable: bool,
    },
}

impl Refusal {
    fn into_error<E>(self, key: &Key) -> Error<E> {
        let (scope, key) = (key.scope().to_owned(), key.value().to_owned());
        match self {
            Self::InvalidTransition { current, expected } => Error::InvalidTransition {
                scope,
                key,
                current,
                expected,
            },
            Self::TooEarly { current } => Error::TooEarly {
                scope,
                key,
                current,
            },
            Self::NotFound { table, retryable } => Error::NotFound {
                scope,
                key,
                table,
                retryable,
            },
        }
    }
}

impl From<Claim> for Gate {
    /// A claimed record opens the gate; a live one means an earlier delivery committed.
    fn from(claim: Claim) -> Self {
        match claim {
            Claim::Claimed => Self::Open,
            Claim::Existing(record) => Self::Duplicate(Some(record)),
        }
    }
}

/// The per-delivery facts a gate works with.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The message's key.
    pub key: &'a Key,
    /// The payload's fingerprint, when the handler has `fingerprint`.
    pub fingerprint: Option<&'a str>,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// When the record expires, Unix milliseconds; `None` = never.
    pub expires_at_ms: Option<i64>,
    /// Whether a duplicate must read the record (to compare fingerprints or replay a result).
    pub wants_record: bool,
}

impl<'a> Delivery<'a> {
    /// The dedup record this delivery writes.
    pub fn record(&self, response: Option<&'a str>) -> NewRecord<'a> {
        NewRecord {
            key: self.key,
            fingerprint: self.fingerprint,
            response,
            now_ms: self.now_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// How one strategy gates a delivery on a store.
pub trait Strategy<S: Store>: Send + Sync {
    /// The strategy's name in `strategy = "..."`, for logs.
    const NAME: &'static str;

    /// Runs in the transaction before the body.
    fn enter(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
    ) -> impl Future<Output = Result<Gate, sqlx::Error>> + Send;

    /// Runs in the transaction after the body succeeded, with its encoded result (`replay`).
    fn leave(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
        response: Option<&str>,
    ) -> impl Future<Output = Result<Gate, sqlx::Error>> + Send;

    /// Whether a failure of the body or of the commit means "an earlier delivery committed".
    fn is_duplicate_failure(&self, store: &S, error: &(dyn StdError + 'static)) -> bool;
}

/// What the macro knows about a handler, as a constant.
#[derive(Debug, Clone, Copy)]
pub struct HandlerSpec {
    scope: &'static str,
    ttl: Option<Duration>,
}

impl HandlerSpec {
    /// A handler in `scope`, whose records never expire.
    pub const fn new(scope: &'static str) -> Self {
        Self { scope, ttl: None }
    }

    /// Records expire `millis` after they are written.
    pub const fn with_ttl_millis(mut self, millis: u64) -> Self {
        self.ttl = Some(Duration::from_millis(millis));
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

/// Now, in Unix milliseconds, the clock of every record.
pub(crate) fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// The payload's fingerprint as the macro computed it: `None` without `fingerprint`.
pub type FingerprintInput = Option<Result<String, serde_json::Error>>;

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

/// Step one: builds the key, begins the transaction and runs the gate before the body.
///
/// `Ok` means the body should run (see [`OpenGate`]). `Err` carries the final result of a
/// delivery that is already settled with the broker: a duplicate (acked), or a failure
/// (requeued or dead-lettered).
#[allow(clippy::too_many_arguments)] // called once, by generated code
pub async fn open<'s, S, G, C, A, T, E>(
    store: &'s S,
    strategy: G,
    spec: &HandlerSpec,
    key: Result<Key, KeyError>,
    fingerprint: FingerprintInput,
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
    let span = tracing::info_span!(
        "idem.handle",
        scope = spec.scope(),
        key = tracing::field::Empty,
        strategy = G::NAME,
        store = S::NAME,
        outcome = tracing::field::Empty,
    );
    let opened = enter(store, strategy, spec, key, fingerprint, codec)
        .instrument(span.clone())
        .await;
    match opened {
        Ok((entered, tx)) => Ok(OpenGate {
            store,
            entered,
            ack,
            errors,
            tx,
            span,
        }),
        Err(attempt) => Err(conclude(ack, errors, attempt).instrument(span).await),
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

/// `Ok`: run the body in this transaction. `Err`: the delivery already ended (a duplicate, an
/// invalid key, a refused or failed gate), and only needs settling with the broker.
async fn enter<S, G, C, T, E>(
    store: &S,
    strategy: G,
    spec: &HandlerSpec,
    key: Result<Key, KeyError>,
    fingerprint: FingerprintInput,
    codec: C,
) -> Result<(Entered<G, C>, S::Tx), Attempt<T, E>>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let key = key.map_err(|error| Err(Error::Key(error)))?;
    tracing::Span::current().record("key", key.value());
    let fingerprint = fingerprint.transpose().map_err(|source| {
        Err(Error::Serialize {
            what: "payload",
            source,
        })
    })?;
    let now_ms = now_ms();
    let expires_at_ms = spec.ttl().map(|ttl| {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(ttl_ms)
    });
    let wants_record = fingerprint.is_some() || C::STORES_RESULTS;
    let entered = Entered {
        strategy,
        key,
        fingerprint,
        now_ms,
        expires_at_ms,
        wants_record,
        codec,
    };

    let mut tx = store
        .begin()
        .await
        .map_err(|error| Err(Error::Database(error)))?;
    let delivery = entered.delivery();
    let verdict = entered.strategy.enter(store, &mut tx, &delivery).await;
    let tx = through_gate::<S, _, _, _>(verdict, tx, &delivery, &entered.codec).await?;
    Ok((entered, tx))
}

/// Hands the transaction on when the gate is open; otherwise rolls it back and says how the
/// delivery ends: a duplicate, a refusal, or the gate's own database error.
async fn through_gate<S: Store, C: ResultCodec<T>, T, E>(
    verdict: Result<Gate, sqlx::Error>,
    tx: S::Tx,
    delivery: &Delivery<'_>,
    codec: &C,
) -> Result<S::Tx, Attempt<T, E>> {
    let ended = match verdict {
        Ok(Gate::Open) => return Ok(tx),
        Ok(Gate::Duplicate(record)) => accept_duplicate(delivery, codec, record),
        Ok(Gate::Refused(refusal)) => Err(refusal.into_error(delivery.key)),
        Err(error) => Err(Error::Database(error)),
    };
    rollback::<S>(tx).await;
    Err(ended)
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
    /// ack; on failure, the rollback, then requeue or dead-letter (or, when the strategy
    /// recognises the failure as a duplicate, the ack).
    pub async fn finish<T>(self, result: Result<T, E>) -> Settled<T, E>
    where
        C: ResultCodec<T>,
    {
        let Self {
            store,
            entered,
            ack,
            errors,
            tx,
            span,
        } = self;
        async move {
            let attempt = complete(store, &entered, errors, tx, result).await;
            conclude(ack, errors, attempt).await
        }
        .instrument(span)
        .await
    }
}

async fn complete<S, G, C, T, E>(
    store: &S,
    entered: &Entered<G, C>,
    errors: HandlerErrors<E>,
    mut tx: S::Tx,
    result: Result<T, E>,
) -> Attempt<T, E>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<T>,
{
    let delivery = entered.delivery();
    let strategy = &entered.strategy;
    let codec = &entered.codec;
    let value = match result {
        Ok(value) => value,
        Err(error) => {
            rollback::<S>(tx).await;
            if strategy.is_duplicate_failure(store, errors.as_error(&error)) {
                return accept_duplicate(&delivery, codec, read_record(store, &delivery).await?);
            }
            return Err(Error::Handler(error));
        }
    };

    let response = match codec.encode(&value) {
        Ok(response) => response,
        Err(source) => {
            rollback::<S>(tx).await;
            return Err(Error::Serialize {
                what: "result",
                source,
            });
        }
    };
    let verdict = strategy
        .leave(store, &mut tx, &delivery, response.as_deref())
        .await;
    let tx = match through_gate::<S, _, _, _>(verdict, tx, &delivery, codec).await {
        Ok(tx) => tx,
        Err(ended) => return ended,
    };

    match S::commit(tx).await {
        Ok(()) => Ok((Outcome::Processed(value), Committed::new())),
        Err(error) if strategy.is_duplicate_failure(store, &error) => {
            accept_duplicate(&delivery, codec, read_record(store, &delivery).await?)
        }
        // The commit's outcome may be unknown (connection lost mid-commit): requeue, and let
        // the gate sort the redelivery out.
        Err(error) => Err(Error::Database(error)),
    }
}

/// Records the outcome on the span, then settles with the broker.
async fn conclude<T, E, A: Acknowledger>(
    ack: A,
    errors: HandlerErrors<E>,
    attempt: Attempt<T, E>,
) -> Settled<T, E> {
    let span = tracing::Span::current();
    match &attempt {
        Ok((outcome, _)) => span.record("outcome", outcome.as_str()),
        Err(error) => span.record("outcome", error.kind_str()),
    };
    ack::settle(ack, errors, attempt).await
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

/// A duplicate: check its fingerprint, decode its replayed result.
fn accept_duplicate<T, E, C: ResultCodec<T>>(
    delivery: &Delivery<'_>,
    codec: &C,
    record: Option<StoredRecord>,
) -> Attempt<T, E> {
    let record = record.unwrap_or_default();
    if let (Some(ours), Some(theirs)) = (delivery.fingerprint, record.fingerprint.as_deref())
        && ours != theirs
    {
        return Err(Error::PayloadMismatch {
            scope: delivery.key.scope().to_owned(),
            key: delivery.key.value().to_owned(),
        });
    }
    let replayed = codec
        .decode(record.response.as_deref())
        .map_err(|source| Error::Replay {
            scope: delivery.key.scope().to_owned(),
            key: delivery.key.value().to_owned(),
            source,
        })?;
    // The record we read was committed by an earlier delivery: its effects are durable.
    Ok((Outcome::Duplicate { replayed }, Committed::new()))
}

async fn rollback<S: Store>(tx: S::Tx) {
    // A failed rollback leaves nothing committed either: the connection drops the transaction.
    if let Err(error) = S::rollback(tx).await {
        tracing::debug!(%error, "rollback failed; the transaction is abandoned");
    }
}

//! Idempotency strategies: how a duplicate is recognised. One file per strategy.
//!
//! Every strategy runs inside the same pipeline, [`execute`], which owns the order that makes
//! the guarantee:
//!
//! 1. build the key (an invalid key is a permanent error: dead-letter);
//! 2. begin the store's transaction;
//! 3. [`Strategy::enter`]: the gate before the body (may find a duplicate);
//! 4. run the body with the transaction;
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
use crate::error::{Error, HandlerError};
use crate::key::{Key, KeyError};
use crate::outcome::Outcome;
use crate::payload::ResultCodec;
use crate::store::{NewRecord, Store, StoredRecord};

pub mod dedup_table;
pub mod unique_constraint;

pub use dedup_table::DedupTable;
pub use unique_constraint::UniqueConstraint;

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// This delivery owns the message: go on.
    Open,
    /// An earlier delivery committed this message; its record, when one was read.
    Duplicate(Option<StoredRecord>),
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

/// Runs one delivery through `strategy` on `store`, then settles it with `ack`. See the
/// [module docs](self) for the order of steps.
#[allow(clippy::too_many_arguments)] // one call site, generated; a builder would only hide it
pub async fn execute<S, G, C, A, B, R>(
    store: &S,
    strategy: &G,
    spec: &HandlerSpec,
    key: Result<Key, KeyError>,
    fingerprint: FingerprintInput,
    codec: C,
    ack: A,
    body: B,
) -> Result<Outcome<R::Ok>, Error<R::Err>>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<R::Ok>,
    A: Acknowledger,
    B: AsyncFnOnce(&mut S::Tx) -> R,
    R: HandlerResult,
    R::Err: HandlerError,
{
    let span = tracing::info_span!(
        "idem.handle",
        scope = spec.scope(),
        key = tracing::field::Empty,
        strategy = G::NAME,
        store = S::NAME,
        outcome = tracing::field::Empty,
    );
    async move {
        let attempt = attempt(store, strategy, spec, key, fingerprint, &codec, body).await;
        let span = tracing::Span::current();
        match &attempt {
            Ok((outcome, _)) => {
                span.record("outcome", outcome.as_str());
            }
            Err(error) => {
                span.record("outcome", error.kind_str());
            }
        }
        ack::settle(ack, attempt).await
    }
    .instrument(span)
    .await
}

type Attempt<T, E> = Result<(Outcome<T>, Committed), Error<E>>;

async fn attempt<S, G, C, B, R>(
    store: &S,
    strategy: &G,
    spec: &HandlerSpec,
    key: Result<Key, KeyError>,
    fingerprint: FingerprintInput,
    codec: &C,
    body: B,
) -> Attempt<R::Ok, R::Err>
where
    S: Store,
    G: Strategy<S>,
    C: ResultCodec<R::Ok>,
    B: AsyncFnOnce(&mut S::Tx) -> R,
    R: HandlerResult,
    R::Err: HandlerError,
{
    let key = key?;
    tracing::Span::current().record("key", key.value());
    let fingerprint = fingerprint.transpose().map_err(|source| Error::Serialize {
        what: "payload",
        source,
    })?;
    let now_ms = now_ms();
    let delivery = Delivery {
        key: &key,
        fingerprint: fingerprint.as_deref(),
        now_ms,
        expires_at_ms: spec.ttl().map(|ttl| {
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            now_ms.saturating_add(ttl_ms)
        }),
        wants_record: fingerprint.is_some() || C::STORES_RESULTS,
    };
    let duplicate = |record| accept_duplicate(&delivery, codec, record);

    let mut tx = store.begin().await.map_err(Error::Database)?;
    match strategy.enter(store, &mut tx, &delivery).await {
        Ok(Gate::Open) => {}
        Ok(Gate::Duplicate(record)) => {
            rollback::<S>(tx).await;
            return duplicate(record);
        }
        Err(error) => {
            rollback::<S>(tx).await;
            return Err(Error::Database(error));
        }
    }

    let value = match body(&mut tx).await.into_result() {
        Ok(value) => value,
        Err(error) => {
            rollback::<S>(tx).await;
            if strategy.is_duplicate_failure(store, &error) {
                return duplicate(read_record(store, &delivery).await?);
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
    match strategy
        .leave(store, &mut tx, &delivery, response.as_deref())
        .await
    {
        Ok(Gate::Open) => {}
        Ok(Gate::Duplicate(record)) => {
            rollback::<S>(tx).await;
            return duplicate(record);
        }
        Err(error) => {
            rollback::<S>(tx).await;
            return Err(Error::Database(error));
        }
    }

    match S::commit(tx).await {
        Ok(()) => Ok((Outcome::Processed(value), Committed::new())),
        Err(error) if strategy.is_duplicate_failure(store, &error) => {
            duplicate(read_record(store, &delivery).await?)
        }
        // The commit's outcome may be unknown (connection lost mid-commit): requeue, and let
        // the gate sort the redelivery out.
        Err(error) => Err(Error::Database(error)),
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

/// A duplicate: check its fingerprint, decode its replayed result.
fn accept_duplicate<T, E, C: ResultCodec<T>>(
    delivery: &Delivery<'_>,
    codec: &C,
    record: Option<StoredRecord>,
) -> Attempt<T, E> {
    let record = record.unwrap_or_default();
    if let (Some(ours), Some(theirs)) = (delivery.fingerprint, record.fingerprint.as_deref()) {
        if ours != theirs {
            return Err(Error::PayloadMismatch {
                scope: delivery.key.scope().to_owned(),
                key: delivery.key.value().to_owned(),
            });
        }
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

//! The order for the lease strategies (`lock`, `token`) on Redis, which has no transaction to
//! share with the body:
//!
//! 1. build the key and the fingerprint (an invalid key is a permanent error: dead-letter);
//! 2. claim the key's lease in one round trip, which also reports a done marker (duplicate:
//!    ack), another owner's live lease (in progress: requeue with a delay) or, for a token, that
//!    there is none to use (dead-letter);
//! 3. run the body (generated code, between [`open_lease`] and [`LeaseGate::finish`]),
//!    catching a panic, while the lease is renewed every third of its length;
//! 4. on success, replace the lease by the done marker, only if this delivery still owns it
//!    (the fence), in one round trip; on a failure, release only this delivery's own lease;
//! 5. only then acknowledge, with the [`Committed`] proof the marker produced.
//!
//! A marker that could not be written (the lease was lost, or Redis failed) requeues: the
//! redelivery meets whatever holds the key then.

use std::future::Future;
use std::time::Duration;

use futures_util::future::{Either, select};
use tracing::Instrument as _;

use super::{
    Attempt, Entered, HandlerSpec, Handling, PanicPayload, Prepared, Settled, accept_duplicate,
    conclude, prepare,
};
use crate::ack::{Acknowledger, Committed};
use crate::error::{Error, HandlerErrors};
use crate::outcome::Outcome;
use crate::payload::ResultCodec;
use crate::store::redis::{Completion, LeaseClaim, Marker, RedisStore, owner_token};
use crate::strategy::{LeaseRules, LeaseStrategy};
use crate::unwind::{catch_sync, panic_message};

/// A delivery that holds its key's lease: everything [`finish`](Self::finish) needs to write
/// the marker (or release the lease) and acknowledge.
#[must_use = "a lease gate holds the key's lease: finish it"]
pub struct LeaseGate<'s, G, C, A, E> {
    store: &'s RedisStore,
    handling: Handling,
    entered: Entered<G, C>,
    held: Held,
    ack: A,
    errors: HandlerErrors<E>,
    span: tracing::Span,
}

/// The lease this delivery holds.
struct Held {
    rules: LeaseRules,
    record_key: String,
    owner: String,
}

impl<G, C, A, E> std::fmt::Debug for LeaseGate<'_, G, C, A, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGate")
            .field("key", &self.held.record_key)
            .finish_non_exhaustive()
    }
}

/// Step one: checks the key and claims its lease.
///
/// `Ok` means the body should run. `Err` carries the final result of a delivery already settled
/// with the broker: a duplicate (acked), in progress elsewhere (requeued), or a failure.
pub async fn open_lease<'s, G, C, A, T, E>(
    store: &'s RedisStore,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
    errors: HandlerErrors<E>,
    ack: A,
) -> Result<LeaseGate<'s, G, C, A, E>, Settled<T, E>>
where
    G: LeaseStrategy,
    C: ResultCodec<T>,
    A: Acknowledger,
{
    let handling = Handling::start(spec, G::NAME, "redis");
    let span = handling.span(&ack);
    let claimed = claim(store, spec, prepared, codec)
        .instrument(span.clone())
        .await;
    match claimed {
        Ok((entered, held)) => Ok(LeaseGate {
            store,
            handling,
            entered,
            held,
            ack,
            errors,
            span,
        }),
        Err(attempt) => Err(conclude(ack, handling, errors, attempt)
            .instrument(span)
            .await),
    }
}

async fn claim<G, C, T, E>(
    store: &RedisStore,
    spec: &'static HandlerSpec,
    prepared: Prepared<G>,
    codec: C,
) -> Result<(Entered<G, C>, Held), Attempt<T, E>>
where
    G: LeaseStrategy,
    C: ResultCodec<T>,
{
    let entered = prepare(store.now_ms(), spec, prepared, codec)?;
    let rules = entered.strategy.rules();
    let delivery = entered.delivery();
    let record_key = store.record_key(delivery.key.scope(), delivery.key.value());
    let owner = owner_token();
    let scope_and_key = || {
        (
            delivery.key.scope().to_owned(),
            delivery.key.value().to_owned(),
        )
    };
    match store
        .claim(rules.mode, &record_key, &owner, rules.lease)
        .await
    {
        Ok(LeaseClaim::Ours) => {
            failpoint!(crate::failpoints::AFTER_GATE);
            Ok((
                entered,
                Held {
                    rules,
                    record_key,
                    owner,
                },
            ))
        }
        Ok(LeaseClaim::Done(record)) => {
            Err(accept_duplicate(&delivery, &entered.codec, Some(record)))
        }
        Ok(LeaseClaim::Busy(lease_remaining)) => {
            let (scope, key) = scope_and_key();
            Err(Err(Error::InProgress {
                scope,
                key,
                lease_remaining,
            }))
        }
        Ok(LeaseClaim::Unknown) => {
            let (scope, key) = scope_and_key();
            Err(Err(Error::UnknownToken { scope, key }))
        }
        Err(error) => Err(Err(Error::Redis(error))),
    }
}

/// Keeps a delivery's lease alive while its body runs.
#[derive(Debug)]
pub struct Renewal<'g> {
    store: &'g RedisStore,
    span: tracing::Span,
    rules: LeaseRules,
    record_key: &'g str,
    owner: &'g str,
}

impl Renewal<'_> {
    /// Runs `body` to completion, extending the lease every third of its length meanwhile
    /// (unless the strategy's lease is fixed). A renewal that finds the lease gone stops
    /// renewing: the marker will not be written ([`Error::LeaseLost`]); a renewal that fails
    /// on Redis is tried again at the next tick.
    pub async fn hold<F: Future>(self, body: F) -> F::Output {
        if !self.rules.renew {
            return body.await;
        }
        let every = (self.rules.lease / 3).max(Duration::from_millis(1));
        // The first tick's deadline is set now, before the body runs: `select` polls the body
        // first, and a clock moved while the body holds (a test's `ManualClock`) must still
        // find the renewal's deadline behind it.
        let mut tick = self.store.sleep(every);
        let renew = async {
            loop {
                tick.await;
                tick = self.store.sleep(every);
                match self
                    .store
                    .extend(
                        self.rules.mode,
                        self.record_key,
                        self.owner,
                        self.rules.lease,
                    )
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "the lease was lost while the body ran (another delivery took the key over); this delivery will write no marker"
                        );
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not extend the lease; trying again");
                    }
                }
            }
        }
        .instrument(self.span.clone());
        let body = std::pin::pin!(body);
        let renew = std::pin::pin!(renew);
        match select(body, renew).await {
            Either::Left((output, _)) => output,
            Either::Right(((), body)) => body.await,
        }
    }
}

impl<'s, G, C, A, E> LeaseGate<'s, G, C, A, E>
where
    G: LeaseStrategy,
    A: Acknowledger,
{
    /// What keeps the lease alive while the body runs, and the delivery's span to run it in.
    pub fn parts(&self) -> (Renewal<'_>, tracing::Span) {
        (
            Renewal {
                store: self.store,
                span: self.span.clone(),
                rules: self.held.rules,
                record_key: &self.held.record_key,
                owner: &self.held.owner,
            },
            self.span.clone(),
        )
    }

    /// Step two, after the body: on success, the done marker (fenced), then the ack; on failure
    /// or panic, the release of this delivery's lease, then requeue or dead-letter.
    pub async fn finish<T>(self, result: Result<Result<T, E>, PanicPayload>) -> Settled<T, E>
    where
        C: ResultCodec<T>,
    {
        let Self {
            store,
            handling,
            entered,
            held,
            ack,
            errors,
            span,
        } = self;
        async move {
            let attempt = complete(store, handling.spec(), &entered, &held, result).await;
            conclude(ack, handling, errors, attempt).await
        }
        .instrument(span)
        .await
    }
}

async fn complete<G, C, T, E>(
    store: &RedisStore,
    spec: &HandlerSpec,
    entered: &Entered<G, C>,
    held: &Held,
    result: Result<Result<T, E>, PanicPayload>,
) -> Attempt<T, E>
where
    C: ResultCodec<T>,
{
    let delivery = entered.delivery();
    let scope = || delivery.key.scope().to_owned();
    failpoint!(crate::failpoints::AFTER_BODY);
    let failed = |error: Error<E>| async {
        release(store, held).await;
        Err(error)
    };
    let value = match result {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => return failed(Error::Handler(error)).await,
        Err(payload) => {
            return failed(Error::Panicked {
                scope: scope(),
                during: "body",
                message: panic_message(&payload),
            })
            .await;
        }
    };
    // The body's effects happened, and nothing rolls them back: from here on the marker is
    // written whatever else fails, so that no redelivery runs the body again.
    let (response, unencodable) = match catch_sync(|| entered.codec.encode(&value)) {
        Ok(Ok(response)) => (response, None),
        Ok(Err(source)) => (
            None,
            Some(Error::Serialize {
                what: "result",
                source,
            }),
        ),
        Err(message) => (
            None,
            Some(Error::Panicked {
                scope: scope(),
                during: "result's serialization",
                message,
            }),
        ),
    };
    let marker = Marker {
        ttl: spec.ttl(),
        fingerprint: delivery.fingerprint,
        response: response.as_deref(),
    };
    failpoint!(crate::failpoints::BEFORE_COMMIT);
    let completion = store.complete(&held.record_key, &held.owner, &marker).await;
    match (completion, unencodable) {
        // The result could not be stored for replay: dead-lettered for a person, though the
        // marker (without the result) keeps redeliveries from running the body again.
        (Ok(Completion::Written | Completion::AlreadyDone), Some(error)) => Err(error),
        // The marker is what later deliveries see: from here on, this message is done.
        (Ok(Completion::Written), None) => Ok((Outcome::Processed(value), Committed::new())),
        (Ok(Completion::AlreadyDone), None) => {
            tracing::warn!(
                "the lease lapsed while the body ran and another delivery of this message completed meanwhile; both bodies ran"
            );
            Ok((Outcome::Processed(value), Committed::new()))
        }
        (Ok(Completion::Refused), _) => Err(Error::LeaseLost {
            scope: scope(),
            key: delivery.key.value().to_owned(),
        }),
        // Unknown whether the marker landed: requeue; the redelivery finds the marker, or our
        // lease until it expires.
        (Err(error), _) => Err(Error::Redis(error)),
    }
}

/// Ends this delivery's own lease after a failure, so that the redelivery need not wait for it
/// to expire (a token goes back to unused unless the handler spends it on error).
async fn release(store: &RedisStore, held: &Held) {
    match store
        .release(held.rules.mode, &held.record_key, &held.owner)
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::debug!("the lease was no longer this delivery's; nothing released"),
        Err(error) => tracing::warn!(
            %error,
            "could not release the lease after the failure; it expires by itself"
        ),
    }
}

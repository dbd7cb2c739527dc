//! Telling the broker what became of a message, in the only safe order.
//!
//! [`Acknowledger::ack`] takes a [`Committed`] proof, and only this crate can make one: after the
//! transaction holding the gate and the body's effects has committed, or after the gate found
//! that an earlier delivery's transaction had. Acknowledging before the commit therefore does
//! not compile:
//!
//! ```compile_fail
//! use idem_runtime::{Acknowledger, Committed, NoAck};
//!
//! async fn ack_too_early() {
//!     // error: `Committed` has private fields and no public constructor.
//!     NoAck.ack(Committed { _private: () }).await.unwrap();
//! }
//! ```

use std::future::Future;

/// Proof that a message's effects are durably committed, by this delivery or an earlier one.
///
/// Made only by the runtime, after the commit returned (or the gate saw a committed record);
/// required by [`Acknowledger::ack`].
#[derive(Debug)]
#[must_use = "a commit proof exists to acknowledge the message"]
pub struct Committed {
    _private: (),
}

impl Committed {
    /// Only the strategies call this, right after their commit returned or their gate saw a
    /// committed record.
    pub(crate) fn new() -> Self {
        Self { _private: () }
    }
}

/// Why a message is handed back to the broker for another delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequeueReason {
    /// A retryable failure: roll back happened; requeue with backoff.
    Retryable,
    /// Another consumer holds a live lease on this key: requeue after a delay, never ack.
    /// Reserved for the lease-based `lock` strategy (not implemented yet): the SQL strategies
    /// make a twin wait on the row lock instead.
    InProgressElsewhere,
}

/// The broker side of one delivery: acknowledge it, requeue it, or dead-letter it.
///
/// Each method consumes the acknowledger, so a delivery is settled exactly once. Broker
/// integrations implement it for their delivery handle; [`NoAck`] is for direct calls.
pub trait Acknowledger: Send {
    /// The broker client's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The message's effects are committed: remove it from the queue.
    fn ack(self, proof: Committed) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Hand the message back for another delivery.
    fn requeue(self, reason: RequeueReason)
    -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The message can never succeed: move it to the dead-letter destination, with `reason`
    /// (the error's text) for whoever inspects it. Never drop it.
    fn dead_letter(self, reason: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The acknowledger of a direct call, with no broker behind it: every method does nothing.
///
/// ```
/// use idem_runtime::{Acknowledger, NoAck, RequeueReason};
///
/// # tokio_test_block_on(async {
/// NoAck.requeue(RequeueReason::Retryable).await.unwrap();
/// # });
/// # fn tokio_test_block_on(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAck;

impl Acknowledger for NoAck {
    type Error = std::convert::Infallible;

    async fn ack(self, _proof: Committed) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn requeue(self, _reason: RequeueReason) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn dead_letter(self, _reason: &str) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Tells the broker what became of a delivery: ack a committed outcome, requeue a retryable
/// failure, dead-letter a permanent one. A failure to tell it is logged, not returned: after a
/// commit, the redelivery it causes is a duplicate; after a failure, the broker redelivers
/// anyway.
pub(crate) async fn settle<T, E, A>(
    acknowledger: A,
    errors: crate::error::HandlerErrors<E>,
    attempt: Result<(crate::Outcome<T>, Committed), crate::Error<E>>,
) -> Result<crate::Outcome<T>, crate::Error<E>>
where
    A: Acknowledger,
{
    match attempt {
        Ok((outcome, proof)) => {
            if let Err(error) = acknowledger.ack(proof).await {
                tracing::warn!(
                    %error,
                    "ack failed after commit; the broker will redeliver and the gate will report a duplicate"
                );
            }
            Ok(outcome)
        }
        Err(error) => {
            let told = match errors.disposition(&error) {
                crate::Disposition::Retry => {
                    tracing::warn!(error = %errors.display(&error), "handling failed; requeueing");
                    acknowledger.requeue(RequeueReason::Retryable).await
                }
                crate::Disposition::DeadLetter => {
                    let reason = errors.display(&error).to_string();
                    tracing::error!(error = %reason, "handling failed permanently; dead-lettering");
                    acknowledger.dead_letter(&reason).await
                }
            };
            if let Err(ack_error) = told {
                tracing::warn!(error = %ack_error, "could not settle the failed delivery with the broker");
            }
            Err(error)
        }
    }
}

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
use std::time::Duration;

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
    /// Only the pipeline calls this, right after its commit returned or its gate saw a
    /// committed record.
    pub(crate) fn new() -> Self {
        Self { _private: () }
    }
}

/// Why a message is handed back to the broker for another delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequeueReason {
    /// A retryable failure: the transaction rolled back; deliver again after the delay.
    Retryable,
    /// Another delivery holds a live lease on this key (`lock`, `token`): requeue after a
    /// delay, never ack. `max_attempts` never dead-letters such a requeue; at a broker's own
    /// last delivery ([`Acknowledger::delivery_limit`]) the runtime dead-letters instead. An
    /// acknowledger that numbers attempts itself should not count it as one (the RabbitMQ one
    /// keeps the number; JetStream and Redis Streams count every delivery, so there a later real
    /// failure has that many attempts fewer). The SQL strategies make a twin wait on the row lock
    /// instead.
    InProgressElsewhere,
}

/// What the runtime asks of the broker when it requeues a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Requeue {
    /// Why.
    pub reason: RequeueReason,
    /// The delivery that failed: 1 for the first. The next delivery is `attempt + 1`.
    pub attempt: u32,
    /// How long to wait before the next delivery (exponential backoff with jitter, from the
    /// handler's [`RetryPolicy`](crate::RetryPolicy)). A broker that cannot delay a single
    /// message should hold it back at least this long by other means, never redeliver at once
    /// in a hot loop.
    pub delay: Duration,
}

/// What the runtime tells the broker when it dead-letters a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter<'a> {
    /// Why, for whoever inspects the dead-letter queue: the error, and for a retryable one
    /// that ran out of attempts, that it did.
    pub reason: &'a str,
    /// The delivery that failed: 1 for the first.
    pub attempt: u32,
}

/// The broker side of one delivery: which delivery of the message it is, and how to
/// acknowledge it, requeue it, or dead-letter it.
///
/// Each settling method consumes the acknowledger, so a delivery is settled exactly once.
/// Broker integrations implement it for their delivery handle; [`NoAck`] is for direct calls.
pub trait Acknowledger: Send {
    /// The broker client's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Which delivery of this message this is, 1 for the first, as the broker counts it
    /// (RabbitMQ's `x-death` count or a retry header, JetStream's delivery count, the Redis
    /// Streams pending list). `None` when the broker does not count: the runtime then treats
    /// every delivery as the first, so `max_attempts` cannot end its retries.
    fn attempt(&self) -> Option<u32>;

    /// The broker's own limit on deliveries of this message, when it has one and will stop
    /// redelivering by itself past it (JetStream's `max_deliver`). The runtime dead-letters at
    /// the last delivery the broker allows even when the handler's `max_attempts` is higher,
    /// so that the broker never drops a message silently. `None` (the default): no such limit.
    fn delivery_limit(&self) -> Option<u32> {
        None
    }

    /// The broker's id for this message, for `key = "$message_id"`: the AMQP `message_id`
    /// property, the JetStream `Nats-Msg-Id` header, the Redis Streams entry id. `None` (the
    /// default) when the message has none; a handler keyed on it then dead-letters the
    /// delivery with [`KeyError::MissingMessageId`](crate::KeyError::MissingMessageId).
    fn message_id(&self) -> Option<&str> {
        None
    }

    /// The message's effects are committed: remove it from the queue.
    fn ack(self, proof: Committed) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Hand the message back for another delivery, after `requeue.delay`.
    fn requeue(self, requeue: Requeue) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The message can never succeed, or ran out of attempts: move it to the dead-letter
    /// destination with the reason and the attempt count. Never drop it.
    fn dead_letter(
        self,
        letter: DeadLetter<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Acknowledges every delivery of `acks`, after the one commit that covered them all (a
    /// `batch` handler's part), and returns what the broker said to each, in order. The
    /// default acks them one by one; an acknowledger of a broker that acknowledges many
    /// deliveries in one call may override it. (idem's RabbitMQ batch runner does it its own
    /// way: it holds a batch's acks and sends them, as one `multiple` ack where that is safe,
    /// once the whole batch has ended.)
    fn ack_all(
        acks: Vec<Self>,
        proof: Committed,
    ) -> impl Future<Output = Vec<Result<(), Self::Error>>> + Send
    where
        Self: Sized,
    {
        let _ = proof;
        async move {
            let mut told = Vec::with_capacity(acks.len());
            for ack in acks {
                told.push(ack.ack(Committed::new()).await);
            }
            told
        }
    }
}

/// The acknowledger of a direct call, with no broker behind it: every method does nothing, and
/// every call is a first attempt.
///
/// ```
/// use idem_runtime::{Acknowledger, NoAck};
///
/// assert_eq!(NoAck.attempt(), None);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAck;

impl Acknowledger for NoAck {
    type Error = std::convert::Infallible;

    fn attempt(&self) -> Option<u32> {
        None
    }

    async fn ack(self, _proof: Committed) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn requeue(self, _requeue: Requeue) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn dead_letter(self, _letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// How a failed delivery is settled, decided from the error's disposition, the attempt and
/// the handler's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    Requeue {
        attempt: u32,
        delay: Duration,
        reason: RequeueReason,
    },
    DeadLetter {
        attempt: u32,
        reason: String,
    },
}

impl Settlement {
    /// Retryable failures are requeued until the policy's last attempt, then dead-lettered
    /// with the count; permanent ones are dead-lettered at once.
    pub(crate) fn of_failure(
        disposition: crate::Disposition,
        attempt: u32,
        policy: &crate::RetryPolicy,
        reason: &str,
        jitter: f64,
    ) -> Self {
        match disposition {
            crate::Disposition::Retry if !policy.is_exhausted(attempt) => Self::Requeue {
                attempt,
                delay: policy.delay(attempt, jitter),
                reason: RequeueReason::Retryable,
            },
            crate::Disposition::Retry => Self::DeadLetter {
                attempt,
                reason: format!(
                    "gave up after {attempt} attempt{}: {}",
                    if attempt == 1 { "" } else { "s" },
                    reason
                ),
            },
            _ => Self::DeadLetter {
                attempt,
                reason: reason.to_owned(),
            },
        }
    }
}

impl Settlement {
    /// Another delivery holds the key's lease: requeue after the policy's delay, or sooner when
    /// the lease ends sooner. `max_attempts` does not apply (the handler did not fail); a
    /// broker's own limit does, since past it the broker would drop the message.
    pub(crate) fn in_progress(
        attempt: u32,
        policy: &crate::RetryPolicy,
        delivery_limit: Option<u32>,
        lease_remaining: Duration,
        reason: &str,
        jitter: f64,
    ) -> Self {
        if delivery_limit.is_some_and(|limit| attempt >= limit) {
            return Self::DeadLetter {
                attempt,
                reason: format!(
                    "the broker's last delivery ({attempt}) found the message still in progress elsewhere: {reason}"
                ),
            };
        }
        Self::Requeue {
            attempt,
            delay: policy
                .delay(attempt, jitter)
                .min(lease_remaining.max(Duration::from_millis(1))),
            reason: RequeueReason::InProgressElsewhere,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disposition, RetryPolicy};

    #[test]
    fn in_progress_requeues_past_max_attempts_until_the_broker_limit() {
        let policy = RetryPolicy::with_max_attempts(2);
        let lease = Duration::from_secs(30);
        assert_eq!(
            Settlement::in_progress(5, &policy, None, lease, "busy", 1.0),
            Settlement::Requeue {
                attempt: 5,
                delay: Duration::from_secs(16),
                reason: RequeueReason::InProgressElsewhere
            }
        );
        assert_eq!(
            Settlement::in_progress(1, &policy, Some(3), Duration::from_millis(40), "busy", 1.0),
            Settlement::Requeue {
                attempt: 1,
                delay: Duration::from_millis(40),
                reason: RequeueReason::InProgressElsewhere
            },
            "never longer than the lease"
        );
        assert!(matches!(
            Settlement::in_progress(3, &policy, Some(3), lease, "busy", 1.0),
            Settlement::DeadLetter { attempt: 3, .. }
        ));
    }

    #[test]
    fn retryable_failures_requeue_until_the_last_attempt() {
        let policy = RetryPolicy::with_max_attempts(3);
        let reason = "deadlock";
        assert_eq!(
            Settlement::of_failure(Disposition::Retry, 1, &policy, reason, 1.0),
            Settlement::Requeue {
                attempt: 1,
                delay: Duration::from_secs(1),
                reason: RequeueReason::Retryable
            }
        );
        assert_eq!(
            Settlement::of_failure(Disposition::Retry, 2, &policy, reason, 1.0),
            Settlement::Requeue {
                attempt: 2,
                delay: Duration::from_secs(2),
                reason: RequeueReason::Retryable
            }
        );
        assert_eq!(
            Settlement::of_failure(Disposition::Retry, 3, &policy, reason, 1.0),
            Settlement::DeadLetter {
                attempt: 3,
                reason: "gave up after 3 attempts: deadlock".into()
            }
        );
        assert_eq!(
            Settlement::of_failure(Disposition::DeadLetter, 1, &policy, reason, 1.0),
            Settlement::DeadLetter {
                attempt: 1,
                reason: "deadlock".into()
            }
        );
    }
}

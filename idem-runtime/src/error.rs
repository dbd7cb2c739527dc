//! Errors, and how each one is settled with the broker.
//!
//! Every failure has a [`Disposition`]: either a redelivery may succeed ([`Disposition::Retry`]:
//! roll back, requeue with backoff) or it never will ([`Disposition::DeadLetter`]: roll back,
//! dead-letter the message so that it is kept, never silently dropped).

use std::error::Error as StdError;
use std::fmt;

use crate::classify::classify_sqlx_error;
use crate::key::KeyError;

pub use crate::classify::Disposition;

/// A handler's error type: says whether a redelivery of the failed message may succeed.
///
/// `#[idempotent]` handlers return `Result<T, E>` with `E: HandlerError`. The default
/// [`disposition`](HandlerError::disposition) looks for a [`sqlx::Error`] in the error's
/// [`source`](std::error::Error::source) chain (so `#[from] sqlx::Error` variants are
/// classified for you, by the database's error class: see [`classify`](crate::classify)) and
/// otherwise retries (bounded by `max_attempts`). Keep the database error in the chain: a
/// variant that stores only its text (`Db(String)`) hides both its class and, under
/// `unique_constraint`, the duplicate. Override `disposition` to dead-letter the errors that a
/// redelivery cannot fix:
///
/// ```
/// use idem_runtime::{Disposition, HandlerError};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error(transparent)]
///     Db(#[from] sqlx::Error),
///     #[error("amount must be positive, got {0}")]
///     BadAmount(i64),
/// }
///
/// impl HandlerError for AppError {
///     fn disposition(&self) -> Disposition {
///         match self {
///             AppError::BadAmount(_) => Disposition::DeadLetter,
///             other => idem_runtime::classify::classify_error_chain(other),
///         }
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "the handler's error type `{Self}` does not implement `idem_runtime::HandlerError`",
    label = "the error type of this `Result` must say whether a redelivery may succeed",
    note = "add `impl idem_runtime::HandlerError for {Self} {{}}` (errors are retried by default; override `disposition` to dead-letter the permanent ones)"
)]
pub trait HandlerError: StdError + Send + Sync + Sized + 'static {
    /// Whether a redelivery may succeed. The default is
    /// [`classify_error_chain`](crate::classify::classify_error_chain).
    fn disposition(&self) -> Disposition {
        crate::classify::classify_error_chain(self)
    }
}

impl HandlerError for sqlx::Error {}
impl HandlerError for std::io::Error {}
impl HandlerError for std::convert::Infallible {}

/// Every error type a handler may return: each [`HandlerError`], and, behind the features of
/// the same name, [`anyhow::Error`](https://docs.rs/anyhow) and
/// [`eyre::Report`](https://docs.rs/eyre), which you cannot implement [`HandlerError`] for
/// yourself (the orphan rule) and which are not `std::error::Error`s.
///
/// You never implement this trait: implement [`HandlerError`] for your own error types. An
/// `anyhow::Error` or `eyre::Report` is classified like any error without an override of
/// [`HandlerError::disposition`]: by the [`sqlx::Error`] in its chain, if any, otherwise retried
/// (bounded by `max_attempts`). To dead-letter some of them at once, return your own error type.
///
/// ```
/// # #[cfg(feature = "anyhow")] {
/// use anyhow::Context as _;
/// use idem_runtime::{idempotent, MemoryTx};
///
/// #[idempotent(key = "0", store = "memory", strategy = "dedup_table", scope = "doc.anyhow")]
/// async fn on_event(tx: &mut MemoryTx, msg: (String,)) -> anyhow::Result<()> {
///     let amount: u32 = "12".parse().context("the amount is not a number")?;
///     tx.on_commit(move || drop(amount));
///     Ok(())
/// }
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "the handler's error type `{Self}` does not implement `idem_runtime::HandlerError`",
    label = "the error type of this `Result` must say whether a redelivery may succeed",
    note = "add `impl idem_runtime::HandlerError for {Self} {{}}` (errors are retried by default; override `disposition` to dead-letter the permanent ones); `anyhow::Error` and `eyre::Report` need idem-runtime's `anyhow` / `eyre` feature"
)]
pub trait HandlerFailure: fmt::Debug + Send + Sync + 'static {
    /// Whether a redelivery may succeed: [`HandlerError::disposition`] for a `HandlerError`.
    /// (Named apart from it, so that a type with both in scope has one `disposition`.)
    fn classify(&self) -> Disposition;
    /// The error as a `std::error::Error`, to display it and search its source chain.
    fn as_std_error(&self) -> &(dyn StdError + 'static);
}

impl<E: HandlerError> HandlerFailure for E {
    fn classify(&self) -> Disposition {
        HandlerError::disposition(self)
    }
    fn as_std_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

#[cfg(feature = "anyhow")]
impl HandlerFailure for anyhow::Error {
    fn classify(&self) -> Disposition {
        crate::classify::classify_error_chain(self.as_std_error())
    }
    fn as_std_error(&self) -> &(dyn StdError + 'static) {
        let error: &(dyn StdError + Send + Sync + 'static) = self.as_ref();
        error
    }
}

#[cfg(feature = "eyre")]
impl HandlerFailure for eyre::Report {
    fn classify(&self) -> Disposition {
        crate::classify::classify_error_chain(self.as_std_error())
    }
    fn as_std_error(&self) -> &(dyn StdError + 'static) {
        let error: &(dyn StdError + Send + Sync + 'static) = self.as_ref();
        error
    }
}

/// A failure to handle one delivery.
///
/// `E` is the handler's own error type. [`Error::disposition`] says what the broker is told.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The handler's body failed; its transaction was rolled back.
    Handler(E),
    /// The message does not yield a valid key.
    Key(KeyError),
    /// A record exists for this key with a different payload fingerprint: the same key was
    /// reused for a different message. Permanent; compare the producer's keys.
    PayloadMismatch {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
    },
    /// The dedup store failed (begin, gate, record or commit). Classified by the database's
    /// error class ([`classify`](crate::classify)).
    Database(sqlx::Error),
    /// The transaction was no longer open when the runtime committed it: a statement in the
    /// body failed, the body ignored the error, and the database aborted or rolled back the
    /// whole transaction. Nothing was committed by it and the message is not acked. Retryable:
    /// the redelivery runs the body again (fix the body so that it returns the error).
    TransactionAborted {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
    },
    /// User code panicked: the body, a `KeyPart`, `StateKeyPart`, `Serialize` or
    /// `Deserialize` impl the runtime called. The transaction was rolled back. Retryable, so that
    /// `max_attempts` dead-letters a message that always panics.
    Panicked {
        /// The handler's scope.
        scope: String,
        /// What was running: `"body"`, `"key"` (a `KeyPart` or `StateKeyPart`),
        /// `"fingerprint"`, `"result's serialization"` or `"replayed result's deserialization"`.
        during: &'static str,
        /// The panic's message, when it was a string.
        message: String,
    },
    /// `unique_constraint` with `fingerprint`: the named constraint says this key was
    /// processed, but its dedup record is gone (expired, purged, or the row predates
    /// `fingerprint`), so the payload cannot be compared with the first one. Permanent: a
    /// person decides whether it is a redelivery or a different message with a reused key.
    UnverifiableDuplicate {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
    },
    /// Two different handlers of this binary use the same scope: their keys would collide and
    /// one would skip the other's messages as duplicates. Every handler that shares the scope
    /// fails, in every process, whichever is delivered first. Give each its own `scope`.
    /// Retryable (so a deploy that fixes it within `max_attempts` loses nothing), then
    /// dead-lettered like any retryable failure.
    ScopeCollision {
        /// The shared scope.
        scope: String,
    },
    /// `state_machine`: the entity is in a state this step cannot move from, and not in one
    /// that means "already done". Permanent: the message is dead-lettered with the state.
    InvalidTransition {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
        /// The entity's state when the delivery arrived (`None`: the column is NULL).
        current: Option<String>,
        /// The states this step moves from.
        expected: Vec<String>,
    },
    /// `state_machine`: the entity is in one of the step's `early` states: the step arrived
    /// before its predecessor. Retryable.
    TooEarly {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
        /// The entity's state.
        current: String,
    },
    /// `state_machine`: the entity does not exist (yet). Retryable by default, since messages
    /// arrive out of order; dead-lettered with `on_missing = "dead_letter"`.
    NotFound {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
        /// The table the entity was looked for in.
        table: String,
        /// Whether a redelivery may find it (`on_missing = "retry"`).
        retryable: bool,
    },
    /// The payload (for `fingerprint`) or the result (for `replay`) could not be serialized.
    Serialize {
        /// `"payload"` or `"result"`.
        what: &'static str,
        /// The serializer's error.
        source: serde_json::Error,
    },
    /// The payload does not decode into the handler's message type ([`DynHandler`](crate::handler::DynHandler)).
    /// Permanent: dead-lettered.
    Decode {
        /// The message type it was decoded into.
        message_type: &'static str,
        /// The decoder's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `lock`, `token`: another delivery of this message holds a live lease: it is running the
    /// body now. Requeued with a delay (never acked; `max_attempts` never dead-letters it, only
    /// a broker's own delivery limit does): the redelivery finds the done marker, or the lease
    /// free if that delivery failed.
    InProgress {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
        /// How long the other delivery's lease still runs.
        lease_remaining: std::time::Duration,
    },
    /// `lock`, `token`: the body outlived its lease and another delivery now holds a live lease
    /// on the key, so this delivery wrote no done marker (the fence). Retryable: the redelivery
    /// meets the other delivery's marker, its lease, or (if it failed) a free key, and then runs
    /// the body again. Lengthen `lease`, or leave lease renewal on.
    LeaseLost {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
    },
    /// `token`: the message's token was never issued, has expired, or was spent by a failed
    /// attempt (`spend_on_error`). Permanent: dead-lettered.
    UnknownToken {
        /// The handler's scope.
        scope: String,
        /// The token.
        key: String,
    },
    /// The Redis store failed (unreachable, restarting, a script error). Retryable: the message
    /// is requeued, never acked, and handled once Redis answers.
    #[cfg(feature = "redis")]
    Redis(redis::RedisError),
    /// A stored result could not be decoded into the handler's result type; the type changed
    /// since the record was written.
    Replay {
        /// The handler's scope.
        scope: String,
        /// The encoded key.
        key: String,
        /// The decoder's error.
        source: serde_json::Error,
    },
}

impl<E> Error<E> {
    /// Formats the error, with `handler` formatting the handler's own error: `Display` for
    /// `Error<E>` passes `E`'s, the runtime passes the `dyn Error` view it keeps (so it needs no
    /// `E: Display` bound).
    pub(crate) fn fmt_with(
        &self,
        f: &mut fmt::Formatter<'_>,
        handler: impl FnOnce(&E, &mut fmt::Formatter<'_>) -> fmt::Result,
    ) -> fmt::Result {
        match self {
            Self::Handler(error) => {
                f.write_str("handler failed: ")?;
                handler(error, f)
            }
            Self::Key(error) => fmt::Display::fmt(error, f),
            Self::PayloadMismatch { scope, key } => write!(
                f,
                "payload mismatch for key `{key}` in scope `{scope}`: a message with this key but a different payload was already processed; the producer reuses keys for different messages"
            ),
            Self::Database(error) => write!(f, "idempotency store failed: {error}"),
            Self::TransactionAborted { scope, key } => write!(
                f,
                "the transaction for key `{key}` in scope `{scope}` was aborted by a failed statement the handler ignored; nothing was committed and the message is requeued (return the statement's error from the handler instead of discarding it)"
            ),
            Self::Panicked {
                scope,
                during,
                message,
            } => write!(
                f,
                "the handler in scope `{scope}` panicked in its {during}: {message}; the transaction was rolled back and the message is requeued"
            ),
            Self::UnverifiableDuplicate { scope, key } => write!(
                f,
                "key `{key}` in scope `{scope}` violates the handler's unique constraint, so it was processed before, but its dedup record is gone (expired, purged, or written before `fingerprint`): the payload cannot be compared, so the message is dead-lettered for inspection"
            ),
            Self::ScopeCollision { scope } => write!(
                f,
                "two different handlers use the scope `{scope}`: their keys would collide and one would skip the other's messages; give each handler its own `scope = \"...\"`"
            ),
            Self::InvalidTransition {
                scope,
                key,
                current,
                expected,
            } => write!(
                f,
                "invalid transition for key `{key}` in scope `{scope}`: the entity is in state {}, and this step moves only from {}",
                current
                    .as_deref()
                    .map_or_else(|| "NULL".to_owned(), |s| format!("`{s}`")),
                expected
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::TooEarly {
                scope,
                key,
                current,
            } => write!(
                f,
                "too early for key `{key}` in scope `{scope}`: the entity is still `{current}`, before this step; retrying once its predecessor lands"
            ),
            Self::NotFound {
                scope,
                key,
                table,
                retryable,
            } => write!(
                f,
                "no row in `{table}` for key `{key}` in scope `{scope}`{}",
                if *retryable {
                    "; retrying, as the message that creates it may not have arrived yet"
                } else {
                    ""
                }
            ),
            Self::Serialize { what, source } => write!(
                f,
                "could not serialize the {what} for the dedup record: {source}"
            ),
            Self::Decode {
                message_type,
                source,
            } => write!(
                f,
                "the payload does not decode into the handler's message type `{message_type}`: {source}; it is dead-lettered"
            ),
            Self::InProgress {
                scope,
                key,
                lease_remaining,
            } => write!(
                f,
                "key `{key}` in scope `{scope}` is in progress elsewhere: another delivery holds its lease for {} ms more; requeued, never acked",
                lease_remaining.as_millis()
            ),
            Self::LeaseLost { scope, key } => write!(
                f,
                "the lease on key `{key}` in scope `{scope}` was lost while the body ran (it outlived the lease and another delivery holds the key now), so no done marker was written; requeued (lengthen `lease`, or leave lease renewal on)"
            ),
            Self::UnknownToken { scope, key } => write!(
                f,
                "token `{key}` in scope `{scope}` is unknown: never issued, expired, or spent by a failed attempt; the message is dead-lettered (issue a new token)"
            ),
            #[cfg(feature = "redis")]
            Self::Redis(error) => write!(f, "redis store failed: {error}; requeued"),
            Self::Replay { scope, key, source } => write!(
                f,
                "the stored result for key `{key}` in scope `{scope}` does not decode into the handler's result type (did the type change?): {source}"
            ),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_with(f, |error, f| fmt::Display::fmt(error, f))
    }
}

impl<E: StdError + 'static> StdError for Error<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Handler(error) => Some(error),
            Self::Key(error) => Some(error),
            Self::Database(error) => Some(error),
            #[cfg(feature = "redis")]
            Self::Redis(error) => Some(error),
            Self::Serialize { source, .. } | Self::Replay { source, .. } => Some(source),
            Self::Decode { source, .. } => Some(&**source as &(dyn StdError + 'static)),
            Self::PayloadMismatch { .. }
            | Self::TransactionAborted { .. }
            | Self::Panicked { .. }
            | Self::UnverifiableDuplicate { .. }
            | Self::ScopeCollision { .. }
            | Self::InvalidTransition { .. }
            | Self::TooEarly { .. }
            | Self::NotFound { .. }
            | Self::InProgress { .. }
            | Self::LeaseLost { .. }
            | Self::UnknownToken { .. } => None,
        }
    }
}

impl<E> From<KeyError> for Error<E> {
    fn from(error: KeyError) -> Self {
        Self::Key(error)
    }
}

/// How the runtime inspects a handler's error type `E`: checked once, where the handler is
/// declared (`E: HandlerError`), then carried as plain function pointers, so that no other
/// runtime function needs the bound (and a missing impl is reported once, on the handler's
/// return type).
pub struct HandlerErrors<E> {
    disposition: fn(&E) -> Disposition,
    as_error: fn(&E) -> &(dyn StdError + 'static),
}

impl<E> Clone for HandlerErrors<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for HandlerErrors<E> {}

impl<E> std::fmt::Debug for HandlerErrors<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandlerErrors")
    }
}

impl<E: HandlerFailure> HandlerErrors<E> {
    /// The inspector of `E`.
    pub const fn of() -> Self {
        Self {
            disposition: <E as HandlerFailure>::classify,
            as_error: <E as HandlerFailure>::as_std_error,
        }
    }
}

impl<E> HandlerErrors<E> {
    /// What the broker should do with a message that failed with `error`.
    pub fn disposition(&self, error: &Error<E>) -> Disposition {
        match error {
            Error::Handler(error) => (self.disposition)(error),
            Error::Database(error) => classify_sqlx_error(error),
            Error::NotFound {
                retryable: true, ..
            }
            | Error::TooEarly { .. }
            | Error::TransactionAborted { .. }
            | Error::Panicked { .. }
            | Error::ScopeCollision { .. }
            | Error::InProgress { .. }
            | Error::LeaseLost { .. } => Disposition::Retry,
            // Unreachable, restarting, out of memory, a script error: all may heal, and
            // `max_attempts` bounds the rest.
            #[cfg(feature = "redis")]
            Error::Redis(_) => Disposition::Retry,
            Error::NotFound { .. }
            | Error::UnverifiableDuplicate { .. }
            | Error::InvalidTransition { .. }
            | Error::Key(_)
            | Error::UnknownToken { .. }
            | Error::PayloadMismatch { .. }
            | Error::Serialize { .. }
            | Error::Decode { .. }
            | Error::Replay { .. } => Disposition::DeadLetter,
        }
    }

    /// Displays `error` without an `E: Display` bound.
    pub(crate) fn display<'e>(&self, error: &'e Error<E>) -> impl fmt::Display + 'e {
        let as_error = self.as_error;
        DisplayWith { error, as_error }
    }

    /// The handler's error as a `dyn Error`, to search its source chain.
    pub fn as_error<'e>(&self, error: &'e E) -> &'e (dyn StdError + 'static) {
        (self.as_error)(error)
    }
}

impl<E: HandlerFailure> Error<E> {
    /// What the broker should do with the message.
    pub fn disposition(&self) -> Disposition {
        HandlerErrors::<E>::of().disposition(self)
    }

    /// `true` when a redelivery may succeed.
    pub fn is_retryable(&self) -> bool {
        self.disposition() == Disposition::Retry
    }
}

impl<E> Error<E> {
    /// The handler's own error, when the body failed.
    pub fn handler_error(&self) -> Option<&E> {
        match self {
            Self::Handler(error) => Some(error),
            _ => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Self::Handler(_) => "handler",
            Self::Key(_) => "key",
            Self::PayloadMismatch { .. } => "payload_mismatch",
            Self::Database(_) => "database",
            Self::TransactionAborted { .. } => "transaction_aborted",
            Self::Panicked { .. } => "panicked",
            Self::UnverifiableDuplicate { .. } => "unverifiable_duplicate",
            Self::ScopeCollision { .. } => "scope_collision",
            Self::InvalidTransition { .. } => "invalid_transition",
            Self::NotFound { .. } => "not_found",
            Self::TooEarly { .. } => "too_early",
            Self::Serialize { .. } => "serialize",
            Self::Replay { .. } => "replay",
            Self::Decode { .. } => "decode",
            Self::InProgress { .. } => "in_progress",
            Self::LeaseLost { .. } => "lease_lost",
            Self::UnknownToken { .. } => "unknown_token",
            #[cfg(feature = "redis")]
            Self::Redis(_) => "redis",
        }
    }

    /// The same error with the handler's own error mapped by `f`, every other variant kept.
    pub fn map_handler<F>(self, f: impl FnOnce(E) -> F) -> Error<F> {
        match self {
            Self::Handler(error) => Error::Handler(f(error)),
            Self::Key(error) => Error::Key(error),
            Self::PayloadMismatch { scope, key } => Error::PayloadMismatch { scope, key },
            Self::Database(error) => Error::Database(error),
            Self::TransactionAborted { scope, key } => Error::TransactionAborted { scope, key },
            Self::Panicked {
                scope,
                during,
                message,
            } => Error::Panicked {
                scope,
                during,
                message,
            },
            Self::UnverifiableDuplicate { scope, key } => {
                Error::UnverifiableDuplicate { scope, key }
            }
            Self::ScopeCollision { scope } => Error::ScopeCollision { scope },
            Self::InvalidTransition {
                scope,
                key,
                current,
                expected,
            } => Error::InvalidTransition {
                scope,
                key,
                current,
                expected,
            },
            Self::TooEarly {
                scope,
                key,
                current,
            } => Error::TooEarly {
                scope,
                key,
                current,
            },
            Self::NotFound {
                scope,
                key,
                table,
                retryable,
            } => Error::NotFound {
                scope,
                key,
                table,
                retryable,
            },
            Self::Serialize { what, source } => Error::Serialize { what, source },
            Self::Decode {
                message_type,
                source,
            } => Error::Decode {
                message_type,
                source,
            },
            Self::Replay { scope, key, source } => Error::Replay { scope, key, source },
            Self::InProgress {
                scope,
                key,
                lease_remaining,
            } => Error::InProgress {
                scope,
                key,
                lease_remaining,
            },
            Self::LeaseLost { scope, key } => Error::LeaseLost { scope, key },
            Self::UnknownToken { scope, key } => Error::UnknownToken { scope, key },
            #[cfg(feature = "redis")]
            Self::Redis(error) => Error::Redis(error),
        }
    }
}

struct DisplayWith<'e, E> {
    error: &'e Error<E>,
    as_error: fn(&E) -> &(dyn StdError + 'static),
}

impl<E> fmt::Display for DisplayWith<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error
            .fmt_with(f, |error, f| fmt::Display::fmt((self.as_error)(error), f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum AppError {
        #[error("database: {0}")]
        Db(#[from] sqlx::Error),
        #[error("wrapped: {0}")]
        Wrapped(#[source] std::io::Error),
        #[error("plain")]
        Plain,
    }
    impl HandlerError for AppError {}

    #[test]
    fn chain_walk_finds_sqlx_errors() {
        assert_eq!(
            AppError::Db(sqlx::Error::PoolTimedOut).disposition(),
            Disposition::Retry
        );
        assert_eq!(
            AppError::Db(sqlx::Error::ColumnNotFound("x".into())).disposition(),
            Disposition::DeadLetter
        );
        assert_eq!(AppError::Plain.disposition(), Disposition::Retry);
        assert_eq!(
            AppError::Wrapped(std::io::Error::other("x")).disposition(),
            Disposition::Retry
        );
    }

    #[test]
    fn runtime_errors_are_classified() {
        let key_error: Error<AppError> = Error::Key(KeyError::EmptyPart {
            scope: "s".into(),
            field: "f".into(),
        });
        assert_eq!(key_error.disposition(), Disposition::DeadLetter);
        let mismatch: Error<AppError> = Error::PayloadMismatch {
            scope: "s".into(),
            key: "k".into(),
        };
        assert!(!mismatch.is_retryable());
        let lost: Error<AppError> = Error::Database(sqlx::Error::Io(std::io::Error::other("x")));
        assert!(lost.is_retryable());
        let handler: Error<AppError> = Error::Handler(AppError::Plain);
        assert!(handler.is_retryable());
        assert!(handler.handler_error().is_some());
    }
}

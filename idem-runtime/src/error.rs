//! Errors, and how each one is settled with the broker.
//!
//! Every failure has a [`Disposition`]: either a redelivery may succeed ([`Disposition::Retry`]:
//! roll back, requeue with backoff) or it never will ([`Disposition::DeadLetter`]: roll back,
//! dead-letter the message so that it is kept, never silently dropped).

use std::error::Error as StdError;
use std::fmt;

use crate::key::KeyError;

/// What the broker should do with a message whose handling failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disposition {
    /// A redelivery may succeed: connection lost, pool timeout, deadlock, serialization
    /// failure, a lease held elsewhere, or a handler error its type calls retryable.
    Retry,
    /// A redelivery never will: the key or payload is invalid, the same key came with a
    /// different payload, or a handler error its type calls permanent.
    DeadLetter,
}

/// A handler's error type: says whether a redelivery of the failed message may succeed.
///
/// `#[idempotent]` handlers return `Result<T, E>` with `E: HandlerError`. The default
/// [`disposition`](HandlerError::disposition) looks for a [`sqlx::Error`] in the error's
/// [`source`](std::error::Error::source) chain (so `#[from] sqlx::Error` variants are
/// classified for you) and otherwise retries. Override it to dead-letter the errors that a
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
///             other => idem_runtime::classify_error_chain(other),
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
    /// Whether a redelivery may succeed. The default is [`classify_error_chain`].
    fn disposition(&self) -> Disposition {
        classify_error_chain(self)
    }
}

impl HandlerError for sqlx::Error {}
impl HandlerError for std::io::Error {}
impl HandlerError for std::convert::Infallible {}

/// Classifies an error by the first database error in its source chain (itself included):
/// a [`sqlx::Error`] with [`classify_sqlx_error`], or a driver's database error (which is what
/// the chain holds when an `#[error(transparent)]` variant wraps the `sqlx::Error`). An error
/// chain without one is [`Disposition::Retry`].
pub fn classify_error_chain(error: &(dyn StdError + 'static)) -> Disposition {
    match find_database_error(error) {
        Some(FoundDatabaseError::Sqlx(error)) => classify_sqlx_error(error),
        Some(FoundDatabaseError::Driver(db)) => classify_database_error(db),
        None => Disposition::Retry,
    }
}

/// A database error found in a source chain.
pub(crate) enum FoundDatabaseError<'a> {
    Sqlx(&'a sqlx::Error),
    Driver(&'a dyn sqlx::error::DatabaseError),
}

impl<'a> FoundDatabaseError<'a> {
    /// The driver's error, when the database reported one.
    pub(crate) fn database(&self) -> Option<&'a dyn sqlx::error::DatabaseError> {
        match *self {
            Self::Sqlx(sqlx::Error::Database(db)) => Some(db.as_ref()),
            Self::Sqlx(_) => None,
            Self::Driver(db) => Some(db),
        }
    }
}

/// The first `sqlx::Error` or driver database error in `error`'s source chain.
pub(crate) fn find_database_error<'a>(
    error: &'a (dyn StdError + 'static),
) -> Option<FoundDatabaseError<'a>> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(sqlx_error) = err.downcast_ref::<sqlx::Error>() {
            return Some(FoundDatabaseError::Sqlx(sqlx_error));
        }
        // `sqlx::Error::Database`'s source is the box itself.
        if let Some(db) = err.downcast_ref::<Box<dyn sqlx::error::DatabaseError>>() {
            return Some(FoundDatabaseError::Driver(db.as_ref()));
        }
        #[cfg(feature = "pg")]
        if let Some(db) = err.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        #[cfg(feature = "mysql")]
        if let Some(db) = err.downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        #[cfg(feature = "sqlite")]
        if let Some(db) = err.downcast_ref::<sqlx::sqlite::SqliteError>() {
            return Some(FoundDatabaseError::Driver(db));
        }
        current = err.source();
    }
    None
}

/// Classifies a database error.
///
/// Retryable: I/O, TLS and protocol failures, pool time-outs, a closed pool, serialization
/// failures and deadlocks (`40001`, `40P01`; MySQL 1213), lock time-outs (`55P03`; MySQL 1205),
/// SQLite's `BUSY` and
/// `LOCKED`, foreign-key violations (the parent row may arrive with a later message), a missing
/// row, and database errors not otherwise known. Permanent: unique, not-null, check and
/// exclusion violations, and errors that only a code change can fix (encoding, decoding,
/// configuration, a missing column).
pub fn classify_sqlx_error(error: &sqlx::Error) -> Disposition {
    match error {
        sqlx::Error::Database(db) => classify_database_error(db.as_ref()),
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::Migrate(_) => Disposition::DeadLetter,
        _ => Disposition::Retry,
    }
}

fn classify_database_error(db: &dyn sqlx::error::DatabaseError) -> Disposition {
    use sqlx::error::ErrorKind;
    if is_retryable_database_code(db) {
        return Disposition::Retry;
    }
    match db.kind() {
        ErrorKind::UniqueViolation
        | ErrorKind::NotNullViolation
        | ErrorKind::CheckViolation
        | ErrorKind::ExclusionViolation => Disposition::DeadLetter,
        _ => Disposition::Retry,
    }
}

fn is_retryable_database_code(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Primary result code is the low byte of the extended code.
        let primary = db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .map(|code| code & 0xff);
        const SQLITE_BUSY: i32 = 5;
        const SQLITE_LOCKED: i32 = 6;
        return matches!(primary, Some(SQLITE_BUSY | SQLITE_LOCKED));
    }
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        use crate::store::mysql::{DEADLOCK, LOCK_WAIT_TIMEOUT};
        return matches!(mysql.number(), DEADLOCK | LOCK_WAIT_TIMEOUT);
    }
    matches!(db.code().as_deref(), Some("40001" | "40P01" | "55P03"))
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
    /// The dedup store failed (begin, gate, record or commit).
    Database(sqlx::Error),
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
            Self::Serialize { source, .. } | Self::Replay { source, .. } => Some(source),
            Self::PayloadMismatch { .. }
            | Self::InvalidTransition { .. }
            | Self::TooEarly { .. }
            | Self::NotFound { .. } => None,
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

impl<E: HandlerError> HandlerErrors<E> {
    /// The inspector of `E`.
    pub const fn of() -> Self {
        Self {
            disposition: E::disposition,
            as_error: |error| error,
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
            | Error::TooEarly { .. } => Disposition::Retry,
            Error::NotFound { .. }
            | Error::InvalidTransition { .. }
            | Error::Key(_)
            | Error::PayloadMismatch { .. }
            | Error::Serialize { .. }
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

impl<E: HandlerError> Error<E> {
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
            Self::InvalidTransition { .. } => "invalid_transition",
            Self::NotFound { .. } => "not_found",
            Self::TooEarly { .. } => "too_early",
            Self::Serialize { .. } => "serialize",
            Self::Replay { .. } => "replay",
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

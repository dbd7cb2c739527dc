//! The only path that `#[idempotent]`'s generated code uses. Not a public API: it changes
//! without notice, in lockstep with `idem-macros`.

pub use ::core;
pub use ::inventory;
pub use std::sync::OnceLock;

pub use crate::ack::Acknowledger;
pub use crate::error::{Error, HandlerErrors};
pub use crate::key::{Key, KeyPart};
pub use crate::outcome::Outcome;
pub use crate::payload::{JsonReplay, NoReplay};
pub use crate::pipeline::batch::{BatchOutput, BatchPart, BatchRun, open_batch};
#[cfg(feature = "redis")]
pub use crate::pipeline::lease::{LeaseGate, Renewal, open_lease};
pub use crate::pipeline::{
    CallerGate, HandlerResult, HandlerSpec, OpenGate, PanicPayload, Prepared, Registration, body,
    open, open_in,
};
pub use crate::store::Store;
pub use crate::store::memory::MemoryStore;
#[cfg(feature = "mysql")]
pub use crate::store::mysql::MySqlStore;
#[cfg(feature = "pg")]
pub use crate::store::pg::PgStore;
#[cfg(feature = "redis")]
pub use crate::store::redis::RedisStore;
#[cfg(feature = "sqlite")]
pub use crate::store::sqlite::SqliteStore;
pub use crate::strategy::{DedupTable, StateMachine, UniqueConstraint};
#[cfg(feature = "redis")]
pub use crate::strategy::{Lock, Token};
pub use crate::transition::{OnMissing, StateKey, StateKeyPart, Transition, TransitionSql};

use crate::key::KeyError;

/// Builds the key from `(field name, value)` pairs, in the key's order.
#[inline]
pub fn key(scope: &'static str, parts: &[(&str, &dyn KeyPart)]) -> Result<Key, KeyError> {
    Key::new(scope, parts)
}

/// The delivery's broker message id, for `key = "$message_id"`: taken before the
/// acknowledger moves into the pipeline.
#[inline]
pub fn message_id<A: Acknowledger>(ack: &A) -> Option<String> {
    ack.message_id().map(str::to_owned)
}

/// Builds a key that includes the broker's message id: `MissingMessageId` when the delivery
/// has none, else `build` with it.
#[inline]
pub fn key_with_message_id(
    scope: &'static str,
    message_id: Option<&str>,
    build: impl FnOnce(&str) -> Result<Key, KeyError>,
) -> Result<Key, KeyError> {
    match message_id {
        Some(id) => build(id),
        None => Err(KeyError::MissingMessageId {
            scope: scope.to_owned(),
        }),
    }
}

/// Checks at the use site that a key field's type can be a key part, so that the compiler's
/// error points at the key in the attribute.
#[inline(always)]
pub fn key_part<T: KeyPart>(value: &T) -> &dyn KeyPart {
    value
}

/// The payload's fingerprint, for `fingerprint`.
#[inline]
pub fn fingerprint<M: serde::Serialize + ?Sized>(
    message: &M,
) -> Option<Result<String, serde_json::Error>> {
    Some(crate::payload::fingerprint(message))
}

/// No fingerprint.
#[inline]
pub fn no_fingerprint() -> Option<Result<String, serde_json::Error>> {
    None
}

/// The handler's `Result`, from whatever its declared return type is called, unless the body
/// panicked.
#[inline(always)]
pub fn into_result<R: HandlerResult>(
    result: Result<R, PanicPayload>,
) -> Result<Result<R::Ok, R::Err>, PanicPayload> {
    result.map(HandlerResult::into_result)
}

/// Checks, on the handler's return type, that a `batch` handler returns `Result<(), E>`.
#[inline(always)]
pub const fn assert_batch_output<R: BatchOutput>() {}

/// The key value of a `state_machine` gate, checked where the key is written.
#[inline]
pub fn state_key<T: StateKeyPart + ?Sized>(value: &T) -> StateKey {
    value.state_key()
}

/// Fails the build when a scope (the default one included) is empty or longer than the
/// stores accept.
pub const fn check_scope(scope: &str) {
    assert!(
        !scope.is_empty() && scope.len() <= crate::key::MAX_SCOPE_BYTES,
        "the handler's scope must be 1 to 200 bytes long; the default (module path and function name) is too long here: set `scope = \"...\"` on #[idempotent]"
    );
}

//! The only path that `#[idempotent]`'s generated code uses. Not a public API: it changes
//! without notice, in lockstep with `idem-macros`.

pub use ::core;
pub use std::sync::OnceLock;

pub use crate::ack::Acknowledger;
pub use crate::error::{Error, HandlerErrors};
pub use crate::key::{Key, KeyPart};
pub use crate::outcome::Outcome;
pub use crate::payload::{JsonReplay, NoReplay};
pub use crate::store::TransitionSql;
pub use crate::store::memory::MemoryStore;
#[cfg(feature = "mysql")]
pub use crate::store::mysql::MySqlStore;
#[cfg(feature = "pg")]
pub use crate::store::pg::PgStore;
#[cfg(feature = "sqlite")]
pub use crate::store::sqlite::SqliteStore;
pub use crate::strategy::state_machine::{StateKey, StateKeyPart};
pub use crate::strategy::{
    DedupTable, HandlerResult, HandlerSpec, OnMissing, OpenGate, StateMachine, Transition,
    UniqueConstraint, open,
};

use crate::key::KeyError;
use crate::strategy::FingerprintInput;

/// Builds the key from `(field name, value)` pairs, in the key's order.
#[inline]
pub fn key(scope: &'static str, parts: &[(&str, &dyn KeyPart)]) -> Result<Key, KeyError> {
    Key::new(scope, parts)
}

/// Checks at the use site that a key field's type can be a key part, so that the compiler's
/// error points at the key in the attribute.
#[inline(always)]
pub fn key_part<T: KeyPart>(value: &T) -> &dyn KeyPart {
    value
}

/// The payload's fingerprint, for `fingerprint`.
#[inline]
pub fn fingerprint<M: serde::Serialize + ?Sized>(message: &M) -> FingerprintInput {
    Some(crate::payload::fingerprint(message))
}

/// No fingerprint.
#[inline]
pub fn no_fingerprint() -> FingerprintInput {
    None
}

/// The handler's `Result`, from whatever its declared return type is called.
#[inline(always)]
pub fn into_result<R: HandlerResult>(result: R) -> Result<R::Ok, R::Err> {
    result.into_result()
}

/// Runs the handler's body in the delivery's span. `R` is the handler's declared return type,
/// given explicitly so that `?` inside the body's async block knows what to convert into.
#[inline]
pub fn body<R, F: core::future::Future<Output = R>>(
    span: tracing::Span,
    body: F,
) -> tracing::instrument::Instrumented<F> {
    tracing::Instrument::instrument(body, span)
}

/// The key value of a `state_machine` gate, checked where the key is written.
#[inline]
pub fn state_key<T: StateKeyPart + ?Sized>(value: &T) -> StateKey {
    value.state_key()
}

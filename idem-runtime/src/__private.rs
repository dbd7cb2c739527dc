//! The only path that `#[idempotent]`'s generated code uses. Not a public API: it changes
//! without notice, in lockstep with `idem-macros`.

pub use crate::ack::{Acknowledger, NoAck};
pub use crate::error::{Error, HandlerError};
pub use crate::key::{Key, KeyPart};
pub use crate::outcome::Outcome;
pub use crate::payload::{JsonReplay, NoReplay};
pub use crate::store::memory::{MemoryStore, MemoryTx};
#[cfg(feature = "pg")]
pub use crate::store::pg::{PgStore, PgTx};
#[cfg(feature = "sqlite")]
pub use crate::store::sqlite::{SqliteStore, SqliteTx};
pub use crate::strategy::{DedupTable, HandlerResult, HandlerSpec, UniqueConstraint};

pub use ::core;
pub use ::std;

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

/// Compile-time check that `replay` can store the handler's result.
#[inline(always)]
pub const fn assert_replayable<T: serde::Serialize + serde::de::DeserializeOwned>() {}

/// Compile-time check that the message can be fingerprinted.
#[inline(always)]
pub const fn assert_fingerprintable<M: serde::Serialize + ?Sized>() {}

/// Runs one delivery. The generated function's body is this one call.
#[allow(clippy::too_many_arguments)]
#[inline]
pub async fn run<S, G, C, A, B, R>(
    store: &S,
    strategy: G,
    spec: &HandlerSpec,
    key: Result<Key, KeyError>,
    fingerprint: FingerprintInput,
    codec: C,
    ack: A,
    body: B,
) -> Result<Outcome<R::Ok>, Error<R::Err>>
where
    S: crate::store::Store,
    G: crate::strategy::Strategy<S>,
    C: crate::payload::ResultCodec<R::Ok>,
    A: Acknowledger,
    B: AsyncFnOnce(&mut S::Tx) -> R,
    R: HandlerResult,
    R::Err: HandlerError,
{
    crate::strategy::execute(store, &strategy, spec, key, fingerprint, codec, ack, body).await
}

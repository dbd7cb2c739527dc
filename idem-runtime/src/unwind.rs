//! Catching panics in user code the runtime calls, so that a delivery is still settled.

use std::any::Any;
use std::panic::AssertUnwindSafe;

/// A panic's payload, as `catch_unwind` returns it.
pub type PanicPayload = Box<dyn Any + Send>;

/// The panic's message, when it was a string (as `panic!` makes it).
pub(crate) fn panic_message(payload: &PanicPayload) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned())
}

/// Runs user code that builds part of the delivery (a `KeyPart`, a `Serialize`), turning a
/// panic into a value.
pub(crate) fn catch_sync<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|payload| panic_message(&payload))
}

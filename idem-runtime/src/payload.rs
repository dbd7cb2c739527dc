//! What a dedup record remembers about a message: its payload's fingerprint and its result.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// SHA-256 of a message's JSON form, as 64 lowercase hex digits.
///
/// Two messages with equal fields have equal fingerprints, provided their `Serialize` output
/// is deterministic (a `HashMap` field is not: use a `BTreeMap`).
///
/// ```
/// let a = idem_runtime::fingerprint(&("order-1", 250)).unwrap();
/// let b = idem_runtime::fingerprint(&("order-1", 999)).unwrap();
/// assert_eq!(a.len(), 64);
/// assert_ne!(a, b);
/// ```
pub fn fingerprint<M: Serialize + ?Sized>(message: &M) -> Result<String, serde_json::Error> {
    let json = serde_json::to_vec(message)?;
    let digest = Sha256::digest(&json);
    Ok(digest.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// How a handler's result is written to its record and read back for a duplicate.
///
/// [`NoReplay`] stores nothing; [`JsonReplay`] stores the result as JSON (`replay` on the
/// attribute). The macro picks one, so a handler without `replay` needs no `Serialize`.
pub trait ResultCodec<T>: Send + Sync {
    /// Whether results are stored at all.
    const STORES_RESULTS: bool;

    /// The text to store for `value`, or `None` when results are not stored.
    fn encode(&self, value: &T) -> Result<Option<String>, serde_json::Error>;

    /// The replayed result from a stored text.
    fn decode(&self, stored: Option<&str>) -> Result<Option<T>, serde_json::Error>;
}

/// Results are not stored; a duplicate's outcome carries no replayed result.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReplay;

impl<T> ResultCodec<T> for NoReplay {
    const STORES_RESULTS: bool = false;

    fn encode(&self, _value: &T) -> Result<Option<String>, serde_json::Error> {
        Ok(None)
    }

    fn decode(&self, _stored: Option<&str>) -> Result<Option<T>, serde_json::Error> {
        Ok(None)
    }
}

/// A result type that `replay` can store: `Serialize` and `Deserialize`.
#[diagnostic::on_unimplemented(
    message = "`replay` stores the handler's result, but `{Self}` is not `Serialize` and `Deserialize`",
    label = "`replay` needs the result type to round-trip through JSON",
    note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}`, or remove `replay`"
)]
pub trait Replayable: Serialize + DeserializeOwned {}

impl<T: Serialize + DeserializeOwned> Replayable for T {}

/// Results are stored as JSON and replayed to duplicates.
///
/// Built by [`JsonReplay::new`], the one place that requires `T:`[`Replayable`]; it keeps the
/// encoder and decoder as function pointers, so nothing else needs the bound.
pub struct JsonReplay<T> {
    encode: fn(&T) -> Result<String, serde_json::Error>,
    decode: fn(&str) -> Result<T, serde_json::Error>,
}

impl<T: Replayable> JsonReplay<T> {
    /// The JSON codec of `T`.
    pub const fn new() -> Self {
        Self {
            encode: |value| serde_json::to_string(value),
            decode: |text| serde_json::from_str(text),
        }
    }
}

impl<T: Replayable> Default for JsonReplay<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> std::fmt::Debug for JsonReplay<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonReplay")
    }
}

impl<T> ResultCodec<T> for JsonReplay<T> {
    const STORES_RESULTS: bool = true;

    fn encode(&self, value: &T) -> Result<Option<String>, serde_json::Error> {
        (self.encode)(value).map(Some)
    }

    fn decode(&self, stored: Option<&str>) -> Result<Option<T>, serde_json::Error> {
        stored.map(self.decode).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_hex() {
        let first = fingerprint(&serde_json::json!({"id": 1})).unwrap();
        assert_eq!(first, fingerprint(&serde_json::json!({"id": 1})).unwrap());
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn json_replay_round_trips() {
        let codec = JsonReplay::<Vec<i32>>::new();
        let stored = codec.encode(&vec![1, 2]).unwrap();
        let back = codec.decode(stored.as_deref()).unwrap();
        assert_eq!(back, Some(vec![1, 2]));
        let nothing: Option<i32> = NoReplay.decode(Some("1")).unwrap();
        assert_eq!(nothing, None);
    }
}

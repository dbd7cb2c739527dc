//! Idempotency keys: a scope plus one or more parts taken from the message.
//!
//! A [`Key`] is what the dedup gate stores and compares. Its *scope* namespaces it (by default
//! the handler's module path and name), so two handlers that both key on `order_id` never
//! collide. Its *parts* come from the message fields named in `key = "..."`; each field's type
//! implements [`KeyPart`].

use std::borrow::Cow;
use std::fmt;

/// Longest encoded key accepted, in bytes.
///
/// Chosen so that scope plus key fit one B-tree index entry on every supported database
/// (MySQL's utf8mb4 limit is the tightest: 3072 bytes, 4 bytes a character).
pub const MAX_KEY_BYTES: usize = 500;

/// Longest scope accepted, in bytes. See [`MAX_KEY_BYTES`].
pub const MAX_SCOPE_BYTES: usize = 200;

/// Separates the parts of a composite key in its encoded form.
const SEPARATOR: char = ':';
/// Escapes [`SEPARATOR`] and itself inside a part, so the encoding is injective:
/// `("a:b", "c")` and `("a", "b:c")` never encode to the same key.
const ESCAPE: char = '\\';

/// A value that can be part of an idempotency key.
///
/// Implemented for strings, integers, `bool`, `char` and references to them. Implement it for
/// your own id types (a `Uuid` newtype, say) by writing the canonical text form of the value:
///
/// ```
/// use idem_runtime::KeyPart;
///
/// struct OrderId(u64);
///
/// impl KeyPart for OrderId {
///     fn write_key_part(&self, out: &mut String) {
///         self.0.write_key_part(out);
///     }
/// }
/// ```
///
/// The text must be stable across releases of your service: it is what the dedup record holds,
/// and a redelivery after a deploy must produce the same key.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of an idempotency key",
    label = "this key field has type `{Self}`",
    note = "implement `idem_runtime::KeyPart` for `{Self}` (write a stable text form of the value), or key on a field of type String, &str, an integer, bool or char"
)]
pub trait KeyPart {
    /// Appends the canonical text of this value to `out`.
    fn write_key_part(&self, out: &mut String);
}

impl KeyPart for str {
    fn write_key_part(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl KeyPart for String {
    fn write_key_part(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl KeyPart for Cow<'_, str> {
    fn write_key_part(&self, out: &mut String) {
        out.push_str(self);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn write_key_part(&self, out: &mut String) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn write_key_part(&self, out: &mut String) {
        (**self).write_key_part(out);
    }
}

macro_rules! key_part_via_display {
    ($($ty:ty),* $(,)?) => {$(
        impl KeyPart for $ty {
            fn write_key_part(&self, out: &mut String) {
                use std::fmt::Write as _;
                // Writing to a String cannot fail.
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

key_part_via_display!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool, char
);

/// The canonical 26-character Crockford base32 form, `01ARZ3NDEKTSV4RRFFQ69G5FAV` (feature
/// `ulid`).
#[cfg(feature = "ulid")]
impl KeyPart for ulid::Ulid {
    fn write_key_part(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{self}");
    }
}

/// The hyphenated lowercase form, `67e55044-10b1-426f-9247-bb680e5fe0c8` (feature `uuid`).
#[cfg(feature = "uuid")]
impl KeyPart for uuid::Uuid {
    fn write_key_part(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{}", self.hyphenated());
    }
}

/// Why a key could not be built from a message. Always permanent: the same message can never
/// produce a valid key, so it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key field was empty. An empty key would make every such message a duplicate of the first.
    #[error(
        "idempotency key field `{field}` is empty in scope `{scope}`; the message cannot be deduplicated, so it is dead-lettered (fix the producer, or key on a field that is always set)"
    )]
    EmptyPart {
        /// The handler's scope.
        scope: String,
        /// The message field that was empty.
        field: String,
    },
    /// A key field holds a NUL character, which PostgreSQL's text cannot store (and which no
    /// real identifier contains).
    #[error(
        "idempotency key field `{field}` in scope `{scope}` contains a NUL character, which the dedup store cannot hold; the message is dead-lettered (fix the producer)"
    )]
    Nul {
        /// The handler's scope.
        scope: String,
        /// The message field that held it.
        field: String,
    },
    /// The encoded key is longer than [`MAX_KEY_BYTES`].
    #[error(
        "idempotency key in scope `{scope}` is {len} bytes, more than the {max} allowed; key on a shorter field (an id, not a payload)"
    )]
    TooLong {
        /// The handler's scope.
        scope: String,
        /// The encoded length.
        len: usize,
        /// The limit, [`MAX_KEY_BYTES`].
        max: usize,
    },
    /// The handler keys on `$message_id` and the delivery carries no broker message id (no
    /// AMQP `message_id` property, no `Nats-Msg-Id` header), or was handed to the handler by
    /// an acknowledger that has none ([`NoAck`](crate::NoAck)).
    #[error(
        "the handler in scope `{scope}` keys on `$message_id`, but the delivery has no message id; it is dead-lettered (have the producer set one: the AMQP `message_id` property, the JetStream `Nats-Msg-Id` header, the Redis Streams field named by `StreamGroup::with_message_id_field`; or key on message fields)"
    )]
    MissingMessageId {
        /// The handler's scope.
        scope: String,
    },
    /// The scope is empty or longer than [`MAX_SCOPE_BYTES`].
    #[error(
        "idempotency scope `{scope}` must be 1 to {max} bytes long; set a shorter `scope = \"...\"` on the handler"
    )]
    BadScope {
        /// The offending scope.
        scope: String,
        /// The limit, [`MAX_SCOPE_BYTES`].
        max: usize,
    },
}

/// An idempotency key: the scope it belongs to and the encoded value of its parts.
///
/// ```
/// use idem_runtime::Key;
///
/// let key = Key::new("billing::on_order_paid", &[("user_id", &42_u64), ("op", &"refund:7")])?;
/// assert_eq!(key.scope(), "billing::on_order_paid");
/// assert_eq!(key.value(), r"42:refund\:7");
/// # Ok::<(), idem_runtime::KeyError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    scope: Cow<'static, str>,
    value: String,
}

impl Key {
    /// Builds a key from named parts, in order. Fails on an empty part, an empty or overlong
    /// scope, or an encoded value over [`MAX_KEY_BYTES`].
    pub fn new(
        scope: impl Into<Cow<'static, str>>,
        parts: &[(&str, &dyn KeyPart)],
    ) -> Result<Self, KeyError> {
        let scope = scope.into();
        if scope.is_empty() || scope.len() > MAX_SCOPE_BYTES {
            return Err(KeyError::BadScope {
                scope: scope.into_owned(),
                max: MAX_SCOPE_BYTES,
            });
        }
        let mut value = String::new();
        let mut part = String::new();
        for (index, (field, key_part)) in parts.iter().enumerate() {
            part.clear();
            key_part.write_key_part(&mut part);
            if part.is_empty() {
                return Err(KeyError::EmptyPart {
                    scope: scope.into_owned(),
                    field: (*field).to_owned(),
                });
            }
            if part.contains('\0') {
                return Err(KeyError::Nul {
                    scope: scope.into_owned(),
                    field: (*field).to_owned(),
                });
            }
            if index > 0 {
                value.push(SEPARATOR);
            }
            for c in part.chars() {
                if c == SEPARATOR || c == ESCAPE {
                    value.push(ESCAPE);
                }
                value.push(c);
            }
        }
        if value.is_empty() {
            // A key with no parts at all: the macro never emits this, but the API allows it.
            return Err(KeyError::EmptyPart {
                scope: scope.into_owned(),
                field: String::from("<none>"),
            });
        }
        if value.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong {
                scope: scope.into_owned(),
                len: value.len(),
                max: MAX_KEY_BYTES,
            });
        }
        Ok(Self { scope, value })
    }

    /// The namespace of this key (by default the handler's path).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The encoded parts: each part's text, `:`-separated, with `:` and `\` escaped by `\`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parts: &[(&str, &dyn KeyPart)]) -> Result<Key, KeyError> {
        Key::new("scope", parts)
    }

    #[test]
    fn single_part_is_its_text() {
        assert_eq!(key(&[("id", &"abc")]).unwrap().value(), "abc");
        assert_eq!(key(&[("id", &17_i32)]).unwrap().value(), "17");
        assert_eq!(key(&[("id", &String::from("x"))]).unwrap().value(), "x");
    }

    #[test]
    fn composite_encoding_is_injective() {
        let a = key(&[("a", &"x:y"), ("b", &"z")]).unwrap();
        let b = key(&[("a", &"x"), ("b", &"y:z")]).unwrap();
        assert_ne!(a.value(), b.value());
        let c = key(&[("a", &"x\\"), ("b", &"y")]).unwrap();
        let d = key(&[("a", &"x"), ("b", &"\\y")]).unwrap();
        assert_ne!(c.value(), d.value());
    }

    #[test]
    fn empty_part_is_an_error_naming_the_field() {
        let err = key(&[("user_id", &"u1"), ("op", &"")]).unwrap_err();
        assert_eq!(
            err,
            KeyError::EmptyPart {
                scope: "scope".into(),
                field: "op".into()
            }
        );
        assert!(err.to_string().contains("`op`"));
        assert!(key(&[]).is_err());
    }

    #[test]
    fn length_limits() {
        let long = "k".repeat(MAX_KEY_BYTES);
        assert!(key(&[("id", &long.as_str())]).is_ok());
        let too_long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            key(&[("id", &too_long.as_str())]),
            Err(KeyError::TooLong { len, .. }) if len == MAX_KEY_BYTES + 1
        ));
        assert!(matches!(
            Key::new("", &[("id", &1_u8)]),
            Err(KeyError::BadScope { .. })
        ));
        assert!(matches!(
            Key::new("s".repeat(MAX_SCOPE_BYTES + 1), &[("id", &1_u8)]),
            Err(KeyError::BadScope { .. })
        ));
    }

    #[test]
    fn nul_is_rejected_up_front() {
        let err = key(&[("id", &"a\0b")]).unwrap_err();
        assert!(
            matches!(&err, KeyError::Nul { field, .. } if field == "id"),
            "{err:?}"
        );
        assert!(err.to_string().contains("NUL"));
        // Other control characters and odd bytes are kept as they are.
        assert_eq!(
            key(&[("id", &"a\u{1}\u{7f}é'\"")]).unwrap().value(),
            "a\u{1}\u{7f}é'\""
        );
    }

    #[cfg(feature = "uuid")]
    #[test]
    fn uuid_keys_are_hyphenated_lowercase() {
        let id = uuid::Uuid::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8);
        assert_eq!(
            key(&[("id", &id)]).unwrap().value(),
            "67e55044-10b1-426f-9247-bb680e5fe0c8"
        );
    }

    #[cfg(feature = "ulid")]
    #[test]
    fn ulid_keys_are_canonical() {
        let id = ulid::Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        assert_eq!(
            key(&[("id", &id)]).unwrap().value(),
            "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        );
    }

    #[test]
    fn display_shows_scope_and_value() {
        assert_eq!(key(&[("id", &5_u8)]).unwrap().to_string(), "scope/5");
    }
}

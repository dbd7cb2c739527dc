//! What became of one delivery of a message.

/// The result of handling one delivery, when it succeeded.
///
/// Every variant means "the effects of this message are committed" (for a handler run in a
/// transaction you own, `in_transaction`: "are in your transaction, and committed when you
/// commit it"): the broker acknowledges any of them. Failures are [`Error`](crate::Error)s.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<T> {
    /// This delivery ran the handler's body and committed its effects.
    Processed(T),
    /// An earlier delivery already committed this message's effects; the body did not run.
    Duplicate {
        /// The first delivery's result, when the handler was declared with `replay` and the
        /// record still holds it; `None` otherwise.
        replayed: Option<T>,
    },
    /// `mode = "observe"`: the gate found that an earlier delivery committed this message, so
    /// an enforcing handler would have acked it without running the body; this one ran the body
    /// anyway and committed its effects. Logged (target `idem`, with the key and the first
    /// delivery's time) and counted ([`HandlerSpec::observed_duplicates`](crate::pipeline::HandlerSpec::observed_duplicates),
    /// [`observed_duplicates`](crate::observed_duplicates)).
    ObservedDuplicate {
        /// The body's result.
        value: T,
        /// When the first delivery's dedup record was written, Unix milliseconds, when the
        /// store keeps it.
        first_seen_ms: Option<i64>,
    },
}

impl<T> Outcome<T> {
    /// `true` when this delivery ran the body (also in observe mode, on a would-be duplicate).
    pub fn is_processed(&self) -> bool {
        matches!(self, Self::Processed(_) | Self::ObservedDuplicate { .. })
    }

    /// `true` when this delivery was recognised as a duplicate and its body did not run.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate { .. })
    }

    /// `true` when, in observe mode, the gate found an earlier delivery and the body ran anyway.
    pub fn is_observed_duplicate(&self) -> bool {
        matches!(self, Self::ObservedDuplicate { .. })
    }

    /// The handler's result: this delivery's, or the replayed first one. `None` for a duplicate
    /// without a replayed result.
    ///
    /// ```
    /// use idem_runtime::Outcome;
    ///
    /// assert_eq!(Outcome::Processed(7).into_value(), Some(7));
    /// assert_eq!(Outcome::<i32>::Duplicate { replayed: None }.into_value(), None);
    /// ```
    pub fn into_value(self) -> Option<T> {
        match self {
            Self::Processed(value) | Self::ObservedDuplicate { value, .. } => Some(value),
            Self::Duplicate { replayed } => replayed,
        }
    }

    /// The same outcome with the result mapped by `f`.
    pub fn map<U>(self, f: impl Fn(T) -> U) -> Outcome<U> {
        match self {
            Self::Processed(value) => Outcome::Processed(f(value)),
            Self::Duplicate { replayed } => Outcome::Duplicate {
                replayed: replayed.map(&f),
            },
            Self::ObservedDuplicate {
                value,
                first_seen_ms,
            } => Outcome::ObservedDuplicate {
                value: f(value),
                first_seen_ms,
            },
        }
    }

    /// A short name for logs and metrics: `"processed"`, `"duplicate"` or
    /// `"observed_duplicate"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Processed(_) => "processed",
            Self::Duplicate { .. } => "duplicate",
            Self::ObservedDuplicate { .. } => "observed_duplicate",
        }
    }
}

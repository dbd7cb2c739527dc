//! What became of one delivery of a message.

/// The result of handling one delivery, when it succeeded.
///
/// Both variants mean "the effects of this message are committed": the broker acknowledges
/// either. Failures are [`Error`](crate::Error)s.
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
}

impl<T> Outcome<T> {
    /// `true` when this delivery ran the body.
    pub fn is_processed(&self) -> bool {
        matches!(self, Self::Processed(_))
    }

    /// `true` when this delivery was recognised as a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate { .. })
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
            Self::Processed(value) => Some(value),
            Self::Duplicate { replayed } => replayed,
        }
    }

    /// A short name for logs and metrics: `"processed"` or `"duplicate"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Processed(_) => "processed",
            Self::Duplicate { .. } => "duplicate",
        }
    }
}

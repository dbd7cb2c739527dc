//! Types the trybuild cases share, so each case is only its scenario.

/// A message with a string key field.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderPaid {
    /// The key.
    pub order_id: String,
    /// An amount.
    pub amount: i64,
}

/// A handler error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A database error.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl idem_runtime::HandlerError for AppError {}

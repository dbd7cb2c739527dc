//! Idempotency strategies: how a duplicate is recognised. One file per strategy.
//!
//! A strategy says only what its gate does before the body ([`Strategy::enter`]), after it
//! ([`Strategy::leave`]), and which failures mean "an earlier delivery committed"
//! ([`Strategy::is_duplicate_failure`]). The order that makes the guarantee (key, begin, gate,
//! body, gate, commit, ack) belongs to the [pipeline](crate::pipeline), which calls these.
//!
//! The Redis strategies, [`lock`] and [`token`] (feature `redis`), gate without a transaction:
//! a [`LeaseStrategy`] says how long a delivery holds its key and what a failure puts back; the
//! lease pipeline ([`pipeline::lease`](crate::pipeline::lease)) runs them.

use std::error::Error as StdError;
use std::future::Future;

use crate::error::Error;
use crate::key::Key;
use crate::store::{Begun, Claim, NewRecord, Store, StoredRecord};

pub mod dedup_table;
#[cfg(feature = "redis")]
pub mod lock;
pub mod state_machine;
#[cfg(feature = "redis")]
pub mod token;
pub mod unique_constraint;

pub use dedup_table::DedupTable;
#[cfg(feature = "redis")]
pub use lock::Lock;
pub use state_machine::StateMachine;
#[cfg(feature = "redis")]
pub use token::Token;
pub use unique_constraint::UniqueConstraint;

pub(crate) mod sealed {
    /// Only this crate's strategies implement [`Strategy`](super::Strategy).
    #[allow(unreachable_pub)] // public in a private module: nameable by no one outside
    pub trait Sealed {}
}

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Gate {
    /// This delivery owns the message: go on.
    Open,
    /// An earlier delivery committed this message; its record, when one was read.
    Duplicate(Option<StoredRecord>),
    /// The delivery cannot proceed (`state_machine`: the entity is missing or in another state).
    Refused(Refusal),
}

/// Why a gate refused a delivery that is not a duplicate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The entity is in a state this step does not move from (`None`: NULL).
    InvalidTransition {
        /// Its state.
        current: Option<String>,
        /// The states the step moves from.
        expected: Vec<String>,
    },
    /// The entity is in a state before this step's `from`: its predecessor has not landed.
    TooEarly {
        /// Its state.
        current: String,
    },
    /// The entity's row does not exist.
    NotFound {
        /// Where it was looked for.
        table: String,
        /// Whether to retry (`on_missing = "retry"`) or dead-letter.
        retryable: bool,
    },
}

impl Refusal {
    pub(crate) fn into_error<E>(self, key: &Key) -> Error<E> {
        let (scope, key) = (key.scope().to_owned(), key.value().to_owned());
        match self {
            Self::InvalidTransition { current, expected } => Error::InvalidTransition {
                scope,
                key,
                current,
                expected,
            },
            Self::TooEarly { current } => Error::TooEarly {
                scope,
                key,
                current,
            },
            Self::NotFound { table, retryable } => Error::NotFound {
                scope,
                key,
                table,
                retryable,
            },
        }
    }
}

impl From<Claim> for Gate {
    /// A claimed record opens the gate; a live one means an earlier delivery committed.
    fn from(claim: Claim) -> Self {
        match claim {
            Claim::Claimed => Self::Open,
            Claim::Existing(record) => Self::Duplicate(Some(record)),
        }
    }
}

/// The per-delivery facts a gate works with.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The message's key.
    pub key: &'a Key,
    /// The payload's fingerprint, when the handler has `fingerprint`.
    pub fingerprint: Option<&'a str>,
    /// Now, Unix milliseconds, from the store's clock.
    pub now_ms: i64,
    /// When the record expires, Unix milliseconds; `None` = never.
    pub expires_at_ms: Option<i64>,
    /// Whether a duplicate must read the record (to compare fingerprints or replay a result).
    pub wants_record: bool,
}

impl<'a> Delivery<'a> {
    /// The dedup record this delivery writes.
    pub fn record(&self, response: Option<&'a str>) -> NewRecord<'a> {
        NewRecord {
            key: self.key,
            fingerprint: self.fingerprint,
            response,
            now_ms: self.now_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// How one strategy gates a delivery on a store. Sealed: the strategies are this crate's.
pub trait Strategy<S: Store>: sealed::Sealed + Send + Sync {
    /// The strategy's name in `strategy = "..."`, for logs.
    const NAME: &'static str;

    /// Runs in the transaction before the body.
    fn enter(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
    ) -> impl Future<Output = Result<Gate, sqlx::Error>> + Send;

    /// Opens the delivery's transaction and runs the gate before the body in it: what
    /// [`Store::begin`] then [`enter`](Self::enter) do, which is the default. `dedup_table`
    /// and `state_machine` ask the store to send the gate with the `BEGIN`
    /// ([`Store::begin_claim`], [`TransitionStore::begin_transition`](crate::store::TransitionStore::begin_transition)),
    /// one round trip on PostgreSQL with `with_gate_in_begin`. When the gate lets the delivery
    /// in, the transaction is open.
    fn open(
        &self,
        store: &S,
        delivery: &Delivery<'_>,
    ) -> impl Future<Output = Result<Begun<S::Tx, Gate>, sqlx::Error>> + Send {
        async move {
            let mut tx = store.begin().await?;
            let verdict = self.enter(store, &mut tx, delivery).await;
            Ok(Begun {
                tx: Some(tx),
                verdict,
            })
        }
    }

    /// Runs in the transaction before the body of a batch (`batch`), for every delivery of
    /// it, and returns one verdict per delivery, in order. Each key appears once (the runtime
    /// gates a key given twice once). The default runs [`enter`](Self::enter) for each;
    /// `dedup_table` claims every key in one call ([`Store::claim_batch`]).
    fn enter_batch(
        &self,
        store: &S,
        tx: &mut S::Tx,
        deliveries: &[Delivery<'_>],
    ) -> impl Future<Output = Result<Vec<Gate>, sqlx::Error>> + Send {
        async move {
            let mut gates = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                gates.push(self.enter(store, tx, delivery).await?);
            }
            Ok(gates)
        }
    }

    /// Runs in the transaction after the body succeeded, with its encoded result (`replay`).
    fn leave(
        &self,
        store: &S,
        tx: &mut S::Tx,
        delivery: &Delivery<'_>,
        response: Option<&str>,
    ) -> impl Future<Output = Result<Gate, sqlx::Error>> + Send;

    /// Whether [`leave`](Self::leave) writes for this delivery (the runtime then checks first
    /// that the transaction is still open, see [`Store::ensure_open`]).
    fn writes_after_body(&self, delivery: &Delivery<'_>, response: Option<&str>) -> bool;

    /// Whether a failure of the body or of the commit means "an earlier delivery committed".
    fn is_duplicate_failure(&self, store: &S, error: &(dyn StdError + 'static)) -> bool;
}

/// How a lease-based strategy (`lock`, `token`) holds its key while the body runs, and what a
/// failure leaves behind. Sealed: the strategies are this crate's.
#[cfg(feature = "redis")]
pub trait LeaseStrategy: sealed::Sealed + Send + Sync {
    /// The strategy's name in `strategy = "..."`, for logs.
    const NAME: &'static str;

    /// The rules the lease pipeline follows.
    fn rules(&self) -> LeaseRules;
}

/// What a [`LeaseStrategy`] asks of the lease pipeline: the lease's length, whether it is
/// renewed while the body runs, and whether a free key is a missing one (`lock`) or an issued
/// token (`token`).
#[cfg(feature = "redis")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRules {
    pub(crate) lease: std::time::Duration,
    pub(crate) renew: bool,
    pub(crate) mode: crate::store::redis::LeaseMode,
}

#[cfg(feature = "redis")]
impl LeaseRules {
    /// How long a claim holds the key before another delivery may take it over.
    pub const fn lease(&self) -> std::time::Duration {
        self.lease
    }

    /// Whether the lease is extended (every third of it) while the body runs.
    pub const fn renews(&self) -> bool {
        self.renew
    }
}

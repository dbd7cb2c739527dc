//! `strategy = "lock"` (分布式锁, on Redis): a fenced lease, then a done marker.
//!
//! Before the body, one round trip both tries the lease and reports what holds the key
//! ([`scripts::CLAIM`](crate::store::redis::scripts::CLAIM)): the lease is `lease` long (30 s by
//! default) and carries an owner token unique to this delivery.
//!
//! | the key holds | the delivery |
//! |---|---|
//! | nothing, or an expired lease or marker | claims it and runs the body |
//! | a done marker | is a **duplicate**: acked, the body does not run (with `replay`, the first result is returned) |
//! | another owner's live lease | is **in progress elsewhere** ([`Error::InProgress`](crate::Error::InProgress)): requeued with a delay, never acked; the redelivery finds the marker |
//!
//! After the body succeeded, one round trip replaces the lease by the done marker (kept for
//! `ttl`, forever without it; with `fingerprint` and `replay`, the payload's hash and the
//! result) **unless another delivery holds a live lease on the key**
//! ([`scripts::COMPLETE`](crate::store::redis::scripts::COMPLETE)): a body that outlived its
//! lease and lost it to a delivery still running writes nothing
//! ([`Error::LeaseLost`](crate::Error::LeaseLost), retryable, so the redelivery meets the other
//! delivery's marker or lease); one whose lease lapsed with no one taking it over still writes
//! its marker (its body did run); one that finds a marker already there is acked. After a
//! failure (an error or a panic in the body) the delivery deletes only its own lease, so that
//! the redelivery can run at once. A result that `replay` cannot serialize still gets its
//! marker (without the result), and the delivery is dead-lettered with the error.
//!
//! While the body runs, the lease is extended every third of its length, so a slow body keeps
//! it; `fixed_lease` turns that off (a body that outlives its lease then loses it).
//!
//! Redis does not share your database's transaction: this is one execution at a time while
//! the lease holds, and dedup after success, not atomicity with SQL writes. A process that dies after the body's
//! effects and before the marker leaves a lease that expires, and the redelivery runs the body
//! again. See [`store::redis`](crate::store::redis) for that and for what a Redis restart does.

use std::time::Duration;

use super::{LeaseRules, LeaseStrategy};
use crate::store::redis::LeaseMode;

/// The lock gate. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    lease: Duration,
    renew: bool,
}

impl Lock {
    /// The lease when the handler sets no `lease`: 30 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

    /// A lock whose lease lasts `lease_ms` milliseconds (at least 1), renewed while the body
    /// runs.
    pub const fn new(lease_ms: u64) -> Self {
        Self {
            lease: Duration::from_millis(if lease_ms == 0 { 1 } else { lease_ms }),
            renew: true,
        }
    }

    /// `fixed_lease`: the lease is not renewed while the body runs.
    #[must_use]
    pub const fn fixed(mut self) -> Self {
        self.renew = false;
        self
    }
}

impl Default for Lock {
    fn default() -> Self {
        Self {
            lease: Self::DEFAULT_LEASE,
            renew: true,
        }
    }
}

impl super::sealed::Sealed for Lock {}

impl LeaseStrategy for Lock {
    const NAME: &'static str = "lock";

    fn rules(&self) -> LeaseRules {
        LeaseRules {
            lease: self.lease,
            renew: self.renew,
            mode: LeaseMode::Lock,
        }
    }
}

//! `strategy = "token"` (Token 机制, on Redis): a single-use token, issued before the message
//! and consumed by it.
//!
//! [`RedisStore::issue_token`](crate::store::redis::RedisStore::issue_token) mints a token with
//! a lifetime; the client sends it with its request or message, in the field the handler's
//! `key` names. The handler consumes it in one round trip
//! ([`scripts::CLAIM`](crate::store::redis::scripts::CLAIM) in `token` mode), which both checks
//! and takes it: a `GET` then a `DEL` would be two calls, and two deliveries could both pass
//! the first.
//!
//! | the token is | the delivery |
//! |---|---|
//! | issued, unused | takes it and runs the body |
//! | used by a delivery that succeeded | is a **duplicate**: acked, the body does not run (with `replay`, the first result is returned) |
//! | being used by another delivery right now | is **in progress elsewhere** ([`Error::InProgress`](crate::Error::InProgress)): requeued with a delay, never acked |
//! | never issued, expired, or spent | [`Error::UnknownToken`](crate::Error::UnknownToken): permanent, dead-lettered |
//!
//! Taking the token is provisional until the body succeeds: the delivery holds it under a
//! lease of [`Token::LEASE`] (renewed while the body runs), so a consumer that dies mid-body does
//! not burn it: the lease expires and the redelivery takes the token again. On success the
//! token becomes a done marker (kept for `ttl`, forever without it). On a failure the token is
//! put back, unused, so that the retry can succeed; with `spend_on_error` a failure spends it
//! instead, and the retry is dead-lettered as [`Error::UnknownToken`](crate::Error::UnknownToken)
//! (the failed attempt's own error is in its log line and its requeue, not in that dead letter).
//! A token expires at its `ttl` even while a delivery holds it: a takeover after that finds it
//! unknown. Without the handler's `ttl`, used tokens are kept forever: set one (longer than
//! your broker's redelivery horizon). The token is the key, so it appears in logs (the span's
//! `key`) and in error messages: treat it as an idempotency key, not as a secret.
//!
//! The same caveats as [`lock`](super::lock) apply: Redis does not share your database's
//! transaction.

use std::time::Duration;

use super::{LeaseRules, LeaseStrategy};
use crate::store::redis::LeaseMode;

/// The token gate. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    restore: bool,
}

impl Token {
    /// How long a delivery holds a token it is using before another may take it over: 30 s,
    /// renewed while the body runs.
    pub const LEASE: Duration = Duration::from_secs(30);

    /// A token gate that puts the token back after a failure.
    pub const fn new() -> Self {
        Self { restore: true }
    }

    /// `spend_on_error`: a failure spends the token instead of putting it back.
    #[must_use]
    pub const fn spending_on_error(mut self) -> Self {
        self.restore = false;
        self
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

impl super::sealed::Sealed for Token {}

impl LeaseStrategy for Token {
    const NAME: &'static str = "token";

    fn rules(&self) -> LeaseRules {
        LeaseRules {
            lease: Self::LEASE,
            renew: true,
            mode: LeaseMode::Token {
                restore: self.restore,
            },
        }
    }
}

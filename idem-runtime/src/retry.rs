//! How long a failed delivery waits before it runs again, and when it stops trying.
//!
//! A retryable failure is requeued with a delay that doubles with each attempt, from
//! [`RetryPolicy::base_delay`] up to [`RetryPolicy::max_delay`], with jitter so that a burst of
//! failures does not come back as a burst. After [`RetryPolicy::max_attempts`] deliveries the
//! message is dead-lettered with its last error and the attempt count: a failure that never
//! heals ends, it does not loop.
//!
//! The attempt number is the broker's ([`Acknowledger::attempt`](crate::Acknowledger::attempt));
//! a broker that does not count makes every delivery the first, so only the broker's own
//! redelivery limit ends its retries.

use std::time::Duration;

/// Retry limits and backoff for one handler (`max_attempts` on `#[idempotent]`).
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::RetryPolicy;
///
/// let policy = RetryPolicy::DEFAULT;
/// assert_eq!(policy.max_attempts(), 10);
/// // The n-th retry waits between half of and the full `base · 2^(n-1)`, capped.
/// let third = policy.delay(3, 0.0);
/// assert_eq!(third, Duration::from_secs(2));
/// assert_eq!(policy.delay(3, 1.0), Duration::from_secs(4));
/// assert_eq!(policy.delay(40, 1.0), policy.max_delay());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
}

impl RetryPolicy {
    /// Ten attempts; delays from 1 s, doubling, capped at 5 minutes (about 7 minutes in all
    /// before a message that always fails is dead-lettered).
    pub const DEFAULT: Self = Self {
        max_attempts: 10,
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(300),
    };

    /// The default backoff with `max_attempts` deliveries at most (at least 1).
    pub const fn with_max_attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: if max_attempts == 0 { 1 } else { max_attempts },
            ..Self::DEFAULT
        }
    }

    /// The same limit with delays from `base` up to `max`.
    pub const fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max;
        self
    }

    /// How many deliveries a message gets before a retryable failure dead-letters it.
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before the first retry.
    pub const fn base_delay(&self) -> Duration {
        self.base_delay
    }

    /// The longest delay.
    pub const fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Whether delivery number `attempt` (1 for the first) was the last one allowed.
    pub const fn is_exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// This policy with at most `limit` attempts, when the broker allows fewer deliveries than
    /// the policy (see [`Acknowledger::delivery_limit`](crate::Acknowledger::delivery_limit)).
    ///
    /// ```
    /// use idem_runtime::RetryPolicy;
    ///
    /// assert_eq!(RetryPolicy::DEFAULT.capped_at(Some(3)).max_attempts(), 3);
    /// assert_eq!(RetryPolicy::DEFAULT.capped_at(Some(50)).max_attempts(), 10);
    /// assert_eq!(RetryPolicy::DEFAULT.capped_at(None).max_attempts(), 10);
    /// ```
    #[must_use]
    pub const fn capped_at(mut self, limit: Option<u32>) -> Self {
        if let Some(limit) = limit
            && limit < self.max_attempts
        {
            self.max_attempts = if limit == 0 { 1 } else { limit };
        }
        self
    }

    /// The delay after delivery number `attempt` failed: `base · 2^(attempt-1)`, capped at
    /// [`max_delay`](Self::max_delay), scaled into its upper half by `jitter` in `[0, 1]`
    /// ("equal jitter": never shorter than half, so delays still grow).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let full = self
            .base_delay
            .saturating_mul(1_u32 << doublings)
            .min(self.max_delay);
        let jitter = if jitter.is_nan() {
            0.5
        } else {
            jitter.clamp(0.0, 1.0)
        };
        full.div_f64(2.0) + full.div_f64(2.0).mul_f64(jitter)
    }

    /// [`delay`](Self::delay) with random jitter.
    pub fn jittered_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap() {
        let policy = RetryPolicy::DEFAULT;
        let full: Vec<u64> = (1..=11).map(|a| policy.delay(a, 1.0).as_secs()).collect();
        assert_eq!(full, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(policy.delay(u32::MAX, 1.0), Duration::from_secs(300));
        assert_eq!(policy.delay(1, f64::NAN), Duration::from_millis(750));
        for _ in 0..100 {
            let jittered = policy.jittered_delay(4);
            assert!(jittered >= Duration::from_secs(4) && jittered <= Duration::from_secs(8));
        }
    }

    #[test]
    fn attempts_end() {
        let policy = RetryPolicy::with_max_attempts(3);
        assert!(!policy.is_exhausted(1));
        assert!(!policy.is_exhausted(2));
        assert!(policy.is_exhausted(3));
        assert_eq!(RetryPolicy::with_max_attempts(0).max_attempts(), 1);
    }
}

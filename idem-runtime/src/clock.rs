//! The clock every record's time comes from: creation, expiry, and purging.
//!
//! Stores read the time through their [`Clock`] ([`SystemClock`] unless told otherwise), so a
//! test can move time forward with a [`ManualClock`] instead of sleeping through a `ttl`; and
//! what the runtime waits for on its own (a Redis lease's renewal) waits on the same clock.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// A future a [`Clock`] returns from [`sleep`](Clock::sleep).
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of "now", in Unix milliseconds, and of waiting for it to move.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Waits until `duration` has passed on this clock. The default waits in real time
    /// (`tokio::time::sleep`); a [`ManualClock`] wakes when it is advanced past the deadline.
    fn sleep(&self, duration: Duration) -> Sleep<'_> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The system's wall clock: what every store uses by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to, for tests of expiry. Clones share the time.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::starting_now();
/// let start = clock.now_ms();
/// clock.advance(Duration::from_secs(3600));
/// assert_eq!(clock.now_ms(), start + 3_600_000);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicI64>,
    advanced: Arc<Notify>,
}

impl ManualClock {
    /// A clock stopped at `now_ms`.
    pub fn at(now_ms: i64) -> Self {
        Self {
            now_ms: Arc::new(AtomicI64::new(now_ms)),
            advanced: Arc::new(Notify::new()),
        }
    }

    /// A clock stopped at the system's current time.
    pub fn starting_now() -> Self {
        Self::at(SystemClock.now_ms())
    }

    /// Moves the clock forward by `by`, waking the [`sleep`](Clock::sleep)s it ends.
    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(millis(by), Ordering::SeqCst);
        self.advanced.notify_waiters();
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    /// Never in real time: only [`advance`](Self::advance) past the deadline ends it.
    fn sleep(&self, duration: Duration) -> Sleep<'_> {
        let deadline = self.now_ms().saturating_add(millis(duration));
        Box::pin(async move {
            loop {
                // Registered before the check, so that an advance between the two still wakes.
                let advanced = self.advanced.notified();
                let mut advanced = std::pin::pin!(advanced);
                advanced.as_mut().enable();
                if self.now_ms() >= deadline {
                    return;
                }
                advanced.await;
            }
        })
    }
}

/// The clock a store holds: shared, and [`SystemClock`] by default.
pub(crate) type SharedClock = Arc<dyn Clock>;

pub(crate) fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_ends_when_the_clock_passes_its_deadline() {
        let clock = ManualClock::at(0);
        let mut sleep = clock.sleep(Duration::from_secs(10));
        // Not yet: polled once, it stays pending.
        assert!((&mut sleep).now_or_never().is_none());
        clock.advance(Duration::from_secs(9));
        assert!((&mut sleep).now_or_never().is_none());
        clock.advance(Duration::from_secs(1));
        sleep.await;
        // A sleep whose deadline has passed already ends at once.
        clock.sleep(Duration::ZERO).await;
    }
}

//! The clock every record's time comes from: creation, expiry, and purging.
//!
//! Stores read the time through their [`Clock`] ([`SystemClock`] unless told otherwise), so a
//! test can move time forward with a [`ManualClock`] instead of sleeping through a `ttl`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of "now", in Unix milliseconds.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
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
}

impl ManualClock {
    /// A clock stopped at `now_ms`.
    pub fn at(now_ms: i64) -> Self {
        Self {
            now_ms: Arc::new(AtomicI64::new(now_ms)),
        }
    }

    /// A clock stopped at the system's current time.
    pub fn starting_now() -> Self {
        Self::at(SystemClock.now_ms())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now_ms.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// The clock a store holds: shared, and [`SystemClock`] by default.
pub(crate) type SharedClock = Arc<dyn Clock>;

pub(crate) fn system() -> SharedClock {
    Arc::new(SystemClock)
}

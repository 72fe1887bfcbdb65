//! Per-caller request rate limits (governor, keyed by resolved identity, not by address), so one
//! noisy app never starves the others.
//!
//! The state is bounded ([`crate::bounded::BoundedRateStore`]): at most
//! [`MAX_TRACKED_CALLERS`] callers, the least limited dropped first when a flood of distinct
//! callers fills it, and every [`SWEEP_EVERY`] the callers whose bucket is full again (as if
//! never seen) are forgotten.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::{Quota, RateLimiter};

use crate::bounded::BoundedRateStore;
use crate::config::Limits;

/// Callers whose rate state is kept at most (a few dozen bytes each).
pub const MAX_TRACKED_CALLERS: usize = 10_000;
/// How often callers back at full burst are forgotten (on the next request after it).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A `Retry-After` value: whole seconds, rounded up, so a client that waits this long is
/// admitted; at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// A caller's token binding: shared with its connection, so checking costs no allocation.
type CallerKey = Arc<str>;

pub struct CallerLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<CallerKey, BoundedRateStore<CallerKey>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    start: C::Instant,
    /// When the next sweep is due, in nanoseconds from `start`.
    next_sweep: AtomicU64,
}

impl CallerLimiter<DefaultClock> {
    /// The limiter for `[limits]` (a zero rate or burst counts as 1).
    pub fn from_limits(limits: &Limits) -> Self {
        Self::with_clock(
            NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN),
            NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN),
            DefaultClock::default(),
        )
    }
}

impl<C: Clock + Clone> CallerLimiter<C> {
    pub fn with_clock(per_second: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        Self::with_capacity(per_second, burst, clock, MAX_TRACKED_CALLERS)
    }

    fn with_capacity(per_second: NonZeroU32, burst: NonZeroU32, clock: C, capacity: usize) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let size = metrics::gauge!(crate::metrics::CALLER_STATE, "map" => "rate_limiter");
        let store = BoundedRateStore::new(capacity, Some(size));
        Self {
            limiter: RateLimiter::new(quota, store, clock.clone()),
            start: clock.now(),
            clock,
            next_sweep: AtomicU64::new(SWEEP_EVERY.as_nanos() as u64),
        }
    }

    /// Callers whose state is kept now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    /// Admits one request from `caller`, or says how long until it would be admitted.
    pub fn check(&self, caller: &CallerKey) -> Result<(), Duration> {
        self.sweep_when_due();
        self.limiter
            .check_key(caller)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the callers whose bucket is full again, once per [`SWEEP_EVERY`]: one request
    /// sweeps, the others go on.
    fn sweep_when_due(&self) {
        let now = self.clock.now().duration_since(self.start).as_u64();
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + SWEEP_EVERY.as_nanos() as u64;
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn burst_then_refill_per_caller() {
        let clock = FakeRelativeClock::default();
        let limiter = CallerLimiter::with_clock(nz(10), nz(3), clock.clone());
        for _ in 0..3 {
            assert!(limiter.check(&"uid=1".into()).is_ok());
        }
        let wait = limiter.check(&"uid=1".into()).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another caller is unaffected by the first one's burst.
        assert!(limiter.check(&"uid=2".into()).is_ok());
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check(&"uid=1".into()).is_ok());
        assert!(limiter.check(&"uid=1".into()).is_err());
    }

    #[test]
    fn ten_thousand_callers_stay_under_the_cap_and_the_limited_one_stays_limited() {
        let clock = FakeRelativeClock::default();
        let limiter = CallerLimiter::with_capacity(nz(20), nz(100), clock.clone(), 1000);
        let noisy: CallerKey = "uid=7".into();
        while limiter.check(&noisy).is_ok() {}
        let live: CallerKey = "uid=8".into();
        for n in 0..10_000 {
            limiter
                .check(&format!("uid={}", 100_000 + n).into())
                .unwrap();
            assert!(limiter.tracked() <= 1000);
            if n % 200 == 0 {
                // A caller within its rate is always admitted.
                limiter.check(&live).unwrap();
            }
        }
        assert!(limiter.check(&noisy).is_err(), "the flood reset its limit");
    }

    #[test]
    fn idle_callers_are_forgotten_after_the_sweep_period() {
        let clock = FakeRelativeClock::default();
        let limiter = CallerLimiter::with_clock(nz(20), nz(100), clock.clone());
        for n in 0..5000 {
            limiter.check(&format!("uid={n}").into()).unwrap();
        }
        assert_eq!(limiter.tracked(), 5000);
        // Not yet due: nothing is swept.
        clock.advance(SWEEP_EVERY / 2);
        limiter.check(&"uid=1".into()).unwrap();
        assert_eq!(limiter.tracked(), 5000);
        clock.advance(SWEEP_EVERY);
        let live: CallerKey = "uid=live".into();
        limiter.check(&live).unwrap();
        assert_eq!(limiter.tracked(), 1, "only the caller active now is kept");
    }
}

//! Per-caller request rate limits (governor, keyed by resolved identity, not by address), so one
//! noisy app never starves the others.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Limits;

/// Beyond this many tracked callers, the state of those back at full burst is dropped.
const MAX_TRACKED_CALLERS: usize = 10_000;

/// A `Retry-After` value: whole seconds, rounded up, so a client that waits this long is
/// admitted; at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// A caller's token binding: shared with its connection, so checking costs no allocation.
type CallerKey = Arc<str>;

pub struct CallerLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<CallerKey, HashMapStateStore<CallerKey>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
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
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::new(quota, HashMapStateStore::default(), clock.clone()),
            clock,
        }
    }

    /// Admits one request from `caller`, or says how long until it would be admitted.
    pub fn check(&self, caller: &CallerKey) -> Result<(), Duration> {
        if self.limiter.len() > MAX_TRACKED_CALLERS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(caller)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
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
}

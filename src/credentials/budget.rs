//! The global AssumeRole budget: every STS call, cold fetch, refresh or retry, takes a cell from
//! one GCRA limiter (governor), so a burst of apps cannot exceed `sts.max_calls_per_second`
//! (with `sts.burst` above it). Generic over its clock: the daemon runs it on tokio's clock (so
//! paused-clock tests drive it), the fleet simulation on a virtual one.

use std::num::NonZeroU32;
use std::ops::Add;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock as GovernorClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

type Limiter<C> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as GovernorClock>::Instant>>;

/// The shared STS call budget.
pub struct StsBudget<C: GovernorClock = TokioTime> {
    clock: C,
    limiter: ArcSwap<Limiter<C>>,
}

impl<C: GovernorClock + Clone> StsBudget<C> {
    /// `calls_per_second` sustained, `burst` at once; zeros are treated as 1.
    pub fn new(calls_per_second: u32, burst: u32, clock: C) -> Self {
        let limiter = limiter(calls_per_second, burst, clock.clone());
        Self {
            clock,
            limiter: ArcSwap::from_pointee(limiter),
        }
    }

    /// Applies a new rate (after a config reload). The new budget starts full.
    pub fn reconfigure(&self, calls_per_second: u32, burst: u32) {
        self.limiter
            .store(limiter(calls_per_second, burst, self.clock.clone()).into());
    }

    /// Takes one call from the budget now, or says how long until one is free (taking nothing).
    pub fn try_acquire(&self) -> Result<(), Duration> {
        self.limiter
            .load()
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

impl StsBudget<TokioTime> {
    /// Waits until the budget allows one more call, and takes it.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_acquire() {
            tokio::time::sleep(wait).await;
        }
    }
}

fn limiter<C: GovernorClock>(calls_per_second: u32, burst: u32, clock: C) -> Limiter<C> {
    let rate = NonZeroU32::new(calls_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct_with_clock(Quota::per_second(rate).allow_burst(burst), clock)
}

/// A governor clock reading `tokio::time::Instant`, which follows `tokio::time::pause()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTime;

/// A reading of [`TokioTime`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl GovernorClock for TokioTime {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

impl Add<Nanos> for TokioInstant {
    type Output = Self;

    fn add(self, other: Nanos) -> Self {
        Self(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        Self(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn burst_then_the_sustained_rate() {
        let clock = FakeRelativeClock::default();
        let budget = StsBudget::new(10, 50, clock.clone());
        for _ in 0..50 {
            assert!(budget.try_acquire().is_ok());
        }
        let wait = budget.try_acquire().unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        clock.advance(wait);
        assert!(budget.try_acquire().is_ok());
        assert!(budget.try_acquire().is_err());
    }

    #[test]
    fn reconfigure_applies_the_new_rate() {
        let clock = FakeRelativeClock::default();
        let budget = StsBudget::new(1, 1, clock.clone());
        assert!(budget.try_acquire().is_ok());
        assert_eq!(budget.try_acquire().unwrap_err(), Duration::from_secs(1));
        budget.reconfigure(100, 2);
        assert!(budget.try_acquire().is_ok());
        assert!(budget.try_acquire().is_ok());
        assert_eq!(budget.try_acquire().unwrap_err(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_on_the_tokio_clock() {
        let budget = StsBudget::new(10, 1, TokioTime);
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            budget.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}

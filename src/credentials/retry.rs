//! How long to wait before calling STS again after a transient failure (throttling, 5xx,
//! timeout): exponential backoff with jitter, so a fleet hit by the same outage does not retry in
//! lockstep, yet each app's delays keep growing.

use std::time::Duration;

use rand::Rng;

/// The delay after the first failure.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Delays stop growing here (`RETRY_BASE * 2^6`): while STS is down, each entry calls it about
/// once a minute, and recovers at most this long after STS does.
pub const RETRY_CAP: Duration = Duration::from_secs(64);
/// Each delay is drawn from `[(1 - RETRY_JITTER) * d, d]` where `d = min(cap, base * 2^(n-1))`.
/// With 0.5 ("equal jitter") successive delays never shrink until the cap: the lower bound of one
/// is the upper bound of the previous.
pub const RETRY_JITTER: f64 = 0.5;

/// The delay after the `failures`-th consecutive failure (1-based).
pub fn backoff<R: Rng + ?Sized>(failures: u32, rng: &mut R) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let ceiling = RETRY_BASE
        .checked_mul(1u32 << doublings)
        .unwrap_or(RETRY_CAP)
        .min(RETRY_CAP);
    ceiling.mul_f64(1.0 - RETRY_JITTER * rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_stop_at_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let mut previous = Duration::ZERO;
            for n in 1..=20 {
                let d = backoff(n, &mut rng);
                let ceiling = (RETRY_BASE * 2u32.pow((n - 1).min(10))).min(RETRY_CAP);
                assert!(d <= ceiling && d >= ceiling.mul_f64(1.0 - RETRY_JITTER));
                assert!(d >= previous.min(RETRY_CAP.mul_f64(1.0 - RETRY_JITTER)));
                previous = d;
            }
        }
        assert!(backoff(u32::MAX, &mut rng) <= RETRY_CAP);
    }
}

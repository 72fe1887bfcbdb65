//! When a refresh starts: a random point before `min_remaining` is reached, drawn so that many
//! apps on many hosts never call STS together, not even after they all started at once.
//!
//! Let `latest = expiration - min_remaining - REFRESH_MARGIN` (the credentials stop being served
//! `REFRESH_MARGIN` later) and `earliest = max(obtained, latest - refresh_window)`.
//!
//! - [`Phase::Renewal`] (credentials from an on-time scheduled refresh): uniform in
//!   `[earliest, latest]`. Successive refreshes of one app are then a renewal process whose
//!   intervals are uniform in `[a, b]` (`a = earliest - obtained`, `b = latest - obtained`).
//! - [`Phase::Spread`] (credentials from a cold fetch, a start-up prefetch, or the first success
//!   after an STS outage: moments that many apps and hosts may share): drawn from that renewal
//!   process's *equilibrium* first-interval distribution, density `P(interval > x) / mean` on
//!   `[0, b]`. A fleet whose first refreshes follow it is already in the steady state: its
//!   aggregate STS rate is flat from the start instead of repeating the start-up spike once per
//!   refresh cycle. It costs at most one early refresh per app after a cold fetch.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::CredentialPolicy;

/// The refresh window ends this long before `min_remaining` is reached, so a refresh that starts
/// at the very end of it (plus a quick retry) still lands before any caller would have to wait.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Where the credentials being scheduled came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// An on-time scheduled refresh: this app is already out of step with the others.
    Renewal,
    /// A fetch at a moment other apps and hosts may share (cold, prefetch, recovery).
    Spread,
}

impl Phase {
    /// The phase of credentials from a fetch that was cold (nothing cached before) or needed
    /// `failed_attempts` retries: either way a moment other apps and hosts may share.
    pub fn of_fetch(cold: bool, failed_attempts: u32) -> Phase {
        if cold || failed_attempts > 0 {
            Phase::Spread
        } else {
            Phase::Renewal
        }
    }
}

/// The instant at which a background refresh of credentials obtained at `obtained` and expiring
/// at `expiration` starts. Always within `[obtained, expiration - min_remaining - REFRESH_MARGIN]`
/// (or `obtained`, for credentials with less servable time than that).
pub fn refresh_at<R: Rng + ?Sized>(
    obtained: SystemTime,
    expiration: SystemTime,
    policy: &CredentialPolicy,
    phase: Phase,
    rng: &mut R,
) -> SystemTime {
    let servable = expiration
        .checked_sub(policy.min_remaining + REFRESH_MARGIN)
        .and_then(|latest| latest.duration_since(obtained).ok())
        .unwrap_or(Duration::ZERO);
    // Offsets from `obtained`: the window is [a, b].
    let b = servable.as_secs_f64();
    let a = servable.saturating_sub(policy.refresh_window).as_secs_f64();
    let offset = match phase {
        Phase::Renewal => a + rng.random::<f64>() * (b - a),
        Phase::Spread => {
            // A length-biased interval (density proportional to x on [a, b]) times an
            // independent uniform has the equilibrium distribution.
            let length = (a * a + rng.random::<f64>() * (b * b - a * a)).sqrt();
            rng.random::<f64>() * length
        }
    };
    obtained + Duration::from_secs_f64(offset.clamp(0.0, b))
}

/// With a start-up spread, one prefetch app of the host (chosen at random) has its first fetch
/// within this long of the start: the daemon's first AssumeRole proves its source works, and
/// readiness waits for that proof (see `admin::readyz`), not for the whole window. A fleet's
/// proofs spread over this span too (10,000 hosts: about 330 calls a second).
pub const PROOF_WINDOW: Duration = Duration::from_secs(30);

/// When, from now, the first fetch of each of `n` prefetch apps starts, spread over `window`
/// after a start or a reload (a fleet restarted or reconfigured at once would otherwise call STS
/// in the same second): uniform in `[0, window)`, except that with `prove` one app drawn at
/// random starts within [`PROOF_WINDOW`] (or the window, if shorter). An empty `window` means
/// every app at once.
pub fn prefetch_delays<R: Rng + ?Sized>(
    n: usize,
    window: Duration,
    prove: bool,
    rng: &mut R,
) -> Vec<Duration> {
    if window.is_zero() {
        return vec![Duration::ZERO; n];
    }
    let mut delays: Vec<Duration> = (0..n)
        .map(|_| window.mul_f64(rng.random::<f64>()))
        .collect();
    if prove && n > 0 {
        let first = rng.random_range(0..n);
        delays[first] = window.min(PROOF_WINDOW).mul_f64(rng.random::<f64>());
    }
    delays
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MIN: Duration = Duration::from_secs(60);

    fn policy() -> CredentialPolicy {
        CredentialPolicy {
            min_remaining: 30 * MIN,
            refresh_window: 10 * MIN,
            idle_after: 60 * MIN,
            ..CredentialPolicy::default()
        }
    }

    #[test]
    fn renewal_falls_in_the_window_before_min_remaining() {
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let exp = t0 + 60 * MIN;
        let (mut lo, mut hi) = (exp, t0);
        for _ in 0..10_000 {
            let at = refresh_at(t0, exp, &policy(), Phase::Renewal, &mut rng);
            assert!(at >= t0 + 19 * MIN && at <= t0 + 29 * MIN, "{at:?}");
            lo = lo.min(at);
            hi = hi.max(at);
        }
        // The jitter really uses the whole window.
        assert!(lo < t0 + 20 * MIN && hi > t0 + 28 * MIN);
    }

    #[test]
    fn spread_covers_the_whole_servable_span_with_the_equilibrium_density() {
        let mut rng = StdRng::seed_from_u64(2);
        let t0 = SystemTime::UNIX_EPOCH;
        // 61 min session: servable span 30 min after the margin.
        let exp = t0 + 61 * MIN;
        let mut per_5min = [0u32; 6];
        let n = 60_000;
        for _ in 0..n {
            let at = refresh_at(t0, exp, &policy(), Phase::Spread, &mut rng);
            let off = at.duration_since(t0).unwrap();
            assert!(off <= 30 * MIN);
            per_5min[(off.as_secs() / 300).min(5) as usize] += 1;
        }
        // Intervals U(20m, 30m), mean 25m: flat density 1/25 per minute up to 20m (so 1/5 of
        // the draws per 5 minutes), then linearly down to zero at 30m (3/20 and 1/20).
        let expect = [0.2, 0.2, 0.2, 0.2, 0.15, 0.05];
        for (got, want) in per_5min.iter().zip(expect) {
            let got = f64::from(*got) / f64::from(n);
            assert!((got - want).abs() < 0.01, "{per_5min:?}");
        }
    }

    #[test]
    fn credentials_with_no_servable_time_are_due_at_once() {
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for phase in [Phase::Renewal, Phase::Spread] {
            assert_eq!(
                refresh_at(t0, t0 + 10 * MIN, &policy(), phase, &mut rng),
                t0
            );
        }
    }

    #[test]
    fn short_servable_spans_clip_the_window_to_the_fetch() {
        let mut rng = StdRng::seed_from_u64(4);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // 36 min session: 5 min servable, shorter than the 10 min window.
        for _ in 0..1000 {
            let at = refresh_at(t0, t0 + 36 * MIN, &policy(), Phase::Renewal, &mut rng);
            assert!(at >= t0 && at <= t0 + 5 * MIN);
        }
    }

    #[test]
    fn prefetch_delays_fill_the_window_and_one_proves_the_source_early() {
        let mut rng = StdRng::seed_from_u64(5);
        let window = 5 * MIN;
        let mut per_minute = [0u32; 5];
        let mut earliest = Vec::new();
        for _ in 0..2000 {
            let delays = prefetch_delays(50, window, true, &mut rng);
            assert_eq!(delays.len(), 50);
            assert!(delays.iter().all(|d| *d < window));
            earliest.push(*delays.iter().min().unwrap());
            for d in delays {
                per_minute[(d.as_secs() / 60) as usize] += 1;
            }
        }
        assert!(
            earliest.iter().all(|d| *d < PROOF_WINDOW),
            "one app proves early"
        );
        // Uniform over the window (the proving app's draw barely shows: 1 in 50).
        for count in per_minute {
            let share = f64::from(count) / 100_000.0;
            assert!((share - 0.2).abs() < 0.02, "{per_minute:?}");
        }
        // Without the proof, the earliest of 2 draws is often past PROOF_WINDOW.
        let late = (0..1000)
            .filter(|_| {
                prefetch_delays(2, window, false, &mut rng)
                    .iter()
                    .min()
                    .unwrap()
                    >= &PROOF_WINDOW
            })
            .count();
        assert!(late > 500, "{late}");
        assert_eq!(
            prefetch_delays(3, Duration::ZERO, true, &mut rng),
            [Duration::ZERO; 3]
        );
    }
}

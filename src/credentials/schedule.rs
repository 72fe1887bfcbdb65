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
}

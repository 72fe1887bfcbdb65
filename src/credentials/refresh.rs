//! The background refresher: one task that sleeps until the next scheduled refresh (or until a
//! worker reports a change), starts every refresh that is due for an entry still in use, and
//! drops idle entries once they can serve nothing.
//!
//! Refresh times are wall-clock instants, since they follow the STS `Expiration`, an instant on
//! the wall clock STS and the SDKs share with this host. The nap between passes is on the
//! monotonic clock and never longer than [`MAX_NAP`], so when the wall clock is stepped
//! forward, the credentials that step brought near their expiry are refreshed within
//! `MAX_NAP` (one call per entry: each has one worker), and after a backward step nothing is
//! due early. Idleness is real time (the boot clock), so a step does not make apps in use
//! look idle. Each pass also compares how far the two clocks moved, to report a step.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::cache::Inner;
use crate::time::{Moment, StepWatch};

/// The refresher re-reads the wall clock at least this often, so a suspended host or a stepped
/// clock delays a refresh by at most this much.
pub const MAX_NAP: Duration = Duration::from_secs(10);
/// ...and at most this often, whatever the schedule says: refreshes start up to this late, well
/// within the schedule's `REFRESH_MARGIN`.
pub const MIN_NAP: Duration = Duration::from_secs(1);

pub(super) async fn run(cache: Arc<Inner>) {
    tracing::debug!("credential refresher started");
    let mut steps = StepWatch::new();
    loop {
        let now = cache.clock.now();
        let boot = cache.clock.boot_time();
        if let Some(step) = steps.observe(Moment { wall: now, boot }) {
            crate::metrics::clock_stepped();
            tracing::warn!(
                step_secs = format!("{step:+.0}"),
                "the wall clock was stepped; refresh times follow it, token lifetimes do not"
            );
        }
        let next = tick(&cache, now);
        let nap = next
            .map(|at| at.duration_since(now).unwrap_or_default())
            .unwrap_or(MAX_NAP)
            .clamp(MIN_NAP, MAX_NAP);
        tokio::select! {
            biased;
            _ = cache.stop.cancelled() => break,
            _ = cache.wake.notified() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
    tracing::debug!("credential refresher stopped");
}

/// One pass over the entries at `now`; returns when the next one needs attention.
fn tick(cache: &Arc<Inner>, now: SystemTime) -> Option<SystemTime> {
    let policy = cache.policy();
    let mut next: Option<SystemTime> = None;
    let mut soonest = |at: SystemTime| next = Some(next.map_or(at, |n| n.min(at)));
    let boot = cache.clock.boot_time();
    for (input, entry) in cache.snapshot() {
        let view = entry.view(boot, &policy);
        if view.worker {
            // The worker wakes us when it is done.
            continue;
        }
        if view.active {
            match view.refresh_due_at {
                Some(at) if at <= now && !view.held => cache.refresh_if_due(&input, &entry),
                Some(at) if at > now => soonest(at),
                _ => {}
            }
            // Re-examine it when it turns idle.
            if let Some(idle_in) = view.idle_in {
                soonest(now + idle_in);
            }
        } else {
            match view.servable_until {
                Some(until) if until > now => soonest(until),
                _ => {
                    if cache.evict_if_dead(&input, &entry) {
                        tracing::debug!(role = %input.role_arn, session = %input.session_name, "idle entry dropped");
                    }
                }
            }
        }
    }
    next
}

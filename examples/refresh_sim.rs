//! Fleet refresh simulation: N hosts x M apps, every daemon (re)started at the same moment with
//! every app cold, run on a virtual clock for two session lifetimes. It drives the daemon's own
//! scheduling code, not a copy: `credentials::refresh_at` picks each refresh instant (with
//! `Phase::of_fetch`, as the cache's worker does) and each host's AssumeRole calls go through its
//! own `StsBudget` (governor) on a virtual clock. No network, no tokio.
//!
//! ```sh
//! cargo run --release --example refresh_sim                  # 10,000 hosts x 50 apps
//! cargo run --release --example refresh_sim -- 1000 50 7     # hosts, apps per host, seed
//! ```
//!
//! It prints AssumeRole calls per second across the fleet: the start-up second (every app's cold
//! fetch: demand, which no schedule can move), then peak, mean and peak/mean over the rest of the
//! two lifetimes, for the real schedule and, for comparison, for the same jitter without the
//! spread first refresh.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, SystemTime};

use governor::clock::FakeRelativeClock;
use imds_broker::config::{
    CredentialPolicy, DEFAULT_SESSION, DEFAULT_STS_BURST, DEFAULT_STS_CALLS_PER_SECOND,
};
use imds_broker::credentials::{Phase, StsBudget, refresh_at};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// How long one simulated AssumeRole call takes.
const STS_LATENCY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// The daemon's: the first refresh after a cold fetch is spread (`Phase::of_fetch`).
    Daemon,
    /// For comparison: every refresh in the jittered window, the first one included.
    WindowOnly,
}

struct Report {
    calls: u64,
    /// Calls per bucket over the simulated span.
    buckets: Vec<u64>,
    bucket: Duration,
    /// Calls the budget delayed, and by how much at most.
    deferred: u64,
    max_deferral: Duration,
}

impl Report {
    /// Peak and mean calls per second over buckets `from..`.
    fn peak_mean(&self, from: usize) -> (f64, f64) {
        let seconds = self.bucket.as_secs_f64();
        let rest = &self.buckets[from..];
        let peak = rest.iter().copied().max().unwrap_or(0) as f64;
        let mean = rest.iter().sum::<u64>() as f64 / rest.len() as f64;
        (peak / seconds, mean / seconds)
    }
}

fn simulate(hosts: u32, apps: u32, seed: u64, schedule: Schedule, bucket: Duration) -> Report {
    let policy = CredentialPolicy::default();
    let session = DEFAULT_SESSION;
    let horizon = 2 * session;
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut rng = StdRng::seed_from_u64(seed);
    // One budget per daemon, all on one virtual clock.
    let clock = FakeRelativeClock::default();
    let mut now = Duration::ZERO;
    let budgets: Vec<StsBudget<FakeRelativeClock>> = (0..hosts)
        .map(|_| {
            StsBudget::new(
                DEFAULT_STS_CALLS_PER_SECOND,
                DEFAULT_STS_BURST,
                clock.clone(),
            )
        })
        .collect();
    // (when, host, app, cold): an AssumeRole call the daemon wants to make.
    let mut queue: BinaryHeap<Reverse<(Duration, u32, u32, bool)>> = (0..hosts)
        .flat_map(|h| (0..apps).map(move |a| Reverse((Duration::ZERO, h, a, true))))
        .collect();
    let n_buckets = horizon.as_nanos().div_ceil(bucket.as_nanos()) as usize;
    let mut report = Report {
        calls: 0,
        buckets: vec![0; n_buckets],
        bucket,
        deferred: 0,
        max_deferral: Duration::ZERO,
    };
    while let Some(Reverse((at, host, app, cold))) = queue.pop() {
        if at >= horizon {
            break;
        }
        clock.advance(at - now);
        now = at;
        if let Err(wait) = budgets[host as usize].try_acquire() {
            report.deferred += 1;
            report.max_deferral = report.max_deferral.max(wait);
            queue.push(Reverse((at + wait, host, app, cold)));
            continue;
        }
        report.calls += 1;
        report.buckets[(at.as_nanos() / bucket.as_nanos()) as usize] += 1;
        let obtained = epoch + at + STS_LATENCY;
        let phase = match schedule {
            Schedule::Daemon => Phase::of_fetch(cold, 0),
            Schedule::WindowOnly => Phase::Renewal,
        };
        let next = refresh_at(obtained, obtained + session, &policy, phase, &mut rng);
        let next = next.duration_since(epoch).expect("after the epoch");
        queue.push(Reverse((next, host, app, false)));
    }
    report
}

fn print(name: &str, hosts: u32, apps: u32, r: &Report) {
    let (peak, mean) = r.peak_mean(1);
    println!("{name}:");
    println!(
        "  AssumeRole calls over two {}s lifetimes: {} ({} deferred by the per-host budget, at most {:?})",
        DEFAULT_SESSION.as_secs(),
        r.calls,
        r.deferred,
        r.max_deferral
    );
    println!(
        "  start-up second: {} calls (every app's cold fetch; {} hosts x {} apps)",
        r.buckets[0], hosts, apps
    );
    println!(
        "  after it: peak {peak:.0}/s, mean {mean:.1}/s, peak/mean {:.2}",
        peak / mean
    );
    let (peak_all, mean_all) = r.peak_mean(0);
    println!(
        "  whole span incl. start-up: peak {peak_all:.0}/s, mean {mean_all:.1}/s, peak/mean {:.0}",
        peak_all / mean_all
    );
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: refresh_sim [HOSTS [APPS [SEED]]]"))
        .collect();
    let hosts = args.first().copied().unwrap_or(10_000) as u32;
    let apps = args.get(1).copied().unwrap_or(50) as u32;
    let seed = args.get(2).copied().unwrap_or(1);
    let second = Duration::from_secs(1);
    println!(
        "{hosts} hosts x {apps} apps, all cold at t=0; session {}s, min_remaining {}s, refresh window {}s; per-host budget {}/s burst {}; seed {seed}\n",
        DEFAULT_SESSION.as_secs(),
        CredentialPolicy::default().min_remaining.as_secs(),
        CredentialPolicy::default().refresh_window.as_secs(),
        DEFAULT_STS_CALLS_PER_SECOND,
        DEFAULT_STS_BURST
    );
    let daemon = simulate(hosts, apps, seed, Schedule::Daemon, second);
    print(
        "daemon schedule (spread first refresh, then jittered window)",
        hosts,
        apps,
        &daemon,
    );
    let window = simulate(hosts, apps, seed, Schedule::WindowOnly, second);
    print("comparison: jittered window only", hosts, apps, &window);
    let (peak, mean) = daemon.peak_mean(1);
    println!(
        "\nRESULT peak={peak:.0}/s mean={mean:.1}/s ratio={:.2} goal<2 {}",
        peak / mean,
        if peak / mean < 2.0 { "met" } else { "NOT met" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small fleet, per-minute buckets (so Poisson noise stays small): the daemon's schedule
    /// is flat after start-up, the window-only one is not.
    #[test]
    fn the_daemon_schedule_keeps_the_fleet_flat() {
        let minute = Duration::from_secs(60);
        let daemon = simulate(200, 50, 3, Schedule::Daemon, minute);
        let (peak, mean) = daemon.peak_mean(1);
        assert!(peak / mean < 1.5, "daemon: {peak} / {mean}");
        let window = simulate(200, 50, 3, Schedule::WindowOnly, minute);
        let (peak, mean) = window.peak_mean(1);
        assert!(peak / mean > 2.0, "window only: {peak} / {mean}");
    }
}

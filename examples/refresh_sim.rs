//! Fleet refresh simulation: N hosts x M `prefetch` apps, every daemon (re)started at the same
//! moment with every app cold, run on a virtual clock for two session lifetimes. It drives the
//! daemon's own scheduling code, not a copy: `credentials::prefetch_delays` draws each app's
//! moment of the start-up spread (with the proof of the source, as the cache does at start),
//! `credentials::refresh_at` picks each refresh instant (with `Phase::of_fetch`, as the cache's
//! worker does), and each host's AssumeRole calls go through its own `StsBudget` (governor) on a
//! virtual clock. No network, no tokio.
//!
//! ```sh
//! cargo run --release --example refresh_sim                  # 10,000 hosts x 50 apps
//! cargo run --release --example refresh_sim -- 1000 50 7     # hosts, apps per host, seed
//! cargo run --release --example refresh_sim -- --spread 0,120,300,600 --immediate 0,0.1
//! ```
//!
//! Demand after the restart: the apps kept running, and each SDK holds credentials the old
//! daemon served with 30 to 60 minutes left (`min_remaining` to a full session); botocore asks
//! again when 15 minutes are left, so between asks an app waits U(15m, 45m), and the first ask
//! after the restart is that renewal process's residual time (its equilibrium first interval).
//! A fraction `--immediate` asks in the first second instead (apps restarted with the host, SDKs
//! with nothing cached). An app asked for before its spread moment is fetched at once (its
//! moment is void); its first request pays that AssumeRole, as without prefetch. One asked for
//! after its moment pays nothing, or the rest of the fetch under way.
//!
//! For each spread window and demand it prints AssumeRole calls per second across the fleet:
//! the start-up second, the peak second and the mean over the whole span *including* start-up,
//! and what the first request of an app cost. Then, as before, the steady state after start-up
//! of the daemon's refresh schedule against the same jitter without the spread first refresh.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, SystemTime};

use governor::clock::FakeRelativeClock;
use imds_broker::config::{
    CredentialPolicy, DEFAULT_PREFETCH_SPREAD, DEFAULT_SESSION, DEFAULT_STS_BURST,
    DEFAULT_STS_CALLS_PER_SECOND,
};
use imds_broker::credentials::{Phase, StsBudget, prefetch_delays, refresh_at};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long one simulated AssumeRole call takes.
const STS_LATENCY: Duration = Duration::from_millis(100);
/// The whole-span goal for peak/mean, start-up included.
const GOAL: f64 = 10.0;
/// An SDK asks again when its credentials have this little left (botocore's advisory refresh).
const SDK_REFRESH_AHEAD: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// The daemon's: the first refresh after a cold fetch is spread (`Phase::of_fetch`).
    Daemon,
    /// For comparison: every refresh in the jittered window, the first one included.
    WindowOnly,
}

/// One run's parameters.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    hosts: u32,
    apps: u32,
    seed: u64,
    schedule: Schedule,
    /// `credentials.prefetch_spread`.
    spread: Duration,
    /// Share of apps that ask in the first second after the restart.
    immediate: f64,
    bucket: Duration,
}

struct Report {
    calls: u64,
    /// Calls per bucket over the simulated span.
    buckets: Vec<u64>,
    bucket: Duration,
    /// Calls the budget delayed, and by how much at most.
    deferred: u64,
    max_deferral: Duration,
    /// Apps whose first request waited for an AssumeRole (asked before their moment, or while
    /// the spread fetch was under way), the total and the longest of those waits.
    first_waited: u64,
    first_wait_total: Duration,
    first_wait_max: Duration,
    /// Apps asked for before their spread moment.
    asked_early: u64,
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

    /// The bucket of the peak, as a time from the restart.
    fn peak_at(&self) -> Duration {
        let i = (0..self.buckets.len())
            .max_by_key(|&i| (self.buckets[i], Reverse(i)))
            .unwrap_or(0);
        self.bucket * i as u32
    }
}

/// When an app that kept running first asks after the restart (see the module text).
fn first_ask(rng: &mut StdRng, immediate: f64) -> Duration {
    if rng.random::<f64>() < immediate {
        return Duration::from_secs_f64(rng.random::<f64>());
    }
    let policy = CredentialPolicy::default();
    let a = (policy.min_remaining - SDK_REFRESH_AHEAD).as_secs_f64();
    let b = (DEFAULT_SESSION - SDK_REFRESH_AHEAD).as_secs_f64();
    // Residual of a renewal process with U(a, b) intervals: a length-biased interval times an
    // independent uniform.
    let length = (a * a + rng.random::<f64>() * (b * b - a * a)).sqrt();
    Duration::from_secs_f64(rng.random::<f64>() * length)
}

/// A call the daemon wants to make: (when, host, app, the app's first request if this is its
/// first fetch).
type Call = Reverse<(Duration, u32, u32, Option<Duration>)>;

fn simulate(s: Scenario) -> Report {
    let policy = CredentialPolicy::default();
    let session = DEFAULT_SESSION;
    let horizon = 2 * session;
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut rng = StdRng::seed_from_u64(s.seed);
    // One budget per daemon, all on one virtual clock.
    let clock = FakeRelativeClock::default();
    let mut now = Duration::ZERO;
    let budgets: Vec<StsBudget<FakeRelativeClock>> = (0..s.hosts)
        .map(|_| {
            StsBudget::new(
                DEFAULT_STS_CALLS_PER_SECOND,
                DEFAULT_STS_BURST,
                clock.clone(),
            )
        })
        .collect();
    let mut asked_early = 0;
    let mut queue: BinaryHeap<Call> = BinaryHeap::new();
    for host in 0..s.hosts {
        // As the cache does at start: nothing obtained yet, so one app proves the source early.
        let moments = prefetch_delays(s.apps as usize, s.spread, true, &mut rng);
        for (app, moment) in (0..s.apps).zip(moments) {
            let ask = first_ask(&mut rng, s.immediate);
            // Asked before its moment: fetched at once, the moment void.
            if ask < moment {
                asked_early += 1;
            }
            queue.push(Reverse((moment.min(ask), host, app, Some(ask))));
        }
    }
    let n_buckets = horizon.as_nanos().div_ceil(s.bucket.as_nanos()) as usize;
    let mut report = Report {
        calls: 0,
        buckets: vec![0; n_buckets],
        bucket: s.bucket,
        deferred: 0,
        max_deferral: Duration::ZERO,
        first_waited: 0,
        first_wait_total: Duration::ZERO,
        first_wait_max: Duration::ZERO,
        asked_early,
    };
    while let Some(Reverse((at, host, app, first))) = queue.pop() {
        if at >= horizon {
            break;
        }
        clock.advance(at - now);
        now = at;
        if let Err(wait) = budgets[host as usize].try_acquire() {
            report.deferred += 1;
            report.max_deferral = report.max_deferral.max(wait);
            queue.push(Reverse((at + wait, host, app, first)));
            continue;
        }
        report.calls += 1;
        report.buckets[(at.as_nanos() / s.bucket.as_nanos()) as usize] += 1;
        let done = at + STS_LATENCY;
        if let Some(ask) = first
            && ask < done
        {
            let wait = done - ask;
            report.first_waited += 1;
            report.first_wait_total += wait;
            report.first_wait_max = report.first_wait_max.max(wait);
        }
        let obtained = epoch + done;
        let phase = match s.schedule {
            Schedule::Daemon => Phase::of_fetch(first.is_some(), 0),
            Schedule::WindowOnly => Phase::Renewal,
        };
        let next = refresh_at(obtained, obtained + session, &policy, phase, &mut rng);
        let next = next.duration_since(epoch).expect("after the epoch");
        queue.push(Reverse((next, host, app, None)));
    }
    report
}

fn parse_list<T: std::str::FromStr>(arg: Option<String>, what: &str) -> Vec<T> {
    let arg = arg.unwrap_or_else(|| panic!("{what} needs a value"));
    arg.split(',')
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad {what} {v:?}")))
        .collect()
}

fn main() {
    let usage =
        "usage: refresh_sim [HOSTS [APPS [SEED]]] [--spread SECS,..] [--immediate SHARE,..]";
    let mut numbers: Vec<u64> = Vec::new();
    let mut spreads = vec![Duration::ZERO, 2 * 60 * SECOND, DEFAULT_PREFETCH_SPREAD];
    let mut immediates = vec![0.0, 0.001, 0.01, 0.1, 1.0];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--spread" => {
                spreads = parse_list::<u64>(args.next(), "--spread")
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect()
            }
            "--immediate" => immediates = parse_list(args.next(), "--immediate"),
            _ => numbers.push(arg.parse().expect(usage)),
        }
    }
    let hosts = numbers.first().copied().unwrap_or(10_000) as u32;
    let apps = numbers.get(1).copied().unwrap_or(50) as u32;
    let seed = numbers.get(2).copied().unwrap_or(1);
    let policy = CredentialPolicy::default();
    println!(
        "{hosts} hosts x {apps} prefetch apps, all restarted at t=0; session {}s, min_remaining {}s, refresh window {}s; per-host budget {}/s burst {}; STS latency {}ms; seed {seed}",
        DEFAULT_SESSION.as_secs(),
        policy.min_remaining.as_secs(),
        policy.refresh_window.as_secs(),
        DEFAULT_STS_CALLS_PER_SECOND,
        DEFAULT_STS_BURST,
        STS_LATENCY.as_millis(),
    );
    println!(
        "demand: a share asks in the first second, the others when their SDK's cached credentials near expiry (residual of U({}m, {}m))\n",
        (policy.min_remaining - SDK_REFRESH_AHEAD).as_secs() / 60,
        (DEFAULT_SESSION - SDK_REFRESH_AHEAD).as_secs() / 60
    );
    println!(
        "{:>7} {:>9} | {:>9} {:>9} {:>8} {:>9} {:>10} | {:>11} {:>12} {:>10} {:>9}",
        "spread",
        "immediate",
        "1st sec/s",
        "peak/s",
        "peak at",
        "mean/s",
        "peak/mean",
        "asked early",
        "first waited",
        "mean wait",
        "max wait"
    );
    let mut failures = 0;
    for &spread in &spreads {
        for &immediate in &immediates {
            let r = simulate(Scenario {
                hosts,
                apps,
                seed,
                schedule: Schedule::Daemon,
                spread,
                immediate,
                bucket: SECOND,
            });
            let (peak, mean) = r.peak_mean(0);
            let ratio = peak / mean;
            let total = f64::from(hosts) * f64::from(apps);
            let mean_wait = if r.first_waited == 0 {
                Duration::ZERO
            } else {
                r.first_wait_total / r.first_waited as u32
            };
            println!(
                "{:>6}s {:>8.1}% | {:>9} {:>9.0} {:>7}s {:>9.1} {:>10.2} | {:>10.2}% {:>11.2}% {:>8}ms {:>7}ms",
                spread.as_secs(),
                immediate * 100.0,
                r.buckets[0],
                peak,
                r.peak_at().as_secs(),
                mean,
                ratio,
                r.asked_early as f64 / total * 100.0,
                r.first_waited as f64 / total * 100.0,
                mean_wait.as_millis(),
                r.first_wait_max.as_millis(),
            );
            if spread == DEFAULT_PREFETCH_SPREAD && immediate <= 0.001 && ratio >= GOAL {
                failures += 1;
            }
        }
    }
    println!(
        "\n(peak, mean and peak/mean over the whole {}s span, start-up included; \"first waited\": apps whose first request waited for an AssumeRole)",
        (2 * DEFAULT_SESSION).as_secs()
    );

    let steady = |schedule| {
        simulate(Scenario {
            hosts,
            apps,
            seed,
            schedule,
            spread: DEFAULT_PREFETCH_SPREAD,
            immediate: 0.0,
            bucket: SECOND,
        })
    };
    // After every app's first fetch (the demand has asked by then): the refresh schedule alone.
    let settled = (DEFAULT_SESSION - SDK_REFRESH_AHEAD).as_secs() as usize;
    let daemon = steady(Schedule::Daemon);
    let (peak, mean) = daemon.peak_mean(settled);
    let window = steady(Schedule::WindowOnly);
    let (wpeak, wmean) = window.peak_mean(settled);
    println!(
        "\nsteady state after {settled}s (spread {}s, late demand): daemon schedule peak {peak:.0}/s mean {mean:.1}/s peak/mean {:.2}; jittered window only {:.2}; {} calls deferred by a per-host budget (at most {:?})",
        DEFAULT_PREFETCH_SPREAD.as_secs(),
        peak / mean,
        wpeak / wmean,
        daemon.deferred,
        daemon.max_deferral,
    );
    println!(
        "\nRESULT default spread {}s: whole-span peak/mean goal<{GOAL} with late demand {}",
        DEFAULT_PREFETCH_SPREAD.as_secs(),
        if failures == 0 { "met" } else { "NOT met" }
    );
}

const SECOND: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(schedule: Schedule, spread: Duration, immediate: f64) -> Scenario {
        Scenario {
            hosts: 200,
            apps: 50,
            seed: 3,
            schedule,
            spread,
            immediate,
            bucket: Duration::from_secs(60),
        }
    }

    /// A small fleet, per-minute buckets (so Poisson noise stays small): the daemon's schedule
    /// is flat after start-up, the window-only one is not.
    #[test]
    fn the_daemon_schedule_keeps_the_fleet_flat() {
        let settled = 45;
        let daemon = simulate(scenario(Schedule::Daemon, DEFAULT_PREFETCH_SPREAD, 0.0));
        let (peak, mean) = daemon.peak_mean(settled);
        assert!(peak / mean < 1.5, "daemon: {peak} / {mean}");
        let window = simulate(scenario(Schedule::WindowOnly, DEFAULT_PREFETCH_SPREAD, 0.0));
        let (peak, mean) = window.peak_mean(settled);
        assert!(peak / mean > 2.0, "window only: {peak} / {mean}");
    }

    /// With late demand the default spread keeps the whole span, start-up included, under the
    /// goal; without a spread the start-up minute alone is far over it.
    #[test]
    fn the_default_spread_meets_the_goal_and_no_spread_does_not() {
        let spread = simulate(scenario(Schedule::Daemon, DEFAULT_PREFETCH_SPREAD, 0.0));
        let (peak, mean) = spread.peak_mean(0);
        assert!(peak / mean < GOAL, "spread: {peak} / {mean}");
        let at_once = simulate(scenario(Schedule::Daemon, Duration::ZERO, 0.0));
        let (peak, mean) = at_once.peak_mean(0);
        assert!(peak / mean > GOAL, "at once: {peak} / {mean}");
        assert_eq!(at_once.asked_early, 0);
        assert!(
            at_once.buckets[0] >= 200 * 50,
            "every app in the first minute"
        );
    }

    /// Every app asked for before its moment pays one AssumeRole on its first request, and
    /// nothing else does (apps asked later find credentials, or a fetch about to end).
    #[test]
    fn only_apps_asked_before_their_moment_pay_a_fetch() {
        let r = simulate(scenario(Schedule::Daemon, DEFAULT_PREFETCH_SPREAD, 0.1));
        assert!(r.asked_early > 1000, "{}", r.asked_early);
        assert!(r.first_waited >= r.asked_early);
        // Those who arrive during a spread fetch wait less than a call: a few at most.
        assert!(r.first_waited - r.asked_early < r.asked_early / 10);
        assert_eq!(r.first_wait_max, STS_LATENCY, "no budget wait at this size");
    }
}

//! Credential rotation over (virtual) hours: the background refresher, STS outages, refusals and
//! throttling, the global STS budget, prefetch and idle apps, and config reload.
//!
//! The fake STS issues credentials on a wall clock that follows tokio's paused clock, so
//! `tokio::time` drives the cache, its refresher, its retries and its budget together, and no
//! test sleeps for real.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Behavior, FakeSts, ManualClock, TestDaemon, TokioWall, input};
use imds_broker::config::{
    Config, CredentialPolicy, DEFAULT_IDLE_AFTER, DEFAULT_MIN_REMAINING, DEFAULT_REFRESH_WINDOW,
};
use imds_broker::credentials::{
    CacheError, Clock, CredentialCache, CredentialSource, Credentials, DEGRADED_MIN_REMAINING,
    MIN_NAP, PROOF_WINDOW, REFRESH_MARGIN, REFUSAL_HOLD, RETRY_BASE, RETRY_CAP, RETRY_JITTER,
    StsBudget, StsError, TokioTime,
};
use imds_broker::imds::ImdsError;
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;
use imds_broker::{reload, signal};

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn rig(latency: Duration) -> (CredentialCache, Arc<FakeSts>, TokioWall) {
    let clock = TokioWall::new();
    let sts = FakeSts::with_clock(Arc::new(clock.clone()), latency);
    let cache = CredentialCache::new(
        sts.clone(),
        Arc::new(clock.clone()),
        CredentialPolicy::default(),
    );
    (cache, sts, clock)
}

fn unavailable() -> Behavior {
    Behavior::Fail(StsError::Unavailable(
        "ServiceUnavailable (HTTP 503)".into(),
    ))
}

fn status(err: CacheError) -> u16 {
    ImdsError::from(err).status_code().as_u16()
}

#[tokio::test(start_paused = true)]
async fn refresh_runs_ahead_so_served_credentials_always_keep_min_remaining() {
    let latency = Duration::from_millis(200);
    let (cache, sts, clock) = rig(latency);
    cache.start_refresher();
    let a = input("a");
    let mut served = HashSet::new();
    let end = clock.now() + 3 * HOUR;
    while clock.now() < end {
        let before = tokio::time::Instant::now();
        let creds = cache.get(&a).await.unwrap();
        if !served.is_empty() {
            assert_eq!(
                before.elapsed(),
                Duration::ZERO,
                "only the cold request waits"
            );
        }
        assert!(creds.remaining(clock.now()) > DEFAULT_MIN_REMAINING);
        served.insert(creds.access_key_id.clone());
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    // Each refresh started inside its window: after the previous credentials were issued and
    // before they reached min_remaining (less the margin; the refresher wakes within MIN_NAP).
    let times = sts.call_times();
    for pair in times.windows(2) {
        let expiration = pair[0] + latency + HOUR;
        assert!(pair[1] > pair[0]);
        assert!(pair[1] <= expiration - DEFAULT_MIN_REMAINING - REFRESH_MARGIN + MIN_NAP);
    }
    // Refreshes 19..29 min apart (the first one possibly sooner, see Phase::Spread).
    assert!((7..=12).contains(&times.len()), "{} calls", times.len());
    // Every refresh was served, except perhaps one that landed after the last request.
    assert!(served.len() + 1 >= times.len(), "{} served", served.len());
    cache.shutdown().await;
}

// One thread: every spawned request has run up to its wait before STS is let through, so
// all thousand overlap the call.
#[tokio::test(flavor = "current_thread")]
async fn a_thousand_concurrent_requests_share_one_call_cold_and_during_a_refresh() {
    let (cache, sts, clock) = common::cache_with_fake_sts();
    let burst = |cache: &CredentialCache| {
        (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&input("a")).await })
            })
            .collect::<Vec<_>>()
    };
    let keys = |results: Vec<Result<Arc<Credentials>, CacheError>>| {
        results
            .into_iter()
            .map(|r| r.unwrap().access_key_id.clone())
            .collect::<HashSet<_>>()
    };
    // Cold.
    sts.close();
    let waiters = burst(&cache);
    sts.wait_for_calls(1).await;
    tokio::task::yield_now().await;
    sts.open();
    let cold = keys(futures_util::future::try_join_all(waiters).await.unwrap());
    assert_eq!(sts.calls(), 1);
    assert_eq!(cold.len(), 1);
    // Below min_remaining: everyone waits for the same refresh.
    clock.advance(31 * MIN);
    sts.close();
    let waiters = burst(&cache);
    sts.wait_for_calls(2).await;
    tokio::task::yield_now().await;
    sts.open();
    let refreshed = keys(futures_util::future::try_join_all(waiters).await.unwrap());
    assert_eq!(sts.calls(), 2);
    assert_eq!(refreshed.len(), 1);
    assert!(refreshed.is_disjoint(&cold));
}

#[tokio::test(start_paused = true)]
async fn sts_outage_serves_last_good_until_five_minutes_before_expiry_then_5xx_then_recovers() {
    let (cache, sts, clock) = rig(Duration::ZERO);
    cache.start_refresher();
    let a = input("a");
    let good = cache.get(&a).await.unwrap();
    let outage_start = clock.now();
    sts.set(unavailable());
    let cutoff = good.expiration - DEGRADED_MIN_REMAINING;

    // Every 30 s until just before the cutoff: the last good credentials, degraded once they are
    // below min_remaining, never with DEGRADED_MIN_REMAINING or less left.
    let mut degraded_requests = 0;
    while clock.now() + Duration::from_secs(30) < cutoff {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let creds = cache.get(&a).await.expect("last good credentials");
        assert_eq!(creds.access_key_id, good.access_key_id);
        let left = creds.remaining(clock.now());
        assert!(left > DEGRADED_MIN_REMAINING);
        if left <= DEFAULT_MIN_REMAINING {
            degraded_requests += 1;
        }
    }
    assert!(degraded_requests >= 40, "{degraded_requests}");
    let stats = cache.stats();
    assert_eq!(stats.degraded_entries, 1);
    assert_eq!(stats.degraded_serves, degraded_requests);
    // Longer than a refresh window, and STS was retried all along, at most once per RETRY_CAP
    // or so once the backoff has grown.
    let outage = clock.now().duration_since(outage_start).unwrap();
    assert!(outage > DEFAULT_REFRESH_WINDOW);
    let retries = sts.calls() - 1;
    assert!(retries >= 10, "{retries}");
    assert!(
        retries as u64 <= outage.as_secs() / 25,
        "{retries} calls in {outage:?}"
    );

    // Both sides of the cutoff.
    let now = clock.now();
    tokio::time::advance(cutoff.duration_since(now).unwrap() - Duration::from_secs(1)).await;
    assert_eq!(
        cache.get(&a).await.unwrap().access_key_id,
        good.access_key_id
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = cache.get(&a).await.unwrap_err();
    assert_eq!(status(err), 503);
    // ...and through expiry: never expired credentials.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let err = cache.get(&a).await.unwrap_err();
        assert_eq!(
            err,
            CacheError::Sts(StsError::Unavailable(
                "ServiceUnavailable (HTTP 503)".into()
            ))
        );
    }

    // STS returns: the next retry (at most RETRY_CAP away) succeeds and ends degraded mode.
    sts.set(Behavior::Issue { lifetime: None });
    let calls = sts.calls();
    let back = clock.now();
    let fresh = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(creds) = cache.get(&a).await {
            break creds;
        }
        assert!(clock.now().duration_since(back).unwrap() <= RETRY_CAP + MIN_NAP);
    };
    assert_ne!(fresh.access_key_id, good.access_key_id);
    assert!(fresh.remaining(clock.now()) > DEFAULT_MIN_REMAINING);
    assert_eq!(sts.calls(), calls + 1, "recovered on the first success");
    assert_eq!(cache.stats().degraded_entries, 0);
    cache.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn access_denied_is_not_retried_in_a_loop() {
    let (cache, sts, _) = rig(Duration::ZERO);
    cache.start_refresher();
    let a = input("a");
    sts.set(Behavior::Fail(StsError::Refused {
        code: "AccessDenied".into(),
        message: "not authorized to perform sts:AssumeRole".into(),
    }));
    let err = cache.get(&a).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Sts(StsError::Refused { code, .. }) if code == "AccessDenied")
    );
    assert_eq!(status(err), 500);
    // Callers within the hold get the refusal, no new call.
    for _ in 0..100 {
        tokio::time::advance(REFUSAL_HOLD / 120).await;
        assert!(cache.get(&a).await.is_err());
    }
    assert_eq!(sts.calls(), 1);
    // Nothing retries it in the background, however long.
    tokio::time::sleep(6 * HOUR).await;
    assert_eq!(sts.calls(), 1);
    // A caller after the hold tries exactly once more.
    assert!(cache.get(&a).await.is_err());
    assert!(cache.get(&a).await.is_err());
    assert_eq!(sts.calls(), 2);
    cache.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_refresh_serves_valid_credentials_to_min_remaining_but_is_not_degraded() {
    let (cache, sts, clock) = rig(Duration::ZERO);
    cache.start_refresher();
    let a = input("a");
    let good = cache.get(&a).await.unwrap();
    sts.set(Behavior::Fail(StsError::Refused {
        code: "AccessDenied".into(),
        message: "trust policy changed".into(),
    }));
    let floor = good.expiration - DEFAULT_MIN_REMAINING;
    while clock.now() + Duration::from_secs(30) < floor {
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            cache.get(&a).await.unwrap().access_key_id,
            good.access_key_id
        );
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let err = cache.get(&a).await.unwrap_err();
    assert_eq!(status(err), 500);
    // One refused background refresh, then at most one caller-driven try per REFUSAL_HOLD.
    let calls = sts.calls();
    assert!(
        (2..=1 + 30 * MIN.as_secs() as usize / REFUSAL_HOLD.as_secs() as usize + 1)
            .contains(&calls)
    );
    assert_eq!(cache.stats().degraded_serves, 0);
    cache.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retried_with_growing_delays() {
    let (cache, sts, clock) = rig(Duration::ZERO);
    cache.start_refresher();
    let a = input("a");
    let throttles = 7;
    for _ in 0..throttles {
        sts.then(Behavior::Fail(StsError::Throttled {
            code: "Throttling".into(),
        }));
    }
    let err = cache.get(&a).await.unwrap_err();
    assert_eq!(status(err), 503);
    // Callers keep asking (and get the throttling error at once); the worker retries by itself.
    let start = clock.now();
    let creds = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match cache.get(&a).await {
            Ok(creds) => break creds,
            Err(e) => assert!(matches!(e, CacheError::Sts(StsError::Throttled { .. }))),
        }
        assert!(clock.now().duration_since(start).unwrap() < 10 * MIN);
    };
    assert!(creds.remaining(clock.now()) > DEFAULT_MIN_REMAINING);
    let times = sts.call_times();
    assert_eq!(
        times.len(),
        throttles + 1,
        "one call per retry, none per request"
    );
    let gaps: Vec<Duration> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap())
        .collect();
    for (i, gap) in gaps.iter().enumerate() {
        let ceiling = (RETRY_BASE * 2u32.pow(i as u32)).min(RETRY_CAP);
        assert!(
            *gap <= ceiling && *gap >= ceiling.mul_f64(1.0 - RETRY_JITTER),
            "gap {i}: {gap:?}, ceiling {ceiling:?}; all: {gaps:?}"
        );
    }
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
    assert!(*gaps.last().unwrap() >= 16 * gaps[0], "{gaps:?}");
    cache.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_cold_apps_stays_within_the_sts_budget() {
    let clock = TokioWall::new();
    let sts = FakeSts::with_clock(Arc::new(clock.clone()), Duration::ZERO);
    let (rate, burst) = (10, 50);
    // Every caller waits for its own app's call, however late the budget lets it start (by
    // default a caller stops waiting after `max_wait`; tests/sts_slow.rs).
    let patient = CredentialPolicy {
        max_wait: Duration::from_secs(60),
        ..CredentialPolicy::default()
    };
    let cache = CredentialCache::with_budget(
        sts.clone(),
        Arc::new(clock.clone()),
        patient,
        StsBudget::new(rate, burst, TokioTime),
    );
    let apps = 200;
    let gets: Vec<_> = (0..apps)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&input(&format!("app-{i}"))).await })
        })
        .collect();
    for g in futures_util::future::try_join_all(gets).await.unwrap() {
        g.unwrap();
    }
    let t0 = clock.base;
    let offsets: Vec<f64> = sts
        .call_times()
        .iter()
        .map(|t| t.duration_since(t0).unwrap().as_secs_f64())
        .collect();
    assert_eq!(offsets.len(), apps);
    assert_eq!(
        offsets.iter().filter(|&&t| t == 0.0).count(),
        burst as usize
    );
    // In every window from the start, at most the burst plus the sustained rate.
    for end in 1..=20 {
        let within = offsets.iter().filter(|&&t| t < f64::from(end)).count();
        assert!(
            within <= (burst + rate * end) as usize,
            "{within} calls in {end}s"
        );
    }
    let last = offsets.iter().cloned().fold(0.0, f64::max);
    let expected = f64::from(apps as u32 - burst) / f64::from(rate);
    assert!((last - expected).abs() < 0.5, "last call at {last}s");
    cache.shutdown().await;
}

/// Two apps on uids nobody uses; `a` prefetched when asked.
fn two_apps(dir: &Path, role_b: &str, prefetch_a: bool) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"

[sts]
region = "us-east-1"

[[app]]
name = "app-a"
role_arn = "arn:aws:iam::111122223333:role/app-a"
prefetch = {prefetch_a}
[app.match]
uid = 4000001

[[app]]
name = "app-b"
role_arn = "arn:aws:iam::111122223333:role/{role_b}"
[app.match]
uid = 4000002
"#,
        state = dir.join("state").display()
    )
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn app_state(config: Config, source: Arc<dyn CredentialSource>, clock: Arc<dyn Clock>) -> AppState {
    let key = TokenKey::load_or_create(&config.server.state_dir).unwrap();
    AppState::new(config, key, source, clock)
}

#[tokio::test]
async fn reload_with_a_changed_role_drops_only_that_apps_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &two_apps(dir.path(), "app-b", false));
    let clock = ManualClock::new();
    let sts = FakeSts::new(clock.clone());
    let state = app_state(Config::load(&path).unwrap(), sts.clone(), Arc::new(clock));
    let a = state.config().apps[0].assume_role_input().clone();
    let b = state.config().apps[1].assume_role_input().clone();
    let a_key = state.cache().get(&a).await.unwrap().access_key_id.clone();
    state.cache().get(&b).await.unwrap();
    assert_eq!(sts.calls(), 2);

    write_config(&path, &two_apps(dir.path(), "app-b-v2", false));
    let summary = reload::reload(&state, &path).await.unwrap();
    assert_eq!((summary.apps, summary.dropped), (2, 1));
    assert!(!summary.needs_restart);
    // app-a: same input, same cached credentials, no call.
    assert_eq!(state.cache().get(&a).await.unwrap().access_key_id, a_key);
    assert_eq!(sts.calls(), 2);
    // app-b: the new role, fetched anew.
    let b2 = state.config().apps[1].assume_role_input().clone();
    assert_eq!(b2.role_arn.role_name(), "app-b-v2");
    state.cache().get(&b2).await.unwrap();
    assert_eq!(sts.calls(), 3);
    assert_eq!(sts.inputs().last().unwrap(), &b2);
    assert_eq!(
        state.cache().stats().entries,
        2,
        "the old app-b entry is gone"
    );

    // An invalid file: an error, and the daemon keeps the config and the credentials it has.
    write_config(&path, "[[app]]\nname = 3\n");
    assert!(reload::reload(&state, &path).await.is_err());
    assert_eq!(state.config().apps[1].role_arn().role_name(), "app-b-v2");
    assert_eq!(state.cache().get(&a).await.unwrap().access_key_id, a_key);
    state.cache().get(&b2).await.unwrap();
    assert_eq!(sts.calls(), 3);
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &two_apps(dir.path(), "app-b", false));
    let clock = ManualClock::new();
    let state = app_state(
        Config::load(&path).unwrap(),
        FakeSts::new(clock.clone()),
        Arc::new(clock),
    );
    reload::spawn_reloader(
        state.clone(),
        path.clone(),
        signal::hangups().unwrap(),
        None,
    );
    write_config(&path, &two_apps(dir.path(), "app-b-v2", false));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.config().apps[1].role_arn().role_name() != "app-b-v2" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("SIGHUP reloaded the config");
    tokio::time::timeout(Duration::from_secs(10), state.stop_background())
        .await
        .expect("the reloader stops");
}

#[tokio::test(start_paused = true)]
async fn prefetch_warms_at_start_and_idle_apps_stop_being_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TokioWall::new();
    let sts = FakeSts::with_clock(Arc::new(clock.clone()), Duration::from_millis(100));
    let config =
        Config::parse(&two_apps(dir.path(), "app-b", true), Path::new("test.toml")).unwrap();
    assert_eq!(config.credentials.idle_after, DEFAULT_IDLE_AFTER);
    let state = app_state(config, sts.clone(), Arc::new(clock.clone()));
    let a = state.config().apps[0].assume_role_input().clone();
    state.start_refresher();
    // The only prefetch app proves the source: fetched within PROOF_WINDOW of the start, not
    // anywhere in `prefetch_spread` (tests/prefetch_spread.rs has the spread itself).
    tokio::time::sleep(PROOF_WINDOW).await;
    assert_eq!(sts.calls_for("app-a"), 1, "prefetched at start");
    assert_eq!(sts.calls_for("app-b"), 0, "not asked for, not prefetched");
    // The first request is a cache hit.
    let before = tokio::time::Instant::now();
    state.cache().get(&a).await.unwrap();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(sts.calls(), 1);
    // Nobody asks again: refreshed while in use (idle_after), then left alone...
    tokio::time::sleep(DEFAULT_IDLE_AFTER).await;
    let while_active = sts.calls();
    assert!(while_active >= 2, "kept warm while in use");
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(sts.calls(), while_active, "no refreshes for an idle app");
    // ...and dropped once it could serve nothing; the next request is a cold fetch.
    assert_eq!(state.cache().stats().entries, 0);
    state.cache().get(&a).await.unwrap();
    assert_eq!(sts.calls(), while_active + 1);
    state.stop_background().await;
}

#[tokio::test]
async fn over_imds_degraded_credentials_are_served_until_the_floor_then_503() {
    let d = TestDaemon::start(|dir| common::config_text(dir, "")).await;
    let token = d.token(21600).await;
    let path = "/latest/meta-data/iam/security-credentials/app-a";
    let key = |body: &str| -> String {
        let doc: serde_json::Value = serde_json::from_str(body).unwrap();
        doc["AccessKeyId"].as_str().unwrap().to_owned()
    };
    let first = d.get(path, &token).await;
    assert_eq!(first.status, 200, "{first:?}");
    d.sts
        .set(Behavior::Fail(StsError::Unavailable("down".into())));
    // 29 min left: below min_remaining, STS failing: the last good credentials.
    d.clock.advance(31 * MIN);
    let degraded = d.get(path, &token).await;
    assert_eq!(degraded.status, 200, "{degraded:?}");
    assert_eq!(key(&degraded.body), key(&first.body));
    // 5 min left: an IMDS-shaped 503, not the old credentials.
    d.clock.advance(24 * MIN);
    let refused = d.get(path, &token).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("503 - Service Unavailable"));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_policy_moves_refreshes_that_would_now_be_late_and_only_those() {
    let (cache, _sts, clock) = rig(Duration::ZERO);
    let a = input("a");
    let creds = cache.get(&a).await.unwrap();
    let scheduled = cache.next_refresh(&a).unwrap();
    // The same policy again (a reload that changed something else): schedule untouched.
    cache.set_policy(CredentialPolicy::default());
    assert_eq!(cache.next_refresh(&a), Some(scheduled));
    // A longer min_remaining: the refresh moves before the new floor (less the margin).
    let stricter = CredentialPolicy {
        min_remaining: 45 * MIN,
        ..CredentialPolicy::default()
    };
    cache.set_policy(stricter);
    let moved = cache.next_refresh(&a).unwrap();
    assert!(moved >= clock.now());
    assert!(moved <= creds.expiration - stricter.min_remaining - REFRESH_MARGIN);
    if scheduled <= creds.expiration - stricter.min_remaining - REFRESH_MARGIN {
        assert_eq!(moved, scheduled, "an early enough refresh keeps its spread");
    }
    // Served only above the new floor: 14 min later (46 min left) fine, 16 min later a refresh.
    tokio::time::advance(14 * MIN).await;
    assert_eq!(
        cache.get(&a).await.unwrap().access_key_id,
        creds.access_key_id
    );
    tokio::time::advance(2 * MIN).await;
    assert_ne!(
        cache.get(&a).await.unwrap().access_key_id,
        creds.access_key_id
    );
}

/// [`TokioWall`] whose wall clock can also be stepped (an NTP step: no time passes). The fake
/// STS uses it too, as moto shares the broker's faked clock in the end-to-end test.
#[derive(Clone)]
struct SteppedWall {
    inner: TokioWall,
    step_secs: Arc<std::sync::atomic::AtomicI64>,
}

impl SteppedWall {
    fn step(&self, secs: i64) {
        self.step_secs
            .fetch_add(secs, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for SteppedWall {
    fn now(&self) -> std::time::SystemTime {
        let step = self.step_secs.load(std::sync::atomic::Ordering::SeqCst);
        let by = Duration::from_secs(step.unsigned_abs());
        let wall = self.inner.now();
        if step >= 0 { wall + by } else { wall - by }
    }

    fn boot_time(&self) -> imds_broker::time::BootTime {
        self.inner.boot_time()
    }
}

#[tokio::test(start_paused = true)]
async fn a_clock_step_refreshes_each_app_in_use_once_and_a_step_back_refreshes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SteppedWall {
        inner: TokioWall::new(),
        step_secs: Arc::default(),
    };
    let sts = FakeSts::with_clock(Arc::new(clock.clone()), Duration::from_millis(100));
    let config =
        Config::parse(&two_apps(dir.path(), "app-b", true), Path::new("test.toml")).unwrap();
    let state = app_state(config, sts.clone(), Arc::new(clock.clone()));
    let a = state.config().apps[0].assume_role_input().clone();
    state.start_refresher();
    tokio::time::sleep(Duration::from_secs(1)).await;
    state.cache().get(&a).await.unwrap();
    assert_eq!(sts.calls(), 1);
    // Forward by idle_after: the app was used a second ago, so it is not idle; its credentials
    // are expired by the new wall clock and are refreshed unprompted, once.
    clock.step(DEFAULT_IDLE_AFTER.as_secs() as i64);
    tokio::time::sleep(imds_broker::credentials::MAX_NAP + Duration::from_secs(1)).await;
    assert_eq!(sts.calls(), 2, "one refresh after the step");
    assert_eq!(
        state.cache().stats().entries,
        1,
        "the app in use was not dropped"
    );
    let creds = state.cache().get(&a).await.unwrap();
    assert!(creds.remaining(clock.now()) > DEFAULT_MIN_REMAINING);
    assert_eq!(sts.calls(), 2, "served from the cache");
    // Back an hour: nothing comes due early, so nothing is called for a while.
    clock.step(-3600);
    tokio::time::sleep(10 * MIN).await;
    assert_eq!(sts.calls(), 2, "no refresh after a step back");
    let again = state.cache().get(&a).await.unwrap();
    assert_eq!(again.access_key_id, creds.access_key_id);
    state.stop_background().await;
}

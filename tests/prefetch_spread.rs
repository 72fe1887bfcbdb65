//! The start-up spread of `prefetch` apps (`credentials.prefetch_spread`): first fetches at
//! random moments of the window rather than all at start, a request before an app's moment
//! served at once with one STS call and nothing more at the moment, the same spread for the
//! apps a reload adds, pending moments cancelled by a reload that drops the app and by
//! shutdown, and `/readyz` while apps wait for their moment.
//!
//! Paused tokio clock throughout: the fake STS, the credentials' expiry and the spread's timers
//! all follow it, so the five-minute window passes in no real time.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::Request;
use common::{Behavior, FakeSts, TokioWall};
use imds_broker::admin;
use imds_broker::config::{Config, DEFAULT_PREFETCH_SPREAD};
use imds_broker::credentials::{Clock, PROOF_WINDOW, StsError};
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;
use tower::ServiceExt;

const LATENCY: Duration = Duration::from_millis(100);
const SECOND: Duration = Duration::from_secs(1);

/// `apps` prefetch apps `p0`.., on uids nobody uses, with `credentials` lines if any.
fn config(dir: &Path, apps: usize, credentials: &str) -> Config {
    let mut text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{}\"\n\n[sts]\nregion = \"us-east-1\"\n\n[credentials]\n{credentials}\n",
        dir.join("state").display()
    );
    for i in 0..apps {
        text.push_str(&format!(
            "\n[[app]]\nname = \"p{i}\"\nrole_arn = \"arn:aws:iam::111122223333:role/p{i}\"\nprefetch = true\n[app.match]\nuid = {}\n",
            4_100_000 + i
        ));
    }
    Config::parse(&text, Path::new("test.toml")).expect("valid test config")
}

struct Rig {
    state: AppState,
    sts: Arc<FakeSts>,
    clock: TokioWall,
    _dir: tempfile::TempDir,
}

fn rig(apps: usize, credentials: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), apps, credentials);
    let clock = TokioWall::new();
    let sts = FakeSts::with_clock(Arc::new(clock.clone()), LATENCY);
    let key = TokenKey::load_or_create(&config.server.state_dir).unwrap();
    let state = AppState::new(config, key, sts.clone(), Arc::new(clock.clone()));
    Rig {
        state,
        sts,
        clock,
        _dir: dir,
    }
}

impl Rig {
    fn input(&self, app: usize) -> imds_broker::credentials::AssumeRoleInput {
        self.state.config().apps[app].assume_role_input().clone()
    }

    /// When each call was made, from the start.
    fn call_offsets(&self) -> Vec<Duration> {
        self.sts
            .call_times()
            .iter()
            .map(|t| t.duration_since(self.clock.base).unwrap())
            .collect()
    }

    /// Each app's first call, from the start (later ones are refreshes: a spread first refresh
    /// may fall inside the window).
    fn first_calls(&self) -> BTreeMap<String, Duration> {
        let mut first = BTreeMap::new();
        for (offset, input) in self.call_offsets().into_iter().zip(self.sts.inputs()) {
            first
                .entry(input.role_arn.role_name().to_owned())
                .or_insert(offset);
        }
        first
    }

    /// Waits for the fetch under way of every app called so far (joining one adds no call).
    async fn join_fetched(&self) {
        for app in self.first_calls().keys() {
            let app: usize = app[1..].parse().unwrap();
            self.state.cache().get(&self.input(app)).await.unwrap();
        }
    }

    async fn admin(&self, path: &str) -> (u16, String) {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let response = admin::router(self.state.clone(), handle)
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }
}

#[tokio::test(start_paused = true)]
async fn start_up_prefetches_are_spread_over_the_window_not_made_at_start() {
    let apps = 20;
    let r = rig(apps, "");
    r.state.start_refresher();
    tokio::time::sleep(SECOND).await;
    assert!(
        r.sts.calls() <= 2,
        "{} of {apps} prefetched in the first second",
        r.sts.calls()
    );
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    let firsts = r.first_calls();
    assert_eq!(firsts.len(), apps, "every app fetched in the window");
    let first = *firsts.values().min().unwrap();
    let last = *firsts.values().max().unwrap();
    // One app proves the source early; the others fill the window.
    assert!(first < PROOF_WINDOW, "first at {first:?}");
    assert!(last < DEFAULT_PREFETCH_SPREAD, "last at {last:?}");
    assert!(
        last - first > DEFAULT_PREFETCH_SPREAD / 2,
        "{first:?}..{last:?}"
    );
    r.state.stop_background().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_before_its_moment_is_served_at_once_and_the_moment_adds_no_call() {
    let apps = 10;
    let r = rig(apps, "");
    r.state.start_refresher();
    tokio::time::sleep(SECOND).await;
    let asked = (0..apps)
        .find(|&app| r.sts.calls_for(&format!("p{app}")) == 0)
        .expect("an app still waiting for its moment");
    let name = format!("p{asked}");
    let input = r.input(asked);
    let before = tokio::time::Instant::now();
    let creds = r.state.cache().get(&input).await.unwrap();
    assert_eq!(before.elapsed(), LATENCY, "one STS call, not the schedule");
    assert_eq!(r.sts.calls_for(&name), 1);
    // Its first refresh (a spread one: it may fall inside the window) is the only call left.
    let refresh = r.state.cache().next_refresh(&input).unwrap();
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    let calls: Vec<SystemTime> = r
        .sts
        .call_times()
        .into_iter()
        .zip(r.sts.inputs())
        .filter(|(_, i)| i.role_arn.role_name() == name)
        .map(|(t, _)| t)
        .collect();
    assert!(
        calls[1..].iter().all(|t| *t >= refresh),
        "a call at the void moment: {calls:?}, refresh at {refresh:?}"
    );
    if refresh > r.clock.now() {
        assert_eq!(calls.len(), 1);
        assert_eq!(
            r.state.cache().get(&input).await.unwrap().access_key_id,
            creds.access_key_id
        );
    }
    assert_eq!(r.first_calls().len(), apps, "the others kept their moments");
    r.state.stop_background().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_spreads_the_prefetch_apps_it_adds() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig(1, "");
    r.state.start_refresher();
    tokio::time::sleep(PROOF_WINDOW + SECOND).await;
    assert_eq!(
        r.first_calls().len(),
        1,
        "the one app proves the source early"
    );
    let added = 12;
    let mut bigger = config(dir.path(), 1 + added, "");
    bigger.server.state_dir = r.state.config().server.state_dir.clone();
    r.state.apply_config(bigger);
    tokio::time::sleep(SECOND).await;
    let early = r.first_calls().len() - 1;
    assert!(
        early < added / 2,
        "{early} of {added} added apps fetched in the first second"
    );
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    let mut firsts = r.first_calls();
    firsts.remove("p0");
    assert_eq!(firsts.len(), added);
    let first = firsts.values().min().unwrap();
    let last = firsts.values().max().unwrap();
    assert!(*last - *first > DEFAULT_PREFETCH_SPREAD / 3, "{firsts:?}");
    r.state.stop_background().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_drops_an_app_and_shutdown_cancel_its_pending_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let apps = 8;
    let r = rig(apps, "");
    r.state.start_refresher();
    tokio::time::sleep(SECOND).await;
    let dropped_calls = |r: &Rig| {
        (1..apps)
            .map(|app| r.sts.calls_for(&format!("p{app}")))
            .sum::<usize>()
    };
    let before = dropped_calls(&r);
    assert!(
        before < (apps - 1) / 2,
        "{before} of {} fetched already",
        apps - 1
    );
    // Drop every app but p0: their moments must not call STS for roles nobody configures.
    let mut fewer = config(dir.path(), 1, "");
    fewer.server.state_dir = r.state.config().server.state_dir.clone();
    let summary = r.state.apply_config(fewer);
    assert_eq!(summary.dropped, apps - 1);
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    assert_eq!(
        dropped_calls(&r),
        before,
        "a dropped app's moment called STS"
    );
    assert!(r.sts.calls_for("p0") >= 1, "the kept app keeps its moment");
    r.state.stop_background().await;

    // Shutdown within the window: no moment fires, and nothing waits for one.
    let r = rig(apps, "");
    r.state.start_refresher();
    tokio::time::timeout(SECOND, r.state.stop_background())
        .await
        .expect("pending prefetches end with the shutdown");
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    assert_eq!(r.sts.calls(), 0, "calls after shutdown");
}

#[tokio::test(start_paused = true)]
async fn readyz_waits_for_the_proof_not_the_window_and_fails_on_a_failed_fetch() {
    let apps = 6;
    let r = rig(apps, "");
    r.state.start_refresher();
    let (status, body) = r.admin("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("prove the source"), "{body}");
    let (_, status_json) = r.admin("/status").await;
    assert!(
        status_json.contains("\"prefetch_in_secs\":"),
        "{status_json}"
    );

    // One app is fetched within the proof window: ready, though others still wait.
    tokio::time::sleep(PROOF_WINDOW + LATENCY).await;
    r.join_fetched().await;
    let proven = r.first_calls().len();
    assert!((1..apps).contains(&proven), "{proven} apps fetched");
    assert_eq!(r.admin("/readyz").await, (200, "ready\n".to_owned()));

    // A spread fetch under way (held by STS) does not make the host unready.
    r.sts.close();
    for _ in 0..DEFAULT_PREFETCH_SPREAD.as_secs() {
        if r.first_calls().len() > proven {
            break;
        }
        tokio::time::sleep(SECOND).await;
    }
    assert!(r.first_calls().len() > proven, "a moment passed");
    assert_eq!(r.admin("/readyz").await, (200, "ready\n".to_owned()));
    r.sts.open();
    r.join_fetched().await;
    let proven = r.first_calls().len();

    // The waiting apps' fetches are refused: not ready, and they are named.
    r.sts.set(Behavior::Fail(StsError::Refused {
        code: "AccessDenied".into(),
        message: "no".into(),
    }));
    tokio::time::sleep(DEFAULT_PREFETCH_SPREAD).await;
    let refused: Vec<String> = (0..apps)
        .filter(|&app| {
            r.state
                .cache()
                .peek(&r.input(app))
                .is_none_or(|e| e.current.is_none())
        })
        .map(|app| format!("p{app}"))
        .collect();
    assert_eq!(refused.len(), apps - proven);
    let (status, body) = r.admin("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no valid credentials yet"), "{body}");
    assert!(
        refused.iter().all(|app| body.contains(app.as_str())),
        "{body}"
    );
    r.state.stop_background().await;
}

#[tokio::test(start_paused = true)]
async fn with_no_spread_every_prefetch_app_is_fetched_at_start() {
    let apps = 5;
    let r = rig(apps, "prefetch_spread = 0");
    assert_eq!(r.state.config().credentials.prefetch_spread, Duration::ZERO);
    r.state.start_refresher();
    let (status, body) = r.admin("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("prove the source"), "{body}");
    r.sts.wait_for_calls(apps).await;
    assert!(r.call_offsets().iter().all(|t| t.is_zero()));
    // Waiting on each app's fetch in flight adds no call.
    for app in 0..apps {
        r.state.cache().get(&r.input(app)).await.unwrap();
    }
    assert_eq!(r.sts.calls(), apps);
    assert_eq!(r.admin("/readyz").await, (200, "ready\n".to_owned()));
    r.state.stop_background().await;
}

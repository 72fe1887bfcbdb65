//! Repeated credential serves and the audit trail, through the router and the real audit sink:
//! a caller polling for the credentials it already has adds one `credentials.issued` line, while
//! every new caller, new process, other app and rotated key gets its own line, refusals are
//! audited every time, and the served-credentials metric counts every serve.
//!
//! One test per process: what has been audited is remembered process-wide (one daemon per
//! process), and another test's fake STS would issue the same access key ids.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{FakeSts, ManualClock};
use imds_broker::audit::sink::AuditSink;
use imds_broker::config::{Config, DEFAULT_MIN_REMAINING, DEFAULT_SESSION};
use imds_broker::identity::process::ProcessInfo;
use imds_broker::identity::{Caller, LocalCaller};
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;

const CONFIG: &str = r#"
[sts]
region = "us-east-1"

[[app]]
name = "app-a"
role_arn = "arn:aws:iam::111122223333:role/app-a"
[app.match]
uid = 1001

[[app]]
name = "app-b"
role_arn = "arn:aws:iam::444455556666:role/app-b"
[app.match]
uid = 1002
"#;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// A caller as the server resolves it when rules need the process: uid, pid and executable.
fn caller(uid: u32, pid: u32, port: u16) -> Caller {
    Caller::Local(LocalCaller {
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        uid,
        cgroup: Some("/user.slice/user-1001.slice/session-1.scope".into()),
        unit: Some("session-1.scope".into()),
        user_unit: None,
        process: Some(ProcessInfo {
            pid,
            uid,
            gid: uid,
            exe: "/usr/bin/python3".into(),
            start_time: 1_000,
        }),
        exe_sha256: None,
        netns: None,
        container: None,
    })
}

/// Gets `role`'s credentials as `caller` `times` times; returns the access key id served.
async fn get_creds(state: &AppState, caller: &Caller, role: &str, times: usize) -> String {
    let (status, token) = common::route(state, caller, "PUT", "/latest/api/token", None).await;
    assert_eq!(status, StatusCode::OK);
    let mut keys = Vec::new();
    for _ in 0..times {
        let (status, body) = common::route(
            state,
            caller,
            "GET",
            &format!("{CREDS}{role}"),
            Some(&token),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        keys.push(doc["AccessKeyId"].as_str().unwrap().to_owned());
    }
    keys.dedup();
    assert_eq!(keys.len(), 1, "one key per burst: {keys:?}");
    keys.pop().unwrap()
}

#[tokio::test]
async fn repeats_are_audited_once_and_every_new_issuance_always() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (sink, layer) = AuditSink::open(&path, "host-1".into(), None).unwrap();
    // The test runtime is single-threaded: the subscriber and the recorder set for this
    // thread see the handlers and the cache's STS worker.
    let _tracing = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let config = Config::parse(CONFIG, Path::new("audit.toml")).unwrap();
    let clock = ManualClock::new();
    let sts = FakeSts::new(clock.clone());
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let state = AppState::new(config, key, sts.clone(), Arc::new(clock.clone()));

    let first = caller(1001, 100, 40_000);
    let key1 = get_creds(&state, &first, "app-a", 5).await;
    // The same process on a new connection (another port) is not a new caller.
    assert_eq!(
        get_creds(&state, &caller(1001, 100, 40_001), "app-a", 3).await,
        key1
    );
    // Another process of the same uid is.
    assert_eq!(
        get_creds(&state, &caller(1001, 101, 40_002), "app-a", 2).await,
        key1
    );
    // Another app's first credentials.
    let key_b = get_creds(&state, &caller(1002, 200, 40_003), "app-b", 2).await;
    // A role that is not the caller's own: refused, and audited every time.
    let (status, token) = common::route(&state, &first, "PUT", "/latest/api/token", None).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..3 {
        let (status, _) = common::route(
            &state,
            &first,
            "GET",
            &format!("{CREDS}app-b"),
            Some(&token),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // Past min_remaining the cache fetches a new key: the known caller is audited again.
    clock.advance(DEFAULT_SESSION - DEFAULT_MIN_REMAINING + Duration::from_secs(1));
    let key2 = get_creds(&state, &first, "app-a", 4).await;
    assert_ne!(key2, key1);
    assert_eq!(sts.calls(), 3);
    sink.flush();

    let events: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["event"] != "sts.assume_role" && e["event"] != "token.issued")
        .collect();
    let got: Vec<(&str, u64, u64, &str)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["uid"].as_u64().unwrap(),
                e["pid"].as_u64().unwrap(),
                e["access_key_id"]
                    .as_str()
                    .or(e["reason"].as_str())
                    .unwrap(),
            )
        })
        .collect();
    let issued = "credentials.issued";
    let denied = "credentials.denied";
    assert_eq!(
        got,
        [
            (issued, 1001, 100, key1.as_str()),
            (issued, 1001, 101, key1.as_str()),
            (issued, 1002, 200, key_b.as_str()),
            (denied, 1001, 100, "role_mismatch"),
            (denied, 1001, 100, "role_mismatch"),
            (denied, 1001, 100, "role_mismatch"),
            (issued, 1001, 100, key2.as_str()),
        ]
    );
    assert_eq!(events[0]["app"], "app-a");
    assert_eq!(events[2]["app"], "app-b");

    // Every serve is counted, audited or not: 5 + 3 + 2 + 4 for app-a, 2 for app-b.
    let rendered = metrics.render();
    let served = |app: &str| {
        let series = format!("imds_broker_credentials_served_total{{app=\"{app}\"}} ");
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in\n{rendered}"))
            .trim()
            .to_owned()
    };
    assert_eq!(served("app-a"), "14");
    assert_eq!(served("app-b"), "2");
}

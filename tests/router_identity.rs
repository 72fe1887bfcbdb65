//! Identity-dependent routing, driven through the router with `oneshot` and a caller identity
//! injected per request, as the server does per connection: tokens are bound to the caller
//! that minted them, each uid gets its own role only, and non-local callers get nothing.

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{FakeSts, ManualClock};
use imds_broker::config::Config;
use imds_broker::identity::Caller;
use imds_broker::imds;
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;
use tower::ServiceExt;

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

fn state() -> (AppState, Arc<FakeSts>) {
    let config = Config::parse(CONFIG, Path::new("router.toml")).unwrap();
    let clock = ManualClock::new();
    let sts = FakeSts::new(clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    (
        AppState::new(config, key, sts.clone(), Arc::new(clock)),
        sts,
    )
}

fn local(uid: u32) -> Caller {
    Caller::local_uid(uid, "127.0.0.1:40000".parse().unwrap())
}

async fn token_for(state: &AppState, caller: &Caller) -> String {
    let (status, token) = common::route(state, caller, "PUT", "/latest/api/token", None).await;
    assert_eq!(status, StatusCode::OK);
    token
}

const LIST: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn each_uid_sees_only_its_own_role() {
    let (state, sts) = state();
    for (uid, role, account) in [
        (1001, "app-a", "111122223333"),
        (1002, "app-b", "444455556666"),
    ] {
        let caller = local(uid);
        let token = token_for(&state, &caller).await;
        assert_eq!(
            common::route(&state, &caller, "GET", LIST, Some(&token)).await,
            (StatusCode::OK, role.to_string())
        );
        let (status, body) = common::route(
            &state,
            &caller,
            "GET",
            &format!("{LIST}{role}"),
            Some(&token),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["AccountId"], account);
        // The other app's role name is simply not there for this caller.
        let other = if role == "app-a" { "app-b" } else { "app-a" };
        let (status, _) = common::route(
            &state,
            &caller,
            "GET",
            &format!("{LIST}{other}"),
            Some(&token),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let roles: Vec<_> = sts
        .inputs()
        .iter()
        .map(|i| i.role_arn.role_name().to_string())
        .collect();
    assert_eq!(roles, ["app-a", "app-b"]);
}

#[tokio::test]
async fn a_token_minted_by_one_app_is_refused_for_another() {
    let (state, sts) = state();
    let token_a = token_for(&state, &local(1001)).await;
    let (status, _) = common::route(&state, &local(1002), "GET", LIST, Some(&token_a)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = common::route(
        &state,
        &local(1002),
        "GET",
        &format!("{LIST}app-a"),
        Some(&token_a),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(sts.calls(), 0);
}

#[tokio::test]
async fn unmapped_remote_and_unresolved_callers_get_nothing() {
    let (state, sts) = state();
    let callers = [
        local(1003),
        Caller::Remote {
            peer: "10.200.0.2:5555".parse().unwrap(),
        },
        Caller::Unresolved {
            peer: "127.0.0.1:5555".parse().unwrap(),
            reason: "netlink unavailable".into(),
            uid: None,
            cgroup: None,
        },
        // app-a's own uid, but its process could not be identified: still nothing.
        Caller::Unresolved {
            peer: "127.0.0.1:5556".parse().unwrap(),
            reason: "the socket is held by 2 processes with different identities".into(),
            uid: Some(1001),
            cgroup: Some("/system.slice/a.service".into()),
        },
    ];
    for caller in &callers {
        let token = token_for(&state, caller).await;
        for path in [
            LIST,
            "/latest/meta-data/iam/security-credentials/app-a",
            "/latest/meta-data/iam/info",
        ] {
            let (status, _) = common::route(&state, caller, "GET", path, Some(&token)).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{caller}: {path}");
        }
    }
    assert_eq!(sts.calls(), 0);
}

#[tokio::test]
async fn a_request_without_connection_identity_is_refused() {
    let (state, _) = state();
    let request = Request::builder()
        .method("PUT")
        .uri("/latest/api/token")
        .header("x-aws-ec2-metadata-token-ttl-seconds", "60")
        .body(Body::empty())
        .unwrap();
    let response = imds::router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

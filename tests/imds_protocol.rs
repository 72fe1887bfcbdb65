//! The IMDS wire contract, request by request, against the real server on a loopback port
//! (`../shared/imds-protocol.md` rule ids in the test names' comments).

mod common;

use std::time::Duration;

use common::{Behavior, TestDaemon, config_text, unmapped_config_text};
use imds_broker::credentials::StsError;

const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn token_ttl_outside_1_to_21600_is_400() {
    // I-1.2.2
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    for bad in [
        "0",
        "21601",
        "abc",
        "-1",
        "1.5",
        "",
        "+5",
        "99999999999999999999",
    ] {
        let r = d.request("PUT", "/latest/api/token", &[(TTL, bad)]).await;
        assert_eq!(r.status, 400, "ttl {bad:?}: {r:?}");
    }
    let missing = d.request("PUT", "/latest/api/token", &[]).await;
    assert_eq!(missing.status, 400);
    let twice = d
        .request("PUT", "/latest/api/token", &[(TTL, "60"), (TTL, "60")])
        .await;
    assert_eq!(twice.status, 400, "two TTL headers are ambiguous");
}

#[tokio::test]
async fn token_is_visible_ascii_and_ttl_is_echoed() {
    // I-1.2.1, I-1.2.7, I-1.2.8, I-1.3.5 (Go sends the canonical header form)
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    for (name, ttl) in [
        (TTL, "1"),
        ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
    ] {
        let r = d.request("PUT", "/latest/api/token", &[(name, ttl)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header(TTL), Some(ttl));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("server"), Some("EC2ws"));
        assert!(r.body.len() >= 22, "token carries ≥128 bits: {}", r.body);
        assert!(r.body.bytes().all(|b| b.is_ascii_graphic()), "{:?}", r.body);
    }
    let a = d.token(60).await;
    let b = d.token(60).await;
    assert_ne!(a, b, "every token is fresh");
}

#[tokio::test]
async fn token_ttl_is_capped_by_config() {
    let d = TestDaemon::start(|s| config_text(s, "token_max_ttl = 300")).await;
    let r = d
        .request("PUT", "/latest/api/token", &[(TTL, "21600")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header(TTL), Some("300"));
}

#[tokio::test]
async fn forwarded_requests_are_403() {
    // I-1.2.3
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    for (k, v) in [
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.1"),
    ] {
        let put = d
            .request("PUT", "/latest/api/token", &[(TTL, "60"), (k, v)])
            .await;
        assert_eq!(put.status, 403, "{k} on PUT");
        let get = d
            .request(
                "GET",
                CREDS,
                &[("X-aws-ec2-metadata-token", token.as_str()), (k, v)],
            )
            .await;
        assert_eq!(get.status, 403, "{k} on GET");
    }
}

#[tokio::test]
async fn versioned_token_path_is_403_and_wrong_method_is_405() {
    // I-1.2.4, I-1.2.6, I-1.3.1
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let r = d
        .request("PUT", "/2021-03-23/api/token", &[(TTL, "60")])
        .await;
    assert_eq!(r.status, 403);
    for method in ["GET", "POST", "DELETE"] {
        let r = d.request(method, "/latest/api/token", &[(TTL, "60")]).await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("PUT"));
    }
    let token = d.token(60).await;
    let r = d
        .request(
            "POST",
            "/latest/meta-data/",
            &[("X-aws-ec2-metadata-token", token.as_str())],
        )
        .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn imdsv1_disabled_requires_a_valid_token() {
    // I-1.3.2, I-1.3.3 (required mode)
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    assert_eq!(
        d.request("GET", "/latest/meta-data/", &[]).await.status,
        401
    );
    assert_eq!(d.get("/latest/meta-data/", "not-a-token").await.status, 401);
    let token = d.token(60).await;
    assert_eq!(d.get("/latest/meta-data/", &token).await.status, 200);
    // The token check comes before routing: no path probing without a token.
    assert_eq!(d.request("GET", "/latest/nope", &[]).await.status, 401);
}

#[tokio::test]
async fn imdsv1_allowed_still_rejects_bad_tokens() {
    // I-1.3.2, I-1.3.3 (optional mode)
    let d = TestDaemon::start(|s| config_text(s, "imdsv1 = \"allowed\"")).await;
    let r = d.request("GET", CREDS, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "app-a");
    assert_eq!(d.get(CREDS, "forged").await.status, 401);
}

#[tokio::test]
async fn token_expires_after_its_ttl() {
    // T1: TTL 1 → a request 2 s later is 401. The daemon's clock is moved, not waited for.
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(1).await;
    assert_eq!(d.get(CREDS, &token).await.status, 200);
    d.clock.advance(Duration::from_secs(2));
    assert_eq!(d.get(CREDS, &token).await.status, 401);
}

#[tokio::test]
async fn token_ttl_is_real_time_whatever_the_wall_clock_does() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    // The wall clock goes back an hour: a 1 s token still dies 1 s later.
    let short = d.token(1).await;
    d.clock.step(-3600);
    assert_eq!(d.get(CREDS, &short).await.status, 200);
    d.clock.advance(Duration::from_secs(1));
    assert_eq!(d.get(CREDS, &short).await.status, 401);
    // It goes forward an hour: a 60 s token minted before is not cut short.
    let long = d.token(60).await;
    d.clock.step(3600);
    assert_eq!(d.get(CREDS, &long).await.status, 200);
    d.clock.advance(Duration::from_secs(59));
    assert_eq!(d.get(CREDS, &long).await.status, 200);
    d.clock.advance(Duration::from_secs(1));
    assert_eq!(d.get(CREDS, &long).await.status, 401);
}

#[tokio::test]
async fn tokens_survive_a_daemon_restart() {
    // I-1.3.4, T3: the key is persisted in the state dir.
    let first = TestDaemon::start(|s| config_text(s, "")).await;
    let token = first.token(21600).await;
    let (dir, clock, sts) = (first.dir.clone(), first.clock.clone(), first.sts.clone());
    first.stop().await;
    let second = TestDaemon::start_with(dir, |s| config_text(s, ""), clock, sts).await;
    assert_eq!(second.get(CREDS, &token).await.status, 200);
    // A different key (another state dir) does not accept it.
    let other = TestDaemon::start(|s| config_text(s, "")).await;
    assert_eq!(other.get(CREDS, &token).await.status, 401);
}

/// The AWS SDK for JavaScript v2 sends `//latest/api/token` when its endpoint ends in `/`.
#[tokio::test]
async fn a_doubled_leading_slash_is_the_same_path() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let put = d
        .request(
            "PUT",
            "//latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    let listing = d.get(&format!("/{CREDS}"), &put.body).await;
    assert_eq!((listing.status, listing.body.as_str()), (200, "app-a"));
    // Without a token the doubled path is still a metadata read: IMDSv1 stays off.
    let r = d.request("GET", &format!("/{CREDS}"), &[]).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn role_listing_is_the_role_name_without_newline() {
    // I-2.1.1, I-1.4.4
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    for path in [
        CREDS,
        "/latest/meta-data/iam/security-credentials",
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/iam/security-credentials-extended",
    ] {
        let r = d.get(path, &token).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body, "app-a", "{path}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
    assert_eq!(d.get(&format!("{CREDS}app-b"), &token).await.status, 404);
    assert_eq!(d.get(&format!("{CREDS}app-a/x"), &token).await.status, 404);
}

#[tokio::test]
async fn unmapped_caller_gets_404_and_no_iam_tree() {
    // I-2.1.1: no role → 404, the chain moves on; and STS is never asked.
    let d = TestDaemon::start(unmapped_config_text).await;
    let token = d.token(60).await;
    for path in [
        CREDS,
        "/latest/meta-data/iam/security-credentials/app-a",
        "/latest/meta-data/iam/security-credentials-extended/app-a",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/",
    ] {
        assert_eq!(d.get(path, &token).await.status, 404, "{path}");
    }
    let listing = d.get("/latest/meta-data/", &token).await;
    assert!(!listing.body.contains("iam"), "{}", listing.body);
    let doc = d
        .get("/latest/dynamic/instance-identity/document", &token)
        .await;
    assert!(
        doc.body.contains("\"accountId\": \"000000000000\""),
        "{}",
        doc.body
    );
    assert_eq!(d.sts.calls(), 0);
}

fn check_credential_json(body: &str, now: std::time::SystemTime) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    for field in [
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "Expiration",
        "LastUpdated",
    ] {
        assert!(v[field].is_string(), "{field} must be a string: {body}");
        assert!(!v[field].as_str().unwrap().is_empty(), "{field} empty");
    }
    assert_eq!(v["AccountId"], "111122223333");
    let exp = v["Expiration"].as_str().unwrap();
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let parsed = time::PrimitiveDateTime::parse(exp, format)
        .unwrap_or_else(|e| panic!("Expiration {exp:?}: {e}"))
        .assume_utc();
    let left = parsed - time::OffsetDateTime::from(now);
    assert!(left > time::Duration::minutes(25), "only {left} left");
    v
}

#[tokio::test]
async fn credentials_document_has_the_exact_shape() {
    // I-2.1.2 .. I-2.1.5, I-2.2.1, T5
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    let now = imds_broker::credentials::Clock::now(&d.clock);
    for path in [
        format!("{CREDS}app-a"),
        "/latest/meta-data/iam/security-credentials-extended/app-a".to_string(),
        format!("{CREDS}app-a/"),
    ] {
        let r = d.get(&path, &token).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("server"), Some("EC2ws"));
        check_credential_json(&r.body, now);
    }
    assert_eq!(d.sts.calls(), 1, "one AssumeRole serves every path");
    let input = &d.sts.inputs()[0];
    assert_eq!(input.role_arn.as_str(), common::ROLE_A);
    assert_eq!(input.duration, Duration::from_secs(3600));
    assert!(input.session_name.starts_with("app-a@"));
}

#[tokio::test]
async fn head_is_answered_without_a_body() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    let r = d.head("/latest/meta-data/placement/region", &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("9"), "length of us-east-1");
    assert_eq!(d.head("/latest/meta-data/", "bad").await.status, 401);
}

#[tokio::test]
async fn instance_metadata_paths_sdks_read() {
    // §2.3: region, AZ (botocore asks with a trailing slash), identity document, iam/info.
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    let body = |path: &'static str| {
        let token = token.clone();
        let d = &d;
        async move {
            let r = d.get(path, &token).await;
            assert_eq!(r.status, 200, "{path}");
            r.body
        }
    };
    assert_eq!(
        body("/latest/meta-data/placement/region").await,
        "us-east-1"
    );
    assert_eq!(
        body("/latest/meta-data/placement/availability-zone/").await,
        "us-east-1a"
    );
    assert!(
        body("/latest/meta-data/instance-id")
            .await
            .starts_with("i-")
    );
    let listing = body("/latest/meta-data/").await;
    assert!(!listing.ends_with('\n'));
    assert!(listing.lines().any(|l| l == "iam/"), "{listing}");
    assert!(listing.lines().any(|l| l == "placement/"), "{listing}");
    assert_eq!(body("/latest/dynamic/").await, "instance-identity/");
    let doc: serde_json::Value =
        serde_json::from_str(&body("/latest/dynamic/instance-identity/document").await).unwrap();
    assert_eq!(doc["region"], "us-east-1");
    assert_eq!(doc["accountId"], "111122223333");
    assert!(doc["pendingTime"].as_str().unwrap().ends_with('Z'));
    let info: serde_json::Value =
        serde_json::from_str(&body("/latest/meta-data/iam/info").await).unwrap();
    assert_eq!(info["Code"], "Success");
    assert_eq!(
        info["InstanceProfileArn"],
        "arn:aws:iam::111122223333:instance-profile/app-a"
    );
    assert!(
        info["InstanceProfileId"]
            .as_str()
            .unwrap()
            .starts_with("AIPA")
    );
    assert_eq!(d.get("/latest/meta-data/nope", &token).await.status, 404);
    assert_eq!(d.get("/latest/meta-data//iam", &token).await.status, 404);
    assert_eq!(d.get("/latest/user-data", &token).await.status, 404);
}

#[tokio::test]
async fn sts_failures_become_imds_shaped_5xx_never_empty_credentials() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    // Failing before the token PUT, which starts the caller's AssumeRole.
    d.sts.set(Behavior::Fail(StsError::Unavailable(
        "connection refused".into(),
    )));
    let token = d.token(60).await;
    let path = format!("{CREDS}app-a");
    let r = d.get(&path, &token).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("503 - Service Unavailable"), "{}", r.body);
    assert!(
        !r.body.contains("connection refused"),
        "detail stays in the log"
    );
}

#[tokio::test]
async fn access_denied_is_500_and_too_short_sessions_are_refused() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    // Refusing before the token PUT, which starts the caller's AssumeRole.
    d.sts.set(Behavior::Fail(StsError::Refused {
        code: "AccessDenied".into(),
        message: "not authorized to perform sts:AssumeRole".into(),
    }));
    let token = d.token(60).await;
    let path = format!("{CREDS}app-a");
    let r = d.get(&path, &token).await;
    assert_eq!(r.status, 500);
    assert!(!r.body.contains("AccessDenied"));

    // STS hands back a session with 10 minutes left: never served (botocore would treat it as
    // expired), even though it is not expired.
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    d.sts.set(Behavior::Issue {
        lifetime: Some(Duration::from_secs(600)),
    });
    let token = d.token(60).await;
    let r = d.get(&path, &token).await;
    assert_eq!(r.status, 500);
    assert!(!r.body.contains("ASIAFAKE"));
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_an_answer_not_a_crash() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let garbage = d.send("NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(garbage.status, 400);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = d.send(&huge).await;
    assert_eq!(r.status, 431, "oversized head");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(d.send(&many).await.status, 431, "too many headers");
    // The daemon still serves normal requests afterwards.
    let token = d.token(60).await;
    assert_eq!(d.get(CREDS, &token).await.status, 200);
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    use tokio::io::AsyncWriteExt;
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let mut stream = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    stream
        .write_all(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let token = common::read_response(&mut stream).await.body;
    let req = format!(
        "GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
    );
    for _ in 0..3 {
        stream.write_all(req.as_bytes()).await.unwrap();
        let r = common::read_response(&mut stream).await;
        assert_eq!((r.status, r.body.as_str()), (200, "app-a"));
    }
}

/// The caller's AssumeRole starts at its token PUT, before it asks for credentials; a second
/// PUT while credentials are cached costs STS nothing.
#[tokio::test]
async fn a_token_put_starts_the_callers_assume_role() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    assert_eq!(d.sts.calls(), 0, "no app is prefetched");
    let token = d.token(60).await;
    d.sts.wait_for_calls(1).await;
    let r = d
        .get("/latest/meta-data/iam/security-credentials/app-a", &token)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let _ = d.token(60).await;
    let _ = d
        .get("/latest/meta-data/iam/security-credentials/app-a", &token)
        .await;
    assert_eq!(
        d.sts.calls(),
        1,
        "one AssumeRole for the PUT and both reads"
    );
}

//! STS slow, hanging or black-holed (issue 17, fault 4): a credential request waits at most
//! `credentials.max_wait` for the AssumeRole call in flight, then gets an IMDS-shaped 503 with
//! `Retry-After` while the call goes on, so the caller's next try finds its result; one app
//! whose STS call hangs holds up no other app, no token PUT and no health check; and a real
//! STS client against an endpoint that never completes a connection, or never answers, ends
//! its attempt at the connect timeout or the attempt timeout.
//! Needs root for the second app's client (`setpriv` to another uid), like `identity_real.rs`.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ROLE_A, TestDaemon, cache_with_fake_sts, input};
use imds_broker::config::{Config, CredentialPolicy, DEFAULT_MAX_WAIT, STS_ATTEMPT_TIMEOUT};
use imds_broker::credentials::{
    CacheError, CredentialCache, CredentialSource, STS_CONNECT_TIMEOUT, StsError, SystemClock,
};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
/// The second app's uid: no user of that number is needed, rules match the number.
const UID_B: u32 = 61002;

#[test]
fn max_wait_defaults_below_every_sdks_one_second_and_is_read() {
    let parse = |credentials: &str| {
        Config::parse(
            &format!("[sts]\nregion = \"us-east-1\"\n[credentials]\n{credentials}\n"),
            Path::new("test.toml"),
        )
    };
    let default = parse("").unwrap().credentials.max_wait;
    assert_eq!(default, DEFAULT_MAX_WAIT);
    assert!(
        default < Duration::from_secs(1),
        "botocore, JS v3 and Rust read for 1 s"
    );
    let set = parse("max_wait = \"250ms\"").unwrap().credentials.max_wait;
    assert_eq!(set, Duration::from_millis(250));
    for bad in ["\"10s\"", "\"1m\"", "\"50ms\"", "0"] {
        let err = parse(&format!("max_wait = {bad}"))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("credentials.max_wait"), "{bad}: {err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_cut_at_max_wait_leaves_the_call_running_for_the_next_one() {
    let (cache, sts, _clock) = cache_with_fake_sts();
    let a = input("a");
    sts.close();
    let started = tokio::time::Instant::now();
    let first = cache.get(&a).await;
    assert!(
        matches!(first, Err(CacheError::Pending(w)) if w == DEFAULT_MAX_WAIT),
        "{first:?}"
    );
    assert_eq!(
        started.elapsed(),
        DEFAULT_MAX_WAIT,
        "cut at the bound, not later"
    );
    assert!(first.unwrap_err().is_transient(), "a 503, not a 500");
    // The SDK's retry comes while the call still runs: it joins the same call and gets the
    // credentials the moment STS answers, well before its own bound.
    let second = tokio::spawn({
        let cache = cache.clone();
        let a = a.clone();
        async move {
            let asked = tokio::time::Instant::now();
            (cache.get(&a).await, asked.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sts.open();
    let (second, waited) = second.await.unwrap();
    let creds = second.expect("the call that went on");
    assert_eq!(waited, Duration::from_millis(300));
    assert_eq!(sts.calls(), 1, "the cut request started no second call");
    // Cached from now on.
    let third = cache.get(&a).await.unwrap();
    assert_eq!(third.access_key_id, creds.access_key_id);
    assert_eq!(sts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_refresh_below_min_remaining_serves_the_last_good_ones_at_max_wait() {
    let (cache, sts, clock) = cache_with_fake_sts();
    let a = input("a");
    let good = cache.get(&a).await.unwrap();
    // 29 minutes left: below min_remaining, so the request waits for a refresh, which hangs.
    clock.advance(Duration::from_secs(31 * 60));
    sts.close();
    let started = tokio::time::Instant::now();
    let served = cache.get(&a).await.expect("the last good credentials");
    assert_eq!(started.elapsed(), DEFAULT_MAX_WAIT);
    assert_eq!(served.access_key_id, good.access_key_id);
    assert_eq!(cache.stats().degraded_serves, 1);
    sts.open();
}

fn two_apps(state_dir: &Path, max_wait: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"
# So that app A's credentials GET, not a token PUT, starts its STS call: the test waits for
# that call as the sign that A's request is waiting.
imdsv1 = "allowed"

[sts]
region = "us-east-1"

[credentials]
max_wait = "{max_wait}"

[[app]]
name = "app-a"
role_arn = "{ROLE_A}"
[app.match]
uid = {uid}

[[app]]
name = "app-b"
role_arn = "arn:aws:iam::111122223333:role/app-b"
[app.match]
uid = {UID_B}
"#,
        state = state_dir.display()
    )
}

/// A token PUT then a credentials GET for `app-b`, by bash (builtins only: no other process
/// shares its sockets) run as uid B; the GET's whole response.
async fn app_b_fetches(port: u16) -> String {
    let script = format!(
        r#"
crlf=$'\r\n'
exec 3<>/dev/tcp/127.0.0.1/{port}
printf 'PUT /latest/api/token HTTP/1.1%sHost: 169.254.169.254%sX-aws-ec2-metadata-token-ttl-seconds: 60%sConnection: close%s%s' "$crlf" "$crlf" "$crlf" "$crlf" "$crlf" >&3
token=
while IFS= read -r line <&3 || [ -n "$line" ]; do token=$line; line=; done
exec 3<&-
exec 3<>/dev/tcp/127.0.0.1/{port}
printf 'GET {CREDS}app-b HTTP/1.1%sHost: 169.254.169.254%sX-aws-ec2-metadata-token: %s%sConnection: close%s%s' "$crlf" "$crlf" "$token" "$crlf" "$crlf" "$crlf" >&3
while IFS= read -r line <&3 || [ -n "$line" ]; do printf '%s\n' "$line"; line=; done
"#
    );
    let uid = format!("--reuid={UID_B}");
    let gid = format!("--regid={UID_B}");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("setpriv")
            .args([&uid, &gid, "--clear-groups", "/usr/bin/bash", "-c", &script])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("app B's client finished")
    .expect("setpriv runs (the test needs root)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

async fn upstream_denials(admin: &imds_broker::config::AdminListen) -> u64 {
    let (status, metrics) = imds_broker::admin::fetch(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    metrics
        .lines()
        .find(|l| l.starts_with("imds_broker_denials_total{") && l.contains("reason=\"upstream\""))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_app_whose_sts_hangs_holds_up_no_other_app_token_or_health_check() {
    // Long enough that everything below fits inside A's wait on a busy host.
    let max_wait = Duration::from_secs(4);
    let d = TestDaemon::start(|s| two_apps(s, "4s")).await;
    let admin = d.state.config().admin.clone();
    let denied_before = upstream_denials(&admin).await;
    d.sts.hold("app-a");

    let a_started = Instant::now();
    let a = tokio::spawn({
        let addr = d.addr;
        async move {
            let raw = format!(
                "GET {CREDS}app-a HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
            );
            common::send_raw(addr, raw.as_bytes()).await
        }
    });
    // A's request has started A's STS call, which hangs: A is waiting from here on.
    d.sts.wait_for_calls(1).await;

    let health = imds_broker::admin::fetch(&admin, "/healthz").await.unwrap();
    assert_eq!(health, (200, "ok\n".to_owned()));
    let token = d.token(60).await;
    assert!(!token.is_empty());
    let b_started = Instant::now();
    let b = app_b_fetches(d.addr.port()).await;
    let b_took = b_started.elapsed();
    assert!(b.starts_with("HTTP/1.1 200"), "app B is served: {b}");
    assert!(b.contains("\"AccessKeyId\""), "{b}");
    assert_eq!(d.sts.calls_for("app-b"), 1);
    assert!(
        !a.is_finished(),
        "health, a token and app B were all served while A waited (B took {b_took:?})"
    );

    let a = a.await.unwrap();
    let a_took = a_started.elapsed();
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(a.body.contains("503 - Service Unavailable"), "{}", a.body);
    assert!(
        a_took >= max_wait && a_took < STS_ATTEMPT_TIMEOUT,
        "A was answered at the bound, not at the attempt timeout: {a_took:?}"
    );
    assert_eq!(
        upstream_denials(&admin).await,
        denied_before + 1,
        "the cut request is counted as a denial"
    );

    // STS answers A's call, which went on: A's next request is served with its result.
    d.sts.release("app-a");
    let again = d.get(&format!("{CREDS}app-a"), &token).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(d.sts.calls_for("app-a"), 1, "no second call for A");
    println!("app B served in {b_took:?} while app A waited {a_took:?}");
    d.stop().await;
}

/// A loopback listener whose accept queue is full, so further SYNs are dropped: a connection
/// to it never completes, as to a black-holed address. The fillers must stay open.
fn black_hole() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => fillers.push(s),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                return (addr, socket, fillers);
            }
        }
    }
    panic!("the accept queue never filled up");
}

#[tokio::test]
async fn a_black_holed_sts_fails_at_the_connect_timeout_whatever_the_behavior_version() {
    let (addr, _listener, _fillers) = black_hole();
    let url = format!("http://{addr}");
    #[allow(deprecated)]
    let older = aws_config::BehaviorVersion::v2025_08_07();
    let call = |behavior| {
        let source = common::sts_client(&url, behavior);
        async move {
            let started = Instant::now();
            let result =
                tokio::time::timeout(STS_ATTEMPT_TIMEOUT, source.assume_role(input("app-a"))).await;
            (result, started.elapsed())
        }
    };
    // Both at once: the test costs one connect timeout.
    let (latest, older) = tokio::join!(call(aws_config::BehaviorVersion::latest()), call(older));
    for (name, (result, took)) in [("latest", latest), ("2025-08-07", older)] {
        let result = result.unwrap_or_else(|_| {
            panic!("{name}: the connect was still hanging after {STS_ATTEMPT_TIMEOUT:?}")
        });
        assert!(
            matches!(result, Err(StsError::Unavailable(_))),
            "{name}: {result:?}"
        );
        assert!(
            took >= STS_CONNECT_TIMEOUT && took < STS_CONNECT_TIMEOUT + Duration::from_secs(2),
            "{name}: failed after {took:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn an_sts_that_accepts_and_never_answers_ends_at_the_attempt_timeout() {
    // The kernel completes the handshake and takes the request; nobody ever reads it.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let source: Arc<dyn CredentialSource> = Arc::new(common::sts_client(
        &url,
        aws_config::BehaviorVersion::latest(),
    ));
    // A caller that would wait longer than the attempt: it sees how the attempt ends.
    let patient = CredentialPolicy {
        max_wait: STS_ATTEMPT_TIMEOUT * 2,
        ..CredentialPolicy::default()
    };
    let cache = CredentialCache::new(source, Arc::new(SystemClock), patient);
    let started = Instant::now();
    let result = cache.get(&input("app-a")).await;
    let took = started.elapsed();
    assert!(
        matches!(&result, Err(CacheError::Sts(StsError::Unavailable(m))) if m.contains("no answer")),
        "{result:?}"
    );
    assert!(
        took >= STS_ATTEMPT_TIMEOUT && took < STS_ATTEMPT_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
    cache.shutdown().await;
}

//! Hostile and excessive input: relayed and browser requests, foreign Host names (DNS
//! rebinding), per-caller request rates, connection caps, and the hop limit on what the daemon
//! sends.

mod common;

use common::{TestDaemon, config_text};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LIST: &str = "/latest/meta-data/iam/security-credentials/";
const TTL: (&str, &str) = ("X-aws-ec2-metadata-token-ttl-seconds", "60");

fn with_limits(limits: &'static str) -> impl FnOnce(&std::path::Path) -> String {
    move |state| format!("{}\n[limits]\n{limits}\n", config_text(state, ""))
}

#[tokio::test]
async fn browser_requests_are_refused_on_every_path() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let token = d.token(60).await;
    for marker in [
        ("Origin", "http://evil.example"),
        ("Referer", "http://evil.example/page"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "cors"),
    ] {
        let put = d.request("PUT", "/latest/api/token", &[TTL, marker]).await;
        assert_eq!(put.status, 403, "{marker:?} on PUT");
        let get = d
            .request("GET", LIST, &[("X-aws-ec2-metadata-token", &token), marker])
            .await;
        assert_eq!(get.status, 403, "{marker:?} on GET");
        assert!(!get.body.contains("app-a"));
    }
}

#[tokio::test]
async fn only_the_daemons_own_host_names_are_accepted() {
    let d = TestDaemon::start(|s| config_text(s, "allowed_hosts = [\"imds.internal\"]")).await;
    let port = d.addr.port();
    let send = |host: String| {
        let raw = format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
        );
        let addr = d.addr;
        async move { common::send_raw(addr, raw.as_bytes()).await.status }
    };
    for good in [
        "169.254.169.254".to_string(),
        "169.254.169.254:80".into(),
        "[fd00:ec2::254]".into(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "IMDS.internal".into(),
    ] {
        assert_eq!(send(good.clone()).await, 200, "{good}");
    }
    for bad in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "10.1.2.3".into(),
        "169.254.169.254.nip.io".into(),
    ] {
        assert_eq!(send(bad.clone()).await, 403, "{bad}");
    }
}

/// The security review's "also seen": both of these were served.
#[tokio::test]
async fn a_second_host_or_an_absolute_target_is_refused() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let send = |target: &str, hosts: &[&str]| {
        let hosts: String = hosts.iter().map(|h| format!("Host: {h}\r\n")).collect();
        let raw = format!(
            "PUT {target} HTTP/1.1\r\n{hosts}X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
        );
        let addr = d.addr;
        async move { common::send_raw(addr, raw.as_bytes()).await }
    };
    let own = "169.254.169.254";
    let ok = send("/latest/api/token", &[own]).await;
    assert_eq!(ok.status, 200, "the control request is served");
    for hosts in [[own, "evil.example"], ["evil.example", own], [own, own]] {
        let r = send("/latest/api/token", &hosts).await;
        assert_eq!(r.status, 403, "{hosts:?}");
    }
    for target in [
        "http://evil.example/latest/api/token",
        "http://169.254.169.254/latest/api/token",
    ] {
        let r = send(target, &[own]).await;
        assert_eq!(r.status, 403, "{target}");
    }
}

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_with_retry_after() {
    let d = TestDaemon::start(with_limits("requests_per_second = 1\nburst = 3")).await;
    for i in 0..3 {
        let r = d.request("PUT", "/latest/api/token", &[TTL]).await;
        assert_eq!(r.status, 200, "request {i} is within the burst");
    }
    let r = d.request("PUT", "/latest/api/token", &[TTL]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(r.body.contains("429 - Too Many Requests"));
}

/// Opens a keep-alive connection and completes one request on it, so the daemon has resolved
/// and counted it.
async fn open_counted(d: &TestDaemon) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let r = common::read_response(&mut s).await;
    if r.status == 200 {
        Ok(s)
    } else {
        Err(r.status)
    }
}

#[tokio::test]
async fn connections_per_caller_are_capped_and_released() {
    let d = TestDaemon::start(with_limits("max_connections_per_caller = 2")).await;
    let first = open_counted(&d).await.unwrap();
    let _second = open_counted(&d).await.unwrap();
    assert_eq!(
        open_counted(&d).await.unwrap_err(),
        503,
        "third connection refused"
    );
    drop(first);
    // The slot comes back when the daemon sees the close; a bounded retry waits for that event.
    let mut reopened = None;
    for _ in 0..200 {
        if let Ok(s) = open_counted(&d).await {
            reopened = Some(s);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(reopened.is_some(), "a closed connection frees its slot");
}

#[tokio::test]
async fn total_connections_are_capped() {
    let d = TestDaemon::start(with_limits("max_connections = 1")).await;
    let _only = open_counted(&d).await.unwrap();
    assert_eq!(open_counted(&d).await.unwrap_err(), 503);
}

#[tokio::test]
async fn hop_limit_is_set_on_every_listener() {
    for (listen, hops) in [("127.0.0.1:0", 1), ("[::1]:0", 3), ("[::]:0", 2)] {
        let listeners = imds_broker::server::bind(&[listen.parse().unwrap()], hops)
            .await
            .unwrap();
        let sock = socket2::SockRef::from(&listeners[0]);
        if listen.starts_with('[') {
            assert_eq!(sock.unicast_hops_v6().unwrap(), hops, "{listen}");
        }
        if !listen.starts_with("[::1]") {
            assert_eq!(sock.ttl_v4().unwrap(), hops, "{listen}");
        }
    }
}

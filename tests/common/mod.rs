//! Shared test harness: an in-process daemon on an ephemeral loopback port, a fake STS that
//! can be slowed, failed or counted, a clock the test moves by hand, and a raw HTTP/1.1 client
//! that sends exactly the bytes a test writes.
#![allow(dead_code)]

pub mod audit;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use imds_broker::audit::sink::AuditSink;
use imds_broker::config::Config;
use imds_broker::credentials::{
    AssumeRoleInput, Clock, CredentialSource, Credentials, StsError, StsSource,
};
use imds_broker::daemon::{self, Stopped};
use imds_broker::secret::Secret;
use imds_broker::shutdown::Tasks;
use imds_broker::signal::Hangups;
use imds_broker::state::AppState;
use imds_broker::time::BootTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub const ROLE_A: &str = "arn:aws:iam::111122223333:role/app-a";

/// The AssumeRole input of a one-hour session for `role` in account 111122223333.
pub fn input(role: &str) -> AssumeRoleInput {
    AssumeRoleInput {
        role_arn: format!("arn:aws:iam::111122223333:role/{role}")
            .parse()
            .unwrap(),
        session_name: format!("{role}@host"),
        duration: Duration::from_secs(3600),
        source_identity: Some(role.to_owned()),
        tags: vec![("imds-broker:app".into(), role.to_owned())],
        policy: None,
        policy_arns: vec![],
    }
}

/// A credential cache in front of a fake STS, both on a hand-moved clock, default policy.
pub fn cache_with_fake_sts() -> (
    Arc<imds_broker::credentials::CredentialCache>,
    Arc<FakeSts>,
    ManualClock,
) {
    let clock = ManualClock::new();
    let sts = FakeSts::new(clock.clone());
    let cache = imds_broker::credentials::CredentialCache::new(
        sts.clone(),
        Arc::new(clock.clone()),
        imds_broker::config::CredentialPolicy::default(),
    );
    (Arc::new(cache), sts, clock)
}

/// A wall clock and a boot clock that only move when the test says so: `advance` is time
/// passing (both move), `step` an NTP step (the wall clock only).
#[derive(Clone)]
pub struct ManualClock(Arc<Mutex<(SystemTime, BootTime)>>);

impl ManualClock {
    pub fn new() -> Self {
        // Whole seconds, so IMDS timestamps of "now + n" are exact.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Self(Arc::new(Mutex::new((
            SystemTime::UNIX_EPOCH + Duration::from_secs(now),
            BootTime::now(),
        ))))
    }

    pub fn advance(&self, by: Duration) {
        let mut clocks = self.0.lock().unwrap();
        clocks.0 += by;
        clocks.1 = clocks.1 + by;
    }

    /// Steps the wall clock by `secs` (either way); no time passes.
    pub fn step(&self, secs: i64) {
        let mut clocks = self.0.lock().unwrap();
        let by = Duration::from_secs(secs.unsigned_abs());
        clocks.0 = if secs >= 0 {
            clocks.0 + by
        } else {
            clocks.0 - by
        };
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.0.lock().unwrap().0
    }

    fn boot_time(&self) -> BootTime {
        self.0.lock().unwrap().1
    }
}

/// What the fake STS does on its next calls.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Issue credentials valid for the requested duration (or this override).
    Issue {
        lifetime: Option<Duration>,
    },
    Fail(StsError),
}

/// A wall clock that follows tokio's clock (paused in the tests that use it), so `tokio::time`
/// drives the cache, its refresher, its retries and the credentials' expiry together.
#[derive(Clone)]
pub struct TokioWall {
    /// The wall-clock time at the tokio instant the clock was made.
    pub base: SystemTime,
    /// The boot clock then.
    boot: BootTime,
    start: tokio::time::Instant,
}

impl TokioWall {
    pub fn new() -> Self {
        Self {
            base: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            boot: BootTime::now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioWall {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }

    fn boot_time(&self) -> BootTime {
        self.boot + self.start.elapsed()
    }
}

/// An in-process STS stand-in: a default behaviour and a queue of one-off behaviours for the
/// next calls, an optional latency (in tokio time), a log of every call and when it was made;
/// it can hold every call until released, and issues unique credentials whose expiry follows
/// its clock.
pub struct FakeSts {
    clock: Arc<dyn Clock>,
    latency: Duration,
    behavior: Mutex<Behavior>,
    script: Mutex<VecDeque<Behavior>>,
    calls: Mutex<Vec<(SystemTime, AssumeRoleInput)>>,
    /// Level-triggered, so a call that starts after `open` never waits.
    gate: watch::Sender<bool>,
    /// Roles whose calls wait (including ones already started) until released.
    held: watch::Sender<HashSet<String>>,
    called: Notify,
}

impl FakeSts {
    pub fn new(clock: ManualClock) -> Arc<Self> {
        Self::with_clock(Arc::new(clock), Duration::ZERO)
    }

    pub fn with_clock(clock: Arc<dyn Clock>, latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            clock,
            latency,
            behavior: Mutex::new(Behavior::Issue { lifetime: None }),
            script: Mutex::new(VecDeque::new()),
            calls: Mutex::new(Vec::new()),
            gate: watch::Sender::new(true),
            held: watch::Sender::new(HashSet::new()),
            called: Notify::new(),
        })
    }

    /// What every call does from now on, unless [`FakeSts::then`] queued something.
    pub fn set(&self, behavior: Behavior) {
        *self.behavior.lock().unwrap() = behavior;
    }

    /// What the next call does (queued, once).
    pub fn then(&self, behavior: Behavior) {
        self.script.lock().unwrap().push_back(behavior);
    }

    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn inputs(&self) -> Vec<AssumeRoleInput> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, i)| i.clone())
            .collect()
    }

    pub fn call_times(&self) -> Vec<SystemTime> {
        self.calls.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }

    pub fn calls_for(&self, role: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, i)| i.role_arn.role_name() == role)
            .count()
    }

    /// Makes calls wait (including ones already started) until [`FakeSts::open`].
    pub fn close(&self) {
        self.gate.send_replace(false);
    }

    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Makes calls for `role` (by role name) wait, including ones already started, until
    /// [`FakeSts::release`]; other roles are answered as usual.
    pub fn hold(&self, role: &str) {
        self.held.send_modify(|held| {
            held.insert(role.to_owned());
        });
    }

    pub fn release(&self, role: &str) {
        self.held.send_modify(|held| {
            held.remove(role);
        });
    }

    /// Waits until at least `n` calls have been made (an event, not a sleep).
    pub async fn wait_for_calls(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.called.notified();
                if self.calls() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("fake STS was not called in time");
    }
}

impl CredentialSource for FakeSts {
    fn assume_role(
        &self,
        input: AssumeRoleInput,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((self.clock.now(), input.clone()));
            calls.len()
        };
        self.called.notify_waiters();
        let behavior = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.behavior.lock().unwrap().clone());
        let mut gate = self.gate.subscribe();
        let mut held = self.held.subscribe();
        let role = input.role_arn.role_name().to_owned();
        let clock = self.clock.clone();
        let latency = self.latency;
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            // Err only if the fake is gone; then nobody is waiting for the answer anyway.
            let _ = gate.wait_for(|open| *open).await;
            let _ = held.wait_for(|held| !held.contains(&role)).await;
            match behavior {
                Behavior::Fail(e) => Err(e),
                Behavior::Issue { lifetime } => {
                    let now = clock.now();
                    Ok(Credentials {
                        access_key_id: format!("ASIAFAKE{n:012}"),
                        secret_access_key: Secret::new(format!(
                            "fake-secret-{n}-{}",
                            "x".repeat(24)
                        )),
                        session_token: Secret::new(format!("fake-session-token-{n}")),
                        expiration: now + lifetime.unwrap_or(input.duration),
                        issued_at: now,
                        rendered: Default::default(),
                    })
                }
            }
        }
        .boxed()
    }
}

/// Config text for tests: an app mapped to this test process's own uid, so every connection the
/// test makes is that app.
pub fn config_text(state_dir: &Path, extra_server: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"
{extra_server}

[sts]
region = "us-east-1"

[[app]]
name = "app-a"
role_arn = "{ROLE_A}"
[app.match]
uid = {uid}
"#,
        state = state_dir.display()
    )
}

/// Config text in which no rule matches this test process.
pub fn unmapped_config_text(state_dir: &Path) -> String {
    config_text(state_dir, "").replace(
        &format!("uid = {}", nix::unistd::geteuid().as_raw()),
        "uid = 4000000",
    )
}

/// A running in-process daemon, wired by the same [`imds_broker::daemon::run`] as the binary
/// (refresher, reloader, container token rotation, admin listener, audit file), with a fake STS
/// and a hand-moved clock.
pub struct TestDaemon {
    pub addr: SocketAddr,
    /// The container endpoint, when the config has `[container]`.
    pub container_addr: Option<SocketAddr>,
    pub state: AppState,
    pub sts: Arc<FakeSts>,
    pub clock: ManualClock,
    pub dir: Arc<tempfile::TempDir>,
    /// The root of the daemon's shutdown tree.
    pub tasks: Tasks,
    /// Sends a reload request (what SIGHUP is to the binary).
    pub reload: mpsc::Sender<()>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Stopped>>,
}

impl TestDaemon {
    pub async fn start(config: impl FnOnce(&Path) -> String) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let clock = ManualClock::new();
        let sts = FakeSts::new(clock.clone());
        Self::start_with(dir, config, clock, sts).await
    }

    pub async fn start_with(
        dir: Arc<tempfile::TempDir>,
        config: impl FnOnce(&Path) -> String,
        clock: ManualClock,
        sts: Arc<FakeSts>,
    ) -> Self {
        let state_dir = dir.path().join("state");
        let text = config(&state_dir);
        let config = Config::parse(&text, &PathBuf::from("test.toml")).expect("valid test config");
        // The audit layer is not installed (tests share one process): the file is opened,
        // reopened on reload and closed on stop, but receives no events.
        let (unstarted, _layer) = AuditSink::prepare("test-host".into());
        let audit = daemon::open_audit(&config, unstarted).unwrap();
        let listeners = daemon::Listeners::bind(&config).await.unwrap();
        let (reload, hangups) = Hangups::channel();
        let services = daemon::Services {
            source: sts.clone(),
            clock: Arc::new(clock.clone()),
            hangups,
            audit: Some(audit),
            announce: false,
            watchdog: None,
            own: None,
        };
        let daemon = daemon::start(config, listeners, services).await.unwrap();
        let imds_count = daemon.state().config().server.listen.len();
        let addr = daemon.local_addrs()[0];
        let container_addr = daemon.local_addrs().get(imds_count).copied();
        let state = daemon.state().clone();
        let tasks = daemon.tasks().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            container_addr,
            state,
            sts,
            clock,
            dir,
            tasks,
            reload,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the daemon and waits until it has drained, background work included: nothing of
    /// its shutdown tree may be left.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let stopped = self.task.take().unwrap().await.unwrap();
        assert_eq!(stopped, Stopped::default(), "the daemon drained");
        assert!(self.tasks.is_empty(), "{:?}", self.tasks.running());
    }

    pub async fn send(&self, raw: &str) -> RawResponse {
        send_raw(self.addr, raw.as_bytes()).await
    }

    /// Sends a HEAD request: the response has a length but no body.
    pub async fn head(&self, path: &str, token: &str) -> RawResponse {
        let raw = format!(
            "HEAD {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
        );
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        read_head(&mut stream).await.0
    }

    /// A request with `Connection: close` and the given extra header lines.
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("Connection: close\r\n\r\n");
        self.send(&raw).await
    }

    pub async fn token(&self, ttl: u64) -> String {
        let r = self
            .request(
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())],
            )
            .await;
        assert_eq!(r.status, 200, "token PUT failed: {r:?}");
        r.body
    }

    pub async fn get(&self, path: &str, token: &str) -> RawResponse {
        self.request("GET", path, &[("X-aws-ec2-metadata-token", token)])
            .await
    }
}

/// One request straight through the IMDS router as `caller` (the identity the server would
/// have resolved for the connection); the status and body. A PUT asks for a 60 s token.
pub async fn route(
    state: &AppState,
    caller: &imds_broker::identity::Caller,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (axum::http::StatusCode, String) {
    use tower::ServiceExt;
    let mut request = axum::http::Request::builder().method(method).uri(path);
    if method == "PUT" {
        request = request.header("x-aws-ec2-metadata-token-ttl-seconds", "60");
    }
    if let Some(t) = token {
        request = request.header("x-aws-ec2-metadata-token", t);
    }
    let mut request = request.body(axum::body::Body::empty()).unwrap();
    request
        .extensions_mut()
        .insert(imds_broker::identity::ConnectionInfo::new(
            caller.clone(),
            "169.254.169.254:80".parse().unwrap(),
        ));
    let response = imds_broker::imds::router(state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `raw` and reads the first response on the connection.
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    read_response(&mut stream).await
}

/// Reads one HTTP/1.1 response (Content-Length framed, or to EOF).
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let (mut response, mut body) = read_head(stream).await;
    let length = response
        .header("content-length")
        .map(|v| v.parse::<usize>().unwrap());
    match length {
        Some(len) => {
            while body.len() < len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "body cut short");
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            stream.read_to_end(&mut body).await.unwrap();
        }
    }
    response.body = String::from_utf8(body).unwrap();
    response
}

/// Reads a response head; returns it (with an empty body) and the bytes read past it.
async fn read_head(stream: &mut TcpStream) -> (RawResponse, Vec<u8>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let rest = buf[head_end + 4..].to_vec();
    (
        RawResponse {
            status,
            headers,
            body: String::new(),
        },
        rest,
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A real STS client (aws-sdk-sts) for `url` under `behavior`, with test source credentials
/// (the daemon uses the latest behavior version).
pub fn sts_client(url: &str, behavior: aws_config::BehaviorVersion) -> StsSource {
    let shared = aws_types::SdkConfig::builder()
        .behavior_version(behavior)
        .region(aws_types::region::Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::for_tests_with_session_token(),
            ),
        )
        .build();
    StsSource::from_shared(&shared, Some(url))
}

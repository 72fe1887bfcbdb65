//! The client against a fake runtime: an axum app on a Unix socket serving canned Docker
//! Engine API answers and an event stream each test feeds.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::*;

const A: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";
const B: &str = "0c6e1f0fe6e4e8ec4cb4d75a4fd50a5b53e16b0e48b0ee3cf7d3b3e4d1f1e2a3";
const MISSING: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

/// Long enough for anything these tests wait on; a wait that reaches it is a failure.
const PATIENCE: Duration = Duration::from_secs(60);

/// One event connection: what the test sends is the stream's body; dropping it ends it.
type Feed = mpsc::UnboundedSender<Bytes>;

struct Fake {
    containers: Mutex<Vec<Value>>,
    /// Inspect requests received.
    inspects: watch::Sender<usize>,
    /// When set, each inspect waits for a permit before answering.
    hold: Option<Semaphore>,
    /// Answer every inspect with this document instead.
    misroute: Mutex<Option<Value>>,
    oversize: AtomicBool,
    events_refused: AtomicBool,
    events_queries: Mutex<Vec<String>>,
    /// When each event stream request came, on the test's clock.
    events_asked: watch::Sender<Vec<tokio::time::Instant>>,
    feeds: mpsc::UnboundedSender<Feed>,
}

fn document(id: &str, name: &str, labels: Value) -> Value {
    json!({
        "Id": id,
        "Name": format!("/{name}"),
        "Config": {"Image": "registry.example/web:1.4", "Labels": labels},
        "State": {"Pid": 4242, "Running": true},
    })
}

async fn inspect_route(
    State(fake): State<Arc<Fake>>,
    UrlPath(asked): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    // As dockerd: an HTTP/1.1 request without a Host is refused.
    if headers.get(header::HOST).is_none_or(|h| h != "localhost") {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "no Host"}))).into_response();
    }
    fake.inspects.send_modify(|n| *n += 1);
    if let Some(hold) = &fake.hold
        && let Ok(permit) = hold.acquire().await
    {
        permit.forget();
    }
    if fake.oversize.load(Ordering::SeqCst) {
        let pad = "x".repeat(2 * MAX_RESPONSE_BYTES);
        return Json(document(A, "web", json!({ "pad": pad }))).into_response();
    }
    if let Some(document) = fake.misroute.lock().unwrap().clone() {
        return Json(document).into_response();
    }
    let containers = fake.containers.lock().unwrap().clone();
    let found = containers.iter().find(|c| {
        let id = c["Id"].as_str().unwrap_or_default();
        id.starts_with(&asked) || c["Name"].as_str() == Some(&format!("/{asked}"))
    });
    match found {
        Some(document) => Json(document).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": format!("No such container: {asked}")})),
        )
            .into_response(),
    }
}

async fn events_route(State(fake): State<Arc<Fake>>, RawQuery(query): RawQuery) -> Response {
    fake.events_queries
        .lock()
        .unwrap()
        .push(query.unwrap_or_default());
    let now = tokio::time::Instant::now();
    fake.events_asked.send_modify(|asked| asked.push(now));
    if fake.events_refused.load(Ordering::SeqCst) {
        let body = Json(json!({"message": "events are off"}));
        return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
    }
    let (feed, lines) = mpsc::unbounded_channel::<Bytes>();
    let _ = fake.feeds.send(feed);
    let body = futures_util::stream::unfold(lines, |mut lines| async move {
        let chunk = lines.recv().await?;
        Some((Ok::<_, Infallible>(chunk), lines))
    });
    Body::from_stream(body).into_response()
}

struct Harness {
    fake: Arc<Fake>,
    socket: PathBuf,
    runtime: Arc<Runtime>,
    feeds: mpsc::UnboundedReceiver<Feed>,
    dir: tempfile::TempDir,
}

async fn harness(hold: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let (feeds_tx, feeds) = mpsc::unbounded_channel();
    let fake = Arc::new(Fake {
        containers: Mutex::new(vec![
            document(A, "web", json!({"app": "billing", "tier": "1"})),
            document(B, "db", json!({"app": "db"})),
        ]),
        inspects: watch::Sender::new(0),
        hold: hold.then(|| Semaphore::new(0)),
        misroute: Mutex::new(None),
        oversize: AtomicBool::new(false),
        events_refused: AtomicBool::new(false),
        events_queries: Mutex::new(Vec::new()),
        events_asked: watch::Sender::new(Vec::new()),
        feeds: feeds_tx,
    });
    let app = Router::new()
        .route("/containers/{name}/json", get(inspect_route))
        .route("/events", get(events_route))
        .with_state(fake.clone());
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let runtime = Arc::new(Runtime::new(vec![socket.clone()]));
    Harness {
        fake,
        socket,
        runtime,
        feeds,
        dir,
    }
}

impl Harness {
    fn inspects(&self) -> usize {
        *self.fake.inspects.borrow()
    }

    fn set_labels(&self, id: &str, labels: Value) {
        let mut containers = self.fake.containers.lock().unwrap();
        let container = containers.iter_mut().find(|c| c["Id"] == id).unwrap();
        container["Config"]["Labels"] = labels;
    }

    /// Starts `watch_events` and waits until its stream is connected; the stream's feed, and
    /// the trigger that stops it.
    async fn follow_events(&mut self) -> (Feed, oneshot::Sender<()>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let watching = self.runtime.clone().watch_events(async {
            let _ = stopped.await;
        });
        tokio::spawn(watching);
        let feed = self.next_feed().await;
        (feed, stop)
    }

    /// The next event connection, once the client has taken it as connected.
    async fn next_feed(&mut self) -> Feed {
        let feed = within(self.feeds.recv()).await.unwrap();
        self.wait_status(|s| s.connected).await;
        feed
    }

    async fn wait_status(&self, done: impl FnMut(&cache::Status) -> bool) {
        let mut status = self.runtime.inner.cache.subscribe();
        within(status.wait_for(done)).await.unwrap();
    }

    async fn send_event(&self, feed: &Feed, id: &str, action: &str) {
        let before = self.runtime.inner.cache.status().events;
        let event = json!({
            "Type": "container", "Action": action, "status": action, "id": id,
            "Actor": {"ID": id, "Attributes": {"name": "web"}},
        });
        feed.send(Bytes::from(format!("{event}\n"))).unwrap();
        self.wait_status(|s| s.events > before).await;
    }

    async fn labels(&self, id: &str) -> BTreeMap<String, String> {
        self.runtime.inspect(id).await.unwrap().labels.clone()
    }
}

async fn within<F: std::future::IntoFuture>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("waited too long")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn inspect_reads_name_image_and_labels_and_tolerates_what_runtimes_leave_out() {
    let h = harness(false).await;
    let meta = h.runtime.inspect(A).await.unwrap();
    assert_eq!(
        *meta,
        ContainerMeta {
            id: A.to_owned(),
            name: "web".to_owned(),
            image: "registry.example/web:1.4".to_owned(),
            labels: labels(&[("app", "billing"), ("tier", "1")]),
        }
    );
    assert_eq!(h.runtime.socket_in_use(), Some(h.socket.clone()));

    // Docker's `"Labels": null`; podman's --rootfs container without an image; a stopped one.
    h.fake.containers.lock().unwrap().push(json!({
        "Id": MISSING, "Name": "/bare",
        "Config": {"Labels": null},
        "State": {"Pid": 0, "Running": false},
    }));
    let bare = h.runtime.find("bare").await.unwrap();
    assert_eq!(
        bare,
        Inspected {
            meta: ContainerMeta {
                id: MISSING.to_owned(),
                name: "bare".to_owned(),
                image: String::new(),
                labels: BTreeMap::new(),
            },
            pid: None,
            running: false,
        }
    );
    let web = h.runtime.find("web").await.unwrap();
    assert_eq!((web.pid, web.running), (Some(4242), true));
    // By an id prefix, as `podman ps` prints it.
    assert_eq!(h.runtime.find(&B[..12]).await.unwrap().meta.name, "db");
}

#[test]
fn parsing_tolerates_missing_and_null_fields_but_not_a_missing_id() {
    let socket = Path::new("/run/docker.sock");
    let parsed = api::parse_inspect(socket, br#"{"Id":"x","Config":null,"State":null}"#).unwrap();
    assert_eq!(parsed.meta.id, "x");
    assert_eq!(parsed.meta.name, "");
    assert_eq!(parsed.pid, None);
    let parsed = api::parse_inspect(
        socket,
        br#"{"Id":"x","Name":"plain","Config":{"Image":null}}"#,
    )
    .unwrap();
    assert_eq!(parsed.meta.name, "plain");
    assert_eq!(parsed.meta.image, "");
    for bad in [
        &br#"{"Name":"/web"}"#[..],
        b"[]",
        b"not json",
        br#"{"Id":"x","State":{"Pid":"1"}}"#,
    ] {
        let error = api::parse_inspect(socket, bad).unwrap_err();
        assert!(
            error.to_string().contains("/run/docker.sock"),
            "{error} names no socket"
        );
    }
}

#[tokio::test]
async fn concurrent_lookups_of_one_container_share_one_request() {
    let h = harness(false).await;
    let answers = join_all((0..16).map(|_| h.runtime.inspect(A))).await;
    assert_eq!(h.inspects(), 1);
    let first = answers[0].as_ref().unwrap();
    for answer in &answers {
        assert!(Arc::ptr_eq(first, answer.as_ref().unwrap()));
    }
    // Another container is another request.
    let (a, b) = tokio::join!(h.runtime.inspect(A), h.runtime.inspect(B));
    assert_eq!(
        (a.unwrap().name.as_str(), b.unwrap().name.as_str()),
        ("web", "db")
    );
    assert_eq!(h.inspects(), 3);
}

#[tokio::test]
async fn answers_are_kept_only_while_the_event_stream_is_connected() {
    let mut h = harness(false).await;
    // No stream yet: every lookup asks.
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 2);
    assert!(!h.runtime.events_connected());

    let (feed, _stop) = h.follow_events().await;
    assert!(h.runtime.events_connected());
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 3);

    // The stream drops and cannot come back: every lookup asks again.
    h.fake.events_refused.store(true, Ordering::SeqCst);
    drop(feed);
    h.wait_status(|s| !s.connected).await;
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 5);

    // Back: what was fetched before is not trusted, what is fetched now is kept.
    h.fake.events_refused.store(false, Ordering::SeqCst);
    let _feed = h.next_feed().await;
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 6);

    // The stream asked for container events, from a moment before it connected.
    let queries = h.fake.events_queries.lock().unwrap().clone();
    let query = queries.last().unwrap();
    assert!(
        query.contains("filters=%7B%22type%22%3A%5B%22container%22%5D%7D"),
        "{query}"
    );
    let since: u64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("since="))
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(since < now && since + 10 > now, "since={since} now={now}");
}

#[tokio::test]
async fn an_event_drops_only_its_container() {
    let mut h = harness(false).await;
    let (feed, _stop) = h.follow_events().await;
    assert_eq!(h.labels(A).await["app"], "billing");
    h.set_labels(A, json!({"app": "payroll"}));
    // Kept: the change is not seen without its event.
    assert_eq!(h.labels(A).await["app"], "billing");
    h.send_event(&feed, B, "rename").await;
    assert_eq!(h.labels(A).await["app"], "billing");
    assert_eq!(h.inspects(), 1);

    h.send_event(&feed, A, "update").await;
    assert_eq!(h.labels(A).await["app"], "payroll");
    assert_eq!(h.inspects(), 2);
    // An event without a usable id drops everything.
    h.set_labels(A, json!({"app": "ledger"}));
    let before = h.runtime.inner.cache.status().events;
    feed.send(Bytes::from_static(
        br#"{"Type":"container","Action":"destroy","Actor":{}}"#,
    ))
    .unwrap();
    h.wait_status(|s| s.events > before).await;
    assert_eq!(h.labels(A).await["app"], "ledger");
}

#[tokio::test]
async fn an_answer_that_may_predate_an_event_is_not_kept() {
    let mut h = harness(true).await;
    let (feed, _stop) = h.follow_events().await;
    let runtime = h.runtime.clone();
    let first = tokio::spawn(async move { runtime.inspect(A).await });
    // The request is at the runtime when the container changes.
    let mut inspects = h.fake.inspects.subscribe();
    within(inspects.wait_for(|n| *n == 1)).await.unwrap();
    h.send_event(&feed, A, "rename").await;
    h.fake.hold.as_ref().unwrap().add_permits(3);
    first.await.unwrap().unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(
        h.inspects(),
        2,
        "the answer in flight during the event was kept"
    );
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 2);
}

#[tokio::test]
async fn an_unknown_container_is_not_found_and_not_kept() {
    let mut h = harness(false).await;
    let (_feed, _stop) = h.follow_events().await;
    for _ in 0..2 {
        let error = h.runtime.inspect(MISSING).await.unwrap_err();
        assert_eq!(
            error,
            RuntimeError::NotFound {
                id: MISSING.to_owned(),
                socket: h.socket.clone()
            }
        );
        assert!(error.to_string().contains(&*h.socket.to_string_lossy()));
    }
    assert_eq!(h.inspects(), 2);
    assert!(matches!(
        h.runtime.find("nobody").await,
        Err(RuntimeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn operator_lookups_are_never_cached() {
    let mut h = harness(false).await;
    let (_feed, _stop) = h.follow_events().await;
    h.runtime.find("web").await.unwrap();
    h.runtime.find("web").await.unwrap();
    h.runtime.find(A).await.unwrap();
    assert_eq!(h.inspects(), 3);
}

#[tokio::test]
async fn an_unreachable_runtime_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    // A socket file nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let runtime = Runtime::new(vec![missing.clone(), stale.clone()]);
    let error = runtime.inspect(A).await.unwrap_err();
    assert!(
        matches!(error, RuntimeError::Unreachable { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    for socket in [&missing, &stale] {
        assert!(message.contains(&*socket.to_string_lossy()), "{message}");
    }
    assert_eq!(runtime.socket_in_use(), None);
    let none = Runtime::new(Vec::new()).find("web").await.unwrap_err();
    assert!(none.to_string().contains("no runtime socket"), "{none}");
}

#[tokio::test]
async fn the_first_socket_that_answers_is_used() {
    let h = harness(false).await;
    let missing = h.dir.path().join("missing.sock");
    let runtime = Runtime::new(vec![missing, h.socket.clone()]);
    assert_eq!(runtime.socket_in_use(), None);
    assert_eq!(runtime.inspect(A).await.unwrap().name, "web");
    assert_eq!(runtime.socket_in_use(), Some(h.socket.clone()));
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("wedged.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        // Accepts, reads nothing, answers nothing, closes nothing.
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let runtime = Runtime::new(vec![socket.clone()]);
    let started = tokio::time::Instant::now();
    let error = within(runtime.inspect(A)).await.unwrap_err();
    assert_eq!(
        error,
        RuntimeError::Timeout {
            socket: socket.clone(),
            after: API_TIMEOUT
        }
    );
    assert!(error.to_string().contains("wedged.sock"), "{error}");
    let waited = started.elapsed();
    assert!(
        waited >= API_TIMEOUT && waited < API_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    let error = within(runtime.find("web")).await.unwrap_err();
    assert!(matches!(error, RuntimeError::Timeout { .. }), "{error:?}");
    // The event stream's headers are bounded too: it never counts as connected.
    let error = within(runtime.inner.api.stream("/events")).await.err();
    assert!(
        matches!(error, Some(RuntimeError::Timeout { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_oversized_answer_is_refused() {
    let h = harness(false).await;
    h.fake.oversize.store(true, Ordering::SeqCst);
    let error = h.runtime.inspect(A).await.unwrap_err();
    assert!(matches!(error, RuntimeError::Protocol(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("larger than"), "{message}");
    assert!(message.contains(&*h.socket.to_string_lossy()), "{message}");
}

#[tokio::test]
async fn names_that_could_leave_the_url_path_are_refused_without_a_request() {
    let h = harness(false).await;
    let upper = A.to_uppercase();
    for id in [
        "web",
        &A[..12],
        &upper,
        "../../version",
        "",
        &format!("{A}0"),
    ] {
        let error = h.runtime.inspect(id).await.unwrap_err();
        assert!(
            matches!(error, RuntimeError::BadId { .. }),
            "{id}: {error:?}"
        );
    }
    let long = "a".repeat(129);
    for name in ["a/b", "..", ".", "web?x=1", "web json", "", &long, "wéb"] {
        let error = h.runtime.find(name).await.unwrap_err();
        assert!(
            matches!(error, RuntimeError::BadId { .. }),
            "{name}: {error:?}"
        );
    }
    assert_eq!(h.inspects(), 0);
    h.runtime.find(&"a".repeat(128)).await.unwrap_err();
    h.runtime.find("web_1.blue-2").await.unwrap_err();
    assert_eq!(h.inspects(), 2);
}

#[tokio::test]
async fn an_answer_about_another_container_is_refused() {
    let h = harness(false).await;
    *h.fake.misroute.lock().unwrap() = Some(document(B, "db", json!({"app": "db"})));
    let error = h.runtime.inspect(A).await.unwrap_err();
    assert!(matches!(error, RuntimeError::Protocol(_)), "{error:?}");
    assert!(error.to_string().contains("answered about"), "{error}");
    let error = h.runtime.find("web").await.unwrap_err();
    assert!(matches!(error, RuntimeError::Protocol(_)), "{error:?}");
    // A container named like another's id is not that container.
    *h.fake.misroute.lock().unwrap() = Some(document(B, A, json!({})));
    assert!(h.runtime.inspect(A).await.is_err());
}

#[tokio::test]
async fn an_error_status_carries_the_runtimes_message() {
    let h = harness(false).await;
    h.fake.events_refused.store(true, Ordering::SeqCst);
    let error = h.runtime.inner.api.stream("/events").await.err().unwrap();
    assert_eq!(
        error,
        RuntimeError::Status {
            socket: h.socket.clone(),
            status: 500,
            message: "events are off".to_owned()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_event_stream_is_retried_with_capped_exponential_backoff() {
    let mut h = harness(false).await;
    h.fake.events_refused.store(true, Ordering::SeqCst);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(h.runtime.clone().watch_events(async {
        let _ = stopped.await;
    }));
    let mut asked = h.fake.events_asked.subscribe();
    let times = within(asked.wait_for(|a| a.len() >= 8))
        .await
        .unwrap()
        .clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mut expected = RETRY_FIRST;
    for gap in &gaps {
        assert!(
            *gap >= expected && *gap < expected + Duration::from_millis(100),
            "{gaps:?}"
        );
        expected = (expected * 2).min(RETRY_MAX);
    }
    // 250 ms doubling reaches the 10 s cap by the seventh retry.
    assert!(gaps[gaps.len() - 1] >= RETRY_MAX, "{gaps:?}");
    // Once it connects, the next failure is retried from the start again.
    h.fake.events_refused.store(false, Ordering::SeqCst);
    let feed = h.next_feed().await;
    let connected = tokio::time::Instant::now();
    drop(feed);
    let _feed = h.next_feed().await;
    let waited = tokio::time::Instant::now() - connected;
    assert!(
        waited < RETRY_FIRST + Duration::from_millis(100),
        "{waited:?}"
    );
    stop.send(()).unwrap();
}

#[tokio::test]
async fn stopping_the_watcher_stops_the_caching() {
    let mut h = harness(false).await;
    let (_feed, stop) = h.follow_events().await;
    stop.send(()).unwrap();
    h.wait_status(|s| !s.connected).await;
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(A).await.unwrap();
    assert_eq!(h.inspects(), 2);
}

#[tokio::test]
async fn requests_are_counted_by_call_and_outcome() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let h = harness(false).await;
    h.runtime.inspect(A).await.unwrap();
    h.runtime.inspect(MISSING).await.unwrap_err();
    h.runtime.find("web").await.unwrap();
    let text = handle.render();
    for line in [
        r#"imds_broker_runtime_requests_total{call="inspect",outcome="ok"} 1"#,
        r#"imds_broker_runtime_requests_total{call="inspect",outcome="not_found"} 1"#,
        r#"imds_broker_runtime_requests_total{call="find",outcome="ok"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

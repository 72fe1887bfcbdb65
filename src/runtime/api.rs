//! Requests to the runtime's Docker Engine API over its Unix socket, each bounded in time and
//! size, and the parts of the answers this daemon reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use super::{Inspected, RuntimeError};
use crate::identity::container::ContainerMeta;

/// Connect plus the whole answer (the headers, for the event stream). The runtime is a local
/// daemon that answers an inspect in milliseconds, a busy one well within this; past it the
/// runtime is wedged, and the caller's credential request, which waits on the answer, fails
/// instead of hanging.
pub const API_TIMEOUT: Duration = Duration::from_secs(2);

/// An inspect document is a few KiB even with many labels; this bounds what a hostile or
/// broken runtime can make the daemon buffer, per answer and per event.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Longer than any name or id a runtime makes (ids are 64 characters).
const MAX_NAME_LEN: usize = 128;

/// The sockets to try, and the one that last answered.
pub(super) struct Client {
    sockets: Vec<PathBuf>,
    in_use: Mutex<Option<PathBuf>>,
}

/// What an inspect asks by, so the answer can be checked to be about that container.
#[derive(Debug, Clone, Copy)]
pub(super) enum By {
    /// The full id, and only it: a container may be named like another's id.
    Id,
    /// A name, a full id or an id prefix, as the runtime resolves them.
    NameOrId,
}

/// A connected event stream (a streaming `200` answer).
pub(super) struct Stream {
    pub socket: PathBuf,
    body: Incoming,
    /// Drives the connection; aborted when the stream is dropped.
    _connection: AbortOnDrop,
}

impl Stream {
    /// The next chunk of the body; `None` when the runtime ended it.
    pub async fn next(&mut self) -> Result<Option<Bytes>, RuntimeError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(protocol(&self.socket, format_args!("{e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    pub fn new(sockets: Vec<PathBuf>) -> Self {
        Client {
            sockets,
            in_use: Mutex::new(None),
        }
    }

    pub fn in_use(&self) -> Option<PathBuf> {
        self.in_use
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `GET /containers/{name_or_id}/json`, checked to be about the container asked for.
    /// `call` labels the request in the metrics.
    pub async fn inspect(
        &self,
        call: &'static str,
        name_or_id: &str,
        by: By,
    ) -> Result<Inspected, RuntimeError> {
        check_name(name_or_id)?;
        let result = self
            .get(&format!("/containers/{name_or_id}/json"))
            .await
            .and_then(|answer| inspected(answer, name_or_id, by));
        count(call, &result);
        result
    }

    /// Opens a streaming `GET`: connected, and its `200` headers received, within
    /// [`API_TIMEOUT`]; the body then has no deadline.
    pub async fn stream(&self, path: &str) -> Result<Stream, RuntimeError> {
        let deadline = Instant::now() + API_TIMEOUT;
        let (io, socket) = self.connect(deadline).await?;
        let opened = timeout_at(deadline, async {
            let (mut sender, connection) = start(io).await?;
            let response = sender
                .send_request(request(path)?)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((response, connection))
        })
        .await;
        let result = match opened {
            Err(_) => Err(timeout(socket)),
            Ok(Err(e)) => Err(protocol(&socket, e)),
            Ok(Ok((response, connection))) if response.status() == StatusCode::OK => Ok(Stream {
                socket,
                body: response.into_body(),
                _connection: connection,
            }),
            Ok(Ok((response, _))) => {
                let status = response.status();
                // The error document is small; read it within what is left of the deadline.
                let body = timeout_at(deadline, read_limited(response.into_body()))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                Err(status_error(socket, status, &body))
            }
        };
        count("events", &result);
        result
    }

    /// A body-less `GET` and its whole answer, within [`API_TIMEOUT`] and
    /// [`MAX_RESPONSE_BYTES`].
    async fn get(&self, path: &str) -> Result<Answer, RuntimeError> {
        let deadline = Instant::now() + API_TIMEOUT;
        let (io, socket) = self.connect(deadline).await?;
        let exchange = async {
            let (mut sender, _connection) = start(io).await?;
            let response = sender
                .send_request(request(path)?)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = read_limited(response.into_body()).await?;
            Ok::<_, String>((status, body))
        };
        match timeout_at(deadline, exchange).await {
            Err(_) => Err(timeout(socket)),
            Ok(Err(e)) => Err(protocol(&socket, e)),
            Ok(Ok((status, body))) => Ok(Answer {
                socket,
                status,
                body,
            }),
        }
    }

    /// A connection to the socket that answered last, else to the first in the list that
    /// accepts one.
    async fn connect(&self, deadline: Instant) -> Result<(UnixStream, PathBuf), RuntimeError> {
        let last = self.in_use();
        let order = last
            .iter()
            .chain(self.sockets.iter().filter(|s| Some(*s) != last.as_ref()));
        let mut tried = Vec::new();
        for socket in order {
            match timeout_at(deadline, UnixStream::connect(socket)).await {
                Err(_) => return Err(timeout(socket.clone())),
                Ok(Ok(io)) => {
                    self.set_in_use(Some(socket.clone()));
                    return Ok((io, socket.clone()));
                }
                Ok(Err(e)) => tried.push(format!("{}: {e}", socket.display())),
            }
        }
        self.set_in_use(None);
        if tried.is_empty() {
            tried.push("no runtime socket is configured".to_owned());
        }
        Err(RuntimeError::Unreachable {
            tried: tried.join("; "),
        })
    }

    fn set_in_use(&self, socket: Option<PathBuf>) {
        *self.in_use.lock().unwrap_or_else(PoisonError::into_inner) = socket;
    }
}

struct Answer {
    socket: PathBuf,
    status: StatusCode,
    body: Bytes,
}

/// The container in an inspect `answer`, if it is about `name_or_id`.
fn inspected(answer: Answer, name_or_id: &str, by: By) -> Result<Inspected, RuntimeError> {
    match answer.status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(RuntimeError::NotFound {
                id: name_or_id.to_owned(),
                socket: answer.socket,
            });
        }
        status => return Err(status_error(answer.socket, status, &answer.body)),
    }
    let inspected = parse_inspect(&answer.socket, &answer.body)?;
    let meta = &inspected.meta;
    let about = match by {
        By::Id => meta.id == name_or_id,
        By::NameOrId => meta.name == name_or_id || meta.id.starts_with(name_or_id),
    };
    if !about {
        let other: String = meta.id.chars().take(MAX_NAME_LEN).collect();
        return Err(protocol(
            &answer.socket,
            format_args!("asked about container {name_or_id}, answered about {other:?}"),
        ));
    }
    Ok(inspected)
}

/// Shakes hands over `io` and drives the connection on a task that ends with the returned
/// guard, so an abandoned exchange cannot leave a connection to a wedged runtime behind.
async fn start(io: UnixStream) -> Result<(Sender, AbortOnDrop), String> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        // Its failure reaches the exchange as the failure of the request or of the body.
        let _ = connection.await;
    });
    Ok((sender, AbortOnDrop(task)))
}

fn request(path: &str) -> Result<Request<Empty<Bytes>>, String> {
    Request::get(path)
        // Docker refuses an HTTP/1.1 request without a Host; over a Unix socket any name does.
        .header(hyper::header::HOST, "localhost")
        .body(Empty::new())
        .map_err(|e| format!("cannot ask for {path:?}: {e}"))
}

async fn read_limited(body: Incoming) -> Result<Bytes, String> {
    match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(format!(
            "answer larger than {MAX_RESPONSE_BYTES} bytes, refused"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn timeout(socket: PathBuf) -> RuntimeError {
    RuntimeError::Timeout {
        socket,
        after: API_TIMEOUT,
    }
}

pub(super) fn protocol(socket: &Path, detail: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Protocol(format!(
        "the container runtime at {}: {detail}",
        socket.display()
    ))
}

/// The longest runtime error message kept: enough for "No such image: …", short enough for a
/// log line.
const MAX_MESSAGE_CHARS: usize = 200;

/// An error answer, with the runtime's `message` (Docker's error document) or its text.
fn status_error(socket: PathBuf, status: StatusCode, body: &[u8]) -> RuntimeError {
    #[derive(Deserialize)]
    struct ErrorDocument {
        message: String,
    }
    let message = match serde_json::from_slice::<ErrorDocument>(body) {
        Ok(document) => document.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    let message = message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    RuntimeError::Status {
        socket,
        status: status.as_u16(),
        message,
    }
}

fn count<T>(call: &'static str, result: &Result<T, RuntimeError>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.outcome(),
    };
    metrics::counter!(crate::metrics::RUNTIME_REQUESTS, "call" => call, "outcome" => outcome)
        .increment(1);
}

/// The inspect document, as far as it is read. Every field may be missing or null: podman
/// leaves `Config.Image` empty for a `--rootfs` container and Docker sends `"Labels": null`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct InspectDocument {
    id: Option<String>,
    name: Option<String>,
    config: Option<ConfigDocument>,
    state: Option<StateDocument>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct ConfigDocument {
    image: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct StateDocument {
    pid: Option<i64>,
    running: Option<bool>,
}

pub(super) fn parse_inspect(socket: &Path, body: &[u8]) -> Result<Inspected, RuntimeError> {
    let document: InspectDocument = serde_json::from_slice(body)
        .map_err(|e| protocol(socket, format_args!("unreadable inspect answer: {e}")))?;
    let id = document.id.unwrap_or_default();
    if id.is_empty() {
        return Err(protocol(socket, "inspect answer without an Id"));
    }
    let name = document.name.unwrap_or_default();
    let config = document.config.unwrap_or_default();
    let state = document.state.unwrap_or_default();
    Ok(Inspected {
        meta: ContainerMeta {
            id,
            name: name.strip_prefix('/').unwrap_or(&name).to_owned(),
            image: config.image.unwrap_or_default(),
            labels: config.labels.unwrap_or_default(),
        },
        // 0 when the container runs no process.
        pid: state
            .pid
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid != 0),
        running: state.running.unwrap_or(false),
    })
}

/// A name or id that may go into a URL path as it is.
pub(super) fn check_name(name: &str) -> Result<(), RuntimeError> {
    let fits = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        // `.` and `..` are path segments, not names.
        && name.bytes().any(|b| b != b'.');
    if fits {
        Ok(())
    } else {
        Err(bad_id("name or id", name))
    }
}

/// 64 lower-case hex digits: the full id, which names one container for its whole life, unlike
/// a name or a prefix.
pub(super) fn is_full_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(super) fn bad_id(expected: &'static str, given: &str) -> RuntimeError {
    RuntimeError::BadId {
        expected,
        given: given.chars().take(MAX_NAME_LEN + 1).collect(),
    }
}

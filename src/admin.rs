//! The admin listener: Prometheus metrics, liveness, readiness and the status report that
//! `imds-broker status` prints. It is a separate listener, a Unix socket (0600) by default or a
//! loopback port, never one of the IMDS addresses applications can reach.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::checkpoint::{self, Checkpoint};
use crate::config::{AdminListen, OnFailure};
use crate::http_client;
use crate::source::SourceStatus;
use crate::state::AppState;
use crate::time::imds_time;

#[derive(Clone)]
struct Admin {
    state: AppState,
    metrics: PrometheusHandle,
}

pub fn router(state: AppState, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route(
            "/container-tokens/{app}/rotate",
            post(rotate_container_token),
        )
        .with_state(Admin { state, metrics })
}

/// A bound admin listener.
pub enum AdminListener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Binds the admin listener, replacing a stale socket file left by a crash; the socket is 0600.
pub async fn bind(listen: &AdminListen) -> io::Result<AdminListener> {
    match listen {
        AdminListen::Unix(path) => {
            remove_stale_socket(path)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(AdminListener::Unix(listener))
        }
        AdminListen::Tcp(addr) => Ok(AdminListener::Tcp(
            tokio::net::TcpListener::bind(addr).await?,
        )),
    }
}

/// Serves the admin router until `stop`.
pub async fn serve(listener: AdminListener, router: Router, stop: CancellationToken) {
    let shutdown = stop.cancelled_owned();
    let result = match listener {
        AdminListener::Unix(l) => {
            axum::serve(l, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        AdminListener::Tcp(l) => {
            axum::serve(l, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Fetches `path` from a running daemon's admin listener.
pub async fn fetch(listen: &AdminListen, path: &str) -> io::Result<(u16, String)> {
    request(listen, "GET", path).await
}

/// Sends a body-less `method` request for `path` to a running daemon's admin listener, on a
/// connection of its own; returns the status and the body.
pub async fn request(listen: &AdminListen, method: &str, path: &str) -> io::Result<(u16, String)> {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "admin")
        .header(header::CONTENT_LENGTH, "0")
        .header(header::CONNECTION, "close")
        .body(axum::body::Body::empty())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match listen {
        AdminListen::Unix(p) => {
            http_client::exchange(tokio::net::UnixStream::connect(p).await?, request).await
        }
        AdminListen::Tcp(a) => {
            http_client::exchange(tokio::net::TcpStream::connect(a).await?, request).await
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn render_metrics(State(admin): State<Admin>) -> Response {
    let now = admin.state.now();
    crate::metrics::update_active_tokens(admin.state.boot_time());
    let cache = admin.state.cache();
    let stats = cache.stats();
    metrics::gauge!(crate::metrics::CACHE_ENTRIES).set(stats.entries as f64);
    metrics::gauge!(crate::metrics::DEGRADED_ENTRIES).set(stats.degraded_entries as f64);
    metrics::counter!(crate::metrics::DEGRADED_SERVES).absolute(stats.degraded_serves);
    if let Some(audit) = checkpoint::latest() {
        metrics::gauge!(crate::metrics::AUDIT_LAST_SEQ).set(audit.seq as f64);
        if let Some(epoch) = audit.epoch {
            metrics::gauge!(crate::metrics::AUDIT_EPOCH).set(epoch as f64);
        }
    }
    let config = admin.state.config();
    let pending = config
        .apps
        .iter()
        .filter(|app| cache.prefetch_pending(app.assume_role_input()).is_some())
        .count();
    metrics::gauge!(crate::metrics::PREFETCH_PENDING).set(pending as f64);
    for app in &config.apps {
        if let Some(creds) = cache.peek(app.assume_role_input()).and_then(|e| e.current) {
            let left = creds.remaining(now);
            metrics::gauge!(crate::metrics::CREDENTIAL_EXPIRY, "app" => app.name.clone())
                .set(left.as_secs_f64());
        }
    }
    if let Some(left) = admin
        .state
        .own_source()
        .and_then(|s| s.certificate_expires_in(now))
    {
        metrics::gauge!(crate::metrics::SOURCE_CERTIFICATE_EXPIRY).set(left as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
        .into_response()
}

/// Ready when serving (this listener only starts once the config is loaded and the IMDS
/// listeners are bound), unless `[audit] on_failure = "serve"` the audit file is being written,
/// the daemon's own source has not expired, and every `prefetch` app holds unexpired credentials
/// or is on its way to its first ones: waiting for its moment of the start-up spread
/// (`credentials.prefetch_spread`) or fetching them, with no failure. Those on their way count
/// only once an AssumeRole has succeeded since start, which one prefetch app makes within
/// `PROOF_WINDOW`: a host is not declared ready on a source nobody has tried, nor kept unready
/// for the whole window (nor flapping as each spread fetch runs). A prefetch app whose fetch
/// failed, or that has nothing and nothing under way, keeps the daemon unready.
async fn readyz(State(admin): State<Admin>) -> Response {
    let config = admin.state.config();
    let now = admin.state.now();
    let cache = admin.state.cache();
    let mut cold = Vec::new();
    let mut waiting = Vec::new();
    for app in config.apps.iter().filter(|app| app.prefetch) {
        let input = app.assume_role_input();
        let valid = cache
            .peek(input)
            .and_then(|e| e.current)
            .is_some_and(|c| c.expiration > now);
        if valid {
            continue;
        }
        match cache.prefetch_pending(input) {
            Some(left) => waiting.push(left),
            None => cold.push(app.name.as_str()),
        }
    }
    if config.audit.on_failure == OnFailure::Refuse
        && let Some(reason) = crate::audit::health::failing()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the audit file cannot be written ({reason}); credentials are refused ([audit] on_failure = \"refuse\")\n"),
        )
            .into_response();
    }
    if let Some(reason) = admin.state.own_source().and_then(|s| s.expired(now)) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response();
    }
    if !cold.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no valid credentials yet for prefetch app(s) {}\n",
                cold.join(", ")
            ),
        )
            .into_response();
    }
    if let Some(next) = waiting.iter().min()
        && !cache.source_proven()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no AssumeRole has succeeded yet to prove the source; {} prefetch app(s) on their way to their first credentials, the next fetch in {}s\n",
                waiting.len(),
                next.as_secs()
            ),
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// `imds-broker token rotate APP`: a new token in the app's file now; the old one stops
/// working at once (the operator's answer to a leaked token).
async fn rotate_container_token(
    State(admin): State<Admin>,
    axum::extract::Path(app): axum::extract::Path<String>,
) -> Response {
    let Some(tokens) = admin.state.container_tokens().cloned() else {
        return (
            StatusCode::NOT_FOUND,
            "the container endpoint is off (no [container] section)\n",
        )
            .into_response();
    };
    let now = admin.state.moment();
    let name = app.clone();
    let rotation = tokio::task::spawn_blocking(move || tokens.rotate(&name, now)).await;
    match rotation {
        Ok(Some(rotation)) => {
            crate::token::container::record(std::slice::from_ref(&rotation));
            match rotation.result {
                Ok(()) => (
                    StatusCode::OK,
                    format!("{app}: new token written to {}\n", rotation.file.display()),
                )
                    .into_response(),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "{app}: cannot write {}: {e}; the old token still works\n",
                        rotation.file.display()
                    ),
                )
                    .into_response(),
            }
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("{app}: no such app with a container token\n"),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "token rotation failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "rotation failed\n").into_response()
        }
    }
}

/// One row per app for `imds-broker status`. Key ids only, never secrets.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AppStatus {
    pub app: String,
    pub role_arn: String,
    pub rule: String,
    pub prefetch: bool,
    pub access_key_id: Option<String>,
    pub expires_in_secs: Option<u64>,
    pub last_refresh: Option<String>,
    pub next_refresh: Option<String>,
    pub last_error: Option<String>,
    /// When the app's container-endpoint token was issued, and its file.
    #[serde(default)]
    pub container_token: Option<(String, String)>,
    /// Seconds until the app's first fetch of the start-up spread, while it waits for it.
    #[serde(default)]
    pub prefetch_in_secs: Option<u64>,
}

/// What `/status` answers: a row per app, and where the audit file's chain stands.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub apps: Vec<AppStatus>,
    /// The audit checkpoint (last seq and hash, sealing epoch); `None` before the first write.
    pub audit: Option<Checkpoint>,
    /// The daemon's own credential source (`[source]`).
    #[serde(default)]
    pub source: Option<Box<SourceStatus>>,
}

/// `/status` as a daemon of this version (an object) or an older one (the rows alone) answers.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum StatusBody {
    Report(StatusReport),
    Rows(Vec<AppStatus>),
}

impl From<StatusBody> for StatusReport {
    fn from(body: StatusBody) -> Self {
        match body {
            StatusBody::Report(report) => report,
            StatusBody::Rows(apps) => StatusReport {
                apps,
                audit: None,
                source: None,
            },
        }
    }
}

async fn status(State(admin): State<Admin>) -> Response {
    let config = admin.state.config();
    let now = admin.state.now();
    let tokens = admin
        .state
        .container_tokens()
        .map(|t| t.status())
        .unwrap_or_default();
    let rows: Vec<AppStatus> = config
        .apps
        .iter()
        .map(|app| {
            let entry = admin.state.cache().peek(app.assume_role_input());
            let current = entry.as_ref().and_then(|e| e.current.clone());
            AppStatus {
                app: app.name.clone(),
                role_arn: app.role_arn().to_string(),
                rule: app
                    .matcher
                    .as_ref()
                    .map_or_else(|| "container endpoint only".into(), |m| m.to_string()),
                prefetch: app.prefetch,
                access_key_id: current.as_ref().map(|c| c.access_key_id.clone()),
                expires_in_secs: current.as_ref().map(|c| c.remaining(now).as_secs()),
                last_refresh: current.as_ref().map(|c| imds_time(c.issued_at)),
                next_refresh: entry.as_ref().and_then(|e| e.refresh_at).map(imds_time),
                last_error: entry.and_then(|e| e.last_error),
                container_token: tokens
                    .iter()
                    .find(|t| t.app == app.name)
                    .map(|t| (imds_time(t.issued_at), t.token_file.display().to_string())),
                prefetch_in_secs: admin
                    .state
                    .cache()
                    .prefetch_pending(app.assume_role_input())
                    .map(|left| left.as_secs()),
            }
        })
        .collect();
    axum::Json(StatusReport {
        apps: rows,
        audit: checkpoint::latest(),
        source: admin.state.own_source().map(|s| Box::new(s.status(now))),
    })
    .into_response()
}

/// The table `imds-broker status` prints, and a line on the audit checkpoint.
pub fn status_table(report: &StatusReport) -> String {
    let rows = &report.apps;
    let mut out = format!(
        "{:<16} {:<44} {:<22} {:>10} {:<21} {}\n",
        "APP", "ROLE", "KEY ID", "EXPIRES IN", "LAST REFRESH", "LAST ERROR"
    );
    for r in rows {
        let expires = r
            .expires_in_secs
            .map(|s| format!("{}m{:02}s", s / 60, s % 60))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<16} {:<44} {:<22} {:>10} {:<21} {}\n",
            r.app,
            r.role_arn,
            r.access_key_id.as_deref().unwrap_or("-"),
            expires,
            r.last_refresh.as_deref().unwrap_or("-"),
            r.last_error.as_deref().unwrap_or("-"),
        ));
    }
    for r in rows {
        if let Some(secs) = r.prefetch_in_secs {
            out.push_str(&format!(
                "{}: first fetch in {}m{:02}s (prefetch spread)\n",
                r.app,
                secs / 60,
                secs % 60
            ));
        }
    }
    for r in rows {
        if let Some((issued, file)) = &r.container_token {
            out.push_str(&format!(
                "{}: container token issued {issued}, in {file}\n",
                r.app
            ));
        }
    }
    if let Some(source) = &report.source {
        out.push_str(&format!("source: {}", source.kind));
        if let Some(c) = &source.certificate {
            let days = c.expires_in_secs.div_euclid(86_400);
            out.push_str(&format!(
                ", certificate serial {} ({}), not after {} ({})",
                c.serial,
                c.subject_cn.as_deref().unwrap_or("no CN"),
                c.not_after,
                if c.expires_in_secs <= 0 {
                    "EXPIRED".to_owned()
                } else {
                    format!("{days} days left")
                }
            ));
        }
        if let Some(key) = &source.access_key_id {
            out.push_str(&format!(", key {key}"));
        }
        if let Some(r) = &source.last_rotation {
            out.push_str(&format!(
                ", last rotated {} ({} -> {})",
                r.at, r.old_key_id, r.new_key_id
            ));
        }
        out.push('\n');
    }
    if let Some(c) = &report.audit {
        out.push_str(&format!("audit: last seq {} hash {}", c.seq, c.hash));
        match (c.epoch, &c.key_id) {
            (Some(epoch), Some(key_id)) => {
                out.push_str(&format!(", sealed, epoch {epoch}, key {key_id}\n"))
            }
            _ => out.push_str(", not sealed\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_both_shapes_and_prints_the_audit_checkpoint() {
        let old: StatusReport = serde_json::from_str::<StatusBody>(
            r#"[{"app":"a","role_arn":"arn:aws:iam::111122223333:role/a","rule":"uid=1","prefetch":false,
                "access_key_id":null,"expires_in_secs":null,"last_refresh":null,"next_refresh":null,
                "last_error":null}]"#,
        )
        .unwrap()
        .into();
        assert_eq!((old.apps.len(), &old.audit), (1, &None));
        assert!(!status_table(&old).contains("audit:"));

        let report = StatusReport {
            apps: old.apps,
            audit: Some(Checkpoint {
                seq: 12,
                hash: "ab".repeat(32),
                epoch: Some(3),
                key_id: Some("0123456789abcdef".into()),
            }),
            source: None,
        };
        let json = serde_json::to_string(&report).unwrap();
        let back: StatusReport = serde_json::from_str::<StatusBody>(&json).unwrap().into();
        assert_eq!(back, report);
        let table = status_table(&report);
        assert!(
            table.ends_with(&format!(
                "audit: last seq 12 hash {}, sealed, epoch 3, key 0123456789abcdef\n",
                "ab".repeat(32)
            )),
            "{table}"
        );
    }
}

//! The IMDS-compatible HTTP surface: the router, its ordered security layers, and the handlers
//! for session tokens, metadata and role credentials.

mod error;
mod guard;
mod metadata;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, header};

use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use serde::Serialize;

use crate::time::imds_time;
pub use error::ImdsError;

use crate::audit::{self, DenyReason};
use crate::config::MAX_TOKEN_TTL;
use crate::credentials::{BodyKind, Credentials};
use crate::identity::{Caller, ConnectionInfo};
use crate::rate_limit::CallerLimiter;
use crate::state::AppState;
use metadata::{Node, View};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// The config snapshot a request is answered under and the caller's matched app (an index into
/// its apps), decided once per request by the outermost layer: a reload mid-request changes
/// nothing for it, and rules are not evaluated twice.
#[derive(Clone)]
pub(crate) struct Matched {
    pub config: Arc<crate::config::Config>,
    pub app: Option<usize>,
    /// Why no app could be decided, when the container runtime did not answer.
    pub undecided: Option<Arc<str>>,
}

impl Matched {
    fn app(&self) -> Option<&crate::config::App> {
        self.app.map(|i| &self.config.apps[i])
    }
}

pub(crate) fn caller_of(ext: &Extensions) -> Result<&ConnectionInfo, ImdsError> {
    ext.get::<ConnectionInfo>()
        .ok_or(ImdsError::Internal("connection identity missing"))
}

fn matched_of(ext: &Extensions) -> Result<&Matched, ImdsError> {
    ext.get::<Matched>()
        .ok_or(ImdsError::Internal("request was not matched"))
}

/// The whole IMDS router: one guard layer (request metrics and `Server` header around the
/// relayed-request refusal, per-caller rate limit and token check, in that order; see
/// [`guard::GuardLayer`]), then routing.
pub fn router(state: AppState) -> Router {
    let limiter = Arc::new(CallerLimiter::from_limits(&state.config().limits));
    let metadata = get(tree);
    Router::new()
        .route(
            "/latest/api/token",
            put(put_token).fallback(|| async { ImdsError::MethodNotAllowed { allow: "PUT" } }),
        )
        .route(
            "/{version}/api/token",
            any(|| async { ImdsError::Forbidden("tokens are only issued at /latest/api/token") }),
        )
        .route(WHOAMI_PATH, get(whoami))
        .route("/", get(|| async { text("latest") }))
        .route("/latest", get(|| async { text("dynamic\nmeta-data") }))
        .route("/latest/", get(|| async { text("dynamic\nmeta-data") }))
        .route("/latest/meta-data", metadata.clone())
        .route("/latest/meta-data/", metadata.clone())
        .route("/latest/meta-data/{*rest}", metadata.clone())
        .route("/latest/dynamic", metadata.clone())
        .route("/latest/dynamic/", metadata.clone())
        .route("/latest/dynamic/{*rest}", metadata)
        .fallback(|| async { ImdsError::NotFound })
        .method_not_allowed_fallback(|| async {
            ImdsError::MethodNotAllowed { allow: "GET, HEAD" }
        })
        .layer(guard::GuardLayer(guard::Guards {
            state: state.clone(),
            limiter,
        }))
        .with_state(state)
}

/// Where a caller may ask who the daemon takes it for (`server.debug_whoami`).
pub const WHOAMI_PATH: &str = "/imds-broker/whoami";

/// `GET /imds-broker/whoami`, for `imds-broker doctor`: the caller's own resolved identity and
/// the app it is, as JSON. Off unless `server.debug_whoami`: then a 404 like any unknown path.
/// It only ever describes the connection's own caller, after the same token check as metadata.
async fn whoami(request: Request) -> Result<Response, ImdsError> {
    let conn = caller_of(request.extensions())?;
    let matched = matched_of(request.extensions())?;
    if !matched.config.server.debug_whoami {
        return Err(ImdsError::NotFound);
    }
    let app = matched.app();
    let caller = &conn.caller;
    let kind = match &**caller {
        Caller::Local(_) => "local",
        Caller::Remote { .. } => "remote",
        Caller::Unresolved { .. } => "unresolved",
    };
    let body = serde_json::json!({
        "kind": kind,
        "peer": caller.peer().to_string(),
        "uid": caller.uid(),
        "pid": caller.pid(),
        "exe": caller.exe().map(|e| e.display().to_string()),
        "cgroup": caller.cgroup(),
        "unit": caller.unit(),
        "user_unit": caller.user_unit().map(|(_, unit)| unit),
        "netns": caller.local().and_then(|l| l.netns),
        "container": caller.container().map(|c| serde_json::json!({
            "engine": c.reference.engine.as_str(),
            "id": &*c.reference.id,
            "name": c.known().map(|m| m.name.as_str()),
            "image": c.known().map(|m| m.image.as_str()),
        })),
        "undecided": matched.undecided.as_deref(),
        "reason": match &**caller {
            Caller::Unresolved { reason, .. } => Some(reason.as_str()),
            _ => None,
        },
        "app": app.map(|a| a.name.as_str()),
        "role_arn": app.map(|a| a.role_arn().to_string()),
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response())
}

fn text(body: impl Into<axum::body::Body>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body.into(),
    )
        .into_response()
}

/// `PUT /latest/api/token`: a token bound to this caller, for the TTL asked (capped by config).
async fn put_token(State(state): State<AppState>, request: Request) -> Result<Response, ImdsError> {
    let conn = caller_of(request.extensions())?;
    let matched = matched_of(request.extensions())?;
    let config = &matched.config;
    // An SDK asks for its credentials right after its token, with a short timeout (botocore:
    // 1 s): when the caller's app is already known, its AssumeRole starts now, so a cold cache
    // costs the SDK the STS latency minus this round trip. Only when the app has no
    // credentials and none are being fetched or held back after a failure.
    if let Some(app) = matched.app() {
        state.cache().prefetch([app.assume_role_input().clone()]);
    }
    let requested = requested_ttl(request.headers())?;
    let granted = requested.min(config.server.token_max_ttl.as_secs());
    let now = state.moment();
    let token = state
        .token_key()
        .mint(&conn.binding, Duration::from_secs(granted), now.boot);
    audit::token_issued(conn, granted, now);
    let mut response = text(token);
    response
        .headers_mut()
        .insert(TOKEN_TTL_HEADER, HeaderValue::from(granted));
    Ok(response)
}

/// The TTL header must be a plain integer from 1 to 21600.
fn requested_ttl(headers: &HeaderMap) -> Result<u64, ImdsError> {
    const INVALID: ImdsError = ImdsError::BadRequest("missing or invalid token TTL");
    let mut values = headers.get_all(TOKEN_TTL_HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(INVALID);
    };
    let value = value.to_str().map_err(|_| INVALID)?;
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(INVALID);
    }
    let ttl: u64 = value.parse().map_err(|_| INVALID)?;
    if ttl == 0 || ttl > MAX_TOKEN_TTL.as_secs() {
        return Err(INVALID);
    }
    Ok(ttl)
}

/// `GET /latest/meta-data/...` and `/latest/dynamic/...`.
async fn tree(State(state): State<AppState>, request: Request) -> Result<Response, ImdsError> {
    let conn = caller_of(request.extensions())?;
    let matched = matched_of(request.extensions())?;
    let config = &matched.config;
    let app = matched.app();
    let view = View {
        instance: &config.instance,
        app,
        started_at: state.started_at(),
        local_ip: conn.local.ip(),
    };
    let path = request.uri().path();
    let (tree, rest) = if let Some(rest) = path.strip_prefix("/latest/meta-data") {
        (Tree::MetaData, rest)
    } else if let Some(rest) = path.strip_prefix("/latest/dynamic") {
        (Tree::Dynamic, rest)
    } else {
        return Err(ImdsError::NotFound);
    };
    let segments = metadata::segments(rest).ok_or(ImdsError::NotFound)?;
    let node = match tree {
        Tree::MetaData => metadata::meta_data(&view, &segments),
        Tree::Dynamic => metadata::dynamic(&view, &segments),
    };
    let Some(node) = node else {
        if tree == Tree::MetaData && segments.first() == Some(&"iam") {
            match app {
                None => match &matched.undecided {
                    Some(reason) => {
                        audit::credentials_denied(conn, DenyReason::ContainerRuntime, reason)
                    }
                    None => audit::credentials_denied(
                        conn,
                        DenyReason::unmatched(conn),
                        "no rule matches this caller",
                    ),
                },
                Some(app) => audit::credentials_denied(
                    conn,
                    DenyReason::RoleMismatch,
                    &format!(
                        "asked for {path}, its role is {}",
                        app.role_arn().role_name()
                    ),
                ),
            }
        }
        return Err(ImdsError::NotFound);
    };
    match node {
        Node::Dir(entries) => Ok(text(entries.join("\n"))),
        Node::Text(body) => Ok(text(body)),
        Node::Credentials => {
            let app = app.ok_or(ImdsError::NotFound)?;
            let creds = state.issue(conn, "imds", app).await?;
            let body = creds.body(BodyKind::Imds, |creds| {
                credential_document(creds, app.role_arn().account_id())
            });
            Ok(text(body))
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tree {
    MetaData,
    Dynamic,
}

/// The credential JSON every SDK parses: `Code`, the four string fields, second-precision
/// `Expiration` with `Z`, and `AccountId` (read by the JS and Go SDKs when present).
fn credential_document(creds: &Credentials, account_id: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Document<'a> {
        code: &'static str,
        last_updated: String,
        #[serde(rename = "Type")]
        kind: &'static str,
        access_key_id: &'a str,
        secret_access_key: &'a str,
        token: &'a str,
        expiration: String,
        account_id: &'a str,
    }
    let doc = Document {
        code: "Success",
        last_updated: imds_time(creds.issued_at),
        kind: "AWS-HMAC",
        access_key_id: &creds.access_key_id,
        secret_access_key: creds.secret_access_key.expose(),
        token: creds.session_token.expose(),
        expiration: imds_time(creds.expiration),
        account_id,
    };
    serde_json::to_string_pretty(&doc).expect("plain struct serializes")
}

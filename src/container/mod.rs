//! The ECS-style container credentials endpoint, for apps the daemon cannot tell apart by socket
//! owner (containers, sandboxes, other network namespaces): SDKs find it through
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` and prove which app they are with the token the daemon
//! wrote to that app's file (`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
//!
//! `GET /v1/credentials` answers with the credentials of the token's app;
//! `GET /v1/credentials/{app}` does too, and refuses a token of any other app.

pub mod audit;
mod error;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::token::container::{self as tokens, TokenStore, Verdict};
pub use error::ContainerError;

use crate::admit::{self, OwnHosts};
use crate::credentials::{BodyKind, Credentials};
use crate::identity::ConnectionInfo;
use crate::rate_limit::CallerLimiter;
use crate::state::AppState;
use crate::time::imds_time;
use audit::TokenRefusal;

/// The path SDKs are pointed at (EKS Pod Identity uses the same).
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// The container-credential addresses in every SDK's plain-HTTP allow-list (ECS, EKS).
const CONTAINER_HOSTS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];
/// How often the rotation task looks at the clock at most: a wall-clock jump (suspend, NTP)
/// is noticed within this.
const ROTATION_CHECK: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Endpoint {
    state: AppState,
    tokens: Arc<TokenStore>,
    limiter: Arc<CallerLimiter>,
}

/// The container endpoint's router: one layer refuses relayed requests, then checks the
/// caller's rate; the routes check the token.
pub fn router(state: AppState, tokens: Arc<TokenStore>) -> Router {
    let limiter = Arc::new(CallerLimiter::from_limits(&state.config().limits));
    let endpoint = Endpoint {
        state,
        tokens,
        limiter,
    };
    Router::new()
        .route(
            CREDENTIALS_PATH,
            get(credentials_of_token).fallback(|| async { ContainerError::MethodNotAllowed }),
        )
        .route(
            &format!("{CREDENTIALS_PATH}/{{app}}"),
            get(credentials_of_app).fallback(|| async { ContainerError::MethodNotAllowed }),
        )
        .fallback(|| async { ContainerError::NotFound })
        .layer(from_fn_with_state(endpoint.clone(), admit))
        .with_state(endpoint)
}

fn connection(request: &Request) -> Result<&ConnectionInfo, ContainerError> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .ok_or(ContainerError::Internal("connection identity missing"))
}

/// The shared first step ([`crate::admit`]), with the container addresses as the daemon's own.
async fn admit(
    State(endpoint): State<Endpoint>,
    request: Request,
    next: Next,
) -> Result<Response, ContainerError> {
    let conn = connection(&request)?;
    let config = endpoint.state.config();
    let configured = config
        .container
        .iter()
        .flat_map(|c| c.listen.iter().map(|l| l.ip()));
    let own = OwnHosts {
        dialled: conn.local.ip(),
        addresses: CONTAINER_HOSTS.iter().copied().chain(configured),
        names: &config.server.allowed_hosts,
    };
    admit::admit(
        conn,
        request.uri(),
        request.headers(),
        own,
        &endpoint.limiter,
    )?;
    Ok(next.run(request).await)
}

async fn credentials_of_token(
    State(endpoint): State<Endpoint>,
    request: Request,
) -> Result<Response, ContainerError> {
    serve(&endpoint, connection(&request)?, request.headers(), None).await
}

async fn credentials_of_app(
    State(endpoint): State<Endpoint>,
    Path(app): Path<String>,
    request: Request,
) -> Result<Response, ContainerError> {
    serve(
        &endpoint,
        connection(&request)?,
        request.headers(),
        Some(&app),
    )
    .await
}

async fn serve(
    endpoint: &Endpoint,
    conn: &ConnectionInfo,
    headers: &HeaderMap,
    wanted: Option<&str>,
) -> Result<Response, ContainerError> {
    let refuse = |refusal: TokenRefusal, app: Option<&str>, error: ContainerError| {
        audit::token_rejected(conn, refusal, app);
        Err(error)
    };
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let token = match (values.next(), values.next()) {
        (None, _) => return refuse(TokenRefusal::Missing, None, ContainerError::MissingToken),
        (Some(_), Some(_)) => {
            return refuse(
                TokenRefusal::Malformed,
                None,
                ContainerError::BadToken("one Authorization header, please"),
            );
        }
        (Some(value), None) => match value.to_str() {
            Ok(token) if !token.is_empty() => token,
            _ => {
                return refuse(
                    TokenRefusal::Malformed,
                    None,
                    ContainerError::BadToken("invalid token"),
                );
            }
        },
    };
    let state = &endpoint.state;
    let app_name = match endpoint.tokens.verify(token, state.moment()) {
        Verdict::Valid { app } => app,
        Verdict::Stale { app } => {
            return refuse(
                TokenRefusal::Stale,
                Some(&app),
                ContainerError::BadToken("the token was replaced; read the token file again"),
            );
        }
        Verdict::Unknown => {
            return refuse(
                TokenRefusal::Unknown,
                None,
                ContainerError::BadToken("invalid token"),
            );
        }
    };
    if wanted.is_some_and(|w| w != app_name) {
        return refuse(
            TokenRefusal::OtherApp,
            Some(&app_name),
            ContainerError::BadToken("the token is not valid for this app"),
        );
    }
    let config = state.config();
    let Some(app) = config
        .apps
        .iter()
        .find(|a| a.name == app_name && a.container.is_some())
    else {
        return refuse(
            TokenRefusal::Withdrawn,
            Some(&app_name),
            ContainerError::BadToken("the token's app is no longer served here"),
        );
    };
    let creds = state.issue(conn, "container", app).await?;
    let body = creds.body(BodyKind::Container, |creds| {
        document(
            creds,
            &app.role_arn().to_string(),
            app.role_arn().account_id(),
        )
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The ECS agent's credential JSON: the four fields every SDK requires, plus the role and
/// account (botocore, aws-sdk-rust and the JS SDK read `AccountId`).
fn document(creds: &Credentials, role_arn: &str, account_id: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Document<'a> {
        access_key_id: &'a str,
        secret_access_key: &'a str,
        token: &'a str,
        expiration: String,
        role_arn: &'a str,
        account_id: &'a str,
    }
    let doc = Document {
        access_key_id: &creds.access_key_id,
        secret_access_key: creds.secret_access_key.expose(),
        token: creds.session_token.expose(),
        expiration: imds_time(creds.expiration),
        role_arn,
        account_id,
    };
    serde_json::to_string(&doc).expect("plain struct serializes")
}

/// Puts the container endpoint to work on `state`: its tokens follow config reloads, every
/// app gets its token file now, rotation runs on schedule; returns the endpoint's router.
pub fn start(state: &AppState, tokens: Arc<TokenStore>) -> Router {
    state.attach_container_tokens(tokens.clone());
    tokens::record(&tokens.reconcile(&state.config().apps, state.moment()));
    let task_state = state.clone();
    let task_tokens = tokens.clone();
    state.spawn_background("container token rotation", move |stop| {
        rotate_on_schedule(task_state, task_tokens, stop)
    });
    router(state.clone(), tokens)
}

/// Replaces each app's token once it is `container.rotate_every` old (real time: see
/// `token::container`), until `stop`.
pub async fn rotate_on_schedule(state: AppState, tokens: Arc<TokenStore>, stop: CancellationToken) {
    loop {
        let Some(settings) = state.config().container.clone() else {
            return;
        };
        let wait = tokens
            .next_due(settings.rotate_every, state.moment())
            .map_or(ROTATION_CHECK, |due| due.min(ROTATION_CHECK));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let (store, now) = (tokens.clone(), state.moment());
        let rotated = tokio::task::spawn_blocking(move || {
            store.rotate_due(settings.rotate_every, settings.grace, now)
        })
        .await;
        match rotated {
            Ok(rotations) => tokens::record(&rotations),
            Err(e) => tracing::error!(error = %e, "container token rotation failed"),
        }
    }
}

//! The security checks every request passes, in order, before any route sees it: relayed
//! requests (proxies, browsers, foreign `Host`) are refused, the caller's rate is checked, then
//! the session token for metadata reads.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ImdsError;
use super::{ConnectionInfo, Matched, TOKEN_HEADER, caller_of};
use crate::audit::{self, DenyReason};
use crate::config::ImdsV1;
use crate::rate_limit::CallerLimiter;
use crate::state::AppState;
use crate::token::TokenError;

/// Refuses requests that were relayed or could come from a web page:
/// - `X-Forwarded-For`/`Forwarded`: real IMDS refuses proxied token requests, and a proxy on this
///   host would make its own identity stand for its clients'.
/// - `Origin`, `Referer`, `Sec-Fetch-*`: browser markers; no SDK sends them.
/// - a `Host` that is not one of the daemon's own addresses: a page on a rebound DNS name.
pub async fn refuse_relayed(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ImdsError> {
    let conn = caller_of(request.extensions())?;
    let headers = request.headers();
    let refusal =
        if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
            Some((DenyReason::Forwarded, "forwarded requests are refused"))
        } else if headers.contains_key(header::ORIGIN)
            || headers.contains_key(header::REFERER)
            || headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"))
        {
            Some((DenyReason::Browser, "browser requests are refused"))
        } else if !host_allowed(&state, conn, headers.get(header::HOST)) {
            Some((
                DenyReason::ForeignHost,
                "the Host header does not name this daemon",
            ))
        } else {
            None
        };
    if let Some((reason, message)) = refusal {
        audit::token_rejected(conn, reason, message);
        return Err(ImdsError::Forbidden(message));
    }
    Ok(next.run(request).await)
}

/// The link-local IMDS addresses every SDK uses by default: 169.254.169.254, fd00:ec2::254.
const IMDS_HOSTS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Checked on every request, so without allocating: names compare case-insensitively
/// (`allowed_hosts` are lower-case), addresses parse in either case.
fn host_allowed(state: &AppState, conn: &ConnectionInfo, host: Option<&HeaderValue>) -> bool {
    // HTTP/1.0 clients may send no Host; browsers always send one.
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = strip_port(host);
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip == conn.local.ip()
            || IMDS_HOSTS.contains(&ip)
            || state.config().server.listen.iter().any(|l| l.ip() == ip);
    }
    (name.eq_ignore_ascii_case("localhost") && conn.local.ip().is_loopback())
        || state
            .config()
            .server
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → the host part, unbracketed.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// One caller (by resolved identity) may not starve the others.
pub async fn rate_limit(
    State(limiter): State<Arc<CallerLimiter>>,
    request: Request,
    next: Next,
) -> Result<Response, ImdsError> {
    let conn = caller_of(request.extensions())?;
    if let Err(retry_after) = limiter.check(&conn.token_binding()) {
        audit::token_rejected(conn, DenyReason::RateLimited, "request rate over the limit");
        return Err(ImdsError::RateLimited { retry_after });
    }
    Ok(next.run(request).await)
}

/// Metadata reads need a valid token minted for this caller, unless IMDSv1 is allowed and no
/// token is presented. A presented token is always checked, in both modes.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ImdsError> {
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    if !is_read || request.uri().path().ends_with("/api/token") {
        return Ok(next.run(request).await);
    }
    let conn = caller_of(request.extensions())?;
    let mut tokens = request.headers().get_all(TOKEN_HEADER).iter();
    let verdict = match (tokens.next(), tokens.next()) {
        (Some(token), None) => token
            .to_str()
            .map_err(|_| TokenError::Malformed)
            .and_then(|t| {
                state
                    .token_key()
                    .verify(t, &conn.token_binding(), state.now())
            })
            .map(|_| ())
            .map_err(ImdsError::from),
        (Some(_), Some(_)) => Err(TokenError::Malformed.into()),
        (None, _) if state.config().server.imdsv1 == ImdsV1::Disabled => {
            Err(ImdsError::TokenRequired)
        }
        (None, _) => Ok(()),
    };
    if let Err(e) = verdict {
        audit::token_rejected(conn, DenyReason::BadToken, &e.to_string());
        return Err(e);
    }
    Ok(next.run(request).await)
}

/// Counts every request by path kind, status and the caller's app.
/// It also takes the request's one config snapshot and matches the caller's rule once, for the
/// handlers to use (see [`Matched`]).
pub async fn count(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = crate::metrics::path_kind(request.uri().path());
    let config = state.config();
    let app = caller_of(request.extensions())
        .ok()
        .and_then(|conn| crate::policy::find_app_index(&config.apps, conn));
    let app_label = app.map(|i| config.apps[i].name.clone()).unwrap_or_default();
    request.extensions_mut().insert(Matched { config, app });
    let response = next.run(request).await;
    metrics::counter!(
        crate::metrics::REQUESTS,
        "path" => path,
        "status" => crate::metrics::status_label(response.status()),
        "app" => app_label
    )
    .increment(1);
    response
}

/// Every response says it comes from EC2's metadata server; some tools detect EC2 by it.
pub async fn server_header(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

#[cfg(test)]
mod tests {
    use super::{IMDS_HOSTS, strip_port};
    use std::net::IpAddr;

    #[test]
    fn imds_hosts_are_the_documented_addresses() {
        assert_eq!(IMDS_HOSTS[0], "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!(IMDS_HOSTS[1], "fd00:ec2::254".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(strip_port("169.254.169.254"), "169.254.169.254");
        assert_eq!(strip_port("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(strip_port("[fd00:ec2::254]:80"), "fd00:ec2::254");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("evil.example:80"), "evil.example");
        assert_eq!(strip_port("fd00:ec2::254"), "fd00:ec2::254");
    }
}

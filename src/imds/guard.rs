//! The security checks every request passes, in order, before any route sees it, as one layer:
//! relayed requests (proxies, browsers, foreign `Host`) are refused, the caller's rate is
//! checked, then the session token for metadata reads.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ImdsError;
use super::{ConnectionInfo, Matched, TOKEN_HEADER, caller_of};
use crate::audit::{self, DenyReason};
use crate::config::ImdsV1;
use crate::rate_limit::CallerLimiter;
use crate::relay::{self, OwnHosts};
use crate::state::AppState;
use crate::token::TokenError;

/// What the guard layer holds: the daemon's state and the per-caller rate limiter.
#[derive(Clone)]
pub struct Guards {
    pub state: AppState,
    pub limiter: Arc<CallerLimiter>,
}

/// The one guard layer, its checks in order: takes the request's config snapshot and matches
/// the caller's rule once (see [`Matched`]), refuses relayed requests, checks the caller's
/// rate, then the session token; counts every request by path kind, status and app, and marks
/// every response as EC2's. One layer rather than one per check: each axum layer clones and
/// boxes per request, and four of them cost about a third of the cached-credential path.
pub async fn checks(State(guards): State<Guards>, mut request: Request, next: Next) -> Response {
    let path = crate::metrics::path_kind(request.uri().path());
    let config = guards.state.config();
    let app = caller_of(request.extensions())
        .ok()
        .and_then(|conn| crate::policy::find_app_index(&config.apps, conn));
    request.extensions_mut().insert(Matched {
        config: config.clone(),
        app,
    });
    let mut response = match admit(&guards, &request) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    };
    let app_name = app.map_or("", |i| config.apps[i].name.as_str());
    guards
        .state
        .counters()
        .request(path, response.status(), app_name);
    // Some tools detect EC2 by it.
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

fn admit(guards: &Guards, request: &Request) -> Result<(), ImdsError> {
    let conn = caller_of(request.extensions())?;
    refuse_relayed(&guards.state, conn, request)?;
    // One caller (by resolved identity) may not starve the others.
    if let Err(retry_after) = guards.limiter.check(&conn.binding) {
        audit::token_rejected(conn, DenyReason::RateLimited, "request rate over the limit");
        return Err(ImdsError::RateLimited { retry_after });
    }
    require_token(&guards.state, conn, &conn.binding, request)
}

/// Refuses requests relayed by a proxy, sent by a browser or addressed to a foreign `Host`
/// (see [`crate::relay`]); the IMDS addresses are the daemon's own wherever it listens.
fn refuse_relayed(
    state: &AppState,
    conn: &ConnectionInfo,
    request: &Request,
) -> Result<(), ImdsError> {
    let config = state.config();
    let own = OwnHosts {
        dialled: conn.local.ip(),
        addresses: IMDS_HOSTS
            .iter()
            .copied()
            .chain(config.server.listen.iter().map(|l| l.ip())),
        names: &config.server.allowed_hosts,
    };
    if let Some((reason, message)) = relay::refusal(request.headers(), own) {
        audit::token_rejected(conn, reason, message);
        return Err(ImdsError::Forbidden(message));
    }
    Ok(())
}

/// The link-local IMDS addresses every SDK uses by default: 169.254.169.254, fd00:ec2::254.
const IMDS_HOSTS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Metadata reads need a valid token minted for this caller (`binding`), unless IMDSv1 is
/// allowed and no token is presented. A presented token is always checked, in both modes.
fn require_token(
    state: &AppState,
    conn: &ConnectionInfo,
    binding: &str,
    request: &Request,
) -> Result<(), ImdsError> {
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    if !is_read || request.uri().path().ends_with("/api/token") {
        return Ok(());
    }
    let mut tokens = request.headers().get_all(TOKEN_HEADER).iter();
    let verdict = match (tokens.next(), tokens.next()) {
        (Some(token), None) => token
            .to_str()
            .map_err(|_| TokenError::Malformed)
            .and_then(|t| state.token_key().verify(t, binding, state.now()))
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::IMDS_HOSTS;
    use std::net::IpAddr;

    #[test]
    fn imds_hosts_are_the_documented_addresses() {
        assert_eq!(IMDS_HOSTS[0], "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!(IMDS_HOSTS[1], "fd00:ec2::254".parse::<IpAddr>().unwrap());
    }
}

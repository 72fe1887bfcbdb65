//! The security checks every request passes, in order, before any route sees it, as one layer:
//! relayed requests (proxies, browsers, foreign `Host`) are refused, the caller's rate is
//! checked, then the session token for metadata reads.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::error::ImdsError;
use super::{ConnectionInfo, Matched, TOKEN_HEADER, caller_of};
use crate::admit::{self, OwnHosts};
use crate::audit::{self, DenyReason};
use crate::config::{Config, ImdsV1};
use crate::policy::Verdict;
use crate::rate_limit::CallerLimiter;
use crate::state::AppState;
use crate::token::TokenError;

/// What the guard layer holds: the daemon's state and the per-caller rate limiter.
#[derive(Clone)]
pub struct Guards {
    pub state: AppState,
    pub limiter: Arc<CallerLimiter>,
}

/// The one guard layer, its checks in order: takes the request's config snapshot, refuses
/// relayed requests, checks the caller's rate, then the session token, and only then matches
/// the caller's rule, once (see [`Matched`]); counts every request by path kind, status and app, and marks
/// every response as EC2's. One hand-written layer rather than one `from_fn` per check: those
/// clone and box the inner service on every request, and four of them cost about a third of
/// the cached-credential path. The checks are synchronous, so nothing is boxed here.
#[derive(Clone)]
pub struct GuardLayer(pub Guards);

impl<S> Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, route: S) -> Guarded<S> {
        Guarded {
            guards: self.0.clone(),
            route,
        }
    }
}

/// A route behind the [`GuardLayer`].
#[derive(Clone)]
pub struct Guarded<S> {
    guards: Guards,
    route: S,
}

impl<S> Service<Request> for Guarded<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Guarding<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.route.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let path = crate::metrics::path_kind(request.uri().path());
        let config = self.guards.state.config();
        // Rules are matched only for an admitted request: a refused one costs no evaluation.
        let (outcome, app) = match admit(&self.guards, &config, &request) {
            Ok(conn) => {
                let (app, undecided) = match crate::policy::decide(&config.apps, conn) {
                    Verdict::App(i) => (Some(i), None),
                    Verdict::NoMatch => (None, None),
                    Verdict::Undecided { app, reason } => (
                        None,
                        Some(Arc::from(format!(
                            "rule app[{app}] {:?} needs the container runtime: {reason}",
                            config.apps[app].name
                        ))),
                    ),
                };
                request.extensions_mut().insert(Matched {
                    config: config.clone(),
                    app,
                    undecided,
                });
                let route = self.route.call(request);
                (Outcome::Admitted { route }, app)
            }
            Err(e) => (
                Outcome::Refused {
                    response: Some(e.into_response()),
                },
                None,
            ),
        };
        Guarding {
            outcome,
            count: Count {
                state: self.guards.state.clone(),
                path,
                config,
                app,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The route's response or the refusal, counted and marked on the way out.
    pub struct Guarding<F> {
        #[pin]
        outcome: Outcome<F>,
        count: Count,
    }
}

pin_project_lite::pin_project! {
    #[project = OutcomeProj]
    enum Outcome<F> {
        Admitted { #[pin] route: F },
        Refused { response: Option<Response> },
    }
}

/// What the request is counted under once its status is known.
struct Count {
    state: AppState,
    path: &'static str,
    config: Arc<Config>,
    app: Option<usize>,
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Guarding<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.outcome.project() {
            OutcomeProj::Admitted { route } => match ready!(route.poll(cx)) {
                Ok(response) => response,
            },
            OutcomeProj::Refused { response } => response
                .take()
                .expect("a guarded request is polled to completion once"),
        };
        let count = &*this.count;
        let app_name = count.app.map_or("", |i| count.config.apps[i].name.as_str());
        count
            .state
            .counters()
            .request(count.path, response.status(), app_name);
        // Some tools detect EC2 by it.
        response
            .headers_mut()
            .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
        Poll::Ready(Ok(response))
    }
}

/// The checks, in order, under the request's config snapshot: the shared first step
/// ([`crate::admit`]), then the session token.
fn admit<'r>(
    guards: &Guards,
    config: &Config,
    request: &'r Request,
) -> Result<&'r ConnectionInfo, ImdsError> {
    let conn = caller_of(request.extensions())?;
    // The IMDS addresses are the daemon's own wherever it listens.
    let own = OwnHosts {
        dialled: conn.local.ip(),
        addresses: IMDS_HOSTS
            .iter()
            .copied()
            .chain(config.server.listen.iter().map(|l| l.ip())),
        names: &config.server.allowed_hosts,
    };
    admit::admit(conn, request.uri(), request.headers(), own, &guards.limiter)?;
    require_token(&guards.state, config, conn, request)?;
    Ok(conn)
}

/// The link-local IMDS addresses every SDK uses by default: 169.254.169.254, fd00:ec2::254.
const IMDS_HOSTS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Metadata reads need a valid token minted for this caller, unless IMDSv1 is allowed and no
/// token is presented. A presented token is always checked, in both modes.
fn require_token(
    state: &AppState,
    config: &Config,
    conn: &ConnectionInfo,
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
            .and_then(|t| {
                state
                    .token_key()
                    .verify(t, &conn.binding, state.boot_time())
            })
            .map(|_| ())
            .map_err(ImdsError::from),
        (Some(_), Some(_)) => Err(TokenError::Malformed.into()),
        (None, _) if config.server.imdsv1 == ImdsV1::Disabled => Err(ImdsError::TokenRequired),
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

//! The security checks every request passes, in order, before any route sees it: forwarded
//! requests are refused, then the session token is checked for metadata reads.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ImdsError;
use super::{TOKEN_HEADER, caller_of};
use crate::audit::{self, DenyReason};
use crate::config::ImdsV1;
use crate::state::AppState;
use crate::token::TokenError;

/// Real IMDS refuses token requests that carry `X-Forwarded-For`: they come through a proxy,
/// which could be relaying for anyone. The broker refuses them (and `Forwarded`) on every path,
/// since a proxy on this host would make its own identity stand for its clients'.
pub async fn reject_forwarded(request: Request, next: Next) -> Result<Response, ImdsError> {
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        if let Ok(conn) = caller_of(request.extensions()) {
            audit::token_rejected(conn, DenyReason::Forwarded, "forwarded request");
        }
        return Err(ImdsError::Forbidden("forwarded requests are refused"));
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

/// Every response says it comes from EC2's metadata server; some tools detect EC2 by it.
pub async fn server_header(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

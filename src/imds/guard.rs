//! The security checks every request passes, in order, before any route sees it: forwarded
//! requests are refused, then the session token is checked for metadata reads.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ImdsError;
use super::{TOKEN_HEADER, caller_of};
use crate::config::ImdsV1;
use crate::state::AppState;

/// Real IMDS refuses token requests that carry `X-Forwarded-For`: they come through a proxy,
/// which could be relaying for anyone. The broker refuses them (and `Forwarded`) on every path,
/// since a proxy on this host would make its own identity stand for its clients'.
pub async fn reject_forwarded(request: Request, next: Next) -> Result<Response, ImdsError> {
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
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
    let mut tokens = request.headers().get_all(TOKEN_HEADER).iter();
    match (tokens.next(), tokens.next()) {
        (Some(token), None) => {
            let caller = caller_of(request.extensions())?;
            let token = token
                .to_str()
                .map_err(|_| crate::token::TokenError::Malformed)?;
            state
                .token_key()
                .verify(token, &caller.token_binding(), state.now())?;
        }
        (Some(_), Some(_)) => return Err(crate::token::TokenError::Malformed.into()),
        (None, _) => {
            if state.config().server.imdsv1 == ImdsV1::Disabled {
                return Err(ImdsError::TokenRequired);
            }
        }
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

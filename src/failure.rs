//! Where a refused or failed request becomes an HTTP status, for both credential surfaces.
//! Each surface names what kind of failure it has ([`Failure`]); this module alone decides
//! the status and the protocol headers (`Allow`, `Retry-After`) and what is logged; the
//! surface renders only its body (the IMDS error page, the container endpoint's JSON).

use std::fmt::Display;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::credentials::CacheError;

/// What went wrong, as far as the status and headers are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed {
        allow: &'static str,
    },
    RateLimited {
        retry_after: Duration,
    },
    /// STS or the cache failed in a way that may pass (throttling, timeouts): 503.
    Unavailable,
    /// The AssumeRole call is still running past the request's wait: 503 with `Retry-After`,
    /// since a retry soon may well find the credentials cached.
    Pending {
        retry_after: Duration,
    },
    Internal,
}

/// What a caller cut off while STS is still answering is told to wait: the smallest whole
/// second `Retry-After` can say. SDKs' IMDS clients ignore it; other callers need a hint.
pub const PENDING_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Failure {
    /// A credential failure: transient ones are worth retrying.
    pub fn of_credentials(e: &CacheError) -> Self {
        if let CacheError::Pending(_) = e {
            Failure::Pending {
                retry_after: PENDING_RETRY_AFTER,
            }
        } else if e.is_transient() {
            Failure::Unavailable
        } else {
            Failure::Internal
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::Unauthorized => StatusCode::UNAUTHORIZED,
            Failure::Forbidden => StatusCode::FORBIDDEN,
            Failure::NotFound => StatusCode::NOT_FOUND,
            Failure::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Failure::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Failure::Unavailable | Failure::Pending { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The response for `failure` (whose detail is `error`) from `surface`, with the body
/// `render` makes for its status. A 5xx detail goes to the log only: `render` is not told.
pub fn respond(
    failure: Failure,
    error: &dyn Display,
    surface: &'static str,
    render: impl FnOnce(StatusCode) -> Response,
) -> Response {
    let status = failure.status();
    if status.is_server_error() {
        tracing::error!(error = %error, status = status.as_u16(), surface, "request failed");
    } else {
        tracing::debug!(reason = %error, status = status.as_u16(), surface, "request refused");
    }
    let mut response = render(status);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    match failure {
        Failure::MethodNotAllowed { allow } => {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        Failure::RateLimited { retry_after } | Failure::Pending { retry_after } => {
            let secs = crate::rate_limit::retry_after_secs(retry_after);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        _ => {}
    }
    response
}

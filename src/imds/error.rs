//! The one place where a failure becomes an HTTP status, in the shape IMDS answers with.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::admit::Refused;
use crate::credentials::CacheError;
use crate::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] TokenError),
    #[error("a token is required (IMDSv1 is disabled)")]
    TokenRequired,
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    #[error("credentials unavailable: {0}")]
    Credentials(#[from] CacheError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<Refused> for ImdsError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Relayed(message) => ImdsError::Forbidden(message),
            Refused::RateLimited { retry_after } => ImdsError::RateLimited { retry_after },
        }
    }
}

impl ImdsError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ImdsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ImdsError::Unauthorized(_) | ImdsError::TokenRequired => StatusCode::UNAUTHORIZED,
            ImdsError::Forbidden(_) => StatusCode::FORBIDDEN,
            ImdsError::NotFound => StatusCode::NOT_FOUND,
            ImdsError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ImdsError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ImdsError::Credentials(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ImdsError::Credentials(_) | ImdsError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ImdsError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        if status.is_server_error() {
            // The detail is for the operator; the caller gets the generic page.
            tracing::error!(error = %self, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(reason = %self, status = status.as_u16(), "request refused");
        }
        let mut response = (status, error_page(status)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        match self {
            ImdsError::MethodNotAllowed { allow } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ImdsError::RateLimited { retry_after } => {
                let secs = crate::rate_limit::retry_after_secs(retry_after);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        response
    }
}

/// The small XHTML page real IMDS sends with its errors.
pub fn error_page(status: StatusCode) -> String {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )
}

//! The one place where a failure becomes an HTTP status, in the shape IMDS answers with.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::admit::Refused;
use crate::credentials::CacheError;
use crate::failure::{self, Failure};
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
    pub fn failure(&self) -> Failure {
        match self {
            ImdsError::BadRequest(_) => Failure::BadRequest,
            ImdsError::Unauthorized(_) | ImdsError::TokenRequired => Failure::Unauthorized,
            ImdsError::Forbidden(_) => Failure::Forbidden,
            ImdsError::NotFound => Failure::NotFound,
            ImdsError::MethodNotAllowed { allow } => Failure::MethodNotAllowed { allow },
            ImdsError::RateLimited { retry_after } => Failure::RateLimited {
                retry_after: *retry_after,
            },
            ImdsError::Credentials(e) => Failure::of_credentials(e),
            ImdsError::Internal(_) => Failure::Internal,
        }
    }

    pub fn status_code(&self) -> StatusCode {
        self.failure().status()
    }
}

impl IntoResponse for ImdsError {
    fn into_response(self) -> Response {
        // Whatever the failure, the caller gets the generic page.
        failure::respond(self.failure(), &self, "imds", |status| {
            (
                [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
                error_page(status),
            )
                .into_response()
        })
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

//! The one place where a container endpoint failure becomes an HTTP status, with the JSON body
//! SDKs read: Go decodes lowercase `code`/`message`, the JS SDK reads `Code`/`Message`; both
//! carry the same text.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::admit::Refused;
use crate::credentials::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("missing Authorization header")]
    MissingToken,
    #[error("{0}")]
    BadToken(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    #[error("credentials unavailable: {0}")]
    Credentials(#[from] CacheError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<Refused> for ContainerError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Relayed(message) => ContainerError::Forbidden(message),
            Refused::RateLimited { retry_after } => ContainerError::RateLimited { retry_after },
        }
    }
}

impl ContainerError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ContainerError::MissingToken => StatusCode::UNAUTHORIZED,
            ContainerError::BadToken(_) | ContainerError::Forbidden(_) => StatusCode::FORBIDDEN,
            ContainerError::NotFound => StatusCode::NOT_FOUND,
            ContainerError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ContainerError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ContainerError::Credentials(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ContainerError::Credentials(_) | ContainerError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ContainerError::MissingToken => "Unauthorized",
            ContainerError::BadToken(_) | ContainerError::Forbidden(_) => "AccessDenied",
            ContainerError::NotFound => "NotFound",
            ContainerError::MethodNotAllowed => "MethodNotAllowed",
            ContainerError::RateLimited { .. } => "Throttling",
            ContainerError::Credentials(_) | ContainerError::Internal(_) => "ServiceUnavailable",
        }
    }
}

#[derive(serde::Serialize)]
struct Body {
    code: &'static str,
    message: String,
    #[serde(rename = "Code")]
    code_upper: &'static str,
    #[serde(rename = "Message")]
    message_upper: String,
}

impl IntoResponse for ContainerError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let message = if status.is_server_error() {
            // The detail is for the operator's log, not for the caller.
            tracing::error!(error = %self, status = status.as_u16(), "container request failed");
            "credentials are unavailable; try again later".to_owned()
        } else {
            tracing::debug!(reason = %self, status = status.as_u16(), "container request refused");
            self.to_string()
        };
        let code = self.code();
        let mut response = (
            status,
            Json(Body {
                code,
                message: message.clone(),
                code_upper: code,
                message_upper: message,
            }),
        )
            .into_response();
        match self {
            ContainerError::MethodNotAllowed => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            ContainerError::RateLimited { retry_after } => {
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

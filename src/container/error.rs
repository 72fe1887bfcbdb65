//! The one place where a container endpoint failure becomes an HTTP status, with the JSON body
//! SDKs read: Go decodes lowercase `code`/`message`, the JS SDK reads `Code`/`Message`; both
//! carry the same text.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::admit::Refused;
use crate::credentials::CacheError;
use crate::failure::{self, Failure};

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
    pub fn failure(&self) -> Failure {
        match self {
            ContainerError::MissingToken => Failure::Unauthorized,
            ContainerError::BadToken(_) | ContainerError::Forbidden(_) => Failure::Forbidden,
            ContainerError::NotFound => Failure::NotFound,
            ContainerError::MethodNotAllowed => Failure::MethodNotAllowed { allow: "GET" },
            ContainerError::RateLimited { retry_after } => Failure::RateLimited {
                retry_after: *retry_after,
            },
            ContainerError::Credentials(e) => Failure::of_credentials(e),
            ContainerError::Internal(_) => Failure::Internal,
        }
    }

    pub fn status_code(&self) -> StatusCode {
        self.failure().status()
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
        let code = self.code();
        let detail = self.to_string();
        failure::respond(self.failure(), &self, "container", |status| {
            let message = if status.is_server_error() {
                // The detail is for the operator's log, not for the caller.
                "credentials are unavailable; try again later".to_owned()
            } else {
                detail
            };
            Json(Body {
                code,
                message: message.clone(),
                code_upper: code,
                message_upper: message,
            })
            .into_response()
        })
    }
}

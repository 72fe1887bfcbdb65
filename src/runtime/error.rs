//! Why the container runtime could not say what a container is. Every message names the
//! socket asked, because operators read these in `explain`, `doctor` and audit details.

use std::path::PathBuf;
use std::time::Duration;

/// Cloneable: one failed lookup answers every caller that shared it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No socket in the list accepted a connection; `tried` says why for each.
    #[error("no container runtime answers: {tried}")]
    Unreachable { tried: String },
    #[error("the container runtime at {} knows no container {id}", socket.display())]
    NotFound { id: String, socket: PathBuf },
    #[error(
        "the container runtime at {} did not answer within {}",
        socket.display(),
        humantime::format_duration(*after)
    )]
    Timeout { socket: PathBuf, after: Duration },
    /// The runtime answered with an error status other than 404.
    #[error("the container runtime at {} answered {status}: {message}", socket.display())]
    Status {
        socket: PathBuf,
        status: u16,
        message: String,
    },
    /// An answer this client cannot use: not HTTP, not the JSON expected, too large, or about
    /// another container than the one asked for. The text names the socket.
    #[error("{0}")]
    Protocol(String),
    /// Refused before any request: only such names can be put in a URL path unescaped.
    #[error("not a container {expected}: {given:?}")]
    BadId {
        expected: &'static str,
        given: String,
    },
}

impl RuntimeError {
    /// The `outcome` label of [`crate::metrics::RUNTIME_REQUESTS`] (a bad id is refused
    /// before any request, so it is never counted).
    pub fn outcome(&self) -> &'static str {
        match self {
            RuntimeError::Unreachable { .. } => "unreachable",
            RuntimeError::NotFound { .. } => "not_found",
            RuntimeError::Timeout { .. } => "timeout",
            RuntimeError::Status { .. } => "status",
            RuntimeError::Protocol(_) => "protocol",
            RuntimeError::BadId { .. } => "bad_id",
        }
    }
}

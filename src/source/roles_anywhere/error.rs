//! What can go wrong between the files on disk and a Roles Anywhere session. No variant holds
//! key material: a key's problems are described, never quoted.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RolesAnywhereError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{}: the private key is readable by group or others (mode {mode:o}); it must be 0600 or 0400",
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("{}: {reason}", path.display())]
    Certificate { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    PrivateKey { path: PathBuf, reason: String },

    /// The key file and the certificate hold different keys: a request signed with one would be
    /// checked against the other.
    #[error("{} does not belong to the certificate {}: {reason}", key.display(), certificate.display())]
    Mismatch {
        certificate: PathBuf,
        key: PathBuf,
        reason: String,
    },

    #[error("source.endpoint_url {url:?}: {reason}")]
    Endpoint { url: String, reason: String },

    #[error("cannot set up TLS for Roles Anywhere: {0}")]
    Tls(std::io::Error),

    #[error("signing the CreateSession request failed")]
    Sign,

    /// Roles Anywhere answered, and said no.
    #[error("Roles Anywhere refused CreateSession: HTTP {status}: {message}")]
    Refused { status: u16, message: String },

    #[error("cannot reach Roles Anywhere at {url}: {reason}")]
    Transport { url: String, reason: String },

    #[error("no answer from Roles Anywhere at {url} within {limit:?}")]
    Timeout { url: String, limit: Duration },

    #[error("Roles Anywhere's answer {reason}")]
    BadResponse { reason: String },

    /// A recent CreateSession failed, and the pause after it has not run out.
    #[error("not calling Roles Anywhere again for {retry_in:?} after a failure: {last}")]
    Backoff { retry_in: Duration, last: String },
}

//! Role credentials: what they are, where they come from (STS, behind a trait so tests can fake
//! it), and the per-app cache that shares one STS call among concurrent callers.

mod cache;
mod self_loop;
mod sts;

use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

pub use cache::{CacheError, Clock, CredentialCache, FAILURE_HOLD, REFRESH_LEAD, SystemClock};
pub use self_loop::{ProcessSettings, SelfLoopError, Settings, check_not_own_source};
pub use sts::StsSource;

use crate::arn::RoleArn;
use crate::secret::Secret;

/// Everything that goes into one AssumeRole call. Two apps share cached credentials only when
/// every field is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRoleInput {
    pub role_arn: RoleArn,
    pub session_name: String,
    pub duration: Duration,
}

/// Temporary credentials for one role session. The secret parts never print.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expiration: SystemTime,
    /// When the broker obtained them (IMDS `LastUpdated`).
    pub issued_at: SystemTime,
}

impl Credentials {
    /// Validity left at `now`; zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// Why STS did not give us credentials. Cloned to every caller waiting on the same call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// A permanent refusal (AccessDenied, ValidationError, MalformedPolicyDocument, ...): retrying
    /// the same input cannot help.
    #[error("STS refused AssumeRole: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("STS throttled AssumeRole: {code}")]
    Throttled { code: String },
    /// Timeouts, connection failures and 5xx.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
    /// STS answered but the credentials cannot be served (missing fields, too short a session).
    #[error("STS returned unusable credentials: {0}")]
    Unusable(String),
}

/// Where role credentials come from. The daemon uses [`StsSource`]; tests inject fakes that are
/// slow, throttle, fail or deny.
pub trait CredentialSource: Send + Sync + 'static {
    fn assume_role(
        &self,
        input: AssumeRoleInput,
    ) -> BoxFuture<'static, Result<Credentials, StsError>>;
}

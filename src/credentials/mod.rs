//! Role credentials: what they are, where they come from (STS, behind a trait so tests can fake
//! it), and how they are kept fresh.
//!
//! - [`cache`](CredentialCache): one entry per AssumeRole input; serves credentials, shares one
//!   STS call among concurrent callers, keeps serving the last good credentials while STS fails.
//! - `schedule`: when a refresh starts (jittered, so apps and hosts spread their calls), and
//!   when a prefetch app's first fetch starts after a start or a reload.
//! - `retry`: how long to wait after a failed STS call.
//! - `budget`: the global AssumeRole rate every STS call draws from.
//! - `refresh`: the background task that starts scheduled refreshes and drops idle entries.

mod audit;
mod budget;
mod cache;
mod refresh;
mod retry;
mod schedule;
mod self_loop;
mod sts;

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use futures_util::future::BoxFuture;

pub use budget::{StsBudget, TokioTime};
pub use cache::{
    CacheError, CacheStats, Clock, CredentialCache, DEGRADED_MIN_REMAINING, EntryStatus,
    FAILURE_HOLD, REFUSAL_HOLD, STS_ATTEMPT_TIMEOUT, SystemClock,
};
pub use refresh::{MAX_NAP, MIN_NAP};
pub use retry::{RETRY_BASE, RETRY_CAP, RETRY_JITTER, backoff};
pub use schedule::{PROOF_WINDOW, Phase, REFRESH_MARGIN, prefetch_delays, refresh_at};
pub use self_loop::{ProcessSettings, SelfLoopError, Settings, check_not_own_source};
pub use sts::{STS_CONNECT_TIMEOUT, StsSource};

pub use crate::config::AssumeRoleInput;
use crate::secret::Secret;

/// Temporary credentials for one role session. The secret parts never print.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expiration: SystemTime,
    /// When the broker obtained them (IMDS `LastUpdated`).
    pub issued_at: SystemTime,
    /// The responses that serve them, rendered on first use.
    pub rendered: Rendered,
}

/// Response bodies rendered from one set of credentials, each built once by the surface that
/// sends it: a cached set is served many times over and its documents never change, since
/// every field in them is fixed by the credentials and by the cache key they were obtained for
/// (the role ARN, hence the account). A clone starts empty, so a clone that is then altered
/// never serves a stale body.
#[derive(Default)]
pub struct Rendered([OnceLock<Bytes>; BodyKind::COUNT]);

/// Which document: each surface that serves credentials has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The IMDS `security-credentials/<role>` document.
    Imds,
    /// The container endpoint's document.
    Container,
}

impl BodyKind {
    const COUNT: usize = 2;
}

impl Clone for Rendered {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rendered(<redacted>)")
    }
}

impl Credentials {
    /// The `kind` document of these credentials, rendered by `render` the first time only.
    pub fn body(&self, kind: BodyKind, render: impl FnOnce(&Self) -> String) -> Bytes {
        self.rendered.0[kind as usize]
            .get_or_init(|| render(self).into())
            .clone()
    }

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

impl StsError {
    /// Whether the same call may succeed later (throttling, timeouts, 5xx): such failures are
    /// retried with backoff, and the last good credentials are served meanwhile. Refusals and
    /// unusable answers are not retried in a loop.
    pub fn is_transient(&self) -> bool {
        matches!(self, StsError::Throttled { .. } | StsError::Unavailable(_))
    }
}

/// Where role credentials come from. The daemon uses [`StsSource`]; tests inject fakes that are
/// slow, throttle, fail or deny.
pub trait CredentialSource: Send + Sync + 'static {
    fn assume_role(
        &self,
        input: AssumeRoleInput,
    ) -> BoxFuture<'static, Result<Credentials, StsError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_renders_afresh() {
        let creds = Credentials {
            access_key_id: "ASIAOLD".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI"),
            session_token: Secret::new("FwoGZXIvYXdz"),
            expiration: SystemTime::UNIX_EPOCH,
            issued_at: SystemTime::UNIX_EPOCH,
            rendered: Rendered::default(),
        };
        let render = |c: &Credentials| c.access_key_id.clone();
        assert_eq!(creds.body(BodyKind::Imds, render), "ASIAOLD");
        let mut changed = creds.clone();
        changed.access_key_id = "ASIANEW".into();
        assert_eq!(changed.body(BodyKind::Imds, render), "ASIANEW");
        assert_eq!(changed.body(BodyKind::Container, render), "ASIANEW");
        assert_eq!(
            creds.body(BodyKind::Imds, |_| unreachable!("rendered once")),
            "ASIAOLD"
        );
        let printed = format!("{creds:?}");
        assert!(
            !printed.contains("wJalr") && !printed.contains("FwoG"),
            "{printed}"
        );
    }
}

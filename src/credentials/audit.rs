//! The `sts.assume_role` audit event and metrics: every AssumeRole call the daemon makes, how
//! it went and how long it took (never a secret: the access key id only).

use std::sync::Arc;
use std::time::Duration;

use super::{AssumeRoleInput, CacheError, Credentials, StsError};

/// One STS AssumeRole call and how it went (no caller: the daemon makes these calls itself).
pub(super) fn sts_call(
    input: &AssumeRoleInput,
    result: &Result<Arc<Credentials>, CacheError>,
    latency: Duration,
) {
    let (outcome, code) = match result {
        Ok(_) => ("ok", String::new()),
        Err(CacheError::Sts(StsError::Throttled { code })) => ("throttled", code.clone()),
        Err(CacheError::Sts(StsError::Refused { code, .. })) => ("refused", code.clone()),
        Err(CacheError::Sts(StsError::Unavailable(_))) => ("unavailable", String::new()),
        Err(CacheError::Sts(StsError::Unusable(_)) | CacheError::TaskFailed) => {
            ("unusable", String::new())
        }
        // Never from an STS call; here only so the match stays whole.
        Err(CacheError::AuditUnavailable(_) | CacheError::Pending(_)) => {
            ("unavailable", String::new())
        }
    };
    metrics::counter!(crate::metrics::STS_CALLS, "outcome" => outcome, "code" => code.clone())
        .increment(1);
    metrics::histogram!(crate::metrics::STS_LATENCY).record(latency.as_secs_f64());
    let latency_ms = latency.as_millis() as u64;
    match result {
        Ok(creds) => tracing::info!(
            target: "audit",
            event = "sts.assume_role",
            outcome,
            role_arn = %input.role_arn,
            session_name = %input.session_name,
            latency_ms,
            access_key_id = %creds.access_key_id,
            expiration = %crate::time::imds_time(creds.expiration),
            "AssumeRole succeeded"
        ),
        Err(e) => tracing::warn!(
            target: "audit",
            event = "sts.assume_role",
            outcome,
            role_arn = %input.role_arn,
            session_name = %input.session_name,
            latency_ms,
            code,
            error = %e,
            "AssumeRole failed"
        ),
    }
}

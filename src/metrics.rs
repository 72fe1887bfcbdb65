//! Prometheus metrics: every name in one place, recorded through the `metrics` facade where
//! the decision is made (decisions are counted in [`crate::audit`], so metrics and the audit
//! trail cannot disagree), and rendered by the admin listener.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use metrics::SharedString;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests by `path` kind, `status` and `app` ("" when the caller maps to none).
pub const REQUESTS: &str = "imds_broker_requests_total";
/// Credential documents served, by `app`.
pub const CREDENTIALS_SERVED: &str = "imds_broker_credentials_served_total";
/// Refusals by `reason` (the audit reasons: no_rule, rate_limited, bad_token, ...).
pub const DENIALS: &str = "imds_broker_denials_total";
pub const TOKENS_ISSUED: &str = "imds_broker_tokens_issued_total";
/// Session tokens issued and not yet expired.
pub const ACTIVE_TOKENS: &str = "imds_broker_active_tokens";
/// STS AssumeRole calls by `outcome` (ok, throttled, unavailable, refused, unusable) and `code`.
pub const STS_CALLS: &str = "imds_broker_sts_calls_total";
pub const STS_LATENCY: &str = "imds_broker_sts_latency_seconds";
/// Seconds until the cached credentials of `app` expire.
pub const CREDENTIAL_EXPIRY: &str = "imds_broker_credentials_expiry_seconds";
pub const CACHE_ENTRIES: &str = "imds_broker_cache_entries";
/// Apps whose STS calls are failing while they serve their last good credentials.
pub const DEGRADED_ENTRIES: &str = "imds_broker_degraded_entries";
/// Requests answered with last good credentials below `min_remaining` (STS failing).
pub const DEGRADED_SERVES: &str = "imds_broker_degraded_serves_total";

/// STS latency buckets, in seconds: from a fast regional endpoint to a timing-out one.
const STS_LATENCY_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide recorder and returns the handle that renders the exposition.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STS_LATENCY.into()), STS_LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "IMDS requests by path kind, status and app");
    metrics::describe_counter!(CREDENTIALS_SERVED, "Credential documents served, by app");
    metrics::describe_counter!(DENIALS, "Refused requests and connections, by reason");
    metrics::describe_counter!(TOKENS_ISSUED, "IMDSv2 session tokens issued");
    metrics::describe_gauge!(ACTIVE_TOKENS, "Session tokens issued and not yet expired");
    metrics::describe_counter!(STS_CALLS, "STS AssumeRole calls, by outcome and error code");
    metrics::describe_histogram!(
        STS_LATENCY,
        metrics::Unit::Seconds,
        "STS AssumeRole latency"
    );
    metrics::describe_gauge!(
        CREDENTIAL_EXPIRY,
        metrics::Unit::Seconds,
        "Seconds until an app's cached credentials expire"
    );
    metrics::describe_gauge!(CACHE_ENTRIES, "Cached credential sets");
    metrics::describe_gauge!(
        DEGRADED_ENTRIES,
        "Apps serving last good credentials while STS fails"
    );
    metrics::describe_counter!(DEGRADED_SERVES, "Requests answered in degraded mode");
}

/// The kind of IMDS path, a bounded label set (raw paths would let callers create series).
pub fn path_kind(path: &str) -> &'static str {
    if path.ends_with("/api/token") {
        "token"
    } else if let Some(rest) = path
        .strip_prefix("/latest/meta-data/iam/security-credentials")
        .map(|r| r.strip_prefix("-extended").unwrap_or(r))
    {
        if rest.trim_matches('/').is_empty() {
            "role_listing"
        } else {
            "credentials"
        }
    } else if path.starts_with("/latest/meta-data") || path.starts_with("/latest/dynamic") {
        "metadata"
    } else {
        "other"
    }
}

/// The `status` label of [`REQUESTS`]; the statuses the daemon answers with cost no allocation.
pub fn status_label(status: StatusCode) -> SharedString {
    let code = match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => return SharedString::from(status.as_str().to_owned()),
    };
    SharedString::const_str(code)
}

/// Tokens are stateless, so the daemon keeps only counts of their expiry, per minute.
static TOKEN_EXPIRIES: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());

pub fn token_issued(expires: SystemTime) {
    metrics::counter!(TOKENS_ISSUED).increment(1);
    let minute = unix_secs(expires).div_ceil(60);
    *TOKEN_EXPIRIES
        .lock()
        .expect("token expiry lock")
        .entry(minute)
        .or_default() += 1;
}

/// Drops expired minutes and publishes how many tokens are still valid (to the minute).
pub fn update_active_tokens(now: SystemTime) {
    let mut expiries = TOKEN_EXPIRIES.lock().expect("token expiry lock");
    let current = unix_secs(now) / 60;
    *expiries = expiries.split_off(&(current + 1));
    let active: u64 = expiries.values().sum();
    metrics::gauge!(ACTIVE_TOKENS).set(active as f64);
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_kinds_are_a_small_fixed_set() {
        assert_eq!(path_kind("/latest/api/token"), "token");
        assert_eq!(
            path_kind("/latest/meta-data/iam/security-credentials/"),
            "role_listing"
        );
        assert_eq!(
            path_kind("/latest/meta-data/iam/security-credentials"),
            "role_listing"
        );
        assert_eq!(
            path_kind("/latest/meta-data/iam/security-credentials-extended/"),
            "role_listing"
        );
        assert_eq!(
            path_kind("/latest/meta-data/iam/security-credentials/app-a"),
            "credentials"
        );
        assert_eq!(
            path_kind("/latest/meta-data/iam/security-credentials-extended/x"),
            "credentials"
        );
        assert_eq!(path_kind("/latest/meta-data/placement/region"), "metadata");
        assert_eq!(
            path_kind("/latest/dynamic/instance-identity/document"),
            "metadata"
        );
        assert_eq!(path_kind("/x/y"), "other");
    }

    #[test]
    fn status_labels_are_the_three_digit_code() {
        for code in 100..=999 {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(status_label(status).as_ref(), status.as_str());
        }
    }
}

//! Prometheus metrics: every name in one place, recorded through the `metrics` facade where
//! the decision is made (decisions are counted in [`crate::audit`], so metrics and the audit
//! trail cannot disagree), and rendered by the admin listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use axum::http::StatusCode;
use metrics::{Counter, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::time::BootTime;

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
/// Prefetch apps whose first fetch waits for its moment of the start-up spread.
pub const PREFETCH_PENDING: &str = "imds_broker_prefetch_pending";
/// Apps whose STS calls are failing while they serve their last good credentials.
pub const DEGRADED_ENTRIES: &str = "imds_broker_degraded_entries";
/// Requests answered with last good credentials below `min_remaining` (STS failing).
pub const DEGRADED_SERVES: &str = "imds_broker_degraded_serves_total";

/// The audit file's last sequence number (its checkpoint; the hash is in the log and /status).
pub const AUDIT_LAST_SEQ: &str = "imds_broker_audit_last_seq";
/// The audit file's current sealing epoch.
pub const AUDIT_EPOCH: &str = "imds_broker_audit_epoch";
/// Audit file operations that failed, by `op` ([`AUDIT_FAILED_OPS`]): lines lost from the
/// file (`write`, `fsync`) or a rotation that kept writing the old file (`reopen`).
pub const AUDIT_WRITE_FAILURES: &str = "imds_broker_audit_write_failures_total";
/// 1 while the audit file is being written, 0 while its writes or fsyncs fail.
pub const AUDIT_HEALTHY: &str = "imds_broker_audit_healthy";
/// Audit events that could not be written (storage failing); an `audit.gap` line in the file
/// records each run of them once writing works again.
pub const AUDIT_EVENTS_LOST: &str = "imds_broker_audit_events_lost_total";
/// Credential requests refused because the audit file could not be written
/// (`[audit] on_failure = "refuse"`).
pub const AUDIT_REFUSED: &str = "imds_broker_audit_refused_total";
/// The `op` labels of [`AUDIT_WRITE_FAILURES`], each exported from the start (at zero).
pub const AUDIT_FAILED_OPS: &[&str] = &["write", "fsync", "reopen"];

/// Entries in each map that grows with distinct callers, by `map` ([`CALLER_STATE_MAPS`]);
/// each is capped (README, "Per-caller state").
pub const CALLER_STATE: &str = "imds_broker_caller_state_entries";
/// The `map` labels of [`CALLER_STATE`], each exported from the start (at zero).
pub const CALLER_STATE_MAPS: &[&str] = &[
    "rate_limiter",
    "audit_repeats",
    "exe_digests",
    "exe_hash_budget",
    "cgroup_index",
];
/// Audit events waiting for the writer (at most its queue's length).
pub const AUDIT_QUEUE: &str = "imds_broker_audit_queue_events";
/// Audit events dropped because the writer's queue was full (the writer is stuck or far
/// behind); each is also among [`AUDIT_EVENTS_LOST`] and in the next `audit.gap` line.
pub const AUDIT_QUEUE_DROPPED: &str = "imds_broker_audit_queue_dropped_total";

/// IMDS and container-endpoint connections open now (under `limits.max_connections`).
pub const OPEN_CONNECTIONS: &str = "imds_broker_open_connections";

/// Seconds until the Roles Anywhere certificate of `[source]` expires (negative after).
pub const SOURCE_CERTIFICATE_EXPIRY: &str = "imds_broker_source_certificate_expiry_seconds";

/// Other network namespaces of the host whose callers can be identified (`[containers]`).
pub const NETWORK_NAMESPACES: &str = "imds_broker_network_namespaces";
/// Container runtime API requests by `call` (inspect, find, events) and `outcome` (ok,
/// not_found, unreachable, timeout, status, protocol).
pub const RUNTIME_REQUESTS: &str = "imds_broker_runtime_requests_total";
/// Wall-clock steps the credential refresher noticed (the wall clock moving apart from the boot
/// clock by more than `time::STEP_TOLERANCE` between two of its passes).
pub const CLOCK_STEPS: &str = "imds_broker_clock_steps_total";

/// STS latency buckets, in seconds: from a fast regional endpoint to a timing-out one.
const STS_LATENCY_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide recorder and returns the handle that renders the exposition.
/// Later calls (a second daemon in one test process) get the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static INSTALLED: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED.lock().map_err(|e| e.to_string())?;
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STS_LATENCY.into()), STS_LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    *installed = Some(handle.clone());
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
        PREFETCH_PENDING,
        "Prefetch apps waiting for their moment of the start-up spread"
    );
    metrics::describe_gauge!(
        DEGRADED_ENTRIES,
        "Apps serving last good credentials while STS fails"
    );
    metrics::describe_counter!(DEGRADED_SERVES, "Requests answered in degraded mode");
    metrics::describe_gauge!(
        AUDIT_LAST_SEQ,
        "Sequence number of the audit file's last line"
    );
    metrics::describe_gauge!(AUDIT_EPOCH, "Current sealing epoch of the audit file");
    metrics::describe_counter!(
        AUDIT_WRITE_FAILURES,
        "Failed audit file operations, by op (write, fsync, reopen)"
    );
    metrics::describe_gauge!(OPEN_CONNECTIONS, "IMDS and container connections open");
    metrics::describe_gauge!(
        SOURCE_CERTIFICATE_EXPIRY,
        metrics::Unit::Seconds,
        "Seconds until the daemon's own Roles Anywhere certificate expires"
    );
    metrics::describe_gauge!(
        NETWORK_NAMESPACES,
        "Other network namespaces of this host indexed for container callers"
    );
    metrics::describe_counter!(
        RUNTIME_REQUESTS,
        "Container runtime API requests, by call and outcome"
    );
    metrics::describe_counter!(
        CLOCK_STEPS,
        "Wall-clock steps noticed (token lifetimes and rotation intervals are not affected)"
    );
    metrics::counter!(CLOCK_STEPS).increment(0);
    metrics::describe_gauge!(
        CALLER_STATE,
        "Entries in each per-caller map (each capped), by map"
    );
    metrics::describe_gauge!(AUDIT_QUEUE, "Audit events waiting for the writer");
    metrics::describe_counter!(
        AUDIT_QUEUE_DROPPED,
        "Audit events dropped because the writer's queue was full"
    );
    // Exported at zero before the first failure, so an alert on its increase sees the first one.
    for op in AUDIT_FAILED_OPS {
        metrics::counter!(AUDIT_WRITE_FAILURES, "op" => *op).increment(0);
    }
    metrics::counter!(AUDIT_QUEUE_DROPPED).increment(0);
    for map in CALLER_STATE_MAPS {
        metrics::gauge!(CALLER_STATE, "map" => *map).increment(0.0);
    }
}

/// Counts one failed audit file operation (`op` is one of [`AUDIT_FAILED_OPS`]); called by the
/// audit writer thread, never on the request path.
pub fn audit_write_failed(op: &'static str) {
    metrics::counter!(AUDIT_WRITE_FAILURES, "op" => op).increment(1);
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

/// Apps whose counter handles [`Counters`] keeps at most; past this it starts over.
const MAX_KEPT_APPS: usize = 4096;

/// Labelled counters counted on every request, their handles kept. The `metrics` macros build
/// a counter's key and look it up in the recorder's registry on each increment, which cost more
/// than the token check on a cached-credential request. A handle belongs to the recorder in
/// effect when it was first used (the daemon installs its recorder before serving).
#[derive(Default)]
pub struct Counters {
    requests: Mutex<HashMap<String, ByPathAndStatus>>,
    served: Mutex<HashMap<String, Counter>>,
}

impl Counters {
    /// Counts one IMDS request in [`REQUESTS`]; `app` is "" when the caller maps to none.
    pub fn request(&self, path: &'static str, status: StatusCode, app: &str) {
        let mut by_app = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        kept(&mut by_app, app, HashMap::new)
            .entry((path, status))
            .or_insert_with(|| {
                metrics::counter!(REQUESTS,
                    "path" => path,
                    "status" => status_label(status),
                    "app" => app.to_owned()
                )
            })
            .increment(1);
    }

    /// Counts one credential document served to `app`, in [`CREDENTIALS_SERVED`].
    pub fn served(&self, app: &str) {
        let mut by_app = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        kept(
            &mut by_app,
            app,
            || metrics::counter!(CREDENTIALS_SERVED, "app" => app.to_owned()),
        )
        .increment(1);
    }
}

/// One app's [`REQUESTS`] counters.
type ByPathAndStatus = HashMap<(&'static str, StatusCode), Counter>;

/// `app`'s entry, made by `make` if missing (and the map emptied first if it is full).
fn kept<'m, V>(map: &'m mut HashMap<String, V>, app: &str, make: impl FnOnce() -> V) -> &'m mut V {
    if !map.contains_key(app) {
        if map.len() >= MAX_KEPT_APPS {
            map.clear();
        }
        map.insert(app.to_owned(), make());
    }
    map.get_mut(app).expect("inserted above")
}

/// Tokens are stateless, so the daemon keeps only counts of their expiry, per minute of the
/// boot clock (their TTL is real time).
static TOKEN_EXPIRIES: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());

pub fn clock_stepped() {
    metrics::counter!(CLOCK_STEPS).increment(1);
}

pub fn token_issued(expires: BootTime) {
    token_issued_at(expires, BootTime::now());
}

/// [`token_issued`] at `now`: minutes already past are dropped here too, so the counts stay
/// within the longest token TTL (360 minutes) even when nothing reads the metrics.
fn token_issued_at(expires: BootTime, now: BootTime) {
    metrics::counter!(TOKENS_ISSUED).increment(1);
    let minute = expires.since_boot.as_secs().div_ceil(60);
    let mut expiries = TOKEN_EXPIRIES.lock().expect("token expiry lock");
    let current = now.since_boot.as_secs() / 60;
    if expiries
        .first_key_value()
        .is_some_and(|(&m, _)| m <= current)
    {
        *expiries = expiries.split_off(&(current + 1));
    }
    *expiries.entry(minute).or_default() += 1;
}

/// Drops expired minutes and publishes how many tokens are still valid (to the minute).
pub fn update_active_tokens(now: BootTime) {
    let mut expiries = TOKEN_EXPIRIES.lock().expect("token expiry lock");
    let current = now.since_boot.as_secs() / 60;
    *expiries = expiries.split_off(&(current + 1));
    let active: u64 = expiries.values().sum();
    metrics::gauge!(ACTIVE_TOKENS).set(active as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn kept_counters_count_like_the_macros_even_after_starting_over() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let counters = Counters::default();
        for _ in 0..3 {
            counters.request("credentials", StatusCode::OK, "app-a");
        }
        counters.request("credentials", StatusCode::UNAUTHORIZED, "app-a");
        counters.request("other", StatusCode::NOT_FOUND, "");
        counters.served("app-a");
        // Enough other apps to make it forget app-a's handles: counting goes on from 3.
        for i in 0..MAX_KEPT_APPS {
            counters.served(&format!("filler-{i}"));
        }
        counters.request("credentials", StatusCode::OK, "app-a");
        counters.served("app-a");
        let text = handle.render();
        for line in [
            r#"imds_broker_requests_total{path="credentials",status="200",app="app-a"} 4"#,
            r#"imds_broker_requests_total{path="credentials",status="401",app="app-a"} 1"#,
            r#"imds_broker_requests_total{path="other",status="404",app=""} 1"#,
            r#"imds_broker_credentials_served_total{app="app-a"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn token_expiry_counts_stay_within_the_longest_ttl_without_a_scrape() {
        // Decades into the boot: other tests of this process issue tokens now, into the same
        // counts, and this test's clock is past theirs, so it drops them (a few may sneak in).
        let start = BootTime {
            since_boot: Duration::from_secs(1_000_000_000),
            ..BootTime::now()
        };
        // A day of tokens, one a minute, each valid for 6 h; nobody renders the metrics.
        for minute in 0..24 * 60 {
            let now = start + Duration::from_secs(minute * 60);
            token_issued_at(now + Duration::from_secs(6 * 3600), now);
            let len = TOKEN_EXPIRIES.lock().unwrap().len();
            assert!(len <= 6 * 60 + 1 + 4, "{len} minutes kept");
        }
    }

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

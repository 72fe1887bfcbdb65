//! Audit events: one structured event per credential decision, emitted with target `audit` so
//! operators can route them apart from diagnostics, and written by [`sink`] to a hash-chained
//! file that [`chain::verify`] checks, forward-secure sealed by [`seal`] (keys in [`keyfile`])
//! with its [`checkpoint`] published outside the file. Each event names the caller as fully as
//! it was resolved; secrets never appear (only access key ids).

pub mod chain;
pub mod checkpoint;
pub mod health;
pub mod keyfile;
mod repeats;
pub mod seal;
pub mod sink;

use std::time::SystemTime;

use std::sync::LazyLock;

use crate::config::App;
use crate::identity::Caller;
use crate::time::imds_time;

/// Why a caller got no credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A local caller that no rule matches.
    NoRule,
    /// The caller could not be identified unambiguously.
    Unresolved,
    /// A caller with no socket on this host that no `source` rule covers.
    NotLocal,
    /// The caller asked for a role that is not its own.
    RoleMismatch,
    /// The request came through a proxy (`X-Forwarded-For`/`Forwarded`).
    Forwarded,
    /// The request carries browser markers (`Origin`, `Referer`, `Sec-Fetch-*`).
    Browser,
    /// The `Host` header names something other than this daemon (DNS rebinding).
    ForeignHost,
    /// The caller is over its request rate.
    RateLimited,
    /// The caller has too many open connections.
    ConnectionLimit,
    /// A token that is missing, forged, expired or minted for another caller.
    BadToken,
    /// STS could not provide credentials.
    Upstream,
    /// The rule that decides needs the container runtime's answer, and it did not give one.
    ContainerRuntime,
    /// The audit file cannot be written and `[audit] on_failure = "refuse"`.
    AuditUnavailable,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoRule => "no_rule",
            DenyReason::Unresolved => "unresolved",
            DenyReason::NotLocal => "not_local",
            DenyReason::RoleMismatch => "role_mismatch",
            DenyReason::Forwarded => "forwarded",
            DenyReason::Browser => "browser",
            DenyReason::ForeignHost => "foreign_host",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::ConnectionLimit => "connection_limit",
            DenyReason::BadToken => "bad_token",
            DenyReason::Upstream => "upstream",
            DenyReason::ContainerRuntime => "container_runtime",
            DenyReason::AuditUnavailable => "audit_unavailable",
        }
    }

    /// The reason a caller that matched no rule gets, by what kind of caller it is.
    pub fn unmatched(caller: &Caller) -> Self {
        match caller {
            Caller::Local(_) => DenyReason::NoRule,
            Caller::Remote { .. } => DenyReason::NotLocal,
            Caller::Unresolved { .. } => DenyReason::Unresolved,
        }
    }
}

/// One caller decision with target `audit`, naming the caller as far as it was resolved.
macro_rules! audit_event {
    ($level:ident, $event:literal, $caller:expr, $($rest:tt)*) => {{
        let caller: &$crate::identity::Caller = $caller;
        tracing::$level!(
            target: "audit",
            event = $event,
            peer = %caller.peer(),
            uid = caller.uid(),
            pid = caller.pid(),
            exe = caller.exe().map(|e| e.display().to_string()),
            cgroup = caller.cgroup(),
            unit = caller.unit(),
            user_unit = caller.user_unit().map(|(_, unit)| unit),
            container_engine = caller.container().map(|c| c.reference.engine.as_str()),
            container_id = caller.container().map(|c| &*c.reference.id),
            container_name = caller.container().and_then(|c| c.known()).map(|m| m.name.as_str()),
            container_image = caller.container().and_then(|c| c.known()).map(|m| m.image.as_str()),
            $($rest)*
        )
    }};
}
pub(crate) use audit_event;

/// Issuances already in the audit trail. Process-wide: a process runs one daemon.
static ISSUED: LazyLock<repeats::Issued> = LazyLock::new(repeats::Issued::default);

/// Audits the first of each (caller, endpoint, app, access key id), see [`repeats`];
/// `endpoint` is `imds` or `container`. Whether the issuance is recorded: `false` when its line
/// was dropped (the audit writer's queue is full), in which case it is neither counted as served
/// nor remembered, and under `on_failure = "refuse"` must not be served.
pub fn credentials_issued(
    caller: &Caller,
    endpoint: &'static str,
    app: &App,
    (access_key_id, expiration): (&str, SystemTime),
) -> bool {
    ISSUED.once(caller, endpoint, &app.name, access_key_id, || {
        sink::queued(|| {
            audit_event!(info, "credentials.issued", caller,
                endpoint,
                app = %app.name,
                role_arn = %app.role_arn(),
                access_key_id,
                expiration = %imds_time(expiration),
                "credentials issued"
            )
        })
    })
}

/// Credentials refused because the audit file cannot be written (`on_failure = "refuse"`).
/// This event is queued like any other: it reaches the file only if the storage is back by
/// the time the writer gets to it, and is otherwise counted among the lost events.
pub fn credentials_unrecordable(caller: &Caller, endpoint: &'static str, app: &App, why: &str) {
    let reason = DenyReason::AuditUnavailable.as_str();
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason).increment(1);
    metrics::counter!(crate::metrics::AUDIT_REFUSED).increment(1);
    audit_event!(warn, "credentials.denied", caller,
        endpoint,
        app = %app.name,
        reason,
        detail = why,
        "credentials denied: the audit file cannot be written"
    );
}

/// An app's credentials could not be had from STS for `caller` on `endpoint`.
pub fn credentials_unavailable(caller: &Caller, endpoint: &'static str, app: &App, detail: &str) {
    let reason = DenyReason::Upstream.as_str();
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason).increment(1);
    audit_event!(warn, "credentials.denied", caller,
        endpoint,
        app = %app.name,
        reason,
        detail,
        "credentials denied"
    );
}

pub fn credentials_denied(caller: &Caller, reason: DenyReason, detail: &str) {
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason.as_str()).increment(1);
    let why = match caller {
        Caller::Unresolved { reason, .. } => reason.as_str(),
        _ => detail,
    };
    audit_event!(
        warn,
        "credentials.denied",
        caller,
        reason = reason.as_str(),
        detail = why,
        "credentials denied"
    );
}

/// `expires` is the wall-clock time the token would expire at were the clock not stepped: its
/// TTL is real time (see `crate::token`).
pub fn token_issued(caller: &Caller, ttl_secs: u64, now: crate::time::Moment) {
    let ttl = std::time::Duration::from_secs(ttl_secs);
    crate::metrics::token_issued(now.boot + ttl);
    audit_event!(info, "token.issued", caller,
        ttl_secs,
        expires = %imds_time(now.wall + ttl),
        "session token issued"
    );
}

/// A request refused before its token was looked at: relayed, from a browser, for a foreign
/// `Host`, or over the caller's rate.
pub fn request_refused(caller: &Caller, reason: DenyReason, detail: &str) {
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason.as_str()).increment(1);
    audit_event!(
        warn,
        "request.refused",
        caller,
        reason = reason.as_str(),
        detail,
        "request refused"
    );
}

/// A connection closed before any request was read: the caller has too many open.
pub fn connection_refused(caller: &Caller, detail: &str) {
    let reason = DenyReason::ConnectionLimit.as_str();
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason).increment(1);
    audit_event!(
        warn,
        "connection.refused",
        caller,
        reason,
        detail,
        "connection refused"
    );
}

/// A metadata request whose session token is missing, forged, expired or another caller's.
pub fn token_rejected(caller: &Caller, reason: DenyReason, detail: &str) {
    metrics::counter!(crate::metrics::DENIALS, "reason" => reason.as_str()).increment(1);
    audit_event!(
        warn,
        "token.rejected",
        caller,
        reason = reason.as_str(),
        detail,
        "request refused"
    );
}

/// A configuration was loaded (at start or on reload) or refused (the old one stays).
pub fn config_loaded(path: &std::path::Path, apps: usize, dropped_credentials: usize) {
    tracing::info!(
        target: "audit",
        event = "config.loaded",
        config = %path.display(),
        apps,
        dropped_credentials,
        "configuration loaded"
    );
}

/// The daemon's own key was rotated (`[source] kind = "access_key"`): key ids only.
pub fn source_key_rotated(old_key_id: &str, new_key_id: &str) {
    tracing::info!(
        target: "audit",
        event = "source.key_rotated",
        old_key_id,
        new_key_id,
        "the daemon's own access key was rotated; the old one is deleted"
    );
}

pub fn source_key_rotation_failed(error: &str) {
    tracing::error!(
        target: "audit",
        event = "source.key_rotation_failed",
        error,
        "the daemon's own access key could not be rotated; the current one stays"
    );
}

/// Keys of the daemon's IAM user that a crashed rotation left behind, deleted at start.
pub fn source_key_leftovers(key_id: &str, deleted: &[String]) {
    tracing::warn!(
        target: "audit",
        event = "source.key_leftovers_deleted",
        key_id,
        deleted = deleted.join(","),
        "keys left by an interrupted rotation were deleted; the key in the file stays"
    );
}

/// A renewed Roles Anywhere certificate is in use from the next session on.
pub fn source_certificate_reloaded(serial: &str, subject_cn: Option<&str>, not_after: &str) {
    tracing::info!(
        target: "audit",
        event = "source.certificate_reloaded",
        serial,
        subject_cn,
        not_after,
        "a new source certificate is in use from the next session on"
    );
}

pub fn source_certificate_rejected(error: &str) {
    tracing::error!(
        target: "audit",
        event = "source.certificate_rejected",
        error,
        "the new source certificate or key is not usable; the previous pair stays in use"
    );
}

pub fn config_rejected(path: &std::path::Path, error: &str) {
    tracing::error!(
        target: "audit",
        event = "config.rejected",
        config = %path.display(),
        error,
        "configuration refused; still running on the previous one"
    );
}

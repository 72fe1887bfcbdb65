//! The STS side: `[sts]` (region, endpoint, default session length, the call budget) and
//! `[credentials]` (when cached credentials stop being served and are refreshed).

use std::time::Duration;

use toml::Spanned;

use super::Validator;
use super::raw::{self, RawDuration};

/// STS AssumeRole `DurationSeconds` bounds.
pub const MIN_SESSION: Duration = Duration::from_secs(900);
pub const MAX_SESSION: Duration = Duration::from_secs(43_200);
pub const DEFAULT_SESSION: Duration = Duration::from_secs(3_600);
/// botocore rewrites the expiry of credentials with less than this left, and the Java SDKs refetch
/// on every call, so nothing below it is ever served.
pub const MIN_REMAINING_FLOOR: Duration = Duration::from_secs(25 * 60);
pub const DEFAULT_MIN_REMAINING: Duration = Duration::from_secs(30 * 60);
/// Refreshes start at a random point of this window before `min_remaining` is reached, so apps
/// and hosts spread their STS calls.
pub const DEFAULT_REFRESH_WINDOW: Duration = Duration::from_secs(10 * 60);
/// An app nobody asked for in this long is no longer refreshed in the background.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(60 * 60);
/// Prefetch apps start their first fetch at a random moment of this window after a start or a
/// reload. `examples/refresh_sim` sizes it: 10,000 hosts x 50 apps restarted together stay
/// at 5.6 times their mean STS rate with 5 minutes (2 minutes: 11.5), and an app asked for
/// before its moment is fetched at once (8% of them pay one AssumeRole, as without prefetch).
pub const DEFAULT_PREFETCH_SPREAD: Duration = Duration::from_secs(5 * 60);
/// Longest accepted `prefetch_spread`: beyond it prefetching hardly warms anything before apps ask.
pub const MAX_PREFETCH_SPREAD: Duration = Duration::from_secs(30 * 60);
/// Global AssumeRole budget: sustained calls per second, and the burst above it.
pub const DEFAULT_STS_CALLS_PER_SECOND: u32 = 10;
pub const DEFAULT_STS_BURST: u32 = 50;
/// A session must stay servable for at least this long after issue, or the broker would spend
/// its time calling STS: `duration >= min_remaining + MIN_SERVABLE`.
pub const MIN_SERVABLE: Duration = Duration::from_secs(15 * 60);
/// One AssumeRole call that has not answered in this long counts as a transient failure.
pub const STS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a credential request waits for the AssumeRole call in flight before it is answered
/// 503 (the call goes on, and its result is cached for the SDK's next try). Every SDK's IMDS
/// client stops reading after 1 s (botocore, the aws CLI and the JS SDK v3 then give up;
/// aws-sdk-rust retries a 5xx but not a timeout), so the answer must leave before that, with
/// room for the caller's own scheduling on a busy host.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(800);
/// Below this a cached entry's first caller could hardly ever be served by a fast STS.
pub const MIN_MAX_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct StsConfig {
    pub region: String,
    pub endpoint_url: Option<String>,
    pub default_duration: Duration,
    /// Global AssumeRole budget shared by every app.
    pub max_calls_per_second: u32,
    pub burst: u32,
}

/// When cached credentials stop being served and when their refresh starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// Credentials with less validity than this are never served.
    pub min_remaining: Duration,
    /// Background refresh starts at a random point within this window before `min_remaining`.
    pub refresh_window: Duration,
    /// Apps not asked for in this long are not refreshed in the background.
    pub idle_after: Duration,
    /// `prefetch` apps are first fetched at a random moment of this window after a start or a
    /// reload; zero fetches them all at once.
    pub prefetch_spread: Duration,
    /// A request waits at most this long for an AssumeRole call, then gets a 503.
    pub max_wait: Duration,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        Self {
            min_remaining: DEFAULT_MIN_REMAINING,
            refresh_window: DEFAULT_REFRESH_WINDOW,
            idle_after: DEFAULT_IDLE_AFTER,
            prefetch_spread: DEFAULT_PREFETCH_SPREAD,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

impl Validator<'_> {
    /// `[sts]` and `[credentials]`. The credentials section is read between the region and the
    /// call budget, where it always was, so problems keep their order.
    pub(super) fn sts(
        &mut self,
        raw: &raw::RawSts,
        credentials: raw::RawCredentials,
    ) -> (StsConfig, CredentialPolicy) {
        let sts_duration = self.duration(
            raw.default_duration.as_ref(),
            "sts.default_duration",
            DEFAULT_SESSION,
        );
        let endpoint_url = raw.endpoint_url.as_ref().map(|u| {
            let url = u.get_ref().trim().to_owned();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.push(
                    u.span(),
                    "sts.endpoint_url",
                    "must start with http:// or https://",
                );
            }
            url
        });
        let region = raw.region.get_ref().clone();
        if !is_region(&region) {
            self.push(
                raw.region.span(),
                "sts.region",
                format!("{region:?} is not an AWS region name"),
            );
        }
        let credentials = self.credentials(credentials);
        let max_calls_per_second = self.positive(
            raw.max_calls_per_second.as_ref(),
            "sts.max_calls_per_second",
            DEFAULT_STS_CALLS_PER_SECOND,
        );
        let burst = self.positive(raw.burst.as_ref(), "sts.burst", DEFAULT_STS_BURST);
        let sts = StsConfig {
            region,
            endpoint_url,
            default_duration: sts_duration,
            max_calls_per_second,
            burst,
        };
        (sts, credentials)
    }

    fn credentials(&mut self, raw: raw::RawCredentials) -> CredentialPolicy {
        let min_remaining = self.duration(
            raw.min_remaining.as_ref(),
            "credentials.min_remaining",
            DEFAULT_MIN_REMAINING,
        );
        if let Some(m) = &raw.min_remaining
            && min_remaining < MIN_REMAINING_FLOOR
        {
            self.push(
                m.span(),
                "credentials.min_remaining",
                format!(
                    "must be at least {} (SDKs treat credentials with less left as expired)",
                    humantime::format_duration(MIN_REMAINING_FLOOR)
                ),
            );
        }
        let refresh_window = self.duration(
            raw.refresh_window.as_ref(),
            "credentials.refresh_window",
            DEFAULT_REFRESH_WINDOW,
        );
        if let Some(w) = &raw.refresh_window
            && !(Duration::from_secs(60)..=MIN_SERVABLE).contains(&refresh_window)
        {
            self.push(
                w.span(),
                "credentials.refresh_window",
                format!(
                    "must be between 1m and {} (it must fit in the servable part of a session)",
                    humantime::format_duration(MIN_SERVABLE)
                ),
            );
        }
        let idle_after = self.duration(
            raw.idle_after.as_ref(),
            "credentials.idle_after",
            DEFAULT_IDLE_AFTER,
        );
        if let Some(i) = &raw.idle_after
            && idle_after < Duration::from_secs(60)
        {
            self.push(i.span(), "credentials.idle_after", "must be at least 1m");
        }
        let prefetch_spread = self.duration(
            raw.prefetch_spread.as_ref(),
            "credentials.prefetch_spread",
            DEFAULT_PREFETCH_SPREAD,
        );
        if let Some(s) = &raw.prefetch_spread
            && prefetch_spread > MAX_PREFETCH_SPREAD
        {
            self.push(
                s.span(),
                "credentials.prefetch_spread",
                format!(
                    "must be at most {} (0 fetches every prefetch app at once)",
                    humantime::format_duration(MAX_PREFETCH_SPREAD)
                ),
            );
        }
        let max_wait = self.duration(
            raw.max_wait.as_ref(),
            "credentials.max_wait",
            DEFAULT_MAX_WAIT,
        );
        if let Some(w) = &raw.max_wait
            && !(MIN_MAX_WAIT..STS_ATTEMPT_TIMEOUT).contains(&max_wait)
        {
            self.push(
                w.span(),
                "credentials.max_wait",
                format!(
                    "must be at least {} and shorter than an STS attempt ({})",
                    humantime::format_duration(MIN_MAX_WAIT),
                    humantime::format_duration(STS_ATTEMPT_TIMEOUT)
                ),
            );
        }
        CredentialPolicy {
            min_remaining,
            refresh_window,
            idle_after,
            prefetch_spread,
            max_wait,
        }
    }

    /// A session must be a legal STS duration and leave time to serve it before `min_remaining`.
    pub(super) fn check_servable(
        &mut self,
        raw: Option<&Spanned<RawDuration>>,
        field: &str,
        duration: Duration,
        policy: CredentialPolicy,
    ) {
        let Some(raw) = raw else { return };
        if !(MIN_SESSION..=MAX_SESSION).contains(&duration) {
            self.push(
                raw.span(),
                field,
                "must be between 900 and 43200 seconds (STS DurationSeconds)",
            );
        } else if duration < policy.min_remaining + MIN_SERVABLE {
            self.push(
                raw.span(),
                field,
                format!(
                    "must be at least credentials.min_remaining ({}) + {}, or credentials would be refreshed as soon as they are issued",
                    humantime::format_duration(policy.min_remaining),
                    humantime::format_duration(MIN_SERVABLE)
                ),
            );
        }
    }
}

fn is_region(s: &str) -> bool {
    (4..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.contains('-')
}

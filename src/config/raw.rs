//! The config file exactly as written: serde structs that reject unknown keys and keep the source
//! positions of every value that is validated later, so errors can name the line.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub sts: RawSts,
    #[serde(default)]
    pub credentials: RawCredentials,
    #[serde(default)]
    pub instance: RawInstance,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub admin: RawAdmin,
    /// The container credentials endpoint; absent means off.
    pub container: Option<Spanned<RawContainer>>,
    /// Callers in containers; absent means containers are processes like any other.
    pub containers: Option<super::containers::RawContainers>,
    /// The daemon's own credentials; absent means the aws-config default chain.
    pub source: Option<Spanned<super::source::RawSource>>,
    #[serde(default, rename = "app")]
    pub apps: Vec<Spanned<RawApp>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub imdsv1: Option<ImdsV1>,
    pub token_max_ttl: Option<Spanned<RawDuration>>,
    pub state_dir: Option<String>,
    pub hop_limit: Option<Spanned<u32>>,
    pub allowed_hosts: Option<Vec<String>>,
    /// Drop-in files with more `[[app]]`s: globs relative to the config file's directory.
    pub include: Option<Spanned<Vec<Spanned<String>>>>,
    /// Answer `GET /imds-broker/whoami` (for `imds-broker doctor`): a caller's own identity.
    #[serde(default)]
    pub debug_whoami: bool,
}

/// A drop-in file (`[server] include`): `[[app]]` entries and nothing else.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDropIn {
    #[serde(default, rename = "app")]
    pub apps: Vec<Spanned<RawApp>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContainer {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub token_dir: Option<Spanned<String>>,
    pub rotate_every: Option<Spanned<RawDuration>>,
    pub grace: Option<Spanned<RawDuration>>,
}

/// `[app.container]`: the app may use the container endpoint with the token the daemon writes
/// for it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppContainer {
    pub uid: Option<u32>,
    pub user: Option<Spanned<String>>,
    pub gid: Option<u32>,
    pub group: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<String>,
    pub seal: Option<bool>,
    pub seal_epoch: Option<Spanned<RawDuration>>,
    pub seal_epoch_events: Option<Spanned<u64>>,
    pub on_failure: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_second: Option<Spanned<u32>>,
    pub burst: Option<Spanned<u32>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_connections_per_caller: Option<Spanned<u32>>,
    pub exe_hash_max_mib: Option<Spanned<u32>>,
    pub exe_hash_mib_per_second: Option<Spanned<u32>>,
}

/// Whether tokenless (IMDSv1) GETs are answered. Disabled unless an operator opts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImdsV1 {
    #[default]
    Disabled,
    Allowed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSts {
    pub region: Spanned<String>,
    pub endpoint_url: Option<Spanned<String>>,
    pub default_duration: Option<Spanned<RawDuration>>,
    pub max_calls_per_second: Option<Spanned<u32>>,
    pub burst: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    pub min_remaining: Option<Spanned<RawDuration>>,
    pub refresh_window: Option<Spanned<RawDuration>>,
    pub idle_after: Option<Spanned<RawDuration>>,
    pub prefetch_spread: Option<Spanned<RawDuration>>,
    pub max_wait: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    pub region: Option<String>,
    pub availability_zone: Option<Spanned<String>>,
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub ami_id: Option<String>,
    pub hostname: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub name: Spanned<String>,
    /// Absent only for apps served on the container endpoint alone.
    #[serde(rename = "match")]
    pub matcher: Option<Spanned<RawMatch>>,
    pub role_arn: Spanned<String>,
    pub duration: Option<Spanned<RawDuration>>,
    pub session_name: Option<Spanned<String>>,
    #[serde(default)]
    pub prefetch: bool,
    /// STS SourceIdentity; default the app name, "" for none.
    pub source_identity: Option<Spanned<String>>,
    /// Whether to add the `imds-broker:*` session tags (default true).
    pub session_tags: Option<bool>,
    /// Extra session tags.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, Spanned<String>>,
    /// Inline session policy (JSON).
    pub policy: Option<Spanned<String>>,
    /// Session policy file, relative to the config file's directory.
    pub policy_file: Option<Spanned<String>>,
    /// Managed policies used as session policies.
    pub policy_arns: Option<Spanned<Vec<Spanned<String>>>>,
    /// Served on the container credentials endpoint too.
    pub container: Option<Spanned<RawAppContainer>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub uid: Option<u32>,
    pub user: Option<Spanned<String>>,
    pub gid: Option<u32>,
    pub group: Option<Spanned<String>>,
    pub exe: Option<Spanned<String>>,
    pub exe_sha256: Option<Spanned<String>>,
    pub systemd_unit: Option<Spanned<String>>,
    pub systemd_user_unit: Option<Spanned<RawUserUnit>>,
    pub cgroup: Option<Spanned<String>>,
    pub source: Option<Vec<Spanned<String>>>,
    pub container_label: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub container_image: Option<Spanned<String>>,
    pub container_name: Option<Spanned<String>>,
}

/// `systemd_user_unit = { uid = 1001, unit = "billing.service" }`: a unit of that user's
/// manager, which only that user (and root) can name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUserUnit {
    pub uid: Option<u32>,
    pub user: Option<Spanned<String>>,
    pub unit: Option<Spanned<String>>,
}

/// Seconds as an integer, or a human string such as `"1h"` or `"90m"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(u64),
    Human(String),
}

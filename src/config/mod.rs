//! Configuration: loads the TOML file, refuses files others can write, and turns the raw serde
//! structs into a validated [`Config`] whose every error names the file, line and field.
//!
//! - `raw`: the file exactly as written (serde, unknown keys refused, positions kept).
//! - `load`: the permission check every file the config trusts must pass.
//! - `validate`: the `Validator` that collects problems, runs the sections, shared helpers.
//! - `error`: [`ConfigError`] and [`Problem`], `path:line:column: field: message`.
//! - `server`: `[server]`, `[limits]`, `[admin]`, `[audit]`, `[instance]`.
//! - `sts`: `[sts]` and `[credentials]`, the session bounds.
//! - `app`: one `[[app]]`, its session name, SourceIdentity and tags; `matcher` its `match`.
//! - `session_policy`: `policy`, `policy_file`, `policy_arns`, and the texts `lint` reads.
//! - `container`: `[container]` and `[app.container]`.
//! - `containers`: `[containers]`.
//! - `source`: `[source]`.
//! - `include`: the drop-in files of `[server] include` (`apps.d/*.toml`), more `[[app]]`s.
//! - `admin_listen`, `assume_role`: the types [`AdminListen`] and [`AssumeRoleInput`].

mod admin_listen;
mod app;
mod assume_role;
mod container;
mod containers;
mod error;
mod include;
mod load;
mod matcher;
mod raw;
mod server;
mod session_policy;
mod source;
mod sts;
mod validate;

pub use admin_listen::AdminListen;
pub use app::{App, MAX_SESSION_TAGS, default_session_name};
pub use assume_role::AssumeRoleInput;
pub use matcher::Matcher;

use std::path::{Path, PathBuf};

pub use container::{AppContainer, ContainerConfig};
pub use containers::{ContainersConfig, DEFAULT_RUNTIME_SOCKETS};
pub use error::{ConfigError, Problem};
pub use load::DEFAULT_CONFIG_PATH;
use load::check_permissions;
pub use raw::ImdsV1;
use raw::RawConfig;
pub use server::{
    AuditConfig, DEFAULT_EXE_HASH_MAX_MIB, DEFAULT_EXE_HASH_MIB_PER_SECOND, DEFAULT_HOP_LIMIT,
    DEFAULT_INCLUDE, DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    DEFAULT_REQUEST_BURST, DEFAULT_REQUESTS_PER_SECOND, DEFAULT_SEAL_EPOCH,
    DEFAULT_SEAL_EPOCH_EVENTS, DEFAULT_STATE_DIR, InstanceInfo, Limits, MAX_TOKEN_TTL, OnFailure,
    ServerConfig,
};
pub use session_policy::{MAX_POLICY_ARNS, PolicyText, policy_texts};
pub use source::{AccessKeyConfig, ROLE_CHAINING_MAX, RolesAnywhereConfig, SourceConfig};
pub use sts::{
    CredentialPolicy, DEFAULT_IDLE_AFTER, DEFAULT_MIN_REMAINING, DEFAULT_PREFETCH_SPREAD,
    DEFAULT_REFRESH_WINDOW, DEFAULT_SESSION, DEFAULT_STS_BURST, DEFAULT_STS_CALLS_PER_SECOND,
    MAX_PREFETCH_SPREAD, MAX_SESSION, MIN_REMAINING_FLOOR, MIN_SERVABLE, MIN_SESSION, StsConfig,
};
pub use sts::{DEFAULT_MAX_WAIT, MIN_MAX_WAIT, STS_ATTEMPT_TIMEOUT};
use validate::Validator;

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub sts: StsConfig,
    pub credentials: CredentialPolicy,
    pub instance: InstanceInfo,
    pub limits: Limits,
    pub audit: AuditConfig,
    /// Metrics, health and status: a Unix socket or a loopback port.
    pub admin: AdminListen,
    /// The container credentials endpoint, when `[container]` is present.
    pub container: Option<ContainerConfig>,
    /// Callers in containers identified, when `[containers]` is present.
    pub containers: Option<ContainersConfig>,
    /// Where the daemon's own credentials come from (`[source]`).
    pub source: SourceConfig,
    pub apps: Vec<App>,
    /// What the daemon will refuse when it gets there, though the file is valid (a token
    /// file's directory others control): `check` prints them.
    pub warnings: Vec<Problem>,
}

impl Config {
    /// Reads, permission-checks and validates the file at `path` and its drop-in files.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        check_permissions(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.add_drop_ins()?;
        Ok(config)
    }

    /// Validates config text, without its drop-ins; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut v = Validator {
            text,
            path,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                v.push(span, "(file)", e.message().trim_end());
                return Err(ConfigError::Invalid {
                    problems: v.problems,
                });
            }
        };
        let config = v.validate(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                problems: v.problems,
            })
        }
    }
}

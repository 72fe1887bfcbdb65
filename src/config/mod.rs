//! Configuration: loads the TOML file, refuses files others can write, and turns the raw serde
//! structs into a validated [`Config`] whose every error names the file, line and field.

mod app;
mod container;
mod error;
mod load;
mod raw;
mod server;
mod session_policy;
mod sts;

mod admin_listen;
mod assume_role;
mod matcher;

pub use admin_listen::AdminListen;
use app::AppDefaults;
pub use app::{App, MAX_SESSION_TAGS, default_session_name};
pub use assume_role::AssumeRoleInput;
pub use matcher::Matcher;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

pub use container::{AppContainer, ContainerConfig};
pub use error::{ConfigError, Problem};
pub use load::DEFAULT_CONFIG_PATH;
use load::check_permissions;
pub use raw::ImdsV1;
use raw::{RawConfig, RawDuration};
pub use server::{
    AuditConfig, DEFAULT_EXE_HASH_MAX_MIB, DEFAULT_EXE_HASH_MIB_PER_SECOND, DEFAULT_HOP_LIMIT,
    DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    DEFAULT_REQUEST_BURST, DEFAULT_REQUESTS_PER_SECOND, DEFAULT_SEAL_EPOCH,
    DEFAULT_SEAL_EPOCH_EVENTS, DEFAULT_STATE_DIR, InstanceInfo, Limits, MAX_TOKEN_TTL,
    ServerConfig,
};
pub use session_policy::{MAX_POLICY_ARNS, PolicyText, policy_texts};
pub use sts::{
    CredentialPolicy, DEFAULT_IDLE_AFTER, DEFAULT_MIN_REMAINING, DEFAULT_REFRESH_WINDOW,
    DEFAULT_SESSION, DEFAULT_STS_BURST, DEFAULT_STS_CALLS_PER_SECOND, MAX_SESSION,
    MIN_REMAINING_FLOOR, MIN_SERVABLE, MIN_SESSION, StsConfig,
};

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
    pub apps: Vec<App>,
    /// What the daemon will refuse when it gets there, though the file is valid (a token
    /// file's directory others control): `check` prints them.
    pub warnings: Vec<Problem>,
}

impl Config {
    /// Reads, permission-checks and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        check_permissions(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates config text; `path` is only used in messages.
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

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Validator<'_> {
    /// A problem in another file (a policy file) at a known position.
    fn push_at(&mut self, at: (&Path, usize, usize), field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: at.0.to_owned(),
            line: at.1,
            column: at.2,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn push(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            path: self.path.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Something that does not make the file invalid but that the daemon will refuse.
    fn warn(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let before = self.problems.len();
        self.push(span, field, message);
        self.warnings.extend(self.problems.drain(before..));
    }

    fn validate(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let container = self.container(raw.container, &server.listen);
        let admin = self.admin(raw.admin, &server.state_dir);
        let audit = self.audit(raw.audit, &server.state_dir);
        let (sts, credentials) = self.sts(&raw.sts, raw.credentials);
        let instance = self.instance(raw.instance, &sts.region);
        let limits = self.limits(raw.limits);
        self.check_servable(
            raw.sts.default_duration.as_ref(),
            "sts.default_duration",
            sts.default_duration,
            credentials,
        );

        let mut apps: Vec<App> = Vec::with_capacity(raw.apps.len());
        for (i, raw_app) in raw.apps.into_iter().enumerate() {
            let defaults = AppDefaults {
                sts: &sts,
                policy: credentials,
                hostname: &instance.hostname,
                container: container.as_ref(),
            };
            if let Some(app) = self.app(i, raw_app, defaults, &apps) {
                apps.push(app);
            }
        }

        Config {
            path: self.path.to_owned(),
            server,
            sts,
            credentials,
            instance,
            audit,
            admin,
            limits,
            container,
            apps,
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    /// A numeric id or a name resolved now (uid/user, gid/group); not both.
    fn id_or_name(
        &mut self,
        id: Option<u32>,
        name: Option<Spanned<String>>,
        field: &str,
        keys: (&str, &str),
        lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
    ) -> Option<u32> {
        match (id, name) {
            (Some(_), Some(name)) => {
                self.push(
                    name.span(),
                    &format!("{field}.{}", keys.1),
                    format!("give either {} or {}, not both", keys.0, keys.1),
                );
                None
            }
            (Some(id), None) => Some(id),
            (None, Some(name)) => match lookup(name.get_ref()) {
                Ok(Some(id)) => Some(id),
                Ok(None) => {
                    self.push(
                        name.span(),
                        &format!("{field}.{}", keys.1),
                        format!("no such {} {:?} on this host", keys.1, name.get_ref()),
                    );
                    None
                }
                Err(e) => {
                    self.push(
                        name.span(),
                        &format!("{field}.{}", keys.1),
                        format!("cannot look up {} {:?}: {e}", keys.1, name.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn positive(&mut self, raw: Option<&Spanned<u32>>, field: &str, default: u32) -> u32 {
        match raw {
            None => default,
            Some(v) if *v.get_ref() == 0 => {
                self.push(v.span(), field, "must be at least 1");
                default
            }
            Some(v) => *v.get_ref(),
        }
    }

    fn duration(
        &mut self,
        raw: Option<&Spanned<RawDuration>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match raw.get_ref() {
            RawDuration::Seconds(s) => Duration::from_secs(*s),
            RawDuration::Human(h) => match humantime::parse_duration(h) {
                Ok(d) => d,
                Err(e) => {
                    self.push(
                        raw.span(),
                        field,
                        format!(
                            "{h:?} is not a duration ({e}); use seconds or e.g. \"1h\", \"45m\""
                        ),
                    );
                    default
                }
            },
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a\nbc\nd";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 2));
        assert_eq!(line_col(text, 5), (3, 1));
    }
}

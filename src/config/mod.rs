//! Configuration: loads the TOML file, refuses files others can write, and turns the raw serde
//! structs into a validated [`Config`] whose every error names the file, line and field.

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
pub use assume_role::AssumeRoleInput;
pub use matcher::Matcher;

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

pub use container::{AppContainer, ContainerConfig};
pub use error::{ConfigError, Problem};
pub use load::DEFAULT_CONFIG_PATH;
use load::check_permissions;
pub use raw::ImdsV1;
use raw::{RawApp, RawConfig, RawDuration, RawMatch};
pub use server::{
    AuditConfig, DEFAULT_EXE_HASH_MAX_MIB, DEFAULT_EXE_HASH_MIB_PER_SECOND, DEFAULT_HOP_LIMIT,
    DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    DEFAULT_REQUEST_BURST, DEFAULT_REQUESTS_PER_SECOND, DEFAULT_SEAL_EPOCH,
    DEFAULT_SEAL_EPOCH_EVENTS, DEFAULT_STATE_DIR, InstanceInfo, Limits, MAX_TOKEN_TTL,
    ServerConfig,
};
use session_policy::policy_field;
pub use session_policy::{MAX_POLICY_ARNS, PolicyText, policy_texts};
pub use sts::{
    CredentialPolicy, DEFAULT_IDLE_AFTER, DEFAULT_MIN_REMAINING, DEFAULT_REFRESH_WINDOW,
    DEFAULT_SESSION, DEFAULT_STS_BURST, DEFAULT_STS_CALLS_PER_SECOND, MAX_SESSION,
    MIN_REMAINING_FLOOR, MIN_SERVABLE, MIN_SESSION, StsConfig,
};

use crate::arn::RoleArn;
use crate::glob::Glob;
use crate::iam::SessionPolicy;

/// STS accepts at most this many session tags per AssumeRole.
pub const MAX_SESSION_TAGS: usize = 50;
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

/// One `[[app]]`: who it is and which role it gets.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// Who gets this app over IMDS; `None` for an app served on the container endpoint only.
    pub matcher: Option<Matcher>,
    /// Obtain credentials at start-up and keep them warm, so the first request is a cache hit.
    pub prefetch: bool,
    /// Session policy (`policy` or `policy_file`) as written and where it is; its minified
    /// text is in the AssumeRole input.
    pub policy: Option<SessionPolicy>,
    /// Also served on the container endpoint, to whoever presents the token in this file.
    pub container: Option<AppContainer>,
    /// Role, session name, duration, SourceIdentity, tags and session policies: the one copy,
    /// built at load, that every credential request looks the cache up with.
    input: AssumeRoleInput,
}

impl App {
    /// Everything that goes into AssumeRole: the credential cache key.
    pub fn assume_role_input(&self) -> &AssumeRoleInput {
        &self.input
    }

    pub fn role_arn(&self) -> &RoleArn {
        &self.input.role_arn
    }
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

/// What every app inherits from the sections above it.
#[derive(Clone, Copy)]
struct AppDefaults<'a> {
    sts: &'a StsConfig,
    policy: CredentialPolicy,
    hostname: &'a str,
    container: Option<&'a ContainerConfig>,
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

    fn app(
        &mut self,
        index: usize,
        raw: Spanned<RawApp>,
        defaults: AppDefaults<'_>,
        earlier: &[App],
    ) -> Option<App> {
        let AppDefaults {
            sts,
            policy,
            hostname,
            container: endpoint,
        } = defaults;
        let raw = raw.into_inner();
        let field = |f: &str| format!("app[{index}].{f}");
        let name = raw.name.get_ref().clone();
        let name_ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            self.push(
                raw.name.span(),
                &field("name"),
                "must be 1-64 characters of [A-Za-z0-9_.-]",
            );
        }
        if earlier.iter().any(|a| a.name == name) {
            self.push(
                raw.name.span(),
                &field("name"),
                format!("duplicate app name {name:?}"),
            );
        }
        let role_arn = match raw.role_arn.get_ref().parse::<RoleArn>() {
            Ok(arn) => Some(arn),
            Err(e) => {
                self.push(
                    raw.role_arn.span(),
                    &field("role_arn"),
                    format!("{:?}: {e}", raw.role_arn.get_ref()),
                );
                None
            }
        };
        let duration = self.duration(
            raw.duration.as_ref(),
            &field("duration"),
            sts.default_duration,
        );
        self.check_servable(raw.duration.as_ref(), &field("duration"), duration, policy);
        let session_name = match raw.session_name {
            Some(s) => {
                if !is_sts_name(s.get_ref()) {
                    self.push(
                        s.span(),
                        &field("session_name"),
                        "must be 2-64 characters of [A-Za-z0-9_+=,.@-] (STS RoleSessionName)",
                    );
                }
                s.into_inner()
            }
            None => default_session_name(&name, hostname),
        };
        let matcher = match raw.matcher {
            Some(m) => self.matcher(m, &field("match")).map(Some),
            None if raw.container.is_some() => Some(None),
            None => {
                self.push(
                    raw.name.span(),
                    &field("match"),
                    "needs a match table (only an app with [app.container] may go without: it is then served on the container endpoint alone)",
                );
                None
            }
        };
        let source_identity = match raw.source_identity {
            None => Some(name.clone()),
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => {
                if !is_sts_name(s.get_ref()) || s.get_ref().starts_with("aws:") {
                    self.push(
                        s.span(),
                        &field("source_identity"),
                        "must be 2-64 characters of [A-Za-z0-9_+=,.@-], not starting with aws: (STS SourceIdentity)",
                    );
                }
                Some(s.into_inner())
            }
        };
        let mut tags = std::collections::BTreeMap::new();
        if raw.session_tags.unwrap_or(true) {
            // Values the rule pins, so every caller of the app (and its prefetch) shares one
            // session; the exact calling process is in the audit trail, by access key id.
            tags.insert("imds-broker:app".to_string(), name.clone());
            tags.insert("imds-broker:host".to_string(), hostname.to_string());
            if let Some(Some(m)) = &matcher {
                if let Some(uid) = m.uid {
                    tags.insert("imds-broker:uid".to_string(), uid.to_string());
                }
                if let Some(unit) = m.systemd_unit.as_ref().filter(|u| u.is_literal()) {
                    tags.insert("imds-broker:unit".to_string(), unit.as_str().to_string());
                }
            }
        }
        for (key, value) in raw.tags {
            if !is_tag(&key, 1..=128) || !is_tag(value.get_ref(), 0..=256) {
                self.push(
                    value.span(),
                    &field(&format!("tags.{key}")),
                    "tag keys must be 1-128 and values 0-256 characters of letters, digits, spaces and _.:/=+-@",
                );
            }
            tags.insert(key, value.into_inner());
        }
        if tags.len() > MAX_SESSION_TAGS {
            self.push(
                raw.name.span(),
                &field("tags"),
                format!("at most {MAX_SESSION_TAGS} session tags (STS limit), including the imds-broker:* ones"),
            );
        }
        let policy_field = policy_field(index, raw.policy.is_some(), raw.policy_file.is_some());
        let policy = self
            .policy_text(index, raw.policy, raw.policy_file)
            .and_then(|(text, origin)| self.session_policy(&policy_field, text, origin));
        let policy_arns = self.policy_arns(raw.policy_arns, &field("policy_arns"));
        let container_span = raw.container.as_ref().map(|c| c.span());
        let container = self.app_container(
            &field("container"),
            &name,
            raw.container,
            endpoint,
            matcher.as_ref().and_then(Option::as_ref),
        );
        if let (Some(c), Some(span)) = (&container, container_span)
            && let Some(other) = earlier.iter().find(|a| {
                a.container
                    .as_ref()
                    .is_some_and(|o| o.token_file == c.token_file)
            })
        {
            self.push(
                span,
                &field("container.token_file"),
                format!(
                    "{} is app {:?}'s token file too",
                    c.token_file.display(),
                    other.name
                ),
            );
        }
        let input = AssumeRoleInput {
            role_arn: role_arn?,
            session_name,
            duration,
            source_identity,
            tags: tags.into_iter().collect(),
            policy: policy.as_ref().map(|p| p.minified.clone()),
            policy_arns,
        };
        Some(App {
            name,
            matcher: matcher?,
            prefetch: raw.prefetch,
            policy,
            container,
            input,
        })
    }

    fn matcher(&mut self, raw: Spanned<RawMatch>, field: &str) -> Option<Matcher> {
        let span = raw.span();
        let raw = raw.into_inner();
        let before = self.problems.len();
        let uid = self.id_or_name(raw.uid, raw.user, field, ("uid", "user"), |name| {
            nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
        });
        let gid = self.id_or_name(raw.gid, raw.group, field, ("gid", "group"), |name| {
            nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw()))
        });
        let exe = raw.exe.map(|e| {
            if !e.get_ref().starts_with('/') {
                self.push(
                    e.span(),
                    &format!("{field}.exe"),
                    "must be an absolute path (glob)",
                );
            }
            Glob::new(e.get_ref())
        });
        let exe_sha256 = raw.exe_sha256.map(|h| {
            let hex = h.get_ref().to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.push(
                    h.span(),
                    &format!("{field}.exe_sha256"),
                    "must be 64 hex digits (sha256)",
                );
            }
            hex
        });
        let systemd_unit = raw.systemd_unit.map(|u| Glob::new(u.get_ref()));
        let systemd_user_unit = raw.systemd_user_unit.and_then(|u| {
            let span = u.span();
            let u = u.into_inner();
            let field = format!("{field}.systemd_user_unit");
            let uid = self.id_or_name(u.uid, u.user, &field, ("uid", "user"), |name| {
                nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
            });
            match (uid, u.unit) {
                (Some(uid), Some(unit)) => Some((uid, Glob::new(unit.get_ref()))),
                (None, _) => {
                    self.push(
                        span.clone(),
                        &field,
                        "needs uid or user: whose user manager",
                    );
                    None
                }
                (_, None) => {
                    self.push(span, &field, "needs unit (glob), e.g. \"billing.service\"");
                    None
                }
            }
        });
        let cgroup = raw.cgroup.map(|c| {
            if !c.get_ref().starts_with('/') {
                self.push(
                    c.span(),
                    &format!("{field}.cgroup"),
                    "must be a cgroup v2 path starting with / (glob)",
                );
            }
            Glob::new(c.get_ref())
        });
        let mut source = Vec::new();
        for net in raw.source.unwrap_or_default() {
            let text = net.get_ref();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => source.push(n.trunc()),
                Err(_) => self.push(
                    net.span(),
                    &format!("{field}.source"),
                    format!("{text:?} is not a CIDR (e.g. 10.200.0.0/24) or IP address"),
                ),
            }
        }
        let matcher = Matcher {
            uid,
            gid,
            exe,
            exe_sha256,
            systemd_unit,
            systemd_user_unit,
            cgroup,
            source,
        };
        if matcher.is_empty() && self.problems.len() == before {
            // An empty match would hand this role to every caller on the host.
            self.push(
                span,
                field,
                "needs at least one criterion (uid, user, gid, group, exe, exe_sha256, systemd_unit, systemd_user_unit, cgroup, source); an empty match would match every caller",
            );
        }
        (self.problems.len() == before).then_some(matcher)
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

/// STS: tag keys and values are letters, digits, spaces and `_.:/=+-@`.
fn is_tag(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.chars().count())
        && s.chars()
            .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
}

fn is_sts_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

fn is_sts_name(s: &str) -> bool {
    (2..=64).contains(&s.len()) && s.chars().all(is_sts_name_char)
}

/// `app@host`, with characters STS refuses replaced and cut to the 64-character limit.
pub fn default_session_name(app: &str, hostname: &str) -> String {
    let mut name: String = format!("{app}@{hostname}")
        .chars()
        .map(|c| if is_sts_name_char(c) { c } else { '-' })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_sanitized_and_bounded() {
        assert_eq!(
            default_session_name("billing", "web-1.example"),
            "billing@web-1.example"
        );
        assert_eq!(default_session_name("a", "h st/x"), "a@h-st-x");
        assert_eq!(default_session_name(&"x".repeat(80), "h").len(), 64);
    }

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a\nbc\nd";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 2));
        assert_eq!(line_col(text, 5), (3, 1));
    }
}

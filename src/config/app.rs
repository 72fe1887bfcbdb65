//! One `[[app]]` turned into an [`App`]: its name, role, session name and duration,
//! SourceIdentity, session tags and policies, and the AssumeRole input they make.

use std::path::PathBuf;
use toml::Spanned;

use super::raw::RawApp;
use super::session_policy::policy_field;
use super::source::ROLE_CHAINING_MAX;
use super::{
    AppContainer, AssumeRoleInput, ContainerConfig, CredentialPolicy, Matcher, StsConfig, Validator,
};
use crate::arn::RoleArn;
use crate::iam::SessionPolicy;

/// STS accepts at most this many session tags per AssumeRole.
pub const MAX_SESSION_TAGS: usize = 50;

/// One `[[app]]`: who it is and which role it gets.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// The file the `[[app]]` is in: the config file or one of its drop-ins.
    pub source: PathBuf,
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

/// What every app inherits from the sections above it.
#[derive(Clone, Copy)]
pub(super) struct AppDefaults<'a> {
    pub(super) sts: &'a StsConfig,
    pub(super) policy: CredentialPolicy,
    pub(super) hostname: &'a str,
    pub(super) container: Option<&'a ContainerConfig>,
    /// `[containers]` is present: the `container_*` match keys can mean something.
    pub(super) containers: bool,
    /// The daemon's own credentials are a role session (`[source] kind = "roles_anywhere"`):
    /// the apps' AssumeRole is role chaining.
    pub(super) chained: bool,
}

impl Validator<'_> {
    pub(super) fn app(
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
            containers,
            chained,
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
        let mut duration = self.duration(
            raw.duration.as_ref(),
            &field("duration"),
            sts.default_duration,
        );
        if chained && duration > ROLE_CHAINING_MAX {
            // STS refuses DurationSeconds over an hour when the caller's own credentials are a
            // role session; asking for more would fail every time.
            let span = raw
                .duration
                .as_ref()
                .map_or_else(|| raw.name.span(), |d| d.span());
            self.warn(
                span,
                &field("duration"),
                format!(
                    "{}s is over STS's 1h limit for role chaining ([source] kind = \"roles_anywhere\"): the daemon asks for 3600s",
                    duration.as_secs()
                ),
            );
            duration = ROLE_CHAINING_MAX;
        }
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
            Some(m) => self.matcher(m, &field("match"), containers).map(Some),
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
            // A Roles Anywhere session already carries a SourceIdentity (the certificate's
            // CN), and STS refuses an AssumeRole that would change it: the app is named in the
            // session name and the `imds-broker:app` tag instead.
            None if chained => None,
            Some(s) if chained && !s.get_ref().is_empty() => {
                self.push(
                    s.span(),
                    &field("source_identity"),
                    "cannot be set with [source] kind = \"roles_anywhere\": the Roles Anywhere session already has a SourceIdentity (the certificate's CN) and STS refuses to change it; the app is in the session name and the imds-broker:app tag",
                );
                None
            }
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
            source: self.path.to_owned(),
            matcher: matcher?,
            prefetch: raw.prefetch,
            policy,
            container,
            input,
        })
    }
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
}

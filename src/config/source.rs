//! `[source]`: where the daemon's own credentials come from, the ones it calls STS with. The
//! aws-config default chain (`chain`, the default), IAM Roles Anywhere with an X.509
//! certificate (`roles_anywhere`: no long-term key on the host), or an access key in a file the
//! daemon owns and rotates (`access_key`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Validator;
use super::raw::RawDuration;
use crate::arn::RoleArn;

/// Roles Anywhere session bounds (CreateSession `durationSeconds`).
pub const ROLES_ANYWHERE_MIN: Duration = Duration::from_secs(900);
pub const ROLES_ANYWHERE_MAX: Duration = Duration::from_secs(43_200);
pub const ROLES_ANYWHERE_DEFAULT: Duration = Duration::from_secs(3_600);
/// STS caps a role session assumed with role-session credentials (role chaining) at one hour.
pub const ROLE_CHAINING_MAX: Duration = Duration::from_secs(3_600);
/// Rotating more often than this would be churn, not hygiene (and IAM allows two keys).
pub const MIN_ROTATE_EVERY: Duration = Duration::from_secs(3_600);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub kind: Option<Spanned<String>>,
    // roles_anywhere
    pub certificate: Option<Spanned<String>>,
    pub certificate_chain: Option<Spanned<String>>,
    pub private_key: Option<Spanned<String>>,
    pub trust_anchor_arn: Option<Spanned<String>>,
    pub profile_arn: Option<Spanned<String>>,
    pub role_arn: Option<Spanned<String>>,
    pub region: Option<Spanned<String>>,
    pub duration: Option<Spanned<RawDuration>>,
    pub endpoint_url: Option<Spanned<String>>,
    // access_key
    pub credentials_file: Option<Spanned<String>>,
    pub profile: Option<Spanned<String>>,
    pub rotate_every: Option<Spanned<RawDuration>>,
    pub iam_endpoint_url: Option<Spanned<String>>,
}

/// Where the daemon's own credentials come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SourceConfig {
    /// The aws-config default chain (environment, profile, web identity, ECS, EC2 IMDS).
    #[default]
    Chain,
    RolesAnywhere(RolesAnywhereConfig),
    AccessKey(AccessKeyConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Chain => "chain",
            SourceConfig::RolesAnywhere(_) => "roles_anywhere",
            SourceConfig::AccessKey(_) => "access_key",
        }
    }

    /// Whether the source's credentials are themselves a role session, so the apps' AssumeRole
    /// is role chaining: STS then caps their sessions at one hour and refuses a
    /// `SourceIdentity` other than the one the first session set. Only Roles Anywhere is known
    /// to be one here; the chain may be one too (an instance role, web identity).
    pub fn is_role_session(&self) -> bool {
        matches!(self, SourceConfig::RolesAnywhere(_))
    }
}

/// `kind = "roles_anywhere"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolesAnywhereConfig {
    /// The leaf certificate (PEM).
    pub certificate: PathBuf,
    /// Intermediate certificates (PEM), sent as `X-Amz-X509-Chain`.
    pub certificate_chain: Option<PathBuf>,
    /// PEM: RSA, EC P-256 or P-384, PKCS#8 or SEC1/PKCS#1. Readable by the daemon alone.
    pub private_key: PathBuf,
    pub trust_anchor_arn: String,
    pub profile_arn: String,
    pub role_arn: RoleArn,
    pub region: String,
    pub duration: Duration,
    /// Instead of `https://rolesanywhere.<region>.amazonaws.com` (tests).
    pub endpoint_url: Option<String>,
}

/// `kind = "access_key"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKeyConfig {
    /// Shared-credentials format, owned by the daemon, mode 0600.
    pub credentials_file: PathBuf,
    /// The section of `credentials_file` to use and rewrite.
    pub profile: String,
    /// Rotate the key this often (`iam:CreateAccessKey` for the key's own user, then delete the
    /// old one); never, when absent.
    pub rotate_every: Option<Duration>,
    /// Instead of IAM's global endpoint (tests).
    pub iam_endpoint_url: Option<String>,
}

/// The keys of each kind, for "not a key of this kind" messages.
const ROLES_ANYWHERE_KEYS: &[&str] = &[
    "certificate",
    "certificate_chain",
    "private_key",
    "trust_anchor_arn",
    "profile_arn",
    "role_arn",
    "region",
    "duration",
    "endpoint_url",
];
const ACCESS_KEY_KEYS: &[&str] = &[
    "credentials_file",
    "profile",
    "rotate_every",
    "iam_endpoint_url",
];

impl Validator<'_> {
    pub(super) fn source(
        &mut self,
        raw: Option<Spanned<RawSource>>,
        sts_region: &str,
    ) -> SourceConfig {
        let Some(raw) = raw else {
            return SourceConfig::Chain;
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let kind = raw
            .kind
            .as_ref()
            .map_or("chain", |k| k.get_ref().as_str())
            .to_owned();
        let set: Vec<(&str, std::ops::Range<usize>)> = [
            ("certificate", raw.certificate.as_ref().map(Spanned::span)),
            (
                "certificate_chain",
                raw.certificate_chain.as_ref().map(Spanned::span),
            ),
            ("private_key", raw.private_key.as_ref().map(Spanned::span)),
            (
                "trust_anchor_arn",
                raw.trust_anchor_arn.as_ref().map(Spanned::span),
            ),
            ("profile_arn", raw.profile_arn.as_ref().map(Spanned::span)),
            ("role_arn", raw.role_arn.as_ref().map(Spanned::span)),
            ("region", raw.region.as_ref().map(Spanned::span)),
            ("duration", raw.duration.as_ref().map(Spanned::span)),
            ("endpoint_url", raw.endpoint_url.as_ref().map(Spanned::span)),
            (
                "credentials_file",
                raw.credentials_file.as_ref().map(Spanned::span),
            ),
            ("profile", raw.profile.as_ref().map(Spanned::span)),
            ("rotate_every", raw.rotate_every.as_ref().map(Spanned::span)),
            (
                "iam_endpoint_url",
                raw.iam_endpoint_url.as_ref().map(Spanned::span),
            ),
        ]
        .into_iter()
        .filter_map(|(key, span)| Some((key, span?)))
        .collect();
        let allowed: &[&str] = match kind.as_str() {
            "chain" => &[],
            "roles_anywhere" => ROLES_ANYWHERE_KEYS,
            "access_key" => ACCESS_KEY_KEYS,
            other => {
                let kind_span = raw.kind.as_ref().map_or(span.clone(), Spanned::span);
                self.push(
                    kind_span,
                    "source.kind",
                    format!("{other:?} is not a source kind: \"chain\", \"roles_anywhere\" or \"access_key\""),
                );
                return SourceConfig::Chain;
            }
        };
        for (key, span) in &set {
            if !allowed.contains(key) {
                self.push(
                    span.clone(),
                    &format!("source.{key}"),
                    format!("not a setting of kind = {kind:?}"),
                );
            }
        }
        match kind.as_str() {
            "roles_anywhere" => self
                .roles_anywhere(raw, span, sts_region)
                .map_or(SourceConfig::Chain, SourceConfig::RolesAnywhere),
            "access_key" => self
                .access_key(raw, span)
                .map_or(SourceConfig::Chain, SourceConfig::AccessKey),
            _ => SourceConfig::Chain,
        }
    }

    /// A required absolute path.
    fn source_path(
        &mut self,
        value: Option<Spanned<String>>,
        key: &str,
        section: &std::ops::Range<usize>,
    ) -> Option<PathBuf> {
        let field = format!("source.{key}");
        match value {
            None => {
                self.push(section.clone(), &field, "is required for this kind");
                None
            }
            Some(v) if !v.get_ref().starts_with('/') => {
                self.push(v.span(), &field, "must be an absolute path");
                None
            }
            Some(v) => Some(PathBuf::from(v.into_inner())),
        }
    }

    fn rolesanywhere_arn(
        &mut self,
        value: Option<Spanned<String>>,
        key: &str,
        resource: &str,
        section: &std::ops::Range<usize>,
    ) -> Option<String> {
        let field = format!("source.{key}");
        let Some(value) = value else {
            self.push(section.clone(), &field, "is required for this kind");
            return None;
        };
        if !is_rolesanywhere_arn(value.get_ref(), resource) {
            self.push(
                value.span(),
                &field,
                format!("must look like arn:aws:rolesanywhere:REGION:123456789012:{resource}/ID"),
            );
            return None;
        }
        Some(value.into_inner())
    }

    fn roles_anywhere(
        &mut self,
        raw: RawSource,
        section: std::ops::Range<usize>,
        sts_region: &str,
    ) -> Option<RolesAnywhereConfig> {
        let before = self.problems.len();
        let certificate = self.source_path(raw.certificate, "certificate", &section);
        let certificate_chain = raw.certificate_chain.and_then(|c| {
            if c.get_ref().starts_with('/') {
                Some(PathBuf::from(c.into_inner()))
            } else {
                self.push(
                    c.span(),
                    "source.certificate_chain",
                    "must be an absolute path",
                );
                None
            }
        });
        let private_key = self.source_path(raw.private_key, "private_key", &section);
        let trust_anchor_arn = self.rolesanywhere_arn(
            raw.trust_anchor_arn,
            "trust_anchor_arn",
            "trust-anchor",
            &section,
        );
        let profile_arn =
            self.rolesanywhere_arn(raw.profile_arn, "profile_arn", "profile", &section);
        let role_arn = match raw.role_arn {
            None => {
                self.push(
                    section.clone(),
                    "source.role_arn",
                    "is required for this kind",
                );
                None
            }
            Some(r) => match r.get_ref().parse::<RoleArn>() {
                Ok(arn) => Some(arn),
                Err(e) => {
                    self.push(r.span(), "source.role_arn", e.to_string());
                    None
                }
            },
        };
        let region = raw
            .region
            .map_or_else(|| sts_region.to_owned(), Spanned::into_inner);
        let duration = self.duration(
            raw.duration.as_ref(),
            "source.duration",
            ROLES_ANYWHERE_DEFAULT,
        );
        if let Some(d) = &raw.duration
            && !(ROLES_ANYWHERE_MIN..=ROLES_ANYWHERE_MAX).contains(&duration)
        {
            self.push(
                d.span(),
                "source.duration",
                "must be between 15m (900 s) and 12h (43200 s)",
            );
        }
        let endpoint_url = raw
            .endpoint_url
            .and_then(|u| self.http_url(u, "source.endpoint_url"));
        (self.problems.len() == before).then(|| RolesAnywhereConfig {
            certificate: certificate.expect("checked"),
            certificate_chain,
            private_key: private_key.expect("checked"),
            trust_anchor_arn: trust_anchor_arn.expect("checked"),
            profile_arn: profile_arn.expect("checked"),
            role_arn: role_arn.expect("checked"),
            region,
            duration,
            endpoint_url,
        })
    }

    fn access_key(
        &mut self,
        raw: RawSource,
        section: std::ops::Range<usize>,
    ) -> Option<AccessKeyConfig> {
        let before = self.problems.len();
        let credentials_file = self.source_path(raw.credentials_file, "credentials_file", &section);
        let profile = raw
            .profile
            .map_or_else(|| "default".to_owned(), Spanned::into_inner);
        let rotate_every = raw.rotate_every.as_ref().map(|r| {
            let d = self.duration(Some(r), "source.rotate_every", MIN_ROTATE_EVERY);
            if d < MIN_ROTATE_EVERY {
                self.push(r.span(), "source.rotate_every", "must be at least 1h");
            }
            d
        });
        let iam_endpoint_url = raw
            .iam_endpoint_url
            .and_then(|u| self.http_url(u, "source.iam_endpoint_url"));
        (self.problems.len() == before).then(|| AccessKeyConfig {
            credentials_file: credentials_file.expect("checked"),
            profile,
            rotate_every,
            iam_endpoint_url,
        })
    }

    fn http_url(&mut self, url: Spanned<String>, field: &str) -> Option<String> {
        let text = url.get_ref().trim();
        if text.starts_with("http://") || text.starts_with("https://") {
            Some(text.to_owned())
        } else {
            self.push(url.span(), field, "must be an http:// or https:// URL");
            None
        }
    }
}

/// `arn:<partition>:rolesanywhere:<region>:<12 digits>:<resource>/<id>`.
fn is_rolesanywhere_arn(arn: &str, resource: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, rest] = parts.as_slice() else {
        return false;
    };
    *prefix == "arn"
        && partition.starts_with("aws")
        && *service == "rolesanywhere"
        && !region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && rest
            .strip_prefix(resource)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(source: &str) -> Result<Config, String> {
        let text = format!("[sts]\nregion = \"us-east-1\"\n[source]\n{source}");
        Config::parse(&text, std::path::Path::new("s.toml")).map_err(|e| e.to_string())
    }

    const ANCHOR: &str = "arn:aws:rolesanywhere:us-east-1:123456789012:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001";
    const PROFILE: &str =
        "arn:aws:rolesanywhere:us-east-1:123456789012:profile/0a1b2c3d-0000-4000-8000-000000000002";

    fn roles_anywhere(extra: &str) -> String {
        format!(
            "kind = \"roles_anywhere\"\ncertificate = \"/etc/imds-broker/host.pem\"\nprivate_key = \"/etc/imds-broker/host.key\"\ntrust_anchor_arn = \"{ANCHOR}\"\nprofile_arn = \"{PROFILE}\"\nrole_arn = \"arn:aws:iam::123456789012:role/imds-broker-source\"\n{extra}"
        )
    }

    #[test]
    fn roles_anywhere_is_read_with_its_defaults() {
        let config = parse(&roles_anywhere("")).unwrap();
        match config.source {
            SourceConfig::RolesAnywhere(ra) => {
                assert_eq!(ra.region, "us-east-1");
                assert_eq!(ra.duration, ROLES_ANYWHERE_DEFAULT);
                assert_eq!(ra.profile_arn, PROFILE);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse("").unwrap().source, SourceConfig::Chain);
    }

    /// Role chaining: STS caps the session at 1 h and refuses to change the SourceIdentity
    /// that the Roles Anywhere session set.
    #[test]
    fn with_roles_anywhere_apps_chain_within_what_sts_allows() {
        let app = |extra: &str| {
            format!(
                "[[app]]\nname = \"billing\"\nrole_arn = \"arn:aws:iam::123456789012:role/billing\"\nmatch = {{ uid = 1001 }}\n{extra}"
            )
        };
        let config = parse(&format!(
            "{}{}",
            roles_anywhere(""),
            app("duration = \"4h\"")
        ))
        .unwrap();
        let input = config.apps[0].assume_role_input();
        assert_eq!(input.duration, ROLE_CHAINING_MAX);
        assert_eq!(input.source_identity, None);
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.to_string().contains("1h limit for role chaining")),
            "{:?}",
            config.warnings
        );
        let err = parse(&format!(
            "{}{}",
            roles_anywhere(""),
            app("source_identity = \"billing\"")
        ))
        .unwrap_err();
        assert!(
            err.contains("source_identity") && err.contains("SourceIdentity"),
            "{err}"
        );
        // The default chain keeps the app's own SourceIdentity and duration.
        let text = format!(
            "[sts]\nregion = \"us-east-1\"\n{}",
            app("duration = \"4h\"")
        );
        let chain = Config::parse(&text, std::path::Path::new("s.toml")).unwrap();
        let input = chain.apps[0].assume_role_input();
        assert_eq!(input.source_identity.as_deref(), Some("billing"));
        assert_eq!(input.duration.as_secs(), 4 * 3600);
    }

    #[test]
    fn each_bad_setting_is_named_with_its_line() {
        for (source, field, words) in [
            ("kind = \"vault\"", "source.kind", "not a source kind"),
            (
                &roles_anywhere("duration = \"13h\""),
                "source.duration",
                "between 15m",
            ),
            (
                &roles_anywhere("credentials_file = \"/x\""),
                "source.credentials_file",
                "not a setting of kind",
            ),
            (
                &roles_anywhere("").replace(ANCHOR, "arn:aws:iam::123456789012:role/x"),
                "source.trust_anchor_arn",
                "must look like",
            ),
            (
                &roles_anywhere("").replace("/etc/imds-broker/host.key", "host.key"),
                "source.private_key",
                "absolute",
            ),
            (
                "kind = \"roles_anywhere\"",
                "source.certificate",
                "required",
            ),
            (
                "kind = \"access_key\"",
                "source.credentials_file",
                "required",
            ),
            (
                "kind = \"access_key\"\ncredentials_file = \"/var/lib/imds-broker/credentials\"\nrotate_every = \"10m\"",
                "source.rotate_every",
                "at least 1h",
            ),
        ] {
            let err = parse(source).unwrap_err();
            assert!(
                err.contains(field) && err.contains(words),
                "{source}: {err}"
            );
            assert!(err.contains("s.toml:"), "names the file and line: {err}");
        }
    }
}

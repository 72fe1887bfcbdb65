//! An app's `match` table as data: which criteria a caller must meet, checked when the
//! config is loaded. What they mean for a caller is `policy`'s to say.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::Validator;
use super::raw::RawMatch;
use crate::glob::Glob;

/// The `match` table of one app. Every criterion that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub exe: Option<Glob>,
    /// Lower-case hex.
    pub exe_sha256: Option<String>,
    /// A unit of the system manager (see [`crate::identity::cgroup::Units`]).
    pub systemd_unit: Option<Glob>,
    /// A unit of one user's manager: `(uid, unit)`.
    pub systemd_user_unit: Option<(u32, Glob)>,
    pub cgroup: Option<Glob>,
    /// Peers that are not sockets of this host, unless the rule also pins a local identity.
    pub source: Vec<IpNet>,
    /// Every listed label must be set on the caller's container, with a value the glob matches.
    pub container_label: BTreeMap<String, Glob>,
    /// The image reference the caller's container was created from.
    pub container_image: Option<Glob>,
    pub container_name: Option<Glob>,
}

impl Validator<'_> {
    /// `containers`: whether `[containers]` is present, without which the `container_*` keys
    /// could never match.
    pub(super) fn matcher(
        &mut self,
        raw: Spanned<RawMatch>,
        field: &str,
        containers: bool,
    ) -> Option<Matcher> {
        let span = raw.span();
        let raw = raw.into_inner();
        let before = self.problems.len();
        if !containers {
            let keys = [
                raw.container_label
                    .as_ref()
                    .map(|k| ("container_label", k.span())),
                raw.container_image
                    .as_ref()
                    .map(|k| ("container_image", k.span())),
                raw.container_name
                    .as_ref()
                    .map(|k| ("container_name", k.span())),
            ];
            for (key, span) in keys.into_iter().flatten() {
                self.push(
                    span,
                    &format!("{field}.{key}"),
                    "needs a [containers] section: without it callers in containers are not identified as containers",
                );
            }
        }
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
        let container_label = match raw.container_label {
            Some(labels) if labels.get_ref().is_empty() => {
                self.push(
                    labels.span(),
                    &format!("{field}.container_label"),
                    "needs at least one label, e.g. { \"com.example.app\" = \"billing\" }",
                );
                BTreeMap::new()
            }
            Some(labels) => labels
                .into_inner()
                .into_iter()
                .map(|(k, v)| (k, Glob::new(&v)))
                .collect(),
            None => BTreeMap::new(),
        };
        let container_image = raw.container_image.map(|g| Glob::new(g.get_ref()));
        let container_name = raw.container_name.map(|g| Glob::new(g.get_ref()));
        let matcher = Matcher {
            uid,
            gid,
            exe,
            exe_sha256,
            systemd_unit,
            systemd_user_unit,
            cgroup,
            source,
            container_label,
            container_image,
            container_name,
        };
        if matcher.is_empty() && self.problems.len() == before {
            // An empty match would hand this role to every caller on the host.
            self.push(
                span,
                field,
                "needs at least one criterion (uid, user, gid, group, exe, exe_sha256, systemd_unit, systemd_user_unit, cgroup, source, container_label, container_image, container_name); an empty match would match every caller",
            );
        }
        (self.problems.len() == before).then_some(matcher)
    }
}

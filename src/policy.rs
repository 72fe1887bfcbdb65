//! Which app a caller is: the operator's `[[app]]` rules, evaluated in file order, first match
//! wins, and a caller that matches nothing gets nothing. One evaluation serves both the request
//! path and `explain`, so what `explain` prints is what the daemon does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::App;
pub use crate::config::Matcher;
use crate::glob::Glob;
use crate::identity::container::{ContainerMeta, Meta};
use crate::identity::{Caller, Needs};

/// The outcome of one criterion of one rule, for a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub criterion: &'static str,
    pub wanted: String,
    /// What the caller has, or `None` when it is not known for this caller.
    pub got: Option<String>,
    pub ok: bool,
}

/// One criterion of a rule: the one table that both [`Matcher::matches`] (every request) and
/// [`Matcher::evaluate`] (`explain`) go through, so they cannot disagree.
#[derive(Debug, Clone, Copy)]
enum Criterion<'a> {
    Uid(u32),
    Gid(u32),
    Exe(&'a Glob),
    ExeSha256(&'a str),
    SystemdUnit(&'a Glob),
    SystemdUserUnit(u32, &'a Glob),
    Cgroup(&'a Glob),
    /// `local_too`: the rule pins a local identity as well, so the address narrows it.
    Source(&'a [IpNet], bool),
    ContainerLabel(&'a BTreeMap<String, Glob>),
    ContainerImage(&'a Glob),
    ContainerName(&'a Glob),
}

impl Criterion<'_> {
    fn name(self) -> &'static str {
        match self {
            Criterion::Uid(_) => "uid",
            Criterion::Gid(_) => "gid",
            Criterion::Exe(_) => "exe",
            Criterion::ExeSha256(_) => "exe_sha256",
            Criterion::SystemdUnit(_) => "systemd_unit",
            Criterion::SystemdUserUnit(..) => "systemd_user_unit",
            Criterion::Cgroup(_) => "cgroup",
            Criterion::Source(..) => "source",
            Criterion::ContainerLabel(_) => "container_label",
            Criterion::ContainerImage(_) => "container_image",
            Criterion::ContainerName(_) => "container_name",
        }
    }

    /// Whether only the container runtime can say if it holds.
    fn needs_runtime(self) -> bool {
        matches!(
            self,
            Criterion::ContainerLabel(_)
                | Criterion::ContainerImage(_)
                | Criterion::ContainerName(_)
        )
    }

    /// Whether it holds for `caller`; allocation-free, it runs on every request.
    fn holds(self, caller: &Caller) -> bool {
        match self {
            Criterion::Uid(uid) => caller.uid() == Some(uid),
            Criterion::Gid(gid) => caller.gid() == Some(gid),
            // Lossy like `got`'s `display()`, which borrows for UTF-8 paths.
            Criterion::Exe(glob) => caller
                .exe()
                .is_some_and(|e| glob.matches(&e.as_os_str().to_string_lossy())),
            Criterion::ExeSha256(hash) => caller
                .local()
                .and_then(|l| l.exe_sha256.as_deref())
                .is_some_and(|got| got == hash),
            Criterion::SystemdUnit(glob) => caller.unit().is_some_and(|u| glob.matches(u)),
            Criterion::SystemdUserUnit(uid, glob) => caller
                .user_unit()
                .is_some_and(|(owner, unit)| owner == uid && glob.matches(unit)),
            Criterion::Cgroup(glob) => caller.cgroup().is_some_and(|c| glob.matches(c)),
            // A host process's address is the host's own (e.g. docker0's 172.17.0.1 when the
            // daemon listens there): it says nothing about who is calling. A socket found in
            // another namespace connects from that namespace's own address.
            Criterion::Source(nets, local_too) => {
                (local_too || caller.address_is_its_own())
                    && nets
                        .iter()
                        .any(|n| n.contains(&caller.peer().ip().to_canonical()))
            }
            Criterion::ContainerLabel(labels) => meta(caller).is_some_and(|m| {
                labels
                    .iter()
                    .all(|(key, glob)| m.labels.get(key).is_some_and(|v| glob.matches(v)))
            }),
            Criterion::ContainerImage(glob) => meta(caller).is_some_and(|m| glob.matches(&m.image)),
            Criterion::ContainerName(glob) => meta(caller).is_some_and(|m| glob.matches(&m.name)),
        }
    }

    fn wanted(self) -> String {
        match self {
            Criterion::Uid(v) | Criterion::Gid(v) => v.to_string(),
            Criterion::Exe(g) | Criterion::SystemdUnit(g) | Criterion::Cgroup(g) => {
                g.as_str().into()
            }
            Criterion::ExeSha256(h) => h.into(),
            Criterion::SystemdUserUnit(uid, g) => format!("{} of uid {uid}", g.as_str()),
            Criterion::Source(nets, _) => {
                let nets: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                nets.join(", ")
            }
            Criterion::ContainerLabel(labels) => labels
                .iter()
                .map(|(k, g)| format!("{k}={}", g.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            Criterion::ContainerImage(g) | Criterion::ContainerName(g) => g.as_str().into(),
        }
    }

    /// What `caller` has for this criterion, `None` when that is not known.
    fn got(self, caller: &Caller) -> Option<String> {
        match self {
            Criterion::Uid(_) => caller.uid().map(|u| u.to_string()),
            Criterion::Gid(_) => caller.gid().map(|g| g.to_string()),
            Criterion::Exe(_) => caller.exe().map(|e| e.display().to_string()),
            Criterion::ExeSha256(_) => caller.local().and_then(|l| l.exe_sha256.clone()),
            Criterion::SystemdUnit(_) => caller.unit().map(str::to_owned),
            Criterion::SystemdUserUnit(..) => caller
                .user_unit()
                .map(|(uid, unit)| format!("{unit} of uid {uid}")),
            Criterion::Cgroup(_) => caller.cgroup().map(str::to_owned),
            Criterion::Source(..) => {
                let ip = caller.peer().ip().to_canonical();
                Some(match caller {
                    Caller::Remote { .. } => ip.to_string(),
                    Caller::Local(l) if l.netns.is_some() => {
                        format!("{ip} (its own, in another network namespace of this host)")
                    }
                    _ => format!("{ip} (a socket of this host)"),
                })
            }
            Criterion::ContainerLabel(labels) => runtime_says(caller, |m| {
                labels
                    .keys()
                    .map(|k| match m.labels.get(k) {
                        Some(v) => format!("{k}={v}"),
                        None => format!("{k} unset"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
            Criterion::ContainerImage(_) => runtime_says(caller, |m| m.image.clone()),
            Criterion::ContainerName(_) => runtime_says(caller, |m| m.name.clone()),
        }
    }
}

/// What the runtime said about the caller's container, if it did.
fn meta(caller: &Caller) -> Option<&ContainerMeta> {
    caller.container().and_then(|c| c.known())
}

/// `what` of the caller's container, or why it is not known.
fn runtime_says(caller: &Caller, what: impl Fn(&ContainerMeta) -> String) -> Option<String> {
    let container = caller.container()?;
    match &container.meta {
        Meta::Known(m) => Some(what(m)),
        Meta::Unavailable(reason) => Some(format!("(the runtime could not say: {reason})")),
        Meta::NotAsked => None,
    }
}

/// What [`decide`] concluded for a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The first app whose rule matches.
    App(usize),
    /// No rule matches.
    NoMatch,
    /// Rule `app` needs what the container runtime could not say (`reason`), and would match
    /// otherwise: the caller is refused, since a later rule might hand it another role.
    Undecided { app: usize, reason: Arc<str> },
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.criteria().next().is_none()
    }

    /// Whether the rule names who is calling on this host, beyond an address.
    fn pins_local(&self) -> bool {
        self.local_criteria().next().is_some()
    }

    /// The criteria about who is calling on this host: all but `source`.
    fn local_criteria(&self) -> impl Iterator<Item = Criterion<'_>> {
        [
            self.uid.map(Criterion::Uid),
            self.gid.map(Criterion::Gid),
            self.exe.as_ref().map(Criterion::Exe),
            self.exe_sha256.as_deref().map(Criterion::ExeSha256),
            self.systemd_unit.as_ref().map(Criterion::SystemdUnit),
            self.systemd_user_unit
                .as_ref()
                .map(|(uid, glob)| Criterion::SystemdUserUnit(*uid, glob)),
            self.cgroup.as_ref().map(Criterion::Cgroup),
            (!self.container_label.is_empty())
                .then_some(Criterion::ContainerLabel(&self.container_label)),
            self.container_image.as_ref().map(Criterion::ContainerImage),
            self.container_name.as_ref().map(Criterion::ContainerName),
        ]
        .into_iter()
        .flatten()
    }

    /// Whether the rule was written with containers in mind: it names a container, a cgroup or
    /// an address. A rule of host keys alone (uid, exe, unit…) never matches a container: a
    /// container's root is uid 0 too, and `uid = 0` was not written for it.
    pub fn serves_containers(&self) -> bool {
        !self.container_label.is_empty()
            || self.container_image.is_some()
            || self.container_name.is_some()
            || self.cgroup.is_some()
            || !self.source.is_empty()
    }

    /// Whether some criterion needs the container runtime's answer.
    pub fn needs_runtime(&self) -> bool {
        self.criteria().any(Criterion::needs_runtime)
    }

    /// Why the rule cannot be decided for `caller`: it would match but for criteria only the
    /// container runtime can answer, and the runtime did not.
    pub fn undecided<'c>(&self, caller: &'c Caller) -> Option<&'c Arc<str>> {
        let Meta::Unavailable(reason) = &caller.container()?.meta else {
            return None;
        };
        (self.needs_runtime()
            && !matches!(caller, Caller::Unresolved { .. })
            && self
                .criteria()
                .filter(|c| !c.needs_runtime())
                .all(|c| c.holds(caller)))
        .then_some(reason)
    }

    /// Every criterion that is set, in one fixed order.
    fn criteria(&self) -> impl Iterator<Item = Criterion<'_>> {
        let source =
            (!self.source.is_empty()).then(|| Criterion::Source(&self.source, self.pins_local()));
        self.local_criteria().chain(source)
    }

    pub fn needs(&self) -> Needs {
        Needs {
            process: self.gid.is_some() || self.exe.is_some() || self.exe_sha256.is_some(),
            exe_hash: self.exe_sha256.is_some(),
        }
    }

    /// Every criterion, checked against `caller`; and for a container that a rule of host
    /// keys alone cannot serve, that as one more failed check.
    pub fn evaluate(&self, caller: &Caller) -> Vec<Check> {
        let mut checks: Vec<Check> = self
            .criteria()
            .map(|c| Check {
                criterion: c.name(),
                wanted: c.wanted(),
                got: c.got(caller),
                ok: c.holds(caller),
            })
            .collect();
        if let Some(container) = caller.container().filter(|_| !self.serves_containers()) {
            checks.push(Check {
                criterion: "container",
                wanted: "a rule with container_label, container_image, container_name, cgroup or source (rules of host keys alone never match a container)".into(),
                got: Some(container.reference.to_string()),
                ok: false,
            });
        }
        checks
    }

    /// Whether every criterion holds: the verdict of [`Self::evaluate`], without its report.
    pub fn matches(&self, caller: &Caller) -> bool {
        // Deny by default: an empty matcher matches nobody, and an unresolved caller matches
        // no rule at all.
        !self.is_empty()
            && !matches!(caller, Caller::Unresolved { .. })
            && (caller.container().is_none() || self.serves_containers())
            && self.criteria().all(|c| c.holds(caller))
    }

    /// Whether the executable's digest is worth computing for `caller`: this rule asks for one
    /// and every other criterion already holds. Hashing reads the whole file, so it is never
    /// done for a caller the rule refuses anyway.
    pub fn wants_exe_hash(&self, caller: &Caller) -> bool {
        self.exe_sha256.is_some()
            && !matches!(caller, Caller::Unresolved { .. })
            && (caller.container().is_none() || self.serves_containers())
            && self
                .criteria()
                .filter(|c| !matches!(c, Criterion::ExeSha256(_)))
                .all(|c| c.holds(caller))
    }

    /// Whether every caller `later` matches is also matched by `self`, so that a rule with
    /// `later` placed after one with `self` can never be reached.
    pub fn covers(&self, later: &Matcher) -> bool {
        fn glob_covers(a: Option<&Glob>, b: Option<&Glob>) -> bool {
            match (a, b) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => a == b || (b.is_literal() && a.matches(b.as_str())),
            }
        }
        fn eq_covers<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.is_none() || (b.is_some() && a == b)
        }
        let user_unit_covers = match (&self.systemd_user_unit, &later.systemd_user_unit) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((a_uid, a)), Some((b_uid, b))) => a_uid == b_uid && glob_covers(Some(a), Some(b)),
        };
        !self.is_empty()
            && eq_covers(&self.uid, &later.uid)
            && eq_covers(&self.gid, &later.gid)
            && eq_covers(&self.exe_sha256, &later.exe_sha256)
            && glob_covers(self.exe.as_ref(), later.exe.as_ref())
            && glob_covers(self.systemd_unit.as_ref(), later.systemd_unit.as_ref())
            && user_unit_covers
            && glob_covers(self.cgroup.as_ref(), later.cgroup.as_ref())
            && glob_covers(self.container_image.as_ref(), later.container_image.as_ref())
            && glob_covers(self.container_name.as_ref(), later.container_name.as_ref())
            && self.container_label.iter().all(|(key, glob)| {
                glob_covers(Some(glob), later.container_label.get(key))
            })
            // A rule of host keys alone does not match the containers a later one may serve.
            && (self.serves_containers() || !later.serves_containers())
            && (self.source.is_empty()
                || (!later.source.is_empty()
                    // A source-only rule matches remote callers only; a later rule that also
                    // pins a local identity matches local ones.
                    && (self.pins_local() || !later.pins_local())
                    && later
                        .source
                        .iter()
                        .all(|l| self.source.iter().any(|s| s.contains(l)))))
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for c in self.criteria() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            match c {
                Criterion::ExeSha256(v) => write!(f, "exe_sha256={}…", &v[..12.min(v.len())])?,
                Criterion::SystemdUserUnit(uid, g) => {
                    write!(f, "systemd_user_unit={}@uid{uid}", g.as_str())?
                }
                Criterion::Source(nets, _) => {
                    let nets: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                    write!(f, "source={}", nets.join(","))?
                }
                other => write!(f, "{}={}", other.name(), other.wanted())?,
            }
        }
        if first {
            f.write_str("(nothing)")?;
        }
        Ok(())
    }
}

/// The first app whose rule matches `caller`, if any.
pub fn find_app<'a>(apps: &'a [App], caller: &Caller) -> Option<&'a App> {
    find_app_index(apps, caller).map(|i| &apps[i])
}

/// The position of the first app whose rule matches `caller`, if any (and none before it is
/// undecided, see [`decide`]).
pub fn find_app_index(apps: &[App], caller: &Caller) -> Option<usize> {
    match decide(apps, caller) {
        Verdict::App(i) => Some(i),
        Verdict::NoMatch | Verdict::Undecided { .. } => None,
    }
}

/// Which app `caller` is: rules in order, first match wins; a rule that cannot be decided
/// (the container runtime did not answer) stops the search, refusing the caller.
pub fn decide(apps: &[App], caller: &Caller) -> Verdict {
    for (i, app) in apps.iter().enumerate() {
        let Some(rule) = &app.matcher else { continue };
        if rule.matches(caller) {
            return Verdict::App(i);
        }
        if let Some(reason) = rule.undecided(caller) {
            return Verdict::Undecided {
                app: i,
                reason: reason.clone(),
            };
        }
    }
    Verdict::NoMatch
}

/// Whether `caller` is a container that some rule would ask the runtime about.
pub fn wants_container_meta(apps: &[App], caller: &Caller) -> bool {
    caller.container().is_some_and(|c| c.meta == Meta::NotAsked)
        && apps
            .iter()
            .any(|app| app.matcher.as_ref().is_some_and(Matcher::needs_runtime))
}

/// Whether some rule would match `caller` if its executable's digest were known (see
/// [`Matcher::wants_exe_hash`]).
pub fn wants_exe_hash(apps: &[App], caller: &Caller) -> bool {
    apps.iter().any(|app| {
        app.matcher
            .as_ref()
            .is_some_and(|m| m.wants_exe_hash(caller))
    })
}

/// What resolving callers must find out to evaluate `apps`.
pub fn needs(apps: &[App]) -> Needs {
    apps.iter().fold(Needs::default(), |acc, app| {
        let n = app.matcher.as_ref().map(Matcher::needs).unwrap_or_default();
        Needs {
            process: acc.process || n.process,
            exe_hash: acc.exe_hash || n.exe_hash,
        }
    })
}

/// What `check` needs to know about this host to judge the rules.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    /// Every address of the host's interfaces in this network namespace.
    pub addresses: Vec<IpAddr>,
    /// Cgroup subtrees someone other than root controls (see
    /// [`crate::identity::cgroup::CgroupIndex::foreign_subtrees`]).
    pub foreign_subtrees: Vec<String>,
}

/// Where systemd puts a user's manager, whose subtree that user controls: a cgroup rule that
/// reaches in there is met by a cgroup the user makes, whether or not anyone is logged in now.
const USER_MANAGER_EXAMPLE: &str = "/user.slice/user-1000.slice/user@1000.service";

/// Rules that do not mean what they seem to on this host, one line each for `check`.
pub fn rule_warnings(apps: &[App], host: &HostView) -> Vec<String> {
    let rules: Vec<_> = apps
        .iter()
        .enumerate()
        .filter_map(|(i, app)| Some((i, app.name.as_str(), app.matcher.as_ref()?)))
        .collect();
    warnings_for(&rules, host)
}

/// [`rule_warnings`] for `(index, app name, rule)`.
fn warnings_for(rules: &[(usize, &str, &Matcher)], host: &HostView) -> Vec<String> {
    let mut out = Vec::new();
    for &(i, name, m) in rules {
        for net in &m.source {
            if let Some(addr) = host
                .addresses
                .iter()
                .map(IpAddr::to_canonical)
                .find(|a| net.contains(a))
            {
                let effect = if m.pins_local() {
                    "a local process connecting from it is matched by the rule's other criteria, not by the address"
                } else {
                    "local processes connecting from it never match this rule (source rules match only callers in other network namespaces or hosts); pin a uid or unit to serve a local process"
                };
                out.push(format!(
                    "warning: app[{i}] {name:?}: source {net} contains {addr}, an address of this host: {effect}"
                ));
            }
        }
        // With the uid pinned, only that user's own cgroups can match.
        if let Some(glob) = m.cgroup.as_ref().filter(|_| m.uid.is_none()) {
            let reached = host
                .foreign_subtrees
                .iter()
                .map(String::as_str)
                .chain([USER_MANAGER_EXAMPLE])
                .find(|dir| glob.reaches_into(dir));
            if let Some(dir) = reached {
                out.push(format!(
                    "warning: app[{i}] {name:?}: cgroup {} reaches into {dir}, a subtree that a user other than root controls: whoever controls it can create a matching cgroup; pin the uid too, or narrow the glob to root's slices",
                    glob.as_str()
                ));
            }
        }
    }
    out
}

/// Pairs `(earlier, later)` of app indexes where the later rule can never match.
pub fn shadowed(apps: &[App]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (j, later) in apps.iter().enumerate() {
        let Some(later_rule) = &later.matcher else {
            continue;
        };
        if let Some(i) = apps[..j].iter().position(|earlier| {
            earlier
                .matcher
                .as_ref()
                .is_some_and(|rule| rule.covers(later_rule))
        }) {
            out.push((i, j));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCaller;
    use crate::identity::process::ProcessInfo;

    fn local(uid: u32) -> Caller {
        Caller::local_uid(uid, "127.0.0.1:5000".parse().unwrap())
    }

    fn full(uid: u32, exe: &str, cgroup: &str) -> Caller {
        Caller::Local(LocalCaller {
            peer: "127.0.0.1:5000".parse().unwrap(),
            uid,
            cgroup: Some(cgroup.into()),
            unit: crate::identity::cgroup::Units::by_name(cgroup).system,
            user_unit: None,
            process: Some(ProcessInfo {
                pid: 42,
                uid,
                gid: 7,
                exe: exe.into(),
                start_time: 1,
            }),
            exe_sha256: Some("ab".repeat(32)),
            netns: None,
            container: None,
        })
    }

    #[test]
    fn uid_rule_matches_only_that_uid() {
        let m = Matcher {
            uid: Some(1000),
            ..Default::default()
        };
        assert!(m.matches(&local(1000)));
        assert!(!m.matches(&local(1001)));
        assert!(!m.matches(&Caller::Remote {
            peer: "10.0.0.1:1".parse().unwrap()
        }));
    }

    #[test]
    fn empty_matcher_and_unresolved_callers_match_nothing() {
        assert!(!Matcher::default().matches(&local(0)));
        let m = Matcher {
            source: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        assert!(!m.matches(&Caller::Unresolved {
            peer: "127.0.0.1:1".parse().unwrap(),
            reason: "ambiguous".into(),
            uid: Some(0),
            cgroup: None,
        }));
    }

    #[test]
    fn all_criteria_must_hold() {
        let m = Matcher {
            uid: Some(1000),
            exe: Some(Glob::new("/opt/billing/*")),
            systemd_unit: Some(Glob::new("billing.service")),
            cgroup: Some(Glob::new("/system.slice/*")),
            gid: Some(7),
            exe_sha256: Some("ab".repeat(32)),
            ..Default::default()
        };
        let good = full(1000, "/opt/billing/run", "/system.slice/billing.service");
        assert!(m.matches(&good));
        assert!(!m.matches(&full(
            1000,
            "/opt/other/run",
            "/system.slice/billing.service"
        )));
        assert!(!m.matches(&full(
            1000,
            "/opt/billing/run",
            "/system.slice/other.service"
        )));
        assert!(!m.matches(&full(
            1001,
            "/opt/billing/run",
            "/system.slice/billing.service"
        )));
        // Without process information, exe rules cannot hold.
        assert!(!m.matches(&local(1000)));
        let failed: Vec<_> = m
            .evaluate(&full(
                1000,
                "/usr/bin/python3",
                "/system.slice/billing.service",
            ))
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.criterion)
            .collect();
        assert_eq!(failed, ["exe"]);
    }

    #[test]
    fn source_matches_remote_peers_including_v4_mapped() {
        let m = Matcher {
            source: vec!["10.200.0.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert!(m.matches(&Caller::Remote {
            peer: "10.200.0.7:4000".parse().unwrap()
        }));
        assert!(m.matches(&Caller::Remote {
            peer: "[::ffff:10.200.0.7]:4000".parse().unwrap()
        }));
        assert!(!m.matches(&Caller::Remote {
            peer: "10.201.0.7:4000".parse().unwrap()
        }));
    }

    /// The security review's finding: with the daemon listening on one of the host's own
    /// addresses (docker0's 172.17.0.1), a local process connects from that address too.
    #[test]
    fn source_only_rules_never_match_local_sockets() {
        let m = Matcher {
            source: vec!["172.17.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let host_process = Caller::local_uid(61003, "172.17.0.1:40000".parse().unwrap());
        assert!(!m.matches(&host_process));
        let check = &m.evaluate(&host_process)[0];
        assert_eq!(
            (check.ok, check.got.as_deref()),
            (false, Some("172.17.0.1 (a socket of this host)"))
        );
        assert!(m.matches(&Caller::Remote {
            peer: "172.17.0.2:40000".parse().unwrap()
        }));
        // A rule that also pins who is calling narrows that local caller by address.
        let pinned = Matcher {
            uid: Some(61003),
            ..m.clone()
        };
        assert!(pinned.matches(&host_process));
        assert!(!pinned.matches(&Caller::local_uid(
            61003,
            "127.0.0.1:40000".parse().unwrap()
        )));
        // So a source-only rule never shadows a later local rule with the same range.
        assert!(!m.covers(&pinned));
    }

    #[test]
    fn executables_are_hashed_only_for_callers_a_rule_could_serve() {
        let m = Matcher {
            uid: Some(1000),
            exe_sha256: Some("ab".repeat(32)),
            ..Default::default()
        };
        let mut entitled = full(1000, "/opt/billing/run", "/system.slice/billing.service");
        if let Caller::Local(l) = &mut entitled {
            l.exe_sha256 = None;
        }
        assert!(m.wants_exe_hash(&entitled));
        assert!(!m.wants_exe_hash(&full(1001, "/opt/x", "/system.slice/x.service")));
        assert!(!m.wants_exe_hash(&Caller::Remote {
            peer: "10.0.0.1:1".parse().unwrap()
        }));
        let no_hash_rule = Matcher {
            uid: Some(1000),
            ..Default::default()
        };
        assert!(!no_hash_rule.wants_exe_hash(&entitled));
    }

    fn app(name: &'static str, matcher: Matcher) -> (&'static str, Matcher) {
        (name, matcher)
    }

    #[test]
    fn check_warns_about_host_addresses_and_foreign_subtrees() {
        let host = HostView {
            addresses: vec!["172.17.0.1".parse().unwrap(), "::1".parse().unwrap()],
            foreign_subtrees: vec!["/machine.slice/lxc.payload.c1".into()],
        };
        let apps = [
            app(
                "bridge",
                Matcher {
                    source: vec!["172.17.0.0/16".parse().unwrap()],
                    ..Default::default()
                },
            ),
            app(
                "elsewhere",
                Matcher {
                    source: vec!["10.9.0.0/16".parse().unwrap()],
                    ..Default::default()
                },
            ),
            app(
                "anywhere",
                Matcher {
                    cgroup: Some(Glob::new("/**/billing.service")),
                    ..Default::default()
                },
            ),
            app(
                "containers",
                Matcher {
                    cgroup: Some(Glob::new("/machine.slice/*/system.slice/x.service")),
                    ..Default::default()
                },
            ),
            app(
                "system",
                Matcher {
                    cgroup: Some(Glob::new("/system.slice/*")),
                    ..Default::default()
                },
            ),
            app(
                "pinned",
                Matcher {
                    uid: Some(1000),
                    cgroup: Some(Glob::new("/**/billing.service")),
                    ..Default::default()
                },
            ),
        ];
        let rules: Vec<_> = apps
            .iter()
            .enumerate()
            .map(|(i, (name, m))| (i, *name, m))
            .collect();
        let warnings = warnings_for(&rules, &host);
        let named = |name: &str| {
            warnings
                .iter()
                .filter(|w| w.contains(&format!("{name:?}")))
                .collect::<Vec<_>>()
        };
        assert!(named("bridge")[0].contains("172.17.0.1"), "{warnings:?}");
        assert!(
            named("anywhere")[0].contains("reaches into"),
            "{warnings:?}"
        );
        // With no such subtree on the host now, a user's manager is one all the same.
        let bare = warnings_for(&rules[2..3], &HostView::default());
        assert!(bare[0].contains("user@1000.service"), "{bare:?}");
        assert!(
            named("containers")[0].contains("lxc.payload.c1"),
            "{warnings:?}"
        );
        for quiet in ["elsewhere", "system", "pinned"] {
            assert!(named(quiet).is_empty(), "{quiet}: {warnings:?}");
        }
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }

    #[test]
    fn user_units_match_only_with_their_users_manager() {
        let caller = |path: &str| {
            let units = crate::identity::cgroup::Units::by_name(path);
            Caller::Local(LocalCaller {
                peer: "127.0.0.1:5000".parse().unwrap(),
                uid: 1001,
                cgroup: Some(path.into()),
                unit: units.system,
                user_unit: units.user,
                process: None,
                exe_sha256: None,
                netns: None,
                container: None,
            })
        };
        let in_user_manager =
            caller("/user.slice/user-1001.slice/user@1001.service/app.slice/billing.service");
        let system = caller("/system.slice/billing.service");
        let unit = Matcher {
            systemd_unit: Some(Glob::new("billing.service")),
            ..Default::default()
        };
        let user_unit = |uid| Matcher {
            systemd_user_unit: Some((uid, Glob::new("billing.service"))),
            ..Default::default()
        };
        assert!(unit.matches(&system));
        assert!(
            !unit.matches(&in_user_manager),
            "a user's unit is not the system's"
        );
        assert!(user_unit(1001).matches(&in_user_manager));
        assert!(!user_unit(1002).matches(&in_user_manager));
        assert!(!user_unit(1001).matches(&system));
        assert!(!unit.covers(&user_unit(1001)) && !user_unit(1001).covers(&unit));
    }

    /// Every combination of a pool of criteria against a pool of callers (local with and
    /// without process, hash, cgroup; v4, v4-mapped and v6 peers; a non-UTF-8 executable;
    /// remote; unresolved): `matches` says what `evaluate` says.
    #[test]
    fn matches_agrees_with_evaluate_everywhere() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;

        let sha_a = "ab".repeat(32);
        let non_utf8 = std::path::PathBuf::from(OsStr::from_bytes(b"/opt/billing/r\xffn"));
        let mut callers = Vec::new();
        for peer in ["127.0.0.1:5000", "[::ffff:10.200.0.7]:1"] {
            for uid in [0, 1000] {
                for cgroup in [
                    None,
                    Some("/system.slice/billing.service"),
                    Some("/user.slice/x"),
                ] {
                    for process in [
                        None,
                        Some((7, "/usr/bin/python3".into())),
                        Some((8, "/opt/billing/run".into())),
                        Some((7, non_utf8.clone())),
                    ] {
                        for sha in [None, Some(sha_a.clone()), Some("cd".repeat(32))] {
                            callers.push(Caller::Local(LocalCaller {
                                peer: peer.parse().unwrap(),
                                uid,
                                cgroup: cgroup.map(str::to_owned),
                                unit: cgroup.and_then(|c| {
                                    crate::identity::cgroup::Units::by_name(c).system
                                }),
                                user_unit: None,
                                process: process.clone().map(|(gid, exe)| ProcessInfo {
                                    pid: 42,
                                    uid,
                                    gid,
                                    exe,
                                    start_time: 1,
                                }),
                                exe_sha256: sha,
                                netns: None,
                                container: None,
                            }));
                        }
                    }
                }
            }
        }
        for peer in [
            "10.200.0.7:1",
            "[::ffff:10.200.0.7]:1",
            "[fd00::1]:1",
            "8.8.8.8:1",
        ] {
            callers.push(Caller::Remote {
                peer: peer.parse().unwrap(),
            });
        }
        for (peer, uid) in [("127.0.0.1:1", Some(1000)), ("10.200.0.7:1", None)] {
            callers.push(Caller::Unresolved {
                peer: peer.parse().unwrap(),
                reason: "ambiguous".into(),
                uid,
                cgroup: Some("/system.slice/billing.service".into()),
            });
        }

        let globs = |pool: &[&str]| {
            std::iter::once(None)
                .chain(pool.iter().map(|p| Some(Glob::new(p))))
                .collect::<Vec<_>>()
        };
        let nets = |pool: &[&str]| pool.iter().map(|n| n.parse().unwrap()).collect::<Vec<_>>();
        let (mut checked, mut matched) = (0, 0);
        for uid in [None, Some(0), Some(1000)] {
            for gid in [None, Some(7)] {
                for exe in globs(&[
                    "/usr/bin/*",
                    "/opt/billing/run",
                    "/opt/**",
                    "/opt/billing/r*n",
                ]) {
                    for exe_sha256 in [None, Some(sha_a.clone())] {
                        for systemd_unit in globs(&["billing.service", "*.service"]) {
                            for cgroup in globs(&["/system.slice/*", "/user.slice/x"]) {
                                for source in [
                                    nets(&[]),
                                    nets(&["10.200.0.0/24"]),
                                    nets(&["127.0.0.0/8", "fd00::/8"]),
                                ] {
                                    let m = Matcher {
                                        uid,
                                        gid,
                                        exe: exe.clone(),
                                        exe_sha256: exe_sha256.clone(),
                                        systemd_unit: systemd_unit.clone(),
                                        systemd_user_unit: None,
                                        cgroup: cgroup.clone(),
                                        source,
                                        ..Matcher::default()
                                    };
                                    for caller in &callers {
                                        let expected = !m.is_empty()
                                            && !matches!(caller, Caller::Unresolved { .. })
                                            && m.evaluate(caller).iter().all(|c| c.ok);
                                        assert_eq!(
                                            m.matches(caller),
                                            expected,
                                            "{m} vs {caller:?}"
                                        );
                                        checked += 1;
                                        matched += usize::from(expected);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Not vacuous: both verdicts occur often, the non-UTF-8 executable included.
        assert!(
            matched > 1_000 && checked - matched > 1_000,
            "{matched} of {checked}"
        );
        let glob_on_lossy = Matcher {
            exe: Some(Glob::new("/opt/billing/r*n")),
            ..Default::default()
        };
        assert!(
            callers
                .iter()
                .any(|c| c.exe() == Some(&non_utf8) && glob_on_lossy.matches(c))
        );
    }

    #[test]
    fn covers_detects_unreachable_rules() {
        let uid = |u| Matcher {
            uid: Some(u),
            ..Default::default()
        };
        let uid_exe = Matcher {
            uid: Some(1),
            exe: Some(Glob::new("/usr/bin/x")),
            ..Default::default()
        };
        assert!(uid(1).covers(&uid_exe), "broader first shadows narrower");
        assert!(!uid_exe.covers(&uid(1)), "narrower first does not");
        assert!(!uid(1).covers(&uid(2)));
        let glob = Matcher {
            exe: Some(Glob::new("/usr/bin/*")),
            ..Default::default()
        };
        let literal = Matcher {
            exe: Some(Glob::new("/usr/bin/python3")),
            ..Default::default()
        };
        assert!(glob.covers(&literal));
        assert!(!literal.covers(&glob));
        let wide = Matcher {
            source: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        let narrow = Matcher {
            source: vec!["10.1.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        assert!(wide.covers(&narrow));
        assert!(!narrow.covers(&wide));
    }
}

#[cfg(test)]
mod container_tests {
    use super::*;
    use crate::config::Config;
    use crate::identity::LocalCaller;
    use crate::identity::container::{Container, ContainerRef, Engine};

    const ID: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";

    fn config(rules: &str) -> Config {
        let text = format!(
            "[sts]\nregion = \"us-east-1\"\n[containers]\nruntime_socket = \"/run/x.sock\"\n{rules}"
        );
        Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
    }

    fn rule(name: &str, matcher: &str) -> String {
        format!(
            "[[app]]\nname = \"{name}\"\nrole_arn = \"arn:aws:iam::111122223333:role/{name}\"\n[app.match]\n{matcher}\n"
        )
    }

    fn container(uid: u32, meta: Meta) -> Caller {
        let cgroup = format!("/libpod_parent/libpod-{ID}");
        Caller::Local(LocalCaller {
            peer: "10.88.0.7:40000".parse().unwrap(),
            uid,
            cgroup: Some(cgroup.clone()),
            unit: None,
            user_unit: None,
            process: None,
            exe_sha256: None,
            netns: Some(4026532383),
            container: Some(Container {
                reference: ContainerRef {
                    engine: Engine::Podman,
                    id: ID.into(),
                    cgroup: cgroup.into(),
                },
                meta,
            }),
        })
    }

    fn billing() -> Meta {
        Meta::Known(Arc::new(ContainerMeta {
            id: ID.into(),
            name: "billing-1".into(),
            image: "registry.example/billing:1.4".into(),
            labels: [("com.example.app".into(), "billing".into())].into(),
        }))
    }

    fn name_of(config: &Config, verdict: &Verdict) -> String {
        match verdict {
            Verdict::App(i) => config.apps[*i].name.clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn container_keys_match_what_the_runtime_said() {
        let config = config(
            &[
                rule("wrong-label", "container_label = { \"com.example.app\" = \"web\" }"),
                rule("two-labels", "container_label = { \"com.example.app\" = \"billing\", \"tier\" = \"*\" }"),
                rule("image", "container_image = \"registry.example/billing:*\"\ncontainer_name = \"billing-*\""),
            ]
            .concat(),
        );
        let caller = container(0, billing());
        assert_eq!(name_of(&config, &decide(&config.apps, &caller)), "image");
        // Not for a host process, nor a container the runtime said nothing about.
        let host = Caller::local_uid(0, "127.0.0.1:1".parse().unwrap());
        assert_eq!(decide(&config.apps, &host), Verdict::NoMatch);
        assert_eq!(
            decide(&config.apps, &container(0, Meta::NotAsked)),
            Verdict::NoMatch
        );
    }

    /// `uid = 0` was written for the host's root: a container's root is not it.
    #[test]
    fn rules_of_host_keys_alone_never_match_a_container() {
        let config = config(
            &[
                rule("host-root", "uid = 0"),
                rule("pods", "cgroup = \"/libpod_parent/libpod-*\""),
            ]
            .concat(),
        );
        let caller = container(0, Meta::NotAsked);
        assert_eq!(name_of(&config, &decide(&config.apps, &caller)), "pods");
        let checks = config.apps[0].matcher.as_ref().unwrap().evaluate(&caller);
        assert!(
            checks.iter().any(|c| c.criterion == "container" && !c.ok),
            "{checks:?}"
        );
        // A rule that names containers is not shadowed by one of host keys.
        assert_eq!(shadowed(&config.apps), vec![]);
    }

    /// The runtime is down: the rule that would decide cannot be, and a later rule must not
    /// hand the caller another role; earlier rules still decide.
    #[test]
    fn an_unanswered_runtime_stops_the_search() {
        let down = Meta::Unavailable("runtime unreachable at /run/x.sock".into());
        let labels_first = config(
            &[
                rule(
                    "billing",
                    "container_label = { \"com.example.app\" = \"billing\" }",
                ),
                rule("any-pod", "cgroup = \"/libpod_parent/*\""),
            ]
            .concat(),
        );
        match decide(&labels_first.apps, &container(0, down.clone())) {
            Verdict::Undecided { app: 0, reason } => assert!(reason.contains("unreachable")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            find_app_index(&labels_first.apps, &container(0, down.clone())),
            None
        );
        let cgroup_first = config(
            &[
                rule("any-pod", "cgroup = \"/libpod_parent/*\""),
                rule(
                    "billing",
                    "container_label = { \"com.example.app\" = \"billing\" }",
                ),
            ]
            .concat(),
        );
        assert_eq!(
            decide(&cgroup_first.apps, &container(0, down.clone())),
            Verdict::App(0)
        );
        // A rule whose other keys already fail is not undecided: it cannot match anyway.
        let pinned = config(&rule(
            "billing",
            "uid = 1000\ncontainer_label = { \"com.example.app\" = \"billing\" }",
        ));
        assert_eq!(decide(&pinned.apps, &container(0, down)), Verdict::NoMatch);
        assert!(wants_container_meta(
            &pinned.apps,
            &container(0, Meta::NotAsked)
        ));
        assert!(!wants_container_meta(
            &cgroup_first.apps[..1],
            &container(0, Meta::NotAsked)
        ));
    }

    /// In its own namespace a container's address is its own: `source` rules see it, as they
    /// did when such callers were remote.
    #[test]
    fn source_rules_match_a_container_by_its_own_address() {
        let config = config(&rule("bridge", "source = [\"10.88.0.0/16\"]"));
        assert_eq!(
            decide(&config.apps, &container(0, Meta::NotAsked)),
            Verdict::App(0)
        );
    }

    #[test]
    fn label_rules_cover_narrower_label_rules() {
        let config = config(
            &[
                rule(
                    "broad",
                    "container_label = { \"com.example.app\" = \"b*\" }",
                ),
                rule(
                    "narrow",
                    "container_label = { \"com.example.app\" = \"billing\", \"tier\" = \"x\" }",
                ),
                rule("other", "container_label = { \"tier\" = \"x\" }"),
            ]
            .concat(),
        );
        assert_eq!(shadowed(&config.apps), vec![(0, 1)]);
    }

    #[test]
    fn container_keys_need_the_containers_section() {
        let text = format!(
            "[sts]\nregion = \"us-east-1\"\n{}",
            rule("b", "container_name = \"x\"")
        );
        let err = Config::parse(&text, std::path::Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("[containers]"), "{err}");
    }
}

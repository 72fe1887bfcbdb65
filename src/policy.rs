//! Which app a caller is: the operator's `[[app]]` rules, evaluated in file order, first match
//! wins, and a caller that matches nothing gets nothing. One evaluation serves both the request
//! path and `explain`, so what `explain` prints is what the daemon does.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::App;
use crate::glob::Glob;
use crate::identity::{Caller, Needs};

/// The `match` table of one app. Every criterion that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub exe: Option<Glob>,
    /// Lower-case hex.
    pub exe_sha256: Option<String>,
    pub systemd_unit: Option<Glob>,
    pub cgroup: Option<Glob>,
    pub source: Vec<IpNet>,
}

/// The outcome of one criterion of one rule, for a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub criterion: &'static str,
    pub wanted: String,
    /// What the caller has, or `None` when it is not known for this caller.
    pub got: Option<String>,
    pub ok: bool,
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.uid.is_none()
            && self.gid.is_none()
            && self.exe.is_none()
            && self.exe_sha256.is_none()
            && self.systemd_unit.is_none()
            && self.cgroup.is_none()
            && self.source.is_empty()
    }

    pub fn needs(&self) -> Needs {
        Needs {
            process: self.gid.is_some() || self.exe.is_some() || self.exe_sha256.is_some(),
            exe_hash: self.exe_sha256.is_some(),
        }
    }

    /// Every criterion, checked against `caller`.
    pub fn evaluate(&self, caller: &Caller) -> Vec<Check> {
        fn check(
            criterion: &'static str,
            wanted: String,
            got: Option<String>,
            ok: impl FnOnce(&str) -> bool,
        ) -> Check {
            let ok = got.as_deref().is_some_and(ok);
            Check {
                criterion,
                wanted,
                got,
                ok,
            }
        }
        let mut checks = Vec::new();
        if let Some(uid) = self.uid {
            let want = uid.to_string();
            checks.push(check(
                "uid",
                want.clone(),
                caller.uid().map(|u| u.to_string()),
                |g| g == want,
            ));
        }
        if let Some(gid) = self.gid {
            let want = gid.to_string();
            checks.push(check(
                "gid",
                want.clone(),
                caller.gid().map(|g| g.to_string()),
                |g| g == want,
            ));
        }
        if let Some(exe) = &self.exe {
            let got = caller.exe().map(|e| e.display().to_string());
            checks.push(check("exe", exe.as_str().into(), got, |g| exe.matches(g)));
        }
        if let Some(hash) = &self.exe_sha256 {
            let got = caller.local().and_then(|l| l.exe_sha256.clone());
            checks.push(check("exe_sha256", hash.clone(), got, |g| g == hash));
        }
        if let Some(unit) = &self.systemd_unit {
            let got = caller.unit().map(str::to_owned);
            checks.push(check("systemd_unit", unit.as_str().into(), got, |g| {
                unit.matches(g)
            }));
        }
        if let Some(cgroup) = &self.cgroup {
            let got = caller.cgroup().map(str::to_owned);
            checks.push(check("cgroup", cgroup.as_str().into(), got, |g| {
                cgroup.matches(g)
            }));
        }
        if !self.source.is_empty() {
            let ip = canonical_ip(caller.peer().ip());
            let wanted = self
                .source
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let ok = self.source.iter().any(|n| n.contains(&ip));
            checks.push(Check {
                criterion: "source",
                wanted,
                got: Some(ip.to_string()),
                ok,
            });
        }
        checks
    }

    /// Whether every criterion holds: the same verdict as [`Self::evaluate`], without building
    /// its report (this runs on every request, for every rule before the caller's).
    pub fn matches(&self, caller: &Caller) -> bool {
        // Deny by default: an empty matcher matches nobody, and an unresolved caller matches
        // no rule at all.
        if self.is_empty() || matches!(caller, Caller::Unresolved { .. }) {
            return false;
        }
        let glob_holds = |glob: &Option<Glob>, got: Option<&str>| {
            glob.as_ref()
                .is_none_or(|g| got.is_some_and(|got| g.matches(got)))
        };
        self.uid.is_none_or(|uid| caller.uid() == Some(uid))
            && self.gid.is_none_or(|gid| caller.gid() == Some(gid))
            // Lossy like `evaluate`'s `display()`, which borrows for UTF-8 paths.
            && self.exe.as_ref().is_none_or(|exe| {
                caller
                    .exe()
                    .is_some_and(|e| exe.matches(&e.as_os_str().to_string_lossy()))
            })
            && self.exe_sha256.as_ref().is_none_or(|hash| {
                caller
                    .local()
                    .and_then(|l| l.exe_sha256.as_ref())
                    .is_some_and(|got| got == hash)
            })
            && glob_holds(&self.systemd_unit, caller.unit())
            && glob_holds(&self.cgroup, caller.cgroup())
            && (self.source.is_empty() || {
                let ip = canonical_ip(caller.peer().ip());
                self.source.iter().any(|n| n.contains(&ip))
            })
    }

    /// Whether every caller `later` matches is also matched by `self`, so that a rule with
    /// `later` placed after one with `self` can never be reached.
    pub fn covers(&self, later: &Matcher) -> bool {
        fn glob_covers(a: &Option<Glob>, b: &Option<Glob>) -> bool {
            match (a, b) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => a == b || (b.is_literal() && a.matches(b.as_str())),
            }
        }
        fn eq_covers<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.is_none() || (b.is_some() && a == b)
        }
        !self.is_empty()
            && eq_covers(&self.uid, &later.uid)
            && eq_covers(&self.gid, &later.gid)
            && eq_covers(&self.exe_sha256, &later.exe_sha256)
            && glob_covers(&self.exe, &later.exe)
            && glob_covers(&self.systemd_unit, &later.systemd_unit)
            && glob_covers(&self.cgroup, &later.cgroup)
            && (self.source.is_empty()
                || (!later.source.is_empty()
                    && later
                        .source
                        .iter()
                        .all(|l| self.source.iter().any(|s| s.contains(l)))))
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = self.uid {
            parts.push(format!("uid={v}"));
        }
        if let Some(v) = self.gid {
            parts.push(format!("gid={v}"));
        }
        if let Some(v) = &self.exe {
            parts.push(format!("exe={}", v.as_str()));
        }
        if let Some(v) = &self.exe_sha256 {
            parts.push(format!("exe_sha256={}…", &v[..12.min(v.len())]));
        }
        if let Some(v) = &self.systemd_unit {
            parts.push(format!("systemd_unit={}", v.as_str()));
        }
        if let Some(v) = &self.cgroup {
            parts.push(format!("cgroup={}", v.as_str()));
        }
        if !self.source.is_empty() {
            let nets: Vec<String> = self.source.iter().map(|n| n.to_string()).collect();
            parts.push(format!("source={}", nets.join(",")));
        }
        if parts.is_empty() {
            f.write_str("(nothing)")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The first app whose rule matches `caller`, if any.
pub fn find_app<'a>(apps: &'a [App], caller: &Caller) -> Option<&'a App> {
    find_app_index(apps, caller).map(|i| &apps[i])
}

/// The position of the first app whose rule matches `caller`, if any.
pub fn find_app_index(apps: &[App], caller: &Caller) -> Option<usize> {
    apps.iter()
        .position(|app| app.matcher.as_ref().is_some_and(|m| m.matches(caller)))
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
    use crate::process::ProcessInfo;

    fn local(uid: u32) -> Caller {
        Caller::local_uid(uid, "127.0.0.1:5000".parse().unwrap())
    }

    fn full(uid: u32, exe: &str, cgroup: &str) -> Caller {
        Caller::Local(LocalCaller {
            peer: "127.0.0.1:5000".parse().unwrap(),
            uid,
            cgroup: Some(cgroup.into()),
            unit: crate::cgroup::unit_of(cgroup),
            process: Some(ProcessInfo {
                pid: 42,
                uid,
                gid: 7,
                exe: exe.into(),
                start_time: 1,
            }),
            exe_sha256: Some("ab".repeat(32)),
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
                                unit: cgroup.and_then(crate::cgroup::unit_of),
                                process: process.clone().map(|(gid, exe)| ProcessInfo {
                                    pid: 42,
                                    uid,
                                    gid,
                                    exe,
                                    start_time: 1,
                                }),
                                exe_sha256: sha,
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
                                        cgroup: cgroup.clone(),
                                        source,
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

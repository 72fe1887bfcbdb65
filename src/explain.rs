//! `imds-broker explain`: shows which rule a given process, uid, cgroup or source address would
//! match and why, using the same rule evaluation as the daemon; or, with `--app`, whether that
//! app's session policy alone allows an action on a resource, and which statement decided.

use std::fmt::Write;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::config::{App, Config};
use crate::iam::document::Effect;
use crate::iam::evaluate::{self, Applies, Decision};
use crate::identity::cgroup::{self, Units};
use crate::identity::container::{Container, ContainerMeta, Meta};
use crate::identity::process::{self, ProcessInfo};
use crate::identity::{Caller, LocalCaller};
use crate::policy::Verdict;

/// Who to explain.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A running process, read from `/proc`.
    Pid(u32),
    /// A hypothetical local caller.
    Local {
        uid: u32,
        gid: Option<u32>,
        exe: Option<PathBuf>,
        cgroup: Option<String>,
    },
    /// A caller from another host or network namespace.
    Source(IpAddr),
    /// A container's process (its main one), with what the runtime says about the container.
    Container { pid: u32, meta: ContainerMeta },
}

/// Builds the caller the daemon would see for `subject`.
pub fn caller_for(subject: &Subject, config: &Config) -> io::Result<Caller> {
    let peer = |ip| SocketAddr::new(ip, 0);
    let loopback = IpAddr::from([127, 0, 0, 1]);
    Ok(match subject {
        Subject::Source(ip) => Caller::Remote { peer: peer(*ip) },
        Subject::Container { pid, meta } => {
            let mut caller = caller_for(&Subject::Pid(*pid), config)?;
            if let Caller::Local(local) = &mut caller {
                // In a namespace of its own, it connects from its own address.
                let own = fs::metadata("/proc/self/ns/net")?.ino();
                let its = fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
                if its != own {
                    local.netns = Some(its);
                    if let Some(ip) = namespace_address(*pid) {
                        local.peer = SocketAddr::new(ip, 0);
                    }
                }
            }
            if let Caller::Local(local) = &mut caller
                && let Some(container) = &mut local.container
            {
                container.meta = if *container.reference.id == meta.id {
                    Meta::Known(std::sync::Arc::new(meta.clone()))
                } else {
                    // The process left the container, or the runtime and the cgroup disagree.
                    Meta::Unavailable(
                        format!(
                            "the process's cgroup names container {}, the runtime {}",
                            container.reference.id, meta.id
                        )
                        .into(),
                    )
                };
            }
            caller
        }
        Subject::Pid(pid) => {
            let info = process::describe(*pid)?;
            let cgroup = cgroup::path_of_pid(*pid);
            let exe_sha256 = if crate::policy::needs(&config.apps).exe_hash {
                Some(crate::identity::hash_exe(*pid)?)
            } else {
                None
            };
            let found = cgroup
                .as_deref()
                .map(|path| cgroup::CgroupIndex::new().info_on_disk(path));
            let units = found.as_ref().map(|f| f.units.clone()).unwrap_or_default();
            // As the daemon sees it: a container only with `[containers]`.
            let container = found
                .and_then(|f| f.container)
                .filter(|_| config.containers.is_some())
                .map(|reference| Container {
                    reference,
                    meta: Meta::NotAsked,
                });
            Caller::Local(LocalCaller {
                peer: peer(loopback),
                uid: info.uid,
                unit: units.system,
                user_unit: units.user,
                cgroup,
                process: Some(info),
                exe_sha256,
                netns: None,
                container,
            })
        }
        Subject::Local {
            uid,
            gid,
            exe,
            cgroup,
        } => {
            let process = (gid.is_some() || exe.is_some()).then(|| ProcessInfo {
                pid: 0,
                uid: *uid,
                gid: gid.unwrap_or(*uid),
                exe: exe.clone().unwrap_or_default(),
                start_time: 0,
            });
            let units = cgroup.as_deref().map(Units::by_name).unwrap_or_default();
            Caller::Local(LocalCaller {
                peer: peer(loopback),
                uid: *uid,
                unit: units.system,
                user_unit: units.user,
                cgroup: cgroup.clone(),
                process,
                exe_sha256: None,
                netns: None,
                container: None,
            })
        }
    })
}

/// The first address other than loopback in `pid`'s network namespace, from the kernel's
/// table of local addresses there (`/proc/<pid>/net/fib_trie`: `|-- ADDR` then `/32 host LOCAL`).
fn namespace_address(pid: u32) -> Option<IpAddr> {
    let trie = fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).ok()?;
    let mut last = None;
    for line in trie.lines() {
        let line = line.trim_start();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.trim().parse::<IpAddr>().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last.filter(|ip| !ip.is_loopback())
        {
            return Some(ip);
        }
    }
    None
}

/// The report `explain` prints, and whether a rule matched.
pub fn report(config: &Config, caller: &Caller) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "caller: {}", describe(caller));
    let verdict = crate::policy::decide(&config.apps, caller);
    let decided_at = match &verdict {
        Verdict::App(i) | Verdict::Undecided { app: i, .. } => Some(*i),
        Verdict::NoMatch => None,
    };
    for (i, app) in config.apps.iter().enumerate() {
        let Some(rule) = &app.matcher else {
            let _ = writeln!(
                out,
                "rule app[{i}] {:?}: container endpoint only (no match rule)",
                app.name
            );
            continue;
        };
        let checks = rule.evaluate(caller);
        let reached = decided_at.is_none_or(|at| i <= at);
        let verdict = match (rule.matches(caller), rule.undecided(caller), reached) {
            (true, _, true) => "match".to_owned(),
            (true, _, false) => "match (not reached: an earlier rule decided)".to_owned(),
            (false, Some(reason), true) => {
                format!("undecided: the container runtime did not answer ({reason})")
            }
            (false, _, _) => "no match".to_owned(),
        };
        let _ = writeln!(
            out,
            "rule app[{i}] {:?}{}: {verdict}",
            app.name,
            from(config, app)
        );
        for c in checks {
            let got = c.got.as_deref().unwrap_or("(unknown for this caller)");
            let mark = if c.ok { "yes" } else { "no" };
            let _ = writeln!(
                out,
                "  {}: wanted {}, got {}: {mark}",
                c.criterion, c.wanted, got
            );
        }
    }
    match &verdict {
        Verdict::App(i) => {
            let app = &config.apps[*i];
            let _ = writeln!(
                out,
                "result: app {:?} -> {}{}",
                app.name,
                app.role_arn(),
                from(config, app)
            );
        }
        Verdict::Undecided { app, reason } => {
            let _ = writeln!(
                out,
                "result: refused: rule app[{app}] {:?} needs the container runtime, which did not answer: {reason}",
                config.apps[*app].name
            );
        }
        Verdict::NoMatch => {
            let _ = writeln!(out, "result: no rule matched");
        }
    }
    (out, matches!(verdict, Verdict::App(_)))
}

/// ` (from FILE)` for an app of a drop-in file; nothing for one of the main file.
fn from(config: &Config, app: &App) -> String {
    if app.source == config.path {
        String::new()
    } else {
        format!(" (from {})", app.source.display())
    }
}

fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Local(l) => {
            let mut s = format!("local uid={}", l.uid);
            if let Some(p) = &l.process {
                if p.pid != 0 {
                    let _ = write!(s, " pid={}", p.pid);
                }
                let _ = write!(s, " gid={} exe={}", p.gid, p.exe.display());
            }
            if let Some(c) = &l.cgroup {
                let _ = write!(s, " cgroup={c}");
            }
            if let Some(u) = &l.unit {
                let _ = write!(s, " unit={u}");
            }
            if let Some((uid, u)) = &l.user_unit {
                let _ = write!(s, " user_unit={u} (uid {uid}'s manager)");
            }
            if let Some(c) = &l.container {
                let _ = write!(
                    s,
                    " container={} ({})",
                    c.reference.id,
                    c.reference.engine.as_str()
                );
                if let Some(m) = c.known() {
                    let _ = write!(s, " name={} image={}", m.name, m.image);
                    for (k, v) in &m.labels {
                        let _ = write!(s, " label {k}={v}");
                    }
                }
            }
            s
        }
        Caller::Remote { peer } => format!("non-local source={}", peer.ip()),
        Caller::Unresolved { reason, .. } => format!("unresolved ({reason})"),
    }
}

/// What an app's session policy alone decides for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOutcome {
    Allowed,
    /// Explicitly or implicitly denied.
    Denied,
    /// A condition, a policy variable or a managed policy decides; only IAM can tell.
    Undecided,
    /// The app has no session policy: only its role's policies apply.
    NoPolicy,
}

/// The report `explain --app` prints: each statement's verdict on `action` on `resource`, and
/// the outcome of the app's session policy alone (the role's own policies must allow it too).
pub fn policy_report(app: &App, action: &str, resource: &str) -> (String, PolicyOutcome) {
    let mut out = String::new();
    let _ = writeln!(out, "app {:?}: role {}", app.name, app.role_arn());
    let _ = writeln!(out, "request: {action} on {resource}");
    if !app.assume_role_input().policy_arns.is_empty() {
        let _ = writeln!(
            out,
            "note: managed session policies ({}) cannot be read here: a request is allowed when any session policy allows it and none denies it, so only an explicit Deny below decides",
            app.assume_role_input().policy_arns.join(", ")
        );
    }
    let Some(policy) = &app.policy else {
        return if app.assume_role_input().policy_arns.is_empty() {
            let _ = writeln!(
                out,
                "result: no session policy: only the role's own policies decide"
            );
            (out, PolicyOutcome::NoPolicy)
        } else {
            let _ = writeln!(
                out,
                "result: undecided: the only session policies are managed ones"
            );
            (out, PolicyOutcome::Undecided)
        };
    };
    let _ = writeln!(
        out,
        "session policy: {}:{}",
        policy.origin.path.display(),
        policy.origin.line
    );
    let evaluation = evaluate::evaluate(&policy.document, action, resource);
    let statements = &policy.document.statements;
    for (i, (s, verdict)) in statements.iter().zip(&evaluation.statements).enumerate() {
        let verdict = match verdict {
            Applies::Yes => match s.effect {
                Effect::Allow => "applies: allows".to_string(),
                Effect::Deny => "applies: denies".to_string(),
            },
            Applies::No(why) => format!("does not apply: {why}"),
            Applies::Unknown(why) => format!("cannot decide: {why}"),
        };
        let _ = writeln!(
            out,
            "statement {} {}, line {}: {verdict}",
            s.label(i),
            s.effect,
            policy.line_of(s.offset)
        );
    }
    let managed = !app.assume_role_input().policy_arns.is_empty();
    let outcome = match evaluation.decision {
        Decision::Allowed(i) | Decision::Undecided(i) if managed => {
            let _ = writeln!(
                out,
                "result: undecided: statement {} may allow it, and a managed session policy may deny it",
                statements[i].label(i)
            );
            PolicyOutcome::Undecided
        }
        Decision::ImplicitDeny if managed => {
            let _ = writeln!(
                out,
                "result: undecided: no statement allows, but a managed session policy may"
            );
            PolicyOutcome::Undecided
        }
        Decision::Allowed(i) => {
            let _ = writeln!(
                out,
                "result: allowed by statement {}",
                statements[i].label(i)
            );
            PolicyOutcome::Allowed
        }
        Decision::Denied(i) => {
            let _ = writeln!(
                out,
                "result: denied by statement {}",
                statements[i].label(i)
            );
            PolicyOutcome::Denied
        }
        Decision::ImplicitDeny => {
            let _ = writeln!(out, "result: implicitly denied: no statement allows");
            PolicyOutcome::Denied
        }
        Decision::Undecided(i) => {
            let _ = writeln!(
                out,
                "result: undecided: statement {} depends on what IAM evaluates at request time",
                statements[i].label(i)
            );
            PolicyOutcome::Undecided
        }
    };
    (out, outcome)
}

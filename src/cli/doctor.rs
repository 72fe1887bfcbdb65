//! `imds-broker doctor`: the app-side diagnosis of [`crate::doctor`], printed one line per
//! step, with the fix for the first failure. Exit 0 only when an SDK in this environment would
//! get its credentials (and the expected role, if one is named).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use nix::unistd::{Gid, Uid, User};

use crate::config::{Config, DEFAULT_RUNTIME_SOCKETS};
use crate::doctor::{self, Options, Outcome, Via};
use crate::runtime::Runtime;

/// What `doctor` was asked to check.
pub(super) struct Args {
    pub endpoint: Option<SocketAddr>,
    pub uid: Option<u32>,
    pub expect_role: Option<String>,
    pub container: Option<String>,
    pub config: PathBuf,
}

pub(super) async fn doctor(args: Args) -> ExitCode {
    if let Some(container) = &args.container {
        return from_container(&args, container).await;
    }
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    if let Some(uid) = args.uid {
        match become_user(uid) {
            Ok(home) => {
                // The user's own environment is not ours to read: only where their files are.
                env.retain(|(k, _)| !k.starts_with("AWS_") && k != "HOME");
                env.extend(home.map(|h| ("HOME".to_owned(), h)));
            }
            Err(e) => {
                eprintln!("doctor --uid {uid}: {e}");
                return ExitCode::from(super::EXIT_CONFIG);
            }
        }
    }
    match options(args.endpoint, args.expect_role, env, None) {
        Ok(options) => {
            report(&doctor::diagnose(&options, &crate::identity::host_addresses()).await)
        }
        Err(code) => code,
    }
}

/// The checks' inputs: the endpoint as given or as an SDK in `env` would find it.
fn options(
    endpoint: Option<SocketAddr>,
    expect_role: Option<String>,
    env: Vec<(String, String)>,
    via: Option<&dyn Fn(SocketAddr) -> Option<Via>>,
) -> Result<Options, ExitCode> {
    let endpoint = match endpoint.map_or_else(|| doctor::sdk_endpoint(&env), Ok) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("AWS_EC2_METADATA_SERVICE_ENDPOINT: {e}");
            return Err(ExitCode::from(super::EXIT_CONFIG));
        }
    };
    Ok(Options {
        endpoint,
        expect_role,
        env,
        via: via.and_then(|via| via(endpoint)),
    })
}

/// Prints one line per step and the fix for the first failure; success only without one.
fn report(steps: &[doctor::Step]) -> ExitCode {
    let mut failed = false;
    for step in steps {
        let mark = match step.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Note => "note",
            Outcome::Fail => "FAIL",
        };
        outln!("{mark} {}: {}", step.name, step.detail);
        if step.outcome == Outcome::Fail && !failed {
            if let Some(fix) = &step.fix {
                outln!("     fix: {fix}");
            }
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `doctor --container`: the same checks from the container's seat. This process joins the
/// container's cgroup (the daemon identifies a socket by the cgroup it was made in); one thread
/// enters its network namespace, becomes its user and runs the checks there, with the
/// container's `AWS_*` environment and its home directory seen through `/proc/<pid>/root`.
async fn from_container(args: &Args, name_or_id: &str) -> ExitCode {
    let fail = |message: String| {
        eprintln!("doctor --container {name_or_id}: {message}");
        ExitCode::from(super::EXIT_CONFIG)
    };
    let sockets = Config::load(&args.config)
        .ok()
        .and_then(|c| c.containers)
        .map(|c| c.runtime_sockets)
        .unwrap_or_else(|| DEFAULT_RUNTIME_SOCKETS.iter().map(PathBuf::from).collect());
    let found = match Runtime::new(sockets).find(name_or_id).await {
        Ok(found) => found,
        Err(e) => return fail(e.to_string()),
    };
    let Some(pid) = found.pid.filter(|_| found.running) else {
        return fail("not running".into());
    };
    let seat = match Seat::of(pid) {
        Ok(seat) => seat,
        Err(e) => return fail(format!("cannot read its process {pid}: {e}")),
    };
    // The host's view, before leaving it.
    let hosts = crate::identity::host_addresses();
    let via = |endpoint: SocketAddr| match endpoint.ip() {
        IpAddr::V4(v4) => {
            // This thread's namespace: the container's, once entered.
            let table = std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
            let next_hop = doctor::next_hop_in(&table, v4);
            Some(Via {
                next_hop,
                is_host: next_hop.is_some_and(|hop| hosts.contains(&hop)),
            })
        }
        IpAddr::V6(_) => None,
    };
    if let Err(e) = std::fs::write(&seat.cgroup_procs, "0") {
        return fail(format!(
            "cannot join its cgroup ({}): {e}",
            seat.cgroup_procs.display()
        ));
    }
    let checked = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<ExitCode, String> {
                nix::sched::setns(&seat.netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("cannot enter its network namespace: {e}"))?;
                become_user(seat.uid)?;
                let options = match options(
                    args.endpoint,
                    args.expect_role.clone(),
                    seat.env.clone(),
                    Some(&via),
                ) {
                    Ok(options) => options,
                    Err(code) => return Ok(code),
                };
                // Every socket of the checks is made on this thread, in the container's namespace.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let steps = runtime.block_on(doctor::diagnose(&options, &[]));
                Ok(report(&steps))
            })
            .join()
            .map_err(|_| "the check panicked".to_owned())?
    });
    checked.unwrap_or_else(fail)
}

/// Where a container's process sits: what `doctor --container` needs to take its place.
struct Seat {
    uid: u32,
    /// `AWS_*` as the container's process has them; `HOME` through `/proc/<pid>/root`.
    env: Vec<(String, String)>,
    cgroup_procs: PathBuf,
    netns: std::fs::File,
}

impl Seat {
    fn of(pid: u32) -> Result<Self, String> {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
        // "Uid: real effective saved fs": the effective uid is whom a socket is made by.
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
            .ok_or("no Uid line in its status")?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string())?;
        let mut env: Vec<(String, String)> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
            .filter(|(k, _)| k.starts_with("AWS_") || *k == "HOME")
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let home = env
            .iter()
            .find(|(k, _)| k == "HOME")
            .map_or(if uid == 0 { "/root" } else { "/" }, |(_, v)| v.as_str())
            .to_owned();
        env.retain(|(k, _)| k != "HOME");
        env.push(("HOME".into(), format!("/proc/{pid}/root{home}")));
        let cgroup = crate::identity::cgroup::path_of_pid(pid).ok_or("no cgroup v2 path")?;
        let mount = crate::identity::cgroup::cgroup2_mount().ok_or("no cgroup2 mount")?;
        let cgroup_procs = mount
            .join(cgroup.trim_start_matches('/'))
            .join("cgroup.procs");
        let netns =
            std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
        Ok(Seat {
            uid,
            env,
            cgroup_procs,
            netns,
        })
    }
}

/// Runs the rest of the command as `uid` (root only), with its primary group and no others;
/// the user's home directory, if it has an entry.
fn become_user(uid: u32) -> Result<Option<String>, String> {
    let user = User::from_uid(Uid::from_raw(uid)).map_err(|e| e.to_string())?;
    let gid = user.as_ref().map_or(uid, |u| u.gid.as_raw());
    let gid = Gid::from_raw(gid);
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e} (run as root)"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    let uid = Uid::from_raw(uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    Ok(user.map(|u| u.dir.display().to_string()))
}

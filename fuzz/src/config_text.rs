//! Target `config`: arbitrary text into `Config::parse`, then everything the daemon does with
//! the result before it serves: the error report an operator reads (file:line:col per
//! problem), and for a valid config what `check` and the policy compute (shadowed rules, what
//! identity resolution needs, AssumeRole inputs with sanitized session names, rule matching
//! against callers of every kind).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use imds_broker::config::{Config, ConfigError};
use imds_broker::identity::process::ProcessInfo;
use imds_broker::identity::{Caller, LocalCaller};
use imds_broker::policy;

pub fn run(data: &[u8]) {
    // Lossy, so that every input counts; the daemon reads the file as UTF-8 and refuses it
    // otherwise, before parsing.
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("fuzz.toml")) {
        Ok(config) => exercise(&config),
        Err(e) => {
            let report = e.to_string();
            if let ConfigError::Invalid { problems } = &e {
                assert!(!problems.is_empty(), "invalid without a problem: {report}");
            }
            assert!(!report.is_empty());
        }
    }
}

fn exercise(config: &Config) {
    let apps = &config.apps;
    for (earlier, later) in policy::shadowed(apps) {
        assert!(
            earlier < later,
            "app[{later}] shadowed by a later app[{earlier}]"
        );
    }
    let _ = imds_broker::policy::needs(&config.apps);
    for app in apps {
        let name = &app.assume_role_input().session_name;
        assert!(
            is_sts_session_name(name),
            "app {:?}: STS would refuse RoleSessionName {name:?}",
            app.name
        );
    }
    for caller in callers() {
        let _ = policy::find_app(apps, &caller);
    }
}

/// STS's own rule for `RoleSessionName`: 2 to 64 of `[\w+=,.@-]`. Every valid config must
/// produce such names, or AssumeRole fails for that app at run time.
fn is_sts_session_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

/// One caller of each kind, with every identity attribute a rule can match on.
fn callers() -> [Caller; 3] {
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);
    let local = LocalCaller {
        peer,
        uid: 0,
        cgroup: Some("/system.slice/app.service".into()),
        unit: Some("app.service".into()),
        user_unit: None,
        process: Some(ProcessInfo {
            pid: 4242,
            uid: 0,
            gid: 0,
            exe: PathBuf::from("/usr/bin/app"),
            start_time: 1,
        }),
        exe_sha256: Some("0".repeat(64)),
        netns: None,
        container: None,
    };
    [
        Caller::Local(local),
        Caller::Remote {
            peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 40_000),
        },
        Caller::Unresolved {
            peer,
            reason: "fuzz".into(),
            uid: Some(1000),
            cgroup: None,
        },
    ]
}

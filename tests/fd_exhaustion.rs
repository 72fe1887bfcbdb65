//! Descriptor exhaustion (issue 17, fault 5), against the real binary under a low
//! RLIMIT_NOFILE: the daemon raises its soft limit to the hard one, fits
//! `limits.max_connections` below it with a reserve (and warns), and a flood of idle
//! connections (opened, nothing sent) no longer starves a new caller: the idle ones are shed.

#[path = "common/binary.rs"]
#[allow(dead_code)] // `serve_command`, `start` and `stop` are used here
mod binary;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far more than the daemon's 128 descriptors: before shedding, it ran out and the caller
/// waited for the 10 s header timeout.
const IDLE_FLOOD: usize = 200;
/// Generous: the point is that the caller is served at all while the flood is held.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn config_text(dir: &Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n\
         [sts]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
         [[app]]\nname = \"app\"\nrole_arn = \"arn:aws:iam::111122223333:role/app\"\n\
         [app.match]\nuid = {uid}\n",
        state = dir.join("state").display(),
        uid = nix::unistd::geteuid().as_raw()
    )
}

/// `serve` through `prlimit --nofile=<nofile> --` (`soft:hard`), its log going to `log`.
/// prlimit sets the limit and then execs the binary, so the child's pid is the daemon's.
fn serve_with_nofile(config: &Path, nofile: &str, log: &Path) -> (std::process::Child, String) {
    let base = binary::serve_command(config);
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={nofile}"))
        .arg("--")
        .arg(base.get_program())
        .args(base.get_args())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    for (key, value) in base.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    binary::start(command)
}

fn token_put(addr: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    s.write_all(
        b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
          X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n",
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&response);
    head.get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))
}

/// Whether the daemon has closed this idle connection (EOF or reset), without waiting long.
fn closed_by_daemon(mut s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    match s.read(&mut [0u8; 256]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn a_caller_is_served_while_idle_connections_hold_every_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(dir.path())).unwrap();
    let log = dir.path().join("daemon.log");
    let (child, addr) = serve_with_nofile(&config, "128:128", &log);

    // The flood: connected, nothing sent. The accept queue is first in, first out, so by the
    // time the caller's connection is accepted the daemon has taken every one of these.
    let idle: Vec<TcpStream> = (0..IDLE_FLOOD)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();

    let started = Instant::now();
    let status = token_put(&addr);
    let latency = started.elapsed();
    println!("token PUT behind {IDLE_FLOOD} idle connections: {status:?} in {latency:?}");
    assert_eq!(status, Ok(200), "after {latency:?}");
    assert!(latency < ANSWER_WITHIN, "{latency:?}");

    let shed = idle.iter().filter(|s| closed_by_daemon(s)).count();
    println!("idle connections the daemon closed: {shed} of {IDLE_FLOOD}");
    assert!(shed > 0, "no idle connection was shed");
    drop(idle);
    binary::stop(child);

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(
            "limits.max_connections = 4096 does not fit the descriptor limit (RLIMIT_NOFILE 128, \
             64 kept for the daemon's own files and sockets): at most 64 connections are kept open"
        ),
        "{log}"
    );
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(dir.path())).unwrap();
    let log = dir.path().join("daemon.log");
    let (child, _addr) = serve_with_nofile(&config, "100:512", &log);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(open_files, ["512", "512"], "{limits}");
    binary::stop(child);
    // Fitted to the raised limit, not to the 100 it started with.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("(RLIMIT_NOFILE 512,"), "{log}");
    assert!(log.contains("at most 448 connections"), "{log}");
}

//! Live reload of the real binary under load: while a client keeps requesting, the config is
//! changed five times with SIGHUP (one change invalid). No request fails, each valid mapping
//! takes effect, and the invalid one is refused and audited while the old one keeps serving.

#[path = "common/binary.rs"]
mod binary;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Bound on the whole test's waiting.
const DEADLINE: Duration = Duration::from_secs(60);
/// Requests the load makes between two config changes.
const REQUESTS_BETWEEN: usize = 50;

fn config_text(dir: &Path, role: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n\
         [sts]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
         [limits]\nrequests_per_second = 100000\nburst = 100000\n\
         [[app]]\nname = \"app\"\nrole_arn = \"arn:aws:iam::111122223333:role/{role}\"\n\
         [app.match]\nuid = {uid}\n",
        state = dir.join("state").display(),
        uid = nix::unistd::geteuid().as_raw()
    )
}

/// Writes the config atomically (rename), so a reload never reads half a file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Token PUT then role listing on one keep-alive connection; `Err` on any failure.
fn listing(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let put = "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n";
    s.write_all(put.as_bytes()).map_err(|e| e.to_string())?;
    let token = read_body(&mut s, 200)?;
    let get = format!(
        "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(get.as_bytes()).map_err(|e| e.to_string())?;
    read_body(&mut s, 200)
}

fn read_body(s: &mut TcpStream, want: u16) -> Result<String, String> {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                if status != want {
                    return Err(format!("HTTP {status}: {body}"));
                }
                return Ok(body[..len].to_owned());
            }
        }
    }
}

/// Waits (bounded) until the audit file has an `event` line: the writer thread appends it
/// asynchronously, and the file is the only place a refused reload shows.
fn wait_for_audit(path: &Path, event: &str) {
    let needle = format!("\"event\":\"{event}\"");
    let started = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(&needle)
    {
        assert!(started.elapsed() < DEADLINE, "no {event} in the audit file");
        thread::yield_now();
    }
}

#[test]
fn five_reloads_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_config(&config, &config_text(dir.path(), "r0"));
    let (child, addr) = binary::serve(&config, &[]);

    // The load: one client thread requesting back to back, recording every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, done, addr) = (stop.clone(), done.clone(), addr.clone());
        thread::spawn(move || {
            let mut seen = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < DEADLINE {
                seen.push(listing(&addr));
                done.fetch_add(1, Ordering::Relaxed);
            }
            seen
        })
    };
    // Each change lands while the load is going: after REQUESTS_BETWEEN more of its requests.
    let load_progress = |from: usize| {
        let started = Instant::now();
        while done.load(Ordering::Relaxed) < from + REQUESTS_BETWEEN {
            assert!(started.elapsed() < DEADLINE, "the load stalled");
            thread::yield_now();
        }
    };
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    // Waits until the mapping answers `role` (the reload's visible effect).
    let wait_for = |role: &str| {
        let started = Instant::now();
        while listing(&addr).as_deref() != Ok(role) {
            assert!(
                started.elapsed() < DEADLINE,
                "mapping to {role} never took effect"
            );
            thread::yield_now();
        }
    };

    for (i, role) in ["r1", "r2", "INVALID", "r3", "r4"].iter().enumerate() {
        load_progress(done.load(Ordering::Relaxed));
        let text = if *role == "INVALID" {
            config_text(dir.path(), "r2").replace("role_arn", "rol_arn")
        } else {
            config_text(dir.path(), role)
        };
        write_config(&config, &text);
        hup();
        if *role == "INVALID" {
            // Nothing changes for clients; the refusal is visible in the audit file only.
            wait_for_audit(&dir.path().join("state/audit.log"), "config.rejected");
        } else {
            wait_for(role);
        }
        eprintln!("change {i}: {role}");
    }
    stop.store(true, Ordering::Relaxed);
    let seen = load.join().unwrap();
    binary::stop(child);

    let failures: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        seen.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        seen.len() >= 5 * REQUESTS_BETWEEN,
        "the load kept running: {} requests",
        seen.len()
    );
    eprintln!("{} requests during five reloads, none failed", seen.len());
    // Roles only ever move forward: r0 -> r1 -> r2 -> r3 -> r4 (the invalid file changed nothing).
    let roles: Vec<&str> = seen.iter().map(|r| r.as_deref().unwrap()).collect();
    let mut order: Vec<&str> = roles.clone();
    order.dedup();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");

    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    let count = |event: &str| audit.matches(&format!("\"event\":\"{event}\"")).count();
    assert_eq!(
        count("config.loaded"),
        5,
        "the start and four valid reloads"
    );
    assert_eq!(count("config.rejected"), 1);
    assert!(
        audit.contains("unknown field `rol_arn`"),
        "the rejection says why"
    );
}

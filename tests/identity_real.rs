//! Caller identity with real processes: a bash client connecting over /dev/tcp, run as another
//! uid and placed in a cgroup the test creates, is resolved to exactly its uid, cgroup, unit,
//! pid and executable; a socket shared with a process of another executable is refused.
//! Needs root (setpriv, cgroup creation), like the daemon's own deployment.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use imds_broker::identity::process::{self, Budget};
use imds_broker::identity::{Caller, INLINE_BUDGET, Needs, Resolver};

const ALL: Needs = Needs {
    process: true,
    exe_hash: true,
};
/// What exe and gid rules need: the process, not its executable's hash.
const PROCESS: Needs = Needs {
    process: true,
    exe_hash: false,
};

/// A cgroup under the cgroup2 mount, removed on drop (after its processes are gone).
struct TestCgroup {
    dir: PathBuf,
    top: PathBuf,
    rel: String,
}

impl TestCgroup {
    fn new(unit: &str) -> Self {
        let root = imds_broker::identity::cgroup::cgroup2_mount().expect("cgroup2 is mounted");
        // Named like a slice: a top directory ending in `.service` would be the system unit.
        let top_name = format!(
            "imdsb-rs-{}-{}.slice",
            std::process::id(),
            unit.replace('.', "-")
        );
        let rel = format!("/{top_name}/system.slice/{unit}");
        let dir = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            top: root.join(top_name),
            dir,
            rel,
        }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut d = self.dir.clone();
        while d.starts_with(&self.top) {
            let _ = std::fs::remove_dir(&d);
            d.pop();
        }
    }
}

/// A bash process that waits for a line on stdin, then connects to `port` and holds the
/// connection open until its stdin closes. `prefix` runs it through e.g. setpriv.
fn held_client(prefix: &[&str], port: u16, then: &str) -> Child {
    let script = format!("read go; exec 3<>/dev/tcp/127.0.0.1/{port}; {then} read done");
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend(["/usr/bin/bash", "-c", &script]);
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn release(child: &mut Child) {
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn a_process_is_resolved_to_its_uid_cgroup_unit_and_executable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cgroup = TestCgroup::new("billing.service");
    let setpriv = [
        "setpriv",
        "--reuid=61001",
        "--regid=61002",
        "--clear-groups",
    ];
    let mut child = held_client(&setpriv, port, "");
    cgroup.add(child.id());
    release(&mut child);
    let (stream, peer) = listener.accept().unwrap();
    let local = stream.local_addr().unwrap();

    let caller = Resolver::new().resolve(peer, local, ALL);
    let Caller::Local(l) = &caller else {
        panic!("expected a local caller, got {caller}");
    };
    assert_eq!(l.uid, 61001);
    assert_eq!(l.cgroup.as_deref(), Some(cgroup.rel.as_str()));
    assert_eq!(l.unit.as_deref(), Some("billing.service"));
    let p = l.process.as_ref().expect("process resolved");
    assert_eq!(p.pid, child.id(), "setpriv execs bash in place");
    assert_eq!(p.exe, PathBuf::from("/usr/bin/bash"));
    assert_eq!((p.uid, p.gid), (61001, 61002));
    // The digest is added only for callers a rule could serve (the daemon asks policy first).
    assert_eq!(l.exe_sha256, None);
    let digests = std::sync::Arc::new(imds_broker::identity::exe_digest::ExeDigests::new(256, 64));
    let hashed =
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(imds_broker::identity::with_exe_digest(
                caller.clone(),
                &digests,
            ));
    let bash = imds_broker::identity::hash_exe(child.id()).unwrap();
    assert_eq!(
        hashed.local().and_then(|l| l.exe_sha256.as_deref()),
        Some(bash.as_str())
    );

    // Without rules that need it, no /proc lookup is made at all.
    let cheap = Resolver::new().resolve(peer, local, Needs::default());
    assert_eq!(cheap.uid(), Some(61001));
    assert!(cheap.process().is_none());
    finish(child);
}

#[test]
fn a_socket_shared_with_another_executable_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // python3 inherits the connected fd 3 from bash, so two programs hold one socket. It
    // prints its pid once it runs (after exec): the event the test waits for.
    let sharer =
        "/usr/bin/python3 -c 'import os,time; print(os.getpid(), flush=True); time.sleep(60)' &";
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}; {sharer} read done");
    let mut child = Command::new("/usr/bin/bash")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (stream, peer) = listener.accept().unwrap();
    let local = stream.local_addr().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sharer_pid: i32 = line.trim().parse().expect("the sharer printed its pid");

    let caller = Resolver::new().resolve(peer, local, ALL);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sharer_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(
        matches!(&caller, Caller::Unresolved { reason, .. }
            if reason.contains("2 processes with different identities")),
        "{caller}"
    );
    // An unresolved caller matches no rule, however broad.
    let broad = imds_broker::policy::Matcher {
        uid: Some(0),
        ..Default::default()
    };
    assert!(!broad.matches(&caller));
    finish(child);
}

/// `sleep` processes placed in `cgroup`, killed on drop: a crowd for the lookup to read.
struct Crowd(Vec<Child>);

impl Crowd {
    fn new(cgroup: &TestCgroup, count: usize) -> Self {
        let crowd = Crowd(
            (0..count)
                .map(|_| Command::new("/usr/bin/sleep").arg("600").spawn().unwrap())
                .collect(),
        );
        for child in &crowd.0 {
            cgroup.add(child.id());
        }
        crowd
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_resolution_names_the_same_process_in_small_and_crowded_cgroups() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cgroup = TestCgroup::new("crowded.service");
    let mut child = held_client(&[], port, "");
    cgroup.add(child.id());
    release(&mut child);
    let (stream, peer) = listener.accept().unwrap();
    let local = stream.local_addr().unwrap();
    let resolver = std::sync::Arc::new(Resolver::new());
    let alone = resolver.resolve_async(peer, local, PROCESS).await.unwrap();
    assert_eq!(alone.pid(), Some(child.id()), "{alone}");
    assert_eq!(alone.exe(), Some(&PathBuf::from("/usr/bin/bash")));

    // More processes than a lookup may read on an async worker: same answer, from the pool.
    let crowd = Crowd::new(&cgroup, 40);
    let inode = imds_broker::identity::sock_diag::lookup_peer(peer, local)
        .unwrap()
        .connected()
        .unwrap()
        .inode;
    let mut budget = Budget::Reads(INLINE_BUDGET);
    let uid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        process::owner_of_socket_within(inode, uid, Some(&cgroup.dir), &mut budget),
        None,
        "the crowd fits in the inline budget: the test would not reach the pool"
    );
    let crowded = resolver.resolve_async(peer, local, PROCESS).await.unwrap();
    assert_eq!(crowded, alone);
    drop(crowd);
    finish(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_resolution_refuses_a_shared_socket_in_a_small_cgroup() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cgroup = TestCgroup::new("shared.service");
    // bash connects, then hands fd 3 to a python3 it starts; python3 prints its pid once it
    // runs, the event the test waits for.
    let sharer =
        "/usr/bin/python3 -c 'import os,time; print(os.getpid(), flush=True); time.sleep(60)' &";
    let mut child = Command::new("/usr/bin/bash")
        .args([
            "-c",
            &format!("read go; exec 3<>/dev/tcp/127.0.0.1/{port}; {sharer} read done"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cgroup.add(child.id());
    release(&mut child);
    let (stream, peer) = listener.accept().unwrap();
    let local = stream.local_addr().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sharer_pid: i32 = line.trim().parse().expect("the sharer printed its pid");

    let inode = imds_broker::identity::sock_diag::lookup_peer(peer, local)
        .unwrap()
        .connected()
        .unwrap()
        .inode;
    let uid = nix::unistd::geteuid().as_raw();
    let mut budget = Budget::Reads(INLINE_BUDGET);
    let inline = process::owner_of_socket_within(inode, uid, Some(&cgroup.dir), &mut budget);
    let resolver = std::sync::Arc::new(Resolver::new());
    let caller = resolver.resolve_async(peer, local, PROCESS).await.unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sharer_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(
        inline,
        Some(Err(process::ProcessError::Ambiguous { count: 2 })),
        "decided within the inline budget"
    );
    assert!(
        matches!(&caller, Caller::Unresolved { reason, .. }
            if reason.contains("2 processes with different identities")),
        "{caller}"
    );
    finish(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_an_exe_rule_to_that_executable_only() {
    let exe_config = |state: &std::path::Path| {
        common::config_text(state, "").replace(
            &format!("uid = {}", nix::unistd::geteuid().as_raw()),
            "exe = \"/usr/bin/bash\"",
        )
    };
    let d = common::TestDaemon::start(exe_config).await;
    // This test binary is not bash: no role.
    let token = d.token(60).await;
    assert_eq!(
        d.get("/latest/meta-data/iam/security-credentials/", &token)
            .await
            .status,
        404
    );
    // bash, over a real socket: its role.
    let port = d.addr.port();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; \
         printf 'PUT /latest/api/token HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\nContent-Length: 0\\r\\n\\r\\n' >&3; \
         while IFS= read -r line <&3; do line=${{line%$'\\r'}}; [ -z \"$line\" ] && break; done; \
         read -r -N 76 tok <&3; \
         printf 'GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nX-aws-ec2-metadata-token: %s\\r\\nConnection: close\\r\\n\\r\\n' \"$tok\" >&3; \
         cat <&3"
    );
    let out = tokio::process::Command::new("/usr/bin/bash")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = BufReader::new(text.as_bytes()).lines().map(Result::unwrap);
    assert_eq!(lines.next().as_deref(), Some("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("\r\n\r\napp-a"), "{text}");
}

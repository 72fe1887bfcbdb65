//! `serve --log-format journal` through the real binary: every field of an audit event becomes
//! a journal field of its own, named in upper case with no prefix (`EVENT=`, `APP=`, `UID=`),
//! so `journalctl EVENT=credentials.denied APP=billing` finds it, and no secret is sent.
//!
//! The journal socket's path is fixed (`/run/systemd/journal/socket`), so the daemon runs in a
//! private mount namespace (`unshare --mount`, root) with a directory of the test's bound on
//! `/run`: there the test reads the native protocol itself, and, where the machine has
//! `systemd-journald`, runs a real one and asks `journalctl`. Without root or `unshare` the
//! tests are skipped, except in CI (`CI=true`), where that is a failure.

#[path = "common/binary.rs"]
#[allow(dead_code)] // `serve_command`, `start` and `stop` are used here
mod binary;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long to wait for an entry (or for journald to be ready) before failing.
const DEADLINE: Duration = Duration::from_secs(30);

/// The source secret the daemon is started with: it must never reach the journal.
const SOURCE_SECRET: &str = "dummy-source-secret";

const JOURNALD: [&str; 2] = [
    "/lib/systemd/systemd-journald",
    "/usr/lib/systemd/systemd-journald",
];

/// Whether a test can run; if not, it is skipped, but in CI the tool must be there.
fn have(what: &str, ok: bool) -> bool {
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is needed for this test in CI"
        );
        eprintln!("skipped: {what} is not available");
    }
    ok
}

fn can_unshare() -> bool {
    have(
        "root and unshare(1)",
        nix::unistd::geteuid().is_root()
            && Command::new("unshare")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
    )
}

/// `program args...` in a private mount namespace where `/run` is `run` (and, if it exists,
/// `/var/log/journal` an empty tmpfs, so a journald there never writes the host's journal).
fn with_run_at(run: &Path, program: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            r#"mount --bind "$1" /run || exit 1
               if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal || exit 1; fi
               shift; exec "$@""#,
        )
        .arg("sh")
        .arg(run)
        .arg(program);
    command
}

/// The daemon, logging to the journal of the namespace whose `/run` is `run`.
fn serve_journal(run: &Path, config: &Path) -> (std::process::Child, String) {
    let mut command = serve_in(run, config);
    command.args(["--log-format", "journal"]);
    binary::start(command)
}

/// `serve` in the namespace whose `/run` is `run`, without `$JOURNAL_STREAM`.
fn serve_in(run: &Path, config: &Path) -> Command {
    let inner = binary::serve_command(config);
    let mut command = with_run_at(run, Path::new(inner.get_program()));
    command.args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command.env_remove("JOURNAL_STREAM").stdout(Stdio::piped());
    command
}

/// A journal socket at `run`'s `systemd/journal/socket`, as the daemon in the namespace sees it.
fn bind_journal(run: &Path) -> UnixDatagram {
    std::fs::create_dir_all(run.join("systemd/journal")).unwrap();
    let journal = UnixDatagram::bind(run.join("systemd/journal/socket")).unwrap();
    journal.set_read_timeout(Some(DEADLINE)).unwrap();
    journal
}

/// A config with app `billing` for this process's uid and an STS that cannot be reached, so a
/// credentials request is denied (`reason=upstream`) and audited with the app's name.
fn config(dir: &Path) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n\
             [sts]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
             [[app]]\nname = \"billing\"\nrole_arn = \"arn:aws:iam::111122223333:role/billing\"\n\
             [app.match]\nuid = {uid}\n",
            state = dir.join("state").display(),
            uid = nix::unistd::geteuid().as_raw(),
        ),
    )
    .unwrap();
    path
}

fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Asks for billing's credentials: STS is down, so the daemon audits `credentials.denied`.
fn ask_for_credentials(addr: &str) {
    let host = "Host: 169.254.169.254\r\nConnection: close\r\n";
    let (status, token) = http(
        addr,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\n{host}X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
    let (status, _) = http(
        addr,
        &format!(
            "GET /latest/meta-data/iam/security-credentials/billing HTTP/1.1\r\n{host}\
             X-aws-ec2-metadata-token: {token}\r\n\r\n"
        ),
    );
    assert_eq!(status, 503);
}

/// One native-protocol datagram: `NAME=value\n`, or `NAME\n` + 64-bit little-endian length +
/// value + `\n` (any value, newlines included).
fn parse_native(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let end = data
            .iter()
            .position(|&b| b == b'\n' || b == b'=')
            .expect("a field name ends in '=' or a newline");
        let name = String::from_utf8(data[..end].to_vec()).unwrap();
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .expect("value's newline");
            fields.push((name, rest[..nl].to_vec()));
            data = &rest[nl + 1..];
        } else {
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            assert_eq!(
                rest[8 + len],
                b'\n',
                "{name}: value not followed by a newline"
            );
            fields.push((name, value.to_vec()));
            data = &rest[8 + len + 1..];
        }
    }
    fields
}

/// journald's rule for a field a client may set: `[A-Z0-9_]`, not starting with `_`.
fn valid_journal_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[test]
fn audit_fields_are_native_journal_fields() {
    if !can_unshare() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let journal = bind_journal(&run);

    let (child, addr) = serve_journal(&run, &config(dir.path()));
    ask_for_credentials(&addr);

    let mut buf = vec![0; 1 << 16];
    let mut seen = Vec::new();
    let entry = loop {
        let n = journal
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no credentials.denied entry ({e}); got {seen:#?}"));
        let fields = parse_native(&buf[..n]);
        for (name, value) in &fields {
            assert!(valid_journal_name(name), "field name {name:?}");
            assert!(
                !String::from_utf8_lossy(value).contains(SOURCE_SECRET),
                "{name} carries the secret"
            );
        }
        let fields: BTreeMap<String, String> = fields
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect();
        if fields.get("EVENT").map(String::as_str) == Some("credentials.denied") {
            break fields;
        }
        seen.push(fields);
    };
    binary::stop(child);

    let uid = nix::unistd::geteuid().as_raw().to_string();
    for (name, want) in [
        ("MESSAGE", "credentials denied"),
        ("PRIORITY", "4"),
        ("SYSLOG_IDENTIFIER", "imds-broker"),
        ("TARGET", "audit"),
        ("APP", "billing"),
        ("ENDPOINT", "imds"),
        ("REASON", "upstream"),
        ("UID", uid.as_str()),
    ] {
        assert_eq!(
            entry.get(name).map(String::as_str),
            Some(want),
            "{name} in {entry:#?}"
        );
    }
    for name in ["PEER", "DETAIL", "CODE_FILE", "CODE_LINE"] {
        assert!(entry.contains_key(name), "{name} missing from {entry:#?}");
    }
    assert!(
        !entry.keys().any(|k| k.starts_with("F_")),
        "no field prefix: {entry:#?}"
    );
}

#[test]
fn journalctl_finds_denials_by_event_and_app() {
    let journald = JOURNALD.iter().map(Path::new).find(|p| p.exists());
    if !can_unshare()
        || !have("systemd-journald", journald.is_some())
        || !have("journalctl", which("journalctl"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("systemd/journal")).unwrap();

    // A journald of the test's own, in a namespace whose /run is `run`; it says READY=1 on the
    // notify socket once its sockets are bound.
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut journald = with_run_at(&run, journald.unwrap())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _journald = KillOnDrop(&mut journald);
    let mut buf = [0; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("journald never became ready");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }

    let (child, addr) = serve_journal(&run, &config(dir.path()));
    let broker_pid = child.id().to_string();
    ask_for_credentials(&addr);

    // What an operator types, on this journal's files: follows until the entry is written.
    let mut journalctl = Command::new("journalctl")
        .arg("--directory")
        .arg(run.join("log/journal"))
        .args([
            "--follow",
            "--lines=all",
            "--output=json",
            "EVENT=credentials.denied",
            "APP=billing",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = journalctl.stdout.take().unwrap();
    let _journalctl = KillOnDrop(&mut journalctl);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let line = rx
        .recv_timeout(DEADLINE)
        .expect("journalctl found no credentials.denied entry for billing");
    binary::stop(child);

    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["EVENT"], "credentials.denied", "{entry:#}");
    assert_eq!(entry["APP"], "billing", "{entry:#}");
    assert_eq!(entry["REASON"], "upstream", "{entry:#}");
    assert_eq!(entry["SYSLOG_IDENTIFIER"], "imds-broker", "{entry:#}");
    // journald's own, trusted fields: the entry is the daemon's.
    assert_eq!(entry["_PID"], broker_pid.as_str(), "{entry:#}");
    assert_eq!(entry["_TRANSPORT"], "journal", "{entry:#}");
    assert!(!line.contains(SOURCE_SECRET));
}

/// Without `--log-format`, the journal is chosen only when `$JOURNAL_STREAM` is stderr's own
/// device and inode: a stale or inherited value (another file's) leaves the log on stderr.
#[test]
fn journal_stream_picks_the_journal_only_when_it_is_stderr() {
    if !can_unshare() {
        return;
    }
    for matches in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let journal = bind_journal(&run);
        let stderr_path = dir.path().join("stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let other = std::fs::File::create(dir.path().join("other")).unwrap();
        let named = if matches { &stderr } else { &other }.metadata().unwrap();
        let stream = format!("{}:{}", named.dev(), named.ino());

        let mut command = serve_in(&run, &config(dir.path()));
        command.env("JOURNAL_STREAM", &stream).stderr(stderr);
        let (child, addr) = binary::start(command);
        ask_for_credentials(&addr);
        // Stopped: everything it logged is in the file or queued on the socket.
        binary::stop(child);

        let text = std::fs::read_to_string(&stderr_path).unwrap();
        journal.set_nonblocking(true).unwrap();
        let mut buf = vec![0; 1 << 16];
        let mut denial_in_journal = false;
        while let Ok(n) = journal.recv(&mut buf) {
            denial_in_journal |= parse_native(&buf[..n])
                .iter()
                .any(|(k, v)| k == "EVENT" && v == b"credentials.denied");
        }
        assert_eq!(
            denial_in_journal, matches,
            "JOURNAL_STREAM={stream}, stderr's: {matches}; stderr:\n{text}"
        );
        assert_eq!(
            text.contains("credentials.denied"),
            !matches,
            "stderr:\n{text}"
        );
    }
}

fn which(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Ends a helper process (journald, journalctl -f) however the test ends.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! The audit trail through the real binary: each kind of decision lands in the audit file as one
//! hash-chained, sealed JSON line with the caller's identity and no secret, and `audit verify`
//! accepts the file and pinpoints a deleted or edited line. The attacks sealing is for: a line
//! deleted and the chain rebuilt with the published (unkeyed) algorithm, the last lines cut, an
//! epoch key taken from disk used on an earlier epoch; and the sealed chain across restarts, a
//! kill, and a trail begun before sealing.

#[path = "common/binary.rs"]
mod binary;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use binary::{broker, serve, serve_logging, stop};

use imds_broker::audit::chain::{self, ChainHead};
use imds_broker::audit::keyfile;
use imds_broker::audit::seal::EpochKey;
use serde_json::{Map, Value};

fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn decisions_are_chained_into_the_audit_file_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit/audit.log");
    let config = dir.path().join("config.toml");
    let uid = nix::unistd::geteuid().as_raw();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n\
             [sts]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
             [audit]\npath = \"{audit}\"\n\
             [[app]]\nname = \"app-a\"\nrole_arn = \"arn:aws:iam::111122223333:role/app-a\"\n[app.match]\nuid = {uid}\n",
            state = dir.path().join("state").display(),
            audit = audit.display()
        ),
    )
    .unwrap();
    let (child, addr) = serve(&config, &[]);
    let host = "Host: 169.254.169.254\r\nConnection: close\r\n";
    let (status, token) = http(
        &addr,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\n{host}X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
    let get = |path: &str, extra: &str| {
        http(
            &addr,
            &format!(
                "GET {path} HTTP/1.1\r\n{host}X-aws-ec2-metadata-token: {token}\r\n{extra}\r\n"
            ),
        )
        .0
    };
    // STS (port 9, discard) is unreachable: the credential request is denied as upstream.
    assert_eq!(
        get("/latest/meta-data/iam/security-credentials/app-a", ""),
        503
    );
    assert_eq!(
        get("/latest/meta-data/iam/security-credentials/other", ""),
        404
    );
    assert_eq!(
        get("/latest/meta-data/", "X-Forwarded-For: 10.0.0.1\r\n"),
        403
    );
    let (status, _) = http(
        &addr,
        &format!(
            "GET /latest/meta-data/ HTTP/1.1\r\n{host}X-aws-ec2-metadata-token: forged\r\n\r\n"
        ),
    );
    assert_eq!(status, 401);
    stop(child);

    let text = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["reason"].as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("config.loaded", None),
            ("token.issued", None),
            ("sts.assume_role", None),
            ("credentials.denied", Some("upstream")),
            ("credentials.denied", Some("role_mismatch")),
            ("request.refused", Some("forwarded")),
            ("token.rejected", Some("bad_token")),
            // Shutdown ends the sealing epoch: the key left on disk cannot re-seal any of this.
            ("audit.epoch_end", Some("stop")),
        ]
    );
    assert_eq!(events[0]["apps"], 1);
    let sts = &events[2];
    assert_eq!(sts["outcome"], "unavailable", "{sts}");
    assert_eq!(sts["role_arn"], "arn:aws:iam::111122223333:role/app-a");
    assert!(sts["latency_ms"].is_u64());
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1);
        assert_eq!(e["id"].as_str().unwrap().len(), 32);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(!e.to_string().contains("dummy-source-secret"));
        assert_eq!(e["epoch"], 0, "{e}");
        assert_eq!(e["seal"].as_str().unwrap().len(), 64, "{e}");
    }
    // Decisions about a caller name it.
    for e in events.iter().filter(|e| {
        !["config.loaded", "sts.assume_role", "audit.epoch_end"]
            .contains(&e["event"].as_str().unwrap())
    }) {
        assert_eq!(e["uid"], uid, "{e}");
        assert!(e["cgroup"].is_string(), "{e}");
        assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    assert_eq!(events[1]["ttl_secs"], 60);

    // The whole file verifies; a deleted and an edited line are each pinpointed.
    let verify = |path: &Path| {
        let out = broker()
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("OK: 8 events, from the start of the chain"),
        "{out}"
    );

    let lines: Vec<&str> = text.lines().collect();
    let deleted = dir.path().join("deleted.log");
    std::fs::write(&deleted, [&lines[..3], &lines[4..]].concat().join("\n")).unwrap();
    let (code, out) = verify(&deleted);
    assert_eq!(code, Some(1));
    assert!(out.contains("BROKEN: line 4: prev does not match"), "{out}");

    let edited = dir.path().join("edited.log");
    let forged = lines[3].replace("\"upstream\"", "\"no_rule\"");
    assert_ne!(forged, lines[3]);
    std::fs::write(
        &edited,
        [lines[0], lines[1], lines[2], &forged, lines[4]].join("\n"),
    )
    .unwrap();
    let (code, out) = verify(&edited);
    assert_eq!(code, Some(1));
    assert!(out.contains("BROKEN: line 4: hash does not match"), "{out}");

    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&audit).unwrap().mode() & 0o777, 0o600);
}

/// A daemon's config, state dir and audit file in a temporary directory.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    audit: PathBuf,
    state: PathBuf,
}

fn setup() -> Setup {
    setup_with("")
}

/// `audit_extra`: more `[audit]` settings.
fn setup_with(audit_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit/audit.log");
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    write_config(&config, &state, &audit, audit_extra);
    Setup {
        dir,
        config,
        audit,
        state,
    }
}

fn write_config(config: &Path, state: &Path, audit: &Path, audit_extra: &str) {
    let uid = nix::unistd::geteuid().as_raw();
    std::fs::write(
        config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n\
             [sts]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
             [audit]\npath = \"{audit}\"\n{audit_extra}\n\
             [[app]]\nname = \"app-a\"\nrole_arn = \"arn:aws:iam::111122223333:role/app-a\"\n[app.match]\nuid = {uid}\n",
            state = state.display(),
            audit = audit.display()
        ),
    )
    .unwrap();
}

/// A few audited decisions: a token, a relayed request, a forged token.
fn decisions(addr: &str) {
    let host = "Host: 169.254.169.254\r\nConnection: close\r\n";
    let (status, _) = http(
        addr,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\n{host}X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
    let (status, _) = http(
        addr,
        &format!("GET /latest/meta-data/ HTTP/1.1\r\n{host}X-Forwarded-For: 10.0.0.1\r\n\r\n"),
    );
    assert_eq!(status, 403);
    let (status, _) = http(
        addr,
        &format!(
            "GET /latest/meta-data/ HTTP/1.1\r\n{host}X-aws-ec2-metadata-token: forged\r\n\r\n"
        ),
    );
    assert_eq!(status, 401);
}

/// One daemon run: start, the decisions, SIGTERM.
fn run(setup: &Setup) {
    let (child, addr) = serve(&setup.config, &[]);
    decisions(&addr);
    stop(child);
}

/// `imds-broker audit ARGS...`: exit code and stdout (stderr appended).
fn audit_cmd<S: AsRef<OsStr>>(args: &[S]) -> (Option<i32>, String) {
    let out = broker().arg("audit").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn verify_with_key(file: &Path, key: &Path) -> (Option<i32>, String) {
    audit_cmd(&[
        OsStr::new("verify"),
        OsStr::new("--key"),
        key.as_os_str(),
        file.as_os_str(),
    ])
}

fn verify_plain(file: &Path) -> (Option<i32>, String) {
    audit_cmd(&[OsStr::new("verify"), file.as_os_str()])
}

/// The verification key the daemon wrote into its state dir at its first start.
fn daemon_verification_key(state: &Path) -> PathBuf {
    let found = keyfile::verify_keys_in(state);
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn fields(line: &str) -> Map<String, Value> {
    serde_json::from_str(line).unwrap()
}

/// What someone who can write the file does with the published algorithm: rebuild the hash
/// chain over `lines` (from the first line's `prev`), re-sealing each line whose hash changed
/// with `reseal(epoch)` when that gives a key, or leaving its old seal.
fn rechain(lines: &[String], mut reseal: impl FnMut(u64) -> Option<EpochKey>) -> String {
    let first = fields(&lines[0]);
    let mut head = ChainHead {
        seq: first["seq"].as_u64().unwrap() - 1,
        hash: first["prev"].as_str().unwrap().to_owned(),
    };
    let mut out = String::new();
    for line in lines {
        let mut f = fields(line);
        let old_seal = f.remove("seal");
        let old_hash = f.get("hash").cloned();
        let mut f = chain::link(&mut head, f);
        let changed = f.get("hash") != old_hash.as_ref();
        let epoch = f.get("epoch").and_then(Value::as_u64);
        let seal = match epoch.filter(|_| changed).and_then(&mut reseal) {
            Some(key) => key.key.seal(f["hash"].as_str().unwrap()).map(Value::from),
            None => old_seal,
        };
        if let Some(seal) = seal {
            f.insert("seal".into(), seal);
        }
        out.push_str(&serde_json::to_string(&f).unwrap());
        out.push('\n');
    }
    out
}

/// GET `path` from the daemon's admin socket (the default, in the state dir).
fn admin_get(state: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(state.join("admin.sock")).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

#[test]
fn keygen_then_a_line_deleted_and_rechained_fails_only_with_the_key() {
    let setup = setup();
    let key = setup.dir.path().join("offhost/verify.key");
    let (code, out) = audit_cmd(&[
        OsStr::new("keygen"),
        OsStr::new("--state-dir"),
        setup.state.as_os_str(),
        OsStr::new("--out"),
        key.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("move it off this host"), "{out}");
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o400);
    let state_file = setup.state.join(keyfile::STATE_FILE);
    assert_eq!(
        std::fs::metadata(&state_file).unwrap().mode() & 0o777,
        0o600
    );
    // A second keygen refuses: the daemon would be sealing with the first.
    let again = setup.dir.path().join("again.key");
    let (code, out) = audit_cmd(&[
        OsStr::new("keygen"),
        OsStr::new("--state-dir"),
        setup.state.as_os_str(),
        OsStr::new("--out"),
        again.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("already runs with key"), "{out}");
    assert!(!again.exists());

    run(&setup);
    assert!(
        keyfile::verify_keys_in(&setup.state).is_empty(),
        "the daemon left no key of its own: keygen made it"
    );
    let (code, out) = verify_with_key(&setup.audit, &key);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("every seal valid"), "{out}");

    // Delete line 3 and rebuild the chain after it with the unkeyed algorithm.
    let mut lines = read_lines(&setup.audit);
    assert!(lines.len() >= 5, "{lines:?}");
    lines.remove(2);
    let forged = setup.dir.path().join("forged.log");
    std::fs::write(&forged, rechain(&lines, |_| None)).unwrap();
    let (code, out) = verify_plain(&forged);
    assert_eq!(code, Some(0), "the chain alone cannot tell: {out}");
    let (code, out) = verify_with_key(&forged, &key);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN: line 3: seal does not match"), "{out}");

    // Stripping every seal instead does not pass for an unsealed trail.
    let stripped: Vec<String> = lines
        .iter()
        .map(|l| {
            let mut f = fields(l);
            f.remove("seal");
            f.remove("epoch");
            serde_json::to_string(&f).unwrap()
        })
        .collect();
    std::fs::write(&forged, rechain(&stripped, |_| None)).unwrap();
    assert_eq!(verify_plain(&forged).0, Some(0));
    let (code, out) = verify_with_key(&forged, &key);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no line is sealed"), "{out}");

    // Usage errors: an unreadable key, a malformed checkpoint hash.
    let (code, _) = verify_with_key(&setup.audit, &setup.dir.path().join("none.key"));
    assert_eq!(code, Some(64));
    let (code, _) = audit_cmd(&[
        OsStr::new("verify"),
        OsStr::new("--expect-seq"),
        OsStr::new("1"),
        OsStr::new("--expect-hash"),
        OsStr::new("xyz"),
        setup.audit.as_os_str(),
    ]);
    assert_eq!(code, Some(64));
}

#[test]
fn cutting_the_last_lines_fails_against_the_published_checkpoint() {
    let setup = setup();
    run(&setup);
    // The second run: its checkpoint from /status, and from its log.
    let log_path = setup.dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (child, addr) = serve_logging(
        &setup.config,
        &[("RUST_LOG", "warn,audit_checkpoint=info")],
        Stdio::from(log),
    );
    let status: Value = serde_json::from_str(&admin_get(&setup.state, "/status")).unwrap();
    let seq = status["audit"]["seq"].as_u64().unwrap();
    let hash = status["audit"]["hash"].as_str().unwrap().to_owned();
    assert!(seq >= 5, "the first run's lines at least: {status}");
    assert_eq!(status["audit"]["epoch"], 1, "{status}");
    let metrics = admin_get(&setup.state, "/metrics");
    let gauge: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imds_broker_audit_last_seq "))
        .unwrap_or_else(|| panic!("no audit gauge in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(gauge >= seq, "{gauge} < {seq}");
    decisions(&addr);
    stop(child);

    let expect = |file: &Path, seq: u64, hash: &str| {
        audit_cmd(&[
            OsStr::new("verify"),
            OsStr::new("--key"),
            daemon_verification_key(&setup.state).as_os_str(),
            OsStr::new("--expect-seq"),
            OsStr::new(&seq.to_string()),
            OsStr::new("--expect-hash"),
            OsStr::new(hash),
            file.as_os_str(),
        ])
    };
    let (code, out) = expect(&setup.audit, seq, &hash);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("holds the checkpoint at seq {seq}")),
        "{out}"
    );

    // The checkpoint logged at shutdown names the file's last line.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let last = log
        .lines()
        .rfind(|l| l.contains("audit checkpoint"))
        .unwrap_or_else(|| panic!("no checkpoint in the log:\n{log}"));
    let value = |name: &str| {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {last}"))
            .to_owned()
    };
    let lines = read_lines(&setup.audit);
    let end = fields(lines.last().unwrap());
    assert_eq!(value("audit_seq"), end["seq"].to_string());
    assert_eq!(value("audit_hash"), end["hash"].as_str().unwrap());
    let (logged_seq, logged_hash) = (end["seq"].as_u64().unwrap(), value("audit_hash"));

    // Cut the last two lines: chain and seals still verify (an open epoch's tail has no
    // seal after it), the checkpoint does not.
    let cut = setup.dir.path().join("cut.log");
    std::fs::write(&cut, lines[..lines.len() - 2].join("\n") + "\n").unwrap();
    let (code, out) = verify_with_key(&cut, &daemon_verification_key(&setup.state));
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = expect(&cut, logged_seq, &logged_hash);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN: checkpoint: the file ends at seq {} but the checkpoint is at seq {logged_seq}",
            logged_seq - 2
        )),
        "{out}"
    );
    // Against the earlier checkpoint from /status, cutting back past it.
    std::fs::write(&cut, lines[..seq as usize - 1].join("\n") + "\n").unwrap();
    let (code, out) = expect(&cut, seq, &hash);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("lines were cut from its end"), "{out}");
    // A rewritten last line (the chain rebuilt) has another hash than the checkpoint.
    let mut rewritten = lines.clone();
    let last = rewritten.len() - 1;
    rewritten[last] = rewritten[last].replace("\"stop\"", "\"time\"");
    std::fs::write(&cut, rechain(&rewritten, |_| None)).unwrap();
    assert_eq!(verify_plain(&cut).0, Some(0));
    let (code, out) = audit_cmd(&[
        OsStr::new("verify"),
        OsStr::new("--expect-seq"),
        OsStr::new(&logged_seq.to_string()),
        OsStr::new("--expect-hash"),
        OsStr::new(&logged_hash),
        cut.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the checkpoint says"), "{out}");
}

#[test]
fn an_epoch_key_taken_from_disk_cannot_reseal_an_earlier_epoch() {
    let setup = setup();
    run(&setup);
    // The second run seals in epoch 1; an intruder copies that key from disk meanwhile.
    let (child, addr) = serve(&setup.config, &[]);
    let stolen = keyfile::read_state(&setup.state).unwrap().unwrap();
    assert_eq!(stolen.epoch, 1);
    decisions(&addr);
    stop(child);

    let lines = read_lines(&setup.audit);
    let key = daemon_verification_key(&setup.state);
    let (code, out) = verify_with_key(&setup.audit, &key);
    assert_eq!(code, Some(0), "{out}");
    // Forge an epoch-0 line (a refusal that never happened becomes a different one), rebuild
    // the chain, re-seal with every key the intruder can derive (epoch 1 on).
    let target = lines
        .iter()
        .position(|l| {
            let f = fields(l);
            f["epoch"] == 0 && f.get("reason") == Some(&Value::from("forwarded"))
        })
        .unwrap();
    let mut edited = lines.clone();
    edited[target] = edited[target].replace("\"forwarded\"", "\"browser\"");
    assert_ne!(edited[target], lines[target]);
    let forged = setup.dir.path().join("forged.log");
    std::fs::write(
        &forged,
        rechain(&edited, |epoch| {
            let mut k = copy(&stolen);
            let _ = k.advance_to(epoch); // an earlier epoch gets epoch 1's key: all there is
            Some(k)
        }),
    )
    .unwrap();
    assert_eq!(verify_plain(&forged).0, Some(0));
    let (code, out) = verify_with_key(&forged, &key);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN: line {}: seal does not match: the line was forged or re-sealed without epoch 0's key",
            target + 1
        )),
        "{out}"
    );
    // The same edit in epoch 1, where the stolen key does reach, passes the seals: what the key
    // on disk exposes is the current epoch only (and the checkpoint covers that).
    let target1 = lines
        .iter()
        .rposition(|l| {
            let f = fields(l);
            f["epoch"] == 1 && f.get("reason") == Some(&Value::from("forwarded"))
        })
        .unwrap();
    let mut edited = lines.clone();
    edited[target1] = edited[target1].replace("\"forwarded\"", "\"browser\"");
    std::fs::write(
        &forged,
        rechain(&edited, |epoch| {
            let mut k = copy(&stolen);
            k.advance_to(epoch).ok().map(|()| k)
        }),
    )
    .unwrap();
    assert_eq!(verify_with_key(&forged, &key).0, Some(0));
}

fn copy(key: &EpochKey) -> EpochKey {
    EpochKey {
        epoch: key.epoch,
        key: imds_broker::audit::seal::Key::from_hex(&key.key.to_hex()).unwrap(),
        key_id: key.key_id.clone(),
    }
}

#[test]
fn restarts_and_a_kill_continue_the_sealed_chain() {
    let setup = setup();
    run(&setup);
    let (mut child, addr) = serve(&setup.config, &[]);
    decisions(&addr);
    child.kill().unwrap(); // SIGKILL, wherever the writer was
    child.wait().unwrap();
    run(&setup);
    run(&setup);

    let key = daemon_verification_key(&setup.state);
    let (code, out) = verify_with_key(&setup.audit, &key);
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<Map<String, Value>> =
        read_lines(&setup.audit).iter().map(|l| fields(l)).collect();
    let ends: Vec<(u64, &str)> = lines
        .iter()
        .filter(|l| l["event"] == "audit.epoch_end")
        .map(|l| (l["epoch"].as_u64().unwrap(), l["reason"].as_str().unwrap()))
        .collect();
    // Each clean stop ends its epoch; the killed run's epoch ends at the next start if it
    // got a line into the file.
    assert_eq!(ends.first(), Some(&(0, "stop")), "{ends:?}");
    assert_eq!(ends.last().map(|e| e.1), Some("stop"), "{ends:?}");
    let last_epoch = ends.last().unwrap().0;
    assert!(last_epoch >= 2, "{ends:?}");
    assert!(out.contains(&format!("epochs 0-{last_epoch}")), "{out}");
    let state = keyfile::read_state(&setup.state).unwrap().unwrap();
    assert_eq!(
        state.epoch,
        last_epoch + 1,
        "the key on disk is past every line"
    );
}

#[test]
fn a_trail_begun_before_sealing_goes_on_sealed_and_reports_its_unsealed_start() {
    let setup = setup_with("seal = false");
    run(&setup);
    assert!(!setup.state.join(keyfile::STATE_FILE).exists());
    let unsealed = read_lines(&setup.audit).len();
    assert!(
        read_lines(&setup.audit)
            .iter()
            .all(|l| !l.contains("\"seal\""))
    );
    // Upgraded: sealing on (the default), a key made at start.
    write_config(&setup.config, &setup.state, &setup.audit, "");
    run(&setup);
    let (code, out) = verify_plain(&setup.audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("lines are sealed: check the seals with --key"),
        "{out}"
    );
    let key = daemon_verification_key(&setup.state);
    let (code, out) = verify_with_key(&setup.audit, &key);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "the first {unsealed} lines predate sealing (the seal of line {} covers them)",
            unsealed + 1
        )),
        "{out}"
    );
    // Turning sealing off again shows under --key.
    write_config(&setup.config, &setup.state, &setup.audit, "seal = false");
    run(&setup);
    let (code, out) = verify_with_key(&setup.audit, &key);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not sealed, after sealed lines"), "{out}");
}

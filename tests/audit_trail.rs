//! The audit trail through the real binary: each kind of decision lands in the audit file as one
//! hash-chained JSON line with the caller's identity and no secret, and `audit verify` accepts
//! the file and pinpoints a deleted or edited line.

#[path = "common/binary.rs"]
mod binary;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use binary::{broker, serve, stop};

use serde_json::Value;

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
            ("token.rejected", Some("forwarded")),
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

//! `imds-broker doctor` (the real binary) against the real daemon on a loopback port: a healthy
//! caller passes every step and exits 0; each failure it diagnoses stops it with exit 1 and
//! the fix for that step. The endpoint off this host is covered in `src/doctor.rs` (it is
//! never connected to).

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::{Behavior, TestDaemon, config_text, unmapped_config_text};
use imds_broker::credentials::StsError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `doctor` against `endpoint` with a clean SDK environment (no AWS_* variables, an empty
/// HOME) plus `env`.
async fn doctor(endpoint: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let home = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imds-broker"));
    command
        .args(["doctor", "--endpoint", &endpoint.to_string()])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home.path());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn line<'a>(stdout: &'a str, start: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?}:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_caller_passes_every_step() {
    let d = TestDaemon::start(|s| config_text(s, "debug_whoami = true")).await;
    let (out, stdout) = doctor(d.addr, &["--expect-role", "app-a"], &[]).await;
    assert!(out.status.success(), "{out:?}\n{stdout}");
    let uid = nix::unistd::geteuid().as_raw();
    for start in [
        "ok   route: 127.0.0.1 is an address of this host",
        "ok   connect:",
        "ok   token:",
        &format!("ok   identity: local caller uid={uid} "),
        "ok   role: app-a",
        "ok   credentials: served, valid until 20",
        "ok   sdk:",
    ] {
        line(&stdout, start);
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_debug_whoami_the_identity_is_a_note_not_a_failure() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let (out, stdout) = doctor(d.addr, &[], &[]).await;
    assert!(out.status.success(), "{stdout}");
    line(
        &stdout,
        "note identity: the daemon does not describe callers",
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_stops_with_its_fix() {
    // Nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let (out, stdout) = doctor(nowhere, &[], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "FAIL connect:");
    line(&stdout, "     fix: start the broker");

    // Something that is not the broker answers.
    let impostor = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor_addr = impostor.local_addr().unwrap();
    let answering = tokio::spawn(async move {
        let (mut conn, _) = impostor.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf).await;
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
    });
    let (out, stdout) = doctor(impostor_addr, &[], &[]).await;
    answering.await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "FAIL token: the token PUT failed: HTTP 403");

    // No rule for this caller.
    let d = TestDaemon::start(unmapped_config_text).await;
    let (out, stdout) = doctor(d.addr, &[], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "FAIL role: no app's rule matches this caller");
    line(
        &stdout,
        "     fix: see which rule should match and why it does not: `imds-broker explain",
    );
    d.stop().await;

    // A role, but not the expected one; then STS failing. STS fails from the start: a token
    // PUT starts the caller's AssumeRole, so the first run would otherwise fill the cache.
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    d.sts
        .set(Behavior::Fail(StsError::Unavailable("down".into())));
    let (out, stdout) = doctor(d.addr, &["--expect-role", "billing"], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(
        &stdout,
        "FAIL role: this caller is \"app-a\", not the expected \"billing\"",
    );
    let (out, stdout) = doctor(d.addr, &[], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "FAIL credentials: not served: HTTP 503");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_comes_before_imds_in_the_sdks_chain_fails_the_last_step() {
    let d = TestDaemon::start(|s| config_text(s, "")).await;
    let (out, stdout) = doctor(
        d.addr,
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "ok   credentials:");
    line(&stdout, "FAIL sdk: AWS_EC2_METADATA_DISABLED=true");
    line(&stdout, "     fix: unset AWS_EC2_METADATA_DISABLED");
    line(&stdout, "FAIL sdk: AWS_ACCESS_KEY_ID is set");
    assert_eq!(
        stdout.matches("fix:").count(),
        1,
        "a fix for the first failure only"
    );
    d.stop().await;
}

/// As root, `--uid` checks as that user: the daemon sees that uid (no rule maps it here).
#[tokio::test(flavor = "multi_thread")]
async fn as_root_uid_checks_as_that_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the test suite runs as root"
    );
    let d = TestDaemon::start(|s| config_text(s, "debug_whoami = true")).await;
    let (out, stdout) = doctor(d.addr, &["--uid", "61001"], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    line(&stdout, "ok   identity: local caller uid=61001 ");
    line(&stdout, "FAIL role: no app's rule matches this caller");
    d.stop().await;
}

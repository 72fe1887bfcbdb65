//! The state directory (token key, container token state, admin socket, audit file) is the
//! daemon's alone: one others can read is tightened to 0700, one someone else owns, others can
//! write or reached through a symbolic link is refused, both by the library and by `serve`
//! before it opens anything in it.

#[path = "common/binary.rs"]
#[allow(dead_code)] // only `serve_command()` is used here
mod binary;
mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;

use imds_broker::token::TokenKey;

const OTHER_UID: u32 = 4000001;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

fn state_dir_with(mode: u32, owner: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(owner)), None).unwrap();
    (dir, state)
}

#[test]
fn a_state_dir_others_can_read_is_tightened_to_0700() {
    let me = nix::unistd::geteuid().as_raw();
    let (_dir, state) = state_dir_with(0o755, me);
    TokenKey::load_or_create(&state).unwrap();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("token.key")), 0o600);
}

#[test]
fn a_state_dir_someone_else_owns_is_refused() {
    let (_dir, state) = state_dir_with(0o700, OTHER_UID);
    let e = TokenKey::load_or_create(&state).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}: owned by uid {OTHER_UID}", state.display())),
        "{e}"
    );
    assert!(!state.join("token.key").exists(), "nothing written in it");
}

#[test]
fn a_state_dir_others_can_write_is_refused() {
    let me = nix::unistd::geteuid().as_raw();
    let (_dir, state) = state_dir_with(0o777, me);
    let e = TokenKey::load_or_create(&state).unwrap_err().to_string();
    assert!(e.contains("writable by others"), "{e}");
    assert_eq!(mode(&state), 0o777, "left for the operator to look at");
}

#[test]
fn a_state_dir_reached_through_a_link_is_refused() {
    let me = nix::unistd::geteuid().as_raw();
    let (dir, real) = state_dir_with(0o700, me);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = TokenKey::load_or_create(&link).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // Also when the link is a directory on the way.
    let e = TokenKey::load_or_create(&link.join("sub"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!real.join("token.key").exists() && !real.join("sub").exists());
}

/// `serve --config` with a dummy source credential: `Ok(child)` once it announced an address,
/// `Err((status, stderr))` if it exited first.
fn serve(config: &Path) -> Result<std::process::Child, (std::process::ExitStatus, String)> {
    let mut child = binary::serve_command(config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.starts_with("listening on ") {
        return Ok(child);
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Err((status, stderr))
}

fn write_config(dir: &Path, state: &Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, common::config_text(state, "")).unwrap();
    path
}

#[test]
fn serve_tightens_its_state_dir_and_says_so() {
    let me = nix::unistd::geteuid().as_raw();
    let (dir, state) = state_dir_with(0o755, me);
    let child = serve(&write_config(dir.path(), &state)).expect("serve starts");
    let running_mode = mode(&state);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(running_mode, 0o700);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARN") && stderr.contains("mode 755") && stderr.contains("0700"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_state_dir_someone_else_owns_before_writing_in_it() {
    let (dir, state) = state_dir_with(0o700, OTHER_UID);
    let (status, stderr) = match serve(&write_config(dir.path(), &state)) {
        Err(exited) => exited,
        Ok(mut child) => {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("serve started with a state_dir owned by uid {OTHER_UID}");
        }
    };
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("{}: owned by uid {OTHER_UID}", state.display())),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "no audit file, key or socket in it"
    );
}

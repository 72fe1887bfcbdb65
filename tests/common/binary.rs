//! The real `imds-broker` binary as a child process: started with a dummy source credential
//! (never IMDS), its announced address read from stdout, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imds-broker"))
}

/// `serve --config config` with `extra_env`; returns the child and the address it announced.
pub fn serve(config: &Path, extra_env: &[(&str, &str)]) -> (Child, String) {
    serve_logging(config, extra_env, Stdio::null())
}

/// `serve --config config` with a dummy source credential and no other AWS configuration,
/// stdout piped (the announced address is its first line).
pub fn serve_command(config: &Path) -> Command {
    let mut command = broker();
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "dummy-source-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    command
}

/// [`serve`], its log (stderr) going to `log`.
pub fn serve_logging(config: &Path, extra_env: &[(&str, &str)], log: Stdio) -> (Child, String) {
    let mut command = serve_command(config);
    command.stderr(log);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    start(command)
}

/// Spawns a `serve` command (stdout piped); returns the child and the address it announced.
pub fn start(mut command: Command) -> (Child, String) {
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_owned();
    (child, addr)
}

/// SIGTERM, and the daemon must exit 0.
pub fn stop(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

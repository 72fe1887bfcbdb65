//! The fuzz smoke run CI can afford: every committed seed (and every crash input kept as a
//! regression) through the same target functions cargo-fuzz drives, which this file includes
//! from `fuzz/src/`, so no cargo-fuzz or libFuzzer is needed. The HTTP seeds are also sent over
//! real TCP to an in-process daemon, which must answer or close each connection, and keep
//! serving.

mod common;

#[path = "../fuzz/src/lib.rs"]
mod fuzz_targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestDaemon, config_text};
use fuzz_targets::fixture::{Tokens, substitute_tokens};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FUZZ_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz");
/// Far above what an answer takes; the daemon closes a silent connection after
/// `HEADER_READ_TIMEOUT` (10 s) anyway.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(15);

/// The inputs of one target: its seeds, and the regression inputs of crashes fixed since.
fn inputs(seeds: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = [format!("seeds/{seeds}"), format!("regressions/{target}")]
        .iter()
        .map(|dir| Path::new(FUZZ_DIR).join(dir))
        .filter(|dir| dir.is_dir())
        .flat_map(|dir| std::fs::read_dir(dir).expect("readable corpus dir"))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    let inputs: Vec<_> = files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).expect("readable corpus file");
            (path, data)
        })
        .collect();
    assert!(!inputs.is_empty(), "no seeds for {target}");
    inputs
}

/// Runs `target` on every input, naming the input that failed.
fn replay(seeds: &str, target_name: &str, target: fn(&[u8])) {
    for (path, data) in inputs(seeds, target_name) {
        if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
            panic!("{target_name} failed on {}: {panic:?}", path.display());
        }
    }
}

#[test]
fn request_target_seeds() {
    replay("http", "request", fuzz_targets::request::run);
}

#[test]
fn wire_target_seeds() {
    replay("http", "wire", fuzz_targets::wire::run);
}

#[test]
fn config_target_seeds() {
    replay("config", "config", fuzz_targets::config_text::run);
}

#[tokio::test]
async fn http_seeds_over_tcp_to_a_running_daemon() {
    let d = TestDaemon::start(|state| {
        // Dozens of seeds from one caller: the rate limit is tested elsewhere.
        format!(
            "{}\n[limits]\nrequests_per_second = 100000\nburst = 100000\n",
            config_text(state, "")
        )
    })
    .await;
    let state = &d.state;
    let tokens = Tokens {
        own: d.token(21_600).await,
        other: state.token_key().mint(
            "local:uid=999;cgroup=/other.slice",
            Duration::from_secs(60),
            state.boot_time(),
        ),
    };
    for (path, data) in inputs("http", "wire") {
        // Over TCP the caller is this test process, whatever the selector byte says.
        let raw = substitute_tokens(&data[1..], &tokens);
        let answer = tokio::time::timeout(EXCHANGE_DEADLINE, exchange(d.addr, &raw))
            .await
            .unwrap_or_else(|_| panic!("{}: connection still open", path.display()));
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1."),
            "{}: {:?}",
            path.display(),
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(d.token(60).await.len(), tokens.own.len(), "still serving");
    d.stop().await;
}

/// Writes `raw`, closes the sending side, and reads until the daemon closes.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The daemon may close first (a request it refused): not a failure.
    let _ = stream.write_all(raw).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    answer
}

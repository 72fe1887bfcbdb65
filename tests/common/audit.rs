//! What the audit-storage and audit-queue tests share: the daemon's admin socket, the writer's
//! health and queue, and the audit file's events.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use imds_broker::audit::sink::AuditSink;
use serde_json::{Map, Value};

use super::TestDaemon;

/// GET `path` from the daemon's admin socket: status and body.
pub fn admin(d: &TestDaemon, path: &str) -> (u16, String) {
    let mut s = UnixStream::connect(d.dir.path().join("state/admin.sock")).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out.split_once("\r\n\r\n").unwrap().1.to_owned())
}

/// Waits (for the writer's retry timer or its queue draining, at most 30 s) until the audit
/// health is `healthy`.
pub async fn health_becomes(healthy: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while imds_broker::audit::health::failing().is_none() != healthy {
        assert!(
            Instant::now() < deadline,
            "audit health never became {healthy}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns once every event queued so far was handled by the writer.
pub async fn flush(sink: &AuditSink) {
    let sink = sink.clone();
    tokio::task::spawn_blocking(move || sink.flush())
        .await
        .unwrap();
}

/// Every line of the audit file at `path`, parsed.
pub fn events(path: &Path) -> Vec<Map<String, Value>> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

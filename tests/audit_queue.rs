//! A full audit queue (issue 17, fault 5): the audit file on a small ext4 filesystem the test
//! mounts and then freezes (`fsfreeze`: every write blocks until it is thawed, as on a hung
//! disk or NFS server), so the writer thread blocks in its write and the events behind it fill
//! the queue. Nothing on the request path may wait for that writer: with `on_failure =
//! "refuse"` (the default) callers get IMDS's 503 at once and `/readyz` fails; with `"serve"`
//! they get their credentials. Either way the dropped events are counted, recorded as an
//! `audit.gap` once the filesystem thaws, and the file verifies.
//!
//! The daemon is the in-process [`TestDaemon`]; the audit layer installed for the whole test
//! process writes to the frozen filesystem and reports to the process's audit health, which the
//! daemon's request path and `/readyz` read. One test, so nothing else in this process writes
//! events meanwhile. Needs root (mount, loop device, fsfreeze).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::audit::{admin, events, flush, health_becomes};
use common::{TestDaemon, config_text};
use imds_broker::audit::chain;
use imds_broker::audit::sink::{AuditSink, QUEUE_EVENTS};
use tracing_subscriber::layer::SubscriberExt;

const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/app-a";
/// What any request must be answered within, queue full or not.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Room for the test's 100 concurrent requests from one caller.
const LIMITS: &str =
    "\n[limits]\nrequests_per_second = 100000\nburst = 100000\nmax_connections_per_caller = 1000";

/// An ext4 image mounted on a loop device for the test; thawed and unmounted when dropped, so
/// a failing test never leaves the writer (or the host) blocked.
struct Ext4 {
    dir: tempfile::TempDir,
}

impl Ext4 {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
        run(Command::new("mkfs.ext4").arg("-q").arg(&image));
        fs::create_dir(dir.path().join("mnt")).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir.path().join("mnt")));
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn freeze(&self) {
        run(Command::new("fsfreeze").arg("-f").arg(self.path()));
    }

    fn thaw(&self) {
        run(Command::new("fsfreeze").arg("-u").arg(self.path()));
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Thawed already unless the test failed midway (then this is what unblocks the writer).
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(self.path())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("umount")
            .args(["-l", "-d"])
            .arg(self.path())
            .status();
    }
}

fn run(command: &mut Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?} (the tests run as root)");
}

fn metric(d: &TestDaemon, name: &str) -> u64 {
    let (_, text) = admin(d, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
        .parse()
        .unwrap()
}

/// Emits audit events from another thread (other callers' decisions) until the writer's
/// queue is full: as many as it holds, the batch the writer took before it blocked, and a few
/// more. Fails if the emitting thread is blocked instead.
fn fill_queue() {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        for n in 0..QUEUE_EVENTS + 256 + 16 {
            tracing::info!(target: "audit", event = "token.issued", n, "filler");
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(20))
        .expect("an audit event blocked its thread: a full queue stalls whoever emits");
}

/// A token and the app's credentials, each answered within [`ANSWER_WITHIN`]: the status, the
/// body and how long the credentials request took.
async fn credentials(d: &TestDaemon) -> (u16, String, Duration) {
    let token = tokio::time::timeout(ANSWER_WITHIN, d.token(60))
        .await
        .expect("the token PUT hung");
    let asked = Instant::now();
    let r = tokio::time::timeout(ANSWER_WITHIN, d.get(CREDS_PATH, &token))
        .await
        .expect("the credentials GET hung");
    (r.status, r.body, asked.elapsed())
}

/// Many callers at once while the queue is full: every one answered with `status`, none
/// later than [`ANSWER_WITHIN`]. The slowest answer.
async fn all_answered(d: &TestDaemon, status: u16) -> Duration {
    let token = d.token(60).await;
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (addr, token) = (d.addr, token.clone());
        asks.spawn(async move {
            let asked = Instant::now();
            let raw = format!(
                "GET {CREDS_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
            );
            let r = tokio::time::timeout(ANSWER_WITHIN, common::send_raw(addr, raw.as_bytes()))
                .await
                .expect("a request hung");
            (r.status, asked.elapsed())
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(answer) = asks.join_next().await {
        let (got, took) = answer.unwrap();
        assert_eq!(got, status);
        slowest = slowest.max(took);
    }
    slowest
}

fn lost_in_gaps(path: &Path) -> u64 {
    events(path)
        .iter()
        .filter(|l| l["event"] == "audit.gap")
        .map(|l| l["lost"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_queue_answers_at_once_refusing_or_serving_and_counts_what_it_dropped() {
    let disk = Ext4::mount();
    let audit = disk.path().join("audit.log");
    let (sink, layer) = AuditSink::open(&audit, "test-host".into(), None).unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    // refuse (the default).
    let d = TestDaemon::start(|state| config_text(state, LIMITS)).await;
    assert_eq!(credentials(&d).await.0, 200);
    flush(&sink).await;
    disk.freeze();
    fill_queue();
    let (status, body, took) = credentials(&d).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("503 - Service Unavailable"),
        "IMDS page: {body}"
    );
    assert!(!body.contains("audit"), "no detail to the caller: {body}");
    let slowest = all_answered(&d, 503).await;
    let (ready, why) = admin(&d, "/readyz");
    assert_eq!(ready, 503);
    assert!(why.contains("queue is full"), "{why}");
    let dropped = metric(&d, "imds_broker_audit_queue_dropped_total");
    assert!(dropped > 16, "{dropped}");
    assert!(metric(&d, "imds_broker_audit_refused_total") > 100);
    eprintln!(
        "refuse: queue {QUEUE_EVENTS} events; with it full a credentials request got {status} in {took:?}, \
         100 concurrent ones {status} within {slowest:?}; {dropped} events dropped"
    );
    // Thawed: the writer catches up by itself, and the drops are in the chain.
    disk.thaw();
    health_becomes(true).await;
    assert_eq!(admin(&d, "/readyz").0, 200);
    assert_eq!(credentials(&d).await.0, 200);
    flush(&sink).await;
    let v = chain::verify(&fs::read_to_string(&audit).unwrap()).unwrap();
    assert!(v.from_genesis);
    let dropped = metric(&d, "imds_broker_audit_queue_dropped_total");
    assert_eq!(lost_in_gaps(&audit), dropped, "every drop is in a gap line");
    d.stop().await;

    // serve.
    let d = TestDaemon::start(|state| {
        config_text(state, &format!("{LIMITS}\n[audit]\non_failure = \"serve\""))
    })
    .await;
    assert_eq!(credentials(&d).await.0, 200);
    flush(&sink).await;
    disk.freeze();
    fill_queue();
    let (status, body, took) = credentials(&d).await;
    assert_eq!(status, 200, "served although not recorded: {body}");
    let slowest = all_answered(&d, 200).await;
    assert_eq!(admin(&d, "/readyz").0, 200, "serve keeps the daemon ready");
    eprintln!(
        "serve: with the queue full a credentials request got {status} in {took:?}, 100 concurrent \
         ones {status} within {slowest:?}"
    );
    disk.thaw();
    health_becomes(true).await;
    flush(&sink).await;
    chain::verify(&fs::read_to_string(&audit).unwrap()).unwrap();
    let dropped = metric(&d, "imds_broker_audit_queue_dropped_total");
    assert_eq!(lost_in_gaps(&audit), dropped);
    d.stop().await;
    sink.close();
}

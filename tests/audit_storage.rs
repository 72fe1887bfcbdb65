//! The audit file on failing storage (issue 17): a daemon whose audit file's filesystem (a small
//! tmpfs the test mounts; the tests run as root) fills up. With `on_failure = "refuse"` (the
//! default) callers get IMDS's 503 and `/readyz` fails while nothing can be written, and
//! issuance resumes by itself once space is back; with `"serve"` they get credentials and the
//! lost events are counted in an `audit.gap` line. Either way the file verifies afterwards.
//!
//! The daemon is the in-process [`TestDaemon`] (its fake STS can issue); the audit layer
//! installed for the whole test process writes to the tmpfs and reports to the process's audit
//! health, which the daemon's request path and `/readyz` read. One test, so nothing else in
//! this process writes events meanwhile.

mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use common::audit::{admin, events, flush, health_becomes};
use common::{TestDaemon, config_text};
use imds_broker::audit::chain;
use imds_broker::audit::sink::AuditSink;
use tracing_subscriber::layer::SubscriberExt;

/// The credentials of the config's app (`app-a`, this process's uid).
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/app-a";

/// A tmpfs mounted for the test, unmounted when dropped.
struct TmpFs(tempfile::TempDir);

impl TmpFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (the tests run as root)");
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the filesystem; removing the returned file frees it.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut f = File::create(&filler).unwrap();
        let block = vec![b'x'; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::StorageFull => break,
                Err(e) => panic!("{e}"),
            }
        }
        filler
    }
}

impl Drop for TmpFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Takes tokens, one batch each, until the writer reports failing (the file's last page
/// takes a few small lines after the filesystem is full); the last token's event was lost.
async fn token_until_failing(d: &TestDaemon, sink: &AuditSink) -> String {
    for _ in 0..64 {
        let token = d.token(60).await;
        flush(sink).await;
        if imds_broker::audit::health::failing().is_some() {
            return token;
        }
    }
    panic!("the audit file never failed on a full filesystem");
}

/// A token and then the app's credentials: the status of the credentials request.
async fn credentials(d: &TestDaemon) -> (u16, String) {
    let token = d.token(60).await;
    let r = d.get(CREDS_PATH, &token).await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_audit_filesystem_refuses_or_serves_as_configured_and_recovers_by_itself() {
    let tmpfs = TmpFs::mount("64k");
    let audit = tmpfs.path().join("audit.log");
    let (sink, layer) = AuditSink::open(&audit, "test-host".into(), None).unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    // refuse (the default).
    let d = TestDaemon::start(|state| config_text(state, "")).await;
    assert_eq!(credentials(&d).await.0, 200);
    assert_eq!(admin(&d, "/readyz").0, 200);
    let filler = tmpfs.fill();
    // Full: the next events (once the file's last page is used up, a token's) cannot be
    // written; the writer says so.
    let token = token_until_failing(&d, &sink).await;
    let r = d.get(CREDS_PATH, &token).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("503 - Service Unavailable"),
        "IMDS page: {}",
        r.body
    );
    assert!(
        !r.body.contains("audit"),
        "no detail to the caller: {}",
        r.body
    );
    let (status, body) = admin(&d, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("audit file cannot be written"), "{body}");
    assert!(body.contains("No space left"), "{body}");
    let (_, metrics) = admin(&d, "/metrics");
    assert!(metrics.contains("imds_broker_audit_healthy 0"), "{metrics}");
    assert!(
        metrics.contains("imds_broker_audit_refused_total 1"),
        "{metrics}"
    );
    let text = fs::read_to_string(&audit).unwrap();
    chain::verify(&text).expect("no half line while full");

    // Space is back: the writer's retry recovers without any request.
    fs::remove_file(&filler).unwrap();
    health_becomes(true).await;
    assert_eq!(admin(&d, "/readyz").0, 200);
    assert_eq!(credentials(&d).await.0, 200);
    flush(&sink).await;
    let v = chain::verify(&fs::read_to_string(&audit).unwrap()).unwrap();
    assert!(v.from_genesis);
    let lines = events(&audit);
    let gaps: Vec<_> = lines.iter().filter(|l| l["event"] == "audit.gap").collect();
    assert_eq!(gaps.len(), 1);
    // The token issued while full and the refusal itself.
    assert_eq!(gaps[0]["lost"], 2, "{:?}", gaps[0]);
    d.stop().await;

    // serve.
    let d =
        TestDaemon::start(|state| config_text(state, "\n[audit]\non_failure = \"serve\"")).await;
    let filler = tmpfs.fill();
    let token = token_until_failing(&d, &sink).await;
    let r = d.get(CREDS_PATH, &token).await;
    assert_eq!(r.status, 200, "served although not recorded: {}", r.body);
    assert_eq!(admin(&d, "/readyz").0, 200, "serve keeps the daemon ready");
    flush(&sink).await;
    let (_, metrics) = admin(&d, "/metrics");
    assert!(metrics.contains("imds_broker_audit_healthy 0"), "{metrics}");
    fs::remove_file(&filler).unwrap();
    health_becomes(true).await;
    flush(&sink).await;
    let (_, metrics) = admin(&d, "/metrics");
    let lost: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imds_broker_audit_events_lost_total "))
        .unwrap()
        .parse()
        .unwrap();
    let lines = events(&audit);
    // The second run's gaps: the writer may record its losses in more than one gap line (a
    // retry that fails again before the space returns).
    let serving_gaps: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "audit.gap")
        .skip(1)
        .collect();
    let lost_serving: u64 = serving_gaps
        .iter()
        .map(|g| g["lost"].as_u64().unwrap())
        .sum();
    // The token, and the issuance unless the process-wide repeat filter already holds an
    // identical (caller, app, key id) line from the first run (the fake STS's key ids repeat
    // across daemons): what was lost is what the gap line says, and the metric agrees.
    assert!((1..=2).contains(&lost_serving), "{serving_gaps:?}");
    assert_eq!(lost, 2 + lost_serving, "both runs counted");
    chain::verify(&fs::read_to_string(&audit).unwrap()).unwrap();
    d.stop().await;
    sink.close();
}

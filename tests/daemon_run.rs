//! One `run`, one shutdown tree: the daemon started through the library's `daemon::run` has
//! every task (accept loops, refresher, reloader, container token rotation, admin listener,
//! watchdog) in one tree, and once shutdown is triggered none of them is left, within the
//! grace period; a task that ignores shutdown is named in what `run` returns.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{FakeSts, ManualClock};
use imds_broker::admin;
use imds_broker::audit::sink::AuditSink;
use imds_broker::config::Config;
use imds_broker::daemon::{self, Listeners, Services, Stopped, TASKS_GRACE};
use imds_broker::server::SHUTDOWN_GRACE;
use imds_broker::signal::Hangups;
use tokio::sync::{mpsc, oneshot};

/// A config file with the container endpoint on (so token rotation runs), its admin socket
/// in the state directory.
fn config(dir: &Path) -> Config {
    let me = nix::unistd::geteuid().as_raw();
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"

[sts]
region = "us-east-1"

[container]
listen = ["127.0.0.1:0"]
token_dir = "{tokens}"

[[app]]
name = "app-a"
role_arn = "arn:aws:iam::111122223333:role/app-a"
match = {{ uid = 4000001 }}
container = {{ uid = {me} }}
"#,
            state = dir.join("state").display(),
            tokens = tokens.display(),
        ),
    )
    .unwrap();
    Config::load(&path).unwrap()
}

/// What `imds-broker serve` hands to `run`, with a fake STS, a reload channel and a watchdog.
async fn wire(
    dir: &Path,
    watchdog: Option<Duration>,
) -> (Config, Listeners, Services, mpsc::Sender<()>) {
    let config = config(dir);
    let (unstarted, _layer) = AuditSink::prepare("test-host".into());
    let audit = daemon::open_audit(&config, unstarted).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let clock = ManualClock::new();
    let (reload, hangups) = Hangups::channel();
    let services = Services {
        source: FakeSts::new(clock.clone()),
        clock: Arc::new(clock),
        hangups,
        audit: Some(audit),
        announce: false,
        watchdog,
        own: None,
    };
    (config, listeners, services, reload)
}

#[tokio::test]
async fn every_task_runs_in_one_tree_and_none_is_left_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (config, listeners, services, reload) =
        wire(dir.path(), Some(Duration::from_millis(100))).await;
    let admin_at = config.admin.clone();
    let daemon = daemon::start(config, listeners, services).await.unwrap();
    let tasks = daemon.tasks().clone();
    let addrs = daemon.local_addrs().to_vec();
    let running: Vec<_> = tasks.running().into_iter().collect();
    assert_eq!(
        running,
        [
            ("accept loop", 2), // IMDS and the container endpoint
            ("admin listener", 1),
            ("config reloader", 1),
            ("container token rotation", 1),
            ("credential refresher", 1),
            ("systemd watchdog", 1),
        ]
    );
    assert_eq!(tasks.len(), 7);
    assert_eq!(
        admin::fetch(&admin_at, "/healthz").await.unwrap(),
        (200, "ok\n".to_owned())
    );

    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(daemon.run(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    let report = tokio::time::timeout(SHUTDOWN_GRACE + TASKS_GRACE, run)
        .await
        .expect("drained within the grace period")
        .unwrap();
    assert_eq!(report, Stopped::default());
    assert!(tasks.running().is_empty(), "{:?}", tasks.running());
    assert!(tasks.is_empty());
    // Nothing answers any more: no accept loop, no admin listener, no reloader.
    for addr in addrs {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr}"
        );
    }
    assert!(admin::fetch(&admin_at, "/healthz").await.is_err());
    assert!(reload.try_send(()).is_err(), "the reloader has let go");
}

#[tokio::test]
async fn run_returns_once_everything_it_started_has_ended() {
    let dir = tempfile::tempdir().unwrap();
    let (config, listeners, services, _reload) =
        wire(dir.path(), Some(Duration::from_millis(100))).await;
    let admin_at = config.admin.clone();
    // Shutdown requested at once: run still starts everything, then drains it.
    let report = tokio::time::timeout(
        SHUTDOWN_GRACE + TASKS_GRACE,
        daemon::run(config, listeners, async {}, services),
    )
    .await
    .expect("drained within the grace period")
    .unwrap();
    assert_eq!(report, Stopped::default());
    assert!(admin::fetch(&admin_at, "/healthz").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_task_that_ignores_shutdown_is_named_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let (config, listeners, services, _reload) = wire(dir.path(), None).await;
    let daemon = daemon::start(config, listeners, services).await.unwrap();
    daemon
        .tasks()
        .child()
        .spawn("deaf task", std::future::pending());
    let started = tokio::time::Instant::now();
    let report = daemon.run(async {}).await;
    assert_eq!(
        report.tasks_left.into_iter().collect::<Vec<_>>(),
        [("deaf task", 1)]
    );
    assert!(started.elapsed() <= SHUTDOWN_GRACE + TASKS_GRACE);
}

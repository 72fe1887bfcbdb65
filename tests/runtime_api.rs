//! The runtime client against a real `podman system service` on a socket of its own, with
//! containers made from a busybox root file system (no image, no registry). Needs root,
//! podman and /bin/busybox (busybox-static); without them the test fails under `CI` and is
//! skipped elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use imds_broker::runtime::{Runtime, RuntimeError};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Podman's own defaults need systemd and a full OCI setup this machine may lack.
const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"#;

/// Starting the service, or a container, takes a second or two; this is far beyond that.
const PATIENCE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// A cached answer takes microseconds; a request to a stopped service never comes back.
const CACHED: Duration = Duration::from_millis(500);

/// Why this machine cannot run the test, if it cannot.
fn missing_requirement() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("runtime_api needs root (podman's rootful service)".into());
    }
    let podman = std::process::Command::new("podman")
        .arg("--version")
        .output();
    if !podman.is_ok_and(|o| o.status.success()) {
        return Some("runtime_api needs podman".into());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("runtime_api needs /bin/busybox (package busybox-static)".into());
    }
    None
}

/// The podman service and the containers a test made; all removed on drop, even on a panic.
struct Podman {
    dir: tempfile::TempDir,
    socket: PathBuf,
    service: std::process::Child,
    names: Vec<String>,
}

impl Podman {
    fn conf(&self) -> PathBuf {
        self.dir.path().join("containers.conf")
    }

    async fn start() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("containers.conf"), CONTAINERS_CONF).unwrap();
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let socket = dir.path().join("podman.sock");
        let log = std::fs::File::create(dir.path().join("service.log")).unwrap();
        let service = std::process::Command::new("podman")
            .env("CONTAINERS_CONF", dir.path().join("containers.conf"))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("podman system service");
        let mut podman = Podman {
            dir,
            socket,
            service,
            names: Vec::new(),
        };
        podman.wait_until_it_answers().await;
        podman
    }

    async fn wait_until_it_answers(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.socket.exists() && ping(&self.socket).await {
                return;
            }
            if let Ok(Some(status)) = self.service.try_wait() {
                panic!("podman system service exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer: {}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("podman");
        command.env("CONTAINERS_CONF", self.conf());
        command
    }

    /// `podman run -d` of `sleep` in the busybox root file system; the new container's id.
    async fn run(&mut self, name: &str, label: &str) -> String {
        self.names.push(name.to_owned());
        let rootfs = self.dir.path().join("rootfs");
        let output = self
            .command()
            .args(["--network-backend", "cni", "run", "-d", "--name", name])
            .args(["--label", label, "--rootfs"])
            .arg(&rootfs)
            .args(["/bin/busybox", "sleep", "300"])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    async fn remove(&self, name: &str) {
        let output = self
            .command()
            .args(["rm", "-f", "-t", "0", name])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "podman rm: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.service.id() as i32), signal).unwrap();
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::process::Command::new("podman")
                .env("CONTAINERS_CONF", self.conf())
                .args(["rm", "-f", "-t", "0", "--ignore", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.service.kill();
        let _ = self.service.wait();
    }
}

async fn ping(socket: &Path) -> bool {
    let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
        return false;
    };
    let request = axum::http::Request::get("/_ping")
        .header("host", "localhost")
        .body(axum::body::Body::empty())
        .unwrap();
    matches!(
        imds_broker::http_client::exchange(stream, request).await,
        Ok((200, body)) if body == "OK"
    )
}

async fn until<T>(what: &str, mut attempt: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(POLL).await;
    }
}

fn labels(k: &str, v: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(k.to_owned(), v.to_owned())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_names_labels_and_changes_reach_the_client() {
    if let Some(reason) = missing_requirement() {
        if std::env::var_os("CI").is_some() {
            panic!("{reason}");
        }
        eprintln!("skipped: {reason}");
        return;
    }
    let mut podman = Podman::start().await;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("imds-rt-{}-{nanos}", std::process::id());

    let runtime = Arc::new(Runtime::new(vec![
        podman.dir.path().join("absent.sock"),
        podman.socket.clone(),
    ]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(runtime.clone().watch_events(async {
        let _ = stopped.await;
    }));
    until("the event stream", async || {
        runtime.events_connected().then_some(())
    })
    .await;
    assert_eq!(runtime.socket_in_use(), Some(podman.socket.clone()));

    let first = podman.run(&name, "tier=blue").await;
    let meta = runtime.inspect(&first).await.unwrap();
    assert_eq!(meta.id, first);
    assert_eq!(meta.name, name);
    // Made from a root file system: no image reference.
    assert_eq!(meta.image, "");
    assert_eq!(meta.labels, labels("tier", "blue"));

    let found = runtime.find(&name).await.unwrap();
    assert_eq!(found.meta, *meta);
    assert!(found.running);
    assert!(found.pid.is_some_and(|pid| pid > 0), "{found:?}");

    // Kept: while the service is stopped a request goes unanswered, a cached answer does not.
    let deadline = Instant::now() + PATIENCE;
    loop {
        podman.signal(Signal::SIGSTOP);
        let cached = tokio::time::timeout(CACHED, runtime.inspect(&first)).await;
        podman.signal(Signal::SIGCONT);
        if let Ok(answer) = cached {
            assert_eq!(answer.unwrap(), meta);
            break;
        }
        // The container's own start events may have come after the lookup and dropped it.
        assert!(Instant::now() < deadline, "never answered from the cache");
        tokio::time::sleep(POLL).await;
    }

    // The same name, another container with other labels.
    podman.remove(&name).await;
    let second = podman.run(&name, "tier=green").await;
    assert_ne!(first, second);
    let found = runtime.find(&name).await.unwrap();
    assert_eq!(found.meta.id, second);
    assert_eq!(found.meta.labels, labels("tier", "green"));
    // Only the events can make the cache forget the first container.
    until(
        "the first container's removal to reach the cache",
        async || match runtime.inspect(&first).await {
            Err(RuntimeError::NotFound { id, socket }) => {
                assert_eq!((id.as_str(), &socket), (first.as_str(), &podman.socket));
                Some(())
            }
            Ok(meta) => {
                assert_eq!(meta.labels, labels("tier", "blue"));
                None
            }
            Err(e) => panic!("inspect of the removed container: {e}"),
        },
    )
    .await;
    let meta = runtime.inspect(&second).await.unwrap();
    assert_eq!(
        (meta.name.as_str(), &meta.labels),
        (name.as_str(), &labels("tier", "green"))
    );

    stop.send(()).unwrap();
    watcher.await.unwrap();
    assert!(!runtime.events_connected());
}

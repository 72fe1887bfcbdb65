//! `[source] kind = "access_key"` against a real moto server playing IAM and STS, started with
//! `INITIAL_NO_AUTH_ACTION_COUNT` so that after its bootstrap it checks every request's
//! signature and refuses keys IAM does not have (moto's IAM-like access control): a deleted key
//! really stops working here.
//!
//! Covered: a rotation end to end (the file, IAM, the provider, the SDK config the daemon's STS
//! client is built from), a crash after each step of a rotation repaired by `load` +
//! `reconcile`, leftover keys, a file key that no longer works, a user without IAM permission,
//! the rotation loop, the file checks, and secrets kept out of Debug, errors and logs.
//!
//! moto comes from the repo's Python venv (`tests/e2e/ensure-venv.sh` makes `.venv/`;
//! `IMDS_BROKER_VENV` names another one). Without it the moto tests are skipped, saying so,
//! except under `CI=true`, where that is a failure.

use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use imds_broker::config::{AccessKeyConfig, StsConfig};
use imds_broker::source::access_key::{
    AccessKeyError, AccessKeySource, Clients, Rotation, Step, key_hint,
};

const REGION: &str = "us-east-1";
/// The requests moto serves before it starts checking signatures: the admin's CreateUser,
/// PutUserPolicy and CreateAccessKey, made with made-up credentials.
const BOOTSTRAP_CALLS: &str = "3";
/// Importing moto and binding takes a few seconds on a busy machine; this is far beyond it.
const MOTO_START: Duration = Duration::from_secs(90);
/// Allows the rotation everything it needs (moto matches policies against resource `*`).
const ROTATE_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["iam:ListAccessKeys","iam:CreateAccessKey","iam:DeleteAccessKey"],"Resource":"*"}]}"#;
const ADMIN_POLICY: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;

/// The venv's interpreter, or why there is none.
fn python() -> Result<PathBuf, String> {
    let venv = std::env::var_os("IMDS_BROKER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let python = venv.join("bin/python");
    if python.is_file() {
        Ok(python)
    } else {
        Err(format!(
            "no Python venv with moto at {} (run tests/e2e/ensure-venv.sh, or set IMDS_BROKER_VENV)",
            venv.display()
        ))
    }
}

/// A moto server of the test's own on 127.0.0.1 and a port it chose, killed on drop; and an
/// admin IAM client signed with a key moto knows.
struct Moto {
    child: Child,
    endpoint: String,
    admin: aws_sdk_iam::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// `None` (after saying why) when there is no venv outside CI.
    async fn start() -> Option<Moto> {
        let python = match python() {
            Ok(p) => p,
            Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{why}: moto is needed for this test in CI")
            }
            Err(why) => {
                eprintln!("skipped: {why}");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("moto.stderr")).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/clients/moto_sts.py");
        // Nothing of this machine's environment (AWS_*, proxies) reaches moto.
        let mut child = Command::new(&python)
            .arg(script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("LANG", "C.UTF-8")
            .env("INITIAL_NO_AUTH_ACTION_COUNT", BOOTSTRAP_CALLS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
        // moto binds port 0 itself and prints `listening on HOST:PORT`: no window for a clash.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(MOTO_START).unwrap_or_default();
        let Some(address) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.path().join("moto.stderr")).unwrap_or_default();
            panic!("moto did not start (said {line:?}):\n{log}");
        };
        let endpoint = format!("http://{address}");
        let bootstrap = iam_client(&endpoint, "AKIABOOTSTRAP0000000", "bootstrap");
        bootstrap
            .create_user()
            .user_name("admin")
            .send()
            .await
            .unwrap();
        bootstrap
            .put_user_policy()
            .user_name("admin")
            .policy_name("all")
            .policy_document(ADMIN_POLICY)
            .send()
            .await
            .unwrap();
        let key = bootstrap
            .create_access_key()
            .user_name("admin")
            .send()
            .await
            .unwrap();
        let key = key.access_key().unwrap();
        let admin = iam_client(&endpoint, key.access_key_id(), key.secret_access_key());
        let moto = Moto {
            child,
            endpoint,
            admin,
            _dir: dir,
        };
        // From here moto checks signatures: a made-up key is refused.
        let refused = moto.whoami("AKIAMADEUP0000000000", "made-up").await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("InvalidClientTokenId")),
            "moto does not enforce authentication: {refused:?}"
        );
        Some(moto)
    }

    fn sts_config(&self) -> StsConfig {
        StsConfig {
            region: REGION.into(),
            endpoint_url: Some(self.endpoint.clone()),
            default_duration: Duration::from_secs(3600),
            max_calls_per_second: 10,
            burst: 50,
        }
    }

    /// A new IAM user with one key (returned), allowed to rotate its keys when `may_rotate`.
    async fn user(&self, name: &str, may_rotate: bool) -> (String, String) {
        self.admin
            .create_user()
            .user_name(name)
            .send()
            .await
            .unwrap();
        if may_rotate {
            self.admin
                .put_user_policy()
                .user_name(name)
                .policy_name("rotate-own-keys")
                .policy_document(ROTATE_POLICY)
                .send()
                .await
                .unwrap();
        }
        self.key_for(name).await
    }

    async fn key_for(&self, name: &str) -> (String, String) {
        let out = self
            .admin
            .create_access_key()
            .user_name(name)
            .send()
            .await
            .unwrap();
        let key = out.access_key().unwrap();
        (
            key.access_key_id().to_owned(),
            key.secret_access_key().to_owned(),
        )
    }

    /// The user's key ids, as IAM lists them.
    async fn keys_of(&self, name: &str) -> Vec<String> {
        let out = self
            .admin
            .list_access_keys()
            .user_name(name)
            .send()
            .await
            .unwrap();
        out.access_key_metadata()
            .iter()
            .map(|k| k.access_key_id().unwrap().to_owned())
            .collect()
    }

    /// The ARN STS answers for this key, or its error code.
    async fn whoami(&self, id: &str, secret: &str) -> Result<String, String> {
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new(id, secret, None, None, "test"))
            .build();
        aws_sdk_sts::Client::from_conf(config)
            .get_caller_identity()
            .send()
            .await
            .map(|out| out.arn().unwrap_or_default().to_owned())
            .map_err(|e| match &e {
                // moto's authentication errors wrap the error in an `<Errors>` element the
                // SDK does not read; the code is still in the body.
                aws_sdk_sts::error::SdkError::ServiceError(service) => {
                    let body =
                        String::from_utf8_lossy(service.raw().body().bytes().unwrap_or_default());
                    body.split_once("<Code>")
                        .and_then(|(_, rest)| rest.split_once("</Code>"))
                        .map_or_else(|| body.to_string(), |(code, _)| code.to_owned())
                }
                other => aws_sdk_sts::error::DisplayErrorContext(other).to_string(),
            })
    }
}

fn iam_client(endpoint: &str, id: &str, secret: &str) -> aws_sdk_iam::Client {
    let config = aws_sdk_iam::Config::builder()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(id, secret, None, None, "test"))
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

/// The credentials file as the test writes it: the daemon's profile among another one and a
/// comment, which every rewrite must keep byte for byte.
fn credentials_text(profile: &str, id: &str, secret: &str) -> String {
    format!(
        "# the daemon's key; hands off\n[other]\naws_access_key_id = AKIAOTHEROTHER000000\naws_secret_access_key = other/secret\nregion = eu-west-1\n\n[{profile}]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n; trailing comment\n"
    )
}

/// A host's credentials file (0600, in a directory of its own) and the config naming it.
struct Host {
    _dir: tempfile::TempDir,
    path: PathBuf,
    config: AccessKeyConfig,
}

impl Host {
    fn new(id: &str, secret: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(&path, credentials_text("broker", id, secret)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = AccessKeyConfig {
            credentials_file: path.clone(),
            profile: "broker".into(),
            rotate_every: None,
            iam_endpoint_url: None,
        };
        Host {
            _dir: dir,
            path,
            config,
        }
    }

    fn for_moto(id: &str, secret: &str, moto: &Moto) -> Host {
        let mut host = Host::new(id, secret);
        host.config.iam_endpoint_url = Some(moto.endpoint.clone());
        host
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    /// The key id and secret in the daemon's profile now.
    fn key(&self) -> (String, String) {
        let text = self.text();
        let section = text.split("[broker]").nth(1).unwrap();
        let value = |name: &str| {
            section
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} = ")))
                .unwrap()
                .to_owned()
        };
        (value("aws_access_key_id"), value("aws_secret_access_key"))
    }
}

/// Everything logged in this test binary, for the secret-leak checks. One global subscriber,
/// not one per test: tracing caches whether a log line is wanted per call site, and a line
/// first reached on another test's thread could be missed by a thread-local one.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_rotation_replaces_the_key_in_the_file_in_iam_and_in_the_sdk() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (old_id, old_secret) = moto.user("broker", true).await;
    let host = Host::for_moto(&old_id, &old_secret, &moto);
    let logs = logs();

    let source = AccessKeySource::load(&host.config).unwrap();
    assert_eq!(source.key_id(), old_id);
    let sts = moto.sts_config();
    let clients = Clients::new(&source, &sts);
    let reconciled = source.reconcile(&clients).await.unwrap();
    assert!(reconciled.deleted.is_empty(), "{reconciled:?}");
    let age = source.key_age(&clients).await.unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");

    // The daemon's STS client, as the owner builds it: it signs with the source and has
    // signed once before the rotation (a cache would now hold the old key).
    let daemon_sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&source.sdk_config(&sts))
            .endpoint_url(&moto.endpoint)
            .build(),
    );
    let before = daemon_sts.get_caller_identity().send().await.unwrap();
    assert_eq!(before.arn(), Some("arn:aws:iam::123456789012:user/broker"));

    let rotation = source.rotate(&clients).await.unwrap();
    let Rotation {
        user,
        old_key_id,
        new_key_id,
    } = rotation.clone();
    assert_eq!(
        (user.as_str(), old_key_id.as_str()),
        ("broker", old_id.as_str())
    );
    assert_ne!(new_key_id, old_id);

    // The file: the new key, every other byte as it was, still 0600.
    let (file_id, file_secret) = host.key();
    assert_eq!(file_id, new_key_id);
    assert_eq!(
        host.text(),
        credentials_text("broker", &file_id, &file_secret)
    );
    let mode = std::fs::metadata(&host.path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_dir(host.path.parent().unwrap())
            .unwrap()
            .count(),
        1,
        "no temporary file left beside it"
    );

    // IAM: only the new key; STS: the old key is refused, the new one works.
    assert_eq!(moto.keys_of("broker").await, [new_key_id.as_str()]);
    assert_eq!(
        moto.whoami(&old_id, &old_secret).await,
        Err("InvalidClientTokenId".to_owned()),
        "the deleted key must stop working"
    );
    assert!(moto.whoami(&file_id, &file_secret).await.is_ok());

    // The provider and the SDK client built on it answer the new key at once.
    let answered = source.provide_credentials().await.unwrap();
    assert_eq!(
        (answered.access_key_id(), answered.secret_access_key()),
        (file_id.as_str(), file_secret.as_str())
    );
    assert_eq!(answered.expiry(), None);
    assert_eq!(source.key_id(), new_key_id);
    let after = daemon_sts.get_caller_identity().send().await.unwrap();
    assert_eq!(after.arn(), before.arn());

    // A second rotation from the rotated state works as well.
    let second = source.rotate(&clients).await.unwrap();
    assert_eq!(second.old_key_id, new_key_id);
    assert_eq!(moto.keys_of("broker").await, [second.new_key_id.as_str()]);

    // No secret in the logs, the Debug output or the rotation record.
    let printed = format!("{source:?} {rotation:?} {second:?} {}", logs.text());
    let (_, last_secret) = host.key();
    for secret in [&old_secret, &file_secret, &last_secret] {
        assert!(!printed.contains(secret.as_str()), "{printed}");
    }
    let rotated = format!("new_key={}", key_hint(&new_key_id));
    assert!(
        logs.text().contains(&rotated),
        "{rotated} not in:\n{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_crash_after_any_step_leaves_a_working_key_and_load_and_reconcile_leave_one() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let sts = moto.sts_config();
    for (i, stop_at) in Step::ALL.into_iter().enumerate() {
        let name = format!("crash-{i}");
        let (old_id, old_secret) = moto.user(&name, true).await;
        let host = Host::for_moto(&old_id, &old_secret, &moto);

        let source = AccessKeySource::load(&host.config).unwrap();
        let clients = Clients::new(&source, &sts);
        let interrupted = source
            .rotate_with(&clients, |step| {
                if step == stop_at {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await;
        assert!(
            matches!(interrupted, Err(AccessKeyError::Interrupted { step }) if step == stop_at),
            "{stop_at:?}: {interrupted:?}"
        );
        // The process is gone: nothing of it survives but the file and IAM.
        drop((source, clients));

        // Even before any repair, the file's key works.
        let (file_id, file_secret) = host.key();
        assert!(
            moto.whoami(&file_id, &file_secret).await.is_ok(),
            "{stop_at:?}: the file's key does not work"
        );
        let written = matches!(stop_at, Step::FileWritten | Step::Switched);
        assert_eq!(file_id == old_id, !written, "{stop_at:?}");
        let spare = moto.keys_of(&name).await.len() - 1;
        assert_eq!(
            spare,
            usize::from(stop_at != Step::UserFound),
            "{stop_at:?}"
        );

        // The next start: load + reconcile leave exactly the file's key.
        let source = AccessKeySource::load(&host.config).unwrap();
        assert_eq!(source.key_id(), file_id);
        let clients = Clients::new(&source, &sts);
        let reconciled = source.reconcile(&clients).await.unwrap();
        assert_eq!(reconciled.key_id, file_id, "{stop_at:?}");
        assert_eq!(reconciled.deleted.len(), spare, "{stop_at:?}");
        assert_eq!(moto.keys_of(&name).await, [file_id.as_str()], "{stop_at:?}");
        assert!(moto.whoami(&file_id, &file_secret).await.is_ok());
        for deleted in &reconciled.deleted {
            assert_ne!(*deleted, file_id);
        }

        // And the daemon rotates normally from there.
        let rotation = source.rotate(&clients).await.unwrap();
        assert_eq!(rotation.old_key_id, file_id);
        assert_eq!(moto.keys_of(&name).await, [rotation.new_key_id.as_str()]);
        assert_eq!(host.key().0, rotation.new_key_id);
    }
}

#[tokio::test]
async fn a_leftover_key_is_deleted_before_rotating_and_the_files_key_never() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (id, secret) = moto.user("leftover", true).await;
    // A key made by a rotation that crashed before writing the file: the user is at IAM's
    // limit of two, so CreateAccessKey would fail without the cleanup.
    let (spare, _) = moto.key_for("leftover").await;
    let host = Host::for_moto(&id, &secret, &moto);
    let source = AccessKeySource::load(&host.config).unwrap();
    let clients = Clients::new(&source, &moto.sts_config());
    let rotation = source.rotate(&clients).await.unwrap();
    let keys = moto.keys_of("leftover").await;
    assert_eq!(keys, [rotation.new_key_id.as_str()]);
    assert!(!keys.contains(&spare));
    assert_eq!(host.key().0, rotation.new_key_id);
}

#[tokio::test]
async fn when_the_files_key_fails_nothing_is_deleted() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (id, secret) = moto.user("broken", true).await;
    let (other, _) = moto.key_for("broken").await;
    let host = Host::for_moto(&id, &secret, &moto);
    let source = AccessKeySource::load(&host.config).unwrap();
    let clients = Clients::new(&source, &moto.sts_config());
    // Someone deleted the file's key: the other key may be the only one left that works.
    moto.admin
        .delete_access_key()
        .user_name("broken")
        .access_key_id(&id)
        .send()
        .await
        .unwrap();
    let e = source.reconcile(&clients).await.unwrap_err();
    assert!(matches!(e, AccessKeyError::FileKeyFails { .. }), "{e}");
    // moto's authentication errors come in a body the SDK does not read: only the status.
    assert!(e.to_string().contains("HTTP 403"), "{e}");
    assert!(source.rotate(&clients).await.is_err());
    assert_eq!(moto.keys_of("broken").await, [other]);
    assert_eq!(host.key().0, id, "the file is left alone");
}

#[tokio::test]
async fn without_permission_the_rotation_fails_and_changes_nothing() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (id, secret) = moto.user("no-iam", false).await;
    let host = Host::for_moto(&id, &secret, &moto);
    let before = host.text();
    let source = AccessKeySource::load(&host.config).unwrap();
    let clients = Clients::new(&source, &moto.sts_config());
    let e = source.rotate(&clients).await.unwrap_err();
    assert!(
        matches!(&e, AccessKeyError::Aws { call: "iam:ListAccessKeys", detail } if detail.contains("HTTP 403")),
        "{e}"
    );
    assert!(!e.to_string().contains(&secret));
    assert_eq!(host.text(), before);
    assert_eq!(source.key_id(), id);
    assert_eq!(moto.keys_of("no-iam").await, [id.as_str()]);
    assert!(moto.whoami(&id, &secret).await.is_ok());
}

#[tokio::test]
async fn the_rotation_loop_rotates_a_due_key_and_stops_on_shutdown() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let (id, secret) = moto.user("looping", true).await;
    let host = Host::for_moto(&id, &secret, &moto);
    let source = AccessKeySource::load(&host.config).unwrap();
    let clients = Clients::new(&source, &moto.sts_config());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    // Due at once, and again as soon as it is rotated: the loop runs until told to stop.
    let task = tokio::spawn(source.clone().run_rotation(
        clients,
        Duration::ZERO,
        move |outcome: &Result<Rotation, AccessKeyError>| {
            let mut seen = seen.lock().unwrap();
            seen.push(match outcome {
                Ok(rotation) => Ok(rotation.clone()),
                Err(e) => Err(e.to_string()),
            });
            if seen.len() == 2 {
                let _ = done_tx.take().map(|tx| tx.send(()));
            }
        },
        async move {
            let _ = done_rx.await;
        },
    ));
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the loop stops on shutdown")
        .unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    let first = outcomes[0].as_ref().unwrap();
    let second = outcomes[1].as_ref().unwrap();
    assert_eq!(first.old_key_id, id);
    assert_eq!(second.old_key_id, first.new_key_id);
    assert_eq!(source.key_id(), second.new_key_id);
    assert_eq!(host.key().0, second.new_key_id);
    assert_eq!(moto.keys_of("looping").await, [second.new_key_id.as_str()]);
}

const ID: &str = "AKIAIOSFODNN7EXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

#[test]
fn a_file_others_could_read_or_write_is_refused_naming_path_and_mode() {
    let host = Host::new(ID, SECRET);
    for mode in [0o640, 0o604, 0o620, 0o660, 0o644] {
        std::fs::set_permissions(&host.path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = AccessKeySource::load(&host.config).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, AccessKeyError::Exposed { .. }), "{text}");
        assert!(
            text.contains(&host.path.display().to_string())
                && text.contains(&format!("mode {mode:04o}")),
            "{text}"
        );
        assert!(!format!("{text} {e:?}").contains(SECRET));
    }
    std::fs::set_permissions(&host.path, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert!(AccessKeySource::load(&host.config).is_ok(), "0400 is fine");
}

#[test]
fn a_file_of_another_user_a_link_or_an_open_directory_is_refused() {
    let host = Host::new(ID, SECRET);
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(&host.path, Some(nix::unistd::Uid::from_raw(4000002)), None).unwrap();
        let e = AccessKeySource::load(&host.config).unwrap_err();
        assert!(
            matches!(e, AccessKeyError::NotOwn { uid: 4000002, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("owned by uid 4000002"), "{e}");
        nix::unistd::chown(&host.path, Some(nix::unistd::geteuid()), None).unwrap();
    }
    let dir = host.path.parent().unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&host.path, &link).unwrap();
    let mut config = host.config.clone();
    config.credentials_file = link;
    let e = AccessKeySource::load(&config).unwrap_err();
    assert!(matches!(e, AccessKeyError::Symlink { .. }), "{e}");

    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = AccessKeySource::load(&host.config).unwrap_err();
    assert!(e.to_string().contains("writable by others"), "{e}");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn format_problems_are_named_without_the_secret() {
    let host = Host::new(ID, SECRET);
    let mut config = host.config.clone();
    config.profile = "missing".into();
    let e = AccessKeySource::load(&config).unwrap_err();
    assert!(e.to_string().contains("has no profile [missing]"), "{e}");

    std::fs::write(
        &host.path,
        format!(
            "{}aws_session_token = {SECRET}\n",
            credentials_text("broker", ID, SECRET)
        ),
    )
    .unwrap();
    let e = AccessKeySource::load(&host.config).unwrap_err();
    let printed = format!("{e} {e:?}");
    assert!(printed.contains("temporary session"), "{printed}");
    assert!(!printed.contains(SECRET), "{printed}");
}

#[tokio::test]
async fn the_source_answers_its_key_and_never_prints_the_secret() {
    let host = Host::new(ID, SECRET);
    let source = AccessKeySource::load(&host.config).unwrap();
    assert_eq!(source.key_id(), ID);
    let credentials = source.provide_credentials().await.unwrap();
    assert_eq!(credentials.access_key_id(), ID);
    assert_eq!(credentials.secret_access_key(), SECRET);
    assert_eq!(credentials.session_token(), None);
    assert_eq!(credentials.expiry(), None);
    let printed = format!("{source:?} {source:#?} {credentials:?}");
    assert!(!printed.contains(SECRET), "{printed}");
    let debug = format!("{source:?}");
    assert!(
        !debug.contains(ID),
        "only the key id's last characters: {debug}"
    );
    assert!(debug.contains("…MPLE"), "{debug}");
}

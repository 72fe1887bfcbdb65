//! The container credentials endpoint in process: the token in an app's file opens that app's
//! credentials and nothing else; missing, unknown, stale and other-app tokens are refused with
//! the JSON errors SDKs parse; rotation (scheduled, requested, by reload) moves the file and
//! the daemon together.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{RawResponse, TestDaemon, send_raw};
use imds_broker::config::Config;
use serde_json::Value;

fn config_text(state_dir: &Path, extra_container: &str) -> String {
    let me = nix::unistd::geteuid().as_raw();
    let tokens = state_dir.with_file_name("tokens");
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
{extra_container}

[[app]]
name = "app-a"
role_arn = "arn:aws:iam::111122223333:role/app-a"
match = {{ uid = 4000001 }}
container = {{ uid = {me} }}

[[app]]
name = "app-b"
role_arn = "arn:aws:iam::444455556666:role/app-b"
match = {{ uid = 4000002 }}
container = {{ uid = {me} }}

[[app]]
name = "imds-only"
role_arn = "arn:aws:iam::111122223333:role/imds-only"
match = {{ uid = 4000003 }}
"#,
        state = state_dir.display(),
        tokens = tokens.display(),
    )
}

fn token_file(daemon: &TestDaemon, app: &str) -> PathBuf {
    daemon
        .state
        .config()
        .apps
        .iter()
        .find(|a| a.name == app)
        .and_then(|a| a.container.as_ref())
        .unwrap()
        .token_file
        .clone()
}

fn token(daemon: &TestDaemon, app: &str) -> String {
    std::fs::read_to_string(token_file(daemon, app)).unwrap()
}

async fn get(daemon: &TestDaemon, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let addr = daemon.container_addr.expect("container endpoint");
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("Connection: close\r\n\r\n");
    send_raw(addr, raw.as_bytes()).await
}

async fn with_token(daemon: &TestDaemon, path: &str, token: &str) -> RawResponse {
    get(daemon, path, &[("Authorization", token)]).await
}

fn json(r: &RawResponse) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {r:?}"))
}

/// An error the Go SDK (lowercase) and the JS SDK (capitalised) can both read.
fn assert_error(r: &RawResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = json(r);
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["Code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(body["message"], body["Message"]);
}

#[tokio::test]
async fn the_token_in_an_apps_file_opens_that_apps_credentials() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    let a = token(&daemon, "app-a");
    for path in ["/v1/credentials", "/v1/credentials/app-a"] {
        let r = with_token(&daemon, path, &a).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let doc = json(&r);
        for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
            assert!(doc[field].is_string(), "{field} in {doc}");
        }
        assert!(
            doc.get("Code").is_none(),
            "Rust rejects a Code other than Success"
        );
        assert_eq!(doc["RoleArn"], "arn:aws:iam::111122223333:role/app-a");
        assert_eq!(doc["AccountId"], "111122223333");
        let expiration = doc["Expiration"].as_str().unwrap();
        assert_eq!(expiration.len(), 20, "{expiration}");
        assert!(expiration.ends_with('Z'));
    }
    let b = with_token(&daemon, "/v1/credentials", &token(&daemon, "app-b")).await;
    assert_eq!(json(&b)["AccountId"], "444455556666");
    let inputs = daemon.sts.inputs();
    assert_eq!(inputs.len(), 2, "one AssumeRole per app: {inputs:?}");
    assert!(inputs.iter().any(|c| c.role_arn.role_name() == "app-a"));
    assert!(inputs.iter().any(|c| c.role_arn.role_name() == "app-b"));
    daemon.stop().await;
}

#[tokio::test]
async fn token_files_are_the_apps_alone_and_have_no_newline() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    let file = token_file(&daemon, "app-a");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o400);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    let dir = std::fs::metadata(file.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o711, "others may not list the tokens");
    let a = token(&daemon, "app-a");
    assert!(a.bytes().all(|b| b.is_ascii_graphic()), "{a:?}");
    assert!(a.len() >= 40);
    assert_ne!(a, token(&daemon, "app-b"));
    assert!(
        !file.with_file_name("imds-only.token").exists(),
        "no [app.container], no token"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn missing_unknown_and_other_apps_tokens_are_refused() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    assert_error(
        &get(&daemon, "/v1/credentials", &[]).await,
        401,
        "Unauthorized",
    );
    assert_error(
        &with_token(&daemon, "/v1/credentials", "ibct_made-up").await,
        403,
        "AccessDenied",
    );
    let a = token(&daemon, "app-a");
    // A prefix, or the token with something after it, is another token.
    assert_error(
        &with_token(&daemon, "/v1/credentials", &a[..a.len() - 1]).await,
        403,
        "AccessDenied",
    );
    assert_error(
        &with_token(&daemon, "/v1/credentials", &format!("Bearer {a}")).await,
        403,
        "AccessDenied",
    );
    assert_error(
        &with_token(&daemon, "/v1/credentials/app-b", &a).await,
        403,
        "AccessDenied",
    );
    assert_error(
        &with_token(&daemon, "/v1/credentials/imds-only", &a).await,
        403,
        "AccessDenied",
    );
    let twice = get(
        &daemon,
        "/v1/credentials",
        &[("Authorization", &a), ("Authorization", &a)],
    )
    .await;
    assert_error(&twice, 403, "AccessDenied");
    assert_eq!(daemon.sts.calls(), 0, "nothing refused reached STS");
    daemon.stop().await;
}

#[tokio::test]
async fn relayed_browser_and_rebound_requests_are_refused() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    let a = token(&daemon, "app-a");
    for header in [
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.1"),
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Mode", "cors"),
    ] {
        let r = get(&daemon, "/v1/credentials", &[("Authorization", &a), header]).await;
        assert_error(&r, 403, "AccessDenied");
    }
    let addr = daemon.container_addr.unwrap();
    let rebound = send_raw(
        addr,
        format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: evil.example\r\nAuthorization: {a}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_error(&rebound, 403, "AccessDenied");
    for host in ["localhost", "169.254.170.23", "127.0.0.1"] {
        let r = send_raw(
            addr,
            format!(
                "GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\nAuthorization: {a}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "Host {host}: {r:?}");
    }
    let post = send_raw(
        addr,
        format!(
            "POST /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_error(&post, 405, "MethodNotAllowed");
    assert_error(
        &with_token(&daemon, "/latest/meta-data/", &a).await,
        404,
        "NotFound",
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_requested_rotation_revokes_the_old_token_at_once() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    let (old_a, b) = (token(&daemon, "app-a"), token(&daemon, "app-b"));
    let tokens = daemon.state.container_tokens().unwrap().clone();
    let rotation = tokens.rotate("app-a", daemon.state.moment()).unwrap();
    assert!(rotation.result.is_ok());
    let new_a = token(&daemon, "app-a");
    assert_ne!(new_a, old_a);
    assert_error(
        &with_token(&daemon, "/v1/credentials", &old_a).await,
        403,
        "AccessDenied",
    );
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &new_a).await.status,
        200
    );
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &b).await.status,
        200,
        "other apps keep their tokens"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn scheduled_rotation_replaces_the_file_and_honours_the_grace_period() {
    let daemon =
        TestDaemon::start(|dir| config_text(dir, "rotate_every = \"10m\"\ngrace = \"1m\"")).await;
    let tokens = daemon.state.container_tokens().unwrap().clone();
    let mut changes = tokens.subscribe();
    let before = *changes.borrow_and_update();
    let old = token(&daemon, "app-a");
    // The rotation task checks the (hand-moved) clock at least once a minute of real time; a
    // reload wakes nothing, so move the clock and let the task find the tokens due.
    daemon.clock.advance(Duration::from_secs(10 * 60));
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(61)).await;
    tokio::time::resume();
    // Both apps are due: two changes.
    tokio::time::timeout(
        Duration::from_secs(10),
        changes.wait_for(|n| *n >= before + 2),
    )
    .await
    .expect("scheduled rotations")
    .unwrap();
    let new = token(&daemon, "app-a");
    assert_ne!(new, old);
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &new).await.status,
        200
    );
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &old).await.status,
        200,
        "within the grace period"
    );
    daemon.clock.advance(Duration::from_secs(61));
    assert_error(
        &with_token(&daemon, "/v1/credentials", &old).await,
        403,
        "AccessDenied",
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_reload_issues_tokens_for_new_apps_and_withdraws_removed_ones() {
    let daemon = TestDaemon::start(|dir| config_text(dir, "")).await;
    let a = token(&daemon, "app-a");
    let b_file = token_file(&daemon, "app-b");
    let b = token(&daemon, "app-b");
    let state_dir = daemon.dir.path().join("state");
    let me = nix::unistd::geteuid().as_raw();
    let text = config_text(&state_dir, "")
        .replace(
            &format!("match = {{ uid = 4000002 }}\ncontainer = {{ uid = {me} }}"),
            "match = { uid = 4000002 }",
        )
        .replace(
            "match = { uid = 4000003 }",
            &format!("match = {{ uid = 4000003 }}\ncontainer = {{ uid = {me} }}"),
        );
    let config = Config::parse(&text, Path::new("reload.toml")).unwrap();
    daemon.state.apply_config(config);
    assert!(!b_file.exists(), "a removed app's token file is deleted");
    assert_error(
        &with_token(&daemon, "/v1/credentials", &b).await,
        403,
        "AccessDenied",
    );
    let fresh = token(&daemon, "imds-only");
    assert_eq!(
        with_token(&daemon, "/v1/credentials/imds-only", &fresh)
            .await
            .status,
        200
    );
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &a).await.status,
        200,
        "an unchanged app keeps its token"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn tokens_survive_a_daemon_restart() {
    let first = TestDaemon::start(|dir| config_text(dir, "")).await;
    let a = token(&first, "app-a");
    let dir: Arc<tempfile::TempDir> = first.dir.clone();
    let (clock, sts) = (first.clock.clone(), first.sts.clone());
    first.stop().await;
    let second = TestDaemon::start_with(dir, |d| config_text(d, ""), clock, sts).await;
    assert_eq!(token(&second, "app-a"), a, "the file was not rewritten");
    assert_eq!(with_token(&second, "/v1/credentials", &a).await.status, 200);
    second.stop().await;
}

#[test]
fn a_container_app_needs_the_endpoint_and_an_owner() {
    let base = |container: &str, app: &str| {
        format!(
            "[sts]\nregion = \"us-east-1\"\n{container}\n[[app]]\nname = \"x\"\nrole_arn = \"arn:aws:iam::111122223333:role/x\"\n{app}\n"
        )
    };
    let err = |text: String| {
        Config::parse(&text, Path::new("c.toml"))
            .unwrap_err()
            .to_string()
    };
    let e = err(base("", "match = { uid = 5 }\ncontainer = {}"));
    assert!(e.contains("add a [container] section"), "{e}");
    let e = err(base(
        "[container]\nlisten = [\"127.0.0.1:8023\"]",
        "match = { systemd_unit = \"x.service\" }\ncontainer = {}",
    ));
    assert!(e.contains("needs uid or user"), "{e}");
    let e = err(base(
        "[container]\nlisten = [\"127.0.0.1:8023\"]\nrotate_every = \"10s\"",
        "match = { uid = 5 }\ncontainer = {}",
    ));
    assert!(e.contains("container.rotate_every"), "{e}");
    let e = err(base(
        "[container]\nlisten = [\"127.0.0.1:8023\"]",
        "match = { uid = 5 }\ncontainer = { token_file = \"relative\" }",
    ));
    assert!(e.contains("absolute file path"), "{e}");
    let ok = Config::parse(
        &base(
            "[container]\nlisten = [\"127.0.0.1:8023\"]",
            "match = { uid = 5 }\ncontainer = {}",
        ),
        Path::new("c.toml"),
    )
    .unwrap();
    let c = ok.apps[0].container.as_ref().unwrap();
    assert_eq!(c.uid, 5);
    assert_eq!(
        c.token_file,
        PathBuf::from("/run/imds-broker-tokens/x.token")
    );
}

#[test]
fn two_apps_cannot_share_a_token_file() {
    let text = "[sts]\nregion = \"us-east-1\"\n[container]\nlisten = [\"127.0.0.1:8023\"]\n\
        [[app]]\nname = \"x\"\nrole_arn = \"arn:aws:iam::111122223333:role/x\"\nmatch = { uid = 5 }\ncontainer = { token_file = \"/t/f\" }\n\
        [[app]]\nname = \"y\"\nrole_arn = \"arn:aws:iam::111122223333:role/y\"\nmatch = { uid = 6 }\ncontainer = { token_file = \"/t/f\" }\n";
    let e = Config::parse(text, Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("token file too"), "{e}");
}

#[tokio::test]
async fn an_app_without_a_match_rule_is_served_on_the_container_endpoint_only() {
    let me = nix::unistd::geteuid().as_raw();
    let daemon = TestDaemon::start(|dir| {
        format!(
            "{}\n[[app]]\nname = \"ctr-only\"\nrole_arn = \"arn:aws:iam::111122223333:role/ctr-only\"\ncontainer = {{ uid = {me} }}\n",
            config_text(dir, "")
        )
    })
    .await;
    let config = daemon.state.config();
    assert!(
        config
            .apps
            .iter()
            .any(|a| a.name == "ctr-only" && a.matcher.is_none())
    );
    let doc = with_token(&daemon, "/v1/credentials", &token(&daemon, "ctr-only")).await;
    assert_eq!(
        json(&doc)["RoleArn"],
        "arn:aws:iam::111122223333:role/ctr-only"
    );
    // Over IMDS this process (uid `me`) matches no rule: the rule-less app is not a catch-all.
    let imds_token = daemon.token(60).await;
    let listing = daemon
        .get("/latest/meta-data/iam/security-credentials/", &imds_token)
        .await;
    assert_eq!(listing.status, 404, "{listing:?}");
    let (report, matched) = imds_broker::explain::report(
        &config,
        &imds_broker::identity::Caller::local_uid(me, "127.0.0.1:1".parse().unwrap()),
    );
    assert!(!matched, "{report}");
    assert!(report.contains("container endpoint only"), "{report}");
    daemon.stop().await;
}

#[test]
fn only_a_container_app_may_go_without_a_match_rule() {
    let text = "[sts]\nregion = \"us-east-1\"\n[[app]]\nname = \"x\"\nrole_arn = \"arn:aws:iam::111122223333:role/x\"\n";
    let e = Config::parse(text, Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("app[0].match") && e.contains("needs a match table"),
        "{e}"
    );
}

// Token files under directories others control. The app's user (`APP_UID`) owns a directory
// on the way to its token file, so it can rename what is in it; the daemon must not write (or
// remove) anything wherever that leads. The tests act as that user through `setpriv`.

const APP_UID: u32 = 4000001;

/// Everything logged on this thread while it lives: the tests' runtime is single-threaded and
/// `apply_config` (a reload) runs on the test's thread.
struct LogCapture {
    buf: Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn start() -> Self {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        Self {
            buf,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// Runs `script` with `sh` as `uid` (and gid `uid`, no supplementary groups).
fn as_user(uid: u32, script: &str) {
    let status = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--", "sh", "-ec", script])
        .status()
        .expect("setpriv runs");
    assert!(status.success(), "as uid {uid}: {script}");
}

/// A fresh root-owned directory (0755) for token files: outside the daemon's temp dir, which is
/// 0700.
fn token_base() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    base
}

fn mkdir(path: &Path, mode: u32, owner: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(owner)), None).unwrap();
}

/// `config_text` with `token_file` settings for app-a and app-b (`None`: the default file).
fn with_token_files(state_dir: &Path, a: Option<&Path>, b: Option<&Path>) -> String {
    let me = nix::unistd::geteuid().as_raw();
    let plain = format!("container = {{ uid = {me} }}");
    let mut text = config_text(state_dir, "");
    for (app, file) in [("app-a", a), ("app-b", b)] {
        if let Some(file) = file {
            let rule = format!("name = \"{app}\"");
            let at = text.find(&rule).unwrap();
            let offset = at + text[at..].find(&plain).unwrap();
            text.replace_range(
                offset..offset + plain.len(),
                &format!(
                    "container = {{ uid = {me}, token_file = \"{}\" }}",
                    file.display()
                ),
            );
        }
    }
    text
}

fn reload(daemon: &TestDaemon, text: &str) {
    daemon
        .state
        .apply_config(Config::parse(text, Path::new("reload.toml")).unwrap());
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn a_parent_swapped_for_a_link_cannot_put_a_token_file_in_a_root_only_directory() {
    let base = token_base();
    let root_only = base.path().join("root-only");
    mkdir(&root_only, 0o700, 0);
    let app_dir = base.path().join("app");
    mkdir(&app_dir, 0o755, APP_UID);
    let tokens = app_dir.join("tokens");
    mkdir(&tokens, 0o755, APP_UID);
    let file = tokens.join("app-a.token");
    let log = LogCapture::start();
    let text = |d: &Path| with_token_files(d, Some(&file), None);
    let daemon = TestDaemon::start(text).await;
    // The app's user swaps its token directory for a link to the root-only one, then the
    // operator reloads (the same file) and asks for a new token.
    as_user(
        APP_UID,
        &format!(
            "mv '{t}' '{t}.old' && ln -s '{r}' '{t}'",
            t = tokens.display(),
            r = root_only.display()
        ),
    );
    reload(&daemon, &text(&daemon.dir.path().join("state")));
    let store = daemon.state.container_tokens().unwrap().clone();
    let rotation = store.rotate("app-a", daemon.state.moment());
    assert_eq!(
        entries(&root_only),
        Vec::<String>::new(),
        "nothing was created in the root-only directory"
    );
    assert!(
        rotation.is_none(),
        "app-a has no token to rotate: {rotation:?}"
    );
    assert!(
        store.status().iter().all(|s| s.app != "app-a"),
        "app-a has no token it could read"
    );
    let logged = log.text();
    let why = format!("{}: owned by uid {APP_UID}", app_dir.display());
    assert!(
        logged
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("app-a") && l.contains(&why)),
        "{logged}"
    );
    // The other app is untouched.
    assert_eq!(
        with_token(&daemon, "/v1/credentials", &token(&daemon, "app-b"))
            .await
            .status,
        200
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_link_to_another_apps_token_file_does_not_get_it_overwritten() {
    let base = token_base();
    // app-b's token directory is root's; app-a's is under a directory its user owns.
    let b_dir = base.path().join("b");
    mkdir(&b_dir, 0o755, 0);
    let b_file = b_dir.join("app.token");
    let shared = base.path().join("shared");
    mkdir(&shared, 0o755, APP_UID);
    let a_dir = shared.join("a");
    mkdir(&a_dir, 0o755, APP_UID);
    let a_file = a_dir.join("app.token");
    let log = LogCapture::start();
    let text = |d: &Path| with_token_files(d, Some(&a_file), Some(&b_file));
    let daemon = TestDaemon::start(text).await;
    let b = std::fs::read_to_string(&b_file).unwrap();
    let b_inode = std::fs::metadata(&b_file).unwrap().ino();
    let store = daemon.state.container_tokens().unwrap().clone();
    // Its directory, then (that undone) the file itself, becomes a link to app-b's.
    for script in [
        format!(
            "mv '{a}' '{a}.old' && ln -s '{b}' '{a}'",
            a = a_dir.display(),
            b = b_dir.display()
        ),
        format!(
            "rm '{a}' && mv '{a}.old' '{a}' && rm -f '{f}' && ln -s '{g}' '{f}'",
            a = a_dir.display(),
            f = a_file.display(),
            g = b_file.display()
        ),
    ] {
        as_user(APP_UID, &script);
        reload(&daemon, &text(&daemon.dir.path().join("state")));
        let rotation = store.rotate("app-a", daemon.state.moment());
        assert_eq!(
            std::fs::read_to_string(&b_file).unwrap(),
            b,
            "after {script}"
        );
        assert_eq!(std::fs::metadata(&b_file).unwrap().ino(), b_inode);
        assert!(
            rotation.is_none(),
            "app-a has no token to rotate: {rotation:?}"
        );
    }
    assert_eq!(with_token(&daemon, "/v1/credentials", &b).await.status, 200);
    assert!(store.status().iter().all(|s| s.app != "app-a"));
    let logged = log.text();
    assert!(
        logged.contains(&format!("{}: owned by uid {APP_UID}", shared.display())),
        "{logged}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_parent_directory_others_can_write_is_refused() {
    let base = token_base();
    // World-writable, and world-writable with the sticky bit (like /tmp).
    let open = base.path().join("open");
    mkdir(&open, 0o777, 0);
    let sticky = base.path().join("sticky");
    mkdir(&sticky, 0o1777, 0);
    let (a_file, b_file) = (open.join("app-a.token"), sticky.join("app-b.token"));
    let log = LogCapture::start();
    let daemon = TestDaemon::start(|d| with_token_files(d, Some(&a_file), Some(&b_file))).await;
    reload(
        &daemon,
        &with_token_files(
            &daemon.dir.path().join("state"),
            Some(&a_file),
            Some(&b_file),
        ),
    );
    assert!(!a_file.exists() && !b_file.exists());
    let store = daemon.state.container_tokens().unwrap();
    assert!(store.status().is_empty(), "{:?}", store.status());
    let logged = log.text();
    for (dir, mode) in [(&open, "777"), (&sticky, "1777")] {
        let why = format!(
            "{}: writable by others (owner uid 0, mode {mode})",
            dir.display()
        );
        assert!(logged.contains(&why), "{why}\n{logged}");
    }
    daemon.stop().await;
}
#[test]
fn check_warns_about_a_token_file_under_a_directory_others_can_write() {
    let base = token_base();
    let open = base.path().join("open");
    mkdir(&open, 0o777, 0);
    let text = with_token_files(
        &base.path().join("state"),
        Some(&open.join("app-a.token")),
        None,
    );
    let path = base.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imds-broker"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().position(|l| l.contains("token_file")).unwrap() + 1;
    let expected = format!("warning: {}:{line}:", path.display());
    assert!(
        stdout.lines().any(|l| l.starts_with(&expected)
            && l.contains("app[0].container.token_file")
            && l.contains(&format!("{}: writable by others", open.display()))),
        "{stdout}"
    );
}

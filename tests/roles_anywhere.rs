//! IAM Roles Anywhere as the daemon's own credential source (`source::roles_anywhere`), against
//! a loopback Roles Anywhere (`tests/e2e/clients/rolesanywhere_server.py`) that verifies each
//! CreateSession as AWS describes it (signature, certificate path to a trust anchor, validity,
//! date window, serial, ARNs) and answers a good one with credentials from moto's STS. The
//! certificates come from `rolesanywhere_certs.py` (a root CA, an intermediate, leaves with RSA
//! 2048, EC P-256 and EC P-384 keys in PKCS#8, PKCS#1 and SEC1). The verifier is itself checked
//! against an independent signer, iam-rolesanywhere-session (`rolesanywhere_reference_client.py`),
//! so the broker's signer and the verifier cannot share a mistake unseen.
//!
//! They need the e2e venv (`tests/run-all.sh` makes `.venv`: cryptography, moto,
//! iam-rolesanywhere-session), or a Python with those named by `IMDS_BROKER_TEST_PYTHON`.
//! Without one the tests are skipped, saying so, except in CI (`CI=true`), where they fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use imds_broker::config::RolesAnywhereConfig;
use imds_broker::source::roles_anywhere::{Clock, KeyKind, RolesAnywhere, RolesAnywhereError};

const TRUST_ANCHOR_ARN: &str = "arn:aws:rolesanywhere:us-east-1:123456789012:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001";
const PROFILE_ARN: &str =
    "arn:aws:rolesanywhere:us-east-1:123456789012:profile/0a1b2c3d-0000-4000-8000-000000000002";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/imds-broker-source";
const REGION: &str = "us-east-1";
/// Until the verifier (and moto in it) has printed its address.
const START_TIMEOUT: Duration = Duration::from_secs(90);

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/clients")
}

/// The Python to run the helpers with, or `None` (after saying why) outside CI.
fn python() -> Option<PathBuf> {
    let python = std::env::var_os("IMDS_BROKER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let works = Command::new(&python)
        .args(["-c", "import cryptography, moto, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} with cryptography, moto and boto3 is needed in CI (tests/run-all.sh makes .venv)",
        python.display()
    );
    eprintln!(
        "skipped: no {} with cryptography, moto and boto3 (run tests/e2e/ensure-venv.sh, or set IMDS_BROKER_TEST_PYTHON)",
        python.display()
    );
    None
}

/// One verifier (with moto inside) and one test PKI for the whole test binary. The verifier
/// stops when its standard input closes, that is when this process ends, however it ends.
struct World {
    python: PathBuf,
    ca: PathBuf,
    endpoint: String,
    sts: String,
    _verifier: Mutex<(Child, ChildStdin)>,
}

fn world() -> Option<&'static World> {
    static WORLD: OnceLock<Option<World>> = OnceLock::new();
    WORLD.get_or_init(start_world).as_ref()
}

fn start_world() -> Option<World> {
    let python = python()?;
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("roles_anywhere");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let ca = root.join("ca");
    run_python(
        &python,
        "rolesanywhere_certs.py",
        &["ca", ca.to_str().unwrap()],
    );

    let stderr = root.join("verifier.err");
    let mut command = Command::new(&python);
    command
        .arg(clients().join("rolesanywhere_server.py"))
        .args(["--trust-anchor", ca.join("ca.pem").to_str().unwrap()])
        .args(["--trust-anchor-arn", TRUST_ANCHOR_ARN])
        .args(["--profile-arn", PROFILE_ARN])
        .args(["--role-arn", ROLE_ARN])
        .args(["--region", REGION, "--moto", "--exit-with-parent"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap());
    hermetic(&mut command);
    let mut child = command.spawn().expect("start rolesanywhere_server.py");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, handshake) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let (mut endpoint, mut sts) = (None, None);
    while endpoint.is_none() {
        let line = handshake.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "the verifier did not start; its stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        if let Some(url) = line.strip_prefix("sts on ") {
            sts = Some(url.to_owned());
        } else if let Some(address) = line.strip_prefix("listening on ") {
            endpoint = Some(format!("http://{address}"));
        }
    }
    Some(World {
        python,
        ca,
        endpoint: endpoint.unwrap(),
        sts: sts.expect("the verifier prints moto's address first"),
        _verifier: Mutex::new((child, stdin)),
    })
}

/// No AWS settings or proxies of this machine reach a helper.
fn hermetic(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("AWS_") || text.to_lowercase().ends_with("_proxy") {
            command.env_remove(&name);
        }
    }
}

fn run_python(python: &Path, script: &str, args: &[&str]) -> String {
    let mut command = Command::new(python);
    command.arg(clients().join(script)).args(args);
    hermetic(&mut command);
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A leaf certificate and its key file, as made by `rolesanywhere_certs.py`.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    serial: String,
    not_after: u64,
    cn: String,
}

#[derive(Clone, Copy)]
struct LeafSpec {
    key: &'static str,
    traditional: bool,
    intermediate: bool,
    expired: bool,
    ec_params: bool,
}

const P256: LeafSpec = LeafSpec {
    key: "p256",
    traditional: false,
    intermediate: false,
    expired: false,
    ec_params: false,
};

impl World {
    fn leaf(&self, dir: &Path, name: &str, spec: LeafSpec) -> Leaf {
        self.leaf_of(&self.ca, dir, name, spec)
    }

    fn leaf_of(&self, ca: &Path, dir: &Path, name: &str, spec: LeafSpec) -> Leaf {
        let mut args = vec![
            "leaf",
            ca.to_str().unwrap(),
            dir.to_str().unwrap(),
            name,
            "--key",
            spec.key,
        ];
        if spec.traditional {
            args.extend(["--format", "traditional"]);
        }
        if spec.intermediate {
            args.extend(["--issuer", "intermediate"]);
        }
        if spec.expired {
            args.push("--expired");
        }
        if spec.ec_params {
            args.push("--ec-params");
        }
        let out: serde_json::Value =
            serde_json::from_str(&run_python(&self.python, "rolesanywhere_certs.py", &args))
                .unwrap();
        Leaf {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            serial: out["serial"].as_str().unwrap().to_owned(),
            not_after: out["not_after"].as_u64().unwrap(),
            cn: out["cn"].as_str().unwrap().to_owned(),
        }
    }

    fn config(&self, leaf: &Leaf, chain: bool) -> RolesAnywhereConfig {
        RolesAnywhereConfig {
            certificate: leaf.cert.clone(),
            certificate_chain: chain.then(|| self.ca.join("intermediate.pem")),
            private_key: leaf.key.clone(),
            trust_anchor_arn: TRUST_ANCHOR_ARN.to_owned(),
            profile_arn: PROFILE_ARN.to_owned(),
            role_arn: ROLE_ARN.parse().unwrap(),
            region: REGION.to_owned(),
            duration: Duration::from_secs(3600),
            endpoint_url: Some(self.endpoint.clone()),
        }
    }

    /// What the verifier saw for `serial`: (accepted, reason), oldest first.
    async fn seen(&self, serial: &str) -> Vec<(bool, String)> {
        let address = self.endpoint.trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = axum::http::Request::get("/verifier/log")
            .header("host", address)
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, body) = imds_broker::http_client::exchange(stream, request)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let log: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        log.iter()
            .filter(|e| e["serial"].as_str() == Some(serial))
            .map(|e| {
                (
                    e["ok"].as_bool().unwrap(),
                    e["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// Moves `from` over `to` in one step, as certbot's and cert-manager's renewals do.
fn replace(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap();
}

#[tokio::test]
async fn every_key_kind_and_encoding_gets_a_session() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, spec, kind, chain) in [
        (
            "rsa-pkcs8",
            LeafSpec {
                key: "rsa2048",
                ..P256
            },
            KeyKind::Rsa,
            false,
        ),
        (
            "rsa-pkcs1",
            LeafSpec {
                key: "rsa2048",
                traditional: true,
                intermediate: true,
                ..P256
            },
            KeyKind::Rsa,
            true,
        ),
        ("p256-pkcs8", P256, KeyKind::EcP256, false),
        (
            "p256-sec1",
            LeafSpec {
                traditional: true,
                ec_params: true,
                ..P256
            },
            KeyKind::EcP256,
            false,
        ),
        (
            "p384-pkcs8",
            LeafSpec {
                key: "p384",
                intermediate: true,
                ..P256
            },
            KeyKind::EcP384,
            true,
        ),
        (
            "p384-sec1",
            LeafSpec {
                key: "p384",
                traditional: true,
                ..P256
            },
            KeyKind::EcP384,
            false,
        ),
    ] {
        let leaf = world.leaf(dir.path(), name, spec);
        let ra = RolesAnywhere::load(&world.config(&leaf, chain)).expect(name);
        assert_eq!(ra.key_kind(), kind, "{name}");
        assert_eq!(ra.serial(), leaf.serial, "{name}");
        assert_eq!(ra.subject_cn().as_deref(), Some(leaf.cn.as_str()), "{name}");
        assert_eq!(unix(ra.not_after()), leaf.not_after, "{name}");
        assert!(!ra.files_changed(), "{name}");

        let credentials = ra
            .create_session()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            credentials.access_key_id().starts_with("ASIA"),
            "{name}: moto's STS issued it"
        );
        assert!(credentials.session_token().is_some());
        let left = credentials
            .expiry()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
            "{name}: {left:?}"
        );
        assert_eq!(
            world.seen(&leaf.serial).await,
            [(true, String::new())],
            "{name}"
        );
    }
}

/// The provider inside an SDK client: the client's identity cache calls it, and STS (moto)
/// recognises the credentials as a session of the profile's role for this certificate.
#[tokio::test]
async fn an_sts_client_calls_with_the_sessions_credentials() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let leaf = world.leaf(dir.path(), "sdk", P256);
    let ra = RolesAnywhere::load(&world.config(&leaf, false)).unwrap();
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new(REGION))
        .endpoint_url(&world.sts)
        .credentials_provider(ra)
        .build();
    let sts = aws_sdk_sts::Client::from_conf(config);
    for _ in 0..2 {
        let me = sts.get_caller_identity().send().await.unwrap();
        assert_eq!(
            me.arn(),
            Some(
                format!(
                    "arn:aws:sts::123456789012:assumed-role/imds-broker-source/ra-{}",
                    leaf.serial
                )
                .as_str()
            )
        );
    }
    assert_eq!(
        world.seen(&leaf.serial).await.len(),
        1,
        "the SDK's cache reuses a session until it nears its expiry"
    );
}

#[tokio::test]
async fn a_private_key_others_can_read_is_refused() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let leaf = world.leaf(dir.path(), "mode", P256);
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = RolesAnywhere::load(&world.config(&leaf, false)).unwrap_err();
        assert!(
            matches!(err, RolesAnywhereError::KeyPermissions { mode: m, .. } if m == mode),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(leaf.key.to_str().unwrap()) && text.contains(&format!("{mode:o}")),
            "{text}"
        );
    }
    std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    RolesAnywhere::load(&world.config(&leaf, false)).expect("0400 is fine");
}

#[tokio::test]
async fn a_key_of_another_certificate_is_refused_on_load_and_on_reload() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mine = world.leaf(dir.path(), "mine", P256);
    let other = world.leaf(dir.path(), "other", P256);
    let rsa = world.leaf(
        dir.path(),
        "rsa",
        LeafSpec {
            key: "rsa2048",
            ..P256
        },
    );

    let mut config = world.config(&mine, false);
    config.private_key = other.key.clone();
    let err = RolesAnywhere::load(&config).unwrap_err();
    assert!(matches!(err, RolesAnywhereError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("public keys differ"), "{err}");
    config.private_key = rsa.key.clone();
    let err = RolesAnywhere::load(&config).unwrap_err();
    assert!(
        err.to_string().contains("EC P-256, the private key is RSA"),
        "{err}"
    );

    let ra = RolesAnywhere::load(&world.config(&mine, false)).unwrap();
    ra.create_session().await.unwrap();
    // The key file is replaced with another certificate's key: the reload is refused, the pair
    // in use stays, and sessions go on with it.
    let stray = dir.path().join("stray.key");
    std::fs::copy(&other.key, &stray).unwrap();
    replace(&stray, &mine.key);
    assert!(ra.files_changed());
    let err = ra.reload().unwrap_err();
    assert!(matches!(err, RolesAnywhereError::Mismatch { .. }), "{err}");
    assert!(
        !ra.files_changed(),
        "a refused version is not retried until it changes again"
    );
    assert_eq!(ra.serial(), mine.serial);
    ra.create_session().await.unwrap();
    assert_eq!(
        world.seen(&mine.serial).await,
        [(true, String::new()), (true, String::new())]
    );
}

#[tokio::test]
async fn a_renewed_pair_is_used_from_the_next_session() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let old = world.leaf(dir.path(), "host", P256);
    let ra = RolesAnywhere::load(&world.config(&old, false)).unwrap();
    ra.create_session().await.unwrap();
    let unchanged = ra.reload().unwrap();
    assert!(!unchanged.replaced);

    // The renewal: a new certificate and key (another kind of key, even), moved into place.
    let renewal = tempfile::tempdir().unwrap();
    let new = world.leaf(
        renewal.path(),
        "host",
        LeafSpec {
            key: "p384",
            ..P256
        },
    );
    replace(&new.cert, &old.cert);
    assert!(ra.files_changed(), "a new certificate file");
    replace(&new.key, &old.key);
    let reloaded = ra.reload().unwrap();
    assert_eq!(reloaded.serial, new.serial);
    assert!(reloaded.replaced);
    assert_eq!(unix(reloaded.not_after), new.not_after);
    assert!(!ra.files_changed());
    assert_eq!(ra.serial(), new.serial);
    assert_eq!(ra.key_kind(), KeyKind::EcP384);

    ra.create_session().await.unwrap();
    assert_eq!(world.seen(&new.serial).await, [(true, String::new())]);
    assert_eq!(
        world.seen(&old.serial).await.len(),
        1,
        "the old one was used once"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused_and_not_asked_again_at_once() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let leaf = world.leaf(
        dir.path(),
        "expired",
        LeafSpec {
            expired: true,
            ..P256
        },
    );
    let ra = RolesAnywhere::load(&world.config(&leaf, false)).unwrap();
    assert!(
        ra.not_after() < SystemTime::now(),
        "visible before any session"
    );

    let err = ra.create_session().await.unwrap_err();
    match &err {
        RolesAnywhereError::Refused { status, message } => {
            assert_eq!(*status, 403);
            assert!(message.contains("has expired"), "{message}");
        }
        other => panic!("{other}"),
    }
    // The pause after a failure: the next call gets the same answer without a request.
    let again = ra.create_session().await.unwrap_err();
    assert!(
        matches!(&again, RolesAnywhereError::Backoff { last, .. } if last.contains("has expired")),
        "{again}"
    );
    let sdk = ra.provide_credentials().await.unwrap_err();
    let causes = std::iter::successors(Some(&sdk as &dyn std::error::Error), |e| e.source());
    assert!(
        causes
            .map(ToString::to_string)
            .any(|c| c.contains("not calling Roles Anywhere again")),
        "{sdk:?}"
    );
    assert_eq!(world.seen(&leaf.serial).await.len(), 1);
}

#[tokio::test]
async fn a_clock_more_than_five_minutes_off_is_refused() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let leaf = world.leaf(dir.path(), "clock", P256);
    let moved = |by: i64| -> Clock {
        std::sync::Arc::new(move || {
            let now = SystemTime::now();
            if by < 0 {
                now - Duration::from_secs(by.unsigned_abs())
            } else {
                now + Duration::from_secs(by as u64)
            }
        })
    };
    let late = RolesAnywhere::load_with_clock(&world.config(&leaf, false), moved(-600)).unwrap();
    let err = late.create_session().await.unwrap_err();
    assert!(err.to_string().contains("more than 5 minutes"), "{err}");
    let skewed = RolesAnywhere::load_with_clock(&world.config(&leaf, false), moved(120)).unwrap();
    skewed
        .create_session()
        .await
        .expect("two minutes is within the window");
}

#[tokio::test]
async fn the_service_refuses_what_it_cannot_trust() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    let refusal = |err: RolesAnywhereError| match err {
        RolesAnywhereError::Refused {
            status: 403,
            message,
        } => message,
        other => panic!("{other}"),
    };

    // Issued by the intermediate, sent without it: no path to the trust anchor.
    let leaf = world.leaf(
        dir.path(),
        "orphan",
        LeafSpec {
            intermediate: true,
            ..P256
        },
    );
    let ra = RolesAnywhere::load(&world.config(&leaf, false)).unwrap();
    let message = refusal(ra.create_session().await.unwrap_err());
    assert!(message.contains("no path to the trust anchor"), "{message}");

    // Issued by another CA, with the same names.
    let other_ca = dir.path().join("other-ca");
    run_python(
        &world.python,
        "rolesanywhere_certs.py",
        &["ca", other_ca.to_str().unwrap()],
    );
    let stranger = world.leaf_of(&other_ca, dir.path(), "stranger", P256);
    let ra = RolesAnywhere::load(&world.config(&stranger, false)).unwrap();
    let message = refusal(ra.create_session().await.unwrap_err());
    assert!(
        message.contains("not signed by the trust anchor"),
        "{message}"
    );

    // Another profile than the trust anchor's: the body carries the configured ARNs.
    let good = world.leaf(dir.path(), "good", P256);
    let mut config = world.config(&good, false);
    config.profile_arn = PROFILE_ARN.replace("000000000002", "000000000009");
    let ra = RolesAnywhere::load(&config).unwrap();
    let message = refusal(ra.create_session().await.unwrap_err());
    assert!(message.contains("profileArn"), "{message}");
}

#[tokio::test]
async fn key_material_never_prints() {
    let Some(world) = world() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("p256", P256),
        (
            "rsa",
            LeafSpec {
                key: "rsa2048",
                traditional: true,
                ..P256
            },
        ),
        (
            "p384",
            LeafSpec {
                key: "p384",
                ..P256
            },
        ),
    ] {
        let leaf = world.leaf(dir.path(), name, spec);
        let pem = std::fs::read_to_string(&leaf.key).unwrap();
        // A distinctive run from the middle of the key's base64, and the key's DER bytes.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let secrets = [
            body[body.len() / 2..body.len() / 2 + 24].to_owned(),
            body[body.len() - 40..body.len() - 16].to_owned(),
        ];
        let mut printed = Vec::new();

        let ra = RolesAnywhere::load(&world.config(&leaf, false)).unwrap();
        printed.push(format!("{ra:?} {ra:#?}"));
        // Errors about this key: group-readable, of another certificate, cut short.
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RolesAnywhere::load(&world.config(&leaf, false)).unwrap_err();
        printed.push(format!("{err} {err:?}"));
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = world.leaf(dir.path(), &format!("{name}-other"), P256);
        let mut config = world.config(&other, false);
        config.private_key = leaf.key.clone();
        let err = RolesAnywhere::load(&config).unwrap_err();
        printed.push(format!("{err} {err:?}"));
        let lines: Vec<&str> = pem.lines().collect();
        let cut = format!(
            "{}\n{}\n{}\n",
            lines[0],
            lines[1..lines.len() - 1].join("\n").replacen('A', "*", 1),
            lines[lines.len() - 1]
        );
        std::fs::write(&leaf.key, cut).unwrap();
        let err = RolesAnywhere::load(&world.config(&leaf, false)).unwrap_err();
        assert!(
            matches!(err, RolesAnywhereError::PrivateKey { .. }),
            "{err}"
        );
        printed.push(format!("{err} {err:?}"));
        ra.reload().unwrap_err();
        printed.push(format!("{ra:?}"));

        for text in &printed {
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{name}: key material in {text}"
                );
            }
        }
    }
}

/// The verifier against iam-rolesanywhere-session's signer: what AWS's own Python signer makes
/// is accepted, and what was changed after signing, or signed with another key or clock, is
/// refused. Then the broker's signature, accepted by the same verifier in every other test,
/// is known to be one AWS's reference accepts too.
#[tokio::test]
async fn the_verifier_accepts_the_reference_signer_and_refuses_tampering() {
    let Some(world) = world() else { return };
    let reference = Command::new(&world.python)
        .args(["-c", "import iam_rolesanywhere_session"])
        .status()
        .is_ok_and(|s| s.success());
    if !reference {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "iam-rolesanywhere-session is needed in CI (tests/e2e/requirements.txt)"
        );
        eprintln!(
            "skipped: no iam-rolesanywhere-session in {}",
            world.python.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("ref-p256", P256),
        (
            "ref-p384",
            LeafSpec {
                key: "p384",
                traditional: true,
                ..P256
            },
        ),
        (
            "ref-rsa",
            LeafSpec {
                key: "rsa2048",
                intermediate: true,
                ..P256
            },
        ),
    ] {
        let leaf = world.leaf(dir.path(), name, spec);
        let other = world.leaf(dir.path(), &format!("{name}-other"), spec);
        let chain = world.ca.join("intermediate.pem");
        let call = |extra: &[&str]| -> (u64, serde_json::Value) {
            let mut args = vec![
                "--endpoint",
                world.endpoint.as_str(),
                "--certificate",
                leaf.cert.to_str().unwrap(),
                "--private-key",
                leaf.key.to_str().unwrap(),
                "--other-key",
                other.key.to_str().unwrap(),
                "--trust-anchor-arn",
                TRUST_ANCHOR_ARN,
                "--profile-arn",
                PROFILE_ARN,
                "--role-arn",
                ROLE_ARN,
                "--region",
                REGION,
            ];
            if spec.intermediate {
                args.extend(["--chain", chain.to_str().unwrap()]);
            }
            args.extend(extra);
            let out: serde_json::Value = serde_json::from_str(&run_python(
                &world.python,
                "rolesanywhere_reference_client.py",
                &args,
            ))
            .unwrap();
            (out["status"].as_u64().unwrap(), out["body"].clone())
        };

        let (status, body) = call(&[]);
        assert_eq!(status, 201, "{name}: {body}");
        let credentials = &body["credentialSet"][0]["credentials"];
        assert!(
            credentials["accessKeyId"]
                .as_str()
                .unwrap()
                .starts_with("ASIA")
        );

        let mut refusals = HashMap::new();
        for tamper in ["body", "header", "date", "key"] {
            let (status, body) = call(&["--tamper", tamper]);
            assert_eq!(status, 403, "{name} tampered {tamper}: {body}");
            refusals.insert(tamper, body["message"].as_str().unwrap().to_owned());
        }
        for tamper in ["body", "header", "date", "key"] {
            assert_eq!(
                refusals[tamper], "the signature does not match the request",
                "{name} {tamper}"
            );
        }
        let (status, body) = call(&["--clock-offset", "-600"]);
        assert_eq!(status, 403);
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("more than 5 minutes"),
            "{body}"
        );

        // And the broker's signer, for the same pair.
        let ra = RolesAnywhere::load(&world.config(&leaf, spec.intermediate)).unwrap();
        ra.create_session().await.unwrap();
        let seen = world.seen(&leaf.serial).await;
        assert_eq!(
            seen.iter().filter(|(ok, _)| *ok).count(),
            2,
            "{name}: {seen:?}"
        );
    }
}

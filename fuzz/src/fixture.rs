//! The daemon the request targets talk to: one router per server mode over a fake STS with fixed
//! answers, the callers a connection can resolve to, token markers the fuzzer can use, and the
//! invariant that matters most: credentials reach only a caller entitled to them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use imds_broker::config::Config;
use imds_broker::credentials::{
    AssumeRoleInput, CredentialSource, Credentials, StsError, SystemClock,
};
use imds_broker::identity::Caller;
use imds_broker::identity::ConnectionInfo;
use imds_broker::imds;
use imds_broker::secret::Secret;
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;

/// Part of every secret key the fake STS issues: a response that contains it handed out
/// credentials.
pub const SECRET: &str = "fuzz-secret-access-key-6e1c0d2b";

/// Replaced in an input by a valid token minted for the input's own caller. The fuzzer cannot
/// forge the HMAC, so without this it would never get past the token check.
pub const OWN_TOKEN: &[u8] = b"@TOKEN@";
/// Replaced by a valid token minted for another identity: presenting it must get nothing.
pub const OTHER_TOKEN: &[u8] = b"@OTHER@";
const OTHER_BINDING: &str = "local:uid=999;cgroup=/other.slice";
const TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// Who is on the other end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// A local uid whose rule names a role STS grants.
    Entitled,
    /// Matched, but STS refuses the role: 500.
    StsRefused,
    /// Matched, but STS is unreachable: 503.
    StsUnavailable,
    /// A local uid no rule matches.
    Unmapped,
    /// Another network namespace, matched by a `source` rule: entitled too.
    Remote,
    /// Could not be identified: matches nothing.
    Unresolved,
}

const CALLERS: [CallerKind; 6] = [
    CallerKind::Entitled,
    CallerKind::StsRefused,
    CallerKind::StsUnavailable,
    CallerKind::Unmapped,
    CallerKind::Remote,
    CallerKind::Unresolved,
];

impl CallerKind {
    pub fn is_entitled(self) -> bool {
        matches!(self, CallerKind::Entitled | CallerKind::Remote)
    }

    /// Whether this caller may legitimately get a 5xx: only when STS fails for its role.
    pub fn may_fail_upstream(self) -> bool {
        matches!(self, CallerKind::StsRefused | CallerKind::StsUnavailable)
    }

    fn caller(self) -> Caller {
        let local_peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);
        match self {
            CallerKind::Entitled => Caller::local_uid(UID_ENTITLED, local_peer),
            CallerKind::StsRefused => Caller::local_uid(UID_REFUSED, local_peer),
            CallerKind::StsUnavailable => Caller::local_uid(UID_UNAVAILABLE, local_peer),
            CallerKind::Unmapped => Caller::local_uid(4_000, local_peer),
            CallerKind::Remote => Caller::Remote {
                peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 40_000),
            },
            // An entitled uid whose process could not be pinned down: still nothing.
            CallerKind::Unresolved => Caller::Unresolved {
                peer: local_peer,
                reason: "fuzz: socket shared by two programs".into(),
                uid: Some(UID_ENTITLED),
                cgroup: Some("/system.slice/fuzz.service".into()),
            },
        }
    }
}

const UID_ENTITLED: u32 = 1_000;
const UID_REFUSED: u32 = 1_001;
const UID_UNAVAILABLE: u32 = 1_002;
/// Roles the fake STS fails for, by name.
const ROLE_REFUSED: &str = "refused";
const ROLE_UNAVAILABLE: &str = "unavailable";

/// How the daemon is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// IMDSv2 only, limits out of the way.
    Strict,
    /// `imdsv1 = "allowed"`: tokenless reads are answered too.
    ImdsV1,
    /// One request per second per caller: nearly everything is a 429.
    RateLimited,
}

const MODES: [Mode; 3] = [Mode::Strict, Mode::ImdsV1, Mode::RateLimited];

/// The addresses a caller may have dialled (the `Host` check compares against it).
const LOCALS: [SocketAddr; 3] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        80,
    ),
];

/// What one input is about, besides its request bytes.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub caller: CallerKind,
    pub mode: Mode,
    pub local: SocketAddr,
}

const CASES: usize = CALLERS.len() * MODES.len() * LOCALS.len();

impl Case {
    /// The first byte of an input picks the case (every byte value picks one), the rest is the
    /// request.
    pub fn split(data: &[u8]) -> Option<(Case, &[u8])> {
        let (&selector, rest) = data.split_first()?;
        let i = usize::from(selector) % CASES;
        let case = Case {
            caller: CALLERS[i % CALLERS.len()],
            mode: MODES[i / CALLERS.len() % MODES.len()],
            local: LOCALS[i / (CALLERS.len() * MODES.len())],
        };
        Some((case, rest))
    }

    pub fn connection(&self) -> ConnectionInfo {
        ConnectionInfo::new(self.caller.caller(), self.local)
    }
}

/// The routers and the runtime that drives them, built once per process.
pub struct Fixture {
    pub runtime: tokio::runtime::Runtime,
    modes: Vec<(AppState, axum::Router)>,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

impl Fixture {
    fn new() -> Self {
        // One thread: every execution runs to completion before the next starts, and a panic
        // surfaces on the fuzzer's own thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let state_dir = tempfile::tempdir().expect("temporary state dir");
        let modes = {
            let _entered = runtime.enter();
            MODES
                .iter()
                .map(|&mode| {
                    let text = daemon_config(state_dir.path(), mode);
                    let config = Config::parse(&text, Path::new("fuzz.toml"))
                        .unwrap_or_else(|e| panic!("fuzz daemon config: {e}"));
                    // The key is read into memory here; the directory can go afterwards.
                    let key =
                        TokenKey::load_or_create(&config.server.state_dir).expect("token key");
                    let state =
                        AppState::new(config, key, Arc::new(FixedSts), Arc::new(SystemClock));
                    let router = imds::router(state.clone());
                    (state, router)
                })
                .collect()
        };
        Self { runtime, modes }
    }

    fn mode(&self, mode: Mode) -> &(AppState, axum::Router) {
        &self.modes[MODES.iter().position(|&m| m == mode).expect("known mode")]
    }

    pub fn router(&self, mode: Mode) -> axum::Router {
        self.mode(mode).1.clone()
    }

    /// A token minted now for `binding` by the daemon's key.
    pub fn token(&self, mode: Mode, binding: &str) -> String {
        let state = &self.mode(mode).0;
        state
            .token_key()
            .mint(binding, TOKEN_TTL, state.boot_time())
    }

    /// Fresh tokens for this case's caller and for another identity.
    pub fn tokens(&self, case: &Case) -> Tokens {
        Tokens {
            own: self.token(case.mode, &case.caller.caller().token_binding()),
            other: self.token(case.mode, OTHER_BINDING),
        }
    }
}

/// What the token markers of one input are replaced with.
pub struct Tokens {
    pub own: String,
    pub other: String,
}

/// `input` with every [`OWN_TOKEN`] and [`OTHER_TOKEN`] marker replaced by its token.
pub fn substitute_tokens(input: &[u8], tokens: &Tokens) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 2 * tokens.own.len());
    let mut rest = input;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(OWN_TOKEN) {
            out.extend_from_slice(tokens.own.as_bytes());
            rest = after;
        } else if let Some(after) = rest.strip_prefix(OTHER_TOKEN) {
            out.extend_from_slice(tokens.other.as_bytes());
            rest = after;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// Credentials may only reach a caller a rule entitles, and only with its own token, or with
/// none at all where IMDSv1 is allowed. `token_ok` says whether the request could satisfy that
/// (each target knows how precisely).
pub fn assert_no_leak(case: &Case, token_ok: bool, response: &[u8]) {
    if !contains(response, SECRET.as_bytes()) {
        return;
    }
    assert!(
        case.caller.is_entitled(),
        "credentials served to {case:?}: {}",
        String::from_utf8_lossy(response)
    );
    assert!(
        token_ok,
        "credentials served without a valid token for {case:?}: {}",
        String::from_utf8_lossy(response)
    );
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The daemon config for `mode`: one rule per [`CallerKind`] that some rule matches.
fn daemon_config(state_dir: &Path, mode: Mode) -> String {
    let imdsv1 = if mode == Mode::ImdsV1 {
        "allowed"
    } else {
        "disabled"
    };
    let (rate, burst) = if mode == Mode::RateLimited {
        (1, 1)
    } else {
        (1_000_000, 1_000_000)
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
state_dir = "{state}"
imdsv1 = "{imdsv1}"
allowed_hosts = ["imds.internal"]

[sts]
region = "us-east-1"

[limits]
requests_per_second = {rate}
burst = {burst}

[[app]]
name = "entitled"
role_arn = "arn:aws:iam::111122223333:role/entitled"
[app.match]
uid = {UID_ENTITLED}

[[app]]
name = "refused"
role_arn = "arn:aws:iam::111122223333:role/{ROLE_REFUSED}"
[app.match]
uid = {UID_REFUSED}

[[app]]
name = "unavailable"
role_arn = "arn:aws:iam::111122223333:role/{ROLE_UNAVAILABLE}"
[app.match]
uid = {UID_UNAVAILABLE}

[[app]]
name = "remote"
role_arn = "arn:aws:iam::111122223333:role/remote"
[app.match]
source = ["10.0.0.0/8"]
"#,
        state = state_dir.display()
    )
}

/// Grants every role except [`ROLE_REFUSED`] and [`ROLE_UNAVAILABLE`], with fixed credentials.
struct FixedSts;

impl CredentialSource for FixedSts {
    fn assume_role(
        &self,
        input: AssumeRoleInput,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let answer = match input.role_arn.role_name() {
            ROLE_REFUSED => Err(StsError::Refused {
                code: "AccessDenied".into(),
                message: "fuzz: not authorized".into(),
            }),
            ROLE_UNAVAILABLE => Err(StsError::Unavailable("fuzz: connection refused".into())),
            _ => {
                let now = std::time::SystemTime::now();
                Ok(Credentials {
                    access_key_id: "ASIAFUZZ000000000001".into(),
                    secret_access_key: Secret::new(SECRET.to_owned()),
                    session_token: Secret::new("fuzz-session-token".to_owned()),
                    expiration: now + input.duration,
                    issued_at: now,
                    rendered: Default::default(),
                })
            }
        };
        async move { answer }.boxed()
    }
}

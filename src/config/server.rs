//! The daemon's own sections: `[server]` (the IMDS listeners), `[limits]`, `[admin]`,
//! `[audit]` and `[instance]` (what IMDS reports about the host).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::raw;
use super::{AdminListen, ImdsV1, Validator};

pub const DEFAULT_LISTEN: &str = "169.254.169.254:80";
/// Where packages and configuration-management tools drop one file per app.
pub const DEFAULT_INCLUDE: &str = "apps.d/*.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/imds-broker";

/// IMDS token TTL bounds (EC2: 1 s to 6 h).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// IP TTL / IPv6 hop limit of everything the daemon sends: 1 keeps it from crossing a router
/// (a container behind NAT cannot reach it unless the operator raises this).
pub const DEFAULT_HOP_LIMIT: u32 = 1;
/// Per-caller request rate: SDKs make a few requests per credential load, so these are never
/// met in normal use (aws-sdk-rust treats a 429 from IMDS as a hard failure).
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 20;
pub const DEFAULT_REQUEST_BURST: u32 = 100;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
pub const DEFAULT_MAX_CONNECTIONS_PER_CALLER: u32 = 128;
/// Interpreters and most service binaries are well under this; a large Go or Java bundle may
/// need it raised.
pub const DEFAULT_EXE_HASH_MAX_MIB: u32 = 256;
/// About a tenth of a second of one core per second at SHA-256's pace, per uid.
pub const DEFAULT_EXE_HASH_MIB_PER_SECOND: u32 = 64;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub imdsv1: ImdsV1,
    pub token_max_ttl: Duration,
    pub state_dir: PathBuf,
    pub hop_limit: u32,
    /// Host header names accepted besides the daemon's own addresses.
    pub allowed_hosts: Vec<String>,
    /// Drop-in globs (`apps.d/*.toml`), relative to the config file's directory.
    pub include: Vec<String>,
    /// Whether `GET /imds-broker/whoami` tells a caller who the daemon takes it for.
    pub debug_whoami: bool,
}

/// Request and connection limits, per caller (resolved identity) and in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_second: u32,
    pub burst: u32,
    pub max_connections: u32,
    pub max_connections_per_caller: u32,
    /// An executable larger than this is never hashed, so never matches an `exe_sha256` rule.
    pub exe_hash_max_mib: u32,
    /// How much of executables not hashed before each uid may have hashed, per second (the
    /// burst is one file of `exe_hash_max_mib`).
    pub exe_hash_mib_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The hash-chained audit file (mode 0600).
    pub path: PathBuf,
    /// Forward-secure sealing of the file, keys in the state dir (default on).
    pub seal: bool,
    /// A sealing epoch ends this long after its first line...
    pub seal_epoch: Duration,
    /// ...or after this many lines, whichever comes first.
    pub seal_epoch_events: u64,
    /// What credential requests get while the file cannot be written.
    pub on_failure: OnFailure,
}

/// `[audit] on_failure`: what happens to credential requests while the audit file cannot be
/// written (disk full, read-only, I/O errors), like auditd's `disk_full_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// No credentials are issued that cannot be recorded: callers get 503 and `/readyz` fails
    /// until a write succeeds again (the default).
    #[default]
    Refuse,
    /// Credentials are issued anyway; the events not written are counted, and an `audit.gap`
    /// line records how many once writing works again.
    Serve,
}

/// Sealing epochs: how long (from its first line) and how many lines at most, by default; the
/// key of an ended epoch is erased, so these bound what a later intruder could re-seal.
pub const DEFAULT_SEAL_EPOCH: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_SEAL_EPOCH_EVENTS: u64 = 10_000;
const SEAL_EPOCH_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(24 * 3600);
const SEAL_EPOCH_EVENTS_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;

/// The values IMDS reports about "the instance"; synthesized where the operator gave none.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub region: String,
    pub availability_zone: String,
    pub instance_id: String,
    pub instance_type: String,
    pub ami_id: String,
    pub hostname: String,
}

impl Validator<'_> {
    pub(super) fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let mut listen = Vec::new();
        match raw.listen {
            None => listen.push(DEFAULT_LISTEN.parse().expect("constant address parses")),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.push(list.span(), "server.listen", "needs at least one address");
                }
                for entry in list.get_ref() {
                    match entry.get_ref().parse::<SocketAddr>() {
                        Ok(addr) => listen.push(addr),
                        Err(_) => self.push(
                            entry.span(),
                            "server.listen",
                            format!(
                                "{:?} is not an IP:port address (e.g. 169.254.169.254:80, [fd00:ec2::254]:80)",
                                entry.get_ref()
                            ),
                        ),
                    }
                }
            }
        }
        let token_max_ttl = self.duration(
            raw.token_max_ttl.as_ref(),
            "server.token_max_ttl",
            MAX_TOKEN_TTL,
        );
        if let Some(t) = &raw.token_max_ttl
            && (token_max_ttl < Duration::from_secs(1) || token_max_ttl > MAX_TOKEN_TTL)
        {
            self.push(
                t.span(),
                "server.token_max_ttl",
                "must be between 1 and 21600 seconds",
            );
        }
        let hop_limit = match raw.hop_limit {
            None => DEFAULT_HOP_LIMIT,
            Some(h) if (1..=64).contains(h.get_ref()) => *h.get_ref(),
            Some(h) => {
                self.push(h.span(), "server.hop_limit", "must be between 1 and 64");
                DEFAULT_HOP_LIMIT
            }
        };
        let include = match raw.include {
            None => vec![DEFAULT_INCLUDE.to_owned()],
            Some(list) => list
                .into_inner()
                .into_iter()
                .filter_map(|pattern| {
                    let problem = super::include::pattern_problem(pattern.get_ref());
                    match problem {
                        Some(problem) => {
                            self.push(pattern.span(), "server.include", problem);
                            None
                        }
                        None => Some(pattern.into_inner()),
                    }
                })
                .collect(),
        };
        ServerConfig {
            listen,
            include,
            debug_whoami: raw.debug_whoami,
            hop_limit,
            allowed_hosts: raw
                .allowed_hosts
                .unwrap_or_default()
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            imdsv1: raw.imdsv1.unwrap_or_default(),
            token_max_ttl,
            state_dir: raw
                .state_dir
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        }
    }

    pub(super) fn admin(&mut self, raw: raw::RawAdmin, state_dir: &Path) -> AdminListen {
        match raw.listen {
            None => AdminListen::Unix(state_dir.join("admin.sock")),
            Some(l) => l.get_ref().parse().unwrap_or_else(|e: String| {
                self.push(l.span(), "admin.listen", e);
                AdminListen::Unix(state_dir.join("admin.sock"))
            }),
        }
    }

    pub(super) fn limits(&mut self, raw: raw::RawLimits) -> Limits {
        Limits {
            requests_per_second: self.positive(
                raw.requests_per_second.as_ref(),
                "limits.requests_per_second",
                DEFAULT_REQUESTS_PER_SECOND,
            ),
            burst: self.positive(raw.burst.as_ref(), "limits.burst", DEFAULT_REQUEST_BURST),
            max_connections: self.positive(
                raw.max_connections.as_ref(),
                "limits.max_connections",
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_connections_per_caller: self.positive(
                raw.max_connections_per_caller.as_ref(),
                "limits.max_connections_per_caller",
                DEFAULT_MAX_CONNECTIONS_PER_CALLER,
            ),
            exe_hash_max_mib: self.positive(
                raw.exe_hash_max_mib.as_ref(),
                "limits.exe_hash_max_mib",
                DEFAULT_EXE_HASH_MAX_MIB,
            ),
            exe_hash_mib_per_second: self.positive(
                raw.exe_hash_mib_per_second.as_ref(),
                "limits.exe_hash_mib_per_second",
                DEFAULT_EXE_HASH_MIB_PER_SECOND,
            ),
        }
    }

    pub(super) fn audit(&mut self, raw: raw::RawAudit, state_dir: &Path) -> AuditConfig {
        let seal_epoch = self.duration(
            raw.seal_epoch.as_ref(),
            "audit.seal_epoch",
            DEFAULT_SEAL_EPOCH,
        );
        if let Some(r) = &raw.seal_epoch
            && !SEAL_EPOCH_RANGE.contains(&seal_epoch)
        {
            self.push(r.span(), "audit.seal_epoch", "must be between 1m and 24h");
        }
        let seal_epoch_events = match &raw.seal_epoch_events {
            Some(n) if !SEAL_EPOCH_EVENTS_RANGE.contains(n.get_ref()) => {
                self.push(
                    n.span(),
                    "audit.seal_epoch_events",
                    "must be between 1 and 10000000",
                );
                DEFAULT_SEAL_EPOCH_EVENTS
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_SEAL_EPOCH_EVENTS,
        };
        let on_failure = match raw
            .on_failure
            .as_ref()
            .map(|v| (v.span(), v.get_ref().as_str()))
        {
            None | Some((_, "refuse")) => OnFailure::Refuse,
            Some((_, "serve")) => OnFailure::Serve,
            Some((span, other)) => {
                self.push(
                    span,
                    "audit.on_failure",
                    format!("{other:?} is not \"refuse\" or \"serve\""),
                );
                OnFailure::Refuse
            }
        };
        AuditConfig {
            on_failure,
            path: raw
                .path
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir.join("audit.log")),
            seal: raw.seal.unwrap_or(true),
            seal_epoch,
            seal_epoch_events,
        }
    }

    pub(super) fn instance(&mut self, raw: raw::RawInstance, sts_region: &str) -> InstanceInfo {
        let hostname = raw.hostname.unwrap_or_else(local_hostname);
        let region = raw.region.unwrap_or_else(|| sts_region.to_owned());
        let availability_zone = match raw.availability_zone {
            // botocore derives the region by dropping the zone's last character.
            Some(az)
                if !az.get_ref().starts_with(&region) || az.get_ref().len() != region.len() + 1 =>
            {
                self.push(
                    az.span(),
                    "instance.availability_zone",
                    format!("must be the region {region:?} plus one letter (SDKs derive the region from it)"),
                );
                az.into_inner()
            }
            Some(az) => az.into_inner(),
            None => format!("{region}a"),
        };
        let seed = host_seed(&hostname);
        InstanceInfo {
            region,
            availability_zone,
            instance_id: raw
                .instance_id
                .unwrap_or_else(|| format!("i-{}", &seed[..17])),
            instance_type: raw.instance_type.unwrap_or_else(|| "imds-broker".into()),
            ami_id: raw
                .ami_id
                .unwrap_or_else(|| format!("ami-{}", &seed[17..34])),
            hostname,
        }
    }
}

fn local_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A stable per-host hex string for synthesized ids, from the machine id when there is one.
fn host_seed(hostname: &str) -> String {
    let machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let digest = Sha256::digest(format!("{}|{hostname}", machine_id.trim()));
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(audit: &str) -> Result<Config, String> {
        let text = format!(
            "[server]\nstate_dir = \"/tmp/x\"\n[audit]\n{audit}\n[sts]\nregion = \"us-east-1\"\n\
             [[app]]\nname = \"a\"\nrole_arn = \"arn:aws:iam::111122223333:role/a\"\n\
             [app.match]\nuid = 4000000\n"
        );
        Config::parse(&text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn audit_on_failure_defaults_to_refuse_and_names_a_bad_value() {
        assert_eq!(parse("").unwrap().audit.on_failure, OnFailure::Refuse);
        let serve = parse("on_failure = \"serve\"").unwrap();
        assert_eq!(serve.audit.on_failure, OnFailure::Serve);
        let refuse = parse("on_failure = \"refuse\"").unwrap();
        assert_eq!(refuse.audit.on_failure, OnFailure::Refuse);
        let err = parse("on_failure = \"ignore\"").unwrap_err();
        assert!(
            err.contains("t.toml:4:") && err.contains("audit.on_failure"),
            "{err}"
        );
        assert!(
            err.contains("\"ignore\" is not \"refuse\" or \"serve\""),
            "{err}"
        );
    }
}

//! Who is calling: resolves each accepted connection to the identity of the local process that
//! owns the other end, once per connection, before any request on it is read.
//!
//! What it costs and needs, per match kind:
//! - `uid`, `cgroup`, `systemd_unit`: one netlink `sock_diag` query (no privilege) and a cached
//!   cgroup-id → path index (reads the cgroup2 tree, world-readable).
//! - `exe`, `exe_sha256`, `gid`: the owning process, found in `/proc` (candidates from the
//!   socket's `cgroup.procs`, then its uid). Reading other users' `/proc/<pid>/fd` and `exe`
//!   needs `CAP_SYS_PTRACE` (and `CAP_DAC_READ_SEARCH` to hash an executable the daemon cannot
//!   read). Without them those callers are refused, with a log line saying so.
//! - `source`: the peer address only.

pub mod cgroup;
pub mod container;
pub mod exe_digest;
pub mod netns;
pub mod process;
pub mod sock_diag;

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cgroup::{CgroupIndex, Units};
use container::Container;
use exe_digest::{DigestError, ExeDigests};
use netns::{Found, Namespaces};
use process::{Budget, ProcessError, ProcessInfo};
use sock_diag::{Lookup, SocketOwner};

const CLOSED: &str = "the caller's socket is closed: no process holds it";
const GONE: &str = "no socket of this host has the connection's addresses any more";

/// What the current rules need to know about callers beyond uid and cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Some rule matches on the executable or gid: find the owning process.
    pub process: bool,
    /// Some rule matches on the executable's sha256 (hashed only for the callers that need
    /// it, see [`with_exe_digest`]).
    pub exe_hash: bool,
}

/// A process on this host, seen through its socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCaller {
    pub peer: SocketAddr,
    pub uid: u32,
    /// cgroup v2 path of the socket (where the process was when it created it).
    pub cgroup: Option<String>,
    /// The system manager's unit (see [`crate::identity::cgroup::Units`]).
    pub unit: Option<String>,
    /// `(uid, unit)`: a unit of uid's user manager, only ever matched with that uid.
    pub user_unit: Option<(u32, String)>,
    /// Only resolved when some rule needs it.
    pub process: Option<ProcessInfo>,
    pub exe_sha256: Option<String>,
    /// The network namespace (inode number) the socket was found in, when it is not the
    /// daemon's own: the peer's address is then the caller's own, not the host's.
    pub netns: Option<u64>,
    /// The container whose cgroup the socket was made in (with `[containers]` only).
    pub container: Option<Container>,
}

/// The identity of the peer of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Local(LocalCaller),
    /// No local socket has this 4-tuple: another host or network namespace, or a process that
    /// already closed its socket. Only `source` rules can match it.
    Remote {
        peer: SocketAddr,
    },
    /// The caller could not be identified unambiguously. Matches no rule: never guess.
    /// What the socket did establish (uid, cgroup) is kept for the audit trail and the token
    /// binding.
    Unresolved {
        peer: SocketAddr,
        reason: String,
        uid: Option<u32>,
        cgroup: Option<String>,
    },
}

/// The connection's resolved caller, put into every request's extensions by the server.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub caller: Arc<Caller>,
    /// The caller's [`Caller::token_binding`], computed once per connection: every request
    /// keys its rate limit and checks its token with it.
    pub binding: Arc<str>,
    /// The daemon's own address on this connection (what the caller dialled).
    pub local: SocketAddr,
}

impl ConnectionInfo {
    pub fn new(caller: Caller, local: SocketAddr) -> Self {
        Self {
            binding: caller.token_binding().into(),
            caller: Arc::new(caller),
            local,
        }
    }
}

/// A connection is its caller wherever a caller is asked for (audit events, rules).
impl std::ops::Deref for ConnectionInfo {
    type Target = Caller;
    fn deref(&self) -> &Caller {
        &self.caller
    }
}

/// Resolves connections to callers; holds the caches that keep that cheap.
pub struct Resolver {
    cgroups: CgroupIndex,
    /// With `[containers]`: the host's other network namespaces, and containers recognised.
    containers: Option<Arc<Namespaces>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self {
            cgroups: CgroupIndex::new(),
            containers: None,
        }
    }

    /// A resolver that also finds callers in the host's other network namespaces and
    /// recognises containers by their cgroup (`[containers]`).
    pub fn with_containers(namespaces: Arc<Namespaces>) -> Self {
        Self {
            cgroups: CgroupIndex::new(),
            containers: Some(namespaces),
        }
    }

    pub fn namespaces(&self) -> Option<&Arc<Namespaces>> {
        self.containers.as_ref()
    }

    /// Resolves the owner of the connection `peer -> local` that the daemon accepted.
    /// Blocking (netlink and `/proc` reads): call it off the async workers, or use
    /// [`Resolver::resolve_async`].
    pub fn resolve(&self, peer: SocketAddr, local: SocketAddr, needs: Needs) -> Caller {
        match socket_owner(peer, local) {
            Ok(owner) => self
                .describe_within(peer, (owner, None), needs, Budget::Unlimited)
                .expect("an unlimited budget is never exhausted"),
            Err(caller) => *caller,
        }
    }

    /// Resolves the owner of the connection `peer -> local` from async code.
    ///
    /// Most lookups are short (one netlink round trip, a cached cgroup, a few fds to read),
    /// and handing each to the blocking pool cost two cross-thread wake-ups, which dominated
    /// the tail latency of new connections on a busy host. So the socket is looked up and
    /// described right here, within [`INLINE_BUDGET`]; only a description that needs more (a
    /// cgroup not indexed yet, a crowded cgroup, the fallback scan of a uid) goes on on the
    /// blocking pool, from the socket already found. `None` if that blocking part panicked.
    pub async fn resolve_async(
        self: &Arc<Self>,
        peer: SocketAddr,
        local: SocketAddr,
        needs: Needs,
    ) -> Option<Caller> {
        let owner = match socket_owner(peer, local) {
            Ok(owner) => (owner, None),
            Err(caller) => match (&*caller, &self.containers) {
                (Caller::Remote { .. }, Some(namespaces)) => {
                    match foreign_owner(namespaces, peer, local).await {
                        Ok((owner, netns)) => (owner, Some(netns)),
                        Err(caller) => return Some(*caller),
                    }
                }
                _ => return Some(*caller),
            },
        };
        let quick = self.describe_within(peer, owner, needs, Budget::Reads(INLINE_BUDGET));
        if quick.is_some() {
            return quick;
        }
        let resolver = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            resolver.describe_within(peer, owner, needs, Budget::Unlimited)
        })
        .await
        .ok()
        .flatten()
    }

    /// The local caller that owns socket `owner`, if that can be found within `budget`;
    /// `None` if it would need more. The executable's digest is not part of it: see
    /// [`with_exe_digest`].
    fn describe_within(
        &self,
        peer: SocketAddr,
        (owner, netns): (SocketOwner, Option<u64>),
        needs: Needs,
        mut budget: Budget,
    ) -> Option<Caller> {
        let bounded = budget != Budget::Unlimited;
        let cgroup = match owner.cgroup_id {
            None => None,
            // A miss walks the whole cgroup tree.
            Some(id) if bounded => Some(self.cgroups.cached(id)?),
            Some(id) => self.cgroups.lookup(id),
        };
        let (cgroup, units, container) = match cgroup {
            Some(info) => (
                Some(info.path.clone()),
                info.units.clone(),
                info.container.clone(),
            ),
            None => (None, Units::default(), None),
        };
        let mut caller = LocalCaller {
            peer,
            uid: owner.uid,
            cgroup,
            unit: units.system,
            user_unit: units.user,
            process: None,
            exe_sha256: None,
            netns,
            // Without `[containers]` a container is a set of processes like any other, as
            // before: rules keep matching them as they did.
            container: container
                .filter(|_| self.containers.is_some())
                .map(|reference| Container {
                    reference,
                    meta: container::Meta::NotAsked,
                }),
        };
        if needs.process || needs.exe_hash {
            let dir = match (self.cgroups.root(), &caller.cgroup) {
                (Some(root), Some(path)) => Some(root.join(path.trim_start_matches('/'))),
                _ => None,
            };
            let found = process::owner_of_socket_within(
                owner.inode,
                owner.uid,
                dir.as_deref(),
                &mut budget,
            )?;
            match found {
                Ok(process) => caller.process = Some(process),
                Err(e) => {
                    if matches!(
                        e,
                        ProcessError::Permission { .. } | ProcessError::Unreadable { .. }
                    ) {
                        tracing::error!(
                            error = %e,
                            "cannot identify the calling process; refusing callers that rules match by exe or gid"
                        );
                    }
                    return Some(caller.unresolved(e.to_string()));
                }
            }
        }
        Some(Caller::Local(caller))
    }
}

/// Every address of this host's interfaces in this network namespace (for `check` and
/// `doctor`; not on any request path).
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|interfaces| {
            interfaces
                .filter_map(|i| i.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| std::net::IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The socket at the other end of `peer -> local`, or the caller that its absence makes.
/// (Boxed: a caller is large, and this is the less common way out.)
fn socket_owner(peer: SocketAddr, local: SocketAddr) -> Result<SocketOwner, Box<Caller>> {
    match sock_diag::lookup_peer(peer, local) {
        Ok(Lookup::Connected(owner)) => Ok(owner),
        // A socket of this host that no process holds any more: whoever it was is gone.
        Ok(Lookup::Closed) => Err(Box::new(Caller::unresolved(peer, CLOSED))),
        // From loopback the client can only be here; not finding its socket means it is
        // gone, not that it is elsewhere.
        Ok(Lookup::NotFound) if peer.ip().to_canonical().is_loopback() => {
            Err(Box::new(Caller::unresolved(peer, GONE)))
        }
        Ok(Lookup::NotFound) => Err(Box::new(Caller::Remote { peer })),
        Err(e) => Err(Box::new(Caller::unresolved(
            peer,
            &format!("socket lookup failed: {e}"),
        ))),
    }
}

/// The client end of `peer -> local` in another network namespace of this host, or the caller
/// that not finding it there makes.
async fn foreign_owner(
    namespaces: &Arc<Namespaces>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(SocketOwner, u64), Box<Caller>> {
    let reason = match namespaces.find(peer, local).await {
        Ok(Found::Connected { owner, netns }) => return Ok((owner, netns)),
        Ok(Found::Elsewhere) => return Err(Box::new(Caller::Remote { peer })),
        Ok(Found::Closed) => CLOSED.to_owned(),
        Ok(Found::Missing) => format!(
            "no socket with the connection's addresses in the network namespace that holds {}",
            peer.ip().to_canonical()
        ),
        Ok(Found::Ambiguous(n)) => {
            format!("the connection's addresses are live in {n} network namespaces")
        }
        Err(e) => format!("socket lookup in other network namespaces failed: {e}"),
    };
    Err(Box::new(Caller::unresolved(peer, &reason)))
}

/// How much `/proc` reading a lookup may do on an async worker before it is handed to the
/// blocking pool instead (see [`Budget`]): about 1.5 µs per read, measured, so a worker is
/// never held for more than about 100 µs. Enough for a cgroup of a few small processes.
pub const INLINE_BUDGET: usize = 64;

/// sha256 of the running executable, read through `/proc/<pid>/exe` so it is the file the
/// process runs even if its path was replaced since. Unbounded: for `explain`, which an
/// operator runs; the daemon goes through [`ExeDigests`].
pub fn hash_exe(pid: u32) -> std::io::Result<String> {
    crate::identity::exe_digest::hash_reader(fs::File::open(format!("/proc/{pid}/exe"))?)
}

/// `caller` with its executable's digest, when it is a local caller whose process is known.
/// An executable over the size limit simply has none (it matches no `exe_sha256` rule); any
/// other failure refuses the caller.
pub async fn with_exe_digest(caller: Caller, digests: &Arc<ExeDigests>) -> Caller {
    let Caller::Local(mut local) = caller else {
        return caller;
    };
    let Some(process) = &local.process else {
        return Caller::Local(local);
    };
    match digests
        .digest(process.pid, process.start_time, local.uid)
        .await
    {
        Ok(digest) => local.exe_sha256 = Some(digest.to_string()),
        Err(e @ DigestError::TooLarge { .. }) => {
            tracing::debug!(caller = %Caller::Local(local.clone()), "{e}");
        }
        Err(e) => return local.unresolved(e.to_string()),
    }
    Caller::Local(local)
}

impl LocalCaller {
    /// This caller, refused for `reason`, keeping what its socket established.
    fn unresolved(self, reason: String) -> Caller {
        Caller::Unresolved {
            peer: self.peer,
            reason,
            uid: Some(self.uid),
            cgroup: self.cgroup,
        }
    }
}

/// The token binding of a local socket: uid and cgroup, what every connection resolves.
fn local_binding(uid: u32, cgroup: Option<&str>) -> String {
    format!("local:uid={uid};cgroup={}", cgroup.unwrap_or(""))
}

impl Caller {
    /// A local caller known only by uid (tests, `explain --uid`).
    pub fn local_uid(uid: u32, peer: SocketAddr) -> Self {
        Caller::Local(LocalCaller {
            peer,
            uid,
            cgroup: None,
            unit: None,
            user_unit: None,
            process: None,
            exe_sha256: None,
            netns: None,
            container: None,
        })
    }

    /// A caller refused for `reason` before anything about it was established.
    fn unresolved(peer: SocketAddr, reason: &str) -> Self {
        Caller::Unresolved {
            peer,
            reason: reason.to_owned(),
            uid: None,
            cgroup: None,
        }
    }

    pub fn local(&self) -> Option<&LocalCaller> {
        match self {
            Caller::Local(l) => Some(l),
            _ => None,
        }
    }

    /// The uid that created the socket, when the kernel said (also for an unresolved caller:
    /// it matches no rule either way, and the audit trail should name it).
    pub fn uid(&self) -> Option<u32> {
        match self {
            Caller::Local(l) => Some(l.uid),
            Caller::Unresolved { uid, .. } => *uid,
            Caller::Remote { .. } => None,
        }
    }

    pub fn process(&self) -> Option<&ProcessInfo> {
        self.local().and_then(|l| l.process.as_ref())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process().map(|p| p.pid)
    }

    pub fn gid(&self) -> Option<u32> {
        self.process().map(|p| p.gid)
    }

    pub fn exe(&self) -> Option<&PathBuf> {
        self.process().map(|p| &p.exe)
    }

    pub fn cgroup(&self) -> Option<&str> {
        match self {
            Caller::Local(l) => l.cgroup.as_deref(),
            Caller::Unresolved { cgroup, .. } => cgroup.as_deref(),
            Caller::Remote { .. } => None,
        }
    }

    pub fn unit(&self) -> Option<&str> {
        self.local().and_then(|l| l.unit.as_deref())
    }

    pub fn user_unit(&self) -> Option<(u32, &str)> {
        self.local()
            .and_then(|l| l.user_unit.as_ref())
            .map(|(uid, unit)| (*uid, unit.as_str()))
    }

    /// The caller's container, when `[containers]` is on and its cgroup is one.
    pub fn container(&self) -> Option<&Container> {
        self.local().and_then(|l| l.container.as_ref())
    }

    /// Whether the peer's address is the caller's own: another host, or a socket found in
    /// another network namespace of this one (not an address of the host's).
    pub fn address_is_its_own(&self) -> bool {
        match self {
            Caller::Remote { .. } => true,
            Caller::Local(l) => l.netns.is_some(),
            Caller::Unresolved { .. } => false,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        match self {
            Caller::Local(l) => l.peer,
            Caller::Remote { peer } | Caller::Unresolved { peer, .. } => *peer,
        }
    }

    /// The part of the identity a session token is bound to: a token minted for one identity
    /// is refused when another presents it. Only what every connection resolves goes in (not
    /// the executable, which is looked up only while some rule needs it), so a token stays
    /// valid across config reloads; ports are left out so a client may reconnect.
    pub fn token_binding(&self) -> String {
        match self {
            Caller::Local(l) => local_binding(l.uid, l.cgroup.as_deref()),
            Caller::Remote { peer } => format!("remote:{}", peer.ip()),
            // Still the same socket owner: its own tokens verify, and the request is then
            // refused (and audited) as unresolved rather than as a bad token.
            Caller::Unresolved {
                uid: Some(uid),
                cgroup,
                ..
            } => local_binding(*uid, cgroup.as_deref()),
            Caller::Unresolved { peer, .. } => format!("unresolved:{}", peer.ip()),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Local(l) => {
                write!(f, "uid {}", l.uid)?;
                if let Some(c) = &l.container {
                    write!(f, " in {}", c.reference)?;
                }
                if let Some(p) = &l.process {
                    write!(f, " pid {} exe {}", p.pid, p.exe.display())?;
                }
                if let Some(c) = &l.cgroup {
                    write!(f, " cgroup {c}")?;
                }
                write!(f, " via {}", l.peer)
            }
            Caller::Remote { peer } => write!(f, "non-local peer {peer}"),
            Caller::Unresolved { peer, reason, .. } => {
                write!(f, "unresolved peer {peer} ({reason})")
            }
        }
    }
}

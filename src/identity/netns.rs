//! Callers in the host's other network namespaces (containers on a bridge, `ip netns` clients).
//!
//! The namespaces that hold the peer's address are found in an index of every namespace's
//! addresses; the connection's exact 4-tuple is then looked up with `inet_diag` *inside* each of
//! them, through a `sock_diag` socket opened there and kept. The address is only the hint: the
//! live socket the kernel finds, checked as on the host ([`sock_diag::classify`]), is the proof,
//! and it must be found in exactly one namespace. A peer whose address some namespace holds but
//! whose socket is in none is refused, never guessed.
//!
//! Needs `CAP_SYS_PTRACE` (to see other processes' `/proc/<pid>/ns/net`) and `CAP_SYS_ADMIN`
//! (to `setns` a short-lived thread into a namespace to open the sockets there).
//!
//! A kept socket keeps its namespace alive, so every refresh drops the namespaces that no
//! process and no `/run/netns` mount refers to any more.
//!
//! Each indexed namespace costs the daemon two descriptors. Any user may make network
//! namespaces (inside a user namespace of their own) and keep them alive, so namespaces whose
//! every holder is in another user namespace than the daemon's are indexed only up to
//! [`MAX_FOREIGN`]; beyond that they are not indexed (their callers are refused as from
//! elsewhere). Namespaces that root made for the host's user namespace (rootful containers,
//! `ip netns`, CNI) are never counted against it: putting a process of the daemon's user
//! namespace into another network namespace takes `CAP_SYS_ADMIN` there, and `/run/netns` is
//! root's.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_ROUTE};

use super::sock_diag::{self, Lookup, SocketOwner};

/// At most one refresh per this interval: a flood of peers whose address no namespace holds
/// (another host, a forged source) costs the host a few scans a second, not one per connection.
/// A container's first connection waits at most this long for its namespace to be indexed.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Where `ip netns` and CNI runtimes bind-mount namespaces that may have no process yet.
const NAMED_NAMESPACES: &str = "/run/netns";

/// How many namespaces held only from other user namespaces (user-made, or containers with a
/// remapped user namespace) are indexed at most.
pub const MAX_FOREIGN: usize = 512;

/// What the other network namespaces hold for a connection's client end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A live socket with the exact 4-tuple, in exactly one namespace (its inode number).
    Connected { owner: SocketOwner, netns: u64 },
    /// The socket exists but no process holds it any more.
    Closed,
    /// Live sockets with this 4-tuple in more than one namespace: who is calling is ambiguous.
    Ambiguous(usize),
    /// Some namespace holds the peer's address, but none has the socket.
    Missing,
    /// No namespace of this host holds the peer's address: another host.
    Elsewhere,
}

/// The network namespaces of this host other than the daemon's own, and their addresses.
pub struct Namespaces {
    /// The daemon's own namespace, which the host lookup already covers.
    host: u64,
    /// The daemon's own user namespace: namespaces held from it were made by root.
    host_user: u64,
    /// At most this many namespaces held only from other user namespaces are indexed.
    max_foreign: usize,
    index: RwLock<Index>,
    /// When the last refresh started; held across a refresh, so waiters share it.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Index {
    spaces: HashMap<u64, Arc<Space>>,
    /// Each namespace's addresses as last read.
    addresses: HashMap<u64, Vec<IpAddr>>,
    /// Address → the namespaces holding it (usually one).
    holders: HashMap<IpAddr, Vec<u64>>,
}

/// How much a refresh re-reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// The addresses of every namespace (the periodic sweep).
    Full,
    /// The addresses of new namespaces and of those that had none but loopback when last read
    /// (a runtime makes the namespace before it gives it an address): what a caller whose
    /// address is unknown needs, at a cost that does not grow with the containers already
    /// running. An address added later to an indexed namespace waits for the sweep; until
    /// then a connection from it is not found there and is refused, never misattributed.
    New,
}

/// One namespace, through sockets opened inside it.
struct Space {
    ino: u64,
    /// Every holder seen when it was opened is in another user namespace than the daemon's.
    foreign: bool,
    diag: Mutex<Socket>,
    route: Mutex<Socket>,
}

static WARNED_PRIVILEGE: AtomicBool = AtomicBool::new(false);
static WARNED_FOREIGN: AtomicBool = AtomicBool::new(false);

impl Namespaces {
    pub fn new() -> io::Result<Self> {
        Self::with_foreign_limit(MAX_FOREIGN)
    }

    /// [`Namespaces::new`] with another limit on namespaces held only from other user
    /// namespaces.
    pub fn with_foreign_limit(max_foreign: usize) -> io::Result<Self> {
        Ok(Self {
            host: fs::metadata("/proc/thread-self/ns/net")?.ino(),
            host_user: fs::metadata("/proc/thread-self/ns/user")?.ino(),
            max_foreign,
            index: RwLock::new(Index::default()),
            refreshing: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether namespace `ino` is indexed.
    pub fn contains(&self, ino: u64) -> bool {
        self.index
            .read()
            .expect("netns index lock")
            .spaces
            .contains_key(&ino)
    }

    /// The client end of `peer -> local` in another namespace. Refreshes the index first when
    /// the current one has no answer, sharing a refresh with concurrent callers.
    pub async fn find(self: &Arc<Self>, peer: SocketAddr, local: SocketAddr) -> io::Result<Found> {
        let arrival = Instant::now();
        let first = self.lookup(peer, local)?;
        if !matches!(first, Found::Elsewhere | Found::Missing) {
            return Ok(first);
        }
        self.refresh_since(arrival).await;
        self.lookup(peer, local)
    }

    /// The client end of `peer -> local` by the index as it is (no refresh).
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> io::Result<Found> {
        let ip = peer.ip().to_canonical();
        let spaces: Vec<Arc<Space>> = {
            let index = self.index.read().expect("netns index lock");
            index
                .holders
                .get(&ip)
                .into_iter()
                .flatten()
                .filter_map(|ino| index.spaces.get(ino).cloned())
                .collect()
        };
        if spaces.is_empty() {
            return Ok(Found::Elsewhere);
        }
        let mut connected = Vec::new();
        let mut closed = false;
        for space in &spaces {
            let diag = space.diag.lock().expect("sock_diag socket lock");
            match sock_diag::lookup_peer_on(&diag, peer, local)? {
                Lookup::Connected(owner) => connected.push((owner, space.ino)),
                Lookup::Closed => closed = true,
                Lookup::NotFound => {}
            }
        }
        Ok(match connected.as_slice() {
            [(owner, netns)] => Found::Connected {
                owner: *owner,
                netns: *netns,
            },
            [] if closed => Found::Closed,
            [] => Found::Missing,
            more => Found::Ambiguous(more.len()),
        })
    }

    /// Makes sure a refresh has started since `since` and finished: joins one that is running,
    /// or starts one once [`MIN_REFRESH_INTERVAL`] has passed since the last.
    pub async fn refresh_since(self: &Arc<Self>, since: Instant) {
        self.refresh_since_with(since, Refresh::New).await;
    }

    /// [`Namespaces::refresh_since`], re-reading as much as `scope` says.
    pub async fn refresh_since_with(self: &Arc<Self>, since: Instant, scope: Refresh) {
        let mut last = self.refreshing.lock().await;
        if last.is_some_and(|started| started >= since) {
            return;
        }
        if let Some(started) = *last {
            // A throttle, not a synchronisation: the next refresh may not start earlier.
            tokio::time::sleep_until((started + MIN_REFRESH_INTERVAL).into()).await;
        }
        let started = Instant::now();
        let this = Arc::clone(self);
        if let Err(e) = tokio::task::spawn_blocking(move || this.refresh_with(scope)).await {
            tracing::error!(error = %e, "network namespace refresh panicked");
        }
        *last = Some(started);
    }

    /// Re-reads which namespaces exist and what addresses each holds. Blocking.
    pub fn refresh(&self) {
        self.refresh_with(Refresh::Full);
    }

    /// Re-reads which namespaces exist, and the addresses `scope` says. Blocking.
    pub fn refresh_with(&self, scope: Refresh) {
        let seen = discover(self.host, self.host_user);
        let (mut spaces, mut addresses) = {
            let index = self.index.read().expect("netns index lock");
            let spaces: HashMap<u64, Arc<Space>> = index
                .spaces
                .iter()
                .filter(|(ino, _)| seen.contains_key(ino))
                .map(|(ino, space)| (*ino, space.clone()))
                .collect();
            let addresses: HashMap<u64, Vec<IpAddr>> = index
                .addresses
                .iter()
                .filter(|(ino, _)| spaces.contains_key(ino))
                .map(|(ino, list)| (*ino, list.clone()))
                .collect();
            (spaces, addresses)
        };
        let mut foreign = spaces.values().filter(|s| s.foreign).count();
        for (ino, held) in &seen {
            if spaces.contains_key(ino) {
                continue;
            }
            if held.foreign {
                if foreign >= self.max_foreign {
                    if !WARNED_FOREIGN.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            limit = self.max_foreign,
                            "too many network namespaces held only from other user namespaces: the rest are not indexed, and callers in them are refused"
                        );
                    }
                    continue;
                }
                foreign += 1;
            }
            let path = &held.path;
            match Space::open(*ino, path, held.foreign) {
                Ok(space) => {
                    spaces.insert(*ino, Arc::new(space));
                }
                Err(e) => note_open_failure(path, &e),
            }
        }
        for space in spaces.values() {
            let stale = match scope {
                Refresh::Full => true,
                Refresh::New => addresses
                    .get(&space.ino)
                    .is_none_or(|list| list.iter().all(IpAddr::is_loopback)),
            };
            if !stale {
                continue;
            }
            match space.addresses() {
                Ok(list) => {
                    addresses.insert(space.ino, list);
                }
                Err(e) => {
                    addresses.remove(&space.ino);
                    tracing::warn!(netns = space.ino, error = %e, "cannot list the addresses of a network namespace");
                }
            }
        }
        let mut holders: HashMap<IpAddr, Vec<u64>> = HashMap::new();
        for (ino, list) in &addresses {
            for address in list {
                holders.entry(*address).or_default().push(*ino);
            }
        }
        metrics::gauge!(crate::metrics::NETWORK_NAMESPACES).set(spaces.len() as f64);
        *self.index.write().expect("netns index lock") = Index {
            spaces,
            addresses,
            holders,
        };
    }
}

fn note_open_failure(path: &Path, e: &io::Error) {
    // A process that exited between the scan and the open is ordinary.
    if e.kind() == io::ErrorKind::PermissionDenied
        && !WARNED_PRIVILEGE.swap(true, Ordering::Relaxed)
    {
        tracing::error!(
            path = %path.display(),
            error = %e,
            "cannot enter another network namespace: callers in containers are refused as unresolved; the daemon needs CAP_SYS_ADMIN and CAP_SYS_PTRACE (see README, Containers)"
        );
    } else {
        tracing::debug!(path = %path.display(), error = %e, "network namespace not opened");
    }
}

/// A namespace found by [`discover`].
struct Held {
    /// A path that opens it.
    path: PathBuf,
    /// No holder seen is in the daemon's user namespace (`host_user`), nor a `/run/netns` mount.
    foreign: bool,
}

/// Every network namespace some process or `/run/netns` mount refers to, but `host`.
fn discover(host: u64, host_user: u64) -> HashMap<u64, Held> {
    let mut found = HashMap::new();
    let mut denied = 0usize;
    let proc_entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    let named = fs::read_dir(NAMED_NAMESPACES)
        .into_iter()
        .flatten()
        .flatten();
    let candidates = proc_entries
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| {
            let process = e.path();
            // Unreadable (the process exited meanwhile) counts as foreign, the side the limit
            // is safe on; another holder in the daemon's user namespace still clears it.
            let foreign =
                fs::metadata(process.join("ns/user")).map_or(true, |meta| meta.ino() != host_user);
            (process.join("ns/net"), foreign)
        })
        .chain(named.map(|e| (e.path(), false)));
    for (path, foreign) in candidates {
        match fs::metadata(&path) {
            Ok(meta) if meta.ino() != host => {
                let held = found.entry(meta.ino()).or_insert(Held {
                    path,
                    foreign: true,
                });
                held.foreign &= foreign;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied += 1,
            Err(_) => {}
        }
    }
    if denied > 0 && !WARNED_PRIVILEGE.swap(true, Ordering::Relaxed) {
        tracing::error!(
            processes = denied,
            "cannot see the network namespaces of other processes: callers in containers are refused as unresolved; the daemon needs CAP_SYS_PTRACE and CAP_SYS_ADMIN (see README, Containers)"
        );
    }
    found
}

impl Space {
    /// Opens the namespace at `path` and the sockets inside it, from a thread that enters it
    /// and ends: `setns` changes only the calling thread, and no other thread ever moves.
    fn open(ino: u64, path: &Path, foreign: bool) -> io::Result<Self> {
        let file = fs::File::open(path)?;
        // The process may have exited and its pid been reused since the scan.
        if file.metadata()?.ino() != ino {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "namespace changed since the scan",
            ));
        }
        let (diag, route) = std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<(Socket, Socket)> {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    Ok((sock_diag::open()?, Socket::new(NETLINK_ROUTE)?))
                })
                .join()
                .map_err(|_| io::Error::other("namespace thread panicked"))?
        })?;
        Ok(Self {
            ino,
            foreign,
            diag: Mutex::new(diag),
            route: Mutex::new(route),
        })
    }

    /// Every address of this namespace's interfaces (an `RTM_GETADDR` dump).
    fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let socket = self.route.lock().expect("route socket lock");
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = 1;
        let mut request = NetlinkMessage::new(
            header,
            RouteNetlinkMessage::GetAddress(AddressMessage::default()).into(),
        );
        request.finalize();
        let mut buf = vec![0u8; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send_to(&buf, &NlAddr::new(0, 0), 0)?;
        let mut out = HashSet::new();
        let mut reply = vec![0u8; 32 * 1024];
        loop {
            let n = socket.recv(&mut &mut reply[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[offset..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(out.into_iter().collect()),
                    NetlinkPayload::Error(e) => {
                        return Err(e.code.map_or_else(
                            || io::Error::other("netlink error"),
                            |c| io::Error::from_raw_os_error(-c.get()),
                        ));
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                        out.extend(address.attributes.iter().filter_map(|a| match a {
                            AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => {
                                Some(ip.to_canonical())
                            }
                            _ => None,
                        }));
                    }
                    _ => {}
                }
                if length == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    ));
                }
                offset += length;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_namespace_is_never_indexed() {
        let namespaces = Namespaces::new().unwrap();
        namespaces.refresh();
        let index = namespaces.index.read().unwrap();
        assert!(!index.spaces.contains_key(&namespaces.host));
    }

    #[test]
    fn a_peer_no_namespace_holds_is_elsewhere() {
        let namespaces = Namespaces::new().unwrap();
        namespaces.refresh();
        let peer: SocketAddr = "192.0.2.77:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(namespaces.lookup(peer, local).unwrap(), Found::Elsewhere);
    }
}

//! Callers in another network namespace of this host, with real namespaces: a veth pair between
//! the test's own namespace and one it creates, a client connecting from inside. The caller is
//! found by its exact 4-tuple in the namespace that holds its address, and nowhere else; a
//! closed client, a tuple no socket has, and a namespace that is gone are never an identity.
//! Needs root (`ip netns`, `setns`), like the daemon with `[containers]`.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;

use imds_broker::identity::netns::{Found, Namespaces};
use imds_broker::identity::{Caller, Needs, Resolver};

/// A namespace `ip netns add` made, joined to this one by a veth pair; deleted on drop.
struct TestNetns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNetns {
    fn new(tag: u8) -> Self {
        let name = format!("imdsb-rs-{}-{tag}", std::process::id());
        let subnet = format!("10.231.{tag}");
        let (host_if, ns_if) = (
            format!("ib{tag}h{}", std::process::id() % 10000),
            format!("ib{tag}n"),
        );
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{subnet}.2/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self {
            name,
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
        }
    }

    fn ino(&self) -> u64 {
        fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }

    /// A client socket made inside the namespace, connected to `target`.
    fn connect(&self, target: SocketAddr) -> TcpStream {
        let file = fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                TcpStream::connect(target).unwrap()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn a_caller_in_another_namespace_is_found_there_and_only_there() {
    let netns = TestNetns::new(1);
    let listener = TcpListener::bind(format!("{}:0", netns.host_ip)).unwrap();
    let local = listener.local_addr().unwrap();
    let client = netns.connect(local);
    let (_server_side, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), netns.ns_ip);

    let namespaces = Arc::new(Namespaces::new().unwrap());
    // The first lookup finds the namespace by refreshing the index.
    match namespaces.find(peer, local).await.unwrap() {
        Found::Connected { owner, netns: ino } => {
            assert_eq!(ino, netns.ino());
            assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
            let socket_ino = fs::metadata(format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                client.as_raw_fd()
            }))
            .unwrap()
            .ino();
            assert_eq!(
                u64::from(owner.inode),
                socket_ino,
                "the client's own socket"
            );
        }
        other => panic!("{other:?}"),
    }

    // The resolver with containers on makes it a local caller of that namespace; without, it
    // stays a remote peer as before.
    let with = Arc::new(Resolver::with_containers(namespaces.clone()));
    match with
        .resolve_async(peer, local, Needs::default())
        .await
        .unwrap()
    {
        Caller::Local(l) => {
            assert_eq!(l.netns, Some(netns.ino()));
            assert!(l.cgroup.is_some());
        }
        other => panic!("{other:?}"),
    }
    let without = Arc::new(Resolver::new());
    assert_eq!(
        without
            .resolve_async(peer, local, Needs::default())
            .await
            .unwrap(),
        Caller::Remote { peer }
    );

    // The namespace holds the address, but no socket has this tuple: never a guess.
    let forged = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1).max(1));
    assert_eq!(
        namespaces.find(forged, local).await.unwrap(),
        Found::Missing
    );
    match with
        .resolve_async(forged, local, Needs::default())
        .await
        .unwrap()
    {
        Caller::Unresolved { reason, uid, .. } => {
            assert!(reason.contains("no socket"), "{reason}");
            assert_eq!(uid, None);
        }
        other => panic!("{other:?}"),
    }

    // A client that closed first has no process behind its socket.
    drop(client);
    let found = namespaces.lookup(peer, local).unwrap();
    assert!(
        matches!(found, Found::Closed | Found::Missing),
        "a closed client is nobody: {found:?}"
    );
}

#[tokio::test]
async fn namespaces_nobody_refers_to_are_dropped() {
    let netns = TestNetns::new(2);
    let ino = netns.ino();
    let namespaces = Arc::new(Namespaces::new().unwrap());
    namespaces.refresh();
    assert!(namespaces.contains(ino), "indexed while it exists");
    // Only the index's own sockets keep it alive now; the next refresh lets it go.
    drop(netns);
    namespaces.refresh();
    assert!(
        !namespaces.contains(ino),
        "dropped once nothing refers to it"
    );
}

/// A runtime makes the namespace before it gives it an address; a caller-driven refresh
/// re-reads such a namespace, and only the periodic full one re-reads the others (an address
/// added later is then refused until the sweep, never misattributed).
#[tokio::test]
async fn a_namespace_indexed_before_its_address_is_read_again() {
    use imds_broker::identity::netns::Refresh;
    let name = format!("imdsb-rs-{}-late", std::process::id());
    ip(&["netns", "add", &name]);
    let _cleanup = TestNetnsName(name.clone());
    ip(&["-n", &name, "link", "set", "lo", "up"]);
    let namespaces = Namespaces::new().unwrap();
    namespaces.refresh_with(Refresh::New);
    let local: SocketAddr = "10.231.4.1:80".parse().unwrap();
    let probe = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 40_000);
    assert_eq!(
        namespaces.lookup(probe("10.231.4.2"), local).unwrap(),
        Found::Elsewhere
    );

    let host_if = format!("ib4h{}", std::process::id() % 10000);
    ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "name", "ib4n",
    ]);
    ip(&["link", "set", "ib4n", "netns", &name]);
    ip(&["-n", &name, "addr", "add", "10.231.4.2/24", "dev", "ib4n"]);
    namespaces.refresh_with(Refresh::New);
    assert_eq!(
        namespaces.lookup(probe("10.231.4.2"), local).unwrap(),
        Found::Missing,
        "held now, and no socket has the tuple"
    );

    ip(&["-n", &name, "addr", "add", "10.231.4.9/24", "dev", "ib4n"]);
    namespaces.refresh_with(Refresh::New);
    assert_eq!(
        namespaces.lookup(probe("10.231.4.9"), local).unwrap(),
        Found::Elsewhere
    );
    namespaces.refresh_with(Refresh::Full);
    assert_eq!(
        namespaces.lookup(probe("10.231.4.9"), local).unwrap(),
        Found::Missing
    );
}

/// Deletes the named namespace on drop.
struct TestNetnsName(String);

impl Drop for TestNetnsName {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A process that `unshare -Urn` put into a user and network namespace of its own, as an
/// unprivileged uid: what any local user can make, as many as they like. Killed on drop.
struct UserMadeNetns {
    child: std::process::Child,
    ino: u64,
}

impl UserMadeNetns {
    fn new() -> Self {
        use std::io::BufRead;
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "unshare",
                "-Urn",
                "sh",
                "-c",
                "stat -L -c %i /proc/self/ns/net; exec sleep 120",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv and unshare (util-linux)");
        // The line comes once the namespace exists: no polling.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ino = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("unshare -Urn as nobody failed: {line:?}"));
        Self { child, ino }
    }
}

impl Drop for UserMadeNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each indexed namespace costs the daemon two descriptors, and any user can make namespaces:
/// those held only from other user namespaces are indexed up to a limit, and the namespaces
/// root made (containers, `ip netns`) are indexed whatever a user made.
#[tokio::test]
async fn namespaces_users_make_are_indexed_only_up_to_a_limit() {
    let user_made: Vec<UserMadeNetns> = (0..3).map(|_| UserMadeNetns::new()).collect();
    let root_made = TestNetns::new(5);
    let namespaces = Namespaces::with_foreign_limit(1).unwrap();
    namespaces.refresh();
    assert!(namespaces.contains(root_made.ino()), "root's namespace");
    let indexed = user_made
        .iter()
        .filter(|n| namespaces.contains(n.ino))
        .count();
    assert_eq!(indexed, 1, "user-made namespaces indexed: the limit is 1");
    // The limit holds across refreshes, and a freed place is taken again.
    namespaces.refresh();
    assert_eq!(
        user_made
            .iter()
            .filter(|n| namespaces.contains(n.ino))
            .count(),
        1
    );
    let (kept, others): (Vec<_>, Vec<_>) = user_made
        .into_iter()
        .partition(|n| namespaces.contains(n.ino));
    drop(kept);
    namespaces.refresh();
    assert_eq!(
        others.iter().filter(|n| namespaces.contains(n.ino)).count(),
        1,
        "the place the dropped one freed is taken"
    );
}

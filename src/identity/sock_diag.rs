//! Exact-match TCP socket lookup over netlink `sock_diag` (`inet_diag`): given a connection's
//! 4-tuple, the kernel tells us which uid owns the peer's socket. One request, one answer, no scan
//! of `/proc/net/tcp`.
//!
//! The kernel's exact lookup is the same one it uses to deliver a packet, so when no connected
//! socket has the 4-tuple it falls back to a *listening* socket on the source port, and it also
//! answers with TIME_WAIT and orphaned sockets (uid 0, inode 0). Only the reply is proof, and
//! only once checked: [`classify`] accepts a socket as the caller's only when its four address
//! fields are the ones asked for, it is in a connected state, and a file still holds it.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID` (kernels ≥ 5.7), which the crate leaves as an unparsed attribute.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_NOCOOKIE`: match by addresses alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// One `inet_diag_msg` with every attribute fits with room to spare.
const REPLY_BUFFER: usize = 8192;

/// What the kernel reports about the socket at the other end of a local connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub inode: u32,
    /// cgroup v2 id of the socket (kernels ≥ 5.7), if reported.
    pub cgroup_id: Option<u64>,
}

/// What this network namespace holds for a connection's client end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A live, connected socket with exactly this 4-tuple, held by a file: the caller runs here.
    Connected(SocketOwner),
    /// A socket with exactly this 4-tuple exists but nobody holds it any more (closed, in
    /// TIME_WAIT, orphaned). The kernel reports uid 0 for some of these: never an identity.
    Closed,
    /// No socket with this 4-tuple: the peer is not a socket of this namespace.
    NotFound,
}

impl Lookup {
    pub fn connected(self) -> Option<SocketOwner> {
        match self {
            Lookup::Connected(owner) => Some(owner),
            Lookup::Closed | Lookup::NotFound => None,
        }
    }
}

/// The TCP states of a client socket whose process can still be the caller: connected, or
/// half-closed after sending its request (`shutdown(SHUT_WR)`).
const LIVE_STATES: [u8; 3] = [TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2];

/// Finds the socket whose local address is `peer` and whose remote address is `local`, i.e. the
/// client end of a connection we accepted, in this network namespace.
pub fn lookup_peer(peer: SocketAddr, local: SocketAddr) -> io::Result<Lookup> {
    lookup_peer_on(&open()?, peer, local)
}

/// A `sock_diag` socket of the calling thread's network namespace: it answers for that namespace
/// for as long as it is open, whichever thread uses it later.
pub fn open() -> io::Result<Socket> {
    Socket::new(NETLINK_SOCK_DIAG)
}

/// [`lookup_peer`] through `socket`, in the namespace it was opened in. One request at a time
/// per socket: the caller serialises use of a shared one.
pub fn lookup_peer_on(socket: &Socket, peer: SocketAddr, local: SocketAddr) -> io::Result<Lookup> {
    let (peer, local) = (canonical(peer), canonical(local));
    let request = build_request(peer, local)?;
    socket.send_to(&request, &NlAddr::new(0, 0), 0)?;
    // Replies to sock_diag requests are produced synchronously inside sendmsg, so a blocking
    // receive returns at once.
    let mut buf = vec![0u8; REPLY_BUFFER];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    match parse_reply(&buf[..n])? {
        Some(response) => Ok(classify(&response, peer, local)),
        None => Ok(Lookup::NotFound),
    }
}

/// Whether `response` proves a live socket `peer -> local`; see the module comment.
pub fn classify(response: &InetResponse, peer: SocketAddr, local: SocketAddr) -> Lookup {
    let header = &response.header;
    let id = &header.socket_id;
    let same_tuple = SocketAddr::new(id.source_address, id.source_port) == peer
        && SocketAddr::new(id.destination_address, id.destination_port) == local
        && header.family == family_of(peer.ip());
    if !same_tuple {
        // A listener on the peer's port (0.0.0.0:port -> 0.0.0.0:0), or anything else the
        // kernel found instead: not this connection.
        return Lookup::NotFound;
    }
    if !LIVE_STATES.contains(&header.state) || header.inode == 0 {
        return Lookup::Closed;
    }
    Lookup::Connected(SocketOwner {
        uid: header.uid,
        inode: header.inode,
        cgroup_id: cgroup_id(response),
    })
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn build_request(peer: SocketAddr, local: SocketAddr) -> io::Result<Vec<u8>> {
    if peer.is_ipv4() != local.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer and local address families differ",
        ));
    }
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: family_of(peer.ip()),
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            // The exact lookup ignores this filter (see the module comment); `classify` does not.
            states: StateFlags::ESTABLISHED | StateFlags::FIN_WAIT1 | StateFlags::FIN_WAIT2,
            socket_id: SocketId {
                source_port: peer.port(),
                destination_port: local.port(),
                source_address: peer.ip(),
                destination_address: local.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    Ok(buf)
}

/// The one `inet_diag_msg` of an exact-lookup reply; `None` when the kernel found no socket.
fn parse_reply(buf: &[u8]) -> io::Result<Option<InetResponse>> {
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(Some(*response))
        }
        NetlinkPayload::Error(error) => match error.code.map(|c| -c.get()) {
            // ENOENT: no socket with that 4-tuple.
            None | Some(nix::libc::ENOENT) => Ok(None),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        },
        NetlinkPayload::Done(_) => Ok(None),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag reply: {other:?}"),
        )),
    }
}

fn cgroup_id(response: &InetResponse) -> Option<u64> {
    response.nlas.iter().find_map(|nla| match nla {
        Nla::Other(attr) if attr.kind() == INET_DIAG_CGROUP_ID => {
            let mut value = [0u8; 8];
            (attr.value_len() == value.len()).then(|| {
                attr.emit_value(&mut value);
                u64::from_ne_bytes(value)
            })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_the_owner_of_a_local_client_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server_side, peer) = listener.accept().unwrap();
        let owner = lookup_peer(peer, listener.local_addr().unwrap())
            .unwrap()
            .connected()
            .expect("the client socket is on this host");
        assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
        assert_ne!(owner.inode, 0);
        assert_eq!(
            owner.inode as u64,
            std::fs::metadata(format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                client.as_raw_fd()
            }))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
            "the inode is the client socket's own"
        );
    }

    #[test]
    fn finds_ipv6_and_v4_mapped_peers() {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        for target in [format!("[::1]:{port}"), format!("127.0.0.1:{port}")] {
            let _client = TcpStream::connect(&target).unwrap();
            let (server_side, peer) = listener.accept().unwrap();
            let local = server_side.local_addr().unwrap();
            let owner = lookup_peer(peer, local).unwrap();
            assert!(
                matches!(owner, Lookup::Connected(_)),
                "{target}: {peer} -> {local}: {owner:?}"
            );
        }
    }

    #[test]
    fn unknown_tuple_is_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            lookup_peer(fake_peer, listener.local_addr().unwrap()).unwrap(),
            Lookup::NotFound
        );
    }

    /// The security review's finding: a peer elsewhere whose source port is a port some local
    /// process listens on (on 0.0.0.0) was resolved as that process.
    #[test]
    fn a_listener_on_the_peers_source_port_is_not_the_peer() {
        let bystander = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = bystander.local_addr().unwrap().port();
        let daemon = TcpListener::bind("127.0.0.1:0").unwrap();
        for peer_ip in ["10.77.0.9", "127.0.0.1"] {
            let peer = SocketAddr::new(peer_ip.parse().unwrap(), port);
            assert_eq!(
                lookup_peer(peer, daemon.local_addr().unwrap()).unwrap(),
                Lookup::NotFound,
                "{peer}"
            );
        }
        let v6_bystander = TcpListener::bind("[::]:0").unwrap();
        let v6_port = v6_bystander.local_addr().unwrap().port();
        let peer = SocketAddr::new("fd00::9".parse().unwrap(), v6_port);
        assert_eq!(
            lookup_peer(peer, "[::1]:80".parse().unwrap()).unwrap(),
            Lookup::NotFound
        );
    }

    /// A client that closed first leaves its end in TIME_WAIT, which the kernel reports as
    /// uid 0: it must never become an identity.
    #[test]
    fn a_closed_client_socket_is_closed_not_root() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let client = TcpStream::connect(local).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        drop(client); // the client's active close: FIN_WAIT, then TIME_WAIT once we close too
        server_side
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
        drop(server_side);
        // The client end is now orphaned or in TIME_WAIT: it has no inode either way.
        let found = lookup_peer(peer, local).unwrap();
        assert!(
            matches!(found, Lookup::Closed | Lookup::NotFound),
            "{found:?}"
        );
        assert_eq!(found.connected(), None);
    }

    fn response(
        state: u8,
        inode: u32,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> InetResponse {
        use netlink_packet_sock_diag::inet::InetResponseHeader;
        InetResponse {
            header: InetResponseHeader {
                family: family_of(source.ip()),
                state,
                timer: None,
                socket_id: SocketId {
                    source_port: source.port(),
                    destination_port: destination.port(),
                    source_address: source.ip(),
                    destination_address: destination.ip(),
                    interface_id: 0,
                    cookie: [0; 8],
                },
                recv_queue: 0,
                send_queue: 0,
                uid: 1001,
                inode,
            },
            nlas: Default::default(),
        }
    }

    #[test]
    fn classify_checks_every_field_of_the_answer() {
        use netlink_packet_sock_diag::constants::{TCP_CLOSE_WAIT, TCP_LISTEN, TCP_TIME_WAIT};
        let peer: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let local: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let ok = |l: Lookup| matches!(l, Lookup::Connected(o) if o.uid == 1001 && o.inode == 7);
        assert!(ok(classify(
            &response(TCP_ESTABLISHED, 7, peer, local),
            peer,
            local
        )));
        assert!(ok(classify(
            &response(TCP_FIN_WAIT2, 7, peer, local),
            peer,
            local
        )));
        let wildcard: SocketAddr = "0.0.0.0:40000".parse().unwrap();
        let nowhere: SocketAddr = "0.0.0.0:0".parse().unwrap();
        for (r, want) in [
            (response(TCP_LISTEN, 7, wildcard, nowhere), Lookup::NotFound),
            (response(TCP_LISTEN, 7, peer, local), Lookup::Closed),
            (response(TCP_TIME_WAIT, 0, peer, local), Lookup::Closed),
            (response(TCP_CLOSE_WAIT, 7, peer, local), Lookup::Closed),
            (response(TCP_ESTABLISHED, 0, peer, local), Lookup::Closed),
            (
                response(TCP_ESTABLISHED, 7, "10.0.0.3:40000".parse().unwrap(), local),
                Lookup::NotFound,
            ),
            (
                response(TCP_ESTABLISHED, 7, "10.0.0.2:40001".parse().unwrap(), local),
                Lookup::NotFound,
            ),
            (
                response(
                    TCP_ESTABLISHED,
                    7,
                    peer,
                    "169.254.169.254:81".parse().unwrap(),
                ),
                Lookup::NotFound,
            ),
            (
                response(
                    TCP_ESTABLISHED,
                    7,
                    peer,
                    "169.254.169.253:80".parse().unwrap(),
                ),
                Lookup::NotFound,
            ),
        ] {
            assert_eq!(classify(&r, peer, local), want, "{:?}", r.header);
        }
    }
}

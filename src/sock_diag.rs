//! Exact-match TCP socket lookup over netlink `sock_diag` (`inet_diag`): given a connection's
//! 4-tuple, the kernel tells us which uid owns the peer's socket. One request, one answer, no scan
//! of `/proc/net/tcp`.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_CGROUP_ID: u16 = 21;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

/// What the kernel reports about the socket at the other end of a local connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub inode: u32,
    /// cgroup v2 id of the socket (kernels ≥ 5.7), if reported.
    pub cgroup_id: Option<u64>,
}

/// Finds the socket whose local address is `peer` and whose remote address is `local`, i.e. the
/// client end of a connection we accepted. `Ok(None)` means no such socket exists in this network
/// namespace: the caller is not a process on this host (or is already gone).
pub fn lookup_peer(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<SocketOwner>> {
    let request = build_request(peer, local)?;
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.send_to(&request, &NlAddr::new(0, 0), 0)?;
    // Replies to sock_diag requests are produced synchronously inside sendmsg, so a blocking
    // receive returns at once; 8 KiB holds one inet_diag_msg with all attributes.
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    parse_reply(&buf[..n])
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

fn ip_words(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

fn build_request(peer: SocketAddr, local: SocketAddr) -> io::Result<Vec<u8>> {
    let (src, dst) = (canonical(peer), canonical(local));
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer and local address families differ",
            ));
        }
    };
    let total = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut msg = Vec::with_capacity(total);
    // struct nlmsghdr (host byte order)
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    // struct inet_diag_req_v2
    msg.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every TCP state
    // struct inet_diag_sockid: ports and addresses in network byte order
    msg.extend_from_slice(&src.port().to_be_bytes());
    msg.extend_from_slice(&dst.port().to_be_bytes());
    msg.extend_from_slice(&ip_words(src.ip()));
    msg.extend_from_slice(&ip_words(dst.ip()));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    msg.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    debug_assert_eq!(msg.len(), total);
    Ok(msg)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn parse_reply(buf: &[u8]) -> io::Result<Option<SocketOwner>> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag reply");
    if buf.len() < NLMSG_HDRLEN {
        return Err(short());
    }
    let len = (u32_at(buf, 0) as usize).min(buf.len());
    match u16_at(buf, 4) {
        NLMSG_ERROR => {
            if len < NLMSG_HDRLEN + 4 {
                return Err(short());
            }
            let errno = -(u32_at(buf, NLMSG_HDRLEN) as i32);
            match errno {
                0 => Ok(None),
                2 => Ok(None), // ENOENT: no local socket with that 4-tuple
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        NLMSG_DONE => Ok(None),
        SOCK_DIAG_BY_FAMILY => {
            if len < NLMSG_HDRLEN + INET_DIAG_MSG_LEN {
                return Err(short());
            }
            let body = &buf[NLMSG_HDRLEN..len];
            let uid = u32_at(body, 64);
            let inode = u32_at(body, 68);
            Ok(Some(SocketOwner {
                uid,
                inode,
                cgroup_id: find_cgroup_id(&body[INET_DIAG_MSG_LEN..]),
            }))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink message type {other}"),
        )),
    }
}

/// Walks the rtattr list that follows `inet_diag_msg`.
fn find_cgroup_id(mut attrs: &[u8]) -> Option<u64> {
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0) as usize;
        let kind = u16_at(attrs, 2);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            return Some(u64::from_ne_bytes(attrs[4..12].try_into().ok()?));
        }
        attrs = &attrs[(len + 3) & !3..];
    }
    None
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
            .expect("the client socket is on this host");
        assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
        assert_ne!(owner.inode, 0);
        drop(client);
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
            assert!(owner.is_some(), "{target}: {peer} -> {local}");
        }
    }

    #[test]
    fn unknown_tuple_is_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            lookup_peer(fake_peer, listener.local_addr().unwrap()).unwrap(),
            None
        );
    }
}

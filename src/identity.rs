//! Who is calling: resolves each accepted connection to the local process identity that owns the
//! other end, once per connection, before any request on it is read.

use std::fmt;
use std::net::SocketAddr;

use crate::sock_diag;

/// The identity of the peer of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A socket owned by a process on this host (same network namespace as the daemon).
    Local { uid: u32, peer: SocketAddr },
    /// No local socket has this 4-tuple: another host, another network namespace, or a process
    /// that already closed its socket.
    Remote { peer: SocketAddr },
    /// The kernel could not be asked. Matches no rule.
    Unresolved { peer: SocketAddr, reason: String },
}

impl Caller {
    /// Resolves the owner of the connection `peer -> local` that the daemon accepted.
    pub fn resolve(peer: SocketAddr, local: SocketAddr) -> Self {
        match sock_diag::lookup_peer(peer, local) {
            Ok(Some(owner)) => Caller::Local {
                uid: owner.uid,
                peer,
            },
            Ok(None) => Caller::Remote { peer },
            Err(e) => Caller::Unresolved {
                peer,
                reason: e.to_string(),
            },
        }
    }

    pub fn uid(&self) -> Option<u32> {
        match self {
            Caller::Local { uid, .. } => Some(*uid),
            _ => None,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        match self {
            Caller::Local { peer, .. }
            | Caller::Remote { peer }
            | Caller::Unresolved { peer, .. } => *peer,
        }
    }

    /// The part of the identity a session token is bound to: a token minted for one identity is
    /// refused when another presents it. Ports are excluded so a client may reconnect.
    pub fn token_binding(&self) -> String {
        match self {
            Caller::Local { uid, .. } => format!("local:uid={uid}"),
            Caller::Remote { peer } => format!("remote:{}", peer.ip()),
            Caller::Unresolved { peer, .. } => format!("unresolved:{}", peer.ip()),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Local { uid, peer } => write!(f, "uid {uid} via {peer}"),
            Caller::Remote { peer } => write!(f, "non-local peer {peer}"),
            Caller::Unresolved { peer, reason } => write!(f, "unresolved peer {peer} ({reason})"),
        }
    }
}

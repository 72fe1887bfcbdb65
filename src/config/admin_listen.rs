//! `[admin] listen`: where the admin listener (metrics, health, status) is.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the admin listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    Unix(PathBuf),
    /// Loopback only: validated when the config is loaded.
    Tcp(SocketAddr),
}

impl FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err("a unix: path must be absolute".into());
            }
            return Ok(AdminListen::Unix(path.into()));
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| "must be unix:/absolute/path or a loopback IP:port".to_string())?;
        if !addr.ip().is_loopback() {
            return Err("a TCP admin listener must be on a loopback address".into());
        }
        Ok(AdminListen::Tcp(addr))
    }
}

impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminListen::Unix(p) => write!(f, "unix:{}", p.display()),
            AdminListen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

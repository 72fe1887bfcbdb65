//! An app's `match` table as data: which criteria a caller must meet. What they mean for a
//! caller is `policy`'s to say.

use ipnet::IpNet;

use crate::glob::Glob;

/// The `match` table of one app. Every criterion that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub exe: Option<Glob>,
    /// Lower-case hex.
    pub exe_sha256: Option<String>,
    /// A unit of the system manager (see [`crate::identity::cgroup::Units`]).
    pub systemd_unit: Option<Glob>,
    /// A unit of one user's manager: `(uid, unit)`.
    pub systemd_user_unit: Option<(u32, Glob)>,
    pub cgroup: Option<Glob>,
    /// Peers that are not sockets of this host, unless the rule also pins a local identity.
    pub source: Vec<IpNet>,
}

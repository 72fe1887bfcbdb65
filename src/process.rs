//! Which process holds a socket: finds the owner of a socket inode in `/proc`, without scanning
//! every process for every connection. Candidates are the processes of the socket's cgroup
//! (`cgroup.procs`: on a systemd host, the service's own processes), every one of them checked
//! so that a socket shared by two programs is detected; only when none holds it (the creator
//! moved cgroups) are all processes of the socket's uid scanned. A pid reused by a new process
//! is detected by its start time.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The process on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub exe: PathBuf,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid, it
    /// names one process for the life of the system.
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("no process holds the socket any more")]
    Gone,
    #[error("the socket is held by {count} processes with different identities")]
    Ambiguous { count: usize },
    #[error(
        "permission denied reading /proc/{pid}: reading other users' processes needs \
         CAP_SYS_PTRACE (and CAP_DAC_READ_SEARCH for their executables)"
    )]
    Permission { pid: u32 },
}

/// The process holding socket `inode`, created by `uid`, whose cgroup directory (absolute,
/// under the cgroup2 mount) is `cgroup_dir` when known.
pub fn owner_of_socket(
    inode: u32,
    uid: u32,
    cgroup_dir: Option<&Path>,
) -> Result<ProcessInfo, ProcessError> {
    if let Some(candidates) = cgroup_dir.and_then(pids_in_cgroup) {
        match find_holders(&candidates, inode) {
            Err(ProcessError::Gone) => {}
            decided => return decided,
        }
    }
    find_holders(&pids_of_uid(uid), inode)
}

fn find_holders(candidates: &[u32], inode: u32) -> Result<ProcessInfo, ProcessError> {
    let mut holders: Vec<ProcessInfo> = Vec::new();
    let mut denied = None;
    for &pid in candidates {
        match holder(pid, inode) {
            Ok(Some(info)) => holders.push(info),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = Some(pid),
            Err(_) => {} // exited while we looked
        }
    }
    let Some(first) = holders.first() else {
        return Err(match denied {
            Some(pid) => ProcessError::Permission { pid },
            None => ProcessError::Gone,
        });
    };
    // Forked workers of one program share sockets legitimately; different programs or users
    // sharing one do not tell us who is asking.
    if holders
        .iter()
        .any(|h| h.exe != first.exe || h.uid != first.uid || h.gid != first.gid)
    {
        return Err(ProcessError::Ambiguous {
            count: holders.len(),
        });
    }
    Ok(first.clone())
}

/// `Ok(Some(info))` if process `pid` holds socket `inode`, read consistently: the start time is
/// read before and after, so a pid recycled meanwhile is never mistaken for the holder.
fn holder(pid: u32, inode: u32) -> io::Result<Option<ProcessInfo>> {
    let before = start_time(pid)?;
    if !holds_socket(pid, inode)? {
        return Ok(None);
    }
    let exe = fs::read_link(format!("/proc/{pid}/exe"))?;
    let (uid, gid) = real_ids(pid)?;
    if start_time(pid)? != before {
        return Ok(None);
    }
    Ok(Some(ProcessInfo {
        pid,
        uid,
        gid,
        exe,
        start_time: before,
    }))
}

fn holds_socket(pid: u32, inode: u32) -> io::Result<bool> {
    let target = format!("socket:[{inode}]");
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        if fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Field 22 of `/proc/<pid>/stat`, counted after the parenthesised command name (which may
/// itself contain spaces and parentheses).
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))?;
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))
}

/// Real uid and gid from `/proc/<pid>/status`.
fn real_ids(pid: u32) -> io::Result<(u32, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    match (field("Uid:"), field("Gid:")) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bad status")),
    }
}

/// Reads a process by pid for `explain`: its ids, executable and start time.
pub fn describe(pid: u32) -> io::Result<ProcessInfo> {
    let before = start_time(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))?;
    let (uid, gid) = real_ids(pid)?;
    if start_time(pid)? != before {
        return Err(io::Error::new(io::ErrorKind::NotFound, "process replaced"));
    }
    Ok(ProcessInfo {
        pid,
        uid,
        gid,
        exe,
        start_time: before,
    })
}

fn pids_in_cgroup(dir: &Path) -> Option<Vec<u32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    Some(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn pids_of_uid(uid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (e.metadata().ok()?.uid() == uid).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn inode_of(stream: &TcpStream) -> u32 {
        let local = stream.local_addr().unwrap();
        let peer = stream.peer_addr().unwrap();
        crate::sock_diag::lookup_peer(local, peer)
            .unwrap()
            .unwrap()
            .inode
    }

    #[test]
    fn finds_this_process_as_the_holder() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let inode = inode_of(&client);
        let me = std::process::id();
        let uid = nix::unistd::geteuid().as_raw();
        let found = owner_of_socket(inode, uid, None).unwrap();
        assert_eq!(found.pid, me);
        assert_eq!(found.exe, std::env::current_exe().unwrap());
        assert_eq!(found.start_time, start_time(me).unwrap());
    }

    #[test]
    fn a_closed_socket_has_no_holder() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let inode = inode_of(&client);
        drop(client);
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(owner_of_socket(inode, uid, None), Err(ProcessError::Gone));
    }

    #[test]
    fn stat_parsing_survives_parentheses_in_the_command_name() {
        // Our own stat is well-formed; the parser must count from the last ')'.
        assert!(start_time(std::process::id()).unwrap() > 0);
    }
}

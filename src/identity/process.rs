//! Which process holds a socket: finds the owner of a socket inode in `/proc`, without scanning
//! every process for every connection. Candidates are the processes of the socket's cgroup
//! (`cgroup.procs`: on a systemd host, the service's own processes), every one of them checked
//! so that a socket shared by two programs is detected; only when none holds it (the creator
//! moved cgroups) are all processes of the socket's uid scanned.
//!
//! Every read about one candidate goes through a directory handle on `/proc/<pid>` opened once:
//! the handle names that process, not its number, so once the process is gone reads through it
//! fail instead of describing a newcomer that reused the pid. No start-time comparison is needed
//! to tell them apart.
//!
//! Why every candidate must be read, however many there are: Linux keeps no index from an open
//! file to the file tables that hold it, so the only proof that no second program holds the
//! socket is to have looked at every candidate's table. Stopping at the first holder, or
//! skipping candidates of another uid (a process may drop privileges after connecting, or be
//! handed the socket), would let a sharer go unseen: the cost is linear in the number of
//! processes in the caller's own cgroup, and independent of every other process on the host.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;

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
    /// A candidate could not be read for another reason (e.g. the daemon is out of file
    /// descriptors): it may be a holder, so nobody can be named.
    #[error("cannot read /proc/{pid}: {reason}")]
    Unreadable { pid: u32, reason: String },
}

/// Flags for the directory handles: read-only, never inherited by anything the daemon runs.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC);

/// The process holding socket `inode`, created by `uid`, whose cgroup directory (absolute,
/// under the cgroup2 mount) is `cgroup_dir` when known.
pub fn owner_of_socket(
    inode: u32,
    uid: u32,
    cgroup_dir: Option<&Path>,
) -> Result<ProcessInfo, ProcessError> {
    owner_of_socket_within(inode, uid, cgroup_dir, &mut Budget::Unlimited)
        .expect("an unlimited budget is never exhausted")
}

/// How much `/proc` reading a lookup may do: a lookup made on an async worker must stay short,
/// and gives up (to be redone on the blocking pool) rather than run long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Unlimited,
    /// Reads left: each candidate process costs [`CANDIDATE_COST`], each of its fds one.
    Reads(usize),
}

/// What opening a candidate costs against a [`Budget`], counted in fd reads: the directory
/// opens and closes around its listing.
pub const CANDIDATE_COST: usize = 4;

impl Budget {
    /// Takes `n` reads; false once the budget cannot cover them.
    fn spend(&mut self, n: usize) -> bool {
        match self {
            Budget::Unlimited => true,
            Budget::Reads(left) => match left.checked_sub(n) {
                Some(rest) => {
                    *left = rest;
                    true
                }
                None => false,
            },
        }
    }
}

/// [`owner_of_socket`] within `budget`: `None` if the lookup would need more (the answer is
/// then unknown, not negative).
pub fn owner_of_socket_within(
    inode: u32,
    uid: u32,
    cgroup_dir: Option<&Path>,
    budget: &mut Budget,
) -> Option<Result<ProcessInfo, ProcessError>> {
    let target = format!("socket:[{inode}]");
    if let Some(candidates) = cgroup_dir.and_then(pids_in_cgroup) {
        match find_holders(&candidates, target.as_bytes(), budget)? {
            Err(ProcessError::Gone) => {}
            decided => return Some(decided),
        }
    }
    // Every process of the uid: never cheap.
    if *budget != Budget::Unlimited {
        return None;
    }
    find_holders(&pids_of_uid(uid), target.as_bytes(), budget)
}

/// The one identity holding the socket whose fd link reads `target`, having read every
/// candidate. A candidate that could not be read for any reason but permission might be a
/// second holder, so then nobody is named.
fn find_holders(
    candidates: &[u32],
    target: &[u8],
    budget: &mut Budget,
) -> Option<Result<ProcessInfo, ProcessError>> {
    let mut holders: Vec<ProcessInfo> = Vec::new();
    let mut denied = None;
    for &pid in candidates {
        if !budget.spend(CANDIDATE_COST) {
            return None;
        }
        match Proc::open(pid).and_then(|p| p.scan(target, budget)) {
            Ok(Scan::Holder(info)) => holders.push(info),
            Ok(Scan::NotHolder) => {}
            Ok(Scan::OverBudget) => return None,
            Err(e) if exited(&e) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = Some(pid),
            Err(e) => {
                return Some(Err(ProcessError::Unreadable {
                    pid,
                    reason: e.to_string(),
                }));
            }
        }
    }
    let Some(first) = holders.first() else {
        return Some(Err(match denied {
            Some(pid) => ProcessError::Permission { pid },
            None => ProcessError::Gone,
        }));
    };
    // Forked workers of one program share sockets legitimately; different programs or users
    // sharing one do not tell us who is asking.
    if holders
        .iter()
        .any(|h| h.exe != first.exe || h.uid != first.uid || h.gid != first.gid)
    {
        return Some(Err(ProcessError::Ambiguous {
            count: holders.len(),
        }));
    }
    Some(Ok(first.clone()))
}

/// What reading one candidate found.
enum Scan {
    Holder(ProcessInfo),
    NotHolder,
    OverBudget,
}

/// What `/proc` answers about a process that has exited (or whose fd was closed) meanwhile.
fn exited(e: &io::Error) -> bool {
    let errno = e.raw_os_error().map(Errno::from_raw);
    matches!(errno, Some(Errno::ENOENT | Errno::ESRCH))
}

/// One process, held by a `/proc/<pid>` directory handle: every read goes through it, so all
/// of them describe the same process (see the module comment).
struct Proc {
    pid: u32,
    dir: OwnedFd,
}

impl Proc {
    fn open(pid: u32) -> io::Result<Self> {
        let dir = fcntl::open(format!("/proc/{pid}").as_str(), DIR_FLAGS, Mode::empty())?;
        Ok(Self { pid, dir })
    }

    /// Whether one of this process's fds links to `target`, and then who the process is.
    fn scan(&self, target: &[u8], budget: &mut Budget) -> io::Result<Scan> {
        let fds = fcntl::openat(&self.dir, "fd", DIR_FLAGS, Mode::empty())?;
        // Listed through our own handle (nix's `dir` is not built here): the listing is of
        // this very directory, even if the pid has been reused since.
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", fds.as_raw_fd()))?;
        for entry in listing {
            let name = entry?.file_name();
            if !budget.spend(1) {
                return Ok(Scan::OverBudget);
            }
            match fcntl::readlinkat(fds.as_fd(), name.as_os_str()) {
                Ok(link) if link.as_bytes() == target => return self.describe().map(Scan::Holder),
                Ok(_) | Err(Errno::ENOENT) => {} // another file, or closed since listed
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Scan::NotHolder)
    }

    fn describe(&self) -> io::Result<ProcessInfo> {
        let exe = PathBuf::from(fcntl::readlinkat(self.dir.as_fd(), "exe")?);
        let (uid, gid) = real_ids(&self.read("status")?)?;
        let start_time = start_time_in(&self.read("stat")?)?;
        Ok(ProcessInfo {
            pid: self.pid,
            uid,
            gid,
            exe,
            start_time,
        })
    }

    fn read(&self, name: &str) -> io::Result<String> {
        let fd = fcntl::openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // `read_to_string` would stat the file (procfs says size 0) and then grow its buffer
        // from 32 bytes; `stat` and `status` fit in one page.
        let mut file = File::from(fd);
        let mut text = Vec::with_capacity(PROC_FILE_CAPACITY);
        let mut chunk = [0u8; PROC_FILE_CAPACITY];
        loop {
            match file.read(&mut chunk)? {
                0 => break,
                n => text.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Enough for `/proc/<pid>/status` (about 1.5 KiB) in one read.
const PROC_FILE_CAPACITY: usize = 4096;

/// Field 22 of `/proc/<pid>/stat`, the start time in clock ticks since boot.
pub fn start_time(pid: u32) -> io::Result<u64> {
    Proc::open(pid)?
        .read("stat")
        .and_then(|s| start_time_in(&s))
}

/// Field 22 of a `stat` text, counted after the parenthesised command name (which may itself
/// contain spaces and parentheses).
fn start_time_in(stat: &str) -> io::Result<u64> {
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

/// Real uid and gid from a `status` text.
fn real_ids(status: &str) -> io::Result<(u32, u32)> {
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
    Proc::open(pid)?.describe()
}

fn pids_in_cgroup(dir: &Path) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    Some(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn pids_of_uid(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
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
        crate::identity::sock_diag::lookup_peer(local, peer)
            .unwrap()
            .connected()
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
        let target = format!("socket:[{}]", inode_of(&client));
        let me = [std::process::id()];
        assert_eq!(
            find_holders(&me, target.as_bytes(), &mut Budget::Unlimited)
                .unwrap()
                .unwrap()
                .pid,
            me[0]
        );
        drop(client);
        assert_eq!(
            find_holders(&me, target.as_bytes(), &mut Budget::Unlimited),
            Some(Err(ProcessError::Gone))
        );
    }

    /// A child running `argv` until killed.
    fn spawn(argv: &[&str]) -> std::process::Child {
        std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// A child running `argv` with pid `pid`, steered there through `ns_last_pid`
    /// (root only); other processes forking meanwhile may take the pid first, hence the tries.
    fn spawn_with_pid(pid: u32, argv: &[&str]) -> std::process::Child {
        const TRIES: usize = 1000;
        for _ in 0..TRIES {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
            let mut child = spawn(argv);
            if child.id() == pid {
                return child;
            }
            child.kill().unwrap();
            child.wait().unwrap();
        }
        panic!("pid {pid} was not reused in {TRIES} tries");
    }

    #[test]
    fn a_process_handle_never_describes_a_process_that_reused_its_pid() {
        let mut first = spawn(&["/usr/bin/sleep", "60"]);
        let pid = first.id();
        let handle = Proc::open(pid).unwrap();
        assert_eq!(
            handle.describe().unwrap().exe,
            PathBuf::from("/usr/bin/sleep")
        );
        first.kill().unwrap();
        first.wait().unwrap();
        let err = handle.describe().unwrap_err();
        assert!(exited(&err), "{err}");
        if !nix::unistd::geteuid().is_root() {
            return; // only root can steer which pid the next process gets
        }
        let mut second = spawn_with_pid(pid, &["/usr/bin/cat"]);
        assert_eq!(describe(pid).unwrap().exe, PathBuf::from("/usr/bin/cat"));
        let err = handle.describe().unwrap_err();
        second.kill().unwrap();
        second.wait().unwrap();
        assert!(
            exited(&err),
            "the old handle answered for the new process: {err}"
        );
    }

    #[test]
    fn a_lookup_over_its_budget_gives_up_instead_of_answering() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let target = format!("socket:[{}]", inode_of(&client));
        let me = [std::process::id()];
        // Enough to open this process, not to read its fds (a test binary has several).
        let mut short = Budget::Reads(CANDIDATE_COST);
        assert_eq!(find_holders(&me, target.as_bytes(), &mut short), None);
        let mut ample = Budget::Reads(10_000);
        let found = find_holders(&me, target.as_bytes(), &mut ample);
        assert_eq!(found.unwrap().unwrap().pid, me[0]);
        // Scanning every process of a uid is never within a budget.
        let uid = nix::unistd::geteuid().as_raw();
        let mut ample = Budget::Reads(10_000);
        assert_eq!(
            owner_of_socket_within(inode_of(&client), uid, None, &mut ample),
            None
        );
    }

    #[test]
    fn stat_parsing_survives_parentheses_in_the_command_name() {
        // Our own stat is well-formed; the parser must count from the last ')'.
        assert!(start_time(std::process::id()).unwrap() > 0);
    }
}

//! Directories the daemon writes in, opened so that nobody but root and the daemon's own user
//! can redirect what it writes there.
//!
//! A path from the config (a `token_file`, the `state_dir`) is opened from `/` one component at
//! a time with `O_NOFOLLOW | O_DIRECTORY` relative to the previous component's handle, and each
//! handle is checked with `fstat` (not the path) before the next step: it must be a directory,
//! owned by root or the daemon's user, and writable by nobody else. A symbolic link anywhere on
//! the way is refused, whoever owns it: following one would mean checking the directories it
//! leads through as well, and naming the real path costs the operator nothing.
//!
//! A world-writable directory is accepted on the way (never as the directory that holds the
//! file) only if it is root's and sticky, like `/tmp`: there nobody but root and an entry's
//! owner may rename or remove the entry, and the next component must itself be root's or the
//! daemon's, so nobody else can swap it.
//!
//! Every change in the directory is then made relative to its handle (`openat` with `O_EXCL |
//! O_NOFOLLOW`, `fchown`, `fchmod`, `renameat`, `unlinkat`): once the walk has passed, a later
//! change to the path by someone else cannot move the daemon's writes elsewhere.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fsync, linkat, unlinkat};
use rand::RngCore;

/// A directory reached from `/` through no symbolic link and only through directories that
/// root or the daemon's user alone can change.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Why a directory was not opened. Each names the component at fault.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: not an absolute path", path.display())]
    Relative { path: PathBuf },
    #[error("{}: has a `..` component", path.display())]
    DotDot { path: PathBuf },
    #[error("{}: is a symbolic link (owner uid {uid}); name the directory it leads to", path.display())]
    Symlink { path: PathBuf, uid: u32 },
    #[error("{}: not a directory", path.display())]
    NotDirectory { path: PathBuf },
    #[error(
        "{}: owned by uid {uid} (mode {mode:o}); a directory on the way must be root's or the daemon's user's (uid {euid})",
        path.display()
    )]
    Owner {
        path: PathBuf,
        uid: u32,
        mode: u32,
        euid: u32,
    },
    #[error(
        "{}: owned by uid {uid} (mode {mode:o}); it must be the daemon's user's (uid {euid})",
        path.display()
    )]
    NotOwn {
        path: PathBuf,
        uid: u32,
        mode: u32,
        euid: u32,
    },
    #[error(
        "{}: writable by others (owner uid {uid}, mode {mode:o}); only root and the daemon's user may change a directory on the way",
        path.display()
    )]
    Writable { path: PathBuf, uid: u32, mode: u32 },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl DirError {
    /// Whether a component does not exist (as opposed to being refused).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DirError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn io(path: &Path, errno: Errno) -> Self {
        DirError::Io {
            path: path.to_owned(),
            source: errno.into(),
        }
    }
}

impl From<DirError> for io::Error {
    fn from(e: DirError) -> Self {
        let kind = match &e {
            DirError::Io { source, .. } => source.kind(),
            DirError::Relative { .. } | DirError::DotDot { .. } => io::ErrorKind::InvalidInput,
            DirError::NotDirectory { .. } => io::ErrorKind::NotADirectory,
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}

/// Logs that [`SafeDir::private`] narrowed the daemon's directory `path` from `mode`.
pub fn report_narrowed(path: &Path, mode: u32) {
    tracing::warn!(
        path = %path.display(),
        "state_dir was mode {mode:o}: others could read or search it; narrowed to 0700"
    );
}

/// What a directory is to the walk, and so what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// On the way: root's or the daemon's, writable by nobody else unless root's and sticky.
    Passed,
    /// Holds what the daemon writes: root's or the daemon's, writable by nobody else.
    Holder,
    /// The daemon's own directory (`state_dir`): the daemon's, writable by nobody else.
    Private,
}

impl Role {
    fn check(self, path: &Path, stat: &FileStat) -> Result<(), DirError> {
        let (uid, mode) = (stat.st_uid, stat.st_mode & 0o7777);
        let euid = nix::unistd::geteuid().as_raw();
        if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
            return Err(DirError::NotDirectory {
                path: path.to_owned(),
            });
        }
        let path = path.to_owned();
        match self {
            Role::Private if uid != euid => {
                return Err(DirError::NotOwn {
                    path,
                    uid,
                    mode,
                    euid,
                });
            }
            _ if uid != 0 && uid != euid => {
                return Err(DirError::Owner {
                    path,
                    uid,
                    mode,
                    euid,
                });
            }
            _ => {}
        }
        let sticky_roots = self == Role::Passed && uid == 0 && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_roots {
            return Err(DirError::Writable { path, uid, mode });
        }
        Ok(())
    }
}

/// The names of `path`'s components after `/`; `.` dropped, `..` refused (it could climb out
/// of a directory that was checked into one that was not).
fn names(path: &Path) -> Result<Vec<&OsStr>, DirError> {
    if !path.is_absolute() {
        return Err(DirError::Relative {
            path: path.to_owned(),
        });
    }
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::ParentDir => {
                return Err(DirError::DotDot {
                    path: path.to_owned(),
                });
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(names)
}

/// One step of the walk: `name` in `parent`, opened without following a link, made if missing
/// and `create` says with what mode, and checked for `role`.
fn step(
    parent: &SafeDir,
    name: &OsStr,
    role: Role,
    create: Option<Mode>,
) -> Result<SafeDir, DirError> {
    let path = parent.path.join(name);
    // A directory only passed through is opened O_PATH: searching it needs no read permission.
    let access = if role == Role::Passed {
        OFlag::O_PATH
    } else {
        OFlag::O_RDONLY
    };
    let flags = access | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match (openat(&parent.fd, name, flags, Mode::empty()), create) {
        (Err(Errno::ENOENT), Some(mode)) => {
            match mkdirat(&parent.fd, name, mode) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(DirError::io(&path, e)),
            }
            openat(&parent.fd, name, flags, Mode::empty())
        }
        (opened, _) => opened,
    }
    .map_err(|e| refusal(parent, name, &path, e))?;
    let stat = fstat(&fd).map_err(|e| DirError::io(&path, e))?;
    role.check(&path, &stat)?;
    Ok(SafeDir { fd, path })
}

/// What an `openat` failure means: a link or a non-directory where a directory was expected
/// is said so (with what is there now), anything else is the system's error.
fn refusal(parent: &SafeDir, name: &OsStr, path: &Path, errno: Errno) -> DirError {
    if matches!(errno, Errno::ELOOP | Errno::ENOTDIR)
        && let Ok(stat) = fstatat(&parent.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
    {
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFLNK {
            return DirError::Symlink {
                path: path.to_owned(),
                uid: stat.st_uid,
            };
        }
        if kind != SFlag::S_IFDIR {
            return DirError::NotDirectory {
                path: path.to_owned(),
            };
        }
    }
    DirError::io(path, errno)
}

/// `name` must be one plain component: the file operations never leave their directory.
fn plain(name: &OsStr) -> io::Result<&OsStr> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(n)), None) if n == name => Ok(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a plain file name", name.to_string_lossy()),
        )),
    }
}

impl SafeDir {
    /// Walks `path` with `last` for its final component; missing components are made with
    /// `create` when given.
    fn walk(path: &Path, last: Role, create: Option<Mode>) -> Result<Self, DirError> {
        let names = names(path)?;
        let root = PathBuf::from("/");
        let role_of_root = if names.is_empty() { last } else { Role::Passed };
        let access = if role_of_root == Role::Passed {
            OFlag::O_PATH
        } else {
            OFlag::O_RDONLY
        };
        let fd = nix::fcntl::open(
            "/",
            access | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| DirError::io(&root, e))?;
        let stat = fstat(&fd).map_err(|e| DirError::io(&root, e))?;
        role_of_root.check(&root, &stat)?;
        let mut dir = SafeDir { fd, path: root };
        for (i, name) in names.iter().enumerate() {
            let role = if i + 1 == names.len() {
                last
            } else {
                Role::Passed
            };
            dir = step(&dir, name, role, create)?;
        }
        Ok(dir)
    }

    /// Opens `path`, a directory to write in (see the module's rules).
    pub fn open(path: &Path) -> Result<Self, DirError> {
        Self::walk(path, Role::Holder, None)
    }

    /// Opens the directory that holds `file`, and gives the file's name in it.
    pub fn open_parent(file: &Path) -> Result<(Self, &OsStr), DirError> {
        let name = match names(file)?.last() {
            Some(name) => *name,
            None => {
                return Err(DirError::NotDirectory {
                    path: file.to_owned(),
                });
            }
        };
        let parent = file.parent().unwrap_or(Path::new("/"));
        Ok((Self::open(parent)?, name))
    }

    /// Opens the directory `path`, making it (not its parent) with `mode` if it is missing, and
    /// gives it exactly `mode` (a umask does not narrow it, an earlier mode does not linger).
    pub fn ensure(path: &Path, mode: u32) -> Result<Self, DirError> {
        let Some(name) = names(path)?.last().copied() else {
            return Err(DirError::Io {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory to make"),
            });
        };
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = step(
            &Self::open(parent)?,
            name,
            Role::Holder,
            Some(Mode::from_bits_truncate(mode)),
        )?;
        fchmod(&dir.fd, Mode::from_bits_truncate(mode)).map_err(|e| DirError::io(path, e))?;
        Ok(dir)
    }

    /// Opens the daemon's own directory `path` (making it and any missing parent 0700): it must
    /// be the daemon's user's and writable by nobody else. One others may read or search is
    /// narrowed to 0700; the mode it had is returned then, for the caller to report.
    pub fn private(path: &Path) -> Result<(Self, Option<u32>), DirError> {
        if names(path)?.is_empty() {
            return Err(DirError::Io {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory of its own"),
            });
        }
        let dir = Self::walk(path, Role::Private, Some(Mode::S_IRWXU))?;
        let mode = fstat(&dir.fd).map_err(|e| DirError::io(path, e))?.st_mode & 0o7777;
        if mode & 0o077 == 0 {
            return Ok((dir, None));
        }
        fchmod(&dir.fd, Mode::S_IRWXU).map_err(|e| DirError::io(path, e))?;
        Ok((dir, Some(mode)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is at `name`, without following a link.
    pub fn stat(&self, name: &OsStr) -> io::Result<FileStat> {
        Ok(fstatat(
            &self.fd,
            plain(name)?,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?)
    }

    /// Opens the file `name` for reading; a link there is refused.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        Ok(openat(&self.fd, plain(name)?, flags, Mode::empty())?.into())
    }

    /// Makes the new file `name` (nothing may be there, not even a link) with `mode`.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let file: File = openat(
            &self.fd,
            plain(name)?,
            flags,
            Mode::from_bits_truncate(mode),
        )?
        .into();
        fchmod(&file, Mode::from_bits_truncate(mode))?;
        Ok(file)
    }

    /// Replaces `name` with `bytes`, with `mode` and (if given) owner `uid:gid`, so that a
    /// reader sees the old file or the new one, never part of one, and the change survives a
    /// crash: a new file written beside it, then renamed over it. A link at `name` is replaced,
    /// never followed.
    pub fn replace_file(
        &self,
        name: &OsStr,
        bytes: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> io::Result<()> {
        let name = plain(name)?;
        let tmp = temp_name(name);
        let mut file = self.create_file(OsStr::new(&tmp), 0o600)?;
        let result = (|| -> io::Result<()> {
            file.write_all(bytes)?;
            if let Some((uid, gid)) = owner {
                fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
            }
            fchmod(&file, Mode::from_bits_truncate(mode))?;
            file.sync_all()?;
            renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result?;
        // The rename is durable once the directory is.
        fsync(&self.fd)?;
        Ok(())
    }

    /// Makes the new file `name` holding `bytes`, with `mode`, such that `name` never exists
    /// holding less: the content is written and synced under a temporary name (see
    /// [`SafeDir::remove_temp_files`]) and then linked to `name`, which fails with
    /// `AlreadyExists` if anything is there (it is never replaced). A kill at any step leaves
    /// no `name` or the whole file, and at most a temporary file.
    pub fn create_file_whole(&self, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
        let name = plain(name)?;
        let tmp = temp_name(name);
        let mut file = self.create_file(OsStr::new(&tmp), mode)?;
        let result = (|| -> io::Result<()> {
            file.write_all(bytes)?;
            file.sync_all()?;
            linkat(&self.fd, tmp.as_str(), &self.fd, name, AtFlags::empty())?;
            Ok(())
        })();
        let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        result?;
        fsync(&self.fd)?;
        Ok(())
    }

    /// Removes the file (or link) `name`; one already gone is not an error.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        match unlinkat(&self.fd, plain(name)?, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes what was created or renamed in the directory durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(fsync(&self.fd)?)
    }

    /// Removes what a [`SafeDir::replace_file`] or [`SafeDir::create_file_whole`] of `name` cut short (the process was killed
    /// between making its temporary file and renaming it) left behind: only entries named
    /// exactly as that function names its temporary files, removed through this handle
    /// (`unlinkat` never follows a link: a link found there is removed, not what it points
    /// at). Returns how many were removed. Not to be called while a `replace_file` of the
    /// same name may be running in this directory.
    pub fn remove_temp_files(&self, name: &OsStr) -> io::Result<usize> {
        let name = plain(name)?;
        // The listing goes through this handle too: `/proc/self/fd/N` is the directory the
        // handle holds, wherever its path now leads.
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?;
        let mut removed = 0;
        for entry in listing {
            let entry = entry?;
            // A directory of that name is none of the daemon's doing (and `unlinkat` would
            // refuse it anyway).
            if is_temp_name(&entry.file_name(), name) && !entry.file_type()?.is_dir() {
                match unlinkat(
                    &self.fd,
                    entry.file_name().as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                ) {
                    Ok(()) => removed += 1,
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if removed > 0 {
            fsync(&self.fd)?;
        }
        Ok(removed)
    }
}

/// Hex digits in the random part of a temporary file's name.
const TEMP_SUFFIX_DIGITS: usize = 16;

/// The name [`SafeDir::replace_file`] writes `name`'s new content under before renaming it:
/// `.NAME.XXXXXXXXXXXXXXXX.tmp`, sixteen random lower-case hex digits.
fn temp_name(name: &OsStr) -> String {
    let mut suffix = [0u8; 8];
    rand::rng().fill_bytes(&mut suffix);
    format!(
        ".{}.{:0width$x}.tmp",
        name.to_string_lossy(),
        u64::from_ne_bytes(suffix),
        width = TEMP_SUFFIX_DIGITS
    )
}

/// Whether `entry` is a name [`temp_name`] gives for `name`.
fn is_temp_name(entry: &OsStr, name: &OsStr) -> bool {
    let (Some(entry), Some(name)) = (entry.to_str(), name.to_str()) else {
        return false;
    };
    entry
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|hex| {
            hex.len() == TEMP_SUFFIX_DIGITS
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const OTHER: u32 = 4000001;

    /// A fresh directory (root's, 0755 under the sticky /tmp) and a helper to make children.
    fn base() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn mkdir(path: &Path, mode: u32, owner: u32) -> PathBuf {
        fs::create_dir(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        nix::unistd::chown(path, Some(Uid::from_raw(owner)), None).unwrap();
        path.to_owned()
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn a_plain_tree_opens_and_files_are_replaced_in_it() {
        let base = base();
        let dir = mkdir(&base.path().join("d"), 0o755, me());
        let safe = SafeDir::open(&dir).unwrap();
        assert_eq!(safe.path(), dir);
        let name = OsStr::new("f");
        safe.replace_file(name, b"one", 0o400, Some((OTHER, OTHER)))
            .unwrap();
        safe.replace_file(name, b"two", 0o400, Some((OTHER, OTHER)))
            .unwrap();
        assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "two");
        let meta = fs::metadata(dir.join("f")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (OTHER, 0o400));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        safe.remove_file(name).unwrap();
        safe.remove_file(name).unwrap();
        assert!(!dir.join("f").exists());
        // `.` is dropped; `..`, relative paths and names with a slash are refused.
        assert!(SafeDir::open(&base.path().join("./d/.")).is_ok());
        assert!(matches!(
            SafeDir::open(&dir.join("../d")),
            Err(DirError::DotDot { .. })
        ));
        assert!(matches!(
            SafeDir::open(Path::new("tmp")),
            Err(DirError::Relative { .. })
        ));
        assert!(
            safe.replace_file(OsStr::new("a/b"), b"", 0o400, None)
                .is_err()
        );
        assert!(safe.remove_file(OsStr::new("..")).is_err());
    }

    #[test]
    fn only_the_temp_files_of_the_name_are_removed() {
        let base = base();
        let dir = mkdir(&base.path().join("d"), 0o755, me());
        let safe = SafeDir::open(&dir).unwrap();
        let name = OsStr::new("a.token");
        let left = temp_name(name);
        assert!(is_temp_name(OsStr::new(&left), name), "{left}");
        fs::write(dir.join(&left), "half").unwrap();
        fs::write(dir.join(temp_name(name)), "").unwrap();
        let victim = base.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let linked = temp_name(name);
        std::os::unix::fs::symlink(&victim, dir.join(&linked)).unwrap();
        // Not ours: another name's, a near miss, the file itself, a directory.
        let kept = [
            temp_name(OsStr::new("b.token")),
            ".a.token.0123456789abcdeX.tmp".to_owned(),
            ".a.token.0123456789abcdef0.tmp".to_owned(),
            "a.token.0123456789abcdef.tmp".to_owned(),
            "a.token".to_owned(),
        ];
        for k in &kept {
            fs::write(dir.join(k), "other").unwrap();
        }
        mkdir(&dir.join(temp_name(name)), 0o755, me());
        assert_eq!(safe.remove_temp_files(name).unwrap(), 3);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".a.token.") || kept.contains(n))
            .collect();
        names.sort();
        let mut want = kept.to_vec();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            kept.len() + 1,
            "the directory stays"
        );
        assert_eq!(safe.remove_temp_files(name).unwrap(), 0);
    }

    #[test]
    fn a_whole_file_is_created_once_and_never_replaced() {
        let base = base();
        let dir = mkdir(&base.path().join("d"), 0o700, me());
        let safe = SafeDir::open(&dir).unwrap();
        let name = OsStr::new("key");
        safe.create_file_whole(name, b"first", 0o600).unwrap();
        let e = safe.create_file_whole(name, b"second", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(dir.join("key")).unwrap(), b"first");
        let meta = fs::metadata(dir.join("key")).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.nlink()), (0o600, 1));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        // A link planted at the name is not followed either.
        fs::write(base.path().join("victim"), "keep").unwrap();
        std::os::unix::fs::symlink(base.path().join("victim"), dir.join("planted")).unwrap();
        assert!(
            safe.create_file_whole(OsStr::new("planted"), b"x", 0o600)
                .is_err()
        );
        assert_eq!(
            fs::read_to_string(base.path().join("victim")).unwrap(),
            "keep"
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn a_symlink_in_the_middle_is_refused() {
        let base = base();
        let real = mkdir(&base.path().join("real"), 0o755, 0);
        mkdir(&real.join("sub"), 0o755, 0);
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = SafeDir::open(&link.join("sub")).unwrap_err();
        assert!(
            matches!(&e, DirError::Symlink { path, uid: 0 } if *path == link),
            "{e}"
        );
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        // A write through it is refused and leaves nothing behind.
        assert!(SafeDir::open_parent(&link.join("sub/f")).is_err());
        assert_eq!(fs::read_dir(real.join("sub")).unwrap().count(), 0);
        // The kernel's magic links too (`/proc/self` is a link, `/proc/self/cwd` a magic one).
        assert!(matches!(
            SafeDir::open(Path::new("/proc/self/cwd")),
            Err(DirError::Symlink { .. })
        ));
    }

    #[test]
    fn a_symlink_as_the_final_component_is_refused() {
        let base = base();
        let real = mkdir(&base.path().join("real"), 0o755, 0);
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        for e in [
            SafeDir::open(&link).unwrap_err(),
            SafeDir::ensure(&link, 0o711).unwrap_err(),
            SafeDir::private(&link).unwrap_err(),
        ] {
            assert!(
                matches!(&e, DirError::Symlink { path, .. } if *path == link),
                "{e}"
            );
        }
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o7777, 0o755);
        // A link to a file in a good directory is not followed by the file operations either.
        let safe = SafeDir::open(&real).unwrap();
        fs::write(real.join("victim"), "keep").unwrap();
        std::os::unix::fs::symlink(real.join("victim"), real.join("f")).unwrap();
        assert!(safe.open_file(OsStr::new("f")).is_err());
        assert!(safe.create_file(OsStr::new("f"), 0o600).is_err());
        safe.replace_file(OsStr::new("f"), b"new", 0o600, None)
            .unwrap();
        assert_eq!(fs::read_to_string(real.join("victim")).unwrap(), "keep");
        assert_eq!(fs::read_to_string(real.join("f")).unwrap(), "new");
    }

    #[test]
    fn a_non_directory_is_refused() {
        let base = base();
        let file = base.path().join("file");
        fs::write(&file, "").unwrap();
        for path in [file.clone(), file.join("below")] {
            let e = SafeDir::open(&path).unwrap_err();
            assert!(
                matches!(&e, DirError::NotDirectory { path } if *path == file),
                "{e}"
            );
        }
        assert!(
            SafeDir::open(&base.path().join("missing"))
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn a_directory_someone_else_owns_is_refused_on_the_way_and_as_the_holder() {
        let base = base();
        let theirs = mkdir(&base.path().join("theirs"), 0o755, OTHER);
        let below = mkdir(&theirs.join("below"), 0o755, 0);
        for path in [&theirs, &below] {
            let e = SafeDir::open(path).unwrap_err();
            assert!(
                matches!(&e, DirError::Owner { path, uid: OTHER, mode: 0o755, .. } if *path == theirs),
                "{e}"
            );
            assert!(
                e.to_string().starts_with(&format!(
                    "{}: owned by uid {OTHER} (mode 755)",
                    theirs.display()
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let base = base();
        for (name, mode) in [("world", 0o777), ("group", 0o775), ("sticky", 0o1777)] {
            let dir = mkdir(&base.path().join(name), mode, 0);
            let e = SafeDir::open(&dir).unwrap_err();
            assert!(
                matches!(&e, DirError::Writable { path, uid: 0, mode: m } if *path == dir && *m == mode),
                "{name}: {e}"
            );
            if mode & 0o1000 == 0 {
                mkdir(&dir.join("below"), 0o755, 0);
                assert!(
                    matches!(
                        SafeDir::open(&dir.join("below")),
                        Err(DirError::Writable { .. })
                    ),
                    "{name} on the way"
                );
            }
        }
    }

    #[test]
    fn a_sticky_directory_is_passed_only_when_it_is_roots() {
        let base = base();
        let roots = mkdir(&base.path().join("roots"), 0o1777, 0);
        let inside = mkdir(&roots.join("inside"), 0o755, 0);
        assert!(SafeDir::open(&inside).is_ok(), "like /tmp/dir");
        // What someone else made in it is theirs, so refused.
        let planted = mkdir(&roots.join("planted"), 0o755, OTHER);
        assert!(matches!(
            SafeDir::open(&planted),
            Err(DirError::Owner { .. })
        ));
        let theirs = mkdir(&base.path().join("theirs"), 0o1777, OTHER);
        let below = mkdir(&theirs.join("below"), 0o755, 0);
        assert!(matches!(SafeDir::open(&below), Err(DirError::Owner { .. })));
    }

    #[test]
    fn ensure_makes_the_last_component_only_and_sets_its_mode() {
        let base = base();
        let dir = base.path().join("tokens");
        SafeDir::ensure(&dir, 0o711).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o711);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        SafeDir::ensure(&dir, 0o711).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o711);
        assert!(
            SafeDir::ensure(&base.path().join("a/b"), 0o711)
                .unwrap_err()
                .is_not_found()
        );
        assert!(SafeDir::ensure(Path::new("/"), 0o711).is_err());
    }

    #[test]
    fn a_private_directory_is_made_narrowed_or_refused() {
        let base = base();
        let made = base.path().join("a/state");
        let (_, narrowed) = SafeDir::private(&made).unwrap();
        assert_eq!(narrowed, None);
        assert_eq!(fs::metadata(&made).unwrap().mode() & 0o7777, 0o700);
        let open = mkdir(&base.path().join("open"), 0o755, me());
        assert_eq!(SafeDir::private(&open).unwrap().1, Some(0o755));
        assert_eq!(fs::metadata(&open).unwrap().mode() & 0o7777, 0o700);
        let theirs = mkdir(&base.path().join("theirs"), 0o700, OTHER);
        assert!(matches!(
            SafeDir::private(&theirs),
            Err(DirError::NotOwn { uid: OTHER, .. })
        ));
        let writable = mkdir(&base.path().join("writable"), 0o777, me());
        assert!(matches!(
            SafeDir::private(&writable),
            Err(DirError::Writable { .. })
        ));
        assert_eq!(fs::metadata(&writable).unwrap().mode() & 0o7777, 0o777);
        assert!(SafeDir::private(Path::new("/")).is_err());
    }
}

//! Writing an app's token file so that only that app's user can read it, and so that a reader
//! never sees a half-written token: a new file is written beside it, handed to the owner, made
//! read-only and renamed over the old one. The token state file is written the same way.
//!
//! Every path here comes from the config and is opened through [`SafeDir`]: a token file is
//! written, checked and removed only in a directory reached without a symbolic link and through
//! directories nobody but root and the daemon's user can change, so an app's user who owns a
//! directory on the way cannot point the daemon at another file. A directory that fails is
//! named in the error, with its owner and mode.

use std::io;
use std::path::Path;

use crate::config::AppContainer;
use crate::safe_dir::SafeDir;
use crate::secret::Secret;

/// Token files are readable by their owner only.
pub const TOKEN_FILE_MODE: u32 = 0o400;
/// The default token directory: others may reach a file whose name they know, not list them.
pub const TOKEN_DIR_MODE: u32 = 0o711;

/// Creates the daemon's own token directory (not an operator's `token_file` directory, which
/// is theirs to manage) with [`TOKEN_DIR_MODE`]; its parent must pass [`SafeDir`]'s checks.
pub fn ensure_token_dir(dir: &Path) -> io::Result<()> {
    SafeDir::ensure(dir, TOKEN_DIR_MODE)?;
    Ok(())
}

/// Replaces `target.token_file` with `token` (no trailing newline: SDKs send the file's bytes
/// as a header value), owned by `target.uid:gid`, mode 0400.
pub fn write(target: &AppContainer, token: &Secret) -> io::Result<()> {
    write_atomic(
        &target.token_file,
        token.expose().as_bytes(),
        TOKEN_FILE_MODE,
        Some((target.uid, target.gid)),
    )
}

/// Replaces `path` with `bytes`, with `mode` and (if given) owner `uid:gid`, so that a reader
/// sees the old file or the new one, never part of one, and the change survives a crash.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let (dir, name) = SafeDir::open_parent(path)?;
    dir.replace_file(name, bytes, mode, owner)
}

/// Removes an app's token file (the app was removed from the config). One whose directory is
/// gone is gone too; one whose directory fails the checks is left alone.
pub fn remove(path: &Path) -> io::Result<()> {
    match SafeDir::open_parent(path) {
        Ok((dir, name)) => dir.remove_file(name),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The longest token file [`read`] takes in; the daemon's own tokens are far shorter.
const READ_LIMIT: u64 = 4096;

/// What the token file holds (read through its directory's handle, never through a link).
pub fn read(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let (dir, name) = SafeDir::open_parent(path)?;
    let mut text = String::new();
    dir.open_file(name)?
        .take(READ_LIMIT)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Removes the temporary files a write of `path` (a token file or the state file) cut short
/// by a crash left beside it (see [`SafeDir::remove_temp_files`]); returns how many.
pub fn remove_temp_files(path: &Path) -> io::Result<usize> {
    match SafeDir::open_parent(path) {
        Ok((dir, name)) => dir.remove_temp_files(name),
        Err(e) if e.is_not_found() => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Whether the token file is there, still a regular file with the owner and mode it was given,
/// in a directory that still passes the checks.
pub fn intact(target: &AppContainer) -> bool {
    use nix::sys::stat::SFlag;
    SafeDir::open_parent(&target.token_file)
        .map_err(io::Error::from)
        .and_then(|(dir, name)| dir.stat(name))
        .is_ok_and(|stat| {
            SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
                && stat.st_uid == target.uid
                && stat.st_mode & 0o777 == TOKEN_FILE_MODE
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn written_whole_owned_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let target = AppContainer {
            token_file: dir.path().join("app.token"),
            uid: me,
            gid: nix::unistd::getegid().as_raw(),
        };
        write(&target, &Secret::new("first")).unwrap();
        write(&target, &Secret::new("second")).unwrap();
        assert_eq!(fs::read_to_string(&target.token_file).unwrap(), "second");
        let meta = fs::metadata(&target.token_file).unwrap();
        assert_eq!(meta.mode() & 0o777, TOKEN_FILE_MODE);
        assert_eq!(meta.uid(), me);
        assert!(intact(&target));
        // Nothing left behind but the file itself.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_in_place_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let target = AppContainer {
            token_file: dir.path().join("app.token"),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        std::os::unix::fs::symlink(&victim, &target.token_file).unwrap();
        assert!(!intact(&target));
        write(&target, &Secret::new("token")).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(
            !fs::symlink_metadata(&target.token_file)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    #[test]
    fn nothing_is_written_checked_or_removed_under_a_directory_someone_else_owns() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let theirs = base.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4000001)), None).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let target = AppContainer {
            token_file: theirs.join("app.token"),
            uid: me,
            gid: nix::unistd::getegid().as_raw(),
        };
        let e = write(&target, &Secret::new("token")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: owned by uid 4000001", theirs.display())),
            "{e}"
        );
        assert!(!target.token_file.exists());
        // A file that looks right is not "intact" there, and is not removed either.
        fs::write(&target.token_file, "old").unwrap();
        fs::set_permissions(
            &target.token_file,
            fs::Permissions::from_mode(TOKEN_FILE_MODE),
        )
        .unwrap();
        assert!(!intact(&target));
        assert!(remove(&target.token_file).is_err());
        assert!(target.token_file.exists());
        // A missing directory: nothing to remove.
        assert!(remove(&base.path().join("gone/app.token")).is_ok());
    }
}

//! Writing an app's token file so that only that app's user can read it, and so that a reader
//! never sees a half-written token: a new file is written beside it, handed to the owner, made
//! read-only and renamed over the old one. The token state file is written the same way.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;

use crate::config::AppContainer;
use crate::secret::Secret;

/// Token files are readable by their owner only.
pub const TOKEN_FILE_MODE: u32 = 0o400;
/// The default token directory: others may reach a file whose name they know, not list them.
pub const TOKEN_DIR_MODE: u32 = 0o711;

/// Creates the daemon's own token directory (not an operator's `token_file` directory, which
/// is theirs to manage) with [`TOKEN_DIR_MODE`].
pub fn ensure_token_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(TOKEN_DIR_MODE).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // A directory the daemon made earlier (or systemd's RuntimeDirectory, 0700).
            fs::set_permissions(dir, fs::Permissions::from_mode(TOKEN_DIR_MODE))
        }
        Err(e) => Err(e),
    }
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
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut suffix = [0u8; 8];
    rand::rng().fill_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        u64::from_ne_bytes(suffix)
    ));
    // create_new + O_NOFOLLOW: an app that can write the directory cannot point the daemon's
    // write at another file; rename then replaces a link, never its target.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)?;
    let result = (|| {
        file.write_all(bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable once the directory is.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes an app's token file (the app was removed from the config).
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether the token file is there, still a regular file with the owner and mode it was given.
pub fn intact(target: &AppContainer) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(&target.token_file).is_ok_and(|m| {
        m.file_type().is_file() && m.uid() == target.uid && m.mode() & 0o777 == TOKEN_FILE_MODE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
}

//! The sealing key files. The sealing state (`audit-seal.state` in the state directory, 0600)
//! holds the current epoch and its key; it is replaced atomically at each epoch (new file,
//! fsync, rename, fsync of the directory) and the replaced file's content is overwritten, so the
//! old key is gone from disk. The verification key (0400, never overwritten) holds the first
//! key, for the operator to take off the host. Both are small `name = value` text files:
//!
//! ```text
//! format = "imds-broker-audit-key/1"     (the state: "imds-broker-audit-seal/1")
//! key_id = "3f09c2a1d4b5e6f7"            (public: names the key schedule)
//! epoch = 0                              (the epoch `key` seals)
//! key = "<64 hex digits>"
//! ```
//!
//! The verification key also names the `host` and when it was `created`; `#` starts a comment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::seal::{EpochKey, Key, SealError};

pub const STATE_FILE: &str = "audit-seal.state";
const STATE_TMP: &str = ".audit-seal.state.tmp";
const STATE_FORMAT: &str = "imds-broker-audit-seal/1";
const KEY_FORMAT: &str = "imds-broker-audit-key/1";
/// A verification key the daemon made itself is `audit-verify-<key id>.key` in the state dir.
const VERIFY_PREFIX: &str = "audit-verify-";
const VERIFY_SUFFIX: &str = ".key";
/// Key files are a few hundred bytes; anything much larger is not one.
const MAX_KEY_FILE: u64 = 4096;

/// The name of the verification key file the daemon writes into its state dir.
pub fn verify_key_name(key_id: &str) -> String {
    format!("{VERIFY_PREFIX}{key_id}{VERIFY_SUFFIX}")
}

/// Verification keys the daemon left in `state_dir`, which should have been moved off the host.
pub fn verify_keys_in(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(VERIFY_PREFIX) && n.ends_with(VERIFY_SUFFIX))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Options for a new key file: created (never an existing file or a symlink), `mode`.
fn create_new(mode: u32) -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    options
}

fn ensure_dir(dir: &Path) -> Result<(), SealError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn text(
    format: &str,
    key: &EpochKey,
    extra: &[(&str, String)],
    comment: &str,
) -> Zeroizing<String> {
    // Sized once, so no reallocation leaves a copy of the key behind.
    let mut out = Zeroizing::new(String::with_capacity(MAX_KEY_FILE as usize));
    out.push_str(comment);
    out.push_str(&format!("format = \"{format}\"\n"));
    out.push_str(&format!("key_id = \"{}\"\n", key.key_id));
    for (name, value) in extra {
        // A JSON string is a TOML basic string.
        out.push_str(&format!(
            "{name} = {}\n",
            serde_json::to_string(value).expect("a string serializes")
        ));
    }
    out.push_str(&format!("epoch = {}\n", key.epoch));
    out.push_str("key = \"");
    out.push_str(&key.key.to_hex());
    out.push_str("\"\n");
    out
}

fn state_text(key: &EpochKey) -> Zeroizing<String> {
    text(
        STATE_FORMAT,
        key,
        &[],
        "# imds-broker audit sealing state: the current epoch's key, replaced at each epoch.\n",
    )
}

/// Writes the first sealing state into `state_dir` (created 0700), refusing to replace one;
/// `owner` (uid, gid) is given to the file when set (keygen run as root for the daemon's user).
/// The file appears whole or not at all (see [`create_whole`]).
pub fn create_state(
    state_dir: &Path,
    key: &EpochKey,
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, SealError> {
    ensure_dir(state_dir)?;
    let path = state_dir.join(STATE_FILE);
    create_whole(&path, state_text(key).as_bytes(), 0o600, owner)?;
    Ok(path)
}

/// Makes the new file `path` holding `body`, with `mode` (and owner), such that `path` never
/// exists holding less: a kill mid-write would otherwise leave a key file that the next start
/// cannot read. The body is written and synced as `.NAME.tmp` beside it, linked to `path`
/// (which fails if anything, a symlink included, is there), the temporary name removed and the
/// directory synced. A kill leaves at most the temporary file, removed by the next write or by
/// [`remove_leftovers`].
fn create_whole(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), SealError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io_err(path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    remove_if_there(&tmp)?;
    let mut file = create_new(mode).open(&tmp).map_err(io_err(&tmp))?;
    let written = (|| {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(body)?;
        file.sync_all()
    })()
    .map_err(io_err(&tmp));
    let linked = written.and_then(|()| {
        fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => SealError::Exists {
                path: path.to_owned(),
            },
            _ => io_err(path)(e),
        })
    });
    let _ = fs::remove_file(&tmp);
    linked?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn remove_if_there(path: &Path) -> Result<(), SealError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Removes what a kill while writing a key file left in `state_dir`: the sealing state's
/// temporary file, the verification key's, and a sealing state that is empty (a kill between
/// creating and writing it, before it was written whole: nothing was sealed with it). Only
/// while no sealer runs. Returns how many files were removed.
pub fn remove_leftovers(state_dir: &Path) -> Result<usize, SealError> {
    let mut removed = 0;
    let entries = match fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(state_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(state_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let temp = name == STATE_TMP
            || name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .is_some_and(|n| n.starts_with(VERIFY_PREFIX) && n.ends_with(VERIFY_SUFFIX));
        let empty_state = name == STATE_FILE
            && entry
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.len() == 0);
        if temp || empty_state {
            remove_if_there(&entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(state_dir))?;
    }
    Ok(removed)
}

/// Replaces the sealing state with `key`: a new 0600 file, synced, renamed over the old one, the
/// directory synced; then the old file's content (still open) is overwritten with zeros, so the
/// old key is not left in its blocks on filesystems that write in place.
pub fn replace_state(state_dir: &Path, key: &EpochKey) -> Result<(), SealError> {
    let path = state_dir.join(STATE_FILE);
    let tmp = state_dir.join(STATE_TMP);
    remove_if_there(&tmp)?;
    let mut file = create_new(0o600).open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(state_text(key).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    let old = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .ok();
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(state_dir))?;
    if let Some(old) = old {
        let erased = old.metadata().and_then(|meta| {
            old.write_all_at(&vec![0u8; meta.len() as usize], 0)?;
            old.sync_all()
        });
        if let Err(e) = erased {
            tracing::warn!(path = %path.display(), error = %e, "cannot overwrite the replaced audit sealing state");
        }
    }
    Ok(())
}

/// The sealing state in `state_dir`, if there is one. It must be 0600 or 0400.
pub fn read_state(state_dir: &Path) -> Result<Option<EpochKey>, SealError> {
    let path = state_dir.join(STATE_FILE);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mode = file.metadata().map_err(io_err(&path))?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SealError::Permissions { path, mode });
    }
    read_key(file, &path, STATE_FORMAT).map(Some)
}

/// Writes the verification key (the schedule's first key) to `path`, mode 0400, refusing to
/// replace anything there (a symlink included); it appears whole or not at all.
pub fn write_verify_key(path: &Path, key: &EpochKey, host: &str) -> Result<(), SealError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        ensure_dir(dir)?;
    }
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = text(
        KEY_FORMAT,
        key,
        &[("host", host.to_owned()), ("created", created)],
        "# imds-broker audit verification key: the first key of the sealing schedule.\n\
         # Whoever holds it can also forge seals: keep it off the audited host.\n\
         # Check an audit file with: imds-broker audit verify --key THIS_FILE AUDIT_FILE\n",
    );
    create_whole(path, body.as_bytes(), 0o400, None)
}

/// Reads a verification key file.
pub fn read_verify_key(path: &Path) -> Result<EpochKey, SealError> {
    let file = File::open(path).map_err(io_err(path))?;
    read_key(file, path, KEY_FORMAT)
}

fn read_key(file: File, path: &Path, format: &str) -> Result<EpochKey, SealError> {
    let bad = |problem: String| SealError::Format {
        path: path.to_owned(),
        problem,
    };
    let mut text = Zeroizing::new(String::with_capacity(MAX_KEY_FILE as usize + 1));
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io_err(path))?;
    let (mut found_format, mut key_id, mut epoch, mut key) = (None, None, None, None);
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(bad(format!("line {}: not `name = value`", number + 1)));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let slot = match name.trim() {
            "format" => &mut found_format,
            "key_id" => &mut key_id,
            "epoch" => &mut epoch,
            "key" => &mut key,
            "host" | "created" => continue,
            other => return Err(bad(format!("line {}: unknown name {other:?}", number + 1))),
        };
        if slot.replace(value).is_some() {
            return Err(bad(format!("line {}: given twice", number + 1)));
        }
    }
    if found_format != Some(format) {
        return Err(bad(format!("not a {format} file")));
    }
    let epoch = epoch
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| bad("no epoch number".into()))?;
    let key = key
        .and_then(Key::from_hex)
        .ok_or_else(|| bad("no key of 64 hex digits".into()))?;
    let key_id = key_id.ok_or_else(|| bad("no key_id".into()))?.to_owned();
    if epoch == 0 && key.id() != key_id {
        return Err(bad(format!("key_id {key_id} is not this key's id")));
    }
    Ok(EpochKey { epoch, key, key_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_each_replacement_erases_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let mut key = EpochKey::generate();
        let k0 = key.key.to_hex();
        create_state(&state_dir, &key, None).unwrap();
        let path = state_dir.join(STATE_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&state_dir).unwrap().mode() & 0o777, 0o700);
        assert!(matches!(
            create_state(&state_dir, &key, None),
            Err(SealError::Exists { .. })
        ));
        // Hold the epoch-0 file open, as someone could, across the replacement.
        let mut held = File::open(&path).unwrap();
        key.advance();
        replace_state(&state_dir, &key).unwrap();
        let mut left = Vec::new();
        held.read_to_end(&mut left).unwrap();
        assert!(left.iter().all(|b| *b == 0), "the replaced file is zeroed");
        let loaded = read_state(&state_dir).unwrap().unwrap();
        assert_eq!((loaded.epoch, &loaded.key_id), (1, &key.key_id));
        assert_eq!(loaded.key.to_hex(), key.key.to_hex());
        let on_disk = fs::read_to_string(&path).unwrap();
        assert!(!on_disk.contains(&*k0), "epoch 0's key is gone");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(!state_dir.join(STATE_TMP).exists());

        // A temporary file left by a crash is replaced; a loose mode is refused.
        fs::write(state_dir.join(STATE_TMP), "junk").unwrap();
        key.advance();
        replace_state(&state_dir, &key).unwrap();
        assert_eq!(read_state(&state_dir).unwrap().unwrap().epoch, 2);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_state(&state_dir),
            Err(SealError::Permissions { .. })
        ));
        assert!(read_state(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn the_verification_key_is_0400_never_overwritten_and_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = EpochKey::generate();
        let path = dir.path().join(verify_key_name(&key.key_id));
        write_verify_key(&path, &key, "host-1").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o400);
        assert!(matches!(
            write_verify_key(&path, &key, "host-1"),
            Err(SealError::Exists { .. })
        ));
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(write_verify_key(&link, &key, "h").is_err());
        assert!(
            !dir.path().join("target").exists(),
            "no write through a symlink"
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("host = \"host-1\""), "{text}");
        let read = read_verify_key(&path).unwrap();
        assert_eq!((read.epoch, read.key.to_hex()), (0, key.key.to_hex()));
        assert_eq!(verify_keys_in(dir.path()), std::slice::from_ref(&path));

        let other = dir.path().join("other.key");
        fs::write(&other, text.replace(&key.key_id, "0000000000000000")).unwrap();
        let err = read_verify_key(&other).unwrap_err().to_string();
        assert!(err.contains("not this key's id"), "{err}");
        fs::write(
            &other,
            text.replace("imds-broker-audit-key/1", STATE_FORMAT),
        )
        .unwrap();
        let err = read_verify_key(&other).unwrap_err().to_string();
        assert!(err.contains("not a imds-broker-audit-key/1 file"), "{err}");
    }

    #[test]
    fn key_files_appear_whole_and_only_their_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let key = EpochKey::generate();
        create_state(&state_dir, &key, None).unwrap();
        let verify = state_dir.join(verify_key_name(&key.key_id));
        write_verify_key(&verify, &key, "h").unwrap();
        for path in [state_dir.join(STATE_FILE), verify.clone()] {
            assert_eq!(fs::metadata(&path).unwrap().nlink(), 1, "{path:?}");
        }
        assert_eq!(fs::read_dir(&state_dir).unwrap().count(), 2, "no temp file");
        // What kills left, and what is not the sealing keys' to remove.
        fs::write(state_dir.join(STATE_TMP), "half").unwrap();
        fs::write(state_dir.join(".audit-verify-0123.key.tmp"), "").unwrap();
        let others = [
            "audit.log",
            ".token.key.0123456789abcdef.tmp",
            "audit-verify-x.key.tmp",
        ];
        for other in others {
            fs::write(state_dir.join(other), "").unwrap();
        }
        assert_eq!(remove_leftovers(&state_dir).unwrap(), 2);
        assert!(
            read_state(&state_dir).unwrap().is_some(),
            "a whole state stays"
        );
        // An empty state (killed between creating and writing it) goes too.
        fs::write(state_dir.join(STATE_FILE), "").unwrap();
        assert_eq!(remove_leftovers(&state_dir).unwrap(), 1);
        assert!(read_state(&state_dir).unwrap().is_none());
        let mut left: Vec<_> = fs::read_dir(&state_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want: Vec<String> = others.iter().map(|o| o.to_string()).collect();
        want.push(verify_key_name(&key.key_id));
        want.sort();
        assert_eq!(left, want);
        assert_eq!(remove_leftovers(&dir.path().join("none")).unwrap(), 0);
    }
}

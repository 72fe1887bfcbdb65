//! The shared-credentials file that holds the key: read only when the daemon's user alone can
//! read and write it, and rewritten so that a crash leaves either the old file or the new one,
//! with every other profile, comment and line exactly as it was.
//!
//! The file is reached through a [`SafeDir`] opened once at load: the directory is checked
//! (no symbolic link on the way, nobody but root and the daemon's user can change it) and
//! every later read and the atomic replace happen relative to that handle, so a path swapped
//! after the check cannot redirect where the key is written.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::SFlag;
use zeroize::Zeroizing;

use super::{AccessKeyError, Key};
use crate::safe_dir::SafeDir;
use crate::secret::Secret;

/// Mode bits of group and others: any of them set means someone else may read (and so hold)
/// the key, or replace it with one of theirs.
const OTHERS: u32 = 0o077;
/// What the file is rewritten with.
const FILE_MODE: u32 = 0o600;

const KEY_ID: &str = "aws_access_key_id";
const SECRET: &str = "aws_secret_access_key";
const SESSION_TOKEN: &str = "aws_session_token";

/// The credentials file and the profile in it the daemon uses.
pub(super) struct CredentialsFile {
    dir: SafeDir,
    name: OsString,
    path: PathBuf,
    profile: String,
}

impl CredentialsFile {
    /// Opens the file's directory (checked once, here) and reads the profile's key, refusing a
    /// file others could read or write.
    pub(super) fn open(path: &Path, profile: &str) -> Result<(Self, Key), AccessKeyError> {
        let (dir, name) = SafeDir::open_parent(path)?;
        let file = CredentialsFile {
            name: name.to_owned(),
            dir,
            path: path.to_owned(),
            profile: profile.to_owned(),
        };
        let key = file.read()?;
        Ok((file, key))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn profile(&self) -> &str {
        &self.profile
    }

    /// The key the file holds now.
    pub(super) fn read(&self) -> Result<Key, AccessKeyError> {
        let text = self.read_text()?;
        parse(&text, &self.profile).map_err(|problem| self.format_error(problem))
    }

    /// Replaces the profile's key with `key`, keeping the rest of the file, as the file as it
    /// is now (not as it was at load): an operator's edit of another profile survives. The
    /// write is atomic and durable ([`SafeDir::replace_file`]: a temporary file in the same
    /// directory, mode 0600, fsync, rename, fsync of the directory).
    ///
    /// `expected` is the key id the file must still hold: a file someone else changed since
    /// the daemon read it is theirs to sort out, not the daemon's to overwrite.
    pub(super) fn replace_key(&self, expected: &str, key: &Key) -> Result<(), AccessKeyError> {
        let text = self.read_text()?;
        let current = parse(&text, &self.profile).map_err(|p| self.format_error(p))?;
        if current.id != expected {
            return Err(AccessKeyError::FileChanged {
                path: self.path.clone(),
                expected: super::key_hint(expected),
                found: super::key_hint(&current.id),
            });
        }
        let new = with_key(&text, &self.profile, key).map_err(|p| self.format_error(p))?;
        self.dir
            .replace_file(&self.name, new.as_bytes(), FILE_MODE, None)
            .map_err(|source| AccessKeyError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// The whole file, after checking what the kernel says about the opened file itself: a
    /// regular file, the daemon's user's, and nobody else's to read or write.
    fn read_text(&self) -> Result<Zeroizing<String>, AccessKeyError> {
        let read_error = |source: io::Error| AccessKeyError::Read {
            path: self.path.clone(),
            source,
        };
        // Looked at before opening: opening a FIFO for reading would wait for a writer forever.
        let stat = self.dir.stat(&self.name).map_err(read_error)?;
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFLNK {
            return Err(AccessKeyError::Symlink {
                path: self.path.clone(),
            });
        }
        if kind != SFlag::S_IFREG {
            return Err(AccessKeyError::NotAFile {
                path: self.path.clone(),
            });
        }
        let mut file = self.dir.open_file(&self.name).map_err(|e| {
            if e.raw_os_error() == Some(Errno::ELOOP as i32) {
                AccessKeyError::Symlink {
                    path: self.path.clone(),
                }
            } else {
                read_error(e)
            }
        })?;
        // The opened file, not the name: it may have been swapped since the `stat` above.
        let meta = file.metadata().map_err(read_error)?;
        check_private(&self.path, meta.is_file(), meta.uid(), meta.mode())?;
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text).map_err(read_error)?;
        Ok(text)
    }

    fn format_error(&self, problem: String) -> AccessKeyError {
        AccessKeyError::Format {
            path: self.path.clone(),
            problem,
        }
    }
}

/// A file others can read or write, or that is not the daemon's user's, is refused: its key
/// could be copied, or replaced with someone else's (and the daemon would then rotate it).
fn check_private(path: &Path, is_file: bool, uid: u32, mode: u32) -> Result<(), AccessKeyError> {
    let path = path.to_owned();
    let mode = mode & 0o7777;
    let euid = nix::unistd::geteuid().as_raw();
    if !is_file {
        return Err(AccessKeyError::NotAFile { path });
    }
    if uid != euid {
        return Err(AccessKeyError::NotOwn {
            path,
            uid,
            mode,
            euid,
        });
    }
    if mode & OTHERS != 0 {
        return Err(AccessKeyError::Exposed { path, mode });
    }
    Ok(())
}

/// `[name]`, possibly indented and followed by a comment.
fn section_header(line: &str) -> Option<&str> {
    let rest = line.trim().strip_prefix('[')?;
    let (name, after) = rest.split_once(']')?;
    let after = after.trim();
    (after.is_empty() || after.starts_with('#') || after.starts_with(';')).then(|| name.trim())
}

/// `key = value` (not a comment, not a header): the key and the value, trimmed.
fn assignment(line: &str) -> Option<(&str, &str)> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with(['#', ';', '[']) {
        return None;
    }
    let (key, value) = trimmed.split_once('=')?;
    Some((key.trim(), value.trim()))
}

/// The key of `profile` in `text`. Problems name lines and settings, never a value.
fn parse(text: &str, profile: &str) -> Result<Key, String> {
    let mut section: Option<&str> = None;
    let mut header_line: Option<usize> = None;
    let mut id: Option<(usize, &str)> = None;
    let mut secret: Option<(usize, &str)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if let Some(name) = section_header(line) {
            if name == profile {
                if let Some(first) = header_line {
                    // Two sections of one name: which one the SDKs use differs, and a rewrite
                    // of one would leave the other to be read by someone.
                    return Err(format!(
                        "profile [{profile}] appears twice (lines {first} and {number})"
                    ));
                }
                header_line = Some(number);
            }
            section = Some(name);
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        let Some((setting, value)) = assignment(line) else {
            continue;
        };
        let slot = match setting {
            KEY_ID => &mut id,
            SECRET => &mut secret,
            SESSION_TOKEN => {
                return Err(format!(
                    "profile [{profile}] has {SESSION_TOKEN} (line {number}): that is a temporary session, not a long-term key the daemon can rotate"
                ));
            }
            _ => continue,
        };
        if let Some((first, _)) = slot.replace((number, value)) {
            return Err(format!(
                "profile [{profile}] sets {setting} twice (lines {first} and {number})"
            ));
        }
    }
    if header_line.is_none() {
        return Err(format!("has no profile [{profile}]"));
    }
    let (id_line, id) = id.ok_or_else(|| format!("profile [{profile}] has no {KEY_ID}"))?;
    let (secret_line, secret) =
        secret.ok_or_else(|| format!("profile [{profile}] has no {SECRET}"))?;
    if !is_key_id(id) {
        return Err(format!(
            "{KEY_ID} on line {id_line} is not an access key id (16 to 128 letters and digits)"
        ));
    }
    if secret.is_empty() || secret.contains(char::is_whitespace) {
        return Err(format!(
            "{SECRET} on line {secret_line} is empty or has spaces in it"
        ));
    }
    Ok(Key {
        id: id.to_owned(),
        secret: Secret::new(secret),
    })
}

fn is_key_id(id: &str) -> bool {
    (16..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `text` with the key settings of `profile` set to `key`; every other byte kept, each
/// rewritten line keeping its indentation and its line ending.
fn with_key(text: &str, profile: &str, key: &Key) -> Result<Zeroizing<String>, String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len() + 64));
    let mut section: Option<&str> = None;
    let (mut ids, mut secrets) = (0, 0);
    for line in text.split_inclusive('\n') {
        if let Some(name) = section_header(line) {
            section = Some(name);
        } else if section == Some(profile)
            && let Some((setting, _)) = assignment(line)
            && (setting == KEY_ID || setting == SECRET)
        {
            let body = line.trim_end_matches(['\n', '\r']);
            let ending = &line[body.len()..];
            let indent = &body[..body.len() - body.trim_start().len()];
            let value = if setting == KEY_ID {
                ids += 1;
                key.id.as_str()
            } else {
                secrets += 1;
                key.secret.expose()
            };
            out.push_str(indent);
            out.push_str(setting);
            out.push_str(" = ");
            out.push_str(value);
            out.push_str(ending);
            continue;
        }
        out.push_str(line);
    }
    // `parse` accepted this text, so each is there exactly once; anything else is a file
    // changed in a way this function cannot rewrite faithfully.
    if (ids, secrets) != (1, 1) {
        return Err(format!(
            "profile [{profile}] no longer has exactly one {KEY_ID} and one {SECRET}"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET_VALUE: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn key(id: &str, secret: &str) -> Key {
        Key {
            id: id.into(),
            secret: Secret::new(secret),
        }
    }

    #[test]
    fn the_profile_is_read_among_others() {
        let text = format!(
            "# keys\n[other]\naws_access_key_id = AKIAOTHEROTHER00000\naws_secret_access_key = x\n\n  [ daemon ] ; ours\n\taws_access_key_id={ID}\naws_secret_access_key = {SECRET_VALUE}\nregion = eu-west-1\n"
        );
        let k = parse(&text, "daemon").unwrap();
        assert_eq!(k.id, ID);
        assert_eq!(k.secret.expose(), SECRET_VALUE);
    }

    #[test]
    fn problems_name_lines_and_never_a_value() {
        let ok = format!("[p]\naws_access_key_id = {ID}\naws_secret_access_key = {SECRET_VALUE}\n");
        for (text, words) in [
            (ok.replace("[p]", "[q]"), "has no profile [p]"),
            (format!("{ok}[p]\n"), "appears twice (lines 1 and 4)"),
            (
                ok.replace("aws_secret_access_key", "aws_secret_key"),
                "has no aws_secret_access_key",
            ),
            (
                format!("{ok}aws_secret_access_key = {SECRET_VALUE}2\n"),
                "twice (lines 3 and 4)",
            ),
            (
                format!("{ok}aws_session_token = {SECRET_VALUE}\n"),
                "temporary session",
            ),
            (ok.replace(ID, "AKIA/short"), "not an access key id"),
            (
                ok.replace(SECRET_VALUE, &format!("{SECRET_VALUE} tail")),
                "line 3 is empty or has spaces",
            ),
        ] {
            let problem = parse(&text, "p").unwrap_err();
            assert!(problem.contains(words), "{problem}");
            assert!(!problem.contains("wJalr"), "{problem}");
        }
    }

    #[test]
    fn a_rewrite_changes_the_two_settings_of_the_profile_only() {
        let text = format!(
            "# top comment\r\n[other]\r\naws_access_key_id = {ID}\r\naws_secret_access_key = {SECRET_VALUE}\r\n[p]\r\n  aws_access_key_id={ID}\r\n; keep me\r\naws_secret_access_key = {SECRET_VALUE}\r\nregion = us-east-1"
        );
        let new = key("AKIANEWNEWNEWNEW0001", "newsecret/+=");
        let out = with_key(&text, "p", &new).unwrap();
        assert_eq!(
            out.as_str(),
            format!(
                "# top comment\r\n[other]\r\naws_access_key_id = {ID}\r\naws_secret_access_key = {SECRET_VALUE}\r\n[p]\r\n  aws_access_key_id = AKIANEWNEWNEWNEW0001\r\n; keep me\r\naws_secret_access_key = newsecret/+=\r\nregion = us-east-1"
            )
        );
        assert_eq!(parse(&out, "p").unwrap().id, new.id);
        assert_eq!(parse(&out, "other").unwrap().id, ID);
        assert!(with_key("[p]\naws_access_key_id = x\n", "p", &new).is_err());
    }

    #[test]
    fn only_a_private_file_of_the_daemons_user_is_accepted() {
        let me = nix::unistd::geteuid().as_raw();
        let path = Path::new("/x/credentials");
        assert!(check_private(path, true, me, 0o100600).is_ok());
        assert!(check_private(path, true, me, 0o100400).is_ok());
        for (uid, mode, words) in [
            (me, 0o100640, "mode 0640"),
            (me, 0o100602, "mode 0602"),
            (me.wrapping_add(1), 0o100600, "owned by uid"),
        ] {
            let e = check_private(path, true, uid, mode)
                .unwrap_err()
                .to_string();
            assert!(e.contains("/x/credentials") && e.contains(words), "{e}");
        }
        assert!(matches!(
            check_private(path, false, me, 0o600),
            Err(AccessKeyError::NotAFile { .. })
        ));
    }
}

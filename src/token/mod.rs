//! IMDSv2 session tokens: stateless HMAC tokens bound to the caller that minted them, under a key
//! persisted in the state directory, so every token stays valid for its whole TTL across restarts
//! (aws-sdk-rust caches a token for up to 6 h and never drops it on 401).
//!
//! A token's TTL is real time: its expiry is a reading of the boot clock (see `crate::time`),
//! and the boot it was taken in is bound into the MAC. A wall-clock step, either way, neither
//! lengthens nor shortens a token; a token from an earlier boot is refused (the apps that held
//! it did not survive the reboot either).

pub mod container;
pub mod file;

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::safe_dir::{self, DirError, SafeDir};
use crate::time::{BootTime, Moment};

type HmacSha256 = Hmac<Sha256>;

const KEY_FILE: &str = "token.key";
const KEY_LEN: usize = 32;
/// Version 2: the expiry is on the boot clock, and the boot id is under the MAC.
const VERSION: u8 = 2;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// Both versions: version, expiry (ms), nonce, MAC.
const TOKEN_LEN: usize = 1 + 8 + NONCE_LEN + MAC_LEN;
const DOMAIN: &[u8] = b"imds-broker/token/v2";
/// Version 1 (before 2): the expiry is wall-clock ms since the epoch. Only read, see
/// [`Legacy`].
const VERSION_1: u8 = 1;
const DOMAIN_1: &[u8] = b"imds-broker/token/v1";

/// The HMAC key (only its keyed MAC states are kept). Never printed.
#[derive(Clone)]
pub struct TokenKey {
    /// The MAC keyed and fed the constant prefix once: every request verifies a token, and
    /// keying HMAC costs two SHA-256 blocks.
    keyed: HmacSha256,
    legacy: Legacy,
}

/// Version-1 tokens minted by the daemon this one replaced stay valid for the real time they
/// had left when this key was loaded (an upgrade must not cut off aws-sdk-rust, which keeps a
/// token for its whole TTL). That is read once, on the wall clock, at load; from then on it is
/// counted on the boot clock, so a later step does not move it. No version-1 token is minted,
/// so none passes once the longest TTL has gone by since the load.
#[derive(Clone)]
struct Legacy {
    keyed: HmacSha256,
    loaded: Moment,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: refusing token key readable or writable by others (mode {mode:o}); it must be 0600", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: token key must be exactly {KEY_LEN} bytes", path.display())]
    Length { path: PathBuf },
    #[error("state_dir {0}")]
    StateDir(#[from] DirError),
}

impl TokenKey {
    /// Loads the key from `state_dir`, creating the directory (0700) and a fresh random key
    /// (0600) on first start. The directory must be the daemon's (see [`SafeDir::private`]).
    ///
    /// A kill at any moment of the first start must not leave a key file that the next start
    /// refuses, nor make it replace a key that tokens were issued with: the key file appears
    /// whole or not at all ([`SafeDir::create_file_whole`]), the temporary file a kill left is
    /// removed, and an empty key file (what a kill between creating and writing it left, before
    /// this was so) is replaced, since no token was ever issued with it.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, KeyError> {
        let (dir, narrowed) = SafeDir::private(state_dir)?;
        if let Some(mode) = narrowed {
            safe_dir::report_narrowed(state_dir, mode);
        }
        let path = state_dir.join(KEY_FILE);
        let io_err = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let name = OsStr::new(KEY_FILE);
        // Nothing else writes the key while the daemon starts.
        dir.remove_temp_files(name).map_err(io_err)?;
        match dir.open_file(name) {
            Ok(file) => match Self::read(file, &path)? {
                Some(key) => Ok(key),
                None => {
                    tracing::warn!(path = %path.display(), "the token key file was empty (a first start was cut short); made a new key");
                    let key = random_key();
                    dir.replace_file(name, &key, 0o600, None).map_err(io_err)?;
                    Ok(Self::from_bytes(key))
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = random_key();
                dir.create_file_whole(name, &key, 0o600).map_err(io_err)?;
                Ok(Self::from_bytes(key))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The key in `file`, or `None` if it is empty.
    fn read(mut file: std::fs::File, path: &Path) -> Result<Option<Self>, KeyError> {
        let meta = file.metadata().map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() == 0 {
            return Ok(None);
        }
        let mut key = [0u8; KEY_LEN];
        let mut rest = Vec::new();
        let length = || KeyError::Length {
            path: path.to_owned(),
        };
        file.read_exact(&mut key).map_err(|_| length())?;
        file.read_to_end(&mut rest).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        if !rest.is_empty() {
            return Err(length());
        }
        Ok(Some(Self::from_bytes(key)))
    }

    #[cfg(test)]
    pub fn random() -> Self {
        let mut key = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        Self::from_bytes(key)
    }

    fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self::loaded_at(bytes, Moment::now())
    }

    fn loaded_at(bytes: [u8; KEY_LEN], loaded: Moment) -> Self {
        let keyed_for = |domain: &[u8], version: u8| {
            let mut keyed = HmacSha256::new_from_slice(&bytes).expect("HMAC takes any key length");
            keyed.update(domain);
            keyed.update(&[version]);
            keyed
        };
        Self {
            keyed: keyed_for(DOMAIN, VERSION),
            legacy: Legacy {
                keyed: keyed_for(DOMAIN_1, VERSION_1),
                loaded,
            },
        }
    }

    fn mac(&self, boot: &BootTime, expires_ms: u64, nonce: &[u8], binding: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(boot.boot.as_bytes());
        mac.update(&expires_ms.to_be_bytes());
        mac.update(nonce);
        mac.update(binding.as_bytes());
        mac
    }

    /// Mints a token for `binding` that expires `ttl` of real time after `now`.
    pub fn mint(&self, binding: &str, ttl: Duration, now: BootTime) -> String {
        let expires_ms = boot_ms(now.since_boot).saturating_add(boot_ms(ttl));
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let tag = self
            .mac(&now, expires_ms, &nonce, binding)
            .finalize()
            .into_bytes();
        let mut raw = Vec::with_capacity(TOKEN_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&expires_ms.to_be_bytes());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks that `token` was minted by this key for `binding` in this boot and has not
    /// expired at `now`. Returns the time it has left.
    pub fn verify(
        &self,
        token: &str,
        binding: &str,
        now: BootTime,
    ) -> Result<Duration, TokenError> {
        if token.len() > 2 * TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        // Room for any token this length check lets through, so no allocation per request.
        let mut buf = [0u8; 2 * TOKEN_LEN];
        let len = URL_SAFE_NO_PAD
            .decode_slice(token, &mut buf)
            .map_err(|_| TokenError::Malformed)?;
        let raw = &buf[..len];
        if raw.len() != TOKEN_LEN || !matches!(raw[0], VERSION | VERSION_1) {
            return Err(TokenError::Malformed);
        }
        let expires_ms = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
        let nonce = &raw[9..9 + NONCE_LEN];
        let tag = &raw[9 + NONCE_LEN..];
        if raw[0] == VERSION_1 {
            return self.legacy.verify(expires_ms, nonce, tag, binding, now);
        }
        self.mac(&now, expires_ms, nonce, binding)
            .verify_slice(tag)
            .map_err(|_| TokenError::NotValidForCaller)?;
        let now_ms = boot_ms(now.since_boot);
        if now_ms >= expires_ms {
            return Err(TokenError::Expired);
        }
        Ok(Duration::from_millis(expires_ms - now_ms))
    }
}

impl Legacy {
    fn verify(
        &self,
        expires_unix_ms: u64,
        nonce: &[u8],
        tag: &[u8],
        binding: &str,
        now: BootTime,
    ) -> Result<Duration, TokenError> {
        let mut mac = self.keyed.clone();
        mac.update(&expires_unix_ms.to_be_bytes());
        mac.update(nonce);
        mac.update(binding.as_bytes());
        mac.verify_slice(tag)
            .map_err(|_| TokenError::NotValidForCaller)?;
        let left_at_load = Duration::from_millis(expires_unix_ms)
            .saturating_sub(Duration::from_millis(unix_ms(self.loaded.wall)));
        // Another boot: the process that loaded the key is gone with it.
        let since_load = now
            .since(self.loaded.boot)
            .ok_or(TokenError::NotValidForCaller)?;
        let left = left_at_load.saturating_sub(since_load);
        if left.is_zero() {
            return Err(TokenError::Expired);
        }
        Ok(left)
    }
}

/// Why a presented token was refused. All map to 401; the reason is for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token was not minted by this daemon for this caller in this boot")]
    NotValidForCaller,
    #[error("token has expired")]
    Expired,
}

fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill_bytes(&mut key);
    key
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn boot_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::BootId;
    use std::fs;

    #[test]
    fn token_round_trips_and_is_visible_ascii() {
        let key = TokenKey::random();
        let now = BootTime::now();
        let t = key.mint("local:uid=1000", Duration::from_secs(60), now);
        assert!(t.bytes().all(|b| b.is_ascii_graphic()), "{t}");
        let left = key.verify(&t, "local:uid=1000", now).unwrap();
        assert_eq!(left, Duration::from_secs(60));
    }

    #[test]
    fn token_is_bound_to_caller_and_key() {
        let key = TokenKey::random();
        let now = BootTime::now();
        let t = key.mint("local:uid=1000", Duration::from_secs(60), now);
        assert_eq!(
            key.verify(&t, "local:uid=1001", now),
            Err(TokenError::NotValidForCaller)
        );
        assert_eq!(
            TokenKey::random().verify(&t, "local:uid=1000", now),
            Err(TokenError::NotValidForCaller)
        );
    }

    #[test]
    fn token_expires_exactly_at_ttl() {
        let key = TokenKey::random();
        let now = BootTime::now();
        let t = key.mint("b", Duration::from_secs(1), now);
        assert!(
            key.verify(&t, "b", now + Duration::from_millis(999))
                .is_ok()
        );
        assert_eq!(
            key.verify(&t, "b", now + Duration::from_secs(1)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn tampered_or_garbage_tokens_are_refused() {
        let key = TokenKey::random();
        let now = BootTime::now();
        let t = key.mint("b", Duration::from_secs(60), now);
        // Push the expiry forward by editing the token: the MAC must catch it.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[3] ^= 0x40;
        let forged = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            key.verify(&forged, "b", now),
            Err(TokenError::NotValidForCaller)
        );
        for junk in ["", "abc", "!!!!", &"A".repeat(500)] {
            assert_eq!(
                key.verify(junk, "b", now),
                Err(TokenError::Malformed),
                "{junk}"
            );
        }
    }

    #[test]
    fn a_token_from_another_boot_is_refused() {
        let key = TokenKey::random();
        let now = BootTime::now();
        let t = key.mint("b", Duration::from_secs(600), now);
        let rebooted = BootTime {
            boot: BootId::from_bytes([7; 16]),
            // Even at a boot-clock reading inside the TTL.
            since_boot: now.since_boot,
        };
        assert_eq!(
            key.verify(&t, "b", rebooted),
            Err(TokenError::NotValidForCaller)
        );
    }

    /// A version-1 token as the daemon before version 2 minted it.
    fn mint_v1(bytes: [u8; KEY_LEN], binding: &str, expires: SystemTime) -> String {
        let mut mac = HmacSha256::new_from_slice(&bytes).unwrap();
        mac.update(DOMAIN_1);
        mac.update(&[VERSION_1]);
        let expires_ms = unix_ms(expires);
        let nonce = [5u8; NONCE_LEN];
        mac.update(&expires_ms.to_be_bytes());
        mac.update(&nonce);
        mac.update(binding.as_bytes());
        let mut raw = vec![VERSION_1];
        raw.extend_from_slice(&expires_ms.to_be_bytes());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn version_1_tokens_live_out_the_real_time_they_had_at_load_only() {
        let bytes = [3u8; KEY_LEN];
        let loaded = Moment::now();
        let key = TokenKey::loaded_at(bytes, loaded);
        let t = mint_v1(bytes, "b", loaded.wall + Duration::from_secs(60));
        let at = |secs| loaded.boot + Duration::from_secs(secs);
        // 60 s left at load: counted on the boot clock, whatever the wall clock does later.
        assert_eq!(key.verify(&t, "b", at(0)), Ok(Duration::from_secs(60)));
        assert_eq!(key.verify(&t, "b", at(59)), Ok(Duration::from_secs(1)));
        assert_eq!(key.verify(&t, "b", at(60)), Err(TokenError::Expired));
        assert_eq!(
            key.verify(&t, "c", at(0)),
            Err(TokenError::NotValidForCaller)
        );
        let other_boot = BootTime {
            boot: BootId::from_bytes([7; 16]),
            since_boot: loaded.boot.since_boot,
        };
        assert_eq!(
            key.verify(&t, "b", other_boot),
            Err(TokenError::NotValidForCaller)
        );
        // Expired before the load: refused at once.
        let old = mint_v1(bytes, "b", loaded.wall - Duration::from_secs(1));
        assert_eq!(key.verify(&old, "b", at(0)), Err(TokenError::Expired));
        // A version-2 token is not a version-1 token with its version byte changed.
        let v2 = key.mint("b", Duration::from_secs(60), at(0));
        let mut raw = URL_SAFE_NO_PAD.decode(&v2).unwrap();
        raw[0] = VERSION_1;
        assert_eq!(
            key.verify(&URL_SAFE_NO_PAD.encode(raw), "b", at(0)),
            Err(TokenError::NotValidForCaller)
        );
    }

    #[test]
    fn what_a_killed_first_start_left_is_cleaned_and_a_whole_key_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        // Killed between creating the key file and writing it (before the key was created
        // whole), and between writing a temporary key and linking it.
        let path = state.join(KEY_FILE);
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let left = state.join(".token.key.0123456789abcdef.tmp");
        fs::write(&left, [7u8; KEY_LEN]).unwrap();
        let key = TokenKey::load_or_create(&state).unwrap();
        assert!(!left.exists(), "the temporary file is removed");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.len(), meta.mode() & 0o777), (KEY_LEN as u64, 0o600));
        // The key now written is the one every later start loads.
        let now = BootTime::now();
        let minted = key.mint("local:uid=1000", Duration::from_secs(60), now);
        let again = TokenKey::load_or_create(&state).unwrap();
        assert!(again.verify(&minted, "local:uid=1000", now).is_ok());
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1, "only the key");
        // A short key is not the remains of a kill: refused, not replaced.
        fs::write(&path, [1u8; 5]).unwrap();
        assert!(matches!(
            TokenKey::load_or_create(&state),
            Err(KeyError::Length { .. })
        ));
    }

    #[test]
    fn key_persists_with_private_mode_and_bad_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = TokenKey::load_or_create(&state).unwrap();
        let b = TokenKey::load_or_create(&state).unwrap();
        let now = BootTime::now();
        let minted = a.mint("local:uid=1000", Duration::from_secs(60), now);
        assert!(
            b.verify(&minted, "local:uid=1000", now).is_ok(),
            "a restart must load the same key"
        );
        let path = state.join(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(matches!(
            TokenKey::load_or_create(&state),
            Err(KeyError::Permissions { .. })
        ));
    }
}

//! The container endpoint's per-app authorization tokens: issued, written to each app's token
//! file, rotated on a schedule or on demand, and checked on every request.
//!
//! The daemon keeps only SHA-256 digests of tokens (in memory and in its state file, so tokens
//! survive a restart); the token itself exists only in the app's file. Looking a presented
//! token up by its digest reveals nothing through timing: an attacker does not know the digest
//! of what they send against what is stored.
//!
//! # Crash safety
//!
//! A rotation touches two files, the app's token file and the state file, and no rename can
//! change both at once. So it is a two-phase record:
//!
//! 1. the new token's digest is saved as the app's *pending* token (the current one unchanged);
//! 2. the token file is replaced (a temporary file beside it, renamed over it);
//! 3. the pending token is promoted to current and saved again.
//!
//! Each save and each file write is itself atomic (temporary file, `fsync`, rename, `fsync` of
//! the directory), so after a `kill -9` (or a power cut) at any point the token file holds the
//! current token or the pending one, and the state names both:
//!
//! - killed before 1 ends: the state and the file are those of before the rotation;
//! - between 1 and the rename in 2: the file still holds the current token; the pending one
//!   never left the daemon, so it is dropped at the next start and the rotation did not happen
//!   (tokens issued before the crash work as before; a scheduled one is due again);
//! - between the rename in 2 and the end of 3: the file holds the pending token; the next start
//!   sees that and finishes the rotation with what step 1 recorded (when the old token stops
//!   working: after the grace, or at once for a revoking one), so it is as if the daemon had
//!   finished it before dying.
//!
//! [`TokenStore::reconcile`] (at start and on every reload) reads each token file and applies
//! these rules; a file holding a token the state does not know at all (an older daemon's state,
//! a lost state file, a hand-edited file) gets a new token instead of being refused for good.
//! The temporary files a kill leaves behind, in the state directory and beside the token files,
//! are removed when the store is opened and reconciled; only names of the daemon's own
//! temporary-file pattern, through the directories' handles.
//!
//! # Time
//!
//! The rotation interval and the grace are real time: a token's issue and the end of its
//! predecessor's grace are [`Moment`]s, compared on the boot clock, so a wall-clock step
//! neither rotates every token at once nor stalls rotation, and neither ends a grace early nor
//! keeps a replaced token valid for longer. The state file keeps both clocks' readings and the
//! boot id; after a reboot the wall-clock readings are used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::file as token_file;
use crate::config::{App, AppContainer};
use crate::safe_dir::{self, DirError, SafeDir};
use crate::secret::Secret;
use crate::time::{BootId, Moment};

const STATE_FILE: &str = "container-tokens.json";
/// Replaced tokens remembered after their grace, so a late caller is told "stale", not "unknown".
const RETIRED_KEPT: usize = 4;
/// Tokens are 32 random bytes, prefixed so that one found in a log or a repository is
/// recognisable for what it is.
const TOKEN_PREFIX: &str = "ibct_";

type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token() -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// What a presented token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The app's current token, or the one before it within its grace period.
    Valid {
        app: String,
    },
    /// A token this app had before; it no longer opens anything.
    Stale {
        app: String,
    },
    Unknown,
}

/// Why a token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationCause {
    /// The app is new (or its token file settings changed, or the file was missing).
    Issued,
    Scheduled,
    /// A rotation a crash cut short after the new token reached the file, finished at start.
    Recovered,
    /// `imds-broker token rotate`: the old token stops working at once.
    Requested,
}

impl RotationCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationCause::Issued => "issued",
            RotationCause::Scheduled => "scheduled",
            RotationCause::Recovered => "recovered",
            RotationCause::Requested => "requested",
        }
    }
}

/// One token change, for the audit trail and the caller.
#[derive(Debug)]
pub struct Rotation {
    pub app: String,
    pub file: PathBuf,
    pub cause: RotationCause,
    pub result: io::Result<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("state_dir {0}")]
    StateDir(#[from] DirError),
}

#[derive(Debug, Clone)]
struct AppTokens {
    target: AppContainer,
    current: Digest,
    issued_at: Moment,
    /// The token before `current` and until when it is still accepted.
    previous: Option<(Digest, Moment)>,
    retired: VecDeque<Digest>,
    /// The token being written to the file (see the module's "Crash safety").
    pending: Option<Pending>,
}

/// A token recorded before its file is renamed into place.
#[derive(Debug, Clone, Copy)]
struct Pending {
    digest: Digest,
    issued_at: Moment,
    /// Until when the token it replaces stays valid; `None`: it is retired once the file is in
    /// place (a revoking rotation).
    old_until: Option<Moment>,
}

impl AppTokens {
    /// Makes the pending token current (its file is in place).
    fn promote(&mut self, pending: Pending) {
        if let Some((prev, _)) = self.previous.take() {
            retire(&mut self.retired, prev);
        }
        match pending.old_until {
            Some(until) => self.previous = Some((self.current, until)),
            None => retire(&mut self.retired, self.current),
        }
        self.current = pending.digest;
        self.issued_at = pending.issued_at;
        self.pending = None;
    }
}

pub struct TokenStore {
    state_file: PathBuf,
    /// Each app's tokens, by app name.
    tokens: RwLock<HashMap<String, AppTokens>>,
    /// Serialises changes (they write files); checks only take `tokens` briefly.
    writer: Mutex<()>,
    /// Counts token changes, for whoever waits for one (status, tests).
    changes: tokio::sync::watch::Sender<u64>,
}

/// The state file: digests, never tokens. Times are wall-clock seconds, and boot-clock
/// nanoseconds (`*_boot_ns`) of the boot `boot_id`; both absent in a state saved by a daemon
/// that measured on the wall clock only.
#[derive(Serialize, Deserialize, Default)]
struct SavedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    apps: BTreeMap<String, SavedApp>,
}

#[derive(Serialize, Deserialize)]
struct SavedApp {
    token_file: PathBuf,
    uid: u32,
    gid: u32,
    current: String,
    issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at_boot_ns: Option<u64>,
    previous: Option<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_until_boot_ns: Option<u64>,
    /// Absent in a state saved by a daemon that did not record pending tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<SavedPending>,
}

#[derive(Serialize, Deserialize)]
struct SavedPending {
    digest: String,
    issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at_boot_ns: Option<u64>,
    old_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    old_until_boot_ns: Option<u64>,
}

/// A token's status for `imds-broker status`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStatus {
    pub app: String,
    pub token_file: PathBuf,
    pub issued_at: SystemTime,
    pub previous_until: Option<SystemTime>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A moment as the state file keeps it: wall-clock seconds, and boot-clock nanoseconds when it
/// was read in `boot` (this boot; readings of another cannot be compared with anything).
fn save_moment(t: Moment, boot: BootId) -> (u64, Option<u64>) {
    let boot_ns = (t.boot.boot == boot)
        .then(|| u64::try_from(t.boot.since_boot.as_nanos()).ok())
        .flatten();
    (unix(t.wall), boot_ns)
}

/// Reads back what [`save_moment`] wrote in boot `saved_in`, seen from `now`.
fn restore_moment(
    now: Moment,
    saved_in: Option<BootId>,
    wall: u64,
    boot_ns: Option<u64>,
) -> Moment {
    Moment::restore(now, wall, saved_in.zip(boot_ns.map(Duration::from_nanos)))
}

fn parse_digest(hex: &str) -> Option<Digest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TokenStore {
    /// Opens the store kept in `state_dir`, with the tokens of an earlier run (their files are
    /// checked by [`TokenStore::reconcile`]). The directory must be the daemon's (see
    /// [`SafeDir::private`]); a state file others could write is refused.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let (dir, narrowed) = SafeDir::private(state_dir)?;
        if let Some(mode) = narrowed {
            safe_dir::report_narrowed(state_dir, mode);
        }
        let state_file = state_dir.join(STATE_FILE);
        let io_err = |source| StoreError::Io {
            path: state_file.clone(),
            source,
        };
        // What a save killed half-way left; the state file itself is the old one or the new.
        match dir.remove_temp_files(OsStr::new(STATE_FILE)) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(path = %state_file.display(), removed = n, "removed temporary files an interrupted save left")
            }
            // They only take room; the daemon works without their removal.
            Err(e) => {
                tracing::warn!(path = %state_file.display(), error = %e, "cannot remove temporary state files")
            }
        }
        let saved = match dir.open_file(OsStr::new(STATE_FILE)) {
            Ok(file) => {
                let meta = file.metadata().map_err(io_err)?;
                if meta.mode() & 0o022 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
                    return Err(StoreError::Refused {
                        path: state_file,
                        reason: "must be owned by the daemon's user and writable only by it".into(),
                    });
                }
                serde_json::from_reader::<_, SavedState>(io::BufReader::new(file)).unwrap_or_else(
                    |e| {
                        // Losing it only means every app gets a new token now.
                        tracing::warn!(path = %state_file.display(), error = %e, "unreadable container token state; issuing new tokens");
                        SavedState::default()
                    },
                )
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => SavedState::default(),
            Err(e) => return Err(io_err(e)),
        };
        let now = Moment::now();
        let saved_in = saved.boot_id.as_deref().and_then(BootId::parse);
        let restore = |wall, boot_ns| restore_moment(now, saved_in, wall, boot_ns);
        let apps = saved
            .apps
            .into_iter()
            .filter_map(|(name, s)| {
                let current = parse_digest(&s.current)?;
                let previous = s.previous.and_then(|(d, until)| {
                    Some((parse_digest(&d)?, restore(until, s.previous_until_boot_ns)))
                });
                let pending = s.pending.and_then(|p| {
                    Some(Pending {
                        digest: parse_digest(&p.digest)?,
                        issued_at: restore(p.issued_at, p.issued_at_boot_ns),
                        old_until: p.old_until.map(|until| restore(until, p.old_until_boot_ns)),
                    })
                });
                Some((
                    name,
                    AppTokens {
                        target: AppContainer {
                            token_file: s.token_file,
                            uid: s.uid,
                            gid: s.gid,
                        },
                        current,
                        issued_at: restore(s.issued_at, s.issued_at_boot_ns),
                        previous,
                        retired: VecDeque::new(),
                        pending,
                    },
                ))
            })
            .collect();
        Ok(Self {
            state_file,
            tokens: RwLock::new(apps),
            writer: Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// What `presented` opens at `now`.
    pub fn verify(&self, presented: &str, now: Moment) -> Verdict {
        let d = digest(presented);
        let tokens = self.tokens.read().expect("token store lock");
        for (name, app) in tokens.iter() {
            if app.current == d || app.pending.is_some_and(|p| p.digest == d) {
                return Verdict::Valid { app: name.clone() };
            }
            if let Some((prev, until)) = app.previous
                && prev == d
            {
                return if !now.reached(until) {
                    Verdict::Valid { app: name.clone() }
                } else {
                    Verdict::Stale { app: name.clone() }
                };
            }
            if app.retired.contains(&d) {
                return Verdict::Stale { app: name.clone() };
            }
        }
        Verdict::Unknown
    }

    /// Brings the tokens in line with `apps`: a token for every app with `[app.container]`
    /// whose file is missing, tampered with or configured differently; none for the others
    /// (their files are removed).
    pub fn reconcile(&self, apps: &[App], now: Moment) -> Vec<Rotation> {
        let _writer = self.writer.lock().expect("token writer lock");
        let wanted: HashMap<&str, &AppContainer> = apps
            .iter()
            .filter_map(|a| a.container.as_ref().map(|c| (a.name.as_str(), c)))
            .collect();
        let gone: Vec<(String, PathBuf)> = {
            let mut tokens = self.tokens.write().expect("token store lock");
            let gone = tokens
                .iter()
                .filter(|(name, held)| {
                    wanted
                        .get(name.as_str())
                        .is_none_or(|c| c.token_file != held.target.token_file)
                })
                .map(|(name, held)| (name.clone(), held.target.token_file.clone()))
                .collect::<Vec<_>>();
            for (name, _) in &gone {
                tokens.remove(name);
            }
            gone
        };
        for (app, file) in &gone {
            if let Err(e) = token_file::remove(file) {
                tracing::warn!(%app, file = %file.display(), error = %e, "cannot remove an old token file");
            }
        }
        // Nothing writes these files now (the writer lock is held): a temporary file beside
        // one is what a killed write left.
        let files = gone
            .iter()
            .map(|(app, file)| (app.as_str(), file))
            .chain(wanted.iter().map(|(app, c)| (*app, &c.token_file)));
        for (app, file) in files {
            match token_file::remove_temp_files(file) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(%app, file = %file.display(), removed = n, "removed temporary files an interrupted write left")
                }
                Err(e) => {
                    tracing::warn!(%app, file = %file.display(), error = %e, "cannot remove temporary token files")
                }
            }
        }
        let mut rotations = Vec::new();
        for (name, target) in wanted {
            match self.check_file(name, target) {
                FileCheck::Current => {}
                FileCheck::Pending => rotations.push(self.finish(name, target)),
                FileCheck::Replace => {
                    rotations.push(self.replace(name, target, now, None, RotationCause::Issued));
                }
            }
        }
        self.save();
        rotations
    }

    /// What `name`'s token file holds against what the store holds (see the module's "Crash
    /// safety"). Drops a pending token that never reached the file. The caller holds the
    /// writer lock; the files are read without holding the token lock.
    fn check_file(&self, name: &str, target: &AppContainer) -> FileCheck {
        let held = {
            let tokens = self.tokens.read().expect("token store lock");
            tokens
                .get(name)
                .filter(|held| &held.target == target)
                .map(|held| (held.current, held.pending))
        };
        let Some((current, pending)) = held else {
            return FileCheck::Replace;
        };
        if !token_file::intact(target) {
            return FileCheck::Replace;
        }
        let in_file = match token_file::read(&target.token_file) {
            Ok(token) => digest(&token),
            // A daemon that may chown but not read others' files: trust the owner and mode,
            // as long as no rotation was under way.
            Err(e) if pending.is_none() => {
                tracing::debug!(app = %name, file = %target.token_file.display(), error = %e, "cannot read the token file; keeping its token");
                return FileCheck::Current;
            }
            Err(_) => return FileCheck::Replace,
        };
        if in_file == current {
            if pending.is_some() {
                if let Some(held) = self.tokens.write().expect("token store lock").get_mut(name) {
                    held.pending = None;
                }
                tracing::info!(app = %name, "a token rotation was cut short before its file was written; the token in force is kept");
            }
            FileCheck::Current
        } else if pending.is_some_and(|p| p.digest == in_file) {
            FileCheck::Pending
        } else {
            tracing::warn!(app = %name, file = %target.token_file.display(), "the token file holds a token the state does not know; issuing a new one");
            FileCheck::Replace
        }
    }

    /// Finishes the rotation whose token is already in `name`'s file (after a crash).
    fn finish(&self, name: &str, target: &AppContainer) -> Rotation {
        {
            let mut tokens = self.tokens.write().expect("token store lock");
            if let Some(held) = tokens.get_mut(name)
                && let Some(pending) = held.pending
            {
                held.promote(pending);
            }
        }
        self.save();
        self.changes.send_modify(|n| *n += 1);
        Rotation {
            app: name.to_owned(),
            file: target.token_file.clone(),
            cause: RotationCause::Recovered,
            result: Ok(()),
        }
    }

    /// Replaces every token issued `every` (of real time) or longer ago; the old one stays
    /// valid for `grace`.
    pub fn rotate_due(&self, every: Duration, grace: Duration, now: Moment) -> Vec<Rotation> {
        let _writer = self.writer.lock().expect("token writer lock");
        let due: Vec<(String, AppContainer)> = {
            let tokens = self.tokens.read().expect("token store lock");
            tokens
                .iter()
                .filter(|(_, held)| now.reached(held.issued_at + every))
                .map(|(name, held)| (name.clone(), held.target.clone()))
                .collect()
        };
        due.into_iter()
            .map(|(name, target)| {
                self.replace(&name, &target, now, Some(grace), RotationCause::Scheduled)
            })
            .collect()
    }

    /// Replaces `app`'s token now; the old one stops working at once. `None` if the app has no
    /// container token.
    pub fn rotate(&self, app: &str, now: Moment) -> Option<Rotation> {
        let _writer = self.writer.lock().expect("token writer lock");
        let target = self
            .tokens
            .read()
            .expect("token store lock")
            .get(app)?
            .target
            .clone();
        Some(self.replace(app, &target, now, None, RotationCause::Requested))
    }

    /// Sees every change of any app's token (a counter that moves once per change).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How long from `now` until the next scheduled rotation is due (zero: now).
    pub fn next_due(&self, every: Duration, now: Moment) -> Option<Duration> {
        let tokens = self.tokens.read().expect("token store lock");
        tokens
            .values()
            .map(|a| now.until(a.issued_at + every))
            .min()
    }

    pub fn status(&self) -> Vec<TokenStatus> {
        let tokens = self.tokens.read().expect("token store lock");
        let mut list: Vec<_> = tokens
            .iter()
            .map(|(name, a)| TokenStatus {
                app: name.clone(),
                token_file: a.target.token_file.clone(),
                issued_at: a.issued_at.wall,
                previous_until: a.previous.map(|(_, until)| until.wall),
            })
            .collect();
        list.sort_by(|a, b| a.app.cmp(&b.app));
        list
    }

    /// Issues a new token for `name` and writes its file, in the three steps of the module's
    /// "Crash safety". The new token is accepted before the file is written (a fast reader
    /// must not be refused); the old one is kept for `grace`, or retired once the file is in
    /// place. If the file cannot be written nothing changes.
    fn replace(
        &self,
        name: &str,
        target: &AppContainer,
        now: Moment,
        grace: Option<Duration>,
        cause: RotationCause,
    ) -> Rotation {
        let token = new_token();
        let before = self.begin(name, target, digest(token.expose()), now, grace);
        let result = token_file::write(target, &token);
        self.end(name, target, before, result.is_ok());
        if result.is_ok() {
            self.changes.send_modify(|n| *n += 1);
        }
        Rotation {
            app: name.to_owned(),
            file: target.token_file.clone(),
            cause,
            result,
        }
    }

    /// Step 1: records `new` as `name`'s pending token (current at once for an app that has
    /// none) and saves the state. Returns what was held before.
    fn begin(
        &self,
        name: &str,
        target: &AppContainer,
        new: Digest,
        now: Moment,
        grace: Option<Duration>,
    ) -> Option<AppTokens> {
        let before = {
            let mut tokens = self.tokens.write().expect("token store lock");
            let before = tokens.get(name).cloned();
            let pending = Pending {
                digest: new,
                issued_at: now,
                old_until: grace.map(|g| now + g),
            };
            match tokens.get_mut(name) {
                // The old token stays current (so valid) while the file changes hands.
                Some(held) => held.pending = Some(pending),
                // Nothing to keep valid: a crash before the file is in place leaves a file the
                // state does not match, which gets a new token at the next start.
                None => {
                    tokens.insert(
                        name.to_owned(),
                        AppTokens {
                            target: target.clone(),
                            current: new,
                            issued_at: now,
                            previous: None,
                            retired: VecDeque::new(),
                            pending: None,
                        },
                    );
                }
            }
            before
        };
        self.save();
        before
    }

    /// Step 3, once the file write is over: promotes the pending token if the file is in
    /// place, or puts back what was held `before` if it is not; saves the state.
    fn end(&self, name: &str, target: &AppContainer, before: Option<AppTokens>, written: bool) {
        {
            let mut tokens = self.tokens.write().expect("token store lock");
            match (written, before) {
                (false, Some(old)) => {
                    tokens.insert(name.to_owned(), old);
                }
                (false, None) => {
                    tokens.remove(name);
                }
                (true, _) => {
                    if let Some(held) = tokens.get_mut(name) {
                        held.target = target.clone();
                        if let Some(pending) = held.pending {
                            held.promote(pending);
                        }
                    }
                }
            }
        }
        self.save();
    }

    /// Writes the digests to the state file (0600, atomically). A failure is logged: the
    /// tokens in force are unaffected, a restart would just issue new ones.
    fn save(&self) {
        let boot = BootId::current();
        let save = |t| save_moment(t, boot);
        let saved = {
            let tokens = self.tokens.read().expect("token store lock");
            SavedState {
                boot_id: Some(boot.to_hex()),
                apps: tokens
                    .iter()
                    .map(|(name, a)| {
                        let (issued_at, issued_at_boot_ns) = save(a.issued_at);
                        let previous = a.previous.map(|(d, until)| (hex::encode(d), save(until)));
                        (
                            name.clone(),
                            SavedApp {
                                token_file: a.target.token_file.clone(),
                                uid: a.target.uid,
                                gid: a.target.gid,
                                current: hex::encode(a.current),
                                issued_at,
                                issued_at_boot_ns,
                                previous_until_boot_ns: previous
                                    .as_ref()
                                    .and_then(|(_, (_, ns))| *ns),
                                previous: previous.map(|(d, (until, _))| (d, until)),
                                pending: a.pending.map(|p| {
                                    let (issued_at, issued_at_boot_ns) = save(p.issued_at);
                                    let old_until = p.old_until.map(save);
                                    SavedPending {
                                        digest: hex::encode(p.digest),
                                        issued_at,
                                        issued_at_boot_ns,
                                        old_until: old_until.map(|(wall, _)| wall),
                                        old_until_boot_ns: old_until.and_then(|(_, ns)| ns),
                                    }
                                }),
                            },
                        )
                    })
                    .collect(),
            }
        };
        let result = serde_json::to_vec(&saved)
            .map_err(io::Error::other)
            .and_then(|bytes| token_file::write_atomic(&self.state_file, &bytes, 0o600, None));
        if let Err(e) = result {
            tracing::error!(path = %self.state_file.display(), error = %e, "cannot save the container token state");
        }
    }
}

/// What [`TokenStore::check_file`] found.
enum FileCheck {
    /// The file holds the current token.
    Current,
    /// The file holds the pending token: a rotation to finish.
    Pending,
    /// Anything else: a new token is needed.
    Replace,
}

fn retire(retired: &mut VecDeque<Digest>, d: Digest) {
    if retired.len() == RETIRED_KEPT {
        retired.pop_front();
    }
    retired.push_back(d);
}

/// Applies `rotations` to the audit trail (and the log, through it).
pub fn record(rotations: &[Rotation]) {
    for rotation in rotations {
        rotated(rotation);
    }
}

fn rotated(rotation: &Rotation) {
    match &rotation.result {
        Ok(()) => tracing::info!(
            target: "audit",
            event = "container_token.rotated",
            app = %rotation.app,
            cause = rotation.cause.as_str(),
            token_file = %rotation.file.display(),
            "container token written"
        ),
        Err(e) => tracing::error!(
            target: "audit",
            event = "container_token.rotated",
            app = %rotation.app,
            cause = rotation.cause.as_str(),
            token_file = %rotation.file.display(),
            error = %e,
            "cannot write the container token file; the app cannot use the container endpoint"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::fs;

    fn config(dir: &Path) -> Config {
        let me = nix::unistd::geteuid().as_raw();
        let text = format!(
            r#"
            [server]
            listen = ["127.0.0.1:0"]
            state_dir = "{dir}"
            [sts]
            region = "us-east-1"
            [container]
            listen = ["127.0.0.1:0"]
            token_dir = "{dir}/tokens"
            [[app]]
            name = "a"
            match = {{ uid = {me} }}
            role_arn = "arn:aws:iam::111122223333:role/a"
            container = {{}}
            [[app]]
            name = "b"
            match = {{ uid = 4242 }}
            role_arn = "arn:aws:iam::111122223333:role/b"
            container = {{ uid = {me} }}
            "#,
            dir = dir.display()
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn token_of(config: &Config, app: &str) -> String {
        let app = config.apps.iter().find(|a| a.name == app).unwrap();
        fs::read_to_string(&app.container.as_ref().unwrap().token_file).unwrap()
    }

    fn store(dir: &Path, config: &Config, now: Moment) -> TokenStore {
        token_file::ensure_token_dir(&dir.join("tokens")).unwrap();
        let store = TokenStore::open(dir).unwrap();
        let issued = store.reconcile(&config.apps, now);
        assert!(issued.iter().all(|r| r.result.is_ok()), "{issued:?}");
        store
    }

    #[test]
    fn each_token_opens_its_own_app_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = Moment::now();
        let store = store(dir.path(), &config, now);
        let (a, b) = (token_of(&config, "a"), token_of(&config, "b"));
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && !a.contains('\n'));
        assert_eq!(store.verify(&a, now), Verdict::Valid { app: "a".into() });
        assert_eq!(store.verify(&b, now), Verdict::Valid { app: "b".into() });
        assert_eq!(store.verify("ibct_guess", now), Verdict::Unknown);
        assert_eq!(store.verify("", now), Verdict::Unknown);
    }

    #[test]
    fn scheduled_rotation_keeps_the_old_token_for_the_grace_period_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let t0 = Moment::now();
        let store = store(dir.path(), &config, t0);
        let old = token_of(&config, "a");
        let every = Duration::from_secs(3600);
        let grace = Duration::from_secs(60);
        assert!(store.rotate_due(every, grace, t0 + every / 2).is_empty());
        assert_eq!(store.next_due(every, t0 + every / 2), Some(every / 2));
        let t1 = t0 + every;
        let rotated = store.rotate_due(every, grace, t1);
        assert_eq!(rotated.len(), 2);
        let new = token_of(&config, "a");
        assert_ne!(old, new);
        assert_eq!(store.verify(&new, t1), Verdict::Valid { app: "a".into() });
        assert_eq!(
            store.verify(&old, t1 + grace / 2),
            Verdict::Valid { app: "a".into() }
        );
        assert_eq!(
            store.verify(&old, t1 + grace),
            Verdict::Stale { app: "a".into() }
        );
    }

    /// `t` with the wall clock stepped by `secs` (no time passing).
    fn stepped(t: Moment, secs: i64) -> Moment {
        let by = Duration::from_secs(secs.unsigned_abs());
        Moment {
            wall: if secs >= 0 { t.wall + by } else { t.wall - by },
            boot: t.boot,
        }
    }

    #[test]
    fn wall_clock_steps_neither_rotate_early_nor_stall_nor_stretch_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let t0 = Moment::now();
        let store = store(dir.path(), &config, t0);
        let every = Duration::from_secs(600);
        let grace = Duration::from_secs(60);
        // An hour forward, one second later: nothing is due for 599 s.
        let fwd = stepped(t0 + Duration::from_secs(1), 3600);
        assert!(store.rotate_due(every, grace, fwd).is_empty());
        assert_eq!(
            store.next_due(every, fwd),
            Some(every - Duration::from_secs(1))
        );
        // An hour back, at the interval: due now, not in an hour.
        let back = stepped(t0 + every, -3600);
        assert_eq!(store.next_due(every, back), Some(Duration::ZERO));
        let old = token_of(&config, "a");
        assert_eq!(store.rotate_due(every, grace, back).len(), 2);
        // The replaced token's grace is 60 s of real time, even with the clock an hour back.
        let later = stepped(t0 + every + grace, -3600);
        assert_eq!(
            store.verify(&old, later),
            Verdict::Stale { app: "a".into() }
        );
        // ...and not cut short by a step forward.
        let soon = stepped(t0 + every + grace / 2, 3600);
        assert_eq!(store.verify(&old, soon), Verdict::Valid { app: "a".into() });
        // A restart after the wall clock went back keeps the same real-time schedule.
        drop(store);
        let store = TokenStore::open(dir.path()).unwrap();
        assert_eq!(store.next_due(every, back), Some(every));
        assert_eq!(
            store.verify(&old, later),
            Verdict::Stale { app: "a".into() }
        );
    }

    #[test]
    fn a_state_saved_without_boot_readings_is_read_by_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let t0 = Moment::now();
        drop(store(dir.path(), &config, t0));
        // As a daemon before boot-clock readings saved it.
        let path = dir.path().join(STATE_FILE);
        let mut state: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        state.as_object_mut().unwrap().remove("boot_id");
        for app in state["apps"].as_object_mut().unwrap().values_mut() {
            app.as_object_mut().unwrap().remove("issued_at_boot_ns");
        }
        fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let every = Duration::from_secs(600);
        let due = store.next_due(every, Moment::now()).unwrap();
        // Issued at t0 by the wall clock (saved to the second).
        assert!(
            due <= every && due > every - Duration::from_secs(3),
            "{due:?}"
        );
    }

    #[test]
    fn a_requested_rotation_revokes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = Moment::now();
        let store = store(dir.path(), &config, now);
        let old = token_of(&config, "b");
        let other = token_of(&config, "a");
        let r = store.rotate("b", now).unwrap();
        assert!(r.result.is_ok());
        assert_eq!(r.cause, RotationCause::Requested);
        assert_eq!(store.verify(&old, now), Verdict::Stale { app: "b".into() });
        let new = token_of(&config, "b");
        assert_eq!(store.verify(&new, now), Verdict::Valid { app: "b".into() });
        assert_eq!(
            store.verify(&other, now),
            Verdict::Valid { app: "a".into() }
        );
        assert!(store.rotate("nope", now).is_none());
    }

    #[test]
    fn tokens_survive_a_restart_and_a_tampered_file_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = Moment::now();
        let a = {
            let _store = store(dir.path(), &config, now);
            token_of(&config, "a")
        };
        let state = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(!state.contains(&a), "the state file holds digests only");
        // Restart: same tokens.
        let store = TokenStore::open(dir.path()).unwrap();
        assert!(store.reconcile(&config.apps, now).is_empty());
        assert_eq!(store.verify(&a, now), Verdict::Valid { app: "a".into() });
        // A token file that was deleted gets a new token on the next reconcile.
        let file = &config.apps[1].container.as_ref().unwrap().token_file;
        fs::remove_file(file).unwrap();
        let again = store.reconcile(&config.apps, now);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].app, "b");
        assert!(file.exists());
    }

    #[test]
    fn removed_apps_lose_their_token_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        let now = Moment::now();
        let store = store(dir.path(), &config, now);
        let b = token_of(&config, "b");
        let file = config.apps[1].container.clone().unwrap().token_file;
        config.apps.truncate(1);
        store.reconcile(&config.apps, now);
        assert_eq!(store.verify(&b, now), Verdict::Unknown);
        assert!(!file.exists());
        assert_eq!(store.status().len(), 1);
    }

    #[test]
    fn an_app_whose_file_cannot_be_written_has_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        let now = Moment::now();
        let store = store(dir.path(), &config, now);
        let a = token_of(&config, "a");
        // Point app a at a directory that does not exist.
        config.apps[0].container.as_mut().unwrap().token_file = dir.path().join("missing/a.token");
        let r = store.reconcile(&config.apps, now);
        assert_eq!(r.len(), 1);
        assert!(r[0].result.is_err());
        assert_eq!(
            store.verify(&a, now),
            Verdict::Unknown,
            "the old file was removed"
        );
        assert!(store.status().iter().all(|s| s.app != "a"));
    }

    /// Where a simulated `kill -9` stops a rotation of app `a` (see the module's "Crash safety").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kill {
        /// Inside step 1's save: its temporary file written, not renamed.
        SavingPending,
        /// After step 1.
        Recorded,
        /// Inside step 2: the new token's temporary file written, not renamed.
        WritingFile,
        /// After step 2's rename.
        Renamed,
        /// Inside step 3's save.
        Promoting,
        /// After step 3: nothing was cut short.
        Done,
    }

    const KILLS: [Kill; 6] = [
        Kill::SavingPending,
        Kill::Recorded,
        Kill::WritingFile,
        Kill::Renamed,
        Kill::Promoting,
        Kill::Done,
    ];

    /// Leaves a temporary file beside `path` as a killed write would.
    fn leave_temp(path: &Path, bytes: &str) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let tmp = path.with_file_name(format!(".{name}.0123456789abcdef.tmp"));
        fs::write(tmp, bytes).unwrap();
    }

    fn temp_files(dirs: &[&Path]) -> Vec<PathBuf> {
        dirs.iter()
            .flat_map(|d| fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect()
    }

    /// Runs a rotation of `a` up to `kill` (the store is then dropped, as a killed daemon's
    /// memory is), and "restarts": a new store from the files alone, reconciled at `later`.
    /// Returns it, the token `a` had before and what reconcile did.
    fn killed(
        dir: &Path,
        config: &Config,
        kill: Kill,
        grace: Option<Duration>,
        t0: Moment,
        later: Moment,
    ) -> (TokenStore, String, Vec<Rotation>) {
        let old = {
            let store = store(dir, config, t0);
            let old = token_of(config, "a");
            let target = config.apps[0].container.clone().unwrap();
            let state = dir.join(STATE_FILE);
            let token = new_token();
            if kill == Kill::SavingPending {
                leave_temp(&state, "{\"apps\":");
            } else {
                let before = store.begin("a", &target, digest(token.expose()), t0, grace);
                match kill {
                    Kill::Recorded => {}
                    Kill::WritingFile => leave_temp(&target.token_file, token.expose()),
                    _ => {
                        token_file::write(&target, &token).unwrap();
                        match kill {
                            Kill::Renamed => {}
                            Kill::Promoting => leave_temp(&state, "{"),
                            _ => store.end("a", &target, before, true),
                        }
                    }
                }
            }
            old
        };
        let store = TokenStore::open(dir).unwrap();
        let rotations = store.reconcile(&config.apps, later);
        (store, old, rotations)
    }

    #[test]
    fn a_rotation_killed_at_any_step_leaves_a_working_token_and_no_temp_file() {
        let every = Duration::from_secs(3600);
        let grace = Duration::from_secs(60);
        for revoking in [false, true] {
            for kill in KILLS {
                let case = format!("{kill:?}, revoking: {revoking}");
                let dir = tempfile::tempdir().unwrap();
                let config = config(dir.path());
                let t0 = Moment::now();
                let t1 = t0 + Duration::from_secs(1);
                let (store, old, rotations) = killed(
                    dir.path(),
                    &config,
                    kill,
                    (!revoking).then_some(grace),
                    t0,
                    t1,
                );
                assert_eq!(
                    temp_files(&[dir.path(), &dir.path().join("tokens")]),
                    Vec::<PathBuf>::new(),
                    "{case}"
                );
                let now = token_of(&config, "a");
                assert_eq!(
                    store.verify(&now, t1),
                    Verdict::Valid { app: "a".into() },
                    "{case}"
                );
                assert_eq!(
                    store.verify(&token_of(&config, "b"), t1),
                    Verdict::Valid { app: "b".into() },
                    "{case}"
                );
                let took_effect = matches!(kill, Kill::Renamed | Kill::Promoting | Kill::Done);
                if !took_effect {
                    // The new token never reached the file: the rotation did not happen.
                    assert_eq!(now, old, "{case}");
                    assert!(rotations.is_empty(), "{case}: {rotations:?}");
                    // It is due again on schedule.
                    assert_eq!(store.next_due(every, t0), Some(every));
                    continue;
                }
                assert_ne!(now, old, "{case}");
                let recovered: Vec<_> = rotations
                    .iter()
                    .map(|r| (r.app.as_str(), r.cause))
                    .collect();
                if kill == Kill::Done {
                    assert!(recovered.is_empty(), "{case}: {rotations:?}");
                } else {
                    assert_eq!(recovered, [("a", RotationCause::Recovered)], "{case}");
                }
                // The old token as documented: valid for the grace, or stale at once.
                if revoking {
                    // Stale, or Unknown once a restart has forgotten it (retired digests are
                    // kept in memory only): refused either way.
                    assert!(
                        matches!(
                            store.verify(&old, t1),
                            Verdict::Stale { .. } | Verdict::Unknown
                        ),
                        "{case}"
                    );
                } else {
                    assert_eq!(
                        store.verify(&old, t1),
                        Verdict::Valid { app: "a".into() },
                        "{case}"
                    );
                    assert_eq!(
                        store.verify(&old, t0 + grace),
                        Verdict::Stale { app: "a".into() },
                        "{case}"
                    );
                }
                // And a second restart changes nothing.
                drop(store);
                let again = TokenStore::open(dir.path()).unwrap();
                assert!(again.reconcile(&config.apps, t1).is_empty(), "{case}");
                assert_eq!(token_of(&config, "a"), now, "{case}");
                assert_eq!(
                    again.verify(&now, t1),
                    Verdict::Valid { app: "a".into() },
                    "{case}"
                );
            }
        }
    }

    #[test]
    fn a_token_file_the_state_does_not_know_gets_a_new_token_not_403_for_good() {
        // What an older daemon killed between renaming the file and saving the state left.
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = Moment::now();
        drop(store(dir.path(), &config, now));
        let target = config.apps[0].container.clone().unwrap();
        token_file::write(&target, &new_token()).unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        assert_eq!(
            store.verify(&token_of(&config, "a"), now),
            Verdict::Unknown,
            "the state does not know it"
        );
        let r = store.reconcile(&config.apps, now);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].app.as_str(), r[0].cause),
            ("a", RotationCause::Issued)
        );
        assert_eq!(
            store.verify(&token_of(&config, "a"), now),
            Verdict::Valid { app: "a".into() }
        );
    }

    #[test]
    fn a_pending_token_is_accepted_while_its_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let now = Moment::now();
        let store = store(dir.path(), &config, now);
        let old = token_of(&config, "a");
        let target = config.apps[0].container.clone().unwrap();
        let token = new_token();
        let before = store.begin("a", &target, digest(token.expose()), now, None);
        assert_eq!(
            store.verify(token.expose(), now),
            Verdict::Valid { app: "a".into() }
        );
        assert_eq!(store.verify(&old, now), Verdict::Valid { app: "a".into() });
        token_file::write(&target, &token).unwrap();
        store.end("a", &target, before, true);
        assert_eq!(store.verify(&old, now), Verdict::Stale { app: "a".into() });
        let state = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(!state.contains("pending"), "{state}");
    }

    #[test]
    fn a_state_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        fs::write(&path, "{}").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            TokenStore::open(dir.path()),
            Err(StoreError::Refused { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(TokenStore::open(dir.path()).is_ok());
    }
}

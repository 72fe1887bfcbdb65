//! Forward-secure sealing of the audit file, after systemd-journald's Forward Secure Sealing:
//! each line carries its `epoch` and a `seal`, HMAC-SHA256 under that epoch's key over the line's
//! chain hash. The key of epoch i+1 is a one-way function of the key of epoch i, and the daemon
//! erases a key (in memory and on disk) as soon as its epoch ends, so whoever takes the host
//! later holds only keys that cannot seal an earlier line. The verifier holds the first key,
//! kept off the host, and derives every later one.
//!
//! Every epoch that has lines ends with an [`EPOCH_END_EVENT`] line sealed with the ending
//! epoch's key, so the tail of an ended epoch cannot be cut either. The tail of the current
//! epoch can: that is what the published checkpoint ([`super::checkpoint`]) is for.
//!
//! Sealing starts at epoch 0; a file written before sealing was turned on starts with unsealed
//! lines, which the first seal covers through the chain.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::chain::{Line, SEAL_FIELD};
use super::keyfile;

type HmacSha256 = Hmac<Sha256>;

pub const KEY_LEN: usize = 32;
/// Domain separation: the epoch step, a seal and a key id are HMACs or hashes of different
/// inputs under the same key.
const EVOLVE_LABEL: &[u8] = b"imds-broker audit epoch v1";
const SEAL_LABEL: &[u8] = b"imds-broker audit seal v1\0";
const KEY_ID_LABEL: &[u8] = b"imds-broker audit key id v1";
/// Hex digits of a key id: enough to tell keys apart, nothing about the key.
const KEY_ID_HEX: usize = 16;

/// The field naming a sealed line's epoch (inside the hash).
pub const EPOCH_FIELD: &str = "epoch";
/// The line that ends an epoch has this `event`, its `next_epoch` and the `key_id`.
pub const EPOCH_END_EVENT: &str = "audit.epoch_end";
pub const NEXT_EPOCH_FIELD: &str = "next_epoch";
pub const KEY_ID_FIELD: &str = "key_id";
/// The most epochs derived in one step, by a verifier reaching a file's first epoch or a daemon
/// catching up with its file: bounds the work a forged epoch number can cause (about a second).
pub const MAX_EPOCH_JUMP: u64 = 1_000_000;

/// A 32-byte sealing key, zeroed when dropped or replaced. Never printed.
pub struct Key(Box<[u8; KEY_LEN]>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Key {
    pub fn generate() -> Self {
        let mut key = Self(Box::new([0; KEY_LEN]));
        rand::rng().fill_bytes(&mut key.0[..]);
        key
    }

    /// The key from its 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut key = Self(Box::new([0; KEY_LEN]));
        hex::decode_to_slice(hex.trim(), &mut key.0[..]).ok()?;
        Some(key)
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }

    /// The short public name of this (first) key: which key sealed a file, without revealing it.
    pub fn id(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(KEY_ID_LABEL);
        hash.update(&self.0[..]);
        let mut id = hex::encode(hash.finalize());
        id.truncate(KEY_ID_HEX);
        id
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0[..]).expect("HMAC takes any key length")
    }

    /// Replaces this key by the next epoch's: k' = HMAC(k, EVOLVE_LABEL). One way: k' does not
    /// give k back.
    fn evolve(&mut self) {
        let mut mac = self.mac();
        mac.update(EVOLVE_LABEL);
        let mut next = mac.finalize().into_bytes();
        self.0.copy_from_slice(&next);
        next.as_mut_slice().zeroize();
    }

    fn seal_mac(&self, hash: &str) -> Option<HmacSha256> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hash, &mut bytes).ok()?;
        let mut mac = self.mac();
        mac.update(SEAL_LABEL);
        mac.update(&bytes);
        Some(mac)
    }

    /// The seal of a line whose chain hash is `hash` (64 hex digits).
    pub fn seal(&self, hash: &str) -> Option<String> {
        Some(hex::encode(self.seal_mac(hash)?.finalize().into_bytes()))
    }

    /// Whether `seal` is this key's seal of `hash`, compared in constant time.
    pub fn verifies(&self, hash: &str, seal: &str) -> bool {
        let mut claimed = [0u8; 32];
        hex::decode_to_slice(seal, &mut claimed).is_ok()
            && self
                .seal_mac(hash)
                .is_some_and(|mac| mac.verify_slice(&claimed).is_ok())
    }
}

/// A key and the epoch it seals, with the id of the schedule's first key.
#[derive(Debug)]
pub struct EpochKey {
    pub epoch: u64,
    pub key: Key,
    pub key_id: String,
}

impl EpochKey {
    /// A new schedule: a random key for epoch 0.
    pub fn generate() -> Self {
        let key = Key::generate();
        Self {
            epoch: 0,
            key_id: key.id(),
            key,
        }
    }

    /// Moves to the next epoch; the old key is overwritten.
    pub fn advance(&mut self) {
        self.key.evolve();
        self.epoch += 1;
    }

    /// Moves forward to `epoch` (at most [`MAX_EPOCH_JUMP`] steps).
    pub fn advance_to(&mut self, epoch: u64) -> Result<(), String> {
        if epoch < self.epoch {
            return Err(format!(
                "epoch {epoch} is before this key's epoch {}",
                self.epoch
            ));
        }
        if epoch - self.epoch > MAX_EPOCH_JUMP {
            return Err(format!(
                "epoch {epoch} is more than {MAX_EPOCH_JUMP} epochs after this key's epoch {}",
                self.epoch
            ));
        }
        while self.epoch < epoch {
            self.advance();
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: refusing a sealing key file that others may read or write (mode {mode:o}); it must be 0600 or 0400", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: {problem}", path.display())]
    Format { path: PathBuf, problem: String },
    #[error("{}: already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error(
        "the audit file is sealed (its last line is in epoch {file_epoch}) but there is no sealing state at {}: restore it from a backup, or move the audit file aside to start a new sealed trail with a new key", state.display()
    )]
    StateMissing { state: PathBuf, file_epoch: u64 },
    #[error("{}: the sealing state is at epoch {state_epoch} but the audit file is at epoch {file_epoch}: {problem}", state.display())]
    StateDiverged {
        state: PathBuf,
        state_epoch: u64,
        file_epoch: u64,
        problem: String,
    },
}

/// When an epoch ends besides at start-up, shutdown and rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochPolicy {
    /// How long after its first line an epoch ends (even with no further line).
    pub every: Duration,
    /// How many lines an epoch holds at most (besides its end line).
    pub events: u64,
}

/// Why an epoch ended, in its end line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Time,
    Events,
    Restart,
    Rotate,
    Stop,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Time => "time",
            EndReason::Events => "events",
            EndReason::Restart => "restart",
            EndReason::Rotate => "rotate",
            EndReason::Stop => "stop",
        }
    }
}

/// The last sealed line of an audit file, as start-up needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSealed {
    pub epoch: u64,
    /// It is its epoch's end line.
    pub ends: bool,
}

impl LastSealed {
    /// The sealing fields of a line, if it is sealed.
    pub fn of(fields: &Map<String, Value>) -> Option<Self> {
        fields.get(SEAL_FIELD)?;
        Some(Self {
            epoch: fields.get(EPOCH_FIELD)?.as_u64()?,
            ends: fields.contains_key(NEXT_EPOCH_FIELD),
        })
    }
}

/// What start-up must do before the first new line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// The current epoch has no line in the file yet: write on in it.
    Continue,
    /// The file's last line is in the current epoch: end it, then advance.
    EndEpoch,
    /// The file's last line already ended the current epoch (a crash between that line and the
    /// state update): advance.
    Advance,
}

/// The writer's side: the current epoch key, when the epoch ends, and the state file that keeps
/// the key across restarts.
#[derive(Debug)]
pub struct Sealer {
    key: EpochKey,
    state_dir: PathBuf,
    policy: EpochPolicy,
    /// Lines sealed in the current epoch by this process.
    lines: u64,
    /// When the current epoch ends by time (set by its first line).
    ends_at: Option<Instant>,
    /// The state file is behind `key` (writing it failed; retried by [`Sealer::save`]).
    unsaved: bool,
}

impl Sealer {
    /// Loads the sealing state from `state_dir`, or starts a new key schedule (writing the
    /// verification key into `state_dir` for the operator to take away) if there is none and
    /// the audit file holds no sealed line. `last` is the audit file's last line. Never seals
    /// with a key older than the file says: a state behind the file is caught up.
    pub fn open(
        state_dir: PathBuf,
        policy: EpochPolicy,
        last: Option<LastSealed>,
        host: &str,
    ) -> Result<(Self, Startup), SealError> {
        let state_path = state_dir.join(keyfile::STATE_FILE);
        let mut made = None;
        let removed = keyfile::remove_leftovers(&state_dir)?;
        if removed > 0 {
            tracing::warn!(
                state_dir = %state_dir.display(),
                removed,
                "removed temporary files of the audit sealing keys left by a crash"
            );
        }
        let key = match keyfile::read_state(&state_dir)? {
            Some(key) => key,
            None => {
                if let Some(last) = last {
                    return Err(SealError::StateMissing {
                        state: state_path,
                        file_epoch: last.epoch,
                    });
                }
                if let Some((key, path)) = resumable(&state_dir) {
                    // A first start killed after its verification key was written and before
                    // its state was: go on with that schedule, or the key the operator takes
                    // away would verify nothing.
                    keyfile::create_state(&state_dir, &key, None)?;
                    tracing::warn!(
                        key_id = %key.key_id,
                        verification_key = %path.display(),
                        "audit sealing resumed the key schedule of a start cut short before its state was saved"
                    );
                    key
                } else {
                    Self::start_schedule(&state_dir, host, &mut made)?
                }
            }
        };
        let mut sealer = Sealer {
            key,
            state_dir,
            policy,
            lines: 0,
            ends_at: None,
            unsaved: false,
        };
        let startup = match last {
            Some(last) if last.epoch > sealer.key.epoch => {
                // The file went on past the saved state (writing the state failed before a
                // crash, or the state was restored from a backup): derive up to the file.
                let state_epoch = sealer.key.epoch;
                sealer
                    .key
                    .advance_to(last.epoch)
                    .map_err(|problem| SealError::StateDiverged {
                        state: state_path.clone(),
                        state_epoch,
                        file_epoch: last.epoch,
                        problem,
                    })?;
                sealer.unsaved = true;
                tracing::warn!(
                    state_epoch,
                    file_epoch = last.epoch,
                    "the audit sealing state was behind the audit file; caught up"
                );
                if last.ends {
                    Startup::Advance
                } else {
                    Startup::EndEpoch
                }
            }
            Some(last) if last.epoch == sealer.key.epoch => {
                if last.ends {
                    Startup::Advance
                } else {
                    Startup::EndEpoch
                }
            }
            Some(last) => {
                if !(last.ends && last.epoch + 1 == sealer.key.epoch) {
                    tracing::warn!(
                        file_epoch = last.epoch,
                        state_epoch = sealer.key.epoch,
                        "the audit file does not end where the sealing state expects (it was \
                         replaced or cut): `audit verify --key` will show the gap"
                    );
                }
                Startup::Continue
            }
            None => Startup::Continue,
        };
        if startup == Startup::Continue {
            sealer.save()?;
        }
        for leftover in keyfile::verify_keys_in(&sealer.state_dir)
            .into_iter()
            .filter(|path| Some(path) != made.as_ref())
        {
            tracing::warn!(
                verification_key = %leftover.display(),
                "an audit verification key is still on this host: move it off (whoever can read it can forge seals)"
            );
        }
        Ok((sealer, startup))
    }

    /// A new key schedule: its verification key first, then its state (see [`resumable`]).
    fn start_schedule(
        state_dir: &Path,
        host: &str,
        made: &mut Option<PathBuf>,
    ) -> Result<EpochKey, SealError> {
        let key = EpochKey::generate();
        let verify_path = state_dir.join(keyfile::verify_key_name(&key.key_id));
        keyfile::write_verify_key(&verify_path, &key, host)?;
        keyfile::create_state(state_dir, &key, None)?;
        tracing::warn!(
            key_id = %key.key_id,
            verification_key = %verify_path.display(),
            "audit sealing started with a new key: move the verification key off this host \
             (whoever can read it can forge seals) and check the audit file with \
             `imds-broker audit verify --key FILE`"
        );
        *made = Some(verify_path);
        Ok(key)
    }

    pub fn epoch(&self) -> u64 {
        self.key.epoch
    }

    pub fn key_id(&self) -> &str {
        &self.key.key_id
    }

    /// Puts the current epoch into an event's fields, before they are chained.
    pub fn stamp(&self, fields: &mut Map<String, Value>) {
        fields.remove(NEXT_EPOCH_FIELD);
        fields.insert(EPOCH_FIELD.into(), Value::from(self.key.epoch));
    }

    /// Adds the seal to chained fields (stamped before chaining) and counts the line.
    pub fn seal(&mut self, fields: &mut Map<String, Value>, now: Instant) {
        let seal = fields
            .get("hash")
            .and_then(Value::as_str)
            .and_then(|hash| self.key.key.seal(hash))
            .expect("chained fields carry a hex hash");
        fields.insert(SEAL_FIELD.into(), Value::from(seal));
        self.lines += 1;
        self.ends_at.get_or_insert(now + self.policy.every);
    }

    /// Whether the current epoch has lines in this process's file.
    pub fn has_lines(&self) -> bool {
        self.lines > 0
    }

    /// Why the current epoch should end now, if it should.
    pub fn due(&self, now: Instant) -> Option<EndReason> {
        if self.lines >= self.policy.events {
            Some(EndReason::Events)
        } else if self.ends_at.is_some_and(|t| now >= t) {
            Some(EndReason::Time)
        } else {
            None
        }
    }

    /// Ends the current epoch by time at `at` instead (its end line could not be written).
    pub fn retry_end_at(&mut self, at: Instant) {
        self.ends_at = Some(at);
    }

    /// When the current epoch ends by time, if it has begun.
    pub fn deadline(&self) -> Option<Instant> {
        self.ends_at
    }

    /// The fields of the line that ends the current epoch (stamp and seal it like any line).
    pub fn end_fields(&self, reason: EndReason) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from(EPOCH_END_EVENT));
        fields.insert(
            NEXT_EPOCH_FIELD.into(),
            Value::from(self.key.epoch.saturating_add(1)),
        );
        fields.insert(KEY_ID_FIELD.into(), Value::from(self.key.key_id.clone()));
        fields.insert("reason".into(), Value::from(reason.as_str()));
        fields.insert("message".into(), Value::from("audit epoch sealed"));
        fields.insert(EPOCH_FIELD.into(), Value::from(self.key.epoch));
        fields
    }

    /// Starts the next epoch, once the end line of this one is in the file: the old key is
    /// overwritten in memory and the new one replaces it in the state file (atomically, the old
    /// file's content zeroed) before the caller writes any line of the new epoch. If the state
    /// file cannot be written the new key is used anyway (the old one must not live on) and
    /// the write is retried; a restart before it succeeds catches up from the audit file.
    pub fn advance(&mut self) -> Result<(), SealError> {
        self.key.advance();
        self.lines = 0;
        self.ends_at = None;
        self.unsaved = true;
        self.save()
    }

    /// Writes the state file if it is behind.
    pub fn save(&mut self) -> Result<(), SealError> {
        if self.unsaved {
            keyfile::replace_state(&self.state_dir, &self.key)?;
            self.unsaved = false;
        }
        Ok(())
    }

    pub fn is_saved(&self) -> bool {
        !self.unsaved
    }
}

/// The schedule a first start began and a kill cut short between writing its verification key
/// and its state: with no state and no sealed line, the one verification key the daemon left
/// in `state_dir` (read whole; both files appear whole or not at all). Several, or one that
/// does not read, is no schedule to resume.
fn resumable(state_dir: &Path) -> Option<(EpochKey, PathBuf)> {
    let [path] = <[PathBuf; 1]>::try_from(keyfile::verify_keys_in(state_dir)).ok()?;
    let key = keyfile::read_verify_key(&path).ok()?;
    let name = keyfile::verify_key_name(&key.key_id);
    (key.epoch == 0 && path.file_name()? == std::ffi::OsStr::new(&name)).then_some((key, path))
}

/// What [`Checker`] found in a whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealReport {
    pub sealed: u64,
    /// Lines before the first sealed one (written before sealing was turned on).
    pub unsealed: u64,
    pub first_line: usize,
    pub first_epoch: u64,
    pub last_epoch: u64,
    /// The last epoch has no end line: it was still being written.
    pub open: bool,
}

/// Checks the seals of a file's lines, in order, with a key of the schedule (normally epoch 0's,
/// from the verification key file).
pub struct Checker {
    key: EpochKey,
    unsealed: u64,
    sealed: u64,
    first: Option<(usize, u64)>,
    last: Option<CheckedLine>,
}

struct CheckedLine {
    number: usize,
    epoch: u64,
    ends: bool,
}

impl Checker {
    pub fn new(key: EpochKey) -> Self {
        Self {
            key,
            unsealed: 0,
            sealed: 0,
            first: None,
            last: None,
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key.key_id
    }

    /// Checks one line that passed the chain checks.
    pub fn check(&mut self, line: &Line<'_>) -> Result<(), String> {
        let (epoch, seal) = match (line.fields.get(EPOCH_FIELD), line.seal) {
            (None, None) => {
                if let Some(last) = &self.last {
                    return Err(format!(
                        "not sealed, after sealed lines (line {} is): sealing was turned off, or the seals were stripped",
                        last.number
                    ));
                }
                self.unsealed += 1;
                return Ok(());
            }
            (Some(_), None) => return Err("an epoch but no seal (the seal was removed)".into()),
            (None, Some(_)) => return Err("a seal but no epoch".into()),
            (Some(epoch), Some(seal)) => (
                epoch.as_u64().ok_or("epoch is not a number")?,
                seal.as_str().ok_or("seal is not a string")?,
            ),
        };
        match &self.last {
            None => {
                if self.unsealed > 0 && epoch != 0 {
                    return Err(format!(
                        "the first sealed line is in epoch {epoch}: sealing starts at epoch 0, so the {} unsealed line(s) before it lost their seals",
                        self.unsealed
                    ));
                }
                self.key.advance_to(epoch)?;
            }
            Some(last) if epoch == last.epoch => {
                if last.ends {
                    return Err(format!(
                        "in epoch {epoch}, which line {} ended",
                        last.number
                    ));
                }
            }
            Some(last) if epoch == last.epoch + 1 => {
                if !last.ends {
                    return Err(format!(
                        "epoch {} ends at line {} without its {EPOCH_END_EVENT} line (lines were cut there)",
                        last.epoch, last.number
                    ));
                }
                self.key.advance();
            }
            Some(last) => {
                return Err(format!(
                    "epoch {epoch} follows epoch {} (line {}): epochs skipped or out of order",
                    last.epoch, last.number
                ));
            }
        }
        if !self.key.key.verifies(line.hash, seal) {
            let hint = match line.fields.get(KEY_ID_FIELD).and_then(Value::as_str) {
                Some(id) if id != self.key.key_id => {
                    format!(
                        " (the line names key {id}; the key given is {})",
                        self.key.key_id
                    )
                }
                _ => String::new(),
            };
            return Err(format!(
                "seal does not match: the line was forged or re-sealed without epoch {epoch}'s key{hint}"
            ));
        }
        let ends = match line.fields.get(NEXT_EPOCH_FIELD) {
            None => false,
            Some(next) if next.as_u64() == epoch.checked_add(1) => true,
            Some(next) => return Err(format!("next_epoch {next} does not follow epoch {epoch}")),
        };
        self.sealed += 1;
        self.first.get_or_insert((line.number, epoch));
        self.last = Some(CheckedLine {
            number: line.number,
            epoch,
            ends,
        });
        Ok(())
    }

    /// The verdict on the whole file: it must hold at least one sealed line.
    pub fn finish(self) -> Result<SealReport, String> {
        let (Some((first_line, first_epoch)), Some(last)) = (self.first, self.last) else {
            return Err(format!(
                "no line is sealed ({} unsealed): nothing in the file is authenticated by the key",
                self.unsealed
            ));
        };
        Ok(SealReport {
            sealed: self.sealed,
            unsealed: self.unsealed,
            first_line,
            first_epoch,
            last_epoch: last.epoch,
            open: !last.ends,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::chain::{self, ChainHead};
    use serde_json::json;

    fn key_copy(key: &EpochKey) -> EpochKey {
        EpochKey {
            epoch: key.epoch,
            key: Key::from_hex(&key.key.to_hex()).unwrap(),
            key_id: key.key_id.clone(),
        }
    }

    fn event(n: u64) -> Map<String, Value> {
        let Value::Object(m) = json!({"event": "credentials.issued", "uid": n}) else {
            unreachable!()
        };
        m
    }

    /// A sealed trail the way the writer builds it: `per_epoch[i]` events in epoch i, each
    /// epoch but the last ended by its end line. Returns the lines and the epoch-0 key.
    pub(crate) fn trail(per_epoch: &[u64]) -> (Vec<String>, EpochKey) {
        let mut key = EpochKey::generate();
        let first = key_copy(&key);
        let mut head = ChainHead::default();
        let mut lines = Vec::new();
        let mut n = 0;
        for (i, count) in per_epoch.iter().enumerate() {
            for _ in 0..*count {
                n += 1;
                let mut fields = event(n);
                fields.insert(EPOCH_FIELD.into(), Value::from(key.epoch));
                lines.push(sealed_line(&mut head, fields, &key));
            }
            if i + 1 < per_epoch.len() {
                let mut end = Map::new();
                end.insert("event".into(), Value::from(EPOCH_END_EVENT));
                end.insert(NEXT_EPOCH_FIELD.into(), Value::from(key.epoch + 1));
                end.insert(EPOCH_FIELD.into(), Value::from(key.epoch));
                lines.push(sealed_line(&mut head, end, &key));
                key.advance();
            }
        }
        (lines, first)
    }

    fn sealed_line(head: &mut ChainHead, fields: Map<String, Value>, key: &EpochKey) -> String {
        let mut fields = chain::link(head, fields);
        let seal = key.key.seal(fields["hash"].as_str().unwrap()).unwrap();
        fields.insert(SEAL_FIELD.into(), Value::from(seal));
        serde_json::to_string(&fields).unwrap()
    }

    /// Rebuilds the chain over `lines` (hashes and `prev`), keeping each line's fields; a line
    /// whose hash changed is re-sealed with `reseal(epoch)` where that gives a key, or keeps its
    /// old seal: what someone who can write the file can do with the published algorithm.
    pub(crate) fn rechain(
        lines: &[String],
        mut reseal: impl FnMut(u64) -> Option<EpochKey>,
    ) -> Vec<String> {
        let mut head = ChainHead::default();
        lines
            .iter()
            .map(|l| {
                let mut fields: Map<String, Value> = serde_json::from_str(l).unwrap();
                if head.seq == 0 {
                    head = ChainHead {
                        seq: fields["seq"].as_u64().unwrap() - 1,
                        hash: fields["prev"].as_str().unwrap().into(),
                    };
                }
                let old_seal = fields.remove(SEAL_FIELD);
                let old_hash = fields.get("hash").cloned();
                let epoch = fields.get(EPOCH_FIELD).and_then(Value::as_u64);
                let mut fields = chain::link(&mut head, fields);
                let changed = fields.get("hash") != old_hash.as_ref();
                let seal = match epoch.filter(|_| changed).and_then(&mut reseal) {
                    Some(key) => Some(Value::from(
                        key.key.seal(fields["hash"].as_str().unwrap()).unwrap(),
                    )),
                    None => old_seal,
                };
                if let Some(seal) = seal {
                    fields.insert(SEAL_FIELD.into(), seal);
                }
                serde_json::to_string(&fields).unwrap()
            })
            .collect()
    }

    fn check(lines: &[String], key: &EpochKey) -> Result<SealReport, chain::Broken> {
        let mut checker = Checker::new(key_copy(key));
        chain::verify_with(&lines.join("\n"), |l| checker.check(l))?;
        checker
            .finish()
            .map_err(|problem| chain::Broken { line: 0, problem })
    }

    #[test]
    fn the_key_schedule_is_deterministic_one_way_and_separated() {
        let mut a = EpochKey::generate();
        let b = key_copy(&a);
        let hash = "ab".repeat(32);
        let seal0 = a.key.seal(&hash).unwrap();
        a.advance();
        let mut c = key_copy(&b);
        c.advance_to(1).unwrap();
        assert_eq!(a.key.to_hex(), c.key.to_hex(), "the same schedule");
        assert_ne!(a.key.to_hex(), b.key.to_hex(), "a new key per epoch");
        assert!(
            !a.key.verifies(&hash, &seal0),
            "epoch 1 cannot seal as epoch 0"
        );
        assert!(b.key.verifies(&hash, &seal0));
        // The next key is not a seal of anything, nor is a seal a key.
        assert_ne!(*a.key.to_hex(), seal0);
        assert_eq!(a.key_id, b.key_id, "the id names the schedule");
        assert_eq!(a.key_id.len(), KEY_ID_HEX);
        assert!(
            !format!("{a:?}").contains(&*b.key.to_hex()),
            "never printed"
        );
        assert!(c.advance_to(0).is_err(), "never backwards");
        assert!(c.advance_to(MAX_EPOCH_JUMP + 2).is_err());
    }

    #[test]
    fn an_intact_sealed_trail_verifies_with_its_key_only() {
        let (lines, key) = trail(&[3, 2, 4]);
        let report = check(&lines, &key).unwrap();
        assert_eq!(
            report,
            SealReport {
                sealed: 11,
                unsealed: 0,
                first_line: 1,
                first_epoch: 0,
                last_epoch: 2,
                open: true,
            }
        );
        let err = check(&lines, &EpochKey::generate()).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.problem.contains("seal does not match"), "{err}");
    }

    #[test]
    fn a_line_deleted_and_the_rest_rechained_passes_the_chain_but_not_the_seals() {
        let (mut lines, key) = trail(&[3, 3]);
        lines.remove(1);
        let forged = rechain(&lines, |_| None);
        chain::verify(&forged.join("\n")).expect("the unkeyed chain is rebuilt");
        let err = check(&forged, &key).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.problem.contains("seal does not match"), "{err}");
    }

    #[test]
    fn a_later_epoch_key_cannot_reseal_an_earlier_epoch() {
        let (lines, key) = trail(&[3, 3, 2]);
        // The attacker holds epoch 2's key (and so every later one).
        let mut stolen = key_copy(&key);
        stolen.advance_to(2).unwrap();
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"uid\":2", "\"uid\":0");
        let forged = rechain(&edited, |e| {
            let mut k = key_copy(&stolen);
            let _ = k.advance_to(e); // epochs 0 and 1 get epoch 2's key: all it has
            Some(k)
        });
        chain::verify(&forged.join("\n")).unwrap();
        let err = check(&forged, &key).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.problem.contains("seal does not match"), "{err}");
        // Relabelling the line as epoch 2 breaks the epoch order instead.
        let relabelled = lines[1].replace("\"epoch\":0", "\"epoch\":2");
        let forged = rechain(&[lines[0].clone(), relabelled], |_| Some(key_copy(&stolen)));
        let err = check(&forged, &key).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.problem.contains("epochs skipped"), "{err}");
    }

    #[test]
    fn cutting_the_tail_of_an_ended_epoch_shows() {
        // Epoch 0: lines 1-3 and its end line 4; epoch 1: lines 5-6. Someone with epoch 1's key
        // cuts lines 3-4 and rebuilds epoch 1 on line 2.
        let (lines, key) = trail(&[3, 2]);
        let mut stolen = key_copy(&key);
        stolen.advance();
        let kept = [&lines[..2], &lines[4..]].concat();
        let forged = rechain(&kept, |e| (e == 1).then(|| key_copy(&stolen)));
        let err = check(&forged, &key).unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(
            err.problem.contains("without its audit.epoch_end line"),
            "{err}"
        );
    }

    #[test]
    fn unsealed_lines_are_allowed_only_before_sealing_began_at_epoch_0() {
        let mut head = ChainHead::default();
        let mut lines: Vec<String> = (1..=2).map(|i| chain::line(&mut head, event(i))).collect();
        let (sealed, key) = trail(&[2, 1]);
        lines.extend(sealed);
        let lines = rechain(&lines, |e| {
            let mut k = key_copy(&key);
            k.advance_to(e).unwrap();
            Some(k)
        });
        let report = check(&lines, &key).unwrap();
        assert_eq!(
            (report.unsealed, report.sealed, report.first_line),
            (2, 4, 3)
        );

        // A seal stripped after sealing began.
        let mut stripped: Map<String, Value> = serde_json::from_str(&lines[4]).unwrap();
        stripped.remove(SEAL_FIELD);
        stripped.remove(EPOCH_FIELD);
        let mut bad = lines.clone();
        bad[4] = serde_json::to_string(&stripped).unwrap();
        let err = check(&rechain(&bad, |_| None), &key).unwrap_err();
        assert_eq!(err.line, 5);
        assert!(
            err.problem.contains("not sealed, after sealed lines"),
            "{err}"
        );

        // Every seal stripped: nothing is authenticated.
        let none: Vec<String> = lines
            .iter()
            .map(|l| {
                let mut f: Map<String, Value> = serde_json::from_str(l).unwrap();
                f.remove(SEAL_FIELD);
                f.remove(EPOCH_FIELD);
                serde_json::to_string(&f).unwrap()
            })
            .collect();
        let err = check(&rechain(&none, |_| None), &key).unwrap_err();
        assert!(err.problem.contains("no line is sealed"), "{err}");
    }

    #[test]
    fn a_file_continuing_a_rotated_one_verifies_from_its_epoch() {
        let (lines, key) = trail(&[2, 2, 2]);
        let report = check(&lines[4..], &key).unwrap();
        assert_eq!((report.first_epoch, report.last_epoch), (1, 2));
    }

    /// The state dir's file names, sorted.
    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn policy() -> EpochPolicy {
        EpochPolicy {
            every: Duration::from_secs(900),
            events: 1000,
        }
    }

    fn private_dir(base: &tempfile::TempDir) -> PathBuf {
        use std::os::unix::fs::DirBuilderExt;
        let state_dir = base.path().join("state");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state_dir)
            .unwrap();
        state_dir
    }

    #[test]
    fn a_first_start_killed_while_writing_the_state_starts_cleanly() {
        use std::os::unix::fs::OpenOptionsExt;
        let base = tempfile::tempdir().unwrap();
        let state_dir = private_dir(&base);
        // Killed between creating the state file and writing it, and while writing the
        // temporary files of the state and of a verification key.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(state_dir.join(keyfile::STATE_FILE))
            .unwrap();
        std::fs::write(state_dir.join(".audit-seal.state.tmp"), "format = ").unwrap();
        std::fs::write(
            state_dir.join(".audit-verify-0123456789abcdef.key.tmp"),
            "# imds",
        )
        .unwrap();
        let (sealer, startup) = Sealer::open(state_dir.clone(), policy(), None, "h").unwrap();
        assert_eq!(startup, Startup::Continue);
        assert_eq!(
            names(&state_dir),
            [
                keyfile::STATE_FILE.to_owned(),
                keyfile::verify_key_name(sealer.key_id())
            ]
        );
        let saved = keyfile::read_state(&state_dir).unwrap().unwrap();
        assert_eq!((saved.epoch, saved.key_id.as_str()), (0, sealer.key_id()));
    }

    #[test]
    fn a_first_start_killed_between_the_verification_key_and_the_state_is_resumed() {
        let base = tempfile::tempdir().unwrap();
        let state_dir = private_dir(&base);
        let key = EpochKey::generate();
        let verify = state_dir.join(keyfile::verify_key_name(&key.key_id));
        keyfile::write_verify_key(&verify, &key, "h").unwrap();
        let (sealer, startup) = Sealer::open(state_dir.clone(), policy(), None, "h").unwrap();
        assert_eq!(startup, Startup::Continue);
        // The key the operator will take away is the one that seals: no second schedule.
        assert_eq!(sealer.key_id(), key.key_id);
        assert_eq!(
            names(&state_dir),
            [
                keyfile::STATE_FILE.to_owned(),
                keyfile::verify_key_name(&key.key_id)
            ]
        );
        let saved = keyfile::read_state(&state_dir).unwrap().unwrap();
        assert_eq!(saved.key.to_hex(), key.key.to_hex());
        // Two verification keys are no schedule to guess from: a new one, both kept.
        let other = EpochKey::generate();
        keyfile::write_verify_key(
            &state_dir.join(keyfile::verify_key_name(&other.key_id)),
            &other,
            "h",
        )
        .unwrap();
        std::fs::remove_file(state_dir.join(keyfile::STATE_FILE)).unwrap();
        let (fresh, _) = Sealer::open(state_dir.clone(), policy(), None, "h").unwrap();
        assert!(fresh.key_id() != key.key_id && fresh.key_id() != other.key_id);
        assert_eq!(names(&state_dir).len(), 4);
    }
}

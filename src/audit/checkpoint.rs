//! The audit checkpoint: where the audit file's chain stands (last seq and hash), kept outside
//! the file so that cutting its last lines shows. The writer thread records it after every
//! batch it wrote (for `/status` and the `imds_broker_audit_last_seq` gauge) and logs it, at
//! most every [`LOG_EVERY`] and at once when an epoch ends or the daemon stops, as an ordinary
//! log line with `audit_seq` and `audit_hash` that journald keeps. `audit verify --expect-seq
//! N --expect-hash H` checks a file against it.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chain::{self, Line};

/// The longest a written line waits before a checkpoint in the log covers it.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// The log target of checkpoint lines (not `audit`: they are not audit events, and must not go
/// back into the file they describe).
pub const TARGET: &str = "audit_checkpoint";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    /// The current sealing epoch and key id, when the file is sealed.
    pub epoch: Option<u64>,
    pub key_id: Option<String>,
}

/// The latest checkpoint of this process's audit file (one daemon per process).
static LATEST: Mutex<Option<Checkpoint>> = Mutex::new(None);

pub fn record(checkpoint: Checkpoint) {
    *LATEST.lock().unwrap_or_else(PoisonError::into_inner) = Some(checkpoint);
}

pub fn latest() -> Option<Checkpoint> {
    LATEST
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Logs `checkpoint` for journald.
pub fn log(checkpoint: &Checkpoint) {
    tracing::info!(
        target: TARGET,
        audit_seq = checkpoint.seq,
        audit_hash = %checkpoint.hash,
        audit_epoch = checkpoint.epoch,
        audit_key_id = checkpoint.key_id.as_deref(),
        "audit checkpoint"
    );
}

/// A checkpoint to find in a file: the line with `seq` (and, if given, `hash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub seq: u64,
    pub hash: Option<String>,
}

/// Watches a file's lines for the expected checkpoint (see [`chain::verify_with`]).
#[derive(Debug)]
pub struct Finder {
    expected: Expected,
    found: Option<(usize, String)>,
}

impl Finder {
    pub fn new(expected: Expected) -> Self {
        Self {
            expected,
            found: None,
        }
    }

    pub fn expected(&self) -> &Expected {
        &self.expected
    }

    pub fn see(&mut self, line: &Line<'_>) {
        if line.seq == self.expected.seq {
            self.found = Some((line.number, line.hash.to_owned()));
        }
    }

    /// Whether the verified file holds the checkpoint: it must not end before it (the tail was
    /// cut) nor hold another line there (the tail was rewritten).
    pub fn finish(self, file: &chain::Verified) -> Result<(), String> {
        let want = &self.expected;
        match self.found {
            Some((line, hash)) => match &want.hash {
                Some(h) if !h.eq_ignore_ascii_case(&hash) => Err(format!(
                    "line {line} (seq {}) has hash {hash}, the checkpoint says {h}: the file was rewritten from there",
                    want.seq
                )),
                _ => Ok(()),
            },
            None if file.events > 0 && file.first_seq > want.seq => Err(format!(
                "the file starts at seq {}, after the checkpoint's seq {}: check the earlier (rotated) file",
                file.first_seq, want.seq
            )),
            None if file.events == 0 => Err(format!(
                "the file is empty but the checkpoint is at seq {}: it was truncated",
                want.seq
            )),
            None => Err(format!(
                "the file ends at seq {} but the checkpoint is at seq {}: lines were cut from its end",
                file.head.seq, want.seq
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::ChainHead;
    use serde_json::{Map, Value};

    fn file(n: u64) -> (String, Vec<String>) {
        let mut head = ChainHead::default();
        let mut hashes = Vec::new();
        let lines: Vec<String> = (1..=n)
            .map(|i| {
                let mut m = Map::new();
                m.insert("n".into(), Value::from(i));
                let line = chain::line(&mut head, m);
                hashes.push(head.hash.clone());
                line
            })
            .collect();
        (lines.join("\n"), hashes)
    }

    fn against(text: &str, seq: u64, hash: Option<&str>) -> Result<(), String> {
        let mut finder = Finder::new(Expected {
            seq,
            hash: hash.map(str::to_owned),
        });
        let verified = chain::verify_with(text, |l| {
            finder.see(l);
            Ok(())
        })
        .unwrap();
        finder.finish(&verified)
    }

    #[test]
    fn a_file_is_checked_against_a_checkpoint() {
        let (text, hashes) = file(5);
        against(&text, 5, Some(&hashes[4])).unwrap();
        against(&text, 3, Some(&hashes[2].to_uppercase())).unwrap();
        against(&text, 3, None).unwrap();
        let (cut, _) = file(3);
        let err = against(&cut, 5, Some(&hashes[4])).unwrap_err();
        assert!(err.contains("ends at seq 3"), "{err}");
        let err = against(&text, 4, Some(&hashes[2])).unwrap_err();
        assert!(err.contains("line 4 (seq 4) has hash"), "{err}");
        let err = against("", 1, None).unwrap_err();
        assert!(err.contains("empty"), "{err}");
        let tail: Vec<&str> = text.lines().skip(3).collect();
        let err = against(&tail.join("\n"), 2, None).unwrap_err();
        assert!(err.contains("starts at seq 4"), "{err}");
    }
}

//! The audit file's hash chain: every line is a JSON object carrying `seq`, the `prev` line's
//! hash and its own `hash` (sha256 over the object without `hash`, keys sorted), so an edited,
//! deleted or reordered line breaks the chain where it happened.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the first event ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a chain stands: the last sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

impl Default for ChainHead {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.into(),
        }
    }
}

fn digest(fields: &Map<String, Value>) -> String {
    // serde_json's Map is ordered by key, so this serialization is canonical.
    let bytes = serde_json::to_vec(fields).expect("a JSON map serializes");
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Adds `seq`, `prev` and `hash` to `fields` after `head`, advances `head`, and returns the line
/// (without newline).
pub fn seal(head: &mut ChainHead, mut fields: Map<String, Value>) -> String {
    head.seq += 1;
    fields.insert("seq".into(), Value::from(head.seq));
    fields.insert("prev".into(), Value::from(head.hash.clone()));
    fields.remove("hash");
    let hash = digest(&fields);
    fields.insert("hash".into(), Value::from(hash.clone()));
    head.hash = hash;
    serde_json::to_string(&fields).expect("a JSON map serializes")
}

/// The head a line leaves the chain at, if the line is a sealed event.
pub fn head_of(line: &str) -> Option<ChainHead> {
    let v: Map<String, Value> = serde_json::from_str(line).ok()?;
    Some(ChainHead {
        seq: v.get("seq")?.as_u64()?,
        hash: v.get("hash")?.as_str()?.to_owned(),
    })
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub events: u64,
    pub first_seq: u64,
    /// Whether the file starts at the beginning of the chain (else it continues a rotated one).
    pub from_genesis: bool,
    pub head: ChainHead,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct Broken {
    pub line: usize,
    pub problem: String,
}

/// Checks every line of an audit file: each parses, its hash matches its content, it names the
/// previous line's hash and the next sequence number.
pub fn verify(text: &str) -> Result<Verified, Broken> {
    let mut head: Option<ChainHead> = None;
    let mut first = None;
    let mut events = 0;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let broken = |problem: String| Broken {
            line: line_no,
            problem,
        };
        if line.trim().is_empty() {
            return Err(broken("empty line".into()));
        }
        let mut fields: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| broken(format!("not a JSON object: {e}")))?;
        let claimed = fields
            .remove("hash")
            .and_then(|h| h.as_str().map(str::to_owned))
            .ok_or_else(|| broken("no hash".into()))?;
        if digest(&fields) != claimed {
            return Err(broken(
                "hash does not match the line's content (edited?)".into(),
            ));
        }
        let seq = fields
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| broken("no seq".into()))?;
        let prev = fields
            .get("prev")
            .and_then(Value::as_str)
            .ok_or_else(|| broken("no prev".into()))?;
        if let Some(h) = &head {
            if prev != h.hash {
                return Err(broken(format!(
                    "prev does not match line {}'s hash (a line was removed or reordered)",
                    line_no - 1
                )));
            }
            if seq != h.seq + 1 {
                return Err(broken(format!("seq {seq} follows seq {} (a gap)", h.seq)));
            }
        } else {
            first = Some((seq, prev == GENESIS && seq == 1));
        }
        head = Some(ChainHead { seq, hash: claimed });
        events += 1;
    }
    let (first_seq, from_genesis) = first.unwrap_or((0, true));
    Ok(Verified {
        events,
        first_seq,
        from_genesis,
        head: head.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(n: u64) -> Map<String, Value> {
        let Value::Object(m) = json!({"event": "credentials.issued", "uid": n, "app": "a"}) else {
            unreachable!()
        };
        m
    }

    fn chain(n: u64) -> Vec<String> {
        let mut head = ChainHead::default();
        (1..=n).map(|i| seal(&mut head, event(i))).collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let lines = chain(5);
        let v = verify(&(lines.join("\n") + "\n")).unwrap();
        assert_eq!(v.events, 5);
        assert!(v.from_genesis);
        assert_eq!(v.head, head_of(&lines[4]).unwrap());
    }

    #[test]
    fn a_deleted_line_is_detected() {
        let mut lines = chain(5);
        lines.remove(2);
        let err = verify(&lines.join("\n")).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.problem.contains("removed"), "{err}");
    }

    #[test]
    fn an_edited_line_is_detected() {
        let mut lines = chain(5);
        lines[1] = lines[1].replace("\"uid\":2", "\"uid\":0");
        let err = verify(&lines.join("\n")).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.problem.contains("edited"), "{err}");
    }

    #[test]
    fn a_rotated_file_continues_the_chain() {
        let lines = chain(6);
        let v = verify(&lines[3..].join("\n")).unwrap();
        assert!(!v.from_genesis);
        assert_eq!((v.first_seq, v.events), (4, 3));
    }
}

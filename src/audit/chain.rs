//! The audit file's hash chain: every line is a JSON object carrying `seq`, the `prev` line's
//! hash and its own `hash` (sha256 over the object without `hash` and `seal`, keys sorted), so an
//! edited, deleted or reordered line breaks the chain where it happened. The chain alone is
//! unkeyed: anyone who can write the file can rebuild it; [`super::seal`] adds the keyed seal.

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

/// The field holding a line's keyed seal: outside the hash, which it authenticates.
pub const SEAL_FIELD: &str = "seal";

/// The hash of a line's fields, which must hold neither `hash` nor `seal`.
fn digest(fields: &Map<String, Value>) -> String {
    // serde_json's Map is ordered by key, so this serialization is canonical.
    let bytes = serde_json::to_vec(fields).expect("a JSON map serializes");
    hex::encode(Sha256::digest(bytes))
}

/// Adds `seq`, `prev` and `hash` to `fields` after `head` and advances `head`. The caller may
/// add a `seal` to the result before writing it out.
pub fn link(head: &mut ChainHead, mut fields: Map<String, Value>) -> Map<String, Value> {
    head.seq += 1;
    fields.insert("seq".into(), Value::from(head.seq));
    fields.insert("prev".into(), Value::from(head.hash.clone()));
    fields.remove("hash");
    fields.remove(SEAL_FIELD);
    let hash = digest(&fields);
    fields.insert("hash".into(), Value::from(hash.clone()));
    head.hash = hash;
    fields
}

/// [`link`], written out as a line (without newline).
pub fn line(head: &mut ChainHead, fields: Map<String, Value>) -> String {
    serde_json::to_string(&link(head, fields)).expect("a JSON map serializes")
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

/// One line that passed the chain checks, as [`verify_with`] shows it to its caller.
pub struct Line<'a> {
    /// 1-based line number in the file.
    pub number: usize,
    pub seq: u64,
    pub hash: &'a str,
    /// Every field but `hash` and `seal`.
    pub fields: &'a Map<String, Value>,
    pub seal: Option<&'a Value>,
}

/// Checks every line of an audit file: each parses, its hash matches its content, it names the
/// previous line's hash and the next sequence number.
pub fn verify(text: &str) -> Result<Verified, Broken> {
    verify_with(text, |_| Ok(()))
}

/// [`verify`], also handing each line that passes the chain checks to `check`, in order; the
/// first line that either refuses is the one reported.
pub fn verify_with(
    text: &str,
    mut check: impl FnMut(&Line<'_>) -> Result<(), String>,
) -> Result<Verified, Broken> {
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
        let seal = fields.remove(SEAL_FIELD);
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
        check(&Line {
            number: line_no,
            seq,
            hash: &claimed,
            fields: &fields,
            seal: seal.as_ref(),
        })
        .map_err(broken)?;
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
        (1..=n).map(|i| line(&mut head, event(i))).collect()
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
    fn a_seal_is_outside_the_hash_and_seen_by_the_checker() {
        let mut head = ChainHead::default();
        let mut fields = link(&mut head, event(1));
        fields.insert(SEAL_FIELD.into(), Value::from("ab"));
        let text = serde_json::to_string(&fields).unwrap();
        let mut seen = Vec::new();
        let v = verify_with(&text, |l| {
            seen.push((l.number, l.seq, l.hash.to_owned(), l.seal.cloned()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [(1, 1, head.hash.clone(), Some(Value::from("ab")))],
            "the seal changes no hash"
        );
        assert_eq!(v.head, head);
        let err = verify_with(&text, |_| Err("refused".into())).unwrap_err();
        assert_eq!((err.line, err.problem.as_str()), (1, "refused"));
    }

    #[test]
    fn a_rotated_file_continues_the_chain() {
        let lines = chain(6);
        let v = verify(&lines[3..].join("\n")).unwrap();
        assert!(!v.from_genesis);
        assert_eq!((v.first_seq, v.events), (4, 3));
    }
}

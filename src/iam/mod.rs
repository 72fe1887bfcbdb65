//! IAM session policies: the per-app policy that narrows a role's session to what the app needs.
//!
//! - `json`: a JSON parser that keeps positions, and the minifier (what STS receives).
//! - [`document`]: IAM's policy grammar read into a typed [`Policy`](document::Policy).
//! - [`pattern`]: IAM wildcard matching (`*`, `?`, across `:` and `/`).
//! - [`evaluate`]: one request against one policy, as IAM decides it.
//! - [`lint`]: least-privilege findings for `imds-broker lint`.
//! - [`source`]: where a policy's text is in the file an operator edits.

pub mod document;
pub mod evaluate;
pub mod json;
pub mod lint;
pub mod pattern;
pub mod source;

use document::Policy;
use source::Origin;

/// A session policy that STS will accept in size and syntax: what an `[[app]]` passes to
/// AssumeRole.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPolicy {
    /// The policy as written, for positions.
    pub text: String,
    /// The text without whitespace between tokens: what AssumeRole sends and STS counts.
    pub minified: String,
    pub document: Policy,
    pub origin: Origin,
}

/// Why a policy text cannot be sent to STS, at which byte of the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PolicyError {
    pub offset: usize,
    pub message: String,
}

impl SessionPolicy {
    /// Parses and size-checks `text` (from `origin`).
    pub fn new(text: String, origin: Origin) -> Result<Self, PolicyError> {
        let document = document::parse(&text).map_err(|e| PolicyError {
            offset: e.offset,
            message: e.message,
        })?;
        if let Some((offset, c)) = text.char_indices().find(|&(_, c)| !lint::is_policy_char(c)) {
            return Err(PolicyError {
                offset,
                message: format!(
                    "character {c:?} is not allowed (STS accepts tab, line breaks and U+0020 to U+00FF)"
                ),
            });
        }
        let minified = json::minify(&text);
        let size = minified.chars().count();
        if size > lint::PLAINTEXT_LIMIT {
            return Err(PolicyError {
                offset: 0,
                message: format!(
                    "{size} characters without whitespace, over the STS limit of {} for session policies",
                    lint::PLAINTEXT_LIMIT
                ),
            });
        }
        Ok(Self {
            text,
            minified,
            document,
            origin,
        })
    }

    /// The file line of byte `offset` of the policy text.
    pub fn line_of(&self, offset: usize) -> usize {
        self.origin.locate(&self.text, offset).0
    }
}

/// Whether `arn` is a managed policy ARN, `arn:<partition>:iam::<account or aws>:policy/[path/]name`.
pub fn is_policy_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ["arn", partition, "iam", "", account, resource] = parts[..] else {
        return false;
    };
    let account_ok =
        account == "aws" || (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()));
    let Some(path_and_name) = resource.strip_prefix("policy/") else {
        return false;
    };
    let name = path_and_name.rsplit('/').next().unwrap_or_default();
    !partition.is_empty()
        && account_ok
        && (20..=2048).contains(&arn.len())
        && (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        && path_and_name
            .chars()
            .all(|c| ('\u{21}'..='\u{7e}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_arns() {
        assert!(is_policy_arn("arn:aws:iam::aws:policy/ReadOnlyAccess"));
        assert!(is_policy_arn(
            "arn:aws:iam::123456789012:policy/team/uploads-only"
        ));
        assert!(is_policy_arn(
            "arn:aws-us-gov:iam::aws:policy/service-role/AWSLambdaRole"
        ));
        assert!(!is_policy_arn("arn:aws:iam::123456789012:role/app"));
        assert!(!is_policy_arn("arn:aws:iam::12345:policy/x"));
        assert!(!is_policy_arn("arn:aws:s3:::aws:policy/x"));
        assert!(!is_policy_arn("arn:aws:iam::aws:policy/"));
        assert!(!is_policy_arn("arn:aws:iam::aws:policy/bad name"));
    }
}

//! Least-privilege checks on one session policy, as `imds-broker lint` reports them: each
//! finding with its severity and its offset in the policy text.

use super::document::{self, Effect, Located, Policy, Statement, VERSION_CURRENT, VERSION_OLD};
use super::json;
use super::pattern::has_wildcard;

/// STS: the plaintext of the inline and managed session policies together may not exceed this
/// many characters (after whitespace is removed). The separate packed (compressed) limit,
/// reported as `PackedPolicySize`, is only known to STS; plaintext size is the local proxy.
pub const PLAINTEXT_LIMIT: usize = 2048;
/// A policy at or above this share of [`PLAINTEXT_LIMIT`] draws a warning: one more statement
/// (or the session tags, which share the packed limit) may tip it over.
pub const SIZE_WARNING_PERCENT: usize = 90;

/// S3 actions whose resource is a bucket (`arn:aws:s3:::bucket`), never an object. From the AWS
/// Service Authorization Reference, "Actions defined by Amazon S3" (resource type `bucket`):
/// granting them on an object ARN grants nothing.
pub const S3_BUCKET_ACTIONS: &[&str] = &[
    "s3:CreateBucket",
    "s3:DeleteBucket",
    "s3:ListBucket",
    "s3:ListBucketVersions",
    "s3:ListBucketMultipartUploads",
    "s3:GetBucketLocation",
    "s3:GetBucketPolicy",
    "s3:PutBucketPolicy",
    "s3:DeleteBucketPolicy",
    "s3:GetBucketAcl",
    "s3:PutBucketAcl",
    "s3:GetBucketVersioning",
    "s3:PutBucketVersioning",
    "s3:GetBucketTagging",
    "s3:PutBucketTagging",
    "s3:GetBucketCORS",
    "s3:PutBucketCORS",
    "s3:GetBucketWebsite",
    "s3:PutBucketWebsite",
    "s3:DeleteBucketWebsite",
    "s3:GetBucketLogging",
    "s3:PutBucketLogging",
    "s3:GetBucketNotification",
    "s3:PutBucketNotification",
    "s3:GetBucketPublicAccessBlock",
    "s3:PutBucketPublicAccessBlock",
    "s3:GetBucketOwnershipControls",
    "s3:PutBucketOwnershipControls",
    "s3:GetBucketObjectLockConfiguration",
    "s3:PutBucketObjectLockConfiguration",
    "s3:GetBucketRequestPayment",
    "s3:PutBucketRequestPayment",
    "s3:GetLifecycleConfiguration",
    "s3:PutLifecycleConfiguration",
    "s3:GetEncryptionConfiguration",
    "s3:PutEncryptionConfiguration",
    "s3:GetReplicationConfiguration",
    "s3:PutReplicationConfiguration",
    "s3:GetAccelerateConfiguration",
    "s3:PutAccelerateConfiguration",
];

/// S3 actions whose resource is an object (`arn:aws:s3:::bucket/key`), never a bucket. Same
/// source (resource type `object`): granting them on a bucket ARN grants nothing.
pub const S3_OBJECT_ACTIONS: &[&str] = &[
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:GetObjectAttributes",
    "s3:GetObjectVersionAttributes",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:GetObjectAcl",
    "s3:PutObjectAcl",
    "s3:GetObjectVersionAcl",
    "s3:PutObjectVersionAcl",
    "s3:GetObjectTagging",
    "s3:PutObjectTagging",
    "s3:DeleteObjectTagging",
    "s3:GetObjectVersionTagging",
    "s3:PutObjectVersionTagging",
    "s3:DeleteObjectVersionTagging",
    "s3:GetObjectRetention",
    "s3:PutObjectRetention",
    "s3:GetObjectLegalHold",
    "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention",
    "s3:GetObjectTorrent",
    "s3:RestoreObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ReplicateObject",
    "s3:ReplicateDelete",
    "s3:ReplicateTags",
    "s3:ObjectOwnerOverrideToBucketOwner",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Byte offset in the policy text of the value the finding is about.
    pub offset: usize,
    pub message: String,
}

/// Every finding for the policy `text`, in document order.
pub fn lint(text: &str) -> Vec<Finding> {
    let mut out = Findings(Vec::new());
    let policy = match document::parse(text) {
        Ok(policy) => policy,
        Err(e) => {
            out.error(e.offset, e.message);
            return out.0;
        }
    };
    check_size(text, &mut out);
    check_version(&policy, &mut out);
    if policy.statements.is_empty() {
        out.warning(
            policy.statement_offset,
            "no statements: sessions with this policy can do nothing",
        );
    }
    for (i, s) in policy.statements.iter().enumerate() {
        check_statement(i, s, &mut out);
    }
    out.0.sort_by_key(|f| f.offset);
    out.0
}

struct Findings(Vec<Finding>);

impl Findings {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.push(Severity::Error, offset, message);
    }

    fn warning(&mut self, offset: usize, message: impl Into<String>) {
        self.push(Severity::Warning, offset, message);
    }

    fn push(&mut self, severity: Severity, offset: usize, message: impl Into<String>) {
        self.0.push(Finding {
            severity,
            offset,
            message: message.into(),
        });
    }
}

/// Characters STS accepts in `Policy` (tab, line breaks, and U+0020 to U+00FF).
pub fn is_policy_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{ff}')
}

fn check_size(text: &str, out: &mut Findings) {
    if let Some((offset, c)) = text.char_indices().find(|&(_, c)| !is_policy_char(c)) {
        out.error(
            offset,
            format!("character {c:?} (U+{:04X}) is not allowed in a session policy (STS accepts tab, line breaks and U+0020 to U+00FF)", c as u32),
        );
    }
    let size = json::minify(text).chars().count();
    if size > PLAINTEXT_LIMIT {
        out.error(
            0,
            format!("{size} characters without whitespace: over the STS limit of {PLAINTEXT_LIMIT} for session policies"),
        );
    } else if size * 100 >= PLAINTEXT_LIMIT * SIZE_WARNING_PERCENT {
        out.warning(
            0,
            format!("{size} characters without whitespace: {}% of the STS limit of {PLAINTEXT_LIMIT}; the packed size (with session tags) may already exceed it", size * 100 / PLAINTEXT_LIMIT),
        );
    }
}

fn check_version(policy: &Policy, out: &mut Findings) {
    match &policy.version {
        None => out.warning(
            0,
            format!("missing \"Version\": IAM then uses {VERSION_OLD}, where policy variables are plain text; add \"Version\": \"{VERSION_CURRENT}\""),
        ),
        Some(v) if v.value == VERSION_CURRENT => {}
        Some(v) if v.value == VERSION_OLD => out.warning(
            v.offset,
            format!("\"Version\" {VERSION_OLD} treats policy variables as plain text; use {VERSION_CURRENT}"),
        ),
        Some(v) => out.error(
            v.offset,
            format!("\"Version\" must be {VERSION_CURRENT:?} (or {VERSION_OLD:?}), not {:?}", v.value),
        ),
    }
}

fn check_statement(index: usize, s: &Statement, out: &mut Findings) {
    let name = format!("statement {}", s.label(index));
    if let Some(offset) = s.principal {
        out.error(
            offset,
            format!("{name}: a session policy is an identity policy and may not name a Principal"),
        );
    }
    for a in &s.action.patterns {
        if a.value != "*" && !a.value.contains(':') {
            out.error(
                a.offset,
                format!("{name}: action {:?} is not service:Action", a.value),
            );
        }
    }
    for r in &s.resource.patterns {
        if r.value != "*" && !r.value.starts_with("arn:") {
            out.error(
                r.offset,
                format!("{name}: resource {:?} is not an ARN (or \"*\")", r.value),
            );
        }
    }
    if s.effect == Effect::Deny {
        // Broad denies only take away; the least-privilege checks are about what is granted.
        return;
    }
    if s.action.negated {
        out.error(
            s.action.offset,
            format!("{name}: Allow with NotAction grants every action not listed, including ones AWS adds later; list the actions instead"),
        );
    }
    if s.resource.negated {
        out.error(
            s.resource.offset,
            format!("{name}: Allow with NotResource grants every resource not listed; list the resources instead"),
        );
    }
    if !s.action.negated {
        for a in &s.action.patterns {
            check_action(&name, a, out);
        }
    }
    if !s.resource.negated {
        for r in &s.resource.patterns {
            check_resource(&name, r, out);
        }
        check_s3_levels(&name, s, out);
    }
}

fn check_action(name: &str, a: &Located, out: &mut Findings) {
    let Some((service, action)) = a.value.split_once(':') else {
        if a.value == "*" {
            out.error(
                a.offset,
                format!("{name}: Action \"*\" allows every action of every service"),
            );
        }
        return;
    };
    if has_wildcard(service) {
        out.error(
            a.offset,
            format!(
                "{name}: action {:?} has a wildcard in the service name",
                a.value
            ),
        );
    } else if action.chars().all(|c| c == '*') {
        out.warning(
            a.offset,
            format!(
                "{name}: action {:?} allows every {service} action; list the ones the app uses",
                a.value
            ),
        );
    }
}

fn check_resource(name: &str, r: &Located, out: &mut Findings) {
    if r.value == "*" {
        out.warning(
            r.offset,
            format!("{name}: Resource \"*\" covers every resource in the account; name the ARNs"),
        );
        return;
    }
    let parts: Vec<&str> = r.value.splitn(6, ':').collect();
    let [_, _, service, region, account, resource] = parts[..] else {
        return;
    };
    if service == "s3" && region.is_empty() && account.is_empty() {
        let bucket = resource.split('/').next().unwrap_or_default();
        if bucket.chars().all(|c| c == '*') {
            out.warning(
                r.offset,
                format!(
                    "{name}: resource {:?} covers every bucket in the account",
                    r.value
                ),
            );
        } else if has_wildcard(bucket) {
            out.warning(
                r.offset,
                format!(
                    "{name}: resource {:?} has a wildcard in the bucket name; name the bucket",
                    r.value
                ),
            );
        }
        return;
    }
    if account == "*" {
        out.warning(
            r.offset,
            format!("{name}: resource {:?} is in any account", r.value),
        );
    } else if whole_account(resource) {
        out.warning(
            r.offset,
            format!(
                "{name}: resource {:?} covers every {service} resource of its kind in the account",
                r.value
            ),
        );
    }
}

/// `*`, `table/*`, `secret:*`: every resource (of a type) rather than named ones.
fn whole_account(resource: &str) -> bool {
    match resource.split_once(['/', ':']) {
        None => resource.chars().all(|c| c == '*'),
        Some((kind, rest)) => !has_wildcard(kind) && rest.chars().all(|c| c == '*'),
    }
}

/// Bucket-level actions on object ARNs, or object-level actions on bucket ARNs: the pairs that
/// never match each other, which belong in separate statements. Only actions named without a
/// wildcard are classified.
fn check_s3_levels(name: &str, s: &Statement, out: &mut Findings) {
    let named = |list: &[&str]| -> Vec<String> {
        s.action
            .patterns
            .iter()
            .filter(|a| list.iter().any(|l| l.eq_ignore_ascii_case(&a.value)))
            .map(|a| a.value.clone())
            .collect()
    };
    let (bucket_actions, object_actions) = (named(S3_BUCKET_ACTIONS), named(S3_OBJECT_ACTIONS));
    let s3 = |r: &&Located| r.value.starts_with("arn:") && r.value.contains(":s3:::");
    let objects: Vec<&Located> = s
        .resource
        .patterns
        .iter()
        .filter(s3)
        .filter(|r| r.value.contains('/'))
        .collect();
    let buckets: Vec<&Located> = s
        .resource
        .patterns
        .iter()
        .filter(s3)
        // A wildcard without `/` may match objects too (`*` crosses `/`): not only a bucket.
        .filter(|r| !r.value.contains(['/', '*']))
        .collect();
    if !bucket_actions.is_empty() && !objects.is_empty() {
        out.warning(
            objects[0].offset,
            format!(
                "{name}: bucket-level {} never applies to object ARN {:?}; put bucket actions (on arn:aws:s3:::BUCKET) and object actions in separate statements",
                bucket_actions.join(", "),
                objects[0].value
            ),
        );
    }
    if !object_actions.is_empty() && !buckets.is_empty() {
        out.warning(
            buckets[0].offset,
            format!(
                "{name}: object-level {} never applies to bucket ARN {:?}; put object actions (on arn:aws:s3:::BUCKET/PREFIX*) and bucket actions in separate statements",
                object_actions.join(", "),
                buckets[0].value
            ),
        );
    }
}

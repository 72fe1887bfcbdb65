//! The typed IAM policy document: the flexible shapes IAM accepts (a string or a list, one
//! statement or a list of them, `Action` or `NotAction`, ...) read into one form, every value
//! with its byte offset in the policy text so findings can name its line.

use super::json::{self, Member, Node, Value};

/// The policy language version every current feature (policy variables) needs.
pub const VERSION_CURRENT: &str = "2012-10-17";
/// The only other version IAM accepts.
pub const VERSION_OLD: &str = "2008-10-17";

/// A parsed policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: Option<Located>,
    pub statements: Vec<Statement>,
    /// Where `Statement` is (the key), for findings about the whole list.
    pub statement_offset: usize,
}

/// A string and where it starts in the policy text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub value: String,
    pub offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Effect::Allow => "Allow",
            Effect::Deny => "Deny",
        })
    }
}

/// `Action`/`Resource`, or their negation `NotAction`/`NotResource`: the patterns listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// `NotAction` / `NotResource`: the statement applies to everything the patterns do not match.
    pub negated: bool,
    pub patterns: Vec<Located>,
    /// Where the key is.
    pub offset: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sid: Option<String>,
    pub effect: Effect,
    pub action: Targets,
    pub resource: Targets,
    /// Where the `Condition` key is, when there is one (conditions are not evaluated here).
    pub condition: Option<usize>,
    /// Where a `Principal`/`NotPrincipal` key is: not allowed in a session policy.
    pub principal: Option<usize>,
    /// Where the statement's `{` is.
    pub offset: usize,
}

impl Statement {
    /// `N` or `N (Sid)`, as findings and `explain` name a statement (0-based, like `app[N]`).
    pub fn label(&self, index: usize) -> String {
        match &self.sid {
            Some(sid) if !sid.is_empty() => format!("{index} ({sid})"),
            _ => index.to_string(),
        }
    }
}

/// Why a text is not a policy IAM would accept, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DocumentError {
    pub offset: usize,
    pub message: String,
}

impl From<json::JsonError> for DocumentError {
    fn from(e: json::JsonError) -> Self {
        Self {
            offset: e.offset,
            message: e.to_string(),
        }
    }
}

fn shape(offset: usize, message: impl Into<String>) -> DocumentError {
    DocumentError {
        offset,
        message: message.into(),
    }
}

const TOP_LEVEL_KEYS: &[&str] = &["Version", "Id", "Statement"];
const STATEMENT_KEYS: &[&str] = &[
    "Sid",
    "Effect",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
    "Principal",
    "NotPrincipal",
];

/// Parses a policy document: JSON, then IAM's grammar (`Effect` Allow or Deny, exactly one of
/// `Action`/`NotAction` and of `Resource`/`NotResource`, strings or lists of strings).
pub fn parse(text: &str) -> Result<Policy, DocumentError> {
    let root = json::parse(text)?;
    let members = object(&root, "the policy")?;
    check_keys(members, TOP_LEVEL_KEYS, "policy")?;
    let version = match find(members, "Version") {
        Some(m) => Some(string(&m.value, "Version")?),
        None => None,
    };
    let statement =
        find(members, "Statement").ok_or_else(|| shape(root.offset, "missing \"Statement\""))?;
    let nodes: Vec<&Node> = match &statement.value.value {
        Value::Array(items) => items.iter().collect(),
        Value::Object(_) => vec![&statement.value],
        other => {
            return Err(shape(
                statement.value.offset,
                format!(
                    "\"Statement\" must be an object or a list of objects, not {}",
                    other.kind()
                ),
            ));
        }
    };
    let statements = nodes
        .into_iter()
        .map(parse_statement)
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        version,
        statements,
        statement_offset: statement.key_offset,
    })
}

fn parse_statement(node: &Node) -> Result<Statement, DocumentError> {
    let members = object(node, "each statement")?;
    check_keys(members, STATEMENT_KEYS, "statement")?;
    let sid = find(members, "Sid")
        .map(|m| string(&m.value, "Sid").map(|s| s.value))
        .transpose()?;
    let effect = find(members, "Effect").ok_or_else(|| shape(node.offset, "missing \"Effect\""))?;
    let effect = match string(&effect.value, "Effect")?.value.as_str() {
        "Allow" => Effect::Allow,
        "Deny" => Effect::Deny,
        other => {
            return Err(shape(
                effect.value.offset,
                format!("\"Effect\" must be \"Allow\" or \"Deny\", not {other:?}"),
            ));
        }
    };
    let action = targets(node, members, "Action", "NotAction")?;
    let resource = targets(node, members, "Resource", "NotResource")?;
    let condition = match find(members, "Condition") {
        Some(m) if !matches!(m.value.value, Value::Object(_)) => {
            return Err(shape(m.value.offset, "\"Condition\" must be an object"));
        }
        Some(m) => Some(m.key_offset),
        None => None,
    };
    let principal = find(members, "Principal")
        .or_else(|| find(members, "NotPrincipal"))
        .map(|m| m.key_offset);
    Ok(Statement {
        sid,
        effect,
        action,
        resource,
        condition,
        principal,
        offset: node.offset,
    })
}

/// Exactly one of `key` and `not_key`, a non-empty string or list of strings.
fn targets(
    node: &Node,
    members: &[Member],
    key: &str,
    not_key: &str,
) -> Result<Targets, DocumentError> {
    let (member, negated) = match (find(members, key), find(members, not_key)) {
        (Some(_), Some(m)) => {
            return Err(shape(
                m.key_offset,
                format!("give either \"{key}\" or \"{not_key}\", not both"),
            ));
        }
        (Some(m), None) => (m, false),
        (None, Some(m)) => (m, true),
        (None, None) => {
            return Err(shape(
                node.offset,
                format!("missing \"{key}\" (or \"{not_key}\")"),
            ));
        }
    };
    let name = if negated { not_key } else { key };
    let patterns = match &member.value.value {
        Value::Array(items) => items
            .iter()
            .map(|item| string(item, name))
            .collect::<Result<Vec<_>, _>>()?,
        _ => vec![string(&member.value, name)?],
    };
    if patterns.is_empty() {
        return Err(shape(
            member.value.offset,
            format!("\"{name}\" must not be empty"),
        ));
    }
    Ok(Targets {
        negated,
        patterns,
        offset: member.key_offset,
    })
}

fn object<'a>(node: &'a Node, what: &str) -> Result<&'a [Member], DocumentError> {
    match &node.value {
        Value::Object(members) => Ok(members),
        other => Err(shape(
            node.offset,
            format!("{what} must be a JSON object, not {}", other.kind()),
        )),
    }
}

fn string(node: &Node, key: &str) -> Result<Located, DocumentError> {
    match &node.value {
        Value::String(s) => Ok(Located {
            value: s.clone(),
            offset: node.offset,
        }),
        other => Err(shape(
            node.offset,
            format!("\"{key}\" must be a string, not {}", other.kind()),
        )),
    }
}

fn find<'a>(members: &'a [Member], key: &str) -> Option<&'a Member> {
    members.iter().find(|m| m.key == key)
}

/// IAM refuses unknown elements and (being case-sensitive about them) misspelt ones.
fn check_keys(members: &[Member], known: &[&str], what: &str) -> Result<(), DocumentError> {
    for (i, m) in members.iter().enumerate() {
        if !known.contains(&m.key.as_str()) {
            return Err(shape(
                m.key_offset,
                format!(
                    "unknown {what} element {:?} (expected one of {})",
                    m.key,
                    known.join(", ")
                ),
            ));
        }
        if members[..i].iter().any(|earlier| earlier.key == m.key) {
            return Err(shape(m.key_offset, format!("duplicate {:?}", m.key)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flexible_shapes_read_into_one_form() {
        let one = parse(
            r#"{"Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}}"#,
        )
        .unwrap();
        assert_eq!(one.version, None);
        assert_eq!(one.statements.len(), 1);
        assert_eq!(one.statements[0].action.patterns[0].value, "s3:GetObject");
        let many = parse(
            r#"{"Version": "2012-10-17", "Statement": [
                {"Sid": "a", "Effect": "Deny", "NotAction": ["s3:*", "kms:Decrypt"],
                 "NotResource": ["arn:aws:s3:::b"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}"#,
        )
        .unwrap();
        let s = &many.statements[0];
        assert_eq!(s.effect, Effect::Deny);
        assert!(s.action.negated && s.resource.negated);
        assert_eq!(s.action.patterns.len(), 2);
        assert!(s.condition.is_some());
        assert_eq!(s.label(0), "0 (a)");
    }

    #[test]
    fn grammar_errors_name_the_element() {
        for (text, words) in [
            (r#"[]"#, "must be a JSON object"),
            (r#"{"Version": "2012-10-17"}"#, "missing \"Statement\""),
            (r#"{"Statement": "x"}"#, "object or a list"),
            (
                r#"{"Statement": [{"Action": "s3:GetObject", "Resource": "*"}]}"#,
                "missing \"Effect\"",
            ),
            (
                r#"{"Statement": [{"Effect": "allow", "Action": "a:b", "Resource": "*"}]}"#,
                "\"Allow\" or \"Deny\"",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Resource": "*"}]}"#,
                "missing \"Action\"",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Action": "a:b"}]}"#,
                "missing \"Resource\"",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Action": "a:b", "NotAction": "a:c", "Resource": "*"}]}"#,
                "not both",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Action": [], "Resource": "*"}]}"#,
                "must not be empty",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Action": [1], "Resource": "*"}]}"#,
                "\"Action\" must be a string, not a number",
            ),
            (
                r#"{"Statement": [{"Effect": "Allow", "Actions": "a:b", "Resource": "*"}]}"#,
                "unknown statement element \"Actions\"",
            ),
            (
                r#"{"Statement": [], "Statement": []}"#,
                "duplicate \"Statement\"",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.message.contains(words), "{text}: {err}");
        }
    }
}

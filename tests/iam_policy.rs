//! Session policies: the evaluator agrees with IAM's semantics on a table of requests (explicit
//! Deny wins, default deny, `*` and `?` across `:` and `/`, prefixes, case rules, negation,
//! conditions reported as undecided); the linter flags each least-privilege problem at its line
//! and passes the seeds in `deploy/policies/`; `lint` and `explain --app` report through the
//! real binary with the documented exit statuses.

#[path = "common/binary.rs"]
#[allow(dead_code)] // only `broker()` is used here
mod binary;

use std::path::{Path, PathBuf};

use imds_broker::iam::document;
use imds_broker::iam::evaluate::{Applies, Decision, evaluate};
use imds_broker::iam::lint::{self, Severity};
use imds_broker::iam::source::Origin;

const PREFIX: &str = r#"{"Version": "2012-10-17", "Statement": [
  {"Sid": "ReadWrite", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
   "Resource": "arn:aws:s3:::shared/client-a/uploads/*"},
  {"Sid": "List", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::shared"},
  {"Sid": "NoSecrets", "Effect": "Deny", "Action": "s3:*",
   "Resource": "arn:aws:s3:::shared/client-a/uploads/secret/*"}]}"#;

const WILD: &str = r#"{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::logs-2024-??/app/*"},
  {"Effect": "Allow", "Action": "s3:*Object", "Resource": "arn:aws:s3:::data/*/public/*"},
  {"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"},
  {"Effect": "Allow", "Action": "s3:List?ucket", "Resource": "arn:aws:s3:::data"}]}"#;

const NEGATION: &str = r#"{"Version": "2012-10-17", "Statement": [
  {"Effect": "Deny", "NotAction": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"},
  {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::bucket", "arn:aws:s3:::bucket/*"]},
  {"Effect": "Deny", "Action": "s3:GetObject", "NotResource": "arn:aws:s3:::bucket/public/*"}]}"#;

const ALLOW_NOT_RESOURCE: &str = r#"{"Version": "2012-10-17", "Statement":
  {"Effect": "Allow", "Action": "s3:GetObject", "NotResource": "arn:aws:s3:::secret/*"}}"#;

const CONDITIONS: &str = r#"{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
   "Condition": {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}},
  {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"},
  {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/tmp/*",
   "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
  {"Effect": "Allow", "Action": "sqs:SendMessage",
   "Resource": "arn:aws:sqs:us-east-1:111122223333:${aws:username}-q"}]}"#;

const SINGLE: &str = r#"{"Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/k"}}"#;
const EMPTY: &str = r#"{"Version": "2012-10-17", "Statement": []}"#;
const STAR: &str = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}"#;

use Decision::{Allowed, Denied, ImplicitDeny as Implicit, Undecided};

/// (policy, action, resource, IAM's decision). Statement numbers are 0-based.
#[rustfmt::skip]
const CASES: &[(&str, &str, &str, Decision)] = &[
    // A prefix grant, a bucket-level grant and a Deny inside the prefix.
    (PREFIX, "s3:GetObject", "arn:aws:s3:::shared/client-a/uploads/a.txt", Allowed(0)),
    (PREFIX, "s3:PutObject", "arn:aws:s3:::shared/client-a/uploads/deep/er/x", Allowed(0)),
    (PREFIX, "s3:PutObject", "arn:aws:s3:::shared/client-a/other.txt", Implicit),
    (PREFIX, "s3:PutObject", "arn:aws:s3:::shared/client-b/uploads/x", Implicit),
    (PREFIX, "s3:DeleteObject", "arn:aws:s3:::shared/client-a/uploads/x", Implicit),
    (PREFIX, "s3:GetObject", "arn:aws:s3:::shared/client-a/uploads/secret/k", Denied(2)),
    (PREFIX, "s3:PutObject", "arn:aws:s3:::shared/client-a/uploads/secret/k", Denied(2)),
    (PREFIX, "s3:DeleteObject", "arn:aws:s3:::shared/client-a/uploads/secret/k", Denied(2)),
    (PREFIX, "s3:GetObject", "arn:aws:s3:::shared/client-a/uploads/secretive", Allowed(0)),
    (PREFIX, "s3:ListBucket", "arn:aws:s3:::shared", Allowed(1)),
    (PREFIX, "s3:ListBucket", "arn:aws:s3:::shared/client-a/uploads/", Implicit),
    (PREFIX, "s3:getobject", "arn:aws:s3:::shared/client-a/uploads/a", Allowed(0)),
    (PREFIX, "S3:GETOBJECT", "arn:aws:s3:::shared/client-a/uploads/a", Allowed(0)),
    (PREFIX, "s3:GetObject", "arn:aws:s3:::Shared/client-a/uploads/a", Implicit),
    (PREFIX, "s3:GetObject", "arn:aws:s3:::shared/client-a/uploads/", Allowed(0)),
    (PREFIX, "s3:GetObject", "arn:aws:s3:::shared/client-a/uploads", Implicit),
    (PREFIX, "s3:GetObjectVersion", "arn:aws:s3:::shared/client-a/uploads/a", Implicit),
    // `*` and `?` in actions and resources, across `/`.
    (WILD, "s3:GetObject", "arn:aws:s3:::logs-2024-01/app/x", Allowed(0)),
    (WILD, "s3:GetObjectTagging", "arn:aws:s3:::logs-2024-12/app/x", Allowed(0)),
    (WILD, "s3:GetObject", "arn:aws:s3:::logs-2024-1/app/x", Implicit),
    (WILD, "s3:GetObject", "arn:aws:s3:::logs-2024-123/app/x", Implicit),
    (WILD, "s3:GetObject", "arn:aws:s3:::logs-2024-x//app/k", Allowed(0)),
    (WILD, "s3:PutObject", "arn:aws:s3:::logs-2024-01/app/x", Implicit),
    (WILD, "s3:PutObject", "arn:aws:s3:::data/team-1/public/a", Allowed(1)),
    (WILD, "s3:DeleteObject", "arn:aws:s3:::data/a/b/c/public/x", Allowed(1)),
    (WILD, "s3:GetObjectAcl", "arn:aws:s3:::data/t/public/x", Implicit),
    (WILD, "s3:PutObject", "arn:aws:s3:::data/public/x", Implicit),
    (WILD, "ec2:DescribeInstances", "arn:aws:ec2:us-east-1:111122223333:instance/i-1", Allowed(2)),
    (WILD, "ec2:describeinstances", "arn:aws:ec2:us-east-1:111122223333:instance/i-1", Allowed(2)),
    (WILD, "ec2:RunInstances", "arn:aws:ec2:us-east-1:111122223333:instance/i-1", Implicit),
    (WILD, "s3:ListBucket", "arn:aws:s3:::data", Allowed(3)),
    (WILD, "s3:ListBuckets", "arn:aws:s3:::data", Implicit),
    (WILD, "s3:ListXucket", "arn:aws:s3:::data", Allowed(3)),
    // NotAction / NotResource.
    (NEGATION, "s3:GetObject", "arn:aws:s3:::bucket/public/x", Allowed(1)),
    (NEGATION, "s3:GetObject", "arn:aws:s3:::bucket/private/x", Denied(2)),
    (NEGATION, "s3:PutObject", "arn:aws:s3:::bucket/public/x", Denied(0)),
    (NEGATION, "s3:ListBucket", "arn:aws:s3:::bucket", Allowed(1)),
    (NEGATION, "iam:CreateUser", "arn:aws:iam::111122223333:user/x", Denied(0)),
    (NEGATION, "s3:getobject", "arn:aws:s3:::bucket/public/x", Allowed(1)),
    (ALLOW_NOT_RESOURCE, "s3:GetObject", "arn:aws:s3:::open/x", Allowed(0)),
    (ALLOW_NOT_RESOURCE, "s3:GetObject", "arn:aws:s3:::secret/x", Implicit),
    // Conditions and policy variables are IAM's to decide.
    (CONDITIONS, "kms:Decrypt", "arn:aws:kms:us-east-1:111122223333:key/k", Undecided(0)),
    (CONDITIONS, "s3:GetObject", "arn:aws:s3:::b/x", Allowed(1)),
    (CONDITIONS, "s3:GetObject", "arn:aws:s3:::b/tmp/x", Undecided(2)),
    (CONDITIONS, "s3:PutObject", "arn:aws:s3:::b/tmp/x", Implicit),
    (CONDITIONS, "sqs:SendMessage", "arn:aws:sqs:us-east-1:111122223333:alice-q", Undecided(3)),
    (CONDITIONS, "sqs:DeleteMessage", "arn:aws:sqs:us-east-1:111122223333:alice-q", Implicit),
    (CONDITIONS, "kms:Encrypt", "arn:aws:kms:us-east-1:111122223333:key/k", Implicit),
    // Shapes: one statement as an object, no statements, everything.
    (SINGLE, "s3:GetObject", "arn:aws:s3:::b/k", Allowed(0)),
    (SINGLE, "s3:GetObject", "arn:aws:s3:::b/k2", Implicit),
    (EMPTY, "s3:GetObject", "arn:aws:s3:::b/k", Implicit),
    (STAR, "iam:PassRole", "arn:aws:iam::111122223333:role/x", Allowed(0)),
];

#[test]
fn evaluator_agrees_with_iam_on_the_table() {
    assert!(CASES.len() >= 40);
    let mut wrong = Vec::new();
    for (policy, action, resource, want) in CASES {
        let parsed = document::parse(policy).unwrap();
        let got = evaluate(&parsed, action, resource).decision;
        if got != *want {
            wrong.push(format!(
                "{action} on {resource}: wanted {want:?}, got {got:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        CASES.len(),
        wrong.join("\n")
    );
}

#[test]
fn each_statement_gets_a_verdict_with_its_reason() {
    let policy = document::parse(CONDITIONS).unwrap();
    let e = evaluate(&policy, "s3:GetObject", "arn:aws:s3:::b/tmp/x");
    assert_eq!(
        e.statements,
        [
            Applies::No("the action is not in Action"),
            Applies::Yes,
            Applies::Unknown("it has a Condition, which this evaluator does not decide"),
            Applies::No("the action is not in Action"),
        ]
    );
    assert!(
        !e.is_allowed(),
        "a Deny that may apply is never reported as allowed"
    );
}

fn policy_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policies")
        .join(name)
}

fn seed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/policies")
        .join(name)
}

/// `(line, severity, message)` of each finding for a policy file.
fn findings(path: &Path) -> Vec<(usize, Severity, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let origin = Origin::file(path);
    lint::lint(&text)
        .into_iter()
        .map(|f| (origin.locate(&text, f.offset).0, f.severity, f.message))
        .collect()
}

#[test]
fn lint_flags_each_case_at_its_line() {
    use Severity::{Error, Warning};
    // (fixture, line, severity, words the message must contain)
    let cases: &[(&str, usize, Severity, &str)] = &[
        (
            "action_star.json",
            6,
            Error,
            "Action \"*\" allows every action",
        ),
        (
            "service_wildcard.json",
            7,
            Warning,
            "\"s3:*\" allows every s3 action",
        ),
        (
            "resource_wildcards.json",
            9,
            Warning,
            "wildcard in the bucket name",
        ),
        (
            "resource_wildcards.json",
            10,
            Warning,
            "covers every bucket",
        ),
        (
            "resource_wildcards.json",
            19,
            Warning,
            "every dynamodb resource of its kind",
        ),
        (
            "resource_wildcards.json",
            20,
            Warning,
            "Resource \"*\" covers every resource",
        ),
        (
            "mixed_levels.json",
            9,
            Warning,
            "object-level s3:GetObject never applies to bucket ARN",
        ),
        (
            "mixed_levels.json",
            10,
            Warning,
            "bucket-level s3:ListBucket never applies to object ARN",
        ),
        ("not_action_allow.json", 6, Error, "Allow with NotAction"),
        ("not_action_allow.json", 12, Error, "Allow with NotResource"),
        ("no_version.json", 1, Warning, "missing \"Version\""),
        (
            "near_limit.json",
            1,
            Warning,
            "97% of the STS limit of 2048",
        ),
        ("over_limit.json", 1, Error, "over the STS limit of 2048"),
        ("invalid_json.json", 7, Error, "invalid JSON"),
    ];
    for (name, line, severity, words) in cases {
        let found = findings(&policy_fixture(name));
        assert!(
            found
                .iter()
                .any(|(l, s, m)| l == line && s == severity && m.contains(words)),
            "{name}: wanted {severity} at line {line} with {words:?}; got {found:#?}"
        );
    }
    // A Deny with NotAction/NotResource is how guard rails are written: not a finding.
    let found = findings(&policy_fixture("not_action_allow.json"));
    assert_eq!(found.len(), 2, "{found:#?}");
    // Only the findings above: nothing else fires on these fixtures.
    assert_eq!(findings(&policy_fixture("service_wildcard.json")).len(), 1);
    assert_eq!(
        findings(&policy_fixture("resource_wildcards.json")).len(),
        4
    );
}

#[test]
fn seeds_lint_clean_and_narrow_what_they_name() {
    let seeds = [
        "s3-prefix-readwrite.json",
        "s3-prefix-readonly.json",
        "dynamodb-read-one-table.json",
    ];
    for name in seeds {
        assert_eq!(findings(&seed(name)), [], "{name}");
    }
    let text = std::fs::read_to_string(seed("s3-prefix-readwrite.json")).unwrap();
    let policy = document::parse(&text).unwrap();
    let object = |key: &str| format!("arn:aws:s3:::example-bucket/{key}");
    assert_eq!(
        evaluate(&policy, "s3:PutObject", &object("client-a/uploads/x")).decision,
        Allowed(1)
    );
    assert_eq!(
        evaluate(&policy, "s3:PutObject", &object("client-a/x")).decision,
        Implicit
    );
    assert_eq!(
        evaluate(&policy, "s3:PutObject", &object("client-b/uploads/x")).decision,
        Implicit
    );
    assert_eq!(
        evaluate(&policy, "s3:ListBucket", "arn:aws:s3:::example-bucket").decision,
        Undecided(0),
        "listing depends on the s3:prefix condition"
    );
}

fn broker(args: &[&str]) -> (Option<i32>, String) {
    let out = binary::broker().args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn lint_command_maps_lines_into_the_config_and_exits_by_severity() {
    let config = policy_fixture("lint_config.toml");
    let (code, out) = broker(&["lint", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}");
    let c = config.display();
    for line in [
        // Inside a multi-line TOML string: the JSON's own line, counted in the config file.
        format!("{c}:15:17: warning: app[0].policy: statement 0: action \"s3:*\""),
        // A one-line TOML string: the column within the line.
        format!("{c}:26:80: error: app[1].policy: statement 0: Action \"*\""),
        format!("{c}:26:97: warning: app[1].policy: statement 0: Resource \"*\""),
        // A policy file: its own path and line.
        format!(
            "{}:7:7: error: app[2].policy_file: invalid JSON",
            policy_fixture("invalid_json.json").display()
        ),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&line)),
            "{line:?} missing from:\n{out}"
        );
    }
    assert_eq!(
        out.lines().count(),
        4,
        "the seed (app[3]) has no finding:\n{out}"
    );

    let (code, out) = broker(&[
        "lint",
        "--policy",
        policy_fixture("service_wildcard.json").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "warnings only: {out}");
    let (code, out) = broker(&[
        "lint",
        "--policy",
        seed("s3-prefix-readwrite.json").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out, "1 session policies: no findings\n");
    let valid =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid_policies.toml");
    let (code, out) = broker(&["lint", "--config", valid.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _) = broker(&["lint", "--config", "/nonexistent/imds-broker.toml"]);
    assert_eq!(code, Some(64));
}

#[test]
fn explain_app_names_the_deciding_statement() {
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid_policies.toml");
    let config = config.to_str().unwrap();
    let explain = |app: &str, action: &str, resource: &str| {
        broker(&[
            "explain",
            "--config",
            config,
            "--app",
            app,
            "--action",
            action,
            "--resource",
            resource,
        ])
    };
    let (code, out) = explain(
        "uploader",
        "s3:PutObject",
        "arn:aws:s3:::example-bucket/client-a/uploads/x.csv",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "statement 0 (ListOwnPrefix) Allow, line 4: does not apply: the action is not in Action"
        ),
        "{out}"
    );
    assert!(
        out.contains("statement 1 (ReadWriteOwnPrefix) Allow, line 13: applies: allows"),
        "{out}"
    );
    assert!(
        out.ends_with("result: allowed by statement 1 (ReadWriteOwnPrefix)\n"),
        "{out}"
    );

    let (code, out) = explain(
        "uploader",
        "s3:PutObject",
        "arn:aws:s3:::example-bucket/client-b/x",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.ends_with("result: implicitly denied: no statement allows\n"),
        "{out}"
    );

    // An inline policy: statement lines are lines of the config file.
    let (code, out) = explain(
        "reporter",
        "s3:GetObject",
        "arn:aws:s3:::example-bucket/reports/drafts/q3",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("statement 0 (ReadReports) Allow, line 23: applies: allows"),
        "{out}"
    );
    assert!(
        out.contains("statement 1 (NotDrafts) Deny, line 29: applies: denies"),
        "{out}"
    );
    assert!(
        out.ends_with("result: denied by statement 1 (NotDrafts)\n"),
        "{out}"
    );

    let (code, out) = explain(
        "reporter",
        "s3:PutObject",
        "arn:aws:s3:::example-bucket/reports/q3",
    );
    assert_eq!(code, Some(3), "undecided: {out}");
    assert!(
        out.contains("statement 2 (TaggedOnly) Allow, line 35: cannot decide: it has a Condition"),
        "{out}"
    );
    assert!(
        out.contains("result: undecided: statement 2 (TaggedOnly)"),
        "{out}"
    );

    // Managed session policies can allow or deny too: only an explicit Deny is certain.
    let table = "arn:aws:dynamodb:us-east-1:123456789012:table/orders";
    let (code, out) = explain("tables", "dynamodb:GetItem", table);
    assert_eq!(code, Some(3), "undecided: {out}");
    assert!(out.contains("note: managed session policies"), "{out}");

    let (code, out) = explain("admin", "s3:PutObject", "arn:aws:s3:::any/thing");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.ends_with("result: no session policy: only the role's own policies decide\n"),
        "{out}"
    );

    let (code, _) = explain("nobody", "s3:GetObject", "arn:aws:s3:::b/k");
    assert_eq!(code, Some(64));
    let (code, _) = broker(&[
        "explain",
        "--config",
        config,
        "--app",
        "uploader",
        "--uid",
        "1",
        "--action",
        "s3:GetObject",
        "--resource",
        "x",
    ]);
    assert_eq!(code, Some(2), "clap refuses --app with --uid (usage error)");
}

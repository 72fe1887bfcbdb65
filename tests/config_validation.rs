//! Config rejections: every fixture under `tests/fixtures/config/` is refused with a message that
//! names the file, the line and the field; `check` and `serve` report them with the right exit
//! status; files others can write are refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imds_broker::config::{Config, ConfigError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn problems(name: &str) -> Vec<String> {
    let path = fixture(name);
    match Config::load(&path) {
        Ok(_) => panic!("{name} was accepted"),
        Err(ConfigError::Invalid { problems }) => problems.iter().map(|p| p.to_string()).collect(),
        Err(other) => panic!("{name}: unexpected error {other}"),
    }
}

#[test]
fn each_invalid_fixture_names_file_line_and_field() {
    // (fixture, line, field, words the message must contain)
    let cases: &[(&str, usize, &str, &str)] = &[
        ("unknown_key.toml", 9, "(file)", "unknown field `rol_arn`"),
        (
            "bad_arn.toml",
            9,
            "app[0].role_arn",
            "arn:aws:iam::123456789012:role/NAME",
        ),
        (
            "duration_too_short.toml",
            10,
            "app[0].duration",
            "between 900 and 43200",
        ),
        (
            "duration_too_long.toml",
            10,
            "app[0].duration",
            "between 900 and 43200",
        ),
        (
            "duration_not_servable.toml",
            10,
            "app[0].duration",
            "min_remaining",
        ),
        (
            "duplicate_name.toml",
            14,
            "app[1].name",
            "duplicate app name \"billing\"",
        ),
        (
            "empty_match.toml",
            10,
            "app[0].match",
            "at least one criterion",
        ),
        ("unknown_user.toml", 11, "app[0].match.user", "no such user"),
        ("bad_listen.toml", 2, "server.listen", "not an IP:port"),
        (
            "bad_token_ttl.toml",
            2,
            "server.token_max_ttl",
            "between 1 and 21600",
        ),
        (
            "bad_imdsv1.toml",
            2,
            "(file)",
            "unknown variant `sometimes`",
        ),
        ("missing_sts.toml", 1, "(file)", "missing field `sts`"),
        (
            "min_remaining_too_low.toml",
            8,
            "credentials.min_remaining",
            "at least 25m",
        ),
        (
            "prefetch_spread_too_long.toml",
            8,
            "credentials.prefetch_spread",
            "at most 30m",
        ),
        (
            "max_wait_too_long.toml",
            8,
            "credentials.max_wait",
            "shorter than an STS attempt (10s)",
        ),
        (
            "uid_and_user.toml",
            12,
            "app[0].match.user",
            "either uid or user",
        ),
        ("syntax.toml", 1, "(file)", ""),
        (
            "bad_match_keys.toml",
            11,
            "app[0].match.exe",
            "absolute path",
        ),
        (
            "bad_match_keys.toml",
            12,
            "app[0].match.exe_sha256",
            "64 hex digits",
        ),
        (
            "bad_match_keys.toml",
            13,
            "app[0].match.cgroup",
            "starting with /",
        ),
        (
            "bad_match_keys.toml",
            14,
            "app[0].match.source",
            "\"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "bad_match_keys.toml",
            15,
            "app[0].match.group",
            "no such group",
        ),
        // Session policies: inline JSON is positioned inside the TOML string.
        (
            "policy_invalid_json.toml",
            17,
            "app[0].policy",
            "invalid JSON: expected ',' or '}'",
        ),
        (
            "policy_bad_grammar.toml",
            10,
            "app[0].policy",
            "\"Effect\" must be \"Allow\" or \"Deny\", not \"Permit\"",
        ),
        (
            "policy_too_large_inline.toml",
            10,
            "app[0].policy",
            "over the STS limit of 2048",
        ),
        ("policy_and_file.toml", 11, "app[0].policy_file", "not both"),
        (
            "policy_file_missing.toml",
            10,
            "app[0].policy_file",
            "cannot read",
        ),
        (
            "policy_arns_bad.toml",
            10,
            "app[0].policy_arns",
            "at most 10",
        ),
        (
            "policy_arns_bad.toml",
            21,
            "app[0].policy_arns",
            "not a managed policy ARN",
        ),
        (
            "bad_audit_seal.toml",
            5,
            "audit.seal_epoch",
            "between 1m and 24h",
        ),
        (
            "bad_audit_seal.toml",
            6,
            "audit.seal_epoch_events",
            "between 1 and 10000000",
        ),
    ];
    for (name, line, field, words) in cases {
        let found = problems(name);
        let expected_prefix = format!("{}:{line}:", fixture(name).display());
        assert!(
            found.iter().any(|p| p.starts_with(&expected_prefix)
                && p.contains(&format!(": {field}: "))
                && p.contains(words)),
            "{name}: wanted line {line}, field {field}, {words:?}; got {found:#?}"
        );
    }
}

#[test]
fn session_policy_problems_name_the_exact_position() {
    // Columns too: inside a multi-line string, and inside a one-line string.
    let found = problems("policy_invalid_json.toml");
    let at = format!(
        "{}:17:7: app[0].policy: ",
        fixture("policy_invalid_json.toml").display()
    );
    assert!(found.iter().any(|p| p.starts_with(&at)), "{found:#?}");
    let found = problems("policy_bad_grammar.toml");
    let at = format!(
        "{}:10:61: app[0].policy: ",
        fixture("policy_bad_grammar.toml").display()
    );
    assert!(found.iter().any(|p| p.starts_with(&at)), "{found:#?}");
    // A problem inside a policy file names that file, its line and the config field.
    let policies = fixture("../policies");
    for (name, at, words) in [
        (
            "policy_file_invalid.toml",
            "invalid_json.json:7:7",
            "invalid JSON",
        ),
        (
            "policy_too_large.toml",
            "over_limit.json:1:1",
            "2057 characters",
        ),
    ] {
        let found = problems(name);
        let at = format!("{}/{at}: app[0].policy_file: ", policies.display());
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(&at) && p.contains(words)),
            "{name}: wanted {at:?}; got {found:#?}"
        );
    }
}

#[test]
fn policy_files_others_can_write_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[sts]\nregion = \"us-east-1\"\n[[app]]\nname = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/a\"\npolicy_file = \"p.json\"\n[app.match]\nuid = 1\n",
    )
    .unwrap();
    let policy = dir.path().join("p.json");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/s3-prefix-readonly.json"),
        &policy,
    )
    .unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o646)).unwrap();
    let err = Config::load(&config).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:6:15: app[0].policy_file: ", config.display()))
            && err.contains("world-writable"),
        "{err}"
    );
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let app = &Config::load(&config).unwrap().apps[0];
    assert!(app.policy.is_some());
}

#[test]
fn session_policies_reach_the_assume_role_input_minified() {
    let config = Config::load(&fixture("valid_policies.toml")).unwrap();
    let [uploader, reporter, admin, tables] = &config.apps[..] else {
        panic!("{:?}", config.apps)
    };
    // policy_file is relative to the config file's directory.
    let seed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/s3-prefix-readwrite.json"),
    )
    .unwrap();
    let input = uploader.assume_role_input();
    let sent = input.policy.as_deref().unwrap();
    assert!(
        sent.starts_with("{\"Version\":\"2012-10-17\",\"Statement\":[{\"Sid\":\"ListOwnPrefix\""),
        "{sent}"
    );
    assert!(!sent.contains(['\n', ' ']), "whitespace is removed: {sent}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(sent).unwrap(),
        serde_json::from_str::<serde_json::Value>(&seed).unwrap(),
        "the same document"
    );
    assert!(
        reporter
            .assume_role_input()
            .policy
            .as_deref()
            .unwrap()
            .contains("\"Sid\":\"NotDrafts\"")
    );
    assert_eq!(admin.assume_role_input().policy, None);
    assert_eq!(
        tables.assume_role_input().policy_arns,
        [
            "arn:aws:iam::123456789012:policy/boundaries/deny-deletes",
            "arn:aws:iam::aws:policy/AmazonDynamoDBReadOnlyAccess"
        ]
    );
    // Same role, different policies: different cache keys, so never the same credentials.
    let mut keys = std::collections::HashSet::new();
    for app in &config.apps {
        let mut input = app.assume_role_input().clone();
        // Only the policy fields differ in what matters here.
        input.session_name = "same".into();
        input.source_identity = None;
        input.tags.clear();
        keys.insert(input);
    }
    assert_eq!(keys.len(), 4);
}

#[test]
fn all_problems_are_reported_at_once() {
    let found = problems("bad_names.toml");
    assert!(
        found.iter().any(|p| p.contains("app[0].name")),
        "{found:#?}"
    );
    assert!(
        found.iter().any(|p| p.contains("app[0].session_name")),
        "{found:#?}"
    );
    let found = problems("bad_sts_and_instance.toml");
    assert!(
        found.iter().any(|p| p.contains("sts.endpoint_url")),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("instance.availability_zone")),
        "{found:#?}"
    );
}

#[test]
fn valid_fixture_loads_with_defaults_applied() {
    let config = Config::load(&fixture("valid.toml")).unwrap();
    assert_eq!(config.apps.len(), 2);
    let billing = &config.apps[0];
    assert_eq!(
        billing.matcher.as_ref().unwrap().uid,
        Some(0),
        "user names resolve at load"
    );
    assert_eq!(billing.assume_role_input().duration.as_secs(), 7200);
    let etl = &config.apps[1];
    assert_eq!(etl.role_arn().role_name(), "etl");
    assert_eq!(etl.assume_role_input().session_name, "etl-job");
    assert_eq!(etl.assume_role_input().duration.as_secs(), 3600);
    assert_eq!(
        config.server.imdsv1,
        imds_broker::config::ImdsV1::Disabled,
        "IMDSv1 is off unless allowed"
    );
    assert_eq!(config.instance.availability_zone, "us-east-1a");
    // CloudTrail ties each session to its app: SourceIdentity and imds-broker:* tags by default,
    // with the uid the rule pins.
    assert_eq!(
        billing.assume_role_input().source_identity.as_deref(),
        Some("billing")
    );
    let tags: std::collections::HashMap<_, _> =
        billing.assume_role_input().tags.iter().cloned().collect();
    assert_eq!(tags["imds-broker:app"], "billing");
    assert_eq!(tags["imds-broker:uid"], "0");
    assert_eq!(tags["imds-broker:host"], config.instance.hostname);
}

#[test]
fn files_others_can_write_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::copy(fixture("valid.toml"), &path).unwrap();
    for mode in [0o666, 0o602] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            matches!(err, ConfigError::Permissions { .. }),
            "{mode:o}: {err}"
        );
        assert!(err.to_string().contains("world-writable"), "{err}");
    }
    // Group-writable is only acceptable when the group is root.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
    nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(4242))).unwrap();
    let err = Config::load(&path).unwrap_err();
    assert!(err.to_string().contains("writable by group 4242"), "{err}");
    nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(0))).unwrap();
    assert!(Config::load(&path).is_ok());
    // Owned by somebody else entirely.
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Config::load(&path).unwrap_err();
    assert!(err.to_string().contains("owned by uid 4242"), "{err}");
}

fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imds-broker"))
}

#[test]
fn check_command_exit_status_and_messages() {
    let ok = broker()
        .args(["check", "--config"])
        .arg(fixture("valid.toml"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK, 2 app(s)"));

    let bad = broker()
        .args(["check", "--config"])
        .arg(fixture("bad_arn.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:9:12: app[0].role_arn:",
            fixture("bad_arn.toml").display()
        )),
        "{stderr}"
    );

    let missing = broker()
        .args(["check", "--config", "/nonexistent/imds-broker.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn serve_exits_64_on_invalid_config() {
    let out = broker()
        .args(["serve", "--config"])
        .arg(fixture("bad_arn.toml"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("app[0].role_arn"));
}

#[test]
fn serve_refuses_to_be_its_own_credential_source() {
    // The default chain would read IMDS at 169.254.169.254:80, the default listen address.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[sts]\nregion = \"us-east-1\"\n").unwrap();
    let out = broker()
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("would read IMDS at http://169.254.169.254"),
        "{stderr}"
    );
    assert!(
        stderr.contains("AWS_EC2_METADATA_DISABLED=true"),
        "{stderr}"
    );
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = broker().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_warns_about_shadowed_rules() {
    let path = fixture("shadowed.toml");
    let (code, stdout, _) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(
        warnings,
        [
            "warning: app[1] \"billing\" is shadowed by app[0] \"everyone-1001\": every caller it matches is matched earlier"
        ]
    );
}

#[test]
fn explain_shows_each_rule_and_the_result() {
    let path = fixture("shadowed.toml");
    let config = path.to_str().unwrap();
    let (code, out, _) = run(&[
        "explain",
        "--config",
        config,
        "--uid",
        "1001",
        "--exe",
        "/opt/billing/bin/billing",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("rule app[0] \"everyone-1001\": match\n  uid: wanted 1001, got 1001: yes"),
        "{out}"
    );
    assert!(
        out.contains("rule app[1] \"billing\": match (not reached: an earlier rule decided)"),
        "{out}"
    );
    assert!(out.contains("rule app[2] \"workers\": no match\n  systemd_unit: wanted worker-*.service, got (unknown for this caller): no"), "{out}");
    assert!(
        out.ends_with("result: app \"everyone-1001\" -> arn:aws:iam::123456789012:role/broad\n"),
        "{out}"
    );

    let (code, out, _) = run(&[
        "explain",
        "--config",
        config,
        "--uid",
        "7",
        "--cgroup",
        "/system.slice/worker-3.service",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "caller: local uid=7 cgroup=/system.slice/worker-3.service unit=worker-3.service"
        ),
        "{out}"
    );
    assert!(
        out.ends_with("result: app \"workers\" -> arn:aws:iam::123456789012:role/workers\n"),
        "{out}"
    );

    let (code, out, _) = run(&["explain", "--config", config, "--source", "10.200.0.9"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("source: wanted 10.200.0.0/24, got 10.200.0.9: yes"),
        "{out}"
    );

    let (code, out, _) = run(&["explain", "--config", config, "--source", "10.9.0.9"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.ends_with("result: no rule matched\n"), "{out}");

    // A real process: this test's own, read from /proc.
    let me = std::process::id().to_string();
    let (code, out, _) = run(&["explain", "--config", config, "--pid", &me]);
    assert_eq!(code, Some(1), "root matches none of these rules: {out}");
    assert!(out.contains(&format!("pid={me}")), "{out}");
    assert!(
        out.contains(&format!(
            "exe={}",
            std::env::current_exe().unwrap().display()
        )),
        "{out}"
    );

    let (code, _, err) = run(&["explain", "--config", config]);
    assert_eq!(code, Some(64), "{err}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `imds-broker check | head -1`: the reader goes away before the command writes.
    let mut child = broker()
        .args(["check", "--config"])
        .arg(fixture("shadowed.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_says_when_container_rules_have_no_runtime_to_ask() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let text = |socket: &str| {
        format!(
            "[sts]\nregion = \"us-east-1\"\n[containers]\nruntime_socket = \"{socket}\"\n\
             [[app]]\nname = \"billing\"\nrole_arn = \"arn:aws:iam::123456789012:role/billing\"\n\
             match = {{ container_label = {{ \"com.example.app\" = \"billing\" }} }}\n"
        )
    };
    let write = |body: String| {
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    write(text("/nonexistent/docker.sock"));
    let (code, stdout, _) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "warning: containers: no runtime socket exists here (/nonexistent/docker.sock)"
        ),
        "{stdout}"
    );
    // A socket that exists: no warning.
    let socket = dir.path().join("runtime.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    write(text(socket.to_str().unwrap()));
    let (_, stdout, _) = run(&["check", "--config", path.to_str().unwrap()]);
    assert!(!stdout.contains("no runtime socket"), "{stdout}");
    assert!(
        stdout.contains("containers: callers in other network namespaces identified"),
        "{stdout}"
    );
}

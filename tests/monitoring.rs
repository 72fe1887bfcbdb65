//! Monitoring as code (deploy/monitoring): the alerting rules pass `promtool check rules` and
//! their unit tests, the Grafana dashboard is dashboard JSON whose every expression promtool
//! accepts, and every metric (and label) the dashboard and the rules use is one a running
//! daemon exports, so renaming a metric fails here rather than on a dashboard.
//!
//! promtool comes with Debian's `prometheus` package, which `.ci/run` installs: without it the
//! promtool tests fail under `CI=true` and are skipped, saying so, elsewhere.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestDaemon;
use serde_json::Value;

const ALERTS: &str = "deploy/monitoring/alerts.yml";
const ALERT_TESTS: &str = "deploy/monitoring/alerts.test.yml";
const DASHBOARD: &str = "deploy/monitoring/grafana-dashboard.json";

/// Labels Prometheus adds to every scraped series (target labels), not the daemon.
const TARGET_LABELS: &[&str] = &["instance", "job"];
/// Series Prometheus makes itself for each target.
const SCRAPE_SERIES: &[&str] = &["up"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The promtool to run, or `None` (after saying why) when it is missing outside CI.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("promtool is missing in CI: .ci/run installs Debian's `prometheus` package");
    }
    eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus); not run");
    None
}

/// Runs `promtool ARGS` and fails with its output unless it succeeds.
fn run_promtool(promtool: &str, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo("."))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alerts of alerts.yml: name, its block of lines, its expression.
fn alerts() -> Vec<(String, String, String)> {
    let text = read(ALERTS);
    let mut blocks: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert: ") {
            blocks.push((name.trim().to_owned(), Vec::new()));
        } else if let Some((_, lines)) = blocks.last_mut() {
            lines.push(line);
        }
    }
    blocks
        .into_iter()
        .map(|(name, lines)| {
            let expr = block_value(&lines, "expr:");
            (name, lines.join("\n"), expr)
        })
        .collect()
}

/// The value of `key` in YAML `lines`: on its line, or the indented block after `key |`.
fn block_value(lines: &[&str], key: &str) -> String {
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in {lines:?}"));
    let line = lines[at];
    let value = line.trim_start()[key.len()..].trim();
    if value != "|" {
        return value.to_owned();
    }
    let indent = line.len() - line.trim_start().len();
    lines[at + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn alerting_rules_pass_promtool_and_each_alert_has_a_firing_and_a_silent_unit_test() {
    let alerts = alerts();
    assert!(alerts.len() >= 6, "{alerts:?}");
    let tests = read(ALERT_TESTS);
    let test_lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (name, block, _) in &alerts {
        for needed in ["for: ", "severity: ", "summary: ", "description: "] {
            assert!(block.contains(needed), "{name} has no {needed}");
        }
        // Each evaluation of this alert in the tests, by whether it expects it firing.
        let expectations: Vec<bool> = test_lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {name}"))
            .map(|w| w[1] != "exp_alerts: []")
            .collect();
        assert!(expectations.contains(&true), "no test fires {name}");
        assert!(expectations.contains(&false), "no test shows {name} silent");
    }
    let Some(promtool) = promtool() else { return };
    run_promtool(promtool, &["check", "rules", ALERTS]);
    run_promtool(promtool, &["test", "rules", ALERT_TESTS]);
}

/// The dashboard's panels (rows' nested panels included).
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every PromQL expression of the dashboard, with Grafana's variables replaced by values
/// Prometheus accepts.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    panels(&dashboard)
        .into_iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_owned();
            p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("panel {title} has no targets"))
                .iter()
                .map(move |t| {
                    let expr = t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("a target of {title} has no expr"));
                    let expr = expr
                        .replace("$__rate_interval", "5m")
                        .replace("$__interval", "1m")
                        .replace("$instance", ".*");
                    (title.clone(), expr)
                })
        })
        .collect()
}

#[test]
fn the_dashboard_is_grafana_json_and_promtool_accepts_every_expression() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no `datasource` template variable"
    );
    for panel in panels(&dashboard)
        .into_iter()
        .filter(|p| p["type"] != "row")
    {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            panel["title"]
        );
        for key in ["id", "gridPos", "title"] {
            assert!(!panel[key].is_null(), "panel without {key}: {panel}");
        }
    }
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{exprs:?}");

    let Some(promtool) = promtool() else { return };
    // promtool checks expressions in rule files: one recording rule per expression (a JSON
    // string is a YAML double-quoted scalar).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      # {title}\n      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    run_promtool(promtool, &["check", "rules", file.to_str().unwrap()]);
}

/// What a PromQL expression refers to: metric names (each with the label names it is matched
/// on) and the label names it groups by.
#[derive(Debug, Default)]
struct Refs {
    metrics: BTreeMap<String, BTreeSet<String>>,
    grouping: BTreeSet<String>,
}

const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// A small PromQL scanner, enough for these files: strings, `{}` matchers and `[]` ranges are
/// skipped over; an identifier followed by `(` is a function or aggregation, unless it is a
/// grouping keyword (whose parentheses hold label names), and so is one followed by a grouping
/// (`sum by (x) (...)`); keywords and numbers are skipped; every other identifier is a metric
/// name.
fn refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut last_metric: Option<String> = None;
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let close = i + chars[i..]
                .iter()
                .position(|&c| c == '}')
                .expect("closing }");
            let matchers: String = chars[i + 1..close].iter().collect();
            let metric = last_metric
                .take()
                .expect("a {} selector needs a metric name");
            for matcher in split_matchers(&matchers) {
                let label = matcher.split(['=', '!']).next().unwrap().trim().to_owned();
                refs.metrics.get_mut(&metric).unwrap().insert(label);
            }
            i = close + 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            let followed_by_paren = chars.get(next) == Some(&'(');
            // `sum by (x) (...)`: an aggregation with its grouping first.
            let rest: String = chars[next..].iter().take(8).collect();
            let aggregation = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k)
                    .is_some_and(|r| r.trim_start().starts_with('('))
            });
            last_metric = None;
            if GROUPING.contains(&word.as_str()) {
                if followed_by_paren {
                    let close = next + chars[next..].iter().position(|&c| c == ')').unwrap();
                    let labels: String = chars[next + 1..close].iter().collect();
                    refs.grouping.extend(
                        labels
                            .split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_owned),
                    );
                    i = close + 1;
                }
            } else if followed_by_paren || aggregation || KEYWORDS.contains(&word.as_str()) {
                // A function, an aggregation or a keyword.
            } else {
                refs.metrics.entry(word.clone()).or_default();
                last_metric = Some(word);
            }
        } else {
            if !c.is_whitespace() {
                last_metric = None;
            }
            i += 1;
        }
    }
    refs
}

/// `a="x", b=~"y,z"` into its matchers (commas inside quoted values kept).
fn split_matchers(text: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(c);
    }
    out.into_iter().filter(|m| !m.trim().is_empty()).collect()
}

#[test]
fn the_scanner_finds_metrics_and_labels_and_nothing_else() {
    let r = refs(
        r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"1|2", y!="3,4"}[5m])))
           / on (instance) group_left (app) b unless c offset 1h > bool 2e3 or absent(d{job="j"})"#,
    );
    let metrics: Vec<_> = r.metrics.keys().map(String::as_str).collect();
    assert_eq!(metrics, ["a_bucket", "b", "c", "d"]);
    assert_eq!(
        r.metrics["a_bucket"],
        BTreeSet::from(["x".to_owned(), "y".to_owned()])
    );
    assert_eq!(
        r.grouping,
        BTreeSet::from(["app".into(), "instance".into(), "le".into()])
    );
}

/// The series names in a Prometheus text exposition, each with the label names seen on it.
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let end = line.find(['{', ' ']).expect("a sample line");
        let labels = out.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            let close = line.rfind('}').unwrap();
            for matcher in split_matchers(&line[end + 1..close]) {
                labels.insert(matcher.split('=').next().unwrap().trim().to_owned());
            }
        }
    }
    out
}

/// Every expression the dashboard and the rules use, named by where it is.
fn every_expr() -> Vec<(String, String)> {
    let mut exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|(title, e)| (format!("dashboard panel {title:?}"), e))
        .collect();
    exprs.extend(
        alerts()
            .into_iter()
            .map(|(name, _, e)| (format!("alert {name}"), e)),
    );
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["query"]["query"].as_str() {
            // label_values(METRIC, LABEL): the metric selector, and the label as a grouping.
            let args = q
                .strip_prefix("label_values(")
                .and_then(|a| a.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {q}"));
            let (metric, label) = args.rsplit_once(',').unwrap();
            exprs.push((
                format!("variable {}", variable["name"]),
                format!("sum by ({}) ({})", label.trim(), metric.trim()),
            ));
        }
    }
    exprs
}

/// Config for a daemon that this test process is app-a of.
fn config(state_dir: &Path) -> String {
    common::config_text(state_dir, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_exported_by_a_running_daemon() {
    let daemon = TestDaemon::start(config).await;
    // Make the series that appear only once their event happened: a token, a credential
    // document (one STS call, its latency, the app's expiry), a refused token.
    let token = daemon.token(60).await;
    let r = daemon
        .get("/latest/meta-data/iam/security-credentials/app-a", &token)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = daemon
        .get("/latest/meta-data/iam/security-credentials/app-a", "forged")
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let admin = daemon.state.config().admin.clone();
    let (status, text) = imds_broker::admin::fetch(&admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    daemon.stop().await;

    let exported = exposition(&text);
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in every_expr() {
        let refs = refs(&expr);
        assert!(!refs.metrics.is_empty(), "{place}: no metric in {expr}");
        let mut labels_here: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        for (metric, matched) in &refs.metrics {
            used.insert(metric.clone());
            if SCRAPE_SERIES.contains(&metric.as_str()) {
                labels_here.extend(["job", "instance"]);
                continue;
            }
            let Some(labels) = exported.get(metric) else {
                missing.push(format!("{place}: metric {metric}"));
                continue;
            };
            labels_here.extend(labels.iter().map(String::as_str));
            for label in matched {
                if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    missing.push(format!("{place}: label {label} of {metric}"));
                }
            }
        }
        for label in &refs.grouping {
            if !labels_here.contains(label.as_str()) {
                missing.push(format!("{place}: grouping label {label}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the daemon:\n  {}\n/metrics was:\n{text}",
        missing.join("\n  ")
    );
    // The daemon's own metrics are all on the dashboard or in an alert.
    let unused: Vec<_> = exported
        .keys()
        .filter(|m| m.starts_with("imds_broker_"))
        .filter(|m| !used.contains(*m) && !used.contains(&histogram_family(m)))
        .collect();
    assert!(
        unused.is_empty(),
        "exported but monitored nowhere: {unused:?}"
    );
}

/// `x_bucket`, `x_sum` and `x_count` belong to the histogram `x_bucket` the dashboard uses.
fn histogram_family(series: &str) -> String {
    ["_sum", "_count"]
        .iter()
        .find_map(|s| series.strip_suffix(s))
        .map_or_else(|| series.to_owned(), |base| format!("{base}_bucket"))
}

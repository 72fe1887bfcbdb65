//! Drop-in files (`[server] include`, default `apps.d/*.toml` beside the config file): their
//! apps follow the main file's in lexical file order, every problem names the drop-in's file,
//! line and field, files and directories others can write are refused, `check` and `explain`
//! say where a rule came from, and a reload re-reads the directory (an invalid set keeps the
//! old config).

#[path = "common/binary.rs"]
#[allow(dead_code)] // only `broker()` is used here
mod binary;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{FakeSts, ManualClock};
use imds_broker::config::{Config, ConfigError};
use imds_broker::reload;
use imds_broker::state::AppState;
use imds_broker::token::TokenKey;

fn main_config(dir: &Path, include: Option<&str>) -> PathBuf {
    let include = include.map_or(String::new(), |i| format!("include = {i}\n"));
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{}\"\n{include}\
         [sts]\nregion = \"us-east-1\"\n\
         [[app]]\nname = \"main\"\nrole_arn = \"arn:aws:iam::111122223333:role/main\"\n\
         [app.match]\nuid = 4100001\n",
        dir.join("state").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn app(name: &str, uid: u32) -> String {
    format!(
        "[[app]]\nname = \"{name}\"\nrole_arn = \"arn:aws:iam::111122223333:role/{name}\"\n\
         [app.match]\nuid = {uid}\n"
    )
}

fn drop_in(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn names(config: &Config) -> Vec<&str> {
    config.apps.iter().map(|a| a.name.as_str()).collect()
}

fn problems(err: ConfigError) -> String {
    err.to_string()
}

#[test]
fn drop_ins_follow_the_main_file_in_lexical_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let apps_d = dir.path().join("apps.d");
    drop_in(&apps_d, "20-reports.toml", &app("reports", 4100003));
    let billing = drop_in(
        &apps_d,
        "10-billing.toml",
        &(app("billing", 4100002) + &app("billing-batch", 4100004)),
    );
    // Not config: another suffix, an editor's leftover, a directory.
    drop_in(&apps_d, "30-notes.conf", &app("notes", 4100005));
    drop_in(&apps_d, ".10-billing.toml.swp", "not toml at all");
    std::fs::create_dir(apps_d.join("40-dir.toml")).unwrap();

    let config = Config::load(&path).unwrap();
    assert_eq!(
        names(&config),
        ["main", "billing", "billing-batch", "reports"]
    );
    assert_eq!(config.apps[0].source, path);
    assert_eq!(config.apps[1].source, billing);
    // Without the directory there are simply no drop-ins.
    std::fs::remove_dir_all(&apps_d).unwrap();
    assert_eq!(names(&Config::load(&path).unwrap()), ["main"]);
}

#[test]
fn a_problem_in_a_drop_in_names_its_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let apps_d = dir.path().join("apps.d");
    let dup = drop_in(&apps_d, "10-dup.toml", &app("main", 4100002));
    let err = problems(Config::load(&path).unwrap_err());
    assert!(
        err.starts_with(&format!("{}:2:8: app[0].name:", dup.display())),
        "{err}"
    );
    std::fs::remove_file(&dup).unwrap();

    // A drop-in holds apps only.
    let server = drop_in(&apps_d, "10-server.toml", "[server]\nlisten = []\n");
    let err = problems(Config::load(&path).unwrap_err());
    assert!(
        err.starts_with(&format!(
            "{}:1:2: (file): unknown field `server`",
            server.display()
        )),
        "{err}"
    );
    std::fs::remove_file(&server).unwrap();

    let bad_arn = drop_in(
        &apps_d,
        "10-arn.toml",
        "[[app]]\nname = \"x\"\nrole_arn = \"nope\"\n[app.match]\nuid = 1\n",
    );
    let err = problems(Config::load(&path).unwrap_err());
    assert!(
        err.starts_with(&format!("{}:3:12: app[0].role_arn:", bad_arn.display())),
        "{err}"
    );
}

#[test]
fn drop_ins_and_their_directory_others_can_write_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let apps_d = dir.path().join("apps.d");
    let file = drop_in(&apps_d, "10-billing.toml", &app("billing", 4100002));
    std::fs::set_permissions(&apps_d, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Config::load(&path).is_ok());

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = problems(Config::load(&path).unwrap_err());
    assert!(
        err.contains(&file.display().to_string()) && err.contains("world-writable"),
        "{err}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Whoever can add a file to the directory adds an app.
    std::fs::set_permissions(&apps_d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = problems(Config::load(&path).unwrap_err());
    assert!(
        err.contains(&apps_d.display().to_string()) && err.contains("world-writable"),
        "{err}"
    );
}

#[test]
fn include_names_other_globs_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(
        dir.path(),
        Some("[\"more/*.toml\", \"extra.toml\", \"/nonexistent/*.toml\"]"),
    );
    drop_in(&dir.path().join("more"), "a.toml", &app("a", 4100002));
    drop_in(dir.path(), "extra.toml", &app("extra", 4100003));
    // The default directory is not read once `include` is given.
    drop_in(&dir.path().join("apps.d"), "b.toml", &app("b", 4100004));
    assert_eq!(
        names(&Config::load(&path).unwrap()),
        ["main", "extra", "a"],
        "lexical order of the files' paths"
    );

    let path = main_config(dir.path(), Some("[\"*/x.toml\"]"));
    let err = problems(Config::load(&path).unwrap_err());
    assert!(err.contains("server.include"), "{err}");
}

#[test]
fn check_and_explain_say_which_file_a_rule_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let file = drop_in(
        &dir.path().join("apps.d"),
        "10-billing.toml",
        &app("billing", 4100002),
    );
    let check = binary::broker()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(out.contains("OK, 2 app(s)"), "{out}");
    assert!(
        out.contains("  billing: uid=4100002 -> arn:aws:iam::111122223333:role/billing (3600s, session billing@"),
        "{out}"
    );
    assert!(
        out.contains(&format!("    from {}", file.display())),
        "{out}"
    );

    let explain = binary::broker()
        .args(["explain", "--config"])
        .arg(&path)
        .args(["--uid", "4100002"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&explain.stdout);
    assert!(explain.status.success(), "{explain:?}");
    assert!(
        out.contains(&format!(
            "rule app[1] \"billing\" (from {}): match",
            file.display()
        )),
        "{out}"
    );
    assert!(out.contains("rule app[0] \"main\": no match"), "{out}");
}

#[tokio::test]
async fn reload_rereads_the_directory_and_keeps_the_old_set_when_one_file_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let apps_d = dir.path().join("apps.d");
    let config = Config::load(&path).unwrap();
    let clock = ManualClock::new();
    let key = TokenKey::load_or_create(&config.server.state_dir).unwrap();
    let state = AppState::new(config, key, FakeSts::new(clock.clone()), Arc::new(clock));
    let apps = |state: &AppState| -> Vec<String> {
        state.config().apps.iter().map(|a| a.name.clone()).collect()
    };

    let added = drop_in(&apps_d, "10-billing.toml", &app("billing", 4100002));
    reload::reload(&state, &path).await.unwrap();
    assert_eq!(apps(&state), ["main", "billing"]);

    std::fs::write(&added, app("billing", 4100002) + "oops = 1\n").unwrap();
    let err = reload::reload(&state, &path).await.unwrap_err();
    assert!(
        err.to_string().contains(&added.display().to_string()),
        "{err}"
    );
    assert_eq!(apps(&state), ["main", "billing"], "the old set stays");

    std::fs::write(&added, app("billing-v2", 4100002)).unwrap();
    drop_in(&apps_d, "20-reports.toml", &app("reports", 4100003));
    reload::reload(&state, &path).await.unwrap();
    assert_eq!(apps(&state), ["main", "billing-v2", "reports"]);

    std::fs::remove_file(&added).unwrap();
    reload::reload(&state, &path).await.unwrap();
    assert_eq!(apps(&state), ["main", "reports"]);
    state.stop_background().await;
}

#[test]
fn lint_reads_the_session_policies_of_drop_ins_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = main_config(dir.path(), None);
    let file = drop_in(
        &dir.path().join("apps.d"),
        "10-wide.toml",
        "[[app]]\nname = \"wide\"\nrole_arn = \"arn:aws:iam::111122223333:role/wide\"\n\
         policy = '{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"s3:*\",\"Resource\":\"*\"}]}'\n\
         [app.match]\nuid = 4100002\n",
    );
    let lint = binary::broker()
        .args(["lint", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&lint.stdout);
    assert_eq!(lint.status.code(), Some(1), "warnings only: {lint:?}");
    assert!(
        out.lines().any(
            |l| l.starts_with(&format!("{}:4:", file.display())) && l.contains("app[0].policy")
        ),
        "{out}"
    );
}

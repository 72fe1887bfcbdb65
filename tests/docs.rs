//! The manual pages and shell completions, as `deploy/gen-docs.sh` makes them from the real
//! binary (the Debian package's and `deploy/install.sh`'s source): a page for the command and
//! one for every subcommand, each rendered by `man --warnings=w -l` and `groff -ww` (every
//! groff warning on) without a warning, and
//! completion scripts that bash, zsh and fish accept. A missing tool skips its check, except
//! in CI (`CI=true`), where `.ci/run` installs them and a missing one is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Every page, by file name: the command's and each visible subcommand's, nested ones too.
const PAGES: &[&str] = &[
    "imds-broker.8",
    "imds-broker-audit.8",
    "imds-broker-audit-keygen.8",
    "imds-broker-audit-verify.8",
    "imds-broker-check.8",
    "imds-broker-doctor.8",
    "imds-broker-exec.8",
    "imds-broker-explain.8",
    "imds-broker-lint.8",
    "imds-broker-serve.8",
    "imds-broker-status.8",
    "imds-broker-token.8",
    "imds-broker-token-rotate.8",
];

/// The completion scripts, by file name, and the shell that must accept each.
const COMPLETIONS: &[(&str, &str)] = &[
    ("imds-broker", "bash"),
    ("_imds-broker", "zsh"),
    ("imds-broker.fish", "fish"),
];

/// Runs `deploy/gen-docs.sh` on the test build; returns its output directory.
fn generate(dir: &Path) -> PathBuf {
    let out = dir.join("docs");
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gen-docs.sh"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_imds-broker"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "gen-docs.sh: {status}");
    out
}

/// Whether `program` runs; without it the check is skipped, but in CI it must be there.
fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v \"$1\"", "sh", program])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{program} is needed in CI (.ci/run installs it)"
        );
        eprintln!("skipped: {program} is not installed");
    }
    found
}

fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_page_for_the_command_and_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(dir.path());
    let mut pages: Vec<String> = std::fs::read_dir(out.join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    let mut want: Vec<&str> = PAGES.to_vec();
    want.sort();
    assert_eq!(
        pages, want,
        "no page for the hidden `generate` nor for `help`"
    );

    let serve = std::fs::read_to_string(out.join("man/imds-broker-serve.8")).unwrap();
    assert!(
        serve.contains(".TH imds-broker-serve 8"),
        "section 8: {serve}"
    );
    assert!(
        serve.contains("journal"),
        "--log-format journal is documented"
    );
    let main = std::fs::read_to_string(out.join("man/imds-broker.8")).unwrap();
    for page in PAGES.iter().filter(|p| **p != "imds-broker.8") {
        let name = page.trim_end_matches(".8");
        // Direct subcommands are listed on the main page (roff escapes `-`), nested ones on
        // their parent's.
        if name.matches('-').count() == 2 {
            let reference = format!("{}(8)", name.replace('-', "\\-"));
            assert!(
                main.contains(&reference),
                "imds-broker(8) lists {reference}"
            );
        }
    }
}

#[test]
fn every_page_renders_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(dir.path());
    if have("man") {
        for page in PAGES {
            let output = Command::new("man")
                .args(["--warnings=w", "-E", "UTF-8", "-l"])
                .arg(out.join("man").join(page))
                .env("MANWIDTH", "80")
                .env("LC_ALL", "C.UTF-8")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            let what = format!("man -l {page}");
            assert!(output.status.success(), "{}", describe(&what, &output));
            assert!(output.stderr.is_empty(), "{}", describe(&what, &output));
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(text.contains("NAME"), "{}", describe(&what, &output));
        }
    }
    if have("groff") {
        for page in PAGES {
            let output = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(out.join("man").join(page))
                .output()
                .unwrap();
            let what = format!("groff -ww {page}");
            assert!(output.status.success(), "{}", describe(&what, &output));
            assert!(output.stderr.is_empty(), "{}", describe(&what, &output));
        }
    }
}

#[test]
fn completion_scripts_are_valid_for_their_shells() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(dir.path());
    for (file, shell) in COMPLETIONS {
        let path = out.join("completions").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        for subcommand in ["serve", "check", "audit", "keygen", "log-format"] {
            assert!(text.contains(subcommand), "{file} completes {subcommand}");
        }
        if have(shell) {
            let output = Command::new(shell).arg("-n").arg(&path).output().unwrap();
            let what = format!("{shell} -n {file}");
            assert!(output.status.success(), "{}", describe(&what, &output));
            assert!(output.stderr.is_empty(), "{}", describe(&what, &output));
        }
    }
}

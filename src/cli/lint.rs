//! `imds-broker lint`: reviews every app's session policy (or one policy file) for least
//! privilege, one `file:line:col: severity: field: message` line per finding.

use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_CONFIG;
use crate::iam::lint::{self, Severity};
use crate::iam::source::Origin;

/// Exit statuses of `lint`.
const LINT_WARNINGS: u8 = 1;
const LINT_ERRORS: u8 = 2;

pub(super) fn lint(config: PathBuf, policy: Option<PathBuf>) -> ExitCode {
    let (texts, problems) = match policy {
        Some(file) => match std::fs::read_to_string(&file) {
            Ok(text) => {
                let origin = Origin::file(&file);
                let field = "policy".to_string();
                let text = crate::config::PolicyText {
                    field,
                    text,
                    origin,
                };
                (vec![text], Vec::new())
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => match crate::config::policy_texts(&config) {
            Ok(found) => found,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let mut worst = None;
    for p in &problems {
        outln!(
            "{}:{}:{}: error: {}: {}",
            p.path.display(),
            p.line,
            p.column,
            p.field,
            p.message
        );
        worst = Some(Severity::Error);
    }
    for t in &texts {
        for f in lint::lint(&t.text) {
            let (line, column) = t.origin.locate(&t.text, f.offset);
            outln!(
                "{}:{line}:{column}: {}: {}: {}",
                t.origin.path.display(),
                f.severity,
                t.field,
                f.message
            );
            worst = worst.max(Some(f.severity));
        }
    }
    match worst {
        None => {
            outln!("{} session policies: no findings", texts.len());
            ExitCode::SUCCESS
        }
        Some(Severity::Warning) => ExitCode::from(LINT_WARNINGS),
        Some(Severity::Error) => ExitCode::from(LINT_ERRORS),
    }
}

//! `imds-broker explain`: which rule a process (or uid, cgroup, source address) matches and
//! why; with `--app`, whether that app's session policy allows an action on a resource.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{EXIT_CONFIG, load_config};
use crate::config::Config;
use crate::explain::{self, PolicyOutcome, Subject};
use crate::runtime::Runtime;

pub(super) fn rule(path: PathBuf, subject: Subject) -> ExitCode {
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let what = format!("{subject:?}");
    report(&config, &subject, &what)
}

/// Prints the report for `subject` (described as `what` when it cannot be read): exit 0 if a
/// rule matched, 1 if none did.
fn report(config: &Config, subject: &Subject, what: &str) -> ExitCode {
    let caller = match explain::caller_for(subject, config) {
        Ok(caller) => caller,
        Err(e) => {
            eprintln!("cannot read {what}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (report, matched) = explain::report(config, &caller);
    out!("{report}");
    if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `explain --container`: the container's main process as the daemon would see a socket of
/// it, with what the runtime says about the container.
pub(super) async fn container(path: PathBuf, name_or_id: &str) -> ExitCode {
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(containers) = &config.containers else {
        eprintln!(
            "{}: no [containers] section: callers in containers are processes like any other (try --pid)",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let runtime = Runtime::new(containers.runtime_sockets.clone());
    let inspected = match runtime.find(name_or_id).await {
        Ok(found) => found,
        Err(e) => {
            eprintln!("container {name_or_id:?}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(pid) = inspected.pid.filter(|_| inspected.running) else {
        eprintln!("container {name_or_id:?} is not running: it has no process to explain");
        return ExitCode::from(EXIT_CONFIG);
    };
    let subject = Subject::Container {
        pid,
        meta: inspected.meta,
    };
    report(
        &config,
        &subject,
        &format!("container {name_or_id:?} (pid {pid})"),
    )
}

/// `explain --app` when only IAM can decide.
const EXPLAIN_UNDECIDED: u8 = 3;

pub(super) fn policy(path: PathBuf, app: &str, action: &str, resource: &str) -> ExitCode {
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(app) = config.apps.iter().find(|a| a.name == app) else {
        eprintln!("{}: no app named {app:?}", path.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    if !action.contains(':') {
        eprintln!("--action must be service:Action, e.g. s3:GetObject");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (report, outcome) = explain::policy_report(app, action, resource);
    out!("{report}");
    match outcome {
        PolicyOutcome::Allowed | PolicyOutcome::NoPolicy => ExitCode::SUCCESS,
        PolicyOutcome::Denied => ExitCode::FAILURE,
        PolicyOutcome::Undecided => ExitCode::from(EXPLAIN_UNDECIDED),
    }
}

//! `imds-broker doctor`: the app-side diagnosis of [`crate::doctor`], printed one line per
//! step, with the fix for the first failure. Exit 0 only when an SDK in this environment would
//! get its credentials (and the expected role, if one is named).

use std::net::SocketAddr;
use std::process::ExitCode;

use nix::unistd::{Gid, Uid, User};

use crate::doctor::{self, Options, Outcome};

pub(super) async fn doctor(
    endpoint: Option<SocketAddr>,
    uid: Option<u32>,
    expect_role: Option<String>,
) -> ExitCode {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    if let Some(uid) = uid {
        match become_user(uid) {
            Ok(home) => {
                // The user's own environment is not ours to read: only where their files are.
                env.retain(|(k, _)| !k.starts_with("AWS_") && k != "HOME");
                env.extend(home.map(|h| ("HOME".to_owned(), h)));
            }
            Err(e) => {
                eprintln!("doctor --uid {uid}: {e}");
                return ExitCode::from(super::EXIT_CONFIG);
            }
        }
    }
    let endpoint = match endpoint.map_or_else(|| doctor::sdk_endpoint(&env), Ok) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("AWS_EC2_METADATA_SERVICE_ENDPOINT: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let options = Options {
        endpoint,
        expect_role,
        env,
    };
    let steps = doctor::diagnose(&options, &crate::identity::host_addresses()).await;
    let mut failed = false;
    for step in &steps {
        let mark = match step.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Note => "note",
            Outcome::Fail => "FAIL",
        };
        outln!("{mark} {}: {}", step.name, step.detail);
        if step.outcome == Outcome::Fail && !failed {
            if let Some(fix) = &step.fix {
                outln!("     fix: {fix}");
            }
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the rest of the command as `uid` (root only), with its primary group and no others;
/// the user's home directory, if it has an entry.
fn become_user(uid: u32) -> Result<Option<String>, String> {
    let user = User::from_uid(Uid::from_raw(uid)).map_err(|e| e.to_string())?;
    let gid = user.as_ref().map_or(uid, |u| u.gid.as_raw());
    let gid = Gid::from_raw(gid);
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e} (run as root)"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    let uid = Uid::from_raw(uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    Ok(user.map(|u| u.dir.display().to_string()))
}

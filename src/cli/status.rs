//! `imds-broker status`: each app's role and cached credentials, from a running daemon's admin
//! listener.

use std::path::PathBuf;
use std::process::ExitCode;

use super::load_config;
use crate::admin;

pub(super) async fn status(path: PathBuf) -> ExitCode {
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let rows = match admin::fetch(&config.admin, "/status").await {
        Ok((200, body)) => serde_json::from_str::<admin::StatusBody>(&body),
        Ok((code, body)) => {
            eprintln!("{}: HTTP {code}: {body}", config.admin);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot reach the daemon at {}: {e}", config.admin);
            return ExitCode::FAILURE;
        }
    };
    match rows {
        Ok(body) => {
            out!("{}", admin::status_table(&body.into()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unexpected status document: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `imds-broker token rotate APP`: asks a running daemon to write a new container-endpoint
//! token for APP now.

use std::path::PathBuf;
use std::process::ExitCode;

use super::load_config;
use crate::admin;

pub(super) async fn rotate(path: PathBuf, app: &str) -> ExitCode {
    let config = match load_config(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let target = format!("/container-tokens/{app}/rotate");
    match admin::request(&config.admin, "POST", &target).await {
        Ok((200, body)) => {
            out!("{body}");
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("{body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot reach the daemon at {}: {e}", config.admin);
            ExitCode::FAILURE
        }
    }
}

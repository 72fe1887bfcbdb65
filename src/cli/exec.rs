//! `imds-broker exec --app APP CMD...`: runs CMD with APP's container-endpoint variables set.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_CONFIG;
use crate::config::Config;

/// Replaces this process with `command`; returns only if that fails.
pub(super) fn exec(
    path: PathBuf,
    app: &str,
    given: Option<(String, PathBuf)>,
    command: Vec<OsString>,
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let target = match given {
        Some((url, token_file)) => crate::exec::Target { url, token_file },
        None => {
            let found = Config::load(&path)
                .map_err(|e| {
                    format!("{e}\n(pass --url and --token-file where the config is not readable)")
                })
                .and_then(|config| crate::exec::target(&config, app).map_err(|e| e.to_string()));
            match found {
                Ok(target) => target,
                Err(e) => {
                    eprintln!("imds-broker exec: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if let Err(e) = crate::exec::check_readable(&target.token_file) {
        eprintln!("imds-broker exec: {e}");
        return ExitCode::FAILURE;
    }
    let set = crate::exec::environment(&target);
    let Some((program, args)) = command.split_first() else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let mut child = std::process::Command::new(program);
    child.args(args).envs(set);
    for name in crate::exec::CLEARED {
        child.env_remove(name);
    }
    let e = child.exec();
    eprintln!("imds-broker exec: {}: {e}", program.to_string_lossy());
    // The shell's codes: 127 not found, 126 found but not runnable.
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

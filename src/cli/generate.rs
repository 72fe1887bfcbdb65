//! `imds-broker generate` (hidden): the manual pages and shell completions, made from the clap
//! definitions by the binary being installed, so `deploy/install.sh` and `deploy/gen-docs.sh`
//! (for the Debian package) ship pages that match it.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Section 8: system administration commands and daemons.
const MAN_SECTION: &str = "8";

/// Every page's footer names the package and version, the subcommands' too.
const SOURCE: &str = concat!("imds-broker ", env!("CARGO_PKG_VERSION"));

/// The shells completions are made for, each file named as that shell looks for it
/// (`imds-broker.bash`, `_imds-broker`, `imds-broker.fish`).
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `imds-broker.8` and a page per visible subcommand, nested ones too
/// (`imds-broker-token-rotate.8`).
pub(super) fn man(dir: &Path) -> ExitCode {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    report(dir, write_pages(&cmd, dir))
}

fn write_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        .source(SOURCE)
        .generate_to(dir)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    Ok(())
}

pub(super) fn completions(dir: &Path) -> ExitCode {
    let result = std::fs::create_dir_all(dir).and_then(|()| {
        let mut cmd = Cli::command();
        for shell in SHELLS {
            clap_complete::generate_to(shell, &mut cmd, "imds-broker", dir)?;
        }
        Ok(())
    });
    report(dir, result)
}

fn report(dir: &Path, result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write to {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

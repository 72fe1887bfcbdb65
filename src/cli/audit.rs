//! `imds-broker audit verify` and `audit keygen`: check an audit file's chain, seals and
//! checkpoint; make the sealing key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::EXIT_CONFIG;
use crate::audit::checkpoint::{Expected, Finder};
use crate::audit::seal::{Checker, EpochKey};
use crate::audit::{self, keyfile};
use crate::config::Config;

pub(super) fn verify(file: &Path, key: Option<&Path>, expected: Option<Expected>) -> ExitCode {
    if let Some(hash) = expected.as_ref().and_then(|e| e.hash.as_ref())
        && !(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        eprintln!("--expect-hash must be 64 hex digits (an audit_hash)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let mut checker = match key.map(keyfile::read_verify_key) {
        None => None,
        Some(Ok(key)) => Some(Checker::new(key)),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut finder = expected.map(Finder::new);
    let mut sealed = 0u64;
    let verified = audit::chain::verify_with(&text, |line| {
        sealed += u64::from(line.seal.is_some());
        if let Some(finder) = &mut finder {
            finder.see(line);
        }
        match &mut checker {
            Some(checker) => checker.check(line),
            None => Ok(()),
        }
    });
    let broken = |problem: &dyn std::fmt::Display| {
        outln!("{}: BROKEN: {problem}", file.display());
        ExitCode::FAILURE
    };
    let v = match verified {
        Ok(v) => v,
        Err(e) => return broken(&e),
    };
    let key_id = checker.as_ref().map(|c| c.key_id().to_owned());
    let seals = match checker.map(Checker::finish).transpose() {
        Ok(seals) => seals,
        Err(e) => return broken(&e),
    };
    let at_checkpoint = finder.as_ref().map(|f| f.expected().seq);
    if let Some(Err(e)) = finder.map(|f| f.finish(&v)) {
        return broken(&format!("checkpoint: {e}"));
    }
    let start = if v.from_genesis {
        "from the start of the chain".to_string()
    } else {
        format!("continuing a chain at seq {}", v.first_seq)
    };
    let mut report = format!(
        "{}: OK: {} events, {start}, last seq {} hash {}",
        file.display(),
        v.events,
        v.head.seq,
        v.head.hash
    );
    match (seals, key_id) {
        (Some(s), Some(key_id)) => {
            let epochs = if s.first_epoch == s.last_epoch {
                format!("epoch {}", s.first_epoch)
            } else {
                format!("epochs {}-{}", s.first_epoch, s.last_epoch)
            };
            report.push_str(&format!(
                "; sealed: {} lines in {epochs}, every seal valid (key {key_id})",
                s.sealed
            ));
            if s.unsealed > 0 {
                report.push_str(&format!(
                    "; the first {} lines predate sealing (the seal of line {} covers them)",
                    s.unsealed, s.first_line
                ));
            }
            if s.open {
                report.push_str(&format!(
                    "; epoch {} was still open: only a checkpoint shows lines cut from its end",
                    s.last_epoch
                ));
            }
        }
        _ if sealed > 0 => {
            report.push_str(&format!(
                "; {sealed} lines are sealed: check the seals with --key"
            ));
        }
        _ => {}
    }
    if let Some(seq) = at_checkpoint {
        report.push_str(&format!("; holds the checkpoint at seq {seq}"));
    }
    outln!("{report}");
    ExitCode::SUCCESS
}

pub(super) fn keygen(config: PathBuf, state_dir: Option<PathBuf>, out: &Path) -> ExitCode {
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => match Config::load(&config) {
            Ok(config) => config.server.state_dir,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let state = state_dir.join(keyfile::STATE_FILE);
    match keyfile::read_state(&state_dir) {
        Ok(None) => {}
        Ok(Some(existing)) => {
            eprintln!(
                "{}: audit sealing already runs with key {} (epoch {}); to start over with a new key, stop the daemon and move that file and the audit file aside",
                state.display(),
                existing.key_id,
                existing.epoch
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    // Run as root for a daemon that runs as its own user: the state goes to the directory's owner.
    let owner = std::fs::metadata(&state_dir)
        .ok()
        .filter(|_| nix::unistd::geteuid().is_root())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .filter(|(uid, _)| *uid != 0);
    let key = EpochKey::generate();
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = keyfile::write_verify_key(out, &key, &host) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = keyfile::create_state(&state_dir, &key, owner) {
        eprintln!("{e}");
        let _ = std::fs::remove_file(out);
        return ExitCode::FAILURE;
    }
    outln!(
        "audit sealing key {}: verification key written to {} (mode 0400): move it off this host, \
         since whoever holds it can forge seals, and check audit files with \
         `imds-broker audit verify --key FILE AUDIT_FILE`; the daemon seals from epoch 0 with {}",
        key.key_id,
        out.display(),
        state.display()
    );
    ExitCode::SUCCESS
}

//! Reading the files the config trusts: refusing one that anyone but root or the daemon's
//! user could write.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::ConfigError;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/imds-broker/config.toml";

/// The file must not be writable by anyone but root or the daemon's own user: whoever can write
/// it decides which app gets which role.
pub(super) fn check_permissions(path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |reason: String| ConfigError::Permissions {
        path: path.to_owned(),
        reason,
    };
    let mode = meta.mode();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(refuse(format!(
            "owned by uid {}, not by root or the daemon's user (uid {me})",
            meta.uid()
        )));
    }
    if mode & 0o002 != 0 {
        return Err(refuse(format!("world-writable (mode {:o})", mode & 0o7777)));
    }
    if mode & 0o020 != 0 && meta.gid() != 0 {
        return Err(refuse(format!(
            "writable by group {} (mode {:o})",
            meta.gid(),
            mode & 0o7777
        )));
    }
    Ok(())
}

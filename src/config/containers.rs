//! `[containers]`: callers in containers are identified by their kernel socket and cgroup, and
//! described by the container runtime's API (name, image, labels).

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Validator;

/// Where the Docker Engine API is served when `runtime_socket` is not set: dockerd's socket,
/// then the one `podman system service` (podman.socket) listens on.
pub const DEFAULT_RUNTIME_SOCKETS: [&str; 2] = ["/run/docker.sock", "/run/podman/podman.sock"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContainers {
    pub runtime_socket: Option<Spanned<String>>,
}

/// `[containers]`: present only when container callers are identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainersConfig {
    /// Tried in order; the first that answers is the runtime.
    pub runtime_sockets: Vec<PathBuf>,
}

impl Validator<'_> {
    pub(super) fn containers(&mut self, raw: Option<RawContainers>) -> Option<ContainersConfig> {
        let raw = raw?;
        let runtime_sockets = match raw.runtime_socket {
            Some(socket) => {
                if !socket.get_ref().starts_with('/') {
                    self.push(
                        socket.span(),
                        "containers.runtime_socket",
                        "must be an absolute path to the runtime's Docker Engine API socket",
                    );
                }
                vec![PathBuf::from(socket.into_inner())]
            }
            None => DEFAULT_RUNTIME_SOCKETS.iter().map(PathBuf::from).collect(),
        };
        Some(ContainersConfig { runtime_sockets })
    }
}

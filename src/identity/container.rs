//! Containers as callers: which container a cgroup belongs to, by the layouts the runtimes
//! create, and what the runtime says about it (name, image, labels).
//!
//! A cgroup's name is proof only where root made it: like systemd units (see
//! [`crate::identity::cgroup::Units`]), a container is recognised only in a component whose
//! ancestors only root controls. A user with a delegated subtree (rootless podman, a user
//! manager) can name a cgroup `libpod-<someone else's id>`; that is never a container here.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The runtime whose cgroup layout named the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    Podman,
    Docker,
    /// containerd (CRI or not) and CRI-O, usually under Kubernetes.
    Cri,
    /// systemd-nspawn / machined.
    Nspawn,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Podman => "podman",
            Engine::Docker => "docker",
            Engine::Cri => "cri",
            Engine::Nspawn => "nspawn",
        }
    }
}

/// A container as its cgroup names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub engine: Engine,
    /// The runtime's full id (64 hex digits), or the machine name for nspawn.
    pub id: Arc<str>,
    /// The cgroup path of the container itself (its processes may sit deeper).
    pub cgroup: Arc<str>,
}

impl ContainerRef {
    /// The first 12 characters of the id, as `podman ps` and `docker ps` print it.
    pub fn short_id(&self) -> &str {
        let end = self
            .id
            .char_indices()
            .nth(12)
            .map_or(self.id.len(), |(i, _)| i);
        &self.id[..end]
    }
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} container {}", self.engine.as_str(), self.short_id())
    }
}

/// What the container runtime's API says about a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The image reference the container was created from (`Config.Image`), e.g.
    /// `registry.example/billing:1.4`; empty for a container made from a root file system.
    pub image: String,
    pub labels: BTreeMap<String, String>,
}

/// Whether the runtime was asked about a container, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meta {
    /// No rule needs it (no `container_label`, `container_image` or `container_name` key).
    NotAsked,
    Known(Arc<ContainerMeta>),
    /// The runtime could not say (unreachable, or does not know the id): why.
    Unavailable(Arc<str>),
}

/// A caller's container: what its cgroup proves and what the runtime said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub reference: ContainerRef,
    pub meta: Meta,
}

impl Container {
    pub fn known(&self) -> Option<&ContainerMeta> {
        match &self.meta {
            Meta::Known(meta) => Some(meta),
            Meta::NotAsked | Meta::Unavailable(_) => None,
        }
    }
}

/// The container that cgroup component `name` is, given the path of its parent; `None` if it
/// is not a container's cgroup in any layout this daemon knows.
///
/// Layouts (cgroup v2 paths):
/// - podman: `/libpod_parent/libpod-<id>` (cgroupfs), `/machine.slice/libpod-<id>.scope`
///   (systemd); never `libpod-conmon-<id>`, the runtime's monitor.
/// - Docker: `/system.slice/docker-<id>.scope` (systemd), `/docker/<id>` (cgroupfs).
/// - containerd and CRI-O: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`
///   under `kubepods…pod<uid>.slice`; `/kubepods/<class>/pod<uid>/<id>` (cgroupfs).
/// - systemd-nspawn: `/machine.slice/machine-<name>.scope`.
pub fn recognise(parent: &str, name: &str) -> Option<(Engine, String)> {
    let scope = name.strip_suffix(".scope");
    let stem = scope.unwrap_or(name);
    if let Some(id) = stem.strip_prefix("libpod-") {
        return is_full_id(id).then(|| (Engine::Podman, id.to_owned()));
    }
    if let Some(id) = scope.and_then(|s| s.strip_prefix("docker-")) {
        return is_full_id(id).then(|| (Engine::Docker, id.to_owned()));
    }
    if let Some(id) = scope.and_then(|s| {
        s.strip_prefix("cri-containerd-")
            .or_else(|| s.strip_prefix("crio-"))
    }) {
        return is_full_id(id).then(|| (Engine::Cri, id.to_owned()));
    }
    if let Some(machine) = scope.and_then(|s| s.strip_prefix("machine-")) {
        let machine = unescape_unit(machine);
        return (!machine.is_empty()).then_some((Engine::Nspawn, machine));
    }
    let parent_name = parent.rsplit('/').next().unwrap_or("");
    if parent == "/docker" && is_full_id(name) {
        return Some((Engine::Docker, name.to_owned()));
    }
    if parent.starts_with("/kubepods") && parent_name.starts_with("pod") && is_full_id(name) {
        return Some((Engine::Cri, name.to_owned()));
    }
    None
}

/// 64 lower-case hex digits: the full id every OCI runtime here uses.
fn is_full_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// systemd's `\xNN` escapes in a unit name (`machine-my\x2dbox.scope` is machine `my-box`).
fn unescape_unit(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes.get(i + 1) == Some(&b'x')
            && let Some(byte) = name
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";

    #[test]
    fn recognises_each_runtime_layout() {
        let cases = [
            ("/libpod_parent", format!("libpod-{ID}"), Engine::Podman),
            (
                "/machine.slice",
                format!("libpod-{ID}.scope"),
                Engine::Podman,
            ),
            (
                "/system.slice",
                format!("docker-{ID}.scope"),
                Engine::Docker,
            ),
            ("/docker", ID.to_owned(), Engine::Docker),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice",
                format!("cri-containerd-{ID}.scope"),
                Engine::Cri,
            ),
            (
                "/kubepods.slice/kubepods-pod12_34.slice",
                format!("crio-{ID}.scope"),
                Engine::Cri,
            ),
            ("/kubepods/burstable/pod1234-56", ID.to_owned(), Engine::Cri),
        ];
        for (parent, name, engine) in cases {
            assert_eq!(
                recognise(parent, &name),
                Some((engine, ID.to_owned())),
                "{parent}/{name}"
            );
        }
        assert_eq!(
            recognise("/machine.slice", r"machine-my\x2dbox.scope"),
            Some((Engine::Nspawn, "my-box".to_owned()))
        );
    }

    #[test]
    fn monitors_short_ids_and_lookalikes_are_not_containers() {
        for (parent, name) in [
            ("/machine.slice", format!("libpod-conmon-{ID}.scope")),
            ("/libpod_parent", format!("libpod-{}", &ID[..12])),
            ("/libpod_parent", format!("libpod-{}", ID.to_uppercase())),
            ("/system.slice", format!("docker-{ID}")),
            ("/system.slice", "docker.service".to_owned()),
            ("/", ID.to_owned()),
            ("/kubepods/burstable", ID.to_owned()),
            ("/machine.slice", "machine-.scope".to_owned()),
        ] {
            assert_eq!(recognise(parent, &name), None, "{parent}/{name}");
        }
    }
}

//! cgroup v2 paths: maps the cgroup id the kernel reports for a socket to its path (relative to
//! the cgroup2 mount, e.g. `/system.slice/billing.service`) and derives the systemd unit.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Resolves cgroup ids to paths by walking the cgroup2 hierarchy. The id of a cgroup is the
/// inode number of its directory, so one walk indexes every cgroup; a miss (a cgroup created
/// since) triggers one more walk.
pub struct CgroupIndex {
    root: Option<PathBuf>,
    by_id: Mutex<HashMap<u64, String>>,
}

/// A walk never descends further than this (cgroup.max.depth is unlimited by default; real
/// hierarchies are a handful deep).
const MAX_DEPTH: usize = 32;

impl CgroupIndex {
    pub fn new() -> Self {
        Self::with_root(cgroup2_mount())
    }

    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The path of cgroup `id` if it is already indexed: never walks the tree.
    pub fn cached_path_of(&self, id: u64) -> Option<String> {
        self.by_id
            .lock()
            .expect("cgroup index lock")
            .get(&id)
            .cloned()
    }

    /// The path of cgroup `id`, if it exists.
    pub fn path_of(&self, id: u64) -> Option<String> {
        if let Some(p) = self.cached_path_of(id) {
            return Some(p);
        }
        let root = self.root.as_ref()?;
        let mut fresh = HashMap::new();
        walk(root, root, 0, &mut fresh);
        let found = fresh.get(&id).cloned();
        *self.by_id.lock().expect("cgroup index lock") = fresh;
        found
    }
}

impl Default for CgroupIndex {
    fn default() -> Self {
        Self::new()
    }
}

fn walk(root: &Path, dir: &Path, depth: usize, out: &mut HashMap<u64, String>) {
    let Ok(meta) = fs::metadata(dir) else { return };
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    out.insert(meta.ino(), format!("/{}", rel.display()));
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), depth + 1, out);
        }
    }
}

/// The first cgroup2 mount point in this mount namespace (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // "... mount_point ... - fstype source options"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The cgroup v2 path of a process, from `/proc/<pid>/cgroup` (`0::/path`).
pub fn path_of_pid(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The systemd unit a cgroup belongs to: the deepest path component that names a service or
/// scope (`/system.slice/billing.service/worker` → `billing.service`).
pub fn unit_of(path: &str) -> Option<String> {
    path.split('/')
        .rfind(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_the_deepest_service_or_scope() {
        assert_eq!(
            unit_of("/system.slice/billing.service").as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            unit_of("/system.slice/billing.service/worker").as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/run-1.scope")
                .as_deref(),
            Some("run-1.scope")
        );
        assert_eq!(unit_of("/system.slice"), None);
        assert_eq!(unit_of("/"), None);
    }

    #[test]
    fn index_maps_directory_inodes_to_paths() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("system.slice/a.service")).unwrap();
        let ino = fs::metadata(dir.path().join("system.slice/a.service"))
            .unwrap()
            .ino();
        let index = CgroupIndex::with_root(Some(dir.path().to_owned()));
        assert_eq!(
            index.path_of(ino).as_deref(),
            Some("/system.slice/a.service")
        );
        // A cgroup created later is found by the re-walk on miss, and only by it.
        fs::create_dir_all(dir.path().join("system.slice/b.service")).unwrap();
        let ino_b = fs::metadata(dir.path().join("system.slice/b.service"))
            .unwrap()
            .ino();
        assert_eq!(index.cached_path_of(ino_b), None);
        assert_eq!(
            index.path_of(ino_b).as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(
            index.cached_path_of(ino_b).as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(index.path_of(1 << 60), None);
    }
}

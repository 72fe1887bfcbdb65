//! cgroup v2 paths: maps the cgroup id the kernel reports for a socket to its path (relative to
//! the cgroup2 mount, e.g. `/system.slice/billing.service`) and derives the systemd unit.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::container::{self, ContainerRef};

/// Resolves cgroup ids to paths by walking the cgroup2 hierarchy. The id of a cgroup is the
/// inode number of its directory, so one walk indexes every cgroup; a miss (a cgroup created
/// since) triggers one more walk.
///
/// Bound: each walk replaces the index, so it holds the cgroups that existed at the last walk
/// and no more (a removed cgroup goes at the next walk). That is capped by the kernel
/// (`cgroup.max.descendants`), which spends far more memory on each cgroup than its entry here.
pub struct CgroupIndex {
    root: Option<PathBuf>,
    by_id: Mutex<HashMap<u64, Arc<CgroupInfo>>>,
    /// One walk at a time: callers in cgroups created since the last walk (which anyone with a
    /// delegated subtree can make) share one walk instead of each starting their own.
    walking: Mutex<()>,
}

/// What the daemon knows about one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Relative to the cgroup2 mount, e.g. `/system.slice/billing.service`.
    pub path: String,
    pub units: Units,
    /// The container this cgroup is (or is inside), when root made it (see
    /// [`crate::identity::container`]).
    pub container: Option<ContainerRef>,
}

/// The systemd units a cgroup belongs to, as far as the managers that named them are trusted.
///
/// A unit name is an identity only where the manager that owns the name is: the system
/// manager's units are the shallowest `.service`/`.scope` component whose ancestors only root
/// controls (owned by root, not writable by group or others, not delegated). Everything below a
/// delegated unit (`user@1001.service`, a container runtime's scope) is named by whoever the
/// subtree was delegated to, so a `billing.service` in there proves nothing about the system's
/// `billing.service`; it is a *user* unit of the user manager that owns it, and only ever
/// matched together with that manager's uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Units {
    /// The unit of the system manager.
    pub system: Option<String>,
    /// `(uid, unit)`: the unit of uid's user manager, when `system` is `user@uid.service`.
    pub user: Option<(u32, String)>,
}

/// A walk never descends further than this (cgroup.max.depth is unlimited by default; real
/// hierarchies are a handful deep).
const MAX_DEPTH: usize = 32;

/// The extended attributes systemd puts on a cgroup it delegated (`Delegate=yes`): `trusted.`
/// (readable with CAP_SYS_ADMIN) and, since v252, `user.` (readable by anyone).
const DELEGATE_XATTRS: [&str; 2] = ["trusted.delegate", "user.delegate"];

impl CgroupIndex {
    pub fn new() -> Self {
        Self::with_root(cgroup2_mount())
    }

    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            by_id: Mutex::new(HashMap::new()),
            walking: Mutex::new(()),
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Cgroup `id` if it is already indexed: never walks the tree.
    pub fn cached(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        self.by_id
            .lock()
            .expect("cgroup index lock")
            .get(&id)
            .cloned()
    }

    /// Cgroup `id`, if it exists.
    pub fn lookup(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        if let Some(info) = self.cached(id) {
            return Some(info);
        }
        let root = self.root.as_ref()?;
        let _one_walk = self.walking.lock().expect("cgroup walk lock");
        // Another caller's walk may have indexed it while this one waited.
        if let Some(info) = self.cached(id) {
            return Some(info);
        }
        let mut fresh = HashMap::new();
        if let Ok(meta) = fs::symlink_metadata(root) {
            walk(root, Node::root(root, &meta), 0, &mut fresh);
        }
        let found = fresh.get(&id).cloned();
        metrics::gauge!(crate::metrics::CALLER_STATE, "map" => "cgroup_index")
            .set(fresh.len() as f64);
        *self.by_id.lock().expect("cgroup index lock") = fresh;
        found
    }

    /// The top directories of the subtrees that someone other than root controls (delegated,
    /// owned by another user, or writable by others): whoever controls one names everything
    /// in it. For `check`; walks the whole tree.
    pub fn foreign_subtrees(&self) -> Vec<String> {
        fn visit(root: &Path, node: &Node, depth: usize, out: &mut Vec<String>) {
            let dir = root.join(node.path.trim_start_matches('/'));
            let Ok(entries) = fs::read_dir(&dir) else {
                return;
            };
            for entry in entries.flatten() {
                let (Ok(meta), Some(name)) = (
                    entry.metadata(),
                    entry.file_name().to_str().map(str::to_owned),
                ) else {
                    continue;
                };
                if !meta.is_dir() {
                    continue;
                }
                let child = node.child(&name, &entry.path(), &meta);
                if !child.root_only {
                    out.push(child.path);
                } else if depth < MAX_DEPTH {
                    visit(root, &child, depth + 1, out);
                }
            }
        }
        let mut out = Vec::new();
        if let Some(root) = &self.root
            && let Ok(meta) = fs::symlink_metadata(root)
        {
            let top = Node::root(root, &meta);
            if top.root_only {
                visit(root, &top, 0, &mut out);
            } else {
                out.push(top.path);
            }
        }
        out
    }

    /// What the cgroup at `path` (relative to the mount) is, checked on disk from the root
    /// down; for a path read from `/proc/<pid>/cgroup` rather than found by id.
    pub fn info_on_disk(&self, path: &str) -> CgroupInfo {
        let unknown = || CgroupInfo {
            path: path.to_owned(),
            units: Units::default(),
            container: None,
        };
        let Some(root) = &self.root else {
            return unknown();
        };
        let Ok(meta) = fs::symlink_metadata(root) else {
            return unknown();
        };
        let mut node = Node::root(root, &meta);
        let mut dir = root.clone();
        for name in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(name);
            let Ok(meta) = fs::symlink_metadata(&dir) else {
                return unknown();
            };
            node = node.child(name, &dir, &meta);
        }
        CgroupInfo {
            path: node.path,
            units: node.units,
            container: node.container,
        }
    }
}

impl Default for CgroupIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// One directory of the walk: its path, whether only root controls it and every ancestor,
/// and the units found so far.
struct Node {
    path: String,
    root_only: bool,
    units: Units,
    container: Option<ContainerRef>,
}

impl Node {
    fn root(dir: &Path, meta: &fs::Metadata) -> Self {
        Node {
            path: "/".into(),
            root_only: root_only(dir, meta),
            units: Units::default(),
            container: None,
        }
    }

    fn child(&self, name: &str, dir: &Path, meta: &fs::Metadata) -> Node {
        let path = if self.path == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.path)
        };
        // The shallowest container wins: what runs inside one may make cgroups of its own.
        let container = match &self.container {
            Some(outer) => Some(outer.clone()),
            None if self.root_only => {
                container::recognise(&self.path, name).map(|(engine, id)| ContainerRef {
                    engine,
                    id: id.into(),
                    cgroup: path.as_str().into(),
                })
            }
            None => None,
        };
        Node {
            root_only: self.root_only && root_only(dir, meta),
            units: self.units.below(self.root_only, name),
            container,
            path,
        }
    }
}

/// Whether only root can change what is in `dir`: owned by root, writable by nobody else, and
/// not a subtree systemd delegated.
fn root_only(dir: &Path, meta: &fs::Metadata) -> bool {
    meta.uid() == 0 && meta.mode() & 0o022 == 0 && !delegated(dir)
}

fn delegated(dir: &Path) -> bool {
    let mut value = [0u8; 8];
    DELEGATE_XATTRS.iter().any(|name| {
        rustix::fs::getxattr(dir, *name, &mut value[..])
            .is_ok_and(|n| n == 0 || value[..n] != *b"0")
    })
}

fn is_unit(name: &str) -> bool {
    name.ends_with(".service") || name.ends_with(".scope")
}

impl Units {
    /// The units of a child cgroup named `name` of a cgroup with these units, whose parent is
    /// controlled by root only if `parent_root_only`.
    fn below(&self, parent_root_only: bool, name: &str) -> Units {
        match &self.system {
            None if parent_root_only && is_unit(name) => Units {
                system: Some(name.to_owned()),
                user: None,
            },
            None => Units::default(),
            Some(system) if self.user.is_none() && is_unit(name) => Units {
                system: Some(system.clone()),
                user: user_manager_uid(system).map(|uid| (uid, name.to_owned())),
            },
            Some(_) => self.clone(),
        }
    }

    /// The units of a cgroup path, assuming what systemd's own layout implies: only root
    /// controls the slices above the first unit. For paths the daemon cannot inspect
    /// (`explain --cgroup` with a path that does not exist here).
    pub fn by_name(path: &str) -> Units {
        path.split('/')
            .filter(|c| !c.is_empty())
            .fold(
                (Units::default(), true),
                |(units, parent_root_only), name| {
                    let child = units.below(parent_root_only, name);
                    (child, parent_root_only && !is_unit(name))
                },
            )
            .0
    }
}

/// `1001` for `user@1001.service`, the unit systemd runs uid 1001's user manager in.
fn user_manager_uid(unit: &str) -> Option<u32> {
    unit.strip_prefix("user@")?
        .strip_suffix(".service")?
        .parse()
        .ok()
}

fn walk(root: &Path, node: Node, depth: usize, out: &mut HashMap<u64, Arc<CgroupInfo>>) {
    let dir = root.join(node.path.trim_start_matches('/'));
    let Ok(meta) = fs::symlink_metadata(&dir) else {
        return;
    };
    let ino = meta.ino();
    let children = if depth < MAX_DEPTH {
        fs::read_dir(&dir).ok()
    } else {
        None
    };
    for entry in children.into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let child = node.child(&name, &entry.path(), &meta);
        walk(root, child, depth + 1, out);
    }
    out.insert(
        ino,
        Arc::new(CgroupInfo {
            path: node.path,
            units: node.units,
            container: node.container,
        }),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_of(path: &str) -> Option<String> {
        Units::by_name(path).system
    }

    fn path_of(index: &CgroupIndex, id: u64) -> Option<String> {
        index.lookup(id).map(|info| info.path.clone())
    }

    fn cached_path_of(index: &CgroupIndex, id: u64) -> Option<String> {
        index.cached(id).map(|info| info.path.clone())
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_system_unit_is_the_shallowest_service_or_scope() {
        assert_eq!(
            unit_of("/system.slice/billing.service").as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            unit_of("/system.slice/billing.service/worker/x.scope").as_deref(),
            Some("billing.service")
        );
        assert_eq!(unit_of("/system.slice"), None);
        assert_eq!(unit_of("/"), None);
    }

    /// The security review's finding: `systemd-run --user --unit=billing` makes this path
    /// without any root help; it is uid 1000's unit, never the system's billing.service.
    #[test]
    fn a_unit_inside_a_user_manager_is_that_users_unit() {
        let units = Units::by_name(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/billing.service/sub.scope",
        );
        assert_eq!(units.system.as_deref(), Some("user@1000.service"));
        assert_eq!(units.user, Some((1000, "billing.service".into())));
        assert_eq!(
            Units::by_name("/user.slice/user-1000.slice/user@1000.service/init.scope").user,
            Some((1000, "init.scope".into()))
        );
        assert_eq!(
            Units::by_name("/user.slice/user-1000.slice/session-3.scope"),
            Units {
                system: Some("session-3.scope".into()),
                user: None
            }
        );
        // Only the manager of a `user@UID.service` names user units.
        assert_eq!(
            Units::by_name("/system.slice/docker-1.scope/system.slice/billing.service").user,
            None
        );
    }

    fn mkdirs(root: &Path, path: &str) -> PathBuf {
        let dir = root.join(path);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Units under a directory that someone other than root controls are nobody's: its owner
    /// could have named them anything.
    #[test]
    fn no_system_unit_below_a_directory_root_does_not_control() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let index = CgroupIndex::with_root(Some(root.to_owned()));
        mkdirs(root, "system.slice/billing.service");
        assert_eq!(
            index
                .info_on_disk("/system.slice/billing.service")
                .units
                .system
                .as_deref(),
            Some("billing.service")
        );

        let owned = mkdirs(root, "lxc.payload.c1/system.slice/billing.service");
        std::os::unix::fs::chown(root.join("lxc.payload.c1"), Some(100_000), None).unwrap();
        let writable = mkdirs(root, "open.slice/billing.service");
        fs::set_permissions(root.join("open.slice"), fs::Permissions::from_mode(0o777)).unwrap();
        let delegated = mkdirs(root, "deleg/billing.service");
        rustix::fs::setxattr(
            root.join("deleg"),
            "user.delegate",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("user xattrs on the test's file system");
        for path in [
            "/lxc.payload.c1/system.slice/billing.service",
            "/open.slice/billing.service",
            "/deleg/billing.service",
        ] {
            assert_eq!(index.info_on_disk(path).units, Units::default(), "{path}");
        }
        // The index built by the walk agrees with the path-by-path check.
        for (dir, path) in [
            (&owned, "/lxc.payload.c1/system.slice/billing.service"),
            (&writable, "/open.slice/billing.service"),
            (&delegated, "/deleg/billing.service"),
        ] {
            let info = index.lookup(fs::metadata(dir).unwrap().ino()).unwrap();
            assert_eq!((info.path.as_str(), &info.units), (path, &Units::default()));
        }
        let ok = root.join("system.slice/billing.service");
        let info = index.lookup(fs::metadata(ok).unwrap().ino()).unwrap();
        assert_eq!(info.units.system.as_deref(), Some("billing.service"));

        let mut foreign = index.foreign_subtrees();
        foreign.sort();
        assert_eq!(foreign, ["/deleg", "/lxc.payload.c1", "/open.slice"]);
    }

    /// The security boundary of container identity: a container is whoever root's runtime
    /// made it, never a cgroup named like one in a subtree a user controls.
    #[test]
    fn containers_only_where_root_made_the_cgroup() {
        const ID: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let index = CgroupIndex::with_root(Some(root.to_owned()));
        let real = mkdirs(root, &format!("libpod_parent/libpod-{ID}/inner"));
        let rootless = mkdirs(
            root,
            &format!("user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
        );
        std::os::unix::fs::chown(
            root.join("user.slice/user-1000.slice/user@1000.service"),
            Some(1000),
            None,
        )
        .unwrap();
        let delegated = mkdirs(root, &format!("deleg/docker-{ID}.scope"));
        rustix::fs::setxattr(
            root.join("deleg"),
            "user.delegate",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("user xattrs on the test's file system");

        let info = index.lookup(fs::metadata(&real).unwrap().ino()).unwrap();
        let container = info.container.as_ref().expect("root's podman container");
        assert_eq!(
            (container.engine, &*container.id, &*container.cgroup),
            (
                super::container::Engine::Podman,
                ID,
                format!("/libpod_parent/libpod-{ID}").as_str()
            ),
            "a cgroup inside the container is still the container"
        );
        for dir in [&rootless, &delegated] {
            let info = index.lookup(fs::metadata(dir).unwrap().ino()).unwrap();
            assert_eq!(info.container, None, "{}", info.path);
            assert_eq!(index.info_on_disk(&info.path).container, None);
        }
        assert_eq!(
            index
                .info_on_disk(&format!("/libpod_parent/libpod-{ID}"))
                .container
                .map(|c| c.id),
            Some(ID.into())
        );
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
            path_of(&index, ino).as_deref(),
            Some("/system.slice/a.service")
        );
        // A cgroup created later is found by the re-walk on miss, and only by it.
        fs::create_dir_all(dir.path().join("system.slice/b.service")).unwrap();
        let ino_b = fs::metadata(dir.path().join("system.slice/b.service"))
            .unwrap()
            .ino();
        assert_eq!(cached_path_of(&index, ino_b), None);
        assert_eq!(
            path_of(&index, ino_b).as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(
            cached_path_of(&index, ino_b).as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(path_of(&index, 1 << 60), None);
    }

    #[test]
    fn the_index_holds_what_exists_at_the_last_walk_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("system.slice/live.service");
        fs::create_dir_all(&live).unwrap();
        let live_ino = fs::metadata(&live).unwrap().ino();
        // A user makes 3,000 cgroups in a delegated subtree and connects from each.
        let flood = dir.path().join("user.slice/user-1000.slice/flood");
        let mut inos = Vec::new();
        for n in 0..3000 {
            let d = flood.join(format!("c{n}"));
            fs::create_dir_all(&d).unwrap();
            inos.push(fs::metadata(&d).unwrap().ino());
        }
        let index = CgroupIndex::with_root(Some(dir.path().to_owned()));
        assert!(path_of(&index, inos[2999]).is_some());
        let len = || index.by_id.lock().unwrap().len();
        assert_eq!(len(), 3000 + 6);
        // It removes them; the next miss (a new cgroup) walks again and they are gone. (Made
        // first: a test directory's inode may be reused, a cgroup's id never is.)
        let new = dir.path().join("system.slice/new.service");
        fs::create_dir(&new).unwrap();
        fs::remove_dir_all(&flood).unwrap();
        assert!(path_of(&index, fs::metadata(&new).unwrap().ino()).is_some());
        assert_eq!(len(), 6);
        assert!(cached_path_of(&index, inos[0]).is_none());
        assert_eq!(
            cached_path_of(&index, live_ino).as_deref(),
            Some("/system.slice/live.service")
        );
    }
}

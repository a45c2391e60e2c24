//! Pods in the cgroup tree: the kubelet names each pod's cgroup after the pod's UID, so the
//! agent finds the cgroups of a pod it learnt from the API server without asking the
//! container runtime. Every cgroup at or under a pod's cgroup (containers, the pause sandbox,
//! CRI-O's conmon, anything a container nests) belongs to that pod.
//!
//! The layouts (cgroup v2; `<uid_>` is the UID with `_` for `-`):
//!
//! | driver   | QoS        | pod cgroup |
//! |----------|------------|------------|
//! | systemd  | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | systemd  | Burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | systemd  | BestEffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>` |
//! | cgroupfs | Burstable  | `kubepods/burstable/pod<uid>` |
//! | cgroupfs | BestEffort | `kubepods/besteffort/pod<uid>` |
//!
//! with containers below: `cri-containerd-<id>.scope`, `crio-<id>.scope` (and
//! `crio-conmon-<id>.scope`), `docker-<id>.scope`, or the plain `<id>` (cgroupfs). The kubelet's
//! `--cgroup-root` can put all of it deeper: kind nests it under
//! `kubelet.slice/kubelet-kubepods.slice/...` (systemd slice names repeat their parents).
//!
//! A pod cgroup is recognised by its name *and* its place: its parent must be the QoS
//! cgroup of the same driver and class, and nothing inside a pod is read as another pod.
//! A container that can create cgroups below its own (delegation, systemd in a container)
//! therefore cannot name one after another pod's UID and take that pod's identity.
//!
//! [`Watcher`] watches the tree with inotify so that a container started in a running pod
//! is mapped within milliseconds; the agent's periodic re-resolve stays as the backstop
//! (inotify can overflow, hit its watch limit, or fail).

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt};
use inotify::{EventMask, Inotify, WatchMask, Watches};
use serde::Serialize;
use tokio::sync::Notify;

/// The kubelet's cgroup driver, as the pod cgroup's name tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// `--cgroup-driver=systemd`: `.slice` units whose names repeat their parents'.
    Systemd,
    /// `--cgroup-driver=cgroupfs`: plain directories.
    Cgroupfs,
}

/// A pod's QoS class (Kubernetes `status.qosClass`), which decides the pod cgroup's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Qos {
    /// Directly under the kubepods cgroup.
    Guaranteed,
    /// Under `burstable` / `kubepods-burstable.slice`.
    Burstable,
    /// Under `besteffort` / `kubepods-besteffort.slice`.
    BestEffort,
}

/// A pod cgroup's name, parsed: the pod's `metadata.uid` and where the kubelet put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDir {
    /// The pod's UID as the API server spells it (`-`, lowercase).
    pub uid: String,
    pub driver: Driver,
    pub qos: Qos,
}

/// The pod UID a cgroup directory name carries, by the name alone, for either driver:
/// `kubepods-burstable-pod1b4e..._4f1c.slice` and `pod1b4e...-4f1c` both give `1b4e...-4f1c`.
/// `None` for anything else. The agent also checks the directory's place ([`pod_dir`]).
pub fn pod_uid(name: &str) -> Option<String> {
    parse_systemd(name)
        .map(|(_, uid)| uid)
        .or_else(|| parse_cgroupfs(name))
}

/// The pod cgroup `name`, given the names of its parent and grandparent directories, or
/// `None` when `name` is not a pod cgroup where it stands (a name that looks like one in
/// the wrong place is not one).
pub fn pod_dir(grandparent: Option<&str>, parent: &str, name: &str) -> Option<PodDir> {
    if let Some((prefix, uid)) = parse_systemd(name) {
        // Slice names repeat their parent's: `X-pod<uid>.slice` lives in `X.slice`.
        if parent.strip_suffix(".slice") != Some(prefix) {
            return None;
        }
        let qos = if prefix_is(prefix, "kubepods") {
            Qos::Guaranteed
        } else if prefix_is(prefix, "kubepods-burstable") {
            Qos::Burstable
        } else if prefix_is(prefix, "kubepods-besteffort") {
            Qos::BestEffort
        } else {
            return None;
        };
        return Some(PodDir {
            uid,
            driver: Driver::Systemd,
            qos,
        });
    }
    let uid = parse_cgroupfs(name)?;
    let qos = match (parent, grandparent) {
        ("kubepods", _) => Qos::Guaranteed,
        ("burstable", Some("kubepods")) => Qos::Burstable,
        ("besteffort", Some("kubepods")) => Qos::BestEffort,
        _ => return None,
    };
    Some(PodDir {
        uid,
        driver: Driver::Cgroupfs,
        qos,
    })
}

/// `prefix` is `unit` or ends with `-unit` (kind's `kubelet-kubepods`).
fn prefix_is(prefix: &str, unit: &str) -> bool {
    prefix == unit
        || prefix
            .strip_suffix(unit)
            .is_some_and(|head| head.ends_with('-'))
}

/// `<prefix>-pod<uid_>.slice` -> (prefix, uid with `-`).
fn parse_systemd(name: &str) -> Option<(&str, String)> {
    let stem = name.strip_suffix(".slice")?;
    let at = stem.rfind("-pod")?;
    let (prefix, uid) = (&stem[..at], &stem[at + "-pod".len()..]);
    is_uid(uid, '_').then(|| (prefix, uid.replace('_', "-")))
}

/// `pod<uid>` -> uid.
fn parse_cgroupfs(name: &str) -> Option<String> {
    let uid = name.strip_prefix("pod")?;
    is_uid(uid, '-').then(|| uid.to_string())
}

/// A Kubernetes pod UID: an RFC 4122 UUID in lowercase (`8-4-4-4-12` hex digits, with `sep`
/// as the kubelet writes it), or the 32 hex digits the kubelet gives a static pod (the
/// hash of its manifest).
fn is_uid(text: &str, sep: char) -> bool {
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    match text.len() {
        32 => text.chars().all(hex),
        36 => text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == sep,
            _ => hex(c),
        }),
        _ => false,
    }
}

/// A container runtime, as a container cgroup's name tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A plain `<id>` (cgroupfs driver): containerd, or any runtime that names it so.
    Unnamed,
}

/// A container cgroup's name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDir {
    pub runtime: Runtime,
    /// The container ID (64 lowercase hex digits).
    pub id: String,
    /// CRI-O's `crio-conmon-<id>`: the monitor process of container `id`, not the container.
    pub conmon: bool,
}

/// The container a cgroup directory name stands for: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `crio-conmon-<id>.scope`, `docker-<id>.scope`, the same without
/// `.scope` (cgroupfs), or the plain `<id>`. Informational: the agent maps every cgroup under a
/// pod, whatever its name.
pub fn container_dir(name: &str) -> Option<ContainerDir> {
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    let (runtime, conmon, id) = if let Some(id) = stem.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, false, id)
    } else if let Some(id) = stem.strip_prefix("crio-conmon-") {
        (Runtime::CriO, true, id)
    } else if let Some(id) = stem.strip_prefix("crio-") {
        (Runtime::CriO, false, id)
    } else if let Some(id) = stem.strip_prefix("docker-") {
        (Runtime::Docker, false, id)
    } else if stem.len() == name.len() {
        (Runtime::Unnamed, false, stem)
    } else {
        return None;
    };
    let is_id = id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    is_id.then(|| ContainerDir {
        runtime,
        id: id.to_string(),
        conmon,
    })
}

/// How far [`scan`] and the [`Watcher`] go: a bound on the work one pass can cost, whatever
/// the cgroup tree holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Directory levels below the root (the kind layout puts containers 5 deep).
    pub max_depth: usize,
    /// Directories visited in one scan.
    pub max_dirs: usize,
    /// Directories of one pod (its pod cgroup and everything under it) in one scan. A
    /// container that can create cgroups (delegation, a privileged or systemd container)
    /// could otherwise fill `max_dirs` alone and leave every other pod of the node out of
    /// the scan, unmapped (denied). Beyond it only that pod's extra cgroups are unmapped.
    pub max_dirs_per_pod: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_dirs: 131_072,
            // 110 pods (the kubelet's default `--max-pods`) fit in `max_dirs` at this bound.
            max_dirs_per_pod: 1024,
        }
    }
}

/// The cgroups of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod cgroup (more than one only if the kubelet left a stale one in another QoS
    /// class: both are the pod's).
    pub paths: Vec<PathBuf>,
    pub driver: Driver,
    pub qos: Qos,
    /// Every cgroup at or under the pod cgroup that lies under the scanned root: path ->
    /// cgroup ID (the directory's inode, what `bpf_get_current_cgroup_id` returns).
    pub cgroups: BTreeMap<PathBuf, u64>,
}

/// What one [`scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Pod UID -> its cgroups.
    pub pods: BTreeMap<String, PodCgroup>,
    /// Directories visited.
    pub visited: usize,
    /// Why the scan stopped early, when a [`Limits`] bound was hit: the result is partial.
    pub truncated: Option<String>,
}

/// Walks the tree under `root` (an absolute path inside the cgroup v2 mount) and finds every
/// pod cgroup and every cgroup at or under each. A directory that disappears meanwhile is
/// skipped (pods come and go). If `root` itself lies inside a pod cgroup, everything under
/// it is that pod's.
///
/// Errors: `root` cannot be read.
pub fn scan(root: &Path, limits: Limits) -> Result<Scan> {
    let mut scan = Scan::default();
    let root_id = crate::fs::cgroup_id(root)
        .with_context(|| format!("reading the cgroup root {}", root.display()))?;
    let names: Vec<String> = root
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    // The root may itself lie inside a pod: the outermost pod among its ancestors owns it
    // (nothing inside a pod is another pod).
    let mut enclosing = None;
    for i in 1..names.len() {
        let grandparent = i.checked_sub(2).map(|g| names[g].as_str());
        if let Some(pod) = pod_dir(grandparent, &names[i - 1], &names[i]) {
            let path: PathBuf = names[..=i].iter().collect();
            enclosing = Some((pod, path));
            break;
        }
    }
    struct Dir {
        path: PathBuf,
        id: u64,
        depth: usize,
        /// The pod this directory belongs to.
        pod: Option<String>,
    }
    // Directories of each pod taken so far (pushed on the stack), for `max_dirs_per_pod`.
    let mut per_pod: HashMap<String, usize> = HashMap::new();
    let mut stack = vec![Dir {
        path: root.to_path_buf(),
        id: root_id,
        depth: 0,
        pod: None,
    }];
    if let Some((pod, path)) = enclosing {
        scan.pods.insert(
            pod.uid.clone(),
            PodCgroup {
                paths: vec![path],
                driver: pod.driver,
                qos: pod.qos,
                cgroups: BTreeMap::new(),
            },
        );
        stack[0].pod = Some(pod.uid);
    }
    while let Some(dir) = stack.pop() {
        scan.visited += 1;
        if let Some(uid) = &dir.pod {
            if let Some(pod) = scan.pods.get_mut(uid) {
                pod.cgroups.insert(dir.path.clone(), dir.id);
            }
        }
        if dir.depth >= limits.max_depth {
            scan.truncated.get_or_insert_with(|| {
                format!(
                    "{} is {} levels below the cgroup root: not descended (bound {})",
                    dir.path.display(),
                    dir.depth,
                    limits.max_depth
                )
            });
            continue;
        }
        let entries = match std::fs::read_dir(&dir.path) {
            Ok(entries) => entries,
            Err(error) if error.kind() == ErrorKind::NotFound => continue,
            Err(error) => {
                tracing::debug!(path = %dir.path.display(), %error, "cgroup not readable");
                continue;
            }
        };
        let parent = file_name(&dir.path);
        let grandparent = dir.path.parent().map(file_name);
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if scan.visited + stack.len() >= limits.max_dirs {
                scan.truncated.get_or_insert_with(|| {
                    format!(
                        "more than {} cgroups under {}: the rest is not scanned",
                        limits.max_dirs,
                        root.display()
                    )
                });
                break;
            }
            if let Some(uid) = &dir.pod {
                let taken = per_pod.entry(uid.clone()).or_insert(1);
                if *taken >= limits.max_dirs_per_pod {
                    scan.truncated.get_or_insert_with(|| {
                        format!(
                            "pod {uid} has more than {} cgroups: the rest are not mapped (their processes are unknown subjects)",
                            limits.max_dirs_per_pod
                        )
                    });
                    break;
                }
                *taken += 1;
            }
            let path = entry.path();
            let Ok(id) = crate::fs::cgroup_id(&path) else {
                continue; // removed meanwhile
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let pod = match &dir.pod {
                Some(uid) => Some(uid.clone()),
                None => pod_dir(grandparent.as_deref(), &parent, &name).map(|pod| {
                    scan.pods
                        .entry(pod.uid.clone())
                        .or_insert_with(|| PodCgroup {
                            paths: Vec::new(),
                            driver: pod.driver,
                            qos: pod.qos,
                            cgroups: BTreeMap::new(),
                        })
                        .paths
                        .push(path.clone());
                    pod.uid
                }),
            };
            stack.push(Dir {
                path,
                id,
                depth: dir.depth + 1,
                pod,
            });
        }
    }
    Ok(scan)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The watches a [`Watcher`] holds at most by default: a node's cgroup tree (a few
/// thousand directories with 250 pods) fits many times; each watch costs the kernel about a
/// kilobyte and counts against `fs.inotify.max_user_watches`.
pub const DEFAULT_MAX_WATCHES: usize = 16_384;

/// What the [`Watcher`] is doing, for `enforcer status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WatchStatus {
    /// The watched subtree.
    pub root: PathBuf,
    /// Directories watched now.
    pub watches: usize,
    pub max_watches: usize,
    /// Directory creations and removals seen.
    pub events: u64,
    /// Full rescans after the kernel's event queue overflowed.
    pub rescans: u64,
    /// Why some directories are not watched (the bound, the kernel's limit) or the watcher
    /// stopped: changes there are seen by the agent's periodic re-resolve only.
    pub degraded: Option<String>,
}

/// Watches every directory of a cgroup subtree and signals when a cgroup appears or goes.
/// Dropping it stops the watch.
pub struct Watcher {
    changed: Arc<Notify>,
    status: Arc<Mutex<WatchStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching `root` (absolute) and every directory under it, at most `max_watches`
    /// of them. The subtree is watched when this returns. Must be called inside a tokio
    /// runtime.
    ///
    /// Errors: inotify is unavailable (`fs.inotify.max_user_instances` reached, no kernel
    /// support), or `root` cannot be watched.
    pub fn spawn(root: &Path, max_watches: usize) -> Result<Watcher> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mut stream = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .context("registering inotify with the tokio reactor")?;
        let status = Arc::new(Mutex::new(WatchStatus {
            root: root.to_path_buf(),
            max_watches,
            ..Default::default()
        }));
        let mut tree = Tree {
            watches: stream.watches(),
            by_wd: HashMap::new(),
            by_path: HashMap::new(),
            max_watches,
            degraded: None,
        };
        tree.watches
            .add(root, mask())
            .with_context(|| format!("watching {}", root.display()))?;
        tree.add_tree(root);
        tree.publish(&status);
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn({
            let changed = changed.clone();
            let status = status.clone();
            let root = root.to_path_buf();
            async move {
                loop {
                    let Some(first) = stream.next().await else {
                        tree.fail("the inotify stream ended".to_string(), &status);
                        return;
                    };
                    // Handle the whole burst before saying anything: one re-resolve for a pod's
                    // worth of containers.
                    let mut batch = vec![first];
                    while let Some(Some(next)) = stream.next().now_or_never() {
                        batch.push(next);
                    }
                    let mut relevant = false;
                    for event in batch {
                        match event {
                            Ok(event) => relevant |= tree.handle(&root, event, &status),
                            Err(error) => {
                                tree.fail(format!("reading inotify events: {error}"), &status);
                                changed.notify_one();
                                return;
                            }
                        }
                    }
                    tree.publish(&status);
                    if relevant {
                        changed.notify_one();
                    }
                }
            }
        });
        Ok(Watcher {
            changed,
            status,
            task,
        })
    }

    /// Resolves when the tree changed since the last call returned (a change between two
    /// calls is remembered; several coalesce into one). Cancel safe.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    pub fn status(&self) -> WatchStatus {
        self.status.lock().expect("watch status lock").clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Only directories matter: cgroups are directories, and a cgroup's own files are created with
/// it (no event in the parent).
fn mask() -> WatchMask {
    WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR | WatchMask::DONT_FOLLOW
}

/// The watcher's view of the tree: which directory each watch descriptor stands for.
struct Tree {
    watches: Watches,
    by_wd: HashMap<i32, PathBuf>,
    by_path: HashMap<PathBuf, inotify::WatchDescriptor>,
    max_watches: usize,
    degraded: Option<String>,
}

impl Tree {
    /// Watches `dir` and everything under it. The watch goes on before the listing: a child
    /// created in between is either listed or reported by the watch, never missed.
    fn add_tree(&mut self, dir: &Path) {
        let mut stack = vec![(dir.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if !self.add(&dir) {
                continue;
            }
            if depth >= Limits::default().max_depth {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }

    /// Watches one directory; false when it is not watched (gone, or a bound hit).
    fn add(&mut self, dir: &Path) -> bool {
        if self.by_path.contains_key(dir) {
            return true;
        }
        if self.by_wd.len() >= self.max_watches {
            self.degrade(format!(
                "{} directories watched, the bound: newer cgroups are found by the periodic re-resolve only",
                self.max_watches
            ));
            return false;
        }
        match self.watches.add(dir, mask()) {
            Ok(wd) => {
                let id = wd.get_watch_descriptor_id();
                // The same inode under a stale path (cannot happen on cgroup v2, which refuses
                // rename; kept exact anyway).
                if let Some(old) = self.by_wd.insert(id, dir.to_path_buf()) {
                    self.by_path.remove(&old);
                }
                self.by_path.insert(dir.to_path_buf(), wd);
                true
            }
            Err(error) if matches!(error.kind(), ErrorKind::NotFound) => false,
            Err(error) if error.raw_os_error() == Some(libc::ENOTDIR) => false,
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => {
                self.degrade(format!(
                    "the kernel's inotify watch limit is reached (fs.inotify.max_user_watches) at {} watches: newer cgroups are found by the periodic re-resolve only",
                    self.by_wd.len()
                ));
                false
            }
            Err(error) => {
                tracing::warn!(path = %dir.display(), %error, "cannot watch cgroup");
                false
            }
        }
    }

    fn remove(&mut self, dir: &Path) {
        if let Some(wd) = self.by_path.remove(dir) {
            self.by_wd.remove(&wd.get_watch_descriptor_id());
            // Already gone with the directory on most kernels (EINVAL): nothing to undo.
            let _ = self.watches.remove(wd);
        }
    }

    /// One event; true when the cgroup tree changed.
    fn handle(
        &mut self,
        root: &Path,
        event: inotify::EventOwned,
        status: &Mutex<WatchStatus>,
    ) -> bool {
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(root = %root.display(), "inotify queue overflowed: rescanning the cgroup tree");
            status.lock().expect("watch status lock").rescans += 1;
            // Forget watches of directories that are gone, then watch whatever exists.
            let gone: Vec<PathBuf> = self
                .by_path
                .keys()
                .filter(|path| !path.exists())
                .cloned()
                .collect();
            for path in gone {
                self.remove(&path);
            }
            self.degraded = None;
            self.add_tree(root);
            return true;
        }
        let id = event.wd.get_watch_descriptor_id();
        if event.mask.contains(EventMask::IGNORED) {
            if let Some(path) = self.by_wd.remove(&id) {
                self.by_path.remove(&path);
            }
            return false;
        }
        let (Some(dir), Some(name)) = (self.by_wd.get(&id), event.name.as_ref()) else {
            return false;
        };
        if !event.mask.contains(EventMask::ISDIR) {
            return false;
        }
        let path = dir.join(name);
        status.lock().expect("watch status lock").events += 1;
        if event.mask.contains(EventMask::CREATE) {
            self.add_tree(&path);
            true
        } else if event.mask.contains(EventMask::DELETE) {
            // cgroupfs does not always send IN_IGNORED when a cgroup goes: drop the watch here
            // (rmdir needs an empty cgroup, so its children went first).
            self.remove(&path);
            true
        } else {
            false
        }
    }

    fn degrade(&mut self, reason: String) {
        if self.degraded.is_none() {
            tracing::warn!("cgroup watcher: {reason}");
            self.degraded = Some(reason);
        }
    }

    fn fail(&mut self, reason: String, status: &Mutex<WatchStatus>) {
        tracing::error!("cgroup watcher stopped ({reason}); new cgroups are found by the periodic re-resolve only");
        self.degraded = Some(reason);
        self.publish(status);
    }

    fn publish(&self, status: &Mutex<WatchStatus>) {
        let mut status = status.lock().expect("watch status lock");
        status.watches = self.by_wd.len();
        status.degraded = self.degraded.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID_: &str = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";
    const STATIC: &str = "6d0c2d1e9b7a4c1f8e3a5b7c9d1e2f3a";
    const CID: &str = "4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

    fn systemd(parent: &str, name: &str) -> Option<PodDir> {
        pod_dir(Some("kubepods.slice"), parent, name)
    }

    #[test]
    fn systemd_pod_cgroups_in_every_qos_class() {
        let pod = |qos| PodDir {
            uid: UID.to_string(),
            driver: Driver::Systemd,
            qos,
        };
        assert_eq!(
            pod_dir(None, "kubepods.slice", &format!("kubepods-pod{UID_}.slice")),
            Some(pod(Qos::Guaranteed))
        );
        assert_eq!(
            systemd(
                "kubepods-burstable.slice",
                &format!("kubepods-burstable-pod{UID_}.slice")
            ),
            Some(pod(Qos::Burstable))
        );
        assert_eq!(
            systemd(
                "kubepods-besteffort.slice",
                &format!("kubepods-besteffort-pod{UID_}.slice")
            ),
            Some(pod(Qos::BestEffort))
        );
    }

    #[test]
    fn kind_nests_the_systemd_layout_under_kubelet_slice() {
        assert_eq!(
            pod_dir(
                Some("kubelet-kubepods.slice"),
                "kubelet-kubepods-besteffort.slice",
                &format!("kubelet-kubepods-besteffort-pod{UID_}.slice")
            )
            .map(|p| (p.uid, p.qos)),
            Some((UID.to_string(), Qos::BestEffort))
        );
        assert_eq!(
            pod_dir(
                Some("kubelet.slice"),
                "kubelet-kubepods.slice",
                &format!("kubelet-kubepods-pod{UID_}.slice")
            )
            .map(|p| p.qos),
            Some(Qos::Guaranteed)
        );
    }

    #[test]
    fn cgroupfs_pod_cgroups_in_every_qos_class() {
        let pod = |qos| PodDir {
            uid: UID.to_string(),
            driver: Driver::Cgroupfs,
            qos,
        };
        let name = format!("pod{UID}");
        assert_eq!(pod_dir(None, "kubepods", &name), Some(pod(Qos::Guaranteed)));
        assert_eq!(
            pod_dir(Some("kubepods"), "burstable", &name),
            Some(pod(Qos::Burstable))
        );
        assert_eq!(
            pod_dir(Some("kubepods"), "besteffort", &name),
            Some(pod(Qos::BestEffort))
        );
        // kind with the cgroupfs driver: `kubelet/kubepods/...`
        assert_eq!(
            pod_dir(Some("kubelet"), "kubepods", &name).map(|p| p.qos),
            Some(Qos::Guaranteed)
        );
    }

    #[test]
    fn static_pods_have_hash_uids() {
        assert_eq!(pod_uid(&format!("pod{STATIC}")), Some(STATIC.to_string()));
        assert_eq!(
            pod_uid(&format!("kubepods-burstable-pod{STATIC}.slice")),
            Some(STATIC.to_string())
        );
    }

    #[test]
    fn pod_uid_by_name_alone() {
        assert_eq!(
            pod_uid(&format!("kubepods-burstable-pod{UID_}.slice")),
            Some(UID.to_string())
        );
        assert_eq!(pod_uid(&format!("pod{UID}")), Some(UID.to_string()));
        for name in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "kubepods",
            "burstable",
            "pods",
            "podman",
            &format!("cri-containerd-{CID}.scope"),
            // The wrong separator for each driver.
            &format!("kubepods-pod{UID}.slice"),
            &format!("pod{UID_}"),
            // Uppercase, short, long, a non-hex digit.
            &format!("pod{}", UID.to_uppercase()),
            &format!("pod{}", &UID[1..]),
            &format!("pod{UID}0"),
            "pod1b4e28ba-2fa1-11d2-883f-0016d3cca42g",
            // The separators in the wrong places.
            "pod1b4e28ba2-fa1-11d2-883f-0016d3cca427",
            &format!("kubepods-pod{UID_}.scope"),
            &format!("kubepods-pod{UID_}"),
        ] {
            assert_eq!(pod_uid(name), None, "{name}");
        }
    }

    #[test]
    fn a_pod_name_in_the_wrong_place_is_not_a_pod() {
        let systemd_name = format!("kubepods-burstable-pod{UID_}.slice");
        // A burstable pod under the besteffort slice, or the top slice.
        assert_eq!(systemd("kubepods-besteffort.slice", &systemd_name), None);
        assert_eq!(pod_dir(None, "kubepods.slice", &systemd_name), None);
        // Inside a container (a delegated subtree naming itself after another pod).
        assert_eq!(
            pod_dir(
                Some(&format!("kubepods-pod{UID_}.slice")),
                &format!("cri-containerd-{CID}.scope"),
                &systemd_name
            ),
            None
        );
        // A slice whose name only ends like the kubelet's.
        assert_eq!(
            pod_dir(
                None,
                "notkubepods.slice",
                &format!("notkubepods-pod{UID_}.slice")
            ),
            None
        );
        assert_eq!(
            pod_dir(None, "system.slice", &format!("system-pod{UID_}.slice")),
            None
        );
        let cgroupfs_name = format!("pod{UID}");
        assert_eq!(pod_dir(Some("other"), "burstable", &cgroupfs_name), None);
        assert_eq!(pod_dir(None, "burstable", &cgroupfs_name), None);
        assert_eq!(
            pod_dir(Some("kubepods"), "guaranteed", &cgroupfs_name),
            None
        );
        assert_eq!(pod_dir(Some("kubepods"), CID, &cgroupfs_name), None);
        // The systemd name under a cgroupfs parent and the reverse.
        assert_eq!(pod_dir(None, "kubepods", &systemd_name), None);
        assert_eq!(pod_dir(None, "kubepods.slice", &cgroupfs_name), None);
    }

    #[test]
    fn container_cgroup_names() {
        let parse = |name: &str| container_dir(name).map(|c| (c.runtime, c.conmon, c.id));
        let id = CID.to_string();
        assert_eq!(
            parse(&format!("cri-containerd-{CID}.scope")),
            Some((Runtime::Containerd, false, id.clone()))
        );
        assert_eq!(
            parse(&format!("crio-{CID}.scope")),
            Some((Runtime::CriO, false, id.clone()))
        );
        assert_eq!(
            parse(&format!("crio-conmon-{CID}.scope")),
            Some((Runtime::CriO, true, id.clone()))
        );
        assert_eq!(
            parse(&format!("crio-conmon-{CID}")),
            Some((Runtime::CriO, true, id.clone()))
        );
        assert_eq!(
            parse(&format!("docker-{CID}.scope")),
            Some((Runtime::Docker, false, id.clone()))
        );
        assert_eq!(parse(CID), Some((Runtime::Unnamed, false, id.clone())));
        for name in [
            format!("{CID}.scope"),
            format!("cri-containerd-{}.scope", &CID[1..]),
            format!("podman-{CID}.scope"),
            format!("pod{UID}"),
            "init.scope".to_string(),
        ] {
            assert_eq!(container_dir(&name), None, "{name}");
        }
    }

    /// A scratch tree of plain directories (the walk reads names and inodes only, so the
    /// layouts are checked here without cgroups; the kernel tests use real ones).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("cg9-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
        fn mkdir(&self, relative: &str) -> PathBuf {
            let path = self.0.join(relative);
            std::fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ids(pod: &PodCgroup) -> Vec<&Path> {
        pod.cgroups.keys().map(|p| p.as_path()).collect()
    }

    #[test]
    fn scan_finds_every_pod_and_everything_under_it() {
        let tree = Scratch::new("scan");
        let u = |n: u8| format!("00000000-0000-0000-0000-0000000000{n:02x}");
        let s = |n: u8| u(n).replace('-', "_");
        let pods = [
            (1, format!("kubepods.slice/kubepods-pod{}.slice", s(1))),
            (
                2,
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                    s(2)
                ),
            ),
            (
                3,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                    s(3)
                ),
            ),
            (4, format!("kubepods/pod{}", u(4))),
            (5, format!("kubepods/burstable/pod{}", u(5))),
            (6, format!("kubepods/besteffort/pod{}", u(6))),
            (
                7,
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{}.slice",
                    s(7)
                ),
            ),
        ];
        for (_, pod) in &pods {
            tree.mkdir(&format!("{pod}/cri-containerd-{CID}.scope"));
            // The sandbox, a sibling leaf; and a cgroup a container nests.
            tree.mkdir(&format!("{pod}/{CID}"));
            tree.mkdir(&format!("{pod}/crio-{CID}.scope/nested/deeper"));
        }
        // Not pods: a look-alike in the wrong place, one inside a container, a system slice.
        tree.mkdir(&format!("system.slice/system-pod{}.slice", s(8)));
        tree.mkdir(&format!("kubepods/guaranteed/pod{}", u(9)));
        tree.mkdir(&format!(
            "{}/cri-containerd-{CID}.scope/kubepods.slice/kubepods-pod{}.slice",
            pods[0].1,
            s(10)
        ));
        let scan = scan(&tree.0, Limits::default()).unwrap();
        assert_eq!(scan.truncated, None);
        let found: Vec<&String> = scan.pods.keys().collect();
        let expected: Vec<String> = (1..=7).map(u).collect();
        assert_eq!(found, expected.iter().collect::<Vec<_>>());
        for (n, pod) in &pods {
            let got = &scan.pods[&u(*n)];
            assert_eq!(got.paths, vec![tree.0.join(pod)]);
            let mut want = vec![
                tree.0.join(pod),
                tree.0.join(format!("{pod}/cri-containerd-{CID}.scope")),
                tree.0.join(format!("{pod}/{CID}")),
                tree.0.join(format!("{pod}/crio-{CID}.scope")),
                tree.0.join(format!("{pod}/crio-{CID}.scope/nested")),
                tree.0.join(format!("{pod}/crio-{CID}.scope/nested/deeper")),
            ];
            if *n == 1 {
                // The nested look-alike belongs to pod 1.
                want.push(
                    tree.0
                        .join(format!("{pod}/cri-containerd-{CID}.scope/kubepods.slice")),
                );
                want.push(tree.0.join(format!(
                    "{pod}/cri-containerd-{CID}.scope/kubepods.slice/kubepods-pod{}.slice",
                    s(10)
                )));
            }
            want.sort();
            assert_eq!(
                ids(got),
                want.iter().map(|p| p.as_path()).collect::<Vec<_>>()
            );
            for (path, id) in &got.cgroups {
                assert_eq!(*id, crate::fs::cgroup_id(path).unwrap());
            }
        }
        assert_eq!(
            (scan.pods[&u(1)].driver, scan.pods[&u(1)].qos),
            (Driver::Systemd, Qos::Guaranteed)
        );
        assert_eq!(
            (scan.pods[&u(6)].driver, scan.pods[&u(6)].qos),
            (Driver::Cgroupfs, Qos::BestEffort)
        );
        assert_eq!(scan.pods[&u(7)].qos, Qos::Burstable);
    }

    #[test]
    fn a_root_inside_a_pod_is_that_pod() {
        let tree = Scratch::new("inside");
        let pod = tree.mkdir(&format!("kubepods/burstable/pod{UID}"));
        let container = tree.mkdir(&format!("kubepods/burstable/pod{UID}/{CID}"));
        let scan = scan(&container, Limits::default()).unwrap();
        let got = &scan.pods[UID];
        assert_eq!(got.paths, vec![pod]);
        assert_eq!(ids(got), vec![container.as_path()]);
    }

    #[test]
    fn scan_is_bounded() {
        let tree = Scratch::new("bounded");
        for i in 0..10 {
            tree.mkdir(&format!("kubepods/pod{}{i:02}", &UID[..34]));
        }
        let tight = Limits {
            max_dirs: 5,
            ..Limits::default()
        };
        let scan_result = scan(&tree.0, tight).unwrap();
        assert!(scan_result.visited <= 5, "{}", scan_result.visited);
        assert!(scan_result
            .truncated
            .as_deref()
            .unwrap()
            .contains("more than 5 cgroups"));
        let shallow = Limits {
            max_depth: 1,
            ..Limits::default()
        };
        let scan_result = scan(&tree.0, shallow).unwrap();
        assert!(scan_result.pods.is_empty());
        assert!(scan_result.truncated.unwrap().contains("levels below"));
        let whole = scan(&tree.0, Limits::default()).unwrap();
        assert_eq!(whole.pods.len(), 10);
        assert_eq!(whole.visited, 12);
    }

    /// Attack: a pod that can create cgroups (delegation, a privileged or systemd
    /// container) makes more than the scan's whole bound under its own pod cgroup. The other
    /// pods of the node must still be scanned (else their cgroups are unmapped: every one
    /// of their connections denied); only the flooding pod's extra cgroups are left out.
    #[test]
    fn one_pod_flooding_cgroups_leaves_the_other_pods_scanned() {
        let tree = Scratch::new("flood");
        let flooder = format!("kubepods/besteffort/pod{}", &UID[..34]);
        let uid = |i: u8| format!("{}{i:02}", &UID[..34]);
        for i in 0..60 {
            tree.mkdir(&format!("{flooder}ff/c{i:02}"));
        }
        // Victims on every side of the flooder, whatever order the directories are read in.
        for i in 0..9 {
            let qos = ["", "burstable/", "besteffort/"][usize::from(i % 3)];
            tree.mkdir(&format!("kubepods/{qos}pod{}/{CID}", uid(i)));
        }
        let limits = Limits {
            max_depth: 32,
            max_dirs: 40,
            max_dirs_per_pod: 8,
        };
        let found = scan(&tree.0, limits).unwrap();
        for i in 0..8 {
            let pod = found
                .pods
                .get(&uid(i))
                .unwrap_or_else(|| panic!("pod {} left out: {:?}", uid(i), found.truncated));
            assert_eq!(pod.cgroups.len(), 2, "{}", uid(i));
        }
        let flood = &found.pods[&format!("{}ff", &UID[..34])];
        assert_eq!(flood.cgroups.len(), 8);
        assert!(found.truncated.unwrap().contains("has more than 8 cgroups"));
    }

    /// Waits for the watcher's signal, bounded.
    async fn signalled(watcher: &Watcher) -> bool {
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher.changed())
            .await
            .is_ok()
    }

    /// Polls the watcher's status until `done` holds, bounded.
    async fn until(watcher: &Watcher, done: impl Fn(&WatchStatus) -> bool) -> WatchStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let status = watcher.status();
            if done(&status) || std::time::Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn watcher_follows_new_and_removed_directories() {
        let tree = Scratch::new("watch");
        tree.mkdir("kubepods/burstable");
        let watcher = Watcher::spawn(&tree.0, 100).unwrap();
        // The root, kubepods, burstable.
        assert_eq!(watcher.status().watches, 3);
        // A whole chain at once: the deeper levels exist before their parent's watch does,
        // and are found by the listing that follows it.
        let pod = format!("kubepods/burstable/pod{UID}");
        tree.mkdir(&format!("{pod}/{CID}/nested"));
        assert!(signalled(&watcher).await, "no signal for a new pod");
        let status = until(&watcher, |s| s.watches == 6).await;
        assert_eq!(status.watches, 6, "{status:?}");
        // A container started later in a watched pod.
        tree.mkdir(&format!("{pod}/cri-containerd-{CID}.scope"));
        assert!(signalled(&watcher).await, "no signal for a new container");
        let status = until(&watcher, |s| s.watches == 7).await;
        assert_eq!(status.watches, 7, "{status:?}");
        std::fs::remove_dir_all(tree.0.join(&pod)).unwrap();
        assert!(signalled(&watcher).await, "no signal for a removed pod");
        let status = until(&watcher, |s| s.watches == 3).await;
        assert_eq!(status.watches, 3, "{status:?}");
        assert_eq!(status.degraded, None);
        assert!(status.events >= 6, "{status:?}");
    }

    #[tokio::test]
    async fn watcher_bound_is_reported_and_the_rest_still_signals() {
        let tree = Scratch::new("watch-bound");
        tree.mkdir("kubepods");
        let watcher = Watcher::spawn(&tree.0, 3).unwrap();
        assert_eq!(watcher.status().watches, 2);
        tree.mkdir("kubepods/a/b/c");
        assert!(signalled(&watcher).await);
        let status = until(&watcher, |s| s.degraded.is_some()).await;
        assert_eq!(status.watches, 3, "{status:?}");
        assert!(
            status
                .degraded
                .as_deref()
                .unwrap()
                .contains("3 directories watched"),
            "{status:?}"
        );
        // Changes under watched directories are still signalled.
        tree.mkdir("kubepods/d");
        assert!(signalled(&watcher).await);
    }

    #[test]
    fn scan_of_a_missing_root_is_an_error() {
        let error = scan(Path::new("/nonexistent/cg9"), Limits::default()).unwrap_err();
        assert!(
            format!("{error:#}").contains("/nonexistent/cg9"),
            "{error:#}"
        );
    }
}

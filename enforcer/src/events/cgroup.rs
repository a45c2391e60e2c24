//! Where a calling process's cgroup sits, for the events: its path under the cgroup v2 mount
//! and, when it is a container of a Kubernetes pod (the kubelet's names, either driver), the
//! pod's UID and the container's ID and runtime.
//!
//! The kernel reports the cgroup ID and the pid. The path comes from the ID itself where the
//! agent may open a file by handle (`open_by_handle_at`, which needs `CAP_DAC_READ_SEARCH`:
//! root has it, the DaemonSet does not grant it), else from `/proc/<pid>/cgroup`, trusted only
//! when that directory's inode is the reported cgroup ID (the process may have exited, or
//! moved, and its pid been reused). What cannot be confirmed is left out (the event still has
//! `cgroup_id`). Cgroup IDs are never reused while the machine runs, so a confirmed answer is
//! kept (up to [`Resolver::CAPACITY`] of them).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::sources::cgroups::{container_dir, pod_dir, Runtime};

/// A cgroup's place, as the events report it (`subject.cgroup`, `subject.pod_uid`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CgroupContext {
    /// Relative to the cgroup v2 mount, as the inventory's `cgroups:` and `--cgroup-root`.
    pub path: String,
    /// The pod's UID, when the path passes through a pod cgroup of the kubelet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The container's ID (64 hex digits), when the cgroup is a container's (or inside one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// `containerd`, `crio` or `docker` when the cgroup's name says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<&'static str>,
}

/// The context a cgroup path gives by its names alone.
pub fn context_of(relative: &str) -> CgroupContext {
    let names: Vec<&str> = relative.split('/').filter(|n| !n.is_empty()).collect();
    let mut context = CgroupContext {
        path: names.join("/"),
        ..CgroupContext::default()
    };
    for (i, name) in names.iter().enumerate() {
        let Some(parent) = i.checked_sub(1).map(|p| names[p]) else {
            continue;
        };
        let grandparent = i.checked_sub(2).map(|g| names[g]);
        if let Some(pod) = pod_dir(grandparent, parent, name) {
            context.pod_uid = Some(pod.uid);
            // The pod's first child is the container (the sandbox is a container too).
            if let Some(container) = names.get(i + 1).and_then(|c| container_dir(c)) {
                if !container.conmon {
                    context.runtime = match container.runtime {
                        Runtime::Containerd => Some("containerd"),
                        Runtime::CriO => Some("crio"),
                        Runtime::Docker => Some("docker"),
                        Runtime::Unnamed => None,
                    };
                    context.container_id = Some(container.id);
                }
            }
            break;
        }
    }
    context
}

/// Cgroup ID -> confirmed context, filled as events arrive.
pub struct Resolver {
    mount: Option<PathBuf>,
    /// The mount, open, for `open_by_handle_at`; `None` once that was refused.
    mount_fd: Option<File>,
    known: HashMap<u64, Arc<CgroupContext>>,
    /// The pid that last failed to confirm a cgroup: not asked again for it.
    failed: HashMap<u64, u32>,
}

impl Resolver {
    /// Cgroups remembered (the kernel's cgroup map holds 65,536 by default); beyond, the
    /// memory starts again.
    pub const CAPACITY: usize = 65_536;

    /// A resolver for the cgroup v2 hierarchy mounted at `mount` (`None`: resolves nothing).
    pub fn new(mount: Option<PathBuf>) -> Self {
        let mount_fd = mount.as_deref().and_then(|m| File::open(m).ok());
        Resolver {
            mount,
            mount_fd,
            known: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// The context of `cgroup_id`, confirmed through `pid`, or `None`.
    pub fn resolve(&mut self, cgroup_id: u64, pid: u32) -> Option<Arc<CgroupContext>> {
        if let Some(known) = self.known.get(&cgroup_id) {
            return Some(known.clone());
        }
        if self.failed.get(&cgroup_id) == Some(&pid) {
            return None;
        }
        let mount = self.mount.as_deref()?;
        let by_id = match &self.mount_fd {
            Some(fd) => match path_of_id(fd, mount, cgroup_id) {
                Ok(path) => path,
                Err(error) => {
                    // Without the capability, every call fails alike: stop asking.
                    if error.raw_os_error() == Some(libc::EPERM) {
                        tracing::debug!(
                            "cgroups by handle refused ({error}); using /proc/<pid>/cgroup"
                        );
                        self.mount_fd = None;
                    }
                    None
                }
            },
            None => None,
        };
        match by_id.or_else(|| confirm(mount, cgroup_id, pid)) {
            Some(relative) => {
                if self.known.len() >= Self::CAPACITY {
                    self.known.clear();
                }
                let context = Arc::new(context_of(&relative));
                self.known.insert(cgroup_id, context.clone());
                self.failed.remove(&cgroup_id);
                Some(context)
            }
            None => {
                if self.failed.len() >= Self::CAPACITY {
                    self.failed.clear();
                }
                self.failed.insert(cgroup_id, pid);
                None
            }
        }
    }
}

/// The path of cgroup `cgroup_id`, relative to `mount`, opened by its file handle (a cgroup's
/// handle is its ID, type `FILEID_KERNFS`). `Ok(None)` when it resolves outside `mount`.
fn path_of_id(mount_fd: &File, mount: &Path, cgroup_id: u64) -> std::io::Result<Option<String>> {
    /// `struct file_handle` with its 8 bytes of handle.
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mut handle = Handle {
        bytes: 8,
        kind: FILEID_KERNFS,
        id: cgroup_id,
    };
    // SAFETY: `handle` is a `struct file_handle` whose `handle_bytes` (8) matches the bytes
    // that follow it; the kernel only reads it. The raw syscall, not libc's wrapper: the
    // static (musl) build must not depend on the C library having one.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut handle as *mut Handle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    } as libc::c_int;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this function owns.
    let dir = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if dir.metadata()?.ino() != cgroup_id {
        return Ok(None);
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    Ok(path
        .strip_prefix(mount)
        .ok()
        .map(|p| p.to_string_lossy().into_owned()))
}

/// `pid`'s cgroup v2 path, relative to `mount`, if that directory is cgroup `cgroup_id`.
fn confirm(mount: &Path, cgroup_id: u64, pid: u32) -> Option<String> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let relative = relative.trim_start_matches('/');
    let dir = mount.join(relative);
    (std::fs::metadata(&dir).ok()?.ino() == cgroup_id).then(|| relative.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn pods_and_containers_by_the_kubelets_names() {
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        let c = context_of(&systemd);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container_id.as_deref(), Some(CID));
        assert_eq!(c.runtime, Some("containerd"));
        assert_eq!(c.path, systemd);

        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let c = context_of(&cgroupfs);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container_id.as_deref(), Some(CID));
        assert_eq!(c.runtime, None);
        assert_eq!(c.path, cgroupfs.trim_start_matches('/'));

        // The pod cgroup itself: a pod, no container.
        let c = context_of(&format!("kubepods/pod{UID}"));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container_id, None);

        // CRI-O's monitor is not the container.
        let c = context_of(&format!("kubepods/pod{UID}/crio-conmon-{CID}.scope"));
        assert_eq!(c.container_id, None);

        // Names that look like a pod in the wrong place, and inventory cgroups.
        assert_eq!(context_of(&format!("other/pod{UID}/{CID}")).pod_uid, None);
        let c = context_of("enforcer-demo/acme-retriever");
        assert_eq!(
            c,
            CgroupContext {
                path: "enforcer-demo/acme-retriever".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn resolves_a_live_process_and_refuses_a_wrong_id() {
        let Ok(mount) = crate::fs::cgroup2_mount() else {
            eprintln!("SKIP: no cgroup v2 mount");
            return;
        };
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let dir = mount.join(own.trim_start_matches('/'));
        let Ok(id) = crate::fs::cgroup_id(&dir) else {
            eprintln!("SKIP: own cgroup {} not under {}", own, mount.display());
            return;
        };
        let pid = std::process::id();
        let mut resolver = Resolver::new(Some(mount.clone()));
        let context = resolver.resolve(id, pid).expect("own cgroup");
        assert_eq!(context.path, own.trim_start_matches('/'));
        // Another cgroup's ID through this pid: not confirmed.
        assert!(resolver.resolve(id + 1_000_000_007, pid).is_none());
        // By the ID alone, where the agent may open files by handle (root): no pid needed.
        let mount_fd = File::open(&mount).unwrap();
        match path_of_id(&mount_fd, &mount, id) {
            Ok(path) => assert_eq!(path.as_deref(), Some(own.trim_start_matches('/'))),
            Err(e) => eprintln!("open_by_handle_at refused here ({e}): the pid path is used"),
        }
        // The pid path alone.
        assert_eq!(
            confirm(&mount, id, pid).as_deref(),
            Some(own.trim_start_matches('/'))
        );
        assert_eq!(confirm(&mount, id + 1_000_000_007, pid), None);
        // Remembered: answered again without the pid.
        assert_eq!(resolver.resolve(id, 0), Some(context));
        assert!(Resolver::new(None).resolve(id, pid).is_none());
    }
}

//! The two kernel file systems the agent works with: cgroup v2 (where workloads live) and
//! bpffs (where maps and links are pinned so enforcement outlives the agent); and, in
//! `trust`, the rule for every file and directory no other local user may change (pins,
//! state, secrets, policy, the events file).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

mod trust;
pub use trust::{
    check_trusted, creatable, private_dir, read_secret, read_trusted, replace_file,
    trusted_bundle_dir, writable_by_others, Above,
};

/// Where the kernel mounts bpffs by convention; the agent mounts it there when missing.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The cgroup v2 mount point, read from `/proc/self/mounts` (never assumed: on a hybrid
/// layout it is `/sys/fs/cgroup/unified`, on a unified one `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    find_mount(&mounts, "cgroup2")
        .context("no cgroup v2 file system is mounted (see /proc/self/mounts)")
}

fn find_mount(mounts: &str, fs_type: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fs_type).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/self/mounts` escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves a cgroup path given relative to the cgroup v2 mount (or absolute inside it).
/// `..` is refused, so an inventory cannot point outside the hierarchy.
pub fn cgroup_path(mount: &Path, path: &str) -> Result<PathBuf> {
    let candidate = Path::new(path);
    let relative = candidate.strip_prefix(mount).unwrap_or(candidate);
    let relative = relative.strip_prefix("/").unwrap_or(relative);
    if relative
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        bail!("cgroup path {path:?} must not contain `..`");
    }
    Ok(mount.join(relative))
}

/// The cgroup ID the kernel reports (`bpf_get_current_cgroup_id`): on cgroup v2 it is the
/// inode number of the cgroup's directory.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The most cgroup directories [`own_cgroup_under`] reads while searching the subtree.
const OWN_CGROUP_SEARCH: usize = 100_000;

/// This process's own cgroup v2 directory when it lies at or under `root` (a DaemonSet
/// agent under `kubepods`), else `None`.
///
/// `/proc/self/cgroup` names it relative to the process's cgroup namespace root, which is
/// the mount's root only with the host's cgroup namespace; inside a container's own
/// namespace it reads `0::/`. So the named directory is trusted only when its
/// `cgroup.procs` lists this process; otherwise the subtree under `root` is searched
/// (bounded) for the directory that does.
pub fn own_cgroup_under(mount: &Path, root: &Path) -> Option<PathBuf> {
    let pid = std::process::id().to_string();
    let lists_me = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
    };
    let named = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| mount.join(p.trim_start_matches('/')))
            })
        });
    if let Some(dir) = named.filter(|d| lists_me(d)) {
        return dir.starts_with(root).then_some(dir);
    }
    let mut pending = vec![root.to_path_buf()];
    let mut read = 0;
    while let Some(dir) = pending.pop() {
        read += 1;
        if read > OWN_CGROUP_SEARCH {
            return None;
        }
        if lists_me(&dir) {
            return Some(dir);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        pending.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

/// Mounts bpffs at [`BPFFS`] when `pin_root` lies below it and nothing is mounted there yet.
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    if !pin_root.starts_with(BPFFS) {
        return Ok(());
    }
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.next();
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    let target = CString::new(BPFFS).expect("no NUL in a constant");
    let fstype = CString::new("bpf").expect("no NUL in a constant");
    // The kernel's default root of a bpffs is 1777: any user could create the pin directory
    // before the agent and then unlink its link pins (detaching the hooks). 0700 is what
    // systemd mounts it with.
    let data = CString::new("mode=0700").expect("no NUL in a constant");
    // SAFETY: plain mount(2) with valid NUL-terminated strings; bpffs parses `data` as text.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {BPFFS}"));
    }
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(mounts, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(
            unescape_mount_path(r"/mnt/with\040space"),
            "/mnt/with space"
        );
    }

    #[test]
    fn leaves_plain_paths_and_trailing_backslashes_alone() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }

    #[test]
    fn cgroup_paths_stay_inside_the_mount() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(cgroup_path(mount, "demo/a").unwrap(), mount.join("demo/a"));
        assert_eq!(cgroup_path(mount, "/demo/a").unwrap(), mount.join("demo/a"));
        assert_eq!(
            cgroup_path(mount, "/sys/fs/cgroup/unified/demo").unwrap(),
            mount.join("demo")
        );
        assert!(cgroup_path(mount, "demo/../../etc").is_err());
    }
}

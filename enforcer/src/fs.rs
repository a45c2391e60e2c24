//! The two kernel file systems the agent works with: cgroup v2 (where workloads live) and
//! bpffs (where maps and links are pinned so enforcement outlives the agent), and the
//! directories it keeps its own state in, which no other user may change.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

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

/// Creates `dir` with `mode` (missing parents 0755), or checks the one there, so that no
/// user but this agent's can change what the agent keeps in it: pins (an unlinked link pin
/// detaches a hook), sockets, the last good bundle, the persisted cluster state. The rule is
/// OpenSSH's `StrictModes`: `dir` (symlinks resolved) is owned by this agent's user and
/// writable by nobody else; each directory above it is owned by root or this user and
/// writable by nobody else unless sticky (as `/tmp`, or a bpffs mounted without `mode`);
/// a symlink on the way is owned by root or this user. A `dir` that passes keeps no access
/// beyond `mode` (an agent of an earlier release made its pin directories 0755, and anyone
/// who can open a directory can `flock` it).
///
/// Errors: `dir` cannot be created or read, or fails the rule (every problem named).
pub fn private_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let problems = untrusted(dir, true, Above::Strict)?;
    if !problems.is_empty() {
        bail!(
            "refusing {}: another user could change what the agent keeps there: {}. Remove or \
             fix it (owned by this agent's user, mode {mode:04o}, in directories only root or \
             that user may write) and start again",
            dir.display(),
            problems.join("; ")
        );
    }
    let real = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let current = std::fs::metadata(&real)
        .with_context(|| format!("reading {}", real.display()))?
        .mode()
        & 0o7777;
    // The permission bits only: a sticky or setgid bit stays as it was.
    let wanted = current & !(0o777 & !mode);
    if wanted != current {
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(wanted))
            .with_context(|| format!("restricting {} to mode {mode:04o}", real.display()))?;
        tracing::info!(dir = %real.display(), was = format!("{current:04o}"), now = format!("{wanted:04o}"), "restricted the access to a state directory");
    }
    Ok(())
}

/// Reads a secret (a key or a token) that no other user may read or change: the file
/// (symlinks followed, as in a Kubernetes Secret volume) is owned by root or this process's
/// user, has one name (no hard link), gives others no access and its group no write (a
/// group may read only if this process is in it: a pod's `fsGroup`), and every directory above it is owned by root or this user and writable by
/// nobody else unless sticky ([`private_dir`]'s rule). `what` says what a reader of the file
/// could do, for the error. The checks are made on the open file, so the file read is the
/// file checked.
///
/// Errors: the file cannot be opened or read, is not a regular file, or fails the rule
/// (every problem named).
pub fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a FIFO planted at the path would otherwise hang the open (and the agent's
    // tick, which re-reads the flow key); it is refused below as not a regular file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut problems = writable_by_others(path, &meta, Above::Strict)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o005 != 0 {
        problems.push(format!(
            "{} is open to other users (mode {mode:04o}): anyone on this host who reads it could {what}",
            path.display()
        ));
    }
    // A group may read it only if it is one of this process's own (a pod's fsGroup is a
    // supplementary group): `root:adm 0640` would hand it to every member of `adm`.
    if mode & 0o040 != 0 && !is_own_group(meta.gid()) {
        problems.push(format!(
            "{} is readable by group {}, not one of this process's groups (mode {mode:04o}): \
             its members could {what}",
            path.display(),
            meta.gid()
        ));
    }
    if !problems.is_empty() {
        bail!(
            "refusing the secret {}: {}. Make it mode 0600 (0640 for a group that must read it, \
             such as a pod's fsGroup)",
            path.display(),
            problems.join("; ")
        );
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// Whether `gid` is this process's effective group, one of its supplementary groups, or root's.
fn is_own_group(gid: u32) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most `groups.len()` entries.
    unsafe {
        if gid == 0 || gid == libc::getegid() {
            return true;
        }
        let mut groups = [0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// What would let another user change the file at `path`, whose open file has `meta`: the
/// file is owned by neither root nor this process's user or is writable by its group or
/// others, `path` itself is another user's symlink, or a directory above it fails
/// [`private_dir`]'s rule for the directories above. One line per problem.
pub fn writable_by_others(
    path: &Path,
    meta: &std::fs::Metadata,
    above: Above,
) -> Result<Vec<String>> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut problems = untrusted(parent, false, above)?;
    if let Ok(link) = std::fs::symlink_metadata(path) {
        if link.file_type().is_symlink() && link.uid() != 0 && link.uid() != me {
            problems.push(format!(
                "{} is a symlink owned by uid {}",
                path.display(),
                link.uid()
            ));
        }
    }
    if meta.uid() != 0 && meta.uid() != me {
        problems.push(format!(
            "{} is owned by uid {}, neither root nor this process's uid {me}",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        problems.push(format!(
            "{} is writable by its group or other users (mode {:04o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    // Another name elsewhere (a hard link planted to, say, a root-owned system file) would
    // pass every check above and take the agent's writes.
    if meta.is_file() && meta.nlink() > 1 {
        problems.push(format!(
            "{} has {} hard links: another name may point at the same file",
            path.display(),
            meta.nlink()
        ));
    }
    Ok(problems)
}

/// How the directories above a checked path are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Above {
    /// Writable by nobody but their owner (root or this user), unless sticky: for what the
    /// agent trusts (pins, state, secrets).
    Strict,
    /// Also writable by their group: for what the agent only writes (the events file), so
    /// that a log directory such as Ubuntu's `/var/log` (`root:syslog 0775`) can hold it.
    GroupMayWrite,
}

/// What makes `dir` untrusted under [`private_dir`]'s rule: one line per problem. With
/// `own_last` false, `dir` itself is held to the rule of the directories above.
fn untrusted(dir: &Path, own_last: bool, above: Above) -> Result<Vec<String>> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner_ok = |uid: u32| uid == 0 || uid == me;
    let mut problems = Vec::new();
    let absolute = std::path::absolute(dir)?;
    let mut lexical = PathBuf::new();
    for component in absolute.components() {
        lexical.push(component);
        let meta = std::fs::symlink_metadata(&lexical)
            .with_context(|| format!("reading {}", lexical.display()))?;
        if meta.file_type().is_symlink() && !owner_ok(meta.uid()) {
            problems.push(format!(
                "the symlink {} is owned by uid {}",
                lexical.display(),
                meta.uid()
            ));
        }
    }
    let real = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let mut at = PathBuf::new();
    let depth = real.components().count();
    for (i, component) in real.components().enumerate() {
        at.push(component);
        let meta = std::fs::metadata(&at).with_context(|| format!("reading {}", at.display()))?;
        let (uid, mode) = (meta.uid(), meta.mode());
        let last = own_last && i + 1 == depth;
        if last && uid != me {
            problems.push(format!(
                "{} is owned by uid {uid}, not by this agent's uid {me}",
                at.display()
            ));
        } else if !last && !owner_ok(uid) {
            problems.push(format!("{} is owned by uid {uid}", at.display()));
        }
        let writable_by_others = if last || above == Above::Strict {
            mode & 0o022 != 0
        } else {
            mode & 0o002 != 0
        };
        let sticky = mode & libc::S_ISVTX != 0;
        if writable_by_others && (last || !sticky) {
            problems.push(format!(
                "{} is writable by its group or other users (mode {:04o})",
                at.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(problems)
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

    /// `private_dir`'s rule, on directories made by the test (run as root: the owners are
    /// real chowns).
    #[test]
    fn a_state_directory_is_trusted_only_when_no_other_user_can_change_it() {
        use std::os::unix::fs::{chown, symlink, PermissionsExt};
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let set_mode = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();

        let fresh = open.join("a/b/pins");
        private_dir(&fresh, 0o700).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&open.join("a")), 0o755);

        // An earlier release's 0755: restricted.
        set_mode(&fresh, 0o755);
        private_dir(&fresh, 0o700).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        chown(&fresh, Some(65534), None).unwrap();
        let error = private_dir(&fresh, 0o700).unwrap_err().to_string();
        assert!(
            error.contains("owned by uid 65534, not by this agent's uid 0"),
            "{error}"
        );
        chown(&fresh, Some(0), None).unwrap();

        // A parent anyone may write, without the sticky bit: the directory could be swapped.
        set_mode(&open.join("a"), 0o777);
        let error = private_dir(&fresh, 0o700).unwrap_err().to_string();
        assert!(
            error.contains("a is writable by its group or other users (mode 0777)"),
            "{error}"
        );
        // Sticky, as /tmp: others cannot rename what they do not own.
        set_mode(&open.join("a"), 0o1777);
        private_dir(&fresh, 0o700).unwrap();

        // Every problem at once.
        chown(open.join("a/b"), Some(65534), None).unwrap();
        set_mode(&fresh, 0o777);
        let error = private_dir(&fresh, 0o700).unwrap_err().to_string();
        assert!(error.contains("b is owned by uid 65534"), "{error}");
        assert!(
            error.contains("pins is writable by its group or other users (mode 0777)"),
            "{error}"
        );
        chown(open.join("a/b"), Some(0), None).unwrap();
        set_mode(&fresh, 0o700);

        // Another user's symlink on the way could be pointed elsewhere.
        let link = open.join("link");
        symlink(open.join("a/b"), &link).unwrap();
        private_dir(&link.join("pins"), 0o700).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
        let error = private_dir(&link.join("pins"), 0o700)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("the symlink") && error.contains("uid 65534"),
            "{error}"
        );
    }

    /// `read_secret`'s rule: others get nothing, the group may read but not write, the file
    /// read is the file checked (a symlink, as in a Secret volume, is followed).
    #[test]
    fn a_secret_is_read_only_when_no_other_user_can_read_or_change_it() {
        use std::os::unix::fs::{chown, symlink, PermissionsExt};
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let key = base.path().join("key");
        std::fs::write(&key, "secret").unwrap();
        let set_mode = |mode: u32| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let error = |path: &Path| read_secret(path, "do harm").unwrap_err().to_string();

        set_mode(0o644);
        let e = error(&key);
        assert!(
            e.contains(
                "open to other users (mode 0644): anyone on this host who reads it could do harm"
            ),
            "{e}"
        );
        set_mode(0o660);
        assert!(error(&key).contains("writable by its group or other users (mode 0660)"));
        set_mode(0o640);
        assert_eq!(read_secret(&key, "do harm").unwrap(), b"secret");
        // A group this process is not in (as `adm` for a root daemon) may not read it.
        chown(&key, None, Some(65534)).unwrap();
        assert!(error(&key).contains("readable by group 65534, not one of this process's groups"));
        chown(&key, None, Some(0)).unwrap();
        // A second name for the same file.
        let alias = base.path().join("alias");
        std::fs::hard_link(&key, &alias).unwrap();
        assert!(error(&key).contains("has 2 hard links"));
        std::fs::remove_file(&alias).unwrap();
        // A FIFO at the path is refused, not waited on.
        let fifo = base.path().join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(error(&fifo).contains("is not a regular file"));
        chown(&key, Some(65534), None).unwrap();
        assert!(error(&key).contains("owned by uid 65534"));
        chown(&key, Some(0), None).unwrap();

        let link = base.path().join("link");
        symlink(&key, &link).unwrap();
        assert_eq!(read_secret(&link, "do harm").unwrap(), b"secret");
        set_mode(0o604);
        assert!(error(&link).contains("open to other users (mode 0604)"));
        set_mode(0o600);

        // In a directory anyone may write, the file could be swapped for another.
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(error(&key).contains("is writable by its group or other users (mode 0777)"));
    }
}

//! What no other local user may change: the pins and state the agent keeps, the secrets it
//! reads, the policy it enforces and the events file it writes. Another user who could
//! unlink a link pin detaches a hook; one who could edit a policy file or the inventory
//! decides what the kernel allows; one who could read the flow key signs any identity.
//!
//! The rule is OpenSSH's `StrictModes`, applied to the path as the kernel resolves it:
//! every directory the resolution looks an entry up in (the ancestors, and the directories
//! every symlink on the way leads through) is owned by root or this process's user and
//! writable by nobody else unless sticky (as `/tmp`: others cannot rename or remove what
//! they do not own), and every symlink met is owned by root or this user. What the path
//! finally names has a rule of its own, per use (below). Two more things on the way are
//! refused: a FUSE file system another user mounted (it answers `stat` as it likes), and a
//! name that resolves to nothing (another user may create it later, between the check and a
//! read by path). One directory's mode bits are not judged: the root of a Kubernetes volume
//! that kubelet writes atomically (ConfigMap, Secret, projected), seen read-only from inside
//! the pod: it is 0777 (2777 with `fsGroup`, 1777 for a Secret), nobody can write through
//! the read-only mount, and kubelet keeps its host side in root's directories.
//!
//! A check that meets a name changing under it (kubelet swapping `..data` for a new
//! version) is made again, up to [`ATTEMPTS`] times.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Checks made again when a name changed under them (see the module's doc).
pub const ATTEMPTS: usize = 3;

/// A name on the way changed or vanished while it was judged: worth another attempt.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Changed(String);

/// Runs `check` up to [`ATTEMPTS`] times while it fails with [`Changed`].
fn settled<T>(mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match check() {
            Err(e) if attempt < ATTEMPTS && e.downcast_ref::<Changed>().is_some() => attempt += 1,
            done => return done,
        }
    }
}

/// How the directories above a checked path are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Above {
    /// Writable by nobody but their owner (root or this user), unless sticky: for what the
    /// agent trusts (pins, state, secrets, policy).
    Strict,
    /// Also writable by their group: for what the agent only writes (the events file), so
    /// that a log directory such as Ubuntu's `/var/log` (`root:syslog 0775`) can hold it.
    GroupMayWrite,
}

/// Creates `dir` with `mode` (missing parents 0755), or checks the one there, so that no
/// user but this agent's can change what the agent keeps in it: pins (an unlinked link pin
/// detaches a hook), sockets, the last good bundle, the persisted cluster state. `dir` is
/// owned by this agent's user and writable by nobody else (sticky or not), on the module's
/// rule. A `dir` that passes keeps no access beyond `mode` (an agent of an earlier release
/// made its pin directories 0755, and anyone who can open a directory can `flock` it).
/// Nothing is created below a directory that fails the rule.
///
/// Errors: `dir` cannot be created or read, or fails the rule (every problem named).
pub fn private_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let refuse = |problems: Vec<String>| {
        anyhow::anyhow!(
            "refusing {}: another user could change what the agent keeps there: {}. Remove or \
             fix it (owned by this agent's user, mode {mode:04o}, in directories only root or \
             that user may write) and start again",
            dir.display(),
            problems.join("; ")
        )
    };
    // The part of the way that exists is judged before anything is made below it: a
    // planted symlink must not make root create directories where it points.
    let wanted = absolute(dir)?;
    let mut existing = wanted.clone();
    while std::fs::symlink_metadata(&existing).is_err() && existing.pop() {}
    if existing != wanted {
        let problems = settled(|| {
            let above = walk(&existing, Above::Strict)?;
            let mut problems = above.problems;
            problems.extend(directory_problems(&above.real, Above::Strict)?);
            Ok(problems)
        })?;
        if !problems.is_empty() {
            return Err(refuse(problems));
        }
    }
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
    let (walk, meta) = settled(|| {
        let walk = walk(dir, Above::Strict)?;
        let meta = metadata(&walk.real)?;
        Ok((walk, meta))
    })?;
    let mut problems = walk.problems;
    let me = euid();
    if meta.uid() != me {
        problems.push(format!(
            "{} is owned by uid {}, not by this agent's uid {me}",
            walk.real.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        problems.push(writable_problem(&walk.real, meta.mode()));
    }
    problems.extend(fuse_problem(&walk.real));
    if !problems.is_empty() {
        return Err(refuse(problems));
    }
    let current = meta.mode() & 0o7777;
    // The permission bits only: a sticky or setgid bit stays as it was.
    let wanted = current & !(0o777 & !mode);
    if wanted != current {
        std::fs::set_permissions(&walk.real, std::fs::Permissions::from_mode(wanted))
            .with_context(|| format!("restricting {} to mode {mode:04o}", walk.real.display()))?;
        tracing::info!(dir = %walk.real.display(), was = format!("{current:04o}"), now = format!("{wanted:04o}"), "restricted the access to a state directory");
    }
    Ok(())
}

/// Reads a secret (a key or a token) that no other user may read or change: the file
/// (symlinks followed, as in a Kubernetes Secret volume) is owned by root or this process's
/// user, has one name (no hard link), gives others no access and its group no write (a
/// group may read only if this process is in it: a pod's `fsGroup`), on the module's rule
/// for the way to it. `what` says what a reader of the file could do, for the error. The
/// checks are made on the open file, so the file read is the file checked.
///
/// Errors: the file cannot be opened or read, is not a regular file, or fails the rule
/// (every problem named).
pub fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    let (mut file, meta, mut problems) = settled(|| {
        let (file, meta) = open_regular(path)?;
        let problems = writable_by_others(path, &meta, Above::Strict)?;
        Ok((file, meta, problems))
    })?;
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
    read_all(&mut file, path)
}

/// Reads a file the agent trusts but need not keep secret (a CA certificate that decides
/// which PDP is believed, a server certificate, a kubeconfig): owned by root or this
/// process's user and writable by nobody else, on the module's rule. `what` says what a
/// user who could change it could do, for the error.
///
/// Errors: the file cannot be opened or read, is not a regular file, or fails the rule.
pub fn read_trusted(path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut file = open_trusted(path, what)?;
    read_all(&mut file, path)
}

/// [`read_trusted`]'s rule without reading the file (an exec credential plugin's binary).
///
/// Errors: as [`read_trusted`]'s.
pub fn check_trusted(path: &Path, what: &str) -> Result<()> {
    open_trusted(path, what).map(drop)
}

/// The open file at `path`, checked by [`read_trusted`]'s rule.
fn open_trusted(path: &Path, what: &str) -> Result<std::fs::File> {
    let (file, problems) = settled(|| {
        let (file, meta) = open_regular(path)?;
        let problems = trusted_problems(path, &meta, Above::Strict)?;
        Ok((file, problems))
    })?;
    if !problems.is_empty() {
        bail!(
            "refusing {}: another user could change it and {what}: {}",
            path.display(),
            problems.join("; ")
        );
    }
    Ok(file)
}

/// Checks a policy bundle directory before it is loaded: the directory and every entry the
/// loader reads (names not starting with `.`; a ConfigMap's symlinks followed) are owned by
/// root or this process's user and writable by nobody else, on the module's rule, so that
/// no other user can add, edit or swap a policy or the inventory. A name that resolves to
/// nothing is refused too: another user might create what it leads to. Nothing of the
/// bundle is read: the loader reads it after, and no other user can change it in between.
///
/// Errors: the directory or an entry cannot be read, or fails the rule (every problem of
/// every entry named).
pub fn trusted_bundle_dir(dir: &Path) -> Result<()> {
    let mut problems = settled(|| bundle_problems(dir))?;
    // Symlinks of several entries lead through the same directories (`..data`).
    let mut seen = HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    if !problems.is_empty() {
        bail!(
            "refusing the policy bundle {}: another user could change the policy in force: {}. \
             Make the directory and its files owned by root (or the agent's user) and writable \
             by nobody else",
            dir.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

fn bundle_problems(dir: &Path) -> Result<Vec<String>> {
    let walk = walk(dir, Above::Strict)?;
    let meta = metadata(&walk.real)?;
    let mut problems = walk.problems;
    // No sticky exception for the directory itself: in a 1777 directory anyone may add a
    // policy file.
    if meta.uid() != 0 && meta.uid() != euid() {
        problems.push(owner_problem(&walk.real, meta.uid()));
    }
    if meta.mode() & 0o022 != 0 && !kubelet_volume_root(&walk.real) {
        problems.push(writable_problem(&walk.real, meta.mode()));
    }
    problems.extend(fuse_problem(&walk.real));
    let entries =
        std::fs::read_dir(&walk.real).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_name().as_bytes().starts_with(b".") {
            continue;
        }
        let path = dir.join(entry.file_name());
        match std::fs::metadata(&path) {
            Ok(meta) => problems.extend(trusted_problems(&path, &meta, Above::Strict)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
                "{} leads to nothing (another user might create what it names)",
                path.display()
            )),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(problems)
}

/// What would let another user change the file at `path`, whose open file has `meta`: the
/// file is owned by neither root nor this process's user, is writable by its group or
/// others, has another name (a hard link), or the way to it fails the module's rule under
/// `above`. One line per problem.
///
/// Errors: the way to `path` cannot be read, or no longer leads to the open file.
pub fn writable_by_others(
    path: &Path,
    meta: &std::fs::Metadata,
    above: Above,
) -> Result<Vec<String>> {
    let mut problems = trusted_problems(path, meta, above)?;
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

/// Judges the directory `path` would be created in, under `above`, and, when `path` is a
/// symlink, the symlink and where it leads (which may not exist yet): the name to create or
/// open without following a symlink (`O_NOFOLLOW`). A symlink planted after this check makes
/// that open fail, never lead elsewhere.
///
/// Errors: the directory cannot be read, or fails the rule (every problem named).
pub fn creatable(path: &Path, above: Above, what: &str) -> Result<PathBuf> {
    let (target, problems) = settled(|| creatable_problems(path, above))?;
    if !problems.is_empty() {
        bail!(
            "refusing {what} {}: another user could change or replace it: {}",
            path.display(),
            problems.join("; ")
        );
    }
    Ok(target)
}

fn creatable_problems(path: &Path, above: Above) -> Result<(PathBuf, Vec<String>)> {
    let me = euid();
    let mut current = absolute(path)?;
    let mut problems = Vec::new();
    for _ in 0..MAX_SYMLINKS {
        let name = current
            .file_name()
            .with_context(|| format!("{} names no file", current.display()))?
            .to_os_string();
        let parent = current.parent().unwrap_or(Path::new("/"));
        let dir = walk(parent, above)?;
        problems.extend(dir.problems);
        problems.extend(directory_problems(&dir.real, above)?);
        let target = dir.real.join(&name);
        match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if meta.uid() != 0 && meta.uid() != me {
                    problems.push(format!(
                        "the symlink {} is owned by uid {}",
                        target.display(),
                        meta.uid()
                    ));
                }
                let link = std::fs::read_link(&target)
                    .with_context(|| format!("reading the symlink {}", target.display()))?;
                // A relative target is relative to the symlink's own directory.
                current = dir.real.join(link);
            }
            _ => return Ok((target, problems)),
        }
    }
    bail!(
        "{}: more than {MAX_SYMLINKS} symlinks on the way",
        path.display()
    )
}

/// Writes `contents` to `path` as a new file (mode 0644) renamed over whatever is there, so
/// that a symlink or a hard link planted at `path` (in `/tmp`, say) is replaced, never
/// followed: a root agent writing through one would overwrite the file it points at. The
/// directory is judged first ([`creatable`]: sticky allowed), and the temporary file has
/// a random name, created exclusively and removed on failure (only it).
///
/// Errors: the directory fails the rule, or the temporary file cannot be created, written
/// or renamed into place.
pub fn replace_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    creatable(path, Above::Strict, "the file")?;
    let mut file = tempfile::Builder::new()
        .prefix(".enforcer-")
        .tempfile_in(parent)
        .with_context(|| format!("creating a file beside {}", path.display()))?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| file.write_all(contents))
        .with_context(|| format!("writing {}", path.display()))?;
    file.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// [`read_trusted`]'s rule (with the directories above judged under `above`) for the file at
/// `path`, whose metadata is `meta`.
fn trusted_problems(path: &Path, meta: &std::fs::Metadata, above: Above) -> Result<Vec<String>> {
    let walk = walk_to_open_file(path, meta, above)?;
    let mut problems = walk.problems;
    if meta.uid() != 0 && meta.uid() != euid() {
        problems.push(owner_problem(path, meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        problems.push(writable_problem(path, meta.mode()));
    }
    problems.extend(fuse_problem(&walk.real));
    Ok(problems)
}

/// The way to `path` ([`walk`]), which must end at the file `meta` describes: otherwise the
/// name was moved while it was checked ([`Changed`]).
fn walk_to_open_file(path: &Path, meta: &std::fs::Metadata, above: Above) -> Result<Walk> {
    let walk = walk(path, above)?;
    let there = metadata(&walk.real)?;
    if (there.dev(), there.ino()) != (meta.dev(), meta.ino()) {
        return Err(Changed(format!(
            "{} changed while it was checked (it now leads to another file)",
            path.display()
        ))
        .into());
    }
    Ok(walk)
}

/// A path resolved as the kernel resolves it, with what another user could change on the
/// way.
struct Walk {
    /// Every problem, one line each.
    problems: Vec<String>,
    /// Where the path leads (no symlink left).
    real: PathBuf,
}

/// The kernel's limit on symlinks followed in one resolution (`MAXSYMLINKS`, 40).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` one component at a time, following symlinks, and judges every
/// directory an entry is looked up in and every symlink met (the module's rule). Resolving
/// by hand, rather than judging the ancestors of the real path, also judges the directories
/// a symlink's own target leads through (`a -> /x/y/b`, where `/x` is another user's).
///
/// Errors: a name on the way is missing ([`Changed`]: it may be kubelet's swap) or cannot
/// be read, or there are more than [`MAX_SYMLINKS`] symlinks.
fn walk(path: &Path, above: Above) -> Result<Walk> {
    let me = euid();
    let mut pending: VecDeque<OsString> = components(&absolute(path)?);
    let mut real = PathBuf::from("/");
    let mut judged = HashSet::new();
    let mut problems = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.as_bytes() {
            b"/" => real = PathBuf::from("/"),
            b"." => {}
            b".." => {
                real.pop();
            }
            _ => {
                if judged.insert(real.clone()) {
                    problems.extend(directory_problems(&real, above)?);
                }
                let next = real.join(&name);
                let meta = match std::fs::symlink_metadata(&next) {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(Changed(format!(
                            "{}: {} does not exist",
                            path.display(),
                            next.display()
                        ))
                        .into())
                    }
                    Err(e) => return Err(e).with_context(|| format!("reading {}", next.display())),
                };
                if !meta.file_type().is_symlink() {
                    real = next;
                    continue;
                }
                if meta.uid() != 0 && meta.uid() != me {
                    problems.push(format!(
                        "the symlink {} is owned by uid {}",
                        next.display(),
                        meta.uid()
                    ));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    bail!(
                        "{}: more than {MAX_SYMLINKS} symlinks on the way",
                        path.display()
                    );
                }
                let target = match std::fs::read_link(&next) {
                    Ok(target) => target,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(Changed(format!("{} vanished", next.display())).into())
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("reading the symlink {}", next.display()))
                    }
                };
                for component in components(&target).into_iter().rev() {
                    pending.push_front(component);
                }
            }
        }
    }
    Ok(Walk { problems, real })
}

/// `path` made absolute from the current directory (lexically: `..` is left to [`walk`]).
fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(path)
    })
}

/// `path`'s components as names, `/` for the root.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir => Some(OsString::from("/")),
            Component::CurDir => None,
            Component::ParentDir => Some(OsString::from("..")),
            Component::Normal(name) => Some(name.to_os_string()),
            Component::Prefix(_) => None,
        })
        .collect()
}

fn metadata(path: &Path) -> Result<std::fs::Metadata> {
    std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Changed(format!("{} vanished while it was checked", path.display())).into()
        } else {
            anyhow::Error::new(e).context(format!("reading {}", path.display()))
        }
    })
}

/// A directory an entry is looked up in: owned by root or this user, writable by nobody
/// else (its group too, under [`Above::GroupMayWrite`]) unless sticky or the root of a
/// kubelet volume, and not on another user's FUSE mount.
fn directory_problems(dir: &Path, above: Above) -> Result<Vec<String>> {
    let meta = metadata(dir)?;
    let mut problems = Vec::new();
    if meta.uid() != 0 && meta.uid() != euid() {
        problems.push(format!("{} is owned by uid {}", dir.display(), meta.uid()));
    }
    let others = match above {
        Above::Strict => 0o022,
        Above::GroupMayWrite => 0o002,
    };
    let sticky = meta.mode() & libc::S_ISVTX != 0;
    if meta.mode() & others != 0 && !sticky && !kubelet_volume_root(dir) {
        problems.push(writable_problem(dir, meta.mode()));
    }
    problems.extend(fuse_problem(dir));
    Ok(problems)
}

fn owner_problem(path: &Path, uid: u32) -> String {
    format!(
        "{} is owned by uid {uid}, neither root nor this process's uid {}",
        path.display(),
        euid()
    )
}

fn writable_problem(path: &Path, mode: u32) -> String {
    format!(
        "{} is writable by its group or other users (mode {:04o})",
        path.display(),
        mode & 0o7777
    )
}

/// Whether `dir` is the root of a volume kubelet writes atomically (ConfigMap, Secret,
/// projected, downward API) as a pod sees it: the root of a read-only mount holding kubelet's
/// `..data` symlink to a `..<timestamp>` directory beside it. Its mode (0777, 2777 with
/// `fsGroup`, 1777) is kubelet's, and nobody can write through the read-only mount.
fn kubelet_volume_root(dir: &Path) -> bool {
    let is_mount_root = match (std::fs::metadata(dir), std::fs::metadata(dir.join(".."))) {
        (Ok(here), Ok(up)) => here.dev() != up.dev() || here.ino() == up.ino(),
        _ => false,
    };
    let data_link = std::fs::read_link(dir.join("..data")).is_ok_and(|target| {
        let name = target.as_os_str().as_bytes();
        name.starts_with(b"..") && name.len() > 2 && !name.contains(&b'/')
    });
    is_mount_root && data_link && read_only_mount(dir)
}

/// Whether `path` is on a mount that is read-only here (`statvfs`'s `ST_RDONLY`, a flag of
/// the mount, so a read-only bind mount counts).
fn read_only_mount(path: &Path) -> bool {
    let Ok(name) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `name` is NUL-terminated; `stat` is a plain out-parameter.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        libc::statvfs(name.as_ptr(), &mut stat) == 0 && stat.f_flag & libc::ST_RDONLY != 0
    }
}

/// `FUSE_SUPER_MAGIC` (`linux/magic.h`).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// A problem when `path` is on a FUSE file system mounted by another user than root or this
/// one: its daemon answers `stat` (owner, mode) and `read` as it likes, so nothing above
/// holds there. The mounter is the `user_id` of the mount in `/proc/self/mountinfo`.
fn fuse_problem(path: &Path) -> Option<String> {
    let name = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `name` is NUL-terminated; `stat` is a plain out-parameter.
    let is_fuse = unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(name.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == FUSE_SUPER_MAGIC
    };
    if !is_fuse {
        return None;
    }
    let dev = std::fs::metadata(path).ok()?.dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let mounter = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| fuse_mounter(&info, &device));
    match mounter {
        Some(uid) if uid == 0 || uid == euid() => None,
        Some(uid) => Some(format!(
            "{} is on a FUSE file system mounted by uid {uid}, which answers for its owners and \
             contents",
            path.display()
        )),
        None => Some(format!(
            "{} is on a FUSE file system whose mounter is unknown",
            path.display()
        )),
    }
}

/// The `user_id` of the mount of device `major:minor` in a `/proc/self/mountinfo` text.
fn fuse_mounter(mountinfo: &str, device: &str) -> Option<u32> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        if fields.nth(2)? != device {
            return None;
        }
        let (_, after) = line.split_once(" - ")?;
        let options = after.split(' ').nth(2)?;
        options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id="))
            .and_then(|uid| uid.parse().ok())
    })
}

/// Opens `path` for reading without blocking (a FIFO planted at the path would otherwise
/// hang the open, and the agent's tick, which re-reads the flow key) and requires a regular
/// file.
fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
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
    Ok((file, meta))
}

fn read_all(file: &mut std::fs::File, path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn as_root() -> bool {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to chown and mount");
            return false;
        }
        true
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Runs `f` on a thread of its own mount namespace (private propagation), so that what
    /// it mounts is gone with the thread, also on a panic.
    fn in_own_mount_namespace(f: impl FnOnce() + Send) {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: plain syscalls on constant arguments.
                    unsafe {
                        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
                        let root = CString::new("/").unwrap();
                        assert_eq!(
                            libc::mount(
                                std::ptr::null(),
                                root.as_ptr(),
                                std::ptr::null(),
                                libc::MS_REC | libc::MS_PRIVATE,
                                std::ptr::null()
                            ),
                            0,
                            "making / private"
                        );
                    }
                    f()
                })
                .join()
                .unwrap()
        })
    }

    fn mount_tmpfs(dir: &Path, options: &str, flags: libc::c_ulong) {
        let name = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let tmpfs = CString::new("tmpfs").unwrap();
        let data = CString::new(options).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                tmpfs.as_ptr(),
                name.as_ptr(),
                tmpfs.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }

    /// A symlink's target is judged by every directory the kernel passes on the way to it,
    /// not only by the directories above the symlink: `link -> other/sub/key` with `other`
    /// another user's (who could swap `sub`), or a chain through a directory anyone may
    /// write. Before the walk, both secrets were read.
    #[test]
    fn a_symlinks_target_is_judged_by_every_directory_on_its_way() {
        use std::os::unix::fs::{chown, symlink};
        if !as_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        for dir in ["trusted", "other/sub", "open"] {
            std::fs::create_dir_all(b.join(dir)).unwrap();
        }
        let key = b.join("other/sub/key");
        std::fs::write(&key, "secret").unwrap();
        set_mode(&key, 0o600);
        let link = b.join("trusted/link");
        symlink(&key, &link).unwrap();
        assert_eq!(read_secret(&link, "do harm").unwrap(), b"secret");

        chown(b.join("other"), Some(65534), None).unwrap();
        let error = read_secret(&link, "do harm").unwrap_err().to_string();
        assert!(error.contains("other is owned by uid 65534"), "{error}");
        chown(b.join("other"), Some(0), None).unwrap();

        // trusted/chain -> open/hop -> other/sub/key, `open` 0777 without the sticky bit.
        symlink(&key, b.join("open/hop")).unwrap();
        let chain = b.join("trusted/chain");
        symlink(b.join("open/hop"), &chain).unwrap();
        assert_eq!(read_secret(&chain, "do harm").unwrap(), b"secret");
        set_mode(&b.join("open"), 0o777);
        let error = read_secret(&chain, "do harm").unwrap_err().to_string();
        assert!(
            error.contains("open is writable by its group or other users (mode 0777)"),
            "{error}"
        );
        // A relative target with `..` resolves from the symlink's directory.
        let relative = b.join("trusted/relative");
        symlink("../other/sub/key", &relative).unwrap();
        assert_eq!(read_secret(&relative, "do harm").unwrap(), b"secret");
    }

    /// The policy bundle: the directory and what the loader reads in it, owned by root or
    /// the agent's user and writable by nobody else; hidden names are not read and not
    /// judged.
    #[test]
    fn a_policy_bundle_is_trusted_only_when_no_other_user_can_change_it() {
        use std::os::unix::fs::chown;
        if !as_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        let policy = dir.join("baseline.cedar");
        std::fs::write(&policy, "permit(principal, action, resource);").unwrap();
        std::fs::write(dir.join("inventory.yaml"), "workloads: []\n").unwrap();
        set_mode(&policy, 0o644);
        trusted_bundle_dir(&dir).unwrap();

        // Every problem at once.
        set_mode(&policy, 0o666);
        chown(dir.join("inventory.yaml"), Some(65534), None).unwrap();
        let error = trusted_bundle_dir(&dir).unwrap_err().to_string();
        assert!(
            error.contains("baseline.cedar is writable by its group or other users (mode 0666)"),
            "{error}"
        );
        assert!(
            error.contains("inventory.yaml is owned by uid 65534"),
            "{error}"
        );
        set_mode(&policy, 0o644);
        chown(dir.join("inventory.yaml"), Some(0), None).unwrap();

        // Sticky is no excuse for the bundle directory: anyone could add a policy file.
        set_mode(&dir, 0o1777);
        let error = trusted_bundle_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("(mode 1777)"), "{error}");
        set_mode(&dir, 0o755);

        // Hidden names (an editor's swap file, a ConfigMap's `..data`) are not read.
        let hidden = dir.join(".baseline.cedar.swp");
        std::fs::write(&hidden, "").unwrap();
        chown(&hidden, Some(65534), None).unwrap();
        trusted_bundle_dir(&dir).unwrap();
    }

    /// A Kubernetes ConfigMap volume: a 0777 directory of symlinks into `..data`, mounted
    /// read-only. Nobody can write through a read-only mount, so the mode bits of such a
    /// volume's root are not judged; the same layout on a writable mount is refused, and so
    /// is a read-only 0777 directory without kubelet's layout.
    #[test]
    fn a_configmap_volume_read_only_is_trusted_and_writable_is_not() {
        use std::os::unix::fs::symlink;
        if !as_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        in_own_mount_namespace(|| {
            mount_tmpfs(&dir, "mode=0777", 0);
            let version = dir.join("..2026_12_03_05_00_00.1");
            std::fs::create_dir(&version).unwrap();
            std::fs::write(
                version.join("baseline.cedar"),
                "permit(principal, action, resource);",
            )
            .unwrap();
            symlink("..2026_12_03_05_00_00.1", dir.join("..data")).unwrap();
            symlink("..data/baseline.cedar", dir.join("baseline.cedar")).unwrap();
            let error = trusted_bundle_dir(&dir).unwrap_err().to_string();
            assert!(error.contains("(mode 0777)"), "{error}");

            mount_tmpfs(&dir, "", libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY);
            trusted_bundle_dir(&dir).unwrap();

            // Owners are still judged: another user who owns a read-only mount's source
            // can change it from outside.
            mount_tmpfs(&dir, "", libc::MS_REMOUNT | libc::MS_BIND);
            std::os::unix::fs::chown(version.join("baseline.cedar"), Some(65534), None).unwrap();
            mount_tmpfs(&dir, "", libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY);
            let error = trusted_bundle_dir(&dir).unwrap_err().to_string();
            assert!(
                error.contains("baseline.cedar is owned by uid 65534"),
                "{error}"
            );

            // A read-only mount is not enough: a 0777 directory without kubelet's layout
            // (a systemd `ReadOnlyPaths=`, a `hostPath` mounted `readOnly`) may be written
            // by others on the other side.
            let plain = base.path().join("plain");
            std::fs::create_dir(&plain).unwrap();
            mount_tmpfs(&plain, "mode=0777", 0);
            std::fs::write(
                plain.join("baseline.cedar"),
                "permit(principal, action, resource);",
            )
            .unwrap();
            mount_tmpfs(
                &plain,
                "",
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            );
            let error = trusted_bundle_dir(&plain).unwrap_err().to_string();
            assert!(
                error.contains("plain is writable by its group or other users (mode 0777)"),
                "{error}"
            );
        });
    }

    /// A ready file written where another user planted a symlink (or a hard link) to a file
    /// of root's: the planted name is replaced, the file it pointed at is untouched. Before,
    /// `std::fs::write` wrote through the symlink.
    #[test]
    fn a_ready_file_replaces_a_planted_link_and_never_writes_through_it() {
        use std::os::unix::fs::symlink;
        let base = tempfile::tempdir().unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let ready = base.path().join("ready");
        symlink(&victim, &ready).unwrap();
        replace_file(&ready, b"42\n").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&ready).unwrap().is_file());
        assert_eq!(std::fs::read(&ready).unwrap(), b"42\n");

        std::fs::remove_file(&ready).unwrap();
        std::fs::hard_link(&victim, &ready).unwrap();
        replace_file(&ready, b"43\n").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&ready).unwrap(), b"43\n");
        // Nothing left behind but the file itself.
        let names: Vec<_> = std::fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A bundle entry that leads nowhere is refused: another user might create what it
    /// names after the check, and the loader reads by name.
    #[test]
    fn a_bundle_name_that_leads_nowhere_is_refused() {
        use std::os::unix::fs::symlink;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        symlink(
            base.path().join("gone/extra.cedar"),
            dir.join("extra.cedar"),
        )
        .unwrap();
        let error = trusted_bundle_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("extra.cedar leads to nothing"), "{error}");
    }

    /// Nothing is created below a directory another user could change: a symlink planted
    /// on the way must not make root create directories where it points.
    #[test]
    fn a_state_directory_below_a_planted_symlink_is_refused_before_anything_is_made() {
        use std::os::unix::fs::symlink;
        if !as_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        let elsewhere = base.path().join("elsewhere");
        std::fs::create_dir(&open).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        set_mode(&open, 0o777);
        symlink(&elsewhere, open.join("x")).unwrap();
        let error = private_dir(&open.join("x/a/pins"), 0o700)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("open is writable by its group or other users"),
            "{error}"
        );
        assert!(
            !elsewhere.join("a").exists(),
            "created below the planted symlink"
        );
    }

    /// `replace_file` judges the directory it writes in: another user's directory could
    /// be swapped for a symlink to anywhere between the check and the rename.
    #[test]
    fn a_ready_file_in_another_users_directory_is_refused() {
        use std::os::unix::fs::chown;
        if !as_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chown(&theirs, Some(65534), None).unwrap();
        let error = replace_file(&theirs.join("ready"), b"1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("theirs is owned by uid 65534"), "{error}");
        assert!(!theirs.join("ready").exists());
    }

    /// The mounter of a FUSE file system, from `/proc/self/mountinfo` (format:
    /// `proc(5)`): the `user_id` super option of the mount with that device.
    #[test]
    fn a_fuse_mounts_mounter_is_read_from_mountinfo() {
        let info = "36 35 98:0 / /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    41 22 0:52 / /tmp/fs rw,nosuid,nodev - fuse.sshfs host:/ rw,user_id=1000,group_id=1000\n\
                    42 22 0:53 / /mnt/r rw - fuse lxcfs rw,user_id=0,group_id=0\n";
        assert_eq!(fuse_mounter(info, "0:52"), Some(1000));
        assert_eq!(fuse_mounter(info, "0:53"), Some(0));
        assert_eq!(fuse_mounter(info, "98:0"), None);
        assert_eq!(fuse_mounter(info, "0:99"), None);
    }
}

//! cgroup v2 test cgroups.
//!
//! The mount point is read from `/proc/self/mounts` (on this machine it is
//! `/sys/fs/cgroup/unified`, a hybrid layout; elsewhere it is `/sys/fs/cgroup`).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Directories that a [`TestCgroup`] of this process created (and that therefore are ours to
/// remove). Sibling cgroups share parents; the last one dropped removes the parent.
static CREATED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn created() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    CREATED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cgroup v2 mount point, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    enforcer::fs::cgroup2_mount()
}

/// A cgroup made by a test. Drop kills every process in it (and below it), then removes it
/// leaf-first, then removes the parents this process created once they are empty.
#[derive(Debug)]
pub struct TestCgroup {
    mount: PathBuf,
    relative: PathBuf,
}

impl TestCgroup {
    /// `mkdir -p <mount>/<rel>`. `rel` must be relative and must not contain `..`.
    pub fn create(rel: impl AsRef<Path>) -> Result<Self> {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            bail!(
                "cgroup path {} must be relative without `..`",
                rel.display()
            );
        }
        let mount = cgroup2_mount()?;
        let mut dir = mount.clone();
        for c in rel.components() {
            dir.push(c);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    created().insert(dir.clone());
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", dir.display())),
            }
        }
        // The leaf is ours even if a crashed earlier run left it behind.
        created().insert(dir);
        Ok(Self {
            mount,
            relative: rel.to_path_buf(),
        })
    }

    /// A cgroup below this one.
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::create(self.relative.join(name))
    }

    /// Absolute path (under the cgroup v2 mount).
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.relative)
    }

    /// Path relative to the cgroup v2 mount: what `--cgroup-root` and the inventory's
    /// `cgroups:` take.
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// `relative()` as a string.
    pub fn relative_str(&self) -> String {
        self.relative.to_string_lossy().into_owned()
    }

    /// The cgroup id the kernel uses (`bpf_get_current_cgroup_id`): the directory's inode.
    pub fn id(&self) -> u64 {
        std::fs::metadata(self.path()).map(|m| m.ino()).unwrap_or(0)
    }

    /// Pids currently in this cgroup (not its children).
    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.path())
    }

    /// Moves a process into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.path().join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("write {pid} to {}", procs.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let leaf = self.path();
        if let Err(e) = remove_cgroup_tree(&leaf, Duration::from_secs(5)) {
            eprintln!("warning: cgroup cleanup: {e:#}");
        }
        let mut created = created();
        created.remove(&leaf);
        // Parents: remove those we created, innermost first, as long as they are empty.
        let mut dir = leaf.parent();
        while let Some(d) = dir {
            if d == self.mount || !created.contains(d) {
                break;
            }
            if std::fs::remove_dir(d).is_err() {
                break; // a sibling still lives; the last one out removes the parent
            }
            created.remove(d);
            dir = d.parent();
        }
    }
}

fn read_procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Every cgroup directory at and below `dir`, children before parents.
fn subtree_post_order(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    // Bounded depth: test cgroup trees are shallow; this guards against surprises.
    if depth < 32 {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for entry in rd.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    subtree_post_order(&entry.path(), out, depth + 1);
                }
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Kills every process in the subtree and removes it, retrying until `timeout` (processes
/// take a moment to leave a cgroup after SIGKILL).
pub fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if !dir.exists() {
            return Ok(());
        }
        let mut dirs = Vec::new();
        subtree_post_order(dir, &mut dirs, 0);
        let mut last_err = None;
        for d in &dirs {
            // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, including
            // processes forking right now; fall back to one SIGKILL per pid.
            if std::fs::write(d.join("cgroup.kill"), "1").is_err() {
                for pid in read_procs(d) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => last_err = Some((d.clone(), e)),
            }
        }
        match last_err {
            None => return Ok(()),
            Some((d, e)) if Instant::now() >= deadline => {
                bail!("cannot remove cgroup {}: {e}", d.display())
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

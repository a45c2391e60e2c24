//! Bundle directories on disk: read the files a bundle consists of, notice edits, validate,
//! stage a bundle in a fresh directory and swap it into place atomically.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use enforcer_policy::limits::{
    INVENTORY_BYTES, POLICY_FILES, POLICY_FILE_BYTES, POLICY_TOTAL_BYTES, SCHEMA_BYTES,
};
use enforcer_policy::{Bundle, INVENTORY_FILE, SCHEMA_FILE};

use super::is_bundle_file;
use crate::admission::text::cut;

/// The largest bundle file the PDP serves or a node accepts: the largest of the bundle's
/// limits per file (the inventory's).
pub const MAX_FILE_BYTES: u64 = INVENTORY_BYTES;
const _: () = assert!(MAX_FILE_BYTES >= SCHEMA_BYTES && MAX_FILE_BYTES >= POLICY_FILE_BYTES);

/// The longest name of a bundle file: the file system's limit on a name.
pub const MAX_NAME_BYTES: usize = libc::NAME_MAX as usize;

/// The most bytes of a string from the PDP's answer (a revision, a file name) that a message
/// repeats: the answer can be 64 MiB, and its errors go to the log and the status file.
pub const SHOWN_BYTES: usize = 64;

/// `text` as a message shows it: at most [`SHOWN_BYTES`], ending `...` when cut.
pub fn shown(text: &str) -> String {
    cut(text, SHOWN_BYTES)
}

/// Cheap change detection: (name, size, mtime) of every entry [`Bundle::load`] looks at
/// (every name not starting with `.`, so that a stray file, which makes the bundle invalid,
/// is noticed too), sorted.
pub type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut entries: Fingerprint = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                return None;
            }
            // Follows symlinks (a Kubernetes ConfigMap mount is all symlinks).
            match std::fs::metadata(entry.path()) {
                Ok(meta) => Some((name, meta.len(), meta.modified().ok())),
                Err(_) => Some((name, 0, None)),
            }
        })
        .collect();
    entries.sort();
    entries
}

/// The bundle files of `dir` (exactly what [`Bundle::load`] reads), by name.
pub fn read_bundle_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_bundle_file(&name) {
            continue;
        }
        let path = entry.path();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            // Removed while we looked: the next look sees the directory as it is then.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if !meta.is_file() {
            continue;
        }
        if meta.len() > MAX_FILE_BYTES {
            bail!(
                "{} is {} bytes, more than the {MAX_FILE_BYTES} a bundle file may have",
                path.display(),
                meta.len()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        files.insert(name, text);
    }
    Ok(files)
}

/// A directory that is removed, with its contents, on drop (unless [`Staged::keep`] was
/// called).
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    keep: bool,
}

impl Staged {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (it has been renamed into service).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `<parent>/.<name>.<tag>-<pid>-<n>-<random>`: a sibling of `target` (same file system, so
/// rename works), hidden, unique within and across processes, and not guessable: in a shared
/// `TMPDIR` another user could otherwise create the name first and fail every stage.
pub fn sibling(target: &Path, tag: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .with_context(|| format!("{} has no file name", target.display()))?
        .to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u8; 8];
    // SAFETY: getrandom writes at most `random.len()` bytes into it.
    let got = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if got != random.len() as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom");
    }
    Ok(parent.join(format!(
        ".{name}.{tag}-{}-{n}-{:016x}",
        std::process::id(),
        u64::from_ne_bytes(random)
    )))
}

/// Checks `files` against the limits [`Bundle::load`] applies, before anything is written:
/// every name is a bundle file ([`is_bundle_file`], at most [`MAX_NAME_BYTES`]), there are no
/// more files than a bundle can hold, no file is over its own limit, and the policy files
/// together are within theirs. An answer of 64 MiB could otherwise name millions of empty
/// files, each an inode (on tmpfs, kernel memory charged to the agent) before the load
/// refused them. No bundle that loads is refused here: the limits are the load's own.
pub fn check_bounds(files: &BTreeMap<String, String>) -> Result<()> {
    let most = POLICY_FILES + 2;
    if files.len() > most {
        bail!(
            "the bundle has {} files; the limit is {most} ({POLICY_FILES} policy files (*.cedar), {INVENTORY_FILE} and {SCHEMA_FILE})",
            files.len()
        );
    }
    let mut policies = 0usize;
    let mut total = 0u64;
    for (name, text) in files {
        if name.len() > MAX_NAME_BYTES {
            bail!(
                "the bundle names a file of {} bytes ({:?}); the limit is {MAX_NAME_BYTES} bytes",
                name.len(),
                shown(name)
            );
        }
        if !is_bundle_file(name) {
            bail!(
                "the bundle names a file {:?}, which is not a bundle file ({INVENTORY_FILE}, {SCHEMA_FILE}, *.cedar)",
                shown(name)
            );
        }
        let bytes = text.len() as u64;
        let (what, limit) = if name == INVENTORY_FILE {
            ("the inventory", INVENTORY_BYTES)
        } else if name == SCHEMA_FILE {
            ("the schema", SCHEMA_BYTES)
        } else {
            policies += 1;
            total += bytes;
            ("the policy file", POLICY_FILE_BYTES)
        };
        if bytes > limit {
            bail!(
                "{what} {:?} is {bytes} bytes; the limit is {limit} bytes",
                shown(name)
            );
        }
    }
    if policies > POLICY_FILES {
        bail!("the bundle has {policies} policy files (*.cedar); the limit is {POLICY_FILES}");
    }
    if total > POLICY_TOTAL_BYTES {
        bail!(
            "the policy files (*.cedar) are {total} bytes together; the limit is {POLICY_TOTAL_BYTES} bytes"
        );
    }
    Ok(())
}

/// Reads the `files` of an answer ([`super::WireBundle`]) with two of [`check_bounds`]'s
/// limits applied while it is parsed: at most `POLICY_FILES + 2` files, and names of at most
/// [`MAX_NAME_BYTES`]. Read whole first, a 64 MiB answer of millions of empty files was a map
/// of several hundred MB before [`check_bounds`] could refuse it (red-team review 71 N3); here
/// the map never holds more than one file past the limit, and parsing stops there. The rest
/// (which names, what sizes) is [`check_bounds`]'s, before anything is written.
pub fn deserialize_files<'de, D>(
    deserializer: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserializer.deserialize_map(BoundedFiles)
}

/// The map visitor of [`deserialize_files`].
struct BoundedFiles;

impl<'de> serde::de::Visitor<'de> for BoundedFiles {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "a map of at most {} bundle files, by name, to their text",
            POLICY_FILES + 2
        )
    }

    fn visit_map<A>(self, mut map: A) -> std::result::Result<Self::Value, A::Error>
    where
        A: serde::de::MapAccess<'de>,
    {
        use serde::de::Error;
        let most = POLICY_FILES + 2;
        let mut files = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            if name.len() > MAX_NAME_BYTES {
                return Err(A::Error::custom(format_args!(
                    "the bundle names a file of {} bytes ({:?}); the limit is {MAX_NAME_BYTES} bytes",
                    name.len(),
                    shown(&name)
                )));
            }
            let text: String = map.next_value()?;
            files.insert(name, text);
            if files.len() > most {
                return Err(A::Error::custom(format_args!(
                    "the bundle has more than {most} files; the limit is {most} ({POLICY_FILES} policy files (*.cedar), {INVENTORY_FILE} and {SCHEMA_FILE})"
                )));
            }
        }
        Ok(files)
    }
}

/// Writes `files` into a fresh directory `dir` (which must not exist). The names and sizes are
/// checked with [`check_bounds`] first: a bundle cannot write outside its directory, nor more
/// than a bundle can hold.
pub fn stage(dir: PathBuf, files: &BTreeMap<String, String>) -> Result<Staged> {
    check_bounds(files)?;
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = Staged {
        path: dir,
        keep: false,
    };
    for (name, text) in files {
        let path = staged.path.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(staged)
}

/// Validates the bundle in `dir`: it loads, and it compiles (a policy can load and still
/// be one the kernel table cannot represent, e.g. too many port exceptions), so that a PDP
/// never publishes, and a node never installs, a bundle every agent would reject. Its
/// revision, or the problems as text.
pub fn validate(dir: &Path) -> std::result::Result<String, String> {
    let bundle = Bundle::load(dir).map_err(|diagnostics| diagnostics.to_string())?;
    bundle.compile().map_err(|error| error.to_string())?;
    Ok(bundle.revision().to_string())
}

/// Puts the directory `staged` in the place of `target` in one step: `renameat2` with
/// `RENAME_EXCHANGE` when `target` exists (a reader sees the old directory or the new one,
/// never an empty or half-written one), a plain rename when it does not. The old contents
/// are removed afterwards.
pub fn swap_into(staged: Staged, target: &Path) -> Result<()> {
    if std::fs::symlink_metadata(target).is_err() {
        std::fs::rename(staged.path(), target).with_context(|| {
            format!(
                "renaming {} to {}",
                staged.path().display(),
                target.display()
            )
        })?;
        staged.keep();
        return Ok(());
    }
    exchange(staged.path(), target)?;
    // `staged.path()` now names the previous contents; dropping `staged` removes them.
    drop(staged);
    Ok(())
}

fn exchange(a: &Path, b: &Path) -> Result<()> {
    let ca = CString::new(a.as_os_str().as_bytes()).context("path with a NUL byte")?;
    let cb = CString::new(b.as_os_str().as_bytes()).context("path with a NUL byte")?;
    // SAFETY: renameat2(2) with two valid NUL-terminated paths, relative to the cwd. Called
    // through syscall(2) because libc's wrapper is missing on some C libraries (musl).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "exchanging {} with {} (renameat2 RENAME_EXCHANGE)",
                a.display(),
                b.display()
            )
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temp file and a rename: readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}", path.display())
    })
}

/// Removes leftovers of an earlier process that died between staging and swapping:
/// `.<target name>.stage-*` siblings of `target`.
pub fn remove_stale_stages(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefix = format!(".{}.stage-", name.to_string_lossy());
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temp dir for unit tests, removed on drop.
    pub struct TestDir(pub PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("enforcer-pdp-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_only_bundle_files() {
        let dir = TestDir::new("read");
        for (name, text) in [
            ("inventory.yaml", "i"),
            ("a.cedar", "a"),
            ("README.md", "r"),
            (".hidden.cedar", "h"),
            ("schema.cedarschema", "s"),
        ] {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        std::fs::create_dir(dir.0.join("sub.cedar")).unwrap();
        let read = read_bundle_files(&dir.0).unwrap();
        assert_eq!(
            read,
            files(&[
                ("a.cedar", "a"),
                ("inventory.yaml", "i"),
                ("schema.cedarschema", "s")
            ])
        );
        // The fingerprint sees every entry the bundle load looks at, strays included (they
        // make the bundle invalid, so adding one must trigger a reload that reports it).
        let names: Vec<_> = fingerprint(&dir.0).into_iter().map(|f| f.0).collect();
        assert_eq!(
            names,
            [
                "README.md",
                "a.cedar",
                "inventory.yaml",
                "schema.cedarschema",
                "sub.cedar"
            ]
        );
    }

    #[test]
    fn stage_refuses_names_outside_the_bundle() {
        let dir = TestDir::new("stage");
        for bad in [
            "../x.cedar",
            "/etc/passwd",
            ".x.cedar",
            "notes.txt",
            ".cedar",
        ] {
            let err = stage(dir.0.join("s"), &files(&[(bad, "x")])).unwrap_err();
            assert!(
                err.to_string().contains("not a bundle file"),
                "{bad}: {err}"
            );
            assert!(!dir.0.join("s").exists());
        }
    }

    #[test]
    fn swap_replaces_the_whole_directory_and_cleans_up() {
        let dir = TestDir::new("swap");
        let target = dir.0.join("bundle");
        let first = stage(
            sibling(&target, "stage").unwrap(),
            &files(&[("a.cedar", "1"), ("b.cedar", "1")]),
        )
        .unwrap();
        swap_into(first, &target).unwrap();
        assert_eq!(
            read_bundle_files(&target).unwrap(),
            files(&[("a.cedar", "1"), ("b.cedar", "1")])
        );
        let second = stage(
            sibling(&target, "stage").unwrap(),
            &files(&[("a.cedar", "2")]),
        )
        .unwrap();
        swap_into(second, &target).unwrap();
        assert_eq!(
            read_bundle_files(&target).unwrap(),
            files(&[("a.cedar", "2")])
        );
        // Only the target is left: no staging or old directories.
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["bundle"]);
    }

    #[test]
    fn stale_stages_are_removed() {
        let dir = TestDir::new("stale");
        let target = dir.0.join("bundle");
        let staged = stage(
            sibling(&target, "stage").unwrap(),
            &files(&[("a.cedar", "1")]),
        )
        .unwrap();
        let path = staged.path().to_path_buf();
        staged.keep();
        assert!(path.exists());
        remove_stale_stages(&target);
        assert!(!path.exists());
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = TestDir::new("atomic");
        let file = dir.0.join("status.json");
        write_atomic(&file, b"1").unwrap();
        write_atomic(&file, b"2").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }
}

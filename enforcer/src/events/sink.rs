//! Where lines go: standard output or a file, appended with one `write` per batch of whole
//! lines (the events of one ring-buffer drain, see [`super::Emitter::flush`]), so that a tail
//! or a log shipper never sees half of one, and a flood costs one system call per batch, not
//! one per event.
//!
//! A file rotates by size (`--events-max-bytes`, `--events-keep`): before a line that would
//! take the file past the limit, `FILE.(N-1)` becomes `FILE.N` ... `FILE` becomes `FILE.1`
//! (the oldest beyond `keep` is replaced, so dropped) and a new `FILE` is opened. A line is
//! never split across files; one longer than the limit gets a file of its own. `reopen`
//! (SIGUSR1) opens `FILE` again, for a logrotate that renamed it: lines written until then went
//! to the renamed file, which a shipper following by inode reads to its end.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Size-based rotation of the events file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rotation {
    /// Rotate before a line would take the file past this many bytes; `None`: never.
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`FILE.1` newest ... `FILE.<keep>` oldest); 0 deletes the full file.
    pub keep: u32,
}

impl Rotation {
    /// Default `--events-keep`.
    pub const DEFAULT_KEEP: u32 = 5;
}

/// `--events-max-bytes`: a number of bytes, or with a binary suffix `K`, `M`, `G` (`100M` is
/// 100 MiB).
pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => trimmed.split_at(i),
        None => (trimmed, ""),
    };
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => bail!("{text:?}: a size is a number of bytes, optionally with K, M or G"),
    };
    let n: u64 = digits.parse().with_context(|| {
        format!("{text:?}: a size is a number of bytes, optionally with K, M or G")
    })?;
    let bytes = n
        .checked_mul(factor)
        .with_context(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        bail!("{text:?}: the size must be at least 1 byte");
    }
    Ok(bytes)
}

pub enum Sink {
    Stdout(io::Stdout),
    File(FileSink),
}

impl Sink {
    /// `-` means standard output (never rotated).
    pub fn open(target: &str, rotation: Rotation) -> Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout(io::stdout()));
        }
        Ok(Sink::File(FileSink::open(Path::new(target), rotation)?))
    }

    /// Writes one line (ending in `\n`) whole.
    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        self.write_lines(line)
    }

    /// Writes whole lines (`batch` is empty or ends in `\n`): one `write` for the batch (more
    /// only where the file rotates between two of its lines).
    pub fn write_lines(&mut self, batch: &[u8]) -> Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(batch)?;
                out.flush()?;
                Ok(())
            }
            Sink::File(file) => file.write_lines(batch),
        }
    }

    /// Where the lines written so far end: the file (device, inode) and its length; none for
    /// standard output.
    pub fn position(&self) -> Option<Written> {
        match self {
            Sink::Stdout(_) => None,
            Sink::File(file) => file.id.map(|(dev, ino)| Written {
                dev,
                ino,
                len: file.size,
            }),
        }
    }

    /// Opens the file again by its name (SIGUSR1); nothing for standard output.
    pub fn reopen(&mut self) -> Result<()> {
        match self {
            Sink::Stdout(_) => Ok(()),
            Sink::File(file) => file.reopen(),
        }
    }
}

/// The events file.
/// Where an events file's written lines end (see [`Sink::position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub dev: u64,
    pub ino: u64,
    /// Bytes: every line written before ends at or before this offset.
    pub len: u64,
}

pub struct FileSink {
    path: PathBuf,
    file: File,
    /// The open file's device and inode (none if they could not be read).
    id: Option<(u64, u64)>,
    /// Bytes in the file as opened, plus what this sink wrote since.
    size: u64,
    rotation: Rotation,
    /// After a failed rotation, the size at which to try again (not on every line).
    retry_at: Option<u64>,
}

/// Opens the events file for appending (created with the umask's mode, so that a log shipper
/// running as another user can read it). A regular file must be one no other
/// user can change, with no other name, in a directory no other user can change
/// ([`crate::fs::writable_by_others`]): the SOC's record of every deny would otherwise be
/// theirs to edit, or a link they planted would point the agent's writes elsewhere. A device
/// or a FIFO (`/dev/null`, a shipper's pipe) must be root's or the agent's user's. The open
/// does not block: a FIFO without a reader is an error, not a hang.
fn open_append(path: &Path) -> Result<(File, u64)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // The directory is judged before anything is created in it, and the name opened without
    // following a symlink: one planted by a member of a group-writable log directory would
    // otherwise have root create a file wherever it points (an empty `/etc/nologin`).
    let target = crate::fs::creatable(path, crate::fs::Above::GroupMayWrite, "the events file")?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&target)
        .with_context(|| format!("opening the events file {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let problems = if meta.is_file() {
        crate::fs::writable_by_others(&target, &meta, crate::fs::Above::GroupMayWrite)?
    } else {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() == 0 || meta.uid() == me {
            Vec::new()
        } else {
            vec![format!("{} is owned by uid {}", path.display(), meta.uid())]
        }
    };
    if !problems.is_empty() {
        anyhow::bail!(
            "refusing the events file {}: another user could change or read the events: {}",
            path.display(),
            problems.join("; ")
        );
    }
    // Writes block as before (a full pipe waits for the shipper).
    // SAFETY: fcntl on an fd this function owns.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("making {} blocking", path.display()));
        }
    }
    let mut size = meta.len();
    if meta.is_file() && size > 0 {
        size += end_a_cut_line(&file, size, path);
    }
    Ok((file, size))
}

/// Ends the last line of the regular file `file` (opened for appending only, `size` bytes)
/// if it was cut: an agent killed in the middle of a write (a SIGKILL or the OOM killer cuts
/// a `write` short) left half a line, and the first line appended would continue it and be
/// lost with it. The half line becomes a line of its own, which no reader takes for an event
/// (`enforcer events` counts it as unreadable, a shipper rejects it alone). Returns the bytes
/// added (0 or 1). Never an error: a file that cannot be read back (its last byte read
/// through `/proc/self/fd`) or ended (a full disk) is written on as it is, said in the log;
/// the events must not stop for it.
fn end_a_cut_line(file: &File, size: u64, path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    let mut last = [0u8; 1];
    let read = File::open(format!("/proc/self/fd/{fd}"))
        .and_then(|reader| reader.read_exact_at(&mut last, size - 1));
    match read {
        Ok(()) if last[0] == b'\n' => 0,
        Ok(()) => match (&*file).write_all(b"\n") {
            Ok(()) => {
                tracing::warn!(
                    file = %path.display(),
                    "the events file ended in the middle of a line (an agent was killed \
                     while writing it): ended with a newline, so that the lines appended \
                     now stay whole"
                );
                1
            }
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "the events file ends in the \
                    middle of a line and could not be ended: the next line continues it");
                0
            }
        },
        // Truncated meanwhile: nothing to end.
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => 0,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "could not read the events file's \
                last byte: a line an agent was killed writing, if any, is not ended");
            0
        }
    }
}

/// `FILE.n`.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl FileSink {
    pub fn open(path: &Path, rotation: Rotation) -> Result<Self> {
        let (file, size) = open_append(path)?;
        Ok(FileSink {
            path: path.to_path_buf(),
            id: file_id(&file),
            file,
            size,
            rotation,
            retry_at: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        self.write_lines(line)
    }

    /// [`Sink::write_lines`]: the batch goes out in one `write`, split only before a line
    /// that rotation is due at.
    pub fn write_lines(&mut self, batch: &[u8]) -> Result<()> {
        let Some(max) = self.rotation.max_bytes else {
            return self.append(batch);
        };
        // The usual case: the whole batch fits, no line needs looking at.
        if self.size + batch.len() as u64 <= max {
            return self.append(batch);
        }
        // `start..end`: the lines not yet written; `size`: the file's size once they are.
        let (mut start, mut end, mut size) = (0, 0, self.size);
        for line in batch.split_inclusive(|&b| b == b'\n') {
            let due = size > 0 && size + line.len() as u64 > max;
            if due && self.retry_at.is_none_or(|at| size >= at) {
                self.append(&batch[start..end])?;
                start = end;
                match self.rotate() {
                    Ok(()) => self.retry_at = None,
                    Err(error) => {
                        // The line still goes out, to the file as it is: losing events to
                        // a failed rename would be worse than a file over its size.
                        tracing::error!(
                            file = %self.path.display(),
                            "rotating the events file failed; writing on to it: {error:#}"
                        );
                        self.retry_at = Some(self.size + max);
                    }
                }
                size = self.size;
            }
            end += line.len();
            size += line.len() as u64;
        }
        self.append(&batch[start..end])
    }

    /// Appends whole lines. A write that fails part-way (a full disk) is cut back to the
    /// last whole line the file had, so that the next write does not continue half a line.
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.file.write_all(bytes) {
            let cut = self.file.set_len(self.size);
            return Err(error).with_context(|| {
                format!(
                    "writing to the events file {}{}",
                    self.path.display(),
                    match cut {
                        Ok(()) => String::new(),
                        Err(e) => format!(" (and cutting its partial line failed: {e})"),
                    }
                )
            });
        }
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// `FILE` -> `FILE.1` -> ... -> `FILE.<keep>`, then a new `FILE`.
    fn rotate(&mut self) -> Result<()> {
        let ignore_missing = |result: io::Result<()>| match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let keep = self.rotation.keep;
        if keep == 0 {
            ignore_missing(std::fs::remove_file(&self.path))
                .with_context(|| format!("removing {}", self.path.display()))?;
        } else {
            // The oldest goes first, so that no rename below replaces a file: ext4 (with its
            // default `auto_da_alloc`) writes back the renamed file at once, inside the
            // `rename`, when it replaces another; that was a fifth of the agent's CPU under a
            // flood rotating every second (`perf`: `ext4_rename` -> `ext4_writepages`), work
            // the kernel's flusher threads do otherwise.
            let oldest = rotated_path(&self.path, keep);
            ignore_missing(std::fs::remove_file(&oldest))
                .with_context(|| format!("removing {}", oldest.display()))?;
            for n in (1..keep).rev() {
                let from = rotated_path(&self.path, n);
                let to = rotated_path(&self.path, n + 1);
                ignore_missing(std::fs::rename(&from, &to))
                    .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
            }
            let first = rotated_path(&self.path, 1);
            std::fs::rename(&self.path, &first).with_context(|| {
                format!("renaming {} to {}", self.path.display(), first.display())
            })?;
        }
        self.reopen()
    }

    pub fn reopen(&mut self) -> Result<()> {
        let (file, size) = open_append(&self.path)?;
        self.id = file_id(&file);
        self.file = file;
        self.size = size;
        Ok(())
    }
}

fn file_id(file: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("oc-sink-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn line(i: usize) -> Vec<u8> {
        // Lines of different lengths, so that the limit falls inside lines.
        format!("{{\"seq\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 37)).into_bytes()
    }

    fn lines_of(path: &Path) -> Vec<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                assert!(
                    text.is_empty() || text.ends_with('\n'),
                    "{} ends inside a line",
                    path.display()
                );
                text.lines().map(str::to_string).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn rotation_keeps_every_line_whole_and_in_order() {
        let dir = Dir::new("rotate");
        let path = dir.0.join("events.jsonl");
        let rotation = Rotation {
            max_bytes: Some(400),
            keep: 100,
        };
        let mut sink = FileSink::open(&path, rotation).unwrap();
        let n = 500;
        for i in 0..n {
            sink.write_line(&line(i)).unwrap();
        }
        // Oldest file first: FILE.<k> ... FILE.1, FILE.
        let mut files: Vec<PathBuf> = (1..=100)
            .rev()
            .map(|k| rotated_path(&path, k))
            .filter(|p| p.exists())
            .collect();
        assert!(files.len() > 10, "{} rotations only", files.len());
        assert!(!rotated_path(&path, files.len() as u32 + 1).exists());
        files.push(path.clone());
        let mut all = Vec::new();
        for file in &files {
            let size = std::fs::metadata(file).unwrap().len();
            assert!(size <= 400, "{} has {size} bytes", file.display());
            all.extend(lines_of(file));
        }
        let expected: Vec<String> = (0..n)
            .map(|i| String::from_utf8(line(i)).unwrap().trim_end().to_string())
            .collect();
        assert_eq!(all, expected);
    }

    /// No rename of a rotation replaces a file (the directory's own inotify events, in
    /// order): on ext4 such a rename writes the renamed file back at once, in the agent's
    /// time (a fifth of its CPU under a flood rotating twice a second).
    #[test]
    fn no_rotation_renames_over_a_file() {
        use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
        let dir = Dir::new("over");
        let path = dir.0.join("events.jsonl");
        let inotify = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(
            &inotify,
            &dir.0,
            WatchFlags::CREATE | WatchFlags::DELETE | WatchFlags::MOVED_FROM | WatchFlags::MOVED_TO,
        )
        .unwrap();
        let rotation = Rotation {
            max_bytes: Some(400),
            keep: 2,
        };
        let mut sink = FileSink::open(&path, rotation).unwrap();
        for i in 0..100 {
            sink.write_line(&line(i)).unwrap();
        }
        let mut existing = std::collections::BTreeSet::new();
        let (mut moves, mut buf) = (0, [std::mem::MaybeUninit::uninit(); 4096]);
        let mut events = inotify::Reader::new(&inotify, &mut buf);
        loop {
            let event = match events.next() {
                Ok(event) => event,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(error) => panic!("reading inotify: {error}"),
            };
            let name = event.file_name().unwrap().to_string_lossy().into_owned();
            let flags = event.events();
            if flags.intersects(ReadFlags::CREATE) {
                existing.insert(name);
            } else if flags.intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM) {
                existing.remove(&name);
            } else if flags.intersects(ReadFlags::MOVED_TO) {
                assert!(existing.insert(name.clone()), "a rename replaced {name}");
                moves += 1;
            }
        }
        assert!(moves > 10, "{moves} renames only");
    }

    /// A batch rotates exactly where its lines one by one would: the same files, byte for
    /// byte, whatever the batch sizes (1 to 40 lines, so that limits fall inside batches).
    #[test]
    fn a_batch_rotates_where_its_lines_one_by_one_would() {
        let dir = Dir::new("batch");
        let rotation = Rotation {
            max_bytes: Some(400),
            keep: 100,
        };
        let single = dir.0.join("single.jsonl");
        let batched = dir.0.join("batched.jsonl");
        let n = 500;
        let mut one = FileSink::open(&single, rotation).unwrap();
        for i in 0..n {
            one.write_line(&line(i)).unwrap();
        }
        let mut many = FileSink::open(&batched, rotation).unwrap();
        let (mut i, mut size) = (0, 1);
        while i < n {
            let batch: Vec<u8> = (i..(i + size).min(n)).flat_map(line).collect();
            many.write_lines(&batch).unwrap();
            i += size;
            size = size % 40 + 7;
        }
        many.write_lines(b"").unwrap();
        let files = |path: &Path| -> Vec<String> {
            (0..=100)
                .rev()
                .map(|k| {
                    if k == 0 {
                        path.to_path_buf()
                    } else {
                        rotated_path(path, k)
                    }
                })
                .filter(|p| p.exists())
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect()
        };
        let (a, b) = (files(&single), files(&batched));
        assert!(a.len() > 10, "{} files only", a.len());
        assert_eq!(a, b);
    }

    #[test]
    fn only_keep_files_are_kept_and_they_are_the_newest() {
        let dir = Dir::new("keep");
        let path = dir.0.join("events.jsonl");
        let mut sink = FileSink::open(
            &path,
            Rotation {
                max_bytes: Some(300),
                keep: 2,
            },
        )
        .unwrap();
        for i in 0..200 {
            sink.write_line(&line(i)).unwrap();
        }
        assert!(rotated_path(&path, 2).exists());
        assert!(!rotated_path(&path, 3).exists());
        let mut tail = lines_of(&rotated_path(&path, 2));
        tail.extend(lines_of(&rotated_path(&path, 1)));
        tail.extend(lines_of(&path));
        let last: Vec<String> = (200 - tail.len()..200)
            .map(|i| String::from_utf8(line(i)).unwrap().trim_end().to_string())
            .collect();
        assert_eq!(
            tail, last,
            "the kept files hold the newest lines, contiguous"
        );
    }

    #[test]
    fn a_line_longer_than_the_limit_gets_a_file_of_its_own() {
        let dir = Dir::new("long");
        let path = dir.0.join("events.jsonl");
        let mut sink = FileSink::open(
            &path,
            Rotation {
                max_bytes: Some(10),
                keep: 0,
            },
        )
        .unwrap();
        let long = format!("{}\n", "y".repeat(50));
        sink.write_line(b"short\n").unwrap();
        sink.write_line(long.as_bytes()).unwrap();
        // keep 0: the full file was removed, the long line is whole in the new one.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), long);
        assert!(!rotated_path(&path, 1).exists());
    }

    #[test]
    fn reopen_follows_a_rename_and_appends_to_an_existing_file() {
        let dir = Dir::new("reopen");
        let path = dir.0.join("events.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let mut sink = FileSink::open(&path, Rotation::default()).unwrap();
        sink.write_line(b"one\n").unwrap();
        let moved = dir.0.join("events.jsonl.moved");
        std::fs::rename(&path, &moved).unwrap();
        // Until SIGUSR1, lines go to the renamed file (same inode).
        sink.write_line(b"two\n").unwrap();
        sink.reopen().unwrap();
        sink.write_line(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "old\none\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }

    /// A file an agent was killed writing ends in half a line: the next agent's first line
    /// starts a line of its own (it was glued to the half and lost with it), and the size
    /// that rotation counts includes the newline added. Also after a SIGUSR1 reopen.
    #[test]
    fn a_line_cut_by_a_killed_agent_is_ended_before_anything_is_appended() {
        let dir = Dir::new("torn");
        let path = dir.0.join("events.jsonl");
        std::fs::write(&path, "{\"seq\":1}\n{\"seq\":2,\"ty").unwrap();
        let mut sink = FileSink::open(&path, Rotation::default()).unwrap();
        assert_eq!(sink.size, 23);
        sink.write_line(b"{\"seq\":1}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"seq\":1}\n{\"seq\":2,\"ty\n{\"seq\":1}\n"
        );
        std::fs::write(&path, "whole\nhalf").unwrap();
        sink.reopen().unwrap();
        sink.write_line(b"next\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "whole\nhalf\nnext\n"
        );
        // A whole file, or an empty one, is left as it is.
        std::fs::write(&path, "whole\n").unwrap();
        sink.reopen().unwrap();
        sink.write_line(b"next\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "whole\nnext\n");
    }

    #[test]
    fn a_failed_rotation_writes_on_and_loses_nothing() {
        let dir = Dir::new("fail");
        let path = dir.0.join("events.jsonl");
        let mut sink = FileSink::open(
            &path,
            Rotation {
                max_bytes: Some(20),
                keep: 1,
            },
        )
        .unwrap();
        // FILE.1 as a non-empty directory: renaming FILE over it fails.
        std::fs::create_dir(rotated_path(&path, 1)).unwrap();
        std::fs::write(rotated_path(&path, 1).join("x"), "").unwrap();
        for i in 0..5 {
            sink.write_line(format!("line {i} of the file\n").as_bytes())
                .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("100M").unwrap(), 100 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "0", "-1", "1T", "M", "1.5M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    /// A regular events file another user could change is refused (they could edit or
    /// delete the record of every deny); a device is taken as it is.
    #[test]
    fn an_events_file_another_user_could_change_is_refused() {
        use std::os::unix::fs::{chown, PermissionsExt};
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.json");
        std::fs::write(&path, "").unwrap();
        chown(&path, Some(65534), None).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&path, Rotation::default()).err().unwrap()
        );
        assert!(error.contains("owned by uid 65534"), "{error}");
        chown(&path, Some(0), None).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&path, Rotation::default()).err().unwrap()
        );
        assert!(
            error.contains("writable by its group or other users (mode 0666)"),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        FileSink::open(&path, Rotation::default()).unwrap();
        Sink::open("/dev/null", Rotation::default()).unwrap();
        // A log directory its group may write (Ubuntu's /var/log) holds it; one anyone may
        // write does not.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        FileSink::open(&path, Rotation::default()).unwrap();
        // There, a member of the group could plant a symlink at the events path: root must
        // not create the file it points at (before, `O_CREAT` followed it).
        let planted = dir.path().join("planted.json");
        let victim = dir.path().join("nologin");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        std::os::unix::fs::lchown(&planted, Some(65534), None).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&planted, Rotation::default()).err().unwrap()
        );
        assert!(
            error.contains("the symlink") && error.contains("uid 65534"),
            "{error}"
        );
        assert!(!victim.exists(), "the planted symlink's target was created");
        std::fs::remove_file(&planted).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&path, Rotation::default()).err().unwrap()
        );
        assert!(error.contains("(mode 0777)"), "{error}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // Another name for the file (a hard link planted to a system file) is refused.
        let alias = dir.path().join("alias");
        std::fs::hard_link(&path, &alias).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&path, Rotation::default()).err().unwrap()
        );
        assert!(error.contains("has 2 hard links"), "{error}");
        std::fs::remove_file(&alias).unwrap();
        // Another user's FIFO: refused, never waited on.
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o666) }, 0);
        chown(&fifo, Some(65534), None).unwrap();
        let error = format!(
            "{:#}",
            FileSink::open(&fifo, Rotation::default()).err().unwrap()
        );
        assert!(
            error.to_lowercase().contains("no such device or address")
                || error.contains("owned by uid 65534"),
            "{error}"
        );
    }
}

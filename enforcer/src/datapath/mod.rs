//! The kernel side as the agent sees it: load the BPF object with its maps pinned, attach the
//! cgroup programs (`enforcer_common::programs::ALL`) to the enforced subtree (or adopt
//! the links a previous agent pinned), and hand out typed map handles. Reads as open -> configure -> load -> attach.

mod ingress;
mod links;
pub mod locked;
mod rates;
pub mod ringbuf;
mod tables;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};
use enforcer_common::{maps, ABI_VERSION};
use ringbuf::RingReader;

pub use ingress::IngressWriter;
pub use links::{attached_programs, link_update, AttachReport, HookAttachment};
pub use rates::RateWriter;
pub(crate) use tables::open_typed;
pub use tables::{
    kernel_stats, kernel_stats_with, lost_events, map_id, ApplyReport, Capacities,
    CapacityOverrides, ConfigView, DesiredState, Flip, KernelStats, MapContents, MapFill, Need,
    Needs, SwapStep, Tables,
};

/// The kernel programs, built by `cargo xtask build-ebpf` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ENFORCER_BPF_OBJECT"));

/// The versioned directory under the pin root that holds this ABI's maps and links.
pub fn pin_dir(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{ABI_VERSION}"))
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14; the value
/// `bpf_get_netns_cookie` gives the kernel programs), read off a socket made for the
/// purpose. Errors: the socket cannot be made, or the kernel does not know the option.
pub fn netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .context("a socket to read the network namespace's cookie from")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; the fd is open
    // for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// [`crate::wire::repair_spent_filter`], with a warning when it had to set slots.
fn repair_spent_filter(dir: &Path) -> Result<()> {
    let repaired = crate::wire::repair_spent_filter(dir)?;
    if repaired > 0 {
        tracing::warn!(
            slots = repaired,
            "{} held spent options that {} did not stand for (it was made anew beside them): those slots now send every option to the full lookup for the next hour",
            maps::SPENT_TAGS,
            maps::SPENT_RECENT
        );
    }
    Ok(())
}

pub struct LoadOptions<'a> {
    pub pin_root: &'a Path,
    /// Ring buffer size in bytes (a power of two, a multiple of the page size); `None` keeps
    /// the default, and an already pinned ring buffer keeps its size.
    pub ring_buffer_bytes: Option<u32>,
    /// `max_entries` of maps this load creates (pinned ones keep theirs).
    pub capacity: CapacityOverrides,
}

pub struct Datapath {
    dir: PathBuf,
    ebpf: Ebpf,
    pub tables: Tables,
    /// An exclusive lock on the pin directory for as long as this agent lives: two agents
    /// writing the same maps would undo each other's policy.
    _lock: std::fs::File,
    /// Other releases' pin directories (`v<N>` beside ours), locked at load and removed once
    /// this agent's hooks are in place (see [`Datapath::attach`]).
    other_abis: Vec<(PathBuf, std::fs::File)>,
}

impl Datapath {
    /// Loads the object. Maps already pinned (a previous agent's) are adopted, so the kernel
    /// keeps its state; missing ones are created and pinned.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        crate::fs::ensure_bpffs(options.pin_root)?;
        let dir = pin_dir(options.pin_root);
        // Only this agent's user may open them: a user who could unlink a link pin would
        // detach its hook, and one who could open the directory could `flock` it.
        crate::fs::private_dir(options.pin_root, 0o700)?;
        crate::fs::private_dir(&dir, 0o700)?;
        let lock = lock_exclusive(&dir)?;
        let other_abis = lock_other_abis(options.pin_root)?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&dir);
        if let Some(bytes) = options.ring_buffer_bytes {
            loader.map_max_entries(maps::EVENTS, bytes);
        }
        for (name, entries) in options.capacity.map_sizes() {
            loader.map_max_entries(name, entries);
        }
        let ebpf = loader.load(OBJECT).with_context(|| {
            format!(
                "loading the BPF object with maps pinned in {}",
                dir.display()
            )
        })?;
        // Before `attach`, so that this load's programs never read a broken filter.
        repair_spent_filter(&dir)?;
        let tables = Tables::open(&dir)?;
        crate::flows::set_tenant_limit(&dir, options.capacity.flows_per_tenant)?;
        let wanted = options.capacity.over(tables.capacities());
        if wanted != tables.capacities() {
            tracing::warn!(pinned = ?tables.capacities(), asked = ?wanted, "the pinned maps keep the capacity they were created with; `enforcer detach` and restart to resize them");
        }
        Ok(Self {
            dir,
            ebpf,
            tables,
            _lock: lock,
            other_abis,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Attaches the programs to `cgroup_root`, or adopts links pinned by an earlier agent.
    /// Call it after the first policy is written, so that nothing is judged by empty tables.
    ///
    /// Then removes the pins of other releases (ABI directories beside this one): their links
    /// held the previous release's programs on its own maps, which no agent writes any more,
    /// deciding beside ours after an upgrade that changed the ABI (their denies stood, their
    /// ingress check refused newer options, and they never learnt this agent's cgroup). Only
    /// after this agent's hooks are in place, so the node is never without a hook.
    pub fn attach(&mut self, cgroup_root: &Path) -> Result<AttachReport> {
        let mut report = links::attach_or_adopt(&mut self.ebpf, &self.dir, cgroup_root)?;
        // Again now that the hooks run this agent's programs: a previous agent's, still in
        // adopted links until the swap, may have spent options meanwhile under a filter that
        // was not the pinned one (red-team review 67 L1). An error leaves the hooks in place.
        if let Err(error) = repair_spent_filter(&self.dir) {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot repair {} after the hooks were swapped",
                maps::SPENT_RECENT
            );
        }
        for (dir, _lock) in std::mem::take(&mut self.other_abis) {
            let links = links::count_links(&dir);
            // This agent's hooks are in place: a failure here leaves the old hooks beside
            // them (logged), it does not stop enforcement.
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::warn!(pins = %dir.display(), links, "removed another release's pins (an ABI this agent does not use): its hooks are detached");
                    report.other_releases_removed.push(dir);
                }
                Err(error) => {
                    tracing::error!(pins = %dir.display(), %error, "cannot remove another release's pins: its hooks stay attached beside this agent's (remove the directory by hand)");
                }
            }
        }
        Ok(report)
    }

    /// Kernel run statistics of one of our programs, loaded by this agent: (total run time,
    /// run count). Counted only while `kernel.bpf_stats_enabled` is on.
    pub fn program_run_stats(&self, program: &str) -> Result<(std::time::Duration, u64)> {
        let prog: &aya::programs::CgroupSockAddr = self
            .ebpf
            .program(program)
            .with_context(|| format!("the BPF object has no program {program}"))?
            .try_into()?;
        let info = prog
            .info()
            .with_context(|| format!("{program} is not loaded by this process"))?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Run statistics of every program of the object that this agent loaded, whatever its
    /// type (the benchmark reports each, so a program added later is counted without edits).
    pub fn all_program_run_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some((name.to_owned(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// The events ring buffer (its consumer position lives in the map, so a restarted agent
    /// resumes where the last one gave records back: see [`ringbuf`]).
    pub fn take_events(&mut self) -> Result<RingReader> {
        self.take_ring(maps::EVENTS)
    }

    /// The flow events ring buffer (`flow.opened` / `flow.closed` records), like
    /// [`Datapath::take_events`].
    pub fn take_flow_events(&mut self) -> Result<RingReader> {
        self.take_ring(maps::FLOW_EVENTS)
    }

    fn take_ring(&mut self, name: &str) -> Result<RingReader> {
        match self.ebpf.take_map(name) {
            Some(aya::maps::Map::RingBuf(map)) => {
                RingReader::new(map).with_context(|| format!("reading ring buffer {name}"))
            }
            Some(_) => anyhow::bail!("{name} is not a ring buffer"),
            None => anyhow::bail!("the BPF object has no {name} map"),
        }
    }
}

fn lock_exclusive(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on an fd we own; the lock lives as long as the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            anyhow::bail!(
                "another enforcer agent is using the pins in {}: stop it first (one agent per node)",
                dir.display()
            );
        }
        return Err(error).with_context(|| format!("locking {}", dir.display()));
    }
    Ok(file)
}

/// Locks every other release's pin directory under `pin_root`: `v<N>` (canonical decimal, N
/// not `ABI_VERSION`) on the bpffs, holding an enforcer's `CONFIG` map or a `link-*` pin, so
/// that another tool's directory is never taken. Errors: one is locked, that is an agent of
/// another release still runs on this node (one agent per node: it must stop first), or
/// `pin_root` cannot be listed. A directory that vanishes or cannot be opened is skipped
/// (logged): it is left as it is.
fn lock_other_abis(pin_root: &Path) -> Result<Vec<(PathBuf, std::fs::File)>> {
    use std::os::fd::AsRawFd;
    let mut locked = Vec::new();
    for entry in
        std::fs::read_dir(pin_root).with_context(|| format!("listing {}", pin_root.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", pin_root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let abi = name.strip_prefix('v').and_then(|n| n.parse::<u32>().ok());
        let is_other_abi = abi.is_some_and(|n| n != ABI_VERSION && name == format!("v{n}"));
        if !is_other_abi || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        if !on_bpffs(&dir).unwrap_or(false) || !holds_enforcer_pins(&dir) {
            continue;
        }
        let file = match std::fs::File::open(&dir) {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(pins = %dir.display(), %error, "cannot open another release's pins; leaving them");
                continue;
            }
        };
        // SAFETY: flock on an fd we own; the lock lives as long as the file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                anyhow::bail!(
                    "an agent of another release (ABI {name}) is running with its pins in {}: stop it first (one agent per node; in Kubernetes the old pod must end before the new one starts)",
                    dir.display()
                );
            }
            tracing::warn!(pins = %dir.display(), %error, "cannot lock another release's pins; leaving them");
            continue;
        }
        locked.push((dir, file));
    }
    Ok(locked)
}

/// Whether `dir` holds what an enforcer pins there: its `CONFIG` map or a `link-*` pin.
fn holds_enforcer_pins(dir: &Path) -> bool {
    dir.join(maps::CONFIG).exists()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("link-"))
        })
}

/// Whether `path` is on a bpf filesystem (`BPF_FS_MAGIC`).
fn on_bpffs(path: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: statfs writes into a zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Removes every pin of this ABI under `pin_root`: the links (which detaches the programs once
/// no agent holds them) and the maps. This is how the enforcer is uninstalled. `Ok(false)`
/// when nothing of this ABI was pinned there (already uninstalled, or a mistyped path).
pub fn detach(pin_root: &Path) -> Result<bool> {
    let dir = pin_dir(pin_root);
    if !dir.exists() {
        return Ok(false);
    }
    // Pins live on a bpffs; a `--pin-path` elsewhere (`--pin-path /home/me`) names the
    // operator's own files, which must not be deleted.
    if !on_bpffs(&dir)? {
        anyhow::bail!(
            "{} is not on a bpf filesystem, so it holds no enforcer pins: nothing removed (check --pin-path)",
            dir.display()
        );
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // Leave the pin root itself alone unless it is now empty (another ABI may live there).
    let _ = std::fs::remove_dir(pin_root);
    Ok(true)
}

/// `bpf(cmd, attr, size_of::<T>())` (`bpf(2)`), for the commands aya does not wrap: `attr`
/// is the command's `bpf_attr` prefix. The kernel's non-negative answer (a new fd for the
/// commands that make one), or its error.
///
/// # Safety
/// Every pointer in `attr` must point to a live buffer of the size the command reads or
/// writes there, and every fd in it must be open.
pub(crate) unsafe fn bpf_syscall<T>(
    cmd: libc::c_long,
    attr: &mut T,
) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is a live, writable `T` of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

    /// No program calls a memory builtin (`memset`, `memcpy`...): bpf-linker exports
    /// compiler-builtins' versions, loops of one-byte stores run as BPF-to-BPF calls, and by
    /// default LLVM called `memset` for every zeroed field (enforcer-ebpf/.cargo/config.toml:
    /// 65 calls in `connect4` alone before `--disable-expand-memcpy-in-order`).
    #[test]
    fn no_program_calls_a_memory_builtin() {
        let file = object::File::parse(super::OBJECT).expect("the kernel programs' object");
        let mut calls = Vec::new();
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let name = file
                    .symbol_by_index(index)
                    .and_then(|symbol| symbol.name())
                    .unwrap_or("?");
                if matches!(name, "memset" | "memcpy" | "memmove" | "memcmp" | "bcmp") {
                    calls.push(format!(
                        "{} +{offset}: {name}",
                        section.name().unwrap_or("?")
                    ));
                }
            }
        }
        assert!(calls.is_empty(), "{} calls: {calls:?}", calls.len());
    }
}

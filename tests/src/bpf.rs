//! Raw BPF helpers the tests need without going through the agent: is BPF usable at all,
//! which programs are attached to a cgroup (`BPF_PROG_QUERY`), and bpffs pin directories.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::unique_name;

/// `enum bpf_attach_type` values of the hooks the enforcer attaches.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

/// The four egress-decision hooks, with the names events use.
pub const ENFORCER_HOOKS: [(u32, &str); 4] = [
    (BPF_CGROUP_INET4_CONNECT, "connect4"),
    (BPF_CGROUP_INET6_CONNECT, "connect6"),
    (BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
    (BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
];

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// The `BPF_PROG_QUERY` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The `BPF_MAP_CREATE` prefix of `union bpf_attr`; the rest must be zero.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u32; 11],
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly sized bpf_attr prefix; size tells the kernel how much.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Whether this process can use BPF: creates (and closes) a one-entry array map.
pub fn bpf_available() -> Result<()> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).context("bpf(BPF_MAP_CREATE)")?;
    // SAFETY: fd was just returned by the kernel and is ours.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// IDs of the programs attached directly to the cgroup at `cgroup_path` for `attach_type`
/// (not the inherited, effective ones).
pub fn prog_query(cgroup_path: &Path, attach_type: u32) -> Result<Vec<u32>> {
    let cg = File::open(cgroup_path).with_context(|| format!("open {}", cgroup_path.display()))?;
    // 64 is far more than a correct enforcer attaches; a larger count shows as ENOSPC.
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr).with_context(|| {
        format!(
            "bpf(BPF_PROG_QUERY, attach_type {attach_type}) on {}",
            cgroup_path.display()
        )
    })?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure `/sys/fs/bpf` is a bpffs (mounting it when it is not: pins need it).
pub fn ensure_bpffs() -> Result<PathBuf> {
    let path = PathBuf::from(BPFFS);
    if is_bpffs(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(&path).ok();
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dir, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 && !is_bpffs(&path) {
        return Err(std::io::Error::last_os_error()).context("mount -t bpf bpf /sys/fs/bpf");
    }
    Ok(path)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// A unique pin directory path under bpffs, removed (`rm -rf`) on drop. The directory itself
/// is not created: the agent creates it. Unpinning the links once no agent holds them detaches
/// the programs.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let base = ensure_bpffs()?;
        let path = base.join(unique_name(prefix));
        if path.exists() {
            bail!("pin dir {} already exists", path.display());
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove_pins(&self.path);
    }
}

/// `rm -rf` of a pin directory; errors are reported, never raised (called from Drop).
pub fn remove_pins(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("warning: cannot remove pins {}: {e}", path.display()),
    }
}

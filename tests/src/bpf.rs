//! Raw BPF helpers the tests need without going through the agent: is BPF usable at all,
//! which programs are attached to a cgroup (`BPF_PROG_QUERY`), and bpffs pin directories.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::unique_name;

/// `enum bpf_attach_type` values of the hooks the enforcer attaches.
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_BIND: u32 = 8;
pub const BPF_CGROUP_INET6_BIND: u32 = 9;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

/// The four egress-decision hooks, the socket-creation hook, sock_ops (the identity option),
/// the ingress check, the two bind hooks and the egress check, with the names of their
/// programs.
pub const ENFORCER_HOOKS: [(u32, &str); 10] = [
    (BPF_CGROUP_INET4_CONNECT, "connect4"),
    (BPF_CGROUP_INET6_CONNECT, "connect6"),
    (BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
    (BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
    (BPF_CGROUP_INET_SOCK_CREATE, "sock_create"),
    (BPF_CGROUP_SOCK_OPS, "sock_ops"),
    (BPF_CGROUP_INET_INGRESS, "ingress"),
    (BPF_CGROUP_INET4_BIND, "bind4"),
    (BPF_CGROUP_INET6_BIND, "bind6"),
    (BPF_CGROUP_INET_EGRESS, "egress"),
];

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

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
/// (not the inherited, effective ones): the agent's own `BPF_PROG_QUERY`.
pub fn prog_query(cgroup_path: &Path, attach_type: u32) -> Result<Vec<u32>> {
    enforcer::datapath::attached_programs(cgroup_path, attach_type)
}

/// Makes sure `/sys/fs/bpf` is a bpffs (mounting it when it is not: pins need it), the way
/// the agent does.
pub fn ensure_bpffs() -> Result<PathBuf> {
    let path = PathBuf::from(enforcer::fs::BPFFS);
    enforcer::fs::ensure_bpffs(&path.join("enforcer-tests"))?;
    Ok(path)
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
        // An agent run on these pins without `--state-dir` keeps its state (and, when it was
        // killed, its sockets) in the directory the pins name: it goes with them.
        let state = enforcer::status::default_state_dir(&self.path);
        match std::fs::remove_dir_all(&state) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: cannot remove {}: {e}", state.display()),
        }
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

/// Loads a `cgroup/connect4` program of two instructions (`r0 = 1; exit`: every call
/// allowed), standing for another release's program in a pinned link.
pub fn load_allow_all_connect4() -> Result<std::os::fd::OwnedFd> {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    load_return_one(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT)
}

/// Loads a `sock_ops` program that does nothing (`r0 = 1; exit`): in the sock_ops link, the
/// sockets' callbacks then run no enforcer code (as while no enforcer program is attached).
pub fn load_noop_sock_ops() -> Result<std::os::fd::OwnedFd> {
    const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
    load_return_one(BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS)
}

/// Loads a `cgroup/sock_release` program that does nothing (`r0 = 1; exit`), as
/// [`load_noop_sock_ops`].
pub fn load_noop_sock_release() -> Result<std::os::fd::OwnedFd> {
    const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
    const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
    load_return_one(BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_RELEASE)
}

/// Loads a `cgroup/connect4` program that stands for a socket load balancer (Cilium's or
/// Calico's connect-time Service translation): a connect to `from` goes to `to` (same port),
/// every call allowed. Attached above the enforced subtree, it runs after the enforcer's
/// `connect4` (a cgroup's own programs run before its ancestors').
pub fn load_connect4_rewrite(
    from: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
) -> Result<std::os::fd::OwnedFd> {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    /// `offsetof(struct bpf_sock_addr, user_ip4)`: the address in network order.
    const USER_IP4: u64 = 4;
    // A 32-bit immediate as the instruction's top half.
    let imm = |v: u32| u64::from(v) << 32;
    let (from, to) = (
        u32::from_ne_bytes(from.octets()),
        u32::from_ne_bytes(to.octets()),
    );
    // struct bpf_insn as little-endian u64s: code | regs << 8 | off << 16 | imm << 32.
    let insns: [u64; 6] = [
        // r2 = *(u32 *)(r1 + user_ip4)
        0x61 | 0x12 << 8 | USER_IP4 << 16,
        // if w2 != from goto +2 (to r0 = 1)
        0x56 | 0x02 << 8 | 2 << 16 | imm(from),
        // w2 = to
        0xb4 | 0x02 << 8 | imm(to),
        // *(u32 *)(r1 + user_ip4) = r2
        0x63 | 0x21 << 8 | USER_IP4 << 16,
        // r0 = 1; exit
        0xb7 | imm(1),
        0x95,
    ];
    load_insns(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        &insns,
    )
}

/// [`load_connect4_rewrite`] for `cgroup/connect6`: a connect to `from` goes to `to` (same
/// port), which may be an IPv4-mapped address (`::ffff:a.b.c.d`: the dual-stack socket then
/// connects over IPv4, as when a load balancer picks an IPv4 backend for an IPv6 Service).
pub fn load_connect6_rewrite(
    from: std::net::Ipv6Addr,
    to: std::net::Ipv6Addr,
) -> Result<std::os::fd::OwnedFd> {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    /// `offsetof(struct bpf_sock_addr, user_ip6)`: four words in network order.
    const USER_IP6: u64 = 8;
    let imm = |v: u32| u64::from(v) << 32;
    let words = |a: std::net::Ipv6Addr| {
        let o = a.octets();
        [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
    };
    let (from, to) = (words(from), words(to));
    let mut insns = Vec::new();
    for (i, word) in from.iter().enumerate() {
        let off = USER_IP6 + 4 * i as u64;
        // r2 = *(u32 *)(r1 + user_ip6[i])
        insns.push(0x61 | 0x12 << 8 | off << 16);
        // if w2 != from[i] goto the r0 = 1 after the 8 stores (14 - 2i instructions on)
        insns.push(0x56 | 0x02 << 8 | (14 - 2 * i as u64) << 16 | imm(*word));
    }
    for (i, word) in to.iter().enumerate() {
        let off = USER_IP6 + 4 * i as u64;
        // w2 = to[i]; *(u32 *)(r1 + user_ip6[i]) = r2
        insns.push(0xb4 | 0x02 << 8 | imm(*word));
        insns.push(0x63 | 0x21 << 8 | off << 16);
    }
    // r0 = 1; exit
    insns.extend([0xb7 | imm(1), 0x95]);
    load_insns(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET6_CONNECT,
        &insns,
    )
}

/// Attaches `prog` to the cgroup at `cgroup_path` for `attach_type` through a link
/// (`BPF_LINK_CREATE`, beside any other program there): detached when the returned fd is
/// closed, so also when the test panics.
pub fn link_cgroup(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup_path: &Path,
    attach_type: u32,
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// The `BPF_LINK_CREATE` prefix of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let cgroup = std::fs::File::open(cgroup_path)
        .with_context(|| format!("opening {}", cgroup_path.display()))?;
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr).context("bpf(BPF_LINK_CREATE)")?;
    // SAFETY: a new fd the kernel returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Loads a program of type `prog_type` for `expected_attach_type` whose code is `r0 = 1;
/// exit`.
fn load_return_one(prog_type: u32, expected_attach_type: u32) -> Result<std::os::fd::OwnedFd> {
    // struct bpf_insn as little-endian u64s: code | regs << 8 | off << 16 | imm << 32.
    load_insns(prog_type, expected_attach_type, &[0xb7 | 1 << 32, 0x95])
}

/// Loads a program of type `prog_type` for `expected_attach_type` from raw instructions.
fn load_insns(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_PROG_LOAD: libc::c_long = 5;
    /// The `BPF_PROG_LOAD` prefix of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).context("bpf(BPF_PROG_LOAD)")?;
    // SAFETY: a new fd the kernel returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The link of `program` (`connect4`, `sock_ops`...) pinned in the agent's pin directory
/// `pins` (`link-<program>-cg<cgroup id>`).
pub fn pinned_link(pins: &Path, program: &str) -> Result<PathBuf> {
    let prefix = format!("link-{program}-cg");
    std::fs::read_dir(pins)
        .with_context(|| format!("listing {}", pins.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .with_context(|| format!("no {program} link pinned under {}", pins.display()))
}

/// Makes the link pinned at `pin` run `prog`, as an agent of another release would have
/// attached it.
pub fn set_link_program(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    enforcer::datapath::link_update(pin, prog)
}

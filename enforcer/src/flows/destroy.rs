//! Closing a TCP socket from outside: netlink `SOCK_DESTROY` (NETLINK_SOCK_DIAG, message type
//! 21, kernel `CONFIG_INET_DIAG_DESTROY`), an `inet_diag_req_v2` naming the socket by its
//! 4-tuple *and its cookie*. The kernel finds the socket by the tuple, refuses it unless the
//! cookie matches (ENOENT otherwise: `inet_diag_find_one_icsk` turns the cookie check's ESTALE
//! into it), and resets it: the owner's next call fails (ECONNABORTED on its own host). The
//! cookie is never left out (the kernel's "no cookie" value would accept whatever socket the
//! tuple finds, the listening socket included once the flow is gone).
//!
//! A small encoder rather than a crate: netlink-packet-sock-diag has no SOCK_DESTROY message,
//! and the request is one fixed 72-byte struct.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use enforcer_common::FlowRecord;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
const IPPROTO_TCP: u8 = 6;

/// `struct nlmsghdr` + `struct inet_diag_req_v2` (`include/uapi/linux/inet_diag.h`).
#[repr(C)]
#[derive(Default)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    /// Network byte order.
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    /// Low word first, each in host order (`sock_diag_check_cookie`).
    cookie: [u32; 2],
}

const _: () = assert!(std::mem::size_of::<Request>() == 72);

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Connected to the kernel (port id 0): the kernel then refuses (ECONNREFUSED) any unicast
    // to this socket from another sender (`netlink_getsockbyportid`), so a process in the
    // flow's namespace cannot slip a forged ack in. `read_ack` checks the sender as well.
    // SAFETY: a zeroed sockaddr_nl with the family set is the kernel's address.
    let rc = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::connect(
            fd.as_raw_fd(),
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `SO_NETNS_COOKIE` (`include/uapi/asm-generic/socket.h`, Linux 5.14).
const SO_NETNS_COOKIE: i32 = 71;

/// The cookie of the network namespace the calling thread is in, read from a socket created
/// there (a socket keeps the namespace it was created in).
fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 and `len` its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Namespace cookie -> the namespace file that entered it last: a hint only (the cookie is
/// checked again after entering, so a file reused for another namespace is skipped).
static NETNS_CACHE: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<u64, std::path::PathBuf>>,
> = std::sync::LazyLock::new(Default::default);

/// Namespace cookie -> when the runtimes' namespace files were last walked without finding
/// it. A namespace no file names now will not get one (a runtime names a pod's namespace
/// before any of its processes runs), so for [`FILES_MISS_KEEP`] the walk, which enters up
/// to [`MAX_NETNS_FILES`] namespaces per directory, is not made again for it: a flow whose
/// namespace cannot be entered is tried at every tick (red-team review 34).
static NETNS_NOT_IN_FILES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
> = std::sync::LazyLock::new(Default::default);

/// How long a walk of the namespace files that did not find a namespace stands for it.
const FILES_MISS_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Why no sock_diag socket could be made in the flow's network namespace: the flow's socket
/// was not looked for, so nothing can be concluded about it.
#[derive(Debug, thiserror::Error)]
#[error("no way into the flow's network namespace (netns cookie {cookie}): {tried}")]
pub struct NoNamespace {
    pub cookie: u64,
    /// What was tried, and what each candidate answered.
    pub tried: String,
}

/// Where container runtimes keep the namespace files of pods' network namespaces (bind
/// mounts of nsfs, one per pod sandbox): containerd's CRI plugin and CRI-O under
/// `/var/run/netns` (`cni-<uuid>`, `<uuid>`), podman and `ip netns` under `/run/netns`
/// (usually the same directory: `/var/run` links to `/run`). The DaemonSet mounts the host's
/// `/run/netns` read-only there, so a pod's namespace is reachable without the host's PID
/// namespace (deploy/daemonset.yaml).
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// The most namespace files read from one directory of [`NETNS_DIRS`] for one flow (a node
/// runs at most a few hundred pods; the bound keeps a full directory from stalling a reset).
const MAX_NETNS_FILES: usize = 4096;

/// A sock_diag socket in the network namespace whose cookie is `want` (sock_diag sees only
/// the sockets of the namespace its socket was created in, and a pod has its own). The
/// namespace is entered through `/proc/PID/ns/net` of each candidate process in turn (the
/// agent's own first, then `pids`), then through the runtimes' namespace files
/// ([`NETNS_DIRS`]): what reaches a pod's namespace when the agent does not share the host's
/// PID namespace. A candidate whose namespace has another cookie (the process exited and its
/// PID was reused, or it moved; another pod's file) is skipped, so the socket is never made
/// in a namespace that is not the flow's. Each candidate is tried on a short-lived thread, so
/// the agent's own threads never change namespace. Entering a namespace (setns(2)) needs
/// CAP_SYS_ADMIN.
pub fn diag_socket_in(want: u64, pids: &[u32]) -> Result<OwnedFd, NoNamespace> {
    let dirs: Vec<&std::path::Path> = NETNS_DIRS.iter().map(std::path::Path::new).collect();
    diag_socket_in_dirs(want, pids, &dirs)
}

/// [`diag_socket_in`], with the namespace files looked for in `netns_dirs`.
pub fn diag_socket_in_dirs(
    want: u64,
    pids: &[u32],
    netns_dirs: &[&std::path::Path],
) -> Result<OwnedFd, NoNamespace> {
    use std::os::unix::fs::MetadataExt;
    let mut tried = Vec::new();
    if want == 0 {
        return Err(NoNamespace {
            cookie: want,
            tried: "the record has no namespace cookie".into(),
        });
    }
    match current_netns_cookie() {
        Ok(ours) if ours == want => {
            return diag_socket().map_err(|error| NoNamespace {
                cookie: want,
                tried: format!("the agent's own namespace: {error}"),
            })
        }
        Ok(_) => {}
        Err(error) => tried.push(format!("own namespace: {error}")),
    }
    let mut seen = std::collections::BTreeSet::new();
    let missed_lately = NETNS_NOT_IN_FILES
        .lock()
        .ok()
        .and_then(|misses| misses.get(&want).copied())
        .filter(|at| at.elapsed() < FILES_MISS_KEEP);
    let netns_dirs = match missed_lately {
        Some(at) => {
            tried.push(format!(
                "no namespace file was the flow's {} s ago",
                at.elapsed().as_secs()
            ));
            &[][..]
        }
        None => netns_dirs,
    };
    // The namespace files of the runtimes, after the processes: the cached file for this
    // cookie first (a revocation usually closes several flows of one pod), then the others.
    let cached = NETNS_CACHE
        .lock()
        .ok()
        .and_then(|cache| cache.get(&want).cloned());
    // Whether the walk, when it finds nothing, proves that no file names the namespace: every
    // directory read whole, and every file entered and found another namespace (a transient
    // failure, EMFILE or ENOMEM, proves nothing: red-team review 35).
    let mut walk_proves = !netns_dirs.is_empty();
    let mut files: Vec<std::path::PathBuf> = cached.into_iter().collect();
    for dir in netns_dirs {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut taken = 0;
                for entry in entries {
                    match entry {
                        Ok(_) if taken == MAX_NETNS_FILES => {
                            walk_proves = false;
                            break;
                        }
                        Ok(entry) => {
                            taken += 1;
                            files.push(entry.path());
                        }
                        Err(_) => walk_proves = false,
                    }
                }
            }
            // A runtime that is not installed names no namespace.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                walk_proves = false;
                tried.push(format!("{}: {error}", dir.display()));
            }
        }
    }
    let candidates = pids
        .iter()
        .map(|pid| {
            (
                format!("pid {pid}"),
                std::path::PathBuf::from(format!("/proc/{pid}/ns/net")),
            )
        })
        .chain(
            files
                .into_iter()
                .map(|path| (path.display().to_string(), path)),
        );
    for (what, ns_path) in candidates {
        let a_file = !ns_path.starts_with("/proc");
        let ns = match std::fs::File::open(&ns_path) {
            Ok(ns) => ns,
            Err(error) => {
                // A file removed since it was listed (or cached) names nothing now.
                walk_proves &= !a_file || error.kind() == io::ErrorKind::NotFound;
                tried.push(format!("{what}: {error}"));
                continue;
            }
        };
        match ns.metadata() {
            Ok(meta) if !seen.insert((meta.dev(), meta.ino())) => continue,
            Ok(_) => {}
            Err(error) => {
                walk_proves &= !a_file;
                tried.push(format!("{what}: {error}"));
                continue;
            }
        }
        let attempt = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread only (it ends right after); `ns` is an
                    // open namespace file.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let error = io::Error::last_os_error();
                        let hint = if error.raw_os_error() == Some(libc::EPERM) {
                            " (entering another network namespace needs CAP_SYS_ADMIN)"
                        } else {
                            ""
                        };
                        return Err(format!("setns: {error}{hint}"));
                    }
                    match current_netns_cookie() {
                        Ok(cookie) if cookie == want => {
                            diag_socket().map_err(|error| format!("sock_diag socket: {error}"))
                        }
                        Ok(cookie) => Err(format!("another namespace (cookie {cookie})")),
                        Err(error) => Err(format!("SO_NETNS_COOKIE: {error}")),
                    }
                })
                .join()
                .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
        });
        match attempt {
            Ok(fd) => {
                if !ns_path.starts_with("/proc") {
                    if let Ok(mut cache) = NETNS_CACHE.lock() {
                        // Bounded: the entries of namespaces that are gone are dropped
                        // wholesale, rarely (one entry per pod reset since).
                        if cache.len() >= MAX_NETNS_FILES {
                            cache.clear();
                        }
                        cache.insert(want, ns_path);
                    }
                }
                return Ok(fd);
            }
            // Another pod's namespace is the usual answer for a file: not worth a line.
            Err(error) if error.starts_with("another namespace") && a_file => {}
            Err(error) => {
                walk_proves &= !a_file;
                tried.push(format!("{what}: {error}"));
            }
        }
    }
    if pids.is_empty() {
        tried.push("no candidate process".into());
    }
    if !netns_dirs.is_empty() {
        let dirs: Vec<String> = netns_dirs.iter().map(|d| d.display().to_string()).collect();
        tried.push(format!(
            "no namespace file in {} is the flow's",
            dirs.join(", ")
        ));
    }
    if walk_proves {
        if let Ok(mut misses) = NETNS_NOT_IN_FILES.lock() {
            // Bounded like the cache of found files.
            if misses.len() >= MAX_NETNS_FILES {
                misses.retain(|_, at| at.elapsed() < FILES_MISS_KEEP);
                if misses.len() >= MAX_NETNS_FILES {
                    misses.clear();
                }
            }
            misses.insert(want, std::time::Instant::now());
        }
    }
    Err(NoNamespace {
        cookie: want,
        tried: tried.join("; "),
    })
}

/// The processes of each flow's cgroup, walked for once per pass ([`cgroup_procs`]): the walk
/// of the subtree cost more than the resets themselves at 1,000 flows of one workload (bench
/// `flows`).
pub struct CgroupProcs {
    root: std::path::PathBuf,
    walked: std::collections::BTreeMap<u64, Vec<u32>>,
}

impl CgroupProcs {
    /// No cgroup walked yet, under the enforced subtree `root`.
    pub fn new(root: &std::path::Path) -> Self {
        Self {
            root: root.to_path_buf(),
            walked: Default::default(),
        }
    }

    /// The processes of cgroup `cgroup_id`, walked for at its first call.
    pub fn of(&mut self, cgroup_id: u64) -> &[u32] {
        let root = &self.root;
        self.walked
            .entry(cgroup_id)
            .or_insert_with(|| cgroup_procs(root, cgroup_id))
    }
}

/// The processes of cgroup `cgroup_id` (`cgroup.procs`), found by walking the enforced
/// subtree under `root` (a cgroup v2 directory's inode number is its ID): the candidates for
/// entering a flow's namespace when the connecting process is gone. Empty when the cgroup is
/// not found (it was removed with its last process).
pub fn cgroup_procs(root: &std::path::Path, cgroup_id: u64) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    // Bounded: a pod tree is a few levels deep and the walk stops at the first match.
    let mut stack = vec![(root.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        if std::fs::metadata(&dir).map(|m| m.ino()).ok() == Some(cgroup_id) {
            return std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|procs| {
                    procs
                        .lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default();
        }
        if depth >= 16 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    Vec::new()
}

/// Why a flow could not be reset.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// The flow's namespace could not be entered: the socket was not looked for.
    #[error(transparent)]
    NoNamespace(#[from] NoNamespace),
    /// The kernel's answer in the flow's own namespace (`ENOENT`: no socket has that tuple
    /// there any more, or the tuple's socket is another one), or a local failure.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Resets the established TCP socket of `record` whose cookie is `cookie`, in the network
/// namespace recorded at `connect()` (entered through the connecting process, else one of
/// `pids`: the processes of the flow's cgroup, else a runtime's namespace file: see
/// [`diag_socket_in`]). Errors: [`DestroyError::NoNamespace`] when
/// no candidate is in that namespace (nothing was looked up); otherwise the kernel's answer
/// there: `ENOENT` when no socket has that tuple any more (it closed meanwhile) or
/// when the tuple's socket is another one (the cookie differs), `EPERM` without
/// CAP_NET_ADMIN.
pub fn destroy(cookie: u64, record: &FlowRecord, pids: &[u32]) -> Result<(), DestroyError> {
    destroy_with(cookie, record, pids, &mut DiagSockets::default())
}

/// The sock_diag sockets of one revocation pass, by network namespace cookie: each was
/// verified to be in that namespace when it was made, so the pass's other flows of the same
/// namespace reuse it instead of making (and, in a pod's namespace, entering for) a socket
/// per flow: at 1,000 flows of one namespace the sockets were a third of the resets' time
/// (bench `flows`). Requests on one socket are told apart by their sequence numbers. A
/// namespace that could not be entered is tried again in the same pass only through
/// processes not tried yet, and its runtimes' namespace files are not walked again (keyed by
/// the namespace, not by the processes: a workload connecting from a new short-lived process
/// each time made every record a new walk of every pod's file, red-team review 34).
#[derive(Default)]
pub struct DiagSockets {
    sockets: std::collections::HashMap<u64, OwnedFd>,
    /// Namespaces not entered in this pass: the processes tried, and what was answered.
    unreachable: std::collections::HashMap<u64, (std::collections::BTreeSet<u32>, String)>,
}

impl DiagSockets {
    /// The sock_diag socket of `record`'s network namespace: this pass's, or made now by
    /// entering the namespace through the connecting process, else one of `pids`.
    fn socket_for(&mut self, record: &FlowRecord, pids: &[u32]) -> Result<&OwnedFd, NoNamespace> {
        let cookie = record.netns_cookie;
        if !self.sockets.contains_key(&cookie) {
            let connector = (record.pid_tgid >> 32) as u32;
            let mut candidates = vec![connector];
            candidates.extend(pids.iter().copied().filter(|&p| p != connector));
            let made = match self.unreachable.get_mut(&cookie) {
                None => diag_socket_in(cookie, &candidates),
                Some((tried_pids, tried)) => {
                    candidates.retain(|pid| !tried_pids.contains(pid));
                    if candidates.is_empty() {
                        return Err(NoNamespace {
                            cookie,
                            tried: tried.clone(),
                        });
                    }
                    diag_socket_in_dirs(cookie, &candidates, &[])
                }
            };
            match made {
                Ok(fd) => {
                    prime(&fd);
                    self.unreachable.remove(&cookie);
                    self.sockets.insert(cookie, fd);
                }
                Err(error) => {
                    let entry = self.unreachable.entry(cookie).or_default();
                    entry.0.extend(candidates);
                    entry.1 = error.tried.clone();
                    return Err(error);
                }
            }
        }
        Ok(&self.sockets[&cookie])
    }

    /// Drops the socket of namespace `cookie` (a request on it failed): the next flow of that
    /// namespace starts on a fresh one.
    fn drop_socket(&mut self, cookie: u64) {
        self.sockets.remove(&cookie);
    }
}

/// Reads one empty listing into the listings' 32 KiB buffer, so that the kernel builds this
/// socket's later dump datagrams that large: it sizes a dump's first datagram by the largest
/// read the socket has made (`netlink_dump`, `max_recvmsg_len`), one page before any, about
/// 30 sockets, after which a listing without the socket proves nothing (red-team review 32).
fn prime(fd: &OwnedFd) {
    let none = Request {
        family: libc::AF_INET as u8,
        protocol: IPPROTO_UDP,
        ..Request::default()
    };
    let _ = list_family(
        fd,
        &none,
        libc::AF_INET as u8,
        0,
        &[],
        &mut |_, _| {},
        far_deadline(),
    );
}

/// [`destroy`], reusing (and filling) `sockets`. A socket on which a request failed is
/// dropped from it, so that the next flow of that namespace starts on a fresh one.
pub fn destroy_with(
    cookie: u64,
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
) -> Result<(), DestroyError> {
    let local = super::source_ip(record).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the flow has no local address yet (handshake not completed)",
        )
    })?;
    // The socket's own peer: a socket load balancer may have rewritten the judged address.
    let (remote, remote_port) = super::peer(record);
    let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut req = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DESTROY,
        flags: NLM_F_REQUEST | NLM_F_ACK,
        seq,
        protocol: IPPROTO_TCP,
        // Every state: the tuple and the cookie name the socket.
        states: u32::MAX,
        sport: record.sport.to_be_bytes(),
        dport: remote_port.to_be_bytes(),
        cookie: [cookie as u32, (cookie >> 32) as u32],
        ..Request::default()
    };
    // An IPv4-mapped flow is looked up as IPv4: the kernel's tables are shared, so AF_INET
    // finds the dual-stack socket too.
    match (local, remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            req.family = libc::AF_INET as u8;
            req.src[..4].copy_from_slice(&l.octets());
            req.dst[..4].copy_from_slice(&r.octets());
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            req.family = libc::AF_INET6 as u8;
            req.src = l.octets();
            req.dst = r.octets();
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local and remote addresses of different families",
            )
            .into())
        }
    }
    let fd = sockets.socket_for(record, pids)?;
    if let Err(error) = send_request(fd, &req) {
        sockets.drop_socket(record.netns_cookie);
        return Err(error.into());
    }
    let mut answer = read_ack(fd, seq);
    // The tuple lookup matches a socket bound to a device (`SO_BINDTODEVICE`, which any
    // process may set on its own socket, also after connecting) only when the request names
    // that device: "no such socket" is not believed until the namespace's sockets on these
    // ports were listed by cookie, or binding would be a way out of revocation. A socket
    // still listed is never "gone": a reset that keeps missing it (a process with CAP_NET_RAW
    // moving it between devices) is a failure, reported and retried.
    let (mut listed, mut unproven_listing) = (false, false);
    for _ in 0..RESET_TRIES {
        if !matches!(&answer, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            break;
        }
        answer = match list_cookie(fd, &req, cookie, FLOW_STATES, &exact_tuple_filter(&req)) {
            Ok(Listing::Absent) => break,
            Ok(Listing::Unproven(datagrams)) => {
                unproven_listing = true;
                Err(unproven(datagrams))
            }
            Ok(Listing::Listed(found)) => {
                listed = true;
                req.interface = found.device;
                req.seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                send_request(fd, &req).and_then(|()| read_ack(fd, req.seq))
            }
            Err(error) => Err(error),
        };
    }
    if listed && matches!(&answer, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
        answer = Err(io::Error::other(
            "SOCK_DESTROY: the socket is listed but its reset keeps missing it (it changes device)",
        ));
    }
    // A listing that ended without the socket leaves this one fit for the next request.
    if answer.is_err() && !unproven_listing {
        sockets.drop_socket(record.netns_cookie);
    }
    answer.map_err(DestroyError::Io)
}

/// `IPPROTO_UDP`.
const IPPROTO_UDP: u8 = 17;
/// `TCPF_ESTABLISHED`: the state of a connected UDP socket.
const CONNECTED_UDP: u32 = 1 << 1;

/// Whether the UDP socket `cookie` of `record` is connected to `peer` (address, port), read
/// in the record's network namespace (entered as for [`destroy_with`], reusing `sockets`).
/// The hooks judge a connect before the kernel makes it, and the kernel may then refuse it
/// and leave the socket where it was (`flow_flags::CONNECTED_AGAIN`, which keeps where that
/// was). Listed by a `SOCK_DIAG_BY_FAMILY` dump of the namespace's connected UDP sockets
/// whose remote end is `peer` (in both families for IPv4: a dual-stack socket is
/// `AF_INET6`), looking for the cookie: other sockets in that listing are connected to the
/// same peer. Errors: the namespace could not be entered, or the listing cannot say (it
/// failed, or took several datagrams without the socket: no proof it is not there).
pub fn udp_connected_to(
    cookie: u64,
    record: &FlowRecord,
    peer: (IpAddr, u16),
    pids: &[u32],
    sockets: &mut DiagSockets,
) -> Result<bool, DestroyError> {
    let mut req = Request {
        protocol: IPPROTO_UDP,
        dport: peer.1.to_be_bytes(),
        ..Request::default()
    };
    match peer.0.to_canonical() {
        IpAddr::V4(ip) => {
            req.family = libc::AF_INET as u8;
            req.dst[..4].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            req.family = libc::AF_INET6 as u8;
            req.dst = ip.octets();
        }
    }
    let filter = tuple_filter(req.family, &[(INET_DIAG_BC_D_COND, req.dport, &req.dst)]);
    Ok(find(cookie, record, pids, sockets, &req, CONNECTED_UDP, &filter)?.is_some())
}

/// The connected UDP sockets of one network namespace, by cookie, as one listing found them
/// ([`udp_places`]).
#[derive(Debug, Default)]
pub struct UdpPlaces {
    peers: std::collections::HashMap<u64, (IpAddr, u16)>,
}

impl UdpPlaces {
    /// Where the socket `cookie` of this namespace is connected (address, port; an
    /// IPv4-mapped address given as IPv4), if the listing showed it.
    pub fn of(&self, cookie: u64) -> Option<(IpAddr, u16)> {
        self.peers.get(&cookie).copied()
    }
}

/// Where the connected UDP sockets of `record`'s network namespace are (entered as for
/// [`destroy_with`], reusing `sockets`): one unfiltered `SOCK_DIAG_BY_FAMILY` dump per family
/// of the sockets in `TCP_ESTABLISHED`, a connected UDP socket's state. The place of a
/// connected UDP socket is the kernel's to know, not the connect hooks': the hooks judge a
/// connect before the kernel makes it, and the kernel may refuse it, or make two threads'
/// connects of one socket in the opposite order of their hooks (red-team reviews 28 and 34).
/// A socket listed is where the listing says; one not listed may be connected nowhere, or
/// skipped, or behind a listing that failed or was cut at `deadline` (checked between
/// datagrams; the rest of that family is not read). See [`udp_listing`] for the families'
/// order and failures. Errors: the namespace could not be entered.
pub fn udp_places(
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
    deadline: Instant,
) -> Result<UdpPlaces, DestroyError> {
    let (places, _) = udp_listing(record, pids, sockets, &|_| Some(Vec::new()), deadline)?;
    Ok(places)
}

/// Where the connected UDP sockets of `record`'s network namespace whose peer the IP cache
/// gives a tracked destination are (`prefixes`, see [`crate::flows::tracked_prefixes`]), and
/// whether the listing proved the others at none: [`udp_places`] narrowed by a filter the
/// kernel runs, for the sockets a whole listing could not show. Only tracked flows (each
/// holding a share of `FLOWS`, and decided themselves) can crowd it, save sockets connected
/// before their destination was tracked (red-team reviews 37 and 38). Bounded by its datagrams, not by a deadline: a pass makes it whole
/// or not at all. Errors: the namespace could not be entered.
pub fn udp_places_within(
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
    prefixes: &[crate::flows::TrackedPrefix],
) -> Result<(UdpPlaces, bool), DestroyError> {
    let filter_for = |family: u8| {
        // An IPv4 condition also matches a dual-stack socket's IPv4-mapped peer.
        let within: Vec<crate::flows::TrackedPrefix> = prefixes
            .iter()
            .copied()
            .filter(|(ip, _, _)| family == libc::AF_INET6 as u8 || ip.is_ipv4())
            .collect();
        (!within.is_empty()).then(|| any_destination_filter(&within))
    };
    udp_listing(record, pids, sockets, &filter_for, far_deadline())
}

/// The connected UDP sockets of `record`'s namespace that pass `filter_for(family)` (a
/// family it gives none is not listed, and needs not be), and whether every family's listing
/// ended whole. IPv6 first: a dual-stack socket turned IPv4 by `IPV6_ADDRFORM` between the
/// two is then listed by the second. A family whose listing failed is not the end: the other
/// is listed on a fresh socket (a crowded IPv4 listing must not hide the IPv6 sockets,
/// red-team review 36), and what one family found is kept when the namespace cannot be
/// entered again for the other (not whole then; review 38). Errors: the namespace could not
/// be entered at all.
fn udp_listing(
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
    filter_for: &dyn Fn(u8) -> Option<Vec<u8>>,
    deadline: Instant,
) -> Result<(UdpPlaces, bool), DestroyError> {
    let request = Request {
        protocol: IPPROTO_UDP,
        ..Request::default()
    };
    let (mut places, mut whole, mut entered) = (UdpPlaces::default(), true, false);
    for family in [libc::AF_INET6 as u8, libc::AF_INET as u8] {
        let Some(filter) = filter_for(family) else {
            continue;
        };
        if Instant::now() > deadline {
            whole = false;
            break;
        }
        let fd = match sockets.socket_for(record, pids) {
            Ok(fd) => fd,
            Err(error) if !entered => return Err(error.into()),
            Err(_) => {
                whole = false;
                break;
            }
        };
        entered = true;
        let mut seen = |cookie: u64, socket: Found| {
            places.peers.insert(cookie, socket.peer);
        };
        match list_family(
            fd,
            &request,
            family,
            CONNECTED_UDP,
            &filter,
            &mut seen,
            deadline,
        ) {
            Ok(ended) => whole &= ended.whole,
            Err(error) => {
                tracing::debug!(
                    netns = record.netns_cookie,
                    family,
                    filtered = !filter.is_empty(),
                    "listing a namespace's connected UDP sockets: {error}"
                );
                whole = false;
                sockets.drop_socket(record.netns_cookie);
            }
        }
    }
    Ok((places, whole))
}

/// A filter program that accepts a socket whose remote end falls first into a tracked one of
/// `prefixes` (any port), taken in order (longest first: the IP cache's longest-prefix
/// match), and rejects one that falls first into an untracked one or into none.
/// `inet_diag_bc_op`'s `yes` is one byte, too short to jump to the end past many
/// conditions, so each prefix is an `INET_DIAG_BC_D_COND` whose `yes` steps onto an
/// `INET_DIAG_BC_JMP` (to the program's end: accept; past it: reject) and whose `no` steps
/// over it to the next prefix; the last one's `no` goes past the end (reject). Every jump
/// lands on an op, at the end or just past it, as `inet_diag_bc_audit` requires.
fn any_destination_filter(prefixes: &[crate::flows::TrackedPrefix]) -> Vec<u8> {
    const JMP_LEN: usize = 4;
    const PAST_THE_END: usize = 4;
    let cond_len = |ip: &IpAddr| 4 + 8 + if ip.is_ipv4() { 4 } else { 16 };
    let program_len: usize = prefixes
        .iter()
        .map(|(ip, _, _)| cond_len(ip) + JMP_LEN)
        .sum();
    let mut attr = Vec::with_capacity(4 + program_len);
    attr.extend_from_slice(&((4 + program_len) as u16).to_ne_bytes());
    attr.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    let mut remaining = program_len;
    for (ip, prefix, tracked) in prefixes {
        let len = cond_len(ip);
        let last = remaining == len + JMP_LEN;
        attr.push(INET_DIAG_BC_D_COND);
        attr.push(len as u8);
        let no = len + JMP_LEN + if last { PAST_THE_END } else { 0 };
        attr.extend_from_slice(&(no as u16).to_ne_bytes());
        let (family, address): (u8, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
        };
        attr.push(family);
        attr.push(*prefix);
        attr.extend_from_slice(&[0, 0]);
        // Any port.
        attr.extend_from_slice(&(-1i32).to_ne_bytes());
        attr.extend_from_slice(&address);
        remaining -= len;
        attr.push(INET_DIAG_BC_JMP);
        attr.push(JMP_LEN as u8);
        let to = remaining + if *tracked { 0 } else { PAST_THE_END };
        attr.extend_from_slice(&(to as u16).to_ne_bytes());
        remaining -= JMP_LEN;
    }
    attr
}

/// Whether the TCP socket `cookie` of `record` still exists, hashed, in the record's network
/// namespace: listed in any state but LISTEN and TIME_WAIT (entered and listed as for
/// [`udp_connected_to`]). A socket that is not is gone, or closed and never to send again
/// under this record (a connect it makes next writes a new one); a TIME_WAIT socket is what
/// is left of one whose connection ended (and costs a workload nothing to make by the
/// thousand, to crowd the listing). Errors: as [`udp_connected_to`]'s.
pub fn tcp_listed(
    cookie: u64,
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
) -> Result<bool, DestroyError> {
    let req = Request {
        family: libc::AF_INET as u8,
        protocol: IPPROTO_TCP,
        ..Request::default()
    };
    Ok(find(cookie, record, pids, sockets, &req, LIVE_STATES, &[])?.is_some())
}

/// The socket `cookie` among `request`'s sockets in `states` that pass `filter`, in
/// `record`'s namespace.
fn find(
    cookie: u64,
    record: &FlowRecord,
    pids: &[u32],
    sockets: &mut DiagSockets,
    request: &Request,
    states: u32,
    filter: &[u8],
) -> Result<Option<Found>, DestroyError> {
    let fd = sockets.socket_for(record, pids)?;
    match list_cookie(fd, request, cookie, states, filter) {
        Ok(Listing::Listed(found)) => Ok(Some(found)),
        Ok(Listing::Absent) => Ok(None),
        // The dump ended: the socket is fit for the next listing.
        Ok(Listing::Unproven(datagrams)) => Err(unproven(datagrams).into()),
        Err(error) => {
            sockets.drop_socket(record.netns_cookie);
            Err(error.into())
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;

fn send_request(fd: &OwnedFd, req: &Request) -> io::Result<()> {
    send_bytes(fd, request_bytes(req))
}

/// The bytes of `req` as the kernel reads them.
fn request_bytes(req: &Request) -> &[u8] {
    // SAFETY: `Request` is plain `repr(C)` data without padding (its size is asserted).
    unsafe {
        std::slice::from_raw_parts(
            (req as *const Request).cast::<u8>(),
            std::mem::size_of::<Request>(),
        )
    }
}

fn send_bytes(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: `message` is a valid buffer of its length; the socket is connected to the kernel.
    let sent = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `INET_DIAG_REQ_BYTECODE`, and the two conditions of [`tuple_filter`]
/// (`include/uapi/linux/inet_diag.h`).
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_COND: u8 = 7;
const INET_DIAG_BC_D_COND: u8 = 8;
/// `INET_DIAG_BC_JMP`: an unconditional jump by its `no`.
const INET_DIAG_BC_JMP: u8 = 1;

/// The listing's filter for a reset (an `INET_DIAG_REQ_BYTECODE` attribute): the kernel
/// lists only sockets whose local and remote address and port are the flow's. The request's
/// ports alone let a workload crowd the listing with sockets on its flow's ports to other
/// addresses (a few hundred fill a datagram, and a listing of several is no proof of
/// absence), which kept a revoked flow open.
fn exact_tuple_filter(destroy: &Request) -> Vec<u8> {
    tuple_filter(
        destroy.family,
        &[
            (INET_DIAG_BC_S_COND, destroy.sport, &destroy.src),
            (INET_DIAG_BC_D_COND, destroy.dport, &destroy.dst),
        ],
    )
}

/// A filter program of address-and-port conditions (`INET_DIAG_BC_S_COND`: the local end,
/// `INET_DIAG_BC_D_COND`: the remote end), all of which must hold. Each condition is
/// `inet_diag_bc_op` (code, `yes`: the step to the next op, `no`: past the end, which
/// rejects) and `inet_diag_hostcond` (family, prefix length, port in host order, address); an
/// `AF_INET` condition also matches a dual-stack socket's IPv4-mapped address
/// (`inet_diag_bc_run`).
fn tuple_filter(family: u8, conditions: &[(u8, [u8; 2], &[u8; 16])]) -> Vec<u8> {
    let address_len = if family == libc::AF_INET as u8 { 4 } else { 16 };
    let op_len = 4 + 8 + address_len;
    let program_len = conditions.len() * op_len;
    let mut attr = Vec::with_capacity(4 + program_len);
    attr.extend_from_slice(&((4 + program_len) as u16).to_ne_bytes());
    attr.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    for (i, &(code, port, address)) in conditions.iter().enumerate() {
        let remaining = program_len - i * op_len;
        attr.push(code);
        attr.push(op_len as u8);
        attr.extend_from_slice(&((remaining + 4) as u16).to_ne_bytes());
        attr.push(family);
        attr.push((address_len * 8) as u8);
        attr.extend_from_slice(&[0, 0]);
        attr.extend_from_slice(&i32::from(u16::from_be_bytes(port)).to_ne_bytes());
        attr.extend_from_slice(&address[..address_len]);
    }
    attr
}

/// Resets tried on one socket found by listing (see [`destroy_with`]).
const RESET_TRIES: usize = 3;

/// The TCP states a flow's socket can be in (`TCPF_*`: ESTABLISHED through CLOSING, without
/// LISTEN): a listing never walks listeners, request sockets or bound-only sockets.
const FLOW_STATES: u32 = 0xFFE & !(1 << 10);

/// [`FLOW_STATES`] without TIME_WAIT (`TCPF_TIME_WAIT`): a socket that may still send.
const LIVE_STATES: u32 = FLOW_STATES & !(1 << 6);

/// Datagrams a listing may take. A listing whose records fill more than one is no proof of
/// absence (the kernel resumes a dump by position, and sockets closing ahead of ours can make
/// it skip): only records that came in one datagram, without the cookie, say "absent"
/// (`NLMSG_DONE` usually comes in a datagram of its own).
const LIST_DATAGRAMS: usize = 64;

/// Whether the namespace's sockets listed include the one with the cookie.
#[derive(Debug, PartialEq)]
enum Listing {
    Absent,
    Listed(Found),
    /// Not listed, but the listing took this many datagrams, or one that was full: no
    /// proof of absence (the kernel resumes a dump by position, and sockets closing ahead
    /// can make it skip, [`had_room`]).
    Unproven(usize),
}

/// The listed socket with the cookie.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Found {
    /// The device it is bound to (0: none).
    device: u32,
    /// Its remote address (an IPv4-mapped one as IPv4) and port.
    peer: (IpAddr, u16),
}

/// Lists the namespace's sockets of `request`'s protocol in `states` that pass `filter`
/// (for a reset, the destroy request's addresses and ports: [`exact_tuple_filter`], whatever
/// device a socket is bound to), in both families for an IPv4 request (a dual-stack socket
/// with a mapped address is an AF_INET6 socket), looking for `cookie`. Errors (never ENOENT,
/// so that no failure reads as "gone"): a family's dump failed or did not end, or took
/// several datagrams without the cookie, and no family's listed it. Only messages from the kernel (port id 0) answering this dump count,
/// as for the ack.
fn list_cookie(
    fd: &OwnedFd,
    destroy: &Request,
    cookie: u64,
    states: u32,
    filter: &[u8],
) -> io::Result<Listing> {
    let families: &[u8] = if destroy.family == libc::AF_INET as u8 {
        &[libc::AF_INET as u8, libc::AF_INET6 as u8]
    } else {
        &[libc::AF_INET6 as u8]
    };
    // Every family is listed even when one fails: a crowded IPv4 listing must not hide a
    // dual-stack socket, which is listed as IPv6 (red-team review 31). Not after a listing
    // that did not end: its dump holds the socket (red-team review 34).
    let (mut failed, mut unproven) = (None, None);
    for &family in families {
        let mut found = None;
        let mut seen = |listed: u64, socket: Found| {
            if listed == cookie {
                found = Some(socket);
            }
        };
        match list_family(
            fd,
            destroy,
            family,
            states,
            filter,
            &mut seen,
            far_deadline(),
        ) {
            Ok(_) if found.is_some() => return Ok(Listing::Listed(found.unwrap())),
            Ok(ended) if ended.whole => {}
            Ok(ended) => unproven = Some(Listing::Unproven(ended.with_records)),
            Err(error) if error.kind() == io::ErrorKind::ResourceBusy => return Err(error),
            Err(error) => failed = Some(error),
        }
    }
    match (failed, unproven) {
        (Some(error), _) => Err(error),
        (None, listing) => Ok(listing.unwrap_or(Listing::Absent)),
    }
}

/// The error of a listing that took `datagrams` datagrams without the socket.
fn unproven(datagrams: usize) -> io::Error {
    io::Error::other(format!(
        "SOCK_DIAG_BY_FAMILY: the listing took {datagrams} datagram(s), not all with room to spare, without the socket: no proof it is gone"
    ))
}

/// How a dump that ended went.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ended {
    /// Datagrams that carried sockets.
    with_records: usize,
    /// Every socket of the dump was given: at most one datagram carried sockets, and it had
    /// room for another ([`had_room`]). Otherwise the kernel resumed the walk by position,
    /// and a socket ahead closing in between made it skip one.
    whole: bool,
}

/// What `SKB_WITH_OVERHEAD` takes off an allocation for `struct skb_shared_info`: 320 bytes
/// with the default `MAX_SKB_FRAGS` (17) on 64-bit, more with more fragments; bounds both
/// ways, so that the sizes below hold on any build.
const SHARED_INFO_LEAST: usize = 320;
const SHARED_INFO_MOST: usize = 1_024;
/// The size `netlink_dump` allocates a primed listing socket's datagrams at: its largest
/// read, 32 KiB, capped at `SKB_WITH_OVERHEAD(32768)`.
const PRIMED_ALLOCATION: usize = 32_768;
/// More than any one socket's record in these listings (124 bytes for IPv4 UDP with the
/// attributes the kernel adds unasked, 132 for IPv6; TCP's extensions are never asked for).
const LARGEST_RECORD: usize = 512;

/// Whether a dump datagram of `len` bytes had room for another socket's record, whichever
/// size the kernel built it at: the primed 32 KiB, or `NLMSG_GOODSIZE`
/// (`SKB_WITH_OVERHEAD` of the page, at most of 8 KiB) when that allocation failed. The
/// kernel ends a datagram early only when the next record does not fit, and a datagram that
/// was full may have been followed by a walk that skipped a socket (red-team review 36).
fn had_room(len: usize) -> bool {
    had_room_with_pages(len, page_size())
}

/// [`had_room`] with pages of `page` bytes.
fn had_room_with_pages(len: usize, page: usize) -> bool {
    let goodsize = page.min(8_192);
    // A datagram this small had room in the smallest one the kernel builds.
    let small = len + LARGEST_RECORD <= goodsize - SHARED_INFO_MOST;
    // One larger than any page-sized datagram is a primed one: room if the smallest primed
    // size has it.
    let primed = len > goodsize - SHARED_INFO_LEAST
        && len + LARGEST_RECORD <= PRIMED_ALLOCATION - SHARED_INFO_MOST;
    small || primed
}

/// The page size (`sysconf(_SC_PAGESIZE)`; 4 KiB if it cannot say).
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4_096).max(4_096)
}

/// A deadline no listing reaches: [`LIST_DATAGRAMS`] bounds it.
fn far_deadline() -> Instant {
    Instant::now() + Duration::from_secs(3_600)
}

/// One family's listing (see [`list_cookie`]), every socket given to `seen`, until the dump
/// ended; stopped (an error, the dump left running) at `deadline`, checked between
/// datagrams.
fn list_family(
    fd: &OwnedFd,
    destroy: &Request,
    family: u8,
    states: u32,
    filter: &[u8],
    seen: &mut dyn FnMut(u64, Found),
    deadline: Instant,
) -> io::Result<Ended> {
    let failed = |what: String| io::Error::other(format!("SOCK_DIAG_BY_FAMILY: {what}"));
    let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dump = Request {
        kind: SOCK_DIAG_BY_FAMILY,
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        states,
        interface: 0,
        cookie: [u32::MAX, u32::MAX],
        ..*destroy
    };
    set_receive_timeout(fd)?;
    let dump = Request {
        len: (std::mem::size_of::<Request>() + filter.len()) as u32,
        ..dump
    };
    send_bytes(fd, &[request_bytes(&dump), filter].concat())?;
    // Datagrams that carried socket records: the kernel fills one before it resumes the walk
    // (NLMSG_DONE usually comes in a datagram of its own).
    let (mut with_records, mut roomy) = (0, true);
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..LIST_DATAGRAMS {
        if Instant::now() > deadline {
            return Err(left_running(failed(
                "the listing ran out of time".to_string(),
            )));
        }
        // SAFETY: a zeroed sockaddr_nl is a valid out-parameter of its size.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are writable buffers of the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            return Err(left_running(failed(io::Error::last_os_error().to_string())));
        }
        if from.nl_pid != 0 {
            continue;
        }
        let part = parse_dump(&buf[..n as usize], seq, seen);
        if part.records > 0 {
            with_records += 1;
            roomy = had_room(n as usize);
        }
        match part.end {
            None => {}
            Some(Ok(())) => {
                return Ok(Ended {
                    with_records,
                    whole: with_records == 0 || (with_records == 1 && roomy),
                })
            }
            Some(Err(errno)) => {
                return Err(failed(io::Error::from_raw_os_error(errno).to_string()))
            }
        }
    }
    Err(left_running(failed(format!(
        "the listing did not end within {LIST_DATAGRAMS} datagrams"
    ))))
}

/// `error`, for a listing stopped before its end: the dump may still run on the socket, so
/// the next request on it would be refused (`EBUSY`) and the socket must be dropped.
fn left_running(error: io::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ResourceBusy, error.to_string())
}

/// What one datagram of a dump held.
#[derive(Debug, PartialEq, Default)]
struct DumpPart {
    /// Socket records of this dump.
    records: usize,
    /// The dump's end: `NLMSG_DONE` (`Ok`), or the kernel's refusal or error (a positive
    /// errno); `None` while more is to come.
    end: Option<Result<(), i32>>,
}

/// Reads the netlink messages of one datagram of dump `seq`: `inet_diag_msg` records
/// (`include/uapi/linux/inet_diag.h`: family, state, timer, retrans, then `inet_diag_sockid`
/// with the interface at offset 40 and the cookie at 44, low word first), each socket given
/// to `seen` with its cookie (the remote address at offset 24, the port at 6).
fn parse_dump(mut msgs: &[u8], seq: u32, seen: &mut dyn FnMut(u64, Found)) -> DumpPart {
    let mut part = DumpPart::default();
    while msgs.len() >= 16 {
        let word =
            |m: &[u8], at: usize| u32::from_ne_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
        let len = word(msgs, 0) as usize;
        if len < 16 || len > msgs.len() {
            break;
        }
        let (msg, rest) = msgs.split_at(len.next_multiple_of(4).min(msgs.len()));
        msgs = rest;
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        if word(msg, 8) != seq {
            continue;
        }
        match kind {
            // NLMSG_DONE carries the dump's own result.
            NLMSG_DONE if msg.len() >= 20 && word(msg, 16) as i32 != 0 => {
                part.end = Some(Err(-(word(msg, 16) as i32)));
                return part;
            }
            NLMSG_DONE => {
                part.end = Some(Ok(()));
                return part;
            }
            NLMSG_ERROR if msg.len() >= 20 => {
                let error = word(msg, 16) as i32;
                if error != 0 {
                    part.end = Some(Err(-error));
                    return part;
                }
            }
            SOCK_DIAG_BY_FAMILY if msg.len() >= 16 + 52 => {
                part.records += 1;
                let body = &msg[16..];
                let cookie = u64::from(word(body, 44)) | u64::from(word(body, 48)) << 32;
                seen(
                    cookie,
                    Found {
                        device: word(body, 40),
                        peer: (remote_address(body), u16::from_be_bytes([body[6], body[7]])),
                    },
                );
            }
            _ => {}
        }
    }
    part
}

/// The remote address of an `inet_diag_msg` body (`idiag_dst`, at offset 24): IPv4 in an
/// `AF_INET` record's first four bytes; IPv6 otherwise, an IPv4-mapped one given as IPv4.
fn remote_address(body: &[u8]) -> IpAddr {
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&body[24..40]);
    if body[0] == libc::AF_INET as u8 {
        IpAddr::from([dst[0], dst[1], dst[2], dst[3]])
    } else {
        IpAddr::from(dst).to_canonical()
    }
}

/// How long the kernel's ack may take: it answers synchronously, so this only bounds a
/// reply that never comes (the agent's loop must not hang on one flow).
const ACK_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 1,
    tv_usec: 0,
};
/// Messages read while looking for the ack before giving up (each foreign one is dropped).
const ACK_READS: usize = 16;

/// Sequence numbers of the requests, so that an ack answers this request and no other.
static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Bounds every read on the diag socket by [`ACK_TIMEOUT`]: the kernel answers at once, so
/// this only bounds an answer that never comes.
fn set_receive_timeout(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setsockopt with a timeval of its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&ACK_TIMEOUT as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for the kernel's ack of request `seq` on `fd` and returns its verdict.
///
/// The diag socket lives in the flow's network namespace, which the workload shares: a
/// process there with CAP_NET_ADMIN can send netlink messages to the agent's port id. So only
/// a message from the kernel (sender port id 0, which the kernel sets and a process cannot
/// choose) that acks exactly this request (`NLMSG_ERROR`, our sequence number, our request
/// type echoed) counts; anything else is dropped, and a forged "success" cannot make a
/// flow look revoked while it lives on.
fn read_ack(fd: &OwnedFd, seq: u32) -> io::Result<()> {
    set_receive_timeout(fd)?;
    for _ in 0..ACK_READS {
        // nlmsghdr (16 bytes) + nlmsgerr (error, then the request's header echoed).
        let mut reply = [0u8; 256];
        // SAFETY: a zeroed sockaddr_nl is a valid out-parameter of its size.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `reply` and `from` are writable buffers of the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            return Err(match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "SOCK_DESTROY: no ack from the kernel within 1 s",
                ),
                _ => error,
            });
        }
        match parse_ack(&reply[..n as usize], from.nl_pid, seq) {
            Ack::Verdict(0) => return Ok(()),
            Ack::Verdict(error) => return Err(io::Error::from_raw_os_error(-error)),
            Ack::Foreign(why) => tracing::warn!(why, "SOCK_DESTROY: ignoring a netlink message"),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("SOCK_DESTROY: no ack from the kernel among {ACK_READS} messages"),
    ))
}

/// What one netlink message read on the diag socket is.
#[derive(Debug, PartialEq)]
enum Ack {
    /// The kernel's ack of our request: 0 or a negated errno.
    Verdict(i32),
    /// Not from the kernel, or not an ack of this request.
    Foreign(&'static str),
}

/// Classifies `msg`, received from netlink port `sender`, against request `seq`.
fn parse_ack(msg: &[u8], sender: u32, seq: u32) -> Ack {
    if sender != 0 {
        return Ack::Foreign("not sent by the kernel");
    }
    // nlmsghdr (16) + nlmsgerr.error (4) + the echoed nlmsghdr (16).
    if msg.len() < 36 {
        return Ack::Foreign("shorter than an ack");
    }
    let word = |at: usize| u32::from_ne_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
    let half = |at: usize| u16::from_ne_bytes([msg[at], msg[at + 1]]);
    if half(4) != NLMSG_ERROR {
        return Ack::Foreign("not an ack");
    }
    if word(8) != seq || word(28) != seq || half(24) != SOCK_DESTROY {
        return Ack::Foreign("an ack of another request");
    }
    Ack::Verdict(word(16) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message: nlmsghdr (length, type, flags, seq, port id 0) and `body`.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    /// An `inet_diag_msg` (72 bytes) of an `AF_INET` socket bound to `interface` with
    /// `cookie`, connected to 127.0.0.9:53.
    fn diag_msg(interface: u32, cookie: u64) -> Vec<u8> {
        let mut body = vec![0u8; 72];
        body[0] = libc::AF_INET as u8;
        body[6..8].copy_from_slice(&53u16.to_be_bytes());
        body[24..28].copy_from_slice(&[127, 0, 0, 9]);
        body[40..44].copy_from_slice(&interface.to_ne_bytes());
        body[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        body[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        body
    }

    #[test]
    fn a_dump_names_the_device_of_the_socket_with_the_cookie_only() {
        let peer = (IpAddr::from([127, 0, 0, 9]), 53);
        let cookie = 0x1234_5678_9abc;
        // What one datagram gives: the device of the socket with the cookie (its peer
        // checked), the records, the end.
        let parse = |dump: &[u8], seq: u32| {
            let mut found = None;
            let part = parse_dump(dump, seq, &mut |listed, socket: Found| {
                if listed == cookie {
                    assert_eq!(socket.peer, peer);
                    found = Some(socket.device);
                }
            });
            (found, part.records, part.end)
        };
        let mut dump = message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(3, 99));
        dump.extend(message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(1, cookie)));
        assert_eq!(parse(&dump, 7), (Some(1), 2, None));
        dump.extend(message(NLMSG_DONE, 7, &[0; 4]));
        assert_eq!(parse(&dump, 7), (Some(1), 2, Some(Ok(()))));
        // Another dump's messages name none; a socket bound to no device is listed (device 0).
        assert_eq!(parse(&dump, 8), (None, 0, None));
        let unbound = message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(0, cookie));
        assert_eq!(parse(&unbound, 7), (Some(0), 1, None));
        // A dump that ends with an error is no listing.
        let failed = message(NLMSG_DONE, 7, &(-libc::ENOBUFS).to_ne_bytes());
        assert_eq!(parse(&failed, 7), (None, 0, Some(Err(libc::ENOBUFS))));
        // The kernel's refusal, and a truncated message, which is not read past.
        let refused = message(NLMSG_ERROR, 7, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&refused, 7), (None, 0, Some(Err(libc::EPERM))));
        let whole = message(SOCK_DIAG_BY_FAMILY, 7, &diag_msg(1, cookie));
        assert_eq!(parse(&whole[..40], 7), (None, 0, None));
    }

    /// A dump datagram proves that its walk ended (no socket skipped after it) only when it
    /// had room for another record at whichever size the kernel built it: a page's worth
    /// after a failed large allocation, up to 8 KiB with large pages, or the primed 32 KiB.
    #[test]
    fn only_a_datagram_with_room_for_another_record_proves_the_walk_ended() {
        // 4 KiB pages: a datagram up to 2,560 bytes had room in any; one of 2,561 to 3,776
        // may have been a full page-sized one; beyond, a primed one, with room up to 31,232.
        for (len, room) in [
            (0, true),
            (2_560, true),
            (2_561, false),
            (3_776, false),
            (3_777, true),
            (31_232, true),
            (31_233, false),
        ] {
            assert_eq!(
                had_room_with_pages(len, 4_096),
                room,
                "{len} bytes, 4 KiB pages"
            );
        }
        // 64 KiB pages: page-sized datagrams are 8 KiB at most.
        for (len, room) in [(6_656, true), (6_657, false), (7_872, false), (7_873, true)] {
            assert_eq!(
                had_room_with_pages(len, 65_536),
                room,
                "{len} bytes, 64 KiB pages"
            );
        }
    }

    #[test]
    fn a_listed_socket_names_its_remote_end_in_either_family() {
        let mut v6 = vec![0u8; 72];
        v6[0] = libc::AF_INET6 as u8;
        v6[24..40].copy_from_slice(
            &"::ffff:127.0.0.9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(remote_address(&v6), IpAddr::from([127, 0, 0, 9]));
        v6[24..40].copy_from_slice(&"fd83::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(remote_address(&v6), "fd83::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            remote_address(&diag_msg(0, 1)),
            IpAddr::from([127, 0, 0, 9])
        );
    }

    /// An ack as the kernel lays it out: nlmsghdr, error, the request's nlmsghdr echoed.
    fn ack(error: i32, seq: u32, echoed_kind: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(&72u32.to_ne_bytes());
        m.extend_from_slice(&echoed_kind.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    /// The listing narrowed to prefixes runs its filter in the real kernel (which audits the
    /// program's jumps): it shows the sockets connected into a prefix, an IPv4 one also
    /// matching a dual-stack socket's mapped peer, and no other; several prefixes, of
    /// either family, are alternatives.
    #[test]
    fn a_listing_narrowed_to_prefixes_shows_the_sockets_connected_into_them_only() {
        use std::net::UdpSocket;
        let cookie = |s: &UdpSocket| {
            let mut cookie = 0u64;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: getsockopt into a u64 of the length given.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_COOKIE,
                    (&raw mut cookie).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
            cookie
        };
        let connected = |bind: &str, to: &str| {
            let s = UdpSocket::bind(bind).expect("bind");
            s.connect(to).expect("connect");
            s
        };
        let into = connected("127.0.0.1:0", "127.77.1.9:9");
        let beside = connected("127.0.0.1:0", "127.77.2.9:9");
        let mapped = connected("[::]:0", "[::ffff:127.77.1.10]:9");
        // A record of this namespace, found through this process.
        // SAFETY: `FlowRecord` is plain data; all zeroes is a valid value.
        let mut record: FlowRecord = unsafe { std::mem::zeroed() };
        record.netns_cookie = current_netns_cookie().expect("this namespace's cookie");
        record.pid_tgid = u64::from(std::process::id()) << 32;
        let mut sockets = DiagSockets::default();
        let list = |sockets: &mut DiagSockets, prefixes: &[crate::flows::TrackedPrefix]| {
            udp_places_within(&record, &[], sockets, prefixes)
        };
        let (places, _) = match list(&mut sockets, &[(IpAddr::from([127, 77, 1, 0]), 24, true)]) {
            Ok(listed) => listed,
            Err(error) => {
                // Not root: no sock_diag listing of other processes' sockets.
                assert!(
                    std::env::var("CI").map_or(true, |v| v != "true"),
                    "needs root: {error}"
                );
                return;
            }
        };
        let at = |ip: [u8; 4]| Some((IpAddr::from(ip), 9));
        assert_eq!(places.of(cookie(&into)), at([127, 77, 1, 9]));
        assert_eq!(places.of(cookie(&mapped)), at([127, 77, 1, 10]));
        assert_eq!(places.of(cookie(&beside)), None);
        let prefixes = [
            ("fd77::1".parse().unwrap(), 128, true),
            (IpAddr::from([127, 77, 2, 9]), 32, true),
            (IpAddr::from([127, 77, 1, 10]), 32, true),
        ];
        let (places, _) = list(&mut sockets, &prefixes).expect("a second listing");
        assert_eq!(places.of(cookie(&into)), None);
        assert_eq!(places.of(cookie(&beside)), at([127, 77, 2, 9]));
        assert_eq!(places.of(cookie(&mapped)), at([127, 77, 1, 10]));
        // An untracked prefix inside a tracked one, longer, first: its addresses are out.
        let prefixes = [
            (IpAddr::from([127, 77, 1, 10]), 32, false),
            (IpAddr::from([127, 77, 1, 0]), 24, true),
        ];
        let (places, _) = list(&mut sockets, &prefixes).expect("a third listing");
        assert_eq!(places.of(cookie(&into)), at([127, 77, 1, 9]));
        assert_eq!(places.of(cookie(&mapped)), None);
        assert_eq!(places.of(cookie(&beside)), None);
    }

    /// The real kernel refuses a unicast from another netlink socket to the diag socket, even
    /// from root (who may send to any port id): a forged ack never reaches `read_ack`.
    #[test]
    fn the_diag_socket_takes_messages_from_the_kernel_only() {
        let diag = diag_socket().expect("a sock_diag socket");
        // SAFETY: getsockname into a sockaddr_nl of its size.
        let port = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // The port id is bound on connect (autobind); binding again fails harmlessly, and
            // binds a socket that was not connected.
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::bind(
                diag.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                len,
            );
            assert_eq!(
                libc::getsockname(
                    diag.as_raw_fd(),
                    (&mut addr as *mut libc::sockaddr_nl).cast(),
                    &mut len
                ),
                0
            );
            addr.nl_pid
        };
        assert_ne!(port, 0);
        // SAFETY: plain socket(2), owned at once.
        let forger = unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            ))
        };
        let forged = ack(0, 1, SOCK_DESTROY);
        // SAFETY: sendto with a valid buffer and a sockaddr_nl of its size.
        let rc = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            to.nl_pid = port;
            libc::sendto(
                forger.as_raw_fd(),
                forged.as_ptr().cast(),
                forged.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        let error = io::Error::last_os_error();
        if rc < 0 && error.raw_os_error() == Some(libc::EPERM) {
            // Not root: the kernel refused for lack of CAP_NET_ADMIN, which proves nothing.
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "needs root: {error}"
            );
            return;
        }
        assert_eq!(rc, -1, "a forged ack was delivered to the diag socket");
        assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{error}");
    }

    #[test]
    fn only_the_kernels_ack_of_this_request_counts() {
        assert_eq!(parse_ack(&ack(0, 7, SOCK_DESTROY), 0, 7), Ack::Verdict(0));
        assert_eq!(
            parse_ack(&ack(-libc::ENOENT, 7, SOCK_DESTROY), 0, 7),
            Ack::Verdict(-libc::ENOENT)
        );
        // A process's forged "success" (its port id is never 0).
        assert!(matches!(
            parse_ack(&ack(0, 7, SOCK_DESTROY), 4242, 7),
            Ack::Foreign(_)
        ));
        // Another request's ack, or an ack echoing another message type.
        assert!(matches!(
            parse_ack(&ack(0, 6, SOCK_DESTROY), 0, 7),
            Ack::Foreign(_)
        ));
        assert!(matches!(parse_ack(&ack(0, 7, 20), 0, 7), Ack::Foreign(_)));
        // Truncated.
        assert!(matches!(
            parse_ack(&ack(0, 7, SOCK_DESTROY)[..20], 0, 7),
            Ack::Foreign(_)
        ));
    }
}

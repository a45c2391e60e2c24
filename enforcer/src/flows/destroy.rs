//! Closing a TCP socket from outside: netlink `SOCK_DESTROY` (NETLINK_SOCK_DIAG, message type
//! 21, kernel `CONFIG_INET_DIAG_DESTROY`), an `inet_diag_req_v2` naming the socket by its
//! 4-tuple *and its cookie*. The kernel finds the socket by the tuple, refuses it unless the
//! cookie matches (ESTALE), and resets it: the owner's next call fails with ECONNRESET. The
//! cookie is never left out (the kernel's "no cookie" value would accept whatever socket the
//! tuple finds, the listening socket included once the flow is gone).
//!
//! A small encoder rather than a crate: netlink-packet-sock-diag has no SOCK_DESTROY message,
//! and the request is one fixed 72-byte struct.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sock_diag socket in the network namespace of process `pid` (the task that connected):
/// sock_diag sees only the sockets of the namespace its socket was created in, and a pod has
/// its own. The socket is created on a short-lived thread that joins that namespace (a
/// netlink socket keeps the namespace it was created in), so the agent's own threads never
/// change namespace. Without the process (it exited, its socket lives on in another process),
/// the agent's own namespace is tried: right for workloads in the host network.
fn diag_socket_of(pid: u32) -> io::Result<OwnedFd> {
    let ns_path = format!("/proc/{pid}/ns/net");
    let (Ok(theirs), Ok(ours)) = (
        std::fs::metadata(&ns_path),
        std::fs::metadata("/proc/self/ns/net"),
    ) else {
        return diag_socket();
    };
    use std::os::unix::fs::MetadataExt;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return diag_socket();
    }
    let ns = std::fs::File::open(&ns_path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only (it ends right after); `ns` is an open
                // namespace file.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                diag_socket()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// Resets the established TCP socket of `record` whose cookie is `cookie`, in the network
/// namespace of the process that connected it. Errors: `ENOENT`
/// when no socket has that tuple any more (it closed meanwhile), `ESTALE` when the tuple's
/// socket is another one (the cookie differs), `EPERM` without CAP_NET_ADMIN.
pub fn destroy(cookie: u64, record: &FlowRecord) -> io::Result<()> {
    let local = super::source_ip(record).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the flow has no local address yet (handshake not completed)",
        )
    })?;
    let remote = super::destination_ip(record);
    let mut req = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DESTROY,
        flags: NLM_F_REQUEST | NLM_F_ACK,
        seq: 1,
        protocol: IPPROTO_TCP,
        // Every state: the tuple and the cookie name the socket.
        states: u32::MAX,
        sport: record.sport.to_be_bytes(),
        dport: record.dport.to_be_bytes(),
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
            ))
        }
    }
    let fd = diag_socket_of((record.pid_tgid >> 32) as u32)?;
    // SAFETY: a zeroed sockaddr_nl is the kernel (pid 0); `req` is a valid buffer of its size.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            (&req as *const Request).cast(),
            std::mem::size_of::<Request>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The ack: nlmsghdr (16 bytes) + nlmsgerr (error, then the request echoed).
    let mut reply = [0u8; 256];
    // SAFETY: `reply` is a writable buffer of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n < 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SOCK_DESTROY: a reply of {n} bytes"),
        ));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SOCK_DESTROY: reply of type {kind}, expected an ack"),
        ));
    }
    let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if error == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-error))
    }
}

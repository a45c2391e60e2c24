//! `probe ATTEMPT...` / `probe --repeat N ATTEMPT`: a tiny network client for kernel tests.
//!
//! ATTEMPT is `tcp:ADDR:PORT` (TCP connect, 2 s timeout; `tcprst:` closes it with a reset,
//! `tcpwait:` waits 120 s, `tcpsyn:` sends the SYN without waiting and closes the socket,
//! `tcpagain:` connects first to the port plus one, refused, then the same socket again,
//! `tcpbulk:` sends 16 MiB in 1 MiB writes, shuts its side down and waits for the server to
//! close, each step within 10 s: ok only when every byte was taken),
//! `udp:ADDR:PORT` (unconnected `sendto` of one byte: the sendmsg hooks) or `udpc:ADDR:PORT`
//! (UDP connect then send: the connect hooks). IPv6 as `tcp:[fd00::1]:80`. `tcp`, `udp` and `udpc` take an optional
//! source to bind first: `tcp:0.0.0.0:80@127.1.2.3` (port 0). Socket kinds the sock_addr hooks
//! do not see, for the bypass tests: `ping:ADDR` (ICMP/ICMPv6 datagram socket, one echo
//! request), `raw:ADDR` (`SOCK_RAW` ICMP/ICMPv6, one echo request), `udplite:ADDR:PORT`
//! (UDP-Lite `sendto`), `mptcp:ADDR:PORT` (Multipath TCP connect) and `tfo:ADDR:PORT` (TCP
//! Fast Open: `sendto(MSG_FASTOPEN)` without `connect`). Families no cgroup hook sees:
//! `bind:ADDR:PORT` / `bindu:ADDR:PORT` only bind a TCP / UDP socket (the bind hooks), and
//! `udpsrc:ADDR:PORT@SRC` is an unconnected `sendmsg` of one byte whose source SRC comes in an
//! `IP_PKTINFO` / `IPV6_PKTINFO` control message (the socket stays unbound; `udpcsrc:`
//! connects it first and sends without an address).
//! `packet:ADDR:PORT` (an `AF_PACKET` raw socket writes one hand-made Ethernet/IPv4/UDP frame
//! to ADDR:PORT, IPv4 only, from 127.0.0.1, onto the loopback device) and `xdp` (creates an
//! `AF_XDP` socket). Each attempt prints one JSON line:
//! `{"attempt":"tcp:127.10.1.2:8000","outcome":"ok"|"eperm"|"error","errno":N}`;
//! with `--repeat N` only a summary `{"attempts":N,"ok":a,"eperm":b,"error":c}`.
//! `probe --whoami` prints `{"pid":N,"cgroup":"/v2/path"}` (the harness checks that it
//! placed the probe where it meant to).
//! `probe --until OUTCOME [--every MS] [--for MS] ATTEMPT` repeats one attempt every MS
//! (default 10) until its outcome is OUTCOME (`ok`, `eperm` or `error`) or MS (default
//! 30,000) have passed, and prints one line `{"attempt":..,"outcome":..,"errno":N,
//! "reached":bool,"tries":N,"first":"eperm","at_unix_ns":N}`: `at_unix_ns` is the wall clock
//! just before the last try (the one that reached OUTCOME), so that a benchmark can time
//! when a change took effect in the kernel from a process that was judged all along.
//! `probe --serve ADDR:PORT --for MS` is a TCP server instead: it listens (so the listening
//! socket belongs to the probe's cgroup, where a test placed it), prints
//! `{"listening":"ADDR:PORT"}`, then `{"peer":"IP:PORT"}` for every connection it accepts
//! (and holds open until it exits), and exits after MS milliseconds (at most 600,000) or
//! when its stdout closes. With `--held PATH` it listens with a backlog of 0 and accepts
//! nothing while PATH does not exist: one connection fills its accept queue, and the kernel
//! drops the next connect's SYNs (counted as `ListenOverflows`) until PATH appears, so that
//! a test can make a client retransmit its SYN.
//! `probe --flood MS [--every-us US] ATTEMPT` repeats one attempt for MS milliseconds (at most
//! 600,000), as fast as it can or US microseconds apart, and prints
//! `{"attempts":N,"ok":a,"eperm":b,"error":c,"elapsed_ns":N}`: `elapsed_ns` from the start
//! of the first attempt to the start of the last (CLOCK_MONOTONIC), the window a rate limit
//! is measured over.
//! `probe --ports N ATTEMPT` makes N attempts like `--repeat`, the i-th to ATTEMPT's port
//! plus i (wrapping past 65,535 to 1): N distinct destinations, the sweep of a scanner; it
//! prints the `--repeat` summary.
//! `probe --reconnect N ADDR:PORT...` makes one UDP socket (of the first address's family)
//! and connects it N times, the i-th time to the i-th address modulo the list (one address:
//! always the same destination), sending one byte after each allowed connect; then it closes
//! the socket. It prints the `--repeat` summary of the N connects. An address written
//! `~ADDR:PORT` is connected to with the other family's number in `sa_family` (AF_INET6 in
//! a `sockaddr_in`): the connect hooks see the address, then the kernel refuses the connect
//! (`EAFNOSUPPORT`) and the socket stays connected where it was.
//! `probe --failed-then FIRST SECOND` (two `[::ffff:a.b.c.d]:PORT` addresses) makes one IPv6
//! TCP socket with `IPV6_V6ONLY` on and connects it to FIRST (the connect hooks see an IPv4
//! destination, then the kernel refuses with `ENETUNREACH` before any SYN), turns `IPV6_V6ONLY`
//! off and connects it to SECOND, sends one byte, and closes it (reset, `SO_LINGER` 0). It
//! prints `{"first":outcome,"first_errno":n,"second":outcome,"second_errno":n}`.
//! `probe --deferred N ADDR:PORT` makes N TCP sockets with `TCP_FASTOPEN_CONNECT` and
//! `TCP_FASTOPEN_NO_COOKIE`, connects each to ADDR:PORT (the kernel defers the SYN to the
//! first write: `connect()` returns at once and sends nothing) and closes it without writing;
//! it prints the `--ports` summary of the N connects. With `--mptcp` the sockets are MPTCP
//! (`IPPROTO_MPTCP`): the connect is its first subflow's, a kernel TCP socket.
//! `probe --deferred-moved DIR ADDR:PORT@SRC` makes one TCP socket bound to SRC with
//! `TCP_FASTOPEN_CONNECT` and `TCP_FASTOPEN_NO_COOKIE`, connects it to ADDR:PORT (nothing is
//! sent yet), moves the probe into the cgroup directory DIR, and writes one byte there (the
//! SYN leaves now, from a task of DIR: as when the socket was passed to another workload
//! before its first write); it prints `{"connect":outcome,"segments_before_move":n,
//! "cgroup_at_send":"/path","send":outcome,"send_errno":n,"local":"IP:PORT"}` (the segments
//! the socket had sent before the move, 0 when the SYN was deferred; the probe's cgroup
//! after the move) and closes the socket.
//! Exit status is 0 whatever the outcomes (they are data); 2 on bad usage.

#[path = "../sockaddr.rs"]
mod sockaddr;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// `--repeat` is for bursts, not for load tests.
const MAX_REPEAT: u64 = 1_000_000;
/// `--until`'s defaults and bounds, in milliseconds.
const UNTIL_EVERY_MS: u64 = 10;
const UNTIL_FOR_MS: u64 = 30_000;
const UNTIL_MAX_MS: u64 = 600_000;

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    /// TCP connect, then close with a reset (`SO_LINGER` 0): the server's socket goes to
    /// TCP CLOSE at once, whatever the server does.
    TcpReset,
    /// TCP connect, 16 MiB sent, the server's close awaited (`bulk_send`).
    TcpBulk,
    /// TCP connect to the port plus one (refused), then the same socket to the port.
    TcpAgain,
    /// TCP connect that waits up to 120 s (SYN retransmissions at 1, 3, 7, 15, 31 and 63 s).
    TcpWait,
    /// Non-blocking TCP connect, closed at once: the SYN is sent and the socket abandoned
    /// before any answer (`EINPROGRESS` is "ok").
    TcpAbandon,
    Udp,
    UdpConnected,
    /// Connected UDP, then `sendmsg()` without an address but with ancillary data (IP_TOS /
    /// IPV6_TCLASS), which makes the kernel run sendmsg4/6 with no destination.
    UdpConnectedCmsg,
    Ping,
    Raw,
    UdpLite,
    Mptcp,
    FastOpen,
    Packet,
    Xdp,
    /// `bind()` of a TCP socket, nothing more.
    Bind,
    /// `bind()` of a UDP socket, nothing more.
    BindUdp,
    /// Unconnected UDP `sendmsg()` with the source in a PKTINFO control message.
    UdpPktinfo,
    /// Connected UDP, then `sendmsg()` without an address, the source in a PKTINFO control
    /// message.
    UdpConnectedPktinfo,
}

/// One parsed attempt: what, where to, and the source to bind first (if any).
#[derive(Clone, Copy)]
struct Attempt {
    kind: Kind,
    addr: SocketAddr,
    source: Option<IpAddr>,
}

fn parse(attempt: &str) -> Result<Attempt, String> {
    if attempt == "xdp" {
        return Ok(Attempt {
            kind: Kind::Xdp,
            addr: "0.0.0.0:0".parse().expect("literal"),
            source: None,
        });
    }
    let (kind, rest) = attempt
        .split_once(':')
        .ok_or_else(|| format!("bad attempt {attempt:?}: want KIND:ADDR:PORT"))?;
    let kind = match kind {
        "tcp" => Kind::Tcp,
        "tcprst" => Kind::TcpReset,
        "tcpbulk" => Kind::TcpBulk,
        "tcpwait" => Kind::TcpWait,
        "tcpagain" => Kind::TcpAgain,
        "tcpsyn" => Kind::TcpAbandon,
        "udp" => Kind::Udp,
        "udpc" => Kind::UdpConnected,
        "udpcm" => Kind::UdpConnectedCmsg,
        "ping" => Kind::Ping,
        "raw" => Kind::Raw,
        "udplite" => Kind::UdpLite,
        "mptcp" => Kind::Mptcp,
        "tfo" => Kind::FastOpen,
        "packet" => Kind::Packet,
        "bind" => Kind::Bind,
        "bindu" => Kind::BindUdp,
        "udpsrc" => Kind::UdpPktinfo,
        "udpcsrc" => Kind::UdpConnectedPktinfo,
        other => {
            return Err(format!(
                "bad attempt kind {other:?}: want tcp, tcprst, tcpbulk, tcpwait, tcpsyn, tcpagain, udp, udpc, udpcm, udpsrc, udpcsrc, bind, bindu, ping, raw, udplite, mptcp, tfo, packet or xdp"
            ))
        }
    };
    let (rest, source) = match rest.rsplit_once('@') {
        Some((rest, src))
            if matches!(
                kind,
                Kind::Tcp
                    | Kind::Udp
                    | Kind::UdpConnected
                    | Kind::UdpPktinfo
                    | Kind::UdpConnectedPktinfo
            ) =>
        {
            let src: IpAddr = src
                .parse()
                .map_err(|e| format!("bad source address in {attempt:?}: {e}"))?;
            (rest, Some(src))
        }
        Some(_) => {
            return Err(format!(
                "{attempt:?}: only tcp, udp, udpc, udpsrc and udpcsrc take @SOURCE"
            ))
        }
        None if matches!(kind, Kind::UdpPktinfo | Kind::UdpConnectedPktinfo) => {
            return Err(format!("{attempt:?}: udpsrc and udpcsrc want @SOURCE"))
        }
        None => (rest, None),
    };
    // ICMP has no port: `ping:ADDR` / `raw:ADDR`.
    let addr: SocketAddr = if matches!(kind, Kind::Ping | Kind::Raw) {
        let ip: IpAddr = rest
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|e| format!("bad address in {attempt:?}: {e}"))?;
        SocketAddr::new(ip, 0)
    } else {
        rest.parse()
            .map_err(|e| format!("bad address in {attempt:?}: {e}"))?
    };
    if matches!(kind, Kind::Packet) && !addr.is_ipv4() {
        return Err(format!("{attempt:?}: packet frames are IPv4 only"));
    }
    Ok(Attempt { kind, addr, source })
}

/// `AF_PACKET` / `AF_XDP` (libc has no constant for the latter on every target).
const AF_PACKET: libc::c_int = 17;
const AF_XDP: libc::c_int = 44;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;

/// The 16-bit ones' complement sum of an IPv4 header.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame (all-zero MACs: the loopback device's address) carrying an IPv4 UDP
/// datagram from 127.0.0.1:40000 to `to` with one byte of payload (UDP checksum 0: none).
fn udp_frame(to: std::net::SocketAddrV4) -> Vec<u8> {
    const SOURCE_PORT: u16 = 40_000;
    let payload = [0u8];
    let udp_len = 8 + payload.len() as u16;
    let total_len = 20 + udp_len;
    let mut ip = vec![
        0x45,
        0,
        0,
        0,
        0,
        1,
        0x40,
        0,
        64,
        libc::IPPROTO_UDP as u8,
        0,
        0,
    ];
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&[127, 0, 0, 1]);
    ip.extend_from_slice(&to.ip().octets());
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&SOURCE_PORT.to_be_bytes());
    frame.extend_from_slice(&to.port().to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

/// Writes `udp_frame(to)` onto the loopback device through an `AF_PACKET` socket: no IP
/// stack, so none of the sock_addr hooks runs.
fn packet_send(to: SocketAddr) -> std::io::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
    };
    let fd = socket(AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ALL.to_be()))?;
    let lo = c"lo";
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(lo.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = AF_PACKET as u16;
    ll.sll_protocol = ETH_P_IP.to_be();
    ll.sll_ifindex = ifindex as i32;
    let frame = udp_frame(to);
    // SAFETY: frame and ll are valid for the lengths given.
    check_len(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&ll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })
}

/// `socket(2)`, owned.
fn socket(family: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd that we own.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family(addr: &SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_len(rc: libc::ssize_t) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sendto(
    fd: &OwnedFd,
    payload: &[u8],
    flags: libc::c_int,
    to: &SocketAddr,
) -> std::io::Result<()> {
    let (sa, len) = sockaddr::sockaddr(to);
    // SAFETY: payload and sa are valid for the lengths given.
    check_len(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            flags,
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

fn connect(fd: &OwnedFd, to: &SocketAddr) -> std::io::Result<()> {
    let (sa, len) = sockaddr::sockaddr(to);
    // SAFETY: sa is valid for len bytes.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

/// [`connect`] with the other family's number in `sa_family` (what the kernel checks only
/// after the cgroup connect hooks ran).
fn connect_wrong_family(fd: &OwnedFd, to: &SocketAddr) -> std::io::Result<()> {
    let (mut sa, len) = sockaddr::sockaddr(to);
    sa.ss_family = if to.is_ipv4() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    } as libc::sa_family_t;
    // SAFETY: sa is valid for len bytes.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

fn bind(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (sa, len) = sockaddr::sockaddr(addr);
    // SAFETY: sa is valid for len bytes.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

/// An ICMP (type 8) or ICMPv6 (type 128) echo request with its checksum (the kernel fills in
/// the ICMPv6 checksum and a ping socket's identifier itself).
fn echo_request(v6: bool) -> [u8; 8] {
    let mut m = [if v6 { 128 } else { 8 }, 0, 0, 0, 0x12, 0x34, 0, 1];
    let sum: u32 = m
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// One byte through `sendmsg()` with no address and one IP_TOS (IPv4) or IPV6_TCLASS (IPv6)
/// control message: what a QUIC stack setting ECN per datagram does on a connected socket.
fn send_with_tos(fd: &OwnedFd, v6: bool) -> std::io::Result<()> {
    let (level, ty) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
    } else {
        (libc::IPPROTO_IP, libc::IP_TOS)
    };
    let tos: libc::c_int = 0x02; // ECT(0)
    send_with_control(fd, None, level, ty, &tos.to_ne_bytes())
}

/// One byte from an unbound UDP socket to `to`, its source `source` given in an IP_PKTINFO
/// (`ipi_spec_dst`) or IPV6_PKTINFO (`ipi6_addr`) control message; `connected`: the socket
/// is connected to `to` first and the `sendmsg()` names no address.
fn send_from(to: SocketAddr, source: IpAddr, connected: bool) -> std::io::Result<()> {
    let fd = socket(family(&to), libc::SOCK_DGRAM, 0)?;
    let name = if connected {
        connect(&fd, &to)?;
        None
    } else {
        Some(&to)
    };
    match source {
        IpAddr::V4(s) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(s.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            send_with_control(
                &fd,
                name,
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                bytes_of(&info),
            )
        }
        IpAddr::V6(s) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: s.octets(),
                },
                ipi6_ifindex: 0,
            };
            send_with_control(
                &fd,
                name,
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                bytes_of(&info),
            )
        }
    }
}

/// The bytes of a C struct without padding (`in_pktinfo`, `in6_pktinfo`), as a control
/// message carries it.
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: `value` is a live, initialised `T` of size_of::<T>() bytes; the callers' types
    // are libc structs made of integers with no padding.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// One byte through `sendmsg()` to `to` (or the connected peer) with one control message.
fn send_with_control(
    fd: &OwnedFd,
    to: Option<&SocketAddr>,
    level: libc::c_int,
    ty: libc::c_int,
    data: &[u8],
) -> std::io::Result<()> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut name = to.map(sockaddr::sockaddr);
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some((storage, len)) = name.as_mut() {
        msg.msg_name = (storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one cmsg of `data.len()` bytes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
    }
    // SAFETY: msg and everything it points at live across the call.
    check_len(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) })
}

/// A dropped SYN (an ingress check) must not block for the kernel's two minutes of
/// retries: SO_SNDTIMEO bounds a blocking connect (it fails with EINPROGRESS).
fn bound_connect_time(fd: &OwnedFd) -> std::io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: TCP_CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: a valid option pointer and length for SO_SNDTIMEO.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
}

/// `tcpagain`: one socket connects to `addr`'s port plus one (closed: refused), then, the
/// same socket, to `addr`; the second connect's outcome.
fn connect_again(addr: SocketAddr) -> std::io::Result<()> {
    let fd = socket(family(&addr), libc::SOCK_STREAM, 0)?;
    bound_connect_time(&fd)?;
    let mut first = addr;
    first.set_port(addr.port().wrapping_add(1));
    if connect(&fd, &first).is_ok() {
        // The port was open after all: this is not the case the kind is for.
        return Err(std::io::Error::from_raw_os_error(libc::EISCONN));
    }
    connect(&fd, &addr)
}

/// TCP or UDP from a socket bound to `source` first (the unspecified-destination bypasses).
fn bound_attempt(kind: Kind, addr: SocketAddr, source: IpAddr) -> std::io::Result<()> {
    let ty = if matches!(kind, Kind::Tcp) {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let fd = socket(family(&addr), ty, 0)?;
    bind(&fd, &SocketAddr::new(source, 0))?;
    match kind {
        Kind::Udp => sendto(&fd, &[0], 0, &addr),
        Kind::UdpConnected => {
            connect(&fd, &addr)?;
            // SAFETY: one byte from a valid buffer.
            check_len(unsafe { libc::send(fd.as_raw_fd(), [0u8].as_ptr().cast(), 1, 0) })
        }
        _ => {
            bound_connect_time(&fd)?;
            connect(&fd, &addr)
        }
    }
}

fn try_once(a: Attempt) -> std::io::Result<()> {
    let Attempt { kind, addr, source } = a;
    if let Some(source) = source {
        match kind {
            Kind::UdpPktinfo => return send_from(addr, source, false),
            Kind::UdpConnectedPktinfo => return send_from(addr, source, true),
            _ => {}
        }
        return bound_attempt(kind, addr, source);
    }
    let v6 = addr.is_ipv6();
    let icmp = if v6 {
        libc::IPPROTO_ICMPV6
    } else {
        libc::IPPROTO_ICMP
    };
    match kind {
        Kind::Ping => sendto(
            &socket(family(&addr), libc::SOCK_DGRAM, icmp)?,
            &echo_request(v6),
            0,
            &addr,
        ),
        Kind::Raw => sendto(
            &socket(family(&addr), libc::SOCK_RAW, icmp)?,
            &echo_request(v6),
            0,
            &addr,
        ),
        Kind::UdpLite => sendto(
            &socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE)?,
            &[0],
            0,
            &addr,
        ),
        Kind::Mptcp => connect(
            &socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_MPTCP)?,
            &addr,
        ),
        Kind::FastOpen => sendto(
            &socket(family(&addr), libc::SOCK_STREAM, 0)?,
            &[0],
            libc::MSG_FASTOPEN,
            &addr,
        ),
        Kind::Packet => packet_send(addr),
        Kind::Bind => bind(&socket(family(&addr), libc::SOCK_STREAM, 0)?, &addr),
        Kind::BindUdp => bind(&socket(family(&addr), libc::SOCK_DGRAM, 0)?, &addr),
        // Parsing made sure it has one.
        Kind::UdpPktinfo | Kind::UdpConnectedPktinfo => {
            unreachable!("udpsrc and udpcsrc always have a source")
        }
        Kind::Xdp => socket(AF_XDP, libc::SOCK_RAW, 0).map(drop),
        Kind::Tcp => TcpStream::connect_timeout(&addr, TCP_CONNECT_TIMEOUT).map(drop),
        Kind::TcpWait => TcpStream::connect_timeout(&addr, TCP_WAIT_TIMEOUT).map(drop),
        Kind::TcpAgain => connect_again(addr),
        Kind::TcpAbandon => {
            let fd = socket(family(&addr), libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
            match connect(&fd, &addr) {
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
                other => other,
            }
        }
        Kind::TcpBulk => bulk_send(addr),
        Kind::TcpReset => {
            let stream = TcpStream::connect_timeout(&addr, TCP_CONNECT_TIMEOUT)?;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid option pointer and length on a socket we own.
            check(unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            })
        }
        Kind::UdpConnectedCmsg => {
            let fd = socket(family(&addr), libc::SOCK_DGRAM, 0)?;
            connect(&fd, &addr)?;
            send_with_tos(&fd, v6)
        }
        Kind::Udp | Kind::UdpConnected => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let sock = UdpSocket::bind(local)?;
            if let Kind::UdpConnected = kind {
                sock.connect(addr)?;
                sock.send(&[0]).map(drop)
            } else {
                sock.send_to(&[0], addr).map(drop)
            }
        }
    }
}

fn classify(r: &std::io::Result<()>) -> (&'static str, i32) {
    match r {
        Ok(()) => ("ok", 0),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => ("eperm", libc::EPERM),
            Some(n) => ("error", n),
            // A timeout from connect_timeout has no errno of its own.
            None if e.kind() == std::io::ErrorKind::TimedOut => ("error", libc::ETIMEDOUT),
            None => ("error", 0),
        },
    }
}

/// `--serve ADDR:PORT --for MS [--held PATH]` (see the module documentation).
fn serve(args: &[String], out: &mut impl Write) -> Result<(), String> {
    let (addr, flag, ms, held_until) = match args {
        [addr, flag, ms] => (addr, flag, ms, None),
        [addr, flag, ms, held, path] if held == "--held" => {
            (addr, flag, ms, Some(std::path::Path::new(path)))
        }
        _ => return Err("--serve wants ADDR:PORT --for MS [--held PATH]".into()),
    };
    if flag != "--for" {
        return Err(format!("--serve wants --for MS, got {flag:?}"));
    }
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--serve {addr:?}: {e}"))?;
    let ms: u64 = ms
        .parse()
        .ok()
        .filter(|&m| m <= UNTIL_MAX_MS)
        .ok_or_else(|| format!("--for wants milliseconds up to {UNTIL_MAX_MS}, got {ms:?}"))?;
    let listener = match held_until {
        None => std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?,
        Some(_) => listen_backlog_zero(&addr).map_err(|e| format!("listen on {addr}: {e}"))?,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    let line = serde_json::json!({ "listening": addr.to_string() });
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    // Accepted connections stay open until the server exits: the server side of each stays
    // established (or CLOSE_WAIT once the client closes), as a DB's would, so that what the
    // kernel keeps per live server socket (`WIRE_PEERS`) can be checked after the client left.
    let mut held = Vec::new();
    while std::time::Instant::now() < deadline {
        if held_until.is_some_and(|p| !p.exists()) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match listener.accept() {
            Ok((conn, peer)) => {
                held.push(conn);
                let line = serde_json::json!({ "peer": peer.to_string() });
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

/// A TCP listener whose accept queue holds one connection (`listen(fd, 0)`; std's
/// `TcpListener::bind` asks for 128).
fn listen_backlog_zero(addr: &SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let fd = socket(family(addr), libc::SOCK_STREAM, 0)?;
    bind(&fd, addr)?;
    // SAFETY: plain syscall on a socket we own.
    check(unsafe { libc::listen(fd.as_raw_fd(), 0) })?;
    Ok(std::net::TcpListener::from(fd))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: probe ATTEMPT... | probe --repeat N ATTEMPT | \
                 probe --until ok|eperm|error [--every MS] [--for MS] ATTEMPT | \
                 probe --flood MS [--every-us US] ATTEMPT | probe --ports N ATTEMPT | \
                 probe --reconnect N ADDR:PORT... | probe --failed-then ADDR6:PORT ADDR6:PORT | \
                 probe --deferred N ADDR:PORT [--mptcp] | \
                 probe --deferred-moved DIR ADDR:PORT@SRC";
    let out = std::io::stdout();
    let mut out = out.lock();
    if args.len() == 1 && args[0] == "--whoami" {
        let line = serde_json::json!({"pid": std::process::id(), "cgroup": own_cgroup()});
        let _ = writeln!(out, "{line}");
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--serve") {
        return match serve(&args[1..], &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}\n{usage}");
                ExitCode::from(2)
            }
        };
    }
    // The modes that print one JSON line.
    let modes: [(&str, Mode); 7] = [
        ("--until", until),
        ("--flood", flood),
        ("--reconnect", reconnect),
        ("--failed-then", failed_then),
        ("--ports", ports),
        ("--deferred", deferred),
        ("--deferred-moved", deferred_moved),
    ];
    if let Some((_, run)) = modes
        .iter()
        .find(|(mode, _)| args.first().map(String::as_str) == Some(*mode))
    {
        return match run(&args[1..]) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}\n{usage}");
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("--repeat") {
        let (Some(n), Some(attempt), None) = (args.get(1), args.get(2), args.get(3)) else {
            eprintln!("{usage}");
            return ExitCode::from(2);
        };
        let n: u64 = match n.parse() {
            Ok(n) if n <= MAX_REPEAT => n,
            _ => {
                eprintln!("--repeat wants a number up to {MAX_REPEAT}, got {n:?}");
                return ExitCode::from(2);
            }
        };
        let parsed = match parse(attempt) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let (mut ok, mut eperm, mut error) = (0u64, 0u64, 0u64);
        for _ in 0..n {
            match classify(&try_once(parsed)).0 {
                "ok" => ok += 1,
                "eperm" => eperm += 1,
                _ => error += 1,
            }
        }
        let line = serde_json::json!({"attempts": n, "ok": ok, "eperm": eperm, "error": error});
        let _ = writeln!(out, "{line}");
        return ExitCode::SUCCESS;
    }
    if args.is_empty() {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    // Validate everything first: a typo must not leave half the attempts done.
    let parsed: Result<Vec<_>, String> = args.iter().map(|a| parse(a)).collect();
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for (attempt, parsed) in args.iter().zip(parsed) {
        let (outcome, errno) = classify(&try_once(parsed));
        let line = serde_json::json!({"attempt": attempt, "outcome": outcome, "errno": errno});
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}

/// `--reconnect N ADDR:PORT...` (the arguments after `--reconnect`): see the module
/// documentation. Errors are usage errors and a socket that cannot be made.
fn reconnect(args: &[String]) -> Result<serde_json::Value, String> {
    let usage = "--reconnect N ADDR:PORT...";
    let (Some(n), Some(_)) = (args.first(), args.get(1)) else {
        return Err(usage.to_string());
    };
    let n: u64 = match n.parse() {
        Ok(n) if n <= MAX_REPEAT => n,
        _ => {
            return Err(format!(
                "--reconnect wants a number up to {MAX_REPEAT}, got {n:?}"
            ))
        }
    };
    let to: Vec<(SocketAddr, bool)> = args[1..]
        .iter()
        .map(|a| {
            let (text, wrong) = match a.strip_prefix('~') {
                Some(rest) => (rest, true),
                None => (a.as_str(), false),
            };
            text.parse()
                .map(|addr| (addr, wrong))
                .map_err(|e| format!("--reconnect {a:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let fd = socket(family(&to[0].0), libc::SOCK_DGRAM, 0)
        .map_err(|e| format!("--reconnect: socket: {e}"))?;
    let (mut ok, mut eperm, mut error) = (0u64, 0u64, 0u64);
    for i in 0..n {
        let (addr, wrong) = to[(i % to.len() as u64) as usize];
        let attempt = if wrong {
            connect_wrong_family(&fd, &addr)
        } else {
            connect(&fd, &addr)
        };
        let result = attempt.and_then(|()| {
            // SAFETY: one byte from a valid buffer.
            check_len(unsafe { libc::send(fd.as_raw_fd(), [0u8].as_ptr().cast(), 1, 0) })
        });
        match classify(&result).0 {
            "ok" => ok += 1,
            "eperm" => eperm += 1,
            _ => error += 1,
        }
    }
    drop(fd);
    Ok(serde_json::json!({"attempts": n, "ok": ok, "eperm": eperm, "error": error}))
}

/// A mode that prints one JSON line: its arguments (after the mode's flag) to the line, or a
/// usage error.
type Mode = fn(&[String]) -> Result<serde_json::Value, String>;

/// `--failed-then FIRST SECOND` (the arguments after `--failed-then`): see the module
/// documentation. Errors are usage errors and a socket that cannot be made or set.
fn failed_then(args: &[String]) -> Result<serde_json::Value, String> {
    let usage = "--failed-then [::ffff:A]:P [::ffff:B]:Q";
    let (Some(first), Some(second), None) = (args.first(), args.get(1), args.get(2)) else {
        return Err(usage.to_string());
    };
    let parse = |a: &String| {
        a.parse::<SocketAddr>()
            .ok()
            .filter(SocketAddr::is_ipv6)
            .ok_or_else(|| format!("--failed-then wants IPv6 addresses, got {a:?}"))
    };
    let (first, second) = (parse(first)?, parse(second)?);
    let fd = socket(libc::AF_INET6, libc::SOCK_STREAM, 0)
        .map_err(|e| format!("--failed-then: socket: {e}"))?;
    let set = |level: libc::c_int, name: libc::c_int, value: &[u8]| {
        // SAFETY: `value` is valid for its length.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        })
        .map_err(|e| format!("--failed-then: setsockopt {name}: {e}"))
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1i32.to_ne_bytes())?;
    let (first_outcome, first_errno) = classify(&connect(&fd, &first));
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &0i32.to_ne_bytes())?;
    let result = connect(&fd, &second).and_then(|()| {
        // SAFETY: one byte from a valid buffer.
        check_len(unsafe { libc::send(fd.as_raw_fd(), [0u8].as_ptr().cast(), 1, 0) })
    });
    let (second_outcome, second_errno) = classify(&result);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set(libc::SOL_SOCKET, libc::SO_LINGER, bytes_of(&linger))?;
    drop(fd);
    Ok(serde_json::json!({
        "first": first_outcome, "first_errno": first_errno,
        "second": second_outcome, "second_errno": second_errno,
    }))
}

/// `TCP_FASTOPEN_CONNECT` (linux/tcp.h): `connect()` defers the SYN to the first write.
const TCP_FASTOPEN_CONNECT: libc::c_int = 30;
/// `IPPROTO_MPTCP` (linux/in.h, Linux 5.6).
const IPPROTO_MPTCP: libc::c_int = 262;
/// `TCP_FASTOPEN_NO_COOKIE` (linux/tcp.h): send data in the SYN without a cached cookie, so
/// the connect defers without one.
const TCP_FASTOPEN_NO_COOKIE: libc::c_int = 34;

/// Sets `TCP_FASTOPEN_CONNECT` and `TCP_FASTOPEN_NO_COOKIE` on `fd`: its `connect()` sends
/// nothing, and the SYN leaves at the first write. The error names the option that failed.
fn defer_syn(fd: &OwnedFd) -> Result<(), String> {
    for name in [TCP_FASTOPEN_CONNECT, TCP_FASTOPEN_NO_COOKIE] {
        let one = 1i32.to_ne_bytes();
        // SAFETY: `one` is valid for its length.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                name,
                one.as_ptr().cast(),
                one.len() as libc::socklen_t,
            )
        })
        .map_err(|e| format!("setsockopt {name}: {e}"))?;
    }
    Ok(())
}

/// `--deferred N ADDR:PORT` (the arguments after `--deferred`): see the module
/// documentation. Errors are usage errors and a socket that cannot be made or set.
fn deferred(args: &[String]) -> Result<serde_json::Value, String> {
    let usage = || "--deferred N ADDR:PORT [--mptcp]".to_string();
    let (Some(n), Some(to)) = (args.first(), args.get(1)) else {
        return Err(usage());
    };
    let protocol = match &args[2..] {
        [] => 0,
        [mptcp] if mptcp == "--mptcp" => IPPROTO_MPTCP,
        _ => return Err(usage()),
    };
    let n: u64 = match n.parse() {
        Ok(n) if n <= MAX_REPEAT => n,
        _ => {
            return Err(format!(
                "--deferred wants a number up to {MAX_REPEAT}, got {n:?}"
            ))
        }
    };
    let to: SocketAddr = to.parse().map_err(|e| format!("--deferred: {to:?}: {e}"))?;
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (mut ok, mut eperm, mut error) = (0u64, 0u64, 0u64);
    for _ in 0..n {
        let fd = socket(family, libc::SOCK_STREAM, protocol)
            .map_err(|e| format!("--deferred: socket: {e}"))?;
        defer_syn(&fd).map_err(|e| format!("--deferred: {e}"))?;
        match classify(&connect(&fd, &to)).0 {
            "ok" => ok += 1,
            "eperm" => eperm += 1,
            _ => error += 1,
        }
        drop(fd);
    }
    Ok(serde_json::json!({"attempts": n, "ok": ok, "eperm": eperm, "error": error}))
}

/// `--deferred-moved DIR ADDR:PORT@SRC` (the arguments after `--deferred-moved`): see the
/// module documentation. Errors are usage errors, a socket that cannot be made, bound or
/// set, and a cgroup the probe cannot move into.
fn deferred_moved(args: &[String]) -> Result<serde_json::Value, String> {
    let usage = || "--deferred-moved DIR ADDR:PORT@SRC".to_string();
    let (Some(dir), Some(to), None) = (args.first(), args.get(1), args.get(2)) else {
        return Err(usage());
    };
    let (to, source) = to.split_once('@').ok_or_else(usage)?;
    let to: SocketAddr = to
        .parse()
        .map_err(|e| format!("--deferred-moved: {to:?}: {e}"))?;
    let source: IpAddr = source
        .parse()
        .map_err(|e| format!("--deferred-moved: {source:?}: {e}"))?;
    let fd = socket(family(&to), libc::SOCK_STREAM, 0)
        .map_err(|e| format!("--deferred-moved: socket: {e}"))?;
    bind(&fd, &SocketAddr::new(source, 0)).map_err(|e| format!("--deferred-moved: bind: {e}"))?;
    defer_syn(&fd).map_err(|e| format!("--deferred-moved: {e}"))?;
    // The first write waits for the handshake: bounded like a connect.
    bound_connect_time(&fd).map_err(|e| format!("--deferred-moved: SO_SNDTIMEO: {e}"))?;
    let (connected, _) = classify(&connect(&fd, &to));
    // What the socket sent before the move: nothing when the SYN was deferred.
    let segments_before_move = segments_out(&fd).map_err(|e| format!("--deferred-moved: {e}"))?;
    // "0": the writing process, every thread of it.
    let procs = std::path::Path::new(dir).join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| format!("--deferred-moved: {procs:?}: {e}"))?;
    let cgroup = own_cgroup();
    // SAFETY: one byte from a valid buffer.
    let sent = check_len(unsafe { libc::send(fd.as_raw_fd(), [0u8].as_ptr().cast(), 1, 0) });
    let (sent, sent_errno) = classify(&sent);
    let stream = std::net::TcpStream::from(fd);
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    Ok(serde_json::json!({
        "connect": connected, "segments_before_move": segments_before_move,
        "cgroup_at_send": cgroup, "send": sent, "send_errno": sent_errno, "local": local,
    }))
}

/// The segments `fd` has sent (`TCP_INFO`'s `tcpi_segs_out`, Linux 4.2).
fn segments_out(fd: &OwnedFd) -> Result<u32, String> {
    // SAFETY: `tcp_info` is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })
    .map_err(|e| format!("getsockopt TCP_INFO: {e}"))?;
    Ok(info.tcpi_segs_out)
}

/// This process's cgroup v2 path (the `0::/path` line of `/proc/self/cgroup`), or "".
fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

/// `--ports N ATTEMPT` (the arguments after `--ports`): see the module documentation.
/// Errors are usage errors.
fn ports(args: &[String]) -> Result<serde_json::Value, String> {
    let (Some(n), Some(attempt), None) = (args.first(), args.get(1), args.get(2)) else {
        return Err("--ports N ATTEMPT".to_string());
    };
    let n: u64 = match n.parse() {
        Ok(n) if n <= MAX_REPEAT => n,
        _ => {
            return Err(format!(
                "--ports wants a number up to {MAX_REPEAT}, got {n:?}"
            ))
        }
    };
    let mut parsed = parse(attempt)?;
    let first = parsed.addr.port();
    let (mut ok, mut eperm, mut error) = (0u64, 0u64, 0u64);
    for i in 0..n {
        // Ports 1..=65535 in turn from `first`; port 0 is no destination.
        let port = (u64::from(first.max(1)) - 1 + i) % 65_535 + 1;
        parsed.addr.set_port(port as u16);
        match classify(&try_once(parsed)).0 {
            "ok" => ok += 1,
            "eperm" => eperm += 1,
            _ => error += 1,
        }
    }
    Ok(serde_json::json!({"attempts": n, "ok": ok, "eperm": eperm, "error": error}))
}

/// `--flood MS [--every-us US] ATTEMPT` (the arguments after `--flood`): see the module
/// documentation. Errors are usage errors.
fn flood(args: &[String]) -> Result<serde_json::Value, String> {
    let number = |what: &str, v: Option<&String>| -> Result<u64, String> {
        v.and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{what} wants a whole number, got {v:?}"))
    };
    let millis = number("--flood", args.first())?;
    if millis == 0 || millis > UNTIL_MAX_MS {
        return Err(format!(
            "--flood wants 1 to {UNTIL_MAX_MS} ms, got {millis}"
        ));
    }
    let (every_us, attempt) = match (args.get(1).map(String::as_str), args.len()) {
        (Some("--every-us"), 4) => (number("--every-us", args.get(2))?, &args[3]),
        (_, 2) => (0, &args[1]),
        _ => return Err("--flood MS [--every-us US] ATTEMPT".to_string()),
    };
    let parsed = parse(attempt)?;
    let window = Duration::from_millis(millis);
    let gap = Duration::from_micros(every_us);
    let start = std::time::Instant::now();
    let (mut ok, mut eperm, mut error, mut last) = (0u64, 0u64, 0u64, Duration::ZERO);
    // Bounded by the window (and by the connect timeout of one attempt past it).
    while start.elapsed() < window {
        last = start.elapsed();
        match classify(&try_once(parsed)).0 {
            "ok" => ok += 1,
            "eperm" => eperm += 1,
            _ => error += 1,
        }
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    Ok(serde_json::json!({
        "attempts": ok + eperm + error,
        "ok": ok,
        "eperm": eperm,
        "error": error,
        "elapsed_ns": last.as_nanos() as u64,
    }))
}

/// `--until OUTCOME [--every MS] [--for MS] ATTEMPT` (the arguments after `--until`): see
/// the module documentation. Errors are usage errors.
fn until(args: &[String]) -> Result<serde_json::Value, String> {
    let want = match args.first().map(String::as_str) {
        Some(w @ ("ok" | "eperm" | "error")) => w,
        other => return Err(format!("--until wants ok, eperm or error, got {other:?}")),
    };
    let (mut every, mut limit, mut attempt) = (UNTIL_EVERY_MS, UNTIL_FOR_MS, None);
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let mut millis = |flag: &str| -> Result<u64, String> {
            let value = rest
                .next()
                .ok_or_else(|| format!("{flag} needs milliseconds"))?;
            match value.parse() {
                Ok(n) if (1..=UNTIL_MAX_MS).contains(&n) => Ok(n),
                _ => Err(format!("{flag} wants 1..={UNTIL_MAX_MS} ms, got {value:?}")),
            }
        };
        match arg.as_str() {
            "--every" => every = millis("--every")?,
            "--for" => limit = millis("--for")?,
            a if attempt.is_none() => attempt = Some(a),
            a => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let attempt = attempt.ok_or("--until needs an ATTEMPT")?;
    let parsed = parse(attempt)?;
    let start = std::time::Instant::now();
    let (mut tries, mut first) = (0u64, None);
    loop {
        let at = std::time::SystemTime::now();
        let (outcome, errno) = classify(&try_once(parsed));
        tries += 1;
        let first = *first.get_or_insert(outcome);
        let reached = outcome == want;
        if reached || start.elapsed() >= Duration::from_millis(limit) {
            let at_unix_ns = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return Ok(serde_json::json!({
                "attempt": attempt, "outcome": outcome, "errno": errno, "reached": reached,
                "tries": tries, "first": first, "at_unix_ns": at_unix_ns,
            }));
        }
        std::thread::sleep(Duration::from_millis(every));
    }
}

/// `tcpbulk:`: 16 MiB through one connection (large writes, so that the kernel makes its
/// largest GSO packets), then the server's close; any step slower than 10 s is an error.
fn bulk_send(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let step = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, TCP_CONNECT_TIMEOUT)?;
    stream.set_write_timeout(Some(step))?;
    stream.set_read_timeout(Some(step))?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..16 {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(())
}

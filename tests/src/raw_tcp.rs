//! Hand-made TCP segments on raw IPv6 sockets of the test process (no enforcer judges it):
//! what a host the enforcers do not manage, or an attacker with raw sockets, could send.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::util::set_option;
use crate::NetNs;

/// The sequence number of the raw SYNs the tests send.
pub const ISN: u32 = 0x1234_5678;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// `IPV6_DSTOPTS` (`include/uapi/linux/in6.h`).
const IPV6_DSTOPTS: libc::c_int = 59;

/// A TCP header from `sport` to `dport` with `flags`, (sequence, acknowledgment) numbers
/// `numbers`, and `extra` options (a multiple of 4 bytes).
pub fn segment(
    sport: u16,
    dport: u16,
    flags: u8,
    numbers: (u32, u32),
    extra: &[u8],
) -> Result<Vec<u8>> {
    ensure!(
        extra.len().is_multiple_of(4),
        "options must be padded to 4 bytes"
    );
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&numbers.0.to_be_bytes());
    tcp[8..12].copy_from_slice(&numbers.1.to_be_bytes());
    tcp[12] = (((20 + extra.len()) / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(extra);
    Ok(tcp)
}

/// A raw IPv6 TCP socket of the calling thread's namespace, bound to `source`.
fn socket(source: &str) -> Result<OwnedFd> {
    // SAFETY: plain socket syscalls on values we own; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket");
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let src = sockaddr6(source.parse()?);
    // SAFETY: a valid sockaddr pointer and length.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&src as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("bind a raw socket to {source}"));
    }
    Ok(fd)
}

fn sockaddr6(ip: Ipv6Addr) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as u16,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: 0,
    }
}

/// Sends the TCP segment `tcp` from `source` to `destination` on a raw socket of the calling
/// thread's namespace; the kernel fills in the IPv6 header and the checksum
/// (`IPV6_CHECKSUM`). With `dstopts`, behind an empty Destination Options header (next
/// header 60, one PadN option): the TCP header is no longer right after the fixed header.
pub fn send(source: &str, destination: &str, tcp: &[u8], dstopts: bool) -> Result<()> {
    let fd = socket(source)?;
    let checksum_offset: libc::c_int = 16;
    set_option(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_CHECKSUM,
        &checksum_offset,
    )
    .context("IPV6_CHECKSUM")?;
    if dstopts {
        // Next header (the kernel fills it in), length 0 (8 bytes), PadN of 4 bytes.
        let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        set_option(&fd, libc::IPPROTO_IPV6, IPV6_DSTOPTS, &header).context("IPV6_DSTOPTS")?;
    }
    let dst = sockaddr6(destination.parse()?);
    // SAFETY: valid buffer and sockaddr.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            tcp.as_ptr().cast(),
            tcp.len(),
            0,
            (&dst as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        )
    };
    if sent != tcp.len() as isize {
        return Err(std::io::Error::last_os_error()).context("sendto a raw segment");
    }
    Ok(())
}

/// Sends the segment `tcp` from `source` to `destination` inside `ns` and returns the
/// sequence number of the first answer (same ports, reversed) with all of `flags` set, read
/// within 5 s on a raw socket of `ns` (`None`: no such answer).
pub fn reply(
    ns: &NetNs,
    (source, destination): (&str, &str),
    tcp: &[u8],
    flags: u8,
) -> Result<Option<u32>> {
    let (sport, dport) = (&tcp[0..2], &tcp[2..4]);
    ns.run_in(|| -> Result<Option<u32>> {
        let fd = socket(source)?;
        let wait = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &wait).context("SO_RCVTIMEO")?;
        send(source, destination, tcp, false)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: a valid buffer of its length. (An IPv6 raw socket reads from the TCP
            // header on.)
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                continue;
            };
            let b = &buf[..n];
            if n >= 20 && b[0..2] == *dport && b[2..4] == *sport && b[13] & flags == flags {
                return Ok(Some(u32::from_be_bytes([b[4], b[5], b[6], b[7]])));
            }
        }
        Ok(None)
    })?
}

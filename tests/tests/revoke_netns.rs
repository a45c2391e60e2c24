//! Revocation reaching a pod's network namespace through the container runtime's namespace
//! file (`/run/netns/<name>`), with no process of the pod to enter it by: what the agent
//! relies on under the DaemonSet, which does not share the host's PID namespace (so the
//! connecting process's `/proc/<pid>/ns/net` is not the agent's to open) but mounts the
//! host's `/run/netns` read-only.
//!
//! The namespace is the test's own (`ip netns add`, which puts its file in `/run/netns` as
//! the runtimes do); the flow is a real TCP connection inside it on 127.94.2.1 (its own
//! loopback). The reset goes through `enforcer::flows::destroy::destroy` with a record
//! naming no usable process (pid 0) and no cgroup candidates: only the file can lead there,
//! and only after its cookie is checked.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::flows::destroy::{destroy, diag_socket_in_dirs, DestroyError};
use enforcer_common::{proto, FlowRecord};
use enforcer_tests::{require_kernel, unique_name, NetNs};

const ADDR: Ipv4Addr = Ipv4Addr::new(127, 94, 2, 1);
const PORT: u16 = 6333;
/// `SO_COOKIE` and `SO_NETNS_COOKIE` (`include/uapi/asm-generic/socket.h`).
const SO_COOKIE: i32 = 57;
const SO_NETNS_COOKIE: i32 = 71;

fn sockopt_u64(fd: &impl AsRawFd, opt: i32) -> Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` is a writable u64 and `len` its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("getsockopt {opt}"));
    }
    Ok(value)
}

#[test]
fn a_flow_is_reset_in_a_namespace_found_by_its_runtime_file() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let ns = NetNs::create(&unique_name("kv-rv"))?;
    ns.ip(&["addr", "add", &format!("{ADDR}/32"), "dev", "lo"])?;
    // Sockets stay in the namespace they were made in; they are used from here afterwards.
    let (listener, client, server) = ns.run_in(|| -> Result<_> {
        let listener = TcpListener::bind(SocketAddr::from((ADDR, PORT)))?;
        let client =
            TcpStream::connect_timeout(&SocketAddr::from((ADDR, PORT)), Duration::from_secs(5))?;
        let (server, _) = listener.accept()?;
        Ok((listener, client, server))
    })??;
    let netns_cookie = sockopt_u64(&client, SO_NETNS_COOKIE)?;
    let cookie = sockopt_u64(&client, SO_COOKIE)?;
    let local = client.local_addr()?;

    // The file leads to a sock_diag socket in exactly that namespace.
    let dirs = [Path::new("/run/netns")];
    let diag = diag_socket_in_dirs(netns_cookie, &[], &dirs).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(sockopt_u64(&diag, SO_NETNS_COOKIE)? == netns_cookie);
    // No file names a namespace that does not exist: nothing is looked up, and it says so.
    match diag_socket_in_dirs(u64::MAX, &[], &dirs) {
        Err(e) => ensure!(e.cookie == u64::MAX, "{e}"),
        Ok(_) => anyhow::bail!("a socket in a namespace that no file names"),
    }
    // Nor is every file entered again for it at once (each walk enters every pod's
    // namespace; a flow that cannot be reset is tried at every tick).
    match diag_socket_in_dirs(u64::MAX, &[], &dirs) {
        Err(e) => ensure!(
            e.tried.contains("no namespace file was the flow's") && !e.tried.contains("/run/netns"),
            "{e}"
        ),
        Ok(_) => anyhow::bail!("a socket in a namespace that no file names"),
    }

    let mut record = FlowRecord {
        family: 4,
        protocol: proto::TCP,
        sport: local.port(),
        dport: PORT,
        // The connecting process is gone (pid 0 names none): only the file is left.
        pid_tgid: 0,
        netns_cookie,
        ..FlowRecord::default()
    };
    let std::net::IpAddr::V4(source) = local.ip() else {
        anyhow::bail!("an IPv4 connection has local address {local}");
    };
    // The kernel picks the source address (127.0.0.1 or the /32, by its routes).
    record.saddr[..4].copy_from_slice(&source.octets());
    record.daddr[..4].copy_from_slice(&ADDR.octets());
    // Another socket's cookie for the same tuple: refused in the flow's own namespace
    // (`inet_diag_find_one_icsk` answers a cookie mismatch with ENOENT), the flow untouched.
    match destroy(cookie ^ 1, &record, &[]) {
        Err(DestroyError::Io(e)) => ensure!(e.raw_os_error() == Some(libc::ENOENT), "{e}"),
        other => anyhow::bail!("a wrong cookie: {other:?}"),
    }
    let mut client = client;
    let mut server = server;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    std::io::Write::write_all(&mut server, b"x")?;
    let mut buf = [0u8; 16];
    ensure!(client.read(&mut buf)? == 1, "the flow is still up");

    destroy(cookie, &record, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The destroyed socket's owner sees ECONNABORTED (a socket destroyed on its own host),
    // its peer a reset.
    let read = client.read(&mut buf);
    ensure!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted),
        "the client reads {read:?}, want the socket aborted"
    );
    server.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read = server.read(&mut buf);
    ensure!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the server reads {read:?}, want a reset"
    );
    drop((server, listener));
    Ok(())
}

//! Loopback (or in-namespace) TCP and UDP servers, each on its own thread, stopped on drop.
//!
//! Bind and accept are not judged by the enforcer (only connect and sendmsg are), so servers
//! run in the test process itself.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::NetNs;

/// A server thread never outlives this, even if its owner leaks it.
const MAX_LIFETIME: Duration = Duration::from_secs(15 * 60);
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => bail!("unknown protocol {other:?}"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A running server: TCP accepts and drops connections, UDP receives and discards
/// datagrams. `hits()` counts either.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    proto: Proto,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Server {
    /// A server on `addr` in the current network namespace. Only loopback addresses
    /// (127.0.0.0/8, ::1) are allowed here.
    pub fn start(proto: Proto, addr: SocketAddr) -> Result<Self> {
        if !addr.ip().is_loopback() {
            bail!("refusing to bind {addr}: tests use loopback addresses only");
        }
        Self::from_sock(proto, addr, bind(proto, addr)?)
    }

    /// A server on `addr` inside `ns` (for the IPv6 veth tests: `fd00::/8` addresses).
    pub fn start_in_netns(ns: &NetNs, proto: Proto, addr: SocketAddr) -> Result<Self> {
        let sock = ns.run_in(|| bind(proto, addr))??;
        Self::from_sock(proto, addr, sock)
    }

    pub fn tcp(addr: SocketAddr) -> Result<Self> {
        Self::start(Proto::Tcp, addr)
    }

    pub fn udp(addr: SocketAddr) -> Result<Self> {
        Self::start(Proto::Udp, addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Accepted connections (TCP) or received datagrams (UDP) so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn from_sock(proto: Proto, addr: SocketAddr, sock: Sock) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (stop2, hits2) = (stop.clone(), hits.clone());
        let thread = std::thread::Builder::new()
            .name(format!("server-{}-{addr}", proto.as_str()))
            .spawn(move || serve(sock, &stop2, &hits2))
            .context("spawn server thread")?;
        Ok(Self {
            addr,
            proto,
            stop,
            hits,
            thread: Some(thread),
        })
    }
}

fn bind(proto: Proto, addr: SocketAddr) -> Result<Sock> {
    let sock = match proto {
        // std sets SO_REUSEADDR on listeners, so a quick rerun does not trip on TIME_WAIT.
        Proto::Tcp => {
            let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
            l.set_nonblocking(true)?;
            Sock::Tcp(l)
        }
        Proto::Udp => {
            let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Sock::Udp(s)
        }
    };
    Ok(sock)
}

fn serve(sock: Sock, stop: &AtomicBool, hits: &AtomicU64) {
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
        match &sock {
            Sock::Tcp(l) => match l.accept() {
                Ok((conn, _)) => {
                    hits.fetch_add(1, Ordering::Relaxed);
                    drop(conn);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(_) => std::thread::sleep(POLL),
            },
            Sock::Udp(s) => {
                if s.recv_from(&mut buf).is_ok() {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

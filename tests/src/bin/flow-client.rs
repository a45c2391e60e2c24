//! `flow-client`: one long-lived client connection for the flow tests.
//!
//! ```text
//! flow-client tcp ADDR:PORT SEND RECV [--hold STOPFILE] [--fork] [--bind-device NAME]
//! flow-client udp ADDR:PORT [--refused-then ADDR:PORT] --hold STOPFILE
//! ```
//!
//! `tcp` connects, sends an 8-byte header (SEND and RECV as big-endian u32) and SEND bytes,
//! reads RECV bytes back (the [`enforcer_tests::flows::FlowServer`] protocol), prints
//! `{"up":true,"local":"IP:PORT"}`, then either closes at once or, with `--hold`, reads every
//! 100 ms until the connection ends or STOPFILE appears (then closes it cleanly, or with an
//! RST when STOPFILE holds `abort`). `udp`
//! connects a UDP socket, sends one byte and holds it open until STOPFILE appears; with
//! `--refused-then` it first connects the socket again, to an address the kernel must refuse
//! after the connect hooks (a broadcast address without `SO_BROADCAST`: `EACCES`), which
//! leaves it connected to ADDR:PORT (a second connect that succeeds is a usage error). Every run
//! ends with one line `{"end":"closed"|"aborted"|"eof"|"error"|"timeout","errno":N,"after_ms":N}`
//! (`after_ms`: since the connection was up). With `--fork` the connecting process forks once
//! the connection is up, prints `{"forked":PID}` and exits: the child (same cgroup and network
//! namespace, no longer the process that connected) holds the connection. Holding lasts at most 60 s. Exit status 0 once
//! the connection was up; 1 when it never came up (with the error on stderr); 2 on bad usage.
//! `--bind-device NAME` binds the connected socket to a device (`SO_BINDTODEVICE`, which an
//! unprivileged process may do once) after the exchange.
//! `--connect-timeout-ms MS` (TCP, default 30,000, at most 60,000) bounds the connect: a test
//! that holds a SYN back (a full accept queue) needs more than the first retransmits.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);
const MAX_HOLD: Duration = Duration::from_secs(60);
/// Long enough for a SYN held back by a full accept queue to be retransmitted a few times (1,
/// 3, 7, 15 s after the first): the handshake-during-a-change test holds it on purpose.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn usage() -> ExitCode {
    eprintln!("usage: flow-client tcp ADDR:PORT SEND RECV [--hold STOPFILE] [--connect-timeout-ms MS] | flow-client udp ADDR:PORT [--refused-then ADDR:PORT] --hold STOPFILE");
    ExitCode::from(2)
}

fn end(kind: &str, errno: i32, up: Instant) {
    println!(
        "{{\"end\":\"{kind}\",\"errno\":{errno},\"after_ms\":{}}}",
        up.elapsed().as_millis()
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hold = args
        .iter()
        .position(|a| a == "--hold")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let (Some(kind), Some(addr)) = (args.first(), args.get(1)) else {
        return usage();
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return usage();
    };
    let connect_timeout = match args.iter().position(|a| a == "--connect-timeout-ms") {
        None => CONNECT_TIMEOUT,
        Some(i) => match args.get(i + 1).map(|s| s.parse::<u64>()) {
            Some(Ok(ms)) if (1..=60_000).contains(&ms) => Duration::from_millis(ms),
            _ => return usage(),
        },
    };
    match kind.as_str() {
        "tcp" => {
            let (Some(Ok(send)), Some(Ok(recv))) = (
                args.get(2).map(|s| s.parse::<u32>()),
                args.get(3).map(|s| s.parse::<u32>()),
            ) else {
                return usage();
            };
            let fork = args.iter().any(|a| a == "--fork");
            let device = match args.iter().position(|a| a == "--bind-device") {
                None => None,
                Some(i) => match args.get(i + 1) {
                    Some(name) => Some(name.clone()),
                    None => return usage(),
                },
            };
            tcp(addr, send, recv, hold, fork, device, connect_timeout)
        }
        "udp" => {
            let then = match args.iter().position(|a| a == "--refused-then") {
                None => None,
                Some(i) => match args.get(i + 1).map(|a| a.parse::<SocketAddr>()) {
                    Some(Ok(then)) => Some(then),
                    _ => return usage(),
                },
            };
            match hold {
                Some(stop) => udp(addr, then, stop),
                None => usage(),
            }
        }
        _ => usage(),
    }
}

fn tcp(
    addr: SocketAddr,
    send: u32,
    recv: u32,
    hold: Option<PathBuf>,
    fork: bool,
    device: Option<String>,
    connect_timeout: Duration,
) -> ExitCode {
    let exchange = || -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&addr, connect_timeout)?;
        let mut out = Vec::with_capacity(8 + send as usize);
        out.extend_from_slice(&send.to_be_bytes());
        out.extend_from_slice(&recv.to_be_bytes());
        out.resize(8 + send as usize, b'x');
        s.write_all(&out)?;
        let mut back = vec![0u8; recv as usize];
        s.read_exact(&mut back)?;
        if let Some(device) = &device {
            // SAFETY: setsockopt on our own socket with a buffer of the length given.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    device.as_ptr().cast(),
                    device.len() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(s)
    };
    let mut s = match exchange() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flow-client: {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("{{\"up\":true,\"local\":\"{local}\"}}");
    let up = Instant::now();
    let Some(stop) = hold else {
        drop(s);
        end("closed", 0, up);
        return ExitCode::SUCCESS;
    };
    if fork {
        // SAFETY: the process has one thread; the child only continues this function.
        match unsafe { libc::fork() } {
            -1 => {
                eprintln!("flow-client: fork: {}", std::io::Error::last_os_error());
                return ExitCode::from(1);
            }
            0 => {}
            pid => {
                println!("{{\"forked\":{pid}}}");
                return ExitCode::SUCCESS;
            }
        }
    }
    let _ = s.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 64];
    while up.elapsed() < MAX_HOLD {
        if stop.exists() {
            if std::fs::read_to_string(&stop).is_ok_and(|text| text.trim() == "abort") {
                // An abortive close (SO_LINGER 0): an RST, and the socket is gone at once (no
                // TIME_WAIT remnant).
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on our own socket with a linger struct of its size.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    )
                };
                drop(s);
                end("aborted", 0, up);
                return ExitCode::SUCCESS;
            }
            // A clean close: our FIN, then the server's, so that both byte counts are final.
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            drop(s);
            end("closed", 0, up);
            return ExitCode::SUCCESS;
        }
        match s.read(&mut buf) {
            Ok(0) => {
                end("eof", 0, up);
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                end("error", e.raw_os_error().unwrap_or(0), up);
                return ExitCode::SUCCESS;
            }
        }
    }
    end("timeout", 0, up);
    ExitCode::SUCCESS
}

fn udp(addr: SocketAddr, then: Option<SocketAddr>, stop: PathBuf) -> ExitCode {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let connected = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(bind)?;
        s.connect(addr)?;
        s.send(b"x")?;
        if let Some(then) = then {
            if s.connect(then).is_ok() {
                return Err(std::io::Error::other(format!(
                    "the connect to {then} was not refused"
                )));
            }
        }
        Ok(s)
    };
    let s = match connected() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flow-client: {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("{{\"up\":true,\"local\":\"{local}\"}}");
    let up = Instant::now();
    while up.elapsed() < MAX_HOLD {
        if stop.exists() {
            drop(s);
            end("closed", 0, up);
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(POLL);
    }
    end("timeout", 0, up);
    ExitCode::SUCCESS
}

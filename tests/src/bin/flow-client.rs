//! `flow-client`: one long-lived client connection for the flow tests.
//!
//! ```text
//! flow-client tcp ADDR:PORT SEND RECV [--hold STOPFILE] [--fork] [--bind-device NAME]
//! flow-client udp ADDR:PORT [--refused-then ADDR:PORT [--later]] [--ping] --hold STOPFILE
//! flow-client udp-race ADDR:PORT OTHER:PORT ROUNDS [--crowd N TO:PORT] --hold STOPFILE
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
//! leaves it connected to ADDR:PORT (a second connect that succeeds is a usage error); with
//! `--ping` it sends, while holding, one 8-byte datagram every 100 ms (a sequence number from
//! 1, big-endian) and prints `{"seq":N,"errno":E}` for each (`errno` 0: sent); with `--later`
//! the refused connect is made only once a file `reconnect` appears beside STOPFILE, while
//! pinging, and prints `{"refused":ERRNO}` (0: it was not refused). Every run
//! ends with one line `{"end":"closed"|"aborted"|"eof"|"error"|"timeout","errno":N,"after_ms":N}`
//! (`after_ms`: since the connection was up). With `--fork` the connecting process forks once
//! the connection is up, prints `{"forked":PID}` and exits: the child (same cgroup and network
//! namespace, no longer the process that connected) holds the connection. Holding lasts at most 60 s. Exit status 0 once
//! the connection was up; 1 when it never came up (with the error on stderr); 2 on bad usage.
//! `--bind-device NAME` binds the connected socket to a device (`SO_BINDTODEVICE`, which an
//! unprivileged process may do once) after the exchange.
//! `--connect-timeout-ms MS` (TCP, default 30,000, at most 60,000) bounds the connect: a test
//! that holds a SYN back (a full accept queue) needs more than the first retransmits.
//! `udp-race` makes ROUNDS (at most 4,096) unbound UDP sockets, each connected by two
//! threads at once, one to ADDR:PORT and one to OTHER:PORT, so that the connect hooks and the
//! kernel's connects of the two may run in opposite orders; it prints
//! `{"up":true,"at":[COOKIE...],"other":[COOKIE...],"nowhere":N}` (the sockets' cookies,
//! `SO_COOKIE`, by where `getpeername` finds each), holds them until STOPFILE appears, and
//! ends like `udp`. `--crowd N TO:PORT` (N at most 20,000) first connects N IPv4 UDP
//! sockets to TO:PORT, held as long.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "../sockaddr.rs"]
mod sockaddr;

const POLL: Duration = Duration::from_millis(100);
const MAX_HOLD: Duration = Duration::from_secs(60);
/// Long enough for a SYN held back by a full accept queue to be retransmitted a few times (1,
/// 3, 7, 15 s after the first): the handshake-during-a-change test holds it on purpose.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn usage() -> ExitCode {
    eprintln!("usage: flow-client tcp ADDR:PORT SEND RECV [--hold STOPFILE] [--connect-timeout-ms MS] | flow-client udp ADDR:PORT [--refused-then ADDR:PORT [--later]] [--ping] --hold STOPFILE | flow-client udp-race ADDR:PORT OTHER:PORT ROUNDS [--crowd N TO:PORT] --hold STOPFILE");
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
            let ping = args.iter().any(|a| a == "--ping");
            // With `--later`, the refused connect waits for its trigger (pinging only).
            let (then, later) = if args.iter().any(|a| a == "--later") {
                if !ping {
                    return usage();
                }
                (None, then)
            } else {
                (then, None)
            };
            match hold {
                Some(stop) => udp(addr, then, later, ping, stop),
                None => usage(),
            }
        }
        "udp-race" => {
            let (Some(Ok(other)), Some(Ok(rounds))) = (
                args.get(2).map(|a| a.parse::<SocketAddr>()),
                args.get(3).map(|a| a.parse::<usize>()),
            ) else {
                return usage();
            };
            let crowd = match args.iter().position(|a| a == "--crowd") {
                None => None,
                Some(i) => match (
                    args.get(i + 1).map(|n| n.parse::<usize>()),
                    args.get(i + 2).map(|a| a.parse::<SocketAddr>()),
                ) {
                    (Some(Ok(n)), Some(Ok(to))) if n <= 20_000 => Some((n, to)),
                    _ => return usage(),
                },
            };
            match hold {
                Some(stop) if (1..=4096).contains(&rounds) => {
                    udp_race(addr, other, rounds, crowd, stop)
                }
                _ => usage(),
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

fn udp(
    addr: SocketAddr,
    then: Option<SocketAddr>,
    mut later: Option<SocketAddr>,
    ping: bool,
    stop: PathBuf,
) -> ExitCode {
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
    if !ping {
        return hold_sockets(s, &stop);
    }
    let up = Instant::now();
    let mut seq = 0u64;
    while up.elapsed() < MAX_HOLD {
        if stop.exists() {
            drop(s);
            end("closed", 0, up);
            return ExitCode::SUCCESS;
        }
        if let Some(then) = later.filter(|_| stop.with_file_name("reconnect").exists()) {
            later = None;
            let errno = match s.connect(then) {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            println!("{{\"refused\":{errno}}}");
        }
        seq += 1;
        let errno = match s.send(&seq.to_be_bytes()) {
            Ok(_) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        println!("{{\"seq\":{seq},\"errno\":{errno}}}");
        std::thread::sleep(POLL);
    }
    end("timeout", 0, up);
    ExitCode::SUCCESS
}

/// Holds `sockets` (closed when dropped) until `stop` appears, at most [`MAX_HOLD`]; prints
/// the end line.
fn hold_sockets<T>(sockets: T, stop: &std::path::Path) -> ExitCode {
    let up = Instant::now();
    while up.elapsed() < MAX_HOLD {
        if stop.exists() {
            drop(sockets);
            end("closed", 0, up);
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(POLL);
    }
    end("timeout", 0, up);
    ExitCode::SUCCESS
}

/// `udp-race` (see the module documentation).
fn udp_race(
    addr: SocketAddr,
    other: SocketAddr,
    rounds: usize,
    crowd: Option<(usize, SocketAddr)>,
    stop: PathBuf,
) -> ExitCode {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Barrier;

    let crowd = match crowd.map_or(Ok(Vec::new()), |(n, to)| crowd_of(n, to)) {
        Ok(crowd) => crowd,
        Err(e) => {
            eprintln!("flow-client: --crowd: {e}");
            return ExitCode::from(1);
        }
    };

    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // Each round: both threads wait for the socket, connect it at once, and wait again.
    let barrier = Barrier::new(3);
    let current = AtomicI32::new(-1);
    let mut sockets = Vec::with_capacity(rounds);
    let outcome = std::thread::scope(|scope| -> std::io::Result<()> {
        for to in [addr, other] {
            let (barrier, current) = (&barrier, &current);
            scope.spawn(move || {
                let (sa, len) = sockaddr::sockaddr(&to);
                for _ in 0..rounds {
                    barrier.wait();
                    // SAFETY: connect on the round's socket (owned by the main thread, open
                    // until both threads are past the second wait) with a sockaddr of `len`.
                    // Its result is not needed: where the socket ends up is read after.
                    unsafe {
                        libc::connect(current.load(Ordering::SeqCst), (&raw const sa).cast(), len);
                    }
                    barrier.wait();
                }
            });
        }
        let mut failure = None;
        for _ in 0..rounds {
            // SAFETY: a plain socket() call; the descriptor is owned at once.
            let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            let socket = if fd < 0 {
                failure.get_or_insert(std::io::Error::last_os_error());
                None
            } else {
                // SAFETY: `fd` is a new descriptor nothing else owns.
                Some(unsafe { OwnedFd::from_raw_fd(fd) })
            };
            current.store(fd, Ordering::SeqCst);
            // The threads go through every round (a failed socket() is connected as -1: EBADF).
            barrier.wait();
            barrier.wait();
            sockets.extend(socket);
        }
        failure.map_or(Ok(()), Err)
    });
    if let Err(e) = outcome {
        eprintln!("flow-client: udp-race: {e}");
        return ExitCode::from(1);
    }
    let (mut at, mut elsewhere, mut nowhere) = (Vec::new(), Vec::new(), 0usize);
    for s in &sockets {
        let fd = s.as_raw_fd();
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt into a u64 of the length given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            eprintln!(
                "flow-client: SO_COOKIE: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::from(1);
        }
        match peer_of(fd) {
            Some(peer) if peer == addr => at.push(cookie),
            Some(_) => elsewhere.push(cookie),
            None => nowhere += 1,
        }
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!(
        "{{\"up\":true,\"at\":[{}],\"other\":[{}],\"nowhere\":{nowhere}}}",
        list(&at),
        list(&elsewhere)
    );
    hold_sockets((sockets, crowd), &stop)
}

/// `count` IPv4 UDP sockets connected to `to`, for `--crowd`: the soft file limit raised to
/// the hard one to hold them (raising the hard one needs `CAP_SYS_RESOURCE`).
fn crowd_of(count: usize, to: SocketAddr) -> std::io::Result<Vec<UdpSocket>> {
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        rlimit.rlim_cur = rlimit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if (count + 2_048) as libc::rlim_t > rlimit.rlim_max {
        return Err(std::io::Error::other(format!(
            "{count} sockets and the race's need more descriptors than the hard limit {}",
            rlimit.rlim_max
        )));
    }
    (0..count)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            Ok(s)
        })
        .collect()
}

/// Where the socket `fd` is connected (`getpeername`), as a `SocketAddr` of the socket's
/// family; `None` when it is not.
fn peer_of(fd: i32) -> Option<SocketAddr> {
    // SAFETY: getpeername into a zeroed sockaddr_storage of the length given.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getpeername(fd, (&raw mut ss).cast(), &mut len) } != 0 {
        return None;
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (its family says so).
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
            Some(SocketAddr::from((
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (its family says so).
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const ss).cast()) };
            Some(SocketAddr::from((
                sin6.sin6_addr.s6_addr,
                u16::from_be(sin6.sin6_port),
            )))
        }
        _ => None,
    }
}

//! The flow tests' two ends: [`FlowServer`], a TCP server that answers each connection with
//! as many bytes as its client asks for and records how each connection ended, and
//! [`FlowClient`], the `flow-client` binary run inside a workload's cgroup, holding its
//! connection open until told to close it (or until the connection dies).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::probe::confine_at_exec;
use crate::util::{ChildGuard, TempDir};

/// How one server-side connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConn {
    /// The client's address and port (its `local` in the client's output).
    pub peer: SocketAddr,
    /// `eof` (the client closed), `reset` (ECONNRESET: the client's socket was reset),
    /// `error <errno>`, or `stopped` (the server stopped first).
    pub end: String,
}

/// A TCP server for flow tests. Per connection: read an 8-byte header (`send`, `recv`,
/// big-endian u32), read `send` bytes, write `recv` bytes, then read until the connection
/// ends. Drop stops it and joins its threads.
pub struct FlowServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    ended: Arc<Mutex<Vec<ServerConn>>>,
    thread: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl FlowServer {
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        Self::serve_on(listener, addr)
    }

    /// The same server inside a network namespace (a pod's, say).
    pub fn start_in(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in netns {}", ns.name()))?;
        Self::serve_on(listener, addr)
    }

    /// A server at `addr` (loopback, in the test's own namespace) whose accept queue is held
    /// full until [`HeldQueue::release`]: the kernel drops new SYNs while a listener's accept
    /// queue is full (`tcp_conn_request`, `LISTENOVERFLOWS`), so a client's `connect()` stays
    /// in SYN_SENT, retransmitting (1 s, then 2 s, 4 s, ...), until the queue has room. The
    /// queue is a `listen(fd, 0)` one, filled by one connection from the test itself.
    pub fn start_held(addr: SocketAddr) -> Result<(Self, HeldQueue)> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2), owned by the TcpListener at once.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        // SAFETY: `fd` is a fresh socket owned by nobody else.
        let listener = unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let sockaddr = crate::sockaddr::sockaddr(&addr);
        // SAFETY: bind/listen on our socket with a sockaddr of its stated length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sockaddr.0 as *const libc::sockaddr_storage).cast(),
                sockaddr.1,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("binding {addr}"));
        }
        // Backlog 0: the queue is full with one connection waiting to be accepted.
        // SAFETY: as above.
        if unsafe { libc::listen(fd, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("listen");
        }
        let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .context("the connection that fills the accept queue")?;
        let gate = Arc::new(AtomicBool::new(false));
        let server = Self::serve_gated(listener, addr, Some(gate.clone()))?;
        Ok((
            server,
            HeldQueue {
                gate,
                filler: Some(filler),
            },
        ))
    }

    fn serve_on(listener: TcpListener, addr: SocketAddr) -> Result<Self> {
        Self::serve_gated(listener, addr, None)
    }

    /// Serves `listener`; with a `gate`, accepts nothing until it opens.
    fn serve_gated(
        listener: TcpListener,
        addr: SocketAddr,
        gate: Option<Arc<AtomicBool>>,
    ) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (s, e) = (stop.clone(), ended.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if gate.as_ref().is_some_and(|g| !g.load(Ordering::Relaxed)) {
                    std::thread::sleep(POLL);
                    continue;
                }
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let (s, e) = (s.clone(), e.clone());
                        conns.push(std::thread::spawn(move || {
                            let end = serve(conn, &s);
                            e.lock().unwrap().push(ServerConn { peer, end });
                        }));
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(_) => std::thread::sleep(POLL),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(Self {
            addr,
            stop,
            ended,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connections that ended so far.
    pub fn ended(&self) -> Vec<ServerConn> {
        self.ended.lock().unwrap().clone()
    }
}

/// The full accept queue of [`FlowServer::start_held`].
pub struct HeldQueue {
    gate: Arc<AtomicBool>,
    filler: Option<TcpStream>,
}

impl HeldQueue {
    /// Opens the queue: the server accepts (the filler, which has closed, then whoever's SYN
    /// the kernel takes next).
    pub fn release(&mut self) {
        self.filler.take();
        self.gate.store(true, Ordering::Relaxed);
    }
}

impl Drop for FlowServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, stop: &AtomicBool) -> String {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL));
    // Reads exactly `buf.len()` bytes, polling the stop flag between timeouts.
    let read_exact = |conn: &mut TcpStream, buf: &mut [u8]| -> Result<(), String> {
        let mut got = 0;
        while got < buf.len() {
            if stop.load(Ordering::Relaxed) {
                return Err("stopped".into());
            }
            match conn.read(&mut buf[got..]) {
                Ok(0) => return Err("eof".into()),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(end_of(&e)),
            }
        }
        Ok(())
    };
    let mut header = [0u8; 8];
    if let Err(end) = read_exact(&mut conn, &mut header) {
        return end;
    }
    let send = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
    let recv = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; send];
    if let Err(end) = read_exact(&mut conn, &mut payload) {
        return end;
    }
    if let Err(e) = conn.write_all(&vec![b'y'; recv]) {
        return end_of(&e);
    }
    let mut buf = [0u8; 256];
    loop {
        if stop.load(Ordering::Relaxed) {
            return "stopped".into();
        }
        match conn.read(&mut buf) {
            Ok(0) => return "eof".into(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return end_of(&e),
        }
    }
}

fn end_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(n) => format!("error {n}"),
        None => format!("error {e}"),
    }
}

/// Where the `flow-client` binary is: next to the running test (like the probe).
pub fn flow_client_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("exe has no parent dir")?;
    for candidate in [dir.join("flow-client"), dir.join("../flow-client")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "flow-client binary not found next to {} (build it: `cargo build -p enforcer-tests --bins`)",
        exe.display()
    )
}

/// A running `flow-client` in a cgroup. Drop kills it (and its stop file goes with its temp
/// dir).
pub struct FlowClient {
    child: ChildGuard,
    lines: mpsc::Receiver<Value>,
    reader: Option<JoinHandle<()>>,
    dir: TempDir,
    /// The client's `local` address, once up (`0.0.0.0:0` for `udp_race`).
    pub local: SocketAddr,
    /// The client's first line (`{"up":true,...}`).
    pub up: Value,
}

impl FlowClient {
    /// A TCP client in `cgroup` that sends `send` payload bytes, receives `recv`, and holds
    /// the connection (`hold`) or closes it at once. Returns once the connection is up.
    pub fn tcp(
        cgroup: &TestCgroup,
        to: SocketAddr,
        send: u32,
        recv: u32,
        hold: bool,
    ) -> Result<Self> {
        Self::tcp_in(None, cgroup, to, send, recv, hold)
    }

    /// [`FlowClient::tcp`] inside a network namespace as well (a pod: its own cgroup and
    /// network namespace).
    pub fn tcp_in(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        to: SocketAddr,
        send: u32,
        recv: u32,
        hold: bool,
    ) -> Result<Self> {
        let args = vec![
            "tcp".to_string(),
            to.to_string(),
            send.to_string(),
            recv.to_string(),
        ];
        Self::spawn(ns, cgroup, args, hold)
    }

    /// [`FlowClient::tcp`] holding the connection, its socket bound to `device` once up
    /// (`SO_BINDTODEVICE`).
    pub fn tcp_bound(cgroup: &TestCgroup, to: SocketAddr, device: &str) -> Result<Self> {
        let args = vec![
            "tcp".to_string(),
            to.to_string(),
            "1".to_string(),
            "1".to_string(),
            "--bind-device".to_string(),
            device.to_string(),
        ];
        Self::spawn(None, cgroup, args, true)
    }

    /// [`FlowClient::tcp_in`] holding the connection, whose connecting process then forks and
    /// exits: the connection lives on in a child that never called `connect()` (the recorded
    /// PID is gone). Returns once the parent has exited. The child dies with the cgroup.
    pub fn tcp_forked(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        to: SocketAddr,
        send: u32,
        recv: u32,
    ) -> Result<Self> {
        let args = vec![
            "tcp".to_string(),
            to.to_string(),
            send.to_string(),
            recv.to_string(),
            "--fork".to_string(),
        ];
        let mut client = Self::spawn(ns, cgroup, args, true)?;
        match client.next_line(Duration::from_secs(10)) {
            Some(v) if v.get("forked").and_then(Value::as_u64).is_some() => {}
            other => bail!("flow-client --fork did not report its child: {other:?}"),
        }
        client.child.wait_timeout(Duration::from_secs(10))?;
        Ok(client)
    }

    /// A connected UDP socket in `cgroup`, held open until [`FlowClient::close`].
    pub fn udp(cgroup: &TestCgroup, to: SocketAddr) -> Result<Self> {
        Self::spawn(None, cgroup, vec!["udp".to_string(), to.to_string()], true)
    }

    /// [`FlowClient::udp`] inside network namespace `ns`, sending one datagram every 100 ms
    /// while it holds the socket ([`FlowClient::next_send`] reads each send's outcome).
    pub fn udp_ping(ns: &NetNs, cgroup: &TestCgroup, to: SocketAddr) -> Result<Self> {
        let args = vec!["udp".to_string(), to.to_string(), "--ping".to_string()];
        Self::spawn(Some(ns), cgroup, args, true)
    }

    /// [`FlowClient::udp_ping`] that, once [`FlowClient::reconnect`] asks, connects its socket
    /// again to `refused`, a connect the kernel must refuse after the hooks (the socket stays
    /// connected to `to`), and goes on sending to `to`.
    pub fn udp_ping_refused_later(
        ns: &NetNs,
        cgroup: &TestCgroup,
        to: SocketAddr,
        refused: SocketAddr,
    ) -> Result<Self> {
        let args = vec![
            "udp".to_string(),
            to.to_string(),
            "--refused-then".to_string(),
            refused.to_string(),
            "--later".to_string(),
            "--ping".to_string(),
        ];
        Self::spawn(Some(ns), cgroup, args, true)
    }

    /// Asks a [`FlowClient::udp_ping_refused_later`] client for its refused connect; returns
    /// that connect's errno (0: not refused) once it printed it.
    pub fn reconnect(&self) -> Result<i32> {
        std::fs::File::create(self.dir.path().join("reconnect"))?;
        self.next_line_with(Duration::from_secs(10), |v| v["refused"].as_i64())
            .map(|errno| errno as i32)
            .context("flow-client did not make its refused connect within 10 s")
    }

    /// The first of the client's next lines within `timeout` that `pick` takes (the lines
    /// before it are dropped).
    fn next_line_with<T>(
        &self,
        timeout: Duration,
        pick: impl Fn(&Value) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let v = self.lines.recv_timeout(left).ok()?;
            if let Some(picked) = pick(&v) {
                return Some(picked);
            }
        }
        None
    }

    /// The next send of a [`FlowClient::udp_ping`] client within `timeout`: its sequence
    /// number and errno (0: sent).
    pub fn next_send(&self, timeout: Duration) -> Option<(u64, i32)> {
        self.next_line_with(timeout, |v| {
            Some((v["seq"].as_u64()?, v["errno"].as_i64()? as i32))
        })
    }

    /// [`FlowClient::udp`], whose socket is then connected again to `refused`, a connect the
    /// kernel refuses after the hooks (a broadcast address without `SO_BROADCAST`): it stays
    /// connected to `to`.
    pub fn udp_refused_then(
        cgroup: &TestCgroup,
        to: SocketAddr,
        refused: SocketAddr,
    ) -> Result<Self> {
        let args = vec![
            "udp".to_string(),
            to.to_string(),
            "--refused-then".to_string(),
            refused.to_string(),
        ];
        Self::spawn(None, cgroup, args, true)
    }

    /// `rounds` UDP sockets in `cgroup` (and network namespace `ns`), each connected by two
    /// threads at once, one to `to` and one to `other` (flow-client `udp-race`), after
    /// `crowd.0` IPv4 UDP sockets connected to `crowd.1`, all held until closed. Returns once
    /// all are made; [`FlowClient::up`] has the cookies of the race's sockets each address
    /// got (`at`, `other`) and how many are connected nowhere.
    pub fn udp_race(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        to: SocketAddr,
        other: SocketAddr,
        rounds: usize,
        crowd: Option<(usize, SocketAddr)>,
    ) -> Result<Self> {
        let mut args = vec![
            "udp-race".to_string(),
            to.to_string(),
            other.to_string(),
            rounds.to_string(),
        ];
        if let Some((n, to)) = crowd {
            args.extend(["--crowd".to_string(), n.to_string(), to.to_string()]);
        }
        Self::spawn(ns, cgroup, args, true)
    }

    fn spawn(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        mut args: Vec<String>,
        hold: bool,
    ) -> Result<Self> {
        let dir = TempDir::new("fl-client")?;
        if hold {
            args.push("--hold".into());
            args.push(dir.path().join("stop").display().to_string());
        }
        let mut cmd = Command::new(flow_client_bin()?);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ns_path = ns.map(NetNs::path);
        let ns_file = confine_at_exec(&mut cmd, ns_path.as_deref(), Some(&cgroup.path()))?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning flow-client {args:?}"))?;
        drop(ns_file);
        let stdout = child.stdout.take().context("flow-client stdout")?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let mut client = Self {
            child: ChildGuard::new(child),
            lines,
            reader: Some(reader),
            dir,
            local: "0.0.0.0:0".parse().unwrap(),
            up: Value::Null,
        };
        let first = client.next_line(Duration::from_secs(10));
        match first {
            Some(v) if v.get("up").and_then(Value::as_bool) == Some(true) => {
                if let Some(local) = v.get("local").and_then(Value::as_str) {
                    client.local = local
                        .parse()
                        .with_context(|| format!("flow-client local address {local:?}"))?;
                }
                client.up = v;
                Ok(client)
            }
            other => {
                let mut stderr = String::new();
                let child = client.child.child();
                let _ = child.kill();
                if let Some(e) = child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut stderr);
                }
                bail!(
                    "flow-client {args:?} did not come up: {other:?}; stderr: {}",
                    stderr.trim()
                )
            }
        }
    }

    fn next_line(&self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The client's end line, if the connection ended within `timeout` (`None`: still up).
    pub fn ended_within(&self, timeout: Duration) -> Option<Value> {
        self.next_line_with(timeout, |v| v.get("end").is_some().then(|| v.clone()))
    }

    /// Asks a holding client to close its connection cleanly; returns its end line.
    pub fn close(&mut self) -> Result<Value> {
        std::fs::File::create(self.dir.path().join("stop"))?.flush()?;
        let end = self
            .ended_within(Duration::from_secs(10))
            .context("flow-client did not close within 10 s")?;
        self.child.wait_timeout(Duration::from_secs(10))?;
        Ok(end)
    }

    /// Asks a holding client to close its connection abortively (an RST: the socket is gone
    /// at once, with no TIME_WAIT remnant); returns its end line.
    pub fn abort(&mut self) -> Result<Value> {
        std::fs::write(self.dir.path().join("stop.tmp"), "abort")?;
        std::fs::rename(
            self.dir.path().join("stop.tmp"),
            self.dir.path().join("stop"),
        )?;
        let end = self
            .ended_within(Duration::from_secs(10))
            .context("flow-client did not abort within 10 s")?;
        self.child.wait_timeout(Duration::from_secs(10))?;
        Ok(end)
    }

    /// Waits for a client that closes by itself (no hold); returns its end line.
    pub fn finish(&mut self) -> Result<Value> {
        let end = self
            .ended_within(Duration::from_secs(10))
            .context("flow-client did not finish within 10 s")?;
        self.child.wait_timeout(Duration::from_secs(10))?;
        Ok(end)
    }
}

impl Drop for FlowClient {
    fn drop(&mut self) {
        if let Some(child) = self.child.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Sockets that share a flow's ports: `n` TCP sockets of this process bound to
/// `local_port`, each from its own source address in `127.<net>.0.1` onwards (200 per /24),
/// connected without blocking to listeners at `127.<net>.250.1-5:<remote_port>` that never
/// accept, so they sit in the accept queues (or in SYN_SENT when those are full). A workload
/// can make as many around its own flow. Raises the process's soft open-file limit to its
/// hard one (which must leave 1,024 more).
/// Drop closes them all.
pub struct Crowd {
    sockets: Vec<std::os::fd::OwnedFd>,
    _listeners: Vec<std::os::fd::OwnedFd>,
}

impl Crowd {
    pub fn new(net: u8, local_port: u16, remote_port: u16, n: usize) -> Result<Self> {
        use std::net::Ipv4Addr;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain getrlimit/setrlimit with a valid pointer. Only the soft limit is
        // raised (the hard one needs CAP_SYS_RESOURCE, which a container may lack).
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            if (limit.rlim_max as usize) < n + 1024 {
                bail!(
                    "{n} sockets need an open-file limit of {}, the hard limit is {}",
                    n + 1024,
                    limit.rlim_max
                );
            }
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
            }
        }
        let tcp = |flags: libc::c_int| -> Result<std::os::fd::OwnedFd> {
            // SAFETY: plain socket(2); the fd is owned from here on.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | flags, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("socket");
            }
            // SAFETY: a fresh fd we own.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            Ok(fd)
        };
        let bind = |fd: &std::os::fd::OwnedFd, addr: SocketAddr| -> Result<()> {
            let (storage, len) = crate::sockaddr::sockaddr(&addr);
            // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
            let rc = unsafe {
                libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    (&storage as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("bind {addr}"));
            }
            Ok(())
        };
        let listener_addrs: Vec<SocketAddr> = (1..=5)
            .map(|i| SocketAddr::from((Ipv4Addr::new(127, net, 250, i), remote_port)))
            .collect();
        let mut listeners = Vec::new();
        for &addr in &listener_addrs {
            let fd = tcp(0)?;
            bind(&fd, addr)?;
            // SAFETY: listen on a bound socket we own.
            if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 4096) } != 0 {
                return Err(std::io::Error::last_os_error()).context("listen");
            }
            listeners.push(fd);
        }
        let mut sockets = Vec::with_capacity(n);
        for k in 0..n {
            let fd = tcp(libc::SOCK_NONBLOCK)?;
            let from = Ipv4Addr::new(127, net, (k / 200) as u8, (k % 200 + 1) as u8);
            bind(&fd, SocketAddr::from((from, local_port)))?;
            let (storage, len) = crate::sockaddr::sockaddr(&listener_addrs[k % 5]);
            // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
            let rc = unsafe {
                libc::connect(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    (&storage as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            let error = std::io::Error::last_os_error();
            if rc != 0 && error.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(error).with_context(|| format!("connect from {from}:{local_port}"));
            }
            sockets.push(fd);
        }
        Ok(Self {
            sockets,
            _listeners: listeners,
        })
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

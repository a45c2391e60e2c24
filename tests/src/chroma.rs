//! A real vector database for the tests: Chroma (PyPI `chromadb`, pinned), installed by
//! `cargo xtask test` into a virtual environment cached per machine ([`VENV`]), its server
//! (`chroma run`) and a small client ([`CLIENT_PY`]) run as child processes placed in a test's
//! network namespace and cgroup before they exec (`probe::confine_at_exec`), so that every
//! socket they make is judged by that cgroup's programs. Nothing leaves the namespace; no
//! embedding model is used (the client passes embeddings itself).
//!
//! Also: the TCP sockets a process holds, read from `/proc/PID/net/tcp` (its namespace's
//! table) and `/proc/PID/fd` (its socket inodes), the way `ss -tnp` finds them.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::probe::confine_at_exec;
use crate::util::{tail_of, wait_until, ChildGuard, TempDir};

/// The pinned release and where xtask installs it (keep in step with `install_chromadb` in
/// xtask).
pub const VERSION: &str = "1.5.9";
pub const VENV: &str = "/var/cache/enforcer-tests/chromadb-1.5.9";

/// The client: upsert three documents with explicit embeddings, query, print one JSON line,
/// hold the connection until stdin closes.
pub const CLIENT_PY: &str = include_str!("chroma/client.py");

/// How long the server may take to listen, and a client to print its line (first imports of
/// the package on a loaded machine take seconds).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// `/proc/net/tcp` state of an established socket, and of a listening one.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0a;

/// Why Chroma cannot run here, or `None`.
pub fn unavailable_reason() -> Option<String> {
    let python = Path::new(VENV).join("bin/python");
    (!python.exists()).then(|| {
        format!(
            "{} is missing (chromadb {VERSION} in a venv; `cargo xtask test` installs it)",
            python.display()
        )
    })
}

fn python() -> Command {
    let mut cmd = Command::new(Path::new(VENV).join("bin/python"));
    // The client library's and server's usage reports would try to reach the Internet.
    cmd.env("ANONYMIZED_TELEMETRY", "False")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// `chroma run --path DIR --host IP --port P` in `ns` and `cgroup`; killed on drop, its data
/// directory removed.
pub struct ChromaServer {
    child: ChildGuard,
    addr: SocketAddrV4,
    dir: TempDir,
}

impl ChromaServer {
    /// Starts the server and waits until its socket listens on `addr` (read from its own
    /// `/proc/PID/net/tcp`, so the test needs no route into the namespace).
    pub fn start(ns: &NetNs, cgroup: &TestCgroup, addr: SocketAddrV4) -> Result<Self> {
        let dir = TempDir::new("chroma")?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut cmd = python();
        // `chroma` itself is a generated script whose `#!` names the venv's install path:
        // call its entry point through the venv's python instead.
        cmd.args([
            "-c",
            "import sys; from chromadb.cli.cli import app; sys.argv[0] = 'chroma'; sys.exit(app())",
            "run",
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
            "--path",
        ])
        .arg(dir.path().join("data"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let ns_file = confine_at_exec(&mut cmd, Some(&ns.path()), Some(&cgroup.path()))?;
        let mut child = ChildGuard::new(cmd.spawn().context("spawning chroma run")?);
        drop(ns_file);
        let pid = child.id();
        let mut exited = None;
        let listening = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            if let Ok(Some(status)) = child.child().try_wait() {
                exited = Some(status);
                return true;
            }
            tcp_sockets(pid)
                .map(|s| s.iter().any(|s| s.state == TCP_LISTEN && s.local == addr))
                .unwrap_or(false)
        });
        let log = || tail_of(&dir.path().join("server.log"), 4000);
        if let Some(status) = exited {
            bail!(
                "chroma run exited ({status}) before listening on {addr}:\n{}",
                log()
            );
        }
        if !listening {
            bail!(
                "chroma run did not listen on {addr} within {START_TIMEOUT:?}:\n{}",
                log()
            );
        }
        Ok(Self { child, addr, dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The server's own established connections (local end = its listening address).
    pub fn connections(&self) -> Result<Vec<TcpSocket>> {
        Ok(tcp_sockets(self.pid())?
            .into_iter()
            .filter(|s| s.state == TCP_ESTABLISHED && s.local == self.addr)
            .collect())
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.path().join("server.log"), 4000)
    }
}

/// One run of [`CLIENT_PY`] in a namespace and cgroup: its JSON line, and its connection held
/// until [`ChromaClient::close`] (or drop, which kills it).
pub struct ChromaClient {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    /// `{"ok": true, "ids": [...]}` or `{"ok": false, "errno": N|null, "error": "..."}`.
    pub result: Value,
}

impl ChromaClient {
    pub fn run(
        ns: &NetNs,
        cgroup: &TestCgroup,
        server: SocketAddrV4,
        collection: &str,
    ) -> Result<Self> {
        let mut cmd = python();
        cmd.args(["-c", CLIENT_PY])
            .arg(server.ip().to_string())
            .arg(server.port().to_string())
            .arg(collection)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ns_file = confine_at_exec(&mut cmd, Some(&ns.path()), Some(&cgroup.path()))?;
        let mut child = ChildGuard::new(cmd.spawn().context("spawning the chroma client")?);
        drop(ns_file);
        let stdin = child.child().stdin.take();
        let stdout = child.child().stdout.take().context("client stdout")?;
        let stderr = child.child().stderr.take().context("client stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Drained so that a chatty client never blocks on a full pipe.
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
            text
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if !line.trim().is_empty() => line,
            other => {
                drop(child);
                let errors = errors.join().unwrap_or_default();
                bail!("the chroma client printed no result ({other:?}); stderr:\n{errors}");
            }
        };
        let result = serde_json::from_str(line.trim())
            .with_context(|| format!("chroma client output {line:?}"))?;
        Ok(Self {
            child,
            stdin,
            result,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the client's stdin: it exits, closing its connections. Waits at most 30 s.
    pub fn close(mut self) -> Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let status = self.child.wait_timeout(Duration::from_secs(30))?;
        if !status.success() {
            bail!("the chroma client exited with {status}");
        }
        Ok(())
    }
}

/// One IPv4 TCP socket of a process, as `/proc/PID/net/tcp` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcpSocket {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// `TCP_ESTABLISHED`, `TCP_LISTEN`, ... (the kernel's `tcp_states.h` numbers).
    pub state: u8,
    pub inode: u64,
}

/// The IPv4 TCP sockets open in process `pid` (those of its namespace's table whose inode is
/// one of its file descriptors).
pub fn tcp_sockets(pid: u32) -> Result<Vec<TcpSocket>> {
    let mut inodes = BTreeSet::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&fd_dir).with_context(|| format!("reading {fd_dir}"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed in between
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let table = format!("/proc/{pid}/net/tcp");
    let text = std::fs::read_to_string(&table).with_context(|| format!("reading {table}"))?;
    let mut sockets = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            bail!("{table}: unexpected line {line:?}");
        }
        let inode: u64 = f[9].parse().with_context(|| format!("{table}: {line:?}"))?;
        if !inodes.contains(&inode) {
            continue;
        }
        sockets.push(TcpSocket {
            local: proc_addr(f[1]).with_context(|| format!("{table}: {line:?}"))?,
            remote: proc_addr(f[2]).with_context(|| format!("{table}: {line:?}"))?,
            state: u8::from_str_radix(f[3], 16).with_context(|| format!("{table}: {line:?}"))?,
            inode,
        });
    }
    sockets.sort();
    Ok(sockets)
}

/// `0100007F:1F90`: the address is the in-memory (network order) word printed as a native
/// integer, the port a plain hexadecimal number.
fn proc_addr(text: &str) -> Result<SocketAddrV4> {
    let (ip, port) = text.split_once(':').context("no ':'")?;
    let ip = u32::from_str_radix(ip, 16)?;
    let port = u16::from_str_radix(port, 16)?;
    Ok(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses_parse() {
        assert_eq!(
            proc_addr("0100007F:1F90").unwrap(),
            "127.0.0.1:8080".parse::<SocketAddrV4>().unwrap()
        );
        assert_eq!(
            proc_addr("02005F7F:1F40").unwrap(),
            "127.95.0.2:8000".parse::<SocketAddrV4>().unwrap()
        );
    }
}

//! Runs the `probe` client (src/bin/probe.rs) as a child process placed into a test cgroup
//! (and optionally a network namespace) before it execs, so that its very first syscall is
//! already judged by the programs attached to that cgroup.

use std::ffi::CString;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::util::output_bounded;

/// What one attempt saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// connect / sendmsg succeeded.
    Ok,
    /// connect / sendmsg failed with EPERM: a cgroup program said no.
    Eperm,
    /// Anything else (refused, timeout, unreachable...): neither allowed nor denied by us.
    Error,
}

/// One JSON line of the probe.
#[derive(Debug, Clone, Deserialize)]
pub struct AttemptResult {
    pub attempt: String,
    pub outcome: Outcome,
    pub errno: i32,
}

/// The summary line of `probe --repeat N`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Summary {
    pub attempts: u64,
    pub ok: u64,
    pub eperm: u64,
    pub error: u64,
}

/// The line of `probe --flood`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct FloodSummary {
    pub attempts: u64,
    pub ok: u64,
    pub eperm: u64,
    pub error: u64,
    /// From the start of the first attempt to the start of the last.
    pub elapsed_ns: u64,
}

/// The line of `probe --until`.
#[derive(Debug, Clone, Deserialize)]
pub struct UntilResult {
    pub attempt: String,
    /// The last try's outcome: the one asked for when `reached`.
    pub outcome: Outcome,
    pub errno: i32,
    /// Whether the outcome asked for came before the time was up.
    pub reached: bool,
    pub tries: u64,
    /// The first try's outcome.
    pub first: Outcome,
    /// Wall clock (ns since the Unix epoch) just before the last try.
    pub at_unix_ns: u64,
}

impl UntilResult {
    /// [`UntilResult::at_unix_ns`] as a `SystemTime`.
    pub fn at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_nanos(self.at_unix_ns)
    }
}

/// `probe --whoami`: where the probe process found itself.
#[derive(Debug, Clone, Deserialize)]
pub struct WhoAmI {
    pub pid: u32,
    /// The cgroup v2 path, relative to the mount, with a leading `/`.
    pub cgroup: String,
}

/// `tcp:127.1.2.3:80`, `udp:[fd00::1]:53`: the probe's attempt syntax. `kind` is `tcp`,
/// `udp` (unconnected sendto: the sendmsg hook) or `udpc` (connect then send: the connect
/// hook).
pub fn attempt(kind: &str, ip: IpAddr, port: u16) -> String {
    format!("{kind}:{}", std::net::SocketAddr::new(ip, port))
}

/// Where the probe binary is: `$ENFORCER_PROBE_BIN`, else next to the running executable
/// (`target/debug/enforcer-demo`), else one level up (`target/debug/deps/<test>`).
pub fn probe_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENFORCER_PROBE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("exe has no parent dir")?;
    for candidate in [dir.join("probe"), dir.join("../probe")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "probe binary not found next to {} (build it: `cargo build -p enforcer-tests --bins`)",
        exe.display()
    )
}

/// A probe invocation: where it runs, how long it may take.
#[derive(Debug, Clone)]
pub struct Probe {
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    timeout: Duration,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    /// Runs in the caller's own cgroup and namespace until told otherwise.
    pub fn new() -> Self {
        Self {
            cgroup: None,
            netns: None,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn in_cgroup(mut self, cg: &TestCgroup) -> Self {
        self.cgroup = Some(cg.path());
        self
    }

    pub fn in_netns(mut self, ns: &NetNs) -> Self {
        self.netns = Some(ns.path());
        self
    }

    /// Upper bound for the whole invocation (the child is killed after it).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Runs the attempts in one process, in order; one result per attempt.
    pub fn run<S: AsRef<str>>(&self, attempts: &[S]) -> Result<Vec<AttemptResult>> {
        let args: Vec<&str> = attempts.iter().map(|a| a.as_ref()).collect();
        let stdout = self.exec(&args)?;
        let results: Vec<AttemptResult> = parse_lines(&stdout)?;
        if results.len() != attempts.len() {
            bail!(
                "probe printed {} results for {} attempts:\n{stdout}",
                results.len(),
                attempts.len()
            );
        }
        Ok(results)
    }

    pub fn run_one(&self, attempt: &str) -> Result<AttemptResult> {
        Ok(self.run(&[attempt])?.remove(0))
    }

    /// Runs `attempt` and fails unless it ends in `want`; `when` says at which step of the
    /// test, so a failure names it.
    pub fn expect_outcome(&self, attempt: &str, want: Outcome, when: &str) -> Result<()> {
        let r = self.run_one(attempt)?;
        ensure!(
            r.outcome == want,
            "{when}: {attempt} gave {r:?}, want {want:?}"
        );
        Ok(())
    }

    /// A connect the cgroup programs let through: it succeeded, or it was aborted or reset
    /// right after (`ECONNABORTED`, `ECONNRESET`: the agent destroyed the socket, e.g. a
    /// step-up quarantine reacting to this very connect before it returned, which a busy
    /// machine's scheduling decides). A refusal (`EPERM`) or any other error fails.
    pub fn expect_let_through(&self, attempt: &str, when: &str) -> Result<()> {
        let r = self.run_one(attempt)?;
        ensure!(
            r.outcome == Outcome::Ok
                || (r.outcome == Outcome::Error
                    && matches!(r.errno, libc::ECONNABORTED | libc::ECONNRESET)),
            "{when}: {attempt} gave {r:?}, want success (or a reset after it)"
        );
        Ok(())
    }

    /// `probe --repeat n attempt`: a burst, summarised.
    pub fn repeat(&self, n: u64, attempt: &str) -> Result<Summary> {
        let n_str = n.to_string();
        let stdout = self.exec(&["--repeat", &n_str, attempt])?;
        let mut lines: Vec<Summary> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --repeat printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --ports n attempt`: `n` attempts to `attempt`'s port, the next port, ... (n
    /// distinct destinations), summarised.
    pub fn ports(&self, n: u64, attempt: &str) -> Result<Summary> {
        let n_str = n.to_string();
        let stdout = self.exec(&["--ports", &n_str, attempt])?;
        let mut lines: Vec<Summary> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --ports printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --deferred n to`: `n` TCP sockets connected to `to` with `TCP_FASTOPEN_CONNECT`
    /// (the SYN deferred to a first write that never comes), each closed; summarised.
    pub fn deferred(&self, n: u64, to: std::net::SocketAddr) -> Result<Summary> {
        self.deferred_with(n, to, &[])
    }

    /// [`Probe::deferred`] with MPTCP sockets: each connect is its first subflow's.
    pub fn deferred_mptcp(&self, n: u64, to: std::net::SocketAddr) -> Result<Summary> {
        self.deferred_with(n, to, &["--mptcp"])
    }

    fn deferred_with(&self, n: u64, to: std::net::SocketAddr, options: &[&str]) -> Result<Summary> {
        let (n_str, to) = (n.to_string(), to.to_string());
        let mut args = vec!["--deferred", &n_str, &to];
        args.extend_from_slice(options);
        let stdout = self.exec(&args)?;
        let mut lines: Vec<Summary> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --deferred printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --deferred-moved dir to@source`: one TCP socket bound to `source`, connected to
    /// `to` with `TCP_FASTOPEN_CONNECT` (the SYN deferred), then the probe moves into the
    /// cgroup directory `dir` and writes one byte (the SYN leaves from there). The printed
    /// line (`connect`, `segments_before_move`, `cgroup_at_send`, `send`, `send_errno`,
    /// `local`).
    pub fn deferred_moved(
        &self,
        dir: &std::path::Path,
        to: std::net::SocketAddr,
        source: std::net::IpAddr,
    ) -> Result<serde_json::Value> {
        let (dir, to) = (dir.display().to_string(), format!("{to}@{source}"));
        let stdout = self.exec(&["--deferred-moved", &dir, &to])?;
        let mut lines: Vec<serde_json::Value> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!(
                "probe --deferred-moved printed {} lines:\n{stdout}",
                lines.len()
            );
        }
        Ok(lines.remove(0))
    }

    /// `probe --reconnect n to...`: one UDP socket connected `n` times, in turn to each of
    /// `to` (and sent one byte after each allowed connect), then closed; summarised.
    pub fn reconnect(&self, n: u64, to: &[std::net::SocketAddr]) -> Result<Summary> {
        let to: Vec<String> = to.iter().map(ToString::to_string).collect();
        self.reconnect_to(n, &to)
    }

    /// `probe --failed-then first second`: one IPv6 TCP socket whose connect to `first` (an
    /// IPv4-mapped address) the kernel refuses after the connect hooks (`IPV6_V6ONLY`), then
    /// connected to `second` and sent one byte, then reset. The printed line.
    pub fn failed_then(
        &self,
        first: std::net::SocketAddr,
        second: std::net::SocketAddr,
    ) -> Result<serde_json::Value> {
        let (first, second) = (first.to_string(), second.to_string());
        let stdout = self.exec(&["--failed-then", &first, &second])?;
        let mut lines: Vec<serde_json::Value> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!(
                "probe --failed-then printed {} lines:\n{stdout}",
                lines.len()
            );
        }
        Ok(lines.remove(0))
    }

    /// [`Probe::reconnect`] with the probe's address arguments as they are (`~ADDR:PORT`: a
    /// connect the kernel refuses after the hooks, see `probe --reconnect`).
    pub fn reconnect_to(&self, n: u64, to: &[String]) -> Result<Summary> {
        let mut args = vec!["--reconnect".to_string(), n.to_string()];
        args.extend(to.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stdout = self.exec(&args)?;
        let mut lines: Vec<Summary> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --reconnect printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --flood WINDOW --every-us GAP ATTEMPT`: the attempt repeated for `window`,
    /// `gap` apart (zero: as fast as it can). The invocation's own timeout must exceed
    /// `window`.
    pub fn flood(&self, attempt: &str, window: Duration, gap: Duration) -> Result<FloodSummary> {
        let window = window.as_millis().max(1).to_string();
        let gap = gap.as_micros().to_string();
        let stdout = self.exec(&["--flood", &window, "--every-us", &gap, attempt])?;
        let mut lines: Vec<FloodSummary> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --flood printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --until WANT --every EVERY --for LIMIT ATTEMPT`: one attempt repeated every
    /// `every` until its outcome is `want` or `limit` has passed (then `reached` is false).
    /// The invocation's own timeout must exceed `limit`.
    pub fn until(
        &self,
        want: Outcome,
        attempt: &str,
        every: Duration,
        limit: Duration,
    ) -> Result<UntilResult> {
        let want = match want {
            Outcome::Ok => "ok",
            Outcome::Eperm => "eperm",
            Outcome::Error => "error",
        };
        let every = every.as_millis().max(1).to_string();
        let limit = limit.as_millis().max(1).to_string();
        let stdout = self.exec(&["--until", want, "--every", &every, "--for", &limit, attempt])?;
        let mut lines: Vec<UntilResult> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --until printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    /// `probe --whoami`: the probe's pid and cgroup, as placed by this `Probe`.
    pub fn whoami(&self) -> Result<WhoAmI> {
        let stdout = self.exec(&["--whoami"])?;
        let mut lines: Vec<WhoAmI> = parse_lines(&stdout)?;
        if lines.len() != 1 {
            bail!("probe --whoami printed {} lines:\n{stdout}", lines.len());
        }
        Ok(lines.remove(0))
    }

    fn exec(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(probe_bin()?);
        cmd.args(args);
        let ns_file = confine_at_exec(&mut cmd, self.netns.as_deref(), self.cgroup.as_deref())?;
        let out = output_bounded(&mut cmd, self.timeout)?;
        drop(ns_file);
        if !out.status.success() {
            bail!(
                "probe {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn parse_lines<T: for<'de> Deserialize<'de>>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("probe output line {l:?}")))
        .collect()
}

/// Makes `cmd`'s child enter the network namespace file `netns` (if any) and then join the
/// cgroup directory `cgroup` (if any) between fork and exec, so that everything it does is
/// judged in that namespace and as that cgroup from its first syscall. Returns the open
/// namespace file: keep it until the child is spawned.
pub fn confine_at_exec(
    cmd: &mut Command,
    netns: Option<&std::path::Path>,
    cgroup: Option<&std::path::Path>,
) -> Result<Option<File>> {
    // Opened before the fork: the child only makes raw syscalls on data prepared here.
    let ns_file = match netns {
        Some(p) => Some(File::open(p).with_context(|| format!("open {}", p.display()))?),
        None => None,
    };
    let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
    let procs = match cgroup {
        Some(cg) => Some(CString::new(
            cg.join("cgroup.procs").as_os_str().as_bytes(),
        )?),
        None => None,
    };
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls on data
    // prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(procs) = &procs {
                // Writing "0" to cgroup.procs moves the writing process itself.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    Ok(ns_file)
}

/// `probe --serve ADDR` (a TCP server that reports every accepted peer) in network namespace
/// `ns` (or the test's own) and in `cgroup`, so that its listening socket is judged by that
/// cgroup's programs (the vector-DB stand-in of the identity-on-the-wire tests). Killed on
/// drop.
pub struct ProbeServer {
    _child: crate::util::ChildGuard,
    peers: std::sync::mpsc::Receiver<std::net::SocketAddr>,
}

impl ProbeServer {
    pub fn start(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        addr: std::net::SocketAddr,
    ) -> Result<Self> {
        Self::spawn(ns, cgroup, addr, None)
    }

    /// A server whose accept queue holds one connection and that accepts nothing until
    /// `release` exists (`probe --serve --held`): the kernel drops the SYNs of a second
    /// connect meanwhile, and its client retransmits them.
    pub fn start_held(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        addr: std::net::SocketAddr,
        release: &std::path::Path,
    ) -> Result<Self> {
        Self::spawn(ns, cgroup, addr, Some(release))
    }

    fn spawn(
        ns: Option<&NetNs>,
        cgroup: &TestCgroup,
        addr: std::net::SocketAddr,
        held: Option<&std::path::Path>,
    ) -> Result<Self> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut cmd = Command::new(probe_bin()?);
        cmd.args(["--serve", &addr.to_string(), "--for", "600000"]);
        if let Some(release) = held {
            cmd.arg("--held").arg(release);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let ns_path = ns.map(NetNs::path);
        let ns_file = confine_at_exec(&mut cmd, ns_path.as_deref(), Some(&cgroup.path()))?;
        let mut child = crate::util::ChildGuard::new(cmd.spawn().context("spawn probe --serve")?);
        drop(ns_file);
        let stdout = child.child().stdout.take().context("server stdout")?;
        let (listening_tx, listening_rx) = std::sync::mpsc::channel();
        let (tx, peers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v.get("listening").is_some() {
                    let _ = listening_tx.send(());
                } else if let Some(p) = v["peer"].as_str().and_then(|p| p.parse().ok()) {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
            }
        });
        listening_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the probe server did not start listening")?;
        Ok(Self {
            _child: child,
            peers,
        })
    }

    /// The peers accepted since the last call.
    pub fn accepted(&self) -> Vec<std::net::SocketAddr> {
        self.peers.try_iter().collect()
    }

    /// [`ProbeServer::accepted`], waiting up to `timeout` until there are at least `n`: the
    /// server reports an accept after the client's `connect()` has already returned.
    pub fn accepted_at_least(&self, n: usize, timeout: Duration) -> Vec<std::net::SocketAddr> {
        let deadline = std::time::Instant::now() + timeout;
        let mut peers: Vec<_> = self.peers.try_iter().collect();
        while peers.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.peers.recv_timeout(left) {
                Ok(peer) => peers.push(peer),
                Err(_) => break,
            }
        }
        peers.extend(self.peers.try_iter());
        peers
    }
}

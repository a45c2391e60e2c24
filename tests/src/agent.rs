//! The enforcer agent as a child process, per the CLI contract:
//!
//! ```text
//! enforcer run --policies DIR --cgroup-root REL --pin-path PINDIR --events FILE
//!              --ready-file FILE [--ring-buffer-bytes N] [--audit]
//! enforcer status --pin-path DIR --json
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bpf::remove_pins;
use crate::util::{output_bounded, tail_of, wait_until, ChildGuard, TempDir};

/// The agent binary: `$ENFORCER_BIN`, else `target/<profile>/enforcer` found from the running
/// executable (a test in `target/debug/deps/`, or a bin in `target/debug/`).
/// Panics with how to build it: a missing agent is a build problem, not a test result.
pub fn enforcer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENFORCER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    if let Some(dir) = exe.parent() {
        for candidate in [dir.join("../enforcer"), dir.join("enforcer")] {
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "enforcer binary not found (ENFORCER_BIN unset, nothing at <dir of {}>/../enforcer): \
         build it with `cargo xtask test`",
        exe.display()
    );
}

/// How to run one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub policies: PathBuf,
    /// Relative to the cgroup v2 mount, as the inventory's `cgroups:`.
    pub cgroup_root: String,
    pub pin_path: PathBuf,
    pub ring_buffer_bytes: Option<u64>,
    pub audit: bool,
    /// `--events-aggregate`: `Some("0")` by default here, so that every deny is its own
    /// event: most tests check the event of each call they make, often of the same call
    /// repeated within a second, which aggregation would fold into one summary. `None` runs
    /// the agent's own default (1 s), as `event_flood.rs` does.
    pub events_aggregate: Option<String>,
    /// Anything else to pass to `enforcer run`.
    pub extra_args: Vec<String>,
    /// How long to wait for the ready file.
    pub ready_timeout: Duration,
    /// Run the agent inside this cgroup (absolute path), as a DaemonSet agent lives in a pod
    /// cgroup: the child moves itself there before it executes the agent.
    pub cgroup: Option<PathBuf>,
}

impl AgentConfig {
    pub fn new(policies: &Path, cgroup_root: &str, pin_path: &Path) -> Self {
        Self {
            policies: policies.to_path_buf(),
            cgroup_root: cgroup_root.to_string(),
            pin_path: pin_path.to_path_buf(),
            ring_buffer_bytes: None,
            audit: false,
            events_aggregate: Some("0".into()),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            cgroup: None,
        }
    }

    /// `enforcer run` with this config and its events going to `events`. [`Agent::start`]
    /// adds the ready file and stdio; a test that needs an agent outside [`Agent`] (whose
    /// Drop would remove the pins) runs this command itself.
    pub fn run_command(&self, events: &Path) -> Command {
        let mut cmd = Command::new(enforcer_bin());
        cmd.arg("run")
            .arg("--policies")
            .arg(&self.policies)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--events")
            .arg(events);
        if let Some(n) = self.ring_buffer_bytes {
            cmd.arg("--ring-buffer-bytes").arg(n.to_string());
        }
        if self.audit {
            cmd.arg("--audit");
        }
        if let Some(window) = &self.events_aggregate {
            cmd.arg("--events-aggregate").arg(window);
        }
        cmd.args(&self.extra_args);
        if let Some(cgroup) = &self.cgroup {
            let procs =
                std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .expect("a cgroup path without NUL");
            // SAFETY: the closure runs in the forked child before exec and calls only
            // async-signal-safe functions (open, write, close) on memory prepared before the
            // fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process itself.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                    Ok(())
                });
            }
        }
        cmd
    }
}

/// A running agent. Drop kills it (SIGKILL) and removes its pin dir, unless the test stopped
/// or killed it on purpose ([`Agent::kill9`], [`Agent::stop`]): then the pins are left for the
/// next agent, as in production.
#[derive(Debug)]
pub struct Agent {
    child: ChildGuard,
    workdir: TempDir,
    config: AgentConfig,
    keep_pins: bool,
}

impl Agent {
    pub fn start(config: AgentConfig) -> Result<Self> {
        let workdir = TempDir::new("enforcer-agent")?;
        let events = workdir.path().join("events.jsonl");
        let ready = workdir.path().join("ready");
        let stderr = File::create(workdir.path().join("stderr.log"))?;
        let stdout = File::create(workdir.path().join("stdout.log"))?;
        let mut cmd = config.run_command(&events);
        cmd.arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let mut agent = Self {
            child: ChildGuard::new(child),
            workdir,
            config,
            keep_pins: false,
        };
        let deadline = Instant::now() + agent.config.ready_timeout;
        loop {
            if ready.exists() {
                return Ok(agent);
            }
            if let Some(status) = agent.child.child().try_wait()? {
                bail!(
                    "agent exited ({status}) before it was ready; stderr:\n{}",
                    agent.stderr_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent not ready after {:?}; stderr:\n{}",
                    agent.config.ready_timeout,
                    agent.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn events_path(&self) -> PathBuf {
        self.workdir.path().join("events.jsonl")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.workdir.path().join("stderr.log")
    }

    /// The last few KiB of the agent's stderr, for assertion messages.
    pub fn stderr_tail(&self) -> String {
        tail_of(&self.stderr_path(), 4096)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.child().try_wait(), Ok(None))
    }

    /// Every JSON line of the events file so far. A last line without its newline may still
    /// be being written, so it is left for the next read.
    pub fn events(&self) -> Result<Vec<Value>> {
        let text = match std::fs::read_to_string(self.events_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("read events file"),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l:?}")))
            .collect()
    }

    /// Connection events only (`"verdict"` present): no `events.lost` bookkeeping lines.
    pub fn verdict_events(&self) -> Result<Vec<Value>> {
        Ok(self
            .events()?
            .into_iter()
            .filter(|e| e.get("verdict").is_some())
            .collect())
    }

    /// `"verdict":"deny"` events.
    pub fn denies(&self) -> Result<Vec<Value>> {
        Ok(self
            .events()?
            .into_iter()
            .filter(|e| e.get("verdict").and_then(Value::as_str) == Some("deny"))
            .collect())
    }

    /// Waits until at least `n` verdict events are in the file (bounded by `timeout`), then
    /// returns all of them. On timeout, an error that shows what did arrive.
    pub fn wait_for_events(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        self.wait_for(n, timeout, |_| true)
    }

    /// Like [`Agent::wait_for_events`], counting only events that match `pred`.
    pub fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let mut last = Vec::new();
        let done = wait_until(timeout, Duration::from_millis(20), || {
            last = self.verdict_events().unwrap_or_default();
            last.iter().filter(|e| pred(e)).count() >= n
        });
        if !done {
            bail!(
                "waited {timeout:?} for {n} matching events, got {} ({} in total): {}\nagent stderr:\n{}",
                last.iter().filter(|e| pred(e)).count(),
                last.len(),
                serde_json::to_string(&last).unwrap_or_default(),
                self.stderr_tail()
            );
        }
        Ok(last)
    }

    /// Waits until the events file has not grown for `quiet` (at most `max`), then returns
    /// the verdict events: for "exactly N" assertions that must also see late extras.
    pub fn settled_events(&self, quiet: Duration, max: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + max;
        let len = || {
            std::fs::metadata(self.events_path())
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let mut last_len = len();
        let mut last_change = Instant::now();
        while Instant::now() < deadline && last_change.elapsed() < quiet {
            std::thread::sleep(Duration::from_millis(20));
            let l = len();
            if l != last_len {
                last_len = l;
                last_change = Instant::now();
            }
        }
        self.verdict_events()
    }

    /// SIGSTOP: the agent stops reading the ring buffer; the kernel keeps enforcing.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Agent::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid() as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// `kill -9`: the agent dies without cleaning up. Its pins stay (this Agent's drop leaves
    /// them) so that enforcement continues and a new agent can adopt them.
    pub fn kill9(&mut self) -> Result<()> {
        self.keep_pins = true;
        let child = self.child.child();
        if child.try_wait()?.is_none() {
            child.kill().context("SIGKILL agent")?;
        }
        child.wait().context("reap agent")?;
        Ok(())
    }

    /// SIGTERM, then wait (10 s at most, then SIGKILL). Pins stay, as after [`Agent::kill9`].
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.keep_pins = true;
        if self.child.child().try_wait()?.is_none() {
            self.signal(libc::SIGTERM)?;
        }
        self.child.wait_timeout(Duration::from_secs(10))
    }

    /// `enforcer status --pin-path PIN --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        status(&self.config.pin_path)
    }
}

/// `enforcer status --pin-path DIR --json`: works with or without a running agent.
pub fn status(pin_path: &Path) -> Result<Value> {
    let out = output_bounded(
        Command::new(enforcer_bin())
            .arg("status")
            .arg("--pin-path")
            .arg(pin_path)
            .arg("--json"),
        Duration::from_secs(20),
    )?;
    if !out.status.success() {
        bail!(
            "enforcer status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("status output {text:?}"))
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.0.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if !self.keep_pins {
            // `enforcer detach` removes the pins and the agent's default state directory
            // (/run/enforcer/<pin path>); the plain removal covers a detach that failed.
            let _ = Command::new(enforcer_bin())
                .args(["detach", "--pin-path"])
                .arg(&self.config.pin_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            remove_pins(&self.config.pin_path);
        }
        if std::thread::panicking() {
            eprintln!(
                "agent (pid {}) stderr tail:\n{}",
                self.pid(),
                self.stderr_tail()
            );
        }
    }
}

/// Whether event `e` has every (JSON pointer, string value) of `fields`.
pub fn event_has(e: &Value, fields: &[(&str, &str)]) -> bool {
    fields
        .iter()
        .all(|(pointer, want)| e.pointer(pointer).and_then(Value::as_str) == Some(*want))
}

//! The operator-facing commands of the enforcer, run as the tests' user would run them:
//! `status`, `risk set`, `quarantine ...`, `policy check`, `policy explain`; plus the small
//! pieces the live-policy tests need (an agent with its own state dir, atomic file edits,
//! notices from the events file, `file:line:column` diagnostics).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::agent::{enforcer_bin, Agent, AgentConfig};
use crate::util::{output_bounded, unique_name, wait_until, TempDir};

/// What one CLI invocation printed and how it exited.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `enforcer ARGS...`, bounded to 30 s.
pub fn enforcer<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<CliOutput> {
    let out = output_bounded(
        Command::new(enforcer_bin()).args(args),
        Duration::from_secs(30),
    )?;
    Ok(CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The `--pin-path P --state-dir D` pair that every agent-facing command takes.
#[derive(Debug, Clone)]
pub struct AgentDirs {
    pub pin_path: PathBuf,
    pub state_dir: PathBuf,
}

impl AgentDirs {
    pub fn args(&self) -> Vec<String> {
        vec![
            "--pin-path".into(),
            self.pin_path.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
        ]
    }

    /// `enforcer SUB... --pin-path P --state-dir D`.
    pub fn run(&self, sub: &[&str]) -> Result<CliOutput> {
        let mut args: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        args.extend(self.args());
        enforcer(&args)
    }

    /// `enforcer status --json`, parsed; fails when the command fails.
    pub fn status(&self) -> Result<Value> {
        let out = self.run(&["status", "--json"])?;
        if !out.success() {
            bail!("enforcer status failed: {out}");
        }
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("status output is not JSON: {out}"))
    }

    /// `enforcer risk set W SCORE`.
    pub fn risk_set(&self, workload: &str, score: &str) -> Result<CliOutput> {
        self.run(&["risk", "set", workload, score])
    }

    /// `enforcer quarantine release W`.
    pub fn quarantine_release(&self, workload: &str) -> Result<CliOutput> {
        self.run(&["quarantine", "release", workload])
    }

    /// `enforcer quarantine list`: the names it printed (one a line; other lines such as a
    /// closing summary are returned too, callers look for names).
    pub fn quarantine_list(&self) -> Result<CliOutput> {
        self.run(&["quarantine", "list"])
    }
}

/// An agent state directory (`--state-dir`), removed on drop. Declare it before the
/// [`Agent`] that uses it, so that it outlives the agent.
#[derive(Debug)]
pub struct StateDir(TempDir);

impl StateDir {
    pub fn new() -> Result<Self> {
        Ok(Self(TempDir::new("enforcer-state")?))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `config` plus `--state-dir <this>`.
    pub fn configure(&self, mut config: AgentConfig) -> AgentConfig {
        config.extra_args.push("--state-dir".into());
        config.extra_args.push(self.path().display().to_string());
        config
    }

    /// The dirs of an agent started with [`StateDir::configure`].
    pub fn dirs(&self, config: &AgentConfig) -> AgentDirs {
        AgentDirs {
            pin_path: config.pin_path.clone(),
            state_dir: self.path().to_path_buf(),
        }
    }
}

/// Replaces `dir/name` atomically (write a sibling temp file outside `dir`, then rename), as
/// an editor or a ConfigMap update does: the agent never sees a half-written file. With
/// `mtime`, the new file gets that modification time before it moves into place.
pub fn replace_file(
    dir: &Path,
    name: &str,
    content: &str,
    mtime: Option<SystemTime>,
) -> Result<()> {
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent", dir.display()))?;
    let tmp = parent.join(unique_name(".enforcer-edit"));
    std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
    if let Some(t) = mtime {
        let f = std::fs::File::options()
            .write(true)
            .open(&tmp)
            .with_context(|| format!("open {}", tmp.display()))?;
        f.set_modified(t).context("set mtime")?;
    }
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).with_context(|| format!("rename onto {}", dest.display()))?;
    Ok(())
}

/// The modification time of a file.
pub fn mtime(path: &Path) -> Result<SystemTime> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("mtime of {}", path.display()))
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

/// The `"type"` of an event line.
pub fn event_type(e: &Value) -> Option<&str> {
    e.get("type").and_then(Value::as_str)
}

/// Every event of this `type` in the agent's events file so far.
pub fn notices(agent: &Agent, ty: &str) -> Result<Vec<Value>> {
    Ok(agent
        .events()?
        .into_iter()
        .filter(|e| event_type(e) == Some(ty))
        .collect())
}

/// Waits (bounded) until at least `n` events of this `type` match `pred`; returns those.
pub fn wait_notices(
    agent: &Agent,
    ty: &str,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    let ok = wait_until(timeout, Duration::from_millis(20), || {
        found = notices(agent, ty)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| pred(e))
            .collect();
        found.len() >= n
    });
    if !ok {
        let all: Vec<String> = agent
            .events()
            .unwrap_or_default()
            .iter()
            .filter(|e| e.get("verdict").is_none())
            .map(Value::to_string)
            .collect();
        bail!(
            "waited {timeout:?} for {n} matching `{ty}` events, got {}; non-verdict events so far:\n  {}\nagent stderr:\n{}",
            found.len(),
            all.join("\n  "),
            agent.stderr_tail()
        );
    }
    Ok(found)
}

/// Waits for the first `policy.applied` event and returns its snapshot.
pub fn first_applied_snapshot(agent: &Agent) -> Result<String> {
    applied_snapshot(agent, |_| true)
}

/// Waits for a `policy.applied` event of another snapshot than `before` (a change applied)
/// and returns its snapshot.
pub fn applied_snapshot_after(agent: &Agent, before: &str) -> Result<String> {
    applied_snapshot(agent, |snapshot| snapshot != Some(before))
}

/// The snapshot of the first `policy.applied` event whose snapshot `wanted` takes (10 s).
fn applied_snapshot(agent: &Agent, wanted: impl Fn(Option<&str>) -> bool) -> Result<String> {
    let applied = wait_notices(agent, "policy.applied", 1, Duration::from_secs(10), |e| {
        wanted(e.get("snapshot").and_then(Value::as_str))
    })?;
    applied[0]
        .get("snapshot")
        .and_then(Value::as_str)
        .map(str::to_string)
        .context("policy.applied without a snapshot")
}

/// Whether `s` is a bundle revision: `sha256:` and 16 lowercase hex digits.
pub fn is_revision(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 16
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// One `file:line:column: error: message` line of `policy check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    /// The `  hint:` lines that follow it.
    pub hints: Vec<String>,
}

/// Every diagnostic in `text` (the stderr of `policy check`).
pub fn parse_diagnostics(text: &str) -> Vec<Diag> {
    let mut out: Vec<Diag> = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.trim_start().strip_prefix("hint:") {
            if line.starts_with(' ') {
                if let Some(last) = out.last_mut() {
                    last.hints.push(h.trim().to_string());
                }
                continue;
            }
        }
        let Some((loc, message)) = line.split_once(": error: ") else {
            continue;
        };
        let mut parts = loc.rsplitn(3, ':');
        let (Some(col), Some(ln), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(column), Ok(line_no)) = (col.parse(), ln.parse()) else {
            continue;
        };
        out.push(Diag {
            file: file.to_string(),
            line: line_no,
            column,
            message: message.to_string(),
            hints: Vec::new(),
        });
    }
    out
}

/// The 1-based number of the first line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> Option<u32> {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i as u32 + 1)
}

/// Copies the regular files of `from` into a fresh temp dir (removed on drop).
pub fn copy_bundle(from: &Path) -> Result<TempDir> {
    let dir = TempDir::new("enforcer-bundle-copy")?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(dir)
}

/// Seconds since `t0`, for logs of timed sequences.
pub fn secs_since(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

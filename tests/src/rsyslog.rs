//! rsyslog's `imfile` (Debian's `rsyslog` package; `cargo xtask test` installs it) as the
//! log shipper a SIEM collector would run: it follows the agent's events file by name through
//! rotations (inotify) and writes every line it reads, unchanged, to a file the test reads.
//!
//! Each instance is a child process with its own configuration, work directory (imfile's
//! state files) and pid file, loading nothing but `imfile` and `omfile` (no `/dev/log`, no
//! network), dropping to `nobody` once started. Drop kills it and removes the directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{tail_of, wait_until, ChildGuard, TempDir};

/// Where Debian puts the daemon.
pub const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// Why rsyslog cannot run here, or `None`.
pub fn unavailable_reason() -> Option<String> {
    if !Path::new(RSYSLOGD).is_file() {
        return Some(format!(
            "{RSYSLOGD} is missing (Debian package `rsyslog`; `cargo xtask test` installs it)"
        ));
    }
    None
}

/// A running rsyslogd following one file.
#[derive(Debug)]
pub struct Rsyslog {
    child: ChildGuard,
    dir: TempDir,
}

impl Rsyslog {
    /// Starts rsyslogd following `file` from its first line (imfile, inotify mode) and
    /// writing each line it reads to [`Rsyslog::received_path`].
    pub fn follow(file: &Path) -> Result<Self> {
        let dir = TempDir::new("oc-rsyslog")?;
        let work = dir.path().join("work");
        std::fs::create_dir(&work)?;
        // rsyslogd runs as nobody once started: its work directory must be its own, and the
        // directory holding its output writable.
        let nobody = "65534";
        for path in [dir.path(), work.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
            crate::util::run(
                "chown",
                &[&format!("{nobody}:{nobody}"), &path.display().to_string()],
            )?;
        }
        let received = dir.path().join("received.log");
        let config = dir.path().join("rsyslog.conf");
        // maxMessageSize: an OCSF line is a few KiB; the default 8 KiB would cut long ones.
        let text = format!(
            r#"$PrivDropToUser nobody
$PrivDropToGroup nogroup
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imfile" mode="inotify")
template(name="line" type="string" string="%rawmsg%\n")
input(type="imfile" file="{file}" tag="enforcer" ruleset="ship" freshStartTail="off")
ruleset(name="ship") {{
  action(type="omfile" file="{received}" template="line")
}}
"#,
            work = work.display(),
            file = file.display(),
            received = received.display(),
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let check = Command::new(RSYSLOGD)
            .args(["-N1", "-f"])
            .arg(&config)
            .output()
            .context("rsyslogd -N1")?;
        if !check.status.success() {
            bail!(
                "rsyslogd refuses the test's configuration: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = std::fs::File::create(dir.path().join("rsyslogd.log"))?;
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&config)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rsyslogd")?;
        Ok(Rsyslog {
            child: ChildGuard::new(child),
            dir,
        })
    }

    /// The file rsyslog writes every line it shipped to.
    pub fn received_path(&self) -> PathBuf {
        self.dir.path().join("received.log")
    }

    /// Every complete line shipped so far.
    pub fn received(&self) -> Result<Vec<String>> {
        let text = match std::fs::read_to_string(self.received_path()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading what rsyslog shipped"),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        Ok(complete.lines().map(str::to_string).collect())
    }

    /// Waits (bounded) until `done` holds for the lines shipped so far; returns them.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let ok = wait_until(timeout, Duration::from_millis(50), || {
            lines = self.received().unwrap_or_default();
            done(&lines)
        });
        if let Some(status) = self.child.child().try_wait()? {
            bail!("rsyslogd exited ({status}): {}", self.log_tail());
        }
        if !ok {
            bail!(
                "rsyslog: waited {timeout:?} for {what}; {} lines shipped; rsyslogd log:\n{}",
                lines.len(),
                self.log_tail()
            );
        }
        Ok(lines)
    }

    /// The end of rsyslogd's own output, for failure messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.path().join("rsyslogd.log"), 4096)
    }
}

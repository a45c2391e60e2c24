//! A real Prometheus server (Debian's `prometheus` package; `cargo xtask test` installs it)
//! scraping the agent, and `promtool` checking what the agent serves.
//!
//! Each instance is a child process on a loopback address with its own configuration and
//! TSDB directory; Drop kills it and removes the directory. Queries go through its HTTP API
//! (`/api/v1/query`) over a plain HTTP/1.0 connection: nothing beyond loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util::{tail_of, wait_until, ChildGuard, TempDir};

/// Where Debian puts the server and its checker.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Why Prometheus cannot run here, or `None`.
pub fn unavailable_reason() -> Option<String> {
    for bin in [PROMETHEUS, PROMTOOL] {
        if !Path::new(bin).is_file() {
            return Some(format!(
                "{bin} is missing (Debian package `prometheus`; `cargo xtask test` installs it)"
            ));
        }
    }
    None
}

/// A free TCP port on `ip` (bound once and released: the address range is the test's own,
/// so nobody else takes it in between).
pub fn free_port(ip: &str) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(listener.local_addr()?.port())
}

/// One HTTP/1.0 GET on loopback: `(status code, body)`. Bounded by `timeout`.
pub fn http_get(
    addr: SocketAddr,
    target: &str,
    accept: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {target} HTTP/1.0\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer of {addr}{target}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{target}: no HTTP head in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr}{target}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `promtool check metrics` on `exposition` (stdin): `Ok(())` when it passes, else its words.
pub fn check_metrics(exposition: &str) -> Result<()> {
    let child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    let mut guard = ChildGuard::new(child);
    // Dropped after writing: promtool reads to end of input.
    guard
        .child()
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let status = guard.wait_timeout(Duration::from_secs(30))?;
    let mut out = String::new();
    if let Some(mut s) = guard.child().stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = guard.child().stderr.take() {
        s.read_to_string(&mut out)?;
    }
    if !status.success() || !out.trim().is_empty() {
        bail!("promtool check metrics ({status}):\n{out}");
    }
    Ok(())
}

/// A running Prometheus scraping one target every second.
#[derive(Debug)]
pub struct Prometheus {
    child: ChildGuard,
    dir: TempDir,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus on `ip` (a free port), scraping `http://<target>/metrics` every
    /// second as job `enforcer`, and waits (bounded) until it is ready.
    pub fn scrape(ip: &str, target: SocketAddr) -> Result<Self> {
        let dir = TempDir::new("mt-prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: enforcer\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let storage = dir.path().join("data");
        let addr: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={addr}"))
            // Nothing of the package's own setup: no console templates, no remote anything.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut prometheus = Prometheus {
            child: ChildGuard::new(child),
            dir,
            addr,
        };
        let ready = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            matches!(
                http_get(addr, "/-/ready", None, Duration::from_secs(2)),
                Ok((200, _))
            )
        });
        if let Some(status) = prometheus.child.child().try_wait()? {
            bail!("prometheus exited ({status}): {}", prometheus.log_tail());
        }
        if !ready {
            bail!(
                "prometheus on {addr} not ready within 60 s:\n{}",
                prometheus.log_tail()
            );
        }
        Ok(prometheus)
    }

    /// An instant PromQL query: the `data.result` array of the answer.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let target = format!("/api/v1/query?query={}", encode_query(promql));
        let (status, body) = http_get(self.addr, &target, None, Duration::from_secs(10))?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}, not JSON: {body}"))?;
        if status != 200 || answer["status"] != "success" {
            bail!("query {promql:?}: HTTP {status}: {body}");
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of an instant query that returns one series (`None` for no series).
    pub fn value(&self, promql: &str) -> Result<Option<f64>> {
        let result = self.query(promql)?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => one["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .map(Some)
                .with_context(|| format!("query {promql:?}: no number in {one}")),
            many => bail!("query {promql:?} returned {} series: {many:?}", many.len()),
        }
    }

    /// The end of Prometheus's own log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.path().join("prometheus.log"), 4096)
    }
}

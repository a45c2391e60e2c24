//! `enforcer run --pdp URL`: keeps a local bundle directory in step with a remote PDP.
//!
//! The task long-polls `GET /v1/bundle` with the revision it has. A new bundle is written to a
//! sibling directory, validated there with [`Bundle::load`] (and its revision checked against
//! the one the PDP advertised), and only then swapped into `target_dir` in one rename. So
//! `target_dir` always holds the last good bundle, on disk: the agent watches it like any
//! policy directory, and an agent restarted while the PDP is away still has it.
//!
//! Failures (unreachable, refused token, invalid bundle) change nothing on disk; they are
//! logged, recorded in the status, and retried with exponential backoff (0.5 s doubling to
//! 30 s, with jitter).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::auth::Token;
use super::files::{remove_stale_stages, shown, sibling, stage, swap_into, validate, write_atomic};
use super::http::{etag, PdpUrl};
use super::status::{status_file, PdpStatus};
use super::WireBundle;

#[cfg(doc)]
use enforcer_policy::Bundle;

/// How long the PDP may hold one long poll.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Extra time for a request beyond its long poll (connect, TLS, transfer).
const REQUEST_SLACK: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body accepted.
const MAX_BODY_BYTES: usize = 64 << 20;
/// The most hex digits a revision may have: a whole SHA-256 (a bundle's revision has the
/// first 16, see [`Bundle::revision`]).
const REVISION_HEX_DIGITS: usize = 64;
/// The most bytes of a decoding error's message repeated (it may quote the answer).
const ERROR_BYTES: usize = 256;
/// The most bytes of an attempt's error kept in the status (`pdp-status.json`, `enforcer
/// status`) and logged.
pub(super) const STATUS_ERROR_BYTES: usize = 4096;
/// Never two requests closer than this, whatever the server does.
const MIN_INTERVAL: Duration = Duration::from_millis(250);

pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// `https://host:port[/prefix]`, or `http://` to a loopback address.
    pub url: String,
    pub token: String,
    /// PEM certificate(s) to trust for https; the system CA bundle when `None`.
    pub ca_cert: Option<PathBuf>,
    /// The directory the agent reads its policy from; created, and replaced whole on every
    /// new bundle. Its parent holds `pdp-status.json` and short-lived staging directories.
    pub target_dir: PathBuf,
}

/// Reads a token file for [`SyncOptions::token`] (whole file, trimmed, checked).
pub fn read_token(path: &Path) -> Result<String> {
    Ok(Token::from_file(path)?.as_str().to_string())
}

/// The running sync task. Dropping it stops the task; the bundle directory stays.
pub struct SyncHandle {
    status: Arc<Mutex<PdpStatus>>,
    ready: watch::Receiver<bool>,
    target_dir: PathBuf,
    task: JoinHandle<()>,
}

impl SyncHandle {
    /// Where the PDP's source, success, error, revision and staleness stand now.
    pub fn status(&self) -> PdpStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .at(SystemTime::now())
    }

    /// A reader of [`SyncHandle::status`] that outlives a borrow of the handle (metrics read
    /// it at scrape time; it locks only to clone).
    pub fn status_reader(&self) -> impl Fn() -> PdpStatus + Send + Sync + 'static {
        let status = self.status.clone();
        move || {
            status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .at(SystemTime::now())
        }
    }

    /// The bundle directory this task maintains.
    pub fn target_dir(&self) -> &Path {
        &self.target_dir
    }

    /// Waits until `target_dir` holds a good bundle: at once when a valid one was already on
    /// disk (a restart), else until the first bundle from the PDP is installed. `false` when
    /// `timeout` passes first.
    pub async fn first_sync(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        let ok = matches!(
            tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        );
        ok
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the options (URL, token, CA) and starts the task. Must run inside a tokio runtime.
pub fn try_spawn(options: SyncOptions) -> Result<SyncHandle> {
    let config = configure(&options)?;
    Ok(start(options, Ok(config)))
}

/// Starts the task. Problems with the options are reported in the status and the log, and
/// retried with backoff (a CA or token file may still be on its way); prefer [`try_spawn`]
/// to fail fast. Must run inside a tokio runtime.
pub fn spawn(options: SyncOptions) -> SyncHandle {
    let config = configure(&options);
    start(options, config)
}

type Config = (PdpUrl, Token, Option<TlsConnector>);

fn configure(options: &SyncOptions) -> Result<Config> {
    let url = PdpUrl::parse(&options.url)?;
    let token = Token::new(&options.token).context("the PDP token")?;
    let tls = connector(&url, options.ca_cert.as_deref())?;
    Ok((url, token, tls))
}

fn connector(url: &PdpUrl, ca: Option<&Path>) -> Result<Option<TlsConnector>> {
    Ok(if url.https {
        Some(TlsConnector::from(super::tls::client_config(ca)?))
    } else {
        None
    })
}

fn start(options: SyncOptions, config: Result<Config>) -> SyncHandle {
    let status = Arc::new(Mutex::new(PdpStatus::new(&options.url)));
    let (ready_tx, ready) = watch::channel(false);
    let target_dir = options.target_dir.clone();
    let task = tokio::spawn(run(options, config, status.clone(), ready_tx));
    SyncHandle {
        status,
        ready,
        target_dir,
        task,
    }
}

async fn run(
    options: SyncOptions,
    mut config: Result<Config>,
    status: Arc<Mutex<PdpStatus>>,
    ready: watch::Sender<bool>,
) {
    let target = options.target_dir.clone();
    let status_path = status_file(&target);
    let mut backoff = Backoff::new();

    // What is already on disk: the last good bundle of an earlier run.
    let mut have = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || prepare_target(&target))
            .await
            .unwrap_or(None)
    };
    if let Some(revision) = &have {
        tracing::info!(%revision, dir = %target.display(), "using the bundle persisted from the last PDP sync until the PDP answers");
        ready.send_replace(true);
    }
    {
        let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
        s.revision = have.clone();
        // Keep what an earlier run learnt about the PDP (when it was last reached), so a
        // restart does not make a stale bundle look fresh or unknown.
        if let Ok(Some(previous)) = super::status::read_status(&status_path) {
            if previous.url == options.url && previous.revision == have {
                s.last_success = previous.last_success;
            }
        }
    }

    loop {
        let started = Instant::now();
        let outcome = match &config {
            Ok((url, token, tls)) => {
                attempt(url, token, tls.as_ref(), &target, &mut have, &status).await
            }
            Err(error) => {
                let message = format!("{error:#}");
                // Retry reading the configuration (files may appear later).
                config = configure(&options);
                Err(anyhow::anyhow!("{message}"))
            }
        };
        let (snapshot, error) = {
            let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
            let error = record(&mut s, &outcome, &have, SystemTime::now());
            (s.clone(), error)
        };
        write_status(&status_path, &snapshot);
        match error {
            None => {
                if have.is_some() {
                    ready.send_replace(true);
                }
                backoff.reset();
                tokio::time::sleep(MIN_INTERVAL.saturating_sub(started.elapsed())).await;
            }
            Some(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    url = %options.url,
                    revision_in_force = have.as_deref().unwrap_or("none"),
                    retry_in_ms = delay.as_millis() as u64,
                    "PDP sync failed, keeping the last good bundle: {error}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Records an attempt's outcome (at `now`, with `have` in the bundle directory) in the
/// status. Returns the error as stored, for the log: [`error_text`], bounded.
pub(super) fn record(
    s: &mut PdpStatus,
    outcome: &Result<bool>,
    have: &Option<String>,
    now: SystemTime,
) -> Option<String> {
    s.last_attempt = Some(now);
    s.revision = have.clone();
    match outcome {
        Ok(_) => {
            s.last_success = Some(now);
            s.last_error = None;
            s.consecutive_failures = 0;
            None
        }
        Err(error) => {
            let text = error_text(error);
            s.last_error = Some(text.clone());
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.errors_total = s.errors_total.saturating_add(1);
            Some(text)
        }
    }
}

/// `error` (with its causes) as the status and the log keep it: at most [`STATUS_ERROR_BYTES`],
/// with a note of how many bytes were cut. The bundle's own diagnostics quote what they
/// refuse (a 16 MiB inventory's value whole), and the error is written to the status file and
/// logged after every attempt (red-team review 71 N4). Only the part kept is copied; the rest
/// is counted.
fn error_text(error: &anyhow::Error) -> String {
    /// Room for the note: " (18446744073709551615 more bytes not shown)" is 44 bytes.
    const NOTE: usize = 45;
    match crate::admission::text::shown_counted(
        format_args!("{error:#}"),
        STATUS_ERROR_BYTES - NOTE,
    ) {
        (text, 0) => text,
        (text, left) => format!("{text} ({left} more bytes not shown)"),
    }
}

/// Creates the parent of `target`, removes leftovers of an interrupted swap, and returns the
/// revision of the bundle in `target` if it holds a valid one.
fn prepare_target(target: &Path) -> Option<String> {
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Err(error) = std::fs::create_dir_all(parent) {
            tracing::warn!(dir = %parent.display(), %error, "cannot create the PDP state directory");
        }
    }
    remove_stale_stages(target);
    if !target.is_dir() {
        return None;
    }
    match validate(target) {
        Ok(revision) => Some(revision),
        Err(problems) => {
            tracing::warn!(dir = %target.display(), "the persisted bundle is invalid; waiting for the PDP:\n{problems}");
            None
        }
    }
}

/// One request. `Ok(true)`: a new bundle was installed; `Ok(false)`: ours is current.
async fn attempt(
    url: &PdpUrl,
    token: &Token,
    tls: Option<&TlsConnector>,
    target: &Path,
    have: &mut Option<String>,
    status: &Arc<Mutex<PdpStatus>>,
) -> Result<bool> {
    let fetched = tokio::time::timeout(
        LONG_POLL + REQUEST_SLACK,
        fetch(url, token, tls, have.as_deref(), LONG_POLL),
    )
    .await
    .context("the PDP did not answer in time")??;
    let Some(wire) = fetched else {
        return Ok(false);
    };
    if have.as_deref() == Some(wire.revision.as_str()) {
        return Ok(false);
    }
    let offered = wire.revision.clone();
    let target = target.to_path_buf();
    let status = status.clone();
    let revision = tokio::task::spawn_blocking(move || install(wire, &target, &status))
        .await
        .context("installing the bundle")??;
    tracing::info!(%revision, previous = have.as_deref().unwrap_or("none"), "new bundle from the PDP installed");
    debug_assert_eq!(revision, offered);
    *have = Some(revision);
    Ok(true)
}

/// Stages `wire` beside `target`, validates it there, and swaps it in. Nothing in `target`
/// changes unless the bundle is valid and its files hash to the revision the PDP claimed.
///
/// What a reader sees changes in one order, upstream first: the status (in memory and its
/// file), then the bundle on disk, then (when the agent reloads it) the kernel. Whoever sees
/// the new bundle, or its policy in force, and then reads the status sees its revision,
/// never the previous one. The in-memory status is changed under its lock for the whole
/// swap, and put back if the swap fails.
pub(super) fn install(
    wire: WireBundle,
    target: &Path,
    status: &Mutex<PdpStatus>,
) -> Result<String> {
    // First, so that every message below repeats a short revision.
    check_revision(&wire.revision)?;
    let staged = stage(sibling(target, "stage")?, &wire.files)
        .context("the PDP's bundle cannot be written")?;
    let revision = validate(staged.path()).map_err(|problems| {
        anyhow::anyhow!(
            "the PDP served an invalid bundle (revision {}); rejected:\n{problems}",
            wire.revision
        )
    })?;
    if revision != wire.revision {
        bail!(
            "the PDP said revision {} but its files hash to {revision}; rejected",
            wire.revision
        );
    }
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    let previous = s.revision.replace(revision.clone());
    let status_path = status_file(target);
    write_status(&status_path, &s);
    if let Err(error) = swap_into(staged, target) {
        s.revision = previous;
        write_status(&status_path, &s);
        return Err(error);
    }
    Ok(revision)
}

/// Refuses a revision that is not of the form [`Bundle::revision`] gives (`sha256:` and
/// lowercase hex digits), showing at most [`super::files::SHOWN_BYTES`] of it.
fn check_revision(revision: &str) -> Result<()> {
    let well_formed = revision.strip_prefix("sha256:").is_some_and(|hex| {
        (1..=REVISION_HEX_DIGITS).contains(&hex.len())
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if !well_formed {
        bail!(
            "the PDP said revision {:?} ({} bytes), which is not a bundle revision (sha256: and at most {REVISION_HEX_DIGITS} hex digits); rejected",
            shown(revision),
            revision.len()
        );
    }
    Ok(())
}

/// Writes the status file (atomically); a failure is logged, never fatal: the file is
/// informational and rewritten after every attempt.
fn write_status(path: &Path, status: &PdpStatus) {
    if let Err(error) = serde_json::to_vec_pretty(&status.clone().at(SystemTime::now()))
        .map_err(anyhow::Error::from)
        .and_then(|json| write_atomic(path, &json))
    {
        tracing::warn!("writing the PDP status: {error:#}");
    }
}

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET /v1/bundle`: `Some(bundle)` on 200, `None` on 304.
async fn fetch(
    url: &PdpUrl,
    token: &Token,
    tls: Option<&TlsConnector>,
    have: Option<&str>,
    wait: Duration,
) -> Result<Option<WireBundle>> {
    let authority = url.authority();
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&authority))
        .await
        .with_context(|| format!("connecting to {authority}: timed out"))?
        .with_context(|| format!("connecting to {authority}"))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(url.host.as_str())
                .with_context(|| format!("{:?} is not a valid TLS server name", url.host))?
                .to_owned();
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with {authority}"))?,
            )
        }
        None => Box::new(tcp),
    };
    request_bundle(io, url, &authority, token, have, wait).await
}

/// The request and its answer over an established connection (TCP or TLS): everything the
/// PDP's bytes reach (also driven by the fuzz targets, see `pdp::fuzzing`).
pub(super) async fn request_bundle(
    io: Box<dyn Io>,
    url: &PdpUrl,
    authority: &str,
    token: &Token,
    have: Option<&str>,
    wait: Duration,
) -> Result<Option<WireBundle>> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut request = Request::get(url.bundle_target(wait))
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Bearer {}", token.as_str()))
        .header(header::ACCEPT, "application/json");
    if let Some(revision) = have {
        request = request.header(header::IF_NONE_MATCH, etag(revision));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("requesting the bundle")?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_MODIFIED => return Ok(None),
        StatusCode::UNAUTHORIZED => {
            bail!("the PDP refused our token (401 Unauthorized): check --pdp-token-file")
        }
        status => bail!("the PDP answered {status}"),
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the bundle: {e}"))?
        .to_bytes();
    if content_type
        .as_ref()
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .is_some_and(|v| !v.starts_with("application/json"))
    {
        let shown_type = content_type.map(|v| shown(&String::from_utf8_lossy(v.as_bytes())));
        bail!("the PDP answered with {shown_type:?}, not JSON");
    }
    // serde's message quotes a string of the wrong type whole: show the start of it.
    let wire: WireBundle = serde_json::from_slice(&body).map_err(|e| {
        anyhow::anyhow!(
            "the PDP's answer is not a bundle: {}",
            crate::admission::text::shown(&e, ERROR_BYTES)
        )
    })?;
    Ok(Some(wire))
}

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... 30 s, each randomised by +-20 %
/// (and never above the maximum), so that many nodes do not retry in step.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ (u64::from(std::process::id()) << 32);
        Self {
            next: BACKOFF_FIRST,
            rng: seed | 1,
        }
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The delay before the next retry; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // xorshift64: cheap, good enough to spread retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        base.mul_f64(0.8 + 0.4 * unit).min(BACKOFF_MAX)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let mut bases = Vec::new();
        for _ in 0..12 {
            bases.push(backoff.next);
            let delay = backoff.next_delay();
            let base = *bases.last().unwrap();
            assert!(delay >= base.mul_f64(0.8) && delay <= base.mul_f64(1.2).min(BACKOFF_MAX));
        }
        assert_eq!(bases[0], Duration::from_millis(500));
        assert_eq!(bases[1], Duration::from_secs(1));
        assert_eq!(bases[6], Duration::from_secs(30));
        assert_eq!(*bases.last().unwrap(), BACKOFF_MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(600));
    }

    #[test]
    fn an_error_is_kept_whole_or_cut_at_a_character_with_a_note() {
        let short = anyhow::anyhow!("short").context("outer");
        assert_eq!(error_text(&short), "outer: short");
        // At the bound, whole; past it, cut (never inside a character: é is two bytes), and
        // the note counts every byte not kept.
        let at = "x".repeat(STATUS_ERROR_BYTES - 48);
        assert_eq!(error_text(&anyhow::anyhow!("{at}")), at);
        let long = "é".repeat(STATUS_ERROR_BYTES);
        let text = error_text(&anyhow::anyhow!("{long}"));
        assert!(text.len() <= STATUS_ERROR_BYTES, "{}", text.len());
        let kept = text.find("...").unwrap();
        assert!(long.starts_with(&text[..kept]));
        assert!(
            text.ends_with(&format!("... ({} more bytes not shown)", long.len() - kept)),
            "{}",
            &text[kept..]
        );
    }
}

//! `enforcer pdp serve`: the last good bundle of a directory, over HTTP(S), with a bearer
//! token and long polling.
//!
//! ```text
//! GET /v1/bundle[?wait=SECONDS]          Authorization: Bearer <token>
//!     [If-None-Match: "<revision>"]
//! 200 {"revision": "...", "files": {...}}   ETag: "<revision>"
//! 304 (If-None-Match names the current revision and nothing changed within `wait`)
//! 401 (no or wrong token; the body says nothing else)
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::auth::Token;
use super::files::{fingerprint, read_bundle_files, sibling, stage, validate};
use super::http::{etag, if_none_match_hits, is_loopback, parse_wait};
use super::listen::{accept_until, serve_http, Peer};
use super::{WireBundle, BUNDLE_PATH, WATCH_EVERY};

/// The environment variable that may hold the token when no `--token-file` is given.
pub const TOKEN_ENV: &str = "ENFORCER_PDP_TOKEN";

/// At most this many connections at once (each node holds one long poll).
const MAX_CONNECTIONS: usize = 1024;

/// `enforcer pdp serve --policies DIR --listen ADDR [--token-file F] [--tls-cert PEM --tls-key
/// PEM] [--ready-file F]`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bundle directory to serve (watched for edits).
    pub policies: PathBuf,
    pub listen: SocketAddr,
    /// The bearer token, in a file. Without it, `$ENFORCER_PDP_TOKEN`; one of them is required.
    pub token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Written with the bound address (`127.0.0.1:43210\n`) once the server accepts
    /// connections: useful with `--listen 127.0.0.1:0`.
    pub ready_file: Option<PathBuf>,
}

/// Serves until SIGTERM or SIGINT.
pub async fn serve(options: ServeOptions) -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    serve_until(options, async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await
}

/// Serves until `shutdown` completes.
pub async fn serve_until(options: ServeOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    Pdp::bind(options).await?.run(shutdown).await
}

/// One published bundle: the response body, ready to send.
#[derive(Debug)]
struct Published {
    revision: String,
    body: Bytes,
}

struct Shared {
    token: Token,
    bundle: watch::Receiver<Arc<Published>>,
}

/// A bound PDP server that has not started serving yet.
pub struct Pdp {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    publisher: watch::Sender<Arc<Published>>,
    policies: PathBuf,
    ready_file: Option<PathBuf>,
}

impl Pdp {
    /// Checks everything that can be wrong (transport, token, the bundle itself) and only then
    /// binds: plain HTTP on a non-loopback address is refused before any socket exists.
    pub async fn bind(options: ServeOptions) -> Result<Self> {
        let tls = match (&options.tls_cert, &options.tls_key) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(super::tls::server_config(
                cert, key, None,
            )?)),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together: give both, or neither"),
        };
        if tls.is_none() && !is_loopback(&options.listen) {
            bail!(
                "refusing to serve policy over plain HTTP on {}: that is not a loopback \
                 address, and the bearer token and the policy would cross the network in clear \
                 text. Give --tls-cert and --tls-key, or listen on 127.0.0.1 / [::1]",
                options.listen
            );
        }
        let token = match &options.token_file {
            Some(file) => Token::from_file(file)?,
            None => match std::env::var(TOKEN_ENV) {
                Ok(raw) => Token::new(&raw).with_context(|| format!("${TOKEN_ENV}"))?,
                Err(_) => {
                    bail!("the PDP needs a bearer token: --token-file FILE (or ${TOKEN_ENV})")
                }
            },
        };
        let policies = options.policies.clone();
        let first = {
            let dir = policies.clone();
            tokio::task::spawn_blocking(move || snapshot(&dir))
                .await
                .context("validating the bundle")?
        }
        .map_err(|problems| {
            anyhow::anyhow!(
                "the policy bundle {} is invalid; nothing to serve:\n{problems}",
                options.policies.display()
            )
        })?;
        tracing::info!(revision = %first.revision, policies = %policies.display(), "bundle validated");
        let (publisher, bundle) = watch::channel(Arc::new(first));
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("listening on {}", options.listen))?;
        Ok(Self {
            listener,
            tls,
            shared: Arc::new(Shared { token, bundle }),
            publisher,
            policies,
            ready_file: options.ready_file,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` completes; then every connection is closed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let addr = self.local_addr()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, "PDP serving {scheme}://{addr}{BUNDLE_PATH}");
        if let Some(ready) = &self.ready_file {
            crate::fs::replace_file(ready, format!("{addr}\n").as_bytes())?;
        }
        let watcher = tokio::spawn(watch_dir(self.policies.clone(), self.publisher));
        let shared = self.shared;
        let served = accept_until(
            &self.listener,
            self.tls,
            MAX_CONNECTIONS,
            shutdown,
            move |stream, peer: Peer| serve_connection(stream, peer.addr, shared.clone()),
        )
        .await;
        tracing::info!("PDP stopping");
        watcher.abort();
        served
    }
}

async fn serve_connection<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_http(stream, peer, move |request| {
        let shared = shared.clone();
        async move { respond(request, peer, &shared).await }
    })
    .await
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn with_etag(mut response: Response<Full<Bytes>>, revision: &str) -> Response<Full<Bytes>> {
    if let Ok(value) = HeaderValue::from_str(&etag(revision)) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn ok(published: &Published) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(published.body.clone()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_etag(response, &published.revision)
}

fn not_modified(revision: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    with_etag(response, revision)
}

async fn respond(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    // Authentication first, for every path: an unauthenticated client learns nothing, not
    // even which paths exist.
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if !shared.token.matches_header(authorization) {
        tracing::warn!(%peer, presented = authorization.is_some(), "refused a request without the right bearer token");
        let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"enforcer-pdp\""),
        );
        return response;
    }
    if request.uri().path() != BUNDLE_PATH {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let wait = match parse_wait(request.uri().query()) {
        Ok(wait) => wait,
        Err(_) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "wait must be a number of seconds\n",
            )
        }
    };
    let if_none_match = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut bundle = shared.bundle.clone();
    let current = bundle.borrow_and_update().clone();
    let Some(if_none_match) = if_none_match else {
        return ok(&current);
    };
    if !if_none_match_hits(&if_none_match, &current.revision) {
        return ok(&current);
    }
    // The client has the current revision: hold the request until it changes or `wait` ends.
    let changed = tokio::time::timeout(wait, async {
        loop {
            if bundle.changed().await.is_err() {
                return None; // shutting down
            }
            let latest = bundle.borrow_and_update().clone();
            if !if_none_match_hits(&if_none_match, &latest.revision) {
                return Some(latest);
            }
        }
    })
    .await;
    match changed {
        Ok(Some(latest)) => ok(&latest),
        Ok(None) | Err(_) => not_modified(&current.revision),
    }
}

/// Reads the bundle files of `dir` (which no other user may change:
/// [`crate::fs::trusted_bundle_dir`]), validates exactly those (a copy in a temp dir, so that an
/// edit racing with the read cannot make us serve files other than the ones validated), and
/// renders the response body. The problems as text when the bundle is invalid.
fn snapshot(dir: &Path) -> std::result::Result<Published, String> {
    // Every node enforces what this serves: a directory another user could change would be
    // theirs to write the whole cluster's policy in.
    crate::fs::trusted_bundle_dir(dir).map_err(|e| format!("{e:#}"))?;
    let files = read_bundle_files(dir).map_err(|e| format!("{e:#}"))?;
    let scratch = sibling(&std::env::temp_dir().join("enforcer-pdp"), "stage")
        .map_err(|e| format!("{e:#}"))?;
    let staged = stage(scratch, &files).map_err(|e| format!("{e:#}"))?;
    let revision = validate(staged.path())?;
    drop(staged);
    let body = serde_json::to_vec(&WireBundle {
        revision: revision.clone(),
        files,
    })
    .map_err(|e| e.to_string())?;
    Ok(Published {
        revision,
        body: Bytes::from(body),
    })
}

/// Polls `dir` every [`WATCH_EVERY`]; publishes each new bundle that validates, and logs (and
/// keeps serving the last good one) when one does not.
async fn watch_dir(dir: PathBuf, publisher: watch::Sender<Arc<Published>>) {
    let mut seen = fingerprint(&dir);
    let mut ticker = tokio::time::interval(WATCH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let latest = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || fingerprint(&dir))
                .await
                .unwrap_or_default()
        };
        if latest == seen {
            continue;
        }
        seen = latest;
        let loaded = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || snapshot(&dir)).await
        };
        let in_force = publisher.borrow().revision.clone();
        match loaded {
            Ok(Ok(published)) if published.revision == in_force => {}
            Ok(Ok(published)) => {
                tracing::info!(revision = %published.revision, previous = %in_force, "publishing a new bundle");
                publisher.send_replace(Arc::new(published));
            }
            Ok(Err(problems)) => tracing::error!(
                policies = %dir.display(),
                revision_in_force = %in_force,
                "the edited bundle is invalid; still serving the last good one:\n{problems}"
            ),
            Err(error) => tracing::error!(%error, "validating the bundle panicked"),
        }
    }
}

/// Serves one connection over `stream` with `token` and a published bundle, as [`Pdp::run`]
/// serves each accepted one: the fuzz targets' way in (see `pdp::fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub(super) async fn serve_stream<S>(stream: S, token: Token, revision: String, body: Bytes)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The sender lives until the connection ends: with it gone, a long poll would end early.
    let (_publisher, bundle) = watch::channel(Arc::new(Published { revision, body }));
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    serve_connection(stream, peer, Arc::new(Shared { token, bundle })).await;
}

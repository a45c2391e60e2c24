//! A stand-in for what the 1.20 API server lacks: discovery.k8s.io/v1 EndpointSlices.
//!
//! [`StandIn`] is a small HTTP/1.1 server on a loopback address that answers API discovery of
//! `discovery.k8s.io/v1` and the list/watch protocol of `endpointslices` itself, from objects
//! the test sets, and forwards every other request to a real API server ([`ApiServer`]), so
//! Pods, Namespaces and Services still come from the real one. Its answers have the shapes
//! recorded from real servers: lists carry `metadata.resourceVersion`; a watch from a
//! resourceVersion replays the events after it, then streams new ones (`ADDED`, `MODIFIED`,
//! `DELETED`, and `BOOKMARK` when asked); a watch from a compacted resourceVersion gets an
//! `ERROR` event holding a `Status` with code 410 (Gone), as etcd compaction causes.
//!
//! The test drives failures: [`StandIn::expire`] (410 on every open and future watch from
//! before now; [`StandIn::compact`] only on future ones, and
//! [`StandIn::refuse_compacted_watches_with_status`] makes that an HTTP 410 answer to the
//! watch request instead of an event in its stream), [`StandIn::end_watches`] (watches end cleanly, as at their timeout),
//! [`StandIn::stop`] / [`StandIn::restart`] (the server disappears mid-watch,
//! connections closed, then comes back on the same address), [`StandIn::set_mode`] (every
//! new request answered with garbage or an HTTP 500 `Status`, proxied ones included), and
//! [`StandIn::inject_garbage_line`] (a line that is not JSON inside open watch streams).
//!
//! [`ApiServer`]: super::ApiServer

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

const GROUP_VERSION: &str = "discovery.k8s.io/v1";
const DISCOVERY_PATH: &str = "/apis/discovery.k8s.io/v1";
const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";

/// How the stand-in answers new requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The protocol as a real server speaks it.
    Normal,
    /// `200 OK` with a body that is not JSON.
    Garbage,
    /// `500 Internal Server Error` with a `Status` body.
    Status500,
}

/// One request the stand-in answered itself (not a proxied one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// `discovery`, `list` or `watch`.
    pub kind: &'static str,
    /// The `resourceVersion` parameter ("" when absent).
    pub resource_version: String,
    /// The mode it was answered in.
    pub mode: Mode,
}

#[derive(Clone, Debug)]
enum WatchMsg {
    /// An event at resourceVersion `rv`.
    Event { rv: u64, line: String },
    /// A `BOOKMARK` (only to watches that allow them).
    Bookmark(String),
    /// A line that is not JSON.
    Garbage(String),
    /// 410 Gone, then end the stream.
    Gone,
    /// End the stream cleanly, after what was sent before (as a server ends a watch at
    /// its `timeoutSeconds`).
    End,
}

struct Slices {
    objects: BTreeMap<(String, String), Value>,
    rv: u64,
    /// Events after `compacted - 1`, as (resourceVersion, line).
    history: Vec<(u64, String)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Such a watch is refused with an HTTP 410 `Status` instead of a `200 OK` stream whose
    /// one event is an `ERROR` 410 (what the real kube-apiserver sends; some servers in front
    /// of or beside one, an aggregated API or a proxy, answer the status).
    gone_as_status: bool,
    mode: Mode,
    log: Vec<Logged>,
    events: broadcast::Sender<WatchMsg>,
}

struct Ctx {
    slices: Mutex<Slices>,
    upstream: Option<kube::Client>,
}

/// The stand-in server (see the module documentation). Stopped on drop.
pub struct StandIn {
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    task: Option<tokio::task::JoinHandle<()>>,
    kubeconfig: PathBuf,
}

impl StandIn {
    /// Starts a stand-in on `ip` (a free port), inside the current tokio runtime, forwarding
    /// what it does not serve to `upstream` (`None`: those requests get 404). Writes a
    /// kubeconfig for it into `dir`.
    pub async fn start(ip: &str, upstream: Option<kube::Client>, dir: &Path) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("bind {ip}:0"))?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1024);
        let ctx = Arc::new(Ctx {
            slices: Mutex::new(Slices {
                objects: BTreeMap::new(),
                rv: 100,
                history: Vec::new(),
                compacted: 0,
                gone_as_status: false,
                mode: Mode::Normal,
                log: Vec::new(),
                events,
            }),
            upstream,
        });
        let kubeconfig = dir.join(crate::unique_name("standin-kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    \
                 server: http://{addr}\nusers:\n- name: standin\n  user:\n    token: standin\n\
                 contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n\
                 current-context: standin\n"
            ),
        )?;
        let task = Some(tokio::spawn(serve(listener, ctx.clone())));
        Ok(Self {
            addr,
            ctx,
            task,
            kubeconfig,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig naming the stand-in (plain HTTP, a token it ignores).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slices> {
        self.ctx.slices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces an EndpointSlice: `ADDED` or `MODIFIED` to open watches.
    pub fn apply(&self, slice: &EndpointSlice) {
        let mut s = self.lock();
        let value = to_value(slice);
        let key = key_of(&value);
        let kind = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let value = s.bump(value);
        s.objects.insert(key, value.clone());
        s.record(kind, value);
    }

    /// Deletes an EndpointSlice: `DELETED` to open watches.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut s = self.lock();
        if let Some(old) = s.objects.remove(&(namespace.to_string(), name.to_string())) {
            let value = s.bump(old);
            s.record("DELETED", value);
        }
    }

    /// Changes an EndpointSlice without any event (as if etcd had compacted it away): only
    /// a relist can see it.
    pub fn apply_silently(&self, slice: &EndpointSlice) {
        let mut s = self.lock();
        let value = to_value(slice);
        let key = key_of(&value);
        let value = s.bump(value);
        s.objects.insert(key, value);
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to open watches; returns it.
    pub fn bookmark(&self) -> u64 {
        let s = self.lock();
        let line = json!({
            "type": "BOOKMARK",
            "object": {"kind": "EndpointSlice", "apiVersion": GROUP_VERSION,
                       "metadata": {"resourceVersion": s.rv.to_string()}}
        })
        .to_string();
        let _ = s.events.send(WatchMsg::Bookmark(line));
        s.rv
    }

    /// Compacts the history: open watches get an `ERROR` 410 and end; a watch from any
    /// resourceVersion before the current one gets 410 too. The watcher must relist (a list
    /// returns the current resourceVersion, from which a watch is valid again).
    pub fn expire(&self) {
        let _ = self.compact();
        let _ = self.lock().events.send(WatchMsg::Gone);
    }

    /// Compacts the history without telling the open watches: a watch from any
    /// resourceVersion before the current one gets 410 when it starts. Returns the current
    /// resourceVersion.
    pub fn compact(&self) -> u64 {
        let mut s = self.lock();
        s.compacted = s.rv;
        s.history.clear();
        s.rv
    }

    /// From now on a watch from a compacted resourceVersion is refused with an HTTP 410
    /// `Status` (`true`) or, as the real server does, gets an `ERROR` 410 event (`false`).
    pub fn refuse_compacted_watches_with_status(&self, on: bool) {
        self.lock().gone_as_status = on;
    }

    /// Ends every open watch stream cleanly, after the lines already sent to it (as a server
    /// does at a watch's `timeoutSeconds`): the client starts a new watch from the last
    /// resourceVersion it saw, a bookmark's included.
    pub fn end_watches(&self) {
        let _ = self.lock().events.send(WatchMsg::End);
    }

    /// Writes a line that is not JSON into every open watch stream.
    pub fn inject_garbage_line(&self) {
        let s = self.lock();
        let _ = s
            .events
            .send(WatchMsg::Garbage("}{ this is not a watch event".into()));
    }

    /// How new requests are answered from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// The requests answered so far (discovery, lists, watches; not the proxied ones).
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// The server disappears: the listener and every connection are closed (open watches
    /// end without a final event). Idempotent.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Waits (bounded) until the stopped server's task is gone, then listens again on the
    /// same address.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.task = Some(tokio::spawn(serve(listener, self.ctx.clone())));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.expect("tried")).with_context(|| format!("rebind {}", self.addr))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

impl Slices {
    /// Next resourceVersion, written into the object.
    fn bump(&mut self, mut value: Value) -> Value {
        self.rv += 1;
        value["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        value
    }

    fn record(&mut self, kind: &str, object: Value) {
        let line = json!({"type": kind, "object": object}).to_string();
        self.history.push((self.rv, line.clone()));
        let _ = self.events.send(WatchMsg::Event { rv: self.rv, line });
    }
}

fn to_value(slice: &EndpointSlice) -> Value {
    let mut value = serde_json::to_value(slice).expect("an EndpointSlice serialises");
    value["kind"] = json!("EndpointSlice");
    value["apiVersion"] = json!(GROUP_VERSION);
    value
}

fn key_of(value: &Value) -> (String, String) {
    let meta = &value["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_string(),
        meta["name"].as_str().unwrap_or("").to_string(),
    )
}

/// Accepts connections until aborted; aborting drops the `JoinSet`, which ends every
/// connection (and so every open watch) with it.
async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let ctx = ctx.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, ctx.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(body.into())
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_string())
    })
}

async fn handle(req: Request<Incoming>, ctx: Arc<Ctx>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mode = ctx.slices.lock().unwrap_or_else(|e| e.into_inner()).mode;
    let ours = path == DISCOVERY_PATH || path.starts_with(DISCOVERY_PATH);
    match mode {
        Mode::Normal => {}
        Mode::Garbage | Mode::Status500 => {
            if ours {
                log(&ctx, &req, &path, mode);
            }
            return Ok(match mode {
                Mode::Garbage => full(StatusCode::OK, "<html>not JSON {{{ \u{0}"),
                _ => full(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    status_body(500, "InternalError", "the stand-in was told to fail"),
                ),
            });
        }
    }
    if !ours {
        return Ok(proxy(req, &ctx).await);
    }
    log(&ctx, &req, &path, mode);
    if path == DISCOVERY_PATH {
        let body = json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION,
            "resources": [{"name": "endpointslices", "singularName": "", "namespaced": true,
                           "kind": "EndpointSlice",
                           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                           "shortNames": []}]
        });
        return Ok(full(StatusCode::OK, body.to_string()));
    }
    if path != SLICES_PATH {
        return Ok(full(
            StatusCode::NOT_FOUND,
            status_body(
                404,
                "NotFound",
                "the stand-in serves only the cluster-wide list",
            ),
        ));
    }
    if query_param(&req, "watch").is_some_and(|w| w == "true" || w == "1") {
        Ok(watch(&req, &ctx))
    } else {
        Ok(list(&ctx))
    }
}

fn log(ctx: &Ctx, req: &Request<Incoming>, path: &str, mode: Mode) {
    let kind = if path == DISCOVERY_PATH {
        "discovery"
    } else if query_param(req, "watch").is_some() {
        "watch"
    } else {
        "list"
    };
    let resource_version = query_param(req, "resourceVersion").unwrap_or_default();
    ctx.slices
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .log
        .push(Logged {
            kind,
            resource_version,
            mode,
        });
}

fn list(ctx: &Ctx) -> Response<Body> {
    let s = ctx.slices.lock().unwrap_or_else(|e| e.into_inner());
    let body = json!({
        "kind": "EndpointSliceList", "apiVersion": GROUP_VERSION,
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": s.objects.values().collect::<Vec<_>>(),
    });
    full(StatusCode::OK, body.to_string())
}

fn gone_line(from: u64, current: u64) -> String {
    json!({
        "type": "ERROR",
        "object": serde_json::from_str::<Value>(&status_body(
            410,
            "Expired",
            &format!("too old resource version: {from} ({current})"),
        ))
        .expect("valid JSON"),
    })
    .to_string()
}

fn watch(req: &Request<Incoming>, ctx: &Ctx) -> Response<Body> {
    let from: u64 = query_param(req, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query_param(req, "allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query_param(req, "timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (backlog, mut events, gone) = {
        let s = ctx.slices.lock().unwrap_or_else(|e| e.into_inner());
        let events = s.events.subscribe();
        if from < s.compacted && s.gone_as_status {
            return full(
                StatusCode::GONE,
                status_body(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({})", s.rv),
                ),
            );
        }
        if from < s.compacted {
            (vec![gone_line(from, s.rv)], events, true)
        } else {
            let backlog = s
                .history
                .iter()
                .filter(|(rv, _)| *rv > from)
                .map(|(_, line)| line.clone())
                .collect();
            (backlog, events, false)
        }
    };
    tokio::spawn(async move {
        let send = |line: String| {
            let tx = tx.clone();
            async move { tx.send(Bytes::from(line + "\n")).await.is_ok() }
        };
        for line in backlog {
            if !send(line).await {
                return;
            }
        }
        if gone {
            return;
        }
        let forward = async {
            loop {
                let line = match events.recv().await {
                    // Already in the backlog.
                    Ok(WatchMsg::Event { rv, .. }) if rv <= from => continue,
                    Ok(WatchMsg::Event { line, .. }) => line,
                    Ok(WatchMsg::Bookmark(line)) if bookmarks => line,
                    Ok(WatchMsg::Bookmark(_)) => continue,
                    Ok(WatchMsg::Garbage(line)) => line,
                    Ok(WatchMsg::Gone) => {
                        let _ = send(gone_line(from, from)).await;
                        return;
                    }
                    Ok(WatchMsg::End) => return,
                    // A watcher too slow for the buffer is cut, as a real server does.
                    Err(_) => return,
                };
                if !send(line).await {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, forward).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, BoxError>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("a valid response")
}

/// Forwards a request to the real API server and streams its answer back.
async fn proxy(req: Request<Incoming>, ctx: &Ctx) -> Response<Body> {
    let Some(client) = ctx.upstream.clone() else {
        return full(
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", "the stand-in has no upstream"),
        );
    };
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                status_body(400, "BadRequest", &e.to_string()),
            )
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let mut builder = http::Request::builder().method(parts.method).uri(path);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::AUTHORIZATION {
            builder = builder.header(name, value);
        }
    }
    let request = match builder.body(kube::client::Body::from(body.to_vec())) {
        Ok(r) => r,
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                status_body(400, "BadRequest", &e.to_string()),
            )
        }
    };
    match client.send(request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            // Hop-by-hop: this server frames the body itself.
            parts.headers.remove(http::header::TRANSFER_ENCODING);
            parts.headers.remove(http::header::CONNECTION);
            Response::from_parts(
                parts,
                body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
            )
        }
        Err(e) => full(
            StatusCode::BAD_GATEWAY,
            status_body(502, "BadGateway", &format!("upstream: {e}")),
        ),
    }
}

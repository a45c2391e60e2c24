//! `enforcer admission serve`: the admission webhook that ties a pod's tenant to its
//! namespace (issue 9, point 5).
//!
//! ```text
//! POST /mutate     AdmissionReview v1 of a Pod  ->  allowed, with a JSON patch adding the
//!                  namespace's tenant metadata as pod labels where missing, NET_RAW to
//!                  the dropped capabilities of its containers, and, where its ingress is
//!                  checked, net.ipv4.tcp_syncookies=0 to its sysctls
//! POST /validate   AdmissionReview v1 of a Pod  ->  allowed, or denied with every reason
//! GET  /healthz    200 "ok" (readiness probe)
//! ```
//!
//! In every namespace the webhooks are called for, a pod must hold nothing the enforcer
//! cannot contain: no privileged container, no capability beyond the Pod Security
//! Standards' `baseline` set, `NET_RAW` dropped, none of the node's namespaces, no
//! `hostPath` volume, no `hostPort`, no probe sent elsewhere, and no SYN cookies where its
//! ingress is checked ([`confine`]).
//!
//! The tenant metadata keys are [`labels::TENANT_METADATA`] (tenant, region, data residency,
//! retention tier), read from the Namespace's labels or annotations of those names
//! ([`Tenancy`]); a namespace labelled [`labels::ENFORCED`]` = "true"` requires a tenant.
//! Decisions are pure functions ([`decide`]); the server only parses, looks up and answers.
//!
//! **Namespaces are read with one GET per review** (bounded by [`NAMESPACE_TIMEOUT`]), not
//! from a reflector's cache. Admission is where a tenant is bound to a pod for the pod's whole
//! life, so it must see the namespace as it is now: a cache lags behind a namespace created
//! or relabelled a moment before its first pod (the usual order in a deploy script), and a pod
//! admitted on that stale view would carry the old tenant. A GET costs one round trip to the
//! API server per pod creation or update, which the API server's own admission chain already
//! pays several times over, and needs only the `get` verb on namespaces. When the API server
//! cannot answer in time, the review fails with a 500 and the webhook configuration's
//! `failurePolicy` decides (`Fail` in `deploy/`).
//!
//! Bad input never reaches a decision: a body over [`MAX_BODY_BYTES`], a body that is not an
//! `admission.k8s.io/v1` AdmissionReview, or a review without a request is answered 400 with
//! the reason; a review of anything but a v1 Pod is denied, naming what was sent. Bodies
//! over [`SMALL_BODY_BYTES`] share [`LARGE_BODIES_BYTES`] while they are read and reviewed
//! (a 503 after [`BUDGET_WAIT`] when the rest is taken), so that no set of clients can make
//! the webhook buffer more than that at once. What parsing a body costs is counted before it
//! is parsed ([`cost`]): every review holds its share of [`cost::PARSE_BUDGET_BYTES`] while
//! it is parsed and decided (a 503 likewise), and a body whose review may take more than all
//! of it is answered 413.

pub mod confine;
pub mod cost;
pub mod decide;
pub mod review;
pub mod tenancy;
#[cfg(test)]
mod tests;
pub mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
#[cfg(doc)]
use enforcer_policy::cluster::labels;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_rustls::TlsAcceptor;

pub use confine::Confinement;
pub use review::{review, Namespaces, Reply, Route};
pub use tenancy::Tenancy;

use crate::pdp::listen::{accept_until, serve_http, Peer};

/// The path of the mutating webhook.
pub const MUTATE_PATH: &str = "/mutate";
/// The path of the validating webhook.
pub const VALIDATE_PATH: &str = "/validate";
/// The readiness path.
pub const HEALTH_PATH: &str = "/healthz";

/// The largest AdmissionReview accepted, in bytes. A review of an update carries the pod
/// twice (object and oldObject), and etcd stores objects of at most 1.5 MiB by default:
/// 4 MiB holds both with room for the envelope, and bounds what a client can make us buffer.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// How long the body of a request may take to arrive once its head has.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a namespace GET may take. The API server gives a webhook 10 s by default
/// (`timeoutSeconds`, 5 s in `deploy/`); this leaves it time to receive our answer.
pub const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(4);

/// Connections served at once; the API server keeps a few open per replica.
const MAX_CONNECTIONS: usize = 256;

/// Bodies up to this size are read at once. A pod's AdmissionReview is tens of KiB, so the
/// usual review does not wait for [`LARGE_BODIES_BYTES`] (an update's, with the pod twice,
/// may).
pub const SMALL_BODY_BYTES: u64 = 64 << 10;

/// The bytes of larger bodies (declared by `Content-Length`; [`MAX_BODY_BYTES`] without one)
/// read or reviewed at once, across connections. Without it, the [`MAX_CONNECTIONS`] a
/// client may hold (any pod can reach the webhook's port) could each make the webhook buffer
/// [`MAX_BODY_BYTES`]. Small bodies are bounded by the connections: 16 MiB. Bodies are held
/// twice while collected, then once, charged to [`cost::PARSE_BUDGET_BYTES`]: what requests
/// can make the webhook hold is 64 MiB of bodies being read, 40 MiB of reviews, 32 MiB of
/// unread answers ([`review::MAX_ANSWER_BYTES`] each), and the connections' buffers (its
/// limit in `deploy/` is 192 Mi).
pub const LARGE_BODIES_BYTES: u64 = 16 << 20;

/// How long a large body waits for its share of [`LARGE_BODIES_BYTES`] before a 503 (the
/// API server's webhook call times out after 5-10 s, and the `failurePolicy` decides).
pub const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// [`LARGE_BODIES_BYTES`] is counted in KiB, a semaphore permit each.
const BUDGET_UNIT: u64 = 1 << 10;

/// `enforcer admission serve --listen ADDR --tls-cert PEM --tls-key PEM [--client-ca PEM]
/// [--kubeconfig F] [--ready-file F]`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (HTTPS only: the API server calls webhooks over TLS).
    pub listen: SocketAddr,
    /// PEM certificate chain, presented to the API server (its CA goes in the webhook
    /// configuration's `caBundle`).
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM CA certificates: when given, the reviews (`/mutate`, `/validate`) are answered only
    /// on a connection whose client presented a certificate one of them signed (the API
    /// server's, configured by its `--admission-control-config-file`), and refused with a 403
    /// before their body is read otherwise; `/healthz` stays open (kubelet probes present no
    /// certificate).
    pub client_ca: Option<PathBuf>,
    /// A kubeconfig file; without it the in-cluster service account (or `$KUBECONFIG`, or
    /// `~/.kube/config`: kube's inference order).
    pub kubeconfig: Option<PathBuf>,
    /// Written with the bound address (`127.0.0.1:8443\n`) once serving.
    pub ready_file: Option<PathBuf>,
    /// What a pod may hold beyond the rules ([`confine`]).
    pub confinement: Confinement,
}

/// The `enforcer admission` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve the mutating (`/mutate`) and validating (`/validate`) webhooks over HTTPS.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8443.
        #[arg(long)]
        listen: SocketAddr,
        /// PEM certificate chain (its CA is the webhook configuration's caBundle).
        #[arg(long)]
        tls_cert: PathBuf,
        /// PEM private key of the certificate.
        #[arg(long)]
        tls_key: PathBuf,
        /// PEM CA certificate(s) of the API server's webhook client certificate: reviews from
        /// a client without a certificate they signed are refused (403), so a pod that can
        /// reach the port cannot make the webhook read or review anything.
        #[arg(long, value_name = "PEM")]
        client_ca: Option<PathBuf>,
        /// Kubeconfig file (default: in-cluster service account, $KUBECONFIG, ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Written with the bound address once serving (useful with port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// A RuntimeClass whose handler runs containers on the node's kernel (runc, crun):
        /// a pod may name it (repeatable). Pods naming any other are refused.
        #[arg(long = "runtime-class", value_name = "NAME")]
        runtime_classes: Vec<String>,
    },
}

/// Runs an `enforcer admission` subcommand to its end.
pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            client_ca,
            kubeconfig,
            ready_file,
            runtime_classes,
        } => {
            serve(ServeOptions {
                listen,
                tls_cert,
                tls_key,
                client_ca,
                kubeconfig,
                ready_file,
                confinement: Confinement {
                    runtime_classes: runtime_classes.into_iter().collect(),
                },
            })
            .await
        }
    }
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
pub async fn serve_until(
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let tls = TlsAcceptor::from(crate::pdp::tls::server_config(
        &options.tls_cert,
        &options.tls_key,
        options.client_ca.as_deref(),
    )?);
    let certificate_required = options.client_ca.is_some();
    let client = kube_client(options.kubeconfig.as_ref()).await?;
    let namespaces = Arc::new(ApiNamespaces {
        api: Api::all(client),
    });
    let confinement = Arc::new(options.confinement.clone());
    let budget = Arc::new(Budgets::new());
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("listening on {}", options.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "admission webhook serving https://{addr}{MUTATE_PATH} and {VALIDATE_PATH}");
    if let Some(ready) = &options.ready_file {
        crate::fs::replace_file(ready, format!("{addr}\n").as_bytes())?;
    }
    let served = accept_until(
        &listener,
        Some(tls),
        MAX_CONNECTIONS,
        shutdown,
        move |stream, peer: Peer| {
            let (namespaces, confinement, budget) =
                (namespaces.clone(), confinement.clone(), budget.clone());
            let refused = certificate_required && !peer.certified;
            serve_http(stream, peer.addr, move |request| {
                let (namespaces, confinement, budget) =
                    (namespaces.clone(), confinement.clone(), budget.clone());
                async move {
                    if !refused {
                        return respond(request, &*namespaces, &confinement, &budget).await;
                    }
                    // One request per connection without a certificate, the health check's
                    // too: a client sending one every few seconds kept its slot for the
                    // connection's whole lifetime (red-team review 35).
                    let mut response = if request.uri().path() == HEALTH_PATH {
                        respond(request, &*namespaces, &confinement, &budget).await
                    } else {
                        uncertified(peer.addr)
                    };
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    response
                }
            })
        },
    )
    .await;
    tracing::info!("admission webhook stopping");
    served
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration: not in a cluster, no $KUBECONFIG or \
             ~/.kube/config; give --kubeconfig FILE",
        )?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Namespaces from the API server: one GET each, bounded by [`NAMESPACE_TIMEOUT`].
struct ApiNamespaces {
    api: Api<Namespace>,
}

impl Namespaces for ApiNamespaces {
    async fn get(&self, name: &str) -> Result<Option<Namespace>, String> {
        match tokio::time::timeout(NAMESPACE_TIMEOUT, self.api.get_opt(name)).await {
            Ok(Ok(found)) => Ok(found),
            // The whole chain: "client error (Connect): tcp connect error: Connection refused".
            Ok(Err(error)) => Err(format!("{:#}", anyhow::Error::from(error))),
            Err(_) => Err(format!("no answer within {NAMESPACE_TIMEOUT:?}")),
        }
    }
}

fn reply(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    response
}

/// The HTTP layer: route, method, size and time bounds of the body; then [`review`].
/// How often a refused request without a client certificate is logged at `warn`, at most
/// (the others at `debug`): an API server that presents none (a kubeconfig user that does
/// not match, a control-plane upgrade that lost the flag, an expired certificate) has every
/// pod refused, and that must show in the log.
const UNCERTIFIED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Requests refused for want of a client certificate since the last `warn`.
static UNCERTIFIED_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// When the last `warn` of [`UNCERTIFIED_REFUSED`] was written.
static UNCERTIFIED_WARNED: std::sync::Mutex<Option<std::time::Instant>> =
    std::sync::Mutex::new(None);

/// The answer to a review (or any path but the health check) on a connection whose client,
/// at `peer`, presented no certificate while one is required: 403, before the body is read
/// (the caller closes the connection after it).
fn uncertified(peer: SocketAddr) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let refused = UNCERTIFIED_REFUSED.fetch_add(1, Relaxed) + 1;
    let due = UNCERTIFIED_WARNED
        .lock()
        .map(|mut last| {
            let due = last.is_none_or(|at| at.elapsed() >= UNCERTIFIED_WARN_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        })
        .unwrap_or(false);
    if due {
        UNCERTIFIED_REFUSED.fetch_sub(refused, Relaxed);
        tracing::warn!(
            %peer,
            refused,
            "requests without the API server's client certificate refused (--client-ca): if \
             the API server is among them, every review fails (check its \
             --admission-control-config-file and the certificate's expiry)"
        );
    } else {
        tracing::debug!(%peer, "a request without a client certificate refused");
    }
    reply(Reply::text(
        403,
        "this webhook answers only the Kubernetes API server: present a client certificate \
         signed by a CA of its --client-ca (the API server's webhook client certificate, from \
         its --admission-control-config-file)",
    ))
}

async fn respond(
    request: Request<Incoming>,
    namespaces: &impl Namespaces,
    confinement: &Confinement,
    budget: &Budgets,
) -> Response<Full<Bytes>> {
    let route = match request.uri().path() {
        MUTATE_PATH => Route::Mutate,
        VALIDATE_PATH => Route::Validate,
        HEALTH_PATH if request.method() == Method::GET => return reply(Reply::text(200, "ok")),
        path => {
            return reply(Reply::text(
                404,
                format!(
                    "no such path {:?}: the webhook serves POST {MUTATE_PATH} and POST \
                     {VALIDATE_PATH}",
                    text::cut(path, text::NAME_BYTES)
                ),
            ))
        }
    };
    if request.method() != Method::POST {
        let mut response = reply(Reply::text(405, "only POST"));
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return reply(too_large());
    }
    // Held until the answer is made: the parsed review is as large as the body, or larger.
    let _share = match large_body_share(&budget.large_bodies, declared).await {
        Ok(share) => share,
        Err(busy) => return reply(busy),
    };
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return reply(too_large())
        }
        Ok(Err(error)) => {
            return reply(Reply::text(
                400,
                format!("reading the request body: {error}"),
            ))
        }
        Err(_) => {
            return reply(Reply::text(
                408,
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
    };
    let _parse_share = match parse_share(&budget.parsing, &body).await {
        Ok(share) => share,
        Err(refused) => return reply(refused),
    };
    reply(review(route, &body, namespaces, confinement).await)
}

/// What requests may make the webhook hold at once, in [`BUDGET_UNIT`]s.
struct Budgets {
    /// [`LARGE_BODIES_BYTES`]: large bodies while they are read and reviewed.
    large_bodies: Semaphore,
    /// [`cost::PARSE_BUDGET_BYTES`]: every review while it is parsed and decided.
    parsing: Semaphore,
}

impl Budgets {
    fn new() -> Self {
        let permits = |bytes: u64| Semaphore::new((bytes / BUDGET_UNIT) as usize);
        Self {
            large_bodies: permits(LARGE_BODIES_BYTES),
            parsing: permits(cost::PARSE_BUDGET_BYTES),
        }
    }
}

/// How often a request waiting for its share looks again.
const BUDGET_POLL: Duration = Duration::from_millis(5);

/// `bytes` of `budget` (rounded up to [`BUDGET_UNIT`]s; at most the whole budget, which
/// callers check), waiting at most [`BUDGET_WAIT`]; `None` when it is not free by then.
///
/// Taken whenever it is free, not in turn: a semaphore's queue would make a pod's small
/// review wait behind a large body waiting for more than is free.
async fn share(budget: &Semaphore, bytes: u64) -> Option<SemaphorePermit<'_>> {
    // Callers ask at most 40 MiB / 1 KiB = 40,960 permits: fits a u32.
    let permits = bytes.div_ceil(BUDGET_UNIT) as u32;
    let deadline = tokio::time::Instant::now() + BUDGET_WAIT;
    loop {
        // The semaphore is never closed; a closed one is as busy as a full one.
        if let Ok(share) = budget.try_acquire_many(permits) {
            return Some(share);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(BUDGET_POLL).await;
    }
}

/// The share of [`cost::PARSE_BUDGET_BYTES`] reviewing `body` needs ([`cost::charge`]): 400
/// when it is not JSON, 413 when it needs more than the whole budget, 503 when the share is
/// not free within [`BUDGET_WAIT`].
async fn parse_share<'a>(budget: &'a Semaphore, body: &[u8]) -> Result<SemaphorePermit<'a>, Reply> {
    let census = cost::census(body).map_err(|error| {
        Reply::text(
            400,
            format!(
                "the request body is not an AdmissionReview: {}",
                text::shown(&error, 1 << 10)
            ),
        )
    })?;
    let (values, charge) = (census.values, cost::charge(census, body.len() as u64));
    if charge > cost::PARSE_BUDGET_BYTES {
        return Err(Reply::text(
            413,
            format!(
                "the AdmissionReview holds {values} JSON values (counting object keys) in {} \
                 bytes: reviewing it may take {} MiB, more than the {} MiB this webhook's \
                 reviews may take at once",
                body.len(),
                charge.div_ceil(1 << 20),
                cost::PARSE_BUDGET_BYTES >> 20
            ),
        ));
    }
    share(budget, charge).await.ok_or_else(|| {
        Reply::text(
            503,
            format!(
                "the webhook is reviewing other requests that hold the {} MiB its reviews \
                     may take at once; retry",
                cost::PARSE_BUDGET_BYTES >> 20
            ),
        )
    })
}

/// The share of [`LARGE_BODIES_BYTES`] a body of `declared` bytes (`None`: not declared, so
/// [`MAX_BODY_BYTES`]) needs; `None` for a small one. A 503 when it is not free within
/// [`BUDGET_WAIT`].
async fn large_body_share(
    budget: &Semaphore,
    declared: Option<u64>,
) -> Result<Option<SemaphorePermit<'_>>, Reply> {
    let size = declared.unwrap_or(MAX_BODY_BYTES as u64);
    if size <= SMALL_BODY_BYTES {
        return Ok(None);
    }
    match share(budget, size).await {
        Some(share) => Ok(Some(share)),
        None => Err(Reply::text(
            503,
            format!(
                "the webhook is reading or reviewing {} MiB of other requests over {} KiB, \
                 the most it takes at once; retry",
                LARGE_BODIES_BYTES >> 20,
                SMALL_BODY_BYTES >> 10
            ),
        )),
    }
}

fn too_large() -> Reply {
    Reply::text(
        413,
        format!(
            "the AdmissionReview is larger than {} MiB, the most this webhook reads",
            MAX_BODY_BYTES >> 20
        ),
    )
}

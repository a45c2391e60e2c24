//! Kubernetes as a source of workloads: Pods, Nodes, Namespaces, Services and their backends, kept
//! by kube-rs watchers in reflector stores and turned into a [`ClusterState`] by a pure
//! function ([`cluster_state`]).
//!
//! - Every pod of the cluster is watched (the IP cache needs every pod's addresses); the
//!   pods of this node are those whose `spec.nodeName` is [`KubeOptions::node_name`] (the
//!   policy crate selects them).
//! - Backends come from EndpointSlices (discovery.k8s.io/v1) where the server serves them,
//!   else from core/v1 Endpoints (Kubernetes 1.20 and older): the source asks the server's
//!   API discovery once, at start.
//! - The watchers recover by themselves: a broken watch resumes from its last
//!   resourceVersion, an expired one (410 Gone) relists, and a reflector store swaps in a
//!   relisted set only once it is complete, so a failing list never empties the state.
//! - Every change is published on [`KubeSource::state`], debounced by [`DEBOUNCE`], and
//!   written atomically to `state_dir/`[`STATE_FILE`]. At start that file is loaded, so an
//!   agent restarted while the API server is unreachable enforces the last known state;
//!   [`KubeSource::status`] says whether the state is live or persisted and how stale.
//! - With no state at all (never listed, nothing persisted), [`KubeSource::state`] stays
//!   `None`: the agent treats pods as unknown subjects (fail closed).
//!
//! Errors (unreachable server, 500s, garbage answers) are logged once per change, not per
//! retry; the watchers retry with a capped exponential backoff forever.

mod listwatch;
pub(crate) mod model;
mod proto;
pub(crate) mod wire;

pub use proto::Encoding;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::admission::confine;
use anyhow::{bail, Context, Result};
use enforcer_policy::cluster::ClusterState;
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointSubset, Endpoints, LoadBalancerIngress, LoadBalancerStatus, Namespace,
    Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Service, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use model::{
    cluster_state, cluster_state_with, dns_subdomain_error, identity_label_problem,
    label_key_error, label_value_error, system_namespace_problem, Backends, Memo, Rules, Snapshot,
    NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL,
};

/// The file in [`KubeOptions::state_dir`] holding the last state (JSON, [`PersistedState`]).
pub const STATE_FILE: &str = "kubernetes-state.json";
/// How long the source waits after a change for more before it publishes: a burst of pod
/// events (a Deployment scaled up) becomes one state.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// The least time between two writes of [`STATE_FILE`]: a write serialises every pod of
/// the cluster, and a burst of changes wrote one state after the other, taking CPU from
/// the agent's reloads. A restart sees a state at most this much older than
/// otherwise (and `status` never understates its age: see [`PersistedState::last_sync`]).
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// The server ends each watch after this many seconds and the watcher starts another from
/// the same resourceVersion: a server that vanished without closing the connection is
/// noticed within this bound.
const WATCH_TIMEOUT_SECS: u32 = 60;
/// Retry delays of a failing list or watch: doubling from the first to the last, jittered,
/// back to the first after a calm period (no retry for that long).
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
const RETRY_CALM: Duration = Duration::from_secs(60);
/// The API group/version of EndpointSlices (GA in Kubernetes 1.21).
const ENDPOINT_SLICES_API: &str = "discovery.k8s.io/v1";
/// How often the addresses of the agent's own network namespace are read again (an address
/// added to a node is `host` within this time, plus an apply).
pub const LOCAL_ADDRESSES_EVERY: Duration = Duration::from_secs(2);

/// How to run the source.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// A kubeconfig file; `None` infers the configuration (in-cluster service account, else
    /// `$KUBECONFIG` or `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of the local pods).
    pub node_name: String,
    /// Pod label keys that split identities besides `purpose` and `ring` (valid label keys;
    /// not `namespace`, `service_account` or tenant metadata).
    pub identity_labels: Vec<String>,
    /// The SPIFFE trust domain (`cluster.local`).
    pub trust_domain: String,
    /// Namespaces whose pods need no tenant (see [`Rules::system_namespaces`]).
    pub system_namespaces: Vec<String>,
    /// Where the last state is persisted ([`STATE_FILE`]); created when missing.
    pub state_dir: PathBuf,
}

/// What `enforcer status` shows about the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeStatus {
    /// Every watch is established and has listed its resource: the state is current.
    pub connected: bool,
    /// RFC 3339: the last successful list or watch event (before the first one since
    /// start, the one recorded in the persisted state). `None` when there was none.
    pub last_sync: Option<String>,
    /// How old the state in force may be: 0 while connected (a watch delivers every change
    /// as it happens), otherwise seconds since `last_sync`. `None` without a state.
    pub staleness_seconds: Option<u64>,
    /// What is failing now (one line per failing part), `None` when nothing is.
    pub last_error: Option<String>,
    /// The state in force was loaded from `state_dir` (no live state since start).
    pub persisted: bool,
    /// There is a state at all (live or persisted); without one pods are unknown subjects.
    pub has_state: bool,
    /// Where backends come from: `discovery.k8s.io/v1` (EndpointSlices) or `v1`
    /// (Endpoints); `None` until API discovery has answered.
    pub endpoints_api: Option<String>,
    /// Counts in the state in force.
    pub identities: usize,
    pub pods: usize,
    /// Pods whose `spec.nodeName` is this node.
    pub local_pods: usize,
    pub services: usize,
    pub problems: usize,
}

/// The file format of [`STATE_FILE`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedState {
    /// Format version (1).
    pub version: u32,
    /// RFC 3339: the last successful list or watch event when the state last changed (the
    /// file is rewritten on changes only, so a restarted source may overstate staleness,
    /// never understate it).
    pub last_sync: String,
    /// The identity label keys the state was built with.
    pub identity_labels: Vec<String>,
    pub state: ClusterState,
}

const PERSISTED_VERSION: u32 = 1;

/// A running source. Dropping it stops every watch.
pub struct KubeSource {
    state: watch::Receiver<Option<Arc<ClusterState>>>,
    shared: Arc<Shared>,
    node_name: String,
    task: tokio::task::AbortHandle,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeSource {
    /// The state in force: `None` until the first complete list (or a persisted state was
    /// loaded), then every change, debounced by [`DEBOUNCE`].
    pub fn state(&self) -> watch::Receiver<Option<Arc<ClusterState>>> {
        self.state.clone()
    }

    /// Connection, freshness and origin of the state in force.
    pub fn status(&self) -> KubeStatus {
        let inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.borrow().clone();
        let connected = inner.connected();
        let last_sync = inner.last_sync.or(inner.persisted_sync);
        let staleness_seconds = state.as_ref().map(|_| {
            if connected && !inner.persisted {
                0
            } else {
                last_sync
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map_or(0, |d| d.as_secs())
            }
        });
        let errors: Vec<String> = inner
            .parts
            .iter()
            .filter_map(|(name, h)| {
                let error = if h.ok {
                    h.refused.as_ref()
                } else {
                    h.error.as_ref()
                };
                error.map(|e| format!("{name}: {e}"))
            })
            .chain(inner.persist_error.iter().map(|e| format!("persist: {e}")))
            .collect();
        let (identities, pods, local_pods, services, problems) = match &state {
            Some(s) => {
                let pods = s.identities.iter().flat_map(|i| &i.pods);
                (
                    s.identities.len(),
                    pods.clone().count(),
                    pods.filter(|p| p.node.as_deref() == Some(self.node_name.as_str()))
                        .count(),
                    s.services.len(),
                    s.problems.len(),
                )
            }
            None => (0, 0, 0, 0, 0),
        };
        KubeStatus {
            connected,
            last_sync: last_sync.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            staleness_seconds,
            last_error: (!errors.is_empty()).then(|| errors.join("; ")),
            persisted: inner.persisted,
            has_state: state.is_some(),
            endpoints_api: inner.endpoints_api.map(str::to_string),
            identities,
            pods,
            local_pods,
            services,
            problems,
        }
    }
}

/// What another user who could change the configuration could do.
const KUBECONFIG_HARM: &str =
    "point the agent at an API server of their choosing, which names every pod's identity";

/// The kubeconfig at `path`, read by kube (which makes the paths in it absolute) once it
/// and every file it names passed [`crate::fs::read_trusted`]'s rule: no other user may
/// change the CA that picks the API server, nor read or change the client key or token file
/// (the agent's credentials: [`crate::fs::read_secret`]'s rule). An exec credential plugin
/// runs as the agent's user: it must be named by a path (not looked up in `PATH`) to a
/// binary no other user can change. Checked, then read by path: nobody else can change a
/// file that passed in between.
///
/// Errors: a file is missing or unreadable, fails its rule, or the kubeconfig is invalid.
fn trusted_kubeconfig(path: &Path) -> Result<kube::config::Kubeconfig> {
    crate::fs::read_trusted(path, KUBECONFIG_HARM)?;
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let named = |file: &str| Path::new(file).to_path_buf();
    for cluster in kubeconfig
        .clusters
        .iter()
        .filter_map(|c| c.cluster.as_ref())
    {
        if let Some(ca) = &cluster.certificate_authority {
            crate::fs::read_trusted(&named(ca), KUBECONFIG_HARM)
                .with_context(|| format!("the certificate-authority of {}", path.display()))?;
        }
    }
    for (name, user) in kubeconfig
        .auth_infos
        .iter()
        .filter_map(|a| Some((&a.name, a.auth_info.as_ref()?)))
    {
        if let Some(cert) = &user.client_certificate {
            crate::fs::read_trusted(&named(cert), "impersonate another client")
                .with_context(|| format!("the client-certificate of user {name}"))?;
        }
        for secret in [&user.client_key, &user.token_file].into_iter().flatten() {
            crate::fs::read_secret(&named(secret), "act as the agent towards the API server")
                .with_context(|| format!("a credential of user {name} in {}", path.display()))?;
        }
        if let Some(command) = user.exec.as_ref().and_then(|e| e.command.as_ref()) {
            if !command.contains('/') {
                bail!(
                    "{}: user {name}'s exec credential plugin `{command}` would be looked up \
                     in PATH and run as the agent's user; name it by its absolute path",
                    path.display()
                );
            }
            crate::fs::check_trusted(&named(command), "run code as the agent's user")
                .with_context(|| format!("user {name}'s exec credential plugin"))?;
        }
    }
    Ok(kubeconfig)
}

/// What `kube::Config::infer` will read, checked first: the kubeconfig files of
/// `$KUBECONFIG` (or `~/.kube/config`) by [`trusted_kubeconfig`]'s rule, else, in a pod,
/// the service account's token and CA by [`crate::fs::read_trusted`]'s (a projected volume
/// gives the token mode 0644).
fn check_inferred_configuration() -> Result<()> {
    let files: Vec<PathBuf> = match std::env::var_os("KUBECONFIG") {
        Some(value) => std::env::split_paths(&value)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        None => std::env::home_dir()
            .map(|home| home.join(".kube/config"))
            .filter(|p| p.exists())
            .into_iter()
            .collect(),
    };
    if !files.is_empty() {
        for file in &files {
            trusted_kubeconfig(file)?;
        }
        return Ok(());
    }
    let account = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && account.exists() {
        for file in ["token", "ca.crt"] {
            crate::fs::read_trusted(&account.join(file), KUBECONFIG_HARM)?;
        }
    }
    Ok(())
}

/// Starts the source: loads the persisted state (if any), then watches the API server in
/// the background of the current tokio runtime. Fails only on bad configuration (an
/// invalid identity label key, an unreadable kubeconfig, a `state_dir` that cannot be
/// created); an unreachable API server is retried forever and shown in
/// [`KubeSource::status`].
pub async fn spawn(options: KubeOptions) -> Result<KubeSource> {
    for key in &options.identity_labels {
        if let Some(problem) = identity_label_problem(key) {
            bail!("{problem}");
        }
    }
    for name in &options.system_namespaces {
        if let Some(problem) = system_namespace_problem(name) {
            bail!("--system-namespace: {problem}");
        }
    }
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("creating state directory {}", options.state_dir.display()))?;
    let state_file = options.state_dir.join(STATE_FILE);
    let persisted = load_persisted(&state_file, &options);

    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = trusted_kubeconfig(path)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => {
            check_inferred_configuration()?;
            kube::Config::infer().await.context(
                "no Kubernetes configuration: not in a pod (no service account), no $KUBECONFIG \
                 and no ~/.kube/config; pass --kubeconfig",
            )?
        }
    };
    let shared = Arc::new(Shared::default());
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&ObserveWatches(shared.clone()))
        .build();
    let initial = match persisted {
        Some(p) => {
            let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.persisted = true;
            inner.persisted_sync = humantime::parse_rfc3339(&p.last_sync).ok();
            info!(
                file = %state_file.display(),
                last_sync = %p.last_sync,
                identities = p.state.identities.len(),
                "kubernetes: enforcing the persisted state until the API server answers"
            );
            Some(Arc::new(p.state))
        }
        None => None,
    };
    let (tx, rx) = watch::channel(initial);
    let rules = Rules {
        identity_labels: options.identity_labels.clone(),
        trust_domain: options.trust_domain.clone(),
        system_namespaces: options.system_namespaces.clone(),
    };
    let task = tokio::spawn(run(
        client,
        rules,
        options.node_name.clone(),
        state_file,
        shared.clone(),
        tx,
    ));
    Ok(KubeSource {
        state: rx,
        shared,
        node_name: options.node_name,
        task: task.abort_handle(),
    })
}

fn load_persisted(path: &Path, options: &KubeOptions) -> Option<PersistedState> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "kubernetes: cannot read the persisted state");
            return None;
        }
    };
    let persisted: PersistedState = match serde_json::from_str(&text) {
        Ok(p) => p,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "kubernetes: the persisted state is not valid: ignored");
            return None;
        }
    };
    if persisted.version != PERSISTED_VERSION {
        warn!(file = %path.display(), version = persisted.version, "kubernetes: unknown persisted state version: ignored");
        return None;
    }
    if persisted.identity_labels != options.identity_labels
        || persisted.state.trust_domain != options.trust_domain
    {
        // Still better than nothing until the API server answers: the live state replaces it.
        warn!(
            file = %path.display(),
            "kubernetes: the persisted state was built with other identity labels or another \
             trust domain; enforcing it until the API server answers"
        );
    }
    Some(persisted)
}

/// Health of one part of the source (a watcher, or API discovery).
#[derive(Debug, Default)]
struct Health {
    /// The resource has been listed completely at least once.
    listed: bool,
    /// The last outcome was a success.
    ok: bool,
    /// The last error, logged once when it appeared; shown while `ok` is false, cleared
    /// (and the recovery logged) by the next event or established watch.
    error: Option<String>,
    /// An optional part the server refuses ([`OPTIONAL_PARTS`]): counted as listed (empty)
    /// so that the rest is published, and shown in `status` until it lists.
    refused: Option<String>,
}

/// Parts the source can do without: a server that refuses them (403, a ClusterRole from
/// before they were read; 404) leaves them empty instead of holding every state back.
/// Nodes only add addresses (pods' `hostIPs` still name the nodes).
const OPTIONAL_PARTS: [&str; 1] = ["nodes"];

/// API discovery and the five watchers (pods, nodes, namespaces, services, backends).
const PARTS: usize = 6;

#[derive(Debug, Default)]
struct Inner {
    /// "discovery", "pods", "nodes", "namespaces", "services", "endpointslices" /
    /// "endpoints".
    parts: Vec<(&'static str, Health)>,
    endpoints_api: Option<&'static str>,
    /// The last successful list or watch event since start.
    last_sync: Option<SystemTime>,
    /// The state in force came from the state file.
    persisted: bool,
    /// `last_sync` recorded in the state file.
    persisted_sync: Option<SystemTime>,
    persist_error: Option<String>,
}

impl Inner {
    fn part(&mut self, name: &'static str) -> &mut Health {
        if let Some(i) = self.parts.iter().position(|(n, _)| *n == name) {
            return &mut self.parts[i].1;
        }
        self.parts.push((name, Health::default()));
        &mut self.parts.last_mut().expect("just pushed").1
    }

    /// Discovery answered and every watcher listed and is healthy.
    fn connected(&self) -> bool {
        self.parts.len() == PARTS && self.parts.iter().all(|(_, h)| h.ok && h.listed)
    }

    fn all_listed(&self) -> bool {
        self.parts.len() == PARTS && self.parts.iter().all(|(_, h)| h.listed)
    }
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// A store changed: the publisher recomputes the state.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn succeeded(&self, part: &'static str, listed: bool, event: bool) {
        let mut inner = self.lock();
        if event {
            inner.last_sync = Some(SystemTime::now());
        }
        let health = inner.part(part);
        health.ok = true;
        health.listed |= listed;
        if let Some(e) = health.error.take() {
            info!(part, previous_error = %e, "kubernetes: recovered");
        }
        if listed {
            if let Some(e) = health.refused.take() {
                info!(part, previous_error = %e, "kubernetes: listed, no longer refused");
            }
        }
    }

    /// The server refuses an optional part: it counts as listed and empty (see
    /// [`OPTIONAL_PARTS`]); the watcher keeps retrying, and a list ends this.
    fn refused(&self, part: &'static str, error: String) {
        let mut inner = self.lock();
        let health = inner.part(part);
        let first = health.refused.is_none() || !health.listed;
        health.ok = true;
        health.listed = true;
        health.error = None;
        if health.refused.as_deref() != Some(error.as_str()) {
            warn!(part, %error, "kubernetes: the server refuses this part: going on without it (grant get/list/watch, see deploy/rbac.yaml)");
            health.refused = Some(error);
        }
        drop(inner);
        if first {
            self.changed.notify_one();
        }
    }

    /// A watch request of `part` was answered with a success status: the watch is
    /// established (a watch resumed from a resourceVersion yields no event until a change).
    fn watching(&self, part: &'static str) {
        self.succeeded(part, false, true);
    }

    fn failed(&self, part: &'static str, error: String) {
        let mut inner = self.lock();
        let health = inner.part(part);
        health.ok = false;
        if health.error.as_deref() != Some(error.as_str()) {
            warn!(part, %error, "kubernetes: failing (retrying; the last state stays in force)");
            health.error = Some(error);
        }
    }
}

/// The source's main task: API discovery, the watchers, then the publisher. Its watchers
/// live in a `JoinSet` it owns, so aborting it stops them all.
async fn run(
    client: Client,
    rules: Rules,
    node_name: String,
    state_file: PathBuf,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
) {
    {
        let mut inner = shared.lock();
        for part in ["discovery", "pods", "nodes", "namespaces", "services"] {
            inner.part(part);
        }
    }
    let mut watchers = JoinSet::new();
    // Pods are listed as protobuf (`listwatch`): the largest list by far.
    let pods = start_watcher(
        &mut watchers,
        listwatch::pods(client.clone(), WATCH_TIMEOUT_SECS),
        "pods",
        trimmed_pod,
        &shared,
    );
    let nodes = start_watcher(
        &mut watchers,
        watch_all(Api::<Node>::all(client.clone())),
        "nodes",
        trimmed_node,
        &shared,
    );
    let namespaces = start_watcher(
        &mut watchers,
        watch_all(Api::<Namespace>::all(client.clone())),
        "namespaces",
        trimmed,
        &shared,
    );
    let services = start_watcher(
        &mut watchers,
        watch_all(Api::<Service>::all(client.clone())),
        "services",
        trimmed_service,
        &shared,
    );

    let slices = discover_endpoint_slices(&client, &shared).await;
    let backends = if slices {
        shared.lock().endpoints_api = Some(ENDPOINT_SLICES_API);
        BackendStore::EndpointSlices(start_watcher(
            &mut watchers,
            watch_all(Api::<EndpointSlice>::all(client.clone())),
            "endpointslices",
            trimmed_slice,
            &shared,
        ))
    } else {
        shared.lock().endpoints_api = Some("v1");
        BackendStore::Endpoints(start_watcher(
            &mut watchers,
            watch_all(Api::<Endpoints>::all(client.clone())),
            "endpoints",
            trimmed_endpoints,
            &shared,
        ))
    };
    let stores = Stores {
        pods,
        nodes,
        namespaces,
        services,
        backends,
    };
    publish(stores, rules, node_name, state_file, shared, tx).await;
    // `publish` returns only when the channel has no receiver left (the source is gone).
    watchers.shutdown().await;
}

/// Asks the server (once; retried until it answers) whether it serves EndpointSlices.
async fn discover_endpoint_slices(client: &Client, shared: &Shared) -> bool {
    let mut backoff = RetryBackoff::default();
    loop {
        let answer = match client.list_api_group_resources(ENDPOINT_SLICES_API).await {
            Ok(list) => Ok(list.resources.iter().any(|r| r.name == "endpointslices")),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(e),
        };
        match answer {
            Ok(served) => {
                shared.succeeded("discovery", true, false);
                info!(
                    endpoint_slices = served,
                    "kubernetes: API discovery: Service backends from {}",
                    if served {
                        "EndpointSlices (discovery.k8s.io/v1)"
                    } else {
                        "Endpoints (v1): the server does not serve discovery.k8s.io/v1"
                    }
                );
                return served;
            }
            Err(e) => {
                shared.failed(
                    "discovery",
                    format!("API discovery of {ENDPOINT_SLICES_API}: {e}"),
                );
                let delay = backoff.next().unwrap_or(RETRY_MAX);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Every pod of the cluster as the source reads it (what [`slim_pod`] keeps of each), listed
/// once from the API server's watch cache in `encoding`, and the encoding it answered in.
/// The source lists as [`Encoding::Protobuf`]; this shows that both read alike.
pub async fn list_pods(client: &Client, encoding: Encoding) -> kube::Result<(Vec<Pod>, Encoding)> {
    let params = kube::api::ListParams::default().match_any();
    let page = proto::list_pods(client, &params, encoding).await?;
    Ok((
        page.pods.into_iter().map(wire::WirePod::into_pod).collect(),
        page.answered,
    ))
}

/// kube's watcher on every object of `api`'s kind, listed from the API server's watch
/// cache: `resourceVersion=0`, answered whole in one response, where a consistent list is
/// read from etcd page by page (20,000 pods: 1.9-2.9 s of the server's time on this machine,
/// the larger part of a cold sync). The answer may be older than the newest write, as an
/// informer's first list is: the watch that follows from its resourceVersion delivers what
/// came after. A relist after 410 Gone asks the cache again, which is at least as new as
/// the expired version. No page size: with a `limit`, kube sends no `resourceVersion=0`
/// (its default of 500 a page read every list from etcd).
///
/// kube's watcher relists after a 410 sent in the watch stream, which is what the
/// kube-apiserver does; a watch start refused with an HTTP 410 (an aggregated API server or
/// a proxy in between may answer so) it retries from the same expired version for ever, and
/// the part's objects would stay as they were. Such an error starts a new watcher, which
/// lists first (the pods' own list-watch relists the same way: `listwatch`).
fn watch_all<W>(api: Api<W>) -> impl Stream<Item = Result<watcher::Event<W>, watcher::Error>> + Send
where
    W: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut config = watcher::Config::default()
        .timeout(WATCH_TIMEOUT_SECS)
        .any_semantic();
    config.page_size = None;
    let start = move || watcher(api.clone(), config.clone()).boxed();
    let events = start();
    futures::stream::unfold((events, start), |(mut events, start)| async move {
        let item = events.next().await?;
        if let Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) = &item {
            // kube takes the code from the answer's `Status` body: one without a code (0)
            // is known by its reason (`Expired`, or `Gone` as some proxies write it).
            if status.code == 410 || matches!(status.reason.as_str(), "Expired" | "Gone") {
                tracing::info!(
                    "a watch start refused with 410 Gone ({}): listing again",
                    status.message
                );
                events = start();
            }
        }
        Some((item, (events, start)))
    })
}

/// Starts a reflector on `events` (a watcher's) in `set` and returns its store of `K`s:
/// each object is decoded as a `W` and turned into what the store keeps by `decode`, which
/// drops what the source never reads (managed fields, most of a pod), so 20,000 pods stay
/// small.
fn start_watcher<W, K, S>(
    set: &mut JoinSet<()>,
    events: S,
    part: &'static str,
    decode: fn(W) -> K,
    shared: &Arc<Shared>,
) -> Store<K>
where
    W: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K: Resource + Clone + Debug + PartialEq + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<W>, watcher::Error>> + Send + 'static,
{
    shared.lock().part(part);
    let (reader, writer) = reflector::store::<K>();
    set.spawn(watch_resource(
        events,
        writer,
        reader.clone(),
        part,
        decode,
        shared.clone(),
    ));
    reader
}

/// An object of `K` with only what the source reads.
fn trimmed<K: ResourceExt>(mut object: K) -> K {
    slim(&mut object);
    object
}

/// A pod as [`wire::WirePod`] decodes it, trimmed by [`slim_pod`] (which the wire type
/// already did: kept so that one function says what a pod keeps).
fn trimmed_pod(pod: wire::WirePod) -> Pod {
    let mut pod = pod.into_pod();
    slim_pod(&mut pod);
    pod
}

/// `event` with its object turned into a `K`.
fn decode_event<W, K>(event: watcher::Event<W>, decode: fn(W) -> K) -> watcher::Event<K> {
    use watcher::Event::*;
    match event {
        Apply(o) => Apply(decode(o)),
        Delete(o) => Delete(decode(o)),
        Init => Init,
        InitApply(o) => InitApply(decode(o)),
        InitDone => InitDone,
    }
}

async fn watch_resource<W, K, S>(
    events: S,
    writer: Writer<K>,
    reader: Store<K>,
    part: &'static str,
    decode: fn(W) -> K,
    shared: Arc<Shared>,
) where
    W: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K: Resource + Clone + Debug + PartialEq + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<W>, watcher::Error>> + Send + 'static,
{
    // An update that changes nothing the source keeps (a Node's status heartbeat: every
    // node, every few minutes; an EndpointSlice's trigger-time annotation; their trimmed
    // copies have no resourceVersion) is not applied and
    // recomputes nothing. The watcher resumes from the versions of the events it received,
    // before they are decoded, so dropping one here loses no place in the stream.
    let events = events
        .map_ok(move |event| decode_event(event, decode))
        .try_filter(move |event| {
            let unchanged = match event {
                watcher::Event::Apply(o) => reader
                    .get(&reflector::ObjectRef::from_obj(o))
                    .is_some_and(|kept| *kept == *o),
                _ => false,
            };
            std::future::ready(!unchanged)
        });
    let mut stream = pin!(reflector::reflector(writer, events).backoff(RetryBackoff::default()));
    while let Some(item) = stream.next().await {
        match item {
            // The watcher emits Init before it lists: a marker, not an answer.
            Ok(watcher::Event::Init) => {}
            Ok(event) => {
                let listed = matches!(event, watcher::Event::InitDone);
                shared.succeeded(part, listed, true);
                // A reflector store changes on Apply, Delete and InitDone (a relist is
                // swapped in whole); Init and InitApply only fill its buffer.
                if matches!(
                    event,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                ) {
                    shared.changed.notify_one();
                }
            }
            Err(e) if OPTIONAL_PARTS.contains(&part) && refused(&e) => {
                shared.refused(part, e.to_string())
            }
            Err(e) => shared.failed(part, e.to_string()),
        }
    }
}

/// The server answered a list or watch with 403 Forbidden or 404 Not Found.
fn refused(e: &watcher::Error) -> bool {
    use watcher::Error::*;
    matches!(
        e,
        InitialListFailed(kube::Error::Api(s)) | WatchStartFailed(kube::Error::Api(s))
            if s.code == 403 || s.code == 404
    )
}

/// The tower layer that tells [`Shared`] when a watch request succeeds.
#[derive(Clone)]
struct ObserveWatches(Arc<Shared>);

impl<S> tower::Layer<S> for ObserveWatches {
    type Service = ObservedService<S>;

    fn layer(&self, inner: S) -> ObservedService<S> {
        ObservedService {
            inner,
            shared: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct ObservedService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> tower::Service<hyper::Request<kube::client::Body>> for ObservedService<S>
where
    S: tower::Service<hyper::Request<kube::client::Body>, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<kube::client::Body>) -> Self::Future {
        // Lists are not observed here: their success shows as events (InitDone), and a
        // 200 with a body that does not parse is no success.
        let watched = watch_part(request.uri());
        let shared = self.shared.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            if let (Some(part), Ok(r)) = (watched, &response) {
                if r.status().is_success() {
                    shared.watching(part);
                }
            }
            response
        })
    }
}

/// The part whose watch request this is (`?watch=true` on a cluster-wide collection).
fn watch_part(uri: &hyper::Uri) -> Option<&'static str> {
    let watch = uri
        .query()?
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    if !watch {
        return None;
    }
    match uri.path() {
        "/api/v1/pods" => Some("pods"),
        "/api/v1/nodes" => Some("nodes"),
        "/api/v1/namespaces" => Some("namespaces"),
        "/api/v1/services" => Some("services"),
        "/api/v1/endpoints" => Some("endpoints"),
        "/apis/discovery.k8s.io/v1/endpointslices" => Some("endpointslices"),
        _ => None,
    }
}

fn slim<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Keeps what [`cluster_state`] reads of a pod: names, UID, resource version, labels (within
/// [`model::MAX_POD_LABEL_BYTES`]), creation and deletion times, of the annotations only those
/// [`model::kept_annotation`] names, of the owner references only its node's
/// ([`node_owner`]: a mirror pod's annotation and owner name a static pod's cgroup); node, host network,
/// service account, phase, its IPs and its node's; and, under [`model::UNCONTAINED_KEY`], what
/// its containers, volumes and host namespaces hold that the enforcer cannot contain (they
/// are not kept: a container is 2 KiB). [`wire::WirePod`] decodes exactly this.
fn slim_pod(pod: &mut Pod) {
    // What the containers, volumes and host namespaces say, before they go (a pod has at
    // least one container: a spec without any was slimmed already and keeps its summary).
    let uncontained = pod
        .spec
        .as_ref()
        .filter(|s| !s.containers.is_empty())
        .map(confine::summary);
    let syncookies_off = pod
        .spec
        .as_ref()
        .is_some_and(|s| confine::syncookies_off_in(s.security_context.as_ref()));
    let m = std::mem::take(&mut pod.metadata);
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    pod.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        // The watcher resumes a watch from the last object's version.
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations.map(|mut a| {
            a.retain(|key, value| model::kept_annotation(key, value));
            a
        }),
        owner_references: node_owner(m.owner_references, node),
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    };
    bound_labels(&mut pod.metadata);
    if let Some(summary) = uncontained {
        keep_uncontained(&mut pod.metadata, summary);
    }
    keep_syncookies_off(&mut pod.metadata, syncookies_off);
    pod.spec = pod.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        service_account_name: s.service_account_name,
        service_account: s.service_account,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        host_ip: s.host_ip,
        host_ips: s.host_ips,
        ..PodStatus::default()
    });
}

/// Of a pod's owner references, the one to the Node it runs on, the only one read (`cgroup_uid`:
/// it admits the mirror annotation). Tenants write owner references: any others, and more
/// than one, are not kept.
pub(crate) fn node_owner(
    owners: Option<Vec<OwnerReference>>,
    node: Option<&str>,
) -> Option<Vec<OwnerReference>> {
    let owners = owners?;
    let node = node.filter(|n| !n.is_empty());
    Some(
        owners
            .into_iter()
            .filter(|o| o.kind == "Node" && Some(o.name.as_str()) == node)
            .take(1)
            .collect(),
    )
}

/// Drops a slim pod's labels when they take more than [`model::MAX_POD_LABEL_BYTES`], noting how many there were and their size under
/// [`model::OVERSIZED_LABELS_KEY`] (the model leaves such a pod out).
pub(crate) fn bound_labels(metadata: &mut ObjectMeta) {
    let Some(labels) = &metadata.labels else {
        return;
    };
    let bytes: usize = labels
        .iter()
        .map(|(k, v)| k.len() + v.len() + model::LABEL_OVERHEAD_BYTES)
        .sum();
    if bytes <= model::MAX_POD_LABEL_BYTES {
        return;
    }
    let note = format!("{} labels, {bytes} bytes", labels.len());
    metadata.labels = None;
    let annotations = metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert(model::OVERSIZED_LABELS_KEY.to_string(), note);
}

/// Notes on a slim pod's metadata whether the pod turns SYN cookies off
/// ([`model::SYNCOOKIES_OFF_KEY`]; a note already there is kept: the spec it was read from
/// is gone).
pub(crate) fn keep_syncookies_off(metadata: &mut ObjectMeta, off: bool) {
    if off {
        let annotations = metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(model::SYNCOOKIES_OFF_KEY.to_string(), String::new());
    }
}

/// Records (or clears) on a slim pod's metadata what the pod holds that the enforcer cannot
/// contain ([`model::UNCONTAINED_KEY`]).
pub(crate) fn keep_uncontained(metadata: &mut ObjectMeta, summary: Option<String>) {
    match summary {
        Some(summary) => {
            let annotations = metadata.annotations.get_or_insert_with(Default::default);
            annotations.insert(model::UNCONTAINED_KEY.to_string(), summary);
        }
        None => {
            if let Some(annotations) = &mut metadata.annotations {
                annotations.remove(model::UNCONTAINED_KEY);
            }
        }
    }
}

/// The metadata a kept Service or backend has: its namespace and name. Labels and annotations
/// go (tenants write them, up to the object's 1.5 MiB, and every agent keeps every object),
/// and so does the resource version, as a Node's does: an update that changes nothing else
/// then leaves the trimmed copy as it was and recomputes nothing (see `watch_resource`).
fn kept_meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        ..ObjectMeta::default()
    }
}

/// A Service with only what [`cluster_state`] reads: its type, cluster, external and
/// load-balancer addresses and its ports.
fn trimmed_service(service: Service) -> Service {
    Service {
        metadata: kept_meta(service.metadata),
        spec: service.spec.map(|s| ServiceSpec {
            type_: s.type_,
            cluster_ip: s.cluster_ip,
            cluster_ips: s.cluster_ips,
            external_ips: s.external_ips,
            ports: s.ports,
            ..ServiceSpec::default()
        }),
        status: service.status.map(|s| ServiceStatus {
            load_balancer: s.load_balancer.map(|lb| LoadBalancerStatus {
                ingress: lb.ingress.map(|i| {
                    i.into_iter()
                        .map(|i| LoadBalancerIngress {
                            ip: i.ip,
                            ..LoadBalancerIngress::default()
                        })
                        .collect()
                }),
            }),
            ..ServiceStatus::default()
        }),
    }
}

/// An EndpointSlice with only what [`cluster_state`] reads: the Service it belongs to (the
/// one label it keeps: the controller copies the Service's labels onto its slices), its
/// address type, ports and each endpoint's addresses and readiness.
fn trimmed_slice(slice: EndpointSlice) -> EndpointSlice {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(model::SERVICE_NAME_LABEL).cloned());
    let mut metadata = kept_meta(slice.metadata);
    metadata.labels =
        service.map(|s| std::collections::BTreeMap::from([(model::SERVICE_NAME_LABEL.into(), s)]));
    EndpointSlice {
        metadata,
        address_type: slice.address_type,
        ports: slice.ports,
        endpoints: slice
            .endpoints
            .into_iter()
            .map(|e| Endpoint {
                addresses: e.addresses,
                conditions: e.conditions.map(|c| EndpointConditions {
                    ready: c.ready,
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
    }
}

/// Endpoints (before 1.21) with only what [`cluster_state`] reads: each subset's ready
/// addresses and ports.
fn trimmed_endpoints(endpoints: Endpoints) -> Endpoints {
    Endpoints {
        metadata: kept_meta(endpoints.metadata),
        subsets: endpoints.subsets.map(|subsets| {
            subsets
                .into_iter()
                .map(|s| EndpointSubset {
                    addresses: s.addresses.map(|a| {
                        a.into_iter()
                            .map(|a| EndpointAddress {
                                ip: a.ip,
                                ..EndpointAddress::default()
                            })
                            .collect()
                    }),
                    ports: s.ports,
                    ..EndpointSubset::default()
                })
                .collect()
        }),
    }
}

/// A Node with only what [`cluster_state`] reads: its name, addresses and
/// pod networks (a Node's status carries its images and conditions, kilobytes each).
fn trimmed_node(node: Node) -> Node {
    Node {
        // No resourceVersion (unlike the other kinds, whose every change the source reads):
        // a status heartbeat then leaves the trimmed copy unchanged (see `watch_resource`).
        metadata: ObjectMeta {
            name: node.metadata.name,
            ..ObjectMeta::default()
        },
        spec: node.spec.map(|s| NodeSpec {
            pod_cidr: s.pod_cidr,
            pod_cidrs: s.pod_cidrs,
            ..NodeSpec::default()
        }),
        status: node.status.map(|s| NodeStatus {
            addresses: s.addresses.map(|a| {
                a.into_iter()
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .map(|a| NodeAddress {
                        address: a.address,
                        type_: a.type_,
                    })
                    .collect()
            }),
            ..NodeStatus::default()
        }),
    }
}

enum BackendStore {
    EndpointSlices(Store<EndpointSlice>),
    Endpoints(Store<Endpoints>),
}

struct Stores {
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    backends: BackendStore,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            pods: self.pods.state(),
            nodes: self.nodes.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            backends: match &self.backends {
                BackendStore::EndpointSlices(s) => Backends::EndpointSlices(s.state()),
                BackendStore::Endpoints(s) => Backends::Endpoints(s.state()),
            },
        }
    }
}

/// Recomputes the state after every (debounced) store change, and when the addresses of the
/// agent's network namespace change ([`local_addresses`], read every
/// [`LOCAL_ADDRESSES_EVERY`]), once every resource has been listed; publishes it when it
/// differs, then hands it to the [`Persister`]: a change is in force before it is on disk.
async fn publish(
    stores: Stores,
    rules: Rules,
    node_name: String,
    state_file: PathBuf,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
) {
    let stores = Arc::new(stores);
    let rules = Arc::new(rules);
    let persister = Persister::start(state_file, shared.clone());
    let mut memo = Some(model::Memo::default());
    // Read before the first round, so that no published state lacks them.
    let mut local = read_local_addresses().await.unwrap_or_default();
    let mut reread = tokio::time::interval(LOCAL_ADDRESSES_EVERY);
    reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.changed.notified() => {}
            _ = reread.tick() => {
                match read_local_addresses().await {
                    Ok(now) if now != local => local = now,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(error = %e, "kubernetes: cannot read this node's addresses (the last ones are kept)");
                        continue;
                    }
                }
            }
            () = tx.closed() => return,
        }
        // A burst of events becomes one state; the first state is not waited for (nothing
        // is in force that a burst could make flap, and every pod is unknown until then).
        if tx.borrow().is_some() {
            tokio::time::sleep(DEBOUNCE).await;
        }
        if !shared.lock().all_listed() {
            continue;
        }
        let last_sync = shared.lock().last_sync.unwrap_or_else(SystemTime::now);
        let (stores2, rules2) = (stores.clone(), rules.clone());
        let mut memo2 = memo.take().unwrap_or_default();
        let started = std::time::Instant::now();
        // Off the runtime's worker threads: 20,000 pods take tens of milliseconds.
        let (state, identities_changed) = match tokio::task::spawn_blocking(move || {
            let state = model::cluster_state_with(&stores2.snapshot(), &rules2, &mut memo2);
            (state, memo2)
        })
        .await
        {
            Ok((state, kept)) => {
                let changed = kept.identities_changed();
                memo = Some(kept);
                (state, changed)
            }
            Err(e) => {
                warn!(error = %e, "kubernetes: computing the cluster state failed");
                continue;
            }
        };
        let mut state = state;
        add_local_addresses(&mut state, &node_name, &local);
        let computed = started.elapsed();
        let previous = tx.borrow().clone();
        let was_persisted = shared.lock().persisted;
        if previous
            .as_deref()
            .is_some_and(|p| same_state(p, &state, identities_changed))
        {
            if was_persisted {
                shared.lock().persisted = false;
                info!("kubernetes: the API server confirms the persisted state");
            }
            continue;
        }
        report_problems(previous.as_deref(), &state);
        shared.lock().persisted = false;
        info!(
            identities = state.identities.len(),
            services = state.services.len(),
            problems = state.problems.len(),
            compute_ms = computed.as_secs_f64() * 1e3,
            "kubernetes: cluster state updated"
        );
        let state = Arc::new(state);
        tx.send_replace(Some(state.clone()));
        persister.write(PersistedRef {
            version: PERSISTED_VERSION,
            last_sync: humantime::format_rfc3339_millis(last_sync).to_string(),
            identity_labels: rules.identity_labels.clone(),
            state,
        });
    }
}

/// Bridges that container runtimes create with the same default addresses in every
/// namespace they run in (`172.17.0.1` for Docker, `10.88.0.1` for podman, `192.168.122.1`
/// for libvirt): a container nested in a pod (a CI job's Docker-in-Docker) has them too, so
/// their addresses name no one node-wide and stay World's, as loopback does.
const PER_NAMESPACE_BRIDGES: [&str; 5] = ["docker0", "podman0", "cni-podman0", "virbr0", "lxdbr0"];

/// The unicast addresses of the network namespace the agent runs in: the node's, since the
/// DaemonSet is `hostNetwork` (the CNI bridge's gateway, every pod's default route; tunnel
/// devices; addresses the kubelet does not report). The kubelet listens on all of them, so
/// they are `host` like the ones the API reports. Loopback and link-local addresses, and
/// those of [`PER_NAMESPACE_BRIDGES`], are left out: the IP cache is one for all namespaces,
/// and a pod's `127.0.0.1` or `fe80::` address is its own, not the node's. An address
/// something more specific claims (a pod's; a Service's, see [`add_local_addresses`]) stays
/// that claim's (the merge).
///
/// # Errors
/// The interfaces cannot be read (`getifaddrs`).
pub fn local_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter(|i| !i.is_loopback() && !i.is_link_local())
        .filter(|i| !PER_NAMESPACE_BRIDGES.contains(&i.name.as_str()))
        .map(|i| i.ip())
        .collect())
}

/// [`local_addresses`] off the runtime's worker threads (a node with IPVS kube-proxy has an
/// address per Service on `kube-ipvs0`).
async fn read_local_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    tokio::task::spawn_blocking(local_addresses)
        .await
        .map_err(std::io::Error::other)?
}

/// Adds `local` (this node's namespace's addresses) to `node`'s in `state`, except the
/// addresses of the state's Services: IPVS kube-proxy puts every ClusterIP, external and
/// load-balancer address on `kube-ipvs0`, and those are the Services' (or, where the merge
/// refuses a Service or the inventory holds the address, theirs), never the node's.
fn add_local_addresses(state: &mut ClusterState, node: &str, local: &BTreeSet<IpAddr>) {
    if node.is_empty() || local.is_empty() {
        return;
    }
    let services: std::collections::HashSet<&IpAddr> = state
        .services
        .iter()
        .flat_map(|s| s.cluster_ips.iter().chain(&s.external_ips))
        .collect();
    let own: Vec<IpAddr> = local
        .iter()
        .filter(|ip| !services.contains(ip))
        .copied()
        .collect();
    let list = state.nodes.entry(node.to_string()).or_default();
    list.extend(own);
    list.sort();
    list.dedup();
}

/// Whether `state` equals `previous`, the state the last round published (or the persisted
/// one). The identities hold every pod (20,000 at issue 9's scale): they are compared only
/// when the memo says they may have changed, or when `previous` came from elsewhere (the
/// state file, or a memo that started over), which the memo's first round reports as a
/// change too. Services, problems, addresses left out and the nodes' addresses are
/// recomputed every round and compared (hundreds of entries).
fn same_state(previous: &ClusterState, state: &ClusterState, identities_changed: bool) -> bool {
    previous.trust_domain == state.trust_domain
        && previous.services == state.services
        && previous.unidentified_ips == state.unidentified_ips
        && previous.nodes == state.nodes
        && previous.pod_cidrs == state.pod_cidrs
        && previous.problems == state.problems
        && (!identities_changed || previous.identities == state.identities)
}

/// [`PersistedState`] as it is written: the state shared with the agent, not copied.
#[derive(Serialize)]
struct PersistedRef {
    version: u32,
    last_sync: String,
    identity_labels: Vec<String>,
    #[serde(serialize_with = "serialize_shared")]
    state: Arc<ClusterState>,
}

fn serialize_shared<S: serde::Serializer>(
    state: &Arc<ClusterState>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    state.serialize(serializer)
}

/// Writes published states to [`STATE_FILE`] on its own thread, newest first: a state
/// published while one is being written (or within [`PERSIST_INTERVAL`] of the last write)
/// replaces any older one still waiting, so under churn the file follows with one write a
/// [`PERSIST_INTERVAL`] and never holds up a change. Dropped,
/// it finishes the write it has (the rename keeps the file whole either way).
struct Persister {
    slot: Arc<(Mutex<PersistSlot>, std::sync::Condvar)>,
}

#[derive(Default)]
struct PersistSlot {
    next: Option<PersistedRef>,
    closed: bool,
}

impl Persister {
    fn start(path: PathBuf, shared: Arc<Shared>) -> Self {
        let slot: Arc<(Mutex<PersistSlot>, std::sync::Condvar)> = Arc::default();
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("kube-persist".into())
            .spawn(move || {
                let mut last_write = None;
                loop {
                let next = {
                    let (lock, ready) = &*theirs;
                    let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        // At most one write per PERSIST_INTERVAL (sooner when closing): a
                        // burst of changes is one write of its last state.
                        let wait = last_write
                            .map(|t: std::time::Instant| PERSIST_INTERVAL.saturating_sub(t.elapsed()))
                            .unwrap_or_default();
                        if slot.next.is_some() && (wait.is_zero() || slot.closed) {
                            break slot.next.take().expect("checked");
                        }
                        if slot.closed {
                            return;
                        }
                        slot = if slot.next.is_some() {
                            ready.wait_timeout(slot, wait).unwrap_or_else(|e| e.into_inner()).0
                        } else {
                            ready.wait(slot).unwrap_or_else(|e| e.into_inner())
                        };
                    }
                };
                last_write = Some(std::time::Instant::now());
                let written = write_atomically(&path, &next);
                let mut inner = shared.lock();
                match written {
                    Ok(()) => inner.persist_error = None,
                    Err(e) => {
                        let text = format!("{e:#}");
                        if inner.persist_error.as_deref() != Some(text.as_str()) {
                            warn!(error = %text, "kubernetes: cannot persist the cluster state");
                            inner.persist_error = Some(text);
                        }
                    }
                }
            }});
        if let Err(e) = spawned {
            warn!(error = %e, "kubernetes: cannot start the thread that persists the state");
        }
        Self { slot }
    }

    fn write(&self, state: PersistedRef) {
        let (lock, ready) = &*self.slot;
        lock.lock().unwrap_or_else(|e| e.into_inner()).next = Some(state);
        ready.notify_one();
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        let (lock, ready) = &*self.slot;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        ready.notify_one();
    }
}

/// Logs each problem line once, when it first appears.
fn report_problems(previous: Option<&ClusterState>, state: &ClusterState) {
    for problem in &state.problems {
        if previous.is_none_or(|p| !p.problems.contains(problem)) {
            warn!(problem = %problem, "kubernetes: object refused or reported");
        }
    }
}

/// Writes `value` as JSON to a temporary file beside `path`, syncs it and renames it over
/// `path`: a crash leaves the old file or the new one, never half of one. Also the learner's
/// file ([`crate::learn`]).
pub(crate) fn write_atomically<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("state file has no directory")?;
    // Unique per write: a source dropped while its persister still writes must not share
    // the temporary file with the next source of the same process.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // Buffered: serde_json writes token by token, and unbuffered that was one write(2)
        // per token, two thirds of the agent's CPU per pod change at 5,000 pods
        // (`cargo xtask bench kube`).
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        serde_json::to_writer(&mut out, value)
            .with_context(|| format!("serialising {}", path.display()))?;
        out.write_all(b"\n")?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Capped exponential backoff with jitter (so that many nodes do not retry in step), back to
/// the first delay after [`RETRY_CALM`] without a retry.
///
/// `Backoff::reset` does nothing: the stream resets its backoff on every `Ok`, and the
/// watcher emits an `Ok(Init)` marker before every list, so a server failing every list
/// would otherwise be retried at the first delay forever.
#[derive(Debug)]
struct RetryBackoff {
    next: Duration,
    seed: u64,
    last: Option<tokio::time::Instant>,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        Self {
            next: RETRY_FIRST,
            seed,
            last: None,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > RETRY_CALM)
        {
            self.next = RETRY_FIRST;
        }
        self.last = Some(now);
        // xorshift64: jitter needs no quality, only spread.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        // 75% to 125% of the base delay.
        let factor = 0.75 + (self.seed % 1000) as f64 / 2000.0;
        Some(base.mul_f64(factor))
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests;

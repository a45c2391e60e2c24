//! A real Kubernetes API server for the tests: etcd and the kube-apiserver that
//! `xtask/scripts/kube-apiserver.sh` builds from the Debian `kubernetes` source package
//! (1.20.2), both on loopback with free ports, each with its own data directory, all removed
//! on drop (also when a test panics).
//!
//! No scheduler, controller manager or kubelet runs: a test sets `spec.nodeName` itself,
//! writes pod IPs through the `/status` subresource, and a pod deleted with a grace period
//! keeps its `deletionTimestamp` until it is deleted again with `gracePeriodSeconds=0`. The
//! ServiceAccount admission plugin is off (no controller creates the `default` account), so
//! pods need no service account object. Endpoints refuse loopback addresses
//! (`validateNonSpecialIP`): Services' backends in a test use `fd7e:<net>::/64` addresses.
//! discovery.k8s.io/v1 (EndpointSlices) is not served by 1.20: [`standin`] speaks the
//! list/watch protocol for it.
//!
//! The server authenticates one bearer token (group `system:masters`; the authorizer is
//! AlwaysAllow, RBAC where a test asks for more users: [`ApiServerOptions::users`]) and serves a certificate for `IP:127.0.0.1` signed by a CA of its own, which
//! the kubeconfig ([`ApiServer::kubeconfig`]) names. Service ClusterIPs come from
//! `--service-cluster-ip-range` (default `127.96.0.0/16`, so that a ClusterIP stays on
//! loopback: a test never connects to an address outside 127.0.0.0/8).

pub mod standin;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::util::{tail_of, ChildGuard, TempDir};

/// Where `xtask/scripts/kube-apiserver.sh` caches the server (`ENFORCER_KUBE_CACHE` moves it).
const DEFAULT_CACHE: &str = "/var/cache/ai-enforcer/kube-1.20.2";
/// The Debian `etcd-server` package's binary.
const DEFAULT_ETCD: &str = "/usr/bin/etcd";
/// The default Service CIDR of a test API server (DESIGN.md: ClusterIPs on loopback).
pub const DEFAULT_SERVICE_CIDR: &str = "127.96.0.0/16";
/// How long etcd and the API server may take to become ready on a loaded 2-core machine
/// (about 3 s when idle).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at starting the pair: a free port found by binding port 0 can be taken by a
/// concurrent test before the server binds it.
const START_ATTEMPTS: usize = 3;

/// The kube-apiserver binary: `ENFORCER_KUBE_APISERVER`, else `$ENFORCER_KUBE_CACHE` (or
/// the default cache) `/kube-apiserver`.
pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENFORCER_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("ENFORCER_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    cache.join("kube-apiserver")
}

/// The etcd binary: `ENFORCER_ETCD`, else `/usr/bin/etcd`.
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("ENFORCER_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD))
}

/// Why this machine cannot run an API server test, or `None` when it can.
pub fn apiserver_unavailable_reason() -> Option<String> {
    for (what, bin) in [("kube-apiserver", apiserver_bin()), ("etcd", etcd_bin())] {
        if !bin.is_file() {
            return Some(format!(
                "{what} not found at {} (run `cargo xtask setup-kube`, which builds it with \
                 xtask/scripts/kube-apiserver.sh)",
                bin.display()
            ));
        }
    }
    None
}

/// Whether an API server test can run here. When it cannot, says why loudly on stderr and
/// returns `false` (the test then returns early); under `CI=true` it panics instead: CI must
/// never skip these tests.
pub fn require_apiserver() -> bool {
    crate::require("API server", apiserver_unavailable_reason())
}

/// How to start an [`ApiServer`].
#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    /// `--service-cluster-ip-range` (default [`DEFAULT_SERVICE_CIDR`]).
    pub service_cidr: String,
    /// More kube-apiserver flags (`--flag=value`), after the harness's own.
    pub extra_args: Vec<String>,
    /// Users besides the harness's own, each with a bearer token and no group: with any,
    /// the server authorizes by RBAC (`--authorization-mode=RBAC`), so each may do exactly
    /// what a test binds to it ([`ApiServer::user_kubeconfig`]).
    pub users: Vec<String>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        Self {
            service_cidr: DEFAULT_SERVICE_CIDR.into(),
            extra_args: Vec::new(),
            users: Vec::new(),
        }
    }
}

/// etcd + kube-apiserver on loopback; both killed and their directories removed on drop.
pub struct ApiServer {
    // Field order is drop order: the API server before etcd, the directory last.
    apiserver: Option<ChildGuard>,
    #[allow(dead_code)] // held for its Drop
    etcd: ChildGuard,
    url: String,
    token: String,
    kubeconfig: PathBuf,
    user_kubeconfigs: Vec<(String, PathBuf)>,
    ca_pem: String,
    config: ::kube::Config,
    apiserver_log: PathBuf,
    etcd_log: PathBuf,
    dir: TempDir,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("url", &self.url)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts etcd and the API server with the default options and waits (bounded) until
    /// `/readyz` answers `ok` and its own Service exists. Callable inside or outside a tokio
    /// runtime.
    pub fn start() -> Result<Self> {
        Self::start_with(ApiServerOptions::default())
    }

    /// [`ApiServer::start`] with options.
    pub fn start_with(options: ApiServerOptions) -> Result<Self> {
        if let Some(reason) = apiserver_unavailable_reason() {
            bail!("{reason}");
        }
        let mut last = None;
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(&options) {
                Ok(server) => return Ok(server),
                Err(e) => {
                    eprintln!("kube harness: start attempt {attempt} failed: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn try_start(options: &ApiServerOptions) -> Result<Self> {
        let dir = TempDir::new("enforcer-kube")?;
        let d = dir.path();
        let pki = Pki::generate()?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = d.join(name);
            std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
            Ok(p)
        };
        let ca = write("ca.crt", &pki.ca_pem)?;
        let serving_cert = write("apiserver.crt", &pki.serving_cert_pem)?;
        let serving_key = write("apiserver.key", &pki.serving_key_pem)?;
        let sa_key = write("sa.key", &pki.sa_key_pem)?;
        let sa_pub = write("sa.pub", &pki.sa_pub_pem)?;
        let token = format!("enforcer-test-{}", crate::unique_name("token"));
        // token,user,uid,"groups": system:masters is all-powerful (and AlwaysAllow anyway).
        let mut lines = format!("{token},enforcer-test,enforcer-test,\"system:masters\"\n");
        let mut users = Vec::new();
        for user in &options.users {
            let user_token = format!("enforcer-{user}-{}", crate::unique_name("token"));
            lines.push_str(&format!("{user_token},{user},{user}\n"));
            users.push((user.clone(), user_token));
        }
        let tokens = write("tokens.csv", &lines)?;

        let [etcd_client, etcd_peer, secure] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let etcd_log = d.join("etcd.log");
        let mut etcd_cmd = Command::new(etcd_bin());
        etcd_cmd
            .arg("--name=enforcer-test")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
            ))
            .arg(format!(
                "--initial-cluster=enforcer-test=http://127.0.0.1:{etcd_peer}"
            ))
            .arg("--log-level=warn");
        let mut etcd = spawn_logged(&mut etcd_cmd, &etcd_log)?;

        let url = format!("https://127.0.0.1:{secure}");
        let apiserver_log = d.join("kube-apiserver.log");
        let mut api_cmd = Command::new(apiserver_bin());
        api_cmd
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={secure}"))
            // 1.20 still opens an unauthenticated port 8080 unless told not to.
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--tls-cert-file={}", serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            // No controller creates the `default` service account of each namespace.
            .arg("--disable-admission-plugins=ServiceAccount")
            // As kubeadm and managed clusters run it (the default refuses privileged pods
            // before any admission webhook sees them).
            .arg("--allow-privileged=true")
            .arg(format!(
                "--service-cluster-ip-range={}",
                options.service_cidr
            ))
            // The `kubernetes` Service's Endpoints would hold 127.0.0.1, which Endpoints
            // validation refuses: nothing reconciles them.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1")
            .args((!options.users.is_empty()).then_some("--authorization-mode=RBAC"))
            .args(&options.extra_args);
        let apiserver = spawn_logged(&mut api_cmd, &apiserver_log)?;
        let mut apiserver = Some(apiserver);

        let kubeconfig = write("kubeconfig", &kubeconfig_yaml(&url, &ca, &token))?;
        let mut user_kubeconfigs = Vec::new();
        for (user, user_token) in &users {
            let file = write(
                &format!("kubeconfig-{user}"),
                &kubeconfig_yaml(&url, &ca, user_token),
            )?;
            user_kubeconfigs.push((user.clone(), file));
        }
        let ready = wait_ready(&kubeconfig, &mut etcd, apiserver.as_mut().expect("set"));
        let config = match ready {
            Ok(config) => config,
            Err(e) => {
                // Drop order kills both before the logs are read (no more writes).
                drop(apiserver.take());
                drop(etcd);
                return Err(e.context(format!(
                    "API server at {url} not ready\n--- kube-apiserver log tail ---\n{}\n\
                     --- etcd log tail ---\n{}",
                    tail_of(&apiserver_log, 3000),
                    tail_of(&etcd_log, 1500)
                )));
            }
        };
        Ok(Self {
            apiserver,
            etcd,
            url,
            token,
            kubeconfig,
            user_kubeconfigs,
            ca_pem: pki.ca_pem,
            config,
            apiserver_log,
            etcd_log,
            dir,
        })
    }

    /// A client for the server (bearer token, the server's CA). Must be called inside a
    /// tokio runtime: the client's worker task runs on the runtime that built it.
    pub fn client(&self) -> ::kube::Client {
        ::kube::Client::try_from(self.config.clone()).expect("a client from a valid config")
    }

    /// The client configuration behind [`ApiServer::client`].
    pub fn config(&self) -> ::kube::Config {
        self.config.clone()
    }

    /// A kubeconfig file (server URL, CA file, token), for `--kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubeconfig of one of [`ApiServerOptions::users`].
    pub fn user_kubeconfig(&self, user: &str) -> Option<&Path> {
        self.user_kubeconfigs
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.as_path())
    }

    /// The agent's arguments to learn its workloads from this server as node `node`:
    /// `--kubernetes --kubeconfig FILE --node-name NODE`.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfig().display().to_string(),
            "--node-name".into(),
            node.into(),
        ]
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The PEM of the CA that signed the server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The test's scratch directory (certificates, kubeconfig, etcd data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the API server (etcd stays): from now on every request fails to connect, as
    /// when a node loses the control plane. Idempotent.
    pub fn kill_apiserver(&mut self) {
        drop(self.apiserver.take());
    }

    /// Whether the API server process is running (not killed, not exited).
    pub fn apiserver_running(&mut self) -> bool {
        match self.apiserver.as_mut() {
            Some(guard) => matches!(guard.child().try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last `max` bytes of the API server's log, for diagnostics.
    pub fn apiserver_log_tail(&self, max: usize) -> String {
        tail_of(&self.apiserver_log, max)
    }

    /// The last `max` bytes of etcd's log, for diagnostics.
    pub fn etcd_log_tail(&self, max: usize) -> String {
        tail_of(&self.etcd_log, max)
    }
}

/// The certificates and keys of one server: a CA, a serving certificate for `IP:127.0.0.1`
/// signed by it (rustls refuses a self-signed certificate that is its own CA), and the
/// service-account signing key (ECDSA P-256, PKCS#8) with its public key.
struct Pki {
    ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Pki {
    fn generate() -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "enforcer-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &ca)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca.pem(),
            serving_cert_pem: leaf_cert.pem(),
            serving_key_pem: leaf_key.serialize_pem(),
            sa_key_pem: sa.serialize_pem(),
            sa_pub_pem: sa.public_key_pem(),
        })
    }
}

fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: enforcer-test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: enforcer-test\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: enforcer-test\n  context:\n    cluster: enforcer-test\n    user: enforcer-test\n    namespace: default\n\
         current-context: enforcer-test\n",
        ca = ca.display()
    )
}

/// Three distinct free loopback ports (bound then released: see [`START_ATTEMPTS`]).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok([ports[0], ports[1], ports[2]])
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<ChildGuard> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // Die with the test process even if it is killed before its guards run.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    Ok(ChildGuard::new(child))
}

/// Polls `/readyz` through a client built from the kubeconfig (which proves the kubeconfig)
/// until it answers `ok` and the API server's own Service `default/kubernetes` exists, either
/// process exits, or [`READY_TIMEOUT`] passes. Runs its own
/// runtime on a thread of its own, so that it works inside a test's runtime too.
fn wait_ready(
    kubeconfig: &Path,
    etcd: &mut ChildGuard,
    apiserver: &mut ChildGuard,
) -> Result<::kube::Config> {
    let path = kubeconfig.to_path_buf();
    let config = std::thread::scope(|s| {
        s.spawn(|| -> Result<::kube::Config> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let kc = ::kube::config::Kubeconfig::read_from(&path)?;
                let config = ::kube::Config::from_custom_kubeconfig(
                    kc,
                    &::kube::config::KubeConfigOptions::default(),
                )
                .await?;
                Ok(config)
            })
        })
        .join()
        .map_err(|_| anyhow!("kubeconfig thread panicked"))?
    })
    .with_context(|| format!("reading {}", kubeconfig.display()))?;

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    let probe_config = config.clone();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = ::kube::Client::try_from(probe_config)?;
                loop {
                    for (what, guard) in [("etcd", &mut *etcd), ("kube-apiserver", &mut *apiserver)]
                    {
                        if let Some(status) = guard.child().try_wait()? {
                            bail!("{what} exited ({status}) before the API server was ready");
                        }
                    }
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    match tokio::time::timeout(Duration::from_secs(5), client.request_text(req))
                        .await
                    {
                        Ok(Ok(text)) if text.trim() == "ok" => {
                            // The API server's own Service is made by its bootstrap controller,
                            // which may still be at it when `/readyz` says ok: a test's first
                            // list must not miss it and then see the cluster change.
                            let req = http::Request::get(
                                "/api/v1/namespaces/default/services/kubernetes",
                            )
                            .body(Vec::new())?;
                            match tokio::time::timeout(
                                Duration::from_secs(5),
                                client.request_text(req),
                            )
                            .await
                            {
                                Ok(Ok(_)) => return Ok(()),
                                Ok(Err(e)) => {
                                    last = format!("/readyz ok; Service default/kubernetes: {e}")
                                }
                                Err(_) => last = "no Service default/kubernetes within 5 s".into(),
                            }
                        }
                        Ok(Ok(text)) => last = text,
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 5 s".into(),
                    }
                    if Instant::now() >= deadline {
                        bail!("/readyz not ok after {READY_TIMEOUT:?}: {last}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })
        .join()
        .map_err(|_| anyhow!("readiness thread panicked"))?
    })?;
    Ok(config)
}

/// Creates a Namespace with these labels and annotations; returns it as stored.
pub async fn create_namespace(
    client: &::kube::Client,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> Result<k8s_openapi::api::core::v1::Namespace> {
    use k8s_openapi::api::core::v1::Namespace;
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": pairs(labels), "annotations": pairs(annotations)}
    }))?;
    ::kube::Api::<Namespace>::all(client.clone())
        .create(&Default::default(), &ns)
        .await
        .with_context(|| format!("create namespace {name}"))
}

/// Creates a Pod bound to `node` (`spec.nodeName`, as a scheduler would set it), then
/// writes `ips` (and phase `Running`) through its `/status` subresource, as a kubelet would;
/// returns it as stored (with its UID).
pub async fn create_pod(
    client: &::kube::Client,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
    ips: &[&str],
) -> Result<k8s_openapi::api::core::v1::Pod> {
    use k8s_openapi::api::core::v1::Pod;
    let pods = ::kube::Api::<Pod>::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": pairs(labels)},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "scratch"}]}
    }))?;
    pods.create(&Default::default(), &pod)
        .await
        .with_context(|| format!("create pod {namespace}/{name}"))?;
    let status = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ips.first(),
        "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
    }});
    pods.patch_status(
        name,
        &::kube::api::PatchParams::default(),
        &::kube::api::Patch::Merge(&status),
    )
    .await
    .with_context(|| format!("patch /status of pod {namespace}/{name}"))
}

fn pairs(pairs: &[(&str, &str)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect()
}

/// Waits until the source publishes a state for which `pred` holds; at most `timeout`.
/// The error shows the last state seen.
pub async fn wait_for_state(
    rx: &mut tokio::sync::watch::Receiver<
        Option<std::sync::Arc<enforcer_policy::cluster::ClusterState>>,
    >,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&enforcer_policy::cluster::ClusterState) -> bool,
) -> Result<std::sync::Arc<enforcer_policy::cluster::ClusterState>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(state) = &current {
            if pred(state) {
                return Ok(state.clone());
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the source stopped while waiting for {what}"),
            Err(_) => bail!("no state with {what} within {timeout:?}; last state: {current:#?}"),
        }
    }
}

/// Polls the source's status every 50 ms until `pred` holds; at most `timeout`.
pub async fn wait_for_status(
    source: &enforcer::sources::kubernetes::KubeSource,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&enforcer::sources::kubernetes::KubeStatus) -> bool,
) -> Result<enforcer::sources::kubernetes::KubeStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = source.status();
        if pred(&status) {
            return Ok(status);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("status never showed {what} within {timeout:?}; last: {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

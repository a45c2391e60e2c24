//! The Kubernetes source (`enforcer::sources::kubernetes`) against the **real
//! kube-apiserver** (1.20.2) and etcd, through the source's public API only (`spawn`,
//! `KubeSource::state`, `KubeSource::status`). Everything here is served by the real server:
//! Pods, Namespaces, Services and core/v1 Endpoints (1.20 has no discovery.k8s.io/v1, so the
//! source's API discovery picks Endpoints). No stand-in is involved; EndpointSlices, 410 Gone,
//! bookmarks and garbage answers are in `kube_endpointslices.rs` (stand-in).
//!
//! Shown: three tenants' namespaces (tenant metadata as labels or annotations); replicas
//! sharing labels are one identity and a different purpose is another; pod IPs written
//! through `/status`; a pod deleted at once is gone, one deleted gracefully stays through its grace period; a
//! namespace relabelled to another tenant changes its pods' identity; a pod label claiming
//! another tenant is ignored and reported; an invalid tenant value and a namespace without a
//! tenant are reported and their pods left out; Services with Endpoints become ClusterServices
//! with their ready backends and target ports; the API server killed -> the state stays and
//! the status says stale; a source restarted without the server enforces the persisted state.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::sources::kubernetes::{self, KubeOptions, KubeSource, STATE_FILE};
use enforcer_policy::cluster::{labels, Backend, ClusterState};
use enforcer_policy::Protocol;
use enforcer_tests::kube::standin::StandIn;
use enforcer_tests::kube::{
    create_namespace, create_pod, require_apiserver, wait_for_state, wait_for_status, ApiServer,
    ApiServerOptions,
};
use enforcer_tests::TempDir;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::Api;
use serde_json::json;

/// Convergence bound on a loaded 2-core machine (typically well under a second).
const WAIT: Duration = Duration::from_secs(60);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "enforcer=info".into()),
        )
        .try_init();
}

fn options(server: &ApiServer, state_dir: &std::path::Path) -> KubeOptions {
    KubeOptions {
        kubeconfig: Some(server.kubeconfig().to_path_buf()),
        node_name: "node-a".into(),
        identity_labels: vec!["app.kubernetes.io/component".into()],
        trust_domain: "cluster.local".into(),
        system_namespaces: Vec::new(),
        state_dir: state_dir.to_path_buf(),
    }
}

/// (tenant, purpose) -> sorted "ns/name" of the identity's pods.
fn identities(state: &ClusterState) -> Vec<(String, String, Vec<String>)> {
    state
        .identities
        .iter()
        .map(|i| {
            (
                i.tenant.clone().unwrap_or_default(),
                i.purpose.clone().unwrap_or_default(),
                i.pods
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect(),
            )
        })
        .collect()
}

fn has_pod_with_ips(state: &ClusterState, name: &str) -> bool {
    state
        .identities
        .iter()
        .flat_map(|i| &i.pods)
        .any(|p| format!("{}/{}", p.namespace, p.name) == name && !p.ips.is_empty())
}

fn pod_count(state: &ClusterState) -> usize {
    state.identities.iter().map(|i| i.pods.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_follows_pods_namespaces_and_services() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    init_tracing();
    let server = ApiServer::start()?;
    let client = server.client();
    let dir = TempDir::new("enforcer-kube-source")?;

    create_namespace(
        &client,
        "acme",
        &[(labels::TENANT, "acme"), (labels::REGION, "eu-west-1")],
        &[],
    )
    .await?;
    create_namespace(&client, "globex", &[(labels::TENANT, "globex")], &[]).await?;
    // Tenant metadata as an annotation counts as much as a label.
    create_namespace(&client, "initech", &[], &[(labels::TENANT, "initech")]).await?;
    // Annotations are free text: this one is no valid label value.
    create_namespace(&client, "bad-tenant", &[], &[(labels::TENANT, "acme corp")]).await?;
    create_namespace(&client, "no-tenant", &[], &[]).await?;

    let retrieval = |hash: &'static str| {
        [
            (labels::PURPOSE, "retrieval"),
            (labels::RING, "prod"),
            ("pod-template-hash", hash),
            ("app.kubernetes.io/component", "rag"),
        ]
    };
    create_pod(
        &client,
        "acme",
        "retriever-1",
        &retrieval("7d9f8"),
        "node-a",
        &["127.82.1.1"],
    )
    .await?;
    create_pod(
        &client,
        "acme",
        "retriever-2",
        &retrieval("5c6b1"),
        "node-b",
        &["127.82.1.2"],
    )
    .await?;
    create_pod(
        &client,
        "acme",
        "evaluator-1",
        &[(labels::PURPOSE, "evaluation"), (labels::RING, "prod")],
        "node-a",
        &["127.82.1.3"],
    )
    .await?;
    // Claims globex by its own label: ignored (the namespace decides) and reported.
    let mut liar = retrieval("7d9f8").to_vec();
    liar.push((labels::TENANT, "globex"));
    create_pod(&client, "acme", "liar", &liar, "node-a", &["127.82.1.4"]).await?;
    create_pod(
        &client,
        "globex",
        "agent-1",
        &[(labels::PURPOSE, "agent")],
        "node-a",
        &["127.82.2.1"],
    )
    .await?;
    create_pod(
        &client,
        "initech",
        "worker-1",
        &[(labels::PURPOSE, "inference")],
        "node-b",
        &["127.82.3.1", "fd7e:82::31"],
    )
    .await?;
    create_pod(&client, "bad-tenant", "p", &[], "node-a", &["127.82.4.1"]).await?;
    create_pod(&client, "no-tenant", "q", &[], "node-a", &["127.82.5.1"]).await?;

    let source = kubernetes::spawn(options(&server, dir.path())).await?;
    let mut rx = source.state();
    let state = wait_for_state(&mut rx, WAIT, "every tenant pod with its IPs", |s| {
        [
            "acme/retriever-1",
            "acme/retriever-2",
            "acme/evaluator-1",
            "acme/liar",
            "globex/agent-1",
            "initech/worker-1",
        ]
        .iter()
        .all(|p| has_pod_with_ips(s, p))
            // The source's first list comes from the watch cache, which may not hold the last
            // writes yet: waited for until the state shows pod q, the last one written.
            && s.problems.len() >= 4
            && s.problems.iter().any(|p| p.ends_with(": q"))
            && s.problems.iter().any(|p| p.starts_with("8 pods outside"))
    })
    .await?;

    let expected = vec![
        (
            "acme".to_string(),
            "evaluation".to_string(),
            vec!["acme/evaluator-1".to_string()],
        ),
        (
            "acme".into(),
            "retrieval".into(),
            vec![
                "acme/liar".into(),
                "acme/retriever-1".into(),
                "acme/retriever-2".into(),
            ],
        ),
        (
            "globex".into(),
            "agent".into(),
            vec!["globex/agent-1".into()],
        ),
        (
            "initech".into(),
            "inference".into(),
            vec!["initech/worker-1".into()],
        ),
    ];
    let mut got = identities(&state);
    got.sort();
    ensure!(got == expected, "identities: {got:#?}");
    let rag = state
        .identities
        .iter()
        .find(|i| i.purpose.as_deref() == Some("retrieval"))
        .context("retrieval identity")?;
    let keys: Vec<&str> = rag.labels.keys().map(String::as_str).collect();
    ensure!(
        keys == [
            labels::PURPOSE,
            labels::REGION,
            labels::RING,
            labels::TENANT,
            "app.kubernetes.io/component",
            "namespace",
            "service_account"
        ],
        "identity labels (pod-template-hash and the pod's tenant label never count): {keys:?}"
    );
    ensure!(rag.labels["service_account"] == "default" && rag.labels[labels::TENANT] == "acme");
    let worker = state
        .identities
        .iter()
        .flat_map(|i| &i.pods)
        .find(|p| p.name == "worker-1")
        .context("worker-1")?;
    ensure!(
        worker.ips == ["127.82.3.1".parse::<IpAddr>()?, "fd7e:82::31".parse()?],
        "pod IPs from /status: {:?}",
        worker.ips
    );
    ensure!(worker.node.as_deref() == Some("node-b") && !worker.uid.is_empty());

    let problems = &state.problems;
    ensure!(problems.len() == 4, "problems: {problems:#?}");
    // The test's pods keep containerd's default NET_RAW (no webhook admitted them): the six
    // of tenants and the two left out for their namespaces (unknown subjects, whose raw
    // frames are judged by nothing all the same).
    ensure!(
        problems.iter().any(|p| p.starts_with(
            "8 pods outside the system namespaces hold what the enforcer cannot contain \
             (admitted before or without `enforcer admission serve`"
        ) && p
            .contains(r#": acme/evaluator-1 (container "main" keeps NET_RAW), "#)
            && p.contains(r#", bad-tenant/p (container "main" keeps NET_RAW), "#)
            && p.ends_with(", and 3 more")),
        "the uncontained pods are reported: {problems:#?}"
    );
    ensure!(
        problems
            .iter()
            .any(|p| p.starts_with("pod acme/liar: label ai-enforcer.io/tenant=\"globex\"")),
        "the tenant claim is reported: {problems:#?}"
    );
    ensure!(
        problems.iter().any(|p| p.starts_with("namespace bad-tenant: annotation ai-enforcer.io/tenant=\"acme corp\": not a valid label value") && p.ends_with(": p")),
        "the invalid tenant is reported with its pods: {problems:#?}"
    );
    ensure!(
        problems
            .iter()
            .any(|p| p.starts_with("namespace no-tenant has no tenant") && p.ends_with(": q")),
        "{problems:#?}"
    );

    let status = wait_for_status(&source, WAIT, "connected", |s| s.connected).await?;
    ensure!(
        status.endpoints_api.as_deref() == Some("v1")
            && !status.persisted
            && status.has_state
            && status.staleness_seconds == Some(0)
            && status.last_error.is_none()
            && status.local_pods == 4
            && status.pods == 6,
        "status: {status:#?}"
    );

    // Services: a ClusterIP Service with two ports and its Endpoints (what the endpoints
    // controller would write; none runs here), and a headless one (not listed).
    let services = Api::<Service>::namespaced(client.clone(), "acme");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "vectors"},
                "spec": {"ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
                ]}
            }))?,
        )
        .await?;
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "headless"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
            }))?,
        )
        .await?;
    // Endpoints refuse loopback addresses: the backends are fd7e:82:: addresses (data only,
    // nothing connects to them).
    Api::<Endpoints>::namespaced(client.clone(), "acme")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "vectors"},
                "subsets": [{
                    "addresses": [{"ip": "fd7e:82::1"}, {"ip": "fd7e:82::2"}],
                    "notReadyAddresses": [{"ip": "fd7e:82::3"}],
                    "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
                }]
            }))?,
        )
        .await?;
    let state = wait_for_state(&mut rx, WAIT, "Service acme/vectors with backends", |s| {
        s.services
            .iter()
            .any(|svc| svc.name == "vectors" && svc.ports.iter().all(|p| !p.backends.is_empty()))
    })
    .await?;
    // `default/kubernetes` is the API server's own Service.
    let acme: Vec<_> = state
        .services
        .iter()
        .filter(|s| s.namespace == "acme")
        .collect();
    ensure!(
        acme.len() == 1,
        "headless Services are not listed: {acme:#?}"
    );
    let svc = acme[0];
    let cidr_ok = svc.cluster_ips.len() == 1
        && matches!(svc.cluster_ips[0], IpAddr::V4(ip) if ip.octets()[..2] == [127, 96]);
    ensure!(
        cidr_ok,
        "ClusterIP from --service-cluster-ip-range: {:?}",
        svc.cluster_ips
    );
    let backends = |ips: &[&str], port: u16| -> Vec<Backend> {
        ips.iter()
            .map(|ip| Backend {
                ip: ip.parse().unwrap(),
                port,
            })
            .collect()
    };
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.port, p.protocol, p.backends.clone()))
        .collect();
    ensure!(
        ports
            == [
                (
                    80,
                    Protocol::Tcp,
                    backends(&["fd7e:82::1", "fd7e:82::2"], 8080)
                ),
                (
                    53,
                    Protocol::Udp,
                    backends(&["fd7e:82::1", "fd7e:82::2"], 5353)
                ),
            ],
        "ready backends with target ports: {ports:#?}"
    );

    // A pod deleted at once is gone; one deleted gracefully keeps its identity through its
    // grace period (no kubelet confirms here: it keeps a deletionTimestamp until the
    // deletion is forced).
    let acme_pods = Api::<Pod>::namespaced(client.clone(), "acme");
    acme_pods
        .delete("retriever-2", &DeleteParams::default().grace_period(0))
        .await?;
    acme_pods
        .delete("evaluator-1", &DeleteParams::default())
        .await?;
    ensure!(
        acme_pods
            .get("evaluator-1")
            .await?
            .metadata
            .deletion_timestamp
            .is_some(),
        "a graceful delete keeps the pod with a deletionTimestamp"
    );
    wait_for_state(
        &mut rx,
        WAIT,
        "retriever-2 gone, evaluator-1 terminating",
        |s| {
            pod_count(s) == 5
                && s.identities
                    .iter()
                    .flat_map(|i| &i.pods)
                    .any(|p| p.name == "evaluator-1")
        },
    )
    .await?;
    acme_pods
        .delete("evaluator-1", &DeleteParams::default().grace_period(0))
        .await?;
    let state = wait_for_state(&mut rx, WAIT, "evaluator-1 gone once forced", |s| {
        pod_count(s) == 4
    })
    .await?;
    let mut got = identities(&state);
    got.sort();
    ensure!(
        got.iter()
            .map(|(t, p, _)| (t.as_str(), p.as_str()))
            .collect::<Vec<_>>()
            == [
                ("acme", "retrieval"),
                ("globex", "agent"),
                ("initech", "inference")
            ],
        "{got:#?}"
    );
    ensure!(got[0].2 == ["acme/liar", "acme/retriever-1"], "{got:#?}");

    // The namespace moves to another tenant: its pods' identity follows.
    Api::<Namespace>::all(client.clone())
        .patch(
            "globex",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {labels::TENANT: "umbrella"}}})),
        )
        .await?;
    let state = wait_for_state(&mut rx, WAIT, "globex's pods in tenant umbrella", |s| {
        s.identities.iter().any(|i| {
            i.tenant.as_deref() == Some("umbrella") && i.pods.iter().any(|p| p.name == "agent-1")
        })
    })
    .await?;
    let tenants: BTreeSet<_> = state
        .identities
        .iter()
        .filter_map(|i| i.tenant.clone())
        .collect();
    ensure!(
        tenants == BTreeSet::from(["acme".into(), "initech".into(), "umbrella".into()]),
        "{tenants:?}"
    );

    // What is published is what is persisted: the state is written after it is published
    // (off the path of a change), so the file follows shortly after.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let current = rx.borrow().clone().context("a state")?;
        let persisted: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(STATE_FILE))?)?;
        let on_disk: ClusterState = serde_json::from_value(persisted["state"].clone())?;
        if on_disk == *current {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "persisted state differs from the published one after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(source);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_and_persists_its_state_without_the_api_server() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    init_tracing();
    let mut server = ApiServer::start()?;
    let client = server.client();
    let dir = TempDir::new("enforcer-kube-outage")?;
    create_namespace(&client, "acme", &[(labels::TENANT, "acme")], &[]).await?;
    create_pod(
        &client,
        "acme",
        "a",
        &[(labels::PURPOSE, "inference")],
        "node-a",
        &["127.82.6.1"],
    )
    .await?;
    create_pod(
        &client,
        "acme",
        "b",
        &[(labels::PURPOSE, "inference")],
        "node-b",
        &["127.82.6.2"],
    )
    .await?;

    let source = spawn_checked(&server, dir.path()).await?;
    let mut rx = source.state();
    let live = wait_for_state(&mut rx, WAIT, "both pods with IPs", |s| {
        has_pod_with_ips(s, "acme/a") && has_pod_with_ips(s, "acme/b")
    })
    .await?;
    wait_for_status(&source, WAIT, "connected", |s| s.connected).await?;

    server.kill_apiserver();
    let status = wait_for_status(&source, WAIT, "disconnected with an error", |s| {
        !s.connected && s.last_error.is_some()
    })
    .await?;
    ensure!(status.has_state && !status.persisted, "{status:#?}");
    // Staleness is counted from the last successful event and grows while the server is away.
    let status = wait_for_status(&source, WAIT, "stale by 2 s or more", |s| {
        s.staleness_seconds.is_some_and(|n| n >= 2)
    })
    .await?;
    ensure!(status.last_sync.is_some(), "{status:#?}");
    ensure!(
        rx.borrow().as_deref() == Some(&*live),
        "the last state stays in force while the API server is unreachable"
    );
    drop(source);

    // A restart without the API server: the persisted state is in force at once.
    let source = spawn_checked(&server, dir.path()).await?;
    let restored = source.state().borrow().clone();
    ensure!(
        restored.as_deref() == Some(&*live),
        "persisted state: {restored:#?}"
    );
    let status = source.status();
    ensure!(
        status.persisted
            && status.has_state
            && !status.connected
            && status.staleness_seconds.is_some_and(|n| n >= 2)
            && status.pods == 2
            && status.local_pods == 1,
        "{status:#?}"
    );
    // And it stays in force while the server does not answer.
    let status = wait_for_status(&source, WAIT, "an error from the unreachable server", |s| {
        s.last_error.is_some()
    })
    .await?;
    ensure!(status.persisted, "{status:#?}");
    ensure!(source.state().borrow().as_deref() == Some(&*live));
    Ok(())
}

async fn spawn_checked(server: &ApiServer, dir: &std::path::Path) -> Result<KubeSource> {
    kubernetes::spawn(options(server, dir))
        .await
        .context("spawn the Kubernetes source")
}

/// The source needs no more than `deploy/rbac.yaml` grants the agent, and Nodes are
/// optional. The server authorizes by RBAC; user `agent` is bound to the agent's ClusterRole
/// exactly as the manifest writes it, user `old-agent` to the same rules without `nodes`
/// (a ClusterRole from before the source read Nodes). With the first, the source lists
/// every part: a pod, and a Node object's address. With the second, every list of Nodes
/// is refused (403), and the source still publishes the pod (a part that could not list
/// used to hold every state back: a fresh agent would judge every pod an unknown subject)
/// and says in its status that Nodes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_rbac_is_enough_and_nodes_are_optional() -> Result<()> {
    use enforcer_tests::deploy::{load_all, Object};
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    if !require_apiserver() {
        return Ok(());
    }
    init_tracing();
    let server = ApiServer::start_with(ApiServerOptions {
        users: vec!["agent".into(), "old-agent".into()],
        ..ApiServerOptions::default()
    })?;
    let client = server.client();
    let dir = TempDir::new("enforcer-kube-rbac")?;

    let role = load_all()?
        .into_iter()
        .find_map(|m| match m.object {
            Object::ClusterRole(r) if r.metadata.name.as_deref() == Some("ai-enforcer-agent") => {
                Some(r)
            }
            _ => None,
        })
        .context("deploy/rbac.yaml has no ClusterRole ai-enforcer-agent")?;
    let mut old = role.clone();
    old.metadata.name = Some("ai-enforcer-agent-old".into());
    for rule in old.rules.iter_mut().flatten() {
        if let Some(resources) = rule.resources.as_mut() {
            resources.retain(|r| r != "nodes");
        }
    }
    ensure!(
        old.rules != role.rules,
        "the manifest's role grants no nodes"
    );
    for (role, user) in [(&role, "agent"), (&old, "old-agent")] {
        let name = role.metadata.name.clone().unwrap_or_default();
        Api::<ClusterRole>::all(client.clone())
            .create(&PostParams::default(), role)
            .await?;
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }))?;
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await?;
    }
    create_namespace(&client, "acme", &[(labels::TENANT, "acme")], &[]).await?;
    create_pod(&client, "acme", "rag-0", &[], "node-a", &["127.84.1.1"]).await?;
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-b"}}))?;
    nodes.create(&PostParams::default(), &node).await?;
    let status =
        json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.84.9.2"}]}});
    nodes
        .patch_status("node-b", &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    let spawn = |user: &str, state: &str| {
        let mut options = options(&server, &dir.path().join(state));
        options.kubeconfig = server.user_kubeconfig(user).map(|p| p.to_path_buf());
        kubernetes::spawn(options)
    };
    let node_b = "127.84.9.2".parse::<IpAddr>()?;
    let agent = spawn("agent", "agent").await?;
    let mut rx = agent.state();
    wait_for_state(&mut rx, WAIT, "rag-0 and node-b's address", |s| {
        has_pod_with_ips(s, "acme/rag-0")
            && s.nodes
                .get("node-b")
                .is_some_and(|ips| ips.contains(&node_b))
    })
    .await?;
    let status = wait_for_status(&agent, WAIT, "connected without errors", |s| {
        s.connected && s.last_error.is_none()
    })
    .await?;
    ensure!(status.has_state, "{status:?}");

    let old_agent = spawn("old-agent", "old-agent").await?;
    let mut rx = old_agent.state();
    let state = wait_for_state(&mut rx, WAIT, "rag-0 without nodes", |s| {
        has_pod_with_ips(s, "acme/rag-0")
    })
    .await?;
    ensure!(
        !state.nodes.contains_key("node-b"),
        "node-b's Node object was read: {:?}",
        state.nodes
    );
    wait_for_status(&old_agent, WAIT, "nodes refused, shown", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("nodes:") && e.contains("forbidden"))
    })
    .await?;
    Ok(())
}

/// The source lists pods as protobuf (the API server writes 20,000 pods as JSON in about a
/// second, as protobuf in a quarter of that): from the real server, each pod decodes to the
/// same slim pod in both encodings, among them pods holding every field the source keeps or
/// summarises (owners, kept and other annotations, host namespaces, `hostPath` and `gitRepo`
/// volumes, probes' and handlers' hosts, `hostPort`s, privileged, added and dropped
/// capabilities, SYN cookies turned off, fields left at their zero values). What the summary
/// and the SYN-cookie note say are checked too,
/// so a field both decoders missed would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_decode_alike_from_protobuf_and_json() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    init_tracing();
    let server = ApiServer::start()?;
    let client = server.client();
    create_namespace(&client, "acme", &[(labels::TENANT, "acme")], &[]).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), "acme");
    let specs = [
        json!({
            "metadata": {
                "name": "mirror",
                "labels": {"app": "etcd", labels::PURPOSE: "inference"},
                "annotations": {
                    "kubernetes.io/config.mirror": "hash-1",
                    "ai-enforcer.io/kind": "vector_db",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a\":[1,2,{\"b\":null}]}"
                },
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "0b8f4c4e-2f7c-4d8e-9d47-6c0f3b0e2a11", "controller": true},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "5b0c1d6e-3a2f-4b7e-8c9d-0e1f2a3b4c5d", "blockOwnerDeletion": false}
                ]
            },
            "spec": {
                "nodeName": "node-a", "hostNetwork": false, "serviceAccountName": "default",
                "containers": [{
                    "name": "c", "image": "scratch",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"containerPort": 80, "protocol": "TCP"}],
                    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}, "runAsUser": 1000}
                }],
                "initContainers": [{
                    "name": "init", "image": "scratch",
                    "securityContext": {"privileged": true, "capabilities": {"drop": ["ALL"]}}
                }],
                "volumes": [
                    {"name": "v", "emptyDir": {}},
                    {"name": "node", "hostPath": {"path": "/var/run", "type": "Directory"}}
                ]
            }
        }),
        json!({
            "metadata": {"name": "host"},
            "spec": {
                "nodeName": "node-b", "hostNetwork": true, "hostPID": true, "hostIPC": true,
                "containers": [{"name": "q", "image": "scratch", "securityContext": {"capabilities": {"drop": ["ALL"]}}}],
                "volumes": [
                    {"name": "h", "hostPath": {"path": "/"}},
                    {"name": "g", "gitRepo": {"repository": "https://example.invalid/r.git"}}
                ]
            }
        }),
        json!({
            "metadata": {"name": "containers"},
            "spec": {
                "containers": [{"name": "c", "image": "scratch", "securityContext": {
                    "privileged": true,
                    "capabilities": {"add": ["SYS_ADMIN"], "drop": ["CAP_NET_RAW"]}
                },
                "readinessProbe": {"httpGet": {"host": "127.0.0.1", "port": 10248}},
                "livenessProbe": {"tcpSocket": {"host": "127.97.0.7", "port": 8080}},
                "lifecycle": {"preStop": {"tcpSocket": {"host": "127.97.0.9", "port": 22}}}},
                {"name": "d", "image": "scratch",
                    "securityContext": {"capabilities": {"drop": ["ALL"]}},
                    "startupProbe": {"httpGet": {"host": "127.97.0.8", "port": 1}},
                    "lifecycle": {"postStart": {"httpGet": {"host": "127.97.0.6", "port": 1}}}}],
                "initContainers": [{"name": "i", "image": "scratch",
                    "securityContext": {"capabilities": {"drop": ["ALL"]}},
                    "ports": [{"containerPort": 80, "hostPort": 80}]}],
                "securityContext": {"sysctls": [
                    {"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"},
                    {"name": "net.ipv4.tcp_syncookies", "value": "0"}
                ]}
            }
        }),
        json!({
            "metadata": {"name": "plain", "labels": {"app": "rag"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "scratch"}]}
        }),
    ];
    for spec in &specs {
        let pod: Pod = serde_json::from_value(spec.clone())?;
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating {}", spec["metadata"]["name"]))?;
    }
    pods.patch_status(
        "plain",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {
            "phase": "Running", "podIP": "127.82.5.1", "hostIP": "127.82.9.1",
            "podIPs": [{"ip": "127.82.5.1"}, {"ip": "fd82::5:1"}]
        }})),
    )
    .await?;
    // Deleted gracefully (a pod bound to a node): it keeps a deletion time while its grace
    // period runs.
    pods.delete(
        "plain",
        &DeleteParams {
            grace_period_seconds: Some(3600),
            ..DeleteParams::default()
        },
    )
    .await?;

    let by_name = |mut pods: Vec<Pod>| {
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        pods
    };
    // Both lists are answered from the watch cache (`resourceVersion=0`), which may not
    // hold the last write yet (one CI run's protobuf list showed "plain" without its
    // deletion time, the JSON list after it with one): each is listed until it holds the
    // deletion, the last write, so both show the same state.
    let deleted = |pods: &[Pod]| {
        pods.iter().any(|p| {
            p.metadata.name.as_deref() == Some("plain") && p.metadata.deletion_timestamp.is_some()
        })
    };
    let protobuf = list_pods_until(&client, kubernetes::Encoding::Protobuf, deleted).await?;
    let json_pods = list_pods_until(&client, kubernetes::Encoding::Json, deleted).await?;
    let (protobuf, json_pods) = (by_name(protobuf), by_name(json_pods));
    ensure!(protobuf.len() == specs.len(), "{protobuf:#?}");
    for (p, j) in protobuf.iter().zip(&json_pods) {
        ensure!(p == j, "protobuf and JSON differ:\n{p:#?}\n{j:#?}");
    }
    let summary = |name: &str| {
        protobuf
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.metadata.annotations.as_ref())
            .and_then(|a| a.get("(agent) uncontained").cloned())
            .unwrap_or_default()
    };
    ensure!(
        summary("mirror")
            == r#"hostPath volume "node" (/var/run); init container "init" privileged; container "c" adds NET_ADMIN; container "c" keeps NET_RAW"#,
        "{}",
        summary("mirror")
    );
    ensure!(
        summary("host")
            == r#"hostPID; hostIPC; hostNetwork; hostPath volume "h" (/); gitRepo volume "g""#,
        "{}",
        summary("host")
    );
    ensure!(
        summary("containers")
            == r#"init container "i" hostPort 80; container "c" livenessProbe host 127.97.0.7; container "c" readinessProbe host 127.0.0.1; container "c" preStop host 127.97.0.9; container "c" privileged; container "c" adds SYS_ADMIN; container "c" keeps NET_RAW; container "d" startupProbe host 127.97.0.8; and 1 more"#,
        "{}",
        summary("containers")
    );
    let named = |name: &str| {
        protobuf
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .with_context(|| format!("no pod {name}"))
    };
    // SYN cookies off is noted (the pod-level security context is not kept).
    for (name, off) in [("containers", true), ("mirror", false)] {
        let annotations = named(name)?
            .metadata
            .annotations
            .clone()
            .unwrap_or_default();
        ensure!(
            annotations.contains_key("(agent) syncookies off") == off,
            "{name}: {annotations:?}"
        );
    }
    let mirror = named("mirror")?;
    ensure!(
        mirror.metadata.owner_references.as_ref().map(Vec::len) == Some(1)
            && mirror.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-a")
            && mirror.metadata.creation_timestamp.is_some(),
        "{mirror:#?}"
    );
    let plain = named("plain")?;
    let status = plain.status.as_ref().context("plain has no status")?;
    ensure!(
        status.pod_ip.as_deref() == Some("127.82.5.1")
            && status.pod_ips.as_ref().map(Vec::len) == Some(2)
            && status.host_ip.as_deref() == Some("127.82.9.1")
            && plain.metadata.deletion_timestamp.is_some()
            && plain
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l["app"] == "rag"),
        "{plain:#?}"
    );

    // A pod written as protobuf with a string that is not UTF-8 (the server stores the
    // bytes; its JSON encoder writes U+FFFD, prost refuses them): the list as protobuf does
    // not decode, and the source lists as JSON instead, that pod included.
    let pod = [
        pb(
            1,
            &[
                pb(1, b"bad-bytes"),
                pb(12, &[pb(1, b"note"), pb(2, b"caf\xe9")].concat()),
            ]
            .concat(),
        ),
        pb(
            2,
            &[
                pb(2, &[pb(1, b"main"), pb(2, b"scratch")].concat()),
                pb(10, b"node-a"),
            ]
            .concat(),
        ),
    ]
    .concat();
    let type_meta = [pb(1, b"v1"), pb(2, b"Pod")].concat();
    let body = [b"k8s\0".to_vec(), pb(1, &type_meta), pb(2, &pod)].concat();
    let request = http::Request::post("/api/v1/namespaces/acme/pods")
        .header("content-type", "application/vnd.kubernetes.protobuf")
        .header("accept", "application/json")
        .body(kube::client::Body::from(body))?;
    let response = client.send(request).await?;
    ensure!(
        response.status().is_success(),
        "creating the pod as protobuf: {}",
        response.status()
    );
    // A list may not hold the pod yet (one CI run's list decoded as protobuf, the pod not in
    // it): listed again until it does, bounded in time and tries. A protobuf list that holds
    // it is the failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for _ in 0..200 {
        let (pods, answered) =
            kubernetes::list_pods(&client, kubernetes::Encoding::Protobuf).await?;
        let listed = pods
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("bad-bytes"));
        ensure!(
            !(listed && answered == kubernetes::Encoding::Protobuf),
            "the protobuf list with a bad string decoded: {answered:?}"
        );
        if answered == kubernetes::Encoding::Json {
            ensure!(listed, "{pods:#?}");
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the pod written as protobuf was never listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the pod written as protobuf was never listed in 200 lists")
}

/// The pods listed the way the source lists them (from the API server's watch cache) in
/// `encoding`, listed again until `settled` holds for them: the cache may answer with a state
/// older than the last write. Bounded at 20 s and 200 lists; an answer in another encoding
/// than the one asked for is an error.
async fn list_pods_until(
    client: &kube::Client,
    encoding: kubernetes::Encoding,
    settled: impl Fn(&[Pod]) -> bool,
) -> Result<Vec<Pod>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for _ in 0..200 {
        let (pods, answered) = kubernetes::list_pods(client, encoding).await?;
        ensure!(
            answered == encoding,
            "asked for {encoding:?}, the server answered {answered:?}"
        );
        if settled(&pods) {
            return Ok(pods);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the {encoding:?} list never settled: {pods:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the {encoding:?} list never settled in 200 lists")
}

/// A length-delimited protobuf field: `tag` (wire type 2) and `bytes`.
fn pb(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for mut n in [u64::from(tag << 3 | 2), bytes.len() as u64] {
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(bytes);
    out
}

/// A pods' watch that cannot resume relists (the source's own list-then-watch of pods, read
/// as protobuf): the real server serves pods from etcd (`--watch-cache-sizes=pods#0`: its
/// watch cache keeps at least 75 s of events) and compacts etcd every second; the source
/// watches through a stand-in proxy, which is stopped while 30 pods are created, then
/// started again once etcd has compacted past the source's version (checked with a watch
/// of the test's own: 410 Gone). The source's watch resumes from there, gets 410, lists
/// again and converges to every pod, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_watch_too_old_to_resume_relists() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    init_tracing();
    let server = ApiServer::start_with(ApiServerOptions {
        extra_args: vec![
            "--watch-cache-sizes=pods#0".into(),
            "--etcd-compaction-interval=1s".into(),
        ],
        ..ApiServerOptions::default()
    })?;
    let client = server.client();
    let dir = TempDir::new("enforcer-kube-relist")?;
    create_namespace(&client, "acme", &[(labels::TENANT, "acme")], &[]).await?;
    let purpose = [(labels::PURPOSE, "retrieval")];
    create_pod(
        &client,
        "acme",
        "first",
        &purpose,
        "node-a",
        &["127.82.8.1"],
    )
    .await?;
    let mut standin = StandIn::start("127.82.8.254", Some(client.clone()), dir.path()).await?;
    let mut source_options = options(&server, &dir.path().join("state"));
    source_options.kubeconfig = Some(standin.kubeconfig().to_path_buf());
    let source = kubernetes::spawn(source_options).await?;
    let mut rx = source.state();
    wait_for_state(&mut rx, WAIT, "the first pod", |s| {
        has_pod_with_ips(s, "acme/first")
    })
    .await?;
    let before = Api::<Pod>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .context("a list without a resourceVersion")?;

    standin.stop();
    for i in 0..30 {
        let ip = format!("127.82.8.{}", 10 + i);
        create_pod(
            &client,
            "acme",
            &format!("later-{i}"),
            &purpose,
            "node-a",
            &[&ip],
        )
        .await?;
    }
    // What the source will meet: once etcd has compacted past it, the server cannot resume
    // a watch from there (bounded: the server compacts every second).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut watch = Api::<Pod>::all(client.clone())
            .watch(&WatchParams::default(), &before)
            .await?
            .boxed();
        let first = tokio::time::timeout(WAIT, watch.try_next()).await??;
        if matches!(&first, Some(WatchEvent::Error(e)) if e.code == 410) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "a watch from {before} still got {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    standin.restart().await?;
    wait_for_state(&mut rx, WAIT, "all 31 pods", |s| {
        pod_count(s) == 31 && has_pod_with_ips(s, "acme/later-29")
    })
    .await?;
    wait_for_status(&source, WAIT, "connected without errors", |s| {
        s.connected && s.last_error.is_none()
    })
    .await?;
    Ok(())
}

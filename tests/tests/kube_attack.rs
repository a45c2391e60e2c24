//! Attacks by a hostile tenant through the **real kube-apiserver** (1.20.2): what the
//! server accepts from a tenant, carried by the real source (`enforcer::sources::kubernetes`)
//! into the bundle. Addresses from 127.85.0.0/16 and fd85::/16 (data only: nothing here
//! connects).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use enforcer::sources::kubernetes::{self, KubeOptions};
use enforcer_policy::cluster::{labels, ClusterOptions};
use enforcer_policy::{Bundle, Protocol};
use enforcer_tests::kube::{
    create_namespace, create_pod, require_apiserver, wait_for_state, ApiServer,
};
use enforcer_tests::{PolicyBundle, TempDir};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

/// Convergence bound on a loaded 2-core machine (typically well under a second).
const WAIT: Duration = Duration::from_secs(60);

/// The identities whose networks hold `ip` at the longest prefix (what the kernel's IP
/// cache gives it); empty for WORLD.
fn owners_of(bundle: &Bundle, ip: IpAddr) -> Vec<String> {
    let holding: Vec<(u8, String)> = bundle
        .identities()
        .iter()
        .flat_map(|i| {
            i.ips
                .iter()
                .filter(|n| n.contains(&ip))
                .map(|n| (n.prefix, i.name.clone()))
        })
        .collect();
    let longest = holding.iter().map(|(p, _)| *p).max();
    holding
        .into_iter()
        .filter(|(p, _)| Some(*p) == longest)
        .map(|(_, n)| n)
        .collect()
}

/// CVE-2020-8554 through the enforcer: the API server lets any tenant that may create a
/// Service write `spec.externalIPs` (no `DenyServiceExternalIPs`), and kube-proxy then
/// sends every pod's connections to that address and port to the tenant's backends. globex
/// claims the inventory's `acme-vectors` address (the demo's, moved to fd85::a:10: the
/// server refuses loopback external IPs) at port 6333: acme's retriever
/// calling its vector database would reach globex's pod. The enforcer judges the address
/// as globex's Service (its backends): acme's call is denied, and the takeover reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_service_external_ip_is_judged_as_its_backends() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    let server = ApiServer::start()?;
    let client = server.client();
    let dir = TempDir::new("at9-kube-attack")?;
    create_namespace(&client, "globex", &[(labels::TENANT, "globex")], &[]).await?;
    create_pod(&client, "globex", "sink", &[], "node-a", &["fd85::2:1"]).await?;
    Api::<Service>::namespaced(client.clone(), "globex")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "trap"},
                "spec": {"externalIPs": ["fd85::a:10"],
                         "ports": [{"name": "q", "port": 6333, "targetPort": 8080}]}
            }))?,
        )
        .await
        .context("the API server refuses externalIPs")?;
    Api::<Endpoints>::namespaced(client.clone(), "globex")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "trap"},
                "subsets": [{"addresses": [{"ip": "fd85::2:1"}],
                             "ports": [{"name": "q", "port": 8080}]}]
            }))?,
        )
        .await?;

    let source = kubernetes::spawn(KubeOptions {
        kubeconfig: Some(server.kubeconfig().to_path_buf()),
        node_name: "node-a".into(),
        identity_labels: Vec::new(),
        trust_domain: "cluster.local".into(),
        system_namespaces: Vec::new(),
        state_dir: dir.path().to_path_buf(),
    })
    .await?;
    let mut rx = source.state();
    let state = wait_for_state(&mut rx, WAIT, "globex/trap with its backend", |s| {
        s.services
            .iter()
            .any(|svc| svc.name == "trap" && svc.ports.iter().all(|p| !p.backends.is_empty()))
            && !s.identities.is_empty()
    })
    .await?;
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&demo)?.flatten() {
        let text = std::fs::read_to_string(entry.path())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.push((name, text.replace("127.10.1.10/32", "fd85::a:10/128")));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let policy = PolicyBundle::new(&files)?;
    let bundle = Bundle::load_with_cluster(
        policy.path(),
        &state,
        &ClusterOptions {
            node_name: "node-a".into(),
            ..Default::default()
        },
    )
    .map_err(|d| anyhow::anyhow!("{d}"))?;
    let vectors: IpAddr = "fd85::a:10".parse()?;
    assert_eq!(
        owners_of(&bundle, vectors),
        ["service/globex/trap"],
        "{:#?}",
        bundle.cluster_problems()
    );
    let d = bundle.decide("acme-retriever", "service/globex/trap", 6333, Protocol::Tcp)?;
    assert!(!d.allowed);
    let problems = bundle.cluster_problems().join("\n");
    assert!(
        problems.contains("external address fd85::a:10") && problems.contains("acme-vectors"),
        "{problems}"
    );
    Ok(())
}

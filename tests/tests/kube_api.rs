//! Smoke test of the API server harness (`enforcer_tests::kube::ApiServer`), against the
//! **real kube-apiserver** (1.20.2, built by `xtask/scripts/kube-apiserver.sh`) and etcd: a
//! namespace with labels, a pod bound to a node (`spec.nodeName`), its IPs written through the
//! `/status` subresource, and a field-selected list that finds it. No stand-in is involved.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use enforcer_tests::kube::{require_apiserver, ApiServer};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_serves_namespaces_pods_status_and_field_selectors() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    let server = ApiServer::start()?;
    let client = server.client();

    let labels = BTreeMap::from([("ai-enforcer.io/tenant".to_string(), "acme".to_string())]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("smoke".into()),
                    labels: Some(labels.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .context("create namespace")?;
    let ns = namespaces.get("smoke").await?;
    ensure!(
        ns.metadata.labels.as_ref() == Some(&labels),
        "namespace labels: {:?}",
        ns.metadata.labels
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "smoke");
    for (name, node) in [("on-node-a", "node-a"), ("on-node-b", "node-b")] {
        pods.create(
            &PostParams::default(),
            &Pod {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: Some(node.into()),
                    containers: vec![Container {
                        name: "main".into(),
                        image: Some("scratch".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("create pod {name}"))?;
    }
    let status = serde_json::json!({
        "status": {"podIP": "127.82.0.10", "podIPs": [{"ip": "127.82.0.10"}], "phase": "Running"}
    });
    pods.patch_status("on-node-a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("patch /status")?;

    let listed = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await?;
    let names: Vec<_> = listed
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    ensure!(names == ["on-node-a"], "field-selected list: {names:?}");
    let ips: Vec<_> = listed.items[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    ensure!(ips == ["127.82.0.10"], "pod IPs after /status: {ips:?}");
    Ok(())
}

/// Dropping the harness kills both processes and removes their directory.
#[test]
fn apiserver_is_removed_on_drop() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    let mut server = ApiServer::start()?;
    ensure!(server.apiserver_running(), "API server not running");
    let dir = server.dir().to_path_buf();
    let url = server.url().to_string();
    ensure!(dir.join("kubeconfig").is_file());
    drop(server);
    ensure!(!dir.exists(), "{} left behind", dir.display());
    let port: u16 = url.rsplit(':').next().unwrap_or_default().parse()?;
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on {url}"
    );
    Ok(())
}

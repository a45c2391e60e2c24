//! The ingress allowlist covers pods of other nodes (issue 7 item 3): node 2 runs its agent
//! with `--kubernetes` against a cluster state persisted in its state directory (the API
//! server in its kubeconfig is unreachable on purpose: the agent enforces the persisted state,
//! as after a restart without the API server). The state holds two pods on *another* node,
//! `acme/remote-rag` (tenant acme) and `globex/remote-agent` (tenant globex); node 2 hosts the
//! inventory's `acme-vectors` (ingress `enforce`). A SYN from node 1's namespace, on a raw
//! socket, from each pod's address and carrying that pod's identity with a tag computed by
//! `enforcer::wire::option` under the shared key:
//!
//! - claiming the acme pod is accepted and recorded in node 2's `WIRE_PEERS` (before the
//!   column covered every cluster identity, it was refused as `not_allowed`: the compile had
//!   rows for local subjects only);
//! - claiming the globex pod is refused at ingress with one `not_allowed` event naming it,
//!   its tenant and the Cedar policy that forbids it (`tenant-isolation`);
//! - node 2 runs with `--wire-accept-v1-until` an hour ahead (a rolling upgrade): a version 1
//!   option (no time) from the acme pod is accepted.
//!
//! Addresses: `fd86::1` (node 1), `fd86::5`/`fd86::6` (the remote pods, on node 1's end) and
//! `fd86::2` (node 2), on the test's own veth only; names start with `ik`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use enforcer::wire::{now_stamp, option, option_version, parse_keys, verified_peers, FlowKey};
use enforcer_policy::cluster::{labels, ClusterIdentity, ClusterOptions, ClusterPod, ClusterState};
use enforcer_tests::fixtures::SCHEMA;
use enforcer_tests::probe::ProbeServer;
use enforcer_tests::raw_tcp;
use enforcer_tests::util::wait_until;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, NetNs, PinDir, PolicyBundle, TempDir,
    TestCgroup, Veth,
};
use serde_json::Value;

const NODE1: &str = "fd86::1";
const NODE2: &str = "fd86::2";
const ACME_POD: &str = "fd86::5";
const GLOBEX_POD: &str = "fd86::6";
const DB_PORT: u16 = 6333;
const KEY1: &str = "1 0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const NODE_NAME: &str = "ik-node2";

const POLICIES: &str = r#"@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };

@id("tenant-isolation")
@atlas("AML.T0085.000")
forbid (principal, action, resource)
when { resource has tenant && principal.tenant != resource.tenant };
"#;

fn inventory() -> String {
    format!(
        r#"tenants: [acme, globex]
workloads: []
endpoints:
  - name: acme-vectors
    tenant: acme
    kind: vector_db
    ips: [{NODE2}/128]
    ports: [{{port: {DB_PORT}, protocol: tcp, action: query}}]
    datasets: [acme-kb]
    ingress: enforce
"#
    )
}

/// A pod of `namespace` (tenant = namespace) on another node.
fn remote_pod(namespace: &str, ip: &str) -> Result<ClusterIdentity> {
    let mut l = BTreeMap::new();
    l.insert("namespace".to_string(), namespace.to_string());
    l.insert("service_account".to_string(), "default".to_string());
    l.insert(labels::TENANT.to_string(), namespace.to_string());
    l.insert(labels::PURPOSE.to_string(), "retrieval".to_string());
    l.insert(labels::RING.to_string(), "prod".to_string());
    Ok(ClusterIdentity {
        labels: l,
        namespace: namespace.into(),
        service_account: "default".into(),
        tenant: Some(namespace.into()),
        purpose: Some("retrieval".into()),
        ring: Some("prod".into()),
        pods: vec![ClusterPod {
            namespace: namespace.into(),
            name: format!("{namespace}-remote-0"),
            uid: format!("ik-uid-{namespace}"),
            node: Some("ik-node1".into()),
            ips: vec![ip.parse()?],
            host_network: false,
            created: "2026-01-01T00:00:00Z".into(),
        }],
        marks: Default::default(),
    })
}

/// The vector DB stand-in: `probe --serve` in node 2's namespace and a cgroup of node 2's
/// subtree, so that its listening socket is judged by node 2's ingress program.
type DbServer = ProbeServer;

/// Sends one SYN from `[source]:sport` to the DB with `extra` TCP options (a multiple of 4
/// bytes) on a raw socket of the test process (no enforcer judges it) inside node 1's
/// namespace; the kernel fills in the IPv6 header and the checksum (`IPV6_CHECKSUM`).
fn raw_syn(ns: &NetNs, source: &str, sport: u16, extra: &[u8]) -> Result<()> {
    let tcp = raw_tcp::segment(sport, DB_PORT, raw_tcp::SYN, (raw_tcp::ISN, 0), extra)?;
    ns.run_in(|| raw_tcp::send(source, NODE2, &tcp, false))?
}

/// MSS, then the identity option (20 bytes): 24 bytes of options.
fn options_with(identity_option: &[u8; 20]) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xa0];
    o.extend_from_slice(identity_option);
    o
}

fn key(line: &str) -> FlowKey {
    parse_keys(Path::new("key"), line)
        .expect("test key")
        .current
}

/// Field order is drop order: the server and agent before the cgroups they use.
struct Bed {
    _db: DbServer,
    node2: Agent,
    n1: NetNs,
    _veth: Veth,
    _n2: NetNs,
    _db_cg: TestCgroup,
    _node2_cg: TestCgroup,
    _root: TestCgroup,
    _pins: PinDir,
    _bundle: PolicyBundle,
    _tmp: TempDir,
}

#[test]
fn a_pod_of_another_node_is_judged_by_the_policy_at_ingress() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("ik"))?;
    let node2_cg = root.child("node2")?;
    let db_cg = node2_cg.child("acme-vectors")?;
    let bundle = PolicyBundle::new(&[
        ("inventory.yaml", &inventory()),
        ("schema.cedarschema", SCHEMA),
        ("policies.cedar", POLICIES),
    ])?;
    let tmp = TempDir::new("ik-state")?;
    let state_dir = tmp.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let state = ClusterState {
        trust_domain: "cluster.local".into(),
        identities: vec![
            remote_pod("acme", ACME_POD)?,
            remote_pod("globex", GLOBEX_POD)?,
        ],
        services: vec![],
        unidentified_ips: vec![],
        nodes: Default::default(),
        pod_cidrs: vec![],
        problems: vec![],
    };
    let persisted = enforcer::sources::kubernetes::PersistedState {
        version: 1,
        last_sync: "2026-01-01T00:00:00Z".into(),
        identity_labels: vec![],
        state: state.clone(),
    };
    std::fs::write(
        state_dir.join(enforcer::sources::kubernetes::STATE_FILE),
        serde_json::to_string(&persisted)?,
    )?;
    // An API server that is never there (a closed port on loopback, in this test's range):
    // the agent enforces the persisted state.
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ik\n  cluster:\n    server: https://127.86.0.1:9\n    insecure-skip-tls-verify: true\nusers:\n- name: ik\n  user:\n    token: ik\ncontexts:\n- name: ik\n  context:\n    cluster: ik\n    user: ik\ncurrent-context: ik\n",
    )?;
    let keys = tmp.path().join("node2.keys");
    enforcer_tests::util::write_secret(&keys, format!("{KEY1}\n"))?;

    // The identity numbers node 2 compiles for the two pods.
    let options = ClusterOptions {
        node_name: NODE_NAME.into(),
        ..ClusterOptions::default()
    };
    let b = enforcer_policy::Bundle::load_with_cluster(bundle.path(), &state, &options)
        .map_err(|d| anyhow::anyhow!("bundle: {d}"))?;
    let id_of = |ns: &str| -> Result<u32> {
        b.identities()
            .iter()
            .find(|i| i.labels.get("namespace").map(String::as_str) == Some(ns))
            .map(|i| i.id)
            .with_context(|| format!("no cluster identity for {ns}"))
    };
    let (acme, globex) = (id_of("acme")?, id_of("globex")?);

    let n1 = NetNs::create(&unique_name("ik1"))?;
    let n2 = NetNs::create(&unique_name("ik2"))?;
    let veth = Veth::create(
        &n1,
        &[
            &format!("{NODE1}/64"),
            &format!("{ACME_POD}/64"),
            &format!("{GLOBEX_POD}/64"),
        ],
        &n2,
        &[&format!("{NODE2}/64")],
    )?;
    let pins = PinDir::new("ik-node2")?;
    let mut config = AgentConfig::new(bundle.path(), &node2_cg.relative_str(), pins.path());
    config.extra_args = vec![
        "--flow-key-file".into(),
        keys.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        NODE_NAME.into(),
        // A rolling upgrade in progress: version 1 options (no time) still accepted.
        "--wire-accept-v1-until".into(),
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
            .to_string(),
    ];
    let node2 = Agent::start(config)?;
    let db = DbServer::start(Some(&n2), &db_cg, SocketAddr::new(NODE2.parse()?, DB_PORT))?;
    let bed = Bed {
        _db: db,
        node2,
        n1,
        _veth: veth,
        _n2: n2,
        _db_cg: db_cg,
        _node2_cg: node2_cg,
        _root: root,
        _pins: pins,
        _bundle: bundle,
        _tmp: tmp,
    };
    let pin_dir = enforcer::datapath::pin_dir(&bed.node2.config().pin_path);
    let k = key(KEY1);
    let d: IpAddr = NODE2.parse()?;
    let verified = |client: SocketAddr| -> Option<u32> {
        verified_peers(&pin_dir)
            .ok()?
            .into_iter()
            .find(|p| p.client == client)
            .map(|p| p.identity)
    };

    // The acme pod of another node: accepted, its claim recorded.
    let s: IpAddr = ACME_POD.parse()?;
    raw_syn(
        &bed.n1,
        ACME_POD,
        46001,
        &options_with(&option(&k, acme, now_stamp()?, s, d, 46001, DB_PORT)),
    )?;
    let client = SocketAddr::new(s, 46001);
    ensure!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            verified(client) == Some(acme)
        }),
        "node 2 did not accept the remote acme pod's claim: peers {:?}, events {:?}\n{}",
        verified_peers(&pin_dir),
        bed.node2.verdict_events(),
        bed.node2.stderr_tail()
    );

    // The globex pod of another node: a valid tag, but the policy does not allow it here.
    let s: IpAddr = GLOBEX_POD.parse()?;
    raw_syn(
        &bed.n1,
        GLOBEX_POD,
        46002,
        &options_with(&option(&k, globex, now_stamp()?, s, d, 46002, DB_PORT)),
    )?;
    let is_refusal = |e: &Value| {
        e["hook"] == "ingress" && e["reason"] == "not_allowed" && e["subject"]["identity"] == globex
    };
    bed.node2
        .wait_for(1, Duration::from_secs(10), is_refusal)
        .context("the remote globex pod's claim was not refused")?;
    ensure!(verified(SocketAddr::new(s, 46002)).is_none());
    let refusals = bed
        .node2
        .verdict_events()?
        .into_iter()
        .filter(|e| e["hook"] == "ingress")
        .collect::<Vec<_>>();
    ensure!(
        refusals.len() == 1 && is_refusal(&refusals[0]),
        "want exactly the globex refusal at ingress: {refusals:?}"
    );
    let e = &refusals[0];
    ensure!(e["subject"]["tenant"] == "globex", "{e}");
    ensure!(e["policy"]["id"] == "tenant-isolation", "{e}");

    // The acme pod's node still runs a release whose option has no time (version 1): within
    // `--wire-accept-v1-until` its claim is accepted (without the flag it is `stale_tag`:
    // `tests/tests/wire.rs`).
    let s: IpAddr = ACME_POD.parse()?;
    let v1 = option_version(
        &k,
        acme,
        7,
        enforcer_common::wire::VERSION_1,
        s,
        d,
        46003,
        DB_PORT,
    );
    raw_syn(&bed.n1, ACME_POD, 46003, &options_with(&v1))?;
    ensure!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            verified(SocketAddr::new(s, 46003)) == Some(acme)
        }),
        "node 2 refused a version 1 option during the grace: events {:?}",
        bed.node2.verdict_events()
    );
    Ok(())
}

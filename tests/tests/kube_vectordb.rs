//! A vector database running as a Kubernetes pod, marked by its annotations
//! (`ai-enforcer.io/kind: vector_db`, `ai-enforcer.io/ingress: enforce`,
//! `ai-enforcer.io/datasets`), end to end: Namespaces and Pods in the **real
//! kube-apiserver**, the kubelet's cgroup layout under a test root, the agent run as
//! `enforcer run --kubernetes` with a flow key, deciding in the real kernel.
//!
//! - an acme client pod's connection to the DB pod is tracked (`flow.opened` names the DB as
//!   a `vector_db` with its dataset) and carries the identity option, which the DB side
//!   verifies (`WIRE_PEERS` holds the client pod's identity for that 4-tuple);
//! - a process no enforcer manages, connecting from the client pod's address, is dropped at
//!   the DB pod's ingress (`missing_tag`, one event naming the DB pod's identity), while the
//!   same process reaches an unmarked pod of the same namespace: the annotation is what
//!   turns the check on;
//! - the DB pod's own `ingress: off` cannot lower its namespace's floor: with the namespace
//!   annotated `enforce`, a pod annotated `off` is checked all the same;
//! - a DB pod's `ai-enforcer.io/rate-limit` gives each caller identity its own burst, and
//!   refuses the next connect (`rate_limited`);
//! - a DB pod in a network namespace of its own is checked at an address that is not its own
//!   too (its IPv6 link-local address, which its neighbours on the link reach).
//!
//! Addresses: 127.94.1.0/24 (loopback), and `fd94:1::/64` with `fe80::94:*` only on a veth
//! between the test's own network namespaces; cgroup, netns and namespace names start with
//! `kv-`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::wire::verified_peers;
use enforcer_tests::cli::wait_notices;
use enforcer_tests::kube::{create_namespace, require_apiserver, ApiServer};
use enforcer_tests::kubelet::{Driver, Node, PodCgroups, Qos};
use enforcer_tests::probe::{attempt, ProbeServer};
use enforcer_tests::util::wait_until;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, NetNs, Outcome, PinDir, PolicyBundle, Probe,
    TempDir, TestCgroup, Veth,
};
use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::{json, Value};

const NODE: &str = "kv-node";
const DB_PORT: u16 = 6333;
/// A bulk transfer's sink.
const BULK_PORT: u16 = 6340;
const TENANT: &str = "ai-enforcer.io/tenant";
const KIND: &str = "ai-enforcer.io/kind";
const INGRESS: &str = "ai-enforcer.io/ingress";
const DATASETS: &str = "ai-enforcer.io/datasets";
const RATE_LIMIT: &str = "ai-enforcer.io/rate-limit";
const KEY: &str = "1 000102030405060708090a0b0c0d0e0f";
const WAIT: Duration = Duration::from_secs(10);

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 94, 1, n)
}

/// Creates a pod with these annotations bound to this node, then writes its address and
/// phase through `/status` as a kubelet would; returns its UID.
async fn create_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    annotations: &[(&str, &str)],
    addr: IpAddr,
) -> Result<String> {
    let pods = kube::Api::<Pod>::namespaced(client.clone(), namespace);
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "scratch"}]}
    }))?;
    let created = pods
        .create(&Default::default(), &pod)
        .await
        .with_context(|| format!("create pod {namespace}/{name}"))?;
    let status = json!({"status": {
        "phase": "Running", "podIP": addr.to_string(), "podIPs": [{"ip": addr.to_string()}],
    }});
    pods.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .with_context(|| format!("patch /status of pod {namespace}/{name}"))?;
    created.metadata.uid.context("a created pod has a UID")
}

/// One pod of the test: its cgroups (an app container started) and, for servers, the
/// listener in its container (so that the DB side's programs judge it).
struct TestPod {
    server: Option<ProbeServer>,
    cgroups: PodCgroups,
}

impl TestPod {
    fn container(&self) -> &TestCgroup {
        &self.cgroups.containers()[0]
    }
}

/// A runtime for the client, the real API server, a client of it, and this node's kubelet
/// cgroup root.
struct Cluster {
    rt: tokio::runtime::Runtime,
    server: ApiServer,
    client: kube::Client,
    node: Node,
}

impl Cluster {
    fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let server = ApiServer::start()?;
        let client = rt.block_on(async { server.client() });
        let node = Node::create("kv-node")?;
        Ok(Self {
            rt,
            server,
            client,
            node,
        })
    }
}

/// Creates the pods of `specs` in the API server (their namespaces must exist); returns their
/// UIDs.
async fn create_pods(client: &kube::Client, specs: &[PodSpec<'_>]) -> Result<Vec<String>> {
    let mut uids = Vec::new();
    for (namespace, name, annotations, n, _) in specs {
        uids.push(create_pod(client, namespace, name, annotations, IpAddr::V4(ip(*n))).await?);
    }
    Ok(uids)
}

/// Starts the pods of `specs` on `node` as a kubelet would (pod cgroup, one app container),
/// each server listening in its container on [`DB_PORT`].
fn start_pods(node: &Node, specs: &[PodSpec<'_>], uids: &[String]) -> Result<Vec<TestPod>> {
    let mut pods = Vec::new();
    for ((_, _, _, n, serves), uid) in specs.iter().zip(uids) {
        let mut cgroups = node.start_pod(uid, Driver::Systemd, Qos::Burstable)?;
        cgroups.add_container()?;
        let server = if *serves {
            let addr = SocketAddr::new(IpAddr::V4(ip(*n)), DB_PORT);
            Some(ProbeServer::start(None, &cgroups.containers()[0], addr)?)
        } else {
            None
        };
        pods.push(TestPod { server, cgroups });
    }
    Ok(pods)
}

/// The agent as `enforcer run --kubernetes` on [`NODE`], with the demo's policies (one
/// tenant, acme) and a flow key; its bundle, key and pins live as long as it does.
struct RunningAgent {
    agent: Agent,
    pins: PinDir,
    _bundle: PolicyBundle,
    _keys: TempDir,
}

impl RunningAgent {
    fn start(server: &ApiServer, node: &Node) -> Result<Self> {
        let demo = enforcer_tests::fixtures::demo_policies_dir();
        let read = |name: &str| std::fs::read_to_string(demo.join(name));
        let bundle = PolicyBundle::new(&[
            ("inventory.yaml", "tenants: [acme, globex]\n"),
            ("schema.cedarschema", &read("schema.cedarschema")?),
            ("baseline.cedar", &read("baseline.cedar")?),
        ])?;
        let keys = TempDir::new("kv-keys")?;
        let key_file = keys.path().join("flow.keys");
        enforcer_tests::util::write_secret(&key_file, format!("{KEY}\n"))?;
        let pins = PinDir::new("kv-pins")?;
        let mut config = AgentConfig::new(bundle.path(), &node.root().relative_str(), pins.path());
        config.extra_args = server.agent_args(NODE);
        config
            .extra_args
            .extend(["--flow-key-file".into(), key_file.display().to_string()]);
        config.ready_timeout = Duration::from_secs(60);
        Ok(Self {
            agent: Agent::start(config)?,
            pins,
            _bundle: bundle,
            _keys: keys,
        })
    }
}

/// A pod of the test: (namespace, name, annotations, last octet of its address, serves on
/// [`DB_PORT`]).
type PodSpec<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u8, bool);

/// The events of packets dropped as they left (`pred`), once at least one is there and the
/// events file has settled: a SYN and its retransmissions within the aggregation window
/// make one event (aggregated) or one per transmission.
fn dropped_as_it_leaves(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    agent.wait_for(1, WAIT, &pred)?;
    Ok(agent
        .settled_events(Duration::from_millis(1500), WAIT)?
        .into_iter()
        .filter(|e| pred(e))
        .collect())
}

fn ingress_events(agent: &Agent) -> Result<Vec<Value>> {
    Ok(agent
        .verdict_events()?
        .into_iter()
        .filter(|e| e["hook"] == "ingress")
        .collect())
}

#[test]
fn an_annotated_vector_db_pod_is_tracked_and_checked_at_ingress() -> Result<()> {
    if !require_kernel() || !require_apiserver() {
        return Ok(());
    }
    let Cluster {
        rt,
        server,
        client,
        node,
    } = Cluster::start()?;
    // A process no enforcer manages: outside the node's cgroup root.
    let stranger = TestCgroup::create(unique_name("kv-stranger"))?;
    let pods_spec: [PodSpec; 4] = [
        (
            "kv-acme",
            "vectors-0",
            vec![
                (KIND, "vector_db"),
                (INGRESS, "enforce"),
                (DATASETS, "acme-kb"),
            ],
            1,
            true,
        ),
        ("kv-acme", "client", vec![], 2, false),
        ("kv-acme", "plain-db", vec![], 3, true),
        // Its own `off` is below its namespace's floor: checked all the same.
        (
            "kv-strict",
            "vectors-0",
            vec![(KIND, "vector_db"), (INGRESS, "off")],
            4,
            true,
        ),
    ];
    let uids = rt.block_on(async {
        create_namespace(&client, "kv-acme", &[(TENANT, "acme")], &[]).await?;
        create_namespace(
            &client,
            "kv-strict",
            &[(TENANT, "acme")],
            &[(INGRESS, "enforce")],
        )
        .await?;
        create_pods(&client, &pods_spec).await
    })?;
    let pods = start_pods(&node, &pods_spec, &uids)?;
    let [db, client_pod, plain, strict] = &pods[..] else {
        unreachable!()
    };

    let running = RunningAgent::start(&server, &node)?;
    let agent = &running.agent;
    let pin_dir = enforcer::datapath::pin_dir(running.pins.path());

    // 1. The client pod reaches the DB pod once the agent knows both (bounded wait).
    let to = |n: u8| attempt("tcp", IpAddr::V4(ip(n)), DB_PORT);
    // From the client pod's own address, as a pod's traffic is (on loopback the kernel
    // would pick 127.0.0.1, which is nobody's).
    let from_client = |n: u8| format!("{}@{}", to(n), ip(2));
    let mut last = Vec::new();
    let learned = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        last = Probe::new()
            .in_cgroup(client_pod.container())
            .run(&[from_client(1)])
            .unwrap_or_default();
        last.len() == 1 && last[0].outcome == Outcome::Ok
    });
    ensure!(
        learned,
        "the client pod never reached the DB pod: {last:?}; status: {:#}; stderr:\n{}",
        agent.status().unwrap_or_default(),
        agent.stderr_tail()
    );
    // The server reports each accept on its stdout: collected, bounded.
    let db_server = db.server.as_ref().context("the DB pod serves")?;
    let mut accepted = Vec::new();
    ensure!(
        wait_until(WAIT, Duration::from_millis(20), || {
            accepted.extend(db_server.accepted());
            !accepted.is_empty()
        }),
        "the DB accepted nothing"
    );
    ensure!(accepted.len() == 1, "accepted {accepted:?}");
    let client_addr = accepted[0];
    ensure!(client_addr.ip() == IpAddr::V4(ip(2)), "{client_addr}");

    // Tracked: flow.opened names the DB pod as a vector_db with its dataset.
    let opened = wait_notices(agent, "flow.opened", 1, WAIT, |e| {
        e.pointer("/flow/source/port").and_then(Value::as_u64)
            == Some(u64::from(client_addr.port()))
    })?;
    let o = &opened[0];
    ensure!(o["destination"]["kind"] == "vector_db", "{o}");
    ensure!(o["dataset_scope"] == json!(["acme-kb"]), "{o}");
    ensure!(o["destination"]["tenant"] == "acme", "{o}");
    let db_identity = o["destination"]["identity"]
        .as_u64()
        .context("flow.opened has the DB's identity")?;
    let client_identity = o["subject"]["identity"]
        .as_u64()
        .context("flow.opened has the client's identity")?;
    ensure!(
        o["destination"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("kv-acme/")),
        "{o}"
    );

    // Tagged and verified: the DB side holds the client pod's identity for that 4-tuple.
    let verified = |peer: SocketAddr| -> Option<u32> {
        verified_peers(&pin_dir)
            .ok()?
            .into_iter()
            .find(|p| p.client == peer)
            .map(|p| p.identity)
    };
    ensure!(
        wait_until(WAIT, Duration::from_millis(20), || verified(client_addr)
            == Some(client_identity as u32)),
        "the DB side did not verify {client_addr} as {client_identity}: {:?}",
        verified_peers(&pin_dir)
    );
    ensure!(
        ingress_events(agent)?.is_empty(),
        "{:?}",
        ingress_events(agent)?
    );

    // 2. An unmanaged process from the client pod's address: dropped at the DB's ingress,
    //    exactly one event; the unmarked pod of the same namespace is not checked.
    let r = Probe::new().in_cgroup(&stranger).run_one(&from_client(1))?;
    ensure!(r.outcome == Outcome::Error, "unmanaged client got {r:?}");
    expect_one_ingress(agent, db_identity, "missing_tag")?;
    Probe::new().in_cgroup(&stranger).expect_outcome(
        &from_client(3),
        Outcome::Ok,
        "an unmarked pod is not checked at ingress",
    )?;
    let plain_server = plain.server.as_ref().context("the plain pod serves")?;
    ensure!(
        wait_until(WAIT, Duration::from_millis(20), || !plain_server
            .accepted()
            .is_empty()),
        "the unmarked pod accepted nothing"
    );

    // 3. The namespace's floor beats the pod's own `off`.
    let r = Probe::new().in_cgroup(&stranger).run_one(&from_client(4))?;
    ensure!(
        r.outcome == Outcome::Error,
        "a pod under an enforce floor got {r:?}"
    );
    let strict_events = wait_ingress(agent, |e| {
        e["destination"]["ip"] == ip(4).to_string() && e["reason"] == "missing_tag"
    })?;
    ensure!(strict_events.len() == 1, "{strict_events:?}");
    ensure!(strict
        .server
        .as_ref()
        .is_some_and(|s| s.accepted().is_empty()));
    // And the problem was reported, naming the pod.
    wait_notices(agent, "cluster.problem", 1, WAIT, |e| {
        let text = e.to_string();
        text.contains("kv-strict/vectors-0") && text.contains("floor")
    })?;
    drop(pods);
    Ok(())
}

/// The ingress events matching `pred` once the agent has been quiet for 1.5 s (a
/// retransmitted SYN must not add one), at least one within [`WAIT`].
fn wait_ingress(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    agent.wait_for(1, WAIT, |e| e["hook"] == "ingress" && pred(e))?;
    Ok(agent
        .settled_events(Duration::from_millis(1500), WAIT)?
        .into_iter()
        .filter(|e| e["hook"] == "ingress" && pred(e))
        .collect())
}

fn expect_one_ingress(agent: &Agent, db: u64, reason: &str) -> Result<()> {
    let events = wait_ingress(agent, |e| {
        e["destination"]["identity"] == db && e["reason"] == reason
    })?;
    ensure!(events.len() == 1, "want one {reason} event: {events:?}");
    let e = &events[0];
    ensure!(
        e["verdict"] == "deny" && e["type"] == "connection.denied",
        "{e}"
    );
    ensure!(e["destination"]["port"] == DB_PORT, "{e}");
    Ok(())
}

/// A DB pod's `ai-enforcer.io/rate-limit` gives each caller identity its own budget, enforced
/// at `connect()` in the kernel: at one connection per 1000 s with a burst of 3, each of two
/// client pods (two namespaces of acme: two identities) gets exactly 3 connections, and the
/// 4th is refused with one `connection.denied` event, reason `rate_limited`, naming the
/// caller and the DB pod. (The refill over the test's seconds is a few thousandths of a
/// connection: the count is exact.)
#[test]
fn a_rate_limited_pod_gives_each_caller_its_own_burst_then_refuses() -> Result<()> {
    if !require_kernel() || !require_apiserver() {
        return Ok(());
    }
    const BURST: usize = 3;
    let Cluster {
        rt,
        server,
        client,
        node,
    } = Cluster::start()?;
    let limit = format!("connections_per_second=0.001, burst={BURST}");
    let pods_spec: [PodSpec; 3] = [
        (
            "kv-rate",
            "vectors-0",
            vec![(KIND, "vector_db"), (RATE_LIMIT, &limit)],
            11,
            true,
        ),
        ("kv-rate", "client", vec![], 12, false),
        ("kv-rate-b", "client", vec![], 13, false),
    ];
    let uids = rt.block_on(async {
        for namespace in ["kv-rate", "kv-rate-b"] {
            create_namespace(&client, namespace, &[(TENANT, "acme")], &[]).await?;
        }
        create_pods(&client, &pods_spec).await
    })?;
    let pods = start_pods(&node, &pods_spec, &uids)?;
    let running = RunningAgent::start(&server, &node)?;
    let agent = &running.agent;

    for (caller, n) in [(&pods[1], 12), (&pods[2], 13)] {
        let probe = Probe::new().in_cgroup(caller.container());
        let to_db = format!("{}@{}", attempt("tcp", IpAddr::V4(ip(11)), DB_PORT), ip(n));
        // Until the agent knows both pods, connects are refused before the budget is
        // looked at (unknown subject); every connect let through spends a connection.
        let mut spent = 0;
        let mut last = Vec::new();
        let reached = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            last = probe.run(std::slice::from_ref(&to_db)).unwrap_or_default();
            spent += last.iter().filter(|r| r.outcome != Outcome::Eperm).count();
            last.first().is_some_and(|r| r.outcome == Outcome::Ok)
        });
        ensure!(
            reached,
            "{}: never reached the DB pod: {last:?}\n{}",
            ip(n),
            agent.stderr_tail()
        );
        ensure!(
            spent <= BURST,
            "{}: {spent} connects before the first success",
            ip(n)
        );
        for i in spent..BURST {
            probe.expect_outcome(
                &to_db,
                Outcome::Ok,
                &format!("{}: connect {}", ip(n), i + 1),
            )?;
        }
        probe.expect_outcome(
            &to_db,
            Outcome::Eperm,
            &format!("{}: past the burst", ip(n)),
        )?;
        let refused_by = |e: &Value| {
            e["reason"] == "rate_limited"
                && e["destination"]["ip"] == ip(11).to_string()
                && e["subject"]["spiffe_id"].as_str().is_some_and(|s| {
                    s.contains(&format!(
                        "/ns/{}/",
                        if n == 12 { "kv-rate" } else { "kv-rate-b" }
                    ))
                })
        };
        let refused: Vec<Value> = agent
            .wait_for(1, WAIT, refused_by)?
            .into_iter()
            .filter(|e| refused_by(e))
            .collect();
        let e = &refused[0];
        ensure!(
            e["type"] == "connection.denied" && e["hook"] == "connect4",
            "{e}"
        );
        ensure!(e["destination"]["kind"] == "vector_db", "{e}");
    }
    // Both refusals and nothing else was rate limited.
    let limited: Vec<Value> = agent
        .settled_events(Duration::from_millis(1500), WAIT)?
        .into_iter()
        .filter(|e| e["reason"] == "rate_limited")
        .collect();
    ensure!(limited.len() == 2, "{limited:?}");
    drop(pods);
    Ok(())
}

/// Every pod on a bridge has an IPv6 link-local address, and its neighbours on the link (the
/// node, the other pods) reach it there. A caller judges that address as the node's, never as
/// the pod, so it writes no identity option: before the fix a DB pod whose ingress is
/// `enforce` took such a SYN unchecked (no option, no allowlist, no flow record, no rate
/// limit), from a link-local source or from any other address bound to the socket. Now each
/// is dropped at the pod's ingress as `missing_tag`, one event naming the DB pod, while the
/// pod's own processes reach it over loopback (which was refused at connect as World's
/// address before), and a process of the pod in the node's namespace still does not.
///
/// The DB pod's listener lives in a network namespace of the test's own (the pod's), on the
/// wildcard address, in the pod's container cgroup; the caller is a process no enforcer
/// manages, in the namespace at the other end of the veth (the neighbour).
#[test]
fn a_db_pod_is_checked_at_its_link_local_address_and_reaches_itself_over_loopback() -> Result<()> {
    if !require_kernel() || !require_apiserver() {
        return Ok(());
    }
    let Cluster {
        rt,
        server,
        client,
        node,
    } = Cluster::start()?;
    let (own, neighbour) = (
        "fd94:1::1".parse::<Ipv6Addr>()?,
        "fd94:1::fe".parse::<Ipv6Addr>()?,
    );
    let link_local = "fe80::94:1".parse::<Ipv6Addr>()?;
    let pod_ns = NetNs::create(&unique_name("kv-pod"))?;
    let neighbour_ns = NetNs::create(&unique_name("kv-nbr"))?;
    let veth = Veth::create(
        &pod_ns,
        &[&format!("{own}/64")],
        &neighbour_ns,
        &[&format!("{neighbour}/64")],
    )?;
    for (ns, dev, addr) in [
        (&pod_ns, veth.dev_a(), format!("{link_local}/64")),
        (&neighbour_ns, veth.dev_b(), "fe80::94:fe/64".to_string()),
    ] {
        ns.ip(&["addr", "add", &addr, "dev", dev, "nodad"])?;
    }
    // `ip -o link` prints "INDEX: NAME@PEER: ..."; the index scopes a link-local address.
    let link = neighbour_ns.ip(&["-o", "link", "show", "dev", veth.dev_b()])?;
    let scope: u32 = link.split(':').next().unwrap_or_default().trim().parse()?;

    let uid = rt.block_on(async {
        create_namespace(&client, "kv-link", &[(TENANT, "acme")], &[]).await?;
        create_pod(
            &client,
            "kv-link",
            "vectors-0",
            &[(KIND, "vector_db"), (INGRESS, "enforce")],
            IpAddr::V6(own),
        )
        .await
    })?;
    let mut cgroups = node.start_pod(&uid, Driver::Systemd, Qos::Burstable)?;
    cgroups.add_container()?;
    let container = &cgroups.containers()[0];
    let db = ProbeServer::start(
        Some(&pod_ns),
        container,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), DB_PORT),
    )?;
    // The network works before the enforcer is judged on it: the neighbour reaches the pod at
    // its link-local address (bounded retries while the link comes up).
    let at_link_local = format!("tcp:{}", SocketAddrV6::new(link_local, DB_PORT, 0, scope));
    let from_neighbour = Probe::new().in_netns(&neighbour_ns);
    let mut last = None;
    ensure!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            last = from_neighbour.run_one(&at_link_local).ok();
            last.as_ref().is_some_and(|r| r.outcome == Outcome::Ok)
        }),
        "without the enforcer the neighbour cannot reach the pod: {last:?}"
    );

    let running = RunningAgent::start(&server, &node)?;
    let agent = &running.agent;
    // The kernel knows the node's network namespace (the agent's, this test's).
    let status = agent.status()?;
    ensure!(
        status["node_netns_cookie"].as_u64().is_some_and(|c| c != 0),
        "status: {status:#}"
    );
    // At its own address the pod is checked once the agent knows it: a caller of no
    // workload without the option is refused there (the policy opens nothing to World).
    let at_own = attempt("tcp", IpAddr::V6(own), DB_PORT);
    ensure!(
        wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            last = from_neighbour.run_one(&at_own).ok();
            last.as_ref().is_some_and(|r| r.outcome == Outcome::Error)
        }),
        "the pod's own address was never checked: {last:?}; status: {:#}\n{}",
        agent.status().unwrap_or_default(),
        agent.stderr_tail()
    );
    let db_identity = wait_ingress(agent, |e| e["destination"]["ip"] == own.to_string())?[0]
        ["destination"]["identity"]
        .as_u64()
        .context("the event names the DB pod's identity")?;
    db.accepted();

    // From the neighbour's link-local address (the kernel's choice), then from its ULA
    // address bound to the socket: both refused at the pod's ingress, one event each.
    let at_link_local_from_ula = format!("{at_link_local}@{neighbour}");
    for (call, source) in [
        (&at_link_local, "fe80::94:fe"),
        (&at_link_local_from_ula, "fd94:1::fe"),
    ] {
        let r = from_neighbour.run_one(call)?;
        ensure!(r.outcome == Outcome::Error, "{call}: {r:?}");
        let refused = wait_ingress(agent, |e| {
            e["destination"]["ip"] == link_local.to_string() && e["peer"]["ip"] == source
        })?;
        ensure!(refused.len() == 1, "{call}: want one event: {refused:?}");
        let e = &refused[0];
        ensure!(
            e["reason"] == "missing_tag" && e["verdict"] == "deny",
            "{e}"
        );
        ensure!(e["destination"]["identity"] == db_identity, "{e}");
        ensure!(e["destination"]["port"] == DB_PORT, "{e}");
    }
    ensure!(db.accepted().is_empty(), "the DB pod accepted a neighbour");

    // A sidecar's outbound capture (`REDIRECT` in the pod's namespace, as Istio and Linkerd
    // install it): the pod's call to its own address at port 80 lands on its listener at
    // `::1`, from its own address, through loopback. Its own traffic: not refused.
    pod_ns.exec(&[
        "ip6tables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "REDIRECT",
        "--to-ports",
        &DB_PORT.to_string(),
    ])?;

    // The pod's own processes reach it over loopback, IPv6 and IPv4: in its own network
    // namespace only the pod answers there, no call between workloads (before, judged as
    // World's address, refused at connect unless the pod could reach the internet).
    let in_pod = Probe::new().in_netns(&pod_ns).in_cgroup(container);
    for loopback in [
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    ] {
        in_pod.expect_outcome(
            &attempt("tcp", loopback, DB_PORT),
            Outcome::Ok,
            "the pod calling itself over loopback",
        )?;
    }
    in_pod.expect_outcome(
        &attempt("tcp", IpAddr::V6(own), 80),
        Outcome::Ok,
        "the pod's call captured by its sidecar's REDIRECT",
    )?;
    ensure!(
        db.accepted_at_least(3, WAIT).len() == 3,
        "the pod did not reach itself three times"
    );
    // A UDP datagram to loopback is still judged (World's address): a datagram socket can
    // be bound to a device after its connect, and leave the pod.
    in_pod.expect_outcome(
        &attempt("udp", IpAddr::V4(Ipv4Addr::LOCALHOST), DB_PORT),
        Outcome::Eperm,
        "the pod's UDP datagram to loopback",
    )?;

    // Loopback routed out of the pod (here by a route the test adds; for an attacker, a
    // device bound after the connect was judged, or a TCP Fast Open SYN held until the first
    // send), to a neighbour that takes loopback from outside (`route_localnet`, as a node
    // with kube-proxy does: CVE-2020-8558): the pod's TCP connect to 127.0.0.2 is allowed as
    // its own loopback, and its SYN is dropped as it leaves, one `martian_destination`
    // event. The link's IPv4 addresses are link-local ones on the test's own veth.
    for (ns, dev, addr) in [
        (&pod_ns, veth.dev_a(), "169.254.94.1/16"),
        (&neighbour_ns, veth.dev_b(), "169.254.94.2/16"),
    ] {
        ns.ip(&["addr", "add", addr, "dev", dev])?;
        for conf in ["all", dev] {
            for (key, value) in [("route_localnet", "1"), ("accept_local", "1")] {
                ns.exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.{key}={value}"),
                ])?;
            }
        }
    }
    pod_ns.ip(&[
        "route",
        "add",
        "127.0.0.2/32",
        "via",
        "169.254.94.2",
        "dev",
        veth.dev_a(),
        "table",
        "local",
    ])?;
    let stranger = TestCgroup::create(unique_name("kv-stranger"))?;
    let localhost_server = ProbeServer::start(
        Some(&neighbour_ns),
        &stranger,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DB_PORT),
    )?;
    let r = in_pod.run_one(&attempt(
        "tcp",
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        DB_PORT,
    ))?;
    ensure!(
        r.outcome == Outcome::Error,
        "127.0.0.2 routed out of the pod: {r:?}"
    );
    let escaped = dropped_as_it_leaves(agent, |e| e["reason"] == "martian_destination")?;
    for e in &escaped {
        ensure!(
            e["hook"] == "egress"
                && e["verdict"] == "deny"
                && e["destination"]["ip"] == "127.0.0.2"
                && e["destination"]["port"] == DB_PORT
                && e["subject"]["identity"] == db_identity,
            "{e}"
        );
    }
    ensure!(
        localhost_server.accepted().is_empty(),
        "the neighbour's loopback server accepted the pod"
    );
    // The pod's own NAT (a pod with NET_ADMIN) turns an allowed loopback connect into a call
    // to the neighbour's address: its SYN, to 169.254.94.2 from a socket connected to
    // 127.0.0.3, is dropped as it leaves.
    pod_ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "127.0.0.3",
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        "169.254.94.2",
    ])?;
    let call = format!(
        "{}@169.254.94.1",
        attempt("tcp", IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), DB_PORT)
    );
    let r = in_pod.run_one(&call)?;
    ensure!(
        r.outcome == Outcome::Error,
        "{call} with the pod's DNAT: {r:?}"
    );
    let rewritten = |e: &Value| {
        e["reason"] == "martian_destination" && e["destination"]["ip"] == "169.254.94.2"
    };
    agent.wait_for(1, WAIT, rewritten)?;
    ensure!(
        localhost_server.accepted().is_empty(),
        "the neighbour accepted the pod's rewritten loopback connect"
    );
    // In the node's namespace loopback is the node's listeners': still World's address there
    // for a process of the pod that entered it.
    Probe::new().in_cgroup(container).expect_outcome(
        &attempt("tcp", IpAddr::V4(Ipv4Addr::LOCALHOST), DB_PORT),
        Outcome::Eperm,
        "the pod's process in the node's namespace calling loopback",
    )?;
    // A Service of another namespace names the pod's address as an external IP (whoever may
    // write Services there may: CVE-2020-8554): the IP cache gives
    // the address to the Service (kube-proxy sends the Service's ports there), and a SYN to
    // the pod's other ports, judged as the Service's, was let through unchecked. Now the
    // pod's listener refuses it: the address is not the pod's in the IP cache.
    rt.block_on(async {
        create_namespace(&client, "kv-taker", &[(TENANT, "acme")], &[]).await?;
        kube::Api::<Service>::namespaced(client.clone(), "kv-taker")
            .create(
                &Default::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "taker"},
                    "spec": {"externalIPs": [own.to_string()],
                             "ports": [{"name": "q", "port": 9999}]}
                }))?,
            )
            .await
            .context("the API server refuses externalIPs")?;
        anyhow::Ok(())
    })?;
    wait_notices(agent, "cluster.problem", 1, Duration::from_secs(30), |e| {
        e.to_string().contains(&format!("external address {own}"))
    })?;
    let r = from_neighbour.run_one(&at_own)?;
    ensure!(
        r.outcome == Outcome::Error,
        "{at_own} once a Service took it: {r:?}"
    );
    let refused = wait_ingress(agent, |e| {
        e["destination"]["ip"] == own.to_string() && e["reason"] == "missing_tag"
    })?;
    ensure!(refused.len() == 1, "want one event: {refused:?}");
    ensure!(
        refused[0]["destination"]["identity"] == db_identity,
        "{}",
        refused[0]
    );
    ensure!(db.accepted().is_empty(), "the DB pod accepted a neighbour");

    drop(db);
    drop(cgroups);
    Ok(())
}

/// A pod that rewrites where its packets go after the connect hook judged the address it
/// dialled (its own `DNAT`, with `NET_ADMIN` in its namespace) is judged again at the
/// translated address as the packet leaves: acme's pod dials acme's friend (allowed at
/// connect) while its ip6tables sends the SYN to globex's rival, and the SYN is dropped,
/// one `tenant_mismatch` event with hook `egress` and the rival as destination; a rewrite to
/// a destination it may call (the friend's other port) passes.
///
/// The pod lives in a network namespace of the test's own, the two others' addresses at the
/// far end of a veth (their pods are in the API server, their one listener is a process no
/// enforcer manages).
#[test]
fn a_pod_rewriting_its_destination_is_judged_at_the_translated_address() -> Result<()> {
    if !require_kernel() || !require_apiserver() {
        return Ok(());
    }
    let Cluster {
        rt,
        server,
        client,
        node,
    } = Cluster::start()?;
    let own = "fd95:1::1".parse::<Ipv6Addr>()?;
    let friend = "fd95:1::fe".parse::<Ipv6Addr>()?;
    let rival = "fd95:1::fd".parse::<Ipv6Addr>()?;
    let pod_ns = NetNs::create(&unique_name("kd-pod"))?;
    let far_ns = NetNs::create(&unique_name("kd-far"))?;
    let veth = Veth::create(
        &pod_ns,
        &[&format!("{own}/64")],
        &far_ns,
        &[&format!("{friend}/64"), &format!("{rival}/64")],
    )?;
    // The IPv4 twins: link-local addresses on the test's own veth.
    let (own4, friend4, rival4) = (
        Ipv4Addr::new(169, 254, 95, 1),
        Ipv4Addr::new(169, 254, 95, 254),
        Ipv4Addr::new(169, 254, 95, 253),
    );
    pod_ns.ip(&["addr", "add", &format!("{own4}/16"), "dev", veth.dev_a()])?;
    for addr in [friend4, rival4] {
        far_ns.ip(&["addr", "add", &format!("{addr}/16"), "dev", veth.dev_b()])?;
    }
    let uid = rt.block_on(async {
        create_namespace(&client, "kd-acme", &[(TENANT, "acme")], &[]).await?;
        create_namespace(&client, "kd-globex", &[(TENANT, "globex")], &[]).await?;
        create_pod(&client, "kd-acme", "friend", &[], IpAddr::V6(friend)).await?;
        create_pod(&client, "kd-globex", "rival", &[], IpAddr::V6(rival)).await?;
        create_pod(&client, "kd-acme", "friend4", &[], IpAddr::V4(friend4)).await?;
        create_pod(&client, "kd-globex", "rival4", &[], IpAddr::V4(rival4)).await?;
        create_pod(&client, "kd-acme", "caller", &[], IpAddr::V6(own)).await
    })?;
    let mut cgroups = node.start_pod(&uid, Driver::Systemd, Qos::Burstable)?;
    cgroups.add_container()?;
    let container = &cgroups.containers()[0];
    let stranger = TestCgroup::create(unique_name("kd-far"))?;
    let far = ProbeServer::start(
        Some(&far_ns),
        &stranger,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), DB_PORT),
    )?;
    let in_pod = Probe::new().in_netns(&pod_ns).in_cgroup(container);
    // The link works before the enforcer is judged on it (bounded retries while it comes
    // up).
    let to_rival = attempt("tcp", IpAddr::V6(rival), DB_PORT);
    let mut last = None;
    ensure!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            last = in_pod.run_one(&to_rival).ok();
            last.as_ref().is_some_and(|r| r.outcome == Outcome::Ok)
        }),
        "without the enforcer the pod cannot reach the rival: {last:?}"
    );
    // (The server reports an accept after the client's connect returned: wait for it.)
    far.accepted_at_least(1, WAIT);

    let running = RunningAgent::start(&server, &node)?;
    let agent = &running.agent;
    // The agent knows all three: the rival is refused at connect for its tenant (not as an
    // unknown subject or address, as before the first list), the friend is not.
    let for_its_tenant = |e: &Value| {
        e["destination"]["ip"] == rival.to_string()
            && e["hook"] == "connect6"
            && e["reason"] == "tenant_mismatch"
    };
    ensure!(
        wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            last = in_pod.run_one(&to_rival).ok();
            last.as_ref().is_some_and(|r| r.outcome == Outcome::Eperm)
                && agent
                    .verdict_events()
                    .is_ok_and(|events| events.iter().any(for_its_tenant))
        }),
        "the rival was never refused at connect for its tenant: {last:?}; status: {:#}\n{}",
        agent.status().unwrap_or_default(),
        agent.stderr_tail()
    );
    let rival_identity = agent
        .verdict_events()?
        .into_iter()
        .find(for_its_tenant)
        .context("the connect's event")?["destination"]["identity"]
        .clone();
    let to_friend = attempt("tcp", IpAddr::V6(friend), DB_PORT);
    in_pod.expect_outcome(&to_friend, Outcome::Ok, "the pod calling its friend")?;
    ensure!(
        far.accepted_at_least(1, WAIT).len() == 1,
        "the friend did not accept the pod"
    );

    // IPv6 BIG TCP (GSO packets over 64 KiB, as Cilium's `enable-ipv6-big-tcp` allows on a
    // pod's veth): the kernel puts a hop-by-hop jumbo header between the IPv6 and the TCP
    // header of each, and such a transfer to the friend passes whole, not judged again.
    pod_ns.ip(&["link", "set", "dev", veth.dev_a(), "gso_max_size", "185000"])?;
    let sink = far_ns
        .run_in(|| std::net::TcpListener::bind(SocketAddr::new(IpAddr::V6(friend), BULK_PORT)))??;
    let drained = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = sink.accept()?;
        std::io::copy(&mut stream, &mut std::io::sink())
    });
    let r = in_pod.run_one(&attempt("tcpbulk", IpAddr::V6(friend), BULK_PORT))?;
    // (Unblocks the sink's accept when the probe never connected.)
    let _ = far_ns.run_in(|| {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V6(friend), BULK_PORT),
            Duration::from_millis(500),
        )
    });
    let copied = drained
        .join()
        .map_err(|_| anyhow::anyhow!("the sink panicked"))?;
    ensure!(
        r.outcome == Outcome::Ok && copied.as_ref().is_ok_and(|n| *n == 16 << 20),
        "a bulk transfer with IPv6 BIG TCP: {r:?}, the sink took {copied:?}"
    );
    // (Dropped packets would have been retransmitted smaller: the events tell.)
    let judged: Vec<Value> = agent
        .settled_events(Duration::from_millis(1500), WAIT)?
        .into_iter()
        .filter(|e| e["hook"] == "egress")
        .collect();
    ensure!(
        judged.is_empty(),
        "the bulk transfer's packets were judged again: {judged:?}"
    );

    // The pod's own NAT sends what it addresses to the friend to the rival: allowed at
    // connect (the friend), dropped as it leaves (the rival). TCP over IPv6 and IPv4, a
    // connected UDP socket's datagram, and a TCP connect to port 0 (the kernel sends its
    // SYN; a socket connected to port 0 once passed as unconnected), rewritten to the
    // rival's other server.
    let dnat = |tool: &str, protocol: &str, from: &str, port: u16, to: &str| {
        pod_ns.exec(&[
            tool,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            from,
            "-p",
            protocol,
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ])
    };
    let other_port = DB_PORT + 1;
    let far_other = ProbeServer::start(
        Some(&far_ns),
        &stranger,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), other_port),
    )?;
    let friend6 = friend.to_string();
    for (tool, protocol, from, port, to) in [
        (
            "ip6tables",
            "tcp",
            friend6.as_str(),
            DB_PORT,
            format!("[{rival}]:{DB_PORT}"),
        ),
        (
            "iptables",
            "tcp",
            &friend4.to_string(),
            DB_PORT,
            format!("{rival4}:{DB_PORT}"),
        ),
        (
            "ip6tables",
            "udp",
            friend6.as_str(),
            DB_PORT,
            format!("[{rival}]:{DB_PORT}"),
        ),
        (
            "ip6tables",
            "tcp",
            friend6.as_str(),
            0,
            format!("[{rival}]:{other_port}"),
        ),
    ] {
        dnat(tool, protocol, from, port, &to)?;
    }
    for (kind, from, from_port, to, to_port, protocol) in [
        (
            "tcp",
            IpAddr::V6(friend),
            DB_PORT,
            IpAddr::V6(rival),
            DB_PORT,
            "tcp",
        ),
        (
            "tcp",
            IpAddr::V4(friend4),
            DB_PORT,
            IpAddr::V4(rival4),
            DB_PORT,
            "tcp",
        ),
        (
            "udpc",
            IpAddr::V6(friend),
            DB_PORT,
            IpAddr::V6(rival),
            DB_PORT,
            "udp",
        ),
        (
            "tcp",
            IpAddr::V6(friend),
            0,
            IpAddr::V6(rival),
            other_port,
            "tcp",
        ),
    ] {
        let call = attempt(kind, from, from_port);
        let r = in_pod.run_one(&call)?;
        ensure!(r.outcome != Outcome::Ok, "{call} rewritten to {to}: {r:?}");
        let rewritten = |e: &Value| {
            e["hook"] == "egress"
                && e["destination"]["ip"] == to.to_string()
                && e["destination"]["protocol"] == protocol
                && e["destination"]["port"] == to_port
        };
        let dropped = dropped_as_it_leaves(agent, rewritten)?;
        for e in &dropped {
            ensure!(
                e["reason"] == "tenant_mismatch"
                    && e["verdict"] == "deny"
                    && e["destination"]["tenant"] == "globex"
                    && e["subject"]["tenant"] == "acme",
                "{call}: {e}"
            );
        }
        if to == IpAddr::V6(rival) {
            ensure!(
                dropped[0]["destination"]["identity"] == rival_identity,
                "{}",
                dropped[0]
            );
        }
    }
    let accepted = far_other.accepted();
    ensure!(
        accepted.is_empty(),
        "the rival accepted the pod's rewritten connect to port 0: {accepted:?}"
    );
    let accepted = far.accepted();
    ensure!(
        accepted.is_empty(),
        "the rival accepted the pod's rewritten connect: {accepted:?}"
    );

    // A rewrite to what the pod may call anyway (the friend, at another port the friend's
    // tenant opens) passes.
    dnat(
        "ip6tables",
        "tcp",
        &friend.to_string(),
        80,
        &format!("[{friend}]:{DB_PORT}"),
    )?;
    in_pod.expect_outcome(
        &attempt("tcp", IpAddr::V6(friend), 80),
        Outcome::Ok,
        "the pod's call rewritten to its friend's other port",
    )?;
    ensure!(
        far.accepted_at_least(1, WAIT).len() == 1,
        "the friend did not accept the rewritten call"
    );

    drop(far);
    drop(cgroups);
    Ok(())
}

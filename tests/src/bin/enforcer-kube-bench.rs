//! `cargo xtask bench kube`: the agent on a Kubernetes node at scale, measured end to end,
//! never asserted.
//!
//! A real kube-apiserver (the test harness's [`ApiServer`]: 1.20.2 with etcd, on loopback)
//! holds N pods in M label sets over T tenants (one Namespace per tenant, tenant label on the
//! Namespace; label set `k` is tenant `k % T`, identity label `app`); the first L pods are
//! on this node and get the kubelet's cgroups under a test root ([`Node`]: both drivers, all
//! three QoS classes). The release agent, `enforcer run --kubernetes`, starts with no
//! persisted state (a fresh pin path and state directory). Measured:
//!
//! 1. **Cold sync**, from spawning the agent: (a) the first complete list (the source's
//!    first published state, from its log), (b) the policy applied with every local pod
//!    mapped (its log; and when `enforcer status --json` first shows it), (c) the first
//!    allowed connect from a local pod's container cgroup to a pod of its tenant (`probe
//!    --until ok` retrying every few milliseconds from inside the cgroup, denied as an
//!    unknown subject until then). Repeated `--syncs` times with a fresh agent each.
//! 2. **Memory**: the agent's VmRSS and VmHWM (`/proc/PID/status`) after convergence and
//!    after the churn; the kernel maps' fill.
//! 3. **Churn through the real watch**: a new local pod (a new label set, then a replica of
//!    an existing local identity) created through the API, its cgroups started as a kubelet
//!    would, until its container's first allowed connect; each of them deleted (grace 0)
//!    until its still-running container is denied as `unknown_subject` (checked in the deny
//!    event). `--samples` of each; median and max; the agent's CPU time per change
//!    (`/proc/PID/stat` utime+stime over the change and a settle period, less the idle rate).
//! 4. **A burst**: `--burst` pods created through the API at `--burst-rate` a second
//!    (replicas of existing identities on other nodes, the last one on this node), until
//!    every address is in the kernel's IP cache (read through `enforcer status`) and the
//!    local one's first allowed connect; then deleted at the same rate, until the IP cache is
//!    back and the local one is refused as `unknown_subject`. The agent's reloads and CPU
//!    over each.
//!
//! `enforcer-kube-bench [--pods N] [--label-sets M] [--tenants T] [--local L] [--samples S]
//! [--syncs K] [--burst B] [--burst-rate R] [--rss-every E]` (defaults 5,000 / 500 / 20 / 50 /
//! 10 / 2 / 100 / 100 / 10; VmRSS is sampled after every E single changes). Needs root, BPF, cgroup v2 and
//! the API server that `cargo xtask setup-kube` builds. Its addresses are 127.86.0.0/16; its
//! cgroups, pins and nodes are named `kb-...`. Everything it creates (the API server and
//! etcd with their data, cgroups, pins, the agent, servers, temp dirs) is removed at the end,
//! also on error or panic, by the harness's guards.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use enforcer_tests::agent::{enforcer_bin, AgentConfig};
use enforcer_tests::bpf::{prog_query, ENFORCER_HOOKS};
use enforcer_tests::kube::{apiserver_unavailable_reason, create_namespace, create_pod, ApiServer};
use enforcer_tests::kubelet::{Driver, Node, PodCgroups, Qos};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{
    kernel_unavailable_reason, Agent, Outcome, PinDir, PolicyBundle, Probe, Server, TestCgroup,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::Api;
use serde_json::Value;

const NODE: &str = "kb-node";
/// Pods of other nodes are spread over this many node names (nothing runs them).
const OTHER_NODES: usize = 8;
const TENANT_LABEL: &str = "ai-enforcer.io/tenant";
const PURPOSE_LABEL: &str = "ai-enforcer.io/purpose";
/// The identity label (`--identity-label`) whose values make the label sets distinct.
const APP_LABEL: &str = "app";
const PURPOSES: [&str; 5] = [
    "inference",
    "retrieval",
    "evaluation",
    "agent",
    "feature-extraction",
];
/// The port of the servers the probes connect to.
const PORT: u16 = 8086;
/// Pod `i` has `127.86.(1 + i / 250).(1 + i % 250)`; churn pods `127.86.250.x`, burst pods
/// `127.86.251.x`.
const PER_OCTET: usize = 250;
const MAX_PODS: usize = 249 * PER_OCTET;
/// API requests in flight while the cluster is filled.
const CREATE_CONCURRENCY: usize = 32;
/// How often a probe retries while it waits for a change to take effect: the resolution of
/// the connect figures.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Bounds (not targets): how long anything may take before the run gives up.
const SYNC_LIMIT: Duration = Duration::from_secs(300);
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
/// After a change took effect, how long the agent may finish it (persist the state, write
/// `status`) before its CPU time is read.
const SETTLE: Duration = Duration::from_secs(1);
/// The six kubelet layouts, in turn.
const LAYOUTS: [(Driver, Qos); 6] = [
    (Driver::Systemd, Qos::Guaranteed),
    (Driver::Systemd, Qos::Burstable),
    (Driver::Systemd, Qos::BestEffort),
    (Driver::Cgroupfs, Qos::Guaranteed),
    (Driver::Cgroupfs, Qos::Burstable),
    (Driver::Cgroupfs, Qos::BestEffort),
];

#[derive(Debug, Clone)]
struct Options {
    pods: usize,
    label_sets: usize,
    tenants: usize,
    local: usize,
    samples: usize,
    syncs: usize,
    burst: usize,
    burst_rate: usize,
    /// VmRSS is sampled after every this many single changes of the churn.
    rss_every: usize,
}

const USAGE: &str = "usage: enforcer-kube-bench [--pods N] [--label-sets M] [--tenants T] \
                     [--local L] [--samples S] [--syncs K] [--burst B] [--burst-rate R] \
                     [--rss-every E]";

fn parse_args() -> Result<Options> {
    let mut o = Options {
        pods: 5_000,
        label_sets: 500,
        tenants: 20,
        local: 50,
        samples: 10,
        syncs: 2,
        burst: 100,
        burst_rate: 100,
        rss_every: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--pods" => &mut o.pods,
            "--label-sets" => &mut o.label_sets,
            "--tenants" => &mut o.tenants,
            "--local" => &mut o.local,
            "--samples" => &mut o.samples,
            "--syncs" => &mut o.syncs,
            "--burst" => &mut o.burst,
            "--burst-rate" => &mut o.burst_rate,
            "--rss-every" => &mut o.rss_every,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        };
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a number"))?;
        *slot = match value.parse() {
            Ok(n) if n > 0 => n,
            _ => bail!("{flag}: expected a positive number, got {value:?}"),
        };
    }
    ensure!(o.pods <= MAX_PODS, "--pods: at most {MAX_PODS}");
    ensure!(o.tenants <= 99, "--tenants: at most 99");
    ensure!(
        o.tenants <= o.label_sets && o.label_sets <= o.pods,
        "want tenants <= label sets <= pods"
    );
    ensure!(o.local < o.pods, "--local must be below --pods");
    ensure!(o.samples <= 100, "--samples: at most 100");
    ensure!(o.burst <= PER_OCTET, "--burst: at most {PER_OCTET}");
    ensure!(
        o.burst_rate <= 1_000,
        "--burst-rate: at most 1,000 a second"
    );
    Ok(o)
}

/// The shape of the cluster: which pod has which label set, tenant, node and address.
struct World {
    o: Options,
}

impl World {
    fn label_set(&self, pod: usize) -> usize {
        pod % self.o.label_sets
    }
    fn tenant_of_set(&self, set: usize) -> usize {
        set % self.o.tenants
    }
    fn tenant(&self, pod: usize) -> usize {
        self.tenant_of_set(self.label_set(pod))
    }
    fn local(&self, pod: usize) -> bool {
        pod < self.o.local
    }
    fn node(&self, pod: usize) -> String {
        if self.local(pod) {
            NODE.into()
        } else {
            format!("kb-node-{}", pod % OTHER_NODES)
        }
    }
    fn ip(pod: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            86,
            (1 + pod / PER_OCTET) as u8,
            (1 + pod % PER_OCTET) as u8,
        )
    }
    /// The server a pod of `tenant` connects to: the first pod of that tenant on another
    /// node.
    fn target(&self, tenant: usize) -> Result<usize> {
        (self.o.local..self.o.pods)
            .find(|&p| self.tenant(p) == tenant)
            .with_context(|| format!("tenant {tenant} has no pod on another node"))
    }
}

fn namespace(tenant: usize) -> String {
    format!("kb-t{tenant:02}")
}

fn tenant_name(tenant: usize) -> String {
    format!("t{tenant:02}")
}

/// The labels of label set `set` (the purpose cycles per tenant so that it varies too).
fn labels(set: usize, tenants: usize, app: &str) -> Vec<(String, String)> {
    vec![
        (
            PURPOSE_LABEL.into(),
            PURPOSES[(set / tenants) % PURPOSES.len()].into(),
        ),
        (APP_LABEL.into(), app.into()),
        ("pod-template-hash".into(), format!("h{set}")),
    ]
}

async fn create(
    client: &kube::Client,
    ns: &str,
    name: &str,
    labels: &[(String, String)],
    node: &str,
    ip: Ipv4Addr,
) -> Result<String> {
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let pod = create_pod(client, ns, name, &labels, node, &[&ip.to_string()]).await?;
    pod.metadata.uid.context("a created pod has a UID")
}

fn main() -> Result<()> {
    let o = parse_args()?;
    if let Some(reason) = kernel_unavailable_reason().or_else(apiserver_unavailable_reason) {
        bail!("cannot run the Kubernetes benchmark: {reason}");
    }
    println!(
        "# enforcer Kubernetes benchmark ({}; load average {})",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        load_average()
    );
    let bin = enforcer_bin();
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default();
    println!("agent: {} (built {built})", bin.display());
    println!(
        "cluster: {} pods in {} label sets over {} tenants, {} pods on this node; {} cold syncs, {} churn samples of each kind",
        o.pods, o.label_sets, o.tenants, o.local, o.syncs, o.samples
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let world = World { o: o.clone() };
    // Each tenant's server is on one of its pods on another node: a shape without one is
    // refused before anything is created.
    let target_pods = (0..o.tenants)
        .map(|t| world.target(t))
        .collect::<Result<Vec<usize>>>()?;
    // Declaration order is the reverse of drop order: the agent goes first, the API server
    // last.
    let server = ApiServer::start()?;
    let client = rt.block_on(async { server.client() });
    let per_tenant = o.label_sets.div_ceil(o.tenants) + o.samples + 1;

    // The cluster.
    let started = Instant::now();
    let uids: Vec<(usize, String)> = rt.block_on(async {
        for t in 0..o.tenants {
            create_namespace(
                &client,
                &namespace(t),
                &[(TENANT_LABEL, &tenant_name(t))],
                &[],
            )
            .await?;
        }
        futures::stream::iter(0..o.pods)
            .map(|i| {
                let (client, world) = (&client, &world);
                async move {
                    let set = world.label_set(i);
                    let uid = create(
                        client,
                        &namespace(world.tenant(i)),
                        &format!("p{i:05}"),
                        &labels(set, o.tenants, &format!("a{set:04}")),
                        &world.node(i),
                        World::ip(i),
                    )
                    .await?;
                    anyhow::Ok((i, uid))
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .try_collect()
            .await
    })?;
    let took = started.elapsed();
    println!(
        "API server filled: {} namespaces, {} pods (create + /status each) in {:.1} s ({:.0} pods/s)",
        o.tenants,
        o.pods,
        took.as_secs_f64(),
        o.pods as f64 / took.as_secs_f64()
    );

    // What the API server alone takes to serve the agent's first list: the same paged,
    // consistent list of every pod (500 a page, as kube-rs's watcher asks), decoded here.
    let list_took = rt.block_on(list_all_pods(&client))?;
    println!(
        "reference: one paged list of all {} pods (500 a page) from this API server takes {:.2} s",
        o.pods, list_took
    );

    // This node: the kubelet's cgroups of the local pods, an app container each.
    let node = Node::create("kb-node")?;
    let mut local: Vec<(usize, PodCgroups)> = Vec::new();
    for (i, uid) in uids.iter().filter(|(i, _)| world.local(*i)) {
        let (driver, qos) = LAYOUTS[i % LAYOUTS.len()];
        let mut cgroups = node.start_pod(uid, driver, qos)?;
        cgroups.add_container()?;
        local.push((*i, cgroups));
    }
    local.sort_by_key(|(i, _)| *i);
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    for &target in &target_pods {
        let addr = SocketAddr::new(IpAddr::V4(World::ip(target)), PORT);
        servers.push(Server::start(Proto::Tcp, addr)?);
        targets.push(attempt("tcp", addr.ip(), PORT));
    }
    let bundle = bundle(o.tenants)?;
    let config = |pins: &PinDir| {
        let mut config = AgentConfig::new(bundle.path(), &node.root().relative_str(), pins.path());
        config.extra_args = server.agent_args(NODE);
        config.extra_args.extend([
            "--identity-label".into(),
            APP_LABEL.into(),
            "--max-identities-per-tenant".into(),
            per_tenant.max(256).to_string(),
        ]);
        config.ready_timeout = Duration::from_secs(120);
        config
    };
    // The first local pod probes its tenant's server during the cold sync.
    let (probe_pod, probe_cgroups) = &local[0];
    let probe_target = targets[world.tenant(*probe_pod)].clone();
    let probe_cgroup = &probe_cgroups.containers()[0];

    // 1 + 2: cold syncs, each with a fresh agent (no pins, no persisted state).
    let mut syncs = Vec::new();
    // The agent before its pins: tuple fields drop in order, also on an early return.
    let mut last: Option<(Agent, PinDir)> = None;
    for n in 1..=o.syncs {
        if let Some((agent, pins)) = last.take() {
            drop(agent);
            drop(pins);
            wait_detached(&node.root().path())?;
        }
        let pins = PinDir::new("kb-pins")?;
        let sync = cold_sync(&config(&pins), &o, probe_cgroup, &probe_target)?;
        println!(
            "cold sync {n}: ready {:.2} s, first list {:.2} s, policy applied {:.2} s (status showed it at {:.2} s), first allowed connect {:.2} s ({} denied tries before); VmRSS {} MiB, VmHWM {} MiB",
            sync.ready,
            sync.listed,
            sync.applied,
            sync.status_seen,
            sync.connected,
            sync.denied_tries,
            sync.rss_kib / 1024,
            sync.hwm_kib / 1024,
        );
        println!("  log: {}", sync.log_breakdown);
        syncs.push(sync.figures());
        last = Some((sync.agent, pins));
    }
    // Bindings drop in reverse order: the agent before its pins.
    let (agent, pins) = last.take().context("at least one sync")?;
    let (_pins, agent) = (pins, agent);

    // Every local pod reaches its tenant's server; another tenant's is refused (the world is
    // enforced, not merely mapped).
    for (i, cgroups) in &local {
        let r = Probe::new()
            .in_cgroup(&cgroups.containers()[0])
            .run_one(&targets[world.tenant(*i)])?;
        ensure!(
            r.outcome == Outcome::Ok,
            "local pod p{i:05} cannot reach its tenant's server: {r:?}\n{}",
            agent.stderr_tail()
        );
    }
    let other = targets[(world.tenant(*probe_pod) + 1) % o.tenants].clone();
    let r = Probe::new().in_cgroup(probe_cgroup).run_one(&other)?;
    ensure!(
        r.outcome == Outcome::Eperm || o.tenants == 1,
        "a connect to another tenant was not refused: {r:?}"
    );
    let status = agent.status()?;
    println!(
        "checked: {} local pods reach their tenant's server, another tenant's is refused; maps: {}",
        local.len(),
        map_fill(&status)
    );

    // 3: churn.
    let idle = idle_cpu_rate(agent.pid(), Duration::from_secs(3))?;
    println!(
        "agent idle CPU: {:.1} ms/s (ticks, resync every 500 ms)",
        idle * 1e3
    );
    let churn = Churn {
        rt: &rt,
        client: &client,
        world: &world,
        node: &node,
        agent: &agent,
        targets: &targets,
        idle,
    };
    // VmRSS (MiB) after each group of changes: growth that does not level off is a leak.
    let mut rss_trail = vec![format!("{} at the start", memory(agent.pid())?.0 / 1024)];
    let mut created: Vec<(&'static str, ChurnPod)> = Vec::new();
    let mut results: Vec<(&'static str, Vec<Sample>)> = Vec::new();
    for kind in [
        "create, new label set",
        "create, replica of a local identity",
    ] {
        let mut samples = Vec::new();
        for j in 0..o.samples {
            let n = created.len();
            let set = if kind.contains("new") {
                o.label_sets + j
            } else {
                world.label_set(local[j % local.len()].0)
            };
            let (pod, sample) = churn.create(n, set)?;
            samples.push(sample);
            created.push((kind, pod));
            if created.len().is_multiple_of(o.rss_every) {
                rss_trail.push(format!(
                    "{} after {} changes",
                    memory(agent.pid())?.0 / 1024,
                    created.len()
                ));
            }
        }
        results.push((kind, samples));
    }
    let mut deletes: Vec<(&'static str, Vec<Sample>)> = vec![
        ("delete, last pod of its identity", Vec::new()),
        ("delete, a replica (identity stays)", Vec::new()),
    ];
    let creates = created.len();
    for (n, (kind, pod)) in created.into_iter().enumerate() {
        let sample = churn.delete(pod)?;
        let slot = if kind.contains("new") { 0 } else { 1 };
        deletes[slot].1.push(sample);
        let changes = creates + n + 1;
        if changes.is_multiple_of(o.rss_every) || n + 1 == creates {
            rss_trail.push(format!(
                "{} after {changes} changes",
                memory(agent.pid())?.0 / 1024
            ));
        }
    }
    results.extend(deletes);
    let bursts = churn.burst()?;
    let (rss, hwm) = memory(agent.pid())?;
    rss_trail.push(format!("{} after the burst", rss / 1024));

    println!();
    println!(
        "## Summary ({} pods, {} label sets, {} tenants, {} local pods; load average now {})",
        o.pods,
        o.label_sets,
        o.tenants,
        o.local,
        load_average()
    );
    println!();
    println!("| cold sync | ready | first list | policy applied, pods mapped | first allowed connect | VmRSS / VmHWM |");
    println!("|---|---|---|---|---|---|");
    for (n, s) in syncs.iter().enumerate() {
        println!("| {} | {s} |", n + 1);
    }
    println!();
    let log = AgentLog::read(&agent.stderr_path())?;
    println!("| change ({} samples each) | until in force: median | max | from the cgroup's creation: median | API to the source's new state: median | agent reload (merge + compile + write): median | agent CPU per change: median | max |", o.samples);
    println!("|---|---|---|---|---|---|---|---|");
    for (kind, samples) in &results {
        let lag: Vec<f64> = samples.iter().map(|s| s.lag).collect();
        let from_cgroup: Vec<f64> = samples.iter().filter_map(|s| s.from_cgroup).collect();
        let cpu: Vec<f64> = samples.iter().map(|s| s.cpu).collect();
        let already = samples.iter().filter(|s| s.first_try_took_effect).count();
        let (state, reload): (Vec<_>, Vec<_>) =
            samples.iter().map(|s| log.breakdown(s.window)).unzip();
        let state: Vec<f64> = state.into_iter().flatten().collect();
        let reload: Vec<f64> = reload.into_iter().flatten().collect();
        let opt = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else if v.len() < samples.len() {
                format!("{} ({} of {})", ms(median(v)), v.len(), samples.len())
            } else {
                ms(median(v))
            }
        };
        println!(
            "| {kind}{} | {} | {} | {} | {} | {} | {} | {} |",
            if already > 0 {
                format!(" ({already} in force at the first try)")
            } else {
                String::new()
            },
            ms(median(&lag)),
            ms(max(&lag)),
            opt(&from_cgroup),
            opt(&state),
            opt(&reload),
            ms(median(&cpu)),
            ms(max(&cpu)),
        );
    }
    println!();
    println!();
    for line in &bursts {
        println!("{line}");
    }
    println!();
    println!(
        "agent after the churn: VmRSS {} MiB, VmHWM {} MiB; VmRSS (MiB) {}",
        rss / 1024,
        hwm / 1024,
        rss_trail.join(", ")
    );
    Ok(())
}

/// Seconds to list every pod, 500 a page, as the agent's watcher does on start.
async fn list_all_pods(client: &kube::Client) -> Result<f64> {
    let api = Api::<Pod>::all(client.clone());
    let start = Instant::now();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await.context("listing pods")?;
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(start.elapsed().as_secs_f64()),
        }
    }
}

/// The bundle: `tenants` declared, the demo's schema and baseline (same-tenant permit,
/// tenant-isolation forbid).
fn bundle(tenants: usize) -> Result<PolicyBundle> {
    let demo = enforcer_tests::fixtures::demo_policies_dir();
    let read = |name: &str| {
        std::fs::read_to_string(demo.join(name))
            .with_context(|| format!("reading the demo's {name}"))
    };
    let names: Vec<String> = (0..tenants).map(tenant_name).collect();
    PolicyBundle::new(&[
        (
            "inventory.yaml",
            &format!("tenants: [{}]\n", names.join(", ")),
        ),
        ("schema.cedarschema", &read("schema.cedarschema")?),
        ("baseline.cedar", &read("baseline.cedar")?),
    ])
}

struct Sync {
    agent: Agent,
    ready: f64,
    listed: f64,
    applied: f64,
    status_seen: f64,
    connected: f64,
    denied_tries: u64,
    rss_kib: u64,
    hwm_kib: u64,
    log_breakdown: String,
}

impl Sync {
    fn figures(&self) -> String {
        format!(
            "{:.2} s | {:.2} s | {:.2} s (status {:.2} s) | {:.2} s | {} / {} MiB",
            self.ready,
            self.listed,
            self.applied,
            self.status_seen,
            self.connected,
            self.rss_kib / 1024,
            self.hwm_kib / 1024
        )
    }
}

/// Starts an agent with `config` and times its convergence (see the module documentation).
fn cold_sync(
    config: &AgentConfig,
    o: &Options,
    probe_cgroup: &TestCgroup,
    probe_target: &str,
) -> Result<Sync> {
    let t0 = SystemTime::now();
    let start = Instant::now();
    let agent = Agent::start(config.clone())?;
    let ready = start.elapsed().as_secs_f64();
    // From now on the hooks are attached: the probe is denied (unknown subject) until the
    // agent knows the pod.
    let probe = Probe::new()
        .in_cgroup(probe_cgroup)
        .timeout(SYNC_LIMIT + Duration::from_secs(10));
    let target = probe_target.to_string();
    let prober =
        std::thread::spawn(move || probe.until(Outcome::Ok, &target, PROBE_EVERY, SYNC_LIMIT));
    let mut last = Value::Null;
    let converged = |s: &Value| {
        let k = s.pointer("/agent/kubernetes");
        s.pointer("/agent/pods/mapped").and_then(Value::as_u64) == Some(o.local as u64)
            && k.and_then(|k| k.get("has_state")).and_then(Value::as_bool) == Some(true)
            && k.and_then(|k| k.get("persisted")).and_then(Value::as_bool) == Some(false)
            && k.and_then(|k| k.get("pods")).and_then(Value::as_u64) == Some(o.pods as u64)
    };
    let status_seen = loop {
        last = agent.status().unwrap_or(last);
        if converged(&last) {
            break start.elapsed().as_secs_f64();
        }
        ensure!(
            start.elapsed() < SYNC_LIMIT,
            "the agent did not converge within {SYNC_LIMIT:?}; status: {last:#}\nagent stderr:\n{}",
            agent.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let probed = prober
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    ensure!(
        probed.reached,
        "the local pod's connect was never allowed: {probed:?}\nagent stderr:\n{}",
        agent.stderr_tail()
    );
    let since = |t: SystemTime| t.duration_since(t0).unwrap_or_default().as_secs_f64();
    let log = AgentLog::read(&agent.stderr_path())?;
    let listed = log
        .first("kubernetes: cluster state updated", t0)
        .context("no `cluster state updated` line in the agent's log")?;
    let changed = log
        .first("cluster state changed", t0)
        .context("no `cluster state changed` line in the agent's log")?;
    let applied = log
        .first("policy applied", changed)
        .context("no `policy applied` after the cluster state in the agent's log")?;
    let reload = log.first("reloading policy", changed).unwrap_or(changed);
    // The probe's tries before the allowed one were denied (or the agent was faster than
    // the probe's first try).
    let denied_tries = if probed.first == Outcome::Ok {
        0
    } else {
        probed.tries - 1
    };
    let (rss_kib, hwm_kib) = memory(agent.pid())?;
    let pods_listed = log
        .first("kubernetes: pods listed", t0)
        .context("no `pods listed` line in the agent's log")?;
    let log_breakdown = format!(
        "pods listed {:.0} ms after start (answered {:.0} ms after the request, received {:.0} ms later, decoded in {:.0} ms), list + cluster state {:.0} ms after start (its computation {:.0} ms), handed to the agent {:.0} ms later, merge + compile {:.0} ms, map writes up to `policy applied` {:.0} ms",
        since(pods_listed) * 1e3,
        log.field_ms(pods_listed, "answered_ms").unwrap_or(f64::NAN),
        log.field_ms(pods_listed, "received_ms").unwrap_or(f64::NAN),
        log.field_ms(pods_listed, "decoded_ms").unwrap_or(f64::NAN),
        since(listed) * 1e3,
        log.field("cluster state updated", listed, "compute_ms")
            .unwrap_or(f64::NAN),
        secs(listed, changed) * 1e3,
        secs(reload, applied) * 1e3 - log.elapsed_ms(applied).unwrap_or(0.0),
        log.elapsed_ms(applied).unwrap_or(f64::NAN),
    );
    Ok(Sync {
        agent,
        ready,
        listed: since(listed),
        applied: since(applied),
        status_seen,
        connected: since(probed.at()),
        denied_tries,
        rss_kib,
        hwm_kib,
        log_breakdown,
    })
}

fn secs(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).unwrap_or_default().as_secs_f64()
}

/// The agent's log lines (tracing's `fmt` format: an RFC 3339 time first), with their times.
struct AgentLog {
    lines: Vec<(SystemTime, String)>,
}

impl AgentLog {
    fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let lines = text
            .lines()
            .filter_map(|l| {
                let plain = strip_ansi(l);
                let (time, _) = plain.split_once(' ')?;
                let t = humantime::parse_rfc3339_weak(time).ok()?;
                Some((t, plain))
            })
            .collect();
        Ok(Self { lines })
    }

    /// The time of the first line at or after `after` whose text holds `what`.
    fn first(&self, what: &str, after: SystemTime) -> Option<SystemTime> {
        self.lines
            .iter()
            .find(|(t, l)| *t >= after && l.contains(what))
            .map(|(t, _)| *t)
    }

    /// `elapsed_ms=` of the `policy applied` line at `at` (the map writes).
    fn elapsed_ms(&self, at: SystemTime) -> Option<f64> {
        self.field("policy applied", at, "elapsed_ms")
    }

    /// `field=` of the `pods listed` line at `at`.
    fn field_ms(&self, at: SystemTime, field: &str) -> Option<f64> {
        self.field("pods listed", at, field)
    }

    /// `field=` of the line at `at` that contains `message`.
    fn field(&self, message: &str, at: SystemTime, field: &str) -> Option<f64> {
        let (_, line) = self
            .lines
            .iter()
            .find(|(t, l)| *t == at && l.contains(message))?;
        let rest = line.split(&format!("{field}=")).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

impl AgentLog {
    /// Where a change's time went, from the agent's log: from the API request to the
    /// source's next published state (watch event, debounce, state, persisted file), and the
    /// reload that state caused (merge + compile + map writes, up to `policy applied`).
    /// `None` where the log shows no such step inside the window (a change that only the
    /// cgroup resync needed).
    fn breakdown(&self, (from, to): (SystemTime, SystemTime)) -> (Option<f64>, Option<f64>) {
        let Some(state) = self.first("kubernetes: cluster state updated", from) else {
            return (None, None);
        };
        if state > to {
            return (None, None);
        }
        let reload = self
            .first("reloading policy", state)
            .and_then(|r| Some((r, self.first("policy applied", r)?)))
            // The log line follows the map writes, so it may come just after the probe saw
            // the change; a reload much later is another change's.
            .filter(|(_, applied)| *applied <= to + Duration::from_millis(500))
            .map(|(r, applied)| secs(r, applied));
        (Some(secs(from, state)), reload)
    }
}

impl AgentLog {
    /// How many lines at or after `after` hold `what`.
    fn count(&self, what: &str, after: SystemTime) -> usize {
        self.lines
            .iter()
            .filter(|(t, l)| *t >= after && l.contains(what))
            .count()
    }
}

/// Entries of the kernel's IPv4 host cache, from `enforcer status --json`.
fn ipcache_v4(status: &Value) -> Result<u64> {
    status
        .get("maps")
        .and_then(Value::as_array)
        .and_then(|maps| {
            maps.iter()
                .find(|m| m.get("name").and_then(Value::as_str) == Some("IPCACHE_HOST_V4"))
        })
        .and_then(|m| m.get("entries")?.as_u64())
        .context("no IPCACHE_HOST_V4 entries in `enforcer status --json`")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits (bounded) until no program is attached to `cgroup` any more: an unpinned link is
/// freed from a kernel workqueue, a little after the agent that held it is gone.
fn wait_detached(cgroup: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut attached = 0;
        for (kind, _) in ENFORCER_HOOKS {
            attached += prog_query(cgroup, kind)?.len();
        }
        if attached == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{attached} programs still attached to {} 10 s after the agent stopped",
            cgroup.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One change, measured.
struct Sample {
    /// Seconds from the API request to the first try that saw the change in force.
    lag: f64,
    /// Seconds from the container cgroup's creation to that try (creations only).
    from_cgroup: Option<f64>,
    /// Whether the probe's first try already saw it (the lag is then an upper bound set by
    /// the probe's start).
    first_try_took_effect: bool,
    /// The agent's CPU seconds for the change (less the idle rate).
    cpu: f64,
    /// When the API request was sent and when the change was seen in force.
    window: (SystemTime, SystemTime),
}

/// A pod the churn created: its name, namespace and cgroups (still running).
struct ChurnPod {
    ns: String,
    name: String,
    cgroups: PodCgroups,
    target: String,
}

struct Churn<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a kube::Client,
    world: &'a World,
    node: &'a Node,
    agent: &'a Agent,
    targets: &'a [String],
    idle: f64,
}

impl Churn<'_> {
    /// Pod number `n` of the churn in label set `set` (new when `set` is beyond the
    /// cluster's): created through the API, then its cgroups, until its first allowed
    /// connect.
    fn create(&self, n: usize, set: usize) -> Result<(ChurnPod, Sample)> {
        let o = &self.world.o;
        let tenant = self.world.tenant_of_set(set);
        let ns = namespace(tenant);
        let name = format!("churn-{n:03}");
        let ip = Ipv4Addr::new(127, 86, 250, 1 + n as u8);
        let (driver, qos) = LAYOUTS[n % LAYOUTS.len()];
        let cpu0 = cpu_seconds(self.agent.pid())?;
        let t_api = SystemTime::now();
        let start = Instant::now();
        let uid = self.rt.block_on(create(
            self.client,
            &ns,
            &name,
            &labels(set, o.tenants, &format!("a{set:04}")),
            NODE,
            ip,
        ))?;
        // The kubelet starts the pod once it is bound: the pod cgroup, the sandbox, the app.
        let mut cgroups = self.node.start_pod(&uid, driver, qos)?;
        cgroups.add_container()?;
        let t_cgroup = SystemTime::now();
        let target = self.targets[tenant].clone();
        let r = Probe::new()
            .in_cgroup(&cgroups.containers()[0])
            .timeout(CHANGE_LIMIT + Duration::from_secs(10))
            .until(Outcome::Ok, &target, PROBE_EVERY, CHANGE_LIMIT)?;
        ensure!(
            r.reached,
            "new pod {ns}/{name} never allowed: {r:?}\n{}",
            self.agent.stderr_tail()
        );
        let cpu = self.settled_cpu(cpu0, start)?;
        let sample = Sample {
            lag: secs(t_api, r.at()),
            from_cgroup: Some(secs(t_cgroup, r.at())),
            first_try_took_effect: r.first == Outcome::Ok,
            cpu,
            window: (t_api, r.at()),
        };
        Ok((
            ChurnPod {
                ns,
                name,
                cgroups,
                target,
            },
            sample,
        ))
    }

    /// Deletes the pod (grace 0) while its container keeps running, until its connect is
    /// refused, and checks that the refusal is `unknown_subject`.
    fn delete(&self, pod: ChurnPod) -> Result<Sample> {
        let container = &pod.cgroups.containers()[0];
        let cgroup_id = container.id();
        let cpu0 = cpu_seconds(self.agent.pid())?;
        let t_api = SystemTime::now();
        let start = Instant::now();
        self.rt.block_on(async {
            Api::<Pod>::namespaced(self.client.clone(), &pod.ns)
                .delete(&pod.name, &DeleteParams::default().grace_period(0))
                .await
                .with_context(|| format!("delete pod {}/{}", pod.ns, pod.name))
        })?;
        let r = Probe::new()
            .in_cgroup(container)
            .timeout(CHANGE_LIMIT + Duration::from_secs(10))
            .until(Outcome::Eperm, &pod.target, PROBE_EVERY, CHANGE_LIMIT)?;
        ensure!(
            r.reached,
            "deleted pod {}/{} still allowed: {r:?}",
            pod.ns,
            pod.name
        );
        let cpu = self.settled_cpu(cpu0, start)?;
        let reason = |e: &Value| {
            e.pointer("/subject/cgroup_id").and_then(Value::as_u64) == Some(cgroup_id)
                && e.get("reason").and_then(Value::as_str) == Some("unknown_subject")
        };
        self.agent
            .wait_for(1, Duration::from_secs(10), reason)
            .with_context(|| {
                format!(
                    "the deleted pod {}/{} was refused, but not as unknown_subject",
                    pod.ns, pod.name
                )
            })?;
        // The kubelet removes the cgroups of a pod that is gone.
        drop(pod);
        Ok(Sample {
            lag: secs(t_api, r.at()),
            from_cgroup: None,
            first_try_took_effect: r.first == Outcome::Eperm,
            cpu,
            window: (t_api, r.at()),
        })
    }

    /// `--burst` pods created at `--burst-rate` a second, then deleted at that rate (see the
    /// module documentation); one summary line for each. The burst's last pod joins the
    /// identity of the first local pod (pod 0) on this node.
    fn burst(&self) -> Result<Vec<String>> {
        let o = &self.world.o;
        let count = o.burst;
        let interval = Duration::from_secs_f64(1.0 / o.burst_rate as f64);
        let local_set = self.world.label_set(0);
        let tenant = self.world.tenant_of_set(local_set);
        let base_v4 = ipcache_v4(&self.agent.status()?)?;
        // Pod k: a replica of label set k on another node; the last one is on this node.
        let spec = |k: usize| {
            let local = k + 1 == count;
            let set = if local { local_set } else { k % o.label_sets };
            let node = if local {
                NODE.to_string()
            } else {
                format!("kb-node-{}", k % OTHER_NODES)
            };
            let ns = namespace(self.world.tenant_of_set(set));
            (
                ns,
                format!("burst-{k:03}"),
                set,
                node,
                Ipv4Addr::new(127, 86, 251, 1 + k as u8),
            )
        };

        // Creation.
        let cpu0 = cpu_seconds(self.agent.pid())?;
        let t0 = SystemTime::now();
        let start = Instant::now();
        let starts: Vec<(usize, SystemTime, String)> = self.rt.block_on(async {
            let begin = tokio::time::Instant::now();
            futures::stream::iter(0..count)
                .map(|k| {
                    let (ns, name, set, node, ip) = spec(k);
                    async move {
                        tokio::time::sleep_until(begin + interval * k as u32).await;
                        let at = SystemTime::now();
                        let labels = labels(set, o.tenants, &format!("a{set:04}"));
                        let uid = create(self.client, &ns, &name, &labels, &node, ip).await?;
                        anyhow::Ok((k, at, uid))
                    }
                })
                .buffer_unordered(count)
                .try_collect()
                .await
        })?;
        let api_done = start.elapsed().as_secs_f64();
        let (_, local_at, local_uid) = starts
            .iter()
            .find(|(k, _, _)| k + 1 == count)
            .context("the burst's local pod")?;
        let mut cgroups = self
            .node
            .start_pod(local_uid, Driver::Systemd, Qos::Burstable)?;
        cgroups.add_container()?;
        let target = &self.targets[tenant];
        let r = Probe::new()
            .in_cgroup(&cgroups.containers()[0])
            .timeout(CHANGE_LIMIT + Duration::from_secs(10))
            .until(Outcome::Ok, target, PROBE_EVERY, CHANGE_LIMIT)?;
        ensure!(r.reached, "the burst's local pod was never allowed: {r:?}");
        let all_in = self.wait_ipcache(base_v4 + count as u64, start)?;
        let cpu = self.settled_cpu(cpu0, start)?;
        let log = AgentLog::read(&self.agent.stderr_path())?;
        let created = format!(
            "burst: {count} pods created at {}/s (API calls done after {:.2} s): all {count} addresses in the kernel after {:.2} s, the local one's first allowed connect {:.0} ms after its create; {} source states, {} reloads; agent CPU {:.2} s",
            o.burst_rate,
            api_done,
            all_in,
            secs(*local_at, r.at()) * 1e3,
            log.count("kubernetes: cluster state updated", t0),
            log.count("policy applied", t0),
            cpu,
        );

        // Deletion, the local pod last, its container still running.
        let cpu0 = cpu_seconds(self.agent.pid())?;
        let t0 = SystemTime::now();
        let start = Instant::now();
        let local_deleted_at: SystemTime = self.rt.block_on(async {
            let begin = tokio::time::Instant::now();
            let times: Vec<(usize, SystemTime)> = futures::stream::iter(0..count)
                .map(|k| {
                    let (ns, name, ..) = spec(k);
                    async move {
                        tokio::time::sleep_until(begin + interval * k as u32).await;
                        let at = SystemTime::now();
                        Api::<Pod>::namespaced(self.client.clone(), &ns)
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await
                            .with_context(|| format!("delete pod {ns}/{name}"))?;
                        anyhow::Ok((k, at))
                    }
                })
                .buffer_unordered(count)
                .try_collect()
                .await?;
            times
                .into_iter()
                .find(|(k, _)| k + 1 == count)
                .map(|(_, at)| at)
                .context("the burst's local pod")
        })?;
        let api_done = start.elapsed().as_secs_f64();
        let container = &cgroups.containers()[0];
        let r = Probe::new()
            .in_cgroup(container)
            .timeout(CHANGE_LIMIT + Duration::from_secs(10))
            .until(Outcome::Eperm, target, PROBE_EVERY, CHANGE_LIMIT)?;
        ensure!(
            r.reached,
            "the burst's deleted local pod still allowed: {r:?}"
        );
        let cgroup_id = container.id();
        self.agent.wait_for(1, Duration::from_secs(10), |e| {
            e.pointer("/subject/cgroup_id").and_then(Value::as_u64) == Some(cgroup_id)
                && e.get("reason").and_then(Value::as_str) == Some("unknown_subject")
        })?;
        let all_out = self.wait_ipcache(base_v4, start)?;
        let cpu = self.settled_cpu(cpu0, start)?;
        let log = AgentLog::read(&self.agent.stderr_path())?;
        let deleted = format!(
            "burst: {count} pods deleted at {}/s (API calls done after {:.2} s): all {count} addresses gone from the kernel after {:.2} s, the local one refused (unknown_subject) {:.0} ms after its delete; {} source states, {} reloads; agent CPU {:.2} s",
            o.burst_rate,
            api_done,
            all_out,
            secs(local_deleted_at, r.at()) * 1e3,
            log.count("kubernetes: cluster state updated", t0),
            log.count("policy applied", t0),
            cpu,
        );
        Ok(vec![created, deleted])
    }

    /// Polls `enforcer status` until the kernel's IPv4 host cache holds `want` entries;
    /// returns the seconds since `start`.
    fn wait_ipcache(&self, want: u64, start: Instant) -> Result<f64> {
        let mut last = 0;
        loop {
            last = self
                .agent
                .status()
                .and_then(|s| ipcache_v4(&s))
                .unwrap_or(last);
            if last == want {
                return Ok(start.elapsed().as_secs_f64());
            }
            ensure!(
                start.elapsed() < CHANGE_LIMIT,
                "the IP cache holds {last} addresses, not {want}, after {CHANGE_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits [`SETTLE`], then returns the agent's CPU seconds since `cpu0` (read at `start`),
    /// less the idle rate over that time.
    fn settled_cpu(&self, cpu0: f64, start: Instant) -> Result<f64> {
        std::thread::sleep(SETTLE);
        let cpu = cpu_seconds(self.agent.pid())? - cpu0;
        Ok((cpu - self.idle * start.elapsed().as_secs_f64()).max(0.0))
    }
}

/// The agent's CPU seconds (user + system, all threads) so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last
    // `)`; utime and stime are fields 14 and 15 (1-based), in clock ticks.
    let rest = text
        .rsplit_once(')')
        .with_context(|| format!("{path}: no `)`"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} missing", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(total as f64 / hz)
}

/// CPU seconds per second the agent spends while nothing changes.
fn idle_cpu_rate(pid: u32, over: Duration) -> Result<f64> {
    let cpu0 = cpu_seconds(pid)?;
    let start = Instant::now();
    std::thread::sleep(over);
    Ok((cpu_seconds(pid)? - cpu0) / start.elapsed().as_secs_f64())
}

/// VmRSS and VmHWM in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// `name entries/capacity` of every counted map in `enforcer status --json`.
fn map_fill(status: &Value) -> String {
    let Some(maps) = status.get("maps").and_then(Value::as_array) else {
        return "?".into();
    };
    maps.iter()
        .filter_map(|m| {
            let name = m.get("name")?.as_str()?;
            let entries = m.get("entries")?.as_u64()?;
            let capacity = m.get("capacity")?.as_u64()?;
            Some(format!("{name} {entries}/{capacity}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn ms(seconds: f64) -> String {
    format!("{:.0} ms", seconds * 1e3)
}

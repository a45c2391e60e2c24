//! The `enforcer` command line. See DESIGN.md "CLI contract".

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use enforcer::agent::{self, RunOptions};
use enforcer::control::{self, Request};
use enforcer::status;
use enforcer::{errln, out, outln};
use enforcer_policy::{Bundle, Protocol};

/// Events are the agent's hot path in a flood, and each allocates and frees the strings of its
/// line: mimalloc is faster at that than glibc's allocator, and far faster than musl's (the
/// image's static binary). Figures: README, "Events".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "eBPF microsegmentation enforcer for AI workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of `run`'s variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent: compile the policy into the kernel, attach, stream deny events.
    Run {
        /// Policy bundle directory (inventory.yaml, schema.cedarschema, *.cedar). With --pdp:
        /// where the PDP's bundle is kept (default: <state dir>/pdp-bundle).
        #[arg(long, required_unless_present = "pdp")]
        policies: Option<PathBuf>,
        /// Sync the policy from a remote PDP: https://HOST:PORT (http:// only on loopback).
        #[arg(long, requires = "pdp_token_file")]
        pdp: Option<String>,
        /// File with the PDP's bearer token.
        #[arg(long, requires = "pdp")]
        pdp_token_file: Option<PathBuf>,
        /// PEM CA certificate(s) to trust for the PDP (default: the system CA bundle).
        #[arg(long, requires = "pdp")]
        pdp_ca: Option<PathBuf>,
        /// The cgroup subtree to enforce, relative to the cgroup v2 mount (or absolute).
        #[arg(long, default_value = "kubepods")]
        cgroup_root: String,
        /// Where events go: a file (appended) or `-` for standard output. SIGUSR1 reopens the
        /// file (after logrotate renamed it).
        #[arg(long, default_value = "-")]
        events: String,
        /// The format of every event line, in the file and on standard output.
        #[arg(long, value_enum, default_value = "json")]
        events_format: enforcer::events::Format,
        /// Rotate the events file before a line would take it past this size (bytes, or with K,
        /// M, G): FILE becomes FILE.1, FILE.1 FILE.2, ..., and a new FILE is opened. Lines are
        /// never split.
        #[arg(long, value_name = "SIZE", value_parser = enforcer::events::parse_size)]
        events_max_bytes: Option<u64>,
        /// Rotated files kept (FILE.1 ... FILE.N); the oldest beyond are deleted. 0 keeps none.
        #[arg(long, value_name = "N", default_value_t = enforcer::events::Rotation::DEFAULT_KEEP, requires = "events_max_bytes")]
        events_keep: u32,
        /// Repeated denies of one (subject, destination, port, protocol, hook, reason) within
        /// this window are counted in the kernel: the first is reported at once, the rest as
        /// one event with their exact `count` once the window is over. At least 500ms (the
        /// agent reads the counts every 500 ms); 0 reports every deny.
        #[arg(long, value_name = "WINDOW", default_value = "1s", value_parser = enforcer::events::aggregate::parse_window)]
        events_aggregate: std::time::Duration,
        /// Distinct denied destinations one workload may have counted per aggregation window
        /// (and as many ingress peers denied at it: two budgets); its denies beyond are counted
        /// together and reported as one `events.suppressed` event with their exact count. 0:
        /// no budget.
        #[arg(long, value_name = "N", default_value_t = enforcer_common::capacity::AGGREGATE_KEYS_PER_WORKLOAD)]
        events_keys_per_workload: u32,
        /// Tracked flows (`flow.opened` events) one workload may have reported per
        /// aggregation window; its flows beyond are counted, not written (nor their
        /// `flow.closed`), and reported as `flow_events.suppressed` with their exact counts.
        /// A suppressed flow still reaches the learner (--learn). 0, or --events-aggregate 0:
        /// no budget.
        #[arg(long, value_name = "N", default_value_t = enforcer_common::capacity::FLOW_EVENTS_PER_WORKLOAD)]
        flow_events_per_workload: u32,
        /// Global audit mode: would-deny calls pass and are reported with verdict "audit".
        #[arg(long)]
        audit: bool,
        /// A socket load balancer rewrites connects after the enforcer's hooks (Cilium's or
        /// Calico's eBPF kube-proxy replacement): a connected UDP socket elsewhere than the
        /// Kubernetes Service its connect named is taken as connected to one of its backends,
        /// and judged again as that Service (see README, "A connected UDP socket's call").
        #[arg(long)]
        socket_lb: bool,
        #[command(flatten)]
        pins: PinArgs,
        /// Size of the events ring buffer in bytes (power of two, multiple of the page size).
        #[arg(long)]
        ring_buffer_bytes: Option<u32>,
        /// Written (with the agent's pid) once the policy is in the kernel and hooks attached.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Permit --cgroup-root to be the root of the whole hierarchy (judges every host process).
        #[arg(long)]
        allow_root_cgroup: bool,
        /// Map capacity, KIND=N (repeatable; KIND: policy, identities, cgroups, ipcache, flows, flows-per-tenant, rate-limits). Sizes
        /// the maps when they are created; pinned maps keep theirs (`enforcer detach` first).
        #[arg(long = "capacity", value_name = "KIND=N")]
        capacity: Vec<String>,
        /// Testing only: skip the capacity check, so that an oversize policy fails part-way in
        /// the kernel and its rollback is exercised.
        #[arg(long, hide = true)]
        skip_capacity_check: bool,
        /// Flow keys for the identity option on tagged SYNs: lines `ID HEX` (id 1-255, 128-bit
        /// key as 32 hex digits); the first signs, the first two verify. Reloaded when it
        /// changes. Without it no SYN is tagged (peers with ingress `enforce` refuse them).
        #[arg(long, value_name = "FILE")]
        flow_key_file: Option<PathBuf>,
        #[command(flatten)]
        kubernetes: KubernetesArgs,
        /// Serve Prometheus metrics on http://ADDR/metrics (IP:PORT, like 127.0.0.1:9464 or
        /// 0.0.0.0:9464; off by default). README "Metrics" lists them.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Let this group (name or gid) read the live event stream (`enforcer events`); by
        /// default only root may.
        #[arg(long, value_name = "GROUP")]
        events_group: Option<String>,
        /// Bytes (or with K, M, G) of the ring that `enforcer events --follow` consumers of
        /// every event share (1M-1G): one that falls further behind is told what it missed.
        #[arg(long, value_name = "SIZE", value_parser = parse_follow_buffer,
              default_value_t = enforcer::events::ring::DEFAULT_CAPACITY)]
        events_follow_buffer: usize,
        /// Learn each subject's usual datasets for this long from the first run (`24h`; kept
        /// in the state directory across restarts); after it, a first contact with another
        /// dataset is a `flow.anomaly` event (and the endpoint's `step_up`, if any).
        #[arg(long, value_name = "DURATION", value_parser = parse_learn)]
        learn: Option<std::time::Duration>,
        /// POST each step-up (a `flow.anomaly` on an endpoint with `step_up`) as JSON to this
        /// URL (http://HOST:PORT/PATH), retried with backoff, never blocking enforcement.
        /// (Parsed after the command line, not by clap, whose error repeats the value whole:
        /// a webhook's path or query often holds its credential.)
        #[arg(long, value_name = "URL")]
        page_webhook: Option<String>,
        /// How far an identity option's time may be from this node's wall clock, either way,
        /// before its SYN is refused as `stale_tag` (a replay, or a node whose clock is off).
        /// Covers the node clocks' disagreement and the SYN retransmissions of one connect.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_wire_skew)]
        wire_max_skew: std::time::Duration,
        /// Rolling upgrade from a release whose option has no time (version 1): accept such
        /// options until this time (RFC 3339, e.g. 2026-12-03T12:00:00Z). Off by default: a
        /// version 1 option is `stale_tag`.
        #[arg(long, value_name = "TIME", value_parser = parse_v1_until)]
        wire_accept_v1_until: Option<std::time::SystemTime>,
    },
    /// The running agent's events: the recent ones (from its in-memory history of the last
    /// 10,000) and, with --follow, new ones as they happen. Filters combine (all must match).
    Events {
        #[command(flatten)]
        pins: PinArgs,
        /// Keep streaming new events.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only events the agent emitted in this last span (`10m`, `1h`, `30s`).
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<std::time::Duration>,
        /// The subject's tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// The subject's workload.
        #[arg(long)]
        workload: Option<String>,
        /// The destination (inventory name or IP address).
        #[arg(long)]
        to: Option<String>,
        /// The reason (`no_permit`, `tenant_mismatch`, `quarantined`, ...).
        #[arg(long)]
        reason: Option<String>,
        /// The verdict (`deny`, `audit`, `allow`).
        #[arg(long)]
        verdict: Option<String>,
        /// The event type (`connection.denied`, `flow.revoked`, `policy.applied`, ...).
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// An ATLAS technique (`AML.T0024`; also matches its sub-techniques).
        #[arg(long, value_name = "ID")]
        atlas: Option<String>,
        /// compact (one human line; default on a terminal), json (default when piped), ocsf.
        #[arg(long, short = 'o', value_enum)]
        output: Option<EventsOutput>,
        /// With --follow: events the agent queues for this consumer before it starts missing
        /// them (1-65536, default 1024; less when other consumers hold the agent's total).
        /// What it misses is told in-band either way.
        #[arg(long, value_name = "EVENTS", value_parser = clap::value_parser!(u32).range(1..=65_536))]
        queue: Option<u32>,
    },
    /// Kernel counters, map fill levels, lost events and the policy revision in force.
    Status {
        #[command(flatten)]
        pins: PinArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Live tracked flows (vector DBs, `track: true` endpoints) with both ends' identities,
    /// read from the pinned maps.
    Flows {
        #[command(flatten)]
        pins: PinArgs,
        /// Only flows to this destination (an inventory name).
        #[arg(long)]
        to: Option<String>,
        /// Only flows of this subject (a workload name).
        #[arg(long)]
        from: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Validate and explain policy bundles.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Change a workload's risk score on the running agent (re-evaluates only its row).
    Risk {
        #[command(subcommand)]
        command: RiskCommand,
    },
    /// Inspect or lift quarantines on the running agent.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// The remote Policy Decision Point: one bundle for many nodes.
    Pdp {
        #[command(subcommand)]
        command: PdpCommand,
    },
    /// The admission webhook: stamps each pod with its namespace's tenant metadata, refuses
    /// pods that claim another tenant.
    Admission {
        #[command(subcommand)]
        command: enforcer::admission::Command,
    },
    /// Uninstall: remove the pinned links (detaching the programs) and maps.
    Detach {
        #[command(flatten)]
        pins: PinArgs,
    },
}

/// `enforcer run --kubernetes`: identities from the pods and namespaces of a cluster.
#[derive(clap::Args, Clone)]
struct KubernetesArgs {
    /// Take identities from Kubernetes: Pods (this node's are mapped by their cgroups),
    /// Namespaces (tenants) and Services, merged with the bundle's inventory. The last state
    /// is kept in the state directory and enforced while the API server is unreachable.
    #[arg(long)]
    kubernetes: bool,
    /// A kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, as pods' spec.nodeName says it (default: $NODE_NAME, then the
    /// hostname).
    #[arg(long, requires = "kubernetes")]
    node_name: Option<String>,
    /// A pod label key that splits identities, besides the purpose and ring labels
    /// (repeatable).
    #[arg(long = "identity-label", value_name = "KEY", requires = "kubernetes")]
    identity_labels: Vec<String>,
    /// The SPIFFE trust domain of pod identities: spiffe://DOMAIN/ns/NS/sa/SA [default:
    /// cluster.local].
    #[arg(long, requires = "kubernetes")]
    trust_domain: Option<String>,
    /// A namespace whose pods need no tenant: without tenant metadata they get identities
    /// without a tenant (policies name them by SPIFFE ID) instead of being unknown subjects
    /// (repeatable; giving one replaces the default).
    #[arg(
        long = "system-namespace",
        value_name = "NAMESPACE",
        default_value = "kube-system",
        requires = "kubernetes"
    )]
    system_namespaces: Vec<String>,
    /// A network the cluster's pods take their addresses from, besides each Node's
    /// spec.podCIDRs (repeatable): an address in it that no pod, Service or node holds is
    /// unidentified (every call denied), never World. Give it where the CNI does not
    /// allocate from the Nodes' podCIDRs (Calico IP pools, Cilium's cluster pool).
    #[arg(long = "cluster-cidr", value_name = "CIDR", requires = "kubernetes")]
    cluster_cidrs: Vec<enforcer_policy::identity::IpNet>,
    /// The most identities (distinct label sets) one tenant may have; more are left out
    /// (their pods unknown subjects) and reported [default: 256].
    #[arg(long, value_name = "N", requires = "kubernetes")]
    max_identities_per_tenant: Option<usize>,
}

impl KubernetesArgs {
    fn options(self, state_dir: &std::path::Path) -> Result<Option<agent::KubernetesOptions>> {
        use enforcer_policy::cluster::{ClusterOptions, DEFAULT_MAX_IDENTITIES_PER_TENANT};
        if !self.kubernetes {
            return Ok(None);
        }
        let node_name = match self.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the hostname (for the node name; give --node-name)")?
                .trim()
                .to_string(),
        };
        if node_name.is_empty() {
            anyhow::bail!("the node name is empty: give --node-name or set NODE_NAME");
        }
        let max = self
            .max_identities_per_tenant
            .unwrap_or(DEFAULT_MAX_IDENTITIES_PER_TENANT);
        if max == 0 {
            anyhow::bail!("--max-identities-per-tenant must be at least 1");
        }
        for net in &self.cluster_cidrs {
            if let Some(problem) = enforcer_policy::cluster::cluster_cidr_problem(net) {
                anyhow::bail!("--cluster-cidr {net}: {problem}");
            }
        }
        Ok(Some(agent::KubernetesOptions {
            source: enforcer::sources::kubernetes::KubeOptions {
                kubeconfig: self.kubeconfig,
                node_name: node_name.clone(),
                identity_labels: self.identity_labels,
                trust_domain: self.trust_domain.unwrap_or_else(|| "cluster.local".into()),
                system_namespaces: self.system_namespaces,
                state_dir: state_dir.to_path_buf(),
            },
            cluster: ClusterOptions {
                node_name,
                cluster_cidrs: self.cluster_cidrs,
                max_identities_per_tenant: max,
            },
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EventsOutput {
    Compact,
    Json,
    Ocsf,
}

fn parse_learn(text: &str) -> Result<std::time::Duration> {
    let window = humantime::parse_duration(text)
        .with_context(|| format!("--learn {text:?}: a duration such as 24h, 7d, 30s"))?;
    if window.is_zero() {
        anyhow::bail!("--learn {text:?}: the learning window must not be empty");
    }
    // Its end is a wall-clock time, written to the state file: a window no calendar holds
    // would overflow it.
    const MAX_LEARN: std::time::Duration = std::time::Duration::from_secs(10 * 366 * 24 * 3600);
    if window > MAX_LEARN {
        anyhow::bail!("--learn {text:?}: at most 10 years");
    }
    Ok(window)
}

fn parse_wire_skew(text: &str) -> Result<std::time::Duration> {
    let skew = humantime::parse_duration(text)
        .with_context(|| format!("--wire-max-skew {text:?}: a duration such as 30s, 2m"))?;
    let max = enforcer_common::wire::MAX_SKEW_S;
    if skew.as_secs() == 0 || skew.as_secs() > u64::from(max) {
        anyhow::bail!("--wire-max-skew {text:?}: between 1s and {max}s (whole seconds)");
    }
    Ok(skew)
}

fn parse_v1_until(text: &str) -> Result<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--wire-accept-v1-until {text:?}: an RFC 3339 time such as 2026-12-03T12:00:00Z")
    })
}

fn parse_since(text: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("--since {text:?}: a duration such as 30s, 10m, 2h"))
}

#[derive(clap::Args, Clone)]
struct PinArgs {
    /// bpffs directory for pinned maps and links (a versioned subdirectory is used).
    #[arg(long = "pin-path", default_value = "/sys/fs/bpf/enforcer")]
    pin_root: PathBuf,
    /// Directory for the agent's state file (default: /run/enforcer/<pin path>).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl PinArgs {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| status::default_state_dir(&self.pin_root))
    }
}

#[derive(Subcommand)]
enum RiskCommand {
    /// `enforcer risk set WORKLOAD SCORE`, SCORE a decimal such as 0.85.
    Set {
        workload: String,
        score: String,
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Lift the quarantine of a workload.
    Release {
        workload: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Quarantine a workload by hand.
    Add {
        workload: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// List quarantined workloads.
    List {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Subcommand)]
enum PdpCommand {
    /// Serve a policy bundle directory to agents (`enforcer run --pdp URL`): only bundles that
    /// validate, behind a bearer token, over HTTPS (plain HTTP only on loopback).
    Serve {
        /// The bundle directory (watched: valid edits are published, invalid ones logged).
        #[arg(long)]
        policies: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:8443 (with TLS) or 127.0.0.1:8080.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// File holding the bearer token agents must present (else $ENFORCER_PDP_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// PEM certificate chain for HTTPS (with --tls-key).
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS (with --tls-cert).
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// Written with the bound address once serving (useful with port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a bundle; prints every problem as file:line:column and exits 1 if any,
    /// including a policy that does not fit the kernel maps.
    Check {
        dir: PathBuf,
        /// Map capacity to check against, KIND=N (repeatable; as `enforcer run --capacity`;
        /// default: the capacities maps are created with).
        #[arg(long = "capacity", value_name = "KIND=N")]
        capacity: Vec<String>,
        /// The agent's `--cgroup-root` (relative to the cgroup v2 mount): an inventory cgroup
        /// outside it is an error, since the agent's programs never judge its processes.
        #[arg(long = "cgroup-root", value_name = "PATH")]
        cgroup_root: Option<String>,
    },
    /// Show the decision for one cell, the policies that determined it, and what the
    /// kernel's live table holds for it when an enforcer is pinned.
    Explain {
        /// The policy bundle directory.
        dir: PathBuf,
        /// The calling workload's name.
        #[arg(long)]
        from: String,
        /// The destination: a workload, endpoint or Service name, a reserved name (`world`,
        /// `unidentified`, `host`, `remote-node`), or an IP address (judged as the identity
        /// whose addresses hold it with the longest prefix, as the kernel's IP cache).
        #[arg(long, value_name = "NAME|IP")]
        to: String,
        /// The destination port.
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "tcp")]
        protocol: Protocol,
        #[command(flatten)]
        pins: PinArgs,
    },
}

fn main() -> ExitCode {
    // Colour only for a person at a terminal: a log collector (a pipe, a file, journald,
    // kubectl logs) would store the escape codes. NO_COLOR (https://no-color.org) turns it off.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let command = Cli::parse().command;
    // The services log what they do; a one-shot command (`policy check`, `status`...) only
    // what went wrong, so that its own output is not buried (review 40). RUST_LOG overrides.
    let serving = matches!(
        command,
        Command::Run { .. } | Command::Pdp { .. } | Command::Admission { .. }
    );
    let default = if serving { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    match dispatch(command) {
        Ok(code) => code,
        Err(error) => {
            errln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run {
            policies,
            cgroup_root,
            events,
            events_format,
            events_max_bytes,
            events_keep,
            events_aggregate,
            events_keys_per_workload,
            flow_events_per_workload,
            audit,
            socket_lb,
            pins,
            ring_buffer_bytes,
            ready_file,
            allow_root_cgroup,
            pdp,
            pdp_token_file,
            pdp_ca,
            capacity,
            skip_capacity_check,
            flow_key_file,
            kubernetes,
            metrics,
            events_group,
            events_follow_buffer,
            learn,
            page_webhook,
            wire_max_skew,
            wire_accept_v1_until,
        } => {
            if events_max_bytes.is_some() && events == "-" {
                anyhow::bail!("--events-max-bytes rotates a file: give --events FILE (standard output is not rotated)");
            }
            if page_webhook.is_some() && learn.is_none() {
                // Pages are sent for step-ups, which only the learned neighbourhoods make.
                anyhow::bail!(
                    "--page-webhook pages step-ups, which need --learn DURATION: give both"
                );
            }
            let state_dir = pins.state_dir();
            let kubernetes = kubernetes.options(&state_dir)?;
            let policies = policies.unwrap_or_else(|| state_dir.join("pdp-bundle"));
            let pdp = match (pdp, pdp_token_file) {
                (Some(url), Some(token_file)) => Some(enforcer::pdp::SyncOptions {
                    url,
                    token: enforcer::pdp::sync::read_token(&token_file)?,
                    ca_cert: pdp_ca,
                    target_dir: policies.clone(),
                }),
                _ => None,
            };
            let options = RunOptions {
                pdp,
                policies,
                cgroup_root,
                events_rotation: enforcer::events::Rotation {
                    max_bytes: events_max_bytes,
                    keep: events_keep,
                },
                events,
                events_format,
                events_aggregate,
                events_keys_per_workload,
                flow_events_per_workload,
                audit,
                socket_lb,
                state_dir: pins.state_dir(),
                pin_root: pins.pin_root,
                ring_buffer_bytes,
                ready_file,
                allow_root_cgroup,
                capacity: capacity_overrides(&capacity)?,
                skip_capacity_check,
                flow_key_file,
                kubernetes,
                metrics: metrics
                    .as_deref()
                    .map(enforcer::metrics::parse_addr)
                    .transpose()?,
                events_group: events_group
                    .as_deref()
                    .map(enforcer::events::stream::parse_group)
                    .transpose()?,
                events_follow_buffer,
                learn,
                page_webhook: page_webhook
                    .as_deref()
                    .map(enforcer::page::Webhook::parse)
                    .transpose()?,
                wire_max_skew,
                wire_accept_v1_until,
            };
            runtime()?.block_on(agent::run(options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            pins,
            follow,
            since,
            tenant,
            workload,
            to,
            reason,
            verdict,
            kind,
            atlas,
            output,
            queue,
        } => {
            use enforcer::events::stream;
            use std::io::{IsTerminal, Write};
            let filter = stream::Filter {
                tenant,
                workload,
                to,
                reason,
                verdict,
                kind,
                atlas,
            };
            filter.validate()?;
            let output = output.unwrap_or(if std::io::stdout().is_terminal() {
                EventsOutput::Compact
            } else {
                EventsOutput::Json
            });
            let request = stream::Request {
                filter,
                follow,
                since_secs: since.map(|d| d.as_secs().max(1)),
                format: Some(
                    if output == EventsOutput::Ocsf {
                        "ocsf"
                    } else {
                        "json"
                    }
                    .into(),
                ),
                queue: queue.map(|q| q as usize),
                ring: follow,
                ..stream::Request::default()
            };
            // Flushed whenever the stream waits for the agent: once a batch, not once a line.
            let out = std::cell::RefCell::new(std::io::BufWriter::with_capacity(
                1 << 16,
                std::io::stdout().lock(),
            ));
            // A closed pipe (`| head`) ends the command, not an error.
            let closed = std::cell::Cell::new(false);
            let ended = |result: std::io::Result<()>| match result {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    closed.set(true);
                    Ok(())
                }
                other => other,
            };
            stream::call_flushing(
                &pins.state_dir(),
                &request,
                |line| {
                    let mut out = out.borrow_mut();
                    let written = if output == EventsOutput::Compact {
                        writeln!(out, "{}", stream::compact(line))
                    } else {
                        writeln!(out, "{line}")
                    };
                    ended(written)?;
                    Ok(!closed.get())
                },
                || Ok(ended(out.borrow_mut().flush())?),
            )?;
            ended(out.borrow_mut().flush())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { pins, json } => {
            let status = status::collect(&pins.pin_root, &pins.state_dir())?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!("{}", status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows {
            pins,
            to,
            from,
            json,
        } => {
            let flows = enforcer::flows::list::collect(
                &pins.pin_root,
                &pins.state_dir(),
                from.as_deref(),
                to.as_deref(),
            )?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                out!("{}", enforcer::flows::list::render(&flows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command:
                PolicyCommand::Check {
                    dir,
                    capacity,
                    cgroup_root,
                },
        } => match Bundle::load(&dir) {
            Ok(bundle) => {
                let capacity = capacity_overrides(&capacity)?.over(Default::default());
                let compiled = match bundle.compile() {
                    Ok(compiled) => compiled,
                    Err(error) => {
                        // As a validation problem is printed: a port-budget error names its
                        // policy's `file:line:column`, any other the bundle.
                        match error {
                            enforcer_policy::PolicyError::TooManyPortEntries { .. } => {
                                errln!("{error}")
                            }
                            _ => errln!("{}: error: {error}", dir.display()),
                        }
                        errln!("{}: 1 problem(s); nothing was applied", dir.display());
                        return Ok(ExitCode::FAILURE);
                    }
                };
                let inventory = &bundle.inventory().file;
                let text = std::fs::read_to_string(inventory).unwrap_or_default();
                // `line:column` of `value` on the first line that holds it as a YAML value (a
                // key's, a flow list's or a block list's item), else `1:1`.
                let at = |value: &str| {
                    text.lines()
                        .enumerate()
                        .find_map(|(i, l)| {
                            let column = l.find(value)?;
                            let before = l[..column].trim_end();
                            (before.ends_with(':')
                                || before.ends_with('[')
                                || before.ends_with(',')
                                || before.ends_with('-'))
                            .then(|| format!("{}:{}", i + 1, column + 1))
                        })
                        .unwrap_or_else(|| "1:1".to_string())
                };
                // At the inventory: it is what grows the maps.
                let workloads = text
                    .lines()
                    .position(|l| l.starts_with("workloads:"))
                    .map_or_else(|| "1:1".to_string(), |i| format!("{}:1", i + 1));
                let mut problems: Vec<String> = enforcer::desired::needs(&compiled)
                    .overflows(&capacity)
                    .into_iter()
                    .map(|overflow| {
                        format!("{}:{workloads}: error: {overflow}", inventory.display())
                    })
                    .collect();
                if let Some(root) = cgroup_root {
                    // As the agent reads both (a path may name the mount, as `--cgroup-root
                    // /sys/fs/cgroup/kubepods` may); `/` where this host has no cgroup v2.
                    let mount = enforcer::fs::cgroup2_mount().unwrap_or_else(|_| "/".into());
                    let root = enforcer::fs::cgroup_path(&mount, &root)
                        .with_context(|| format!("--cgroup-root {root}"))?;
                    for outside in enforcer::desired::cgroups_outside_root(&compiled, &mount, &root)
                    {
                        let at = at(&outside.cgroup);
                        problems.push(format!("{}:{at}: error: {outside}", inventory.display()));
                    }
                }
                if !problems.is_empty() {
                    for problem in &problems {
                        errln!("{problem}");
                    }
                    errln!(
                        "{}: {} problem(s); nothing was applied",
                        dir.display(),
                        problems.len()
                    );
                    return Ok(ExitCode::FAILURE);
                }
                let stats = compiled.stats();
                outln!(
                    "{}: ok, revision {} ({} identities, {} allowed cells)",
                    dir.display(),
                    bundle.revision(),
                    compiled.identities().count(),
                    compiled.allows().len()
                );
                tracing::debug!(?stats, "compile statistics");
                Ok(ExitCode::SUCCESS)
            }
            Err(diagnostics) => {
                errln!("{}", diagnostics.to_string().trim_end());
                errln!(
                    "{}: {} problem(s); nothing was applied",
                    dir.display(),
                    diagnostics.0.len()
                );
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    dir,
                    from,
                    to,
                    port,
                    protocol,
                    pins,
                },
        } => enforcer::explain::run(
            &dir,
            &from,
            &to,
            port,
            protocol,
            &pins.pin_root,
            &pins.state_dir(),
        ),
        Command::Risk {
            command:
                RiskCommand::Set {
                    workload,
                    score,
                    pins,
                },
        } => control_call(&pins, Request::RiskSet { workload, score }),
        Command::Quarantine { command } => match command {
            QuarantineCommand::Release { workload, pins } => {
                control_call(&pins, Request::QuarantineRelease { workload })
            }
            QuarantineCommand::Add { workload, pins } => {
                control_call(&pins, Request::QuarantineAdd { workload })
            }
            QuarantineCommand::List { pins } => control_call(&pins, Request::QuarantineList),
        },
        Command::Pdp {
            command:
                PdpCommand::Serve {
                    policies,
                    listen,
                    token_file,
                    tls_cert,
                    tls_key,
                    ready_file,
                },
        } => {
            runtime()?.block_on(enforcer::pdp::serve(enforcer::pdp::ServeOptions {
                policies,
                listen,
                token_file,
                tls_cert,
                tls_key,
                ready_file,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admission { command } => {
            runtime()?.block_on(enforcer::admission::run(command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { pins } => {
            let removed = enforcer::datapath::detach(&pins.pin_root)?;
            remove_state_dir(&pins.state_dir());
            if removed {
                outln!(
                    "detached: removed the pins under {}",
                    pins.pin_root.display()
                );
            } else {
                // Still a success (uninstalling twice is not an error), but not a claim that
                // something was detached: a mistyped path leaves the real hooks in place.
                outln!(
                    "nothing was pinned under {} (is --pin-path right?); the agent's state there is removed",
                    enforcer::datapath::pin_dir(&pins.pin_root).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Removes what the agent keeps in its state directory, then the directory if that left it
/// empty. Never the whole tree: `--state-dir` is the operator's path, and `detach
/// --state-dir /var/lib` must not delete /var/lib.
fn remove_state_dir(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // state.json (+ the .tmp of earlier agents), control.sock, events.sock,
        // pdp-status.json, the loss totals reported (`lost-reported.json`), the runs
        // `enforcer events --since` reads (`event-runs.json`), the PDP's bundle copy, the
        // last applied bundle (`last_good`), the last cluster state (`--kubernetes`), the
        // learned neighbourhoods (`--learn`: left behind, a reinstall inherited an ended
        // window, an old baseline and stale step-ups, red-team reviews 73 I1, 76 L3), the
        // temporary files `write_atomically` names `.<file>.tmp-...`, and the staging /
        // temporary siblings `files::sibling` names `.<target>.<tag>-...`.
        let cluster_state = enforcer::sources::kubernetes::STATE_FILE;
        let learned = enforcer::learn::FILE;
        let ours = matches!(
            name.as_ref(),
            "state.json"
                | "state.json.tmp"
                | "control.sock"
                | "events.sock"
                | "pdp-status.json"
                | "pdp-bundle"
                | "last-good-bundle"
                | "lost-reported.json"
                | "lost-reported.json.tmp"
        ) || name == cluster_state
            || name == learned
            || name == enforcer::events::runs::FILE
            || name.starts_with(&format!(".{}.", enforcer::events::runs::FILE))
            || name.starts_with(".state.json.tmp-")
            || name.starts_with(&format!(".{cluster_state}.tmp-"))
            || name.starts_with(&format!(".{learned}.tmp-"))
            || name.starts_with(".pdp-bundle.")
            || name.starts_with(".last-good-bundle.")
            || name.starts_with(".pdp-status.json.");
        if !ours {
            continue;
        }
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
    let _ = std::fs::remove_dir(dir);
}

/// The agent and the PDP server: two workers are plenty for one event stream and a few
/// timers, and leave the node's other cores alone. Workers get the main thread's 8 MiB
/// stack, not tokio's 2 MiB: the event task asks Cedar to attribute denies, and Cedar's
/// evaluator recurses as deep as the policy limits allow (`enforcer_policy::limits`).
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()?)
}

fn capacity_overrides(specs: &[String]) -> Result<enforcer::datapath::CapacityOverrides> {
    let mut overrides = enforcer::datapath::CapacityOverrides::default();
    for spec in specs {
        overrides.set(spec)?;
    }
    Ok(overrides)
}

fn control_call(pins: &PinArgs, request: Request) -> Result<ExitCode> {
    let response = control::call(&pins.state_dir(), &request)?;
    for item in &response.items {
        outln!("{item}");
    }
    if response.ok {
        outln!("{}", response.message);
        Ok(ExitCode::SUCCESS)
    } else {
        errln!("error: {}", response.message);
        Ok(ExitCode::FAILURE)
    }
}

/// `--events-follow-buffer`: a size within the ring's bounds.
fn parse_follow_buffer(value: &str) -> Result<usize, String> {
    use enforcer::events::ring::{MAX_CAPACITY, MIN_CAPACITY};
    let bytes = enforcer::events::parse_size(value).map_err(|e| format!("{e:#}"))?;
    usize::try_from(bytes)
        .ok()
        .filter(|b| (MIN_CAPACITY as u64..=MAX_CAPACITY as u64).contains(&(*b as u64)))
        .ok_or_else(|| format!("{value}: expected 1M to 1G"))
}

#[cfg(test)]
mod tests {
    use super::remove_state_dir;

    /// `detach` left the learner's file (and its temporary files) behind, though it says the
    /// agent's state there is removed: a reinstall with `--learn` inherited an ended window
    /// and stale step-ups (red-team reviews 73 I1, 76 L3). Every file the agent writes goes,
    /// with the directory, and nothing else does.
    #[test]
    fn detach_removes_every_file_of_the_agents_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let cluster_state = enforcer::sources::kubernetes::STATE_FILE;
        let learned = enforcer::learn::FILE;
        let files = [
            "state.json".to_string(),
            "state.json.tmp".to_string(),
            ".state.json.tmp-12-0".to_string(),
            "control.sock".to_string(),
            "events.sock".to_string(),
            "pdp-status.json".to_string(),
            "lost-reported.json".to_string(),
            enforcer::events::runs::FILE.to_string(),
            cluster_state.to_string(),
            format!(".{cluster_state}.tmp-12-3"),
            learned.to_string(),
            format!(".{learned}.tmp-12-4"),
        ];
        for name in &files {
            std::fs::write(dir.join(name), "{}").unwrap();
        }
        std::fs::create_dir(dir.join("last-good-bundle")).unwrap();
        std::fs::write(dir.join("last-good-bundle").join("inventory.yaml"), "").unwrap();
        remove_state_dir(&dir);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|entries| entries.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty() && !dir.exists(), "left behind: {left:?}");

        // The operator's files stay (and so does the directory).
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(learned), "{}").unwrap();
        std::fs::write(dir.join("neighbourhoods.json.bak"), "").unwrap();
        remove_state_dir(&dir);
        assert!(!dir.join(learned).exists());
        assert!(dir.join("neighbourhoods.json.bak").exists());
    }
}

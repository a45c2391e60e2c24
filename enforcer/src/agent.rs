//! `enforcer run`: the node agent. Startup reads as validate -> compile -> load -> write
//! policy -> attach -> stream events; then it keeps the kernel in step with the policy
//! directory, the cluster (`--kubernetes`), the cgroup tree, risk changes and quarantines
//! until it is told to stop. Stopping leaves the pins, so the kernel keeps enforcing the last
//! policy while no agent runs.
//!
//! With `--kubernetes`, the bundle is the policy directory merged with the last
//! [`ClusterState`] the source published (`Bundle::load_with_cluster`): every change of the
//! cluster recompiles (incrementally) and applies all or nothing, like an edit of the
//! directory. The cgroups of each local pod of a cluster identity are found under the cgroup
//! root ([`crate::sources::cgroups`]) and mapped to it; an inotify watch of the root makes a
//! new container's cgroup mapped within milliseconds, the periodic resync stays as the
//! backstop. Until a first state exists, pods are unknown subjects (fail closed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use enforcer_common::rate::{self, RateKey, RateLimit};
use enforcer_common::{
    flags, flow_event as flow_kind, flow_flags, flow_state, maps, proto, reason, verdict,
};
use enforcer_policy::cluster::{ClusterOptions, ClusterState};
use enforcer_policy::{Bundle, Compiled};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{self, Pending, Request, Response};
use crate::datapath::ringbuf::RingReader;
use crate::datapath::{self, Datapath, DesiredState, LoadOptions};
use crate::desired::{desired_state_with, resolve_cgroups, Overrides, Unresolved};
use crate::events::aggregate::{self, Aggregates};
use crate::events::flow::{self as flow_event, FlowCall};
use crate::events::{
    decode, ocsf, record, Emitter, Event, Format, Formatter, Notice, Rotation, Sink,
};
use crate::flows;
use crate::last_good;
use crate::metrics::{self, Metrics};
// Change detection for the policy directory is the PDP's: it follows symlinks (a ConfigMap
// volume's entries are symlinks into `..data`, which kubelet swaps on an update; the
// agent's own version skipped them) and sees every name the loader judges.
use crate::pdp::files::{fingerprint, Fingerprint};
use crate::sources::cgroups::{self, Scan, WatchStatus, Watcher};
use crate::sources::kubernetes::{self, KubeOptions, KubeSource, KubeStatus};

mod fold;
mod generations;
mod handoff;
mod kept;
use kept::Moved;
mod reconnected;
mod step_up;
mod sweep;

/// Ring-buffer records handled before the event task yields (see `drain_turn`).
const EVENT_BATCH: usize = 1024;
/// After a turn that drained the ring buffer of a few records, the event task waits this long
/// before it reads again: during a burst the records of about a millisecond are read, written
/// and sent to consumers in one turn, not a turn (a wake-up, a `write`) each. The kernel
/// wakes a reader only when it has read everything before the new record, so the wait also
/// spares the kernel's wake-ups. A first event after a quiet spell is read at once.
const EVENT_COALESCE: Duration = Duration::from_millis(1);

/// How often the agent looks for edited policy files, new cgroups and new losses.
const RESYNC_EVERY: Duration = Duration::from_millis(500);
/// How often the agent reads `FLOW_EVENTS` without being woken: the kernel wakes it only each
/// time another quarter of the ring fills unread (`WAKE_AT_BYTES` in the kernel's flows.rs)
/// or a flow opened under another policy generation than the one in force (to be re-decided
/// at once), so that no other tracked `connect()` or `close()` pays for an interrupt and a
/// wake-up. Bounds how late a flow event is written and a first contact is judged (`--learn`).
const FLOW_DRAIN_EVERY: Duration = Duration::from_millis(100);
/// How often `FLOWS` is read to name missed flow contacts (see `drain_missed_contacts`).
const LIVE_SCAN_EVERY: Duration = Duration::from_secs(5);
/// With a healthy inotify watch of the whole subtree, the cgroup tree is re-resolved on its
/// signals, and by the tick only every this many ticks (10 s): a backstop, not the way
/// changes are found (a full resolve of a busy node costs tens of milliseconds).
const BACKSTOP_TICKS: u64 = 20;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policies: PathBuf,
    pub cgroup_root: String,
    pub events: String,
    /// How events are written (`--events-format`).
    pub events_format: Format,
    /// Size-based rotation of the events file (`--events-max-bytes`, `--events-keep`).
    pub events_rotation: Rotation,
    /// Deny aggregation window (`--events-aggregate`); zero: every deny is its own event.
    pub events_aggregate: Duration,
    /// Distinct aggregation keys one workload may make per window before its further denies
    /// are folded into one `events.suppressed` count (`--events-keys-per-workload`; 0: no
    /// budget).
    pub events_keys_per_workload: u32,
    /// `flow.opened` events one workload may have written per aggregation window; its further
    /// flows are counted in `flow_events.suppressed` (`--flow-events-per-workload`; 0: no
    /// budget).
    pub flow_events_per_workload: u32,
    pub audit: bool,
    /// `--socket-lb`: `CONFIG.socket_lb`.
    pub socket_lb: bool,
    pub pin_root: PathBuf,
    pub ring_buffer_bytes: Option<u32>,
    pub ready_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow_root_cgroup: bool,
    /// Sync `policies` from a remote PDP.
    pub pdp: Option<crate::pdp::SyncOptions>,
    /// `max_entries` of the maps when this agent creates them.
    pub capacity: datapath::CapacityOverrides,
    /// Testing only (off): let an oversize policy fail in the kernel, to exercise rollback.
    pub skip_capacity_check: bool,
    /// Identities from Kubernetes (`--kubernetes`).
    pub kubernetes: Option<KubernetesOptions>,
    /// Serve Prometheus metrics on this address (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// The flow keys of the identity option (`--flow-key-file`).
    pub flow_key_file: Option<PathBuf>,
    /// `--events-group`: the gid that may also read `enforcer events` (default: root only).
    pub events_group: Option<u32>,
    /// `--events-follow-buffer`: bytes of the followers' shared ring
    /// ([`crate::events::ring`]).
    pub events_follow_buffer: usize,
    /// `--learn`: the learning window of the usual neighbourhoods ([`crate::learn`]).
    pub learn: Option<Duration>,
    /// `--page-webhook`: where step-ups are paged ([`crate::page`]).
    pub page_webhook: Option<crate::page::Webhook>,
    /// `--wire-max-skew`: how far an identity option's time may be from this node's clock.
    pub wire_max_skew: Duration,
    /// `--wire-accept-v1-until`: version 1 options (no time) are accepted until then.
    pub wire_accept_v1_until: Option<std::time::SystemTime>,
}

/// `enforcer run --kubernetes`: where the cluster comes from and how it is merged.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// The watch of the API server (its `state_dir` keeps the last state for a restart).
    pub source: KubeOptions,
    /// How the cluster's identities join the bundle (this node's name, the per-tenant quota).
    pub cluster: ClusterOptions,
}

/// What `enforcer status` reads about the running agent (the kernel side it reads from pins).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AgentState {
    #[serde(default, deserialize_with = "shown_only")]
    pub pid: u32,
    #[serde(default, deserialize_with = "shown_only")]
    pub policies: PathBuf,
    #[serde(default, deserialize_with = "shown_only")]
    pub revision: String,
    #[serde(default, deserialize_with = "shown_only")]
    pub applied_at: String,
    #[serde(default, deserialize_with = "shown_only")]
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    #[serde(default, deserialize_with = "shown_only")]
    pub unresolved_cgroups: Vec<String>,
    #[serde(default)]
    pub risk_overrides: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "shown_only")]
    pub quarantined: Vec<String>,
    /// Those of `quarantined` out of the policy in force: they hold again when they are back.
    #[serde(default, deserialize_with = "shown_only")]
    pub quarantined_out_of_policy: Vec<String>,
    /// The identity numbers of the quarantines that hold until released (not a step-up's):
    /// restored at the next start beside the pinned flags, since an identity with no entry
    /// in `IDENTITIES` then (a label set scaled to zero pods, a workload taken out of the
    /// inventory) has no flag to carry it (red-team review 39 M1).
    #[serde(default)]
    pub quarantined_ids: Vec<u32>,
    /// The name each quarantined identity number was quarantined under: a number may pass
    /// to another workload while its own is out of the policy (a collision's probe), and
    /// the quarantine stays with the name (red-team review 49 M1).
    #[serde(default)]
    pub quarantine_names: BTreeMap<u32, String>,
    /// Quarantines (until released) whose workload is out of the policy while its number
    /// names another: they hold again when the name is back, at whatever number.
    #[serde(default)]
    pub waiting_quarantines: BTreeSet<String>,
    /// Quarantines (until released) of every label set of a service account
    /// (`<namespace>/<service account>#*`) or of a namespace (`<namespace>/*`), each made when
    /// more of its quarantines were out of the policy than are kept one by one (red-team
    /// review 75 M2).
    #[serde(default)]
    pub quarantine_folds: BTreeSet<String>,
    /// The label sets quarantined only because a fold covers them: a fold's release releases
    /// these, not those quarantined on their own account (red-team review 77 M1).
    #[serde(default)]
    pub quarantined_by_fold: BTreeSet<String>,
    /// The label sets out of the policy a fold holds that were quarantined on their own
    /// account: quarantined so again when back, and waiting by name when the fold is
    /// released (red-team review 78 M1).
    #[serde(default)]
    pub absorbed_by_fold: BTreeSet<String>,
    /// The cgroups held under a quarantine's name (`Agent::hold_cgroups`): read back at the
    /// next start, since one no identity maps then is in no pinned map (review 53 N4).
    #[serde(default)]
    pub held_cgroups: BTreeMap<u64, String>,
    /// Set when the policy comes from a remote PDP.
    #[serde(default, deserialize_with = "shown_only")]
    pub pdp_url: Option<String>,
    /// The Kubernetes source (`--kubernetes`), as of the last write of this file.
    #[serde(default, deserialize_with = "shown_only")]
    pub kubernetes: Option<KubeStatus>,
    /// What the cluster merge refused or reported, and cgroups two identities claim: one
    /// line each (each was logged and emitted as a `cluster.problem` event once).
    #[serde(default, deserialize_with = "shown_only")]
    pub cluster_problems: Vec<String>,
    /// The pods found in the cgroup tree (`--kubernetes`).
    #[serde(default, deserialize_with = "shown_only")]
    pub pods: Option<PodsView>,
    /// The inotify watch of the cgroup root.
    #[serde(default, deserialize_with = "shown_only")]
    pub cgroup_watch: Option<WatchStatus>,
    /// The agent's own cgroup, when it lies inside the enforced subtree: exempt from
    /// judgement (`identity::AGENT`).
    #[serde(default, deserialize_with = "shown_only")]
    pub agent_cgroup: Option<PathBuf>,
    /// Names of the identities tracked flows can have at either end (this node's subjects and
    /// the tracked destinations), for `enforcer flows`.
    #[serde(default, deserialize_with = "shown_only")]
    pub flow_names: BTreeMap<u32, FlowName>,
    /// Policy generation (low 32 bits, as the kernel stamps it) -> bundle revision, so that a
    /// restarted agent still names the revision that allowed a long-lived flow.
    #[serde(default)]
    pub policy_generations: BTreeMap<u32, String>,
    /// Recent moves of cgroups between workloads, for a quarantine decided later about calls
    /// made before (`Agent::cgroups_written`): read back at the next start within the same
    /// boot (`boot_id`), so that a restart does not forget them (red-team review 56 L4).
    #[serde(default)]
    pub departures: Vec<Departure>,
    /// Each cgroup of the cgroup map as last written: its identity number and the workload
    /// that number named then. The next agent of the same boot takes the pinned map's
    /// cgroups by these names (where the pinned number is the one kept here), so that a
    /// cgroup moved while no agent ran is a move of its first write (review 56 L4), named as
    /// the map was written, not by the policy it starts with (review 57 M1: a number that
    /// passed to another workload meanwhile gave the cgroup a workload it never had).
    #[serde(default)]
    pub mapped_cgroups: BTreeMap<u64, (u32, String)>,
    /// The kernel's boot ID (`/proc/sys/kernel/random/boot_id`): the boot whose
    /// CLOCK_MONOTONIC and cgroup IDs `departures` and `mapped_cgroups` are of.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// A cgroup that left a workload (the cgroup map mapped it to another, or to none).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Departure {
    pub cgroup_id: u64,
    /// The workload it left.
    pub workload: String,
    /// When the agent wrote the move (CLOCK_MONOTONIC nanoseconds).
    pub at_ns: u64,
    /// The identity number it had in that workload (none from an agent that did not keep it:
    /// such a move is matched by the workload's name alone).
    #[serde(default)]
    pub identity: Option<u32>,
}

/// An identity as `enforcer flows` names it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FlowName {
    pub name: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub datasets: Vec<String>,
}

/// The local pods as the agent maps them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PodsView {
    /// Pod cgroups under the cgroup root.
    pub pod_cgroups: usize,
    /// Of those, pods of an identity: their cgroups are mapped.
    pub mapped: usize,
    /// Cgroups mapped for pods (pod cgroups and every cgroup under them).
    pub mapped_cgroups: usize,
    /// Local pods of an identity with no cgroup on this node (yet): `<uid> (<identity>)`.
    pub without_cgroup: Vec<String>,
    /// Pod cgroups no identity claims (their processes are unknown subjects): UIDs.
    pub unidentified: Vec<String>,
    /// Set when the scan of the cgroup root stopped at a bound: pods beyond it are unknown.
    pub scan_truncated: Option<String>,
}

fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// The `subject.quarantined` notice for `workload` (`identity`, or `UNKNOWN` while it is out
/// of the policy), stamped now.
fn quarantined_notice(workload: String, identity: u32, cause: impl Into<String>) -> Notice {
    Notice::Quarantined {
        time: now(),
        workload,
        identity,
        cause: cause.into(),
    }
}

/// The bad-input checks that must pass before anything in the kernel changes.
pub struct Prepared {
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
}

pub fn prepare(options: &RunOptions) -> Result<Prepared> {
    let cgroup_mount = crate::fs::cgroup2_mount()?;
    let cgroup_root = crate::fs::cgroup_path(&cgroup_mount, &options.cgroup_root)?;
    if !cgroup_root.is_dir() {
        bail!(
            "the cgroup root {} does not exist (--cgroup-root {:?}, relative to the cgroup v2 mount {})",
            cgroup_root.display(),
            options.cgroup_root,
            cgroup_mount.display()
        );
    }
    if cgroup_root == cgroup_mount && !options.allow_root_cgroup {
        bail!(
            "--cgroup-root {:?} is the root of the whole cgroup hierarchy: that would judge every \
             process of the host. Pass --allow-root-cgroup if that is really meant.",
            options.cgroup_root
        );
    }
    // Before anything is read from them: the last good bundle and cluster state are enforced
    // after a restart, the state directory's sockets take commands, and the agent writes its
    // own cgroup's exemption into maps pinned there before it loads its programs.
    crate::fs::private_dir(&options.state_dir, 0o755)?;
    crate::fs::ensure_bpffs(&options.pin_root)?;
    crate::fs::private_dir(&options.pin_root, 0o700)?;
    crate::fs::private_dir(&datapath::pin_dir(&options.pin_root), 0o700)?;
    Ok(Prepared {
        cgroup_mount,
        cgroup_root,
    })
}

/// The cluster a bundle is merged with: `None` without `--kubernetes`.
#[derive(Clone, Copy)]
struct Cluster<'a> {
    /// `None` until the source has a first state: the bundle has no cluster identity and every
    /// pod is an unknown subject.
    state: Option<&'a ClusterState>,
    options: &'a ClusterOptions,
}

/// Loads and compiles the bundle in `dir` (merged with the cluster), with the run-time risk
/// overrides applied.
fn load_policy(
    dir: &Path,
    cluster: Option<Cluster>,
    risk_overrides: &BTreeMap<String, String>,
    metrics: Option<&Metrics>,
) -> Result<(Bundle, Compiled)> {
    let started = Instant::now();
    let mut bundle = load_bundle(dir, cluster)?;
    apply_risk_overrides(&mut bundle, risk_overrides);
    let compiled = bundle
        .compile()
        .with_context(|| format!("compiling {}", dir.display()))?;
    if let Some(metrics) = metrics {
        metrics.compiled(started.elapsed());
    }
    Ok((bundle, compiled))
}

/// The bundle in `dir`, which no other user may change ([`crate::fs::trusted_bundle_dir`]):
/// one who could would decide what the kernel allows.
fn load_bundle(dir: &Path, cluster: Option<Cluster>) -> Result<Bundle> {
    crate::fs::trusted_bundle_dir(dir)?;
    let loaded = match cluster {
        Some(cluster) => {
            let empty = ClusterState::default();
            Bundle::load_with_cluster(dir, cluster.state.unwrap_or(&empty), cluster.options)
        }
        None => Bundle::load(dir),
    };
    loaded.map_err(|diagnostics| {
        anyhow::anyhow!(
            "the policy bundle {} is invalid:\n{diagnostics}",
            dir.display()
        )
    })
}

/// The agent's state between events: the policy in force and the kernel it is written to.
struct Agent {
    options: RunOptions,
    /// `--flow-key-file`, reloaded on every tick when its content changed.
    flow_keys: Option<crate::wire::KeyFile>,
    cgroup_mount: PathBuf,
    cgroup_root: PathBuf,
    /// The agent's own cgroup (ID, path) when it lies inside the enforced subtree: exempt.
    agent_cgroup: Option<(u64, PathBuf)>,
    datapath: Datapath,
    bundle: Bundle,
    compiled: Arc<Compiled>,
    /// The kernel's cgroup map as last written (only through [`Agent::cgroups_written`]).
    cgroups: BTreeMap<u64, u32>,
    /// The identity number and workload name of each cgroup of the kernel's cgroup map, under
    /// the policy it was written with (at a start, the pinned map's, as the state file names
    /// them: [`kept::moves_at_start`]).
    cgroup_names: kept::Mapped,
    /// Recent moves of cgroups away from a workload: (cgroup, workload left), when and from
    /// which number, kept a minute and three `--events-aggregate` windows.
    departures: kept::Departures,
    /// The cgroups last mapped to a quarantined identity, each with the quarantine's name,
    /// kept while they are unmapped and may still exist: where a quarantine follows its
    /// processes from ([`Agent::follow_moved_cgroups`], [`Agent::hold_cgroups`]).
    held_cgroups: BTreeMap<u64, String>,
    unresolved: Unresolved,
    /// Quarantined identity numbers, each with the name it was quarantined under (see
    /// [`Agent::keep_quarantines_with_their_names`]).
    quarantined: BTreeMap<u32, String>,
    /// Quarantines until released whose workload left the policy while its number passed to
    /// another: by name, until the name is back.
    waiting_quarantines: BTreeSet<String>,
    /// Quarantines of every label set of a service account (`<ns>/<sa>#*`) or namespace
    /// (`<ns>/*`), made when too many of its quarantines were out of the policy ([`fold`]).
    quarantine_folds: BTreeSet<String>,
    /// The label sets quarantined only because a fold covers them ([`fold::Record`]).
    quarantined_by_fold: BTreeSet<String>,
    /// Quarantines of their own of label sets out of the policy that a fold holds
    /// ([`fold::Record`]'s `absorbed`).
    absorbed_by_fold: BTreeSet<String>,
    risk_overrides: BTreeMap<String, String>,
    fingerprint: Fingerprint,
    /// When the policy in force was written to the kernel (RFC 3339).
    applied_at: String,
    notices: mpsc::UnboundedSender<Notice>,
    history: PolicyHistory,
    /// The revision saved in [`last_good::dir`], if any.
    saved_revision: Option<String>,
    /// The policy directory as it was when it was last rejected: while it stays so, a change
    /// of the cluster is applied to the bundle in force (its copy in [`last_good::dir`]).
    dir_rejected: Option<Fingerprint>,
    /// The Kubernetes source (`--kubernetes`).
    kube: Option<KubeSource>,
    /// The latest cluster state the source published: every reload merges it (the bundle in
    /// force holds it unless that reload was rejected).
    cluster: Option<Arc<ClusterState>>,
    /// Problems reported (logged and emitted) and still present.
    reported_problems: BTreeSet<String>,
    /// The tenants whose rate-limited pairs did not all fit (`desired_rates`), as problems.
    rate_problems: BTreeSet<String>,
    pods: Option<PodsView>,
    /// The watcher's status as of the last tick (the watcher lives in the run loop).
    watch_status: Option<WatchStatus>,
    /// Ticks since start (see [`BACKSTOP_TICKS`]).
    ticks: u64,
    /// `--metrics`: what the agent counts and times (the server reads it at scrape time).
    metrics: Option<Arc<Metrics>>,
    /// The source's status (staleness left out) and the watcher's, as last written to the
    /// state file.
    status_written: (Option<KubeStatus>, Option<WatchStatus>),
    /// Flow events the agent makes (revoked, stale), to the event task.
    flow_events: mpsc::UnboundedSender<FlowCall>,
    /// Where the IP cache in force puts the tracked destinations (address, prefix length):
    /// what a revocation pass narrows a listing of UDP sockets to (`reconnected.rs`).
    tracked_prefixes: Vec<flows::TrackedPrefix>,
    /// Connected UDP flows already reported `flow.stale`: cookie -> the record's `start_ns`
    /// and the destination address and port, once each (a socket connected elsewhere since
    /// is a new flow, reported again).
    stale_reported: BTreeMap<u64, (u64, [u8; 16], u16)>,
    /// Where the sockets of UDP records marked `CONNECTED_AGAIN` were found (see
    /// `reconnected.rs`).
    reconnected: reconnected::Looks,
    /// When the last sweep of gone connects ran (see `sweep.rs`), and the `start_ns` it
    /// stopped after (0: from the start).
    last_sweep: Option<Instant>,
    sweep_cursor: u64,
    /// The `start_ns` after which records wait for the sweep's next round (its start): a
    /// round ends, and the cursor wraps, however fast new records come (red-team review 35).
    sweep_round_end: u64,
    /// TCP flows no longer permitted whose reset failed (by cookie): reported
    /// `flow.revoke_failed` once, retried on every tick until reset or gone.
    revoke_failed: BTreeSet<u64>,
    /// Shared with the event task: see [`DeniedHandshakes`].
    denied_handshakes: Arc<DeniedHandshakes>,
    /// `--learn`: the usual neighbourhoods, and the anomalies after the window.
    learner: Option<crate::learn::Learner>,
    /// `--page-webhook`.
    pager: Option<crate::page::Pager>,
    /// Step-up quarantines in force (identity -> when they lift, and the name the learner's
    /// file keeps the step-up under: its identity may leave the policy before the lift).
    step_ups: BTreeMap<u32, (SystemTime, String)>,
    /// Step-ups an earlier agent recorded whose subject is not in the policy yet (a restart
    /// before the cluster's pods are known): name -> when they lift. Taken up by the tick
    /// once the name is known and quarantined; forgotten at their lift time otherwise.
    pending_step_ups: BTreeMap<String, SystemTime>,
    /// The repeats of each anomaly since its last event ([`step_up::Repeats`]).
    anomaly_repeats: step_up::Repeats,
    /// The contacts whose `flow.opened` the kernel could not write, drained on every tick
    /// (see `step_up.rs`): to the learner with `--learn`, discarded without.
    missed: Option<crate::flows::missed::MissedContacts>,
    /// `FLOWS` as last read to name missed contacts, by (start, pid_tgid, subject,
    /// destination), and when (read at most every `LIVE_SCAN_EVERY`).
    live_flows: HashMap<(u64, u64, u32, u32), (u64, enforcer_common::FlowRecord)>,
    live_scanned: Option<std::time::Instant>,
    /// The final writes after the last table swap failed (see `settle_after_swap`): the tick
    /// tries again.
    settle_pending: bool,
}

pub async fn run(options: RunOptions) -> Result<()> {
    let Prepared {
        cgroup_mount,
        cgroup_root,
    } = prepare(&options)?;
    // What the last agent left (read once: this agent writes it only once it runs), before
    // anything changes in the kernel: a file that cannot be read stops the start, since
    // starting without it would free what only it keeps (red-team review 73 L2).
    let kept_state = load_state(&options.state_dir).with_context(|| {
        format!(
            "refusing to start without the quarantines, held cgroups and risk overrides the \
             last agent kept; move {} away to start without them",
            options.state_dir.join("state.json").display()
        )
    })?;
    // Bound before anything changes in the kernel: an address in use is an error of the
    // command line, and the first compile is timed too.
    let (metrics, _metrics_server) = match options.metrics {
        Some(addr) => {
            let metrics = Arc::new(Metrics::new(datapath::pin_dir(&options.pin_root)));
            let server = metrics::serve(addr, metrics.clone()).await?;
            tracing::info!(addr = %server.local_addr(), path = metrics::PATH, "serving metrics");
            (Some(metrics), Some(server))
        }
        None => (None, None),
    };
    // A DaemonSet agent lives in a pod cgroup under the subtree it enforces: judged, it would
    // be an unknown subject until it had listed the pods, which it cannot do without reaching
    // the API server. Its own cgroup is exempt (named in `status`), and that is written into
    // the maps an earlier agent left pinned before this one opens any connection (to the PDP
    // or the API server), since that agent's programs are still attached.
    let agent_cgroup = crate::fs::own_cgroup_under(&cgroup_mount, &cgroup_root)
        .and_then(|path| Some((crate::fs::cgroup_id(&path).ok()?, path)));
    if let Some((id, path)) = &agent_cgroup {
        tracing::info!(cgroup = %path.display(), id, "the agent runs inside the enforced subtree: its own cgroup is exempt");
        if let Ok(mut tables) = datapath::Tables::open(&datapath::pin_dir(&options.pin_root)) {
            tables
                .exempt(*id)
                .context("exempting the agent's own cgroup in the pinned maps")?;
        }
    }
    // With a remote PDP, `policies` is the directory the sync task keeps the last good bundle
    // in (persisted, so a restart without the PDP still enforces); wait for one, at once when
    // one is already there.
    let _pdp = match options.pdp.clone() {
        Some(sync_options) => {
            let url = sync_options.url.clone();
            let handle = crate::pdp::sync::try_spawn(sync_options)?;
            if let Some(metrics) = &metrics {
                metrics.set_pdp(handle.status_reader());
            }
            if !handle.first_sync(Duration::from_secs(60)).await {
                bail!(
                    "no policy to enforce: the PDP {url} gave no good bundle within 60 s and none is persisted in {} ({})",
                    options.policies.display(),
                    handle.status().last_error.unwrap_or_default()
                );
            }
            Some(handle)
        }
        None => None,
    };
    let risk_overrides = kept_state
        .as_ref()
        .map(|s| s.risk_overrides.clone())
        .unwrap_or_default();
    // The cluster source first: a state persisted by an earlier run is enforced at once, even
    // with the API server unreachable. Without one the agent does not wait: pods are unknown
    // subjects (fail closed) until the first list completes.
    let kube = match &options.kubernetes {
        Some(k) => Some(
            kubernetes::spawn(k.source.clone())
                .await
                .context("starting the Kubernetes source")?,
        ),
        None => None,
    };
    let mut cluster_rx = kube.as_ref().map(KubeSource::state);
    let cluster_state = cluster_rx
        .as_mut()
        .and_then(|rx| rx.borrow_and_update().clone());
    match (&kube, &cluster_state) {
        (Some(_), Some(state)) => tracing::info!(
            identities = state.identities.len(),
            services = state.services.len(),
            "starting from the cluster state the source has"
        ),
        (Some(_), None) => tracing::warn!(
            "no cluster state yet: pods are unknown subjects (denied) until the first list from the API server"
        ),
        _ => {}
    }
    let cluster = options.kubernetes.as_ref().map(|k| Cluster {
        state: cluster_state.as_deref(),
        options: &k.cluster,
    });
    // A broken directory does not stop a restart that has a last good bundle: it enforces
    // that one, reports the directory's problems, and waits for a fix.
    let (bundle, compiled, rejected, saved_revision) = match load_policy(
        &options.policies,
        cluster,
        &risk_overrides,
        metrics.as_deref(),
    ) {
        Ok((bundle, compiled)) => (
            bundle,
            compiled,
            None,
            last_good::revision(&options.state_dir),
        ),
        Err(error) => {
            let fallback = last_good::dir(&options.state_dir);
            match load_policy(&fallback, cluster, &risk_overrides, metrics.as_deref()) {
                Ok((bundle, compiled)) => {
                    tracing::error!(
                        last_good = %fallback.display(),
                        revision = bundle.revision(),
                        "the policy directory is invalid; starting from the last bundle this agent applied:\n{error:#}"
                    );
                    let saved = Some(bundle.revision().to_string());
                    (bundle, compiled, Some(error), saved)
                }
                Err(_) => return Err(error),
            }
        }
    };
    let sink = Sink::open(&options.events, options.events_rotation)?;
    let node = options.kubernetes.as_ref().map(|k| ocsf::Context {
        node: k.cluster.node_name.clone(),
    });
    let mut emitter = Emitter::new(
        Formatter::new(
            options.events_format,
            node.unwrap_or_else(ocsf::Context::from_host),
        ),
        sink,
    );
    if let Some(metrics) = &metrics {
        emitter.set_metrics(metrics.clone());
    }
    // `enforcer events`: the live stream and its bounded history.
    let hub = crate::events::stream::Hub::new(metrics.clone()).with_archive(
        crate::events::archive::Archive::of_output(
            &options.events,
            options.events_format,
            options.events_rotation,
        ),
    );
    let hub = hub.with_follow_ring(emitter.formatter().clone(), options.events_follow_buffer);
    emitter.set_hub(hub.clone());
    let stream_formatter = emitter.formatter().clone();
    // Before the ready file: SIGUSR1's default action would kill the agent.
    let reopen = signal(SignalKind::user_defined1())?;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: &options.pin_root,
        ring_buffer_bytes: options.ring_buffer_bytes,
        capacity: options.capacity,
    })?;
    // The counts an earlier agent left (reported also with aggregation off), before this
    // agent's window replaces its length in `CONFIG`: their window numbers are of that length.
    let previous_window = datapath
        .tables
        .config()
        .map(|c| Duration::from_nanos(c.event_window_ns))
        .unwrap_or_default();
    let aggregates = Aggregates::open(datapath.dir(), options.events_aggregate, previous_window)?;
    // Before the hooks are attached: the first flood is aggregated already.
    datapath
        .tables
        .set_event_window(
            options.events_aggregate,
            options.events_keys_per_workload,
            options.flow_events_per_workload,
        )
        .context("setting the deny aggregation window")?;
    datapath
        .tables
        .set_socket_lb(options.socket_lb)
        .context("setting CONFIG.socket_lb")?;
    // A pod's own loopback is its own only outside the node's namespace: the agent's.
    match crate::datapath::netns_cookie() {
        Ok(cookie) => datapath
            .tables
            .set_node_netns(cookie)
            .context("setting the node's network namespace")?,
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "the node's network namespace is not known: a pod's calls to its own loopback are judged as calls to World"
        ),
    }
    if let Some(until) = options.wire_accept_v1_until {
        if until <= std::time::SystemTime::now() {
            tracing::warn!(
                until = %humantime::format_rfc3339_seconds(until),
                "--wire-accept-v1-until is already past: version 1 identity options are refused"
            );
        }
    }
    let v1_until_s = options
        .wire_accept_v1_until
        .map(crate::wire::v1_until_s)
        .transpose()?
        .unwrap_or(0);
    datapath
        .tables
        .set_wire_freshness(options.wire_max_skew, v1_until_s)
        .context("setting the identity option's freshness")?;
    refresh_tai_offset(&mut datapath.tables);
    if options.skip_capacity_check {
        tracing::warn!("--skip-capacity-check: an oversize policy fails part-way in the kernel and is rolled back (testing only)");
        datapath.tables.set_capacity_check(false);
    }
    let (quarantined, waiting_quarantines) =
        kept::restored(&datapath, kept_state.as_ref(), &compiled)?;
    // The cgroup map as the last agent left it, if one ran: the quarantines' cgroups and each
    // cgroup's workload then, so that a move made while no agent ran is followed too.
    let pinned_cgroups = datapath.tables.cgroup_mappings().unwrap_or_else(|error| {
        tracing::warn!("reading the pinned cgroup map: {error:#}: a pod relabelled while no agent ran may not be followed by its quarantine");
        BTreeMap::new()
    });
    let (quarantine_folds, quarantined_by_fold, absorbed_by_fold) =
        kept::folds_at_start(kept_state.as_ref());
    let held_cgroups = kept::held_at_start(
        &pinned_cgroups,
        kept_state.as_ref(),
        &quarantined,
        [&waiting_quarantines, &quarantine_folds, &absorbed_by_fold],
    );
    let (cgroup_names, departures) =
        kept::moves_at_start(&pinned_cgroups, kept_state.as_ref(), datapath.dir());

    let compiled = Arc::new(compiled);
    let history = PolicyHistory::new(options.events_aggregate);
    if let Some(state) = kept_state {
        history.seed(state.policy_generations);
    }
    let (notices, notice_rx) = mpsc::unbounded_channel();
    let quarantine_requests = Arc::new(handoff::QuarantineRequests::default());
    let (flow_tx, flow_rx) = mpsc::unbounded_channel();
    // Set by the event task when a tracked handshake completes under an older policy than the
    // newest (see `stream_events`); one permit however many arrive before the agent looks.
    let stale_handshake = Arc::new(tokio::sync::Notify::new());
    let denied_handshakes = Arc::new(DeniedHandshakes::default());
    // `flow.opened` records for the learner: only with `--learn`.
    let (contact_tx, mut contact_rx) =
        handoff::contacts(handoff::CONTACT_BACKLOG, handoff::CONTACT_OVERFLOW_PAIRS);
    let learner = match options.learn {
        Some(window) => {
            let learner =
                crate::learn::Learner::open(&options.state_dir, window, SystemTime::now())
                    .context("opening the learned neighbourhoods (--learn)")?;
            tracing::info!(
                until = %humantime::format_rfc3339_seconds(learner.learning_until()),
                file = %options.state_dir.join(crate::learn::FILE).display(),
                "learning the usual neighbourhoods"
            );
            Some(learner)
        }
        None => None,
    };
    let contact_tx = learner.is_some().then_some(contact_tx);
    let missed = Some(crate::flows::missed::MissedContacts::open(datapath.dir())?);
    let pager = options.page_webhook.clone().map(crate::page::Pager::spawn);
    let fingerprint_now = fingerprint(&options.policies);
    // Keys before the hooks: the first tagged SYN is signed, never sent bare.
    let mut flow_keys = options.flow_key_file.clone().map(crate::wire::KeyFile::new);
    if let Some(keys) = &mut flow_keys {
        keys.refresh(datapath.dir())
            .context("loading --flow-key-file")?;
    }
    let mut agent = Agent {
        flow_keys,
        dir_rejected: rejected.is_some().then(|| fingerprint_now.clone()),
        fingerprint: fingerprint_now,
        kube,
        cluster: cluster_state,
        reported_problems: BTreeSet::new(),
        rate_problems: BTreeSet::new(),
        pods: None,
        watch_status: None,
        ticks: 0,
        metrics,
        status_written: (None, None),
        flow_events: flow_tx,
        tracked_prefixes: Vec::new(),
        stale_reported: BTreeMap::new(),
        reconnected: BTreeMap::new(),
        last_sweep: None,
        sweep_cursor: 0,
        sweep_round_end: 0,
        revoke_failed: BTreeSet::new(),
        denied_handshakes: denied_handshakes.clone(),
        learner,
        pager,
        step_ups: BTreeMap::new(),
        pending_step_ups: BTreeMap::new(),
        anomaly_repeats: step_up::Repeats::default(),
        missed,
        live_flows: HashMap::new(),
        live_scanned: None,
        settle_pending: false,
        options,
        cgroup_mount,
        cgroup_root,
        agent_cgroup,
        datapath,
        bundle,
        compiled,
        cgroups: BTreeMap::new(),
        cgroup_names,
        departures,
        held_cgroups,
        unresolved: Unresolved::default(),
        quarantined,
        waiting_quarantines,
        quarantine_folds,
        quarantined_by_fold,
        absorbed_by_fold,
        risk_overrides,
        applied_at: now(),
        notices,
        history: history.clone(),
        saved_revision,
    };
    // Step-ups first: the first write moves quarantines to their names' numbers, and one in
    // a step-up's position must be told from a lasting one (review 50 L2).
    agent.adopt_step_ups();
    agent
        .apply_full(None)
        .context("writing the first policy into the kernel")?;
    agent.count_quarantined();
    match rejected {
        Some(error) => agent.reject(error),
        None => agent.save_last_good(),
    }
    agent.report_cluster_problems();
    // Before the hooks: a cgroup created from here on is signalled.
    let watcher = match Watcher::spawn(&agent.cgroup_root, cgroups::DEFAULT_MAX_WATCHES) {
        Ok(watcher) => {
            let status = watcher.status();
            tracing::info!(root = %agent.cgroup_root.display(), watches = status.watches, "watching the cgroup tree");
            agent.watch_status = Some(status);
            Some(watcher)
        }
        Err(error) => {
            tracing::warn!("cannot watch the cgroup tree ({error:#}); new cgroups are found by the resync every {} ms", RESYNC_EVERY.as_millis());
            None
        }
    };
    // Cgroups created while the policy was being written.
    agent.resync_cgroups();
    let attach = agent.datapath.attach(&agent.cgroup_root)?;
    for hook in &attach.hooks {
        tracing::info!(program = hook.program, adopted = hook.adopted, cgroup = %agent.cgroup_root.display(), "hook in place");
    }

    let ring = agent.datapath.take_events()?;
    let flow_ring = agent.datapath.take_flow_events()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel();
    let mut events = tokio::spawn(stream_events(
        Rings {
            events: ring,
            flows: flow_ring,
        },
        agent.datapath.dir().to_path_buf(),
        agent.options.state_dir.clone(),
        history,
        notice_rx,
        flow_rx,
        quarantine_requests.clone(),
        stale_handshake.clone(),
        denied_handshakes,
        contact_tx,
        emitter,
        reopen,
        aggregates,
        Stopping {
            stop_reading: stop_rx,
            finish: finish_rx,
        },
    ));
    let (control_tx, mut control_rx) = mpsc::channel::<Pending>(16);
    let control = control::listen(&agent.options.state_dir, control_tx)?;
    hub.record_run(
        &agent.options.state_dir,
        &agent.options.events,
        agent.options.events_format,
    );
    let event_socket = crate::events::stream::listen(
        &agent.options.state_dir,
        hub,
        stream_formatter,
        crate::events::stream::Access {
            group: agent.options.events_group,
        },
    )?;
    agent.write_state()?;
    if let Some(ready) = &agent.options.ready_file {
        crate::fs::replace_file(ready, format!("{}\n", std::process::id()).as_bytes())?;
    }

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut ticker = tokio::time::interval(RESYNC_EVERY);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => agent.reload("SIGHUP"),
            _ = ticker.tick() => {
                agent.watch_status = watcher.as_ref().map(Watcher::status);
                agent.tick();
                agent.drain_missed_contacts(contact_rx.take_overflow());
                agent.lift_step_ups();
                agent.send_anomaly_repeats();
            }
            _ = tree_changed(watcher.as_ref()) => agent.resync_cgroups(),
            Some(state) = next_cluster(&mut cluster_rx) => agent.cluster_changed(state),
            Some((request, reply)) = control_rx.recv() => {
                let response = agent.handle(request);
                let _ = reply.send(response);
            }
            _ = quarantine_requests.requested() => {
                for (subject, request) in quarantine_requests.take() {
                    agent.quarantine_requested(subject, request);
                }
            }
            _ = stale_handshake.notified() => {
                agent.revoke_flows("a handshake completed under an older policy");
            }
            Some((cookie, record)) = contact_rx.queue.recv() => agent.contact(cookie, &record, true),
        }
        if events.is_finished() {
            bail!("the event stream stopped: {:?}", events.await);
        }
    }
    tracing::info!("stopping; the pinned programs keep enforcing the last policy");
    // What the event task has read from the kernel is acted on and written before the agent
    // goes: a quarantine it asked for, a first contact it queued, the notices these make.
    // (What it has not read stays in the pinned rings for the next agent.) Dropping them
    // lost, say, the quarantine a written `@quarantine` deny announced.
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    if stop_tx.send(read_tx).is_ok() {
        let _ = tokio::time::timeout(STOP_DRAIN, read_rx).await;
    }
    for (subject, request) in quarantine_requests.take() {
        agent.quarantine_requested(subject, request);
    }
    while let Ok((cookie, record)) = contact_rx.queue.try_recv() {
        agent.contact(cookie, &record, true);
    }
    // And the contacts kept past the queue's backlog, which live only here (red-team review
    // 39), with the kernel's missed ones.
    agent.drain_missed_contacts(contact_rx.take_overflow());
    // The repeats of anomalies gathered so far, with their counts: not for the next agent.
    agent.send_anomaly_repeats_now();
    if let Some(learner) = &agent.learner {
        if let Err(error) = learner.flush() {
            tracing::error!("writing the learned neighbourhoods at exit: {error:#}");
        }
    }
    if finish_tx.send(()).is_ok() && tokio::time::timeout(STOP_DRAIN, &mut events).await.is_err() {
        tracing::warn!("the event stream did not finish its last lines in time");
    }
    events.abort();
    control.abort();
    event_socket.abort();
    let _ = std::fs::remove_file(control::socket_path(&agent.options.state_dir));
    let _ = std::fs::remove_file(crate::events::stream::socket_path(&agent.options.state_dir));
    Ok(())
}

impl Agent {
    /// Runs `swap` (a table swap: a full apply or a row) with the maps that are not
    /// double-buffered written around it, for `self.compiled`: the rate limits
    /// (`datapath::rates`) and the ingress allowlist (`datapath::ingress`) each get their
    /// interim values before it (stricter limits, the allowlist's grants) and their final
    /// ones after it. Refused before anything is written when the allowlist cannot fit (the
    /// last good policy stays in force whole); rate limits that fit only without the old
    /// pairs first take their place ([`datapath::RateWriter::make_room`]), so that no map
    /// left full can refuse every change and the agent's start. A failed swap puts both back
    /// as they were. Once the
    /// swap is done the change is in force whatever happens next: a failure of the final
    /// writes is logged and retried by the tick (`settle_after_swap`), the interim values
    /// holding meanwhile (never looser than both policies).
    fn swap_bracketed<T>(
        &mut self,
        swap: impl FnOnce(&mut datapath::Tables) -> Result<T>,
    ) -> Result<T> {
        let dir = self.datapath.dir().to_path_buf();
        let mut rate_writer = datapath::RateWriter::open(&dir)?;
        let (rates, rate_problems) = self.desired_rates(&rate_writer);
        let ingress = crate::wire::ingress_allows(&self.compiled);
        let mut ingress_writer = datapath::IngressWriter::open(&dir)?;
        ingress_writer
            .check_fits(ingress.len())
            .context("the ingress allowlist does not fit")?;
        let rates_in_force = rate_writer.current();
        // Last: the way out when the rate limits do not fit changes the map.
        if let Err(error) = rate_writer.check_fits(&rates) {
            let removed = rate_writer
                .make_room(&rates)
                .context("making room for the rate limits")?;
            tracing::warn!(
                removed,
                "{error:#}: the pairs the new limits do not have were removed first (unlimited until the swap)"
            );
            rate_writer
                .check_fits(&rates)
                .context("the rate limits do not fit")?;
        }
        let ingress_in_force = ingress_writer.current();
        let shared = rate::sharing(rates.keys());
        let shared_in_force = rate::sharing(rates_in_force.keys());
        // The kernel looks under the shared keys (both kinds) before any pair moves to one;
        // it stops only once none is left (after the swap).
        let swapped = (if shared != rate::SHARING_NONE {
            self.datapath.tables.set_rate_shared(shared)
        } else {
            Ok(())
        })
        .and_then(|()| rate_writer.before_swap(&rates))
        .context("writing the interim rate limits")
        .and_then(|_| {
            ingress_writer
                .before_swap(&ingress)
                .context("writing the ingress allowlist's grants")
        })
        .and_then(|_| swap(&mut self.datapath.tables));
        match swapped {
            Ok(value) => {
                let settled = rate_writer
                    .after_swap(&rates)
                    .and_then(|written| {
                        self.datapath.tables.set_rate_shared(shared)?;
                        Ok(written)
                    })
                    .context("writing the rate limits")
                    .and_then(|_| {
                        ingress_writer
                            .after_swap(&ingress)
                            .context("writing the ingress allowlist")
                    });
                self.settled(settled);
                // A tenant's pairs now shared, or no longer: said at once, whatever changed.
                self.rate_problems = rate_problems;
                self.report_cluster_problems();
                Ok(value)
            }
            Err(error) => {
                // The old policy stays in force: so do its limits and its allowlist.
                let undone = rate_writer
                    .after_swap(&rates_in_force)
                    .and_then(|_| self.datapath.tables.set_rate_shared(shared_in_force));
                if let Err(undo) = undone {
                    tracing::error!("restoring the rate limits in force: {undo:#}");
                }
                if let Err(undo) = ingress_writer.write_exactly(&ingress_in_force) {
                    tracing::error!("restoring the ingress allowlist in force: {undo:#}");
                }
                Err(error)
            }
        }
    }

    /// The rate limits of `self.compiled`, cut to the room of `writer`'s map: a tenant
    /// whose pairs exceed its share has the rest held to shared limits, instead of the
    /// node's whole policy refused (red-team review 39 H3); and that as cluster problems, one
    /// per such tenant (their text stays while the tenant shares, so that churn does not
    /// report it again), for the caller to keep once the limits are in force.
    fn desired_rates(
        &self,
        writer: &datapath::RateWriter,
    ) -> (BTreeMap<RateKey, RateLimit>, BTreeSet<String>) {
        let pairs = enforcer_policy::rate::rate_limits(&self.compiled);
        let fitted = enforcer_policy::rate::fit(&self.compiled, pairs, writer.room());
        let with_whom = if rate::sharing(fitted.limits.keys()) == rate::SHARING_ACROSS_TENANTS {
            "with the tenant's other pairs, or, for the destinations most tenants reach, with \
             every tenant's (the tenants' limited destinations alone outnumber the room)"
        } else {
            "with the tenant's other pairs"
        };
        let problems = fitted
            .shared
            .iter()
            .map(|(tenant, (pairs, kept))| {
                tracing::debug!(%tenant, pairs, kept, "rate-limited pairs with a limit of their own");
                let tenant = if tenant.is_empty() { "(none)" } else { tenant };
                format!(
                    "tenant {tenant}: not all of its rate-limited (subject, destination) pairs \
                     fit its share of {} ({} pairs for the limits in force): the others share \
                     their destination's strictest limit {with_whom} (`--capacity \
                     rate-limits=N`, after `enforcer detach`)",
                    maps::RATE_LIMITS,
                    writer.room()
                )
            })
            .collect();
        (fitted.limits, problems)
    }

    /// The final values of the rate limits and the ingress allowlist for `self.compiled`
    /// (step 2 of `datapath::rates` and `datapath::ingress`), written again by the tick after
    /// they failed (`settle_pending`).
    fn settle_after_swap(&mut self) {
        let dir = self.datapath.dir().to_path_buf();
        let ingress = crate::wire::ingress_allows(&self.compiled);
        let settled = datapath::RateWriter::open(&dir)
            .and_then(|mut w| {
                let (rates, _) = self.desired_rates(&w);
                let written = w.after_swap(&rates)?;
                let shared = rate::sharing(rates.keys());
                self.datapath.tables.set_rate_shared(shared)?;
                Ok(written)
            })
            .context("writing the rate limits")
            .and_then(|_| {
                datapath::IngressWriter::open(&dir)
                    .and_then(|mut w| w.after_swap(&ingress))
                    .context("writing the ingress allowlist")
            });
        self.settled(settled);
    }

    /// Notes how the final writes after a swap went: on failure logged and left for the
    /// next tick.
    fn settled(&mut self, settled: Result<usize>) {
        match settled {
            Ok(writes) => {
                if self.settle_pending {
                    tracing::info!("the rate limits and the ingress allowlist are settled");
                }
                tracing::debug!(ingress_writes = writes, "after the swap");
                self.settle_pending = false;
            }
            Err(error) => {
                tracing::error!(
                    "after the table swap: {error:#}; the interim values hold, retried every tick"
                );
                self.settle_pending = true;
            }
        }
    }

    /// Writes the whole compiled policy (identities, IP cache, cgroups, table swap), all or
    /// nothing: on failure every map holds what it held before (`previous` explains the
    /// events of that time again).
    fn apply_full(&mut self, previous: Option<Arc<Compiled>>) -> Result<()> {
        let mut moved = self.keep_quarantines_with_their_names();
        let written = self.write_full(previous, &mut moved);
        match &written {
            Ok(()) => self.quarantines_written(moved),
            Err(_) => self.quarantines_not_written(moved),
        }
        written
    }

    /// [`Agent::apply_full`]'s write, the quarantines moved to the policy's numbers (and to
    /// where their cgroups go: [`Agent::follow_moved_cgroups`]).
    fn write_full(&mut self, previous: Option<Arc<Compiled>>, moved: &mut Moved) -> Result<()> {
        let pods = self.scan_pods();
        let (mut desired, mut unresolved) = self.desired(pods.as_ref());
        if self.follow_moved_cgroups(&desired.cgroups, moved) {
            (desired, unresolved) = self.desired(pods.as_ref());
        }
        let history = self.history.clone();
        let next = self.compiled.clone();
        let previous = previous.unwrap_or_else(|| next.clone());
        // Each generation is published before it is written: an event decided just after a
        // flip finds its policy. Transition-table denies are explained by the new policy.
        let mut publish = |generation: u64, flip: datapath::Flip| {
            let compiled = match flip {
                datapath::Flip::Rollback => previous.clone(),
                datapath::Flip::Transition | datapath::Flip::Final => next.clone(),
            };
            history.publish(generation, compiled);
        };
        let report = self.swap_bracketed(|tables| tables.apply_with(&desired, &mut publish))?;
        self.applied_at = now();
        if let Some(metrics) = &self.metrics {
            metrics.applied(report.elapsed, self.compiled.revision());
        }
        report_unresolved(&self.unresolved, &unresolved);
        self.pods = pods_view(pods.as_ref(), &unresolved, &desired.cgroups, &self.compiled);
        self.unresolved = unresolved;
        self.tracked_prefixes = flows::tracked_prefixes(&desired).unwrap_or_default();
        self.cgroups_written(desired.cgroups, pods.as_ref());
        tracing::info!(
            revision = self.compiled.revision(),
            allows = desired.allows.len(),
            written = report.written,
            removed = report.removed,
            transition = report.transition,
            elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
            "policy applied"
        );
        // Kernel, then the state file (`enforcer status`), then the event: whoever sees the
        // event sees the revision in status, and whoever sees that finds it in force.
        self.save_state();
        if let Some(learner) = &mut self.learner {
            // The tenants with workloads on this node: only they can have subjects here, so
            // only they are given a share (counting the whole cluster's would reserve room
            // for tenants that never come, and cap the ones that do).
            let tenants: BTreeSet<&str> = self
                .cgroups
                .values()
                .filter_map(|&id| self.compiled.identity(id)?.tenant.as_deref())
                .collect();
            learner.set_tenants(tenants.len());
        }
        self.revoke_flows("policy applied");
        let _ = self.notices.send(Notice::PolicyApplied {
            time: now(),
            snapshot: self.compiled.revision().to_string(),
            allows: desired.allows.len(),
        });
        Ok(())
    }

    /// What the kernel must hold for the policy in force and the quarantines now.
    fn desired(&self, pods: Option<&Scan>) -> (DesiredState, Unresolved) {
        let quarantined: BTreeSet<u32> = self.quarantined.keys().copied().collect();
        let overrides = Overrides {
            audit: self.options.audit,
            quarantined: &quarantined,
            agent_cgroup: self.agent_cgroup.as_ref().map(|(id, _)| *id),
        };
        desired_state_with(&self.compiled, &self.cgroup_mount, pods, &overrides)
    }

    fn tick(&mut self) {
        if self.settle_pending {
            self.settle_after_swap();
        }
        if let Some(keys) = &mut self.flow_keys {
            keys.refresh_logged(self.datapath.dir());
        }
        // Before the policy check, whose reload ends the tick: a directory that changes at
        // every tick must not starve the clock of the identity option.
        refresh_tai_offset(&mut self.datapath.tables);
        let latest = fingerprint(&self.options.policies);
        if latest != self.fingerprint {
            self.reload("policy directory changed");
            return;
        }
        self.ticks += 1;
        let watched = self
            .watch_status
            .as_ref()
            .is_some_and(|w| w.degraded.is_none());
        if !watched || self.ticks.is_multiple_of(BACKSTOP_TICKS) {
            self.resync_cgroups();
        }
        if !self.revoke_failed.is_empty() {
            self.revoke_flows("retrying failed resets");
        }
        self.sweep_gone_connects();
        // The source's connection and the watcher change without a policy change: keep
        // `enforcer status` current (staleness is computed by the reader).
        if (self.kube_status_to_write(), self.watch_status.clone()) != self.status_written {
            self.save_state();
        }
    }

    /// Pods and containers come and go: re-resolve the cgroup map, write only what changed.
    fn resync_cgroups(&mut self) {
        let pods = self.scan_pods();
        let mut unresolved = Unresolved::default();
        let mut fresh = resolve_cgroups(
            &self.compiled,
            &self.cgroup_mount,
            pods.as_ref(),
            self.agent_cgroup.as_ref().map(|(id, _)| *id),
            &mut unresolved,
        );
        let moving = self.held_moves(&fresh);
        if fresh != self.cgroups && !moving.is_empty() {
            // A held cgroup back under another workload (it was unmapped at the last write):
            // the full write quarantines that workload before its cgroup is mapped. Should it
            // fail, the moving cgroups stay unmapped and every other is mapped as usual
            // (review 53 N3: one relabel stalled the node's new pods).
            match self.apply_full(None) {
                Ok(()) => return,
                Err(error) => {
                    tracing::error!("writing the policy for a quarantined cgroup's move failed, its cgroups stay unmapped: {error:#}");
                    for cgroup in moving {
                        fresh.remove(&cgroup);
                    }
                }
            }
        }
        let mut written = false;
        if fresh != self.cgroups {
            match self.datapath.tables.sync_cgroups(&fresh) {
                Ok(()) => {
                    tracing::info!(cgroups = fresh.len(), "cgroup map updated");
                    self.cgroups_written(fresh, pods.as_ref());
                    written = true;
                }
                Err(error) => tracing::error!("updating the cgroup map failed: {error:#}"),
            }
        }
        let view = pods_view(pods.as_ref(), &unresolved, &self.cgroups, &self.compiled);
        if written && unresolved == self.unresolved && view == self.pods {
            // The map's names and moves, for the next agent (saved below otherwise).
            self.save_state();
        }
        if unresolved != self.unresolved || view != self.pods {
            report_unresolved(&self.unresolved, &unresolved);
            let conflicts_changed = unresolved.conflicts != self.unresolved.conflicts;
            self.unresolved = unresolved;
            self.pods = view;
            if conflicts_changed {
                self.report_cluster_problems();
            }
            self.save_state();
        }
    }

    /// Scans the cgroup root for pod cgroups (`--kubernetes` only: the inventory names its
    /// cgroups by path).
    fn scan_pods(&self) -> Option<Scan> {
        self.options.kubernetes.as_ref()?;
        match cgroups::scan(&self.cgroup_root, cgroups::Limits::default()) {
            Ok(scan) => {
                if let Some(why) = &scan.truncated {
                    if self.pods.as_ref().and_then(|p| p.scan_truncated.as_ref()) != Some(why) {
                        tracing::warn!("cgroup scan incomplete: {why}");
                    }
                }
                Some(scan)
            }
            Err(error) => {
                tracing::error!("scanning the cgroup root for pods: {error:#}");
                None
            }
        }
    }

    /// A new cluster state: merge, compile, apply, as for an edit of the directory.
    fn cluster_changed(&mut self, state: Arc<ClusterState>) {
        // The source publishes a state only when it differs from its last one, so the same
        // `Arc` is the only repeat (the state read at start, then seen as a change); a deep
        // comparison would walk every pod of the cluster on every change.
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &state))
        {
            return;
        }
        tracing::info!(
            identities = state.identities.len(),
            services = state.services.len(),
            problems = state.problems.len(),
            "cluster state changed"
        );
        self.cluster = Some(state);
        self.reload_with("cluster state changed", true);
    }

    fn cluster(&self) -> Option<Cluster<'_>> {
        self.options.kubernetes.as_ref().map(|k| Cluster {
            state: self.cluster.as_deref(),
            options: &k.cluster,
        })
    }

    /// Logs and emits each problem of the cluster merge (and each cgroup conflict) once.
    fn report_cluster_problems(&mut self) {
        let current = self.current_problems();
        for problem in current.difference(&self.reported_problems) {
            tracing::warn!(%problem, "cluster problem");
            let _ = self.notices.send(Notice::ClusterProblem {
                time: now(),
                problem: problem.clone(),
            });
        }
        for gone in self.reported_problems.difference(&current) {
            tracing::info!(problem = %gone, "cluster problem resolved");
        }
        self.reported_problems = current;
    }

    fn current_problems(&self) -> BTreeSet<String> {
        let mut problems: BTreeSet<String> =
            self.bundle.cluster_problems().iter().cloned().collect();
        if let Some(state) = &self.cluster {
            problems.extend(state.problems.iter().cloned());
        }
        problems.extend(self.unresolved.conflicts.iter().cloned());
        problems.extend(self.rate_problems.iter().cloned());
        problems.extend(
            crate::desired::cgroups_outside_root(
                &self.compiled,
                &self.cgroup_mount,
                &self.cgroup_root,
            )
            .iter()
            .map(ToString::to_string),
        );
        problems
    }

    fn kube_status_to_write(&self) -> Option<KubeStatus> {
        self.kube.as_ref().map(|k| {
            let mut status = k.status();
            // Grows every second while disconnected: the reader computes it from last_sync.
            status.staleness_seconds = None;
            status
        })
    }

    /// Loads `dir` merged with the cluster state and compiles it incrementally.
    fn candidate(&self, dir: &Path) -> Result<(Bundle, Compiled)> {
        let started = Instant::now();
        let mut bundle = load_bundle(dir, self.cluster())?;
        apply_risk_overrides(&mut bundle, &self.risk_overrides);
        // Reuses the previous answers when only identities changed (a new pod, say).
        let compiled = bundle
            .compile_incremental(&self.compiled)
            .context("compiling")?;
        if let Some(metrics) = &self.metrics {
            metrics.compiled(started.elapsed());
        }
        Ok((bundle, compiled))
    }

    /// The bundle in force (from its copy in the state directory) merged with the current
    /// cluster state.
    fn in_force_with_cluster(&self) -> Result<(Bundle, Compiled)> {
        let copy = last_good::dir(&self.options.state_dir);
        let (bundle, compiled) = self.candidate(&copy)?;
        if bundle.revision() != self.bundle.revision() {
            bail!(
                "the copy of the bundle in force ({}) holds revision {}, not {}",
                copy.display(),
                bundle.revision(),
                self.bundle.revision()
            );
        }
        Ok((bundle, compiled))
    }

    /// Validate -> compile -> swap; any failure keeps the policy in force and says so.
    fn reload(&mut self, why: &str) {
        self.reload_with(why, false)
    }

    /// [`Agent::reload`]; `cluster_only` when only the cluster changed. Then a directory that
    /// still looks as it did when it was rejected is read again but, if it still fails, not
    /// reported again: the new cluster state is merged with the bundle in force instead
    /// (its copy in [`last_good::dir`]), so that pods keep being mapped while an operator
    /// fixes the policy.
    fn reload_with(&mut self, why: &str, cluster_only: bool) {
        self.fingerprint = fingerprint(&self.options.policies);
        tracing::info!(why, "reloading policy");
        let candidate = self.candidate(&self.options.policies);
        // The directory may have changed while it was read (a PDP sync swaps it whole): load
        // again on the next tick rather than apply a bundle read half before, half after.
        if fingerprint(&self.options.policies) != self.fingerprint {
            tracing::info!("policy directory changed while it was read; reloading");
            self.fingerprint.clear();
            return;
        }
        let mut from_dir = true;
        let (bundle, compiled) = match candidate {
            Ok(ok) => ok,
            Err(error) if cluster_only && self.dir_rejected.as_ref() == Some(&self.fingerprint) => {
                tracing::debug!("the policy directory is still invalid: {error:#}");
                from_dir = false;
                match self.in_force_with_cluster() {
                    Ok(ok) => ok,
                    Err(error) => {
                        return self.reject(error.context(format!(
                            "the policy directory {} is still invalid, and merging the cluster change with the bundle in force failed",
                            self.options.policies.display()
                        )))
                    }
                }
            }
            Err(error) => {
                self.dir_rejected = Some(self.fingerprint.clone());
                return self.reject(error);
            }
        };
        let previous = std::mem::replace(&mut self.compiled, Arc::new(compiled));
        // The new bundle during the apply: its inventory gives the rate limits.
        let previous_bundle = std::mem::replace(&mut self.bundle, bundle);
        if let Err(error) = self.apply_full(Some(previous.clone())) {
            // Apply is all or nothing: it checked capacity before writing, or rolled every
            // map back; the old policy is still the one in force.
            self.compiled = previous;
            self.bundle = previous_bundle;
            return self.reject(error);
        }
        if from_dir {
            self.dir_rejected = None;
            self.save_last_good();
        }
        self.report_cluster_problems();
        // The problems are in the state file too.
        self.save_state();
    }

    /// Keeps a copy of the bundle just applied for a restart to fall back on (see
    /// [`last_good`]); a failure is logged: it costs only that fallback.
    fn save_last_good(&mut self) {
        let revision = self.bundle.revision().to_string();
        if self.saved_revision.as_deref() == Some(revision.as_str()) {
            return;
        }
        match last_good::save(&self.options.policies, &revision, &self.options.state_dir) {
            Ok(true) => self.saved_revision = Some(revision),
            Ok(false) => {}
            Err(error) => tracing::warn!("keeping a copy of the last good bundle: {error:#}"),
        }
    }

    fn reject(&mut self, error: anyhow::Error) {
        if let Some(metrics) = &self.metrics {
            metrics.rejected();
        }
        let errors: Vec<String> = format!("{error:#}").lines().map(str::to_string).collect();
        tracing::error!(
            revision_in_force = self.compiled.revision(),
            "policy rejected; the last good one stays in force:\n{error:#}"
        );
        let _ = self.notices.send(Notice::PolicyRejected {
            time: now(),
            policies: self.options.policies.display().to_string(),
            errors,
            snapshot_in_force: self.compiled.revision().to_string(),
        });
    }

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::RiskSet { workload, score } => self.set_risk(&workload, &score),
            Request::QuarantineAdd { workload } => {
                match self.compiled.identity_by_name(&workload) {
                    Some(identity) => {
                        self.quarantine(identity.id, "manual".to_string(), Hold::Lasting);
                        Response::ok(format!("{workload} quarantined"))
                    }
                    None => Response::error(format!(
                        "no workload named {workload:?} in the policy in force"
                    )),
                }
            }
            Request::QuarantineRelease { workload } => self.release(&workload),
            Request::QuarantineList => {
                let items = self.quarantine_list();
                let mut response = Response::ok(format!("{} quarantined", items.len()));
                response.items = items;
                response
            }
        }
    }

    /// Re-evaluates only this subject's row and writes the difference.
    fn set_risk(&mut self, workload: &str, score: &str) -> Response {
        let started = Instant::now();
        // All or nothing: if the row cannot be written, the agent keeps what the kernel holds.
        let old_risk = self
            .bundle
            .identities()
            .by_name(workload)
            .map(|i| i.risk.clone());
        let old_compiled = self.compiled.clone();
        if let Err(error) = self.bundle.set_risk(workload, score) {
            return Response::error(format!("{error}"));
        }
        let compiled = Arc::make_mut(&mut self.compiled);
        let written = compiled
            .recompile_subject(&self.bundle, workload)
            .map_err(|error| anyhow::anyhow!("re-evaluating {workload}: {error}"))
            .and_then(|delta| {
                let generation = self.datapath.tables.next_generation()?;
                self.history.publish(generation, self.compiled.clone());
                // The subject's rate limits and its cells at this node's ingress follow its
                // risk, around the row swap: a risk rise is in force by the time the row is.
                self.swap_bracketed(|tables| {
                    tables
                        .apply_row(&delta.added, &delta.removed)
                        .with_context(|| format!("writing {workload}'s row"))
                })?;
                Ok(delta)
            });
        let delta = match written {
            Ok(delta) => delta,
            Err(error) => {
                self.compiled = old_compiled;
                if let Some(risk) = old_risk {
                    if let Err(undo) = self.bundle.set_risk(workload, &risk) {
                        tracing::error!("restoring {workload}'s risk {risk}: {undo}");
                    }
                }
                return Response::error(format!("{error:#}"));
            }
        };
        let elapsed = started.elapsed();
        self.risk_overrides
            .insert(workload.to_string(), score.to_string());
        self.save_state();
        self.revoke_flows("risk changed");
        tracing::info!(
            workload,
            score,
            added = delta.added.len(),
            removed = delta.removed.len(),
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "risk changed"
        );
        let _ = self.notices.send(Notice::RiskChanged {
            time: now(),
            workload: workload.to_string(),
            score: score.to_string(),
            added: delta.added.len(),
            removed: delta.removed.len(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        });
        Response::ok(format!(
            "{workload}: risk {score}; {} cells now allowed, {} now denied ({:.1} ms)",
            delta.added.len(),
            delta.removed.len(),
            elapsed.as_secs_f64() * 1e3
        ))
    }

    /// Quarantines `subject` (its `IDENTITIES` flag), for `cause` (said in the log and the
    /// notice). A [`Hold::Lasting`] quarantine of a subject a step-up quarantined first takes
    /// the step-up's place: its TTL must not lift what an operator or a `@quarantine` policy
    /// meant to hold (red-team review 39), and the notice says the new cause.
    fn quarantine(&mut self, subject: u32, cause: String, hold: Hold) {
        if self
            .quarantined
            .insert(subject, self.name_of(subject))
            .is_some()
        {
            // Quarantined on its own account now, not only its fold's: on disk at once, or a
            // restart would give it back to the fold (review 78 L1).
            let named = self.name_of(subject);
            if self.quarantined_by_fold.remove(&named) {
                tracing::warn!(workload = %named, %cause, "label set a fold quarantined now quarantined on its own account too");
                self.save_state();
            }
            if hold == Hold::Lasting && self.has_step_up(subject) {
                self.forget_step_up(subject);
                let workload = self.name_of(subject);
                tracing::warn!(%workload, %cause, "subject quarantined by a step-up now quarantined until released");
                let _ = self
                    .notices
                    .send(quarantined_notice(workload, subject, cause));
            }
            return;
        }
        match self
            .datapath
            .tables
            .update_flags(subject, flags::QUARANTINED, 0)
        {
            Ok(()) => {
                if hold == Hold::Lasting {
                    self.forget_step_up(subject);
                }
                self.count_quarantined();
                let workload = self.name_of(subject);
                self.hold_cgroups_of(subject, &workload);
                tracing::warn!(%workload, %cause, "subject quarantined: every further connection is denied");
                self.save_state();
                self.revoke_flows("quarantine");
                let _ = self
                    .notices
                    .send(quarantined_notice(workload, subject, cause));
            }
            Err(error) => {
                self.quarantined.remove(&subject);
                tracing::error!("quarantining identity {subject} failed: {error:#}");
            }
        }
    }

    fn release(&mut self, workload: &str) -> Response {
        if self.quarantine_folds.contains(workload) {
            return self.release_fold(workload);
        }
        let in_policy = self.compiled.identity_by_name(workload).is_some();
        if !in_policy && self.absorbed_by_fold.contains(workload) {
            return self.release_absorbed(workload);
        }
        if let Some(fold) = fold::covering(&self.quarantine_folds, workload) {
            return Response::error(format!(
                "{workload} is held by the quarantine of every label set of {fold}: release {fold}"
            ));
        }
        let Some(id) = self.compiled.identity_by_name(workload).map(|i| i.id) else {
            return self.release_absent(workload);
        };
        let Some(name) = self.quarantined.remove(&id) else {
            return Response::error(format!("{workload} is not quarantined"));
        };
        if let Err(error) = self.datapath.tables.update_flags(id, 0, flags::QUARANTINED) {
            self.quarantined.insert(id, name);
            return Response::error(format!("releasing {workload}: {error:#}"));
        }
        // Released by hand before its TTL: nothing left to lift.
        self.forget_step_up(id);
        self.count_quarantined();
        self.save_state();
        let _ = self.notices.send(Notice::Released {
            time: now(),
            workload: workload.to_string(),
            identity: id,
        });
        Response::ok(format!("{workload} released"))
    }

    /// Re-decides every tracked flow against the tables now in force (as the connect hook
    /// would decide it now): an established TCP flow no longer permitted is reset with
    /// `SOCK_DESTROY` (its recorded cookie included) and reported `flow.revoked`; a connected
    /// UDP flow no longer permitted is reported `flow.stale`, once, since nothing can close it
    /// from outside. Called after every change of what the tables permit.
    fn revoke_flows(&mut self, why: &str) {
        let started = Instant::now();
        let dir = self.datapath.dir().to_path_buf();
        let records = match flows::read(&dir) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(
                    why,
                    "reading the tracked flows to re-decide them: {error:#}"
                );
                return;
            }
        };
        let read_time = started.elapsed();
        // Where a pass spends its time (logged with its result): finding the processes of a
        // flow's cgroup, and the resets themselves.
        let (mut procs_time, mut destroy_time) = (Duration::ZERO, Duration::ZERO);
        let mut procs = flows::destroy::CgroupProcs::new(&self.cgroup_root);
        let mut diag_sockets = flows::destroy::DiagSockets::default();
        let mut looks = reconnected::LookBudget::default();
        let mut places = reconnected::Places::new();
        let mut tracked_places = reconnected::TrackedPlaces::new();
        let mut narrowed_looks = reconnected::LookBudget::default();
        let mut live = BTreeSet::new();
        let (mut revoked, mut stale, mut failed) = (0usize, 0usize, 0usize);
        for (cookie, mut record) in records {
            live.insert(cookie);
            let mut failure = None;
            if record.protocol == proto::UDP {
                // The kernel may have made its connects otherwise than the hooks judged them
                // (see `reconnected.rs`): decided where the socket really is.
                let lookup = reconnected::Lookup {
                    procs: &mut procs,
                    sockets: &mut diag_sockets,
                    looks: &mut looks,
                    places: &mut places,
                    tracked: &mut tracked_places,
                    narrowed_looks: &mut narrowed_looks,
                };
                match self.udp_flow(cookie, &record, lookup) {
                    Some(flow) => record = flow,
                    None => {
                        self.stale_reported.remove(&cookie);
                        continue;
                    }
                }
            }
            let decision = match flows::decide(&self.datapath.tables, &record) {
                Ok(decision) => decision,
                Err(error) => {
                    tracing::error!(cookie, "re-deciding a tracked flow: {error:#}");
                    continue;
                }
            };
            let flows::Decision::Denied {
                reason,
                subject,
                destination,
            } = decision
            else {
                self.stale_reported.remove(&cookie);
                self.revoke_failed.remove(&cookie);
                continue;
            };
            let kind = if record.protocol == proto::UDP {
                let flow = (record.start_ns, record.daddr, record.dport);
                if self.stale_reported.insert(cookie, flow) == Some(flow) {
                    continue;
                }
                stale += 1;
                flow_event::STALE
            } else {
                // A handshake still in progress has no local address to reset yet. When it
                // completes, the event task asks for this re-decide again
                // (`stale_handshake`): its `flow.opened` carries an older generation, or
                // (a quarantine moves none) it is noted here
                // (`DeniedHandshakes`: a connect with `TCP_FASTOPEN_CONNECT` holds its
                // handshake until the workload writes, review 69 M1). Noted before the
                // record is read again, so that a handshake completing in between is
                // either seen here or found by the event task.
                if record.state != flow_state::ESTABLISHED {
                    self.denied_handshakes.note(record.start_ns);
                    match flows::record(&dir, cookie) {
                        Ok(Some(now))
                            if now.state == flow_state::ESTABLISHED
                                && now.start_ns == record.start_ns =>
                        {
                            record = now;
                        }
                        Ok(_) => continue,
                        Err(error) => {
                            // Its `flow.opened`, if read before the note, woke nothing:
                            // the next pass (any change, or a handshake) decides it again.
                            tracing::warn!(cookie, "re-reading a denied handshake: {error:#}");
                            continue;
                        }
                    }
                }
                let step = Instant::now();
                let pids = procs.of(record.cgroup_id).to_vec();
                procs_time += step.elapsed();
                let step = Instant::now();
                let result =
                    flows::destroy::destroy_with(cookie, &record, &pids, &mut diag_sockets);
                destroy_time += step.elapsed();
                match result {
                    Ok(()) => {
                        self.revoke_failed.remove(&cookie);
                        revoked += 1;
                        flow_event::REVOKED
                    }
                    Err(flows::destroy::DestroyError::Io(error))
                        if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) =>
                    {
                        // The kernel's answer in the flow's own namespace (verified by its
                        // cookie): the socket is gone and its record outlived it (no CLOSE
                        // callback reached it): forget the record, close nothing.
                        tracing::debug!(cookie, %error, "a tracked flow's socket is gone");
                        self.revoke_failed.remove(&cookie);
                        match flows::forget(&dir, cookie, &record) {
                            Ok(Some(record)) => self.report_forgotten(cookie, &record),
                            Ok(None) => {}
                            Err(error) => {
                                tracing::warn!(cookie, "forgetting a dead flow record: {error:#}")
                            }
                        }
                        continue;
                    }
                    Err(error) => {
                        // The record stays: the next change or tick tries again. Reported
                        // once per flow, logged every time.
                        tracing::error!(
                            cookie,
                            "resetting a flow no longer permitted failed: {error}"
                        );
                        if !self.revoke_failed.insert(cookie) {
                            continue;
                        }
                        failed += 1;
                        failure = Some(error.to_string());
                        flow_event::REVOKE_FAILED
                    }
                }
            };
            let mut call = self.denied_flow(kind, cookie, &record, reason, subject, destination);
            call.flow.error = failure;
            let _ = self.flow_events.send(call);
        }
        self.stale_reported
            .retain(|cookie, _| live.contains(cookie));
        self.retain_reconnected(&live);
        self.revoke_failed.retain(|cookie| live.contains(cookie));
        if revoked + stale + failed > 0 {
            tracing::warn!(
                why,
                revoked,
                stale,
                failed,
                records = live.len(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                read_ms = read_time.as_secs_f64() * 1e3,
                procs_ms = procs_time.as_secs_f64() * 1e3,
                destroy_ms = destroy_time.as_secs_f64() * 1e3,
                "tracked flows no longer permitted"
            );
        }
    }

    /// The event of a tracked flow (socket `cookie`, `record`) that the policy in force no
    /// longer permits, named by the policy that allowed it and the one that denies it now:
    /// `kind` is `flow.revoked`, `flow.stale` or `flow.revoke_failed`; `reason`, `subject`
    /// and `destination` are [`flows::Decision::Denied`]'s.
    fn denied_flow(
        &self,
        kind: &'static str,
        cookie: u64,
        record: &enforcer_common::FlowRecord,
        reason: &'static str,
        subject: u32,
        destination: u32,
    ) -> FlowCall {
        let allowed_by = self
            .history
            .at(record.policy_generation)
            .unwrap_or_else(|| self.compiled.clone());
        let mut call = flow_event::flow(kind, SystemTime::now(), cookie, record, &allowed_by);
        call.policy.snapshot = snapshot_of(&self.history, record);
        call.flow.reason = Some(reason);
        call.policy.revoked_by = Some(self.compiled.revision().to_string());
        call.policy.id = Some(match reason {
            "quarantined" => "quarantine".to_string(),
            "unknown_subject" => "unknown-subject".to_string(),
            _ => {
                self.compiled
                    .attribute(subject, destination, record.dport, record.protocol)
                    .policy_id
            }
        });
        call
    }

    /// The `flow.closed` of a record the agent deleted because its socket was gone without its
    /// CLOSE callback (no program ran at that close): every `flow.opened` has its
    /// `flow.closed`, here with `flow.ended_by: "agent"` and no bytes or duration (the kernel
    /// never counted them). A record whose `flow.opened` the event budget suppressed gets none
    /// (the kernel would have counted its close in the window's `flow_events.suppressed`; here
    /// it is not counted).
    fn report_forgotten(&self, cookie: u64, record: &enforcer_common::FlowRecord) {
        // An `ENDED` record's closed event was written when its socket connected elsewhere.
        if record.flags & (flow_flags::UNREPORTED | flow_flags::ENDED) != 0 {
            return;
        }
        let allowed_by = self
            .history
            .at(record.policy_generation)
            .unwrap_or_else(|| self.compiled.clone());
        let mut call = flow_event::flow(
            flow_event::CLOSED,
            SystemTime::now(),
            cookie,
            record,
            &allowed_by,
        );
        call.policy.snapshot = snapshot_of(&self.history, record);
        call.flow.ended_by = Some("agent");
        let _ = self.flow_events.send(call);
    }

    /// Names of the identities tracked flows can have at either end: this node's subjects,
    /// the tracked destinations, and the peers the ingress allowlist admits to a local
    /// destination (the verified clients `enforcer flows --to` lists on a DB's node).
    fn flow_names(&self) -> BTreeMap<u32, FlowName> {
        let local: BTreeSet<u32> = self.cgroups.values().copied().collect();
        let peers: BTreeSet<u32> = self
            .compiled
            .ingress()
            .iter()
            .map(|(k, _)| k.subject)
            .collect();
        self.compiled
            .identities()
            .filter(|i| {
                local.contains(&i.id) || peers.contains(&i.id) || i.flags & flags::TRACKED != 0
            })
            .map(|i| {
                (
                    i.id,
                    FlowName {
                        name: i.name.clone(),
                        tenant: i.tenant.clone(),
                        datasets: i.datasets.clone(),
                    },
                )
            })
            .collect()
    }

    /// Quarantined workloads, those waiting by name out of the policy included.
    fn count_quarantined(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.set_quarantined(
                self.quarantined.len()
                    + self.waiting_quarantines.len()
                    + self.quarantine_folds.len()
                    + self.absorbed_by_fold.len(),
            );
        }
    }

    fn name_of(&self, identity: u32) -> String {
        self.compiled
            .identity(identity)
            .map(|i| i.name.clone())
            .unwrap_or_else(|| format!("identity {identity}"))
    }

    fn save_state(&mut self) {
        self.status_written = (self.kube_status_to_write(), self.watch_status.clone());
        if let Err(error) = self.write_state() {
            tracing::error!("writing the state file: {error:#}");
        }
    }

    fn write_state(&self) -> Result<()> {
        let state = AgentState {
            pid: std::process::id(),
            policies: self.options.policies.clone(),
            revision: self.compiled.revision().to_string(),
            applied_at: self.applied_at.clone(),
            cgroup_root: self.cgroup_root.clone(),
            pin_dir: self.datapath.dir().to_path_buf(),
            unresolved_cgroups: self.unresolved.cgroups.iter().cloned().collect(),
            risk_overrides: self.risk_overrides.clone(),
            quarantined: self
                .quarantined_names()
                .into_iter()
                .chain(self.quarantine_folds.iter().cloned())
                .chain(self.absorbed_by_fold.iter().cloned())
                .collect(),
            quarantined_out_of_policy: self
                .quarantined_out_of_policy()
                .into_iter()
                .chain(self.absorbed_by_fold.iter().cloned())
                .collect(),
            quarantined_ids: self
                .quarantined
                .keys()
                .filter(|id| !self.has_step_up(**id))
                .copied()
                .collect(),
            quarantine_names: self.quarantined.clone(),
            waiting_quarantines: self.waiting_quarantines.clone(),
            quarantine_folds: self.quarantine_folds.clone(),
            quarantined_by_fold: self.quarantined_by_fold.clone(),
            absorbed_by_fold: self.absorbed_by_fold.clone(),
            held_cgroups: self.held_cgroups.clone(),
            pdp_url: self.options.pdp.as_ref().map(|p| p.url.clone()),
            kubernetes: self.kube.as_ref().map(KubeSource::status),
            cluster_problems: self.current_problems().into_iter().collect(),
            pods: self.pods.clone(),
            cgroup_watch: self.watch_status.clone(),
            agent_cgroup: self.agent_cgroup.as_ref().map(|(_, path)| path.clone()),
            flow_names: self.flow_names(),
            policy_generations: self.history.revisions(),
            departures: self
                .departures
                .iter()
                .map(|((cgroup_id, workload), left)| Departure {
                    cgroup_id: *cgroup_id,
                    workload: workload.clone(),
                    at_ns: left.at_ns,
                    identity: left.identity,
                })
                .collect(),
            mapped_cgroups: self.cgroup_names.clone(),
            boot_id: kept::boot_id(),
        };
        store_state(&self.options.state_dir, &state)
    }
}

/// Writes `state.json` in `state_dir`, the file [`load_state`] reads.
fn store_state(state_dir: &Path, state: &AgentState) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // Compact (it is written again after every cgroup-map write, with an entry per mapped
    // cgroup and per remembered move: red-team review 58 F3), and synced with its directory:
    // a file the next agent cannot read stops it (`load_state`), and an unsynced rename could
    // leave one of zero bytes after a power loss on a disk-backed `--state-dir` (review 73 L2).
    crate::sources::kubernetes::write_atomically(&state_dir.join("state.json"), state)
}

/// Run-time risk scores outlive policy edits and agent restarts: they are a live signal, not
/// part of the bundle. One that no longer applies (the workload is gone) is logged and skipped.
pub fn apply_risk_overrides(bundle: &mut Bundle, overrides: &BTreeMap<String, String>) {
    for (workload, score) in overrides {
        if let Err(error) = bundle.set_risk(workload, score) {
            tracing::warn!(%workload, "risk override no longer applies: {error}");
        }
    }
}

/// A field of [`AgentState`] that is only shown (by `status`, `explain`, `flows`), read as
/// its default when it is missing or has another shape (written by an agent of another
/// release): an error there would make the whole file unreadable, which stops the start
/// (red-team reviews 74 L3, 76 L1). The fields the start reads (`kept::restored`,
/// `held_at_start`, `moves_at_start`, the quarantine folds, the risk overrides, the policy
/// generations, `pin_dir`, `boot_id`) are strict.
fn shown_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    use serde::Deserialize;
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// The largest `state.json` [`load_state`] reads: a file beyond it is refused before it is
/// read (red-team review 75 M2: read and parsed whole, an unbounded one exhausted the agent at
/// every start). Far above what an agent writes: its largest parts are the cgroup map and the
/// remembered moves (65,536 entries each, ~30 MiB together), the cluster problems (~2 MiB)
/// and the tracked destinations' names; the quarantines kept are bounded ([`fold`]).
const MAX_STATE_BYTES: u64 = 256 << 20;

/// The state the last agent left in `state_dir` (`state.json`), for the agent's start: none
/// when there is no file; an error when there is one that cannot be read or parsed. That
/// file alone carries the quarantines of identities with no entry in the pinned maps, those
/// waiting by name, the held cgroups and the risk overrides, and starting without them
/// silently freed quarantined workloads (red-team review 73 L2).
pub fn load_state(state_dir: &Path) -> Result<Option<AgentState>> {
    let file = state_dir.join("state.json");
    match std::fs::metadata(&file) {
        Ok(meta) if meta.len() > MAX_STATE_BYTES => anyhow::bail!(
            "{} holds {} bytes, more than an agent writes ({MAX_STATE_BYTES}): not read; move \
             it away to start without the quarantines it keeps",
            file.display(),
            meta.len()
        ),
        _ => {}
    }
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", file.display())),
    };
    let state = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an agent state file", file.display()))?;
    Ok(Some(state))
}

/// [`load_state`] for the commands that only show what the agent keeps (`status`, `explain`,
/// `flows`): a file they cannot read is shown as none, with a warning (the agent itself
/// would not start on it).
pub fn read_state(state_dir: &Path) -> Option<AgentState> {
    load_state(state_dir).unwrap_or_else(|error| {
        tracing::warn!("shown without the agent's state: {error:#}");
        None
    })
}

fn report_unresolved(before: &Unresolved, after: &Unresolved) {
    for missing in after.cgroups.difference(&before.cgroups) {
        tracing::warn!(cgroup = %missing, "inventory cgroup does not exist (yet); its processes will be unknown subjects until it appears");
    }
    for found in before.cgroups.difference(&after.cgroups) {
        tracing::info!(cgroup = %found, "inventory cgroup appeared");
    }
    for pod in after.pods.difference(&before.pods) {
        tracing::info!(%pod, "local pod has no cgroup on this node (yet)");
    }
    for pod in after
        .unidentified_pods
        .difference(&before.unidentified_pods)
    {
        tracing::warn!(uid = %pod, "pod cgroup of no known identity: its processes are unknown subjects (denied)");
    }
    for pod in before
        .unidentified_pods
        .difference(&after.unidentified_pods)
    {
        tracing::info!(uid = %pod, "pod cgroup identified or gone");
    }
}

/// What `enforcer status` shows about the local pods (`None` without a scan).
fn pods_view(
    scan: Option<&Scan>,
    unresolved: &Unresolved,
    cgroups: &BTreeMap<u64, u32>,
    compiled: &Compiled,
) -> Option<PodsView> {
    let scan = scan?;
    let pod_identities: BTreeSet<u32> = compiled
        .identities()
        .filter(|i| !i.pod_uids.is_empty())
        .map(|i| i.id)
        .collect();
    Some(PodsView {
        pod_cgroups: scan.pods.len(),
        mapped: scan.pods.len() - unresolved.unidentified_pods.len(),
        mapped_cgroups: cgroups
            .values()
            .filter(|id| pod_identities.contains(id))
            .count(),
        without_cgroup: unresolved.pods.iter().cloned().collect(),
        unidentified: unresolved.unidentified_pods.iter().cloned().collect(),
        scan_truncated: scan.truncated.clone(),
    })
}

/// The next signal of the cgroup watcher; never, without one.
async fn tree_changed(watcher: Option<&Watcher>) {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

/// The next cluster state the source publishes; never, without a source (or once it is gone:
/// the agent keeps enforcing the last state).
async fn next_cluster(
    rx: &mut Option<tokio::sync::watch::Receiver<Option<Arc<ClusterState>>>>,
) -> Option<Arc<ClusterState>> {
    let Some(receiver) = rx else {
        return std::future::pending().await;
    };
    if receiver.changed().await.is_err() {
        tracing::error!("the Kubernetes source stopped; the last cluster state stays in force");
        *rx = None;
        return std::future::pending().await;
    }
    receiver.borrow_and_update().clone()
}

/// The compiled policies of the last few generations. An event can sit in the ring buffer
/// across a policy change; it is explained by the policy of the generation the kernel
/// stamped on it, not by whatever is in force when it is read.
#[derive(Clone)]
struct PolicyHistory {
    compiled: Arc<std::sync::Mutex<generations::Generations<Arc<Compiled>>>>,
    /// Generation -> bundle revision, further back than `compiled` and across restarts (kept
    /// in the state file): a tracked flow lives for hours and names the revision that allowed
    /// it.
    revisions: Arc<std::sync::Mutex<BTreeMap<u32, String>>>,
}

impl PolicyHistory {
    /// Generations kept at most, whatever their age.
    const KEEP: usize = 32;
    /// A superseded generation is kept this long plus three aggregation windows: a deny
    /// is read from the ring buffer within milliseconds, and an aggregation summary (which
    /// carries its first deny's generation) is written a whole window after its window ended.
    const RETAIN: Duration = Duration::from_secs(10);

    /// `events_aggregate`: the deny aggregation window (`--events-aggregate`).
    fn new(events_aggregate: Duration) -> Self {
        let retain = Self::RETAIN + events_aggregate.saturating_mul(3);
        PolicyHistory {
            compiled: Arc::new(std::sync::Mutex::new(generations::Generations::new(
                Self::KEEP,
                retain,
            ))),
            revisions: Arc::default(),
        }
    }
    /// Revisions kept (a few dozen bytes each).
    const KEEP_REVISIONS: usize = 4096;

    fn publish(&self, generation: u64, compiled: Arc<Compiled>) {
        // The kernel stamps the low 32 bits.
        let generation = generation as u32;
        {
            let mut revisions = self.revisions.lock().expect("revision history lock");
            revisions.insert(generation, compiled.revision().to_string());
            while revisions.len() > Self::KEEP_REVISIONS {
                revisions.pop_first();
            }
        }
        let mut history = self.compiled.lock().expect("policy history lock");
        history.publish(generation, compiled, Instant::now());
        tracing::debug!(generation, kept = history.len(), "policy generations kept");
    }

    /// The policy of `generation`, or the newest one for an event older than the history
    /// (written before this agent started, say).
    fn at(&self, generation: u32) -> Option<Arc<Compiled>> {
        let history = self.compiled.lock().expect("policy history lock");
        history.at(generation)
    }

    /// The newest generation published (the one in force, or about to be).
    fn newest(&self) -> Option<u32> {
        let history = self.compiled.lock().expect("policy history lock");
        history.newest()
    }

    /// The bundle revision of `generation`, if this agent or the one before it recorded it.
    fn revision(&self, generation: u32) -> Option<String> {
        self.revisions
            .lock()
            .expect("revision history lock")
            .get(&generation)
            .cloned()
    }

    /// Revisions recorded by an earlier agent (its state file).
    fn seed(&self, revisions: BTreeMap<u32, String>) {
        self.revisions
            .lock()
            .expect("revision history lock")
            .extend(revisions);
    }

    fn revisions(&self) -> BTreeMap<u32, String> {
        self.revisions
            .lock()
            .expect("revision history lock")
            .clone()
    }
}

/// The revision that allowed a flow's `connect()`; `unknown (generation N)` when neither this
/// agent nor the one before it recorded that generation.
fn snapshot_of(history: &PolicyHistory, record: &enforcer_common::FlowRecord) -> String {
    history
        .revision(record.policy_generation)
        .unwrap_or_else(|| format!("unknown (generation {})", record.policy_generation))
}

/// The event of one `FLOW_EVENTS` record, named by the policy that allowed the connect.
fn flow_call(event: &enforcer_common::FlowEvent, allowed_by: &Compiled) -> FlowCall {
    let time = record::wall_clock(event.timestamp_ns);
    if event.kind == flow_kind::CLOSED && event.record.protocol == proto::UDP {
        // A released UDP socket: the kernel keeps no byte counts for it.
        let mut call = flow_event::flow(
            flow_event::CLOSED,
            time,
            event.cookie,
            &event.record,
            allowed_by,
        );
        call.flow.duration_ms =
            Some(event.timestamp_ns.saturating_sub(event.record.start_ns) as f64 / 1e6);
        call
    } else if event.kind == flow_kind::CLOSED {
        let mut call = flow_event::flow(
            flow_event::CLOSED,
            time,
            event.cookie,
            &event.record,
            allowed_by,
        );
        let (sent, received) = flows::payload_bytes(event);
        call.flow.bytes_sent = Some(sent);
        call.flow.bytes_received = Some(received);
        call.flow.duration_ms =
            Some(event.timestamp_ns.saturating_sub(event.record.start_ns) as f64 / 1e6);
        call
    } else {
        flow_event::flow(
            flow_event::OPENED,
            time,
            event.cookie,
            &event.record,
            allowed_by,
        )
    }
}

/// Deny events (from the ring buffer or aggregation summaries) -> enriched calls.
struct Denies<'a> {
    history: &'a PolicyHistory,
    cgroups: crate::events::cgroup::Resolver,
    /// The facts of recent keys, shared by their calls.
    enricher: record::Enricher,
    quarantine: Arc<handoff::QuarantineRequests>,
}

impl Denies<'_> {
    /// Enriches one deny with the policy that decided it, asks for quarantine where a
    /// `@quarantine` policy denied, and writes it.
    fn deliver(&mut self, event: &enforcer_common::DenyEvent, events: &mut Emitter) -> Result<()> {
        // Never empty: the first policy is published before the task starts.
        let Some(policy) = self.history.at(event.policy_generation) else {
            return Ok(());
        };
        // An ingress call's cgroup is the listener's (no task: pid 0).
        let cgroups = &mut self.cgroups;
        let call = self
            .enricher
            .enrich(event, &policy, |id, pid| cgroups.resolve(id, pid));
        // Only a policy's deny can quarantine: not the kernel's own refusals (unknown subject,
        // unspecified destination, unsupported socket). The cause is the `@quarantine`
        // forbid, which need not be the first determining policy the event names. Not an
        // ingress deny either: a caller that dialled 127.0.0.1 did not choose the workload
        // whose wildcard listener took it (a listener may take a port to get its callers
        // quarantined).
        if event.verdict == verdict::DENY
            && event.hook != enforcer_common::hook::INGRESS
            && matches!(event.reason, reason::TENANT_MISMATCH | reason::NO_PERMIT)
        {
            // The enrichment's attribution (`Compiled::quarantine_on_deny`), made once a key.
            if let Some(cause) = &call.quarantine {
                let name = policy.identity(event.subject).map(|i| i.name.clone());
                self.quarantine.request(
                    event.subject,
                    name,
                    cause.clone(),
                    event.cgroup_id,
                    event.timestamp_ns,
                );
            }
        }
        events.emit(Event::Call(call)).map(drop)
    }

    /// The `events.suppressed` notice of an overflow summary, its subject and destination
    /// named by the policy that was in force (the newest, should that revision be gone).
    /// Where a `@quarantine` forbid denies some call of the subject to that destination, the
    /// subject is quarantined: a workload that first spends its key budget on decoys must
    /// not escape the quarantine its real attempt earns (the overflow keeps no port, so any
    /// port's forbid counts). `since_ns`: when its calls may have begun
    /// ([`aggregate::calls_since`]), from which the cgroups that left the subject are held.
    fn suppressed(&self, overflow: &enforcer_common::DenyEvent, since_ns: u64) -> Notice {
        let policy = self
            .history
            .at(overflow.policy_generation)
            .or_else(|| self.history.newest().and_then(|g| self.history.at(g)));
        let subject = policy
            .as_ref()
            .and_then(|p| p.identity(overflow.subject))
            .filter(|_| overflow.subject != enforcer_common::identity::UNKNOWN);
        let destination = policy
            .as_ref()
            .filter(|_| overflow.destination != 0)
            .and_then(|p| p.identity(overflow.destination));
        if let Some(policy) = policy.as_ref().filter(|_| {
            overflow.verdict == verdict::DENY
                && overflow.hook != enforcer_common::hook::INGRESS
                && overflow.destination != 0
                && matches!(overflow.reason, reason::TENANT_MISMATCH | reason::NO_PERMIT)
        }) {
            if let Some(cause) = policy.quarantine_on_some_deny(
                overflow.subject,
                overflow.destination,
                overflow.protocol,
            ) {
                self.quarantine.request(
                    overflow.subject,
                    subject.map(|i| i.name.clone()),
                    cause,
                    overflow.cgroup_id,
                    since_ns,
                );
            }
        }
        let time = humantime::format_rfc3339_nanos(record::wall_clock(overflow.timestamp_ns));
        aggregate::suppressed(
            overflow,
            subject.map(|i| i.name.as_str()),
            subject.and_then(|i| i.tenant.as_deref()),
            destination.map(|i| i.name.as_str()),
            time.to_string(),
        )
    }
}

impl Denies<'_> {
    /// The `flow_events.suppressed` notice of a window's flow overflow, its workload named by
    /// the policy in force then (the newest, should that revision be gone).
    fn flow_suppressed(&self, overflow: &aggregate::FlowOverflow) -> Notice {
        let policy = self
            .history
            .at(overflow.policy_generation)
            .or_else(|| self.history.newest().and_then(|g| self.history.at(g)));
        let subject = policy.as_ref().and_then(|p| p.identity(overflow.subject));
        let time = humantime::format_rfc3339_nanos(record::wall_clock(overflow.end_ns));
        aggregate::flow_suppressed(
            overflow,
            subject.map(|i| i.name.as_str()),
            subject.and_then(|i| i.tenant.as_deref()),
            time.to_string(),
        )
    }
}

/// One turn of a ring buffer's reader: at most `EVENT_BATCH` records to `handle`, their
/// lines written (`events.flush()`), then the records given back to the kernel (see
/// `datapath::ringbuf`: an agent killed before its lines are written leaves them to the
/// next); then readiness is cleared (drained: `AsyncFd` is edge-triggered, so nothing may be
/// left) or kept and the task yields (records left: a workload flooding denied calls must
/// not keep the select loop from its timers, the loss report and the aggregation sweep among
/// them, or from the agent's reloads; it starved them for as long as a flood lasted).
/// Returns how many records it handled when it left the ring empty; 0 when more are ready
/// (a full turn, or one stopped at its share of the ring), which the caller reads at once.
async fn drain_turn(
    guard: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingReader>>,
    what: &str,
    events: &mut Emitter,
    mut handle: impl FnMut(&[u8], &mut Emitter) -> Result<()>,
) -> Result<usize> {
    let mut guard = guard.with_context(|| format!("waiting on the {what} ring buffer"))?;
    let ring = guard.get_inner_mut();
    let (handled, drained) = read_turn(ring, what, events, &mut handle);
    // More is ready when the turn stopped short of the ring's end, or when a record was
    // committed while this turn held records back (its producer sent no wakeup: see
    // `RingReader::commit`).
    let more = ring.commit() || !drained;
    if more {
        drop(guard);
        tokio::task::yield_now().await;
        Ok(0)
    } else {
        guard.clear_ready();
        Ok(handled)
    }
}

/// Hands up to `EVENT_BATCH` records of `ring` to `handle`, and no more than a quarter of
/// the ring's bytes (records read stay the kernel's until the caller gives them back, so a
/// turn blocked in its write must leave the ring room: `FLOW_EVENTS`' 256 KiB hold 1,489
/// flow records, a whole batch 69 % of it; found by red-team review 28), and writes their
/// lines; the caller gives them back (`RingReader::commit`). Returns how many it handled,
/// and whether it read to the end of what the ring held.
fn read_turn(
    ring: &mut RingReader,
    what: &str,
    events: &mut Emitter,
    handle: &mut impl FnMut(&[u8], &mut Emitter) -> Result<()>,
) -> (usize, bool) {
    let mut handled = 0;
    let mut drained = false;
    while handled < EVENT_BATCH && ring.held() < ring.capacity() / 4 {
        let Some(item) = ring.next_record() else {
            drained = true;
            break;
        };
        if let Err(error) = handle(item, events) {
            // Only a line's serialisation can fail, and it would fail again for this record
            // at every start: the record is given back with the others, not read for ever.
            tracing::error!("a {what} record cannot be written; skipped: {error:#}");
        }
        handled += 1;
    }
    // Written before the records are given back. A batch the sink refuses is lost all the
    // same (counted, see `Emitter::flush`): holding the ring for it would stop the agent.
    events.flush();
    (handled, drained)
}

/// How the agent stops its event task: `stop_reading` (with where to say it has) ends the
/// reading of the rings after the turn in progress, written; `finish` writes what the
/// channels still hold and ends the task.
struct Stopping {
    stop_reading: tokio::sync::oneshot::Receiver<tokio::sync::oneshot::Sender<()>>,
    finish: tokio::sync::oneshot::Receiver<()>,
}

/// The longest each step of a stop waits for the event task.
const STOP_DRAIN: Duration = Duration::from_secs(5);

/// The two ring buffers: denies (`EVENTS`) and tracked flows (`FLOW_EVENTS`).
struct Rings {
    events: RingReader,
    flows: RingReader,
}

/// The event task: drains the ring buffers whenever the kernel signals data, enriches each
/// record with the policy in force, asks for quarantine where a `@quarantine` policy denied,
/// reports losses the kernel counted and sweeps the aggregates; stopped by `stopping`.
#[allow(clippy::too_many_arguments)]
async fn stream_events(
    rings: Rings,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    history: PolicyHistory,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    mut agent_flows: mpsc::UnboundedReceiver<FlowCall>,
    quarantine: Arc<handoff::QuarantineRequests>,
    stale_handshake: Arc<tokio::sync::Notify>,
    denied_handshakes: Arc<DeniedHandshakes>,
    contacts: Option<handoff::ContactSender>,
    mut events: Emitter,
    mut reopen: tokio::signal::unix::Signal,
    mut aggregates: Aggregates,
    mut stopping: Stopping,
) -> Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as the
    // AsyncFd owns the RingBuf.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(rings.events, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the EVENTS ring buffer")?;
    // SAFETY: as above.
    let mut flow_ring =
        unsafe { AsyncFd::register_with_interest(rings.flows, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the FLOW_EVENTS ring buffer")?;
    // What the kernel lost while no agent read its rings: the totals beyond those an earlier
    // agent reported (not the whole totals again: a SOC adds up the `count`s).
    let mut reported = LostReported::read(&state_dir);
    report_lost(&pin_dir, &mut reported, &mut events, &stale_handshake)?;
    // Every RESYNC_EVERY (500 ms), also while a flood keeps the rings busy: the drain turns
    // below yield after each batch, so this tick is reached at least once a second.
    let mut lost_check = tokio::time::interval(RESYNC_EVERY);
    let mut flow_drain = tokio::time::interval(FLOW_DRAIN_EVERY);
    flow_drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut denies = Denies {
        history: &history,
        cgroups: crate::events::cgroup::Resolver::new(crate::fs::cgroup2_mount().ok()),
        enricher: record::Enricher::new(),
        quarantine,
    };
    let mut reading = true;
    loop {
        // Records read by this turn if it emptied its ring (see EVENT_COALESCE).
        let mut read = 0;
        tokio::select! {
            said = &mut stopping.stop_reading, if reading => {
                reading = false;
                events.flush();
                if let Ok(said) = said {
                    let _ = said.send(());
                }
            }
            _ = &mut stopping.finish => {
                while let Ok(call) = agent_flows.try_recv() {
                    events.emit(Event::Flow(call))?;
                }
                while let Ok(notice) = notices.try_recv() {
                    events.emit(Event::Notice(notice))?;
                }
                events.flush();
                return Ok(());
            }
            guard = ring.readable_mut(), if reading => {
                read = drain_turn(guard, "EVENTS", &mut events, |item, events| {
                    match decode::decode(item) {
                        Ok(event) => denies.deliver(&event, events),
                        Err(error) => {
                            tracing::error!(%error, "undecodable ring buffer record");
                            Ok(())
                        }
                    }
                }).await?;
            }
            guard = flow_ring.readable_mut(), if reading => {
                read = drain_turn(guard, "FLOW_EVENTS", &mut events, |item, events| {
                    deliver_flow(item, &history, (&stale_handshake, &denied_handshakes), contacts.as_ref(), events)
                }).await?;
            }
            _ = flow_drain.tick(), if reading => {
                // FLOW_EVENTS wakes the reader only when it fills (see flows.rs): read here.
                let ring = flow_ring.get_mut();
                read_turn(ring, "FLOW_EVENTS", &mut events, &mut |item, events| {
                    deliver_flow(item, &history, (&stale_handshake, &denied_handshakes), contacts.as_ref(), events)
                });
                ring.commit();
            }
            Some(call) = agent_flows.recv() => {
                events.emit(Event::Flow(call))?;
            }
            Some(notice) = notices.recv() => {
                events.emit(Event::Notice(notice))?;
            }
            _ = reopen.recv() => {
                tracing::info!("SIGUSR1: reopening the events file");
                if let Err(error) = events.reopen() {
                    tracing::error!("reopening the events file failed; writing on to the file as it was: {error:#}");
                }
            }
            _ = lost_check.tick(), if reading => {
                let refused = events.refused();
                let swept = aggregates.sweep(aggregate::monotonic_ns());
                for summary in swept.summaries {
                    denies.deliver(&summary, &mut events)?;
                }
                for (overflow, since_ns) in swept.overflows {
                    events.emit(Event::Notice(denies.suppressed(&overflow, since_ns)))?;
                }
                if !swept.flows.is_empty() {
                    // Suppressed opened events told the agent nothing of those flows: have it
                    // re-decide them as it does a flow opened under an older generation.
                    stale_handshake.notify_one();
                }
                for overflow in swept.flows {
                    events.emit(Event::Notice(denies.flow_suppressed(&overflow)))?;
                }
                // Written before the entries go (see `Aggregates::sweep`); kept for the next
                // sweep when the write failed (the disk full: written again once it can be).
                events.flush();
                if events.refused() == refused {
                    aggregates.forget(&swept.done);
                }
                report_lost(&pin_dir, &mut reported, &mut events, &stale_handshake)?;
            }
        }
        // What this turn emitted (a drain of up to EVENT_BATCH records, a notice) goes out
        // in one write, before the loop waits again.
        events.flush();
        // A turn that left records in its ring has yielded already and reads on; a ring
        // drained of a few records waits for more to gather. (Not by the count of a turn:
        // one stopped at its share of the ring, `read_turn`, holds fewer than a batch.)
        if read > 0 {
            tokio::time::sleep(EVENT_COALESCE).await;
        }
    }
}

/// The kernel's loss totals (`LOST_EVENTS`, `LOST_FLOW_EVENTS`) as far as `events.lost` and
/// `flow_events.lost` lines have reported them, kept in `<state dir>/lost-reported.json` so
/// that the next agent on the same pins reports only what is new (it reported each
/// lifetime total again at every start). Each total is kept with the ID of the map it was
/// read from: a map made anew (pins removed, another ABI's maps) starts from nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
struct LostReported {
    events: u64,
    events_map: u32,
    flow_events: u64,
    flow_events_map: u32,
}

impl LostReported {
    const FILE: &'static str = "lost-reported.json";

    /// What an earlier agent reported; nothing when it left no (readable) record.
    fn read(state_dir: &Path) -> LostReportedFile {
        let path = state_dir.join(Self::FILE);
        let reported = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        LostReportedFile { path, reported }
    }
}

/// [`LostReported`] and where it is kept.
struct LostReportedFile {
    path: PathBuf,
    reported: LostReported,
}

impl LostReportedFile {
    /// Records `reported` (write and rename: a reader never sees half a file). A failure is
    /// logged: the next agent then reports some losses twice, which is better than never.
    fn save(&mut self, reported: LostReported) {
        self.reported = reported;
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(&reported)
            .map_err(std::io::Error::from)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(error) = written {
            tracing::warn!(file = %self.path.display(), %error, "recording the reported loss totals");
        }
    }
}

/// Reports what the kernel lost since the last report (of this agent or an earlier one):
/// one `events.lost` / `flow_events.lost` line each with the new count and the total. Totals
/// below the recorded ones are maps made anew (the pins were removed): all of it is new.
fn report_lost(
    pin_dir: &Path,
    reported: &mut LostReportedFile,
    events: &mut Emitter,
    stale_handshake: &tokio::sync::Notify,
) -> Result<()> {
    // The part of `total` not yet reported, given what was reported of which map.
    let new = |total: u64, (reported, of): (u64, u32), map: u32| {
        total
            - Some(reported)
                .filter(|&r| r <= total && of == map)
                .unwrap_or(0)
    };
    let refused = events.refused();
    let mut now_reported = reported.reported;
    let map = datapath::map_id(pin_dir, enforcer_common::maps::LOST_EVENTS)?;
    let total = datapath::lost_events(pin_dir)?;
    let count = new(total, (now_reported.events, now_reported.events_map), map);
    if count > 0 {
        tracing::warn!(count, total, "ring buffer full: events lost in the kernel");
        events.emit(Event::Notice(Notice::EventsLost {
            time: now(),
            count,
            total,
        }))?;
    }
    (now_reported.events, now_reported.events_map) = (total, map);
    let map = datapath::map_id(pin_dir, enforcer_common::maps::LOST_FLOW_EVENTS)?;
    let total = flows::lost(pin_dir)?;
    let count = new(
        total,
        (now_reported.flow_events, now_reported.flow_events_map),
        map,
    );
    if count > 0 {
        tracing::warn!(
            count,
            total,
            "flow ring buffer full: flow events lost in the kernel"
        );
        events.emit(Event::Notice(Notice::FlowEventsLost {
            time: now(),
            count,
            total,
        }))?;
        // A lost `flow.opened` may have been a flow that raced a change: re-decide.
        stale_handshake.notify_one();
    }
    (now_reported.flow_events, now_reported.flow_events_map) = (total, map);
    // Recorded after the lines are written: an agent killed between the two has the next
    // one report those losses again, never not at all; a write that failed is tried again
    // with the next report.
    if now_reported != reported.reported {
        events.flush();
        if events.refused() == refused {
            reported.save(now_reported);
        }
    }
    Ok(())
}

/// Tracked TCP flows that a re-decide pass (`revoke_flows`) no longer permits but found still
/// in their handshake, which it cannot reset yet: the latest `start_ns` of one (the records'
/// clock, `CLOCK_MONOTONIC` nanoseconds), plus one (0: none). A flow that opens having
/// started no later may be such a flow, and is re-decided when it opens, as one opened under
/// an older policy generation is: a quarantine moves no generation (it changes flags only),
/// and a connect with `TCP_FASTOPEN_CONNECT` holds its handshake until the workload first writes,
/// which it may do long after the change (red-team review 69 M1). Flows that started earlier
/// and open later cost one more pass each time, no more (the mark only rises).
#[derive(Debug, Default)]
struct DeniedHandshakes {
    after_ns: std::sync::atomic::AtomicU64,
}

impl DeniedHandshakes {
    /// A pass found the flow that started at `start_ns` denied in its handshake.
    fn note(&self, start_ns: u64) {
        self.after_ns.fetch_max(
            start_ns.saturating_add(1),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Whether a flow that started at `start_ns` and has just opened may be one that a pass
    /// found denied in its handshake.
    fn may_hold(&self, start_ns: u64) -> bool {
        start_ns < self.after_ns.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One `FLOW_EVENTS` record: written as `flow.opened` / `flow.closed` with the policy of its
/// generation. A flow opened under an older generation than the newest is re-decided now
/// (`stale_handshake`): a change re-decides only established flows, and a connect decided
/// just before a swap may record its flow after the change's re-decide read the table.
fn deliver_flow(
    item: &[u8],
    history: &PolicyHistory,
    (stale_handshake, denied_handshakes): (&tokio::sync::Notify, &DeniedHandshakes),
    contacts: Option<&handoff::ContactSender>,
    events: &mut Emitter,
) -> Result<()> {
    let event = match flows::decode(item) {
        Ok(event) => event,
        Err(error) => {
            tracing::error!(%error, "undecodable flow record");
            return Ok(());
        }
    };
    if event.kind == flow_kind::OPENED
        && (history
            .newest()
            .is_some_and(|g| g != event.record.policy_generation)
            || denied_handshakes.may_hold(event.record.start_ns))
    {
        stale_handshake.notify_one();
    }
    let Some(policy) = history.at(event.record.policy_generation) else {
        return Ok(());
    };
    if event.kind == flow_kind::OPENED {
        if let Some(contacts) = contacts {
            contacts.offer(event.cookie, event.record);
        }
    }
    let mut call = flow_call(&event, &policy);
    call.policy.snapshot = snapshot_of(history, &event.record);
    events.emit(Event::Flow(call)).map(drop)
}

/// Keeps `CONFIG.tai_offset_s` equal to this host's CLOCK_TAI - CLOCK_REALTIME: the identity
/// option's time is wall-clock seconds on every node, whatever TAI offset (0 or 37) its time
/// daemon set, and a daemon may set it after boot. Logged when it changes; an error is logged
/// and the last value stays.
fn refresh_tai_offset(tables: &mut crate::datapath::Tables) {
    let result =
        crate::wire::tai_offset_s().and_then(|offset| Ok((offset, tables.set_tai_offset(offset)?)));
    match result {
        Ok((offset, true)) => tracing::info!(
            tai_offset_s = offset,
            "identity option clock: CLOCK_TAI - CLOCK_REALTIME"
        ),
        Ok((_, false)) => {}
        Err(error) => tracing::warn!(
            "cannot refresh the TAI offset of the identity option's clock: {error:#}"
        ),
    }
}

/// How long a quarantine holds: until its step-up's TTL runs out, or until released by hand
/// (an operator's, a `@quarantine` policy's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    StepUp,
    Lasting,
}

#[cfg(test)]
mod tests {
    use super::{load_state, store_state, AgentState};

    /// An unreadable state file was taken as none: the agent started without the quarantines,
    /// holds and risk overrides only it keeps (red-team review 73 L2). It is an error naming
    /// the file; a missing one is none.
    #[test]
    fn a_corrupt_state_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_state(dir.path()).unwrap().is_none(), "no file: none");
        let file = dir.path().join("state.json");
        for corrupt in [&b"{\"pid\":"[..], b"", b"{}"] {
            std::fs::write(&file, corrupt).unwrap();
            let error = load_state(dir.path()).unwrap_err();
            let shown = format!("{error:#}");
            assert!(shown.contains(&file.display().to_string()), "{shown}");
        }
        // Another read error than NotFound (a directory where the file should be).
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let error = load_state(dir.path()).unwrap_err();
        assert!(
            format!("{error:#}").contains(&format!("reading {}", file.display())),
            "{error:#}"
        );
    }

    /// Review 75 M2: a state file larger than any an agent writes is refused, unread.
    #[test]
    fn an_oversized_state_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("state.json")).unwrap();
        // Sparse: refused by its size, before a byte of it is read.
        file.set_len(super::MAX_STATE_BYTES + 1).unwrap();
        let error = format!("{:#}", load_state(dir.path()).unwrap_err());
        assert!(error.contains("more than an agent writes"), "{error}");
    }

    /// A field only shown, in a shape this agent does not read (another release's), is read
    /// as none; what the start needs is kept (red-team review 74 L3: it stopped the start).
    #[test]
    fn a_shown_only_field_of_another_shape_does_not_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = serde_json::json!({
            "pid": "seven",
            "applied_at": 2026,
            "pin_dir": "/sys/fs/bpf/enforcer/v19",
            "unresolved_cgroups": {},
            "waiting_quarantines": ["acme/api"],
            "kubernetes": { "connected": true, "restarts": 3 },
            "pods": 12,
            "cgroup_watch": "watching",
            "flow_names": { "x": 1 },
            "cluster_problems": "none",
        });
        std::fs::write(dir.path().join("state.json"), state.to_string()).unwrap();
        let read = load_state(dir.path()).unwrap().expect("a state");
        assert!(read.waiting_quarantines.contains("acme/api"));
        assert!(read.kubernetes.is_none() && read.pods.is_none() && read.cgroup_watch.is_none());
        assert!(read.flow_names.is_empty() && read.cluster_problems.is_empty());
        // A field the start reads stays strict.
        let mut bad = state.clone();
        bad["waiting_quarantines"] = serde_json::json!("acme/api");
        std::fs::write(dir.path().join("state.json"), bad.to_string()).unwrap();
        assert!(load_state(dir.path()).is_err());
    }

    /// What the agent writes it reads back whole, and the write leaves no temporary file.
    #[test]
    fn the_state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state: AgentState = serde_json::from_value(serde_json::json!({
            "pid": 7,
            "policies": "/policies",
            "revision": "r1",
            "applied_at": "2026-12-07T00:00:00Z",
            "cgroup_root": "/sys/fs/cgroup",
            "pin_dir": "/sys/fs/bpf/enforcer/v20",
            "unresolved_cgroups": ["/gone"],
            "risk_overrides": { "acme/app": "0.9" },
            "quarantined": ["acme/app"],
            "quarantined_ids": [300],
            "quarantine_names": { "300": "acme/app" },
            "waiting_quarantines": ["acme/api"],
            "held_cgroups": { "10": "acme/app" },
            "mapped_cgroups": { "1": [300, "acme/app"] },
            "departures": [
                { "cgroup_id": 7, "workload": "acme/api", "at_ns": 42, "identity": 301 },
            ],
            "boot_id": "b",
        }))
        .unwrap();
        // Into a directory not there yet, as at a first start.
        let state_dir = dir.path().join("state");
        store_state(&state_dir, &state).unwrap();
        let read = load_state(&state_dir)
            .unwrap()
            .expect("the file just written");
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&state).unwrap()
        );
        let names: Vec<_> = std::fs::read_dir(&state_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file left");
        // Compact, as before (`enforcer status` reads it on every call).
        let text = std::fs::read_to_string(state_dir.join("state.json")).unwrap();
        assert_eq!(
            text,
            format!("{}\n", serde_json::to_string(&state).unwrap())
        );
    }
}

//! `enforcer status`: what the kernel holds (read from the pins, so it works while no agent
//! runs) and what the agent last applied (its state file).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use enforcer_common::{reason, verdict};
use serde::Serialize;

use crate::agent::AgentState;
use crate::datapath::{self, KernelStats};
use crate::events::decode::{reason_name, verdict_name};

/// The agent's state file lives outside bpffs (which holds only BPF objects); one directory
/// per pin root, so that several enforcers (tests, say) never share one.
pub fn default_state_dir(pin_root: &Path) -> PathBuf {
    let flat: String = pin_root
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    PathBuf::from("/run/enforcer").join(flat)
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub agent: Option<AgentView>,
    pub hooks: Vec<String>,
    pub lost_events: u64,
    /// Flow events (`flow.opened` / `flow.closed`) the kernel could not write: their ring
    /// buffer was full.
    pub lost_flow_events: u64,
    /// Live tracked flows (records in the pinned `FLOWS` map; `enforcer flows` lists them).
    pub tracked_flows: usize,
    /// `FLOWS` records of UDP sockets connected again elsewhere (`ENDED`: their flow was
    /// reported closed, `enforcer flows` does not list them): each holds its tenant's share
    /// until its socket is released.
    pub ended_flow_records: usize,
    /// `{"deny": {"tenant_mismatch": 3, ...}, ...}` as a flat list for stable output.
    pub verdicts: Vec<VerdictCount>,
    pub maps: Vec<datapath::MapFill>,
    pub active_policy_table: u32,
    /// Global audit mode (`enforcer run --audit`).
    pub audit: bool,
    /// Workload identities in audit mode by their own or their tenant's `audit: true`: their
    /// would-denies pass, reported as `connection.audited`.
    pub audit_subjects: usize,
    pub policy_generation: u64,
    /// The node's network namespace cookie the kernel compares a pod's loopback calls with
    /// (`SO_NETNS_COOKIE`); 0: not known, a pod's own loopback is judged as World's address.
    pub node_netns_cookie: u64,
    /// Where the policy comes from when the agent syncs from a remote PDP, and how stale it is.
    pub pdp: Option<crate::pdp::PdpStatus>,
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub pid: u32,
    pub running: bool,
    pub revision: String,
    pub applied_at: String,
    pub policy_age_seconds: Option<u64>,
    pub policies: PathBuf,
    pub cgroup_root: PathBuf,
    pub unresolved_cgroups: Vec<String>,
    pub risk_overrides: std::collections::BTreeMap<String, String>,
    pub quarantined: Vec<String>,
    /// Those of `quarantined` out of the policy in force: they hold again when they are back.
    pub quarantined_out_of_policy: Vec<String>,
    /// The Kubernetes source (`--kubernetes`), as the agent last wrote it; `staleness_seconds`
    /// is computed now from `last_sync` (0 while the agent runs connected).
    pub kubernetes: Option<crate::sources::kubernetes::KubeStatus>,
    /// What the cluster merge refused or reported, one line each.
    pub cluster_problems: Vec<String>,
    pub pods: Option<crate::agent::PodsView>,
    pub cgroup_watch: Option<crate::sources::cgroups::WatchStatus>,
    /// The agent's own cgroup when it lies inside the enforced subtree (exempt).
    pub agent_cgroup: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct VerdictCount {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub count: u64,
}

pub fn collect(pin_root: &Path, state_dir: &Path) -> Result<Status> {
    let dir = datapath::pin_dir(pin_root);
    if !dir.exists() {
        anyhow::bail!(
            "no enforcer is pinned at {} (is --pin-path right?)",
            dir.display()
        );
    }
    let stats: KernelStats = datapath::kernel_stats(&dir)?;
    let mut hooks: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("link-"))
        .collect();
    hooks.sort();
    let mut verdicts = Vec::new();
    for (v, row) in stats.verdicts.iter().enumerate() {
        for (r, &count) in row.iter().enumerate() {
            let meaningful = (v as u8 == verdict::ALLOW) == (r as u8 == reason::ALLOWED);
            if meaningful {
                verdicts.push(VerdictCount {
                    verdict: verdict_name(v as u8),
                    reason: reason_name(r as u8),
                    count,
                });
            }
        }
    }
    let state = crate::agent::read_state(state_dir);
    let pdp = state
        .as_ref()
        .filter(|s| s.pdp_url.is_some())
        .and_then(|s| {
            crate::pdp::read_status(&crate::pdp::status_file(&s.policies))
                .ok()
                .flatten()
        });
    let agent = state.map(agent_view);
    let lost_flow_events = crate::flows::lost(&dir)?;
    let records = crate::flows::read(&dir)?;
    let ended_flow_records = records
        .iter()
        .filter(|(_, r)| r.flags & enforcer_common::flow_flags::ENDED != 0)
        .count();
    let tracked_flows = records.len() - ended_flow_records;
    let audit_subjects = datapath::Tables::open(&dir)?
        .identities_flagged(enforcer_common::flags::AUDIT | enforcer_common::flags::WORKLOAD)?
        .len();
    Ok(Status {
        pdp,
        pin_dir: dir,
        agent,
        hooks,
        lost_events: stats.lost_events,
        lost_flow_events,
        tracked_flows,
        ended_flow_records,
        verdicts,
        maps: stats.maps.clone(),
        active_policy_table: stats.config.active_policy,
        audit: stats.config.audit,
        audit_subjects,
        policy_generation: stats.config.generation,
        node_netns_cookie: stats.config.node_netns_cookie,
    })
}

fn agent_view(state: AgentState) -> AgentView {
    let age = humantime::parse_rfc3339(&state.applied_at)
        .ok()
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .map(|d| d.as_secs());
    let running = Path::new(&format!("/proc/{}", state.pid)).exists();
    let kubernetes = state.kubernetes.map(|mut kube| {
        kube.staleness_seconds = if kube.connected && running {
            Some(0)
        } else {
            kube.last_sync
                .as_deref()
                .and_then(|at| humantime::parse_rfc3339(at).ok())
                .map(|at| {
                    SystemTime::now()
                        .duration_since(at)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                })
        };
        if !running {
            kube.connected = false;
        }
        kube
    });
    AgentView {
        pid: state.pid,
        running,
        revision: state.revision,
        applied_at: state.applied_at,
        policy_age_seconds: age,
        policies: state.policies,
        cgroup_root: state.cgroup_root,
        unresolved_cgroups: state.unresolved_cgroups,
        risk_overrides: state.risk_overrides,
        quarantined: state.quarantined,
        quarantined_out_of_policy: state.quarantined_out_of_policy,
        kubernetes,
        cluster_problems: state.cluster_problems,
        pods: state.pods,
        cgroup_watch: state.cgroup_watch,
        agent_cgroup: state.agent_cgroup,
    }
}

fn render_kubernetes(out: &mut String, kube: &crate::sources::kubernetes::KubeStatus) {
    use std::fmt::Write;
    let state = if !kube.has_state {
        "no state yet: pods are unknown subjects (denied)".to_string()
    } else if kube.persisted {
        "enforcing the persisted state (no live state since start)".to_string()
    } else {
        "live state".to_string()
    };
    let _ = writeln!(
        out,
        "kubernetes:      {}; {state}",
        if kube.connected {
            "connected"
        } else {
            "not connected"
        }
    );
    let _ = writeln!(
        out,
        "k8s staleness:   {}",
        match (kube.staleness_seconds, &kube.last_sync) {
            (Some(s), Some(at)) => format!("{s} s (last sync {at})"),
            (Some(s), None) => format!("{s} s"),
            (None, _) => "never synced".to_string(),
        }
    );
    let _ = writeln!(
        out,
        "k8s objects:     {} identities, {} pods ({} on this node), {} services, {} problems",
        kube.identities, kube.pods, kube.local_pods, kube.services, kube.problems
    );
    if let Some(error) = &kube.last_error {
        let _ = writeln!(out, "k8s last error:  {error}");
    }
}

pub fn render(status: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "pins:            {}", status.pin_dir.display());
    match &status.agent {
        Some(agent) => {
            let _ = writeln!(
                out,
                "agent:           pid {} ({})",
                agent.pid,
                if agent.running {
                    "running"
                } else {
                    "not running: the pinned programs enforce the last policy"
                }
            );
            let _ = writeln!(
                out,
                "policy:          {} from {}",
                agent.revision,
                agent.policies.display()
            );
            let _ = writeln!(
                out,
                "applied:         {} ({} s ago)",
                agent.applied_at,
                agent
                    .policy_age_seconds
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into())
            );
            let _ = writeln!(out, "cgroup root:     {}", agent.cgroup_root.display());
            if let Some(own) = &agent.agent_cgroup {
                let _ = writeln!(out, "agent cgroup:    {} (exempt)", own.display());
            }
            for (workload, score) in &agent.risk_overrides {
                let _ = writeln!(out, "risk override:   {workload} = {score}");
            }
            for workload in &agent.quarantined {
                let out_of_policy = if agent.quarantined_out_of_policy.contains(workload) {
                    " (out of the policy: quarantined again when it is back)"
                } else if workload.ends_with('*') {
                    " (a fold: every label set it names)"
                } else {
                    ""
                };
                let _ = writeln!(out, "quarantined:     {workload}{out_of_policy}");
            }
            for missing in &agent.unresolved_cgroups {
                let _ = writeln!(out, "missing cgroup:  {missing}");
            }
            if let Some(kube) = &agent.kubernetes {
                render_kubernetes(&mut out, kube);
            }
            if let Some(pods) = &agent.pods {
                let _ = writeln!(
                    out,
                    "local pods:      {} pod cgroups, {} of known identities ({} cgroups mapped)",
                    pods.pod_cgroups, pods.mapped, pods.mapped_cgroups
                );
                for uid in &pods.unidentified {
                    let _ = writeln!(
                        out,
                        "unknown pod:     {uid} (no identity: its processes are denied)"
                    );
                }
                for pod in &pods.without_cgroup {
                    let _ = writeln!(out, "pod w/o cgroup:  {pod}");
                }
                if let Some(why) = &pods.scan_truncated {
                    let _ = writeln!(out, "pod scan:        incomplete: {why}");
                }
            }
            if let Some(watch) = &agent.cgroup_watch {
                let _ = writeln!(
                    out,
                    "cgroup watch:    {} directories under {} ({} events, {} rescans){}",
                    watch.watches,
                    watch.root.display(),
                    watch.events,
                    watch.rescans,
                    match &watch.degraded {
                        Some(why) => format!("; degraded: {why}"),
                        None => String::new(),
                    }
                );
            }
            for problem in &agent.cluster_problems {
                let _ = writeln!(out, "cluster problem: {problem}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "agent:           no state file (agent never ran with this --state-dir)"
            );
        }
    }
    if let Some(pdp) = &status.pdp {
        let _ = writeln!(out, "pdp:             {}", pdp.url);
        let _ = writeln!(
            out,
            "pdp staleness:   {}",
            pdp.stale_seconds
                .map(|s| format!("{s} s since the last successful sync"))
                .unwrap_or_else(|| "never synced".into())
        );
        if let Some(error) = &pdp.last_error {
            let _ = writeln!(out, "pdp last error:  {error}");
        }
    }
    let _ = writeln!(
        out,
        "hooks:           {}",
        if status.hooks.is_empty() {
            "none attached".to_string()
        } else {
            status.hooks.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "audit mode:      global {}; {} workload identities in audit mode (their own or their tenant's audit: true)",
        if status.audit { "on" } else { "off" },
        status.audit_subjects
    );
    if status.node_netns_cookie == 0 {
        let _ = writeln!(
            out,
            "node netns:      not known: a pod's calls to its own loopback are judged as World's"
        );
    }
    let _ = writeln!(out, "lost events:     {}", status.lost_events);
    let _ = writeln!(
        out,
        "tracked flows:   {} live, {} flow events lost",
        status.tracked_flows, status.lost_flow_events
    );
    if status.ended_flow_records > 0 {
        let _ = writeln!(
            out,
            "                 {} records of UDP sockets connected elsewhere since (their flows \
             closed), each holding its tenant's share until the socket is closed",
            status.ended_flow_records
        );
    }
    let _ = writeln!(out, "verdicts:");
    for v in &status.verdicts {
        let _ = writeln!(out, "  {:<6} {:<16} {}", v.verdict, v.reason, v.count);
    }
    let _ = writeln!(out, "maps (entries / capacity):");
    for m in &status.maps {
        let entries = m.entries.map_or_else(|| "-".to_string(), |n| n.to_string());
        let capacity = m
            .capacity
            .map_or_else(|| "per socket".to_string(), |n| n.to_string());
        let _ = writeln!(out, "  {:<16} {entries} / {capacity}", m.name);
    }
    out
}

//! Lines for the SOC that are not calls: the agent's own news (losses, policy, quarantine,
//! cluster problems, risk). The JSON form is tagged by `type`; see [`super::ocsf`] for the
//! OCSF form of each.

use serde::Serialize;

/// One notice. `time` is RFC 3339 with nanoseconds, as in every event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum Notice {
    /// The kernel could not reserve ring-buffer space for `count` events since the last
    /// report (`total` since the maps were created).
    #[serde(rename = "events.lost")]
    EventsLost {
        time: String,
        count: u64,
        total: u64,
    },
    /// Like `events.lost`, for the flow ring buffer (`flow.opened` / `flow.closed` records).
    #[serde(rename = "flow_events.lost")]
    FlowEventsLost {
        time: String,
        count: u64,
        total: u64,
    },
    /// One workload's denies beyond its per-window key budget (`--events-keys-per-workload`
    /// distinct destinations or peers): `count` denies of `hook` and `reason` to one
    /// `destination` (a workload or endpoint name, `identity:N` for a number the policy does
    /// not name; any address and port of it) in the window ending at `time`, counted exactly
    /// in the kernel and not reported one by one. For `hook: ingress`, `workload` is the
    /// destination the SYNs were refused for (the peers' claims are many and forgeable) and
    /// there is no `destination`.
    #[serde(rename = "events.suppressed")]
    EventsSuppressed {
        time: String,
        workload: String,
        tenant: String,
        identity: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        destination: Option<String>,
        hook: &'static str,
        verdict: &'static str,
        reason: &'static str,
        count: u64,
    },
    /// One workload's flows beyond its per-window flow event budget
    /// (`--flow-events-per-workload` `flow.opened` events): `opened` flows in the window
    /// ending at `time` whose `flow.opened` was not written, and `closed` flows whose
    /// `flow.closed` was not written because their `flow.opened` was not (a flow is reported
    /// as a pair of lines or in these counts, never half). Exact counts from the kernel.
    #[serde(rename = "flow_events.suppressed")]
    FlowEventsSuppressed {
        time: String,
        workload: String,
        tenant: String,
        identity: u32,
        opened: u64,
        closed: u64,
    },
    /// A bundle was written to the kernel: it decides from now on.
    #[serde(rename = "policy.applied")]
    PolicyApplied {
        time: String,
        snapshot: String,
        allows: usize,
    },
    /// A bundle failed (validation, compile, capacity or a kernel write): the one in force
    /// stays.
    #[serde(rename = "policy.rejected")]
    PolicyRejected {
        time: String,
        policies: String,
        errors: Vec<String>,
        snapshot_in_force: String,
    },
    /// Every further connection of the workload is denied (`cause`: the `@quarantine` policy
    /// that denied it, or `manual`).
    #[serde(rename = "subject.quarantined")]
    Quarantined {
        time: String,
        workload: String,
        identity: u32,
        cause: String,
    },
    #[serde(rename = "subject.released")]
    Released {
        time: String,
        workload: String,
        identity: u32,
    },
    /// Once per problem: it stays listed in `enforcer status` while it lasts, and is
    /// emitted again only if it goes away and comes back.
    #[serde(rename = "cluster.problem")]
    ClusterProblem { time: String, problem: String },
    /// `enforcer risk set`: the workload's row was re-evaluated; `added` cells are now
    /// allowed, `removed` ones denied.
    #[serde(rename = "risk.changed")]
    RiskChanged {
        time: String,
        workload: String,
        score: String,
        added: usize,
        removed: usize,
        elapsed_ms: f64,
    },
}

impl Notice {
    /// The `type` of the JSON line.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::EventsLost { .. } => "events.lost",
            Notice::FlowEventsLost { .. } => "flow_events.lost",
            Notice::EventsSuppressed { .. } => "events.suppressed",
            Notice::FlowEventsSuppressed { .. } => "flow_events.suppressed",
            Notice::PolicyApplied { .. } => "policy.applied",
            Notice::PolicyRejected { .. } => "policy.rejected",
            Notice::Quarantined { .. } => "subject.quarantined",
            Notice::Released { .. } => "subject.released",
            Notice::ClusterProblem { .. } => "cluster.problem",
            Notice::RiskChanged { .. } => "risk.changed",
        }
    }

    /// `time`, as written.
    pub fn time(&self) -> &str {
        match self {
            Notice::EventsLost { time, .. }
            | Notice::FlowEventsLost { time, .. }
            | Notice::EventsSuppressed { time, .. }
            | Notice::FlowEventsSuppressed { time, .. }
            | Notice::PolicyApplied { time, .. }
            | Notice::PolicyRejected { time, .. }
            | Notice::Quarantined { time, .. }
            | Notice::Released { time, .. }
            | Notice::ClusterProblem { time, .. }
            | Notice::RiskChanged { time, .. } => time,
        }
    }
}

//! Tracked-flow events: `flow.opened`, `flow.closed` (bytes and duration), `flow.revoked`
//! (the agent reset it: policy no longer permits it) and `flow.stale` (a connected UDP socket
//! policy no longer permits: it cannot be closed from outside). Same subject and destination
//! objects, `subject_chain` and `dataset_scope` as the deny events.

use std::time::SystemTime;

use enforcer_common::{identity, FlowRecord};
use enforcer_policy::Compiled;
use serde::Serialize;

use super::record::{destination_kind, wall_clock, Caller, Destination, Subject, Time};
use crate::flows;

pub const OPENED: &str = "flow.opened";
pub const CLOSED: &str = "flow.closed";
pub const REVOKED: &str = "flow.revoked";
pub const STALE: &str = "flow.stale";
/// A flow no longer permitted that the agent could not reset (its network namespace could
/// not be entered, or the kernel refused): the record is kept and the reset retried.
pub const REVOKE_FAILED: &str = "flow.revoke_failed";
/// The first contact of a subject with a dataset outside its learned neighbourhood
/// (`enforcer run --learn`, see [`crate::learn`]): once per (subject, dataset).
pub const ANOMALY: &str = "flow.anomaly";

/// The first [`ANOMALY_NAMES_SHOWN`] of `names` (of `total` in all), and `total` when that
/// is more: a `new_datasets` or `neighbourhood` and its count.
pub fn shown_names(
    names: impl IntoIterator<Item = String>,
    total: usize,
) -> (Vec<String>, Option<usize>) {
    let shown: Vec<String> = names.into_iter().take(ANOMALY_NAMES_SHOWN).collect();
    let more = (total > shown.len()).then_some(total);
    (shown, more)
}

#[derive(Debug, Serialize)]
pub struct FlowCall {
    pub time: Time,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub flow: FlowInfo,
    pub subject: Subject,
    pub destination: Destination,
    pub policy: FlowPolicy,
    pub subject_chain: Vec<String>,
    pub dataset_scope: Vec<String>,
    /// `flow.anomaly`: what was unusual and what the agent did about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Anomaly>,
    /// `flow.anomaly`: the ATLAS techniques of reaching data outside one's neighbourhood.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub atlas: Vec<enforcer_policy::AtlasTechnique>,
}

/// The most names `new_datasets` and `neighbourhood` of a `flow.anomaly` list (the first in
/// order; the count of all is given when there are more). A subject past a bound has an
/// anomaly at every contact (the learner fails closed), and a neighbourhood holds up to 256
/// names of up to 335 bytes: listed whole, each event was ~90 KB, the event history of
/// 10,000 nearly a gigabyte (red-team review 75 M1).
pub const ANOMALY_NAMES_SHOWN: usize = 16;

/// The `anomaly` object of `flow.anomaly`.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    /// The datasets of this flow outside the subject's neighbourhood (first contact): at most
    /// [`ANOMALY_NAMES_SHOWN`].
    pub new_datasets: Vec<String>,
    /// How many there are, when more than `new_datasets` lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_datasets_total: Option<usize>,
    /// The subject's neighbourhood: the datasets it reached while learning (at most
    /// [`ANOMALY_NAMES_SHOWN`]).
    pub neighbourhood: Vec<String>,
    /// How many there are, when more than `neighbourhood` lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbourhood_total: Option<usize>,
    /// When the learning window ended.
    pub learned_until: Time,
    /// The destination's `step_up`, when it has one: `quarantine` ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_up: Option<&'static str>,
    /// ... and until when (absent when the subject was already quarantined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_until: Option<Time>,
    /// How many contacts this event stands for, on an event held back: the same anomaly (this
    /// subject, this destination) seen again within a minute of the pair's last event is not
    /// reported one by one (a subject past the learner's bound has one at every contact:
    /// red-team review 76 M1); the latest of them is sent at the minute's end with their
    /// count (itself included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// With `count`: when the first of them was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Time>,
}

#[derive(Debug, Serialize)]
pub struct FlowInfo {
    /// The socket cookie: the flow's key in the kernel and in `enforcer flows`.
    pub cookie: u64,
    pub protocol: &'static str,
    /// The subject's local address and port; `null` before the TCP handshake completed and
    /// for UDP.
    pub source: Option<SocketAddress>,
    /// Where the socket is connected when that is not `destination` (judged, and re-judged,
    /// as the call it was): a socket load balancer sent the connect to a Service's backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddress>,
    /// When `connect()` was allowed.
    pub started: Time,
    /// `flow.closed`: from `connect()` to CLOSE, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// `flow.closed`: payload bytes the peer acknowledged, and payload bytes received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// `flow.revoked` / `flow.stale`: why the policy in force no longer permits it
    /// (`no_permit`, `tenant_mismatch`, `quarantined`, `unknown_subject`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// `flow.revoke_failed`: why the reset failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `flow.closed` written by the agent (`"agent"`), not from the kernel's close: the
    /// socket was gone without its CLOSE callback (it closed while no enforcer program ran),
    /// found when the flow was re-decided. Its bytes and duration are unknown, so absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct SocketAddress {
    pub ip: String,
    pub port: u16,
}

#[derive(Debug, Serialize)]
pub struct FlowPolicy {
    /// The revision that allowed the `connect()` (stamped by the kernel).
    pub snapshot: String,
    /// `flow.revoked` / `flow.stale`: the revision that no longer permits it, and its
    /// determining policy (`@id`, or `implicit-deny`, `quarantine`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A flow event for `record` (socket `cookie`), named by `allowed_by`, the policy that was in
/// force when the kernel allowed the `connect()`.
pub fn flow(
    kind: &'static str,
    time: SystemTime,
    cookie: u64,
    record: &FlowRecord,
    allowed_by: &Compiled,
) -> FlowCall {
    let subject = allowed_by
        .identity(record.subject)
        .filter(|_| record.subject != identity::UNKNOWN);
    let destination = allowed_by.identity(record.destination);
    FlowCall {
        time: Time(time),
        kind,
        flow: FlowInfo {
            cookie,
            protocol: flows::protocol_name(record.protocol),
            source: flows::source_ip(record).map(|ip| SocketAddress {
                ip: ip.to_string(),
                port: record.sport,
            }),
            peer: flows::peer_elsewhere(record).map(|(ip, port)| SocketAddress {
                ip: ip.to_string(),
                port,
            }),
            started: Time(wall_clock(record.start_ns)),
            duration_ms: None,
            bytes_sent: None,
            bytes_received: None,
            reason: None,
            error: None,
            ended_by: None,
        },
        subject: Subject {
            caller: Caller::of(record.subject, subject, record.cgroup_id),
            pid: (record.pid_tgid >> 32) as u32,
            comm: comm_of(record),
        },
        destination: Destination {
            ip: flows::destination_ip(record).to_string(),
            port: record.dport,
            protocol: flows::protocol_name(record.protocol).to_string(),
            identity: record.destination,
            name: destination.map(|i| i.name.clone()),
            tenant: destination.and_then(|i| i.tenant.clone()),
            kind: destination.map(destination_kind),
            cgroup_id: None,
            cgroup: None,
        },
        policy: FlowPolicy {
            snapshot: allowed_by.revision().to_string(),
            revoked_by: None,
            id: None,
        },
        subject_chain: subject
            .and_then(|i| i.spiffe_id.clone())
            .into_iter()
            .collect(),
        dataset_scope: destination.map(|i| i.datasets.clone()).unwrap_or_default(),
        anomaly: None,
        atlas: Vec::new(),
    }
}

/// `comm` is NUL-padded.
fn comm_of(record: &FlowRecord) -> String {
    let end = record
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(record.comm.len());
    String::from_utf8_lossy(&record.comm[..end]).into_owned()
}

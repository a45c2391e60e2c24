//! The OCSF 1.8.0 form of every event (`--events-format ocsf`): one OCSF event per line.
//!
//! | event | OCSF class | activity |
//! |---|---|---|
//! | `connection.denied` | Network Activity (4001) | Refuse (5) |
//! | `connection.audited` | Network Activity (4001) | Open (1): the call went through |
//! | an allowed call (flow records, later) | Network Activity (4001) | Open (1) |
//! | `flow.anomaly` | Network Activity (4001), `is_alert`, ATLAS `attacks` | Traffic (6), disposition Detected |
//! | `policy.applied`, `policy.rejected` | Entity Management (3004), a Policy entity | Update (3), status Success / Failure |
//! | `subject.quarantined` | Entity Management (3004), the workload | Suspend (12) |
//! | `subject.released` | Entity Management (3004), the workload | Resume (13) |
//! | `risk.changed` | Entity Management (3004), the workload | Update (3) |
//! | `events.lost`, `cluster.problem` | Application Error (6008) | General Error (1) |
//!
//! The attribute-by-attribute mapping is in the README ("OCSF"). What OCSF has no attribute
//! for goes in `unmapped` under the names of the JSON form (`subject_chain`, `dataset_scope`,
//! `policy_snapshot`, `policy_sources`, `verdict`, `reason`, `hook`, ...), so a query written
//! against one format reads the other. [`conformance`] checks events against the schema files
//! this repository ships.

pub mod conformance;
#[cfg(test)]
mod tests;

use serde::Serialize;
use serde_json::json;

use super::flow::FlowCall;
use super::notice::Notice;
use super::record::{DeniedCall, Destination, SocketInfo, Time};
use enforcer_policy::atlas;

/// The OCSF release the events follow (`metadata.version`).
pub const SCHEMA_VERSION: &str = "1.8.0";
/// `metadata.product.name`.
pub const PRODUCT_NAME: &str = "enforcer";
/// `metadata.product.vendor_name`: the project.
pub const VENDOR_NAME: &str = "ai-enforcer";

/// What every OCSF event says about where it comes from.
#[derive(Debug, Clone)]
pub struct Context {
    /// The node (`device.hostname`): the Kubernetes node name, else the host name.
    pub node: String,
}

impl Context {
    /// The host name of this machine (`/proc/sys/kernel/hostname`), or `unknown`.
    pub fn from_host() -> Context {
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        Context { node }
    }
}

/// One OCSF event. Attributes a class does not have are left out (`None`, empty).
#[derive(Debug, Serialize, Default)]
pub struct Event<'a> {
    category_uid: u32,
    category_name: &'static str,
    class_uid: u32,
    class_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
    type_uid: u32,
    type_name: String,
    severity_id: u32,
    severity: &'static str,
    time: i64,
    timezone_offset: i32,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disposition_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disposition: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_alert: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    metadata: Metadata<'a>,
    device: Device<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Actor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    src_endpoint: Option<NetworkEndpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_endpoint: Option<NetworkEndpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_info: Option<ConnectionInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic: Option<Traffic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<i64>,
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<Policy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    firewall_rule: Option<FirewallRule<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    attacks: Vec<Attack>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity: Option<ManagedEntity<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    unmapped: Unmapped<'a>,
}

/// What OCSF has no attribute for: a call's under the JSON form's names, a notice's as JSON.
// Lives on the stack for one line: no box (an allocation per event) for a size difference.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Unmapped<'a> {
    Call(CallUnmapped<'a>),
    Notice(serde_json::Value),
}

impl Default for Unmapped<'_> {
    fn default() -> Self {
        Unmapped::Notice(serde_json::Value::Object(Default::default()))
    }
}

#[derive(Debug, Serialize)]
struct CallUnmapped<'a> {
    verdict: &'a str,
    reason: &'a str,
    hook: &'a str,
    subject: SubjectUnmapped<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<DestinationUnmapped<'a>>,
    /// `missing_tag` events: the workload the IP cache gives the source address (the JSON
    /// form's `peer.workload`; unauthenticated, so not `src_endpoint`'s name).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_workload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<&'a SocketInfo>,
    policy_snapshot: &'a str,
    policy_sources: &'a [String],
    subject_chain: &'a [String],
    dataset_scope: &'a [String],
}

#[derive(Debug, Serialize)]
struct SubjectUnmapped<'a> {
    identity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ring: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_id: Option<&'a str>,
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct DestinationUnmapped<'a> {
    identity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    /// Ingress events: the listener's cgroup (the subject is the remote peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<&'a str>,
}

#[derive(Debug, Serialize, Default)]
struct Metadata<'a> {
    version: &'static str,
    product: Product,
    profiles: Vec<&'static str>,
    /// The line's `seq`: its place in this agent's stream.
    sequence: u64,
    /// The JSON form's `type` (`connection.denied`).
    event_code: &'static str,
    log_name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_uid: Option<&'a str>,
}

#[derive(Debug, Serialize, Default)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

#[derive(Debug, Serialize)]
struct Device<'a> {
    hostname: &'a str,
    name: &'a str,
    type_id: u32,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl Default for Device<'_> {
    fn default() -> Self {
        Device {
            hostname: "",
            name: "",
            type_id: 0,
            kind: "Unknown",
        }
    }
}

#[derive(Debug, Serialize, Default)]
struct Actor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_name: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct Process<'a> {
    pid: u32,
    name: &'a str,
}

#[derive(Debug, Serialize, Default)]
struct NetworkEndpoint<'a> {
    /// The identity number (the kernel's), as a string.
    uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// A Kubernetes Service's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    svc_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<Owner<'a>>,
    /// The subject's container (profile `container`).
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<Container<'a>>,
}

#[derive(Debug, Serialize)]
struct Container<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uuid: Option<&'a str>,
    orchestrator: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<&'static str>,
}

/// The service identity that owns an endpoint (`user`, type Service), in its tenant (`org`).
#[derive(Debug, Serialize)]
struct Owner<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    name: &'a str,
    type_id: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<Org<'a>>,
}

#[derive(Debug, Serialize)]
struct Org<'a> {
    name: &'a str,
}

#[derive(Debug, Serialize)]
struct ConnectionInfo {
    direction_id: u32,
    direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_num: Option<u16>,
    protocol_name: String,
    protocol_ver_id: u32,
}

/// A closed flow's payload bytes: `bytes_out` the subject sent, `bytes_in` it received.
#[derive(Debug, Serialize)]
struct Traffic {
    bytes: u64,
    bytes_in: u64,
    bytes_out: u64,
}

#[derive(Debug, Serialize, Default)]
struct Policy<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    is_applied: bool,
}

#[derive(Debug, Serialize)]
struct FirewallRule<'a> {
    uid: &'a str,
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Attack {
    version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tactic: Option<AtlasEntity>,
    technique: AtlasEntity,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub_technique: Option<AtlasEntity>,
}

#[derive(Debug, Clone, Serialize)]
struct AtlasEntity {
    uid: String,
    name: String,
    src_url: String,
}

#[derive(Debug, Serialize)]
struct ManagedEntity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    type_id: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<Policy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

/// A class: category and class, uid and caption.
struct Class {
    category_uid: u32,
    category_name: &'static str,
    class_uid: u32,
    class_name: &'static str,
}

const NETWORK_ACTIVITY: Class = Class {
    category_uid: 4,
    category_name: "Network Activity",
    class_uid: 4001,
    class_name: "Network Activity",
};
const ENTITY_MANAGEMENT: Class = Class {
    category_uid: 3,
    category_name: "Identity & Access Management",
    class_uid: 3004,
    class_name: "Entity Management",
};
const APPLICATION_ERROR: Class = Class {
    category_uid: 6,
    category_name: "Application Activity",
    class_uid: 6008,
    class_name: "Application Error",
};

fn severity_name(id: u32) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        5 => "Critical",
        _ => "Unknown",
    }
}

/// When an event happened, its place in the stream and its JSON `type`.
struct Stamp {
    time: i64,
    seq: u64,
    event_code: &'static str,
}

/// The parts every event has.
fn header<'a>(
    context: &'a Context,
    class: Class,
    activity: (u32, &'static str),
    severity_id: u32,
    stamp: Stamp,
    profiles: Vec<&'static str>,
) -> Event<'a> {
    let Stamp {
        time,
        seq,
        event_code,
    } = stamp;
    Event {
        category_uid: class.category_uid,
        category_name: class.category_name,
        class_uid: class.class_uid,
        class_name: class.class_name,
        activity_id: activity.0,
        activity_name: activity.1,
        type_uid: class.class_uid * 100 + activity.0,
        type_name: format!("{}: {}", class.class_name, activity.1),
        severity_id,
        severity: severity_name(severity_id),
        time,
        metadata: Metadata {
            version: SCHEMA_VERSION,
            product: Product {
                name: PRODUCT_NAME,
                vendor_name: VENDOR_NAME,
                version: env!("CARGO_PKG_VERSION"),
            },
            profiles,
            sequence: seq,
            event_code,
            log_name: "events",
            tenant_uid: None,
        },
        device: Device {
            hostname: &context.node,
            name: &context.node,
            ..Device::default()
        },
        ..Event::default()
    }
}

/// ATLAS techniques as OCSF `attack` objects: one per tactic (OCSF deprecates the `tactics`
/// array), a sub-technique under its parent technique.
fn attacks(techniques: &[enforcer_policy::AtlasTechnique]) -> Vec<Attack> {
    let mut attacks = Vec::new();
    for technique in techniques {
        let placement = atlas::placement(&technique.id);
        let entity = |uid: &str, name: &str| AtlasEntity {
            uid: uid.to_string(),
            name: name.to_string(),
            src_url: format!("https://atlas.mitre.org/techniques/{uid}"),
        };
        let (parent, sub) = match placement.as_ref().and_then(|p| p.parent.as_ref()) {
            Some(parent) => (
                entity(&parent.id, &parent.name),
                Some(entity(&technique.id, &technique.name)),
            ),
            None => (entity(&technique.id, &technique.name), None),
        };
        let tactic_ids = placement.map(|p| p.tactic_ids).unwrap_or_default();
        let mut tactics: Vec<Option<AtlasEntity>> = technique
            .tactics
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let uid = tactic_ids.get(i).copied().unwrap_or_default();
                Some(AtlasEntity {
                    uid: uid.to_string(),
                    name: name.clone(),
                    src_url: format!("https://atlas.mitre.org/tactics/{uid}"),
                })
            })
            .collect();
        if tactics.is_empty() {
            tactics.push(None);
        }
        for tactic in tactics {
            attacks.push(Attack {
                version: atlas::version(),
                tactic,
                technique: parent.clone(),
                sub_technique: sub.clone(),
            });
        }
    }
    attacks
}

/// IANA protocol numbers of the names the records use.
fn protocol_number(name: &str) -> Option<u16> {
    match name {
        "ip" => Some(0),
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" => Some(58),
        "sctp" => Some(132),
        "udplite" => Some(136),
        "raw" => Some(255),
        // IPPROTO_MPTCP (262) is Linux's, not an IANA number.
        other => other.parse().ok().filter(|n| *n < 256),
    }
}

fn owner<'a>(
    name: Option<&'a str>,
    spiffe_id: Option<&'a str>,
    tenant: Option<&'a str>,
) -> Option<Owner<'a>> {
    if spiffe_id.is_none() && tenant.is_none() {
        return None;
    }
    Some(Owner {
        uid: spiffe_id,
        name: name.or(spiffe_id).or(tenant).unwrap_or_default(),
        type_id: 4,
        kind: "Service",
        org: tenant.map(|name| Org { name }),
    })
}

fn destination_text(d: &Destination) -> String {
    match &d.name {
        Some(name) => format!("{name} {}:{}/{}", d.ip, d.port, d.protocol),
        None => format!("{}:{}/{}", d.ip, d.port, d.protocol),
    }
}

/// The OCSF event of a call (denied, audited, or allowed).
pub fn call<'a>(context: &'a Context, seq: u64, call: &'a DeniedCall) -> Event<'a> {
    let (activity, severity, action, disposition, status, alert) = match call.verdict {
        "deny" => (
            (5, "Refuse"),
            3,
            (2, "Denied"),
            (2, "Blocked"),
            (2, "Failure"),
            true,
        ),
        "audit" => (
            (1, "Open"),
            2,
            (3, "Observed"),
            (15, "Detected"),
            (1, "Success"),
            false,
        ),
        _ => (
            (1, "Open"),
            1,
            (1, "Allowed"),
            (1, "Allowed"),
            (1, "Success"),
            false,
        ),
    };
    let mut event = header(
        context,
        NETWORK_ACTIVITY,
        activity,
        severity,
        Stamp {
            time: call.time.epoch_millis(),
            seq,
            event_code: call.kind,
        },
        vec!["security_control", "host"],
    );
    let subject = &call.subject;
    let subject_text = match (&subject.workload, &call.peer) {
        (Some(w), _) => w.clone(),
        (None, Some(peer)) if call.reason == "missing_tag" => match &peer.workload {
            Some(w) => format!("{} (an address of {w}) without an identity option", peer.ip),
            None => format!("{} without an identity option", peer.ip),
        },
        (None, Some(peer)) => format!("{} claiming identity {}", peer.ip, subject.identity),
        (None, None) => format!("unknown subject (cgroup {})", subject.cgroup_id),
    };
    let target = match (&call.destination, &call.socket) {
        (Some(d), _) => destination_text(d),
        (None, Some(s)) => format!("socket({}, {}, {})", s.family, s.kind, s.protocol),
        (None, None) => "nothing".to_string(),
    };
    let verb = match call.verdict {
        "deny" => "denied",
        "audit" => "would be denied (audit)",
        _ => "allowed",
    };
    event.message = format!(
        "{subject_text} -> {target}: {verb}, {} (policy {})",
        call.reason, call.policy.id
    );
    event.status_id = Some(status.0);
    event.status = Some(status.1);
    event.status_detail = Some(call.reason);
    // OCSF's base `count`: "the number of times that events in the same logical group
    // occurred during the event Start Time to End Time period" — a summary's N.
    event.count = Some(u64::from(call.count));
    event.action_id = Some(action.0);
    event.action = Some(action.1);
    event.disposition_id = Some(disposition.0);
    event.disposition = Some(disposition.1);
    event.is_alert = Some(alert);
    // An ingress refusal whose claim cannot be named (forged, or no option) belongs to the
    // tenant of the destination it was refused for, never to the name the packet gave.
    event.metadata.tenant_uid = subject.tenant.as_deref().or_else(|| {
        call.peer
            .as_ref()
            .and(call.destination.as_ref())
            .and_then(|d| d.tenant.as_deref())
    });
    event.actor = Some(Actor {
        process: Some(Process {
            pid: call.pid,
            name: &call.comm,
        }),
        app_name: None,
    });
    let cgroup = subject.cgroup.as_deref();
    let container_of = |c: &'a crate::events::cgroup::CgroupContext| {
        Some(Container {
            uid: c.container_id.as_deref()?,
            // OCSF's uuid_t: a static pod's UID is 32 bare hex digits (in `unmapped` then).
            pod_uuid: c.pod_uid.as_deref().filter(|u| u.len() == 36),
            orchestrator: "Kubernetes",
            runtime: c.runtime,
        })
    };
    let container = cgroup.and_then(container_of);
    // An ingress event's container is the destination's (the listener's cgroup).
    let destination_cgroup = call.destination.as_ref().and_then(|d| d.cgroup.as_deref());
    let destination_container = destination_cgroup.and_then(container_of);
    if container.is_some() || destination_container.is_some() {
        event.metadata.profiles.push("container");
    }
    event.src_endpoint = Some(NetworkEndpoint {
        uid: subject.identity.to_string(),
        name: subject.workload.as_deref(),
        owner: owner(
            subject.workload.as_deref(),
            subject.spiffe_id.as_deref(),
            subject.tenant.as_deref(),
        ),
        container,
        // An ingress event's subject is the remote peer: its address is known.
        ip: call.peer.as_ref().map(|p| p.ip.as_str()),
        port: call.peer.as_ref().map(|p| p.port),
        ..NetworkEndpoint::default()
    });
    if let Some(d) = &call.destination {
        event.dst_endpoint = Some(NetworkEndpoint {
            uid: d.identity.to_string(),
            name: d.name.as_deref(),
            ip: Some(&d.ip),
            port: Some(d.port),
            svc_name: d
                .name
                .as_deref()
                .filter(|_| d.kind.as_deref() == Some("service")),
            owner: owner(d.name.as_deref(), None, d.tenant.as_deref()),
            container: destination_container,
        });
    }
    let v6 = match (&call.destination, &call.socket) {
        (Some(d), _) => d.ip.contains(':'),
        (None, Some(s)) => s.family == "ipv6",
        _ => false,
    };
    let (direction_id, direction) = match &call.destination {
        Some(_) if call.peer.is_some() => (1, "Inbound"),
        Some(d) if d.kind.as_deref() == Some("world") => (2, "Outbound"),
        Some(_) => (3, "Lateral"),
        None => (0, "Unknown"),
    };
    let protocol = match (&call.destination, &call.socket) {
        (Some(d), _) => d.protocol.clone(),
        (None, Some(s)) => s.protocol.clone(),
        _ => String::new(),
    };
    event.connection_info = Some(ConnectionInfo {
        direction_id,
        direction,
        protocol_num: protocol_number(&protocol),
        protocol_name: protocol,
        protocol_ver_id: if v6 { 6 } else { 4 },
    });
    let builtin = call.policy.sources.is_empty();
    event.policy = Some(Policy {
        uid: Some(&call.policy.id),
        name: Some(&call.policy.id),
        kind: if builtin { "builtin" } else { "cedar" },
        version: Some(&call.policy.snapshot),
        // Audit mode lets the call through: the deny was not applied.
        is_applied: call.verdict != "audit",
    });
    event.firewall_rule = Some(FirewallRule {
        uid: &call.policy.id,
        name: &call.policy.id,
        kind: if builtin { "builtin" } else { "cedar" },
        version: Some(&call.policy.snapshot),
    });
    event.attacks = attacks(&call.atlas);
    event.unmapped = Unmapped::Call(CallUnmapped {
        verdict: call.verdict,
        reason: call.reason,
        hook: call.hook,
        subject: SubjectUnmapped {
            identity: subject.identity,
            tenant: subject.tenant.as_deref(),
            purpose: subject.purpose.as_deref(),
            ring: subject.ring.as_deref(),
            spiffe_id: subject.spiffe_id.as_deref(),
            cgroup_id: subject.cgroup_id,
            cgroup: cgroup.map(|c| c.path.as_str()),
            pod_uid: cgroup.and_then(|c| c.pod_uid.as_deref()),
        },
        destination: call.destination.as_ref().map(|d| DestinationUnmapped {
            identity: d.identity,
            tenant: d.tenant.as_deref(),
            kind: d.kind.as_deref(),
            cgroup_id: d.cgroup_id,
            cgroup: destination_cgroup.map(|c| c.path.as_str()),
            pod_uid: destination_cgroup.and_then(|c| c.pod_uid.as_deref()),
        }),
        peer_workload: call.peer.as_ref().and_then(|p| p.workload.as_deref()),
        socket: call.socket.as_ref(),
        policy_snapshot: &call.policy.snapshot,
        policy_sources: &call.policy.sources,
        subject_chain: &call.subject_chain,
        dataset_scope: &call.dataset_scope,
    });
    event
}

/// The OCSF event of a tracked flow: Network Activity Open (`flow.opened`), Close
/// (`flow.closed`, with `traffic`, `start_time`, `end_time`, `duration`), Reset
/// (`flow.revoked`: the agent reset it) or Traffic (`flow.stale`: reported, not closable;
/// `flow.revoke_failed`: the reset failed, status Failure).
pub fn flow<'a>(context: &'a Context, seq: u64, flow: &'a FlowCall) -> Event<'a> {
    let (activity, severity, action, disposition, alert) = match flow.kind {
        super::flow::OPENED => ((1, "Open"), 1, (1, "Allowed"), (1, "Allowed"), false),
        super::flow::CLOSED => ((2, "Close"), 1, (1, "Allowed"), (1, "Allowed"), false),
        super::flow::REVOKED => ((3, "Reset"), 3, (2, "Denied"), (2, "Blocked"), true),
        super::flow::REVOKE_FAILED => ((6, "Traffic"), 4, (3, "Observed"), (15, "Detected"), true),
        // An allowed flow that is unusual for its subject: observed and detected, not refused
        // (the step-up, if any, is a quarantine of the subject: its own event). Network
        // Activity rather than a Detection Finding: the finding is this flow, and the SOC
        // correlates it with the flow's other events by the same class and endpoints.
        super::flow::ANOMALY => {
            let severity = if flow.anomaly.as_ref().is_some_and(|a| a.step_up.is_some()) {
                4
            } else {
                3
            };
            (
                (6, "Traffic"),
                severity,
                (3, "Observed"),
                (15, "Detected"),
                true,
            )
        }
        _ => ((6, "Traffic"), 3, (3, "Observed"), (15, "Detected"), true),
    };
    let mut event = header(
        context,
        NETWORK_ACTIVITY,
        activity,
        severity,
        Stamp {
            time: flow.time.epoch_millis(),
            seq,
            event_code: flow.kind,
        },
        vec!["security_control", "host"],
    );
    let subject = &flow.subject;
    let d = &flow.destination;
    let subject_text = subject
        .workload
        .clone()
        .unwrap_or_else(|| format!("identity {}", subject.identity));
    let what = match flow.kind {
        super::flow::OPENED => "flow opened".to_string(),
        super::flow::CLOSED if flow.flow.ended_by.is_some() => {
            "flow found closed by the agent (the kernel did not see it end): byte counts unknown"
                .to_string()
        }
        super::flow::CLOSED => format!(
            "flow closed, {} bytes sent, {} received",
            flow.flow.bytes_sent.unwrap_or(0),
            flow.flow.bytes_received.unwrap_or(0)
        ),
        super::flow::REVOKED => format!(
            "flow reset: no longer permitted ({})",
            flow.flow.reason.unwrap_or("denied")
        ),
        super::flow::REVOKE_FAILED => format!(
            "flow no longer permitted ({}) could not be reset: {}",
            flow.flow.reason.unwrap_or("denied"),
            flow.flow.error.as_deref().unwrap_or("unknown error")
        ),
        super::flow::ANOMALY => {
            let anomaly = flow.anomaly.as_ref();
            let new = anomaly
                .map(|a| match a.new_datasets_total {
                    Some(total) => format!(
                        "{} and {} more",
                        a.new_datasets.join(", "),
                        total.saturating_sub(a.new_datasets.len())
                    ),
                    None => a.new_datasets.join(", "),
                })
                .unwrap_or_default();
            let repeats = match anomaly.and_then(|a| a.count) {
                Some(count) => format!(" ({count} contacts in a minute, reported as one)"),
                None => String::new(),
            };
            match anomaly.and_then(|a| a.step_up) {
                Some(step_up) => format!("first contact with {new}, outside its learned neighbourhood{repeats}; step-up: {step_up}"),
                None => format!("first contact with {new}, outside its learned neighbourhood{repeats}"),
            }
        }
        _ => format!(
            "connected UDP socket no longer permitted ({}); it cannot be closed from outside",
            flow.flow.reason.unwrap_or("denied")
        ),
    };
    event.message = format!("{subject_text} -> {}: {what}", destination_text(d));
    if flow.kind == super::flow::REVOKE_FAILED {
        event.status_id = Some(2);
        event.status = Some("Failure");
    } else {
        event.status_id = Some(1);
        event.status = Some("Success");
    }
    event.status_detail = flow.flow.reason;
    event.action_id = Some(action.0);
    event.action = Some(action.1);
    event.disposition_id = Some(disposition.0);
    event.disposition = Some(disposition.1);
    event.is_alert = Some(alert);
    event.metadata.tenant_uid = subject.tenant.as_deref();
    event.actor = Some(Actor {
        process: Some(Process {
            pid: subject.pid,
            name: &subject.comm,
        }),
        app_name: None,
    });
    event.src_endpoint = Some(NetworkEndpoint {
        uid: subject.identity.to_string(),
        name: subject.workload.as_deref(),
        ip: flow.flow.source.as_ref().map(|s| s.ip.as_str()),
        port: flow.flow.source.as_ref().map(|s| s.port),
        owner: owner(
            subject.workload.as_deref(),
            subject.spiffe_id.as_deref(),
            subject.tenant.as_deref(),
        ),
        ..NetworkEndpoint::default()
    });
    event.dst_endpoint = Some(NetworkEndpoint {
        uid: d.identity.to_string(),
        name: d.name.as_deref(),
        ip: Some(&d.ip),
        port: Some(d.port),
        owner: owner(d.name.as_deref(), None, d.tenant.as_deref()),
        ..NetworkEndpoint::default()
    });
    event.connection_info = Some(ConnectionInfo {
        direction_id: 3,
        direction: "Lateral",
        protocol_num: protocol_number(&d.protocol),
        protocol_name: d.protocol.clone(),
        protocol_ver_id: if d.ip.contains(':') { 6 } else { 4 },
    });
    event.start_time = Some(flow.flow.started.epoch_millis());
    // The repeats of one anomaly gathered into this event: OCSF's base `count`.
    event.count = flow.anomaly.as_ref().and_then(|a| a.count);
    // A close the agent found (`ended_by`) has no counters and no known end: no traffic.
    if flow.kind == super::flow::CLOSED && flow.flow.ended_by.is_none() {
        let (out, inn) = (
            flow.flow.bytes_sent.unwrap_or(0),
            flow.flow.bytes_received.unwrap_or(0),
        );
        event.traffic = Some(Traffic {
            bytes: out + inn,
            bytes_in: inn,
            bytes_out: out,
        });
        event.end_time = Some(flow.time.epoch_millis());
        event.duration = flow.flow.duration_ms.map(|ms| ms as i64);
    }
    let version = flow
        .policy
        .revoked_by
        .as_ref()
        .unwrap_or(&flow.policy.snapshot);
    let id = flow.policy.id.as_deref();
    event.policy = Some(Policy {
        uid: id,
        name: id,
        kind: "cedar",
        version: Some(version),
        is_applied: true,
    });
    event.attacks = attacks(&flow.atlas);
    event.unmapped = Unmapped::Notice(json!({
        "anomaly": flow.anomaly,
        "flow": {
            "cookie": flow.flow.cookie,
            "reason": flow.flow.reason,
            "ended_by": flow.flow.ended_by,
            "peer": flow.flow.peer,
        },
        "subject": {
            "identity": subject.identity,
            "tenant": subject.tenant,
            "spiffe_id": subject.spiffe_id,
            "cgroup_id": subject.cgroup_id,
        },
        "destination": {"identity": d.identity, "tenant": d.tenant, "kind": d.kind},
        "policy_snapshot": flow.policy.snapshot,
        "policy_revoked_by": flow.policy.revoked_by,
        "subject_chain": flow.subject_chain,
        "dataset_scope": flow.dataset_scope,
    }));
    event
}

/// The milliseconds of a notice's RFC 3339 `time` (now, should it not parse: it always does,
/// the agent writes it).
fn notice_millis(time: &str) -> i64 {
    let at = humantime::parse_rfc3339(time).unwrap_or_else(|_| std::time::SystemTime::now());
    Time(at).epoch_millis()
}

/// The OCSF event of a notice.
pub fn notice<'a>(context: &'a Context, seq: u64, notice: &'a Notice) -> Event<'a> {
    let stamp = || Stamp {
        time: notice_millis(notice.time()),
        seq,
        event_code: notice.kind(),
    };
    let app = Actor {
        process: None,
        app_name: Some(PRODUCT_NAME),
    };
    // Application Error / General Error: what the agent reports about itself (losses,
    // suppressed denies, cluster problems), `count` where the notice counts something.
    let general_error = |severity_id: u32, message: String, count: Option<u64>, unmapped| {
        let mut event = header(
            context,
            APPLICATION_ERROR,
            (1, "General Error"),
            severity_id,
            stamp(),
            vec!["host"],
        );
        event.message = message;
        event.count = count;
        event.unmapped = Unmapped::Notice(unmapped);
        event
    };
    let workload_entity = |workload: &'a str, identity: Option<u32>| ManagedEntity {
        uid: identity.map(|i| i.to_string()),
        name: Some(workload),
        type_id: 99,
        kind: "Workload",
        policy: None,
        data: None,
    };
    match notice {
        Notice::EventsLost { count, total, .. } => general_error(
            4,
            format!(
                "{count} events lost: the kernel's ring buffer was full ({total} since the maps were created)"
            ),
            Some(*count),
            json!({ "count": count, "total": total }),
        ),
        Notice::FlowEventsLost { count, total, .. } => general_error(
            4,
            format!(
                "{count} flow events lost: the kernel's flow ring buffer was full ({total} since the maps were created)"
            ),
            Some(*count),
            json!({ "count": count, "total": total }),
        ),
        Notice::EventsSuppressed {
            workload,
            tenant,
            identity,
            destination,
            hook,
            verdict,
            reason,
            count,
            ..
        } => {
            // Not an error of the agent's: the workload's distinct denied destinations went
            // beyond its per-window budget (a sweep of addresses or ports), so its denies
            // were counted, not listed. Medium: worth a look, as the denies themselves.
            general_error(
                3,
                format!(
                    "{count} {verdict} events of {workload}{} ({hook}, {reason}) suppressed: more distinct destinations in one window than its budget",
                    destination.as_deref().map(|d| format!(" to {d}")).unwrap_or_default()
                ),
                Some(*count),
                json!({
                "workload": workload,
                "tenant": tenant,
                "identity": identity,
                "destination": destination,
                "hook": hook,
                "verdict": verdict,
                "reason": reason,
                "count": count,
                }),
            )
        }
        Notice::FlowEventsSuppressed {
            workload,
            tenant,
            identity,
            opened,
            closed,
            ..
        } => {
            // As `events.suppressed`: the workload made more tracked flows in one window than
            // its budget, so they were counted, not listed.
            general_error(
                3,
                format!(
                    "{opened} flow.opened and {closed} flow.closed events of {workload} suppressed: more tracked flows in one window than its budget"
                ),
                Some(opened + closed),
                json!({
                "workload": workload,
                "tenant": tenant,
                "identity": identity,
                "opened": opened,
                "closed": closed,
                }),
            )
        }
        Notice::ClusterProblem { problem, .. } => {
            general_error(3, problem.clone(), None, json!({ "problem": problem }))
        }
        Notice::PolicyApplied {
            snapshot, allows, ..
        } => {
            let mut event = header(
                context,
                ENTITY_MANAGEMENT,
                (3, "Update"),
                1,
                stamp(),
                vec!["host"],
            );
            event.message = format!("policy {snapshot} applied ({allows} allowed cells)");
            event.status_id = Some(1);
            event.status = Some("Success");
            event.actor = Some(app);
            event.entity = Some(ManagedEntity {
                uid: Some(snapshot.clone()),
                name: None,
                type_id: 5,
                kind: "Policy",
                policy: Some(Policy {
                    uid: Some(snapshot),
                    kind: "cedar bundle",
                    version: Some(snapshot),
                    is_applied: true,
                    ..Policy::default()
                }),
                data: None,
            });
            event.unmapped =
                Unmapped::Notice(json!({ "policy_snapshot": snapshot, "allows": allows }));
            event
        }
        Notice::PolicyRejected {
            policies,
            errors,
            snapshot_in_force,
            ..
        } => {
            let mut event = header(
                context,
                ENTITY_MANAGEMENT,
                (3, "Update"),
                3,
                stamp(),
                vec!["host"],
            );
            event.message = format!(
                "the policy in {policies} was rejected ({} error lines); {snapshot_in_force} stays in force",
                errors.len()
            );
            event.status_id = Some(2);
            event.status = Some("Failure");
            event.status_detail = errors.first().map(String::as_str);
            event.actor = Some(app);
            event.entity = Some(ManagedEntity {
                uid: None,
                name: Some(policies),
                type_id: 5,
                kind: "Policy",
                policy: Some(Policy {
                    name: Some(policies),
                    kind: "cedar bundle",
                    is_applied: false,
                    ..Policy::default()
                }),
                data: None,
            });
            event.unmapped = Unmapped::Notice(json!({
                "policies": policies,
                "errors": errors,
                "snapshot_in_force": snapshot_in_force,
            }));
            event
        }
        Notice::Quarantined {
            workload,
            identity,
            cause,
            ..
        } => {
            let mut event = header(
                context,
                ENTITY_MANAGEMENT,
                (12, "Suspend"),
                4,
                stamp(),
                vec!["security_control", "host"],
            );
            event.message =
                format!("{workload} quarantined ({cause}): every further connection is denied");
            event.status_id = Some(1);
            event.status = Some("Success");
            event.action_id = Some(2);
            event.action = Some("Denied");
            event.disposition_id = Some(4);
            event.disposition = Some("Isolated");
            event.is_alert = Some(true);
            event.actor = Some(app);
            event.entity = Some(workload_entity(workload, Some(*identity)));
            event.comment = Some(if cause == "manual" {
                "quarantined by hand (enforcer quarantine add)".to_string()
            } else {
                format!("a call denied by the @quarantine policy {cause}")
            });
            if cause != "manual" {
                event.firewall_rule = Some(FirewallRule {
                    uid: cause,
                    name: cause,
                    kind: "cedar",
                    version: None,
                });
            }
            event.unmapped = Unmapped::Notice(json!({ "identity": identity, "cause": cause }));
            event
        }
        Notice::Released {
            workload, identity, ..
        } => {
            let mut event = header(
                context,
                ENTITY_MANAGEMENT,
                (13, "Resume"),
                1,
                stamp(),
                vec!["host"],
            );
            event.message = format!("{workload} released from quarantine");
            event.status_id = Some(1);
            event.status = Some("Success");
            event.actor = Some(app);
            event.entity = Some(workload_entity(workload, Some(*identity)));
            event.unmapped = Unmapped::Notice(json!({ "identity": identity }));
            event
        }
        Notice::RiskChanged {
            workload,
            score,
            added,
            removed,
            elapsed_ms,
            ..
        } => {
            let mut event = header(
                context,
                ENTITY_MANAGEMENT,
                (3, "Update"),
                1,
                stamp(),
                vec!["host"],
            );
            event.message = format!(
                "{workload}: risk {score}; {added} cells now allowed, {removed} now denied"
            );
            event.status_id = Some(1);
            event.status = Some("Success");
            event.actor = Some(app);
            let mut entity = workload_entity(workload, None);
            entity.data = Some(json!({ "risk": score }));
            event.entity = Some(entity);
            event.unmapped = Unmapped::Notice(json!({
                "score": score,
                "added": added,
                "removed": removed,
                "elapsed_ms": elapsed_ms,
            }));
            event
        }
    }
}

//! The SOC contract: one JSON object per denied (or audited) call, enriched from the compiled
//! policy that was in force. Field names are stable; see DESIGN.md "Events".

use std::path::Path;
use std::time::{Duration, SystemTime};

use enforcer_common::{hook, identity, reason, verdict, DenyEvent};
use enforcer_policy::{AtlasTechnique, Compiled, IdentityKind, Protocol};
use serde::Serialize;

use super::decode::{
    comm, destination_ip, hook_name, peer_ip, reason_name, socket_protocol_name, socket_type_name,
    verdict_name,
};

/// A wall-clock instant, written as RFC 3339 with nanoseconds (`2026-11-25T16:00:00.123456789Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time(pub SystemTime);

impl Time {
    /// Milliseconds since the Unix epoch (OCSF's `timestamp_t`).
    pub fn epoch_millis(&self) -> i64 {
        match self.0.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => after.as_millis() as i64,
            Err(before) => -(before.duration().as_millis() as i64),
        }
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_nanos(self.0))
    }
}

#[derive(Debug, Serialize)]
pub struct DeniedCall {
    pub time: Time,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub hook: &'static str,
    /// How many denies this line stands for: 1, or N > 1 for the summary of N repeated denies
    /// of one key that the kernel counted within an aggregation window instead of reporting
    /// each (`--events-aggregate`; the time is then when the agent read the count).
    pub count: u32,
    pub subject: Subject,
    /// `null` for `sock_create` events: a socket refused at creation has no destination yet.
    pub destination: Option<Destination>,
    /// `sock_create` events only: the refused socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketInfo>,
    /// `ingress` events only: where the refused SYN came from (the subject is the identity it
    /// claimed, or the IP cache's identity of this address when it carried no option). A
    /// `bad_tag` claim is forged or unverifiable, and a `missing_tag` SYN's source address
    /// is whatever its sender wrote: for both only the subject's number is given, never a
    /// workload's name or tenant (a `missing_tag` address's owner is [`Peer::workload`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    pub policy: PolicyInfo,
    pub atlas: Vec<AtlasTechnique>,
    pub subject_chain: Vec<String>,
    pub dataset_scope: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Subject {
    pub identity: u32,
    pub workload: Option<String>,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    pub spiffe_id: Option<String>,
    pub cgroup_id: u64,
    /// Where that cgroup sits (path, pod, container), when the agent could confirm it
    /// ([`super::cgroup::Resolver`]); left out otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::sync::Arc<super::cgroup::CgroupContext>>,
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Serialize)]
pub struct Destination {
    pub ip: String,
    pub port: u16,
    pub protocol: String,
    pub identity: u32,
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub kind: Option<String>,
    /// `ingress` events only: the listening socket's cgroup on this node (the subject is
    /// remote, so its `cgroup_id` is 0 there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Where that cgroup sits, as [`Subject::cgroup`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::sync::Arc<super::cgroup::CgroupContext>>,
}

/// The remote end of an `ingress` event.
#[derive(Debug, Serialize)]
pub struct Peer {
    pub ip: String,
    pub port: u16,
    /// `missing_tag` only: the workload the IP cache gives this address. Unauthenticated
    /// (anyone who can send a packet can write a SYN's source address), so it says whose
    /// address was used, not who used it; never the subject, never routed to its tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// The socket a `sock_create` event refused: `{"family":"ipv4","type":"dgram","protocol":"icmp"}`
/// (type and protocol by name where they have one, else their number as a string).
#[derive(Debug, Serialize)]
pub struct SocketInfo {
    pub family: &'static str,
    #[serde(rename = "type")]
    pub kind: String,
    pub protocol: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyInfo {
    /// The determining Cedar policy (its `@id`), or `implicit-deny`, `undeclared-port`,
    /// `unknown-subject`, `quarantine`, `unspecified-destination`, `unsupported-socket`,
    /// `rate-limit`.
    pub id: String,
    /// Revision of the bundle in force when the event was enriched.
    pub snapshot: String,
    /// Every determining policy with its source location, `file:line`, the file relative to
    /// the bundle directory (`baseline.cedar:10`).
    pub sources: Vec<String>,
}

/// A destination's `kind` in events: its endpoint kind (`vector_db`...) or what it is.
pub fn destination_kind(i: &enforcer_policy::Identity) -> String {
    match i.kind {
        // A pod marked as what it serves (`ai-enforcer.io/kind`) is named by that kind, as
        // an inventory endpoint is.
        IdentityKind::Workload => i
            .endpoint_kind
            .clone()
            .unwrap_or_else(|| "workload".to_string()),
        IdentityKind::World => "world".to_string(),
        IdentityKind::Node => "node".to_string(),
        IdentityKind::Service => "service".to_string(),
        IdentityKind::Unidentified => "unidentified".to_string(),
        IdentityKind::Endpoint => i
            .endpoint_kind
            .clone()
            .unwrap_or_else(|| "endpoint".to_string()),
    }
}

/// Converts kernel monotonic timestamps to wall-clock time.
pub fn wall_clock(monotonic_ns: u64) -> SystemTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let mono_now = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let age = Duration::from_nanos(mono_now.saturating_sub(monotonic_ns));
    SystemTime::now() - age
}

/// The shipped ATLAS data's entries for `ids` (all of them exist: checked by a test).
fn atlas_ids(ids: &[&str]) -> Vec<AtlasTechnique> {
    ids.iter()
        .filter_map(|id| enforcer_policy::atlas::lookup(id))
        .collect()
}

pub fn enrich(event: &DenyEvent, compiled: &Compiled) -> DeniedCall {
    let ingress = event.hook == hook::INGRESS;
    // A `bad_tag` claim is whatever the SYN's bytes say, and a `missing_tag` subject is
    // whatever address the SYN says it came from: both forgeable by anyone who can send
    // one. Naming the workload would let a forger write events (and route them to a
    // tenant's feed) that accuse any workload it likes.
    // A `foreign_address` SYN's subject is its source address's identity too.
    let by_address = event.reason == reason::MISSING_TAG || event.reason == reason::FOREIGN_ADDRESS;
    let unauthenticated = ingress && (event.reason == reason::BAD_TAG || by_address);
    let named = compiled
        .identity(event.subject)
        .filter(|_| event.subject != identity::UNKNOWN);
    let subject_identity = named.filter(|_| !unauthenticated);
    let destination_identity = compiled.identity(event.destination);
    let protocol = Protocol::from_number(event.protocol)
        .map(|p| p.to_string())
        .unwrap_or_else(|| event.protocol.to_string());

    let (policy_id, sources, atlas) = match event.reason {
        reason::UNKNOWN_SUBJECT => (
            "unknown-subject".to_string(),
            Vec::new(),
            compiled.unknown_subject_atlas().to_vec(),
        ),
        reason::QUARANTINED => ("quarantine".to_string(), Vec::new(), Vec::new()),
        // Refused by the kernel itself, before any policy: no Cedar policy decided these.
        reason::UNSPECIFIED_DESTINATION => (
            "unspecified-destination".to_string(),
            Vec::new(),
            Vec::new(),
        ),
        reason::UNSUPPORTED_SOCKET => ("unsupported-socket".to_string(), Vec::new(), Vec::new()),
        // The kernel's own refusal: the flow could not be recorded, so it is not allowed.
        reason::FLOW_TABLE_FULL => ("flow-table-full".to_string(), Vec::new(), Vec::new()),
        // Allowed by policy, over the subject's connection budget to this destination (the
        // endpoint's `rate_limit`): a flood of cheap calls, ATLAS "Excessive Queries".
        reason::RATE_LIMITED => (
            "rate-limit".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0034.000"]),
        ),
        // The merge refused to identify the address: no Cedar policy can open it.
        reason::UNIDENTIFIED_DESTINATION => (
            "unidentified-destination".to_string(),
            Vec::new(),
            Vec::new(),
        ),
        // Ingress: a cluster peer that came around every enforcer (no option), or a forged
        // option. Not Cedar's doing: the kernel's own check. A claimed identity outside the
        // allowlist (`not_allowed`) is Cedar's deny and falls through to its attribution.
        reason::MISSING_TAG => (
            "identity-tag-missing".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0085.000"]),
        ),
        reason::BAD_TAG => (
            "identity-tag-invalid".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0073", "AML.T0085.000"]),
        ),
        // A genuine option replayed (or from a node whose clock is off, or an old release's
        // untimed option): the same impersonation attempt as a forged one.
        reason::STALE_TAG => (
            "identity-tag-stale".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0073", "AML.T0085.000"]),
        ),
        // A fresh, genuine option that a connection accepted here already used: a copy.
        reason::REPLAYED_TAG => (
            "identity-tag-replayed".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0073", "AML.T0085.000"]),
        ),
        // A packet to loopback leaving the namespace through a device: the kernel's own
        // rule, the localhost-reaching trick of CVE-2020-8558. (A packet the pod's netfilter
        // sent elsewhere is judged by the policy, `egress` with its reasons: attributed
        // below like any call.)
        reason::MARTIAN_DESTINATION => ("martian-destination".to_string(), Vec::new(), Vec::new()),
        // An address of another identity bound, used as a datagram's source, or answered by
        // a wildcard listener of another cgroup: the kernel's own rule, an impersonation.
        reason::FOREIGN_ADDRESS => (
            "foreign-address".to_string(),
            Vec::new(),
            atlas_ids(&["AML.T0073"]),
        ),
        // A claim that is no workload here (WORLD, an identity this node does not know): no
        // permit names it, so it is the implicit deny, not an unknown local cgroup. A remote
        // pod's claim is a workload and falls through: the ingress column has its answer.
        reason::NOT_ALLOWED
            if event.hook == hook::INGRESS
                && compiled
                    .identity(event.subject)
                    .is_none_or(|i| i.kind != enforcer_policy::IdentityKind::Workload) =>
        {
            (
                "implicit-deny".to_string(),
                Vec::new(),
                compiled.implicit_deny_atlas().to_vec(),
            )
        }
        _ => {
            let attribution = compiled.attribute(
                event.subject,
                event.destination,
                event.dport,
                event.protocol,
            );
            let sources = attribution
                .policies
                .iter()
                // A bundle is one flat directory: the file name is the path in the bundle.
                .map(|p| {
                    let file = p.file.file_name().unwrap_or(p.file.as_os_str());
                    format!("{}:{}", Path::new(file).display(), p.line)
                })
                .collect();
            (attribution.policy_id, sources, attribution.atlas)
        }
    };

    DeniedCall {
        time: Time(wall_clock(event.timestamp_ns)),
        kind: if event.verdict == verdict::AUDIT {
            "connection.audited"
        } else {
            "connection.denied"
        },
        verdict: verdict_name(event.verdict),
        reason: reason_name(event.reason),
        hook: hook_name(event.hook),
        count: event.count,
        subject: Subject {
            identity: event.subject,
            workload: subject_identity.map(|i| i.name.clone()),
            tenant: subject_identity.and_then(|i| i.tenant.clone()),
            purpose: subject_identity.and_then(|i| i.purpose.clone()),
            ring: subject_identity.and_then(|i| i.ring.clone()),
            spiffe_id: subject_identity.and_then(|i| i.spiffe_id.clone()),
            // An ingress event's cgroup is the listener's: the destination's, not the peer's.
            cgroup_id: if ingress { 0 } else { event.cgroup_id },
            cgroup: None,
            pid: (event.pid_tgid >> 32) as u32,
            comm: comm(event),
        },
        peer: ingress.then(|| Peer {
            ip: peer_ip(event).to_string(),
            port: event.sock_type,
            workload: named.filter(|_| by_address).map(|i| i.name.clone()),
        }),
        socket: (event.hook == hook::SOCK_CREATE).then(|| SocketInfo {
            family: if event.family == 6 { "ipv6" } else { "ipv4" },
            kind: socket_type_name(event.sock_type),
            protocol: socket_protocol_name(event.sock_protocol),
        }),
        destination: (event.hook != hook::SOCK_CREATE).then(|| Destination {
            ip: destination_ip(event).to_string(),
            port: event.dport,
            protocol,
            identity: event.destination,
            name: destination_identity.map(|i| i.name.clone()),
            tenant: destination_identity.and_then(|i| i.tenant.clone()),
            kind: destination_identity.map(destination_kind),
            cgroup_id: ingress.then_some(event.cgroup_id),
            cgroup: None,
        }),
        policy: PolicyInfo {
            id: policy_id,
            snapshot: compiled.revision().to_string(),
            sources,
        },
        atlas,
        subject_chain: subject_identity
            .and_then(|i| i.spiffe_id.clone())
            .into_iter()
            .collect(),
        dataset_scope: destination_identity
            .map(|i| i.datasets.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod ingress_tests {
    use super::*;

    #[test]
    fn ingress_refusals_name_their_atlas_techniques() {
        // `atlas_ids` skips unknown IDs: both must exist in the shipped ATLAS data.
        assert_eq!(atlas_ids(&["AML.T0085.000"]).len(), 1);
        assert_eq!(atlas_ids(&["AML.T0073", "AML.T0085.000"]).len(), 2);
        assert_eq!(atlas_ids(&["AML.T0073"])[0].name, "Impersonation");
        // The rate limit's technique.
        assert_eq!(atlas_ids(&["AML.T0034.000"])[0].name, "Excessive Queries");
    }
}

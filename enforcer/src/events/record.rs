//! The SOC contract: one JSON object per denied (or audited) call, enriched from the compiled
//! policy that was in force. Field names are stable; see DESIGN.md "Events".

use std::path::Path;
use std::sync::{Arc, Weak};
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

/// One denied (or audited) call: what this call alone has (when, how often, which process)
/// and the [`CallFacts`] it shares with every call of its key (subject, destination, port,
/// reason, policy...), which a flood repeats by the million. Reads of the facts go through
/// `Deref` (`call.subject.tenant`); a change goes through [`DeniedCall::facts_mut`].
///
/// Its JSON form (README, "Events") is written by [`Serialize`] below: `time`, `type`,
/// `verdict`, `reason`, `hook`, `count`, `subject` (the facts' [`Caller`] with `pid` and
/// `comm`), then the facts' `destination` .. `dataset_scope`.
#[derive(Debug, Clone)]
pub struct DeniedCall {
    pub time: Time,
    /// How many denies this line stands for: 1, or N > 1 for the summary of N repeated denies
    /// of one key that the kernel counted within an aggregation window instead of reporting
    /// each (`--events-aggregate`; the time is then when the agent read the count).
    pub count: u32,
    /// The calling process (its thread group ID; 0 for `ingress`, where no task of this
    /// node called) and its command name (`comm`, at most 15 bytes, lossily UTF-8).
    pub pid: u32,
    pub comm: String,
    pub facts: Arc<CallFacts>,
}

impl std::ops::Deref for DeniedCall {
    type Target = CallFacts;

    fn deref(&self) -> &CallFacts {
        &self.facts
    }
}

impl DeniedCall {
    /// The facts of this call alone, to change: copied first where other calls share them,
    /// and without the line templates made from them before the change.
    pub fn facts_mut(&mut self) -> &mut CallFacts {
        let facts = Arc::make_mut(&mut self.facts);
        facts.templates = super::template::Templates::default();
        facts
    }
}

impl Serialize for DeniedCall {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let f = &*self.facts;
        let mut s = serializer.serialize_struct("DeniedCall", 15)?;
        s.serialize_field("time", &self.time)?;
        s.serialize_field("type", f.kind)?;
        s.serialize_field("verdict", f.verdict)?;
        s.serialize_field("reason", f.reason)?;
        s.serialize_field("hook", f.hook)?;
        s.serialize_field("count", &self.count)?;
        s.serialize_field(
            "subject",
            &CallerAt {
                caller: &f.subject,
                pid: self.pid,
                comm: &self.comm,
            },
        )?;
        s.serialize_field("destination", &f.destination)?;
        match &f.socket {
            Some(socket) => s.serialize_field("socket", socket)?,
            None => s.skip_field("socket")?,
        }
        match &f.peer {
            Some(peer) => s.serialize_field("peer", peer)?,
            None => s.skip_field("peer")?,
        }
        s.serialize_field("policy", &f.policy)?;
        s.serialize_field("atlas", &f.atlas)?;
        s.serialize_field("subject_chain", &f.subject_chain)?;
        s.serialize_field("dataset_scope", &f.dataset_scope)?;
        s.end()
    }
}

/// What every call of one key has alike: everything of a [`DeniedCall`] but its time, count
/// and process. Built once per key by [`CallFacts::of`] (the enrichment proper: names from
/// the compiled policy, the determining policies, ATLAS) and shared, as are the lines
/// templates made from them ([`super::template`]).
#[derive(Debug, Clone)]
pub struct CallFacts {
    /// `connection.denied` or `connection.audited`.
    pub kind: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub hook: &'static str,
    pub subject: Caller,
    /// `null` for `sock_create` events: a socket refused at creation has no destination yet.
    pub destination: Option<Destination>,
    /// `sock_create` events only (left out of the line otherwise): the refused socket.
    pub socket: Option<SocketInfo>,
    /// `ingress` events only: where the refused SYN came from (the subject is the identity it
    /// claimed, or the IP cache's identity of this address when it carried no option). A
    /// `bad_tag` claim is forged or unverifiable, and a `missing_tag` SYN's source address
    /// is whatever its sender wrote: for both only the subject's number is given, never a
    /// workload's name or tenant (a `missing_tag` address's owner is [`Peer::workload`]).
    /// Left out of the line when `None`.
    pub peer: Option<Peer>,
    pub policy: PolicyInfo,
    pub atlas: Vec<AtlasTechnique>,
    pub subject_chain: Vec<String>,
    pub dataset_scope: Vec<String>,
    /// The `@quarantine` forbid among the determining policies (its `@id`), if one is: what
    /// [`Compiled::quarantine_on_deny`] gives for this call. Not in the line; the agent
    /// quarantines the subject for it.
    pub quarantine: Option<String>,
    /// This key's lines with holes for what each call has alone, one per format, made on
    /// the second use (a key used once costs no template).
    pub(super) templates: super::template::Templates,
}

/// A subject as the policy knows it, without its process (a call's is the call's own:
/// [`DeniedCall::pid`], [`DeniedCall::comm`]; a flow's is in its [`Subject`]).
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: u32,
    pub workload: Option<String>,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    pub spiffe_id: Option<String>,
    pub cgroup_id: u64,
    /// Where that cgroup sits (path, pod, container), when the agent could confirm it
    /// ([`super::cgroup::Resolver`]); left out of the line otherwise.
    pub cgroup: Option<Arc<super::cgroup::CgroupContext>>,
}

impl Caller {
    /// Identity number `identity`, named by `named` (left unnamed without), in `cgroup_id`;
    /// its cgroup's context is the agent's to add.
    pub fn of(identity: u32, named: Option<&enforcer_policy::Identity>, cgroup_id: u64) -> Caller {
        Caller {
            identity,
            workload: named.map(|i| i.name.clone()),
            tenant: named.and_then(|i| i.tenant.clone()),
            purpose: named.and_then(|i| i.purpose.clone()),
            ring: named.and_then(|i| i.ring.clone()),
            spiffe_id: named.and_then(|i| i.spiffe_id.clone()),
            cgroup_id,
            cgroup: None,
        }
    }
}

/// A [`Caller`] with its process: serialised as a [`Subject`] is.
struct CallerAt<'a> {
    caller: &'a Caller,
    pid: u32,
    comm: &'a str,
}

impl Serialize for CallerAt<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let c = self.caller;
        let mut s = serializer.serialize_struct("Subject", 10)?;
        s.serialize_field("identity", &c.identity)?;
        s.serialize_field("workload", &c.workload)?;
        s.serialize_field("tenant", &c.tenant)?;
        s.serialize_field("purpose", &c.purpose)?;
        s.serialize_field("ring", &c.ring)?;
        s.serialize_field("spiffe_id", &c.spiffe_id)?;
        s.serialize_field("cgroup_id", &c.cgroup_id)?;
        match &c.cgroup {
            Some(cgroup) => s.serialize_field("cgroup", cgroup)?,
            None => s.skip_field("cgroup")?,
        }
        s.serialize_field("pid", &self.pid)?;
        s.serialize_field("comm", self.comm)?;
        s.end()
    }
}

/// A flow's subject (`flow.*` events): a [`Caller`] with its process, serialised as a call's
/// subject is (the caller's fields, then `pid` and `comm`). Reads of the caller's fields go
/// through `Deref` (`subject.tenant`).
#[derive(Debug)]
pub struct Subject {
    pub caller: Caller,
    pub pid: u32,
    pub comm: String,
}

impl std::ops::Deref for Subject {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.caller
    }
}

impl Serialize for Subject {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CallerAt {
            caller: &self.caller,
            pid: self.pid,
            comm: &self.comm,
        }
        .serialize(serializer)
    }
}

#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct SocketInfo {
    pub family: &'static str,
    #[serde(rename = "type")]
    pub kind: String,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    /// The determining Cedar policy (its `@id`), or `implicit-deny`, `undeclared-port`,
    /// `unknown-subject`, `quarantine`, `unspecified-destination`, `unsupported-socket`,
    /// `rate-limit`, and for a Service `no-ready-backends` or `foreign-step-up-backend`.
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
    let (monotonic_now, now) = clocks();
    let age = Duration::from_nanos(monotonic_now.saturating_sub(monotonic_ns));
    now - age
}

/// CLOCK_MONOTONIC nanoseconds and the wall clock, read one after the other.
fn clocks() -> (u64, SystemTime) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let monotonic = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    (monotonic, SystemTime::now())
}

/// [`wall_clock`] for a stream of timestamps: both clocks are read again only when a
/// timestamp is more than [`WallClock::REREAD`] away from their last reading, so the calls
/// of a flood cost no clock reads each. A step of the wall clock shows within that time;
/// between readings the wall clock's slew (at most 500 ppm) moves it by 50 us at most.
#[derive(Debug, Default)]
struct WallClock {
    /// The last reading: monotonic nanoseconds and the wall clock then.
    read: Option<(u64, SystemTime)>,
}

impl WallClock {
    const REREAD: Duration = Duration::from_millis(100);

    fn at(&mut self, monotonic_ns: u64) -> SystemTime {
        let (monotonic, wall) = match self.read {
            Some((monotonic, wall))
                if monotonic.abs_diff(monotonic_ns) <= Self::REREAD.as_nanos() as u64 =>
            {
                (monotonic, wall)
            }
            _ => *self.read.insert(clocks()),
        };
        if monotonic_ns >= monotonic {
            wall + Duration::from_nanos(monotonic_ns - monotonic)
        } else {
            wall - Duration::from_nanos(monotonic - monotonic_ns)
        }
    }
}

/// The shipped ATLAS data's entries for `ids` (all of them exist: checked by a test).
fn atlas_ids(ids: &[&str]) -> Vec<AtlasTechnique> {
    ids.iter()
        .filter_map(|id| enforcer_policy::atlas::lookup(id))
        .collect()
}

/// `event` enriched from `compiled`, with facts of its own (the agent shares them through
/// [`Enricher`]).
pub fn enrich(event: &DenyEvent, compiled: &Compiled) -> DeniedCall {
    DeniedCall {
        time: Time(wall_clock(event.timestamp_ns)),
        count: event.count,
        pid: (event.pid_tgid >> 32) as u32,
        comm: comm(event),
        facts: Arc::new(CallFacts::of(event, compiled)),
    }
}

impl CallFacts {
    /// What `compiled` says of the calls of `event`'s key ([`Enricher`]'s): names, the
    /// determining policies, ATLAS. Without a cgroup context (the agent adds it).
    pub fn of(event: &DenyEvent, compiled: &Compiled) -> CallFacts {
        let ingress = event.hook == hook::INGRESS;
        // A `bad_tag` claim is whatever the SYN's bytes say, and a `missing_tag` subject is
        // whatever address the SYN says it came from: both forgeable by anyone who can send
        // one. Naming the workload would let a forger write events (and route them to a
        // tenant's feed) that accuse any workload it likes.
        // A `foreign_address` SYN's subject is its source address's identity too.
        let by_address =
            event.reason == reason::MISSING_TAG || event.reason == reason::FOREIGN_ADDRESS;
        let unauthenticated = ingress && (event.reason == reason::BAD_TAG || by_address);
        let named = compiled
            .identity(event.subject)
            .filter(|_| event.subject != identity::UNKNOWN);
        let subject_identity = named.filter(|_| !unauthenticated);
        let destination_identity = compiled.identity(event.destination);
        let protocol = Protocol::from_number(event.protocol)
            .map(|p| p.to_string())
            .unwrap_or_else(|| event.protocol.to_string());

        // The `@quarantine` forbid among the determining policies: only the attribution below
        // names policies.
        let mut quarantine = None;
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
            reason::UNSUPPORTED_SOCKET => {
                ("unsupported-socket".to_string(), Vec::new(), Vec::new())
            }
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
            reason::MARTIAN_DESTINATION => {
                ("martian-destination".to_string(), Vec::new(), Vec::new())
            }
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
                quarantine = attribution
                    .policies
                    .iter()
                    .find(|p| p.quarantine)
                    .map(|p| p.id.clone());
                (attribution.policy_id, sources, attribution.atlas)
            }
        };

        CallFacts {
            kind: if event.verdict == verdict::AUDIT {
                "connection.audited"
            } else {
                "connection.denied"
            },
            verdict: verdict_name(event.verdict),
            reason: reason_name(event.reason),
            hook: hook_name(event.hook),
            // An ingress event's cgroup is the listener's: the destination's, not the peer's.
            subject: Caller::of(
                event.subject,
                subject_identity,
                if ingress { 0 } else { event.cgroup_id },
            ),
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
            quarantine,
            templates: super::template::Templates::default(),
        }
    }
}

/// What makes two denies' [`CallFacts`] the same: every field of the record but its time,
/// count and process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FactsKey {
    cgroup_id: u64,
    subject: u32,
    destination: u32,
    daddr: [u8; 16],
    peer: [u8; 16],
    policy_generation: u32,
    dport: u16,
    sock_type: u16,
    sock_protocol: u16,
    family: u8,
    protocol: u8,
    hook: u8,
    verdict: u8,
    reason: u8,
}

impl FactsKey {
    fn of(event: &DenyEvent) -> FactsKey {
        FactsKey {
            cgroup_id: event.cgroup_id,
            subject: event.subject,
            destination: event.destination,
            daddr: event.daddr,
            peer: event.peer,
            policy_generation: event.policy_generation,
            dport: event.dport,
            sock_type: event.sock_type,
            sock_protocol: event.sock_protocol,
            family: event.family,
            protocol: event.protocol,
            hook: event.hook,
            verdict: event.verdict,
            reason: event.reason,
        }
    }
}

/// Enriches denies, sharing the [`CallFacts`] of one key among its calls: a flood of one
/// workload's denied `connect()` is enriched (and its line serialised, see
/// [`super::template`]) once, not once per call.
///
/// Facts are kept for the policy they were made from (held weakly: an old revision is freed
/// as soon as the agent drops it, and its address cannot be reused while the entry lives),
/// up to [`Enricher::CAPACITY`] keys, then all are dropped and made again.
pub struct Enricher {
    /// foldhash (seeded per process): the key is partly the caller's choice (addresses,
    /// ports), and a table of at most CAPACITY keys bounds what colliding keys could cost.
    facts: foldhash::HashMap<FactsKey, (Weak<Compiled>, Arc<CallFacts>)>,
    clock: WallClock,
}

impl Default for Enricher {
    fn default() -> Self {
        Enricher::new()
    }
}

impl Enricher {
    /// Keys kept at most: a few hundred bytes each, plus their templates (about a line each).
    pub const CAPACITY: usize = 1024;

    pub fn new() -> Self {
        Enricher {
            facts: foldhash::HashMap::default(),
            clock: WallClock::default(),
        }
    }

    /// `event`, enriched from `compiled` (the policy of its generation); `cgroup` gives the
    /// context of its cgroup (`ingress`: the listener's, as the destination's; else the
    /// subject's), asked again for each call until it gives one.
    pub fn enrich(
        &mut self,
        event: &DenyEvent,
        compiled: &Arc<Compiled>,
        cgroup: impl FnOnce(u64, u32) -> Option<Arc<super::cgroup::CgroupContext>>,
    ) -> DeniedCall {
        let key = FactsKey::of(event);
        let pid = (event.pid_tgid >> 32) as u32;
        let ingress = event.hook == hook::INGRESS;
        let kept = self
            .facts
            .get(&key)
            .filter(|(policy, _)| Weak::as_ptr(policy) == Arc::as_ptr(compiled))
            .map(|(_, facts)| facts.clone());
        let facts = match kept {
            Some(facts) if facts.cgroup_context(ingress).is_some() => facts,
            kept => match (kept, cgroup(event.cgroup_id, if ingress { 0 } else { pid })) {
                // Still not known: asked again with the next call.
                (Some(facts), None) => facts,
                (kept, context) => {
                    let mut facts = match kept {
                        Some(facts) => CallFacts::clone(&facts),
                        None => CallFacts::of(event, compiled),
                    };
                    facts.set_cgroup_context(ingress, context);
                    let facts = Arc::new(facts);
                    if self.facts.len() >= Self::CAPACITY {
                        self.facts.clear();
                    }
                    self.facts
                        .insert(key, (Arc::downgrade(compiled), facts.clone()));
                    facts
                }
            },
        };
        DeniedCall {
            time: Time(self.clock.at(event.timestamp_ns)),
            count: event.count,
            pid,
            comm: comm(event),
            facts,
        }
    }
}

impl CallFacts {
    /// Where an `ingress` call's cgroup context goes (the listener's: the destination's),
    /// and any other's (the subject's).
    fn cgroup_context(&self, ingress: bool) -> Option<&Arc<super::cgroup::CgroupContext>> {
        match (&self.destination, ingress) {
            (Some(d), true) => d.cgroup.as_ref(),
            _ => self.subject.cgroup.as_ref(),
        }
    }

    fn set_cgroup_context(
        &mut self,
        ingress: bool,
        context: Option<Arc<super::cgroup::CgroupContext>>,
    ) {
        match (&mut self.destination, ingress) {
            (Some(d), true) => d.cgroup = context,
            _ => self.subject.cgroup = context,
        }
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

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn a_streams_wall_times_are_those_of_each_reading() {
        let mut clock = WallClock::default();
        let (monotonic, _) = clocks();
        let close = |streamed: SystemTime, stamp: u64| {
            let alone = wall_clock(stamp);
            let apart = match streamed.duration_since(alone) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            // Two readings of the clocks a few microseconds apart.
            assert!(
                apart < Duration::from_millis(5),
                "{apart:?} apart at {stamp}"
            );
        };
        close(clock.at(monotonic), monotonic);
        let first = clock.read.unwrap().0;
        // An older stamp and a newer one, within REREAD: the same reading.
        for stamp in [monotonic - 3_000_000, monotonic + 5_000] {
            close(clock.at(stamp), stamp);
            assert_eq!(clock.read.unwrap().0, first);
        }
        // One 2 s away: read again.
        let far = monotonic.saturating_sub(2_000_000_000);
        close(clock.at(far), far);
        assert_ne!(clock.read.unwrap().0, first);
    }
}

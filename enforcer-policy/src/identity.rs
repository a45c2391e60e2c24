//! Identities: the numbers the kernel knows workloads and endpoints by.
//!
//! An identity ID must survive agent restarts and inventory edits (pinned maps keep using it,
//! events name it), so it is derived from a hash of `kind/name`, not from a position in the
//! file. Collisions are resolved deterministically: names in sorted order, linear probing.
//! Inventory IDs are below 2^31; cluster identities and Services (see [`crate::cluster`] and
//! `merge`) have IDs in [`crate::cluster::CLUSTER_IDS`], hashed from their label sets.
//!
//! Tenant numbers (`IdentityInfo::tenant`, what the kernel compares for `tenant_mismatch`)
//! are hashes of the tenant names ([`crate::cluster::tenant_number`]), not positions in a
//! list: a node that reads a tenant number written by another node must find the same
//! tenant. Two tenant names that hash alike are resolved like identity collisions (names in
//! sorted order; the later probes upwards for a number no tenant prefers) and reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use enforcer_common::{flags, identity as reserved, IdentityInfo};
use sha2::{Digest, Sha256};

use crate::cluster::{ClusterOptions, ClusterState};
use crate::inventory::Inventory;
use crate::{Protocol, DEFAULT_ACTION};

/// The name of the reserved WORLD identity (every address not in the inventory).
pub const WORLD_NAME: &str = "world";
/// The name of the reserved UNIDENTIFIED identity (`enforcer_common::identity::UNIDENTIFIED`):
/// addresses of the cluster to which the merge gave no identity.
pub const UNIDENTIFIED_NAME: &str = "unidentified";
/// The name of the reserved HOST identity (`enforcer_common::identity::HOST`): this node's
/// addresses, Cedar `Node::"host"`.
pub const HOST_NAME: &str = "host";
/// The name of the reserved REMOTE_NODE identity (`enforcer_common::identity::REMOTE_NODE`):
/// the other nodes' addresses, Cedar `Node::"remote-node"`.
pub const REMOTE_NODE_NAME: &str = "remote-node";
/// Names no inventory item may take.
pub const RESERVED_NAMES: [&str; 4] = [WORLD_NAME, UNIDENTIFIED_NAME, HOST_NAME, REMOTE_NODE_NAME];

/// An IPv4 or IPv6 network: an address and a prefix length. Host bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn bits(addr: &IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u32::from(*a) as u128, 32),
            IpAddr::V6(a) => (u128::from(*a), 128),
        }
    }

    fn mask(prefix: u8, width: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            (!0u128 << (width - prefix)) & if width == 32 { 0xffff_ffff } else { !0u128 }
        }
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        let (net, width) = Self::bits(&self.addr);
        let (a, w) = Self::bits(ip);
        w == width && (a & Self::mask(self.prefix, width)) == net
    }

    /// Whether the two networks share an address (one contains the other).
    pub fn overlaps(&self, other: &IpNet) -> bool {
        let (a, wa) = Self::bits(&self.addr);
        let (b, wb) = Self::bits(&other.addr);
        if wa != wb {
            return false;
        }
        let mask = Self::mask(self.prefix.min(other.prefix), wa);
        a & mask == b & mask
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| "not an IP address".to_string())?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= width => p,
                _ => return Err(format!("prefix must be 0..={width}")),
            },
        };
        let net = IpNet { addr, prefix };
        let (bits, _) = Self::bits(&addr);
        if bits & !Self::mask(prefix, width) & if width == 32 { 0xffff_ffff } else { !0 } != 0 {
            return Err("host bits are set after the prefix".into());
        }
        Ok(net)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// From the text [`FromStr`] reads (`10.244.0.0/16`, `fd00::/48`, a bare address).
impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("network {text:?}: {e}")))
    }
}

/// Validate a SPIFFE ID per the SPIFFE-ID specification: `spiffe://` (lowercase scheme), a
/// trust domain of `[a-z0-9.-_]` (at most 255 bytes, no port or user info), an optional path
/// of `/`-separated non-empty segments of `[A-Za-z0-9.-_]` that are not `.` or `..`, no
/// trailing slash, no query or fragment, and at most 2048 bytes in all.
pub fn validate_spiffe_id(id: &str) -> Result<(), String> {
    if id.len() > 2048 {
        return Err(format!("{} bytes, the limit is 2048", id.len()));
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| "must start with `spiffe://` (lowercase scheme)".to_string())?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > 255 {
        return Err("the trust domain is longer than 255 bytes".into());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "the trust domain may contain only lowercase letters, digits, `.`, `-` and `_`, found `{c}`"
        ));
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("the path must not end with `/`".into());
    }
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err("the path has an empty segment (`//`)".into());
        }
        if seg == "." || seg == ".." {
            return Err("the path must not contain `.` or `..` segments".into());
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(format!(
                "path segments may contain only letters, digits, `.`, `-` and `_`, found `{c}`"
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    Workload,
    Endpoint,
    World,
    /// A node of the cluster, by its addresses: `host` (this node) or `remote-node` (every
    /// other). A Cedar `Node` with no attributes; never a principal (its processes are no
    /// workload's).
    Node,
    /// A Kubernetes Service's ClusterIPs: judged as its ready backends, never asked of Cedar
    /// as itself (it is no Cedar entity).
    Service,
    /// Addresses of the cluster that no identity holds (a refused pod, a contested address,
    /// a Service over its tenant's quota): never a Cedar entity, never allowed. Unlike
    /// WORLD, no policy can open it.
    Unidentified,
}

impl IdentityKind {
    /// The Cedar entity type of this kind.
    pub fn cedar_type(self) -> &'static str {
        match self {
            IdentityKind::Workload => "Workload",
            IdentityKind::Endpoint => "Endpoint",
            IdentityKind::World => "World",
            IdentityKind::Node => "Node",
            // Not in the schema: no policy can name these (see the variants).
            IdentityKind::Service => "Service",
            IdentityKind::Unidentified => "Unidentified",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityKind::Workload => "workload",
            IdentityKind::Endpoint => "endpoint",
            IdentityKind::World => "world",
            IdentityKind::Node => "node",
            IdentityKind::Service => "service",
            IdentityKind::Unidentified => "unidentified",
        })
    }
}

/// One identity: a workload (from the inventory or the cluster), an endpoint, a Service, or
/// WORLD.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub id: u32,
    pub name: String,
    pub kind: IdentityKind,
    pub tenant: Option<String>,
    pub tenant_id: u32,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    pub spiffe_id: Option<String>,
    pub endpoint_kind: Option<String>,
    pub datasets: Vec<String>,
    /// An endpoint's `step_up` (see [`crate::inventory::StepUp`]).
    pub step_up: Option<crate::inventory::StepUp>,
    /// A Service in front of another tenant's tracked backend that has a step-up: that
    /// backend's name. Every call through the Service is denied (`foreign-step-up-backend`),
    /// see `services_track_their_backends`. `None` for every other identity.
    pub fronts_foreign_step_up: Option<String>,
    /// A Service without a tenant in a system namespace (its identities all tenantless
    /// workloads): the operator's, as the inventory's tenantless items are. A tenantless
    /// Service of another namespace is no one's (review 49 L2). False for every other
    /// identity.
    pub operator_service: bool,
    /// An endpoint's `rate_limit`, a pod's `ai-enforcer.io/rate-limit` (see [`crate::rate`]).
    pub rate_limit: Option<crate::rate::RateLimitSpec>,
    pub cgroups: Vec<String>,
    pub ips: Vec<IpNet>,
    /// Cedar decimal text; "0.0" when not set.
    pub risk: String,
    /// `enforcer_common::flags::*` (never QUARANTINED: that is runtime state of the agent).
    pub flags: u32,
    /// Declared ports; empty means any port with action `connect`. A Service's are its
    /// ports (their action is its backends', see [`Identity::service_ports`]).
    #[serde(skip)]
    pub ports: Vec<crate::inventory::Port>,
    /// A cluster identity's pods on this node (`ClusterOptions::node_name`), by UID, sorted:
    /// the agent maps their cgroups to this identity. Empty for every other identity.
    pub pod_uids: Vec<String>,
    /// A cluster identity's canonical label set (its number is their hash). Empty for every
    /// other identity.
    pub labels: BTreeMap<String, String>,
    /// A Service's ports with their ready backends (sorted by address and port): each port
    /// is judged as all its backends. Empty for every other identity.
    #[serde(skip)]
    pub service_ports: Vec<crate::cluster::ServicePort>,
}

impl Identity {
    /// The kernel's `IDENTITIES` value.
    pub fn info(&self) -> IdentityInfo {
        use enforcer_common::flags;
        let address_flags = match self.kind {
            IdentityKind::Service => flags::SERVICE,
            IdentityKind::Workload if self.is_cluster() => flags::OWN_NETNS | flags::WORKLOAD,
            IdentityKind::Workload => flags::WORKLOAD,
            _ => 0,
        };
        IdentityInfo::new(self.tenant_id, self.flags | address_flags)
    }

    /// What a contact with this destination reaches, as the learner (`--learn`) names it:
    /// its `datasets`; `endpoint:<name>` for one that declares none; a pod's datasets, its
    /// tenant's word (`ai-enforcer.io/datasets`), as `<tenant>/<dataset>`, so that a tenant
    /// cannot pre-learn (or burn as reported) the names of datasets an operator declared on a
    /// protected endpoint by declaring them on its own pod. A Service's are its tracked
    /// backends' names already (see `services_track_their_backends`): through its own
    /// Service a tenant's pod still names its datasets as its own (red-team review 43).
    pub fn contact_names(&self) -> Vec<String> {
        if self.datasets.is_empty() {
            vec![format!("endpoint:{}", self.name)]
        } else if self.kind == IdentityKind::Workload {
            let tenant = self.tenant.as_deref().unwrap_or("-");
            self.datasets
                .iter()
                .map(|d| format!("{tenant}/{d}"))
                .collect()
        } else {
            self.datasets.clone()
        }
    }

    /// A local subject: the agent maps its cgroups (or its local pods' cgroups) to this
    /// identity.
    pub fn is_subject(&self) -> bool {
        self.kind == IdentityKind::Workload
            && !(self.cgroups.is_empty() && self.pod_uids.is_empty())
    }

    /// An identity from the cluster (a label set or a Service), not from the inventory.
    pub fn is_cluster(&self) -> bool {
        crate::cluster::CLUSTER_IDS.contains(&self.id)
    }

    /// The cell a call to `port`/`protocol` falls in, as Cedar is asked about it: (port,
    /// action). A destination without declared ports takes every port with the default
    /// action; `None` for a port a destination with ports does not declare (denied).
    pub(crate) fn cell_of(&self, port: u16, protocol: Protocol) -> Option<(u16, &str)> {
        if self.ports.is_empty() {
            // Any port, asked as itself (policies may read `context.port`, see `ports`).
            return Some((port, DEFAULT_ACTION));
        }
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
            .map(|p| (port, p.action.as_str()))
    }

    /// Reachable: WORLD, every endpoint, every workload, node and Service with addresses, and a
    /// workload whose servers share this node's network namespace (`flags::SHARED_NETNS`:
    /// reached through addresses nobody holds). Never UNIDENTIFIED: no policy cell is
    /// compiled or asked for it.
    pub fn is_destination(&self) -> bool {
        match self.kind {
            IdentityKind::World | IdentityKind::Endpoint => true,
            IdentityKind::Workload => {
                !self.ips.is_empty() || self.flags & enforcer_common::flags::SHARED_NETNS != 0
            }
            IdentityKind::Service | IdentityKind::Node => !self.ips.is_empty(),
            IdentityKind::Unidentified => false,
        }
    }

    /// A Service's port `port`/`protocol`, with its backends.
    pub(crate) fn service_port(
        &self,
        port: u16,
        protocol: Protocol,
    ) -> Option<&crate::cluster::ServicePort> {
        self.service_ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
    }
}

/// All identities of an inventory and a cluster state, with the numbers of tenants.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    list: Vec<Identity>,
    by_id: HashMap<u32, usize>,
    by_name: HashMap<String, usize>,
    /// Tenant name -> number ([`crate::cluster::tenant_number`], collisions resolved; 0 is
    /// "no tenant").
    pub tenants: BTreeMap<String, u32>,
    /// Where an address leads, as the kernel's IP cache has it (longest prefix): (is IPv6,
    /// prefix, network) -> identity index. Workloads, endpoints and UNIDENTIFIED: a
    /// Service's backends are looked up here.
    nets: HashMap<(bool, u8, u128), usize>,
    /// The prefix lengths in `nets`, longest first: (IPv4, IPv6).
    lens: (Vec<u8>, Vec<u8>),
}

/// The hash-derived starting point of an identity's ID.
fn preferred_id(kind: IdentityKind, name: &str) -> u32 {
    let digest = Sha256::digest(format!("{kind}/{name}").as_bytes());
    let h = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let span = (1u32 << 31) - reserved::FIRST_DYNAMIC;
    reserved::FIRST_DYNAMIC + h % span
}

/// Tenant numbers: each name's hash, unless an earlier name (in sorted order) has it; then
/// the next number upwards that no tenant prefers. Returns the numbers and the collisions.
fn tenant_numbers<'a>(
    names: impl Iterator<Item = &'a str>,
) -> (BTreeMap<String, u32>, Vec<String>) {
    let set: BTreeSet<&str> = names.collect();
    let preferred: HashSet<u32> = set
        .iter()
        .map(|t| crate::cluster::tenant_number(t))
        .collect();
    let mut taken: HashMap<u32, &str> = HashMap::new();
    let mut numbers = BTreeMap::new();
    let mut problems = Vec::new();
    for name in set {
        let want = crate::cluster::tenant_number(name);
        let number = match taken.get(&want) {
            None => want,
            Some(first) => {
                let mut n = want;
                loop {
                    n = if n == u32::MAX { 1 } else { n + 1 };
                    if !preferred.contains(&n) && !taken.contains_key(&n) {
                        break;
                    }
                }
                problems.push(format!(
                    "tenant number collision: tenants {} and {} both hash to {want}; {} keeps it, {} takes {n} (every node with the same tenants resolves it so)",
                    crate::merge::show(first),
                    crate::merge::show(name),
                    crate::merge::show(first),
                    crate::merge::show(name),
                ));
                n
            }
        };
        taken.insert(number, name);
        numbers.insert(name.to_string(), number);
    }
    (numbers, problems)
}

/// (is IPv6, address bits, width).
fn ip_bits(ip: &IpAddr) -> (bool, u128, u8) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(*a) as u128, 32),
        IpAddr::V6(a) => (true, u128::from(*a), 128),
    }
}

/// An inventory item's networks without those a Service's external address took over.
fn without(ips: &[IpNet], taken_over: &HashSet<IpNet>) -> Vec<IpNet> {
    ips.iter()
        .filter(|n| !taken_over.contains(n))
        .copied()
        .collect()
}

fn blank(id: u32, name: String, kind: IdentityKind) -> Identity {
    Identity {
        id,
        name,
        kind,
        tenant: None,
        tenant_id: 0,
        purpose: None,
        ring: None,
        spiffe_id: None,
        endpoint_kind: None,
        datasets: vec![],
        step_up: None,
        fronts_foreign_step_up: None,
        operator_service: false,
        rate_limit: None,
        cgroups: vec![],
        ips: vec![],
        risk: "0.0".into(),
        flags: 0,
        ports: vec![],
        pod_uids: vec![],
        labels: BTreeMap::new(),
        service_ports: vec![],
    }
}

impl Identities {
    /// The identities of an inventory alone.
    pub fn allocate(inv: &Inventory) -> Identities {
        Identities::allocate_with_cluster(inv, &ClusterState::default(), &ClusterOptions::default())
            .0
    }

    /// The identities of an inventory and a cluster state (see
    /// [`crate::Bundle::load_with_cluster`] for the rules), and the problems of the merge,
    /// one line each.
    pub fn allocate_with_cluster(
        inv: &Inventory,
        cluster: &ClusterState,
        options: &ClusterOptions,
    ) -> (Identities, Vec<String>) {
        let (tenants, mut problems) = tenant_numbers(inv.tenants.iter().map(|t| t.name.as_str()));
        let known: BTreeSet<&str> = tenants.keys().map(String::as_str).collect();
        let mut taken_names: HashSet<&str> = inv
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .chain(inv.endpoints.iter().map(|e| e.name.as_str()))
            .collect();
        taken_names.extend(RESERVED_NAMES);
        let merged = crate::merge::merge(inv, &known, &taken_names, cluster, options);
        problems.extend(merged.problems);

        let tenant_audit = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| inv.tenant(t))
                .is_some_and(|t| t.audit)
        };
        let tenant_id = |t: &Option<String>| {
            t.as_ref()
                .and_then(|t| tenants.get(t))
                .copied()
                .unwrap_or(0)
        };
        let mut list = vec![
            blank(reserved::WORLD, WORLD_NAME.into(), IdentityKind::World),
            Identity {
                ips: merged.unidentified,
                ..blank(
                    reserved::UNIDENTIFIED,
                    UNIDENTIFIED_NAME.into(),
                    IdentityKind::Unidentified,
                )
            },
            Identity {
                ips: merged.host,
                ..blank(reserved::HOST, HOST_NAME.into(), IdentityKind::Node)
            },
            Identity {
                ips: merged.remote_nodes,
                ..blank(
                    reserved::REMOTE_NODE,
                    REMOTE_NODE_NAME.into(),
                    IdentityKind::Node,
                )
            },
        ];
        let first_item = list.len();
        for w in &inv.workloads {
            let audit = w.audit || tenant_audit(&w.tenant);
            list.push(Identity {
                tenant_id: tenant_id(&w.tenant),
                tenant: w.tenant.clone(),
                purpose: w.purpose.clone(),
                ring: w.ring.clone(),
                spiffe_id: w.spiffe_id.clone(),
                cgroups: w.cgroups.clone(),
                ips: without(&w.ips, &merged.taken_over),
                risk: w.risk.clone(),
                // Listed cgroups run here, in the node's namespace as far as the inventory
                // knows (it does not say otherwise).
                flags: (if audit { flags::AUDIT } else { 0 })
                    | w.ingress.flags()
                    | if w.cgroups.is_empty() {
                        0
                    } else {
                        flags::SHARED_NETNS
                    },
                ports: w.ports.clone(),
                ..blank(0, w.name.clone(), IdentityKind::Workload)
            });
        }
        for e in &inv.endpoints {
            let mut f = 0;
            if tenant_audit(&e.tenant) {
                f |= flags::AUDIT;
            }
            if e.kind == "vector_db" {
                f |= flags::VECTOR_DB | flags::TRACKED;
            }
            if e.track {
                f |= flags::TRACKED;
            }
            f |= e.ingress.flags();
            list.push(Identity {
                tenant_id: tenant_id(&e.tenant),
                tenant: e.tenant.clone(),
                endpoint_kind: Some(e.kind.clone()),
                datasets: e.datasets.clone(),
                step_up: e.step_up,
                rate_limit: e.rate_limit.clone(),
                ips: without(&e.ips, &merged.taken_over),
                flags: f,
                ports: e.ports.clone(),
                ..blank(0, e.name.clone(), IdentityKind::Endpoint)
            });
        }

        // Inventory IDs: sorted by (kind, name) so that probing order does not depend on
        // file order.
        let mut order: Vec<usize> = (first_item..list.len()).collect();
        order.sort_by(|&a, &b| (list[a].kind, &list[a].name).cmp(&(list[b].kind, &list[b].name)));
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        for i in order {
            let mut id = preferred_id(list[i].kind, &list[i].name);
            while taken.contains(&id) {
                id += 1;
                if id >= 1 << 31 {
                    id = reserved::FIRST_DYNAMIC;
                }
            }
            taken.insert(id);
            list[i].id = id;
        }

        // Cluster identities and Services: numbered and named by the merge.
        for w in merged.workloads {
            let c = w.source;
            list.push(Identity {
                tenant_id: tenant_id(&c.tenant),
                tenant: c.tenant.clone(),
                purpose: c.purpose.clone(),
                ring: c.ring.clone(),
                spiffe_id: w.spiffe_id,
                ips: w.ips,
                // The marks make a pod a tracked / checked destination exactly as the same
                // fields make an inventory endpoint one; the pod stays a Cedar Workload.
                flags: if tenant_audit(&c.tenant) {
                    flags::AUDIT
                } else {
                    0
                } | c.marks.flags()
                    | if w.host_network {
                        flags::SHARED_NETNS
                    } else {
                        0
                    },
                endpoint_kind: c.marks.kind.clone(),
                datasets: c.marks.datasets.clone(),
                rate_limit: c.marks.rate_limit.clone(),
                pod_uids: w.pod_uids,
                labels: c.labels.clone(),
                ..blank(w.id, w.name, IdentityKind::Workload)
            });
        }
        for s in merged.services {
            let ports = s
                .ports
                .iter()
                .map(|p| crate::inventory::Port {
                    port: p.port,
                    protocol: p.protocol,
                    // Not asked of Cedar: each backend is asked with its own action.
                    action: DEFAULT_ACTION.into(),
                    loc: Default::default(),
                })
                .collect();
            list.push(Identity {
                tenant_id: tenant_id(&s.tenant),
                tenant: s.tenant,
                operator_service: s.operator,
                ips: s.ips,
                ports,
                service_ports: s.ports,
                ..blank(s.id, s.name, IdentityKind::Service)
            });
        }

        let by_id = list.iter().enumerate().map(|(i, x)| (x.id, i)).collect();
        let by_name = list
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.clone(), i))
            .collect();
        let mut identities = Identities {
            list,
            by_id,
            by_name,
            tenants,
            nets: HashMap::new(),
            lens: Default::default(),
        };
        identities.index_nets();
        problems.extend(identities.foreign_step_up_problems());
        (identities, problems)
    }

    /// The networks `backend_index` looks up: those of workloads, endpoints, nodes and
    /// UNIDENTIFIED, WORLD being the fallback. A Service's own address leads to UNIDENTIFIED:
    /// kube-proxy translates once, so a backend at a Service's (external) address reaches
    /// whatever listens there, which the Service took the address from (a node, a pod): it
    /// is denied, never judged as World (a tenant's Service with `externalIPs` on a node's
    /// address and a backend at that same address reopened the kubelet to World's callers).
    fn index_nets(&mut self) {
        let mut nets = HashMap::new();
        let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
        let unidentified = self.by_id.get(&reserved::UNIDENTIFIED).copied();
        for (i, x) in self.list.iter().enumerate() {
            let i = match (x.kind, unidentified) {
                (IdentityKind::Service, Some(u)) => u,
                (IdentityKind::Service | IdentityKind::World, _) => continue,
                _ => i,
            };
            for net in &x.ips {
                let (is_v6, bits, _) = ip_bits(&net.addr);
                if is_v6 { &mut v6 } else { &mut v4 }.insert(net.prefix);
                nets.entry((is_v6, net.prefix, bits)).or_insert(i);
            }
        }
        self.nets = nets;
        self.lens = (
            v4.into_iter().rev().collect(),
            v6.into_iter().rev().collect(),
        );
        self.services_track_their_backends();
    }

    /// A Service in front of a tracked destination is tracked too, with the union of its
    /// tracked backends' datasets (as each names them to the learner,
    /// [`Identity::contact_names`]) and the longest step-up of its backends: the connect hook
    /// sees the ClusterIP, before kube-proxy translates it, so a call through the Service was
    /// otherwise no flow (no `flow.opened`, no anomaly, no revocation) to a vector DB every
    /// pod reaches by its Service's name (red-team review 39 H1). Only `TRACKED`: the
    /// identity option's tag covers the 4-tuple the caller sees, which the backend never
    /// does, so such a flow is not tagged (the kernel's `flow_marks::UNTAGGED`).
    ///
    /// A Service's owner may list any address as its backend. In front of another tenant's
    /// (or the operator's, for a Service not of a system namespace: see
    /// [`Identity::operator_service`]) backend with a step-up, neither answer is safe: taking
    /// that step-up lets the owner quarantine whoever calls its Service (review 43 M4),
    /// leaving it out lets a caller reach the protected dataset without the step-up its owner
    /// asked for (review 49 H2). Such a Service fronts nothing: it is marked
    /// ([`Identity::fronts_foreign_step_up`]) and every call through it is denied, so callers
    /// go to the endpoint directly, where its owner's step-up holds.
    ///
    /// Recomputed whenever the addresses are (a backend's identity is found by its address).
    fn services_track_their_backends(&mut self) {
        use enforcer_common::flags;
        let services: Vec<usize> = (0..self.list.len())
            .filter(|&i| self.list[i].kind == IdentityKind::Service)
            .collect();
        for i in services {
            let mut tracked = false;
            let mut datasets = BTreeSet::new();
            let mut step_up: Option<crate::inventory::StepUp> = None;
            let mut foreign = None;
            for backend in self.list[i].service_ports.iter().flat_map(|p| &p.backends) {
                let b = &self.list[self.backend_index(&backend.ip)];
                if b.flags & flags::TRACKED == 0 {
                    continue;
                }
                tracked = true;
                datasets.extend(b.contact_names());
                let Some(s) = b.step_up else {
                    continue;
                };
                let service = &self.list[i];
                // Without a tenant on both sides, both the operator's only from a system
                // namespace: an unassigned namespace's Service is no one's (review 49 L2).
                let own = b.tenant == service.tenant
                    && (service.tenant.is_some() || service.operator_service);
                if !own {
                    foreign.get_or_insert_with(|| b.name.clone());
                } else if step_up.is_none_or(|held| held.ttl < s.ttl) {
                    step_up = Some(s);
                }
            }
            let service = &mut self.list[i];
            service.flags = if tracked {
                service.flags | flags::TRACKED
            } else {
                service.flags & !flags::TRACKED
            };
            service.datasets = datasets.into_iter().collect();
            service.step_up = step_up;
            service.fronts_foreign_step_up = foreign;
        }
    }

    /// One problem line per Service that fronts another tenant's step-up endpoint (see
    /// `services_track_their_backends`), bounded per tenant as the merge's are.
    fn foreign_step_up_problems(&self) -> Vec<String> {
        let mut problems = crate::merge::Problems::default();
        for s in &self.list {
            if let Some(backend) = &s.fronts_foreign_step_up {
                problems.push(
                    s.tenant.as_deref(),
                    format!(
                        "{}: a backend is {}, another tenant's endpoint with a step-up: a Service may not front it (its owner would choose whom the step-up quarantines, or its callers would dodge it), so every call through the Service is denied (`foreign-step-up-backend`); call the endpoint directly",
                        crate::merge::show(&s.name),
                        crate::merge::show(backend)
                    ),
                );
            }
        }
        problems.finish()
    }

    /// Makes the nodes' addresses UNIDENTIFIED (every call to them denied, as before any
    /// policy could name them): what a schema that declares no `Node` entity type gets, so
    /// that an older schema keeps the cluster enforced instead of failing the bundle, and
    /// never opens the nodes as World. Returns how many addresses moved.
    pub(crate) fn nodes_unidentified(&mut self) -> usize {
        let Some(&u) = self.by_id.get(&reserved::UNIDENTIFIED) else {
            return 0;
        };
        let mut moved = Vec::new();
        for x in self
            .list
            .iter_mut()
            .filter(|x| x.kind == IdentityKind::Node)
        {
            moved.append(&mut x.ips);
        }
        if moved.is_empty() {
            return 0;
        }
        let n = moved.len();
        let ips = &mut self.list[u].ips;
        ips.append(&mut moved);
        ips.sort();
        ips.dedup();
        self.index_nets();
        n
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Identity> {
        self.list.iter()
    }
    pub fn len(&self) -> usize {
        self.list.len()
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    pub fn get(&self, id: u32) -> Option<&Identity> {
        self.by_id.get(&id).map(|&i| &self.list[i])
    }
    pub fn by_name(&self, name: &str) -> Option<&Identity> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }
    /// The identity the kernel's IP cache gives `ip`: the one whose addresses hold it with
    /// the longest prefix (a Service's own address included), else WORLD. What `policy
    /// explain --to IP` judges.
    pub fn at_address(&self, ip: &IpAddr) -> &Identity {
        self.list
            .iter()
            .flat_map(|i| i.ips.iter().map(move |net| (net, i)))
            .filter(|(net, _)| net.contains(ip))
            .max_by_key(|(net, _)| net.prefix)
            .map_or_else(
                || self.by_name(WORLD_NAME).unwrap_or(&self.list[0]),
                |(_, i)| i,
            )
    }
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
    pub(crate) fn at(&self, i: usize) -> &Identity {
        &self.list[i]
    }
    pub(crate) fn index_of_id(&self, id: u32) -> Option<usize> {
        self.by_id.get(&id).copied()
    }
    /// The index of the workload, endpoint, node or UNIDENTIFIED whose addresses hold `ip` (the
    /// longest prefix, as the kernel's IP cache; UNIDENTIFIED for a Service's own address),
    /// else WORLD's: where a Service's backend leads.
    pub(crate) fn backend_index(&self, ip: &IpAddr) -> usize {
        let (is_v6, bits, width) = ip_bits(ip);
        let lens = if is_v6 { &self.lens.1 } else { &self.lens.0 };
        lens.iter()
            .find_map(|&p| {
                self.nets
                    .get(&(is_v6, p, bits & IpNet::mask(p, width)))
                    .copied()
            })
            .unwrap_or(0)
    }

    /// A risk override (the only attribute that changes at run time).
    pub(crate) fn set_risk(&mut self, i: usize, risk: String) {
        self.list[i].risk = risk;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_rules() {
        for ok in [
            "spiffe://cluster.local/ns/acme/sa/retriever",
            "spiffe://example.org",
            "spiffe://a-b_c.9/x.y-z_W",
        ] {
            assert_eq!(validate_spiffe_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "SPIFFE://example.org/x",
            "https://example.org/x",
            "spiffe:///path",
            "spiffe://Example.org/x",
            "spiffe://example.org:8080/x",
            "spiffe://user@example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a?q=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a b",
        ] {
            assert!(validate_spiffe_id(bad).is_err(), "{bad}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        assert_eq!(long.len(), 2048);
        assert_eq!(validate_spiffe_id(&long), Ok(()));
        let too_long = format!("{long}b");
        assert!(validate_spiffe_id(&too_long).unwrap_err().contains("2048"));
        let td = format!("spiffe://{}/x", "a".repeat(256));
        assert!(validate_spiffe_id(&td).is_err());
    }

    #[test]
    fn ipnet_parse_and_overlap() {
        let a: IpNet = "127.10.1.2".parse().unwrap();
        assert_eq!(a.to_string(), "127.10.1.2/32");
        let b: IpNet = "127.10.1.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(b.contains(&"127.10.1.200".parse().unwrap()));
        assert!(!b.contains(&"127.10.2.1".parse().unwrap()));
        let c: IpNet = "127.10.2.0/24".parse().unwrap();
        assert!(!b.overlaps(&c));
        assert!("127.10.1.1/24".parse::<IpNet>().is_err());
        assert!("127.10.1.1/33".parse::<IpNet>().is_err());
        let v6: IpNet = "fd00::1".parse().unwrap();
        assert_eq!(v6.prefix, 128);
        let v6net: IpNet = "fd00::/64".parse().unwrap();
        assert!(v6net.overlaps(&v6) && !v6net.overlaps(&a));
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().overlaps(&a));
    }

    #[test]
    fn ids_are_stable_and_in_range() {
        let a = preferred_id(IdentityKind::Workload, "acme-retriever");
        assert_eq!(a, preferred_id(IdentityKind::Workload, "acme-retriever"));
        assert_ne!(a, preferred_id(IdentityKind::Endpoint, "acme-retriever"));
        assert!((reserved::FIRST_DYNAMIC..1 << 31).contains(&a));
    }
}

//! What a cluster source (Kubernetes) contributes to a bundle, in the shape the policy crate
//! consumes: pods grouped by their security-relevant labels, their addresses, and Services
//! with their ready backends. The source (`enforcer::sources::kubernetes`) builds a
//! [`ClusterState`] from its reflector stores with a pure function; the bundle turns each
//! [`ClusterIdentity`] into a Cedar `Workload` entity exactly like an inventory workload.
//!
//! Nothing here knows about the Kubernetes API types: a test, a benchmark or another
//! orchestrator can build a `ClusterState` by hand. It is serialisable because the agent
//! persists the last one it saw, so a restart without the API server still enforces it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::identity::IpNet;
use crate::inventory::IngressMode;
use crate::Protocol;

/// The label keys of the product, on Namespaces (tenant metadata) and Pods.
///
/// A tenant is a property of the Namespace, never of the Pod: a pod label cannot move a pod
/// into another tenant. The admission webhook stamps the namespace's values onto each pod
/// (so `kubectl get pods -L` shows them); the agent still reads them from the Namespace.
pub mod labels {
    /// Namespace label (or annotation): the tenant that owns every pod in the namespace.
    pub const TENANT: &str = "ai-enforcer.io/tenant";
    /// Namespace label or annotation: the tenant's region (for example `eu-west-1`).
    pub const REGION: &str = "ai-enforcer.io/region";
    /// Namespace label or annotation: where the tenant's data must stay (for example `eu`).
    pub const DATA_RESIDENCY: &str = "ai-enforcer.io/data-residency";
    /// Namespace label or annotation: the tenant's retention tier (for example `30d`).
    pub const RETENTION_TIER: &str = "ai-enforcer.io/retention-tier";
    /// Namespace label: `"true"` makes the validating webhook require tenant metadata.
    pub const ENFORCED: &str = "ai-enforcer.io/enforced";
    /// Pod label: the workload's purpose (`inference`, `retrieval`, ...).
    pub const PURPOSE: &str = "ai-enforcer.io/purpose";
    /// Pod label: the workload's ring (`prod`, `staging`, ...).
    pub const RING: &str = "ai-enforcer.io/ring";
    /// Tenant metadata keys, in the order they are stamped and reported.
    pub const TENANT_METADATA: [&str; 4] = [TENANT, REGION, DATA_RESIDENCY, RETENTION_TIER];

    // Destination marks: what an inventory endpoint says with `kind`, `track`, `datasets`
    // and `ingress`, said of a pod. Pod annotations (set on the pod template), because they
    // describe what the pod serves, not how it is selected; they are part of the pod's
    // identity label set, so the flags they give are per identity, like every attribute.

    /// Pod annotation: what the pod serves (`vector_db`, `feature_store`, ...): a lowercase
    /// letter, then up to 62 lowercase letters, digits, `_` or `-`. `vector_db` implies
    /// [`TRACK`].
    pub const KIND: &str = "ai-enforcer.io/kind";
    /// Pod annotation: `"true"` records flows to the pod (flow records, the identity option,
    /// revocation) whatever its kind; `"false"` (the default) does not turn it off for a
    /// `vector_db`.
    pub const TRACK: &str = "ai-enforcer.io/track";
    /// Pod annotation: the datasets the pod serves, comma separated (each a valid label
    /// value; at most [`super::MAX_DATASETS`]): the `dataset_scope` of events and flows to it.
    pub const DATASETS: &str = "ai-enforcer.io/datasets";
    /// Pod annotation: the ingress check on SYNs to the pod (`off`, `audit`, `enforce`).
    /// Namespace label or annotation under the same key: the least the namespace's pods get
    /// (set by the platform, which owns Namespaces); a pod can ask for more, never for less.
    pub const INGRESS: &str = "ai-enforcer.io/ingress";
    /// Pod annotation: each caller's connection-rate budget to the pod, the fields of an
    /// inventory endpoint's `rate_limit` as `key=value` pairs separated by commas
    /// (`connections_per_second=20, burst=20, risk_halving=0.25`; see `crate::rate`).
    pub const RATE_LIMIT: &str = "ai-enforcer.io/rate-limit";
    /// The destination mark keys, as identity labels.
    pub const MARKS: [&str; 5] = [KIND, TRACK, DATASETS, INGRESS, RATE_LIMIT];
}

/// The most datasets one pod's [`labels::DATASETS`] may name.
pub const MAX_DATASETS: usize = 32;

/// What a pod says it serves (the [`labels::MARKS`] annotations, checked, with the
/// namespace's ingress floor applied): the cluster equivalent of an inventory endpoint's
/// `kind`, `track`, `datasets`, `ingress` and `rate_limit`. The default marks nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointMarks {
    /// `vector_db`, `feature_store`, ...; `None`: a plain workload.
    #[serde(default)]
    pub kind: Option<String>,
    /// Flows to it are recorded (always for a `vector_db`).
    #[serde(default)]
    pub track: bool,
    /// Sorted, without duplicates.
    #[serde(default)]
    pub datasets: Vec<String>,
    #[serde(default)]
    pub ingress: IngressMode,
    /// Each caller's connection-rate budget to the pod ([`labels::RATE_LIMIT`]).
    #[serde(default)]
    pub rate_limit: Option<crate::rate::RateLimitSpec>,
}

impl EndpointMarks {
    /// The `IDENTITIES` flags these marks give (as an inventory endpoint's would).
    pub fn flags(&self) -> u32 {
        use enforcer_common::flags;
        let mut f = self.ingress.flags();
        if self.kind.as_deref() == Some("vector_db") {
            f |= flags::VECTOR_DB | flags::TRACKED;
        }
        if self.track {
            f |= flags::TRACKED;
        }
        f
    }
}

/// Everything the cluster source knows, as of one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The SPIFFE trust domain (`cluster.local`): SPIFFE IDs are
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub trust_domain: String,
    /// One entry per distinct security label set (replicas share one).
    pub identities: Vec<ClusterIdentity>,
    pub services: Vec<ClusterService>,
    /// Addresses of live pods the source left out (a namespace that requires a tenant and
    /// has none, invalid labels, a forged cgroup UID...): judged UNIDENTIFIED (every call to
    /// them denied), never WORLD. Empty in states persisted before this field existed.
    #[serde(default)]
    pub unidentified_ips: Vec<IpAddr>,
    /// Each node's addresses, by node name: its pods' `status.hostIPs` (`status.hostIP` on
    /// servers before 1.28) and its `hostNetwork` pods' `status.podIPs`, which are the node's
    /// own. The merge gives this node's (`ClusterOptions::node_name`) to the reserved
    /// `host` identity and every other node's to `remote-node`, where nothing else claims
    /// them. Empty in states persisted before this field existed.
    #[serde(default)]
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// The networks the Nodes say their pods take addresses from (`spec.podCIDRs`), sorted,
    /// without duplicates. With [`ClusterOptions::cluster_cidrs`] they are the pod networks:
    /// an address in one that no pod, Service, node or inventory entry holds (a pod the
    /// watch has not delivered yet, a stale one, another node's CNI gateway or tunnel
    /// device) is UNIDENTIFIED, never WORLD (see [`node_pod_cidr_problem`] for which are
    /// taken). Empty in states persisted before this field existed.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Problems found while building this state (a pod in a namespace without a tenant, a
    /// label value that is not a valid Kubernetes label value...), one line each, naming the
    /// object. They are reported as events; the objects concerned are left out (their pods
    /// are unknown subjects: fail closed).
    pub problems: Vec<String>,
}

/// Cloud instance metadata services, which hand out the node's credentials (and, with
/// workload identity agents, the pods') to whoever asks: the classic target of a server-side
/// request forgery, by an agent that may browse the internet above all. On a node of a
/// cluster each is UNIDENTIFIED (every call denied, whatever a policy opens: `Node::"host"`
/// at port 80 for an ingress controller must not open them) unless the inventory names the
/// address itself (a host entry, say `imds` with `ips: [169.254.169.254/32]`), which a
/// policy can then permit to exactly the workloads that need it; a pod or node address
/// there keeps it. Sources: AWS EC2 (IMDS `169.254.169.254`, `fd00:ec2::254`), Amazon
/// EKS Pod Identity (`169.254.170.23`, `fd00:ec2::23`), Amazon ECS task credentials
/// (`169.254.170.2`), Google Cloud (`169.254.169.254`, `fd20:ce::254`), Azure, OpenStack,
/// Oracle Cloud and DigitalOcean (`169.254.169.254`), Alibaba Cloud (`100.100.100.200`),
/// Tencent Cloud (`169.254.0.23`). Azure's wire server (`168.63.129.16`) is also the VMs'
/// DNS resolver and the source of load balancer probes: not here (see the README).
pub const METADATA_SERVICES: [&str; 8] = [
    "169.254.169.254",
    "169.254.170.2",
    "169.254.170.23",
    "169.254.0.23",
    "100.100.100.200",
    "fd00:ec2::254",
    "fd00:ec2::23",
    "fd20:ce::254",
];

/// The NAT64 well-known prefix, `64:ff9b::/96` (RFC 6052 2.1): an IPv4 address `a.b.c.d`
/// is `64:ff9b::a.b.c.d` to an IPv6-only pod behind a translator.
const NAT64_WELL_KNOWN: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];

/// Every address of the [`METADATA_SERVICES`], and each IPv4 one also as the NAT64
/// well-known prefix embeds it (`64:ff9b::a9fe:a9fe`): where a translator on the node (or a
/// CNI's NAT46/64) passes non-global addresses, an IPv6-only pod reaches the metadata
/// service there. (A network-specific prefix, RFC 6052's others, is the operator's: name it
/// in the inventory.)
pub fn metadata_addresses() -> impl Iterator<Item = IpAddr> {
    METADATA_SERVICES.iter().flat_map(|m| {
        let ip: IpAddr = m.parse().expect("a valid address");
        let nat64 = match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                let [p0, p1, p2, p3, p4, p5] = NAT64_WELL_KNOWN;
                Some(IpAddr::V6(std::net::Ipv6Addr::new(
                    p0,
                    p1,
                    p2,
                    p3,
                    p4,
                    p5,
                    u16::from_be_bytes([a, b]),
                    u16::from_be_bytes([c, d]),
                )))
            }
            IpAddr::V6(_) => None,
        };
        std::iter::once(ip).chain(nat64)
    })
}

/// Whether a node may have `ip` as its address: not unspecified, multicast, broadcast,
/// link-local or one of the [`METADATA_SERVICES`]: a kubelet or a Node's status that reports
/// one (compromised, or misconfigured) must not turn that address into a node on every
/// agent, where a `Node` permit would open it. Loopback is kept: on a test host every node
/// address is one.
pub fn node_address_usable(ip: &IpAddr) -> bool {
    if metadata_addresses().any(|m| m == *ip) {
        return false;
    }
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_link_local())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local())
                && a.to_ipv4_mapped().is_none()
        }
    }
}

/// What no pod network may overlap, whoever names it: addresses that are never a pod's (IANA
/// special-purpose registries, RFC 6890 and RFC 6052): "this network" `0.0.0.0/8`, loopback
/// (a pod's own `127.0.0.1`), link-local (the node's: see the merge), multicast and the
/// reserved `240.0.0.0/4` with the broadcast address; for IPv6 the `::/8` block
/// (unspecified, loopback, IPv4-mapped and -compatible, the NAT64 prefix `64:ff9b::/96`),
/// link-local and multicast. A Node that claims `127.0.0.0/8` must not deny every pod its
/// localhost.
pub const NEVER_POD_NETWORKS: [&str; 8] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/8",
    "fe80::/10",
    "ff00::/8",
];

/// Why a configured cluster CIDR (`--cluster-cidr`) cannot be a pod network, or `None`: it
/// overlaps [`NEVER_POD_NETWORKS`], or is shorter than /8 (IPv4) or /32 (IPv6), or is a
/// single address.
pub fn cluster_cidr_problem(net: &IpNet) -> Option<String> {
    pod_network_problem(net, if net.is_ipv4() { 8 } else { 32 })
}

/// Why a Node's `spec.podCIDR` is not taken as a pod network, or `None`. Stricter than a
/// configured one, since whoever may write a Node (a kubelet registering it, a component
/// with `nodes` update) names it: [`cluster_cidr_problem`]'s rules with /16 (IPv4) and /48
/// (IPv6) as the shortest (a node's own range is a /24 or /64 by Kubernetes' defaults), and,
/// where cluster CIDRs are configured, it must lie inside one of them.
pub fn node_pod_cidr_problem(net: &IpNet, cluster_cidrs: &[IpNet]) -> Option<String> {
    if let Some(problem) = pod_network_problem(net, if net.is_ipv4() { 16 } else { 48 }) {
        return Some(problem);
    }
    let inside = |c: &IpNet| c.prefix <= net.prefix && c.contains(&net.addr);
    if !cluster_cidrs.is_empty() && !cluster_cidrs.iter().any(inside) {
        return Some("it is inside no configured cluster CIDR (--cluster-cidr)".into());
    }
    None
}

fn pod_network_problem(net: &IpNet, shortest: u8) -> Option<String> {
    let width = if net.is_ipv4() { 32 } else { 128 };
    if net.prefix < shortest {
        return Some(format!("shorter than /{shortest}"));
    }
    if net.prefix == width {
        return Some("a single address is no network".into());
    }
    NEVER_POD_NETWORKS
        .iter()
        .map(|s| s.parse::<IpNet>().expect("a valid network"))
        .find(|never| never.overlaps(net))
        .map(|never| format!("it overlaps {never}, which is never a pod's"))
}

/// The security-relevant labels of a pod: the key of its identity, and its Cedar attributes.
///
/// `labels` holds every pair that defines the identity, canonical (sorted by key): always
/// `namespace` and `service_account`, the tenant metadata read from the Namespace under the
/// [`labels`] keys, and the pod labels the agent's configuration names (`purpose`, `ring` and
/// `--identity-label` keys). Labels outside that set (`pod-template-hash`, ...) never split an
/// identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub labels: BTreeMap<String, String>,
    pub namespace: String,
    pub service_account: String,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    /// Every known pod with these labels, cluster-wide, sorted by (namespace, name).
    pub pods: Vec<ClusterPod>,
    /// What the pods serve ([`labels::MARKS`]; also in `labels`, so that pods marked
    /// differently never share an identity). Default in states persisted before it existed.
    #[serde(default)]
    pub marks: EndpointMarks,
}

/// One pod of an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`: how the kubelet names the pod's cgroup.
    pub uid: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `status.podIPs` (empty until the pod has a sandbox, and for host-network pods, whose
    /// addresses are the node's and identify nothing).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `metadata.creationTimestamp`, RFC 3339: older label sets win a per-tenant quota.
    pub created: String,
}

/// Ports per Service; beyond them a Service's ports are denied.
pub const MAX_SERVICE_PORTS: usize = 256;
/// Ready backends of one Service port (after deduplication): a Deployment behind one
/// Service rarely has more; beyond it the port is denied (judging a subset could allow what
/// a left-out backend denies).
pub const MAX_BACKENDS_PER_PORT: usize = 4096;
/// Ready backends of one tenant's Services in all: EndpointSlices are written by tenants
/// (a selectorless Service's owner writes any number), so their cost is bounded per tenant.
pub const MAX_BACKENDS_PER_TENANT: usize = 65_536;

/// A Service with a ClusterIP. The connect hook sees the ClusterIP before any load-balancer
/// translation, so the ClusterIP and each port are judged as the ready backends behind them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterService {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (headless Services are not listed: clients reach their pod IPs).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`. kube-proxy redirects the
    /// Service's ports on these addresses to its backends on every node, whoever else has
    /// the address (its owner may write any address there: CVE-2020-8554), so the bundle
    /// judges each as the Service, ahead of the inventory and of pods. Empty in states
    /// persisted before this field existed.
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// The tenant of the Service's Namespace. `None` where the namespace has none, or in a
    /// state persisted before this field existed: the tenant of the namespace's pods counts
    /// then. (Taken from the pods alone, the Services of every namespace without pods would
    /// share one quota, which one tenant could fill for all.)
    #[serde(default)]
    pub tenant: Option<String>,
}

/// One port of a Service and the ready backends behind it (from EndpointSlices or Endpoints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
}

/// A ready backend: the pod address and the port the Service forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// How a bundle merges a [`ClusterState`] ([`crate::Bundle::load_with_cluster`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterOptions {
    /// This node's name (`spec.nodeName` of the pods it runs): a cluster identity with a pod
    /// here is a local subject ([`crate::Identity::pod_uids`]). Empty: no pod is local.
    pub node_name: String,
    /// The cluster's pod networks as configured (`--cluster-cidr`), each passing
    /// [`cluster_cidr_problem`]: where the CNI does not allocate from the Nodes' podCIDRs
    /// (Calico's IP pools, Cilium's cluster pool), and the bounds of the Nodes' (see
    /// [`node_pod_cidr_problem`]). Configuration, not state: a restart with another value
    /// applies it at once, also to a persisted state.
    pub cluster_cidrs: Vec<IpNet>,
    /// The most cluster identities (distinct label sets) one tenant may have, and separately
    /// the most Services; label sets beyond it are left out and reported (see
    /// [`crate::Bundle::load_with_cluster`]). Identities without a tenant share one quota.
    pub max_identities_per_tenant: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            node_name: String::new(),
            cluster_cidrs: Vec::new(),
            max_identities_per_tenant: DEFAULT_MAX_IDENTITIES_PER_TENANT,
        }
    }
}

/// [`ClusterOptions::max_identities_per_tenant`] by default.
pub const DEFAULT_MAX_IDENTITIES_PER_TENANT: usize = 256;

/// The identity numbers of cluster identities and Services: `[2^31, 2^32 - 1)`. Inventory
/// identities are below 2^31 (from `enforcer_common::identity::FIRST_DYNAMIC`), so the two
/// never meet, and `u32::MAX` stays free.
pub const CLUSTER_IDS: std::ops::Range<u32> = (1 << 31)..u32::MAX;

/// Domain separation of the hashes below: a label set, a Service name and a tenant name that
/// happen to encode alike still hash apart.
const IDENTITY_DOMAIN: &str = "ai-enforcer.io/cluster-identity/v1";
const SERVICE_DOMAIN: &str = "ai-enforcer.io/service/v1";
const TENANT_DOMAIN: &str = "ai-enforcer.io/tenant/v1";

/// SHA-256 of `domain` and `parts`, each prefixed by its length (u64, little endian), the
/// parts preceded by their count: one byte string per sequence of parts, so no two label
/// sets encode alike however their texts are cut.
fn digest<'a>(domain: &str, parts: impl ExactSizeIterator<Item = &'a str>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    fn part(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    part(&mut h, domain);
    h.update((parts.len() as u64).to_le_bytes());
    for p in parts {
        part(&mut h, p);
    }
    h.finalize().into()
}

/// The first 8 bytes of a digest, big endian.
fn head(d: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// A value of [`CLUSTER_IDS`] from a digest.
pub(crate) fn in_cluster_range(d: &[u8; 32]) -> u32 {
    let span = (CLUSTER_IDS.end - CLUSTER_IDS.start) as u64;
    CLUSTER_IDS.start + (head(d) % span) as u32
}

/// The digest of a canonical label set (what its identity number and name suffix come from).
pub(crate) fn label_digest(labels: &BTreeMap<String, String>) -> [u8; 32] {
    // Pairs are sorted by key (a BTreeMap), so the encoding is canonical.
    let parts: Vec<&str> = labels
        .iter()
        .flat_map(|(k, v)| [k.as_str(), v.as_str()])
        .collect();
    digest(IDENTITY_DOMAIN, parts.into_iter())
}

/// The digest of a Service's name.
pub(crate) fn service_digest(namespace: &str, name: &str) -> [u8; 32] {
    let text = format!("service/{namespace}/{name}");
    digest(SERVICE_DOMAIN, std::iter::once(text.as_str()))
}

/// The identity number a label set prefers: SHA-256 (domain-separated, length-prefixed,
/// pairs in key order) into [`CLUSTER_IDS`]. It depends on the label set alone, so every
/// node computes the same number for the same set without talking to the others. Two
/// different sets preferring one number is a collision: the bundle gives the number to
/// one of them and another to the other, and reports it (see
/// [`crate::Bundle::load_with_cluster`]).
pub fn identity_number(labels: &BTreeMap<String, String>) -> u32 {
    in_cluster_range(&label_digest(labels))
}

/// The identity number a Service prefers: the hash of `service/<namespace>/<name>` into
/// [`CLUSTER_IDS`] (collisions as for [`identity_number`]).
pub fn service_number(namespace: &str, name: &str) -> u32 {
    in_cluster_range(&service_digest(namespace, name))
}

/// The tenant number (`IdentityInfo::tenant`) a tenant name prefers: its hash into
/// `1..=u32::MAX` (0 is "no tenant"). Another node reads the same number for the same
/// name; a collision between two tenant names is resolved and reported as for identities.
pub fn tenant_number(name: &str) -> u32 {
    let d = digest(TENANT_DOMAIN, std::iter::once(name));
    1 + (head(&d) % u32::MAX as u64) as u32
}

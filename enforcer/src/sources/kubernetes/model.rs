//! From the reflector stores' objects to a [`ClusterState`]: a pure function, so that what
//! the agent enforces depends only on what the API server said, never on the order or the
//! timing in which it said it.
//!
//! Identity labels (the key of an identity, canonical as a sorted map):
//! - [`NAMESPACE_LABEL`] and [`SERVICE_ACCOUNT_LABEL`] (an unset service account is
//!   Kubernetes' `default`);
//! - the tenant metadata ([`labels::TENANT_METADATA`]) read from the pod's **Namespace**, as
//!   labels or annotations. A pod label under one of these keys never counts; when it
//!   disagrees with the namespace it is reported;
//! - the pod labels [`labels::PURPOSE`], [`labels::RING`] and the configured identity label
//!   keys, when set. No other label (`pod-template-hash`, ...) splits an identity.
//!
//! A pod of a **system namespace** ([`Rules::system_namespaces`], `kube-system` by default in
//! the agent) without tenant metadata gets an identity without a tenant: cluster DNS, the
//! CNI and the enforcer's own pods are workloads that policies can name (by SPIFFE ID),
//! never members of a tenant.
//!
//! A pod is left out (its processes are unknown subjects: fail closed; its addresses
//! UNIDENTIFIED, never WORLD) and reported when its namespace is unknown or has no tenant
//! (and is not a system namespace), when its tenant metadata is not a valid label value
//! or is contradictory, when one of its labels is not valid Kubernetes label syntax, or when
//! its service account name is invalid. Pods that are terminated (`Succeeded`, `Failed`) or
//! being deleted (`deletionTimestamp` set) are not live and not listed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use enforcer_policy::cluster::{
    labels, Backend, ClusterIdentity, ClusterPod, ClusterService, ClusterState, EndpointMarks,
    ServicePort, MAX_BACKENDS_PER_PORT, MAX_BACKENDS_PER_TENANT, MAX_DATASETS, MAX_SERVICE_PORTS,
};
use enforcer_policy::identity::IpNet;
use enforcer_policy::inventory::IngressMode;
use enforcer_policy::Protocol;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Identity label: the pod's namespace.
pub const NAMESPACE_LABEL: &str = "namespace";
/// Identity label: the pod's service account (`default` when unset).
pub const SERVICE_ACCOUNT_LABEL: &str = "service_account";
/// The label every EndpointSlice carries: the name of its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The most addresses one node has (its pods' `hostIPs` first, then its Node object's, in
/// the order they list them, counting only addresses a node may have: see
/// `enforcer_policy::cluster::node_address_usable`; a real node has a few): whoever may
/// write one Node's status (a compromised kubelet) must not fill every agent's IP cache,
/// which would refuse every apply after. The rest are UNIDENTIFIED, not World's.
pub const MAX_NODE_ADDRESSES: usize = 16;
/// How many pod names a per-namespace problem line lists before "and N more".
const NAMES_SHOWN: usize = 5;

/// The objects of the source's stores at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pods: Vec<Arc<Pod>>,
    /// Node objects: their `status.addresses` and `spec.podCIDRs`.
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub backends: Backends,
}

/// Where Service backends come from: EndpointSlices (discovery.k8s.io/v1) where the server
/// serves them, else the core/v1 Endpoints of each Service (Kubernetes before 1.21).
#[derive(Clone, Debug)]
pub enum Backends {
    EndpointSlices(Vec<Arc<EndpointSlice>>),
    Endpoints(Vec<Arc<Endpoints>>),
}

impl Default for Backends {
    fn default() -> Self {
        Self::EndpointSlices(Vec::new())
    }
}

/// What decides identities besides the objects: the configured identity label keys and the
/// SPIFFE trust domain.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Pod label keys that split identities, besides `purpose` and `ring`.
    pub identity_labels: Vec<String>,
    pub trust_domain: String,
    /// Namespaces whose pods need no tenant: without tenant metadata they get identities
    /// without a tenant instead of being left out.
    pub system_namespaces: Vec<String>,
}

/// Why a configured system namespace can name no namespace (a namespace name is a DNS
/// label: 1 to 63 lowercase letters, digits and '-'), or `None`: a typo such as
/// `kube_system` would otherwise leave cluster DNS out without a word.
pub fn system_namespace_problem(name: &str) -> Option<String> {
    if name.len() > 63 || name.contains('.') {
        return Some(format!(
            "system namespace {name:?} is not a namespace name (a DNS label: at most 63 lowercase letters, digits and '-')"
        ));
    }
    dns_subdomain_error(name).map(|e| format!("system namespace {name:?}: {e}"))
}

/// Why a configured identity label key cannot be used, or `None` when it can.
pub fn identity_label_problem(key: &str) -> Option<String> {
    if key == NAMESPACE_LABEL || key == SERVICE_ACCOUNT_LABEL {
        return Some(format!(
            "identity label {key:?} is reserved: the source sets it from the pod itself"
        ));
    }
    if labels::TENANT_METADATA.contains(&key) {
        return Some(format!(
            "identity label {key:?} is tenant metadata: it comes from the namespace, never \
             from a pod label"
        ));
    }
    if labels::MARKS.contains(&key) {
        return Some(format!(
            "identity label {key:?} is a destination mark: it is read from the pod's \
             annotation and always part of the identity"
        ));
    }
    if key == labels::PURPOSE || key == labels::RING {
        return Some(format!(
            "identity label {key:?} is always part of the identity: do not name it"
        ));
    }
    label_key_error(key).map(|e| format!("identity label {key:?}: {e}"))
}

/// The cluster state the objects describe (see the module documentation).
pub fn cluster_state(snapshot: &Snapshot, rules: &Rules) -> ClusterState {
    cluster_state_with(snapshot, rules, &mut Memo::default())
}

/// What [`cluster_state`] derived in the last round, so that the next round derives only
/// what changed: the source computes a state after every change, and at 20,000 pods
/// deriving every pod again and regrouping every pod into its identity (a label set cloned
/// and compared per pod) was most of the agent's CPU per one-pod change.
///
/// Kept per pod: its derived identity. An entry is reused only for the very same object
/// (the reflector store's `Arc`, which a watch event or a relist replaces and never
/// mutates; the entry holds it, so its address cannot be reused meanwhile) in a namespace
/// with the same tenant metadata, with the same [`Rules`]: everything `pod_identity` reads.
/// Kept for the cluster: the identity groups (label set -> pods sorted by namespace and
/// name) and how many pods name each cgroup UID, both updated with the pods that came and
/// went only. [`cluster_state_with`] therefore returns exactly what [`cluster_state`]
/// returns (`incremental_state_equals_a_rebuild`), and [`Memo::identities_changed`] says
/// whether its identities can differ from the last round's without comparing them.
#[derive(Debug, Default)]
pub struct Memo {
    /// The rules the entries were derived with (a change drops them all).
    rules: Option<(Vec<String>, Vec<String>)>,
    /// By the address of the pod object.
    pods: HashMap<usize, MemoPod>,
    /// The identities of the pods in `pods`, by label set; each one's pods sorted by
    /// (namespace, name), never empty.
    groups: BTreeMap<BTreeMap<String, String>, ClusterIdentity>,
    /// Cgroup UID -> how many pods in `groups` name it.
    uids: HashMap<String, u32>,
    /// The UIDs of `uids` named by more than one pod.
    shared_uids: std::collections::BTreeSet<String>,
    /// Rounds computed with this memo; an entry's `round` is the last one that saw its pod.
    round: u64,
    /// The last round added or removed a pod of `groups` (or it was the first round).
    changed: bool,
}

#[derive(Debug)]
struct MemoPod {
    pod: Arc<Pod>,
    tenant: TenantMetadata,
    /// `pod_identity`'s answer: an identity holding this one pod.
    identity: Option<ClusterIdentity>,
    problems: Vec<String>,
    /// A tenant's pod: what it holds that the enforcer cannot contain (see
    /// [`uncontained_problem`]).
    uncontained: Option<String>,
    /// An identified pod whose ingress is checked and that keeps SYN cookies on (see
    /// [`syncookies_problem`]).
    syncookies_on: bool,
    round: u64,
}

impl Memo {
    /// Whether the identities (and the cgroup UIDs they name) of the last
    /// [`cluster_state_with`] may differ from those of the round before: `false` only when
    /// no pod came, went or was derived anew, so they are equal. `true` in a memo's first
    /// round (and after a change of [`Rules`], which starts it over).
    pub fn identities_changed(&self) -> bool {
        self.changed
    }

    /// `pod_identity` of `pod`, from the last round when nothing it reads changed; a pod
    /// derived anew goes into `added` (its replaced entry is found stale by [`Memo::sweep`]).
    fn see(
        &mut self,
        pod: &Arc<Pod>,
        tenant: &TenantMetadata,
        rules: &Rules,
        problems: &mut Vec<String>,
        added: &mut Vec<usize>,
    ) -> bool {
        let key = Arc::as_ptr(pod) as usize;
        let round = self.round;
        match self.pods.get_mut(&key) {
            Some(e) if Arc::ptr_eq(&e.pod, pod) && e.tenant == *tenant => {
                e.round = round;
                problems.extend(e.problems.iter().cloned());
                e.identity.is_some()
            }
            _ => {
                let mut own = Vec::new();
                let identity = pod_identity(pod, tenant, rules, &mut own);
                let uncontained = match tenant.tenant() {
                    Some(_) => uncontained(pod).map(str::to_string),
                    None => None,
                };
                let annotations = pod.metadata.annotations.as_ref();
                // A `hostNetwork` pod is in the node's namespace, whose `net.*` sysctls the
                // API server refuses it: nothing it could be told to set.
                let host_network = pod.spec.as_ref().and_then(|s| s.host_network);
                let syncookies_on = identity.is_some()
                    && host_network != Some(true)
                    && raised(tenant.1, annotations) != IngressMode::Off
                    && !syncookies_off(pod);
                problems.extend(own.iter().cloned());
                let known = identity.is_some();
                // An entry at this address for another tenant: its pod leaves the groups
                // first (the address is reused by the same object only while held).
                if let Some(old) = self.pods.remove(&key) {
                    self.ungroup(old);
                }
                self.pods.insert(
                    key,
                    MemoPod {
                        pod: pod.clone(),
                        tenant: tenant.clone(),
                        identity,
                        problems: own,
                        uncontained,
                        syncookies_on,
                        round,
                    },
                );
                added.push(key);
                known
            }
        }
    }

    /// Drops the entries this round did not see and groups the pods derived anew.
    fn sweep(&mut self, added: Vec<usize>) {
        let round = self.round;
        let gone: Vec<usize> = self
            .pods
            .iter()
            .filter(|(_, e)| e.round != round)
            .map(|(k, _)| *k)
            .collect();
        let mut changed = !added.is_empty();
        for key in gone {
            if let Some(old) = self.pods.remove(&key) {
                changed |= old.identity.is_some();
                self.ungroup(old);
            }
        }
        for key in added {
            let Some(identity) = self.pods.get(&key).and_then(|e| e.identity.clone()) else {
                continue;
            };
            for pod in &identity.pods {
                let count = self.uids.entry(pod.uid.clone()).or_default();
                *count += 1;
                if *count > 1 {
                    self.shared_uids.insert(pod.uid.clone());
                }
            }
            match self.groups.get_mut(&identity.labels) {
                Some(group) => {
                    for pod in identity.pods {
                        let at = group.pods.partition_point(|p| {
                            (&p.namespace, &p.name) < (&pod.namespace, &pod.name)
                        });
                        group.pods.insert(at, pod);
                    }
                }
                None => {
                    self.groups.insert(identity.labels.clone(), identity);
                }
            }
        }
        self.changed |= changed;
    }

    /// Takes the pod of a dropped entry out of its group and the UID counts.
    fn ungroup(&mut self, old: MemoPod) {
        let Some(identity) = old.identity else {
            return;
        };
        if let Some(group) = self.groups.get_mut(&identity.labels) {
            for pod in &identity.pods {
                if let Some(at) = group.pods.iter().position(|p| p == pod) {
                    group.pods.remove(at);
                }
            }
            if group.pods.is_empty() {
                self.groups.remove(&identity.labels);
            }
        }
        for pod in &identity.pods {
            if let Some(count) = self.uids.get_mut(&pod.uid) {
                *count -= 1;
                if *count <= 1 {
                    self.shared_uids.remove(&pod.uid);
                }
                if *count == 0 {
                    self.uids.remove(&pod.uid);
                }
            }
        }
        self.changed = true;
    }
}

/// [`cluster_state`], reusing what `memo` kept of the last round and keeping this one's.
pub fn cluster_state_with(snapshot: &Snapshot, rules: &Rules, memo: &mut Memo) -> ClusterState {
    let rules_key = (
        rules.identity_labels.clone(),
        rules.system_namespaces.clone(),
    );
    if memo.rules.as_ref() != Some(&rules_key) {
        *memo = Memo {
            rules: Some(rules_key),
            ..Memo::default()
        };
    }
    memo.round += 1;
    memo.changed = memo.round == 1;
    let mut problems = Vec::new();
    let namespaces: BTreeMap<&str, Result<TenantMetadata, String>> = snapshot
        .namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.as_deref()?;
            Some((name, tenant_metadata(ns)))
        })
        .collect();

    // Pods refused because of their namespace are reported once per namespace.
    let mut refused_by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    // Those of them that hold what the enforcer cannot contain: (namespace, name, what).
    let mut loose: Vec<(&str, &str, &str)> = Vec::new();
    let mut unidentified_ips: Vec<IpAddr> = Vec::new();
    // In the order they are learnt: the pods' `hostIPs` (the kubelet's primary addresses)
    // before the Node objects' addresses, each in the order the object lists them.
    let mut nodes: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    let mut added = Vec::new();
    for pod in snapshot.pods.iter().filter(|p| live(p)) {
        node_addresses(pod, &mut nodes);
        let (namespace, name) = pod_key(pod);
        let system = rules.system_namespaces.iter().any(|n| n == namespace);
        let metadata = match namespaces.get(namespace) {
            Some(Ok(m)) if m.tenant().is_some() || system => m,
            _ => {
                refused_by_namespace
                    .entry(namespace)
                    .or_default()
                    .push(name);
                loose.extend(uncontained(pod).map(|what| (namespace, name, what)));
                unidentified_ips.extend(addresses(pod));
                continue;
            }
        };
        if !memo.see(pod, metadata, rules, &mut problems, &mut added) {
            unidentified_ips.extend(addresses(pod));
        }
    }
    memo.sweep(added);
    problems.extend(uncontained_problem(memo, loose));
    problems.extend(syncookies_problem(memo));
    let mut identities: Vec<ClusterIdentity> = memo.groups.values().cloned().collect();

    // Two pods naming one cgroup (a forged mirror annotation, a UID reused) would make one
    // pod's processes another's. A pod's own `metadata.uid` is the API server's, which no
    // tenant forges, while the Node owner reference that admits the mirror annotation is
    // anyone's to write: the pod whose own UID it is keeps it, the mirror claims on it are
    // refused. Between mirror claims alone, neither is mapped. All are reported.
    if !memo.shared_uids.is_empty() {
        // Pods named by the mirror annotation (their cgroup UID is not their own).
        let mirrored: std::collections::BTreeSet<(&str, &str)> = memo
            .pods
            .values()
            .filter(|e| {
                e.identity.as_ref().is_some_and(|i| {
                    i.pods
                        .iter()
                        .any(|p| Some(&p.uid) != e.pod.metadata.uid.as_ref())
                })
            })
            .map(|e| pod_key(&e.pod))
            .collect();
        let mut by_uid: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        for pod in memo.groups.values().flat_map(|i| &i.pods) {
            if memo.shared_uids.contains(&pod.uid) {
                by_uid
                    .entry(pod.uid.as_str())
                    .or_default()
                    .push((pod.namespace.as_str(), pod.name.as_str()));
            }
        }
        // (namespace, name) of every pod left out.
        let mut refused: std::collections::BTreeSet<(&str, &str)> = Default::default();
        for (uid, pods) in &by_uid {
            let names = pods
                .iter()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect::<Vec<_>>()
                .join(", ");
            let own: Vec<&(&str, &str)> = pods.iter().filter(|p| !mirrored.contains(*p)).collect();
            if let [owner] = own[..] {
                problems.push(format!(
                    "pods {names} all name the cgroup of pod UID {uid}, which is {}/{}'s own: \
                     the others' mirror annotation is refused, they are left out (unknown \
                     subjects)",
                    owner.0, owner.1
                ));
                refused.extend(pods.iter().filter(|p| *p != owner).copied());
            } else {
                problems.push(format!(
                    "pods {names} all name the cgroup of pod UID {uid}: left out (unknown subjects)"
                ));
                refused.extend(pods.iter().copied());
            }
        }
        let is_refused =
            |p: &ClusterPod| refused.contains(&(p.namespace.as_str(), p.name.as_str()));
        for identity in &mut identities {
            for pod in identity.pods.iter().filter(|p| is_refused(p)) {
                unidentified_ips.extend(&pod.ips);
            }
            identity.pods.retain(|p| !is_refused(p));
        }
        identities.retain(|i| !i.pods.is_empty());
    }
    for (namespace, mut names) in refused_by_namespace {
        names.sort_unstable();
        let why = match namespaces.get(namespace) {
            None => format!("namespace {namespace} is not known"),
            Some(Err(e)) => e.clone(),
            Some(Ok(_)) => format!(
                "namespace {namespace} has no tenant (label or annotation {}) and is not a \
                 system namespace",
                labels::TENANT
            ),
        };
        problems.push(format!(
            "{why}: its pods are left out (unknown subjects): {}",
            name_list(&names)
        ));
    }

    let services = services(snapshot, &namespaces, &mut problems);
    let mut pod_cidrs = Vec::new();
    for node in &snapshot.nodes {
        node_object(node, &mut nodes, &mut pod_cidrs, &mut problems);
    }
    pod_cidrs.sort();
    pod_cidrs.dedup();
    for (node, ips) in nodes.iter_mut() {
        let mut seen = BTreeSet::new();
        ips.retain(|ip| enforcer_policy::cluster::node_address_usable(ip) && seen.insert(*ip));
        if ips.len() > MAX_NODE_ADDRESSES {
            problems.push(format!(
                "node {node} has {} addresses (its pods' hostIPs, then its Node object's): \
                 the first {MAX_NODE_ADDRESSES} are its own here, the rest unidentified",
                ips.len()
            ));
            unidentified_ips.extend(ips.drain(MAX_NODE_ADDRESSES..));
        }
        ips.sort();
    }
    problems.sort();
    problems.dedup();
    let problems = bounded_per_namespace(problems);
    unidentified_ips.sort();
    unidentified_ips.dedup();
    ClusterState {
        trust_domain: rules.trust_domain.clone(),
        identities,
        services,
        unidentified_ips,
        nodes: nodes
            .into_iter()
            .map(|(node, ips)| (node.to_string(), ips))
            .collect(),
        pod_cidrs,
        problems,
    }
}

/// Adds what a pod says of its node's addresses (`status.hostIPs`, else `status.hostIP`; a
/// `hostNetwork` pod's own addresses), whatever becomes of the pod itself: a pod left out
/// still runs on a node. Written by the kubelet, not by tenants (the `/status`
/// subresource); an address that does not parse names nothing and is skipped.
fn node_addresses<'a>(pod: &'a Pod, nodes: &mut BTreeMap<&'a str, Vec<IpAddr>>) {
    let spec = pod.spec.as_ref();
    let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return;
    };
    let Some(status) = pod.status.as_ref() else {
        return;
    };
    let host_ips = status.host_ips.iter().flatten().map(|h| h.ip.as_str());
    let host_ip = status
        .host_ips
        .as_ref()
        .is_none_or(|h| h.is_empty())
        .then_some(status.host_ip.as_deref())
        .flatten();
    let own = if spec.and_then(|s| s.host_network) == Some(true) {
        pod_ips(pod, "", &mut Vec::new())
    } else {
        Vec::new()
    };
    let parsed = host_ips
        .chain(host_ip)
        .filter_map(|text| parse_ip(text).ok())
        .chain(own);
    let known = nodes.entry(node).or_default();
    for ip in parsed {
        // A node's pods all say the same few addresses: kept once, in order.
        if !known.contains(&ip) {
            known.push(ip);
        }
    }
}

/// Adds what a Node object says of itself: its `status.addresses` of type `InternalIP` and
/// `ExternalIP` (names such as `Hostname` are no addresses) to its addresses, and its
/// `spec.podCIDRs` (`spec.podCIDR` on servers that predate dual stack) to the pod networks.
/// Tenants cannot write Nodes; a kubelet can write its own (NodeRestriction), and so can
/// components granted `nodes` or `nodes/status` (CNI agents, the node controller), so the
/// merge checks what it takes (`enforcer_policy::cluster::node_pod_cidr_problem`) and
/// [`MAX_NODE_ADDRESSES`] bounds each node. Text that does not parse is reported and skipped.
fn node_object<'a>(
    node: &'a Node,
    nodes: &mut BTreeMap<&'a str, Vec<IpAddr>>,
    pod_cidrs: &mut Vec<IpNet>,
    problems: &mut Vec<String>,
) {
    let Some(name) = node.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        return;
    };
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP");
    let mut ips = Vec::new();
    for a in addresses {
        match parse_ip(&a.address) {
            Ok(ip) => ips.push(ip),
            Err(_) => problems.push(format!(
                "node {name}: {} {:?} is not an IP address: skipped",
                a.type_, a.address
            )),
        }
    }
    nodes.entry(name).or_default().extend(ips);
    let spec = node.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .filter(|c| !c.is_empty())
        .cloned()
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    for text in cidrs {
        match text.parse::<IpNet>() {
            Ok(net) => pod_cidrs.push(net),
            Err(e) => problems.push(format!(
                "node {name}: pod CIDR {text:?} is not a network ({e}): skipped"
            )),
        }
    }
}

/// The addresses of a pod that is left out (the merge makes them UNIDENTIFIED); none for a
/// host-network pod, whose addresses are the node's. Unparsable ones are reported where the
/// pod is not left out (`pod_ips`), not here.
fn addresses(pod: &Pod) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    pod_ips(pod, "", &mut Vec::new())
}

/// The annotation a kubelet puts on the mirror pod of a static pod: the static pod's own UID
/// (a hash of its manifest), which is what names its cgroup. Source: kubelet
/// `pkg/kubelet/types` (`ConfigMirrorAnnotationKey`).
pub(crate) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The annotations the source keeps of a pod (the rest is dropped as it is decoded): the
/// marks that make a pod a vector DB ([`labels::MARKS`]), the mirror annotation that names a
/// static pod's cgroup, and the source's own notes ([`UNCONTAINED_KEY`],
/// [`OVERSIZED_LABELS_KEY`]). Only keys the model reads: a pod's annotations may hold 256 KiB.
pub(super) fn kept_annotation(key: &str, value: &str) -> bool {
    value.len() <= MAX_ANNOTATION_BYTES
        && (labels::MARKS.contains(&key)
            || key == MIRROR_ANNOTATION
            || key == UNCONTAINED_KEY
            || key == SYNCOOKIES_OFF_KEY
            || key == OVERSIZED_LABELS_KEY)
}

/// The longest kept annotation value: above every valid mark (32 datasets of 63 characters
/// are 2 KiB), so what it drops the model would refuse anyway.
pub const MAX_ANNOTATION_BYTES: usize = 4 * 1024;

/// The most bytes of labels the source keeps of one pod, counted as their keys, values and
/// [`LABEL_OVERHEAD_BYTES`] each. The API server bounds a pod's labels only by the object's
/// size (about 1.5 MiB), and every agent keeps every pod of the cluster: one tenant's pods
/// would otherwise hold that much on every node. A pod over it is left out (an unknown
/// subject, a system namespace's too; its labels are not kept). A real pod's labels take
/// a few hundred bytes (ten labels of 30 characters: 940).
pub const MAX_POD_LABEL_BYTES: usize = 16 * 1024;
/// What a label costs the agent besides its characters (two string headers and allocations,
/// its share of a map node), counted against [`MAX_POD_LABEL_BYTES`].
pub const LABEL_OVERHEAD_BYTES: usize = 64;

/// Where a slim pod whose labels were over [`MAX_POD_LABEL_BYTES`] notes how many there
/// were and their size (`"300 labels, 31200 bytes"`). Not a valid annotation key, so no
/// object from the API server carries it.
pub(super) const OVERSIZED_LABELS_KEY: &str = "(agent) oversized labels";

/// The UID the kubelet names the pod's cgroup after: `metadata.uid`, except for the mirror
/// pod of a static pod, whose cgroup carries the static pod's UID. The annotation is honoured
/// only on a pod with an owner reference to the Node it runs on, as the kubelet writes it.
/// That does not prove the kubelet wrote it (NodeRestriction limits what a kubelet may
/// write, not what others may; the garbage collector deletes a pod whose owner's UID does
/// not match, but only later): a pod's own UID therefore wins over a mirror claim on it
/// (`cluster_state`), so a forged one can contest only a static pod's cgroup (and the
/// admission webhook, where it is called, refuses it from anyone but the node's kubelet).
fn cgroup_uid(pod: &Pod) -> Option<String> {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let owned_by_node = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node" && Some(o.name.as_str()) == node);
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|_| owned_by_node)
        .filter(|hash| !hash.is_empty());
    mirror
        .or(pod.metadata.uid.as_ref())
        .filter(|u| !u.is_empty())
        .cloned()
}

/// A pod is live until it has terminated or the API server has removed it. A pod being
/// deleted (`deletionTimestamp` set) keeps its identity through its grace period: its
/// containers still run and close their connections, and denying them as unknown subjects
/// would break every graceful shutdown (Cilium keeps an endpoint until it is gone, too).
fn live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

fn pod_key(pod: &Pod) -> (&str, &str) {
    (
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or(""),
    )
}

/// Where the source's slim copy of a pod keeps what the pod holds that the enforcer cannot
/// contain (`crate::admission::confine::summary`, computed as the pod is decoded: its
/// containers are not kept). Not a valid annotation key, so no object from the API server
/// carries it.
pub(super) const UNCONTAINED_KEY: &str = "(agent) uncontained";

/// Where the source's slim copy of a pod notes that the pod turns SYN cookies off
/// (`crate::admission::confine::syncookies_off_in`: its security context is not kept). Not a
/// valid annotation key, like [`UNCONTAINED_KEY`].
pub(super) const SYNCOOKIES_OFF_KEY: &str = "(agent) syncookies off";

/// Whether a slim pod turns SYN cookies off ([`SYNCOOKIES_OFF_KEY`]).
fn syncookies_off(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    annotations.is_some_and(|a| a.contains_key(SYNCOOKIES_OFF_KEY))
}

/// What a slim pod holds that the enforcer cannot contain ([`UNCONTAINED_KEY`]).
fn uncontained(pod: &Pod) -> Option<&str> {
    let annotations = pod.metadata.annotations.as_ref()?;
    annotations.get(UNCONTAINED_KEY).map(String::as_str)
}

/// One line for every pod outside the system namespaces (a tenant's, or one left out for its
/// namespace, `loose`) that holds what the enforcer cannot contain (what
/// `crate::admission::confine` refuses: a privileged container, a capability beyond the Pod
/// Security Standards' `baseline`, `NET_RAW` kept, the node's namespaces, files or ports, a
/// probe the node sends elsewhere): admitted where `enforcer admission serve` is not
/// registered, or before it was, or a static pod's mirror. Such a pod is enforced like any
/// other (or, left out, an unknown subject), but can send past the checks (raw frames, its own
/// rewrites, its node's loopback), which an operator must hear of. A system namespace's pods
/// are trusted like the node (the webhook's selector spares them). The first pods by name with what each holds, then how many more.
fn uncontained_problem<'a>(
    memo: &'a Memo,
    loose: Vec<(&'a str, &'a str, &'a str)>,
) -> Option<String> {
    let mut pods = loose;
    pods.extend(memo.pods.values().filter_map(|e| {
        let (namespace, name) = pod_key(&e.pod);
        Some((namespace, name, e.uncontained.as_deref()?))
    }));
    if pods.is_empty() {
        return None;
    }
    pods.sort_unstable();
    // Only the names shown are formatted (every tenant pod may be listed: no webhook on
    // containerd).
    let mut shown: Vec<String> = pods
        .iter()
        .take(NAMES_SHOWN)
        .map(|(namespace, name, what)| format!("{namespace}/{name} ({what})"))
        .collect();
    if pods.len() > NAMES_SHOWN {
        shown.push(format!("and {} more", pods.len() - NAMES_SHOWN));
    }
    let (count, verb) = match pods.len() {
        1 => ("1 pod".to_string(), "holds"),
        n => (format!("{n} pods"), "hold"),
    };
    Some(format!(
        "{count} outside the system namespaces {verb} what the enforcer cannot contain \
         (admitted before or without `enforcer admission serve`, or in a namespace its selector \
         spares): able to send past its checks: {}",
        shown.join(", ")
    ))
}

/// One line for every identified pod whose ingress is checked and that keeps SYN cookies on
/// (`net.ipv4.tcp_syncookies` not `0`): the admission webhook sets the sysctl when a checked
/// pod is created, so such a pod was created before its check was turned on (an annotation,
/// the namespace's floor), or admitted without the webhook. A SYN cookie's ACK opens a
/// connection to it with no SYN before it, which the ingress check judges only from
/// addresses no cluster client has (README, "Identity on the wire").
fn syncookies_problem(memo: &Memo) -> Option<String> {
    let mut pods: Vec<(&str, &str)> = memo
        .pods
        .values()
        .filter(|e| e.syncookies_on)
        .map(|e| pod_key(&e.pod))
        .collect();
    if pods.is_empty() {
        return None;
    }
    pods.sort_unstable();
    let names: Vec<String> = pods
        .iter()
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (count, verb) = match pods.len() {
        1 => ("1 pod".to_string(), "keeps"),
        n => (format!("{n} pods"), "keep"),
    };
    Some(format!(
        "{count} whose ingress is checked {verb} SYN cookies on (created before the check was \
         turned on, or without `enforcer admission serve`): a SYN cookie's ACK can open a \
         connection to it that no check sees; recreate it, or set sysctl \
         net.ipv4.tcp_syncookies=0: {}",
        name_list(&names)
    ))
}

fn name_list(names: &[&str]) -> String {
    let shown = names.iter().take(NAMES_SHOWN).copied().collect::<Vec<_>>();
    let mut text = shown.join(", ");
    if names.len() > NAMES_SHOWN {
        text.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    text
}

/// A namespace's tenant metadata: key (of [`labels::TENANT_METADATA`]) -> value; and the
/// least ingress check its pods get ([`labels::INGRESS`] on the namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TenantMetadata(BTreeMap<&'static str, String>, IngressMode);

impl TenantMetadata {
    fn tenant(&self) -> Option<&str> {
        self.0.get(labels::TENANT).map(String::as_str)
    }
}

/// A namespace's value for `key`, set as a label or an annotation (both must agree), and
/// which of the two it came from; `None` when neither is set.
fn namespace_value<'a>(
    ns: &'a Namespace,
    key: &str,
) -> Result<Option<(&'a String, &'static str)>, String> {
    let name = ns.metadata.name.as_deref().unwrap_or("");
    let label = ns.metadata.labels.as_ref().and_then(|l| l.get(key));
    let annotation = ns.metadata.annotations.as_ref().and_then(|a| a.get(key));
    match (label, annotation) {
        (Some(l), Some(a)) if l != a => Err(format!(
            "namespace {name}: label {key}={l:?} and annotation {key}={a:?} disagree"
        )),
        (Some(l), _) => Ok(Some((l, "label"))),
        (None, Some(a)) => Ok(Some((a, "annotation"))),
        (None, None) => Ok(None),
    }
}

/// Reads the tenant metadata of a namespace, from labels or annotations. A value set both
/// ways must agree, and must be a valid label value (it becomes an identity label); an
/// empty value is unset.
fn tenant_metadata(ns: &Namespace) -> Result<TenantMetadata, String> {
    let name = ns.metadata.name.as_deref().unwrap_or("");
    let mut out = TenantMetadata::default();
    for key in labels::TENANT_METADATA {
        let Some((value, from)) = namespace_value(ns, key)? else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if let Some(e) = label_value_error(value) {
            // An annotation may be long: a namespace's problem line shows its start.
            return Err(format!(
                "namespace {name}: {from} {key}={:?}: {e}",
                shown(value)
            ));
        }
        out.0.insert(key, value.clone());
    }
    out.1 = namespace_ingress(ns)?;
    Ok(out)
}

/// The namespace's ingress floor ([`labels::INGRESS`], label or annotation, which must
/// agree). Namespaces are the platform's to write, not the tenants': a value that does not
/// parse refuses the namespace's pods (as bad tenant metadata does) rather than leaving the
/// floor the platform asked for silently off.
fn namespace_ingress(ns: &Namespace) -> Result<IngressMode, String> {
    let name = ns.metadata.name.as_deref().unwrap_or("");
    let key = labels::INGRESS;
    let Some((value, from)) = namespace_value(ns, key)? else {
        return Ok(IngressMode::Off);
    };
    ingress_mode(value).ok_or_else(|| {
        format!(
            "namespace {name}: {from} {key}={:?}: not one of off, audit, enforce",
            shown(value)
        )
    })
}

/// The ingress mode a pod's check runs in, as [`pod_marks`] makes it: the namespace's floor,
/// raised by the pod's own annotation where that parses. For the admission webhook, which
/// turns SYN cookies off where the check runs (`admission::confine::syncookies_off`): a floor
/// that does not parse counts as `Enforce` (the agent leaves such a namespace's pods out, so
/// the pod loses nothing but a SYN-flood fallback it does not need).
pub(crate) fn pod_ingress(
    ns: &Namespace,
    annotations: Option<&BTreeMap<String, String>>,
) -> IngressMode {
    raised(
        namespace_ingress(ns).unwrap_or(IngressMode::Enforce),
        annotations,
    )
}

/// A namespace's ingress `floor`, raised by a pod's own annotation where that parses.
fn raised(floor: IngressMode, annotations: Option<&BTreeMap<String, String>>) -> IngressMode {
    let own = annotations
        .and_then(|a| a.get(labels::INGRESS))
        .and_then(|text| ingress_mode(text));
    own.map_or(floor, |own| own.max(floor))
}

fn ingress_mode(text: &str) -> Option<IngressMode> {
    match text {
        "off" => Some(IngressMode::Off),
        "audit" => Some(IngressMode::Audit),
        "enforce" => Some(IngressMode::Enforce),
        _ => None,
    }
}

/// At most 64 bytes of a hostile value (whole characters, then `...`), for a problem line
/// (`{:?}` escapes the rest).
fn shown(value: &str) -> String {
    crate::admission::text::cut(value, 64)
}

/// The destination marks of a pod: its [`labels::MARKS`] annotations, each checked on its
/// own, with the namespace's ingress floor applied. Tenants write these annotations, so a
/// bad value is reported (naming the pod) and that one annotation ignored: the pod keeps its
/// identity and the other marks. What a pod can say is about itself only (annotations
/// describe the pod that carries them), and it cannot lower the namespace's floor: a
/// tenant's `ingress: off` on its own DB would let peers that no enforcer checked (host
/// processes, nodes without the agent, forged options) reach it where the platform asked for
/// the check.
fn pod_marks(
    pod: &Pod,
    floor: IngressMode,
    object: &str,
    problems: &mut Vec<String>,
) -> EndpointMarks {
    let annotations = pod.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let mut marks = EndpointMarks {
        ingress: floor,
        ..EndpointMarks::default()
    };
    let bad = |problems: &mut Vec<String>, key: &str, value: &str, why: &str| {
        problems.push(format!(
            "{object}: annotation {key}={:?}: {why}: ignored",
            shown(value)
        ));
    };
    if let Some(kind) = get(labels::KIND) {
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if !kind.is_empty()
            && kind.len() <= 63
            && kind.starts_with(|c: char| c.is_ascii_lowercase())
            && kind.chars().all(ok)
        {
            marks.kind = Some(kind.to_string());
        } else {
            bad(
                problems,
                labels::KIND,
                kind,
                "not a kind (a lowercase letter, then at most 62 lowercase letters, digits, `_` or `-`)",
            );
        }
    }
    if let Some(track) = get(labels::TRACK) {
        match track {
            "true" => marks.track = true,
            "false" => {}
            _ => bad(problems, labels::TRACK, track, "not `true` or `false`"),
        }
    }
    if let Some(list) = get(labels::DATASETS) {
        let mut datasets: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect();
        datasets.sort();
        datasets.dedup();
        if let Some((d, e)) = datasets
            .iter()
            .find_map(|d| label_value_error(d).map(|e| (d, e)))
        {
            bad(
                problems,
                labels::DATASETS,
                list,
                &format!("dataset {:?} {e}", shown(d)),
            );
        } else if datasets.len() > MAX_DATASETS {
            bad(
                problems,
                labels::DATASETS,
                list,
                &format!("{} datasets, more than {MAX_DATASETS}", datasets.len()),
            );
        } else {
            marks.datasets = datasets;
        }
    }
    if let Some(text) = get(labels::INGRESS) {
        match ingress_mode(text) {
            Some(mode) if mode < floor => problems.push(format!(
                "{object}: annotation {}={text:?} is below the namespace's floor {}: the floor holds",
                labels::INGRESS,
                mode_name(floor)
            )),
            Some(mode) => marks.ingress = mode,
            None => bad(problems, labels::INGRESS, text, "not one of off, audit, enforce"),
        }
    }
    if let Some(text) = get(labels::RATE_LIMIT) {
        match enforcer_policy::rate::parse_annotation(text) {
            Ok(limit) => marks.rate_limit = Some(limit),
            Err(why) => bad(problems, labels::RATE_LIMIT, text, &why),
        }
    }
    marks
}

pub(crate) fn mode_name(mode: IngressMode) -> &'static str {
    match mode {
        IngressMode::Off => "off",
        IngressMode::Audit => "audit",
        IngressMode::Enforce => "enforce",
    }
}

/// The marks as identity labels (only those that mark something), so that pods marked
/// differently never share an identity and its number.
fn mark_labels(marks: &EndpointMarks, out: &mut BTreeMap<String, String>) {
    if let Some(kind) = &marks.kind {
        out.insert(labels::KIND.to_string(), kind.clone());
    }
    if marks.track {
        out.insert(labels::TRACK.to_string(), "true".to_string());
    }
    if !marks.datasets.is_empty() {
        out.insert(labels::DATASETS.to_string(), marks.datasets.join(","));
    }
    if marks.ingress != IngressMode::Off {
        out.insert(
            labels::INGRESS.to_string(),
            mode_name(marks.ingress).to_string(),
        );
    }
    if let Some(limit) = &marks.rate_limit {
        out.insert(labels::RATE_LIMIT.to_string(), limit.canonical());
    }
}

/// The identity of one live pod in a namespace with a tenant, holding just this pod; `None`
/// (with a problem line) when the pod must be left out.
fn pod_identity(
    pod: &Pod,
    tenant: &TenantMetadata,
    rules: &Rules,
    problems: &mut Vec<String>,
) -> Option<ClusterIdentity> {
    let (namespace, name) = pod_key(pod);
    let object = format!("pod {namespace}/{name}");
    let oversized = pod.metadata.annotations.as_ref();
    if let Some(note) = oversized.and_then(|a| a.get(OVERSIZED_LABELS_KEY)) {
        problems.push(format!(
            "{object}: {note} of labels, more than the agent keeps of a pod \
             ({MAX_POD_LABEL_BYTES} bytes of keys, values and {LABEL_OVERHEAD_BYTES} per \
             label): left out (unknown subject)"
        ));
        return None;
    }
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut invalid = Vec::new();
    for (key, value) in &pod_labels {
        if let Some(e) = label_key_error(key) {
            invalid.push(format!("label key {key:?}: {e}"));
        } else if let Some(e) = label_value_error(value) {
            invalid.push(format!("label {key}={value:?}: {e}"));
        }
    }
    if !invalid.is_empty() {
        problems.push(format!(
            "{object}: {}: left out (unknown subject)",
            invalid.join("; ")
        ));
        return None;
    }
    let spec = pod.spec.as_ref();
    let Some(uid) = cgroup_uid(pod) else {
        problems.push(format!("{object}: no metadata.uid: left out"));
        return None;
    };
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    if let Some(e) = dns_subdomain_error(&service_account) {
        problems.push(format!(
            "{object}: service account {service_account:?}: {e}: left out (unknown subject)"
        ));
        return None;
    }

    // The tenant is the namespace's: a pod label claiming other metadata is only reported.
    for key in labels::TENANT_METADATA {
        if let Some(claimed) = pod_labels.get(key) {
            let actual = tenant.0.get(key);
            if actual != Some(claimed) {
                problems.push(format!(
                    "{object}: label {key}={claimed:?} disagrees with namespace {namespace} \
                     ({}): ignored, the namespace decides",
                    match actual {
                        Some(v) => format!("{key}={v:?}"),
                        None => format!("no {key}"),
                    }
                ));
            }
        }
    }

    let mut identity_labels = BTreeMap::new();
    identity_labels.insert(NAMESPACE_LABEL.to_string(), namespace.to_string());
    identity_labels.insert(SERVICE_ACCOUNT_LABEL.to_string(), service_account.clone());
    for (key, value) in &tenant.0 {
        identity_labels.insert(key.to_string(), value.clone());
    }
    let selected = [labels::PURPOSE, labels::RING]
        .into_iter()
        .chain(rules.identity_labels.iter().map(String::as_str));
    for key in selected {
        if let Some(value) = pod_labels.get(key) {
            identity_labels.insert(key.to_string(), value.clone());
        }
    }

    let marks = pod_marks(pod, tenant.1, &object, problems);
    mark_labels(&marks, &mut identity_labels);

    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let ips = if host_network {
        Vec::new()
    } else {
        pod_ips(pod, &object, problems)
    };
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Some(ClusterIdentity {
        namespace: namespace.to_string(),
        service_account,
        tenant: tenant.tenant().map(str::to_string),
        purpose: pod_labels.get(labels::PURPOSE).cloned(),
        ring: pod_labels.get(labels::RING).cloned(),
        labels: identity_labels,
        pods: vec![ClusterPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            ips,
            host_network,
            created,
        }],
        marks,
    })
}

/// `status.podIPs`, or `status.podIP` where a server fills only that; an address that does
/// not parse is reported and skipped.
fn pod_ips(pod: &Pod, object: &str, problems: &mut Vec<String>) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let texts: Vec<&str> = match status.pod_ips.as_deref() {
        Some(list) if !list.is_empty() => list.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut ips = Vec::new();
    for text in texts {
        match parse_ip(text) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(format!(
                "{object}: pod IP {text:?} is not an IP address: ignored"
            )),
        }
    }
    ips
}

fn services(
    snapshot: &Snapshot,
    namespaces: &BTreeMap<&str, Result<TenantMetadata, String>>,
    problems: &mut Vec<String>,
) -> Vec<ClusterService> {
    let mut services: Vec<&Service> = snapshot.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| object_key(&a.metadata).cmp(&object_key(&b.metadata)));
    let index = BackendIndex::of(&snapshot.backends);
    // Backend addresses each tenant may still have read (`SOURCE_ADDRESSES_PER_TENANT`): by
    // tenant, or by namespace for one without (the platform's: one of them must not spend
    // another's, such as the cluster DNS's in `kube-system`).
    let mut budgets: HashMap<(Option<&str>, &str), usize> = HashMap::new();
    let mut out = Vec::new();
    for service in services {
        let (namespace, name) = object_key(&service.metadata);
        let object = format!("service {namespace}/{name}");
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let texts: Vec<&str> = match spec.cluster_ips.as_deref() {
            Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let mut cluster_ips = Vec::new();
        for text in texts {
            // Headless: clients reach the pod IPs, which are judged as the pods.
            if text.is_empty() || text == "None" {
                continue;
            }
            match parse_ip(text) {
                Ok(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
                Ok(_) => {}
                Err(_) => problems.push(format!(
                    "{object}: cluster IP {text:?} is not an IP address: ignored"
                )),
            }
        }
        // kube-proxy redirects these too (CVE-2020-8554: a Service's owner writes any
        // address in `externalIPs`), so they are judged as the Service.
        let mut external = Vec::new();
        let lb = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        let texts = spec
            .external_ips
            .iter()
            .flatten()
            .map(|t| ("external IP", t.as_str()))
            .chain(
                lb.iter()
                    .filter_map(|i| i.ip.as_deref())
                    .map(|t| ("load-balancer IP", t)),
            );
        for (what, text) in texts {
            match parse_ip(text) {
                // A Service's owner (or a load balancer's controller) must not take the node's
                // link-local addresses or a metadata service from every tenant.
                Ok(ip) if !enforcer_policy::cluster::node_address_usable(&ip) => {
                    problems.push(format!(
                        "{object}: {what} {ip} is link-local, multicast, unspecified or a \
                         metadata service's: ignored"
                    ))
                }
                Ok(ip) if !external.contains(&ip) && !cluster_ips.contains(&ip) => {
                    external.push(ip)
                }
                Ok(_) => {}
                Err(_) => problems.push(format!(
                    "{object}: {what} {text:?} is not an IP address: ignored"
                )),
            }
        }
        if cluster_ips.is_empty() {
            continue;
        }
        let tenant = match namespaces.get(namespace) {
            Some(Ok(m)) => m.tenant(),
            _ => None,
        };
        let budget = budgets
            .entry((tenant, if tenant.is_some() { "" } else { namespace }))
            .or_insert(SOURCE_ADDRESSES_PER_TENANT);
        let sources = index.of_service(namespace, name);
        let mut port_problems = BoundedLines::new(&object, PORT_PROBLEMS_PER_SERVICE);
        let mut ports = Vec::new();
        for port in spec.ports.as_deref().unwrap_or_default() {
            // One port more than the merge takes is all it needs to deny the rest, and say
            // so: a Service may list any number (red-team review 70 H1).
            if ports.len() > MAX_SERVICE_PORTS {
                break;
            }
            let port_name = port.name.as_deref().unwrap_or("");
            let Some(protocol) = protocol_named(port.protocol.as_deref()) else {
                port_problems.push(
                    problems,
                    format!(
                        "port {} protocol {:?} is not judged (only TCP and UDP)",
                        port.port,
                        shown(port.protocol.as_deref().unwrap_or(""))
                    ),
                );
                continue;
            };
            let Ok(number) = u16::try_from(port.port) else {
                port_problems.push(problems, format!("port {} is out of range", port.port));
                continue;
            };
            if number == 0 {
                port_problems.push(problems, "port 0 is not a port".to_string());
                continue;
            }
            let backends = match backends(
                &sources,
                (port_name, protocol),
                budget,
                &mut port_problems,
                problems,
            ) {
                Some(backends) => backends,
                None => {
                    // Judged as no ready backend: denied, as the merge denies a port over a
                    // bound.
                    port_problems.push(
                        problems,
                        format!(
                            "port {number}/{protocol}: the tenant's Services list more than \
                             {SOURCE_ADDRESSES_PER_TENANT} backend addresses in all: the port is \
                             denied"
                        ),
                    );
                    Vec::new()
                }
            };
            ports.push(ServicePort {
                port: number,
                protocol,
                backends,
            });
        }
        port_problems.finish(problems);
        out.push(ClusterService {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ips,
            ports,
            external_ips: external,
            tenant: tenant.map(str::to_string),
        });
    }
    out
}

/// An address as the API server's text has it, IPv4-mapped IPv6 (`::ffff:a.b.c.d`, which
/// the API server accepts and kube-proxy treats as IPv4) as its IPv4 address: the kernel
/// hooks look a mapped destination up as IPv4, so kept as IPv6 it would be judged as whoever
/// else has the IPv4 address, or WORLD.
fn parse_ip(text: &str) -> Result<IpAddr, std::net::AddrParseError> {
    text.parse::<IpAddr>().map(|ip| ip.to_canonical())
}

fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// Kubernetes' protocol names; unset is TCP. `None` for SCTP (no hook judges it).
fn protocol_named(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// Port problems listed per Service; the rest are counted in one line (a Service may list
/// any number of ports, each with its problem: red-team review 70 M1).
const PORT_PROBLEMS_PER_SERVICE: usize = 4;

/// Backend addresses the source reads from one tenant's Services in all (each port's, ready
/// or not, duplicates included), past which their ports are denied (judged as no ready
/// backend). Above the merge's own bound ([`MAX_BACKENDS_PER_TENANT`], which counts the
/// distinct backends of the ports it keeps): this one bounds the work and memory of reading
/// what a tenant wrote (EndpointSlices, any number, each address any number of times: red-team
/// review 71 N2), counting every port, also those the merge then denies.
const SOURCE_ADDRESSES_PER_TENANT: usize = 4 * MAX_BACKENDS_PER_TENANT;

/// Problem lines listed per namespace about its pods, and as many about its Services; the
/// rest are counted in one line each. Whoever may create pods or Services in a namespace may
/// create any number, each with problems, and every line is a log line and a
/// `cluster.problem` event on every node (red-team review 70 M1;
/// [`PORT_PROBLEMS_PER_SERVICE`] bounds one Service's). Counted by kind, so that pods named to
/// sort first cannot push a Service's lines out (review 74 L1).
const OBJECT_PROBLEMS_PER_NAMESPACE: usize = 32;

/// `problems` (sorted) with at most [`OBJECT_PROBLEMS_PER_NAMESPACE`] lines about one
/// namespace's pods and as many about its Services (the first in order), and for each that had
/// more, one line that counts the rest; sorted.
fn bounded_per_namespace(problems: Vec<String>) -> Vec<String> {
    let mut listed: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(problems.len());
    for line in problems {
        match object_namespace(&line) {
            Some((kind, namespace)) => {
                let count = listed.entry((kind, namespace.to_string())).or_default();
                *count += 1;
                if *count <= OBJECT_PROBLEMS_PER_NAMESPACE {
                    out.push(line);
                }
            }
            None => out.push(line),
        }
    }
    for ((kind, namespace), count) in listed {
        if count > OBJECT_PROBLEMS_PER_NAMESPACE {
            out.push(format!(
                "namespace {namespace}: {} more problems with its {kind} not listed",
                count - OBJECT_PROBLEMS_PER_NAMESPACE
            ));
        }
    }
    out.sort();
    out
}

/// The kind (plural, as the count line names it) and namespace of a problem line about one
/// pod or Service: the lines that begin with their object, `pod {namespace}/{name}`
/// ([`pod_identity`]) or `service {namespace}/{name}` ([`services`]); names of both hold no
/// `/`.
fn object_namespace(line: &str) -> Option<(&'static str, &str)> {
    let (kind, object) = match line.strip_prefix("pod ") {
        Some(object) => ("pods", object),
        None => ("Services", line.strip_prefix("service ")?),
    };
    Some((kind, object.split_once('/')?.0))
}

/// Problem lines about one object, the first `limit` listed and the rest counted.
struct BoundedLines<'a> {
    object: &'a str,
    limit: usize,
    count: usize,
}

impl<'a> BoundedLines<'a> {
    fn new(object: &'a str, limit: usize) -> Self {
        Self {
            object,
            limit,
            count: 0,
        }
    }

    fn push(&mut self, problems: &mut Vec<String>, line: String) {
        if self.count < self.limit {
            problems.push(format!("{}: {line}", self.object));
        }
        self.count += 1;
    }

    /// The line that counts what was left out (none when nothing was).
    fn finish(self, problems: &mut Vec<String>) {
        if self.count > self.limit {
            problems.push(format!(
                "{}: {} more problems with its ports",
                self.object,
                self.count - self.limit
            ));
        }
    }
}

/// Each Service's backend objects, by (namespace, Service name): built once per round, so
/// that a port's backends are found without reading every slice of the cluster.
enum BackendIndex<'a> {
    EndpointSlices(HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>),
    Endpoints(HashMap<(&'a str, &'a str), Vec<&'a Endpoints>>),
}

/// One Service's backend objects (see [`BackendIndex::of`]).
enum ServiceBackends<'a> {
    EndpointSlices(&'a [&'a EndpointSlice]),
    Endpoints(&'a [&'a Endpoints]),
}

impl<'a> BackendIndex<'a> {
    fn of(source: &'a Backends) -> Self {
        match source {
            Backends::EndpointSlices(slices) => {
                let mut index: HashMap<_, Vec<_>> = HashMap::new();
                for slice in slices {
                    let meta = &slice.metadata;
                    // FQDN slices name no address the hooks see.
                    let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
                    if let (Some(namespace), Some(service)) = (meta.namespace.as_deref(), service) {
                        if slice.address_type != "FQDN" {
                            index
                                .entry((namespace, service.as_str()))
                                .or_default()
                                .push(&**slice);
                        }
                    }
                }
                Self::EndpointSlices(index)
            }
            Backends::Endpoints(list) => {
                let mut index: HashMap<_, Vec<_>> = HashMap::new();
                for endpoints in list {
                    let (namespace, name) = object_key(&endpoints.metadata);
                    index
                        .entry((namespace, name))
                        .or_default()
                        .push(&**endpoints);
                }
                Self::Endpoints(index)
            }
        }
    }

    fn of_service<'s>(&'s self, namespace: &'s str, service: &'s str) -> ServiceBackends<'s> {
        match self {
            Self::EndpointSlices(index) => ServiceBackends::EndpointSlices(
                index.get(&(namespace, service)).map_or(&[], Vec::as_slice),
            ),
            Self::Endpoints(index) => ServiceBackends::Endpoints(
                index.get(&(namespace, service)).map_or(&[], Vec::as_slice),
            ),
        }
    }
}

/// The ready backends of one Service port, matched by port name and protocol (the way
/// kube-proxy matches them), sorted and without duplicates. At most
/// [`MAX_BACKENDS_PER_PORT`] + 1: a port with more is denied by the merge whatever their
/// number, so the rest are not read (a tenant's EndpointSlices may list any number: red-team
/// review 70 H1). Each address read costs one of the tenant's `budget`; `None` when it ran
/// out before the port's were all read (the caller denies the port).
fn backends(
    source: &ServiceBackends,
    (port_name, protocol): (&str, Protocol),
    budget: &mut usize,
    port_problems: &mut BoundedLines,
    problems: &mut Vec<String>,
) -> Option<Vec<Backend>> {
    let mut out = BTreeSet::new();
    // Whether the port is over its bound (the rest is not read) or the budget is spent.
    let mut over = false;
    let mut spent = false;
    // One unit of the budget: `false` (stop reading) when there is none left.
    let mut spend = |budget: &mut usize| match budget.checked_sub(1) {
        Some(left) => {
            *budget = left;
            true
        }
        None => {
            spent = true;
            false
        }
    };
    // Every slice port and address read costs one.
    'read: {
        match source {
            ServiceBackends::EndpointSlices(slices) => {
                for slice in slices.iter() {
                    let object = format!(
                        "endpointslice {}",
                        shown(slice.metadata.name.as_deref().unwrap_or(""))
                    );
                    for port in slice.ports.as_deref().unwrap_or_default() {
                        if !spend(budget) {
                            break 'read;
                        }
                        if port.name.as_deref().unwrap_or("") != port_name
                            || protocol_named(port.protocol.as_deref()) != Some(protocol)
                        {
                            continue;
                        }
                        let Some(number) = port.port else { continue };
                        for endpoint in &slice.endpoints {
                            // EndpointSlice v1: an unset `ready` means ready.
                            let ready = endpoint
                                .conditions
                                .as_ref()
                                .and_then(|c| c.ready)
                                .unwrap_or(true);
                            if !ready {
                                continue;
                            }
                            for address in &endpoint.addresses {
                                if !spend(budget) {
                                    break 'read;
                                }
                                over = add_backend(&mut out, &object, address, number, |line| {
                                    port_problems.push(problems, line)
                                });
                                if over {
                                    break 'read;
                                }
                            }
                        }
                    }
                }
            }
            ServiceBackends::Endpoints(list) => {
                for endpoints in list.iter() {
                    for subset in endpoints.subsets.as_deref().unwrap_or_default() {
                        for port in subset.ports.as_deref().unwrap_or_default() {
                            if !spend(budget) {
                                break 'read;
                            }
                            if port.name.as_deref().unwrap_or("") != port_name
                                || protocol_named(port.protocol.as_deref()) != Some(protocol)
                            {
                                continue;
                            }
                            // `addresses` are the ready ones; `notReadyAddresses` are not.
                            for address in subset.addresses.as_deref().unwrap_or_default() {
                                if !spend(budget) {
                                    break 'read;
                                }
                                over = add_backend(
                                    &mut out,
                                    "endpoints",
                                    &address.ip,
                                    port.port,
                                    |line| port_problems.push(problems, line),
                                );
                                if over {
                                    break 'read;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (over || !spent).then(|| out.into_iter().collect())
}

/// Adds the backend `ip`:`port` read from `object` to `out` (an invalid one is reported to
/// `problem` and left out; target port 0 is no backend). Whether `out` is now over
/// [`MAX_BACKENDS_PER_PORT`].
fn add_backend(
    out: &mut BTreeSet<Backend>,
    object: &str,
    ip: &str,
    port: i32,
    problem: impl FnOnce(String),
) -> bool {
    let (Ok(parsed), Ok(port)) = (parse_ip(ip), u16::try_from(port)) else {
        problem(format!(
            "{object}: backend {:?} port {port} is not an address and port: ignored",
            shown(ip)
        ));
        return false;
    };
    if port != 0 {
        out.insert(Backend { ip: parsed, port });
    }
    out.len() > MAX_BACKENDS_PER_PORT
}

/// Why `value` is not a valid Kubernetes label value (empty, or at most 63 characters of
/// `[A-Za-z0-9_.-]` beginning and ending with an alphanumeric), or `None`.
pub fn label_value_error(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.len() > 63 {
        return Some(format!(
            "not a valid label value ({} characters; at most 63)",
            value.len()
        ));
    }
    name_part_error(value).map(|e| format!("not a valid label value ({e})"))
}

/// Why `key` is not a valid Kubernetes label key (`[prefix/]name`: a DNS subdomain prefix of
/// at most 253 characters, a name of 1 to 63 characters of `[A-Za-z0-9_.-]` beginning and
/// ending with an alphanumeric), or `None`.
pub fn label_key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if let Some(e) = dns_subdomain_error(prefix) {
            return Some(format!("not a valid label key (prefix {prefix:?}: {e})"));
        }
    }
    if name.is_empty() || name.len() > 63 {
        return Some(format!(
            "not a valid label key (name of {} characters; 1 to 63)",
            name.len()
        ));
    }
    name_part_error(name).map(|e| format!("not a valid label key ({e})"))
}

fn name_part_error(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!("character {bad:?} is not allowed"));
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Some("must begin and end with a letter or digit".into());
    }
    None
}

/// Why `s` is not a DNS-1123 subdomain (lowercase, at most 253 characters, dot-separated
/// labels of `[a-z0-9-]` beginning and ending with an alphanumeric), or `None`.
pub fn dns_subdomain_error(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > 253 {
        return Some(format!(
            "not a DNS subdomain ({} characters; 1 to 253)",
            s.len()
        ));
    }
    for part in s.split('.') {
        let b = part.as_bytes();
        let ok = !b.is_empty()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Some(format!(
                "{s:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
            ));
        }
    }
    None
}

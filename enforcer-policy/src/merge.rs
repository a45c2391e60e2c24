//! Merging a [`ClusterState`] into a bundle: which cluster identities and Services become
//! identities, with which numbers, names and addresses, and what is refused (see
//! [`crate::Bundle::load_with_cluster`] for the rules as users see them).
//!
//! Everything in a `ClusterState` is written by tenants (labels, names, Services) or derived
//! from what they write, so it is hostile input: every string is checked before it becomes
//! an attribute, a name or a log line, each tenant's label sets and Services are capped by
//! the quota before any costly step sees them, and the problems one tenant causes are
//! listed at most [`PER_TENANT_PROBLEMS`] times (the rest counted), so that one tenant
//! cannot drown the reports of the others.
//!
//! The result depends on the state's content only, never on its order: identities are taken
//! in canonical label order, Services in (namespace, name) order, pods in (namespace, name)
//! order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use crate::cluster::{
    label_digest, service_digest, Backend, ClusterIdentity, ClusterOptions, ClusterService,
    ClusterState, ServicePort, CLUSTER_IDS, MAX_BACKENDS_PER_PORT, MAX_BACKENDS_PER_TENANT,
    MAX_SERVICE_PORTS,
};
use crate::identity::{validate_spiffe_id, IpNet};
use crate::inventory::Inventory;

/// Labels per identity: the source takes a handful of configured keys.
pub(crate) const MAX_LABELS: usize = 64;
/// ClusterIPs per Service (`spec.clusterIPs`: one per IP family).
pub(crate) const MAX_CLUSTER_IPS: usize = 2;
/// Distinct target ports among one Service port's backends (more than one only during a
/// rollout that changes `targetPort`); each is a separate judgement per subject.
pub(crate) const MAX_TARGET_PORTS: usize = 16;
/// Problem lines about one tenant (or about no tenant); the rest are counted in one line.
pub(crate) const PER_TENANT_PROBLEMS: usize = 20;
/// Problem lines in all (after the per-tenant bound: at most this many tenants are listed).
pub(crate) const PROBLEMS: usize = 2000;

/// A cluster identity that made it in.
pub(crate) struct Workload<'a> {
    pub source: &'a ClusterIdentity,
    pub id: u32,
    pub name: String,
    /// Its pods' addresses that nothing else claims, as host networks, sorted.
    pub ips: Vec<IpNet>,
    /// UIDs of its pods on this node, sorted.
    pub pod_uids: Vec<String>,
    /// Whether one of its pods on this node uses the node's network namespace
    /// (`hostNetwork`): see `flags::SHARED_NETNS`.
    pub host_network: bool,
    pub spiffe_id: Option<String>,
}

/// A Service that made it in.
pub(crate) struct Service {
    pub id: u32,
    pub name: String,
    /// Its namespace's tenant, as the namespace's identities say.
    pub tenant: Option<String>,
    /// Without a tenant, in a system namespace (one whose identities are all tenantless
    /// workloads: cluster DNS): the operator's, like the inventory's tenantless items. A
    /// tenantless Service of any other namespace is no one's.
    pub operator: bool,
    pub ips: Vec<IpNet>,
    /// Valid ports, by (port, protocol), each with its backends sorted and deduplicated.
    pub ports: Vec<ServicePort>,
}

pub(crate) struct Merged<'a> {
    /// In canonical label order.
    pub workloads: Vec<Workload<'a>>,
    /// In (namespace, name) order.
    pub services: Vec<Service>,
    /// Inventory networks of exactly one address that a Service's external address takes
    /// over: the inventory item no longer has them (the kernel's IP cache holds one
    /// identity per network).
    pub taken_over: HashSet<IpNet>,
    /// Every address of the cluster state that no identity holds and the inventory does not
    /// claim (refused pods, contested addresses, left-out Services), as host networks, and
    /// the pod networks ([`pod_networks`]), sorted: UNIDENTIFIED, never WORLD.
    pub unidentified: Vec<IpNet>,
    /// This node's addresses that nothing above claims, as host networks, sorted: the
    /// reserved `host` identity.
    pub host: Vec<IpNet>,
    /// Every other node's addresses that nothing above claims (nor this node): `remote-node`.
    pub remote_nodes: Vec<IpNet>,
    pub problems: Vec<String>,
}

/// Problem lines, bounded per tenant and in all.
#[derive(Default)]
pub(crate) struct Problems {
    /// Lines that are always listed (at most a few per tenant): quotas, unknown tenants.
    summaries: Vec<String>,
    lines: Vec<(Option<String>, String)>,
    per_tenant: HashMap<Option<String>, usize>,
}

impl Problems {
    /// A line listed whatever else the tenant caused: the caller makes at most a few per
    /// tenant.
    fn summary(&mut self, line: String) {
        self.summaries.push(line);
    }

    pub(crate) fn push(&mut self, tenant: Option<&str>, line: String) {
        let tenant = tenant.map(str::to_string);
        let n = self.per_tenant.entry(tenant.clone()).or_default();
        *n += 1;
        if *n <= PER_TENANT_PROBLEMS {
            self.lines.push((tenant, line));
        }
    }

    pub(crate) fn finish(self) -> Vec<String> {
        let mut out = self.summaries;
        out.extend(self.lines.into_iter().map(|(_, l)| l));
        let mut over: Vec<(&Option<String>, &usize)> = self
            .per_tenant
            .iter()
            .filter(|(_, &n)| n > PER_TENANT_PROBLEMS)
            .collect();
        over.sort();
        for (tenant, n) in over {
            out.push(format!(
                "{} more cluster problems of {} not listed (only the first {PER_TENANT_PROBLEMS} are)",
                n - PER_TENANT_PROBLEMS,
                tenant_text(tenant.as_deref())
            ));
        }
        if out.len() > PROBLEMS {
            let more = out.len() - PROBLEMS;
            out.truncate(PROBLEMS);
            out.push(format!(
                "{more} more cluster problems not listed (only the first {PROBLEMS} are)"
            ));
        }
        out
    }
}

fn tenant_text(t: Option<&str>) -> String {
    match t {
        Some(t) => format!("tenant {}", show(t)),
        None => "no tenant".to_string(),
    }
}

/// Hostile text made safe to print on one line: control characters escaped, at most 80
/// characters, in backquotes.
pub(crate) fn show(s: &str) -> String {
    let mut out = String::from("`");
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push_str(&format!("...({} bytes)", s.len()));
            break;
        }
        if c.is_control() || c == '`' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

/// A label set as problem lines show it: `{k=v, ...}`, at most 8 pairs.
pub(crate) fn show_labels(labels: &BTreeMap<String, String>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .take(8)
        .map(|(k, v)| format!("{}={}", show(k), show(v)))
        .collect();
    if labels.len() > 8 {
        parts.push(format!("... {} more", labels.len() - 8));
    }
    format!("{{{}}}", parts.join(", "))
}

fn describe(ci: &ClusterIdentity) -> String {
    format!(
        "label set {} (namespace {}, service account {})",
        show_labels(&ci.labels),
        show(&ci.namespace),
        show(&ci.service_account)
    )
}

fn describe_service(s: &ClusterService) -> String {
    format!("Service {}/{}", show(&s.namespace), show(&s.name))
}

/// RFC 1123 label (a Namespace or Service name): 1-63 of `[a-z0-9-]`, alphanumeric ends.
fn dns_label(s: &str) -> Result<(), String> {
    dns_name(s, 63, false)
}

/// RFC 1123 subdomain (a ServiceAccount name): 1-253 of `[a-z0-9.-]`, alphanumeric ends.
fn dns_subdomain(s: &str) -> Result<(), String> {
    dns_name(s, 253, true)
}

fn dns_name(s: &str, max: usize, dots: bool) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("must be 1 to {max} characters"));
    }
    let ok =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !s.chars().all(ok) || !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err(format!(
            "must be lowercase letters, digits{} and `-`, starting and ending with a letter or digit",
            if dots { ", `.`" } else { "" }
        ));
    }
    Ok(())
}

/// A Kubernetes label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric ends (or empty).
fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if s.len() > 63 || !s.chars().all(ok) || !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("is not a valid Kubernetes label value (at most 63 of letters, digits, `.`, `_`, `-`, starting and ending with a letter or digit)".into());
    }
    Ok(())
}

/// Printable ASCII without spaces, 1 (0 if `empty_ok`) to `max` bytes: what a label key or
/// value, a pod UID or a timestamp must be to be safe as a map key and on a log line.
fn printable(s: &str, max: usize, empty_ok: bool) -> Result<(), String> {
    if (s.is_empty() && !empty_ok) || s.len() > max {
        return Err(format!("must be {} to {max} bytes", usize::from(!empty_ok)));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

fn check_identity(ci: &ClusterIdentity) -> Result<(), String> {
    dns_label(&ci.namespace).map_err(|e| format!("namespace {}", e))?;
    dns_subdomain(&ci.service_account).map_err(|e| format!("service account {e}"))?;
    for (what, v) in [("purpose", &ci.purpose), ("ring", &ci.ring)] {
        if let Some(v) = v {
            label_value(v).map_err(|e| format!("{what} {} {e}", show(v)))?;
        }
    }
    if let Some(t) = &ci.tenant {
        printable(t, 253, false).map_err(|e| format!("tenant {}: {e}", show(t)))?;
    }
    if let Some(k) = &ci.marks.kind {
        printable(k, 63, false).map_err(|e| format!("kind {}: {e}", show(k)))?;
    }
    if ci.marks.datasets.len() > crate::cluster::MAX_DATASETS {
        return Err(format!(
            "{} datasets, more than {}",
            ci.marks.datasets.len(),
            crate::cluster::MAX_DATASETS
        ));
    }
    for d in &ci.marks.datasets {
        label_value(d).map_err(|e| format!("dataset {} {e}", show(d)))?;
    }
    if let Some(limit) = &ci.marks.rate_limit {
        limit.check()?;
    }
    if ci.labels.is_empty() {
        return Err("the label set is empty".into());
    }
    if ci.labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels, more than {MAX_LABELS}",
            ci.labels.len()
        ));
    }
    for (k, v) in &ci.labels {
        printable(k, 317, false).map_err(|e| format!("label key {}: {e}", show(k)))?;
        printable(v, 253, true).map_err(|e| format!("label {} value {}: {e}", show(k), show(v)))?;
    }
    Ok(())
}

/// The inventory's addresses, for "is this address the inventory's?" in a few hash lookups.
struct InventoryNets<'a> {
    /// (is IPv6, prefix, masked address) -> owner and network.
    nets: HashMap<(bool, u8, u128), (&'a str, IpNet)>,
    lens_v4: BTreeSet<u8>,
    lens_v6: BTreeSet<u8>,
}

fn bits(ip: &IpAddr) -> (bool, u128, u8) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(*a) as u128, 32),
        IpAddr::V6(a) => (true, u128::from(*a), 128),
    }
}

fn masked(a: u128, width: u8, prefix: u8) -> u128 {
    a & mask_bits(width, prefix)
}

/// The top `prefix` bits of a `width`-bit address.
fn mask_bits(width: u8, prefix: u8) -> u128 {
    let all = if width == 128 {
        !0u128
    } else {
        (1u128 << width) - 1
    };
    match prefix {
        0 => 0,
        p if p >= width => all,
        p => all & !(all >> p),
    }
}

impl<'a> InventoryNets<'a> {
    fn new(inv: &'a Inventory) -> Self {
        let mut n = InventoryNets {
            nets: HashMap::new(),
            lens_v4: BTreeSet::new(),
            lens_v6: BTreeSet::new(),
        };
        let items = inv
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), &w.ips))
            .chain(inv.endpoints.iter().map(|e| (e.name.as_str(), &e.ips)));
        for (name, ips) in items {
            for net in ips {
                let (v6, a, width) = bits(&net.addr);
                if v6 {
                    n.lens_v6.insert(net.prefix);
                } else {
                    n.lens_v4.insert(net.prefix);
                }
                n.nets
                    .entry((v6, net.prefix, masked(a, width, net.prefix)))
                    .or_insert((name, *net));
            }
        }
        n
    }

    /// The inventory item whose network is exactly `net`, if any.
    fn exact(&self, net: &IpNet) -> Option<&'a str> {
        let (v6, a, width) = bits(&net.addr);
        self.nets
            .get(&(v6, net.prefix, masked(a, width, net.prefix)))
            .map(|(owner, _)| *owner)
    }

    /// Whether an inventory network holds `inner` and is longer than `/outer` (it lies
    /// between `inner` and a network of that prefix around it).
    fn any_between(&self, inner: &IpNet, outer: u8) -> bool {
        let (v6, a, width) = bits(&inner.addr);
        let lens = if v6 { &self.lens_v6 } else { &self.lens_v4 };
        lens.range(outer + 1..=inner.prefix)
            .any(|&p| self.nets.contains_key(&(v6, p, masked(a, width, p))))
    }

    /// The inventory item whose network holds `ip`, if any.
    fn claim(&self, ip: &IpAddr) -> Option<(&'a str, IpNet)> {
        let (v6, a, width) = bits(ip);
        let lens = if v6 { &self.lens_v6 } else { &self.lens_v4 };
        lens.iter()
            .rev()
            .find_map(|&p| self.nets.get(&(v6, p, masked(a, width, p))).copied())
    }
}

/// The entries of one label set (the same set listed more than once, attributes alike).
type LabelSet<'a> = Vec<&'a ClusterIdentity>;

/// A label set in the quota's order: (its oldest pod's creation time, its position in
/// canonical order, the set).
type Ranked<'a> = (Option<String>, usize, LabelSet<'a>);

/// Who claims a cluster address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Owner {
    Workload(usize),
    Service(usize),
}

/// What an identity number is for: its canonical key (the order collisions are resolved in).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Workload(&'a BTreeMap<String, String>),
    Service(&'a str, &'a str),
}

pub(crate) fn host_net(ip: IpAddr) -> IpNet {
    IpNet {
        addr: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    }
}

/// The merge. `tenants`: the inventory's tenant names (cluster identities must name one);
/// `taken_names`: every inventory name (and `world`), which cluster names must not be.
pub(crate) fn merge<'a>(
    inv: &Inventory,
    tenants: &BTreeSet<&str>,
    taken_names: &HashSet<&str>,
    state: &'a ClusterState,
    options: &ClusterOptions,
) -> Merged<'a> {
    let mut problems = Problems::default();

    // 1. Valid label sets of known tenants.
    let mut valid: Vec<&ClusterIdentity> = Vec::with_capacity(state.identities.len());
    let mut unknown_tenants: BTreeMap<&str, (usize, BTreeSet<&str>)> = BTreeMap::new();
    for ci in &state.identities {
        if let Err(e) = check_identity(ci) {
            problems.push(
                ci.tenant.as_deref(),
                format!(
                    "cluster {}: {e}; left out (its pods are unknown subjects)",
                    describe(ci)
                ),
            );
            continue;
        }
        if let Some(t) = ci.tenant.as_deref() {
            if !tenants.contains(t) {
                let u = unknown_tenants.entry(t).or_default();
                u.0 += 1;
                u.1.insert(&ci.namespace);
                continue;
            }
        }
        valid.push(ci);
    }
    if unknown_tenants.len() > PER_TENANT_PROBLEMS {
        let sets: usize = unknown_tenants
            .values()
            .skip(PER_TENANT_PROBLEMS)
            .map(|(n, _)| n)
            .sum();
        problems.summary(format!(
            "{} more tenants not declared in {} ({sets} label sets left out) not listed",
            unknown_tenants.len() - PER_TENANT_PROBLEMS,
            crate::INVENTORY_FILE
        ));
    }
    for (t, (n, namespaces)) in unknown_tenants.iter().take(PER_TENANT_PROBLEMS) {
        let mut ns: Vec<String> = namespaces.iter().take(5).map(|n| show(n)).collect();
        if namespaces.len() > 5 {
            ns.push(format!("... {} more", namespaces.len() - 5));
        }
        problems.summary(
            format!(
                "tenant {} (namespaces {}) is not declared in {}: its {n} label sets are left out (their pods are unknown subjects); declare it under `tenants:`",
                show(t),
                ns.join(", "),
                crate::INVENTORY_FILE
            ),
        );
    }
    // Canonical order: by label set, then by everything else (duplicates, below).
    valid.sort_by(|a, b| {
        (
            &a.labels,
            &a.namespace,
            &a.service_account,
            &a.tenant,
            &a.purpose,
            &a.ring,
        )
            .cmp(&(
                &b.labels,
                &b.namespace,
                &b.service_account,
                &b.tenant,
                &b.purpose,
                &b.ring,
            ))
    });

    // 2. One entry per label set. The same set twice with the same attributes is one
    // identity (its pods merged); with different attributes it is ambiguous: left out.
    let mut sets: Vec<Vec<&ClusterIdentity>> = Vec::new();
    for ci in valid {
        match sets.last_mut() {
            Some(last) if last[0].labels == ci.labels => last.push(ci),
            _ => sets.push(vec![ci]),
        }
    }
    let same_attrs = |a: &ClusterIdentity, b: &ClusterIdentity| {
        (
            &a.namespace,
            &a.service_account,
            &a.tenant,
            &a.purpose,
            &a.ring,
            &a.marks,
        ) == (
            &b.namespace,
            &b.service_account,
            &b.tenant,
            &b.purpose,
            &b.ring,
            &b.marks,
        )
    };
    sets.retain(|set| {
        let consistent = set.iter().all(|ci| same_attrs(ci, set[0]));
        if !consistent {
            problems.push(
                set[0].tenant.as_deref(),
                format!(
                    "cluster {} appears {} times with different namespaces, service accounts, tenants, purposes, rings or destination marks: left out (never guessed; its pods are unknown subjects)",
                    describe(set[0]),
                    set.len()
                ),
            );
        }
        consistent
    });

    // Namespace -> tenant, from every valid identity (before the quota): a Service's tenant.
    let mut namespace_tenant: HashMap<&str, Option<&str>> = HashMap::new();
    let mut mixed: HashSet<&str> = HashSet::new();
    for set in &sets {
        let ci = set[0];
        match namespace_tenant.get(ci.namespace.as_str()) {
            None => {
                namespace_tenant.insert(&ci.namespace, ci.tenant.as_deref());
            }
            Some(t) if *t != ci.tenant.as_deref() => {
                mixed.insert(&ci.namespace);
            }
            Some(_) => {}
        }
    }
    for ns in &mixed {
        namespace_tenant.insert(ns, None);
    }

    // 3. The quota, per tenant: the oldest label sets (by their oldest pod) stay.
    let quota = options.max_identities_per_tenant;
    let oldest = |set: &Vec<&ClusterIdentity>| -> Option<String> {
        set.iter()
            .flat_map(|ci| &ci.pods)
            .map(|p| p.created.as_str())
            .min()
            .map(str::to_string)
    };
    let mut by_tenant: BTreeMap<Option<&str>, Vec<Ranked>> = BTreeMap::new();
    for (position, set) in sets.into_iter().enumerate() {
        let t = set[0].tenant.as_deref();
        by_tenant
            .entry(t)
            .or_default()
            .push((oldest(&set), position, set));
    }
    let mut kept: Vec<(usize, LabelSet)> = Vec::new();
    for (tenant, mut sets) in by_tenant {
        // Identities without pods go last; then older first; then by label set (the
        // canonical position).
        sets.sort_by(|(ca, pa, _), (cb, pb, _)| {
            (ca.is_none(), ca, pa).cmp(&(cb.is_none(), cb, pb))
        });
        if sets.len() > quota {
            let left: Vec<&LabelSet> = sets[quota..].iter().map(|(_, _, s)| s).collect();
            problems.summary(
                format!(
                    "{}: {} identity label sets, more than the quota of {quota} (max_identities_per_tenant): the {} newest are left out (their pods are unknown subjects), the first of them {}",
                    tenant_text(tenant),
                    sets.len(),
                    left.len(),
                    describe(left[0][0])
                ),
            );
            sets.truncate(quota);
        }
        kept.extend(sets.into_iter().map(|(_, position, s)| (position, s)));
    }
    kept.sort_unstable_by_key(|(position, _)| *position);
    let kept: Vec<LabelSet> = kept.into_iter().map(|(_, s)| s).collect();

    // 4. Services: valid ones, their ports, the quota per tenant.
    let mut services: Vec<(&ClusterService, Option<&str>, bool, Vec<ServicePort>)> = Vec::new();
    let mut sorted_services: Vec<&ClusterService> = state.services.iter().collect();
    // Within the tenantless quota, the Services of namespaces whose pods are tenantless
    // workloads (system namespaces: cluster DNS) go first: a namespace without any tenant
    // that sorts earlier must not push them out.
    let not_system = |s: &ClusterService| {
        s.tenant.is_some() || namespace_tenant.get(s.namespace.as_str()) != Some(&None)
    };
    sorted_services.sort_by(|a, b| {
        (not_system(a), &a.namespace, &a.name, &a.cluster_ips).cmp(&(
            not_system(b),
            &b.namespace,
            &b.name,
            &b.cluster_ips,
        ))
    });
    let mut seen_services: HashSet<(&str, &str)> = HashSet::new();
    let mut services_of: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    let mut backends_of: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    let mut services_left: BTreeMap<Option<&str>, Vec<&ClusterService>> = BTreeMap::new();
    // Services of a tenant the inventory does not declare are left out like its label sets:
    // counted as tenantless they would take the system namespaces' quota (cluster DNS).
    let mut undeclared_services: BTreeMap<&str, (usize, &ClusterService)> = BTreeMap::new();
    for s in sorted_services {
        if let Some(t) = s.tenant.as_deref().filter(|t| !tenants.contains(t)) {
            undeclared_services.entry(t).or_insert((0, s)).0 += 1;
            continue;
        }
        let tenant = s
            .tenant
            .as_deref()
            .filter(|t| tenants.contains(t))
            .or_else(|| {
                namespace_tenant
                    .get(s.namespace.as_str())
                    .copied()
                    .flatten()
            });
        let checked = dns_label(&s.namespace)
            .map_err(|e| format!("namespace {e}"))
            .and_then(|()| dns_label(&s.name).map_err(|e| format!("name {e}")));
        if let Err(e) = checked {
            problems.push(
                tenant,
                format!("cluster {}: {e}; left out", describe_service(s)),
            );
            continue;
        }
        if s.cluster_ips.is_empty() {
            continue; // Headless: clients reach the pod addresses.
        }
        if !seen_services.insert((&s.namespace, &s.name)) {
            problems.push(
                tenant,
                format!(
                    "cluster {} is listed twice: the second is left out",
                    describe_service(s)
                ),
            );
            continue;
        }
        let n = services_of.entry(tenant).or_default();
        if *n >= quota {
            services_left.entry(tenant).or_default().push(s);
            continue;
        }
        *n += 1;
        let budget = backends_of.entry(tenant).or_default();
        let ports = service_ports(s, tenant, budget, &mut problems);
        let operator = tenant.is_none()
            && namespace_tenant.get(s.namespace.as_str()) == Some(&None)
            && !mixed.contains(s.namespace.as_str());
        services.push((s, tenant, operator, ports));
    }
    // Back to the canonical order (by namespace and name), which the numbering relies on.
    services.sort_by(|(a, _, _, _), (b, _, _, _)| {
        (&a.namespace, &a.name, &a.cluster_ips).cmp(&(&b.namespace, &b.name, &b.cluster_ips))
    });
    for (t, (n, first)) in undeclared_services.iter().take(PER_TENANT_PROBLEMS) {
        problems.summary(format!(
            "tenant {} is not declared in {}: its {n} Services are left out (their addresses are unidentified: every call to them is denied), the first {}; declare it under `tenants:`",
            show(t),
            crate::INVENTORY_FILE,
            describe_service(first)
        ));
    }
    if undeclared_services.len() > PER_TENANT_PROBLEMS {
        problems.summary(format!(
            "{} more tenants not declared in {} (their Services left out) not listed",
            undeclared_services.len() - PER_TENANT_PROBLEMS,
            crate::INVENTORY_FILE
        ));
    }
    for (tenant, left) in &services_left {
        problems.summary(
            format!(
                "{}: more than the quota of {quota} Services (max_identities_per_tenant): {} left out (their addresses are unidentified: every call to them is denied), the first {}",
                tenant_text(*tenant),
                left.len(),
                describe_service(left[0])
            ),
        );
    }

    // 5. Addresses: the inventory's win; an address two cluster owners claim is nobody's.
    let inv_nets = InventoryNets::new(inv);
    // The first claimant of each address, and every claimant of a contested one.
    let mut claims: HashMap<IpAddr, Owner> = HashMap::with_capacity(state.identities.len() * 4);
    let mut contested: BTreeMap<IpAddr, BTreeSet<Owner>> = BTreeMap::new();
    let mut claim = |ip: IpAddr, owner: Owner| match claims.get(&ip) {
        None => {
            claims.insert(ip, owner);
        }
        Some(&first) if first != owner => {
            let all = contested.entry(ip).or_default();
            all.insert(first);
            all.insert(owner);
        }
        Some(_) => {}
    };
    let mut pod_uids: Vec<Vec<String>> = vec![Vec::new(); kept.len()];
    let mut host_network = vec![false; kept.len()];
    for (wi, set) in kept.iter().enumerate() {
        let tenant = set[0].tenant.as_deref();
        for ci in set {
            for pod in &ci.pods {
                let pod_name = || format!("pod {}/{}", show(&pod.namespace), show(&pod.name));
                if pod.namespace != ci.namespace {
                    problems.push(
                        tenant,
                        format!(
                            "{} is listed under a label set of namespace {}: ignored",
                            pod_name(),
                            show(&ci.namespace)
                        ),
                    );
                    continue;
                }
                if let Err(e) = printable(&pod.uid, 128, false) {
                    problems.push(tenant, format!("{}: uid {e}: ignored", pod_name()));
                    continue;
                }
                let local = !options.node_name.is_empty()
                    && pod.node.as_deref() == Some(options.node_name.as_str());
                if local {
                    pod_uids[wi].push(pod.uid.clone());
                }
                if pod.host_network {
                    host_network[wi] |= local;
                    continue; // The node's addresses identify nothing.
                }
                for ip in &pod.ips {
                    if let Some((owner, net)) = inv_nets.claim(ip) {
                        problems.push(
                            tenant,
                            format!(
                                "{} address {ip} is in {net} of inventory `{owner}`: the inventory wins, the address stays `{owner}`'s",
                                pod_name()
                            ),
                        );
                        continue;
                    }
                    claim(*ip, Owner::Workload(wi));
                }
            }
        }
    }
    for (si, (s, tenant, _, _)) in services.iter().enumerate() {
        if s.cluster_ips.len() > MAX_CLUSTER_IPS {
            problems.push(
                *tenant,
                format!(
                    "cluster {}: {} ClusterIPs, more than {MAX_CLUSTER_IPS} (one per family): the rest are ignored",
                    describe_service(s),
                    s.cluster_ips.len()
                ),
            );
        }
        for ip in s.cluster_ips.iter().take(MAX_CLUSTER_IPS) {
            if let Some((owner, net)) = inv_nets.claim(ip) {
                problems.push(
                    *tenant,
                    format!(
                        "{} ClusterIP {ip} is in {net} of inventory `{owner}`: the inventory wins, the address stays `{owner}`'s",
                        describe_service(s)
                    ),
                );
                continue;
            }
            claim(*ip, Owner::Service(si));
        }
    }
    // External addresses: kube-proxy sends the Service's ports there to its backends,
    // whatever else has the address, so the Service takes it from the inventory and from
    // pods (fail closed for their other ports: undeclared on the Service). Two Services
    // on one external address are a conflict like any other (below).
    let mut external: BTreeMap<IpAddr, BTreeSet<usize>> = BTreeMap::new();
    for (si, (s, _, _, _)) in services.iter().enumerate() {
        for ip in &s.external_ips {
            if !s.cluster_ips.contains(ip) {
                external.entry(*ip).or_default().insert(si);
            }
        }
    }
    let mut taken_over = HashSet::new();
    let node_of: HashMap<IpAddr, &str> = state
        .nodes
        .iter()
        .flat_map(|(node, ips)| ips.iter().map(move |ip| (*ip, node.as_str())))
        .collect();
    for (ip, by) in &external {
        let first = *by.iter().next().expect("at least one Service");
        let (s, tenant, _, _) = &services[first];
        let mut earlier: BTreeSet<Owner> = contested.get(ip).cloned().unwrap_or_default();
        earlier.extend(claims.get(ip).copied());
        let mut previous: Vec<String> = earlier
            .iter()
            .filter(|o| !matches!(o, Owner::Service(i) if by.contains(i)))
            .map(|o| match *o {
                Owner::Workload(w) => format!("cluster {}", describe(kept[w][0])),
                Owner::Service(i) => format!("cluster {}", describe_service(services[i].0)),
            })
            .collect();
        if let Some((owner, net)) = inv_nets.claim(ip) {
            previous.push(format!("inventory `{owner}` ({net})"));
            if net == host_net(*ip) {
                taken_over.insert(net);
            }
        }
        if let Some(node) = node_of.get(ip) {
            previous.push(format!("an address of node {}", show(node)));
        }
        if by.len() == 1 {
            claims.insert(*ip, Owner::Service(first));
            contested.remove(ip);
        } else {
            claims.insert(*ip, Owner::Service(first));
            contested
                .entry(*ip)
                .or_default()
                .extend(by.iter().map(|&i| Owner::Service(i)));
        }
        if !previous.is_empty() && by.len() == 1 {
            problems.push(
                *tenant,
                format!(
                    "{} has external address {ip}, which is also {}: kube-proxy sends the Service's ports there to its backends, so the address is judged as the Service (its other ports are denied)",
                    describe_service(s),
                    previous.join(" and ")
                ),
            );
        }
    }
    let mut workload_ips: Vec<Vec<IpNet>> = vec![Vec::new(); kept.len()];
    let mut service_ips: Vec<Vec<IpNet>> = vec![Vec::new(); services.len()];
    for (ip, owner) in &claims {
        if contested.contains_key(ip) {
            continue;
        }
        match *owner {
            Owner::Workload(w) => workload_ips[w].push(host_net(*ip)),
            Owner::Service(s) => service_ips[s].push(host_net(*ip)),
        }
    }
    let owner_text = |o: &Owner| match *o {
        Owner::Workload(w) => format!("cluster {}", describe(kept[w][0])),
        Owner::Service(s) => format!("cluster {}", describe_service(services[s].0)),
    };
    let owner_tenant = |o: &Owner| match *o {
        Owner::Workload(w) => kept[w][0].tenant.as_deref(),
        Owner::Service(s) => services[s].1,
    };
    for (ip, owners) in &contested {
        let names: Vec<String> = owners.iter().map(owner_text).collect();
        let first = owners.iter().next().and_then(owner_tenant);
        problems.push(
            first,
            format!(
                "address {ip} is claimed by {}: nobody gets it (it is unidentified: every call to it is denied) until one claim is gone",
                names.join(" and ")
            ),
        );
    }
    // Left-out Services' external addresses: kube-proxy still redirects them, so they are
    // nobody's, not even the inventory's or a pod's.
    let admitted: HashSet<(&str, &str)> = services
        .iter()
        .map(|(s, _, _, _)| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    let left_out_external: BTreeSet<IpAddr> = state
        .services
        .iter()
        .filter(|s| !admitted.contains(&(s.namespace.as_str(), s.name.as_str())))
        .flat_map(|s| s.external_ips.iter().copied())
        .collect();
    for ip in &left_out_external {
        if let Some((_, net)) = inv_nets.claim(ip) {
            if net == host_net(*ip) {
                taken_over.insert(net);
            }
        }
    }
    for ips in workload_ips.iter_mut().chain(service_ips.iter_mut()) {
        ips.retain(|n| !left_out_external.contains(&n.addr));
        ips.sort();
    }
    let unidentified = unidentified_addresses(
        state,
        &inv_nets,
        &left_out_external,
        workload_ips.iter().chain(service_ips.iter()).flatten(),
    );
    let (host, remote_nodes) = node_addresses(
        state,
        &options.node_name,
        &inv_nets,
        workload_ips
            .iter()
            .chain(service_ips.iter())
            .flatten()
            .chain(&unidentified),
    );
    // After the nodes: a network's own address (`10.244.1.0`) claims nothing above.
    let mut unidentified = unidentified;
    unidentified.extend(pod_networks(state, options, &inv_nets, &mut problems));
    if !options.node_name.is_empty() {
        let claimed: HashSet<IpNet> = workload_ips
            .iter()
            .chain(service_ips.iter())
            .flatten()
            .chain(&unidentified)
            .chain(&host)
            .chain(&remote_nodes)
            .copied()
            .collect();
        unidentified.extend(
            crate::cluster::metadata_addresses()
                .map(host_net)
                .filter(|net| !claimed.contains(net) && inv_nets.exact(net).is_none()),
        );
    }
    unidentified.sort();

    // 6. Numbers: the preferred hash unless another key of the pool prefers it too; then
    // the first key in canonical order keeps it and the others probe upwards for a number
    // no key of the pool prefers.
    let mut keys: Vec<(Key, [u8; 32])> = kept
        .iter()
        .map(|set| (Key::Workload(&set[0].labels), label_digest(&set[0].labels)))
        .collect();
    keys.extend(services.iter().map(|(s, _, _, _)| {
        (
            Key::Service(&s.namespace, &s.name),
            service_digest(&s.namespace, &s.name),
        )
    }));
    // `identity_number` and `service_number` of the keys, from their digests.
    let preferred: Vec<u32> = keys
        .iter()
        .map(|(_, d)| crate::cluster::in_cluster_range(d))
        .collect();
    let preferred_set: HashSet<u32> = preferred.iter().copied().collect();
    // `keys` is in canonical order already: label sets by labels, then Services by name.
    debug_assert!(keys.windows(2).all(|w| w[0].0 < w[1].0));
    let order = 0..keys.len();
    let mut ids: Vec<u32> = vec![0; keys.len()];
    let mut taken: HashMap<u32, usize> = HashMap::new();
    let mut losers = Vec::new();
    for i in order {
        match taken.get(&preferred[i]) {
            None => {
                taken.insert(preferred[i], i);
                ids[i] = preferred[i];
            }
            Some(&winner) => losers.push((i, winner)),
        }
    }
    let key_text = |i: usize| match keys[i].0 {
        Key::Workload(_) => format!("cluster {}", describe(kept[i][0])),
        Key::Service(..) => format!("cluster {}", describe_service(services[i - kept.len()].0)),
    };
    let key_tenant = |i: usize| {
        if i < kept.len() {
            kept[i][0].tenant.as_deref()
        } else {
            services[i - kept.len()].1
        }
    };
    let mut assigned: HashSet<u32> = taken.keys().copied().collect();
    for (i, winner) in losers {
        let mut id = preferred[i];
        loop {
            id = if id + 1 == CLUSTER_IDS.end {
                CLUSTER_IDS.start
            } else {
                id + 1
            };
            if !preferred_set.contains(&id) && !assigned.contains(&id) {
                break;
            }
        }
        assigned.insert(id);
        ids[i] = id;
        problems.push(
            key_tenant(i),
            format!(
                "identity number collision: {} and {} both hash to {}; the first keeps it, the second takes {id} (every node that sees both resolves it so); they stay distinct identities",
                key_text(winner),
                key_text(i),
                preferred[i]
            ),
        );
    }

    // 7. Names: `<namespace>/<service account>#<hash>` and `service/<namespace>/<name>`.
    // A label set's name always carries the suffix from its hash: a name that changed
    // whenever another label set of the same service account came or went would let a
    // tenant make a policy that names one stop applying. A Service name is unique by itself
    // and gets the suffix only where the inventory has the name. Where two suffixes are
    // alike (a crafted pair of label sets of one service account), both get more digits.
    let bases: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, _))| match k {
            Key::Workload(_) => format!("{}/{}", kept[i][0].namespace, kept[i][0].service_account),
            Key::Service(ns, name) => format!("service/{ns}/{name}"),
        })
        .collect();
    let mut base_count: HashMap<&str, usize> = HashMap::new();
    for b in &bases {
        *base_count.entry(b).or_default() += 1;
    }
    let mut names: Vec<Option<String>> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let plain = matches!(keys[i].0, Key::Service(..))
                && base_count[b.as_str()] == 1
                && !taken_names.contains(b.as_str());
            plain.then(|| b.clone())
        })
        .collect();
    for bytes in [4usize, 8, 16, 32] {
        let pending: Vec<usize> = (0..keys.len()).filter(|&i| names[i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        let candidate = |i: usize| {
            let hex: String = keys[i].1[..bytes]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{}#{hex}", bases[i])
        };
        let mut count: HashMap<String, usize> = HashMap::new();
        for &i in &pending {
            *count.entry(candidate(i)).or_default() += 1;
        }
        for i in pending {
            let c = candidate(i);
            if count[&c] == 1 && !taken_names.contains(c.as_str()) {
                names[i] = Some(c);
            }
        }
    }

    let trust_domain = if state.trust_domain.contains('/') {
        Err("it contains `/`".to_string())
    } else {
        validate_spiffe_id(&format!("spiffe://{}", state.trust_domain))
    };
    let spiffe_base = match trust_domain {
        Ok(()) => Some(state.trust_domain.as_str()),
        Err(e) => {
            if !kept.is_empty() {
                problems.push(
                    None,
                    format!(
                        "the trust domain {} is not valid ({e}): cluster identities have no SPIFFE ID",
                        show(&state.trust_domain)
                    ),
                );
            }
            None
        }
    };

    let mut workloads = Vec::with_capacity(kept.len());
    for (i, set) in kept.iter().enumerate() {
        let ci = set[0];
        let Some(name) = names[i].take() else {
            problems.push(
                ci.tenant.as_deref(),
                format!(
                    "cluster {}: no name that the inventory does not use: left out",
                    describe(ci)
                ),
            );
            continue;
        };
        let spiffe_id = spiffe_base.map(|td| {
            format!(
                "spiffe://{td}/ns/{}/sa/{}",
                ci.namespace, ci.service_account
            )
        });
        workloads.push(Workload {
            source: ci,
            id: ids[i],
            name,
            ips: std::mem::take(&mut workload_ips[i]),
            pod_uids: {
                let mut uids = std::mem::take(&mut pod_uids[i]);
                uids.sort();
                uids.dedup();
                uids
            },
            host_network: host_network[i],
            spiffe_id: spiffe_id.filter(|s| validate_spiffe_id(s).is_ok()),
        });
    }
    let mut out_services = Vec::with_capacity(services.len());
    for (si, (s, tenant, operator, ports)) in services.into_iter().enumerate() {
        let i = kept.len() + si;
        let Some(name) = names[i].take() else {
            problems.push(
                tenant,
                format!(
                    "cluster {}: no name that the inventory does not use: left out",
                    describe_service(s)
                ),
            );
            continue;
        };
        out_services.push(Service {
            id: ids[i],
            name,
            tenant: tenant.map(str::to_string),
            operator,
            ips: std::mem::take(&mut service_ips[si]),
            ports,
        });
    }
    Merged {
        workloads,
        services: out_services,
        taken_over,
        unidentified,
        host,
        remote_nodes,
        problems: problems.finish(),
    }
}

/// The nodes' addresses that no identity, no UNIDENTIFIED address (`claimed`) and no
/// inventory host entry holds (and that [`crate::cluster::node_address_usable`] accepts): (this node's, every
/// other node's), as sorted host networks, this node's with the [`LINK_LOCAL`] networks on a
/// node of a cluster (`this_node` not empty). An
/// address two nodes report (a node replaced under the same address while pods of the old
/// one are still listed) is this node's if one of them is this node: either way it is a
/// node's, never World's. A claim wins over a node because it is more specific: a Service's
/// external address on a node is judged as the Service (kube-proxy redirects it, and it is
/// reported), an inventory host entry is the operator's word.
fn node_addresses<'a>(
    state: &ClusterState,
    this_node: &str,
    inv_nets: &InventoryNets,
    claimed: impl Iterator<Item = &'a IpNet>,
) -> (Vec<IpNet>, Vec<IpNet>) {
    let claimed: HashSet<IpAddr> = claimed.map(|n| n.addr).collect();
    // An inventory prefix that holds a node's address (`10.0.0.0/8`, `0.0.0.0/0`) is less
    // specific than the node's host entry, which wins in the kernel's IP cache too.
    let inventory_host = |ip: &IpAddr| {
        inv_nets
            .claim(ip)
            .is_some_and(|(_, net)| net == host_net(*ip))
    };
    let free = |ip: &&IpAddr| {
        !claimed.contains(*ip) && !inventory_host(ip) && crate::cluster::node_address_usable(ip)
    };
    let (mut host, mut remote) = (BTreeSet::new(), BTreeSet::new());
    for (node, ips) in &state.nodes {
        let set = if !this_node.is_empty() && node == this_node {
            &mut host
        } else {
            &mut remote
        };
        set.extend(ips.iter().filter(free).copied());
    }
    let remote = remote.difference(&host).copied().map(host_net).collect();
    let mut host: Vec<IpNet> = host.into_iter().map(host_net).collect();
    if !this_node.is_empty() {
        host.extend(
            LINK_LOCAL
                .into_iter()
                .filter(|net| inv_nets.exact(net).is_none()),
        );
        host.sort();
    }
    (host, remote)
}

/// The link-local networks, `169.254.0.0/16` and `fe80::/10` (RFC 3927, RFC 4291).
///
/// On a node of a cluster (a node name is configured) they are `host`: from a pod, a
/// link-local destination is on the pod's own link, so it is the node (the veth peer, the
/// kubelet listening on every address, node-local DNS at `169.254.20.10`) or what the node's
/// route leads to there: a cloud's instance metadata service at `169.254.169.254`, which
/// [`crate::cluster::metadata_addresses`] makes UNIDENTIFIED (with its NAT64 form). Never World, which a policy may open. An
/// inventory host entry inside them is more specific and wins; an inventory network equal to
/// one keeps it. The loopback
/// networks stay World's: a pod's `127.0.0.1` is its own.
pub(crate) const LINK_LOCAL: [IpNet; 2] = [
    IpNet {
        addr: IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 0, 0)),
        prefix: 16,
    },
    IpNet {
        addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
        prefix: 10,
    },
];

/// The pod networks as UNIDENTIFIED networks: the configured cluster CIDRs and the Nodes'
/// `spec.podCIDRs` that pass [`crate::cluster::node_pod_cidr_problem`]. The more specific
/// entries of the IP cache (pods, Services, nodes, inventory entries) win inside them, so
/// only what none of those holds is left: a pod not delivered yet, a stale address, another
/// node's CNI gateway or tunnel device (flannel's `cni0` and `flannel.1`, Cilium's
/// `cilium_host`, Calico's tunnel address all come from the pod networks). Left out, and
/// reported: a Node's network that fails its checks, and one an inventory item names
/// exactly (the operator's word; the IP cache holds one identity per network). A network
/// inside another one taken is dropped (one IP cache entry serves), unless an inventory
/// network lies between them, which it then keeps from the outer one.
fn pod_networks(
    state: &ClusterState,
    options: &ClusterOptions,
    inv_nets: &InventoryNets,
    problems: &mut Problems,
) -> Vec<IpNet> {
    let mut taken: Vec<IpNet> = options.cluster_cidrs.clone();
    for net in &state.pod_cidrs {
        match crate::cluster::node_pod_cidr_problem(net, &options.cluster_cidrs) {
            Some(problem) => problems.summary(format!(
                "a Node's pod network {net}: {problem}; left out (its free addresses stay World's)"
            )),
            None => taken.push(*net),
        }
    }
    taken.sort();
    taken.dedup();
    taken.retain(|net| match inv_nets.exact(net) {
        Some(owner) => {
            problems.summary(format!(
                "pod network {net} is also the inventory's `{owner}`: it stays `{owner}`"
            ));
            false
        }
        None => true,
    });
    let inside = |inner: &IpNet, outer: &IpNet| {
        outer.prefix < inner.prefix
            && outer.contains(&inner.addr)
            && !inv_nets.any_between(inner, outer.prefix)
    };
    let all = taken.clone();
    taken.retain(|inner| !all.iter().any(|outer| inside(inner, outer)));
    taken
}

/// Every address the state mentions (pods, refused pods, ClusterIPs, external addresses)
/// that is in no identity (`identified`) and that the inventory does not claim, as sorted
/// host networks; a left-out Service's external address even where the inventory claims it.
/// What the merge refused stays denied: never WORLD, which a policy may open.
fn unidentified_addresses<'a>(
    state: &ClusterState,
    inv_nets: &InventoryNets,
    left_out_external: &BTreeSet<IpAddr>,
    identified: impl Iterator<Item = &'a IpNet>,
) -> Vec<IpNet> {
    let identified: HashSet<IpAddr> = identified.map(|n| n.addr).collect();
    let pods = state
        .identities
        .iter()
        .flat_map(|ci| &ci.pods)
        .filter(|p| !p.host_network)
        .flat_map(|p| &p.ips);
    let services = state
        .services
        .iter()
        .flat_map(|s| s.cluster_ips.iter().chain(&s.external_ips));
    let all: BTreeSet<IpAddr> = pods
        .chain(services)
        .chain(&state.unidentified_ips)
        .copied()
        .collect();
    all.into_iter()
        .filter(|ip| !identified.contains(ip))
        .filter(|ip| left_out_external.contains(ip) || inv_nets.claim(ip).is_none())
        .map(host_net)
        .collect()
}

/// A Service's valid ports, by (port, protocol), backends sorted and deduplicated.
fn service_ports(
    s: &ClusterService,
    tenant: Option<&str>,
    tenant_backends: &mut usize,
    problems: &mut Problems,
) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = Vec::new();
    let mut seen = HashSet::new();
    for p in &s.ports {
        if ports.len() == MAX_SERVICE_PORTS {
            problems.push(
                tenant,
                format!(
                    "cluster {}: more than {MAX_SERVICE_PORTS} ports; the rest are denied",
                    describe_service(s)
                ),
            );
            break;
        }
        if p.port == 0 {
            problems.push(
                tenant,
                format!("cluster {}: port 0 ignored", describe_service(s)),
            );
            continue;
        }
        if !seen.insert((p.port, p.protocol)) {
            problems.push(
                tenant,
                format!(
                    "cluster {}: port {}/{} listed twice: the second is ignored",
                    describe_service(s),
                    p.port,
                    p.protocol
                ),
            );
            continue;
        }
        let mut backends: Vec<Backend> =
            p.backends.iter().copied().filter(|b| b.port != 0).collect();
        if backends.len() != p.backends.len() {
            problems.push(
                tenant,
                format!(
                    "cluster {}: port {}/{}: backends with target port 0 ignored",
                    describe_service(s),
                    p.port,
                    p.protocol
                ),
            );
        }
        backends.sort();
        backends.dedup();
        let targets: HashSet<u16> = backends.iter().map(|b| b.port).collect();
        let over = if backends.len() > MAX_BACKENDS_PER_PORT {
            // Not the number: the source stops reading a port's backends one past the bound.
            Some(format!("more than {MAX_BACKENDS_PER_PORT} ready backends"))
        } else if targets.len() > MAX_TARGET_PORTS {
            Some(format!(
                "{} distinct target ports, more than {MAX_TARGET_PORTS}",
                targets.len()
            ))
        } else if *tenant_backends + backends.len() > MAX_BACKENDS_PER_TENANT {
            Some(format!(
                "the tenant's Services have more than {MAX_BACKENDS_PER_TENANT} ready backends in all"
            ))
        } else {
            None
        };
        if let Some(why) = over {
            problems.push(
                tenant,
                format!(
                    "cluster {}: port {}/{}: {why}: the port is denied (judged as no ready backend)",
                    describe_service(s),
                    p.port,
                    p.protocol
                ),
            );
            backends.clear();
        }
        *tenant_backends += backends.len();
        ports.push(ServicePort {
            port: p.port,
            protocol: p.protocol,
            backends,
        });
    }
    ports.sort_by_key(|p| (p.port, p.protocol));
    ports
}

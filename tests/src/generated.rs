//! Seeded random bundles for the kernel property test (`tests/kernel_property.rs`): random
//! inventories and policy sets over the demo entity model, on one test's loopback range.
//!
//! `enforcer_policy::testutil::random_bundle` does not fit the kernel harness (its addresses
//! are `127.20.x.y` for every seed and its cgroups a fixed `rand/`), so this generator is
//! the harness's own: deterministic per seed (a plain LCG), every address in
//! `127.<net>.0.0/16`, every local workload's cgroup below the test's cgroup root.
//!
//! A generated world has 3 tenants, 5 to 8 workloads (most of them local, each with one
//! address; TCP and UDP ports with `infer` / `connect`, or none: any port), 1 to 3 endpoints
//! (`vector_db` / `feature_store`, some without ports: any port) and 3 to 6 policies drawn
//! from templates: same-tenant permits, cross-tenant forbids with `unless` exceptions naming
//! one principal, purpose and dataset rules, risk thresholds, port / protocol context rules,
//! permits naming one workload and one destination, and the WORLD cell.
//!
//! Port rules use every form the compile analyses (`==`, `!=`, `<`, `<=`, `>`, `>=`, a set
//! literal's `contains`), also on WORLD and other destinations without declared ports,
//! where the kernel holds an any-port entry plus exact-port exceptions. Each such
//! destination (WORLD included) is tried on both sides of every literal `k` of the policies
//! (`k - 1`, `k`, `k + 1`): the targets marked [`Target::edge`].

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::bundle::PolicyBundle;
use crate::fixtures::ports_yaml;
use crate::servers::Proto;

/// The entity model of `policies/demo/schema.cedarschema`, verbatim.
pub const DEMO_SCHEMA: &str = include_str!("../../policies/demo/schema.cedarschema");

/// Knuth's MMIX LCG; the high bits are the output. Small, deterministic, no dependency.
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        let mut r = Lcg(seed ^ 0x5851_f42d_4c95_7f2d);
        r.next_u32();
        r
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 32) as u32
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u32() as usize) % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// A declared port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenPort {
    pub port: u16,
    pub proto: Proto,
    pub action: &'static str,
}

/// A generated workload or endpoint.
#[derive(Debug, Clone)]
pub struct GenIdentity {
    pub name: String,
    pub tenant: &'static str,
    /// `Some(kind)` for an endpoint, `None` for a workload.
    pub kind: Option<&'static str>,
    /// Workloads: has a cgroup below the test's root (a subject).
    pub local: bool,
    pub purpose: &'static str,
    pub ring: &'static str,
    pub risk: &'static str,
    pub datasets: Vec<&'static str>,
    pub v4: Ipv4Addr,
    /// Empty: any port (action `connect`; Cedar is asked at each port).
    pub ports: Vec<GenPort>,
    /// For a destination without ports: the ports the test tries (each over TCP and UDP).
    pub sample_ports: Vec<u16>,
}

impl GenIdentity {
    pub fn is_endpoint(&self) -> bool {
        self.kind.is_some()
    }
}

/// Why a target is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetKind {
    /// A declared port of the destination.
    Declared,
    /// A sample port of a destination that declares none.
    AnyPort,
    /// A port (or protocol) the destination does not declare: denied without Cedar.
    Undeclared,
    /// An address the inventory does not know: the WORLD identity.
    World,
}

/// One destination address, port and protocol the test tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Identity name, as the oracle and the events name it (`world` for WORLD).
    pub to: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub kind: TargetKind,
    /// A port next to a `context.port` literal on a destination without declared ports:
    /// every such target is sampled.
    pub edge: bool,
}

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const PURPOSES: [&str; 4] = ["inference", "evaluation", "retrieval", "feature-extraction"];
const RINGS: [&str; 2] = ["prod", "dev"];
const RISKS: [&str; 5] = ["0.0", "0.2", "0.5", "0.7", "0.9"];
const KINDS: [&str; 2] = ["vector_db", "feature_store"];
const DATASETS: [&[&str]; 3] = [&["ds0"], &["ds1"], &["ds0", "ds1"]];
/// Workload ports: (port, protocol, action); the schema lets workloads take infer / connect.
const WORKLOAD_PORTS: [(u16, Proto, &str); 4] = [
    (8000, Proto::Tcp, "infer"),
    (8080, Proto::Tcp, "connect"),
    (9000, Proto::Udp, "connect"),
    (9001, Proto::Udp, "infer"),
];
/// Endpoint ports: query / read / write / connect over TCP and UDP.
const ENDPOINT_PORTS: [(u16, Proto, &str); 7] = [
    (6333, Proto::Tcp, "query"),
    (6334, Proto::Udp, "query"),
    (7000, Proto::Tcp, "read"),
    (7001, Proto::Tcp, "write"),
    (7002, Proto::Udp, "write"),
    (7003, Proto::Udp, "read"),
    (5432, Proto::Tcp, "connect"),
];
/// Ports used in `context.port` rules: declared ones, 0 (no port: matches no call), and
/// ports of no declared port (only destinations without ports take them). None that a
/// host service is likely to hold on every address (a wildcard listener would keep the
/// test's servers from binding).
const RULE_PORTS: [u16; 12] = [
    8000, 8080, 9000, 9001, 6333, 6334, 7001, 7002, 0, 25, 1023, 1024,
];

/// A generated bundle: identities and policies. The inventory is rendered for a given
/// cgroup root ([`GeneratedBundle::inventory`]).
#[derive(Debug, Clone)]
pub struct GeneratedBundle {
    pub seed: u64,
    pub net: u8,
    pub identities: Vec<GenIdentity>,
    pub policies: String,
    /// The ports next to the policies' `context.port` literals (1..=65535), ascending: tried
    /// on every destination without declared ports.
    pub edge_ports: Vec<u16>,
}

impl GeneratedBundle {
    /// The bundle of `seed`, with addresses in `127.<net>.0.0/16`.
    pub fn new(seed: u64, net: u8) -> Self {
        let mut r = Lcg::new(seed);
        let mut identities = Vec::new();
        let mut per_tenant = [0u8; 3];

        let nw = 5 + r.below(4);
        for i in 0..nw {
            // Every tenant gets a workload first, then at random.
            let t = if i < 3 { i } else { r.below(3) };
            per_tenant[t] += 1;
            let (ports, sample_ports) = random_ports(&mut r, &WORKLOAD_PORTS, 75, 45);
            identities.push(GenIdentity {
                name: format!("w{i}"),
                tenant: TENANTS[t],
                kind: None,
                // The first two always, the others mostly.
                local: i < 2 || r.chance(80),
                purpose: r.pick(&PURPOSES),
                ring: r.pick(&RINGS),
                risk: r.pick(&RISKS),
                datasets: vec![],
                v4: Ipv4Addr::new(127, net, t as u8 + 1, per_tenant[t]),
                ports,
                sample_ports,
            });
        }

        let ne = 1 + r.below(3);
        for m in 0..ne {
            let t = r.below(3);
            let (ports, sample_ports) = random_ports(&mut r, &ENDPOINT_PORTS, 70, 40);
            identities.push(GenIdentity {
                name: format!("e{m}"),
                tenant: TENANTS[t],
                kind: Some(r.pick(&KINDS)),
                local: false,
                purpose: "",
                ring: "",
                risk: "",
                datasets: r.pick(&DATASETS).to_vec(),
                v4: Ipv4Addr::new(127, net, t as u8 + 1, 100 + m as u8),
                ports,
                sample_ports,
            });
        }

        let np = 3 + r.below(4);
        let mut policies = String::new();
        let mut literals = Vec::new();
        for k in 0..np {
            let (name, text) = policy(&mut r, &identities, &mut literals);
            let _ = writeln!(policies, "@id(\"p{k}-{name}\")\n{text}\n");
        }
        let mut edge_ports: Vec<u16> = literals
            .iter()
            .flat_map(|&k: &u32| [k.saturating_sub(1), k, k + 1])
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .collect();
        edge_ports.sort_unstable();
        edge_ports.dedup();
        Self {
            seed,
            net,
            identities,
            policies,
            edge_ports,
        }
    }

    /// Local workloads: the subjects the test runs probes as.
    pub fn subjects(&self) -> impl Iterator<Item = &GenIdentity> {
        self.identities
            .iter()
            .filter(|i| !i.is_endpoint() && i.local)
    }

    /// An address of this net that no identity has: the WORLD identity.
    pub fn world_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(127, self.net, 200, 1)
    }

    /// `inventory.yaml`, local workloads' cgroups below `cgroup_root`.
    pub fn inventory(&self, cgroup_root: &str) -> String {
        let mut y = format!("tenants: [{}]\nworkloads:\n", TENANTS.join(", "));
        let ports =
            |i: &GenIdentity| ports_yaml(i.ports.iter().map(|p| (p.port, p.proto, p.action)));
        for w in self.identities.iter().filter(|i| !i.is_endpoint()) {
            let _ = writeln!(y, "  - name: {}", w.name);
            let _ = writeln!(y, "    tenant: {}", w.tenant);
            let _ = writeln!(y, "    purpose: {}", w.purpose);
            let _ = writeln!(y, "    ring: {}", w.ring);
            let _ = writeln!(y, "    risk: {}", w.risk);
            let _ = writeln!(
                y,
                "    spiffe_id: spiffe://prop.test/ns/{}/sa/{}",
                w.tenant, w.name
            );
            if w.local {
                let _ = writeln!(y, "    cgroups: [{cgroup_root}/{}]", w.name);
            }
            let _ = writeln!(y, "    ips: [{}/32]", w.v4);
            if !w.ports.is_empty() {
                let _ = writeln!(y, "    ports: {}", ports(w));
            }
        }
        y.push_str("endpoints:\n");
        for e in self.identities.iter().filter(|i| i.is_endpoint()) {
            let _ = writeln!(y, "  - name: {}", e.name);
            let _ = writeln!(y, "    tenant: {}", e.tenant);
            let _ = writeln!(y, "    kind: {}", e.kind.unwrap_or("vector_db"));
            let _ = writeln!(y, "    ips: [{}/32]", e.v4);
            if !e.ports.is_empty() {
                let _ = writeln!(y, "    ports: {}", ports(e));
            }
            let _ = writeln!(y, "    datasets: [{}]", e.datasets.join(", "));
        }
        y
    }

    /// Writes the bundle (inventory, demo schema, `policies.cedar`) into a temp dir.
    pub fn write(&self, cgroup_root: &str) -> Result<PolicyBundle> {
        PolicyBundle::new(&[
            ("inventory.yaml", &self.inventory(cgroup_root)),
            ("schema.cedarschema", DEMO_SCHEMA),
            ("policies.cedar", &self.policies),
        ])
    }

    /// The whole bundle as text, for failure messages.
    pub fn text(&self, cgroup_root: &str) -> String {
        format!(
            "# seed {} net {}\n# inventory.yaml\n{}\n# policies.cedar\n{}",
            self.seed,
            self.net,
            self.inventory(cgroup_root),
            self.policies
        )
    }

    /// Every destination the test tries: each declared port; two sample ports over TCP and
    /// UDP for destinations without ports; for some destinations with ports, one port they
    /// do not declare (the other protocol of a declared port, or an unrelated port); and a
    /// TCP and a UDP port on an address nobody has (WORLD).
    pub fn targets(&self) -> Vec<Target> {
        let mut r = Lcg::new(self.seed ^ 0x7a67_6574);
        let mut out = Vec::new();
        for d in &self.identities {
            let t = |port, proto, kind| Target {
                to: d.name.clone(),
                ip: d.v4,
                port,
                proto,
                kind,
                edge: false,
            };
            if d.ports.is_empty() {
                for &port in &d.sample_ports {
                    out.push(t(port, Proto::Tcp, TargetKind::AnyPort));
                    out.push(t(port, Proto::Udp, TargetKind::AnyPort));
                }
                for &port in self
                    .edge_ports
                    .iter()
                    .filter(|&&p| !d.sample_ports.contains(&p))
                {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        out.push(Target {
                            edge: true,
                            ..t(port, proto, TargetKind::AnyPort)
                        });
                    }
                }
                continue;
            }
            for p in &d.ports {
                out.push(t(p.port, p.proto, TargetKind::Declared));
            }
            if r.chance(60) {
                let p = &d.ports[r.below(d.ports.len())];
                let other = match p.proto {
                    Proto::Tcp => Proto::Udp,
                    Proto::Udp => Proto::Tcp,
                };
                let declared =
                    |port, proto| d.ports.iter().any(|q| q.port == port && q.proto == proto);
                if !declared(p.port, other) {
                    out.push(t(p.port, other, TargetKind::Undeclared));
                } else if !declared(p.port + 1000, p.proto) {
                    out.push(t(p.port + 1000, p.proto, TargetKind::Undeclared));
                }
            }
        }
        let world = |port, proto, edge| Target {
            to: "world".into(),
            ip: self.world_ip(),
            port,
            proto,
            kind: TargetKind::World,
            edge,
        };
        for (port, proto) in [(4444, Proto::Tcp), (4445, Proto::Udp)] {
            out.push(world(port, proto, false));
        }
        for &port in self.edge_ports.iter().filter(|&&p| p != 4444 && p != 4445) {
            out.push(world(port, Proto::Tcp, true));
            out.push(world(port, Proto::Udp, true));
        }
        out
    }
}

/// Declared ports drawn from `table`: with probability `some`%, each of its entries with
/// probability `each`%. With none declared the identity takes any port, so also returns the
/// sample ports to test it at (empty otherwise).
fn random_ports(
    r: &mut Lcg,
    table: &[(u16, Proto, &'static str)],
    some: usize,
    each: usize,
) -> (Vec<GenPort>, Vec<u16>) {
    let mut ports = Vec::new();
    if r.chance(some) {
        for &(port, proto, action) in table {
            if r.chance(each) {
                ports.push(GenPort {
                    port,
                    proto,
                    action,
                });
            }
        }
    }
    let sample_ports = if ports.is_empty() {
        any_port_samples(r)
    } else {
        vec![]
    };
    (ports, sample_ports)
}

/// Two distinct sample ports for an any-port destination.
fn any_port_samples(r: &mut Lcg) -> Vec<u16> {
    let a = 20000 + r.below(5000) as u16;
    let b = 25000 + r.below(5000) as u16;
    vec![a, b]
}

/// One random policy over `ids`: (short name for its `@id`, Cedar text). The integer
/// literals it compares `context.port` with are added to `literals`.
fn policy(r: &mut Lcg, ids: &[GenIdentity], literals: &mut Vec<u32>) -> (&'static str, String) {
    let workloads: Vec<&GenIdentity> = ids.iter().filter(|i| !i.is_endpoint()).collect();
    let endpoints: Vec<&GenIdentity> = ids.iter().filter(|i| i.is_endpoint()).collect();
    let w = |r: &mut Lcg| format!("Workload::\"{}\"", r.pick(&workloads).name);
    let e = |r: &mut Lcg| format!("Endpoint::\"{}\"", r.pick(&endpoints).name);
    // Weighted: the same-tenant baseline and tenant isolation are the common shapes.
    // Port rules (9, 12) are drawn twice as often: about every other bundle has one.
    match r.below(18) {
        0..=3 => (
            "same-tenant",
            "permit (principal, action, resource)\nwhen { resource has tenant && principal.tenant == resource.tenant };".into(),
        ),
        4..=5 => {
            let exception = if r.chance(50) {
                format!("principal == {}", w(r))
            } else {
                format!("principal == {} && resource == {}", w(r), e(r))
            };
            (
                "tenant-isolation",
                format!("forbid (principal, action, resource)\nwhen {{ resource has tenant && principal.tenant != resource.tenant }}\nunless {{ {exception} }};"),
            )
        }
        6 => {
            let text = if r.chance(50) {
                "forbid (principal, action == Action::\"write\", resource is Endpoint)\nwhen { principal.purpose == \"evaluation\" && resource.kind == \"feature_store\" };".to_string()
            } else {
                format!(
                    "forbid (principal, action, resource is Endpoint)\nwhen {{ principal.purpose == \"{}\" && resource.kind == \"{}\" }};",
                    r.pick(&PURPOSES),
                    r.pick(&KINDS)
                )
            };
            ("purpose", text)
        }
        7 => {
            let text = if r.chance(50) {
                "forbid (principal, action, resource)\nwhen { principal.risk.greaterThan(decimal(\"0.5\")) };".to_string()
            } else {
                "forbid (principal, action, resource is Endpoint)\nwhen { principal.risk.greaterThan(decimal(\"0.5\")) && resource.kind == \"vector_db\" };".to_string()
            };
            ("risk", text)
        }
        8 => (
            "low-risk",
            format!(
                "permit (principal, action, resource)\nwhen {{ principal.risk.lessThanOrEqual(decimal(\"0.5\")) && context.protocol == \"{}\" }};",
                r.pick(&["tcp", "udp"])
            ),
        ),
        9 | 16 => {
            let port = r.pick(&RULE_PORTS);
            let other = r.pick(&RULE_PORTS);
            // Each rule is non-constant only on ports in 1..=1025 or 65000..=65535 (and a
            // few more), so that together they fit a cell's exact entries (4,096).
            let (text, used): (String, &[u16]) = match r.below(8) {
                0 => (format!("forbid (principal, action, resource)\nwhen {{ context.port == {port} }};"), &[port]),
                1 => (format!("permit (principal, action, resource)\nwhen {{ context.port == {port} }};"), &[port]),
                2 => ("forbid (principal, action, resource)\nwhen { context.protocol == \"udp\" && principal.ring == \"dev\" };".into(), &[]),
                3 => ("permit (principal, action, resource)\nwhen { context.port >= 65001 && context.protocol == \"tcp\" };".into(), &[65001]),
                4 => ("forbid (principal, action, resource)\nwhen { context.port < 1024 && principal.ring == \"dev\" };".into(), &[1024]),
                5 => (format!("permit (principal, action, resource)\nwhen {{ [{port}, {other}].contains(context.port) }};"), &[port, other]),
                6 => ("forbid (principal, action, resource)\nwhen { 9000 <= context.port && context.port != 9001 && 9010 > context.port };".into(), &[9000, 9001, 9010]),
                _ => (format!("forbid (principal, action, resource)\nwhen {{ context.port <= {port} && {port} < 1100 || context.port > 65300 }};"), &[port, 65300]),
            };
            literals.extend(used.iter().map(|&p| u32::from(p)));
            ("context", text)
        }
        10..=11 => {
            let to = if r.chance(60) { e(r) } else { w(r) };
            ("named", format!("permit (principal == {}, action, resource == {to});", w(r)))
        }
        12 | 17 => {
            if r.chance(50) {
                let op = r.pick(&["==", "!=", "<", "<=", ">", ">="]);
                // An inequality with 8080 would decide too many ports (see rule 9).
                let port = match op {
                    "==" | "!=" => r.pick(&[25u16, 1023, 1024, 8080]),
                    _ => r.pick(&[25u16, 1023, 1024]),
                };
                literals.push(u32::from(port));
                (
                    "world-port",
                    format!("forbid (principal, action, resource is World)\nwhen {{ context.port {op} {port} }};"),
                )
            } else {
                (
                    "world",
                    format!(
                        "permit (principal, action == Action::\"connect\", resource == World::\"world\")\nwhen {{ principal.ring == \"{}\" }};",
                        r.pick(&RINGS)
                    ),
                )
            }
        }
        13 => (
            "datasets",
            format!(
                "permit (principal, action in [Action::\"query\", Action::\"read\"], resource is Endpoint)\nwhen {{ resource.datasets.contains(\"{}\") }};",
                r.pick(&["ds0", "ds1"])
            ),
        ),
        14 => (
            "same-ring",
            "permit (principal, action, resource is Workload)\nwhen { principal.ring == resource.ring };".into(),
        ),
        _ => (
            "tenant-udp",
            format!(
                "forbid (principal, action, resource)\nwhen {{ principal.tenant == \"{}\" && context.protocol == \"udp\" }};",
                r.pick(&TENANTS)
            ),
        ),
    }
}

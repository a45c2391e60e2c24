//! Test worlds: a generated inventory (tenants, workloads in their own cgroups, endpoints,
//! each with its own `127.<net>.t.i` and `fd7e:<net>::t:i` address), Cedar policies, the
//! cgroups, a pin dir, servers on every declared port, and the agent to enforce it all.
//!
//! `net` is per test, so tests running in parallel never share an address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::agent::{Agent, AgentConfig};
use crate::bpf::PinDir;
use crate::bundle::PolicyBundle;
use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::probe::attempt;
use crate::servers::{Proto, Server};
use crate::util::unique_name;

/// A declared port of a destination.
#[derive(Debug, Clone)]
pub struct Port {
    pub port: u16,
    pub proto: Proto,
    pub action: String,
}

impl Port {
    pub fn new(port: u16, proto: Proto, action: &str) -> Self {
        Self {
            port,
            proto,
            action: action.to_string(),
        }
    }
}

/// A workload (`local`: it runs here, in its own cgroup) or an endpoint (`kind` set:
/// destination only).
#[derive(Debug, Clone)]
pub struct Entity {
    pub name: String,
    pub tenant: String,
    /// Workloads only.
    pub purpose: Option<String>,
    /// Endpoints only: `vector_db`, `feature_store`, ...
    pub kind: Option<String>,
    /// A workload with a cgroup (a subject).
    pub local: bool,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub ports: Vec<Port>,
    /// Workloads only: the inventory's `ingress` mode (`enforce`, `audit`), when set.
    pub ingress: Option<&'static str>,
}

impl Entity {
    /// A workload in its own cgroup, at address `(t, i)` of the world's net.
    pub fn workload(net: u8, name: &str, tenant: &str, purpose: &str, t: u8, i: u8) -> Self {
        Self {
            name: name.into(),
            tenant: tenant.into(),
            purpose: Some(purpose.into()),
            kind: None,
            local: true,
            v4: Ipv4Addr::new(127, net, t, i),
            v6: v6_addr(net, t, i),
            ports: Vec::new(),
            ingress: None,
        }
    }

    /// An endpoint (destination only).
    pub fn endpoint(net: u8, name: &str, tenant: &str, kind: &str, t: u8, i: u8) -> Self {
        Self {
            purpose: None,
            kind: Some(kind.into()),
            local: false,
            ..Self::workload(net, name, tenant, "", t, i)
        }
    }

    pub fn port(mut self, port: u16, proto: Proto, action: &str) -> Self {
        self.ports.push(Port::new(port, proto, action));
        self
    }

    pub fn is_endpoint(&self) -> bool {
        self.kind.is_some()
    }

    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.v6)
        } else {
            IpAddr::V4(self.v4)
        }
    }
}

/// `fd7e:<net>::<t>:<i>`: ULA (fd00::/8), one /64 per test. Not `fd00::`, because hosts
/// (this one included) often use `fd00::/64` for their real network.
pub fn v6_addr(net: u8, t: u8, i: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd7e,
        u16::from(net),
        0,
        0,
        0,
        0,
        u16::from(t),
        u16::from(i),
    )
}

/// The standard matrix population: 3 tenants, 6 local workloads, 3 endpoints, TCP and UDP
/// ports, a purpose rule target (an evaluation workload vs a feature store's write port) and a
/// cross-tenant exception (globex-agent may query acme-vectors; see [`STANDARD_POLICIES`]).
pub fn standard_entities(net: u8) -> Vec<Entity> {
    use Proto::{Tcp, Udp};
    vec![
        Entity::workload(net, "acme-gateway", "acme", "inference", 1, 1).port(8000, Tcp, "infer"),
        Entity::workload(net, "acme-evaluator", "acme", "evaluation", 1, 2)
            .port(9000, Udp, "connect"),
        Entity::endpoint(net, "acme-vectors", "acme", "vector_db", 1, 10)
            .port(6333, Tcp, "query")
            .port(6334, Udp, "query"),
        Entity::workload(net, "globex-agent", "globex", "inference", 2, 1).port(8000, Tcp, "infer"),
        Entity::workload(net, "globex-retriever", "globex", "retrieval", 2, 2)
            .port(7070, Udp, "connect"),
        Entity::endpoint(net, "globex-vectors", "globex", "vector_db", 2, 10)
            .port(6333, Tcp, "query"),
        Entity::workload(
            net,
            "initech-trainer",
            "initech",
            "feature-extraction",
            3,
            1,
        )
        .port(8080, Tcp, "connect"),
        Entity::workload(net, "initech-evaluator", "initech", "evaluation", 3, 2)
            .port(9000, Udp, "connect"),
        Entity::endpoint(net, "initech-features", "initech", "feature_store", 3, 10)
            .port(7000, Tcp, "read")
            .port(7001, Tcp, "write")
            .port(7002, Udp, "write"),
    ]
}

/// The Cedar schema of test bundles: the entity model of `enforcer-policy` (as in
/// `policies/demo/schema.cedarschema`) and every action the test inventories declare.
pub const SCHEMA: &str = r#"
entity Workload = {
  tenant: String,
  purpose: String,
  ring: String,
  spiffe_id: String,
  risk: __cedar::decimal,
};
entity Endpoint = {
  tenant: String,
  kind: String,
  datasets: Set<String>,
};
entity World;
type Conn = { port: Long, protocol: String };
action connect appliesTo { principal: Workload, resource: [Workload, Endpoint, World], context: Conn };
action infer appliesTo { principal: Workload, resource: [Workload], context: Conn };
action query, read, write appliesTo { principal: Workload, resource: [Endpoint], context: Conn };
"#;

/// Same-tenant permit, tenant isolation with one explicit cross-tenant exception, and the
/// purpose rule of the demo (an evaluation workload may not write to a feature store).
pub const STANDARD_POLICIES: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };

@id("shared-acme-vectors")
permit (principal == Workload::"globex-agent", action == Action::"query", resource == Endpoint::"acme-vectors");

@id("tenant-isolation")
@atlas("AML.T0085.000")
forbid (principal, action, resource)
when { resource has tenant && principal.tenant != resource.tenant }
unless { principal == Workload::"globex-agent" && resource == Endpoint::"acme-vectors" };

@id("evaluation-no-feature-writes")
forbid (principal, action == Action::"write", resource is Endpoint)
when { principal.purpose == "evaluation" && resource.kind == "feature_store" };
"#;

/// Only the tenant baseline: same-tenant permit, tenant-isolation forbid (with its ATLAS
/// technique), no exception. Tests that need more add their policies after it.
pub const TENANT_ISOLATION_POLICIES: &str = r#"@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };

@id("tenant-isolation")
@atlas("AML.T0085.000")
forbid (principal, action, resource)
when { resource has tenant && principal.tenant != resource.tenant };
"#;

/// The source tree's `policies/demo/`.
pub fn demo_policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/demo")
}

/// One (subject, destination, port) of the reachability matrix.
#[derive(Debug, Clone)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// Everything a kernel test needs except the agent and the servers. Drop order matters and
/// follows field order: cgroups, then the root cgroup, then the bundle and the pins.
#[derive(Debug)]
pub struct World {
    pub net: u8,
    pub entities: Vec<Entity>,
    /// Local workload name -> its cgroup.
    pub cgroups: BTreeMap<String, TestCgroup>,
    /// The `--cgroup-root` of this world's agent.
    pub root: TestCgroup,
    pub bundle: PolicyBundle,
    pub pins: PinDir,
}

impl World {
    /// Creates the root cgroup and one cgroup per local workload, writes the bundle
    /// (inventory, schema, `policies` as `policies.cedar`) and reserves a pin dir.
    pub fn new(net: u8, entities: Vec<Entity>, policies: &str) -> Result<Self> {
        let root = TestCgroup::create(unique_name("enforcer-test"))?;
        let mut cgroups = BTreeMap::new();
        for e in entities.iter().filter(|e| e.local) {
            cgroups.insert(e.name.clone(), root.child(&e.name)?);
        }
        let bundle = write_bundle(&entities, &root.relative_str(), policies)?;
        Ok(Self {
            net,
            entities,
            cgroups,
            root,
            bundle,
            pins: PinDir::new("enforcer-test")?,
        })
    }

    /// The standard matrix world ([`standard_entities`], [`STANDARD_POLICIES`]).
    pub fn standard(net: u8) -> Result<Self> {
        Self::new(net, standard_entities(net), STANDARD_POLICIES)
    }

    pub fn entity(&self, name: &str) -> &Entity {
        self.entities
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no entity {name} in this world"))
    }

    pub fn cgroup(&self, name: &str) -> &TestCgroup {
        self.cgroups
            .get(name)
            .unwrap_or_else(|| panic!("no local workload {name} in this world"))
    }

    pub fn agent_config(&self) -> AgentConfig {
        AgentConfig::new(
            self.bundle.path(),
            &self.root.relative_str(),
            self.pins.path(),
        )
    }

    pub fn start_agent(&self) -> Result<Agent> {
        Agent::start(self.agent_config())
    }

    /// The two reference calls of the standard world (TCP 6333 to a vector DB, made from
    /// acme-gateway): `(cross, same)`, to globex-vectors (another tenant: denied) and to
    /// acme-vectors (its own tenant: allowed).
    pub fn gateway_calls(&self) -> (String, String) {
        (
            attempt("tcp", self.entity("globex-vectors").ip(false), 6333),
            attempt("tcp", self.entity("acme-vectors").ip(false), 6333),
        )
    }

    /// A server on every declared port of every entity, on its loopback address.
    pub fn servers_v4(&self) -> Result<Vec<Server>> {
        let mut servers = Vec::new();
        for e in &self.entities {
            for p in &e.ports {
                servers.push(Server::start(
                    p.proto,
                    SocketAddr::new(IpAddr::V4(e.v4), p.port),
                )?);
            }
        }
        Ok(servers)
    }

    /// A server on every declared port of every entity, on its `fd7e:` address inside `ns`
    /// (which must hold those addresses: see [`World::v6_server_addrs`]).
    pub fn servers_v6(&self, ns: &NetNs) -> Result<Vec<Server>> {
        let mut servers = Vec::new();
        for e in &self.entities {
            for p in &e.ports {
                let addr = SocketAddr::new(IpAddr::V6(e.v6), p.port);
                servers.push(
                    Server::start_in_netns(ns, p.proto, addr)
                        .with_context(|| format!("server for {} in {}", e.name, ns.name()))?,
                );
            }
        }
        Ok(servers)
    }

    /// CIDRs for the server side of the veth: every entity's `fd7e:` address on one /64.
    pub fn v6_server_addrs(&self) -> Vec<String> {
        self.entities
            .iter()
            .map(|e| format!("{}/64", e.v6))
            .collect()
    }

    /// The client side of the veth: an address on the same /64 that no entity has.
    pub fn v6_client_addr(&self) -> String {
        format!("{}/64", v6_addr(self.net, 0xff, 0xfe))
    }

    /// Every (local workload, other entity, declared port) cell.
    pub fn cells(&self, v6: bool) -> Vec<Cell> {
        let mut cells = Vec::new();
        for from in self.entities.iter().filter(|e| e.local) {
            for to in self.entities.iter().filter(|e| e.name != from.name) {
                for p in &to.ports {
                    cells.push(Cell {
                        from: from.name.clone(),
                        to: to.name.clone(),
                        ip: to.ip(v6),
                        port: p.port,
                        proto: p.proto,
                    });
                }
            }
        }
        cells
    }
}

/// A bundle of `entities` (cgroups below `cgroup_root`), [`SCHEMA`] and `policies`.
pub fn write_bundle(
    entities: &[Entity],
    cgroup_root: &str,
    policies: &str,
) -> Result<PolicyBundle> {
    PolicyBundle::new(&[
        ("inventory.yaml", &render_inventory(entities, cgroup_root)),
        ("schema.cedarschema", SCHEMA),
        ("policies.cedar", policies),
    ])
}

/// An inventory `ports:` list, in flow style: `[{port: P, protocol: tcp, action: A}, ...]`.
/// Shared with the generated bundles ([`crate::generated`]), whose inventory has the same form.
pub(crate) fn ports_yaml<'a>(ports: impl Iterator<Item = (u16, Proto, &'a str)>) -> String {
    let list: Vec<String> = ports
        .map(|(port, proto, action)| {
            format!(
                "{{port: {port}, protocol: {}, action: {action}}}",
                proto.as_str()
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

/// The inventory YAML of `entities`, with cgroups below `cgroup_root`.
pub fn render_inventory(entities: &[Entity], cgroup_root: &str) -> String {
    let mut tenants: Vec<&str> = entities.iter().map(|e| e.tenant.as_str()).collect();
    tenants.sort();
    tenants.dedup();
    let mut y = format!("tenants: [{}]\nworkloads:\n", tenants.join(", "));
    let ports =
        |e: &Entity| ports_yaml(e.ports.iter().map(|p| (p.port, p.proto, p.action.as_str())));
    for e in entities.iter().filter(|e| !e.is_endpoint()) {
        let _ = writeln!(y, "  - name: {}", e.name);
        let _ = writeln!(y, "    tenant: {}", e.tenant);
        let _ = writeln!(
            y,
            "    purpose: {}",
            e.purpose.as_deref().unwrap_or("inference")
        );
        let _ = writeln!(y, "    ring: prod");
        let _ = writeln!(
            y,
            "    spiffe_id: spiffe://cluster.local/ns/{}/sa/{}",
            e.tenant, e.name
        );
        if e.local {
            let _ = writeln!(y, "    cgroups: [{cgroup_root}/{}]", e.name);
        }
        let _ = writeln!(y, "    ips: [{}/32, {}/128]", e.v4, e.v6);
        if !e.ports.is_empty() {
            let _ = writeln!(y, "    ports: {}", ports(e));
        }
        if let Some(mode) = e.ingress {
            let _ = writeln!(y, "    ingress: {mode}");
        }
    }
    y.push_str("endpoints:\n");
    for e in entities.iter().filter(|e| e.is_endpoint()) {
        let _ = writeln!(y, "  - name: {}", e.name);
        let _ = writeln!(y, "    tenant: {}", e.tenant);
        let _ = writeln!(y, "    kind: {}", e.kind.as_deref().unwrap_or("llm_api"));
        let _ = writeln!(y, "    ips: [{}/32, {}/128]", e.v4, e.v6);
        let _ = writeln!(y, "    ports: {}", ports(e));
        let _ = writeln!(y, "    datasets: [{}-kb]", e.tenant);
    }
    y
}

/// Whether `event` is a deny for this (subject, destination, port, protocol), optionally from
/// this hook.
pub fn event_matches(
    event: &serde_json::Value,
    from: &str,
    to: &str,
    port: u16,
    proto: Proto,
) -> bool {
    let s = |p: &str| event.pointer(p).and_then(|v| v.as_str());
    event.get("verdict").and_then(|v| v.as_str()) == Some("deny")
        && s("/subject/workload") == Some(from)
        && s("/destination/name") == Some(to)
        && event.pointer("/destination/port").and_then(|v| v.as_u64()) == Some(u64::from(port))
        && s("/destination/protocol") == Some(proto.as_str())
}

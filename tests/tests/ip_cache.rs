//! Destination identities: a host address (/32, the exact-match map) inside a subnet (/24, the
//! prefix trie) must resolve to the host's identity, the rest of the subnet to the subnet's, a
//! subnet of another tenant to that tenant's, and an address nobody owns to WORLD. The
//! kernel's answer for each equals Cedar's, and each deny names the destination the kernel
//! resolved. (The host declares another port than its subnet, so resolving it to the subnet
//! would allow what Cedar denies.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_policy::{Bundle, Protocol};
use enforcer_tests::fixtures::{SCHEMA, TENANT_ISOLATION_POLICIES};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, Outcome, PinDir, PolicyBundle, Probe, Server,
    TestCgroup,
};

/// Second octet reserved for this test (others use 31-62).
const NET: u8 = 63;

const POLICIES: &str = TENANT_ISOLATION_POLICIES;

fn ip(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, NET, c, d))
}

#[test]
fn host_entries_win_over_subnets_and_unknown_addresses_are_world() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("enforcer-ipcache"))?;
    let client = root.child("acme-client")?;
    let inventory = format!(
        r#"tenants: [acme, globex]
workloads:
  - name: acme-client
    tenant: acme
    purpose: inference
    ring: prod
    cgroups: [{client}]
    ips: [127.{NET}.1.1/32]
endpoints:
  - name: acme-subnet
    tenant: acme
    kind: vector_db
    ips: [127.{NET}.9.0/24]
    ports: [{{port: 6333, protocol: tcp, action: query}}]
  - name: acme-host
    tenant: acme
    kind: vector_db
    ips: [127.{NET}.9.7/32]
    ports: [{{port: 7000, protocol: tcp, action: query}}]
  - name: globex-subnet
    tenant: globex
    kind: vector_db
    ips: [127.{NET}.8.0/24]
    ports: [{{port: 6333, protocol: tcp, action: query}}]
"#,
        client = client.relative_str()
    );
    let bundle = PolicyBundle::new(&[
        ("inventory.yaml", &inventory),
        ("schema.cedarschema", SCHEMA),
        ("policies.cedar", POLICIES),
    ])?;
    let oracle = Bundle::load(bundle.path()).map_err(|d| anyhow::anyhow!("{d}"))?;

    // (address, the destination the kernel must resolve it to)
    let cells = [
        (ip(9, 5), "acme-subnet"),
        (ip(9, 7), "acme-host"),
        (ip(8, 5), "globex-subnet"),
        (ip(200, 1), "world"),
    ];
    let _servers: Vec<Server> = cells
        .iter()
        .map(|(addr, _)| Server::start(Proto::Tcp, SocketAddr::new(*addr, 6333)))
        .collect::<Result<_>>()?;
    let pins = PinDir::new("enforcer-test")?;
    let agent = Agent::start(AgentConfig::new(
        bundle.path(),
        &root.relative_str(),
        pins.path(),
    ))?;

    let mut denied = Vec::new();
    for (addr, name) in cells {
        let want = oracle.decide("acme-client", name, 6333, Protocol::Tcp)?;
        let got = Probe::new()
            .in_cgroup(&client)
            .run_one(&attempt("tcp", addr, 6333))?;
        let want_outcome = if want.allowed {
            Outcome::Ok
        } else {
            Outcome::Eperm
        };
        ensure!(
            got.outcome == want_outcome,
            "{addr} ({name}): kernel {:?}, Cedar {}",
            got.outcome,
            if want.allowed { "allows" } else { "denies" }
        );
        if !want.allowed {
            denied.push((addr, name));
        }
    }
    // Allowed: the own tenant's subnet. Denied: the host inside it (port 6333 undeclared
    // there), the other tenant's subnet, WORLD.
    ensure!(denied.len() == 3, "expected three denies, got {denied:?}");

    agent.wait_for_events(denied.len(), Duration::from_secs(10))?;
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;
    let denies: Vec<_> = events
        .iter()
        .filter(|e| e.get("verdict").and_then(|v| v.as_str()) == Some("deny"))
        .collect();
    ensure!(denies.len() == denied.len(), "deny events: {denies:?}");
    for (addr, name) in denied {
        let hit = denies.iter().any(|e| {
            e.pointer("/destination/ip").and_then(|v| v.as_str()) == Some(&addr.to_string())
                && e.pointer("/destination/name").and_then(|v| v.as_str()) == Some(name)
        });
        ensure!(hit, "no deny event resolving {addr} to {name}: {denies:?}");
    }
    Ok(())
}

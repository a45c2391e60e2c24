//! Issue 6, faults 3 and 10: policies that read `context.port` on destinations without
//! declared ports. Before the fix such a destination was compiled as one any-port cell
//! decided at port 0, so `forbid ... when { context.port == 25 }` under a World permit let
//! port 25 through (3), and `forbid ... when { context.port < 1024 }` denied every port (10).
//!
//! One agent, two destinations without ports: WORLD (an address nobody has) with a permit
//! and a forbid of port 25, and an endpoint with a permit and a forbid of ports below 1024.
//! Each is tried on 25, 1023, 1024 and 8080 (and 24 / 26 on WORLD), over TCP connect, UDP
//! `sendto` and connected UDP. The kernel's outcome must equal Cedar's (and the expectation
//! written here), and each denied attempt must have exactly one deny event naming the
//! forbid's `@id`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_policy::{Bundle, Protocol};
use enforcer_tests::fixtures::{event_matches, SCHEMA};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, Outcome, PinDir, PolicyBundle, Probe, Server,
    TestCgroup,
};

/// Second octet of this test's addresses.
const NET: u8 = 82;

const POLICIES: &str = r#"@id("world-egress")
permit (principal, action, resource is World);

@id("no-smtp-to-world")
forbid (principal, action, resource is World)
when { context.port == 25 };

@id("endpoint-egress")
permit (principal, action, resource is Endpoint);

@id("no-low-ports")
forbid (principal, action, resource is Endpoint)
when { context.port < 1024 };
"#;

fn ip(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, NET, c, d))
}

#[test]
fn port_rules_on_destinations_without_ports_match_cedar() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("enforcer-ports"))?;
    let client = root.child("client")?;
    let inventory = format!(
        r#"tenants: [acme]
workloads:
  - name: client
    tenant: acme
    purpose: inference
    ring: prod
    cgroups: [{client}]
    ips: [127.{NET}.1.1/32]
endpoints:
  - name: ext
    tenant: acme
    kind: vector_db
    ips: [127.{NET}.9.1/32]
"#,
        client = client.relative_str()
    );
    let bundle = PolicyBundle::new(&[
        ("inventory.yaml", &inventory),
        ("schema.cedarschema", SCHEMA),
        ("policies.cedar", POLICIES),
    ])?;
    let oracle = Bundle::load(bundle.path()).map_err(|d| anyhow::anyhow!("{d}"))?;

    // (destination name, address, port, the forbid that denies it, if any)
    let world = ip(200, 1);
    let ext = ip(9, 1);
    let cells: Vec<(&str, IpAddr, u16, Option<&str>)> = vec![
        ("world", world, 24, None),
        ("world", world, 25, Some("no-smtp-to-world")),
        ("world", world, 26, None),
        ("world", world, 1023, None),
        ("world", world, 1024, None),
        ("world", world, 8080, None),
        ("ext", ext, 25, Some("no-low-ports")),
        ("ext", ext, 1023, Some("no-low-ports")),
        ("ext", ext, 1024, None),
        ("ext", ext, 8080, None),
    ];
    let mut servers = Vec::new();
    for &(_, addr, port, _) in &cells {
        for proto in [Proto::Tcp, Proto::Udp] {
            servers.push(Server::start(proto, SocketAddr::new(addr, port))?);
        }
    }
    let pins = PinDir::new("enforcer-test")?;
    let agent = Agent::start(AgentConfig::new(
        bundle.path(),
        &root.relative_str(),
        pins.path(),
    ))?;

    // (cell, probe kind, hook, protocol)
    let kinds = [
        ("tcp", "connect4", Proto::Tcp),
        ("udp", "sendmsg4", Proto::Udp),
        ("udpc", "connect4", Proto::Udp),
    ];
    let mut attempts = Vec::new();
    let mut rows = Vec::new();
    for &(name, addr, port, forbid) in &cells {
        for &(kind, hook, proto) in &kinds {
            let protocol = match proto {
                Proto::Tcp => Protocol::Tcp,
                Proto::Udp => Protocol::Udp,
            };
            let cedar = oracle.decide("client", name, port, protocol)?;
            ensure!(
                cedar.allowed == forbid.is_none(),
                "{name}:{port}/{}: Cedar says {}, the test expects {}",
                proto.as_str(),
                cedar.allowed,
                forbid.is_none()
            );
            attempts.push(attempt(kind, addr, port));
            rows.push((name, port, forbid, kind, hook, proto));
        }
    }
    let results = Probe::new()
        .in_cgroup(&client)
        .run(&attempts)
        .context("probing")?;
    let mut problems = Vec::new();
    for (&(name, port, forbid, kind, _, _), r) in rows.iter().zip(&results) {
        let want = if forbid.is_none() {
            Outcome::Ok
        } else {
            Outcome::Eperm
        };
        if r.outcome != want {
            problems.push(format!(
                "{name}:{port} ({kind}): kernel {:?} (errno {}), want {want:?}",
                r.outcome, r.errno
            ));
        }
    }

    let denied = rows.iter().filter(|r| r.2.is_some()).count();
    ensure!(denied == 3 * 3, "{denied} denied attempts planned");
    let _ = agent.wait_for_events(denied, Duration::from_secs(10));
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;
    let denies: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.get("verdict").and_then(|v| v.as_str()) == Some("deny"))
        .collect();
    for &(name, port, forbid, kind, hook, proto) in &rows {
        let mine: Vec<_> = denies
            .iter()
            .filter(|e| event_matches(e, "client", name, port, proto))
            .filter(|e| e.get("hook").and_then(|h| h.as_str()) == Some(hook))
            .collect();
        let want = usize::from(forbid.is_some());
        if mine.len() != want {
            problems.push(format!(
                "{name}:{port} ({kind}): {} deny events, want {want}",
                mine.len()
            ));
        } else if let (Some(e), Some(forbid)) = (mine.first(), forbid) {
            let id = e.pointer("/policy/id").and_then(|v| v.as_str());
            if id != Some(forbid) {
                problems.push(format!(
                    "{name}:{port} ({kind}): deny event names {id:?}, want {forbid:?}"
                ));
            }
        }
    }
    if denies.len() != denied {
        problems.push(format!(
            "{} deny events for {denied} denied attempts: {denies:?}",
            denies.len()
        ));
    }
    ensure!(
        problems.is_empty(),
        "{}\n--- agent stderr (tail) ---\n{}",
        problems.join("\n"),
        agent.stderr_tail()
    );
    drop(servers);
    Ok(())
}

//! Flow events stay paired when a connected UDP socket connects again (issue 8, item 7, flow
//! side), against the real kernel.
//!
//! - A UDP socket connected again and again to one tracked destination is one flow: one
//!   `flow.opened`, and one `flow.closed` when the socket is closed (before, each `connect()`
//!   wrote an opened event and only the last record was ever closed: a reconnect loop flooded
//!   `FLOW_EVENTS` and left opened flows that never closed).
//! - A UDP socket moving between destinations (two tracked, one untracked) closes each flow it
//!   leaves before the next opens: the events alternate opened/closed, each pair naming one
//!   destination.
//!
//! Addresses 127.97.x.y only; cgroups `ff-*`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::cli::wait_notices;
use enforcer_tests::fixtures::{write_bundle, Entity};
use enforcer_tests::servers::Proto;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, PinDir, PolicyBundle, Probe, TestCgroup,
};
use serde_json::Value;

const NET: u8 = 97;
const WAIT: Duration = Duration::from_secs(10);
/// How long the events file must stay unchanged before "exactly N" is judged (late extras).
const QUIET: Duration = Duration::from_millis(1500);

const SAME_TENANT: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#;

/// One workload (`ff-client`) and three destinations at 127.97.<t>.i: two tracked vector
/// databases (`vectors-1`, `vectors-2`, UDP 6334) and an untracked API (`plain-api`, UDP
/// 8000), each with a bound UDP socket so that the client's datagrams are received.
struct World {
    _servers: Vec<UdpSocket>,
    client: TestCgroup,
    root: TestCgroup,
    bundle: PolicyBundle,
    pins: PinDir,
    t: u8,
}

fn world(t: u8) -> Result<World> {
    let entities = vec![
        Entity::workload(NET, "ff-client", "acme", "retrieval", t, 1),
        Entity::endpoint(NET, "vectors-1", "acme", "vector_db", t, 10).port(
            6334,
            Proto::Udp,
            "query",
        ),
        Entity::endpoint(NET, "vectors-2", "acme", "vector_db", t, 11).port(
            6334,
            Proto::Udp,
            "query",
        ),
        Entity::endpoint(NET, "plain-api", "acme", "llm_api", t, 12).port(
            8000,
            Proto::Udp,
            "query",
        ),
    ];
    let root = TestCgroup::create(unique_name("ff-root"))?;
    let client = root.child("ff-client")?;
    let bundle = write_bundle(&entities, &root.relative_str(), SAME_TENANT)?;
    let addr = |i: u8, port: u16| SocketAddr::new(IpAddr::from([127, NET, t, i]), port);
    let servers = vec![
        UdpSocket::bind(addr(10, 6334))?,
        UdpSocket::bind(addr(11, 6334))?,
        UdpSocket::bind(addr(12, 8000))?,
    ];
    Ok(World {
        _servers: servers,
        client,
        root,
        bundle,
        pins: PinDir::new("ff-pins")?,
        t,
    })
}

impl World {
    fn addr(&self, i: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from([127, NET, self.t, i]), port)
    }
    fn config(&self) -> AgentConfig {
        AgentConfig::new(
            self.bundle.path(),
            &self.root.relative_str(),
            self.pins.path(),
        )
    }
}

fn s<'a>(e: &'a Value, p: &str) -> Option<&'a str> {
    e.pointer(p).and_then(Value::as_str)
}

/// The client's UDP flow events, in the order the agent wrote them.
fn client_udp_flows(agent: &Agent) -> Result<Vec<Value>> {
    Ok(agent
        .events()?
        .into_iter()
        .filter(|e| {
            matches!(s(e, "/type"), Some("flow.opened" | "flow.closed"))
                && s(e, "/subject/workload") == Some("ff-client")
                && s(e, "/flow/protocol") == Some("udp")
        })
        .collect())
}

/// Waits for `closed` closed events of the client, then for the file to settle, and returns
/// all its UDP flow events.
fn settled_flows(agent: &Agent, closed: usize) -> Result<Vec<Value>> {
    wait_notices(agent, "flow.closed", closed, WAIT, |e| {
        s(e, "/subject/workload") == Some("ff-client")
    })?;
    agent.settled_events(QUIET, WAIT)?;
    client_udp_flows(agent)
}

fn brief(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} cookie {}",
                s(e, "/type").unwrap_or("?"),
                s(e, "/destination/name").unwrap_or("?"),
                e.pointer("/flow/cookie")
                    .map(Value::to_string)
                    .unwrap_or_default()
            )
        })
        .collect()
}

#[test]
fn a_udp_socket_connected_again_to_one_destination_is_one_flow() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let w = world(1)?;
    let agent = Agent::start(w.config())?;
    const CONNECTS: u64 = 200;
    let summary = Probe::new()
        .in_cgroup(&w.client)
        .reconnect(CONNECTS, &[w.addr(10, 6334)])?;
    ensure!(
        summary.ok == CONNECTS,
        "every connect and send is allowed: {summary:?}"
    );
    let flows = settled_flows(&agent, 1)?;
    let b = brief(&flows);
    ensure!(
        b.len() == 2
            && s(&flows[0], "/type") == Some("flow.opened")
            && s(&flows[1], "/type") == Some("flow.closed")
            && flows[0].pointer("/flow/cookie") == flows[1].pointer("/flow/cookie")
            && b.iter().all(|l| l.contains(" vectors-1 ")),
        "{CONNECTS} connects of one socket to one destination: one flow.opened then one \
         flow.closed expected, got {} events: {:?}",
        b.len(),
        &b[..b.len().min(6)]
    );
    Ok(())
}

#[test]
fn a_udp_socket_moving_between_destinations_closes_each_flow_it_leaves() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let w = world(2)?;
    let agent = Agent::start(w.config())?;
    let (v1, v2, api) = (w.addr(10, 6334), w.addr(11, 6334), w.addr(12, 8000));
    // Ten connects of one socket: v1 v1 v2 api v2 | v1 v1 v2 api v2, then the close. The
    // flows: v1 (two connects, one flow), v2 (left for the untracked api), v2, v1, v2, v2
    // (closed at the socket's release): six opened, six closed, alternating.
    let summary = Probe::new()
        .in_cgroup(&w.client)
        .reconnect(10, &[v1, v1, v2, api, v2])?;
    ensure!(
        summary.ok == 10,
        "every connect and send is allowed: {summary:?}"
    );
    let flows = settled_flows(&agent, 6)?;
    let b = brief(&flows);
    let want = [
        "vectors-1",
        "vectors-2",
        "vectors-2",
        "vectors-1",
        "vectors-2",
        "vectors-2",
    ];
    ensure!(
        flows.len() == 2 * want.len(),
        "six opened/closed pairs expected, got {} events: {b:#?}",
        flows.len()
    );
    for (i, name) in want.iter().enumerate() {
        let (opened, closed) = (&flows[2 * i], &flows[2 * i + 1]);
        ensure!(
            s(opened, "/type") == Some("flow.opened")
                && s(closed, "/type") == Some("flow.closed")
                && s(opened, "/destination/name") == Some(name)
                && s(closed, "/destination/name") == Some(name),
            "pair {i}: flow.opened then flow.closed of {name} expected: {b:#?}"
        );
    }
    Ok(())
}

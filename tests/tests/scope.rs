//! Scope: only sockets whose cgroup is inside `--cgroup-root` are judged. A process outside
//! it is never affected; a cgroup inside it that no workload names is denied as
//! `unknown_subject` (fail closed) and reported once.

use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::fixtures::{event_matches, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, unique_name, Outcome, Probe, TestCgroup};

#[test]
fn processes_outside_the_cgroup_root_are_never_affected() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(33)?;
    let _servers = world.servers_v4()?;
    // A sibling of the root: a cgroup of the host that the agent must leave alone.
    let outside = TestCgroup::create(unique_name("enforcer-outside"))?;
    let agent = world.start_agent()?;

    let target = world.entity("globex-vectors");
    let cross = attempt("tcp", target.ip(false), 6333);

    // Inside the root, the cross-tenant call is denied: the agent is enforcing...
    let inside = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .run_one(&cross)?;
    ensure!(
        inside.outcome == Outcome::Eperm,
        "inside the root: {inside:?}"
    );
    // ...while the same call from the test's own cgroup and from a sibling cgroup passes.
    let host = Probe::new().run_one(&cross)?;
    ensure!(
        host.outcome == Outcome::Ok,
        "from the host's cgroup: {host:?}"
    );
    let sibling = Probe::new().in_cgroup(&outside).run_one(&cross)?;
    ensure!(
        sibling.outcome == Outcome::Ok,
        "from a cgroup outside the root: {sibling:?}"
    );
    // UDP too (the sendmsg hooks).
    let udp = attempt("udp", world.entity("acme-vectors").ip(false), 6334);
    let sibling_udp = Probe::new().in_cgroup(&outside).run_one(&udp)?;
    ensure!(
        sibling_udp.outcome == Outcome::Ok,
        "udp outside the root: {sibling_udp:?}"
    );

    // Exactly one deny event: the one from inside.
    agent.wait_for_events(1, Duration::from_secs(10))?;
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;
    let denies: Vec<_> = events
        .iter()
        .filter(|e| e.get("verdict").and_then(|v| v.as_str()) == Some("deny"))
        .collect();
    ensure!(
        denies.len() == 1
            && event_matches(
                denies[0],
                "acme-gateway",
                "globex-vectors",
                6333,
                Proto::Tcp
            ),
        "want exactly the inside deny, got {denies:?}"
    );
    Ok(())
}

#[test]
fn unmanaged_cgroup_inside_the_root_is_denied_and_reported() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(36)?;
    let _servers = world.servers_v4()?;
    let agent = world.start_agent()?;
    // Appears after the agent started, as a pod the inventory does not know yet.
    let stranger = world.root.child("stranger")?;

    // Even a destination of the same tenant as everyone: the subject has no identity.
    let target = world.entity("acme-vectors");
    let r = Probe::new()
        .in_cgroup(&stranger)
        .run_one(&attempt("tcp", target.ip(false), 6333))?;
    ensure!(r.outcome == Outcome::Eperm, "unmanaged cgroup: {r:?}");

    let is_unknown =
        |e: &serde_json::Value| e.get("reason").and_then(|v| v.as_str()) == Some("unknown_subject");
    agent.wait_for(1, Duration::from_secs(10), is_unknown)?;
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;
    let unknown: Vec<_> = events.iter().filter(|e| is_unknown(e)).collect();
    ensure!(
        unknown.len() == 1,
        "want one unknown_subject event, got {unknown:?}"
    );
    let e = unknown[0];
    ensure!(
        e.get("verdict").and_then(|v| v.as_str()) == Some("deny"),
        "not a deny: {e}"
    );
    if let Some(id) = e.pointer("/subject/cgroup_id").and_then(|v| v.as_u64()) {
        ensure!(
            id == stranger.id(),
            "event cgroup_id {id}, stranger is {}",
            stranger.id()
        );
    }
    ensure!(
        e.pointer("/destination/name").and_then(|v| v.as_str()) == Some("acme-vectors"),
        "destination not named: {e}"
    );
    Ok(())
}

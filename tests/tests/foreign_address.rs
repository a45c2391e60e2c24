//! Nobody answers in another identity's name: in a network namespace that workloads share
//! (bare hosts with an inventory, `hostNetwork` pods), a workload could bind another
//! workload's address (or send from it) and receive what callers address to it, or listen on
//! the wildcard address and answer the SYNs sent to it. Callers are judged by the address they
//! dial, so each of these let one tenant's process stand in for another tenant's workload
//! (red-team finding F2, and the wildcard half of F1).
//!
//! Everything runs inside a network namespace the test creates (`fa-*`), which all workloads
//! share. Addresses: 127.79.0.0/16 and `fd7e:4f::/64`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::agent::event_has;
use enforcer_tests::fixtures::{v6_addr, Entity, World, TENANT_ISOLATION_POLICIES};
use enforcer_tests::probe::{AttemptResult, ProbeServer};
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, unique_name, NetNs, Outcome, Probe, Veth};
use serde_json::Value;

/// This file's address range: 127.79.0.0/16 (and `fd7e:4f::/64`).
const NET: u8 = 79;
const PORT: u16 = 7900;

/// acme-app (the identity callers mean to reach), acme-client (allowed to reach it),
/// globex-intruder (the other tenant's process on the same host) and globex-client (allowed
/// to reach the intruder), all sharing the namespace `ns`, with their IPv6 addresses on its
/// loopback device.
fn shared_host() -> Result<(World, NetNs)> {
    let entities = vec![
        Entity::workload(NET, "acme-app", "acme", "inference", 1, 1)
            .port(PORT, Proto::Tcp, "connect")
            .port(PORT, Proto::Udp, "connect"),
        Entity::workload(NET, "acme-client", "acme", "inference", 1, 2),
        Entity::workload(NET, "globex-intruder", "globex", "inference", 2, 1)
            .port(PORT, Proto::Tcp, "connect")
            .port(PORT, Proto::Udp, "connect"),
        Entity::workload(NET, "globex-client", "globex", "inference", 2, 2),
    ];
    let world = World::new(NET, entities, TENANT_ISOLATION_POLICIES)?;
    let ns = NetNs::create(&unique_name("fa"))?;
    for e in [
        "acme-app",
        "acme-client",
        "globex-intruder",
        "globex-client",
    ] {
        let v6 = format!("{}/128", world.entity(e).ip(true));
        ns.exec(&["ip", "addr", "add", &v6, "dev", "lo", "nodad"])?;
    }
    Ok((world, ns))
}

/// Passes when nothing went wrong, else fails with every problem and the events seen.
fn verdict(problems: &[String], events: &[Value]) -> Result<()> {
    ensure!(
        problems.is_empty(),
        "{}\nevents:\n  {}",
        problems.join("\n"),
        events
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    Ok(())
}

fn text(e: &Value, pointer: &str) -> String {
    e.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The test's policies with every workload's egress to World open.
fn with_world_egress() -> String {
    format!(
        "{TENANT_ISOLATION_POLICIES}\n@id(\"world-egress\")\npermit (principal, action, resource is World);\n"
    )
}

/// A probe run as workload `name` inside `ns`.
fn as_workload(world: &World, ns: &NetNs, name: &str) -> Probe {
    Probe::new().in_cgroup(world.cgroup(name)).in_netns(ns)
}

/// A server of workload `name` on the wildcard address (`[::]`, dual-stack) inside `ns`.
fn wildcard_listener(world: &World, ns: &NetNs, name: &str) -> Result<ProbeServer> {
    ProbeServer::start(
        Some(ns),
        world.cgroup(name),
        format!("[::]:{PORT}").parse()?,
    )
}

/// A blocking connect whose SYNs were dropped: it timed out.
fn timed_out(r: &AttemptResult) -> bool {
    r.outcome == Outcome::Error && r.errno == libc::ETIMEDOUT
}

/// A connect whose SYNs were dropped: it timed out (ETIMEDOUT) or, bounded by SO_SNDTIMEO,
/// gave up in progress (EINPROGRESS).
fn syns_dropped(r: &AttemptResult) -> bool {
    timed_out(r) || (r.outcome == Outcome::Error && r.errno == libc::EINPROGRESS)
}

/// The events whose destination address is `ip`.
fn events_to<'a>(events: &'a [Value], ip: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| text(e, "/destination/ip") == ip)
        .collect()
}

/// `bind()` of acme-app's address (IPv4, IPv6, IPv4-mapped, TCP and UDP, any port) from the
/// other tenant's cgroup is refused with one `foreign_address` event naming acme-app; so is a
/// datagram whose `IP_PKTINFO` / `IPV6_PKTINFO` source is acme-app's address. The intruder's
/// own address, the wildcard and 127.0.0.1 (no identity's) stay bindable, and acme-app binds
/// its own address.
#[test]
fn binding_or_sending_from_another_identitys_address_is_refused() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let (world, ns) = shared_host()?;
    let app4 = world.entity("acme-app").ip(false);
    let app6 = world.entity("acme-app").ip(true);
    let own4 = world.entity("globex-intruder").ip(false);
    let own6 = world.entity("globex-intruder").ip(true);
    let mapped = match app4 {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(_) => unreachable!("ip(false) is IPv4"),
    };
    let agent = world.start_agent()?;

    let intruder = as_workload(&world, &ns, "globex-intruder");
    let refused = [
        (format!("bind:{app4}:{PORT}"), "bind4"),
        (format!("bindu:{app4}:{PORT}"), "bind4"),
        (format!("bind:{app4}:0"), "bind4"),
        (format!("bind:[{app6}]:{PORT}"), "bind6"),
        (format!("bindu:[{app6}]:{PORT}"), "bind6"),
        (format!("bind:[{mapped}]:{PORT}"), "bind6"),
        (format!("udpsrc:{own4}:{PORT}@{app4}"), "sendmsg4"),
        (format!("udpsrc:[{own6}]:{PORT}@{app6}"), "sendmsg6"),
        // A connected socket's send with control messages carries no destination: the
        // source is checked all the same.
        (format!("udpcsrc:{own4}:{PORT}@{app4}"), "sendmsg4"),
        (format!("udpcsrc:[{own6}]:{PORT}@{app6}"), "sendmsg6"),
    ];
    let allowed = [
        format!("bind:{own4}:{PORT}"),
        format!("bindu:[{own6}]:{PORT}"),
        format!("bind:0.0.0.0:{PORT}"),
        format!("bind:[::]:{PORT}"),
        format!("bind:127.0.0.1:{PORT}"),
        format!("udpsrc:{own4}:{PORT}@{own4}"),
        format!("udpsrc:[{own6}]:{PORT}@{own6}"),
        format!("udpcsrc:{own4}:{PORT}@{own4}"),
    ];
    let mut attempts: Vec<String> = refused.iter().map(|r| r.0.clone()).collect();
    attempts.extend(allowed.iter().cloned());
    let results = intruder.run(&attempts)?;
    let owner = as_workload(&world, &ns, "acme-app").run(&[
        format!("bind:{app4}:{PORT}"),
        format!("bindu:[{app6}]:{PORT}"),
        format!("bind:[{mapped}]:{PORT}"),
    ])?;

    let mut problems = Vec::new();
    for (r, want) in results.iter().zip(
        std::iter::repeat_n(Outcome::Eperm, refused.len())
            .chain(std::iter::repeat_n(Outcome::Ok, allowed.len())),
    ) {
        if r.outcome != want {
            problems.push(format!(
                "{}: {:?} (errno {}), want {want:?}",
                r.attempt, r.outcome, r.errno
            ));
        }
    }
    for r in &owner {
        if r.outcome != Outcome::Ok {
            problems.push(format!(
                "acme-app's own {}: {:?} (errno {})",
                r.attempt, r.outcome, r.errno
            ));
        }
    }

    // Every refusal's event first (the agent may be slow to write them), then any extra.
    let _ = agent.wait_for(refused.len(), Duration::from_secs(10), |e| {
        e["reason"] == "foreign_address"
    });
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(10))?;
    let foreign: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "foreign_address")
        .collect();
    for hook in ["bind4", "bind6", "sendmsg4", "sendmsg6"] {
        let n = foreign.iter().filter(|e| text(e, "/hook") == hook).count();
        let want = refused.iter().filter(|r| r.1 == hook).count();
        if n != want {
            problems.push(format!("{hook}: {n} foreign_address events, want {want}"));
        }
    }
    for e in &foreign {
        let right = text(e, "/verdict") == "deny"
            && text(e, "/subject/workload") == "globex-intruder"
            && text(e, "/destination/name") == "acme-app"
            && text(e, "/policy/id") == "foreign-address"
            && e.to_string().contains("AML.T0073");
        if !right {
            problems.push(format!(
                "event without the deny, both workloads, the rule and its technique: {e}"
            ));
        }
    }
    if events.len() != foreign.len() {
        problems.push(format!(
            "{} events, {} of them foreign_address",
            events.len(),
            foreign.len()
        ));
    }
    verdict(&problems, &events)
}

/// A listener of the other tenant on the wildcard address (`[::]`, dual-stack) gets no SYN
/// that callers sent to acme-app's addresses: they are dropped at ingress, one
/// `foreign_address` event each, naming acme-app and the listener's cgroup. The listener
/// still answers on its own address.
#[test]
fn a_wildcard_listener_does_not_answer_for_another_identity() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let (world, ns) = shared_host()?;
    let app4 = world.entity("acme-app").ip(false);
    let app6 = world.entity("acme-app").ip(true);
    let own4 = world.entity("globex-intruder").ip(false);
    let agent = world.start_agent()?;
    let server = wildcard_listener(&world, &ns, "globex-intruder")?;

    let mut problems = Vec::new();
    // The control: the intruder's own address, from a caller allowed to reach it.
    let own = as_workload(&world, &ns, "globex-client").run_one(&format!("tcp:{own4}:{PORT}"))?;
    if own.outcome != Outcome::Ok {
        problems.push(format!(
            "globex-client to the intruder's own address: {own:?}"
        ));
    }
    // acme-client may reach acme-app: connect4/6 pass, and the SYN finds the wildcard.
    let stolen = as_workload(&world, &ns, "acme-client")
        .run(&[format!("tcp:{app4}:{PORT}"), format!("tcp:[{app6}]:{PORT}")])?;
    for r in &stolen {
        if !timed_out(r) {
            problems.push(format!(
                "acme-client's {}: {:?} (errno {}), want a timeout (SYNs dropped)",
                r.attempt, r.outcome, r.errno
            ));
        }
    }
    let accepted = server.accepted_at_least(1, Duration::from_secs(5));
    if accepted.len() != 1 {
        problems.push(format!(
            "the wildcard listener accepted {accepted:?}, want only globex-client"
        ));
    }

    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(10))?;
    let foreign: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "foreign_address")
        .collect();
    let intruder_cgroup = world.cgroup("globex-intruder").path();
    let intruder_cgroup = intruder_cgroup
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    for ip in [app4, app6] {
        let hits: Vec<&&Value> = foreign
            .iter()
            .filter(|e| text(e, "/destination/ip") == ip.to_string())
            .collect();
        let right = hits.len() == 1
            && text(hits[0], "/hook") == "ingress"
            && text(hits[0], "/verdict") == "deny"
            && text(hits[0], "/destination/name") == "acme-app"
            && hits[0]["destination"]["cgroup"]
                .to_string()
                .contains(&*intruder_cgroup);
        if !right {
            problems.push(format!(
                "want one ingress deny to {ip} naming acme-app and the listener's cgroup \
                 {intruder_cgroup}, got {hits:?}"
            ));
        }
    }
    verdict(&problems, &events)
}

/// A wildcard listener dialled at an address of no identity (127.0.0.1, ::1: WORLD) from a
/// caller in the same namespace is judged as what answers: with World egress open, acme-client
/// reached the other tenant's server through 127.0.0.1 (red-team finding F1). Now its SYNs are
/// dropped with one `tenant_mismatch` event each (acme-client -> globex-intruder, hook
/// `ingress`), while the intruder's own tenant still reaches it there.
#[test]
fn a_wildcard_listener_dialled_at_a_world_address_is_judged_as_itself() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let policies = with_world_egress();
    let entities = vec![
        Entity::workload(NET, "acme-client", "acme", "inference", 1, 2),
        Entity::workload(NET, "globex-intruder", "globex", "inference", 2, 1).port(
            PORT,
            Proto::Tcp,
            "connect",
        ),
        Entity::workload(NET, "globex-client", "globex", "inference", 2, 2),
    ];
    let world = World::new(NET, entities, &policies)?;
    let ns = NetNs::create(&unique_name("fa"))?;
    let agent = world.start_agent()?;
    let server = wildcard_listener(&world, &ns, "globex-intruder")?;

    let mut problems = Vec::new();
    let own = as_workload(&world, &ns, "globex-client")
        .run(&[format!("tcp:127.0.0.1:{PORT}"), format!("tcp:[::1]:{PORT}")])?;
    for r in &own {
        if r.outcome != Outcome::Ok {
            problems.push(format!("globex-client's {}: {r:?}, want ok", r.attempt));
        }
    }
    let other = as_workload(&world, &ns, "acme-client")
        .run(&[format!("tcp:127.0.0.1:{PORT}"), format!("tcp:[::1]:{PORT}")])?;
    for r in &other {
        if !syns_dropped(r) {
            problems.push(format!(
                "{}: {:?} (errno {}), want a timeout (SYNs dropped)",
                r.attempt, r.outcome, r.errno
            ));
        }
    }
    let accepted = server.accepted_at_least(2, Duration::from_secs(5));
    if accepted.len() != 2 {
        problems.push(format!(
            "the listener accepted {accepted:?}, want globex-client's two"
        ));
    }

    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(10))?;
    for ip in ["127.0.0.1", "::1"] {
        let hits = events_to(&events, ip);
        let right = hits.len() == 1
            && event_has(
                hits[0],
                &[
                    ("/hook", "ingress"),
                    ("/verdict", "deny"),
                    ("/reason", "tenant_mismatch"),
                    ("/subject/workload", "acme-client"),
                    ("/destination/name", "globex-intruder"),
                    ("/policy/id", "tenant-isolation"),
                ],
            );
        if !right {
            problems.push(format!(
                "want one ingress tenant_mismatch acme-client -> globex-intruder at {ip}, got {hits:?}"
            ));
        }
    }
    verdict(&problems, &events)
}

/// A workload whose SYNs carry the identity option (here `ingress: audit`) is reached at
/// its own address only, where the option is written and checked, the flow recorded and the
/// rate limit applied: a caller of its own tenant, permitted, that dials its wildcard
/// listener at 127.0.0.1 would skip all three. Dropped as `missing_tag`; the same caller at
/// the workload's address passes.
#[test]
fn a_tagged_listener_is_reached_at_its_own_address_only() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let mut db = Entity::workload(NET, "acme-db", "acme", "inference", 1, 1).port(
        PORT,
        Proto::Tcp,
        "connect",
    );
    db.ingress = Some("audit");
    let entities = vec![
        db,
        Entity::workload(NET, "acme-client", "acme", "inference", 1, 2),
    ];
    let policies = with_world_egress();
    let world = World::new(NET, entities, &policies)?;
    let ns = NetNs::create(&unique_name("fa"))?;
    let db4 = world.entity("acme-db").ip(false);
    let agent = world.start_agent()?;
    let server = wildcard_listener(&world, &ns, "acme-db")?;
    let results = as_workload(&world, &ns, "acme-client")
        .run(&[format!("tcp:{db4}:{PORT}"), format!("tcp:127.0.0.1:{PORT}")])?;
    let mut problems = Vec::new();
    if results[0].outcome != Outcome::Ok {
        problems.push(format!("at its own address: {:?}, want ok", results[0]));
    }
    let r = &results[1];
    if !timed_out(r) {
        problems.push(format!(
            "at 127.0.0.1: {:?} (errno {}), want a timeout (SYNs dropped)",
            r.outcome, r.errno
        ));
    }
    let accepted = server.accepted_at_least(1, Duration::from_secs(5));
    if accepted.len() != 1 {
        problems.push(format!("the listener accepted {accepted:?}, want one"));
    }
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(10))?;
    let hits = events_to(&events, "127.0.0.1");
    let right = hits.len() == 1
        && event_has(
            hits[0],
            &[
                ("/hook", "ingress"),
                ("/reason", "missing_tag"),
                ("/verdict", "deny"),
                ("/peer/workload", "acme-client"),
                ("/destination/name", "acme-db"),
            ],
        );
    if !right {
        problems.push(format!(
            "want one ingress missing_tag acme-client -> acme-db at 127.0.0.1, got {hits:?}"
        ));
    }
    verdict(&problems, &events)
}

/// A caller in its own network namespace (a pod) that dials a server of the node's namespace
/// (a `hostNetwork` pod) at an address nobody holds (the node's) cannot be found by the
/// socket lookup: its egress was judged as a call to World. The SYN's source is the caller's
/// own address, so it is judged as that workload -> the listener: with World egress open,
/// acme-pod reached the other tenant's server (red-team F1's other-namespace half) and is
/// now dropped with one `tenant_mismatch` event, while globex-pod (the server's tenant)
/// passes. A workload with no row in this node's table (`remote-*`: their cgroups are on
/// another node, played here by a process outside the subtree bound to their address) is
/// judged by the ingress allowlist the same way. A source that is nobody's is not judged.
#[test]
fn a_caller_in_another_namespace_is_judged_by_its_address() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let policies = with_world_egress();
    let remote = |name: &str, tenant: &str, t: u8| Entity {
        local: false,
        ..Entity::workload(NET, name, tenant, "inference", t, 3)
    };
    let entities = vec![
        Entity::workload(NET, "acme-pod", "acme", "inference", 1, 2),
        Entity::workload(NET, "globex-server", "globex", "inference", 2, 1).port(
            PORT,
            Proto::Tcp,
            "connect",
        ),
        Entity::workload(NET, "globex-pod", "globex", "inference", 2, 2),
        remote("remote-acme", "acme", 1),
        remote("remote-globex", "globex", 2),
        Entity::endpoint(NET, "acme-scraper", "acme", "llm_api", 1, 4),
    ];
    let world = World::new(NET, entities, &policies)?;
    let node_ns = NetNs::create(&unique_name("fa-node"))?;
    let pod_ns = NetNs::create(&unique_name("fa-pod"))?;
    // The node's address (WORLD) and, on the pods' side, each caller's own address plus one
    // that is nobody's.
    let node = v6_addr(NET, 0xff, 1);
    let nobody = IpAddr::V6(v6_addr(NET, 0xfe, 1));
    let own = |name: &str| world.entity(name).ip(true);
    // (caller, run in its cgroup here, reaches the listener): the remote ones and the
    // endpoint are processes outside the subtree, from their addresses.
    let callers = [
        ("acme-pod", true, false),
        ("globex-pod", true, true),
        ("remote-acme", false, false),
        ("remote-globex", false, true),
        // An endpoint is no principal: its address names no caller to judge.
        ("acme-scraper", false, true),
    ];
    let pod_addrs: Vec<String> = callers
        .iter()
        .map(|(c, _, _)| own(c))
        .chain([nobody])
        .map(|ip| format!("{ip}/64"))
        .collect();
    let pod_addrs: Vec<&str> = pod_addrs.iter().map(String::as_str).collect();
    let veth = Veth::create(&node_ns, &[&format!("{node}/64")], &pod_ns, &pod_addrs)?;
    // Link-local addresses on both ends, as every pod and its veth have.
    let node_link_local = "fe80::ff:1";
    node_ns.ip(&[
        "addr",
        "add",
        &format!("{node_link_local}/64"),
        "dev",
        veth.dev_a(),
        "nodad",
    ])?;
    pod_ns.ip(&["addr", "add", "fe80::2:2/64", "dev", veth.dev_b(), "nodad"])?;
    // `ip -o link` prints "INDEX: NAME@PEER: ..." (the scope of a link-local destination).
    let link = pod_ns.ip(&["-o", "link", "show", "dev", veth.dev_b()])?;
    let pod_ifindex: u32 = link.split(':').next().unwrap_or_default().trim().parse()?;
    let agent = world.start_agent()?;
    let server = wildcard_listener(&world, &node_ns, "globex-server")?;

    // A caller outside the subtree from the address that is nobody's: the network works
    // (bounded retries while the veth comes up) and such a source is not judged.
    let target = format!("tcp:[{node}]:{PORT}");
    let from = |ip: IpAddr| format!("{target}@{ip}");
    let unmanaged = Probe::new().in_netns(&pod_ns);
    let reachable = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        unmanaged
            .run_one(&from(nobody))
            .is_ok_and(|r| r.outcome == Outcome::Ok)
    });
    ensure!(
        reachable,
        "veth network broken: {target} unreachable from the pods' namespace"
    );

    let mut problems = Vec::new();
    for (caller, managed, want_ok) in callers {
        let probe = if managed {
            as_workload(&world, &pod_ns, caller)
        } else {
            unmanaged.clone()
        };
        let r = probe.run_one(&from(own(caller)))?;
        if want_ok && r.outcome != Outcome::Ok {
            problems.push(format!("{caller}: {r:?}, want ok"));
        }
        if !want_ok && !syns_dropped(&r) {
            problems.push(format!(
                "{caller}: {:?} (errno {}), want a timeout (SYNs dropped)",
                r.outcome, r.errno
            ));
        }
    }
    // A link-local source names no one: acme-pod dialling the node's link-local address is
    // refused (World is no principal) instead of passing unjudged.
    let link_local = format!("tcp:[{node_link_local}%{pod_ifindex}]:{PORT}");
    let r = as_workload(&world, &pod_ns, "acme-pod").run_one(&link_local)?;
    if !syns_dropped(&r) {
        problems.push(format!(
            "acme-pod at {link_local}: {:?} (errno {}), want a timeout (SYNs dropped)",
            r.outcome, r.errno
        ));
    }
    let mut want = vec![
        nobody,
        own("globex-pod"),
        own("remote-globex"),
        own("acme-scraper"),
    ];
    let mut peers: Vec<IpAddr> = server
        .accepted_at_least(want.len(), Duration::from_secs(5))
        .iter()
        .map(|a| a.ip())
        .collect();
    peers.sort();
    want.sort();
    if peers != want {
        problems.push(format!("the listener accepted {peers:?}, want {want:?}"));
    }

    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(10))?;
    let hits = events_to(&events, &node.to_string());
    for caller in ["acme-pod", "remote-acme"] {
        let mine: Vec<_> = hits
            .iter()
            .filter(|e| text(e, "/subject/workload") == caller)
            .collect();
        let right = mine.len() == 1
            && event_has(
                mine[0],
                &[
                    ("/hook", "ingress"),
                    ("/verdict", "deny"),
                    ("/reason", "tenant_mismatch"),
                    ("/destination/name", "globex-server"),
                    ("/policy/id", "tenant-isolation"),
                ],
            );
        if !right {
            problems.push(format!(
                "want one ingress tenant_mismatch {caller} -> globex-server at {node}, got {mine:?}"
            ));
        }
    }
    let hits_link_local = events_to(&events, node_link_local);
    let right = hits_link_local.len() == 1
        && event_has(
            hits_link_local[0],
            &[
                ("/hook", "ingress"),
                ("/verdict", "deny"),
                ("/reason", "no_permit"),
                ("/destination/name", "globex-server"),
            ],
        )
        && hits_link_local[0]["subject"]["identity"] == 1;
    if !right {
        problems.push(format!(
            "want one ingress no_permit world -> globex-server at {node_link_local}, got {hits_link_local:?}"
        ));
    }
    if hits.len() != 2 {
        problems.push(format!("want 2 events at {node}, got {}", hits.len()));
    }
    verdict(&problems, &events)
}

//! The central invariant: the kernel decides exactly what Cedar decides.
//!
//! For every (local workload, destination, declared port, protocol) cell of a generated
//! world (3 tenants, 6 workloads in their own cgroups, 3 endpoints, TCP and UDP), the probe's
//! outcome (ok or EPERM) equals `enforcer_policy::Bundle::decide(..).allowed`, every denied
//! attempt has exactly one deny event, and no allowed one has any. UDP cells are tried both
//! unconnected (sendmsg hooks) and connected (connect hooks). IPv4 over loopback; IPv6 over a
//! veth pair between two namespaces the test creates (servers in one, probes in the other,
//! probes still in the workloads' cgroups).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_policy::{Bundle, Protocol};
use enforcer_tests::fixtures::{event_matches, Cell, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, unique_name, NetNs, Outcome, Probe, Veth};

/// One attempt of the matrix: a cell tried through one hook.
struct Row {
    cell: Cell,
    /// Probe attempt kind: `tcp`, `udp` or `udpc`.
    kind: &'static str,
    /// The hook that judges it, as events name it.
    hook: String,
    allowed: bool,
    outcome: Option<Outcome>,
    errno: i32,
}

fn protocol(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

fn rows(world: &World, oracle: &Bundle, v6: bool) -> Result<Vec<Row>> {
    let family = if v6 { "6" } else { "4" };
    let mut rows = Vec::new();
    for cell in world.cells(v6) {
        let allowed = oracle
            .decide(&cell.from, &cell.to, cell.port, protocol(cell.proto))
            .with_context(|| format!("oracle for {cell:?}"))?
            .allowed;
        let kinds: &[(&'static str, &str)] = match cell.proto {
            Proto::Tcp => &[("tcp", "connect")],
            Proto::Udp => &[("udp", "sendmsg"), ("udpc", "connect")],
        };
        for (kind, hook) in kinds {
            rows.push(Row {
                cell: cell.clone(),
                kind,
                hook: format!("{hook}{family}"),
                allowed,
                outcome: None,
                errno: 0,
            });
        }
    }
    Ok(rows)
}

/// Guards the fixture: a matrix where Cedar allows (or denies) everything across tenants
/// would prove little.
fn check_oracle_is_interesting(world: &World, rows: &[Row]) -> Result<()> {
    let tenant = |n: &str| world.entity(n).tenant.clone();
    let cross = |r: &&Row| tenant(&r.cell.from) != tenant(&r.cell.to);
    ensure!(
        rows.iter().filter(cross).any(|r| r.allowed),
        "fixture: no cross-tenant cell is allowed"
    );
    ensure!(
        rows.iter().filter(cross).any(|r| !r.allowed),
        "fixture: no cross-tenant cell is denied"
    );
    ensure!(
        rows.iter().filter(|r| !cross(r)).any(|r| !r.allowed),
        "fixture: no same-tenant cell is denied (the purpose rule)"
    );
    ensure!(
        rows.iter().any(|r| r.allowed && r.cell.proto == Proto::Udp),
        "fixture: no allowed UDP cell"
    );
    Ok(())
}

fn run_matrix(world: &World, v6: bool, client_ns: Option<&NetNs>) -> Result<()> {
    let oracle = Bundle::load(world.bundle.path()).context("the oracle loads the bundle")?;
    let mut rows = rows(world, &oracle, v6)?;
    check_oracle_is_interesting(world, &rows)?;

    let agent = world.start_agent()?;

    // One probe process per subject, running all of that subject's attempts in its cgroup.
    for (name, cg) in &world.cgroups {
        let mine: Vec<usize> = (0..rows.len())
            .filter(|&i| &rows[i].cell.from == name)
            .collect();
        let attempts: Vec<String> = mine
            .iter()
            .map(|&i| attempt(rows[i].kind, rows[i].cell.ip, rows[i].cell.port))
            .collect();
        let mut probe = Probe::new().in_cgroup(cg);
        if let Some(ns) = client_ns {
            probe = probe.in_netns(ns);
        }
        let results = probe.run(&attempts)?;
        for (&i, r) in mine.iter().zip(results) {
            rows[i].outcome = Some(r.outcome);
            rows[i].errno = r.errno;
        }
    }

    let denied = rows.iter().filter(|r| !r.allowed).count();
    // Wait for the events of every denied attempt, then a quiet moment to catch extras.
    let _ = agent.wait_for_events(denied, Duration::from_secs(20));
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;

    let mut problems = Vec::new();
    let mut matched = 0;
    for r in &rows {
        let c = &r.cell;
        let want = if r.allowed {
            Outcome::Ok
        } else {
            Outcome::Eperm
        };
        let label = format!(
            "{} -> {} {}:{} {} via {}",
            c.from,
            c.to,
            c.ip,
            c.port,
            c.proto.as_str(),
            r.hook
        );
        if r.outcome != Some(want) {
            problems.push(format!(
                "{label}: Cedar says {}, probe saw {:?} (errno {})",
                if r.allowed { "allow" } else { "deny" },
                r.outcome,
                r.errno
            ));
        }
        let n = events
            .iter()
            .filter(|e| event_matches(e, &c.from, &c.to, c.port, c.proto))
            .filter(|e| e.get("hook").and_then(|h| h.as_str()) == Some(r.hook.as_str()))
            .count();
        matched += n;
        let want_events = usize::from(!r.allowed);
        if n != want_events {
            problems.push(format!("{label}: {n} deny events, want {want_events}"));
        }
    }
    let deny_events = events
        .iter()
        .filter(|e| e.get("verdict").and_then(|v| v.as_str()) == Some("deny"))
        .count();
    if deny_events != matched {
        problems.push(format!(
            "{} deny events match no attempt of the matrix",
            deny_events - matched.min(deny_events)
        ));
    }

    let mut summary: BTreeMap<(bool, &str), usize> = BTreeMap::new();
    for r in &rows {
        *summary.entry((r.allowed, r.kind)).or_default() += 1;
    }
    eprintln!(
        "matrix ({}): {} attempts, {denied} denied by Cedar, by (allowed, kind): {summary:?}",
        if v6 { "IPv6 netns" } else { "IPv4 loopback" },
        rows.len()
    );
    const SHOWN: usize = 40;
    let more = problems.len().saturating_sub(SHOWN);
    ensure!(
        problems.is_empty(),
        "{} problems over {} attempts (Cedar vs kernel, events):\n  {}{}\nagent stderr:\n{}",
        problems.len(),
        rows.len(),
        problems[..problems.len().min(SHOWN)].join("\n  "),
        if more > 0 {
            format!("\n  ... and {more} more")
        } else {
            String::new()
        },
        agent.stderr_tail()
    );
    Ok(())
}

#[test]
fn matrix_ipv4_loopback() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(31)?;
    let _servers = world.servers_v4()?;
    run_matrix(&world, false, None)
}

#[test]
fn matrix_ipv6_netns() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(32)?;
    let server_ns = NetNs::create(&unique_name("enf-srv"))?;
    let client_ns = NetNs::create(&unique_name("enf-cli"))?;
    let server_addrs = world.v6_server_addrs();
    let server_addrs: Vec<&str> = server_addrs.iter().map(String::as_str).collect();
    let _veth = Veth::create(
        &server_ns,
        &server_addrs,
        &client_ns,
        &[&world.v6_client_addr()],
    )?;
    let servers = world.servers_v6(&server_ns)?;

    // The network itself must work before the enforcer is judged on it: a probe outside
    // the test cgroups reaches a server (bounded retries while the veth comes up).
    let first = attempt("tcp", servers[0].addr().ip(), servers[0].addr().port());
    let probe = Probe::new()
        .in_netns(&client_ns)
        .timeout(Duration::from_secs(10));
    let reachable = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        probe
            .run_one(&first)
            .is_ok_and(|r| r.outcome == Outcome::Ok)
    });
    ensure!(
        reachable,
        "veth network broken: {first} unreachable from the client namespace"
    );

    run_matrix(&world, true, Some(&client_ns))
}

//! `enforcer policy explain` and `enforcer status` against a running agent.
//!
//! Explain names the determining policy (id, `file:line`, ATLAS techniques) and compares the
//! PDP's decision with the kernel's live table (`kernel and PDP agree`, or `DISAGREE` with
//! exit 3 when the bundle on disk is not what the kernel holds). Status reports the revision
//! that the deny events carry, per-reason verdict counters, and map fill levels.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{
    copy_bundle, enforcer, first_applied_snapshot, is_revision, line_of, replace_file,
    wait_notices, CliOutput, StateDir,
};
use enforcer_tests::fixtures::{
    event_matches, render_inventory, standard_entities, Entity, World, TENANT_ISOLATION_POLICIES,
};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, unique_name, Agent, Outcome, Probe, TestCgroup};
use serde_json::Value;

const NET: u8 = 48;

/// Same-tenant permit, tenant isolation and the purpose rule, each forbid with its ATLAS
/// technique. Lines are computed from this text, not hard-coded.
static POLICIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"// explain/status test policies
{TENANT_ISOLATION_POLICIES}
@id("evaluation-no-feature-writes")
@atlas("AML.T0020")
forbid (principal, action == Action::"write", resource is Endpoint)
when {{ principal.purpose == "evaluation" && resource.kind == "feature_store" }};
"#
    )
});

/// The lines where policy `id` may be said to be: its `@id` annotation or its effect.
fn policy_lines(id: &str) -> Vec<u32> {
    let ann = line_of(&POLICIES, &format!("@id(\"{id}\")")).expect("fixture policy id");
    let effect = POLICIES
        .lines()
        .enumerate()
        .skip(ann as usize)
        .find(|(_, l)| l.starts_with("permit") || l.starts_with("forbid"))
        .map(|(i, _)| i as u32 + 1)
        .expect("fixture policy effect");
    vec![ann, effect]
}

fn explain(
    dir: &Path,
    pins: &Path,
    from: &str,
    to: &str,
    port: u16,
    proto: Proto,
) -> Result<CliOutput> {
    let port = port.to_string();
    enforcer(&[
        "policy".as_ref(),
        "explain".as_ref(),
        dir.as_os_str(),
        "--from".as_ref(),
        from.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
        "--port".as_ref(),
        port.as_ref(),
        "--protocol".as_ref(),
        proto.as_str().as_ref(),
        "--pin-path".as_ref(),
        pins.as_os_str(),
    ])
}

/// The decision word of the explanation: the first line's first word (`ALLOW` / `DENY`).
fn decision(out: &CliOutput) -> Option<&str> {
    out.stdout
        .lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.split(|c: char| !c.is_ascii_alphabetic()).next())
}

/// What the `kernel:` line (at the start of a line, not the indented key line) says.
fn kernel_word(out: &CliOutput) -> Option<&'static str> {
    let line = out.stdout.lines().find(|l| l.starts_with("kernel:"))?;
    if line.contains("ALLOW") {
        Some("ALLOW")
    } else if line.contains("DENY") {
        Some("DENY")
    } else {
        None
    }
}

struct Want<'a> {
    from: &'a str,
    to: &'a str,
    port: u16,
    proto: Proto,
    decision: &'a str,
    policy: &'a str,
    atlas: Option<&'a str>,
}

fn check_explain(dir: &Path, pins: &Path, w: &Want) -> Result<()> {
    let out = explain(dir, pins, w.from, w.to, w.port, w.proto)?;
    let label = format!(
        "explain {} -> {}:{}/{}",
        w.from,
        w.to,
        w.port,
        w.proto.as_str()
    );
    ensure!(out.success(), "{label}: want exit 0 (agree): {out}");
    ensure!(
        decision(&out) == Some(w.decision),
        "{label}: decision {:?}, want {}: {out}",
        decision(&out),
        w.decision
    );
    let policy_line = out
        .stdout
        .lines()
        .find(|l| l.contains(w.policy))
        .with_context(|| format!("{label}: policy id {} not named: {out}", w.policy))?;
    let locs: Vec<String> = policy_lines(w.policy)
        .iter()
        .map(|l| format!("policies.cedar:{l}"))
        .collect();
    ensure!(
        locs.iter().any(|l| policy_line.contains(l.as_str())),
        "{label}: the line naming {} must give its location ({} ): {policy_line:?}\n{out}",
        w.policy,
        locs.join(" or ")
    );
    if let Some(t) = w.atlas {
        ensure!(
            out.stdout.contains(t),
            "{label}: ATLAS {t} not shown: {out}"
        );
    }
    ensure!(
        kernel_word(&out) == Some(w.decision),
        "{label}: the `kernel:` line must say {}: {out}",
        w.decision
    );
    ensure!(
        out.stdout.contains("kernel and PDP agree"),
        "{label}: no `kernel and PDP agree`: {out}"
    );
    Ok(())
}

#[test]
fn explain_reports_policy_location_atlas_and_kernel_agreement() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::new(NET, standard_entities(NET), &POLICIES)?;
    let state = StateDir::new()?;
    let cfg = state.configure(world.agent_config());
    let agent = Agent::start(cfg)?;
    first_applied_snapshot(&agent)?;
    let (dir, pins) = (world.bundle.path(), world.pins.path());

    for w in [
        Want {
            from: "acme-gateway",
            to: "globex-vectors",
            port: 6333,
            proto: Proto::Tcp,
            decision: "DENY",
            policy: "tenant-isolation",
            atlas: Some("AML.T0085.000"),
        },
        Want {
            from: "initech-evaluator",
            to: "initech-features",
            port: 7001,
            proto: Proto::Tcp,
            decision: "DENY",
            policy: "evaluation-no-feature-writes",
            atlas: Some("AML.T0020"),
        },
        Want {
            from: "acme-gateway",
            to: "acme-vectors",
            port: 6333,
            proto: Proto::Tcp,
            decision: "ALLOW",
            policy: "same-tenant",
            atlas: None,
        },
        Want {
            from: "acme-gateway",
            to: "acme-vectors",
            port: 6334,
            proto: Proto::Udp,
            decision: "ALLOW",
            policy: "same-tenant",
            atlas: None,
        },
    ] {
        check_explain(dir, pins, &w)?;
    }

    // A bundle on disk that differs from what the kernel holds: the allowed cell is now
    // forbidden there, but the agent (watching the original dir) still allows it.
    let other = copy_bundle(dir)?;
    std::fs::write(
        other.path().join("extra.cedar"),
        "@id(\"no-gateway-vectors\")\nforbid (principal == Workload::\"acme-gateway\", action, resource == Endpoint::\"acme-vectors\");\n",
    )?;
    let out = explain(
        other.path(),
        pins,
        "acme-gateway",
        "acme-vectors",
        6333,
        Proto::Tcp,
    )?;
    ensure!(
        out.code == Some(3),
        "explain of a bundle the kernel does not hold: want exit 3: {out}"
    );
    ensure!(
        decision(&out) == Some("DENY"),
        "PDP side must be DENY: {out}"
    );
    ensure!(
        kernel_word(&out) == Some("ALLOW"),
        "kernel side must be ALLOW: {out}"
    );
    ensure!(out.stdout.contains("DISAGREE"), "no DISAGREE: {out}");
    Ok(())
}

fn count(status: &Value, verdict: &str, reason: &str) -> Option<u64> {
    status.get("verdicts")?.as_array()?.iter().find_map(|v| {
        (v.get("verdict")?.as_str()? == verdict && v.get("reason")?.as_str()? == reason)
            .then(|| v.get("count")?.as_u64())
            .flatten()
    })
}

#[test]
fn status_reports_revision_counters_and_map_fill() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 1;
    let world = World::new(net, standard_entities(net), &POLICIES)?;
    let _servers = world.servers_v4()?;
    let state = StateDir::new()?;
    let cfg = state.configure(world.agent_config());
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    let applied = first_applied_snapshot(&agent)?;

    let gw = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let ev = Probe::new().in_cgroup(world.cgroup("initech-evaluator"));
    let (cross, same) = world.gateway_calls();
    let write = attempt("tcp", world.entity("initech-features").ip(false), 7001);
    let r = gw.run(&[&cross, &cross, &cross, &same, &same, &same, &same])?;
    let outcomes: Vec<Outcome> = r.iter().map(|x| x.outcome).collect();
    ensure!(
        outcomes == [[Outcome::Eperm; 3].as_slice(), [Outcome::Ok; 4].as_slice()].concat(),
        "acme-gateway attempts: {r:?}"
    );
    let r = ev.run(&[&write, &write])?;
    ensure!(
        r.iter().all(|x| x.outcome == Outcome::Eperm),
        "initech-evaluator: {r:?}"
    );

    agent.wait_for(5, Duration::from_secs(10), |e| {
        event_matches(e, "acme-gateway", "globex-vectors", 6333, Proto::Tcp)
            || event_matches(e, "initech-evaluator", "initech-features", 7001, Proto::Tcp)
    })?;
    let denies = agent.denies()?;
    let status = dirs.status()?;
    eprintln!("status: {status:#}");

    // The revision: status == policy.applied == every deny's policy.snapshot.
    let revision = status
        .pointer("/agent/revision")
        .and_then(Value::as_str)
        .with_context(|| format!("no agent.revision: {status}"))?;
    ensure!(
        is_revision(revision),
        "agent.revision {revision:?} is not sha256:<16 hex>"
    );
    ensure!(
        revision == applied,
        "agent.revision {revision} != policy.applied {applied}"
    );
    for d in &denies {
        ensure!(
            d.pointer("/policy/snapshot").and_then(Value::as_str) == Some(revision),
            "deny event snapshot != status revision {revision}: {d}"
        );
    }
    let age = status
        .pointer("/agent/policy_age_seconds")
        .and_then(Value::as_u64)
        .with_context(|| format!("agent.policy_age_seconds: {status}"))?;
    ensure!(
        age < 600,
        "policy_age_seconds {age} for a bundle applied seconds ago"
    );
    ensure!(
        status
            .pointer("/agent/quarantined")
            .and_then(Value::as_array)
            .is_some_and(|a| a.is_empty()),
        "agent.quarantined must be an empty list: {status}"
    );
    ensure!(
        status.pointer("/agent/risk_overrides").is_some(),
        "agent.risk_overrides missing: {status}"
    );

    // Counters by reason: exactly our denies; at least our allows.
    ensure!(
        count(&status, "deny", "tenant_mismatch") == Some(3),
        "deny/tenant_mismatch counter: {:?}, want 3",
        count(&status, "deny", "tenant_mismatch")
    );
    ensure!(
        count(&status, "deny", "no_permit") == Some(2),
        "deny/no_permit counter: {:?}, want 2",
        count(&status, "deny", "no_permit")
    );
    let allows: u64 = status
        .get("verdicts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|v| v.get("verdict").and_then(Value::as_str) == Some("allow"))
                .filter_map(|v| v.get("count").and_then(Value::as_u64))
                .sum()
        })
        .unwrap_or(0);
    ensure!(allows >= 4, "allow counters sum to {allows}, want >= 4");
    ensure!(
        status.get("lost_events").and_then(Value::as_u64) == Some(0),
        "lost_events: {:?}",
        status.get("lost_events")
    );
    ensure!(
        status.get("audit").and_then(Value::as_bool) == Some(false),
        "audit: {:?}",
        status.get("audit")
    );

    // Hooks: the pinned links.
    let hooks: Vec<&str> = status
        .get("hooks")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ensure!(
        hooks.iter().any(|h| h.contains("connect4"))
            && hooks.iter().any(|h| h.contains("sendmsg4")),
        "hooks must list the pinned connect4/sendmsg4 links: {hooks:?}"
    );

    // Map fill levels.
    let maps = status
        .get("maps")
        .and_then(Value::as_array)
        .with_context(|| format!("no maps: {status}"))?;
    let mut problems = Vec::new();
    let entries_of = |name: &str| -> Option<u64> {
        maps.iter()
            .find(|m| m.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|m| m.get("entries"))
            .and_then(Value::as_u64)
    };
    for m in maps {
        let name = m.get("name").and_then(Value::as_str).unwrap_or("?");
        // Socket storage holds one value per socket: no capacity, and nothing to count.
        if ["WIRE_TAGS", "MPTCP_FIRST_SUBFLOW", "JUDGED_DATAGRAMS"].contains(&name) {
            if !(m["capacity"].is_null() && m["entries"].is_null()) {
                problems.push(format!("{name} is socket storage, shown as {m}"));
            }
            continue;
        }
        let cap = m.get("capacity").and_then(Value::as_u64).unwrap_or(0);
        if cap == 0 {
            problems.push(format!("{name}: capacity {cap}"));
        }
        if let Some(n) = m.get("entries").and_then(Value::as_u64) {
            if n > cap {
                problems.push(format!("{name}: {n} entries > capacity {cap}"));
            }
        }
    }
    let locals = world.cgroups.len() as u64;
    let all = world.entities.len() as u64;
    if entries_of("CGROUP_IDENTITY").unwrap_or(0) < locals {
        problems.push(format!(
            "CGROUP_IDENTITY entries < {locals} local workloads"
        ));
    }
    if entries_of("IDENTITIES").unwrap_or(0) < all {
        problems.push(format!("IDENTITIES entries < {all} identities"));
    }
    // Host addresses (/32) live in the exact-match map, shorter prefixes in the trie.
    let ipcache =
        entries_of("IPCACHE_HOST_V4").unwrap_or(0) + entries_of("IPCACHE_V4").unwrap_or(0);
    if ipcache < all {
        problems.push(format!(
            "IPCACHE_HOST_V4 + IPCACHE_V4 entries < {all} addresses"
        ));
    }
    let active = match status.get("active_policy_table").and_then(Value::as_u64) {
        Some(1) => "POLICY_B",
        _ => "POLICY_A",
    };
    if entries_of(active).unwrap_or(0) == 0 {
        problems.push(format!("the active policy table {active} is empty"));
    }
    ensure!(
        problems.is_empty(),
        "map fill levels: {}\n{status:#}",
        problems.join("; ")
    );
    Ok(())
}

/// A workload whose inventory cgroup lies outside the agent's `--cgroup-root` is never judged
/// (the programs are attached to the root), and was accepted without a word (red-team review
/// 40 M6). `policy check --cgroup-root` refuses it at the cgroup's `file:line:column`; the
/// agent, which still enforces the rest, reports it as a `cluster.problem` and in `enforcer
/// status`.
#[test]
fn an_inventory_cgroup_outside_the_root_is_reported() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 2;
    let entities = vec![
        Entity::workload(net, "inside", "acme", "inference", 1, 1),
        Entity::workload(net, "stray", "acme", "inference", 1, 2),
    ];
    let world = World::new(net, entities.clone(), TENANT_ISOLATION_POLICIES)?;
    let elsewhere = TestCgroup::create(unique_name("enforcer-elsewhere"))?;
    let root = world.root.relative_str();
    let inventory = render_inventory(&entities, &root)
        .replace(&format!("{root}/stray"), &elsewhere.relative_str());
    replace_file(world.bundle.path(), "inventory.yaml", &inventory, None)?;
    let (line, column) = inventory
        .lines()
        .enumerate()
        .find_map(|(i, l)| Some((i + 1, l.find(&elsewhere.relative_str())? + 1)))
        .context("the stray cgroup's line")?;
    let bundle = world.bundle.path().display().to_string();
    let want = format!(
        "inventory.yaml:{line}:{column}: error: workload stray: cgroup {} is outside the cgroup root /{root}: its processes are never judged",
        elsewhere.relative_str()
    );
    let out = enforcer(&["policy", "check", &bundle, "--cgroup-root", &root])?;
    ensure!(
        !out.success() && out.stderr.contains(&want) && out.stderr.contains("1 problem(s)"),
        "policy check --cgroup-root: want {want:?}: {out}"
    );
    let out = enforcer(&["policy", "check", &bundle])?;
    ensure!(out.success(), "policy check without a root: {out}");

    let agent = world.start_agent()?;
    first_applied_snapshot(&agent)?;
    let said =
        |p: &str| p.starts_with("workload stray: cgroup ") && p.contains("outside the cgroup root");
    wait_notices(&agent, "cluster.problem", 1, Duration::from_secs(10), |e| {
        e["problem"].as_str().is_some_and(said)
    })?;
    let status = agent.status()?;
    let problems: Vec<&str> = status
        .pointer("/agent/cluster_problems")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ensure!(
        problems.len() == 1 && said(problems[0]),
        "status: {problems:?}"
    );
    Ok(())
}

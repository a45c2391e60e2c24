//! Live policy change: a running agent picks up edits of its policy directory (file watch,
//! and SIGHUP), and swaps the kernel table atomically.
//!
//! While a prober loops connects, a `.cedar` file flips cells from allow to deny and back:
//! every attempt is ok or EPERM (nothing else), the outcome switches exactly once per flip (no
//! flapping, no mixture), and the new decision holds soon after the write (within
//! [`TAKES_HOLD_WITHIN`], a bound loose enough for a loaded CI machine: the time it really
//! takes, ~0.2 s here, is printed, and measured by no assertion). An
//! invalid edit changes nothing and is reported as `policy.rejected`. One edit that flips
//! many cells is seen by a prober sweeping them all (both directions) as all-old or all-new,
//! with at most one sweep straddling the swap.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{
    first_applied_snapshot, is_revision, mtime, notices, replace_file, secs_since, send_signal,
    wait_notices, AgentDirs, StateDir,
};
use enforcer_tests::fixtures::{Entity, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};
use serde_json::Value;

/// How soon after a write every attempt must see the new decision. The agent polls every
/// 500 ms and applies in milliseconds; the rest is slack for a machine busy with other tests,
/// so that this bound catches a reload that never happens, not a slow one.
const TAKES_HOLD_WITHIN: Duration = Duration::from_secs(4);
/// Time between two flips: longer than `TAKES_HOLD_WITHIN`, with room for batches after it.
const BETWEEN_FLIPS: Duration = Duration::from_secs(6);

/// Same-tenant permit: every cell of these worlds is allowed unless `flip.cedar` forbids it.
const BASE: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#;

/// The flip file when it forbids nothing the probers try (a cell nobody probes).
const FLIP_OFF: &str = r#"// live flip: off
@id("live-flip-off")
forbid (principal == Workload::"acme-client", action, resource == Workload::"acme-spare");
"#;

/// The flip file when it forbids every call of acme-client to acme-api (all its ports).
const FLIP_ON: &str = r#"// live flip: on
@id("live-flip")
forbid (principal == Workload::"acme-client", action, resource == Endpoint::"acme-api");
"#;

/// A hard bound on any prober loop.
const PROBER_MAX: Duration = Duration::from_secs(30);

/// acme-client (a local workload), acme-api (an endpoint with `ports` TCP ports from 8100),
/// acme-spare (a destination-only workload that FLIP_OFF names).
fn entities(net: u8, ports: u16) -> Vec<Entity> {
    let mut api = Entity::endpoint(net, "acme-api", "acme", "llm_api", 1, 10);
    for p in 0..ports {
        api = api.port(8100 + p, Proto::Tcp, "query");
    }
    let mut spare = Entity::workload(net, "acme-spare", "acme", "inference", 1, 20).port(
        8200,
        Proto::Tcp,
        "infer",
    );
    spare.local = false;
    vec![
        Entity::workload(net, "acme-client", "acme", "inference", 1, 1),
        api,
        spare,
    ]
}

fn world(net: u8, ports: u16) -> Result<World> {
    let w = World::new(net, entities(net, ports), BASE)?;
    w.bundle.write_file("flip.cedar", FLIP_OFF)?;
    Ok(w)
}

fn flip(world: &World, content: &str) -> Result<Instant> {
    replace_file(world.bundle.path(), "flip.cedar", content, None)?;
    Ok(Instant::now())
}

/// One probe process: its attempts' outcomes and when it ran.
#[derive(Debug, Clone)]
struct Batch {
    start: Instant,
    end: Instant,
    outcomes: Vec<Outcome>,
}

/// Runs `attempts` in one probe process after another until `stop` (or [`PROBER_MAX`]).
fn prober(
    probe: &Probe,
    attempts: &[String],
    stop: &AtomicBool,
    pause: Duration,
) -> Result<Vec<Batch>> {
    let began = Instant::now();
    let mut batches = Vec::new();
    while !stop.load(Ordering::Relaxed) && began.elapsed() < PROBER_MAX {
        let start = Instant::now();
        let results = probe.run(attempts)?;
        let end = Instant::now();
        batches.push(Batch {
            start,
            end,
            outcomes: results.iter().map(|r| r.outcome).collect(),
        });
        std::thread::sleep(pause);
    }
    Ok(batches)
}

/// Runs `prober` on a thread while `script` runs on this one; returns the batches and what
/// the script returned.
fn while_probing<T>(
    probe: &Probe,
    attempts: &[String],
    pause: Duration,
    script: impl FnOnce() -> Result<T>,
) -> Result<(Vec<Batch>, T)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handle = s.spawn(|| prober(probe, attempts, &stop, pause));
        let out = script();
        stop.store(true, Ordering::Relaxed);
        let batches = handle.join().expect("prober thread panicked")?;
        Ok((batches, out?))
    })
}

/// Where in the flattened attempt sequence the outcome changes: (batch index, time window of
/// that batch, new outcome).
fn transitions(batches: &[Batch]) -> Vec<(usize, Instant, Instant, Outcome)> {
    let mut out = Vec::new();
    let mut last: Option<Outcome> = None;
    for (i, b) in batches.iter().enumerate() {
        for &o in &b.outcomes {
            if last.is_some_and(|l| l != o) {
                out.push((i, b.start, b.end, o));
            }
            last = Some(o);
        }
    }
    out
}

fn describe(batches: &[Batch], t0: Instant) -> String {
    let mut s = String::new();
    let mut prev: Option<&Vec<Outcome>> = None;
    for b in batches {
        if prev != Some(&b.outcomes) {
            let short: String = b
                .outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Ok => 'o',
                    Outcome::Eperm => 'P',
                    Outcome::Error => 'E',
                })
                .collect();
            s += &format!(
                "\n  {:7.3}-{:7.3}s {short}",
                secs_since(t0, b.start),
                secs_since(t0, b.end)
            );
        }
        prev = Some(&b.outcomes);
    }
    s
}

/// The checks shared by both flip tests. `flips` are (time of the write, outcome it brings).
fn check_flips(batches: &[Batch], flips: &[(Instant, Outcome)], t0: Instant) -> Result<()> {
    let history = describe(batches, t0);
    ensure!(!batches.is_empty(), "the prober ran no batch");
    // Only ok or EPERM: anything else is a broken network or a broken swap.
    let errors = batches
        .iter()
        .flat_map(|b| &b.outcomes)
        .filter(|&&o| o == Outcome::Error)
        .count();
    ensure!(
        errors == 0,
        "{errors} attempts were neither ok nor EPERM; history (o=ok P=EPERM E=error):{history}"
    );
    // Exactly one switch per flip, each after its write and before the next one.
    let tr = transitions(batches);
    ensure!(
        tr.len() == flips.len(),
        "want exactly {} outcome switches (one per flip at {:?}s), saw {} at {:?}; history:{history}",
        flips.len(),
        flips.iter().map(|(t, _)| secs_since(t0, *t)).collect::<Vec<_>>(),
        tr.len(),
        tr.iter().map(|(i, s, _, o)| (i, secs_since(t0, *s), o)).collect::<Vec<_>>()
    );
    for (k, ((_, _, end, to), (at, want))) in tr.iter().zip(flips).enumerate() {
        ensure!(
            to == want,
            "switch {k} went to {to:?}, want {want:?}; history:{history}"
        );
        ensure!(
            *end >= *at,
            "switch {k} happened in a batch that ended {:.3}s before the write; history:{history}",
            secs_since(*end, *at)
        );
    }
    // The new decision holds: every batch that starts `TAKES_HOLD_WITHIN` after a write (and
    // before the next write) sees only the new outcome.
    for (k, (at, want)) in flips.iter().enumerate() {
        let until = flips.get(k + 1).map(|(t, _)| *t);
        let late: Vec<&Batch> = batches
            .iter()
            .filter(|b| b.start >= *at + TAKES_HOLD_WITHIN)
            .filter(|b| until.is_none_or(|u| b.end < u))
            .collect();
        ensure!(
            !late.is_empty(),
            "flip {k}: no batch ran between write+{TAKES_HOLD_WITHIN:?} and the next write (prober too slow?)"
        );
        ensure!(
            late.iter().all(|b| b.outcomes.iter().all(|o| o == want)),
            "flip {k} (write at {:.3}s): some attempt {TAKES_HOLD_WITHIN:?} or more after the write still saw the old decision; history:{history}",
            secs_since(t0, *at)
        );
    }
    // Before the first write, the old decision.
    let (first_at, first_want) = flips[0];
    ensure!(
        batches
            .iter()
            .filter(|b| b.end < first_at)
            .all(|b| b.outcomes.iter().all(|o| *o != first_want)),
        "the first flip's decision was seen before its write; history:{history}"
    );
    eprintln!(
        "{} batches, {} attempts; history (o=ok P=EPERM):{history}",
        batches.len(),
        batches.iter().map(|b| b.outcomes.len()).sum::<usize>()
    );
    Ok(())
}

fn applied_snapshots(agent: &Agent) -> Result<Vec<String>> {
    Ok(notices(agent, "policy.applied")?
        .iter()
        .filter_map(|e| {
            e.get("snapshot")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect())
}

fn deny_snapshot(e: &Value) -> Option<&str> {
    e.pointer("/policy/snapshot").and_then(Value::as_str)
}

/// Fails unless `enforcer status` reports `want` as the revision in force.
fn ensure_status_revision(dirs: &AgentDirs, want: &str, when: &str) -> Result<()> {
    let status = dirs.status()?;
    let got = status.pointer("/agent/revision");
    ensure!(
        got.and_then(Value::as_str) == Some(want),
        "{when}: status agent.revision {got:?}, want {want}"
    );
    Ok(())
}

#[test]
fn file_edit_flips_a_cell_within_a_second_without_flapping() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world(41, 1)?;
    let _servers = world.servers_v4()?;
    let state = StateDir::new()?;
    let cfg = state.configure(world.agent_config());
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    let r0 = first_applied_snapshot(&agent)?;
    ensure!(
        is_revision(&r0),
        "policy.applied snapshot {r0:?} is not sha256:<16 hex>"
    );

    let ip: IpAddr = world.entity("acme-api").ip(false);
    let cell = attempt("tcp", ip, 8100);
    let probe = Probe::new()
        .in_cgroup(world.cgroup("acme-client"))
        .timeout(Duration::from_secs(10));
    let attempts: Vec<String> = vec![cell; 10];

    let t0 = Instant::now();
    let (batches, flips) = while_probing(&probe, &attempts, Duration::from_millis(5), || {
        std::thread::sleep(Duration::from_millis(800));
        let on = flip(&world, FLIP_ON)?;
        std::thread::sleep(BETWEEN_FLIPS);
        let off = flip(&world, FLIP_OFF)?;
        std::thread::sleep(BETWEEN_FLIPS);
        Ok(vec![(on, Outcome::Eperm), (off, Outcome::Ok)])
    })?;
    check_flips(&batches, &flips, t0).context(format!("agent stderr:\n{}", agent.stderr_tail()))?;

    // Two more bundles applied: the deny one, then one whose content (hence revision) is the
    // original's again.
    let snaps = wait_notices(&agent, "policy.applied", 3, Duration::from_secs(5), |_| {
        true
    })?;
    let snaps: Vec<&str> = snaps
        .iter()
        .filter_map(|e| e.get("snapshot").and_then(Value::as_str))
        .collect();
    ensure!(
        snaps.len() == 3,
        "want 3 policy.applied events (start, flip on, flip off), got {snaps:?}"
    );
    let r1 = snaps[1].to_string();
    ensure!(
        is_revision(&r1) && r1 != r0,
        "flip-on revision {r1:?} (start {r0:?})"
    );
    ensure!(
        snaps[2] == r0,
        "the bundle is back to its original content, so its revision must be {r0:?} again, got {:?}",
        snaps[2]
    );
    ensure!(
        notices(&agent, "policy.rejected")?.is_empty(),
        "a valid edit was rejected: {:?}",
        notices(&agent, "policy.rejected")?
    );
    // The denies name the policy and the revision that decided them.
    let denies = agent.denies()?;
    ensure!(!denies.is_empty(), "no deny event for the EPERM attempts");
    let wrong: Vec<&Value> = denies
        .iter()
        .filter(|e| {
            deny_snapshot(e) != Some(r1.as_str())
                || e.pointer("/policy/id").and_then(Value::as_str) != Some("live-flip")
        })
        .collect();
    ensure!(
        wrong.is_empty(),
        "{} of {} deny events do not carry policy {{id: live-flip, snapshot: {r1}}}; first: {}",
        wrong.len(),
        denies.len(),
        wrong[0]
    );
    // And status reports the revision in force.
    ensure_status_revision(&dirs, &r0, "after the flips")?;
    Ok(())
}

#[test]
fn invalid_edit_changes_nothing_and_sighup_reloads() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world(42, 1)?;
    let _servers = world.servers_v4()?;
    let state = StateDir::new()?;
    let cfg = state.configure(world.agent_config());
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    let r0 = first_applied_snapshot(&agent)?;
    let probe = Probe::new()
        .in_cgroup(world.cgroup("acme-client"))
        .timeout(Duration::from_secs(10));
    let cell = attempt("tcp", world.entity("acme-api").ip(false), 8100);
    let outcome = || -> Result<Outcome> { Ok(probe.run_one(&cell)?.outcome) };
    ensure!(
        outcome()? == Outcome::Ok,
        "before any edit, the cell must be allowed"
    );

    // An edit that would deny the cell, with a syntax error (missing comma) on line 3.
    let broken = "// live flip: broken\n@id(\"live-flip\")\nforbid (principal == Workload::\"acme-client\", action resource == Endpoint::\"acme-api\");\n";
    let broken_line = 3;
    flip(&world, broken)?;
    let rejected = wait_notices(&agent, "policy.rejected", 1, Duration::from_secs(5), |_| {
        true
    })?;
    let rej = &rejected[0];
    ensure!(
        rej.get("snapshot_in_force").and_then(Value::as_str) == Some(r0.as_str()),
        "policy.rejected snapshot_in_force must be {r0}: {rej}"
    );
    let errors: Vec<&str> = rej
        .get("errors")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let located = format!("flip.cedar:{broken_line}:");
    ensure!(
        errors.iter().any(|e| e.contains(&located)),
        "policy.rejected errors must locate the syntax error as `{located}<col>`: {rej}"
    );
    // Nothing changed, for longer than a reload takes.
    for _ in 0..8 {
        ensure!(
            outcome()? == Outcome::Ok,
            "after a rejected edit, the cell changed (the last good bundle must stay in force)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure_status_revision(&dirs, &r0, "after a rejected edit")?;
    ensure!(
        applied_snapshots(&agent)? == vec![r0.clone()],
        "a rejected edit must apply nothing: policy.applied events {:?}",
        applied_snapshots(&agent)?
    );

    // Fix it, but so that the file watch cannot see it: same size, same mtime as the broken
    // file. Only SIGHUP makes the agent look.
    let path = world.bundle.path().join("flip.cedar");
    let fixed = broken.replacen("action resource", "action,resource", 1);
    ensure!(fixed.len() == broken.len(), "fixture: same size");
    let before = mtime(&path)?;
    replace_file(world.bundle.path(), "flip.cedar", &fixed, Some(before))?;
    std::thread::sleep(Duration::from_millis(1500));
    let watched = outcome()? == Outcome::Eperm;
    if watched {
        eprintln!(
            "note: the agent noticed a same-size, same-mtime edit without SIGHUP (content \
             watch?); SIGHUP is still exercised below"
        );
    }
    let hup = Instant::now();
    send_signal(agent.pid(), libc::SIGHUP)?;
    let applied = wait_notices(&agent, "policy.applied", 2, Duration::from_secs(5), |_| {
        true
    })?;
    let r1 = applied
        .last()
        .and_then(|e| e.get("snapshot"))
        .and_then(Value::as_str)
        .context("snapshot")?
        .to_string();
    ensure!(r1 != r0, "the fixed bundle has a new revision");
    let mut flipped_at = None;
    while hup.elapsed() < TAKES_HOLD_WITHIN {
        if outcome()? == Outcome::Eperm {
            flipped_at = Some(hup.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = flipped_at.with_context(|| {
        format!("after SIGHUP, the fixed (denying) policy was not enforced within {TAKES_HOLD_WITHIN:?}")
    })?;
    eprintln!("after SIGHUP the new decision held after {took:?}");
    ensure_status_revision(&dirs, &r1, "after SIGHUP")?;
    Ok(())
}

#[test]
fn one_edit_flipping_many_cells_is_never_seen_half_applied() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const CELLS: u16 = 16;
    let world = world(43, CELLS)?;
    let _servers = world.servers_v4()?;
    let state = StateDir::new()?;
    let agent = Agent::start(state.configure(world.agent_config()))?;
    first_applied_snapshot(&agent)?;
    let ip = world.entity("acme-api").ip(false);
    // One sweep forward, one backward: whatever order a non-atomic writer used, one of the
    // two sweeps runs against it.
    let forward: Vec<String> = (0..CELLS).map(|p| attempt("tcp", ip, 8100 + p)).collect();
    let mut attempts = forward.clone();
    attempts.extend(forward.iter().rev().cloned());
    let probe = Probe::new()
        .in_cgroup(world.cgroup("acme-client"))
        .timeout(Duration::from_secs(10));

    let t0 = Instant::now();
    let (batches, flips) = while_probing(&probe, &attempts, Duration::from_millis(1), || {
        std::thread::sleep(Duration::from_millis(800));
        let on = flip(&world, FLIP_ON)?;
        std::thread::sleep(BETWEEN_FLIPS);
        let off = flip(&world, FLIP_OFF)?;
        std::thread::sleep(BETWEEN_FLIPS);
        Ok(vec![(on, Outcome::Eperm), (off, Outcome::Ok)])
    })?;
    // Exactly two switches in the whole flattened sequence means: every sweep is all-old or
    // all-new, except the (at most) one sweep in which each swap happened.
    check_flips(&batches, &flips, t0).context(format!("agent stderr:\n{}", agent.stderr_tail()))?;
    let straddling = batches
        .iter()
        .filter(|b| b.outcomes.contains(&Outcome::Ok) && b.outcomes.contains(&Outcome::Eperm))
        .count();
    ensure!(
        straddling <= 2,
        "{straddling} batches straddle a swap (max one per flip)"
    );
    eprintln!(
        "{} sweeps of {} cells, {straddling} straddling a swap",
        batches.len() * 2,
        CELLS
    );
    Ok(())
}

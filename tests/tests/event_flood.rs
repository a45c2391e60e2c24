//! One workload cannot drown the SOC (issue 8, item 7): kernel-side aggregation of repeated
//! denies, with the agent's default window (1 s).
//!
//! acme-gateway loops `connect()` to globex-vectors (tenant mismatch, connect4) as fast as one
//! process can, while initech-evaluator makes one denied call (no permit: the purpose rule)
//! every 200 ms. Then:
//! - the flood's events carry counts whose sum equals the kernel's own counter of those
//!   denies (`VERDICTS`, connect4/deny/tenant_mismatch: no other call of this test has that
//!   hook and reason) and the probe's count of EPERMs: exact, not approximately;
//! - the flood is a handful of lines (at most a first deny and a summary per window), not
//!   one per attempt;
//! - every one of the second workload's denies is reported (the sum of its counts equals
//!   its calls), and none is lost in the kernel.
//!
//! Addresses 127.91.0.0/16 only (World::standard(91)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer_tests::fixtures::{event_matches, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};
use serde_json::Value;

/// Attempts of the flood: ~0.5-1 s at the ~0.5-0.9 M/s one process makes on an idle machine,
/// ~8 s at load average 17 (~48k/s); the probe's timeout bounds it.
const FLOOD: u64 = 400_000;
/// The second workload's pace, and a bound on its calls.
const EVERY: Duration = Duration::from_millis(200);
const MAX_QUIET_CALLS: u64 = 600;

/// The kernel's deny counter for one reason, summed over hooks and CPUs (`enforcer status`).
fn kernel_denies(agent: &Agent, reason: &str) -> Result<u64> {
    let status = agent.status()?;
    Ok(status
        .get("verdicts")
        .and_then(Value::as_array)
        .and_then(|all| {
            all.iter().find_map(|v| {
                (v.get("verdict")?.as_str()? == "deny" && v.get("reason")?.as_str()? == reason)
                    .then(|| v.get("count")?.as_u64())
                    .flatten()
            })
        })
        .unwrap_or(0))
}

/// Sum of `count` over the events that `ours` selects (a line without `count` is one deny).
fn counted(events: &[Value], ours: impl Fn(&Value) -> bool) -> (u64, usize) {
    let lines: Vec<&Value> = events.iter().filter(|e| ours(e)).collect();
    let sum = lines
        .iter()
        .map(|e| e.get("count").and_then(Value::as_u64).unwrap_or(1))
        .sum();
    (sum, lines.len())
}

#[test]
fn a_flood_is_aggregated_exactly_and_another_workloads_denies_all_arrive() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(91)?;
    let mut cfg = world.agent_config();
    // The agent's own default window: what this test is about.
    cfg.events_aggregate = None;
    let agent = Agent::start(cfg)?;

    let flood_call = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let quiet_call = attempt("tcp", world.entity("initech-features").ip(false), 7001);
    let is_flood = |e: &Value| event_matches(e, "acme-gateway", "globex-vectors", 6333, Proto::Tcp);
    let is_quiet =
        |e: &Value| event_matches(e, "initech-evaluator", "initech-features", 7001, Proto::Tcp);
    let flooder = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(Duration::from_secs(120));
    let quiet = Probe::new().in_cgroup(world.cgroup("initech-evaluator"));

    // Before: the reasons this test counts are untouched.
    ensure!(
        kernel_denies(&agent, "tenant_mismatch")? == 0,
        "tenant_mismatch denies before the flood"
    );

    let flooding = AtomicBool::new(true);
    let started = Instant::now();
    let (flood, quiet_calls) = std::thread::scope(|s| -> Result<_> {
        let quiet_thread = s.spawn(|| -> Result<u64> {
            let mut calls = 0;
            // Bounded by count; paced by EVERY (the pace is not asserted on).
            while flooding.load(Ordering::Relaxed) && calls < MAX_QUIET_CALLS {
                let r = quiet.run_one(&quiet_call)?;
                ensure!(r.outcome == Outcome::Eperm, "quiet call: {r:?}");
                calls += 1;
                std::thread::sleep(EVERY);
            }
            Ok(calls)
        });
        let flood = flooder.repeat(FLOOD, &flood_call);
        flooding.store(false, Ordering::Relaxed);
        let calls = quiet_thread.join().expect("quiet thread")?;
        Ok((flood?, calls))
    })?;
    let flood_time = started.elapsed();
    ensure!(
        flood.eperm == FLOOD,
        "every flood attempt must be refused: {flood:?}"
    );
    ensure!(quiet_calls >= 1, "the quiet workload made no call");

    // The kernel counted every flood attempt once.
    let kernel = kernel_denies(&agent, "tenant_mismatch")?;
    ensure!(
        kernel == FLOOD,
        "VERDICTS has {kernel} tenant_mismatch denies for {FLOOD} refused attempts"
    );

    // The agent reports each window's count a window after it ended: wait (bounded) until the
    // sums are complete, then require them exact.
    let mut flood_sum = (0, 0);
    let mut quiet_sum = (0, 0);
    let complete = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let events = agent.events().unwrap_or_default();
        flood_sum = counted(&events, is_flood);
        quiet_sum = counted(&events, is_quiet);
        flood_sum.0 >= kernel && quiet_sum.0 >= quiet_calls
    });
    ensure!(
        complete,
        "flood: counts sum to {} over {} lines for {kernel} denies; quiet: {} over {} lines for \
         {quiet_calls} calls\n{}",
        flood_sum.0,
        flood_sum.1,
        quiet_sum.0,
        quiet_sum.1,
        agent.stderr_tail()
    );
    // Nothing more arrives later (a double count would show up as a sum above the counter):
    // wait for two more sweeps' worth of windows, then compare exactly.
    let settled = agent.settled_events(Duration::from_millis(2500), Duration::from_secs(20))?;
    let (flood_total, flood_lines) = counted(&settled, is_flood);
    let (quiet_total, _) = counted(&settled, is_quiet);
    ensure!(
        flood_total == kernel,
        "the flood's counts sum to {flood_total}, the kernel counted {kernel}"
    );
    ensure!(
        quiet_total == quiet_calls,
        "the quiet workload's counts sum to {quiet_total} for {quiet_calls} denied calls"
    );
    // At most a first deny and one summary per window the flood touched (1 s windows on a
    // fixed grid: the flood's duration rounded up, plus the window it started in).
    let windows = flood_time.as_secs() + 2;
    ensure!(
        flood_lines as u64 <= 2 * windows,
        "{flood_lines} lines for a flood over {windows} windows: not aggregated"
    );
    let summaries = settled
        .iter()
        .filter(|e| is_flood(e))
        .filter(|e| e.get("count").and_then(Value::as_u64).unwrap_or(1) > 1)
        .count();
    ensure!(summaries >= 1, "no summary event for the flood");

    // No loss: the flood took a few ring-buffer slots.
    let status = agent.status().context("status")?;
    let lost = status
        .get("lost_events")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    ensure!(
        lost == 0,
        "{lost} events lost in the kernel during the flood"
    );
    ensure!(
        !agent.events()?.iter().any(|e| e["type"] == "events.lost"),
        "events.lost reported"
    );
    eprintln!(
        "flood: {FLOOD} denies in {:.2} s -> {flood_lines} lines ({summaries} summaries); \
         quiet: {quiet_calls} calls all reported",
        flood_time.as_secs_f64()
    );
    Ok(())
}

//! One workload cannot turn deny aggregation off for the others (issue 8, item 7): the
//! per-workload key budget (`--events-keys-per-workload`, default 64 keys per window).
//!
//! acme-gateway sweeps 20,000 distinct ports of globex-vectors (tenant mismatch, connect4):
//! one aggregation key per destination port, more than `AGGREGATE` holds (16,384), which
//! without a budget fills the map and sends every further deny of every workload down the
//! one-event-each path. Meanwhile initech-evaluator makes one denied call (no permit) every
//! 200 ms for at least 3 s. Then:
//! - `AGGREGATE` never fills (sampled through `enforcer status` during the sweep);
//! - the sweep's denies are all accounted, exactly: the counts of its own events plus the
//!   counts of its `events.suppressed` events equal the kernel's counter of those denies
//!   (`VERDICTS`, deny/tenant_mismatch: no other call of this test has that reason) and
//!   the probe's EPERMs, and `enforcer_events_suppressed_total` agrees;
//! - the sweep is a bounded number of lines (at most the budget's first denies and
//!   summaries per window, plus a suppressed notice), not one per port;
//! - every one of the second workload's denies is reported with its own destination (the
//!   sum of its counts equals its calls), it has no suppressed notice, and none is lost.
//!
//! Addresses 127.91.0.0/16 only (World::standard(91)).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer_tests::fixtures::World;
use enforcer_tests::probe::attempt;
use enforcer_tests::prometheus::{free_port, http_get};
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};
use serde_json::Value;

/// Distinct destination ports of the sweep: more keys than `AGGREGATE` holds (16,384).
const SWEEP: u64 = 20_000;
const FIRST_PORT: u16 = 20_000;
/// The agent's default budget (`enforcer_common::capacity::AGGREGATE_KEYS_PER_WORKLOAD`).
const KEYS_PER_WORKLOAD: u64 = 64;
/// `enforcer_common::capacity::AGGREGATE`.
const AGGREGATE_CAPACITY: u64 = 16_384;
/// The second workload's pace, its shortest run, and a bound on its calls.
const EVERY: Duration = Duration::from_millis(200);
const QUIET_AT_LEAST: Duration = Duration::from_secs(3);
const MAX_QUIET_CALLS: u64 = 600;
/// How often `AGGREGATE` is sampled during the sweep, and a bound on the samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const MAX_SAMPLES: u64 = 3_000;

/// The kernel's deny counter for one reason, summed over hooks and CPUs (`enforcer status`).
fn kernel_denies(status: &Value, reason: &str) -> u64 {
    status
        .get("verdicts")
        .and_then(Value::as_array)
        .and_then(|all| {
            all.iter().find_map(|v| {
                (v.get("verdict")?.as_str()? == "deny" && v.get("reason")?.as_str()? == reason)
                    .then(|| v.get("count")?.as_u64())
                    .flatten()
            })
        })
        .unwrap_or(0)
}

/// `AGGREGATE`'s entries in `enforcer status` (an error if the status does not count them).
fn aggregate_entries(status: &Value) -> Result<u64> {
    status
        .get("maps")
        .and_then(Value::as_array)
        .and_then(|maps| {
            maps.iter()
                .find(|m| m.get("name").and_then(Value::as_str) == Some("AGGREGATE"))
        })
        .and_then(|m| m.get("entries")?.as_u64())
        .with_context(|| format!("no AGGREGATE entry count in the status: {status}"))
}

/// Sum of `count` over the events that `ours` selects (a line without `count` is one deny),
/// and how many lines they are.
fn counted(events: &[Value], ours: impl Fn(&Value) -> bool) -> (u64, usize) {
    let lines: Vec<&Value> = events.iter().filter(|e| ours(e)).collect();
    let sum = lines
        .iter()
        .map(|e| e.get("count").and_then(Value::as_u64).unwrap_or(1))
        .sum();
    (sum, lines.len())
}

/// A deny event from `from` to `to` (any port), over TCP.
fn deny_to(e: &Value, from: &str, to: &str) -> bool {
    let s = |p: &str| e.pointer(p).and_then(Value::as_str);
    s("/type") == Some("connection.denied")
        && s("/subject/workload") == Some(from)
        && s("/destination/name") == Some(to)
        && s("/destination/protocol") == Some("tcp")
}

fn suppressed_of(e: &Value, workload: &str) -> bool {
    e.get("type").and_then(Value::as_str) == Some("events.suppressed")
        && e.get("workload").and_then(Value::as_str) == Some(workload)
}

/// `enforcer_events_suppressed_total{hook=..,reason=..}` in the exposition (0 if absent).
fn suppressed_metric(text: &str, hook: &str, reason: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("enforcer_events_suppressed_total{"))
        .filter(|l| l.contains(&format!("hook=\"{hook}\"")))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_sweep_of_many_destinations_stays_within_its_budget_and_is_counted_exactly() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(91)?;
    let mut cfg = world.agent_config();
    // The agent's own defaults (1 s windows, 64 keys per workload): what this test is about.
    cfg.events_aggregate = None;
    let metrics_ip = "127.91.254.1";
    let metrics: SocketAddr = format!("{metrics_ip}:{}", free_port(metrics_ip)?).parse()?;
    cfg.extra_args
        .extend(["--metrics".to_string(), metrics.to_string()]);
    let agent = Agent::start(cfg)?;

    let sweep_call = attempt("tcp", world.entity("globex-vectors").ip(false), FIRST_PORT);
    let quiet_call = attempt("tcp", world.entity("initech-features").ip(false), 7001);
    let is_sweep = |e: &Value| deny_to(e, "acme-gateway", "globex-vectors");
    let is_quiet = |e: &Value| {
        deny_to(e, "initech-evaluator", "initech-features")
            && e.pointer("/destination/port").and_then(Value::as_u64) == Some(7001)
    };
    let sweeper = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(Duration::from_secs(120));
    let quiet = Probe::new().in_cgroup(world.cgroup("initech-evaluator"));

    ensure!(
        kernel_denies(&agent.status()?, "tenant_mismatch") == 0,
        "tenant_mismatch denies before the sweep"
    );

    let sweeping = AtomicBool::new(true);
    let most_entries = AtomicU64::new(0);
    let started = Instant::now();
    let (sweep, quiet_calls, samples) = std::thread::scope(|s| -> Result<_> {
        let quiet_thread = s.spawn(|| -> Result<u64> {
            let mut calls = 0;
            // Bounded by count; paced by EVERY (the pace is not asserted on).
            while (sweeping.load(Ordering::Relaxed) || started.elapsed() < QUIET_AT_LEAST)
                && calls < MAX_QUIET_CALLS
            {
                let r = quiet.run_one(&quiet_call)?;
                ensure!(r.outcome == Outcome::Eperm, "quiet call: {r:?}");
                calls += 1;
                std::thread::sleep(EVERY);
            }
            Ok(calls)
        });
        let sampler = s.spawn(|| -> Result<u64> {
            let mut samples = 0;
            while sweeping.load(Ordering::Relaxed) && samples < MAX_SAMPLES {
                let entries = aggregate_entries(&agent.status()?)?;
                most_entries.fetch_max(entries, Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(SAMPLE_EVERY);
            }
            Ok(samples)
        });
        let sweep = sweeper.ports(SWEEP, &sweep_call);
        sweeping.store(false, Ordering::Relaxed);
        let calls = quiet_thread.join().expect("quiet thread")?;
        let samples = sampler.join().expect("sampler thread")?;
        Ok((sweep?, calls, samples))
    })?;
    let sweep_time = started.elapsed();
    ensure!(
        sweep.eperm == SWEEP,
        "every attempt of the sweep must be refused: {sweep:?}"
    );
    ensure!(quiet_calls >= 1, "the quiet workload made no call");

    // The kernel counted every attempt of the sweep once.
    let kernel = kernel_denies(&agent.status()?, "tenant_mismatch");
    ensure!(
        kernel == SWEEP,
        "VERDICTS has {kernel} tenant_mismatch denies for {SWEEP} refused attempts"
    );
    let most = most_entries.load(Ordering::Relaxed);
    ensure!(
        most < AGGREGATE_CAPACITY,
        "AGGREGATE reached {most} of {AGGREGATE_CAPACITY} entries during the sweep"
    );

    // The agent reports each window's counts a window after it ended: wait (bounded) until
    // the sums are complete, then require them exact once nothing more arrives.
    let sums = |events: &[Value]| {
        let own = counted(events, is_sweep);
        let suppressed = counted(events, |e| suppressed_of(e, "acme-gateway"));
        (own, suppressed, counted(events, is_quiet))
    };
    let mut last = sums(&[]);
    let complete = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        last = sums(&agent.events().unwrap_or_default());
        let ((own, _), (suppressed, _), (quiet_sum, _)) = last;
        own + suppressed >= kernel && quiet_sum >= quiet_calls
    });
    ensure!(
        complete,
        "sweep: own events count {} over {} lines, suppressed {} over {} lines, for {kernel} \
         denies; quiet: {} over {} lines for {quiet_calls} calls\n{}",
        last.0 .0,
        last.0 .1,
        last.1 .0,
        last.1 .1,
        last.2 .0,
        last.2 .1,
        agent.stderr_tail()
    );
    // Nothing more arrives later (a double count would show up as a sum above the counter).
    let settled = agent.settled_events(Duration::from_millis(2500), Duration::from_secs(20))?;
    let ((own, own_lines), (suppressed, suppressed_lines), (quiet_sum, _)) = sums(&settled);
    ensure!(
        own + suppressed == kernel,
        "the sweep's own events count {own} and its suppressed events {suppressed}: {} for \
         {kernel} denies in the kernel",
        own + suppressed
    );
    ensure!(
        suppressed_lines >= 1,
        "no events.suppressed for the sweep ({own_lines} own lines)"
    );
    // At most the budget's first denies and summaries, and one suppressed notice, per window
    // the sweep touched (1 s windows on a fixed grid: its duration rounded up, plus the
    // window it started in).
    let windows = sweep_time.as_secs() + 2;
    ensure!(
        own_lines as u64 <= 2 * KEYS_PER_WORKLOAD * windows && suppressed_lines as u64 <= windows,
        "{own_lines} own lines and {suppressed_lines} suppressed lines for a sweep over \
         {windows} windows: not bounded by the budget"
    );
    for e in settled.iter().filter(|e| suppressed_of(e, "acme-gateway")) {
        ensure!(
            e["tenant"] == "acme"
                && e["hook"] == "connect4"
                && e["verdict"] == "deny"
                && e["reason"] == "tenant_mismatch",
            "events.suppressed names the wrong subject, hook or reason: {e}"
        );
    }
    // The second workload: every deny with its own destination, none folded away.
    ensure!(
        quiet_sum == quiet_calls,
        "the quiet workload's counts sum to {quiet_sum} for {quiet_calls} denied calls"
    );
    ensure!(
        !settled
            .iter()
            .any(|e| suppressed_of(e, "initech-evaluator")),
        "the quiet workload's denies were suppressed"
    );
    // The metric counts the same denies, under bounded labels.
    let (code, text) = http_get(metrics, "/metrics", None, Duration::from_secs(10))?;
    ensure!(code == 200, "GET /metrics: HTTP {code}: {text}");
    let metric = suppressed_metric(&text, "connect4", "tenant_mismatch");
    ensure!(
        metric == suppressed,
        "enforcer_events_suppressed_total{{hook=connect4,reason=tenant_mismatch}} is {metric}, \
         the events.suppressed counts sum to {suppressed}"
    );

    // No loss in the kernel.
    let status = agent.status().context("status")?;
    let lost = status
        .get("lost_events")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    ensure!(
        lost == 0,
        "{lost} events lost in the kernel during the sweep"
    );
    ensure!(
        !settled.iter().any(|e| e["type"] == "events.lost"),
        "events.lost reported"
    );
    eprintln!(
        "sweep: {SWEEP} denies to distinct ports in {:.2} s -> {own_lines} own lines (count \
         {own}) + {suppressed_lines} suppressed (count {suppressed}); AGGREGATE peaked at \
         {most} entries over {samples} samples; quiet: {quiet_calls} calls all reported",
        sweep_time.as_secs_f64()
    );
    Ok(())
}

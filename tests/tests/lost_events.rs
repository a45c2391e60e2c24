//! Nothing is dropped silently: with a deliberately tiny ring buffer and the agent stopped
//! (SIGSTOP) during a burst of denied attempts, received events + reported lost = attempts.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::fixtures::{event_matches, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, Agent, Probe};

const BURST: u64 = 2000;

/// Resumes the agent if the test fails while it is stopped.
struct ResumeOnDrop<'a>(&'a Agent);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

#[test]
fn received_plus_lost_equals_attempts() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(34)?;
    let _servers = world.servers_v4()?;
    let mut cfg = world.agent_config();
    cfg.ring_buffer_bytes = Some(4096);
    // Every deny its own event: with aggregation (the default), the burst's repeated denies
    // would be counted in the kernel and reported as a few summaries, and nothing would be
    // lost; this test is about what happens when the ring buffer itself overflows.
    cfg.events_aggregate = Some("0".into());
    let agent = Agent::start(cfg)?;

    let target = world.entity("globex-vectors");
    let denied = attempt("tcp", target.ip(false), 6333);
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let ours = |e: &serde_json::Value| {
        event_matches(e, "acme-gateway", "globex-vectors", 6333, Proto::Tcp)
    };

    // One attempt first, so we know the event path works before we count.
    let warmup = probe.run_one(&denied)?;
    ensure!(
        warmup.outcome == enforcer_tests::Outcome::Eperm,
        "warm-up: {warmup:?}"
    );
    agent.wait_for(1, Duration::from_secs(10), ours)?;

    agent.pause()?;
    let resume = ResumeOnDrop(&agent);
    let burst = probe.repeat(BURST, &denied)?;
    drop(resume); // SIGCONT
    ensure!(
        burst.eperm == BURST,
        "every burst attempt must be denied: {burst:?}"
    );
    let attempts = BURST + 1;

    // The agent drains the ring buffer and notices the losses; wait (bounded) for the sum.
    let mut received = 0u64;
    let mut lost = 0u64;
    let mut last_err = None;
    let balanced = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        received = agent
            .verdict_events()
            .map(|ev| ev.iter().filter(|e| ours(e)).count() as u64)
            .unwrap_or(0);
        match agent.status() {
            Ok(s) => lost = s.get("lost_events").and_then(|v| v.as_u64()).unwrap_or(0),
            Err(e) => last_err = Some(e),
        }
        received + lost == attempts
    });
    ensure!(
        balanced,
        "received {received} + lost {lost} != {attempts} attempts (last status error: {last_err:?})\nagent stderr:\n{}",
        agent.stderr_tail()
    );
    ensure!(
        lost > 0,
        "a {BURST}-event burst into 4 KiB must lose events; lost = 0"
    );

    // Cross-check: the events file reports the losses too (`events.lost` lines). The count
    // may be a running total or per report: accept either, but it must add up to `lost`.
    let mut counts = Vec::new();
    let reported = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        counts = agent
            .events()
            .unwrap_or_default()
            .iter()
            .filter(|e| e.get("type").and_then(|t| t.as_str()) == Some("events.lost"))
            .filter_map(|e| e.get("count").and_then(|c| c.as_u64()))
            .collect();
        counts.last() == Some(&lost) || counts.iter().sum::<u64>() == lost
    });
    ensure!(
        reported,
        "events.lost lines {counts:?} do not account for the {lost} lost events"
    );
    let status = agent.status().context("status")?;
    eprintln!("burst of {BURST}: received {received}, lost {lost}; status {status}");
    Ok(())
}

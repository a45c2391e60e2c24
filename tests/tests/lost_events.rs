//! Nothing is dropped silently: with a deliberately tiny ring buffer and the agent stopped
//! (SIGSTOP) during a burst of denied attempts, received events + reported lost = attempts.

use std::collections::BTreeMap;
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

/// `events.lost` says what was lost since the last report: an agent restarted on the same
/// pins reports only what is new, not the kernel's lifetime total again (every start
/// reported it again, and a SOC that adds up the `count`s counted each loss once more per
/// restart).
#[test]
fn a_restarted_agent_reports_only_new_losses() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(37)?;
    let mut cfg = world.agent_config();
    cfg.ring_buffer_bytes = Some(4096);
    cfg.events_aggregate = Some("0".into());
    let mut first = Agent::start(cfg.clone())?;
    let target = world.entity("globex-vectors");
    let denied = attempt("tcp", target.ip(false), 6333);
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    first.pause()?;
    let resume = ResumeOnDrop(&first);
    probe.repeat(BURST, &denied)?;
    drop(resume);
    let lost_counts = |agent: &Agent| -> Vec<u64> {
        agent
            .events()
            .unwrap_or_default()
            .iter()
            .filter(|e| e.get("type").and_then(|t| t.as_str()) == Some("events.lost"))
            .filter_map(|e| e.get("count").and_then(|c| c.as_u64()))
            .collect()
    };
    let mut lost = 0;
    let reported = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        lost = agent_lost(&first);
        lost > 0 && lost_counts(&first).iter().sum::<u64>() == lost
    });
    ensure!(
        reported,
        "the first agent: {lost} lost, events.lost counts {:?}",
        lost_counts(&first)
    );
    first.stop()?;

    // The second agent starts on the same pins and state; nothing was lost in between.
    let second = Agent::start(cfg.clone())?;
    let warmup = probe.run_one(&denied)?;
    ensure!(
        warmup.outcome == enforcer_tests::Outcome::Eperm,
        "{warmup:?}"
    );
    let ours = |e: &serde_json::Value| {
        event_matches(e, "acme-gateway", "globex-vectors", 6333, Proto::Tcp)
    };
    second.wait_for(1, Duration::from_secs(10), ours)?;
    // Two loss checks (500 ms apart) at least after the first event.
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        lost_counts(&second).is_empty(),
        "the second agent reported the first one's {lost} losses again: {:?}",
        lost_counts(&second)
    );
    ensure!(agent_lost(&second) == lost, "the kernel's total moved");
    Ok(())
}

fn agent_lost(agent: &Agent) -> u64 {
    agent
        .status()
        .ok()
        .and_then(|s| s.get("lost_events").and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

/// Repeated denies counted in the kernel are not lost when the agent dies while writing
/// their summaries: a sweep deleted the entries before their lines were written, so an agent
/// killed in between (or OOM-killed) lost those counts silently. Killed in the sweep's
/// write with most summaries unwritten, the next agent must report every one.
#[test]
fn summaries_survive_an_agent_killed_while_writing_them() -> Result<()> {
    // Three denies to each port: the first of each (key, window) is written at once, the
    // others counted in the kernel for the window's summary.
    killed_while_writing(50, Some("1s"), 3)
}

/// Records the agent had read from the ring buffer and not yet written (its write blocked)
/// were lost when it was killed there: the ring had them given back as they were read. An
/// agent killed in that write leaves them in the ring, and the next agent reports each
/// again. Found as a flaky run of the test above: a burst that crossed a window's
/// end made new first denies, read and then lost with the killed agent. Here every deny is
/// its own record (aggregation off), so the blocked write holds ring records only.
#[test]
fn ring_records_survive_an_agent_killed_while_writing_them() -> Result<()> {
    killed_while_writing(40, Some("0"), 1)
}

/// `DENIES` denied calls to each of 300 ports from a world on `net`, with the agent's
/// `--events-aggregate` `aggregate`; the events go to a FIFO that the test stops reading
/// (after the first denies, when aggregation is on), so the agent blocks in a write with
/// most lines unwritten; it is killed there, and the next agent on the same pins must report
/// every deny (some twice: a duplicate, never a loss).
fn killed_while_writing(net: u8, aggregate: Option<&str>, denies: u64) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if !require_kernel() {
        return Ok(());
    }
    const PORTS: u64 = 300;
    const FIRST_PORT: u16 = 7000;
    let world = World::standard(net)?;
    let mut cfg = world.agent_config();
    cfg.events_aggregate = aggregate.map(Into::into);
    cfg.extra_args = vec!["--events-keys-per-workload".into(), "1000".into()];
    let dir = enforcer_tests::TempDir::new("sweep-kill")?;
    let fifo = dir.path().join("events.fifo");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path.
    ensure!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) } == 0, "mkfifo");
    // Open for reading first (non-blocking), so that the agent's open for writing returns.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)?;
    let ready = dir.path().join("ready");
    let mut first = enforcer_tests::util::ChildGuard::new(
        cfg.run_command(&fifo)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("first.log"))?)
            .spawn()?,
    );
    ensure!(
        wait_until(Duration::from_secs(20), Duration::from_millis(20), || ready
            .exists()),
        "the first agent was not ready"
    );
    let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
    let mut text = Vec::new();
    let mut drain = |text: &mut Vec<u8>| {
        let mut chunk = [0u8; 65536];
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
        }
    };
    let target = world.entity("globex-vectors");
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let first_call = attempt("tcp", target.ip(false), FIRST_PORT);
    let aggregated = aggregate != Some("0");
    for _ in 0..denies {
        let burst = probe.ports(PORTS, &first_call)?;
        ensure!(burst.eperm == PORTS, "{burst:?}");
    }
    let lines = |text: &[u8]| -> Vec<serde_json::Value> {
        text.split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    };
    if aggregated {
        // Read the first denies as they come (they would fill the pipe), then stop reading.
        let firsts = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            drain(&mut text);
            lines(&text).len() as u64 >= PORTS
        });
        ensure!(firsts, "first denies: {} of {PORTS}", lines(&text).len());
    }
    // The sweep's summaries, or the denies themselves (~PORTS lines, more than a pipe holds)
    // fill the pipe and the agent blocks writing them: wait until the pipe is full.
    let full = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD into an int, on our open descriptor.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
        queued >= 60 * 1024
    });
    ensure!(full, "the sweep's summaries did not fill the pipe");
    first.child().kill()?;
    first.child().wait()?;
    drain(&mut text);
    // Denies reported per port (first denies count 1, summaries their count); a port whose
    // reports add up to fewer than `denies` lost some. Duplicates only add.
    let ports = u64::from(FIRST_PORT)..u64::from(FIRST_PORT) + PORTS;
    let short_of = |events: &[serde_json::Value]| -> Vec<u64> {
        let mut by_port = BTreeMap::new();
        for e in events
            .iter()
            .filter(|e| e.get("type").and_then(|t| t.as_str()) == Some("connection.denied"))
        {
            let count = e.get("count").and_then(|c| c.as_u64()).unwrap_or(1);
            if let Some(port) = e.pointer("/destination/port").and_then(|p| p.as_u64()) {
                *by_port.entry(port).or_insert(0) += count;
            }
        }
        ports
            .clone()
            .filter(|p| by_port.get(p).copied().unwrap_or(0) < denies)
            .collect()
    };
    let written = lines(&text);
    let unwritten = short_of(&written).len();
    ensure!(
        unwritten > 0,
        "the killed agent wrote every line: the test did not stop it mid-write"
    );

    // The next agent on the same pins reports what the killed one had not written.
    let second = Agent::start(cfg)?;
    let mut short = Vec::new();
    let complete = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let mut events = written.clone();
        events.extend(second.events().unwrap_or_default());
        short = short_of(&events);
        short.is_empty()
    });
    ensure!(
        complete,
        "{} ports short of their {denies} denies (the killed agent left {unwritten} unwritten): {:?}...",
        short.len(),
        &short[..short.len().min(10)]
    );
    Ok(())
}

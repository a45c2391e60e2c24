//! Findings of a red-team pass over tracked flows, the identity option and the events stream
//! (session of 2026-12-02), each a test that failed before its fix.
//!
//! - finding 1 (one tenant filling `FLOWS` refused every other tenant's tracked connects)
//!   and finding 2 (a flow held in `SYN_SENT` across a forbid was never reset) are tested in
//!   tests/flows.rs;
//! - finding 3: the events socket read a consumer's request line without a bound (one
//!   consumer could stream tens of MiB with no newline and the agent kept every byte);
//! - finding 4: a `since_secs` reaching past the epoch panicked the consumer's task.
//!
//! Addresses 127.96.200.0/21 only (127.96.x is this suite's range; the rest of 127.96.0.0/16
//! is the kube tests' service CIDR); cgroups and pins come from `fixtures::World`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{first_applied_snapshot, StateDir};
use enforcer_tests::fixtures::{Entity, World};
use enforcer_tests::{require_kernel, Agent};
use serde_json::Value;

const NET: u8 = 96;
const WAIT: Duration = Duration::from_secs(10);

const SAME_TENANT: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#;

// Findings 1 (one tenant filling FLOWS) and 2 (a flow in SYN_SENT across a forbid) are fixed;
// their tests live with the flows: tests/flows.rs
// `one_tenant_cannot_take_another_tenants_share_of_the_flow_table` and
// `a_handshake_in_progress_during_a_change_is_reset_when_it_completes`.

/// Finding 3 (medium: an events consumer can make the agent allocate without bound; the
/// agent is the one process that reads the ring buffer and revokes flows).
///
/// `serve_one` (enforcer/src/events/stream.rs) calls `read_line` on the consumer's request
/// with no limit and no deadline: a consumer (root, or a member of `--events-group`, e.g. a
/// log shipper's account) that sends bytes without a newline grows one `String` in the
/// agent for as long as it likes. Fix: read the request through `take(MAX_REQUEST)` (a
/// filter needs a few KiB; 64 KiB is generous) and answer `events.error` "request too
/// long" when no newline came within it; a deadline (`tokio::time::timeout`) on the request
/// line, and a bound on concurrent consumers, also close the idle-connection variant (each
/// idle consumer holds one of the agent's file descriptors and one task forever).
#[test]
fn an_endless_events_request_is_cut_off() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const SENT: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let entities = vec![Entity::workload(NET, "acme-a", "acme", "retrieval", 202, 1)];
    let world = World::new(NET, entities, SAME_TENANT)?;
    let state = StateDir::new()?;
    let config = state.configure(world.agent_config());
    let agent = Agent::start(config)?;
    first_applied_snapshot(&agent)?;
    let rss_before = rss_kib(agent.pid())?;

    let mut socket = UnixStream::connect(state.path().join("events.sock"))?;
    socket.set_write_timeout(Some(WAIT))?;
    let chunk = vec![b'a'; CHUNK];
    let mut written = 0usize;
    let mut stopped = None;
    while written < SENT {
        match socket.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }
    let rss_after = rss_kib(agent.pid())?;
    eprintln!(
        "wrote {} MiB without a newline ({:?}); agent RSS {} -> {} MiB",
        written >> 20,
        stopped.as_ref().map(|e| e.kind()),
        rss_before >> 10,
        rss_after >> 10
    );
    ensure!(
        written < SENT,
        "the agent took {} MiB of request line without hanging up (RSS {} -> {} MiB)",
        written >> 20,
        rss_before >> 10,
        rss_after >> 10
    );
    Ok(())
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Finding 4 (low; fixed on this branch): `since_secs` near `u64::MAX` made
/// `SystemTime::now() - Duration` panic in the consumer's task
/// (enforcer/src/events/stream.rs): the consumer got no answer at all and the agent's log a
/// panic. Now a window reaching past the epoch is the whole history.
#[test]
fn an_events_request_since_before_the_epoch_gets_the_whole_history() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let entities = vec![Entity::workload(NET, "acme-a", "acme", "retrieval", 203, 1)];
    let world = World::new(NET, entities, SAME_TENANT)?;
    let state = StateDir::new()?;
    let agent = Agent::start(state.configure(world.agent_config()))?;
    first_applied_snapshot(&agent)?;

    let mut socket = UnixStream::connect(state.path().join("events.sock"))?;
    socket.set_read_timeout(Some(WAIT))?;
    socket.write_all(b"{\"since_secs\":18446744073709551615}\n")?;
    let mut answer = String::new();
    socket
        .read_to_string(&mut answer)
        .context("reading the answer (the agent keeps the socket open?)")?;
    let kinds: Vec<String> = answer
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .map(|v| v["type"].as_str().unwrap_or_default().to_string())
                .with_context(|| format!("line {l:?}"))
        })
        .collect::<Result<_>>()?;
    ensure!(
        kinds.iter().any(|k| k == "policy.applied"),
        "the whole history (with its policy.applied) was expected, got {kinds:?}; agent \
         stderr:\n{}",
        agent.stderr_tail()
    );
    Ok(())
}

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
//! Addresses 127.91.0.0/16 (World::standard(91)) and 127.98.0.0/16 only.

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

/// A bundle of `inventory` under the one policy the hand-written tests below need.
fn same_tenant_bundle(inventory: &str) -> Result<enforcer_tests::PolicyBundle> {
    enforcer_tests::PolicyBundle::new(&[
        ("inventory.yaml", inventory),
        ("schema.cedarschema", enforcer_tests::fixtures::SCHEMA),
        (
            "policies.cedar",
            r#"@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#,
        ),
    ])
}

/// The server workload of the inbound test: it listens on `INBOUND_DB`, its ingress check is
/// `enforce`, and it makes denied calls of its own to `INBOUND_OTHER` (another tenant's store).
const INBOUND_DB: &str = "127.98.0.2";
const INBOUND_OTHER: &str = "127.98.0.3";
/// The flood's source (the test's own process: no enforcer judges its connects).
const INBOUND_PEER: &str = "127.98.1.1";
const INBOUND_PORT: u16 = 6333;
/// Forged claims per round: more than the budget, so every round overflows it.
const CLAIMS: u32 = 100;
/// How long the rounds go on (at least two whole 1 s windows), their pace, and a bound on
/// their number (far more than ROUNDS_FOR / ROUND_EVERY).
const ROUNDS_FOR: Duration = Duration::from_millis(3500);
const ROUND_EVERY: Duration = Duration::from_millis(50);
const MAX_ROUNDS: u32 = 200;

/// Sends one SYN from `INBOUND_PEER:sport` to `INBOUND_DB:INBOUND_PORT` on a raw IPv4 socket
/// (the kernel writes the IP header), with `option` as its only TCP option.
fn forged_syn(sport: u16, option: &[u8; enforcer_common::wire::OPTION_LEN]) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (INBOUND_PEER.parse()?, INBOUND_DB.parse()?);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&INBOUND_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = (((20 + option.len()) / 4) as u8) << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(option);
    // RFC 793 checksum over the pseudo-header and the segment (a raw IPv4 socket computes none).
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(tcp.len() as u16).to_be_bytes());
    add(&tcp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());

    // SAFETY: plain socket syscalls on values we own; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket");
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sockaddr = |ip: std::net::Ipv4Addr| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let from = sockaddr(src);
    // SAFETY: a valid sockaddr_in of the length given.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&from as *const libc::sockaddr_in).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("bind the raw socket");
    }
    let to = sockaddr(dst);
    // SAFETY: tcp and to are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            tcp.as_ptr().cast(),
            tcp.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    ensure!(
        sent == tcp.len() as isize,
        "raw SYN: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The inbound direction (the budget's hole and its per-direction split): a peer floods a
/// server workload whose ingress check is `enforce` with SYNs whose options claim 100
/// different identities under a forged tag (`bad_tag`, counted under each claim), and in
/// between the server makes one denied call of its own per round. Then:
/// - each window's inbound overflow is one key, not one per forged claim: at most one
///   `events.suppressed` line per window for `hook: ingress`, naming the server (before,
///   the overflow key carried the claim: one notice per claim beyond the budget, and a
///   flood of claims could fill `AGGREGATE` anyway);
/// - the flood's denies are all accounted: its own events plus the suppressed counts equal
///   the kernel's `bad_tag` counter;
/// - the server's own denies are every one reported with its destination, none folded into
///   an overflow: the flood spends the inbound budget, not the server's own (with one
///   budget for both, every window's flood pushed them out).
#[test]
fn an_inbound_flood_of_forged_claims_keeps_one_overflow_key_and_spares_the_servers_own_denies(
) -> Result<()> {
    use enforcer_tests::{unique_name, PinDir, TempDir, TestCgroup};
    if !require_kernel() {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("eb"))?;
    let node = root.child("node")?;
    let db_cg = node.child("acme-vectors")?;
    let inventory = format!(
        r#"tenants: [acme, globex]
workloads:
  - name: acme-vectors
    tenant: acme
    purpose: retrieval
    ring: prod
    cgroups: [{}]
    ips: [{INBOUND_DB}/32]
    ports: [{{port: {INBOUND_PORT}, protocol: tcp, action: infer}}]
    ingress: enforce
endpoints:
  - name: globex-store
    tenant: globex
    kind: feature_store
    ips: [{INBOUND_OTHER}/32]
    ports: [{{port: 7000, protocol: tcp, action: read}}]
"#,
        db_cg.relative_str()
    );
    let bundle = same_tenant_bundle(&inventory)?;
    let tmp = TempDir::new("eb-keys")?;
    let keys = tmp.path().join("keys");
    enforcer_tests::util::write_secret(&keys, "1 000102030405060708090a0b0c0d0e0f\n")?;
    let pins = PinDir::new("eb-in")?;
    let mut cfg =
        enforcer_tests::AgentConfig::new(bundle.path(), &node.relative_str(), pins.path());
    // The agent's own defaults (1 s windows, 64 keys per workload and direction).
    cfg.events_aggregate = None;
    cfg.extra_args = vec!["--flow-key-file".into(), keys.display().to_string()];
    let agent = Agent::start(cfg)?;
    // The listener makes the SYNs the server's: cgroup_skb runs for the socket they reach.
    let _db = enforcer_tests::probe::ProbeServer::start(
        None,
        &db_cg,
        SocketAddr::new(INBOUND_DB.parse()?, INBOUND_PORT),
    )?;
    let own_call = attempt("tcp", INBOUND_OTHER.parse()?, 7000);
    let server = Probe::new().in_cgroup(&db_cg);

    // Rounds: CLAIMS forged SYNs (each its own source port, so none is a retransmission the
    // check reports once), then one denied call of the server's own. Bounded in time and count.
    let forger = enforcer::wire::parse_keys(
        std::path::Path::new("forger"),
        "9 00000000000000000000000000000000",
    )?
    .current;
    let (s, d): (std::net::IpAddr, std::net::IpAddr) = (INBOUND_PEER.parse()?, INBOUND_DB.parse()?);
    let started = Instant::now();
    let (mut rounds, mut syns, mut own_calls) = (0u32, 0u64, 0u64);
    let mut sport: u16 = 10_000;
    while started.elapsed() < ROUNDS_FOR && rounds < MAX_ROUNDS {
        for claim in 0..CLAIMS {
            let option = enforcer::wire::option(
                &forger,
                0x7000_0000 + claim,
                enforcer::wire::now_stamp()?,
                s,
                d,
                sport,
                INBOUND_PORT,
            );
            forged_syn(sport, &option)?;
            sport = sport.wrapping_add(1).max(10_000);
            syns += 1;
        }
        let r = server.run_one(&own_call)?;
        ensure!(r.outcome == Outcome::Eperm, "the server's own call: {r:?}");
        own_calls += 1;
        rounds += 1;
        std::thread::sleep(ROUND_EVERY);
    }
    let flood_time = started.elapsed();
    ensure!(
        flood_time >= ROUNDS_FOR,
        "only {rounds} rounds: the bound on rounds ended the flood before two whole windows"
    );

    let is_flood = |e: &Value| {
        e.get("type").and_then(Value::as_str) == Some("connection.denied")
            && e.get("hook").and_then(Value::as_str) == Some("ingress")
            && e.get("reason").and_then(Value::as_str) == Some("bad_tag")
    };
    let is_own = |e: &Value| deny_to(e, "acme-vectors", "globex-store");
    let suppressed = |e: &Value, hook: &str| {
        e.get("type").and_then(Value::as_str) == Some("events.suppressed")
            && e.get("hook").and_then(Value::as_str) == Some(hook)
    };
    let kernel = || -> Result<u64> { Ok(kernel_denies(&agent.status()?, "bad_tag")) };
    // Complete once every deny is in some line (the server's own ones possibly, wrongly,
    // in a suppressed one: judged below).
    let mut last = (0, 0, 0, 0);
    let complete = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let events = agent.events().unwrap_or_default();
        last = (
            counted(&events, is_flood).0,
            counted(&events, |e| suppressed(e, "ingress")).0,
            counted(&events, is_own).0,
            counted(&events, |e| suppressed(e, "connect4")).0,
        );
        last.0 + last.1 >= syns && last.2 + last.3 >= own_calls
    });
    ensure!(
        complete,
        "{syns} forged SYNs: own events count {}, suppressed {}; the server's {own_calls} \
         calls: own events {}, suppressed {}\n{}",
        last.0,
        last.1,
        last.2,
        last.3,
        agent.stderr_tail()
    );
    let settled = agent.settled_events(Duration::from_millis(2500), Duration::from_secs(20))?;
    let (flood, _) = counted(&settled, is_flood);
    let (flood_suppressed, notices) = counted(&settled, |e| suppressed(e, "ingress"));
    let kernel = kernel()?;
    ensure!(
        kernel == syns && flood + flood_suppressed == kernel,
        "{syns} forged SYNs, the kernel counted {kernel} bad_tag denies, the events {flood} + \
         suppressed {flood_suppressed}"
    );
    // One overflow key per window (1 s windows over the rounds' measured time, plus the one
    // they started in and the one they ended in), never one per claim.
    let windows = flood_time.as_secs() as usize + 2;
    ensure!(
        notices >= 1 && notices <= windows,
        "{notices} events.suppressed lines for the flood over at most {windows} windows: \
         one overflow per claim, not per window"
    );
    for e in settled.iter().filter(|e| suppressed(e, "ingress")) {
        ensure!(
            e["workload"] == "acme-vectors" && e["reason"] == "bad_tag",
            "the inbound overflow names the claim, not the server: {e}"
        );
    }
    // The server's own denies: all reported with their destination, none suppressed.
    let (own, _) = counted(&settled, is_own);
    ensure!(
        own == own_calls,
        "the server's own denies count {own} for {own_calls} calls"
    );
    ensure!(
        !settled.iter().any(|e| suppressed(e, "connect4")),
        "the flood pushed the server's own denies into its overflow: {:?}",
        settled
            .iter()
            .filter(|e| suppressed(e, "connect4"))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "inbound: {rounds} rounds, {syns} forged SYNs -> count {flood} in own lines + \
         {flood_suppressed} in {notices} suppressed lines; the server's {own_calls} own denies \
         all reported"
    );
    Ok(())
}

/// The budget is the workload's, not its cgroup's: a pod that may make cgroups (a delegated
/// subtree) does not get one budget per cgroup it made. Five cgroups of one workload
/// (`cgroups:` lists them all, as a pod's containers) sweep distinct ports of another
/// tenant's store at once, with a budget of 16 keys: at most 16 new keys per window reach
/// the stream for all five together (before, each cgroup had its own 16, and a pod with
/// enough cgroups filled `AGGREGATE` for every workload), and every deny is accounted.
#[test]
fn one_workload_in_many_cgroups_shares_one_budget() -> Result<()> {
    use enforcer_tests::{unique_name, PinDir, TestCgroup};
    if !require_kernel() {
        return Ok(());
    }
    const CGROUPS: usize = 5;
    const PORTS_EACH: u64 = 4_000;
    const BUDGET: u64 = 16;
    const STORE: &str = "127.98.2.3";
    let root = TestCgroup::create(unique_name("eb"))?;
    let node = root.child("node")?;
    let cgroups: Vec<TestCgroup> = (0..CGROUPS)
        .map(|i| node.child(&format!("c{i}")))
        .collect::<Result<_>>()?;
    let list: Vec<String> = cgroups.iter().map(|c| c.relative_str()).collect();
    let inventory = format!(
        r#"tenants: [acme, globex]
workloads:
  - name: acme-agent
    tenant: acme
    purpose: retrieval
    ring: prod
    cgroups: [{}]
    ips: [127.98.2.1/32]
endpoints:
  - name: globex-store
    tenant: globex
    kind: feature_store
    ips: [{STORE}/32]
    ports: [{{port: 7000, protocol: tcp, action: read}}]
"#,
        list.join(", ")
    );
    let bundle = same_tenant_bundle(&inventory)?;
    let pins = PinDir::new("eb-cg")?;
    let mut cfg =
        enforcer_tests::AgentConfig::new(bundle.path(), &node.relative_str(), pins.path());
    cfg.events_aggregate = None;
    cfg.extra_args = vec!["--events-keys-per-workload".into(), BUDGET.to_string()];
    let agent = Agent::start(cfg)?;

    let sweep_call = attempt("tcp", STORE.parse()?, 20_000);
    let started = Instant::now();
    let sweeps = std::thread::scope(|s| -> Result<Vec<_>> {
        let handles: Vec<_> = cgroups
            .iter()
            .map(|cg| {
                let call = &sweep_call;
                s.spawn(move || {
                    Probe::new()
                        .in_cgroup(cg)
                        .timeout(Duration::from_secs(120))
                        .ports(PORTS_EACH, call)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sweep thread"))
            .collect()
    })?;
    let elapsed = started.elapsed();
    let calls = CGROUPS as u64 * PORTS_EACH;
    let refused: u64 = sweeps.iter().map(|s| s.eperm).sum();
    ensure!(
        refused == calls,
        "every attempt must be refused: {sweeps:?}"
    );

    let status = agent.status()?;
    let reason = ["tenant_mismatch", "no_permit"]
        .into_iter()
        .find(|r| kernel_denies(&status, r) > 0)
        .context("no connect denies counted in the kernel")?;
    let kernel = kernel_denies(&status, reason);
    ensure!(
        kernel == calls,
        "the kernel counted {kernel} {reason} denies for {calls} attempts"
    );
    let is_own = |e: &Value| deny_to(e, "acme-agent", "globex-store");
    let is_suppressed = |e: &Value| suppressed_of(e, "acme-agent");
    let mut last = (0, 0);
    let complete = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let events = agent.events().unwrap_or_default();
        last = (
            counted(&events, is_own).0,
            counted(&events, is_suppressed).0,
        );
        last.0 + last.1 >= kernel
    });
    ensure!(
        complete,
        "own events count {}, suppressed {}, for {kernel} denies\n{}",
        last.0,
        last.1,
        agent.stderr_tail()
    );
    let settled = agent.settled_events(Duration::from_millis(2500), Duration::from_secs(20))?;
    let (own, own_lines) = counted(&settled, is_own);
    let (suppressed, _) = counted(&settled, is_suppressed);
    ensure!(
        own + suppressed == kernel,
        "own {own} + suppressed {suppressed} for {kernel} denies in the kernel"
    );
    // Each port is denied once: one line per key. One budget for the workload: at most
    // BUDGET keys per window it touched (1 s windows: the sweep's whole seconds, plus the
    // window it started and the one it ended in). Per cgroup it was CGROUPS times that.
    let windows = elapsed.as_secs() + 2;
    ensure!(
        own_lines as u64 <= BUDGET * windows,
        "{own_lines} own lines over at most {windows} windows: more than one budget of \
         {BUDGET} keys per window for the workload"
    );
    for e in settled.iter().filter(|e| is_suppressed(e)) {
        ensure!(
            e.get("cgroup_id").is_none() && e["tenant"] == "acme" && e["hook"] == "connect4",
            "{e}"
        );
    }
    eprintln!(
        "cgroups: {CGROUPS} cgroups × {PORTS_EACH} ports in {:.2} s -> {own_lines} own lines, \
         {suppressed} suppressed",
        elapsed.as_secs_f64()
    );
    Ok(())
}

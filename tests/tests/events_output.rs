//! The events file as a SOC pipeline sees it, from the real agent and the real kernel:
//!
//! - with `--events-format ocsf`, every line the agent writes (denies from three hooks, a
//!   quarantine and its release, a risk change, a rejected and an applied policy) conforms to
//!   the OCSF 1.8.0 definition files the repository ships, and `metadata.sequence` counts
//!   every line once; a caller in a cgroup named like a pod's container is reported with
//!   that container and pod;
//! - under a deny storm, the file rotates by size (`--events-max-bytes`) and once by
//!   logrotate's rename + SIGUSR1, and rsyslog's `imfile`, following the file by name, ships
//!   every event exactly once; the agent's own files hold every line once, none split;
//! - the agent's logs carry no colour codes when stderr is not a terminal; bad event flags
//!   are refused with a reason.
//!
//! Addresses 127.87.0.0/16 (and fd87::/16 in the inventory only); names start with `oc`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use enforcer::events::ocsf::conformance::{shipped_schema_dir, Schema};
use enforcer_tests::bpf::PinDir;
use enforcer_tests::cli::{enforcer, send_signal, StateDir};
use enforcer_tests::fixtures::{
    render_inventory, standard_entities, write_bundle, World, SCHEMA, STANDARD_POLICIES,
};
use enforcer_tests::probe::attempt;
use enforcer_tests::rsyslog::{self, Rsyslog};
use enforcer_tests::util::{output_bounded, unique_name, wait_until};
use enforcer_tests::{require, require_kernel, Agent, Outcome, PolicyBundle, Probe, TestCgroup};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// A pod UID and container ID for a cgroup named as the kubelet names them.
const POD_UID: &str = "0c8a4f8e-5d2b-4c1e-9f3a-7b6d5e4c3b2a";
const CONTAINER_ID: &str = "5e9f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f";

/// The standard world, moved into this test file's ranges: IPv4 `127.87.<slot*10+t>.<i>`,
/// IPv6 `fd87::<slot>:<t>:<i>` (written into the inventory, never used on the wire), cgroups
/// and pins named `oc-...`. With `kubelet_gateway`, acme-gateway's cgroup is named like a
/// container of a pod (cgroupfs driver: `kubepods/burstable/pod<uid>/<container id>`).
fn world(slot: u8, kubelet_gateway: bool) -> Result<World> {
    let mut entities = standard_entities(87);
    for e in &mut entities {
        let [_, _, t, i] = e.v4.octets();
        e.v4 = Ipv4Addr::new(127, 87, slot * 10 + t, i);
        e.v6 = Ipv6Addr::new(
            0xfd87,
            0,
            0,
            0,
            0,
            u16::from(slot),
            u16::from(t),
            u16::from(i),
        );
    }
    let root = TestCgroup::create(unique_name("oc-events"))?;
    let mut cgroups = BTreeMap::new();
    for e in entities.iter().filter(|e| e.local) {
        cgroups.insert(e.name.clone(), root.child(&e.name)?);
    }
    let kubelet = format!("kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}");
    let bundle = if kubelet_gateway {
        cgroups.insert("acme-gateway".into(), root.child(&kubelet)?);
        let inventory = render_inventory(&entities, &root.relative_str()).replace(
            &format!("{}/acme-gateway]", root.relative_str()),
            &format!("{}/{kubelet}]", root.relative_str()),
        );
        PolicyBundle::new(&[
            ("inventory.yaml", &inventory),
            ("schema.cedarschema", SCHEMA),
            ("policies.cedar", STANDARD_POLICIES),
        ])?
    } else {
        write_bundle(&entities, &root.relative_str(), STANDARD_POLICIES)?
    };
    Ok(World {
        net: 87,
        entities,
        cgroups,
        root,
        bundle,
        pins: PinDir::new("oc-events")?,
    })
}

fn probe(world: &World, name: &str) -> Probe {
    Probe::new()
        .in_cgroup(world.cgroup(name))
        .timeout(Duration::from_secs(60))
}

fn lines_of(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends inside a line",
        path.display()
    );
    Ok(text.lines().map(str::to_string).collect())
}

fn parse(line: &str) -> Result<Value> {
    serde_json::from_str(line).with_context(|| format!("not one JSON event: {line:?}"))
}

fn code(event: &Value) -> &str {
    event
        .pointer("/metadata/event_code")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn sequence(event: &Value) -> Option<u64> {
    event.pointer("/metadata/sequence").and_then(Value::as_u64)
}

#[test]
fn ocsf_lines_of_the_real_agent_conform_to_the_schema() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let schema = Schema::load(&shipped_schema_dir())?;
    let world = world(1, true)?;
    let state = StateDir::new()?;
    let mut cfg = state.configure(world.agent_config());
    cfg.extra_args
        .extend(["--events-format".to_string(), "ocsf".to_string()]);
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    let events = || -> Result<Vec<Value>> {
        lines_of(&agent.events_path())
            .unwrap_or_default()
            .iter()
            .map(|l| parse(l))
            .collect()
    };
    let wait_code = |code_wanted: &str, n: usize| -> Result<()> {
        let mut got = Vec::new();
        let ok = wait_until(WAIT, Duration::from_millis(20), || {
            got = events().unwrap_or_default();
            got.iter().filter(|e| code(e) == code_wanted).count() >= n
        });
        ensure!(
            ok,
            "waited for {n} {code_wanted}; the agent wrote {:?}\n{}",
            got.iter().map(code).collect::<Vec<_>>(),
            agent.stderr_tail()
        );
        Ok(())
    };

    // Three hooks refuse: connect4 (TCP to another tenant), sendmsg4 (unconnected UDP to
    // another tenant), sock_create (a raw socket).
    let gateway = probe(&world, "acme-gateway");
    let vectors = world.entity("globex-vectors").ip(false);
    let retriever = world.entity("globex-retriever").ip(false);
    for (call, hook) in [
        (attempt("tcp", vectors, 6333), "connect4"),
        (attempt("udp", retriever, 7070), "sendmsg4"),
        (format!("raw:{vectors}"), "sock_create"),
    ] {
        gateway.expect_outcome(&call, Outcome::Eperm, hook)?;
    }
    wait_code("connection.denied", 3)?;

    // Quarantine, a deny because of it, release, a risk change.
    let out = dirs.run(&["quarantine", "add", "acme-gateway"])?;
    ensure!(out.success(), "quarantine add: {out}");
    wait_code("subject.quarantined", 1)?;
    let same_tenant = attempt("tcp", world.entity("acme-vectors").ip(false), 6333);
    gateway.expect_outcome(&same_tenant, Outcome::Eperm, "quarantined")?;
    wait_code("connection.denied", 4)?;
    let out = dirs.quarantine_release("acme-gateway")?;
    ensure!(out.success(), "quarantine release: {out}");
    wait_code("subject.released", 1)?;
    let out = dirs.risk_set("acme-gateway", "0.5")?;
    ensure!(out.success(), "risk set: {out}");
    wait_code("risk.changed", 1)?;

    // A broken policy file is rejected; removing it applies the bundle again.
    world
        .bundle
        .write_file("broken.cedar", "permit (principal,")?;
    wait_code("policy.rejected", 1)?;
    std::fs::remove_file(world.bundle.path().join("broken.cedar"))?;
    wait_code("policy.applied", 2)?;

    let all = events()?;
    let mut problems = Vec::new();
    for event in &all {
        for problem in schema.check(event) {
            problems.push(format!("{}: {problem}", code(event)));
        }
    }
    ensure!(
        problems.is_empty(),
        "OCSF problems in the agent's own lines:\n{}",
        problems.join("\n")
    );
    let codes: BTreeSet<&str> = all.iter().map(code).collect();
    for wanted in [
        "connection.denied",
        "subject.quarantined",
        "subject.released",
        "risk.changed",
        "policy.rejected",
        "policy.applied",
    ] {
        ensure!(codes.contains(wanted), "no {wanted} among {codes:?}");
    }
    let seqs: Vec<u64> = all.iter().filter_map(sequence).collect();
    ensure!(
        seqs == (1..=all.len() as u64).collect::<Vec<_>>(),
        "metadata.sequence must count every line once from 1: {seqs:?}"
    );

    // What a SOC reads off the TCP deny.
    let deny = all
        .iter()
        .find(|e| {
            code(e) == "connection.denied"
                && e.pointer("/unmapped/hook").and_then(Value::as_str) == Some("connect4")
        })
        .context("the connect4 deny")?;
    let field = |p: &str| deny.pointer(p).cloned().unwrap_or(Value::Null);
    ensure!(
        field("/activity_id") == 5 && field("/type_uid") == 400105,
        "{deny}"
    );
    ensure!(field("/src_endpoint/name") == "acme-gateway", "{deny}");
    ensure!(field("/src_endpoint/owner/org/name") == "acme", "{deny}");
    ensure!(
        field("/dst_endpoint/ip") == vectors.to_string().as_str(),
        "{deny}"
    );
    ensure!(field("/dst_endpoint/port") == 6333, "{deny}");
    ensure!(field("/actor/process/name") == "probe", "{deny}");
    ensure!(field("/firewall_rule/uid") == "tenant-isolation", "{deny}");
    ensure!(
        field("/attacks/0/sub_technique/uid") == "AML.T0085.000"
            && field("/attacks/0/technique/uid") == "AML.T0085"
            && field("/attacks/0/tactic/uid") == "AML.TA0009",
        "{deny}"
    );
    ensure!(
        field("/unmapped/policy_sources/0")
            .as_str()
            .is_some_and(|s| s.starts_with("policies.cedar:")),
        "policy sources relative to the bundle: {deny}"
    );
    // The caller's container and pod, from its cgroup's names.
    ensure!(
        field("/src_endpoint/container/uid") == CONTAINER_ID
            && field("/src_endpoint/container/pod_uuid") == POD_UID
            && field("/src_endpoint/container/orchestrator") == "Kubernetes",
        "{deny}"
    );
    ensure!(
        field("/unmapped/subject/cgroup")
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("pod{POD_UID}/{CONTAINER_ID}"))),
        "{deny}"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    ensure!(field("/device/hostname") == host.trim(), "{deny}");
    Ok(())
}

/// The agent's files: `FILE.<keep>` ... `FILE.1`, the file logrotate renamed, `FILE` (not in
/// the order written: logrotate's file sits between rotations).
fn agent_files(events: &Path, keep: u32, logrotated: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = (1..=keep)
        .rev()
        .map(|n| enforcer::events::rotated_path(events, n))
        .filter(|p| p.exists())
        .collect();
    if logrotated.exists() {
        files.insert(0, logrotated.to_path_buf());
    }
    files.push(events.to_path_buf());
    Ok(files)
}

/// The seq of every line: exactly once each, from 1 to the last, or an error naming what is
/// missing or repeated.
fn exactly_once(what: &str, seqs: &[u64]) -> Result<u64> {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for s in seqs {
        *count.entry(*s).or_default() += 1;
    }
    let last = count.keys().next_back().copied().unwrap_or(0);
    let missing: Vec<u64> = (1..=last).filter(|s| !count.contains_key(s)).collect();
    let repeated: Vec<u64> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    if !missing.is_empty() || !repeated.is_empty() {
        bail!(
            "{what}: {} lines up to seq {last}; missing {} ({:?}...), repeated {} ({:?}...)",
            seqs.len(),
            missing.len(),
            &missing[..missing.len().min(10)],
            repeated.len(),
            &repeated[..repeated.len().min(10)]
        );
    }
    Ok(last)
}

#[test]
fn rotation_under_a_deny_storm_ships_every_event_exactly_once_through_rsyslog() -> Result<()> {
    if !require_kernel() || !require("rsyslog", rsyslog::unavailable_reason()) {
        return Ok(());
    }
    // A file holds ~800 OCSF lines, so each storm rotates it about five times; the kept files
    // hold the whole test, for the agent-side check. A file must live longer than imfile
    // takes to notice it (see the README: a name-following shipper never sees a file that
    // came and went between two of its looks): the storm is paced to at most PACE denies
    // every PAUSE (~800 a second), so that each file lives about a second however fast the
    // agent writes (unpaced, a release agent fills one in milliseconds).
    const MAX_BYTES: u64 = 2 << 20;
    const KEEP: u32 = 30;
    const STORM: u64 = 5000;
    const PACE: u64 = 200;
    const PAUSE: Duration = Duration::from_millis(250);
    let world = world(2, false)?;
    let mut cfg = world.agent_config();
    // Large enough that the storm is never lost in the kernel: this test is about the file.
    cfg.ring_buffer_bytes = Some(4 << 20);
    cfg.extra_args.extend(
        [
            "--events-format",
            "ocsf",
            "--events-max-bytes",
            &MAX_BYTES.to_string(),
            "--events-keep",
            &KEEP.to_string(),
        ]
        .map(String::from),
    );
    let agent = Agent::start(cfg)?;
    let events = agent.events_path();
    let logrotated = events.with_extension("jsonl-logrotated");
    let mut shipper = Rsyslog::follow(&events)?;
    shipper.wait_for(WAIT, "the first line", |lines| !lines.is_empty())?;

    let gateway = probe(&world, "acme-gateway");
    let denied = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let storm = || -> Result<u64> {
        let mut refused = 0;
        for _ in 0..STORM / PACE {
            refused += gateway.repeat(PACE, &denied)?.eperm;
            std::thread::sleep(PAUSE);
        }
        Ok(refused)
    };
    let is_storm = |e: &Value| {
        code(e) == "connection.denied"
            && e.pointer("/dst_endpoint/port").and_then(Value::as_u64) == Some(6333)
    };
    let storm_events = |lines: &[String]| -> usize {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| is_storm(e))
            .count()
    };
    // While waiting, a cheap count (this polls files of megabytes): the storm's denies are the
    // only ones of this test.
    let storm_lines = |lines: &[String]| -> usize {
        lines
            .iter()
            .filter(|l| l.contains(r#""event_code":"connection.denied""#))
            .count()
    };
    let agent_lines = || -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for file in agent_files(&events, KEEP, &logrotated)? {
            lines.extend(lines_of(&file)?);
        }
        Ok(lines)
    };
    let wait_agent = |n: usize| -> Result<()> {
        let ok = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            agent_lines().is_ok_and(|l| storm_lines(&l) >= n)
        });
        ensure!(
            ok,
            "the agent wrote {} of {n} storm events\n{}",
            storm_events(&agent_lines().unwrap_or_default()),
            agent.stderr_tail()
        );
        Ok(())
    };

    // Storm 1: size rotation, many times.
    let started = std::time::Instant::now();
    let first = storm()?;
    ensure!(first == STORM, "{first} of {STORM} attempts denied");
    wait_agent(STORM as usize)?;
    let storm_time = started.elapsed();
    let rotated = (1..=KEEP)
        .filter(|n| enforcer::events::rotated_path(&events, *n).exists())
        .count();
    ensure!(
        rotated >= 3,
        "the storm rotated the file {rotated} times only"
    );

    // logrotate's way: rename, then SIGUSR1; the agent opens FILE again.
    std::fs::rename(&events, &logrotated)?;
    send_signal(agent.pid(), libc::SIGUSR1)?;
    ensure!(
        wait_until(WAIT, Duration::from_millis(20), || events.exists()),
        "SIGUSR1 did not reopen {}\n{}",
        events.display(),
        agent.stderr_tail()
    );

    // Storm 2: into the reopened file, rotating again.
    let second = storm()?;
    ensure!(second == STORM, "{second} of {STORM} attempts denied");
    wait_agent(2 * STORM as usize)?;

    // The agent's side: every line once, none split, every file within the limit.
    let lines = agent_lines()?;
    let written: Vec<u64> = lines
        .iter()
        .map(|l| parse(l).map(|e| sequence(&e).unwrap_or(0)))
        .collect::<Result<_>>()?;
    let last = exactly_once("the agent's files", &written)?;
    for file in agent_files(&events, KEEP, &logrotated)? {
        let size = std::fs::metadata(&file)?.len();
        ensure!(
            size <= MAX_BYTES,
            "{} has {size} bytes, over --events-max-bytes",
            file.display()
        );
    }
    ensure!(
        !lines
            .iter()
            .any(|l| parse(l).is_ok_and(|e| code(&e) == "events.lost")),
        "the kernel lost events: the storm must fit the ring buffer"
    );
    ensure!(
        storm_events(&lines) == 2 * STORM as usize,
        "{} storm events written for {} denied attempts",
        storm_events(&lines),
        2 * STORM
    );

    // The shipper's side: the same lines, each exactly once.
    let shipped = shipper.wait_for(Duration::from_secs(60), "every line", |shipped| {
        shipped.len() >= lines.len()
    })?;
    let received: Vec<u64> = shipped
        .iter()
        .map(|l| parse(l).map(|e| sequence(&e).unwrap_or(0)))
        .collect::<Result<_>>()?;
    let shipped_last = exactly_once("what rsyslog shipped", &received)?;
    ensure!(
        shipped_last == last && shipped.len() == lines.len(),
        "rsyslog shipped {} lines up to seq {shipped_last}; the agent wrote {} up to {last}",
        shipped.len(),
        lines.len()
    );
    // Unchanged: the same text under each seq.
    let by_seq = |lines: &[String], seqs: &[u64]| -> BTreeMap<u64, String> {
        seqs.iter().copied().zip(lines.iter().cloned()).collect()
    };
    let written_by_seq = by_seq(&lines, &written);
    for (seq, line) in by_seq(&shipped, &received) {
        ensure!(
            written_by_seq.get(&seq) == Some(&line),
            "rsyslog shipped seq {seq} changed:\n  shipped {line}\n  written {:?}",
            written_by_seq.get(&seq)
        );
    }
    let files = agent_files(&events, KEEP, &logrotated)?.len();
    eprintln!(
        "{} lines ({} storm events) in {files} files, shipped exactly once; the first storm's \
         {STORM} events were written within {storm_time:?}",
        lines.len(),
        storm_events(&shipped),
    );
    Ok(())
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() -> Result<()> {
    let demo = enforcer_tests::fixtures::demo_policies_dir();
    let out = output_bounded(
        Command::new(enforcer_tests::agent::enforcer_bin())
            .args(["policy", "check"])
            .arg(&demo)
            .env("RUST_LOG", "debug")
            .env_remove("NO_COLOR"),
        Duration::from_secs(60),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "policy check failed: {stderr}");
    // A tracing line (not an eprintln), so that the subscriber's setting is what is tested.
    ensure!(
        stderr.contains("compile statistics"),
        "no debug log line to look at: {stderr}"
    );
    ensure!(
        !out.stderr.contains(&0x1b),
        "escape codes in a log written to a pipe: {stderr:?}"
    );
    Ok(())
}

#[test]
fn bad_event_flags_are_refused_with_the_reason() -> Result<()> {
    let dir = enforcer_tests::fixtures::demo_policies_dir();
    let dir = dir.display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--events", "-", "--events-max-bytes", "1M"],
            "--events-max-bytes rotates a file",
        ),
        (&["--events-max-bytes", "1T"], "optionally with K, M or G"),
        (&["--events-keep", "3"], "--events-max-bytes"),
        (&["--events-format", "cef"], "json, ocsf"),
    ];
    for (flags, reason) in cases {
        let mut args = vec!["run", "--policies", dir.as_str()];
        args.extend_from_slice(flags);
        let out = enforcer(&args)?;
        ensure!(!out.success(), "{flags:?} accepted: {out}");
        ensure!(
            out.stderr.contains(reason),
            "{flags:?}: the error does not say {reason:?}: {out}"
        );
    }
    Ok(())
}

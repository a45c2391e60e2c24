//! `enforcer events --since` against the real kernel and agent, when the window reaches past
//! the agent's in-memory history (10,000 events): the older events come from the events
//! file and its rotated copies, then the history, in order, each exactly once.
//!
//! Addresses 127.92.0.0/16 only; cgroups and pins are named `es-...`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::cli::{AgentDirs, StateDir};
use enforcer_tests::fixtures::{standard_entities, write_bundle, World, STANDARD_POLICIES};
use enforcer_tests::probe::attempt;
use enforcer_tests::util::{unique_name, wait_until};
use enforcer_tests::{require_kernel, Agent, PinDir, Probe, TestCgroup};
use serde_json::Value;

/// Denies in the burst: more than the agent's history holds (10,000).
const DENIES: u64 = 12_500;
/// Rotated files kept: enough for the whole burst at `MAX_BYTES` each.
const KEEP: u32 = 40;
const MAX_BYTES: &str = "1M";

fn world(name: &str) -> Result<World> {
    let entities = standard_entities(92);
    for e in &entities {
        assert_eq!(e.v4.octets()[..2], [127, 92], "{}", e.name);
    }
    let root = TestCgroup::create(unique_name(&format!("es-{name}")))?;
    let mut cgroups = BTreeMap::new();
    for e in entities.iter().filter(|e| e.local) {
        cgroups.insert(e.name.clone(), root.child(&e.name)?);
    }
    let bundle = write_bundle(&entities, &root.relative_str(), STANDARD_POLICIES)?;
    Ok(World {
        net: 92,
        entities,
        cgroups,
        root,
        bundle,
        pins: PinDir::new(&format!("es-{name}"))?,
    })
}

/// Every whole line of the events file and its rotated copies, oldest first.
fn all_lines(path: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<_> = (1..=KEEP)
        .rev()
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            std::path::PathBuf::from(name)
        })
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_path_buf());
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines() {
            out.push(serde_json::from_str(line).with_context(|| format!("line {line:?}"))?);
        }
    }
    Ok(out)
}

fn events(dirs: &AgentDirs, args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(enforcer_bin())
        .arg("events")
        .args(args)
        .args(dirs.args())
        .output()?;
    ensure!(
        out.status.success(),
        "enforcer events {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?}")))
        .collect()
}

fn seq_list(events: &[Value]) -> Result<Vec<u64>> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().with_context(|| format!("no seq: {e}")))
        .collect()
}

#[test]
fn since_reaches_past_the_history_into_rotated_files_exactly_once_in_order() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("since")?;
    let state = StateDir::new()?;
    let mut cfg = state.configure(world.agent_config());
    // The whole burst fits in the kernel's ring buffer, and each deny is its own event.
    cfg.ring_buffer_bytes = Some(32 << 20);
    cfg.events_aggregate = Some("0".into());
    cfg.extra_args.extend([
        "--events-max-bytes".to_string(),
        MAX_BYTES.to_string(),
        "--events-keep".to_string(),
        KEEP.to_string(),
    ]);
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;

    let cross = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let summary = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(Duration::from_secs(300))
        .repeat(DENIES, &cross)?;
    ensure!(summary.eperm == DENIES, "every call refused: {summary:?}");
    let path = agent.events_path();
    let mut file = Vec::new();
    let arrived = wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
        file = all_lines(&path).unwrap_or_default();
        file.iter().filter(|e| e["verdict"] == "deny").count() as u64 >= DENIES
    });
    ensure!(
        arrived,
        "the events files never had {DENIES} denies:\n{}",
        agent.stderr_tail()
    );
    ensure!(
        !file.iter().any(|e| e["type"] == "events.lost"),
        "the kernel lost events: the ring buffer is too small for this test"
    );
    let mut first_rotated = path.as_os_str().to_owned();
    first_rotated.push(".3");
    ensure!(
        Path::new(&first_rotated).exists(),
        "the burst did not rotate the events file three times"
    );
    let file_seqs = seq_list(&file)?;
    ensure!(
        file_seqs == (1..=file_seqs.len() as u64).collect::<Vec<_>>(),
        "the events files' seqs are not 1..N in order"
    );

    // Everything since the agent started: every line of the files, in order, exactly once
    // (lines written after the files were read may follow: the seqs go on from there).
    let got = events(&dirs, &["--since", "10m", "-o", "json"])?;
    ensure!(
        !got.iter().any(|e| e["type"] == "events.truncated"),
        "told the window was truncated: {:?}",
        got.iter().find(|e| e["type"] == "events.truncated")
    );
    let got_seqs = seq_list(&got)?;
    ensure!(
        got_seqs.len() >= file_seqs.len()
            && got_seqs == (1..=got_seqs.len() as u64).collect::<Vec<_>>(),
        "--since 10m: {} lines, seqs not 1..N in order (first {:?}, last {:?}); the files hold {}",
        got_seqs.len(),
        got_seqs.first(),
        got_seqs.last(),
        file_seqs.len()
    );
    for (sent, written) in got.iter().zip(&file) {
        ensure!(sent == written, "sent {sent}\nwritten {written}");
    }

    // A filter applies to the file's part as to the history's: exactly the file's denies.
    let denies = events(
        &dirs,
        &[
            "--since",
            "10m",
            "--workload",
            "acme-gateway",
            "--verdict",
            "deny",
        ],
    )?;
    let want: Vec<u64> = file
        .iter()
        .filter(|e| e["verdict"] == "deny" && e["subject"]["workload"] == "acme-gateway")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    ensure!(
        want.len() as u64 == DENIES,
        "{} denies in the files",
        want.len()
    );
    let got = seq_list(&denies)?;
    let unique: BTreeSet<u64> = got.iter().copied().collect();
    ensure!(
        got == want && unique.len() == got.len(),
        "--since 10m --workload acme-gateway --verdict deny: {} lines ({} distinct), {} expected",
        got.len(),
        unique.len(),
        want.len()
    );

    // The file is JSON: an OCSF consumer is told in-band that older events are not sent to
    // it, and gets the history.
    let ocsf = events(
        &dirs,
        &["--since", "10m", "-o", "ocsf", "--verdict", "deny"],
    )?;
    ensure!(
        ocsf.first()
            .is_some_and(|e| e["type"] == "events.truncated"),
        "no events.truncated line first for an OCSF consumer of a JSON file: {:?}",
        ocsf.first()
    );
    let history = ocsf.len() - 1;
    ensure!(
        history > 0 && (history as u64) < DENIES,
        "{history} OCSF denies from the history"
    );
    Ok(())
}

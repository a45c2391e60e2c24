//! `enforcer events` against the real kernel: the agent's live event stream on its Unix
//! socket.
//!
//! - three `enforcer events --follow` consumers with different filters during a burst of
//!   denies from three cgroups each receive exactly the matching events of the events file
//!   (count and seq set), while a fourth consumer that never reads during the burst is told
//!   in-band (`events.dropped`) what it missed, and loses nothing else;
//! - two followers of every event read the agent's shared ring (they map its memfd): each
//!   gets every event of the file once, in order, or is told in-band that it missed it; one
//!   stopped (SIGSTOP) while more than the ring holds goes by must have been told (the other,
//!   a debug build on a busy machine, may have been lapped too: the bench shows release
//!   followers keeping up with a flood);
//! - a follower whose agent stops follows the restarted agent by itself, from its first
//!   event (both agents' denies, once each, in order);
//! - history and `--since`; bad filters are refused with the option named;
//! - a user that is not root (nobody) is refused.
//!
//! Addresses 127.87.0.0/16 only; cgroups and pins are named `ev-...`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::cli::{first_applied_snapshot, AgentDirs, StateDir};
use enforcer_tests::fixtures::{standard_entities, write_bundle, World, STANDARD_POLICIES};
use enforcer_tests::probe::attempt;
use enforcer_tests::util::{unique_name, wait_until, ChildGuard, TempDir};
use enforcer_tests::{require_kernel, Agent, PinDir, Probe, TestCgroup};
use serde_json::Value;

/// Denies per cgroup in the burst (three cgroups). More than a stalled consumer's queue and
/// socket buffer hold, so that it must miss some.
const PER_CGROUP: u64 = 1_500;

fn world(name: &str) -> Result<World> {
    let entities = standard_entities(87);
    for e in &entities {
        assert_eq!(e.v4.octets()[..2], [127, 87], "{}", e.name);
    }
    let root = TestCgroup::create(unique_name(&format!("ev-{name}")))?;
    let mut cgroups = BTreeMap::new();
    for e in entities.iter().filter(|e| e.local) {
        cgroups.insert(e.name.clone(), root.child(&e.name)?);
    }
    let bundle = write_bundle(&entities, &root.relative_str(), STANDARD_POLICIES)?;
    Ok(World {
        net: 87,
        entities,
        cgroups,
        root,
        bundle,
        pins: PinDir::new(&format!("ev-{name}"))?,
    })
}

fn start(world: &World, state: &StateDir) -> Result<(Agent, AgentDirs)> {
    start_with(world, state, &[])
}

fn start_with(world: &World, state: &StateDir, extra: &[&str]) -> Result<(Agent, AgentDirs)> {
    let mut cfg = state.configure(world.agent_config());
    cfg.extra_args.extend(extra.iter().map(|a| a.to_string()));
    // The whole burst fits in the kernel's ring buffer: this test is about the socket.
    cfg.ring_buffer_bytes = Some(32 << 20);
    // One event per deny (aggregation off): the burst repeats the same three calls, which
    // aggregation would fold into summaries; this test counts each call's event on the socket.
    cfg.events_aggregate = Some("0".into());
    let dirs = state.dirs(&cfg);
    Ok((Agent::start(cfg)?, dirs))
}

/// `enforcer events --follow -o json --queue 16384 FILTER...` writing to `out`. The queue
/// holds the whole burst (3 x 1,500 denies): a follower descheduled while the burst arrives
/// (a busy CI machine) then misses nothing, so the exact counts below do not depend on how
/// fast it is scheduled; the stalled consumer keeps the default queue and must miss some.
fn follower(dirs: &AgentDirs, filter: &[&str], out: &Path) -> Result<ChildGuard> {
    let file = std::fs::File::create(out)?;
    let child = Command::new(enforcer_bin())
        .args(["events", "--follow", "-o", "json", "--queue", "16384"])
        .args(filter)
        .args(dirs.args())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .context("spawning enforcer events")?;
    Ok(ChildGuard::new(child))
}

fn json_lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?}")))
        .collect()
}

fn seqs(events: &[Value]) -> BTreeSet<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

#[test]
fn followers_get_exactly_their_events_and_a_stalled_one_is_told_what_it_missed() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("follow")?;
    let state = StateDir::new()?;
    let (agent, dirs) = start(&world, &state)?;
    let out = TempDir::new("ev-follow-out")?;
    let filters: [(&str, &[&str]); 3] = [
        ("gateway", &["--workload", "acme-gateway"]),
        ("initech", &["--tenant", "initech", "--verdict", "deny"]),
        (
            "to-acme",
            &["--type", "connection.denied", "--to", "acme-vectors"],
        ),
    ];
    let mut followers = Vec::new();
    for (name, filter) in &filters {
        followers.push(follower(&dirs, filter, &out.path().join(name))?);
    }
    // The stalled consumer: asks for everything, then reads nothing until the burst is over.
    let mut stalled = UnixStream::connect(state.path().join("events.sock"))?;
    stalled.write_all(b"{\"follow\":true}\n")?;
    // A consumer gets the history and then follows, under one lock: whenever the agent
    // takes these connections, every event from seq 1 is theirs.

    let file = burst(&world, &agent)?;
    let total = 3 * PER_CGROUP as usize;
    let denies = file.iter().filter(|e| e["verdict"] == "deny").count();
    ensure!(
        denies == total,
        "{denies} denies in the file, expected {total}"
    );

    let predicates: [&dyn Fn(&Value) -> bool; 3] = [
        &|e| e["subject"]["workload"] == "acme-gateway",
        &|e| e["subject"]["tenant"] == "initech" && e["verdict"] == "deny",
        &|e| e["type"] == "connection.denied" && e["destination"]["name"] == "acme-vectors",
    ];
    for ((name, _), want) in filters.iter().zip(predicates) {
        let expected: BTreeSet<u64> =
            seqs(&file.iter().filter(|e| want(e)).cloned().collect::<Vec<_>>());
        ensure!(
            expected.len() >= PER_CGROUP as usize,
            "{name}: {} expected",
            expected.len()
        );
        let path = out.path().join(name);
        let mut got = Vec::new();
        wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            got = json_lines(&path).unwrap_or_default();
            got.len() >= expected.len()
        });
        ensure!(
            got.len() == expected.len(),
            "{name}: {} lines, {} expected",
            got.len(),
            expected.len()
        );
        ensure!(
            seqs(&got) == expected,
            "{name}: another seq set than the file's"
        );
    }
    drop(followers);

    // The stalled consumer reads now: its queue, then what it missed, told in-band; every
    // event after it connected is either received or inside a dropped range, none twice.
    let want: BTreeSet<u64> = seqs(&file);
    stalled.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stalled);
    let (mut received, mut dropped) = (BTreeSet::new(), 0u64);
    let mut dropped_lines = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let covered = received.iter().filter(|s| want.contains(s)).count() as u64 + dropped;
        if covered >= want.len() as u64 {
            break;
        }
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("the agent closed the stalled consumer");
        }
        let v: Value = serde_json::from_str(&line)?;
        if v["type"] == "events.dropped" {
            let (count, first, last) = (
                v["count"].as_u64().unwrap(),
                v["first_seq"].as_u64().unwrap(),
                v["last_seq"].as_u64().unwrap(),
            );
            ensure!(
                count > 0 && first <= last && last - first + 1 >= count,
                "{v}"
            );
            dropped += count;
            dropped_lines += 1;
        } else {
            let seq = v["seq"].as_u64().context("an event without seq")?;
            ensure!(received.insert(seq), "seq {seq} twice");
        }
    }
    ensure!(
        dropped_lines > 0 && dropped > 0,
        "the stalled consumer was never told it missed events ({} received)",
        received.len()
    );
    let got = received.iter().filter(|s| want.contains(s)).count() as u64;
    ensure!(
        got + dropped == want.len() as u64,
        "received {got} + dropped {dropped} != {} emitted",
        want.len()
    );
    eprintln!(
        "stalled consumer: {got} received, {dropped} missed in {dropped_lines} events.dropped lines, of {}",
        want.len()
    );
    // And the file lost nothing: seqs are contiguous from 1.
    let all = seqs(&file);
    ensure!(
        all.len() as u64 == *all.last().unwrap(),
        "gaps in the events file's seqs"
    );
    Ok(())
}

/// The burst of `PER_CGROUP` denies from each of three cgroups; returns the events file once
/// it holds all of them (and the kernel lost none).
fn burst(world: &World, agent: &Agent) -> Result<Vec<Value>> {
    let calls = [
        (
            "acme-gateway",
            attempt("tcp", world.entity("globex-vectors").ip(false), 6333),
        ),
        (
            "initech-trainer",
            attempt("tcp", world.entity("acme-vectors").ip(false), 6333),
        ),
        (
            "globex-retriever",
            attempt("tcp", world.entity("acme-vectors").ip(false), 6333),
        ),
    ];
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = calls
            .iter()
            .map(|(from, call)| {
                let cgroup = world.cgroup(from);
                s.spawn(move || {
                    Probe::new()
                        .in_cgroup(cgroup)
                        .timeout(Duration::from_secs(120))
                        .repeat(PER_CGROUP, call)
                })
            })
            .collect();
        for h in handles {
            let summary = h.join().expect("probe thread")?;
            ensure!(
                summary.eperm == PER_CGROUP,
                "every call refused: {summary:?}"
            );
        }
        Ok(())
    })?;
    let total = 3 * PER_CGROUP as usize;
    let arrived = wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
        agent.verdict_events().map(|e| e.len()).unwrap_or(0) >= total
    });
    ensure!(
        arrived,
        "the events file never had {total} denies:\n{}",
        agent.stderr_tail()
    );
    let file = agent.events()?;
    ensure!(
        !file.iter().any(|e| e["type"] == "events.lost"),
        "the kernel lost events: the ring buffer is too small for this test"
    );
    Ok(file)
}

/// Whether process `pid` maps the agent's followers' ring.
fn maps_the_ring(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|maps| maps.contains("enforcer-events-ring"))
}

#[test]
fn followers_of_everything_share_the_ring_and_a_stopped_one_is_told_what_it_missed() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("ring")?;
    let state = StateDir::new()?;
    // A ring of 2 MiB: the burst's 4,500 JSON lines (about 3 MiB) go round it.
    let (agent, dirs) = start_with(&world, &state, &["--events-follow-buffer", "2M"])?;
    let out = TempDir::new("ev-ring-out")?;
    let spawn = |name: &str| -> Result<ChildGuard> {
        let child = Command::new(enforcer_bin())
            .args(["events", "--follow", "-o", "json"])
            .args(dirs.args())
            .stdout(std::fs::File::create(out.path().join(name))?)
            .stderr(std::fs::File::create(
                out.path().join(format!("{name}.err")),
            )?)
            .spawn()
            .context("spawning enforcer events")?;
        Ok(ChildGuard::new(child))
    };
    let reader = spawn("reader")?;
    let stopped = spawn("stopped")?;
    let mapped = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        maps_the_ring(reader.id()) && maps_the_ring(stopped.id())
    });
    ensure!(mapped, "the followers never mapped the ring");
    // SAFETY: signals to our own children, not yet waited for.
    unsafe { libc::kill(stopped.id() as i32, libc::SIGSTOP) };
    let file = burst(&world, &agent)?;
    let want = seqs(&file);
    ensure!(
        want.len() as u64 == *want.last().unwrap(),
        "gaps in the events file's seqs"
    );

    // The reader: every event of the file (history, then the ring) once, in order, but for
    // what it was told it missed (only if the machine kept it off its CPU for a ring's worth).
    let (got, told) = covers(&out.path().join("reader"), &want)?;
    eprintln!(
        "reader: {got} received, {told} told missed, of {}",
        want.len()
    );
    // The stopped one, once it runs again, likewise; it must have been lapped.
    unsafe { libc::kill(stopped.id() as i32, libc::SIGCONT) };
    let (received, missed) = covers(&out.path().join("stopped"), &want)?;
    ensure!(
        missed > 0,
        "the stopped follower was never told it missed events"
    );
    eprintln!(
        "stopped follower: {received} received, {missed} told missed, of {}",
        want.len()
    );
    Ok(())
}

/// `n` denied calls from acme-gateway to globex-vectors, and the agent's events file once
/// it holds them all.
fn denies(world: &World, agent: &Agent, n: u64) -> Result<Vec<Value>> {
    let call = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let summary = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(Duration::from_secs(60))
        .repeat(n, &call)?;
    ensure!(summary.eperm == n, "every call refused: {summary:?}");
    let arrived = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        agent.verdict_events().map(|e| e.len()).unwrap_or(0) >= n as usize
    });
    ensure!(arrived, "the events file never had {n} denies");
    agent.events()
}

/// A follower outlives its agent: `enforcer events --follow` whose agent stops connects
/// again by itself once a new agent answers (same pins, same state directory) and goes on
/// from the new agent's first event. It has every deny of both agents' files once, in order
/// (the new agent numbers its events from 1 again), and says on stderr that it followed
/// again; it did not exit.
#[test]
fn a_follower_follows_the_restarted_agent() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("again")?;
    let state = StateDir::new()?;
    let (mut first, dirs) = start(&world, &state)?;
    let out = TempDir::new("ev-again-out")?;
    let mut follower = ChildGuard::new(
        Command::new(enforcer_bin())
            .args(["events", "--follow", "-o", "json"])
            .args(dirs.args())
            .stdout(std::fs::File::create(out.path().join("follower"))?)
            .stderr(std::fs::File::create(out.path().join("follower.err"))?)
            .spawn()
            .context("spawning enforcer events")?,
    );
    let mapped = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        maps_the_ring(follower.id())
    });
    ensure!(mapped, "the follower never mapped the ring");
    let before = denies(&world, &first, 20)?;
    first.stop()?;
    let (second, _) = start(&world, &state)?;
    let after = denies(&world, &second, 30)?;
    let deny_lines = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["type"] == "connection.denied")
            .cloned()
            .collect()
    };
    let want: Vec<Value> = deny_lines(&before)
        .into_iter()
        .chain(deny_lines(&after))
        .collect();
    let path = out.path().join("follower");
    let mut got = Vec::new();
    let complete = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        got = deny_lines(&json_lines(&path).unwrap_or_default());
        got.len() >= want.len()
    });
    ensure!(
        complete && got == want,
        "the follower got {} denies, the two files hold {}: {got:#?}",
        got.len(),
        want.len()
    );
    ensure!(
        follower.child().try_wait()?.is_none(),
        "the follower exited"
    );
    let said = std::fs::read_to_string(out.path().join("follower.err"))?;
    ensure!(said.contains("the agent ended the stream"), "{said}");
    ensure!(said.contains("restarted"), "{said}");
    Ok(())
}

/// Waits until the follower writing `path` has had every event of `want` or been told it
/// missed it; checks that each came exactly once, in order, and returns (received, told
/// missed).
fn covers(path: &Path, want: &BTreeSet<u64>) -> Result<(usize, u64)> {
    let last = *want.last().unwrap();
    let (mut received, mut missed) = (Vec::new(), Vec::new());
    wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let lines = json_lines(path).unwrap_or_default();
        received = lines.iter().filter_map(|e| e["seq"].as_u64()).collect();
        missed = lines
            .iter()
            .filter(|e| e["type"] == "events.dropped")
            .map(|e| {
                (
                    e["first_seq"].as_u64().unwrap(),
                    e["last_seq"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>();
        received.last() >= Some(&last) || missed.last().is_some_and(|m| m.1 >= last)
    });
    ensure!(
        received.windows(2).all(|w| w[0] < w[1]),
        "{}: out of order or twice",
        path.display()
    );
    let mut covered = received.clone();
    for &(first, last) in &missed {
        covered.extend(first..=last);
    }
    covered.retain(|&seq| seq <= last);
    covered.sort();
    ensure!(
        covered == want.iter().copied().collect::<Vec<_>>(),
        "{}: received {} + missed {missed:?} do not cover the file's {} events exactly",
        path.display(),
        received.len(),
        want.len()
    );
    let told = missed.iter().map(|(first, last)| last - first + 1).sum();
    Ok((received.iter().filter(|&&seq| seq <= last).count(), told))
}

fn events(dirs: &AgentDirs, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(enforcer_bin())
        .arg("events")
        .args(args)
        .args(dirs.args())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn history_since_bad_filters_and_a_user_who_is_not_root() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("hist")?;
    let state = StateDir::new()?;
    let (agent, dirs) = start(&world, &state)?;
    let cross = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let probe = || -> Result<()> {
        let s = Probe::new()
            .in_cgroup(world.cgroup("acme-gateway"))
            .repeat(5, &cross)?;
        ensure!(s.eperm == 5, "{s:?}");
        Ok(())
    };
    probe()?;
    ensure!(
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            agent.verdict_events().map(|e| e.len()).unwrap_or(0) >= 5
        }),
        "no denies in the file"
    );
    // History: the 5 denies, as JSON (piped), and the policy.applied notice by type.
    let (ok, out, err) = events(
        &dirs,
        &["--workload", "acme-gateway", "--atlas", "AML.T0085"],
    )?;
    ensure!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        lines.len() == 5 && lines.iter().all(|l| l["verdict"] == "deny"),
        "{out}"
    );
    let (ok, out, err) = events(&dirs, &["--type", "policy.applied", "-o", "ocsf"])?;
    ensure!(ok && out.lines().count() >= 1, "{out}{err}");
    ensure!(out.contains("\"class_uid\""), "OCSF output: {out}");
    let (ok, out, _) = events(&dirs, &["--workload", "acme-gateway", "-o", "compact"])?;
    ensure!(
        ok && out.lines().all(|l| l.contains(
            "acme-gateway -> globex-vectors:6333 tenant_mismatch tenant-isolation [AML.T0085.000]"
        )),
        "{out}"
    );

    // --since: the agent's clock decides. The first burst gets older than 8 s, so that a
    // 4 s window leaves it out by 4 s and takes in the second burst, probes and the
    // command's start included, with 4 s to spare.
    let t0 = Instant::now();
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        t0.elapsed() > Duration::from_secs(8)
    });
    probe()?;
    ensure!(wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || { agent.verdict_events().map(|e| e.len()).unwrap_or(0) >= 10 }
    ));
    let (ok, out, err) = events(&dirs, &["--since", "4s", "--verdict", "deny"])?;
    ensure!(ok, "{err}");
    ensure!(
        out.lines().count() == 5,
        "--since 4s: only the second burst:\n{out}"
    );
    let (_, out, _) = events(&dirs, &["--since", "10m", "--verdict", "deny"])?;
    ensure!(
        out.lines().count() == 10,
        "--since 10m: both bursts:\n{out}"
    );

    // Bad filters: refused, the option named.
    for (args, option) in [
        (&["--verdict", "refused"][..], "--verdict"),
        (&["--reason", "nope"], "--reason"),
        (&["--type", "connection.blocked"], "--type"),
        (&["--atlas", "T0085"], "--atlas"),
        (&["--since", "ten minutes"], "--since"),
    ] {
        let (ok, _, err) = events(&dirs, args)?;
        ensure!(!ok && err.contains(option), "{args:?}: {err}");
    }

    // nobody (uid 65534) is refused: the socket is root's, mode 0600.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.path().join("events.sock"))?.permissions(),
    );
    ensure!(mode & 0o777 == 0o600, "socket mode {mode:o}");
    let out = as_nobody(&dirs, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "nobody read the stream: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        err.contains("events socket")
            || err.contains("Permission denied")
            || err.contains("permission denied"),
        "{err}"
    );
    Ok(())
}

/// `enforcer events ARGS` as nobody (uid and gid 65534, no supplementary groups).
fn as_nobody(dirs: &AgentDirs, args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = Command::new(enforcer_bin());
    cmd.arg("events").args(args).args(dirs.args());
    // SAFETY: setgroups/setgid/setuid only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.output()?)
}

const NOBODY: u32 = 65534;

#[test]
fn events_group_grants_its_members_read_access() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world("group")?;
    let state = StateDir::new()?;
    let mut cfg = state.configure(world.agent_config());
    cfg.extra_args
        .extend(["--events-group".to_string(), NOBODY.to_string()]);
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    // The ready file may come before the first `policy.applied` reaches the history.
    first_applied_snapshot(&agent)?;
    // nobody must reach the socket: the test's own state dir is opened for traversal.
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    let socket = std::fs::metadata(state.path().join("events.sock"))?;
    ensure!(
        std::os::unix::fs::MetadataExt::gid(&socket) == NOBODY
            && std::os::unix::fs::PermissionsExt::mode(&socket.permissions()) & 0o777 == 0o660,
        "socket {socket:?}"
    );
    let out = as_nobody(&dirs, &["--type", "policy.applied"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        !lines.is_empty() && lines.iter().all(|l| l["type"] == "policy.applied"),
        "{stdout}"
    );
    Ok(())
}

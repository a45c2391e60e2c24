//! `enforcer-bench events`: the event pipeline's speed (issue 8, "Speed"), from the kernel's
//! ring buffer to the events file, with the release agent (`enforcer run`) as deployed.
//!
//! (a) Deny events per second written as JSON lines, then as OCSF, with aggregation off
//!     (`--events-aggregate 0`: each deny is one event) under a flood from one process looping
//!     `connect()` to a denied address for [`FLOOD`]. Loss is counted exactly: the flood's
//!     refused calls = events written (`enforcer_events_total{type="connection.denied"}`) +
//!     the kernel's `enforcer_kernel_events_lost_total`. The rate is given two ways: written
//!     per second of wall time (bounded by the flood on a shared machine) and per second of
//!     the agent's own CPU (`usage_usec` of a cgroup holding the agent alone: `/proc/PID/stat`
//!     counts in ticks of 10 ms, ±3 % of a turn's 0.3 s), which is what the agent can sustain
//!     on a core of its own. The agent runs on a CPU of its own, the flood, the
//!     followers and the bench on the other (with two CPUs or more).
//! (b) Aggregation on (the default `1s`): the same flood for [`QUIET_FLOOD`] while a second
//!     workload makes one denied call a second; the agent's CPU as a fraction of a core, and
//!     whether every one of the quiet workload's denies was reported (the `count`s of its
//!     lines add up to its calls).
//! (c) (a) in JSON again with 3 `enforcer events --follow` consumers reading everything
//!     (they read the agent's shared ring); each must have received every deny or been told
//!     it missed it. (a) JSON and (c) run in turn [`COST_ROUNDS`] times with the flood held
//!     at [`COST_RATE`] calls a second in both; the followers' cost is one less the ratio of
//!     the medians of their rates per agent CPU second. A (c) turn is measured once every
//!     follower is connected (the steady cost); making the ring, once, is timed apart.
//!
//! Needs root; uses 127.92.0.0/16 only. Everything it makes (cgroups, pins, the agent, the
//! consumers, the files) is removed at the end, also on error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Flood length for (a) and (c).
const FLOOD: Duration = Duration::from_secs(4);
/// Flood length for (b): the quiet workload calls once a second meanwhile.
const QUIET_FLOOD: Duration = Duration::from_secs(10);
/// The denied destination (tenant `globex`) and the agent's metrics address.
const TARGET: Ipv4Addr = Ipv4Addr::new(127, 92, 0, 2);
const METRICS: &str = "127.92.0.1:19464";
/// Followers in (c).
const FOLLOWERS: usize = 3;
/// Turns of (a) JSON and (c) for the followers' cost.
const COST_ROUNDS: usize = 7;
/// The flood's rate in those turns: below what it reaches with three followers on its core
/// (80,000-89,000 calls a second here), so that both see the same rate.
const COST_RATE: u64 = 75_000;

/// The hidden subcommand the flood runs as (a child process, moved into a workload's cgroup
/// before exec): `enforcer-bench __flood SECS INTERVAL_MS` loops `connect()` to [`TARGET`]
/// (every INTERVAL_MS, or back to back with 0) and prints how many calls were refused.
pub const FLOOD_COMMAND: &str = "__flood";

pub fn flood_main(args: &[String]) -> Result<()> {
    let secs: f64 = args.first().context("__flood SECS INTERVAL_MS")?.parse()?;
    let interval: u64 = args.get(1).context("__flood SECS INTERVAL_MS")?.parse()?;
    // Calls per second at most (0: as fast as it can).
    let rate: f64 = args.get(2).map_or(Ok(0.0), |r| r.parse())?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let (mut refused, mut other) = (0u64, 0u64);
    let target = SocketAddrV4::new(TARGET, 9);
    while Instant::now() < end {
        match TcpStream::connect(target) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
            _ => other += 1,
        }
        if interval > 0 {
            std::thread::sleep(Duration::from_millis(interval));
        }
        if rate > 0.0 {
            let due = Duration::from_secs_f64((refused + other) as f64 / rate);
            if let Some(early) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(early);
            }
        }
    }
    println!("{refused} {other}");
    Ok(())
}

/// What one section makes, removed on drop.
struct Setup {
    root: PathBuf,
    /// The agent's own cgroup, outside `root`: its CPU time, precisely.
    agent_cgroup: PathBuf,
    work: PathBuf,
    pins: PathBuf,
    agent: Option<Child>,
    followers: Vec<Child>,
    /// Per follower: (`connection.denied` lines received, events it was told it missed).
    followed: Vec<Arc<Mutex<(u64, u64)>>>,
    /// Followers that printed a line: connected, their ring (or queue) made.
    connected: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in self.followers.iter_mut().chain(self.agent.as_mut()) {
            // SAFETY: kill on the pid of our own child, not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = enforcer::datapath::detach(&self.pins);
        for name in ["flood", "quiet"] {
            let _ = std::fs::remove_dir(self.root.join(name));
        }
        let _ = std::fs::remove_dir(&self.root);
        // Empty once the agent was waited for.
        let _ = std::fs::remove_dir(&self.agent_cgroup);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn bundle(dir: &Path, relative_root: &str) -> Result<()> {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
    for entry in std::fs::read_dir(&demo)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".cedar") || name.ends_with(".cedarschema") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap()))?;
        }
    }
    let workload = |name: &str, ip: u8| {
        format!(
            "  - name: {name}\n    tenant: acme\n    purpose: retrieval\n    ring: prod\n    \
             spiffe_id: spiffe://bench/{name}\n    cgroups: [{relative_root}/{name}]\n    \
             ips: [127.92.0.{ip}/32]\n"
        )
    };
    let inventory = format!(
        "tenants: [acme, globex]\nworkloads:\n{}{}endpoints:\n  - name: target\n    \
         tenant: globex\n    kind: vector_db\n    ips: [{TARGET}/32]\n",
        workload("flood", 10),
        workload("quiet", 11),
    );
    std::fs::write(dir.join("inventory.yaml"), inventory)?;
    Ok(())
}

/// The CPU the agent runs on, and the one the flood, the followers and the bench share: the
/// rate per agent CPU second is what the agent sustains on a core of its own, and unpinned it
/// moved by a third between turns with where the scheduler put the agent (with the flood or
/// not).
const AGENT_CPU: usize = 1;
const OTHERS_CPU: usize = 0;

/// Runs `cmd`'s process on `cpu` alone (on a machine of at least two CPUs).
fn on_cpu(cmd: &mut Command, cpu: usize) {
    if !pinned() {
        return;
    }
    // SAFETY: sched_setaffinity on the child itself, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            crate::pin_to_cpu(cpu);
            Ok(())
        });
    }
}

/// Starts the agent with `args` added; waits for its ready file.
fn start(format: &str, aggregate: &str, followers: usize) -> Result<Setup> {
    let pid = std::process::id();
    let mount = enforcer::fs::cgroup2_mount()?;
    let relative = format!("enforcer-bench-events-{pid}");
    let mut setup = Setup {
        root: mount.join(&relative),
        agent_cgroup: mount.join(format!("{relative}-agent")),
        work: std::env::temp_dir().join(format!("enforcer-bench-events-{pid}")),
        pins: PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-events-{pid}")),
        agent: None,
        followers: Vec::new(),
        followed: Vec::new(),
        connected: Arc::default(),
    };
    for dir in [
        setup.root.clone(),
        setup.root.join("flood"),
        setup.root.join("quiet"),
        setup.agent_cgroup.clone(),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bundle_dir = setup.work.join("bundle");
    std::fs::create_dir_all(&bundle_dir)?;
    bundle(&bundle_dir, &relative)?;
    let exe = std::env::current_exe()?;
    let enforcer = exe.with_file_name("enforcer");
    let ready = setup.work.join("ready");
    let state = setup.work.join("state");
    let mut agent = Command::new(&enforcer);
    on_cpu(&mut agent, AGENT_CPU);
    into_cgroup(&mut agent, &setup.agent_cgroup)?;
    let agent = agent
        .args(["run", "--policies"])
        .arg(&bundle_dir)
        .args(["--cgroup-root", &relative, "--pin-path"])
        .arg(&setup.pins)
        .arg("--events")
        .arg(setup.work.join("events.log"))
        // Bounded disk: a flood writes hundreds of MB a minute.
        .args(["--events-max-bytes", "64M", "--events-keep", "1"])
        .args(["--events-format", format, "--events-aggregate", aggregate])
        .args(["--metrics", METRICS, "--ready-file"])
        .arg(&ready)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(setup.work.join("agent.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", enforcer.display()))?;
    setup.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if Instant::now() > deadline {
            bail!(
                "the agent was not ready within 60 s: {}",
                std::fs::read_to_string(setup.work.join("agent.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..followers {
        let mut child = Command::new(&enforcer);
        on_cpu(&mut child, OTHERS_CPU);
        let mut child = child
            .args(["events", "--follow", "-o", "json", "--pin-path"])
            .arg(&setup.pins)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let counts = Arc::new(Mutex::new((0, 0)));
        let stdout = child.stdout.take().context("the follower's stdout")?;
        let counted = counts.clone();
        let connected = setup.connected.clone();
        // Counts what the follower prints: every deny must reach it, or be told missed.
        std::thread::spawn(move || {
            let mut first = true;
            for line in BufReader::with_capacity(1 << 16, stdout).lines() {
                let Ok(line) = line else { break };
                if std::mem::take(&mut first) {
                    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let mut counts = counted.lock().unwrap();
                if line.contains("\"type\":\"connection.denied\"") {
                    counts.0 += 1;
                } else if line.contains("\"type\":\"events.dropped\"") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    counts.1 += v["count"].as_u64().unwrap_or(0);
                }
            }
        });
        setup.followers.push(child);
        setup.followed.push(counts);
    }
    Ok(setup)
}

impl Setup {
    /// A flood (or a slow caller) in workload `name`'s cgroup.
    fn flood(&self, name: &str, secs: f64, interval_ms: u64, rate: u64) -> Result<Child> {
        let mut cmd = Command::new(std::env::current_exe()?);
        on_cpu(&mut cmd, OTHERS_CPU);
        cmd.args([
            FLOOD_COMMAND,
            &secs.to_string(),
            &interval_ms.to_string(),
            &rate.to_string(),
        ])
        .stdout(Stdio::piped());
        into_cgroup(&mut cmd, &self.root.join(name))?;
        Ok(cmd.spawn()?)
    }
}

/// Starts `cmd`'s process in cgroup `dir`.
fn into_cgroup(cmd: &mut Command, dir: &Path) -> Result<()> {
    let procs = std::ffi::CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    // SAFETY: open/write/close only, between fork and exec, on memory made before.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
            Ok(())
        });
    }
    Ok(())
}

/// The refused calls a flood child reports.
fn refused(child: Child) -> Result<u64> {
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the flood process failed");
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("flood output")?
        .parse()?)
}

/// One metric's value from the agent's exposition (sum over the lines that match).
fn metric(exposition: &str, name: &str, label: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn scrape() -> Result<String> {
    // The metrics listener may come up a moment after the ready file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(METRICS) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e).with_context(|| format!("scraping the agent at {METRICS}")),
        }
    };
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// (events emitted as `connection.denied`, lost in the kernel).
fn counts() -> Result<(u64, u64)> {
    let text = scrape()?;
    Ok((
        metric(&text, "enforcer_events_total", "type=\"connection.denied\""),
        metric(&text, "enforcer_kernel_events_lost_total", ""),
    ))
}

/// The CPU time of what cgroup `dir` holds, in seconds (`usage_usec` of its `cpu.stat`, which
/// cgroup v2 keeps without the `cpu` controller).
fn cpu_seconds(dir: &Path) -> Result<f64> {
    let path = dir.join("cpu.stat");
    let stat =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .with_context(|| format!("no usage_usec in {}", path.display()))?
        .trim()
        .parse()?;
    Ok(usec as f64 / 1e6)
}

struct Throughput {
    refused: u64,
    written: u64,
    lost: u64,
    wall: f64,
    cpu: f64,
    /// Per follower: denies received, events told missed.
    followed: Vec<(u64, u64)>,
}

/// (a) / (c): one flood with aggregation off (`rate` calls a second at most; 0: as fast as
/// it goes); waits until every refused call is accounted.
fn throughput(format: &str, followers: usize, rate: u64) -> Result<Throughput> {
    let setup = start(format, "0", followers)?;
    // Measured once every follower is there (has printed the agent's history): the steady
    // cost of following, not the one-time making of the ring (timed apart, below).
    let deadline = Instant::now() + Duration::from_secs(30);
    while setup.connected.load(std::sync::atomic::Ordering::Relaxed) < followers {
        ensure!(
            Instant::now() < deadline,
            "the followers did not connect within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (written0, lost0) = counts()?;
    let cpu0 = cpu_seconds(&setup.agent_cgroup)?;
    let started = Instant::now();
    let refused = refused(setup.flood("flood", FLOOD.as_secs_f64(), 0, rate)?)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut written, mut lost);
    loop {
        let (w, l) = counts()?;
        (written, lost) = (w - written0, l - lost0);
        if written + lost >= refused || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&setup.agent_cgroup)? - cpu0;
    ensure!(
        written + lost == refused,
        "{refused} calls refused but {written} written + {lost} lost: not accounted exactly"
    );
    // Every follower got every deny written, or was told it missed it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let followed: Vec<(u64, u64)> = loop {
        let now: Vec<(u64, u64)> = setup.followed.iter().map(|c| *c.lock().unwrap()).collect();
        if now.iter().all(|&(got, missed)| got + missed >= written) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (i, &(got, missed)) in followed.iter().enumerate() {
        ensure!(
            got <= written && got + missed >= written,
            "follower {i}: {got} denies received + {missed} told missed, of {written} written"
        );
    }
    drop(setup);
    Ok(Throughput {
        refused,
        written,
        lost,
        wall,
        cpu,
        followed,
    })
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn row(name: &str, t: &Throughput) {
    println!(
        "| {name} | {:.0}/s | {:.0}/s | {} of {} ({:.1} %) | {:.2} | {} |",
        t.written as f64 / t.wall,
        t.written as f64 / t.cpu.max(1e-9),
        t.lost,
        t.refused,
        100.0 * t.lost as f64 / t.refused.max(1) as f64,
        t.cpu / t.wall,
        load()
    );
}

fn pinned() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

pub fn events_bench() -> Result<()> {
    if pinned() {
        crate::pin_to_cpu(OTHERS_CPU);
    }
    println!("\n## Events (ring buffer -> events file, release agent)\n");
    println!(
        "| setup | written per wall second | written per agent CPU second | lost (kernel) of \
         refused | agent CPU (cores) | load average |\n|---|---|---|---|---|---|"
    );
    let per_cpu = |t: &Throughput| t.written as f64 / t.cpu.max(1e-9);
    let ocsf = throughput("ocsf", 0, 0)?;
    row("(a) OCSF, aggregation off", &ocsf);
    let json = throughput("json", 0, 0)?;
    row("(a) JSON, aggregation off", &json);
    // (a) JSON and (c) in turn, COST_ROUNDS times, both at COST_RATE: the rate per CPU second
    // moves with the flood's own rate (how many records a turn finds), and the followers
    // share the flood's core, which slowed it by a third; the cost is the ratio of the
    // medians.
    let (mut alone, mut followed) = (Vec::new(), Vec::new());
    for _ in 0..COST_ROUNDS {
        let json = throughput("json", 0, COST_RATE)?;
        row(&format!("(a) JSON, {COST_RATE} calls/s"), &json);
        alone.push(per_cpu(&json));
        let with = throughput("json", FOLLOWERS, COST_RATE)?;
        row(
            &format!("(c) JSON, {COST_RATE} calls/s, 3 followers"),
            &with,
        );
        println!(
            "|  | each follower's denies received + told missed, of {} written: {} | | | | |",
            with.written,
            with.followed
                .iter()
                .map(|(got, missed)| format!("{got} + {missed}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        followed.push(per_cpu(&with));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each round's two turns ran a few seconds apart: their ratio cancels what drifts slower.
    let mut per_round: Vec<f64> = alone
        .iter()
        .zip(&followed)
        .map(|(a, f)| 100.0 * (1.0 - f / a))
        .collect();
    let (alone, followed) = (median(&mut alone), median(&mut followed));
    let paired = median(&mut per_round);
    println!(
        "\n(a) JSON median {alone:.0}/s, (c) median {followed:.0}/s per agent CPU second: cost \
         of {FOLLOWERS} followers {:.1} % (target < 10 %); median of the rounds' own costs \
         {paired:.1} % (rounds {:.1} to {:.1} %)",
        100.0 * (1.0 - followed / alone),
        per_round[0],
        per_round[per_round.len() - 1]
    );

    // The one-time cost the turns above leave out: making the ring when the first follower
    // comes (its pages all made at once), as the agent does, in this process.
    let mut made = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let ring = enforcer::events::ring::Ring::new(enforcer::events::ring::DEFAULT_CAPACITY, 1)?;
        made.push(started.elapsed().as_secs_f64() * 1e3);
        drop(ring);
    }
    let made_ms = median(&mut made);
    println!(
        "making the followers' ring ({} MiB, its pages made at once; once, when the first \
         follower comes, outside the hub's lock): median {made_ms:.1} ms of 5",
        enforcer::events::ring::DEFAULT_CAPACITY >> 20
    );

    // (b)
    let setup = start("json", "1s", 0)?;
    let cpu0 = cpu_seconds(&setup.agent_cgroup)?;
    let started = Instant::now();
    let flood = setup.flood("flood", QUIET_FLOOD.as_secs_f64(), 0, 0)?;
    let quiet = setup.flood("quiet", QUIET_FLOOD.as_secs_f64() - 0.5, 1000, 0)?;
    let flooded = refused(flood)?;
    let quiet_calls = refused(quiet)?;
    let cpu = (cpu_seconds(&setup.agent_cgroup)? - cpu0) / started.elapsed().as_secs_f64();
    // Summaries come a whole window after their window: wait for the quiet ones.
    let file = setup.work.join("events.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let quiet_reported = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let reported: u64 = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["subject"]["workload"] == "quiet" && v["verdict"] == "deny")
            .map(|v| v["count"].as_u64().unwrap_or(1))
            .sum();
        if reported >= quiet_calls || Instant::now() > deadline {
            break reported;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "\n(b) aggregation on, {:.0} s flood ({flooded} refused calls, {:.0}/s) while another \
         workload made {quiet_calls} denied calls: agent CPU {cpu:.2} of a core (target < 0.5); \
         the other workload's denies reported: {quiet_reported} of {quiet_calls}; load average {}",
        QUIET_FLOOD.as_secs_f64(),
        flooded as f64 / QUIET_FLOOD.as_secs_f64(),
        load()
    );
    Ok(())
}

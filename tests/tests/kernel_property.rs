//! Issue 3, "How it is shown": for generated inventories and policy sets, real connects agree
//! with Cedar.
//!
//! For each seed, a random bundle ([`enforcer_tests::generated`]: 3 tenants, 5-8 workloads,
//! 1-3 endpoints, 3-6 policies from templates, over the demo schema) is written on its own
//! loopback net `127.<50 + i>.0.0/16`, checked to load, and enforced by a real agent. The test
//! samples cells (local workload x destination x port x protocol, including any-port
//! destinations, ports a destination does not declare, and WORLD), half allowed and half denied
//! by Cedar where possible, and tries each from inside the subject's cgroup: TCP connect, and
//! for UDP both an unconnected `sendto` (the sendmsg hook) and a connected socket (the connect
//! hook). Every probe outcome must equal `Bundle::decide(..).allowed` (ok vs EPERM), every
//! denied attempt must have exactly one deny event (subject, destination, port, protocol,
//! hook) attributed to one of the oracle's determining forbids (or `implicit-deny` /
//! `undeclared-port`), and no allowed attempt any. Destinations without declared ports
//! (WORLD included) are always tried on both sides of every `context.port` literal of the
//! policies (one random subject each, TCP and UDP), where the kernel's any-port entry and
//! its exact-port exceptions meet.
//!
//! Seeds run in parallel (one agent each). `ENFORCER_PROPERTY_SEEDS=7,8` or `=100..110` picks
//! other seeds (at most 10 at a time: one net each), `ENFORCER_PROPERTY_CELLS=N` the sample size
//! per seed (`0`: every cell).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enforcer_policy::{Bundle, Decision, Effect, Protocol};
use enforcer_tests::fixtures::event_matches;
use enforcer_tests::generated::{GeneratedBundle, Lcg, Target, TargetKind};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, Outcome, PinDir, Probe, Server, TestCgroup,
};

const DEFAULT_SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
/// Nets 50..=59 are this test's; one per seed running at a time.
const FIRST_NET: u8 = 50;
const MAX_SEEDS: usize = 10;
const DEFAULT_CELLS: usize = 80;

fn protocol(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

fn seeds() -> Result<Vec<u64>> {
    let Ok(spec) = std::env::var("ENFORCER_PROPERTY_SEEDS") else {
        return Ok(DEFAULT_SEEDS.to_vec());
    };
    let seeds: Vec<u64> = if let Some((a, b)) = spec.split_once("..") {
        let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
        (a..b).collect()
    } else {
        spec.split(',')
            .map(|s| s.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("ENFORCER_PROPERTY_SEEDS={spec:?}"))?
    };
    ensure!(
        !seeds.is_empty() && seeds.len() <= MAX_SEEDS,
        "ENFORCER_PROPERTY_SEEDS={spec:?}: 1 to {MAX_SEEDS} seeds (one loopback net each)"
    );
    Ok(seeds)
}

fn cells_per_seed() -> Result<usize> {
    match std::env::var("ENFORCER_PROPERTY_CELLS") {
        Ok(v) => {
            let n: usize = v.trim().parse().context("ENFORCER_PROPERTY_CELLS")?;
            Ok(if n == 0 { usize::MAX } else { n })
        }
        Err(_) => Ok(DEFAULT_CELLS),
    }
}

/// One (subject, target) cell with Cedar's answer.
#[derive(Debug, Clone)]
struct Cell {
    from: String,
    target: Target,
    decision: Decision,
}

impl Cell {
    fn label(&self) -> String {
        let t = &self.target;
        format!(
            "{} -> {} {}:{} {} ({:?})",
            self.from,
            t.to,
            t.ip,
            t.port,
            t.proto.as_str(),
            t.kind
        )
    }

    fn oracle(&self) -> String {
        let d = &self.decision;
        let ids: Vec<String> = d
            .policies
            .iter()
            .map(|p| format!("{} {} (line {})", p.effect, p.id, p.line))
            .collect();
        format!(
            "{} (action `{}`{}{}; determining: [{}])",
            if d.allowed { "allow" } else { "deny" },
            d.action,
            if d.any_port { ", any-port cell" } else { "" },
            if d.undeclared_port {
                ", undeclared port"
            } else {
                ""
            },
            ids.join(", ")
        )
    }

    /// The `policy.id` a deny event may carry: one of the determining forbids, else the
    /// implicit reason.
    fn acceptable_policy_ids(&self) -> BTreeSet<String> {
        let forbids: BTreeSet<String> = self
            .decision
            .policies
            .iter()
            .filter(|p| p.effect == Effect::Forbid)
            .map(|p| p.id.clone())
            .collect();
        if !forbids.is_empty() {
            forbids
        } else if self.decision.undeclared_port {
            ["undeclared-port".to_string()].into()
        } else {
            ["implicit-deny".to_string()].into()
        }
    }
}

/// One attempt: a cell tried through one hook.
struct Row {
    cell: usize,
    /// Probe attempt kind: `tcp`, `udp` or `udpc`.
    kind: &'static str,
    hook: &'static str,
    outcome: Option<Outcome>,
    errno: i32,
}

/// Every cell of `generated` with Cedar's answer.
fn all_cells(generated: &GeneratedBundle, oracle: &Bundle) -> Result<Vec<Cell>> {
    let targets = generated.targets();
    let mut cells = Vec::new();
    for s in generated.subjects() {
        for t in targets.iter().filter(|t| t.to != s.name) {
            let decision = oracle
                .decide(&s.name, &t.to, t.port, protocol(t.proto))
                .with_context(|| format!("oracle for {} -> {t:?}", s.name))?;
            cells.push(Cell {
                from: s.name.clone(),
                target: t.clone(),
                decision,
            });
        }
    }
    Ok(cells)
}

/// One cell of every edge target (a port next to a `context.port` literal on a destination
/// without declared ports, from a random subject), then up to `n` more cells, alternately
/// allowed and denied by Cedar (while both last); deterministic per seed.
fn sample(cells: Vec<Cell>, n: usize, seed: u64) -> Vec<Cell> {
    let mut r = Lcg::new(seed ^ 0x005a_4d50_4c45);
    let (mut edges, rest): (Vec<Cell>, Vec<Cell>) = cells.into_iter().partition(|c| c.target.edge);
    r.shuffle(&mut edges);
    let mut seen = BTreeSet::new();
    let mut out: Vec<Cell> = Vec::new();
    let mut others = rest;
    for c in edges {
        let t = &c.target;
        if seen.insert((t.to.clone(), t.port, t.proto.as_str())) {
            out.push(c);
        } else if n == usize::MAX {
            others.push(c);
        }
    }
    let n = n.saturating_add(out.len());
    let (mut allowed, mut denied): (Vec<Cell>, Vec<Cell>) =
        others.into_iter().partition(|c| c.decision.allowed);
    r.shuffle(&mut allowed);
    r.shuffle(&mut denied);
    let (mut allowed, mut denied) = (allowed.into_iter(), denied.into_iter());
    while out.len() < n {
        let (a, d) = (allowed.next(), denied.next());
        if a.is_none() && d.is_none() {
            break;
        }
        out.extend(a);
        if out.len() < n {
            out.extend(d);
        }
    }
    out
}

/// What one seed showed.
#[derive(Default)]
struct SeedReport {
    net: u8,
    /// The diagnostics when the generated bundle was rejected.
    rejected: Option<String>,
    cells: usize,
    sampled: usize,
    attempts: usize,
    /// (allowed by Cedar, probe kind, target kind) -> attempts.
    coverage: BTreeMap<(bool, &'static str, TargetKind), usize>,
    /// Non-empty: the kernel disagreed; the full story, ready to print.
    failure: Option<String>,
    elapsed: Duration,
}

fn run_seed(seed: u64, net: u8, n: usize) -> Result<SeedReport> {
    let started = Instant::now();
    let mut report = SeedReport {
        net,
        ..Default::default()
    };
    let generated = GeneratedBundle::new(seed, net);

    // Drop order (reverse of declaration): agent, pins, servers, bundle, cgroups, root.
    let root = TestCgroup::create(unique_name("enforcer-prop"))?;
    let root_rel = root.relative_str();
    let mut cgroups = BTreeMap::new();
    for s in generated.subjects() {
        cgroups.insert(s.name.clone(), root.child(&s.name)?);
    }
    let bundle = generated.write(&root_rel)?;
    let text = generated.text(&root_rel);
    let oracle = match Bundle::load(bundle.path()) {
        Ok(b) => b,
        Err(d) => {
            report.rejected = Some(format!("{d}\n{text}"));
            return Ok(report);
        }
    };

    let cells = all_cells(&generated, &oracle)?;
    report.cells = cells.len();
    let cells = sample(cells, n, seed);
    report.sampled = cells.len();

    let mut rows = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let kinds: &[(&'static str, &'static str)] = match c.target.proto {
            Proto::Tcp => &[("tcp", "connect4")],
            Proto::Udp => &[("udp", "sendmsg4"), ("udpc", "connect4")],
        };
        for &(kind, hook) in kinds {
            rows.push(Row {
                cell: i,
                kind,
                hook,
                outcome: None,
                errno: 0,
            });
        }
    }
    report.attempts = rows.len();

    let mut servers = Vec::new();
    let mut bound = BTreeSet::new();
    for t in generated.targets() {
        if bound.insert((t.ip, t.port, t.proto.as_str())) {
            servers.push(Server::start(
                t.proto,
                SocketAddr::new(IpAddr::V4(t.ip), t.port),
            )?);
        }
    }

    let pins = PinDir::new("enforcer-prop")?;
    let agent = Agent::start(AgentConfig::new(bundle.path(), &root_rel, pins.path()))
        .with_context(|| format!("seed {seed}: agent start\n{text}"))?;

    // One probe process per subject, all of its attempts in its cgroup.
    for (name, cg) in &cgroups {
        let mine: Vec<usize> = (0..rows.len())
            .filter(|&i| &cells[rows[i].cell].from == name)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let attempts: Vec<String> = mine
            .iter()
            .map(|&i| {
                let t = &cells[rows[i].cell].target;
                attempt(rows[i].kind, IpAddr::V4(t.ip), t.port)
            })
            .collect();
        let results = Probe::new()
            .in_cgroup(cg)
            .run(&attempts)
            .with_context(|| format!("seed {seed}: probe as {name}"))?;
        for (&i, r) in mine.iter().zip(results) {
            rows[i].outcome = Some(r.outcome);
            rows[i].errno = r.errno;
        }
    }

    let is_deny = |e: &serde_json::Value| e.get("verdict").and_then(|v| v.as_str()) == Some("deny");
    let denied = rows
        .iter()
        .filter(|r| !cells[r.cell].decision.allowed)
        .count();
    // Wait for the events of every denied attempt, then a quiet moment to catch extras.
    let _ = agent.wait_for(denied, Duration::from_secs(20), is_deny);
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;

    let mut problems = Vec::new();
    let mut matched = 0;
    for r in &rows {
        let c = &cells[r.cell];
        let t = &c.target;
        let allowed = c.decision.allowed;
        *report
            .coverage
            .entry((allowed, r.kind, t.kind))
            .or_default() += 1;
        let want = if allowed { Outcome::Ok } else { Outcome::Eperm };
        let label = format!("{} via {} ({})", c.label(), r.hook, r.kind);
        if r.outcome != Some(want) {
            problems.push(format!(
                "{label}: probe saw {:?} (errno {}), Cedar: {}",
                r.outcome,
                r.errno,
                c.oracle()
            ));
        }
        let mine: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| event_matches(e, &c.from, &t.to, t.port, t.proto))
            .filter(|e| e.get("hook").and_then(|h| h.as_str()) == Some(r.hook))
            .collect();
        matched += mine.len();
        let want_events = usize::from(!allowed);
        if mine.len() != want_events {
            problems.push(format!(
                "{label}: {} deny events, want {want_events}; Cedar: {}",
                mine.len(),
                c.oracle()
            ));
        } else if let Some(e) = mine.first() {
            let id = e.pointer("/policy/id").and_then(|v| v.as_str());
            let ok = c.acceptable_policy_ids();
            if !id.is_some_and(|id| ok.contains(id)) {
                problems.push(format!(
                    "{label}: deny event attributed to {id:?}, want one of {ok:?}; Cedar: {}",
                    c.oracle()
                ));
            }
        }
    }
    let deny_events = events.iter().filter(|e| is_deny(e)).count();
    if deny_events != matched {
        let extra: Vec<String> = events
            .iter()
            .filter(|e| is_deny(e))
            .map(|e| e.to_string())
            .collect();
        problems.push(format!(
            "{deny_events} deny events, {matched} of them match an attempt; all deny events:\n    {}",
            extra.join("\n    ")
        ));
    }

    if !problems.is_empty() {
        let mut f = String::new();
        let _ = writeln!(
            f,
            "seed {seed} (net {net}): {} problems over {} attempts ({} cells sampled of {}):",
            problems.len(),
            rows.len(),
            cells.len(),
            report.cells
        );
        for p in &problems {
            let _ = writeln!(f, "  {p}");
        }
        let _ = writeln!(
            f,
            "reproduce: ENFORCER_PROPERTY_SEEDS={seed} ENFORCER_PROPERTY_CELLS=0 cargo test -p enforcer-tests --test kernel_property"
        );
        let _ = writeln!(f, "--- bundle ---\n{text}");
        let _ = writeln!(f, "--- agent stderr (tail) ---\n{}", agent.stderr_tail());
        report.failure = Some(f);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[test]
fn kernel_agrees_with_cedar_on_generated_bundles() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let seeds = seeds()?;
    let n = cells_per_seed()?;
    let started = Instant::now();
    let results: Vec<(u64, Result<SeedReport>)> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .enumerate()
            .map(|(i, &seed)| {
                let net = FIRST_NET + i as u8;
                let h = std::thread::Builder::new()
                    .name(format!("kernel-property-seed-{seed}"))
                    .spawn_scoped(s, move || run_seed(seed, net, n));
                (seed, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(seed, h)| {
                let r = match h {
                    Err(e) => Err(anyhow::anyhow!("spawn: {e}")),
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("seed {seed} panicked"))),
                };
                (seed, r)
            })
            .collect()
    });

    let mut failures = Vec::new();
    let mut loaded = 0;
    let mut coverage: BTreeMap<(bool, &'static str, TargetKind), usize> = BTreeMap::new();
    for (seed, r) in &results {
        match r {
            Err(e) => failures.push(format!("seed {seed}: {e:#}")),
            Ok(rep) => {
                if let Some(d) = &rep.rejected {
                    eprintln!(
                        "SKIP seed {seed} (net {}): the generated bundle is rejected:\n{d}",
                        rep.net
                    );
                    continue;
                }
                loaded += 1;
                let allowed: usize = rep
                    .coverage
                    .iter()
                    .filter(|((a, _, _), _)| *a)
                    .map(|(_, n)| n)
                    .sum();
                eprintln!(
                    "seed {seed} (net {}): {} cells, {} sampled, {} attempts ({allowed} allowed by Cedar), {:.1} s{}",
                    rep.net,
                    rep.cells,
                    rep.sampled,
                    rep.attempts,
                    rep.elapsed.as_secs_f64(),
                    if rep.failure.is_some() { ", FAILED" } else { "" }
                );
                for (k, v) in &rep.coverage {
                    *coverage.entry(*k).or_default() += v;
                }
                if let Some(f) = &rep.failure {
                    failures.push(f.clone());
                }
            }
        }
    }
    eprintln!(
        "kernel property: {} seeds ({loaded} loaded) in {:.1} s; attempts by (allowed, kind, target): {coverage:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!(
            "the kernel disagrees with Cedar (or the test could not run):\n\n{}",
            failures.join("\n\n")
        );
    }
    ensure!(
        loaded * 4 >= seeds.len() * 3,
        "only {loaded} of {} generated bundles load: the generator is broken",
        seeds.len()
    );
    // A property that only ever saw denies (or allows) proves little.
    for (allowed, kind) in [(true, "tcp"), (false, "tcp"), (true, "udp"), (false, "udp")] {
        ensure!(
            coverage
                .iter()
                .any(|((a, k, _), n)| *a == allowed && *k == kind && *n > 0),
            "no {kind} attempt that Cedar {} was sampled",
            if allowed { "allows" } else { "denies" }
        );
    }
    Ok(())
}

/// No kernel needed: the generator makes bundles that load, and that Cedar answers both ways
/// for every kind of target, so the kernel test has something to compare.
#[test]
fn generated_bundles_load_and_decide_both_ways() -> Result<()> {
    const SEEDS: u64 = 120;
    let mut loaded = 0;
    let mut rejections = Vec::new();
    let mut seen: BTreeSet<(bool, TargetKind)> = BTreeSet::new();
    let mut seen_edges: BTreeSet<bool> = BTreeSet::new();
    for seed in 0..SEEDS {
        let generated = GeneratedBundle::new(seed, 59);
        let bundle = generated.write("enforcer-prop-x")?;
        let oracle = match Bundle::load(bundle.path()) {
            Ok(b) => b,
            Err(d) => {
                rejections.push(format!(
                    "seed {seed}:\n{d}\n{}",
                    generated.text("enforcer-prop-x")
                ));
                continue;
            }
        };
        loaded += 1;
        // The agent compiles it: port rules must fit the exact-port entries of a cell.
        oracle
            .compile()
            .with_context(|| format!("seed {seed}:\n{}", generated.text("enforcer-prop-x")))?;
        for c in all_cells(&generated, &oracle)? {
            seen.insert((c.decision.allowed, c.target.kind));
            if c.target.edge {
                seen_edges.insert(c.decision.allowed);
            }
            if c.target.kind == TargetKind::Undeclared {
                ensure!(
                    !c.decision.allowed && c.decision.undeclared_port,
                    "seed {seed}: {} is undeclared, yet {}",
                    c.label(),
                    c.oracle()
                );
            }
        }
    }
    ensure!(
        loaded * 100 >= SEEDS * 95,
        "{loaded} of {SEEDS} generated bundles load; first rejections:\n{}",
        rejections
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    for kind in [TargetKind::Declared, TargetKind::AnyPort, TargetKind::World] {
        for allowed in [true, false] {
            ensure!(
                seen.contains(&(allowed, kind)),
                "no generated {kind:?} cell is {}",
                if allowed { "allowed" } else { "denied" }
            );
        }
    }
    ensure!(seen.contains(&(false, TargetKind::Undeclared)));
    ensure!(
        seen_edges.len() == 2,
        "ports next to `context.port` literals on destinations without ports are only ever {seen_edges:?}"
    );
    Ok(())
}

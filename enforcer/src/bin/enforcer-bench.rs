//! `cargo xtask bench`: what the enforcer costs, measured, never asserted.
//!
//! 1. `connect()` latency on loopback in rounds that rotate every setup: no filtering, an
//!    empty connect4 program, the enforcer, and the alternative a user would pick today (an
//!    nftables ruleset doing the same job at 100, 1,000 and 10,000 rules); reported as ratios
//!    to no filtering.
//! 2. Kernel cost of one `connect4` run (the kernel's own `run_time_ns / run_cnt`, with
//!    `kernel.bpf_stats_enabled`) as a ratio to an empty connect4 program measured in the same
//!    windows (absolute figures move from machine to machine; the ratio does much less), while
//!    the maps hold 10,000 identities, 100,000 policy entries and 100,000 IP-cache entries.
//!    Every other program of the object that ran is reported too: the server stands for a
//!    vector DB with ingress `enforce`, so `sock_ops` (the identity option) and `skb_ingress`
//!    (its check) run on every connect.
//! 3. Policy compile and apply figures (see `compile_bench`).
//! 4. What tracked flows cost, with the real agent (`flows`, in `enforcer-bench/flows.rs`).
//! 5. The event pipeline: deny events written per second, loss, agent CPU under a flood, the
//!    cost of followers (`events`, in `enforcer-bench/events.rs`).
//!
//! `enforcer-bench [datapath|compile|flows|events] [--rounds N] [--connects N]`. Needs root, and `nft`
//! (Debian's `nftables`, which `cargo xtask bench` installs) for the nftables comparison.
//! Everything it creates (cgroups, pins, the nftables table) is removed at the end, also on
//! error or panic; leftovers of a killed run are removed by the next one.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enforcer::datapath::{pin_dir, Datapath, DesiredState, LoadOptions};
use enforcer_common::{flags, programs, proto, IdentityInfo, PolicyKey, PolicyValue};

// Sections in their own files (a directory without main.rs is no binary).
#[path = "enforcer-bench/events.rs"]
mod events;
#[path = "enforcer-bench/flows.rs"]
mod flows;

const IDENTITIES: u32 = 10_000;
const POLICY_ENTRIES: u32 = 100_000;
const IPCACHE_ENTRIES: u32 = 100_000;
const ROUNDS: usize = 21;
const CONNECTS_PER_ROUND: usize = 1_000;
/// nftables chain lengths compared (one rule per subject).
const NFT_RULES: [usize; 3] = [100, 1_000, 10_000];
/// Destinations per subject: POLICY_ENTRIES / IDENTITIES, as in the enforcer's maps.
const NFT_SET_ELEMENTS: u32 = POLICY_ENTRIES / IDENTITIES;
/// This helper's loopback range: the benchmark server, and a second one no policy allows.
const SERVER: Ipv4Addr = Ipv4Addr::new(127, 85, 0, 1);
const FORBIDDEN: Ipv4Addr = Ipv4Addr::new(127, 85, 0, 2);
/// Names (of cgroups, pin roots, the nftables table) carry the pid, so that a later run can
/// tell a killed run's leftovers from a live run's.
const NAME_PREFIX: &str = "enforcer-bench-";
const NFT_TABLE_PREFIX: &str = "enforcer_bench_";

/// What the datapath half creates, removed in reverse order on drop (also on error or panic).
struct Cleanup {
    /// Cgroups in creation order (parents first).
    cgroups: Vec<PathBuf>,
    pin_root: PathBuf,
    home_cgroup: PathBuf,
    /// The nftables table, once its creation is attempted.
    nft_table: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Move back out before removing the cgroups (a cgroup with members cannot be removed)
        // and detach the programs before running nft, so that nothing judges its sockets.
        let _ = std::fs::write(self.home_cgroup.join("cgroup.procs"), "0");
        let _ = enforcer::datapath::detach(&self.pin_root);
        if let Some(table) = &self.nft_table {
            let _ = nft(&format!("delete table inet {table}\n"));
        }
        for cgroup in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

struct Options {
    only: Option<String>,
    rounds: usize,
    connects: usize,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        only: None,
        rounds: ROUNDS,
        connects: CONNECTS_PER_ROUND,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut count = |flag: &str| -> Result<usize> {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a number"))?;
            match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{flag}: expected a positive number, got {value:?}"),
            }
        };
        match arg.as_str() {
            "datapath" | "compile" | "flows" | "events" if options.only.is_none() => {
                options.only = Some(arg)
            }
            "--rounds" => options.rounds = count("--rounds")?,
            "--connects" => options.connects = count("--connects")?,
            _ => bail!(
                "unexpected argument {arg:?}; usage: enforcer-bench \
                 [datapath|compile|flows|events] \
                 [--rounds N] [--connects N]"
            ),
        }
    }
    Ok(options)
}

fn main() -> Result<()> {
    // The events section's flood runs as a child of this binary, inside a workload's cgroup.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(events::FLOOD_COMMAND) {
        return events::flood_main(&args[1..]);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads BPF programs and creates cgroups: run it as root");
    }
    println!(
        "# enforcer benchmarks ({})",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    // `enforcer-bench datapath`, `compile` or `flows` runs one section.
    let options = parse_args()?;
    remove_stale_leftovers(&enforcer::fs::cgroup2_mount()?, nft_available());
    let runs = |section: &str| options.only.as_deref().is_none_or(|only| only == section);
    if runs("compile") {
        compile_bench()?;
    }
    if runs("datapath") {
        datapath_bench(&options)?;
    }
    if runs("flows") {
        flows::flows_bench(&flows::FlowOptions {
            rounds: options.rounds,
            connects: options.connects,
        })?;
    }
    if runs("events") {
        events::events_bench()?;
    }
    Ok(())
}

/// Issue 3's figures: a 1,000-identity bundle (100 local, 2 ports each, 50 policies)
/// compiled and written to fresh maps; then one risk change, compiled and written.
fn compile_bench() -> Result<()> {
    let bundle_dir =
        std::env::temp_dir().join(format!("enforcer-bench-bundle-{}", std::process::id()));
    let pin_root = PathBuf::from(format!(
        "/sys/fs/bpf/enforcer-bench-compile-{}",
        std::process::id()
    ));
    struct Remove(PathBuf, PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = enforcer::datapath::detach(&self.1);
        }
    }
    let _remove = Remove(bundle_dir.clone(), pin_root.clone());
    std::fs::create_dir_all(&bundle_dir)?;
    let report = enforcer_policy::testutil::bench_report(&bundle_dir);
    println!("\n## Policy compile (enforcer-policy)\n\n```\n{report}```");

    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: &pin_root,
        ring_buffer_bytes: None,
        capacity: Default::default(),
    })?;
    let mount = enforcer::fs::cgroup2_mount()?;
    let quarantined = Default::default();
    let overrides = enforcer::desired::Overrides {
        audit: false,
        quarantined: &quarantined,
        agent_cgroup: None,
    };
    let started = Instant::now();
    let (desired, _) = enforcer::desired::desired_state(&report.compiled, &mount, &overrides);
    let applied = datapath.tables.apply(&desired)?;
    let apply_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    datapath
        .tables
        .apply_row(&report.risk_delta.added, &report.risk_delta.removed)?;
    let row_ms = started.elapsed().as_secs_f64() * 1e3;
    let risk = &report.risk_change;
    println!("\n| step | time |\n|---|---|");
    println!(
        "| load + compile ({} cells, {} Cedar decisions) | {:.0} ms |",
        report.cells, report.cedar_decisions, report.load_and_compile_ms
    );
    println!(
        "| write to the kernel ({} entries) | {:.0} ms |",
        applied.written, apply_ms
    );
    println!(
        "| **full compile and apply** | **{:.0} ms** |",
        report.load_and_compile_ms + apply_ms
    );
    println!(
        "| risk change: set + recompile one row ({} cells) | {:.1} ms |",
        risk.cells, risk.total_ms
    );
    println!(
        "| risk change: copy-on-write of the published table | {:.1} ms |",
        risk.compiled_clone_ms
    );
    println!(
        "| risk change: write the row delta (+{} / -{}) | {:.2} ms |",
        risk.added, risk.removed, row_ms
    );
    println!(
        "| **one risk change, to the kernel** | **{:.1} ms** |",
        risk.total_ms + risk.compiled_clone_ms + row_ms
    );
    new_identity_bench(&bundle_dir, &mut datapath, &mount, &overrides)?;
    println!(
        "\nCedar decisions per second in the grouped compile: {:.0}",
        report.cedar_decisions_per_sec
    );
    Ok(())
}

/// A latency setup, rotated round by round.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    None,
    /// The empty two-instruction connect4 program: the floor any connect hook pays.
    EmptyProgram,
    Enforcer,
    /// The nftables ruleset with this many subject rules.
    Nft(usize),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::None => "no filtering".into(),
            Setup::EmptyProgram => "empty connect4 program".into(),
            Setup::Enforcer => "enforcer attached".into(),
            Setup::Nft(rules) => format!("nftables, {} rules", thousands(rules)),
        }
    }
}

fn datapath_bench(options: &Options) -> Result<()> {
    let (rounds, connects) = (options.rounds, options.connects);
    let mount = enforcer::fs::cgroup2_mount()?;
    let nft = nft_available();
    // parent: where the programs are attached; parent/subject: the benchmark process (the
    // workload); parent/server: the servers' sockets (a cgroup of no identity, where an
    // inventory's endpoints are served from: the workload may not answer for the DB's
    // address); parent/o<k>: the other subjects of the nftables rulesets (nft resolves a
    // cgroup path when the rule is loaded, so each must exist).
    let parent = mount.join(format!("{NAME_PREFIX}{}", std::process::id()));
    let subject_cgroup = parent.join("subject");
    let server_cgroup = parent.join("server");
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-{}", std::process::id()));
    let mut cleanup = Cleanup {
        cgroups: Vec::new(),
        pin_root: pin_root.clone(),
        home_cgroup: own_cgroup(&mount)?,
        nft_table: None,
    };
    for cgroup in [&parent, &subject_cgroup, &server_cgroup] {
        std::fs::create_dir(cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        cleanup.cgroups.push(cgroup.clone());
    }

    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: &pin_root,
        ring_buffer_bytes: None,
        capacity: Default::default(),
    })?;
    // The servers' sockets are made inside the enforced subtree, in a cgroup of their own
    // (then the process moves back out until the nftables table is loaded): the server stands for a vector DB with
    // ingress `enforce`, so every enforcer connect also runs the identity option's write
    // (sock_ops) and its check (cgroup_skb/ingress), and the program table reports both.
    std::fs::write(server_cgroup.join("cgroup.procs"), "0")
        .context("joining the servers' cgroup")?;
    let server = TcpListener::bind((SERVER, 0))?;
    let port = server.local_addr()?.port();
    // A second server that no rule allows: the proof that each setup really filters.
    let forbidden_server = TcpListener::bind((FORBIDDEN, 0))?;
    let forbidden = forbidden_server.local_addr()?;
    std::fs::write(cleanup.home_cgroup.join("cgroup.procs"), "0")
        .context("leaving the benchmark cgroup")?;
    // Client and server each on a CPU of their own: on this 2-core VM, sharing one makes
    // every connect wait for a context switch now and then, and that noise dwarfs the hook.
    for listener in [server, forbidden_server] {
        std::thread::spawn(move || {
            pin_to_cpu(1);
            for stream in listener.incoming() {
                drop(stream);
            }
        });
    }
    pin_to_cpu(0);

    let desired = synthetic_state(enforcer::fs::cgroup_id(&subject_cgroup)?, port);
    let started = Instant::now();
    let report = datapath.tables.apply(&desired)?;
    let class_entries = enforcer_policy::classes::Classes::of(&desired.allows)
        .entries
        .len();
    enforcer::wire::write_keys(
        datapath.dir(),
        &enforcer::wire::FlowKeys {
            current: enforcer::wire::FlowKey {
                id: 1,
                key: *b"enforcer-bench-k",
            },
            previous: None,
        },
    )?;
    let first = enforcer_common::identity::FIRST_DYNAMIC;
    enforcer::datapath::IngressWriter::open(datapath.dir())?.write_exactly(
        &std::collections::HashMap::from([(
            PolicyKey {
                subject: first,
                destination: first + 1,
                dport: port,
                protocol: proto::TCP,
                _pad: 0,
            },
            PolicyValue::allow(0),
        )]),
    )?;
    println!(
        "\n## Map load\n\n{} entries written in {:.0} ms ({} identities, {} policy entries as identity pairs = {} class entries, {} IP-cache prefixes)",
        report.written,
        started.elapsed().as_secs_f64() * 1e3,
        desired.identities.len(),
        desired.allows.len(),
        class_entries,
        desired.ipcache_v4.len()
    );
    print_map_memory(&pin_dir(&pin_root))?;

    // The nftables alternative: one table holding each ruleset as a regular chain; a round
    // hooks one of them in with a base chain, and removes the base chain after.
    let nft_table = if nft {
        Some(NftTable::load(&mount, &parent, &mut cleanup, port)?)
    } else {
        println!(
            "\nnft not found: the nftables comparison is skipped (install Debian's `nftables`; \
             `cargo xtask bench` does)"
        );
        None
    };

    // The benchmark process itself becomes the workload: it joins the subject cgroup.
    std::fs::write(subject_cgroup.join("cgroup.procs"), "0")
        .context("joining the benchmark cgroup")?;
    let target = SocketAddr::from((SERVER, port));
    let noop = NoopConnect4::load()?;
    let link_pins = pin_dir(&pin_root);
    let mut setups = vec![Setup::None, Setup::EmptyProgram, Setup::Enforcer];
    if nft_table.is_some() {
        setups.extend(NFT_RULES.map(Setup::Nft));
    }
    // Runs `f` with `setup` in force, and always takes the setup down again.
    let mut with_setup =
        |setup: Setup, f: &mut dyn FnMut() -> Result<Vec<f64>>| -> Result<Vec<f64>> {
            let table = || {
                nft_table
                    .as_ref()
                    .expect("nft setups exist only with a table")
            };
            let noop_link = match setup {
                Setup::EmptyProgram => Some(noop.attach(&parent)?),
                Setup::Enforcer => {
                    datapath.attach(&parent)?;
                    None
                }
                Setup::Nft(rules) => {
                    table().hook(rules)?;
                    None
                }
                Setup::None => None,
            };
            let result = f();
            drop(noop_link);
            match setup {
                Setup::Enforcer => detach_enforcer(&link_pins, &parent)?,
                Setup::Nft(_) => table().unhook()?,
                _ => {}
            }
            result
        };

    // Each filtering setup must refuse the forbidden server and let the allowed one through,
    // or the comparison would time a filter that does nothing. Without filtering, both pass.
    let mut refusals = Vec::new();
    for &setup in &setups {
        let mut refused = None;
        with_setup(setup, &mut || {
            connect_latencies(target, 1).with_context(|| {
                format!("{}: the allowed connect to {target} failed", setup.name())
            })?;
            refused = connect_once(forbidden).err();
            Ok(Vec::new())
        })?;
        match (setup, refused) {
            (Setup::None | Setup::EmptyProgram, Some(error)) => bail!(
                "{}: the connect to {forbidden} failed ({error}), so the filtering check means nothing",
                setup.name()
            ),
            (Setup::Enforcer | Setup::Nft(_), None) => bail!(
                "{} does not filter: a connect to {forbidden}, which no rule allows, went through",
                setup.name()
            ),
            (_, Some(error)) => refusals.push(format!("{} ({error})", setup.name())),
            (_, None) => {}
        }
    }
    println!(
        "\nFiltering checked: the allowed connect passes under every setup; one to {forbidden} \
         passes without filtering and is refused by: {}.",
        refusals.join("; ")
    );

    // Latency first, with run-time statistics off (they add two clock reads per run), in
    // rounds that rotate every setup, so that drift of the machine hits them all alike.
    let mut samples = vec![Vec::new(); setups.len()];
    let mut ratios = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        let mut medians = vec![0.0; setups.len()];
        for k in 0..setups.len() {
            let i = (round + k) % setups.len();
            let mut round_samples =
                with_setup(setups[i], &mut || connect_latencies(target, connects))?;
            medians[i] = median(&mut round_samples);
            samples[i].extend(round_samples);
        }
        for (i, ratios) in ratios.iter_mut().enumerate() {
            ratios.push(medians[i] / medians[0]);
        }
    }

    // Then the kernel's own cost per run: windows of `connects` connects, each with the
    // enforcer and the empty program attached in turn (alternating which goes first).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling kernel.bpf_stats_enabled")?;
    let mut enforcer_ns = Vec::new();
    let mut empty_ns = Vec::new();
    let mut window_ratios = Vec::new();
    // Program name -> (run time, runs), summed over the enforcer's windows.
    let mut programs_run: BTreeMap<String, (Duration, u64)> = BTreeMap::new();
    for window in 0..rounds {
        let mut per_run = [0.0; 2];
        for k in 0..2 {
            if (window + k) % 2 == 0 {
                datapath.attach(&parent)?;
                let before: BTreeMap<_, _> = datapath
                    .all_program_run_stats()
                    .into_iter()
                    .map(|(name, time, runs)| (name, (time, runs)))
                    .collect();
                let result = connect_latencies(target, connects);
                let after = datapath.all_program_run_stats();
                detach_enforcer(&link_pins, &parent)?;
                result?;
                for (name, time, runs) in after {
                    let (time_before, runs_before) = before.get(&name).copied().unwrap_or_default();
                    let (time, runs) = (time - time_before, runs - runs_before);
                    if name == programs::CONNECT4 {
                        if runs < connects as u64 {
                            bail!("connect4 ran {runs} times for {connects} connects");
                        }
                        per_run[0] = time.as_nanos() as f64 / runs as f64;
                    }
                    let sum = programs_run.entry(name).or_default();
                    sum.0 += time;
                    sum.1 += runs;
                }
            } else {
                let link = noop.attach(&parent)?;
                let (time_before, runs_before) = noop.run_stats()?;
                let result = connect_latencies(target, connects);
                let (time_after, runs_after) = noop.run_stats()?;
                drop(link);
                result?;
                let runs = runs_after - runs_before;
                if runs < connects as u64 {
                    bail!(
                        "the empty program ran {runs} times for {connects} connects: its run \
                         statistics are misread"
                    );
                }
                per_run[1] = (time_after - time_before) as f64 / runs as f64;
            }
        }
        enforcer_ns.push(per_run[0]);
        empty_ns.push(per_run[1]);
        window_ratios.push(per_run[0] / per_run[1]);
    }
    drop(stats);

    println!(
        "\n## connect4 kernel cost (run_time_ns / run_cnt) against an empty connect4 program\n"
    );
    println!(
        "{rounds} windows x {connects} connects, the enforcer and the empty program in turn \
         within each window.\n"
    );
    println!("| | ns per run, median | windows from | to |\n|---|---|---|---|");
    for (name, values) in [
        ("empty connect4 program", &mut empty_ns),
        ("enforcer connect4", &mut enforcer_ns),
    ] {
        let m = median(values);
        println!(
            "| {name} | {m:.0} | {:.0} | {:.0} |",
            values[0],
            values[values.len() - 1]
        );
    }
    let of_medians = median(&mut enforcer_ns) / median(&mut empty_ns);
    println!(
        "\n**ratio enforcer / empty program: {:.2}** (median of the {rounds} per-window ratios; \
         windows from {:.2} to {:.2}; ratio of the medians {of_medians:.2}); target at most 2",
        median(&mut window_ratios),
        window_ratios[0],
        window_ratios[window_ratios.len() - 1],
    );
    println!(
        "\nEvery program of the enforcer's object that ran in its windows (a hook added later \
         shows up here by itself):\n\n| program | runs per connect | ns per run |\n|---|---|---|"
    );
    let total_connects = (rounds * connects) as f64;
    for (name, (time, runs)) in &programs_run {
        if *runs > 0 {
            println!(
                "| {name} | {:.2} | {:.0} |",
                *runs as f64 / total_connects,
                time.as_nanos() as f64 / *runs as f64
            );
        }
    }

    println!(
        "\n## connect() latency on loopback, {rounds} rotating rounds x {connects} connects\n"
    );
    // Loopback connects here are bimodal (a fast mode near the median and a slow one near
    // p90), so a pooled median can jump between modes: the ratio is reported per round (the
    // setups of a round run back to back) and at the fast mode (p25) as well.
    println!("| | p25 | median | p90 |\n|---|---|---|---|");
    for (setup, samples) in setups.iter().zip(&mut samples) {
        println!(
            "| {} | {:.2} us | {:.2} us | {:.2} us |",
            setup.name(),
            percentile(samples, 0.25),
            median(samples),
            percentile(samples, 0.9)
        );
    }
    println!(
        "\n| ratio to no filtering | median of per-round ratios | rounds from | to | at p25 | pooled medians |\n|---|---|---|---|---|---|"
    );
    let (none_p25, none_median) = (percentile(&mut samples[0], 0.25), median(&mut samples[0]));
    for i in 1..setups.len() {
        let round_ratios = &mut ratios[i];
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            setups[i].name(),
            median(round_ratios),
            round_ratios[0],
            round_ratios[round_ratios.len() - 1],
            percentile(&mut samples[i], 0.25) / none_p25,
            median(&mut samples[i]) / none_median,
        );
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// The nftables ruleset a user would write for the same job: per subject, one rule matching
/// its cgroup (`socket cgroupv2`) and a set of the `daddr . dport` it may reach; connects of
/// the managed tree that no rule accepts are refused. Only a connection's first packet (a SYN)
/// walks the rules, and no conntrack is involved: nftables' best case.
struct NftTable {
    name: String,
}

impl NftTable {
    /// Creates 9,999 other subjects' cgroups under `parent` (registered with `cleanup`) and
    /// loads the table with one chain per size in `NFT_RULES`; the benchmark subject's rule
    /// sits in the middle of each chain (the average position of a workload).
    fn load(mount: &Path, parent: &Path, cleanup: &mut Cleanup, port: u16) -> Result<Self> {
        // nft resolves a path below /sys/fs/cgroup: on a hybrid layout, where cgroup v2 is
        // mounted at /sys/fs/cgroup/unified, the path starts with `unified/`.
        let nft_path = |cgroup: &Path| -> Result<String> {
            Ok(cgroup
                .strip_prefix("/sys/fs/cgroup")
                .with_context(|| {
                    format!(
                        "nft resolves cgroup paths below /sys/fs/cgroup, and cgroup v2 is \
                         mounted at {}",
                        mount.display()
                    )
                })?
                .to_string_lossy()
                .into_owned())
        };
        // `level` counts from the cgroup v2 root, not from /sys/fs/cgroup.
        let level = |cgroup: &Path| cgroup.strip_prefix(mount).map_or(0, |p| p.iter().count());
        let started = Instant::now();
        let max_rules = NFT_RULES.iter().copied().max().unwrap_or(0);
        let others: Vec<PathBuf> = (0..max_rules.saturating_sub(1))
            .map(|k| parent.join(format!("o{k}")))
            .collect();
        for cgroup in &others {
            std::fs::create_dir(cgroup)
                .with_context(|| format!("creating {}", cgroup.display()))?;
            cleanup.cgroups.push(cgroup.clone());
        }
        let table = Self {
            name: format!("{NFT_TABLE_PREFIX}{}", std::process::id()),
        };
        // Registered before loading, so that whatever nft manages to create is removed.
        cleanup.nft_table = Some(table.name.clone());
        let subject = parent.join("subject");
        let mut rules = format!("table inet {} {{\n", table.name);
        // A subject's set: NFT_SET_ELEMENTS destinations (for the benchmark subject, the
        // server first).
        let set = |name: &str, first: Option<(Ipv4Addr, u16)>, seed: u32| {
            let base = u32::from(Ipv4Addr::new(127, 64, 0, 0));
            let elements: Vec<String> = first
                .into_iter()
                .chain((0..NFT_SET_ELEMENTS).map(|j| {
                    let i = seed * NFT_SET_ELEMENTS + j;
                    (
                        Ipv4Addr::from(base + i % IPCACHE_ENTRIES),
                        1024 + (i % 4096) as u16,
                    )
                }))
                .take(NFT_SET_ELEMENTS as usize)
                .map(|(addr, port)| format!("{addr} . {port}"))
                .collect();
            format!(
                "  set {name} {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n",
                elements.join(", ")
            )
        };
        rules.push_str(&set("subject", Some((SERVER, port)), max_rules as u32));
        for k in 0..others.len() {
            rules.push_str(&set(&format!("o{k}"), None, k as u32));
        }
        let rule = |cgroup: &Path, set: &str| -> Result<String> {
            Ok(format!(
                "    socket cgroupv2 level {} \"{}\" ip daddr . tcp dport @{set} accept\n",
                level(cgroup),
                nft_path(cgroup)?
            ))
        };
        for size in NFT_RULES {
            rules.push_str(&format!("  chain rules_{size} {{\n"));
            // The others' rules, with the subject's at position size / 2.
            let (before, after) = others[..size - 1].split_at(size / 2);
            for (k, other) in before.iter().enumerate() {
                rules.push_str(&rule(other, &format!("o{k}"))?);
            }
            rules.push_str(&rule(&subject, "subject")?);
            for (k, other) in after.iter().enumerate() {
                rules.push_str(&rule(other, &format!("o{}", before.len() + k))?);
            }
            rules.push_str(&format!(
                "    socket cgroupv2 level {} \"{}\" reject with tcp reset\n  }}\n",
                level(parent),
                nft_path(parent)?
            ));
        }
        rules.push_str("}\n");
        nft(&rules).context("loading the nftables rulesets")?;
        println!(
            "\n## nftables rulesets\n\n{} cgroups created and {} rules with a set of {} \
             `daddr . dport` each loaded in {:.1} s (nft {})",
            thousands(others.len()),
            thousands(NFT_RULES.iter().sum::<usize>()),
            NFT_SET_ELEMENTS,
            started.elapsed().as_secs_f64(),
            nft_version().unwrap_or_default()
        );
        Ok(table)
    }

    /// Puts the chain with `rules` rules on the output hook: only SYNs (a connection's first
    /// packet) jump to it.
    fn hook(&self, rules: usize) -> Result<()> {
        let table = &self.name;
        nft(&format!(
            "add chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n\
             add rule inet {table} out tcp flags & (fin|syn|rst|ack) == syn jump rules_{rules}\n"
        ))
    }

    fn unhook(&self) -> Result<()> {
        nft(&format!("delete chain inet {} out\n", self.name))
    }
}

/// Runs an nft script (one transaction: all of it or nothing).
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    // nft reads the whole script before it reports anything; when it stops early, its own
    // message (below) says more than the broken pipe.
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child.wait_with_output().context("waiting for nft")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first: String = script.lines().next().unwrap_or_default().into();
        bail!(
            "nft failed ({}) on a script starting {first:?}: {}",
            output.status,
            stderr.lines().take(6).collect::<Vec<_>>().join("\n")
        );
    }
    written.context("writing the script to nft")
}

fn nft_version() -> Option<String> {
    let output = Command::new("nft").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.split_whitespace().nth(1)?.to_owned())
}

fn nft_available() -> bool {
    nft_version().is_some()
}

/// Removes what a killed benchmark left behind (nftables tables, cgroups and pins named after
/// a process that no longer exists): a leftover base chain would slow every SYN of the
/// machine, and leftover pins hold 70 MiB of maps.
fn remove_stale_leftovers(mount: &Path, nft_available: bool) {
    let dead = |pid: &str| pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists();
    if nft_available {
        if let Ok(output) = Command::new("nft").args(["list", "tables"]).output() {
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                if let Some(pid) = line
                    .strip_prefix("table inet ")
                    .and_then(|name| name.strip_prefix(NFT_TABLE_PREFIX))
                {
                    if dead(pid) {
                        let _ = nft(&format!("delete table inet {NFT_TABLE_PREFIX}{pid}\n"));
                    }
                }
            }
        }
    }
    for entry in std::fs::read_dir(mount).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.strip_prefix(NAME_PREFIX).is_some_and(dead) {
            for child in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if child.path().is_dir() {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(NAME_PREFIX)
            .map(|rest| rest.trim_start_matches("compile-"));
        if pid.is_some_and(dead) {
            let _ = enforcer::datapath::detach(&entry.path());
        }
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 10,000 identities; 100,000 allows spread over them (the benchmark subject among them; the
/// rows and columns are scattered, so nearly every identity is a class of its own and the
/// kernel's class table is as large as the pair table: the worst case for its lookups);
/// 100,000 /32 prefixes from 127.64.0.0 (never contacted; only the map size matters), and
/// `SERVER`, the only destination of the subject's that is contacted (`FORBIDDEN` is WORLD).
fn synthetic_state(bench_cgroup: u64, port: u16) -> DesiredState {
    let first = enforcer_common::identity::FIRST_DYNAMIC;
    let subject = first;
    let server = first + 1;
    let mut state = DesiredState::default();
    for i in 0..IDENTITIES {
        state
            .identities
            .insert(first + i, IdentityInfo::new(1 + i % 50, 0));
    }
    // The server is a vector DB whose node checks the identity option.
    if let Some(info) = state.identities.get_mut(&server) {
        info.flags = flags::VECTOR_DB | flags::INGRESS_ENFORCE;
    }
    let base = u32::from(Ipv4Addr::new(127, 64, 0, 0));
    for i in 0..IPCACHE_ENTRIES {
        state.ipcache_v4.insert(
            (32, Ipv4Addr::from(base + i).octets()),
            first + 2 + i % (IDENTITIES - 2),
        );
    }
    state.ipcache_v4.insert((32, SERVER.octets()), server);
    for i in 0..POLICY_ENTRIES - 1 {
        let key = PolicyKey {
            subject: first + i % IDENTITIES,
            destination: first + (i / IDENTITIES * 7 + i) % IDENTITIES,
            dport: 1024 + (i % 4096) as u16,
            protocol: proto::TCP,
            _pad: 0,
        };
        state.allows.insert(key, PolicyValue::allow(0));
    }
    state.allows.insert(
        PolicyKey {
            subject,
            destination: server,
            dport: port,
            protocol: proto::TCP,
            _pad: 0,
        },
        PolicyValue::allow(0),
    );
    state.cgroups = BTreeMap::from([(bench_cgroup, subject)]);
    state
}

/// One new identity: the edited bundle is loaded and compiled from the previous table, and
/// the difference written to maps that hold the previous revision in both policy tables (the
/// steady state of a running agent).
fn new_identity_bench(
    bundle_dir: &Path,
    datapath: &mut Datapath,
    mount: &Path,
    overrides: &enforcer::desired::Overrides,
) -> Result<()> {
    std::fs::remove_dir_all(bundle_dir)?;
    std::fs::create_dir_all(bundle_dir)?;
    let report = enforcer_policy::testutil::bench_new_identity(bundle_dir);
    println!("\n## One new identity\n\n```\n{report}```");
    println!("\n| new workload | load + incremental compile | write to the kernel | total |\n|---|---|---|---|");
    for case in [&report.typical, &report.novel] {
        let (before, _) = enforcer::desired::desired_state(&case.before, mount, overrides);
        datapath.tables.apply(&before)?;
        datapath.tables.apply(&before)?;
        // A running agent's reloads are at least one poll (500 ms) apart: let the standby
        // grace period of the last flip pass, so it is not counted as write time.
        std::thread::sleep(Duration::from_millis(60));
        let started = Instant::now();
        let (after, _) = enforcer::desired::desired_state(&case.after, mount, overrides);
        datapath.tables.apply(&after)?;
        let write_ms = started.elapsed().as_secs_f64() * 1e3;
        println!(
            "| {} ({}) | {:.1} ms | {:.1} ms | **{:.1} ms** |",
            case.workload,
            case.purpose,
            case.total_ms,
            write_ms,
            case.total_ms + write_ms
        );
    }
    Ok(())
}

/// One connect; the error when it is refused.
fn connect_once(target: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    reset_on_close(&stream);
    Ok(())
}

fn connect_latencies(target: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .context("benchmark connect")?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        reset_on_close(&stream);
        drop(stream);
    }
    Ok(samples)
}

/// Close with RST (SO_LINGER 0) so that tens of thousands of connects leave no TIME_WAIT
/// sockets behind to exhaust the ephemeral ports.
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Unpins the enforcer's links and waits until the kernel has really detached its programs
/// from `cgroup`: the last reference of an unpinned link is dropped from a workqueue, which
/// on a busy machine runs late; until then the programs keep running in the next setup's
/// round (and after a new attach, twice per connect).
fn detach_enforcer(pins: &Path, cgroup: &Path) -> Result<()> {
    remove_link_pins(pins)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Every attach type up to the kernel's newest (a type that is not a cgroup's is an
        // error, skipped): so that a hook added to the agent later is waited for as well.
        let attached = (0..64).any(|attach_type| {
            enforcer::datapath::attached_programs(cgroup, attach_type)
                .is_ok_and(|ids| !ids.is_empty())
        });
        if !attached {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "programs are still attached to {} 10 s after the enforcer's links were unpinned",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn remove_link_pins(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("link-") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Kernel memory charged to each map, from the `memlock` line of its fdinfo.
fn print_map_memory(dir: &Path) -> Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    println!("\n| map | memory |\n|---|---|");
    let mut total = 0u64;
    for name in enforcer_common::maps::ALL {
        let map = aya::maps::MapData::from_pin(dir.join(name))?;
        let fdinfo = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            map.fd().as_fd().as_raw_fd()
        ))?;
        let bytes: u64 = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        total += bytes;
        println!("| {name} | {:.1} MiB |", bytes as f64 / (1 << 20) as f64);
    }
    println!("| total | {:.1} MiB |", total as f64 / (1 << 20) as f64);
    Ok(())
}

/// A two-instruction cgroup connect4 program (`r0 = 1; exit`), loaded with the raw bpf(2)
/// syscall: what any connect4 hook costs before it does anything, for the latency baseline.
struct NoopConnect4 {
    prog: std::os::fd::OwnedFd,
}

impl NoopConnect4 {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;

    fn load() -> Result<Self> {
        use std::os::fd::FromRawFd;
        // mov64 r0, 1 ; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]),
            u64::from_le_bytes([0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]),
        ];
        let license = b"GPL\0";
        // The BPF_PROG_LOAD part of union bpf_attr, up to expected_attach_type; the rest zero.
        #[repr(C)]
        #[derive(Default)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
            _rest: [u64; 8],
        }
        let mut attr = ProgLoad {
            prog_type: Self::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: Self::BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let fd = sys_bpf(Self::BPF_PROG_LOAD, &mut attr)
            .context("loading the empty connect4 program")?;
        // SAFETY: the kernel just returned this fd to us.
        Ok(Self {
            prog: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Attached until the returned link fd is dropped.
    fn attach(&self, cgroup: &Path) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let cgroup = std::fs::File::open(cgroup)?;
        #[repr(C)]
        #[derive(Default)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            _rest: [u64; 6],
        }
        let mut attr = LinkCreate {
            prog_fd: self.prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type: Self::BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let fd = sys_bpf(Self::BPF_LINK_CREATE, &mut attr)
            .context("attaching the empty connect4 program")?;
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// (run time in ns, runs) from the kernel's bpf_prog_info, counted only while
    /// `kernel.bpf_stats_enabled` is on.
    fn run_stats(&self) -> Result<(u64, u64)> {
        use std::os::fd::AsRawFd;
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // struct bpf_prog_info up to run_time_ns (byte 192) and run_cnt (byte 200); the
        // kernel fills what fits in info_len.
        let mut info = [0u64; 26];
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoByFd {
            bpf_fd: self.prog.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .context("reading the empty program's run statistics")?;
        Ok((info[24], info[25]))
    }
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<i32> {
    // SAFETY: attr is a live, zero-padded bpf_attr prefix of the size passed (the kernel may
    // write back into it, hence &mut); pointers in it point to live buffers.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd as i32)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that set; 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn own_cgroup(mount: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

fn median(samples: &mut [f64]) -> f64 {
    percentile(samples, 0.5)
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

//! `cargo xtask bench`: what the enforcer costs, measured, never asserted.
//!
//! 1. Kernel cost of one `connect4` run (the kernel's own `run_time_ns / run_cnt`, with
//!    `kernel.bpf_stats_enabled`) while the maps hold 10,000 identities, 100,000 policy
//!    entries and 100,000 IP-cache entries.
//! 2. `connect()` latency on loopback with the programs attached versus none, in interleaved
//!    A/B rounds, reported as a ratio of medians.
//! 3. Policy compile and apply figures (see `compile_bench`).
//!
//! Needs root. Everything it creates (cgroup, pins) is removed at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enforcer::datapath::{pin_dir, Datapath, DesiredState, LoadOptions};
use enforcer_common::{programs, proto, IdentityInfo, PolicyKey, PolicyValue};

const IDENTITIES: u32 = 10_000;
const POLICY_ENTRIES: u32 = 100_000;
const IPCACHE_ENTRIES: u32 = 100_000;
const ROUNDS: usize = 21;
/// The three latency setups, rotated round by round.
const NONE: usize = 0;
const NOOP: usize = 1;
const ENFORCER: usize = 2;
const CONNECTS_PER_ROUND: usize = 1_000;

struct Cleanup {
    cgroup: PathBuf,
    pin_root: PathBuf,
    home_cgroup: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Move back out before removing the cgroup (a cgroup with members cannot be removed).
        let _ = std::fs::write(self.home_cgroup.join("cgroup.procs"), "0");
        let _ = enforcer::datapath::detach(&self.pin_root);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads BPF programs and creates cgroups: run it as root");
    }
    println!(
        "# enforcer benchmarks ({})",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    // `enforcer-bench datapath` or `enforcer-bench compile` runs one half.
    let only = std::env::args().nth(1);
    if only.as_deref() != Some("datapath") {
        compile_bench()?;
    }
    if only.as_deref() != Some("compile") {
        datapath_bench()?;
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

fn datapath_bench() -> Result<()> {
    let mount = enforcer::fs::cgroup2_mount()?;
    let cgroup = mount.join(format!("enforcer-bench-{}", std::process::id()));
    let home_cgroup = own_cgroup(&mount)?;
    std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-{}", std::process::id()));
    let _cleanup = Cleanup {
        cgroup: cgroup.clone(),
        pin_root: pin_root.clone(),
        home_cgroup,
    };

    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: &pin_root,
        ring_buffer_bytes: None,
        capacity: Default::default(),
    })?;
    let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = server.local_addr()?.port();
    // Client and server each on a CPU of their own: on this 2-core VM, sharing one makes
    // every connect wait for a context switch now and then, and that noise dwarfs the hook.
    std::thread::spawn(move || {
        pin_to_cpu(1);
        for stream in server.incoming() {
            drop(stream);
        }
    });
    pin_to_cpu(0);

    let desired = synthetic_state(enforcer::fs::cgroup_id(&cgroup)?, port);
    let started = Instant::now();
    let report = datapath.tables.apply(&desired)?;
    println!(
        "\n## Map load\n\n{} entries written in {:.0} ms ({} identities, {} policy entries, {} IP-cache prefixes)",
        report.written,
        started.elapsed().as_secs_f64() * 1e3,
        desired.identities.len(),
        desired.allows.len(),
        desired.ipcache_v4.len()
    );
    print_map_memory(&pin_dir(&pin_root))?;

    // The benchmark process itself becomes the workload: it joins the enforced cgroup.
    std::fs::write(cgroup.join("cgroup.procs"), "0").context("joining the benchmark cgroup")?;
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // Latency first, with run-time statistics off (they add two clock reads per run), in
    // rounds that rotate three setups: no program, an empty connect4 program (the floor any
    // cgroup connect hook pays), the enforcer.
    let noop = NoopConnect4::load()?;
    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut ratios = Vec::new();
    let mut floor_ratios = Vec::new();
    let link_pins = pin_dir(&pin_root);
    for round in 0..ROUNDS {
        let mut medians = [0.0; 3];
        for k in 0..3 {
            let setup = (round + k) % 3;
            let noop_link = match setup {
                NOOP => Some(noop.attach(&cgroup)?),
                ENFORCER => {
                    datapath.attach(&cgroup)?;
                    None
                }
                _ => None,
            };
            let mut round_samples = connect_latencies(target, CONNECTS_PER_ROUND)?;
            drop(noop_link);
            remove_link_pins(&link_pins)?;
            medians[setup] = median(&mut round_samples);
            samples[setup].extend(round_samples);
        }
        ratios.push(medians[ENFORCER] / medians[NONE]);
        floor_ratios.push(medians[NOOP] / medians[NONE]);
    }
    let [mut without, mut empty, mut with] = samples;

    // Then the kernel's own cost per run, in windows of CONNECTS_PER_ROUND connects.
    datapath.attach(&cgroup)?;
    let mut per_run = Vec::new();
    let mut total_runs = 0;
    for _ in 0..ROUNDS {
        let (time_before, count_before) = datapath.program_run_stats(programs::CONNECT4)?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling kernel.bpf_stats_enabled")?;
        connect_latencies(target, CONNECTS_PER_ROUND)?;
        drop(stats);
        let (time_after, count_after) = datapath.program_run_stats(programs::CONNECT4)?;
        let runs = count_after - count_before;
        total_runs += runs;
        per_run.push((time_after - time_before).as_nanos() as f64 / runs.max(1) as f64);
    }
    remove_link_pins(&link_pins)?;

    println!("\n## connect4 cost (kernel run_time_ns / run_cnt)\n");
    println!(
        "{total_runs} runs in {ROUNDS} windows: median {:.0} ns per run (windows from {:.0} to {:.0} ns)",
        median(&mut per_run),
        per_run[0],
        per_run[per_run.len() - 1]
    );
    println!("\n## connect() latency on loopback, {ROUNDS} interleaved rounds x {CONNECTS_PER_ROUND} connects\n");
    // Loopback connects here are bimodal (a fast mode near the median and a slow one near
    // p90), so a pooled median can jump between modes: the ratio is reported per round (the
    // two sides of a round run back to back) and at the fast mode (p25) as well.
    println!("| | p25 | median | p90 |\n|---|---|---|---|");
    for (name, samples) in [
        ("no program", &mut without),
        ("empty connect4 program", &mut empty),
        ("enforcer attached", &mut with),
    ] {
        println!(
            "| {name} | {:.2} us | {:.2} us | {:.2} us |",
            percentile(samples, 0.25),
            median(samples),
            percentile(samples, 0.9)
        );
    }
    for (name, samples, round_ratios) in [
        ("enforcer", &mut with, &mut ratios),
        ("empty program", &mut empty, &mut floor_ratios),
    ] {
        println!(
            "\nratio {name} / none: median of the {ROUNDS} per-round ratios {:.3} (rounds from {:.3} to {:.3}); at p25 {:.3}; of the pooled medians {:.3}",
            median(round_ratios),
            round_ratios[0],
            round_ratios[round_ratios.len() - 1],
            percentile(samples, 0.25) / percentile(&mut without, 0.25),
            median(samples) / median(&mut without),
        );
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// 10,000 identities; 100,000 allows spread over them (the benchmark subject among them);
/// 100,000 /32 prefixes in 127.64.0.0/10 (never contacted; only the trie size matters).
fn synthetic_state(bench_cgroup: u64, port: u16) -> DesiredState {
    let first = enforcer_common::identity::FIRST_DYNAMIC;
    let subject = first;
    let server = first + 1;
    let mut state = DesiredState::default();
    for i in 0..IDENTITIES {
        state.identities.insert(
            first + i,
            IdentityInfo {
                tenant: 1 + i % 50,
                purpose: 0,
                ring: 0,
                flags: 0,
            },
        );
    }
    let base = u32::from(Ipv4Addr::new(127, 64, 0, 0));
    for i in 0..IPCACHE_ENTRIES {
        state.ipcache_v4.insert(
            (32, Ipv4Addr::from(base + i).octets()),
            first + 2 + i % (IDENTITIES - 2),
        );
    }
    state
        .ipcache_v4
        .insert((32, Ipv4Addr::LOCALHOST.octets()), server);
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
        let attr = ProgLoad {
            prog_type: Self::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: Self::BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let fd =
            sys_bpf(Self::BPF_PROG_LOAD, &attr).context("loading the empty connect4 program")?;
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
        let attr = LinkCreate {
            prog_fd: self.prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type: Self::BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let fd = sys_bpf(Self::BPF_LINK_CREATE, &attr)
            .context("attaching the empty connect4 program")?;
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> Result<i32> {
    // SAFETY: attr is a live, zero-padded bpf_attr prefix of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
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

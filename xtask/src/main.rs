//! `cargo xtask <command>`: the project's build and run entry point.
//!
//! Every command first runs `setup` (idempotent, silent when nothing is missing), then builds
//! the kernel programs, so a fresh clone needs nothing by hand.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod image;

/// The bpf-linker release whose LLVM matches the installed nightly (DESIGN.md, "Toolchain").
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The toolchain that builds the kernel programs (needs `-Z build-std` and `rust-src`).
const NIGHTLY: &str = "nightly";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Cargo package (and bin) name of the kernel programs.
const EBPF_CRATE: &str = "enforcer-ebpf";
/// Where the agent's build.rs expects the object, relative to the workspace's target dir.
const BPF_OBJECT: &str = "bpf/enforcer.bpf.o";
/// The cargo-fuzz release installed by `fuzz` (builds with the stable toolchain here).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz crate (its own workspace, built by cargo-fuzz with nightly) and its targets.
const FUZZ_DIR: &str = "fuzz";
const FUZZ_TARGETS: [&str; 6] = [
    "inventory",
    "policy",
    "bundle",
    "event",
    "pdp_request",
    "pdp_response",
];
/// Where `xtask/scripts/kube-apiserver.sh` puts the kube-apiserver (its `CACHE`).
const KUBE_CACHE: &str = "/var/cache/ai-enforcer/kube-1.20.2";
/// etcd from the Debian `etcd-server` package (the script installs it).
const ETCD: &str = "/usr/bin/etcd";
const KUBE_SCRIPT: &str = "xtask/scripts/kube-apiserver.sh";
/// Seconds per target of the fuzz pass that `test` runs after the tests
/// (`ENFORCER_FUZZ_SECONDS` overrides, 0 skips it).
const TEST_FUZZ_SECONDS: u64 = 20;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and run the enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install nightly's rust-src and bpf-linker when missing (silent when present).
    Setup,
    /// Build the kube-apiserver and install etcd for the Kubernetes tests when missing
    /// (xtask/scripts/kube-apiserver.sh; once per machine, 8-20 minutes; silent when present).
    SetupKube,
    /// Build the kernel programs into target/bpf/enforcer.bpf.o.
    BuildEbpf {
        /// Build the release profile (the default; the only one the verifier accepts).
        #[arg(long, default_value_t = true)]
        release: bool,
    },
    /// Build everything and run all tests; extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build everything and run the agent: `cargo xtask run -- <enforcer args>`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build everything and run the end-to-end demo (`enforcer-demo`).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build in release mode and run the benchmark (`enforcer-bench`); `bench kube [ARGS]`
    /// runs the Kubernetes one instead (`enforcer-kube-bench`: a real API server, the agent
    /// with `--kubernetes`; builds the API server first when it is missing).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build the container image of deploy/: the static agent (musl) FROM scratch, with
    /// podman (installed from Debian when missing).
    Image(image::ImageArgs),
    /// Fuzz the parsers (cargo-fuzz, libFuzzer; installs cargo-fuzz when missing): each
    /// target for SECONDS; a crash, abort, timeout or memory blow-up fails with the input.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all of them).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(FUZZ_TARGETS))]
        targets: Vec<String>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let ws = Workspace::locate()?;
    let tools = setup()?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::SetupKube => setup_kube(&ws, true),
        Cmd::BuildEbpf { release: _ } => build_ebpf(&ws, &tools).map(|_| ()),
        Cmd::Test { args } => {
            ws.warn_low_disk();
            // Under CI a missing API server fails here; elsewhere the Kubernetes tests say
            // loudly that they skip.
            setup_kube(&ws, ci())?;
            ensure_debian_packages(TEST_PACKAGES)?;
            install_chromadb()?;
            build_ebpf(&ws, &tools)?;
            cargo(&ws, &["build", "--workspace", "--bins"])?;
            let mut cmd = ws.cargo();
            cmd.args(["test", "--workspace"])
                .args(&args)
                .env("ENFORCER_BIN", ws.target.join("debug/enforcer"));
            status(&mut cmd, "cargo test")?;
            // The whole suite (no arguments, as CI runs it) ends with a short fuzz pass, so
            // that an input that crashes a parser fails the run.
            let seconds = match env::var("ENFORCER_FUZZ_SECONDS") {
                Ok(s) => s
                    .parse()
                    .with_context(|| format!("ENFORCER_FUZZ_SECONDS={s:?} is not a number"))?,
                Err(_) => TEST_FUZZ_SECONDS,
            };
            if args.is_empty() && seconds > 0 {
                fuzz(&ws, seconds, &FUZZ_TARGETS.map(String::from))?;
            }
            Ok(())
        }
        Cmd::Run { args } => {
            build_ebpf(&ws, &tools)?;
            cargo(&ws, &["build", "--workspace", "--bins"])?;
            exec(
                &ws.target.join("debug/enforcer"),
                &args,
                "the agent (package enforcer)",
            )
        }
        Cmd::Demo { args } => {
            build_ebpf(&ws, &tools)?;
            cargo(&ws, &["build", "--workspace", "--bins"])?;
            exec(
                &ws.target.join("debug/enforcer-demo"),
                &args,
                "the demo (bin `enforcer-demo` of package enforcer-tests)",
            )
        }
        Cmd::Bench { args } if args.first().is_some_and(|a| a == "kube") => {
            // A real API server or nothing: the benchmark is meaningless without one.
            setup_kube(&ws, true)?;
            build_ebpf(&ws, &tools)?;
            // The agent, the probe and the benchmark, all release builds: the benchmark
            // finds the other two beside itself.
            cargo(
                &ws,
                &[
                    "build",
                    "--release",
                    "-p",
                    "enforcer",
                    "-p",
                    "enforcer-tests",
                    "--bin",
                    "enforcer",
                    "--bin",
                    "probe",
                    "--bin",
                    "enforcer-kube-bench",
                ],
            )?;
            exec(
                &ws.target.join("release/enforcer-kube-bench"),
                &args[1..],
                "the Kubernetes benchmark (bin `enforcer-kube-bench` of package enforcer-tests)",
            )
        }
        Cmd::Bench { args } => {
            ensure_debian_packages(&[("nft", "nftables")])?;
            build_ebpf(&ws, &tools)?;
            cargo(&ws, &["build", "--release", "--workspace", "--bins"])?;
            exec(
                &ws.target.join("release/enforcer-bench"),
                &args,
                "the benchmark (bin `enforcer-bench`)",
            )
        }
        Cmd::Image(args) => image::image(&ws, &tools, &args),
        Cmd::Fuzz { seconds, targets } => {
            // The agent's build.rs embeds the kernel object, also in the fuzz build.
            build_ebpf(&ws, &tools)?;
            let targets = if targets.is_empty() {
                FUZZ_TARGETS.map(String::from).to_vec()
            } else {
                targets
            };
            fuzz(&ws, seconds, &targets)
        }
    }
}

struct Workspace {
    root: PathBuf,
    /// The host build's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
    target: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask must live in a workspace")?
            .to_path_buf();
        let target = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };
        Ok(Self { root, target })
    }

    /// The cargo that runs xtask (same toolchain as the host workspace).
    fn cargo(&self) -> Command {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&self.root);
        // A fresh clone gains nothing from incremental state, and it is 1.6 GiB of the
        // debug build's 5.5 GiB. Children (the tests' own `cargo xtask image`) inherit it.
        if ci() && env::var_os("CARGO_INCREMENTAL").is_none() {
            cmd.env("CARGO_INCREMENTAL", "0");
        }
        cmd
    }

    /// Warns when the file system of the target directory has less room than a whole
    /// test run writes on a fresh clone. A full disk shows up as an error of whichever
    /// build step hits it (the static agent's, often), far from its cause.
    fn warn_low_disk(&self) {
        let mut dir = self.target.as_path();
        while !dir.exists() {
            match dir.parent() {
                Some(parent) => dir = parent,
                None => return,
            }
        }
        let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: `path` is NUL-terminated and `stat` is a plain out-parameter.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return;
        }
        let free: u64 = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < FRESH_TEST_RUN_BYTES {
            eprintln!(
                "xtask: warning: {:.1} GiB free under {}; a test run on a fresh clone writes \
                 about {} GiB (debug and release builds, the static agent, the fuzz targets). \
                 A build step may fail with `No space left on device`.",
                free as f64 / (1u64 << 30) as f64,
                dir.display(),
                FRESH_TEST_RUN_BYTES >> 30
            );
        }
    }
}

/// What `cargo xtask test` writes on a fresh clone, with room to spare: 10.6 GiB measured on
/// 2026-12-03 (target/ 7.3 GiB of which 1.6 GiB incremental state CI no longer writes,
/// fuzz/target 3.3 GiB), plus the containers' storage and the tests' files.
const FRESH_TEST_RUN_BYTES: u64 = 12 << 30;

/// Where the tools of the kernel build were found.
struct Tools {
    /// Directory holding `bpf-linker`, put first on PATH for the nested build.
    bpf_linker_dir: PathBuf,
}

/// Ensures nightly's rust-src and bpf-linker are installed; prints nothing when they are.
fn setup() -> Result<Tools> {
    if which("rustup").is_none() {
        bail!(
            "rustup is not installed (it provides the nightly toolchain the kernel programs \
             need): install it from https://rustup.rs"
        );
    }
    let sysroot = nightly_output(&["rustc", "--print", "sysroot"]).with_context(|| {
        format!(
            "the {NIGHTLY} toolchain is not installed: run `rustup toolchain install {NIGHTLY} \
             --component rust-src` (bpf-linker {BPF_LINKER_VERSION} needs its LLVM)"
        )
    })?;
    let rust_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library");
    if !rust_src.is_dir() {
        eprintln!("xtask: installing rust-src for the {NIGHTLY} toolchain");
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
        status(&mut cmd, "rustup component add rust-src")?;
    }

    let bpf_linker = match find_bpf_linker() {
        Some(path) if bpf_linker_version(&path).as_deref() == Some(BPF_LINKER_VERSION) => path,
        found => {
            if let Some(path) = found {
                eprintln!(
                    "xtask: {} is not version {BPF_LINKER_VERSION}; installing it",
                    path.display()
                );
            } else {
                eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION}");
            }
            let mut cmd = Command::new("cargo");
            clean_cargo_env(&mut cmd);
            cmd.args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ]);
            status(&mut cmd, "cargo install bpf-linker")?;
            find_bpf_linker()
                .filter(|p| bpf_linker_version(p).as_deref() == Some(BPF_LINKER_VERSION))
                .with_context(|| {
                    format!(
                        "bpf-linker {BPF_LINKER_VERSION} is still not found after installing it"
                    )
                })?
        }
    };
    let bpf_linker_dir = bpf_linker
        .parent()
        .context("bpf-linker has no parent directory")?
        .to_path_buf();
    Ok(Tools { bpf_linker_dir })
}

/// The kube-apiserver the Kubernetes tests run (`xtask/scripts/kube-apiserver.sh` caches it
/// outside any clone; `ENFORCER_KUBE_CACHE` moves the cache, as in the test harness).
fn kube_apiserver_bin() -> PathBuf {
    env::var_os("ENFORCER_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KUBE_CACHE))
        .join("kube-apiserver")
}

/// Whether this run is CI (`CI` set, non-empty and not `false`).
fn ci() -> bool {
    env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Runs the build script when the kube-apiserver or etcd is missing (silent when both are
/// there). When `required`, a failure is an error; otherwise it is reported and the
/// Kubernetes tests skip loudly.
fn setup_kube(ws: &Workspace, required: bool) -> Result<()> {
    if kube_apiserver_bin().is_file() && Path::new(ETCD).is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: {} or {ETCD} is missing: building it with {KUBE_SCRIPT}",
        kube_apiserver_bin().display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(ws.root.join(KUBE_SCRIPT)).current_dir(&ws.root);
    match status(&mut cmd, KUBE_SCRIPT) {
        Ok(()) => Ok(()),
        Err(e) if !required => {
            eprintln!("xtask: {e:#}; the Kubernetes tests will skip (they fail under CI=true)");
            Ok(())
        }
        Err(e) => Err(e.context("the Kubernetes tests need a real API server")),
    }
}

/// The Debian packages the tests run, as (command, package); installed when the command is
/// missing from `PATH` (silent when present). Each test runs its own instance with its own
/// configuration; no package's service is needed.
/// - `rsyslog`: the rotation test ships the events file with `imfile`;
/// - `prometheus`: the metrics test scrapes the agent with a real server and checks its
///   output with `promtool`;
/// - `iptables` (`iptables`, `ip6tables`): the rewrite and link-local tests DNAT in a pod's
///   network namespace.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("rsyslogd", "rsyslog"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
];

/// For each (command, Debian package) whose command is not on PATH, installs the package.
fn ensure_debian_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(command, _)| which(command).is_none())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (Debian packages)", missing.join(" "));
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    if status(&mut cmd, "apt-get install").is_err() {
        // A fresh machine's package lists may be missing or stale.
        status(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(&mut cmd, &format!("apt-get install {}", missing.join(" ")))?;
    }
    Ok(())
}

/// The vector-DB test's server and client: Chroma, pinned (`CHROMADB_VERSION`), from PyPI
/// into a virtual environment cached per machine (`CHROMADB_VENV`, about 500 MB, a few
/// minutes the first time; silent when present). Installed into a `.partial` directory that
/// is renamed when pip succeeded, so that an interrupted install is never taken for a
/// complete one; the test runs the venv's `python` (whose location does not matter), not the
/// generated scripts (whose `#!` line names the `.partial` path). Keep the two constants in
/// step with `tests/src/chroma.rs`.
fn install_chromadb() -> Result<()> {
    const CHROMADB_VERSION: &str = "1.5.9";
    const CHROMADB_VENV: &str = "/var/cache/enforcer-tests/chromadb-1.5.9";
    let venv = Path::new(CHROMADB_VENV);
    if venv.join("bin/python").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing chromadb {CHROMADB_VERSION} into {CHROMADB_VENV} (the vector-DB test; once per machine)");
    let partial = venv.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing the unfinished {}", partial.display()))?;
    }
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let python = which("python3").context("python3 is needed to install chromadb")?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "venv"]).arg(&partial);
    status(
        &mut cmd,
        "python3 -m venv (Debian: apt-get install python3-venv)",
    )?;
    let mut cmd = Command::new(partial.join("bin/python"));
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .arg(format!("chromadb=={CHROMADB_VERSION}"));
    status(&mut cmd, "pip install chromadb")?;
    std::fs::rename(&partial, venv)
        .with_context(|| format!("renaming {} to {}", partial.display(), venv.display()))
}

/// Builds the kernel programs with nightly and copies the object to `target/bpf/`.
fn build_ebpf(ws: &Workspace, tools: &Tools) -> Result<PathBuf> {
    let crate_dir = ws.root.join(EBPF_CRATE);
    let mut cmd = Command::new("rustup");
    // Scrub what the outer `cargo run` set (RUSTC, RUSTUP_TOOLCHAIN, CARGO_*, RUSTFLAGS...):
    // the nested build must use nightly's cargo and rustc with its own flags.
    clean_cargo_env(&mut cmd);
    // --locked: enforcer-ebpf/Cargo.lock pins aya-build 0.2.0 (0.2.1 needs rustc 1.98).
    cmd.args(["run", NIGHTLY, "cargo", "build", "--release", "--locked"])
        .args(["-Z", "build-std=core", "--target", BPF_TARGET])
        .current_dir(&crate_dir)
        .env("PATH", path_with(&tools.bpf_linker_dir)?);
    status(&mut cmd, "building the kernel programs")?;

    let built = crate_dir
        .join("target")
        .join(BPF_TARGET)
        .join("release")
        .join(EBPF_CRATE);
    let object = ws.target.join(BPF_OBJECT);
    fs::create_dir_all(object.parent().expect("object path has a parent"))?;
    let bytes = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Only rewrite on change: the agent's build.rs reruns when the object's mtime changes.
    if fs::read(&object).ok().as_deref() != Some(bytes.as_slice()) {
        fs::write(&object, &bytes).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(object)
}

/// Builds the fuzz targets and runs each of `targets` for `seconds`, with the committed seeds
/// (`fuzz/seeds/<target>`) and the corpus earlier runs grew (`fuzz/corpus/<target>`). A
/// failing target's log tail and failing input are printed; the run fails at the end.
fn fuzz(ws: &Workspace, seconds: u64, targets: &[String]) -> Result<()> {
    let cargo_fuzz = setup_cargo_fuzz()?;
    let fuzz_dir = ws.root.join(FUZZ_DIR);
    eprintln!("xtask: building the fuzz targets ({NIGHTLY}, cargo-fuzz {CARGO_FUZZ_VERSION})");
    let mut cmd = Command::new("rustup");
    clean_cargo_env(&mut cmd);
    cmd.args(["run", NIGHTLY])
        .arg(&cargo_fuzz)
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        // Overflow checks and debug assertions: an overflow is a finding too. 16 codegen
        // units instead of cargo-fuzz's 1: a third of the build time (cedar-policy is large),
        // for somewhat slower runs.
        .args(["--debug-assertions", "--sanitizer", "address"])
        .args(["--codegen-units", "16"])
        .current_dir(&ws.root);
    status(&mut cmd, "building the fuzz targets")?;
    let bins = fuzz_dir.join("target").join(host_triple()?).join("release");
    // Every target runs even when one fails: one known crash must not hide another.
    let failed: Vec<&str> = targets
        .iter()
        .filter(|target| {
            fuzz_one(&fuzz_dir, &bins.join(target), target, seconds)
                .map_err(|e| eprintln!("xtask: {e:#}"))
                .is_err()
        })
        .map(String::as_str)
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The fuzzing budget of one target. Under CI, a fixed seed and a fixed number of inputs, so
/// that whether a submission lands never depends on how far a random search got in the
/// time a loaded machine gave it: every committed seed runs, then the same `seconds` x 10
/// generated inputs every time. Elsewhere, `seconds` of fresh exploration.
fn budget(seconds: u64) -> Vec<String> {
    if ci() {
        vec!["-seed=20261201".into(), format!("-runs={}", seconds * 10)]
    } else {
        vec![format!("-max_total_time={seconds}")]
    }
}

fn fuzz_one(fuzz_dir: &Path, bin: &Path, target: &str, seconds: u64) -> Result<()> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let before: Vec<PathBuf> = list(&artifacts);
    let log = artifacts.join("fuzz.log");
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut prefix = artifacts.clone().into_os_string();
    prefix.push("/");
    eprintln!("xtask: fuzzing {target} ({})", budget(seconds).join(" "));
    // The PDP targets drive hyper over one tokio runtime for every input, and an aborted
    // connection task is dropped only when that runtime next runs; LeakSanitizer reports
    // buffers allocated under that task now and then (two of six CI runs of the same seed
    // and inputs, 208 and 367 bytes, at exit): a nondeterministic report is a flaky CI, and
    // leaks are not what these targets look for (panics, unbounded time or memory). libFuzzer's `-detect_leaks=0` only
    // stops its per-input check; the check at exit is ASan's own `detect_leaks`, so both go.
    let leaks = !target.starts_with("pdp_");
    let mut cmd = Command::new(bin);
    // As `cargo fuzz run` sets it: Rust's duplicated statics across crates are not ODR bugs.
    cmd.env(
        "ASAN_OPTIONS",
        format!("detect_odr_violation=0:detect_leaks={}", u8::from(leaks)),
    )
    .arg(&corpus)
    .arg(&seeds)
    .args(budget(seconds))
    // The property: no input makes a parser take more than this, or allocate without
    // bound (a YAML alias bomb, a deep Cedar expression).
    .arg("-timeout=20")
    .arg("-rss_limit_mb=2048")
    .arg("-malloc_limit_mb=1024")
    .arg("-max_len=65536")
    .arg("-print_final_stats=1")
    .arg(format!("-detect_leaks={}", u8::from(leaks)))
    .arg({
        let mut a = OsString::from("-artifact_prefix=");
        a.push(&prefix);
        a
    })
    .stdout(log_file.try_clone()?)
    .stderr(log_file);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let outcome = child.wait()?;
    // The targets' scratch bundles (fuzz/src/lib.rs `Scratch`): libFuzzer exits without
    // running destructors, so they are removed here, by the process id in their names.
    let suffix = format!("-{}", child.id());
    for base in [PathBuf::from("/dev/shm"), env::temp_dir()] {
        for dir in list(&base) {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("enforcer-fuzz-") && name.ends_with(&suffix) {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    let text = fs::read_to_string(&log).unwrap_or_default();
    if outcome.success() {
        let runs = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(str::trim)
            .unwrap_or("?");
        eprintln!("xtask: {target}: {runs} inputs, no failure");
        return Ok(());
    }
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("--- {} (last 60 lines) ---", log.display());
    for line in &lines[lines.len().saturating_sub(60)..] {
        eprintln!("{line}");
    }
    // libFuzzer names the input it wrote ("Test unit written to PATH"), also when a file of
    // that name was there already; else whatever is new in the artifacts directory.
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(PathBuf::from)
        .collect();
    if found.is_empty() {
        found = list(&artifacts)
            .into_iter()
            .filter(|p| !before.contains(p) && p != &log)
            .collect();
    }
    for input in &found {
        eprintln!(
            "xtask: {target} failed on {}; reproduce with `{} {}`",
            input.display(),
            bin.display(),
            input.display()
        );
    }
    bail!("fuzz target {target} failed ({outcome}); see above")
}

/// The files of `dir`, sorted.
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Ensures cargo-fuzz [`CARGO_FUZZ_VERSION`] is installed; its path.
fn setup_cargo_fuzz() -> Result<PathBuf> {
    let found = find_cargo_bin("cargo-fuzz");
    if let Some(path) = &found {
        if cargo_fuzz_version(path).as_deref() == Some(CARGO_FUZZ_VERSION) {
            return Ok(path.clone());
        }
        eprintln!(
            "xtask: {} is not version {CARGO_FUZZ_VERSION}; installing it",
            path.display()
        );
    } else {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    }
    let mut cmd = Command::new("cargo");
    clean_cargo_env(&mut cmd);
    cmd.args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]);
    status(&mut cmd, "cargo install cargo-fuzz")?;
    find_cargo_bin("cargo-fuzz")
        .filter(|p| cargo_fuzz_version(p).as_deref() == Some(CARGO_FUZZ_VERSION))
        .with_context(|| {
            format!("cargo-fuzz {CARGO_FUZZ_VERSION} is still not found after installing it")
        })
}

/// `cargo-fuzz --version` prints `cargo-fuzz 0.13.2`.
fn cargo_fuzz_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().nth(1)?.to_owned())
}

/// The host's target triple (where cargo-fuzz puts the binaries).
fn host_triple() -> Result<String> {
    let out = nightly_output(&["rustc", "-vV"]).context("running `rustc -vV` (nightly)")?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host")
}

/// Runs `cargo <args>` in the workspace.
fn cargo(ws: &Workspace, args: &[&str]) -> Result<()> {
    let mut cmd = ws.cargo();
    cmd.args(args);
    status(&mut cmd, &format!("cargo {}", args.join(" ")))
}

/// Replaces this process with `bin args...`.
fn exec(bin: &Path, args: &[OsString], what: &str) -> Result<()> {
    if !bin.is_file() {
        bail!("{} is missing: {what} was not built", bin.display());
    }
    let err = Command::new(bin).args(args).exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}

fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// stdout of `rustup run nightly <args>`, or None when it cannot run.
fn nightly_output(args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("rustup");
    clean_cargo_env(&mut cmd);
    let out = cmd
        .args(["run", NIGHTLY])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes the variables an outer cargo (and rustup proxy) sets for the process it runs, so
/// that a nested cargo behaves as if started from a clean shell. User settings that only
/// affect downloads and output (CARGO_HOME, CARGO_NET_*, CARGO_HTTP_*, ...) are kept.
fn clean_cargo_env(cmd: &mut Command) {
    const KEEP: [&str; 6] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const REMOVE: [&str; 9] = [
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_ENCODED_RUSTFLAGS",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_var = (key.starts_with("CARGO_") && !KEEP.iter().any(|k| key.starts_with(k)))
            || key.starts_with("__CARGO");
        if cargo_var || REMOVE.contains(&key) {
            cmd.env_remove(key);
        }
    }
}

fn find_bpf_linker() -> Option<PathBuf> {
    find_cargo_bin("bpf-linker")
}

/// `name` on PATH, else in cargo's bin directory (where `cargo install` puts it).
fn find_cargo_bin(name: &str) -> Option<PathBuf> {
    which(name).or_else(|| {
        let home = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let path = home.join("bin").join(name);
        path.is_file().then_some(path)
    })
}

/// `bpf-linker --version` prints `bpf-linker 0.10.4`.
fn bpf_linker_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().nth(1)?.to_owned())
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// PATH with `dir` first.
fn path_with(dir: &Path) -> Result<OsString> {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    Ok(env::join_paths(dirs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<OsString> {
        match Cli::try_parse_from(argv).unwrap().command {
            Cmd::Test { args } => args,
            _ => panic!("not test"),
        }
    }

    #[test]
    fn fuzz_takes_seconds_and_known_targets() {
        match Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5", "bundle", "event"])
            .unwrap()
            .command
        {
            Cmd::Fuzz { seconds, targets } => {
                assert_eq!(seconds, 5);
                assert_eq!(targets, ["bundle", "event"]);
            }
            _ => panic!("not fuzz"),
        }
        assert!(Cli::try_parse_from(["xtask", "fuzz", "nonsense"]).is_err());
        // Every target named here is a [[bin]] of the fuzz crate.
        let manifest =
            fs::read_to_string(Workspace::locate().unwrap().root.join("fuzz/Cargo.toml")).unwrap();
        for target in FUZZ_TARGETS {
            assert!(
                manifest.contains(&format!(
                    "name = \"{target}\"\npath = \"fuzz_targets/{target}.rs\""
                )),
                "{target}"
            );
        }
    }

    #[test]
    fn test_forwards_arguments_verbatim() {
        assert!(test_args(&["xtask", "test"]).is_empty());
        assert_eq!(
            test_args(&["xtask", "test", "--", "--nocapture"]),
            ["--nocapture"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "matrix", "--", "--nocapture"]),
            ["matrix", "--", "--nocapture"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "-p", "enforcer"]),
            ["-p", "enforcer"]
        );
    }
}

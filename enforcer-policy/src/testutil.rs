//! Generated bundles for tests and benchmarks (feature `bench` outside tests), and the
//! PDP benchmarks, [`bench_report`] (load, compile, risk change) and [`bench_new_identity`]
//! (reload after one new workload, with `compile_incremental`).
//!
//! `synthetic_bundle` writes the issue's speed scenario (N identities, L local, P ports
//! each, K policies); `random_bundle` writes a small seeded random bundle for the
//! compile-equals-oracle property test.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

/// The demo schema: the entity model every bundle uses.
pub const SCHEMA: &str = include_str!("../../policies/demo/schema.cedarschema");

/// A small deterministic generator (splitmix64): reproducible from a seed, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn write_bundle(dir: &Path, inventory: &str, policies: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA)?;
    std::fs::write(dir.join("inventory.yaml"), inventory)?;
    std::fs::write(dir.join("policies.cedar"), policies)?;
    Ok(())
}

fn ip(n: usize) -> String {
    format!("127.{}.{}.{}/32", 20 + n / 65536, (n / 256) % 256, n % 256)
}

/// The speed scenario of issue 3: `identities` workloads and endpoints (`local` of them
/// with cgroups), `ports` declared ports each, `policies` policies.
pub fn synthetic_bundle(
    dir: &Path,
    identities: usize,
    local: usize,
    ports: usize,
    policies: usize,
) -> io::Result<()> {
    let tenants = SYNTHETIC_TENANTS;
    let purposes = SYNTHETIC_PURPOSES;
    let rings = ["prod", "staging", "dev"];
    let kinds = ["vector_db", "feature_store", "llm_api", "model_registry"];
    let mut inv = String::from("tenants: [");
    inv += &(0..tenants)
        .map(|t| format!("t{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    inv += "]\ndefaults:\n  implicit_deny_atlas: [AML.T0012]\n  unknown_subject_atlas: [AML.T0103]\nworkloads:\n";
    let workloads = identities / 2;
    for i in 0..workloads {
        inv += &synthetic_workload(i, purposes[i % purposes.len()], i < local, ports);
        inv.push('\n');
    }
    inv += "endpoints:\n";
    for i in workloads..identities {
        let acts = ["query", "read", "write"];
        let _ = writeln!(
            inv,
            "  - {{name: e{i}, tenant: t{}, kind: {}, ips: [{}], datasets: [ds{}], ports: [{}]}}",
            i % tenants,
            kinds[i % kinds.len()],
            ip(i),
            i % 7,
            (0..ports)
                .map(|p| format!(
                    "{{port: {}, action: {}}}",
                    6000 + p,
                    acts[(i + p) % acts.len()]
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut pol = String::from(
        "@id(\"same-tenant\")\npermit (principal, action, resource) when { resource has tenant && principal.tenant == resource.tenant };\n\
         @id(\"tenant-isolation\") @atlas(\"AML.T0085.000\")\nforbid (principal, action, resource) when { resource has tenant && principal.tenant != resource.tenant };\n",
    );
    let mut i = 2;
    while i < policies {
        let n = i;
        let p = match n % 5 {
            0 => format!("@id(\"p{n}\")\nforbid (principal, action == Action::\"write\", resource is Endpoint) when {{ principal.purpose == \"{}\" && resource.kind == \"{}\" }};\n", purposes[n % 4], kinds[n % 4]),
            1 => format!("@id(\"p{n}\") @atlas(\"AML.T0020\")\nforbid (principal, action, resource) when {{ principal.risk.greaterThan(decimal(\"0.{}\")) && principal.ring == \"{}\" }};\n", 5 + n % 4, rings[n % 3]),
            2 => format!("@id(\"p{n}\")\npermit (principal, action == Action::\"connect\", resource == World::\"world\") when {{ principal.ring == \"{}\" }};\n", rings[n % 3]),
            3 => format!("@id(\"p{n}\")\nforbid (principal, action, resource is Endpoint) when {{ resource.datasets.contains(\"ds{}\") && principal.purpose == \"{}\" }};\n", n % 7, purposes[(n / 5) % 4]),
            _ => format!("@id(\"p{n}\")\npermit (principal == Workload::\"w{}\", action, resource) when {{ context.protocol == \"tcp\" }};\n", n % workloads.max(1)),
        };
        pol += &p;
        i += 1;
    }
    write_bundle(dir, &inv, &pol)
}

const SYNTHETIC_TENANTS: usize = 10;
const SYNTHETIC_PURPOSES: [&str; 4] =
    ["inference", "evaluation", "retrieval", "feature-extraction"];

/// Workload `w{i}` of [`synthetic_bundle`]'s pattern (one YAML flow line), with `purpose`.
fn synthetic_workload(i: usize, purpose: &str, local: bool, ports: usize) -> String {
    let rings = ["prod", "staging", "dev"];
    let tenant = i % SYNTHETIC_TENANTS;
    format!(
        "  - {{name: w{i}, tenant: t{tenant}, purpose: {purpose}, ring: {}, risk: {}, spiffe_id: \"spiffe://bench.local/ns/t{tenant}/sa/w{i}\", ips: [{}]{}, ports: [{}]}}",
        rings[(i / 3) % rings.len()],
        ["0.1", "0.5", "0.9"][i % 3],
        ip(i),
        if local { format!(", cgroups: [bench/w{i}]") } else { String::new() },
        (0..ports).map(|p| format!("{{port: {}, action: {}}}", 8000 + p, if p == 0 { "infer" } else { "connect" })).collect::<Vec<_>>().join(", ")
    )
}

/// Add one workload to a bundle written by [`synthetic_bundle`] with `identities`
/// identities and `ports` ports: `w{identities}`, local (a cgroup), with the pattern's
/// tenant, ring and risk for that index, its own address, and `purpose` (`None`: the
/// pattern's; a purpose no other workload has gives it a signature never seen before).
/// Returns its name.
pub fn synthetic_add_workload(
    dir: &Path,
    identities: usize,
    ports: usize,
    purpose: Option<&str>,
) -> io::Result<String> {
    let i = identities; // After every generated identity: its address is free.
    let path = dir.join("inventory.yaml");
    let inv = std::fs::read_to_string(&path)?;
    let purpose = purpose.unwrap_or(SYNTHETIC_PURPOSES[i % SYNTHETIC_PURPOSES.len()]);
    let line = synthetic_workload(i, purpose, true, ports);
    let Some(at) = inv.find("endpoints:\n") else {
        return Err(io::Error::other("not a synthetic inventory"));
    };
    let edited = format!("{}{line}\n{}", &inv[..at], &inv[at..]);
    std::fs::write(&path, edited)?;
    Ok(format!("w{i}"))
}

/// A small random bundle from `seed`, exercising every grouping dimension: attributes,
/// named UIDs, whole-entity comparisons, context fields, ports and the any-port cell.
pub fn random_bundle(dir: &Path, seed: u64) -> io::Result<()> {
    let mut r = Rng::new(seed);
    let tenants = ["acme", "globex", "initech"];
    let purposes = ["inference", "evaluation", "retrieval"];
    let rings = ["prod", "dev"];
    let risks = ["0.0", "0.5", "0.9"];
    let kinds = ["vector_db", "feature_store", "llm_api"];
    let mut inv = String::from("tenants: [acme, globex, initech]\nworkloads:\n");
    let nw = 3 + r.below(6);
    let mut n = 0;
    for i in 0..nw {
        let mut w = format!(
            "  - name: w{i}\n    tenant: {}\n    purpose: {}\n    ring: {}\n    risk: {}\n",
            r.pick(&tenants),
            r.pick(&purposes),
            r.pick(&rings),
            r.pick(&risks)
        );
        if i < 2 || r.chance(60) {
            w += &format!("    cgroups: [rand/w{i}]\n");
        }
        if i == 0 || r.chance(70) {
            n += 1;
            w += &format!("    ips: [{}]\n", ip(n));
            if r.chance(50) {
                let mut ports = vec!["{port: 8000, action: infer}".to_string()];
                if r.chance(50) {
                    ports.push("{port: 9000, protocol: udp, action: connect}".into());
                }
                w += &format!("    ports: [{}]\n", ports.join(", "));
            }
        }
        inv += &w;
    }
    inv += "endpoints:\n";
    let ne = 1 + r.below(4);
    for i in 0..ne {
        n += 1;
        let mut e = format!(
            "  - name: e{i}\n    tenant: {}\n    kind: {}\n    ips: [{}]\n    datasets: [{}]\n",
            r.pick(&tenants),
            r.pick(&kinds),
            ip(n),
            r.pick(&["ds0", "ds1", "ds0, ds1"])
        );
        if r.chance(70) {
            let all = [
                "{port: 6333, action: query}",
                "{port: 6566, action: read}",
                "{port: 6567, action: write}",
                "{port: 53, protocol: udp, action: connect}",
            ];
            let ports: Vec<&str> = all.iter().copied().filter(|_| r.chance(60)).collect();
            if !ports.is_empty() {
                e += &format!("    ports: [{}]\n", ports.join(", "));
            }
        }
        inv += &e;
    }
    let templates: Vec<String> = vec![
        "permit (principal, action, resource) when { resource has tenant && principal.tenant == resource.tenant };".into(),
        "forbid (principal, action, resource) when { resource has tenant && principal.tenant != resource.tenant };".into(),
        "permit (principal, action, resource);".into(),
        format!("permit (principal == Workload::\"w{}\", action, resource);", r.below(nw)),
        format!("forbid (principal, action, resource == Endpoint::\"e{}\") when {{ principal.ring == \"dev\" }};", r.below(ne)),
        "forbid (principal, action == Action::\"write\", resource is Endpoint) when { principal.purpose == \"evaluation\" && resource.kind == \"feature_store\" };".into(),
        "forbid (principal, action, resource) when { principal.risk.greaterThan(decimal(\"0.8\")) };".into(),
        "permit (principal, action, resource) when { context.port == 6333 };".into(),
        "forbid (principal, action, resource) when { context.protocol == \"udp\" };".into(),
        "permit (principal, action == Action::\"connect\", resource == World::\"world\");".into(),
        "forbid (principal, action, resource is Workload) when { principal == resource };".into(),
        "permit (principal, action, resource is Endpoint) when { resource.datasets.contains(\"ds1\") && principal.purpose == \"retrieval\" };".into(),
        "permit (principal, action in [Action::\"query\", Action::\"read\"], resource) when { principal.ring == \"prod\" };".into(),
        "forbid (principal, action, resource) when { context.port == 0 && principal.purpose == \"inference\" };".into(),
        // `context.port` on destinations without ports (World always, some others): every
        // analysable form, each deciding few enough ports to fit a cell's exact entries.
        "forbid (principal, action, resource is World) when { context.port == 25 };".into(),
        "forbid (principal, action, resource) when { context.port < 1024 && principal.ring == \"dev\" };".into(),
        "permit (principal, action, resource) when { [53, 443, 8000].contains(context.port) };".into(),
        "forbid (principal, action, resource) when { context.port != 443 && context.port >= 440 && 450 > context.port };".into(),
        "permit (principal, action, resource) when { context.port > 65000 || context.port <= 3 };".into(),
        "forbid (principal, action, resource is Endpoint) when { 6333 == context.port && context.protocol == \"udp\" };".into(),
        format!("forbid (principal, action, resource) when {{ {} >= context.port && principal.purpose == \"retrieval\" }};", r.pick(&[22, 80, 1023])),
    ];
    let mut pol = String::new();
    let np = 1 + r.below(7);
    for k in 0..np {
        let t = r.pick(&templates);
        let _ = writeln!(pol, "@id(\"r{k}\")\n{t}");
    }
    write_bundle(dir, &inv, &pol)
}

/// The issue-3 speed figures of the PDP side, for `cargo xtask bench` (the agent's bench
/// binary adds the kernel writes: [`BenchReport::compiled`] is the full table,
/// [`BenchReport::risk_delta`] the row change to write after it).
#[derive(Clone, serde::Serialize)]
pub struct BenchReport {
    pub identities: usize,
    pub local: usize,
    pub ports: usize,
    pub policies: usize,
    /// Reading, parsing and validating the bundle.
    pub load_ms: f64,
    /// Compiling every cell.
    pub compile_ms: f64,
    pub load_and_compile_ms: f64,
    pub cells: usize,
    pub cell_groups: usize,
    /// Single-policy Cedar evaluations the compile made.
    pub cedar_decisions: usize,
    /// `cedar_decisions` / compile time: the compile rate.
    pub cedar_decisions_per_sec: f64,
    /// Cells decided per second of compile (the grouping fans each decision out).
    pub cells_per_sec: f64,
    /// Whole-set Cedar requests per second, ungrouped (the oracle, `Bundle::decide`).
    pub oracle_decisions_per_sec: f64,
    pub allows: usize,
    pub risk_change: RiskChangeReport,
    /// The compiled table before the risk change (not serialized).
    #[serde(skip)]
    pub compiled: crate::Compiled,
    /// What the risk change changes in the kernel table (not serialized).
    #[serde(skip)]
    pub risk_delta: crate::RowDelta,
}

/// One `enforcer risk set`, PDP side: `Bundle::set_risk` + `Compiled::recompile_subject`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RiskChangeReport {
    pub workload: String,
    pub from: String,
    pub to: String,
    pub set_risk_ms: f64,
    pub recompile_ms: f64,
    /// `set_risk_ms + recompile_ms`: the PDP part of the 50 ms budget.
    pub total_ms: f64,
    /// Cloning the compiled table (what the agent's `Arc::make_mut` costs while the table
    /// is published elsewhere).
    pub compiled_clone_ms: f64,
    pub cells: usize,
    pub cedar_decisions: usize,
    pub added: usize,
    pub removed: usize,
    /// The snapshot after the change (`sha256:...+risk(1):...`).
    pub snapshot: String,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Write the issue-3 scenario (1,000 identities, 100 local, 2 ports each, 50 policies) into
/// `dir`, then load, compile and change one subject's risk, timing each step.
///
/// Panics if the generated bundle does not load or compile (a bug, not a measurement).
pub fn bench_report(dir: &Path) -> BenchReport {
    bench_report_sized(dir, 1000, 100, 2, 50)
}

/// [`bench_report`] for another scenario size (`local` >= 2).
#[allow(clippy::expect_used, clippy::panic)]
pub fn bench_report_sized(
    dir: &Path,
    identities: usize,
    local: usize,
    ports: usize,
    policies: usize,
) -> BenchReport {
    use std::time::Instant;
    synthetic_bundle(dir, identities, local, ports, policies).expect("writing the bundle");
    let t = Instant::now();
    let mut bundle =
        crate::Bundle::load(dir).unwrap_or_else(|d| panic!("synthetic bundle invalid:\n{d}"));
    let load = t.elapsed();
    let t = Instant::now();
    let compiled = bundle.compile().expect("compiling the synthetic bundle");
    let compile = t.elapsed();
    let stats = compiled.stats();

    // The oracle's rate: whole policy set, one request per cell, no grouping.
    let subjects: Vec<String> = bundle
        .identities()
        .iter()
        .filter(|i| i.is_subject())
        .map(|i| i.name.clone())
        .collect();
    let dests: Vec<(String, u16, crate::Protocol)> = bundle
        .identities()
        .iter()
        .filter(|i| i.is_destination())
        .map(|i| match i.ports.first() {
            Some(p) => (i.name.clone(), p.port, p.protocol),
            None => (i.name.clone(), 0, crate::Protocol::Tcp),
        })
        .collect();
    let samples = 2000.min(subjects.len() * dests.len());
    let t = Instant::now();
    for k in 0..samples {
        let (d, port, protocol) = &dests[k % dests.len()];
        let s = &subjects[(k / dests.len()) % subjects.len()];
        bundle
            .decide(s, d, *port, *protocol)
            .expect("the oracle answers");
    }
    let oracle = t.elapsed();

    // One risk change: w1 (a local workload in ring prod, risk 0.5) goes above every risk
    // threshold of the scenario, so its row changes.
    let workload = "w1";
    let from = bundle
        .identities()
        .by_name(workload)
        .map(|i| i.risk.clone())
        .unwrap_or_default();
    let to = "0.95";
    let t = Instant::now();
    let mut changed = compiled.clone();
    let clone = t.elapsed();
    let t = Instant::now();
    bundle.set_risk(workload, to).expect("a valid score");
    let set_risk = t.elapsed();
    let t = Instant::now();
    let risk_delta = changed
        .recompile_subject(&bundle, workload)
        .expect("re-evaluating the row");
    let recompile = t.elapsed();

    BenchReport {
        identities,
        local,
        ports,
        policies,
        load_ms: ms(load),
        compile_ms: ms(compile),
        load_and_compile_ms: ms(load + compile),
        cells: stats.cells,
        cell_groups: stats.cell_groups,
        cedar_decisions: stats.cedar_decisions,
        cedar_decisions_per_sec: stats.cedar_decisions as f64 / compile.as_secs_f64(),
        cells_per_sec: stats.cells as f64 / compile.as_secs_f64(),
        oracle_decisions_per_sec: samples as f64 / oracle.as_secs_f64(),
        allows: stats.allows,
        risk_change: RiskChangeReport {
            workload: workload.into(),
            from,
            to: to.into(),
            set_risk_ms: ms(set_risk),
            recompile_ms: ms(recompile),
            total_ms: ms(set_risk + recompile),
            compiled_clone_ms: ms(clone),
            cells: risk_delta.cells,
            cedar_decisions: risk_delta.cedar_decisions,
            added: risk_delta.added.len(),
            removed: risk_delta.removed.len(),
            snapshot: changed.revision().to_string(),
        },
        compiled,
        risk_delta,
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.risk_change;
        writeln!(
            f,
            "PDP: {} identities ({} local), {} ports each, {} policies",
            self.identities, self.local, self.ports, self.policies
        )?;
        writeln!(
            f,
            "  load + compile   {:8.1} ms  (load {:.1} ms, compile {:.1} ms)",
            self.load_and_compile_ms, self.load_ms, self.compile_ms
        )?;
        writeln!(
            f,
            "  cells            {:8}     ({} groups, {:.0} cells/s)",
            self.cells, self.cell_groups, self.cells_per_sec
        )?;
        writeln!(
            f,
            "  Cedar decisions  {:8}     ({:.0}/s in the compile; oracle, ungrouped: {:.0}/s)",
            self.cedar_decisions, self.cedar_decisions_per_sec, self.oracle_decisions_per_sec
        )?;
        writeln!(f, "  allows           {:8}", self.allows)?;
        write!(
            f,
            "  risk change      {:8.2} ms  ({} {} -> {}: set_risk {:.2} ms, recompile {:.2} ms of {} cells, {} Cedar decisions; +{} -{} entries; table clone {:.2} ms)",
            r.total_ms,
            r.workload,
            r.from,
            r.to,
            r.set_risk_ms,
            r.recompile_ms,
            r.cells,
            r.cedar_decisions,
            r.added,
            r.removed,
            r.compiled_clone_ms
        )
    }
}

/// One new identity, PDP side: the agent reloads the edited bundle and compiles it from the
/// previous table ([`crate::Bundle::compile_incremental`]).
#[derive(Clone, serde::Serialize)]
pub struct NewIdentityReport {
    pub identities: usize,
    pub local: usize,
    pub ports: usize,
    pub policies: usize,
    /// The full compile of the bundle before the edit (the table the agent had).
    pub base_compile_ms: f64,
    /// A workload like the others (every signature it has was seen): `w{identities}`.
    pub typical: NewIdentityCase,
    /// A workload with a purpose nobody had: its row and column need Cedar.
    pub novel: NewIdentityCase,
}

/// Adding one local workload (with addresses and ports: a new row and a new column).
/// Times are medians of [`NewIdentityCase::runs`] runs.
#[derive(Clone, serde::Serialize)]
pub struct NewIdentityCase {
    pub workload: String,
    pub purpose: String,
    /// `Bundle::load` of the edited bundle.
    pub load_ms: f64,
    /// `compile_incremental` from the previous table.
    pub compile_incremental_ms: f64,
    /// `load_ms + compile_incremental_ms`: the PDP part of the 50 ms budget.
    pub total_ms: f64,
    /// A full `compile` of the edited bundle, for comparison.
    pub full_compile_ms: f64,
    pub runs: usize,
    /// Cells the compile visited (every cell: the table is rebuilt from the caches).
    pub cells: usize,
    /// Cells of the new workload (its row and its column).
    pub new_cells: usize,
    /// Single-policy Cedar evaluations the incremental compile made (the full one: below).
    pub cedar_decisions: usize,
    pub full_cedar_decisions: usize,
    pub allows: usize,
    /// Kernel entries to write and to delete, from `before` to `after`.
    pub added: usize,
    pub removed: usize,
    /// The table before the edit (not serialized).
    #[serde(skip)]
    pub before: crate::Compiled,
    /// The table after it, from `compile_incremental` (not serialized).
    #[serde(skip)]
    pub after: crate::Compiled,
}

/// Write the issue-3 scenario into `dir`, compile it, add one local workload to the
/// inventory, and time the reload: load of the edited bundle + `compile_incremental`.
///
/// Panics if a bundle does not load or compile, or if the incremental table differs from
/// a full compile's (a bug, not a measurement).
pub fn bench_new_identity(dir: &Path) -> NewIdentityReport {
    bench_new_identity_sized(dir, 1000, 100, 2, 50)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// [`bench_new_identity`] for another scenario size.
#[allow(clippy::expect_used, clippy::panic)]
pub fn bench_new_identity_sized(
    dir: &Path,
    identities: usize,
    local: usize,
    ports: usize,
    policies: usize,
) -> NewIdentityReport {
    use std::time::Instant;
    const RUNS: usize = 5;
    let load = |dir: &Path| {
        crate::Bundle::load(dir).unwrap_or_else(|d| panic!("synthetic bundle invalid:\n{d}"))
    };
    synthetic_bundle(dir, identities, local, ports, policies).expect("writing the bundle");
    let base = load(dir);
    let t = Instant::now();
    let before = base.compile().expect("compiling the synthetic bundle");
    let base_compile = t.elapsed();

    let case = |purpose: Option<&str>| {
        synthetic_bundle(dir, identities, local, ports, policies).expect("writing the bundle");
        let workload =
            synthetic_add_workload(dir, identities, ports, purpose).expect("editing the bundle");
        let (mut loads, mut compiles) = (Vec::new(), Vec::new());
        let mut edited = None;
        for _ in 0..RUNS {
            let t = Instant::now();
            let b = load(dir);
            loads.push(ms(t.elapsed()));
            edited = Some(b);
        }
        let edited = edited.expect("loaded");
        let mut after = None;
        for _ in 0..RUNS {
            let t = Instant::now();
            let c = edited
                .compile_incremental(&before)
                .expect("compiling the edited bundle");
            compiles.push(ms(t.elapsed()));
            after = Some(c);
        }
        let after = after.expect("compiled");
        let t = Instant::now();
        let full = edited.compile().expect("compiling the edited bundle");
        let full_ms = ms(t.elapsed());
        assert!(
            full.allows() == after.allows(),
            "compile_incremental differs from compile"
        );
        let w = edited
            .identities()
            .by_name(&workload)
            .expect("the new workload");
        let cells_of = |x: &crate::Identity| if x.ports.is_empty() { 2 } else { x.ports.len() };
        let row: usize = edited
            .identities()
            .iter()
            .filter(|d| d.is_destination())
            .map(cells_of)
            .sum();
        let column = edited
            .identities()
            .iter()
            .filter(|s| s.is_subject())
            .count()
            * cells_of(w);
        let old: std::collections::HashMap<_, _> = before.allows().iter().copied().collect();
        let new: std::collections::HashMap<_, _> = after.allows().iter().copied().collect();
        let added = new.iter().filter(|(k, v)| old.get(k) != Some(v)).count();
        let removed = old.keys().filter(|k| !new.contains_key(k)).count();
        let (load_ms, compile_ms) = (median(loads), median(compiles));
        NewIdentityCase {
            purpose: w.purpose.clone().unwrap_or_default(),
            workload,
            load_ms,
            compile_incremental_ms: compile_ms,
            total_ms: load_ms + compile_ms,
            full_compile_ms: full_ms,
            runs: RUNS,
            cells: after.stats().cells,
            // The new subject x itself is in both its row and its column.
            new_cells: row + column - cells_of(w),
            cedar_decisions: after.stats().cedar_decisions,
            full_cedar_decisions: full.stats().cedar_decisions,
            allows: after.allows().len(),
            added,
            removed,
            before: before.clone(),
            after,
        }
    };
    let typical = case(None);
    let novel = case(Some("fine-tuning"));
    NewIdentityReport {
        identities,
        local,
        ports,
        policies,
        base_compile_ms: ms(base_compile),
        typical,
        novel,
    }
}

impl std::fmt::Display for NewIdentityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "new identity: {} identities ({} local), {} ports each, {} policies; full compile before {:.1} ms",
            self.identities, self.local, self.ports, self.policies, self.base_compile_ms
        )?;
        for (label, c) in [("typical", &self.typical), ("novel", &self.novel)] {
            writeln!(
                f,
                "  {label:<8} {:8.2} ms  ({} purpose {}: load {:.2} ms + compile_incremental {:.2} ms [full compile {:.1} ms]; {} cells, {} new; {} Cedar decisions [full {}]; +{} -{} entries; median of {})",
                c.total_ms,
                c.workload,
                c.purpose,
                c.load_ms,
                c.compile_incremental_ms,
                c.full_compile_ms,
                c.cells,
                c.new_cells,
                c.cedar_decisions,
                c.full_cedar_decisions,
                c.added,
                c.removed,
                c.runs
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster states (what the Kubernetes source hands the bundle), for tests and benchmarks.

use crate::cluster::{
    labels as keys, Backend, ClusterIdentity, ClusterPod, ClusterService, ClusterState, ServicePort,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The label set of a pod: namespace, service account, the tenant (as the Namespace says),
/// purpose, ring, and `extra` pairs.
pub fn cluster_labels(
    namespace: &str,
    service_account: &str,
    tenant: Option<&str>,
    purpose: Option<&str>,
    ring: Option<&str>,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("namespace".to_string(), namespace.to_string());
    l.insert("service_account".to_string(), service_account.to_string());
    for (k, v) in [
        (keys::TENANT, tenant),
        (keys::PURPOSE, purpose),
        (keys::RING, ring),
    ] {
        if let Some(v) = v {
            l.insert(k.to_string(), v.to_string());
        }
    }
    for (k, v) in extra {
        l.insert(k.to_string(), v.to_string());
    }
    l
}

/// A cluster identity with these labels (see [`cluster_labels`]) and pods.
pub fn cluster_identity(
    namespace: &str,
    service_account: &str,
    tenant: Option<&str>,
    purpose: Option<&str>,
    ring: Option<&str>,
    extra: &[(&str, &str)],
    pods: Vec<ClusterPod>,
) -> ClusterIdentity {
    ClusterIdentity {
        labels: cluster_labels(namespace, service_account, tenant, purpose, ring, extra),
        namespace: namespace.into(),
        service_account: service_account.into(),
        tenant: tenant.map(str::to_string),
        purpose: purpose.map(str::to_string),
        ring: ring.map(str::to_string),
        pods,
        marks: Default::default(),
    }
}

/// An acme identity (service account `name`) with the annotations `extra` and the `marks`
/// they stand for, one pod `<name>-0` on node-b at `at`: a marked endpoint pod of another
/// node.
pub fn acme_marked_pod(
    name: &str,
    extra: &[(&str, &str)],
    marks: crate::cluster::EndpointMarks,
    at: &str,
) -> ClusterIdentity {
    let pod = cluster_pod(
        "acme",
        &format!("{name}-0"),
        Some("node-b"),
        &[at.parse().expect("an address")],
        "2026-01-01T00:00:00Z",
    );
    ClusterIdentity {
        marks,
        ..cluster_identity("acme", name, Some("acme"), None, None, extra, vec![pod])
    }
}

/// A pod (UID `uid-<namespace>-<name>`), created at `created` (RFC 3339).
pub fn cluster_pod(
    namespace: &str,
    name: &str,
    node: Option<&str>,
    ips: &[IpAddr],
    created: &str,
) -> ClusterPod {
    ClusterPod {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{namespace}-{name}"),
        node: node.map(str::to_string),
        ips: ips.to_vec(),
        host_network: false,
        created: created.into(),
    }
}

/// A Service with one ClusterIP and ports `(port, protocol, backends)`.
pub fn cluster_service(
    namespace: &str,
    name: &str,
    cluster_ip: IpAddr,
    ports: &[(u16, crate::Protocol, Vec<Backend>)],
) -> ClusterService {
    ClusterService {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: vec![cluster_ip],
        external_ips: Vec::new(),
        tenant: None,
        ports: ports
            .iter()
            .map(|(port, protocol, backends)| ServicePort {
                port: *port,
                protocol: *protocol,
                backends: backends.clone(),
            })
            .collect(),
    }
}

/// `127.81.<n / 256>.<n % 256>`: the cluster test range.
pub fn cluster_ip4(n: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        81,
        (n / 256) as u8,
        (n % 256) as u8,
    ))
}

/// `fd81::<n>`: the cluster test range, IPv6.
pub fn cluster_ip6(n: usize) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(
        0xfd81_0000_0000_0000_0000_0000_0000_0000u128 | n as u128,
    ))
}

/// A small random cluster state for [`random_bundle`]'s inventories (tenants acme, globex,
/// initech; inventory addresses `127.20.0.n`): label sets of known, unknown and no tenants,
/// replicas, pods on `node` and elsewhere, IPv4 and IPv6, host-network pods, and Services
/// whose backends are pods, inventory addresses, unknown addresses, or none.
pub fn random_cluster(seed: u64, node: &str) -> ClusterState {
    let mut r = Rng::new(seed ^ 0x005e_edc1_u64);
    let tenants = [
        Some("acme"),
        Some("globex"),
        Some("initech"),
        Some("acme"),
        None,
        Some("umbrella"),
    ];
    let purposes = [
        None,
        Some("inference"),
        Some("evaluation"),
        Some("retrieval"),
    ];
    let rings = [None, Some("prod"), Some("dev")];
    let mut state = ClusterState {
        trust_domain: "cluster.local".into(),
        ..ClusterState::default()
    };
    let mut pod_ips: Vec<IpAddr> = Vec::new();
    let mut n = 0usize;
    let sets = 1 + r.below(7);
    for i in 0..sets {
        let tenant = *r.pick(&tenants);
        let ns = match tenant {
            Some(t) => format!("ns-{t}"),
            None => "kube-system".to_string(),
        };
        let sa = *r.pick(&["api", "rag", "worker"]);
        let mut pods = Vec::new();
        for k in 0..(1 + r.below(3)) {
            n += 1;
            let ip = if r.chance(25) {
                cluster_ip6(n)
            } else {
                cluster_ip4(n)
            };
            let on = if r.chance(50) {
                Some(node)
            } else if r.chance(80) {
                Some("other-node")
            } else {
                None
            };
            let mut pod = cluster_pod(
                &ns,
                &format!("p{i}-{k}"),
                on,
                &[ip],
                &format!("2026-01-01T00:00:{:02}Z", r.below(60)),
            );
            if r.chance(10) {
                pod.host_network = true;
                pod.ips.clear();
            } else {
                pod_ips.push(ip);
            }
            pods.push(pod);
        }
        let variant = format!("v{}", r.below(2));
        state.identities.push(cluster_identity(
            &ns,
            sa,
            tenant,
            *r.pick(&purposes),
            *r.pick(&rings),
            &[("app", &variant)],
            pods,
        ));
    }
    let services = r.below(4);
    for i in 0..services {
        let mut ports = Vec::new();
        for port in [80u16, 443, 53] {
            if !r.chance(60) {
                continue;
            }
            let protocol = if port == 53 {
                crate::Protocol::Udp
            } else {
                crate::Protocol::Tcp
            };
            let mut backends = Vec::new();
            for _ in 0..r.below(4) {
                let ip = match r.below(10) {
                    0..=5 if !pod_ips.is_empty() => *r.pick(&pod_ips),
                    6 | 7 => format!("127.20.0.{}", 1 + r.below(10))
                        .parse()
                        .unwrap_or(cluster_ip4(0)),
                    _ => cluster_ip4(64_000 + r.below(8)),
                };
                let target = *r.pick(&[port, 8000, 6333, 9000, 53]);
                backends.push(Backend { ip, port: target });
            }
            ports.push((port, protocol, backends));
        }
        let ns = format!("ns-{}", r.pick(&["acme", "globex"]));
        state.services.push(cluster_service(
            &ns,
            &format!("svc{i}"),
            cluster_ip4(60_000 + i),
            &ports,
        ));
    }
    state
}

// ---------------------------------------------------------------------------------------------
// Issue 9's scale: a node of a large cluster.

/// The shape of a synthetic cluster (see [`synthetic_cluster`]).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ClusterShape {
    pub pods: usize,
    /// Distinct label sets, spread evenly over the tenants.
    pub identities: usize,
    pub tenants: usize,
    /// Pods on this node, spread over the first `local_identities` label sets.
    pub local_pods: usize,
    pub local_identities: usize,
    /// Services (port 80/tcp to 8080): each over one label set's pods, every tenth over two
    /// label sets of one tenant (mixed backends).
    pub services: usize,
}

/// Issue 9's node: 20,000 pods, 2,000 identities, 50 tenants, 250 local pods on about 60
/// identities, 500 Services.
pub const ISSUE9: ClusterShape = ClusterShape {
    pods: 20_000,
    identities: 2_000,
    tenants: 50,
    local_pods: 250,
    local_identities: 60,
    services: 500,
};

/// The node whose pods are local in [`synthetic_cluster`].
pub const BENCH_NODE: &str = "node-0";

/// A bundle for [`synthetic_cluster`]: tenants `t0..`, one vector database per tenant
/// (127.81.200+t/8 . t), and the demo's policies (tenant isolation, purpose and risk rules).
pub fn cluster_bundle(dir: &Path, tenants: usize) -> io::Result<()> {
    let mut inv = String::from("tenants: [");
    inv += &(0..tenants)
        .map(|t| format!("t{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    inv += "]\ndefaults:\n  implicit_deny_atlas: [AML.T0012]\n  unknown_subject_atlas: [AML.T0103]\nendpoints:\n";
    for t in 0..tenants {
        let _ = writeln!(
            inv,
            "  - {{name: vectors-t{t}, tenant: t{t}, kind: vector_db, ips: [127.81.{}.{}/32], datasets: [kb-t{t}], ports: [{{port: 6333, action: query}}]}}",
            200 + t / 256,
            t % 256
        );
    }
    let policies = format!(
        "{}\n{}",
        include_str!("../../policies/demo/baseline.cedar"),
        include_str!("../../policies/demo/purpose.cedar")
    );
    write_bundle(dir, &inv, &policies)
}

/// A cluster state of `shape` (pods on IPv6 `fd81::/16`, ClusterIPs `127.81.0.0/16` below
/// 127.81.200.0). Pod `j` of label set `i` is created at second `j`; label set `i` is of
/// tenant `i % tenants`, purpose and ring varying with `i`.
pub fn synthetic_cluster(shape: &ClusterShape) -> ClusterState {
    let purposes = SYNTHETIC_PURPOSES;
    let rings = ["prod", "staging", "dev"];
    let per = shape.pods / shape.identities.max(1);
    let extra = shape.pods % shape.identities.max(1);
    let mut state = ClusterState {
        trust_domain: "cluster.local".into(),
        ..ClusterState::default()
    };
    let mut n = 0usize;
    let mut pod_ips: Vec<Vec<IpAddr>> = Vec::with_capacity(shape.identities);
    for i in 0..shape.identities {
        let t = i % shape.tenants;
        let ns = format!("t{t}");
        let count = per + usize::from(i < extra);
        let mut pods = Vec::with_capacity(count);
        let mut ips = Vec::with_capacity(count);
        for j in 0..count {
            n += 1;
            let ip = cluster_ip6(n);
            // Local pods: round-robin over the first `local_identities` label sets.
            let local =
                i < shape.local_identities && j * shape.local_identities + i < shape.local_pods;
            let node = if local {
                BENCH_NODE.to_string()
            } else {
                format!("node-{}", 1 + n % 80)
            };
            let mut pod = cluster_pod(
                &ns,
                &format!("w{i}-{j}"),
                Some(&node),
                &[ip],
                &format!("2026-01-01T00:{:02}:{:02}Z", (j / 60) % 60, j % 60),
            );
            pod.uid = format!("{:08x}-0000-4000-8000-{:012x}", i, j);
            pods.push(pod);
            ips.push(ip);
        }
        pod_ips.push(ips);
        let app = format!("a{i}");
        state.identities.push(cluster_identity(
            &ns,
            &format!("sa{}", i % 7),
            Some(&format!("t{t}")),
            Some(purposes[(i / shape.tenants) % purposes.len()]),
            Some(rings[(i / 3) % rings.len()]),
            &[("app", &app)],
            pods,
        ));
    }
    for s in 0..shape.services {
        let i = (s * shape.identities.max(1) / shape.services.max(1)) % shape.identities.max(1);
        let mut backends: Vec<Backend> = pod_ips[i]
            .iter()
            .map(|&ip| Backend { ip, port: 8080 })
            .collect();
        if s % 10 == 9 {
            // Another label set of the same tenant.
            let k = (i + shape.tenants) % shape.identities;
            backends.extend(pod_ips[k].iter().map(|&ip| Backend { ip, port: 8080 }));
        }
        let ns = format!("t{}", i % shape.tenants);
        state.services.push(cluster_service(
            &ns,
            &format!("svc{s}"),
            cluster_ip4(s),
            &[(80, crate::Protocol::Tcp, backends)],
        ));
    }
    state
}

/// Issue 9's figures, PDP side: a node of a large cluster merged and compiled, then a churn.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterBenchReport {
    pub shape: ClusterShape,
    /// Building the cluster state itself (the Kubernetes source's work, for scale).
    pub state_ms: f64,
    /// `Bundle::load` of the bundle alone, for comparison.
    pub load_ms: f64,
    /// `Bundle::load_with_cluster`: the bundle plus the merge.
    pub load_with_cluster_ms: f64,
    pub compile_ms: f64,
    pub load_and_compile_ms: f64,
    /// Identities in the bundle (WORLD, inventory, cluster label sets, Services): the
    /// IDENTITIES map's entries (capacity 65,536).
    pub identities: usize,
    pub cluster_identities: usize,
    pub services: usize,
    pub subjects: usize,
    pub destinations: usize,
    /// IP cache entries (capacity 262,144 each).
    pub ipcache_v4: usize,
    pub ipcache_v6: usize,
    pub cells: usize,
    pub cell_groups: usize,
    pub cedar_decisions: usize,
    /// Policy table entries needed.
    pub entries: usize,
    /// The entries if every cell were allowed (an allow-all policy): subjects x cells.
    pub entries_if_all_allowed: usize,
    pub policy_capacity: usize,
    pub problems: usize,
    pub churn: ChurnReport,
}

/// `pods_changed` pod replacements (half of them on this node) followed: the new state merged
/// and compiled from the previous table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChurnReport {
    pub pods_changed: usize,
    pub load_with_cluster_ms: f64,
    pub compile_incremental_ms: f64,
    pub total_ms: f64,
    pub cedar_decisions: usize,
    pub added: usize,
    pub removed: usize,
}

/// The POLICY map's default capacity (`enforcer_common`'s `capacity::POLICY`).
pub const POLICY_CAPACITY: usize = enforcer_common::capacity::POLICY as usize;

/// Write [`cluster_bundle`] into `dir`, build [`synthetic_cluster`] of `shape`, and time
/// `load_with_cluster` + `compile`, then a churn of 100 pods with `compile_incremental`.
///
/// Panics if the bundle does not load or compile (a bug, not a measurement), or if the
/// incremental compile differs from a full one.
#[allow(clippy::expect_used, clippy::panic)]
pub fn bench_cluster(dir: &Path, shape: &ClusterShape) -> ClusterBenchReport {
    use std::time::Instant;
    cluster_bundle(dir, shape.tenants).expect("writing the bundle");
    let options = crate::cluster::ClusterOptions {
        node_name: BENCH_NODE.into(),
        cluster_cidrs: Vec::new(),
        max_identities_per_tenant: crate::cluster::DEFAULT_MAX_IDENTITIES_PER_TENANT,
    };
    let t = Instant::now();
    let state = synthetic_cluster(shape);
    let state_ms = ms(t.elapsed());
    let t = Instant::now();
    let plain = crate::Bundle::load(dir).unwrap_or_else(|d| panic!("bundle invalid:\n{d}"));
    let load_ms = ms(t.elapsed());
    drop(plain);
    let t = Instant::now();
    let bundle = crate::Bundle::load_with_cluster(dir, &state, &options)
        .unwrap_or_else(|d| panic!("bundle invalid:\n{d}"));
    let load_with_cluster = t.elapsed();
    let t = Instant::now();
    let compiled = bundle.compile().expect("compiling");
    let compile = t.elapsed();
    let stats = compiled.stats();
    let ids = bundle.identities();
    let count = |f: &dyn Fn(&crate::Identity) -> bool| ids.iter().filter(|i| f(i)).count();
    let ips = |v4: bool| {
        ids.iter()
            .flat_map(|i| &i.ips)
            .filter(|n| n.is_ipv4() == v4)
            .count()
    };

    // Churn: 100 pods replaced (same label sets, new names and addresses), half local.
    let mut next = state.clone();
    let changed = 100.min(shape.pods);
    for k in 0..changed {
        let i = (k * 37) % next.identities.len();
        let ci = &mut next.identities[i];
        if ci.pods.is_empty() {
            continue;
        }
        let old = ci.pods.remove(0);
        let mut pod = cluster_pod(
            &ci.namespace,
            &format!("{}-r{k}", old.name),
            Some(if k % 2 == 0 { BENCH_NODE } else { "node-1" }),
            &[cluster_ip6(1_000_000 + k)],
            "2026-01-02T00:00:00Z",
        );
        pod.uid = format!("ffffffff-0000-4000-8000-{k:012x}");
        ci.pods.push(pod);
    }
    let t = Instant::now();
    let churned = crate::Bundle::load_with_cluster(dir, &next, &options)
        .unwrap_or_else(|d| panic!("bundle invalid:\n{d}"));
    let churn_load = t.elapsed();
    let t = Instant::now();
    let after = churned
        .compile_incremental(&compiled)
        .expect("compiling incrementally");
    let churn_compile = t.elapsed();
    let full = churned.compile().expect("compiling");
    assert!(
        full.allows() == after.allows(),
        "compile_incremental differs from compile"
    );
    let old: std::collections::HashMap<_, _> = compiled.allows().iter().copied().collect();
    let new: std::collections::HashMap<_, _> = after.allows().iter().copied().collect();

    ClusterBenchReport {
        shape: *shape,
        state_ms,
        load_ms,
        load_with_cluster_ms: ms(load_with_cluster),
        compile_ms: ms(compile),
        load_and_compile_ms: ms(load_with_cluster + compile),
        identities: ids.len(),
        cluster_identities: count(&|i| i.is_cluster() && i.kind == crate::IdentityKind::Workload),
        services: count(&|i| i.kind == crate::IdentityKind::Service),
        subjects: count(&|i| i.is_subject()),
        destinations: count(&|i| i.is_destination()),
        ipcache_v4: ips(true),
        ipcache_v6: ips(false),
        cells: stats.cells,
        cell_groups: stats.cell_groups,
        cedar_decisions: stats.cedar_decisions,
        entries: stats.allows,
        entries_if_all_allowed: stats.cells,
        policy_capacity: POLICY_CAPACITY,
        problems: bundle.cluster_problems().len(),
        churn: ChurnReport {
            pods_changed: changed,
            load_with_cluster_ms: ms(churn_load),
            compile_incremental_ms: ms(churn_compile),
            total_ms: ms(churn_load + churn_compile),
            cedar_decisions: after.stats().cedar_decisions,
            added: new.iter().filter(|(k, v)| old.get(k) != Some(v)).count(),
            removed: old.keys().filter(|k| !new.contains_key(k)).count(),
        },
    }
}

impl std::fmt::Display for ClusterBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shape;
        writeln!(
            f,
            "cluster: {} pods, {} label sets, {} tenants, {} local pods on {} label sets, {} Services",
            s.pods, s.identities, s.tenants, s.local_pods, s.local_identities, s.services
        )?;
        writeln!(
            f,
            "  load_with_cluster + compile {:8.1} ms  (load_with_cluster {:.1} ms [bundle alone {:.1} ms], compile {:.1} ms; building the state {:.1} ms)",
            self.load_and_compile_ms, self.load_with_cluster_ms, self.load_ms, self.compile_ms, self.state_ms
        )?;
        writeln!(
            f,
            "  identities       {:8}     ({} label sets, {} Services; {} subjects, {} destinations; IP cache {} v4 + {} v6; {} problems)",
            self.identities, self.cluster_identities, self.services, self.subjects, self.destinations, self.ipcache_v4, self.ipcache_v6, self.problems
        )?;
        writeln!(
            f,
            "  cells            {:8}     ({} groups, {} Cedar decisions)",
            self.cells, self.cell_groups, self.cedar_decisions
        )?;
        writeln!(
            f,
            "  policy entries   {:8}     of {} ({:.1}%); an allow-all policy would need {} ({:.1}%)",
            self.entries,
            self.policy_capacity,
            100.0 * self.entries as f64 / self.policy_capacity as f64,
            self.entries_if_all_allowed,
            100.0 * self.entries_if_all_allowed as f64 / self.policy_capacity as f64
        )?;
        let c = &self.churn;
        write!(
            f,
            "  churn            {:8.1} ms  ({} pods replaced: load_with_cluster {:.1} ms + compile_incremental {:.1} ms, {} Cedar decisions; +{} -{} entries)",
            c.total_ms, c.pods_changed, c.load_with_cluster_ms, c.compile_incremental_ms, c.cedar_decisions, c.added, c.removed
        )
    }
}

/// The kernel table of one policy over a cluster: identity pairs against classes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableFit {
    /// Entries keyed by identity pairs (what the table needed before classes).
    pub identity_pairs: usize,
    /// Entries keyed by (subject class, destination class): what the kernel holds.
    pub class_entries: usize,
    pub subject_classes: usize,
    pub destination_classes: usize,
    pub compile_ms: f64,
    /// `Classes::of` over the compiled table.
    pub classes_ms: f64,
}

/// Issue 9's question, "does the policy table fit": [`cluster_bundle`]'s policies (the demo
/// baseline: same-tenant permits, tenant isolation, purpose rules) and an allow-all policy
/// over [`synthetic_cluster`] of `shape`, each compiled and grouped into classes.
///
/// Panics if a bundle does not load or compile (a bug, not a measurement).
#[allow(clippy::expect_used, clippy::panic)]
pub fn bench_table_fit(dir: &Path, shape: &ClusterShape) -> (TableFit, TableFit) {
    use std::time::Instant;
    let options = crate::cluster::ClusterOptions {
        node_name: BENCH_NODE.into(),
        cluster_cidrs: Vec::new(),
        max_identities_per_tenant: crate::cluster::DEFAULT_MAX_IDENTITIES_PER_TENANT,
    };
    let state = synthetic_cluster(shape);
    let fit = |dir: &Path| {
        let bundle = crate::Bundle::load_with_cluster(dir, &state, &options)
            .unwrap_or_else(|d| panic!("bundle invalid:\n{d}"));
        let t = Instant::now();
        let compiled = bundle.compile().expect("compiling");
        let compile_ms = ms(t.elapsed());
        let t = Instant::now();
        let classes = crate::classes::Classes::of(compiled.allows().iter().map(|(k, v)| (k, v)));
        let classes_ms = ms(t.elapsed());
        let (subject_classes, destination_classes) = classes.counts();
        TableFit {
            identity_pairs: compiled.allows().len(),
            class_entries: classes.entries.len(),
            subject_classes,
            destination_classes,
            compile_ms,
            classes_ms,
        }
    };
    cluster_bundle(dir, shape.tenants).expect("writing the bundle");
    let baseline = fit(dir);
    std::fs::write(
        dir.join("policies.cedar"),
        "@id(\"allow-all\")\npermit (principal, action, resource);\n",
    )
    .expect("writing the allow-all policy");
    let allow_all = fit(dir);
    (baseline, allow_all)
}

impl std::fmt::Display for TableFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:9} identity-pair entries ({:.1}% of {}) -> {:6} class entries ({:.2}%; {} subject, {} destination classes; compile {:.0} ms, classes {:.0} ms)",
            self.identity_pairs,
            100.0 * self.identity_pairs as f64 / POLICY_CAPACITY as f64,
            POLICY_CAPACITY,
            self.class_entries,
            100.0 * self.class_entries as f64 / POLICY_CAPACITY as f64,
            self.subject_classes,
            self.destination_classes,
            self.compile_ms,
            self.classes_ms
        )
    }
}

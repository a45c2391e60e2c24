//! Compile the issue-3 speed scenario once and print the statistics:
//! `cargo run --release -p enforcer-policy --features bench --example compile_synthetic [identities local ports policies]`
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let dir = std::env::temp_dir().join(format!("enforcer-synthetic-{}", std::process::id()));
    enforcer_policy::testutil::synthetic_bundle(
        &dir,
        arg(0, 1000),
        arg(1, 100),
        arg(2, 2),
        arg(3, 50),
    )
    .unwrap();
    let t = std::time::Instant::now();
    let bundle = enforcer_policy::Bundle::load(&dir).unwrap_or_else(|d| panic!("{d}"));
    let load = t.elapsed();
    let compiled = bundle.compile().unwrap();
    let s = compiled.stats();
    println!(
        "load {:.1} ms, compile {:.1} ms: {} cells, {} Cedar decisions ({:.0}/s), {} allows, {} subject / {} destination groups",
        load.as_secs_f64() * 1e3,
        s.elapsed.as_secs_f64() * 1e3,
        s.cells,
        s.cedar_decisions,
        s.cedar_decisions as f64 / s.elapsed.as_secs_f64(),
        s.allows,
        s.subject_groups,
        s.destination_groups
    );
    let _ = std::fs::remove_dir_all(&dir);
}

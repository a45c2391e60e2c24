//! The issue-3 speed scenario, PDP side (what `cargo xtask bench` reports before the kernel
//! writes):
//! `cargo run --release -p enforcer-policy --features bench --example compile_synthetic [identities local ports policies]`
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let dir = std::env::temp_dir().join(format!("enforcer-synthetic-{}", std::process::id()));
    let report = enforcer_policy::testutil::bench_report_sized(
        &dir,
        arg(0, 1000),
        arg(1, 100),
        arg(2, 2),
        arg(3, 50),
    );
    println!("{report}");
    let new_identity = enforcer_policy::testutil::bench_new_identity_sized(
        &dir,
        arg(0, 1000),
        arg(1, 100),
        arg(2, 2),
        arg(3, 50),
    );
    print!("{new_identity}");
    if std::env::var_os("JSON").is_some() {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&new_identity).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! The issue-3 speed scenario, PDP side (what `cargo xtask bench` reports before the kernel
//! writes):
//! `cargo run --release -p enforcer-policy --features bench --example compile_synthetic [identities local ports policies]`
//!
//! Issue 9's cluster scale (a node of a large Kubernetes cluster: merge, compile, churn):
//! `cargo run --release -p enforcer-policy --features bench --example compile_synthetic cluster [pods identities tenants local_pods local_identities services]`
//! (default 20,000 pods, 2,000 label sets, 50 tenants, 250 local pods on 60 label sets, 500
//! Services).
fn main() {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    let cluster = raw.first().is_some_and(|a| a == "cluster");
    if cluster {
        raw.remove(0);
    }
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let dir = std::env::temp_dir().join(format!("enforcer-synthetic-{}", std::process::id()));
    if cluster {
        let d = enforcer_policy::testutil::ISSUE9;
        let shape = enforcer_policy::testutil::ClusterShape {
            pods: arg(0, d.pods),
            identities: arg(1, d.identities),
            tenants: arg(2, d.tenants),
            local_pods: arg(3, d.local_pods),
            local_identities: arg(4, d.local_identities),
            services: arg(5, d.services),
        };
        let report = enforcer_policy::testutil::bench_cluster(&dir, &shape);
        println!("{report}");
        // The kernel table keyed by classes (issue 9: "the policy table must fit").
        let (baseline, allow_all) = enforcer_policy::testutil::bench_table_fit(&dir, &shape);
        println!("  table, baseline {baseline}");
        println!("  table, allow-all {allow_all}");
        if std::env::var_os("JSON").is_some() {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
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

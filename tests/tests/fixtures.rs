//! The generated test bundles are valid and mean what the kernel tests assume (no kernel
//! needed): Cedar, through the policy crate, allows same-tenant calls, denies cross-tenant
//! ones except the explicit exception, and applies the purpose rule.

use anyhow::{ensure, Result};
use enforcer_policy::{Bundle, Protocol};
use enforcer_tests::fixtures::{standard_entities, write_bundle, STANDARD_POLICIES};

#[test]
fn standard_bundle_loads_and_decides_as_the_tests_assume() -> Result<()> {
    let bundle = write_bundle(&standard_entities(40), "enforcer-test-x", STANDARD_POLICIES)?;
    let oracle = Bundle::load(bundle.path())?;
    use Protocol::{Tcp, Udp};
    // (from, to, port, protocol, whether Cedar allows it, the rule that says so)
    #[rustfmt::skip]
    let cases = [
        ("acme-gateway",      "acme-vectors",     6333, Tcp, true,  "same tenant"),
        ("acme-evaluator",    "acme-vectors",     6334, Udp, true,  "same tenant udp"),
        ("acme-gateway",      "globex-vectors",   6333, Tcp, false, "cross tenant"),
        ("initech-trainer",   "acme-vectors",     6333, Tcp, false, "cross tenant"),
        ("globex-agent",      "acme-vectors",     6333, Tcp, true,  "the exception"),
        ("globex-agent",      "acme-vectors",     6334, Udp, true,  "the exception, udp"),
        ("globex-retriever",  "acme-vectors",     6333, Tcp, false, "only globex-agent"),
        ("initech-trainer",   "initech-features", 7001, Tcp, true,  "write ok"),
        ("initech-evaluator", "initech-features", 7001, Tcp, false, "purpose rule"),
        ("initech-evaluator", "initech-features", 7002, Udp, false, "purpose rule udp"),
        ("initech-evaluator", "initech-features", 7000, Tcp, true,  "read ok"),
    ];
    for (from, to, port, proto, want, why) in cases {
        let allowed = oracle.decide(from, to, port, proto)?.allowed;
        ensure!(
            allowed == want,
            "{why}: {from} -> {to}:{port} allowed={allowed}, want {want}"
        );
    }
    Ok(())
}

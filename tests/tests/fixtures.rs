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
    let allowed = |from: &str, to: &str, port: u16, p: Protocol| -> Result<bool> {
        Ok(oracle.decide(from, to, port, p)?.allowed)
    };
    use Protocol::{Tcp, Udp};
    ensure!(
        allowed("acme-gateway", "acme-vectors", 6333, Tcp)?,
        "same tenant"
    );
    ensure!(
        allowed("acme-evaluator", "acme-vectors", 6334, Udp)?,
        "same tenant udp"
    );
    ensure!(
        !allowed("acme-gateway", "globex-vectors", 6333, Tcp)?,
        "cross tenant"
    );
    ensure!(
        !allowed("initech-trainer", "acme-vectors", 6333, Tcp)?,
        "cross tenant"
    );
    ensure!(
        allowed("globex-agent", "acme-vectors", 6333, Tcp)?,
        "the exception"
    );
    ensure!(
        allowed("globex-agent", "acme-vectors", 6334, Udp)?,
        "the exception, udp"
    );
    ensure!(
        !allowed("globex-retriever", "acme-vectors", 6333, Tcp)?,
        "only globex-agent"
    );
    ensure!(
        allowed("initech-trainer", "initech-features", 7001, Tcp)?,
        "write ok"
    );
    ensure!(
        !allowed("initech-evaluator", "initech-features", 7001, Tcp)?,
        "purpose rule"
    );
    ensure!(
        !allowed("initech-evaluator", "initech-features", 7002, Udp)?,
        "purpose rule udp"
    );
    ensure!(
        allowed("initech-evaluator", "initech-features", 7000, Tcp)?,
        "read ok"
    );
    Ok(())
}

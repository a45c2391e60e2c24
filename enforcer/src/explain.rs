//! `enforcer policy explain`: the PDP's decision for one cell, and next to it what the kernel's
//! live table holds, so an operator sees at once whether the two agree.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use enforcer_common::PolicyKey;
use enforcer_policy::{Bundle, Protocol};

use crate::datapath::{pin_dir, Tables};

pub fn run(
    dir: &Path,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
    pin_root: &Path,
    state_dir: &Path,
) -> Result<ExitCode> {
    let mut bundle = Bundle::load(dir)
        .map_err(|d| anyhow::anyhow!("the policy bundle {} is invalid:\n{d}", dir.display()))?;
    // Explain what the running agent enforces: its run-time risk overrides included.
    if let Some(state) = crate::agent::read_state(state_dir) {
        crate::agent::apply_risk_overrides(&mut bundle, &state.risk_overrides);
    }
    let explanation = bundle
        .explain(from, to, port, protocol)
        .context("explaining")?;
    print!("{explanation}");
    let decision = bundle.decide(from, to, port, protocol)?;

    let pins = pin_dir(pin_root);
    if !pins.exists() {
        println!(
            "kernel: no enforcer pinned at {} (nothing to compare)",
            pins.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tables = Tables::open(&pins)?;
    let identities = bundle.identities();
    let (Some(subject), Some(destination)) = (identities.by_name(from), identities.by_name(to))
    else {
        println!("kernel: {from} or {to} has no identity in this bundle");
        return Ok(ExitCode::SUCCESS);
    };
    let key = PolicyKey {
        subject: subject.id,
        destination: destination.id,
        dport: port,
        protocol: protocol.number(),
        _pad: 0,
    };
    let live = tables.lookup(key)?;
    let kernel_allows = live.is_some_and(|(_, value)| value.is_allow());
    match live {
        Some((hit, value)) => {
            println!(
                "kernel: {} (entry subject={} destination={} port={} rule={}) in the active table",
                if value.is_allow() { "ALLOW" } else { "DENY" },
                hit.subject,
                hit.destination,
                if hit.dport == 0 {
                    "any".to_string()
                } else {
                    hit.dport.to_string()
                },
                value.rule
            )
        }
        None => println!(
            "kernel: DENY (no entry for subject={} destination={} port={port})",
            key.subject, key.destination
        ),
    }
    if kernel_allows == decision.allowed {
        println!("kernel and PDP agree");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("kernel and PDP DISAGREE: the kernel holds another revision (is the agent running on {}?)", dir.display());
        Ok(ExitCode::from(3))
    }
}

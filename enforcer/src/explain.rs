//! `enforcer policy explain`: the PDP's decision for one cell, and next to it what the kernel
//! holds in every map the decision reads (the subject of each of the workload's cgroups, the
//! subject's identity entry, the identity each of the destination's addresses resolves to,
//! and the active table's entry), so an operator sees at once whether the two agree and, when
//! not, which map differs.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use enforcer_common::{flags, maps, IdentityInfo, PolicyKey};
use enforcer_policy::{Bundle, Identities, Identity, Protocol};

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
    // An address, as a deny event shows it: judged as the identity the kernel gives it.
    let to = match to.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            // An IPv4-mapped address is its IPv4 one, as the kernel looks it up.
            let ip = ip.to_canonical();
            let name = bundle.identities().at_address(&ip).name.clone();
            crate::outln!(
                "{ip} is {name} in this bundle (the longest prefix of its addresses that holds it; a cluster's pod and node addresses are not in a bundle)"
            );
            name
        }
        Err(_) => to.to_string(),
    };
    let to = to.as_str();
    let explanation = bundle.explain(from, to, port, protocol).map_err(|error| {
        let error = anyhow::Error::new(error);
        if bundle.identities().by_name(to).is_none() {
            // A name that is not there: say what is.
            error.context(format!(
                "explaining: `--to` takes a workload, endpoint or Service name, an IP address, or one of {}",
                enforcer_policy::identity::RESERVED_NAMES.join(", ")
            ))
        } else {
            error.context("explaining")
        }
    })?;
    crate::out!("{explanation}");
    let decision = bundle.decide(from, to, port, protocol)?;

    let pins = pin_dir(pin_root);
    if !pins.exists() {
        crate::outln!(
            "kernel: no enforcer pinned at {} (nothing to compare)",
            pins.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tables = Tables::open(&pins)?;
    let identities = bundle.identities();
    let (Some(subject), Some(destination)) = (identities.by_name(from), identities.by_name(to))
    else {
        crate::outln!("kernel: {from} or {to} has no identity in this bundle");
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
    let entry_allows = live.is_some_and(|(_, value)| value.is_allow());
    match live {
        Some((hit, value)) => {
            crate::outln!(
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
        None => crate::outln!(
            "kernel: DENY (no entry for subject={} destination={} port={port})",
            key.subject,
            key.destination
        ),
    }
    if !entry_allows {
        // Audit lets the table's deny through: say so, not just the raw flags below.
        let global = tables.config().is_ok_and(|c| c.audit != 0);
        let own = tables
            .identity_info(subject.id)
            .is_some_and(|i| i.flags & flags::AUDIT != 0 && i.flags & flags::QUARANTINED == 0);
        if global || own {
            crate::outln!(
                "kernel: audit mode ({}) lets this deny through, reported as connection.audited",
                if global {
                    "the agent's --audit"
                } else {
                    "the subject's or its tenant's"
                }
            );
        }
    }

    let mut check = Check {
        identities,
        tables: &tables,
        disagreeing: Vec::new(),
    };
    check.subject_cgroups(subject);
    let subject_ok = check.subject_entry(subject);
    check.destination_addresses(destination, key)?;

    let kernel_allows = entry_allows && subject_ok;
    let mut disagreeing = check.disagreeing;
    if kernel_allows != decision.allowed {
        disagreeing.insert(0, "the active policy table".to_string());
    }
    if disagreeing.is_empty() {
        crate::outln!("kernel and PDP agree");
        Ok(ExitCode::SUCCESS)
    } else {
        disagreeing.dedup();
        crate::outln!(
            "kernel and PDP DISAGREE in {}: the kernel holds another revision (is the agent running on {}?)",
            disagreeing.join(", "),
            dir.display()
        );
        Ok(ExitCode::from(3))
    }
}

/// The comparisons besides the policy entry; each map that differs is named once.
struct Check<'a> {
    identities: &'a Identities,
    tables: &'a Tables,
    disagreeing: Vec<String>,
}

impl Check<'_> {
    fn name(&self, id: u32) -> String {
        self.identities.get(id).map_or_else(
            || format!("identity {id}"),
            |i| format!("{} ({id})", i.name),
        )
    }

    fn disagree(&mut self, map: &str) {
        if !self.disagreeing.iter().any(|m| m == map) {
            self.disagreeing.push(map.to_string());
        }
    }

    /// `CGROUP_IDENTITY`: each existing cgroup of the subject maps to it.
    fn subject_cgroups(&mut self, subject: &Identity) {
        let Ok(mount) = crate::fs::cgroup2_mount() else {
            crate::outln!(
                "kernel map {}: no cgroup v2 mount to resolve cgroups (not compared)",
                maps::CGROUP_IDENTITY
            );
            return;
        };
        for relative in &subject.cgroups {
            let resolved = crate::fs::cgroup_path(&mount, relative)
                .ok()
                .and_then(|path| crate::fs::cgroup_id(&path).ok());
            let Some(cgroup) = resolved else {
                crate::outln!(
                    "kernel map {}: cgroup {relative} does not exist (yet): not compared",
                    maps::CGROUP_IDENTITY
                );
                continue;
            };
            match self.tables.identity_of_cgroup(cgroup) {
                Some(id) if id == subject.id => crate::outln!(
                    "kernel map {}: cgroup {relative} (id {cgroup}) -> {}: agrees",
                    maps::CGROUP_IDENTITY,
                    self.name(id)
                ),
                found => {
                    crate::outln!(
                        "kernel map {}: cgroup {relative} (id {cgroup}) -> {}, the bundle says {}: DISAGREES",
                        maps::CGROUP_IDENTITY,
                        found.map_or("no entry (unknown subject)".to_string(), |id| self.name(id)),
                        self.name(subject.id)
                    );
                    self.disagree(maps::CGROUP_IDENTITY);
                }
            }
        }
    }

    /// `IDENTITIES`: the subject's tenant, purpose, ring and flags (quarantine is run-time
    /// state: reported, and it makes the kernel deny). Returns whether the kernel would get
    /// past the subject to the policy table.
    fn subject_entry(&mut self, subject: &Identity) -> bool {
        let want = subject.info();
        match self.tables.identity_info(subject.id) {
            None => {
                crate::outln!(
                    "kernel map {}: no entry for {}: the kernel denies it as an unknown subject: DISAGREES",
                    maps::IDENTITIES,
                    self.name(subject.id)
                );
                self.disagree(maps::IDENTITIES);
                false
            }
            Some(found) => {
                let comparable = IdentityInfo {
                    flags: found.flags & !flags::QUARANTINED,
                    ..found
                };
                if comparable.same_identity(&want) {
                    crate::outln!(
                        "kernel map {}: {} tenant={} flags={:#x} ({}): agrees",
                        maps::IDENTITIES,
                        self.name(subject.id),
                        found.tenant,
                        found.flags,
                        flag_names(found.flags)
                    );
                } else {
                    crate::outln!(
                        "kernel map {}: {} holds {found:?}, the bundle says {want:?}: DISAGREES",
                        maps::IDENTITIES,
                        self.name(subject.id)
                    );
                    self.disagree(maps::IDENTITIES);
                }
                if found.flags & flags::QUARANTINED != 0 {
                    crate::outln!(
                        "kernel: {} is quarantined: the kernel denies every call of it (`enforcer quarantine release`)",
                        self.name(subject.id)
                    );
                    return false;
                }
                true
            }
        }
    }

    /// The IP caches: every address of the destination resolves to it, as the bundle says
    /// (a host address inside another identity's subnet resolves to the longest match).
    fn destination_addresses(&mut self, destination: &Identity, key: PolicyKey) -> Result<()> {
        for net in &destination.ips {
            let addr = net.addr;
            let want = self.expected(addr);
            let (found, map) = self.tables.destination_of(addr);
            if found == want {
                crate::outln!("kernel map {map}: {addr} -> {}: agrees", self.name(found));
                continue;
            }
            // What a connect to this address meets in the kernel instead.
            let judged = self
                .tables
                .lookup(PolicyKey {
                    destination: found,
                    ..key
                })?
                .is_some_and(|(_, value)| value.is_allow());
            crate::outln!(
                "kernel map {map}: {addr} -> {}, the bundle says {}: DISAGREES (a connect to {addr} port {} is judged as {} and {})",
                self.name(found),
                self.name(want),
                key.dport,
                self.name(found),
                if judged { "ALLOWED" } else { "denied" }
            );
            self.disagree(map);
        }
        Ok(())
    }

    /// The identity the bundle gives `addr`: the longest of its networks containing it.
    fn expected(&self, addr: IpAddr) -> u32 {
        self.identities
            .iter()
            .flat_map(|i| i.ips.iter().map(move |net| (net, i.id)))
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix)
            .map_or(enforcer_common::identity::WORLD, |(_, id)| id)
    }
}

/// `flags` by name (`enforcer_common::flags::NAMES`), `none` without any.
fn flag_names(flags: u32) -> String {
    let names: Vec<&str> = flags::NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

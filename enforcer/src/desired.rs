//! Compiled policy + the live cgroup tree -> what the kernel maps should hold. Pure except for
//! resolving cgroup paths to IDs, which is what ties an inventory to running processes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use enforcer_common::flags;
use enforcer_policy::Compiled;

use crate::datapath::{DesiredState, Need, Needs};

/// Cgroups named by the inventory that do not exist (yet): a pod not started, a typo. They
/// are retried on every resync and reported once each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unresolved(pub BTreeSet<String>);

pub struct Overrides<'a> {
    pub audit: bool,
    /// Identities quarantined at run time; the flag survives policy reloads.
    pub quarantined: &'a BTreeSet<u32>,
}

pub fn desired_state(
    compiled: &Compiled,
    cgroup_mount: &Path,
    overrides: &Overrides,
) -> (DesiredState, Unresolved) {
    let mut state = without_cgroups(compiled, overrides);
    let mut unresolved = Unresolved::default();
    state.cgroups = resolve_cgroups(compiled, cgroup_mount, &mut unresolved);
    (state, unresolved)
}

/// What a policy needs in each map on its own, counting every cgroup the inventory names
/// (whether or not it exists yet): what `enforcer policy check` holds against capacities.
pub fn needs(compiled: &Compiled) -> Needs {
    let quarantined = BTreeSet::new();
    let overrides = Overrides {
        audit: false,
        quarantined: &quarantined,
    };
    let mut needs = Needs::of(&without_cgroups(compiled, &overrides));
    let cgroups: BTreeSet<&String> = compiled.identities().flat_map(|i| &i.cgroups).collect();
    needs.cgroups = Need {
        entries: cgroups.len(),
        peak: cgroups.len(),
    };
    needs
}

/// Everything but the cgroup map, which depends on the live cgroup tree.
fn without_cgroups(compiled: &Compiled, overrides: &Overrides) -> DesiredState {
    let mut state = DesiredState {
        audit: overrides.audit,
        ..Default::default()
    };
    for identity in compiled.identities() {
        let mut info = identity.info();
        if overrides.quarantined.contains(&identity.id) {
            info.flags |= flags::QUARANTINED;
        }
        state.identities.insert(identity.id, info);
        for net in &identity.ips {
            match parse_cidr(&net.to_string()) {
                Some((IpAddr::V4(addr), len)) => {
                    state.ipcache_v4.insert((len, addr.octets()), identity.id);
                }
                Some((IpAddr::V6(addr), len)) => {
                    state.ipcache_v6.insert((len, addr.octets()), identity.id);
                }
                None => {
                    tracing::warn!(identity = %identity.name, cidr = %net, "unparsable CIDR skipped")
                }
            }
        }
    }
    state.allows = compiled.allows().iter().copied().collect();
    state
}

/// cgroup ID -> subject identity, for every inventory cgroup that exists now.
pub fn resolve_cgroups(
    compiled: &Compiled,
    cgroup_mount: &Path,
    unresolved: &mut Unresolved,
) -> BTreeMap<u64, u32> {
    let mut cgroups = BTreeMap::new();
    for identity in compiled.identities() {
        for relative in &identity.cgroups {
            let resolved = crate::fs::cgroup_path(cgroup_mount, relative)
                .ok()
                .and_then(|path| crate::fs::cgroup_id(&path).ok());
            match resolved {
                Some(id) => {
                    cgroups.insert(id, identity.id);
                }
                None => {
                    unresolved.0.insert(relative.clone());
                }
            }
        }
    }
    cgroups
}

/// "a.b.c.d/len" or a bare address. The masked network address is what the LPM trie wants.
fn parse_cidr(text: &str) -> Option<(IpAddr, u32)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, len.parse::<u32>().ok()?),
        None => {
            let addr = text.parse::<IpAddr>().ok()?;
            (addr, if addr.is_ipv4() { 32 } else { 128 })
        }
    };
    Some(match addr {
        IpAddr::V4(v4) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (IpAddr::V4((u32::from(v4) & mask).into()), len)
        }
        IpAddr::V6(v6) if len <= 128 => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            (IpAddr::V6((u128::from(v6) & mask).into()), len)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_masked_for_the_lpm_trie() {
        assert_eq!(
            parse_cidr("127.10.1.7/24"),
            Some(("127.10.1.0".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("127.10.1.7"),
            Some(("127.10.1.7".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_cidr("fd00::1:2/112"),
            Some(("fd00::1:0".parse().unwrap(), 112))
        );
        assert_eq!(
            parse_cidr("0.0.0.0/0"),
            Some(("0.0.0.0".parse().unwrap(), 0))
        );
        assert_eq!(parse_cidr("127.0.0.1/33"), None);
        assert_eq!(parse_cidr("nonsense"), None);
    }
}

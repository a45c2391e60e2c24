//! Compiled policy + the live cgroup tree -> what the kernel maps should hold. Pure except for
//! resolving cgroup paths to IDs, which is what ties an inventory (and the pods of a cluster
//! source) to running processes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use enforcer_common::{flags, identity, IdentityInfo};
use enforcer_policy::Compiled;

use crate::datapath::{DesiredState, Need, Needs};
use crate::sources::cgroups::Scan;

/// What could not be mapped, retried on every resync and reported once each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// Cgroups named by the inventory that do not exist (yet): a pod not started, a typo.
    pub cgroups: BTreeSet<String>,
    /// Local pods of a cluster identity whose cgroup is not in the tree (yet): the kubelet
    /// has not started them, or they are gone. `<uid> (<identity>)`.
    pub pods: BTreeSet<String>,
    /// Pod cgroups in the tree that no identity claims: their processes are unknown subjects
    /// (no cluster state yet, a namespace without a tenant, a quota hit...). Pod UIDs.
    pub unidentified_pods: BTreeSet<String>,
    /// Cgroups that two identities claim (an inventory path inside a pod's cgroup): left
    /// unmapped, never guessed. One line each.
    pub conflicts: BTreeSet<String>,
}

pub struct Overrides<'a> {
    pub audit: bool,
    /// Identities quarantined at run time; the flag survives policy reloads.
    pub quarantined: &'a BTreeSet<u32>,
    /// The agent's own cgroup ID, when it lies inside the enforced subtree: mapped to
    /// `identity::AGENT` (exempt), whoever else claims it.
    pub agent_cgroup: Option<u64>,
}

/// [`desired_state_with`] for a bundle without cluster identities (the inventory's cgroups
/// only).
pub fn desired_state(
    compiled: &Compiled,
    cgroup_mount: &Path,
    overrides: &Overrides,
) -> (DesiredState, Unresolved) {
    desired_state_with(compiled, cgroup_mount, None, overrides)
}

/// Everything the kernel maps should hold: the compiled policy, and the cgroup map from the
/// inventory's cgroup paths and, with `pods` (a scan of the cgroup root), the cgroups of each
/// cluster identity's local pods.
pub fn desired_state_with(
    compiled: &Compiled,
    cgroup_mount: &Path,
    pods: Option<&Scan>,
    overrides: &Overrides,
) -> (DesiredState, Unresolved) {
    let mut state = without_cgroups(compiled, overrides);
    let mut unresolved = Unresolved::default();
    state.cgroups = resolve_cgroups(
        compiled,
        cgroup_mount,
        pods,
        overrides.agent_cgroup,
        &mut unresolved,
    );
    (state, unresolved)
}

/// What a policy needs in each map on its own, counting every cgroup the inventory names
/// (whether or not it exists yet): what `enforcer policy check` holds against capacities.
pub fn needs(compiled: &Compiled) -> Needs {
    let quarantined = BTreeSet::new();
    let overrides = Overrides {
        audit: false,
        quarantined: &quarantined,
        agent_cgroup: None,
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
    // Present whether or not the agent runs inside the subtree: a fixed entry, so the map
    // does not change with where the agent runs.
    state
        .identities
        .insert(identity::AGENT, IdentityInfo::new(0, flags::EXEMPT));
    state.allows = compiled.allows().iter().copied().collect();
    state
}

/// An inventory cgroup that is not at or under the agent's cgroup root: the programs are
/// attached to the root alone, so the workload's processes there are never judged, whatever
/// the inventory says (red-team review 40 M6: accepted without a word). Its `Display` is the
/// problem line the agent reports (`cluster.problem`, `enforcer status`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CgroupOutsideRoot {
    pub workload: String,
    /// As the inventory gives it.
    pub cgroup: String,
    /// Relative to the cgroup mount, from `/`.
    pub root: String,
}

impl std::fmt::Display for CgroupOutsideRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "workload {}: cgroup {} is outside the cgroup root {}: its processes are never judged (the programs are attached to the root only)",
            self.workload, self.cgroup, self.root
        )
    }
}

/// Each inventory cgroup of `compiled` that is not at or under `cgroup_root` (both as
/// [`crate::fs::cgroup_path`] gives them below `cgroup_mount`), in workload order. A path
/// with `..`, which the inventory refuses, is skipped.
pub fn cgroups_outside_root(
    compiled: &Compiled,
    cgroup_mount: &Path,
    cgroup_root: &Path,
) -> Vec<CgroupOutsideRoot> {
    let root = cgroup_root
        .strip_prefix(cgroup_mount)
        .unwrap_or(cgroup_root);
    let root = Path::new("/").join(root).display().to_string();
    let mut outside = Vec::new();
    for identity in compiled.identities() {
        for relative in &identity.cgroups {
            let Ok(path) = crate::fs::cgroup_path(cgroup_mount, relative) else {
                continue;
            };
            if !path.starts_with(cgroup_root) {
                outside.push(CgroupOutsideRoot {
                    workload: identity.name.clone(),
                    cgroup: relative.clone(),
                    root: root.clone(),
                });
            }
        }
    }
    outside.sort();
    outside
}

/// cgroup ID -> subject identity, for every inventory cgroup that exists now and, with
/// `pods`, every cgroup at or under the cgroup of each local pod of a cluster identity
/// (`Identity::pod_uids`). A cgroup claimed by two identities is left out and reported in
/// `unresolved.conflicts`: its processes are unknown subjects until the claim is resolved.
/// `agent_cgroup` (the agent's own) is `identity::AGENT`, above every claim.
pub fn resolve_cgroups(
    compiled: &Compiled,
    cgroup_mount: &Path,
    pods: Option<&Scan>,
    agent_cgroup: Option<u64>,
    unresolved: &mut Unresolved,
) -> BTreeMap<u64, u32> {
    // cgroup ID -> (identity, who claims it: for the report).
    let mut claims: BTreeMap<u64, (u32, String)> = BTreeMap::new();
    let mut conflicted: BTreeSet<u64> = BTreeSet::new();
    let mut claim =
        |id: u64, identity: u32, what: String, unresolved: &mut Unresolved| match claims.get(&id) {
            Some((other, _)) if *other == identity => {}
            Some((_, first)) => {
                unresolved.conflicts.insert(format!(
                    "cgroup {id} is claimed by {first} and by {what}: left unmapped"
                ));
                conflicted.insert(id);
            }
            None => {
                claims.insert(id, (identity, what));
            }
        };
    let mut claimed_pods = BTreeSet::new();
    for identity in compiled.identities() {
        for relative in &identity.cgroups {
            let resolved = crate::fs::cgroup_path(cgroup_mount, relative)
                .ok()
                .and_then(|path| crate::fs::cgroup_id(&path).ok());
            match resolved {
                Some(id) => claim(
                    id,
                    identity.id,
                    format!("workload {} (cgroup {relative})", identity.name),
                    unresolved,
                ),
                None => {
                    unresolved.cgroups.insert(relative.clone());
                }
            }
        }
        let Some(pods) = pods else { continue };
        for uid in &identity.pod_uids {
            claimed_pods.insert(uid.as_str());
            let Some(pod) = pods.pods.get(uid) else {
                unresolved.pods.insert(format!("{uid} ({})", identity.name));
                continue;
            };
            for (path, &id) in &pod.cgroups {
                claim(
                    id,
                    identity.id,
                    format!("{} (pod {uid}, {})", identity.name, path.display()),
                    unresolved,
                );
            }
        }
    }
    if let Some(pods) = pods {
        unresolved.unidentified_pods = pods
            .pods
            .keys()
            .filter(|uid| !claimed_pods.contains(uid.as_str()))
            .cloned()
            .collect();
    }
    let mut map: BTreeMap<u64, u32> = claims
        .into_iter()
        .filter(|(id, _)| !conflicted.contains(id))
        .map(|(id, (identity, _))| (id, identity))
        .collect();
    if let Some(id) = agent_cgroup {
        map.insert(id, identity::AGENT);
    }
    map
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

    /// A scratch directory standing for the cgroup mount (the resolution reads names and
    /// inodes only; the kernel tests use real cgroups).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CID: &str = "4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
    const CID2: &str = "5c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

    fn uid(n: u8) -> String {
        format!("00000000-0000-4000-8000-0000000000{n:02x}")
    }

    fn cluster_state() -> enforcer_policy::cluster::ClusterState {
        use enforcer_policy::cluster::{labels, ClusterIdentity, ClusterPod, ClusterState};
        let pod = |n: u8, node: &str| ClusterPod {
            namespace: "acme".into(),
            name: format!("p{n}"),
            uid: uid(n),
            node: Some(node.into()),
            ips: vec![format!("127.83.200.{n}").parse().unwrap()],
            host_network: false,
            created: "2026-01-01T00:00:00Z".into(),
        };
        ClusterState {
            trust_domain: "cluster.local".into(),
            identities: vec![ClusterIdentity {
                labels: [
                    ("namespace", "acme"),
                    ("service_account", "default"),
                    (labels::TENANT, "acme"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                namespace: "acme".into(),
                service_account: "default".into(),
                tenant: Some("acme".into()),
                purpose: None,
                ring: None,
                // 1: here with cgroups; 3: here, no cgroup yet; 4: on another node.
                pods: vec![pod(1, "n"), pod(3, "n"), pod(4, "elsewhere")],
                marks: Default::default(),
            }],
            services: vec![],
            unidentified_ips: vec![],
            nodes: Default::default(),
            pod_cidrs: vec![],
            problems: vec![],
        }
    }

    /// Every cgroup under a local pod is the pod's identity; one the inventory also claims is
    /// nobody's (reported); a pod cgroup of no identity and a local pod without a cgroup are
    /// reported; without a scan only the inventory counts.
    #[test]
    fn pods_and_inventory_cgroups_resolve_without_guessing() {
        let mount =
            Scratch(std::env::temp_dir().join(format!("cg9-desired-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&mount.0);
        let pod1 = format!("kubepods/burstable/pod{}", uid(1));
        let pod2 = format!("kubepods/pod{}", uid(2));
        for dir in [
            format!("{pod1}/{CID}"),
            format!("{pod1}/{CID2}"),
            format!("{pod2}/{CID}"),
            "host/agent".to_string(),
        ] {
            std::fs::create_dir_all(mount.0.join(dir)).unwrap();
        }
        let id = |relative: &str| crate::fs::cgroup_id(&mount.0.join(relative)).unwrap();
        let bundle_dir = Scratch(mount.0.with_extension("bundle"));
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
        std::fs::create_dir_all(&bundle_dir.0).unwrap();
        for file in ["schema.cedarschema", "baseline.cedar"] {
            std::fs::copy(demo.join(file), bundle_dir.0.join(file)).unwrap();
        }
        // The inventory claims the host agent and, wrongly, a container of pod 1.
        std::fs::write(
            bundle_dir.0.join("inventory.yaml"),
            format!(
                "tenants: [acme]\nworkloads:\n  - name: host-agent\n    tenant: acme\n    cgroups: [host/agent, {pod1}/{CID}, missing/one]\n"
            ),
        )
        .unwrap();
        let options = enforcer_policy::cluster::ClusterOptions {
            node_name: "n".into(),
            ..Default::default()
        };
        let bundle =
            enforcer_policy::Bundle::load_with_cluster(&bundle_dir.0, &cluster_state(), &options)
                .unwrap();
        let compiled = bundle.compile().unwrap();
        let pod_identity = compiled
            .identities()
            .find(|i| !i.pod_uids.is_empty())
            .expect("the cluster identity is a local subject");
        assert_eq!(pod_identity.pod_uids, vec![uid(1), uid(3)]);
        let host = compiled.identity_by_name("host-agent").unwrap().id;

        let scan = crate::sources::cgroups::scan(&mount.0, Default::default()).unwrap();
        let mut unresolved = Unresolved::default();
        let cgroups = resolve_cgroups(&compiled, &mount.0, Some(&scan), None, &mut unresolved);
        let want: BTreeMap<u64, u32> = [
            (id("host/agent"), host),
            (id(&pod1), pod_identity.id),
            (id(&format!("{pod1}/{CID2}")), pod_identity.id),
        ]
        .into_iter()
        .collect();
        assert_eq!(cgroups, want);
        assert_eq!(
            unresolved.cgroups,
            ["missing/one".to_string()].into_iter().collect()
        );
        assert_eq!(
            unresolved.pods,
            [format!("{} ({})", uid(3), pod_identity.name)]
                .into_iter()
                .collect()
        );
        assert_eq!(unresolved.unidentified_pods, [uid(2)].into_iter().collect());
        assert_eq!(unresolved.conflicts.len(), 1, "{:?}", unresolved.conflicts);
        let conflict = unresolved.conflicts.iter().next().unwrap();
        assert!(
            conflict.contains("host-agent") && conflict.contains(&uid(1)),
            "{conflict}"
        );

        // Without a scan (no --kubernetes): the inventory alone, the conflict included.
        let mut unresolved = Unresolved::default();
        let cgroups = resolve_cgroups(&compiled, &mount.0, None, None, &mut unresolved);
        assert_eq!(cgroups.len(), 2);
        assert_eq!(cgroups[&id(&format!("{pod1}/{CID}"))], host);
        assert!(unresolved.pods.is_empty() && unresolved.conflicts.is_empty());

        // Under a root of `kubepods`, the host agent's and the missing cgroup are outside
        // (never judged: reported), the one inside a pod is not; a root of `host` holds
        // `host/agent` only, and `hos` (a prefix of its name, not of its path) nothing.
        let outside = |root: &str| -> Vec<String> {
            cgroups_outside_root(&compiled, &mount.0, &mount.0.join(root))
                .into_iter()
                .map(|o| o.cgroup)
                .collect()
        };
        assert_eq!(outside("kubepods"), ["host/agent", "missing/one"]);
        assert_eq!(
            outside("host"),
            [format!("{pod1}/{CID}"), "missing/one".to_string()]
        );
        assert_eq!(outside("hos").len(), 3);
        let first =
            cgroups_outside_root(&compiled, &mount.0, &mount.0.join("kubepods"))[0].to_string();
        assert!(
            first.starts_with(
                "workload host-agent: cgroup host/agent is outside the cgroup root /kubepods:"
            ),
            "{first}"
        );
    }

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

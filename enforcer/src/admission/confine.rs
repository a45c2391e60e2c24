//! What a pod in a tenant's namespace may hold: nothing the enforcer cannot contain.
//!
//! The kernel programs judge what a workload sends through its sockets. A container that may
//! write raw frames (`CAP_NET_RAW`: `AF_PACKET`, `AF_XDP`, which no cgroup hook sees on this
//! kernel), rewrite its packets beside netfilter (`CAP_NET_ADMIN`: tc, nftables netdev, an
//! unconnected socket's `DNAT`), load kernel programs or leave its cgroup (`CAP_SYS_ADMIN`,
//! `CAP_BPF`, a privileged container, the node's files through a `hostPath` volume) reaches
//! another tenant past every check (README, "What is and is not covered"). In a namespace
//! with a tenant, or one labelled enforced, the webhook therefore:
//!
//! - [`confine`] (`/mutate`): adds `NET_RAW` to the dropped capabilities of every container
//!   that neither drops it nor `ALL`. containerd's default set grants it to every container
//!   (CRI-O's does not); ping and raw sockets are refused by the enforcer anyway
//!   (`unsupported_socket`), so nothing a workload may do needs it.
//! - [`uncontained`] (`/validate`): refuses a privileged container, a capability added
//!   beyond the Pod Security Standards' `baseline` set ([`BASELINE_CAPABILITIES`]), a
//!   container that keeps `NET_RAW` (the mutating webhook was not called), the host's PID
//!   namespace (`hostPID`) and `hostPath` volumes: the `baseline` standard's rules on these,
//!   plus `NET_RAW` dropped. `hostNetwork` is admitted: such a pod is judged by its labels like
//!   any other.
//!
//! Containers are immutable once created except through the `pods/ephemeralcontainers`
//! subresource (`kubectl debug`), so an update is judged on the ephemeral containers it adds
//! (Kubernetes 1.22 and later send that subresource's review as a Pod). Windows pods
//! (`spec.os.name: windows`) have no Linux capabilities: only their volumes and `hostPID`
//! are judged.
//!
//! Capability names are compared as the container runtimes read them: case-insensitive,
//! with or without the `CAP_` prefix (`net_admin`, `CAP_NET_ADMIN`).

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{PodSpec, SecurityContext};
use serde_json::Value;

/// The capabilities a container may add (Pod Security Standards, `baseline` profile,
/// "Capabilities": <https://kubernetes.io/docs/concepts/security/pod-security-standards/>).
pub const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The capability every container drops: `AF_PACKET` and `AF_XDP` need it.
pub const NET_RAW: &str = "NET_RAW";

/// Which containers of a pod are judged.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// A new pod: all of them, and the pod's own fields.
    Create,
    /// An update: only ephemeral containers that `old` (the pod before it) lacks.
    Update { old: Option<&'a PodSpec> },
}

/// One container of a pod, where it sits in the spec.
struct Slot<'a> {
    /// The spec's list (`containers`, `initContainers`, `ephemeralContainers`).
    list: &'static str,
    index: usize,
    name: &'a str,
    security: Option<&'a SecurityContext>,
}

impl Slot<'_> {
    fn describe(&self) -> String {
        let kind = match self.list {
            "initContainers" => "init container",
            "ephemeralContainers" => "ephemeral container",
            _ => "container",
        };
        format!("{kind} {:?}", self.name)
    }
}

/// The containers `scope` judges, in the spec's order.
fn judged<'a>(spec: &'a PodSpec, scope: Scope<'_>) -> Vec<Slot<'a>> {
    let mut slots = Vec::new();
    let ephemeral = spec.ephemeral_containers.iter().flatten().enumerate();
    let ephemeral = ephemeral.map(|(index, c)| Slot {
        list: "ephemeralContainers",
        index,
        name: &c.name,
        security: c.security_context.as_ref(),
    });
    match scope {
        Scope::Create => {
            let lists = [
                ("initContainers", spec.init_containers.as_deref()),
                ("containers", Some(spec.containers.as_slice())),
            ];
            for (list, containers) in lists {
                for (index, c) in containers.into_iter().flatten().enumerate() {
                    slots.push(Slot {
                        list,
                        index,
                        name: &c.name,
                        security: c.security_context.as_ref(),
                    });
                }
            }
            slots.extend(ephemeral);
        }
        Scope::Update { old } => {
            let before: BTreeSet<&str> = old
                .and_then(|o| o.ephemeral_containers.as_deref())
                .into_iter()
                .flatten()
                .map(|c| c.name.as_str())
                .collect();
            slots.extend(ephemeral.filter(|s| !before.contains(s.name)));
        }
    }
    slots
}

/// A capability's name as runtimes read it: upper case, without `CAP_`.
fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

/// Whether the container drops `NET_RAW` (by name or as `ALL`).
fn drops_net_raw(security: Option<&SecurityContext>) -> bool {
    security
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.drop.as_ref())
        .into_iter()
        .flatten()
        .map(|c| capability(c))
        .any(|c| c == NET_RAW || c == "ALL")
}

fn is_windows(spec: &PodSpec) -> bool {
    spec.os.as_ref().is_some_and(|os| os.name == "windows")
}

/// The JSON patch (RFC 6902) that adds `NET_RAW` to the dropped capabilities of each judged
/// container that keeps it, creating `securityContext`, `capabilities` or `drop` where
/// missing. Empty when there is nothing to add (and for Windows pods).
pub fn confine(spec: &PodSpec, scope: Scope<'_>) -> Vec<PatchOperation> {
    if is_windows(spec) {
        return Vec::new();
    }
    let mut ops = Vec::new();
    for slot in judged(spec, scope) {
        if drops_net_raw(slot.security) {
            continue;
        }
        let index = slot.index.to_string();
        let at = |tail: &[&str]| {
            let mut tokens = vec!["spec", slot.list, index.as_str(), "securityContext"];
            tokens.extend_from_slice(tail);
            PointerBuf::from_tokens(tokens)
        };
        let drop = || Value::Array(vec![Value::String(NET_RAW.into())]);
        let capabilities = slot.security.and_then(|s| s.capabilities.as_ref());
        let (path, value) = match (slot.security, capabilities) {
            (None, _) => (
                at(&[]),
                serde_json::json!({"capabilities": {"drop": [NET_RAW]}}),
            ),
            (Some(_), None) => (
                at(&["capabilities"]),
                serde_json::json!({"drop": [NET_RAW]}),
            ),
            (Some(_), Some(c)) if c.drop.is_none() => (at(&["capabilities", "drop"]), drop()),
            // `-` appends to the array (RFC 6901 4).
            (Some(_), Some(_)) => (
                at(&["capabilities", "drop", "-"]),
                Value::String(NET_RAW.into()),
            ),
        };
        ops.push(PatchOperation::Add(AddOperation { path, value }));
    }
    ops
}

/// Why a pod with `spec` holds something the enforcer cannot contain: one clause per
/// problem, each naming the container or volume and why (callers put the pod's name before
/// it). Empty when it may be admitted.
pub fn uncontained(spec: &PodSpec, scope: Scope<'_>) -> Vec<String> {
    let mut reasons = Vec::new();
    if matches!(scope, Scope::Create) {
        if spec.host_pid == Some(true) {
            reasons.push(
                "hostPID: true shares the node's process namespace, from which a container \
                 can reach processes outside every enforced cgroup"
                    .to_string(),
            );
        }
        for volume in spec.volumes.iter().flatten() {
            if let Some(host) = &volume.host_path {
                reasons.push(format!(
                    "volume {:?} mounts the node's path {:?} (hostPath), through \
                     which a container can leave its cgroup or reach the enforcer's pins",
                    volume.name, host.path
                ));
            }
        }
    }
    if is_windows(spec) {
        return reasons;
    }
    for slot in judged(spec, scope) {
        let container = slot.describe();
        let security = slot.security;
        if security.and_then(|s| s.privileged) == Some(true) {
            reasons.push(format!(
                "{container} is privileged: it can load kernel programs, leave its \
                 cgroup and rewrite its packets unseen"
            ));
        }
        let added = security
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref());
        for name in added.into_iter().flatten() {
            let cap = capability(name);
            if BASELINE_CAPABILITIES.contains(&cap.as_str()) {
                continue;
            }
            let why = match cap.as_str() {
                "NET_RAW" => "it writes frames no hook sees (AF_PACKET, AF_XDP)",
                "NET_ADMIN" => "it rewrites packets after they were judged (tc, nftables, DNAT)",
                "SYS_ADMIN" | "BPF" => "it can load kernel programs or leave its cgroup",
                "ALL" => "that is every capability",
                _ => "only the Pod Security Standards' baseline capabilities may be added",
            };
            reasons.push(format!(
                "{container} adds capability {name}: {why}; allowed: {}",
                BASELINE_CAPABILITIES.join(", ")
            ));
        }
        if !drops_net_raw(security) {
            reasons.push(format!(
                "{container} keeps NET_RAW (the container runtime's default grants \
                 it), with which it writes frames no hook sees: add NET_RAW to its \
                 securityContext.capabilities.drop (the mutating webhook does when it is \
                 registered)"
            ));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: Value) -> PodSpec {
        serde_json::from_value(value).unwrap()
    }

    /// The spec after the patch, applied as the API server applies it.
    fn patched(spec_value: &Value, ops: &[PatchOperation]) -> PodSpec {
        let mut pod = serde_json::json!({ "spec": spec_value });
        json_patch::patch(&mut pod, ops).unwrap();
        serde_json::from_value(pod["spec"].clone()).unwrap()
    }

    #[test]
    fn drops_net_raw_wherever_it_is_kept_and_only_there() {
        let value = serde_json::json!({
            "initContainers": [{"name": "init"}],
            "containers": [
                {"name": "bare"},
                {"name": "empty", "securityContext": {}},
                {"name": "no-drop", "securityContext": {"capabilities": {"add": ["CHOWN"]}}},
                {"name": "drops", "securityContext": {"capabilities": {"drop": ["MKNOD"]}}},
                {"name": "all", "securityContext": {"capabilities": {"drop": ["ALL"]}}},
                {"name": "lower", "securityContext": {"capabilities": {"drop": ["cap_net_raw"]}}},
            ],
            "ephemeralContainers": [{"name": "debug"}],
        });
        let ops = confine(&spec(value.clone()), Scope::Create);
        let paths: Vec<String> = ops
            .iter()
            .map(|op| match op {
                PatchOperation::Add(a) => a.path.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers/0/securityContext",
                "/spec/containers/0/securityContext",
                "/spec/containers/1/securityContext/capabilities",
                "/spec/containers/2/securityContext/capabilities/drop",
                "/spec/containers/3/securityContext/capabilities/drop/-",
                "/spec/ephemeralContainers/0/securityContext",
            ]
        );
        let after = patched(&value, &ops);
        assert!(uncontained(&after, Scope::Create).is_empty());
        assert_eq!(
            after.containers[3]
                .security_context
                .as_ref()
                .unwrap()
                .capabilities
                .as_ref()
                .unwrap()
                .drop,
            Some(vec!["MKNOD".to_string(), "NET_RAW".to_string()])
        );
        assert_eq!(
            after.containers[2]
                .security_context
                .as_ref()
                .unwrap()
                .capabilities
                .as_ref()
                .unwrap()
                .add,
            Some(vec!["CHOWN".to_string()]),
            "what was there stays"
        );
        // Called again (reinvocationPolicy: IfNeeded): nothing more.
        assert!(confine(&after, Scope::Create).is_empty());
    }

    #[test]
    fn refuses_what_the_enforcer_cannot_contain_naming_each() {
        let s = spec(serde_json::json!({
            "hostPID": true,
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "tmp", "emptyDir": {}}],
            "containers": [
                {"name": "app", "securityContext": {"privileged": true, "capabilities": {"drop": ["ALL"]}}},
                {"name": "mesh", "securityContext": {"capabilities": {"add": ["net_admin", "CAP_NET_BIND_SERVICE"], "drop": ["NET_RAW"]}}},
                {"name": "sniffer", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}},
            ],
        }));
        let reasons = uncontained(&s, Scope::Create);
        assert_eq!(reasons.len(), 6, "{reasons:#?}");
        assert!(reasons[0].starts_with("hostPID: true"), "{}", reasons[0]);
        assert!(
            reasons[1].starts_with(r#"volume "root" mounts the node's path "/" (hostPath)"#),
            "{}",
            reasons[1]
        );
        assert!(reasons[2].starts_with(r#"container "app" is privileged"#));
        assert!(
            reasons[3]
                .starts_with(r#"container "mesh" adds capability net_admin: it rewrites packets"#),
            "{}",
            reasons[3]
        );
        assert!(reasons[4].starts_with(r#"container "sniffer" adds capability NET_RAW"#));
        assert!(reasons[5].starts_with(r#"container "sniffer" keeps NET_RAW"#));
    }

    #[test]
    fn an_update_is_judged_on_the_ephemeral_containers_it_adds() {
        let old = spec(serde_json::json!({
            "containers": [{"name": "app"}],
            "ephemeralContainers": [{"name": "old-debug"}],
        }));
        let new_value = serde_json::json!({
            "containers": [{"name": "app"}],
            "ephemeralContainers": [
                {"name": "old-debug"},
                {"name": "debug", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
            ],
        });
        let new = spec(new_value.clone());
        let scope = Scope::Update { old: Some(&old) };
        let reasons = uncontained(&new, scope);
        assert_eq!(reasons.len(), 2, "{reasons:#?}");
        assert!(reasons[0].starts_with(r#"ephemeral container "debug" adds capability SYS_ADMIN"#));
        assert!(reasons[1].starts_with(r#"ephemeral container "debug" keeps NET_RAW"#));
        let ops = confine(&new, scope);
        assert_eq!(ops.len(), 1, "{ops:?}");
        let after = patched(&new_value, &ops);
        assert_eq!(uncontained(&after, scope).len(), 1, "only the SYS_ADMIN");
    }

    #[test]
    fn windows_pods_have_no_capabilities_to_drop() {
        let s = spec(serde_json::json!({
            "os": {"name": "windows"},
            "containers": [{"name": "app"}],
        }));
        assert!(confine(&s, Scope::Create).is_empty());
        assert!(uncontained(&s, Scope::Create).is_empty());
    }
}

//! What a pod may hold: nothing the enforcer cannot contain.
//!
//! The kernel programs judge what a workload sends through its sockets. A container that may
//! write raw frames (`CAP_NET_RAW`: `AF_PACKET`, `AF_XDP`, which no cgroup hook sees on this
//! kernel), rewrite its packets beside netfilter (`CAP_NET_ADMIN`: tc, nftables netdev, an
//! unconnected socket's `DNAT`), load kernel programs or leave its cgroup (`CAP_SYS_ADMIN`,
//! `CAP_BPF`, a privileged container, the node's files through a `hostPath` volume) reaches
//! another tenant past every check (README, "What is and is not covered"), from a namespace
//! without a tenant as much as from a tenant's. In every namespace it is called for (the
//! webhook configuration's selector spares those whose pods must hold such things: the
//! control plane, the CNI, the enforcer) the webhook therefore:
//!
//! - [`confine`] (`/mutate`): adds `NET_RAW` to the dropped capabilities of every container
//!   that neither drops it nor `ALL`. containerd's default set grants it to every container
//!   (CRI-O's does not); ping and raw sockets are refused by the enforcer anyway
//!   (`unsupported_socket`), so nothing a workload may do needs it.
//! - [`uncontained`] (`/validate`): refuses a privileged container, a capability added
//!   beyond the Pod Security Standards' `baseline` set ([`BASELINE_CAPABILITIES`]), a
//!   container that keeps `NET_RAW` (the mutating webhook was not called), the host's PID,
//!   IPC and network namespaces (in the node's, loopback reaches the node's own services),
//!   `hostPath` and `gitRepo` volumes, an unmasked `/proc`, a Windows `hostProcess`
//!   container, a `hostPort` (the node's port forwarded to the pod: calls judged as calls to
//!   the node reach it), a probe or lifecycle handler naming a `host` (the kubelet sends it
//!   from the node, unjudged, wherever the pod says) (the `baseline` standard's rules on
//!   these, plus `NET_RAW` dropped), and a runtime class the operator did not name
//!   ([`Confinement`]: a sandbox such as gVisor or Kata keeps its sockets in its own network
//!   stack, which no hook of the node sees; only its frames leave).
//!
//! A pod whose ingress is checked (the [`labels::INGRESS`] annotation, or its namespace's
//! floor) gets `net.ipv4.tcp_syncookies=0` where it sets none ([`syncookies_off`]), and is
//! refused with another value ([`syncookies_kept`]): a SYN cookie's ACK opens a connection
//! with no SYN before it, which the ingress check sees only from addresses no cluster client
//! has (README, "Identity on the wire"). Only a new pod is judged so: a pod's sysctls cannot
//! change, and refusing the update that turns its check on would leave it unchecked.
//!
//! Containers are immutable once created except through the `pods/ephemeralcontainers`
//! subresource (`kubectl debug`), so an update is judged on the ephemeral containers it adds
//! (Kubernetes 1.22 and later send that subresource's review as a Pod). Windows pods
//! (`spec.os.name: windows`) have no Linux capabilities to judge.
//!
//! Capability names are compared as containerd reads them: it upper-cases a name and puts
//! `CAP_` before it, so `net_raw` is `CAP_NET_RAW` but `CAP_NET_RAW` is `CAP_CAP_NET_RAW`,
//! which drops nothing. Only `NET_RAW` or `ALL` in any case counts as dropping it; only the
//! baseline names in any case may be added.

use std::collections::BTreeSet;

use enforcer_policy::cluster::labels;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    ContainerPort, Lifecycle, PodSecurityContext, PodSpec, Probe, SecurityContext,
};
use serde_json::Value;

use super::text::{cut, NAME_BYTES};

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

/// What the operator allows beyond the rules (`enforcer admission serve --runtime-class`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// The `runtimeClassName`s whose handler runs containers on the node's kernel (runc,
    /// crun): a pod naming another is refused. A pod naming none runs the node's default.
    pub runtime_classes: BTreeSet<String>,
}

/// Which containers of a pod are judged.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// A new pod: all of them, and the pod's own fields.
    Create,
    /// An update: only ephemeral containers whose names the pod before it (`before`) lacks.
    Update { before: &'a BTreeSet<String> },
}

/// One container of a pod, where it sits in the spec.
struct Slot<'a> {
    /// The spec's list (`containers`, `initContainers`, `ephemeralContainers`).
    list: &'static str,
    index: usize,
    name: &'a str,
    security: Option<&'a SecurityContext>,
    /// Its probes' and lifecycle handlers' `host`s: (where, host), empty ones left out.
    handler_hosts: Vec<(&'static str, &'a str)>,
    /// Its `ports[].hostPort`s.
    host_ports: Vec<i32>,
}

/// The probes and lifecycle handlers of a container that name a `host`: the kubelet sends
/// those from the node, to whatever address they name. An empty host is the pod's own
/// address.
fn handler_hosts<'a>(
    probes: [(&'static str, Option<&'a Probe>); 3],
    lifecycle: Option<&'a Lifecycle>,
) -> Vec<(&'static str, &'a str)> {
    let probes = probes.into_iter().filter_map(|(at, p)| {
        let p = p?;
        Some((at, p.http_get.as_ref(), p.tcp_socket.as_ref()))
    });
    let handlers = lifecycle.into_iter().flat_map(|l| {
        [
            ("postStart", l.post_start.as_ref()),
            ("preStop", l.pre_stop.as_ref()),
        ]
        .into_iter()
        .filter_map(|(at, h)| {
            let h = h?;
            Some((at, h.http_get.as_ref(), h.tcp_socket.as_ref()))
        })
    });
    let mut hosts = Vec::new();
    for (at, http, tcp) in probes.chain(handlers) {
        hosts.extend(http.and_then(|a| a.host.as_deref()).map(|h| (at, h)));
        hosts.extend(tcp.and_then(|a| a.host.as_deref()).map(|h| (at, h)));
    }
    hosts.retain(|(_, host)| !host.is_empty());
    hosts
}

/// The [`Slot`] of a container of any list: `Container` and `EphemeralContainer` have the
/// same fields (an ephemeral container's probes, lifecycle and ports, which the API server
/// refuses to fill, are judged all the same).
macro_rules! slot {
    ($list:expr, $index:expr, $c:expr) => {{
        let c = $c;
        Slot {
            list: $list,
            index: $index,
            name: &c.name,
            security: c.security_context.as_ref(),
            handler_hosts: handler_hosts(
                [
                    ("livenessProbe", c.liveness_probe.as_ref()),
                    ("readinessProbe", c.readiness_probe.as_ref()),
                    ("startupProbe", c.startup_probe.as_ref()),
                ],
                c.lifecycle.as_ref(),
            ),
            host_ports: host_ports(c.ports.as_ref()),
        }
    }};
}

fn host_ports(ports: Option<&Vec<ContainerPort>>) -> Vec<i32> {
    ports
        .into_iter()
        .flatten()
        .filter_map(|p| p.host_port)
        .filter(|p| *p != 0)
        .collect()
}

impl Slot<'_> {
    fn describe(&self) -> String {
        let kind = match self.list {
            "initContainers" => "init container",
            "ephemeralContainers" => "ephemeral container",
            _ => "container",
        };
        format!("{kind} {:?}", cut(self.name, NAME_BYTES))
    }
}

/// The most findings a pod's judgement lists (then how many more): a pod may hold a hundred
/// thousand added capabilities or host ports, each a sentence.
pub const MAX_FINDINGS: usize = 32;

/// The findings of a judgement: the first [`MAX_FINDINGS`], and how many more.
#[derive(Default)]
struct Found {
    list: Vec<Finding>,
    more: usize,
}

impl Found {
    /// Adds the finding `make` builds, or counts it once the list is full (then it is never
    /// built).
    fn add(&mut self, make: impl FnOnce() -> Finding) {
        if self.list.len() < MAX_FINDINGS {
            self.list.push(make());
        } else {
            self.more += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// The containers `scope` judges, in the spec's order.
fn judged<'a>(spec: &'a PodSpec, scope: Scope<'_>) -> Vec<Slot<'a>> {
    let mut slots = Vec::new();
    let ephemeral = spec.ephemeral_containers.iter().flatten().enumerate();
    let ephemeral = ephemeral.map(|(index, c)| slot!("ephemeralContainers", index, c));
    match scope {
        Scope::Create => {
            let lists = [
                ("initContainers", spec.init_containers.as_deref()),
                ("containers", Some(spec.containers.as_slice())),
            ];
            for (list, containers) in lists {
                for (index, c) in containers.into_iter().flatten().enumerate() {
                    slots.push(slot!(list, index, c));
                }
            }
            slots.extend(ephemeral);
        }
        Scope::Update { before } => {
            slots.extend(ephemeral.filter(|s| !before.contains(s.name)));
        }
    }
    slots
}

/// A capability's name as containerd reads it (after the `CAP_` it puts before it).
fn capability(name: &str) -> String {
    name.to_ascii_uppercase()
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

/// The namespaced sysctl that makes a listener answer SYNs with cookies once its SYN queue
/// fills (`1`, the kernel's default) or always (`2`): Linux
/// `Documentation/networking/ip-sysctl.rst`. One of Kubernetes' "safe" sysctls, which every
/// pod may set (`spec.securityContext.sysctls`).
pub const SYNCOOKIES: &str = "net.ipv4.tcp_syncookies";

/// The file a sysctl's name reaches, as a dotted name: the container runtime writes
/// `/proc/sys/` followed by the name with every `.` made `/` (runc; the kubelet first swaps
/// the separators of a name whose first one is `/`, `NormalizeName` in
/// `k8s.io/component-helpers/node/util/sysctl`), so `net.ipv4.tcp_syncookies`,
/// `net/ipv4/tcp_syncookies` and any mix of the two write one file. (A name whose parts hold
/// a dot, such as an interface `eth0.100`, is not one this module asks about.)
fn sysctl_file(name: &str) -> String {
    name.replace('/', ".")
}

/// The values a pod's security context (`spec.securityContext`) gives the sysctl `name`
/// (dotted form), in order: every entry whose name reaches the same file ([`sysctl_file`]).
/// Which one holds depends on the runtime's order, so a caller that needs a value to hold
/// checks them all.
pub fn sysctl_values<'a>(context: Option<&'a PodSecurityContext>, name: &str) -> Vec<&'a str> {
    let sysctls = context.and_then(|c| c.sysctls.as_ref());
    sysctls
        .into_iter()
        .flatten()
        .filter(|s| sysctl_file(&s.name) == name)
        .map(|s| s.value.as_str())
        .collect()
}

/// Whether a pod's security context turns SYN cookies off: [`SYNCOOKIES`] is set, and to
/// `"0"` in every entry.
pub fn syncookies_off_in(context: Option<&PodSecurityContext>) -> bool {
    let set = sysctl_values(context, SYNCOOKIES);
    !set.is_empty() && set.iter().all(|v| *v == "0")
}

/// Whether a new pod whose ingress is checked may be given [`SYNCOOKIES`]` = 0`: not a
/// Windows pod (no Linux sysctls), nor one in the node's network namespace (the API server
/// refuses its `net.*` sysctls, before the validating webhook could say why the pod is
/// refused).
fn takes_syncookies_off(spec: &PodSpec) -> bool {
    !is_windows(spec) && spec.host_network != Some(true)
}

/// The JSON patch operation that turns SYN cookies off in a new pod whose ingress is checked
/// and that does not set [`SYNCOOKIES`] itself (`set`: its values, [`sysctl_values`]): a
/// cookie's ACK makes a connection
/// with no SYN before it, so the ingress check, which judges SYNs and only such ACKs as no
/// cluster client sends, cannot see every connection where cookies are on (README, "Identity
/// on the wire"). Under `enforce`, where the policy does not let World in, its untagged SYNs
/// are dropped before the SYN queue, so the pod gives up no SYN-flood defence against
/// outsiders. `None`: nothing to add (a value of the pod's own is judged by
/// [`syncookies_kept`]).
pub fn syncookies_off(spec: &PodSpec, set: &[&str]) -> Option<PatchOperation> {
    if !set.is_empty() || !takes_syncookies_off(spec) {
        return None;
    }
    let sysctl = serde_json::json!({"name": SYNCOOKIES, "value": "0"});
    let context = spec.security_context.as_ref();
    let at = |tail: &[&str]| {
        let mut tokens = vec!["spec", "securityContext"];
        tokens.extend_from_slice(tail);
        PointerBuf::from_tokens(tokens)
    };
    let (path, value) = match context.map(|c| c.sysctls.is_some()) {
        None => (at(&[]), serde_json::json!({ "sysctls": [sysctl] })),
        Some(false) => (at(&["sysctls"]), Value::Array(vec![sysctl])),
        // `-` appends to the array (RFC 6901 4).
        Some(true) => (at(&["sysctls", "-"]), sysctl),
    };
    Some(PatchOperation::Add(AddOperation { path, value }))
}

/// Why a new pod whose ingress is checked (`mode`, named for the message) is refused for its
/// SYN cookies: an entry of [`SYNCOOKIES`] (`set`, as for [`syncookies_off`]) other than
/// `"0"` (which one holds is the runtime's choice, so every one must be `"0"`), or none at all (the
/// mutating webhook did not add it). `None`: it may be admitted.
pub fn syncookies_kept(spec: &PodSpec, mode: &str, set: &[&str]) -> Option<String> {
    let other = set.iter().find(|v| **v != "0");
    if (!set.is_empty() && other.is_none()) || !takes_syncookies_off(spec) {
        return None;
    }
    let what = match other {
        Some(value) => format!("sets sysctl {SYNCOOKIES}={:?}", cut(value, NAME_BYTES)),
        None => format!(
            "does not set sysctl {SYNCOOKIES}=0 (the mutating webhook did not add it: not \
             called, or the namespace changed between the two webhooks)"
        ),
    };
    Some(format!(
        "its ingress is checked ({} {mode}) but it {what}: a SYN cookie's ACK would open a \
         connection that no check saw; the sysctl must be \"0\"",
        labels::INGRESS
    ))
}

/// One thing a pod holds that the enforcer cannot contain.
enum Finding {
    HostPid,
    HostIpc,
    HostNetwork,
    /// A probe or lifecycle handler (`handler`) of `container` naming `host`.
    HandlerHost {
        container: String,
        handler: &'static str,
        host: String,
    },
    HostPort {
        container: String,
        port: i32,
    },
    GitRepo {
        volume: String,
    },
    RuntimeClass {
        name: String,
    },
    /// A Windows `hostProcess` container (`container`), or the pod's default (`None`).
    HostProcess {
        container: Option<String>,
    },
    UnmaskedProc {
        container: String,
    },
    HostPath {
        volume: String,
        path: String,
    },
    /// `container` as [`Slot::describe`] names it.
    Privileged {
        container: String,
    },
    Adds {
        container: String,
        capability: String,
    },
    KeepsNetRaw {
        container: String,
    },
}

impl Finding {
    /// The webhook's sentence: what, why, and what to change.
    fn sentence(&self) -> String {
        match self {
            Finding::HostPid => "hostPID: true shares the node's process namespace, from which \
                                 a container can reach processes outside every enforced cgroup"
                .to_string(),
            Finding::HostPath { volume, path } => format!(
                "volume {volume:?} mounts the node's path {path:?} (hostPath), through which a \
                 container can leave its cgroup or reach the enforcer's pins"
            ),
            Finding::HostIpc => "hostIPC: true shares the node's IPC namespace with processes \
                                 outside every enforced cgroup"
                .to_string(),
            Finding::HostNetwork => "hostNetwork: true puts the pod in the node's network \
                                     namespace, where it reaches the node's own services on \
                                     loopback and its abstract Unix sockets, and holds the \
                                     node's addresses and ports"
                .to_string(),
            Finding::HandlerHost {
                container,
                handler,
                host,
            } => format!(
                "{container}'s {handler} names host {host:?}: the kubelet sends it from the \
                 node, outside every enforced cgroup, to the address the pod chose; leave \
                 host empty (the pod's own address)"
            ),
            Finding::HostPort { container, port } => format!(
                "{container} asks for hostPort {port}: the node forwards its port to the pod, \
                 so calls judged as calls to the node reach it; expose it through a Service"
            ),
            Finding::GitRepo { volume } => format!(
                "volume {volume:?} is a gitRepo volume, which the kubelet clones as root on \
                 the node"
            ),
            Finding::RuntimeClass { name } => format!(
                "runtimeClassName {name:?} is not one the enforcer was told runs containers on \
                 the node's kernel (a sandbox such as gVisor or Kata keeps its sockets where no \
                 hook sees them): name it with `enforcer admission serve --runtime-class` if \
                 its handler is runc or crun"
            ),
            Finding::HostProcess { container } => format!(
                "{} runs as a Windows host process, outside every container boundary",
                container.as_deref().unwrap_or("the pod")
            ),
            Finding::UnmaskedProc { container } => {
                format!("{container} asks for an unmasked /proc (procMount: Unmasked)")
            }
            Finding::Privileged { container } => format!(
                "{container} is privileged: it can load kernel programs, leave its cgroup and \
                 rewrite its packets unseen"
            ),
            Finding::Adds {
                container,
                capability: name,
            } => {
                let why = match self::capability(name).as_str() {
                    "NET_RAW" => "it writes frames no hook sees (AF_PACKET, AF_XDP)",
                    "NET_ADMIN" => {
                        "it rewrites packets after they were judged (tc, nftables, DNAT)"
                    }
                    "SYS_ADMIN" | "BPF" => "it can load kernel programs or leave its cgroup",
                    "ALL" => "that is every capability",
                    _ => "only the Pod Security Standards' baseline capabilities may be added",
                };
                format!(
                    "{container} adds capability {name}: {why}; allowed: {}",
                    BASELINE_CAPABILITIES.join(", ")
                )
            }
            Finding::KeepsNetRaw { container } => format!(
                "{container} keeps NET_RAW (containerd's default set grants it), with \
                 which it writes frames no hook sees: add NET_RAW to its \
                 securityContext.capabilities.drop (the mutating webhook does when it is \
                 registered)"
            ),
        }
    }

    /// A short clause (the agent's report).
    fn clause(&self) -> String {
        match self {
            Finding::HostPid => "hostPID".to_string(),
            Finding::HostIpc => "hostIPC".to_string(),
            Finding::HostNetwork => "hostNetwork".to_string(),
            Finding::HandlerHost {
                container,
                handler,
                host,
            } => format!("{container} {handler} host {host}"),
            Finding::HostPort { container, port } => format!("{container} hostPort {port}"),
            Finding::HostPath { volume, path } => format!("hostPath volume {volume:?} ({path})"),
            Finding::GitRepo { volume } => format!("gitRepo volume {volume:?}"),
            Finding::RuntimeClass { name } => format!("runtime class {name:?}"),
            Finding::HostProcess { container } => {
                format!("{} host process", container.as_deref().unwrap_or("the pod"))
            }
            Finding::UnmaskedProc { container } => format!("{container} unmasked /proc"),
            Finding::Privileged { container } => format!("{container} privileged"),
            Finding::Adds {
                container,
                capability,
            } => format!("{container} adds {capability}"),
            Finding::KeepsNetRaw { container } => format!("{container} keeps NET_RAW"),
        }
    }
}

/// What a pod with `spec` holds that the enforcer cannot contain, of what `scope` judges;
/// its runtime class judged against `runtime_classes` (`None`: not judged).
///
/// The agent's slim decode (`sources::kubernetes::wire::Spec`) reads exactly the fields this
/// reads: one read here must be decoded there too, and held by the pod that
/// `wire_pods_decode_what_slim_pods_keep` decodes both ways.
fn findings(spec: &PodSpec, scope: Scope<'_>, runtime_classes: Option<&BTreeSet<String>>) -> Found {
    let mut found = Found::default();
    if matches!(scope, Scope::Create) {
        if spec.host_pid == Some(true) {
            found.add(|| Finding::HostPid);
        }
        if spec.host_ipc == Some(true) {
            found.add(|| Finding::HostIpc);
        }
        if spec.host_network == Some(true) {
            found.add(|| Finding::HostNetwork);
        }
        for volume in spec.volumes.iter().flatten() {
            if let Some(host) = &volume.host_path {
                found.add(|| Finding::HostPath {
                    volume: cut(&volume.name, NAME_BYTES),
                    path: cut(&host.path, NAME_BYTES),
                });
            }
            if volume.git_repo.is_some() {
                found.add(|| Finding::GitRepo {
                    volume: cut(&volume.name, NAME_BYTES),
                });
            }
        }
        if let (Some(name), Some(allowed)) = (&spec.runtime_class_name, runtime_classes) {
            if !allowed.contains(name) {
                found.add(|| Finding::RuntimeClass {
                    name: cut(name, NAME_BYTES),
                });
            }
        }
        let pod_windows = spec.security_context.as_ref();
        let pod_windows = pod_windows.and_then(|s| s.windows_options.as_ref());
        if pod_windows.and_then(|w| w.host_process) == Some(true) {
            found.add(|| Finding::HostProcess { container: None });
        }
    }
    // A host network pod's ports are the node's (the API server sets each `hostPort` to its
    // `containerPort`): said once, by `HostNetwork`.
    let host_network = spec.host_network == Some(true);
    for slot in judged(spec, scope) {
        let container = slot.describe();
        for (handler, host) in &slot.handler_hosts {
            found.add(|| Finding::HandlerHost {
                container: container.clone(),
                handler,
                host: cut(host, NAME_BYTES),
            });
        }
        for port in slot.host_ports.iter().filter(|_| !host_network) {
            found.add(|| Finding::HostPort {
                container: container.clone(),
                port: *port,
            });
        }
        let security = slot.security;
        let windows = security.and_then(|s| s.windows_options.as_ref());
        if windows.and_then(|w| w.host_process) == Some(true) {
            found.add(|| Finding::HostProcess {
                container: Some(container.clone()),
            });
        }
        if is_windows(spec) {
            continue;
        }
        if security.and_then(|s| s.proc_mount.as_deref()) == Some("Unmasked") {
            found.add(|| Finding::UnmaskedProc {
                container: container.clone(),
            });
        }
        if security.and_then(|s| s.privileged) == Some(true) {
            found.add(|| Finding::Privileged {
                container: container.clone(),
            });
        }
        let added = security
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref());
        for name in added.into_iter().flatten() {
            if !BASELINE_CAPABILITIES.contains(&capability(name).as_str()) {
                found.add(|| Finding::Adds {
                    container: container.clone(),
                    capability: cut(name, NAME_BYTES),
                });
            }
        }
        if !drops_net_raw(security) {
            found.add(|| Finding::KeepsNetRaw { container });
        }
    }
    found
}

/// Why a pod with `spec` holds something the enforcer cannot contain, of what `scope`
/// judges: one sentence per problem, each naming the container or volume (names cut to
/// [`NAME_BYTES`]), why, and what to change (callers put the pod's name before it); at most
/// [`MAX_FINDINGS`], then one saying how many more. Empty when it may be admitted.
pub fn uncontained(spec: &PodSpec, scope: Scope<'_>, confinement: &Confinement) -> Vec<String> {
    let found = findings(spec, scope, Some(&confinement.runtime_classes));
    let mut sentences: Vec<String> = found.list.iter().map(Finding::sentence).collect();
    if found.more > 0 {
        sentences.push(format!(
            "and {} more problems of the same kinds (the first {MAX_FINDINGS} are named)",
            found.more
        ));
    }
    sentences
}

/// The most clauses a [`summary`] lists, and the most bytes of each: a pod's spec is written
/// by whoever creates it (thousands of containers, a `hostPath` of a megabyte), and the agent
/// keeps a summary for every pod of the cluster.
pub const SUMMARY_CLAUSES: usize = 8;
pub const SUMMARY_CLAUSE_BYTES: usize = 160;

/// What a pod with `spec` holds that the enforcer cannot contain, in short clauses joined by
/// `"; "` (`container "app" keeps NET_RAW; hostPID`), at most [`SUMMARY_CLAUSES`] of them
/// (then `and N more`), each cut to [`SUMMARY_CLAUSE_BYTES`] (ending `...`); `None` when
/// nothing. The agent's report of pods admitted without the webhook, which does not know the
/// webhook's runtime classes: they are not judged here.
pub fn summary(spec: &PodSpec) -> Option<String> {
    let found = findings(spec, Scope::Create, None);
    if found.is_empty() {
        return None;
    }
    let mut clauses: Vec<String> = found
        .list
        .iter()
        .take(SUMMARY_CLAUSES)
        .map(|f| cut(&f.clause(), SUMMARY_CLAUSE_BYTES))
        .collect();
    let all = found.list.len() + found.more;
    if all > SUMMARY_CLAUSES {
        clauses.push(format!("and {} more", all - SUMMARY_CLAUSES));
    }
    Some(clauses.join("; "))
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
                {"name": "lower", "securityContext": {"capabilities": {"drop": ["net_raw"]}}},
                // containerd reads it as CAP_CAP_NET_RAW: nothing dropped.
                {"name": "prefixed", "securityContext": {"capabilities": {"drop": ["CAP_NET_RAW", " ALL"]}}},
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
                "/spec/containers/6/securityContext/capabilities/drop/-",
                "/spec/ephemeralContainers/0/securityContext",
            ]
        );
        let after = patched(&value, &ops);
        assert!(uncontained(&after, Scope::Create, &Confinement::default()).is_empty());
        let capabilities = |i: usize| {
            let security = after.containers[i].security_context.clone().unwrap();
            security.capabilities.unwrap()
        };
        assert_eq!(
            capabilities(3).drop,
            Some(vec!["MKNOD".to_string(), "NET_RAW".to_string()])
        );
        assert_eq!(
            capabilities(2).add,
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
                {"name": "mesh", "securityContext": {"capabilities": {"add": ["net_admin", "net_bind_service"], "drop": ["NET_RAW"]}}},
                {"name": "sniffer", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}},
            ],
        }));
        let reasons = uncontained(&s, Scope::Create, &Confinement::default());
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
        let before = old
            .ephemeral_containers
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        let scope = Scope::Update { before: &before };
        let reasons = uncontained(&new, scope, &Confinement::default());
        assert_eq!(reasons.len(), 2, "{reasons:#?}");
        assert!(reasons[0].starts_with(r#"ephemeral container "debug" adds capability SYS_ADMIN"#));
        assert!(reasons[1].starts_with(r#"ephemeral container "debug" keeps NET_RAW"#));
        let ops = confine(&new, scope);
        assert_eq!(ops.len(), 1, "{ops:?}");
        let after = patched(&new_value, &ops);
        assert_eq!(
            uncontained(&after, scope, &Confinement::default()).len(),
            1,
            "only the SYS_ADMIN"
        );
    }

    #[test]
    fn windows_pods_have_no_capabilities_to_drop() {
        let s = spec(serde_json::json!({
            "os": {"name": "windows"},
            "containers": [{"name": "app"}],
        }));
        assert!(confine(&s, Scope::Create).is_empty());
        assert!(uncontained(&s, Scope::Create, &Confinement::default()).is_empty());
    }

    #[test]
    fn the_rest_of_baseline_and_the_runtime_class() {
        let s = spec(serde_json::json!({
            "hostIPC": true,
            "runtimeClassName": "gvisor",
            "volumes": [{"name": "repo", "gitRepo": {"repository": "https://example.invalid/r"}}],
            "containers": [
                {"name": "app", "securityContext": {"procMount": "Unmasked",
                    "capabilities": {"add": ["CAP_CHOWN"], "drop": ["ALL"]}}},
            ],
        }));
        let runc = Confinement {
            runtime_classes: ["runc".to_string()].into(),
        };
        let reasons = uncontained(&s, Scope::Create, &runc);
        assert_eq!(reasons.len(), 5, "{reasons:#?}");
        assert!(reasons[0].starts_with("hostIPC: true"));
        assert!(reasons[1].starts_with(r#"volume "repo" is a gitRepo volume"#));
        assert!(reasons[2].starts_with(r#"runtimeClassName "gvisor" is not one"#));
        assert!(reasons[3].starts_with(r#"container "app" asks for an unmasked /proc"#));
        // containerd would add CAP_CAP_CHOWN: not a baseline name.
        assert!(reasons[4].starts_with(r#"container "app" adds capability CAP_CHOWN"#));
        let mut named = s.clone();
        named.runtime_class_name = Some("runc".into());
        assert_eq!(uncontained(&named, Scope::Create, &runc).len(), 4);
        // The agent's summary does not know the webhook's runtime classes.
        assert_eq!(
            summary(&s).unwrap(),
            r#"hostIPC; gitRepo volume "repo"; container "app" unmasked /proc; container "app" adds CAP_CHOWN"#
        );

        let windows = spec(serde_json::json!({
            "os": {"name": "windows"},
            "securityContext": {"windowsOptions": {"hostProcess": true}},
            "containers": [{"name": "app", "securityContext": {"windowsOptions": {"hostProcess": true}}}],
        }));
        let reasons = uncontained(&windows, Scope::Create, &runc);
        assert_eq!(reasons.len(), 2, "{reasons:#?}");
        assert!(reasons[0].starts_with("the pod runs as a Windows host process"));
        assert!(reasons[1].starts_with(r#"container "app" runs as a Windows host process"#));
    }

    /// A summary is bounded whatever the spec holds (the agent keeps one for every pod).
    #[test]
    fn a_summary_is_bounded() {
        let containers: Vec<Value> = (0..1000)
            .map(|i| serde_json::json!({"name": format!("c{i}")}))
            .collect();
        let long = format!("/{}", "é".repeat(1000));
        let s = spec(serde_json::json!({
            "containers": containers,
            "volumes": [{"name": "h", "hostPath": {"path": long}}],
        }));
        let text = summary(&s).unwrap();
        let clauses: Vec<&str> = text.split("; ").collect();
        assert_eq!(clauses.len(), SUMMARY_CLAUSES + 1, "{text}");
        assert!(
            clauses[0].starts_with(r#"hostPath volume "h" (/éé"#),
            "{text}"
        );
        assert!(clauses[0].ends_with("...") && clauses[0].len() <= SUMMARY_CLAUSE_BYTES);
        assert_eq!(clauses[1], r#"container "c0" keeps NET_RAW"#);
        assert_eq!(clauses[SUMMARY_CLAUSES], "and 993 more");
    }

    /// The webhook's sentences are bounded whatever the spec holds: a pod is judged before the
    /// API server validates it, and a sentence per added capability or host port, each
    /// repeating a container name of any length, made a 1 MB body a 3 GB answer (and a
    /// crash). At most `MAX_FINDINGS` sentences, then how many more; names cut.
    #[test]
    fn the_webhooks_sentences_are_bounded() {
        let name = "c".repeat(100_000);
        let s = spec(serde_json::json!({
            "containers": [{
                "name": name,
                "ports": vec![serde_json::json!({"containerPort": 1, "hostPort": 1}); 1000],
                "securityContext": {"capabilities": {
                    "add": vec!["X"; 100_000], "drop": ["ALL"],
                }},
            }],
        }));
        let sentences = uncontained(&s, Scope::Create, &Confinement::default());
        assert_eq!(sentences.len(), MAX_FINDINGS + 1);
        let cut_name = format!(r#"container "{}...""#, "c".repeat(NAME_BYTES - 3));
        assert!(sentences[0].starts_with(&format!("{cut_name} asks for hostPort 1")));
        assert!(sentences.iter().all(|s| s.len() < 1024), "{}", sentences[0]);
        assert_eq!(
            sentences[MAX_FINDINGS],
            format!(
                "and {} more problems of the same kinds (the first {MAX_FINDINGS} are named)",
                1000 + 100_000 - MAX_FINDINGS
            )
        );
    }

    /// What makes others send for the pod, or puts it at the node's addresses.
    #[test]
    fn the_node_sends_for_no_pod_and_lends_it_no_address() {
        let drop_all = serde_json::json!({"capabilities": {"drop": ["ALL"]}});
        let s = spec(serde_json::json!({
            "containers": [{
                "name": "app", "securityContext": drop_all,
                "readinessProbe": {"httpGet": {"host": "10.0.0.7", "path": "/admin", "port": 80}},
                "livenessProbe": {"tcpSocket": {"host": "", "port": 8080}},
                "startupProbe": {"grpc": {"port": 9000}},
                "lifecycle": {
                    "postStart": {"tcpSocket": {"host": "127.0.0.1", "port": 10248}},
                    "preStop": {"httpGet": {"port": 80}}
                },
                "ports": [{"containerPort": 80, "hostPort": 9100}, {"containerPort": 81}]
            }],
        }));
        let reasons = uncontained(&s, Scope::Create, &Confinement::default());
        assert_eq!(reasons.len(), 3, "{reasons:#?}");
        assert!(reasons[0].starts_with(
            r#"container "app"'s readinessProbe names host "10.0.0.7": the kubelet sends it from the node"#
        ));
        assert!(reasons[1].starts_with(r#"container "app"'s postStart names host "127.0.0.1""#));
        assert!(reasons[2].starts_with(r#"container "app" asks for hostPort 9100"#));
        // Empty hosts and the pod's own port are the pod's business.
        let mut own = s.clone();
        let c = &mut own.containers[0];
        c.readiness_probe = None;
        c.lifecycle = None;
        c.ports.as_mut().unwrap()[0].host_port = None;
        assert!(uncontained(&own, Scope::Create, &Confinement::default()).is_empty());
        // The node's network namespace: said once, not again for every port it implies.
        let mut host = own;
        host.host_network = Some(true);
        host.containers[0].ports.as_mut().unwrap()[0].host_port = Some(80);
        let reasons = uncontained(&host, Scope::Create, &Confinement::default());
        assert_eq!(reasons.len(), 1, "{reasons:#?}");
        assert!(reasons[0].starts_with("hostNetwork: true puts the pod in the node's network"));
    }
}

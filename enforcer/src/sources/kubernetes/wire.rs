//! The pod as the source decodes it from the API server: only the fields [`super::cluster_state`]
//! reads are built (its containers' security contexts only long enough to summarise them),
//! every other field of the JSON is skipped unparsed.
//!
//! A cold sync lists every pod of the cluster (20,000 at issue 9's scale) and decoding them
//! into `k8s_openapi` [`Pod`]s built every container, volume, environment variable and
//! managed-fields tree (a JSON value per entry) only for [`super::slim_pod`] to drop them.
//! [`WirePod`] builds a [`Pod`] holding exactly what `slim_pod` keeps, so the stores, the
//! model and its tests keep the `k8s_openapi` type.
//!
//! The admission webhook decodes the pods of its reviews with the same types
//! ([`AdmittedPod`]): what it judges is what the agent summarises (`confine`), and a review's
//! body is written by whoever reaches the webhook's port. Built as `k8s_openapi` types, a
//! container is 2 KiB and a volume 3 KiB: a 4 MiB body of `{"name":""}` volumes took 3 GiB.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EphemeralContainer, GitRepoVolumeSource, HTTPGetAction, HostIP,
    HostPathVolumeSource, Lifecycle, LifecycleHandler, Pod, PodIP, PodOS, PodSecurityContext,
    PodSpec, PodStatus, Probe, SecurityContext, TCPSocketAction, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::{Deserialize, Deserializer};

use crate::admission::confine;

/// A [`Pod`] with what [`super::slim_pod`] keeps; decoded (by the watcher, from lists and
/// watch events) without building the rest. Its [`Pod`] is [`WirePod::into_pod`].
#[derive(Clone, Debug, Default)]
pub struct WirePod(Pod);

impl WirePod {
    pub fn into_pod(self) -> Pod {
        self.0
    }
}

/// `$ty` is a Pod to the API machinery (kube's `Resource` for `AdmissionReview`, lists and
/// watches).
macro_rules! a_pod {
    ($ty:ty) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <Pod as k8s_openapi::Resource>::Scope;
        }
    };
}

a_pod!(WirePod);

impl k8s_openapi::ListableResource for WirePod {
    const LIST_KIND: &'static str = <Pod as k8s_openapi::ListableResource>::LIST_KIND;
}

impl k8s_openapi::Metadata for WirePod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Wire {
    #[serde(default)]
    pub(super) metadata: Meta,
    pub(super) spec: Option<Spec>,
    pub(super) status: Option<Status>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Meta {
    pub(super) name: Option<String>,
    /// Only the admission webhook reads it (a pod named by `generateName` has no name yet).
    pub(super) generate_name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) uid: Option<String>,
    /// The watcher resumes a watch from the last object's version.
    pub(super) resource_version: Option<String>,
    pub(super) labels: Option<BTreeMap<String, String>>,
    /// Only the annotations `model::kept_annotation` names are kept; the others are skipped
    /// as they are read.
    #[serde(default, deserialize_with = "mirror_annotation")]
    pub(super) annotations: Option<BTreeMap<String, String>>,
    pub(super) owner_references: Option<Vec<OwnerReference>>,
    pub(super) creation_timestamp: Option<Time>,
    pub(super) deletion_timestamp: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Spec {
    pub(super) node_name: Option<String>,
    /// Only the admission webhook judges it (against the operator's runtime classes, which the
    /// agent does not know).
    pub(super) runtime_class_name: Option<String>,
    pub(super) host_network: Option<bool>,
    pub(super) service_account_name: Option<String>,
    pub(super) service_account: Option<String>,
    // What `confine::summary` reads (every field of it: a field left out here reads as
    // absent, and a pod holding it would go unreported), summarised as the pod is decoded
    // and not kept.
    #[serde(default)]
    pub(super) containers: Vec<WireContainer>,
    pub(super) init_containers: Option<Vec<WireContainer>>,
    pub(super) ephemeral_containers: Option<Vec<WireContainer>>,
    #[serde(rename = "hostPID")]
    pub(super) host_pid: Option<bool>,
    #[serde(rename = "hostIPC")]
    pub(super) host_ipc: Option<bool>,
    pub(super) volumes: Option<Vec<WireVolume>>,
    /// Its `windowsOptions.hostProcess` and `sysctls` (SYN cookies).
    pub(super) security_context: Option<PodSecurityContext>,
    pub(super) os: Option<PodOS>,
}

/// What `confine::summary` reads of a container (of any of the three lists).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireContainer {
    pub(super) name: String,
    /// Boxed: most containers have none, and 384 bytes each would be what a body of
    /// `{"name":""}` containers makes the webhook hold per 12 bytes.
    pub(super) security_context: Option<Box<SecurityContext>>,
    pub(super) liveness_probe: Option<WireHandler>,
    pub(super) readiness_probe: Option<WireHandler>,
    pub(super) startup_probe: Option<WireHandler>,
    pub(super) lifecycle: Option<WireLifecycle>,
    pub(super) ports: Option<Vec<WirePort>>,
}

/// A probe or a lifecycle handler: the `host` of its `httpGet` and `tcpSocket`, the rest
/// (commands, headers, timings: most pods have probes) skipped unparsed.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireHandler {
    pub(super) http_get: Option<WireHost>,
    pub(super) tcp_socket: Option<WireHost>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct WireHost {
    pub(super) host: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireLifecycle {
    pub(super) post_start: Option<WireHandler>,
    pub(super) pre_stop: Option<WireHandler>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WirePort {
    pub(super) host_port: Option<i32>,
}

impl WireHandler {
    fn http_get(&self) -> Option<HTTPGetAction> {
        let host = self.http_get.as_ref()?.host.clone();
        Some(HTTPGetAction {
            host,
            ..HTTPGetAction::default()
        })
    }

    fn tcp_socket(&self) -> Option<TCPSocketAction> {
        let host = self.tcp_socket.as_ref()?.host.clone();
        Some(TCPSocketAction {
            host,
            ..TCPSocketAction::default()
        })
    }

    fn probe(self) -> Probe {
        Probe {
            http_get: self.http_get(),
            tcp_socket: self.tcp_socket(),
            ..Probe::default()
        }
    }

    fn handler(self) -> LifecycleHandler {
        LifecycleHandler {
            http_get: self.http_get(),
            tcp_socket: self.tcp_socket(),
            ..LifecycleHandler::default()
        }
    }
}

impl WireContainer {
    /// Its probes, lifecycle and ports as the `k8s_openapi` types hold them (what `confine`
    /// reads of them only).
    fn handlers(&mut self) -> [Option<Probe>; 3] {
        [
            self.liveness_probe.take().map(WireHandler::probe),
            self.readiness_probe.take().map(WireHandler::probe),
            self.startup_probe.take().map(WireHandler::probe),
        ]
    }

    fn lifecycle(&mut self) -> Option<Lifecycle> {
        self.lifecycle.take().map(|l| Lifecycle {
            post_start: l.post_start.map(WireHandler::handler),
            pre_stop: l.pre_stop.map(WireHandler::handler),
            ..Lifecycle::default()
        })
    }

    fn ports(&mut self) -> Option<Vec<ContainerPort>> {
        let ports = self.ports.take()?;
        Some(
            ports
                .into_iter()
                .map(|p| ContainerPort {
                    host_port: p.host_port,
                    ..ContainerPort::default()
                })
                .collect(),
        )
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireVolume {
    pub(super) name: String,
    pub(super) host_path: Option<HostPathVolumeSource>,
    pub(super) git_repo: Option<GitRepoVolumeSource>,
}

impl Spec {
    /// What the pod holds that the enforcer cannot contain (`confine::summary` of a spec with
    /// just what it reads); `None` inside when nothing, and outside for a spec without
    /// containers (as `slim_pod` reads one).
    fn uncontained(&mut self) -> Option<Option<String>> {
        if self.containers.is_empty() {
            return None;
        }
        Some(confine::summary(&self.take_judged()))
    }

    /// Containers, init and ephemeral containers, and the volumes `confine` judges (`hostPath`
    /// and `gitRepo`): what [`Self::take_judged`] builds as `k8s_openapi` types.
    pub(super) fn judged_items(&self) -> usize {
        let lists = [&self.init_containers, &self.ephemeral_containers];
        self.containers.len()
            + lists.into_iter().flatten().map(Vec::len).sum::<usize>()
            + self.volumes.iter().flatten().filter(|v| v.judged()).count()
    }

    /// The spec with what `confine` reads (its containers, security contexts, judged volumes
    /// and pod-level fields), taken out of `self`.
    pub(super) fn take_judged(&mut self) -> PodSpec {
        // `Container` and `EphemeralContainer` have the same fields.
        macro_rules! built {
            ($ty:ident, $c:expr) => {{
                let mut c: WireContainer = $c;
                let [liveness_probe, readiness_probe, startup_probe] = c.handlers();
                $ty {
                    lifecycle: c.lifecycle(),
                    ports: c.ports(),
                    name: c.name,
                    security_context: c.security_context.map(|s| *s),
                    liveness_probe,
                    readiness_probe,
                    startup_probe,
                    ..$ty::default()
                }
            }};
        }
        let container = |c| built!(Container, c);
        PodSpec {
            containers: std::mem::take(&mut self.containers)
                .into_iter()
                .map(container)
                .collect(),
            init_containers: self
                .init_containers
                .take()
                .map(|l| l.into_iter().map(container).collect()),
            ephemeral_containers: self.ephemeral_containers.take().map(|l| {
                l.into_iter()
                    .map(|c| built!(EphemeralContainer, c))
                    .collect()
            }),
            host_pid: self.host_pid,
            host_ipc: self.host_ipc,
            host_network: self.host_network,
            volumes: self.volumes.take().map(|l| {
                l.into_iter()
                    .filter(WireVolume::judged)
                    .map(|v| Volume {
                        name: v.name,
                        host_path: v.host_path,
                        git_repo: v.git_repo,
                        ..Volume::default()
                    })
                    .collect()
            }),
            security_context: self.security_context.take(),
            os: self.os.take(),
            node_name: self.node_name.clone(),
            runtime_class_name: self.runtime_class_name.clone(),
            ..PodSpec::default()
        }
    }
}

impl WireVolume {
    /// Whether `confine` judges it; the others (most of a pod's volumes) are not built.
    fn judged(&self) -> bool {
        self.host_path.is_some() || self.git_repo.is_some()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Status {
    pub(super) phase: Option<String>,
    #[serde(rename = "podIP")]
    pub(super) pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub(super) pod_ips: Option<Vec<PodIP>>,
    /// The node's addresses (`model::node_addresses`).
    #[serde(rename = "hostIP")]
    pub(super) host_ip: Option<String>,
    #[serde(rename = "hostIPs")]
    pub(super) host_ips: Option<Vec<HostIP>>,
}

/// The annotations map with only the kept ones ([`super::model::kept_annotation`]) in it
/// (`None` when the object has no annotations at all, as `k8s_openapi` decodes it).
fn mirror_annotation<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if super::model::kept_annotation(&key, "") {
                    let value = map.next_value::<String>()?;
                    if super::model::kept_annotation(&key, &value) {
                        kept.insert(key.into_owned(), value);
                    }
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Visit)
}

impl<'de> Deserialize<'de> for WirePod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(WirePod::from(Wire::deserialize(d)?))
    }
}

/// The one conversion of both encodings (JSON above, protobuf in `super::proto`).
impl From<Wire> for WirePod {
    fn from(mut wire: Wire) -> Self {
        let syncookies_off = wire
            .spec
            .as_ref()
            .is_some_and(|s| confine::syncookies_off_in(s.security_context.as_ref()));
        let uncontained = wire.spec.as_mut().and_then(Spec::uncontained);
        let m = wire.metadata;
        let node = wire.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let owner_references = super::node_owner(m.owner_references, node);
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                labels: m.labels,
                annotations: m.annotations,
                owner_references,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                ..ObjectMeta::default()
            },
            spec: wire.spec.map(|s| PodSpec {
                node_name: s.node_name,
                host_network: s.host_network,
                service_account_name: s.service_account_name,
                service_account: s.service_account,
                ..PodSpec::default()
            }),
            status: wire.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips,
                host_ip: s.host_ip,
                host_ips: s.host_ips,
                ..PodStatus::default()
            }),
        };
        super::bound_labels(&mut pod.metadata);
        if let Some(summary) = uncontained {
            super::keep_uncontained(&mut pod.metadata, summary);
        }
        super::keep_syncookies_off(&mut pod.metadata, syncookies_off);
        WirePod(pod)
    }
}

/// A pod of an AdmissionReview as the admission webhook decodes it: its name, namespace,
/// labels and kept annotations (the mirror mark), and its spec as [`Spec`] holds it, built
/// as a [`PodSpec`] only once [`Self::judged_spec`] has counted it. Everything else of the
/// object is skipped unparsed.
#[derive(Clone, Debug, Default)]
pub struct AdmittedPod {
    pub metadata: ObjectMeta,
    spec: Option<Spec>,
}

/// The most containers (of the three lists) and judged volumes ([`Spec::judged_items`]) a
/// pod the webhook judges may hold; each is built as a 2-3 KiB `k8s_openapi` type, and a
/// container may need an operation of the mutating webhook's patch (an answer the webhook
/// holds until it is read). Kubernetes sets no such bound, but no workload comes near it.
pub const MAX_JUDGED_ITEMS: usize = 256;

impl AdmittedPod {
    /// The spec with what `confine` reads (`PodSpec::default()` when the object has none);
    /// of an update, only its ephemeral containers (all an update is judged on, so that a
    /// pod's other containers never stop its updates). `Err` with the count when it holds
    /// more than [`MAX_JUDGED_ITEMS`].
    pub fn judged_spec(&self, update: bool) -> Result<PodSpec, usize> {
        let Some(spec) = &self.spec else {
            return Ok(PodSpec::default());
        };
        // Counted before anything is copied.
        let items = match update {
            true => spec.ephemeral_containers.as_ref().map_or(0, Vec::len),
            false => spec.judged_items(),
        };
        if items > MAX_JUDGED_ITEMS {
            return Err(items);
        }
        // Copied without what `take_judged` would drop (most of a pod's volumes).
        let create =
            |field: &Option<Vec<WireContainer>>| field.as_ref().filter(|_| !update).cloned();
        let mut judged = Spec {
            containers: if update {
                Vec::new()
            } else {
                spec.containers.clone()
            },
            init_containers: create(&spec.init_containers),
            ephemeral_containers: spec.ephemeral_containers.clone(),
            volumes: spec
                .volumes
                .as_ref()
                .filter(|_| !update)
                .map(|volumes| volumes.iter().filter(|v| v.judged()).cloned().collect()),
            node_name: spec.node_name.clone(),
            os: spec.os.clone(),
            // Pod-level fields are judged at creation only.
            runtime_class_name: spec
                .runtime_class_name
                .as_ref()
                .filter(|_| !update)
                .cloned(),
            host_network: spec.host_network.filter(|_| !update),
            host_pid: spec.host_pid.filter(|_| !update),
            host_ipc: spec.host_ipc.filter(|_| !update),
            security_context: spec.security_context.as_ref().filter(|_| !update).cloned(),
            service_account_name: None,
            service_account: None,
        };
        Ok(judged.take_judged())
    }

    /// The values its spec gives the sysctl `name` ([`confine::sysctl_values`]).
    pub fn sysctl(&self, name: &str) -> Vec<&str> {
        let spec = self.spec.as_ref();
        confine::sysctl_values(spec.and_then(|s| s.security_context.as_ref()), name)
    }

    /// The names of its ephemeral containers: what an update's old object had.
    pub fn ephemeral_names(&self) -> std::collections::BTreeSet<String> {
        let spec = self.spec.as_ref();
        let ephemeral = spec.and_then(|s| s.ephemeral_containers.as_ref());
        ephemeral
            .into_iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    }
}

impl<'de> Deserialize<'de> for AdmittedPod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(d)?;
        let m = wire.metadata;
        Ok(AdmittedPod {
            metadata: ObjectMeta {
                name: m.name,
                generate_name: m.generate_name,
                namespace: m.namespace,
                labels: m.labels,
                annotations: m.annotations,
                ..ObjectMeta::default()
            },
            spec: wire.spec,
        })
    }
}

a_pod!(AdmittedPod);

impl k8s_openapi::Metadata for AdmittedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

//! The pods' list read as protobuf, the API server's own encoding.
//!
//! A cold sync lists every pod of the cluster. The API server answers a list of 20,000 pods
//! from its watch cache in 1.0-1.3 s as JSON (50 MB, encoded whole before the first byte
//! leaves) and in 0.2-0.3 s as protobuf (22 MB), measured on this machine with the tests'
//! kube-apiserver 1.20: most of a cold sync was the server writing JSON. So the source asks
//! for `application/vnd.kubernetes.protobuf` when it lists pods ([`list_pods`]); watch events
//! stay JSON (one object each, and kube's watch decoder reads JSON).
//!
//! The messages below are the subset of `k8s.io/api/core/v1/generated.proto` and
//! `k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto` that [`super::wire`] reads, with
//! the upstream field numbers (Kubernetes never renumbers a field; taken from the generated
//! bindings of `k8s-pb` 0.8, Kubernetes 1.33). prost skips every other field unparsed, as the
//! JSON decoder skips them. [`Pod::into_wire`] turns one into the same [`wire::Wire`] the JSON
//! decoder builds, reading protobuf's zero values as JSON's `omitempty` leaves them out,
//! so both encodings give equal pods (`pods_decode_alike_from_protobuf_and_json` in the
//! real-server tests).
//!
//! The response format: the bytes `k8s\0`, then a `runtime.Unknown` whose `raw` holds the
//! object (a `PodList`, or a `Status` for an error), per the API server's
//! `k8s.io/apimachinery/pkg/runtime/serializer/protobuf` (its `protoEncodingPrefix`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{
    Capabilities, GitRepoVolumeSource, HostIP, HostPathVolumeSource, PodIP, PodOS,
    PodSecurityContext, SecurityContext, Sysctl, WindowsSecurityContextOptions,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    OwnerReference as OwnerRef, Time as JsonTime,
};
use kube::api::ListParams;
use kube::core::{ObjectList, Status as ApiStatus};
use kube::Client;
use prost::Message;

use super::wire::{self, WirePod};

/// The media type of Kubernetes' protobuf encoding.
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
/// What a protobuf response starts with (`protoEncodingPrefix`).
const MAGIC: &[u8; 4] = b"k8s\0";
/// The collection the source lists.
const PODS_PATH: &str = "/api/v1/pods";

/// An encoding of the API server's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `application/vnd.kubernetes.protobuf` (asked with JSON as the fallback).
    Protobuf,
    /// `application/json`.
    Json,
}

/// A page of pods: the pods, the list's `resourceVersion`, its `continue` token (empty when
/// it was the last page), and the encoding the server answered in.
pub(super) struct Page {
    pub pods: Vec<WirePod>,
    pub resource_version: String,
    pub continue_token: String,
    pub answered: Encoding,
    /// From the request to the answer's head (the server's time, mostly), to its last byte,
    /// and the decoding.
    pub head: Duration,
    pub body: Duration,
    pub decode: Duration,
}

/// Lists every pod with `params` in `encoding` (a server or a proxy that answers JSON to a
/// protobuf request is read too). A protobuf answer that does not decode is asked for again
/// as JSON: the API server stores whatever bytes a protobuf client wrote into a pod's
/// strings, and prost refuses a `string` that is not UTF-8, where the server's JSON encoder
/// writes U+FFFD for each bad byte (one tenant's pod must not keep every agent from its
/// list). Errors: the request failed, the server refused it (`kube::Error::Api` with its
/// status, as kube's own list gives), or the answer does not decode.
pub(super) async fn list_pods(
    client: &Client,
    params: &ListParams,
    encoding: Encoding,
) -> kube::Result<Page> {
    match list_once(client, params, encoding).await {
        Err(Failure::Undecodable(error)) if encoding == Encoding::Protobuf => {
            tracing::warn!(%error, "kubernetes: the pods' list as protobuf does not decode: listing them as JSON");
            list_once(client, params, Encoding::Json)
                .await
                .map_err(Failure::into_kube)
        }
        other => other.map_err(Failure::into_kube),
    }
}

/// Why one list failed.
enum Failure {
    /// The request, or the server's refusal.
    Kube(kube::Error),
    /// A success whose body does not decode (`kube::Error::Api`, reason
    /// `UndecodableResponse`, as the caller sees it).
    Undecodable(kube::Error),
}

impl Failure {
    fn into_kube(self) -> kube::Error {
        match self {
            Failure::Kube(e) | Failure::Undecodable(e) => e,
        }
    }
}

async fn list_once(
    client: &Client,
    params: &ListParams,
    encoding: Encoding,
) -> Result<Page, Failure> {
    let mut request = kube::core::Request::new(PODS_PATH)
        .list(params)
        .map_err(|e| Failure::Kube(kube::Error::BuildRequest(e)))?;
    let accept = match encoding {
        Encoding::Protobuf => "application/vnd.kubernetes.protobuf, application/json",
        Encoding::Json => "application/json",
    };
    request.headers_mut().insert(
        hyper::header::ACCEPT,
        hyper::header::HeaderValue::from_static(accept),
    );
    let started = Instant::now();
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(Failure::Kube)?;
    let head = started.elapsed();
    let status = response.status();
    let protobuf = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROTOBUF));
    let body: Bytes = response
        .into_body()
        .collect()
        .await
        .map_err(Failure::Kube)?
        .to_bytes();
    let received = started.elapsed();
    let decoded = if protobuf {
        decode_protobuf(status, body)
    } else {
        decode_json(status, &body)
    };
    let (pods, resource_version, continue_token) = match decoded {
        Ok(decoded) => decoded,
        Err(e) if status.is_success() => return Err(Failure::Undecodable(e)),
        Err(e) => return Err(Failure::Kube(e)),
    };
    Ok(Page {
        pods,
        resource_version,
        continue_token,
        answered: if protobuf {
            Encoding::Protobuf
        } else {
            Encoding::Json
        },
        head,
        body: received - head,
        decode: started.elapsed() - received,
    })
}

/// The pods of a protobuf answer (its `Bytes` shared, not copied: the envelope's `raw` and
/// each item are slices of it), each decoded and converted in turn, so that a list of large
/// pods is held once, not once encoded and once decoded.
fn decode_protobuf(
    status: hyper::StatusCode,
    body: Bytes,
) -> kube::Result<(Vec<WirePod>, String, String)> {
    if !body.starts_with(MAGIC) {
        return Err(undecodable(
            status,
            "a protobuf answer without the k8s\\0 prefix",
        ));
    }
    let raw = Unknown::decode(body.slice(MAGIC.len()..))
        .map_err(|e| undecodable(status, &format!("its runtime.Unknown envelope: {e}")))?
        .raw;
    if !status.is_success() {
        let s =
            Status::decode(raw).map_err(|e| undecodable(status, &format!("its Status: {e}")))?;
        let error = ApiStatus::failure(
            s.message.as_deref().unwrap_or_default(),
            s.reason.as_deref().unwrap_or_default(),
        )
        .with_code(s.code.map_or(status.as_u16(), |c| c as u16));
        return Err(kube::Error::Api(error.boxed()));
    }
    let list =
        PodList::decode(raw).map_err(|e| undecodable(status, &format!("its PodList: {e}")))?;
    let pods = list
        .items
        .into_iter()
        .map(|item| {
            Pod::decode(item)
                .map(Pod::into_wire_pod)
                .map_err(|e| undecodable(status, &format!("a pod of its PodList: {e}")))
        })
        .collect::<kube::Result<Vec<_>>>()?;
    let meta = list.metadata.unwrap_or_default();
    Ok((
        pods,
        meta.resource_version.unwrap_or_default(),
        meta.continue_token.unwrap_or_default(),
    ))
}

fn decode_json(
    status: hyper::StatusCode,
    body: &[u8],
) -> kube::Result<(Vec<WirePod>, String, String)> {
    if !status.is_success() {
        let error = serde_json::from_slice::<ApiStatus>(body).unwrap_or_else(|_| {
            ApiStatus::failure(&String::from_utf8_lossy(body), "Failed to parse error data")
                .with_code(status.as_u16())
        });
        return Err(kube::Error::Api(error.boxed()));
    }
    let list: ObjectList<WirePod> =
        serde_json::from_slice(body).map_err(kube::Error::SerdeError)?;
    Ok((
        list.items,
        list.metadata.resource_version.unwrap_or_default(),
        list.metadata.continue_.unwrap_or_default(),
    ))
}

/// An answer that does not decode, as a failed request with the HTTP status it came with.
fn undecodable(status: hyper::StatusCode, what: &str) -> kube::Error {
    let message = format!("the pods' list does not decode: {what}");
    kube::Error::Api(
        ApiStatus::failure(&message, "UndecodableResponse")
            .with_code(status.as_u16())
            .boxed(),
    )
}

/// `runtime.Unknown`: the envelope of every protobuf answer.
#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(bytes = "bytes", tag = "2")]
    raw: Bytes,
}

/// `meta.v1.Status`, what an error answer holds.
#[derive(Clone, PartialEq, Message)]
struct Status {
    #[prost(string, optional, tag = "3")]
    message: Option<String>,
    #[prost(string, optional, tag = "4")]
    reason: Option<String>,
    #[prost(int32, optional, tag = "6")]
    code: Option<i32>,
}

/// `PodList`, its items left encoded (an embedded message is a `bytes` field on the wire):
/// each is decoded and converted in turn.
#[derive(Clone, PartialEq, Message)]
struct PodList {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ListMeta>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    items: Vec<Bytes>,
}

#[derive(Clone, PartialEq, Message)]
struct ListMeta {
    #[prost(string, optional, tag = "2")]
    resource_version: Option<String>,
    #[prost(string, optional, tag = "3")]
    continue_token: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Pod {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<PodSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<PodStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "5")]
    uid: Option<String>,
    #[prost(string, optional, tag = "6")]
    resource_version: Option<String>,
    #[prost(message, optional, tag = "8")]
    creation_timestamp: Option<Time>,
    #[prost(message, optional, tag = "9")]
    deletion_timestamp: Option<Time>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "13")]
    owner_references: Vec<OwnerReference>,
}

#[derive(Clone, PartialEq, Message)]
struct Time {
    /// Whole seconds since the Unix epoch; the API server never writes `nanos` (metav1's
    /// `ProtoTime`: JSON holds seconds only).
    #[prost(int64, optional, tag = "1")]
    seconds: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct OwnerReference {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    uid: Option<String>,
    #[prost(string, optional, tag = "5")]
    api_version: Option<String>,
    #[prost(bool, optional, tag = "6")]
    controller: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    block_owner_deletion: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct PodSpec {
    #[prost(message, repeated, tag = "1")]
    volumes: Vec<Volume>,
    #[prost(message, repeated, tag = "2")]
    containers: Vec<Container>,
    #[prost(string, optional, tag = "8")]
    service_account_name: Option<String>,
    /// `deprecatedServiceAccount` in Go, `serviceAccount` in JSON.
    #[prost(string, optional, tag = "9")]
    service_account: Option<String>,
    #[prost(string, optional, tag = "10")]
    node_name: Option<String>,
    #[prost(bool, optional, tag = "11")]
    host_network: Option<bool>,
    #[prost(bool, optional, tag = "12")]
    host_pid: Option<bool>,
    #[prost(bool, optional, tag = "13")]
    host_ipc: Option<bool>,
    #[prost(message, optional, tag = "14")]
    security_context: Option<PodSecurityContextPb>,
    #[prost(message, repeated, tag = "20")]
    init_containers: Vec<Container>,
    #[prost(message, repeated, tag = "34")]
    ephemeral_containers: Vec<EphemeralContainer>,
    #[prost(message, optional, tag = "36")]
    os: Option<PodOs>,
}

/// The fields of a container that `confine::summary` reads (`Container` and
/// `EphemeralContainerCommon` number them alike).
#[derive(Clone, PartialEq, Message)]
struct Container {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "6")]
    ports: Vec<ContainerPort>,
    #[prost(message, optional, tag = "10")]
    liveness_probe: Option<Probe>,
    #[prost(message, optional, tag = "11")]
    readiness_probe: Option<Probe>,
    #[prost(message, optional, tag = "12")]
    lifecycle: Option<Lifecycle>,
    #[prost(message, optional, tag = "15")]
    security_context: Option<SecurityContextPb>,
    #[prost(message, optional, tag = "22")]
    startup_probe: Option<Probe>,
}

#[derive(Clone, PartialEq, Message)]
struct EphemeralContainer {
    #[prost(message, optional, tag = "1")]
    common: Option<Container>,
}

#[derive(Clone, PartialEq, Message)]
struct ContainerPort {
    #[prost(int32, optional, tag = "2")]
    host_port: Option<i32>,
}

/// A probe: its handler (`ProbeHandler`, inline in JSON) at field 1.
#[derive(Clone, PartialEq, Message)]
struct Probe {
    #[prost(message, optional, tag = "1")]
    handler: Option<Handler>,
}

/// `ProbeHandler` and `LifecycleHandler`: `httpGet` 2, `tcpSocket` 3 in both.
#[derive(Clone, PartialEq, Message)]
struct Handler {
    #[prost(message, optional, tag = "2")]
    http_get: Option<HttpGetAction>,
    #[prost(message, optional, tag = "3")]
    tcp_socket: Option<TcpSocketAction>,
}

#[derive(Clone, PartialEq, Message)]
struct HttpGetAction {
    #[prost(string, optional, tag = "3")]
    host: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct TcpSocketAction {
    #[prost(string, optional, tag = "2")]
    host: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Lifecycle {
    #[prost(message, optional, tag = "1")]
    post_start: Option<Handler>,
    #[prost(message, optional, tag = "2")]
    pre_stop: Option<Handler>,
}

#[derive(Clone, PartialEq, Message)]
struct SecurityContextPb {
    #[prost(message, optional, tag = "1")]
    capabilities: Option<CapabilitiesPb>,
    #[prost(bool, optional, tag = "2")]
    privileged: Option<bool>,
    #[prost(string, optional, tag = "9")]
    proc_mount: Option<String>,
    #[prost(message, optional, tag = "10")]
    windows_options: Option<WindowsOptions>,
}

#[derive(Clone, PartialEq, Message)]
struct CapabilitiesPb {
    #[prost(string, repeated, tag = "1")]
    add: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    drop: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct WindowsOptions {
    #[prost(bool, optional, tag = "4")]
    host_process: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct PodSecurityContextPb {
    #[prost(message, repeated, tag = "7")]
    sysctls: Vec<SysctlPb>,
    #[prost(message, optional, tag = "8")]
    windows_options: Option<WindowsOptions>,
}

#[derive(Clone, PartialEq, Message)]
struct SysctlPb {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PodOs {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// A volume: its name and, of its source (inline in JSON), `hostPath` 1 and `gitRepo` 5.
#[derive(Clone, PartialEq, Message)]
struct Volume {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, optional, tag = "2")]
    source: Option<VolumeSource>,
}

#[derive(Clone, PartialEq, Message)]
struct VolumeSource {
    #[prost(message, optional, tag = "1")]
    host_path: Option<HostPath>,
    #[prost(message, optional, tag = "5")]
    git_repo: Option<GitRepo>,
}

#[derive(Clone, PartialEq, Message)]
struct HostPath {
    #[prost(string, optional, tag = "1")]
    path: Option<String>,
    #[prost(string, optional, tag = "2")]
    type_: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct GitRepo {
    #[prost(string, optional, tag = "1")]
    repository: Option<String>,
    #[prost(string, optional, tag = "2")]
    revision: Option<String>,
    #[prost(string, optional, tag = "3")]
    directory: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PodStatus {
    #[prost(string, optional, tag = "1")]
    phase: Option<String>,
    #[prost(string, optional, tag = "5")]
    host_ip: Option<String>,
    #[prost(string, optional, tag = "6")]
    pod_ip: Option<String>,
    #[prost(message, repeated, tag = "12")]
    pod_ips: Vec<Ip>,
    #[prost(message, repeated, tag = "16")]
    host_ips: Vec<Ip>,
}

/// `PodIP` and `HostIP`.
#[derive(Clone, PartialEq, Message)]
struct Ip {
    #[prost(string, optional, tag = "1")]
    ip: Option<String>,
}

// Go's protobuf encoder writes a non-pointer field even when it holds its zero value, where
// JSON's `omitempty` leaves it out; these read such a field as JSON would.

/// A Go `string` with `omitempty`: `""` is absent.
fn text(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// A Go `bool` with `omitempty`: `false` is absent.
fn flag(b: Option<bool>) -> Option<bool> {
    b.filter(|b| *b)
}

/// A Go slice or map with `omitempty`: empty is absent.
fn some<T, C: IntoIterator<Item = T> + FromIterator<T>>(items: C) -> Option<C> {
    let mut items = items.into_iter().peekable();
    items.peek()?;
    Some(items.collect())
}

/// A Go `string` without `omitempty` (always in JSON).
fn required(s: Option<String>) -> String {
    s.unwrap_or_default()
}

/// Go's zero `time.Time` (year 1) in Unix seconds: JSON writes it as `null`.
const ZERO_TIME_SECONDS: i64 = -62_135_596_800;

fn time(t: Option<Time>) -> Option<JsonTime> {
    // Go writes a zero time as an empty message (and JSON as `null`).
    let seconds = t?.seconds?;
    if seconds == ZERO_TIME_SECONDS {
        return None;
    }
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .ok()
        .map(JsonTime)
}

fn handler(h: Option<Handler>) -> Option<wire::WireHandler> {
    let h = h?;
    Some(wire::WireHandler {
        http_get: h.http_get.map(|g| wire::WireHost { host: text(g.host) }),
        tcp_socket: h.tcp_socket.map(|t| wire::WireHost { host: text(t.host) }),
    })
}

fn probe(p: Option<Probe>) -> Option<wire::WireHandler> {
    // A probe is present whenever its message is, even with no handler in it.
    let p = p?;
    Some(handler(p.handler).unwrap_or(wire::WireHandler {
        http_get: None,
        tcp_socket: None,
    }))
}

fn windows(w: Option<WindowsOptions>) -> Option<WindowsSecurityContextOptions> {
    w.map(|w| WindowsSecurityContextOptions {
        host_process: w.host_process,
        ..WindowsSecurityContextOptions::default()
    })
}

impl Container {
    fn into_wire(self) -> wire::WireContainer {
        wire::WireContainer {
            name: required(self.name),
            security_context: self.security_context.map(|s| {
                Box::new(SecurityContext {
                    capabilities: s.capabilities.map(|c| Capabilities {
                        add: some(c.add),
                        drop: some(c.drop),
                    }),
                    privileged: s.privileged,
                    proc_mount: s.proc_mount,
                    windows_options: windows(s.windows_options),
                    ..SecurityContext::default()
                })
            }),
            liveness_probe: probe(self.liveness_probe),
            readiness_probe: probe(self.readiness_probe),
            startup_probe: probe(self.startup_probe),
            lifecycle: self.lifecycle.map(|l| wire::WireLifecycle {
                post_start: handler(l.post_start),
                pre_stop: handler(l.pre_stop),
            }),
            ports: some(
                self.ports
                    .into_iter()
                    .map(|p| wire::WirePort {
                        host_port: p.host_port.filter(|p| *p != 0),
                    })
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

impl Pod {
    /// The pod as the JSON decoder reads it ([`wire::Wire`]), then as [`WirePod`].
    pub(super) fn into_wire_pod(self) -> WirePod {
        WirePod::from(self.into_wire())
    }

    fn into_wire(self) -> wire::Wire {
        let m = self.metadata.unwrap_or_default();
        let annotations = some(m.annotations).map(|all: BTreeMap<String, String>| {
            all.into_iter()
                .filter(|(k, v)| super::model::kept_annotation(k, v))
                .collect()
        });
        let metadata = wire::Meta {
            name: text(m.name),
            generate_name: text(m.generate_name),
            namespace: text(m.namespace),
            uid: text(m.uid),
            resource_version: text(m.resource_version),
            labels: some(m.labels),
            annotations,
            owner_references: some(
                m.owner_references
                    .into_iter()
                    .map(|o| OwnerRef {
                        api_version: required(o.api_version),
                        kind: required(o.kind),
                        name: required(o.name),
                        uid: required(o.uid),
                        controller: o.controller,
                        block_owner_deletion: o.block_owner_deletion,
                    })
                    .collect::<Vec<_>>(),
            ),
            creation_timestamp: time(m.creation_timestamp),
            deletion_timestamp: time(m.deletion_timestamp),
        };
        let spec = self.spec.map(|s| wire::Spec {
            node_name: text(s.node_name),
            // Only the admission webhook judges it, from JSON.
            runtime_class_name: None,
            host_network: flag(s.host_network),
            service_account_name: text(s.service_account_name),
            service_account: text(s.service_account),
            containers: s.containers.into_iter().map(Container::into_wire).collect(),
            init_containers: some(
                s.init_containers
                    .into_iter()
                    .map(Container::into_wire)
                    .collect::<Vec<_>>(),
            ),
            ephemeral_containers: some(
                s.ephemeral_containers
                    .into_iter()
                    .map(|e| e.common.unwrap_or_default().into_wire())
                    .collect::<Vec<_>>(),
            ),
            host_pid: flag(s.host_pid),
            host_ipc: flag(s.host_ipc),
            volumes: some(
                s.volumes
                    .into_iter()
                    .map(|v| {
                        let source = v.source.unwrap_or_default();
                        wire::WireVolume {
                            name: required(v.name),
                            host_path: source.host_path.map(|h| HostPathVolumeSource {
                                path: required(h.path),
                                type_: h.type_,
                            }),
                            git_repo: source.git_repo.map(|g| GitRepoVolumeSource {
                                repository: required(g.repository),
                                revision: text(g.revision),
                                directory: text(g.directory),
                            }),
                        }
                    })
                    .collect::<Vec<_>>(),
            ),
            security_context: s.security_context.map(|c| PodSecurityContext {
                sysctls: some(
                    c.sysctls
                        .into_iter()
                        .map(|s| Sysctl {
                            name: required(s.name),
                            value: required(s.value),
                        })
                        .collect(),
                ),
                windows_options: windows(c.windows_options),
                ..PodSecurityContext::default()
            }),
            os: s.os.map(|o| PodOS {
                name: required(o.name),
            }),
        });
        let status = self.status.map(|s| wire::Status {
            phase: text(s.phase),
            pod_ip: text(s.pod_ip),
            pod_ips: some(
                s.pod_ips
                    .into_iter()
                    .map(|i| PodIP { ip: required(i.ip) })
                    .collect::<Vec<_>>(),
            ),
            host_ip: text(s.host_ip),
            host_ips: some(
                s.host_ips
                    .into_iter()
                    .map(|i| HostIP { ip: required(i.ip) })
                    .collect::<Vec<_>>(),
            ),
        });
        wire::Wire {
            metadata,
            spec,
            status,
        }
    }
}

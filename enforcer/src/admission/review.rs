//! One AdmissionReview in, one out: parsing, the checks on what was sent, the namespace
//! lookup, and the decision of [`decide`](super::decide).

use std::collections::BTreeSet;
use std::future::Future;

use enforcer_policy::inventory::IngressMode;
use k8s_openapi::api::core::v1::{Namespace, PodSpec};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::Status;

use super::confine::{
    confine, syncookies_kept, syncookies_off, uncontained, Confinement, Scope, SYNCOOKIES,
};
use super::decide::{judge, stamp, Change};
use super::tenancy::Tenancy;
use super::text::{cut, shown, NAME_BYTES};
use crate::sources::kubernetes::model::{mode_name, pod_ingress, MIRROR_ANNOTATION};
use crate::sources::kubernetes::wire::{AdmittedPod, MAX_JUDGED_ITEMS};

/// The API version of AdmissionReview this webhook speaks (`admissionReviewVersions: [v1]`).
pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Which webhook a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/mutate`: stamp the namespace's tenant metadata onto the pod, and drop `NET_RAW`
    /// from its containers.
    Mutate,
    /// `/validate`: refuse pods that claim another tenant, lack one where it is required, or
    /// hold what the enforcer cannot contain.
    Validate,
}

/// An HTTP answer: status code, `Content-Type` and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    /// A plain-text answer (errors the API server shows in its own message), cut to
    /// [`MESSAGE_BYTES`] should a caller have quoted too much of its request.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        let mut body = if text.len() > MESSAGE_BYTES {
            cut(&text, MESSAGE_BYTES).into_bytes()
        } else {
            text.into_bytes()
        };
        body.push(b'\n');
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// Where Namespaces are read from: the API server (one GET per review, see the module
/// documentation of [`admission`](super)), or a table in tests.
pub trait Namespaces: Send + Sync {
    /// The namespace `name`; `Ok(None)` when it does not exist; `Err` with a sentence when it
    /// could not be read (unreachable, timed out, forbidden).
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Namespace>, String>> + Send;
}

/// Answers one AdmissionReview `body` for `route`.
///
/// - Not JSON, not an `admission.k8s.io/v1` AdmissionReview, no `request`: 400 with the reason
///   (the API server treats it as a failed call: the webhook's `failurePolicy` applies).
/// - A request for anything but a v1 Pod (a misconfigured webhook): denied, naming what came.
/// - The namespace cannot be read: 500 with the reason (again the `failurePolicy` applies:
///   the webhook could not decide). It does not exist: denied.
/// - Otherwise 200 with the review's response: allowed (with a patch on `/mutate` when labels
///   are missing or a container keeps `NET_RAW`) or denied with every reason.
pub async fn review(
    route: Route,
    body: &[u8],
    namespaces: &impl Namespaces,
    confinement: &Confinement,
) -> Reply {
    let parsed: AdmissionReview<AdmittedPod> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return Reply::text(
                400,
                // serde quotes the value it could not read: shown up to a bound.
                format!(
                    "the request body is not an AdmissionReview: {}",
                    shown(&error, ERROR_BYTES)
                ),
            );
        }
    };
    if parsed.types.api_version != REVIEW_API_VERSION || parsed.types.kind != "AdmissionReview" {
        return Reply::text(
            400,
            format!(
                "expected apiVersion {REVIEW_API_VERSION} kind AdmissionReview, got apiVersion \
                 {:?} kind {:?} (set admissionReviewVersions: [v1] in the webhook configuration)",
                cut(&parsed.types.api_version, NAME_BYTES),
                cut(&parsed.types.kind, NAME_BYTES)
            ),
        );
    }
    let request: AdmissionRequest<AdmittedPod> = match parsed.try_into() {
        Ok(request) => request,
        Err(_) => return Reply::text(400, "the AdmissionReview has no request"),
    };
    // Every answer and log line repeats it (`response.uid`): bounded here, once.
    if request.uid.len() > NAME_BYTES {
        return Reply::text(
            400,
            format!(
                "request.uid is {} bytes long; the API server sends a UID (36)",
                request.uid.len()
            ),
        );
    }
    let response = match decide(route, &request, namespaces, confinement).await {
        Ok(response) => response,
        Err(reply) => return reply,
    };
    if !response.allowed {
        let reason = cut(&response.result.message, LOGGED_MESSAGE_BYTES);
        tracing::info!(uid = %request.uid, ?route, %reason, "denied");
    }
    match serde_json::to_vec(&response.into_review()) {
        // An answer is held until its client reads it, on each of the connections: never
        // more than this (by construction; this says so should anything be missed).
        Ok(body) if body.len() > MAX_ANSWER_BYTES => Reply::text(
            500,
            format!(
                "the answer would be {} bytes, more than the {MAX_ANSWER_BYTES} this webhook \
                 sends",
                body.len()
            ),
        ),
        Ok(body) => Reply {
            status: 200,
            content_type: "application/json",
            body,
        },
        Err(error) => Reply::text(
            500,
            format!("cannot encode the response: {}", shown(&error, ERROR_BYTES)),
        ),
    }
}

/// The most bytes of a denial's message: its reasons name what the pod's author wrote
/// (names are cut to [`NAME_BYTES`], a judgement lists at most `MAX_FINDINGS` problems; a
/// label's value is quoted whole), and the API server shows it to them.
pub const MESSAGE_BYTES: usize = 16 << 10;

/// The most bytes of a denial's message the webhook logs.
const LOGGED_MESSAGE_BYTES: usize = 1 << 10;

/// The most bytes of a decoding error an answer shows.
const ERROR_BYTES: usize = 1 << 10;

/// The most bytes of an answer: a denial's message ([`MESSAGE_BYTES`]) and the envelope, or
/// a JSON patch for at most `MAX_JUDGED_ITEMS` containers (~370 bytes each, as kube encodes
/// it: an array of byte values). The webhook holds an answer until its client reads it, so
/// the 256 connections hold at most 32 MiB of them.
pub const MAX_ANSWER_BYTES: usize = 128 << 10;

fn deny(request: &AdmissionRequest<AdmittedPod>, message: String) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    response.allowed = false;
    let message = cut(&message, MESSAGE_BYTES);
    response.result = Status::failure(&message, "Forbidden").with_code(403);
    response
}

async fn decide(
    route: Route,
    request: &AdmissionRequest<AdmittedPod>,
    namespaces: &impl Namespaces,
    confinement: &Confinement,
) -> Result<AdmissionResponse, Reply> {
    let kind = &request.kind;
    if (
        kind.group.as_str(),
        kind.version.as_str(),
        kind.kind.as_str(),
    ) != ("", "v1", "Pod")
    {
        return Ok(deny(
            request,
            format!(
                "this webhook judges v1 Pods, and was sent {}{} {} (resource {:?}): its \
                 webhook configuration's rules must select only pods",
                if kind.group.is_empty() {
                    String::new()
                } else {
                    format!("{}/", cut(&kind.group, NAME_BYTES))
                },
                cut(&kind.version, NAME_BYTES),
                cut(&kind.kind, NAME_BYTES),
                cut(&request.resource.resource, NAME_BYTES)
            ),
        ));
    }
    let change = match request.operation {
        Operation::Create => Change::Create,
        Operation::Update => Change::Update {
            old: request
                .old_object
                .as_ref()
                .and_then(|o| o.metadata.labels.as_ref()),
        },
        // Deleting or attaching to a pod changes no label: nothing to stamp or judge.
        Operation::Delete | Operation::Connect => return Ok(AdmissionResponse::from(request)),
    };
    let Some(object) = request.object.as_ref() else {
        return Ok(deny(
            request,
            format!(
                "{:?} of a pod without the pod (request.object is null)",
                request.operation
            ),
        ));
    };
    let Some(ns) = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .filter(|ns| !ns.is_empty())
    else {
        return Ok(deny(
            request,
            "the request names no namespace for the pod".into(),
        ));
    };
    let pod = pod_name(&ns, request, object);
    if ns.len() > NAME_BYTES {
        // No namespace has such a name (a DNS label, 63 bytes): not worth a lookup.
        return Ok(deny(
            request,
            format!("pod {pod}: the namespace's name is {} bytes long", ns.len()),
        ));
    }
    let namespace = match namespaces.get(&ns).await {
        Ok(Some(namespace)) => namespace,
        Ok(None) => {
            return Ok(deny(
                request,
                format!("pod {pod}: namespace {ns} does not exist"),
            ))
        }
        Err(error) => {
            let error = cut(&error, ERROR_BYTES);
            tracing::warn!(uid = %request.uid, %pod, %error, "cannot read the namespace");
            return Err(Reply::text(
                500,
                format!("pod {pod}: cannot read namespace {ns} from the API server: {error}"),
            ));
        }
    };
    let tenancy = Tenancy::of(&namespace);
    let pod_labels = object.metadata.labels.as_ref();
    // Every pod the webhook is called for holds nothing the enforcer cannot contain
    // (`confine`), in a namespace without a tenant too: its raw frames reach a tenant's pods
    // as well, and its `hostPath` reaches their cgroups. What must hold such things (a CNI,
    // a node agent) lives in a namespace the webhook configuration's selector spares.
    let update = change != Change::Create;
    let before = match request.old_object.as_ref() {
        Some(old) if update => old.ephemeral_names(),
        _ => BTreeSet::new(),
    };
    let spec = pod_spec(&pod, object, update);
    // SYN cookies are turned off where the pod's ingress is checked, at its creation: its
    // sysctls cannot change after. An update that turns the check on (an annotation) is not
    // refused: refused, the pod would run with no check at all, not one with a gap (the
    // agent reports such a pod; recreated, it gets the sysctl).
    let checked = pod_ingress(&namespace, object.metadata.annotations.as_ref());
    let judge_cookies = change == Change::Create && checked != IngressMode::Off;
    let syncookies = object.sysctl(SYNCOOKIES);
    match route {
        Route::Mutate => {
            // A subresource cannot change labels through a patch of ours (the only one the
            // webhook configuration sends is `pods/ephemeralcontainers`).
            let mut ops = if request.sub_resource.is_none() {
                stamp(pod_labels, &tenancy)
            } else {
                Vec::new()
            };
            let labels = ops.len();
            match &spec {
                // A static pod runs whatever its mirror says: a patch would make the mirror lie.
                Ok(spec) if mirror(&pod, request, spec) == Mirror::Kubelets => {}
                Ok(spec) => {
                    ops.extend(confine(spec, scope(change, &before)));
                    if judge_cookies {
                        ops.extend(syncookies_off(spec, &syncookies));
                    }
                }
                Err(why) => return Ok(deny(request, why.clone())),
            }
            if ops.is_empty() {
                return Ok(AdmissionResponse::from(request));
            }
            tracing::info!(
                uid = %request.uid,
                %pod,
                labels,
                confinement = ops.len() - labels,
                "stamping tenant metadata and confinement"
            );
            AdmissionResponse::from(request)
                .with_patch(json_patch::Patch(ops))
                .map_err(|error| Reply::text(500, format!("pod {pod}: {error}")))
        }
        Route::Validate => {
            let mut reasons: Vec<String> = judge(&pod, pod_labels, change, &tenancy)
                .err()
                .into_iter()
                .collect();
            match spec {
                Ok(spec) => match mirror(&pod, request, &spec) {
                    // The static pod runs whether its mirror is admitted or not; refused, it
                    // would only go unseen by the agent (which reports what it holds).
                    Mirror::Kubelets => {}
                    Mirror::Forged(why) => reasons.push(why),
                    Mirror::No => {
                        let mut why = uncontained(&spec, scope(change, &before), confinement);
                        if judge_cookies {
                            why.extend(syncookies_kept(&spec, mode_name(checked), &syncookies));
                        }
                        reasons.extend(why.into_iter().map(|w| format!("pod {pod}: {w}")));
                    }
                },
                Err(why) => reasons.push(why),
            }
            Ok(if reasons.is_empty() {
                AdmissionResponse::from(request)
            } else {
                deny(request, reasons.join("; "))
            })
        }
    }
}

/// Whether a pod is the mirror of a static pod, as [`mirror`] judges it.
#[derive(Debug, PartialEq, Eq)]
enum Mirror {
    /// No mirror annotation, or one an update leaves as it was (no new claim).
    No,
    /// Created by the kubelet of the pod's node: a static pod, which runs whatever its
    /// mirror says (neither patched nor refused for what it holds).
    Kubelets,
    /// Claimed by anyone else: why it is refused.
    Forged(String),
}

/// The mirror annotation marks the mirror of a static pod and names the static pod's cgroup
/// (its UID), which the agent honours on a pod owned by its Node (`cgroup_uid` in
/// `sources::kubernetes::model`). Only that node's kubelet creates mirror pods, as user
/// `system:node:<spec.nodeName>` in group `system:nodes` (what the API server's Node
/// authorizer requires): from anyone else it is a claim on another pod's cgroup, which
/// unmaps that pod on every node (two pods claiming one cgroup are both left out).
fn mirror(pod: &str, request: &AdmissionRequest<AdmittedPod>, spec: &PodSpec) -> Mirror {
    let annotation = |o: Option<&AdmittedPod>| {
        o.and_then(|o| o.metadata.annotations.as_ref())
            .and_then(|a| a.get(MIRROR_ANNOTATION).cloned())
    };
    let Some(claimed) = annotation(request.object.as_ref()) else {
        return Mirror::No;
    };
    if request.operation == Operation::Update
        && annotation(request.old_object.as_ref()).as_ref() == Some(&claimed)
    {
        return Mirror::No;
    }
    let user = &request.user_info;
    let name = user.username.as_deref().unwrap_or("");
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty());
    let in_nodes = user.groups.iter().flatten().any(|g| g == "system:nodes");
    if in_nodes && node.is_some_and(|node| name.strip_prefix("system:node:") == Some(node)) {
        return Mirror::Kubelets;
    }
    let name = cut(name, NAME_BYTES);
    Mirror::Forged(format!(
        "pod {pod}: annotation {MIRROR_ANNOTATION} marks the mirror of a static pod, which \
         only the kubelet of its node creates (as system:node:<spec.nodeName>, group \
         system:nodes); {name:?} is not it"
    ))
}

/// Which of the pod's containers a `change` judges, `before` the names of the ephemeral
/// containers the pod had before an update.
fn scope<'a>(change: Change<'_>, before: &'a BTreeSet<String>) -> Scope<'a> {
    match change {
        Change::Create => Scope::Create,
        Change::Update { .. } => Scope::Update { before },
    }
}

/// What [`confine`] judges of the pod's spec; why not when it holds more than the webhook
/// builds.
fn pod_spec(pod: &str, object: &AdmittedPod, update: bool) -> Result<PodSpec, String> {
    object.judged_spec(update).map_err(|n| {
        format!(
            "pod {pod}: {n} containers and hostPath or gitRepo volumes, more than the \
             {MAX_JUDGED_ITEMS} this webhook judges"
        )
    })
}

/// `namespace/name` of the pod, for messages; a pod named by `generateName` has no name yet
/// at creation: `namespace/<prefix>*`.
fn pod_name(ns: &str, request: &AdmissionRequest<AdmittedPod>, object: &AdmittedPod) -> String {
    let name = Some(request.name.as_str())
        .filter(|n| !n.is_empty())
        .or(object.metadata.name.as_deref().filter(|n| !n.is_empty()));
    // Repeated in every reason: cut, as the names in them are.
    let ns = cut(ns, NAME_BYTES);
    match (name, object.metadata.generate_name.as_deref()) {
        (Some(name), _) => format!("{ns}/{}", cut(name, NAME_BYTES)),
        (None, Some(prefix)) => format!("{ns}/{}*", cut(prefix, NAME_BYTES)),
        (None, None) => format!("{ns}/<unnamed>"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use enforcer_policy::cluster::labels;
    use serde_json::{json, Value};

    use super::*;
    use crate::admission::tenancy::tests::namespace;

    /// Namespaces in memory; `"unreachable"` fails like an API server that does not answer.
    struct Table(BTreeMap<String, Namespace>);

    impl Namespaces for Table {
        async fn get(&self, name: &str) -> Result<Option<Namespace>, String> {
            if name == "unreachable" {
                return Err("timed out after 4s".into());
            }
            Ok(self.0.get(name).cloned())
        }
    }

    fn table() -> Table {
        Table(BTreeMap::from([
            (
                "acme-prod".to_string(),
                namespace(
                    "acme-prod",
                    &[(labels::TENANT, "acme"), (labels::ENFORCED, "true")],
                    &[],
                ),
            ),
            (
                "locked".to_string(),
                namespace("locked", &[(labels::ENFORCED, "true")], &[]),
            ),
            ("plain".to_string(), namespace("plain", &[], &[])),
            (
                "vectors".to_string(),
                namespace(
                    "vectors",
                    &[(labels::TENANT, "acme"), (labels::INGRESS, "enforce")],
                    &[],
                ),
            ),
        ]))
    }

    /// The JSON patch of an answered review. kube encodes the patch bytes as a JSON array of
    /// numbers, which the API server's decoder accepts for a []byte as well as base64.
    fn patch_of(review: &Value) -> Value {
        let bytes: Vec<u8> = serde_json::from_value(review["response"]["patch"].clone()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// An AdmissionReview as the API server sends it.
    fn review_body(operation: &str, ns: &str, pod: Value, old: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": ns,
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": pod,
                "oldObject": old,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": labels},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    }

    async fn answer(route: Route, body: &[u8]) -> (u16, Value) {
        let confinement = Confinement {
            runtime_classes: ["runc".to_string()].into(),
        };
        let reply = review(route, body, &table(), &confinement).await;
        let value = if reply.content_type == "application/json" {
            serde_json::from_slice(&reply.body).unwrap()
        } else {
            Value::String(String::from_utf8(reply.body).unwrap())
        };
        (reply.status, value)
    }

    #[tokio::test]
    async fn mutate_answers_with_a_json_patch() {
        let body = review_body(
            "CREATE",
            "acme-prod",
            pod("web", json!({"app": "web"})),
            Value::Null,
        );
        let (status, value) = answer(Route::Mutate, &body).await;
        assert_eq!(status, 200);
        assert_eq!(value["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(value["kind"], "AdmissionReview");
        let response = &value["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        assert_eq!(
            patch_of(&value),
            json!([
                {"op": "add", "path": "/metadata/labels/ai-enforcer.io~1tenant", "value": "acme"},
                {"op": "add", "path": "/spec/containers/0/securityContext",
                 "value": {"capabilities": {"drop": ["NET_RAW"]}}},
            ])
        );
        // A namespace without tenant metadata, not enforced: nothing to stamp, but `NET_RAW`
        // goes all the same (its frames would reach a tenant's pods).
        let body = review_body("CREATE", "plain", pod("web", json!({})), Value::Null);
        let (_, value) = answer(Route::Mutate, &body).await;
        assert_eq!(value["response"]["allowed"], true);
        assert_eq!(
            patch_of(&value),
            json!([
                {"op": "add", "path": "/spec/containers/0/securityContext",
                 "value": {"capabilities": {"drop": ["NET_RAW"]}}},
            ])
        );
    }

    #[tokio::test]
    async fn a_tenants_pod_holds_nothing_the_enforcer_cannot_contain() {
        let mut sniffer = pod("sniffer", json!({labels::TENANT: "acme"}));
        sniffer["spec"]["containers"][0]["securityContext"] =
            json!({"capabilities": {"add": ["NET_ADMIN"]}});
        let body = review_body("CREATE", "acme-prod", sniffer.clone(), Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        assert_eq!(value["response"]["allowed"], false);
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(message.starts_with(r#"pod acme-prod/sniffer: container "c" adds capability NET_ADMIN: it rewrites packets"#), "{message}");
        assert!(
            message.contains(r#"; pod acme-prod/sniffer: container "c" keeps NET_RAW"#),
            "{message}"
        );
        // Every problem at once: a tenant claim and the capability.
        sniffer["metadata"]["labels"] = json!({labels::TENANT: "globex"});
        let body = review_body("CREATE", "acme-prod", sniffer.clone(), Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                r#"pod acme-prod/sniffer: label ai-enforcer.io/tenant="globex" differs"#
            ),
            "{message}"
        );
        assert!(message.contains("adds capability NET_ADMIN"), "{message}");
        // Not a tenant's namespace: judged all the same, with the tenant claim.
        let body = review_body("CREATE", "plain", sniffer.clone(), Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        assert_eq!(value["response"]["allowed"], false);
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(r#"label ai-enforcer.io/tenant="globex""#),
            "{message}"
        );
        assert!(
            message.contains(r#"pod plain/sniffer: container "c" adds capability NET_ADMIN"#),
            "{message}"
        );
        sniffer["metadata"]["labels"] = json!({});
        let body = review_body("CREATE", "plain", sniffer, Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        assert_eq!(value["response"]["allowed"], false, "{value}");

        // `kubectl debug`: the ephemeral container the update adds, and only it.
        let mut old = pod("web", json!({labels::TENANT: "acme"}));
        old["spec"]["containers"][0]["securityContext"] =
            json!({"capabilities": {"drop": ["NET_RAW"]}});
        let mut new = old.clone();
        new["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox"}]);
        let mut body: Value = serde_json::from_slice(&review_body(
            "UPDATE",
            "acme-prod",
            new.clone(),
            old.clone(),
        ))
        .unwrap();
        body["request"]["subResource"] = json!("ephemeralcontainers");
        let body = serde_json::to_vec(&body).unwrap();
        let (_, value) = answer(Route::Mutate, &body).await;
        assert_eq!(
            patch_of(&value),
            json!([{"op": "add", "path": "/spec/ephemeralContainers/0/securityContext",
                    "value": {"capabilities": {"drop": ["NET_RAW"]}}}])
        );
        let (_, value) = answer(Route::Validate, &body).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert_eq!(
            message,
            "pod acme-prod/web: ephemeral container \"debugger\" keeps NET_RAW (containerd's \
             default set grants it), with which it writes frames no hook sees: add NET_RAW to \
             its securityContext.capabilities.drop (the mutating webhook does when it is \
             registered)"
        );
    }

    /// A mirror pod's annotation claims a static pod's cgroup: only the node's kubelet may
    /// make that claim.
    #[tokio::test]
    async fn only_the_nodes_kubelet_creates_a_mirror_pod() {
        let mut mirror = pod("etcd-n1", json!({labels::TENANT: "acme"}));
        mirror["metadata"]["annotations"] = json!({MIRROR_ANNOTATION: "0123abcd"});
        mirror["spec"]["nodeName"] = json!("n1");
        mirror["spec"]["containers"][0]["securityContext"] =
            json!({"capabilities": {"drop": ["ALL"]}});
        let by = |user: &str, operation: &str, old: Value| {
            let mut body: Value =
                serde_json::from_slice(&review_body(operation, "acme-prod", mirror.clone(), old))
                    .unwrap();
            body["request"]["userInfo"] = json!({"username": user, "groups": ["system:nodes"]});
            serde_json::to_vec(&body).unwrap()
        };
        // The kubelet's own mirror: a static pod runs whatever it says, so it is neither
        // refused nor patched for what it holds (privileged, NET_RAW kept here).
        let mut holding = mirror.clone();
        holding["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
        let mut body: Value =
            serde_json::from_slice(&review_body("CREATE", "acme-prod", holding, Value::Null))
                .unwrap();
        body["request"]["userInfo"] = json!({"username": "system:node:n1",
                                             "groups": ["system:nodes", "system:authenticated"]});
        let body = serde_json::to_vec(&body).unwrap();
        let (_, value) = answer(Route::Validate, &body).await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        let (_, value) = answer(Route::Mutate, &body).await;
        assert_eq!(value["response"]["patch"], Value::Null, "{value}");
        let (_, value) = answer(
            Route::Validate,
            &by("system:node:n1", "CREATE", Value::Null),
        )
        .await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        for user in ["alice", "system:node:n2", "system:node:"] {
            let (_, value) = answer(Route::Validate, &by(user, "CREATE", Value::Null)).await;
            assert_eq!(value["response"]["allowed"], false, "{user}");
            let message = value["response"]["status"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(
                    "pod acme-prod/etcd-n1: annotation kubernetes.io/config.mirror marks the mirror"
                ),
                "{message}"
            );
        }
        // The node's name without the group the API server gives its kubelet.
        let mut body: Value =
            serde_json::from_slice(&by("system:node:n1", "CREATE", Value::Null)).unwrap();
        body["request"]["userInfo"]["groups"] = json!(["system:authenticated"]);
        let (_, value) = answer(Route::Validate, &serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(value["response"]["allowed"], false, "{value}");
        // An update that keeps the annotation is no new claim; one that adds it is.
        let (_, value) = answer(Route::Validate, &by("alice", "UPDATE", mirror.clone())).await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        let mut plain = mirror.clone();
        plain["metadata"]["annotations"] = json!({});
        let (_, value) = answer(Route::Validate, &by("alice", "UPDATE", plain)).await;
        assert_eq!(value["response"]["allowed"], false, "{value}");
    }

    /// What the webhook builds of a pod is bounded (`MAX_JUDGED_ITEMS` containers and
    /// judged volumes, 2-3 KiB each): a pod over it is denied on both webhooks, naming the
    /// count; volumes that are not judged (most of them) do not count.
    #[tokio::test]
    async fn a_pod_holding_more_than_the_webhook_judges_is_denied_naming_the_count() {
        let dropping = json!({"capabilities": {"drop": ["ALL"]}});
        let container = |i: usize| json!({"name": format!("c{i}"), "securityContext": dropping});
        let host = |i: usize| json!({"name": format!("h{i}"), "hostPath": {"path": "/"}});
        let empty = |i: usize| json!({"name": format!("v{i}"), "emptyDir": {}});
        let labels = json!({labels::TENANT: "acme"});
        let spec = |containers: usize, hosts: usize, empties: usize| {
            let mut pod = pod("big", labels.clone());
            pod["spec"] = json!({
                "containers": (0..containers).map(container).collect::<Vec<_>>(),
                "volumes": (0..hosts).map(host).chain((0..empties).map(empty)).collect::<Vec<_>>(),
            });
            review_body("CREATE", "acme-prod", pod, Value::Null)
        };
        let over = "pod acme-prod/big: 257 containers and hostPath or gitRepo volumes, more \
                    than the 256 this webhook judges";
        for route in [Route::Validate, Route::Mutate] {
            let (status, value) = answer(route, &spec(250, 7, 0)).await;
            assert_eq!(status, 200, "{value}");
            assert_eq!(value["response"]["allowed"], false, "{value}");
            assert_eq!(value["response"]["status"]["message"], over, "{route:?}");
        }
        // At the bound, and with 5,000 volumes that are not judged: judged as ever.
        let (_, value) = answer(Route::Mutate, &spec(250, 6, 5000)).await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        let (_, value) = answer(Route::Validate, &spec(250, 6, 5000)).await;
        assert_eq!(value["response"]["allowed"], false, "{value}");
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert_eq!(message.matches("(hostPath)").count(), 6, "{message}");
        assert!(!message.contains("more than the"), "{message}");
        // An update is judged, and counted, on its ephemeral containers alone: a pod's others
        // never stop its updates (its finalizers' removal among them).
        let mut big = pod("big", labels.clone());
        let dropping_all = (0..300).map(container).collect::<Vec<_>>();
        big["spec"] = json!({"containers": dropping_all});
        for route in [Route::Validate, Route::Mutate] {
            let body = review_body("UPDATE", "acme-prod", big.clone(), big.clone());
            let (_, value) = answer(route, &body).await;
            assert_eq!(value["response"]["allowed"], true, "{route:?}: {value}");
        }
        // The largest patch: every container of the most a pod may hold keeps NET_RAW.
        let mut pod = pod("big", labels.clone());
        pod["spec"] = json!({"containers": (0..256).map(|i| json!({"name": format!("c{i}")})).collect::<Vec<_>>()});
        let body = review_body("CREATE", "acme-prod", pod, Value::Null);
        let confinement = Confinement::default();
        let reply = review(Route::Mutate, &body, &table(), &confinement).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(reply.body.len() <= MAX_ANSWER_BYTES, "{}", reply.body.len());
        assert_eq!(
            patch_of(&serde_json::from_slice(&reply.body).unwrap())
                .as_array()
                .unwrap()
                .len(),
            256
        );
    }

    /// What an answer repeats of its request is bounded (found by a red-team helper): serde's
    /// error quoting a 4 MB string (a 14 MB answer), a 4 MB `request.uid` echoed in
    /// `response.uid`, a kind, resource or user name quoted in a denial.
    #[tokio::test]
    async fn an_answer_repeats_its_request_only_up_to_a_bound() {
        let long = "\u{301}".repeat(1_000_000);
        let labels = json!({labels::TENANT: "acme"});
        let mut body: Value = serde_json::from_slice(&review_body(
            "CREATE",
            "acme-prod",
            pod("p", labels.clone()),
            Value::Null,
        ))
        .unwrap();
        body["request"]["dryRun"] = json!(long);
        let (status, value) = answer(Route::Validate, &serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(status, 400);
        let text = value.as_str().unwrap();
        assert!(
            text.starts_with("the request body is not an AdmissionReview: invalid type: string"),
            "{}",
            &text[..200]
        );
        assert!(text.len() < 1100, "{}", text.len());

        let mut wrong = body.clone();
        wrong["request"]["dryRun"] = json!(false);
        wrong["apiVersion"] = json!("\u{7f}".repeat(1_000_000));
        let (status, value) = answer(Route::Validate, &serde_json::to_vec(&wrong).unwrap()).await;
        assert_eq!(status, 400);
        let text = value.as_str().unwrap();
        assert!(text.starts_with("expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got apiVersion \"\\u{7f}"), "{}", &text[..200]);
        assert!(text.len() < 4096, "{}", text.len());

        body["request"]["dryRun"] = json!(false);
        body["request"]["uid"] = json!(long);
        let (status, value) = answer(Route::Validate, &serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(status, 400);
        assert_eq!(
            value,
            "request.uid is 2000000 bytes long; the API server sends a UID (36)\n"
        );

        body["request"]["uid"] = json!("u-1");
        body["request"]["kind"]["kind"] = json!(long);
        body["request"]["resource"]["resource"] = json!(long);
        let (_, value) = answer(Route::Validate, &serde_json::to_vec(&body).unwrap()).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("this webhook judges v1 Pods, and was sent v1 \u{301}"),
            "{}",
            &message[..100]
        );
        assert!(message.len() < 4096, "{}", message.len());

        body["request"]["kind"]["kind"] = json!("Pod");
        body["request"]["resource"]["resource"] = json!("pods");
        body["request"]["userInfo"]["username"] = json!(long);
        body["request"]["object"]["metadata"]["annotations"] = json!({MIRROR_ANNOTATION: "0123"});
        let (_, value) = answer(Route::Validate, &serde_json::to_vec(&body).unwrap()).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("marks the mirror of a static pod"),
            "{message}"
        );
        assert!(message.len() < 4096, "{}", message.len());
    }

    #[tokio::test]
    async fn validate_denies_with_the_reason() {
        let body = review_body(
            "CREATE",
            "acme-prod",
            pod("claimer", json!({labels::TENANT: "globex"})),
            Value::Null,
        );
        let (status, value) = answer(Route::Validate, &body).await;
        assert_eq!(status, 200);
        let response = &value["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 403);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.starts_with("pod acme-prod/claimer: label ai-enforcer.io/tenant=\"globex\" differs from namespace acme-prod's ai-enforcer.io/tenant=\"acme\""), "{message}");

        let body = review_body(
            "CREATE",
            "locked",
            json!({"metadata": {"generateName": "job-"}}),
            Value::Null,
        );
        let (_, value) = answer(Route::Validate, &body).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("pod locked/job-*: namespace locked is enforced"),
            "{message}"
        );

        let body = review_body("CREATE", "gone", pod("p", json!({})), Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        assert_eq!(
            value["response"]["status"]["message"],
            "pod gone/p: namespace gone does not exist"
        );
    }

    #[tokio::test]
    async fn update_delete_and_subresources() {
        let old = pod("web", json!({labels::TENANT: "acme"}));
        let new = pod("web", json!({labels::TENANT: "globex"}));
        let (_, value) = answer(
            Route::Validate,
            &review_body("UPDATE", "acme-prod", new, old.clone()),
        )
        .await;
        assert_eq!(value["response"]["allowed"], false);
        let (_, value) = answer(
            Route::Validate,
            &review_body("UPDATE", "acme-prod", old.clone(), old.clone()),
        )
        .await;
        assert_eq!(value["response"]["allowed"], true);
        let (_, value) = answer(
            Route::Validate,
            &review_body("DELETE", "locked", Value::Null, old),
        )
        .await;
        assert_eq!(value["response"]["allowed"], true);
    }

    /// A new pod whose ingress is checked (its annotation, or its namespace's floor) gets
    /// `net.ipv4.tcp_syncookies=0` wherever its spec leaves room, and is refused with any
    /// other value or none: a SYN cookie's ACK would open a connection no check saw.
    #[tokio::test]
    async fn an_ingress_checked_pod_sends_no_syn_cookies() {
        let off = json!({"name": SYNCOOKIES, "value": "0"});
        let checked = |name: &str, security: Value| {
            let mut p = pod(name, json!({}));
            p["metadata"]["annotations"] = json!({labels::INGRESS: "audit"});
            p["spec"]["containers"][0]["securityContext"] =
                json!({"capabilities": {"drop": ["NET_RAW"]}});
            if !security.is_null() {
                p["spec"]["securityContext"] = security;
            }
            p
        };
        let sysctl_ops = |value: &Value| -> Vec<Value> {
            let patch = patch_of(value);
            let ops = patch.as_array().unwrap();
            ops.iter()
                .filter(|op| {
                    op["path"]
                        .as_str()
                        .unwrap()
                        .starts_with("/spec/securityContext")
                })
                .cloned()
                .collect()
        };
        let mutate = |ns: &'static str, p: Value| async move {
            answer(Route::Mutate, &review_body("CREATE", ns, p, Value::Null))
                .await
                .1
        };
        // Where the spec has no room yet, as much of it as is missing.
        for (security, path, expected) in [
            (
                Value::Null,
                "/spec/securityContext",
                json!({"sysctls": [off.clone()]}),
            ),
            (
                json!({"runAsUser": 1000}),
                "/spec/securityContext/sysctls",
                json!([off.clone()]),
            ),
            (
                json!({"sysctls": []}),
                "/spec/securityContext/sysctls/-",
                off.clone(),
            ),
            (
                json!({"sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}]}),
                "/spec/securityContext/sysctls/-",
                off.clone(),
            ),
        ] {
            let value = mutate("acme-prod", checked("db", security.clone())).await;
            assert_eq!(
                sysctl_ops(&value),
                [json!({"op": "add", "path": path, "value": expected})],
                "{security}"
            );
        }
        // The namespace's floor checks a pod without the annotation; an `off` of its own
        // cannot lower it.
        let mut lowered = pod("db", json!({}));
        lowered["metadata"]["annotations"] = json!({labels::INGRESS: "off"});
        for p in [pod("db", json!({})), lowered] {
            let value = mutate("vectors", p).await;
            assert_eq!(sysctl_ops(&value).len(), 1, "{value}");
        }
        // Not checked, a Windows pod, a pod in the node's network namespace: none.
        let mut windows = checked("db", Value::Null);
        windows["spec"]["os"] = json!({"name": "windows"});
        let mut host = checked("db", Value::Null);
        host["spec"]["hostNetwork"] = json!(true);
        for p in [pod("db", json!({})), windows, host] {
            let value = mutate("acme-prod", p).await;
            assert!(sysctl_ops(&value).is_empty(), "{value}");
        }

        // Validation: "0" passes; another value, or none, is refused and says why.
        let validate = |p: Value| async move {
            answer(
                Route::Validate,
                &review_body("CREATE", "acme-prod", p, Value::Null),
            )
            .await
            .1
        };
        let value = validate(checked("db", json!({"sysctls": [off.clone()]}))).await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        let value = validate(checked(
            "db",
            json!({"sysctls": [{"name": SYNCOOKIES, "value": "1"}]}),
        ))
        .await;
        assert_eq!(value["response"]["allowed"], false);
        assert_eq!(
            value["response"]["status"]["message"],
            "pod acme-prod/db: its ingress is checked (ai-enforcer.io/ingress audit) but it sets \
             sysctl net.ipv4.tcp_syncookies=\"1\": a SYN cookie's ACK would open a connection \
             that no check saw; the sysctl must be \"0\""
        );
        // Every spelling of the name writes one file (`net/ipv4/tcp_syncookies`, or a mix of
        // `.` and `/`), in an order the runtime picks: a "0" does not hide a "1" beside it.
        for sysctls in [
            json!([off.clone(), {"name": "net/ipv4/tcp_syncookies", "value": "1"}]),
            json!([{"name": "net/ipv4/tcp_syncookies", "value": "2"}]),
            json!([{"name": "net.ipv4/tcp_syncookies", "value": "1"}]),
            json!([off.clone(), {"name": "net/ipv4.tcp_syncookies", "value": "1"}]),
        ] {
            let value = validate(checked("db", json!({ "sysctls": sysctls }))).await;
            assert_eq!(value["response"]["allowed"], false, "{sysctls}");
            // ... and the mutating webhook leaves a value of the pod's own to be judged.
            let value = mutate("acme-prod", checked("db", json!({ "sysctls": sysctls }))).await;
            assert!(sysctl_ops(&value).is_empty(), "{value}");
        }
        let slashed = json!({"sysctls": [{"name": "net/ipv4/tcp_syncookies", "value": "0"}]});
        let value = validate(checked("db", slashed)).await;
        assert_eq!(value["response"]["allowed"], true, "{value}");
        let value = validate(checked("db", Value::Null)).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(
                "does not set sysctl net.ipv4.tcp_syncookies=0 (the mutating webhook did not add it"
            ),
            "{message}"
        );
        // Checked by the namespace's floor alone: the same.
        let mut floored = pod("db", json!({}));
        floored["spec"]["containers"][0]["securityContext"] =
            json!({"capabilities": {"drop": ["NET_RAW"]}});
        let body = review_body("CREATE", "vectors", floored, Value::Null);
        let (_, value) = answer(Route::Validate, &body).await;
        let message = value["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("its ingress is checked (ai-enforcer.io/ingress enforce)"),
            "{message}"
        );
        // Mutated first, as the API server does: admitted.
        let mut p = checked("db", Value::Null);
        let ops = sysctl_ops(&mutate("acme-prod", p.clone()).await);
        p["spec"]["securityContext"] = ops[0]["value"].clone();
        assert_eq!(validate(p).await["response"]["allowed"], true);

        // An update that turns the check on is neither patched (sysctls cannot change: the
        // API server would refuse the update) nor refused (the pod would go unchecked).
        let plain = pod("db", json!({}));
        for route in [Route::Mutate, Route::Validate] {
            let body = review_body(
                "UPDATE",
                "acme-prod",
                checked("db", Value::Null),
                plain.clone(),
            );
            let (_, value) = answer(route, &body).await;
            assert_eq!(value["response"]["allowed"], true, "{value}");
            let patched = !value["response"]["patch"].is_null();
            assert!(!patched || sysctl_ops(&value).is_empty(), "{value}");
        }
    }

    #[tokio::test]
    async fn an_unreadable_namespace_is_an_error_not_a_decision() {
        let body = review_body("CREATE", "unreachable", pod("p", json!({})), Value::Null);
        let (status, value) = answer(Route::Validate, &body).await;
        assert_eq!(status, 500);
        assert_eq!(
            value,
            "pod unreachable/p: cannot read namespace unreachable from the API server: timed out after 4s\n"
        );
    }

    #[tokio::test]
    async fn bad_input_gets_a_clear_400_or_denial() {
        for (body, expect) in [
            (&b""[..], "the request body is not an AdmissionReview: EOF while parsing a value at line 1 column 0"),
            (b"{\"apiVersion\":", "the request body is not an AdmissionReview: EOF while parsing a value at line 1 column 14"),
            (b"[1,2]", "the request body is not an AdmissionReview: invalid type: sequence, expected struct AdmissionReview at line 1 column 0"),
            (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#, "expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got apiVersion \"admission.k8s.io/v1beta1\""),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "the AdmissionReview has no request"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#, "the request body is not an AdmissionReview: missing field `kind`"),
        ] {
            let (status, value) = answer(Route::Validate, body).await;
            assert_eq!(status, 400, "{value}");
            assert!(value.as_str().unwrap().starts_with(expect), "{value} does not start with {expect}");
        }
        // Labels that are not a map of strings.
        let body = review_body(
            "CREATE",
            "acme-prod",
            pod("p", json!({"a": 1})),
            Value::Null,
        );
        let (status, value) = answer(Route::Mutate, &body).await;
        assert_eq!(status, 400, "{value}");
        assert!(
            value
                .as_str()
                .unwrap()
                .contains("invalid type: integer `1`, expected a string"),
            "{value}"
        );
        // A wrong kind: the configuration selects more than pods.
        let mut wrong: Value = serde_json::from_slice(&review_body(
            "CREATE",
            "acme-prod",
            json!({"metadata": {"name": "d"}}),
            Value::Null,
        ))
        .unwrap();
        wrong["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        wrong["request"]["resource"] =
            json!({"group": "apps", "version": "v1", "resource": "deployments"});
        let (status, value) = answer(Route::Mutate, &serde_json::to_vec(&wrong).unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(value["response"]["allowed"], false);
        assert_eq!(
            value["response"]["status"]["message"],
            "this webhook judges v1 Pods, and was sent apps/v1 Deployment (resource \"deployments\"): its webhook configuration's rules must select only pods"
        );
    }
}

//! The manifests of `deploy/`, parsed into their `k8s-openapi` types: what the manifest test
//! checks, and what the container test derives the DaemonSet's grants from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One object of a manifest, typed.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Service(Service),
    ConfigMap(ConfigMap),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    MutatingWebhookConfiguration(MutatingWebhookConfiguration),
    ValidatingWebhookConfiguration(ValidatingWebhookConfiguration),
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::MutatingWebhookConfiguration(o) => &o.metadata,
            Object::ValidatingWebhookConfiguration(o) => &o.metadata,
        }
    }

    /// `Kind/name` for messages.
    pub fn describe(&self) -> String {
        let kind = match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Service(_) => "Service",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Deployment(_) => "Deployment",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::MutatingWebhookConfiguration(_) => "MutatingWebhookConfiguration",
            Object::ValidatingWebhookConfiguration(_) => "ValidatingWebhookConfiguration",
        };
        format!(
            "{kind}/{}",
            self.metadata().name.as_deref().unwrap_or("<unnamed>")
        )
    }

    /// The pod template of a workload (DaemonSet, Deployment), with the workload's selector.
    pub fn pod_template(&self) -> Option<(&PodTemplateSpec, &LabelSelector)> {
        match self {
            Object::DaemonSet(d) => d.spec.as_ref().map(|s| (&s.template, &s.selector)),
            Object::Deployment(d) => d.spec.as_ref().map(|s| (&s.template, &s.selector)),
            _ => None,
        }
    }
}

/// One document of one manifest file.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub document: usize,
    pub object: Object,
}

impl Manifest {
    /// `deploy/x.yaml#2 (Kind/name)`.
    pub fn location(&self) -> String {
        format!(
            "{}#{} ({})",
            self.file.display(),
            self.document,
            self.object.describe()
        )
    }
}

/// Every document of every `*.yaml` file of [`deploy_dir`], typed; fails on the first one
/// that is not a known kind or that holds a field its type does not have.
pub fn load_all() -> Result<Vec<Manifest>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .context("reading deploy/")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
                .with_context(|| format!("{}: document {}", file.display(), i + 1))?;
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            let object =
                parse(&value).with_context(|| format!("{}: document {}", file.display(), i + 1))?;
            out.push(Manifest {
                file: file.clone(),
                document: i + 1,
                object,
            });
        }
    }
    Ok(out)
}

/// Parses one document into its type by `apiVersion` and `kind`.
pub fn parse(value: &serde_yaml::Value) -> Result<Object> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    Ok(match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(typed(value)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(value)?),
        ("v1", "Service") => Object::Service(typed(value)?),
        ("v1", "ConfigMap") => Object::ConfigMap(typed(value)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(value)?),
        ("apps/v1", "Deployment") => Object::Deployment(typed(value)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(value)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(typed(value)?)
        }
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            Object::MutatingWebhookConfiguration(typed(value)?)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
            Object::ValidatingWebhookConfiguration(typed(value)?)
        }
        _ => bail!("apiVersion {api_version:?} kind {kind:?} is not a kind this test knows"),
    })
}

/// `value` as `T`, refusing any field `T` does not have. k8s-openapi's types skip unknown
/// fields when deserializing (as the API server does with a warning), so a misspelt field
/// (`mountPropagaton`) would vanish: serialized back, the object must be the document.
pub fn typed<T: DeserializeOwned + Serialize>(value: &serde_yaml::Value) -> Result<T> {
    let object: T = serde_yaml::from_value(value.clone()).context("not a valid object")?;
    let original: Value = serde_yaml::from_value(value.clone()).context("as JSON")?;
    let back = serde_json::to_value(&object)?;
    let mut lost = Vec::new();
    diff("", &original, &back, &mut lost);
    ensure!(
        lost.is_empty(),
        "fields the type does not have (misspelt, or at the wrong level): {}",
        lost.join(", ")
    );
    Ok(object)
}

/// Paths in `original` that `back` does not hold with the same value.
fn diff(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => diff(&here, value, other, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path} ({a} became {b})")),
    }
}

/// Whether `selector` selects an object with `labels` (matchLabels and matchExpressions with
/// In, NotIn, Exists, DoesNotExist, as the API server evaluates them).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool> {
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Ok(false);
        }
    }
    for requirement in selector.match_expressions.iter().flatten() {
        let values = requirement.values.clone().unwrap_or_default();
        let present = labels.get(&requirement.key);
        let ok = match requirement.operator.as_str() {
            "In" => present.is_some_and(|v| values.contains(v)),
            "NotIn" => present.is_none_or(|v| !values.contains(v)),
            "Exists" => present.is_some(),
            "DoesNotExist" => present.is_none(),
            other => bail!("unknown label selector operator {other:?}"),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The agent's DaemonSet (the one DaemonSet of `deploy/`).
pub fn agent_daemonset(manifests: &[Manifest]) -> Result<DaemonSet> {
    let mut found = manifests.iter().filter_map(|m| match &m.object {
        Object::DaemonSet(d) => Some(d.clone()),
        _ => None,
    });
    let daemonset = found.next().context("deploy/ holds no DaemonSet")?;
    ensure!(
        found.next().is_none(),
        "deploy/ holds more than one DaemonSet"
    );
    Ok(daemonset)
}

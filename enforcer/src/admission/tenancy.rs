//! A Namespace's tenant metadata, as the webhook reads it.

use std::collections::BTreeMap;
use std::fmt;

use enforcer_policy::cluster::labels;
use k8s_openapi::api::core::v1::Namespace;

use crate::sources::kubernetes::label_value_error;

/// Where a namespace's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Label,
    Annotation,
    /// The same value as a label and as an annotation.
    Both,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Label => "label",
            Source::Annotation => "annotation",
            Source::Both => "label and annotation",
        })
    }
}

/// One tenant metadata value of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced {
    pub value: String,
    pub source: Source,
}

/// The tenant metadata of one Namespace: for each key of [`labels::TENANT_METADATA`], the
/// value from the namespace's label or annotation of that name.
///
/// A key may be set as a label (values limited to what a label can hold) or as an annotation
/// (for tooling that may not label namespaces); the same value in both is fine, and an empty
/// value is unset. Different values in the two, or a value that is not a valid label value
/// (it could not be stamped onto a pod) make the key unusable: it is left out of `values` and
/// reported in `problems`, and the validating webhook refuses new pods in the namespace until
/// it is fixed, rather than guess. The agent's Kubernetes source reads namespaces the same
/// way (`sources::kubernetes`), and leaves out every pod of such a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenancy {
    /// The namespace's name.
    pub namespace: String,
    /// The usable values, by key (a subset of [`labels::TENANT_METADATA`]).
    pub values: BTreeMap<&'static str, Sourced>,
    /// `ai-enforcer.io/enforced: "true"` on the namespace (a label).
    pub enforced: bool,
    /// Why keys were left out, one sentence each, naming the namespace, the key and values.
    pub problems: Vec<String>,
}

impl Tenancy {
    /// Reads the tenant metadata of `namespace`.
    pub fn of(namespace: &Namespace) -> Self {
        let meta = &namespace.metadata;
        let name = meta.name.clone().unwrap_or_default();
        let empty = BTreeMap::new();
        let label_map = meta.labels.as_ref().unwrap_or(&empty);
        let annotation_map = meta.annotations.as_ref().unwrap_or(&empty);
        let mut tenancy = Tenancy {
            enforced: label_map.get(labels::ENFORCED).map(String::as_str) == Some("true"),
            namespace: name,
            ..Default::default()
        };
        for key in labels::TENANT_METADATA {
            let sourced = match (label_map.get(key), annotation_map.get(key)) {
                (None, None) => continue,
                (Some(l), None) => Sourced {
                    value: l.clone(),
                    source: Source::Label,
                },
                (None, Some(a)) => Sourced {
                    value: a.clone(),
                    source: Source::Annotation,
                },
                (Some(l), Some(a)) if l == a => Sourced {
                    value: l.clone(),
                    source: Source::Both,
                },
                (Some(l), Some(a)) => {
                    tenancy.problems.push(format!(
                        "namespace {} has label {key}={l:?} and annotation {key}={a:?}: they \
                         must agree (set one of them)",
                        tenancy.namespace
                    ));
                    continue;
                }
            };
            // An empty value is unset, as for the agent's Kubernetes source.
            if sourced.value.is_empty() {
                continue;
            }
            if let Some(why) = label_value_error(&sourced.value) {
                tenancy.problems.push(format!(
                    "namespace {}: {} {key}={:?}: {why}, so it cannot be stamped onto pods",
                    tenancy.namespace, sourced.source, sourced.value
                ));
                continue;
            }
            tenancy.values.insert(key, sourced);
        }
        tenancy
    }

    /// The namespace's tenant, when it has a usable one.
    pub fn tenant(&self) -> Option<&str> {
        self.value(labels::TENANT)
    }

    /// The usable value of one tenant metadata key.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|s| s.value.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub(crate) fn namespace(
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> Namespace {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        };
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: map(labels),
                annotations: map(annotations),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn labels_and_annotations_both_count() {
        let t = Tenancy::of(&namespace(
            "acme-prod",
            &[(labels::TENANT, "acme"), (labels::ENFORCED, "true")],
            &[
                (labels::REGION, "eu-west-1"),
                (labels::TENANT, "acme"),
                ("unrelated", "x y z"),
            ],
        ));
        assert_eq!(t.namespace, "acme-prod");
        assert!(t.enforced);
        assert_eq!(t.tenant(), Some("acme"));
        assert_eq!(t.values[labels::TENANT].source, Source::Both);
        assert_eq!(t.value(labels::REGION), Some("eu-west-1"));
        assert_eq!(t.values[labels::REGION].source, Source::Annotation);
        assert_eq!(t.value(labels::DATA_RESIDENCY), None);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn conflicting_and_invalid_values_are_problems_not_guesses() {
        let t = Tenancy::of(&namespace(
            "mixed",
            &[(labels::TENANT, "acme"), (labels::ENFORCED, "True")],
            &[
                (labels::TENANT, "globex"),
                (labels::REGION, "eu west"),
                (labels::RETENTION_TIER, ""),
                (labels::DATA_RESIDENCY, &"e".repeat(64)),
            ],
        ));
        assert!(!t.enforced, "only the exact value \"true\" enforces");
        assert_eq!(t.tenant(), None);
        assert!(t.values.is_empty(), "{:?}", t.values);
        assert_eq!(t.problems.len(), 3, "{:?}", t.problems);
        assert!(t.problems[0].contains(r#"label ai-enforcer.io/tenant="acme" and annotation ai-enforcer.io/tenant="globex""#), "{}", t.problems[0]);
        let all = t.problems.join("\n");
        assert!(
            all.contains(r#"annotation ai-enforcer.io/region="eu west": not a valid label value"#),
            "{all}"
        );
        assert!(all.contains("(64 characters; at most 63)"), "{all}");
        assert!(!all.contains("retention-tier"), "empty is unset: {all}");
    }
}

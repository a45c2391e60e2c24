//! The webhook's decisions, as pure functions of a pod's labels and its namespace's
//! [`Tenancy`].
//!
//! - [`stamp`] (`/mutate`): the JSON patch that copies the namespace's tenant metadata onto the
//!   pod as labels. It adds missing labels and never overwrites one: a pod claiming a different
//!   value keeps its claim, so that `/validate` refuses it with the reason instead of the claim
//!   silently disappearing.
//! - [`judge`] (`/validate`): refuses a pod whose tenant metadata labels differ from its
//!   namespace's, and a pod created in an enforced namespace that has no tenant.

use std::collections::BTreeMap;

use enforcer_policy::cluster::labels;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use serde_json::Value;

use super::tenancy::Tenancy;
use super::text::{cut, NAME_BYTES};

/// The operations a pod request can be judged for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A new pod.
    Create,
    /// An existing pod whose labels were `old` (`None`: it had none).
    Update {
        old: Option<&'a BTreeMap<String, String>>,
    },
}

/// The JSON patch (RFC 6902) that adds each of the namespace's tenant metadata values missing
/// from `pod_labels`. Empty when there is nothing to add.
pub fn stamp(
    pod_labels: Option<&BTreeMap<String, String>>,
    tenancy: &Tenancy,
) -> Vec<PatchOperation> {
    let mut ops = Vec::new();
    let missing: Vec<(&str, &str)> = labels::TENANT_METADATA
        .iter()
        .filter_map(|key| Some((*key, tenancy.value(key)?)))
        .filter(|(key, _)| pod_labels.is_none_or(|l| !l.contains_key(*key)))
        .collect();
    if missing.is_empty() {
        return ops;
    }
    if pod_labels.is_none() {
        // `add` needs the parent to exist: a pod without labels has no `metadata.labels`.
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "labels"]),
            value: Value::Object(Default::default()),
        }));
    }
    for (key, value) in missing {
        ops.push(PatchOperation::Add(AddOperation {
            // The pointer escapes the `/` of the key (`ai-enforcer.io~1tenant`).
            path: PointerBuf::from_tokens(["metadata", "labels", key]),
            value: Value::String(value.to_string()),
        }));
    }
    ops
}

/// Whether the pod `pod` (`namespace/name`, for messages) with labels `pod_labels` may be
/// admitted into the namespace described by `tenancy`. On refusal, every reason, each naming
/// the pod, the label and both values.
///
/// - A tenant metadata label (tenant, region, data residency, retention tier) must equal the
///   namespace's value; a pod may not carry one its namespace lacks. On update, only a label
///   the update *changes* is judged, so that a pod admitted before its namespace was
///   relabelled can still be updated (and deleted through its finalizers).
/// - On create, a namespace whose tenant metadata is unusable (conflicting label and
///   annotation, invalid values) refuses pods until fixed, and an enforced namespace
///   (`ai-enforcer.io/enforced: "true"`) without a tenant refuses every pod.
pub fn judge(
    pod: &str,
    pod_labels: Option<&BTreeMap<String, String>>,
    change: Change<'_>,
    tenancy: &Tenancy,
) -> Result<(), String> {
    let ns = &tenancy.namespace;
    let mut reasons = Vec::new();
    for key in labels::TENANT_METADATA {
        let Some(claimed) = pod_labels.and_then(|l| l.get(key)) else {
            continue;
        };
        if let Change::Update { old } = change {
            if old.and_then(|l| l.get(key)) == Some(claimed) {
                continue;
            }
        }
        // Quoted cut: the pod's author wrote it, and the API server validates labels only
        // after the mutating webhook.
        let claimed = &**claimed;
        let quoted = cut(claimed, NAME_BYTES);
        match tenancy.values.get(key) {
            Some(theirs) if theirs.value == claimed => {}
            Some(theirs) => reasons.push(format!(
                "pod {pod}: label {key}={quoted:?} differs from namespace {ns}'s {key}={:?} \
                 (its {}); tenant metadata comes from the namespace, a pod cannot claim another",
                theirs.value, theirs.source
            )),
            None => reasons.push(format!(
                "pod {pod}: label {key}={quoted:?} but namespace {ns} has no usable {key} \
                 (label or annotation); tenant metadata comes from the namespace, a pod cannot \
                 claim one"
            )),
        }
    }
    if change == Change::Create {
        for problem in &tenancy.problems {
            reasons.push(format!("pod {pod}: {problem}"));
        }
        if tenancy.enforced && tenancy.tenant().is_none() {
            reasons.push(format!(
                "pod {pod}: namespace {ns} is enforced (label {}=true) but has no tenant: set \
                 the label or annotation {} on the namespace",
                labels::ENFORCED,
                labels::TENANT
            ));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::tenancy::tests::namespace;

    fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn acme() -> Tenancy {
        Tenancy::of(&namespace(
            "acme-prod",
            &[
                (labels::TENANT, "acme"),
                (labels::ENFORCED, "true"),
                (labels::DATA_RESIDENCY, "eu"),
            ],
            &[(labels::REGION, "eu-west-1")],
        ))
    }

    /// The pod's metadata after the patch, applied as the API server applies it.
    fn patched(pod_labels: Option<&BTreeMap<String, String>>, ops: &[PatchOperation]) -> Value {
        let mut pod = serde_json::json!({"metadata": {"name": "p"}});
        if let Some(l) = pod_labels {
            pod["metadata"]["labels"] = serde_json::to_value(l).unwrap();
        }
        json_patch::patch(&mut pod, ops).unwrap();
        pod["metadata"]["labels"].clone()
    }

    #[test]
    fn stamps_a_pod_without_labels() {
        let ops = stamp(None, &acme());
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert_eq!(
            serde_json::to_value(&ops[1]).unwrap(),
            serde_json::json!({"op": "add", "path": "/metadata/labels/ai-enforcer.io~1tenant", "value": "acme"})
        );
        assert_eq!(
            patched(None, &ops),
            serde_json::json!({
                "ai-enforcer.io/tenant": "acme",
                "ai-enforcer.io/region": "eu-west-1",
                "ai-enforcer.io/data-residency": "eu",
            })
        );
    }

    #[test]
    fn adds_only_what_is_missing_and_never_overwrites() {
        let pod = labels_of(&[
            ("app", "web"),
            (labels::TENANT, "globex"),
            (labels::REGION, "eu-west-1"),
        ]);
        let ops = stamp(Some(&pod), &acme());
        assert_eq!(
            patched(Some(&pod), &ops),
            serde_json::json!({
                "app": "web",
                "ai-enforcer.io/tenant": "globex",
                "ai-enforcer.io/region": "eu-west-1",
                "ai-enforcer.io/data-residency": "eu",
            })
        );
        let complete = labels_of(&[
            (labels::TENANT, "acme"),
            (labels::REGION, "eu-west-1"),
            (labels::DATA_RESIDENCY, "eu"),
        ]);
        assert!(stamp(Some(&complete), &acme()).is_empty());
        let plain = Tenancy::of(&namespace("default", &[], &[]));
        assert!(stamp(None, &plain).is_empty());
    }

    #[test]
    fn a_stamped_pod_is_admitted() {
        let t = acme();
        let ops = stamp(None, &t);
        let stamped: BTreeMap<String, String> =
            serde_json::from_value(patched(None, &ops)).unwrap();
        assert_eq!(
            judge("acme-prod/p", Some(&stamped), Change::Create, &t),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_pod_claiming_another_tenant_naming_pod_label_and_values() {
        let pod = labels_of(&[(labels::TENANT, "globex")]);
        let why = judge("acme-prod/claimer", Some(&pod), Change::Create, &acme()).unwrap_err();
        assert_eq!(
            why,
            "pod acme-prod/claimer: label ai-enforcer.io/tenant=\"globex\" differs from namespace \
             acme-prod's ai-enforcer.io/tenant=\"acme\" (its label); tenant metadata comes from \
             the namespace, a pod cannot claim another"
        );
        // Every key is judged, and every reason is given.
        let pod = labels_of(&[
            (labels::REGION, "us-east-1"),
            (labels::RETENTION_TIER, "7d"),
        ]);
        let why = judge("acme-prod/p", Some(&pod), Change::Create, &acme()).unwrap_err();
        assert!(why.contains(r#"label ai-enforcer.io/region="us-east-1" differs from namespace acme-prod's ai-enforcer.io/region="eu-west-1" (its annotation)"#), "{why}");
        assert!(why.contains(r#"label ai-enforcer.io/retention-tier="7d" but namespace acme-prod has no usable ai-enforcer.io/retention-tier"#), "{why}");
    }

    #[test]
    fn a_namespace_without_tenant() {
        let plain = Tenancy::of(&namespace("default", &[], &[]));
        assert_eq!(judge("default/p", None, Change::Create, &plain), Ok(()));
        assert_eq!(
            judge(
                "default/p",
                Some(&labels_of(&[("app", "x")])),
                Change::Create,
                &plain
            ),
            Ok(())
        );
        let why = judge(
            "default/p",
            Some(&labels_of(&[(labels::TENANT, "acme")])),
            Change::Create,
            &plain,
        )
        .unwrap_err();
        assert!(
            why.contains("but namespace default has no usable ai-enforcer.io/tenant"),
            "{why}"
        );

        let enforced = Tenancy::of(&namespace(
            "locked",
            &[(labels::ENFORCED, "true"), (labels::REGION, "eu-west-1")],
            &[],
        ));
        let why = judge("locked/p", None, Change::Create, &enforced).unwrap_err();
        assert_eq!(
            why,
            "pod locked/p: namespace locked is enforced (label ai-enforcer.io/enforced=true) but \
             has no tenant: set the label or annotation ai-enforcer.io/tenant on the namespace"
        );
        // An update is not refused for it: the pod exists already (and must stay deletable).
        assert_eq!(
            judge("locked/p", None, Change::Update { old: None }, &enforced),
            Ok(())
        );
    }

    #[test]
    fn an_unusable_namespace_refuses_new_pods_with_its_problem() {
        let broken = Tenancy::of(&namespace(
            "broken",
            &[(labels::TENANT, "acme")],
            &[(labels::TENANT, "globex")],
        ));
        let why = judge("broken/p", None, Change::Create, &broken).unwrap_err();
        assert!(why.starts_with("pod broken/p: namespace broken has label ai-enforcer.io/tenant=\"acme\" and annotation ai-enforcer.io/tenant=\"globex\""), "{why}");
        assert_eq!(
            judge("broken/p", None, Change::Update { old: None }, &broken),
            Ok(())
        );
    }

    #[test]
    fn updates_are_judged_on_what_they_change() {
        let t = acme();
        let stale = labels_of(&[(labels::TENANT, "old-tenant")]);
        // Unchanged stale label (the namespace moved tenant after the pod was admitted).
        assert_eq!(
            judge(
                "acme-prod/p",
                Some(&stale),
                Change::Update { old: Some(&stale) },
                &t
            ),
            Ok(())
        );
        // Relabelling a pod to another tenant is a claim like any other.
        let before = labels_of(&[(labels::TENANT, "acme")]);
        let after = labels_of(&[(labels::TENANT, "globex")]);
        let why = judge(
            "acme-prod/p",
            Some(&after),
            Change::Update { old: Some(&before) },
            &t,
        )
        .unwrap_err();
        assert!(
            why.contains(r#"label ai-enforcer.io/tenant="globex" differs"#),
            "{why}"
        );
        // Adding a claim to a pod that had no labels.
        assert!(judge(
            "acme-prod/p",
            Some(&after),
            Change::Update { old: None },
            &t
        )
        .is_err());
        // Removing a label is not a claim (the mutating webhook puts it back).
        assert_eq!(
            judge(
                "acme-prod/p",
                None,
                Change::Update { old: Some(&before) },
                &t
            ),
            Ok(())
        );
    }
}

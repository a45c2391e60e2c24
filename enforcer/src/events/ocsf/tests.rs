//! Every event the agent emits, in OCSF, against the shipped OCSF 1.8.0 definition files; and
//! the checker itself against events broken on purpose (it must fail where OCSF says so).

use std::collections::BTreeSet;
use std::sync::OnceLock;

use enforcer_common::{hook, proto, reason, verdict, DenyEvent};
use enforcer_policy::{Bundle, Compiled};
use serde_json::{json, Value};

use super::conformance::{shipped_schema_dir, Problem, Schema};
use crate::events::{record, Event, Format, Formatter, Notice};

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::load(&shipped_schema_dir()).expect("the shipped OCSF schema"))
}

fn demo() -> &'static Compiled {
    static DEMO: OnceLock<Compiled> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
        Bundle::load(&dir)
            .expect("the demo bundle loads")
            .compile()
            .expect("the demo bundle compiles")
    })
}

fn id(name: &str) -> u32 {
    demo()
        .identity_by_name(name)
        .unwrap_or_else(|| panic!("no {name} in the demo"))
        .id
}

fn formatter() -> Formatter {
    Formatter::new(
        Format::Ocsf,
        super::Context {
            node: "node-1".into(),
        },
    )
}

fn ocsf(event: &Event) -> Value {
    let line = formatter().line(7, event).unwrap();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line per event"
    );
    serde_json::from_slice(&line).unwrap()
}

fn deny_event(hook: u8, verdict: u8, reason: u8, subject: u32, destination: u32) -> DenyEvent {
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"probe");
    let v6 = matches!(hook, hook::CONNECT6 | hook::SENDMSG6 | hook::BIND6);
    let mut daddr = [0u8; 16];
    if v6 {
        daddr = "fd87::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
    } else {
        daddr[..4].copy_from_slice(&[127, 10, 2, 10]);
    }
    let sock = hook == hook::SOCK_CREATE;
    DenyEvent {
        timestamp_ns: 1,
        cgroup_id: 4242,
        pid_tgid: (777u64 << 32) | 778,
        subject,
        destination,
        daddr,
        dport: if sock { 0 } else { 6333 },
        family: if v6 { 6 } else { 4 },
        protocol: if matches!(hook, hook::SENDMSG4 | hook::SENDMSG6) {
            proto::UDP
        } else {
            proto::TCP
        },
        hook,
        verdict,
        reason,
        _pad: 0,
        comm,
        policy_generation: 0,
        sock_type: if sock {
            3
        } else if hook == hook::INGRESS {
            45001
        } else {
            0
        },
        sock_protocol: if sock { 1 } else { 0 },
        // An ingress event's peer, in the family of `daddr`.
        peer: if hook != hook::INGRESS {
            [0; 16]
        } else if v6 {
            "fd87::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        } else {
            [127, 10, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        },
        count: 1,
        _pad2: 0,
    }
}

/// acme-retriever's `connect()` to globex-vectors, denied as a tenant mismatch.
fn mismatch() -> DenyEvent {
    deny_event(
        hook::CONNECT4,
        verdict::DENY,
        reason::TENANT_MISMATCH,
        id("acme-retriever"),
        id("globex-vectors"),
    )
}

/// Every call the kernel can report: each hook, each verdict, each reason, to a workload, an
/// endpoint and the world, from a known and an unknown subject.
fn calls() -> Vec<record::DeniedCall> {
    let compiled = demo();
    let subjects = [
        id("acme-retriever"),
        id("initech-batch"),
        enforcer_common::identity::UNKNOWN,
    ];
    let destinations = [
        id("globex-vectors"),
        id("acme-features"),
        id("globex-agent"),
        enforcer_common::identity::WORLD,
        enforcer_common::identity::UNIDENTIFIED,
    ];
    // Every hook and reason the kernel has, also those added after this test was written.
    let hooks = 0..hook::COUNT as u8;
    let reasons = 0..reason::COUNT as u8;
    let mut calls = Vec::new();
    for hook in hooks {
        for verdict in [verdict::DENY, verdict::AUDIT, verdict::ALLOW] {
            for reason in reasons.clone() {
                for subject in subjects {
                    for destination in destinations {
                        let event = deny_event(hook, verdict, reason, subject, destination);
                        calls.push(record::enrich(&event, compiled));
                    }
                }
            }
        }
    }
    calls
}

/// One of each notice. The match has no wildcard: a new kind of notice does not compile here
/// until it has a sample (and so a conformance check).
fn notices() -> Vec<Notice> {
    let time = || "2026-11-25T16:00:00.123456789Z".to_string();
    let all = vec![
        Notice::EventsLost {
            time: time(),
            count: 12,
            total: 40,
        },
        Notice::FlowEventsLost {
            time: time(),
            count: 3,
            total: 5,
        },
        Notice::EventsSuppressed {
            time: time(),
            workload: "acme-gateway".into(),
            tenant: "acme".into(),
            identity: 17,
            destination: Some("globex-vectors".into()),
            hook: "connect4",
            verdict: "deny",
            reason: "tenant_mismatch",
            count: 123_456,
        },
        Notice::FlowEventsSuppressed {
            time: time(),
            workload: "acme-gateway".into(),
            tenant: "acme".into(),
            identity: 17,
            opened: 4_000,
            closed: 3_998,
        },
        Notice::PolicyApplied {
            time: time(),
            snapshot: "sha256:e514f1de2beacab7".into(),
            allows: 31,
        },
        Notice::PolicyRejected {
            time: time(),
            policies: "/etc/enforcer/policies".into(),
            errors: vec![
                "baseline.cedar:3:1: error: unexpected token".into(),
                "1 problem(s)".into(),
            ],
            snapshot_in_force: "sha256:e514f1de2beacab7".into(),
        },
        Notice::Quarantined {
            time: time(),
            workload: "acme-retriever".into(),
            identity: 17,
            cause: "high-risk-no-vector-db".into(),
        },
        Notice::Quarantined {
            time: time(),
            workload: "acme-retriever".into(),
            identity: 17,
            cause: "manual".into(),
        },
        Notice::Released {
            time: time(),
            workload: "acme-retriever".into(),
            identity: 17,
        },
        Notice::ClusterProblem {
            time: time(),
            problem: "namespace default has no tenant: its 3 pods are left out".into(),
        },
        Notice::RiskChanged {
            time: time(),
            workload: "acme-retriever".into(),
            score: "0.9".into(),
            added: 0,
            removed: 2,
            elapsed_ms: 5.5,
        },
    ];
    for notice in &all {
        match notice {
            Notice::EventsLost { .. }
            | Notice::FlowEventsLost { .. }
            | Notice::EventsSuppressed { .. }
            | Notice::FlowEventsSuppressed { .. }
            | Notice::PolicyApplied { .. }
            | Notice::PolicyRejected { .. }
            | Notice::Quarantined { .. }
            | Notice::Released { .. }
            | Notice::ClusterProblem { .. }
            | Notice::RiskChanged { .. } => {}
        }
    }
    all
}

fn problems_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_conforms(event: &Value) {
    let problems = schema().check(event);
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems_text(&problems),
        serde_json::to_string_pretty(event).unwrap()
    );
}

#[test]
fn the_schema_files_load_with_the_classes_the_product_emits() {
    let schema = schema();
    assert_eq!(schema.version(), super::SCHEMA_VERSION);
    assert_eq!(schema.class_name(4001), Some("network_activity"));
    assert_eq!(schema.class_name(3004), Some("entity_management"));
    assert_eq!(schema.class_name(6008), Some("application_error"));
    // The README of the OCSF reference: the required attributes of Network Activity.
    let required: BTreeSet<String> = schema
        .required(4001, &["security_control", "host"])
        .into_iter()
        .collect();
    for name in [
        "activity_id",
        "category_uid",
        "class_uid",
        "metadata",
        "severity_id",
        "time",
        "type_uid",
    ] {
        assert!(required.contains(name), "{name} not required: {required:?}");
    }
    // Profiles gate their own requirements: `cloud` only with the cloud profile.
    assert!(!required.contains("cloud"));
    assert!(schema
        .required(4001, &["cloud"])
        .contains(&"cloud".to_string()));
    assert!(schema.required(3004, &[]).contains(&"entity".to_string()));
}

#[test]
fn every_call_conforms_to_network_activity() {
    let calls = calls();
    assert!(calls.len() > 500, "{} samples", calls.len());
    let mut seen = BTreeSet::new();
    for call in calls {
        let verdict = call.verdict;
        let hook = call.hook;
        let event = ocsf(&Event::Call(call));
        assert_conforms(&event);
        assert_eq!(event["class_uid"], 4001);
        let activity = event["activity_id"].as_u64().unwrap();
        let expected = match verdict {
            "deny" => 5,
            _ => 1,
        };
        assert_eq!(activity, expected, "{verdict}");
        seen.insert((verdict, hook));
    }
    assert_eq!(
        seen.len(),
        3 * hook::COUNT,
        "every verdict from every hook: {seen:?}"
    );
}

#[test]
fn every_notice_conforms() {
    let mut kinds = BTreeSet::new();
    for notice in notices() {
        let kind = notice.kind();
        let event = ocsf(&Event::Notice(notice));
        assert_conforms(&event);
        assert_eq!(event["metadata"]["event_code"], kind);
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 10, "{kinds:?}");
}

#[test]
fn a_deny_maps_the_determining_policy_and_its_atlas_technique() {
    let event = mismatch();
    let call = record::enrich(&event, demo());
    let json = ocsf(&Event::Call(call));
    assert_conforms(&json);
    assert_eq!(json["type_uid"], 400105);
    assert_eq!(json["action_id"], 2);
    assert_eq!(json["disposition_id"], 2);
    assert_eq!(json["src_endpoint"]["name"], "acme-retriever");
    assert_eq!(json["src_endpoint"]["owner"]["org"]["name"], "acme");
    assert_eq!(
        json["src_endpoint"]["owner"]["uid"],
        "spiffe://cluster.local/ns/acme/sa/retriever"
    );
    assert_eq!(json["dst_endpoint"]["ip"], "127.10.2.10");
    assert_eq!(json["dst_endpoint"]["port"], 6333);
    assert_eq!(json["dst_endpoint"]["owner"]["org"]["name"], "globex");
    assert_eq!(
        json["actor"]["process"],
        json!({"pid": 777, "name": "probe"})
    );
    assert_eq!(json["firewall_rule"]["uid"], "tenant-isolation");
    assert_eq!(json["policy"]["name"], "tenant-isolation");
    assert_eq!(json["metadata"]["tenant_uid"], "acme");
    assert_eq!(json["metadata"]["sequence"], 7);
    assert_eq!(
        json["attacks"],
        json!([{
            "version": "5.6.0",
            "tactic": {"uid": "AML.TA0009", "name": "Collection",
                       "src_url": "https://atlas.mitre.org/tactics/AML.TA0009"},
            "technique": {"uid": "AML.T0085", "name": "Data from AI Services",
                          "src_url": "https://atlas.mitre.org/techniques/AML.T0085"},
            "sub_technique": {"uid": "AML.T0085.000", "name": "RAG Databases",
                              "src_url": "https://atlas.mitre.org/techniques/AML.T0085.000"}
        }])
    );
    assert_eq!(json["unmapped"]["dataset_scope"], json!(["globex-kb"]));
    assert_eq!(
        json["unmapped"]["subject_chain"],
        json!(["spiffe://cluster.local/ns/acme/sa/retriever"])
    );
    assert_eq!(
        json["unmapped"]["policy_sources"],
        json!(["baseline.cedar:10"]),
        "relative to the bundle"
    );
    assert!(json["unmapped"]["policy_snapshot"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
}

#[test]
fn a_technique_with_two_tactics_is_two_attacks() {
    // The demo's implicit deny maps to AML.T0012 (Initial Access, Privilege Escalation).
    let event = deny_event(
        hook::CONNECT4,
        verdict::DENY,
        reason::NO_PERMIT,
        id("acme-retriever"),
        enforcer_common::identity::WORLD,
    );
    let json = ocsf(&Event::Call(record::enrich(&event, demo())));
    assert_conforms(&json);
    let tactics: Vec<&str> = json["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tactic"]["uid"].as_str().unwrap())
        .collect();
    assert_eq!(tactics, ["AML.TA0004", "AML.TA0012"]);
    assert_eq!(json["attacks"][0]["technique"]["uid"], "AML.T0012");
    assert!(json["attacks"][0].get("sub_technique").is_none());
    assert_eq!(json["connection_info"]["direction_id"], 2, "to the world");
}

/// The JSON of a deny, for the mutations below.
fn deny_json() -> Value {
    let event = mismatch();
    ocsf(&Event::Call(record::enrich(&event, demo())))
}

fn remove(event: &mut Value, path: &str) {
    let (parent, key) = match path.rsplit_once('/') {
        Some((parent, key)) => (parent, key),
        None => ("", path),
    };
    let parent = if parent.is_empty() {
        event
    } else {
        event.pointer_mut(&format!("/{parent}")).unwrap()
    };
    assert!(
        parent.as_object_mut().unwrap().remove(key).is_some(),
        "{path} was not there to remove"
    );
}

/// The checker must fail what OCSF forbids: each mutation of a valid event is reported, at
/// the attribute concerned.
#[test]
fn the_checker_reports_each_broken_rule() {
    let valid = deny_json();
    assert_conforms(&valid);

    // Required attributes, from OCSF 1.8.0's files as its README lists them, and the
    // required attributes of nested objects.
    for path in [
        "class_uid",
        "category_uid",
        "activity_id",
        "type_uid",
        "severity_id",
        "time",
        "metadata",
        "metadata/version",
        "metadata/product",
        "connection_info/direction_id",
        "device/type_id",
    ] {
        let mut event = valid.clone();
        remove(&mut event, path);
        let problems = schema().check(&event);
        let dotted = path.replace('/', ".");
        assert!(
            problems.iter().any(|p| p.path == dotted),
            "dropping {path} went unreported: {problems:?}"
        );
    }

    type Mutation = (&'static str, fn(&mut Value), &'static str);
    let mutations: &[Mutation] = &[
        (
            "activity_id",
            |e| e["activity_id"] = json!(42),
            "activity_id",
        ),
        (
            "disposition_id",
            |e| e["disposition_id"] = json!(1000),
            "disposition_id",
        ),
        (
            "direction_id",
            |e| e["connection_info"]["direction_id"] = json!(7),
            "connection_info.direction_id",
        ),
        (
            "port as a string",
            |e| e["dst_endpoint"]["port"] = json!("6333"),
            "dst_endpoint.port",
        ),
        (
            "port out of range",
            |e| e["dst_endpoint"]["port"] = json!(70000),
            "dst_endpoint.port",
        ),
        (
            "ip that is not one",
            |e| e["dst_endpoint"]["ip"] = json!("10.0.0.999x"),
            "dst_endpoint.ip",
        ),
        ("time as text", |e| e["time"] = json!("now"), "time"),
        (
            "an attribute OCSF does not have",
            |e| e["src_endpoint"]["tenant"] = json!("acme"),
            "src_endpoint.tenant",
        ),
        (
            "a profile's attribute without the profile",
            |e| e["metadata"]["profiles"] = json!(["security_control"]),
            "device",
        ),
        (
            "an unknown profile",
            |e| e["metadata"]["profiles"] = json!(["security_control", "host", "k8s"]),
            "metadata.profiles",
        ),
        (
            "type_uid arithmetic",
            |e| e["type_uid"] = json!(400101),
            "type_uid",
        ),
        (
            "caption of another activity",
            |e| e["activity_name"] = json!("Open"),
            "activity_name",
        ),
        (
            "class name",
            |e| e["class_name"] = json!("Network Traffic"),
            "class_name",
        ),
        (
            "deprecated tactics array",
            |e| e["attacks"][0]["tactics"] = json!([{"uid": "AML.TA0009"}]),
            "attacks[0].tactics",
        ),
        (
            "an attack with neither tactic nor technique",
            |e| e["attacks"][0] = json!({"version": "5.6.0"}),
            "attacks[0]",
        ),
        (
            "a process without pid",
            |e| e["actor"]["process"] = json!({"name": "probe"}),
            "actor.process",
        ),
        (
            "attacks as one object",
            |e| e["attacks"] = e["attacks"][0].clone(),
            "attacks",
        ),
        ("null", |e| e["message"] = Value::Null, "message"),
        (
            "another schema version",
            |e| e["metadata"]["version"] = json!("1.7.0"),
            "metadata.version",
        ),
        (
            "an object where a string goes",
            |e| e["message"] = json!({"text": "x"}),
            "message",
        ),
        (
            "a class these files do not define",
            |e| e["class_uid"] = json!(4002),
            "class_uid",
        ),
    ];
    for (what, mutate, path) in mutations {
        let mut event = valid.clone();
        mutate(&mut event);
        let problems = schema().check(&event);
        assert!(
            problems.iter().any(|p| p.path == *path),
            "{what}: no problem at {path}: {problems:?}"
        );
    }
}

#[test]
fn the_checker_also_reports_broken_notices() {
    let applied = notices()
        .into_iter()
        .find(|n| n.kind() == "policy.applied")
        .unwrap();
    let mut event = ocsf(&Event::Notice(applied));
    assert_conforms(&event);
    remove(&mut event, "entity");
    assert!(schema().check(&event).iter().any(|p| p.path == "entity"));
    let mut event = ocsf(&Event::Notice(notices().remove(0)));
    event["entity"] = json!({"name": "x", "type_id": 99});
    assert!(
        schema().check(&event).iter().any(|p| p.path == "entity"),
        "Application Error has no entity"
    );
}

#[test]
fn json_lines_carry_seq_and_keep_their_fields() {
    let formatter = Formatter::new(
        Format::Json,
        super::Context {
            node: "node-1".into(),
        },
    );
    let call = record::enrich(
        &deny_event(
            hook::CONNECT4,
            verdict::DENY,
            reason::TENANT_MISMATCH,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        demo(),
    );
    let line: Value =
        serde_json::from_slice(&formatter.line(3, &Event::Call(call)).unwrap()).unwrap();
    assert_eq!(line["seq"], 3);
    assert_eq!(line["type"], "connection.denied");
    assert_eq!(line["policy"]["sources"], json!(["baseline.cedar:10"]));
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    for notice in notices() {
        let kind = notice.kind();
        let line: Value =
            serde_json::from_slice(&formatter.line(9, &Event::Notice(notice)).unwrap()).unwrap();
        assert_eq!(line["type"], kind);
        assert_eq!(line["seq"], 9);
    }
}

#[test]
fn a_pods_container_is_the_source_endpoints_container() {
    use crate::events::cgroup::context_of;
    let cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    let static_uid = "6f1d2c3b4a5968778695a4b3c2d1e0f1";
    let cases = [
        (
            format!(
                "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{cid}.scope",
                uid.replace('-', "_")
            ),
            Some((cid, Some(uid), Some("containerd"))),
        ),
        (
            format!("kubepods/besteffort/pod{static_uid}/{cid}"),
            Some((cid, None, None)),
        ),
        (format!("kubepods/pod{uid}"), None),
        ("enforcer-demo/acme-retriever".to_string(), None),
    ];
    for (path, container) in cases {
        let mut call = record::enrich(
            &deny_event(
                hook::CONNECT4,
                verdict::DENY,
                reason::TENANT_MISMATCH,
                id("acme-retriever"),
                id("globex-vectors"),
            ),
            demo(),
        );
        call.facts_mut().subject.cgroup = Some(std::sync::Arc::new(context_of(&path)));
        let json_line: Value = serde_json::from_slice(
            &Formatter::new(Format::Json, super::Context { node: "n".into() })
                .line(
                    1,
                    &Event::Call(record::enrich(
                        &deny_event(hook::CONNECT4, verdict::DENY, reason::TENANT_MISMATCH, 0, 0),
                        demo(),
                    )),
                )
                .unwrap(),
        )
        .unwrap();
        assert!(
            json_line["subject"].get("cgroup").is_none(),
            "left out when unknown"
        );
        let event = ocsf(&Event::Call(call));
        assert_conforms(&event);
        assert_eq!(event["unmapped"]["subject"]["cgroup"], path.as_str());
        let profiles = event["metadata"]["profiles"].as_array().unwrap();
        match container {
            Some((cid, pod_uuid, runtime)) => {
                let c = &event["src_endpoint"]["container"];
                assert_eq!(c["uid"], cid, "{path}");
                assert_eq!(c["pod_uuid"].as_str(), pod_uuid, "{path}");
                assert_eq!(c["runtime"].as_str(), runtime, "{path}");
                assert_eq!(c["orchestrator"], "Kubernetes");
                assert!(profiles.contains(&json!("container")));
            }
            None => {
                assert!(event["src_endpoint"].get("container").is_none(), "{path}");
                assert!(!profiles.contains(&json!("container")));
            }
        }
    }
    // The checker knows the container profile: without it declared, the container is wrong.
    let mut call = record::enrich(
        &deny_event(
            hook::CONNECT4,
            verdict::DENY,
            reason::NO_PERMIT,
            id("acme-retriever"),
            1,
        ),
        demo(),
    );
    call.facts_mut().subject.cgroup = Some(std::sync::Arc::new(context_of(&format!(
        "kubepods/pod{uid}/{cid}"
    ))));
    let mut event = ocsf(&Event::Call(call));
    event["metadata"]["profiles"] = json!(["security_control", "host"]);
    assert!(schema()
        .check(&event)
        .iter()
        .any(|p| p.path == "src_endpoint.container"));
}

/// The README's golden OCSF deny conforms, and is what the formatter writes for that deny.
#[test]
fn the_readme_golden_deny_is_valid_and_current() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    let after = readme
        .split("<!-- golden-ocsf-deny -->")
        .nth(1)
        .expect("the README marks its golden OCSF deny");
    let block = after
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a json block after the marker");
    let golden: Value = serde_json::from_str(block).expect("the golden event is JSON");
    assert_conforms(&golden);

    // The same call, formatted now: equal but for what differs by machine and moment.
    let mut call = record::enrich(
        &deny_event(
            hook::CONNECT4,
            verdict::DENY,
            reason::TENANT_MISMATCH,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        demo(),
    );
    let path = golden["unmapped"]["subject"]["cgroup"].as_str().unwrap();
    call.facts_mut().subject.cgroup =
        Some(std::sync::Arc::new(crate::events::cgroup::context_of(path)));
    call.pid = golden["actor"]["process"]["pid"].as_u64().unwrap() as u32;
    call.facts_mut().subject.cgroup_id =
        golden["unmapped"]["subject"]["cgroup_id"].as_u64().unwrap();
    let mut now = Formatter::new(
        Format::Ocsf,
        super::Context {
            node: golden["device"]["hostname"].as_str().unwrap().into(),
        },
    )
    .line(
        golden["metadata"]["sequence"].as_u64().unwrap(),
        &Event::Call(call),
    )
    .map(|l| serde_json::from_slice::<Value>(&l).unwrap())
    .unwrap();
    // Nor the demo bundle's revision, which any edit of it changes.
    for pointer in [
        "/time",
        "/metadata/product/version",
        "/policy/version",
        "/firewall_rule/version",
        "/unmapped/policy_snapshot",
    ] {
        *now.pointer_mut(pointer).unwrap() = golden.pointer(pointer).unwrap().clone();
    }
    assert_eq!(
        now,
        golden,
        "the README's golden OCSF deny is out of date; the formatter writes:\n{}",
        serde_json::to_string(&now).unwrap()
    );
}

/// A tracked flow from acme-retriever to acme-vectors, as the kernel records it.
fn flow_record() -> enforcer_common::FlowRecord {
    let mut comm = [0u8; 16];
    comm[..6].copy_from_slice(b"client");
    let mut saddr = [0u8; 16];
    saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let mut daddr = [0u8; 16];
    daddr[..4].copy_from_slice(&[127, 10, 1, 10]);
    enforcer_common::FlowRecord {
        start_ns: 1,
        cgroup_id: 42,
        pid_tgid: 1234 << 32,
        subject: id("acme-retriever"),
        destination: id("acme-vectors"),
        saddr,
        daddr,
        sport: 40_000,
        dport: 6333,
        family: 4,
        protocol: proto::TCP,
        state: enforcer_common::flow_state::ESTABLISHED,
        comm,
        ..Default::default()
    }
}

#[test]
fn every_flow_event_conforms_to_network_activity() {
    use crate::events::flow;
    let record = flow_record();
    let now = std::time::SystemTime::now();
    let mut expected = Vec::new();
    for (kind, activity) in [
        (flow::OPENED, 1),
        (flow::CLOSED, 2),
        (flow::REVOKED, 3),
        (flow::STALE, 6),
        (flow::REVOKE_FAILED, 6),
        (flow::ANOMALY, 6),
    ] {
        let mut call = flow::flow(kind, now, 99, &record, demo());
        if kind == flow::ANOMALY {
            call.anomaly = Some(flow::Anomaly {
                new_datasets: vec!["acme-kb".into()],
                new_datasets_total: None,
                neighbourhood: vec!["acme-docs".into()],
                neighbourhood_total: None,
                learned_until: crate::events::record::Time(now),
                step_up: Some("quarantine"),
                quarantined_until: Some(crate::events::record::Time(now)),
                count: None,
                first_seen: None,
            });
            call.atlas = crate::learn::atlas(true);
        }
        if kind == flow::CLOSED {
            call.flow.bytes_sent = Some(1008);
            call.flow.bytes_received = Some(2345);
            call.flow.duration_ms = Some(12.5);
        }
        if kind == flow::REVOKE_FAILED {
            call.flow.error = Some("no process found in the flow's network namespace".into());
        }
        if kind == flow::REVOKED || kind == flow::STALE || kind == flow::REVOKE_FAILED {
            call.flow.reason = Some("no_permit");
            call.policy.revoked_by = Some("sha256:0123456789abcdef".into());
            call.policy.id = Some("tenant-isolation".into());
        }
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(json["type"], kind);
        assert_eq!(json["subject"]["workload"], "acme-retriever");
        assert_eq!(json["destination"]["kind"], "vector_db");
        assert_eq!(json["flow"]["source"]["port"], 40_000);
        assert!(
            !json["dataset_scope"].as_array().unwrap().is_empty(),
            "{json}"
        );
        let event = ocsf(&Event::Flow(call));
        assert_conforms(&event);
        assert_eq!(event["class_uid"], 4001);
        assert_eq!(event["activity_id"], activity, "{kind}");
        assert_eq!(event["metadata"]["event_code"], kind);
        assert_eq!(event["src_endpoint"]["port"], 40_000);
        assert_eq!(event["dst_endpoint"]["port"], 6333);
        expected.push(event);
    }
    // A record the agent ended (its socket gone without the close callback): no counters.
    let mut found = flow::flow(flow::CLOSED, now, 99, &record, demo());
    found.flow.ended_by = Some("agent");
    let json = serde_json::to_value(&found).unwrap();
    assert_eq!(json["flow"]["ended_by"], "agent");
    assert!(json["flow"].get("bytes_sent").is_none(), "{json}");
    let event = ocsf(&Event::Flow(found));
    assert_conforms(&event);
    assert_eq!(event["activity_id"], 2);
    assert!(event.get("traffic").is_none(), "{event}");
    assert_eq!(event["unmapped"]["flow"]["ended_by"], "agent");
    let closed = &expected[1];
    assert_eq!(closed["traffic"]["bytes_out"], 1008);
    assert_eq!(closed["traffic"]["bytes_in"], 2345);
    assert_eq!(closed["traffic"]["bytes"], 1008 + 2345);
    assert_eq!(closed["duration"], 12);
    assert_eq!(expected[2]["policy"]["uid"], "tenant-isolation");
    assert_eq!(expected[2]["is_alert"], true);
    let anomaly = &expected[5];
    assert_eq!(anomaly["is_alert"], true);
    assert_eq!(anomaly["disposition_id"], 15);
    assert_eq!(anomaly["severity_id"], 4);
    assert_eq!(anomaly["unmapped"]["anomaly"]["new_datasets"][0], "acme-kb");
    assert!(
        anomaly["attacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["sub_technique"]["uid"] == "AML.T0085.000"),
        "{anomaly}"
    );
    let failed = &expected[4];
    assert_eq!(failed["status_id"], 2);
    assert_eq!(failed["is_alert"], true);
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("could not be reset"),
        "{failed}"
    );
}

/// `--tenant`/`--workload` select an ingress refusal by either end: the peer's claim when it
/// can be named, and the local destination it was refused for (a forged `bad_tag` claim
/// names no tenant, so only the destination's tenant sees it).
#[test]
fn tenant_filters_select_ingress_events_by_either_end() {
    use crate::events::stream::Filter;
    let compiled = demo();
    let forged = record::enrich(
        &deny_event(
            hook::INGRESS,
            verdict::DENY,
            reason::BAD_TAG,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        compiled,
    );
    assert!(forged.subject.workload.is_none() && forged.subject.tenant.is_none());
    let call = Event::Call(forged);
    let tenant = |t: &str| Filter {
        tenant: Some(t.into()),
        ..Filter::default()
    };
    assert!(tenant("globex").matches(&call));
    assert!(
        !tenant("acme").matches(&call),
        "a forged claim routed an event to its tenant"
    );
    // An untagged SYN's source address is the sender's word too: the address's owner is
    // named as the peer's, never as the subject, and its tenant sees nothing.
    let untagged = record::enrich(
        &deny_event(
            hook::INGRESS,
            verdict::DENY,
            reason::MISSING_TAG,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        compiled,
    );
    assert!(untagged.subject.workload.is_none() && untagged.subject.tenant.is_none());
    assert!(untagged.subject_chain.is_empty());
    assert_eq!(
        untagged.peer.as_ref().and_then(|p| p.workload.as_deref()),
        Some("acme-retriever")
    );
    let untagged = Event::Call(untagged);
    let line = ocsf(&untagged);
    assert_eq!(
        line["unmapped"]["peer_workload"], "acme-retriever",
        "{line}"
    );
    assert!(line["src_endpoint"].get("name").is_none(), "{line}");
    assert_eq!(line["metadata"]["tenant_uid"], "globex", "{line}");
    assert!(tenant("globex").matches(&untagged));
    assert!(
        !tenant("acme").matches(&untagged),
        "a spoofable source address routed an event to its owner's tenant"
    );
    let verified = Event::Call(record::enrich(
        &deny_event(
            hook::INGRESS,
            verdict::DENY,
            reason::NOT_ALLOWED,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        compiled,
    ));
    assert!(tenant("acme").matches(&verified) && tenant("globex").matches(&verified));
    let workload = Filter {
        workload: Some("globex-vectors".into()),
        ..Filter::default()
    };
    assert!(workload.matches(&verified));
    // Tenant and workload on the same end: acme's tenant with globex's workload is neither.
    let crossed = Filter {
        tenant: Some("acme".into()),
        workload: Some("globex-vectors".into()),
        ..Filter::default()
    };
    assert!(!crossed.matches(&verified));
    // Not for the other hooks: an outbound call is its subject's.
    let outbound = Event::Call(record::enrich(
        &deny_event(
            hook::CONNECT4,
            verdict::DENY,
            reason::TENANT_MISMATCH,
            id("acme-retriever"),
            id("globex-vectors"),
        ),
        compiled,
    ));
    assert!(tenant("acme").matches(&outbound) && !tenant("globex").matches(&outbound));
}

/// The same facts with another time, count, process and `seq` (a comm that needs escaping).
fn again(call: &record::DeniedCall) -> record::DeniedCall {
    record::DeniedCall {
        time: record::Time(std::time::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 42)),
        count: 9_876,
        pid: 31_337,
        comm: "we\"ird\\c\u{1}mm".to_string(),
        facts: call.facts.clone(),
    }
}

#[test]
fn a_keys_template_writes_the_line_the_formatter_writes() {
    use crate::events::cgroup::context_of;
    let pod = "kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/\
               cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";
    let mut calls = calls();
    // With a cgroup context, the subject's and (ingress) the listener's.
    for hook in [hook::CONNECT4, hook::INGRESS] {
        let mut call = record::enrich(
            &deny_event(
                hook,
                verdict::DENY,
                reason::NOT_ALLOWED,
                id("acme-retriever"),
                id("globex-vectors"),
            ),
            demo(),
        );
        let context = Some(std::sync::Arc::new(context_of(pod)));
        match call.facts_mut() {
            facts if hook == hook::INGRESS => facts.destination.as_mut().unwrap().cgroup = context,
            facts => facts.subject.cgroup = context,
        }
        calls.push(call);
    }
    for format in [Format::Json, Format::Ocsf] {
        let formatter = Formatter::new(format, super::Context { node: "n".into() });
        for call in &calls {
            // The first line of a key: the formatter's own serialisation.
            let mut first = Vec::new();
            formatter
                .append_line(3, &Event::Call(call.clone()), &mut first)
                .unwrap();
            assert!(!call.facts.templates.made(format));
            let mut slow = Vec::new();
            formatter
                .append_slow(3, &Event::Call(call.clone()), &mut slow)
                .unwrap();
            assert_eq!(first, slow);
            // The second: the template, with another call's values.
            let second = again(call);
            let mut line = b"before".to_vec();
            formatter
                .append_line(u64::MAX, &Event::Call(second), &mut line)
                .unwrap();
            assert!(
                call.facts.templates.made(format),
                "{format:?}: no template for {}",
                String::from_utf8_lossy(&first)
            );
            let mut expected = b"before".to_vec();
            formatter
                .append_slow(u64::MAX, &Event::Call(again(call)), &mut expected)
                .unwrap();
            assert_eq!(
                String::from_utf8(line).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
        // A formatter of another node does not use this node's OCSF templates.
        if format == Format::Ocsf {
            let other = Formatter::new(format, super::Context { node: "m".into() });
            let call = again(&calls[0]);
            let line: Value =
                serde_json::from_slice(&other.line(1, &Event::Call(call)).unwrap()).unwrap();
            assert_eq!(line["device"]["hostname"], "m");
        }
    }
}

#[test]
fn a_changed_copy_of_shared_facts_writes_its_own_line() {
    let formatter = Formatter::new(Format::Json, super::Context { node: "n".into() });
    let call = calls().swap_remove(0);
    let mut changed = again(&call);
    for _ in 0..2 {
        formatter.line(1, &Event::Call(again(&call))).unwrap();
    }
    assert!(call.facts.templates.made(Format::Json));
    changed.facts_mut().policy.id = "changed".into();
    for _ in 0..2 {
        let line: Value =
            serde_json::from_slice(&formatter.line(1, &Event::Call(again(&changed))).unwrap())
                .unwrap();
        assert_eq!(line["policy"]["id"], "changed");
    }
    let line: Value =
        serde_json::from_slice(&formatter.line(1, &Event::Call(call)).unwrap()).unwrap();
    assert_ne!(line["policy"]["id"], "changed");
}

#[test]
fn calls_of_one_key_share_their_facts_for_one_policy() {
    use std::sync::Arc;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
    let compile = || Arc::new(Bundle::load(&dir).unwrap().compile().unwrap());
    let (policy, newer) = (compile(), compile());
    let mut enricher = record::Enricher::new();
    let event = mismatch();
    let context = Arc::new(crate::events::cgroup::context_of("enforcer-demo/acme"));
    let mut asked = Vec::new();
    let mut enrich = |enricher: &mut record::Enricher, event: &DenyEvent, policy, answer| {
        enricher.enrich(event, policy, |id, pid| {
            asked.push((id, pid));
            answer
        })
    };
    let first = enrich(&mut enricher, &event, &policy, None);
    // Another process of the same key, later: the same facts, its own time and process.
    let mut later = event;
    later.timestamp_ns += 1_000;
    later.pid_tgid = 77 << 32;
    later.comm = *b"other\0\0\0\0\0\0\0\0\0\0\0";
    later.count = 3;
    let second = enrich(&mut enricher, &later, &policy, None);
    assert!(Arc::ptr_eq(&first.facts, &second.facts));
    assert_eq!(
        (second.pid, second.comm.as_str(), second.count),
        (77, "other", 3)
    );
    assert_eq!(second.facts.subject.cgroup, None);
    // The cgroup was not known: asked again, and once known, kept and not asked again.
    let third = enrich(&mut enricher, &later, &policy, Some(context.clone()));
    assert_eq!(third.facts.subject.cgroup.as_ref(), Some(&context));
    let fourth = enrich(&mut enricher, &event, &policy, None);
    assert!(Arc::ptr_eq(&third.facts, &fourth.facts));
    assert_eq!(asked.len(), 3, "{asked:?}");
    // The key: another port is other facts; the policy: another revision, other facts.
    let mut port = event;
    port.dport += 1;
    let other_port = enricher.enrich(&port, &policy, |_, _| None);
    assert!(!Arc::ptr_eq(&other_port.facts, &fourth.facts));
    assert_eq!(
        other_port.facts.destination.as_ref().unwrap().port,
        port.dport
    );
    let other_policy = enricher.enrich(&event, &newer, |_, _| None);
    assert!(!Arc::ptr_eq(&other_policy.facts, &fourth.facts));
    // An ingress call's context is the listener's: the destination's, asked with no pid.
    let mut ingress = event;
    ingress.hook = hook::INGRESS;
    let mut asked = None;
    let call = enricher.enrich(&ingress, &policy, |id, pid| {
        asked = Some((id, pid));
        Some(context.clone())
    });
    assert_eq!(asked, Some((ingress.cgroup_id, 0)));
    assert_eq!(call.subject.cgroup, None);
    assert_eq!(
        call.subject.cgroup_id, 0,
        "the peer's cgroup is not this node's"
    );
    assert_eq!(
        call.destination.as_ref().unwrap().cgroup.as_ref(),
        Some(&context)
    );
    let again = enricher.enrich(&ingress, &policy, |_, _| panic!("known: not asked again"));
    assert!(Arc::ptr_eq(&again.facts, &call.facts));
    // As `enrich` without sharing would have it.
    let alone = record::enrich(&later, &newer);
    let shared = enricher.enrich(&later, &newer, |_, _| None);
    let mut alone = serde_json::to_value(&alone).unwrap();
    let mut shared = serde_json::to_value(shared).unwrap();
    // The wall-clock time of a monotonic stamp moves between two reads of the clock.
    alone["time"].take();
    shared["time"].take();
    assert_eq!(alone, shared);
}

#[test]
fn a_calls_quarantine_cause_is_the_policys() {
    // The demo with acme-retriever at risk 0.9: the `@quarantine` forbid of vector DBs.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let demo_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
    let dir = Dir(std::env::temp_dir().join(format!("enforcer-quarantine-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    for entry in std::fs::read_dir(&demo_dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            dir.0.join(path.file_name().unwrap()),
            text.replacen("risk: 0.2", "risk: 0.9", 1),
        )
        .unwrap();
    }
    let risky = Bundle::load(&dir.0).unwrap().compile().unwrap();
    let id = |name: &str| risky.identity_by_name(name).unwrap().id;
    let names = [
        "acme-retriever",
        "initech-batch",
        "globex-vectors",
        "acme-features",
        "globex-agent",
    ];
    let mut causes = 0;
    for subject in names.map(id) {
        for destination in names
            .map(id)
            .into_iter()
            .chain([enforcer_common::identity::WORLD])
        {
            for reason in [reason::TENANT_MISMATCH, reason::NO_PERMIT] {
                let mut event =
                    deny_event(hook::CONNECT4, verdict::DENY, reason, subject, destination);
                for port in [80, 443, 6333, 8080, 9000] {
                    event.dport = port;
                    let call = record::enrich(&event, &risky);
                    let expected =
                        risky.quarantine_on_deny(subject, destination, port, event.protocol);
                    causes += usize::from(expected.is_some());
                    assert_eq!(
                        call.quarantine, expected,
                        "{subject} -> {destination}:{port}"
                    );
                }
            }
        }
    }
    assert!(causes > 0, "the @quarantine policy decides some call");
}

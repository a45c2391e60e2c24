//! Bundle-level tests: the demo bundle, every rejection class with its exact location, and
//! the central invariant (compiled table == Cedar oracle) on generated bundles.

use std::path::{Path, PathBuf};

use enforcer_common::{identity as reserved, proto};
use proptest::prelude::*;

use crate::testutil::{random_bundle, synthetic_bundle};
use crate::{Bundle, Effect, Protocol};

pub(crate) fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo")
}

fn demo() -> Bundle {
    Bundle::load(&demo_dir()).unwrap_or_else(|d| panic!("demo bundle invalid:\n{d}"))
}

/// A copy of the demo bundle with `file` replaced by `content`.
pub(crate) fn demo_with(file: &str, content: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(tmp.path().join(file), content).unwrap();
    tmp
}

/// A copy of the demo bundle with `file` replaced by `content`, loaded: the diagnostics.
fn load_with(file: &str, content: &str) -> Vec<String> {
    let tmp = demo_with(file, content);
    match Bundle::load(tmp.path()) {
        Ok(_) => vec![],
        Err(d) => {
            d.0.iter()
                .map(|d| {
                    let name = d.file.file_name().unwrap().to_string_lossy().into_owned();
                    let hint = d
                        .hint
                        .as_deref()
                        .map(|h| format!(" [hint: {h}]"))
                        .unwrap_or_default();
                    format!("{name}:{}:{}: {}{hint}", d.line, d.column, d.message)
                })
                .collect()
        }
    }
}

fn assert_diag(diags: &[String], prefix: &str, contains: &str) {
    assert!(
        diags
            .iter()
            .any(|d| d.starts_with(prefix) && d.contains(contains)),
        "expected `{prefix}` with `{contains}` in:\n{}",
        diags.join("\n")
    );
}

#[test]
fn demo_cross_tenant_vector_db_is_denied_by_tenant_isolation() {
    let b = demo();
    let d = b
        .decide("acme-retriever", "globex-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(d.action, "query");
    assert_eq!(d.policies.len(), 1);
    let p = &d.policies[0];
    assert_eq!(
        (p.id.as_str(), p.effect),
        ("tenant-isolation", Effect::Forbid)
    );
    assert_eq!(p.file.file_name().unwrap(), "baseline.cedar");
    assert_eq!(p.line, 10);
    assert_eq!(p.atlas[0].id, "AML.T0085.000");
    assert_eq!(p.atlas[0].name, "RAG Databases");
    assert_eq!(p.atlas[0].tactics, vec!["Collection"]);

    let c = b.compile().unwrap();
    let s = c.identity_by_name("acme-retriever").unwrap().id;
    let g = c.identity_by_name("globex-vectors").unwrap().id;
    assert!(!c.is_allowed(s, g, 6333, proto::TCP));
    let a = c.attribute(s, g, 6333, proto::TCP);
    assert_eq!(a.policy_id, "tenant-isolation");
    assert_eq!(a.atlas[0].name, "RAG Databases");
    assert_eq!(a.atlas[0].tactics, vec!["Collection"]);
}

#[test]
fn demo_decisions_and_attribution() {
    let b = demo();
    let c = b.compile().unwrap();
    let id = |n: &str| c.identity_by_name(n).unwrap().id;
    let (retriever, evaluator) = (id("acme-retriever"), id("acme-evaluator"));

    // Same tenant: allowed by same-tenant, and the allow entry names it.
    let d = b
        .decide("acme-retriever", "acme-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.policies[0].id, "same-tenant");
    let key = c
        .allows()
        .iter()
        .find(|(k, _)| k.subject == retriever && k.destination == id("acme-vectors"))
        .unwrap();
    assert_eq!(key.0.dport, 6333);
    assert_eq!(c.rules()[key.1.rule as usize].id, "same-tenant");

    // Purpose rule: evaluation may read features, not write them.
    assert!(
        b.decide("acme-evaluator", "acme-features", 6566, Protocol::Tcp)
            .unwrap()
            .allowed
    );
    let d = b
        .decide("acme-evaluator", "acme-features", 6567, Protocol::Tcp)
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(d.action, "write");
    assert_eq!(d.policies[0].id, "evaluation-no-feature-write");
    let a = c.attribute(evaluator, id("acme-features"), 6567, proto::TCP);
    assert_eq!(a.policy_id, "evaluation-no-feature-write");
    assert_eq!(a.atlas[0].id, "AML.T0020");
    assert!(
        b.decide("acme-retriever", "acme-features", 6567, Protocol::Tcp)
            .unwrap()
            .allowed
    );

    // An undeclared port, WORLD, an unknown subject.
    let d = b
        .decide("acme-retriever", "acme-vectors", 22, Protocol::Tcp)
        .unwrap();
    assert!(!d.allowed && d.undeclared_port);
    let a = c.attribute(retriever, id("acme-vectors"), 22, proto::TCP);
    assert_eq!(a.policy_id, "undeclared-port");
    assert_eq!(a.atlas[0].id, "AML.T0012");
    let a = c.attribute(retriever, id("acme-vectors"), 6333, proto::UDP);
    assert_eq!(a.policy_id, "undeclared-port");
    let a = c.attribute(retriever, reserved::WORLD, 443, proto::TCP);
    assert_eq!(
        (a.policy_id.as_str(), a.atlas[0].id.as_str()),
        ("implicit-deny", "AML.T0012")
    );
    let a = c.attribute(12345, reserved::WORLD, 443, proto::TCP);
    assert_eq!(
        (a.policy_id.as_str(), a.atlas[0].id.as_str()),
        ("unknown-subject", "AML.T0103")
    );
    assert_eq!(c.unknown_subject_atlas()[0].name, "Deploy AI Agent");

    // Any-port destination: one wildcard entry per protocol.
    let dns = id("globex-dns");
    let agent = id("globex-agent");
    for p in [proto::TCP, proto::UDP] {
        assert!(c.allows().iter().any(|(k, _)| k.subject == agent
            && k.destination == dns
            && k.dport == 0
            && k.protocol == p));
    }
    assert!(c.is_allowed(agent, dns, 5353, proto::UDP));
    assert!(
        b.decide("globex-agent", "globex-dns", 53, Protocol::Udp)
            .unwrap()
            .any_port
    );

    // Identities: WORLD included, flags.
    assert!(c.identities().any(|i| i.id == reserved::WORLD));
    let vectors = c.identity_by_name("acme-vectors").unwrap();
    assert_ne!(vectors.info().flags & enforcer_common::flags::VECTOR_DB, 0);
    let batch = c.identity_by_name("initech-batch").unwrap();
    assert_ne!(batch.flags & enforcer_common::flags::AUDIT, 0);
    // A workload with cgroups here serves in the node's namespace (as far as the inventory
    // knows): reached through addresses nobody holds, judged as itself there.
    assert_eq!(
        c.identity_by_name("acme-retriever").unwrap().flags,
        enforcer_common::flags::SHARED_NETNS
    );
    assert!(c.stats().cell_groups <= c.stats().cells + c.stats().ingress_cells);

    // Explain, human and JSON.
    let e = b
        .explain("acme-retriever", "globex-vectors", 6333, Protocol::Tcp)
        .unwrap();
    let text = e.to_string();
    assert!(
        text.starts_with("DENY: acme-retriever -> globex-vectors port 6333/tcp"),
        "{text}"
    );
    assert!(
        text.contains("forbid tenant-isolation at ") && text.contains("baseline.cedar:10"),
        "{text}"
    );
    assert!(
        text.contains("ATLAS AML.T0085.000 RAG Databases (Collection)"),
        "{text}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(
        json["decision"]["policies"][0]["atlas"][0]["id"],
        "AML.T0085.000"
    );
    assert_eq!(json["kernel_key"]["dport"], 6333);
}

#[test]
fn revision_and_identities_are_stable() {
    let a = demo();
    let b = demo();
    assert_eq!(a.revision(), b.revision());
    assert!(a.revision().starts_with("sha256:") && a.revision().len() == 7 + 16);
    // Reordering the inventory keeps every identity's ID; an edit changes the revision.
    let text = std::fs::read_to_string(demo_dir().join("inventory.yaml")).unwrap();
    let (head, rest) = text.split_at(text.find("  - name: acme-retriever").unwrap());
    let (first, others) = rest.split_at(rest.find("  - name: acme-evaluator").unwrap());
    let (workloads, endpoints) = others.split_at(others.find("\nendpoints:").unwrap());
    let reordered = format!(
        "{head}{workloads}\n{first}{}",
        endpoints.trim_start_matches('\n')
    );
    let tmp = demo_with("inventory.yaml", &reordered);
    let c = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    assert_ne!(c.revision(), a.revision());
    for i in a.identities().iter() {
        assert_eq!(
            c.identities().by_name(&i.name).unwrap().id,
            i.id,
            "{}",
            i.name
        );
    }
}

const GOOD_INV: &str = "tenants: [acme]\nworkloads:\n  - name: w\n    tenant: acme\n    cgroups: [x/w]\n    ips: [127.10.1.2]\n";

#[test]
fn inventory_rejections_have_exact_locations() {
    let d = load_with("inventory.yaml", "tenants: [acme\nworkloads: []\n");
    assert_diag(&d, "inventory.yaml:2:", "YAML syntax error");

    let inv = "\
tenants: [acme, acme]
defaults:
  implicit_deny_atlas: [AML.T9999]
workloads:
  - name: a
    tenant: nope
    spiffe_id: spiffe://Bad.Domain/x
    ips: [127.10.1.2/32]
    ports: [{port: 0, action: infer}, {port: 70000}, {port: 80, protocol: sctp}]
  - name: b
    tenant: acme
    ips: [127.10.1.0/24, not-an-ip]
    cgroups: [/abs]
    colour: red
  - name: a
    tenant: acme
    ips: [127.10.1.2]
    spiffe_id: spiffe://example.org/too/long/SUFFIX
    ports: [{port: 8000, action: teleport}]
";
    let long = format!("spiffe://example.org/{}", "x".repeat(2100));
    let inv = inv.replace("spiffe://example.org/too/long/SUFFIX", &long);
    let d = load_with("inventory.yaml", &inv);
    assert_diag(&d, "inventory.yaml:1:17:", "duplicate tenant `acme`");
    assert_diag(
        &d,
        "inventory.yaml:3:25:",
        "unknown ATLAS technique `AML.T9999`",
    );
    assert_diag(&d, "inventory.yaml:6:13:", "unknown tenant `nope`");
    assert_diag(&d, "inventory.yaml:7:16:", "invalid SPIFFE ID");
    assert_diag(&d, "inventory.yaml:9:20:", "invalid port `0`");
    assert_diag(&d, "inventory.yaml:9:46:", "invalid port `70000`");
    assert_diag(&d, "inventory.yaml:9:75:", "invalid protocol");
    assert_diag(&d, "inventory.yaml:12:11:", "overlaps 127.10.1.2/32");
    assert_diag(
        &d,
        "inventory.yaml:12:26:",
        "invalid IP or CIDR `not-an-ip`",
    );
    assert_diag(&d, "inventory.yaml:13:15:", "invalid cgroup path");
    assert_diag(&d, "inventory.yaml:14:5:", "unknown field `colour`");
    assert_diag(&d, "inventory.yaml:15:11:", "duplicate name `a`");
    assert_diag(&d, "inventory.yaml:17:11:", "already claimed by `a`");
    assert_diag(&d, "inventory.yaml:18:16:", "2048");
    // Every problem, not just the first.
    assert!(d.len() >= 14, "{}", d.join("\n"));

    // Semantic problems needing the schema.
    for (action, message) in [
        // An action it does not declare.
        (
            "teleport",
            "action `teleport` is not declared in the schema",
        ),
        // An action it declares, but not for this resource type.
        ("query", "cannot be reached with action `query`"),
    ] {
        let inv = format!("{GOOD_INV}    ports: [{{port: 8000, action: {action}}}]\n");
        let d = load_with("inventory.yaml", &inv);
        assert_diag(&d, "inventory.yaml:7:34:", message);
    }

    assert!(load_with("inventory.yaml", GOOD_INV).is_empty());
}

#[test]
fn cedar_errors_have_exact_locations() {
    // (file replaced, its content, expected location, expected message part)
    for (file, content, at, message) in [
        // Syntax error, in the second file: located in that file.
        (
            "purpose.cedar",
            "// comment\npermit (principal, action, resource)\nwhen { principal.tenant == };\n",
            "purpose.cedar:3:",
            "",
        ),
        // Schema (strict validation) error: an attribute the schema does not have.
        (
            "purpose.cedar",
            "\n\n@id(\"x\")\nforbid (principal, action, resource)\nwhen { principal.colour == \"red\" };\n",
            "purpose.cedar:5:8:",
            "colour",
        ),
        // Unknown ATLAS ID in an annotation, at the annotation.
        (
            "purpose.cedar",
            "\n@id(\"x\")\n  @atlas(\"AML.T0085.000, AML.T0000.999\")\nforbid (principal, action, resource);\n",
            "purpose.cedar:3:3:",
            "unknown ATLAS technique `AML.T0000.999`",
        ),
        // Duplicate @id across files.
        (
            "purpose.cedar",
            "@id(\"same-tenant\")\nforbid (principal, action, resource);\n",
            "purpose.cedar:1:1:",
            "duplicate policy id `same-tenant`",
        ),
        // A forbid that can fail at evaluation time would turn into an allow.
        (
            "purpose.cedar",
            "\n@id(\"x\")\nforbid (principal, action, resource) when { context.port + 1 > 10 };\n",
            "purpose.cedar:2:1:",
            "can fail at evaluation time",
        ),
        // Schema syntax error.
        (
            "schema.cedarschema",
            "entity Workload = {\n  tenant: String,\n  risk: ;\n};\n",
            "schema.cedarschema:3:",
            "",
        ),
    ] {
        assert_diag(&load_with(file, content), at, message);
    }
    // A schema without the entity model: inventory entities do not fit it.
    let d = load_with("schema.cedarschema", "entity Workload;\nentity Endpoint;\nentity World;\naction connect appliesTo { principal: Workload, resource: [Workload, Endpoint, World] };\n");
    assert!(!d.is_empty());
}

/// A policy that reads attributes of an entity the inventory does not have fails at load,
/// at the entity literal, with the other problems (not at compile with "entity does not
/// exist").
#[test]
fn reading_a_missing_entity_is_a_load_error_at_its_literal() {
    let d = load_with(
        "purpose.cedar",
        "\n@id(\"gone\")\nforbid (principal, action, resource)\nwhen { principal.tenant == Endpoint::\"gone\".tenant };\n\
         @id(\"kind\")\nforbid (principal, action, resource) when {\n  principal.ring == \"x\" &&\n    Workload::\"acme-vectors\".tenant == \"y\" };\n\
         @id(\"has\")\nforbid (principal, action, resource) when { Endpoint::\"gone\" has tenant };\n\
         @id(\"bad\")\nforbid (principal, action, resource) when { principal.colour == \"red\" };\n",
    );
    let want = [
        "purpose.cedar:4:28: policy `gone` reads attributes of Endpoint::\"gone\", which does not exist [hint: no workload or endpoint named `gone` in inventory.yaml]",
        "purpose.cedar:8:5: policy `kind` reads attributes of Workload::\"acme-vectors\", which does not exist [hint: `acme-vectors` in inventory.yaml is of type Endpoint, not Workload]",
    ];
    for w in want {
        assert!(
            d.iter().any(|x| x == w),
            "expected `{w}` in:\n{}",
            d.join("\n")
        );
    }
    // `has` on a missing entity is false, not an error.
    assert!(
        !d.iter().any(|x| x.starts_with("purpose.cedar:10:")),
        "{}",
        d.join("\n")
    );
    // Reported with the others (here a strict validation error).
    assert_diag(&d, "purpose.cedar:12:", "colour");
    // Existing entities read by name load and compile.
    let tmp = demo_with(
        "named.cedar",
        "forbid (principal, action, resource) when { Endpoint::\"acme-vectors\".tenant == \"nobody\" && World::\"world\" has tenant };\n",
    );
    let b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    assert_compiled_equals_oracle(&b);
}

/// The central invariant on one bundle: every cell of the compiled table (and every
/// attribution) equals what the oracle says.
pub(crate) fn assert_compiled_equals_oracle(b: &Bundle) {
    assert_table_equals_oracle(b, &b.compile().unwrap());
}

/// The ports probed on destinations without declared ports: every breakpoint of the
/// bundle's `context.port` literals and its neighbours, and a spread over 1..=65535.
fn any_port_probes(b: &Bundle) -> Vec<u16> {
    let points = crate::ports::breakpoints(b.engine().port_reads.iter().flat_map(|(l, _)| l));
    let mut probes: Vec<u16> = points
        .iter()
        .flat_map(|&p| [p.saturating_sub(1), p, p.saturating_add(1)])
        .chain([
            1, 2, 22, 25, 53, 80, 443, 1023, 1024, 1025, 6333, 8080, 20000, 40000, 65534,
        ])
        .chain((1..=16).map(|k| (k * 4093) as u16))
        .filter(|&p| p >= 1)
        .collect();
    probes.sort_unstable();
    probes.dedup();
    probes
}

/// The kernel's lookup in a compiled table: the exact port's entry decides by its verdict,
/// else an any-port entry allows, else deny. Returns the entry that decided, if any.
fn kernel_lookup(
    table: &std::collections::HashMap<crate::PolicyKey, crate::PolicyValue>,
    key: crate::PolicyKey,
) -> Option<(crate::PolicyKey, crate::PolicyValue)> {
    let any = crate::PolicyKey { dport: 0, ..key };
    table
        .get(&key)
        .map(|v| (key, *v))
        .or_else(|| table.get(&any).map(|v| (any, *v)))
}

/// Every cell of `c` (and every attribution) equals what the oracle says of `b`; on
/// destinations without declared ports, at every port breakpoint and a spread of ports,
/// with the table read as the kernel reads it. Returns the number of cells compared.
pub(crate) fn assert_table_equals_oracle(b: &Bundle, c: &crate::Compiled) -> usize {
    let table: std::collections::HashMap<_, _> = c.allows().iter().copied().collect();
    let reads_port = b.engine().port_reads.iter().any(|(_, at)| at.is_some());
    let any_port = any_port_probes(b);
    let mut compared = 0;
    for s in b.identities().iter().filter(|i| i.is_subject()) {
        for d in b.identities().iter().filter(|i| i.is_destination()) {
            let mut probes: Vec<(u16, Protocol)> =
                d.ports.iter().map(|p| (p.port, p.protocol)).collect();
            probes.extend([
                (1, Protocol::Tcp),
                (53, Protocol::Udp),
                (6333, Protocol::Tcp),
                (8000, Protocol::Udp),
            ]);
            if d.ports.is_empty() {
                for protocol in Protocol::ALL {
                    probes.extend(any_port.iter().map(|&p| (p, protocol)));
                }
            }
            for (port, protocol) in probes {
                compared += 1;
                let oracle = b.decide(&s.name, &d.name, port, protocol).unwrap();
                let key = crate::PolicyKey {
                    subject: s.id,
                    destination: d.id,
                    dport: port,
                    protocol: protocol.number(),
                    _pad: 0,
                };
                let hit = kernel_lookup(&table, key);
                let in_table = hit.is_some_and(|(_, v)| v.is_allow());
                let what = format!("{} -> {} {port}/{protocol}", s.name, d.name);
                assert_eq!(
                    in_table, oracle.allowed,
                    "{what}: table {hit:?}, oracle {oracle:?}"
                );
                assert_eq!(
                    c.is_allowed(s.id, d.id, port, protocol.number()),
                    oracle.allowed,
                    "{what}"
                );
                if !oracle.allowed {
                    let a = c.attribute(s.id, d.id, port, protocol.number());
                    let ids: Vec<&str> = a.policies.iter().map(|p| p.id.as_str()).collect();
                    let want: Vec<&str> = oracle.policies.iter().map(|p| p.id.as_str()).collect();
                    assert_eq!(ids, want, "{what}");
                    let no_backends = d
                        .service_port(port, protocol)
                        .is_some_and(|p| p.backends.is_empty());
                    if oracle.undeclared_port {
                        assert_eq!(a.policy_id, "undeclared-port");
                    } else if no_backends {
                        assert_eq!(a.policy_id, "no-ready-backends", "{what}");
                    } else if want.is_empty() {
                        assert_eq!(a.policy_id, "implicit-deny");
                    }
                    // A deny exception names the first determining forbid.
                    if let Some((_, v)) = hit {
                        assert!(d.ports.is_empty(), "{what}: deny entry {v:?}");
                        match want.first() {
                            Some(id) => assert_eq!(c.rules()[v.rule as usize].id, *id, "{what}"),
                            None => assert_eq!(v.rule, u32::MAX, "{what}"),
                        }
                    }
                } else {
                    let (k, v) = hit.unwrap();
                    let rule = &c.rules()[v.rule as usize];
                    if k.dport == port || !reads_port {
                        assert!(oracle.policies.iter().any(|p| p.id == rule.id), "{what}");
                    } else {
                        // An any-port allow stands for ports allowed by different permits.
                        assert_eq!(rule.effect, Effect::Permit, "{what}");
                    }
                }
            }
        }
    }
    compared
}

#[test]
fn demo_compiled_equals_oracle() {
    assert_compiled_equals_oracle(&demo());
}

#[test]
fn synthetic_bundle_compiled_equals_oracle() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_bundle(tmp.path(), 60, 12, 2, 50).unwrap();
    let b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    assert_compiled_equals_oracle(&b);
    let stats = b.compile().unwrap().stats();
    assert!(
        stats.cell_groups <= stats.cells + stats.ingress_cells,
        "{stats:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// For generated inventories and policy sets, the compiled table equals Cedar.
    #[test]
    fn compiled_equals_oracle(seed in any::<u64>()) {
        let tmp = tempfile::tempdir().unwrap();
        random_bundle(tmp.path(), seed).unwrap();
        let b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("seed {seed}: {d}\n{}", std::fs::read_to_string(tmp.path().join("policies.cedar")).unwrap()));
        assert_compiled_equals_oracle(&b);
    }
}

// ---------------------------------------------------------------------------------------------
// Risk overrides and the incremental recompile.

fn row_of(c: &crate::Compiled, subject: u32) -> Vec<(crate::PolicyKey, crate::PolicyValue)> {
    c.allows()
        .iter()
        .filter(|(k, _)| k.subject == subject)
        .copied()
        .collect()
}

fn others_of(c: &crate::Compiled, id: u32) -> Vec<(crate::PolicyKey, crate::PolicyValue)> {
    c.allows()
        .iter()
        .filter(|(k, _)| k.subject != id && k.destination != id)
        .copied()
        .collect()
}

/// `before` with `delta` written into it, as the agent writes it into the kernel table.
fn apply(
    before: &crate::Compiled,
    delta: &crate::RowDelta,
) -> std::collections::BTreeMap<crate::PolicyKey, crate::PolicyValue> {
    let mut table: std::collections::BTreeMap<_, _> = before.allows().iter().copied().collect();
    for (k, v) in &delta.added {
        table.insert(*k, *v);
    }
    for k in &delta.removed {
        table.remove(k);
    }
    table
}

#[test]
fn high_risk_quarantines_on_vector_db_after_set_risk() {
    let mut b = demo();
    let mut c = b.compile().unwrap();
    let before = c.clone();
    let ids = b.identities().clone();
    let id = |n: &str| ids.by_name(n).unwrap().id;
    let (retriever, vectors) = (id("acme-retriever"), id("acme-vectors"));
    assert!(c.is_allowed(retriever, vectors, 6333, proto::TCP));
    assert_eq!(c.revision(), b.revision());

    b.set_risk("acme-retriever", "0.9").unwrap();
    assert_eq!(
        b.risk_overrides().get("acme-retriever").map(String::as_str),
        Some("0.9")
    );
    // The oracle sees the override at once.
    let d = b
        .decide("acme-retriever", "acme-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(d.policies[0].id, "high-risk-no-vector-db");
    assert!(d.policies[0].quarantine);

    let delta = c.recompile_subject(&b, "acme-retriever").unwrap();
    let key = crate::PolicyKey {
        subject: retriever,
        destination: vectors,
        dport: 6333,
        protocol: proto::TCP,
        _pad: 0,
    };
    assert_eq!(delta.removed, vec![key]);
    assert!(delta.added.is_empty());
    assert!(delta.cells > 0);
    assert!(!c.is_allowed(retriever, vectors, 6333, proto::TCP));
    assert!(c
        .quarantine_on_deny(retriever, vectors, 6333, proto::TCP)
        .is_some());
    let a = c.attribute(retriever, vectors, 6333, proto::TCP);
    assert_eq!(a.policy_id, "high-risk-no-vector-db");
    assert_eq!(a.atlas[0].id, "AML.T0085.000");
    assert_eq!(c.identity(retriever).unwrap().risk, "0.9");
    // Other vector DBs are still denied by tenant isolation, not by the risk rule alone.
    let g = id("globex-vectors");
    let a = c.attribute(retriever, g, 6333, proto::TCP);
    assert_eq!(
        a.policies.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        vec!["tenant-isolation", "high-risk-no-vector-db"]
    );

    // The changed row equals the oracle, cell by cell; the other rows are untouched; the
    // delta turns the old table into the new one; a full compile agrees.
    assert_table_equals_oracle(&b, &c);
    assert_eq!(others_of(&c, retriever), others_of(&before, retriever));
    assert_eq!(apply(&before, &delta), c.allows().iter().copied().collect());
    assert_eq!(b.compile().unwrap().allows(), c.allows());

    // The snapshot shows the override; the bundle revision does not change.
    assert_eq!(c.bundle_revision(), b.revision());
    assert!(
        c.revision()
            .starts_with(&format!("{}+risk(1):", b.revision())),
        "{}",
        c.revision()
    );
    assert_eq!(c.revision(), b.snapshot());
    assert_eq!(c.risk_overrides(), b.risk_overrides());
    let e = b
        .explain("acme-retriever", "acme-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert_eq!(e.revision, b.snapshot());
    assert!(e.to_string().contains("[quarantine]"), "{e}");

    // Back to the inventory's score: no override, the allow comes back.
    b.set_risk("acme-retriever", "0.20").unwrap();
    assert!(b.risk_overrides().is_empty());
    let delta = c.recompile_subject(&b, "acme-retriever").unwrap();
    assert_eq!(delta.added.len(), 1);
    assert_eq!(delta.added[0].0, key);
    assert!(delta.removed.is_empty());
    assert!(c.is_allowed(retriever, vectors, 6333, proto::TCP));
    assert_eq!(c.revision(), b.revision());
    assert_eq!(c.allows(), before.allows());
    // Again: nothing changes, nothing to write.
    assert!(c
        .recompile_subject(&b, "acme-retriever")
        .unwrap()
        .is_empty());
}

#[test]
fn set_risk_rejects_garbage_and_changes_nothing() {
    let mut b = demo();
    let before = b
        .decide("acme-retriever", "acme-vectors", 6333, Protocol::Tcp)
        .unwrap();
    for (score, why) in [
        ("abc", "not a decimal"),
        ("", "empty"),
        ("0.12345", "at most 4"),
        ("1e3", "not a decimal"),
        ("0.9 ", "not a decimal"),
        ("+0.9", "not a decimal"),
        ("99999999999999999", "out of the range"),
    ] {
        let e = b.set_risk("acme-retriever", score).unwrap_err();
        assert!(
            matches!(e, crate::PolicyError::InvalidRisk { .. }),
            "{score:?}: {e}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("invalid risk score for `acme-retriever`") && text.contains(why),
            "{score:?}: {text}"
        );
    }
    assert!(matches!(
        b.set_risk("acme-vectors", "0.9"),
        Err(crate::PolicyError::NoRisk(_))
    ));
    assert!(matches!(
        b.set_risk("nobody", "0.9"),
        Err(crate::PolicyError::UnknownName(_))
    ));
    assert!(b.risk_overrides().is_empty());
    assert_eq!(b.snapshot(), b.revision());
    assert_eq!(
        b.decide("acme-retriever", "acme-vectors", 6333, Protocol::Tcp)
            .unwrap(),
        before
    );
    // Accepted forms, kept canonical.
    b.set_risk("acme-retriever", "1").unwrap();
    assert_eq!(b.risk_overrides()["acme-retriever"], "1.0");
    b.set_risk("acme-retriever", "0.8500").unwrap();
    assert_eq!(b.risk_overrides()["acme-retriever"], "0.85");
    assert_eq!(
        b.identities().by_name("acme-retriever").unwrap().risk,
        "0.85"
    );
}

#[test]
fn recompile_needs_the_same_bundle() {
    let b = demo();
    let mut c = b.compile().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    synthetic_bundle(tmp.path(), 20, 4, 1, 5).unwrap();
    let other = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    assert!(matches!(
        c.recompile_subject(&other, "w1"),
        Err(crate::PolicyError::StaleCompiled { .. })
    ));
    assert!(matches!(
        c.recompile_subject(&b, "acme-vectors"),
        Err(crate::PolicyError::NotASubject(_))
    ));
    assert!(matches!(
        c.recompile_subject(&b, "nobody"),
        Err(crate::PolicyError::UnknownName(_))
    ));
}

/// Two subjects with the same signature; one changes risk. The one that did not change
/// keeps its decisions (its group's representative may have been the one that moved).
#[test]
fn a_subject_that_changes_leaves_its_old_group_intact() {
    let tmp = demo_with(
        "inventory.yaml",
        "tenants: [acme]\nworkloads:\n\
         - {name: a, tenant: acme, purpose: retrieval, ring: prod, risk: 0.5, cgroups: [x/a], ips: [127.10.1.2]}\n\
         - {name: b, tenant: acme, purpose: retrieval, ring: prod, risk: 0.5, cgroups: [x/b], ips: [127.10.1.3]}\n\
         endpoints:\n\
         - {name: v, tenant: acme, kind: vector_db, ips: [127.10.1.10], ports: [{port: 6333, action: query}]}\n",
    );
    let mut b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    let mut c = b.compile().unwrap();
    let id = |c: &crate::Compiled, n: &str| c.identity_by_name(n).unwrap().id;
    let (a, bb, v) = (id(&c, "a"), id(&c, "b"), id(&c, "v"));
    let b_row = row_of(&c, bb);
    for (who, other) in [("a", "b"), ("b", "a")] {
        b.set_risk(who, "0.95").unwrap();
        c.recompile_subject(&b, who).unwrap();
        assert_table_equals_oracle(&b, &c);
        assert!(!c.is_allowed(id(&c, who), v, 6333, proto::TCP));
        assert!(c.is_allowed(id(&c, other), v, 6333, proto::TCP));
        b.set_risk(who, "0.5").unwrap();
        c.recompile_subject(&b, who).unwrap();
        assert_table_equals_oracle(&b, &c);
    }
    assert_eq!(row_of(&c, bb), b_row);
    assert!(c.is_allowed(a, v, 6333, proto::TCP));
    // Two overrides, one recompile: the drifted one is brought up to date too.
    b.set_risk("a", "0.9").unwrap();
    b.set_risk("b", "0.9").unwrap();
    let delta = c.recompile_subject(&b, "a").unwrap();
    assert_eq!(delta.removed.len(), 2, "{delta:?}");
    assert_table_equals_oracle(&b, &c);
    assert!(c.revision().contains("+risk(2):"), "{}", c.revision());
}

/// A policy reads a workload's risk by name: a risk change of that workload can change any
/// cell, not only its row and column. The recompile is then a full one, and its delta is
/// the exact difference.
#[test]
fn recompile_of_a_workload_read_by_name_updates_every_cell() {
    let tmp = demo_with(
        "named.cedar",
        "@id(\"retriever-compromised\")\nforbid (principal, action, resource) when { Workload::\"acme-retriever\".risk.greaterThan(decimal(\"0.5\")) };\n",
    );
    let mut b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("{d}"));
    let mut c = b.compile().unwrap();
    assert!(!c.allows().is_empty());
    let rid = c.identity_by_name("acme-retriever").unwrap().id;
    assert!(!others_of(&c, rid).is_empty());
    for score in ["0.9", "0.2", "0.6", "0.6"] {
        let before = c.clone();
        b.set_risk("acme-retriever", score).unwrap();
        let delta = c.recompile_subject(&b, "acme-retriever").unwrap();
        assert_table_equals_oracle(&b, &c);
        let full = b.compile().unwrap();
        assert_eq!(c.allows(), full.allows());
        assert_eq!(apply(&before, &delta), c.allows().iter().copied().collect());
        assert_eq!(c.revision(), b.snapshot());
        if score == "0.9" {
            // Everything is forbidden now, other subjects' cells included.
            assert!(c.allows().is_empty());
            assert_eq!(delta.removed.len(), before.allows().len());
            assert!(delta
                .removed
                .iter()
                .any(|k| k.subject != rid && k.destination != rid));
            let a = c.attribute(rid, rid, 8000, proto::TCP);
            assert!(
                a.policies.iter().any(|p| p.id == "retriever-compromised"),
                "{a:?}"
            );
        }
        if score == "0.2" {
            assert!(delta.removed.is_empty());
            assert_eq!(delta.added.len(), c.allows().len());
        }
        // A recompile that changes nothing by name is the ordinary one, and empty.
        let again = c.recompile_subject(&b, "acme-retriever").unwrap();
        assert!(again.is_empty(), "{again:?}");
    }
    // Another workload's risk (not read by name): the row-and-column recompile still agrees.
    b.set_risk("acme-evaluator", "0.95").unwrap();
    let before = c.clone();
    let delta = c.recompile_subject(&b, "acme-evaluator").unwrap();
    assert_table_equals_oracle(&b, &c);
    assert_eq!(apply(&before, &delta), c.allows().iter().copied().collect());
    assert_eq!(c.allows(), b.compile().unwrap().allows());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// After risk changes, the incrementally updated table equals the oracle and a full
    /// compile, and only the changed identities' rows and columns moved.
    #[test]
    fn recompile_subject_equals_oracle(seed in any::<u64>(), picks in proptest::collection::vec((any::<usize>(), 0usize..5), 1..4)) {
        let tmp = tempfile::tempdir().unwrap();
        random_bundle(tmp.path(), seed).unwrap();
        let mut b = Bundle::load(tmp.path()).unwrap_or_else(|d| panic!("seed {seed}: {d}"));
        let mut c = b.compile().unwrap();
        let workloads: Vec<String> = b
            .identities()
            .iter()
            .filter(|i| i.kind == crate::IdentityKind::Workload)
            .map(|i| i.name.clone())
            .collect();
        for (k, (pick, score)) in picks.iter().enumerate() {
            let before = c.clone();
            let name = &workloads[pick % workloads.len()];
            b.set_risk(name, ["0.0", "0.5", "0.85", "0.9", "1.0"][*score]).unwrap();
            // Every other round, a second override before one recompile.
            if k % 2 == 1 {
                let second = &workloads[(pick / 7) % workloads.len()];
                b.set_risk(second, "0.95").unwrap();
            }
            let delta = c.recompile_subject(&b, name).unwrap();
            assert_table_equals_oracle(&b, &c);
            let full = b.compile().unwrap();
            prop_assert_eq!(full.allows(), c.allows());
            prop_assert_eq!(apply(&before, &delta), c.allows().iter().copied().collect());
            prop_assert_eq!(c.revision(), b.snapshot());
            if k % 2 == 0 {
                let wid = c.identity_by_name(name).unwrap().id;
                prop_assert_eq!(others_of(&c, wid), others_of(&before, wid));
            }
        }
    }
}

#[test]
fn bench_report_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let r = crate::testutil::bench_report_sized(tmp.path(), 60, 12, 2, 20);
    assert_eq!(
        (r.identities, r.local, r.ports, r.policies),
        (60, 12, 2, 20)
    );
    assert_eq!(r.allows, r.compiled.allows().len());
    assert!(r.cells > 0 && r.cedar_decisions > 0 && r.cedar_decisions_per_sec > 0.0);
    assert_eq!(r.risk_change.added, r.risk_delta.added.len());
    assert_eq!(r.risk_change.removed, r.risk_delta.removed.len());
    assert!(r.risk_change.snapshot.contains("+risk(1):"));
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["risk_change"]["total_ms"].is_number());
    assert!(json.get("compiled").is_none());
    assert!(r.to_string().contains("risk change"));
}

// ---------------------------------------------------------------------------------------------
// Incremental compiles of an edited bundle (`Bundle::compile_incremental`).

/// `inc` (an incremental compile of `b`) is `full` (a full compile of it), cell by cell:
/// the allows with their rule numbers, the rules, revisions, identities, the stats (but
/// `cedar_decisions` and `elapsed`), and `is_allowed` and the attribution of every subject
/// of `b` (and of `extra` ids, e.g. removed subjects) to every identity, on every declared
/// port and `probes`.
pub(crate) fn assert_same_compiled(
    b: &Bundle,
    full: &crate::Compiled,
    inc: &crate::Compiled,
    extra: &[u32],
    probes: &[(u16, Protocol)],
) -> usize {
    assert!(full.allows() == inc.allows(), "allows differ");
    assert_eq!(full.rules(), inc.rules());
    assert_eq!(full.revision(), inc.revision());
    assert_eq!(full.bundle_revision(), inc.bundle_revision());
    assert_eq!(full.policy_fingerprint(), inc.policy_fingerprint());
    assert_eq!(full.risk_overrides(), inc.risk_overrides());
    assert!(full.identities().eq(inc.identities()));
    let comparable = |c: &crate::Compiled| crate::CompileStats {
        cedar_decisions: 0,
        elapsed: Default::default(),
        ..c.stats()
    };
    assert_eq!(comparable(full), comparable(inc));
    let subjects = b
        .identities()
        .iter()
        .filter(|i| i.is_subject())
        .map(|i| i.id)
        .chain(extra.iter().copied());
    let mut cells = 0;
    let any_port = any_port_probes(b);
    for s in subjects {
        for d in b.identities().iter() {
            let declared = d.ports.iter().map(|p| (p.port, p.protocol));
            let by_port: Vec<(u16, Protocol)> = if d.ports.is_empty() {
                Protocol::ALL
                    .iter()
                    .flat_map(|&p| any_port.iter().map(move |&port| (port, p)))
                    .collect()
            } else {
                vec![]
            };
            for (port, protocol) in declared.chain(probes.iter().copied()).chain(by_port) {
                let p = protocol.number();
                cells += 1;
                assert_eq!(
                    full.is_allowed(s, d.id, port, p),
                    inc.is_allowed(s, d.id, port, p),
                    "{s} -> {} {port}/{protocol}",
                    d.name
                );
                assert_eq!(
                    full.attribute(s, d.id, port, p),
                    inc.attribute(s, d.id, port, p),
                    "{s} -> {} {port}/{protocol}",
                    d.name
                );
            }
        }
    }
    // The number of cells compared: callers check it is not zero (a vacuous comparison).
    cells
}

/// Edit `dir`'s inventory.yaml: replace `from` (which must occur once) by `to`.
fn edit_inventory(dir: &Path, from: &str, to: &str) {
    let path = dir.join(crate::INVENTORY_FILE);
    let inv = std::fs::read_to_string(&path).unwrap();
    assert_eq!(inv.matches(from).count(), 1, "`{from}` in the inventory");
    std::fs::write(&path, inv.replace(from, to)).unwrap();
}

fn load(dir: &Path) -> Bundle {
    Bundle::load(dir).unwrap_or_else(|d| {
        panic!(
            "{d}\n{}",
            std::fs::read_to_string(dir.join(crate::INVENTORY_FILE)).unwrap_or_default()
        )
    })
}

/// The issue-3 scenario (1,000 identities, 100 local, 2 ports, 50 policies): adding,
/// removing and changing one identity compiles incrementally to exactly the full compile,
/// asking Cedar only about what it had not seen; a policy edit falls back to a full compile.
#[test]
fn incremental_compile_of_the_synthetic_bundle_equals_full() {
    const N: usize = 1000;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fresh = || synthetic_bundle(dir, N, 100, 2, 50).unwrap();
    fresh();
    let base_bundle = load(dir);
    let base = base_bundle.compile().unwrap();
    assert_eq!(base.policy_fingerprint().len(), 32);
    let probes = [(1, Protocol::Tcp)];
    let check = |extra: &[u32]| {
        let b = load(dir);
        let inc = b.compile_incremental(&base).unwrap();
        let full = b.compile().unwrap();
        assert!(assert_same_compiled(&b, &full, &inc, extra, &probes) > 0);
        (b, full, inc)
    };

    // (a) One new local workload, like the others: no Cedar at all.
    let name = crate::testutil::synthetic_add_workload(dir, N, 2, None).unwrap();
    let (b, full, inc) = check(&[]);
    let w = b.identities().by_name(&name).unwrap();
    assert!(w.is_subject() && w.is_destination());
    assert_eq!(
        inc.stats().cells,
        base.stats().cells + 1002 * 2 + 101 * 2 - 2
    );
    assert!(inc.allows().iter().any(|(k, _)| k.subject == w.id));
    assert!(inc.allows().iter().any(|(k, _)| k.destination == w.id));
    assert_eq!(inc.stats().cedar_decisions, 0, "{:?}", inc.stats());
    assert!(full.stats().cedar_decisions > 1000);
    // ... and one nobody looks like: Cedar for its new signatures only.
    fresh();
    crate::testutil::synthetic_add_workload(dir, N, 2, Some("fine-tuning")).unwrap();
    let (_, full, inc) = check(&[]);
    let (i, f) = (inc.stats().cedar_decisions, full.stats().cedar_decisions);
    assert!(i > 0 && i < f / 4, "incremental {i}, full {f}");

    // (b) A local workload removed: its row and column go, its id is an unknown subject.
    fresh();
    let gone = base_bundle.identities().by_name("w7").unwrap().clone();
    assert!(gone.is_subject());
    let inv = std::fs::read_to_string(dir.join(crate::INVENTORY_FILE)).unwrap();
    let line = inv
        .lines()
        .find(|l| l.starts_with("  - {name: w7,"))
        .unwrap();
    edit_inventory(dir, &format!("{line}\n"), "");
    let (b, _, inc) = check(&[gone.id]);
    assert!(b.identities().by_name("w7").is_none());
    assert!(!inc
        .allows()
        .iter()
        .any(|(k, _)| k.subject == gone.id || k.destination == gone.id));
    assert_eq!(
        inc.attribute(
            gone.id,
            base.identities().nth(1).unwrap().id,
            8000,
            proto::TCP
        )
        .policy_id,
        "unknown-subject"
    );
    assert_eq!(inc.stats().cedar_decisions, 0);

    // (c) Attributes changed: a local workload moves tenant, an endpoint changes kind.
    fresh();
    edit_inventory(dir, "{name: w3, tenant: t3,", "{name: w3, tenant: t4,");
    edit_inventory(
        dir,
        "{name: e601, tenant: t1, kind: feature_store,",
        "{name: e601, tenant: t1, kind: llm_api,",
    );
    let (b, full, inc) = check(&[]);
    assert_eq!(
        b.identities().by_name("w3").unwrap().tenant.as_deref(),
        Some("t4")
    );
    assert!(base.allows() != inc.allows());
    assert!(inc.stats().cedar_decisions < full.stats().cedar_decisions / 4);

    // (d) A policy edit: nothing is reused (as many Cedar decisions as a full compile).
    fresh();
    crate::testutil::synthetic_add_workload(dir, N, 2, None).unwrap();
    let policies = dir.join("policies.cedar");
    let mut text = std::fs::read_to_string(&policies).unwrap();
    text += "@id(\"extra\")\nforbid (principal, action == Action::\"infer\", resource) when { principal.ring == \"dev\" };\n";
    std::fs::write(&policies, text).unwrap();
    let (b, full, inc) = check(&[]);
    assert_ne!(b.policy_hash(), base_bundle.policy_hash());
    assert_ne!(inc.policy_fingerprint(), base.policy_fingerprint());
    assert_eq!(inc.stats().cedar_decisions, full.stats().cedar_decisions);
    assert_eq!(inc.rules().len(), base.rules().len() + 1);
}

/// A policy that reads an entity named by literal (`Endpoint::"e40".tenant`) depends on that
/// entity for every cell: editing it must not reuse answers, editing another identity may.
#[test]
fn incremental_compile_falls_back_when_a_dereferenced_entity_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synthetic_bundle(dir, 60, 12, 2, 20).unwrap();
    let policies = dir.join("policies.cedar");
    let mut text = std::fs::read_to_string(&policies).unwrap();
    text += "@id(\"named\")\nforbid (principal, action, resource) when { principal.tenant == Endpoint::\"e40\".tenant && principal.ring == \"prod\" };\n";
    std::fs::write(&policies, text).unwrap();
    let b = load(dir);
    let base = b.compile().unwrap();
    assert_compiled_equals_oracle(&b);

    // Another identity changed: answers are reused.
    edit_inventory(dir, "{name: w5, tenant: t5,", "{name: w5, tenant: t6,");
    let b = load(dir);
    let (inc, full) = (b.compile_incremental(&base).unwrap(), b.compile().unwrap());
    assert_eq!(inc.policy_fingerprint(), base.policy_fingerprint());
    assert!(inc.stats().cedar_decisions < full.stats().cedar_decisions);
    assert!(assert_same_compiled(&b, &full, &inc, &[], &[(1, Protocol::Tcp)]) > 0);
    let before = inc;

    // The named endpoint changed tenant: a full compile, and the table does change.
    edit_inventory(dir, "{name: e40, tenant: t0,", "{name: e40, tenant: t1,");
    let b = load(dir);
    let (inc, full) = (
        b.compile_incremental(&before).unwrap(),
        b.compile().unwrap(),
    );
    assert!(full.allows() != before.allows());
    // Reusing answers here would be wrong: this fails first without the fallback.
    assert!(assert_same_compiled(&b, &full, &inc, &[], &[(1, Protocol::Tcp)]) > 0);
    assert_table_equals_oracle(&b, &inc);
    assert_ne!(inc.policy_fingerprint(), before.policy_fingerprint());
    assert_eq!(inc.stats().cedar_decisions, full.stats().cedar_decisions);
}

/// One random edit of a `random_bundle` inventory: add a workload or an endpoint (a copy of
/// one, renamed, with its own address and cgroup), remove one, or change an attribute.
fn random_inventory_edit(inv: &str, r: &mut crate::testutil::Rng, k: usize) -> String {
    fn blocks(s: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for line in s.lines() {
            if line.starts_with("  - ") || out.is_empty() {
                out.push(String::new());
            }
            let last = out.last_mut().unwrap();
            last.push_str(line);
            last.push('\n');
        }
        out
    }
    let (head, rest) = inv.split_once("workloads:\n").unwrap();
    let (ws, es) = rest.split_once("endpoints:\n").unwrap();
    let (mut ws, mut es) = (blocks(ws), blocks(es));
    let set = |block: &str, key: &str, value: &str| -> String {
        let mut found = false;
        let mut out: String = block
            .lines()
            .map(|l| {
                let field = l.trim_start_matches("  - ").trim_start();
                if field.starts_with(&format!("{key}:")) {
                    found = true;
                    let indent = &l[..l.len() - field.len()];
                    format!("{indent}{key}: {value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        if !found {
            out += &format!("    {key}: {value}\n");
        }
        out
    };
    let change = |block: &str, r: &mut crate::testutil::Rng| -> String {
        let workload = block.contains("name: w") || block.contains("name: x");
        let name = block
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("  - name: ")
            .to_string();
        let pick = |r: &mut crate::testutil::Rng, xs: &[&str]| r.pick(xs).to_string();
        match (workload, r.below(5)) {
            (_, 0) => set(block, "tenant", &pick(r, &["acme", "globex", "initech"])),
            (true, 1) => set(
                block,
                "purpose",
                &pick(r, &["inference", "evaluation", "retrieval"]),
            ),
            (true, 2) => set(block, "ring", &pick(r, &["prod", "dev"])),
            (true, 3) => set(block, "risk", &pick(r, &["0.0", "0.5", "0.9", "0.95"])),
            (true, _) if block.contains("cgroups:") => block
                .lines()
                .filter(|l| !l.contains("cgroups:"))
                .map(|l| format!("{l}\n"))
                .collect(),
            (true, _) => set(block, "cgroups", &format!("[rand/{name}]")),
            (false, 1 | 2) => set(
                block,
                "kind",
                &pick(r, &["vector_db", "feature_store", "llm_api"]),
            ),
            (false, _) => set(
                block,
                "datasets",
                &pick(r, &["[ds0]", "[ds1]", "[ds0, ds1]"]),
            ),
        }
    };
    let ip = format!("[127.250.{}.{}/32]", k / 256, k % 256);
    match r.below(4) {
        0 => {
            let (list, prefix) = if r.chance(60) {
                (&mut ws, "x")
            } else {
                (&mut es, "y")
            };
            let from = r.pick(list).clone();
            let name = format!("{prefix}{k}");
            let old = from
                .lines()
                .next()
                .unwrap()
                .trim_start_matches("  - name: ");
            let mut new = from.replacen(&format!("name: {old}\n"), &format!("name: {name}\n"), 1);
            if new.contains("ips:") {
                new = set(&new, "ips", &ip);
            }
            if new.contains("cgroups:") {
                new = set(&new, "cgroups", &format!("[rand/{name}]"));
            }
            if r.chance(50) {
                new = change(&new, r);
            }
            list.push(new);
        }
        1 => {
            let list = if r.chance(60) { &mut ws } else { &mut es };
            // e0 stays: a policy may read its attributes, and Cedar fails on a missing one.
            if list.len() > 1 {
                let i = 1 + r.below(list.len() - 1);
                list.remove(i);
            }
        }
        _ => {
            let list = if r.chance(60) { &mut ws } else { &mut es };
            let i = r.below(list.len());
            list[i] = change(&list[i], r);
        }
    }
    format!(
        "{head}workloads:\n{}endpoints:\n{}",
        ws.concat(),
        es.concat()
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// Random bundles and random inventory edits, chained (each incremental compile starts
    /// from the previous one, sometimes after a risk change): the incremental table is the
    /// full compile's and Cedar's. Sometimes a policy that names an entity is added, and
    /// sometimes a policy edit forces a full compile.
    #[test]
    fn incremental_compile_equals_full(seed in any::<u64>(), edits in 1usize..5) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        random_bundle(dir, seed).unwrap();
        let mut r = crate::testutil::Rng::new(seed ^ 0x5eed);
        let policies = dir.join("policies.cedar");
        if r.chance(30) {
            let mut text = std::fs::read_to_string(&policies).unwrap();
            text += "@id(\"named\")\nforbid (principal, action, resource) when { principal.tenant == Endpoint::\"e0\".tenant && principal.ring == \"dev\" };\n";
            std::fs::write(&policies, text).unwrap();
        }
        let mut b = load(dir);
        let mut previous = b.compile().unwrap();
        let probes = [(1, Protocol::Tcp), (53, Protocol::Udp), (6333, Protocol::Tcp)];
        // Edits may remove every subject by the last step; over the run, cells are compared.
        let mut compared = 0;
        for k in 0..edits {
            let inv_path = dir.join(crate::INVENTORY_FILE);
            let inv = std::fs::read_to_string(&inv_path).unwrap();
            std::fs::write(&inv_path, random_inventory_edit(&inv, &mut r, k)).unwrap();
            let policy_edit = r.chance(15);
            if policy_edit {
                let mut text = std::fs::read_to_string(&policies).unwrap();
                text += &format!("@id(\"edit{k}\")\npermit (principal, action, resource) when {{ principal.ring == \"prod\" && context.port == 6333 }};\n");
                std::fs::write(&policies, text).unwrap();
            }
            let before = b;
            b = load(dir);
            // The agent re-applies its risk overrides to the new bundle.
            for (w, score) in before.risk_overrides() {
                let _ = b.set_risk(w, score);
            }
            let inc = b.compile_incremental(&previous).unwrap();
            let full = b.compile().unwrap();
            let gone: Vec<u32> = previous
                .identities()
                .filter(|i| b.identities().by_name(&i.name).is_none())
                .map(|i| i.id)
                .collect();
            compared += assert_same_compiled(&b, &full, &inc, &gone, &probes);
            assert_table_equals_oracle(&b, &inc);
            prop_assert!(inc.stats().cedar_decisions <= full.stats().cedar_decisions);
            if policy_edit {
                prop_assert_eq!(inc.stats().cedar_decisions, full.stats().cedar_decisions);
            }
            previous = inc;
            // Sometimes a risk change before the next edit: the previous table then holds
            // renumbered signatures.
            let workloads: Vec<String> = b
                .identities()
                .iter()
                .filter(|i| i.kind == crate::IdentityKind::Workload)
                .map(|i| i.name.clone())
                .collect();
            if r.chance(40) && !workloads.is_empty() {
                let w = r.pick(&workloads).clone();
                let score = ["0.0", "0.85", "0.95"][r.below(3)];
                b.set_risk(&w, score).unwrap();
                previous.recompile_subject(&b, &w).unwrap();
            }
        }
        prop_assert!(compared > 0, "no cell was compared");
    }
}

#[test]
fn bench_new_identity_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let r = crate::testutil::bench_new_identity_sized(tmp.path(), 60, 12, 2, 20);
    for c in [&r.typical, &r.novel] {
        assert!(
            c.cedar_decisions < c.full_cedar_decisions,
            "{c:?}",
            c = c.cedar_decisions
        );
        assert_eq!(c.allows, c.after.allows().len());
        assert_eq!(c.cells, c.after.stats().cells);
        assert!(c.new_cells > 0 && c.added > 0);
        assert!(c.after.identity_by_name(&c.workload).is_some());
        assert!(c.before.identity_by_name(&c.workload).is_none());
        assert!(c.total_ms > 0.0);
    }
    assert_eq!(r.novel.purpose, "fine-tuning");
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["typical"]["total_ms"].is_number());
    assert!(json["typical"].get("after").is_none());
    assert!(r.to_string().contains("typical"));
}

// ---------------------------------------------------------------------------------------------
// `context.port` on destinations without declared ports (issue 6, faults 3 and 10).

/// A bundle of one local workload `w` (port-less, so also a port-less destination), an
/// endpoint `e` without ports, and `policies` as `ports.cedar`.
fn port_bundle(policies: &str) -> (tempfile::TempDir, Result<Bundle, crate::Diagnostics>) {
    let tmp = tempfile::tempdir().unwrap();
    let inv = "tenants: [acme]\nworkloads:\n  - name: w\n    tenant: acme\n    cgroups: [x/w]\n    ips: [127.10.1.2]\nendpoints:\n  - name: e\n    tenant: acme\n    kind: vector_db\n    ips: [127.10.1.3]\n";
    std::fs::write(tmp.path().join(crate::INVENTORY_FILE), inv).unwrap();
    std::fs::write(tmp.path().join(crate::SCHEMA_FILE), crate::testutil::SCHEMA).unwrap();
    std::fs::write(tmp.path().join("ports.cedar"), policies).unwrap();
    let b = Bundle::load(tmp.path());
    (tmp, b)
}

/// The kernel's verdict for every port 1..=65535 of one cell of `c`.
fn kernel_ports(c: &crate::Compiled, s: u32, d: u32, protocol: u8) -> Vec<bool> {
    let table: std::collections::HashMap<_, _> = c.allows().iter().copied().collect();
    (1..=65535u16)
        .map(|port| {
            let key = crate::PolicyKey {
                subject: s,
                destination: d,
                dport: port,
                protocol,
                _pad: 0,
            };
            kernel_lookup(&table, key).is_some_and(|(_, v)| v.is_allow())
        })
        .collect()
}

#[test]
fn a_forbid_of_one_port_is_a_deny_exception_under_the_any_port_allow() {
    // Fault 3: World allowed, port 25 forbidden. Before: one any-port allow, 25 allowed.
    let (_tmp, b) = port_bundle(
        "@id(\"world\")\npermit (principal, action, resource is World);\n@id(\"no-smtp\")\nforbid (principal, action, resource is World) when { context.port == 25 };\n",
    );
    let b = b.unwrap_or_else(|d| panic!("{d}"));
    let c = b.compile().unwrap();
    let w = b.identities().by_name("w").unwrap().id;
    for protocol in Protocol::ALL {
        let p = protocol.number();
        let ports = kernel_ports(&c, w, reserved::WORLD, p);
        for (i, allowed) in ports.iter().enumerate() {
            assert_eq!(*allowed, i + 1 != 25, "port {}/{protocol}", i + 1);
        }
        for port in [24, 25, 26, 1023, 1024, 8080, 65535] {
            let oracle = b.decide("w", "world", port, protocol).unwrap();
            assert_eq!(oracle.allowed, port != 25);
            assert_eq!(c.is_allowed(w, reserved::WORLD, port, p), port != 25);
        }
        let a = c.attribute(w, reserved::WORLD, 25, p);
        assert_eq!(a.policy_id, "no-smtp");
        let exception = c
            .allows()
            .iter()
            .find(|(k, _)| {
                k.subject == w
                    && k.destination == reserved::WORLD
                    && k.dport == 25
                    && k.protocol == p
            })
            .unwrap()
            .1;
        assert!(!exception.is_allow());
        assert_eq!(c.rules()[exception.rule as usize].id, "no-smtp");
    }
    // Two any-port allows and two deny exceptions for World (e and w are not World).
    assert_eq!(c.stats().deny_entries, 2, "{:?}", c.stats());
    let e = b.explain("w", "world", 25, Protocol::Tcp).unwrap();
    assert!(!e.decision.allowed && e.decision.policies[0].id == "no-smtp");
    assert_eq!(e.kernel_key.dport, 25);
    assert_table_equals_oracle(&b, &c);
}

#[test]
fn a_forbid_of_a_port_range_denies_only_that_range() {
    // Fault 10: `context.port < 1024` denied World on every port (any-port cell at port 0).
    let (_tmp, b) = port_bundle(
        "@id(\"world\")\npermit (principal, action, resource is World);\n@id(\"no-low\")\nforbid (principal, action, resource is World) when { context.port < 1024 };\n",
    );
    let b = b.unwrap_or_else(|d| panic!("{d}"));
    let c = b.compile().unwrap();
    let w = b.identities().by_name("w").unwrap().id;
    for protocol in Protocol::ALL {
        let p = protocol.number();
        let ports = kernel_ports(&c, w, reserved::WORLD, p);
        for (i, allowed) in ports.iter().enumerate() {
            assert_eq!(*allowed, i + 1 >= 1024, "port {}/{protocol}", i + 1);
        }
        for port in [1, 25, 1023, 1024, 8080, 65535] {
            assert_eq!(
                b.decide("w", "world", port, protocol).unwrap().allowed,
                port >= 1024
            );
            assert_eq!(c.is_allowed(w, reserved::WORLD, port, p), port >= 1024);
        }
        assert_eq!(c.attribute(w, reserved::WORLD, 1023, p).policy_id, "no-low");
        assert_eq!(
            c.attribute(w, reserved::WORLD, 8080, p).policy_id,
            "not-denied"
        );
    }
    assert_eq!(c.stats().deny_entries, 2 * 1023);
    assert_table_equals_oracle(&b, &c);

    // The mirror: a permit of a few ports under the default deny is exact allows only.
    let (_tmp, b) = port_bundle(
        "@id(\"web\")\npermit (principal, action, resource) when { [80, 443].contains(context.port) || context.port >= 65000 };\n",
    );
    let b = b.unwrap_or_else(|d| panic!("{d}"));
    let c = b.compile().unwrap();
    let e = b.identities().by_name("e").unwrap().id;
    let ports = kernel_ports(&c, w, e, proto::TCP);
    for (i, allowed) in ports.iter().enumerate() {
        let port = i + 1;
        assert_eq!(
            *allowed,
            port == 80 || port == 443 || port >= 65000,
            "port {port}"
        );
    }
    assert!(c.allows().iter().all(|(k, v)| v.is_allow() && k.dport != 0));
    assert_eq!(
        c.attribute(w, e, 8080, proto::TCP).policy_id,
        "implicit-deny"
    );
    assert_table_equals_oracle(&b, &c);
}

#[test]
fn a_cell_needing_too_many_port_entries_is_an_error_at_the_policy() {
    let (_tmp, b) = port_bundle(
        "@id(\"world\")\npermit (principal, action, resource);\n\n@id(\"wide\")\nforbid (principal, action, resource is Endpoint)\n  when { context.port > 1000 && context.port <= 9000 };\n",
    );
    let b = b.unwrap_or_else(|d| panic!("{d}"));
    let err = b
        .compile()
        .err()
        .expect("8,000 exceptions are over the bound");
    let text = err.to_string();
    assert!(
        text.contains("ports.cedar:6:10: error: policy `wide` reads context.port in a way that needs 8000 kernel entries for destination `e`"),
        "{text}"
    );
    assert!(text.contains("declare ports on `e`"), "{text}");
    // Within the bound it compiles, and World's message says what World can do.
    let (_tmp, b) = port_bundle(
        "@id(\"world\")\npermit (principal, action, resource);\n@id(\"wide\")\nforbid (principal, action, resource is World) when { context.port > 1000 && context.port <= 9000 };\n",
    );
    let text = b.unwrap().compile().err().unwrap().to_string();
    assert!(text.contains("ports.cedar:4:"), "{text}");
    assert!(text.contains("World takes every port"), "{text}");
    let (_tmp, b) = port_bundle(
        "permit (principal, action, resource);\nforbid (principal, action, resource) when { context.port > 1000 && context.port <= 5096 };\n",
    );
    let b = b.unwrap();
    assert_eq!(b.compile().unwrap().stats().deny_entries, 4096 * 3 * 2);
}

#[test]
fn port_uses_the_compile_cannot_follow_are_load_errors_at_their_location() {
    let d = load_with(
        "purpose.cedar",
        "\n@id(\"sum\")\nforbid (principal, action, resource)\n  when { context.port + 1 > 1024 };\n\
         @id(\"attr\")\npermit (principal, action, resource) when { principal.risk.lessThan(decimal(\"0.5\")) && [context.port, 80].contains(443) };\n\
         @id(\"whole\")\nforbid (principal, action, resource) unless {\n    context == {port: 25, protocol: \"tcp\"} };\n",
    );
    assert_diag(
        &d,
        "purpose.cedar:4:10:",
        "policy `sum`: `context.port + 1` uses `context.port` in a way the kernel table cannot represent exactly",
    );
    assert_diag(
        &d,
        "purpose.cedar:4:10:",
        "[hint: compare `context.port` directly with an integer literal",
    );
    assert_diag(
        &d,
        "purpose.cedar:6:88:",
        "policy `attr`: `[context.port, 80]` uses `context.port`",
    );
    assert_diag(&d, "purpose.cedar:9:5:", "policy `whole`: `context == {port: 25, protocol: \"tcp\"}` uses `context` as a whole value");
    // Every analysable form loads.
    let ok = load_with(
        "purpose.cedar",
        "permit (principal, action, resource) when { context.port == 1 || 2 != context.port || context.port < 3 || 4 <= context.port || context.port > 5 || 6 >= context.port || [7, 8].contains(context.port) || context.protocol == \"udp\" };\n",
    );
    assert!(ok.is_empty(), "{ok:?}");
}

/// A risk change that moves a destination without ports from "most ports allowed" to "most
/// denied" and back is written cell by cell into the live table: at no step of the writing
/// may a port be allowed that neither the old nor the new table allows.
#[test]
fn row_deltas_never_allow_what_neither_table_allows() {
    let (_tmp, b) = port_bundle(
        "@id(\"low-risk-world\")\npermit (principal, action, resource is World) when { principal.risk.lessThan(decimal(\"0.8\")) };\n\
         @id(\"https\")\npermit (principal, action, resource is World) when { context.port == 443 };\n\
         @id(\"no-smtp\")\nforbid (principal, action, resource is World) when { context.port == 25 };\n",
    );
    let mut b = b.unwrap_or_else(|d| panic!("{d}"));
    let mut c = b.compile().unwrap();
    let w = b.identities().by_name("w").unwrap().id;
    let probes: Vec<(u16, u8)> = [1, 24, 25, 26, 442, 443, 444, 8080, 65535]
        .iter()
        .flat_map(|&p| [(p, proto::TCP), (p, proto::UDP)])
        .collect();
    let allowed = |t: &std::collections::HashMap<crate::PolicyKey, crate::PolicyValue>,
                   (port, p): (u16, u8)| {
        let key = crate::PolicyKey {
            subject: w,
            destination: reserved::WORLD,
            dport: port,
            protocol: p,
            _pad: 0,
        };
        kernel_lookup(t, key).is_some_and(|(_, v)| v.is_allow())
    };
    let mut steps = 0;
    for score in ["0.9", "0.2", "0.9"] {
        let before: std::collections::HashMap<_, _> = c.allows().iter().copied().collect();
        b.set_risk("w", score).unwrap();
        let delta = c.recompile_subject(&b, "w").unwrap();
        let after: std::collections::HashMap<_, _> = c.allows().iter().copied().collect();
        assert!(!delta.is_empty());
        // Write it as the agent does: puts in order, then deletes in order.
        let mut live = before.clone();
        let check = |live: &std::collections::HashMap<_, _>, step: &str| {
            for &probe in &probes {
                assert!(
                    !allowed(live, probe) || allowed(&before, probe) || allowed(&after, probe),
                    "risk {score}, {step}: port {probe:?} allowed by neither table"
                );
            }
        };
        for (k, v) in &delta.added {
            live.insert(*k, *v);
            check(&live, &format!("after writing {k:?}"));
            steps += 1;
        }
        for k in &delta.removed {
            live.remove(k);
            check(&live, &format!("after deleting {k:?}"));
            steps += 1;
        }
        assert_eq!(live, after);
    }
    assert!(steps >= 6, "{steps} steps");
}

/// Vector databases are always tracked; another endpoint only with `track: true`; a `track`
/// that is not a boolean is an error at its line.
#[test]
fn track_marks_an_endpoint_tracked() {
    use enforcer_common::flags::{TRACKED, VECTOR_DB};
    let c = demo().compile().unwrap();
    let vectors = c.identity_by_name("acme-vectors").unwrap();
    assert_eq!(vectors.flags & (VECTOR_DB | TRACKED), VECTOR_DB | TRACKED);
    assert_eq!(
        c.identity_by_name("acme-features").unwrap().flags & TRACKED,
        0
    );
    assert_eq!(
        c.identity_by_name("acme-retriever").unwrap().flags & TRACKED,
        0
    );

    let inventory = std::fs::read_to_string(demo_dir().join("inventory.yaml")).unwrap();
    let tracked = inventory.replace(
        "    kind: feature_store\n",
        "    kind: feature_store\n    track: true\n",
    );
    assert_ne!(tracked, inventory);
    let tmp = demo_with("inventory.yaml", &tracked);
    let c = Bundle::load(tmp.path()).unwrap().compile().unwrap();
    let features = c.identity_by_name("acme-features").unwrap();
    assert_eq!(features.flags & (VECTOR_DB | TRACKED), TRACKED);

    let broken = inventory.replace(
        "    kind: feature_store\n",
        "    kind: feature_store\n    track: maybe\n",
    );
    let errors = load_with("inventory.yaml", &broken);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("track must be true or false")),
        "{errors:?}"
    );
}

/// A subject in audit mode (its tenant's `audit: true`): explain says its deny passes,
/// reported, instead of a bare DENY that an operator reads as "blocked" (review 40).
#[test]
fn explain_says_when_audit_mode_lets_a_deny_through() {
    let b = demo();
    let e = b
        .explain("initech-batch", "acme-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(!e.decision.allowed && e.audit);
    let text = e.to_string();
    assert!(
        text.starts_with("AUDIT (a deny that audit mode lets through, reported as connection.audited): initech-batch -> acme-vectors"),
        "{text}"
    );
    let e = b
        .explain("acme-retriever", "globex-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(!e.audit && e.to_string().starts_with("DENY: "));
}

/// `policy explain --to IP` judges the identity the kernel's IP cache gives the address: the
/// longest prefix that holds it, else WORLD (red-team review 40 M3: an address copied from a
/// deny event was an unknown name).
#[test]
fn an_address_is_the_identity_of_its_longest_prefix() {
    let inventory = std::fs::read_to_string(demo_dir().join("inventory.yaml")).unwrap();
    let wide = inventory.replacen("ips: [127.10.2.53/32]", "ips: [127.10.2.0/24]", 1);
    assert_ne!(wide, inventory, "fixture: the demo's 127.10.2.53/32");
    let dir = demo_with("inventory.yaml", &wide);
    let b = load(dir.path());
    let at = |ip: &str| b.identities().at_address(&ip.parse().unwrap()).name.clone();
    let wide_one = at("127.10.2.53");
    assert_ne!(wide_one, "world");
    assert_eq!(at("127.10.2.10"), "globex-vectors");
    assert_eq!(at("127.10.2.99"), wide_one);
    assert_eq!(at("127.10.9.9"), "world");
    assert_eq!(at("8.8.8.8"), "world");
    assert_eq!(at("::1"), "world");
}

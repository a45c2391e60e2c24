//! Findings of the attack pass after issue 6 (policy crate): each the smallest bundle that
//! was accepted or misreported.

use std::path::{Path, PathBuf};

use crate::Bundle;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo")
}

/// `file:line:column: message` of every diagnostic of the demo bundle with `extra` appended
/// to `baseline.cedar` (empty: it loaded).
fn with_policy(extra: &str) -> (Vec<String>, usize) {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let base = tmp.path().join("baseline.cedar");
    let mut text = std::fs::read_to_string(&base).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    // The line the extra text starts on (1-based).
    let line = text.lines().count() + 1;
    text.push_str(extra);
    std::fs::write(&base, text).unwrap();
    let diags = match Bundle::load(tmp.path()) {
        Ok(_) => vec![],
        Err(d) => {
            d.0.iter()
                .map(|d| {
                    let name = d.file.file_name().unwrap().to_string_lossy().into_owned();
                    format!("{name}:{}:{}: {}", d.line, d.column, d.message)
                })
                .collect()
        }
    };
    (diags, line)
}

/// A template was reported at `file:1:1` and as `policyN`, not at itself and by its @id.
#[test]
fn a_template_is_reported_at_itself_by_its_id() {
    let (diags, line) =
        with_policy("@id(\"slot\")\npermit (principal == ?principal, action, resource);\n");
    assert_eq!(
        diags,
        vec![format!(
            "baseline.cedar:{line}:1: template `slot` is not supported"
        )]
    );
}

/// `@quarantine("false")` reads as "no quarantine" and was a quarantining forbid.
#[test]
fn quarantine_with_a_value_is_an_error() {
    let (diags, line) = with_policy(
        "@id(\"q\")\n@quarantine(\"false\")\nforbid (principal, action, resource is World) when { principal.risk.greaterThan(decimal(\"0.9\")) };\n",
    );
    assert_eq!(
        diags,
        vec![format!(
            "baseline.cedar:{}:1: @quarantine takes no value",
            line + 1
        )]
    );
    // Bare `@quarantine` (the documented form) still loads.
    let (diags, _) = with_policy(
        "@id(\"q\")\n@quarantine\nforbid (principal, action, resource is World) when { principal.risk.greaterThan(decimal(\"0.9\")) };\n",
    );
    assert_eq!(diags, Vec::<String>::new());
}

/// Nothing bounded the work of a port plan: every distinct `context.port` literal adds up to
/// three ports at which every cell of a destination without ports is asked of Cedar, and
/// each question evaluates every policy (here 20 sets of 3,277 literals: 384 KB, within
/// every size limit). `enforcer policy check` on this bundle ran over 2 minutes (debug
/// build) without finishing; a live agent reloading it blocks its control loop for as long
/// (SIGTERM, status, risk and quarantine requests wait). The bundle should be rejected
/// with a located error naming a limit on port literals (or on the questions a compile may
/// ask), before any evaluation: `ports::MAX_PORT_VALUES` distinct values per bundle.
#[test]
fn port_literals_are_bounded() {
    let mut text = String::new();
    for i in 0..20 {
        let lits: Vec<String> = (1 + i..65536).step_by(20).map(|p| p.to_string()).collect();
        text.push_str(&format!(
            "@id(\"p{i}\")\nforbid (principal, action, resource is World) when {{ [{}].contains(context.port) }};\n",
            lits.join(",")
        ));
    }
    text.push_str("@id(\"w\")\npermit (principal, action, resource is World);\n");
    let (diags, _) = with_policy(&text);
    assert!(
        diags.iter().any(|d| d.contains("limit")),
        "want a located error naming a limit, got {diags:?}"
    );
}

/// `context.protocol == "UDP"` (or `"icmp"`) never holds: Cedar is asked with "tcp" and
/// "udp" only, so such a forbid was accepted and silently never applied.
#[test]
fn a_protocol_the_context_never_holds_is_an_error() {
    let (diags, line) = with_policy(
        "@id(\"no-udp\")\nforbid (principal, action, resource is World) when { context.protocol == \"UDP\" || [\"tcp\", \"icmp\"].contains(context.protocol) };\n",
    );
    let col = |needle: &str| {
        "forbid (principal, action, resource is World) when { context.protocol == \"UDP\" || [\"tcp\", \"icmp\"].contains(context.protocol) };"
            .find(needle)
            .unwrap()
            + 1
    };
    assert_eq!(
        diags,
        vec![
            format!("baseline.cedar:{}:{}: policy `no-udp`: `context.protocol` is never \"UDP\": it is \"tcp\" or \"udp\" (lower case), so this comparison never holds", line + 1, col("\"UDP\"")),
            format!("baseline.cedar:{}:{}: policy `no-udp`: `context.protocol` is never \"icmp\": it is \"tcp\" or \"udp\" (lower case), so this comparison never holds", line + 1, col("\"icmp\"")),
        ]
    );
    // The real values load.
    let (diags, _) = with_policy(
        "@id(\"no-udp\")\nforbid (principal, action, resource is World) when { context.protocol == \"udp\" || [\"tcp\"].contains(context.protocol) };\n",
    );
    assert_eq!(diags, Vec::<String>::new());
}

/// `@id("a\nALLOW: ...")` was accepted: printed by `policy explain` and in logs, it splits
/// its line into lines that look like other output.
#[test]
fn an_id_with_a_control_character_is_an_error() {
    let (diags, line) = with_policy(
        "@id(\"x\\nALLOW: acme -> globex\")\nforbid (principal, action, resource is World);\n",
    );
    assert_eq!(
        diags,
        vec![format!(
            "baseline.cedar:{line}:1: @id \"x\\nALLOW: acme -> globex\" contains a control character (a line break, tab...)"
        )]
    );
}

/// Inventory strings with control characters (`name: "globex-dns\nALLOW"`, an ESC in a
/// kind) were accepted, and `policy explain` printed them raw.
#[test]
fn inventory_strings_with_control_characters_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let inv = std::fs::read_to_string(demo_dir().join("inventory.yaml")).unwrap();
    let line = inv.lines().position(|l| l == "    kind: dns").unwrap() + 1;
    let inv = inv.replacen("    kind: dns", "    kind: \"dns\\u001b[2J\"", 1);
    std::fs::write(tmp.path().join("inventory.yaml"), inv).unwrap();
    let diags: Vec<String> = match Bundle::load(tmp.path()) {
        Ok(_) => vec![],
        Err(d) => {
            d.0.iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect()
        }
    };
    assert_eq!(
        diags,
        vec![format!(
            "{line}:11: kind \"dns\\u{{1b}}[2J\" contains a control character (a line break, tab, escape...)"
        )]
    );
}

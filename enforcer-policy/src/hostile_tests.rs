//! Hostile and sloppy bundles (issue 6, faults 2, 6, 7 and 9 and their siblings): every one
//! is rejected with its exact location, nothing is silently dropped or read two ways, no
//! input can exhaust memory or the stack, and every problem is listed in one run.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::inventory::canonical_net;
use crate::{limits, Bundle, IpNet, Protocol};

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo")
}

/// A copy of the demo bundle with each `(file, content)` written over it.
fn demo_with_files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    for (name, content) in files {
        std::fs::write(tmp.path().join(name), content).unwrap();
    }
    tmp
}

/// `name:line:col: message [hint: ...]` of every diagnostic of loading `dir` (empty: loaded).
fn diagnostics(dir: &Path) -> Vec<String> {
    match Bundle::load(dir) {
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

fn load_with(files: &[(&str, &str)]) -> Vec<String> {
    diagnostics(demo_with_files(files).path())
}

fn demo_inventory() -> String {
    std::fs::read_to_string(demo_dir().join("inventory.yaml")).unwrap()
}

/// The demo inventory with exactly one occurrence of `from` replaced by `to`.
fn inventory_edit(from: &str, to: &str) -> String {
    let inv = demo_inventory();
    assert_eq!(inv.matches(from).count(), 1, "fixture: {from:?}");
    inv.replacen(from, to, 1)
}

#[track_caller]
fn assert_diag(diags: &[String], prefix: &str, contains: &str) {
    assert!(
        diags
            .iter()
            .any(|d| d.starts_with(prefix) && d.contains(contains)),
        "expected `{prefix}` with `{contains}` in:\n{}",
        diags.join("\n")
    );
}

/// 1-based (line, column) of the `n`th (0-based) occurrence of `needle` in `text`.
fn pos_of(text: &str, needle: &str, n: usize) -> (usize, usize) {
    let at = text
        .match_indices(needle)
        .nth(n)
        .unwrap_or_else(|| panic!("{needle:?} #{n} not in the text"))
        .0;
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

// ---------------------------------------------------------------------------------------------
// Fault 2: one address, one spelling.

#[test]
fn every_address_form_is_canonical_or_refused() {
    let ok = |s: &str| {
        canonical_net(s)
            .unwrap_or_else(|e| panic!("{s}: {e:?}"))
            .to_string()
    };
    // IPv4-mapped IPv6 hosts and networks are the IPv4 ones.
    assert_eq!(ok("::ffff:127.77.2.20"), "127.77.2.20/32");
    assert_eq!(ok("::FFFF:7f4d:0214"), "127.77.2.20/32");
    assert_eq!(ok("::ffff:127.77.2.20/128"), "127.77.2.20/32");
    assert_eq!(ok("::ffff:10.1.0.0/112"), "10.1.0.0/16");
    assert_eq!(ok("::ffff:10.0.0.0/104"), "10.0.0.0/8");
    // Plain forms are unchanged; IPv6 is printed in its canonical text.
    assert_eq!(ok("127.77.2.20"), "127.77.2.20/32");
    assert_eq!(ok("10.0.0.0/8"), "10.0.0.0/8");
    assert_eq!(ok("FD00:0:0::1"), "fd00::1/128");
    assert_eq!(ok("fd00::/64"), "fd00::/64");
    assert_eq!(ok("::1"), "::1/128");

    let refused = |s: &str, why: &str, hint: &str| {
        let (msg, h) = canonical_net(s).expect_err(s);
        assert!(msg.contains(why), "{s}: message {msg:?} lacks {why:?}");
        assert!(h.contains(hint), "{s}: hint {h:?} lacks {hint:?}");
    };
    // Host bits: never silently another range than meant; the hint names both readings.
    refused(
        "10.0.0.5/24",
        "host bits",
        "write the network 10.0.0.0/24, or the single address 10.0.0.5/32",
    );
    refused("fd00::1/64", "host bits", "fd00::/64");
    refused("::ffff:10.0.0.5/120", "host bits", "/120");
    // Unspecified addresses and catch-alls, in every spelling.
    for s in [
        "0.0.0.0",
        "0.0.0.0/8",
        "::",
        "::/0",
        "::ffff:0.0.0.0",
        "::ffff:0:0/96",
    ] {
        refused(s, "", "0.0.0.0 and :: are not destinations");
    }
    refused("0.0.0.0/0", "claims every address", "WORLD");
    // A shorter IPv6 network that spans the mapped range.
    refused("::fffe:0:0/95", "IPv4-mapped", "as IPv4");
    // IPv4-compatible (deprecated): not the IPv4 address it shows.
    refused("::127.77.2.20", "IPv4-compatible", "::ffff:a.b.c.d");
    refused("::7f4d:214/128", "IPv4-compatible", "");
    // Zone ids, leading zeros, odd prefix spellings.
    refused("fe80::1%eth0", "zone ids", "");
    refused("127.077.2.20", "leading zeros", "octal");
    refused("10.0.0.0/08", "prefix length", "");
    refused("10.0.0.0/+8", "prefix length", "");
    refused("10.0.0.0/", "prefix length", "");
    refused("10.0.0.0/33", "prefix length must be 0 to 32", "");
    refused("fd00::/129", "prefix length must be 0 to 128", "");
    refused("not-an-ip", "not an IP address", "127.10.1.2/32");
}

#[test]
fn a_mapped_address_is_the_ipv4_identity() {
    // Fault 2 as found: the mapped spelling was kept as IPv6, and IPv4 traffic to the
    // address was judged WORLD.
    let inv = inventory_edit(
        "    ips: [127.10.2.10/32]\n",
        "    ips: [\"::ffff:127.10.2.10\"]\n",
    );
    let dir = demo_with_files(&[("inventory.yaml", &inv)]);
    let b = Bundle::load(dir.path()).unwrap_or_else(|d| panic!("{d}"));
    let vectors = b
        .identities()
        .iter()
        .find(|i| i.name == "globex-vectors")
        .unwrap();
    assert_eq!(
        vectors.ips,
        vec![IpNet::from_str("127.10.2.10/32").unwrap()]
    );
    assert!(vectors.ips[0].is_ipv4());
    // And the cell is decided as for the plain spelling.
    let d = b
        .decide("acme-retriever", "globex-vectors", 6333, Protocol::Tcp)
        .unwrap();
    assert!(!d.allowed);
}

#[test]
fn two_spellings_of_one_address_are_one_claim() {
    // globex-vectors takes acme-vectors' address, spelled IPv4-mapped: the conflict it is.
    let inv = inventory_edit(
        "    ips: [127.10.2.10/32]\n",
        "    ips: [\"::ffff:127.10.1.10\"]\n",
    );
    let (line, col) = pos_of(&inv, "\"::ffff:127.10.1.10\"", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        "127.10.1.10/32 is already claimed by `acme-vectors`",
    );
    // A network in mapped form overlapping another tenant's address.
    let inv = inventory_edit(
        "    ips: [127.10.2.10/32]\n",
        "    ips: [\"::ffff:127.10.1.0/120\"]\n",
    );
    let (line, col) = pos_of(&inv, "\"::ffff:127.10.1.0/120\"", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        "127.10.1.0/24 (tenant globex) overlaps 127.10.1.2/32",
    );
    // The same address twice in one item, in two spellings.
    let inv = inventory_edit(
        "    ips: [127.10.2.10/32]\n",
        "    ips: [127.10.2.10, \"::ffff:127.10.2.10/128\"]\n",
    );
    let (line, col) = pos_of(&inv, "\"::ffff:127.10.2.10/128\"", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        "is 127.10.2.10/32, already listed on line",
    );
    // Refused forms are located too.
    let inv = inventory_edit(
        "    ips: [127.10.2.10/32]\n",
        "    ips: [127.10.2.10/32, 0.0.0.0/0]\n",
    );
    let (line, col) = pos_of(&inv, "0.0.0.0/0", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        "invalid IP or CIDR `0.0.0.0/0`",
    );
}

// ---------------------------------------------------------------------------------------------
// Fault 6: nothing the parser does not consume.

#[test]
fn a_second_yaml_document_is_an_error_not_ignored() {
    // Fault 6 as found: `---` before `endpoints:` made every endpoint vanish.
    let inv = inventory_edit("\nendpoints:\n", "\n---\nendpoints:\n");
    let (line, _) = pos_of(&inv, "---\nendpoints", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:1:"),
        "a second YAML document starts here",
    );
    // `...` (document end) followed by more content.
    let inv = inventory_edit("\nendpoints:\n", "\n...\nendpoints:\n");
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert!(
        d.iter()
            .any(|d| d.starts_with("inventory.yaml:") && d.contains("document")),
        "{}",
        d.join("\n")
    );
    // A leading `---` (one document) is fine.
    assert!(load_with(&[("inventory.yaml", &format!("---\n{}", demo_inventory()))]).is_empty());
}

#[test]
fn unknown_and_duplicate_keys_are_errors_at_every_level() {
    for (from, to, needle, message) in [
        // (edit, the key's text, expected message)
        (
            "\nendpoints:\n",
            "\nendpoint:\n",
            "endpoint:",
            "inventory: unknown field `endpoint`",
        ),
        (
            "  - name: initech\n",
            "  - name: initech\n    audti: true\n",
            "audti",
            "tenant: unknown field `audti`",
        ),
        (
            "  implicit_deny_atlas:",
            "  implicit_deny_atlass:",
            "implicit_deny_atlass",
            "defaults: unknown field",
        ),
        (
            "    purpose: retrieval\n",
            "    purpos: retrieval\n",
            "purpos:",
            "workload: unknown field `purpos`",
        ),
        (
            "    datasets: [acme-kb]\n",
            "    dataset: [acme-kb]\n",
            "dataset:",
            "endpoint: unknown field `dataset`",
        ),
        (
            "{port: 6333, protocol: tcp, action: query}]\n    datasets: [acme-kb]",
            "{port: 6333, protocl: tcp, action: query}]\n    datasets: [acme-kb]",
            "protocl",
            "port: unknown field `protocl`",
        ),
        // Duplicate keys: the second one is the error, at every level.
        (
            "\nendpoints:\n",
            "\ntenants: [x]\nendpoints:\n",
            "tenants: [x]",
            "inventory: duplicate field `tenants`",
        ),
        (
            "  - name: initech\n",
            "  - name: initech\n    name: initech2\n",
            "name: initech2",
            "tenant: duplicate field `name`",
        ),
        (
            "  implicit_deny_atlas: [AML.T0012]",
            "  implicit_deny_atlas: [AML.T0012]\n  implicit_deny_atlas: [AML.T0012]",
            "implicit_deny_atlas: [AML.T0012]\n  implicit",
            "defaults: duplicate field",
        ),
        (
            "    purpose: retrieval\n",
            "    purpose: retrieval\n    purpose: inference\n",
            "purpose: inference",
            "workload: duplicate field `purpose`",
        ),
        (
            "    datasets: [acme-kb]\n",
            "    datasets: [acme-kb]\n    tenant: globex\n",
            "tenant: globex\n  - name: acme-features",
            "endpoint: duplicate field `tenant`",
        ),
        (
            "{port: 6333, protocol: tcp, action: query}]\n    datasets: [acme-kb]",
            "{port: 6333, protocol: tcp, action: query, port: 6334}]\n    datasets: [acme-kb]",
            "port: 6334",
            "port: duplicate field `port`",
        ),
    ] {
        let inv = inventory_edit(from, to);
        let (mut line, mut col) = pos_of(&inv, needle, 0);
        if needle.starts_with("implicit_deny_atlas: [AML.T0012]\n") {
            // The second of the two.
            (line, col) = (line + 1, 3);
        }
        let d = load_with(&[("inventory.yaml", &inv)]);
        assert_diag(&d, &format!("inventory.yaml:{line}:{col}:"), message);
    }
}

#[test]
fn yaml_tags_are_refused() {
    // Located at the tagged value (the parser marks the node, not its tag).
    let inv = inventory_edit("    ring: dev\n", "    ring: !!str dev\n");
    let (line, col) = pos_of(&inv, "dev\n", 0);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        "YAML tags are not supported (`!!str`)",
    );
    let inv = inventory_edit("    ring: dev\n", "    ring: !local dev\n");
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:"),
        "YAML tags are not supported (`!local`)",
    );
}

#[test]
fn stray_files_in_the_bundle_directory_are_errors() {
    for name in [
        "policy.Cedar",
        "x.cedar.bak",
        "x.cedar~",
        "inventory.yml",
        "Schema.cedarschema",
        "notes.txt",
    ] {
        let d = load_with(&[(name, "permit (principal, action, resource);\n")]);
        assert_diag(
            &d,
            &format!("{name}:1:1:"),
            &format!("`{name}` is not a bundle file"),
        );
    }
    // A directory or a FIFO named like a policy file: not silently skipped, and the FIFO
    // does not stall the load.
    let dir = demo_with_files(&[]);
    std::fs::create_dir(dir.path().join("sub.cedar")).unwrap();
    let fifo = std::ffi::CString::new(dir.path().join("pipe.cedar").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let d = diagnostics(dir.path());
    assert_diag(&d, "sub.cedar:1:1:", "not a regular file (a directory)");
    assert_diag(&d, "pipe.cedar:1:1:", "not a regular file (a FIFO)");
    // Hidden entries are ignored (editor swap files, a ConfigMap mount's `..data`), even a
    // broken `.x.cedar`: the PDP does not serve them either.
    let d = load_with(&[
        (".purpose.cedar.swp", "garbage"),
        (".hidden.cedar", "permit ("),
    ]);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

#[test]
fn an_empty_policy_file_is_an_error() {
    for content in [
        "",
        "\n\n",
        "// only a comment\n// forbid (principal, action, resource);\n",
    ] {
        let d = load_with(&[("extra.cedar", content)]);
        assert_diag(&d, "extra.cedar:1:1:", "no policy in this file");
    }
}

// ---------------------------------------------------------------------------------------------
// Fault 7: bounded parsers.

/// An inventory like fault 7's 367 bytes: 9 levels of 9 aliases (9^9 nodes if expanded).
fn billion_laughs() -> String {
    let mut s = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let items = vec![format!("*{prev}"); 9].join(",");
        s += &format!("{name}: &{name} [{items}]\n");
    }
    s
}

#[test]
fn alias_expansion_is_bounded() {
    let inv = billion_laughs();
    // Counting keys, nodes, aliases' copies and anchors' kept copies: lines a-f come to
    // 1,345,213 nodes, line g's key and list to 1,345,215, and each *f adds 597,871: the
    // second passes the limit of 2,000,000.
    let (line, col) = pos_of(&inv, "*f", 1);
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{line}:{col}:"),
        &format!("grows past {} YAML nodes", limits::YAML_NODES),
    );
    // An alias of a node that contains it.
    let d = load_with(&[("inventory.yaml", "tenants: &t [a, *t]\n")]);
    assert_diag(&d, "inventory.yaml:1:", "refers to a node that contains it");
    // Legitimate aliases still work.
    let inv = inventory_edit(
        "    ports: [{port: 6333, protocol: tcp, action: query}]\n    datasets: [globex-kb]",
        "    ports: *vecports\n    datasets: [globex-kb]",
    );
    let inv = inv.replacen(
        "    ports: [{port: 6333, protocol: tcp, action: query}]\n",
        "    ports: &vecports [{port: 6333, protocol: tcp, action: query}]\n",
        1,
    );
    assert!(load_with(&[("inventory.yaml", &inv)]).is_empty());
}

#[test]
fn yaml_nesting_is_bounded() {
    // Flow nesting 100 deep: an error at the first level too deep (the 33rd level is the
    // 32nd `[`), not a stack overflow in the parser or the tree's drop.
    let deep = format!("tenants: {}{}\n", "[".repeat(100), "]".repeat(100));
    let col = "tenants: ".len() + limits::YAML_DEPTH;
    let d = load_with(&[("inventory.yaml", &deep)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:1:{col}:"),
        &format!(
            "YAML nested 33 levels deep here; the limit is {}",
            limits::YAML_DEPTH
        ),
    );
    // 100,000 deep: the parser's scanner, which looks ahead, stops first, at the 256th `[`.
    let deep = format!("tenants: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let col = "tenants: ".len() + 256;
    let d = load_with(&[("inventory.yaml", &deep)]);
    assert_diag(
        &d,
        &format!("inventory.yaml:1:{col}:"),
        &format!(
            "more than 255 levels deep here; the limit is {}",
            limits::YAML_DEPTH
        ),
    );
    let mut block = String::new();
    for i in 0..200 {
        block += &format!("{}- \n", "  ".repeat(i));
    }
    let d = load_with(&[("inventory.yaml", &block)]);
    assert!(
        d.iter().any(|d| d.contains("YAML nested")),
        "{}",
        d.join("\n")
    );
    // Aliases nest too: an anchor 20 deep placed 20 deep.
    let inv = format!(
        "x: &x {}{}\ntenants: {}*x{}\n",
        "[".repeat(20),
        "]".repeat(20),
        "[".repeat(20),
        "]".repeat(20)
    );
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_diag(&d, "inventory.yaml:2:", "YAML nested");
}

/// A demo copy whose `extra.cedar` is `policy`, and the 1-based (line, column) of the
/// `n`th `needle` in it.
fn deep_policy_diags(policy: &str, needle: &str, n: usize) -> (Vec<String>, String) {
    let (line, col) = pos_of(policy, needle, n);
    (
        load_with(&[("extra.cedar", policy)]),
        format!("extra.cedar:{line}:{col}:"),
    )
}

#[test]
fn cedar_nesting_is_bounded_before_parsing() {
    // Fault 7 as found: 200 nested parentheses overflowed the stack.
    let policy = format!(
        "// deep\n@id(\"deep\")\nforbid (principal, action, resource) when {{ {}true{} }};\n",
        "(".repeat(200),
        ")".repeat(200)
    );
    // `{` is the first bracket: the 24th is the 23rd `(` after it.
    let after = policy.find("when").unwrap();
    let nth = policy[..after].matches('(').count() + limits::CEDAR_BRACKET_DEPTH - 1;
    let (d, at) = deep_policy_diags(&policy, "(", nth);
    assert_diag(
        &d,
        &at,
        &format!(
            "brackets nest {} deep here; the limit is {}",
            limits::CEDAR_BRACKET_DEPTH + 1,
            limits::CEDAR_BRACKET_DEPTH
        ),
    );
    assert_eq!(d.len(), 1, "{}", d.join("\n"));
    // Sets and records nest the same way.
    let policy = format!(
        "permit (principal, action, resource) when {{ {}1{}.isEmpty() }};\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let (d, at) = deep_policy_diags(&policy, "[", limits::CEDAR_BRACKET_DEPTH - 1);
    assert_diag(&d, &at, "brackets nest");

    // A long `&&` chain: a tree as deep as it is long.
    let policy = format!(
        "permit (principal, action, resource) when {{ {} }};\n",
        vec!["principal.ring == \"prod\""; 20_000].join(" && ")
    );
    // Levels: `(...)` of the scope 1, so `{` opens at 2; in the first operand `.` 3, `==` 4;
    // then one per `&&`: the 61st is level 65.
    let (d, at) = deep_policy_diags(&policy, "&&", limits::CEDAR_EXPR_DEPTH - 4);
    assert_diag(
        &d,
        &at,
        &format!(
            "the expression nests about {} levels deep here; the limit is {}",
            limits::CEDAR_EXPR_DEPTH + 1,
            limits::CEDAR_EXPR_DEPTH
        ),
    );
    // `||`, `+`, `.` and `if` chains without any bracket.
    for body in [
        vec!["true"; 20_000].join(" || "),
        format!("context.port == {}", vec!["1"; 20_000].join(" + ")),
        format!("principal{} == \"x\"", ".ring".repeat(20_000)),
        format!(
            "{}true{}",
            "if true then ".repeat(20_000),
            " else false".repeat(20_000)
        ),
    ] {
        let policy = format!("permit (principal, action, resource) when {{ {body} }};\n");
        let d = load_with(&[("extra.cedar", &policy)]);
        assert_diag(
            &d,
            "extra.cedar:1:",
            &format!(
                "levels deep here; the limit is {}",
                limits::CEDAR_EXPR_DEPTH
            ),
        );
    }
    // Strings and comments do not count.
    let policy = format!(
        "// {}\n@id(\"{}\")\npermit (principal, action, resource) when {{ principal.ring == \"{}\" }};\n",
        "((((".repeat(1000),
        "&&".repeat(1000),
        "[".repeat(1000)
    );
    let d = load_with(&[("extra.cedar", &policy)]);
    assert!(d.is_empty(), "{}", d.join("\n"));
}

#[test]
fn schema_nesting_is_bounded() {
    let schema = std::fs::read_to_string(demo_dir().join("schema.cedarschema")).unwrap();
    let deep = format!(
        "{schema}\ntype Deep = {}Long{};\n",
        "Set<".repeat(10_000),
        ">".repeat(10_000)
    );
    let before = schema.matches('<').count();
    let (line, col) = pos_of(&deep, "<", before + limits::SCHEMA_BRACKET_DEPTH);
    let d = load_with(&[("schema.cedarschema", &deep)]);
    assert_diag(
        &d,
        &format!("schema.cedarschema:{line}:{col}:"),
        &format!("the limit is {}", limits::SCHEMA_BRACKET_DEPTH),
    );
}

#[test]
fn file_sizes_are_bounded() {
    // A sparse inventory far over the limit: refused by its size, not read.
    let dir = demo_with_files(&[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("inventory.yaml"))
        .unwrap();
    f.set_len(64 << 30).unwrap();
    drop(f);
    let d = diagnostics(dir.path());
    assert_diag(
        &d,
        "inventory.yaml:1:1:",
        &format!("the limit is {} bytes", limits::INVENTORY_BYTES),
    );
    // A bundle file that is a device (endless) is refused without reading it.
    let dir = demo_with_files(&[]);
    std::fs::remove_file(dir.path().join("inventory.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("inventory.yaml")).unwrap();
    let d = diagnostics(dir.path());
    assert_diag(&d, "inventory.yaml:1:1:", "not a regular file (a device)");
    // A policy file just over its limit.
    let big = format!(
        "permit (principal, action, resource);\n//{}\n",
        "x".repeat(limits::POLICY_FILE_BYTES as usize)
    );
    let d = load_with(&[("big.cedar", &big)]);
    assert_diag(
        &d,
        "big.cedar:1:1:",
        &format!("the limit is {} bytes", limits::POLICY_FILE_BYTES),
    );
    // Invalid UTF-8 is located.
    let dir = demo_with_files(&[]);
    std::fs::write(
        dir.path().join("bad.cedar"),
        b"permit (principal, action, resource);\n// \xff\n",
    )
    .unwrap();
    let d = diagnostics(dir.path());
    assert_diag(&d, "bad.cedar:2:4:", "not valid UTF-8");
}

/// The deepest policies of several shapes that the limits allow: for each, the largest `n`
/// whose policy passes [`limits::check_cedar_text`] (the next one does not).
fn deepest_allowed() -> Vec<String> {
    type Shape = (&'static str, fn(usize) -> String);
    let shapes: [Shape; 5] = [
        ("parens", |n| {
            format!(
                "({}principal.ring == \"x\"{})",
                "(".repeat(n),
                ")".repeat(n)
            )
        }),
        ("and", |n| {
            vec!["principal.ring == \"x\""; n + 1].join(" && ")
        }),
        ("or", |n| {
            vec!["principal.ring == \"x\""; n + 1].join(" || ")
        }),
        ("if", |n| {
            format!(
                "{}false{}",
                "if principal.ring == \"x\" then ".repeat(n),
                " else false".repeat(n)
            )
        }),
        ("mixed", |n| {
            // Brackets and chains together: n levels of `(... || ... && ...)`.
            let mut s = String::from("principal.ring == \"x\"");
            for _ in 0..n {
                s = format!("({s} || principal.ring == \"y\" && principal.purpose == \"z\")");
            }
            s
        }),
    ];
    let policy = |id: &str, body: String| {
        format!("@id(\"{id}\")\nforbid (principal, action, resource) when {{ {body} }};\n")
    };
    let allowed = |text: &str| {
        limits::check_cedar_text(
            Path::new("x"),
            text,
            limits::CEDAR_BRACKET_DEPTH,
            limits::CEDAR_EXPR_DEPTH,
        )
        .is_none()
    };
    shapes
        .iter()
        .map(|(id, shape)| {
            let n = (1..10_000)
                .find(|&n| !allowed(&policy(id, shape(n))))
                .expect("every shape reaches a limit")
                - 1;
            assert!(n > 0, "{id}: not even one level is allowed");
            policy(id, shape(n))
        })
        .collect()
}

/// The deepest policies the limits let through load, compile and drop on a 2 MiB thread (a
/// tokio worker's stack; loading and compiling run on threads of their own), and are decided
/// on an 8 MiB one (the agent's main thread, where `explain` and risk recompiles evaluate),
/// in this (debug) build: the limits keep the agent's own threads safe.
#[test]
fn deep_policies_within_the_limits_are_safe_on_the_agents_threads() {
    for policy in deepest_allowed() {
        let dir = demo_with_files(&[("extra.cedar", &policy)]);
        let path = dir.path().to_path_buf();
        let bundle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let b = Bundle::load(&path).map_err(|d| d.to_string())?;
                let compiled = b.compile().map_err(|e| e.to_string())?;
                drop(compiled);
                Ok::<Bundle, String>(b)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{policy}"));
        let decided = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                let d = bundle.decide("acme-retriever", "acme-vectors", 6333, Protocol::Tcp);
                drop(bundle);
                d.map(|d| d.allowed).map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(decided, Ok(true), "{policy}");
    }
}

/// The same policies parsed and validated by Cedar directly on a 2 MiB thread: the limits
/// alone would keep even the parser within a tokio worker's stack (the loader's big stack is
/// the second line of defence).
#[test]
fn deep_policies_within_the_limits_parse_on_a_2_mib_thread() {
    let schema = std::fs::read_to_string(demo_dir().join("schema.cedarschema")).unwrap();
    for policy in deepest_allowed() {
        assert!(
            limits::check_cedar_text(
                Path::new("x"),
                &policy,
                limits::CEDAR_BRACKET_DEPTH,
                limits::CEDAR_EXPR_DEPTH
            )
            .is_none(),
            "not within the limits: {policy}"
        );
        let schema = schema.clone();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || exercise_cedar(&schema, &policy))
            .unwrap()
            .join()
            .unwrap();
    }
}

/// Everything the PDP does with a policy's text, on the current thread.
fn exercise_cedar(schema: &str, policy: &str) {
    use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};
    let (schema, _) = Schema::from_cedarschema_str(schema).unwrap();
    let pset = PolicySet::from_str(policy).unwrap();
    let core = cedar_policy_core::parser::parse_policyset(policy).unwrap();
    for p in pset.policies() {
        let _ = p.to_json().unwrap();
    }
    let v = Validator::new(schema).validate(&pset, ValidationMode::Strict);
    let errors: Vec<String> = v.validation_errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    drop((pset, core));
}

/// Measures how deep Cedar can go: `DEPTH=N KIND=parens|and|if STACK_MIB=2 cargo test -p
/// enforcer-policy measure_cedar_depth -- --ignored --nocapture` parses, validates and
/// evaluates such a policy (bypassing the limits) on a thread of that stack; it crashes
/// (stack overflow) or reports Cedar's own "recursion limit" when N is too deep. Not a test:
/// the tool that chose the limits (see `limits`).
#[test]
#[ignore]
fn measure_cedar_depth() {
    use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};
    let n: usize = std::env::var("DEPTH").unwrap().parse().unwrap();
    let kind = std::env::var("KIND").unwrap();
    let stack: usize = std::env::var("STACK_MIB").map_or(2, |s| s.parse().unwrap());
    let policy = match kind.as_str() {
        "parens" => format!(
            "forbid (principal, action, resource) when {{ {}principal.ring == \"x\"{} }};",
            "(".repeat(n),
            ")".repeat(n)
        ),
        "and" => format!(
            "forbid (principal, action, resource) when {{ {} }};",
            vec!["principal.ring == \"prod\""; n].join(" && ")
        ),
        "if" => format!(
            "forbid (principal, action, resource) when {{ {}false{} }};",
            "if principal.ring == \"prod\" then ".repeat(n),
            " else false".repeat(n)
        ),
        other => panic!("KIND {other}"),
    };
    let schema = std::fs::read_to_string(demo_dir().join("schema.cedarschema")).unwrap();
    let out = std::thread::Builder::new()
        .stack_size(stack << 20)
        .spawn(move || {
            exercise_cedar(&schema, &policy);
            let entities = Entities::from_json_str(
                r#"[{"uid": {"type": "Workload", "id": "w"}, "attrs": {"tenant": "t", "purpose": "p", "ring": "prod", "spiffe_id": "", "risk": {"__extn": {"fn": "decimal", "arg": "0.0"}}}, "parents": []}]"#,
                None,
            )
            .unwrap();
            let w = EntityUid::from_str(r#"Workload::"w""#).unwrap();
            let a = EntityUid::from_str(r#"Action::"connect""#).unwrap();
            let request = Request::new(w.clone(), a, w, Context::empty(), None).unwrap();
            let pset = cedar_policy::PolicySet::from_str(&policy).unwrap();
            let response = Authorizer::new().is_authorized(&request, &pset, &entities);
            response
                .diagnostics()
                .errors()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!("{kind} {n} on {stack} MiB: survived; evaluation errors: {out:?}");
}

// ---------------------------------------------------------------------------------------------
// Fault 9: every problem, in one run, named by @id.

#[test]
fn every_problem_of_a_file_is_reported_and_named_by_id() {
    // Fault 9 as found: an unknown ATLAS id hid the attribute typo in the same file.
    let policy = "\
@id(\"typo\")
@atlas(\"AML.T9999\")
forbid (principal, action, resource)
when { principal.purpse == \"evaluation\" };
";
    let d = load_with(&[("x.cedar", policy)]);
    assert_diag(&d, "x.cedar:2:1:", "unknown ATLAS technique `AML.T9999`");
    let (line, col) = pos_of(policy, "principal.purpse", 0);
    assert_diag(&d, &format!("x.cedar:{line}:{col}:"), "for policy `typo`");
    assert!(
        !d.iter().any(|d| d.contains("x.cedar:policy")),
        "a policy with an @id is named by it:\n{}",
        d.join("\n")
    );
    // And a policy without one keeps its file-based name.
    let d = load_with(&[(
        "x.cedar",
        "permit (principal, action, resource) when { principal.purpse == \"x\" };\n",
    )]);
    assert_diag(&d, "x.cedar:1:", "for policy `x.cedar:policy0`");
}

#[test]
fn every_problem_of_every_file_is_reported() {
    // In one run: a syntax error in one file, a validation error in another, a schema-bound
    // inventory problem (an undeclared action) and an inventory-only problem (an unknown
    // tenant) in the inventory.
    let inv = inventory_edit(
        "  - name: acme-evaluator\n    tenant: acme\n",
        "  - name: acme-evaluator\n    tenant: umbrella\n",
    );
    let inv = inv.replacen(
        "ports: [{port: 6333, protocol: tcp, action: query}]\n    datasets: [globex-kb]",
        "ports: [{port: 6333, protocol: tcp, action: teleport}]\n    datasets: [globex-kb]",
        1,
    );
    let (tl, tc) = pos_of(&inv, "umbrella", 0);
    let (al, ac) = pos_of(&inv, "teleport", 0);
    let d = load_with(&[
        ("inventory.yaml", &inv),
        ("a.cedar", "permit (principal, action resource);\n"),
        (
            "b.cedar",
            "@id(\"b\")\npermit (principal, action, resource) when { resource.colour == \"x\" };\n",
        ),
    ]);
    assert_diag(
        &d,
        &format!("inventory.yaml:{tl}:{tc}:"),
        "unknown tenant `umbrella`",
    );
    assert_diag(
        &d,
        &format!("inventory.yaml:{al}:{ac}:"),
        "action `teleport` is not declared in the schema",
    );
    assert_diag(&d, "a.cedar:1:", "");
    assert_diag(&d, "b.cedar:2:", "for policy `b`");
}

#[test]
fn the_list_of_problems_is_bounded() {
    let mut inv = String::from("tenants: [acme]\nworkloads:\n");
    for i in 0..3000 {
        inv += &format!("  - {{name: w{i}, tenant: acme, colour: red}}\n");
    }
    let d = load_with(&[("inventory.yaml", &inv)]);
    assert_eq!(d.len(), limits::DIAGNOSTICS + 1, "{}", d[..5].join("\n"));
    assert!(
        d.last().unwrap().contains("2000 more problems not listed"),
        "{:?}",
        d.last()
    );
}

#[test]
fn unknown_annotations_are_errors() {
    let policy = "@id(\"q\")\n@description(\"for people\")\n  @quarantin\nforbid (principal, action, resource) when { principal.risk.greaterThan(decimal(\"0.9\")) };\n";
    let d = load_with(&[("extra.cedar", policy)]);
    assert_diag(&d, "extra.cedar:3:3:", "unknown annotation `@quarantin`");
    assert_eq!(d.len(), 1, "{}", d.join("\n"));
}

/// Text built from the characters that matter to the readers, and any other.
fn hostile_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let pieces = proptest::sample::select(vec![
        "(", ")", "[", "]", "{", "}", "<", ">", "\"", "\\", "//", "\n", ";", ",", ":", "::", "&&",
        "||", "!", "-", ".", "+", "*", "=", "if ", " then ", " else ", " in ", " has ", "is", "a",
        "1", " ", "é", "&", "*a", "&a ", "- ", "---\n", "? ", "!!str ", "|\n", "'",
    ])
    .prop_map(str::to_string);
    let any_char = any::<char>().prop_map(|c| c.to_string());
    proptest::collection::vec(prop_oneof![pieces, any_char], 0..200).prop_map(|v| v.concat())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// The pre-parse checks and the YAML reader never panic, whatever the text.
    #[test]
    fn the_bounded_readers_never_panic(text in hostile_text()) {
        let p = Path::new("x");
        let _ = limits::check_cedar_text(p, &text, 4, 8);
        let _ = limits::check_schema_text(p, &text, 4);
        let _ = crate::Inventory::parse(p, &text);
    }
}

/// The depth of Cedar's own tree for a policy (from its JSON form: each operator object is
/// one node; literals and variables are leaves).
fn tree_depth(v: &serde_json::Value) -> usize {
    use serde_json::Value as J;
    let inner = |v: &J| match v {
        J::Object(m) => m.values().map(tree_depth).max().unwrap_or(0),
        J::Array(a) => a.iter().map(tree_depth).max().unwrap_or(0),
        _ => 0,
    };
    match v {
        J::Object(m) if m.len() == 1 => {
            let (k, x) = m.iter().next().unwrap();
            match k.as_str() {
                "Value" | "Var" | "Slot" | "Unknown" => 0,
                _ => 1 + inner(x),
            }
        }
        J::Object(m) => m.values().map(tree_depth).max().unwrap_or(0),
        J::Array(a) => a.iter().map(tree_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The smallest expression-depth limit `text` passes: the estimate of `check_cedar_text`.
fn estimate(text: &str) -> usize {
    (0..10_000)
        .find(|&max| limits::check_cedar_text(Path::new("x"), text, usize::MAX, max).is_none())
        .unwrap()
}

/// Random Cedar expressions, written without the brackets their shape would need: Cedar's
/// precedence decides the tree.
fn expression() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let leaf = proptest::sample::select(vec![
        "true",
        "1",
        "\"s\"",
        "principal",
        "context.port",
        "principal.ring",
        "Workload::\"w\"",
    ])
    .prop_map(str::to_string);
    leaf.prop_recursive(6, 64, 3, |e| {
        prop_oneof![
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} && {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} || {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} == {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} != {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} >= {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} + {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} - {b}")),
            e.clone().prop_map(|a| format!("{a} * 2")),
            e.clone().prop_map(|a| format!("!{a}")),
            e.clone().prop_map(|a| format!("-{a}")),
            e.clone().prop_map(|a| format!("{a}.tenant")),
            e.clone().prop_map(|a| format!("{a} has tenant")),
            e.clone().prop_map(|a| format!("{a} like \"x*\"")),
            e.clone()
                .prop_map(|a| format!("{a} is Workload in Workload::\"w\"")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{a} in {b}")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("[{a}, {b}].contains({a})")),
            (e.clone(), e.clone()).prop_map(|(a, b)| format!("{{x: {a}, y: [{b}]}}")),
            (e.clone(), e.clone(), e.clone())
                .prop_map(|(a, b, c)| format!("if {a} then {b} else {c}")),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

    /// The text estimate is never below the depth of the tree Cedar builds: the limit bounds
    /// the real recursion.
    #[test]
    fn the_depth_estimate_is_from_above(body in expression()) {
        let text = format!("permit (principal, action, resource) when {{ {body} }};");
        if let Ok(set) = cedar_policy::PolicySet::from_str(&text) {
            for p in set.policies() {
                let json = p.to_json().unwrap();
                let real = json
                    .get("conditions")
                    .map(tree_depth)
                    .unwrap_or(0);
                let est = estimate(&text);
                proptest::prop_assert!(est >= real, "estimate {est} < tree depth {real}: {body}");
            }
        }
    }
}

/// Found by the `inventory` fuzz target (fuzz/seeds/inventory/crash-yaml-error-past-the-end):
/// a syntax error at the end of a file without a final newline was located on the line after
/// the last one. Every location names a place the file has.
#[test]
fn a_yaml_error_at_the_end_of_the_file_is_located_inside_it() {
    for (text, want) in [
        ("tenants: [acm", "inventory.yaml:1:14:"),
        (
            "tenants: [acme]\nworkloads: [\n  {name: x",
            "inventory.yaml:3:11:",
        ),
    ] {
        let diags = load_with(&[("inventory.yaml", text)]);
        assert_diag(&diags, want, "YAML syntax error");
    }
}

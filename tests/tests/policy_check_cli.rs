//! `enforcer policy check DIR` as an operator runs it (no kernel needed): the shipped demo
//! bundle is clean (exit 0, "ok"); a copy with several mistakes at once lists every one of
//! them as `file:line:column: error: message`, at the exact line where it was introduced,
//! and exits 1.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{copy_bundle, enforcer, line_of, parse_diagnostics, Diag};
use enforcer_tests::fixtures::demo_policies_dir;

/// Replaces exactly one occurrence of `from` in `dir/name` with `to`; returns the new text.
fn edit(dir: &Path, name: &str, from: &str, to: &str) -> Result<String> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {name}"))?;
    ensure!(
        text.matches(from).count() == 1,
        "fixture: {from:?} must occur exactly once in the demo's {name}"
    );
    let new = text.replacen(from, to, 1);
    std::fs::write(&path, &new).with_context(|| format!("write {name}"))?;
    Ok(new)
}

/// The 1-based line of the first occurrence of `needle` at or after byte `from` of `text`.
fn line_after(text: &str, from: &str, needle: &str) -> Option<u32> {
    let start = text.find(from)?;
    let at = start + text[start..].find(needle)?;
    Some(text[..at].matches('\n').count() as u32 + 1)
}

fn file_name(d: &Diag) -> String {
    Path::new(&d.file)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Asserts one diagnostic for `file` at `line` whose message mentions every word of `what`
/// (case-insensitive), with a column inside that line.
fn expect_diag<'a>(
    diags: &'a [Diag],
    dir: &Path,
    file: &str,
    line: u32,
    what: &[&str],
    stderr: &str,
) -> Result<&'a Diag> {
    let text = std::fs::read_to_string(dir.join(file))?;
    let line_len = text
        .lines()
        .nth(line as usize - 1)
        .map(|l| l.chars().count())
        .unwrap_or(0) as u32;
    let found = diags.iter().find(|d| {
        file_name(d) == file && d.line == line && {
            let m = d.message.to_lowercase();
            what.iter().all(|w| m.contains(&w.to_lowercase()))
        }
    });
    let d = found.with_context(|| {
        format!(
            "no `{file}:{line}:<col>: error:` diagnostic mentioning {what:?}; all diagnostics:\n{stderr}"
        )
    })?;
    ensure!(
        d.column >= 1 && d.column <= line_len + 1,
        "{file}:{line}: column {} is outside the line ({line_len} chars): {d:?}",
        d.column
    );
    Ok(d)
}

/// Every diagnostic (message and hints) stands on its own lines: nothing else, such as the
/// closing summary that names the bundle dir, is glued onto it.
fn well_formed(diags: &[Diag], dir: &Path, stderr: &str) -> Result<()> {
    let dir = dir.display().to_string();
    for d in diags {
        ensure!(
            !d.message.contains(&dir) && !d.hints.iter().any(|h| h.contains(&dir)),
            "a diagnostic has other output glued onto its line (a missing newline?): {d:?}\nstderr:\n{stderr}"
        );
    }
    Ok(())
}

#[test]
fn clean_demo_bundle_passes() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let out = enforcer(&["policy".as_ref(), "check".as_ref(), dir.path().as_os_str()])?;
    ensure!(
        out.success(),
        "policy check of the clean demo failed: {out}"
    );
    ensure!(
        out.stdout.contains("ok"),
        "policy check of the clean demo: no \"ok\" on stdout: {out}"
    );
    ensure!(
        parse_diagnostics(&out.stderr).is_empty(),
        "clean demo: diagnostics on stderr: {out}"
    );
    Ok(())
}

#[test]
fn several_mistakes_at_once_are_all_reported_with_their_lines() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let d = dir.path();

    // 1. An unknown tenant in the inventory.
    let inv = edit(
        d,
        "inventory.yaml",
        "  - name: acme-evaluator\n    tenant: acme\n",
        "  - name: acme-evaluator\n    tenant: umbrella\n",
    )?;
    let tenant_line = line_of(&inv, "tenant: umbrella").expect("just written");

    // 2. A Cedar syntax error (a missing comma) in a policy appended to baseline.cedar.
    let base_path = d.join("baseline.cedar");
    let mut base = std::fs::read_to_string(&base_path)?;
    base.push_str("\n@id(\"broken-syntax\")\npermit (principal, action resource);\n");
    std::fs::write(&base_path, &base)?;
    let syntax_line = line_of(&base, "permit (principal, action resource)").expect("just written");

    // 3. An ATLAS technique that does not exist.
    let purpose = edit(
        d,
        "purpose.cedar",
        "@atlas(\"AML.T0020\")",
        "@atlas(\"AML.T9999\")",
    )?;
    let atlas_line = line_of(&purpose, "AML.T9999").expect("just written");

    let out = enforcer(&["policy".as_ref(), "check".as_ref(), d.as_os_str()])?;
    ensure!(
        out.code == Some(1),
        "policy check of a broken bundle: want exit 1: {out}"
    );
    let diags = parse_diagnostics(&out.stderr);
    eprintln!("policy check stderr:\n{}", out.stderr);
    well_formed(&diags, d, &out.stderr)?;
    expect_diag(
        &diags,
        d,
        "inventory.yaml",
        tenant_line,
        &["umbrella"],
        &out.stderr,
    )?;
    expect_diag(&diags, d, "baseline.cedar", syntax_line, &[], &out.stderr)?;
    let atlas = expect_diag(
        &diags,
        d,
        "purpose.cedar",
        atlas_line,
        &["AML.T9999"],
        &out.stderr,
    )?;
    ensure!(
        !atlas.hints.is_empty(),
        "the unknown ATLAS id has no `  hint:` line: {atlas:?}\n{}",
        out.stderr
    );
    // Nothing else is blamed: every diagnostic is at one of the lines we broke.
    let ours = [
        ("inventory.yaml", tenant_line),
        ("baseline.cedar", syntax_line),
        ("purpose.cedar", atlas_line),
    ];
    let stray: Vec<&Diag> = diags
        .iter()
        .filter(|x| !ours.contains(&(file_name(x).as_str(), x.line)))
        .collect();
    ensure!(
        stray.is_empty(),
        "diagnostics at lines nobody broke: {stray:?}\n{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn inventory_and_strict_validation_classes_are_located() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let d = dir.path();

    // A duplicate workload name (the second definition is the mistake).
    let inv = edit(
        d,
        "inventory.yaml",
        "  - name: initech-batch\n",
        "  - name: acme-retriever\n",
    )?;
    let dup_line = line_after(&inv, "ns/globex/sa/agent", "- name: acme-retriever").expect("dup");
    // An address claimed by two tenants: globex-vectors takes acme-vectors' IP.
    let inv = edit(
        d,
        "inventory.yaml",
        "    kind: vector_db\n    ips: [127.10.2.10/32]\n",
        "    kind: vector_db\n    ips: [127.10.1.10/32]\n",
    )?;
    let ip_line = line_after(&inv, "name: globex-vectors", "127.10.1.10/32").expect("ip");
    // A SPIFFE ID with a `..` path segment.
    let inv = edit(
        d,
        "inventory.yaml",
        "spiffe://cluster.local/ns/acme/sa/evaluator",
        "spiffe://cluster.local/ns/acme/../evaluator",
    )?;
    let spiffe_line = line_of(&inv, "ns/acme/../evaluator").expect("spiffe");
    // A port out of range.
    let inv = edit(
        d,
        "inventory.yaml",
        "    ips: [127.10.1.2/32]\n    ports: [{port: 8000,",
        "    ips: [127.10.1.2/32]\n    ports: [{port: 70000,",
    )?;
    let port_line = line_of(&inv, "port: 70000").expect("port");
    // Strict validation: an attribute the schema does not have.
    let purpose = edit(
        d,
        "purpose.cedar",
        "principal.purpose == \"evaluation\"",
        "principal.purpos == \"evaluation\"",
    )?;
    let attr_line = line_of(&purpose, "principal.purpos ==").expect("attr");

    let out = enforcer(&["policy".as_ref(), "check".as_ref(), d.as_os_str()])?;
    eprintln!("policy check stderr:\n{}", out.stderr);
    ensure!(
        out.code == Some(1),
        "policy check of a broken bundle: want exit 1: {out}"
    );
    let diags = parse_diagnostics(&out.stderr);
    well_formed(&diags, d, &out.stderr)?;
    let mut missing = Vec::new();
    for (file, line, what) in [
        ("inventory.yaml", dup_line, "duplicate workload name"),
        ("inventory.yaml", ip_line, "address claimed by two tenants"),
        ("inventory.yaml", spiffe_line, "invalid SPIFFE ID"),
        ("inventory.yaml", port_line, "port out of range"),
        (
            "purpose.cedar",
            attr_line,
            "unknown attribute (strict validation)",
        ),
    ] {
        if let Err(e) = expect_diag(&diags, d, file, line, &[], &out.stderr) {
            missing.push(format!("{what}: {e:#}"));
        }
    }
    ensure!(
        missing.is_empty(),
        "{} of 5 mistakes not reported at their line:\n{}",
        missing.len(),
        missing.join("\n")
    );
    Ok(())
}

/// Runs `policy check` on `dir`: it must exit 1 (an exit, not a crash or a hang) and print
/// well-formed diagnostics; returns them with the stderr.
fn check_rejects(dir: &Path) -> Result<(Vec<Diag>, String)> {
    let out = enforcer(&["policy".as_ref(), "check".as_ref(), dir.as_os_str()])?;
    eprintln!("policy check stderr:\n{}", out.stderr);
    ensure!(
        out.code == Some(1),
        "policy check of a broken bundle: want exit 1: {out}"
    );
    let diags = parse_diagnostics(&out.stderr);
    well_formed(&diags, dir, &out.stderr)?;
    Ok((diags, out.stderr))
}

/// Asserts a diagnostic at exactly `file:line:column` whose message contains `what`.
fn expect_at(
    diags: &[Diag],
    file: &str,
    (line, column): (u32, u32),
    what: &str,
    stderr: &str,
) -> Result<()> {
    ensure!(
        diags.iter().any(|d| file_name(d) == file
            && d.line == line
            && d.column == column
            && d.message.contains(what)),
        "no `{file}:{line}:{column}: error: ...{what}...`; all diagnostics:\n{stderr}"
    );
    Ok(())
}

/// 1-based line and column of the `n`th (0-based) `needle` in `text`.
fn position(text: &str, needle: &str, n: usize) -> (u32, u32) {
    let at = text
        .match_indices(needle)
        .nth(n)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("fixture: {needle:?} #{n} not found"));
    let line = text[..at].matches('\n').count() as u32 + 1;
    let col = text[..at]
        .rsplit('\n')
        .next()
        .map_or(0, |l| l.chars().count()) as u32
        + 1;
    (line, col)
}

/// Issue 6, fault 6: a `---` before `endpoints:` made every endpoint vanish while `check`
/// said ok. Now: the second document is an error at the `---`.
#[test]
fn a_second_yaml_document_is_an_error() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let d = dir.path();
    let inv = edit(d, "inventory.yaml", "\nendpoints:\n", "\n---\nendpoints:\n")?;
    let (diags, stderr) = check_rejects(d)?;
    expect_at(
        &diags,
        "inventory.yaml",
        (line_of(&inv, "---").expect("just written"), 1),
        "a second YAML document starts here",
        &stderr,
    )
}

/// Issue 6, fault 2: an IPv4-mapped spelling was kept as IPv6 (IPv4 traffic to it judged
/// WORLD, and no conflict seen). Now it is the IPv4 address: taking another tenant's address
/// that way is the conflict it is, at the address.
#[test]
fn a_mapped_spelling_is_the_ipv4_address() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let d = dir.path();
    let inv = edit(
        d,
        "inventory.yaml",
        "    kind: vector_db\n    ips: [127.10.2.10/32]\n",
        "    kind: vector_db\n    ips: [\"::ffff:127.10.1.10\"]\n",
    )?;
    let (diags, stderr) = check_rejects(d)?;
    expect_at(
        &diags,
        "inventory.yaml",
        position(&inv, "\"::ffff:127.10.1.10\"", 0),
        "127.10.1.10/32 is already claimed by `acme-vectors`",
        &stderr,
    )?;
    // Alone, the mapped spelling is accepted.
    let dir = copy_bundle(&demo_policies_dir())?;
    edit(
        dir.path(),
        "inventory.yaml",
        "    kind: vector_db\n    ips: [127.10.2.10/32]\n",
        "    kind: vector_db\n    ips: [\"::ffff:127.10.2.10\"]\n",
    )?;
    let out = enforcer(&["policy".as_ref(), "check".as_ref(), dir.path().as_os_str()])?;
    ensure!(out.success(), "{out}");
    Ok(())
}

/// Issue 6, fault 7: a few hundred bytes of YAML aliases, 200 nested parentheses or a long
/// `&&` chain made `check` (and a reloading agent) allocate until killed or overflow its
/// stack. Now each is an error naming the limit, at the place it is exceeded.
#[test]
fn hostile_inputs_are_errors_not_crashes() -> Result<()> {
    // 9 levels of 9 aliases.
    let dir = copy_bundle(&demo_policies_dir())?;
    let mut inv = String::from("a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        inv += &format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        );
    }
    std::fs::write(dir.path().join("inventory.yaml"), &inv)?;
    let (diags, stderr) = check_rejects(dir.path())?;
    // Lines a-f come to 1,345,213 nodes (aliases and anchors count their copies), line g's
    // key and list to 1,345,215, and each *f adds 597,871: the second passes 2,000,000.
    expect_at(
        &diags,
        "inventory.yaml",
        position(&inv, "*f", 1),
        "grows past 2000000 YAML nodes",
        &stderr,
    )?;

    // 200 nested parentheses: the 24th inside `when {` is the 25th bracket.
    let dir = copy_bundle(&demo_policies_dir())?;
    let policy = format!(
        "@id(\"deep\")\nforbid (principal, action, resource)\nwhen {{ {}true{} }};\n",
        "(".repeat(200),
        ")".repeat(200)
    );
    std::fs::write(dir.path().join("deep.cedar"), &policy)?;
    let (diags, stderr) = check_rejects(dir.path())?;
    expect_at(
        &diags,
        "deep.cedar",
        position(&policy, "(", 2 + 23),
        "brackets nest 25 deep here; the limit is 24",
        &stderr,
    )?;

    // A 50,000-long `&&` chain. Levels: the scope's `(...)` 1, so `{` opens at 2; `.` 3,
    // `==` 4, then one per `&&`: the 61st is level 65, past the limit of 64.
    let dir = copy_bundle(&demo_policies_dir())?;
    let policy = format!(
        "permit (principal, action, resource)\nwhen {{ principal.ring == \"prod\" && {} }};\n",
        vec!["true"; 50_000].join(" && ")
    );
    std::fs::write(dir.path().join("chain.cedar"), &policy)?;
    let (diags, stderr) = check_rejects(dir.path())?;
    expect_at(
        &diags,
        "chain.cedar",
        position(&policy, "&&", 60),
        "the expression nests about 65 levels deep here; the limit is 64",
        &stderr,
    )
}

/// Issue 6, fault 9: an unknown ATLAS id hid an attribute typo of the same file. Now both
/// are reported in one run, and the policy is named by its `@id`.
#[test]
fn every_problem_of_a_file_in_one_run_named_by_id() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let policy = "@id(\"typo\")\n@atlas(\"AML.T9999\")\nforbid (principal, action, resource)\nwhen { principal.purpse == \"evaluation\" };\n";
    std::fs::write(dir.path().join("x.cedar"), policy)?;
    let (diags, stderr) = check_rejects(dir.path())?;
    expect_at(
        &diags,
        "x.cedar",
        (2, 1),
        "unknown ATLAS technique `AML.T9999`",
        &stderr,
    )?;
    expect_at(
        &diags,
        "x.cedar",
        position(policy, "principal.purpse", 0),
        "for policy `typo`",
        &stderr,
    )?;
    ensure!(
        !stderr.contains("x.cedar:policy"),
        "a policy with an @id is named by its file position:\n{stderr}"
    );
    Ok(())
}

/// Issue 6, fault 6's sibling: a policy file the loader does not read (`policy.Cedar`,
/// `x.cedar.bak`) is an error, not a policy silently out of force.
#[test]
fn files_that_are_not_read_are_errors() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    for name in ["policy.Cedar", "x.cedar.bak"] {
        std::fs::write(
            dir.path().join(name),
            "forbid (principal, action, resource);\n",
        )?;
    }
    let (diags, stderr) = check_rejects(dir.path())?;
    for name in ["policy.Cedar", "x.cedar.bak"] {
        expect_at(
            &diags,
            name,
            (1, 1),
            &format!("`{name}` is not a bundle file"),
            &stderr,
        )?;
    }
    Ok(())
}

/// A compile-stage error (a policy whose `context.port` test needs more kernel entries than a
/// destination may take) is printed as a validation problem is: once, at the policy's
/// `file:line:column`, with the summary line; it came out as `error: compiling DIR: FILE:L:C:
/// error: ...`, with no summary (red-team review 40 M4).
#[test]
fn a_compile_stage_error_is_located_and_summarised() -> Result<()> {
    let dir = copy_bundle(&demo_policies_dir())?;
    let text = "@id(\"wide\")\nforbid (principal, action, resource)\nwhen { context.port > 1000 && context.port <= 60000 };\n";
    std::fs::write(dir.path().join("wide.cedar"), text)?;
    let (diags, stderr) = check_rejects(dir.path())?;
    expect_at(
        &diags,
        "wide.cedar",
        position(text, "context.port > 1000", 0),
        "policy `wide` reads context.port in a way that needs",
        &stderr,
    )?;
    ensure!(
        diags.len() == 1
            && !stderr.contains("compiling")
            && stderr.matches(": error: ").count() == 1
            && stderr.contains("1 problem(s); nothing was applied"),
        "{stderr}"
    );
    Ok(())
}

/// Runs `enforcer ARGS` with standard output (`stdout_closed`) or standard error a pipe whose
/// reader is gone before the command starts, as under `| head` once `head` has had its lines;
/// the other stream piped. Returns the exit code and what the other stream carried.
fn with_a_closed_pipe(args: &[&str], stdout_closed: bool) -> Result<(Option<i32>, String)> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut cmd = Command::new(enforcer_tests::agent::enforcer_bin());
    cmd.args(args).stdin(Stdio::null());
    if stdout_closed {
        cmd.stdout(writer).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::piped()).stderr(writer);
    }
    let mut child = enforcer_tests::util::ChildGuard::new(cmd.spawn()?);
    let mut other = String::new();
    let stream: &mut dyn Read = match stdout_closed {
        true => child.child().stderr.as_mut().context("stderr")?,
        false => child.child().stdout.as_mut().context("stdout")?,
    };
    stream.read_to_string(&mut other)?;
    let status = child.wait_timeout(std::time::Duration::from_secs(30))?;
    Ok((status.code(), other))
}

/// A reader that stops early (`enforcer policy explain ... | head -1`, `policy check DIR 2>&1
/// | head`) ends a one-shot command quietly: success when standard output closed, failure
/// (the command's own) when standard error closed on the way to a failure; never the panic
/// `println!` raises on `EPIPE` (exit 101, "failed printing to stdout").
#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() -> Result<()> {
    let demo = demo_policies_dir();
    let demo = demo.to_str().context("demo path")?;
    let nowhere = enforcer_tests::TempDir::new("closed-pipe")?;
    let pins = nowhere.path().to_str().context("path")?;
    for args in [
        vec!["policy", "check", demo],
        vec![
            "policy",
            "explain",
            demo,
            "--from",
            "acme-retriever",
            "--to",
            "acme-vectors",
            "--port",
            "6333",
            "--pin-path",
            pins,
        ],
    ] {
        let (code, stderr) = with_a_closed_pipe(&args, true)?;
        ensure!(
            code == Some(0) && !stderr.contains("panicked"),
            "{args:?} with standard output closed: exit {code:?}, stderr {stderr}"
        );
    }
    let bad = copy_bundle(&demo_policies_dir())?;
    std::fs::write(
        bad.path().join("broken.cedar"),
        "permit (principal, action, resource) when { nope };\n",
    )?;
    let bad = bad.path().to_str().context("path")?;
    let (code, stdout) = with_a_closed_pipe(&["policy", "check", bad], false)?;
    ensure!(
        code == Some(1),
        "a failing check with standard error closed: exit {code:?} (want 1), stdout {stdout}"
    );
    Ok(())
}

//! Identity on the wire against a real vector database (issue 7, "How it is shown"): Chroma
//! (`chroma run`, from PyPI; `cargo xtask test` installs it) serves `acme-vectors` on
//! `127.95.0.2:8000` inside a network namespace the test creates, from a cgroup of the
//! enforced subtree, with ingress `enforce`. Clients are Chroma's own Python client, run in
//! the same namespace from the workloads' cgroups, passing embeddings themselves (no model).
//!
//! - acme-retriever and acme-indexer (tenant acme) upsert and query: results come back;
//! - globex-retriever's connect is denied on the client side (EPERM, `tenant_mismatch`);
//! - a client no enforcer manages (untagged) is dropped at the DB's ingress, with an event;
//! - `enforcer flows --to acme-vectors` lists, for each of the server's own established
//!   sockets (read from the server's `/proc/PID/net/tcp`, as `ss -tnp` shows them), a
//!   server-side row with that exact 4-tuple naming the workload and tenant whose client holds
//!   the other end; so nothing but the acme clients reached the server;
//! - when acme-indexer exits, its rows leave the listing (the server's sockets closed), and
//!   acme-retriever's stay.
//!
//! Addresses: 127.95.0.0/16 only, inside the test's own namespace; names start with `vd`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::chroma::{self, tcp_sockets, ChromaClient, ChromaServer, TCP_ESTABLISHED};
use enforcer_tests::cli::enforcer;
use enforcer_tests::fixtures::SCHEMA;
use enforcer_tests::util::wait_until;
use enforcer_tests::{
    require, require_kernel, unique_name, Agent, AgentConfig, NetNs, Outcome, PinDir, PolicyBundle,
    Probe, TempDir, TestCgroup,
};
use serde_json::Value;

const SERVER: &str = "127.95.0.2:8000";
const KEY: &str = "1 00112233445566778899aabbccddeeff";
const WAIT: Duration = Duration::from_secs(10);

const POLICIES: &str = r#"@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };

@id("tenant-isolation")
@atlas("AML.T0085.000")
forbid (principal, action, resource)
when { resource has tenant && principal.tenant != resource.tenant };
"#;

fn inventory(root: &TestCgroup) -> String {
    let root = root.relative_str();
    format!(
        r#"tenants: [acme, globex]
workloads:
  - name: acme-retriever
    tenant: acme
    purpose: retrieval
    ring: prod
    cgroups: [{root}/acme-retriever]
  - name: acme-indexer
    tenant: acme
    purpose: feature-extraction
    ring: prod
    cgroups: [{root}/acme-indexer]
  - name: globex-retriever
    tenant: globex
    purpose: retrieval
    ring: prod
    cgroups: [{root}/globex-retriever]
endpoints:
  - name: acme-vectors
    tenant: acme
    kind: vector_db
    ips: [127.95.0.2/32]
    ports: [{{port: 8000, protocol: tcp, action: query}}]
    datasets: [acme-kb]
    ingress: enforce
"#
    )
}

/// `enforcer flows --to acme-vectors --json`, server-side rows only: (client, server) ->
/// the row.
fn server_rows(pins: &PinDir) -> Result<BTreeMap<(String, String), Value>> {
    let out = enforcer(&[
        "flows",
        "--pin-path",
        pins.path().to_str().context("pin path")?,
        "--to",
        "acme-vectors",
        "--json",
    ])?;
    ensure!(out.success(), "enforcer flows failed: {}", out.stderr);
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).context(out.stdout.clone())?;
    Ok(rows
        .into_iter()
        .filter(|r| r["side"] == "server")
        .map(|r| {
            let key = (
                r["source"].as_str().unwrap_or_default().to_string(),
                r["destination"].as_str().unwrap_or_default().to_string(),
            );
            (key, r)
        })
        .collect())
}

/// What the listing must say: for each of the server's established sockets, the workload
/// whose client process holds the other end. Fails if an end belongs to none of `clients`.
fn expected(
    server: &ChromaServer,
    clients: &[(&str, &ChromaClient)],
) -> Result<BTreeMap<(String, String), String>> {
    let mut owner = BTreeMap::new();
    for (name, client) in clients {
        for s in tcp_sockets(client.pid())? {
            if s.state == TCP_ESTABLISHED && s.remote == server.addr() {
                owner.insert(s.local, *name);
            }
        }
    }
    let mut want = BTreeMap::new();
    for s in server.connections()? {
        let name = owner.get(&s.remote).with_context(|| {
            format!(
                "the server holds a connection from {} that none of {:?} has",
                s.remote,
                clients.iter().map(|c| c.0).collect::<Vec<_>>()
            )
        })?;
        want.insert(
            (s.remote.to_string(), s.local.to_string()),
            name.to_string(),
        );
    }
    Ok(want)
}

/// Polls until the server-side rows are exactly `want` (4-tuple -> workload), each naming the
/// acme tenant, the DB and its dataset, with the server socket's cookie.
fn expect_rows(pins: &PinDir, want: &BTreeMap<(String, String), String>) -> Result<()> {
    let mut rows = BTreeMap::new();
    let same = |rows: &BTreeMap<(String, String), Value>| {
        rows.keys().collect::<BTreeSet<_>>() == want.keys().collect::<BTreeSet<_>>()
    };
    wait_until(WAIT, Duration::from_millis(50), || {
        rows = server_rows(pins).unwrap_or_default();
        same(&rows)
    });
    ensure!(
        same(&rows),
        "server-side rows {:?}, want the server's sockets {want:?}",
        rows.keys().collect::<Vec<_>>()
    );
    for (tuple, name) in want {
        let r = &rows[tuple];
        ensure!(r["subject"]["name"] == name.as_str(), "{tuple:?}: {r}");
        ensure!(r["subject"]["tenant"] == "acme", "{r}");
        ensure!(r["to"]["name"] == "acme-vectors", "{r}");
        ensure!(r["state"] == "established", "{r}");
        ensure!(r["dataset_scope"] == serde_json::json!(["acme-kb"]), "{r}");
        ensure!(r["cookie"].as_u64().unwrap_or(0) != 0, "{r}");
    }
    Ok(())
}

#[test]
fn chroma_serves_only_the_allowed_tenant_and_flows_names_the_tenant_behind_each_connection(
) -> Result<()> {
    if !require_kernel() || !require("chroma", chroma::unavailable_reason()) {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("vd"))?;
    let node = root.child("node")?;
    let retriever_cg = node.child("acme-retriever")?;
    let indexer_cg = node.child("acme-indexer")?;
    let globex_cg = node.child("globex-retriever")?;
    let db_cg = node.child("acme-vectors")?;
    let stranger = root.child("stranger")?;
    let bundle = PolicyBundle::new(&[
        ("inventory.yaml", &inventory(&node)),
        ("schema.cedarschema", SCHEMA),
        ("policies.cedar", POLICIES),
    ])?;
    let tmp = TempDir::new("vd-keys")?;
    let keys = tmp.path().join("keys");
    enforcer_tests::util::write_secret(&keys, format!("{KEY}\n"))?;
    let pins = PinDir::new("vd")?;
    let mut config = AgentConfig::new(bundle.path(), &node.relative_str(), pins.path());
    config.extra_args = vec!["--flow-key-file".into(), keys.display().to_string()];
    let agent = Agent::start(config)?;
    let ns = NetNs::create(&unique_name("vd"))?;
    let server = ChromaServer::start(&ns, &db_cg, SERVER.parse()?)?;
    let addr = server.addr();

    // 1. The acme tenant's clients: their queries return the nearest documents.
    let retriever = ChromaClient::run(&ns, &retriever_cg, addr, "acme-kb")?;
    let indexer = ChromaClient::run(&ns, &indexer_cg, addr, "acme-kb")?;
    for (name, c) in [("acme-retriever", &retriever), ("acme-indexer", &indexer)] {
        ensure!(
            c.result["ok"] == true && c.result["ids"] == serde_json::json!(["kb-1", "kb-2"]),
            "{name}: {}\n{}",
            c.result,
            server.log_tail()
        );
    }

    // 2. globex: refused at its own connect() (EPERM), reported as a tenant mismatch.
    let globex = ChromaClient::run(&ns, &globex_cg, addr, "acme-kb")?;
    ensure!(
        globex.result["ok"] == false && globex.result["errno"] == libc::EPERM,
        "globex-retriever reached the DB: {}",
        globex.result
    );
    agent.wait_for(1, WAIT, |e| {
        e["hook"] == "connect4"
            && e["reason"] == "tenant_mismatch"
            && e["subject"]["workload"] == "globex-retriever"
            && e["destination"]["name"] == "acme-vectors"
    })?;
    drop(globex);

    // 3. A client no enforcer manages: its SYN carries no option; the DB's ingress drops it.
    let r = Probe::new()
        .in_cgroup(&stranger)
        .in_netns(&ns)
        .run_one(&format!("tcp:{SERVER}"))?;
    ensure!(r.outcome == Outcome::Error, "the untagged client got {r:?}");
    agent.wait_for(1, WAIT, |e| {
        e["hook"] == "ingress"
            && e["verdict"] == "deny"
            && e["destination"]["name"] == "acme-vectors"
    })?;

    // 4. Each of the server's live connections, named: exactly the acme clients' ones.
    let clients = [("acme-retriever", &retriever), ("acme-indexer", &indexer)];
    let want = expected(&server, &clients)?;
    let names: BTreeSet<&str> = want.values().map(String::as_str).collect();
    ensure!(
        names == BTreeSet::from(["acme-retriever", "acme-indexer"]),
        "the server should hold connections of both acme clients: {want:?}"
    );
    expect_rows(&pins, &want)?;
    // Both sides of each connection are on this node: the client-side record names the
    // same workload for the same 4-tuple.
    let out = enforcer(&[
        "flows",
        "--pin-path",
        pins.path().to_str().context("pin path")?,
        "--to",
        "acme-vectors",
    ])?;
    ensure!(
        out.success() && out.stdout.contains("acme-indexer (acme)"),
        "{}",
        out.stdout
    );
    let all: Vec<Value> = serde_json::from_str(
        &enforcer(&[
            "flows",
            "--pin-path",
            pins.path().to_str().context("pin path")?,
            "--json",
        ])?
        .stdout,
    )?;
    for ((client, _), name) in &want {
        ensure!(
            all.iter().any(|r| r["side"] == "client"
                && r["source"] == client.as_str()
                && r["subject"]["name"] == name.as_str()),
            "no client-side row from {client} as {name}: {all:?}"
        );
    }

    // 5. acme-indexer leaves: the server closes its side, and its rows go; the retriever's
    //    stay.
    indexer.close()?;
    let mut want = BTreeMap::new();
    ensure!(
        wait_until(WAIT, Duration::from_millis(50), || {
            want = expected(&server, &[("acme-retriever", &retriever)]).unwrap_or_default();
            !want.is_empty() && want.values().all(|n| n == "acme-retriever")
        }),
        "the server still holds the indexer's connections: {:?}",
        server.connections()
    );
    expect_rows(&pins, &want)?;

    retriever.close()?;
    ensure!(
        wait_until(WAIT, Duration::from_millis(50), || {
            server_rows(&pins).is_ok_and(|r| r.is_empty())
        }),
        "rows left after every client closed: {:?}",
        server_rows(&pins)?
    );
    drop(server);
    drop(agent);
    Ok(())
}

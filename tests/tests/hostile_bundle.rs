//! A hostile bundle never takes down a running agent (issue 6, fault 7): a YAML alias bomb,
//! YAML nested 100,000 deep, 200 nested parentheses and a 50,000-long `&&` chain, each
//! written into the policy directory of a running agent, are rejected (`policy.rejected`
//! naming the limit at `file:line:`), the agent keeps running and the last good bundle stays
//! in force. A restarted agent facing a bad bundle starts from the last bundle it applied and
//! reports the problem (it neither crashes nor exits); with no last good bundle it exits with
//! the located error. Addresses: 127.83.x.x.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{first_applied_snapshot, replace_file, wait_notices, StateDir};
use enforcer_tests::fixtures::{Entity, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};
use serde_json::Value;

const NET: u8 = 83;

const BASE: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#;

fn alias_bomb() -> String {
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
    inv
}

fn errors(e: &Value) -> Vec<String> {
    e.get("errors")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_hostile_bundle_never_takes_down_a_running_agent() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::new(
        NET,
        vec![
            Entity::workload(NET, "acme-client", "acme", "inference", 1, 1),
            Entity::endpoint(NET, "acme-api", "acme", "llm_api", 1, 10).port(
                8100,
                Proto::Tcp,
                "query",
            ),
        ],
        BASE,
    )?;
    let _servers = world.servers_v4()?;
    let state = StateDir::new()?;
    let cfg = state.configure(world.agent_config());
    let mut agent = Agent::start(cfg.clone())?;
    let r0 = first_applied_snapshot(&agent)?;
    let probe = Probe::new()
        .in_cgroup(world.cgroup("acme-client"))
        .timeout(Duration::from_secs(10));
    let cell = attempt("tcp", world.entity("acme-api").ip(false), 8100);
    let outcome = || -> Result<Outcome> { Ok(probe.run_one(&cell)?.outcome) };
    ensure!(
        outcome()? == Outcome::Ok,
        "before any edit, the cell is allowed"
    );

    let dir = world.bundle.path().to_path_buf();
    let inventory = std::fs::read_to_string(dir.join("inventory.yaml"))?;
    let deep_parens = format!(
        "@id(\"deep\")\nforbid (principal, action, resource)\nwhen {{ {}true{} }};\n",
        "(".repeat(200),
        ")".repeat(200)
    );
    let chain = format!(
        "forbid (principal, action, resource)\nwhen {{ {} }};\n",
        vec!["true"; 50_000].join(" && ")
    );
    let deep_yaml = format!("tenants: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    // (file, hostile content, what the rejection must say, the good content to restore:
    // None removes the file)
    let cases: [(&str, String, [&str; 2], Option<&str>); 4] = [
        (
            "deep.cedar",
            deep_parens.clone(),
            ["deep.cedar:3:", "the limit is 24"],
            None,
        ),
        (
            "chain.cedar",
            chain,
            ["chain.cedar:2:", "the limit is 64"],
            None,
        ),
        (
            "inventory.yaml",
            alias_bomb(),
            ["inventory.yaml:7:", "YAML nodes"],
            Some(&inventory),
        ),
        (
            "inventory.yaml",
            deep_yaml,
            ["inventory.yaml:1:", "levels deep here; the limit is 32"],
            Some(&inventory),
        ),
    ];
    for (k, (file, content, want, restore)) in cases.iter().enumerate() {
        replace_file(&dir, file, content, None)?;
        let rejected = wait_notices(
            &agent,
            "policy.rejected",
            k + 1,
            Duration::from_secs(20),
            |_| true,
        )
        .with_context(|| format!("case {k} ({file})"))?;
        let rej = &rejected[k];
        let errs = errors(rej);
        ensure!(
            errs.iter().any(|e| want.iter().all(|w| e.contains(w))),
            "case {k}: policy.rejected must say {want:?}: {rej}"
        );
        ensure!(
            rej.get("snapshot_in_force").and_then(Value::as_str) == Some(r0.as_str()),
            "case {k}: the last good bundle {r0} must stay in force: {rej}"
        );
        ensure!(
            agent.is_running(),
            "case {k} ({file}): the agent died; stderr:\n{}",
            agent.stderr_tail()
        );
        ensure!(
            outcome()? == Outcome::Ok,
            "case {k}: after a rejected bundle, the cell changed"
        );
        match restore {
            Some(good) => replace_file(&dir, file, good, None)?,
            None => std::fs::remove_file(dir.join(file))?,
        }
    }
    ensure!(
        agent.is_running(),
        "the agent died: {}",
        agent.stderr_tail()
    );

    // A restart with a hostile bundle on disk does not crash-loop: the agent starts from the
    // last bundle it applied (kept in its state directory), reports the directory's problem
    // as policy.rejected, keeps enforcing and streaming events, and applies the fix.
    std::fs::write(dir.join("deep.cedar"), &deep_parens)?;
    agent.stop()?;
    drop(agent);
    ensure!(
        outcome()? == Outcome::Ok,
        "with no agent, the pinned policy keeps enforcing"
    );
    let mut agent = Agent::start(cfg.clone())?;
    let rejected = wait_notices(
        &agent,
        "policy.rejected",
        1,
        Duration::from_secs(20),
        |_| true,
    )
    .context("a restart on a hostile bundle")?;
    ensure!(
        errors(&rejected[0])
            .iter()
            .any(|e| e.contains("deep.cedar:3:")),
        "the restart must report the directory's problem: {}",
        rejected[0]
    );
    ensure!(
        rejected[0].get("snapshot_in_force").and_then(Value::as_str) == Some(r0.as_str()),
        "the restart must enforce the last good bundle {r0}: {}",
        rejected[0]
    );
    ensure!(agent.is_running(), "the restarted agent died");
    ensure!(
        outcome()? == Outcome::Ok,
        "after the restart on a bad bundle, the last good policy holds"
    );
    std::fs::remove_file(dir.join("deep.cedar"))?;
    wait_notices(&agent, "policy.applied", 2, Duration::from_secs(20), |_| {
        true
    })
    .context("the fix is applied")?;
    ensure!(
        outcome()? == Outcome::Ok,
        "after the fix, the cell is allowed"
    );
    agent.stop()?;
    drop(agent);

    // Without a last good bundle (a fresh state directory), there is nothing safe to start
    // from: a clean exit naming the problem (not a crash).
    std::fs::write(dir.join("deep.cedar"), &deep_parens)?;
    let fresh = StateDir::new()?;
    let err = Agent::start(fresh.configure(world.agent_config()))
        .expect_err("an agent with no last good bundle must not start on a bad one");
    let err = format!("{err:#}");
    ensure!(
        err.contains("exit status: 1") && err.contains("deep.cedar:3:"),
        "a first start on a hostile bundle must exit 1 naming the problem, got: {err}"
    );
    std::fs::remove_file(dir.join("deep.cedar"))?;
    Ok(())
}

/// Issue 6, fault 2, in the kernel: an endpoint whose address the inventory spells
/// IPv4-mapped (`::ffff:127.83.2.10`) is that IPv4 address to the kernel: its own tenant
/// reaches it over IPv4, and another tenant's denied call names it (not WORLD).
#[test]
fn a_mapped_spelling_in_the_inventory_is_the_ipv4_destination() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::new(
        NET,
        vec![
            Entity::workload(NET, "acme-caller", "acme", "inference", 2, 1),
            Entity::workload(NET, "globex-caller", "globex", "inference", 3, 1),
            Entity::endpoint(NET, "acme-store", "acme", "llm_api", 2, 10).port(
                8300,
                Proto::Tcp,
                "query",
            ),
        ],
        BASE,
    )?;
    let path = world.bundle.path().join("inventory.yaml");
    let inventory = std::fs::read_to_string(&path)?;
    let plain = "127.83.2.10/32";
    ensure!(
        inventory.matches(plain).count() == 1,
        "fixture: {plain} once in:\n{inventory}"
    );
    std::fs::write(
        &path,
        inventory.replacen(plain, "\"::ffff:127.83.2.10\"", 1),
    )?;
    let _servers = world.servers_v4()?;
    let agent = world.start_agent()?;
    first_applied_snapshot(&agent)?;
    let cell = attempt("tcp", world.entity("acme-store").ip(false), 8300);
    let run = |caller: &str| -> Result<Outcome> {
        Ok(Probe::new()
            .in_cgroup(world.cgroup(caller))
            .timeout(Duration::from_secs(10))
            .run_one(&cell)?
            .outcome)
    };
    ensure!(
        run("acme-caller")? == Outcome::Ok,
        "same tenant over IPv4 to the mapped-spelled address: must be allowed (judged as the endpoint, not WORLD); agent stderr:\n{}",
        agent.stderr_tail()
    );
    ensure!(
        run("globex-caller")? == Outcome::Eperm,
        "another tenant must be denied"
    );
    let denies = agent.wait_for(1, Duration::from_secs(5), |e| {
        e.get("verdict").and_then(Value::as_str) == Some("deny")
    })?;
    let names: Vec<&str> = denies
        .iter()
        .filter_map(|e| e.pointer("/destination/name").and_then(Value::as_str))
        .collect();
    ensure!(
        names == ["acme-store"],
        "the deny must name the endpoint, not WORLD: {names:?}"
    );
    Ok(())
}

//! Issue 6, fault 5: applying a bundle is all or nothing, in every map.
//!
//! The reported case: a reload moves an address from `globex-db` to `acme-db` and adds
//! enough endpoints that the policy table overflows. It must be rejected with *no* map
//! changed (cgroups, identities, the four IP caches, both policy tables, CONFIG: compared
//! entry by entry before and after), `acme -> that address` must stay denied, and `policy
//! explain` must agree with the kernel. The same reload with the capacity check skipped fails
//! part-way in the kernel (a real E2BIG from a table created small) and must be rolled back to
//! the same decisions. A fresh `run` with an oversize bundle fails with the same clear error,
//! and `policy check` reports capacity at the inventory. The move itself, when it fits, is
//! applied and explained as the kernel holds it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::datapath::{pin_dir, MapContents, Tables};
use enforcer_tests::cli::{
    copy_bundle, enforcer, first_applied_snapshot, replace_file, wait_notices, StateDir,
};
use enforcer_tests::fixtures::{render_inventory, write_bundle, Entity, World};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::{Proto, Server};
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};
use serde_json::Value;

/// This helper's address range: 127.84.0.0/16.
const NET: u8 = 84;
const DB_PORT: u16 = 7000;

const POLICIES: &str = enforcer_tests::fixtures::TENANT_ISOLATION_POLICIES;

/// The address that moves from globex-db to acme-db: 127.<net>.2.10.
fn moving(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, 2, 10)
}

/// acme-app and globex-app (local workloads), acme-db at 127.<net>.1.10 and globex-db at the
/// moving address.
fn before(net: u8) -> Vec<Entity> {
    vec![
        Entity::workload(net, "acme-app", "acme", "inference", 1, 1),
        Entity::workload(net, "globex-app", "globex", "inference", 2, 1),
        Entity::endpoint(net, "acme-db", "acme", "vector_db", 1, 10).port(
            DB_PORT,
            Proto::Tcp,
            "query",
        ),
        Entity::endpoint(net, "globex-db", "globex", "vector_db", 2, 10).port(
            DB_PORT,
            Proto::Tcp,
            "query",
        ),
    ]
}

/// The moving address now belongs to acme-db, globex-db moves to 127.<net>.2.11; plus `extra`
/// acme endpoints (each one more allowed cell for acme-app: each on a port of its own, so that
/// it is a destination class of its own and one more kernel entry).
fn after(net: u8, extra: u8) -> Vec<Entity> {
    let mut entities = before(net);
    for e in &mut entities {
        if e.name == "acme-db" {
            e.v4 = moving(net);
        } else if e.name == "globex-db" {
            e.v4 = Ipv4Addr::new(127, net, 2, 11);
        }
    }
    for i in 0..extra {
        entities.push(
            Entity::endpoint(
                net,
                &format!("acme-extra-{i}"),
                "acme",
                "llm_api",
                1,
                20 + i,
            )
            .port(DB_PORT + 1 + u16::from(i), Proto::Tcp, "query"),
        );
    }
    entities
}

/// The number of kernel policy entries (allow and deny, keyed by classes) a bundle compiles
/// to.
fn policy_entries(dir: &Path) -> Result<usize> {
    let bundle = enforcer_policy::Bundle::load(dir)
        .map_err(|d| anyhow::anyhow!("fixture bundle invalid:\n{d}"))?;
    let compiled = bundle.compile()?;
    Ok(
        enforcer_policy::classes::Classes::of(compiled.allows().iter().map(|(k, v)| (k, v)))
            .entries
            .len(),
    )
}

fn contents(pins: &Path) -> Result<MapContents> {
    Tables::open(&pin_dir(pins))?.contents()
}

fn explain(
    dir: &Path,
    pins: &Path,
    from: &str,
    to: &str,
) -> Result<enforcer_tests::cli::CliOutput> {
    let port = DB_PORT.to_string();
    enforcer(&[
        "policy".as_ref(),
        "explain".as_ref(),
        dir.as_os_str(),
        "--from".as_ref(),
        from.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
        "--port".as_ref(),
        port.as_ref(),
        "--pin-path".as_ref(),
        pins.as_os_str(),
    ])
}

fn rejected_errors(event: &Value) -> String {
    event
        .get("errors")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A world of [`before`] with a policy table exactly as large as its policy, an agent that
/// enforces it (plus `extra_args`), and a server on the moving address.
struct Setup {
    _server: Server,
    agent: Agent,
    _state: StateDir,
    world: World,
    capacity: usize,
    /// A copy of the bundle in force, for `explain` after the directory changed.
    old_bundle: enforcer_tests::TempDir,
    old_snapshot: String,
}

impl Setup {
    fn start(net: u8, extra_args: &[&str]) -> Result<Self> {
        let world = World::new(net, before(net), POLICIES)?;
        let capacity = policy_entries(world.bundle.path())?;
        let state = StateDir::new()?;
        let mut config = state.configure(world.agent_config());
        config.extra_args.push("--capacity".into());
        config.extra_args.push(format!("policy={capacity}"));
        config
            .extra_args
            .extend(extra_args.iter().map(|a| a.to_string()));
        let server = Server::start(
            Proto::Tcp,
            SocketAddr::new(IpAddr::V4(moving(net)), DB_PORT),
        )?;
        let agent = Agent::start(config)?;
        let old_snapshot = first_applied_snapshot(&agent)?;
        let old_bundle = copy_bundle(world.bundle.path())?;
        Ok(Self {
            _server: server,
            agent,
            _state: state,
            world,
            capacity,
            old_bundle,
            old_snapshot,
        })
    }

    fn acme_to_moving(&self) -> Result<Outcome> {
        let probe = Probe::new().in_cgroup(self.world.cgroup("acme-app"));
        Ok(probe
            .run_one(&attempt("tcp", IpAddr::V4(moving(self.world.net)), DB_PORT))?
            .outcome)
    }

    /// Rewrites the inventory to [`after`] with `extra` endpoints; returns its policy size.
    fn reload(&self, extra: u8) -> Result<usize> {
        self.reload_to(after(self.world.net, extra))
    }

    fn reload_to(&self, entities: Vec<Entity>) -> Result<usize> {
        let inventory = render_inventory(&entities, &self.world.root.relative_str());
        let probe = write_bundle(&entities, &self.world.root.relative_str(), POLICIES)?;
        let entries = policy_entries(probe.path())?;
        replace_file(self.world.bundle.path(), "inventory.yaml", &inventory, None)?;
        Ok(entries)
    }

    fn wait_rejected(&self) -> Result<Value> {
        let rejected = wait_notices(
            &self.agent,
            "policy.rejected",
            1,
            Duration::from_secs(15),
            |_| true,
        )?;
        Ok(rejected[0].clone())
    }

    /// `explain` of the bundle in force agrees with every map (exit 0, DENY).
    fn explain_agrees(&self) -> Result<()> {
        let out = explain(
            self.old_bundle.path(),
            self.world.pins.path(),
            "acme-app",
            "globex-db",
        )?;
        ensure!(
            out.success() && out.stdout.contains("kernel and PDP agree"),
            "explain of the bundle in force must agree with every map: {out}"
        );
        ensure!(
            out.stdout.contains("IPCACHE_HOST_V4") && out.stdout.contains("CGROUP_IDENTITY"),
            "explain must show the IP cache and cgroup maps it compared: {out}"
        );
        Ok(())
    }
}

#[test]
fn a_reload_that_overflows_changes_no_map() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let s = Setup::start(NET, &[])?;
    ensure!(
        s.acme_to_moving()? == Outcome::Eperm,
        "before the reload: acme-app -> {} (globex-db) must be denied",
        moving(NET)
    );
    let before = contents(s.world.pins.path())?;

    let entries = s.reload(4)?;
    ensure!(
        entries > s.capacity,
        "fixture: the new bundle ({entries} entries) must overflow the table ({})",
        s.capacity
    );
    let rejected = s.wait_rejected()?;
    let errors = rejected_errors(&rejected);
    let want = format!("needs {entries} policy entries, capacity {}", s.capacity);
    ensure!(
        errors.contains(&want),
        "policy.rejected must say {want:?}: {rejected}"
    );
    ensure!(
        rejected.get("snapshot_in_force").and_then(Value::as_str) == Some(s.old_snapshot.as_str()),
        "the old snapshot must stay in force: {rejected}"
    );

    let after = contents(s.world.pins.path())?;
    ensure!(
        after == before,
        "a rejected bundle changed the kernel maps:\nbefore: {before:?}\nafter:  {after:?}"
    );
    ensure!(
        s.acme_to_moving()? == Outcome::Eperm,
        "after the rejected reload: acme-app -> {} must stay denied",
        moving(NET)
    );
    s.explain_agrees()?;

    // The move on its own fits: applied, the address now reaches acme-db, and explain of the
    // new bundle agrees with every map.
    s.reload(0)?;
    wait_notices(
        &s.agent,
        "policy.applied",
        1,
        Duration::from_secs(15),
        |e| e.get("snapshot").and_then(Value::as_str) != Some(s.old_snapshot.as_str()),
    )?;
    ensure!(
        s.acme_to_moving()? == Outcome::Ok,
        "after the move: acme-app -> {} (acme-db) must be allowed",
        moving(NET)
    );
    let out = explain(
        s.world.bundle.path(),
        s.world.pins.path(),
        "acme-app",
        "acme-db",
    )?;
    ensure!(
        out.success() && out.stdout.contains("kernel and PDP agree"),
        "explain of the applied move: {out}"
    );
    // The old bundle's view of the address now differs from the kernel's IP cache: named.
    let out = explain(
        s.old_bundle.path(),
        s.world.pins.path(),
        "acme-app",
        "globex-db",
    )?;
    ensure!(
        out.code == Some(3)
            && out.stdout.contains("DISAGREE in")
            && out.stdout.contains("IPCACHE_HOST_V4"),
        "explain of the old bundle must name the IP cache that differs (exit 3): {out}"
    );
    // A bundle that gives acme-app and globex-app each other's cgroups: the policy entry
    // agrees, the cgroup map does not, and explain says which.
    let swapped = copy_bundle(s.world.bundle.path())?;
    let root = s.world.root.relative_str();
    let inventory = std::fs::read_to_string(swapped.path().join("inventory.yaml"))?
        .replace(&format!("{root}/acme-app]"), "SWAP]")
        .replace(&format!("{root}/globex-app]"), &format!("{root}/acme-app]"))
        .replace("SWAP]", &format!("{root}/globex-app]"));
    std::fs::write(swapped.path().join("inventory.yaml"), inventory)?;
    let out = explain(swapped.path(), s.world.pins.path(), "acme-app", "acme-db")?;
    ensure!(
        out.code == Some(3)
            && out.stdout.contains("DISAGREE in")
            && out.stdout.contains("CGROUP_IDENTITY"),
        "explain of a bundle with other cgroups must name CGROUP_IDENTITY (exit 3): {out}"
    );
    Ok(())
}

#[test]
fn a_write_that_fails_part_way_is_rolled_back() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 1;
    // No capacity check: the kernel itself refuses the entry that does not fit (E2BIG).
    let s = Setup::start(net, &["--skip-capacity-check"])?;
    ensure!(
        s.acme_to_moving()? == Outcome::Eperm,
        "before: must be denied"
    );
    let before = contents(s.world.pins.path())?;

    let entries = s.reload(4)?;
    ensure!(entries > s.capacity, "fixture: must overflow");
    let rejected = s.wait_rejected()?;
    let errors = rejected_errors(&rejected);
    ensure!(
        errors.contains("rolled back") && errors.contains("policy table"),
        "policy.rejected must name the failed write and the rollback: {rejected}"
    );
    ensure!(
        rejected.get("snapshot_in_force").and_then(Value::as_str) == Some(s.old_snapshot.as_str()),
        "the old snapshot must stay in force: {rejected}"
    );
    let after = contents(s.world.pins.path())?;
    ensure!(
        after.same_decisions(&before),
        "the rollback left the kernel different:\nbefore: {before:?}\nafter:  {after:?}"
    );
    ensure!(
        after.config.generation > before.config.generation,
        "fixture: the failure must have happened after a flip (the transition table), so that \
         the rollback had something to undo: generation {} -> {}",
        before.config.generation,
        after.config.generation
    );
    ensure!(
        s.acme_to_moving()? == Outcome::Eperm,
        "after the rollback: acme-app -> {} must stay denied",
        moving(net)
    );
    s.explain_agrees()?;
    ensure!(
        s.agent.stderr_tail().contains("rolled back"),
        "the log must say so: {}",
        s.agent.stderr_tail()
    );
    Ok(())
}

#[test]
fn a_fresh_run_with_an_oversize_bundle_fails_clearly() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 2;
    let world = World::new(net, after(net, 2), POLICIES)?;
    let entries = policy_entries(world.bundle.path())?;
    let capacity = entries - 1;
    let state = StateDir::new()?;
    let mut config = state.configure(world.agent_config());
    config.extra_args.push("--capacity".into());
    config.extra_args.push(format!("policy={capacity}"));
    let error = match Agent::start(config) {
        Ok(_) => anyhow::bail!("an agent with an oversize bundle must not start"),
        Err(error) => format!("{error:#}"),
    };
    let want = format!("needs {entries} policy entries, capacity {capacity}");
    ensure!(
        error.contains(&want),
        "the error must say {want:?}: {error}"
    );
    ensure!(
        error.contains("nothing was written"),
        "the error must say that nothing was written: {error}"
    );
    // Nothing was attached and no policy written.
    let pins = pin_dir(world.pins.path());
    if pins.exists() {
        let c = contents(world.pins.path())?;
        ensure!(
            c.policy.iter().all(|t| t.is_empty()) && c.cgroups.is_empty(),
            "the failed start wrote into the maps: {c:?}"
        );
        ensure!(
            !std::fs::read_dir(&pins)?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("link-")),
            "the failed start attached programs"
        );
    }
    Ok(())
}

#[test]
fn policy_check_reports_capacity_at_the_inventory() -> Result<()> {
    let net = NET + 3;
    let bundle = write_bundle(&after(net, 2), "enforcer-apply-check", POLICIES)?;
    let dir = bundle.path();
    let entries = policy_entries(dir)?;

    let ok = enforcer(&["policy".as_ref(), "check".as_ref(), dir.as_os_str()])?;
    ensure!(ok.success(), "default capacities fit: {ok}");

    let capacity = (entries - 1).to_string();
    let spec = format!("policy={capacity}");
    let out = enforcer(&[
        "policy".as_ref(),
        "check".as_ref(),
        dir.as_os_str(),
        "--capacity".as_ref(),
        spec.as_ref(),
        "--capacity".as_ref(),
        "identities=3".as_ref(),
    ])?;
    ensure!(
        out.code == Some(1),
        "an oversize bundle: want exit 1: {out}"
    );
    let inventory = std::fs::read_to_string(dir.join("inventory.yaml"))?;
    let line = inventory
        .lines()
        .position(|l| l.starts_with("workloads:"))
        .context("fixture inventory has workloads")?
        + 1;
    let at = format!("{}:{line}:1: error: ", dir.join("inventory.yaml").display());
    let want = format!("{at}needs {entries} policy entries, capacity {capacity}");
    ensure!(out.stderr.contains(&want), "want {want:?}: {out}");
    // The bundle's identities and the reserved AGENT entry the agent always writes.
    let identities = enforcer_policy::Bundle::load(dir)
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .identities()
        .len()
        + 1;
    let want = format!("{at}needs {identities} identity entries, capacity 3");
    ensure!(out.stderr.contains(&want), "want {want:?}: {out}");

    let bad = enforcer(&[
        "policy".as_ref(),
        "check".as_ref(),
        dir.as_os_str(),
        "--capacity".as_ref(),
        "tables=3".as_ref(),
    ])?;
    ensure!(
        !bad.success() && bad.stderr.contains("unknown kind"),
        "an unknown capacity kind is an error: {bad}"
    );
    Ok(())
}

/// A risk change re-evaluates one row and writes it into the active table: all or nothing
/// too. acme-app starts at risk 0.9 (no endpoint allowed); lowering it to 0.1 allows two
/// endpoints, one more entry than the table has room for: refused before any write (a table
/// with one of the two cells would allow a call that neither risk allows), nothing changes,
/// and the agent keeps the old risk.
#[test]
fn a_risk_row_that_does_not_fit_changes_nothing() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 4;
    let mut entities = before(net);
    entities.push(
        // Another port than acme-db's: a destination class of its own.
        Entity::endpoint(net, "acme-extra", "acme", "llm_api", 1, 20).port(
            DB_PORT + 1,
            Proto::Tcp,
            "query",
        ),
    );
    let policies = format!(
        "{POLICIES}\n@id(\"risky-no-endpoints\")\nforbid (principal, action, resource is Endpoint)\n\
         when {{ principal.risk.greaterThan(decimal(\"0.8\")) }};\n"
    );
    let world = World::new(net, entities.clone(), &policies)?;
    let inventory = render_inventory(&entities, &world.root.relative_str()).replacen(
        "  - name: acme-app\n",
        "  - name: acme-app\n    risk: 0.9\n",
        1,
    );
    world.bundle.write_file("inventory.yaml", &inventory)?;
    let capacity = policy_entries(world.bundle.path())? + 1;
    let state = StateDir::new()?;
    let mut config = state.configure(world.agent_config());
    config.extra_args.push("--capacity".into());
    config.extra_args.push(format!("policy={capacity}"));
    let dirs = state.dirs(&config);
    let addr = |name: &str| IpAddr::V4(world.entity(name).v4);
    let _servers = [
        Server::start(Proto::Tcp, SocketAddr::new(addr("acme-db"), DB_PORT))?,
        Server::start(Proto::Tcp, SocketAddr::new(addr("acme-extra"), DB_PORT + 1))?,
    ];
    let agent = Agent::start(config)?;
    first_applied_snapshot(&agent)?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-app"));
    let calls = [
        attempt("tcp", addr("acme-db"), DB_PORT),
        attempt("tcp", addr("acme-extra"), DB_PORT + 1),
    ];
    for call in &calls {
        probe.expect_outcome(call, Outcome::Eperm, "risk 0.9")?;
    }
    let before = contents(world.pins.path())?;

    let out = dirs.risk_set("acme-app", "0.1")?;
    let want = format!("needs {} policy entries, capacity {capacity}", capacity + 1);
    ensure!(
        !out.success() && out.stderr.contains(&want),
        "risk set must be refused with {want:?}: {out}"
    );
    let after = contents(world.pins.path())?;
    ensure!(
        after == before,
        "a refused risk change changed the kernel maps:\nbefore: {before:?}\nafter:  {after:?}"
    );
    for call in &calls {
        probe.expect_outcome(call, Outcome::Eperm, "after the refused risk change")?;
    }
    let status = dirs.status()?;
    ensure!(
        status.pointer("/agent/risk_overrides/acme-app").is_none(),
        "the refused risk must not be recorded: {status}"
    );
    // The agent still holds risk 0.9: a later change that fits works from there.
    let out = dirs.risk_set("acme-app", "0.85")?;
    ensure!(
        out.success(),
        "risk set acme-app 0.85 (no cell changes): {out}"
    );
    drop(agent);
    Ok(())
}

/// Declared ports of the large endpoint of [`a_move_is_never_seen_half_applied`].
const WIDE_PORTS: u16 = 2000;

/// The order of the writes: one reload moves the address to acme-db *and* moves acme-db to
/// tenant initech, so that neither the old bundle (the address is globex-db's) nor the new one
/// (acme-db is another tenant's) lets acme-app reach the address; but the new IP cache under
/// the old table would (acme-app may reach acme-db there). A prober connecting from acme-app
/// to the address all through the reload must never get through. (Before the fix the IP
/// cache was rewritten before the table flipped: every connect in between was allowed.) The
/// flood of denied calls must not delay the reload either.
#[test]
fn a_move_is_never_seen_half_applied() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if !require_kernel() {
        return Ok(());
    }
    let net = NET + 5;
    // The default table size: the new bundle below is large.
    let s = Setup::start(net, &["--capacity", "policy=262144"])?;
    ensure!(
        s.acme_to_moving()? == Outcome::Eperm,
        "before: must be denied"
    );

    let probe = Probe::new().in_cgroup(s.world.cgroup("acme-app"));
    let call = attempt("tcp", IpAddr::V4(moving(net)), DB_PORT);
    let stop = AtomicBool::new(false);
    let (summaries, applied) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| -> Result<Vec<enforcer_tests::probe::Summary>> {
            let began = std::time::Instant::now();
            let mut summaries = Vec::new();
            // Bounded: at most 120 s, and until the reload is in force.
            while !stop.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(120) {
                summaries.push(probe.repeat(500, &call)?);
            }
            Ok(summaries)
        });
        std::thread::sleep(Duration::from_millis(300));
        // With the move, an acme endpoint with many ports: thousands of new entries make the
        // table write take a while, so that a wrong order (IP cache first, table later) leaves
        // a window the prober falls into.
        let mut entities = after(net, 0);
        for e in &mut entities {
            if e.name == "acme-db" {
                e.tenant = "initech".into();
            }
        }
        let mut wide = Entity::endpoint(net, "acme-wide", "acme", "llm_api", 1, 30);
        for port in 0..WIDE_PORTS {
            wide = wide.port(20_000 + port, Proto::Tcp, "query");
        }
        entities.push(wide);
        let applied = s.reload_to(entities).and_then(|_| {
            wait_notices(
                &s.agent,
                "policy.applied",
                1,
                Duration::from_secs(90),
                |e| e.get("snapshot").and_then(Value::as_str) != Some(s.old_snapshot.as_str()),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let summaries = prober.join().expect("prober thread panicked");
        (summaries, applied)
    });
    applied?;
    let summaries = summaries?;
    let attempts: u64 = summaries.iter().map(|s| s.attempts).sum();
    let ok: u64 = summaries.iter().map(|s| s.ok).sum();
    let eperm: u64 = summaries.iter().map(|s| s.eperm).sum();
    ensure!(
        attempts > 0 && ok == 0 && eperm == attempts,
        "acme-app -> {} must be denied all through the move ({attempts} attempts: {ok} got through, {eperm} EPERM)",
        moving(net)
    );
    ensure!(s.acme_to_moving()? == Outcome::Eperm, "after: still denied");
    Ok(())
}

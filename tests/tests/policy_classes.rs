//! Issue 9, "the policy table must fit": the kernel table is keyed by classes of identities
//! that decide alike, not by identity pairs.
//!
//! About 2,000 identities (200 subjects, 1,800 endpoints, four tenants). Under an allow-all
//! policy the identity-pair table would need ~440,000 entries, more than the default capacity
//! (262,144); under a same-tenant permit ~110,000, here against a table of 1,024. Both must
//! apply, hold a handful of class entries, mean exactly the compiled identity-pair table
//! (decoded through each identity's classes), and the kernel must decide real connects from
//! real cgroups as the policy says.
//!
//! Addresses: 127.82.0.0/16 only; cgroups and pins are named `pt-...`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::datapath::{pin_dir, Tables};
use enforcer_policy::classes::Classes;
use enforcer_tests::agent::AgentConfig;
use enforcer_tests::bpf::PinDir;
use enforcer_tests::bundle::PolicyBundle;
use enforcer_tests::cgroup::TestCgroup;
use enforcer_tests::cli::wait_notices;
use enforcer_tests::fixtures::{render_inventory, Entity, SCHEMA};
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::{Proto, Server};
use enforcer_tests::util::unique_name;
use enforcer_tests::{require_kernel, Agent, Outcome, Probe};

const NET: u8 = 82;
const TENANTS: usize = 4;
const SUBJECTS: usize = 200;
const ENDPOINTS: usize = 1_800;
/// Every endpoint's one declared port.
const PORT: u16 = 9000;
/// A port on a workload's address (workloads declare none: any port is one cell).
const WORKLOAD_PORT: u16 = 9100;

fn tenant(k: usize) -> String {
    format!("pt{}", k % TENANTS)
}

/// Address `k` of the block starting at third octet `base`.
fn addr(base: u8, k: usize) -> (u8, u8) {
    (base + (k / 250) as u8, 1 + (k % 250) as u8)
}

/// The population: subjects `w0..` (only `w0` and `w1` have real cgroups; the others name
/// cgroups that do not exist, so they are subjects of the compile without processes), and
/// endpoints `e0..`, tenant `k % 4`. Subject addresses from third octet `base`, endpoint
/// addresses from `base + 1`.
fn entities(base: u8) -> Vec<Entity> {
    let mut all = Vec::new();
    for k in 0..SUBJECTS {
        let (t, i) = addr(base, k);
        all.push(Entity::workload(
            NET,
            &format!("w{k}"),
            &tenant(k),
            "inference",
            t,
            i,
        ));
    }
    for k in 0..ENDPOINTS {
        let (t, i) = addr(base + 1, k);
        all.push(
            Entity::endpoint(NET, &format!("e{k}"), &tenant(k), "llm_api", t, i).port(
                PORT,
                Proto::Tcp,
                "connect",
            ),
        );
    }
    all
}

struct Setup {
    entities: Vec<Entity>,
    // Field order is drop order: the agent first, then cgroups, then bundle and pins.
    _agent: Agent,
    _servers: Vec<Server>,
    cgroups: [TestCgroup; 2],
    _root: TestCgroup,
    bundle: PolicyBundle,
    pins: PinDir,
}

impl Setup {
    fn start(base: u8, policies: &str, extra_args: &[&str]) -> Result<Self> {
        let entities = entities(base);
        let root = TestCgroup::create(unique_name("pt-classes"))?;
        let cgroups = [root.child("w0")?, root.child("w1")?];
        let inventory = render_inventory(&entities, &root.relative_str());
        let bundle = PolicyBundle::new(&[
            ("inventory.yaml", &inventory),
            ("schema.cedarschema", SCHEMA),
            ("policies.cedar", policies),
        ])?;
        let pins = PinDir::new("pt-classes")?;
        let ip = |name: &str| -> Result<IpAddr> {
            Ok(IpAddr::V4(
                entities
                    .iter()
                    .find(|e| e.name == name)
                    .context("fixture entity")?
                    .v4,
            ))
        };
        let servers = vec![
            Server::start(Proto::Tcp, SocketAddr::new(ip("e0")?, PORT))?,
            Server::start(Proto::Tcp, SocketAddr::new(ip("e1")?, PORT))?,
            Server::start(Proto::Tcp, SocketAddr::new(ip("e1")?, PORT + 1))?,
            Server::start(Proto::Tcp, SocketAddr::new(ip("w4")?, WORKLOAD_PORT))?,
            Server::start(Proto::Tcp, SocketAddr::new(ip("w5")?, WORKLOAD_PORT))?,
        ];
        let mut config = AgentConfig::new(bundle.path(), &root.relative_str(), pins.path());
        config
            .extra_args
            .extend(extra_args.iter().map(|a| a.to_string()));
        let agent = Agent::start(config)?;
        // A debug build compiles ~440,000 cells: give it time (a deadline, not a sleep).
        wait_notices(
            &agent,
            "policy.applied",
            1,
            Duration::from_secs(300),
            |_| true,
        )?;
        Ok(Self {
            entities,
            _agent: agent,
            _servers: servers,
            cgroups,
            _root: root,
            bundle,
            pins,
        })
    }

    fn ip(&self, name: &str) -> IpAddr {
        IpAddr::V4(
            self.entities
                .iter()
                .find(|e| e.name == name)
                .map_or(Ipv4Addr::UNSPECIFIED, |e| e.v4),
        )
    }

    /// The kernel holds few class entries, fewer than `at_most`, and they mean exactly the
    /// compiled identity-pair table, which needs more entries than the policy map holds.
    fn check_tables(&self, at_most: usize) -> Result<()> {
        let tables = Tables::open(&pin_dir(self.pins.path()))?;
        let identity_pairs_over = tables.capacities().policy as usize;
        let bundle = enforcer_policy::Bundle::load(self.bundle.path())
            .map_err(|d| anyhow::anyhow!("fixture bundle invalid:\n{d}"))?;
        let compiled = bundle.compile()?;
        let pairs = compiled.allows().len();
        ensure!(
            pairs > identity_pairs_over,
            "fixture: the identity-pair table ({pairs}) must exceed {identity_pairs_over}"
        );
        let contents = tables.contents()?;
        let active = (contents.config.generation & 1) as usize;
        let kernel = contents.kernel_policy[active].len();
        ensure!(
            kernel <= at_most,
            "the class table holds {kernel} entries, want at most {at_most}"
        );
        let want = Classes::of(compiled.allows().iter().map(|(k, v)| (k, v)));
        ensure!(
            want.entries.len() == kernel,
            "the kernel holds {kernel} entries, the compile's classes {}",
            want.entries.len()
        );
        let decoded = contents.active_policy();
        ensure!(
            decoded.len() == pairs
                && compiled
                    .allows()
                    .iter()
                    .all(|(k, v)| decoded.get(k) == Some(v)),
            "the kernel's class table, decoded, is not the compiled table ({} vs {pairs} entries)",
            decoded.len()
        );
        eprintln!(
            "{} identities: {pairs} identity-pair entries, {kernel} class entries",
            compiled.identities().count()
        );
        Ok(())
    }
}

#[test]
fn an_allow_all_policy_over_two_thousand_identities_fits() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let s = Setup::start(10, "@id(\"allow-all\")\npermit (principal, action, resource);\n", &[])?;
    // The default capacity (262,144): the identity pairs would not fit.
    s.check_tables(16)?;
    for (i, cgroup) in s.cgroups.iter().enumerate() {
        let probe = Probe::new().in_cgroup(cgroup);
        let when = format!("allow-all, from w{i}");
        for to in ["e0", "e1"] {
            probe.expect_outcome(&attempt("tcp", s.ip(to), PORT), Outcome::Ok, &when)?;
        }
        for to in ["w4", "w5"] {
            probe.expect_outcome(&attempt("tcp", s.ip(to), WORKLOAD_PORT), Outcome::Ok, &when)?;
        }
        // A port e1 does not declare: no entry, denied.
        probe.expect_outcome(&attempt("tcp", s.ip("e1"), PORT + 1), Outcome::Eperm, &when)?;
    }
    Ok(())
}

#[test]
fn a_same_tenant_permit_over_two_thousand_identities_fits_a_small_table() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let policies = enforcer_tests::fixtures::TENANT_ISOLATION_POLICIES;
    let s = Setup::start(40, policies, &["--capacity", "policy=1024"])?;
    s.check_tables(64)?;
    // w0 and e0, w4 are tenant pt0; w1, e1 and w5 tenant pt1.
    let cases = [
        (0, "e0", PORT, Outcome::Ok),
        (0, "e1", PORT, Outcome::Eperm),
        (0, "w4", WORKLOAD_PORT, Outcome::Ok),
        (0, "w5", WORKLOAD_PORT, Outcome::Eperm),
        (1, "e1", PORT, Outcome::Ok),
        (1, "e0", PORT, Outcome::Eperm),
        (1, "w5", WORKLOAD_PORT, Outcome::Ok),
        (1, "e1", PORT + 1, Outcome::Eperm),
    ];
    for (from, to, port, want) in cases {
        Probe::new().in_cgroup(&s.cgroups[from]).expect_outcome(
            &attempt("tcp", s.ip(to), port),
            want,
            &format!("same-tenant, w{from} -> {to}:{port}"),
        )?;
    }
    Ok(())
}

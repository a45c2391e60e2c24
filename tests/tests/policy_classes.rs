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
//! A third test reads the real maps after every write of a swap: a table and its class
//! numbers change together.
//!
//! Addresses: 127.82.0.0/16 only; cgroups and pins are named `pt-...`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::datapath::{pin_dir, Datapath, DesiredState, LoadOptions, SwapStep, Tables};
use enforcer_common::{IdentityInfo, PolicyKey, PolicyValue};
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
        // A debug build compiles ~440,000 cells before it is ready: on a loaded machine that
        // takes more than the default 20 s (a deadline, not a sleep).
        config.ready_timeout = Duration::from_secs(300);
        let agent = Agent::start(config)?;
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
    let s = Setup::start(
        10,
        "@id(\"allow-all\")\npermit (principal, action, resource);\n",
        &[],
    )?;
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

/// Identities 256.. with a tenant each.
fn identities(ids: impl IntoIterator<Item = (u32, u32)>) -> BTreeMap<u32, IdentityInfo> {
    ids.into_iter()
        .map(|(id, tenant)| (id, IdentityInfo::new(tenant, 0)))
        .collect()
}

fn allow(subject: u32, destination: u32, dport: u16) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey {
            subject,
            destination,
            dport,
            protocol: enforcer_common::proto::TCP,
            _pad: 0,
        },
        PolicyValue::allow(0),
    )
}

/// What the kernel decides, read from the real maps after one step of a swap.
type Seen = Vec<(
    SwapStep,
    std::result::Result<BTreeMap<PolicyKey, PolicyValue>, String>,
)>;

/// Checks the decoded active table after every step of the swaps in `seen`: `before` until
/// the flip, `after` from it; and that the swap rewrote class slots (else the test proves
/// nothing).
fn check_steps(
    seen: &Seen,
    before: &HashMap<PolicyKey, PolicyValue>,
    after: &HashMap<PolicyKey, PolicyValue>,
    what: &str,
) -> Result<()> {
    let as_map = |t: &HashMap<PolicyKey, PolicyValue>| -> BTreeMap<PolicyKey, PolicyValue> {
        t.iter().map(|(k, v)| (*k, *v)).collect()
    };
    let (before, after) = (as_map(before), as_map(after));
    ensure!(before != after, "{what}: fixture must change the table");
    let flips = seen.iter().filter(|(s, _)| *s == SwapStep::Flipped).count();
    ensure!(
        flips == 1,
        "{what}: want one flip, saw {flips}: {:?}",
        steps(seen)
    );
    let class_writes = seen
        .iter()
        .filter(|(s, _)| matches!(s, SwapStep::StandbyClassesWritten(_)))
        .count();
    ensure!(
        class_writes > 0,
        "{what}: the swap must rewrite class slots: {:?}",
        steps(seen)
    );
    let mut flipped = false;
    for (step, decided) in seen {
        flipped |= *step == SwapStep::Flipped;
        let decided = decided
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{what}: reading the maps at {step:?}: {e}"))?;
        let want = if flipped { &after } else { &before };
        ensure!(
            decided == want,
            "{what}: after {step:?} the kernel decides a table that is neither the old one (before the flip) nor the new one (from it):\n got  {decided:?}\n want {want:?}"
        );
    }
    Ok(())
}

fn steps(seen: &Seen) -> Vec<SwapStep> {
    seen.iter().map(|(s, _)| *s).collect()
}

/// A table and the class numbers it was compiled with change together. The kernel reads the
/// generation once and, with its parity, both the table and the two identities' class slots;
/// a swap writes only the standby parity (the class-keyed entries, then every identity's
/// standby slot), and one write of `CONFIG` flips all of it. So after every single write of a
/// swap, the table the kernel would decide, decoded from the real maps exactly as the kernel
/// reads them (active parity, active slot of each identity, active map), must be the old
/// table, and from the flip on the new one. Checked for a reload (a new identity that enters
/// in no class, an identity that leaves, classes that split) and for a risk row.
#[test]
fn a_table_and_its_class_numbers_change_together() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let pins = PinDir::new("pt-swap")?;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_root: pins.path(),
        ring_buffer_bytes: None,
        capacity: Default::default(),
    })?;
    let dir = datapath.dir().to_path_buf();

    // T1: ten identities in two tenants, all allowed to each other (one class each way).
    let t1_ids = identities((256..266).map(|id| (id, id % 2)));
    let t1: HashMap<PolicyKey, PolicyValue> = (256..266)
        .flat_map(|s| (256..266).map(move |d| allow(s, d, 0)))
        .collect();
    datapath.tables.apply(&DesiredState {
        identities: t1_ids,
        allows: t1.clone(),
        ..DesiredState::default()
    })?;

    let seen = Arc::new(Mutex::new(Seen::new()));
    let record = seen.clone();
    datapath.tables.observe_swaps(Box::new(move |step| {
        let decided = Tables::open(&dir)
            .and_then(|t| t.contents())
            .map(|c| c.active_policy().clone())
            .map_err(|e| format!("{e:#}"));
        if let Ok(mut seen) = record.lock() {
            seen.push((step, decided));
        }
    }));
    let take = |seen: &Arc<Mutex<Seen>>| -> Result<Seen> {
        let mut seen = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        Ok(std::mem::take(&mut *seen))
    };

    // T2: same tenant only (the classes split); 265 leaves, 270 enters (tenant 0).
    let t2_members: Vec<u32> = (256..265).chain([270]).collect();
    let t2_ids = identities(t2_members.iter().map(|&id| (id, id % 2)));
    let t2: HashMap<PolicyKey, PolicyValue> = t2_members
        .iter()
        .flat_map(|&s| {
            t2_members
                .iter()
                .filter(move |&&d| d % 2 == s % 2)
                .map(move |&d| allow(s, d, 0))
        })
        .collect();
    datapath.tables.apply(&DesiredState {
        identities: t2_ids,
        allows: t2.clone(),
        ..DesiredState::default()
    })?;
    check_steps(&take(&seen)?, &t1, &t2, "reload")?;
    let kernel = Tables::open(datapath.dir())?.contents()?;
    let active = (kernel.config.generation & 1) as usize;
    ensure!(
        kernel.kernel_policy[active].len() == 2,
        "two tenants allowed within themselves: 2 class entries, got {:?}",
        kernel.kernel_policy[active]
    );
    ensure!(
        !kernel.identities.contains_key(&265),
        "the identity that left is removed"
    );

    // A risk row: 256 loses every allow but one exact port towards 258.
    let removed: Vec<PolicyKey> = t2.keys().filter(|k| k.subject == 256).copied().collect();
    let added = vec![allow(256, 258, 443)];
    datapath.tables.apply_row(&added, &removed)?;
    let mut t3 = t2.clone();
    t3.retain(|k, _| k.subject != 256);
    t3.extend(added);
    check_steps(&take(&seen)?, &t2, &t3, "risk row")?;
    Ok(())
}

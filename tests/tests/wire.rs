//! Identity on the wire, end to end on the real kernel: two network namespaces joined by a veth
//! pair stand for two nodes, each with its own enforcer (own pins, own cgroup root under the
//! test's cgroup). Node 1 runs the retrievers, node 2 the vector DB `acme-vectors` (ingress
//! `enforce`), listening on `[fd84::2]:6333` from a cgroup inside node 2's subtree.
//!
//! - acme-retriever (same tenant) connects, and node 2's `WIRE_PEERS` holds the identity its
//!   option claimed for that very 4-tuple;
//! - globex-retriever is denied at connect on node 1 (no SYN leaves);
//! - a client in a cgroup no enforcer manages (untagged, from an address the IP cache knows as
//!   acme-retriever) is dropped at node 2's ingress: one `missing_tag` event, which names
//!   acme-retriever as the address's owner (`peer.workload`), never as its subject;
//! - a SYN the test crafts on a raw socket with the right layout and a wrong tag is dropped:
//!   one `bad_tag` event; the same SYN with the tag computed in userspace
//!   (`enforcer::wire::option`) passes and is recorded: the kernel's MAC is userspace's;
//! - a SYN with a genuine tag but a time outside the skew (a replay), or a version 1 option,
//!   is dropped: one `stale_tag` event each; the same 4-tuple stamped now passes;
//! - the SYN of a connection that was accepted and has closed, sent again within the skew
//!   (a replay), is dropped: one `replayed_tag` event; so is the second copy of a SYN that
//!   was answered but never completed (option version 3); a version 2 SYN sent twice passes;
//! - a retransmitted SYN carries a later time than the first, so a server that dropped the
//!   first (full accept queue) still gets the connection, and a copy of the first is refused;
//! - key rotation: during it both keys verify, after it the old one is refused;
//! - a verified claim the policy does not allow here, and an untagged peer outside the
//!   cluster (WORLD), are refused as `not_allowed`;
//! - ingress `audit` lets the unmanaged client through and reports it;
//! - a SYN cookie's ACK (node 2 at `tcp_syncookies=2`) is judged as its SYN: a tagged
//!   client's passes, an outsider's cookie given out under `audit` is refused under `enforce`.
//!
//! The tests on one node (`LoopbackNode`): the IPv4 form of the check, and a deferred
//! connect's SYN written from another workload's cgroup.
//!
//! Addresses: `fd84::1` (node 1) and `fd84::2` (node 2) on the test's own veth only, and
//! `127.84.0.0/16` on loopback; names start with `wr`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use enforcer::wire::{
    key_ids, now_stamp, option, option_version, parse_keys, spent_options, verified_peers, FlowKey,
};
use enforcer_tests::cli::enforcer;
use enforcer_tests::fixtures::SCHEMA;
use enforcer_tests::probe::ProbeServer;
use enforcer_tests::raw_tcp;
use enforcer_tests::util::wait_until;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, NetNs, Outcome, PinDir, PolicyBundle, Probe,
    TempDir, TestCgroup, Veth,
};
use serde_json::Value;

const NODE1: &str = "fd84::1";
const NODE2: &str = "fd84::2";
/// A second address on node 1's end that the IP cache does not know: WORLD.
const OUTSIDER: &str = "fd84::99";
const DB_PORT: u16 = 6333;
/// A port the policy opens on the DB but nothing listens on: a connect there is refused by
/// node 2's kernel (the `tcpagain` attempt's first connect).
const CLOSED_PORT: u16 = DB_PORT + 1;
const KEY1: &str = "1 000102030405060708090a0b0c0d0e0f";
const KEY2: &str = "2 f0e0d0c0b0a090807060504030201000";

const POLICIES: &str = r#"@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };

@id("tenant-isolation")
@atlas("AML.T0085.000")
forbid (principal, action, resource)
when { resource has tenant && principal.tenant != resource.tenant };
"#;

fn inventory(root: &str) -> String {
    format!(
        r#"tenants: [acme, globex]
workloads:
  - name: acme-retriever
    tenant: acme
    purpose: retrieval
    ring: prod
    cgroups: [{root}/node1/acme-retriever]
    ips: [{NODE1}/128]
  - name: globex-retriever
    tenant: globex
    purpose: retrieval
    ring: prod
    cgroups: [{root}/node1/globex-retriever]
endpoints:
  - name: acme-vectors
    tenant: acme
    kind: vector_db
    ips: [{NODE2}/128]
    ports: [{{port: {DB_PORT}, protocol: tcp, action: query}}, {{port: {CLOSED_PORT}, protocol: tcp, action: query}}]
    datasets: [acme-kb]
    ingress: enforce
"#
    )
}

/// The vector DB stand-in: `probe --serve` in node 2's namespace and a cgroup of node 2's
/// subtree, so that its listening socket is judged by node 2's ingress program.
type DbServer = ProbeServer;

/// Two nodes. Field order is drop order: servers and agents before the cgroups they use.
struct Bed {
    db: DbServer,
    node1: Agent,
    node2: Agent,
    keys1: PathBuf,
    keys2: PathBuf,
    n1: NetNs,
    _veth: Veth,
    n2: NetNs,
    cg: Cgroups,
    bundle: PolicyBundle,
    _pins1: PinDir,
    _pins2: PinDir,
    _tmp: TempDir,
}

struct Cgroups {
    acme: TestCgroup,
    globex: TestCgroup,
    stranger: TestCgroup,
    db: TestCgroup,
    node1: TestCgroup,
    node2: TestCgroup,
    root: TestCgroup,
}

impl Bed {
    fn new() -> Result<Self> {
        let root = TestCgroup::create(unique_name("wr"))?;
        let node1 = root.child("node1")?;
        let node2 = root.child("node2")?;
        let cg = Cgroups {
            acme: node1.child("acme-retriever")?,
            globex: node1.child("globex-retriever")?,
            stranger: root.child("stranger")?,
            db: node2.child("acme-vectors")?,
            node1,
            node2,
            root,
        };
        let bundle = PolicyBundle::new(&[
            ("inventory.yaml", &inventory(&cg.root.relative_str())),
            ("schema.cedarschema", SCHEMA),
            ("policies.cedar", POLICIES),
        ])?;
        let tmp = TempDir::new("wr-keys")?;
        let keys1 = tmp.path().join("node1.keys");
        let keys2 = tmp.path().join("node2.keys");
        enforcer_tests::util::write_secret(&keys1, format!("{KEY1}\n"))?;
        enforcer_tests::util::write_secret(&keys2, format!("{KEY1}\n"))?;

        let n1 = NetNs::create(&unique_name("wr1"))?;
        let n2 = NetNs::create(&unique_name("wr2"))?;
        let veth = Veth::create(
            &n1,
            &[&format!("{NODE1}/64"), &format!("{OUTSIDER}/64")],
            &n2,
            &[&format!("{NODE2}/64")],
        )?;

        let pins1 = PinDir::new("wr-node1")?;
        let pins2 = PinDir::new("wr-node2")?;
        let agent = |node: &TestCgroup, pins: &PinDir, keys: &Path, extra: &[&str]| {
            let mut c = AgentConfig::new(bundle.path(), &node.relative_str(), pins.path());
            c.extra_args = vec!["--flow-key-file".into(), keys.display().to_string()];
            c.extra_args.extend(extra.iter().map(|a| a.to_string()));
            Agent::start(c)
        };
        let node1_agent = agent(&cg.node1, &pins1, &keys1, &[])?;
        // A wider skew than the default on the DB's node: step 4b shows the flag works.
        let node2_agent = agent(&cg.node2, &pins2, &keys2, &["--wire-max-skew", "60s"])?;
        let db = DbServer::start(
            Some(&n2),
            &cg.db,
            SocketAddr::new(NODE2.parse::<IpAddr>()?, DB_PORT),
        )?;
        Ok(Self {
            db,
            node1: node1_agent,
            node2: node2_agent,
            keys1,
            keys2,
            n1,
            _veth: veth,
            n2,
            cg,
            bundle,
            _pins1: pins1,
            _pins2: pins2,
            _tmp: tmp,
        })
    }

    fn pin_dir(agent: &Agent) -> PathBuf {
        enforcer::datapath::pin_dir(&agent.config().pin_path)
    }

    fn probe(&self, cgroup: &TestCgroup) -> Probe {
        Probe::new().in_cgroup(cgroup).in_netns(&self.n1)
    }

    /// The identity number of a workload, as both nodes compiled it.
    fn identity(&self, name: &str) -> Result<u32> {
        let bundle = enforcer_policy::Bundle::load(self.bundle.path())
            .map_err(|d| anyhow::anyhow!("bundle: {d:?}"))?;
        let compiled = bundle.compile()?;
        Ok(compiled
            .identity_by_name(name)
            .with_context(|| format!("no identity {name}"))?
            .id)
    }

    /// Writes a node's key file and waits until its agent has the keys in the kernel.
    fn set_keys(&self, node: u8, text: &str) -> Result<()> {
        let (file, agent) = match node {
            1 => (&self.keys1, &self.node1),
            _ => (&self.keys2, &self.node2),
        };
        let want = parse_keys(file, text)?;
        let want = (
            want.current.id as u32,
            want.previous.map_or(0, |k| k.id as u32),
        );
        std::fs::write(file, text)?;
        let dir = Self::pin_dir(agent);
        ensure!(
            wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                key_ids(&dir).ok() == Some(want)
            }),
            "node {node} did not load keys {want:?}: {:?}\n{}",
            key_ids(&dir),
            agent.stderr_tail()
        );
        Ok(())
    }

    /// The identity node 2 verified for a client address, if any.
    fn verified(&self, client: SocketAddr) -> Result<Option<u32>> {
        Ok(verified_peers(&Self::pin_dir(&self.node2))?
            .into_iter()
            .find(|p| p.client == client)
            .map(|p| p.identity))
    }

    fn ingress_events(&self) -> Result<Vec<Value>> {
        Ok(self
            .node2
            .verdict_events()?
            .into_iter()
            .filter(|e| e["hook"] == "ingress")
            .collect())
    }
}

fn key(line: &str) -> FlowKey {
    parse_keys(Path::new("key"), line)
        .expect("test key")
        .current
}

/// The whole option times node 2's `SPENT_TAGS` holds for SYNs from client port `sport` to
/// port `dport` (read from the pin): the options a replay of those connections would carry.
fn spent_times(bed: &Bed, sport: u16, dport: u16) -> Result<Vec<u32>> {
    let spent = spent_options(&Bed::pin_dir(&bed.node2))?;
    Ok(spent
        .into_iter()
        .filter(|(key, _)| key.sport == sport && key.dport == dport)
        .map(|(_, at)| at)
        .collect())
}

/// Sends one SYN from `[source]:sport` to the DB with `extra` TCP options (a multiple of 4
/// bytes) on a raw socket of the test process (no enforcer judges it) inside node 1's
/// namespace; the kernel fills in the IPv6 header and the checksum (`IPV6_CHECKSUM`).
fn raw_syn(ns: &NetNs, source: &str, sport: u16, extra: &[u8]) -> Result<()> {
    raw_syn_with(ns, source, sport, DB_PORT, extra, false)
}

/// [`raw_syn`] to the DB's port `dport`, with `dstopts` behind an empty Destination Options
/// header (next header 60, one PadN option): the TCP header is no longer right after the
/// fixed IPv6 header.
fn raw_syn_with(
    ns: &NetNs,
    source: &str,
    sport: u16,
    dport: u16,
    extra: &[u8],
    dstopts: bool,
) -> Result<()> {
    let tcp = raw_tcp::segment(sport, dport, raw_tcp::SYN, (raw_tcp::ISN, 0), extra)?;
    ns.run_in(|| raw_tcp::send(source, NODE2, &tcp, dstopts))?
}

/// Sends a SYN without the option from `[source]:sport` to the DB and returns the sequence
/// number of the DB's SYN-ACK (its SYN cookie, with `tcp_syncookies=2` on node 2).
fn syn_cookie(ns: &NetNs, source: &str, sport: u16) -> Result<u32> {
    let syn = raw_tcp::segment(sport, DB_PORT, raw_tcp::SYN, (raw_tcp::ISN, 0), &[])?;
    raw_tcp::reply(ns, (source, NODE2), &syn, raw_tcp::SYN | raw_tcp::ACK)?
        .with_context(|| format!("no SYN-ACK from the DB to [{source}]:{sport} within 5 s"))
}

/// Sends the ACK of a raw SYN from `[OUTSIDER]:sport` that carries `cookie`, the sequence
/// number of the DB's SYN-ACK.
fn cookie_ack(bed: &Bed, sport: u16, cookie: u32) -> Result<()> {
    let numbers = (raw_tcp::ISN + 1, cookie.wrapping_add(1));
    let ack = raw_tcp::segment(sport, DB_PORT, raw_tcp::ACK, numbers, &[])?;
    bed.n1
        .run_in(|| raw_tcp::send(OUTSIDER, NODE2, &ack, false))?
}

/// Writes node 2's inventory and waits until node 2's agent has applied it.
fn apply_inventory(bed: &Bed, text: &str) -> Result<()> {
    let before = bed.node2.status()?["agent"]["revision"].clone();
    bed.bundle.write_file("inventory.yaml", text)?;
    ensure!(
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            bed.node2
                .status()
                .is_ok_and(|s| s["agent"]["revision"] != before)
        }),
        "node 2 did not apply the new inventory\n{}",
        bed.node2.stderr_tail()
    );
    Ok(())
}

/// MSS, then the identity option (20 bytes): 24 bytes of options.
fn options_with(identity_option: &[u8; 20]) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xa0];
    o.extend_from_slice(identity_option);
    o
}

fn node1_addr(port: u16) -> SocketAddr {
    SocketAddr::new(NODE1.parse().expect("literal"), port)
}

/// Waits for exactly `n` ingress events matching `pred` (and, after a settle, no more).
fn expect_ingress(bed: &Bed, n: usize, pred: impl Fn(&Value) -> bool, what: &str) -> Result<Value> {
    bed.node2
        .wait_for(n, Duration::from_secs(10), |e| {
            e["hook"] == "ingress" && pred(e)
        })
        .with_context(|| what.to_string())?;
    let settled = bed
        .node2
        .settled_events(Duration::from_millis(1500), Duration::from_secs(10))?;
    let matching: Vec<&Value> = settled
        .iter()
        .filter(|e| e["hook"] == "ingress" && pred(e))
        .collect();
    ensure!(
        matching.len() == n,
        "{what}: want exactly {n} ingress events, got {}: {}",
        matching.len(),
        serde_json::to_string(&matching)?
    );
    Ok(matching[n - 1].clone())
}

#[test]
fn identity_option_is_written_checked_and_rotated_across_two_nodes() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let bed = Bed::new()?;
    let acme = bed.identity("acme-retriever")?;
    let db = bed.identity("acme-vectors")?;
    let addr = format!("tcp:[{NODE2}]:{DB_PORT}");

    // 1. Same tenant: connects, and node 2 verified the identity of that very 4-tuple.
    bed.probe(&bed.cg.acme)
        .expect_outcome(&addr, Outcome::Ok, "acme-retriever -> acme-vectors")?;
    let mut accepted = Vec::new();
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            accepted.extend(bed.db.accepted());
            !accepted.is_empty()
        }),
        "the DB accepted nothing"
    );
    ensure!(accepted.len() == 1, "accepted {accepted:?}");
    let client = accepted[0];
    ensure!(
        bed.verified(client)? == Some(acme),
        "node 2 verified {:?} for {client}, want acme-retriever ({acme}); peers: {:?}",
        bed.verified(client)?,
        verified_peers(&Bed::pin_dir(&bed.node2))?
    );
    ensure!(
        bed.ingress_events()?.is_empty(),
        "{:?}",
        bed.ingress_events()?
    );

    // 2. Another tenant: denied at connect on node 1; nothing reaches node 2.
    bed.probe(&bed.cg.globex).expect_outcome(
        &addr,
        Outcome::Eperm,
        "globex-retriever -> acme-vectors",
    )?;
    bed.node1.wait_for(1, Duration::from_secs(10), |e| {
        e["reason"] == "tenant_mismatch" && e["destination"]["name"] == "acme-vectors"
    })?;

    // 3. A client no enforcer manages, from an address the IP cache knows (acme-retriever's):
    //    no option, dropped at node 2's ingress, one event however often the SYN is resent.
    let r = bed
        .probe(&bed.cg.stranger)
        .run_one(&format!("{addr}@{NODE1}"))?;
    ensure!(r.outcome == Outcome::Error, "unmanaged client got {r:?}");
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "missing_tag",
        "unmanaged client",
    )?;
    ensure!(
        e["verdict"] == "deny" && e["type"] == "connection.denied",
        "{e}"
    );
    ensure!(e["subject"]["identity"] == acme, "{e}");
    // The source address is the sender's word: its owner is named as the peer's, not as
    // the subject (it named acme-retriever, so a spoofer could accuse any workload).
    ensure!(
        e["subject"]["workload"].is_null()
            && e["subject"]["tenant"].is_null()
            && e["peer"]["workload"] == "acme-retriever",
        "{e}"
    );
    ensure!(e["destination"]["identity"] == db, "{e}");
    ensure!(e["destination"]["port"] == DB_PORT, "{e}");
    ensure!(e["peer"]["ip"] == NODE1, "{e}");
    // The cgroup is the listener's, on this node: the destination's, never the peer's
    // (it was reported as the remote subject's).
    ensure!(
        e["subject"]["cgroup_id"] == 0
            && e["subject"].get("cgroup").is_none()
            && e["destination"]["cgroup_id"]
                .as_u64()
                .is_some_and(|id| id != 0)
            && e["destination"]["cgroup"]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/acme-vectors")),
        "the ingress event's cgroup is not the destination's: {e}"
    );

    // 4. Forged: the right layout claiming acme-retriever, a tag made with a key no enforcer
    //    holds. Then the same claim tagged by userspace with the real key passes and is
    //    recorded: the kernel computes the MAC userspace computes.
    let forger = key("9 00000000000000000000000000000000");
    let k1 = key(KEY1);
    let (s, d): (IpAddr, IpAddr) = (NODE1.parse()?, NODE2.parse()?);
    raw_syn(
        &bed.n1,
        NODE1,
        45001,
        &options_with(&option(&forger, acme, now_stamp()?, s, d, 45001, DB_PORT)),
    )?;
    let e = expect_ingress(&bed, 1, |e| e["reason"] == "bad_tag", "forged tag")?;
    ensure!(
        e["subject"]["identity"] == acme && e["peer"]["port"] == 45001,
        "{e}"
    );
    // A forged claim names no workload and no tenant (it named acme-retriever, so anyone
    // could write events accusing any workload into its tenant's feed).
    ensure!(
        e["subject"]["workload"].is_null()
            && e["subject"]["tenant"].is_null()
            && e["subject_chain"] == serde_json::json!([]),
        "a forged claim was attributed: {e}"
    );
    ensure!(bed.verified(node1_addr(45001))?.is_none());
    // Right key id, wrong tag: still refused.
    let mut wrong = option(&k1, acme, now_stamp()?, s, d, 45002, DB_PORT);
    wrong[19] ^= 1;
    raw_syn(&bed.n1, NODE1, 45002, &options_with(&wrong))?;
    expect_ingress(&bed, 2, |e| e["reason"] == "bad_tag", "flipped tag bit")?;
    raw_syn(
        &bed.n1,
        NODE1,
        45003,
        &options_with(&option(&k1, acme, now_stamp()?, s, d, 45003, DB_PORT)),
    )?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45003)).ok().flatten() == Some(acme)
        }),
        "the userspace-tagged SYN was not verified by node 2: {:?}\n{:?}",
        verified_peers(&Bed::pin_dir(&bed.node2))?,
        bed.ingress_events()?
    );

    // 4b. Freshness: a SYN tagged with the real key but stamped 90 s ago (a captured SYN
    //     replayed, e.g. by the pod that later got the same IP and source port) is refused:
    //     one `stale_tag` event, nothing recorded. So is one 90 s ahead, and a genuine
    //     version 1 option (no time; no `--wire-accept-v1-until` here). Node 2 runs with
    //     `--wire-max-skew 60s`: a SYN 45 s old, refused by the default 30 s, passes. On code
    //     without the check, the time field was not judged at all (step 4's SYN used to carry
    //     an arbitrary 7 there) and the first replay below was verified as acme-retriever.
    let stamp = now_stamp()?;
    raw_syn(
        &bed.n1,
        NODE1,
        45011,
        &options_with(&option(
            &k1,
            acme,
            stamp.wrapping_sub(90),
            s,
            d,
            45011,
            DB_PORT,
        )),
    )?;
    let e = expect_ingress(&bed, 1, |e| e["reason"] == "stale_tag", "replayed SYN")?;
    ensure!(
        e["verdict"] == "deny"
            && e["subject"]["identity"] == acme
            && e["peer"]["port"] == 45011
            && e["policy"]["id"] == "identity-tag-stale",
        "{e}"
    );
    ensure!(bed.verified(node1_addr(45011))?.is_none());
    raw_syn(
        &bed.n1,
        NODE1,
        45012,
        &options_with(&option(
            &k1,
            acme,
            stamp.wrapping_add(90),
            s,
            d,
            45012,
            DB_PORT,
        )),
    )?;
    expect_ingress(
        &bed,
        2,
        |e| e["reason"] == "stale_tag",
        "SYN from the future",
    )?;
    raw_syn(
        &bed.n1,
        NODE1,
        45013,
        &options_with(&option_version(
            &k1,
            acme,
            7,
            enforcer_common::wire::VERSION_1,
            s,
            d,
            45013,
            DB_PORT,
        )),
    )?;
    expect_ingress(&bed, 3, |e| e["reason"] == "stale_tag", "version 1 option")?;
    ensure!(bed.verified(node1_addr(45012))?.is_none());
    ensure!(bed.verified(node1_addr(45013))?.is_none());
    // A SYN captured one 16-bit wrap ago (2^16 s, ~18.2 h): its time field reads exactly
    // "now", but the tag covers the time's high bits, which the receiver takes from its own
    // clock: bad_tag. Before the high bits were MAC'd, this replay verified as acme.
    raw_syn(
        &bed.n1,
        NODE1,
        45015,
        &options_with(&option(
            &k1,
            acme,
            stamp.wrapping_sub(1 << 16),
            s,
            d,
            45015,
            DB_PORT,
        )),
    )?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "bad_tag" && e["peer"]["port"] == 45015,
        "SYN replayed one wrap later",
    )?;
    ensure!(e["verdict"] == "deny", "{e}");
    ensure!(bed.verified(node1_addr(45015))?.is_none());
    // Control: the replayed 4-tuple with a current time, then one 45 s old (inside node 2's
    // 60 s skew): both verified.
    raw_syn(
        &bed.n1,
        NODE1,
        45011,
        &options_with(&option(&k1, acme, now_stamp()?, s, d, 45011, DB_PORT)),
    )?;
    raw_syn(
        &bed.n1,
        NODE1,
        45014,
        &options_with(&option(
            &k1,
            acme,
            now_stamp()?.wrapping_sub(45),
            s,
            d,
            45014,
            DB_PORT,
        )),
    )?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45011)).ok().flatten() == Some(acme)
                && bed.verified(node1_addr(45014)).ok().flatten() == Some(acme)
        }),
        "fresh SYNs not verified by node 2: {:?}\n{:?}",
        verified_peers(&Bed::pin_dir(&bed.node2))?,
        bed.ingress_events()?
    );
    expect_ingress(&bed, 3, |e| e["reason"] == "stale_tag", "no more stale_tag")?;

    // 4c. A replay within the skew: acme-retriever connects (its kernel tags the SYN) and
    //     resets the connection, so node 2's server socket closes at once and hands the
    //     option to `SPENT_TAGS`. That SYN's option sent again on its 4-tuple (what the pod
    //     that next gets node 1's address could send seconds later) verifies and is fresh,
    //     and finds the 4-tuple free in `WIRE_PEERS`, but its connection has been and gone:
    //     `replayed_tag`, nothing recorded (found through the `SPENT_RECENT` filter, which
    //     must have been raised for it). Before `SPENT_TAGS` it was verified as
    //     acme-retriever again. The option's time is read from node 2's `SPENT_TAGS` (and
    //     checked to lie within the connect's bracket); the second before it (a new
    //     connection's option on the same 4-tuple) passes.
    let before = now_stamp()?;
    bed.probe(&bed.cg.acme).expect_outcome(
        &format!("tcprst:[{NODE2}]:{DB_PORT}"),
        Outcome::Ok,
        "acme-retriever -> acme-vectors, then a reset",
    )?;
    let after = now_stamp()?;
    let mut reset = Vec::new();
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            reset.extend(bed.db.accepted());
            !reset.is_empty()
        }),
        "the DB accepted nothing"
    );
    ensure!(reset.len() == 1, "accepted {reset:?}");
    let sport = reset[0].port();
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            matches!(bed.verified(reset[0]), Ok(None))
        }),
        "the reset connection's record stayed: {:?}",
        verified_peers(&Bed::pin_dir(&bed.node2))?
    );
    let taken = spent_times(&bed, sport, DB_PORT)?;
    ensure!(
        matches!(taken[..], [t] if before <= t && t <= after),
        "SPENT_TAGS holds {taken:?} for port {sport}, not one time in {before}..={after}"
    );
    // Node 1's kernel picks the connection's source among its addresses (`OUTSIDER` too).
    let source = reset[0].ip();
    for stamp in [taken[0], taken[0] - 1] {
        raw_syn(
            &bed.n1,
            &source.to_string(),
            sport,
            &options_with(&option(&k1, acme, stamp, source, d, sport, DB_PORT)),
        )?;
        // The SYN-ACK of a passing one meets node 1's reset before the next SYN.
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "replayed_tag",
        "the reset connection's SYN replayed",
    )?;
    ensure!(
        e["verdict"] == "deny"
            && e["subject"]["identity"] == acme
            && e["peer"]["port"] == sport
            && e["policy"]["id"] == "identity-tag-replayed",
        "{e}"
    );
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(reset[0]).ok().flatten() == Some(acme)
        }),
        "a new connection's option on the same 4-tuple was not verified: {:?}\n{:?}",
        verified_peers(&Bed::pin_dir(&bed.node2))?,
        bed.ingress_events()?
    );

    // 4d. A replay of a SYN whose handshake never completed: the first copy is answered
    //     (node 1's kernel resets the SYN-ACK, so no connection is made), the second is
    //     `replayed_tag`. Option version 3 is spent by its first SYN; before, nothing was
    //     recorded for a connection that was never accepted, and the copy verified as
    //     acme-retriever for the whole skew. A version 2 option (a node of the previous
    //     release, whose retransmissions repeat the connect's time) still passes twice.
    let stamp = now_stamp()?;
    let first = options_with(&option(&k1, acme, stamp, s, d, 45016, DB_PORT));
    raw_syn(&bed.n1, NODE1, 45016, &first)?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45016)).ok().flatten() == Some(acme)
        }),
        "the first copy was not verified"
    );
    std::thread::sleep(Duration::from_millis(100));
    raw_syn(&bed.n1, NODE1, 45016, &first)?;
    let e = expect_ingress(
        &bed,
        2,
        |e| e["reason"] == "replayed_tag",
        "the never-accepted SYN's second copy",
    )?;
    ensure!(e["peer"]["port"] == 45016, "{e}");
    let v2 = options_with(&option_version(
        &k1,
        acme,
        stamp,
        enforcer_common::wire::VERSION_2,
        s,
        d,
        45017,
        DB_PORT,
    ));
    raw_syn(&bed.n1, NODE1, 45017, &v2)?;
    std::thread::sleep(Duration::from_millis(100));
    raw_syn(&bed.n1, NODE1, 45017, &v2)?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45017)).ok().flatten() == Some(acme)
        }),
        "a version 2 option was not verified"
    );
    let refused_v2: Vec<Value> = bed
        .node2
        .settled_events(Duration::from_millis(1500), Duration::from_secs(10))?
        .into_iter()
        .filter(|e| e["hook"] == "ingress" && e["peer"]["port"] == 45017)
        .collect();
    ensure!(
        refused_v2.is_empty(),
        "a version 2 SYN sent twice was refused: {refused_v2:?}"
    );

    // 5. Rotation. Node 2 learns key 2 (key 1 still signs), node 1 signs with key 2: both
    //    verify; then node 2 drops key 1 and a SYN signed with it is refused.
    bed.set_keys(2, &format!("{KEY1}\n{KEY2}\n"))?;
    bed.set_keys(1, &format!("{KEY2}\n{KEY1}\n"))?;
    let k2 = key(KEY2);
    bed.probe(&bed.cg.acme).expect_outcome(
        &addr,
        Outcome::Ok,
        "signed with key 2 during the rotation",
    )?;
    raw_syn(
        &bed.n1,
        NODE1,
        45004,
        &options_with(&option(&k1, acme, now_stamp()?, s, d, 45004, DB_PORT)),
    )?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45004)).ok().flatten() == Some(acme)
        }),
        "key 1 not accepted during the rotation"
    );
    bed.set_keys(2, &format!("{KEY2}\n"))?;
    raw_syn(
        &bed.n1,
        NODE1,
        45005,
        &options_with(&option(&k1, acme, now_stamp()?, s, d, 45005, DB_PORT)),
    )?;
    expect_ingress(
        &bed,
        4,
        |e| e["reason"] == "bad_tag",
        "key 1 after the rotation",
    )?;
    raw_syn(
        &bed.n1,
        NODE1,
        45006,
        &options_with(&option(&k2, acme, now_stamp()?, s, d, 45006, DB_PORT)),
    )?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            bed.verified(node1_addr(45006)).ok().flatten() == Some(acme)
        }),
        "key 2 not accepted after the rotation"
    );
    bed.probe(&bed.cg.acme).expect_outcome(
        &addr,
        Outcome::Ok,
        "signed with key 2 after the rotation",
    )?;

    // 6. A claim with a valid tag that the policy does not allow here (another tenant):
    //    not_allowed, attributed to the Cedar policy that forbids it.
    let globex = bed.identity("globex-retriever")?;
    raw_syn(
        &bed.n1,
        NODE1,
        45007,
        &options_with(&option(&k2, globex, now_stamp()?, s, d, 45007, DB_PORT)),
    )?;
    let e = expect_ingress(&bed, 1, |e| e["reason"] == "not_allowed", "globex claim")?;
    ensure!(e["subject"]["identity"] == globex, "{e}");
    ensure!(e["subject"]["tenant"] == "globex", "{e}");
    ensure!(e["policy"]["id"] == "tenant-isolation", "{e}");
    ensure!(bed.verified(node1_addr(45007))?.is_none());

    // 6b. A valid claim of an identity quarantined on the DB's node only (node 1 still lets
    //     it connect): refused at ingress, `quarantined`; released, it is allowed again.
    let node2_pins = bed.node2.config().pin_path.display().to_string();
    let out = enforcer(&[
        "quarantine",
        "add",
        "acme-retriever",
        "--pin-path",
        &node2_pins,
    ])?;
    ensure!(out.success(), "quarantine add on node 2: {out}");
    raw_syn(
        &bed.n1,
        NODE1,
        45009,
        &options_with(&option(&k2, acme, now_stamp()?, s, d, 45009, DB_PORT)),
    )?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "quarantined",
        "quarantined claim",
    )?;
    ensure!(e["subject"]["identity"] == acme, "{e}");
    ensure!(bed.verified(node1_addr(45009))?.is_none());
    let out = enforcer(&[
        "quarantine",
        "release",
        "acme-retriever",
        "--pin-path",
        &node2_pins,
    ])?;
    ensure!(out.success(), "quarantine release on node 2: {out}");

    // 6c. A SYN behind an IPv6 extension header (an empty Destination Options header) from
    //     outside the cluster: the check steps over the header (as it must over the
    //     hop-by-hop jumbo header of every BIG TCP packet) and judges the SYN as what it is,
    //     untagged from WORLD: `not_allowed` at its real port, never passed as "not a SYN".
    raw_syn_with(&bed.n1, OUTSIDER, 45010, DB_PORT, &[2, 4, 0x05, 0xa0], true)?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "not_allowed" && e["peer"]["ip"] == OUTSIDER,
        "SYN behind a Destination Options header",
    )?;
    ensure!(e["verdict"] == "deny", "{e}");
    ensure!(
        e["peer"]["port"] == 45010 && e["destination"]["port"] == DB_PORT,
        "{e}"
    );

    // 7. An untagged peer the IP cache does not know is WORLD, judged by the policy on WORLD
    //    (none lets WORLD query the DB): not_allowed, not missing_tag.
    raw_syn(&bed.n1, OUTSIDER, 45008, &[2, 4, 0x05, 0xa0])?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "not_allowed" && e["peer"]["port"] == 45008,
        "untagged SYN from outside",
    )?;
    ensure!(
        e["subject"]["identity"] == 1 && e["peer"]["ip"] == OUTSIDER,
        "{e}"
    );
    ensure!(e["policy"]["id"] == "implicit-deny", "{e}");

    // 8. Ingress `audit`: the same unmanaged client now connects, reported as audit.
    let inventory =
        inventory(&bed.cg.root.relative_str()).replace("ingress: enforce", "ingress: audit");
    bed.bundle.write_file("inventory.yaml", &inventory)?;
    let r = bed.probe(&bed.cg.stranger).until(
        Outcome::Ok,
        &format!("{addr}@{NODE1}"),
        Duration::from_millis(100),
        Duration::from_secs(30),
    )?;
    ensure!(
        r.reached,
        "the unmanaged client was still refused after the switch to audit: {r:?}"
    );
    let audited = bed.node2.wait_for(1, Duration::from_secs(10), |e| {
        e["hook"] == "ingress" && e["verdict"] == "audit" && e["reason"] == "missing_tag"
    })?;
    let e = audited
        .iter()
        .find(|e| e["verdict"] == "audit")
        .context("audit event")?;
    ensure!(
        e["type"] == "connection.audited" && e["subject"]["identity"] == acme,
        "{e}"
    );

    if !bed.node1.denies()?.iter().all(|e| e["hook"] != "ingress") {
        bail!("node 1 reported ingress events: {:?}", bed.node1.denies()?);
    }
    Ok(())
}

/// A connecting socket keeps its option for its SYN retransmissions whatever other sockets
/// do: node 2 refuses acme-retriever's first SYN (it holds only key 2 for a moment), then
/// 40,000 connects that node 1 tags and abandons at once churn the node's sockets, then
/// node 2 learns key 1 again: the retransmitted SYN still carries its option, verifies,
/// and connects. With the option in a node-wide LRU of 16,384 by socket cookie, the churn
/// pushed it out, every retransmission went untagged and was refused (`missing_tag`, or
/// `not_allowed` as WORLD when node 1 picked its other address), and the connect timed out.
/// Then a socket whose first connect was refused connects again: its SYN carries the new
/// connect's option.
#[test]
fn a_connecting_socket_keeps_its_option_through_other_sockets_churn() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const CHURN: u64 = 40_000;
    let bed = Bed::new()?;
    let acme = bed.identity("acme-retriever")?;
    let addr = format!("[{NODE2}]:{DB_PORT}");
    bed.set_keys(2, &format!("{KEY2}\n"))?;

    std::thread::scope(|s| -> Result<()> {
        let victim_probe = bed.probe(&bed.cg.acme).timeout(Duration::from_secs(150));
        let victim_call = format!("tcpwait:{addr}");
        let victim = s.spawn(move || victim_probe.run_one(&victim_call));
        // Its first SYN reached node 2 and was refused there.
        expect_ingress(
            &bed,
            1,
            |e| e["reason"] == "bad_tag" && e["subject"]["identity"] == acme,
            "the first SYN, signed with a key node 2 does not hold",
        )?;
        let churn = bed
            .probe(&bed.cg.acme)
            .timeout(Duration::from_secs(300))
            .repeat(CHURN, &format!("tcpsyn:{addr}"))?;
        ensure!(churn.ok == CHURN, "abandoned connects: {churn:?}");
        bed.set_keys(2, &format!("{KEY2}\n{KEY1}\n"))?;
        let r = victim.join().expect("victim thread")?;
        ensure!(
            r.outcome == Outcome::Ok,
            "the retransmitted SYN did not connect: {r:?}"
        );
        Ok(())
    })?;
    // A socket that connects again after a failed connect (refused by the port next to the
    // DB's) sends this connect's option, not the last one's: before, socket storage handed
    // the old value back (its 4-tuple names the other port: `bad_tag`, and a timeout).
    bed.probe(&bed.cg.acme).expect_outcome(
        &format!("tcpagain:{addr}"),
        Outcome::Ok,
        "the same socket, connecting again",
    )?;
    // Every refusal was of a signed SYN (the victim's first, the churn's): none untagged.
    let settled = bed
        .node2
        .settled_events(Duration::from_millis(1500), Duration::from_secs(20))?;
    let untagged: Vec<&Value> = settled
        .iter()
        .filter(|e| e["hook"] == "ingress" && e["reason"] != "bad_tag")
        .collect();
    ensure!(
        untagged.is_empty(),
        "refused SYNs other than bad_tag: {untagged:?}"
    );
    Ok(())
}

/// Each transmission of a SYN carries its own time (option version 3), so node 2 can take
/// every option once and refuse any copy without refusing the client's own retransmissions.
/// A server whose accept queue is full drops acme-retriever's first SYN after node 2's check
/// passed (and spent) it; the retransmission, a second or more later, carries a later time,
/// passes, and connects once the server accepts. A copy of the first SYN is `replayed_tag`.
/// With the connect's time on every transmission (version 2) the retransmission was that
/// very option again.
#[test]
fn a_retransmitted_syn_carries_a_new_time_and_a_copy_of_the_first_is_refused() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let bed = Bed::new()?;
    let acme = bed.identity("acme-retriever")?;
    let release = bed._tmp.path().join("release");
    let server = SocketAddr::new(NODE2.parse::<IpAddr>()?, CLOSED_PORT);
    let held = ProbeServer::start_held(Some(&bed.n2), &bed.cg.db, server, &release)?;
    let peers = || -> Result<Vec<enforcer::wire::VerifiedPeer>> {
        Ok(verified_peers(&Bed::pin_dir(&bed.node2))?
            .into_iter()
            .filter(|p| p.server == server)
            .collect())
    };
    let addr = format!("[{NODE2}]:{CLOSED_PORT}");
    // The connection that fills the accept queue (established in the kernel, never accepted).
    bed.probe(&bed.cg.acme).expect_outcome(
        &format!("tcp:{addr}"),
        Outcome::Ok,
        "the queue's one connection",
    )?;
    let mut filler = None;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            filler = peers()
                .ok()
                .and_then(|p| p.into_iter().find(|p| p.accepted));
            filler.is_some()
        }),
        "node 2 recorded no established connection: {:?}",
        peers()
    );
    let filler = filler.context("filler")?.client;
    // A SYN on the first SYN's 4-tuple with an option of the whole time `time` (the first
    // SYN's own: a copy of it) and the sequence number `seq`.
    let send_syn = |first: &enforcer::wire::VerifiedPeer, time: u32, seq: u32| -> Result<()> {
        let IpAddr::V6(client_ip) = first.client.ip() else {
            bail!("an IPv6 client expected: {first:?}");
        };
        let option = options_with(&option(
            &key(KEY1),
            acme,
            time,
            first.client.ip(),
            server.ip(),
            first.client.port(),
            CLOSED_PORT,
        ));
        let port = first.client.port();
        let tcp = raw_tcp::segment(port, CLOSED_PORT, raw_tcp::SYN, (seq, 0), &option)?;
        bed.n1
            .run_in(|| raw_tcp::send(&client_ip.to_string(), NODE2, &tcp, false))?
    };

    let first = std::thread::scope(|s| -> Result<enforcer::wire::VerifiedPeer> {
        let probe = bed.probe(&bed.cg.acme).timeout(Duration::from_secs(150));
        let call = format!("tcpwait:{addr}");
        let client = s.spawn(move || probe.run_one(&call));
        // Its first SYN passed node 2's check (recorded, not established): the server's full
        // queue dropped it.
        let mut first = None;
        ensure!(
            wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
                first = peers()
                    .ok()
                    .and_then(|p| p.into_iter().find(|p| p.client != filler));
                first.is_some()
            }),
            "node 2 saw no second SYN: {:?}",
            peers()
        );
        let first = first.context("first SYN")?;
        ensure!(!first.accepted, "the queue was not full: {first:?}");
        std::fs::write(&release, "")?;
        let r = client.join().expect("client thread")?;
        ensure!(
            r.outcome == Outcome::Ok,
            "the retransmitted SYN did not connect: {r:?}"
        );
        let mut accepted = None;
        ensure!(
            wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                accepted = peers().ok().and_then(|p| {
                    p.into_iter()
                        .find(|p| p.client == first.client && p.accepted)
                });
                accepted.is_some()
            }),
            "the client's connection was not recorded: {:?}",
            peers()
        );
        let accepted = accepted.context("accepted")?;
        ensure!(
            accepted.identity == acme && accepted.stamp != first.stamp,
            "the connecting SYN carried the first one's time {}: {accepted:?}",
            first.stamp
        );
        Ok(first)
    })?;
    // Copies of the first SYN, whose option the retransmission handed to `SPENT_TAGS` when it
    // replaced the first SYN's record (`spend_held`). Once the connection has closed (the
    // server goes, and another listens on its port: the check runs for a socket of the
    // DB's), the 4-tuple is free:
    // - a copy takes the record's place and is refused by the `SPENT_TAGS` lookup, which the
    //   filter in front of it allows only if that hand-over raised the option's
    //   `SPENT_RECENT` slot (nothing else wrote that option: red-team review 65 L2);
    // - a new option on the 4-tuple (a second before the first SYN's time: never sent) passes
    //   and holds it, and a copy then is refused by the `BPF_NOEXIST` insert that finds the
    //   option taken (`spend_first`).
    // Each with another sequence number, so that each refusal is reported (`INGRESS_REPORTED`).
    drop(held);
    let _listening = ProbeServer::start(Some(&bed.n2), &bed.cg.db, server)?;
    ensure!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            peers().is_ok_and(|p| p.iter().all(|p| p.client != first.client))
        }),
        "the closed connection's record stayed: {:?}",
        peers()
    );
    // The first SYN's time is the earliest the 4-tuple spent (the record the test saw first
    // could be a retransmission's, had its polling stalled for a second).
    let first_time = spent_times(&bed, first.client.port(), CLOSED_PORT)?
        .into_iter()
        .min()
        .context("nothing spent for the connection")?;
    ensure!(
        first_time <= enforcer_common::wire::claimed_seconds(first.stamp, now_stamp()?),
        "spent {first_time}, after the first record seen ({})",
        first.stamp
    );
    send_syn(&first, first_time, raw_tcp::ISN)?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["reason"] == "replayed_tag",
        "a copy of the first SYN on the free 4-tuple",
    )?;
    ensure!(e["peer"]["port"] == first.client.port(), "{e}");
    send_syn(&first, first_time - 1, raw_tcp::ISN.wrapping_add(1))?;
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            peers().is_ok_and(|p| {
                p.iter()
                    .any(|p| p.client == first.client && p.stamp == (first_time - 1) as u16)
            })
        }),
        "a new option on the 4-tuple was not verified: {:?}",
        peers()
    );
    send_syn(&first, first_time, raw_tcp::ISN.wrapping_add(2))?;
    let e = expect_ingress(
        &bed,
        2,
        |e| e["reason"] == "replayed_tag",
        "a copy of the first SYN on the held 4-tuple",
    )?;
    ensure!(e["peer"]["port"] == first.client.port(), "{e}");
    // Nothing else was refused: the retransmissions passed.
    let refused: Vec<Value> = bed
        .ingress_events()?
        .into_iter()
        .filter(|e| e["reason"] != "replayed_tag")
        .collect();
    ensure!(refused.is_empty(), "refused: {refused:?}");
    Ok(())
}

/// One node on IPv4 loopback: an agent holding the test key enforces `node`, acme's vector DB
/// (`ingress: enforce`, a `probe --serve` in its own cgroup) listens at `db_addr`, and each
/// acme workload of `workloads` (name, and the address it holds, if any) has a cgroup of its
/// own under `node`. Everything is removed on drop, the servers first.
struct LoopbackNode {
    db: DbServer,
    agent: Agent,
    pins: PinDir,
    _keys: TempDir,
    _bundle: PolicyBundle,
    compiled: enforcer_policy::Compiled,
    /// The workloads' cgroups, in `workloads` order, then the DB's.
    cgroups: Vec<TestCgroup>,
    _node: TestCgroup,
    root: TestCgroup,
}

impl LoopbackNode {
    fn start(pins: &str, db_addr: &str, workloads: &[(&str, Option<&str>)]) -> Result<Self> {
        let root = TestCgroup::create(unique_name("wr"))?;
        let node = root.child("node")?;
        let mut cgroups = Vec::new();
        let mut inventory = String::from("tenants: [acme]\nworkloads:\n");
        for (name, ip) in workloads {
            let cgroup = node.child(name)?;
            inventory += &format!(
                "  - name: {name}\n    tenant: acme\n    purpose: retrieval\n    ring: prod\n    \
                 cgroups: [{}]\n",
                cgroup.relative_str()
            );
            if let Some(ip) = ip {
                inventory += &format!("    ips: [{ip}/32]\n");
            }
            cgroups.push(cgroup);
        }
        inventory += &format!(
            r#"endpoints:
  - name: acme-vectors
    tenant: acme
    kind: vector_db
    ips: [{db_addr}/32]
    ports: [{{port: {DB_PORT}, protocol: tcp, action: query}}]
    ingress: enforce
"#
        );
        let db_cg = node.child("acme-vectors")?;
        let bundle = PolicyBundle::new(&[
            ("inventory.yaml", &inventory),
            ("schema.cedarschema", SCHEMA),
            ("policies.cedar", POLICIES),
        ])?;
        let keys = TempDir::new("wr-keys")?;
        let key_file = keys.path().join("keys");
        enforcer_tests::util::write_secret(&key_file, format!("{KEY1}\n"))?;
        let pins = PinDir::new(pins)?;
        let mut config = AgentConfig::new(bundle.path(), &node.relative_str(), pins.path());
        config.extra_args = vec!["--flow-key-file".into(), key_file.display().to_string()];
        let agent = Agent::start(config)?;
        let db = DbServer::start(None, &db_cg, SocketAddr::new(db_addr.parse()?, DB_PORT))?;
        cgroups.push(db_cg);
        let compiled = enforcer_policy::Bundle::load(bundle.path())
            .map_err(|d| anyhow::anyhow!("bundle: {d:?}"))?
            .compile()?;
        Ok(Self {
            db,
            agent,
            pins,
            _keys: keys,
            _bundle: bundle,
            compiled,
            cgroups,
            _node: node,
            root,
        })
    }

    /// The compiled identity number of the workload `name`.
    fn identity(&self, name: &str) -> Result<u32> {
        Ok(self
            .compiled
            .identity_by_name(name)
            .with_context(|| name.to_string())?
            .id)
    }

    /// The verified peers in this node's `WIRE_PEERS`.
    fn peers(&self) -> Result<Vec<enforcer::wire::VerifiedPeer>> {
        verified_peers(&enforcer::datapath::pin_dir(self.pins.path()))
    }
}

/// The same check on one node over IPv4 loopback (`127.84.0.0/16`): a tagged connect from a
/// managed workload to a local vector DB with ingress `enforce` is verified (the IPv4 form of
/// the MAC: addresses as `::ffff:a.b.c.d`), an unmanaged client from the workload's address is
/// dropped with one `missing_tag` event.
#[test]
fn ipv4_loopback_tagged_connect_is_verified_and_an_untagged_one_dropped() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const CLIENT: &str = "127.84.0.1";
    const DB: &str = "127.84.0.2";
    let bed = LoopbackNode::start("wr-v4", DB, &[("acme-retriever", Some(CLIENT))])?;
    let (acme_cg, agent, db) = (&bed.cgroups[0], &bed.agent, &bed.db);
    let stranger = bed.root.child("stranger")?;
    let acme = bed.identity("acme-retriever")?;
    let attempt = format!("tcp:{DB}:{DB_PORT}@{CLIENT}");

    Probe::new().in_cgroup(acme_cg).expect_outcome(
        &attempt,
        Outcome::Ok,
        "acme-retriever -> acme-vectors",
    )?;
    let mut accepted = Vec::new();
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            accepted.extend(db.accepted());
            !accepted.is_empty()
        }),
        "the DB accepted nothing"
    );
    let peers = bed.peers()?;
    ensure!(
        peers
            .iter()
            .any(|p| p.client == accepted[0] && p.identity == acme),
        "no verified peer {} as acme-retriever ({acme}): {peers:?}",
        accepted[0]
    );

    let r = Probe::new().in_cgroup(&stranger).run_one(&attempt)?;
    ensure!(r.outcome == Outcome::Error, "unmanaged client got {r:?}");
    agent.wait_for(1, Duration::from_secs(10), |e| {
        e["hook"] == "ingress" && e["reason"] == "missing_tag"
    })?;
    let settled = agent.settled_events(Duration::from_millis(1500), Duration::from_secs(10))?;
    let ingress: Vec<&Value> = settled.iter().filter(|e| e["hook"] == "ingress").collect();
    ensure!(ingress.len() == 1, "want one ingress event: {ingress:?}");
    let e = ingress[0];
    ensure!(
        e["subject"]["identity"] == acme
            && e["peer"]["ip"] == CLIENT
            && e["destination"]["ip"] == DB
            && e["verdict"] == "deny",
        "{e}"
    );
    ensure!(
        db.accepted().is_empty(),
        "the unmanaged client reached the DB"
    );
    Ok(())
}

/// A connect with `TCP_FASTOPEN_CONNECT` sends its SYN at the first write, from whichever
/// task makes it: here the connecting process moves into another workload's cgroup between
/// `connect()` and the write (as when the socket is passed on with `SCM_RIGHTS`). The SYN
/// carries the identity the connect was judged and recorded as, so both ends name one caller
/// (red-team review 68 I2: it carried the writer's, and the DB's node verified a caller the
/// sender's node never judged for this flow).
#[test]
fn a_deferred_connect_s_syn_carries_the_identity_it_was_judged_as_whoever_writes() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const CLIENT: &str = "127.84.1.1";
    const DB: &str = "127.84.1.2";
    let bed = LoopbackNode::start(
        "wr-moved",
        DB,
        &[("acme-retriever", Some(CLIENT)), ("acme-writer", None)],
    )?;
    let (retriever_cg, writer_cg) = (&bed.cgroups[0], &bed.cgroups[1]);
    let (retriever, writer) = (
        bed.identity("acme-retriever")?,
        bed.identity("acme-writer")?,
    );

    let line = Probe::new().in_cgroup(retriever_cg).deferred_moved(
        &writer_cg.path(),
        SocketAddr::new(DB.parse()?, DB_PORT),
        CLIENT.parse()?,
    )?;
    ensure!(
        line["connect"] == "ok" && line["send"] == "ok",
        "the deferred connect and its write: {line}"
    );
    // The SYN left after the move, from the writer's cgroup (not at `connect()`: a kernel
    // that sent it there would pass this test whatever the fix).
    ensure!(
        line["segments_before_move"] == 0
            && line["cgroup_at_send"] == format!("/{}", writer_cg.relative_str()),
        "the SYN was not deferred to a write from acme-writer's cgroup: {line}"
    );
    let local: SocketAddr = line["local"]
        .as_str()
        .context("no local address")?
        .parse()?;
    let mut accepted = Vec::new();
    ensure!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            accepted.extend(bed.db.accepted());
            accepted.contains(&local)
        }),
        "the DB did not accept {local}: {accepted:?}"
    );
    let peers = bed.peers()?;
    let peer = peers
        .iter()
        .find(|p| p.client == local)
        .with_context(|| format!("no verified peer {local}: {peers:?}"))?;
    ensure!(
        peer.identity == retriever,
        "the SYN claimed {} (acme-retriever is {retriever}, acme-writer {writer})",
        peer.identity
    );
    Ok(())
}

/// A SYN cookie's ACK makes a connection with no SYN before it: node 2 sends cookies for
/// every SYN (`net.ipv4.tcp_syncookies=2`), so its listener keeps no request, and an ACK that
/// carries a valid cookie is a new connection. The ACK is judged at ingress as a SYN without
/// the option would be (red-team review 59 M1: it passed as "not a SYN", and an outsider who
/// guessed a cookie, or held one from a SYN let through before the policy changed, was
/// accepted with no check and no event):
///
/// - acme-retriever's tagged connect completes through a cookie (its ACK has the SYN's
///   record);
/// - with the DB in `audit`, a SYN from outside the cluster passes (reported) and its cookie
///   ACK connects, reported once for both;
/// - the DB back in `enforce`, the ACK of a cookie given out under `audit` is dropped: the DB
///   accepts nothing, and the drop is one `not_allowed` event;
/// - the same from an address inside an endpoint's range, or an endpoint's own address,
///   which the IP cache knows but no cluster client has: one `missing_tag` event each
///   (review 61 M1: any address the IP cache knew passed);
/// - an ACK from a workload's address, or from inside a workload's declared range, with no connection behind it (a client whose server
///   restarted) still gets the kernel's reset, and no event (review 60 M1: it was dropped, and
///   the client waited for its retransmissions to time out).
#[test]
fn a_syn_cookies_ack_is_judged_as_its_syn() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let bed = Bed::new()?;
    bed.n2
        .run_in(|| std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2"))?
        .context("tcp_syncookies=2 on node 2")?;
    let addr = format!("tcp:[{NODE2}]:{DB_PORT}");
    let outsider = |port: u16| SocketAddr::new(OUTSIDER.parse().expect("literal"), port);

    // 1. A tagged connect: its cookie ACK has the record its SYN left.
    bed.probe(&bed.cg.acme).expect_outcome(
        &addr,
        Outcome::Ok,
        "acme-retriever through a SYN cookie",
    )?;
    ensure!(
        bed.db.accepted_at_least(1, Duration::from_secs(5)).len() == 1,
        "the DB did not accept acme-retriever's connection"
    );

    // 2. Audit: an outsider's SYN and its cookie ACK pass, one report for the attempt.
    let root = bed.cg.root.relative_str();
    apply_inventory(
        &bed,
        &inventory(&root).replace("ingress: enforce", "ingress: audit"),
    )?;
    let cookie = syn_cookie(&bed.n1, OUTSIDER, 46001)?;
    cookie_ack(&bed, 46001, cookie)?;
    let accepted = bed.db.accepted_at_least(1, Duration::from_secs(5));
    ensure!(
        accepted == [outsider(46001)],
        "under audit the cookie ACK did not connect: accepted {accepted:?}"
    );
    let e = expect_ingress(
        &bed,
        1,
        |e| e["peer"]["port"] == 46001,
        "the audited attempt, reported once",
    )?;
    ensure!(
        e["verdict"] == "audit" && e["reason"] == "not_allowed",
        "{e}"
    );

    // 3. A cookie given out under audit, its ACK sent once the DB is enforced again.
    let cookie = syn_cookie(&bed.n1, OUTSIDER, 46002)?;
    apply_inventory(&bed, &inventory(&root))?;
    cookie_ack(&bed, 46002, cookie)?;
    let e = expect_ingress(
        &bed,
        1,
        |e| e["peer"]["port"] == 46002 && e["verdict"] == "deny",
        "the cookie ACK under enforce",
    )?;
    ensure!(
        e["reason"] == "not_allowed" && e["type"] == "connection.denied",
        "{e}"
    );
    let accepted = bed.db.accepted_at_least(1, Duration::from_secs(2));
    ensure!(
        accepted.is_empty(),
        "the DB accepted a cookie ACK no check let through: {accepted:?}"
    );

    // 4. The same from an address inside an endpoint's range, and from an endpoint's own
    //    address: known to the IP cache, but no cluster client's, so the ACK is judged as its
    //    SYN (`missing_tag`), not passed.
    for (ips, sport) in [("fd84::90/124", 46004), ("fd84::99/128", 46005)] {
        let partner = format!(
            "{}  - name: partner-llm\n    kind: llm_api\n    ips: [{ips}]\n",
            inventory(&root)
        );
        apply_inventory(&bed, &partner.replace("ingress: enforce", "ingress: audit"))?;
        let cookie = syn_cookie(&bed.n1, OUTSIDER, sport)?;
        apply_inventory(&bed, &partner)?;
        cookie_ack(&bed, sport, cookie)?;
        let e = expect_ingress(
            &bed,
            1,
            |e| e["peer"]["port"] == sport && e["verdict"] == "deny",
            &format!("the cookie ACK of an endpoint at {ips} under enforce"),
        )?;
        ensure!(e["reason"] == "missing_tag", "{e}");
        let accepted = bed.db.accepted_at_least(1, Duration::from_secs(2));
        ensure!(
            accepted.is_empty(),
            "the DB accepted the cookie ACK of an endpoint at {ips}: {accepted:?}"
        );
    }

    // 5. A stray ACK from acme-retriever's address: the listener answers it with a reset.
    let stray = raw_tcp::segment(46003, DB_PORT, raw_tcp::ACK, (raw_tcp::ISN + 1, 1), &[])?;
    ensure!(
        raw_tcp::reply(&bed.n1, (NODE1, NODE2), &stray, raw_tcp::RST)?.is_some(),
        "a cluster client's stray ACK got no reset"
    );
    let settled = bed
        .node2
        .settled_events(Duration::from_millis(1500), Duration::from_secs(10))?;
    ensure!(
        !settled.iter().any(|e| e["peer"]["port"] == 46003),
        "a cluster client's stray ACK was reported"
    );

    // 6. The same from inside a workload's declared range (a client of the cluster).
    let ranged = inventory(&root).replace(
        "endpoints:\n",
        "  - name: partner-agent\n    tenant: acme\n    purpose: retrieval\n    ring: prod\n    ips: [fd84::90/124]\nendpoints:\n",
    );
    apply_inventory(&bed, &ranged)?;
    let stray = raw_tcp::segment(46006, DB_PORT, raw_tcp::ACK, (raw_tcp::ISN + 1, 1), &[])?;
    ensure!(
        raw_tcp::reply(&bed.n1, (OUTSIDER, NODE2), &stray, raw_tcp::RST)?.is_some(),
        "a stray ACK from a workload's range got no reset"
    );
    Ok(())
}

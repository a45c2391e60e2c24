//! Usual neighbourhoods, anomalies and step-up against the real kernel (issue 7, item 6,
//! second half: "the anomaly and step-up path fires once, pages once, and lifts after the
//! TTL"; "restarting the agent keeps ... the learned neighbourhoods").
//!
//! - With `--learn`, client-a reaches db1 (dataset kb1) during the window; after it, its
//!   first contact with db2 (kb2, `step_up: {action: quarantine, ttl: 6s}`) is exactly one
//!   `flow.anomaly` and exactly one page, received by a real HTTP server the test runs. The
//!   subject is quarantined: its held connection to db1 is reset (`flow.revoked`, reason
//!   `quarantined`) and its next connect is denied (`quarantined`); after the TTL it is
//!   released by itself (`subject.released`) and connects again. A second contact with kb2
//!   is no second anomaly.
//! - A restarted agent keeps the neighbourhoods and the window: db1 and db2 raise nothing,
//!   db3 (kb3, no step-up) raises one anomaly and no page.
//! - A webhook that is down: the page is tried a bounded number of times and given up, and
//!   meanwhile the agent goes on enforcing (the quarantine denies, the TTL lifts it).
//!
//! - A contact hidden behind a flood: client-a fills the flow-event ring with short flows to
//!   db1 (its own, learned dataset) while the agent is not reading it (paused: it stands for
//!   an agent the flood outruns), checked by the kernel's lost counter; its first contact
//!   with db2 then has no room in the ring, and still raises the anomaly and the step-up
//!   (from `FLOW_CONTACTS_MISSED`), with no `flow.opened` for it in the stream.
//!
//! - A contact hidden behind the flow event budget: with `--flow-events-per-workload 1`,
//!   client-a's flow to db1 takes its window's one `flow.opened`; its first contact with db2
//!   in the same window is not written (counted in `flow_events.suppressed`) and still
//!   raises the anomaly (the same `FLOW_CONTACTS_MISSED` path).
//!
//! - One tenant's datagrams to many tracked pairs stop at its share of the contact map
//!   (refused past it, `flow_table_full`), and another tenant's contact meanwhile still
//!   raises its anomaly.
//!
//! Addresses 127.93.x.y, 127.95.x.y for the flood, 127.97.x.y for the budget and 127.74.x.y
//! for the contact share.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{
    applied_snapshot_after, first_applied_snapshot, notices, replace_file, wait_notices, StateDir,
};
use enforcer_tests::fixtures::{write_bundle, Entity};
use enforcer_tests::flows::{FlowClient, FlowServer};
use enforcer_tests::probe::{attempt, Outcome, Probe};
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{
    require_kernel, unique_name, Agent, AgentConfig, PinDir, PolicyBundle, TestCgroup,
};
use serde_json::Value;

const NET: u8 = 93;
/// The flood test's addresses.
const FLOOD_NET: u8 = 95;
const WAIT: Duration = Duration::from_secs(10);
/// The learning window: long enough for the test's learning contact to land in it on a
/// loaded machine (checked, not assumed: the neighbourhood file must hold it).
const LEARN: &str = "12s";
const TTL: Duration = Duration::from_secs(6);

const SAME_TENANT: &str = r#"
@id("same-tenant")
permit (principal, action, resource)
when { resource has tenant && principal.tenant == resource.tenant };
"#;

/// Everything one test needs; dropped in field order.
struct World {
    client: TestCgroup,
    root: TestCgroup,
    bundle: PolicyBundle,
    pins: PinDir,
    state: StateDir,
    net: u8,
    t: u8,
}

/// client-a (acme); db1, db2, db3 (acme `vector_db`, TCP 6333, datasets kb1, kb2, kb3), db2
/// with `step_up: {action: quarantine, ttl: 6s}`. At 127.93.<t>.i.
fn world(t: u8) -> Result<World> {
    world_in(NET, t)
}

/// [`world`] at 127.<net>.<t>.i.
fn world_in(net: u8, t: u8) -> Result<World> {
    let entities = vec![
        Entity::workload(net, "client-a", "acme", "retrieval", t, 1),
        Entity::endpoint(net, "db1", "acme", "vector_db", t, 10).port(6333, Proto::Tcp, "query"),
        Entity::endpoint(net, "db2", "acme", "vector_db", t, 11)
            .port(6333, Proto::Tcp, "query")
            .port(6334, Proto::Udp, "query"),
        Entity::endpoint(net, "db3", "acme", "vector_db", t, 12).port(6333, Proto::Tcp, "query"),
    ];
    let root = TestCgroup::create(unique_name("an-root"))?;
    let client = root.child("client-a")?;
    let bundle = write_bundle(&entities, &root.relative_str(), SAME_TENANT)?;
    let mut inventory = std::fs::read_to_string(bundle.path().join("inventory.yaml"))?;
    for (name, extra) in [
        ("db1", ""),
        ("db2", "    step_up: {action: quarantine, ttl: 6s}\n"),
        ("db3", ""),
    ] {
        inventory = set_dataset(&inventory, name, &format!("kb{}", &name[2..]), extra)?;
    }
    bundle.write_file("inventory.yaml", &inventory)?;
    Ok(World {
        client,
        root,
        bundle,
        pins: PinDir::new("an-pins")?,
        state: StateDir::new()?,
        net,
        t,
    })
}

/// The endpoint `name`'s `datasets:` line (the fixture gives every acme endpoint acme-kb)
/// replaced by `[dataset]`, followed by `extra` lines.
fn set_dataset(inventory: &str, name: &str, dataset: &str, extra: &str) -> Result<String> {
    let at = inventory
        .find(&format!("  - name: {name}\n"))
        .with_context(|| format!("no {name} in the inventory"))?;
    let line = "    datasets: [acme-kb]\n";
    let rel = inventory[at..]
        .find(line)
        .with_context(|| format!("{name} has no datasets line"))?;
    let mut out = inventory.to_string();
    out.replace_range(
        at + rel..at + rel + line.len(),
        &format!("    datasets: [{dataset}]\n{extra}"),
    );
    Ok(out)
}

impl World {
    fn addr(&self, i: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::from([127, self.net, self.t, i]), 6333)
    }
    fn config(&self, webhook: &str) -> AgentConfig {
        let mut config = self.state.configure(AgentConfig::new(
            self.bundle.path(),
            &self.root.relative_str(),
            self.pins.path(),
        ));
        config.extra_args.extend(
            ["--learn", LEARN, "--page-webhook", webhook]
                .iter()
                .map(|s| s.to_string()),
        );
        config
    }
    /// [`World::config`] without `--learn` (and so without a pager).
    fn config_without_learning(&self) -> AgentConfig {
        self.state.configure(AgentConfig::new(
            self.bundle.path(),
            &self.root.relative_str(),
            self.pins.path(),
        ))
    }
    fn neighbourhoods(&self) -> Result<Value> {
        let path = self.state.path().join("neighbourhoods.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }
    /// Waits (bounded) until the learning window the agent keeps in its file is over.
    fn wait_for_window_end(&self) -> Result<()> {
        let started = self.neighbourhoods()?["started"]
            .as_str()
            .context("no `started` in the neighbourhood file")?
            .to_string();
        let started = humantime::parse_rfc3339(&started)?;
        let learn = humantime::parse_duration(LEARN)?;
        let end = started + learn;
        let over = wait_until(learn + WAIT, Duration::from_millis(50), || {
            SystemTime::now() > end + Duration::from_millis(100)
        });
        ensure!(
            over,
            "the learning window ({LEARN} from {started:?}) did not end"
        );
        Ok(())
    }
}

fn s<'a>(e: &'a Value, p: &str) -> Option<&'a str> {
    e.pointer(p).and_then(Value::as_str)
}

fn to(name: &'static str) -> impl Fn(&Value) -> bool {
    move |e| s(e, "/destination/name") == Some(name)
}

/// A webhook receiver: answers every HTTP request 200 and keeps its body. Drop stops it.
struct Webhook {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    bodies: Arc<Mutex<Vec<Value>>>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    fn start(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (stop.clone(), bodies.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Some(body) = serve(conn) {
                            b.lock().unwrap().push(body);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            bodies,
            thread: Some(thread),
        })
    }
    fn url(&self) -> String {
        format!("http://{}/page", self.addr)
    }
    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request: headers, a `Content-Length` body (parsed as JSON), then `200 OK`.
fn serve(conn: std::net::TcpStream) -> Option<Value> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    let mut conn = conn;
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if !request_line.starts_with("POST /page ") {
        return Some(serde_json::json!({"unexpected request": request_line}));
    }
    serde_json::from_slice(&body).ok()
}

#[test]
fn an_anomaly_steps_up_once_pages_once_lifts_after_the_ttl_and_survives_a_restart() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let w = world(1)?;
    let db1 = FlowServer::start(w.addr(10))?;
    let db2 = FlowServer::start(w.addr(11))?;
    let db3 = FlowServer::start(w.addr(12))?;
    let webhook = Webhook::start(SocketAddr::new(IpAddr::from([127, NET, 1, 50]), 0))?;
    let mut first = Agent::start(w.config(&webhook.url()))?;
    first_applied_snapshot(&first)?;

    // Learning: client-a reaches db1.
    let mut learn = FlowClient::tcp(&w.client, db1.addr(), 1, 1, false)?;
    learn.finish()?;
    wait_notices(&first, "flow.opened", 1, WAIT, to("db1"))?;
    let learned = wait_until(WAIT, Duration::from_millis(20), || {
        w.neighbourhoods().is_ok_and(|n| {
            n.pointer("/subjects/client-a/learned") == Some(&serde_json::json!(["kb1"]))
        })
    });
    ensure!(
        learned,
        "kb1 is not in client-a's neighbourhood (did the {LEARN} window end before the first connection?): {:?}\n{}",
        w.neighbourhoods(),
        first.stderr_tail()
    );
    w.wait_for_window_end()?;

    // After the window: db1 is usual. A held connection to it is the flow the quarantine
    // must reset.
    let held = FlowClient::tcp(&w.client, db1.addr(), 1, 1, true)?;
    wait_notices(&first, "flow.opened", 1, WAIT, |e| {
        e.pointer("/flow/source/port").and_then(Value::as_u64) == Some(u64::from(held.local.port()))
    })?;

    // First contact with kb2: one anomaly, one page, quarantine, the held flow reset. A bare
    // connect (the probe): the step-up may reset this very connection before a client
    // could finish an exchange on it.
    let probe = Probe::new().in_cgroup(&w.client);
    probe.expect_let_through(
        &attempt("tcp", db2.addr().ip(), 6333),
        "first contact with db2",
    )?;
    let anomalies = wait_notices(&first, "flow.anomaly", 1, WAIT, |_| true)?;
    let a = &anomalies[0];
    ensure!(s(a, "/subject/workload") == Some("client-a"), "{a}");
    ensure!(s(a, "/destination/name") == Some("db2"), "{a}");
    ensure!(
        a["anomaly"]["new_datasets"] == serde_json::json!(["kb2"]),
        "{a}"
    );
    ensure!(
        a["anomaly"]["neighbourhood"] == serde_json::json!(["kb1"]),
        "{a}"
    );
    ensure!(s(a, "/anomaly/step_up") == Some("quarantine"), "{a}");
    ensure!(s(a, "/anomaly/quarantined_until").is_some(), "{a}");
    ensure!(a["dataset_scope"] == serde_json::json!(["kb2"]), "{a}");
    let ids: Vec<&str> = a["atlas"]
        .as_array()
        .context("no atlas")?
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    ensure!(ids == ["AML.T0036", "AML.T0085.000"], "{a}");

    let quarantined = wait_notices(&first, "subject.quarantined", 1, WAIT, |_| true)?;
    ensure!(
        s(&quarantined[0], "/workload") == Some("client-a")
            && s(&quarantined[0], "/cause").is_some_and(|c| c.contains("anomaly")),
        "{}",
        quarantined[0]
    );
    // Quarantined: the next connect is denied (at once: the TTL runs).
    let to_db1 = attempt("tcp", w.addr(10).ip(), 6333);
    let denied = probe.run_one(&to_db1)?;
    ensure!(
        denied.outcome == Outcome::Eperm,
        "while quarantined: {denied:?}"
    );
    wait_notices(&first, "connection.denied", 1, WAIT, |e| {
        s(e, "/reason") == Some("quarantined") && to("db1")(e)
    })?;
    let end = held
        .ended_within(WAIT)
        .context("client-a's held connection to db1 was not reset by the quarantine")?;
    ensure!(end["end"] == "error", "held: {end}");
    let revoked = wait_notices(&first, "flow.revoked", 1, WAIT, to("db1"))?;
    ensure!(
        s(&revoked[0], "/flow/reason") == Some("quarantined"),
        "{}",
        revoked[0]
    );

    // The page: exactly one, the anomaly's own event.
    let paged = wait_until(WAIT, Duration::from_millis(20), || {
        !webhook.bodies().is_empty()
    });
    ensure!(
        paged,
        "no page arrived; agent stderr:\n{}",
        first.stderr_tail()
    );

    // After the TTL the quarantine lifts by itself.
    let back = probe.until(Outcome::Ok, &to_db1, Duration::from_millis(100), TTL + WAIT)?;
    ensure!(
        back.reached,
        "still denied {:?} after the TTL: {back:?}",
        TTL + WAIT
    );
    let released = wait_notices(&first, "subject.released", 1, WAIT, |_| true)?;
    ensure!(
        s(&released[0], "/workload") == Some("client-a"),
        "{}",
        released[0]
    );
    // kb2 again: no second anomaly (reported once per subject and dataset).
    let mut again = FlowClient::tcp(&w.client, db2.addr(), 1, 1, false)?;
    again.finish()?;
    let opened_db2 = wait_notices(&first, "flow.opened", 2, WAIT, to("db2"))?;
    ensure!(opened_db2.len() == 2);
    ensure!(
        notices(&first, "flow.anomaly")?.len() == 1,
        "kb2 reported twice: {:?}",
        notices(&first, "flow.anomaly")?
    );
    let bodies = webhook.bodies();
    ensure!(bodies.len() == 1, "pages: {bodies:?}");
    ensure!(
        s(&bodies[0], "/type") == Some("flow.anomaly"),
        "{}",
        bodies[0]
    );
    ensure!(
        s(&bodies[0], "/subject/workload") == Some("client-a"),
        "{}",
        bodies[0]
    );
    let quarantines = notices(&first, "subject.quarantined")?.len();
    ensure!(quarantines == 1, "{quarantines} quarantines");

    // Restart: the neighbourhood, the reported set and the window outlive the agent.
    let before = w.neighbourhoods()?;
    first.stop()?;
    drop(first);
    let second = Agent::start(w.config(&webhook.url()))?;
    first_applied_snapshot(&second)?;
    ensure!(
        w.neighbourhoods()?["started"] == before["started"],
        "the learning window restarted"
    );
    for db in [&db1, &db2] {
        let mut c = FlowClient::tcp(&w.client, db.addr(), 1, 1, false)?;
        c.finish()?;
    }
    wait_notices(&second, "flow.opened", 1, WAIT, to("db1"))?;
    wait_notices(&second, "flow.opened", 1, WAIT, to("db2"))?;
    // db3 last: its anomaly is the marker that the earlier contacts were judged too.
    let mut c = FlowClient::tcp(&w.client, db3.addr(), 1, 1, false)?;
    c.finish()?;
    let anomalies = wait_notices(&second, "flow.anomaly", 1, WAIT, |_| true)?;
    ensure!(
        anomalies.len() == 1 && to("db3")(&anomalies[0]),
        "after the restart only db3 is new: {anomalies:?}"
    );
    ensure!(
        anomalies[0].pointer("/anomaly/step_up").is_none(),
        "{}",
        anomalies[0]
    );
    // No step-up, no page, no quarantine.
    probe.expect_outcome(&to_db1, Outcome::Ok, "after an anomaly without step-up")?;
    ensure!(notices(&second, "subject.quarantined")?.is_empty());
    ensure!(webhook.bodies().len() == 1, "pages: {:?}", webhook.bodies());
    Ok(())
}

#[test]
fn a_webhook_that_is_down_is_retried_a_bounded_number_of_times_and_enforcement_goes_on(
) -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let w = world(2)?;
    let db2 = FlowServer::start(w.addr(11))?;
    let _db1 = FlowServer::start(w.addr(10))?;
    // A port nobody listens on: bound, then released.
    let dead =
        TcpListener::bind(SocketAddr::new(IpAddr::from([127, NET, 2, 50]), 0))?.local_addr()?;
    let mut agent = Agent::start(w.config(&format!("http://{dead}/page")))?;
    first_applied_snapshot(&agent)?;
    // Nothing learned: everything after the window is new.
    w.wait_for_window_end()?;
    let probe = Probe::new().in_cgroup(&w.client);
    probe.expect_let_through(
        &attempt("tcp", db2.addr().ip(), 6333),
        "first contact with db2",
    )?;
    wait_notices(&agent, "flow.anomaly", 1, WAIT, to("db2"))?;
    wait_notices(&agent, "subject.quarantined", 1, WAIT, |_| true)?;

    // While the pager retries, the agent enforces: the quarantine denies ...
    let to_db1 = attempt("tcp", w.addr(10).ip(), 6333);
    probe.expect_outcome(
        &to_db1,
        Outcome::Eperm,
        "quarantined while the pager retries",
    )?;
    // ... the page is given up after a bounded number of tries ...
    let stderr = || std::fs::read_to_string(agent.stderr_path()).unwrap_or_default();
    let given_up = wait_until(WAIT, Duration::from_millis(50), || {
        stderr().contains("page not delivered, given up")
    });
    ensure!(
        given_up,
        "the page was not given up:\n{}",
        agent.stderr_tail()
    );
    let tries = stderr().matches("page failed").count() + 1;
    ensure!(tries == 5, "{tries} tries, want 5:\n{}", stderr());
    // ... and the TTL still lifts the quarantine.
    let back = probe.until(Outcome::Ok, &to_db1, Duration::from_millis(100), TTL + WAIT)?;
    ensure!(back.reached, "still denied after the TTL: {back:?}");
    ensure!(
        agent.is_running(),
        "the agent stopped:\n{}",
        agent.stderr_tail()
    );
    Ok(())
}

/// A first contact made by unconnected datagrams (`sendto`, no flow) is a contact like a
/// flow's: one `flow.anomaly` and the step-up. Before, a datagram to a tracked destination
/// reached its dataset past the learner (red-team review 39).
#[test]
fn a_first_contact_by_datagrams_raises_the_anomaly_and_steps_up() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let w = world(3)?;
    let dead =
        TcpListener::bind(SocketAddr::new(IpAddr::from([127, NET, 3, 50]), 0))?.local_addr()?;
    let agent = Agent::start(w.config(&format!("http://{dead}/page")))?;
    first_applied_snapshot(&agent)?;
    // Nothing learned: everything after the window is new.
    w.wait_for_window_end()?;
    let probe = Probe::new().in_cgroup(&w.client);
    probe.expect_outcome(
        &attempt("udp", w.addr(11).ip(), 6334),
        Outcome::Ok,
        "a datagram to db2 (permitted: not refused)",
    )?;
    let anomalies = wait_notices(&agent, "flow.anomaly", 1, WAIT, to("db2"))?;
    ensure!(
        anomalies[0]["anomaly"]["new_datasets"] == serde_json::json!(["kb2"]),
        "{}",
        anomalies[0]
    );
    ensure!(
        s(&anomalies[0], "/anomaly/step_up") == Some("quarantine"),
        "{}",
        anomalies[0]
    );
    wait_notices(&agent, "subject.quarantined", 1, WAIT, |_| true)?;
    probe.expect_outcome(
        &attempt("udp", w.addr(11).ip(), 6334),
        Outcome::Eperm,
        "a datagram of the stepped-up subject",
    )?;
    // A datagram's contact is no lost flow event: nothing says the ring was full
    // (red-team review 42).
    let log = std::fs::read_to_string(agent.stderr_path())?;
    ensure!(
        !log.contains("flow ring full") && !log.contains("flow contacts lost"),
        "a datagram reported as a lost flow event:\n{}",
        agent.stderr_tail()
    );

    // The subject leaves the policy before its TTL is over (a Job's pods complete), and
    // comes back after it: the step-up is over, not a quarantine with nothing left to lift
    // it (red-team review 39 M1: the agent forgot the step-up but kept the quarantine).
    let path = w.bundle.path().join("inventory.yaml");
    let whole = std::fs::read_to_string(&path)?;
    let start = whole
        .find("  - name: client-a\n")
        .context("fixture: client-a")?;
    let end = start
        + whole[start..]
            .find("endpoints:")
            .context("fixture: endpoints")?;
    let without = format!("{}{}", &whole[..start], &whole[end..]).replacen(
        "workloads:\n",
        "workloads: []\n",
        1,
    );
    let before = first_applied_snapshot(&agent)?;
    replace_file(w.bundle.path(), "inventory.yaml", &without, None)?;
    applied_snapshot_after(&agent, &before)?;
    wait_notices(&agent, "subject.released", 1, TTL + WAIT, |_| true)?;
    // Its record in the learner's file is gone too, under the name it was kept by: a record
    // left behind would be taken at a restart for a step-up already due, and lift whatever
    // quarantine the subject had by then (red-team review 49).
    let recorded = w.neighbourhoods()?;
    ensure!(
        recorded["step_ups"]
            .as_object()
            .is_none_or(|s| !s.contains_key("client-a")),
        "the step-up's record outlived it: {recorded}"
    );
    replace_file(w.bundle.path(), "inventory.yaml", &whole, None)?;
    let back = probe.until(
        Outcome::Ok,
        &attempt("udp", w.addr(11).ip(), 6334),
        Duration::from_millis(100),
        WAIT,
    )?;
    ensure!(
        back.reached,
        "back in the policy after its TTL, still refused: {back:?}"
    );
    Ok(())
}

/// The contact-share test's addresses.
const SHARE_NET: u8 = 74;

/// One tenant's datagrams to many tracked pairs cannot take the room another tenant's
/// contacts need (red-team review 42: 4,096 distinct pairs between two drains filled the
/// contact map, and a datagram contact that found it full was lost for good, with no
/// anomaly and no step-up). acme's `flooder` sends one datagram to each of 600 tracked
/// endpoints of its tenant while the agent does not drain (paused): the first
/// `CONTACTS_PER_TENANT` (512) pass, the rest are refused (`flow_table_full`, hook
/// `sendmsg4`: a contact that cannot be kept is never let through unseen). globex's
/// `client-b` still sends to its own DB, and once the agent resumes that first contact is a
/// `flow.anomaly`; the drained share is acme's again.
#[test]
fn a_tenants_datagram_flood_stops_at_its_share_and_hides_no_other_tenants_contact() -> Result<()> {
    use enforcer_common::capacity::CONTACTS_PER_TENANT;

    if !require_kernel() {
        return Ok(());
    }
    let net = SHARE_NET;
    let flood: Vec<(u8, u8)> = (2..=4u8)
        .flat_map(|t| (1..=200u8).map(move |i| (t, i)))
        .collect();
    let mut entities = vec![
        Entity::workload(net, "flooder", "acme", "retrieval", 1, 1),
        Entity::workload(net, "client-b", "globex", "retrieval", 1, 2),
        Entity::endpoint(net, "dbg", "globex", "vector_db", 1, 10).port(6334, Proto::Udp, "query"),
    ];
    for &(t, i) in &flood {
        entities.push(
            Entity::endpoint(net, &format!("flood-{t}-{i}"), "acme", "vector_db", t, i).port(
                6334,
                Proto::Udp,
                "query",
            ),
        );
    }
    let root = TestCgroup::create(unique_name("an-root"))?;
    let flooder = root.child("flooder")?;
    let bundle = write_bundle(&entities, &root.relative_str(), SAME_TENANT)?;
    let w = World {
        client: flooder,
        root,
        bundle,
        pins: PinDir::new("an-pins")?,
        state: StateDir::new()?,
        net,
        t: 1,
    };
    // Dropped before `w` (its parent cgroup).
    let client_b = w.root.child("client-b")?;
    let dead =
        TcpListener::bind(SocketAddr::new(IpAddr::from([127, net, 1, 50]), 0))?.local_addr()?;
    let agent = Agent::start(w.config(&format!("http://{dead}/page")))?;
    first_applied_snapshot(&agent)?;
    w.wait_for_window_end()?;

    agent.pause()?;
    let resume = Resume(&agent);
    let attempts: Vec<String> = flood
        .iter()
        .map(|&(t, i)| attempt("udp", IpAddr::from([127, net, t, i]), 6334))
        .collect();
    let results = Probe::new().in_cgroup(&w.client).run(&attempts)?;
    let passed = results.iter().filter(|r| r.outcome == Outcome::Ok).count() as u64;
    let refused = results
        .iter()
        .filter(|r| r.outcome == Outcome::Eperm)
        .count() as u64;
    // One sending thread: the share's check and add never race.
    ensure!(
        passed == CONTACTS_PER_TENANT && refused == flood.len() as u64 - passed,
        "acme's datagrams to {} tracked pairs: {passed} passed, {refused} refused; want {CONTACTS_PER_TENANT} passed, the rest refused",
        flood.len()
    );
    let dbg = IpAddr::from([127, net, 1, 10]);
    Probe::new().in_cgroup(&client_b).expect_outcome(
        &attempt("udp", dbg, 6334),
        Outcome::Ok,
        "globex's datagram, within its own share",
    )?;
    drop(resume);

    let anomalies =
        wait_notices(&agent, "flow.anomaly", 1, WAIT, to("dbg")).with_context(|| {
            format!(
                "globex's contact behind acme's flood raised no anomaly\n{}",
                agent.stderr_tail()
            )
        })?;
    ensure!(
        s(&anomalies[0], "/subject/workload") == Some("client-b"),
        "{}",
        anomalies[0]
    );
    agent.wait_for(1, WAIT, |e| {
        s(e, "/reason") == Some("flow_table_full")
            && s(e, "/hook") == Some("sendmsg4")
            && s(e, "/subject/workload") == Some("flooder")
    })?;
    // Drained: acme's share is free again.
    let (t, i) = flood[flood.len() - 1];
    let again = attempt("udp", IpAddr::from([127, net, t, i]), 6334);
    let probe = Probe::new().in_cgroup(&w.client);
    let freed = wait_until(WAIT, Duration::from_millis(100), || {
        probe
            .run_one(&again)
            .is_ok_and(|r| r.outcome == Outcome::Ok)
    });
    ensure!(freed, "acme's share was not returned after the drain");
    drop(client_b);
    Ok(())
}

/// Sends SIGCONT to a paused agent when dropped (also on panic), so that its own drop can
/// stop it.
struct Resume<'a>(&'a Agent);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

#[test]
fn a_contact_hidden_behind_a_flood_of_flow_events_still_raises_the_anomaly_and_steps_up(
) -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    /// Short flows per probe run, and runs at most: the ring (256 KiB, ~150 bytes a record,
    /// an opened and a closed record per flow) is full after ~900 flows.
    const BATCH: u64 = 500;
    const MAX_BATCHES: usize = 20;
    let w = world_in(FLOOD_NET, 1)?;
    let db1 = FlowServer::start(w.addr(10))?;
    let db2 = FlowServer::start(w.addr(11))?;
    let webhook = Webhook::start(SocketAddr::new(IpAddr::from([127, FLOOD_NET, 1, 50]), 0))?;
    let agent = Agent::start(w.config(&webhook.url()))?;
    first_applied_snapshot(&agent)?;

    // Learning: client-a reaches db1.
    let mut learn = FlowClient::tcp(&w.client, db1.addr(), 1, 1, false)?;
    learn.finish()?;
    wait_notices(&agent, "flow.opened", 1, WAIT, to("db1"))?;
    let learned = wait_until(WAIT, Duration::from_millis(20), || {
        w.neighbourhoods().is_ok_and(|n| {
            n.pointer("/subjects/client-a/learned") == Some(&serde_json::json!(["kb1"]))
        })
    });
    ensure!(
        learned,
        "kb1 is not in client-a's neighbourhood: {:?}\n{}",
        w.neighbourhoods(),
        agent.stderr_tail()
    );
    w.wait_for_window_end()?;

    // The flood: short flows to db1 while nobody reads the ring, until the kernel counts a
    // flow event it had no room for.
    let pins = enforcer::datapath::pin_dir(w.pins.path());
    let lost_before = enforcer::flows::lost(&pins)?;
    agent.pause()?;
    let resume = Resume(&agent);
    let probe = Probe::new().in_cgroup(&w.client);
    let to_db1 = attempt("tcp", w.addr(10).ip(), 6333);
    let mut flows = 0;
    for _ in 0..MAX_BATCHES {
        let burst = probe.repeat(BATCH, &to_db1)?;
        ensure!(
            burst.ok == BATCH,
            "the flood's flows were refused: {burst:?}"
        );
        flows += burst.ok;
        if enforcer::flows::lost(&pins)? > lost_before {
            break;
        }
    }
    let lost_flooded = enforcer::flows::lost(&pins)?;
    ensure!(
        lost_flooded > lost_before,
        "{flows} flows did not fill the flow-event ring (lost counter still {lost_flooded})"
    );

    // The hidden contact: the first with kb2 (db2: step-up quarantine), held open. The
    // handshake completes before connect() returns, so its opened record was attempted (and
    // lost: the ring is full, nothing reads it) by the time the client is up.
    let hidden = FlowClient::tcp(&w.client, db2.addr(), 1, 1, true)?;
    ensure!(
        enforcer::flows::lost(&pins)? > lost_flooded,
        "the contact's opened record was not lost"
    );
    drop(resume);

    let anomalies =
        wait_notices(&agent, "flow.anomaly", 1, WAIT, to("db2")).with_context(|| {
            format!(
                "a contact whose flow.opened was lost raised no anomaly\n{}",
                agent.stderr_tail()
            )
        })?;
    let a = &anomalies[0];
    ensure!(s(a, "/subject/workload") == Some("client-a"), "{a}");
    ensure!(
        a["anomaly"]["new_datasets"] == serde_json::json!(["kb2"]),
        "{a}"
    );
    ensure!(s(a, "/anomaly/step_up") == Some("quarantine"), "{a}");
    ensure!(
        a.pointer("/flow/source/port").and_then(Value::as_u64)
            == Some(u64::from(hidden.local.port())),
        "the anomaly names the live flow: {a}"
    );
    let quarantined = wait_notices(&agent, "subject.quarantined", 1, WAIT, |_| true)?;
    ensure!(
        s(&quarantined[0], "/workload") == Some("client-a"),
        "{}",
        quarantined[0]
    );
    let denied = probe.run_one(&to_db1)?;
    ensure!(
        denied.outcome == Outcome::Eperm,
        "while quarantined: {denied:?}"
    );
    // It was the kept contact, not the ring: the stream has no flow.opened for db2.
    let opened_db2 = notices(&agent, "flow.opened")?
        .into_iter()
        .filter(|e| to("db2")(e))
        .count();
    ensure!(
        opened_db2 == 0,
        "db2's flow.opened reached the stream after all"
    );
    Ok(())
}

/// The budget test's addresses.
const BUDGET_NET: u8 = 97;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, whose 1 s grid makes the
/// kernel's budget windows.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[test]
fn a_contact_whose_flow_opened_the_budget_suppressed_still_raises_the_anomaly() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const SECOND: u64 = 1_000_000_000;
    let w = world_in(BUDGET_NET, 1)?;
    let db1 = FlowServer::start(w.addr(10))?;
    let db2 = FlowServer::start(w.addr(11))?;
    let webhook = Webhook::start(SocketAddr::new(IpAddr::from([127, BUDGET_NET, 1, 50]), 0))?;
    let mut config = w.config(&webhook.url());
    // Windows of 1 s (the harness turns aggregation off unless told otherwise), one
    // flow.opened per workload and window.
    config.events_aggregate = None;
    config
        .extra_args
        .extend(["--flow-events-per-workload", "1"].map(String::from));
    let agent = Agent::start(config)?;
    first_applied_snapshot(&agent)?;

    // Learning: client-a reaches db1.
    let mut learn = FlowClient::tcp(&w.client, db1.addr(), 1, 1, false)?;
    learn.finish()?;
    wait_notices(&agent, "flow.opened", 1, WAIT, to("db1"))?;
    let learned = wait_until(WAIT, Duration::from_millis(20), || {
        w.neighbourhoods().is_ok_and(|n| {
            n.pointer("/subjects/client-a/learned") == Some(&serde_json::json!(["kb1"]))
        })
    });
    ensure!(
        learned,
        "kb1 is not in client-a's neighbourhood: {:?}\n{}",
        w.neighbourhoods(),
        agent.stderr_tail()
    );
    w.wait_for_window_end()?;

    // One probe, two flows: db1 then db2, within one window of the kernel's grid. Started
    // early in a window (the clock's grid, not a condition to wait for) and checked after.
    let in_window = monotonic_ns() % SECOND;
    if in_window > SECOND / 10 {
        std::thread::sleep(Duration::from_nanos(SECOND - in_window + 5_000_000));
    }
    let start = monotonic_ns();
    let probe = Probe::new().in_cgroup(&w.client);
    let tries = [
        attempt("tcp", w.addr(10).ip(), 6333),
        attempt("tcp", w.addr(11).ip(), 6333),
    ];
    let results = probe.run(&tries)?;
    let end = monotonic_ns();
    ensure!(
        start / SECOND == end / SECOND,
        "the two flows straddled a window boundary ({} ms into the window to {} ms): the \
         machine is too loaded for this test",
        (start % SECOND) / 1_000_000,
        (end % SECOND) / 1_000_000 + (end / SECOND - start / SECOND) * 1000
    );
    ensure!(
        results.iter().all(|r| r.outcome == Outcome::Ok),
        "{results:?}"
    );

    let anomalies =
        wait_notices(&agent, "flow.anomaly", 1, WAIT, to("db2")).with_context(|| {
            format!(
                "a contact whose flow.opened the budget suppressed raised no anomaly\n{}",
                agent.stderr_tail()
            )
        })?;
    ensure!(
        anomalies[0]["anomaly"]["new_datasets"] == serde_json::json!(["kb2"]),
        "{}",
        anomalies[0]
    );
    let suppressed = wait_notices(&agent, "flow_events.suppressed", 1, WAIT, |e| {
        s(e, "/workload") == Some("client-a")
    })?;
    ensure!(
        suppressed[0]["opened"] == 1,
        "db2's flow.opened counted: {}",
        suppressed[0]
    );
    let opened_db2 = notices(&agent, "flow.opened")?
        .into_iter()
        .filter(|e| to("db2")(e))
        .count();
    ensure!(opened_db2 == 0, "db2's flow.opened was written after all");
    drop(db2);
    Ok(())
}

/// Entries of `FLOW_CONTACTS_MISSED` (as `enforcer status` counts them).
fn missed_contacts(pins: &std::path::Path) -> Result<u64> {
    let stats = enforcer::datapath::kernel_stats(pins)?;
    stats
        .maps
        .iter()
        .find(|m| m.name == enforcer_common::maps::FLOW_CONTACTS_MISSED)
        .and_then(|m| m.entries)
        .context("no FLOW_CONTACTS_MISSED count")
}

#[test]
fn without_learning_the_missed_contacts_are_emptied_not_kept_for_a_later_run() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    const BATCH: u64 = 500;
    const MAX_BATCHES: usize = 20;
    let w = world_in(FLOOD_NET, 2)?;
    let _db1 = FlowServer::start(w.addr(10))?;
    let agent = Agent::start(w.config_without_learning())?;
    first_applied_snapshot(&agent)?;
    let pins = enforcer::datapath::pin_dir(w.pins.path());
    let lost_before = enforcer::flows::lost(&pins)?;
    agent.pause()?;
    let resume = Resume(&agent);
    let probe = Probe::new().in_cgroup(&w.client);
    let to_db1 = attempt("tcp", w.addr(10).ip(), 6333);
    for _ in 0..MAX_BATCHES {
        let burst = probe.repeat(BATCH, &to_db1)?;
        ensure!(
            burst.ok == BATCH,
            "the flood's flows were refused: {burst:?}"
        );
        if enforcer::flows::lost(&pins)? > lost_before {
            break;
        }
    }
    ensure!(
        enforcer::flows::lost(&pins)? > lost_before,
        "the flood did not fill the flow-event ring"
    );
    // The kernel kept the lost contact (the map is filled whether or not anyone learns) ...
    ensure!(missed_contacts(&pins)? >= 1, "no missed contact was kept");
    drop(resume);
    // ... and an agent without --learn empties it, so that a later run with --learn does not
    // take these contacts for new ones.
    let emptied = wait_until(WAIT, Duration::from_millis(50), || {
        missed_contacts(&pins).is_ok_and(|n| n == 0)
    });
    ensure!(
        emptied,
        "FLOW_CONTACTS_MISSED still holds {:?} entries\n{}",
        missed_contacts(&pins),
        agent.stderr_tail()
    );
    Ok(())
}

//! Findings of the attack pass after issue 6, each as the smallest real-kernel reproducer.
//!
//! Everything runs inside network namespaces the tests create (`atk-*`), so that 127.0.0.1
//! and ::1 belong to the test alone. Addresses: 127.90.0.0/16, `fd7e:5a::/64`, and
//! `fd7e:5a:1::/64` on a veth between two of them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer_tests::cli::{enforcer, first_applied_snapshot, replace_file};
use enforcer_tests::fixtures::{render_inventory, Entity, World, TENANT_ISOLATION_POLICIES};
use enforcer_tests::flows::FlowClient;
use enforcer_tests::servers::Proto;
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, unique_name, NetNs, Outcome, Probe, Server, Veth};
use serde_json::Value;

/// This file's address range: 127.90.0.0/16 (and `fd7e:5a::/64`).
const NET: u8 = 90;
const PORT: u16 = 7400;
const ACME_PORT: u16 = 7401;
const WAIT: Duration = Duration::from_secs(10);

/// A connected UDP socket that sends with ancillary data (`sendmsg()` with no address and an
/// IP_TOS / IPV6_TCLASS control message, as QUIC stacks do for ECN) makes the kernel run
/// sendmsg4/6 with no address at all (`udp_sendmsg` clears `connected` when there is a
/// control message; the cgroup hook then sees 0.0.0.0:0 / [::]:0). The datagram goes to the
/// connected address, which connect4/6 already judged; the enforcer judged `0.0.0.0` as an
/// unspecified destination (refused) and `::` as ::1 (another tenant here), so a connect
/// the policy allows was followed by sends refused with a wrong event.
#[test]
fn connected_udp_with_control_messages_is_judged_by_its_connect() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let mut acme_svc = Entity::endpoint(NET, "acme-svc", "acme", "llm_api", 1, 10).port(
        ACME_PORT,
        Proto::Udp,
        "connect",
    );
    acme_svc.v6 = "fd7e:5a::1:10".parse()?;
    let mut globex_local = Entity::endpoint(NET, "globex-local", "globex", "llm_api", 2, 1).port(
        PORT,
        Proto::Udp,
        "connect",
    );
    globex_local.v4 = Ipv4Addr::LOCALHOST;
    globex_local.v6 = Ipv6Addr::LOCALHOST;
    let entities = vec![
        Entity::workload(NET, "acme-app", "acme", "inference", 1, 1),
        acme_svc,
        globex_local,
    ];
    let world = World::new(NET, entities, TENANT_ISOLATION_POLICIES)?;
    let ns = NetNs::create(&unique_name("atk"))?;
    ns.exec(&["ip", "addr", "add", "fd7e:5a::1:10/128", "dev", "lo"])?;
    let _servers = [
        Server::start_in_netns(&ns, Proto::Udp, "127.90.1.10:7401".parse()?)?,
        Server::start_in_netns(&ns, Proto::Udp, "[fd7e:5a::1:10]:7401".parse()?)?,
    ];
    let agent = world.start_agent()?;
    let probe = Probe::new()
        .in_cgroup(world.cgroup("acme-app"))
        .in_netns(&ns);
    let cases = [
        // Controls: the same connected sockets without control messages pass.
        ("udpc:127.90.1.10:7401", Outcome::Ok),
        ("udpc:[fd7e:5a::1:10]:7401", Outcome::Ok),
        ("udpcm:127.90.1.10:7401", Outcome::Ok),
        ("udpcm:[fd7e:5a::1:10]:7401", Outcome::Ok),
        ("udpcm:[::ffff:127.90.1.10]:7401", Outcome::Ok),
        // And the connect still decides: the other tenant's address is refused there, with
        // the one event the test expects.
        ("udpcm:127.0.0.1:7400", Outcome::Eperm),
    ];
    let attempts: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let results = probe.run(&attempts)?;
    let events = agent.settled_events(Duration::from_millis(500), Duration::from_secs(5))?;
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| e.pointer("/subject/workload").and_then(Value::as_str) == Some("acme-app"))
        .collect();
    let mut problems = Vec::new();
    for ((attempt, want), r) in cases.iter().zip(&results) {
        if r.outcome != *want {
            problems.push(format!(
                "{attempt}: saw {:?} (errno {}), want {want:?}",
                r.outcome, r.errno
            ));
        }
    }
    let s = |e: &Value, p: &str| e.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let want_event = ours.len() == 1
        && s(ours[0], "/hook").as_deref() == Some("connect4")
        && s(ours[0], "/reason").as_deref() == Some("tenant_mismatch")
        && s(ours[0], "/destination/ip").as_deref() == Some("127.0.0.1");
    ensure!(
        problems.is_empty() && want_event,
        "{}\nwant one event (connect4, tenant_mismatch, 127.0.0.1); events: {}",
        problems.join("\n"),
        ours.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    Ok(())
}

/// A connected UDP socket's connect was judged once; its later `send()`s ran no hook, so its
/// datagrams kept going where the policy no longer let it call (red-team reviews 43 M3 and
/// 44 M2): to a Service whose backends a tenant moved to another tenant's pod, to an address
/// reused by another tenant, to anywhere after a quarantine. `skb_egress` now judges such a
/// socket's call again whenever the policy generation or an identity's flags moved.
///
/// acme-app (in a namespace of the test's own, reaching two servers' addresses over a veth)
/// connects a UDP socket to acme-db and sends a datagram every 100 ms; then the inventory
/// gives that address to globex-db (the address reused by another tenant, as when a
/// Service's backends change): the next sends fail with `EPERM`, none reaches the server,
/// and one `tenant_mismatch` event with hook `egress` names globex-db; the address back to
/// acme-db, the sends pass again; a quarantine by hand (which changes no policy generation)
/// refuses them as `quarantined` until its release.
#[test]
fn a_connected_udp_socket_is_judged_again_when_the_policy_moves() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let (app6, acme6, globex6): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
        "fd7e:5a:1::1".parse()?,
        "fd7e:5a:1::10".parse()?,
        "fd7e:5a:1::20".parse()?,
    );
    let port = PORT + 2;
    let mut acme_db = Entity::endpoint(NET, "acme-db", "acme", "llm_api", 1, 20).port(
        port,
        Proto::Udp,
        "connect",
    );
    acme_db.v6 = acme6;
    let mut globex_db = Entity::endpoint(NET, "globex-db", "globex", "llm_api", 2, 20).port(
        port,
        Proto::Udp,
        "connect",
    );
    globex_db.v6 = globex6;
    // Where the client's namespace has no route.
    let far6: Ipv6Addr = "fd7e:5b::1".parse()?;
    let mut acme_far = Entity::endpoint(NET, "acme-far", "acme", "llm_api", 1, 30).port(
        port,
        Proto::Udp,
        "connect",
    );
    acme_far.v6 = far6;
    let mut entities = vec![
        Entity::workload(NET, "acme-app", "acme", "inference", 1, 2),
        acme_db,
        globex_db,
        acme_far,
    ];
    let world = World::new(NET, entities.clone(), TENANT_ISOLATION_POLICIES)?;
    let client_ns = NetNs::create(&unique_name("atk-c"))?;
    let server_ns = NetNs::create(&unique_name("atk-s"))?;
    let _veth = Veth::create(
        &client_ns,
        &[&format!("{app6}/64")],
        &server_ns,
        &[&format!("{acme6}/64"), &format!("{globex6}/64")],
    )?;
    let server = server_ns.run_in(|| UdpSocket::bind(SocketAddr::from((acme6, port))))??;
    server.set_read_timeout(Some(Duration::from_millis(100)))?;
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the reader however the test ends (a panic included); the socket goes with it.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = Stop(stop.clone());
    let _reader = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(8) = server.recv(&mut buf) {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                    received.lock().unwrap().push(seq);
                }
            }
        })
    };
    let result = (|| -> Result<()> {
        let agent = world.start_agent()?;
        first_applied_snapshot(&agent)?;
        let client = FlowClient::udp_ping(
            &client_ns,
            world.cgroup("acme-app"),
            SocketAddr::from((acme6, port)),
        )?;
        // Sends until one has the outcome wanted (`errno` 0 and the server got it, or the
        // errno); returns its sequence number.
        let until = |client: &FlowClient, errno: i32, what: &str| -> Result<u64> {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut last = None;
            while Instant::now() < deadline {
                let Some((seq, e)) = client.next_send(Duration::from_secs(2)) else {
                    break;
                };
                last = Some((seq, e));
                if e == errno
                    && (errno != 0
                        || wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
                            received.lock().unwrap().contains(&seq)
                        }))
                {
                    return Ok(seq);
                }
            }
            anyhow::bail!("{what}: no send ended with errno {errno}; last {last:?}")
        };
        // Then the next sends keep that outcome.
        let steady = |client: &FlowClient, errno: i32, what: &str| -> Result<u64> {
            let mut seq = 0;
            for _ in 0..3 {
                let (s, e) = client
                    .next_send(Duration::from_secs(2))
                    .with_context(|| format!("{what}: the client stopped sending"))?;
                ensure!(
                    e == errno,
                    "{what}: send {s} ended with errno {e}, not {errno}"
                );
                seq = s;
            }
            Ok(seq)
        };
        until(&client, 0, "acme-app's datagrams to acme-db")?;

        // The address now globex-db's: refused from the next datagram on.
        let swapped = |acme: Ipv6Addr, globex: Ipv6Addr, entities: &mut Vec<Entity>| {
            for e in entities.iter_mut() {
                match e.name.as_str() {
                    "acme-db" => e.v6 = acme,
                    "globex-db" => e.v6 = globex,
                    _ => {}
                }
            }
            render_inventory(entities, &world.root.relative_str())
        };
        let inventory = swapped(globex6, acme6, &mut entities);
        replace_file(world.bundle.path(), "inventory.yaml", &inventory, None)?;
        let first = until(&client, libc::EPERM, "after the address moved to globex-db")?;
        let last = steady(&client, libc::EPERM, "after the address moved to globex-db")?;
        let through: Vec<u64> = received
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|s| *s >= first)
            .collect();
        ensure!(
            through.is_empty(),
            "refused datagrams {first}..={last} reached the server: {through:?}"
        );
        let refused = |e: &Value, reason: &str, to: &str| {
            e["hook"] == "egress"
                && e["reason"] == reason
                && e["subject"]["workload"] == "acme-app"
                && e["destination"]["ip"] == acme6.to_string()
                && e["destination"]["port"] == port
                && e["destination"]["name"] == to
        };
        agent.wait_for(1, WAIT, |e| refused(e, "tenant_mismatch", "globex-db"))?;

        // Back to acme-db: judged again, and permitted.
        let inventory = swapped(acme6, globex6, &mut entities);
        replace_file(world.bundle.path(), "inventory.yaml", &inventory, None)?;
        until(&client, 0, "after the address came back to acme-db")?;
        steady(&client, 0, "after the address came back to acme-db")?;

        // A quarantine moves no policy generation; it refuses the socket's calls all the same.
        let pins = world.pins.path().display().to_string();
        let out = enforcer(&["quarantine", "add", "acme-app", "--pin-path", &pins])?;
        ensure!(out.success(), "quarantine add: {out}");
        until(&client, libc::EPERM, "after the quarantine")?;
        steady(&client, libc::EPERM, "after the quarantine")?;
        agent.wait_for(1, WAIT, |e| refused(e, "quarantined", "acme-db"))?;
        let out = enforcer(&["quarantine", "release", "acme-app", "--pin-path", &pins])?;
        ensure!(out.success(), "quarantine release: {out}");
        until(&client, 0, "after the release")?;
        drop(client);
        // (Its last datagram in flight reaches the reader before the count starts again.)
        std::thread::sleep(Duration::from_millis(300));

        // The same move, then a trick: the socket connects again to acme-far, which the hooks
        // permit and the kernel refuses (no route there), so it stays at the refused address;
        // that permitted connect must not stand in for where the socket is.
        received.lock().unwrap().clear();
        let client = FlowClient::udp_ping_refused_later(
            &client_ns,
            world.cgroup("acme-app"),
            SocketAddr::from((acme6, port)),
            SocketAddr::from((far6, port)),
        )?;
        until(&client, 0, "a second socket to acme-db")?;
        let inventory = swapped(globex6, acme6, &mut entities);
        replace_file(world.bundle.path(), "inventory.yaml", &inventory, None)?;
        until(&client, libc::EPERM, "the second socket, after the move")?;
        let errno = client.reconnect()?;
        ensure!(
            errno == libc::ENETUNREACH,
            "the connect to acme-far: errno {errno}, want ENETUNREACH"
        );
        steady(
            &client,
            libc::EPERM,
            "after the permitted connect the kernel refused",
        )?;

        // No other packet of the test was judged again.
        let events = agent.settled_events(Duration::from_millis(500), WAIT)?;
        let others: Vec<&Value> = events
            .iter()
            .filter(|e| {
                e["hook"] == "egress"
                    && !refused(e, "tenant_mismatch", "globex-db")
                    && !refused(e, "quarantined", "acme-db")
            })
            .collect();
        ensure!(others.is_empty(), "other egress events: {others:?}");
        Ok(())
    })();
    result
}

/// `enforcer detach --state-dir DIR` deleted DIR recursively, whatever it held: a sloppy
/// `--state-dir /var/lib` would wipe /var/lib. Only the agent's own files may go.
#[test]
fn detach_removes_only_the_agents_own_state_files() -> Result<()> {
    let tmp = enforcer_tests::TempDir::new("atk-detach")?;
    let state = tmp.path().join("state");
    std::fs::create_dir(&state)?;
    std::fs::write(state.join("precious.txt"), "not the enforcer's")?;
    std::fs::write(state.join("state.json"), "{}")?;
    std::fs::create_dir(state.join("pdp-bundle"))?;
    std::fs::write(state.join("pdp-bundle").join("inventory.yaml"), "")?;
    let pins = tmp.path().join("pins");
    let out = enforcer_tests::cli::enforcer(&[
        "detach".as_ref(),
        "--pin-path".as_ref(),
        pins.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ])?;
    ensure!(out.success(), "detach failed: {out}");
    // Nothing was pinned there: said so, not "detached" (review 40: a mistyped --pin-path
    // left the real hooks in place behind a success message).
    ensure!(
        out.stdout.contains("nothing was pinned under") && !out.stdout.contains("detached"),
        "{out}"
    );
    ensure!(
        state.join("precious.txt").exists(),
        "detach deleted a file it does not own in --state-dir"
    );
    ensure!(
        !state.join("state.json").exists() && !state.join("pdp-bundle").exists(),
        "detach left the agent's state behind"
    );
    // With only its own files, the directory goes too.
    std::fs::remove_file(state.join("precious.txt"))?;
    std::fs::write(state.join("state.json"), "{}")?;
    let out = enforcer_tests::cli::enforcer(&[
        "detach".as_ref(),
        "--pin-path".as_ref(),
        pins.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ])?;
    ensure!(out.success() && !state.exists(), "state dir left: {out}");
    Ok(())
}

/// `enforcer detach --pin-path DIR` deleted `DIR/v<ABI>` recursively wherever DIR was; pins
/// only live on a bpffs, so anything else is the operator's and must stay.
#[test]
fn detach_refuses_a_pin_path_off_bpffs() -> Result<()> {
    let tmp = enforcer_tests::TempDir::new("atk-detach-pins")?;
    // `<pin path>/v<ABI>`: the ABI's pin directory (README "Applying a bundle").
    let dir = enforcer::datapath::pin_dir(tmp.path());
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("precious.txt"), "not a pin")?;
    let out = enforcer_tests::cli::enforcer(&[
        "detach".as_ref(),
        "--pin-path".as_ref(),
        tmp.path().as_os_str(),
        "--state-dir".as_ref(),
        tmp.path().join("state").as_os_str(),
    ])?;
    ensure!(
        dir.join("precious.txt").exists(),
        "detach deleted files off bpffs: {out}"
    );
    ensure!(
        !out.success() && out.stderr.contains("not on a bpf filesystem"),
        "want a clear refusal: {out}"
    );
    Ok(())
}

//! Findings of the attack pass after issue 6, each as the smallest real-kernel reproducer.
//!
//! Everything runs inside network namespaces the tests create (`atk-*`), so that 127.0.0.1
//! and ::1 belong to the test alone. Addresses: 127.90.0.0/16 and `fd7e:5a::/64`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::fixtures::{Entity, World, TENANT_ISOLATION_POLICIES};
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, unique_name, NetNs, Outcome, Probe, Server};
use serde_json::Value;

/// This file's address range: 127.90.0.0/16 (and `fd7e:5a::/64`).
const NET: u8 = 90;
const PORT: u16 = 7400;
const ACME_PORT: u16 = 7401;

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

//! The harness itself, without the agent: cgroups come and go, the probe really runs inside
//! the cgroup (and namespace) it is given, servers answer, a veth pair carries IPv6, and
//! BPF_PROG_QUERY works. If these fail, the enforcer tests cannot mean anything.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::bpf::{prog_query, ENFORCER_HOOKS};
use enforcer_tests::fixtures::v6_addr;
use enforcer_tests::probe::attempt;
use enforcer_tests::servers::{Proto, Server};
use enforcer_tests::util::wait_until;
use enforcer_tests::{require_kernel, unique_name, NetNs, Outcome, Probe, TestCgroup, Veth};

const NET: u8 = 37;

#[test]
fn cgroups_are_created_and_removed_with_their_processes() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let root_rel = unique_name("enforcer-harness");
    let (root_path, leaf_path);
    {
        let a = TestCgroup::create(format!("{root_rel}/a/leaf"))?;
        let b = TestCgroup::create(format!("{root_rel}/b"))?;
        root_path = a.path().parent().unwrap().parent().unwrap().to_path_buf();
        leaf_path = a.path();
        ensure!(
            a.path().is_dir() && b.path().is_dir(),
            "cgroups not created"
        );
        ensure!(a.id() != 0 && a.id() != b.id(), "cgroup ids");
        ensure!(
            a.relative().to_string_lossy() == format!("{root_rel}/a/leaf"),
            "relative path"
        );
        // A process left running in a cgroup must not keep it alive past drop.
        let mut child = std::process::Command::new("sleep").arg("60").spawn()?;
        a.add_pid(child.id())?;
        ensure!(
            a.procs() == vec![child.id() as i32],
            "sleep not in the cgroup"
        );
        drop(a);
        ensure!(!leaf_path.exists(), "leaf not removed");
        let _ = child.wait(); // killed by the cgroup's drop
        ensure!(
            root_path.exists(),
            "the shared parent must stay while b lives"
        );
    }
    ensure!(
        !root_path.exists(),
        "parents created by the test not removed"
    );
    Ok(())
}

#[test]
fn probe_runs_inside_the_given_cgroup_and_reaches_loopback_servers() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let cg = TestCgroup::create(unique_name("enforcer-harness"))?;
    let ip = IpAddr::V4(Ipv4Addr::new(127, NET, 1, 1));
    let tcp = Server::start(Proto::Tcp, SocketAddr::new(ip, 8000))?;
    let udp = Server::start(Proto::Udp, SocketAddr::new(ip, 8001))?;
    let results = Probe::new().in_cgroup(&cg).run(&[
        attempt("tcp", ip, 8000),
        attempt("udp", ip, 8001),
        attempt("udpc", ip, 8001),
        // Nothing listens here: refused, which is an error, not EPERM.
        attempt("tcp", ip, 8002),
    ])?;
    let outcomes: Vec<Outcome> = results.iter().map(|r| r.outcome).collect();
    ensure!(
        outcomes == [Outcome::Ok, Outcome::Ok, Outcome::Ok, Outcome::Error],
        "{results:?}"
    );
    ensure!(results[3].errno == libc::ECONNREFUSED, "{:?}", results[3]);
    ensure!(
        wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
            tcp.hits() >= 1 && udp.hits() >= 2
        }),
        "servers saw tcp {} udp {}",
        tcp.hits(),
        udp.hits()
    );
    let burst = Probe::new()
        .in_cgroup(&cg)
        .repeat(50, &attempt("udp", ip, 8001))?;
    ensure!(burst.attempts == 50 && burst.ok == 50, "{burst:?}");

    // The probe's own view: its v2 cgroup is the test cgroup from its first instruction on.
    let me = Probe::new().in_cgroup(&cg).whoami()?;
    ensure!(
        me.cgroup == format!("/{}", cg.relative_str()),
        "probe ran in {:?}, want /{}",
        me.cgroup,
        cg.relative_str()
    );
    Ok(())
}

#[test]
fn veth_pair_carries_ipv6_between_test_namespaces() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let srv = NetNs::create(&unique_name("enf-hsrv"))?;
    let cli = NetNs::create(&unique_name("enf-hcli"))?;
    let server_ip = v6_addr(NET, 1, 10);
    let client_ip = v6_addr(NET, 0xff, 0xfe);
    let _veth = Veth::create(
        &srv,
        &[&format!("{server_ip}/64")],
        &cli,
        &[&format!("{client_ip}/64")],
    )?;
    let tcp = Server::start_in_netns(&srv, Proto::Tcp, SocketAddr::new(server_ip.into(), 6333))?;
    let cg = TestCgroup::create(unique_name("enforcer-harness"))?;
    let probe = Probe::new().in_netns(&cli).in_cgroup(&cg);
    let target = attempt("tcp", server_ip.into(), 6333);
    ensure!(target == format!("tcp:[{server_ip}]:6333"), "{target}");
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        probe
            .run_one(&target)
            .is_ok_and(|r| r.outcome == Outcome::Ok)
    });
    ensure!(ok, "{target} unreachable from the client namespace");
    ensure!(
        tcp.hits() >= 1
            || wait_until(Duration::from_secs(2), Duration::from_millis(10), || tcp
                .hits()
                >= 1),
        "server saw nothing"
    );
    Ok(())
}

#[test]
fn prog_query_sees_no_programs_on_a_fresh_cgroup() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let cg = TestCgroup::create(unique_name("enforcer-harness"))?;
    for (t, name) in ENFORCER_HOOKS {
        let ids = prog_query(&cg.path(), t)?;
        ensure!(ids.is_empty(), "{name}: {ids:?}");
    }
    Ok(())
}

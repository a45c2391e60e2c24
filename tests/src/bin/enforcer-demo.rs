//! `cargo xtask demo`: the enforcer end to end on the demo policies, as root.
//!
//! Reads `policies/demo/inventory.yaml`, creates the workloads' cgroups and servers on their
//! loopback addresses, starts the agent on the demo cgroup root, then shows: an allowed
//! same-tenant call to a vector DB, a denied cross-tenant call to another tenant's vector DB
//! (the client sees EPERM) with its deny event, and that a process outside the cgroup root is
//! not affected. Cleans up everything; exits non-zero if any expectation failed.
//!
//! Usage: `enforcer-demo [--policies DIR]` (default: `policies/demo` of the source tree).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use enforcer_tests::agent::{Agent, AgentConfig};
use enforcer_tests::bpf::{ensure_bpffs, remove_pins, PinDir};
use enforcer_tests::cgroup::{cgroup2_mount, remove_cgroup_tree, TestCgroup};
use enforcer_tests::probe::{attempt, Outcome, Probe};
use enforcer_tests::servers::{Proto, Server};

/// The part of the inventory the demo needs; everything else is ignored.
#[derive(Debug, Deserialize)]
struct Inventory {
    #[serde(default)]
    workloads: Vec<Item>,
    #[serde(default)]
    endpoints: Vec<Item>,
}

#[derive(Debug, Deserialize)]
struct Item {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    cgroups: Vec<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
}

#[derive(Debug, Deserialize)]
struct PortSpec {
    port: u16,
    #[serde(default = "default_protocol")]
    protocol: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

impl Item {
    /// The first single-host loopback IPv4 address (the demo binds nothing else).
    fn loopback_v4(&self) -> Option<IpAddr> {
        self.ips.iter().find_map(|cidr| host_loopback(cidr))
    }
}

fn host_loopback(cidr: &str) -> Option<IpAddr> {
    let (ip, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let ip: IpAddr = ip.parse().ok()?;
    (ip.is_ipv4() && ip.is_loopback() && prefix == "32").then_some(ip)
}

/// One call the demo makes and what it expects.
struct Call<'a> {
    title: &'a str,
    /// Who makes the call, as shown (the workload, or a host process).
    caller: String,
    from: &'a Item,
    to: &'a Item,
    ip: IpAddr,
    port: &'a PortSpec,
}

impl Call<'_> {
    fn attempt(&self) -> String {
        let kind = if self.port.protocol.eq_ignore_ascii_case("udp") {
            "udp"
        } else {
            "tcp"
        };
        attempt(kind, self.ip, self.port.port)
    }

    fn describe(&self) -> String {
        format!(
            "{} -> {} ({}:{}/{})",
            self.caller, self.to.name, self.ip, self.port.port, self.port.protocol
        )
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => {
            println!("\nresult: PASS (everything cleaned up)");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("\nresult: FAIL (see above; everything cleaned up)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("\nenforcer-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The bundle to run on, and the copy that holds it (removed on drop). The source tree's
/// demo bundle is copied to a directory of root's: the agent refuses a bundle another user
/// could change, and a checkout may be a user's (`sudo cargo xtask demo`).
fn policies_dir() -> Result<(PathBuf, Option<enforcer_tests::TempDir>)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            let copy = enforcer_tests::TempDir::new("enforcer-demo-policies")?;
            let source = enforcer_tests::fixtures::demo_policies_dir();
            for entry in std::fs::read_dir(&source)
                .with_context(|| format!("listing {}", source.display()))?
            {
                let entry = entry?;
                let to = copy.path().join(entry.file_name());
                std::fs::copy(entry.path(), &to)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
                // `copy` keeps the source's mode: a checkout made under umask 002 is 0664.
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            }
            Ok((copy.path().to_path_buf(), Some(copy)))
        }
        [flag, dir] if flag == "--policies" => Ok((PathBuf::from(dir), None)),
        _ => bail!("usage: enforcer-demo [--policies DIR]"),
    }
}

fn run() -> Result<bool> {
    let (dir, _copy) = policies_dir()?;
    if let Some(reason) = enforcer_tests::kernel_unavailable_reason() {
        bail!("cannot run the demo here: {reason}");
    }
    let inv_path = dir.join("inventory.yaml");
    let inv: Inventory = serde_yaml::from_str(
        &std::fs::read_to_string(&inv_path)
            .with_context(|| format!("read {}", inv_path.display()))?,
    )
    .with_context(|| format!("parse {}", inv_path.display()))?;

    println!("== enforcer demo: tenant isolation in the kernel ==");
    println!("policies: {}", dir.display());

    // The cgroup root is what every workload cgroup lives under (`enforcer-demo`).
    let root_name = cgroup_root_of(&inv)?;
    let mount = cgroup2_mount()?;
    clean_stale_runs(&mount, &root_name)?;

    let pins = PinDir::new("enforcer-demo")?;
    let root = TestCgroup::create(&root_name)?;
    let mut cgroups = Vec::new();
    for w in inv.workloads.iter().filter(|w| !w.cgroups.is_empty()) {
        for cg in &w.cgroups {
            cgroups.push((w.name.as_str(), TestCgroup::create(cg)?));
        }
    }
    println!(
        "cgroups:  {} workloads under {}",
        cgroups.len(),
        root.path().display()
    );

    let mut servers = Vec::new();
    for item in inv.workloads.iter().chain(&inv.endpoints) {
        let Some(ip) = item.loopback_v4() else {
            continue;
        };
        for p in &item.ports {
            let proto = Proto::parse(&p.protocol)?;
            servers.push(Server::start(proto, SocketAddr::new(ip, p.port))?);
        }
    }
    let listing: Vec<String> = servers
        .iter()
        .map(|s| format!("{}/{}", s.addr(), s.proto().as_str()))
        .collect();
    println!("servers:  {}", listing.join(", "));

    let (same, cross) = choose_calls(&inv)?;
    let cfg = AgentConfig::new(&dir, &root_name, pins.path());
    let agent = Agent::start(cfg).context("start the agent (build it: `cargo xtask demo`)")?;
    println!(
        "agent:    running (pid {}), --cgroup-root {root_name}, pins in {}",
        agent.pid(),
        pins.path().display()
    );

    let cg_of = |name: &str| {
        cgroups
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, cg)| cg)
            .expect("chosen subjects have cgroups")
    };
    let mut all_ok = true;
    let mut check = |n: u32, call: &Call, probe: Probe, want: Outcome| -> Result<()> {
        let r = probe.run_one(&call.attempt())?;
        let seen = match r.outcome {
            Outcome::Ok => "connected / sent".to_string(),
            Outcome::Eperm => "EPERM (Operation not permitted)".to_string(),
            Outcome::Error => format!("error (errno {})", r.errno),
        };
        let wanted = match want {
            Outcome::Ok => "allowed",
            Outcome::Eperm => "EPERM",
            Outcome::Error => "error",
        };
        let verdict = if r.outcome == want {
            "as expected"
        } else {
            all_ok = false;
            "UNEXPECTED"
        };
        println!("\n[{n}] {}: {}", call.title, call.describe());
        println!("    client saw: {seen}   [{verdict}: want {wanted}]");
        Ok(())
    };

    check(
        1,
        &same,
        Probe::new().in_cgroup(cg_of(&same.from.name)),
        Outcome::Ok,
    )?;
    check(
        2,
        &cross,
        Probe::new().in_cgroup(cg_of(&cross.from.name)),
        Outcome::Eperm,
    )?;
    let outside = Call {
        title: "the same call from a host process outside the cgroup root",
        caller: "host process".to_string(),
        ..cross
    };
    check(3, &outside, Probe::new(), Outcome::Ok)?;

    // The deny event of call 2.
    let to = cross.to.name.clone();
    let from = cross.from.name.clone();
    let is_ours = |e: &serde_json::Value| {
        e.pointer("/subject/workload").and_then(|v| v.as_str()) == Some(from.as_str())
            && e.pointer("/destination/name").and_then(|v| v.as_str()) == Some(to.as_str())
    };
    match agent.wait_for(1, Duration::from_secs(10), is_ours) {
        Ok(events) => {
            println!("\ndeny event (JSON line in the agent's --events file, pretty-printed):");
            for e in events.iter().filter(|e| is_ours(e)) {
                println!("{}", serde_json::to_string_pretty(e)?);
            }
        }
        Err(e) => {
            all_ok = false;
            println!("\nno deny event for call 2: {e:#}");
        }
    }
    if !all_ok {
        println!("\nagent stderr (tail):\n{}", agent.stderr_tail());
    }
    println!("\ncleaning up: agent, servers, cgroups, pins");
    drop(agent);
    drop(servers);
    drop(cgroups);
    drop(root);
    drop(pins);
    Ok(all_ok)
}

/// The single top-level cgroup directory that holds every workload's cgroups.
fn cgroup_root_of(inv: &Inventory) -> Result<String> {
    let mut roots: Vec<&str> = inv
        .workloads
        .iter()
        .flat_map(|w| &w.cgroups)
        .map(|c| c.trim_matches('/').split('/').next().unwrap_or(""))
        .collect();
    roots.sort();
    roots.dedup();
    match roots.as_slice() {
        [one] if !one.is_empty() => Ok(one.to_string()),
        _ => bail!("demo workloads' cgroups must share one top-level directory, got {roots:?}"),
    }
}

/// A same-tenant and a cross-tenant call to vector DBs from one workload with a cgroup.
fn choose_calls<'a>(inv: &'a Inventory) -> Result<(Call<'a>, Call<'a>)> {
    let vector_dbs: Vec<&Item> = inv
        .endpoints
        .iter()
        .filter(|e| e.kind.as_deref() == Some("vector_db") && !e.ports.is_empty())
        .filter(|e| e.loopback_v4().is_some())
        .collect();
    for w in inv.workloads.iter().filter(|w| !w.cgroups.is_empty()) {
        let own = vector_dbs.iter().find(|e| e.tenant == w.tenant);
        let other = vector_dbs.iter().find(|e| e.tenant != w.tenant);
        if let (Some(own), Some(other)) = (own, other) {
            // The endpoint's first port at its loopback address (both kept by the filter).
            let call = |title, to: &'a Item| Call {
                title,
                caller: w.name.clone(),
                from: w,
                to,
                ip: to.loopback_v4().expect("filtered"),
                port: &to.ports[0],
            };
            let same = call("same tenant, allowed", own);
            let cross = call("cross tenant to a vector DB, denied", other);
            return Ok((same, cross));
        }
    }
    bail!(
        "the inventory has no workload with cgroups whose tenant has a vector_db endpoint \
         while another tenant has one too"
    )
}

/// A demo killed mid-run (Ctrl-C) leaves its cgroups and pins behind; the stale programs
/// would then judge this run's new cgroups as unknown. Remove what dead demos left.
fn clean_stale_runs(mount: &Path, root_name: &str) -> Result<()> {
    let bpffs = ensure_bpffs()?;
    if let Ok(rd) = std::fs::read_dir(&bpffs) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // PinDir names are `enforcer-demo-<pid>-<n>`.
            let Some(pid) = name
                .strip_prefix("enforcer-demo-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            if !alive {
                println!("removing stale pins {}", entry.path().display());
                remove_pins(&entry.path());
            }
        }
    }
    let stale = mount.join(root_name);
    if stale.exists() {
        println!("removing stale cgroup {}", stale.display());
        remove_cgroup_tree(&stale, Duration::from_secs(5))?;
    }
    Ok(())
}

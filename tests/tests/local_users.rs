//! What another local user can do to the enforcer: nothing. Its pins and state (an unlinked
//! link pin detaches a hook; the last good bundle and the cluster state are enforced after a
//! restart), its secrets (the flow key signs identities every node trusts) and its policy
//! (which decides what the kernel allows) are refused when another user could change or
//! read them. The test stands user `nobody` (65534) for
//! that user.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use enforcer_tests::bpf::{prog_query, ENFORCER_HOOKS};
use enforcer_tests::fixtures::World;
use enforcer_tests::{require_kernel, Outcome, Probe};

/// Programs attached directly to the world's cgroup root, over all hooks.
fn attached(world: &World) -> Result<usize> {
    ENFORCER_HOOKS
        .iter()
        .map(|&(t, _)| Ok(prog_query(&world.root.path(), t)?.len()))
        .sum()
}

/// The unprivileged user the test stands another local user for.
const NOBODY: u32 = 65534;

/// Runs an agent expected to be refused (bounded: one that is not refused runs until
/// killed) and returns its stderr.
fn refused(config: enforcer_tests::agent::AgentConfig, what: &str) -> Result<String> {
    let out = enforcer_tests::util::output_bounded(
        &mut config.run_command(Path::new("/dev/null")),
        Duration::from_secs(30),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "{what}: not refused\n{stderr}");
    Ok(stderr)
}

/// Only the agent's user can change its pins and state. Before, the agent took a pin
/// directory another user had created (on a bpffs mounted 1777, as the kernel mounts it by
/// default, any user can create one first): that user could then unlink the agent's link
/// pins and so detach its hooks. Its state directory likewise (the last good bundle and the
/// cluster state are enforced after a restart). And the pin directories were 0755: anyone
/// could open one and `flock` it, which keeps every later agent from starting.
#[test]
fn an_agent_refuses_pins_and_state_another_user_could_change_and_keeps_its_own_private(
) -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(41)?;
    let _servers = world.servers_v4()?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, same) = world.gateway_calls();
    let pin_root = world.agent_config().pin_path;

    std::fs::create_dir(&pin_root)?;
    std::os::unix::fs::chown(&pin_root, Some(NOBODY), Some(NOBODY))?;
    let stderr = refused(world.agent_config(), "pins of another user")?;
    ensure!(
        stderr.contains(&pin_root.display().to_string()) && stderr.contains("owned by uid 65534"),
        "the refusal names neither the directory nor its owner:\n{stderr}"
    );
    ensure!(
        attached(&world)? == 0,
        "a refused agent attached {} hooks",
        attached(&world)?
    );
    std::os::unix::fs::chown(&pin_root, Some(0), Some(0))?;

    let state = enforcer_tests::cli::StateDir::new()?;
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY))?;
    let stderr = refused(
        state.configure(world.agent_config()),
        "a state directory of another user",
    )?;
    ensure!(
        stderr.contains(&state.path().display().to_string())
            && stderr.contains("owned by uid 65534"),
        "the refusal names neither the state directory nor its owner:\n{stderr}"
    );
    std::os::unix::fs::chown(state.path(), Some(0), Some(0))?;

    // The pin root as an earlier release left it (0755): taken, and made private.
    std::fs::set_permissions(
        &pin_root,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let _agent = enforcer_tests::Agent::start(state.configure(world.agent_config()))?;
    probe.expect_outcome(&cross, Outcome::Eperm, "the agent")?;
    probe.expect_outcome(&same, Outcome::Ok, "the agent")?;
    let pins = enforcer::datapath::pin_dir(&pin_root);
    for dir in [&pin_root, &pins] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir)?.permissions());
        ensure!(
            mode & 0o077 == 0,
            "{} is mode {:04o}: other users can open it",
            dir.display(),
            mode & 0o7777
        );
    }
    let flock = enforcer_tests::util::output_bounded(
        std::process::Command::new("flock")
            .arg("--nonblock")
            .arg(&pins)
            .arg("true")
            .uid(NOBODY)
            .gid(NOBODY),
        Duration::from_secs(10),
    )?;
    ensure!(
        !flock.status.success(),
        "another user locked {}: the next agent could not start",
        pins.display()
    );
    Ok(())
}

/// A flow key, a PDP token or a TLS key that other users can read is refused, and the error
/// names the file. Whoever reads the flow key can sign any workload's identity into a SYN that
/// every node's ingress check accepts; before, a key file written 0644 was loaded as it was
/// (and so were the token and the TLS key).
#[test]
fn a_key_or_token_other_users_can_read_is_refused() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(42)?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let _servers = world.servers_v4()?;
    let (cross, _) = world.gateway_calls();
    let dir = enforcer_tests::TempDir::new("lu-secrets")?;
    let open = |name: &str, contents: &str| -> Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        Ok(path)
    };
    let names = |stderr: &str, path: &Path| {
        stderr.contains(&path.display().to_string())
            && stderr.contains("open to other users (mode 0644)")
    };

    let key = open("flow.keys", "1 000102030405060708090a0b0c0d0e0f\n")?;
    let mut config = world.agent_config();
    config.extra_args = vec!["--flow-key-file".into(), key.display().to_string()];
    let stderr = refused(config.clone(), "a flow key other users can read")?;
    ensure!(
        names(&stderr, &key),
        "the refusal does not name the key file:\n{stderr}"
    );
    ensure!(attached(&world)? == 0, "a refused agent attached hooks");
    enforcer_tests::util::write_secret(&key, "1 000102030405060708090a0b0c0d0e0f\n")?;
    let _agent = enforcer_tests::Agent::start(config)?;
    probe.expect_outcome(&cross, Outcome::Eperm, "the agent with a 0600 key")?;

    let token = open("pdp.token", "lu-token-7f3a\n")?;
    let mut pdp = std::process::Command::new(enforcer_tests::agent::enforcer_bin());
    pdp.args(["pdp", "serve", "--listen", "127.42.250.1:0", "--policies"])
        .arg(world.bundle.path())
        .arg("--token-file")
        .arg(&token);
    let out = enforcer_tests::util::output_bounded(&mut pdp, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && names(&stderr, &token),
        "pdp serve with a token other users can read: {:?}\n{stderr}",
        out.status
    );

    let pair = rcgen::generate_simple_self_signed(vec!["127.42.250.1".to_string()])?;
    let cert = dir.path().join("tls.crt");
    std::fs::write(&cert, pair.cert.pem())?;
    let tls_key = open("tls.key", &pair.signing_key.serialize_pem())?;
    let mut admission = std::process::Command::new(enforcer_tests::agent::enforcer_bin());
    admission
        .args([
            "admission",
            "serve",
            "--listen",
            "127.42.250.1:0",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&tls_key);
    let out = enforcer_tests::util::output_bounded(&mut admission, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && names(&stderr, &tls_key),
        "admission serve with a TLS key other users can read: {:?}\n{stderr}",
        out.status
    );
    Ok(())
}

/// A policy bundle another user could change is refused: at start (nothing attached), and
/// at a reload (the bundle in force stays, and `policy.rejected` names the file). Before,
/// the agent enforced whatever the bundle directory held, so a user who owned one policy
/// file, or could write the directory, decided what the kernel allows. The PDP, which
/// publishes its directory to every node, refuses it too.
#[test]
fn a_policy_bundle_another_user_could_change_is_refused_and_the_last_good_stays() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(43)?;
    let _servers = world.servers_v4()?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, same) = world.gateway_calls();
    let inventory = world.bundle.path().join("inventory.yaml");

    std::os::unix::fs::chown(&inventory, Some(NOBODY), None)?;
    let stderr = refused(
        world.agent_config(),
        "a bundle with another user's inventory",
    )?;
    ensure!(
        stderr.contains(&inventory.display().to_string()) && stderr.contains("owned by uid 65534"),
        "the refusal does not name the inventory and its owner:\n{stderr}"
    );
    ensure!(attached(&world)? == 0, "a refused agent attached hooks");

    let mut pdp = std::process::Command::new(enforcer_tests::agent::enforcer_bin());
    pdp.args(["pdp", "serve", "--listen", "127.43.250.1:0", "--policies"])
        .arg(world.bundle.path())
        .env("ENFORCER_PDP_TOKEN", "lu-token-43c1");
    let out = enforcer_tests::util::output_bounded(&mut pdp, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("owned by uid 65534"),
        "pdp serve with another user's inventory: {:?}\n{stderr}",
        out.status
    );
    std::os::unix::fs::chown(&inventory, Some(0), None)?;

    let agent = enforcer_tests::Agent::start(world.agent_config())?;
    probe.expect_outcome(&cross, Outcome::Eperm, "cross-tenant, the bundle in force")?;
    probe.expect_outcome(&same, Outcome::Ok, "same tenant, the bundle in force")?;

    // Another user's policy file that would deny everything, then a reload.
    // Owned by nobody before it is in the bundle: written beside it, then renamed in (the
    // agent polls the directory, and a root-owned moment would be a policy it may load).
    let planted = world.bundle.path().join("planted.cedar");
    let staged = world.bundle.path().with_extension("planted.cedar");
    std::fs::write(&staged, "forbid (principal, action, resource);\n")?;
    std::os::unix::fs::chown(&staged, Some(NOBODY), None)?;
    std::fs::rename(&staged, &planted)?;
    enforcer_tests::cli::send_signal(agent.pid(), libc::SIGHUP)?;
    let rejected = enforcer_tests::cli::wait_notices(
        &agent,
        "policy.rejected",
        1,
        Duration::from_secs(15),
        |_| true,
    )?;
    let text = rejected[0].to_string();
    ensure!(
        text.contains("planted.cedar") && text.contains("owned by uid 65534"),
        "policy.rejected must name the file and its owner: {text}"
    );
    probe.expect_outcome(&same, Outcome::Ok, "same tenant, after the refused reload")?;

    // The same file, root's: taken, so the refusal above was the owner's doing.
    std::os::unix::fs::chown(&planted, Some(0), None)?;
    enforcer_tests::cli::send_signal(agent.pid(), libc::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let outcome = probe.run_one(&same)?.outcome;
        if outcome == Outcome::Eperm {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the root-owned policy was not taken within 15 s (same tenant: {outcome:?})\n{}",
            agent.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

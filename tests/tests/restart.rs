//! Survives its own restart: after `kill -9` of the agent, the pinned programs keep
//! enforcing; a new agent on the same pin dir adopts them (one program per hook, not two)
//! and resumes events. While one agent runs, a second on the same pins is refused.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::bpf::{
    load_allow_all_connect4, pinned_link, prog_query, set_link_program, ENFORCER_HOOKS,
};
use enforcer_tests::fixtures::{event_matches, World};
use enforcer_tests::servers::Proto;
use enforcer_tests::{require_kernel, Outcome, Probe};

/// Programs attached directly to the cgroup root, per hook.
fn attached(world: &World) -> Result<Vec<(&'static str, usize)>> {
    ENFORCER_HOOKS
        .iter()
        .map(|&(t, name)| Ok((name, prog_query(&world.root.path(), t)?.len())))
        .collect()
}

fn exactly_one_per_hook(world: &World, when: &str) -> Result<()> {
    let counts = attached(world)?;
    ensure!(
        counts.iter().all(|&(_, n)| n == 1),
        "{when}: want exactly one program per hook at the cgroup root, got {counts:?}"
    );
    Ok(())
}

#[test]
fn enforcement_survives_kill9_and_a_new_agent_adopts_the_pins() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(35)?;
    let _servers = world.servers_v4()?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, same) = world.gateway_calls();
    let ours = |e: &serde_json::Value| {
        event_matches(e, "acme-gateway", "globex-vectors", 6333, Proto::Tcp)
    };
    let expect = |what: &str, want, when: &str| probe.expect_outcome(what, want, when);

    let mut first = world.start_agent()?;
    expect(&cross, Outcome::Eperm, "first agent")?;
    expect(&same, Outcome::Ok, "first agent")?;
    first.wait_for(1, Duration::from_secs(10), ours)?;
    exactly_one_per_hook(&world, "first agent")?;

    // A second agent on the same pins while the first runs would undo its policy: refused.
    // Run by hand, not as an `Agent`: its Drop would remove the first agent's pins.
    let rival = world
        .agent_config()
        .run_command(Path::new("/dev/null"))
        .stdin(std::process::Stdio::null())
        .output()?;
    let rival_err = String::from_utf8_lossy(&rival.stderr);
    ensure!(
        !rival.status.success() && rival_err.contains("another enforcer agent"),
        "a second agent on the same pins: {:?}\n{rival_err}",
        rival.status
    );
    exactly_one_per_hook(&world, "after the refused second agent")?;
    expect(&cross, Outcome::Eperm, "after the refused second agent")?;

    first.kill9()?;
    exactly_one_per_hook(&world, "no agent (after kill -9)")?;
    expect(&cross, Outcome::Eperm, "no agent (after kill -9)")?;
    expect(&same, Outcome::Ok, "no agent (after kill -9)")?;

    let second = world.start_agent()?;
    exactly_one_per_hook(&world, "second agent on the same pins")?;
    expect(&cross, Outcome::Eperm, "second agent")?;
    expect(&same, Outcome::Ok, "second agent")?;
    // New denies reach the new agent's events file (it may also drain older ones from the
    // pinned ring buffer: at least one, then).
    second.wait_for(1, Duration::from_secs(10), ours)?;
    Ok(())
}

/// An agent restarted on pins that an earlier release left (same ABI, other code) makes the
/// pinned links run its own programs. The test puts a `connect4` that allows everything into
/// the pinned link (another release's program), checks it is in force, and starts an agent:
/// the cross-tenant call is denied again, with one program per hook. Before, a pinned link
/// was adopted as it was: the old program went on deciding for as long as the pins lived.
#[test]
fn a_restarted_agent_replaces_another_releases_program_in_its_links() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(38)?;
    let _servers = world.servers_v4()?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, _) = world.gateway_calls();
    let mut first = world.start_agent()?;
    probe.expect_outcome(&cross, Outcome::Eperm, "first agent")?;
    let pins = enforcer::datapath::pin_dir(&world.agent_config().pin_path);
    first.kill9()?;

    let link = pinned_link(&pins, "connect4")?;
    let old = load_allow_all_connect4()?;
    set_link_program(&link, std::os::fd::AsFd::as_fd(&old))?;
    drop(old);
    probe.expect_outcome(
        &cross,
        Outcome::Ok,
        "another release's connect4 in the link",
    )?;

    let _second = world.start_agent()?;
    probe.expect_outcome(&cross, Outcome::Eperm, "the restarted agent")?;
    exactly_one_per_hook(&world, "the restarted agent")?;
    Ok(())
}

/// An upgrade that changes the ABI leaves the previous release's pins in `v<N>` beside the
/// new agent's: the test stands for that by renaming a killed agent's pin directory to another
/// ABI number. The new agent, once its own hooks are in place, removes them, so exactly one
/// enforcer program per hook decides. Before, the old release's links stayed attached on maps
/// no agent wrote any more (two programs per hook, its denies standing beside the new policy).
/// While an agent of the other release runs (its directory locked), the new one refuses to
/// start, as it does on its own pins.
#[test]
fn an_agent_removes_the_hooks_another_abi_left_and_refuses_while_that_agent_runs() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(39)?;
    let _servers = world.servers_v4()?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, same) = world.gateway_calls();
    let mut first = world.start_agent()?;
    probe.expect_outcome(&cross, Outcome::Eperm, "first agent")?;
    first.kill9()?;

    let pin_root = world.agent_config().pin_path;
    let old = pin_root.join(format!("v{}", enforcer_common::ABI_VERSION - 1));
    std::fs::rename(enforcer::datapath::pin_dir(&pin_root), &old)
        .with_context(|| format!("renaming the pins to {}", old.display()))?;
    exactly_one_per_hook(&world, "the old release's pins only")?;

    // That release's agent still running: its directory is locked.
    let held = std::fs::File::open(&old)?;
    // SAFETY: flock on an fd we own.
    ensure!(
        unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&held),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0,
        "locking {}",
        old.display()
    );
    // Bounded: an agent that is not refused runs until killed.
    let refused = enforcer_tests::util::output_bounded(
        &mut world.agent_config().run_command(Path::new("/dev/null")),
        Duration::from_secs(30),
    )?;
    let refused_err = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success()
            && refused_err.contains("another release")
            && refused_err.contains(&old.display().to_string()),
        "an agent while another release's agent holds {}: {:?}\n{refused_err}",
        old.display(),
        refused.status
    );
    exactly_one_per_hook(&world, "after the refused agent")?;
    drop(held);

    let _second = world.start_agent()?;
    // An unpinned link is released by the kernel a moment later (deferred work): wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while exactly_one_per_hook(&world, "").is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    exactly_one_per_hook(&world, "the new release's agent")?;
    ensure!(
        !old.exists(),
        "the old release's pins are still in {}",
        old.display()
    );
    probe.expect_outcome(&cross, Outcome::Eperm, "the new release's agent")?;
    probe.expect_outcome(&same, Outcome::Ok, "the new release's agent")?;
    Ok(())
}

/// `SPENT_RECENT`, the kernel's filter in front of `SPENT_TAGS`, holds per slot the latest time
/// of the options spent there. A filter that does not stand for what `SPENT_TAGS` holds (made
/// anew beside it: its pin removed alone) would let a copy of an option spent before the
/// restart skip the lookup that refuses it. The agent repairs it at start, before its
/// programs run: the slot of every option that can still be fresh and whose slot is below its
/// time is set above any time that can still be fresh; a stale option's slot and every other
/// slot are left alone, and a restart with a filter that holds writes nothing (red-team
/// reviews 65 L1, 66 L1). The state is made through the pins while no agent runs: two options
/// spent now and two hours ago (the kernel made neither; what matters is what the filter
/// holds beside them).
#[test]
fn a_spent_filter_that_does_not_hold_is_repaired_at_start_and_one_that_holds_is_left() -> Result<()>
{
    use enforcer_common::wire::{spent_slot, SpentKey, MAX_SKEW_S};
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(92)?;
    let dir = enforcer::datapath::pin_dir(&world.agent_config().pin_path);
    let slots = || -> Result<Vec<u64>> {
        let path = dir.join(enforcer_common::maps::SPENT_RECENT);
        let filter: aya::maps::Array<_, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(&path)?,
        ))?;
        Ok(filter.iter().collect::<Result<_, _>>()?)
    };
    let mut first = world.start_agent()?;
    ensure!(
        slots()?.iter().all(|&s| s == 0),
        "a fresh start's filter is not empty"
    );
    first.stop()?;

    let now = enforcer::wire::now_stamp()?;
    let option = |sport: u16, at: u32| SpentKey {
        saddr: std::net::Ipv6Addr::new(0xfd84, 0, 0, 0, 0, 0, 0, 0x99).octets(),
        daddr: std::net::Ipv6Addr::new(0xfd84, 0, 0, 0, 0, 0, 0, 2).octets(),
        sport,
        dport: 6334,
        stamp: at as u16,
        epoch: (at >> 16) as u16,
    };
    let fresh = option(40_001, now);
    let stale = (40_002..)
        .map(|sport| option(sport, now - 7_200))
        .find(|k| spent_slot(k) != spent_slot(&fresh))
        .context("no port whose slot differs")?;
    let path = dir.join(enforcer_common::maps::SPENT_TAGS);
    let mut spent: aya::maps::HashMap<_, SpentKey, u32> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(&path)?),
    )?;
    spent.insert(fresh, now, 0)?;
    spent.insert(stale, now - 7_200, 0)?;

    let mut second = world.start_agent()?;
    let repaired = slots()?;
    let (f, s) = (spent_slot(&fresh) as usize, spent_slot(&stale) as usize);
    ensure!(
        repaired[f] > u64::from(now) + u64::from(MAX_SKEW_S),
        "the fresh option's slot {f} holds {} (want above now + the largest skew)",
        repaired[f]
    );
    let others: Vec<(usize, u64)> = repaired
        .iter()
        .copied()
        .enumerate()
        .filter(|&(i, v)| i != f && v != 0)
        .collect();
    ensure!(
        others.is_empty(),
        "slots set besides {f} (stale option's: {s}): {others:?}"
    );
    second.stop()?;

    // The filter holds now: a restart writes nothing (the fresh slot keeps its value).
    let _third = world.start_agent()?;
    ensure!(
        slots()? == repaired,
        "a restart with a filter that holds changed it"
    );
    Ok(())
}

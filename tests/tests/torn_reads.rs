//! Torn and recycled reads of `CGROUP_IDENTITY` and `IDENTITIES`: the kernel programs read
//! them under their values' `bpf_spin_lock` and check the key each value carries, and the
//! agent writes them in place under the lock and tombstones a key before deleting it
//! (`enforcer_common::locked`). This stress test churns both maps through the agent's own
//! writers (`enforcer::datapath::locked`) as hard as a test can while a denied call repeats.
//!
//! The kernel's hash maps recycle an element at once: a deleted key's element goes back to
//! the free list and the next new key takes it (a replaced one becomes the CPU's spare). A
//! program that looked a key up just before and read through its pointer just after would
//! read another key's value. Here:
//!
//! - acme-gateway floods a connect to globex-vectors (another tenant: denied) for
//!   `WINDOW`, as fast as it can;
//! - one hammer thread per CPU (pinned to it); the first rewrites acme-gateway's entries
//!   in place, deletes and re-adds them (freeing the elements a racing `decide` may hold
//!   to its CPU's free list); each deletes and re-adds its decoy key whose value is globex-agent's (a cgroup id no cgroup
//!   has -> globex-agent's identity; an identity number no workload has -> globex-agent's
//!   `IdentityInfo`), which takes a freed element.
//!
//! A read of a recycled element that were accepted would see globex-agent, which may reach
//! globex-vectors (same tenant): any success of the flood is a failure. While the
//! gateway's entries are deleted it is unknown and denied (fail closed), so every attempt
//! must be refused.
//!
//! Before the fix (values read field by field through the lookup's pointer, updates that
//! replace elements) the same flood against plain replacing updates (1.3 M rounds of four,
//! 388,962 attempts in 5 s, load average 17) let nothing through either: the race window is
//! a few instructions, so this is a property test of the protocol, not a reproducer.
//!
//! Addresses: 127.97.0.0/16 (the world's net 97).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer::datapath::locked::{CgroupIdentityMap, IdentitiesMap};
use enforcer_common::maps;
use enforcer_tests::fixtures::World;
use enforcer_tests::probe::attempt;
use enforcer_tests::{require_kernel, Probe};

const NET: u8 = 97;
/// How long the flood and the hammer run together.
const WINDOW: Duration = Duration::from_secs(5);
/// Decoy keys: far above any cgroup inode of a test machine, and identity numbers the agent's
/// hash would have to hit exactly (checked absent before use).
const DECOY_CGROUP_BASE: u64 = 0xdec0_0000_0000_0000;
const DECOY_IDENTITY_BASE: u32 = 0xdec0_0000;

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // read and write it. A failure leaves the thread unpinned (still a valid stress).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn identity_reads_stay_correct_while_their_elements_are_recycled() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(NET)?;
    let _servers = world.servers_v4()?;
    let agent = world.start_agent()?;
    let pins = enforcer::datapath::pin_dir(world.pins.path());
    let cgroup_identity = CgroupIdentityMap::open(&pins, maps::CGROUP_IDENTITY)?;
    let identities = IdentitiesMap::open(&pins, maps::IDENTITIES)?;

    let (cross, same) = world.gateway_calls();
    let gateway = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(WINDOW + Duration::from_secs(30));
    // The agent is enforcing, and the denied call is denied, before the stress starts.
    gateway.expect_outcome(&same, enforcer_tests::Outcome::Ok, "before the stress")?;
    gateway.expect_outcome(&cross, enforcer_tests::Outcome::Eperm, "before the stress")?;
    let globex_to_globex = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    Probe::new()
        .in_cgroup(world.cgroup("globex-agent"))
        .expect_outcome(
            &globex_to_globex,
            enforcer_tests::Outcome::Ok,
            "globex-agent's own vector DB (what a recycled read would grant)",
        )?;

    let gw_cgroup = world.cgroup("acme-gateway").id();
    let ga_cgroup = world.cgroup("globex-agent").id();
    let gw_id = cgroup_identity
        .get(&gw_cgroup)
        .context("acme-gateway's cgroup has no CGROUP_IDENTITY entry")?;
    let ga_id = cgroup_identity
        .get(&ga_cgroup)
        .context("globex-agent's cgroup has no CGROUP_IDENTITY entry")?;
    let gw_info = identities
        .get(&gw_id)
        .context("acme-gateway has no IDENTITIES entry")?;
    let ga_info = identities
        .get(&ga_id)
        .context("globex-agent has no IDENTITIES entry")?;
    ensure!(
        gw_info.tenant != ga_info.tenant,
        "fixture: two tenants expected: {gw_info:?} {ga_info:?}"
    );

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for cpu in 0..cpus {
        ensure!(
            cgroup_identity
                .get(&(DECOY_CGROUP_BASE + cpu as u64))
                .is_none()
                && identities
                    .get(&(DECOY_IDENTITY_BASE + cpu as u32))
                    .is_none(),
            "decoy keys already in use"
        );
    }

    let stop = AtomicBool::new(false);
    let rewrites = AtomicU64::new(0);
    let started = Instant::now();
    let (flood, hammer) = std::thread::scope(|scope| {
        let hammers: Vec<_> = (0..cpus)
            .map(|cpu| {
                let (stop, rewrites, pins) = (&stop, &rewrites, &pins);
                scope.spawn(move || -> Result<()> {
                    pin_to_cpu(cpu);
                    let mut cg = CgroupIdentityMap::open(pins, maps::CGROUP_IDENTITY)?;
                    let mut ids = IdentitiesMap::open(pins, maps::IDENTITIES)?;
                    let decoy_cgroup = DECOY_CGROUP_BASE + cpu as u64;
                    let decoy_identity = DECOY_IDENTITY_BASE + cpu as u32;
                    // Bounded by time (the flood's window plus a margin) and by `stop`.
                    let deadline = Instant::now() + WINDOW + Duration::from_secs(30);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        // The agent's writes, as it makes them (one writer per key: the
                        // first CPU's thread): in place under the lock ...
                        if cpu == 0 {
                            cg.write(&gw_cgroup, &gw_id)?;
                            ids.write(&gw_id, &gw_info)?;
                            // ... and deletes: the gateway's elements go back to this CPU's
                            // free list (the gateway is unknown until written again) ...
                            cg.tombstone_and_delete(&gw_cgroup)?;
                            ids.tombstone_and_delete(&gw_id)?;
                            cg.write(&gw_cgroup, &gw_id)?;
                            ids.write(&gw_id, &gw_info)?;
                        }
                        // ... where the next new key takes them, with globex-agent's
                        // values.
                        cg.tombstone_and_delete(&decoy_cgroup)?;
                        ids.tombstone_and_delete(&decoy_identity)?;
                        cg.write(&decoy_cgroup, &ga_id)?;
                        ids.write(&decoy_identity, &ga_info)?;
                        n += 1;
                    }
                    rewrites.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        let flood = gateway.flood(&cross, WINDOW, Duration::ZERO);
        stop.store(true, Ordering::Relaxed);
        // Every thread joined (not just up to the first error), then the first error.
        let joined: Vec<Result<()>> = hammers
            .into_iter()
            .map(|h| h.join().expect("hammer thread panicked"))
            .collect();
        let hammer = joined.into_iter().find(Result::is_err).unwrap_or(Ok(()));
        (flood, hammer)
    });
    let elapsed = started.elapsed();
    let (mut cgroup_identity, mut identities) = (cgroup_identity, identities);
    for cpu in 0..cpus {
        cgroup_identity.tombstone_and_delete(&(DECOY_CGROUP_BASE + cpu as u64))?;
        identities.tombstone_and_delete(&(DECOY_IDENTITY_BASE + cpu as u32))?;
    }
    hammer.context("rewriting the maps")?;
    let flood = flood?;
    let rewrites = rewrites.load(Ordering::Relaxed);
    eprintln!(
        "{} connects ({} refused, {} allowed, {} failed) against {rewrites} rounds of writes and deletes (12 on the first CPU, 4 on the others) \
         on {cpus} CPUs in {elapsed:.2?}",
        flood.attempts, flood.eperm, flood.ok, flood.error
    );
    ensure!(
        flood.ok == 0,
        "acme-gateway reached globex-vectors {} times in {} attempts: a decision read a \
         recycled identity element",
        flood.ok,
        flood.attempts
    );
    ensure!(
        flood.error == 0 && flood.eperm == flood.attempts && flood.attempts > 1000,
        "the flood must be refused attempt after attempt: {flood:?}"
    );
    ensure!(
        rewrites > 1000,
        "the hammer must have churned the maps: {rewrites} rounds"
    );
    // The maps still say what they said: the hammer wrote unchanged values.
    ensure!(cgroup_identity.get(&gw_cgroup) == Some(gw_id));
    ensure!(identities.get(&gw_id) == Some(gw_info));
    gateway.expect_outcome(&same, enforcer_tests::Outcome::Ok, "after the stress")?;
    drop(agent);
    Ok(())
}

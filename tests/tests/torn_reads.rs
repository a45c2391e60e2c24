//! Torn and recycled reads of `CGROUP_IDENTITY` and `IDENTITIES` (README, "Limits and next
//! steps"): a stress test that makes the race as likely as a test can.
//!
//! The kernel's preallocated hash maps recycle an element at once: an update that *replaces*
//! key K's element parks the old element as this CPU's `extra_elems`, and the next update
//! on that CPU copies another key's value into it. A program that looked K up just before
//! and reads through its pointer just after reads the other key's value. Here:
//!
//! - acme-gateway floods a connect to globex-vectors (another tenant: denied) for
//!   `WINDOW`, as fast as it can;
//! - one hammer thread per CPU (pinned to it) rewrites acme-gateway's own entries with their
//!   unchanged values (each rewrite recycles the element a racing `decide` may hold) and,
//!   right after, writes a decoy key whose value is globex-agent's (a cgroup id no cgroup
//!   has -> globex-agent's identity; an identity number no workload has -> globex-agent's
//!   `IdentityInfo`), which the kernel copies into the element just parked.
//!
//! A racing read of the recycled element sees globex-agent, which is allowed to
//! globex-vectors (`shared-acme-vectors` only names acme-vectors, but same-tenant permits
//! globex-agent -> globex-vectors): any success of the flood is the bug. The hammer's writes
//! never change what the maps mean for any real cgroup or identity, so every attempt must
//! be refused.
//!
//! This is a property test, not a reliable reproducer: the window of the race is the few
//! instructions between a lookup and the reads through its pointer, and it did not trigger
//! on this machine against the unfixed programs (see the README). It checks that the
//! identity reads stay correct under the heaviest replacement churn the agent could cause.
//!
//! Addresses: 127.97.0.0/16 (the world's net 97).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use enforcer_common::{maps, IdentityInfo};
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

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_ANY: u64 = 0;

/// `union bpf_attr` for the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live bpf_attr prefix of the given size; the kernel reads (and for
    // lookups writes through) only the pointers it holds, which the callers keep alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pinned map, opened by path.
struct PinnedMap {
    fd: OwnedFd,
    name: &'static str,
}

impl PinnedMap {
    fn open(dir: &Path, name: &'static str) -> Result<Self> {
        let path = std::ffi::CString::new(dir.join(name).into_os_string().into_encoded_bytes())?;
        let mut attr = ObjGetAttr {
            pathname: path.as_ptr() as u64,
            ..Default::default()
        };
        let fd = sys_bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("BPF_OBJ_GET {}", dir.join(name).display()))?;
        // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { fd, name })
    }

    fn attr<K, V>(&self, key: &K, value: *const V) -> ElemAttr {
        ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as u64,
            ..Default::default()
        }
    }

    fn get<K, V: Default>(&self, key: &K) -> Result<Option<V>> {
        let mut value = V::default();
        let mut attr = self.attr(key, &mut value as *mut V);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("lookup in {}", self.name)),
        }
    }

    fn put<K, V>(&self, key: &K, value: &V) -> std::io::Result<()> {
        let mut attr = self.attr(key, value as *const V);
        attr.flags = BPF_ANY;
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    fn delete<K>(&self, key: &K) {
        let mut attr = self.attr(key, std::ptr::null::<u8>());
        // Best effort (cleanup): the pins are removed with the world anyway.
        let _ = sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr);
    }
}

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
    let cgroup_identity = PinnedMap::open(&pins, maps::CGROUP_IDENTITY)?;
    let identities = PinnedMap::open(&pins, maps::IDENTITIES)?;

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
    let gw_id: u32 = cgroup_identity
        .get(&gw_cgroup)?
        .context("acme-gateway's cgroup has no CGROUP_IDENTITY entry")?;
    let ga_id: u32 = cgroup_identity
        .get(&ga_cgroup)?
        .context("globex-agent's cgroup has no CGROUP_IDENTITY entry")?;
    let gw_info: IdentityInfo = identities
        .get(&gw_id)?
        .context("acme-gateway has no IDENTITIES entry")?;
    let ga_info: IdentityInfo = identities
        .get(&ga_id)?
        .context("globex-agent has no IDENTITIES entry")?;
    ensure!(
        gw_info.tenant != ga_info.tenant,
        "fixture: two tenants expected: {gw_info:?} {ga_info:?}"
    );

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for cpu in 0..cpus {
        ensure!(
            cgroup_identity
                .get::<u64, u32>(&(DECOY_CGROUP_BASE + cpu as u64))?
                .is_none()
                && identities
                    .get::<u32, IdentityInfo>(&(DECOY_IDENTITY_BASE + cpu as u32))?
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
                let (cg, ids, stop, rewrites) = (&cgroup_identity, &identities, &stop, &rewrites);
                scope.spawn(move || -> std::io::Result<()> {
                    pin_to_cpu(cpu);
                    let decoy_cgroup = DECOY_CGROUP_BASE + cpu as u64;
                    let decoy_identity = DECOY_IDENTITY_BASE + cpu as u32;
                    // Bounded by time (the flood's window plus a margin) and by `stop`.
                    let deadline = Instant::now() + WINDOW + Duration::from_secs(30);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        // Replace: the gateway's elements become this CPU's spare ...
                        cg.put(&gw_cgroup, &gw_id)?;
                        ids.put(&gw_id, &gw_info)?;
                        // ... which the next replacing update on this CPU refills with
                        // globex-agent's values.
                        cg.put(&decoy_cgroup, &ga_id)?;
                        ids.put(&decoy_identity, &ga_info)?;
                        n += 1;
                    }
                    rewrites.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        let flood = gateway.flood(&cross, WINDOW, Duration::ZERO);
        stop.store(true, Ordering::Relaxed);
        let hammer: std::io::Result<()> = hammers
            .into_iter()
            .map(|h| h.join().expect("hammer thread panicked"))
            .collect();
        (flood, hammer)
    });
    let elapsed = started.elapsed();
    for cpu in 0..cpus {
        cgroup_identity.delete(&(DECOY_CGROUP_BASE + cpu as u64));
        identities.delete(&(DECOY_IDENTITY_BASE + cpu as u32));
    }
    hammer.context("rewriting the maps")?;
    let flood = flood?;
    let rewrites = rewrites.load(Ordering::Relaxed);
    eprintln!(
        "{} connects ({} refused, {} allowed, {} failed) against {rewrites} rounds of 4 \
         replacing updates on {cpus} CPUs in {elapsed:.2?}",
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
    ensure!(cgroup_identity.get::<u64, u32>(&gw_cgroup)? == Some(gw_id));
    ensure!(identities.get::<u32, IdentityInfo>(&gw_id)? == Some(gw_info));
    gateway.expect_outcome(&same, enforcer_tests::Outcome::Ok, "after the stress")?;
    drop(agent);
    Ok(())
}

//! Connection-rate limits: a GCRA token bucket per (subject identity, destination identity),
//! checked by `connect4`/`connect6` after the policy allowed the call.
//!
//! The agent writes each limited pair's limit into `RATE_LIMITS` (the emission interval `T`
//! and tolerance `tau` of the subject's rate at its current risk; the arithmetic and its
//! overflow bounds are in `enforcer_common::rate`). The kernel keeps one time per pair in
//! `RATE_BUCKETS`, the theoretical arrival time `tat`: a connect at `now` passes iff
//! `max(tat, now) - now <= tau`, and then `tat = max(tat, now) + T`. The limit is read on every
//! connect, so a tighter one (a risk rise) applies to the very next call, capped to its own
//! burst. A pair without a `RATE_LIMITS` entry is not limited and pays one hash miss.
//!
//! When the pairs outnumber the map, the agent keeps each tenant's fair share of them and
//! gives every other pair its tenant's shared entry for the destination (subject
//! `SHARED_SUBJECT` and the subject's tenant: the strictest of their limits, one bucket, never
//! shared with another tenant) and sets `CONFIG.rate_shared`: only then does a miss look again
//! under the shared keys, so such a pair is held to a stricter limit, never to none. Should
//! the tenants' shared entries alone not fit, the destinations most tenants reach have one
//! entry shared by every tenant instead, looked up after the tenant's.
//!
//! Concurrency: the read-modify-write of `tat` is not atomic. The BPF target of this toolchain
//! has no compare-and-swap in Rust's `core` (`atomic-cas: false` in its target spec), and the
//! maps carry no BTF for a `bpf_spin_lock`. Two connects of the *same pair* that pass the
//! lookup-to-store window (about twenty instructions, tens of nanoseconds) at the same moment on
//! two CPUs both read one `tat` and both pass on one charge. Each such collision admits one
//! extra connection: at most `CPUs - 1` extra per window, only with concurrent connects of one
//! subject to one destination, and none for a client that connects from one thread. The same
//! holds for the first connect of a pair (two inserts, one charge). Accepted for the same
//! reason the per-CPU counters are not atomic: no locked instruction on the connect path.
//!
//! A full or evicted bucket is a full bucket: `RATE_BUCKETS` is twice the size of
//! `RATE_LIMITS`, so the LRU does not evict a live pair in practice; if it did, that pair
//! would regain at most one burst.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruHashMap},
};
use enforcer_common::{
    capacity,
    rate::{RateBucket, RateKey, RateLimit, SHARING_NONE},
};

/// Memory as pairs are added (most nodes limit few pairs).
const BPF_F_NO_PREALLOC: u32 = 1;
const NO_MAP_FLAGS: u32 = 0;
/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;

/// (subject, destination) -> the pair's limit; written by the agent only.
#[map]
static RATE_LIMITS: HashMap<RateKey, RateLimit> =
    HashMap::pinned(capacity::RATE_LIMITS, BPF_F_NO_PREALLOC);

/// (subject, destination) -> the pair's `tat`; written by the kernel only.
#[map]
static RATE_BUCKETS: LruHashMap<RateKey, RateBucket> =
    LruHashMap::pinned(capacity::RATE_BUCKETS, NO_MAP_FLAGS);

/// Charges one connection of `subject` (of `tenant`, its `IdentityInfo::tenant`) to
/// `destination`: `true` when it is within the pair's budget (or the pair has no limit),
/// `false` when it is over (nothing is charged).
#[inline(always)]
pub fn admit(subject: u32, tenant: u32, destination: u32) -> bool {
    let own = RateKey::own(subject, destination);
    let (key, limit) = match RATE_LIMITS.get_ptr(own) {
        Some(limit) => (own, limit),
        None => {
            if sharing() == SHARING_NONE {
                return true;
            }
            // Both kinds of shared entry, in turn, whichever the fit wrote: while the agent
            // moves from one kind to the other a pair's entry is of either, and a switch of
            // `CONFIG` between kinds would leave it unlimited until the new kind's entries
            // are written (red-team review 48).
            let tenants = RateKey::shared(tenant, destination);
            match RATE_LIMITS.get_ptr(tenants) {
                Some(limit) => (tenants, limit),
                None => {
                    let across = RateKey::across_tenants(destination);
                    match RATE_LIMITS.get_ptr(across) {
                        Some(limit) => (across, limit),
                        None => return true,
                    }
                }
            }
        }
    };
    // SAFETY: a non-null map value pointer is valid for reads; the fields are read one by
    // one (the agent replaces the whole value, so a read racing a rewrite may pair the old `T`
    // with the new `tau` or the reverse: either way a limit between the two).
    let limit = unsafe {
        RateLimit {
            interval_ns: read_volatile(&(*limit).interval_ns),
            tolerance_ns: read_volatile(&(*limit).tolerance_ns),
        }
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match RATE_BUCKETS.get_ptr_mut(key) {
        Some(bucket) => {
            // SAFETY: a non-null map value pointer is valid for reads and writes.
            let tat = unsafe { read_volatile(&(*bucket).tat_ns) };
            match limit.admit(tat, now) {
                Some(next) => {
                    // SAFETY: as above.
                    unsafe { write_volatile(&mut (*bucket).tat_ns, next) };
                    true
                }
                None => false,
            }
        }
        None => {
            // The pair's first connect (or its bucket was evicted): a full bucket, this
            // connect charged. An insert that fails (no memory) lets the call through: the
            // policy allowed it, and the next connect tries again.
            let fresh = RateBucket {
                tat_ns: now + limit.interval_ns,
            };
            let _ = RATE_BUCKETS.insert(key, fresh, BPF_ANY);
            true
        }
    }
}

/// `CONFIG.rate_shared`: whether, and how, some pairs are held to a shared entry.
#[inline(always)]
fn sharing() -> u32 {
    match crate::CONFIG.get_ptr(crate::SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads.
        Some(c) => unsafe { read_volatile(&(*c).rate_shared) },
        None => SHARING_NONE,
    }
}

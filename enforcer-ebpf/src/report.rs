//! The one path every deny (and audit) event takes to the `EVENTS` ring buffer, for the
//! sock_addr hooks, `sock_create` and `cgroup_skb/ingress` alike: aggregation of repeated
//! denies (`AGGREGATE`, see `enforcer_common::AggregateValue`), then the event itself.
//!
//! Why aggregate in the kernel: one process looping `connect()` to a denied address makes
//! ~0.9 M denies a second; one event each fills the ring buffer faster than any agent can
//! write lines, and the SOC would drown in copies of one fact. With a window W (default 1 s,
//! a fixed grid of the monotonic clock), a key's first deny of each window is reported at
//! once and the others are only counted; the agent reports each window's count once the
//! window is over (one summary event with an exact `count`) and deletes the entry.
//!
//! Exactness: every deny either writes one event with `count` 1 or adds exactly 1 to its
//! (key, window) entry (an atomic add: two CPUs may hit one key), never both and never
//! neither: a first deny whose reserve fails is added to the entry instead. An entry is only
//! written during its own window and the agent reads it a whole window later, so its read is
//! final and nobody resets a counter that another side is adding to. Only when the map is full
//! (no entry can be made) does a deny take the old path: its own event, or `LOST_EVENTS`
//! when the ring is full.
//!
//! Per-workload key budget (`Config::event_keys_per_workload`, K): a key is one destination
//! address and port (or one ingress peer), so one workload sweeping addresses would make a
//! key per deny and fill `AGGREGATE` for every workload. Each workload identity (not each
//! cgroup: a pod may be able to make cgroups) may make at most K new keys per window and
//! direction (`AGGREGATE_BUDGET`, counted with an atomic fetch-add, so the K slots are
//! handed out exactly once even when CPUs race); a deny that needs a new key beyond that is
//! added to the workload's overflow key of the window (`aggregate_flags::OVERFLOW`: same
//! subject, hook, verdict and reason, and for its own calls the destination identity and
//! protocol, no cgroup, address or port (its value keeps the cgroup of the window's first
//! such deny); for ingress the subject is the destination, never the SYN's claim), which is
//! never reported at once, only by the agent's summary
//! (`events.suppressed`). One workload holds at most K keys per direction (its own calls;
//! SYNs to it) plus one overflow key per (destination identity, protocol, hook, verdict,
//! reason) per window. Exactness is the argument above with one more outcome: a deny goes to exactly
//! one place, its own event, its own entry, or the overflow entry (made with `suppressed`
//! 1, or added 1 to). A budget slot taken by a deny whose key another CPU made meanwhile
//! (EEXIST) is merely spent, not a deny lost. The budget counter, like the entries, is only
//! written in its window, and the agent deletes it with them. When `AGGREGATE_BUDGET` is
//! full the deny is not budgeted; when `AGGREGATE` is full, denies take the old path as
//! above.
//!
//! Flow events (`flow_event_written`, for `flows.rs`): the same per-workload budget in the
//! same windows, of `flow.opened` events (`Config::flow_events_per_workload`, its own
//! direction `budget_direction::FLOW_EVENTS`), so that one workload's tracked connects
//! cannot fill `FLOW_EVENTS` for everyone. A flow beyond the budget is counted under the
//! workload's flow overflow key of the window (`aggregate_flags::FLOW_EVENTS`) instead of
//! written, and so is its closed event later (`FLOW_CLOSED`, in the window of the close):
//! the SOC gets each flow as a pair of lines or in two counts, never half. The agent reports
//! the counts as `flow_events.suppressed`, with the finality argument above. A full
//! `AGGREGATE` (nothing can be counted) writes the event: never dropped silently.

use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    helpers::generated::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::map,
    maps::HashMap,
};
use enforcer_common::{
    aggregate_flags, budget_direction, capacity, hook, AggregateBudgetKey, AggregateKey,
    AggregateValue, DenyEvent, FlowRecord,
};

use crate::{CONFIG, EVENTS, LOST_EVENTS, NO_MAP_FLAGS, PAD, RINGBUF_FLAGS, SINGLE_ENTRY};

/// Repeated denies being counted (see `enforcer_common::AggregateValue`). A plain hash map,
/// not an LRU: an LRU would evict entries whose counts the agent has not reported yet.
#[map]
static AGGREGATE: HashMap<AggregateKey, AggregateValue> =
    HashMap::pinned(capacity::AGGREGATE, NO_MAP_FLAGS);

/// New `AGGREGATE` keys each workload identity made per window and direction (the key
/// budget). A plain hash map: the
/// agent deletes a window's counters when it sweeps that window's entries.
#[map]
static AGGREGATE_BUDGET: HashMap<AggregateBudgetKey, u64> =
    HashMap::pinned(capacity::AGGREGATE_BUDGET, NO_MAP_FLAGS);

/// `Config::event_window_ns` value meaning "report every deny".
const AGGREGATION_OFF: u64 = 0;
/// `Config::event_keys_per_workload` value meaning "no budget".
const NO_BUDGET: u32 = 0;
/// `BPF_NOEXIST`: insert only if the key is absent (another CPU may have made it since the
/// lookup; its window must not be restarted by a blind overwrite).
const BPF_NOEXIST: u64 = 1;
/// `bpf_get_current_comm` buffer size.
const COMM_LEN: u32 = 16;
/// What the kernel writes in `DenyEvent::count`: one deny.
const ONE: u32 = 1;

/// One deny or audit, as the hook knows it.
pub(crate) struct Report {
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`, or 0 without a task (ingress runs in softirq).
    pub pid_tgid: u64,
    pub subject: u32,
    pub destination: u32,
    /// Address words in memory (network) order, as `DenyEvent::daddr`.
    pub daddr: [u32; 4],
    pub family: u8,
    pub dport: u16,
    pub protocol: u8,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub generation: u32,
    pub sock_type: u16,
    pub sock_protocol: u16,
    /// Ingress only: the SYN's source address words (zero for the other hooks).
    pub peer: [u32; 4],
    /// A task is current (its `comm` is read); false in softirq (ingress): `comm` is zero.
    pub task: bool,
}

/// Reports one deny: counted in its `AGGREGATE` entry, or written to `EVENTS`.
#[inline(always)]
pub(crate) fn emit(r: &Report) {
    let (window, budget) = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads; one load each.
        Some(c) => unsafe {
            (
                read_volatile(&(*c).event_window_ns),
                read_volatile(&(*c).event_keys_per_workload),
            )
        },
        None => (AGGREGATION_OFF, NO_BUDGET),
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if window == AGGREGATION_OFF {
        if !write(r, now) {
            lose();
        }
        return;
    }
    let mut key = AggregateKey {
        window: now / window,
        cgroup_id: r.cgroup_id,
        subject: r.subject,
        destination: r.destination,
        daddr: r.daddr,
        peer: r.peer,
        dport: r.dport,
        // Ingress keeps the peer's port there: every retry has a new one.
        sock_type: if r.hook == hook::INGRESS {
            0
        } else {
            r.sock_type
        },
        sock_protocol: r.sock_protocol,
        family: r.family,
        protocol: r.protocol,
        hook: r.hook,
        verdict: r.verdict,
        reason: r.reason,
        flags: 0,
        _pad: [PAD; 4],
    };
    if let Some(v) = AGGREGATE.get_ptr_mut(&key) {
        add_one(v);
        return;
    }
    if budget != NO_BUDGET && !within_budget(key.window, r, budget) {
        overflow(r, &mut key, now);
        return;
    }
    let value = entry_value(r, 0);
    if AGGREGATE.insert(&key, &value, BPF_NOEXIST).is_ok() {
        if !write(r, now) {
            // The entry exists now: the agent reports this deny with the window's count.
            match AGGREGATE.get_ptr_mut(&key) {
                Some(v) => add_one(v),
                None => lose(),
            }
        }
        return;
    }
    // Another CPU made the entry since the lookup (EEXIST), or the map is full (E2BIG).
    add_or_report(&key, r, now);
}

/// Takes one of the workload's `budget` new-key slots of `window` in the deny's direction
/// (its own calls, by subject; or SYNs to it, by destination): true if one was left (or
/// the budget cannot be counted: `AGGREGATE_BUDGET` full). The fetch-add hands each slot
/// out once, also when CPUs race; a racing CPU that finds no counter yet and loses the
/// insert adds to the winner's.
#[inline(always)]
fn within_budget(window: u64, r: &Report, budget: u32) -> bool {
    let inbound = r.hook == hook::INGRESS;
    let key = AggregateBudgetKey {
        window,
        identity: if inbound { r.destination } else { r.subject },
        direction: if inbound {
            budget_direction::INBOUND
        } else {
            budget_direction::OUTBOUND
        },
    };
    take_slot(&key, budget)
}

/// Takes one of `budget` slots of the counter `key`: true if one was left (or the counter
/// cannot be made: `AGGREGATE_BUDGET` full, not budgeted).
#[inline(always)]
fn take_slot(key: &AggregateBudgetKey, budget: u32) -> bool {
    let counter = match AGGREGATE_BUDGET.get_ptr_mut(key) {
        Some(c) => c,
        None => {
            // The workload's first new key in this window: always within the budget.
            if AGGREGATE_BUDGET.insert(key, &1, BPF_NOEXIST).is_ok() {
                return true;
            }
            match AGGREGATE_BUDGET.get_ptr_mut(key) {
                Some(c) => c,
                // Full: not budgeted, as without a budget.
                None => return true,
            }
        }
    };
    // The fetch form in assembly: LLVM's default BPF CPU (v1) refuses to use the result of
    // `atomic_xadd` ("Invalid usage of the XADD return value"), while the instruction
    // (BPF_ATOMIC | BPF_FETCH, kernel 5.12+) is what the verifier accepts here. `taken` goes
    // in as the addend (1) and comes out as the counter's value before the add.
    let mut taken: u64 = 1;
    // SAFETY: a map value pointer, 8-byte aligned, alive while the program runs (RCU); the
    // instruction reads and writes only those 8 bytes and the one register.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) counter,
            v = inout(reg) taken,
        );
    }
    taken < u64::from(budget)
}

/// Counts a deny beyond its workload's key budget under the workload's overflow key of the
/// window (never reported at once: the agent's `events.suppressed` names the count).
#[inline(always)]
fn overflow(r: &Report, key: &mut AggregateKey, now: u64) {
    // Rewritten field by field over the deny's own key: a second key beside it overran the
    // ingress program's 512 bytes of stack. The window, hook, verdict and reason stay.
    let inbound = r.hook == hook::INGRESS;
    // Per workload, not per cgroup, like the budget (see `AggregateBudgetKey`); the value
    // keeps the first deny's cgroup.
    key.cgroup_id = 0;
    // An ingress deny's subject is whatever the SYN claimed, and a forged option claims any
    // identity it likes (`bad_tag` is still counted under its claim): an overflow key per
    // claim gave a flood one key per forged identity, the budget's hole. A workload's inbound
    // overflow is its own: keyed, and named by `events.suppressed`, by the destination, the
    // local workload the SYNs were refused for.
    key.subject = if inbound { r.destination } else { r.subject };
    // An outbound overflow keeps the destination identity (not its address or port: a sweep
    // of those is what the budget bounds): 64 decoy keys in a window otherwise hid which
    // workload a call then went to, and so the `@quarantine` forbid it broke (the agent
    // decides quarantine by the destination). One key per identity reached, of which a
    // cluster has a bounded number; all of WORLD is one.
    key.destination = if inbound { 0 } else { r.destination };
    key.daddr = [0; 4];
    key.peer = [0; 4];
    key.dport = 0;
    key.sock_type = 0;
    key.sock_protocol = 0;
    key.family = 0;
    key.protocol = if inbound { 0 } else { r.protocol };
    key.flags = aggregate_flags::OVERFLOW;
    // Full (nothing could be counted): the deny's own event.
    if !count_in(key, || entry_value(r, 1)) && !write(r, now) {
        lose();
    }
}

/// Counts one in the `AGGREGATE` entry `key`, made with `value()` (whose `suppressed` is 1)
/// if absent. False when it could not be counted: the map is full.
#[inline(always)]
fn count_in(key: &AggregateKey, value: impl FnOnce() -> AggregateValue) -> bool {
    if let Some(v) = AGGREGATE.get_ptr_mut(key) {
        add_one(v);
        return true;
    }
    if AGGREGATE.insert(key, &value(), BPF_NOEXIST).is_ok() {
        return true;
    }
    // EEXIST: another CPU made it since the lookup; add to it. E2BIG: full.
    match AGGREGATE.get_ptr_mut(key) {
        Some(v) => {
            add_one(v);
            true
        }
        None => false,
    }
}

/// Whether a flow event of the record `r` is to be written to `FLOW_EVENTS` (true), or was
/// counted under its workload's flow overflow key of the window instead (false): a
/// `flow.opened` (`closed` false) beyond the workload's `Config::flow_events_per_workload`
/// in this window, or the `flow.closed` (`closed` true; the caller asks only for flows whose
/// opened event was not written, `flow_flags::UNREPORTED`). Always true with aggregation
/// off, with no budget, or when `AGGREGATE` is full (written: never dropped silently). A
/// close after aggregation was turned off (an agent restarted with `--events-aggregate 0`)
/// is written too: it has no window to be counted in.
#[inline(always)]
pub(crate) fn flow_event_written(r: &FlowRecord, closed: bool) -> bool {
    let (window, budget) = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads; one load each.
        Some(c) => unsafe {
            (
                read_volatile(&(*c).event_window_ns),
                read_volatile(&(*c).flow_events_per_workload),
            )
        },
        None => (AGGREGATION_OFF, NO_BUDGET),
    };
    if window == AGGREGATION_OFF || (!closed && budget == NO_BUDGET) {
        return true;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let window = unsafe { bpf_ktime_get_ns() } / window;
    if !closed {
        let slot = AggregateBudgetKey {
            window,
            identity: r.subject,
            direction: budget_direction::FLOW_EVENTS,
        };
        if take_slot(&slot, budget) {
            return true;
        }
    }
    let key = AggregateKey {
        window,
        cgroup_id: 0,
        subject: r.subject,
        destination: 0,
        daddr: [0; 4],
        peer: [0; 4],
        dport: 0,
        sock_type: 0,
        sock_protocol: 0,
        family: 0,
        protocol: r.protocol,
        hook: 0,
        verdict: 0,
        reason: 0,
        flags: aggregate_flags::OVERFLOW
            | aggregate_flags::FLOW_EVENTS
            | if closed {
                aggregate_flags::FLOW_CLOSED
            } else {
                0
            },
        _pad: [PAD; 4],
    };
    !count_in(&key, || AggregateValue {
        suppressed: 1,
        pid_tgid: r.pid_tgid,
        cgroup_id: r.cgroup_id,
        comm: r.comm,
        policy_generation: r.policy_generation,
        _pad: 0,
    })
}

/// After an insert of `key` failed: counted in the entry another CPU made meanwhile, or, the
/// map being full, the deny's own event (or `LOST_EVENTS`).
#[inline(always)]
fn add_or_report(key: &AggregateKey, r: &Report, now: u64) {
    match AGGREGATE.get_ptr_mut(key) {
        Some(v) => add_one(v),
        None => {
            if !write(r, now) {
                lose();
            }
        }
    }
}

/// `suppressed += 1`, atomically (two CPUs may count one key at once). The intrinsic, not
/// `AtomicU64::fetch_add`: the BPF target declares no compare-and-swap, so core gives its
/// atomics no read-modify-write methods, while the instruction set has an atomic add.
#[inline(always)]
fn add_one(v: *mut AggregateValue) {
    // SAFETY: the map value is 8-byte aligned and lives as long as the program runs (RCU);
    // with its result unused this is one BPF atomic add (`lock *(u64 *)(r + off) += r`).
    unsafe {
        crate::atomic_add(addr_of_mut!((*v).suppressed), 1);
    }
}

/// A new `AGGREGATE` entry's value: `suppressed` denies already counted, and the deny that
/// makes the entry (its process and policy generation, named by the window's summary).
#[inline(always)]
fn entry_value(r: &Report, suppressed: u64) -> AggregateValue {
    let mut value = AggregateValue {
        suppressed,
        pid_tgid: r.pid_tgid,
        cgroup_id: r.cgroup_id,
        comm: [0; 16],
        policy_generation: r.generation,
        _pad: 0,
    };
    if r.task {
        // SAFETY: a 16-byte stack buffer; on failure the helper zeroes it.
        unsafe { bpf_get_current_comm(addr_of_mut!(value.comm).cast(), COMM_LEN) };
    }
    value
}

/// A deny that could be neither written nor counted.
#[inline(always)]
fn lose() {
    if let Some(lost) = LOST_EVENTS.get_ptr_mut(SINGLE_ENTRY) {
        // SAFETY: per-CPU value pointer, this CPU's own counter (see `crate::count`).
        unsafe { *lost += 1 };
    }
}

/// One `DenyEvent` with count 1, written field by field into the reserved slot (a struct copy
/// would become a memcpy call the verifier rejects). False when the ring buffer is full.
#[inline(always)]
fn write(r: &Report, now: u64) -> bool {
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(RINGBUF_FLAGS) else {
        return false;
    };
    let e: *mut DenyEvent = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, 8-byte-aligned slot of size_of::<DenyEvent>() bytes;
    // every byte is written below before it is submitted (no stale ring-buffer data leaks).
    unsafe {
        addr_of_mut!((*e).timestamp_ns).write(now);
        addr_of_mut!((*e).cgroup_id).write(r.cgroup_id);
        addr_of_mut!((*e).pid_tgid).write(r.pid_tgid);
        addr_of_mut!((*e).subject).write(r.subject);
        addr_of_mut!((*e).destination).write(r.destination);
        // daddr is 4-byte aligned (offset 32): write it as four words, in memory order.
        let daddr = addr_of_mut!((*e).daddr).cast::<u32>();
        daddr.write(r.daddr[0]);
        daddr.add(1).write(r.daddr[1]);
        daddr.add(2).write(r.daddr[2]);
        daddr.add(3).write(r.daddr[3]);
        addr_of_mut!((*e).dport).write(r.dport);
        addr_of_mut!((*e).family).write(r.family);
        addr_of_mut!((*e).protocol).write(r.protocol);
        addr_of_mut!((*e).hook).write(r.hook);
        addr_of_mut!((*e).verdict).write(r.verdict);
        addr_of_mut!((*e).reason).write(r.reason);
        addr_of_mut!((*e)._pad).write(PAD);
        if r.task {
            // On failure the helper zeroes the buffer, so comm is always initialised.
            bpf_get_current_comm(addr_of_mut!((*e).comm).cast(), COMM_LEN);
        } else {
            let comm = addr_of_mut!((*e).comm).cast::<u64>();
            comm.write(0);
            comm.add(1).write(0);
        }
        addr_of_mut!((*e).policy_generation).write(r.generation);
        addr_of_mut!((*e).sock_type).write(r.sock_type);
        addr_of_mut!((*e).sock_protocol).write(r.sock_protocol);
        let peer = addr_of_mut!((*e).peer).cast::<u32>();
        peer.write(r.peer[0]);
        peer.add(1).write(r.peer[1]);
        peer.add(2).write(r.peer[2]);
        peer.add(3).write(r.peer[3]);
        addr_of_mut!((*e).count).write(ONE);
        addr_of_mut!((*e)._pad2).write(0);
    }
    entry.submit(RINGBUF_FLAGS);
    true
}

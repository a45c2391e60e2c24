//! Tracked flows: the `FLOWS` records and their `FLOW_EVENTS`.
//!
//! A record is born in `connect4`/`connect6` ([`record_connect`]), where the decision is made
//! and the subject, the destination and the policy generation that allowed the call are known;
//! it is keyed by the socket cookie, which `sock_ops` and the agent's `SOCK_DESTROY` see too.
//! `sock_ops` follows a TCP record: at `TCP_CONNECT_CB` it asks for state callbacks (only for
//! sockets that have a record: the others never pay for a callback) and hands the record to
//! the identity option (`wire`: a tracked destination is always tagged, and the option's
//! time lives in the record's `wire_stamp` when the record is certainly this connect's), at
//! `ACTIVE_ESTABLISHED_CB` it fills the local address and writes the opened event, at each
//! `STATE_CB` it notes the peer's FIN and at TCP_CLOSE writes the closed event (byte counts)
//! and deletes the record. A connected UDP socket has no callback after `connect()`: its
//! opened event is written there, and `cgroup/sock_release` ends its record when the socket
//! is closed.
//!
//! An MPTCP connect is its first subflow's: the hooks and `sock_ops` see that subflow (a
//! kernel TCP socket with the MPTCP socket's cgroup), so the record is the subflow's, but the
//! application's close releases the MPTCP socket, which no callback of the subflow reaches.
//! The MPTCP socket keeps its first subflow's cookie (`MPTCP_FIRST_SUBFLOW`) so that its
//! release ends a record the subflow never armed ([`on_release`]).
//!
//! Every opened event passes its workload's flow event budget first (`report.rs`,
//! `report::flow_event_written`): beyond it, the flow is counted and marked
//! `flow_flags::UNREPORTED` instead, its contact kept for the learner as for a full ring,
//! and its closed event is counted too instead of written. Closed events of reported flows
//! are never budgeted (an opened line always gets its closed line); there is at most one per
//! opened event, but a workload's reported flows closing all at once is a burst the budget
//! does not bound (README, "Tracked flows").
//!
//! Verifier notes:
//! - The record is built in place on the stack field by field (every byte written, padding
//!   included) and the event field by field in the reserved slot: a struct copy or zeroing
//!   would become a memcpy/memset call the verifier rejects.
//! - `bytes_acked` / `bytes_received` are full-socket fields: the verifier rewrites their loads
//!   to read 0 on a request or time-wait socket; `STATE_CB` always has a full socket.
//! - `bpf_sock_ops_cb_flags_set` replaces the flags: the current ones are OR-ed in so that
//!   another module's flags (the header-option callbacks) survive.

use core::mem::MaybeUninit;
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use crate::wire::SocketStorage;
use aya_ebpf::{
    bindings::bpf_sock_ops,
    helpers::generated::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skc_to_mptcp_sock, bpf_sock_ops_cb_flags_set,
    },
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use enforcer_common::{
    capacity, flow_event, flow_flags, flow_marks, flow_state, proto, tcp_state, ContactKey,
    FlowEvent, FlowRecord,
};

/// Socket cookie -> the tracked flow. A plain hash, not an LRU: a flood of connects must not
/// evict (and so un-track) a live flow; a full table refuses the connect instead.
#[map]
static FLOWS: HashMap<u64, FlowRecord> = HashMap::pinned(capacity::FLOWS, 0);

/// An MPTCP socket's first subflow: the subflow's socket cookie (u64), written at its
/// connect ([`note_mptcp_subflow`]) and read at the MPTCP socket's release. Socket storage: it
/// goes with the MPTCP socket, so nothing else evicts it and nothing has to delete it.
#[btf_map]
static MPTCP_FIRST_SUBFLOW: SocketStorage<u64> = SocketStorage::new();

/// Tenant number -> its live `FLOWS` records. Only the kernel changes a count (atomic adds
/// on the value in place), so no update ever replaces an element under a reader; entries
/// are never deleted (one per tenant that ever had a tracked flow on this node).
#[map]
static FLOW_TENANTS: HashMap<u32, u64> = HashMap::pinned(capacity::FLOW_TENANTS, 0);

/// Tenant number -> records of it the agent deleted itself (written only by the agent).
/// Allocated per element (`BPF_F_NO_PREALLOC`): the agent replaces an element when it
/// writes, and a preallocated map reuses the old element at once, so the kernel's read through
/// its pointer could see another tenant's count; freed after an RCU grace period instead.
#[map]
static FLOW_TENANTS_FORGOTTEN: HashMap<u32, u64> =
    HashMap::pinned(capacity::FLOW_TENANTS, crate::BPF_F_NO_PREALLOC);

/// One u64: the records one tenant may hold at once (0: no limit).
#[map]
static FLOW_TENANT_LIMIT: Array<u64> = Array::pinned(1, 0);

/// Opened / closed records; userspace may resize it at load time.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::pinned(capacity::FLOW_EVENTS_BYTES, 0);

/// Flow events that did not fit in `FLOW_EVENTS` (per CPU; userspace sums the CPUs).
#[map]
static LOST_FLOW_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Contacts whose opened event did not fit in `FLOW_EVENTS`: (subject, destination) -> the
/// first such record, until the agent drains it. Without it a flooder could fill the ring and
/// then reach a dataset unseen by the learner (`--learn`). A plain hash (an LRU would let the
/// flood evict the contact it hides behind); a repeated pair is one entry.
#[map]
static FLOW_CONTACTS_MISSED: HashMap<ContactKey, FlowRecord> =
    HashMap::pinned(capacity::FLOW_CONTACTS_MISSED, 0);

/// Tenant number -> its subjects' datagram contacts inserted into `FLOW_CONTACTS_MISSED`
/// (kernel: atomic adds), and those the agent drained (agent only, allocated per element as
/// `FLOW_TENANTS_FORGOTTEN`): the tenant's share of that map, as `FLOW_TENANTS` for `FLOWS`.
/// Entries are never deleted.
#[map]
static CONTACT_TENANTS: HashMap<u32, u64> = HashMap::pinned(capacity::FLOW_TENANTS, 0);
#[map]
static CONTACT_TENANTS_DRAINED: HashMap<u32, u64> =
    HashMap::pinned(capacity::FLOW_TENANTS, crate::BPF_F_NO_PREALLOC);

/// Contacts that fitted in neither (per CPU; userspace sums the CPUs).
#[map]
static LOST_FLOW_CONTACTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// `BPF_SOCK_OPS_STATE_CB_FLAG`.
const STATE_CB_FLAG: u32 = 1 << 2;
/// `sk->sk_family` / `user_family` of IPv6 and IPv4.
const AF_INET6: u32 = 10;
const AF_INET: u32 = 2;
const FAMILY_V4: u8 = 4;
/// `BPF_ANY` for map updates, default flags for the ring buffer.
const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only (a tenant's counter, once).
const BPF_NOEXIST: u64 = 1;
const RINGBUF_FLAGS: u64 = 0;
/// `bpf_ringbuf_submit` flags and the `bpf_ringbuf_query` question (`BPF_RB_*`, uapi bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Each time this many more bytes are unread (a quarter of the ring), the flow events just
/// past the mark (`WAKE_BAND_RECORDS`) wake the agent at once. Otherwise the agent finds the events at its
/// next look (every `FLOW_DRAIN_EVERY`, 100 ms): the default wake-up raised an interrupt
/// (`irq_work`, an IPI, a VM exit under a hypervisor) and woke the agent inside every
/// tracked `connect()` and `close()`, which made up most of the kernel's cost of a tracked
/// connect (perf, README "Tracked flows"). Only those wake, not every event above the mark: under a flood of tracked connects the agent lags a 100 ms look behind, the
/// ring stays above a quarter, and a wake-up per event was again 27 % of `sock_ops`'s time
/// (perf, 2026-12-07). A reader woken once reads the ring to its end.
const WAKE_AT_BYTES: u64 = capacity::FLOW_EVENTS_BYTES as u64 / 4;
/// A flow event's bytes in the ring: its 8-byte record header and the event, rounded up to 8
/// (`BPF_RINGBUF_HDR_SZ`, kernel/bpf/ringbuf.c).
const FLOW_RECORD_BYTES: u64 = (core::mem::size_of::<FlowEvent>() as u64 + 8 + 7) & !7;
/// How many events just past each mark wake the agent (see `emit`).
const WAKE_BAND_RECORDS: u64 = 4;
/// `-EEXIST` from a `BPF_NOEXIST` update: the pair is recorded already.
const EEXIST: i32 = -17;
const COMM_LEN: u32 = 16;
const LOST_INDEX: u32 = 0;

/// What `connect4`/`connect6` know about an allowed call to a tracked destination.
pub struct Connect {
    pub subject: u32,
    pub destination: u32,
    /// Destination address words in memory (network) order; family 4 uses the first.
    pub daddr: [u32; 4],
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub generation: u32,
    /// The subject's tenant number: whose share of `FLOWS` the record takes.
    pub tenant: u32,
    pub cgroup_id: u64,
    /// The connect ran `connect6` (the socket is AF_INET6), whatever `family` the
    /// destination was judged as: see `flow_flags::SOCK_V6`.
    pub sock_v6: bool,
    /// The flow gets no identity option (`flow_marks::UNTAGGED`: a Service).
    pub untagged: bool,
}

/// Whether the kernel goes on with this connect as far as the address family goes: the
/// connect hooks run before it looks at the family (`udp_pre_connect`, `tcp_v4_pre_connect`),
/// and a connect whose `user_family` is not the hook's own then fails (`EAFNOSUPPORT`),
/// leaving the socket connected where it was. Such a connect must not move or end a record:
/// a workload could otherwise have its flow reported closed (or moved to another
/// destination) while it goes on sending to the first.
#[inline(always)]
fn kernel_will_connect(ctx: &SockAddrContext, v6_hook: bool) -> bool {
    // SAFETY: `sock_addr` is the context; a full 32-bit load.
    let family = unsafe { read_volatile(&(*ctx.sock_addr).user_family) };
    family == if v6_hook { AF_INET6 } else { AF_INET }
}

/// Records the flow under the socket's cookie; a connected UDP socket's opened event is
/// written now (TCP's waits for the handshake). `false` when the record could not be
/// written (the table is full): the caller refuses the connect.
#[inline(always)]
pub fn record_connect(ctx: &SockAddrContext, c: &Connect, udp: bool) -> bool {
    if !kernel_will_connect(ctx, c.sock_v6) {
        // The kernel refuses this connect right after the hook: nothing to record.
        return true;
    }
    let mut slot = MaybeUninit::<FlowRecord>::uninit();
    fill_record(ctx, c, &mut slot);
    let r = slot.as_mut_ptr();
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A connected UDP socket connected again (`connect()` runs under the socket lock, so
    // nothing else changes its record meanwhile). To the same subject, destination, address
    // and port it is the same flow: no second opened event (a loop of reconnects flooded
    // FLOW_EVENTS and left opened flows that never closed); only the policy generation moves
    // on, since the call was decided again and allowed by the policy in force now, which is
    // the one a change re-decides the flow against. Elsewhere, the old flow has ended: its
    // closed event first, so that every opened flow is closed, then the new record replaces
    // it (BPF_ANY), which needs no room and takes no more of a share. The record keeps the
    // tenant whose share it holds: the socket may have been passed to another tenant's
    // process meanwhile (SCM_RIGHTS), and crediting that tenant at release would leak the
    // first one's share and underflow its.
    if !udp && !note_mptcp_subflow(ctx, cookie) {
        // A record that nothing could end: refused like one that does not fit.
        return false;
    }
    if !udp && take_share(c.tenant) {
        // The usual TCP connect: a socket without a record. One insert that must create is
        // the test and the write (a lookup first was one more hash walk inside every tracked
        // `connect()`). A TCP socket has none here (`forget_unsent` ended a leftover before
        // the decision); one that had would go the general way below.
        // SAFETY: fully initialised above.
        match FLOWS.insert(&cookie, unsafe { slot.assume_init_ref() }, BPF_NOEXIST) {
            Ok(()) => return true,
            Err(error) => {
                give_back(&FLOW_TENANTS, c.tenant);
                if error != EEXIST {
                    return false;
                }
            }
        }
    }
    let old = FLOWS.get_ptr_mut(&cookie);
    let new = old.is_none();
    if let Some(old) = old {
        // SAFETY: `r` is the stack slot above; `old` a non-null map value pointer, valid for
        // reads and writes.
        unsafe {
            let ended = (*old).flags & flow_flags::ENDED != 0;
            if udp && !ended && same_flow(&*old, c) {
                (*old).policy_generation = c.generation;
                // Counted too: after a refused connect elsewhere, this one may have moved
                // the socket back (see `connected_again`).
                (*old).wire_stamp = (*old).wire_stamp.wrapping_add(1);
                return true;
            }
            addr_of_mut!((*r).tenant).write((*old).tenant);
            // A record's last SYN time stays with its socket (UDP, which sends none: its
            // count of connects, see `connected_again`).
            addr_of_mut!((*r).wire_stamp).write((*old).wire_stamp);
            if udp {
                if !ended {
                    close(cookie, &*old, 0, 0, 0);
                }
                let flags = addr_of_mut!((*r).flags);
                flags.write(flags.read() | flow_flags::CONNECTED_AGAIN);
                connected_again(ctx, r);
            }
        }
    }
    // SAFETY: fully initialised above.
    let record = unsafe { slot.assume_init_ref() };
    if new && !take_share(c.tenant) {
        return false;
    }
    if FLOWS.insert(&cookie, record, BPF_ANY).is_err() {
        if new {
            give_back(&FLOW_TENANTS, c.tenant);
        }
        return false;
    }
    if udp && !open(cookie, record) {
        if let Some(r) = FLOWS.get_ptr_mut(&cookie) {
            // SAFETY: a non-null map value pointer is valid for reads and writes.
            unsafe { (*r).flags |= flow_flags::UNREPORTED };
        }
    }
    true
}

/// A new record of the connect (or datagram) `c` of the socket `ctx`, every field written
/// (padding included) into `slot`: `CONNECTING`, no local end yet.
#[inline(always)]
fn fill_record(ctx: &SockAddrContext, c: &Connect, slot: &mut MaybeUninit<FlowRecord>) {
    let r = slot.as_mut_ptr();
    // SAFETY: `r` points at a stack slot of the record's size; every field (padding included)
    // is written below before the slot is read by a map update.
    unsafe {
        addr_of_mut!((*r).start_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*r).cgroup_id).write(c.cgroup_id);
        addr_of_mut!((*r).pid_tgid).write(bpf_get_current_pid_tgid());
        addr_of_mut!((*r).subject).write(c.subject);
        addr_of_mut!((*r).destination).write(c.destination);
        let saddr = addr_of_mut!((*r).saddr).cast::<u32>();
        let daddr = addr_of_mut!((*r).daddr).cast::<u32>();
        for i in 0..4 {
            saddr.add(i).write(0);
            daddr.add(i).write(c.daddr[i]);
        }
        addr_of_mut!((*r).sport).write(0);
        addr_of_mut!((*r).dport).write(c.dport);
        addr_of_mut!((*r).family).write(c.family);
        addr_of_mut!((*r).protocol).write(c.protocol);
        addr_of_mut!((*r).state).write(flow_state::CONNECTING);
        addr_of_mut!((*r).flags).write(if c.sock_v6 { flow_flags::SOCK_V6 } else { 0 });
        addr_of_mut!((*r).policy_generation).write(c.generation);
        addr_of_mut!((*r).tenant).write(c.tenant);
        addr_of_mut!((*r).netns_cookie).write(bpf_get_netns_cookie(ctx.as_ptr()));
        // On failure the helper zeroes the buffer, so comm is always initialised.
        bpf_get_current_comm(addr_of_mut!((*r).comm).cast(), COMM_LEN);
        addr_of_mut!((*r).wire_stamp).write(0);
        addr_of_mut!((*r).peer_port).write(0);
        addr_of_mut!((*r).peer_family).write(0);
        addr_of_mut!((*r).marks).write(if c.untagged { flow_marks::UNTAGGED } else { 0 });
        addr_of_mut!((*r)._pad).write([0; 2]);
        addr_of_mut!((*r).peer).write([0; 16]);
    }
}

/// A datagram naming a tracked destination (`sendto`, `sendmsg` with an address) has no flow,
/// but the learner needs its contact: a first contact outside the subject's usual datasets
/// made by datagrams was no `flow.anomaly` and no step-up (red-team review 39). Kept in
/// `FLOW_CONTACTS_MISSED` (one lookup when the pair is there already, as it is for every
/// datagram after the first until the agent drains the map), which the agent reads like the
/// contacts of opened events the ring had no room for. `false` when the contact could not
/// be kept (the tenant's share of that map is held, or it is full): the caller refuses the
/// datagram, which would otherwise reach its dataset unseen (red-team review 42; a flow's
/// lost contact has its `FLOWS` record for the agent's fallback, a datagram none).
#[inline(always)]
pub fn datagram_contact(ctx: &SockAddrContext, c: &Connect) -> bool {
    let key = ContactKey {
        subject: c.subject,
        destination: c.destination,
    };
    // The socket check first: it reads the socket, the lookup hashes the key, and a
    // connected dual-stack socket's every `send()` comes here.
    if connected_there(ctx, c) || FLOW_CONTACTS_MISSED.get_ptr(&key).is_some() {
        return true;
    }
    let mut slot = MaybeUninit::<FlowRecord>::uninit();
    fill_record(ctx, c, &mut slot);
    let r = slot.as_mut_ptr();
    // SAFETY: fully initialised by `fill_record`; `r` points at it.
    unsafe {
        (*r).flags |= flow_flags::DATAGRAM;
        insert_contact(&key, slot.assume_init_ref())
    }
}

/// The socket of `ctx` is connected to `c`'s destination already: the datagram is a
/// connected socket's (a `send()` of an IPv6 socket connected to an IPv4-mapped address runs
/// `sendmsg4` with that address, and a `sendto()` may repeat the connected address), whose
/// connect made the flow record and its contact. Read from the socket, not a record.
#[inline(always)]
fn connected_there(ctx: &SockAddrContext, c: &Connect) -> bool {
    // SAFETY: `sock_addr` is the context; `sk` is a pointer-sized context field.
    let sk = unsafe { read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) };
    let (to, port, connected) = crate::martian::socket_destination(sk.cast_const());
    connected
        && port == c.dport
        && to.family == c.family
        && to.addr[0] == c.daddr[0]
        && to.addr[1] == c.daddr[1]
        && to.addr[2] == c.daddr[2]
        && to.addr[3] == c.daddr[3]
}

/// The opened event of the flow `r`, if its workload's budget allows: false when it was
/// counted instead (the caller marks the record `UNREPORTED`); its contact is kept for the
/// learner either way.
#[inline(always)]
fn open(cookie: u64, r: &FlowRecord) -> bool {
    if !crate::report::flow_event_written(r, false) {
        keep_contact(r);
        return false;
    }
    emit(cookie, r, flow_event::OPENED, 0, 0, 0);
    true
}

/// The closed event of the flow `r`: written if its opened event was, else counted (written
/// only if it cannot be counted).
#[inline(always)]
fn close(cookie: u64, r: &FlowRecord, acked: u64, received: u64, last_state: u8) {
    if r.flags & flow_flags::UNREPORTED == 0 || crate::report::flow_event_written(r, true) {
        emit(cookie, r, flow_event::CLOSED, acked, received, last_state);
    }
}

/// A connect of a socket whose record is `r` goes where `r` went: the same subject,
/// destination identity, family, address and port (the protocol is the socket's, never
/// changed).
#[inline(always)]
fn same_flow(r: &FlowRecord, c: &Connect) -> bool {
    let daddr = r.daddr.as_ptr().cast::<u32>();
    // SAFETY: `daddr` is the record's 16 address bytes at a 4-byte-aligned offset (48) of an
    // 8-byte-aligned value: four aligned words.
    let words = unsafe {
        [
            daddr.read(),
            daddr.add(1).read(),
            daddr.add(2).read(),
            daddr.add(3).read(),
        ]
    };
    r.subject == c.subject
        && r.destination == c.destination
        && r.dport == c.dport
        && r.family == c.family
        && words == c.daddr
}

/// `connect4`/`connect6`, first: a TCP socket reaches them only unconnected and in TCP CLOSE
/// (`__inet_stream_connect` refuses any other connect before the hooks), so a record it still
/// has is left by an earlier connect that the kernel refused after the hooks and before its
/// SYN (a route failure, `::ffff:a.b.c.d` on an IPv6-only socket, a bound 4-tuple already in
/// use): such a failure changes no TCP state and reaches no `sock_ops` callback. It ends here,
/// never reported (a record reported opened ended at its CLOSE; one that did not is closed
/// now). Left, it was taken over by this connect, to anywhere, whatever decided it (an
/// untracked destination, an audit pass, an unmanaged caller): `TCP_CONNECT_CB` and
/// `ACTIVE_ESTABLISHED_CB` cannot tell it from a record whose address a socket load balancer
/// rewrote, so the connection was reported as a flow to the tracked destination, with its own
/// peer and bytes, and revoked with it (found by a red-team review). A tracked connect then
/// writes its record afresh. The lookup's bucket is the one `record_connect` and
/// `TCP_CONNECT_CB` look in next, warm then.
#[inline(always)]
pub fn forget_unsent(ctx: &SockAddrContext) {
    // SAFETY: `sock_addr` is the context; a full 32-bit load.
    if unsafe { read_volatile(&(*ctx.sock_addr).protocol) } != u32::from(proto::TCP) {
        return;
    }
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(r) = FLOWS.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: a non-null map value pointer is valid for reads.
    let tenant = unsafe {
        if (*r).state == flow_state::ESTABLISHED {
            close(cookie, &*r, 0, 0, 0);
        }
        (*r).tenant
    };
    end_record(cookie, tenant);
}

/// A connected UDP socket connected again, allowed, to a destination that is not tracked:
/// its tracked flow (if it had one) has ended, and is reported closed. The record stays,
/// marked `ENDED`, until the socket's release or next connect: the kernel may still refuse
/// this connect and leave the socket connected to the flow's peer, and the agent finds such a
/// socket by its record (see `flow_flags::CONNECTED_AGAIN`). Deleted here, such a flow had no
/// record left, so no revocation reported it stale (red-team review 28).
#[inline(always)]
pub fn connected_elsewhere(ctx: &SockAddrContext, v6_hook: bool) {
    if !kernel_will_connect(ctx, v6_hook) {
        return;
    }
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(r) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: a non-null map value pointer is valid for reads and writes (`connect()` and the
    // release run under the socket lock: nothing else changes a UDP record meanwhile).
    unsafe {
        if (*r).flags & flow_flags::ENDED == 0 {
            close(cookie, &*r, 0, 0, 0);
            (*r).flags |= flow_flags::ENDED | flow_flags::CONNECTED_AGAIN;
        }
    }
    // Also for a record ended before: the socket may be elsewhere now.
    connected_again(ctx, r);
}

/// Keeps in a UDP record marked `CONNECTED_AGAIN` where its socket is connected before the
/// connect `ctx` makes (`peer`, `peer_port`, `peer_family`; port 0 when not connected): if
/// the kernel refuses that connect, the socket is still there, and the agent looks for it
/// there (`sock_diag`). Read from the socket itself, not from the record: a record may name a
/// connect the kernel refused before. Counts the connect in `wire_stamp` (unused by UDP),
/// so that the agent tells a record written again apart from one it has looked at.
#[inline(always)]
fn connected_again(ctx: &SockAddrContext, r: *mut FlowRecord) {
    // SAFETY: `sock_addr` is the context; `sk` is a pointer-sized context field.
    let sk = unsafe { read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) };
    let (to, port, connected) = crate::martian::socket_destination(sk.cast_const());
    // SAFETY: `r` is a record (stack slot or map value) valid for writes; `peer` is 16 bytes
    // at a 16-byte-aligned offset (112) of an 8-byte-aligned value: four aligned words.
    unsafe {
        let peer = addr_of_mut!((*r).peer).cast::<u32>();
        for i in 0..4 {
            peer.add(i).write(if connected { to.addr[i] } else { 0 });
        }
        addr_of_mut!((*r).peer_port).write(if connected { port } else { 0 });
        addr_of_mut!((*r).peer_family).write(if connected { to.family } else { 0 });
        let connects = addr_of_mut!((*r).wire_stamp);
        connects.write(connects.read().wrapping_add(1));
    }
}

/// `TCP_CONNECT_CB`: the SYN is about to be sent; a tracked flow asks for state callbacks.
/// Its record is returned as the identity option's source (`wire::on_connect`) when it
/// certainly is this connect's ([`this_connect`]); otherwise the option is found the way an
/// untracked flow's is. A record that is not: one whose destination another program rewrote
/// after `connect4` (a socket load balancer translating a Service address). (A record left by
/// an earlier connect that failed before its SYN is gone: [`forget_unsent`].)
#[inline(always)]
pub fn on_connect(ctx: &SockOpsContext) -> Option<*mut FlowRecord> {
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let r = FLOWS.get_ptr_mut(cookie)?;
    set_flags(ctx, STATE_CB_FLAG);
    // SAFETY: a non-null map value pointer is valid for writes (the socket is locked in this
    // callback: no other run of it writes the record meanwhile).
    unsafe { (*r).flags |= flow_flags::ARMED };
    this_connect(ctx, r).then_some(r)
}

/// The record `r` was written for the connect `ctx` is making: to the address and port the
/// socket is connecting to, not established yet. Whatever task runs this callback: a
/// connect with `TCP_FASTOPEN_CONNECT` sends its SYN at the first write, which may be
/// another workload's (the socket passed on with `SCM_RIGHTS`), and the SYN must carry the
/// identity the connect was judged and recorded as, not the writer's (red-team review 68
/// I2: the two nodes named different callers for one flow). A record from an earlier
/// connect of the socket is gone by now ([`forget_unsent`] at every judged connect).
#[inline(always)]
fn this_connect(ctx: &SockOpsContext, r: *const FlowRecord) -> bool {
    let Some((_, _, remote)) = crate::wire::sock_ops_addresses(ctx.ops) else {
        return false;
    };
    let (_, dport) = crate::wire::sock_ops_ports(ctx.ops);
    // SAFETY: a non-null map value pointer is valid for reads; `daddr` is 16 bytes at a
    // 4-byte-aligned offset (48) of an 8-byte-aligned value: four aligned words.
    unsafe {
        let daddr = addr_of!((*r).daddr).cast::<u32>();
        (*r).state == flow_state::CONNECTING
            && (*r).dport == dport
            && (*r).family == remote.family
            && daddr.read() == remote.addr[0]
            && daddr.add(1).read() == remote.addr[1]
            && daddr.add(2).read() == remote.addr[2]
            && daddr.add(3).read() == remote.addr[3]
    }
}

/// The record of the socket `ctx` (a tracked flow), if it has one.
#[inline(always)]
pub fn record_of(ctx: &SockOpsContext) -> Option<*mut FlowRecord> {
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    FLOWS.get_ptr_mut(cookie)
}

/// `PASSIVE_ESTABLISHED_CB`: a connecting socket's simultaneous open (it received a SYN, not
/// a SYN-ACK, in SYN_SENT: the kernel completes such a handshake as a passive one) is
/// established as [`on_established`] does; before, its record stayed `CONNECTING` for the
/// connection's life: no `flow.opened`, and no revocation, which skips unestablished
/// records (red-team review 29; a destination that connects back to the client's port
/// makes one, a socket connected to its own address too). Only a socket that asked for
/// state callbacks at its `TCP_CONNECT_CB` can have a record: an accepted socket has not
/// (yet), so the usual passive handshake makes no lookup.
#[inline(always)]
pub fn on_passive_established(ctx: &SockOpsContext) {
    if ctx.cb_flags() & STATE_CB_FLAG != 0 {
        on_established(ctx);
    }
}

/// `ACTIVE_ESTABLISHED_CB`: the handshake completed; fill the local end and report it.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: as in `on_connect`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(r) = FLOWS.get_ptr_mut(cookie) else {
        return;
    };
    // The socket's own tuple, which `SOCK_DESTROY` must name: a socket load balancer's
    // `connect4`/`connect6` (Cilium's, Calico's) may have rewritten the address judged here
    // (a Service's) to a backend's after this program ran, of either family; looked up by
    // the judged address, the socket was not found and the flow taken for ended, its
    // connection left up. The judged address stays what the agent re-decides.
    // (Never `None`: a TCP socket is AF_INET or AF_INET6.)
    let Some((local, _, peer)) = crate::wire::sock_ops_addresses(ops) else {
        return;
    };
    let (sport, peer_port) = crate::wire::sock_ops_ports(ops);
    // SAFETY: `r` is a non-null map value pointer, valid for reads and writes.
    unsafe {
        let (saddr, to) = (
            addr_of_mut!((*r).saddr).cast::<u32>(),
            addr_of_mut!((*r).peer).cast::<u32>(),
        );
        if peer.family == FAMILY_V4 {
            // An IPv4 socket, or a dual-stack one to ::ffff:a.b.c.d, whose source is mapped
            // too: the IPv4 address is the last word of each.
            saddr.write(local[3]);
        } else {
            for (i, word) in local.iter().enumerate() {
                saddr.add(i).write(*word);
            }
        }
        for (i, word) in peer.addr.iter().enumerate() {
            to.add(i).write(*word);
        }
        (*r).peer_family = peer.family;
        (*r).peer_port = peer_port;
        (*r).sport = sport;
        (*r).state = flow_state::ESTABLISHED;
        if !open(cookie, &*r) {
            (*r).flags |= flow_flags::UNREPORTED;
        }
    }
}

/// `STATE_CB`: `arg(0)` the old state, `arg(1)` the new one. Returns the identity option's
/// last time of a record that ended before its handshake completed (a failed connect; the
/// socket may connect again, see `wire::keep_time`).
#[inline(always)]
pub fn on_state(ctx: &SockOpsContext) -> Option<u16> {
    let old = ctx.arg(0) as u8;
    let new = ctx.arg(1) as u8;
    if new != tcp_state::CLOSE && new != tcp_state::CLOSE_WAIT && new != tcp_state::CLOSING {
        return None;
    }
    // SAFETY: as in `on_connect`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let r = FLOWS.get_ptr_mut(cookie)?;
    if new != tcp_state::CLOSE {
        // The peer's FIN: it took one in the receive sequence space.
        // SAFETY: a non-null map value pointer is valid for reads and writes.
        unsafe { (*r).flags |= flow_flags::FIN_IN };
        return None;
    }
    // SAFETY: as below.
    let unestablished = unsafe { (*r).state } != flow_state::ESTABLISHED;
    // SAFETY: as below.
    let last_sent = unsafe { (*r).wire_stamp };
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `r` as above; `ops` is the context (64-bit loads of full-socket fields).
    unsafe {
        // A handshake that never completed was never reported opened: nothing to close.
        if (*r).state == flow_state::ESTABLISHED {
            let acked = read_volatile(&(*ops).bytes_acked);
            let received = read_volatile(&(*ops).bytes_received);
            close(cookie, &*r, acked, received, old);
        }
    }
    // SAFETY: as above.
    let tenant = unsafe { (*r).tenant };
    end_record(cookie, tenant);
    unestablished.then_some(last_sent)
}

/// `cgroup/sock_release`: a connected UDP socket's record ends with its socket (a TCP
/// socket's ends at CLOSE, which usually comes after the release: FIN_WAIT, TIME_WAIT). A TCP
/// socket that will get no CLOSE callback has its record, never reported opened, dropped
/// here: one already in CLOSE (a `connect()` that failed before the SYN was sent), or one
/// whose SYN never went out (`flow_flags::ARMED` unset: a `TCP_FASTOPEN_CONNECT` connect
/// closed before its first write, which a loop could repeat to fill its tenant's share of
/// `FLOWS` for good: red-team review 28). An established record was armed, whatever program
/// wrote it (one of an older build, which did not set the flag, is left to its callback).
#[inline(always)]
pub fn on_release(ctx: &SockContext) {
    // SAFETY: `ctx.sock` is the context; a full 32-bit load.
    if unsafe { read_volatile(&(*ctx.sock).protocol) } == IPPROTO_MPTCP {
        end_unarmed_subflow(ctx);
        return;
    }
    // SAFETY: bpf_get_socket_cookie accepts a cgroup sock context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(r) = FLOWS.get_ptr(cookie) else {
        return;
    };
    // SAFETY: a non-null map value pointer is valid for reads; `ctx.sock` is the context and
    // `state` a full 32-bit load.
    unsafe {
        if (*r).protocol == proto::UDP {
            if (*r).flags & flow_flags::ENDED == 0 {
                close(cookie, &*r, 0, 0, 0);
            }
        } else if read_volatile(&(*ctx.sock).state) != u32::from(tcp_state::CLOSE)
            && ((*r).flags & flow_flags::ARMED != 0 || (*r).state == flow_state::ESTABLISHED)
        {
            return;
        }
    }
    // SAFETY: as above.
    let tenant = unsafe { (*r).tenant };
    end_record(cookie, tenant);
}

/// `IPPROTO_MPTCP` (linux/in.h): the protocol of an MPTCP socket (its subflows are TCP).
const IPPROTO_MPTCP: u32 = 262;

/// Keeps the cookie of the socket `ctx` connects in its MPTCP socket's storage when it is an
/// MPTCP subflow (see the module documentation); nothing for a plain TCP socket. `false` when
/// the storage could not be made (the socket's option memory is exhausted): the record would
/// have no end.
#[inline(always)]
fn note_mptcp_subflow(ctx: &SockAddrContext, cookie: u64) -> bool {
    // SAFETY: `sock_addr` is the context; `sk` is a pointer-sized context field.
    let sk = unsafe { read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) };
    if sk.is_null() {
        return true;
    }
    // SAFETY: the helper takes any socket pointer and returns the subflow's MPTCP socket, or
    // null when `sk` is not an MPTCP subflow.
    let msk = unsafe { bpf_skc_to_mptcp_sock(sk.cast()) };
    if msk.is_null() {
        return true;
    }
    let kept = MPTCP_FIRST_SUBFLOW.get(msk.cast(), Some(&cookie));
    if kept.is_null() {
        return false;
    }
    // SAFETY: a non-null storage pointer is valid for writes. An older value is replaced:
    // the same first subflow connected again, or (from a task, so judged and recorded) a
    // further subflow asked for over netlink, whose record the release then ends if unarmed.
    unsafe { *kept = cookie };
    true
}

/// The release of an MPTCP socket: ends its first subflow's record when the subflow never
/// sent its SYN (`TCP_FASTOPEN_CONNECT` deferred it to a write that never came; the kernel
/// refused the connect after the hooks), as [`on_release`] does for a TCP socket. An armed
/// record ends at the subflow's own CLOSE state callback.
#[inline(always)]
fn end_unarmed_subflow(ctx: &SockContext) {
    let kept = MPTCP_FIRST_SUBFLOW.get(ctx.sock, None);
    if kept.is_null() {
        return;
    }
    // SAFETY: a non-null storage pointer is valid for reads.
    let cookie = unsafe { *kept };
    let Some(r) = FLOWS.get_ptr(cookie) else {
        return;
    };
    // SAFETY: a non-null map value pointer is valid for reads.
    let (flags, state, tenant) = unsafe { ((*r).flags, (*r).state, (*r).tenant) };
    if flags & flow_flags::ARMED == 0 && state != flow_state::ESTABLISHED {
        end_record(cookie, tenant);
    }
}

/// Takes one record of `tenant`'s share of `FLOWS`: `false` when the tenant holds its whole
/// share already (or its counter cannot be created: fail closed).
#[inline(always)]
fn take_share(tenant: u32) -> bool {
    let limit = FLOW_TENANT_LIMIT.get(0).copied().unwrap_or(0);
    take(&FLOW_TENANTS, &FLOW_TENANTS_FORGOTTEN, limit, tenant)
}

/// Takes one of `tenant`'s share: `counts` is the kernel's count of what the tenant took
/// (atomic adds only), `returned` what the agent gave back (the agent's own counter),
/// `limit` the share (0: none). `false` when the tenant holds its whole share already (or
/// its counter cannot be created: fail closed). The check and the add are two steps (an
/// atomic fetch-and-add needs BPF cpu v3), so CPUs racing on the last free place may
/// overshoot the share by at most one each: bounded, and never past the map itself.
#[inline(always)]
fn take(counts: &HashMap<u32, u64>, returned: &HashMap<u32, u64>, limit: u64, tenant: u32) -> bool {
    let mut used = counts.get_ptr_mut(&tenant);
    if used.is_none() {
        let _ = counts.insert(&tenant, &0, BPF_NOEXIST);
        used = counts.get_ptr_mut(&tenant);
    }
    let Some(used) = used else {
        return false;
    };
    // SAFETY: a non-null map value pointer is valid, 8-byte aligned and lives while this
    // program runs; the count is only ever changed by atomic adds, and an aligned 64-bit
    // load is one instruction (never torn).
    let held = unsafe { read_volatile(used) };
    // What the agent returned counts only for a tenant at its share by the kernel's count
    // (a lookup fewer below it).
    if limit != 0 && held >= limit {
        // One aligned 64-bit load through the pointer (the agent replaces the element when
        // it writes: either value is a count the agent wrote).
        let back = returned
            .get_ptr(&tenant)
            // SAFETY: a non-null map value pointer is valid for reads.
            .map_or(0, |f| unsafe { read_volatile(f) });
        // Saturating: should the agent's count ever run ahead (pins of an older agent, a
        // count it could not write), the share opens rather than locks shut.
        if held.saturating_sub(back) >= limit {
            return false;
        }
    }
    crate::atomic_add(used, 1);
    true
}

/// Returns one of `tenant`'s share taken from `counts` (what it took was deleted, or never
/// made). Called once per take, so each is returned once.
#[inline(always)]
fn give_back(counts: &HashMap<u32, u64>, tenant: u32) {
    if let Some(used) = counts.get_ptr_mut(&tenant) {
        // SAFETY: as in `take`. Adding 2^64 - 1 is subtracting one (an atomic add whose
        // result is unused needs no BPF cpu v3).
        crate::atomic_add(used, u64::MAX);
    }
}

/// Deletes `cookie`'s record and returns its share to its tenant.
#[inline(always)]
fn end_record(cookie: u64, tenant: u32) {
    if FLOWS.remove(&cookie).is_ok() {
        give_back(&FLOW_TENANTS, tenant);
    }
}

#[inline(always)]
fn set_flags(ctx: &SockOpsContext, flag: u32) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the context; the helper is allowed in every sock_ops callback with a
    // full socket (it fails harmlessly otherwise).
    unsafe {
        let current = read_volatile(&(*ops).bpf_sock_ops_cb_flags);
        bpf_sock_ops_cb_flags_set(ops, (current | flag) as i32);
    }
}

/// Keeps the contact of an opened event the ring had no room for. Inserted only if the pair
/// is absent (the first record stays: the pair is what the learner needs); one that cannot
/// be kept counts one in `LOST_FLOW_CONTACTS`, which the agent reports (it then shows the
/// learner every live flow: this one has a record in `FLOWS`).
#[inline(always)]
fn keep_contact(r: &FlowRecord) {
    let key = ContactKey {
        subject: r.subject,
        destination: r.destination,
    };
    if FLOW_CONTACTS_MISSED.get_ptr(&key).is_some() || insert_contact(&key, r) {
        return;
    }
    if let Some(lost) = LOST_FLOW_CONTACTS.get_ptr_mut(LOST_INDEX) {
        // SAFETY: per-CPU value pointer, this CPU's own counter.
        unsafe { *lost += 1 };
    }
}

/// Inserts the contact `r` under `key` if the pair is absent: `false` when it could not be
/// kept. A datagram's contact (`flow_flags::DATAGRAM`) only within its tenant's share of the
/// map (`CONTACT_TENANTS`, at most `capacity::CONTACTS_PER_TENANT`), so that one tenant's
/// datagrams to many pairs, which nothing else meters, cannot take the room of another's
/// contacts; a flow's contact is not charged to it (a tenant's own datagrams must not make
/// room scarce for its flows' contacts, whose connects the flow table's share and the rate
/// limits meter).
#[inline(always)]
fn insert_contact(key: &ContactKey, r: &FlowRecord) -> bool {
    let datagram = r.flags & flow_flags::DATAGRAM != 0;
    if datagram
        && !take(
            &CONTACT_TENANTS,
            &CONTACT_TENANTS_DRAINED,
            capacity::CONTACTS_PER_TENANT,
            r.tenant,
        )
    {
        return false;
    }
    match FLOW_CONTACTS_MISSED.insert(key, r, BPF_NOEXIST) {
        Ok(()) => true,
        Err(error) => {
            if datagram {
                give_back(&CONTACT_TENANTS, r.tenant);
            }
            error == EEXIST
        }
    }
}

/// One `FlowEvent`, field by field into the reserved slot; a full ring buffer counts one in
/// `LOST_FLOW_EVENTS`, and a lost opened event keeps its contact in `FLOW_CONTACTS_MISSED`.
#[inline(always)]
fn emit(cookie: u64, r: &FlowRecord, kind: u8, acked: u64, received: u64, last_state: u8) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(RINGBUF_FLAGS) else {
        if let Some(lost) = LOST_FLOW_EVENTS.get_ptr_mut(LOST_INDEX) {
            // SAFETY: per-CPU value pointer, this CPU's own counter.
            unsafe { *lost += 1 };
        }
        if kind == flow_event::OPENED {
            keep_contact(r);
        }
        return;
    };
    let e: *mut FlowEvent = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, 8-byte-aligned slot of size_of::<FlowEvent>() bytes;
    // every byte is written below before it is submitted.
    unsafe {
        addr_of_mut!((*e).timestamp_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*e).cookie).write(cookie);
        addr_of_mut!((*e).bytes_acked).write(acked);
        addr_of_mut!((*e).bytes_received).write(received);
        addr_of_mut!((*e).kind).write(kind);
        addr_of_mut!((*e).last_state).write(last_state);
        addr_of_mut!((*e)._pad).cast::<[u16; 3]>().write([0; 3]);
        let d = addr_of_mut!((*e).record);
        addr_of_mut!((*d).start_ns).write(r.start_ns);
        addr_of_mut!((*d).cgroup_id).write(r.cgroup_id);
        addr_of_mut!((*d).pid_tgid).write(r.pid_tgid);
        addr_of_mut!((*d).subject).write(r.subject);
        addr_of_mut!((*d).destination).write(r.destination);
        let (sa, da) = (
            addr_of_mut!((*d).saddr).cast::<u32>(),
            addr_of_mut!((*d).daddr).cast::<u32>(),
        );
        let (rs, rd) = (
            r.saddr.as_ptr().cast::<u32>(),
            r.daddr.as_ptr().cast::<u32>(),
        );
        for i in 0..4 {
            sa.add(i).write(rs.add(i).read());
            da.add(i).write(rd.add(i).read());
        }
        addr_of_mut!((*d).sport).write(r.sport);
        addr_of_mut!((*d).dport).write(r.dport);
        addr_of_mut!((*d).family).write(r.family);
        addr_of_mut!((*d).protocol).write(r.protocol);
        addr_of_mut!((*d).state).write(r.state);
        addr_of_mut!((*d).flags).write(r.flags);
        addr_of_mut!((*d).policy_generation).write(r.policy_generation);
        addr_of_mut!((*d).tenant).write((*r).tenant);
        addr_of_mut!((*d).netns_cookie).write(r.netns_cookie);
        let (cs, cd) = (
            r.comm.as_ptr().cast::<u64>(),
            addr_of_mut!((*d).comm).cast::<u64>(),
        );
        cd.write(cs.read());
        cd.add(1).write(cs.add(1).read());
        addr_of_mut!((*d).wire_stamp).write(r.wire_stamp);
        addr_of_mut!((*d).peer_port).write(r.peer_port);
        addr_of_mut!((*d).peer_family).write(r.peer_family);
        addr_of_mut!((*d).marks).write(r.marks);
        addr_of_mut!((*d)._pad).write([0; 2]);
        let (ps, pd) = (
            r.peer.as_ptr().cast::<u32>(),
            addr_of_mut!((*d).peer).cast::<u32>(),
        );
        for i in 0..4 {
            pd.add(i).write(ps.add(i).read());
        }
    }
    // A flow opened under another policy than the one in force now raced a change: the agent
    // re-decides it on this event (`stale_handshake`), so it must not wait for the next look.
    let raced = kind == flow_event::OPENED && current_generation() != Some(r.policy_generation);
    // Unread bytes, this event's included (its reserve moved the producer on).
    let unread = FLOW_EVENTS.query(BPF_RB_AVAIL_DATA);
    // The first few events past each mark wake, not only the one that crosses it: another
    // CPU's reserve between this one's and its query can carry the crossing past both
    // (review 51), and a wake-up of a reader that meets a record still being written is
    // spent; a handful per quarter of the ring costs nothing.
    let near_mark =
        unread >= WAKE_AT_BYTES && unread % WAKE_AT_BYTES < WAKE_BAND_RECORDS * FLOW_RECORD_BYTES;
    let wake = if raced || near_mark {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake);
}

/// `Config::generation` (low 32 bits) in force now, as the connect hooks read it.
#[inline(always)]
fn current_generation() -> Option<u32> {
    let config = crate::CONFIG.get_ptr(crate::SINGLE_ENTRY)?;
    // SAFETY: array values are always valid for reads; one 64-bit load, as the hooks do.
    Some(unsafe { read_volatile(&(*config).generation) } as u32)
}

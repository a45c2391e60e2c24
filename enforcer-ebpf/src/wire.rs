//! Identity on the wire (issue 7 items 2 and 3): the sending side writes a keyed identity
//! option on the SYN of every tagged flow (`sock_ops`), the receiving side checks it before the
//! listener ever sees the connection (`cgroup_skb/ingress`). The option's layout and MAC are
//! `enforcer_common::wire`, shared with userspace so that both compute the same tag.
//!
//! Sending: at `TCP_CONNECT_CB` (in the connecting task, after `connect4`/`connect6` allowed
//! the call) the subject is written into the socket's storage (`WIRE_TAGS`), or for a tracked
//! flow found in its `FLOWS` record, and the header callbacks are switched on;
//! `HDR_OPT_LEN_CB` / `WRITE_HDR_OPT_CB` stamp and tag the option for each SYN
//! transmission, retransmits included (a time later than the last one's: option version 3),
//! with the 4-tuple the kernel chose. Nothing there needs the connecting task: the subject
//! is in the storage or the record, the key in `FLOW_KEYS`. Once established, the write
//! callback is switched off, so data segments pay nothing; the storage stays with the socket
//! until the kernel frees both (deleting it was a cost inside every tagged `connect()`).
//!
//! Receiving: a SYN to a local destination whose `IDENTITIES` flags say ingress `enforce` or
//! `audit` must carry an option whose tag verifies with one of the `FLOW_KEYS`, whose time is
//! within `Config::wire_skew_s` of this node's wall clock (`stale_tag` otherwise: a replay),
//! that no SYN passed here carried before (version 3) or no connection accepted here and since
//! closed carried (version 2) (`replayed_tag`: a replay within the skew),
//! and the claimed identity must be in `INGRESS_ALLOW` for the port. An untagged SYN is
//! judged as WORLD when the IP cache does not know its source, and refused (`missing_tag`)
//! when it does: a cluster workload always comes through an enforcer that tags.

use core::ffi::c_void;
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, bpf_sock_ops, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_ktime_get_tai_ns,
        bpf_reserve_hdr_opt, bpf_sk_cgroup_id, bpf_sk_lookup_tcp, bpf_sk_release,
        bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skb_cgroup_id, bpf_sock_ops_cb_flags_set,
        bpf_store_hdr_opt,
    },
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockOpsContext},
};
use enforcer_common::{
    capacity, flags, flow_flags, flow_marks, hook, identity, proto, reason, tcp_state, verdict,
    wire as abi, FlowRecord, PolicyKey, PolicyValue, NO_CLASS,
};

use crate::{
    count, locked, lookup_address, lookup_destination, policy_hit,
    skb::{
        is_extension_header, load, skip_extension_headers, DROP, ETH_P_IP, ETH_P_IPV6,
        IPV4_HEADER_MIN, IPV6_HEADER, LOOPBACK_IFINDEX, PASS,
    },
    Destination, AF_INET, AF_INET6, BPF_F_NO_PREALLOC, CONFIG, FAMILY_V4, FAMILY_V6, NO_MAP_FLAGS,
    PAD, SINGLE_ENTRY, V4_MAPPED_WORD2, ZERO_WORD,
};

// ---------------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------------

/// Slot 0: the current key (signs and verifies); slot 1: the previous one (verifies only), so
/// that a rotation has no moment where a SYN signed a moment ago fails.
#[map]
static FLOW_KEYS: Array<abi::FlowKey> = Array::pinned(abi::KEY_SLOTS, NO_MAP_FLAGS);

/// A connecting socket's option, in the socket's own storage: it lives and dies with the
/// socket, so no other socket can push it out. (A node-wide LRU by socket cookie could be
/// churned by any workload's abandoned connects, and a socket that lost its entry sent its
/// SYN retransmissions untagged, which the receiver refuses as `missing_tag`.)
#[btf_map]
static WIRE_TAGS: SocketStorage<[u8; abi::OPTION_LEN]> = SocketStorage::new();

/// `LIBBPF_PIN_BY_NAME`: pinned under the loader's pin directory by the map's name.
const PIN_BY_NAME: usize = 1;

/// A BTF socket-storage map definition (`BPF_MAP_TYPE_SK_STORAGE`, pinned by name; the
/// kernel requires BTF, `BPF_F_NO_PREALLOC` and `max_entries` 0). aya-ebpf 0.2.1's
/// `btf_maps::SkStorage` reaches a socket only from a sock_addr context and has no pinning
/// field. The fields are what the loader reads from the BTF, never accessed.
#[repr(C)]
pub struct SocketStorage<V> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: placeholder pointers that the loader reads from BTF; never dereferenced.
unsafe impl<V> Sync for SocketStorage<V> {}

impl<V> SocketStorage<V> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The socket's value (created from `init` when given and absent), or null. `sk` is a
    /// full socket the program may pass to the helper, checked non-null by the caller: the
    /// sock_ops context's, a cgroup sock program's context, or a socket pointer from a
    /// `bpf_skc_to_*` helper.
    #[inline(always)]
    pub(crate) fn get(&self, sk: *mut bpf_sock, init: Option<&V>) -> *mut V {
        let (value, flags) = match init {
            Some(v) => (
                core::ptr::from_ref(v).cast_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            ),
            None => (core::ptr::null_mut(), 0),
        };
        // SAFETY: the map definition, a non-null socket pointer from the context and a value
        // of the map's value size (or null) are what the helper takes.
        unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                sk.cast(),
                value.cast(),
                flags,
            )
        }
        .cast()
    }

    #[inline(always)]
    fn delete(&self, sk: *mut bpf_sock) {
        // SAFETY: as in `get`.
        unsafe { bpf_sk_storage_delete(core::ptr::from_ref(self).cast_mut().cast(), sk.cast()) };
    }
}

/// The sock_ops context's socket, when it is a full one (it is at the callbacks that use
/// `WIRE_TAGS`: a client socket connecting, its SYN, its establishment).
#[inline(always)]
fn context_socket(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    // SAFETY: `ops` is the context; `sk` is a pointer-sized context field.
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    (!sk.is_null()).then_some(sk)
}

/// {claimed identity, local destination identity, port, protocol} -> allow, looked up like the
/// policy table (exact port, then any port). Memory as entries are added: most nodes host no
/// destination with ingress on, and the policy table's capacity preallocated is 22 MiB.
#[map]
static INGRESS_ALLOW: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);

/// The verified identity behind each tagged connection, by 4-tuple as the server sees it:
/// written by the ingress check, marked accepted (with the server socket's cookie) at
/// `PASSIVE_ESTABLISHED_CB`, deleted when that socket reaches TCP CLOSE. LRU only for entries
/// whose handshake never completed (the client gave up, a SYN flood of valid tags): an accepted
/// entry is deleted by its socket, so eviction reaches it only when the map is full of them.
/// A version 3 record is also its option's spent mark for as long as it lives
/// ([`record_first`]); the socket's CLOSE hands the option to `SPENT_TAGS` ([`spend`]).
#[map]
static WIRE_PEERS: LruHashMap<abi::PeerKey, abi::Peer> =
    LruHashMap::pinned(capacity::WIRE_PEERS, NO_MAP_FLAGS);

/// Options already taken -> the option's full time ([`abi::claimed_seconds`]). Written when
/// an accepted connection's server socket closes (until then its `WIRE_PEERS` record marks
/// the option), and for version 3 (the sender stamps each transmission anew, so its
/// retransmissions are new options; version 2's repeat the connect's) also when a SYN passes
/// while another transmission's record holds its 4-tuple ([`record_first`]). A SYN carrying
/// such an option again is a copy: a replay (an on-path attacker, or the pod
/// that later got the sender's IP, within the skew that `stale_tag` leaves open), refused
/// as `replayed_tag`. An entry matters for the skew only (older times are `stale_tag`);
/// LRU, so a node taking more options than capacity / (2 x skew) a second forgets the
/// oldest early.
#[map]
static SPENT_TAGS: LruHashMap<abi::SpentKey, u32> =
    LruHashMap::pinned(capacity::SPENT_TAGS, NO_MAP_FLAGS);

/// A filter in front of `SPENT_TAGS`, so that the usual SYN (an option never taken) is not
/// a cold hash miss: per slot ([`abi::spent_slot`] of the `SpentKey`), the latest option time
/// ([`abi::claimed_seconds`]) of any `SPENT_TAGS` entry written there. Raised before each
/// such write and never lowered ([`raise_spent_slot`]), so an option that is in `SPENT_TAGS`
/// has its slot at or above its time, and [`spent`] looks in `SPENT_TAGS` only then. Pinned
/// with `SPENT_TAGS` (a restarted agent adopts both); 128 KiB, small enough for the cache.
#[map]
static SPENT_RECENT: Array<u64> = Array::pinned(capacity::SPENT_RECENT, NO_MAP_FLAGS);

/// The last refused SYN per 4-tuple: its sequence number, verdict and reason, and when it was
/// reported (bits 48-63: [`report_time`]). A SYN the client retransmits (same 4-tuple, same
/// sequence number) and that is judged the same within [`REPORT_QUIET`] is dropped and counted
/// again but reported once, so that one refused connection attempt is one event; judged
/// differently (a policy change in between), or later (a raw socket's attempts that repeat
/// a sequence number: red-team review 59 L2, one report ever under `audit`), it is reported
/// again.
#[map]
static INGRESS_REPORTED: LruHashMap<abi::PeerKey, u64> =
    LruHashMap::with_max_entries(capacity::WIRE_REPORTED, NO_MAP_FLAGS);

/// Room for the socket tuple `caller_cgroup` looks up: the ingress program has spent its 512
/// bytes of stack. One per CPU, written and read within one run.
#[map]
static TUPLE_SCRATCH: PerCpuArray<bpf_sock_tuple> = PerCpuArray::with_max_entries(1, NO_MAP_FLAGS);

// ---------------------------------------------------------------------------------------------
// Constants (uapi values bindgen leaves unnamed)
// ---------------------------------------------------------------------------------------------

/// `BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG`.
const WRITE_HDR_OPT_CB_FLAG: u32 = 1 << 6;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`.
const STATE_CB_FLAG: u32 = 1 << 2;

const IPPROTO_TCP: u8 = proto::TCP;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
/// `skb_tcp_flags` of the sock_ops header callbacks: the same bits, in a u32.
const SYN_ONLY: u32 = TCP_FLAG_SYN as u32;
const SYN_ACK_MASK: u32 = (TCP_FLAG_SYN | TCP_FLAG_ACK) as u32;

/// The TCP header without options.
const TCP_HEADER_MIN: usize = 20;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) in memory order, as this
/// module's addresses are kept (`main.rs` compares it in host order).
const V4_MAPPED_WORD2_MEMORY: u32 = V4_MAPPED_WORD2.to_be();

/// Flags of bpf_reserve_hdr_opt / bpf_store_hdr_opt / map updates: none.
const NO_FLAGS: u64 = 0;

/// `bpf_sk_lookup_tcp`'s netns argument: the namespace of the packet.
const BPF_F_CURRENT_NETNS: u64 = -1i64 as u64;
/// `bpf_sock::state` of a connecting TCP socket.
const TCP_SYN_SENT: u32 = tcp_state::SYN_SENT as u32;
/// `bpf_sock::state` of a listening TCP socket.
const TCP_LISTEN: u32 = tcp_state::LISTEN as u32;
/// `BPF_NOEXIST`: create only (a SYN's option is spent once).
const BPF_NOEXIST: u64 = 1;

// ---------------------------------------------------------------------------------------------
// Sending side (sock_ops)
// ---------------------------------------------------------------------------------------------

/// The socket's addresses as IPv6 words in memory order (IPv4 mapped) and as the IP cache
/// looks the remote one up.
#[inline(always)]
pub(crate) fn sock_ops_addresses(
    ops: *const bpf_sock_ops,
) -> Option<([u32; 4], [u32; 4], Destination)> {
    // SAFETY: `ops` is the context; every field read is a full 32-bit load.
    unsafe {
        let family = read_volatile(&(*ops).family);
        if family == AF_INET {
            let r = read_volatile(&(*ops).remote_ip4);
            let l = read_volatile(&(*ops).local_ip4);
            Some((
                [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, l],
                [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, r],
                Destination {
                    addr: [r, ZERO_WORD, ZERO_WORD, ZERO_WORD],
                    family: FAMILY_V4,
                },
            ))
        } else if family == AF_INET6 {
            let r = [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ];
            let l = [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ];
            // A dual-stack socket talking to ::ffff:a.b.c.d sends IPv4: judged as IPv4, as
            // connect6 does.
            let dst = crate::six_or_mapped(r);
            Some((l, r, dst))
        } else {
            None
        }
    }
}

/// The socket's (local, remote) ports in host order.
#[inline(always)]
pub(crate) fn sock_ops_ports(ops: *const bpf_sock_ops) -> (u16, u16) {
    // SAFETY: full 32-bit context loads. `local_port` is in host order; `remote_port` holds
    // the port in network order, in the upper half on little-endian kernels.
    unsafe {
        let lp = read_volatile(&(*ops).local_port);
        let rp = read_volatile(&(*ops).remote_port);
        let rp16 = if rp > 0xffff { rp >> 16 } else { rp };
        (lp as u16, u16::from_be(rp16 as u16))
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let b = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    // SAFETY: [[u8; 4]; 4] and [u8; 16] have the same size and no invalid bit patterns.
    unsafe { core::mem::transmute(b) }
}

/// The connecting task's subject when the socket's destination is tagged (an untracked
/// flow: a tracked one's record names both): `None` for an unmanaged task or an untagged
/// destination.
#[inline(always)]
fn tagged_subject(ops: *const bpf_sock_ops) -> Option<u32> {
    // SAFETY: no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let subject = locked::subject_of(cgroup_id)?;
    let (_, _, dst) = sock_ops_addresses(ops)?;
    let dst_flags = locked::identity_flags(lookup_destination(&dst))?;
    // A Service's flow is never tagged (see `flow_marks::UNTAGGED`).
    (dst_flags & flags::TAGGED != 0 && dst_flags & flags::SERVICE == 0).then_some(subject)
}

/// A tracked flow's connect failed (its record ended before the handshake completed, with
/// `last_sent` its last SYN's time): the time is kept in socket storage, where the socket's
/// next connect finds it ([`forget_option`]), so that a connect again on the same 4-tuple
/// (a bound port) never repeats a time the receiver has taken. Only when the failed connect
/// was tagged from its record (the write callback still on, and no storage: a socket that
/// has storage tagged from it, and the storage holds the time, the record none).
#[inline(always)]
pub fn keep_time(ctx: &SockOpsContext, last_sent: u16) {
    if ctx.cb_flags() & WRITE_HDR_OPT_CB_FLAG == 0 {
        return;
    }
    let Some(sk) = context_socket(ctx) else {
        return;
    };
    if !WIRE_TAGS.get(sk, None).is_null() {
        return;
    }
    let option = abi::option_bytes(0, last_sent, 0, abi::VERSION, 0);
    let _ = WIRE_TAGS.get(sk, Some(&option));
}

/// `before_s` moved on to `last`, a socket's last SYN time field, when that is later. A
/// field that reads as more than the skew (`skew_s`) ahead of now is ignored: no receiver
/// took a SYN of that time (it was `stale_tag`), so a new SYN may carry it again, and taken,
/// a stray field would date every SYN of the socket up to hours ahead.
#[inline(always)]
fn after_last(before_s: u32, last: u16, now_s: u32, skew_s: u32) -> u32 {
    let last_s = abi::claimed_seconds(last, now_s);
    let ahead = last_s.wrapping_sub(before_s) as i32;
    if ahead > 0 && last_s.wrapping_sub(now_s) as i32 <= skew_s as i32 {
        last_s
    } else {
        before_s
    }
}

/// `TCP_CONNECT_CB`: the connecting task, the 4-tuple just chosen. A tagged flow (subject
/// managed, destination flagged, a current key present) gets an option, its tag still unset,
/// and asks for the header callbacks: each SYN transmission stamps and tags its own copy
/// ([`stamp_option`]). A tracked flow (`record`: this connect's `FLOWS` record; every
/// tracked destination is tagged) keeps the option's time in its record and its subject is
/// the record's, so it needs neither the lookups of an untracked one nor socket storage,
/// whose allocation was the dearest step of a tracked `connect()`; socket storage holds the
/// option of an untracked tagged flow, and of a tracked one whose socket has storage already.
#[inline(always)]
pub fn on_connect(ctx: &SockOpsContext, record: Option<*mut FlowRecord>) {
    let ops = ctx.ops;
    // A socket may connect again after a failed connect: the option its last connect left,
    // with the write callback still on, is for another 4-tuple, time or subject, and must go
    // whether or not this connect is tagged (an untagged SYN would carry it). Its
    // last time stays: that connect's SYNs (same 4-tuple, if the port is bound) may have run
    // a few seconds ahead, and this connect's must not carry times they took.
    let last_sent = forget_option(ctx);
    let subject = match record {
        // A Service's flow (see `flow_marks::UNTAGGED`).
        // SAFETY: a non-null map value pointer is valid for reads.
        Some(r) if unsafe { (*r).marks } & flow_marks::UNTAGGED != 0 => return,
        // SAFETY: as above.
        Some(r) => unsafe { (*r).subject },
        None => match tagged_subject(ops) {
            Some(subject) => subject,
            None => return,
        },
    };
    if !FLOW_KEYS
        .get_ptr(abi::CURRENT_KEY)
        // SAFETY: array values are always valid for reads.
        .is_some_and(|key| unsafe { (*key).id } != 0)
    {
        // No key loaded: the flow goes untagged and the receiver judges it as such.
        return;
    }
    // The time field says "one second before now" (or the last connect's last time): the
    // first transmission's time is then now whatever second it is sent in ([`stamp_option`]
    // takes the later of now and the field's next second). Key id and tag are the
    // transmission's.
    let now_s = now_seconds();
    let skew_s = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always valid for reads; one 4-byte load.
        Some(c) => unsafe { read_volatile(&(*c).wire_skew_s) },
        None => 0,
    };
    let skew_s = if skew_s == 0 {
        abi::DEFAULT_SKEW_S
    } else {
        skew_s
    };
    let mut before_s = now_s.wrapping_sub(1);
    if let Some(last) = last_sent {
        before_s = after_last(before_s, last, now_s, skew_s);
    }
    let Some(sk) = context_socket(ctx) else {
        return;
    };
    // Storage kept past an earlier connection's handshake ([`on_established`]: an untracked
    // flow's, then the socket connected again after a disconnect) holds that connection's
    // last SYN time.
    let kept = WIRE_TAGS.get(sk, None);
    if !kept.is_null() {
        // SAFETY: a non-null socket storage value of OPTION_LEN bytes, this socket's own.
        let last = unsafe { u16::from_be_bytes([(*kept)[8], (*kept)[9]]) };
        before_s = after_last(before_s, last, now_s, skew_s);
    }
    match record {
        // SAFETY: a non-null map value pointer is valid for writes (the socket is locked in
        // this callback: no other sock_ops run of it writes the record meanwhile).
        // The flag tells the write callback the record is this connect's option.
        Some(r) if kept.is_null() => unsafe {
            (*r).wire_stamp = abi::stamp(before_s);
            (*r).flags |= flow_flags::WIRE_OPTION;
        },
        _ => {
            let option = abi::option_bytes(subject, abi::stamp(before_s), 0, abi::VERSION, 0);
            let stored = if kept.is_null() {
                WIRE_TAGS.get(sk, Some(&option))
            } else {
                kept
            };
            if stored.is_null() {
                return;
            }
            // SAFETY: a non-null socket storage value of OPTION_LEN bytes, this socket's own
            // (the socket is locked in this callback). Written over a kept value, so that
            // the SYN can only ever carry this connect's option.
            unsafe { *stored = option };
        }
    }
    // Added to whatever callbacks another sock_ops job asked for, never replacing them.
    let cb = ctx.cb_flags() | WRITE_HDR_OPT_CB_FLAG;
    // SAFETY: `ops` is the sock_ops context.
    unsafe { bpf_sock_ops_cb_flags_set(ops, cb as i32) };
}

/// Stamps and tags the socket's option for the SYN being sent: its time is now, or the second
/// after the previous transmission's if that is not earlier (a retransmission within the same
/// second), so that no two transmissions of a connect carry the same (4-tuple, time) and the
/// receiver may refuse any copy it has seen (`WIRE_PEERS`, `SPENT_TAGS`). `option` is the
/// socket's storage value or a copy of its record's option on the stack. False (the SYN goes
/// untagged) when no key is loaded any more or the addresses cannot be read.
#[inline(always)]
fn stamp_option(ctx: &SockOpsContext, option: *mut [u8; abi::OPTION_LEN]) -> bool {
    let ops = ctx.ops;
    let Some(key) = FLOW_KEYS.get_ptr(abi::CURRENT_KEY) else {
        return false;
    };
    // SAFETY: array values are always valid for reads.
    let (key_id, k0, k1) = unsafe { ((*key).id, (*key).k0, (*key).k1) };
    if key_id == 0 {
        return false;
    }
    let Some((local, remote)) = mapped_addresses(ops) else {
        return false;
    };
    // SAFETY: `option` is this socket's storage value (locked: the socket is being sent on)
    // or the caller's stack copy.
    let (subject, last) = unsafe {
        let o = &*option;
        (
            u32::from_be_bytes([o[4], o[5], o[6], o[7]]),
            u16::from_be_bytes([o[8], o[9]]),
        )
    };
    // Wall-clock seconds, not the monotonic clock: the receiver compares them with its own.
    let now_s = now_seconds();
    let last_s = abi::claimed_seconds(last, now_s);
    let at_s = if (last_s.wrapping_sub(now_s) as i32) < 0 {
        now_s
    } else {
        last_s.wrapping_add(1)
    };
    let (sport, dport) = sock_ops_ports(ops);
    let key_id = key_id as u8;
    let stamp = abi::stamp(at_s);
    let m = abi::message(
        subject,
        stamp,
        key_id,
        abi::VERSION,
        &words_to_bytes(local),
        &words_to_bytes(remote),
        sport,
        dport,
        abi::epoch(at_s),
    );
    let tag = abi::siphash24(k0, k1, &m);
    // SAFETY: as above.
    unsafe { *option = abi::option_bytes(subject, stamp, key_id, abi::VERSION, tag) };
    true
}

/// The header callbacks run only while the write callback is on (a tagged connect), but
/// also for non-SYN segments (and with flags 0 from `tcp_current_mss`): only a SYN without
/// ACK gets the option.
#[inline(always)]
fn sending_syn(ctx: &SockOpsContext) -> bool {
    // SAFETY: a full 32-bit context load.
    let tcp_flags = unsafe { read_volatile(&(*ctx.ops).skb_tcp_flags) };
    tcp_flags & SYN_ACK_MASK == SYN_ONLY
}

/// `HDR_OPT_LEN_CB`: room for the option on the SYN. Room the write callback leaves unused
/// (no key any more) is filled with NOPs by the kernel.
#[inline(always)]
pub fn on_hdr_opt_len(ctx: &SockOpsContext) {
    if sending_syn(ctx) {
        // SAFETY: `ops` is the sock_ops context. On failure (no room) the SYN goes untagged.
        unsafe { bpf_reserve_hdr_opt(ctx.ops, abi::OPTION_LEN as u32, NO_FLAGS) };
    }
}

/// `WRITE_HDR_OPT_CB`: the option itself, stamped for this transmission of the SYN: from
/// the socket's storage, or else from its tracked flow's record ([`on_connect`]).
#[inline(always)]
pub fn on_write_hdr_opt(ctx: &SockOpsContext) {
    if !sending_syn(ctx) {
        return;
    }
    let Some(sk) = context_socket(ctx) else {
        return;
    };
    let stored = WIRE_TAGS.get(sk, None);
    if !stored.is_null() {
        if stamp_option(ctx, stored) {
            store_option(ctx, stored);
        }
        return;
    }
    let Some(r) = crate::flows::record_of(ctx) else {
        return;
    };
    // Only a record `on_connect` made this connect's option (another sock_ops program may
    // keep the write callback on for a connect this one did not tag).
    // SAFETY: a non-null map value pointer is valid for reads.
    if unsafe { (*r).flags } & flow_flags::WIRE_OPTION == 0 {
        return;
    }
    // SAFETY: a non-null map value pointer, valid for reads and writes (the socket is
    // locked while its SYN is sent: no other run of this socket writes the record).
    unsafe {
        let mut option = abi::option_bytes((*r).subject, (*r).wire_stamp, 0, abi::VERSION, 0);
        if stamp_option(ctx, &mut option) {
            (*r).wire_stamp = u16::from_be_bytes([option[8], option[9]]);
            store_option(ctx, &mut option);
        }
    }
}

/// Writes `option` into the SYN's header.
#[inline(always)]
fn store_option(ctx: &SockOpsContext, option: *mut [u8; abi::OPTION_LEN]) {
    // SAFETY: `option` points at OPTION_LEN readable bytes (a map value or the stack).
    unsafe {
        bpf_store_hdr_opt(
            ctx.ops,
            option.cast::<c_void>(),
            abi::OPTION_LEN as u32,
            NO_FLAGS,
        )
    };
}

/// `ACTIVE_ESTABLISHED_CB`: no more SYNs; drop the per-segment callbacks. The storage stays
/// (the kernel frees it with the socket): a delete here was the dearest step of the callback,
/// inside `connect()`, and the socket's next connect after a disconnect reads its time.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    let cb = ctx.cb_flags();
    if cb & WRITE_HDR_OPT_CB_FLAG != 0 {
        // SAFETY: `ops` is the sock_ops context.
        unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, (cb & !WRITE_HDR_OPT_CB_FLAG) as i32) };
    }
}

/// Drops the socket's option, if it has one, and the header callbacks that write it. Returns
/// the dropped option's time field (the last SYN's, once one was sent): one storage lookup
/// serves both.
#[inline(always)]
fn forget_option(ctx: &SockOpsContext) -> Option<u16> {
    // Every connect of the subtree comes here: a socket without the write callback has no
    // option in use (`on_connect` sets it, this and `on_established` clear it), so it costs
    // no lookup.
    let cb = ctx.cb_flags();
    if cb & WRITE_HDR_OPT_CB_FLAG == 0 {
        return None;
    }
    // Off whether or not there is storage: a tracked flow's option had none.
    // SAFETY: `ops` is the sock_ops context.
    unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, (cb & !WRITE_HDR_OPT_CB_FLAG) as i32) };
    let sk = context_socket(ctx)?;
    let option = WIRE_TAGS.get(sk, None);
    if option.is_null() {
        return None;
    }
    // SAFETY: a non-null socket storage value of OPTION_LEN bytes, this socket's own (the
    // socket is locked in this callback); read before the delete frees it.
    let stamp = unsafe { u16::from_be_bytes([(*option)[8], (*option)[9]]) };
    WIRE_TAGS.delete(sk);
    Some(stamp)
}

/// The socket's local and remote addresses as the MAC takes them: IPv6 words in memory order,
/// IPv4 as `::ffff:a.b.c.d`.
///
/// Every address field is loaded before the family is looked at: with a load in each branch
/// (as `sock_ops_addresses` does), LLVM sinks the two loads into one whose context offset is
/// chosen by the branch, which the verifier refuses ("dereference of modified ctx ptr").
/// An IPv4 socket's IPv6 fields read as whatever the socket holds there; they are not used.
#[inline(always)]
fn mapped_addresses(ops: *const bpf_sock_ops) -> Option<([u32; 4], [u32; 4])> {
    // SAFETY: `ops` is the context; every field read is a full 32-bit load.
    let (family, r4, l4, r6, l6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).remote_ip4),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    if family == AF_INET {
        Some((
            [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, l4],
            [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, r4],
        ))
    } else if family == AF_INET6 {
        // A dual-stack socket's IPv4 peer is already `::ffff:a.b.c.d` here, the form the
        // ingress check records and the MAC covers.
        Some((l6, r6))
    } else {
        None
    }
}

/// The `WIRE_PEERS` key of a server-side socket: the remote end is the client (the SYN's
/// source), the local end the server.
#[inline(always)]
fn server_peer_key(ops: *const bpf_sock_ops) -> Option<abi::PeerKey> {
    let (local, remote) = mapped_addresses(ops)?;
    let (lport, rport) = sock_ops_ports(ops);
    Some(abi::PeerKey {
        saddr: words_to_bytes(remote),
        daddr: words_to_bytes(local),
        sport: rport,
        dport: lport,
        _pad: 0,
    })
}

/// `PASSIVE_ESTABLISHED_CB` (an accepted socket, in the listener's cgroup): if the ingress
/// check verified this connection's SYN, the record now names the server's socket, and the
/// socket asks for state callbacks so that its CLOSE deletes the record. Untagged sockets ask
/// for nothing and pay nothing further.
#[inline(always)]
pub fn on_passive_established(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let Some(key) = server_peer_key(ops) else {
        return;
    };
    let Some(peer) = WIRE_PEERS.get_ptr_mut(&key) else {
        return;
    };
    // Only the SYN this check verified is promoted: an entry already accepted belongs to a
    // live socket of the same 4-tuple, which a second socket (in another network namespace,
    // where the same addresses can be set up) must not take over.
    // SAFETY: a non-null map value pointer is valid for reads.
    if unsafe { (*peer).state } != abi::peer_state::VERIFIED {
        return;
    }
    // SAFETY: `ops` is the context; `peer` a non-null map value pointer, valid for writes.
    unsafe {
        (*peer).cookie = bpf_get_socket_cookie(ops.cast::<c_void>());
        (*peer).accepted_ns = bpf_ktime_get_ns();
        (*peer).state = abi::peer_state::ACCEPTED;
    }
    let cb = ctx.cb_flags() | STATE_CB_FLAG;
    // SAFETY: `ops` is the context (a full socket at this callback).
    unsafe { bpf_sock_ops_cb_flags_set(ops, cb as i32) };
}

/// `STATE_CB` with `arg(1)` the new state: at TCP CLOSE (reset, both FINs done, or the
/// socket entering TIME_WAIT, whose full socket closes then) an accepted socket's record
/// goes. Client sockets get here too (their flow records ask for state callbacks); their
/// 4-tuple, read the other way round, names no entry.
#[inline(always)]
pub fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(1) != u32::from(tcp_state::CLOSE) {
        return;
    }
    let Some(key) = server_peer_key(ctx.ops) else {
        return;
    };
    if let Some(peer) = WIRE_PEERS.get_ptr(&key) {
        // Only the socket the entry names ends it: another socket with the same 4-tuple
        // (another network namespace) closing must not delete a live connection's row.
        // SAFETY: a non-null map value pointer is valid for reads; `ctx.ops` is the context.
        let (state, cookie, stamp, version, own) = unsafe {
            (
                (*peer).state,
                (*peer).cookie,
                (*peer).stamp,
                (*peer).version,
                bpf_get_socket_cookie(ctx.ops.cast::<c_void>()),
            )
        };
        if state == abi::peer_state::ACCEPTED && cookie == own {
            spend(&key, stamp, version);
            let _ = WIRE_PEERS.remove(&key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving side (cgroup_skb/ingress)
// ---------------------------------------------------------------------------------------------

/// A connection attempt as the ingress check needs it: a SYN, or an ACK to a listener.
struct Syn {
    /// IPv6 words in memory order (IPv4 mapped): the MAC's form.
    saddr: [u32; 4],
    daddr: [u32; 4],
    /// The destination as the IP cache looks it up (and as events report it).
    dst: Destination,
    src: Destination,
    sport: u16,
    dport: u16,
    /// The SYN's sequence number (the ACK's less one: its SYN's), compared only.
    seq: u32,
    /// An ACK (no SYN, no RST) to a listening socket: the end of a handshake, a SYN cookie's
    /// ACK, from which the kernel makes a connection with no SYN before it (`cookie_v4_check`,
    /// while the listener sends cookies: a full SYN queue within the last two minutes, or
    /// `net.ipv4.tcp_syncookies=2`), or a stray one (its connection's socket is gone: the
    /// kernel answers it with a reset). Judged as its SYN would be without the option (World's
    /// by the policy, anything else's `missing_tag`; at a foreign listener, `foreign_address`)
    /// when it came through a device from an address that is no cluster client's (see
    /// `cluster_client`) and its SYN did not pass the check here (no `WIRE_PEERS` record):
    /// red-team reviews 59 M1 and 61 M1, a guessed cookie made a connection no check had
    /// seen. A cluster client's or a local one's is passed: pods have no raw sockets to forge
    /// one with, and a stray ACK from a client whose server restarted must get its reset, not
    /// be dropped into a timeout (review 60 M1).
    ack: bool,
    /// The packet came in through loopback (`ingress_ifindex`): sent in this network
    /// namespace. Read once, here: two reads of the field let LLVM keep the field's address
    /// in a register, and the verifier refuses a load through a moved context pointer.
    via_loopback: bool,
    /// An IPv6 packet whose TCP header (if any) lies behind an extension header the walk
    /// does not step over (`skb::skip_extension_headers`: ESP, a fragment header, more than
    /// three): it is judged as an untagged packet (ports zero) and never passed unchecked.
    hidden: bool,
    /// Offset and end of the TCP options.
    options: usize,
    options_end: usize,
}

#[inline(always)]
fn parse_syn(ctx: &SkBuffContext) -> Option<Syn> {
    let skb: *const __sk_buff = ctx.skb.skb;
    // SAFETY: a full 32-bit context load; `protocol` is the __be16 ethertype.
    let ethertype = u16::from_be(unsafe { read_volatile(&(*skb).protocol) } as u16);
    // Most packets are not SYNs: two helper calls (the IP header, the TCP flags) decide that,
    // and for an ACK two context loads (is its socket a listener?); the rest is read only for
    // a SYN or such an ACK.
    let word = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (l4, ack, saddr, daddr, src, dst) = if ethertype == ETH_P_IP {
        let ip: [u8; IPV4_HEADER_MIN] = load(ctx, 0)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < IPV4_HEADER_MIN || ip[9] != IPPROTO_TCP {
            return None;
        }
        let ack = attempt(ctx, ihl)?;
        let (s, d) = (word(&ip, 12), word(&ip, 16));
        let v4 = |w: u32| Destination {
            addr: [w, ZERO_WORD, ZERO_WORD, ZERO_WORD],
            family: FAMILY_V4,
        };
        (
            ihl,
            ack,
            [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, s],
            [ZERO_WORD, ZERO_WORD, V4_MAPPED_WORD2_MEMORY, d],
            v4(s),
            v4(d),
        )
    } else if ethertype == ETH_P_IPV6 {
        let ip: [u8; IPV6_HEADER] = load(ctx, 0)?;
        let s = [word(&ip, 8), word(&ip, 12), word(&ip, 16), word(&ip, 20)];
        let d = [word(&ip, 24), word(&ip, 28), word(&ip, 32), word(&ip, 36)];
        let v6 = |w: [u32; 4]| Destination {
            addr: w,
            family: FAMILY_V6,
        };
        // The extension headers the kernel itself puts on packets (a BIG TCP GRO packet's
        // hop-by-hop jumbo header, on every one over 64 KiB) are stepped over, so that such
        // a packet of an established flow is not taken for a SYN, and a SYN behind them is
        // read as what it is. A SYN behind one that is not stepped over (ESP, a fragment
        // header, more than the walk's bound) must not pass for "not a SYN": it is handed
        // to the check as a hidden one, which fails closed. Other next headers (UDP,
        // ICMPv6) are not TCP connection attempts.
        let (next, l4) = skip_extension_headers(ctx, ip[6], IPV6_HEADER);
        if is_extension_header(next) {
            return Some(Syn {
                saddr: s,
                daddr: d,
                dst: v6(d),
                src: v6(s),
                sport: 0,
                dport: 0,
                seq: 0,
                ack: false,
                via_loopback: via_loopback(ctx),
                hidden: true,
                options: 0,
                options_end: 0,
            });
        }
        if next != IPPROTO_TCP {
            return None;
        }
        (l4, attempt(ctx, l4)?, s, d, v6(s), v6(d))
    } else {
        return None;
    };
    let tcp: [u8; 14] = load(ctx, l4)?;
    let header = ((tcp[12] >> 4) as usize) * 4;
    Some(Syn {
        saddr,
        daddr,
        dst,
        src,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_sub(ack as u32),
        ack,
        via_loopback: via_loopback(ctx),
        hidden: false,
        options: l4 + TCP_HEADER_MIN,
        options_end: l4 + header,
    })
}

#[inline(always)]
fn via_loopback(ctx: &SkBuffContext) -> bool {
    // SAFETY: the program's context; `ingress_ifindex` is readable in cgroup_skb programs.
    unsafe { read_volatile(&(*ctx.skb.skb).ingress_ifindex) == LOOPBACK_IFINDEX }
}

/// Whether the TCP segment at `l4` may open a connection: `Some(false)` a SYN without ACK,
/// `Some(true)` an ACK without SYN or RST to a listening socket (see `Syn::ack`), `None`
/// anything else (a segment of a connection, a SYN-ACK, a reset).
#[inline(always)]
fn attempt(ctx: &SkBuffContext, l4: usize) -> Option<bool> {
    let flags: u8 = load(ctx, l4 + 13)?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
        return Some(false);
    }
    if flags & (TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_ACK) != TCP_FLAG_ACK {
        return None;
    }
    // SAFETY: one 8-byte context load; the socket (a `sock_common`) is read only when not
    // null, one 4-byte field the verifier allows on it.
    let listening = unsafe {
        let sk = read_volatile(&(*ctx.skb.skb).__bindgen_anon_2.sk);
        !sk.is_null() && read_volatile(&(*sk).state) == TCP_LISTEN
    };
    listening.then_some(true)
}

/// The identity option, if the SYN carries one with our ExID as its last 20 option bytes:
/// where `bpf_store_hdr_opt` puts it (after the kernel's own options, which end 4-aligned,
/// and 20 bytes need no padding). A walk over every option would be more lenient, but the
/// verifier explores each of its iterations' branches separately (tens of seconds of load
/// time for 40 steps); one fixed place is one load. An option elsewhere counts as missing:
/// the check fails closed.
#[inline(always)]
fn find_option(ctx: &SkBuffContext, syn: &Syn) -> Option<[u8; abi::OPTION_LEN]> {
    if syn.options_end < syn.options + abi::OPTION_LEN {
        return None;
    }
    let option: [u8; abi::OPTION_LEN] = load(ctx, syn.options_end - abi::OPTION_LEN)?;
    (option[0] == abi::KIND
        && option[1] as usize == abi::OPTION_LEN
        && u16::from_be_bytes([option[2], option[3]]) == abi::EXID)
        .then_some(option)
}

/// Whether `tag` verifies for these fields with the flow key in `slot` carrying `key_id`.
#[inline(always)]
fn verifies(slot: u32, key_id: u8, m: &[u64; 6], tag: u64) -> bool {
    let Some(key) = FLOW_KEYS.get_ptr(slot) else {
        return false;
    };
    // SAFETY: array values are always valid for reads.
    let (id, k0, k1) = unsafe { ((*key).id, (*key).k0, (*key).k1) };
    id != 0 && id == key_id as u32 && abi::siphash24(k0, k1, m) == tag
}

#[inline(always)]
pub fn ingress(ctx: &SkBuffContext) -> i32 {
    let Some(syn) = parse_syn(ctx) else {
        return PASS;
    };
    // An ACK to a listener is judged unless a cluster client may have sent it (see `Syn::ack`).
    if syn.ack
        && (syn.via_loopback
            || cluster_client(&syn.src)
            || WIRE_PEERS.get_ptr(&peer_key(&syn)).is_some())
    {
        return PASS;
    }
    let (destination, exact) = lookup_address(&syn.dst);
    // The receiving socket's identity, looked up once for the three checks below (a
    // spin-locked lookup). At cgroup_skb ingress the skb is the receiving socket's: the
    // listener's, for a SYN.
    // `UNKNOWN` when its cgroup has none: a plain value, since LLVM spilled the payload
    // register of an `Option`'s `None` across a helper call, which the verifier refuses to
    // read (`R3 !read_ok`).
    // SAFETY: the skb pointer is the program's context.
    let listener =
        locked::subject_of(unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }).unwrap_or(identity::UNKNOWN);
    if let Some(verdict) = checked_pod_elsewhere(ctx, &syn, listener, destination) {
        return verdict;
    }
    if let Some(owner) = crate::address_owner(destination, exact) {
        if let Some(verdict) = foreign_listener(ctx, &syn, listener, owner) {
            return verdict;
        }
    } else if (!exact || destination < identity::FIRST_DYNAMIC) && !syn.ack {
        // An address nobody holds: WORLD, a prefix (which may cover the node's own
        // addresses), a reserved identity. (Not for an ACK: it finds the caller by its
        // connecting socket, which has left `SYN_SENT` by then, or by a workload's address,
        // whose ACKs pass above; of the sources whose ACKs are judged, it refuses only an IPv6
        // link-local neighbour's SYN: that one's cookie ACK is left open.)
        if let Some(verdict) = world_listener(ctx, &syn, listener) {
            return verdict;
        }
    }
    let Some(dst_flags) = locked::identity_flags(destination) else {
        return PASS;
    };
    let audit = dst_flags & flags::INGRESS_ENFORCE == 0;
    if audit && dst_flags & flags::INGRESS_AUDIT == 0 {
        return PASS;
    }
    // One CONFIG lookup for everything the check reads; the clock is turned into the
    // option's seconds at once (only `now_s` lives on: the program is near its stack limit).
    let (generation, skew_s, v1_until_s, now_s) = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always valid for reads; no preconditions (the helper).
        Some(c) => unsafe {
            (
                read_volatile(&(*c).generation) as u32,
                read_volatile(&(*c).wire_skew_s),
                read_volatile(&(*c).wire_v1_until_s),
                abi::seconds(bpf_ktime_get_tai_ns(), read_volatile(&(*c).tai_offset_s)),
            )
        },
        // SAFETY: no preconditions.
        None => (0, 0, 0, abi::seconds(unsafe { bpf_ktime_get_tai_ns() }, 0)),
    };

    let option = if syn.hidden || syn.ack {
        None
    } else {
        find_option(ctx, &syn)
    };
    let (claimed, refused) = match option {
        Some(option) => {
            let claimed = u32::from_be_bytes([option[4], option[5], option[6], option[7]]);
            let stamp = u16::from_be_bytes([option[8], option[9]]);
            let key_id = option[10];
            let version = option[11];
            let tag = u64::from_be_bytes([
                option[12], option[13], option[14], option[15], option[16], option[17], option[18],
                option[19],
            ]);
            // The time's high bits are not sent: the receiver takes the time nearest its own
            // clock, so a replay one or more 2^16 s wraps later MACs another time: bad_tag.
            let epoch = if version == abi::VERSION_1 {
                0
            } else {
                abi::epoch(abi::claimed_seconds(stamp, now_s))
            };
            let m = abi::message(
                claimed,
                stamp,
                key_id,
                version,
                &words_to_bytes(syn.saddr),
                &words_to_bytes(syn.daddr),
                syn.sport,
                syn.dport,
                epoch,
            );
            if (version != abi::VERSION && version != abi::VERSION_2 && version != abi::VERSION_1)
                || !(verifies(abi::CURRENT_KEY, key_id, &m, tag)
                    || verifies(abi::PREVIOUS_KEY, key_id, &m, tag)
                    || verifies(abi::TRANSITION_KEY, key_id, &m, tag))
            {
                // Checked before the time, so that a forged option is `bad_tag` whatever
                // time it claims: `stale_tag` always means "signed by a key holder".
                (claimed, reason::BAD_TAG)
            } else if !fresh_enough(version, stamp, now_s, skew_s, v1_until_s) {
                (claimed, reason::STALE_TAG)
            } else if version == abi::VERSION_2 && spent(&syn, stamp, now_s) {
                // A copy of an option whose connection was accepted here and has closed
                // (version 3: `record_first`, after its insert).
                (claimed, reason::REPLAYED_TAG)
            } else if quarantined(claimed) {
                // A quarantine on this node holds against a peer that another node (which
                // may not know of it yet, or not at all) let connect.
                (claimed, reason::QUARANTINED)
            } else if !allowed(claimed, destination, syn.dport) {
                (claimed, reason::NOT_ALLOWED)
            } else if version == abi::VERSION
                && !record_first(&syn, claimed, destination, stamp, key_id, now_s)
            {
                // Last, so that only a SYN that would pass takes an entry: a refused sender
                // cannot churn the maps.
                (claimed, reason::REPLAYED_TAG)
            } else {
                if version != abi::VERSION {
                    remember(&syn, claimed, destination, stamp, key_id, version, now_s);
                }
                (claimed, reason::ALLOWED)
            }
        }
        None => {
            let source = lookup_destination(&syn.src);
            if source != identity::WORLD || syn.hidden {
                (source, reason::MISSING_TAG)
            } else if allowed(identity::WORLD, destination, syn.dport) {
                (source, reason::ALLOWED)
            } else {
                (source, reason::NOT_ALLOWED)
            }
        }
    };
    if refused == reason::ALLOWED {
        if !syn.ack {
            count(hook::INGRESS, verdict::ALLOW, reason::ALLOWED);
        }
        return PASS;
    }
    refuse_syn(
        ctx,
        &syn,
        || claimed,
        destination,
        refused,
        audit,
        generation,
    )
}

/// A SYN the check refuses (`reason`), from `subject()` (claimed, or the caller; asked only
/// when the SYN is reported) to `destination`: counted, reported once per connection attempt
/// (`first_report`), and dropped, or passed as audit (`audit`).
#[inline(always)]
fn refuse_syn(
    ctx: &SkBuffContext,
    syn: &Syn,
    subject: impl FnOnce() -> u32,
    destination: u32,
    reason: u8,
    audit: bool,
    generation: u32,
) -> i32 {
    let v = if audit { verdict::AUDIT } else { verdict::DENY };
    let first = first_report(syn, v, reason);
    // An ACK refused as its SYN was (passed as audit, both) is the same attempt: counted and
    // reported once.
    if first || !syn.ack {
        count(hook::INGRESS, v, reason);
    }
    if first {
        emit_ingress(ctx, syn, subject(), destination, v, reason, generation);
    }
    if audit {
        PASS
    } else {
        DROP
    }
}

/// A SYN to `destination`'s address that reached a socket of another identity in the subtree
/// (a cgroup of no identity may answer, see `crate::foreign`): a listener on the wildcard address, in a network namespace that
/// `destination` shares (bare hosts with an inventory, `hostNetwork` pods), which callers
/// judged as `destination` when they connected. bind4/bind6 refuse binding the address
/// itself; this refuses the wildcard's catch-all. Dropped with reason `foreign_address` (the
/// peer's IP-cache identity as the subject, the listener's cgroup in the event), or passed
/// as audit in audit mode (global, or the listener's). `None`: the listener is
/// `destination`'s own, the check goes on.
///
/// `listener`: the receiving socket's identity as `ingress` looked it up (`UNKNOWN`: its
/// cgroup has none).
#[inline(always)]
fn foreign_listener(
    ctx: &SkBuffContext,
    syn: &Syn,
    listener: u32,
    destination: u32,
) -> Option<i32> {
    if listener == identity::UNKNOWN || listener == destination {
        return None;
    }
    let listener_flags = locked::identity_flags(listener).unwrap_or(0);
    if listener_flags & flags::EXEMPT != 0 {
        // The agent's own servers: never judged.
        return None;
    }
    let listener_audit = listener_flags & flags::AUDIT != 0;
    let (global_audit, generation) = crate::audit_and_generation();
    Some(refuse_syn(
        ctx,
        syn,
        || lookup_destination(&syn.src),
        destination,
        reason::FOREIGN_ADDRESS,
        global_audit || listener_audit,
        generation as u32,
    ))
}

/// A SYN to an address of no identity (WORLD: `127.0.0.1`, an IPv6 link-local address) that
/// reached a listener of the subtree from a caller of the subtree in the same network
/// namespace. The caller's connect was judged as a call to WORLD, but the socket that answers
/// is the listener's workload: in a namespace that workloads share, a policy that opens WORLD
/// would open every wildcard server of the node. The call is judged again as what it is,
/// caller -> listener on this port (the same table, classes and flags as `decide`), and
/// dropped where that is not permitted: the event has the caller as subject, the listener as
/// destination (at the WORLD address it dialled), reason `tenant_mismatch` / `no_permit` /
/// `quarantined`, hook `ingress`; a permitted call to a tagged listener (`missing_tag`: it
/// is reached at its own address only).
///
/// A caller the lookup cannot find (a pod in its own network namespace dialling a
/// `hostNetwork` pod's server at the node's address, a device-bound or NATed socket) is
/// taken from the SYN's source address, when that is exactly a workload's (the IP cache's
/// host entry: a pod IP, an inventory workload's address; its egress was judged as a call to
/// WORLD), and judged the same way: by this node's table for a local subject, by the
/// ingress allowlist for one with no row here (a pod of another node) calling a listener of
/// the node's namespace (`flags::SHARED_NETNS`, whose column the allowlist holds). An IPv6
/// link-local source from a device (a pod dialling its node's link-local address on the
/// veth) names no one: refused at such a listener as World's call (`no_permit`). Not
/// judged here (see `checked_pod_elsewhere` for an ingress-checked pod's listener, which
/// refuses all of these that did not come through its loopback): another source of no workload (WORLD, a prefix, an endpoint, a Service, a
/// reserved identity), a caller outside the subtree or of no identity (denied at its
/// connect), a listener's own workload calling itself (a pod's containers over its
/// loopback, a sidecar's `REDIRECT`), and the agent on either side. `None`: nothing to
/// judge.
///
/// `listener`: the receiving socket's identity as `ingress` looked it up (`UNKNOWN`: its
/// cgroup has none).
#[inline(always)]
fn world_listener(ctx: &SkBuffContext, syn: &Syn, listener: u32) -> Option<i32> {
    if listener == identity::UNKNOWN {
        return None;
    }
    let found = if syn.hidden {
        None
    } else {
        caller_cgroup(ctx, syn)
    };
    // Not found: a caller on another host or in another namespace, or one the lookup cannot
    // see: NATed (a sidecar's `REDIRECT` to 127.0.0.1, kube-proxy's DNAT to a node address:
    // its socket keeps the original destination) or bound to a device (`SO_BINDTODEVICE`,
    // an IPv6 link-local connect), which the kernel matches by that device. Refusing what
    // cannot be seen would break every sidecar's outbound calls; what the source address
    // says is used instead, where it names a workload (see above). A caller outside the
    // subtree, or of no identity (denied at its connect), is not judged.
    let (caller, by_address) = match found {
        Some(cgroup) => (locked::subject_of(cgroup)?, false),
        None => match source_workload(&syn.src) {
            Some(identity) => (identity, true),
            // Every pod has an IPv6 link-local address, the IP cache none: dialled at the
            // node's link-local address on its veth, a pod would come from nobody's.
            None if link_local_from_a_device(syn) => (identity::WORLD, true),
            None => return None,
        },
    };
    if caller == listener {
        return None;
    }
    let (global_audit, generation) = crate::audit_and_generation();
    // The table in force and its classes, as `decide` reads them.
    let slot_b = generation & 1 != 0;
    let l = locked::identity_info(listener, slot_b);
    // The agent's own servers (metrics, the admission webhook) are no policy's destination:
    // it is never judged, either way.
    if l.as_ref().is_some_and(|l| l.flags & flags::EXEMPT != 0) {
        return None;
    }
    if caller == identity::WORLD {
        // A link-local source names no one, and World is no policy's principal: refused
        // at a listener of the node's namespace, which callers reach at addresses nobody
        // holds (elsewhere the listener is a pod reached by its link-local neighbour: an
        // ingress-checked one refused that before, `checked_pod_elsewhere`).
        if !l
            .as_ref()
            .is_some_and(|l| l.flags & flags::SHARED_NETNS != 0)
        {
            return None;
        }
        return Some(refuse_syn(
            ctx,
            syn,
            || identity::WORLD,
            listener,
            reason::NO_PERMIT,
            global_audit,
            generation as u32,
        ));
    }
    // A caller's identity without an entry (a reload under way) is denied, as `decide` does.
    let (reason, audit) = match locked::identity_info(caller, slot_b) {
        None => (reason::UNKNOWN_SUBJECT, global_audit),
        Some(c) => {
            if c.flags & flags::EXEMPT != 0 {
                return None;
            }
            // Only a workload's address names a caller (an endpoint's, a Service's, do not:
            // no policy has them as principals).
            if by_address && c.flags & flags::WORKLOAD == 0 {
                return None;
            }
            if c.flags & flags::QUARANTINED != 0 {
                (reason::QUARANTINED, false)
            } else {
                let listener_class = match &l {
                    Some(l) => l.destination_class,
                    None => NO_CLASS,
                };
                let permitted = if !by_address || c.subject_class != NO_CLASS {
                    crate::permits(
                        slot_b,
                        c.subject_class,
                        listener_class,
                        syn.dport,
                        IPPROTO_TCP,
                    )
                } else if l
                    .as_ref()
                    .is_some_and(|l| l.flags & flags::SHARED_NETNS != 0)
                {
                    // Read again, not kept from the World check above: kept in a register
                    // across the identity lookup's spin lock, LLVM spilled a value the
                    // verifier then refused to read (`R3 !read_ok`).
                    // A caller known by its address with no row in this node's table (a
                    // pod of another node): its row to a listener of the node's namespace
                    // is in the ingress allowlist.
                    allowed(caller, listener, syn.dport)
                } else {
                    return None;
                };
                // A tagged listener (a vector DB, a tracked or ingress-checked endpoint) is
                // reached only at its own address, where the option, the flow record and the
                // rate limit apply: dialled at 127.0.0.1 all three would be skipped.
                let tagged = l.as_ref().is_some_and(|l| l.flags & flags::TAGGED != 0);
                if permitted && !tagged {
                    return None;
                }
                (
                    if permitted {
                        reason::MISSING_TAG
                    } else {
                        crate::denial_reason(l.as_ref(), c.tenant)
                    },
                    global_audit || c.flags & flags::AUDIT != 0,
                )
            }
        }
    };
    Some(refuse_syn(
        ctx,
        syn,
        || caller,
        listener,
        reason,
        audit,
        generation as u32,
    ))
}

/// A SYN from outside its namespace that reached a listener of an ingress-checked pod
/// (`INGRESS_ENFORCE` / `INGRESS_AUDIT`, in its own network namespace: `OWN_NETNS`) at an
/// address the IP cache does not give the pod (`destination`): its IPv6 link-local address
/// (every pod on a bridge has one, and its neighbours on the link dial it there), an
/// address of its namespace the IP cache does not hold, its own address taken by another
/// identity (a Service's `externalIPs` naming it, a recycled pod IP not yet updated). Callers
/// judge such an address as the node, World or another identity, never as the pod, so no
/// option is written and the pod's own check (the option, the allowlist, the flow record,
/// the rate limit) would be skipped whoever the caller is. Refused as `missing_tag`, as a
/// SYN without the option at the pod's own address is (reported as audit where the pod's
/// ingress is `audit`), the subject the IP cache's identity of the source. A SYN that came
/// in through loopback was sent in the pod's own namespace, by the pod (its containers, a
/// sidecar's `REDIRECT`, whose SYN keeps the original destination's socket out of reach of
/// any lookup): not refused here. `None`: nothing refused; the checks go on.
///
/// `listener`: the receiving socket's identity as `ingress` looked it up (`UNKNOWN`: its
/// cgroup has none).
#[inline(always)]
fn checked_pod_elsewhere(
    ctx: &SkBuffContext,
    syn: &Syn,
    listener: u32,
    destination: u32,
) -> Option<i32> {
    if syn.via_loopback || listener == identity::UNKNOWN || listener == destination {
        return None;
    }
    let listener_flags = locked::identity_flags(listener)?;
    if listener_flags & (flags::INGRESS_ENFORCE | flags::INGRESS_AUDIT) == 0
        || listener_flags & flags::OWN_NETNS == 0
        // A label set with a `hostNetwork` pod here may answer in the node's namespace,
        // where `world_listener` judges its callers.
        || listener_flags & (flags::SHARED_NETNS | flags::EXEMPT) != 0
    {
        return None;
    }
    let (_, generation) = crate::audit_and_generation();
    Some(refuse_syn(
        ctx,
        syn,
        || lookup_destination(&syn.src),
        listener,
        reason::MISSING_TAG,
        listener_flags & flags::INGRESS_ENFORCE == 0,
        generation as u32,
    ))
}

/// The workload whose address `source` is exactly (the IP cache's host entry, a dynamic
/// identity); `None` for WORLD, a prefix's identity or a reserved one.
#[inline(always)]
fn source_workload(source: &Destination) -> Option<u32> {
    let (identity, exact) = lookup_address(source);
    (exact && identity >= identity::FIRST_DYNAMIC).then_some(identity)
}

/// Whether `source` is an address a tagging client may connect from: a workload's (the IP
/// cache's entry of an identity with `flags::WORKLOAD`, exact or a declared range: a pod, an
/// inventory workload), a node's (`HOST`, `REMOTE_NODE`: host processes, `hostNetwork` pods)
/// or one in the pod networks (`UNIDENTIFIED` by prefix: a pod the IP cache does not hold
/// yet, a node's CNI gateway or tunnel device, from which host processes reach other nodes'
/// pods). Not WORLD, an endpoint's or a Service's address or range, nor an exact
/// `UNIDENTIFIED` entry (a refused pod, an address two owners claim): red-team reviews 61 M1
/// and 62 M2.
#[inline(always)]
fn cluster_client(source: &Destination) -> bool {
    match lookup_address(source) {
        (identity::HOST | identity::REMOTE_NODE, true) | (identity::UNIDENTIFIED, false) => true,
        (id, _) if id >= identity::FIRST_DYNAMIC => {
            locked::identity_flags(id).is_some_and(|f| f & flags::WORKLOAD != 0)
        }
        _ => false,
    }
}

/// Whether the SYN's source is an IPv6 link-local address (fe80::/10) and it came in
/// through a device other than loopback (a neighbour on a link, e.g. a pod on its veth).
#[inline(always)]
fn link_local_from_a_device(syn: &Syn) -> bool {
    let first = syn.src.addr[0].to_ne_bytes();
    syn.src.family == FAMILY_V6 && first[0] == 0xfe && first[1] & 0xc0 == 0x80 && !syn.via_loopback
}

/// The cgroup of the local socket that sent `syn` (a connecting socket of this network
/// namespace, found by the SYN's 4-tuple as seen from its side, in `SYN_SENT` with the SYN's
/// source port); `None` when the SYN came from another host or namespace, or the lookup
/// cannot see the socket (see `world_listener`).
#[inline(always)]
fn caller_cgroup(ctx: &SkBuffContext, syn: &Syn) -> Option<u64> {
    let tuple = TUPLE_SCRATCH.get_ptr_mut(0)?;
    // The tuple of a packet *to* the caller: it finds the socket that would receive it.
    // SAFETY: a per-CPU map value of this program's run, valid for writes.
    let size = unsafe {
        if syn.dst.family == FAMILY_V4 {
            (*tuple).__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: syn.dst.addr[0],
                daddr: syn.src.addr[0],
                sport: syn.dport.to_be(),
                dport: syn.sport.to_be(),
            };
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
        } else {
            (*tuple).__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: syn.daddr,
                daddr: syn.saddr,
                sport: syn.dport.to_be(),
                dport: syn.sport.to_be(),
            };
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
        }
    };
    // SAFETY: the context and a tuple of `size` bytes; the socket returned is released before
    // anything else runs.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.skb.skb.cast(),
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS,
            NO_FLAGS,
        );
        if sk.is_null() {
            return None;
        }
        // Without an established match the kernel falls back to a listener on the SYN's
        // source address and port: only the connecting socket itself is the caller.
        let caller = read_volatile(&(*sk).state) == TCP_SYN_SENT
            && read_volatile(&(*sk).src_port) == syn.sport as u32;
        let cgroup = bpf_sk_cgroup_id(sk.cast());
        bpf_sk_release(sk.cast());
        caller.then_some(cgroup)
    }
}

/// Whether a verified option is recent enough: version 2 when its time is within `skew_s`
/// (0: `abi::DEFAULT_SKEW_S`) of this node's wall clock, either way; version 1 (no time) only
/// before `v1_until_s` (TAI seconds; 0: never), the grace of a rolling upgrade. Without this,
/// a SYN captured once verifies forever from its 4-tuple: a pod that later gets the same IP
/// (pod IPs are recycled) could replay it and pass as the old identity.
#[inline(always)]
fn fresh_enough(version: u8, stamp: u16, now_s: u32, skew_s: u32, v1_until_s: u32) -> bool {
    if version == abi::VERSION_1 {
        return now_s < v1_until_s;
    }
    let skew_s = if skew_s == 0 {
        abi::DEFAULT_SKEW_S
    } else {
        skew_s
    };
    abi::fresh(stamp, abi::stamp(now_s), skew_s)
}

/// The wall-clock time in the identity option's terms ([`abi::seconds`]): CLOCK_TAI less
/// `Config::tai_offset_s` (0 without a `CONFIG` entry). BPF reads no CLOCK_REALTIME.
#[inline(always)]
fn now_seconds() -> u32 {
    let offset = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always valid for reads; one 4-byte load.
        Some(c) => unsafe { read_volatile(&(*c).tai_offset_s) },
        None => 0,
    };
    // SAFETY: no preconditions.
    abi::seconds(unsafe { bpf_ktime_get_tai_ns() }, offset)
}

/// Records a closing connection's option in `SPENT_TAGS` (before its `WIRE_PEERS` record,
/// which stood for it while the connection lived, goes), if a copy of its SYN could still
/// pass the time check: a version 2 or 3 option whose time is within the skew. A version 1
/// option's field is the sender's policy generation, the same for its every connection:
/// spending it would refuse the next connection that reuses the 4-tuple; a connection older
/// than the skew needs no entry (its copies are `stale_tag`), which keeps long-lived
/// connections out of the map.
#[inline(always)]
fn spend(key: &abi::PeerKey, stamp: u16, version: u8) {
    if version == abi::VERSION_1 {
        return;
    }
    let (skew_s, now_s) = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always valid for reads; no preconditions (the helper).
        Some(c) => unsafe {
            (
                read_volatile(&(*c).wire_skew_s),
                abi::seconds(bpf_ktime_get_tai_ns(), read_volatile(&(*c).tai_offset_s)),
            )
        },
        None => return,
    };
    if !fresh_enough(version, stamp, now_s, skew_s, 0) {
        return;
    }
    let at = abi::claimed_seconds(stamp, now_s);
    let spent = abi::SpentKey {
        saddr: key.saddr,
        daddr: key.daddr,
        sport: key.sport,
        dport: key.dport,
        stamp,
        epoch: abi::epoch(at),
    };
    let _ = spend_insert(&spent, at, NO_FLAGS);
}

/// Every write into `SPENT_TAGS` raises its `SPENT_RECENT` slot. A copy that [`spent`] must
/// refuse reads the slot after its own `WIRE_PEERS` insert succeeded, which the bucket lock
/// orders after the removal or replacement of the record that stood for the option, and so
/// after this raise: the raise must come before those (it does: `on_state`, `record_first`).
#[inline(always)]
fn spend_insert(key: &abi::SpentKey, at: u32, flags: u64) -> Result<(), i32> {
    raise_spent_slot(abi::spent_slot(key), at);
    SPENT_TAGS.insert(key, &at, flags)
}

/// `SPENT_RECENT[slot] = max(SPENT_RECENT[slot], at)`, atomically: a compare-and-swap that
/// retries while another CPU raises the same slot. Four lost races in a row (each needs
/// another CPU to write the same one of 16,384 slots in between) end with the slot at
/// `u64::MAX`: looked up for good, never lower than any option it stands for.
#[inline(always)]
fn raise_spent_slot(slot: u32, at: u32) {
    let Some(p) = SPENT_RECENT.get_ptr_mut(slot) else {
        return;
    };
    let at = u64::from(at);
    // SAFETY: an array value pointer, 8-byte aligned, valid while the program runs.
    let mut seen = unsafe { read_volatile(p) };
    for _ in 0..4 {
        if seen >= at {
            return;
        }
        let old = compare_and_swap(p, seen, at);
        if old == seen {
            return;
        }
        seen = old;
    }
    // The fourth lost race may have left the slot at `at` or above (another CPU's raise).
    if seen < at {
        // SAFETY: as above; an aligned 8-byte store (the slot only ever rises).
        unsafe { exchange(p, u64::MAX) };
    }
}

/// `BPF_CMPXCHG` (kernel 5.12+): if `*p == expected`, `*p = new`; returns the old `*p`. In
/// assembly, because LLVM's default BPF CPU (v1) offers no compare-and-swap to Rust (the
/// instruction is the verifier's; see `report::take_slot`'s fetch-add). The instruction
/// compares with and returns into r0.
#[inline(always)]
fn compare_and_swap(p: *mut u64, expected: u64, new: u64) -> u64 {
    let mut old = expected;
    // SAFETY: `p` is an 8-byte aligned map value pointer alive while the program runs (RCU);
    // the instruction reads and writes only those 8 bytes and r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") old,
        );
    }
    old
}

/// `BPF_XCHG` (kernel 5.12+): `*p = new`, atomically.
///
/// SAFETY: `p` must be an 8-byte aligned map value pointer alive while the program runs.
#[inline(always)]
unsafe fn exchange(p: *mut u64, new: u64) {
    // SAFETY: the caller's; the instruction reads and writes only those 8 bytes and its
    // register (the old value, not needed).
    unsafe {
        core::arch::asm!(
            "{v} = xchg_64({p} + 0, {v})",
            p = in(reg) p,
            v = inout(reg) new => _,
        );
    }
}

/// The `SPENT_TAGS` key of this SYN's option: its 4-tuple and whole time (the time nearest
/// this node's clock, [`abi::claimed_seconds`]).
#[inline(always)]
fn spent_key(syn: &Syn, stamp: u16, now_s: u32) -> abi::SpentKey {
    abi::SpentKey {
        saddr: words_to_bytes(syn.saddr),
        daddr: words_to_bytes(syn.daddr),
        sport: syn.sport,
        dport: syn.dport,
        stamp,
        epoch: abi::epoch(abi::claimed_seconds(stamp, now_s)),
    }
}

/// A version 3 SYN's option (4-tuple and whole time) is spent now in `SPENT_TAGS`, once: true
/// for the first SYN to carry it, false for any copy. Used by [`record_first`] when the
/// 4-tuple's `WIRE_PEERS` record is another transmission's. The `BPF_NOEXIST` insert is the
/// test and the record: two copies on two CPUs cannot both pass. When it fails and the key is not there after all (an
/// LRU with no free element this instant, ENOMEM; or evicted since), nothing says the option
/// was taken: it passes and is recorded. (The value is compared, though the key holds the
/// whole time so that no other value can be there: without the comparison LLVM lays the
/// stack out otherwise and the program exceeds 512 bytes.)
#[inline(always)]
fn spend_first(syn: &Syn, stamp: u16, now_s: u32) -> bool {
    let key = spent_key(syn, stamp, now_s);
    let at = abi::claimed_seconds(stamp, now_s);
    if spend_insert(&key, at, BPF_NOEXIST).is_ok() {
        return true;
    }
    match SPENT_TAGS.get_ptr(&key) {
        // SAFETY: a non-null map value pointer is valid for reads.
        Some(seen) if unsafe { read_volatile(seen) } == at => false,
        _ => {
            let _ = spend_insert(&key, at, NO_FLAGS);
            true
        }
    }
}

/// A version 3 SYN that passed every other check takes its option, once, and records its
/// verified identity (`WIRE_PEERS`, as [`remember`]): true for the first SYN to carry the
/// option, false for a copy. The sender stamps each transmission anew, so its own
/// retransmissions are not copies; a SYN the network duplicated is, and is refused (its first
/// copy is already being answered).
///
/// The 4-tuple's record is the option's spent mark while the connection lives: one
/// `BPF_NOEXIST` insert is the test and both records, so that two copies on two CPUs cannot
/// both pass, and the usual SYN (a new 4-tuple) writes one entry (an LRU insert takes an
/// element the map has not touched for long: the costliest step of the check). When the
/// connection closes, [`spend`] moves the option to `SPENT_TAGS`, which is looked in
/// right after the insert ([`spent`]). A 4-tuple with a record already is another transmission of
/// the same time (a copy: false), or of another time: a retransmission with a later time, a
/// late copy of an earlier one, a new connect on a 4-tuple whose handshake never completed,
/// or another network namespace's connection: spent the general way ([`spend_first`]); a
/// record of a handshake that never completed then hands its own option to `SPENT_TAGS`
/// and names the new SYN instead (an accepted record belongs to its live socket and stays).
/// The time compared is the 16-bit field: a record whose time lies 2^16 s away is a live
/// connection of that 4-tuple, which a new SYN could not join anyway.
#[inline(always)]
fn record_first(
    syn: &Syn,
    claimed: u32,
    destination: u32,
    stamp: u16,
    key_id: u8,
    now_s: u32,
) -> bool {
    let key = peer_key(syn);
    let peer = verified_peer(claimed, destination, stamp, key_id, abi::VERSION);
    if WIRE_PEERS.insert(&key, &peer, BPF_NOEXIST).is_ok() {
        // `SPENT_TAGS` is looked in after the insert, not before: a connection of this
        // option that closes meanwhile writes it there before it deletes its entry, so a copy
        // whose insert found the 4-tuple free finds it spent here (looked in before, a copy
        // racing the close could miss both marks).
        if !spent(syn, stamp, now_s) {
            return true;
        }
        // A copy of a closed connection's SYN: the entry it made goes again, if it is still
        // that one.
        if let Some(p) = WIRE_PEERS.get_ptr(&key) {
            // SAFETY: a non-null map value pointer is valid for reads.
            let (state, held) = unsafe { (read_volatile(&(*p).state), read_volatile(&(*p).stamp)) };
            if state == abi::peer_state::VERIFIED && held == stamp {
                let _ = WIRE_PEERS.remove(&key);
            }
        }
        return false;
    }
    let Some(live) = WIRE_PEERS.get_ptr(&key) else {
        // The insert failed and there is no record after all (no free element this
        // instant, or evicted since): spent the general way, and recorded if it can be.
        if !spend_first(syn, stamp, now_s) {
            return false;
        }
        let _ = WIRE_PEERS.insert(&key, &peer, NO_FLAGS);
        return true;
    };
    // SAFETY: a non-null map value pointer is valid for reads.
    let (state, held, held_version) = unsafe {
        (
            read_volatile(&(*live).state),
            read_volatile(&(*live).stamp),
            read_volatile(&(*live).version),
        )
    };
    if (held == stamp && held_version == abi::VERSION) || !spend_first(syn, stamp, now_s) {
        return false;
    }
    if state == abi::peer_state::VERIFIED {
        if held_version == abi::VERSION {
            spend_held(syn, held, now_s);
        }
        let _ = WIRE_PEERS.insert(&key, &peer, NO_FLAGS);
    }
    true
}

/// The `WIRE_PEERS` entry of a SYN whose option verified (`VERIFIED`: no socket yet).
#[inline(always)]
fn verified_peer(claimed: u32, destination: u32, stamp: u16, key_id: u8, version: u8) -> abi::Peer {
    abi::Peer {
        identity: claimed,
        destination,
        stamp,
        key_id,
        state: abi::peer_state::VERIFIED,
        version,
        _pad: [0; 3],
        cookie: 0,
        accepted_ns: 0,
    }
}

/// Hands a replaced version 3 entry's option (the 4-tuple of `syn`, time field `held`) to
/// `SPENT_TAGS`. (Not checked for freshness first: that needs another `CONFIG` read, for
/// which the ingress program has no stack left; a stale entry only waits for the LRU.)
#[inline(always)]
fn spend_held(syn: &Syn, held: u16, now_s: u32) {
    let _ = spend_insert(
        &spent_key(syn, held, now_s),
        abi::claimed_seconds(held, now_s),
        NO_FLAGS,
    );
}

/// This SYN's option (4-tuple and whole time) is in `SPENT_TAGS`: its connection was
/// accepted here and has closed, or (version 3) a SYN with it passed while another
/// transmission held the 4-tuple's `WIRE_PEERS` record, or its unaccepted record was
/// replaced by a later SYN.
#[inline(always)]
fn spent(syn: &Syn, stamp: u16, now_s: u32) -> bool {
    let key = spent_key(syn, stamp, now_s);
    let at = abi::claimed_seconds(stamp, now_s);
    // The filter first: a slot below the option's time has had no entry of that time or
    // later written since the map was made, so this option is not in `SPENT_TAGS`.
    match SPENT_RECENT.get_ptr(abi::spent_slot(&key)) {
        // SAFETY: an array value pointer is valid for reads.
        Some(recent) if unsafe { read_volatile(recent) } < u64::from(at) => return false,
        _ => {}
    }
    match SPENT_TAGS.get_ptr(&key) {
        // SAFETY: a non-null map value pointer is valid for reads.
        Some(seen) => (unsafe { read_volatile(seen) }) == at,
        None => false,
    }
}

/// The claimed identity is quarantined on this node (`IDENTITIES` flags).
#[inline(always)]
fn quarantined(claimed: u32) -> bool {
    match locked::identity_flags(claimed) {
        Some(f) => f & flags::QUARANTINED != 0,
        None => false,
    }
}

#[inline(always)]
fn allowed(claimed: u32, destination: u32, dport: u16) -> bool {
    let mut key = PolicyKey {
        subject: claimed,
        destination,
        dport,
        protocol: IPPROTO_TCP,
        _pad: PAD,
    };
    policy_hit(&INGRESS_ALLOW, &mut key)
}

#[inline(always)]
fn peer_key(syn: &Syn) -> abi::PeerKey {
    abi::PeerKey {
        saddr: words_to_bytes(syn.saddr),
        daddr: words_to_bytes(syn.daddr),
        sport: syn.sport,
        dport: syn.dport,
        _pad: 0,
    }
}

/// How long a reported attempt's retransmissions go unreported, in [`report_time`] units: 128
/// (137 s), the span of a SYN's retransmissions at the default `net.ipv4.tcp_syn_retries`
/// (6: 1 + 2 + ... + 64 = 127 s).
const REPORT_QUIET: u16 = 128;

/// The bits of an `INGRESS_REPORTED` value that name the attempt and its judgment.
const REPORTED_ATTEMPT: u64 = (1 << 48) - 1;

/// CLOCK_MONOTONIC in units of 2^30 ns (1.07 s), modulo 2^16 (19.5 hours).
#[inline(always)]
fn report_time() -> u16 {
    // SAFETY: no preconditions.
    (unsafe { bpf_ktime_get_ns() } >> 30) as u16
}

/// False for a retransmission of a SYN already reported with this verdict and reason within
/// [`REPORT_QUIET`], or its handshake's ACK (`Syn::seq`; see `INGRESS_REPORTED`).
#[inline(always)]
fn first_report(syn: &Syn, verdict: u8, reason: u8) -> bool {
    let key = peer_key(syn);
    let now = report_time();
    let seen = syn.seq as u64 | (verdict as u64) << 32 | (reason as u64) << 40 | (now as u64) << 48;
    if let Some(last) = INGRESS_REPORTED.get_ptr(&key) {
        // SAFETY: a non-null map value pointer is valid for reads.
        let last = unsafe { *last };
        if last & REPORTED_ATTEMPT == seen & REPORTED_ATTEMPT
            && now.wrapping_sub((last >> 48) as u16) < REPORT_QUIET
        {
            return false;
        }
    }
    let _ = INGRESS_REPORTED.insert(&key, &seen, NO_FLAGS);
    true
}

/// The verified identity of an allowed SYN, for `enforcer flows --to` and the DB operator.
/// A SYN for the 4-tuple of a connection already accepted (a replay, or a stray duplicate)
/// leaves that record alone: the record belongs to the live socket, which ends it.
#[inline(always)]
fn remember(
    syn: &Syn,
    claimed: u32,
    destination: u32,
    stamp: u16,
    key_id: u8,
    version: u8,
    now_s: u32,
) {
    let key = peer_key(syn);
    if let Some(live) = WIRE_PEERS.get_ptr(&key) {
        // SAFETY: a non-null map value pointer is valid for reads.
        let (state, held, held_version) = unsafe {
            (
                read_volatile(&(*live).state),
                read_volatile(&(*live).stamp),
                read_volatile(&(*live).version),
            )
        };
        if state == abi::peer_state::ACCEPTED {
            return;
        }
        // A version 3 entry is its option's spent mark: handed to `SPENT_TAGS` before it is
        // replaced (a node sending both versions on one 4-tuple in a rolling upgrade).
        if held_version == abi::VERSION {
            spend_held(syn, held, now_s);
        }
    }
    let peer = verified_peer(claimed, destination, stamp, key_id, version);
    let _ = WIRE_PEERS.insert(&key, &peer, NO_FLAGS);
}

/// Reports one ingress deny or audit (the shared path: `crate::report::emit`): no task
/// context here.
#[inline(always)]
fn emit_ingress(
    ctx: &SkBuffContext,
    syn: &Syn,
    claimed: u32,
    destination: u32,
    verdict: u8,
    reason: u8,
    generation: u32,
) {
    crate::report::emit(&crate::report::Report {
        // SAFETY: the skb pointer is the program's context.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        pid_tgid: 0,
        subject: claimed,
        destination,
        daddr: syn.dst.addr,
        family: syn.dst.family,
        dport: syn.dport,
        protocol: IPPROTO_TCP,
        hook: hook::INGRESS,
        verdict,
        reason,
        generation,
        sock_type: syn.sport,
        sock_protocol: 0,
        peer: syn.src.addr,
        task: false,
    });
}

//! The enforcer's kernel programs: one egress decision per `connect()` / `sendmsg()`.
//!
//! Four cgroup `sock_addr` programs (`connect4`, `connect6`, `sendmsg4`, `sendmsg6`) call one
//! shared, always-inlined [`decide`], which runs DESIGN.md's decision procedure: a fixed,
//! bounded sequence of map lookups with no loops. Two more (`bind4`, `bind6`,
//! [`judge_bind`]) refuse binding another identity's address. `cgroup/sock_create`
//! ([`sock_create`]), refuses the inet sockets those four never see (ping, raw, other
//! protocols), so that every packet a workload can send is judged or refused. `sock_ops` and
//! `cgroup_skb/ingress` ([`wire`]) write and check the identity option on the SYNs of flows
//! to tagged destinations (vector DBs, ingress-checked endpoints). Every verdict is
//! counted in `VERDICTS`; every deny (and audit) goes through [`report::emit`]: one `DenyEvent`
//! to `EVENTS`, or, within its key's aggregation window, one more count in `AGGREGATE` that
//! the agent reports; `LOST_EVENTS` counts what neither could hold. Nothing is dropped
//! silently.
//!
//! The map and struct definitions are the ABI of `enforcer-common`; every map is pinned by name
//! so that a restarted agent adopts the maps the running programs use.
//!
//! Verifier notes (why some code looks odd):
//! - Context fields are read with `read_volatile` so that LLVM keeps them 32-bit loads: the
//!   verifier rejects narrowed loads of some `bpf_sock_addr` fields (e.g. `protocol`).
//! - Structs are never copied or zeroed as a whole (that becomes memcpy/memset calls the
//!   verifier rejects): map values are read field by field through their pointer, and the
//!   event is written field by field into the reserved ring-buffer slot.
#![no_std]
#![no_main]
// `atomic_xadd`: the per-tenant flow counters (flows.rs) and the deny aggregation
// (report.rs) need an atomic add, which the BPF target's core atomics do not offer.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// report.rs takes its budget slots with the fetch form of that add, in assembly.
#![feature(asm_experimental_arch)]

mod flows;
mod locked;
mod martian;
mod rate;
mod report;
mod skb;
mod wire;

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use enforcer_common::{
    capacity, entry, flags, hook, identity, proto, reason, verdict, verdict_counter_index, Config,
    PolicyKey, PolicyValue, NO_CLASS, VERDICT_COUNTERS,
};

// ---------------------------------------------------------------------------------------------
// Maps (names exactly as `enforcer_common::maps`; all pinned by name).
// ---------------------------------------------------------------------------------------------

/// No `BPF_F_*` creation flags (the LPM trie adds its mandatory `BPF_F_NO_PREALLOC` itself).
const NO_MAP_FLAGS: u32 = 0;
/// Memory as entries are added, not all of it at creation: the host IP caches are sized for
/// large clusters (and IPv6 is often unused), so preallocating would cost ~40 MiB up front.
/// Lookups cost the same; only inserts allocate.
const BPF_F_NO_PREALLOC: u32 = 1;

// `CGROUP_IDENTITY` and `IDENTITIES` are in `locked` (read under their values' spin lock).

/// IPv4 host address (network byte order) -> destination identity. Pods have host
/// addresses: a hash lookup finds them in a fraction of a trie walk, and a /32 is always the
/// longest prefix, so trying it first changes no answer.
#[map]
static IPCACHE_HOST_V4: HashMap<[u8; 4], u32> =
    HashMap::pinned(capacity::IPCACHE, BPF_F_NO_PREALLOC);

/// IPv6 host address (network byte order) -> destination identity.
#[map]
static IPCACHE_HOST_V6: HashMap<[u8; 16], u32> =
    HashMap::pinned(capacity::IPCACHE, BPF_F_NO_PREALLOC);

/// IPv4 prefix (network byte order) -> destination identity.
#[map]
static IPCACHE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(capacity::IPCACHE, NO_MAP_FLAGS);

/// IPv6 prefix (network byte order) -> destination identity.
#[map]
static IPCACHE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(capacity::IPCACHE, NO_MAP_FLAGS);

/// The two policy tables; `Config::active_policy` names the one in force (atomic swap).
#[map]
static POLICY_A: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, NO_MAP_FLAGS);
#[map]
static POLICY_B: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, NO_MAP_FLAGS);

/// Index of the single `Config` entry (and of the single `LOST_EVENTS` counter).
const SINGLE_ENTRY: u32 = 0;
const SINGLE_ENTRY_COUNT: u32 = 1;

#[map]
static CONFIG: Array<Config> = Array::pinned(SINGLE_ENTRY_COUNT, NO_MAP_FLAGS);

/// Deny/audit events; userspace may resize it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, NO_MAP_FLAGS);

/// Events that did not fit in `EVENTS` (per CPU; userspace sums the CPUs).
#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(SINGLE_ENTRY_COUNT, NO_MAP_FLAGS);

/// One counter per (hook, verdict, reason), see `verdict_counter_index`.
#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(VERDICT_COUNTERS, NO_MAP_FLAGS);

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// Return values of a cgroup sock_addr program.
const SK_PASS: i32 = 1;
/// The caller's `connect()` / `sendmsg()` fails with EPERM.
const SK_DROP: i32 = 0;

/// `Config::active_policy` value selecting `POLICY_A` (any other value selects `POLICY_B`).
const ACTIVE_POLICY_A: u32 = 0;
/// `Config::audit` value meaning "enforce".
const AUDIT_OFF: u32 = 0;

/// `PolicyKey::dport` of an any-port entry.
const ANY_PORT: u16 = 0;
/// Padding bytes of `PolicyKey` and `DenyEvent`: always zero.
const PAD: u8 = 0;
/// `IdentityInfo::tenant` of identities without a tenant (WORLD, HOST).
const NO_TENANT: u32 = 0;

/// `DenyEvent::family` values.
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Full-length prefixes: an LPM lookup key is a host address.
const V4_PREFIX_BITS: u32 = 32;
const V6_PREFIX_BITS: u32 = 128;

/// Third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in host order.
const V4_MAPPED_WORD2: u32 = 0x0000_ffff;
const ZERO_WORD: u32 = 0;

/// Where the kernel sends an unspecified destination when nothing else decides it: 127.0.0.1
/// (`ip_route_output_key_hash_rcu`: "connect() to INADDR_ANY means loopback") and ::1
/// (`tcp_v6_connect`, `__ip6_datagram_connect`, `udpv6_sendmsg`), as address words in memory
/// (network) order.
const LOOPBACK_V4_WORD: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_WORD3: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
/// `bpf_sock::bound_dev_if` of a socket bound to no device.
const NO_DEVICE: u32 = 0;

/// `bpf_sock::family` values.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `bpf_sock::type_` values.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Protocols the sock_addr hooks judge (`bpf_sock::protocol`, full width).
const IPPROTO_TCP: u32 = proto::TCP as u32;
const IPPROTO_UDP: u32 = proto::UDP as u32;
/// Multipath TCP: its subflows are TCP sockets whose `connect()` runs `connect4`/`connect6`
/// with protocol TCP (verified by the bypass tests), so it is judged like TCP.
const IPPROTO_MPTCP: u32 = 262;
/// Return values of a cgroup sock program (sock_create): allow, or fail `socket()` with EPERM.
const SOCK_ALLOW: i32 = 1;
const SOCK_REFUSE: i32 = 0;
/// `DenyEvent::sock_type` / `sock_protocol` of the sock_addr hooks' events.
const NO_SOCKET_INFO: u16 = 0;

/// What a sock_ops program returns (the verifier requires 1).
const SOCK_OPS_DONE: u32 = 1;

/// `report`'s audit argument for denies that audit mode must not soften (quarantine).
const NEVER_AUDIT: bool = false;

/// Flags of the ring-buffer helpers: 0 = default wake-up policy.
const RINGBUF_FLAGS: u64 = 0;

// ---------------------------------------------------------------------------------------------
// Programs: thin wrappers, so each gets its own constant-folded copy of `decide`.
// ---------------------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    flows::forget_unsent(&ctx);
    decide(&ctx, hook::CONNECT4, FAMILY_V4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    flows::forget_unsent(&ctx);
    decide(&ctx, hook::CONNECT6, FAMILY_V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, hook::SENDMSG4, FAMILY_V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, hook::SENDMSG6, FAMILY_V6)
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    judge_bind(&ctx, hook::BIND4, FAMILY_V4)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    judge_bind(&ctx, hook::BIND6, FAMILY_V6)
}

/// Runs when an inet socket of the subtree is released (its last file reference closed): ends
/// a connected UDP socket's flow record (TCP records end at the TCP CLOSE state, later).
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    flows::on_release(&ctx);
    SOCK_ALLOW
}

/// Runs at `socket()` for AF_INET and AF_INET6 (the kernel calls the hook from `inet_create` /
/// `inet6_create` only, and not for kernel sockets): TCP, MPTCP and UDP pass, since the
/// sock_addr hooks judge every one of their destinations; every other kind (ICMP and ICMPv6
/// "ping" datagram sockets, `SOCK_RAW`, UDP-Lite, SCTP...) sends packets no sock_addr hook
/// ever sees, so a managed workload may not create it.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    judge_socket(&ctx)
}

/// `sock_ops` operations (`enum bpf_sock_ops_op` in the uapi; bindgen leaves them unnamed).
mod sock_ops_op {
    pub const TCP_CONNECT_CB: u32 = 3;
    pub const ACTIVE_ESTABLISHED_CB: u32 = 4;
    pub const PASSIVE_ESTABLISHED_CB: u32 = 5;
    pub const STATE_CB: u32 = 10;
    pub const HDR_OPT_LEN_CB: u32 = 14;
    pub const WRITE_HDR_OPT_CB: u32 = 15;
}

/// The `sock_ops` dispatcher. Only one sock_ops program can be attached per cgroup here
/// (DESIGN.md), so each concern's callbacks live in their own module and are routed here by
/// operation: flow records (`flows`) and the identity option (`wire`). Both only OR their
/// callback flags into the socket's current ones (or clear their own), so the order of the
/// two calls does not matter. Always returns 1 (the kernel treats the return value as the
/// callback's reply only for operations that ask for one: none of these).
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    use sock_ops_op::*;
    match ctx.op() {
        TCP_CONNECT_CB => {
            // A tracked flow's identity option lives in its record.
            let record = flows::on_connect(&ctx);
            wire::on_connect(&ctx, record);
        }
        ACTIVE_ESTABLISHED_CB => {
            flows::on_established(&ctx);
            wire::on_established(&ctx);
        }
        PASSIVE_ESTABLISHED_CB => {
            // Before `wire`, which asks an accepted socket for state callbacks.
            flows::on_passive_established(&ctx);
            wire::on_passive_established(&ctx);
        }
        STATE_CB => {
            if let Some(last_sent) = flows::on_state(&ctx) {
                wire::keep_time(&ctx, last_sent);
            }
            wire::on_state(&ctx);
        }
        HDR_OPT_LEN_CB => wire::on_hdr_opt_len(&ctx),
        WRITE_HDR_OPT_CB => wire::on_write_hdr_opt(&ctx),
        _ => {}
    }
    SOCK_OPS_DONE
}

/// `cgroup_skb/ingress` on the enforced subtree: the index's check of the identity option on
/// SYNs to local destinations (`wire::ingress`). 1 passes the packet, 0 drops it.
#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    wire::ingress(&ctx)
}

/// `cgroup_skb/egress` on the enforced subtree: drops a pod's packet to a loopback address
/// that leaves through a device, and judges one that netfilter sent elsewhere than its call
/// was judged (`martian::egress`). 1 passes the packet, 0 drops it.
#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    martian::egress(&ctx)
}

// ---------------------------------------------------------------------------------------------
// The decision procedure
// ---------------------------------------------------------------------------------------------

/// The destination of the call, as the hook reports it.
pub(crate) struct Destination {
    /// Address words exactly as in `bpf_sock_addr` (network byte order in memory); for
    /// family 4 only `addr[0]` is used and the others are zero.
    pub(crate) addr: [u32; 4],
    /// 4 or 6: an IPv4-mapped IPv6 destination is reported (and looked up) as IPv4.
    pub(crate) family: u8,
}

/// Everything an event needs besides the task context.
struct Verdict {
    subject: u32,
    destination: u32,
    dport: u16,
    protocol: u8,
    verdict: u8,
    reason: u8,
    /// `Config::generation` read with the active index: names the policy that decided.
    generation: u32,
    /// sock_create only: the refused socket's type and protocol.
    sock_type: u16,
    sock_protocol: u16,
}

/// `*counter += n`, atomically (`lock *(u64 *)(r + off) += r`), its result unused:
/// `AtomicU64::fetch_add` is not offered on the BPF target (no compare-and-swap before cpu
/// v3), the intrinsic under it is, and an add whose old value is unused is the original BPF
/// atomic every kernel has. `n = u64::MAX` subtracts one.
#[inline(always)]
fn atomic_add(counter: *mut u64, n: u64) {
    // SAFETY: callers pass a valid, 8-byte aligned map value pointer, which lives while the
    // program runs (RCU).
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}

/// The address of a sock_addr call (`user_ip4` / `user_ip6`): the destination of a connect
/// or send, the address of a bind. A dual-stack socket's `::ffff:a.b.c.d` is the IPv4
/// address it really is: connect6, sendmsg6 and bind6 see it, never their IPv4 twins, and it
/// would otherwise bypass the IPv4 IP cache. The first compare is the only one most IPv6
/// addresses pay.
///
/// SAFETY: `sa` must be the program's context; full 32-bit loads only.
#[inline(always)]
unsafe fn requested_address(sa: *const bpf_sock_addr, family: u8) -> Destination {
    if family == FAMILY_V4 {
        return Destination {
            addr: [
                read_volatile(&(*sa).user_ip4),
                ZERO_WORD,
                ZERO_WORD,
                ZERO_WORD,
            ],
            family: FAMILY_V4,
        };
    }
    six_or_mapped([
        read_volatile(&(*sa).user_ip6[0]),
        read_volatile(&(*sa).user_ip6[1]),
        read_volatile(&(*sa).user_ip6[2]),
        read_volatile(&(*sa).user_ip6[3]),
    ])
}

/// IPv6 address words (memory order) as looked up: an IPv4-mapped one as its IPv4 address.
#[inline(always)]
fn six_or_mapped(w: [u32; 4]) -> Destination {
    if w[0] == ZERO_WORD && w[1] == ZERO_WORD && u32::from_be(w[2]) == V4_MAPPED_WORD2 {
        Destination {
            addr: [w[3], ZERO_WORD, ZERO_WORD, ZERO_WORD],
            family: FAMILY_V4,
        }
    } else {
        Destination {
            addr: w,
            family: FAMILY_V6,
        }
    }
}

/// Whether `dst` is a loopback address: `127.0.0.0/8` (an IPv4-mapped one is looked up as
/// IPv4, see `six_or_mapped`) or `::1`.
#[inline(always)]
fn is_loopback(dst: &Destination) -> bool {
    if dst.family == FAMILY_V4 {
        return dst.addr[0].to_ne_bytes()[0] == 127;
    }
    dst.addr[0] == ZERO_WORD
        && dst.addr[1] == ZERO_WORD
        && dst.addr[2] == ZERO_WORD
        && dst.addr[3] == LOOPBACK_V6_WORD3
}

/// Whether the calling socket is bound to no device and its network namespace is known not
/// to be the node's (`Config::node_netns_cookie`, the agent's own; 0 = not known: false).
#[inline(always)]
fn outside_node_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: `sk` is always set for sock_addr programs; one 8-byte load, then a full 32-bit
    // field load.
    let device = unsafe {
        let sk: *const bpf_sock = read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk).cast_const();
        read_volatile(&(*sk).bound_dev_if)
    };
    if device != NO_DEVICE {
        return false;
    }
    let node = match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads.
        Some(c) => unsafe { read_volatile(&(*c).node_netns_cookie) },
        None => 0,
    };
    // SAFETY: the program's context; `bpf_get_netns_cookie` takes it for sock_addr programs
    // (the socket's namespace).
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != node
}

/// Global audit mode and the policy revision in force, from `CONFIG`; a missing entry (cannot
/// happen for index 0) means enforcing with `POLICY_A`. One aligned 8-byte load gives both the
/// table and the revision: userspace keeps the generation's parity equal to the active table,
/// so the pair can never be read torn (CONFIG is rewritten with a memcpy, which is not atomic
/// across fields).
#[inline(always)]
fn audit_and_generation() -> (bool, u64) {
    let (audit, generation, _) = judged_under();
    (audit, generation)
}

/// [`audit_and_generation`] and `CONFIG.flags_revision` (see `martian::connected_datagram`),
/// from one lookup of the entry; 0 without one. Read before any identity: the agent writes an
/// identity's flags before it advances the revision.
#[inline(always)]
fn judged_under() -> (bool, u64, u32) {
    match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads.
        Some(c) => unsafe {
            (
                read_volatile(&(*c).audit) != AUDIT_OFF,
                read_volatile(&(*c).generation),
                read_volatile(&(*c).flags_revision),
            )
        },
        None => (false, 0, 0),
    }
}

/// `CONFIG.socket_lb` (see `martian::connected_datagram`); false without an entry.
#[inline(always)]
fn socket_lb() -> bool {
    match CONFIG.get_ptr(SINGLE_ENTRY) {
        // SAFETY: array values are always present and valid for reads.
        Some(c) => unsafe { read_volatile(&(*c).socket_lb) != 0 },
        None => false,
    }
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, hook: u8, family: u8) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel hands the program; every field read is a
    // full 32-bit load (volatile, so LLVM cannot narrow it: the verifier rejects narrow loads
    // of `protocol`).
    let (mut dst, user_port, protocol) = unsafe {
        (
            requested_address(sa, family),
            read_volatile(&(*sa).user_port),
            read_volatile(&(*sa).protocol),
        )
    };
    // `user_port` holds the port in network byte order in its low 16 bits.
    let dport = u16::from_be(user_port as u16);
    let full_protocol = protocol;
    let protocol = protocol as u8;

    // Before any identity is read: a UDP connect's call is kept under the revision
    // (`martian::connect`).
    let (global_audit, generation, flags_revision) = judged_under();
    let judged_under = (generation, flags_revision);
    let active_policy = (generation & 1) as u32;
    let generation = generation as u32;

    let mut v = Verdict {
        subject: identity::UNKNOWN,
        destination: identity::UNKNOWN,
        dport,
        protocol,
        verdict: verdict::DENY,
        reason: reason::UNKNOWN_SUBJECT,
        generation,
        sock_type: NO_SOCKET_INFO,
        sock_protocol: NO_SOCKET_INFO,
    };

    // A datagram sent from an address of another identity (`IP_PKTINFO`'s source): its
    // receiver, and every reply, would take it for that identity. Checked first, because a
    // connected socket's send with control messages comes with no address (passed below).
    // A source equal to the socket's bound address was judged by bind4/bind6 and costs no
    // lookup here.
    if hook == hook::SENDMSG4 || hook == hook::SENDMSG6 {
        if let Some(source) = chosen_source(ctx, hook) {
            let (holder, exact) = lookup_address(&source);
            if let Some(owner) = address_owner(holder, exact) {
                // SAFETY: no preconditions.
                let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
                if foreign(locked::subject_of(cgroup_id), owner) {
                    v.reason = reason::FOREIGN_ADDRESS;
                    v.destination = owner;
                    return refuse_call(&mut v, &source, hook, global_audit);
                }
            }
        }
    }

    // The unspecified address is not where the packet goes: the kernel routes it to a local
    // address after this hook (see `unspecified`). Judge that address instead, or refuse the
    // call when the hook cannot know it. One compare on the common path: the first word.
    if dst.addr[0] == ZERO_WORD && is_unspecified(&dst) {
        // A send with no address at all: a connected UDP socket whose sendmsg() carries
        // control messages (IP_TOS, IP_PKTINFO...), for which the kernel runs the sendmsg
        // hook with an empty address (0.0.0.0:0 / [::]:0). A given address never has port 0
        // here (udp_sendmsg / udpv6_sendmsg return EINVAL first), and the datagram goes to
        // the connected address, which connect4/6 judged; without control messages the
        // kernel does not call the hook at all. Judging 0.0.0.0 / :: instead refused (or
        // judged as ::1) a send the connect allowed.
        if (hook == hook::SENDMSG4 || hook == hook::SENDMSG6) && dport == ANY_PORT {
            return SK_PASS;
        }
        match unspecified(sa, hook, dst.family, full_protocol) {
            Some(effective) => dst = effective,
            None => {
                v.reason = reason::UNSPECIFIED_DESTINATION;
                return refuse_call(&mut v, &dst, hook, global_audit);
            }
        }
    }

    // 2. destination identity (computed first: every event reports it).
    v.destination = lookup_destination(&dst);
    let destination = v.destination;

    // 1. subject identity; fail closed when the cgroup or the identity is unknown.
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let subject = locked::subject_of(cgroup_id).unwrap_or(identity::UNKNOWN);
    // The classes of the table read below (slot 0 goes with POLICY_A): written into the
    // standby slot before the flip that makes that table active, so the pair and the table
    // always come from one revision.
    let slot_b = active_policy != ACTIVE_POLICY_A;
    let subject_info = if subject == identity::UNKNOWN {
        None
    } else {
        locked::identity_info(subject, slot_b)
    };
    let Some(info) = subject_info else {
        // Unknown subject (no cgroup entry, or an identity without IDENTITIES entry): reported
        // as subject UNKNOWN; only global audit can let it through.
        return report(&mut v, &dst, cgroup_id, hook, global_audit);
    };
    v.subject = subject;
    let (subject_flags, subject_tenant) = (info.flags, info.tenant);

    // A pod's TCP connect to its own loopback: in its own network namespace nothing but the
    // pod answers there (its containers, a sidecar), so it is no call between workloads, as
    // traffic that never leaves a pod is none to Cilium. Judged as World's address it broke
    // every sidecar (Envoy's inbound to the app at 127.0.0.6, an app's call to its local
    // Dapr or exporter) unless the pod could reach the internet too. Only where the socket is
    // not in the node's namespace: a label set with a `hostNetwork` pod, or a process that
    // entered the node's namespace, reaches the node's listeners at loopback (judged below,
    // and again at the listener by `skb_ingress`). TCP only, bound to no device: a
    // device-bound socket sends 127.0.0.1 out of the pod (the node's `route_localnet`,
    // which kube-proxy sets, then takes it), and a datagram socket can be bound to one, or
    // given an interface by a control message, after this hook.
    let own_loopback = subject_flags & (flags::OWN_NETNS | flags::SHARED_NETNS) == flags::OWN_NETNS
        && (hook == hook::CONNECT4 || hook == hook::CONNECT6)
        && full_protocol == IPPROTO_TCP
        && is_loopback(&dst)
        && outside_node_netns(ctx);

    // 3. to 6. (`rule`). A would-deny that audit lets through goes on to its flow record
    // (`audited`: the reason it is reported with), not charged to any rate limit.
    let (destination_flags, mut audited) = match rule(
        slot_b,
        &info,
        destination,
        dport,
        protocol,
        global_audit,
        own_loopback,
    ) {
        Ruling::Unjudged => {
            count(hook, verdict::ALLOW, reason::ALLOWED);
            return SK_PASS;
        }
        Ruling::Permitted(destination_flags) => (destination_flags, NOT_AUDITED),
        Ruling::Refused {
            reason,
            audit,
            destination_flags,
        } => {
            if !audit {
                v.reason = reason;
                return report(&mut v, &dst, cgroup_id, hook, false);
            }
            (destination_flags, reason)
        }
    };
    // Rate limit (connect only: a connection budget; unconnected datagrams are not
    // connections). Before the flow record, so a refused call leaves none. Audit mode
    // lets the excess through as audit, like any would-deny.
    if audited == NOT_AUDITED
        && (hook == hook::CONNECT4 || hook == hook::CONNECT6)
        && !rate::admit(subject, subject_tenant, destination)
    {
        if !(global_audit || subject_flags & flags::AUDIT != 0) {
            v.reason = reason::RATE_LIMITED;
            return report(&mut v, &dst, cgroup_id, hook, false);
        }
        // Let through by audit: a flow like any other audited one (review 41).
        audited = reason::RATE_LIMITED;
    }
    // Flow records: only connect (sendmsg's unconnected datagrams have no flow, only a
    // contact for the learner), TCP or UDP, to a tracked destination (the flags copied with
    // the class above: one consistent value, 0 without one). An audited connect too: audit
    // is how a policy is rolled out, and a flow it let through must be listed, and reset by
    // the revocation pass once audit is lifted and the policy denies it (review 40; the
    // agent keeps it while audit lasts).
    let connecting = hook == hook::CONNECT4 || hook == hook::CONNECT6;
    if destination_flags & flags::TRACKED != 0 {
        let c = flows::Connect {
            subject,
            destination,
            daddr: dst.addr,
            dport,
            family: dst.family,
            protocol,
            generation,
            tenant: subject_tenant,
            cgroup_id,
            sock_v6: hook == hook::CONNECT6 || hook == hook::SENDMSG6,
            untagged: destination_flags & flags::SERVICE != 0,
        };
        if !connecting {
            // A datagram naming a tracked destination (sendmsg4/6): no flow, but a contact
            // for the learner; one that cannot be kept is refused, fail closed (never
            // audited through: it would reach its dataset unseen).
            if !flows::datagram_contact(ctx, &c) {
                v.reason = reason::FLOW_TABLE_FULL;
                return report(&mut v, &dst, cgroup_id, hook, NEVER_AUDIT);
            }
        } else if (full_protocol == IPPROTO_TCP || full_protocol == IPPROTO_UDP)
            && !flows::record_connect(ctx, &c, full_protocol == IPPROTO_UDP)
        {
            // An untracked flow to a tracked destination could never be revoked:
            // fail closed (never audited through).
            v.reason = reason::FLOW_TABLE_FULL;
            return report(&mut v, &dst, cgroup_id, hook, NEVER_AUDIT);
        }
    } else if connecting && full_protocol == IPPROTO_UDP {
        // A connected UDP socket that leaves a tracked destination for an untracked one.
        flows::connected_elsewhere(ctx, hook == hook::CONNECT6);
    }
    if connecting && full_protocol == IPPROTO_UDP {
        // SAFETY: `sock_addr` is the context; `sk` is a pointer-sized context field.
        let sk = unsafe { read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) };
        martian::connect(sk, &dst, dport, destination_flags, judged_under);
    }
    if audited != NOT_AUDITED {
        v.reason = audited;
        return report(&mut v, &dst, cgroup_id, hook, true);
    }
    count(hook, verdict::ALLOW, reason::ALLOWED);
    SK_PASS
}

/// How a known subject's call stands after the steps every hook that judges calls shares
/// (`decide`, and `martian::egress` for a rewritten packet).
enum Ruling {
    /// Not judged: the agent itself, or a pod's call to its own loopback.
    Unjudged,
    /// Permitted by the table in force; the destination's flags (0 without an `IDENTITIES`
    /// entry).
    Permitted(u32),
    /// Refused for `reason`; `audit` lets it through, reported. The destination's flags as
    /// for `Permitted` (0 for a quarantined subject, refused before any lookup).
    Refused {
        reason: u8,
        audit: bool,
        destination_flags: u32,
    },
}

/// `decide`'s `audited` for a call no audit let through: no reason is 0 but `ALLOWED`.
const NOT_AUDITED: u8 = reason::ALLOWED;

/// Steps 3 to 6 of the decision, for a known subject (`subject`, its classes those of the
/// table `slot_b` names) calling `destination` on (`dport`, host order; `protocol`);
/// `own_loopback`: the call is a pod's to its own loopback (see `decide`), which the table
/// does not judge.
#[inline(always)]
fn rule(
    slot_b: bool,
    subject: &locked::Identity,
    destination: u32,
    dport: u16,
    protocol: u8,
    global_audit: bool,
    own_loopback: bool,
) -> Ruling {
    // The agent itself: never judged, or it could lock itself out of the API server and the
    // PDP it learns every identity from.
    if subject.flags & flags::EXEMPT != 0 {
        return Ruling::Unjudged;
    }
    // 3. quarantine: deny, never softened by audit.
    if subject.flags & flags::QUARANTINED != 0 {
        return Ruling::Refused {
            reason: reason::QUARANTINED,
            audit: NEVER_AUDIT,
            destination_flags: 0,
        };
    }
    if own_loopback {
        return Ruling::Unjudged;
    }
    // 4. and 5. (`judge_policy`): the table in force, or why not.
    match judge_policy(slot_b, subject, destination, dport, protocol) {
        Ok(destination_flags) => Ruling::Permitted(destination_flags),
        // 6. audit (global or per subject) lets a would-deny through, reported.
        Err((reason, destination_flags)) => Ruling::Refused {
            reason,
            audit: global_audit || subject.flags & flags::AUDIT != 0,
            destination_flags,
        },
    }
}

/// Steps 4 and 5 of the decision, for a known subject (`subject`, its classes those of the
/// table `slot_b` names) calling `destination` on (`dport`, host order; `protocol`): `Ok`
/// with the destination's flags (0 without an `IDENTITIES` entry) when the table in force
/// permits it, exact port then any port (a destination without an entry is in no class:
/// denied); else `Err` with the reason (an address the agent refused to identify, tenants
/// differ, or simply no permit) and the destination's flags. (No policy entry names
/// UNIDENTIFIED: the lookup denies it, this only names the reason.)
#[inline(always)]
fn judge_policy(
    slot_b: bool,
    subject: &locked::Identity,
    destination: u32,
    dport: u16,
    protocol: u8,
) -> Result<u32, (u8, u32)> {
    let destination_info = locked::identity_info(destination, slot_b);
    let (destination_class, destination_flags) = match &destination_info {
        Some(d) => (d.destination_class, d.flags),
        None => (NO_CLASS, 0),
    };
    if permits(
        slot_b,
        subject.subject_class,
        destination_class,
        dport,
        protocol,
    ) {
        return Ok(destination_flags);
    }
    let reason = if destination == identity::UNIDENTIFIED {
        reason::UNIDENTIFIED_DESTINATION
    } else {
        denial_reason(destination_info.as_ref(), subject.tenant)
    };
    Err((reason, destination_flags))
}

/// Step 4 of the decision: whether the table in force (`slot_b`: `POLICY_B`, else `POLICY_A`)
/// permits a subject of class `subject_class` to call a destination of class
/// `destination_class` on (`dport`, host order; `protocol`): exact port, then any port.
#[inline(always)]
fn permits(
    slot_b: bool,
    subject_class: u32,
    destination_class: u32,
    dport: u16,
    protocol: u8,
) -> bool {
    let mut key = PolicyKey {
        subject: subject_class,
        destination: destination_class,
        dport,
        protocol,
        _pad: PAD,
    };
    if slot_b {
        policy_hit(&POLICY_B, &mut key)
    } else {
        policy_hit(&POLICY_A, &mut key)
    }
}

/// Step 5: why a call the table does not permit is denied: the destination (`None`: it has
/// no `IDENTITIES` entry) is of another tenant than `subject_tenant`, or simply no permit.
#[inline(always)]
fn denial_reason(destination: Option<&locked::Identity>, subject_tenant: u32) -> u8 {
    match destination {
        Some(d) if d.tenant != NO_TENANT && d.tenant != subject_tenant => reason::TENANT_MISMATCH,
        _ => reason::NO_PERMIT,
    }
}

/// The bind decision. An address another identity holds as its own ([`address_owner`]: an
/// exact address of a workload or endpoint) may not be bound by a subject of another
/// identity (see [`foreign`]): in a shared network
/// namespace (bare hosts with an inventory, `hostNetwork` pods) the socket would receive what
/// callers address to that identity, judged as a call to it. Refused with reason
/// `foreign_address`, the owner as the event's destination. The wildcard (`0.0.0.0`, `::`)
/// and every other address (WORLD, a prefix, a Service's) pass: they impersonate no one (a wildcard listener that receives another identity's SYNs is refused at ingress,
/// `wire::ingress`). Audit mode lets it through as audit; a quarantined subject is refused
/// even then (`refuse`).
#[inline(always)]
fn judge_bind(ctx: &SockAddrContext, hook: u8, family: u8) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the program's context; full 32-bit loads.
    let (address, user_port, protocol) = unsafe {
        (
            requested_address(sa, family),
            read_volatile(&(*sa).user_port),
            read_volatile(&(*sa).protocol),
        )
    };
    if address.addr[0] == ZERO_WORD && is_unspecified(&address) {
        count(hook, verdict::ALLOW, reason::ALLOWED);
        return SK_PASS;
    }
    let (holder, exact) = lookup_address(&address);
    let Some(owner) = address_owner(holder, exact) else {
        count(hook, verdict::ALLOW, reason::ALLOWED);
        return SK_PASS;
    };
    // SAFETY: no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !foreign(locked::subject_of(cgroup_id), owner) {
        count(hook, verdict::ALLOW, reason::ALLOWED);
        return SK_PASS;
    }
    let (global_audit, generation) = audit_and_generation();
    let mut v = Verdict {
        subject: identity::UNKNOWN,
        destination: owner,
        // `user_port` holds the port in network byte order in its low 16 bits.
        dport: u16::from_be(user_port as u16),
        protocol: protocol as u8,
        verdict: verdict::DENY,
        reason: reason::FOREIGN_ADDRESS,
        generation: generation as u32,
        sock_type: NO_SOCKET_INFO,
        sock_protocol: NO_SOCKET_INFO,
    };
    refuse_call(&mut v, &address, hook, global_audit)
}

/// Whether `subject` (a cgroup's identity, `None` for a cgroup of no identity) would use an
/// address that `owner`, another identity, holds. A cgroup of no identity may: its own calls
/// are all denied (`unknown_subject`), and it is where an inventory's endpoints are served
/// from (an endpoint has addresses, not cgroups); only a process that may write a cgroup's
/// `cgroup.procs` can move into one.
#[inline(always)]
pub(crate) fn foreign(subject: Option<u32>, owner: u32) -> bool {
    matches!(subject, Some(s) if s != owner)
}

/// The source a sendmsg4/sendmsg6 call chose, when it differs from the socket's bound address
/// (`msg_src_ip4` / `msg_src_ip6`: the bound source, or `IP_PKTINFO`'s / `IPV6_PKTINFO`'s);
/// `None` when it is unset or the bound address (which bind4/bind6 judged).
#[inline(always)]
fn chosen_source(ctx: &SockAddrContext, hook: u8) -> Option<Destination> {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `msg_src_ip4`/`msg_src_ip6` are readable in sendmsg4/sendmsg6 programs (this is
    // constant-folded to the right one); `sk` is always set for sock_addr programs; full
    // 32-bit loads.
    unsafe {
        let sk: *const bpf_sock = read_volatile(&(*sa).__bindgen_anon_1.sk).cast_const();
        if hook == hook::SENDMSG4 {
            let source = read_volatile(&(*sa).msg_src_ip4);
            if source == ZERO_WORD || source == read_volatile(&(*sk).src_ip4) {
                return None;
            }
            return Some(Destination {
                addr: [source, ZERO_WORD, ZERO_WORD, ZERO_WORD],
                family: FAMILY_V4,
            });
        }
        let s = [
            read_volatile(&(*sa).msg_src_ip6[0]),
            read_volatile(&(*sa).msg_src_ip6[1]),
            read_volatile(&(*sa).msg_src_ip6[2]),
            read_volatile(&(*sa).msg_src_ip6[3]),
        ];
        if s[0] | s[1] | s[2] | s[3] == ZERO_WORD
            || (s[0] == read_volatile(&(*sk).src_ip6[0])
                && s[1] == read_volatile(&(*sk).src_ip6[1])
                && s[2] == read_volatile(&(*sk).src_ip6[2])
                && s[3] == read_volatile(&(*sk).src_ip6[3]))
        {
            return None;
        }
        Some(six_or_mapped(s))
    }
}

/// 0.0.0.0 (family 4, which includes ::ffff:0.0.0.0) or :: (family 6). Called only when the
/// first word is zero.
#[inline(always)]
fn is_unspecified(dst: &Destination) -> bool {
    dst.family == FAMILY_V4
        || (dst.addr[1] == ZERO_WORD && dst.addr[2] == ZERO_WORD && dst.addr[3] == ZERO_WORD)
}

/// The address the kernel really sends an unspecified destination to, where the hook can know
/// it exactly; `None` where it cannot (the call is then refused).
///
/// IPv4 (`ip_route_output_key_hash_rcu`, "if (!fl4->daddr)"): the destination becomes the
/// source address routing uses; without one, 127.0.0.1, except that with an output device
/// and no source it becomes that device's first address. What the hook sees:
/// - sendmsg4: `msg_src_ip4` is exactly the source `udp_sendmsg` routes with (the bound
///   source, or `IP_PKTINFO`'s `ipi_spec_dst`); when it is set, the device plays no part.
///   Without it, `IP_UNICAST_IF` or `IP_PKTINFO`'s `ipi_ifindex` may pick a device the hook
///   cannot see: undetermined.
/// - connect4 / connect6 to ::ffff:0.0.0.0: TCP routes with the socket's source and
///   `SO_BINDTODEVICE` only. Unbound, without a device: 127.0.0.1. A bound source cannot be
///   trusted: `src_ip4` is the *bound* address, and the kernel drops a broadcast or multicast
///   one (`__inet_bind`: "Use device"), after which the call goes to 127.0.0.1 while the hook
///   would have judged the broadcast address; a subnet broadcast (127.255.255.255) cannot be
///   told from a unicast address here. Connected UDP also obeys `IP_UNICAST_IF`
///   (`__ip4_datagram_connect`): undetermined.
///
/// IPv6: connect (`tcp_v6_connect`, `__ip6_datagram_connect`) makes :: the loopback, ::1, or
/// ::ffff:127.0.0.1 for a socket bound to an IPv4-mapped source; `udpv6_sendmsg` always ::1
/// ("BSD'ism"). Exact in every case.
#[inline(always)]
fn unspecified(
    sa: *const bpf_sock_addr,
    hook: u8,
    family: u8,
    protocol: u32,
) -> Option<Destination> {
    let v4 = |word: u32| Destination {
        addr: [word, ZERO_WORD, ZERO_WORD, ZERO_WORD],
        family: FAMILY_V4,
    };
    if hook == hook::SENDMSG6 {
        // udpv6_sendmsg hands IPv4-mapped destinations to udp_sendmsg (sendmsg4) itself; a
        // mapped 0.0.0.0 here would have unknown semantics.
        return (family == FAMILY_V6).then_some(Destination {
            addr: [ZERO_WORD, ZERO_WORD, ZERO_WORD, LOOPBACK_V6_WORD3],
            family: FAMILY_V6,
        });
    }
    if hook == hook::SENDMSG4 {
        // SAFETY: msg_src_ip4 is readable in sendmsg4 programs (and only there: this branch is
        // constant-folded away in the others); a full 32-bit load.
        let source = unsafe { read_volatile(&(*sa).msg_src_ip4) };
        return (source != ZERO_WORD).then(|| v4(source));
    }
    // connect4 / connect6: the socket itself. SAFETY: `sk` is always set for sock_addr
    // programs; the pointer is one 8-byte load and every field a full 32-bit load.
    let sk: *const bpf_sock = unsafe { read_volatile(&(*sa).__bindgen_anon_1.sk) }.cast_const();
    if hook == hook::CONNECT6 && family == FAMILY_V6 {
        // SAFETY: as above.
        let src = unsafe {
            [
                read_volatile(&(*sk).src_ip6[0]),
                read_volatile(&(*sk).src_ip6[1]),
                read_volatile(&(*sk).src_ip6[2]),
            ]
        };
        let mapped_source =
            src[0] == ZERO_WORD && src[1] == ZERO_WORD && u32::from_be(src[2]) == V4_MAPPED_WORD2;
        return Some(if mapped_source {
            v4(LOOPBACK_V4_WORD)
        } else {
            Destination {
                addr: [ZERO_WORD, ZERO_WORD, ZERO_WORD, LOOPBACK_V6_WORD3],
                family: FAMILY_V6,
            }
        });
    }
    // IPv4 0.0.0.0, from connect4 or a mapped ::ffff:0.0.0.0 in connect6.
    if protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: as above.
    let (device, unbound) = unsafe {
        let device = read_volatile(&(*sk).bound_dev_if);
        let unbound = if hook == hook::CONNECT4 {
            read_volatile(&(*sk).src_ip4) == ZERO_WORD
        } else {
            // A dual-stack socket: unbound is :: or ::ffff:0.0.0.0.
            let w = [
                read_volatile(&(*sk).src_ip6[0]),
                read_volatile(&(*sk).src_ip6[1]),
                read_volatile(&(*sk).src_ip6[2]),
                read_volatile(&(*sk).src_ip6[3]),
            ];
            w[0] == ZERO_WORD
                && w[1] == ZERO_WORD
                && (w[2] == ZERO_WORD || u32::from_be(w[2]) == V4_MAPPED_WORD2)
                && w[3] == ZERO_WORD
        };
        (device, unbound)
    };
    (unbound && device == NO_DEVICE).then(|| v4(LOOPBACK_V4_WORD))
}

/// Exact host entry, else longest-prefix match of the destination; WORLD when the IP cache
/// does not know it.
#[inline(always)]
fn lookup_destination(dst: &Destination) -> u32 {
    lookup_address(dst).0
}

/// [`lookup_destination`], and whether the answer is an exact (host) entry.
#[inline(always)]
fn lookup_address(dst: &Destination) -> (u32, bool) {
    let (exact, prefix) = if dst.family == FAMILY_V4 {
        let addr = dst.addr[0].to_ne_bytes();
        // SAFETY: a non-null map value pointer is valid for reads.
        match IPCACHE_HOST_V4.get_ptr(addr) {
            Some(p) => (Some(unsafe { *p }), None),
            None => (
                None,
                IPCACHE_V4.get(&Key::new(V4_PREFIX_BITS, addr)).copied(),
            ),
        }
    } else {
        // The words are in memory (network) order already; reinterpret them as bytes.
        let a = dst.addr;
        let b = [
            a[0].to_ne_bytes(),
            a[1].to_ne_bytes(),
            a[2].to_ne_bytes(),
            a[3].to_ne_bytes(),
        ];
        // SAFETY: [[u8; 4]; 4] and [u8; 16] have the same size and no invalid bit patterns.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(b) };
        // SAFETY: a non-null map value pointer is valid for reads.
        match IPCACHE_HOST_V6.get_ptr(bytes) {
            Some(p) => (Some(unsafe { *p }), None),
            None => (
                None,
                IPCACHE_V6.get(&Key::new(V6_PREFIX_BITS, bytes)).copied(),
            ),
        }
    };
    match (exact, prefix) {
        (Some(id), _) => (id, true),
        (None, Some(id)) => (id, false),
        (None, None) => (identity::WORLD, false),
    }
}

/// The identity that holds an address as its own, from [`lookup_address`]'s answer: an exact
/// entry of a workload or endpoint. Not a prefix (a range of remote addresses, which may
/// cover the node's own), not a reserved identity (WORLD, UNIDENTIFIED...), not a Service
/// (virtual addresses, see `flags::SERVICE`), not a pod's (its own namespace's, see
/// `flags::OWN_NETNS`).
#[inline(always)]
fn address_owner(identity: u32, exact: bool) -> Option<u32> {
    if !exact || identity < identity::FIRST_DYNAMIC {
        return None;
    }
    let owner_flags = locked::identity_flags(identity)?;
    (owner_flags & (flags::SERVICE | flags::OWN_NETNS) == 0).then_some(identity)
}

/// The exact-port entry decides by its verdict (a deny exception under an any-port allow);
/// without one, an any-port entry (always an allow). No entry: deny.
#[inline(always)]
fn policy_hit(table: &HashMap<PolicyKey, PolicyValue>, key: &mut PolicyKey) -> bool {
    if let Some(v) = table.get_ptr(*key) {
        // SAFETY: a non-null map value pointer is valid for reads.
        return unsafe { (*v).verdict } == entry::ALLOW;
    }
    key.dport = ANY_PORT;
    table.get_ptr(*key).is_some()
}

/// The sock_create decision: TCP, MPTCP and UDP sockets pass (the sock_addr hooks judge them);
/// any other inet socket of a managed (or unknown) subject is refused with one event, reason
/// `unsupported_socket`. Audit mode (global, or the subject's) lets it through as audit; a
/// quarantined subject is refused even then.
#[inline(always)]
fn judge_socket(ctx: &SockContext) -> i32 {
    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: `sk` is the context the kernel hands the program; full 32-bit loads.
    let (family, sock_type, protocol) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).type_),
            read_volatile(&(*sk).protocol),
        )
    };
    let judged_elsewhere = (sock_type == SOCK_STREAM
        && (protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP))
        || (sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP);
    // The kernel runs this hook for inet sockets only; anything else is not ours to judge.
    let event_family = if family == AF_INET {
        FAMILY_V4
    } else if family == AF_INET6 {
        FAMILY_V6
    } else {
        return SOCK_ALLOW;
    };
    if judged_elsewhere {
        return SOCK_ALLOW;
    }

    let (global_audit, generation) = audit_and_generation();
    let mut v = Verdict {
        subject: identity::UNKNOWN,
        destination: identity::UNKNOWN,
        dport: ANY_PORT,
        protocol: protocol as u8,
        verdict: verdict::DENY,
        reason: reason::UNSUPPORTED_SOCKET,
        generation: generation as u32,
        sock_type: sock_type as u16,
        sock_protocol: protocol as u16,
    };
    let dst = Destination {
        addr: [ZERO_WORD; 4],
        family: event_family,
    };
    if refuse(&mut v, &dst, hook::SOCK_CREATE, global_audit) {
        SOCK_ALLOW
    } else {
        SOCK_REFUSE
    }
}

/// A refusal the kernel makes before any policy (`v.reason`: an unspecified destination it
/// cannot resolve, an unsupported socket), for every subject in the subtree, known or not:
/// counted, reported as one event, and `true` when audit mode (global, or the subject's)
/// lets the call through. A quarantined subject is refused even then; the exempt agent is
/// let through unreported. Kept off `decide`'s common path: only the rare cases call it.
#[inline(always)]
fn refuse(v: &mut Verdict, dst: &Destination, hook: u8, global_audit: bool) -> bool {
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let subject = locked::subject_of(cgroup_id).unwrap_or(identity::UNKNOWN);
    let subject_flags = if subject == identity::UNKNOWN {
        None
    } else {
        locked::identity_flags(subject)
    };
    let audit = match subject_flags {
        None => global_audit,
        Some(subject_flags) => {
            v.subject = subject;
            if subject_flags & flags::EXEMPT != 0 {
                // The agent itself (see `decide`): let through, counted as allowed.
                count(hook, verdict::ALLOW, reason::ALLOWED);
                return true;
            }
            if subject_flags & flags::QUARANTINED != 0 {
                NEVER_AUDIT
            } else {
                global_audit || subject_flags & flags::AUDIT != 0
            }
        }
    };
    v.verdict = if audit { verdict::AUDIT } else { verdict::DENY };
    count(hook, v.verdict, v.reason);
    emit(v, dst, cgroup_id, hook);
    audit
}

/// [`refuse`] as a sock_addr program's result.
#[inline(always)]
fn refuse_call(v: &mut Verdict, dst: &Destination, hook: u8, global_audit: bool) -> i32 {
    if refuse(v, dst, hook, global_audit) {
        SK_PASS
    } else {
        SK_DROP
    }
}

/// Per-CPU verdict counter. Not atomic: the counter is this CPU's own and the program runs
/// with migration disabled. (On a preemptible kernel a task preempted between the load and
/// the store could lose one increment to another task on the same CPU; accepted, as in
/// Cilium, to keep the hot path free of locked instructions.)
#[inline(always)]
fn count(hook: u8, verdict: u8, reason: u8) {
    if let Some(c) = VERDICTS.get_ptr_mut(verdict_counter_index(hook, verdict, reason)) {
        // SAFETY: a non-null per-CPU array value pointer is valid for reads and writes.
        unsafe { *c += 1 };
    }
}

/// Counts the would-deny as DENY or AUDIT, writes its event, and returns the program result.
#[inline(always)]
fn report(v: &mut Verdict, dst: &Destination, cgroup_id: u64, hook: u8, audit: bool) -> i32 {
    let (verdict, ret) = if audit {
        (verdict::AUDIT, SK_PASS)
    } else {
        (verdict::DENY, SK_DROP)
    };
    v.verdict = verdict;
    count(hook, verdict, v.reason);
    emit(v, dst, cgroup_id, hook);
    ret
}

/// Reports one deny or audit of a task (the shared path: `report::emit`).
#[inline(always)]
fn emit(v: &Verdict, dst: &Destination, cgroup_id: u64, hook: u8) {
    report::emit(&report::Report {
        cgroup_id,
        // SAFETY: bpf_get_current_pid_tgid has no preconditions.
        pid_tgid: unsafe { bpf_get_current_pid_tgid() },
        subject: v.subject,
        destination: v.destination,
        daddr: dst.addr,
        family: dst.family,
        dport: v.dport,
        protocol: v.protocol,
        hook,
        verdict: v.verdict,
        reason: v.reason,
        generation: v.generation,
        sock_type: v.sock_type,
        sock_protocol: v.sock_protocol,
        peer: [ZERO_WORD; 4],
        task: true,
    });
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program (no code path here panics); the verifier would reject
    // an unbounded loop, so any real panic path shows up as a load failure, not a hang.
    loop {}
}

/// The kernel only checks this for GPL-only helpers, and none is used; the project's licence.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

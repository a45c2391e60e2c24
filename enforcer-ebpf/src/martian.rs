//! Sending: a packet that leaves for somewhere other than where its call was judged. Two
//! cases, both for pods in their own network namespace.
//!
//! Loopback leaving the namespace (`reason::MARTIAN_DESTINATION`). The connect hooks let a
//! pod's TCP connect to its own loopback through unjudged (only the pod answers there, see
//! `decide`), and judge a datagram to loopback as World's. Both rest on loopback staying in
//! the namespace; it does not always: a socket bound to a device after its connect was
//! judged (`SO_BINDTODEVICE` needs no capability, and a TCP Fast Open connect sends its SYN
//! only at the first `send()`), a datagram's `IP_PKTINFO` interface or a route sends
//! `127.0.0.1` out of the pod, and a node with `route_localnet` (kube-proxy sets it)
//! delivers it to the node's own loopback servers (CVE-2020-8558). So does a socket
//! connected to loopback whose packet the pod's own `DNAT` (with `NET_ADMIN`) sends to
//! another workload's address.
//!
//! A rewritten destination (the policy's own reasons). The hooks judge the address a
//! workload dials; its namespace's netfilter (a `DNAT` in `OUTPUT`) or a source route can
//! send the packet elsewhere. A connected socket's packet whose destination differs from the
//! socket's is judged again where it goes, as a connect would be. (An unconnected socket's
//! datagrams are not: a socket-level load balancer rewrites them legitimately, see
//! `egress`.)
//!
//! A connected UDP socket's call that outlived its judgment (`reason`s of the policy, as for a
//! rewrite). The connect hooks judge a UDP socket's connect once; its later `send()`s run no
//! hook, and ingress checks look at SYNs. Its datagrams kept going where policy no longer let
//! it call: to a Kubernetes Service whose backends a tenant moved to another tenant's pod
//! (kube-proxy then flushes the socket's conntrack entry and sends the next datagram to the
//! new backend), to an address reused by another tenant's pod, after a policy change or a
//! quarantine. The connect hooks note each socket's call ([`connect`]), and it is judged again
//! as a connect would be whenever the policy generation or `CONFIG.flags_revision` moved
//! since it was last judged (red-team reviews 43 M3, 44 M2, 45 and 46).
//!
//! At `cgroup_skb/egress` the output device is known (`__sk_buff::ifindex`) and the
//! destination is the one on the wire, after any rewrite by netfilter. In the node's
//! namespace loopback leaves through devices by design, and kube-proxy DNATs Service
//! addresses in `OUTPUT`: left alone. What rewrites after this hook (tc, netdev egress
//! hooks: `NET_ADMIN` again) is not seen.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{bpf_sk_fullsock, bpf_skb_cgroup_id},
    macros::btf_map,
    programs::SkBuffContext,
};
use enforcer_common::{flags, hook, identity, proto, reason, verdict};

use crate::{
    count, is_loopback, locked, six_or_mapped,
    skb::{
        load, skip_extension_headers, DROP, ETH_P_IP, ETH_P_IPV6, IPV4_HEADER_MIN, IPV6_HEADER,
        LOOPBACK_IFINDEX, PASS,
    },
    wire::SocketStorage,
    Destination, Ruling, AF_INET, AF_INET6, FAMILY_V4, SOCK_DGRAM, ZERO_WORD,
};

/// A connected UDP socket's call: what its last connect named (as the connect hooks
/// judged it), where the socket was before that connect, and what its last judgment was made
/// under. Written by `connect4`/`connect6` for each UDP connect they let through ([`connect`]),
/// kept by this program; freed with the socket.
#[repr(C)]
pub struct Judged {
    /// `Config::generation` of the last judgment.
    generation: u64,
    /// `Config::flags_revision` of the last judgment.
    flags_revision: u32,
    /// The port the connect named (host order).
    port: u16,
    /// The socket's remote port before that connect.
    before_port: u16,
    /// The address the connect named (`Destination::addr`).
    addr: [u32; 4],
    /// The socket's remote address before that connect.
    before: [u32; 4],
    /// `Destination::family` of `addr`.
    family: u8,
    /// Of `before`; `NOWHERE` when the socket was not connected.
    before_family: u8,
    /// Non-zero: the named destination was a Kubernetes Service (`flags::SERVICE`) when judged,
    /// whose address a socket load balancer may replace by a backend's at the connect.
    service: u8,
    /// Always zero.
    _pad: [u8; 5],
}

/// `Judged::before_family` of a socket that was connected nowhere.
const NOWHERE: u8 = 0;

#[btf_map]
static JUDGED_DATAGRAMS: SocketStorage<Judged> = SocketStorage::new();

/// The program's verdict on one outgoing packet: every packet through `lo`, and every packet
/// of a pod that goes where its socket's connect was judged, or that the policy permits
/// where it goes, passes.
#[inline(always)]
pub fn egress(ctx: &SkBuffContext) -> i32 {
    let skb: *const __sk_buff = ctx.skb.skb;
    // SAFETY: full 32-bit context loads; `protocol` is the __be16 ethertype.
    let (ifindex, ethertype) = unsafe {
        (
            read_volatile(&(*skb).ifindex),
            u16::from_be(read_volatile(&(*skb).protocol) as u16),
        )
    };
    if ifindex == LOOPBACK_IFINDEX {
        return PASS;
    }
    let Some(packet) = packet_destination(ctx, ethertype) else {
        return PASS;
    };
    // SAFETY: one 8-byte context load.
    let sk = unsafe { read_volatile(&(*skb).__bindgen_anon_2.sk) };
    // Plain values with sentinels, no `Option`s with payloads: LLVM fills the payload of a
    // `None` with whatever register it likes, and the verifier rejects reading that register
    // uninitialised.
    let (to, port, connected) = socket_destination(sk.cast_const());
    let martian = is_loopback(&packet.dst) || (connected && is_loopback(&to));
    // A connected socket's packet that goes to another address or port (the port read after
    // IPv4 options or known IPv6 extension headers). One whose port stays hidden (ESP, more
    // extension headers than the walk's bound) is judged too, at port 0 with its IP
    // protocol, which no permit opens: a rewrite of its port could not be seen. An unconnected
    // socket's datagrams are not compared: `sendmsg` judged the address the caller gave, and
    // a socket-level load balancer (Cilium's, Calico's eBPF, whose programs run after ours)
    // may rewrite it before the packet is made, to a backend or a node-local DNS cache this
    // check would refuse; a pod's own `DNAT` of a datagram is not seen (README).
    let translated = !martian
        && connected
        && (!same_address(&to, &packet.dst) || packet.dport == NO_PORT || packet.dport != port);
    if !martian && !translated {
        // Where its connect was judged: a datagram socket's call is judged again there when
        // what that judgment read has moved.
        return if connected {
            connected_datagram(ctx, sk, &to, port)
        } else {
            PASS
        };
    }
    let dport = packet.dport;
    // SAFETY: the skb pointer is the program's context (the sending socket's).
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // Only a pod in its own namespace (the allowance's scope, and the only place where a
    // rewrite is the workload's own doing): in the node's namespace loopback leaves through
    // devices by design (kube-proxy's NodePorts and the CNI's hostPorts on `127.0.0.1`,
    // DNATed in `OUTPUT` with `route_localnet`; a VRF's loopback is its master device), and
    // kube-proxy's `OUTPUT` DNAT of a Service's address is how a `hostNetwork` pod reaches
    // its backends. One lookup, on these rare paths only. A socket of no known identity
    // passes: unlike `decide`, this is no place to fail closed, since its connect was refused
    // already (an unknown subject's), and its cgroup mapped away since is not news.
    let Some(subject) = locked::subject_of(cgroup_id) else {
        return PASS;
    };
    let (global_audit, generation) = crate::audit_and_generation();
    let slot_b = generation & 1 != 0;
    let Some(info) = locked::identity_info(subject, slot_b) else {
        return PASS;
    };
    if info.flags & (flags::OWN_NETNS | flags::SHARED_NETNS) != flags::OWN_NETNS
        || info.flags & flags::EXEMPT != 0
    {
        return PASS;
    }
    let (destination, reason, audit) = if martian {
        (identity::WORLD, reason::MARTIAN_DESTINATION, global_audit)
    } else {
        // The connect judged the address the socket holds; the packet goes to another one
        // (the pod's own `DNAT`, with `NET_ADMIN`; a source route's first hop): judged
        // again, as `decide` would judge a connect to it.
        let destination = crate::lookup_destination(&packet.dst);
        let not_loopback = false;
        match crate::rule(
            slot_b,
            &info,
            destination,
            dport,
            packet.protocol,
            global_audit,
            not_loopback,
        ) {
            Ruling::Unjudged | Ruling::Permitted(_) => return PASS,
            Ruling::Refused { reason, audit, .. } => (destination, reason, audit),
        }
    };
    let judged = Packet {
        dst: packet.dst,
        dport,
        protocol: packet.protocol,
    };
    refuse(
        &judged,
        (cgroup_id, subject, destination),
        reason,
        audit,
        generation,
    )
}

/// Counts and reports a packet refused at this hook for `reason` (`audit`: let through,
/// reported), as a call of (cgroup id, subject, destination) to `packet`'s address, port and
/// protocol under `generation`; its verdict.
#[inline(always)]
fn refuse(
    packet: &Packet,
    (cgroup_id, subject, destination): (u64, u32, u32),
    reason: u8,
    audit: bool,
    generation: u64,
) -> i32 {
    let v = if audit { verdict::AUDIT } else { verdict::DENY };
    count(hook::EGRESS, v, reason);
    crate::report::emit(&crate::report::Report {
        cgroup_id,
        pid_tgid: 0,
        subject,
        destination,
        daddr: packet.dst.addr,
        family: packet.dst.family,
        dport: packet.dport,
        protocol: packet.protocol,
        hook: hook::EGRESS,
        verdict: v,
        reason,
        generation: generation as u32,
        sock_type: 0,
        sock_protocol: 0,
        peer: [ZERO_WORD; 4],
        task: false,
    });
    if audit {
        PASS
    } else {
        DROP
    }
}

/// Notes the call a UDP `connect()` makes, which `decide` let through (permitted, or audited)
/// under `generation` and `flags_revision` (read before the identities it judged): `dst` and
/// `dport` as judged, `destination_flags` the destination's.
/// One socket-storage value per connected UDP socket (allocated at its first connect; no value
/// when that fails: [`connected_datagram`] then judges where the socket is).
#[inline(always)]
pub(crate) fn connect(
    sk: *mut bpf_sock,
    dst: &Destination,
    dport: u16,
    destination_flags: u32,
    (generation, flags_revision): (u64, u32),
) {
    if sk.is_null() {
        return;
    }
    let (before, before_port, connected) = socket_destination(sk.cast_const());
    let call = Judged {
        generation,
        flags_revision,
        port: dport,
        before_port,
        addr: dst.addr,
        before: before.addr,
        family: dst.family,
        before_family: if connected { before.family } else { NOWHERE },
        service: u8::from(destination_flags & flags::SERVICE != 0),
        _pad: [0; 5],
    };
    let slot = JUDGED_DATAGRAMS.get(sk, Some(&call));
    if !slot.is_null() {
        // SAFETY: the socket's own value, of the map's type.
        unsafe { *slot = call };
    }
}

/// The verdict on a packet of the connected socket `sk` (non-null) that goes where the socket
/// is connected (`to`, `port`): a UDP socket's call judged again, as `decide` would judge it
/// now, when the policy generation or the identities' flags revision moved since its last
/// judgment. Which call:
/// - the one its last connect named (what `decide` judged), when the socket is there, or,
///   with `CONFIG.socket_lb`, when that was a Service and the socket is elsewhere, but not
///   where it was before: a socket load balancer (Cilium's, Calico's eBPF, whose connect
///   programs run after ours) connected it to a backend, which is not judged (its Service
///   was);
/// - else where the socket is, at once: the kernel refused the last connect after the hooks
///   (a broadcast address, a device without a route: the socket stays where it was), two
///   connects of the socket raced, or the socket was connected before the programs were
///   attached (no value). A permitted one becomes the socket's call.
///
/// A refused call is dropped (`send()` fails with `EPERM`) and reported with hook `egress`;
/// audit lets it through, reported once. A socket of no known identity is refused as its
/// connect would be now (`unknown_subject`; global audit lets it through): unlike a
/// rewrite, which the judgment above lets pass for such a socket, the datagram is the call its
/// connect made, and a workload removed from the policy makes none. Nothing is charged to a
/// rate limit and no flow record changes: the agent's revocation pass reports a tracked one
/// `flow.stale`.
#[inline(always)]
fn connected_datagram(ctx: &SkBuffContext, sk: *mut bpf_sock, to: &Destination, port: u16) -> i32 {
    // `type` and `protocol` are readable on a full socket only (the verifier refuses them on
    // the `sock_common` pointer the context gives).
    // SAFETY: `sk` is the context's non-null socket pointer, which the helper takes.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return PASS;
    }
    // SAFETY: a full socket; full 32-bit loads.
    let (sock_type, protocol) = unsafe {
        (
            read_volatile(&(*full).type_),
            read_volatile(&(*full).protocol),
        )
    };
    if sock_type != SOCK_DGRAM {
        return PASS;
    }
    // The revision first, then what it guards: the agent writes an identity's flags before it
    // advances the revision, so a program that reads the new revision judges the new flags.
    let (global_audit, generation, flags_revision) = crate::judged_under();
    let call = JUDGED_DATAGRAMS.get(full, None);
    // Which call is judged, and whether the socket's value names it (see above). Sentinels,
    // no `Option` of a reference: the value is the verifier's map-value pointer.
    let (named, there) = if call.is_null() {
        (false, false)
    } else {
        // SAFETY: the socket's own value, of the map's type.
        unsafe {
            let named = Destination {
                addr: (*call).addr,
                family: (*call).family,
            };
            let before = Destination {
                addr: (*call).before,
                family: (*call).before_family,
            };
            let there = same_address(to, &named) && port == (*call).port;
            // Only where a socket load balancer is known to rewrite connects: without one,
            // two connects of one socket racing (the hooks in one order, the kernel's
            // connects in the other) would leave it elsewhere under a Service's call.
            let balanced = !there
                && (*call).service != 0
                && !((*call).before_family != NOWHERE
                    && same_address(to, &before)
                    && port == (*call).before_port)
                && crate::socket_lb();
            (there || balanced, there)
        }
    };
    if named
        // SAFETY: as above (non-null when `named`).
        && unsafe {
            (*call).generation == generation && (*call).flags_revision == flags_revision
        }
    {
        return PASS;
    }
    // SAFETY: as above.
    let (judged, judged_port) = if named && !there {
        unsafe {
            (
                Destination {
                    addr: (*call).addr,
                    family: (*call).family,
                },
                (*call).port,
            )
        }
    } else {
        (
            Destination {
                addr: to.addr,
                family: to.family,
            },
            port,
        )
    };
    // SAFETY: the skb pointer is the program's context (the sending socket's).
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let slot_b = generation & 1 != 0;
    let destination = crate::lookup_destination(&judged);
    let subject = locked::subject_of(cgroup_id).unwrap_or(identity::UNKNOWN);
    let info = if subject == identity::UNKNOWN {
        None
    } else {
        locked::identity_info(subject, slot_b)
    };
    let ruling = match &info {
        Some(info) => crate::rule(
            slot_b,
            info,
            destination,
            judged_port,
            protocol as u8,
            global_audit,
            false,
        ),
        None => Ruling::Refused {
            reason: reason::UNKNOWN_SUBJECT,
            audit: global_audit,
            destination_flags: 0,
        },
    };
    let destination_flags = match ruling {
        Ruling::Unjudged => 0,
        Ruling::Permitted(destination_flags) => destination_flags,
        Ruling::Refused {
            reason,
            audit,
            destination_flags,
        } => {
            let reported = if info.is_some() {
                subject
            } else {
                identity::UNKNOWN
            };
            let packet = Packet {
                dst: Destination {
                    addr: judged.addr,
                    family: judged.family,
                },
                dport: judged_port,
                protocol: protocol as u8,
            };
            if refuse(
                &packet,
                (cgroup_id, reported, destination),
                reason,
                audit,
                generation,
            ) == DROP
            {
                // Not kept: every datagram is judged until the call is permitted again.
                return DROP;
            }
            destination_flags
        }
    };
    if named {
        // SAFETY: as above.
        unsafe {
            (*call).generation = generation;
            (*call).flags_revision = flags_revision;
        }
    } else {
        // Where the socket is: its call from now on, as a connect there would have made it,
        // but never a Service's: no balancer moved it, and a later move (another thread's
        // connect racing this datagram) must not be taken for one.
        connect(
            full,
            &judged,
            judged_port,
            destination_flags & !flags::SERVICE,
            (generation, flags_revision),
        );
    }
    PASS
}

/// Whether two destinations are one address (both as `six_or_mapped` gives them).
#[inline(always)]
fn same_address(a: &Destination, b: &Destination) -> bool {
    a.family == b.family
        && a.addr[0] == b.addr[0]
        && a.addr[1] == b.addr[1]
        && a.addr[2] == b.addr[2]
        && a.addr[3] == b.addr[3]
}

/// `Packet::dport` when the packet does not show it.
const NO_PORT: u16 = 0;
/// The fragment offset bits of IPv4's flags and fragment offset field.
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

/// The remote address and port (host order) of the socket `sk` (null: none), a socket pointer
/// from a program context (cgroup_skb's, sock_addr's; an IPv4-mapped address as its IPv4
/// one), and whether it is connected: a remote address or port is set (either alone counts:
/// TCP connects to port 0, and a rewrite of such a connect must not pass as unconnected). Not
/// connected: no socket, a listener (the kernel runs the program for a SYN-ACK with the
/// listener, whose remote address is unset), an unconnected datagram socket. Only
/// `sock_common` fields are read: the remote address and port mean the same for every
/// protocol.
#[inline(always)]
pub(crate) fn socket_destination(sk: *const bpf_sock) -> (Destination, u16, bool) {
    // SAFETY: the socket pointer may be null (checked), and its fields are readable on every
    // socket the kernel hands in (`sock_common`; the full socket at cgroup_skb egress and in
    // sock_addr hooks): full 32-bit loads, and the 16-bit `dst_port` load the kernel allows
    // since 5.19 (its field size).
    unsafe {
        let none = (
            Destination {
                addr: [ZERO_WORD; 4],
                family: FAMILY_V4,
            },
            0,
            false,
        );
        if sk.is_null() {
            return none;
        }
        let port = u16::from_be(read_volatile(&(*sk).dst_port));
        let to = match read_volatile(&(*sk).family) {
            AF_INET => Destination {
                addr: [
                    read_volatile(&(*sk).dst_ip4),
                    ZERO_WORD,
                    ZERO_WORD,
                    ZERO_WORD,
                ],
                family: FAMILY_V4,
            },
            AF_INET6 => six_or_mapped([
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ]),
            _ => return none,
        };
        let connected = port != 0
            || to.addr[0] != ZERO_WORD
            || to.addr[1] != ZERO_WORD
            || to.addr[2] != ZERO_WORD
            || to.addr[3] != ZERO_WORD;
        (to, port, connected)
    }
}

/// Where an outgoing packet goes.
struct Packet {
    /// Address words in memory order (as `DenyEvent::daddr`).
    dst: Destination,
    /// The destination port (host order) of a TCP or UDP packet; `NO_PORT` where the packet
    /// hides it (another protocol, ESP, more IPv6 extension headers than are stepped over).
    dport: u16,
    /// IPv4's protocol; IPv6's header after the extension headers stepped over.
    protocol: u8,
}

/// The packet's destination: one load of the IP header with the first transport bytes where
/// they can follow it (IPv4 without options, IPv6's fixed header), another only otherwise.
#[inline(always)]
fn packet_destination(ctx: &SkBuffContext, ethertype: u16) -> Option<Packet> {
    let port = |protocol: u8, at: &[u8]| {
        if protocol == proto::TCP || protocol == proto::UDP {
            u16::from_be_bytes([at[2], at[3]])
        } else {
            NO_PORT
        }
    };
    if ethertype == ETH_P_IP {
        let dst = |ip: &[u8]| Destination {
            addr: [
                u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
                ZERO_WORD,
                ZERO_WORD,
                ZERO_WORD,
            ],
            family: FAMILY_V4,
        };
        if let Some(ip) = load::<[u8; IPV4_HEADER_MIN + 4]>(ctx, 0) {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            // The kernel fragments a socket's packets after this hook (`ip_finish_output`),
            // but a raw socket that writes its own header (`IP_HDRINCL`: one `sock_create`
            // let through in audit mode, or created before the programs were attached) sends
            // any fragment offset: a later fragment's first bytes are no ports.
            let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & IPV4_FRAGMENT_OFFSET != 0;
            let dport = if later_fragment {
                NO_PORT
            } else if ihl == IPV4_HEADER_MIN {
                port(ip[9], &ip[IPV4_HEADER_MIN..])
            } else {
                match load::<[u8; 4]>(ctx, ihl) {
                    Some(ports) => port(ip[9], &ports),
                    None => NO_PORT,
                }
            };
            return Some(Packet {
                dst: dst(&ip),
                dport,
                protocol: ip[9],
            });
        }
        // Shorter than a header and four bytes: no transport header to read.
        let ip: [u8; IPV4_HEADER_MIN] = load(ctx, 0)?;
        return Some(Packet {
            dst: dst(&ip),
            dport: NO_PORT,
            protocol: ip[9],
        });
    }
    if ethertype == ETH_P_IPV6 {
        if let Some(h) = load::<[u8; IPV6_HEADER + 4]>(ctx, 0) {
            if h[6] == proto::TCP || h[6] == proto::UDP {
                return Some(v6_packet(&h, h[6], port(h[6], &h[IPV6_HEADER..])));
            }
        }
        // Extension headers (or a packet shorter than a header and four bytes): stepped
        // over, since the kernel puts one on every IPv6 BIG TCP packet (a hop-by-hop jumbo
        // header, on GSO packets over 64 KiB).
        let h: [u8; IPV6_HEADER] = load(ctx, 0)?;
        let (next, l4) = skip_extension_headers(ctx, h[6], IPV6_HEADER);
        let dport = match load::<[u8; 4]>(ctx, l4) {
            Some(ports) => port(next, &ports),
            None => NO_PORT,
        };
        return Some(v6_packet(&h, next, dport));
    }
    None
}

/// An IPv6 packet from its fixed header (`h`, at least its 40 bytes), the header after its
/// extension headers (`protocol`) and its port.
#[inline(always)]
fn v6_packet(h: &[u8], protocol: u8, dport: u16) -> Packet {
    let w = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Packet {
        // An IPv4-mapped destination as its IPv4 address, as the socket's is.
        dst: six_or_mapped([w(24), w(28), w(32), w(36)]),
        dport,
        protocol,
    }
}

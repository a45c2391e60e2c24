//! Sending: a packet to a loopback address that leaves its network namespace through a device
//! (`reason::MARTIAN_DESTINATION`).
//!
//! The connect hooks let a pod's TCP connect to its own loopback through unjudged (only the
//! pod answers there, see `decide`), and judge a datagram to loopback as World's. Both rest on
//! loopback staying in the namespace; it does not always: a socket bound to a device after
//! its connect was judged (`SO_BINDTODEVICE` needs no capability, and a TCP Fast Open connect
//! sends its SYN only at the first `send()`), a datagram's `IP_PKTINFO` interface or a route
//! sends `127.0.0.1` out of the pod, and a node with `route_localnet` (kube-proxy sets it)
//! delivers it to the node's own loopback servers (CVE-2020-8558). At `cgroup_skb/egress`
//! the output device is known (`__sk_buff::ifindex`) and the destination is the one on the
//! wire, after any rewrite by netfilter: such a packet is dropped there, counted and
//! reported. So is a packet of a socket connected to loopback that leaves through a device
//! for another address (the pod's own `DNAT`, with `NET_ADMIN`, turned its allowed loopback
//! into another workload's address). Pods in their own namespace only: in the node's,
//! loopback leaves through devices by design. What rewrites after this hook (tc, netdev
//! egress hooks: `NET_ADMIN` again) is not seen.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::bpf_skb_cgroup_id,
    programs::SkBuffContext,
};
use enforcer_common::{flags, hook, identity, proto, reason, verdict};

use crate::{
    count, is_loopback, locked, six_or_mapped,
    skb::{load, DROP, ETH_P_IP, ETH_P_IPV6, IPV6_HEADER, LOOPBACK_IFINDEX, PASS},
    Destination, AF_INET, AF_INET6, FAMILY_V4, FAMILY_V6, ZERO_WORD,
};

/// The program's verdict on one outgoing packet: every packet through `lo`, and every packet
/// to an address that is not loopback, passes.
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
    let Some((dst, l4, protocol)) = packet_destination(ctx, ethertype) else {
        return PASS;
    };
    if !is_loopback(&dst) && !connected_to_loopback(ctx) {
        return PASS;
    }
    // The ports, when the transport header follows the IP header directly (0 otherwise).
    let dport = if protocol == proto::TCP || protocol == proto::UDP {
        load::<[u8; 4]>(ctx, l4).map_or(0, |p| u16::from_be_bytes([p[2], p[3]]))
    } else {
        0
    };
    // SAFETY: the skb pointer is the program's context (the sending socket's).
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // Only a pod in its own namespace (the allowance's scope): in the node's namespace
    // loopback leaves through devices by design (kube-proxy's NodePorts and the CNI's
    // hostPorts on `127.0.0.1`, DNATed in `OUTPUT` with `route_localnet`; a VRF's loopback
    // is its master device). One lookup, on this rare path only.
    let subject = locked::subject_of(cgroup_id).unwrap_or(identity::UNKNOWN);
    let subject_flags = locked::identity_flags(subject).unwrap_or(0);
    if subject_flags & (flags::OWN_NETNS | flags::SHARED_NETNS) != flags::OWN_NETNS {
        return PASS;
    }
    let (global_audit, generation) = crate::audit_and_generation();
    let v = if global_audit {
        verdict::AUDIT
    } else {
        verdict::DENY
    };
    count(hook::EGRESS, v, reason::MARTIAN_DESTINATION);
    crate::report::emit(&crate::report::Report {
        cgroup_id,
        pid_tgid: 0,
        subject,
        destination: identity::WORLD,
        daddr: dst.addr,
        family: dst.family,
        dport,
        protocol,
        hook: hook::EGRESS,
        verdict: v,
        reason: reason::MARTIAN_DESTINATION,
        generation: generation as u32,
        sock_type: 0,
        sock_protocol: 0,
        peer: [ZERO_WORD; 4],
        task: false,
    });
    if global_audit {
        PASS
    } else {
        DROP
    }
}

/// Whether the packet's socket is connected to a loopback address (`127.0.0.0/8`, `::1`, or
/// `::ffff:127.x` on a dual-stack socket): with the packet going elsewhere, its namespace
/// rewrote the destination (an iptables `DNAT` in a pod with `NET_ADMIN`) after the connect
/// hooks allowed the pod's own loopback.
#[inline(always)]
fn connected_to_loopback(ctx: &SkBuffContext) -> bool {
    let skb: *const __sk_buff = ctx.skb.skb;
    // SAFETY: one 8-byte context load; the socket pointer may be null (checked), and its
    // `family` and destination are readable on every socket the kernel hands in
    // (`sock_common`), each a full 32-bit load.
    unsafe {
        let sk: *const bpf_sock = read_volatile(&(*skb).__bindgen_anon_2.sk).cast_const();
        if sk.is_null() {
            return false;
        }
        match read_volatile(&(*sk).family) {
            AF_INET => is_loopback(&Destination {
                addr: [
                    read_volatile(&(*sk).dst_ip4),
                    ZERO_WORD,
                    ZERO_WORD,
                    ZERO_WORD,
                ],
                family: FAMILY_V4,
            }),
            AF_INET6 => is_loopback(&six_or_mapped([
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ])),
            _ => false,
        }
    }
}

/// The packet's destination (address words in memory order, as `DenyEvent::daddr`), the
/// offset of its transport header and its protocol (for IPv6 the fixed header's next header:
/// extension headers are not walked, the ports then read as 0).
#[inline(always)]
fn packet_destination(ctx: &SkBuffContext, ethertype: u16) -> Option<(Destination, usize, u8)> {
    if ethertype == ETH_P_IP {
        let ip: [u8; 20] = load(ctx, 0)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let d = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
        let dst = Destination {
            addr: [d, ZERO_WORD, ZERO_WORD, ZERO_WORD],
            family: FAMILY_V4,
        };
        return Some((dst, ihl, ip[9]));
    }
    if ethertype == ETH_P_IPV6 {
        let addr: [u32; 4] = load(ctx, 24)?;
        let next: u8 = load(ctx, 6)?;
        let dst = Destination {
            addr,
            family: FAMILY_V6,
        };
        return Some((dst, IPV6_HEADER, next));
    }
    None
}

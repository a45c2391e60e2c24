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
use enforcer_common::{flags, hook, identity, reason, verdict};

use crate::{count, locked, FAMILY_V4, FAMILY_V6, ZERO_WORD};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER: usize = 40;
/// The loopback device's index in every network namespace (registered first, never moved).
const LOOPBACK_IFINDEX: u32 = 1;
/// `::1`'s last address word, in memory order.
const LOOPBACK_V6_WORD3: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in memory order.
const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// `bpf_sock::family` values.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// cgroup_skb return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

#[inline(always)]
fn load<T>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

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
    let Some((daddr, family, l4, protocol)) =
        loopback_destination(ctx, ethertype).or_else(|| loopback_socket_elsewhere(ctx, ethertype))
    else {
        return PASS;
    };
    // The ports, when the transport header follows the IP header directly (0 otherwise).
    let dport = if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
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
        daddr,
        family,
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

/// A packet of a socket connected to a loopback address that is going elsewhere: the
/// socket's namespace rewrote the destination (an iptables `DNAT` in a pod with
/// `NET_ADMIN`), after the connect hooks allowed the pod's own loopback. The packet's
/// destination, family, transport header offset and protocol, as [`loopback_destination`].
#[inline(always)]
fn loopback_socket_elsewhere(
    ctx: &SkBuffContext,
    ethertype: u16,
) -> Option<([u32; 4], u8, usize, u8)> {
    let skb: *const __sk_buff = ctx.skb.skb;
    // SAFETY: one 8-byte context load; the socket pointer may be null (checked), and its
    // `family` and destination are readable on every socket the kernel hands in
    // (`sock_common`), each a full 32-bit load.
    let connected_to_loopback = unsafe {
        let sk: *const bpf_sock = read_volatile(&(*skb).__bindgen_anon_2.sk).cast_const();
        if sk.is_null() {
            return None;
        }
        match read_volatile(&(*sk).family) {
            AF_INET => read_volatile(&(*sk).dst_ip4).to_ne_bytes()[0] == 127,
            AF_INET6 => {
                let d = [
                    read_volatile(&(*sk).dst_ip6[0]),
                    read_volatile(&(*sk).dst_ip6[1]),
                    read_volatile(&(*sk).dst_ip6[2]),
                    read_volatile(&(*sk).dst_ip6[3]),
                ];
                (d[0] == ZERO_WORD
                    && d[1] == ZERO_WORD
                    && d[2] == ZERO_WORD
                    && d[3] == LOOPBACK_V6_WORD3)
                    || (d[0] == ZERO_WORD
                        && d[1] == ZERO_WORD
                        && d[2] == V4_MAPPED_WORD2
                        && d[3].to_ne_bytes()[0] == 127)
            }
            _ => false,
        }
    };
    if !connected_to_loopback {
        return None;
    }
    if ethertype == ETH_P_IP {
        let ip: [u8; 20] = load(ctx, 0)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let d = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
        return Some(([d, ZERO_WORD, ZERO_WORD, ZERO_WORD], FAMILY_V4, ihl, ip[9]));
    }
    if ethertype == ETH_P_IPV6 {
        let d: [u32; 4] = load(ctx, 24)?;
        let next: u8 = load(ctx, 6)?;
        return Some((d, FAMILY_V6, IPV6_HEADER, next));
    }
    None
}

/// The packet's destination words (memory order, as `DenyEvent::daddr`), family, transport
/// header offset and protocol, if the destination is a loopback address: `127.0.0.0/8` or
/// `::1` (an IPv4-mapped `::ffff:127.x` is never routed).
#[inline(always)]
fn loopback_destination(ctx: &SkBuffContext, ethertype: u16) -> Option<([u32; 4], u8, usize, u8)> {
    if ethertype == ETH_P_IP {
        let ip: [u8; 20] = load(ctx, 0)?;
        if ip[16] != 127 {
            return None;
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let d = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
        return Some(([d, ZERO_WORD, ZERO_WORD, ZERO_WORD], FAMILY_V4, ihl, ip[9]));
    }
    if ethertype == ETH_P_IPV6 {
        let d: [u32; 4] = load(ctx, 24)?;
        let next: u8 = load(ctx, 6)?;
        let loopback = d[0] == ZERO_WORD
            && d[1] == ZERO_WORD
            && d[2] == ZERO_WORD
            && d[3] == LOOPBACK_V6_WORD3;
        return loopback.then_some((d, FAMILY_V6, IPV6_HEADER, next));
    }
    None
}

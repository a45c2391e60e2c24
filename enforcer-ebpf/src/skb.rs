//! What the two `cgroup_skb` programs (`wire::ingress`, `martian::egress`) share: the packet's
//! framing constants, their return values and the bounded packet load.

use aya_ebpf::programs::SkBuffContext;

/// The ethertypes of `__sk_buff::protocol` (host order after `from_be`).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// The IPv4 header without options, bytes.
pub const IPV4_HEADER_MIN: usize = 20;
/// The IPv6 fixed header, bytes (extension headers follow it).
pub const IPV6_HEADER: usize = 40;

/// The loopback device's index in every network namespace (registered first, never moved;
/// the kernel stamps `ingress_ifindex` anew on every receive).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// cgroup_skb return values.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// `size_of::<T>()` bytes of the packet from `offset` (network layer at 0); `None` past its
/// end.
#[inline(always)]
pub fn load<T>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

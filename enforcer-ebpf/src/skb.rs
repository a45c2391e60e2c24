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

/// Whether an IPv6 next header is an extension header (RFC 8200 4.1, and ESP, AH, Mobility,
/// HIP, Shim6). Those [`skip_extension_headers`] leaves in place hide what follows them.
#[inline(always)]
pub fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        HOP_BY_HOP
            | ROUTING
            | FRAGMENT
            | ENCAPSULATING_SECURITY_PAYLOAD
            | AUTHENTICATION
            | DESTINATION_OPTIONS
            | MOBILITY
            | HOST_IDENTITY
            | SHIM6
    )
}

/// The extension headers the walk does not step over: fragment 44, ESP 50 (RFC 4303),
/// Mobility 135 (RFC 6275), HIP 139 (RFC 7401), Shim6 140 (RFC 5533).
const FRAGMENT: u8 = 44;
const ENCAPSULATING_SECURITY_PAYLOAD: u8 = 50;
const MOBILITY: u8 = 135;
const HOST_IDENTITY: u8 = 139;
const SHIM6: u8 = 140;

/// IPv6 extension headers [`skip_extension_headers`] steps over: hop-by-hop options 0 (the
/// kernel's own BIG TCP jumbo header among them), routing 43, destination options 60 and
/// the authentication header 51 (RFC 8200 4.3-4.6, RFC 4302 2).
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const DESTINATION_OPTIONS: u8 = 60;
const AUTHENTICATION: u8 = 51;
/// How many extension headers are stepped over at most (a bound for the verifier). The
/// kernel adds one of its own (BIG TCP's hop-by-hop jumbo header); a socket's sticky options
/// can add up to four more, and a packet with more than the bound is what its caller treats
/// as hiding its transport header.
const MAX_EXTENSION_HEADERS: usize = 3;

/// The header that follows IPv6 extension headers: from `next` at `offset`, steps over up
/// to `MAX_EXTENSION_HEADERS` of those it knows (each names the next and gives its length
/// in its second byte) and returns the first other one's type and offset (ESP, a fragment
/// header, a transport header, or an unknown one, or where a header could not be read).
#[inline(always)]
pub fn skip_extension_headers(ctx: &SkBuffContext, next: u8, offset: usize) -> (u8, usize) {
    let (mut next, mut offset) = (next, offset);
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !matches!(
            next,
            HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS | AUTHENTICATION
        ) {
            break;
        }
        let Some([following, length]) = load::<[u8; 2]>(ctx, offset) else {
            break;
        };
        offset += if next == AUTHENTICATION {
            // In 4-octet units, less 2 (RFC 4302 2.2).
            (length as usize + 2) * 4
        } else {
            // In 8-octet units, less the first 8 octets (RFC 8200 4.3).
            (length as usize + 1) * 8
        };
        next = following;
    }
    (next, offset)
}

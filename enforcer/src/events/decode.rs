//! Bytes from the ring buffer -> the shared event struct. The kernel and this side compile the
//! same `DenyEvent`, so decoding is a size check and an unaligned read.

use enforcer_common::{hook, reason, verdict, DenyEvent};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {got} bytes, expected at least {expected}")]
    Short { got: usize, expected: usize },
}

pub fn decode(bytes: &[u8]) -> Result<DenyEvent, DecodeError> {
    if bytes.len() < DenyEvent::SIZE {
        return Err(DecodeError::Short {
            got: bytes.len(),
            expected: DenyEvent::SIZE,
        });
    }
    // SAFETY: the length is checked above, DenyEvent is plain old data (every bit pattern
    // valid), and read_unaligned makes no alignment assumption about the ring buffer slot.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

pub fn reason_name(code: u8) -> &'static str {
    match code {
        reason::ALLOWED => "allowed",
        reason::UNKNOWN_SUBJECT => "unknown_subject",
        reason::QUARANTINED => "quarantined",
        reason::TENANT_MISMATCH => "tenant_mismatch",
        reason::NO_PERMIT => "no_permit",
        reason::UNSPECIFIED_DESTINATION => "unspecified_destination",
        reason::UNSUPPORTED_SOCKET => "unsupported_socket",
        reason::UNIDENTIFIED_DESTINATION => "unidentified_destination",
        reason::MISSING_TAG => "missing_tag",
        reason::BAD_TAG => "bad_tag",
        reason::NOT_ALLOWED => "not_allowed",
        reason::FLOW_TABLE_FULL => "flow_table_full",
        reason::RATE_LIMITED => "rate_limited",
        reason::STALE_TAG => "stale_tag",
        reason::REPLAYED_TAG => "replayed_tag",
        reason::FOREIGN_ADDRESS => "foreign_address",
        reason::MARTIAN_DESTINATION => "martian_destination",
        _ => "unknown",
    }
}

pub fn verdict_name(code: u8) -> &'static str {
    match code {
        verdict::ALLOW => "allow",
        verdict::DENY => "deny",
        verdict::AUDIT => "audit",
        _ => "unknown",
    }
}

pub fn hook_name(code: u8) -> &'static str {
    match code {
        hook::CONNECT4 => "connect4",
        hook::CONNECT6 => "connect6",
        hook::SENDMSG4 => "sendmsg4",
        hook::SENDMSG6 => "sendmsg6",
        hook::SOCK_CREATE => "sock_create",
        hook::INGRESS => "ingress",
        hook::BIND4 => "bind4",
        hook::BIND6 => "bind6",
        hook::EGRESS => "egress",
        _ => "unknown",
    }
}

/// `comm` is NUL-padded.
pub fn comm(event: &DenyEvent) -> String {
    let end = event
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(event.comm.len());
    String::from_utf8_lossy(&event.comm[..end]).into_owned()
}

/// `socket()` type names (`SOCK_*`), for `sock_create` events.
pub fn socket_type_name(code: u16) -> String {
    match code {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        4 => "rdm".into(),
        5 => "seqpacket".into(),
        6 => "dccp".into(),
        other => other.to_string(),
    }
}

/// IP protocol names of the sockets `sock_create` refuses (numbers otherwise).
pub fn socket_protocol_name(code: u16) -> String {
    match code {
        0 => "ip".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        255 => "raw".into(),
        262 => "mptcp".into(),
        other => other.to_string(),
    }
}

pub fn destination_ip(event: &DenyEvent) -> std::net::IpAddr {
    if event.family == 4 {
        let [a, b, c, d, ..] = event.daddr;
        std::net::Ipv4Addr::new(a, b, c, d).into()
    } else {
        std::net::Ipv6Addr::from(event.daddr).into()
    }
}

/// The peer (the SYN's source) of an `ingress` event, in the form of `daddr`.
pub fn peer_ip(event: &DenyEvent) -> std::net::IpAddr {
    if event.family == 4 {
        let [a, b, c, d, ..] = event.peer;
        std::net::Ipv4Addr::new(a, b, c, d).into()
    } else {
        std::net::Ipv6Addr::from(event.peer).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::proto;

    fn sample() -> DenyEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[127, 10, 2, 10]);
        DenyEvent {
            timestamp_ns: 42,
            cgroup_id: 7,
            pid_tgid: (1234u64 << 32) | 1240,
            subject: 300,
            destination: 301,
            daddr,
            dport: 6333,
            family: 4,
            protocol: proto::TCP,
            hook: hook::CONNECT4,
            verdict: verdict::DENY,
            reason: reason::TENANT_MISMATCH,
            _pad: 0,
            comm,
            policy_generation: 7,
            sock_type: 0,
            sock_protocol: 0,
            peer: [0; 16],
            count: 1,
            _pad2: 0,
        }
    }

    fn as_bytes(event: &DenyEvent) -> Vec<u8> {
        // SAFETY: DenyEvent is repr(C) plain old data without implicit padding.
        unsafe {
            std::slice::from_raw_parts((event as *const DenyEvent).cast::<u8>(), DenyEvent::SIZE)
        }
        .to_vec()
    }

    #[test]
    fn decodes_what_the_kernel_writes() {
        let event = sample();
        let mut bytes = vec![0xAA]; // an odd offset proves no alignment is assumed
        bytes.extend(as_bytes(&event));
        let decoded = decode(&bytes[1..]).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(comm(&decoded), "curl");
        assert_eq!(destination_ip(&decoded).to_string(), "127.10.2.10");
        assert_eq!(reason_name(decoded.reason), "tenant_mismatch");
        assert_eq!(hook_name(decoded.hook), "connect4");
        assert_eq!(decoded.pid_tgid >> 32, 1234);
    }

    #[test]
    fn rejects_short_records() {
        let bytes = as_bytes(&sample());
        assert_eq!(
            decode(&bytes[..10]),
            Err(DecodeError::Short {
                got: 10,
                expected: DenyEvent::SIZE
            })
        );
    }

    #[test]
    fn reads_ipv6_destinations() {
        let mut event = sample();
        event.family = 6;
        event.daddr = "fd00::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(destination_ip(&event).to_string(), "fd00::10");
    }

    /// Every hook and reason the kernel has a name here (metrics labels, events): none is
    /// "unknown", and no two share one.
    #[test]
    fn every_hook_and_reason_has_its_own_name() {
        let hooks: std::collections::BTreeSet<_> = (0..hook::COUNT as u8).map(hook_name).collect();
        assert_eq!(hooks.len(), hook::COUNT);
        assert!(!hooks.contains("unknown"));
        let reasons: std::collections::BTreeSet<_> =
            (0..reason::COUNT as u8).map(reason_name).collect();
        assert_eq!(reasons.len(), reason::COUNT);
        assert!(!reasons.contains("unknown"));
        assert_eq!(hook_name(hook::BIND6), "bind6");
        assert_eq!(reason_name(reason::FOREIGN_ADDRESS), "foreign_address");
        assert_eq!(hook_name(hook::EGRESS), "egress");
        assert_eq!(
            reason_name(reason::MARTIAN_DESTINATION),
            "martian_destination"
        );
    }

    #[test]
    fn names_the_new_hook_and_reasons() {
        assert_eq!(hook_name(hook::SOCK_CREATE), "sock_create");
        assert_eq!(
            reason_name(reason::UNSUPPORTED_SOCKET),
            "unsupported_socket"
        );
        assert_eq!(
            reason_name(reason::UNSPECIFIED_DESTINATION),
            "unspecified_destination"
        );
        assert_eq!(
            reason_name(reason::UNIDENTIFIED_DESTINATION),
            "unidentified_destination"
        );
        for code in 0..reason::COUNT as u8 {
            assert_ne!(reason_name(code), "unknown", "reason {code} has no name");
        }
        assert_eq!(socket_type_name(3), "raw");
        assert_eq!(socket_protocol_name(1), "icmp");
        assert_eq!(socket_protocol_name(999), "999");
    }

    #[test]
    fn comm_without_nul_uses_all_sixteen_bytes() {
        let mut event = sample();
        event.comm = *b"abcdefghijklmnop";
        assert_eq!(comm(&event), "abcdefghijklmnop");
    }
}

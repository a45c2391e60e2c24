//! Tracked flows in userspace: the pinned `FLOWS` records (read by `enforcer flows` and by
//! the agent), the `FLOW_EVENTS` records, and revocation: re-deciding every record against the
//! tables in force and closing the ones no longer permitted ([`destroy`]).

pub mod destroy;
pub mod list;
pub mod missed;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use enforcer_common::{
    entry, flags, flow_flags, identity, maps, proto, tcp_state, FlowEvent, FlowRecord, PolicyKey,
};

use crate::datapath::Tables;

/// Every record of the pinned `FLOWS` map under `dir` (the versioned pin directory), by
/// socket cookie. Records change while they are read (the kernel adds and deletes them): a
/// record deleted between listing its key and reading it is skipped.
pub fn read(dir: &Path) -> Result<Vec<(u64, FlowRecord)>> {
    let map = flows_map(dir)?;
    let mut out = Vec::new();
    for key in map.keys() {
        let Ok(cookie) = key else { continue };
        if let Ok(record) = map.get(&cookie, 0) {
            out.push((cookie, record));
        }
    }
    out.sort_by_key(|(_, r)| (r.start_ns, r.sport));
    Ok(out)
}

/// The record of `cookie` in the pinned `FLOWS` map under `dir`, `None` when it has none.
pub fn record(dir: &Path, cookie: u64) -> Result<Option<FlowRecord>> {
    match flows_map(dir)?.get(&cookie, 0) {
        Ok(record) => Ok(Some(record)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error).context("reading a FLOWS record"),
    }
}

/// The pinned `FLOWS` map under `dir`, read-only use.
fn flows_map(dir: &Path) -> Result<HashMap<MapData, u64, FlowRecord>> {
    let path = dir.join(maps::FLOWS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("map {} has an unexpected type or layout", maps::FLOWS))
}

/// Deletes the record of `cookie` (a socket that is gone without its CLOSE callback: a
/// connected UDP socket, or one closed while no program was attached) and returns it to its
/// tenant's share. Returns the record this call deleted; `None` when there was none (absent,
/// or the kernel ended it meanwhile and reports its close itself).
///
/// The share is returned in `FLOW_TENANTS_FORGOTTEN`, which only the agent writes (a
/// read-modify-write of the kernel's own counter would race its atomic adds).
///
/// Only the record `seen` is deleted: a socket that disconnected and connected again under
/// the same cookie since (a new `start_ns`, another 4-tuple) is a live flow, left alone.
pub fn forget(dir: &Path, cookie: u64, seen: &FlowRecord) -> Result<Option<FlowRecord>> {
    let path = dir.join(maps::FLOWS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
    let mut map: HashMap<MapData, u64, FlowRecord> = HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("map {} has an unexpected type or layout", maps::FLOWS))?;
    let record = match map.get(&cookie, 0) {
        Ok(record) => record,
        Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
        Err(error) => return Err(error).context("reading a FLOWS record"),
    };
    let same_flow = |r: &FlowRecord| {
        (r.start_ns, r.sport, r.dport, r.saddr, r.daddr)
            == (
                seen.start_ns,
                seen.sport,
                seen.dport,
                seen.saddr,
                seen.daddr,
            )
    };
    if !same_flow(&record) {
        return Ok(None);
    }
    // Taken and compared again, in one step with the delete: the socket may have connected
    // again since the read above (a connect the kernel refused leaves a socket no listing
    // shows, which may connect again), and its new record must not go (red-team review 32).
    let record = match take(fd, cookie).context("deleting a FLOWS record")? {
        // The kernel ended it meanwhile (and returned its share).
        None => return Ok(None),
        Some(taken) if !same_flow(&taken) => {
            // Put back unless the socket wrote yet another since (the kernel's is newer, and
            // took a share of its own): then the one taken is gone for good, and so is its
            // share (red-team review 34).
            if map
                .insert(cookie, taken, crate::datapath::locked::BPF_NOEXIST)
                .is_err()
            {
                return_share(dir, &taken)?;
            }
            return Ok(None);
        }
        Some(taken) => taken,
    };
    return_share(dir, &record)?;
    Ok(Some(record))
}

/// Returns the share of `record`, deleted by the agent, to its tenant
/// (`FLOW_TENANTS_FORGOTTEN`).
fn return_share(dir: &Path, record: &FlowRecord) -> Result<()> {
    let path = dir.join(maps::FLOW_TENANTS_FORGOTTEN);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let mut forgotten: HashMap<MapData, u32, u64> = HashMap::try_from(Map::HashMap(data))
        .with_context(|| {
            format!(
                "map {} has an unexpected type",
                maps::FLOW_TENANTS_FORGOTTEN
            )
        })?;
    let before = forgotten.get(&record.tenant, 0).unwrap_or(0);
    forgotten
        .insert(record.tenant, before + 1, 0)
        .context("returning a record to its tenant's share")
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (`include/uapi/linux/bpf.h`; hash maps since Linux 5.14).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `bpf_attr` of the element commands: map fd, key and value pointers, flags.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes the `FLOWS` record of `cookie` from the map `fd` and returns it, in one step;
/// `None` when there was none.
fn take(fd: std::os::fd::RawFd, cookie: u64) -> std::io::Result<Option<FlowRecord>> {
    let mut value = std::mem::MaybeUninit::<FlowRecord>::uninit();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(&cookie) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the bpf_attr prefix of the command; key and value point to live
    // buffers of the map's key and value sizes (u64, FlowRecord).
    if let Err(error) =
        unsafe { crate::datapath::bpf_syscall(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) }
    {
        return match error.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(error),
        };
    }
    // SAFETY: the kernel wrote the whole value (every bit pattern of the plain-data record is
    // valid).
    Ok(Some(unsafe { value.assume_init() }))
}

/// Sets how many `FLOWS` records one tenant may hold at once: `limit`, or by default a
/// quarter of the table (`capacity::FLOW_TENANT_SHARE_DIVISOR`), so that one tenant filling
/// its share leaves the rest of the table to the others. Written before the programs are
/// attached (and at every start, so a restart can change it).
pub fn set_tenant_limit(dir: &Path, limit: Option<u32>) -> Result<()> {
    let table = aya::maps::MapInfo::from_pin(dir.join(maps::FLOWS))
        .with_context(|| format!("reading map info of {}", maps::FLOWS))?
        .max_entries();
    let limit =
        limit.unwrap_or((table / enforcer_common::capacity::FLOW_TENANT_SHARE_DIVISOR).max(1));
    let path = dir.join(maps::FLOW_TENANT_LIMIT);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let mut map: aya::maps::Array<MapData, u64> = aya::maps::Array::try_from(Map::Array(data))
        .with_context(|| format!("map {} has an unexpected type", maps::FLOW_TENANT_LIMIT))?;
    map.set(0, u64::from(limit), 0)
        .with_context(|| format!("writing {}", maps::FLOW_TENANT_LIMIT))?;
    tracing::debug!(limit, table, "flow records per tenant");
    Ok(())
}

/// Flow events the kernel could not write (`FLOW_EVENTS` full), summed over the CPUs.
pub fn lost(dir: &Path) -> Result<u64> {
    let path = dir.join(maps::LOST_FLOW_EVENTS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .with_context(|| format!("map {} has an unexpected type", maps::LOST_FLOW_EVENTS))?;
    Ok(map
        .get(&0, 0)
        .context("reading LOST_FLOW_EVENTS")?
        .iter()
        .sum())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("flow ring buffer record of {got} bytes, expected at least {expected}")]
pub struct ShortRecord {
    pub got: usize,
    pub expected: usize,
}

/// Bytes from `FLOW_EVENTS` -> the shared struct (both sides compile the same definition).
pub fn decode(bytes: &[u8]) -> Result<FlowEvent, ShortRecord> {
    if bytes.len() < FlowEvent::SIZE {
        return Err(ShortRecord {
            got: bytes.len(),
            expected: FlowEvent::SIZE,
        });
    }
    // SAFETY: length checked; FlowEvent is plain old data; no alignment is assumed.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

fn address(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        let [a, b, c, d, ..] = *bytes;
        Ipv4Addr::new(a, b, c, d).into()
    } else {
        Ipv6Addr::from(*bytes).into()
    }
}

/// The flow of a UDP record's socket connected to `at` (address, port) instead of the
/// record's destination: a record marked `flow_flags::CONNECTED_AGAIN` whose socket is still
/// where it was before the connect that wrote it ([`previous_peer`]), because the kernel
/// refused that connect after the hook. The record itself (no longer `ENDED`) when `at` is
/// its destination; the record moved to `at` when that is a tracked destination (`subject`,
/// `start_ns` and `policy_generation` stay the record's: the connect that made the flow there
/// left no record of its own); `None` when it is not tracked (no tracked flow).
pub fn moved_to(tables: &Tables, record: &FlowRecord, at: (IpAddr, u16)) -> Option<FlowRecord> {
    let (ip, port) = (at.0.to_canonical(), at.1);
    let mut flow = *record;
    flow.flags &= !flow_flags::ENDED;
    if (ip, port) == (destination_ip(record), record.dport) {
        return Some(flow);
    }
    let (destination, _) = tables.destination_of(ip);
    let tracked = tables
        .identity_info(destination)
        .is_some_and(|info| info.flags & flags::TRACKED != 0);
    if !tracked {
        return None;
    }
    flow.destination = destination;
    flow.dport = port;
    flow.daddr = [0; 16];
    match ip {
        IpAddr::V4(v4) => {
            flow.family = 4;
            flow.daddr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            flow.family = 6;
            flow.daddr = v6.octets();
        }
    }
    Some(flow)
}

/// Where the socket of a UDP record marked `flow_flags::CONNECTED_AGAIN` was connected
/// before the connect that marked it (`peer`, `peer_port`, `peer_family`), if it was.
pub fn previous_peer(r: &FlowRecord) -> Option<(IpAddr, u16)> {
    (r.protocol == proto::UDP && r.flags & flow_flags::CONNECTED_AGAIN != 0 && r.peer_port != 0)
        .then(|| (address(r.peer_family, &r.peer), r.peer_port))
}

/// Where the IP cache of `desired` puts the tracked destinations (`flags::TRACKED`), as
/// the kernel's longest-prefix match reads it: each tracked prefix, and each untracked one
/// inside a tracked one (`false`: it takes its addresses out of it), longest first, so that
/// the first a peer falls into decides. `None` when there are more than
/// [`MAX_TRACKED_PREFIXES`] of them: a listing narrowed to them would not be worth its
/// filter (the agent does without it).
pub fn tracked_prefixes(desired: &crate::datapath::DesiredState) -> Option<Vec<TrackedPrefix>> {
    let tracked = |id: &u32| {
        desired
            .identities
            .get(id)
            .is_some_and(|info| info.flags & flags::TRACKED != 0)
    };
    let all = || {
        let v4 = desired
            .ipcache_v4
            .iter()
            .map(|(&(len, addr), id)| (IpAddr::from(addr), len as u8, tracked(id)));
        let v6 = desired
            .ipcache_v6
            .iter()
            .map(|(&(len, addr), id)| (IpAddr::from(addr), len as u8, tracked(id)));
        v4.chain(v6)
    };
    let tracked: Vec<TrackedPrefix> = all().filter(|p| p.2).collect();
    if tracked.len() > MAX_TRACKED_PREFIXES {
        return None;
    }
    let inside_tracked = |&(ip, len, _): &TrackedPrefix| {
        tracked
            .iter()
            .any(|&(t, t_len, _)| t_len < len && within(ip, t, t_len))
    };
    let mut prefixes = tracked.clone();
    prefixes.extend(all().filter(|p| !p.2 && inside_tracked(p)));
    if prefixes.len() > MAX_TRACKED_PREFIXES {
        return None;
    }
    prefixes.sort_by_key(|p| std::cmp::Reverse(p.1));
    Some(prefixes)
}

/// An IP cache prefix: address, length, whether it is a tracked destination's.
pub type TrackedPrefix = (IpAddr, u8, bool);

/// At most this many prefixes in a narrowed listing's filter (32 bytes each at most: the
/// filter stays far below its 64 KiB attribute, and the kernel's audit of it, quadratic in
/// its length, cheap).
pub const MAX_TRACKED_PREFIXES: usize = 1_024;

/// Whether `ip` lies in `net`/`len` (of the same family).
fn within(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The record's destination address.
pub fn destination_ip(r: &FlowRecord) -> IpAddr {
    address(r.family, &r.daddr)
}

/// The address and port (host order) the record's socket is connected to: where a socket
/// load balancer sent it (`FlowRecord::peer`, of either family), else the judged destination.
pub fn peer(r: &FlowRecord) -> (IpAddr, u16) {
    // A UDP record's `peer` is its socket's previous peer ([`previous_peer`]).
    if r.protocol == proto::TCP && r.peer_port != 0 {
        (address(tuple_family(r), &r.peer), r.peer_port)
    } else {
        (destination_ip(r), r.dport)
    }
}

/// [`peer`] when it is not the judged destination (a socket load balancer's backend).
pub fn peer_elsewhere(r: &FlowRecord) -> Option<(IpAddr, u16)> {
    let peer = peer(r);
    (peer != (destination_ip(r), r.dport)).then_some(peer)
}

/// The record's local address (in the family of [`peer`]); `None` until the TCP handshake
/// completed (and for UDP).
pub fn source_ip(r: &FlowRecord) -> Option<IpAddr> {
    (r.sport != 0).then(|| address(tuple_family(r), &r.saddr))
}

/// The family of the socket's own addresses (`saddr`, `peer`): the judged one in records
/// written before `peer_family` was kept.
fn tuple_family(r: &FlowRecord) -> u8 {
    match r.peer_family {
        0 => r.family,
        family => family,
    }
}

/// Payload bytes of a closed TCP flow, `(sent, received)`, from the kernel's counters in
/// sequence space: the SYN is one in `bytes_acked`, our FIN one more once acked (the socket
/// left FIN_WAIT2, CLOSING or LAST_ACK for CLOSE), the peer's FIN one in `bytes_received`
/// (`FIN_IN`). A socket closed from FIN_WAIT2 by the FIN-timeout, without a FIN from the
/// peer, is the one case read as if the FIN had come (received one byte short).
pub fn payload_bytes(e: &FlowEvent) -> (u64, u64) {
    let our_fin = matches!(
        e.last_state,
        tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK
    );
    // FIN_WAIT2 -> CLOSE is tcp_time_wait() after the peer's FIN: the kernel goes straight to
    // CLOSE without a state callback for it, so FIN_IN was never set.
    let peer_fin = e.record.flags & flow_flags::FIN_IN != 0 || e.last_state == tcp_state::FIN_WAIT2;
    let sent = e.bytes_acked.saturating_sub(1 + u64::from(our_fin));
    let received = e.bytes_received.saturating_sub(u64::from(peer_fin));
    (sent, received)
}

/// What the tables in force say about a recorded flow now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Permitted,
    /// Not permitted (`reason`: `quarantined`, `no_permit`, `tenant_mismatch`, or
    /// `unknown_subject` when its cgroup no longer maps to an identity), with the subject
    /// and destination identities as the kernel would find them now.
    Denied {
        reason: &'static str,
        subject: u32,
        destination: u32,
    },
    /// Would be denied, but audit mode (global or the subject's) lets it through.
    Audited,
}

/// Re-decides one flow the way the connect hook would now: the subject from its cgroup, the
/// destination from its address, quarantine, the policy table in force (exact port, then any
/// port, through [`Tables::lookup`]), audit.
pub fn decide(tables: &Tables, record: &FlowRecord) -> Result<Decision> {
    let global_audit = tables.config()?.audit != 0;
    let subject = tables
        .identity_of_cgroup(record.cgroup_id)
        .unwrap_or(identity::UNKNOWN);
    let (destination, _) = tables.destination_of(destination_ip(record));
    let denied = |reason| Decision::Denied {
        reason,
        subject,
        destination,
    };
    let Some(info) = (subject != identity::UNKNOWN)
        .then(|| tables.identity_info(subject))
        .flatten()
    else {
        return Ok(if global_audit {
            Decision::Audited
        } else {
            denied("unknown_subject")
        });
    };
    if info.flags & flags::EXEMPT != 0 {
        return Ok(Decision::Permitted);
    }
    if info.flags & flags::QUARANTINED != 0 {
        return Ok(denied("quarantined"));
    }
    let key = PolicyKey {
        subject,
        destination,
        dport: record.dport,
        protocol: record.protocol,
        _pad: 0,
    };
    if let Some((_, value)) = tables.lookup(key)? {
        if value.verdict == entry::ALLOW {
            return Ok(Decision::Permitted);
        }
    }
    if global_audit || info.flags & flags::AUDIT != 0 {
        return Ok(Decision::Audited);
    }
    let destination_tenant = tables.identity_info(destination).map(|d| d.tenant);
    let reason = match destination_tenant {
        Some(t) if t != 0 && t != info.tenant => "tenant_mismatch",
        _ if destination == identity::UNIDENTIFIED => "unidentified_destination",
        _ => "no_permit",
    };
    Ok(denied(reason))
}

/// The protocol's name in events and the CLI.
pub fn protocol_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The narrowed listing's prefixes read the IP cache as the kernel does: the tracked
    /// ones, and the untracked ones inside them that take addresses out, longest first;
    /// untracked prefixes elsewhere, or around a tracked one, are left out.
    #[test]
    fn tracked_prefixes_follow_the_longest_match() {
        let mut desired = crate::datapath::DesiredState::default();
        let tracked = enforcer_common::IdentityInfo {
            flags: flags::TRACKED,
            ..Default::default()
        };
        desired.identities.insert(100, tracked);
        desired.identities.insert(101, Default::default());
        desired.ipcache_v4.insert((24, [10, 1, 2, 0]), 100);
        desired.ipcache_v4.insert((32, [10, 1, 2, 7]), 101);
        desired.ipcache_v4.insert((32, [10, 1, 3, 7]), 101);
        desired.ipcache_v4.insert((16, [10, 1, 0, 0]), 101);
        desired.ipcache_v6.insert((128, [0xfd; 16]), 100);
        let prefixes = tracked_prefixes(&desired).expect("few prefixes");
        let v4 = |a: [u8; 4]| IpAddr::from(a);
        assert_eq!(
            prefixes,
            vec![
                (IpAddr::from([0xfd; 16]), 128, true),
                (v4([10, 1, 2, 7]), 32, false),
                (v4([10, 1, 2, 0]), 24, true),
            ]
        );
        for i in 0..=MAX_TRACKED_PREFIXES as u32 {
            let a = (0x0a00_0000 + i).to_be_bytes();
            desired.ipcache_v4.insert((32, a), 100);
        }
        assert_eq!(tracked_prefixes(&desired), None);
    }

    fn closed(acked: u64, received: u64, last_state: u8, fin_in: bool) -> FlowEvent {
        FlowEvent {
            bytes_acked: acked,
            bytes_received: received,
            last_state,
            record: FlowRecord {
                flags: if fin_in { flow_flags::FIN_IN } else { 0 },
                ..FlowRecord::default()
            },
            ..FlowEvent::default()
        }
    }

    #[test]
    fn payload_leaves_out_syn_and_fins() {
        // We closed first: FIN_WAIT1 -> FIN_WAIT2 -> (peer FIN) CLOSE.
        assert_eq!(
            payload_bytes(&closed(1 + 100 + 1, 50 + 1, tcp_state::FIN_WAIT2, false)),
            (100, 50)
        );
        // The peer closed first: CLOSE_WAIT (FIN_IN) -> LAST_ACK -> CLOSE.
        assert_eq!(
            payload_bytes(&closed(1 + 7 + 1, 9 + 1, tcp_state::LAST_ACK, true)),
            (7, 9)
        );
        // Both at once: FIN_WAIT1 -> CLOSING (FIN_IN) -> CLOSE.
        assert_eq!(
            payload_bytes(&closed(1 + 3 + 1, 4 + 1, tcp_state::CLOSING, true)),
            (3, 4)
        );
        // Reset while established (a revocation): no FIN either way.
        assert_eq!(
            payload_bytes(&closed(1 + 10, 20, tcp_state::ESTABLISHED, false)),
            (10, 20)
        );
    }

    #[test]
    fn short_flow_records_are_refused() {
        assert_eq!(
            decode(&[0u8; 8]),
            Err(ShortRecord {
                got: 8,
                expected: FlowEvent::SIZE
            })
        );
    }
}

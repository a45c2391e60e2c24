//! Connected UDP sockets whose last `connect()` the kernel may have refused after the hooks.
//!
//! The connect hooks judge a connect before the kernel makes it. A connected UDP socket
//! connected again ends its tracked flow there (reported closed), and its record moves to
//! the new destination (a tracked one) or is marked `ENDED` (an untracked one). The kernel
//! may then refuse the connect (a broadcast address without `SO_BROADCAST`, no route,
//! `::ffff:` on an IPv6-only socket) and leave the socket where it was: without a look, that
//! flow had no record naming it, and no revocation reported it (red-team review 28). The
//! hooks mark such a record `CONNECTED_AGAIN` and keep in it where the socket was connected
//! before (read from the socket); before a revocation pass decides the record, the agent
//! looks whether the socket is still there (`sock_diag`), once per record version.

use std::collections::BTreeMap;

use enforcer_common::{flow_flags, FlowRecord};

use super::Agent;
use crate::flows::{self, destroy::DiagSockets};

/// Where the socket of a record marked `CONNECTED_AGAIN` was found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Found {
    /// Where the record says: its last connect was made (or the socket was connected nowhere
    /// before it).
    Recorded,
    /// Still where it was before the record's connect: the kernel refused that connect.
    Previous,
}

/// What a look was about: a record version (`start_ns`, `flags`, previous peer and port, and
/// the count of connects the hooks moved or ended it by, in `wire_stamp`). A socket moves
/// only by a connect, which writes another version.
pub(super) type Version = (u64, u8, [u8; 16], u16, u16);

impl Agent {
    /// The flow a revocation pass decides for the UDP record `record` of socket `cookie`
    /// marked `CONNECTED_AGAIN`: the record where its connect was made (none for an `ENDED`
    /// one); the flow where the socket still is when the kernel refused that connect (none
    /// when that destination is not tracked). When the look cannot say (the namespace cannot
    /// be entered, a listing crowded with sockets connected to the same peer), the flow where
    /// the socket was is decided first, and taken when denied, so that a socket left there
    /// is never decided as moved (a socket that did move may then be reported stale there).
    pub(super) fn reconnected_flow(
        &mut self,
        cookie: u64,
        record: &FlowRecord,
        pids: &[u32],
        sockets: &mut DiagSockets,
    ) -> Option<FlowRecord> {
        let recorded = (record.flags & flow_flags::ENDED == 0).then_some(*record);
        let Some(previous) = flows::previous_peer(record) else {
            return recorded;
        };
        let version = (
            record.start_ns,
            record.flags,
            record.peer,
            record.peer_port,
            record.wire_stamp,
        );
        let found = match self.reconnected.get(&cookie) {
            Some(&(seen, found)) if seen == version => Some(found),
            _ => match flows::destroy::udp_connected_to(cookie, record, previous, pids, sockets) {
                Ok(still) => {
                    let found = if still {
                        Found::Previous
                    } else {
                        Found::Recorded
                    };
                    self.reconnected.insert(cookie, (version, found));
                    Some(found)
                }
                Err(error) => {
                    tracing::warn!(
                        cookie,
                        "looking whether a UDP socket connected again is still where it was: {error}"
                    );
                    None
                }
            },
        };
        let tables = &self.datapath.tables;
        let there = || flows::moved_to(tables, record, previous);
        let denied = |flow: &FlowRecord| {
            matches!(
                flows::decide(tables, flow),
                Ok(flows::Decision::Denied { .. })
            )
        };
        match found {
            Some(Found::Recorded) => recorded,
            Some(Found::Previous) => there(),
            None => match there() {
                Some(flow) if denied(&flow) => Some(flow),
                flow => recorded.or(flow),
            },
        }
    }

    /// Forgets the looks at sockets whose records are gone (`live`: the cookies of the
    /// records a pass read).
    pub(super) fn retain_reconnected(&mut self, live: &std::collections::BTreeSet<u64>) {
        self.reconnected.retain(|cookie, _| live.contains(cookie));
    }
}

/// The looks made, by socket cookie (see [`Agent::reconnected_flow`]).
pub(super) type Looks = BTreeMap<u64, (Version, Found)>;

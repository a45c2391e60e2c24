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
//! looks whether the socket is still there (`sock_diag`). A look is kept for its record
//! version (a socket moves only by a connect, which writes a new one) for [`KEEP_LOOK`], one
//! that could not say for [`KEEP_UNKNOWN`], and a pass makes at most [`LOOKS_PER_PASS`] in
//! at most [`LOOK_TIME_PER_PASS`]: a workload reconnecting thousands of sockets, or crowding
//! its namespace so that each look lists many datagrams, cannot hold the agent's loop
//! (red-team reviews 32 and 34). A record without a usable look is
//! decided by the fallback (the flow where the socket was, first).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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

/// How long a look that found the socket is used for its record version: long enough that
/// a pass does not list again what it listed a moment ago, short enough that a look made
/// between the hook and the kernel's connect (the socket not moved yet) is soon made again.
const KEEP_LOOK: Duration = Duration::from_secs(60);

/// How long a look that could not say is used before the socket is looked for again.
const KEEP_UNKNOWN: Duration = Duration::from_secs(300);

/// Looks (each one or two listings of the sockets connected to one peer) one pass makes at
/// most.
pub(super) const LOOKS_PER_PASS: usize = 256;

/// The time one pass spends looking, at most (entering namespaces and listing): a workload
/// that gives each look thousands of sockets to list (every one of its records a new
/// version before each pass) made 256 looks cost seconds of the agent's loop.
pub(super) const LOOK_TIME_PER_PASS: Duration = Duration::from_millis(100);

/// What looks a pass may still make ([`LOOKS_PER_PASS`], [`LOOK_TIME_PER_PASS`]).
#[derive(Debug, Default)]
pub(super) struct LookBudget {
    made: usize,
    spent: Duration,
}

impl LookBudget {
    fn exhausted(&self) -> bool {
        self.made >= LOOKS_PER_PASS || self.spent >= LOOK_TIME_PER_PASS
    }
}

/// What a look was about: a record version (`start_ns`, `flags`, previous peer and port, and
/// the count of connects the hooks moved or ended it by, in `wire_stamp`). A socket moves
/// only by a connect, which writes another version.
pub(super) type Version = (u64, u8, [u8; 16], u16, u16);

impl Agent {
    /// The flow a revocation pass decides for the UDP record `record` of socket `cookie`
    /// marked `CONNECTED_AGAIN`: the record where its connect was made (none for an `ENDED`
    /// one); the flow where the socket still is when the kernel refused that connect (none
    /// when that destination is not tracked). When no look can say (the namespace cannot be
    /// entered, a listing crowded with sockets connected to the same peer, or this pass's
    /// `looks` are spent), the flow where the socket was is decided first, and taken
    /// when denied, so that a socket left there is never decided as moved (a socket that did
    /// move may then be reported stale there).
    pub(super) fn reconnected_flow(
        &mut self,
        cookie: u64,
        record: &FlowRecord,
        pids: &[u32],
        sockets: &mut DiagSockets,
        looks: &mut LookBudget,
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
        let kept = self
            .reconnected
            .get(&cookie)
            .and_then(|&(seen, found, at)| {
                let keep = if found.is_some() {
                    KEEP_LOOK
                } else {
                    KEEP_UNKNOWN
                };
                (seen == version && at.elapsed() < keep).then_some(found)
            });
        let found = match kept {
            Some(found) => found,
            None if looks.exhausted() => None,
            None => {
                let started = Instant::now();
                let look =
                    flows::destroy::udp_connected_to(cookie, record, previous, pids, sockets);
                looks.made += 1;
                looks.spent += started.elapsed();
                let found = match look {
                    Ok(true) => Some(Found::Previous),
                    Ok(false) => Some(Found::Recorded),
                    Err(error) => {
                        tracing::debug!(
                                cookie,
                                "looking whether a UDP socket connected again is still where it was: {error}"
                            );
                        None
                    }
                };
                self.reconnected
                    .insert(cookie, (version, found, Instant::now()));
                found
            }
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

/// The looks made, by socket cookie (see [`Agent::reconnected_flow`]): the record version,
/// what was found (`None`: the look could not say), and when.
pub(super) type Looks = BTreeMap<u64, (Version, Option<Found>, Instant)>;

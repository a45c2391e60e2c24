//! Where a tracked UDP flow's socket really is connected.
//!
//! The connect hooks judge a connect before the kernel makes it, so a UDP record names the
//! connect its socket's hooks judged last, which is not always where the kernel left the
//! socket: the kernel may refuse a connect after the hooks (below), and two threads
//! connecting one socket at once can have their hooks and the kernel's connects run in
//! opposite orders, since the hook runs under the socket's lock and the kernel's connect
//! takes it again after (red-team review 34: the socket left at a tracked destination whose
//! record the other thread's hook had ended, which no revocation reported; or a record
//! naming a tracked destination whose socket the kernel connected elsewhere, reported stale
//! though it was not there). So before a revocation pass decides a UDP record, the agent
//! reads where the socket is: one listing of its namespace's connected UDP sockets per pass
//! ([`flows::destroy::udp_places`]). A socket the listing shows where its record says is
//! decided there (an `ENDED` record too: review 34's first case). One shown elsewhere is
//! decided at both places, the denied one first ([`Agent::either`]): the kernel refused the
//! record's connect or made another thread's after it, or a socket load balancer's program,
//! which runs after the hooks, sent the socket to a Service's backend, and the agent cannot
//! tell these apart. So no socket the listing shows is decided permitted where it is not;
//! one the other thread's connect moved may be reported stale at its record's destination
//! (review 34's second case: a report too many, not one missing). A socket the listing does
//! not show (connected nowhere, its connect under way, skipped, or a listing that failed,
//! ran out of time or of datagrams) is looked for in a second listing narrowed to the
//! tracked destinations' addresses ([`flows::destroy::udp_places_within`]), which only
//! tracked flows can crowd (red-team review 37); not there either, or when that one cannot
//! say, it is decided where its record says, `ENDED` or not, and, when marked
//! `CONNECTED_AGAIN`, where the look below finds it: a report too many rather than one
//! missing, except for a socket whose record no longer names where it is (two tracked
//! destinations connected at once, the one made last judged first) in a namespace neither
//! listing can read (README, "Tracked flows").
//!
//! A connected UDP socket
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
use std::net::IpAddr;
use std::time::{Duration, Instant};

use enforcer_common::{flow_flags, FlowRecord};

use super::Agent;
use crate::datapath::Tables;
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

/// The listings of connected UDP sockets one pass made, by network namespace cookie (`None`:
/// none could be made).
pub(super) type Places = BTreeMap<u64, Option<flows::destroy::UdpPlaces>>;

/// The listings narrowed to the tracked destinations one pass made, by network namespace
/// cookie: what they found, and whether they proved the others absent (`None`: none could
/// be made).
pub(super) type TrackedPlaces = BTreeMap<u64, Option<(flows::destroy::UdpPlaces, bool)>>;

/// What a pass lends [`Agent::udp_flow`] to find a socket with.
pub(super) struct Lookup<'a> {
    pub procs: &'a mut flows::destroy::CgroupProcs,
    pub sockets: &'a mut DiagSockets,
    pub looks: &'a mut LookBudget,
    pub places: &'a mut Places,
    pub tracked: &'a mut TrackedPlaces,
    /// The narrowed listings' own budget: a workload whose whole listings spend the pass's
    /// time must not keep the narrowed ones from being made.
    pub narrowed_looks: &'a mut LookBudget,
}

/// What a look was about: a record version (`start_ns`, `flags`, previous peer and port, and
/// the count of connects the hooks moved or ended it by, in `wire_stamp`). A socket moves
/// only by a connect, which writes another version.
pub(super) type Version = (u64, u8, [u8; 16], u16, u16);

impl Agent {
    /// The flow a revocation pass decides for the UDP record `record` of socket `cookie`,
    /// from where this pass's listing of the socket's namespace (made now, as one look, if
    /// there is none) finds the socket: connected somewhere, the flow there or the record's
    /// ([`Agent::either`]); connected nowhere, the record's (`ENDED` or not). When the
    /// listing cannot say, the record's own answer: [`Agent::reconnected_flow`] for one
    /// marked `CONNECTED_AGAIN`, the record itself otherwise. `None`: no tracked flow.
    pub(super) fn udp_flow(
        &mut self,
        cookie: u64,
        record: &FlowRecord,
        lookup: Lookup<'_>,
    ) -> Option<FlowRecord> {
        let Lookup {
            procs,
            sockets,
            looks,
            places,
            tracked,
            narrowed_looks,
        } = lookup;
        let listing = places.entry(record.netns_cookie).or_insert_with(|| {
            if looks.exhausted() {
                return None;
            }
            let started = Instant::now();
            let deadline = started + LOOK_TIME_PER_PASS.saturating_sub(looks.spent);
            let listed =
                flows::destroy::udp_places(record, procs.of(record.cgroup_id), sockets, deadline);
            looks.made += 1;
            looks.spent += started.elapsed();
            listed
                .map_err(|error| {
                    tracing::debug!(
                        cookie,
                        "listing the connected UDP sockets of a tracked flow's namespace: {error}"
                    )
                })
                .ok()
        });
        let recorded = (record.flags & flow_flags::ENDED == 0).then_some(*record);
        if let Some(at) = listing.as_ref().and_then(|listing| listing.of(cookie)) {
            return self.either(recorded, record, at);
        }
        // Not shown: connected nowhere, its connect under way, skipped, or behind a listing
        // that could not say (crowded, cut at the pass's time). A second listing of the
        // namespace narrowed to the tracked destinations, which only tracked flows can
        // crowd (red-team review 37), finds it if it is at one of them.
        let prefixes = &self.tracked_prefixes;
        let narrowed = tracked.entry(record.netns_cookie).or_insert_with(|| {
            // Its own budget, checked before each listing only: one listing is bounded by
            // its datagrams, and a pass's first is always made whole.
            if narrowed_looks.exhausted() || prefixes.is_empty() {
                return None;
            }
            let started = Instant::now();
            let listed = flows::destroy::udp_places_within(
                record,
                procs.of(record.cgroup_id),
                sockets,
                prefixes,
            );
            narrowed_looks.made += 1;
            narrowed_looks.spent += started.elapsed();
            listed.ok()
        });
        match narrowed
            .as_ref()
            .map(|(found, whole)| (found.of(cookie), *whole))
        {
            Some((Some(at), _)) => return self.either(recorded, record, at),
            // At no tracked destination: its flow is the record's, if its connect is still
            // under way (`ENDED` or not).
            Some((None, true)) => return own(&self.datapath.tables, record),
            _ => {}
        }
        // Decided where the record says, `ENDED` or not, and where a look finds it.
        if record.flags & flow_flags::CONNECTED_AGAIN != 0 {
            let pids = procs.of(record.cgroup_id).to_vec();
            return self.reconnected_flow(cookie, record, &pids, sockets, looks);
        }
        own(&self.datapath.tables, record)
    }

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
        let recorded = own(&self.datapath.tables, record);
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
        match found {
            Some(Found::Recorded) => recorded,
            Some(Found::Previous) => flows::moved_to(&self.datapath.tables, record, previous),
            None => self.either(recorded, record, previous),
        }
    }

    /// The flow decided for `record` when its socket may be at `at` or where the record
    /// says (`recorded`: the record's own flow, if it may be there): the flow at `at` when
    /// that one is denied, else `recorded`, else the flow at `at`. A socket at either place
    /// is then never decided as permitted when it is not; one at the other may be reported
    /// stale where it is not.
    fn either(
        &self,
        recorded: Option<FlowRecord>,
        record: &FlowRecord,
        at: (IpAddr, u16),
    ) -> Option<FlowRecord> {
        let tables = &self.datapath.tables;
        match flows::moved_to(tables, record, at) {
            Some(flow)
                if matches!(
                    flows::decide(tables, &flow),
                    Ok(flows::Decision::Denied { .. })
                ) =>
            {
                Some(flow)
            }
            flow => recorded.or(flow),
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

/// The record's own flow, `ENDED` or not: where its socket may be when no listing shows it
/// (the connect the record names may be made after the listing).
fn own(tables: &Tables, record: &FlowRecord) -> Option<FlowRecord> {
    let at = (flows::destination_ip(record), record.dport);
    flows::moved_to(tables, record, at)
}

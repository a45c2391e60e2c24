//! Flow records of TCP connects whose socket is gone without any callback that ends a record.
//!
//! A TCP record ends at its socket's CLOSE state callback, or at its release for a connect
//! that never sent its SYN. A socket no callback reaches keeps its record, and its tenant's
//! share, for good: one closed while no enforcer program ran (an agent upgrade), or a kernel
//! TCP socket connected in a workload's task, whose release runs no hook (an `AF_SMC`
//! socket's, an MPTCP subflow asked for over netlink). A loop of such connects fills the
//! tenant's share. Established records are looked for by every revocation pass; this sweep
//! looks for the others: a record still connecting after [`MIN_AGE`] whose socket its
//! namespace no longer lists, in any state, is deleted (its share returned; no event: no
//! `flow.opened` was written for it).

use std::time::{Duration, Instant};

use enforcer_common::{flow_state, proto};

use super::Agent;
use crate::flows;

/// How often the sweep runs (and once at the agent's first tick).
const EVERY: Duration = Duration::from_secs(60);

/// A record younger than this is not looked at: between `connect4` writing it and the kernel
/// hashing the socket (`inet_hash_connect`) the socket is in no listing, for microseconds.
const MIN_AGE: Duration = Duration::from_secs(5);

/// Records looked for per sweep, at most: each is one listing of its namespace's sockets, and
/// the sweep runs on the agent's loop. A tenant that filled its share with leaked records
/// has them ended over several sweeps.
const BATCH: usize = 256;

/// The time one sweep spends looking, at most: a namespace crowded with sockets makes each
/// listing many datagrams (red-team review 34). The records left are looked for first at
/// the next sweep.
const SWEEP_TIME: Duration = Duration::from_millis(250);

impl Agent {
    /// Ends the connecting TCP records whose socket is gone (see the module documentation),
    /// when a sweep is due.
    pub(super) fn sweep_gone_connects(&mut self) {
        if self.last_sweep.is_some_and(|last| last.elapsed() < EVERY) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let dir = self.datapath.dir().to_path_buf();
        let records = match flows::read(&dir) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!("reading the tracked flows to sweep them: {error:#}");
                return;
            }
        };
        let now = crate::events::aggregate::monotonic_ns();
        let old = |start_ns: u64| Duration::from_nanos(now.saturating_sub(start_ns)) >= MIN_AGE;
        let mut procs = flows::destroy::CgroupProcs::new(&self.cgroup_root);
        let mut sockets = flows::destroy::DiagSockets::default();
        let (mut ended, mut unknown) = (0usize, 0usize);
        // In `start_ns` order from where the last sweep stopped, so that live connects
        // looked for first cannot keep the others from their turn; a round takes the records
        // that were there when it began, so that new ones cannot keep it from ending.
        if self.sweep_cursor == 0 {
            self.sweep_round_end = now;
        }
        let round_end = self.sweep_round_end;
        let candidates: Vec<_> = records
            .into_iter()
            .filter(|(_, r)| {
                r.protocol == proto::TCP
                    && r.state != flow_state::ESTABLISHED
                    && old(r.start_ns)
                    && r.start_ns > self.sweep_cursor
                    && r.start_ns <= round_end
            })
            .take(BATCH)
            .collect();
        self.sweep_cursor = match candidates.last() {
            Some((_, r)) if candidates.len() == BATCH => r.start_ns,
            _ => 0,
        };
        let started = Instant::now();
        let mut previous_start = None;
        for (cookie, record) in candidates {
            if started.elapsed() >= SWEEP_TIME {
                // The next sweep starts after the last record looked for.
                self.sweep_cursor = previous_start.unwrap_or(self.sweep_cursor);
                break;
            }
            previous_start = Some(record.start_ns);
            let pids = procs.of(record.cgroup_id);
            match flows::destroy::tcp_listed(cookie, &record, pids, &mut sockets) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    // Nothing can be concluded: looked for again at the next sweep.
                    tracing::debug!(cookie, "looking for a connecting socket: {error}");
                    unknown += 1;
                    continue;
                }
            }
            // Only the record read above: one the socket has since completed or replaced
            // (its local end filled, a new start) is left alone.
            match flows::forget(&dir, cookie, &record) {
                Ok(Some(_)) => ended += 1,
                Ok(None) => {}
                Err(error) => tracing::warn!(cookie, "ending a gone connect's record: {error:#}"),
            }
        }
        if ended > 0 {
            tracing::warn!(
                ended,
                unknown,
                "flow records of connects whose socket is gone ended (no callback ended them)"
            );
        }
    }
}

//! What the event task hands to the agent's loop, bounded however long the loop is busy (a
//! cold Kubernetes sync, a large apply) and however fast workloads make the kernel report.
//!
//! Both hand-offs are fed by what workloads do, so an unbounded queue would let a workload
//! grow the agent's memory for as long as the loop is away:
//! - quarantine requests (a deny under an `@quarantine` policy) coalesce per subject: one
//!   pending request a subject, the first cause kept. At most one entry per identity, and the
//!   identities are bounded by the `IDENTITIES` map.
//! - contacts for the learner (`--learn`, one a `flow.opened`) are queued up to
//!   [`CONTACT_BACKLOG`]; past it they are kept one per (subject, destination) pair, the
//!   first flow's, up to [`CONTACT_OVERFLOW_PAIRS`] pairs, as the kernel keeps the contacts
//!   it could not report (`FLOW_CONTACTS_MISSED`), and the loop's tick shows them to the
//!   learner: a first contact is judged late, not missed. Past that they are counted, and the
//!   agent shows every live tracked flow to the learner (`drain_missed_contacts`): a contact
//!   whose flow opened and closed while the loop was busy is then missed. The pairs are
//!   shared by all tenants (one that fills them leaves the others only that fallback).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use enforcer_common::FlowRecord;
use tokio::sync::{mpsc, Notify};

/// Contacts queued for the learner before they are kept per pair: 16,384 records of 80-odd
/// bytes, about 1.5 MiB.
pub const CONTACT_BACKLOG: usize = 16_384;

/// (subject, destination) pairs kept past the backlog before contacts are only counted, as
/// many as the kernel's `FLOW_CONTACTS_MISSED` holds.
pub const CONTACT_OVERFLOW_PAIRS: usize = 4_096;

/// What the queue could not take: the first contact of each pair, and how many found no room
/// even there.
#[derive(Default)]
struct Overflow {
    pairs: HashMap<(u32, u32), (u64, FlowRecord)>,
    lost: u64,
}

/// Quarantine requests pending for the agent's loop, one per subject identity.
#[derive(Default)]
pub struct QuarantineRequests {
    pending: Mutex<BTreeMap<u32, QuarantineRequest>>,
    wake: Notify,
}

/// One subject's quarantine, asked for by a deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRequest {
    /// The subject's name in the policy that decided the deny (`None`: that policy did not
    /// know the number): the agent quarantines that workload, wherever its number is now, and
    /// never whoever took the number meanwhile (red-team review 50 H1).
    pub name: Option<String>,
    /// The `@quarantine` policy that denied.
    pub cause: String,
    /// The cgroups the denied calls came from (at most [`MAX_REQUEST_CGROUPS`]): a pod
    /// relabelled between its deny and the quarantine runs under another identity by then,
    /// and the quarantine follows it there (red-team review 52 H1).
    pub cgroups: BTreeSet<u64>,
    /// When the earliest of the denied calls was made, CLOCK_MONOTONIC nanoseconds (the
    /// kernel's `bpf_ktime_get_ns`; for an overflow count, its window's start): the cgroups
    /// that left the workload since were its own when the calls were made, and are held too.
    pub since_ns: u64,
}

/// How many cgroups one subject's pending quarantine request remembers (a pod has a few;
/// the bound keeps a flood of denies from growing the request).
pub const MAX_REQUEST_CGROUPS: usize = 64;

impl QuarantineRequests {
    /// Asks for `subject` (named `name` by the deciding policy) to be quarantined for
    /// `cause`, for a call from `cgroup` (0: unknown) made at `at_ns` (see
    /// [`QuarantineRequest::since_ns`]); a subject already pending keeps the request it was
    /// first asked for, with the cgroups and the earliest time of all.
    pub fn request(
        &self,
        subject: u32,
        name: Option<String>,
        cause: String,
        cgroup: u64,
        at_ns: u64,
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let request = pending.entry(subject).or_insert(QuarantineRequest {
            name,
            cause,
            cgroups: BTreeSet::new(),
            since_ns: at_ns,
        });
        request.since_ns = request.since_ns.min(at_ns);
        if cgroup != 0 && request.cgroups.len() < MAX_REQUEST_CGROUPS {
            request.cgroups.insert(cgroup);
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Waits until a request is pending (a request made since the last [`Self::take`]).
    pub async fn requested(&self) {
        self.wake.notified().await
    }

    /// The pending requests, by subject; none are pending afterwards.
    pub fn take(&self) -> BTreeMap<u32, QuarantineRequest> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The event task's end of the contact queue.
pub struct ContactSender {
    queue: mpsc::Sender<(u64, FlowRecord)>,
    overflow: Arc<Mutex<Overflow>>,
    pairs: usize,
}

/// The agent's end of the contact queue.
pub struct ContactReceiver {
    pub queue: mpsc::Receiver<(u64, FlowRecord)>,
    overflow: Arc<Mutex<Overflow>>,
}

/// A contact queue of `backlog` records, then `pairs` (subject, destination) pairs.
pub fn contacts(backlog: usize, pairs: usize) -> (ContactSender, ContactReceiver) {
    let (queue, receiver) = mpsc::channel(backlog);
    let overflow = Arc::new(Mutex::new(Overflow::default()));
    (
        ContactSender {
            queue,
            overflow: overflow.clone(),
            pairs,
        },
        ContactReceiver {
            queue: receiver,
            overflow,
        },
    )
}

impl ContactSender {
    /// Queues the contact of the flow of socket `cookie`; when the queue is full, keeps it as
    /// its pair's first, or counts it when its pair is new and no room is left.
    pub fn offer(&self, cookie: u64, record: FlowRecord) {
        let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send((cookie, record)) else {
            return;
        };
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (record.subject, record.destination);
        if overflow.pairs.contains_key(&pair) {
            return;
        }
        if overflow.pairs.len() < self.pairs {
            overflow.pairs.insert(pair, (cookie, record));
        } else {
            overflow.lost += 1;
        }
    }
}

impl ContactReceiver {
    /// The contacts kept past the backlog since the last call, and how many more were only
    /// counted.
    pub fn take_overflow(&self) -> (Vec<(u64, FlowRecord)>, u64) {
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        let Overflow { pairs, lost } = std::mem::take(&mut *overflow);
        (pairs.into_values().collect(), lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_backlog_contacts_are_kept_per_pair_then_counted() {
        let (sender, mut receiver) = contacts(2, 2);
        let record = |subject, destination| FlowRecord {
            subject,
            destination,
            ..FlowRecord::default()
        };
        // Two queued; then pairs (1, 10) and (1, 11) kept with their first cookie, (2, 10)
        // counted; repeats of kept pairs are neither kept again nor counted.
        for (cookie, (s, d)) in [
            (1, 10),
            (1, 10),
            (1, 10),
            (1, 11),
            (1, 10),
            (2, 10),
            (1, 11),
        ]
        .into_iter()
        .enumerate()
        {
            sender.offer(cookie as u64, record(s, d));
        }
        let queued: Vec<u64> = std::iter::from_fn(|| receiver.queue.try_recv().ok())
            .map(|(cookie, _)| cookie)
            .collect();
        assert_eq!(queued, [0, 1]);
        let (mut kept, lost) = receiver.take_overflow();
        kept.sort_by_key(|(cookie, _)| *cookie);
        let kept: Vec<(u64, u32, u32)> = kept
            .iter()
            .map(|(c, r)| (*c, r.subject, r.destination))
            .collect();
        assert_eq!(kept, [(2, 1, 10), (3, 1, 11)]);
        assert_eq!(lost, 1);
        let (kept, lost) = receiver.take_overflow();
        assert!(kept.is_empty() && lost == 0);
    }

    #[test]
    fn quarantine_requests_coalesce_per_subject_keeping_the_first_cause() {
        let requests = QuarantineRequests::default();
        for round in 0..1000 {
            requests.request(
                7,
                Some("a".into()),
                format!("deny {round}"),
                round + 1,
                500 - round.min(400),
            );
            requests.request(9, None, format!("deny {round}"), 0, 50);
        }
        let pending = requests.take();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[&7].cause, "deny 0");
        assert_eq!(pending[&7].since_ns, 100, "the earliest call");
        assert_eq!(pending[&7].cgroups.len(), MAX_REQUEST_CGROUPS);
        assert!(pending[&9].cgroups.is_empty());
        assert_eq!(pending[&7].name.as_deref(), Some("a"));
        assert!(requests.take().is_empty());
    }
}

//! The agent's side of `--learn` and `step_up`: each `flow.opened` record is shown to the
//! learner ([`crate::learn`]); an anomaly is a `flow.anomaly` event, and when the destination
//! has `step_up: quarantine` the subject is quarantined through the ordinary quarantine (its
//! tracked flows are re-decided and reset) for the TTL, a page is sent ([`crate::page`]), and
//! the tick lifts the quarantine when the TTL is over (`subject.released`). The lift time is
//! kept in the learner's file, so a restart neither forgets nor extends it.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use enforcer_common::{flow_flags, flow_state, identity, proto, FlowRecord};
use enforcer_policy::inventory::StepUpAction;

use super::{snapshot_of, Agent};
use crate::events::flow::{self as flow_event, Anomaly, FlowCall};
use crate::events::record::Time;
use crate::learn::Outcome;

/// How long the repeats of one anomaly (a subject and a destination) are gathered into one
/// event after the pair's last.
const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// How many pairs' repeats are gathered at once: each holds the latest repeat's event (up to
/// ~13 KB), so at most ~50 MiB. A pair beyond them is reported at every contact, as before.
const MAX_REPEATING_PAIRS: usize = 4096;

/// The repeats of each anomaly (subject name, destination name) since its last event.
///
/// A subject past one of the learner's bounds has an anomaly at every contact (it fails
/// closed), and after lost contacts every live flow is shown again: reported one by one,
/// one tenant's loop filled the event history (10,000 events of up to ~13 KB), the consumers'
/// queues and the unbounded channel to them (red-team reviews 75 M1, 76 M1). The first
/// anomaly of a pair is sent at once; the pair's repeats within [`REPEAT_WINDOW`] of it are
/// counted, and the latest is sent at the window's end with their `count` and `first_seen`
/// (nothing is dropped uncounted), opening the next window. One that starts a step-up
/// quarantine is never held back.
#[derive(Default)]
pub(super) struct Repeats {
    pairs: HashMap<(String, String), Gathered>,
}

struct Gathered {
    /// When the pair's last event was sent.
    since: Instant,
    /// The repeats since, the latest of them, and when the first was seen.
    count: u64,
    latest: Option<FlowCall>,
    first_seen: Option<SystemTime>,
}

impl Repeats {
    /// `call` (an anomaly of `pair` at `now`) to send now, or `None` when it is a repeat
    /// within the pair's window, gathered.
    fn gather(
        &mut self,
        pair: (String, String),
        call: FlowCall,
        now: SystemTime,
    ) -> Option<FlowCall> {
        self.gather_at(pair, call, now, Instant::now())
    }

    fn gather_at(
        &mut self,
        pair: (String, String),
        call: FlowCall,
        now: SystemTime,
        at: Instant,
    ) -> Option<FlowCall> {
        if let Some(gathered) = self.pairs.get_mut(&pair) {
            if at.duration_since(gathered.since) < REPEAT_WINDOW {
                gathered.count += 1;
                gathered.first_seen.get_or_insert(now);
                gathered.latest = Some(call);
                return None;
            }
        }
        if self.pairs.len() >= MAX_REPEATING_PAIRS && !self.pairs.contains_key(&pair) {
            return Some(call);
        }
        self.pairs.insert(
            pair,
            Gathered {
                since: at,
                count: 0,
                latest: None,
                first_seen: None,
            },
        );
        Some(call)
    }

    /// The events of the windows over at `at`: for each pair with repeats, the latest with
    /// their count (its window starts again); a pair without any is forgotten.
    fn due(&mut self, at: Instant) -> Vec<FlowCall> {
        let mut calls = Vec::new();
        self.pairs.retain(|_, gathered| {
            if at.duration_since(gathered.since) < REPEAT_WINDOW {
                return true;
            }
            let Some(mut call) = gathered.latest.take() else {
                return false;
            };
            if let Some(anomaly) = &mut call.anomaly {
                anomaly.count = Some(gathered.count);
                anomaly.first_seen = gathered.first_seen.take().map(Time);
            }
            calls.push(call);
            gathered.since = at;
            gathered.count = 0;
            true
        });
        calls
    }
}

impl Agent {
    /// One `flow.opened` record (socket `cookie`), as the kernel recorded it: `fresh` when
    /// the kernel reported it now (its `flow.opened`, or a contact it kept past a full ring),
    /// false for a live flow shown again after contacts were lost, opened perhaps long ago by
    /// a cgroup that has moved since.
    pub(super) fn contact(&mut self, cookie: u64, record: &FlowRecord, fresh: bool) {
        if self.learner.is_none() {
            return;
        }
        let policy = self
            .history
            .at(record.policy_generation)
            .unwrap_or_else(|| self.compiled.clone());
        if record.subject == identity::UNKNOWN {
            return;
        }
        let (Some(subject), Some(destination)) = (
            policy.identity(record.subject),
            policy.identity(record.destination),
        ) else {
            return;
        };
        let datasets = destination.contact_names();
        let subject_name = subject.name.clone();
        // The subject as the policy of its connect named it, at its number now: the number
        // may have passed to another workload since (red-team review 50 H1).
        let target = self.identity_named(&subject_name, record.subject);
        let Some(learner) = &mut self.learner else {
            return;
        };
        let now = SystemTime::now();
        let outcome = match learner.observe(
            &subject_name,
            subject.tenant.as_deref(),
            &datasets,
            now,
        ) {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::error!(subject = %subject_name, "recording a neighbourhood: {error:#}");
                return;
            }
        };
        let new = match outcome {
            Outcome::Learning { added } => {
                if added > 0 {
                    tracing::info!(subject = %subject_name, ?datasets, "learned: part of the subject's neighbourhood");
                }
                return;
            }
            Outcome::Known => return,
            Outcome::Capped { what, first } => {
                if first {
                    tracing::warn!(subject = %subject_name, bound = %what, "neighbourhood bound reached: further datasets are neither learned nor reported");
                }
                return;
            }
            Outcome::Anomaly { new } => new,
        };
        let (neighbourhood, neighbourhood_total) = learner.learned_shown(&subject_name);
        let learned_until = learner.learning_until();
        // The step-up in force now (the policy may have changed since the connect).
        let step_up = self
            .compiled
            .identity_by_name(&destination.name)
            .and_then(|i| i.step_up);
        let vector_db = destination.endpoint_kind.as_deref() == Some("vector_db");
        let mut call = flow_event::flow(flow_event::ANOMALY, now, cookie, record, &policy);
        call.policy.snapshot = snapshot_of(&self.history, record);
        call.atlas = crate::learn::atlas(vector_db);
        let (new_shown, new_datasets_total) =
            flow_event::shown_names(new.iter().cloned(), new.len());
        let mut anomaly = Anomaly {
            new_datasets: new_shown.clone(),
            new_datasets_total,
            neighbourhood,
            neighbourhood_total,
            learned_until: Time(learned_until),
            step_up: None,
            quarantined_until: None,
            count: None,
            first_seen: None,
        };
        tracing::warn!(subject = %subject_name, destination = %destination.name, datasets = ?new_shown, count = new.len(), "anomaly: first contact outside the learned neighbourhood");
        let mut quarantine = None;
        if let Some(step_up) = step_up {
            match step_up.action {
                StepUpAction::Quarantine => {
                    anomaly.step_up = Some("quarantine");
                    let held = match target {
                        Some(id) => self.quarantined.contains_key(&id),
                        None => self.kept_while_absent(&subject_name),
                    };
                    if !held {
                        let until = now + step_up.ttl;
                        anomaly.quarantined_until = Some(Time(until));
                        quarantine = Some(until);
                    }
                }
            }
        }
        call.anomaly = Some(anomaly);
        if quarantine.is_none() {
            // A destination's step-up is in the key: one added within a window is an anomaly
            // of its own, sent (and paged) at once (review 78 L5).
            let pair = (
                subject_name.clone(),
                format!(
                    "{}{}",
                    destination.name,
                    if step_up.is_some() { " (step-up)" } else { "" }
                ),
            );
            match self.anomaly_repeats.gather(pair, call, now) {
                Some(first) => call = first,
                None => return,
            }
        }
        if step_up.is_some() {
            if let Some(pager) = &self.pager {
                match serde_json::to_value(&call) {
                    Ok(body) => pager.page(body),
                    Err(error) => tracing::error!("encoding a page: {error}"),
                }
            }
        }
        let _ = self.flow_events.send(call);
        if let Some(until) = quarantine {
            // On disk before the kernel's flag: an agent killed in between must find the
            // step-up's end at its restart, or nothing would lift the quarantine it finds
            // pinned (red-team review 39).
            self.record_step_up(&subject_name, until);
            let cause = format!("step-up: anomaly ({})", new.join(", "));
            let from = subject_name.clone();
            let held = match target {
                Some(id) => {
                    self.step_ups.insert(id, (until, subject_name));
                    self.quarantine(id, cause, super::Hold::StepUp);
                    self.quarantined.get(&id).cloned()
                }
                None => {
                    // Gone from the policy since its connect: the step-up waits for it, and
                    // ends at its time if it is not back by then.
                    self.pending_step_ups.insert(subject_name.clone(), until);
                    self.quarantine_absent(subject_name.clone(), cause, super::Hold::StepUp);
                    self.absent_hold(&subject_name)
                }
            };
            // The contact's cgroup goes with the step-up, as a deny's with its quarantine:
            // a pod relabelled between its contact and this read (a contact kept past a
            // full ring waits for the next tick) does not leave it behind. A live flow shown
            // again names no cgroup (it may have moved long ago: review 55 M2); those that
            // left the subject since it opened are held all the same (review 56 L1).
            if let Some(held) = held {
                let cgroup = if fresh { record.cgroup_id } else { 0 };
                self.hold_calling_cgroups(held, (&from, record.subject), [cgroup], record.start_ns);
            }
        }
    }

    /// Sends the gathered repeats of each anomaly whose minute is over (see [`Repeats`]).
    pub(super) fn send_anomaly_repeats(&mut self) {
        for call in self.anomaly_repeats.due(Instant::now()) {
            let _ = self.flow_events.send(call);
        }
    }

    /// Sends every gathered repeat, windows over or not (the agent stops).
    pub(super) fn send_anomaly_repeats_now(&mut self) {
        for call in self.anomaly_repeats.due(Instant::now() + REPEAT_WINDOW) {
            let _ = self.flow_events.send(call);
        }
    }

    /// Feeds the learner the contacts whose `flow.opened` the kernel could not write (the
    /// flow ring was full: `FLOW_CONTACTS_MISSED`), exactly like an opened record; called on
    /// every tick, so a contact hidden behind a flood is seen within 500 ms of the drain.
    /// The event names the flow's socket cookie when the flow was live at the last read of
    /// `FLOWS` (at most every `LIVE_SCAN_EVERY`), 0 otherwise. Without `--learn` the map is
    /// only emptied.
    ///
    /// When even that map had no room (`LOST_FLOW_CONTACTS` grew: its 4,096 pairs taken
    /// within one tick), which contacts were lost is unknown: every live tracked flow (`FLOWS`) is
    /// shown to the learner as a contact, so that a contact still open is judged anyway, and
    /// the loss is logged (error). A contact that opened and ended within that same tick is
    /// the only one that can escape. `overflow` holds the contacts the kernel did report but
    /// this loop's backlog could not take (see `handoff`): kept ones are shown like missed
    /// ones, counted ones count as lost.
    pub(super) fn drain_missed_contacts(&mut self, overflow: (Vec<(u64, FlowRecord)>, u64)) {
        let Some(missed) = &mut self.missed else {
            return;
        };
        let (kept, queue_lost) = overflow;
        let records = missed.drain();
        let kernel_lost = missed.newly_lost().unwrap_or_else(|error| {
            tracing::error!("reading LOST_FLOW_CONTACTS: {error:#}");
            0
        });
        if !kept.is_empty() || queue_lost > 0 {
            tracing::warn!(
                kept = kept.len(),
                lost = queue_lost,
                "flow contacts reported while the agent was busy overflowed its backlog"
            );
        }
        let lost = kernel_lost + queue_lost;
        if self.learner.is_none() {
            // Without --learn they are only emptied: a later run with --learn must not take
            // days-old contacts for new ones.
            return;
        }
        for (cookie, record) in &kept {
            self.contact(*cookie, record, true);
        }
        // A datagram's contact names no flow, and no lost `flow.opened` is behind it: shown
        // as it is, without reading `FLOWS` or reporting a full ring.
        let (datagrams, records): (Vec<FlowRecord>, Vec<FlowRecord>) = records
            .into_iter()
            .partition(|r| r.flags & flow_flags::DATAGRAM != 0);
        for record in &datagrams {
            self.contact(0, record, true);
        }
        if records.is_empty() && lost == 0 {
            return;
        }
        // Naming the flows needs `FLOWS` (up to 65,536 records, two syscalls each): read at
        // most every LIVE_SCAN_EVERY while only contacts arrive (a workload that keeps the
        // ring full would otherwise make every tick read it), at once when contacts were
        // lost. A contact whose flow is not in the last read is named with cookie 0.
        let scan = lost > 0
            || self
                .live_scanned
                .is_none_or(|at| at.elapsed() >= super::LIVE_SCAN_EVERY);
        if scan {
            match crate::flows::read(self.datapath.dir()) {
                Ok(live) => {
                    self.live_flows = live
                        .into_iter()
                        .map(|(cookie, r)| {
                            (
                                (r.start_ns, r.pid_tgid, r.subject, r.destination),
                                (cookie, r),
                            )
                        })
                        .collect();
                    self.live_scanned = Some(std::time::Instant::now());
                }
                Err(error) => {
                    // Not an old snapshot in its place: it could name flows long gone.
                    self.live_flows.clear();
                    tracing::error!("reading the tracked flows: {error:#}");
                }
            }
        }
        if !records.is_empty() {
            tracing::info!(
                contacts = records.len(),
                "contacts whose flow.opened was lost (flow ring full): shown to the learner"
            );
        }
        for record in &records {
            let cookie = self
                .live_flows
                .get(&(
                    record.start_ns,
                    record.pid_tgid,
                    record.subject,
                    record.destination,
                ))
                .map_or(0, |(cookie, _)| *cookie);
            self.contact(cookie, record, true);
        }
        if lost > 0 {
            let live: Vec<(u64, FlowRecord)> = self.live_flows.values().copied().collect();
            tracing::error!(
                lost,
                live = live.len(),
                "flow contacts lost (the ring and FLOW_CONTACTS_MISSED, or the agent's backlog, were full): every live tracked flow is shown to the learner"
            );
            for (cookie, record) in &live {
                if record.protocol == proto::UDP || record.state == flow_state::ESTABLISHED {
                    self.contact(*cookie, record, false);
                }
            }
        }
    }

    /// After a restart: the step-ups an earlier agent recorded whose subject is still
    /// quarantined are lifted on time; those whose subject is not in the policy yet wait for
    /// it (`pending_step_ups`); the others (released meanwhile) are forgotten.
    pub(super) fn adopt_step_ups(&mut self) {
        let Some(learner) = &self.learner else {
            return;
        };
        let recorded: Vec<(String, SystemTime)> = learner.step_ups();
        for (name, until) in recorded {
            if super::fold::covering(&self.quarantine_folds, &name).is_some() {
                // Held by a fold until released: no end to wait for.
                self.forget_step_up_record(&name);
                continue;
            }
            // By the name its quarantine is kept under (its number may have moved since).
            let kept_at = self
                .quarantined
                .iter()
                .find(|(_, kept)| **kept == name)
                .map(|(id, _)| *id);
            match kept_at {
                Some(id) => {
                    self.step_ups.insert(id, (until, name));
                }
                None if self.waiting_quarantines.contains(&name)
                    || self.compiled.identity_by_name(&name).is_none() =>
                {
                    // Waiting for its subject, or not known yet (the pods of a cluster not
                    // synced at the restart): a step-up must not become a quarantine nothing
                    // lifts (review 49), nor end before its time when the subject comes back
                    // (review 51: a step-up is not among the state file's lasting ones, so
                    // an absent subject's was not restored): it waits, and holds when its
                    // subject is back, until the TTL.
                    self.waiting_quarantines.insert(name.clone());
                    self.pending_step_ups.insert(name, until);
                }
                None => self.forget_step_up_record(&name),
            }
        }
    }

    /// Releases the step-up quarantines whose TTL is over (called on every tick).
    pub(super) fn lift_step_ups(&mut self) {
        let now = SystemTime::now();
        self.take_up_pending_step_ups(now);
        let due: Vec<u32> = self
            .step_ups
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let name = self.name_of(id);
            if self.compiled.identity(id).is_none() {
                // Its identity left the policy (a Job's pods completed, a workload taken out
                // of the inventory): nothing in the kernel to lift, but the agent's own set
                // must forget it, or the identity's next pods (the same label set, the same
                // number) would come back quarantined with nothing left to lift them
                // (red-team review 39 M1).
                self.forget_step_up(id);
                if let Some(name) = self.quarantined.remove(&id) {
                    tracing::info!(subject = %name, "step-up quarantine over: its TTL is over, its identity gone from the policy");
                    self.count_quarantined();
                    self.save_state();
                    let _ = self.notices.send(super::Notice::Released {
                        time: super::now(),
                        workload: name,
                        identity: id,
                    });
                }
                continue;
            }
            let response = self.release(&name);
            if response.ok {
                tracing::info!(subject = %name, "step-up quarantine lifted: its TTL is over");
            } else {
                tracing::warn!(subject = %name, "lifting a step-up quarantine: {}", response.message);
            }
            self.forget_step_up(id);
        }
    }

    /// The subject's step-up is over (lifted, released by hand, or replaced by a lasting
    /// quarantine). On disk at once: a restart that found the step-up's end would lift a
    /// quarantine meant to hold (red-team review 41); forgetting is rare, the flush cheap.
    pub(super) fn forget_step_up(&mut self, id: u32) {
        // By the name it was recorded under: its identity may have left the policy.
        if let Some((_, name)) = self.step_ups.remove(&id) {
            self.forget_step_up_record(&name);
            return;
        }
        let name = self.name_of(id);
        if self.pending_step_ups.remove(&name).is_some() {
            self.forget_step_up_record(&name);
        }
    }

    /// `id` is quarantined by a step-up (in force, or recorded before a restart and not taken
    /// up yet).
    pub(super) fn has_step_up(&self, id: u32) -> bool {
        self.step_ups.contains_key(&id) || self.pending_step_ups.contains_key(&self.name_of(id))
    }

    /// A recorded step-up whose subject was not in the policy at the restart: taken up once
    /// the subject is known and quarantined, forgotten once released or past its lift time
    /// (then it is no step-up any more: if the subject comes back still flagged, the flag is
    /// a quarantine it had besides).
    fn take_up_pending_step_ups(&mut self, now: SystemTime) {
        if self.pending_step_ups.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_step_ups);
        for (name, until) in pending {
            match self.compiled.identity_by_name(&name).map(|i| i.id) {
                Some(id) if self.quarantined.contains_key(&id) => {
                    self.step_ups.insert(id, (until, name));
                }
                None if until > now => {
                    self.pending_step_ups.insert(name, until);
                }
                None => {
                    // Over while its subject was out of the policy: the quarantine that waited
                    // for it with the step-up goes too.
                    self.forget_step_up_record(&name);
                    if self.waiting_quarantines.remove(&name) {
                        tracing::info!(subject = %name, "step-up quarantine over: its TTL is over, its subject out of the policy");
                        self.count_quarantined();
                        self.save_state();
                        let _ = self.notices.send(super::Notice::Released {
                            time: super::now(),
                            workload: name,
                            identity: identity::UNKNOWN,
                        });
                    }
                }
                _ => self.forget_step_up_record(&name),
            }
        }
    }

    /// Records the end of `name`'s step-up in the learner's file, on disk at once (step-ups
    /// are rare: one write each).
    pub(super) fn record_step_up(&mut self, name: &str, until: SystemTime) {
        if let Some(learner) = &mut self.learner {
            let kept = learner
                .set_step_up(name, Some(until))
                .and_then(|()| learner.flush());
            if let Err(error) = kept {
                tracing::error!(subject = %name, "keeping the step-up's end: {error:#}");
            }
        }
    }

    /// Removes the learner's records of the step-ups of `names`, on disk at once: one write
    /// for all (review 77 L5: a fold forgets hundreds, and each write is the whole file).
    pub(super) fn forget_step_up_records(&mut self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        if let Some(learner) = &mut self.learner {
            let forgotten = names
                .iter()
                .try_for_each(|name| learner.set_step_up(name, None))
                .and_then(|()| learner.flush());
            if let Err(error) = forgotten {
                tracing::error!(subjects = names.len(), "forgetting step-ups: {error:#}");
            }
        }
    }

    /// Removes the learner's record of the step-up of `name`, on disk at once.
    pub(super) fn forget_step_up_record(&mut self, name: &str) {
        if let Some(learner) = &mut self.learner {
            let forgotten = learner
                .set_step_up(name, None)
                .and_then(|()| learner.flush());
            if let Err(error) = forgotten {
                tracing::error!(subject = %name, "forgetting a step-up: {error:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use enforcer_common::FlowRecord;

    use super::{Repeats, MAX_REPEATING_PAIRS};
    use crate::events::flow::{self as flow_event, Anomaly, FlowCall};
    use crate::events::record::Time;

    /// A `flow.anomaly` of socket `cookie`.
    fn anomaly(cookie: u64) -> FlowCall {
        static DEMO: std::sync::OnceLock<enforcer_policy::Compiled> = std::sync::OnceLock::new();
        let demo = DEMO.get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo");
            enforcer_policy::Bundle::load(&dir)
                .unwrap()
                .compile()
                .unwrap()
        });
        let now = SystemTime::now();
        let record = FlowRecord::default();
        let mut call = flow_event::flow(flow_event::ANOMALY, now, cookie, &record, demo);
        call.anomaly = Some(Anomaly {
            new_datasets: vec!["acme-kb".into()],
            new_datasets_total: None,
            neighbourhood: Vec::new(),
            neighbourhood_total: None,
            learned_until: Time(now),
            step_up: None,
            quarantined_until: None,
            count: None,
            first_seen: None,
        });
        call
    }

    fn pair(destination: &str) -> (String, String) {
        ("acme/capped".to_string(), destination.to_string())
    }

    /// Review 76 M1: a subject that has an anomaly at every contact (past the learner's
    /// bound) makes one event a minute per destination, the latest contact's, with the count
    /// of those it stands for; a quiet minute ends the gathering. Before, 1,000 contacts were
    /// 1,000 events of up to ~13 KB.
    #[test]
    fn a_capped_subject_s_repeats_are_one_event_a_minute() {
        let mut repeats = Repeats::default();
        let (now, t0) = (SystemTime::now(), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(
            repeats
                .gather_at(pair("acme-vectors"), anomaly(1), now, t0)
                .is_some(),
            "the first is sent"
        );
        for n in 0..1000 {
            let gathered = repeats.gather_at(pair("acme-vectors"), anomaly(2 + n), now, at(n * 50));
            assert!(gathered.is_none(), "repeat {n} is gathered");
        }
        assert!(
            repeats
                .gather_at(pair("acme-docs"), anomaly(7), now, at(10))
                .is_some(),
            "another destination is another anomaly"
        );
        assert!(
            repeats.due(at(59_999)).is_empty(),
            "not before the minute is over"
        );
        let due = repeats.due(at(60_000));
        assert_eq!(due.len(), 1, "acme-docs had no repeat");
        let latest = due[0].anomaly.as_ref().unwrap();
        assert_eq!((due[0].flow.cookie, latest.count), (1001, Some(1000)));
        assert!(latest.first_seen.is_some());
        // The next minute gathers again, from the last event.
        assert!(repeats
            .gather_at(pair("acme-vectors"), anomaly(5000), now, at(61_000))
            .is_none());
        assert!(repeats.due(at(119_999)).is_empty());
        let due = repeats.due(at(120_000));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].anomaly.as_ref().unwrap().count, Some(1));
        // A quiet minute: the pair is forgotten, and its next anomaly is sent at once.
        assert!(repeats.due(at(180_000)).is_empty());
        assert!(repeats.pairs.is_empty());
        assert!(repeats
            .gather_at(pair("acme-vectors"), anomaly(6000), now, at(181_000))
            .is_some());
    }

    /// The pairs gathered are bounded; one beyond them is sent at every contact.
    #[test]
    fn the_pairs_gathered_are_bounded() {
        let mut repeats = Repeats::default();
        let (now, t0) = (SystemTime::now(), Instant::now());
        for n in 0..MAX_REPEATING_PAIRS {
            assert!(repeats
                .gather_at(pair(&format!("d{n}")), anomaly(1), now, t0)
                .is_some());
        }
        for _ in 0..3 {
            assert!(repeats
                .gather_at(pair("beyond"), anomaly(1), now, t0)
                .is_some());
        }
        assert_eq!(repeats.pairs.len(), MAX_REPEATING_PAIRS);
    }
}

//! Quarantines kept with the workload they were meant for, not only its number.
//!
//! Identity numbers come from a hash of what defines the identity, probed upwards on a
//! collision, so a number can pass to another workload: while the first holder is out of
//! the policy (a label set scaled to zero, a workload taken out of the inventory), the one
//! that lost the collision takes it. A quarantine kept by number alone then fell on that
//! other workload, also across restarts, and a tenant that brute-forced a colliding label
//! set could hand its own quarantine to a victim (red-team review 49 M1). Each quarantine
//! keeps the name it was made under; before every full write of the policy it follows that
//! name to its number now, waits by name while the number names another, and a step-up in
//! that position ends.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use enforcer_common::{flags, identity as reserved};
use enforcer_policy::Compiled;

use super::handoff::QuarantineRequest;
use super::{now, Agent, AgentState, Hold, Notice, Response};
use crate::datapath::Datapath;

/// The quarantines an agent starts with: by number, each with its name, and those waiting by
/// name.
///
/// A quarantine outlives the agent: it is read back from the pinned identity flags, and from
/// the state file for an identity that has no entry now (it comes back quarantined); one whose
/// entry is there says by its flag whether it is quarantined (a release clears the flag
/// before the state file is written). Each keeps the name the state file has for it, or else
/// the one the policy gives it now (a state file written before names were kept). A state
/// file of other pins (an upgrade to a new ABI's pin directory, a changed `--pin-root`)
/// carries its quarantines until released by name only, since its numbers belong to maps
/// that are gone; its step-ups end (red-team review 49 L1: they were all dropped, silently).
/// Checked against the policy by [`Agent::keep_quarantines_with_their_names`] before the
/// first write.
pub(super) fn restored(
    datapath: &Datapath,
    state: Option<AgentState>,
    compiled: &Compiled,
) -> Result<(BTreeMap<u32, String>, BTreeSet<String>)> {
    let mut ids = datapath.tables.identities_flagged(flags::QUARANTINED)?;
    let mut names = BTreeMap::new();
    let mut waiting = BTreeSet::new();
    if let Some(mut state) = state {
        if same_pins(&state.pin_dir, datapath.dir()) {
            let absent = state
                .quarantined_ids
                .into_iter()
                .filter(|id| datapath.tables.identity_info(*id).is_none());
            ids.extend(absent);
            names = state.quarantine_names;
            waiting = state.waiting_quarantines;
        } else {
            waiting = state.waiting_quarantines;
            waiting.extend(
                state
                    .quarantined_ids
                    .iter()
                    .filter_map(|id| state.quarantine_names.remove(id)),
            );
            if !waiting.is_empty() {
                tracing::warn!(
                    from = %state.pin_dir.display(),
                    quarantines = waiting.len(),
                    "the state file is of other pins: its quarantines are carried by name"
                );
            }
        }
    }
    let quarantined = ids
        .into_iter()
        .map(|id| {
            let name = names.remove(&id).unwrap_or_else(|| {
                compiled
                    .identity(id)
                    .map_or_else(|| format!("identity {id}"), |i| i.name.clone())
            });
            (id, name)
        })
        .collect();
    Ok((quarantined, waiting))
}

/// Whether two pin directories are one: as written, or once resolved (a `--pin-root`
/// given through a symbolic link).
fn same_pins(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// Where a quarantine kept under `name` at `id` goes in a new policy.
enum Move {
    /// The name is at another number now.
    To(u32),
    /// The name is out of the policy and its number names another workload.
    Wait,
}

impl Agent {
    /// Moves each quarantine to its name's number in the policy in force (see the module
    /// docs); one whose name is out of the policy stays by number while no other workload
    /// has that number (it comes back there). Called before every full write, so that the
    /// desired state flags the right identities.
    pub(super) fn keep_quarantines_with_their_names(&mut self) {
        let moves: Vec<(u32, Move)> = self
            .quarantined
            .iter()
            .filter_map(|(&id, name)| {
                let at = self.compiled.identity_by_name(name).map(|i| i.id);
                match at {
                    Some(now_at) if now_at == id => None,
                    Some(now_at) => Some((id, Move::To(now_at))),
                    None if self.compiled.identity(id).is_some() => Some((id, Move::Wait)),
                    None => None,
                }
            })
            .collect();
        // All taken out first: a number a quarantine moves to may be another's old one.
        let mut taken = Vec::with_capacity(moves.len());
        for (id, to) in moves {
            let Some(name) = self.quarantined.remove(&id) else {
                continue;
            };
            let step_up = self.step_ups.remove(&id);
            taken.push((id, to, name, step_up));
        }
        let mut changed = !taken.is_empty();
        for (id, to, name, step_up) in taken {
            match to {
                Move::To(at) => {
                    tracing::info!(subject = %name, from = id, to = at, "quarantine follows its workload to its identity number now");
                    self.quarantined.insert(at, name);
                    if let Some(step_up) = step_up {
                        self.step_ups.insert(at, step_up);
                    }
                }
                Move::Wait => {
                    let holder = self.name_of(id);
                    if let Some((_, recorded)) = step_up {
                        // A step-up is a response to one contact, for a time: it ends
                        // rather than wait for a name that may never come back.
                        self.forget_step_up_record(&recorded);
                        tracing::info!(subject = %name, identity = id, now = %holder, "step-up quarantine over: its workload left the policy and its number names another");
                        let _ = self.notices.send(Notice::Released {
                            time: now(),
                            workload: name,
                            identity: id,
                        });
                    } else {
                        tracing::warn!(subject = %name, identity = id, now = %holder, "quarantined workload out of the policy, its number now names another: the quarantine waits for the workload by name");
                        self.waiting_quarantines.insert(name);
                    }
                }
            }
        }
        let back: Vec<(String, u32)> = self
            .waiting_quarantines
            .iter()
            .filter_map(|name| {
                let id = self.compiled.identity_by_name(name)?.id;
                Some((name.clone(), id))
            })
            .collect();
        for (name, id) in back {
            self.waiting_quarantines.remove(&name);
            tracing::warn!(subject = %name, identity = id, "quarantined workload back in the policy: quarantined again");
            self.quarantined.entry(id).or_insert(name);
            changed = true;
        }
        if changed {
            self.count_quarantined();
            self.save_state();
        }
    }

    /// A deny's quarantine: of the workload the deciding policy named, at its number now, or
    /// waiting for it while it is out of the policy; by number only when that policy did not
    /// know the subject. The request is handled a moment after the deny (a window later for
    /// a deny counted beyond the event budget), when the number may have passed to another
    /// workload (red-team review 50 H1).
    pub(super) fn quarantine_requested(&mut self, subject: u32, request: QuarantineRequest) {
        let QuarantineRequest { name, cause } = request;
        let Some(name) = name else {
            self.quarantine(subject, cause, Hold::Lasting);
            return;
        };
        match self.compiled.identity_by_name(&name).map(|i| i.id) {
            Some(id) => self.quarantine(id, cause, Hold::Lasting),
            None => self.quarantine_absent(name, cause, Hold::Lasting),
        }
    }

    /// Whether a quarantine of `name`, out of the policy in force, is kept: waiting by name,
    /// or by the number it left.
    pub(super) fn kept_while_absent(&self, name: &str) -> bool {
        self.waiting_quarantines.contains(name) || self.quarantined.values().any(|n| n == name)
    }

    /// Quarantines `name`, out of the policy in force: it waits by name and holds when the
    /// workload is back (a step-up's end waits in `pending_step_ups`, set by the caller).
    pub(super) fn quarantine_absent(&mut self, name: String, cause: String, hold: Hold) {
        if hold == Hold::Lasting && self.pending_step_ups.remove(&name).is_some() {
            // A lasting quarantine takes a step-up's place, as for a present subject.
            self.forget_step_up_record(&name);
        }
        if self.kept_while_absent(&name) {
            return;
        }
        tracing::warn!(subject = %name, %cause, "subject quarantined while out of the policy: it holds when the workload is back");
        self.waiting_quarantines.insert(name.clone());
        self.count_quarantined();
        self.save_state();
        let _ = self.notices.send(Notice::Quarantined {
            time: now(),
            workload: name,
            identity: reserved::UNKNOWN,
            cause,
        });
    }

    /// `quarantine release` of a name the policy in force does not hold: a quarantine that
    /// waits for it, or one kept by number while its workload is out of the policy.
    pub(super) fn release_absent(&mut self, workload: &str) -> Response {
        let identity = if self.waiting_quarantines.remove(workload) {
            reserved::UNKNOWN
        } else if let Some(id) = self
            .quarantined
            .iter()
            .find(|(_, name)| name.as_str() == workload)
            .map(|(id, _)| *id)
        {
            // No `IDENTITIES` entry to clear: the identity is out of the policy.
            self.quarantined.remove(&id);
            self.forget_step_up(id);
            id
        } else {
            return Response::error(format!(
                "no workload named {workload:?} in the policy in force, and no quarantine kept for it"
            ));
        };
        self.count_quarantined();
        self.save_state();
        let _ = self.notices.send(Notice::Released {
            time: now(),
            workload: workload.to_string(),
            identity,
        });
        Response::ok(format!("{workload} released (out of the policy)"))
    }

    /// The quarantined workloads as `quarantine list` and the state file name them: one out
    /// of the policy in force says so.
    pub(super) fn quarantined_names(&self) -> Vec<String> {
        let out_of_policy =
            |name: &str| format!("{name} (out of the policy: quarantined again when it is back)");
        self.quarantined
            .values()
            .map(|name| match self.compiled.identity_by_name(name) {
                Some(_) => name.clone(),
                None => out_of_policy(name),
            })
            .chain(self.waiting_quarantines.iter().map(|n| out_of_policy(n)))
            .collect()
    }
}

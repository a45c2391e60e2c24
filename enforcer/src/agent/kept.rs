//! Quarantines kept with the workload they were meant for, not only its number.
//!
//! Identity numbers come from a hash of what defines the identity, probed upwards on a
//! collision, so a number can pass to another workload: while the first holder is out of
//! the policy (a label set scaled to zero, a workload taken out of the inventory), the one
//! that lost the collision takes it. A quarantine kept by number alone then fell on that
//! other workload, also across restarts, and a tenant that brute-forced a colliding label
//! set could hand its own quarantine to a victim (red-team review 49 M1). Each quarantine
//! keeps the name it was made under, the name the deciding policy gave the subject (a deny
//! is acted on a moment later, a window later beyond the event budget: review 50 H1);
//! before every full write of the policy it follows that name to its number now (or to its
//! label set's rename), waits by name while the number names another, and a step-up in that
//! position ends. A write that fails leaves the record as it was (review 50 L1).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use enforcer_common::{flags, identity as reserved};
use enforcer_policy::Compiled;

use super::fold;
use super::handoff::QuarantineRequest;
use super::{now, quarantined_notice, Agent, AgentState, Hold, Notice, Response};
use crate::datapath::Datapath;
use crate::sources::cgroups::Scan;

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
    state: Option<&AgentState>,
    compiled: &Compiled,
) -> Result<(BTreeMap<u32, String>, BTreeSet<String>)> {
    let mut ids = datapath.tables.identities_flagged(flags::QUARANTINED)?;
    let mut names = BTreeMap::new();
    let mut waiting = BTreeSet::new();
    if let Some(state) = state {
        waiting = state.waiting_quarantines.clone();
        if same_pins(&state.pin_dir, datapath.dir()) {
            let absent = state
                .quarantined_ids
                .iter()
                .filter(|id| datapath.tables.identity_info(**id).is_none());
            ids.extend(absent);
            names = state.quarantine_names.clone();
        } else {
            waiting.extend(
                state
                    .quarantined_ids
                    .iter()
                    .filter_map(|id| state.quarantine_names.get(id).cloned()),
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
                    .map_or_else(|| placeholder(id), |i| i.name.clone())
            });
            (id, name)
        })
        .collect();
    Ok((quarantined, waiting))
}

/// The cgroups held under a quarantine's name at a start (see [`Agent::hold_cgroups`]): those
/// the previous agent held (its state file: unmapped ones too), and those the pinned cgroup
/// map gives to a quarantined identity (a state file from before holds were kept), each of a
/// quarantine still kept (`kept`: those waiting by name, the folds, and the quarantines of
/// their own a fold holds). A quarantined pod
/// relabelled while no agent ran is followed. The
/// state file's holds are of this boot only (cgroup IDs are given out again after a reboot:
/// review 58 F4), or, from an agent that kept no boot ID, while pinned maps say an agent ran
/// in this boot.
pub(super) fn held_at_start(
    pinned: &BTreeMap<u64, u32>,
    state: Option<&AgentState>,
    quarantined: &BTreeMap<u32, String>,
    kept: [&BTreeSet<String>; 3],
) -> BTreeMap<u64, String> {
    let mut held = state
        .filter(|s| written_this_boot(s).unwrap_or(!pinned.is_empty()))
        .map(|s| s.held_cgroups.clone())
        .unwrap_or_default();
    for (cgroup, id) in pinned {
        if let Some(name) = quarantined.get(id) {
            held.entry(*cgroup).or_insert_with(|| name.clone());
        }
    }
    held.retain(|_, name| {
        kept.iter().any(|names| names.contains(name)) || quarantined.values().any(|n| n == name)
    });
    held
}

/// The folds a start keeps (the state file's), and the label sets quarantined only by them;
/// a fold's name that is not of the shape this agent makes ([`fold::is_fold`]) is left out,
/// logged (`*` alone would cover every label set).
pub(super) fn folds_at_start(
    state: Option<&AgentState>,
) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let Some(state) = state else {
        return Default::default();
    };
    let (folds, bad): (BTreeSet<String>, BTreeSet<String>) = state
        .quarantine_folds
        .iter()
        .cloned()
        .partition(|name| fold::is_fold(name));
    if !bad.is_empty() {
        tracing::error!(
            ?bad,
            "the state file names quarantine folds of no shape this agent makes: left out"
        );
    }
    (
        folds,
        state.quarantined_by_fold.clone(),
        state.absorbed_by_fold.clone(),
    )
}

/// The name a quarantine is kept under while its workload's is unknown (restored by number
/// only, out of the policy): `identity N`, as `Agent::name_of` says.
fn placeholder(id: u32) -> String {
    format!("identity {id}")
}

/// The identity number and workload name of each cgroup of the cgroup map `map`, as
/// `compiled` names its number (a cgroup whose number it does not know is left out).
fn named(compiled: &Compiled, map: &BTreeMap<u64, u32>) -> Mapped {
    map.iter()
        .filter_map(|(&cgroup, &id)| {
            compiled
                .identity(id)
                .map(|i| (cgroup, (id, i.name.clone())))
        })
        .collect()
}

/// Cgroup ID -> the identity number and workload name the cgroup map gives it.
pub(super) type Mapped = BTreeMap<u64, (u32, String)>;

/// (cgroup ID, the workload it left) -> that move ([`Agent::cgroups_written`]).
pub(super) type Departures = BTreeMap<(u64, String), Left>;

/// A cgroup's move away from a workload ([`Agent::cgroups_written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Left {
    /// When the move was written (CLOCK_MONOTONIC nanoseconds).
    pub at_ns: u64,
    /// The identity number the cgroup had in the workload it left: a late quarantine follows
    /// the move only for calls made under that number (review 56 L2: a twin label set that
    /// took the workload's name in the same write is another number). None from a state file
    /// that did not keep it.
    pub identity: Option<u32>,
}

/// What the last agent of this boot knew of cgroup moves (its state file: the kernel's
/// times and cgroup IDs are of one boot): the number and workload name of each cgroup of the
/// pinned map it left (`pinned`), where the state file names the same number for it, so that a cgroup
/// moved while no agent ran is a move of the first write (review 56 L4); and the moves it
/// remembered. The first write forgets moves too old or of cgroups gone
/// ([`Agent::cgroups_written`]). The names are of the pinned map of the state file's pin
/// directory (`pin_dir`, this agent's) only.
pub(super) fn moves_at_start(
    pinned: &BTreeMap<u64, u32>,
    state: Option<&AgentState>,
    pin_dir: &std::path::Path,
) -> (Mapped, Departures) {
    let Some(state) = state.filter(|s| written_this_boot(s) == Some(true)) else {
        return (BTreeMap::new(), BTreeMap::new());
    };
    // Another pin directory's map (an ABI's, another `--pin-root`) is not the one named.
    let names = if same_pins(&state.pin_dir, pin_dir) {
        pinned
            .iter()
            .filter_map(|(cgroup, id)| match state.mapped_cgroups.get(cgroup) {
                Some((was, name)) if was == id => Some((*cgroup, (*was, name.clone()))),
                _ => None,
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let departures = state
        .departures
        .iter()
        .map(|d| {
            let left = Left {
                at_ns: d.at_ns,
                identity: d.identity,
            };
            ((d.cgroup_id, d.workload.clone()), left)
        })
        .collect();
    (names, departures)
}

/// Whether the state file was written in this boot, whose cgroup IDs and CLOCK_MONOTONIC
/// its cgroups and times are of; `None` when it keeps no boot ID (an older agent's).
fn written_this_boot(state: &AgentState) -> Option<bool> {
    let written = state.boot_id.as_ref()?;
    Some(Some(written) == boot_id().as_ref())
}

/// This boot's ID (`/proc/sys/kernel/random/boot_id`), if it can be read.
pub(super) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
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
    /// The same label set under a longer or shorter name ([`renamed`]).
    Renamed(String),
}

/// Whether `now` names the label set `kept` named: a label set's name is
/// `<namespace>/<service account>#<hash prefix>`, and the prefix grows (8, 16, 32, 64 hex
/// digits) while another label set of the service account shares it, and shrinks when that
/// one goes; its number does not change. A tenant that crafts such a twin (about 2^32
/// hashes) renamed its quarantined label set, which then read as another workload holding
/// the number (red-team review 50 M1).
fn renamed(kept: &str, now: &str) -> bool {
    let (Some((kept_base, kept_hash)), Some((now_base, now_hash))) =
        (kept.rsplit_once('#'), now.rsplit_once('#'))
    else {
        return false;
    };
    let hash =
        |h: &str| matches!(h.len(), 8 | 16 | 32 | 64) && h.bytes().all(|b| b.is_ascii_hexdigit());
    kept_base == now_base
        && hash(kept_hash)
        && hash(now_hash)
        && kept_hash != now_hash
        && (kept_hash.starts_with(now_hash) || now_hash.starts_with(kept_hash))
}

/// The identities a quarantine follows its processes to: each cgroup held under a
/// quarantine's name (`held`: last mapped to that quarantined workload, see
/// [`Agent::hold_cgroups`]) that `mapped` gives to another workload (`name_at`: the name of
/// an identity in the policy of `mapped`): that identity, the quarantine's name, the
/// cgroup. Such a move is a pod relabelled into another label set (its processes run on,
/// under the new identity) or an inventory edit that gives a cgroup to another workload;
/// either way the processes the quarantine was meant for are the same. Every move, in
/// cgroup order (several quarantines may move into one workload: each is weighed, review 53
/// N2). Held by name, not number: a number can pass to another workload in the same write
/// (red-team review 52 M1, M2). Reserved identities are never followed to, nor the same
/// label set under a longer or shorter name.
fn followed<'a>(
    held: &BTreeMap<u64, String>,
    mapped: &BTreeMap<u64, u32>,
    name_at: impl Fn(u32) -> Option<&'a str>,
) -> Vec<(u32, String, u64)> {
    let mut to = Vec::new();
    for (cgroup, from) in held {
        let Some(&at) = mapped.get(cgroup) else {
            continue;
        };
        if at < reserved::FIRST_DYNAMIC {
            continue;
        }
        let moved = name_at(at).is_some_and(|now| now != from && !renamed(from, now));
        if moved {
            to.push((at, from.clone(), *cgroup));
        }
    }
    to
}

/// The cgroups that left the workload `from` (its name, and the number the calls were made
/// under) at or after `since_ns` (see [`Agent::hold_calling_cgroups`]).
fn departed(departures: &Departures, (from, number): (&str, u32), since_ns: u64) -> Vec<u64> {
    departures
        .iter()
        .filter(|((_, name), left)| {
            name == from && left.at_ns >= since_ns && left.identity.is_none_or(|id| id == number)
        })
        .map(|((cgroup, _), _)| *cgroup)
        .collect()
}

/// How many held cgroups that no identity maps are kept (see [`Agent::hold_cgroups`]): far
/// above the cgroups of the pods a node runs, a bound on what a churning pod can make the
/// agent remember (16 bytes and a name each).
const MAX_HELD_UNMAPPED: usize = 4096;

/// How many moves of cgroups away from a workload are remembered at most (see
/// [`Agent::cgroups_written`]), about 80 bytes each: one per (cgroup, workload left), of
/// cgroups that still exist, for [`departure_horizon`]; beyond it the oldest go, logged.
const MAX_DEPARTURES: usize = 65_536;

/// How long a cgroup's move away from a workload is remembered: as long as a deny of that
/// workload can be acted on late (the policy history's reach: an overflow summary is read a
/// window after its window ended, `--events-aggregate`), and a minute for a busy agent.
fn departure_horizon(events_aggregate: std::time::Duration) -> u64 {
    let horizon = std::time::Duration::from_secs(60) + events_aggregate.saturating_mul(3);
    u64::try_from(horizon.as_nanos()).unwrap_or(u64::MAX)
}

/// What moving the quarantines leaves to do once the policy they were moved for is written:
/// an apply that fails leaves the kernel as it was, and the agent's record must stay with it
/// (red-team review 50 L1).
#[derive(Default)]
pub(super) struct Moved {
    /// The quarantine record before the moves, put back if the write fails.
    before: Option<Kept>,
    /// The folds' part of it, when a fold was in force or could be made (see
    /// [`Agent::fold_absent`]).
    folds_before: Option<FoldsKept>,
    /// Step-ups ended or renamed (their records to forget), step-ups renamed (their records
    /// under the new name), and the notices to send.
    forget: Vec<String>,
    record: Vec<(String, std::time::SystemTime)>,
    notices: Vec<Notice>,
}

/// The folds, the label sets quarantined by them, the pending step-ups, the held cgroups and
/// the quarantines of their own the folds hold.
type FoldsKept = (
    BTreeSet<String>,
    BTreeSet<String>,
    BTreeMap<String, std::time::SystemTime>,
    BTreeMap<u64, String>,
    BTreeSet<String>,
);

/// The agent's quarantine record.
type Kept = (
    BTreeMap<u32, String>,
    BTreeSet<String>,
    BTreeMap<u32, (std::time::SystemTime, String)>,
);

impl Agent {
    /// Moves each quarantine to its name's number in the policy in force (see the module
    /// docs); one whose name is out of the policy stays by number while no other workload
    /// has that number (it comes back there). Called before every full write, so that the
    /// desired state flags the right identities; [`Agent::quarantines_written`] or
    /// [`Agent::quarantines_not_written`] after it.
    pub(super) fn keep_quarantines_with_their_names(&mut self) -> Moved {
        let before = (
            self.quarantined.clone(),
            self.waiting_quarantines.clone(),
            self.step_ups.clone(),
        );
        let mut moved = Moved::default();
        let moves: Vec<(u32, Move)> = self
            .quarantined
            .iter()
            .filter_map(|(&id, name)| {
                if *name == placeholder(id) {
                    // Restored without its name (a state file from before names were kept,
                    // its workload out of the policy then): kept by number until the number is
                    // back, then named (review 50 L2).
                    return None;
                }
                let at = self.compiled.identity_by_name(name).map(|i| i.id);
                match (at, self.compiled.identity(id)) {
                    (Some(now_at), _) if now_at == id => None,
                    (Some(now_at), _) => Some((id, Move::To(now_at))),
                    (None, Some(holder)) if renamed(name, &holder.name) => {
                        Some((id, Move::Renamed(holder.name.clone())))
                    }
                    (None, Some(_)) => Some((id, Move::Wait)),
                    (None, None) => None,
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
        let named: Vec<(u32, String)> = self
            .quarantined
            .iter()
            .filter(|(&id, name)| **name == placeholder(id))
            .filter_map(|(&id, _)| Some((id, self.compiled.identity(id)?.name.clone())))
            .collect();
        for (id, name) in named {
            self.quarantined.insert(id, name);
            changed = true;
        }
        for (id, to, name, step_up) in taken {
            match to {
                Move::Renamed(now_named) => {
                    tracing::info!(subject = %name, now = %now_named, identity = id, "quarantined label set renamed (a twin's hash suffix): the quarantine follows it");
                    self.quarantined.insert(id, now_named.clone());
                    if let Some((until, _)) = step_up {
                        moved.forget.push(name);
                        moved.record.push((now_named.clone(), until));
                        self.step_ups.insert(id, (until, now_named));
                    }
                }
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
                        tracing::info!(subject = %name, identity = id, now = %holder, "step-up quarantine over: its workload left the policy and its number names another");
                        moved.forget.push(recorded);
                        moved.notices.push(Notice::Released {
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
            moved.notices.push(quarantined_notice(
                name.clone(),
                id,
                "back in the policy, quarantined while out of it",
            ));
            self.quarantined.entry(id).or_insert(name);
            changed = true;
        }
        changed |= self.fold_absent(&mut moved);
        if changed {
            moved.before = Some(before);
        }
        moved
    }

    /// The folds' part of the quarantine record, as a failed write puts it back.
    fn folds_kept(&self) -> FoldsKept {
        (
            self.quarantine_folds.clone(),
            self.quarantined_by_fold.clone(),
            self.pending_step_ups.clone(),
            self.held_cgroups.clone(),
            self.absorbed_by_fold.clone(),
        )
    }

    /// Keeps the quarantines out of the policy bounded ([`fold`]): those of a service account
    /// or namespace past its bound are folded into one quarantine of all its label sets, and
    /// every label set of the policy a fold covers is quarantined. Returns whether the record
    /// changed.
    fn fold_absent(&mut self, moved: &mut Moved) -> bool {
        // What a failed write puts back (review 77 L2); the held cgroups are copied only when
        // a fold is in force or could be made.
        let could_fold = !self.quarantine_folds.is_empty()
            || !self.absorbed_by_fold.is_empty()
            || self.quarantined.len() + self.waiting_quarantines.len()
                > fold::MAX_ABSENT_PER_ACCOUNT;
        let folds_before = could_fold.then(|| self.folds_kept());
        let compiled = self.compiled.clone();
        let folded = fold::Record {
            quarantined: &mut self.quarantined,
            waiting: &mut self.waiting_quarantines,
            step_ups: &mut self.step_ups,
            pending_step_ups: &mut self.pending_step_ups,
            held_cgroups: &mut self.held_cgroups,
            folds: &mut self.quarantine_folds,
            by_fold: &mut self.quarantined_by_fold,
            absorbed: &mut self.absorbed_by_fold,
        }
        .fold(
            |name| compiled.identity_by_name(name).is_some(),
            compiled.identities().map(|i| (i.id, i.name.as_str())),
        );
        for (fold, taking) in folded.made {
            tracing::warn!(%fold, quarantines = taking, "more quarantined label sets of one service account (or namespace) out of the policy than are kept one by one: folded into one quarantine of every label set it names, until released");
            moved.notices.push(quarantined_notice(
                fold,
                reserved::UNKNOWN,
                format!(
                    "{taking} of its quarantined label sets were out of the policy (a pod \
                     relabelled again and again, or workloads made and deleted): one \
                     quarantine of them all, until released"
                ),
            ));
        }
        moved.forget.extend(folded.forget);
        if folded.unabsorbed > 0 {
            tracing::warn!(quarantines = folded.unabsorbed, "quarantines of their own of label sets out of the policy past the {} a namespace keeps under a fold: held by the fold only, released with it", fold::MAX_ABSORBED_PER_NAMESPACE);
        }
        for (id, name) in folded.returned {
            tracing::warn!(subject = %name, identity = id, "quarantined label set back in the policy, held by a fold: quarantined on its own account again");
            moved.notices.push(quarantined_notice(
                name,
                id,
                "back in the policy, quarantined while out of it",
            ));
        }
        for (id, name) in folded.quarantined {
            tracing::warn!(subject = %name, identity = id, "label set quarantined by the fold that covers it");
            moved.notices.push(quarantined_notice(
                name,
                id,
                "its service account's (or namespace's) label sets are quarantined together",
            ));
        }
        if folded.changed {
            moved.folds_before = folds_before;
        }
        folded.changed
    }

    /// Quarantines each identity a held cgroup moves to in `mapped` (see [`followed`]), as
    /// the quarantine it came from holds it: until released, or a step-up until the same
    /// time. An identity already quarantined keeps the stronger of the two holds: a lasting
    /// one replaces a step-up, and of two step-ups the later end stays (review 52 H3: a
    /// tenant stepped up its own label set, moved a pod quarantined until released into it,
    /// and the pod went free at the step-up's end). Before, a tenant relabelled its
    /// quarantined pods (`purpose`, `ring`, an identity label) and they ran on unquarantined
    /// under a new label set. Recorded in `moved`, so that a write that fails takes it back.
    /// Returns whether any identity's quarantine changed (the desired state must then be made
    /// again).
    pub(super) fn follow_moved_cgroups(
        &mut self,
        mapped: &BTreeMap<u64, u32>,
        moved: &mut Moved,
    ) -> bool {
        let compiled = self.compiled.clone();
        let to = followed(&self.held_cgroups, mapped, |id| {
            compiled.identity(id).map(|i| i.name.as_str())
        });
        let mut changed = false;
        for (at, from, cgroup) in to {
            // The hold the quarantine left behind has: `None` until released.
            let Some(hold) = self.hold_of(&from) else {
                continue; // released since
            };
            let name = self.name_of(at);
            let current = match self.quarantined.contains_key(&at) {
                false => None,
                true => Some(self.step_ups.get(&at).map(|(until, _)| *until)),
            };
            // Processes of a label set the fold itself quarantined stay the fold's (review 78
            // L2: an innocent pod's relabel within the account is no quarantine of its own).
            let own_hold = !self.quarantined_by_fold.contains(&from);
            if current.is_some() && own_hold && self.quarantined_by_fold.remove(&name) {
                // Quarantined by a fold, and now on its own account: the processes the
                // quarantine holds run there, so the fold's release must not free it (review
                // 77 M1: a new label set of a relabelled pod is quarantined by the fold
                // first, before its cgroups are followed).
                if moved.folds_before.is_none() {
                    let mut before = self.folds_kept();
                    before.1.insert(name.clone());
                    moved.folds_before = Some(before);
                }
                changed = true;
                tracing::warn!(subject = %name, %from, cgroup, "quarantined processes moved to a label set a fold holds: quarantined on their own account too");
                continue;
            }
            let stronger = match (current, hold) {
                (None, _) => true,
                (Some(Some(_)), None) => true,
                (Some(Some(now)), Some(until)) => until > now,
                (Some(None), _) => false,
            };
            if !stronger {
                tracing::info!(subject = %name, %from, cgroup, "quarantined processes moved to a workload quarantined at least as long: its hold stays");
                continue;
            }
            if moved.before.is_none() {
                moved.before = Some((
                    self.quarantined.clone(),
                    self.waiting_quarantines.clone(),
                    self.step_ups.clone(),
                ));
            }
            changed = true;
            let cause = format!(
                "cgroup {cgroup} of quarantined {from} moved to it (a relabelled pod, or a \
                 cgroup given to another workload): the quarantine follows its processes"
            );
            tracing::warn!(subject = %name, %from, cgroup, "quarantined processes moved to another identity: it is quarantined too");
            self.quarantined.insert(at, name.clone());
            if current.flatten().is_some() {
                moved.forget.push(name.clone());
                self.step_ups.remove(&at);
            }
            if let Some(until) = hold {
                self.step_ups.insert(at, (until, name.clone()));
                moved.record.push((name.clone(), until));
            }
            moved.notices.push(quarantined_notice(name, at, cause));
        }
        changed
    }

    /// The held cgroups `mapped` moves to another workload (a full write must follow them).
    pub(super) fn held_moves(&self, mapped: &BTreeMap<u64, u32>) -> Vec<u64> {
        let compiled = &self.compiled;
        followed(&self.held_cgroups, mapped, |id| {
            compiled.identity(id).map(|i| i.name.as_str())
        })
        .into_iter()
        .map(|(_, _, cgroup)| cgroup)
        .collect()
    }

    /// How the quarantine kept under `name` holds: `Some(None)` until released, `Some(Some(t))`
    /// a step-up until `t`, `None` when there is no such quarantine (released).
    fn hold_of(&self, name: &str) -> Option<Option<std::time::SystemTime>> {
        if self.quarantine_folds.contains(name) || self.absorbed_by_fold.contains(name) {
            return Some(None);
        }
        if let Some((&id, _)) = self.quarantined.iter().find(|(_, n)| n.as_str() == name) {
            return Some(self.step_ups.get(&id).map(|(until, _)| *until));
        }
        if self.waiting_quarantines.contains(name) {
            return Some(self.pending_step_ups.get(name).copied());
        }
        None
    }

    /// Brings `held_cgroups` in line with the cgroup map just written: each cgroup of a
    /// quarantined identity is held under the quarantine's name. A cgroup the map no longer
    /// has stays held while it may still exist, so that its processes are followed when a
    /// later map gives them an identity again (review 52 H2: a pod relabelled first out of
    /// every identity, then into a new label set, was let go in between): with a
    /// `--kubernetes` scan until a complete scan of the cgroup root no longer finds it; an
    /// inventory's cgroup (named by the operator) when unmapped. A released quarantine's
    /// cgroups are let go.
    fn hold_cgroups(&mut self, existing: &Option<BTreeSet<u64>>) {
        let kept: BTreeSet<String> = self
            .quarantined_names()
            .into_iter()
            .chain(self.quarantine_folds.iter().cloned())
            .chain(self.absorbed_by_fold.iter().cloned())
            .collect();
        let cgroups = &self.cgroups;
        self.held_cgroups.retain(|cgroup, name| {
            kept.contains(name)
                && (cgroups.contains_key(cgroup)
                    || existing.as_ref().is_none_or(|e| e.contains(cgroup)))
        });
        // Unmapped holds are bounded: a quarantined pod that churns cgroups while the scan is
        // incomplete must not grow the agent (review 53 N5). The oldest (lowest ids) go.
        let unmapped: Vec<u64> = self
            .held_cgroups
            .keys()
            .filter(|c| !cgroups.contains_key(c))
            .copied()
            .collect();
        if unmapped.len() > MAX_HELD_UNMAPPED {
            let over = unmapped.len() - MAX_HELD_UNMAPPED;
            tracing::warn!(dropped = over, "more unmapped quarantined cgroups than are held ({MAX_HELD_UNMAPPED}): the oldest are let go");
            for cgroup in &unmapped[..over] {
                self.held_cgroups.remove(cgroup);
            }
        }
        for (&cgroup, id) in &self.cgroups {
            match self.quarantined.get(id) {
                Some(name) => {
                    self.held_cgroups.insert(cgroup, name.clone());
                }
                None => {
                    self.held_cgroups.remove(&cgroup);
                }
            }
        }
    }

    /// The kernel's cgroup map is now `fresh`, under the policy in force (`pods`: the scan it
    /// was resolved from): each cgroup that left the workload it was mapped to, and still
    /// exists, is remembered with the time (`departures`, one entry per cgroup and workload
    /// left, the newest time), for a quarantine decided later about calls made before. A
    /// cgroup that is gone (a pod deleted, a sub-cgroup removed) is forgotten, so churn does
    /// not push other moves out; so is a move older than [`departure_horizon`]. Then the
    /// quarantines' holds follow the new map ([`Agent::hold_cgroups`]). The caller writes the
    /// state file, which keeps the map's names and the moves for the next agent.
    pub(super) fn cgroups_written(&mut self, fresh: BTreeMap<u64, u32>, pods: Option<&Scan>) {
        let existing = self.existing_cgroups(pods);
        let exists = |cgroup: &u64| {
            fresh.contains_key(cgroup) || existing.as_ref().is_none_or(|e| e.contains(cgroup))
        };
        let names = named(&self.compiled, &fresh);
        let at_ns = crate::events::aggregate::monotonic_ns();
        for (&cgroup, (id, from)) in &self.cgroup_names {
            let stays = names.get(&cgroup).is_some_and(|(_, now)| now == from);
            if !stays && exists(&cgroup) {
                let left = Left {
                    at_ns,
                    identity: Some(*id),
                };
                self.departures.insert((cgroup, from.clone()), left);
            }
        }
        let oldest = at_ns.saturating_sub(departure_horizon(self.options.events_aggregate));
        self.departures
            .retain(|(cgroup, _), left| left.at_ns >= oldest && exists(cgroup));
        if self.departures.len() > MAX_DEPARTURES {
            let mut times: Vec<u64> = self.departures.values().map(|l| l.at_ns).collect();
            times.sort_unstable();
            let cut = times[self.departures.len() - MAX_DEPARTURES];
            let before = self.departures.len();
            self.departures.retain(|_, left| left.at_ns >= cut);
            tracing::warn!(forgotten = before - self.departures.len(), "more recent moves of cgroups between workloads than are remembered ({MAX_DEPARTURES}): the oldest are forgotten, and a late quarantine does not follow them");
        }
        self.cgroup_names = names;
        self.cgroups = fresh;
        self.hold_cgroups(&existing);
    }

    /// The unmapped cgroups that may still matter, besides the mapped ones: with
    /// `--kubernetes`, those a complete scan of the cgroup root found (`None`, any: no scan,
    /// or an incomplete one); none for an inventory (its cgroups are the operator's, named).
    fn existing_cgroups(&self, pods: Option<&Scan>) -> Option<BTreeSet<u64>> {
        match (&self.options.kubernetes, pods) {
            (None, _) => Some(BTreeSet::new()),
            (Some(_), Some(scan)) if scan.truncated.is_none() => Some(
                scan.pods
                    .values()
                    .flat_map(|p| p.cgroups.values().copied())
                    .collect(),
            ),
            (Some(_), _) => None,
        }
    }

    /// Holds the cgroups of `subject`, just quarantined without a write.
    pub(super) fn hold_cgroups_of(&mut self, subject: u32, name: &str) {
        for (&cgroup, _) in self.cgroups.iter().filter(|(_, &id)| id == subject) {
            self.held_cgroups.insert(cgroup, name.to_string());
        }
    }

    /// The policy the quarantines were moved for is written: their record is kept.
    pub(super) fn quarantines_written(&mut self, moved: Moved) {
        if moved.before.is_none() {
            return;
        }
        self.forget_step_up_records(&moved.forget);
        for (name, until) in &moved.record {
            self.record_step_up(name, *until);
        }
        for notice in moved.notices {
            let _ = self.notices.send(notice);
        }
        self.count_quarantined();
        self.save_state();
    }

    /// The write failed (the kernel holds the previous policy): the record before the moves
    /// is back.
    pub(super) fn quarantines_not_written(&mut self, moved: Moved) {
        if let Some((quarantined, waiting, step_ups)) = moved.before {
            self.quarantined = quarantined;
            self.waiting_quarantines = waiting;
            self.step_ups = step_ups;
        }
        if let Some((folds, by_fold, pending, held, absorbed)) = moved.folds_before {
            self.quarantine_folds = folds;
            self.quarantined_by_fold = by_fold;
            self.pending_step_ups = pending;
            self.held_cgroups = held;
            self.absorbed_by_fold = absorbed;
        }
    }

    /// A deny's quarantine: of the workload the deciding policy named, at its number now, or
    /// waiting for it while it is out of the policy; by number only when that policy did not
    /// know the subject. The request is handled a moment after the deny (a window later for
    /// a deny counted beyond the event budget), when the number may have passed to another
    /// workload (red-team review 50 H1).
    pub(super) fn quarantine_requested(&mut self, subject: u32, request: QuarantineRequest) {
        let QuarantineRequest {
            name,
            cause,
            cgroups,
            since_ns,
        } = request;
        let Some(name) = name else {
            self.quarantine(subject, cause, Hold::Lasting);
            return;
        };
        let from = name.clone();
        let held = match self.identity_named(&name, subject) {
            Some(id) => {
                self.quarantine(id, cause, Hold::Lasting);
                self.quarantined.get(&id).cloned()
            }
            None => {
                self.quarantine_absent(name.clone(), cause, Hold::Lasting);
                self.absent_hold(&name)
            }
        };
        if let Some(held) = held {
            self.hold_calling_cgroups(held, (&from, subject), cgroups, since_ns);
        }
    }

    /// The number the policy in force gives the workload `name`, or `number` if the label
    /// set holding it now is `name` renamed by a twin's hash suffix (a rename keeps the
    /// number; a name alike under another number is another label set: review 56 M2).
    pub(super) fn identity_named(&self, name: &str, number: u32) -> Option<u32> {
        self.compiled
            .identity_by_name(name)
            .or_else(|| {
                self.compiled
                    .identity(number)
                    .filter(|i| renamed(name, &i.name))
            })
            .map(|i| i.id)
    }

    /// Holds the cgroups the calls that earned a quarantine came from under that
    /// quarantine's name `held`: `cgroups` (0, none known, is skipped), and every cgroup that
    /// left the workload `from` (its name, and the number the calls were made under) at or
    /// after `since_ns` (when the earliest call was made: a
    /// cgroup that has left since was the workload's then, whichever made the calls; review
    /// 55 M1: an overflow names only its first deny's cgroup). One the policy in force gives
    /// to another workload (a pod relabelled since the call) takes the quarantine there now,
    /// an unmapped one when it is mapped again.
    pub(super) fn hold_calling_cgroups(
        &mut self,
        held: String,
        (from, number): (&str, u32),
        cgroups: impl IntoIterator<Item = u64>,
        since_ns: u64,
    ) {
        let departed = departed(&self.departures, (from, number), since_ns);
        for cgroup in cgroups.into_iter().chain(departed).filter(|&c| c != 0) {
            // A cgroup held already keeps its hold (it may be another quarantine's).
            self.held_cgroups
                .entry(cgroup)
                .or_insert_with(|| held.clone());
        }
        if !self.held_moves(&self.cgroups).is_empty() {
            if let Err(error) = self.apply_full(None) {
                tracing::error!("writing the policy for a calling cgroup's move failed: {error:#}");
            }
        }
    }

    /// The name the cgroups of `name`, out of the policy in force, are held under: the fold
    /// that covers it (review 77 I2: held under a name the fold had dropped, they were let go
    /// at the next write), or its own while its quarantine is kept; `None` when none is.
    pub(super) fn absent_hold(&self, name: &str) -> Option<String> {
        if self.absorbed_by_fold.contains(name) {
            // Kept by name under the fold: held under it, as the fold's release keeps it
            // (review 79 M1).
            return Some(name.to_string());
        }
        match fold::covering(&self.quarantine_folds, name) {
            Some(fold) => Some(fold.to_string()),
            None => self.kept_while_absent(name).then(|| name.to_string()),
        }
    }

    /// Whether a quarantine of `name`, out of the policy in force, is kept: waiting by name,
    /// or by the number it left.
    pub(super) fn kept_while_absent(&self, name: &str) -> bool {
        self.waiting_quarantines.contains(name)
            || self.quarantined.values().any(|n| n == name)
            || fold::covering(&self.quarantine_folds, name).is_some()
    }

    /// Quarantines `name`, out of the policy in force: it waits by name and holds when the
    /// workload is back (a step-up's end waits in `pending_step_ups`, set by the caller).
    pub(super) fn quarantine_absent(&mut self, name: String, cause: String, hold: Hold) {
        if let Some(fold) = fold::covering(&self.quarantine_folds, &name) {
            // Held by the fold; kept by name too, as a quarantine of its own (review 78 M1),
            // while the namespace has room.
            // A step-up is not kept so: it goes with the fold (review 79 L1).
            let new = hold == Hold::Lasting && !self.absorbed_by_fold.contains(&name);
            if new && fold::absorb(&mut self.absorbed_by_fold, &name) {
                tracing::warn!(subject = %name, %fold, %cause, "subject out of the policy, held by a fold: kept by name, quarantined on its own account when back");
                self.save_state();
            }
            return;
        }
        let mut was_step_up = false;
        if hold == Hold::Lasting {
            // A lasting quarantine takes a step-up's place, as for a present subject: waiting
            // for its subject, or kept by the number it left (review 51: the step-up ended at
            // its TTL and took the lasting quarantine with it).
            was_step_up = self.pending_step_ups.remove(&name).is_some();
            let kept_at = self
                .quarantined
                .iter()
                .find(|(_, kept)| **kept == name)
                .map(|(id, _)| *id);
            if let Some(id) = kept_at {
                was_step_up |= self.step_ups.remove(&id).is_some();
            }
            if was_step_up {
                self.forget_step_up_record(&name);
            }
        }
        if self.kept_while_absent(&name) {
            if was_step_up {
                tracing::warn!(subject = %name, %cause, "subject quarantined by a step-up, out of the policy, now quarantined until released");
                self.save_state();
                let _ = self
                    .notices
                    .send(quarantined_notice(name, reserved::UNKNOWN, cause));
            }
            return;
        }
        tracing::warn!(subject = %name, %cause, "subject quarantined while out of the policy: it holds when the workload is back");
        self.waiting_quarantines.insert(name.clone());
        self.count_quarantined();
        self.save_state();
        let _ = self
            .notices
            .send(quarantined_notice(name, reserved::UNKNOWN, cause));
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

    /// `quarantine release` of a fold (`<ns>/<sa>#*`, `<ns>/*`): the fold goes, and with it
    /// the quarantines it made of the label sets of the policy it covers (their flags are
    /// cleared). Those quarantined on their own account stay (a deny's, an operator's, one
    /// the held processes moved to: review 77 M1, releasing the fold freed the relabelled pod
    /// it was made for), and so do their holds; cgroups held under the fold's name that no
    /// label set maps now are let go, logged. A flag that cannot be cleared stops the release
    /// with the flags cleared so far set again: nothing changes (review 77 L3).
    pub(super) fn release_fold(&mut self, fold: &str) -> Response {
        // Its quarantines of their own out of the policy wait by name after it: refused when
        // they would fold again at the next write (review 79 M3: the release was undone).
        let absorbed: Vec<String> = self
            .absorbed_by_fold
            .iter()
            .filter(|name| fold::covers(fold, name))
            .cloned()
            .collect();
        let others: BTreeSet<String> = self
            .quarantine_folds
            .iter()
            .filter(|f| f.as_str() != fold)
            .cloned()
            .collect();
        let waiting_after: BTreeSet<String> = self
            .quarantined_out_of_policy()
            .into_iter()
            .chain(absorbed.iter().cloned())
            .filter(|name| fold::covering(&others, name).is_none())
            .collect();
        let again = fold::new_folds(waiting_after.iter().map(String::as_str), &others);
        if !again.is_empty() {
            return Response::error(format!(
                "releasing {fold} would fold again ({}): it holds {} label sets out of the \
                 policy quarantined on their own account (`status` lists them), which would \
                 wait by name after it, more than {} of one service account (or {} of one \
                 namespace); release some by name first (`quarantine release NAME`), then \
                 {fold}",
                again.into_iter().collect::<Vec<_>>().join(", "),
                absorbed.len(),
                fold::MAX_ABSENT_PER_ACCOUNT,
                fold::MAX_ABSENT_PER_NAMESPACE
            ));
        }
        let made: Vec<(u32, String)> = self
            .quarantined
            .iter()
            .filter(|(_, name)| {
                fold::covers(fold, name) && self.quarantined_by_fold.contains(*name)
            })
            .map(|(id, name)| (*id, name.clone()))
            .collect();
        let mut cleared = Vec::new();
        for (id, name) in &made {
            if self.compiled.identity(*id).is_none() {
                continue;
            }
            if let Err(error) = self
                .datapath
                .tables
                .update_flags(*id, 0, flags::QUARANTINED)
            {
                for id in cleared {
                    if let Err(undo) = self.datapath.tables.update_flags(id, flags::QUARANTINED, 0)
                    {
                        tracing::error!(
                            identity = id,
                            "quarantining again after a failed release: {undo:#}"
                        );
                    }
                }
                return Response::error(format!(
                    "releasing {name} of {fold}: {error:#}; nothing released"
                ));
            }
            cleared.push(*id);
        }
        for (id, name) in &made {
            self.quarantined.remove(id);
            self.quarantined_by_fold.remove(name);
            self.forget_step_up(*id);
        }
        // The quarantines of their own it held out of the policy wait by name again.
        for name in &absorbed {
            self.absorbed_by_fold.remove(name);
            self.waiting_quarantines.insert(name.clone());
        }
        let own = self
            .quarantined
            .values()
            .filter(|name| fold::covers(fold, name))
            .count();
        self.quarantine_folds.remove(fold);
        let before = self.held_cgroups.len();
        self.held_cgroups.retain(|_, name| name != fold);
        if self.held_cgroups.len() < before {
            tracing::warn!(%fold, cgroups = before - self.held_cgroups.len(), "cgroups held under a released fold's name, mapped to no label set now, are let go");
        }
        self.count_quarantined();
        self.save_state();
        for (id, name) in &made {
            let _ = self.notices.send(Notice::Released {
                time: now(),
                workload: name.clone(),
                identity: *id,
            });
        }
        let _ = self.notices.send(Notice::Released {
            time: now(),
            workload: fold.to_string(),
            identity: reserved::UNKNOWN,
        });
        Response::ok(format!(
            "{fold} released, and the {} label sets it quarantined; {own} it covers stay \
             quarantined on their own account, and {} out of the policy wait by name \
             (release each by name)",
            made.len(),
            absorbed.len()
        ))
    }

    /// `quarantine release` of a label set out of the policy that a fold holds by name as a
    /// quarantine of its own: that quarantine goes (the fold still covers the label set: back
    /// in the policy, it is the fold's). So a fold's own quarantines can be released before
    /// the fold (review 79 M3).
    pub(super) fn release_absorbed(&mut self, workload: &str) -> Response {
        self.absorbed_by_fold.remove(workload);
        self.count_quarantined();
        self.save_state();
        let _ = self.notices.send(Notice::Released {
            time: now(),
            workload: workload.to_string(),
            identity: reserved::UNKNOWN,
        });
        let fold = fold::covering(&self.quarantine_folds, workload).unwrap_or_default();
        Response::ok(format!(
            "{workload} released (out of the policy); the quarantine of {fold} still covers it"
        ))
    }

    /// The quarantined workloads by name, those out of the policy in force included.
    pub(super) fn quarantined_names(&self) -> Vec<String> {
        self.quarantined
            .values()
            .chain(&self.waiting_quarantines)
            .cloned()
            .collect()
    }

    /// The quarantined workloads out of the policy in force (kept by the number they left,
    /// or waiting by name).
    pub(super) fn quarantined_out_of_policy(&self) -> Vec<String> {
        self.quarantined_names()
            .into_iter()
            .filter(|name| self.compiled.identity_by_name(name).is_none())
            .collect()
    }

    /// `quarantine list`'s lines: one out of the policy in force says so.
    pub(super) fn quarantine_list(&self) -> Vec<String> {
        let out: BTreeSet<String> = self.quarantined_out_of_policy().into_iter().collect();
        let folds = self.quarantine_folds.iter().map(|fold| {
            let absorbed = self
                .absorbed_by_fold
                .iter()
                .filter(|name| fold::covers(fold, name))
                .count();
            format!(
                "{fold} (every label set it names, those out of the policy included: more of \
                 its quarantines were out of the policy than are kept one by one; it holds \
                 {absorbed} out of the policy quarantined on their own account, named by \
                 `status`)"
            )
        });
        self.quarantined_names()
            .into_iter()
            .map(|name| {
                if out.contains(&name) {
                    format!("{name} (out of the policy: quarantined again when it is back)")
                } else if self.quarantined_by_fold.contains(&name) {
                    format!("{name} (by its fold only)")
                } else {
                    name
                }
            })
            .chain(folds)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use super::{boot_id, departed, followed, held_at_start, moves_at_start, renamed, Left};
    use crate::agent::AgentState;

    /// A state file as an agent of boot `boot` (none: an agent that kept no boot ID) left it,
    /// holding cgroup 10 under `acme/app`'s quarantine, with cgroups 1-3 mapped and cgroup 7's
    /// move away from `acme/api` remembered.
    fn state_of(boot: Option<String>) -> AgentState {
        serde_json::from_value(serde_json::json!({
            "pid": 1,
            "policies": "/policies",
            "revision": "r1",
            "applied_at": "2026-12-07T00:00:00Z",
            "cgroup_root": "/sys/fs/cgroup",
            "pin_dir": "/sys/fs/bpf/enforcer",
            "unresolved_cgroups": [],
            "held_cgroups": { "10": "acme/app" },
            "mapped_cgroups": {
                "1": [300, "acme/app"],
                "2": [301, "acme/api"],
                "3": [302, "acme/db"],
            },
            "departures": [
                { "cgroup_id": 7, "workload": "acme/api", "at_ns": 42, "identity": 301 },
                { "cgroup_id": 8, "workload": "acme/api", "at_ns": 43 },
            ],
            "boot_id": boot,
        }))
        .expect("a valid state file")
    }

    #[test]
    fn a_late_quarantine_takes_the_cgroups_that_left_its_workload_since_the_calls() {
        let left = |at_ns, identity| Left { at_ns, identity };
        let departures: BTreeMap<(u64, String), Left> = [
            ((1, "acme/app#aabbccdd"), left(100, Some(300))),
            ((2, "acme/app#aabbccdd"), left(200, Some(300))),
            // The same name left from another number: a twin label set that had the name
            // (review 56 L2).
            ((3, "acme/app#aabbccdd"), left(200, Some(500))),
            // Kept by an agent that did not keep numbers: by name alone.
            ((4, "acme/app#aabbccdd"), left(200, None)),
            ((5, "acme/api#11223344"), left(200, Some(300))),
        ]
        .map(|((c, n), l)| ((c, n.to_string()), l))
        .into();
        // Calls from 150 on: cgroup 1 left before them.
        assert_eq!(
            departed(&departures, ("acme/app#aabbccdd", 300), 150),
            [2, 4]
        );
        assert_eq!(
            departed(&departures, ("acme/app#aabbccdd", 500), 100),
            [3, 4]
        );
        assert!(departed(&departures, ("acme/app#aabbccdd", 300), 201).is_empty());
    }

    fn this_boot() -> Option<String> {
        Some(boot_id().expect("this kernel has a boot ID"))
    }

    #[test]
    fn moves_are_read_back_in_the_boot_that_wrote_them_by_the_numbers_it_wrote() {
        // 1 is pinned at the number the state names; 2's number is another now (the
        // workload the state names never had it: review 57 M1); 4 is not in the state.
        let pinned: BTreeMap<u64, u32> = [(1, 300), (2, 399), (4, 300)].into();
        let pins = Path::new("/sys/fs/bpf/enforcer");
        let (names, departures) = moves_at_start(&pinned, Some(&state_of(this_boot())), pins);
        assert_eq!(names, [(1, (300, "acme/app".to_string()))].into());
        let left = |at_ns, identity| Left { at_ns, identity };
        let want = [
            ((7, "acme/api".to_string()), left(42, Some(301))),
            ((8, "acme/api".to_string()), left(43, None)),
        ];
        assert_eq!(departures, want.into());
        // Another boot's cgroup IDs and clock, or a state file that does not say its boot,
        // name nothing and bring back no move.
        let other = Some("00000000-0000-0000-0000-000000000000".to_string());
        for state in [state_of(other), state_of(None)] {
            let (names, departures) = moves_at_start(&pinned, Some(&state), pins);
            assert!(names.is_empty() && departures.is_empty());
        }
        let (names, departures) = moves_at_start(&pinned, None, pins);
        assert!(names.is_empty() && departures.is_empty());
        // Another pin directory's map is not named; the moves are the cgroups', kept.
        let other_pins = Path::new("/sys/fs/bpf/enforcer-other");
        let (names, departures) = moves_at_start(&pinned, Some(&state_of(this_boot())), other_pins);
        assert!(names.is_empty() && departures.len() == 2);
    }

    #[test]
    fn held_cgroups_are_read_back_in_the_boot_that_wrote_them() {
        let quarantined: BTreeMap<u32, String> = [(300, "acme/app".to_string())].into();
        let (waiting, folds) = (BTreeSet::new(), BTreeSet::new());
        // Cgroup 5 is pinned to the quarantined number: held whatever the state file says.
        let pinned: BTreeMap<u64, u32> = [(5, 300), (6, 301)].into();
        let held = |pinned: &BTreeMap<u64, u32>, state| {
            held_at_start(
                pinned,
                Some(&state),
                &quarantined,
                [&waiting, &folds, &folds],
            )
            .into_keys()
            .collect::<Vec<_>>()
        };
        assert_eq!(held(&pinned, state_of(this_boot())), [5, 10]);
        // Another boot gave out cgroup 10 again, maybe to another tenant's pod (review 58 F4).
        let other = Some("00000000-0000-0000-0000-000000000000".to_string());
        assert_eq!(held(&pinned, state_of(other)), [5]);
        // An agent that kept no boot ID: its holds count while pinned maps say an agent ran
        // in this boot (pins do not outlive a reboot).
        assert_eq!(held(&pinned, state_of(None)), [5, 10]);
        assert!(held(&BTreeMap::new(), state_of(None)).is_empty());
        // A hold of a quarantine no longer kept goes.
        let released = held_at_start(
            &pinned,
            Some(&state_of(this_boot())),
            &BTreeMap::new(),
            [&waiting, &folds, &folds],
        );
        assert!(released.is_empty());
    }

    #[test]
    fn a_quarantine_follows_its_cgroups_to_another_workload_only() {
        let held: BTreeMap<u64, String> = [
            (1, "acme/app#aabbccdd"),
            (2, "acme/app#aabbccdd"),
            (4, "acme/app#aabbccdd"),
            (5, "acme/app#aabbccdd"),
            (6, "acme/app#aabbccdd"),
            (7, "acme/app#aabbccdd"),
        ]
        .map(|(c, n)| (c, n.to_string()))
        .into();
        let names: BTreeMap<u32, &str> = [
            (300, "acme/app#aabbccdd"),
            (500, "acme/app#11223344"),
            (301, "acme/app#aabbccdd11223344"),
            // The quarantined label set's number once, passed to another workload.
            (302, "acme/api#aabbccdd"),
        ]
        .into();
        // 1 moves to another label set; 2 stays; 4 is unmapped now; 5 stays under a longer
        // name (a twin's hash suffix: the same label set); 6 goes to the agent's reserved
        // identity; 7 to a workload whose number the quarantined one had.
        let mapped: BTreeMap<u64, u32> =
            [(1, 500), (2, 300), (3, 500), (5, 301), (6, 4), (7, 302)].into();
        let to = followed(&held, &mapped, |id| names.get(&id).copied());
        let want = vec![
            (500, "acme/app#aabbccdd".to_string(), 1),
            (302, "acme/app#aabbccdd".to_string(), 7),
        ];
        assert_eq!(to, want);
        assert!(followed(&BTreeMap::new(), &mapped, |id| names.get(&id).copied()).is_empty());
    }

    #[test]
    fn a_label_sets_name_is_the_same_under_a_longer_or_shorter_hash() {
        assert!(renamed("acme/app#aabbccdd", "acme/app#aabbccdd11223344"));
        assert!(renamed("acme/app#aabbccdd11223344", "acme/app#aabbccdd"));
        // Another label set, another service account, not a label set's name, the same name.
        assert!(!renamed("acme/app#aabbccdd", "acme/app#aabbccde11223344"));
        assert!(!renamed("acme/app#aabbccdd", "acme/api#aabbccdd11223344"));
        assert!(!renamed("acme-gateway", "acme-gateway"));
        assert!(!renamed("acme/app#aabbccdd", "acme/app#aabbccdd"));
        assert!(!renamed("acme/app#aabb", "acme/app#aabbccdd"));
        assert!(!renamed(
            "service/acme/s#zzzzzzzz",
            "service/acme/s#zzzzzzzz11223344"
        ));
    }
}

//! A bound on the quarantines kept for workloads out of the policy (red-team review 75 M2).
//!
//! A quarantine is kept by name while its workload is out of the policy, so that it holds
//! again when the workload is back. Nothing bounded those: a tenant that relabelled a
//! quarantined pod through distinct label sets made one per relabel (the quarantine follows
//! the pod's processes to each new label set, and the one it left, empty now, leaves the
//! policy), each kept for ever and written whole into the state file at every change, until
//! the agent ran out of memory (hours), and again at every restart. A relabel changes neither
//! a pod's namespace nor its service account, and a label set's name is
//! `<namespace>/<service account>#<hash>`: past [`MAX_ABSENT_PER_ACCOUNT`] such quarantines of
//! one service account they are *folded* into one quarantine of every label set of that
//! account, `<namespace>/<service account>#*`, and past [`MAX_ABSENT_PER_NAMESPACE`] (names
//! and account folds) in one namespace into `<namespace>/*`. Fail closed: nothing a
//! quarantine held is let go, a step-up folded holds until released, and the record stays
//! bounded by the namespaces. Names of another shape (an inventory's workloads: the
//! operator's, not a tenant's) are never folded.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

/// How many quarantined label sets of one service account may be out of the policy before
/// they are folded into one quarantine of the account: far above what an operator's own
/// quarantines leave (a label set of a workload that is deleted while quarantined), a
/// bound on what relabelling one pod can make the agent keep (~1 KB each in memory and in
/// the state file).
pub(super) const MAX_ABSENT_PER_ACCOUNT: usize = 32;

/// How many quarantines out of the policy (label sets, and account folds) one namespace may
/// have before they are folded into one quarantine of the namespace: the same bound as the
/// label sets a tenant may have in the policy (`--max-identities-per-tenant`'s default), for
/// a tenant that creates service accounts to stay under [`MAX_ABSENT_PER_ACCOUNT`].
pub(super) const MAX_ABSENT_PER_NAMESPACE: usize = 256;

/// How many quarantines of their own (a deny's, an operator's, one the held processes moved
/// to) of one namespace's label sets out of the policy a fold keeps by name
/// ([`Record::absorbed`]); past it, they are the fold's only (released with it).
pub(super) const MAX_ABSORBED_PER_NAMESPACE: usize = 256;

/// Whether the fold `fold` (`<namespace>/<service account>#*` or `<namespace>/*`) covers
/// `name`: a label set's name of that account or namespace (parsed, not a prefix: a namespace
/// named `service` must not cover the Services' identities, `service/<ns>/<name>`, nor
/// `acme/*` an inventory's `acme/tools`: red-team review 77 L1), or, for a namespace's fold,
/// an account fold of that namespace.
pub(super) fn covers(fold: &str, name: &str) -> bool {
    let (account, namespace) = match account_of(name) {
        Some(parsed) => parsed,
        None => {
            let Some(account) = name.strip_suffix("#*") else {
                return false;
            };
            let Some((namespace, _)) = account.split_once('/') else {
                return false;
            };
            return fold.strip_suffix("/*") == Some(namespace);
        }
    };
    match fold.strip_suffix("#*") {
        Some(folded) => folded == account,
        None => fold.strip_suffix("/*") == Some(namespace),
    }
}

/// Whether `name` is a fold's name as this module makes them: `<namespace>/*` or
/// `<namespace>/<service account>#*`, the parts non-empty and free of `/`, `#` and `*` (a
/// state file's are checked: `*` alone would read as "everything").
pub(super) fn is_fold(name: &str) -> bool {
    let part = |p: &str| !p.is_empty() && !p.contains(['/', '#', '*']);
    if let Some(account) = name.strip_suffix("#*") {
        return account
            .split_once('/')
            .is_some_and(|(namespace, sa)| part(namespace) && part(sa));
    }
    name.strip_suffix("/*").is_some_and(part)
}

/// The fold of `folds` that covers `name`, if any.
pub(super) fn covering<'a>(folds: &'a BTreeSet<String>, name: &str) -> Option<&'a str> {
    folds
        .iter()
        .map(String::as_str)
        .find(|fold| covers(fold, name))
}

/// A Kubernetes label set's service account (`<namespace>/<service account>`) and
/// namespace, from its name `<namespace>/<service account>#<hash>` (the hash 8, 16, 32 or 64
/// hex digits); `None` for a name of any other shape.
pub(super) fn account_of(name: &str) -> Option<(&str, &str)> {
    let (account, hash) = name.rsplit_once('#')?;
    let (namespace, service_account) = account.split_once('/')?;
    let hashed =
        matches!(hash.len(), 8 | 16 | 32 | 64) && hash.bytes().all(|b| b.is_ascii_hexdigit());
    // The parts a fold's name is made of: as `is_fold` checks them (review 78 I2).
    let part = |p: &str| !p.is_empty() && !p.contains(['/', '#', '*']);
    (hashed && part(namespace) && part(service_account)).then_some((account, namespace))
}

/// Keeps `name` (a label set out of the policy, quarantined on its own account, that a fold
/// covers) among `absorbed` while its namespace has room
/// ([`MAX_ABSORBED_PER_NAMESPACE`]); whether it is there now.
pub(super) fn absorb(absorbed: &mut BTreeSet<String>, name: &str) -> bool {
    if absorbed.contains(name) {
        return true;
    }
    let Some((_, namespace)) = account_of(name) else {
        return false;
    };
    // A namespace holds no `/`, and `0` follows `/`: the range is the namespace's names.
    let kept = absorbed
        .range(format!("{namespace}/")..format!("{namespace}0"))
        .count();
    kept < MAX_ABSORBED_PER_NAMESPACE && absorbed.insert(name.to_string())
}

/// The folds to add so that the quarantines out of the policy stay bounded: `absent` are
/// their names (none covered by `folds`, the folds in force). A service account with more
/// than [`MAX_ABSENT_PER_ACCOUNT`] names is folded (`<ns>/<sa>#*`); then a namespace whose
/// names left unfolded and account folds (those in force and the new ones) are more than
/// [`MAX_ABSENT_PER_NAMESPACE`] is folded (`<ns>/*`), taking the place of its account folds.
pub(super) fn new_folds<'a>(
    absent: impl IntoIterator<Item = &'a str>,
    folds: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut by_account: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
    for (account, namespace) in absent.into_iter().filter_map(account_of) {
        by_account.entry(account).or_insert((namespace, 0)).1 += 1;
    }
    let accounts: BTreeSet<String> = by_account
        .iter()
        .filter(|(_, (_, count))| *count > MAX_ABSENT_PER_ACCOUNT)
        .map(|(account, _)| format!("{account}#*"))
        .collect();
    let mut by_namespace: BTreeMap<&str, usize> = BTreeMap::new();
    for (account, (namespace, count)) in &by_account {
        if !accounts.contains(&format!("{account}#*")) {
            *by_namespace.entry(namespace).or_default() += count;
        }
    }
    for fold in folds.iter().chain(&accounts) {
        if let Some(namespace) = fold
            .strip_suffix("#*")
            .and_then(|account| account.split_once('/'))
            .map(|(namespace, _)| namespace)
        {
            *by_namespace.entry(namespace).or_default() += 1;
        }
    }
    let namespaces: BTreeSet<String> = by_namespace
        .into_iter()
        .filter(|(_, count)| *count > MAX_ABSENT_PER_NAMESPACE)
        .map(|(namespace, _)| format!("{namespace}/*"))
        .collect();
    let mut made: BTreeSet<String> = accounts
        .into_iter()
        .filter(|account| covering(&namespaces, account).is_none())
        .collect();
    made.extend(namespaces);
    made
}

/// The agent's quarantine record, as folding changes it (the fields of `Agent` of these
/// names).
pub(super) struct Record<'a> {
    pub quarantined: &'a mut BTreeMap<u32, String>,
    pub waiting: &'a mut BTreeSet<String>,
    pub step_ups: &'a mut BTreeMap<u32, (SystemTime, String)>,
    pub pending_step_ups: &'a mut BTreeMap<String, SystemTime>,
    pub held_cgroups: &'a mut BTreeMap<u64, String>,
    pub folds: &'a mut BTreeSet<String>,
    /// The label sets of the policy quarantined only because a fold covers them: a fold's
    /// release releases those, not the ones quarantined on their own account (a deny, an
    /// operator, processes that moved there: red-team review 77 M1).
    pub by_fold: &'a mut BTreeSet<String>,
    /// The label sets out of the policy that were quarantined on their own account when a
    /// fold took them (at most [`MAX_ABSORBED_PER_NAMESPACE`] per namespace): back in the
    /// policy they are quarantined on their own account again, and a fold's release leaves
    /// them waiting by name; their cgroups stay held under their names (review 78 M1, M2:
    /// taken for the fold's, a release freed them and let their processes go).
    pub absorbed: &'a mut BTreeSet<String>,
}

/// What [`Record::fold`] did.
#[derive(Debug, Default)]
pub(super) struct Folded {
    /// The folds made, each with the number of quarantines it took the place of.
    pub made: Vec<(String, usize)>,
    /// The step-ups that ended in a fold (it holds until released): their records go.
    pub forget: Vec<String>,
    /// The identities of the policy a fold quarantined (they were not).
    pub quarantined: Vec<(u32, String)>,
    /// Those it quarantined on their own account again (absorbed, back in the policy).
    pub returned: Vec<(u32, String)>,
    /// Quarantines of their own a fold took past [`MAX_ABSORBED_PER_NAMESPACE`]: the fold's only.
    pub unabsorbed: usize,
    /// Whether the record changed.
    pub changed: bool,
}

impl Record<'_> {
    /// Bounds the quarantines out of the policy (`in_policy` says whether a name is in it):
    /// folds those past a bound ([`new_folds`]), drops every quarantine out of the policy a
    /// fold covers (the fold holds it when it is back; cgroups held under its name are held
    /// under the fold's, and a step-up ends in the fold), and quarantines each identity of
    /// the policy (`identities`: number and name) a fold covers, a step-up's included, until
    /// released.
    pub(super) fn fold<'n>(
        &mut self,
        in_policy: impl Fn(&str) -> bool,
        identities: impl Iterator<Item = (u32, &'n str)>,
    ) -> Folded {
        let mut folded = Folded::default();
        let absent: BTreeSet<String> = self
            .quarantined
            .values()
            .chain(self.waiting.iter())
            .filter(|name| !in_policy(name))
            .cloned()
            .collect();
        let unfolded = absent
            .iter()
            .map(String::as_str)
            .filter(|name| covering(self.folds, name).is_none());
        let made = new_folds(unfolded, self.folds);
        if !made.is_empty() {
            for fold in &made {
                let taking = absent.iter().filter(|name| covers(fold, name)).count();
                folded.made.push((fold.clone(), taking));
            }
            self.folds.extend(made);
            let all = self.folds.clone();
            // A namespace's fold takes its account folds' place, and their holds.
            for (replaced, by) in all
                .iter()
                .filter_map(|fold| Some((fold, covering(&all, fold)?)))
            {
                self.folds.remove(replaced);
                for held in self.held_cgroups.values_mut().filter(|h| *h == replaced) {
                    *held = by.to_string();
                }
            }
            folded.changed = true;
        }
        // Nothing is a fold's that no fold covers (a state file's fold left out): those of
        // their own wait by name (review 79 L2).
        let stray: Vec<String> = self
            .absorbed
            .iter()
            .filter(|name| covering(self.folds, name).is_none())
            .cloned()
            .collect();
        for name in stray {
            self.absorbed.remove(&name);
            self.waiting.insert(name);
            folded.changed = true;
        }
        if self.folds.is_empty() {
            self.by_fold.clear();
            return folded;
        }
        let stepped: BTreeSet<String> = self
            .step_ups
            .values()
            .map(|(_, name)| name.clone())
            .chain(self.pending_step_ups.keys().cloned())
            .collect();
        for name in &absent {
            let Some(fold) = covering(self.folds, name) else {
                continue;
            };
            folded.changed = true;
            // A step-up is not a quarantine of its own: it goes with the fold (review 79 L1).
            let own = !self.by_fold.contains(name) && !stepped.contains(name);
            let absorbed = own && absorb(self.absorbed, name);
            if own && !absorbed {
                folded.unabsorbed += 1;
            }
            self.waiting.remove(name);
            if self.pending_step_ups.remove(name).is_some() {
                folded.forget.push(name.clone());
            }
            let ids: Vec<u32> = self
                .quarantined
                .iter()
                .filter(|(_, kept)| *kept == name)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.quarantined.remove(&id);
                if let Some((_, recorded)) = self.step_ups.remove(&id) {
                    folded.forget.push(recorded);
                }
            }
            self.by_fold.remove(name);
            if !absorbed {
                for held in self.held_cgroups.values_mut().filter(|held| *held == name) {
                    *held = fold.to_string();
                }
            }
        }
        for (id, name) in identities {
            if covering(self.folds, name).is_none() {
                continue;
            }
            match self.quarantined.entry(id) {
                Entry::Vacant(entry) => {
                    entry.insert(name.to_string());
                    if self.absorbed.remove(name) {
                        folded.returned.push((id, name.to_string()));
                    } else {
                        self.by_fold.insert(name.to_string());
                        folded.quarantined.push((id, name.to_string()));
                    }
                    folded.changed = true;
                }
                Entry::Occupied(_) => {
                    // A step-up in the fold holds as the fold does, and goes with its release
                    // (review 78 L3).
                    if let Some((_, recorded)) = self.step_ups.remove(&id) {
                        self.by_fold.insert(name.to_string());
                        folded.forget.push(recorded);
                        folded.changed = true;
                    }
                }
            }
        }
        // A label set the fold quarantined that is quarantined no more (released with its
        // fold, or gone from the record) is not the fold's any longer.
        let kept: BTreeSet<&String> = self.quarantined.values().collect();
        self.by_fold.retain(|name| kept.contains(name));
        folded
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, SystemTime};

    use super::{
        account_of, covering, is_fold, new_folds, Record, MAX_ABSENT_PER_ACCOUNT,
        MAX_ABSENT_PER_NAMESPACE, MAX_ABSORBED_PER_NAMESPACE,
    };

    /// The name of label set `n` of service account `sa` in namespace `ns`.
    fn label_set(ns: &str, sa: &str, n: usize) -> String {
        format!("{ns}/{sa}#{n:08x}")
    }

    #[test]
    fn only_a_label_set_s_name_has_an_account() {
        assert_eq!(account_of("acme/rag#0123abcd"), Some(("acme/rag", "acme")));
        assert_eq!(
            account_of(&format!("acme/rag#{}", "f".repeat(64))),
            Some(("acme/rag", "acme"))
        );
        for other in [
            "retriever",
            "acme/rag",
            "acme/rag#*",
            "acme/*",
            "acme/rag#0123abc",
            "acme/rag#0123abcg",
            "/rag#0123abcd",
            "acme/#0123abcd",
            "identity 7",
        ] {
            assert_eq!(account_of(other), None, "{other}");
        }
    }

    #[test]
    fn a_fold_covers_its_account_or_namespace_only() {
        let folds: BTreeSet<String> = ["acme/rag#*".to_string(), "globex/*".to_string()].into();
        assert_eq!(covering(&folds, "acme/rag#0123abcd"), Some("acme/rag#*"));
        assert_eq!(covering(&folds, "acme/ragged#0123abcd"), None);
        assert_eq!(covering(&folds, "acme/chat#0123abcd"), None);
        assert_eq!(covering(&folds, "globex/chat#0123abcd"), Some("globex/*"));
        assert_eq!(covering(&folds, "globex/chat#*"), Some("globex/*"));
        assert_eq!(
            covering(&folds, "globex/*"),
            None,
            "a fold does not cover itself"
        );
        assert_eq!(covering(&folds, "globexx/chat#0123abcd"), None);
        // Only label sets' names (review 77 L1): a Service's identity, an inventory's name.
        let service: BTreeSet<String> = ["service/*".to_string()].into();
        assert_eq!(covering(&service, "service/acme/api"), None);
        assert_eq!(covering(&folds, "globex/tools"), None);
        assert_eq!(covering(&folds, "acme/rag#0123abcd/x"), None);
        for fold in ["acme/*", "acme/rag#*"] {
            assert!(is_fold(fold), "{fold}");
        }
        for other in [
            "*",
            "/*",
            "acme/#*",
            "/rag#*",
            "a/b/*",
            "a#b/*",
            "acme/rag#0123abcd",
            "acme",
        ] {
            assert!(!is_fold(other), "{other}");
        }
    }

    #[test]
    fn an_account_past_its_bound_is_folded() {
        let folds = BTreeSet::new();
        let under: Vec<String> = (0..MAX_ABSENT_PER_ACCOUNT)
            .map(|n| label_set("acme", "rag", n))
            .collect();
        assert!(new_folds(under.iter().map(String::as_str), &folds).is_empty());
        let mut over = under.clone();
        over.push(label_set("acme", "rag", MAX_ABSENT_PER_ACCOUNT));
        over.push(label_set("acme", "chat", 0));
        over.push("an-inventory-workload".to_string());
        assert_eq!(
            new_folds(over.iter().map(String::as_str), &folds),
            BTreeSet::from(["acme/rag#*".to_string()])
        );
    }

    /// A tenant that spreads its quarantines over service accounts, each under the account's
    /// bound, has its namespace folded; the account folds in force count towards it.
    #[test]
    fn a_namespace_past_its_bound_is_folded() {
        let folds: BTreeSet<String> = ["acme/old#*".to_string(), "globex/old#*".to_string()].into();
        let absent: Vec<String> = (0..MAX_ABSENT_PER_NAMESPACE)
            .map(|n| label_set("acme", &format!("sa-{}", n % 16), n))
            .chain((0..10).map(|n| label_set("globex", "rag", n)))
            .collect();
        assert_eq!(
            new_folds(absent.iter().map(String::as_str), &folds),
            BTreeSet::from(["acme/*".to_string()]),
            "256 names and one account fold in acme"
        );
        let fewer = &absent[1..];
        assert!(new_folds(fewer.iter().map(String::as_str), &folds).is_empty());
    }

    /// The agent's quarantine record, owned.
    #[derive(Default)]
    struct Kept {
        quarantined: BTreeMap<u32, String>,
        waiting: BTreeSet<String>,
        step_ups: BTreeMap<u32, (SystemTime, String)>,
        pending_step_ups: BTreeMap<String, SystemTime>,
        held_cgroups: BTreeMap<u64, String>,
        folds: BTreeSet<String>,
        by_fold: BTreeSet<String>,
        absorbed: BTreeSet<String>,
    }

    impl Kept {
        fn record(&mut self) -> Record<'_> {
            Record {
                quarantined: &mut self.quarantined,
                waiting: &mut self.waiting,
                step_ups: &mut self.step_ups,
                pending_step_ups: &mut self.pending_step_ups,
                held_cgroups: &mut self.held_cgroups,
                folds: &mut self.folds,
                by_fold: &mut self.by_fold,
                absorbed: &mut self.absorbed,
            }
        }

        /// Folds as before a write of a policy whose identities are `policy`.
        fn fold(&mut self, policy: &BTreeMap<u32, String>) -> super::Folded {
            let names: BTreeSet<&str> = policy.values().map(String::as_str).collect();
            self.record().fold(
                |name| names.contains(name),
                policy.iter().map(|(id, name)| (*id, name.as_str())),
            )
        }

        fn size(&self) -> usize {
            self.quarantined.len() + self.waiting.len() + self.folds.len()
        }
    }

    /// Review 75 M2: a quarantined pod relabelled through distinct label sets, each time the
    /// quarantine following its cgroup to the new label set (as `follow_moved_cgroups` does)
    /// and the old one leaving the policy. The record stays bounded, the pod's label set is
    /// quarantined at every step, and the first label set, back in the policy, is quarantined
    /// again. Before, the record grew by one per relabel.
    #[test]
    fn relabelling_a_quarantined_pod_does_not_grow_the_record() {
        let mut kept = Kept::default();
        let first = label_set("acme", "rag", 0);
        kept.quarantined.insert(100, first.clone());
        kept.held_cgroups.insert(7, first.clone());
        let other = label_set("acme", "chat", 0);
        let mut policy = BTreeMap::from([(100, first.clone()), (900, other.clone())]);
        assert!(!kept.fold(&policy).changed);
        let mut largest = 0;
        for n in 1..=1000 {
            let now = label_set("acme", "rag", n);
            let id = 100 + n as u32;
            policy = BTreeMap::from([(id, now.clone()), (900, other.clone())]);
            kept.fold(&policy);
            // The write follows the held cgroup to the pod's label set now.
            let held = kept.held_cgroups[&7].clone();
            assert!(
                held == label_set("acme", "rag", n - 1) || held == "acme/rag#*",
                "{held}"
            );
            // As `follow_moved_cgroups` does: the label set the held processes run in is
            // quarantined on their own account, not only the fold's.
            kept.quarantined.entry(id).or_insert_with(|| now.clone());
            kept.by_fold.remove(&now);
            kept.held_cgroups.insert(7, now.clone());
            assert!(kept.quarantined.contains_key(&id), "relabel {n}");
            largest = largest.max(kept.size());
        }
        assert!(
            largest <= MAX_ABSORBED_PER_NAMESPACE + MAX_ABSENT_PER_ACCOUNT + 3,
            "{largest} quarantines kept after 1000 relabels"
        );
        assert_eq!(kept.absorbed.len(), MAX_ABSORBED_PER_NAMESPACE);
        assert_eq!(kept.folds, BTreeSet::from(["acme/rag#*".to_string()]));
        assert!(
            !kept.quarantined.contains_key(&900),
            "another account is untouched"
        );
        policy.insert(100, first.clone());
        let folded = kept.fold(&policy);
        assert_eq!(
            kept.quarantined.get(&100),
            Some(&first),
            "the first label set is back"
        );
        // It was quarantined on its own account: so again, not the fold's (review 78 M1).
        assert_eq!(folded.returned, vec![(100, first.clone())]);
        assert!(!kept.by_fold.contains(&first) && !kept.absorbed.contains(&first));
    }

    /// Step-ups folded end in the fold: the quarantine holds until released, and their
    /// records are forgotten; a fold made says how many quarantines it takes the place of.
    #[test]
    fn a_step_up_folded_holds_until_released() {
        let mut kept = Kept::default();
        let until = SystemTime::now() + Duration::from_secs(3600);
        for n in 0..=MAX_ABSENT_PER_ACCOUNT {
            let name = label_set("acme", "rag", n);
            kept.quarantined.insert(n as u32 + 100, name.clone());
            kept.step_ups.insert(n as u32 + 100, (until, name));
        }
        let waiting = label_set("acme", "rag", 999);
        kept.waiting.insert(waiting.clone());
        kept.pending_step_ups.insert(waiting.clone(), until);
        let present = label_set("acme", "rag", 1000);
        kept.quarantined.insert(5000, present.clone());
        kept.step_ups.insert(5000, (until, present.clone()));
        let policy = BTreeMap::from([
            (5000, present.clone()),
            (6000, label_set("acme", "rag", 1001)),
        ]);
        let folded = kept.fold(&policy);
        assert_eq!(
            folded.made,
            vec![("acme/rag#*".to_string(), MAX_ABSENT_PER_ACCOUNT + 2)]
        );
        assert_eq!(
            folded.forget.len(),
            MAX_ABSENT_PER_ACCOUNT + 3,
            "{:?}",
            folded.forget
        );
        assert!(kept.step_ups.is_empty() && kept.pending_step_ups.is_empty());
        assert!(kept.waiting.is_empty());
        assert_eq!(
            kept.quarantined.keys().copied().collect::<Vec<_>>(),
            vec![5000, 6000]
        );
        // The one the fold quarantined, and the step-up it made lasting, are the fold's to
        // release (review 77 M1, 78 L3).
        assert_eq!(
            kept.by_fold,
            BTreeSet::from([present.clone(), label_set("acme", "rag", 1001)])
        );
        // Step-ups are not quarantines of their own: none is kept by name (review 79 L1).
        assert!(kept.absorbed.is_empty());
    }

    /// A namespace's fold takes the place of its account folds, and of their holds (review
    /// 77 I1: a cgroup held under a replaced fold's name was let go).
    #[test]
    fn a_namespace_fold_takes_its_account_folds_holds() {
        let mut kept = Kept::default();
        kept.folds.insert("acme/old#*".to_string());
        kept.held_cgroups.insert(7, "acme/old#*".to_string());
        for n in 0..MAX_ABSENT_PER_NAMESPACE {
            kept.waiting
                .insert(label_set("acme", &format!("sa-{}", n % 16), n));
        }
        let folded = kept.fold(&BTreeMap::new());
        assert_eq!(folded.made[0].0, "acme/*");
        assert_eq!(kept.folds, BTreeSet::from(["acme/*".to_string()]));
        assert_eq!(kept.held_cgroups[&7], "acme/*");
        assert!(kept.waiting.is_empty());
    }
}

//! Usual neighbourhoods (`enforcer run --learn 24h`): during a learning window the agent
//! records, per subject workload, the datasets its tracked flows reach; after it, the first
//! contact of a subject with a dataset outside its neighbourhood is an anomaly
//! (`flow.anomaly`), reported once per (subject, dataset).
//!
//! Subjects are keyed by workload name, not by identity number: the name is what defines the
//! identity on every node and across policy edits. A destination's datasets are its
//! `dataset_scope`; a tracked destination that declares none counts as the dataset
//! `endpoint:<name>`.
//!
//! The state is one JSON file in the state directory ([`FILE`]), written whole to a temporary
//! file and renamed over the old one after every change, so a crash leaves the old or the new
//! state, never half of one. The window starts at the first run and is kept in the file: a
//! restart neither restarts nor forgets it. Bounded: [`MAX_SUBJECTS`] subjects and
//! [`MAX_DATASETS`] datasets each (learned and reported together); what a bound refuses is
//! reported once and not recorded, so a workload that sprays connections cannot grow the
//! agent's memory or the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// ATLAS techniques of a `flow.anomaly`: reaching a data store outside one's usual ones is
/// collection from information repositories (AML.T0036); from a vector database, from RAG
/// databases (AML.T0085.000).
pub fn atlas(vector_db: bool) -> Vec<enforcer_policy::AtlasTechnique> {
    let ids: &[&str] = if vector_db {
        &["AML.T0036", "AML.T0085.000"]
    } else {
        &["AML.T0036"]
    };
    ids.iter()
        .filter_map(|id| enforcer_policy::atlas::lookup(id))
        .collect()
}

/// The file in the state directory.
pub const FILE: &str = "neighbourhoods.json";
/// Subjects recorded at most.
pub const MAX_SUBJECTS: usize = 4096;
/// Datasets per subject at most (its neighbourhood and the anomalies reported for it).
pub const MAX_DATASETS: usize = 256;
/// Format of [`FILE`].
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// When learning started (RFC 3339): the first run with `--learn`.
    started: String,
    subjects: BTreeMap<String, Neighbourhood>,
    /// Step-up quarantines in force: workload -> when they lift (RFC 3339), so that a
    /// restarted agent still lifts them.
    #[serde(default)]
    step_ups: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Neighbourhood {
    /// Datasets reached during the learning window.
    pub learned: BTreeSet<String>,
    /// Datasets outside it already reported as an anomaly (never reported again).
    #[serde(default)]
    pub reported: BTreeSet<String>,
}

/// What one contact was.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Within the window: `added` datasets joined the neighbourhood.
    Learning { added: usize },
    /// After the window, every dataset already known or reported.
    Known,
    /// After the window: datasets outside the neighbourhood, first contact.
    Anomaly { new: Vec<String> },
    /// A bound refused to record what this contact would add (reported once: `first`).
    Capped { what: String, first: bool },
}

/// The learned neighbourhoods and the window.
#[derive(Debug)]
pub struct Learner {
    file: PathBuf,
    window: Duration,
    started: SystemTime,
    stored: Stored,
    /// Bounds already reported (per subject, or `*` for the subject bound).
    capped: BTreeSet<String>,
}

impl Learner {
    /// Opens (or starts) the state in `state_dir`. Errors: the file exists but cannot be read
    /// or parsed (the agent refuses to start rather than forget what it learned), or a new
    /// one cannot be written.
    pub fn open(state_dir: &Path, window: Duration, now: SystemTime) -> Result<Learner> {
        let file = state_dir.join(FILE);
        let stored = match std::fs::read(&file) {
            Ok(bytes) => {
                let stored: Stored = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is not a neighbourhood file; move it away to learn afresh",
                        file.display()
                    )
                })?;
                if stored.version != VERSION {
                    anyhow::bail!(
                        "{} has format version {}, this agent reads {VERSION}",
                        file.display(),
                        stored.version
                    );
                }
                stored
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Stored {
                version: VERSION,
                started: humantime::format_rfc3339_nanos(now).to_string(),
                ..Stored::default()
            },
            Err(error) => return Err(error).with_context(|| format!("reading {}", file.display())),
        };
        let started = humantime::parse_rfc3339(&stored.started)
            .with_context(|| format!("{}: bad `started` {:?}", file.display(), stored.started))?;
        let learner = Learner {
            file,
            window,
            started,
            stored,
            capped: BTreeSet::new(),
        };
        learner.save()?;
        Ok(learner)
    }

    /// When the window ends.
    pub fn learning_until(&self) -> SystemTime {
        self.started + self.window
    }

    pub fn learning(&self, now: SystemTime) -> bool {
        now < self.learning_until()
    }

    pub fn neighbourhood(&self, subject: &str) -> Option<&Neighbourhood> {
        self.stored.subjects.get(subject)
    }

    /// Records that `subject` reached `datasets` at `now` (saved before it returns when
    /// anything changed). Errors: the file could not be written (what was learned stays in
    /// memory and is written with the next change).
    pub fn observe(
        &mut self,
        subject: &str,
        datasets: &[String],
        now: SystemTime,
    ) -> Result<Outcome> {
        let learning = self.learning(now);
        if !self.stored.subjects.contains_key(subject) {
            if self.stored.subjects.len() >= MAX_SUBJECTS {
                let first = self.capped.insert("*".to_string());
                // After the window a bound fails closed: what cannot be remembered is
                // reported every time, never let through unseen (a tenant can fill a bound
                // on purpose).
                return Ok(if learning || datasets.is_empty() {
                    Outcome::Capped {
                        what: format!("{MAX_SUBJECTS} subjects"),
                        first,
                    }
                } else {
                    Outcome::Anomaly {
                        new: datasets.to_vec(),
                    }
                });
            }
            if datasets.is_empty() {
                return Ok(if learning {
                    Outcome::Learning { added: 0 }
                } else {
                    Outcome::Known
                });
            }
            self.stored
                .subjects
                .insert(subject.to_string(), Neighbourhood::default());
        }
        let entry = self
            .stored
            .subjects
            .get_mut(subject)
            .expect("inserted above");
        let new: Vec<String> = datasets
            .iter()
            .filter(|d| !entry.learned.contains(*d) && !entry.reported.contains(*d))
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(if learning {
                Outcome::Learning { added: 0 }
            } else {
                Outcome::Known
            });
        }
        if entry.learned.len() + entry.reported.len() + new.len() > MAX_DATASETS {
            let first = self.capped.insert(subject.to_string());
            // As above: fail closed after the window.
            return Ok(if learning {
                Outcome::Capped {
                    what: format!("{MAX_DATASETS} datasets of {subject}"),
                    first,
                }
            } else {
                Outcome::Anomaly { new }
            });
        }
        let outcome = if learning {
            entry.learned.extend(new.iter().cloned());
            Outcome::Learning { added: new.len() }
        } else {
            entry.reported.extend(new.iter().cloned());
            Outcome::Anomaly { new }
        };
        self.save()?;
        Ok(outcome)
    }

    /// Step-up quarantines in force and when they lift.
    pub fn step_ups(&self) -> impl Iterator<Item = (&str, SystemTime)> {
        self.stored.step_ups.iter().filter_map(|(workload, until)| {
            Some((workload.as_str(), humantime::parse_rfc3339(until).ok()?))
        })
    }

    /// Records (`Some`) or forgets (`None`) when `workload`'s step-up quarantine lifts.
    pub fn set_step_up(&mut self, workload: &str, until: Option<SystemTime>) -> Result<()> {
        match until {
            Some(at) => {
                self.stored.step_ups.insert(
                    workload.to_string(),
                    humantime::format_rfc3339_nanos(at).to_string(),
                );
            }
            None => {
                if self.stored.step_ups.remove(workload).is_none() {
                    return Ok(());
                }
            }
        }
        self.save()
    }

    /// Write, then rename: the file is the old state or the new one.
    fn save(&self) -> Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.stored)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.file.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn learns_in_the_window_then_reports_each_new_dataset_once_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let window = Duration::from_secs(60);
        let mut l = Learner::open(dir.path(), window, t0).unwrap();
        assert_eq!(
            l.observe("a", &d(&["kb1"]), t0).unwrap(),
            Outcome::Learning { added: 1 }
        );
        let after = t0 + Duration::from_secs(61);
        assert_eq!(l.observe("a", &d(&["kb1"]), after).unwrap(), Outcome::Known);
        assert_eq!(
            l.observe("a", &d(&["kb1", "kb2"]), after).unwrap(),
            Outcome::Anomaly { new: d(&["kb2"]) }
        );
        assert_eq!(l.observe("a", &d(&["kb2"]), after).unwrap(), Outcome::Known);
        // A subject never seen while learning has an empty neighbourhood.
        assert_eq!(
            l.observe("b", &d(&["kb1"]), after).unwrap(),
            Outcome::Anomaly { new: d(&["kb1"]) }
        );
        // Reopened later with another window length: same start, same sets.
        let l = Learner::open(dir.path(), Duration::from_secs(3600), after).unwrap();
        assert_eq!(l.learning_until(), t0 + Duration::from_secs(3600));
        assert_eq!(
            l.neighbourhood("a").unwrap().learned,
            BTreeSet::from(["kb1".to_string()])
        );
        assert_eq!(
            l.neighbourhood("a").unwrap().reported,
            BTreeSet::from(["kb2".to_string()])
        );
    }

    #[test]
    fn bounds_refuse_and_report_once() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        for i in 0..MAX_DATASETS {
            l.observe("a", &[format!("kb{i}")], t0).unwrap();
        }
        let capped = l.observe("a", &d(&["one-more"]), t0).unwrap();
        assert!(
            matches!(capped, Outcome::Capped { first: true, .. }),
            "{capped:?}"
        );
        let again = l.observe("a", &d(&["and-another"]), t0).unwrap();
        assert!(
            matches!(again, Outcome::Capped { first: false, .. }),
            "{again:?}"
        );
        assert_eq!(l.neighbourhood("a").unwrap().learned.len(), MAX_DATASETS);
        // After the window a full neighbourhood fails closed: a dataset it cannot remember is
        // an anomaly every time (a tenant filling the bound on purpose hides nothing).
        let after = t0 + Duration::from_secs(61);
        for _ in 0..2 {
            assert_eq!(
                l.observe("a", &d(&["past-the-bound"]), after).unwrap(),
                Outcome::Anomaly {
                    new: d(&["past-the-bound"])
                }
            );
        }
        assert_eq!(
            l.observe("a", &d(&["kb0"]), after).unwrap(),
            Outcome::Known,
            "what was learned stays known"
        );
    }

    #[test]
    fn a_broken_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let err = Learner::open(dir.path(), Duration::from_secs(1), SystemTime::now()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a neighbourhood file"),
            "{err:#}"
        );
    }

    #[test]
    fn step_ups_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap();
        l.set_step_up("a", Some(t0 + Duration::from_secs(5)))
            .unwrap();
        let l2 = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap();
        assert_eq!(
            l2.step_ups().collect::<Vec<_>>(),
            vec![("a", t0 + Duration::from_secs(5))]
        );
        l.set_step_up("a", None).unwrap();
        let l3 = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap();
        assert_eq!(l3.step_ups().count(), 0);
    }
}

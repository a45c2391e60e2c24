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
//! file, synced and renamed over the old one (then the directory synced), so a crash leaves
//! the old or the new state, never half of one. Writes happen on a thread of their own
//! ([`Writer`]), at most once per [`PERSIST_INTERVAL`] (a burst of changes is one write of
//! its last state, copied by the writer when it writes, never per change), so the agent's
//! loop never waits on the disk; a write that fails is logged and retried with the next
//! change. The window starts at the first run and is kept in the file: a
//! restart neither restarts nor forgets it. Bounded: [`MAX_SUBJECTS`] subjects, of which
//! each tenant may hold an equal share ([`Learner::set_tenants`]), [`MAX_DATASETS`]
//! datasets each (learned and reported together), and [`MAX_BYTES`] of names in all, shared
//! by tenants likewise (names are long: a subject or an `endpoint:` dataset names a service
//! account, up to 253 bytes: red-team review 73 M1); what a bound refuses is reported once
//! and not recorded, so a workload that sprays connections cannot grow the agent's memory or
//! the file, and a tenant that rotates label sets fills its own share, not the others'.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
/// A tenant's share of [`MAX_SUBJECTS`] never goes below this, however many tenants.
pub const MIN_TENANT_SUBJECTS: usize = 16;
/// Datasets per subject at most (its neighbourhood and the anomalies reported for it).
pub const MAX_DATASETS: usize = 256;
/// Bytes of names recorded at most: each subject's name and tenant and each dataset's name,
/// plus [`ENTRY_BYTES`] per subject and dataset (about what one takes in the file beyond its
/// name), so that the file stays near this size and the state in memory within a few times
/// it. Shared by tenants as [`MAX_SUBJECTS`] is.
pub const MAX_BYTES: usize = 16 << 20;
/// A tenant's share of [`MAX_BYTES`] never goes below this: [`MIN_TENANT_SUBJECTS`]'s part.
pub const MIN_TENANT_BYTES: usize = MAX_BYTES / (MAX_SUBJECTS / MIN_TENANT_SUBJECTS);
/// What one recorded name costs beyond its bytes (see [`MAX_BYTES`]).
const ENTRY_BYTES: usize = 8;
/// A file larger than this is refused at start (read whole, it would need its size again in
/// memory): well above what [`MAX_BYTES`] lets the agent write.
const MAX_FILE_BYTES: u64 = 4 * MAX_BYTES as u64;
/// Format of [`FILE`].
const VERSION: u32 = 1;
/// At most one write of [`FILE`] per interval: the cluster state file's.
pub use crate::sources::kubernetes::PERSIST_INTERVAL;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
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
    /// The subject's tenant (whose share of [`MAX_SUBJECTS`] it takes); `None` in files of
    /// earlier agents and for a subject without one.
    #[serde(default)]
    pub tenant: Option<String>,
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
    writer: Writer,
    window: Duration,
    started: SystemTime,
    /// Shared with the writer thread, which copies it when it writes (at most once per
    /// [`PERSIST_INTERVAL`]); locked by each alone, never both.
    stored: Arc<Mutex<Stored>>,
    /// Bounds already reported (per subject, `*` for the subject bound, `*tenant` for a
    /// tenant's share).
    capped: BTreeSet<String>,
    /// Tenants with workloads on this node ([`Learner::set_tenants`]).
    tenants: usize,
    /// Subjects recorded per tenant (`""` for none).
    per_tenant: BTreeMap<String, usize>,
    /// Bytes recorded per tenant (`""` for none), and in all (see [`MAX_BYTES`]).
    bytes_per_tenant: BTreeMap<String, usize>,
    bytes: usize,
}

/// What recording `name` costs against [`MAX_BYTES`].
fn cost(name: &str) -> usize {
    name.len() + ENTRY_BYTES
}

/// What a subject and its neighbourhood cost against [`MAX_BYTES`].
fn subject_cost(subject: &str, n: &Neighbourhood) -> usize {
    cost(subject)
        + n.tenant.as_deref().map_or(0, str::len)
        + n.learned
            .iter()
            .chain(&n.reported)
            .map(|d| cost(d))
            .sum::<usize>()
}

impl Learner {
    /// Opens (or starts) the state in `state_dir`. Errors: the file exists but cannot be read
    /// or parsed (the agent refuses to start rather than forget what it learned), or it
    /// cannot be written (checked here, synchronously, once; later writes are the writer
    /// thread's).
    pub fn open(state_dir: &Path, window: Duration, now: SystemTime) -> Result<Learner> {
        let file = state_dir.join(FILE);
        if let Ok(meta) = std::fs::metadata(&file) {
            if meta.len() > MAX_FILE_BYTES {
                anyhow::bail!(
                    "{} holds {} bytes, more than this agent writes ({MAX_FILE_BYTES}); move \
                     it away to learn afresh",
                    file.display(),
                    meta.len()
                );
            }
        }
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
        // A step-up whose end cannot be read would never be lifted (red-team review 39):
        // refused like a bad `started`.
        for (workload, until) in &stored.step_ups {
            humantime::parse_rfc3339(until).with_context(|| {
                format!(
                    "{}: bad `step_ups` time {until:?} of {workload:?}",
                    file.display()
                )
            })?;
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::sources::kubernetes::write_atomically(&file, &stored)?;
        let mut per_tenant = BTreeMap::new();
        let mut bytes_per_tenant = BTreeMap::new();
        let mut bytes = 0;
        for (subject, n) in &stored.subjects {
            let tenant = n.tenant.clone().unwrap_or_default();
            let cost = subject_cost(subject, n);
            *bytes_per_tenant.entry(tenant.clone()).or_insert(0) += cost;
            bytes += cost;
            *per_tenant.entry(tenant).or_insert(0) += 1;
        }
        let stored = Arc::new(Mutex::new(stored));
        Ok(Learner {
            writer: Writer::start(file.clone(), stored.clone()),
            file,
            window,
            started,
            stored,
            capped: BTreeSet::new(),
            tenants: 0,
            per_tenant,
            bytes_per_tenant,
            bytes,
        })
    }

    /// The number of tenants with workloads on this node: each, and the subjects without a
    /// tenant together, may hold `MAX_SUBJECTS / (tenants + 1)` subjects (at least
    /// [`MIN_TENANT_SUBJECTS`]), so that no tenant can take another's room. Subjects already
    /// recorded are kept when a share shrinks; the tenant then records no more until it is
    /// under its share.
    pub fn set_tenants(&mut self, tenants: usize) {
        self.tenants = tenants;
    }

    fn tenant_share(&self) -> usize {
        (MAX_SUBJECTS / (self.tenants + 1)).max(MIN_TENANT_SUBJECTS)
    }

    /// The bytes bound that recording `more` bytes for `tenant` would pass, if any: the
    /// tenant's share (as [`Learner::tenant_share`]) or [`MAX_BYTES`].
    fn bytes_bound(&self, tenant: &str, more: usize) -> Option<(String, String)> {
        let share = (MAX_BYTES / (self.tenants + 1)).max(MIN_TENANT_BYTES);
        let held = self.bytes_per_tenant.get(tenant).copied().unwrap_or(0);
        if self.bytes + more > MAX_BYTES {
            Some(("*bytes".to_string(), format!("{MAX_BYTES} bytes of names")))
        } else if held + more > share {
            Some((
                format!("*bytes:{tenant}"),
                format!("{share} bytes of names of tenant {tenant:?} (its share)"),
            ))
        } else {
            None
        }
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the window ends.
    pub fn learning_until(&self) -> SystemTime {
        self.started + self.window
    }

    pub fn learning(&self, now: SystemTime) -> bool {
        now < self.learning_until()
    }

    /// A copy of `subject`'s neighbourhood.
    pub fn neighbourhood(&self, subject: &str) -> Option<Neighbourhood> {
        self.stored().subjects.get(subject).cloned()
    }

    /// The first names of `subject`'s learned neighbourhood a `flow.anomaly` lists, and the
    /// count of all when there are more (see [`crate::events::flow::shown_names`]): copies
    /// no more than it shows.
    pub fn learned_shown(&self, subject: &str) -> (Vec<String>, Option<usize>) {
        let stored = self.stored();
        let learned = stored.subjects.get(subject).map(|n| &n.learned);
        crate::events::flow::shown_names(
            learned.into_iter().flatten().cloned(),
            learned.map_or(0, BTreeSet::len),
        )
    }

    /// Records that `subject` reached `datasets` at `now`; a change is handed to the writer
    /// thread (on disk within [`PERSIST_INTERVAL`], or at [`Learner::flush`]). Errors: none
    /// today (a failed write is the writer's to log and retry); kept for the callers' sake.
    pub fn observe(
        &mut self,
        subject: &str,
        tenant: Option<&str>,
        datasets: &[String],
        now: SystemTime,
    ) -> Result<Outcome> {
        let learning = self.learning(now);
        let tenant_key = tenant.unwrap_or_default();
        let known = self.stored().subjects.contains_key(subject);
        if !known {
            let more =
                cost(subject) + tenant_key.len() + datasets.iter().map(|d| cost(d)).sum::<usize>();
            let bound = if self.stored().subjects.len() >= MAX_SUBJECTS {
                Some(("*".to_string(), format!("{MAX_SUBJECTS} subjects")))
            } else if self.per_tenant.get(tenant_key).copied().unwrap_or(0) >= self.tenant_share() {
                Some((
                    format!("*tenant:{tenant_key}"),
                    format!(
                        "{} subjects of tenant {tenant_key:?} (its share)",
                        self.tenant_share()
                    ),
                ))
            } else if datasets.is_empty() {
                None
            } else {
                self.bytes_bound(tenant_key, more)
            };
            if let Some((key, what)) = bound {
                let first = self.capped.insert(key);
                // After the window a bound fails closed: what cannot be remembered is
                // reported every time, never let through unseen (a tenant can fill a bound
                // on purpose; with shares, only its own).
                return Ok(if learning || datasets.is_empty() {
                    Outcome::Capped { what, first }
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
            self.stored().subjects.insert(
                subject.to_string(),
                Neighbourhood {
                    tenant: tenant.map(str::to_string),
                    ..Neighbourhood::default()
                },
            );
            *self.per_tenant.entry(tenant_key.to_string()).or_insert(0) += 1;
            self.charge(tenant_key, cost(subject) + tenant_key.len());
        } else if let Some(t) = tenant {
            // A subject from an earlier agent's file has no tenant: it is counted under its
            // tenant from its first contact on.
            let moved = {
                let mut stored = self.stored();
                match stored.subjects.get_mut(subject) {
                    Some(n) if n.tenant.is_none() => {
                        let before = subject_cost(subject, n);
                        n.tenant = Some(t.to_string());
                        Some(before)
                    }
                    _ => None,
                }
            };
            if let Some(before) = moved {
                if let Some(c) = self.per_tenant.get_mut("") {
                    *c = c.saturating_sub(1);
                }
                *self.per_tenant.entry(t.to_string()).or_insert(0) += 1;
                if let Some(b) = self.bytes_per_tenant.get_mut("") {
                    *b = b.saturating_sub(before);
                }
                self.bytes = self.bytes.saturating_sub(before);
                self.charge(t, before + t.len());
            }
        }
        let (owner, new): (String, Vec<String>) = {
            let stored = self.stored();
            let entry = stored.subjects.get(subject).expect("inserted above");
            // The subject's bytes are its tenant's (as recorded: the one it was first seen with).
            let owner = entry.tenant.clone().unwrap_or_default();
            let new: Vec<String> = datasets
                .iter()
                .filter(|d| !entry.learned.contains(*d) && !entry.reported.contains(*d))
                .cloned()
                .collect();
            if !new.is_empty()
                && entry.learned.len() + entry.reported.len() + new.len() > MAX_DATASETS
            {
                drop(stored);
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
            (owner, new)
        };
        if new.is_empty() {
            return Ok(if learning {
                Outcome::Learning { added: 0 }
            } else {
                Outcome::Known
            });
        }
        let more = new.iter().map(|d| cost(d)).sum::<usize>();
        if let Some((key, what)) = self.bytes_bound(&owner, more) {
            let first = self.capped.insert(key);
            // As above: fail closed after the window.
            return Ok(if learning {
                Outcome::Capped { what, first }
            } else {
                Outcome::Anomaly { new }
            });
        }
        self.charge(&owner, more);
        let outcome = {
            let mut stored = self.stored();
            let entry = stored.subjects.get_mut(subject).expect("inserted above");
            if learning {
                entry.learned.extend(new.iter().cloned());
                Outcome::Learning { added: new.len() }
            } else {
                entry.reported.extend(new.iter().cloned());
                Outcome::Anomaly { new }
            }
        };
        self.save()?;
        Ok(outcome)
    }

    /// Counts `bytes` more recorded for `tenant`.
    fn charge(&mut self, tenant: &str, bytes: usize) {
        *self.bytes_per_tenant.entry(tenant.to_string()).or_insert(0) += bytes;
        self.bytes += bytes;
    }

    /// Step-up quarantines in force and when they lift.
    pub fn step_ups(&self) -> Vec<(String, SystemTime)> {
        self.stored()
            .step_ups
            .iter()
            .filter_map(|(workload, until)| {
                Some((workload.clone(), humantime::parse_rfc3339(until).ok()?))
            })
            .collect()
    }

    /// Records (`Some`) or forgets (`None`) when `workload`'s step-up quarantine lifts.
    pub fn set_step_up(&mut self, workload: &str, until: Option<SystemTime>) -> Result<()> {
        match until {
            Some(at) => {
                self.stored().step_ups.insert(
                    workload.to_string(),
                    humantime::format_rfc3339_nanos(at).to_string(),
                );
            }
            None => {
                if self.stored().step_ups.remove(workload).is_none() {
                    return Ok(());
                }
            }
        }
        self.save()
    }

    /// Tells the writer thread that the state changed (it copies it when it writes: the loop
    /// goes on at once, and a burst of changes costs one copy, not one each).
    fn save(&self) -> Result<()> {
        self.writer.changed();
        Ok(())
    }

    /// Blocks until every change handed over so far is on disk (or its write failed, which
    /// is logged): at shutdown, and in tests. Errors: the last write failed (its message).
    pub fn flush(&self) -> Result<()> {
        self.writer
            .flush()
            .with_context(|| format!("writing {}", self.file.display()))
    }
}

/// Writes the shared [`Stored`] state to the file on a thread of its own, a copy of it as it
/// is when the write starts: changes made while one is being written (or within
/// [`PERSIST_INTERVAL`] of the last write) are one write after it. Dropped, it writes what
/// changed, then stops.
#[derive(Debug)]
struct Writer {
    file: PathBuf,
    stored: Arc<Mutex<Stored>>,
    slot: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Slot {
    /// The state changed since the last write started.
    dirty: bool,
    /// A state taken by the thread and not yet written.
    writing: bool,
    /// Write now, whatever the interval (a flush, or the writer dropped).
    urgent: bool,
    closed: bool,
    /// The last write's error, if it failed (cleared by a successful one).
    error: Option<String>,
}

impl Writer {
    fn start(file: PathBuf, stored: Arc<Mutex<Stored>>) -> Writer {
        let slot: Arc<(Mutex<Slot>, Condvar)> = Arc::default();
        let (theirs, path, state) = (slot.clone(), file.clone(), stored.clone());
        let thread = std::thread::Builder::new()
            .name("learn-persist".into())
            .spawn(move || Writer::run(&path, &state, &theirs))
            .map_err(|error| {
                tracing::error!("cannot start the thread that writes the neighbourhoods ({error}); they are written on the agent's loop");
            })
            .ok();
        Writer {
            file,
            stored,
            slot,
            thread,
        }
    }

    /// A copy of the state (the slot's lock is not held: the learner takes the state's lock
    /// and then the slot's, never both at once).
    fn copy(stored: &Mutex<Stored>) -> Stored {
        stored.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run(file: &Path, stored: &Mutex<Stored>, slot: &(Mutex<Slot>, Condvar)) {
        let (lock, changed) = slot;
        let mut last_write: Option<Instant> = None;
        loop {
            {
                let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let wait = last_write
                        .map(|t| PERSIST_INTERVAL.saturating_sub(t.elapsed()))
                        .unwrap_or_default();
                    if s.dirty && (wait.is_zero() || s.urgent || s.closed) {
                        s.writing = true;
                        s.dirty = false;
                        break;
                    }
                    s.urgent = false;
                    if s.closed {
                        return;
                    }
                    s = if s.dirty {
                        changed
                            .wait_timeout(s, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    } else {
                        changed.wait(s).unwrap_or_else(|e| e.into_inner())
                    };
                }
            };
            last_write = Some(Instant::now());
            let next = Writer::copy(stored);
            let written = crate::sources::kubernetes::write_atomically(file, &next);
            drop(next);
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            s.writing = false;
            match written {
                Ok(()) => s.error = None,
                Err(error) => {
                    let text = format!("{error:#}");
                    if s.error.as_deref() != Some(text.as_str()) {
                        tracing::error!(error = %text, "cannot write the learned neighbourhoods (kept in memory; written with the next change)");
                    }
                    s.error = Some(text);
                }
            }
            changed.notify_all();
        }
    }

    fn changed(&self) {
        let (lock, changed) = &*self.slot;
        if self.thread.is_none() {
            // No thread could be started: write here, on the caller's loop.
            let state = Writer::copy(&self.stored);
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            match crate::sources::kubernetes::write_atomically(&self.file, &state) {
                Ok(()) => s.error = None,
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "cannot write the learned neighbourhoods (kept in memory; written with the next change)");
                    s.error = Some(format!("{error:#}"));
                }
            }
            return;
        }
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.dirty = true;
        changed.notify_all();
    }

    fn flush(&self) -> Result<()> {
        let (lock, changed) = &*self.slot;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.thread.is_some() {
            s.urgent = true;
            changed.notify_all();
            while s.dirty || s.writing {
                s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
        match &s.error {
            Some(error) => Err(anyhow::anyhow!("{error}")),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        {
            let (lock, changed) = &*self.slot;
            lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
            l.observe("a", None, &d(&["kb1"]), t0).unwrap(),
            Outcome::Learning { added: 1 }
        );
        let after = t0 + Duration::from_secs(61);
        assert_eq!(
            l.observe("a", None, &d(&["kb1"]), after).unwrap(),
            Outcome::Known
        );
        assert_eq!(
            l.observe("a", None, &d(&["kb1", "kb2"]), after).unwrap(),
            Outcome::Anomaly { new: d(&["kb2"]) }
        );
        assert_eq!(
            l.observe("a", None, &d(&["kb2"]), after).unwrap(),
            Outcome::Known
        );
        // A subject never seen while learning has an empty neighbourhood.
        assert_eq!(
            l.observe("b", None, &d(&["kb1"]), after).unwrap(),
            Outcome::Anomaly { new: d(&["kb1"]) }
        );
        // Reopened later with another window length: same start, same sets.
        l.flush().unwrap();
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
            l.observe("a", None, &[format!("kb{i}")], t0).unwrap();
        }
        let capped = l.observe("a", None, &d(&["one-more"]), t0).unwrap();
        assert!(
            matches!(capped, Outcome::Capped { first: true, .. }),
            "{capped:?}"
        );
        let again = l.observe("a", None, &d(&["and-another"]), t0).unwrap();
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
                l.observe("a", None, &d(&["past-the-bound"]), after)
                    .unwrap(),
                Outcome::Anomaly {
                    new: d(&["past-the-bound"])
                }
            );
        }
        assert_eq!(
            l.observe("a", None, &d(&["kb0"]), after).unwrap(),
            Outcome::Known,
            "what was learned stays known"
        );
    }

    /// A tenant that rotates label sets fills its own share of the subjects, not the others'
    /// (with one bound for all, the other tenant's later subjects learned nothing and were
    /// anomalies, and step-ups, at every contact after the window).
    #[test]
    fn a_tenant_fills_only_its_own_share_of_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        l.set_tenants(2);
        // Two tenants and the subjects without one.
        let share = MAX_SUBJECTS / 3;
        for i in 0..MAX_SUBJECTS {
            l.observe(&format!("greedy-{i}"), Some("globex"), &d(&["kb"]), t0)
                .unwrap();
        }
        let capped = l
            .observe("greedy-late", Some("globex"), &d(&["kb"]), t0)
            .unwrap();
        assert!(
            matches!(&capped, Outcome::Capped { what, .. } if what.contains("globex")),
            "{capped:?}"
        );
        assert_eq!(
            l.observe("retriever", Some("acme"), &d(&["acme-kb"]), t0)
                .unwrap(),
            Outcome::Learning { added: 1 },
            "the other tenant still learns"
        );
        let after = t0 + Duration::from_secs(61);
        assert_eq!(
            l.observe("retriever", Some("acme"), &d(&["acme-kb"]), after)
                .unwrap(),
            Outcome::Known
        );
        // The greedy tenant's own subjects past its share fail closed.
        assert!(matches!(
            l.observe("greedy-late", Some("globex"), &d(&["kb"]), after)
                .unwrap(),
            Outcome::Anomaly { .. }
        ));
        assert!(l.neighbourhood(&format!("greedy-{}", share - 1)).is_some());
        assert!(l.neighbourhood(&format!("greedy-{share}")).is_none());
        // Shares are counted again from the file by a restarted agent.
        l.flush().unwrap();
        drop(l);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        l.set_tenants(2);
        assert!(matches!(
            l.observe("greedy-other", Some("globex"), &d(&["kb"]), t0)
                .unwrap(),
            Outcome::Capped { .. }
        ));
    }

    /// Subjects without a tenant (system workloads) have a share of their own, and a node
    /// with one tenant leaves that tenant half the table, not all of it to nobody.
    /// Names are long (a subject or an `endpoint:` dataset names a service account, up to 253
    /// bytes): counts alone let one tenant make the file (and the state in memory, copied at
    /// each change) hundreds of megabytes (red-team review 73 M1). Its names are bounded in
    /// bytes by its share; another tenant still has its own; after the window what is over
    /// the bound is an anomaly at every contact (fail closed).
    #[test]
    fn a_tenant_s_names_are_bounded_in_bytes_by_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        l.set_tenants(2);
        let long = |what: &str, n: usize| format!("endpoint:greedy/{what}-{n}-{}", "x".repeat(300));
        let datasets: Vec<Vec<String>> = (0..8)
            .map(|b| {
                (0..MAX_DATASETS)
                    .map(|d| long(&format!("kb{b}"), d))
                    .collect()
            })
            .collect();
        let mut capped = 0;
        for n in 0..400 {
            let subject = format!("greedy/sa-{n}#{}", "y".repeat(240));
            match l
                .observe(&subject, Some("greedy"), &datasets[n % 8], t0)
                .unwrap()
            {
                Outcome::Learning { .. } => {}
                Outcome::Capped { what, .. } => {
                    assert!(
                        what.contains("bytes of names of tenant \"greedy\""),
                        "{what}"
                    );
                    capped += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        // 400 subjects of ~82 KB each would be ~33 MB; a third of 16 MiB is ~68 of them.
        assert!(capped > 300, "{capped}");
        l.flush().unwrap();
        let size = std::fs::metadata(dir.path().join(FILE)).unwrap().len() as usize;
        assert!(size <= MAX_BYTES / 3, "{size}");
        assert_eq!(
            l.observe("modest/a", Some("modest"), &d(&["kb1", "kb2"]), t0)
                .unwrap(),
            Outcome::Learning { added: 2 }
        );
        let after = t0 + Duration::from_secs(61);
        for _ in 0..2 {
            assert_eq!(
                l.observe("greedy/sa-late", Some("greedy"), &datasets[1], after)
                    .unwrap(),
                Outcome::Anomaly {
                    new: datasets[1].clone()
                }
            );
        }
        // Counted again from the file at a reopen.
        drop(l);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        l.set_tenants(2);
        assert!(matches!(
            l.observe("greedy/sa-new", Some("greedy"), &datasets[0], t0)
                .unwrap(),
            Outcome::Capped { .. }
        ));
    }

    /// A `flow.anomaly` lists at most 16 names of the neighbourhood, with the count of all:
    /// a capped subject has one at every contact, and 256 names of 300 bytes made each event
    /// ~90 KB (red-team review 75 M1).
    #[test]
    fn an_anomaly_lists_the_first_names_of_a_large_neighbourhood_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        let names: Vec<String> = (0..MAX_DATASETS)
            .map(|n| format!("endpoint:acme/{n:03}-{}", "x".repeat(300)))
            .collect();
        l.observe("acme/a", Some("acme"), &names, t0).unwrap();
        let (shown, total) = l.learned_shown("acme/a");
        assert_eq!(shown, names[..crate::events::flow::ANOMALY_NAMES_SHOWN]);
        assert_eq!(total, Some(MAX_DATASETS));
        let (new, new_total) = crate::events::flow::shown_names(names.iter().cloned(), names.len());
        let anomaly = crate::events::flow::Anomaly {
            new_datasets: new,
            new_datasets_total: new_total,
            neighbourhood: shown,
            neighbourhood_total: total,
            learned_until: crate::events::record::Time(t0),
            step_up: None,
            quarantined_until: None,
            count: None,
            first_seen: None,
        };
        let size = serde_json::to_vec(&anomaly).unwrap().len();
        assert!(size < 12 << 10, "{size}");
        // A small one is listed whole, without counts.
        l.observe("acme/b", Some("acme"), &d(&["kb1"]), t0).unwrap();
        assert_eq!(l.learned_shown("acme/b"), (d(&["kb1"]), None));
        assert_eq!(l.learned_shown("acme/none"), (Vec::new(), None));
    }

    /// A file larger than the agent writes is refused before it is read.
    #[test]
    fn a_file_beyond_the_byte_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join(FILE)).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let error = format!(
            "{:#}",
            Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap_err()
        );
        assert!(error.contains("more than this agent writes"), "{error}");
    }

    #[test]
    fn subjects_without_a_tenant_share_like_a_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Learner::open(dir.path(), Duration::from_secs(60), t0).unwrap();
        l.set_tenants(1);
        let share = MAX_SUBJECTS / 2;
        let learned = |l: &mut Learner, prefix: &str, tenant: Option<&str>| {
            (0..MAX_SUBJECTS)
                .filter(|i| {
                    matches!(
                        l.observe(&format!("{prefix}-{i}"), tenant, &d(&["kb"]), t0)
                            .unwrap(),
                        Outcome::Learning { .. }
                    )
                })
                .count()
        };
        assert_eq!(learned(&mut l, "system", None), share);
        assert_eq!(learned(&mut l, "acme", Some("acme")), share);
    }

    #[test]
    fn changes_reach_the_file_off_the_callers_thread_and_a_dropped_learner_writes_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let window = Duration::from_secs(60);
        let mut l = Learner::open(dir.path(), window, t0).unwrap();
        // A burst: the first change is written at once, the rest wait for the interval and
        // are one write of the last state.
        for i in 0..50 {
            l.observe("a", None, &[format!("kb{i}")], t0).unwrap();
        }
        l.flush().unwrap();
        let on_disk = Learner::open(dir.path(), window, t0).unwrap();
        assert_eq!(on_disk.neighbourhood("a").unwrap().learned.len(), 50);
        drop(on_disk);
        // Dropped within the interval of the last write: what waits is written, not lost.
        l.observe("b", None, &d(&["kb-b"]), t0).unwrap();
        drop(l);
        let on_disk = Learner::open(dir.path(), window, t0).unwrap();
        assert!(on_disk.neighbourhood("b").is_some());
        // Nothing left behind but the file itself (the temporary files were renamed).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![FILE.to_string()]);
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
        l.flush().unwrap();
        let l2 = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap();
        assert_eq!(
            l2.step_ups(),
            vec![("a".to_string(), t0 + Duration::from_secs(5))]
        );
        l.set_step_up("a", None).unwrap();
        l.flush().unwrap();
        let l3 = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap();
        assert_eq!(l3.step_ups().len(), 0);
        // A step-up end that cannot be read stops the agent with the file's name, like a bad
        // `started`: skipped, that quarantine was never lifted (red-team review 39).
        l.set_step_up("a", Some(t0 + Duration::from_secs(5)))
            .unwrap();
        l.flush().unwrap();
        drop((l, l2, l3));
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let until = humantime::format_rfc3339_nanos(t0 + Duration::from_secs(5)).to_string();
        assert!(text.contains(&until), "{text}");
        std::fs::write(&file, text.replace(&until, "soon")).unwrap();
        let err = Learner::open(dir.path(), Duration::from_secs(1), t0).unwrap_err();
        assert!(
            format!("{err:#}").contains("bad `step_ups` time \"soon\" of \"a\""),
            "{err:#}"
        );
    }
}

//! The agent runs that served the events socket of one state directory, and where each wrote
//! its events (`<state dir>/event-runs.json`, the last [`KEEP`]; a run is recorded when it
//! is about to serve the socket).
//!
//! Why: a follower taken up by a new agent names the last line it printed and the agent run
//! whose `events.agent` line it got last (`after_instance`); the new agent sends what its files hold
//! after that line. Any run in between whose lines its files do not hold (it wrote to
//! standard output, to another file, or in the other format) would be skipped without a
//! word: the record names those runs, and the follower is told of each
//! ([`between`]). Runs that wrote to the same file in the same format need no word: their
//! lines are read back like any other.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Format;

/// The file in the state directory.
pub const FILE: &str = "event-runs.json";
/// Runs kept: a follower away for more restarts than this is told it cannot be sure.
pub const KEEP: usize = 64;

/// One agent run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Its `events.agent` instance.
    pub instance: String,
    /// `--events`: the file's absolute path, or `-` for standard output.
    pub events: String,
    /// `--events-format`: `json` or `ocsf`.
    pub format: String,
    /// When it started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
}

impl Run {
    /// This run: `instance`, writing to `events` (as `--events` gives it) in `format`.
    pub fn new(instance: &str, events: &str, format: Format) -> Run {
        let events = if events == "-" {
            events.to_string()
        } else {
            canonical(Path::new(events)).display().to_string()
        };
        Run {
            instance: instance.to_string(),
            events,
            format: format.name().to_string(),
            started_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        }
    }

    /// Whether this run's lines are in the files `reader` reads back.
    fn in_files_of(&self, reader: &Run) -> bool {
        reader.events != "-" && self.events == reader.events && self.format == reader.format
    }

    /// Where its events went, in words.
    pub fn describe(&self) -> String {
        // RFC 3339 ends with the year 9999 (humantime's display fails past it: a record
        // edited by hand must not panic the stream).
        let started = if self.started_unix_ms < 253_402_300_800_000 {
            humantime::format_rfc3339_millis(
                SystemTime::UNIX_EPOCH + Duration::from_millis(self.started_unix_ms),
            )
            .to_string()
        } else {
            format!("at {} ms after the epoch", self.started_unix_ms)
        };
        let to = if self.events == "-" {
            "to standard output".to_string()
        } else {
            format!("to {}", self.events)
        };
        format!(
            "agent run {} (started {started}) wrote its events {to} in {}",
            self.instance, self.format
        )
    }
}

/// The file's path with its directory's symlinks and `..` resolved (the same file named two
/// ways is one), or as absolute as it can be made when the directory cannot be resolved.
fn canonical(path: &Path) -> std::path::PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => {
            std::fs::canonicalize(dir).map_or(absolute.clone(), |d| d.join(name))
        }
        _ => absolute,
    }
}

/// Adds `this` run to the record in `state_dir` and returns the runs before it, oldest first.
/// A record that cannot be read starts anew; one that cannot be written is logged (the next
/// agent then cannot name this run to a follower that missed it, and says it cannot be sure).
pub fn record(state_dir: &Path, this: &Run) -> Vec<Run> {
    let path = state_dir.join(FILE);
    let mut runs: Vec<Run> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let before = runs.clone();
    runs.push(this.clone());
    let excess = runs.len().saturating_sub(KEEP);
    runs.drain(..excess);
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec(&runs)
        .map_err(std::io::Error::from)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(error) = written {
        tracing::warn!(file = %path.display(), %error, "recording this agent run for followers");
    }
    before
}

/// The runs after `instance` among `earlier` (oldest first) whose lines are not in the
/// files `this` reads back: what a follower that printed `instance`'s lines last may have
/// missed without the files saying so. None when `instance` is not among them (another
/// state directory's, or more than [`KEEP`] runs ago).
pub fn between<'a>(earlier: &'a [Run], instance: &str, this: &Run) -> Option<Vec<&'a Run>> {
    let at = earlier.iter().rposition(|r| r.instance == instance)?;
    Some(
        earlier[at + 1..]
            .iter()
            .filter(|r| !r.in_files_of(this))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(instance: &str, events: &str, format: Format) -> Run {
        Run::new(instance, events, format)
    }

    #[test]
    fn runs_elsewhere_between_the_followers_and_this_one_are_named() {
        let dir = std::env::temp_dir().join(format!("ev-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("events.jsonl").display().to_string();
        let other = dir.join("other.jsonl").display().to_string();
        let earlier = [
            run("a", &file, Format::Json),
            run("b", "-", Format::Json),
            run("c", &other, Format::Json),
            run("d", &file, Format::Ocsf),
            run("e", &file, Format::Json),
        ];
        for r in &earlier {
            record(&dir, r);
        }
        let this = run("f", &file, Format::Json);
        let before = record(&dir, &this);
        assert_eq!(before, earlier);
        let names = |v: Option<Vec<&Run>>| {
            v.map(|v| v.iter().map(|r| r.instance.clone()).collect::<Vec<_>>())
        };
        assert_eq!(
            names(between(&before, "a", &this)),
            Some(vec!["b".into(), "c".into(), "d".into()])
        );
        assert_eq!(names(between(&before, "d", &this)), Some(vec![]));
        assert_eq!(names(between(&before, "z", &this)), None);
        // An agent on standard output reads no files: every run after the follower's is named.
        let stdout = run("g", "-", Format::Json);
        assert_eq!(
            names(between(&before, "d", &stdout)),
            Some(vec!["e".into()])
        );
        assert!(before[1].describe().contains("to standard output in json"));
        // The same file named another way is the same file.
        let spelt = dir.join("x/../events.jsonl").display().to_string();
        std::fs::create_dir_all(dir.join("x")).unwrap();
        assert!(run("h", &spelt, Format::Json).in_files_of(&this));
        let far = Run {
            started_unix_ms: u64::MAX,
            ..run("i", "-", Format::Json)
        };
        assert!(far.describe().contains("ms after the epoch"));
        // Only the last KEEP runs are kept.
        for i in 0..KEEP + 5 {
            record(&dir, &run(&format!("r{i}"), &file, Format::Json));
        }
        let kept = record(&dir, &this);
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept[KEEP - 1].instance, format!("r{}", KEEP + 4));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

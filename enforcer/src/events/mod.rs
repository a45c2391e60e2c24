//! Kernel -> ring buffer -> decode -> enrich -> format -> sink. Every denied call becomes one
//! line; losses counted by the kernel become `events.lost` lines and a warning, never silence.
//!
//! [`Event`] is what the pipeline carries (a call or a [`Notice`]); [`Formatter::line`] is the
//! one place that turns an event into each output format (JSON, OCSF); [`Emitter`] numbers the
//! lines (`seq`) and writes them to the [`Sink`]. A further consumer (a socket, metrics) takes
//! the same `(seq, Event)` and the same formatter.

pub mod aggregate;
pub mod archive;
pub mod cgroup;
pub mod decode;
pub mod flow;
pub mod notice;
pub mod ocsf;
pub mod record;
pub mod ring;
pub mod runs;
mod sink;
pub mod stream;
mod template;

use std::io::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;

pub use notice::Notice;
pub use record::DeniedCall;
pub use sink::{parse_size, rotated_path, FileSink, Rotation, Sink, Written};

/// One event, before it has a format.
// Built and dropped once per line, moved by reference: boxing the call would cost an
// allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Event {
    Call(DeniedCall),
    Notice(Notice),
    Flow(flow::FlowCall),
}

impl Event {
    /// The JSON form's `type` (`connection.denied`, `policy.applied`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Call(call) => call.kind,
            Event::Notice(notice) => notice.kind(),
            Event::Flow(flow) => flow.kind,
        }
    }
}

/// The output format (`--events-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// The product's JSON lines, each ending with its `seq` (README, "Events").
    #[default]
    Json,
    /// OCSF 1.8.0: Network Activity for calls, Entity Management and Application Error for
    /// the agent's notices (README, "Events").
    Ocsf,
}

impl Format {
    /// As `--events-format` and `-o` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ocsf => "ocsf",
        }
    }
}

/// Turns events into lines of one format.
#[derive(Debug, Clone)]
pub struct Formatter {
    format: Format,
    ocsf: ocsf::Context,
}

impl Formatter {
    pub fn new(format: Format, ocsf: ocsf::Context) -> Self {
        Formatter { format, ocsf }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The same context, another format (a consumer of `enforcer events` picks its own).
    pub fn with_format(&self, format: Format) -> Self {
        Formatter {
            format,
            ocsf: self.ocsf.clone(),
        }
    }

    /// The line of `event`, numbered `seq`, with its `\n`.
    pub fn line(&self, seq: u64, event: &Event) -> Result<Vec<u8>> {
        let mut line = Vec::new();
        self.append_line(seq, event, &mut line)?;
        Ok(line)
    }

    /// The node that OCSF lines name (`device.hostname`).
    fn ocsf_node(&self) -> &str {
        &self.ocsf.node
    }

    /// [`Formatter::line`], appended to `out` (left as it was on error).
    pub fn append_line(&self, seq: u64, event: &Event, out: &mut Vec<u8>) -> Result<()> {
        // A call whose key has been seen before: its key's template, filled in.
        if let Event::Call(call) = event {
            if call.facts.templates.render(self, call, seq, out) {
                return Ok(());
            }
        }
        self.append_slow(seq, event, out)
    }

    /// [`Formatter::append_line`] without templates: the one place that serialises events
    /// (the templates are made by it too).
    fn append_slow(&self, seq: u64, event: &Event, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        let written = match self.format {
            // The event's fields, then its place in the stream: an event is a JSON object, so
            // `seq` goes in before its closing brace (serde's `flatten` costs several times
            // the whole line).
            Format::Json => serde_json::to_writer(&mut *out, event).map(|()| {
                debug_assert_eq!(out.last(), Some(&b'}'));
                out.pop();
                // Writing to a Vec cannot fail.
                let _ = write!(out, ",\"seq\":{seq}}}");
            }),
            Format::Ocsf => match event {
                Event::Call(call) => {
                    serde_json::to_writer(&mut *out, &ocsf::call(&self.ocsf, seq, call))
                }
                Event::Notice(notice) => {
                    serde_json::to_writer(&mut *out, &ocsf::notice(&self.ocsf, seq, notice))
                }
                Event::Flow(flow) => {
                    serde_json::to_writer(&mut *out, &ocsf::flow(&self.ocsf, seq, flow))
                }
            },
        };
        if let Err(error) = written {
            out.truncate(start);
            return Err(error).with_context(|| format!("serialising a {} event", event.kind()));
        }
        out.push(b'\n');
        Ok(())
    }
}

/// Numbers events and writes them: `seq` counts from 1 at the agent's start, one per line, so
/// a gap in a consumer's copy means it lost lines.
///
/// Lines are written in batches: [`Emitter::emit`] numbers and formats an event and keeps its
/// line; [`Emitter::flush`] writes what was kept in one `write` (the agent flushes after each
/// turn of its event loop, so after each ring-buffer drain of at most `EVENT_BATCH` records)
/// and only then hands the events to the live stream, so that the file still comes first.
/// A batch is also written when it reaches [`Emitter::BATCH_BYTES`], and on drop.
pub struct Emitter {
    seq: u64,
    formatter: Formatter,
    sink: Sink,
    /// Lines the sink refused since its last good write (0: it writes), and in all.
    failing: u64,
    refused: u64,
    /// `--metrics`: counts what is emitted, by type, and what the sink refused.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Events emitted since the last flush, by type, for `metrics`.
    emitted: Vec<(&'static str, u64)>,
    /// `enforcer events`: every numbered event also goes to the live stream's consumers.
    hub: Option<stream::Hub>,
    /// The lines emitted since the last flush, and how many.
    batch: Vec<u8>,
    batch_lines: u64,
    /// Their events and where their lines are in `batch`, for the hub (empty without one).
    batch_events: Vec<(u64, Event, std::ops::Range<usize>)>,
}

impl Emitter {
    /// Bytes of kept lines at which `emit` writes them without waiting for `flush`: bounds
    /// the agent's memory whatever a caller does between flushes.
    pub const BATCH_BYTES: usize = 256 * 1024;

    pub fn new(formatter: Formatter, sink: Sink) -> Self {
        Emitter {
            seq: 0,
            formatter,
            sink,
            failing: 0,
            refused: 0,
            metrics: None,
            emitted: Vec::new(),
            hub: None,
            batch: Vec::new(),
            batch_lines: 0,
            batch_events: Vec::new(),
        }
    }

    /// Counts every event from now on in `metrics`.
    pub fn set_metrics(&mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Hands every event from now on to `hub` too (after the sink: the file comes first).
    pub fn set_hub(&mut self, hub: stream::Hub) {
        hub.written(self.sink.position());
        self.hub = Some(hub);
    }

    /// The formatter of the events file.
    pub fn formatter(&self) -> &Formatter {
        &self.formatter
    }

    /// Numbers `event` and keeps its line for the next [`Emitter::flush`]; returns its `seq`.
    /// Only a line that cannot be serialised is an error.
    pub fn emit(&mut self, event: Event) -> Result<u64> {
        let seq = self.seq + 1;
        let start = self.batch.len();
        self.formatter.append_line(seq, &event, &mut self.batch)?;
        self.seq = seq;
        if let Some(metrics) = &self.metrics {
            // Counted here, added to the metric by `flush`: one labelled lookup per type and
            // batch instead of one per event (SipHash of the label, 2 % of the agent).
            let kind = event.kind();
            match self.emitted.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => self.emitted.push((kind, 1)),
            }
            if let Event::Notice(Notice::EventsSuppressed {
                hook,
                reason,
                count,
                ..
            }) = &event
            {
                metrics.events_suppressed(hook, reason, *count);
            }
            if let Event::Notice(Notice::FlowEventsSuppressed { opened, closed, .. }) = &event {
                metrics.flow_events_suppressed(*opened, *closed);
            }
        }
        self.batch_lines += 1;
        if self.hub.is_some() {
            self.batch_events
                .push((seq, event, start..self.batch.len()));
        }
        if self.batch.len() >= Self::BATCH_BYTES {
            self.flush();
        }
        Ok(seq)
    }

    /// Writes the kept lines, then hands their events to the live stream. A batch the sink
    /// refuses (a full disk, which any workload writing to the node's disk can cause) is
    /// logged and lost, its `seq`s left as a gap: stopping the event stream would stop the
    /// agent, and with it every identity update.
    pub fn flush(&mut self) {
        if let Some(metrics) = &self.metrics {
            for (kind, count) in self.emitted.drain(..) {
                metrics.events_emitted(kind, count);
            }
        }
        if self.batch_lines == 0 {
            return;
        }
        let lines = std::mem::take(&mut self.batch_lines);
        let last = self.seq;
        match self.sink.write_lines(&self.batch) {
            Ok(()) => {
                if self.failing > 0 {
                    tracing::warn!(
                        lost = self.failing,
                        seq = last + 1 - lines,
                        "the events output writes again; lines before this seq were lost"
                    );
                    self.failing = 0;
                }
            }
            Err(error) => {
                if let Some(metrics) = &self.metrics {
                    metrics.events_write_failed(lines);
                }
                // Once per outage, not once per batch: a flood of denials on a full disk
                // would otherwise fill the agent's own log too.
                if self.failing == 0 {
                    tracing::error!(
                        seq = last + 1 - lines,
                        "writing events failed; lines are lost until it writes again: {error:#}"
                    );
                }
                self.failing += lines;
                self.refused += lines;
            }
        }
        if let Some(hub) = &self.hub {
            // The lines go along: consumers of the file's format send these bytes instead of
            // serialising the events again, each.
            let format = self.formatter.format();
            let batch = &self.batch;
            let whole = stream::LineRef {
                format,
                bytes: batch,
            };
            hub.publish_lines(
                whole,
                self.sink.position(),
                self.batch_events.drain(..).map(|(seq, event, range)| {
                    let line = stream::LineRef {
                        format,
                        bytes: &batch[range],
                    };
                    (seq, std::sync::Arc::new(event), Some(line))
                }),
            );
        }
        self.batch.clear();
    }

    /// Lines the sink refused since the emitter was made. A caller that consumes what some
    /// lines tell (deletes the kernel's record of it) compares this before and after writing
    /// them: unchanged, they were written.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Opens the events file again by its name (SIGUSR1, after logrotate renamed it); what
    /// was emitted before goes to the file as it was.
    pub fn reopen(&mut self) -> Result<()> {
        self.flush();
        self.sink.reopen()
    }
}

impl Drop for Emitter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod emitter_tests {
    use super::*;

    /// Attack: a workload fills the node's disk (an emptyDir, its own log) where the events
    /// file lives. A write error ended the event task, and the agent with it ("the event
    /// stream stopped"), again at every restart while the disk stayed full: no identity
    /// update for any pod on the node. /dev/full refuses every write with ENOSPC.
    #[test]
    fn a_full_disk_loses_lines_but_never_stops_the_stream() {
        let sink = Sink::open("/dev/full", Rotation::default()).unwrap();
        let mut emitter = Emitter::new(
            Formatter::new(
                Format::Json,
                ocsf::Context {
                    node: "atk2-node".into(),
                },
            ),
            sink,
        );
        for expected in 1..=3 {
            let notice = Event::Notice(Notice::ClusterProblem {
                time: "2026-12-01T00:00:00Z".into(),
                problem: "atk2".into(),
            });
            assert_eq!(emitter.emit(notice).unwrap(), expected);
        }
        emitter.flush();
        assert_eq!(
            emitter.failing, 3,
            "every line of the refused batch is counted"
        );
        assert!(
            emitter.batch.is_empty(),
            "a refused batch is dropped, not kept"
        );
    }

    /// Emitted events reach the file at the flush, each once, whole and in `seq` order, and a
    /// flood past `BATCH_BYTES` between flushes is written as it goes (memory stays bounded).
    #[test]
    fn a_flush_writes_every_emitted_line_once_in_order() {
        let path = std::env::temp_dir().join(format!("emitter-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = Sink::open(path.to_str().unwrap(), Rotation::default()).unwrap();
        let mut emitter = Emitter::new(
            Formatter::new(Format::Json, ocsf::Context { node: "n".into() }),
            sink,
        );
        let notice = |i: u64| {
            Event::Notice(Notice::ClusterProblem {
                time: "2026-12-01T00:00:00Z".into(),
                problem: format!("problem {i}"),
            })
        };
        emitter.emit(notice(1)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "written before the flush"
        );
        emitter.flush();
        let n = 5_000;
        for i in 2..=n {
            emitter.emit(notice(i)).unwrap();
            assert!(emitter.batch.len() < Emitter::BATCH_BYTES);
        }
        drop(emitter);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    }
}

//! A key's line with holes: the calls of one key ([`super::record::CallFacts`]) differ only in
//! their time, count, process and `seq`, so their line in a format is made once, with those
//! left as holes, and each call's line is the template's bytes with its own values written
//! in. This spares a flood's lines the enrichment, serde's string escaping and the
//! allocations of every nested object (the bulk of the agent's cost per event, README
//! "Benchmarks").
//!
//! A template is made by the formatter itself ([`super::Formatter::append_line`]'s slow
//! path), not written by hand: the line is serialised once with sentinel values in the
//! holes, each found at most once, and the result checked by rendering it with two other
//! sets of values and comparing with what the formatter writes for them. A format that
//! writes a hole's value twice, derives another field from it or leaves a field out for
//! some values fails that check, and its calls keep the slow path: a template can be
//! missing, never wrong.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use super::record::{DeniedCall, Time};
use super::{Event, Format, Formatter};

/// What a call has alone, written into its key's template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    Time,
    Count,
    Pid,
    Comm,
    Seq,
}

const HOLES: [Hole; 5] = [Hole::Time, Hole::Count, Hole::Pid, Hole::Comm, Hole::Seq];

/// The values of one call's holes.
struct Values<'a> {
    time: Time,
    count: u32,
    pid: u32,
    comm: &'a str,
    seq: u64,
}

impl Hole {
    /// `value`'s hole as `format` writes it (the same serde calls as the line itself).
    fn write(self, format: Format, value: &Values, out: &mut Vec<u8>) {
        // Writing numbers and strings to a Vec cannot fail.
        let _ = match (self, format) {
            (Hole::Time, Format::Json) => serde_json::to_writer(&mut *out, &value.time),
            (Hole::Time, Format::Ocsf) => {
                serde_json::to_writer(&mut *out, &value.time.epoch_millis())
            }
            (Hole::Count, _) => serde_json::to_writer(&mut *out, &value.count),
            (Hole::Pid, _) => serde_json::to_writer(&mut *out, &value.pid),
            (Hole::Comm, _) => serde_json::to_writer(&mut *out, value.comm),
            (Hole::Seq, _) => serde_json::to_writer(&mut *out, &value.seq),
        };
    }
}

/// One key's line in one format: `pieces[0]`, hole 0, `pieces[1]`, ... , the last piece.
#[derive(Debug)]
pub(super) struct Template {
    /// The formatter's OCSF node it was made for (a formatter of another node makes its own).
    node: String,
    bytes: Vec<u8>,
    /// Where each hole is in `bytes` (the end of the piece before it), in order.
    holes: Vec<(usize, Hole)>,
}

impl Template {
    /// `call`'s line, numbered `seq`, with its `\n`, appended to `out`.
    fn render(&self, format: Format, call: &DeniedCall, seq: u64, out: &mut Vec<u8>) {
        let values = Values {
            time: call.time,
            count: call.count,
            pid: call.pid,
            comm: &call.comm,
            seq,
        };
        self.render_values(format, &values, out);
    }

    fn render_values(&self, format: Format, values: &Values, out: &mut Vec<u8>) {
        let mut at = 0;
        for &(end, hole) in &self.holes {
            out.extend_from_slice(&self.bytes[at..end]);
            hole.write(format, values, out);
            at = end;
        }
        out.extend_from_slice(&self.bytes[at..]);
    }

    /// The template of `call`'s facts in `formatter`'s format, or `None` where the check
    /// fails (or the line cannot be serialised).
    fn make(formatter: &Formatter, call: &DeniedCall) -> Option<Template> {
        let format = formatter.format();
        let line = |values: &Values| -> Option<Vec<u8>> {
            let sample = DeniedCall {
                time: values.time,
                count: values.count,
                pid: values.pid,
                comm: values.comm.to_string(),
                facts: call.facts.clone(),
            };
            let mut out = Vec::new();
            formatter
                .append_slow(values.seq, &Event::Call(sample), &mut out)
                .ok()?;
            Some(out)
        };
        let sentinel = Values {
            // 2100-01-01T00:00:00.123456789Z; no field of a line is anything like these.
            time: Time(SystemTime::UNIX_EPOCH + Duration::new(4_102_444_800, 123_456_789)),
            count: 3_141_592_653,
            pid: 2_718_281_828,
            comm: "\u{1}\u{2}\u{3}\u{4}",
            seq: 16_180_339_887_498_948_482,
        };
        let with_sentinels = line(&sentinel)?;
        let mut holes = Vec::new();
        let mut bytes = Vec::with_capacity(with_sentinels.len());
        let mut found = Vec::new();
        for hole in HOLES {
            let mut written = Vec::new();
            hole.write(format, &sentinel, &mut written);
            if let Some(start) = find(&with_sentinels, &written, 0) {
                // Twice: not one hole. Leave it to the slow path.
                if find(&with_sentinels, &written, start + 1).is_some() {
                    return None;
                }
                found.push((start, written.len(), hole));
            }
        }
        found.sort_by_key(|&(start, _, _)| start);
        let mut at = 0;
        for &(start, len, hole) in &found {
            // Overlapping sentinels: not holes.
            if start < at {
                return None;
            }
            bytes.extend_from_slice(&with_sentinels[at..start]);
            holes.push((bytes.len(), hole));
            at = start + len;
        }
        bytes.extend_from_slice(&with_sentinels[at..]);
        let template = Template {
            node: formatter.ocsf_node().to_string(),
            bytes,
            holes,
        };
        // The check: small values and empty strings (a format that leaves a field out for
        // them, or writes them differently, shows here), then others.
        let checks = [
            Values {
                time: Time(SystemTime::UNIX_EPOCH),
                count: 1,
                pid: 0,
                comm: "",
                seq: 1,
            },
            Values {
                time: Time(SystemTime::UNIX_EPOCH + Duration::new(1_764_864_000, 7)),
                count: 2,
                pid: 1,
                comm: "a\"b\\c\u{7f}\u{e9}\u{fffd}",
                seq: 2,
            },
        ];
        for values in &checks {
            let mut rendered = Vec::new();
            template.render_values(format, values, &mut rendered);
            if line(values)? != rendered {
                return None;
            }
        }
        Some(template)
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// A key's templates, one per format, made on the key's second line (a key seen once, as
/// most `ingress` keys with their peer's port are, costs no template). A copy of the facts
/// starts without templates: they were made from the facts before the copy was changed.
#[derive(Debug, Default)]
pub(crate) struct Templates {
    uses: [AtomicU32; 2],
    made: [OnceLock<Option<Arc<Template>>>; 2],
}

impl Clone for Templates {
    fn clone(&self) -> Self {
        Templates::default()
    }
}

/// `format`'s place in [`Templates`] (a new format does not compile until it has one).
fn slot(format: Format) -> usize {
    match format {
        Format::Json => 0,
        Format::Ocsf => 1,
    }
}

impl Templates {
    /// `call`'s line through its key's template in `formatter`'s format, appended to `out`;
    /// false (nothing written) where there is none.
    pub(super) fn render(
        &self,
        formatter: &Formatter,
        call: &DeniedCall,
        seq: u64,
        out: &mut Vec<u8>,
    ) -> bool {
        let format = formatter.format();
        let at = slot(format);
        let template = match self.made[at].get() {
            Some(template) => template,
            // The first line of a key takes the slow path: most keys have one line only.
            None if self.uses[at].fetch_add(1, Ordering::Relaxed) == 0 => return false,
            None => self.made[at].get_or_init(|| Template::make(formatter, call).map(Arc::new)),
        };
        match template {
            Some(template) if template.node == formatter.ocsf_node() => {
                template.render(format, call, seq, out);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
impl Templates {
    /// Whether this key has a template in `format` (made and checked).
    pub(super) fn made(&self, format: Format) -> bool {
        matches!(self.made[slot(format)].get(), Some(Some(_)))
    }
}

//! `enforcer events --since`: the events older than the in-memory history, read back from the
//! events file (`--events FILE`) and its rotated copies `FILE.1` ... `FILE.<keep>`.
//!
//! Two passes over the files, both in blocks, so memory stays bounded whatever their size:
//!
//! 1. Backwards from the end of `FILE` (then `FILE.1`, ...), reading only each line's time and
//!    `seq`: skip the lines the history holds, find where the history's older neighbour ends
//!    (the *seam*) and where the asked window begins.
//! 2. Forwards from that beginning to the seam, sending each line whose own time is in the
//!    window and which the filter matches, verbatim.
//!
//! The seam is found by `seq`: every line carries its place in this agent's stream (JSON
//! `seq`, OCSF `metadata.sequence`), 1 at the agent's start. The file's newest lines are this
//! agent's (seq going down as the scan goes back); those at or above the history's oldest
//! `seq` are in the history and skipped. A `seq` that goes *up* going back is an earlier
//! agent's last line: from there on every line is older than anything the history holds.
//!
//! Files are opened newest first and told apart by inode, so a rotation during the request
//! (which renames `FILE` to `FILE.1` and so on up) shows each file once and loses none but
//! the one rotation deletes. A request reads at most [`MAX_READ`] bytes; what lies beyond is
//! told to the consumer in-band ([`Outcome::Capped`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::stream::Filter;
use super::{rotated_path, Format, Rotation, Written};

/// Bytes one request may read from the files, both passes together.
pub const MAX_READ: u64 = 512 << 20;
/// Block read at a time.
const BLOCK: usize = 64 << 10;
/// Longest line considered; a longer one (a `policy.rejected` with a huge error list) is
/// skipped, not held.
const MAX_LINE: usize = 4 << 20;
/// How far before the window's start the backward scan goes on. A line's time is when the
/// event happened, not when it was written: a kernel aggregation summary carries its window's
/// end (at most a few seconds before it is written), so lines are only roughly in time order.
const SLACK: Duration = Duration::from_secs(120);

/// The events file of the agent, as `enforcer run` writes it.
#[derive(Debug, Clone)]
pub struct Archive {
    pub path: PathBuf,
    pub format: Format,
    pub keep: u32,
}

impl Archive {
    /// The archive behind `--events`; none for standard output.
    pub fn of_output(events: &str, format: Format, rotation: Rotation) -> Option<Archive> {
        (events != "-").then(|| Archive {
            path: PathBuf::from(events),
            format,
            // Without rotation there are no `FILE.n` of this agent's; older ones of an
            // earlier configuration are read too if present (up to the default keep).
            keep: if rotation.max_bytes.is_some() {
                rotation.keep
            } else {
                Rotation::DEFAULT_KEEP
            },
        })
    }
}

/// How a read of the archive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every line of the window that the files still hold was sent.
    Complete,
    /// The window starts before the oldest line the files still hold.
    Exhausted,
    /// [`MAX_READ`] was reached going back: lines older than those sent were not read.
    Capped,
}

/// What [`read_since`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBack {
    pub outcome: Outcome,
    /// Whether the marked line was found (true without a mark): if not, nothing was sent.
    pub found: bool,
    /// Lines in what was to be sent that are not events in the archive's format, so were
    /// not sent: a line an agent was killed while writing (ended by the next agent's
    /// newline), lines an agent wrote in the other format into the same file, a line longer
    /// than [`MAX_LINE`]. Told to the consumer ([`unreadable_line`]): each may be an event.
    pub unreadable: u64,
}

/// Where the history begins, as the hub saw it under its lock.
#[derive(Debug, Clone, Copy)]
pub struct Seam {
    /// The oldest `seq` in the history; lines of this agent at or above it are skipped.
    pub oldest_seq: u64,
    /// Whether this agent has emitted anything: if not, the file's tail is an earlier
    /// agent's, and nothing is skipped.
    pub emitted: bool,
    /// Where the lines of what was published end: what is written after (by the time the
    /// files are read) is not read, since it reaches the consumer through its subscription
    /// (the agent writes a batch, then publishes it).
    pub written: Option<Written>,
}

/// A line's place and time, as far as the scan needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    /// Index into the opened files, oldest first.
    file: usize,
    offset: u64,
}

#[derive(Deserialize)]
struct JsonHead {
    time: Option<String>,
    seq: Option<u64>,
}

#[derive(Deserialize)]
struct OcsfMeta {
    sequence: Option<u64>,
}

#[derive(Deserialize)]
struct OcsfHead {
    /// Milliseconds since the epoch.
    time: Option<i64>,
    metadata: Option<OcsfMeta>,
}

/// A line's mark: FNV-1a (64 bits) of its bytes, without the `\n`. A follower names the last
/// line it printed by its mark and time, so that a stream taken up again (from the same agent
/// or after a restart) sends the files' lines after that one and no line twice; lines are
/// unique (each has its agent's `seq` and its time), so a mark names one line.
pub fn line_mark(line: &[u8]) -> u64 {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A line's time and `seq`, in either format; none for a line that is not an event of ours.
pub(super) fn head(format: Format, line: &[u8]) -> Option<(SystemTime, u64)> {
    match format {
        Format::Json => {
            let head: JsonHead = serde_json::from_slice(line).ok()?;
            let time = humantime::parse_rfc3339(head.time.as_deref()?).ok()?;
            Some((time, head.seq?))
        }
        Format::Ocsf => {
            let head: OcsfHead = serde_json::from_slice(line).ok()?;
            let millis = u64::try_from(head.time?).ok()?;
            let time = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
            Some((time, head.metadata?.sequence?))
        }
    }
}

/// The fields of a written line that a [`Filter`] looks at, from either format.
#[derive(Debug, Default)]
struct Fields {
    kind: Option<String>,
    /// A call (`connection.*`), a flow (`flow.*`), a workload's suppressed denies
    /// (`events.suppressed`), or none of these (the agent's other notices).
    call: bool,
    flow: bool,
    suppressed: bool,
    tenant: Option<String>,
    workload: Option<String>,
    to_name: Option<String>,
    to_ip: Option<String>,
    /// A call's destination tenant, and whether it was refused at `ingress` (then the
    /// tenant and workload filters also select it by its destination).
    to_tenant: Option<String>,
    ingress: bool,
    reason: Option<String>,
    verdict: Option<String>,
    atlas: Vec<String>,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

impl Fields {
    fn of(format: Format, v: &Value) -> Fields {
        let kind = match format {
            Format::Json => text(&v["type"]),
            Format::Ocsf => text(&v["metadata"]["event_code"]),
        };
        let call = kind
            .as_deref()
            .is_some_and(|k| k.starts_with("connection."));
        // `flow_events.lost` is a notice.
        let flow = kind.as_deref().is_some_and(|k| k.starts_with("flow."));
        // A workload's suppressed denies or flow events (the latter with no reason or
        // verdict): selected by the workload's filters.
        let suppressed = matches!(
            kind.as_deref(),
            Some("events.suppressed" | "flow_events.suppressed")
        );
        let mut fields = match format {
            // Its subject and reason are top-level (JSON) or under `unmapped` (OCSF).
            Format::Json if suppressed => Fields {
                tenant: text(&v["tenant"]),
                workload: text(&v["workload"]),
                reason: text(&v["reason"]),
                verdict: text(&v["verdict"]),
                ..Fields::default()
            },
            Format::Ocsf if suppressed => Fields {
                tenant: text(&v["unmapped"]["tenant"]),
                workload: text(&v["unmapped"]["workload"]),
                reason: text(&v["unmapped"]["reason"]),
                verdict: text(&v["unmapped"]["verdict"]),
                ..Fields::default()
            },
            Format::Json => Fields {
                tenant: text(&v["subject"]["tenant"]),
                workload: text(&v["subject"]["workload"]),
                to_name: text(&v["destination"]["name"]),
                to_ip: text(&v["destination"]["ip"]),
                to_tenant: text(&v["destination"]["tenant"]),
                ingress: v["hook"] == "ingress",
                reason: text(&v["reason"]).or_else(|| text(&v["flow"]["reason"])),
                verdict: text(&v["verdict"]),
                atlas: v["atlas"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|t| text(&t["id"])).collect())
                    .unwrap_or_default(),
                ..Fields::default()
            },
            // Where `ocsf::call` and `ocsf::flow` put them (`unmapped` keeps the JSON names).
            Format::Ocsf => Fields {
                tenant: text(&v["unmapped"]["subject"]["tenant"]),
                workload: text(&v["src_endpoint"]["name"]),
                to_name: text(&v["dst_endpoint"]["name"]),
                to_ip: text(&v["dst_endpoint"]["ip"]),
                to_tenant: text(&v["unmapped"]["destination"]["tenant"]),
                ingress: v["unmapped"]["hook"] == "ingress",
                reason: text(&v["unmapped"]["reason"])
                    .or_else(|| text(&v["unmapped"]["flow"]["reason"])),
                verdict: text(&v["unmapped"]["verdict"]),
                atlas: v["attacks"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .flat_map(|t| {
                                [
                                    text(&t["technique"]["uid"]),
                                    text(&t["sub_technique"]["uid"]),
                                ]
                            })
                            .flatten()
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Fields::default()
            },
        };
        fields.kind = kind;
        fields.call = call;
        fields.flow = flow;
        fields.suppressed = suppressed;
        fields
    }

    /// The same rules as [`Filter::matches`] on the structured event.
    fn matches(&self, filter: &Filter) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_deref().is_none_or(|w| have.as_deref() == Some(w))
        };
        if !eq(&filter.kind, &self.kind) {
            return false;
        }
        let to = || {
            filter.to.as_deref().is_none_or(|to| {
                self.to_name.as_deref() == Some(to) || self.to_ip.as_deref() == Some(to)
            })
        };
        if self.call {
            let on = |tenant: &Option<String>, workload: &Option<String>| {
                eq(&filter.tenant, tenant) && eq(&filter.workload, workload)
            };
            let by_destination = self.ingress
                && (filter.tenant.is_some() || filter.workload.is_some())
                && on(&self.to_tenant, &self.to_name);
            (on(&self.tenant, &self.workload) || by_destination)
                && to()
                && eq(&filter.reason, &self.reason)
                && eq(&filter.verdict, &self.verdict)
                && filter.atlas.as_deref().is_none_or(|id| {
                    self.atlas
                        .iter()
                        .any(|t| t == id || t.strip_prefix(id).is_some_and(|r| r.starts_with('.')))
                })
        } else if self.suppressed {
            // As `Filter::matches` on `Notice::EventsSuppressed`: a workload's filters
            // select them as its denies (no destination: the overflow has none).
            eq(&filter.tenant, &self.tenant)
                && eq(&filter.workload, &self.workload)
                && eq(&filter.reason, &self.reason)
                && eq(&filter.verdict, &self.verdict)
                && filter.to.is_none()
                && filter.atlas.is_none()
        } else if self.flow {
            eq(&filter.tenant, &self.tenant)
                && eq(&filter.workload, &self.workload)
                && to()
                && eq(&filter.reason, &self.reason)
                && filter.verdict.is_none()
                && filter.atlas.is_none()
        } else {
            filter.tenant.is_none()
                && filter.workload.is_none()
                && filter.to.is_none()
                && filter.reason.is_none()
                && filter.verdict.is_none()
                && filter.atlas.is_none()
        }
    }
}

/// Reads and drops the rest of an over-long line, up to and including its newline, a buffer
/// at a time (never the whole line at once).
fn skip_line(reader: &mut impl std::io::BufRead) -> std::io::Result<()> {
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(());
        }
        match buffer.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buffer.len();
                reader.consume(n);
            }
        }
    }
}

/// The files, oldest first, each with the length it had when opened (what is written after
/// is newer than the history's start, so never needed).
/// An opened file of the archive: its length and (device, inode).
type Opened = (File, u64, (u64, u64));

/// The files, oldest first.
fn open_files(archive: &Archive) -> Result<Vec<Opened>> {
    let mut seen = Vec::new();
    let mut files = Vec::new();
    let paths = std::iter::once(archive.path.clone())
        .chain((1..=archive.keep).map(|n| rotated_path(&archive.path, n)));
    for path in paths {
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        // A rotation between two opens shifts the names up: the same file again.
        if seen.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        seen.push((meta.dev(), meta.ino()));
        files.push((file, meta.len(), (meta.dev(), meta.ino())));
    }
    files.reverse();
    Ok(files)
}

/// Reads one file backwards in blocks, handing each whole line (without its `\n`) and the
/// offset it starts at to `each`, newest first, until `each` returns false. Reads at most
/// about `budget` bytes. Returns the bytes read and whether `each` stopped the scan.
fn lines_backwards(
    file: &mut File,
    len: u64,
    budget: u64,
    mut each: impl FnMut(u64, &[u8]) -> bool,
) -> Result<(u64, bool)> {
    let mut end = len;
    let mut read = 0u64;
    // The start of the line that continues into the block after this one (in file order),
    // up to and including its `\n`: the block plus this ends with a `\n`.
    let mut carry: Vec<u8> = Vec::new();
    // Until the first `\n` from the end: a line still being written is not an event yet.
    let mut tail = true;
    while end > 0 {
        if read >= budget {
            return Ok((read, false));
        }
        let start = end.saturating_sub(BLOCK as u64);
        let mut block = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        read += block.len() as u64;
        end = start;
        if tail {
            match block.iter().rposition(|&b| b == b'\n') {
                Some(i) => {
                    block.truncate(i + 1);
                    tail = false;
                }
                None => continue,
            }
        }
        block.extend_from_slice(&carry);
        // `line_end` is the index of a line's `\n`.
        let mut line_end = block.len() - 1;
        while let Some(p) = block[..line_end].iter().rposition(|&b| b == b'\n') {
            if !each(start + p as u64 + 1, &block[p + 1..line_end]) {
                return Ok((read, true));
            }
            line_end = p;
        }
        if start == 0 {
            if !each(0, &block[..line_end]) {
                return Ok((read, true));
            }
        } else if line_end < MAX_LINE {
            carry = block[..=line_end].to_vec();
        } else {
            // A line over MAX_LINE is not held: its head is read as a line of its own,
            // which `head` refuses, so it is skipped.
            carry = vec![b'\n'];
        }
    }
    Ok((read, false))
}

/// Sends, through `send`, the archived lines the history does not hold whose time is at or
/// after `since` and which `filter` matches, oldest first; with `after` (a [`line_mark`]),
/// instead those after the line of that mark, whatever their time. `send` gets whole lines
/// with their `\n`, in chunks of bounded size.
pub fn read_since(
    archive: &Archive,
    since: SystemTime,
    after: Option<u64>,
    filter: &Filter,
    seam: Seam,
    mut send: impl FnMut(Vec<u8>) -> Result<()>,
) -> Result<ReadBack> {
    let found = after.is_none();
    let mut files = open_files(archive)?;
    if let Some(w) = seam.written {
        if let Some(at) = files.iter().position(|(_, _, id)| *id == (w.dev, w.ino)) {
            files.truncate(at + 1);
            files[at].1 = files[at].1.min(w.len);
        }
    }
    let mut files: Vec<(File, u64)> = files.into_iter().map(|(f, len, _)| (f, len)).collect();
    let stop_before = since.checked_sub(SLACK).unwrap_or(SystemTime::UNIX_EPOCH);
    // Backward pass.
    let mut budget = MAX_READ;
    // Whether the scan is still in this agent's lines that the history holds.
    let mut skipping = seam.emitted;
    let mut in_this_agent = seam.emitted;
    let mut last_seq: Option<u64> = None;
    // Just after the newest line to send, and the start of the oldest line in the window.
    let mut end: Option<Pos> = None;
    let mut begin: Option<Pos> = None;
    // Lines that are not events between `end` and the history's lines (or the files' end):
    // after the span the forward pass reads, yet in the consumer's way. The half line of an
    // agent killed while writing lies there, just before the next agent's first line.
    let mut unreadable_after_end = 0;
    let mut outcome = Outcome::Exhausted;
    for index in (0..files.len()).rev() {
        let (file, len) = &mut files[index];
        let mut done = false;
        let (read, stopped) = lines_backwards(file, *len, budget, |offset, line| {
            let Some((time, seq)) = head(archive.format, line) else {
                unreadable_after_end += u64::from(end.is_none());
                return true;
            };
            if last_seq.is_some_and(|last| seq >= last) {
                // An earlier agent's last line: nothing from here on is in the history.
                in_this_agent = false;
                skipping = false;
            }
            last_seq = Some(seq);
            if skipping && in_this_agent && seq >= seam.oldest_seq {
                // Sent from the history, and so is anything newer.
                unreadable_after_end = 0;
                return true;
            }
            skipping = false;
            if end.is_none() {
                end = Some(Pos {
                    file: index,
                    offset: offset + line.len() as u64 + 1,
                });
            }
            if let Some(mark) = after {
                // Taken up after a line: back to that line, whatever the times (lines are
                // only roughly in time order: a summary carries its window's end, written
                // a window later); MAX_READ bounds the scan.
                if line_mark(line) == mark {
                    begin = Some(Pos {
                        file: index,
                        offset,
                    });
                    done = true;
                    return false;
                }
                return true;
            }
            if time < stop_before {
                done = true;
                return false;
            }
            if time >= since {
                begin = Some(Pos {
                    file: index,
                    offset,
                });
            }
            true
        })?;
        budget -= read.min(budget);
        if done {
            outcome = Outcome::Complete;
            break;
        }
        if !stopped && budget == 0 {
            outcome = Outcome::Capped;
            break;
        }
    }
    let mut read = ReadBack {
        outcome,
        found,
        unreadable: unreadable_after_end,
    };
    let (Some(begin), Some(end)) = (begin, end) else {
        return Ok(read);
    };
    // Forward pass, from `begin` to `end`.
    let mut chunk = Vec::with_capacity(BLOCK * 4);
    for (index, (file, len)) in files.iter_mut().enumerate() {
        if index < begin.file || index > end.file {
            continue;
        }
        let from = if index == begin.file { begin.offset } else { 0 };
        let to = if index == end.file { end.offset } else { *len };
        file.seek(SeekFrom::Start(from))?;
        let mut reader =
            std::io::BufReader::with_capacity(BLOCK, Read::take(&mut *file, to - from));
        let mut line = Vec::new();
        loop {
            line.clear();
            // At most MAX_LINE + 1 bytes of one line in memory: a longer one (a hostile or
            // corrupt file) is skipped up to its newline without being held.
            let n = std::io::BufRead::read_until(
                &mut Read::take(&mut reader, MAX_LINE as u64 + 1),
                b'\n',
                &mut line,
            )?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                if line.len() > MAX_LINE {
                    skip_line(&mut reader)?;
                    read.unreadable += u64::from(read.found);
                }
                continue;
            }
            if !read.found {
                // The line the consumer printed last (where the backward pass began): sent
                // before.
                read.found = after == Some(line_mark(&line));
                continue;
            }
            let Some((time, _)) = head(archive.format, &line[..line.len() - 1]) else {
                read.unreadable += 1;
                continue;
            };
            // After a marked line every line is new to the consumer, however old its time.
            if after.is_none() && time < since {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<Value>(&line) else {
                read.unreadable += 1;
                continue;
            };
            if !Fields::of(archive.format, &value).matches(filter) {
                continue;
            }
            chunk.extend_from_slice(&line);
            if chunk.len() >= BLOCK * 4 {
                send(std::mem::replace(&mut chunk, Vec::with_capacity(BLOCK * 4)))?;
            }
        }
    }
    if !chunk.is_empty() {
        send(chunk)?;
    }
    Ok(read)
}

/// The in-band line telling a consumer how many lines of the files could not be sent
/// ([`ReadBack::unreadable`]).
pub fn unreadable_line(count: u64, format: Format) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "type": "events.unreadable",
        "count": count,
        "message": format!(
            "{count} line(s) of the events files are not {} events and were not sent: cut \
             short by an agent killed while writing, written in another format, or longer \
             than {} MiB; each may have been an event",
            format.name(),
            MAX_LINE >> 20
        ),
    }))
    .expect("a JSON object of strings and numbers serialises");
    line.push(b'\n');
    line
}

/// The in-band line telling a consumer that its window starts before what could be sent.
pub fn truncated_line(why: &str, oldest_seq: Option<u64>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "type": "events.truncated",
        "message": why,
        "history_oldest_seq": oldest_seq,
    }))
    .expect("a JSON object of strings and numbers serialises");
    line.push(b'\n');
    line
}

/// For the tests: appends `lines` to `path`.
#[cfg(test)]
fn write_lines(path: &std::path::Path, lines: &[String]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, secs: u64, tenant: &str) -> String {
        let time = humantime::format_rfc3339_nanos(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs),
        );
        format!(
            r#"{{"time":"{time}","type":"connection.denied","verdict":"deny","reason":"no_permit","subject":{{"tenant":"{tenant}","workload":"w"}},"destination":{{"ip":"127.92.0.1","port":1}},"pad":"{}","seq":{seq}}}"#,
            "x".repeat((seq % 97) as usize)
        )
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn seqs(archive: &Archive, since: u64, filter: &Filter, seam: Seam) -> (Vec<u64>, Outcome) {
        let mut out = Vec::new();
        let read = read_since(archive, at(since), None, filter, seam, |chunk| {
            out.extend_from_slice(&chunk);
            Ok(())
        })
        .unwrap();
        (seqs_of(&out), read.outcome)
    }

    /// The `seq`s of the JSON lines `read_since` sent.
    fn seqs_of(sent: &[u8]) -> Vec<u64> {
        std::str::from_utf8(sent)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn the_file_answers_up_to_the_history_across_rotated_files_and_earlier_agents() {
        let dir = std::env::temp_dir().join(format!("ev-archive-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        // An earlier agent: seq 1..=300 at seconds 0..300; this agent: seq 1..=5000 at
        // seconds 1000.. (one line a second, so `since` picks a start exactly). Long blocks
        // of lines cross BLOCK boundaries.
        let earlier: Vec<String> = (1..=300).map(|s| line(s, s, "acme")).collect();
        let this: Vec<String> = (1..=5000)
            .map(|s| line(s, 1000 + s, if s % 2 == 0 { "acme" } else { "globex" }))
            .collect();
        write_lines(&rotated_path(&path, 2), &earlier);
        write_lines(&rotated_path(&path, 1), &this[..2000]);
        write_lines(&path, &this[2000..]);
        let archive = Archive {
            path: path.clone(),
            format: Format::Json,
            keep: 5,
        };
        let seam = Seam {
            oldest_seq: 4001,
            written: None,
            emitted: true,
        };
        let all = Filter::default();
        // The window starts in this agent's lines, in FILE.1.
        let (got, outcome) = seqs(&archive, 1000 + 1500, &all, seam);
        assert_eq!(got, (1500..=4000).collect::<Vec<_>>());
        assert_eq!(outcome, Outcome::Complete);
        // It starts in the earlier agent's file: its lines, then this agent's up to the seam.
        let (got, outcome) = seqs(&archive, 100, &all, seam);
        let expected: Vec<u64> = (100..=300).chain(1..=4000).collect();
        assert_eq!(got, expected);
        assert_eq!(outcome, Outcome::Exhausted);
        // Filters apply.
        let globex = Filter {
            tenant: Some("globex".into()),
            ..Filter::default()
        };
        let (got, _) = seqs(&archive, 1000 + 3990, &globex, seam);
        assert_eq!(got, vec![3991, 3993, 3995, 3997, 3999]);
        // An agent that emitted nothing yet: the tail is the earlier agent's, all sent.
        let fresh = Seam {
            oldest_seq: 1,
            written: None,
            emitted: false,
        };
        let (got, _) = seqs(&archive, 1000 + 4990, &all, fresh);
        assert_eq!(got, (4990..=5000).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Taken up after a marked line (a follower's last): every line after it, whatever its
    /// time (a summary carries its window's end and is written a window later; a clock
    /// stepped back), none up to it, and none written after what was published when the
    /// stream opened (those reach the follower through its subscription). Before, lines
    /// after the mark older than its time were dropped, and a line older than the window's
    /// slack stopped the scan before the mark: silent gaps.
    #[test]
    fn after_a_marked_line_every_later_line_whatever_its_time_up_to_what_was_written() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ev-archive-mark-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut lines: Vec<String> = (1..=100).map(|s| line(s, 1000 + s, "acme")).collect();
        // After the mark (seq 50): a summary of an earlier window, and a line from a clock
        // stepped back far beyond the slack.
        lines[50] = line(51, 1000 + 40, "acme");
        lines[59] = line(60, 10, "acme");
        write_lines(&path, &lines);
        let mark = line_mark(lines[49].as_bytes());
        let meta = std::fs::metadata(&path).unwrap();
        // This agent had published nothing when the stream opened; it writes a line after.
        let seam = Seam {
            oldest_seq: 1,
            emitted: false,
            written: Some(Written {
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
            }),
        };
        write_lines(&path, &[line(1, 2000, "acme")]);
        let archive = Archive {
            path: path.clone(),
            format: Format::Json,
            keep: 1,
        };
        let read = |mark: u64| {
            let mut out = Vec::new();
            let read = read_since(
                &archive,
                at(1000 + 50),
                Some(mark),
                &Filter::default(),
                seam,
                |chunk| {
                    out.extend_from_slice(&chunk);
                    Ok(())
                },
            )
            .unwrap();
            (seqs_of(&out), read.found)
        };
        assert_eq!(read(mark), ((51..=100).collect::<Vec<_>>(), true));
        // A mark the files do not hold: nothing sent, and said.
        assert_eq!(read(mark ^ 1), (Vec::new(), false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lines the reader cannot take for events (half a line a killed agent left, ended by the
    /// next agent's newline; an OCSF line in a JSON file) are not sent, and counted, after a
    /// mark as in a window: before, they were skipped without a word, and a follower taken
    /// up after a restart never learnt that events may be missing there (red team 23, F1).
    #[test]
    fn lines_that_are_not_events_are_counted_not_sent() {
        let dir = std::env::temp_dir().join(format!("ev-archive-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut lines: Vec<String> = (1..=10).map(|s| line(s, 1000 + s, "acme")).collect();
        lines.push(line(11, 1011, "acme")[..40].to_string());
        lines.push(r#"{"time":1800001012000,"metadata":{"sequence":1}}"#.to_string());
        lines.extend((1..=5).map(|s| line(s, 1020 + s, "acme")));
        write_lines(&path, &lines);
        let archive = Archive {
            path,
            format: Format::Json,
            keep: 1,
        };
        let seam = Seam {
            oldest_seq: 1,
            emitted: false,
            written: None,
        };
        let read = |since: u64, mark: Option<u64>| {
            let mut out = Vec::new();
            let read = read_since(&archive, at(since), mark, &Filter::default(), seam, |c| {
                out.extend_from_slice(&c);
                Ok(())
            })
            .unwrap();
            (seqs_of(&out), read.found, read.unreadable)
        };
        let mark = line_mark(lines[4].as_bytes());
        assert_eq!(
            read(0, Some(mark)),
            (vec![6, 7, 8, 9, 10, 1, 2, 3, 4, 5], true, 2)
        );
        assert_eq!(read(0, None).2, 2, "a window counts them too");
        // Not in the window, not counted.
        assert_eq!(read(1021, None), ((1..=5).collect(), true, 0));

        // A restart as it happens: the killed agent's half line, then the new agent's lines,
        // which its history holds (sent from there, not from the files). The half line lies
        // after the span read forward, and is counted all the same; so is one at the files'
        // end before the new agent wrote anything.
        let path = dir.join("restart.jsonl");
        let mut lines: Vec<String> = (1..=10).map(|s| line(s, 1000 + s, "acme")).collect();
        lines.push(line(11, 1011, "acme")[..40].to_string());
        write_lines(&path, &lines);
        let archive = Archive {
            path: path.clone(),
            format: Format::Json,
            keep: 1,
        };
        let mark = line_mark(lines[4].as_bytes());
        let read = |seam: Seam| {
            let mut out = Vec::new();
            let read = read_since(&archive, at(0), Some(mark), &Filter::default(), seam, |c| {
                out.extend_from_slice(&c);
                Ok(())
            })
            .unwrap();
            (seqs_of(&out), read.found, read.unreadable)
        };
        assert_eq!(read(seam), (vec![6, 7, 8, 9, 10], true, 1));
        write_lines(
            &path,
            &(1..=5)
                .map(|s| line(s, 1020 + s, "acme"))
                .collect::<Vec<_>>(),
        );
        let held = Seam {
            oldest_seq: 1,
            emitted: true,
            written: None,
        };
        assert_eq!(read(held), (vec![6, 7, 8, 9, 10], true, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ocsf_lines_give_time_seq_and_filter_fields() {
        let line = br#"{"time":1800000000123,"metadata":{"sequence":42,"event_code":"connection.denied"},"src_endpoint":{"name":"rag"},"dst_endpoint":{"ip":"127.92.0.9"},"attacks":[{"technique":{"uid":"AML.T0024"},"sub_technique":{"uid":"AML.T0024.001"}}],"unmapped":{"verdict":"deny","reason":"no_permit","subject":{"tenant":"acme"}}}"#;
        let (time, seq) = head(Format::Ocsf, line).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(time, at(0) + Duration::from_millis(123));
        let fields = Fields::of(Format::Ocsf, &serde_json::from_slice(line).unwrap());
        let yes = Filter {
            tenant: Some("acme".into()),
            workload: Some("rag".into()),
            to: Some("127.92.0.9".into()),
            atlas: Some("AML.T0024".into()),
            verdict: Some("deny".into()),
            reason: Some("no_permit".into()),
            kind: Some("connection.denied".into()),
        };
        assert!(fields.matches(&yes));
        let no = Filter {
            tenant: Some("globex".into()),
            ..Filter::default()
        };
        assert!(!fields.matches(&no));
    }

    #[test]
    fn a_workloads_filters_select_its_suppressed_flow_events_in_the_file_in_both_formats() {
        let json = br#"{"type":"flow_events.suppressed","workload":"rag","tenant":"acme","identity":7,"opened":9,"closed":9}"#;
        let ocsf = br#"{"metadata":{"event_code":"flow_events.suppressed"},"unmapped":{"workload":"rag","tenant":"acme","identity":7,"opened":9,"closed":9}}"#;
        for (format, line) in [(Format::Json, &json[..]), (Format::Ocsf, &ocsf[..])] {
            let fields = Fields::of(format, &serde_json::from_slice(line).unwrap());
            let acme = Filter {
                tenant: Some("acme".into()),
                workload: Some("rag".into()),
                ..Filter::default()
            };
            assert!(fields.matches(&acme), "{format:?}");
            for other in [
                Filter {
                    tenant: Some("globex".into()),
                    ..Filter::default()
                },
                Filter {
                    reason: Some("no_permit".into()),
                    ..Filter::default()
                },
            ] {
                assert!(!fields.matches(&other), "{format:?} {other:?}");
            }
        }
    }

    #[test]
    fn a_workloads_filters_select_its_suppressed_notices_in_the_file_in_both_formats() {
        let json = br#"{"type":"events.suppressed","workload":"rag","tenant":"acme","reason":"no_permit","verdict":"deny","count":9}"#;
        let ocsf = br#"{"metadata":{"event_code":"events.suppressed"},"unmapped":{"workload":"rag","tenant":"acme","reason":"no_permit","verdict":"deny","count":9}}"#;
        for (format, line) in [(Format::Json, &json[..]), (Format::Ocsf, &ocsf[..])] {
            let fields = Fields::of(format, &serde_json::from_slice(line).unwrap());
            let acme = Filter {
                tenant: Some("acme".into()),
                workload: Some("rag".into()),
                reason: Some("no_permit".into()),
                verdict: Some("deny".into()),
                ..Filter::default()
            };
            assert!(fields.matches(&acme), "{format:?}");
            for other in [
                Filter {
                    tenant: Some("globex".into()),
                    ..Filter::default()
                },
                Filter {
                    to: Some("127.92.0.9".into()),
                    ..Filter::default()
                },
            ] {
                assert!(!fields.matches(&other), "{format:?} {other:?}");
            }
        }
    }

    /// As `Filter::matches`: an ingress refusal is selected by either end, tenant and
    /// workload on the same end; other calls only by their subject.
    #[test]
    fn ingress_lines_are_selected_by_either_end_in_both_formats() {
        let json = br#"{"type":"connection.denied","hook":"ingress","verdict":"deny","reason":"not_allowed","subject":{"tenant":"acme","workload":"rag"},"destination":{"name":"globex-vectors","tenant":"globex","ip":"127.92.0.9"}}"#;
        let ocsf = br#"{"metadata":{"event_code":"connection.denied"},"src_endpoint":{"name":"rag"},"dst_endpoint":{"name":"globex-vectors","ip":"127.92.0.9"},"unmapped":{"hook":"ingress","verdict":"deny","reason":"not_allowed","subject":{"tenant":"acme"},"destination":{"tenant":"globex"}}}"#;
        let filter = |tenant: Option<&str>, workload: Option<&str>| Filter {
            tenant: tenant.map(str::to_string),
            workload: workload.map(str::to_string),
            ..Filter::default()
        };
        for (format, line) in [(Format::Json, &json[..]), (Format::Ocsf, &ocsf[..])] {
            let fields = Fields::of(format, &serde_json::from_slice(line).unwrap());
            for (f, want) in [
                (filter(Some("acme"), None), true),
                (filter(Some("globex"), None), true),
                (filter(Some("globex"), Some("globex-vectors")), true),
                (filter(Some("acme"), Some("rag")), true),
                (filter(Some("acme"), Some("globex-vectors")), false),
                (filter(Some("initech"), None), false),
            ] {
                assert_eq!(fields.matches(&f), want, "{format:?} {f:?}");
            }
        }
        // Not an ingress refusal: only its subject.
        let outbound = br#"{"type":"connection.denied","hook":"connect4","verdict":"deny","reason":"tenant_mismatch","subject":{"tenant":"acme","workload":"rag"},"destination":{"name":"globex-vectors","tenant":"globex","ip":"127.92.0.9"}}"#;
        let fields = Fields::of(Format::Json, &serde_json::from_slice(outbound).unwrap());
        assert!(!fields.matches(&filter(Some("globex"), None)));
    }

    #[test]
    fn a_line_longer_than_the_bound_is_skipped_without_losing_the_next() {
        let dir = std::env::temp_dir().join(format!("ev-archive-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let long = format!(
            r#"{{"time":"{}","type":"connection.denied","seq":2,"pad":"{}"}}"#,
            humantime::format_rfc3339_nanos(at(2)),
            "x".repeat(MAX_LINE + 10)
        );
        write_lines(&path, &[line(1, 1, "acme"), long, line(3, 3, "acme")]);
        let archive = Archive {
            path: path.clone(),
            format: Format::Json,
            keep: 1,
        };
        let seam = Seam {
            oldest_seq: 4,
            written: None,
            emitted: true,
        };
        let (got, _) = seqs(&archive, 0, &Filter::default(), seam);
        assert_eq!(got, vec![1, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The followers' shared ring: the events file's lines written once into shared memory that
//! every `enforcer events --follow` reading all events maps read-only.
//!
//! Why: a follower served through its socket queue costs the agent a copy of every line into
//! that queue and another into the socket, per follower: three followers reading everything
//! under a flood cost the agent 41-53 % more CPU per event. Through the ring the agent copies
//! each line once, whatever the number of followers, and sends each follower one byte per
//! batch ("there is more"); each follower copies what it reads on its own CPU time. This is
//! how the kernel hands records to the agent (the BPF ring buffer), one level up.
//!
//! The ring is a sealed memfd (`F_SEAL_FUTURE_WRITE`, `SHRINK`, `GROW`: a follower that got
//! its descriptor can map it for reading only, never write into what other followers read or
//! change its size), handed to a follower over the events socket (`SCM_RIGHTS`). Layout, in
//! this host's byte order (only processes on this host map it):
//!
//! - bytes `0..HEADER`: [`Header`];
//! - bytes `HEADER..HEADER + capacity`: the lines, as a byte stream; the byte at stream
//!   position `p` is at `HEADER + p % capacity`.
//!
//! Writer (one, the agent's emitter, under the hub's lock): for each line, first `reserved`
//! is set to the end of the bytes it is about to write, then the bytes are copied (wrapping);
//! after a batch, `written` and `next_seq` are published together under a seqlock
//! (`version` odd while they change).
//!
//! Reader: takes a consistent (`written`, `next_seq`) snapshot, copies the bytes between its
//! position and `written`, then reads `reserved`: if the writer may have begun overwriting
//! any byte it copied (`reserved > position + capacity`), the copy is thrown away and the
//! reader was lapped: it starts again at the oldest batch that the writer will not reach
//! for a quarter of the ring yet (the header keeps where the last [`INDEX`] batches begin),
//! and counts what it skipped by `seq` (every line is one event, numbered one after the
//! other), told in-band like a queue's misses ([`super::stream::Missed`]). A reader never
//! delivers a line it could not verify whole.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::mmap::Mapping;

use super::stream::Missed;

/// `ENFRING1`: what the first 8 bytes of a ring hold.
const MAGIC: u64 = u64::from_le_bytes(*b"ENFRING1");
/// Bytes before the lines (one page: the lines start page-aligned).
pub const HEADER: usize = 4096;
/// The smallest and largest ring the agent makes (`enforcer run --events-follow-buffer`).
pub const MIN_CAPACITY: usize = 1 << 20;
pub const MAX_CAPACITY: usize = 1 << 30;
/// The default: about 40,000 JSON or 15,000 OCSF deny lines, a follower descheduled for
/// 0.1-0.4 s under a flood of 100,000 events a second.
pub const DEFAULT_CAPACITY: usize = 32 << 20;
/// Batch starts kept in the header (a batch is about a millisecond of events under a flood).
const INDEX: usize = 128;
/// A publication takes a few stores: a reader that finds one unfinished this many times
/// running reads nothing for now and tries again at the next poke (an agent killed in the
/// middle of one sends none: its hang-up ends the stream).
const SNAPSHOT_TRIES: u32 = 10_000;

/// The ring's first bytes.
#[repr(C)]
struct Header {
    magic: u64,
    /// Bytes of lines the ring holds (its size less [`HEADER`]).
    capacity: u64,
    /// Odd while `written` and `next_seq` change.
    version: AtomicU64,
    /// Stream position after the last published line.
    written: AtomicU64,
    /// The `seq` of the line that starts at `written`.
    next_seq: AtomicU64,
    /// Stream position where the bytes being written now end: any byte before
    /// `reserved - capacity` may be overwritten.
    reserved: AtomicU64,
    /// Batches published, and where the last [`INDEX`] of them begin (stream position, the
    /// `seq` of their first line; entry `n % INDEX` for batch `n`): a lapped reader starts
    /// again at the oldest batch still whole, not at the newest line.
    batches: AtomicU64,
    index: [[AtomicU64; 2]; INDEX],
}

/// The ring's header, at the start of its mapping (page-aligned, at least HEADER bytes; the
/// fields that change are atomics).
fn header(map: &Mapping) -> &Header {
    // SAFETY: see above.
    unsafe { &*map.ptr().cast::<Header>() }
}

/// The ring's data, after its header.
fn data(map: &Mapping) -> *mut u8 {
    // SAFETY: within the mapping (len > HEADER).
    unsafe { map.ptr().add(HEADER) }
}

/// Maps a follow ring's memfd: the writer's pages all made now (`MAP_POPULATE`), when the
/// first follower comes: else each of the first lap's 8,192 page faults (a page allocated
/// and zeroed) came in the middle of a batch's copy, under the hub's lock.
fn map_ring(fd: BorrowedFd<'_>, len: usize, prot: ProtFlags) -> io::Result<Mapping> {
    let flags = if prot.contains(ProtFlags::WRITE) {
        MapFlags::POPULATE
    } else {
        MapFlags::empty()
    };
    Mapping::new(fd, len, prot, flags, 0)
}

/// The agent's side: appends lines, publishes batches.
pub struct Ring {
    memfd: OwnedFd,
    map: Mapping,
    capacity: u64,
    /// Stream position after the last line pushed (published or not).
    end: u64,
}

impl Ring {
    /// A ring of `capacity` bytes of lines ([`MIN_CAPACITY`]..=[`MAX_CAPACITY`]) whose first
    /// line will be event `next_seq`. Errors: the memfd could not be made, sized, mapped or
    /// sealed.
    pub fn new(capacity: usize, next_seq: u64) -> Result<Ring> {
        ensure!(
            (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity),
            "a follow ring of {capacity} bytes: expected {MIN_CAPACITY}..={MAX_CAPACITY}"
        );
        // Not executable, sealed so (Linux 6.3; without it where the flag is unknown: some
        // `vm.memfd_noexec` settings refuse a memfd that does not say).
        let name = "enforcer-events-ring";
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        let memfd = match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
            Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, flags),
            made => made,
        }
        .context("memfd_create")?;
        let len = HEADER + capacity;
        rustix::fs::ftruncate(&memfd, len as u64).context("sizing the follow ring")?;
        let map = map_ring(memfd.as_fd(), len, ProtFlags::READ | ProtFlags::WRITE)
            .context("mapping the follow ring")?;
        // SAFETY: nobody else has the memfd yet; the header's plain fields are written once,
        // before it is shared.
        unsafe {
            let header = map.ptr().cast::<Header>();
            (*header).magic = MAGIC;
            (*header).capacity = capacity as u64;
        }
        header(&map).next_seq.store(next_seq, Ordering::Release);
        // The agent's mapping keeps writing; nobody may map it for writing from now on, nor
        // change its size under the followers' mappings.
        rustix::fs::fcntl_add_seals(
            &memfd,
            SealFlags::FUTURE_WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )
        .context("sealing the follow ring")?;
        Ok(Ring {
            memfd,
            map,
            capacity: capacity as u64,
            end: 0,
        })
    }

    /// A ring made ahead, before anything was pushed: its first line will be event
    /// `next_seq` after all.
    pub fn begin_at(&mut self, next_seq: u64) {
        assert_eq!(
            self.end, 0,
            "a ring begins again only before its first line"
        );
        header(&self.map)
            .next_seq
            .store(next_seq, Ordering::Release);
    }

    /// The memfd to hand to a follower.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// What a follower that starts now reads first: (stream position, its event's `seq`).
    pub fn start(&self) -> (u64, u64) {
        let header = header(&self.map);
        (
            header.written.load(Ordering::Acquire),
            header.next_seq.load(Ordering::Acquire),
        )
    }

    /// Whether `line` fits: at most half the ring, so that a follower that has read
    /// everything before it still finds it whole with room to spare.
    pub fn fits(&self, line: &[u8]) -> bool {
        line.len() as u64 <= self.capacity / 2
    }

    /// Appends one whole line (its `\n` included; see [`Ring::fits`]), unpublished.
    pub fn push(&mut self, line: &[u8]) {
        // Checked, not assumed: a longer line would be copied past the mapping.
        assert!(
            self.fits(line),
            "a line of {} bytes in a ring of {}",
            line.len(),
            self.capacity
        );
        debug_assert!(line.ends_with(b"\n"));
        let header = header(&self.map);
        let start = self.end;
        self.end += line.len() as u64;
        header.reserved.store(self.end, Ordering::Relaxed);
        // Readers check `reserved` after their copy: the store must be seen before any of
        // the bytes. A full fence, not a release one: the copy may use non-temporal stores
        // (see `copy_to_ring`), which x86 orders only after an `mfence`/`sfence`; once per
        // push (per batch from the emitter).
        fence(Ordering::SeqCst);
        let at = (start % self.capacity) as usize;
        let first = line.len().min(self.capacity as usize - at);
        // SAFETY: both pieces lie within the data area (at + first <= capacity, and the
        // second starts at 0 with line.len() - first <= capacity / 2 bytes).
        unsafe {
            copy_to_ring(&line[..first], data(&self.map).add(at));
            copy_to_ring(&line[first..], data(&self.map));
        }
    }

    /// Makes what was pushed visible: followers read up to here, and learn that the line
    /// pushed next is event `next_seq`.
    pub fn publish(&mut self, next_seq: u64) {
        let header = header(&self.map);
        let start = header.written.load(Ordering::Relaxed);
        let first_seq = header.next_seq.load(Ordering::Relaxed);
        let version = header.version.load(Ordering::Relaxed);
        header.version.store(version + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        if self.end > start {
            let n = header.batches.load(Ordering::Relaxed);
            let [position, seq] = &header.index[n as usize % INDEX];
            position.store(start, Ordering::Relaxed);
            seq.store(first_seq, Ordering::Relaxed);
            header.batches.store(n + 1, Ordering::Relaxed);
        }
        header.written.store(self.end, Ordering::Relaxed);
        header.next_seq.store(next_seq, Ordering::Relaxed);
        header.version.store(version + 2, Ordering::Release);
    }
}

/// Copies of at least this many bytes go to the ring with non-temporal stores.
#[cfg(target_arch = "x86_64")]
const STREAMING_COPY: usize = 4096;

/// Copies `from` to `to`, which the caller owns for `from.len()` bytes. A batch (at least
/// [`STREAMING_COPY`] bytes, on x86-64) is written with non-temporal stores, which go to
/// memory without first reading the destination's cache lines: the ring is 32 MiB written
/// once per lap, so each line's destination is cold, and `memmove` read it from memory
/// before writing it (the ring's copy was 6-7 % of the agent's CPU under a flood with
/// followers; a batch copied 2-3 times faster this way on this machine, an AMD EPYC).
/// Ends with an `sfence` when it streamed: x86 orders non-temporal stores before later
/// ones (the publication of `written`) only after one.
///
/// # Safety
/// `to` is valid for writes of `from.len()` bytes and does not overlap `from`.
unsafe fn copy_to_ring(from: &[u8], to: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    if from.len() >= STREAMING_COPY {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // The stores need a 16-byte aligned destination: the head up to it, and the tail
        // after the last whole 16 bytes, are copied plainly.
        let head = to.align_offset(16).min(from.len());
        let body = (from.len() - head) & !15;
        // SAFETY: every access lies within `from` and `to[..from.len()]`; SSE2 is part of
        // the x86-64 baseline; `to.add(i)` is 16-byte aligned for i in head.. step 16.
        unsafe {
            std::ptr::copy_nonoverlapping(from.as_ptr(), to, head);
            let mut i = head;
            while i < head + body {
                let chunk = _mm_loadu_si128(from.as_ptr().add(i).cast::<__m128i>());
                _mm_stream_si128(to.add(i).cast::<__m128i>(), chunk);
                i += 16;
            }
            std::ptr::copy_nonoverlapping(from.as_ptr().add(i), to.add(i), from.len() - i);
            _mm_sfence();
        }
        return;
    }
    // SAFETY: as the caller promises.
    unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), to, from.len()) };
}

/// A follower's side: reads whole lines in order, and what it missed when lapped.
pub struct RingReader {
    map: Mapping,
    capacity: u64,
    /// Stream position of the next byte to copy.
    position: u64,
    /// The `seq` of the first line not delivered yet.
    next_seq: u64,
    /// Bytes copied after the last whole line delivered.
    carry: Vec<u8>,
}

impl RingReader {
    /// Maps `fd` (a ring from [`Ring::new`]) read-only to read from stream `position`, whose
    /// line is event `next_seq`. Errors: not a ring, or its size disagrees with its header.
    pub fn open(fd: OwnedFd, position: u64, next_seq: u64) -> Result<RingReader> {
        // Sealed as `Ring::new` seals it: else whoever handed it over could shrink it under
        // the mapping (a SIGBUS here) or others could write into it.
        let seals = rustix::fs::fcntl_get_seals(&fd).context("the follow ring's seals")?;
        let wanted = SealFlags::FUTURE_WRITE | SealFlags::SHRINK | SealFlags::GROW;
        ensure!(
            seals.contains(wanted),
            "not a follow ring: its seals are {seals:?}, not {wanted:?}"
        );
        let size = rustix::fs::fstat(&fd)
            .context("fstat of the follow ring")?
            .st_size as u64;
        ensure!(
            size > HEADER as u64,
            "the follow ring is {size} bytes: too small"
        );
        let map = map_ring(fd.as_fd(), size as usize, ProtFlags::READ)
            .context("mapping the follow ring")?;
        let (magic, capacity) = (header(&map).magic, header(&map).capacity);
        if magic != MAGIC || capacity != size - HEADER as u64 {
            bail!("not a follow ring (magic {magic:#x}, capacity {capacity}, size {size})");
        }
        Ok(RingReader {
            map,
            capacity,
            position,
            next_seq,
            carry: Vec::new(),
        })
    }

    /// (`written`, `next_seq`) as published together; none when the writer stays in the
    /// middle of a publication (an agent killed there: it is never finished).
    fn snapshot(&self) -> Option<(u64, u64)> {
        self.consistent(|header| {
            (
                header.written.load(Ordering::Relaxed),
                header.next_seq.load(Ordering::Relaxed),
            )
        })
    }

    /// What `read` takes of the header between two readings of the same even `version` (the
    /// seqlock); none when the writer stays in the middle of a publication.
    fn consistent<T>(&self, read: impl Fn(&Header) -> T) -> Option<T> {
        let header = header(&self.map);
        for _ in 0..SNAPSHOT_TRIES {
            let before = header.version.load(Ordering::Acquire);
            let value = read(header);
            fence(Ordering::Acquire);
            if before.is_multiple_of(2) && header.version.load(Ordering::Relaxed) == before {
                return Some(value);
            }
            std::thread::yield_now();
        }
        None
    }

    /// Appends to `out` the whole lines published since the last call (about `max` bytes at
    /// most; call again while it returns more than nothing) and returns how many, with what
    /// was skipped before them if the writer lapped this reader.
    pub fn read(&mut self, out: &mut Vec<u8>, max: usize) -> (usize, Option<Missed>) {
        let Some((written, next_seq)) = self.snapshot() else {
            return (0, None);
        };
        if written < self.position || written - self.position > self.capacity {
            return (0, self.resync());
        }
        let end = written.min(self.position.saturating_add(max.max(1) as u64));
        let old = self.carry.len();
        let len = (end - self.position) as usize;
        self.carry.reserve(len);
        let at = (self.position % self.capacity) as usize;
        let first = len.min(self.capacity as usize - at);
        // SAFETY: both pieces lie within the data area; `carry` has room for `len` more
        // bytes. The bytes may be changing under the copy: whether they did is checked below,
        // before any is used.
        unsafe {
            let to = self.carry.as_mut_ptr().add(old);
            std::ptr::copy_nonoverlapping(data(&self.map).add(at), to, first);
            std::ptr::copy_nonoverlapping(data(&self.map), to.add(first), len - first);
            self.carry.set_len(old + len);
        }
        fence(Ordering::Acquire);
        let reserved = header(&self.map).reserved.load(Ordering::Relaxed);
        if reserved > self.position + self.capacity {
            self.carry.truncate(old);
            return (0, self.resync());
        }
        self.position = end;
        let Some(last) = self.carry.iter().rposition(|&b| b == b'\n') else {
            return (0, None);
        };
        let lines = self.carry[..=last].iter().filter(|&&b| b == b'\n').count();
        out.extend_from_slice(&self.carry[..=last]);
        self.carry.drain(..=last);
        self.next_seq += lines as u64;
        // Read up to a published end: the count of lines must agree with the writer's.
        if self.position == written && self.carry.is_empty() && next_seq != self.next_seq {
            let missed = (next_seq > self.next_seq).then(|| self.skip_to(written, next_seq));
            self.next_seq = next_seq;
            return (lines, missed);
        }
        (lines, None)
    }

    /// Whether lines were published past what this reader copied.
    pub fn behind(&self) -> bool {
        self.snapshot()
            .is_some_and(|(written, _)| written != self.position)
    }

    /// After a lap: jumps to the oldest batch whose bytes the writer will not reach for a
    /// quarter of the ring yet (else to the newest line), and returns what was skipped.
    fn resync(&mut self) -> Option<Missed> {
        let (written, next_seq, index) = self.consistent(|header| {
            let batches = header.batches.load(Ordering::Relaxed);
            let index: Vec<(u64, u64)> = (batches.saturating_sub(INDEX as u64)..batches)
                .map(|n| {
                    let [position, seq] = &header.index[n as usize % INDEX];
                    (
                        position.load(Ordering::Relaxed),
                        seq.load(Ordering::Relaxed),
                    )
                })
                .collect();
            (
                header.written.load(Ordering::Relaxed),
                header.next_seq.load(Ordering::Relaxed),
                index,
            )
        })?;
        let reserved = header(&self.map).reserved.load(Ordering::Acquire);
        let safe = reserved.saturating_sub(self.capacity) + self.capacity / 4;
        // Oldest first: the first batch start past the safe point.
        let (position, seq) = index
            .into_iter()
            .find(|&(position, seq)| {
                position >= safe && position <= written && seq >= self.next_seq
            })
            .unwrap_or((written, next_seq));
        Some(self.skip_to(position, seq))
    }

    /// Jumps to (`written`, `next_seq`), forgetting a partial line: what was between is
    /// missed.
    fn skip_to(&mut self, written: u64, next_seq: u64) -> Missed {
        let missed = Missed {
            count: next_seq.saturating_sub(self.next_seq),
            first_seq: self.next_seq,
            last_seq: next_seq.saturating_sub(1),
        };
        self.position = written;
        self.next_seq = next_seq;
        self.carry.clear();
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, width: usize) -> Vec<u8> {
        let mut l = format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(width)).into_bytes();
        l.push(b'\n');
        l
    }

    fn reader(ring: &Ring) -> RingReader {
        let (position, next_seq) = ring.start();
        let fd = ring.fd().try_clone_to_owned().unwrap();
        RingReader::open(fd, position, next_seq).unwrap()
    }

    fn seqs(bytes: &[u8]) -> Vec<u64> {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                v["seq"].as_u64().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_reader_gets_every_line_once_across_the_wrap() {
        let mut ring = Ring::new(MIN_CAPACITY, 1).unwrap();
        let mut r = reader(&ring);
        let (mut seq, mut got) = (1, Vec::new());
        // Several times around the ring, read after every batch: nothing is missed.
        for batch in 0..1200 {
            for _ in 0..20 {
                ring.push(&line(seq, 100 + batch % 7 * 61));
                seq += 1;
            }
            ring.publish(seq);
            let mut out = Vec::new();
            // Small reads split lines: only whole lines come out.
            loop {
                let (n, missed) = r.read(&mut out, 777);
                assert!(missed.is_none());
                if n == 0 && r.position == ring.start().0 {
                    break;
                }
            }
            got.extend(seqs(&out));
        }
        assert_eq!(got, (1..seq).collect::<Vec<_>>());
        assert!(
            ring.end > 3 * ring.capacity,
            "the test went around the ring"
        );
    }

    /// Batches as the emitter pushes them (whole, streamed): of every length modulo 16 and
    /// at every alignment, some across the wrap, come out byte for byte.
    #[test]
    fn a_batch_pushed_whole_comes_out_byte_for_byte() {
        let mut ring = Ring::new(MIN_CAPACITY, 1).unwrap();
        let mut r = reader(&ring);
        let (mut seq, mut sent, mut got) = (1, Vec::new(), Vec::new());
        for batch in 0..400 {
            let mut whole = Vec::new();
            // 30-33 lines of 120-135 bytes: 3,600-4,455 bytes, around STREAMING_COPY.
            for i in 0..30 + batch % 4 {
                whole.extend(line(seq, 100 + (batch + i) % 16));
                seq += 1;
            }
            assert!(ring.fits(&whole));
            ring.push(&whole);
            ring.publish(seq);
            sent.extend_from_slice(&whole);
            loop {
                let (n, missed) = r.read(&mut got, 1 << 20);
                assert!(missed.is_none());
                if n == 0 && r.position == ring.start().0 {
                    break;
                }
            }
        }
        assert!(got == sent, "the lines read differ from those pushed");
        assert!(ring.end > ring.capacity, "the test went around the ring");
    }

    #[test]
    fn a_lapped_reader_is_told_exactly_what_it_missed() {
        let mut ring = Ring::new(MIN_CAPACITY, 100).unwrap();
        let mut r = reader(&ring);
        let mut seq = 100;
        for _ in 0..10 {
            ring.push(&line(seq, 200));
            seq += 1;
        }
        ring.publish(seq);
        let mut out = Vec::new();
        assert_eq!(r.read(&mut out, usize::MAX).0, 10);
        // More than the ring holds while the reader sleeps.
        while ring.end < r.position + 2 * ring.capacity {
            ring.push(&line(seq, 200));
            seq += 1;
        }
        ring.publish(seq);
        // One batch, longer than the ring: no batch start is left in it, the reader starts
        // again after it.
        let (n, missed) = r.read(&mut out, usize::MAX);
        let missed = missed.expect("lapped");
        assert_eq!(n, 0);
        assert_eq!(
            missed,
            Missed {
                count: seq - 110,
                first_seq: 110,
                last_seq: seq - 1
            }
        );
        // And from there on it reads what comes next.
        ring.push(&line(seq, 10));
        ring.publish(seq + 1);
        let mut after = Vec::new();
        assert_eq!(r.read(&mut after, usize::MAX), (1, None));
        assert_eq!(seqs(&after), vec![seq]);
    }

    #[test]
    fn a_lapped_reader_starts_again_at_the_oldest_whole_batch() {
        let mut ring = Ring::new(MIN_CAPACITY, 1).unwrap();
        let mut r = reader(&ring);
        let mut seq = 1;
        // Small batches, three times round the ring, while the reader sleeps.
        while ring.end < 3 * ring.capacity {
            for _ in 0..5 {
                ring.push(&line(seq, 300));
                seq += 1;
            }
            ring.publish(seq);
        }
        let mut out = Vec::new();
        let (mut got, mut missed) = (Vec::new(), Vec::new());
        loop {
            out.clear();
            let (n, m) = r.read(&mut out, 64 << 10);
            missed.extend(m);
            got.extend(seqs(&out));
            if n == 0 && m.is_none() && !r.behind() {
                break;
            }
        }
        assert_eq!(missed.len(), 1, "{missed:?}");
        let m = missed[0];
        assert_eq!((m.first_seq, m.last_seq + 1), (1, got[0]));
        assert_eq!(got, (got[0]..seq).collect::<Vec<_>>());
        // It kept what the index allows (INDEX batches of 5 lines), not only the newest line.
        assert_eq!(
            got.len(),
            INDEX * 5,
            "{} lines read after the lap",
            got.len()
        );
    }

    #[test]
    fn a_copy_the_writer_overtook_is_never_delivered() {
        let mut ring = Ring::new(MIN_CAPACITY, 1).unwrap();
        let mut r = reader(&ring);
        let mut seq = 1;
        while ring.end < ring.capacity - 1000 {
            ring.push(&line(seq, 300));
            seq += 1;
        }
        ring.publish(seq);
        // The writer has reserved (is writing over) the reader's first bytes but not
        // published: the copy must be thrown away, not delivered.
        let big = line(seq, 5000);
        ring.push(&big);
        let mut out = Vec::new();
        let (n, missed) = r.read(&mut out, usize::MAX);
        assert_eq!(n, 0);
        assert!(
            out.is_empty(),
            "delivered bytes that were being overwritten"
        );
        assert_eq!(missed.unwrap().first_seq, 1);
    }

    #[test]
    fn a_follower_cannot_write_into_the_ring_or_resize_it() {
        let ring = Ring::new(MIN_CAPACITY, 1).unwrap();
        let fd = ring.fd().try_clone_to_owned().unwrap();
        let len = HEADER + ring.capacity();
        let writable = map_ring(fd.as_fd(), len, ProtFlags::READ | ProtFlags::WRITE);
        assert!(writable.is_err(), "a second writable mapping was allowed");
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::io::write(&fd, b"x").is_err());
        // Reopened through /proc with write access: still sealed.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
            assert!(std::io::Write::write(&mut f, b"x").is_err());
        }
    }

    #[test]
    fn what_is_not_a_ring_is_refused() {
        let memfd = rustix::fs::memfd_create("not-a-ring", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&memfd, (HEADER + MIN_CAPACITY) as u64).unwrap();
        let error = RingReader::open(memfd, 0, 1).err().unwrap();
        assert!(
            format!("{error:#}").contains("not a follow ring"),
            "{error:#}"
        );
    }
}

//! The agent's reader of a BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`: `EVENTS`, `FLOW_EVENTS`)
//! that gives records back to the kernel only when told, after their lines are written.
//!
//! aya's `RingBuf` gives each record back as its item is dropped, before the agent writes
//! the record's line (lines go out in batches, one `write` per turn): an agent killed while
//! a write blocked (a slow pipe, a stalled disk; then SIGKILL from the kubelet or the OOM
//! killer) lost every record it had read and not yet written, up to a turn's 1,024, and
//! nothing counted them (the kernel had handed them over). Here the position the kernel
//! sees (`consumer_pos`) moves only in [`RingReader::commit`], which the agent calls once the
//! turn's lines are written: a killed agent's unwritten records are read again by the next
//! agent on the same pins (reported again, once for each agent killed before it wrote them;
//! never not at all).
//!
//! The layout and protocol are the kernel's (`kernel/bpf/ringbuf.c`, `include/uapi/linux/
//! bpf.h`): page 0 holds `consumer_pos` (the reader's, writable), page 1 `producer_pos`,
//! then the data pages, mapped twice in a row so a record that wraps reads as one slice.
//! Each record starts with an 8-byte header (`u32` length with the busy and discard bits,
//! `u32` page offset) and is padded to 8 bytes. A producer that commits a record wakes the
//! poller only when `consumer_pos` is at that record (or it forces a wakeup); so after
//! giving records back the reader looks once more (`commit`'s answer), as aya does.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering};

use anyhow::{ensure, Context, Result};
use aya::maps::MapData;
use rustix::mm::{MapFlags, ProtFlags};

use crate::mmap::Mapping;

/// `BPF_RINGBUF_BUSY_BIT` (uapi bpf.h): the producer still writes the record.
const BUSY_BIT: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT` (uapi bpf.h): the producer discarded the record; skip it.
const DISCARD_BIT: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ` (uapi bpf.h): bytes of a record's header.
const HEADER: usize = 8;

/// A ring buffer's reader whose reads the kernel learns of only at [`RingReader::commit`].
pub struct RingReader {
    map: MapData,
    /// Page 0: `consumer_pos`, read-write.
    consumer: Mapping,
    /// Page 1 (`producer_pos`) and the data pages twice.
    producer: Mapping,
    /// Where the data pages start in `producer` (one page in).
    data: usize,
    /// The data pages' size in bytes (a power of two), less one.
    mask: usize,
    /// Where the next record starts: read up to here.
    read: usize,
    /// Where the records given back end (`consumer_pos` as this reader last stored it).
    committed: usize,
    /// `producer_pos` as last loaded.
    produced: usize,
}

impl RingReader {
    /// Maps the ring buffer `map`. Its reading starts where the last reader (an earlier
    /// agent on the same pin) gave records back. Errors: the map's information cannot be
    /// read, its size is not a power of two, or a mapping is refused.
    pub fn new(map: MapData) -> Result<Self> {
        let size = map
            .info()
            .context("reading the ring buffer's size")?
            .max_entries() as usize;
        ensure!(
            size.is_power_of_two(),
            "a ring buffer of {size} bytes (not a power of two)"
        );
        let page = rustix::param::page_size();
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(
            fd,
            page,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::empty(),
            0,
        )
        .context("mapping the ring buffer's consumer page")?;
        let producer = Mapping::new(
            fd,
            page + 2 * size,
            ProtFlags::READ,
            MapFlags::empty(),
            page as u64,
        )
        .context("mapping the ring buffer's producer page and data")?;
        let mut reader = Self {
            map,
            consumer,
            producer,
            data: page,
            mask: size - 1,
            read: 0,
            committed: 0,
            produced: 0,
        };
        let (read, produced) = (
            reader.consumer_pos().load(Ordering::Acquire),
            reader.producer_pos(),
        );
        reader.produced = produced;
        reader.read = read;
        // The position is in a page any holder of the map's fd may write (root, or one with
        // CAP_BPF): one that is misaligned (an unaligned atomic load here) or beyond what
        // the kernel wrote (stale bytes read as records; every reserve refused) starts the
        // reader at the kernel's position, the records between given up.
        let unread = produced.wrapping_sub(read);
        if read % 8 != 0 || unread > size {
            tracing::error!(
                consumer_pos = read,
                producer_pos = produced,
                "a ring buffer's consumer position is not one the kernel could have left: \
                 reading from the producer's position on"
            );
            reader.read = produced;
            reader.commit();
        }
        reader.committed = reader.read;
        Ok(reader)
    }

    /// The data pages' size in bytes.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Bytes read and not yet given back: the ring's room this reader still holds.
    pub fn held(&self) -> usize {
        self.read.wrapping_sub(self.committed)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: `consumer_pos` is an `unsigned long` at the start of page 0, which the
        // kernel reads atomically; the mapping lives as long as `self`.
        unsafe { &*self.consumer.ptr().cast::<AtomicUsize>() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: `producer_pos` is an `unsigned long` at the start of page 1, written by
        // the kernel with release order (after the record's header).
        unsafe { &*self.producer.ptr().cast::<AtomicUsize>() }.load(Ordering::Acquire)
    }

    /// The header of the record at `read`.
    fn header_at(&self, read: usize) -> u32 {
        let offset = self.data + (read & self.mask);
        // SAFETY: within the first copy of the data pages, 8-aligned (records are). The
        // kernel commits a record with a fully ordered exchange of this word: acquire
        // makes the record's bytes visible once the busy bit is seen clear.
        unsafe { &*self.producer.ptr().add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire)
    }

    /// The next committed record, or `None` when there is none yet (also while the oldest
    /// one is still being written: its producer wakes the poller once the reader has
    /// committed up to it). The record stays the kernel's until [`RingReader::commit`].
    pub fn next_record(&mut self) -> Option<&[u8]> {
        loop {
            if self.read == self.produced {
                self.produced = self.producer_pos();
                // Positions only grow (wrapping at usize::MAX, never reached): compare
                // for equality, as the kernel and aya do.
                if self.read == self.produced {
                    return None;
                }
            }
            let header = self.header_at(self.read);
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            let start = self.data + (self.read & self.mask) + HEADER;
            self.read = self.read.wrapping_add((HEADER + len).next_multiple_of(8));
            if header & DISCARD_BIT != 0 {
                continue;
            }
            // The double mapping holds any record whole (the kernel caps a record below
            // the ring's size); a length beyond it would be a kernel bug, skipped.
            if start + len > self.producer.len() {
                tracing::error!(len, "a ring buffer record longer than the ring; skipped");
                continue;
            }
            // SAFETY: within the mapping (checked above); the bytes are the kernel's
            // committed record, which it does not reuse before `consumer_pos` passes it.
            return Some(unsafe {
                std::slice::from_raw_parts(self.producer.ptr().add(start), len)
            });
        }
    }

    /// Gives every record read so far back to the kernel (their lines must be written by
    /// now). True when another record is ready already: no wakeup comes for a record
    /// committed while the reader's position was behind it, so the caller reads again
    /// before it waits.
    pub fn commit(&mut self) -> bool {
        // Release: the kernel reuses the space only after it sees the new position.
        self.consumer_pos().store(self.read, Ordering::Release);
        self.committed = self.read;
        // Either this load sees a record a producer commits from now on, or that producer
        // sees the position just stored and wakes the poller (the kernel's commit loads
        // `consumer_pos` after its own full barrier).
        fence(Ordering::SeqCst);
        self.produced = self.producer_pos();
        self.read != self.produced && self.header_at(self.read) & BUSY_BIT == 0
    }
}

impl AsFd for RingReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for RingReader {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

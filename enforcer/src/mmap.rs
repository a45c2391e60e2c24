//! A shared memory mapping of a file descriptor, unmapped on drop: the followers' ring
//! (`events::ring`, a memfd) and the kernel's ring buffers (`datapath::ringbuf`, a BPF map).

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

/// `len` bytes of a file mapped shared; what the bytes mean, and how the processes sharing
/// them synchronise, is the owner's protocol.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// The mapping is plain memory; what is shared across processes is synchronised by the
// owners' protocols, not by Rust's ownership.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from byte `offset` (a multiple of the page size) with `prot`;
    /// `flags` are added to `MAP_SHARED`. Errors: those of `mmap(2)` (a length beyond what
    /// the file or map allows, a protection its seals or the kernel refuse).
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: ProtFlags,
        flags: MapFlags,
        offset: u64,
    ) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping; nothing else refers to its address. The callers
        // check `len` against the file (or the kernel does, for a BPF map).
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED | flags,
                fd,
                offset,
            )?
        };
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returns a non-null address"),
            len,
        })
    }

    /// The first byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped; no reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

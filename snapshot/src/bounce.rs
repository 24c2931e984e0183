//! A page-aligned buffer that large `O_DIRECT` layer writes go through.
//!
//! A direct write is split into requests by the physical contiguity of its source pages:
//! guest memory that was copied-on-write page by page over many pauses is scattered, so
//! each request carries few pages (measured on the development host: 256 MiB from pages
//! faulted in random order took 0.8–1.1 s to write, from pages faulted in order 0.52–0.58 s).
//! Copying each run through this buffer, whose pages are faulted in order once, costs a
//! memcpy (a few ms per 32 MiB) and gives the disk large requests again.

use crate::error::{Error, Result};

/// The buffer's size: large enough to keep the disk's queue full, small enough to cost
/// little memory for the length of a pause.
pub(crate) const BOUNCE_LEN: usize = 32 << 20;

/// A page-aligned anonymous mapping, unmapped on drop: [`BOUNCE_LEN`] bytes for layer
/// writes (the crate's tests use other lengths as page-aligned guest memory).
pub(crate) struct BounceBuffer {
    addr: *mut u8,
    len: usize,
}

impl BounceBuffer {
    /// A mapping of `len` bytes (a whole number of pages).
    pub(crate) fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh private anonymous mapping; failure is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        // Huge pages where the host offers them (fewer, larger pieces still); advice only.
        // SAFETY: advice on the mapping just created, of its exact length.
        let _ = unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
        Ok(BounceBuffer {
            addr: addr.cast(),
            len,
        })
    }

    /// The first `len` bytes (at most the buffer's length), for writing into.
    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: the mapping is `self.len` bytes, readable and writable, owned by `self`
        // and borrowed mutably here; `len` is clamped to it.
        unsafe { std::slice::from_raw_parts_mut(self.addr, len.min(self.len)) }
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which no slice outlives.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

// SAFETY: the buffer is plain memory owned by this value; it holds no thread-bound state.
unsafe impl Send for BounceBuffer {}

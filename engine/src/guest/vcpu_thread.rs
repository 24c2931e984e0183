//! vCPU threads, started with `pthread_create` rather than `std::thread`.
//!
//! Why: `KVM_CREATE_VM` locks every memory mapping of the process (`mm_take_all_locks`) while
//! it holds the process's `mmap_lock`, and every unmap or protection change runs the MMU
//! notifier of every live VM; so the cost of starting a capsule grows with the number of
//! mappings all capsules have. `std::thread` gives each thread a signal stack (for its
//! stack-overflow message) with a guard page: two mappings of the six a probe capsule had.
//! Measured: 1000 spawns from a template took 1.1 s with `std::thread`, 0.8 s without those
//! two mappings; six extra mappings per capsule make it 1.8 s.
//!
//! For the same reason the stacks come from [`StackPool`]: glibc gives each new thread a
//! mapping of its own (two, with the guard page), made writable with `mprotect` (which runs
//! every live VM's MMU notifier) and, at exit, released with `madvise(MADV_DONTNEED)` and
//! later `munmap` (each again running every notifier). Pooled stacks are carved 64 at a time
//! from one mapping, their guard pages installed with `MADV_GUARD_INSTALL` (Linux 6.13+: no
//! extra mapping), and reused once their thread is joined: starting and ending a vCPU thread
//! then changes no mapping at all. Measured: see README.md (Benchmarks).
//! Overflowing a vCPU thread's stack still kills the process with `SIGSEGV` (the guard page),
//! only without std's message.

use std::collections::HashMap;
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// `madvise` advice that makes a range fault like a `PROT_NONE` guard without changing the
/// mapping (Linux 6.13+; the `libc` crate does not name it yet).
const MADV_GUARD_INSTALL: libc::c_int = 102;
/// Stacks carved from one mapping.
const STACKS_PER_CHUNK: usize = 64;
/// Size of the guard below each pooled stack.
const GUARD: usize = 4096;

/// Thread stacks for vCPU threads, by size, reused after their thread is joined.
///
/// A stack's pages stay resident while it waits for reuse (a vCPU thread touches a few KiB):
/// giving them back would be the `madvise` this pool exists to avoid. Chunks are never
/// unmapped, for the same reason; they hold at most as many stacks as vCPU threads ever ran
/// at once (plus one chunk).
struct StackPool {
    /// Free stacks (lowest usable address) by usable size.
    free: HashMap<usize, Vec<usize>>,
}

static STACKS: Mutex<Option<StackPool>> = Mutex::new(None);

/// A stack from the pool: `len` usable bytes from `base` (a guard page lies below it).
#[derive(Debug, Clone, Copy)]
struct PooledStack {
    base: usize,
    len: usize,
}

impl PooledStack {
    /// A free stack of `len` bytes (a multiple of the page size), carving a new chunk when
    /// none is free.
    fn take(len: usize) -> std::io::Result<PooledStack> {
        let mut pool = lock(&STACKS);
        let pool = pool.get_or_insert_with(|| StackPool {
            free: HashMap::new(),
        });
        let free = pool.free.entry(len).or_default();
        if free.is_empty() {
            free.extend(carve_chunk(len)?);
        }
        match free.pop() {
            Some(base) => Ok(PooledStack { base, len }),
            None => Err(std::io::Error::other("no pooled stack")),
        }
    }

    /// Makes the stack available again. Only once its thread has ended (joined).
    fn give_back(self) {
        if let Some(pool) = lock(&STACKS).as_mut() {
            pool.free.entry(self.len).or_default().push(self.base);
        }
    }
}

/// Maps a chunk of [`STACKS_PER_CHUNK`] stacks of `len` bytes, each above a guard page, and
/// returns their lowest usable addresses.
fn carve_chunk(len: usize) -> std::io::Result<Vec<usize>> {
    let slot = len + GUARD;
    let size = slot * STACKS_PER_CHUNK;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else is
    // affected. Failure is checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = addr as usize;
    for i in 0..STACKS_PER_CHUNK {
        let guard = (start + i * slot) as *mut libc::c_void;
        // SAFETY: `guard` is the first page of slot i of the mapping made above, which no
        // one uses yet; a guard only makes accesses to that page fault.
        let guarded = unsafe {
            libc::madvise(guard, GUARD, MADV_GUARD_INSTALL) == 0
                || libc::mprotect(guard, GUARD, libc::PROT_NONE) == 0
        };
        if !guarded {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmaps the mapping made above, of which nothing was handed out.
            unsafe { libc::munmap(addr, size) };
            return Err(e);
        }
    }
    // Pop order: lowest address first, so the chunk fills from its start.
    Ok((0..STACKS_PER_CHUNK)
        .rev()
        .map(|i| start + i * slot + GUARD)
        .collect())
}

/// What the new thread runs, and where it reports a panic.
struct Start {
    name: Option<CString>,
    body: Box<dyn FnOnce() + Send>,
    panicked: Arc<AtomicBool>,
}

extern "C" fn thread_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` is the `Box<Start>` that `spawn` leaked for this thread alone; it is
    // taken back exactly once, here.
    let start = unsafe { Box::from_raw(arg.cast::<Start>()) };
    let Start {
        name,
        body,
        panicked,
    } = *start;
    if let Some(name) = name {
        // SAFETY: names the calling thread with a NUL-terminated string of at most 15
        // bytes; a failure only leaves it unnamed.
        unsafe { libc::pthread_setname_np(libc::pthread_self(), name.as_ptr()) };
    }
    // A panic must not unwind into the C caller: catch it and report it at join.
    if std::panic::catch_unwind(AssertUnwindSafe(body)).is_err() {
        panicked.store(true, Ordering::SeqCst);
    }
    std::ptr::null_mut()
}

/// A running vCPU thread. Dropping it without [`VcpuJoinHandle::join`] detaches it.
#[derive(Debug)]
pub(crate) struct VcpuJoinHandle {
    /// The `pthread_t`, as an integer: it is a pointer on musl, an integer on glibc, and a
    /// plain handle either way, usable from any thread.
    thread: usize,
    panicked: Arc<AtomicBool>,
    joined: bool,
    /// Its stack, returned to the pool once joined (leaked if the thread is detached).
    stack: Option<PooledStack>,
}

impl VcpuJoinHandle {
    /// Waits for the thread to end; `Err` if its body panicked.
    pub(crate) fn join(mut self) -> Result<(), ()> {
        self.joined = true;
        // SAFETY: `thread` was created joinable by `spawn` and is joined only here, once
        // (`joined` keeps Drop from detaching it as well).
        let rc =
            unsafe { libc::pthread_join(self.thread as libc::pthread_t, std::ptr::null_mut()) };
        // The thread has ended: nothing runs on its stack any more.
        if let (0, Some(stack)) = (rc, self.stack.take()) {
            stack.give_back();
        }
        if self.panicked.load(Ordering::SeqCst) {
            Err(())
        } else {
            Ok(())
        }
    }
}

impl Drop for VcpuJoinHandle {
    fn drop(&mut self) {
        if !self.joined {
            // SAFETY: a joinable thread that nobody joined or detached before.
            unsafe { libc::pthread_detach(self.thread as libc::pthread_t) };
        }
    }
}

/// Starts a thread named `name` (shortened to the 15 bytes Linux keeps) with a stack of
/// `stack_size` bytes (at least the platform minimum, rounded up to pages) from the stack
/// pool, running `body`. If the pool cannot map a chunk, glibc allocates the stack.
pub(crate) fn spawn(
    name: &str,
    stack_size: usize,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<VcpuJoinHandle> {
    let panicked = Arc::new(AtomicBool::new(false));
    let mut short = name.as_bytes().to_vec();
    short.truncate(15);
    let start = Box::into_raw(Box::new(Start {
        name: CString::new(short).ok(),
        body: Box::new(body),
        panicked: panicked.clone(),
    }));
    let size = stack_size
        .max(libc::PTHREAD_STACK_MIN)
        .next_multiple_of(GUARD);
    let stack = PooledStack::take(size).ok();
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let mut thread = std::mem::MaybeUninit::<libc::pthread_t>::uninit();
    // SAFETY: `attr` is initialised by pthread_attr_init before any other use and destroyed
    // after pthread_create, which copies what it needs. `start` stays valid until the new
    // thread takes it back; if no thread was created it is reclaimed below. A pooled stack
    // is `size` writable bytes used by no other thread until this one is joined.
    let rc = unsafe {
        let rc = libc::pthread_attr_init(attr.as_mut_ptr());
        if rc != 0 {
            drop(Box::from_raw(start));
            if let Some(stack) = stack {
                stack.give_back();
            }
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let mut rc = match stack {
            Some(stack) => {
                libc::pthread_attr_setstack(attr.as_mut_ptr(), stack.base as *mut _, stack.len)
            }
            None => libc::pthread_attr_setstacksize(attr.as_mut_ptr(), size),
        };
        if rc == 0 {
            rc = libc::pthread_create(
                thread.as_mut_ptr(),
                attr.as_ptr(),
                thread_main,
                start.cast::<libc::c_void>(),
            );
        }
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if rc != 0 {
            drop(Box::from_raw(start));
        }
        rc
    };
    if rc != 0 {
        if let Some(stack) = stack {
            stack.give_back();
        }
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: pthread_create returned 0, so it stored the new thread's id.
    let thread = unsafe { thread.assume_init() };
    Ok(VcpuJoinHandle {
        thread: thread as usize,
        panicked,
        joined: false,
        stack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_joins_reports_panics_and_names_the_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn("capsule-test-thread-name", 256 * 1024, move || {
            let mut name = [0u8; 16];
            // SAFETY: a 16-byte buffer for the calling thread's name.
            unsafe { libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr().cast(), 16) };
            tx.send(name).unwrap();
        })
        .unwrap();
        assert_eq!(handle.join(), Ok(()));
        let name = rx.recv().unwrap();
        let end = name.iter().position(|b| *b == 0).unwrap();
        assert_eq!(&name[..end], b"capsule-test-th");

        let handle = spawn("panics", 256 * 1024, || panic!("on purpose")).unwrap();
        assert_eq!(handle.join(), Err(()));

        // Dropped without joining: detached, and it still runs.
        let (tx, rx) = std::sync::mpsc::channel();
        drop(spawn("detached", 256 * 1024, move || tx.send(7).unwrap()).unwrap());
        assert_eq!(rx.recv().unwrap(), 7);
    }

    #[test]
    fn a_joined_threads_stack_is_reused_and_maps_nothing_new() {
        // An odd size no other test uses, so the pool's free list is this test's alone.
        const SIZE: usize = 200 * 1024;
        let stack_of = || {
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = spawn("stack", SIZE, move || {
                let local = 0u8;
                tx.send(std::ptr::addr_of!(local) as usize).unwrap();
            })
            .unwrap();
            let pooled = handle.stack.map(|s| (s.base, s.len));
            assert_eq!(handle.join(), Ok(()));
            (rx.recv().unwrap(), pooled.expect("a pooled stack"))
        };
        let (sp1, (base1, len1)) = stack_of();
        assert!(
            sp1 > base1 && sp1 < base1 + len1,
            "runs on its pooled stack"
        );
        let (sp2, (base2, _)) = stack_of();
        assert_eq!(base1, base2, "the joined thread's stack is taken again");
        assert!(sp2 > base2 && sp2 < base2 + len1);
    }
}

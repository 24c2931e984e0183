//! vCPU threads, started with `pthread_create` rather than `std::thread`.
//!
//! Why: `KVM_CREATE_VM` locks every memory mapping of the process (`mm_take_all_locks`) while
//! it holds the process's `mmap_lock`, and every unmap or protection change runs the MMU
//! notifier of every live VM; so the cost of starting a capsule grows with the number of
//! mappings all capsules have. `std::thread` gives each thread a signal stack (for its
//! stack-overflow message) with a guard page: two mappings of the six a probe capsule had.
//! Measured: 1000 spawns from a template took 1.1 s with `std::thread`, 0.8 s without those
//! two mappings; six extra mappings per capsule make it 1.8 s.
//! A vCPU thread keeps glibc's stack guard page; overflowing its stack still kills the
//! process with `SIGSEGV`, only without std's message.

use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl VcpuJoinHandle {
    /// Waits for the thread to end; `Err` if its body panicked.
    pub(crate) fn join(mut self) -> Result<(), ()> {
        self.joined = true;
        // SAFETY: `thread` was created joinable by `spawn` and is joined only here, once
        // (`joined` keeps Drop from detaching it as well).
        unsafe { libc::pthread_join(self.thread as libc::pthread_t, std::ptr::null_mut()) };
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
/// `stack_size` bytes (at least the platform minimum) running `body`.
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
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let mut thread = std::mem::MaybeUninit::<libc::pthread_t>::uninit();
    // SAFETY: `attr` is initialised by pthread_attr_init before any other use and destroyed
    // after pthread_create, which copies what it needs. `start` stays valid until the new
    // thread takes it back; if no thread was created it is reclaimed below.
    let rc = unsafe {
        let rc = libc::pthread_attr_init(attr.as_mut_ptr());
        if rc != 0 {
            drop(Box::from_raw(start));
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let size = stack_size.max(libc::PTHREAD_STACK_MIN);
        let mut rc = libc::pthread_attr_setstacksize(attr.as_mut_ptr(), size);
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
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: pthread_create returned 0, so it stored the new thread's id.
    let thread = unsafe { thread.assume_init() };
    Ok(VcpuJoinHandle {
        thread: thread as usize,
        panicked,
        joined: false,
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
}

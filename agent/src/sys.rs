//! Thin wrappers over the syscalls that std does not expose. Every `unsafe`
//! block of the crate lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sends `sig` to every process in process group `pgid`.
///
/// Refuses `pgid <= 1`: `kill(0)`/`kill(-1)` would hit the agent's own group
/// or every process.
pub fn kill_group(pgid: i32, sig: i32) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill has no memory-safety preconditions; pgid > 1 so -pgid
    // names exactly one process group.
    check(unsafe { libc::kill(-pgid, sig) }).map(drop)
}

/// Whether process `pid` still exists (a zombie counts as existing).
pub fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor owned by the caller (borrowed
    // for the duration of the call) touch no memory.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// `poll(2)` over `fds`; `None` waits forever. EINTR is reported as 0 ready.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up so a deadline is never polled for 0 ms repeatedly.
        Some(d) => i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
    };
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `nfds` pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

/// `waitpid(-1, WNOHANG)`: `Some((pid, raw status))` for one reaped child,
/// `None` when no child has changed state (or there are no children).
pub fn reap_any() -> Option<(i32, i32)> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Some((pid, status));
        }
        if pid == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully
    // before sigaddset reads it. Both only fail for invalid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Blocks SIGCHLD in the calling thread (and so in threads it spawns later).
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits up to `timeout` for a pending SIGCHLD (consuming it).
pub fn wait_sigchld(timeout: Duration) {
    let set = sigchld_set();
    let ts = libc::timespec {
        // Capped at a day: the reaper wakes far more often than that anyway,
        // and the cast cannot truncate whatever width time_t has.
        tv_sec: timeout.as_secs().min(86_400) as _,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `ts` are valid for the call; a null siginfo is allowed.
    // The result (signal, timeout or EINTR) does not matter: the caller
    // polls waitpid afterwards either way.
    unsafe {
        libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
    }
}

/// Makes the calling process a child subreaper: orphaned descendants are
/// re-parented to it instead of to PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument only.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })
        .map(drop)
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = cstring(fstype)?;
    let data = data.map(cstring).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are NUL-terminated strings (or null for data) that
    // outlive the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })
    .map(drop)
}

/// Loads the kernel module in the open file `fd` (`finit_module`, no params).
pub fn finit_module(fd: &impl AsRawFd) -> io::Result<()> {
    let params = c"";
    let raw: RawFd = fd.as_raw_fd();
    // SAFETY: `raw` is an open descriptor borrowed for the call; `params` is
    // a static NUL-terminated string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, raw, params.as_ptr(), 0) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the terminal `fd` into raw mode (no echo, no line editing, no
/// newline translation), so binary frames pass unchanged. Returns `Ok(false)`
/// if `fd` is not a terminal.
pub fn make_raw_if_tty(fd: &impl AsRawFd) -> io::Result<bool> {
    let fd = fd.as_raw_fd();
    // SAFETY: termios is plain data, fully written by tcgetattr on success.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid out-pointer; fd is borrowed for the call.
    if unsafe { libc::tcgetattr(fd, &mut t) } == -1 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: `t` was initialised by tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios; fd is borrowed for the call.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(true)
}

/// The time on `CLOCK_MONOTONIC` (in a guest: since its kernel's clock started).
pub fn monotonic() -> Duration {
    // SAFETY: timespec is plain data, fully written by clock_gettime on success.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid out-pointer for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == -1 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

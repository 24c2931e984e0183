//! Thin wrappers over the syscalls that std does not expose. Every `unsafe`
//! block of the crate lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
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

/// Opens a new pseudo-terminal: `(master, slave)`, both close-on-exec and
/// neither the caller's controlling terminal.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only; on success it returns a new
    // descriptor that nothing else owns.
    let raw =
        check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt/unlockpt take a descriptor borrowed for the call.
    check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is a writable buffer of the length passed; ptsname_r
    // NUL-terminates what it writes on success.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: `name` holds a NUL-terminated path (checked above) that
    // outlives the call.
    let raw = check(unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((master, slave))
}

/// Sets the window size of the terminal `fd` (`TIOCSWINSZ`; the terminal's
/// foreground process group gets `SIGWINCH`).
pub fn set_window_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which outlives the call; the
    // descriptor is borrowed for the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(drop)
}

/// Gives the file `fd` to user `uid` and group `gid` (`fchown`).
pub fn chown_fd(fd: &impl AsRawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown takes a descriptor borrowed for the call and integers.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// Has `cmd`'s child, between `fork` and `exec`, become the leader of a new
/// session whose controlling terminal is its stdin (which must be a
/// terminal's slave side). `cmd` must not ask for a process group.
pub fn leads_terminal_session(cmd: &mut std::process::Command) {
    // SAFETY: the hook only makes async-signal-safe system calls (setsid,
    // ioctl) and allocates nothing.
    unsafe {
        cmd.pre_exec(become_terminal_session_leader);
    }
}

/// Has `cmd`'s child, between `fork` and `exec`, take on the supplementary
/// groups `groups`, the group `gid` and the user `uid`.
pub fn runs_as(cmd: &mut std::process::Command, uid: u32, gid: u32, groups: Vec<u32>) {
    // SAFETY: the hook only makes async-signal-safe system calls (setgroups,
    // setgid, setuid) on memory allocated before the fork, and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || switch_credentials(uid, gid, &groups));
    }
}

/// In a child between `fork` and `exec`: makes it the leader of a new
/// session whose controlling terminal is its stdin. Only async-signal-safe
/// system calls.
fn become_terminal_session_leader() -> io::Result<()> {
    // SAFETY: setsid takes no arguments; the child is not a process group
    // leader (the caller does not ask std for a process group).
    check(unsafe { libc::setsid() })?;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal a
    // terminal that is another session's); fd 0 is the child's own stdin.
    check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map(drop)
}

/// In a child between `fork` and `exec`: takes on the supplementary groups
/// `groups`, then `gid`, then `uid` (in that order: once the uid is dropped
/// the others cannot change). Only async-signal-safe system calls; allocates
/// nothing.
fn switch_credentials(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: `groups` is a valid slice of gid_t (u32) of the length passed,
    // borrowed for the call, which only reads it.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: setgid/setuid take integers only.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) }).map(drop)
}

/// Sets `CLOCK_REALTIME` to `ns` nanoseconds since the Unix epoch
/// (`clock_settime`; needs `CAP_SYS_TIME`).
pub fn set_realtime(ns: u64) -> io::Result<()> {
    const NS_PER_SEC: u64 = 1_000_000_000;
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    // Converted to whatever width the target's time_t and c_long have (the
    // time_t alias itself is deprecated on musl); out of range is EINVAL.
    let ts = libc::timespec {
        tv_sec: (ns / NS_PER_SEC).try_into().map_err(|_| einval())?,
        tv_nsec: (ns % NS_PER_SEC).try_into().map_err(|_| einval())?,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call, which only
    // reads it.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])`: mix a `rand_pool_info` into
/// the input pool and credit its `entropy_count` bits.
const RNDADDENTROPY: u32 = 0x4008_5203;
/// `RNDRESEEDCRNG`, `_IO('R', 0x07)`: reseed the CRNG now (Linux >= 4.17).
const RNDRESEEDCRNG: u32 = 0x5207;

/// The `struct rand_pool_info` for `data` as 32-bit words:
/// `{ int entropy_count = 8 * len; int buf_size = len; __u32 buf[]; }`, the
/// bytes of `data` in order (the last word zero-padded).
fn rand_pool_info(data: &[u8]) -> io::Result<Vec<u32>> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let size = i32::try_from(data.len()).map_err(|_| einval())?;
    let bits = size.checked_mul(8).ok_or_else(einval)?;
    let mut words = Vec::with_capacity(2 + data.len().div_ceil(4));
    // Both counts are non-negative, so their bits are the same as u32.
    words.push(bits.unsigned_abs());
    words.push(size.unsigned_abs());
    words.extend(data.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(w)
    }));
    Ok(words)
}

/// Mixes `data` into the kernel's entropy pool through `random` (an open
/// `/dev/urandom` or `/dev/random`), credited as 8 bits per byte
/// (`RNDADDENTROPY`; needs `CAP_SYS_ADMIN`).
pub fn add_entropy(random: &impl AsRawFd, data: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(data)?;
    // SAFETY: `info` is a complete rand_pool_info (two ints, then `buf_size`
    // bytes of `buf`, all inside the vector) that outlives the call; the
    // kernel only reads it. The descriptor is borrowed for the call.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) }).map(drop)
}

/// Forces the kernel CRNG to reseed from the input pool now
/// (`RNDRESEEDCRNG` through an open `/dev/urandom`; needs `CAP_SYS_ADMIN`,
/// Linux >= 4.17, which older kernels refuse with `EINVAL`).
///
/// `ENODATA` (the CRNG is not initialised yet, so nothing has been
/// generated from an old state) counts as success: the CRNG seeds itself
/// from the pool, bytes just added included, once it has enough entropy.
pub fn reseed_crng(random: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory;
    // the descriptor is borrowed for the call.
    match check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r.map(drop),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let words = rand_pool_info(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(words.len(), 4);
        assert_eq!(words[0], 40);
        assert_eq!(words[1], 5);
        assert_eq!(words[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(words[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(rand_pool_info(&[]).unwrap(), vec![0, 0]);
        let full = rand_pool_info(&[0xff; 512]).unwrap();
        assert_eq!((full.len(), full[0], full[1]), (130, 4096, 512));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr.
        let ioc = |dir: u32, nr: u32, size: u32| dir << 30 | size << 16 | u32::from(b'R') << 8 | nr;
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }
}

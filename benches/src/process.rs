//! Child processes of the peer VMMs (QEMU, Firecracker): stopping them, and connecting to
//! the Unix sockets they create.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Ends `child`: SIGTERM, then SIGKILL once `grace` has passed (a zero grace kills at once).
/// Returns its exit status when it could be reaped.
pub fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if !grace.is_zero() {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child, which is not reaped yet (so the pid is ours).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Connects to the Unix socket at `path`, retrying (every 200 µs) while it does not exist
/// or refuses, until `timeout`; `alive` is asked between tries and ends the wait when false
/// (the process that should create the socket died).
pub fn connect_unix(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{} did not accept a connection within {} s: {e}",
                        path.display(),
                        timeout.as_secs()
                    ));
                }
                if !alive() {
                    return Err(format!(
                        "the process exited before {} accepted a connection",
                        path.display()
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", path.display())),
        }
    }
}

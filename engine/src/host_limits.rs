//! The host's per-process limits as the engine meets them: it raises the file-descriptor
//! limit at start (each capsule holds several descriptors: its VM, vCPUs, event fds), and
//! turns a host resource running out, at any step, into [`Error::ResourceExhausted`].

use crate::error::{Error, Resource};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (logged). A failure only means
/// fewer capsules fit; it is logged, not returned.
pub(crate) fn raise_file_limit() {
    let Some((soft, hard)) = file_limit() else {
        return;
    };
    if soft >= hard {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass; no memory is shared.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(
            from = soft,
            to = hard,
            "raised the file descriptor limit (RLIMIT_NOFILE)"
        );
    } else {
        let error = std::io::Error::last_os_error();
        tracing::warn!(soft, hard, %error, "could not raise the file descriptor limit");
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
fn file_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass, which lives across the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// How many entries a `/proc/self` directory has (open descriptors, threads); `None` if it
/// cannot be read (with no descriptor left, not even the directory opens).
fn count_entries(dir: &str) -> Option<u64> {
    std::fs::read_dir(dir).ok().map(|d| d.count() as u64)
}

/// The process's resident memory in MiB.
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// `error` as [`Error::ResourceExhausted`] when it says a host resource ran out (with what
/// is in use and the limit where known); any other error unchanged.
pub(crate) fn classify(error: Error) -> Error {
    let resource = match (error.os_error(), &error) {
        (Some(libc::EMFILE | libc::ENFILE), _) => Resource::FileDescriptors,
        (Some(libc::ENOMEM), _) => Resource::HostMemory,
        // Every thread the engine starts fails as Error::Os; EAGAIN there is the thread limit.
        (Some(libc::EAGAIN), Error::Os { .. }) => Resource::Threads,
        _ => return error,
    };
    let (in_use, limit) = match resource {
        Resource::FileDescriptors => {
            let limit = file_limit().map(|(soft, _)| soft);
            // Reading the directory takes one descriptor itself; when none is left it
            // cannot be read, and every descriptor the limit allows is in use.
            let in_use = match count_entries("/proc/self/fd") {
                Some(n) => n.saturating_sub(1),
                None => limit.unwrap_or(0),
            };
            (in_use, limit)
        }
        Resource::Threads => (count_entries("/proc/self/task").unwrap_or(0), None),
        _ => (resident_mib(), None),
    };
    Error::ResourceExhausted {
        resource,
        in_use,
        limit,
        cause: Some(Box::new(error)),
    }
}

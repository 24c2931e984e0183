//! Measurement helpers shared by the `report` binary and the criterion benches, and the
//! peers `linux-report` measures Linux capsules against (QEMU's microvm, Firecracker).
#![deny(missing_docs)]

use std::time::Duration;

pub mod console;
pub mod firecracker;
pub mod kvm_stats;
pub mod process;
pub mod qemu;
pub mod start_phases;

/// Percentiles of a set of samples, in the unit they were given in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Number of samples.
    pub n: usize,
}

/// Summarises `samples` (any order). Empty input gives zeros.
pub fn summarize(samples: &[f64]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    };
    Summary {
        p50: rank(0.5),
        p99: rank(0.99),
        n: sorted.len(),
    }
}

/// One line of the report: `{"metric": NAME, "unit": UNIT, "p50": X, "p99": Y, "n": N}`.
pub fn json_line(metric: &str, unit: &str, summary: Summary) -> String {
    format!(
        "{{\"metric\": \"{metric}\", \"unit\": \"{unit}\", \"p50\": {:.1}, \"p99\": {:.1}, \"n\": {}}}",
        summary.p50, summary.p99, summary.n
    )
}

/// [`json_line`] for a single dimensionless value (a ratio), with two decimals.
pub fn json_ratio_line(metric: &str, value: f64) -> String {
    format!(
        "{{\"metric\": \"{metric}\", \"unit\": \"ratio\", \"p50\": {value:.2}, \"p99\": {value:.2}, \"n\": 1}}"
    )
}

/// Microseconds in a duration, as a float.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// This process's resident set size in KiB (from /proc/self/statm).
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Resident KiB summed over this process's mappings that are exactly `size_kib` large
/// (used to count guest memory, whose mappings have the guest's size, apart from the rest).
pub fn rss_of_mappings_sized_kib(size_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut total = 0;
    let mut in_match = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_match = parse_kib(v) == size_kib;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if in_match {
                total += parse_kib(v);
            }
        }
    }
    total
}

/// Resident KiB summed over this process's mappings of files under `dir` (template layers).
pub fn rss_of_mappings_under_kib(dir: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let dir = dir.to_string_lossy();
    let mut total = 0;
    let mut in_match = false;
    for line in smaps.lines() {
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'));
        if is_header {
            in_match = line.contains(dir.as_ref());
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if in_match {
                total += parse_kib(v);
            }
        }
    }
    total
}

/// Lines of /proc/self/maps: the process's memory mappings (VMAs).
pub fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Open file descriptors of this process (entries of /proc/self/fd, less the one reading it).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, and first the hard limit to
/// `hard` when given and higher, where the process may (`CAP_SYS_RESOURCE`). Returns the
/// limits now in effect (soft, hard).
pub fn raise_nofile_limit(hard: Option<u64>) -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(hard) = hard.filter(|&h| h > lim.rlim_max) {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok((hard, hard));
        }
        // Without CAP_SYS_RESOURCE: keep the hard limit, raise the soft one to it.
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The disk's durable write bandwidth in GB/s: `len` bytes (a multiple of 4 KiB) of resident,
/// page-aligned memory written with `O_DIRECT` in one positioned write to a new file in
/// `dir`, then fsynced; timed from the file's creation to the end of the fsync. The file is
/// removed afterwards. What a pause of `len` dirty bytes writes, without the pause around it.
pub fn disk_write_gbps(dir: &std::path::Path, len: usize) -> std::io::Result<f64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let buffer = AlignedBuffer::new(len)?;
    let path = dir.join(format!(".disk-bench-{}", std::process::id()));
    let t = std::time::Instant::now();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)?;
    let written = file
        .write_all_at(buffer.as_slice(), 0)
        .and_then(|()| file.sync_all());
    let elapsed = t.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    written?;
    Ok(len as f64 / elapsed.as_secs_f64() / 1e9)
}

/// Commits everything pending on the file system holding `dir` (`syncfs`), so that the next
/// timed write does not also pay for earlier work (an unlinked file's freed extents).
pub fn sync_file_system(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let handle = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own for the duration of the call.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Page-aligned anonymous memory filled with a pattern (so every page is resident).
struct AlignedBuffer {
    addr: *mut libc::c_void,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> std::io::Result<Self> {
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
            return Err(std::io::Error::last_os_error());
        }
        let buffer = AlignedBuffer { addr, len };
        // SAFETY: the mapping is `len` writable bytes, ours alone.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
        for (i, page) in bytes.chunks_mut(4096).enumerate() {
            page.fill(i as u8 | 1);
        }
        Ok(buffer)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.addr.cast::<u8>(), self.len) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn parse_kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&samples);
        assert_eq!((s.p50, s.p99, s.n), (50.0, 99.0, 100));
        assert_eq!(summarize(&[]).n, 0);
        assert_eq!(summarize(&[3.0]).p99, 3.0);
    }

    #[test]
    fn json_line_has_the_documented_shape() {
        let line = json_line(
            "x",
            "us",
            Summary {
                p50: 1.25,
                p99: 2.0,
                n: 3,
            },
        );
        assert_eq!(
            line,
            "{\"metric\": \"x\", \"unit\": \"us\", \"p50\": 1.2, \"p99\": 2.0, \"n\": 3}"
        );
    }

    #[test]
    fn rss_is_readable() {
        assert!(rss_kib() > 0);
    }

    #[test]
    fn maps_and_fds_are_counted() {
        assert!(map_count() > 0);
        let before = fd_count();
        let file = std::fs::File::open("/proc/self/maps").unwrap();
        assert_eq!(fd_count(), before + 1);
        drop(file);
    }

    #[test]
    fn disk_bandwidth_is_measured_and_its_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        // Some file systems (tmpfs) refuse O_DIRECT; skip there.
        match disk_write_gbps(dir.path(), 1 << 20) {
            Ok(gbps) => assert!(gbps > 0.0),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

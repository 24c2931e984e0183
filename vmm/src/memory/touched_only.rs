//! Mapping only the pages a guest touches, for memory shared with other guests.
//!
//! A read fault on a file mapping makes Linux map more than the faulting page: *fault-around*
//! maps up to 16 neighbours already in the page cache, and a large page-cache folio can be
//! mapped whole (2 MiB at once on ext4 since 6.x). None of that costs memory (the pages are
//! the page cache's), but each mapped page counts in the process's RSS, so a template clone
//! that touched 1 MiB of its template would show ~16 MiB of RSS growth.
//!
//! Linux turns fault-around off for a mapping registered with a userfaultfd in
//! write-protect mode (`uffd_disable_fault_around`), and maps a large folio one page at a
//! time where transparent huge pages are disabled (`MADV_NOHUGEPAGE`).
//! [`TouchedOnly::register`] does both. It registers with a userfaultfd created in
//! user-mode-only mode (allowed without privileges) that never write-protects a page: it
//! delivers no event and needs no reader, so faults stay the kernel's. Registering a
//! regular file's mapping in write-protect mode needs `UFFD_FEATURE_WP_ASYNC` (Linux 6.7);
//! shmem/tmpfs works from 5.19. Where the kernel (or a seccomp policy) refuses, memory keeps
//! the kernel's default and the call says so: it is an optimisation, never a failure.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{host_ranges, GuestMemory};
use crate::error::{Error, Result};

/// `userfaultfd(2)` flag: handle faults from user mode only (no privilege needed).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// The userfaultfd API version.
const UFFD_API: u64 = 0xaa;
/// Write-protect faults resolved by the kernel itself, on any memory type (Linux 6.7).
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER` mode: write-protect tracking.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)` (`libc::Ioctl` is `c_int` on musl: the bits as
/// they are).
const UFFDIO_API: libc::Ioctl = 0xc018_aa3f_u32 as libc::Ioctl;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::Ioctl = 0xc020_aa00_u32 as libc::Ioctl;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// A userfaultfd for [`TouchedOnly::register`]: one serves any number of guest memories
/// (an engine keeps one per template, shared by its clones). A registration lasts while
/// both the mapping and this descriptor exist: keep it as long as the memory it registered.
#[derive(Debug)]
pub struct TouchedOnly {
    fd: OwnedFd,
}

impl TouchedOnly {
    /// Opens the userfaultfd: with `UFFD_FEATURE_WP_ASYNC` where the kernel has it (regular
    /// files can then be registered), else without (shmem and anonymous memory only).
    /// Fails, saying why, where the kernel or a seccomp policy refuses userfaultfd.
    pub fn new() -> Result<TouchedOnly> {
        open_userfaultfd(UFFD_FEATURE_WP_ASYNC)
            .or_else(|first| {
                open_userfaultfd(0).map_err(|second| format!("{first}; without WP_ASYNC: {second}"))
            })
            .map(|fd| TouchedOnly { fd })
            .map_err(Error::Memory)
    }

    /// Makes every region of `memory` map only the pages that are touched (see the module
    /// docs): `MADV_NOHUGEPAGE`, then a write-protect registration that turns fault-around
    /// off. Call it after the memory's final mappings are in place (a later `MAP_FIXED`
    /// over a range replaces its registration). Returns `Ok(false)`, with the reason in a
    /// `debug` trace, where the kernel does not allow it for this memory; the memory then
    /// works as before.
    pub fn register(&self, memory: &GuestMemory) -> Result<bool> {
        map_touched_only(&self.fd, memory)
    }
}

/// A new userfaultfd with `features` negotiated.
fn open_userfaultfd(features: u64) -> std::result::Result<OwnedFd, String> {
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if raw < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
    }
    let raw = i32::try_from(raw).map_err(|_| format!("userfaultfd returned {raw}"))?;
    // SAFETY: `raw` is a descriptor the kernel just opened for us and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(format!(
            "UFFDIO_API with features {features:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// [`TouchedOnly::register`] with `fd`.
fn map_touched_only(fd: &OwnedFd, memory: &GuestMemory) -> Result<bool> {
    for (addr, len) in host_ranges(memory)? {
        // SAFETY: [addr, addr + len) is one region's own mapping (host_ranges); the advice
        // changes how its future faults are mapped, never its contents.
        if unsafe { libc::madvise(addr.cast(), len, libc::MADV_NOHUGEPAGE) } != 0 {
            let err = std::io::Error::last_os_error();
            tracing::debug!("guest memory keeps fault-around: MADV_NOHUGEPAGE: {err}");
            return Ok(false);
        }
        let mut register = UffdioRegister {
            start: addr as u64,
            len: len as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `uffdio_register`, which
        // `register` is; the range is a mapping `memory` owns. No page is ever
        // write-protected through this descriptor, so the registration changes how faults
        // are mapped and delivers nothing.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } != 0 {
            let err = std::io::Error::last_os_error();
            tracing::debug!("guest memory keeps fault-around: UFFDIO_REGISTER: {err}");
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::{map_private_file_regions, read_flat, PAGE_SIZE};
    use super::*;
    use std::io::Write;
    use vm_memory::GuestAddress;

    /// RSS of `memory`'s own mappings (from /proc/self/smaps, so other tests' allocations
    /// in this process do not count).
    fn rss_kib(memory: &GuestMemory) -> u64 {
        let ranges: Vec<(u64, u64)> = host_ranges(memory)
            .unwrap()
            .into_iter()
            .map(|(addr, len)| (addr as u64, addr as u64 + len as u64))
            .collect();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, _)) = first.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    inside = ranges.iter().any(|&(s, e)| (s..e).contains(&start));
                    continue;
                }
            }
            if inside && first == "Rss:" {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        total
    }

    /// Reads one byte every 256 KiB of `memory` (64 MiB): 256 pages touched.
    fn touch(memory: &GuestMemory) {
        let mut byte = [0u8];
        for offset in (0..64u64 << 20).step_by(256 << 10) {
            read_flat(memory, offset, &mut byte).unwrap();
        }
    }

    #[test]
    fn a_clone_maps_only_the_pages_it_reads() {
        const SIZE: usize = 64 << 20;
        let mut file = tempfile::tempfile().unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..SIZE >> 20 {
            file.write_all(&chunk).unwrap();
        }
        let file = std::sync::Arc::new(file);
        let layout = [
            (GuestAddress(0), SIZE / 2),
            (GuestAddress(1 << 32), SIZE / 2),
        ];
        // Every page in the page cache, as for a template many clones have read.
        let warm = map_private_file_regions(file.clone(), &layout).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        for offset in (0..SIZE as u64).step_by(PAGE_SIZE) {
            read_flat(&warm, offset, &mut page).unwrap();
        }
        drop(warm);

        let plain = map_private_file_regions(file.clone(), &layout).unwrap();
        touch(&plain);
        let plain_growth = rss_kib(&plain);
        drop(plain);

        let clone = map_private_file_regions(file, &layout).unwrap();
        let Ok(touched_only) = TouchedOnly::new() else {
            eprintln!("SKIPPED: no userfaultfd on this host");
            return;
        };
        if !touched_only.register(&clone).unwrap() {
            eprintln!("SKIPPED: this kernel keeps fault-around for file mappings");
            return;
        }
        touch(&clone);
        let growth = rss_kib(&clone);
        // 256 pages read: 1024 KiB.
        assert_eq!(growth, 1024, "grew {growth} KiB (plain: {plain_growth})");
        assert!(
            plain_growth > 2 * growth,
            "plain {plain_growth} KiB, clone {growth}"
        );
        // Writes still work and stay private.
        super::super::write_flat(&clone, 0, b"x").unwrap();
        let mut byte = [0u8];
        read_flat(&clone, 0, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }
}

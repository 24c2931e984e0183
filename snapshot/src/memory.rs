//! Sparse memory layer files.
//!
//! A layer is a raw file exactly as long as guest memory (all regions laid
//! end to end, see the crate docs). Each present page is stored at its own
//! flat offset; absent pages are holes, so a layer with few pages costs few
//! disk blocks. The set of present pages is carried separately (in the
//! [`crate::chain::MemoryChain`]) as a [`PageBitmap`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::atomic;
use crate::bitmap::PageBitmap;
use crate::bounce::{BounceBuffer, BOUNCE_LEN};
use crate::error::{Error, IoContext, Result};
use crate::flat::FlatLayout;
use crate::PAGE_SIZE;

/// Options for [`write_layer`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WriteOptions {
    /// **Test hook for fault injection.** When `Some(n)`, the writer stops
    /// after writing `n` bytes of page data and fails with an injected
    /// [`Error::Io`] (kind `Other`, message `"injected write fault"`), exactly
    /// as a failing disk would. The partially written temporary is removed,
    /// and whatever file was at the destination before stays untouched. Keep
    /// `None` in production.
    pub fail_after_bytes: Option<u64>,
    /// Write page data with `O_DIRECT`, bypassing the page cache: on most disks this is
    /// several times faster than buffered writes followed by `fsync` for large layers, and it
    /// leaves no dirty page cache behind (a pause is meant to free memory). Falls back to
    /// buffered writes where the file system refuses `O_DIRECT` (tmpfs, for one). Leave it
    /// off for files that will be mapped soon by many readers (templates): they then start
    /// from a warm page cache.
    pub direct_io: bool,
    /// Leave the fsync of the directory after the layer's rename to the caller, who must
    /// fsync that directory before anything refers to the layer (a pause writes `state.bin`
    /// beside it next, and that write's directory fsync makes both names durable): one
    /// journal commit and disk flush fewer per pause.
    pub defer_directory_sync: bool,
}

impl WriteOptions {
    /// Options that inject a write failure after `bytes` bytes (test hook,
    /// see [`WriteOptions::fail_after_bytes`]).
    pub fn failing_after(bytes: u64) -> Self {
        Self {
            fail_after_bytes: Some(bytes),
            ..Self::default()
        }
    }

    /// These options with [`WriteOptions::defer_directory_sync`] set to `defer`.
    pub fn with_deferred_directory_sync(mut self, defer: bool) -> Self {
        self.defer_directory_sync = defer;
        self
    }

    /// These options with [`WriteOptions::direct_io`] set to `direct`.
    pub fn with_direct_io(mut self, direct: bool) -> Self {
        self.direct_io = direct;
        self
    }
}

/// What [`write_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerInfo {
    /// Final path of the layer file.
    pub path: PathBuf,
    /// Length of the layer file (= guest memory size).
    pub file_len: u64,
    /// Number of pages written.
    pub pages_written: u64,
    /// Number of positioned writes: runs of selected pages, split where
    /// they cross from one memory slice into the next.
    pub writes: u64,
}

/// The message of the injected fault, see [`WriteOptions::fail_after_bytes`].
pub(crate) const INJECTED_FAULT_MESSAGE: &str = "injected write fault";

/// Writes the pages of `memory` selected by `pages` into a new sparse layer
/// file at `path`, atomically (temporary + fsync + rename + directory fsync).
///
/// `memory` is guest memory as slices in flat order (region 0, region 1, ...;
/// see the crate docs), each a whole number of pages, together exactly
/// `pages.page_count() * PAGE_SIZE` bytes. Each run of consecutive selected
/// pages is written with one positioned write per slice it touches (split
/// only by the kernel's per-call limit), so the cost is about one syscall per
/// run, not per page. The file length is set to the memory size so that
/// unselected pages are holes.
pub fn write_layer(
    path: &Path,
    memory: &[&[u8]],
    pages: &PageBitmap,
    opts: &WriteOptions,
) -> Result<LayerInfo> {
    let layout = FlatLayout::new(memory.iter().map(|m| m.len() as u64))?;
    let mem_len = layout.len();
    if mem_len != pages.page_count().saturating_mul(PAGE_SIZE) {
        return Err(Error::bitmap(format!(
            "memory of {mem_len} bytes does not match a bitmap of {} pages",
            pages.page_count()
        )));
    }
    let mut info = LayerInfo {
        path: path.to_path_buf(),
        file_len: mem_len,
        pages_written: 0,
        writes: 0,
    };
    let mut budget = opts.fail_after_bytes;

    atomic::write_file_with_sync(path, !opts.defer_directory_sync, |file, tmp| {
        file.set_len(mem_len).at(tmp)?;
        let mut direct = if opts.direct_io {
            open_direct(tmp).map(|file| (file, None))
        } else {
            None
        };
        for (first, count) in pages.runs() {
            for piece in layout.pieces(first * PAGE_SIZE, count * PAGE_SIZE)? {
                let data = region_slice(memory, piece.region, piece.region_offset, piece.len)?;
                let offset = piece.flat_offset;
                let written = match &mut direct {
                    Some((direct, bounce)) => {
                        match write_direct(direct, bounce, tmp, data, offset, &mut budget) {
                            // A device with stricter O_DIRECT alignment rules: use the page cache.
                            Err(Error::Io { source, .. })
                                if source.raw_os_error() == Some(libc::EINVAL) =>
                            {
                                write_with_budget(file, tmp, data, offset, &mut budget)
                            }
                            other => other,
                        }
                    }
                    None => write_with_budget(file, tmp, data, offset, &mut budget),
                };
                written?;
                info.writes += 1;
            }
            info.pages_written += count;
        }
        Ok(())
    })?;
    tracing::debug!(
        path = %path.display(),
        pages = info.pages_written,
        writes = info.writes,
        "wrote memory layer"
    );
    Ok(info)
}

/// Writes `data` at `offset` through the `O_DIRECT` file: runs of at least a bounce buffer's
/// length go through one (made on first use), in pieces, so that the disk gets large
/// requests whatever the source pages' physical layout (see `bounce`); shorter ones are
/// written from where they are.
fn write_direct(
    file: &File,
    bounce: &mut Option<BounceBuffer>,
    tmp: &Path,
    data: &[u8],
    offset: u64,
    budget: &mut Option<u64>,
) -> Result<()> {
    if data.len() < BOUNCE_LEN {
        return write_with_budget(file, tmp, data, offset, budget);
    }
    let buffer = match bounce {
        Some(buffer) => buffer,
        None => bounce.insert(BounceBuffer::new(BOUNCE_LEN)?),
    };
    for (i, piece) in data.chunks(BOUNCE_LEN).enumerate() {
        let staged = buffer.slice_mut(piece.len());
        staged.copy_from_slice(piece);
        let at = offset + (i * BOUNCE_LEN) as u64;
        write_with_budget(file, tmp, staged, at, budget)?;
    }
    Ok(())
}

/// `pwrite`s `data` at `offset`, honouring the fault-injection budget.
fn write_with_budget(
    file: &File,
    tmp: &Path,
    data: &[u8],
    offset: u64,
    budget: &mut Option<u64>,
) -> Result<()> {
    match budget {
        None => file.write_all_at(data, offset).at(tmp),
        Some(left) => {
            let n = (*left).min(data.len() as u64) as usize;
            file.write_all_at(&data[..n], offset).at(tmp)?;
            *left -= n as u64;
            if n < data.len() {
                tracing::warn!(path = %tmp.display(), "injecting write fault (test hook)");
                return Err(Error::io(tmp, io::Error::other(INJECTED_FAULT_MESSAGE)));
            }
            Ok(())
        }
    }
}

/// The temporary at `tmp` opened again for writing with `O_DIRECT`, or `None` where the file
/// system does not support it.
fn open_direct(tmp: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)
        .ok()
}

/// `memory[region][offset..offset + len]`, or an error instead of a panic.
pub(crate) fn region_slice<'a>(
    memory: &[&'a [u8]],
    region: usize,
    offset: u64,
    len: u64,
) -> Result<&'a [u8]> {
    let mem = memory.get(region).copied().unwrap_or_default();
    usize::try_from(offset)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| mem.get(o..o.checked_add(l)?))
        .ok_or_else(|| {
            Error::invalid(format!(
                "range {offset}+{len} outside memory region {region}"
            ))
        })
}

/// Opens the layer file at `path` for reading and checks that it is exactly
/// `mem_size` bytes long (so that mapping it can never fault past its end).
pub(crate) fn open_layer(path: &Path, mem_size: u64) -> Result<File> {
    let file = File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len();
    if len != mem_size {
        return Err(Error::invalid(format!(
            "layer {} is {len} bytes, expected {mem_size}",
            path.display()
        )));
    }
    Ok(file)
}

/// Fills `dst` from `file` at `offset` with positioned reads.
pub(crate) fn read_exact_at(file: &File, path: &Path, dst: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(dst, offset).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn patterned(pages: u64) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ (i as u8).wrapping_mul(7))
            .collect()
    }

    /// `data` (a layer file) has `mem`'s bytes at the pages set in `bm` and zeros elsewhere.
    fn assert_layer_holds(data: &[u8], mem: &[u8], bm: &PageBitmap) {
        assert_eq!(data.len(), mem.len());
        for (page, (got, want)) in data
            .chunks(PAGE_SIZE as usize)
            .zip(mem.chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            if bm.get(page as u64) {
                assert_eq!(got, want, "page {page}");
            } else {
                assert!(got.iter().all(|&b| b == 0), "page {page}");
            }
        }
    }

    /// Writes `runs` of a `pages`-page patterned mapping with `O_DIRECT` and checks the layer.
    fn direct_io_round_trip(pages: u64, runs: &[(u64, u64)]) {
        let dir = tempfile::tempdir().unwrap();
        // O_DIRECT needs page-aligned memory: use a mapping, as guest memory is.
        let len = (pages * PAGE_SIZE) as usize;
        let mut mapping = BounceBuffer::new(len).unwrap();
        let mem = mapping.slice_mut(len);
        mem.copy_from_slice(&patterned(pages));
        let mut bm = PageBitmap::new(pages);
        for &(first, count) in runs {
            bm.set_range(first, count).unwrap();
        }
        let p = dir.path().join("d.layer");
        write_layer(
            &p,
            &[&*mem],
            &bm,
            &WriteOptions::default().with_direct_io(true),
        )
        .unwrap();
        assert_layer_holds(&std::fs::read(&p).unwrap(), mem, &bm);
    }

    #[test]
    fn direct_io_writes_the_same_bytes() {
        direct_io_round_trip(256, &[(3, 40), (200, 1)]);
    }

    /// A run longer than two bounce buffers, ending in a partial one, goes through the
    /// bounce buffer piece by piece to the right offsets.
    #[test]
    fn direct_io_through_the_bounce_buffer_writes_the_same_bytes() {
        let bounce_pages = BOUNCE_LEN as u64 / PAGE_SIZE;
        direct_io_round_trip(
            3 * bounce_pages,
            &[(5, 2 * bounce_pages + 17), (3 * bounce_pages - 1, 1)],
        );
    }

    #[test]
    fn writes_only_selected_pages_sparsely() {
        let dir = tempfile::tempdir().unwrap();
        let pages = 4096u64; // 16 MiB
        let mem = patterned(pages);
        let mut bm = PageBitmap::new(pages);
        bm.set_range(10, 3).unwrap();
        bm.set(4000).unwrap();
        let p = dir.path().join("l.layer");
        let info = write_layer(&p, &[&mem], &bm, &WriteOptions::default()).unwrap();
        assert_eq!(info.pages_written, 4);
        assert_eq!(info.writes, 2);

        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), pages * PAGE_SIZE);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= 64 * PAGE_SIZE,
            "allocated {allocated} bytes for 4 pages"
        );

        assert_layer_holds(&std::fs::read(&p).unwrap(), &mem, &bm);
    }

    #[test]
    fn runs_crossing_slices_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let mem = patterned(128);
        let (low, high) = mem.split_at(48 * PAGE_SIZE as usize);
        let mut bm = PageBitmap::new(128);
        bm.set_range(40, 20).unwrap(); // crosses the boundary at page 48
        bm.set(0).unwrap();
        bm.set(127).unwrap();
        let p = dir.path().join("two.layer");
        let info = write_layer(&p, &[low, high], &bm, &WriteOptions::default()).unwrap();
        assert_eq!(info.pages_written, 22);
        assert_eq!(info.writes, 4);
        assert_layer_holds(&std::fs::read(&p).unwrap(), &mem, &bm);
    }

    #[test]
    fn slices_of_partial_pages_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mem = vec![0u8; 2 * PAGE_SIZE as usize];
        let (a, b) = mem.split_at(100);
        let err = write_layer(
            &dir.path().join("x"),
            &[a, b],
            &PageBitmap::new(2),
            &WriteOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidMemory { .. }), "{err:?}");
    }

    #[test]
    fn size_mismatch_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_layer(
            &dir.path().join("x"),
            &[&[0u8; 2 * PAGE_SIZE as usize]],
            &PageBitmap::new(1),
            &WriteOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::BitmapMismatch { .. }));
    }

    #[test]
    fn injected_fault_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.layer");
        let mut bm = PageBitmap::new(64);
        bm.set_range(0, 64).unwrap();
        let old = vec![0x11u8; 64 * PAGE_SIZE as usize];
        write_layer(&p, &[&old], &bm, &WriteOptions::default()).unwrap();

        let new = vec![0x22u8; 64 * PAGE_SIZE as usize];
        for fail_at in [0, 1, PAGE_SIZE * 3 + 5] {
            let err =
                write_layer(&p, &[&new], &bm, &WriteOptions::failing_after(fail_at)).unwrap_err();
            match err {
                Error::Io { source, .. } => {
                    assert_eq!(source.to_string(), INJECTED_FAULT_MESSAGE)
                }
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(std::fs::read(&p).unwrap(), old);
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(names.len(), 1, "temporary left behind");
        }
        // A budget covering everything succeeds.
        write_layer(&p, &[&new], &bm, &WriteOptions::failing_after(u64::MAX)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), new);
    }

    #[test]
    fn open_layer_checks_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short");
        std::fs::write(&p, [0u8; 10]).unwrap();
        assert!(matches!(
            open_layer(&p, PAGE_SIZE),
            Err(Error::InvalidMemory { .. })
        ));
        assert!(open_layer(&p, 10).is_ok());
    }
}

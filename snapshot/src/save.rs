//! The memory write policy: what a pause and a template store, and how.
//!
//! [`save_memory`] stores a paused guest's memory as the smallest change to
//! the chain it was restored from (inline pages, or one more layer, or a
//! merge into a new base); [`save_full_image`] stores a self-contained base
//! for a template. Both write layer files only and return the
//! [`StoredMemory`] that names them: the integrator then writes its state
//! file holding that value (the commit point) and, after a pause, calls
//! [`remove_unreferenced_layers`](crate::chain::remove_unreferenced_layers).

use std::fs;
use std::io;
use std::path::Path;

use crate::atomic;
use crate::bitmap::PageBitmap;
use crate::chain::{LayerDesc, MemoryChain};
use crate::error::{Error, IoContext, Result};
use crate::flat::FlatLayout;
use crate::memory::{region_slice, write_layer, WriteOptions};
use crate::stored::{PagePatch, StoredMemory};
use crate::{LAYER_EXTENSION, PAGE_SIZE};

/// How many random names [`free_layer_name`] tries before giving up.
const NAME_ATTEMPTS: usize = 16;

/// Thresholds of [`save_memory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavePolicy {
    /// A pause that dirtied at most this many pages (over an existing chain)
    /// stores them inline in the state file instead of a new layer file: one
    /// file and one fsync instead of two, and no layer to map on resume.
    /// Default 16.
    pub inline_max_pages: u64,
    /// Layers of at least this many pages are written with `O_DIRECT`: several
    /// times faster than buffered writes plus fsync for large layers, and they
    /// leave no page cache behind (a pause is meant to free memory). Smaller
    /// ones go through the page cache, which keeps them warm for a quick
    /// resume. Default 256.
    pub direct_io_min_pages: u64,
    /// Most layers a chain may have: a pause over a chain this long writes one
    /// new base with every page instead of one more layer (Wrenn merges after
    /// 8 generations). `0` counts as `1`. Default 8.
    pub max_layers: usize,
}

impl Default for SavePolicy {
    fn default() -> Self {
        Self {
            inline_max_pages: 16,
            direct_io_min_pages: 256,
            max_layers: 8,
        }
    }
}

/// Writes the layer files for a pause of a guest into `dir` (which must
/// exist) and returns the [`StoredMemory`] describing its memory.
///
/// `memory` is guest memory as slices in flat order (see the crate docs),
/// each a whole number of pages; `dirty` has one bit per flat page and holds
/// every page that differs from `origin`'s chain (or, without an origin, every
/// page that is not zero), including pages restored from inline patches.
/// `origin` is the directory and chain the memory was mapped from, `None` for
/// fresh memory.
///
/// * Fresh memory: one base layer with the `dirty` pages.
/// * With an origin in another directory, its layer files are first
///   hard-linked into `dir` (so `dir` no longer depends on it: a template can
///   be deleted while capsules started from it are paused).
/// * A non-empty origin chain and at most [`SavePolicy::inline_max_pages`]
///   dirty pages: the chain unchanged plus the pages inline.
/// * Otherwise one new layer of the `dirty` pages on top of the chain; when
///   the chain already has [`SavePolicy::max_layers`] layers, one new base with
///   every page of the chain and `dirty` replaces it.
///
/// The policy decides `O_DIRECT` ([`SavePolicy::direct_io_min_pages`]);
/// `options.direct_io` is ignored, its fault hook is used. Nothing here
/// replaces a file the previous state file names, so on any error that state
/// stays valid.
pub fn save_memory(
    dir: &Path,
    memory: &[&[u8]],
    dirty: &PageBitmap,
    origin: Option<(&Path, &MemoryChain)>,
    policy: &SavePolicy,
    options: &WriteOptions,
) -> Result<StoredMemory> {
    let layout = layout_for(memory, dirty)?;
    let mem_size = layout.len();
    let mut chain = match origin {
        None => MemoryChain::new(mem_size),
        Some((from, chain)) => {
            if chain.mem_size != mem_size {
                return Err(Error::MemorySizeMismatch {
                    stored: chain.mem_size,
                    expected: mem_size,
                });
            }
            if !chain.layers.is_empty() {
                chain.validate()?;
            }
            if from != dir {
                link_layers(from, dir, chain)?;
            }
            chain.clone()
        }
    };
    if !chain.layers.is_empty() && dirty.count_ones() <= policy.inline_max_pages {
        let inline = page_patches(&layout, memory, dirty)?;
        return Ok(StoredMemory { chain, inline });
    }
    let mut pages = dirty.clone();
    if chain.layers.len() >= policy.max_layers.max(1) {
        pages.or_assign(&chain.union()?)?;
        chain = MemoryChain::new(mem_size);
    }
    let direct = pages.count_ones() >= policy.direct_io_min_pages;
    let options = options.clone().with_direct_io(direct);
    push_new_layer(dir, &mut chain, memory, pages, &options)?;
    Ok(StoredMemory {
        chain,
        inline: Vec::new(),
    })
}

/// Writes a self-contained image of a guest for a template into `dir`
/// (which must exist): one base layer with every page present, that is the
/// `dirty` pages and every page of `origin` (the chain the memory was mapped
/// from, if any).
///
/// `memory` and `dirty` are as for [`save_memory`]. The layer goes through
/// the page cache: templates are mapped soon by many readers, which then
/// start warm.
pub fn save_full_image(
    dir: &Path,
    memory: &[&[u8]],
    dirty: &PageBitmap,
    origin: Option<&MemoryChain>,
) -> Result<StoredMemory> {
    let layout = layout_for(memory, dirty)?;
    let mut pages = dirty.clone();
    if let Some(origin) = origin {
        pages.or_assign(&origin.union()?)?;
    }
    let mut chain = MemoryChain::new(layout.len());
    push_new_layer(dir, &mut chain, memory, pages, &WriteOptions::default())?;
    Ok(StoredMemory {
        chain,
        inline: Vec::new(),
    })
}

/// The layout of `memory`, checked against `dirty` and not empty.
fn layout_for(memory: &[&[u8]], dirty: &PageBitmap) -> Result<FlatLayout> {
    let layout = FlatLayout::new(memory.iter().map(|m| m.len() as u64))?;
    if layout.len() == 0 {
        return Err(Error::invalid("guest memory is empty"));
    }
    if layout.len() != dirty.page_count().saturating_mul(PAGE_SIZE) {
        return Err(Error::bitmap(format!(
            "memory of {} bytes does not match a bitmap of {} pages",
            layout.len(),
            dirty.page_count()
        )));
    }
    Ok(layout)
}

/// Writes `pages` of `memory` as a new layer file in `dir` and appends it to `chain`.
fn push_new_layer(
    dir: &Path,
    chain: &mut MemoryChain,
    memory: &[&[u8]],
    pages: PageBitmap,
    options: &WriteOptions,
) -> Result<()> {
    let name = free_layer_name(dir, chain)?;
    write_layer(&dir.join(&name), memory, &pages, options)?;
    chain.push_layer(LayerDesc {
        file_name: name,
        pages,
    })
}

/// Copies the pages set in `pages` out of `memory`.
fn page_patches(
    layout: &FlatLayout,
    memory: &[&[u8]],
    pages: &PageBitmap,
) -> Result<Vec<PagePatch>> {
    let mut patches = Vec::new();
    for (first, count) in pages.runs() {
        for piece in layout.pieces(first * PAGE_SIZE, count * PAGE_SIZE)? {
            let data = region_slice(memory, piece.region, piece.region_offset, piece.len)?;
            let first_page = piece.flat_offset / PAGE_SIZE;
            // Regions are whole pages, so every chunk is exactly one page.
            for (page, chunk) in (first_page..).zip(data.chunks_exact(PAGE_SIZE as usize)) {
                patches.push(PagePatch {
                    page,
                    data: chunk.to_vec(),
                });
            }
        }
    }
    Ok(patches)
}

/// Hard-links `chain`'s layer files from `from` into `to`, so that a snapshot in
/// `to` can use the chain without `from` (which may then be deleted); names already
/// in `to` are kept (left by an earlier, interrupted save of the same chain). The
/// links become durable with the state file, whose atomic write fsyncs `to`.
pub fn link_layers(from: &Path, to: &Path, chain: &MemoryChain) -> Result<()> {
    for layer in &chain.layers {
        let source = from.join(&layer.file_name);
        let target = to.join(&layer.file_name);
        match fs::hard_link(&source, &target) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other.at(&source)?,
        }
    }
    Ok(())
}

/// A fresh layer file name: 16 random hex digits and [`LAYER_EXTENSION`].
fn layer_name() -> String {
    format!("{:016x}.{LAYER_EXTENSION}", atomic::unique_u64())
}

/// A [`layer_name`] used neither by `chain` nor by a file in `dir`.
fn free_layer_name(dir: &Path, chain: &MemoryChain) -> Result<String> {
    for _ in 0..NAME_ATTEMPTS {
        let name = layer_name();
        let taken = chain.layers.iter().any(|l| l.file_name == name);
        match fs::symlink_metadata(dir.join(&name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !taken => return Ok(name),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(dir, e)),
            _ => {}
        }
    }
    Err(Error::invalid("could not find a free layer file name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_plain_and_distinct() {
        let a = layer_name();
        let b = layer_name();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16 + 1 + LAYER_EXTENSION.len());
        assert!(a.ends_with(".layer"));
        assert!(a[..16].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn default_policy_values() {
        let p = SavePolicy::default();
        assert_eq!(
            (p.inline_max_pages, p.direct_io_min_pages, p.max_layers),
            (16, 256, 8)
        );
    }
}

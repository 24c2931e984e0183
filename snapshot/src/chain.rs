//! Chains of memory layers: manifest, restore plan and merging.
//!
//! A snapshot's memory is an ordered chain of layers, base first, then diffs.
//! A page's contents come from the newest layer whose bitmap holds it; a page
//! in no layer is zero. Chains grow by one diff per incremental snapshot and
//! are collapsed by [`merge`] once they get longer than a limit.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bitmap::PageBitmap;
use crate::error::{Error, Result};
use crate::mapping::PrivateMapping;
use crate::memory::{self, WriteOptions};
use crate::{atomic, state_file, LAYER_EXTENSION, MANIFEST_FILE_NAME, PAGE_SIZE};

/// Default for the `max_layers` argument of [`merge`]: eight generations.
pub const DEFAULT_MAX_LAYERS: usize = 8;

/// One layer of a chain: a layer file (see [`crate::memory`]) and the pages present in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    /// Name of the layer file, relative to the snapshot directory. Must be a
    /// plain file name: no `/`, not `.`/`..`, not starting with `.`, no NUL.
    pub file_name: String,
    /// Pages stored in the layer.
    pub pages: PageBitmap,
}

/// A snapshot's memory: the manifest stored in `memory.manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChain {
    /// Page size in bytes; always [`PAGE_SIZE`].
    pub page_size: u64,
    /// Size of guest memory in bytes (a multiple of `page_size`); every layer file has this length.
    pub mem_size: u64,
    /// Layers, base first, newest last.
    pub layers: Vec<LayerDesc>,
}

/// A run of consecutive pages restored from one layer, see [`restore_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRun {
    /// Index into [`MemoryChain::layers`] of the layer holding the run.
    pub layer_index: usize,
    /// That layer's file name.
    pub file_name: String,
    /// Byte offset of the run, both in guest memory and in the layer file.
    pub offset: u64,
    /// Length of the run in bytes (a multiple of the page size).
    pub len: u64,
}

impl MemoryChain {
    /// An empty chain (no layers yet) for `mem_size` bytes of guest memory.
    pub fn new(mem_size: u64) -> Self {
        Self {
            page_size: PAGE_SIZE,
            mem_size,
            layers: Vec::new(),
        }
    }

    /// Number of guest pages.
    pub fn page_count(&self) -> u64 {
        self.mem_size / PAGE_SIZE
    }

    /// Appends a layer (newest last) after checking it fits the chain.
    pub fn push_layer(&mut self, layer: LayerDesc) -> Result<()> {
        self.check_layer(&layer)?;
        self.layers.push(layer);
        Ok(())
    }

    /// Checks the chain's internal consistency: page size, memory size, at
    /// least one layer (the base), every bitmap's page count, safe and unique
    /// file names.
    ///
    /// Requiring a base also bounds memory use on untrusted manifests: every
    /// layer's bitmap is as large as the memory size implies, so a manifest
    /// cannot claim a huge memory size without being correspondingly large.
    pub fn validate(&self) -> Result<()> {
        if self.page_size != PAGE_SIZE {
            return Err(Error::invalid(format!(
                "page size {} unsupported (only {PAGE_SIZE})",
                self.page_size
            )));
        }
        if self.mem_size == 0 || self.mem_size % PAGE_SIZE != 0 {
            return Err(Error::invalid(format!(
                "memory size {} is not a positive multiple of {PAGE_SIZE}",
                self.mem_size
            )));
        }
        if self.layers.is_empty() {
            return Err(Error::invalid("memory chain has no base layer"));
        }
        let mut names = HashSet::new();
        for layer in &self.layers {
            self.check_layer(layer)?;
            if !names.insert(layer.file_name.as_str()) {
                return Err(Error::invalid(format!(
                    "layer file {:?} listed twice",
                    layer.file_name
                )));
            }
        }
        Ok(())
    }

    /// Union of all layers' pages: every page with non-zero-by-definition contents.
    pub fn union(&self) -> Result<PageBitmap> {
        let mut all = PageBitmap::new(self.page_count());
        for layer in &self.layers {
            all.or_assign(&layer.pages)?;
        }
        Ok(all)
    }

    fn check_layer(&self, layer: &LayerDesc) -> Result<()> {
        validate_file_name(&layer.file_name)?;
        if layer.pages.page_count() != self.page_count() {
            return Err(Error::bitmap(format!(
                "layer {:?} has {} pages, memory has {}",
                layer.file_name,
                layer.pages.page_count(),
                self.page_count()
            )));
        }
        Ok(())
    }
}

/// Rejects file names that could escape the snapshot directory or collide
/// with temporaries.
fn validate_file_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255;
    if bad {
        return Err(Error::invalid(format!("unsafe layer file name {name:?}")));
    }
    Ok(())
}

/// Validates `chain` and writes it to `dir/memory.manifest` atomically.
pub fn save_manifest(dir: &Path, chain: &MemoryChain) -> Result<()> {
    chain.validate()?;
    state_file::write_state(&dir.join(MANIFEST_FILE_NAME), chain)
}

/// Reads `dir/memory.manifest` and validates the chain in it.
pub fn load_manifest(dir: &Path) -> Result<MemoryChain> {
    let chain: MemoryChain = state_file::read_state(&dir.join(MANIFEST_FILE_NAME))?;
    chain.validate()?;
    Ok(chain)
}

/// For every page, the newest layer holding it, as coalesced runs sorted by
/// offset.
///
/// Runs owned by the base (layer 0) are included too, so the plan alone
/// describes the whole memory; pages in no layer appear in no run and read
/// as zero. [`PrivateMapping::map_chain`] maps the base file whole and then
/// only applies the runs with `layer_index > 0`.
pub fn restore_plan(chain: &MemoryChain) -> Result<Vec<MapRun>> {
    chain.validate()?;
    let mut claimed = PageBitmap::new(chain.page_count());
    let mut runs = Vec::new();
    for (index, layer) in chain.layers.iter().enumerate().rev() {
        let mut owned = layer.pages.clone();
        owned.and_not_assign(&claimed)?;
        claimed.or_assign(&layer.pages)?;
        runs.extend(owned.runs().map(|(first, count)| MapRun {
            layer_index: index,
            file_name: layer.file_name.clone(),
            offset: first * PAGE_SIZE,
            len: count * PAGE_SIZE,
        }));
    }
    runs.sort_unstable_by_key(|r| r.offset);
    Ok(runs)
}

/// Reads the memory described by `chain` (layer files in `dir`) into `dst`
/// with plain positioned reads: the copying alternative to
/// [`PrivateMapping::map_chain`]. `dst` must be `chain.mem_size` bytes.
pub fn restore_into(dir: &Path, chain: &MemoryChain, dst: &mut [u8]) -> Result<()> {
    if dst.len() as u64 != chain.mem_size {
        return Err(Error::invalid(format!(
            "destination is {} bytes, memory is {}",
            dst.len(),
            chain.mem_size
        )));
    }
    let plan = restore_plan(chain)?;
    dst.fill(0);
    let mut files = LayerFiles::new(dir, chain.mem_size);
    for run in &plan {
        let (file, path) = files.get(run.layer_index, &run.file_name)?;
        let range = run.offset as usize..(run.offset + run.len) as usize;
        let Some(buf) = dst.get_mut(range) else {
            return Err(Error::invalid("run outside memory"));
        };
        memory::read_exact_at(file, path, buf, run.offset)?;
    }
    Ok(())
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The chain had at most `max_layers` layers and was left alone.
    Unchanged,
    /// The chain was collapsed into the single base layer described by the new chain.
    Merged(MemoryChain),
}

/// Collapses `chain` (layer files in `dir`) into a single base layer when it
/// has more than `max_layers` layers (`0` is treated as `1`).
///
/// Crash-safe order: the new base `merged-<hex>.layer` is written atomically
/// (holding exactly the union of all layers' pages, taken through a
/// [`PrivateMapping`] of the old chain); then the new one-layer manifest
/// replaces `dir/memory.manifest` atomically; only then are the old layer
/// files deleted. A crash before the manifest switch leaves the old chain
/// intact (plus an orphan that [`remove_unreferenced_layers`] deletes); a
/// crash after it leaves a valid new chain (plus orphans).
pub fn merge(chain: &MemoryChain, dir: &Path, max_layers: usize) -> Result<MergeOutcome> {
    chain.validate()?;
    if chain.layers.len() <= max_layers.max(1) {
        return Ok(MergeOutcome::Unchanged);
    }
    let union = chain.union()?;
    let name = fresh_layer_name(dir, chain)?;
    let path = dir.join(&name);
    {
        let mapping = PrivateMapping::map_chain(dir, chain)?;
        memory::write_layer(
            &path,
            &[mapping.as_slice()],
            &union,
            &WriteOptions::default(),
        )?;
    }
    let merged = MemoryChain {
        page_size: chain.page_size,
        mem_size: chain.mem_size,
        layers: vec![LayerDesc {
            file_name: name,
            pages: union,
        }],
    };
    if let Err(e) = save_manifest(dir, &merged) {
        // The old manifest is still in place; drop the unreferenced new base.
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    for layer in &chain.layers {
        let old = dir.join(&layer.file_name);
        if let Err(e) = fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %e, "could not remove merged layer");
        }
    }
    atomic::sync_dir(dir)?;
    tracing::info!(
        dir = %dir.display(),
        from = chain.layers.len(),
        "merged memory chain into one base layer"
    );
    Ok(MergeOutcome::Merged(merged))
}

/// Deletes `*.layer` files in `dir` that `chain` does not reference, and
/// temporaries left by interrupted writes. Returns how many files were removed.
pub fn remove_unreferenced_layers(dir: &Path, chain: &MemoryChain) -> Result<usize> {
    let keep: HashSet<&str> = chain.layers.iter().map(|l| l.file_name.as_str()).collect();
    let mut removed = atomic::remove_stale_temps(dir)?;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let is_layer = path.extension().is_some_and(|e| e == LAYER_EXTENSION);
        let referenced = entry.file_name().to_str().is_some_and(|n| keep.contains(n));
        if is_layer && !referenced && entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        atomic::sync_dir(dir)?;
    }
    Ok(removed)
}

/// A `merged-<16 hex>.layer` name used neither by `chain` nor by a file in `dir`.
fn fresh_layer_name(dir: &Path, chain: &MemoryChain) -> Result<String> {
    for _ in 0..16 {
        let name = format!("merged-{:016x}.{LAYER_EXTENSION}", atomic::unique_u64());
        let taken = chain.layers.iter().any(|l| l.file_name == name);
        match fs::symlink_metadata(dir.join(&name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !taken => return Ok(name),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(dir, e)),
            _ => {}
        }
    }
    Err(Error::invalid("could not find a free layer file name"))
}

/// Lazily opened, length-checked layer files of a chain.
pub(crate) struct LayerFiles<'a> {
    dir: &'a Path,
    mem_size: u64,
    open: Vec<Option<(fs::File, std::path::PathBuf)>>,
}

impl<'a> LayerFiles<'a> {
    pub(crate) fn new(dir: &'a Path, mem_size: u64) -> Self {
        Self {
            dir,
            mem_size,
            open: Vec::new(),
        }
    }

    /// The open file of layer `index` named `name`, opening it on first use.
    pub(crate) fn get(&mut self, index: usize, name: &str) -> Result<(&fs::File, &Path)> {
        if self.open.len() <= index {
            self.open.resize_with(index + 1, || None);
        }
        let slot = &mut self.open[index];
        if slot.is_none() {
            let path = self.dir.join(name);
            let file = memory::open_layer(&path, self.mem_size)?;
            *slot = Some((file, path));
        }
        match slot {
            Some((file, path)) => Ok((file, path.as_path())),
            None => Err(Error::invalid("layer file slot empty")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_with(pages: u64, layers: &[&[(u64, u64)]]) -> MemoryChain {
        let mut c = MemoryChain::new(pages * PAGE_SIZE);
        for (i, runs) in layers.iter().enumerate() {
            let mut bm = PageBitmap::new(pages);
            for &(f, n) in *runs {
                bm.set_range(f, n).unwrap();
            }
            c.push_layer(LayerDesc {
                file_name: format!("l{i}.layer"),
                pages: bm,
            })
            .unwrap();
        }
        c
    }

    #[test]
    fn plan_picks_newest_layer_per_page() {
        let c = chain_with(16, &[&[(0, 16)], &[(2, 4)], &[(4, 4), (15, 1)]]);
        let plan: Vec<_> = restore_plan(&c)
            .unwrap()
            .into_iter()
            .map(|r| (r.layer_index, r.offset / PAGE_SIZE, r.len / PAGE_SIZE))
            .collect();
        assert_eq!(
            plan,
            vec![(0, 0, 2), (1, 2, 2), (2, 4, 4), (0, 8, 7), (2, 15, 1)]
        );
    }

    #[test]
    fn plan_skips_pages_in_no_layer() {
        let c = chain_with(8, &[&[(1, 1)], &[(5, 2)]]);
        let plan = restore_plan(&c).unwrap();
        let covered: u64 = plan.iter().map(|r| r.len).sum();
        assert_eq!(covered, 3 * PAGE_SIZE);
    }

    #[test]
    fn validation_rejects_bad_chains() {
        let mut c = chain_with(8, &[&[(0, 8)]]);
        assert!(c
            .push_layer(LayerDesc {
                file_name: "../evil".into(),
                pages: PageBitmap::new(8)
            })
            .is_err());
        assert!(c
            .push_layer(LayerDesc {
                file_name: "x.layer".into(),
                pages: PageBitmap::new(9)
            })
            .is_err());
        let mut dup = c.clone();
        dup.layers.push(dup.layers[0].clone());
        assert!(dup.validate().is_err());
        c.page_size = 8192;
        assert!(c.validate().is_err());
        assert!(MemoryChain::new(100).validate().is_err());
    }

    #[test]
    fn manifest_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let c = chain_with(100, &[&[(0, 100)], &[(3, 7)]]);
        save_manifest(dir.path(), &c).unwrap();
        assert_eq!(load_manifest(dir.path()).unwrap(), c);
    }
}

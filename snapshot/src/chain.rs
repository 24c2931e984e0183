//! Chains of memory layers and the plan for restoring them.
//!
//! A snapshot's memory is an ordered chain of layers, base first, then diffs.
//! A page's contents come from the newest layer whose bitmap holds it; a page
//! in no layer is zero. [`crate::save`] decides when a chain grows by a diff
//! and when it is collapsed into a new base.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bitmap::PageBitmap;
use crate::error::{Error, Result};
use crate::memory;
use crate::{atomic, LAYER_EXTENSION, PAGE_SIZE};

/// One layer of a chain: a layer file (see [`crate::memory`]) and the pages present in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    /// Name of the layer file, relative to the snapshot directory. Must be a
    /// plain file name: no `/`, not `.`/`..`, not starting with `.`, no NUL.
    pub file_name: String,
    /// Pages stored in the layer.
    pub pages: PageBitmap,
}

/// A snapshot's memory layers, as the integrator stores them (inside a
/// [`crate::stored::StoredMemory`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChain {
    /// Page size in bytes; always [`PAGE_SIZE`].
    pub page_size: u64,
    /// Size of guest memory in bytes (a multiple of `page_size`): all regions
    /// together. Every layer file has this length.
    pub mem_size: u64,
    /// Layers, base first, newest last.
    pub layers: Vec<LayerDesc>,
}

/// A run of consecutive pages restored from one layer, see [`restore_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapRun {
    /// Index into [`MemoryChain::layers`] of the layer holding the run.
    pub(crate) layer_index: usize,
    /// That layer's file name.
    pub(crate) file_name: String,
    /// Flat byte offset of the run, both in guest memory and in the layer file.
    pub(crate) offset: u64,
    /// Length of the run in bytes (a multiple of the page size).
    pub(crate) len: u64,
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
    /// Requiring a base also bounds memory use on untrusted state files: every
    /// layer's bitmap is as large as the memory size implies, so a chain
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

    /// Opens the base layer (the first) in `dir` for mapping, checking that it is exactly
    /// `mem_size` bytes long: a shorter file would fault the host when a page past its end
    /// is touched. A chain without layers is [`Error::InvalidMemory`].
    pub fn open_base(&self, dir: &Path) -> Result<std::fs::File> {
        let base = self
            .layers
            .first()
            .ok_or_else(|| Error::invalid("the memory chain has no base layer"))?;
        memory::open_layer(&dir.join(&base.file_name), self.mem_size)
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

/// For every page, the newest layer holding it, as coalesced runs sorted by
/// offset.
///
/// Runs owned by the base (layer 0) are included too, so the plan alone
/// describes the whole memory; pages in no layer appear in no run and read
/// as zero. [`crate::mapping::overlay_layers`] only applies the runs with
/// `layer_index > 0`; the caller maps the base.
pub(crate) fn restore_plan(chain: &MemoryChain) -> Result<Vec<MapRun>> {
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

/// Deletes `*.layer` files in `dir` that `chain` does not reference, and
/// temporaries left by interrupted writes. Returns how many files were removed.
///
/// Call it only after the state file naming `chain` is committed: until then
/// the previous state file may still need the layers this deletes.
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
}

//! On-disk snapshot format for capsule microVMs.
//!
//! This crate knows nothing about KVM or the VM lifecycle: it only defines
//! how a snapshot is laid out on disk and how to write it crash-safely and
//! read it back without trusting its contents.
//!
//! # Directory layout
//!
//! A snapshot is one directory:
//!
//! ```text
//! <snapshot>/
//!   state.bin          STATE_FILE_NAME: a state file (below) holding whatever
//!                      vCPU/device state the integrator serializes
//!   memory.manifest    MANIFEST_FILE_NAME: a state file whose payload is a
//!                      chain::MemoryChain describing the memory layers
//!   <name>.layer       memory layer files (LAYER_EXTENSION), referenced by
//!                      name from the manifest: base first, then diffs
//! ```
//!
//! Every file is written with [`atomic::write_file`] (temporary name, fsync,
//! rename, fsync of the directory); a new directory (a template) is built
//! under a hidden name and published with [`atomic::publish_new_dir`]. Files
//! and directories named `.<name>.tmp-<hex>` are leftovers of interrupted
//! writes, never valid data.
//!
//! # State file format (version 1)
//!
//! All integers little-endian; 32-byte header followed by the payload:
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 8    | magic: the bytes `43 41 50 53 4E 41 50 00` (`b"CAPSNAP\0"`)  |
//! | 8      | 4    | format version, `u32` = 1 ([`state_file::FORMAT_VERSION`])    |
//! | 12     | 4    | flags, `u32`; no flag is defined, writers store 0, readers reject any set bit |
//! | 16     | 8    | payload length `N` in bytes, `u64`                           |
//! | 24     | 8    | CRC-64/XZ of the payload, `u64`                              |
//! | 32     | N    | payload                                                      |
//!
//! The file is exactly `32 + N` bytes long; a shorter file is
//! [`Error::Truncated`], a longer one [`Error::TrailingData`].
//!
//! The checksum is **CRC-64/XZ** (also known as CRC-64/GO-ECMA): ECMA-182
//! polynomial `0x42F0E1EBA9EA3693`, reflected input and output, initial value
//! and final xor `0xFFFFFFFFFFFFFFFF`, check value `0x995DC9BBDF1939FA` for
//! `"123456789"`. It covers the payload only.
//!
//! The payload is the serde value encoded with bincode 1.3 using explicit
//! options: little-endian, varint integer encoding, no trailing bytes. While
//! decoding, bincode's byte limit is set to `N`, so a corrupt length prefix
//! inside the payload fails instead of allocating.
//!
//! A reader checks, in order: magic ([`Error::BadMagic`]), version
//! ([`Error::UnsupportedVersion`]; a reader only accepts its own
//! [`state_file::FORMAT_VERSION`] and looks at nothing past the version field
//! otherwise), flags, the payload length against the real file size
//! (before allocating), the CRC ([`Error::ChecksumMismatch`]) and finally
//! the decoding ([`Error::Decode`]).
//!
//! # Memory layer files
//!
//! A layer file has **no header**: it is a raw image exactly `mem_size` bytes
//! long in which every present page sits at its own guest-physical offset
//! (page `p` at byte `p * 4096`) and every absent page is a hole (the file is
//! sparse, absent pages read as zero). Which pages are present is not stored
//! in the layer but in the manifest ([`bitmap::PageBitmap`] per layer). Layer
//! files are immutable once written: restore maps them `MAP_PRIVATE`.
//!
//! # Memory manifest
//!
//! `memory.manifest` is a state file whose payload is a
//! [`chain::MemoryChain`]: `page_size` (always 4096), `mem_size`, then the
//! layers, base first, each as `{ file_name, pages: PageBitmap }`; a
//! `PageBitmap` encodes as `{ pages: u64, words: [u64] }` in KVM dirty-log bit
//! order. The contents of a page is that of the newest layer whose bitmap has
//! it; a page in no layer is zero. A valid chain has at least one layer (the
//! base), memory size a positive multiple of 4096, one bitmap per layer of
//! exactly `mem_size / 4096` pages and plain, unique layer file names.
//!
//! # Writing, merging, restoring
//!
//! * Full snapshot: [`memory::write_layer`] with all pages (or the resident
//!   ones from [`bitmap::resident_pages`]) as the base. Incremental snapshot:
//!   `write_layer` with the dirty bitmap ([`bitmap::PageBitmap::from_kvm_words`]),
//!   then [`chain::MemoryChain::push_layer`] and [`chain::save_manifest`].
//! * [`chain::merge`] collapses a chain longer than `max_layers`
//!   (default [`chain::DEFAULT_MAX_LAYERS`] = 8) into one new base: new base
//!   first, then the manifest switch, then deletion of the old layers.
//! * [`mapping::PrivateMapping::map_chain`] restores without copying:
//!   the base is mapped `MAP_PRIVATE`, newer runs are `MAP_FIXED` over it
//!   (at most [`mapping::MAX_OVERLAY_MAPPINGS`], the rest copied with
//!   `pread`). [`chain::restore_into`] is the plain copying alternative.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod atomic;
pub mod bitmap;
pub mod chain;
mod codec;
mod error;
mod flat;
pub mod mapping;
pub mod memory;
pub mod state_file;

pub use error::{CodecError, Error, Result};

/// Size of a guest page in bytes; the only page size this format supports.
pub const PAGE_SIZE: u64 = 4096;

/// File name of the vCPU/device state file inside a snapshot directory.
pub const STATE_FILE_NAME: &str = "state.bin";

/// File name of the memory manifest inside a snapshot directory.
pub const MANIFEST_FILE_NAME: &str = "memory.manifest";

/// Extension of memory layer files inside a snapshot directory.
pub const LAYER_EXTENSION: &str = "layer";

//! On-disk snapshot format for capsule microVMs.
//!
//! This crate knows nothing about KVM or the VM lifecycle: it defines how a
//! snapshot is laid out on disk, decides what a pause writes (the save
//! policy), writes it crash-safely and reads it back without trusting its
//! contents.
//!
//! # Directory layout
//!
//! A snapshot is one directory:
//!
//! ```text
//! <snapshot>/
//!   state.bin          STATE_FILE_NAME: a state file (below) holding whatever
//!                      vCPU/device state the integrator serializes, and a
//!                      stored::StoredMemory describing guest memory
//!   <16 hex>.layer     memory layer files (LAYER_EXTENSION), referenced by
//!                      name from the StoredMemory: base first, then diffs
//! ```
//!
//! `state.bin` is the commit point: it is written last, with
//! [`atomic::write_file`] (temporary name, fsync, rename, fsync of the
//! directory), and names exactly the layers it needs. Layer files are written
//! the same way before it, so a crash or an error at any point leaves the
//! previous `state.bin` and every layer it names intact; layers no state file
//! names are orphans that [`chain::remove_unreferenced_layers`] deletes after
//! the next commit. A new directory (a template) is built under a hidden name
//! and published with [`atomic::publish_new_dir`]. Files named
//! `.<name>.tmp-<hex>` and directories named `.<name>.tmp-<hex>` are
//! leftovers of interrupted writes, never valid data.
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
//! # Guest memory: regions and flat offsets
//!
//! Guest memory may be several regions (a Linux guest has RAM below and above
//! the 32-bit PCI gap). The format sees them as one "flat" memory: the regions
//! laid end to end in guest-physical order (region 0's bytes, then region
//! 1's, ...), each a whole number of pages. Byte offsets and page numbers in
//! layer files, bitmaps and inline pages are flat; mapping a flat offset back
//! to a guest-physical address is the integrator's business. APIs that touch
//! memory take it as several host slices ([`memory::write_layer`],
//! [`save::save_memory`]) or host ranges ([`mapping::overlay_layers`]) in flat
//! order, and split runs of pages where they cross from one into the next.
//! (The VMM joins the dirty logs of several KVM memory slots into one flat
//! bitmap; [`bitmap::PageBitmap::from_kvm_words`] takes it.)
//!
//! # Memory layer files
//!
//! A layer file has **no header**: it is a raw image exactly `mem_size` bytes
//! long (all regions) in which every present page sits at its own flat offset
//! (page `p` at byte `p * 4096`) and every absent page is a hole (the file is
//! sparse, absent pages read as zero). Which pages are present is not stored
//! in the layer but in the chain ([`bitmap::PageBitmap`] per layer). Layer
//! files are immutable once written: restore maps them `MAP_PRIVATE`.
//!
//! # Stored memory
//!
//! The integrator embeds a [`stored::StoredMemory`] in its `state.bin`
//! payload: `{ chain, inline }`. `chain` is a [`chain::MemoryChain`]:
//! `page_size` (always 4096), `mem_size`, then the layers, base first, each as
//! `{ file_name, pages: PageBitmap }`; a `PageBitmap` encodes as
//! `{ pages: u64, words: [u64] }` in KVM dirty-log bit order. `inline` is a
//! list of `{ page, data }` pages newer than the chain. A page's contents are
//! its inline copy if any, else those of the newest layer whose bitmap has it;
//! a page in no layer is zero. A valid chain has at least one layer (the
//! base), memory size a positive multiple of 4096, one bitmap per layer of
//! exactly `mem_size / 4096` pages and plain, unique layer file names; every
//! inline page lies inside memory and is exactly 4096 bytes
//! ([`stored::StoredMemory::validate`]). The state-file header is unchanged by
//! this payload, so [`state_file::FORMAT_VERSION`] stays 1; the integrator
//! versions its own payload.
//!
//! # Save policy
//!
//! [`save::save_memory`] stores a pause, following a [`save::SavePolicy`]:
//! fresh memory becomes one base layer of the dirty pages; over an existing
//! chain, at most `inline_max_pages` (16) dirty pages go inline in the state
//! file, more make one new layer, and a chain already `max_layers` (8) long
//! is replaced by one new base with every page. Layers of at least
//! `direct_io_min_pages` (256) pages are written with `O_DIRECT`; runs of
//! 32 MiB or more go through a 32 MiB buffer whose pages were faulted in order
//! (guest pages copied-on-write one by one are physically scattered, which
//! cuts a direct write into small requests: 1.5–2x slower measured). A chain
//! in another directory (a template's) is hard-linked in first.
//! [`save::save_full_image`] writes a template's single base layer through
//! the page cache.
//!
//! # Restoring
//!
//! The integrator maps the base layer `MAP_PRIVATE` as guest memory (each
//! region from its flat offset), then [`mapping::overlay_layers`] maps newer
//! runs `MAP_FIXED` over it (at most [`mapping::MAX_OVERLAY_MAPPINGS`], the
//! rest copied with `pread`), and finally the integrator writes the inline
//! pages and counts them as dirty so the next save carries them forward.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod atomic;
pub mod bitmap;
mod bounce;
pub mod chain;
mod codec;
mod error;
mod flat;
pub mod mapping;
pub mod memory;
pub mod save;
pub mod state_file;
pub mod stored;

pub use error::{CodecError, Error, Result};

/// Size of a guest page in bytes; the only page size this format supports.
pub const PAGE_SIZE: u64 = 4096;

/// File name of the vCPU/device state file inside a snapshot directory.
pub const STATE_FILE_NAME: &str = "state.bin";

/// Extension of memory layer files inside a snapshot directory.
pub const LAYER_EXTENSION: &str = "layer";

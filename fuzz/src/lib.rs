//! Input formats of the fuzz targets, shared with the seed-corpus generator
//! (`examples/gen_corpus`), so that seeds are encoded by the same code that decodes them.
//!
//! The decoders under test have their own encoders (in their crates); what lives here is only
//! what is the fuzz targets' own: the `virtio_mmio` program, the `virtio_queue` memory layout,
//! and the state-file header repair that lets mutated payloads past the checksum.

pub mod mmio_program;
pub mod queue_layout;
pub mod state_image;

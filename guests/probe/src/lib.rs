//! The built-in probe guest, compiled from `guest/main.rs` at build time.
//!
//! The image is flat: copy [`IMAGE`] to guest-physical [`probe_abi::IMAGE_ADDR`] and start a
//! vCPU at [`ENTRY`] in 64-bit user mode (see `probe_abi` for the layout and the protocol).
#![deny(missing_docs)]

/// The probe program, laid out flat from `probe_abi::IMAGE_ADDR` (bss not included: guest
/// memory starts zeroed).
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.bin"));

/// Guest-virtual address of the probe's entry point (`_start`).
pub const ENTRY: u64 = include!(concat!(env!("OUT_DIR"), "/probe_entry.rs"));

// The entry point lies in the loaded image's range (checked at compile time).
const _: () =
    assert!(ENTRY >= probe_abi::IMAGE_ADDR && ENTRY < probe_abi::IMAGE_ADDR + probe_abi::IMAGE_MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_loaded_where_it_was_linked() {
        assert!(ENTRY < probe_abi::IMAGE_ADDR + IMAGE.len() as u64);
        assert!(IMAGE.len() as u64 <= probe_abi::IMAGE_MAX);
    }
}

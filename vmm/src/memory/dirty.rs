//! Pages the VMM itself wrote into guest memory, which KVM's dirty log does not see.

use std::ops::Deref;

use vm_memory::GuestMemoryBackend;

use super::GuestMemory;

/// Takes (and clears) the bitmap of pages the VMM wrote through `memory`'s accessors: one
/// vector per region, in flat order, each in KVM's dirty-log word format (bit i of word w =
/// page 64w + i of that region).
pub fn take_vmm_dirty(memory: &GuestMemory) -> Vec<Vec<u64>> {
    memory
        .iter()
        .map(|region| region.deref().bitmap().get_and_reset())
        .collect()
}

/// ORs `other` into `words`, growing `words` to the longer length.
pub(crate) fn or_words(words: &mut Vec<u64>, other: &[u64]) {
    if words.len() < other.len() {
        words.resize(other.len(), 0);
    }
    for (word, bits) in words.iter_mut().zip(other) {
        *word |= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{create_anonymous, create_anonymous_regions, PAGE_SIZE};
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_are_tracked_and_cleared() {
        let mem = create_anonymous(256 * PAGE_SIZE).unwrap();
        mem.write_obj(1u8, GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(130 * PAGE_SIZE as u64))
            .unwrap();
        let words = take_vmm_dirty(&mem);
        assert_eq!(words.len(), 1);
        assert_eq!(words[0].len(), 4);
        assert_eq!(words[0][0], 1 << 3);
        assert_eq!(words[0][2], 1 << 2);
        assert!(take_vmm_dirty(&mem)[0].iter().all(|w| *w == 0));
    }

    #[test]
    fn vmm_writes_are_tracked_in_every_region() {
        let high = 1u64 << 32;
        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 64 * PAGE_SIZE),
            (GuestAddress(high), 100 * PAGE_SIZE),
        ])
        .unwrap();
        mem.write_obj(1u8, GuestAddress(5 * PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(high + 70 * PAGE_SIZE as u64))
            .unwrap();
        // A write across the boundary of two pages marks both.
        mem.write_obj(1u32, GuestAddress(high + PAGE_SIZE as u64 - 2))
            .unwrap();
        let words = take_vmm_dirty(&mem);
        assert_eq!(words, vec![vec![1 << 5], vec![0b11, 1 << 6]]);
        assert!(take_vmm_dirty(&mem).iter().flatten().all(|w| *w == 0));
    }

    #[test]
    fn words_are_ored_to_the_longer_length() {
        let mut words = vec![0b01];
        or_words(&mut words, &[0b10, 0b1]);
        assert_eq!(words, vec![0b11, 0b1]);
        or_words(&mut words, &[]);
        assert_eq!(words, vec![0b11, 0b1]);
    }
}

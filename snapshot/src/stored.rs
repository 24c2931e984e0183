//! What an integrator stores in its state file to describe guest memory.
//!
//! [`StoredMemory`] is the memory half of a snapshot: the layer chain plus a
//! few pages kept inline. The integrator embeds it in the payload of its own
//! state file (`state.bin`), which it writes last, as the commit point; the
//! layer files it names live beside that file. [`crate::save`] produces it.

use serde::{Deserialize, Serialize};

use crate::chain::MemoryChain;
use crate::error::{Error, Result};
use crate::PAGE_SIZE;

/// A page stored inline in the state file instead of in a layer file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagePatch {
    /// Flat page number (see the crate docs on several memory regions).
    pub page: u64,
    /// Its [`PAGE_SIZE`] bytes.
    pub data: Vec<u8>,
}

/// A snapshot's memory: the layer chain, then pages newer than the chain.
///
/// A page's contents are those of its inline patch if it has one, else those
/// of the chain. Encoded (serde) as `{ chain, inline: [{ page, data }] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMemory {
    /// The layer files, base first.
    pub chain: MemoryChain,
    /// Pages newer than the chain, in increasing page order.
    pub inline: Vec<PagePatch>,
}

impl StoredMemory {
    /// Checks a loaded value before it is used for a guest of `mem_size`
    /// bytes: the chain is valid ([`MemoryChain::validate`]), describes exactly
    /// `mem_size` bytes, and every inline page lies inside memory and is
    /// exactly [`PAGE_SIZE`] bytes.
    pub fn validate(&self, mem_size: u64) -> Result<()> {
        self.chain.validate()?;
        if self.chain.mem_size != mem_size {
            return Err(Error::MemorySizeMismatch {
                stored: self.chain.mem_size,
                expected: mem_size,
            });
        }
        let pages = self.chain.page_count();
        let bad = self
            .inline
            .iter()
            .find(|p| p.page >= pages || p.data.len() as u64 != PAGE_SIZE);
        if let Some(bad) = bad {
            return Err(Error::BadInlinePage {
                page: bad.page,
                len: bad.data.len(),
                pages,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::PageBitmap;
    use crate::chain::LayerDesc;

    fn stored(pages: u64) -> StoredMemory {
        let mut chain = MemoryChain::new(pages * PAGE_SIZE);
        chain
            .push_layer(LayerDesc {
                file_name: "base.layer".into(),
                pages: PageBitmap::new(pages),
            })
            .unwrap();
        StoredMemory {
            chain,
            inline: vec![PagePatch {
                page: pages - 1,
                data: vec![7; PAGE_SIZE as usize],
            }],
        }
    }

    #[test]
    fn a_well_formed_value_passes() {
        stored(8).validate(8 * PAGE_SIZE).unwrap();
    }

    #[test]
    fn malformed_values_are_rejected() {
        let good = stored(8);
        assert!(matches!(
            good.validate(16 * PAGE_SIZE),
            Err(Error::MemorySizeMismatch { stored, expected })
                if stored == 8 * PAGE_SIZE && expected == 16 * PAGE_SIZE
        ));

        let mut outside = good.clone();
        outside.inline[0].page = 8;
        assert!(matches!(
            outside.validate(8 * PAGE_SIZE),
            Err(Error::BadInlinePage {
                page: 8,
                pages: 8,
                ..
            })
        ));

        let mut short = good.clone();
        short.inline[0].data.pop();
        assert!(matches!(
            short.validate(8 * PAGE_SIZE),
            Err(Error::BadInlinePage { len: 4095, .. })
        ));

        let mut no_base = good.clone();
        no_base.chain.layers.clear();
        assert!(matches!(
            no_base.validate(8 * PAGE_SIZE),
            Err(Error::InvalidMemory { .. })
        ));

        let mut bad_bitmap = good;
        bad_bitmap.chain.layers[0].pages = PageBitmap::new(9);
        assert!(matches!(
            bad_bitmap.validate(8 * PAGE_SIZE),
            Err(Error::BitmapMismatch { .. })
        ));
    }
}

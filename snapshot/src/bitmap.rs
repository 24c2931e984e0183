//! One-bit-per-page bitmaps in KVM dirty-log order.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::PAGE_SIZE;

/// Bits per storage word.
const WORD_BITS: u64 = 64;

/// Number of `u64` words needed for `pages` bits.
fn words_for(pages: u64) -> usize {
    // `div_ceil` of a u64 by 64 always fits `usize` on 64-bit hosts.
    pages.div_ceil(WORD_BITS) as usize
}

/// A set of guest pages, one bit per [`PAGE_SIZE`] page.
///
/// Storage is a `Vec<u64>` in exactly the order KVM's
/// `KVM_GET_DIRTY_LOG` uses: bit `i` (least significant first) of word `w`
/// stands for page `w * 64 + i`. Bits at or past [`page_count`](Self::page_count)
/// are always zero.
///
/// Serialized (serde) as `{ pages: u64, words: [u64] }`; deserialization
/// rejects a word count that does not match `pages` or stray tail bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPageBitmap")]
pub struct PageBitmap {
    /// Number of pages tracked.
    pages: u64,
    /// `ceil(pages / 64)` words of bits.
    words: Vec<u64>,
}

/// Unvalidated serde form of [`PageBitmap`].
#[derive(Deserialize)]
struct RawPageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl TryFrom<RawPageBitmap> for PageBitmap {
    type Error = Error;

    fn try_from(raw: RawPageBitmap) -> Result<Self> {
        if raw.words.len() != words_for(raw.pages) {
            return Err(Error::bitmap(format!(
                "{} words cannot describe {} pages",
                raw.words.len(),
                raw.pages
            )));
        }
        let bm = PageBitmap {
            pages: raw.pages,
            words: raw.words,
        };
        if bm.tail_bits() != 0 {
            return Err(Error::bitmap("bits set past the last page"));
        }
        Ok(bm)
    }
}

impl PageBitmap {
    /// An all-clear bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; words_for(pages)],
        }
    }

    /// An all-clear bitmap covering `mem_len` bytes (rounded up to whole pages).
    pub fn for_len(mem_len: u64) -> Self {
        Self::new(mem_len.div_ceil(PAGE_SIZE))
    }

    /// Builds a bitmap from words as returned by `KVM_GET_DIRTY_LOG` for a
    /// slot of `pages` pages.
    ///
    /// `words` must hold at least `ceil(pages / 64)` words; extra words and
    /// bits past `pages` are ignored (cleared).
    pub fn from_kvm_words(words: &[u64], pages: u64) -> Result<Self> {
        let need = words_for(pages);
        let Some(src) = words.get(..need) else {
            return Err(Error::bitmap(format!(
                "{} words given, {need} needed for {pages} pages",
                words.len()
            )));
        };
        let mut bm = Self {
            pages,
            words: src.to_vec(),
        };
        bm.clear_tail();
        Ok(bm)
    }

    /// Number of pages this bitmap describes (set or not).
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The raw words (KVM dirty-log order).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether `page` is set; pages out of range read as clear.
    pub fn get(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, b) = split(page);
        self.words[w] & (1 << b) != 0
    }

    /// Marks `page` as present. Fails if `page` is out of range.
    pub fn set(&mut self, page: u64) -> Result<()> {
        self.check_page(page)?;
        let (w, b) = split(page);
        self.words[w] |= 1 << b;
        Ok(())
    }

    /// Marks `page` as absent. Fails if `page` is out of range.
    pub fn clear(&mut self, page: u64) -> Result<()> {
        self.check_page(page)?;
        let (w, b) = split(page);
        self.words[w] &= !(1 << b);
        Ok(())
    }

    /// Marks `count` pages starting at `first` as present.
    pub fn set_range(&mut self, first: u64, count: u64) -> Result<()> {
        let end = first
            .checked_add(count)
            .filter(|&end| end <= self.pages)
            .ok_or_else(|| {
                Error::bitmap(format!(
                    "range {first}+{count} exceeds {} pages",
                    self.pages
                ))
            })?;
        let mut page = first;
        while page < end {
            let (w, b) = split(page);
            let n = (WORD_BITS - u64::from(b)).min(end - page);
            let mask = if n == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            self.words[w] |= mask;
            page += n;
        }
        Ok(())
    }

    /// `self |= other`. Both must describe the same number of pages.
    pub fn or_assign(&mut self, other: &PageBitmap) -> Result<()> {
        self.check_same(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        Ok(())
    }

    /// `self &= !other` (removes every page set in `other`). Both must describe
    /// the same number of pages.
    pub fn and_not_assign(&mut self, other: &PageBitmap) -> Result<()> {
        self.check_same(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
        Ok(())
    }

    /// Number of set pages.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether any page is set.
    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }

    /// Iterates over maximal runs of consecutive set pages as
    /// `(first_page, page_count)`, in increasing page order.
    pub fn runs(&self) -> Runs<'_> {
        Runs { bm: self, pos: 0 }
    }

    /// First page `>= from` whose bit equals `want`, or `page_count()` if none.
    fn find_next(&self, from: u64, want: bool) -> u64 {
        if from >= self.pages {
            return self.pages;
        }
        let (mut w, b) = split(from);
        let flip = if want { 0 } else { u64::MAX };
        let mut word = (self.words[w] ^ flip) & (u64::MAX << b);
        loop {
            if word != 0 {
                let page = w as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                return page.min(self.pages);
            }
            w += 1;
            match self.words.get(w) {
                Some(&next) => word = next ^ flip,
                None => return self.pages,
            }
        }
    }

    fn check_page(&self, page: u64) -> Result<()> {
        if page < self.pages {
            Ok(())
        } else {
            Err(Error::bitmap(format!(
                "page {page} out of range ({} pages)",
                self.pages
            )))
        }
    }

    fn check_same(&self, other: &PageBitmap) -> Result<()> {
        if self.pages == other.pages {
            Ok(())
        } else {
            Err(Error::bitmap(format!(
                "bitmaps of {} and {} pages cannot be combined",
                self.pages, other.pages
            )))
        }
    }

    /// Bits set at or past `pages` in the last word.
    fn tail_bits(&self) -> u64 {
        let used = self.pages % WORD_BITS;
        match self.words.last() {
            Some(&last) if used != 0 => last & (u64::MAX << used),
            _ => 0,
        }
    }

    fn clear_tail(&mut self) {
        let used = self.pages % WORD_BITS;
        if used != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= !(u64::MAX << used);
            }
        }
    }
}

/// (word index, bit index) of `page`.
fn split(page: u64) -> (usize, u32) {
    ((page / WORD_BITS) as usize, (page % WORD_BITS) as u32)
}

/// Iterator over runs of set pages, see [`PageBitmap::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bm: &'a PageBitmap,
    pos: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bm.find_next(self.pos, true);
        if start >= self.bm.pages {
            self.pos = self.bm.pages;
            return None;
        }
        let end = self.bm.find_next(start, false);
        self.pos = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference implementation of `runs()` over `get()`.
    fn naive_runs(bm: &PageBitmap) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut p = 0;
        while p < bm.page_count() {
            if bm.get(p) {
                let s = p;
                while p < bm.page_count() && bm.get(p) {
                    p += 1;
                }
                out.push((s, p - s));
            } else {
                p += 1;
            }
        }
        out
    }

    #[test]
    fn kvm_bit_order() {
        let bm = PageBitmap::from_kvm_words(&[0b101, 1 << 63], 128).unwrap();
        assert!(bm.get(0) && !bm.get(1) && bm.get(2) && bm.get(127));
        assert_eq!(bm.count_ones(), 3);
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![(0, 1), (2, 1), (127, 1)]
        );
    }

    #[test]
    fn from_kvm_words_masks_tail_and_checks_length() {
        let bm = PageBitmap::from_kvm_words(&[u64::MAX, 7], 3).unwrap();
        assert_eq!(bm.words(), &[7]);
        assert!(PageBitmap::from_kvm_words(&[0], 65).is_err());
    }

    #[test]
    fn set_get_clear_and_bounds() {
        let mut bm = PageBitmap::new(70);
        bm.set(69).unwrap();
        assert!(bm.get(69));
        assert!(!bm.get(70));
        assert!(bm.set(70).is_err());
        bm.clear(69).unwrap();
        assert!(!bm.any());
    }

    #[test]
    fn set_range_spans_words() {
        let mut bm = PageBitmap::new(300);
        bm.set_range(60, 200).unwrap();
        assert_eq!(bm.runs().collect::<Vec<_>>(), vec![(60, 200)]);
        assert_eq!(bm.count_ones(), 200);
        assert!(bm.set_range(299, 2).is_err());
        bm.set_range(0, 300).unwrap();
        assert_eq!(bm.runs().collect::<Vec<_>>(), vec![(0, 300)]);
    }

    #[test]
    fn runs_match_naive_on_random_bitmaps() {
        let mut seed = 1u64;
        for pages in [0u64, 1, 63, 64, 65, 200, 1000] {
            for density in [1u64, 8, 32, 60] {
                let mut bm = PageBitmap::new(pages);
                for p in 0..pages {
                    seed = crate::atomic::splitmix64(seed);
                    if seed % 64 < density {
                        bm.set(p).unwrap();
                    }
                }
                assert_eq!(bm.runs().collect::<Vec<_>>(), naive_runs(&bm));
                let total: u64 = bm.runs().map(|(_, n)| n).sum();
                assert_eq!(total, bm.count_ones());
            }
        }
    }

    #[test]
    fn or_and_not() {
        let mut a = PageBitmap::new(100);
        let mut b = PageBitmap::new(100);
        a.set(1).unwrap();
        b.set(99).unwrap();
        a.or_assign(&b).unwrap();
        assert_eq!(a.count_ones(), 2);
        a.and_not_assign(&b).unwrap();
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(1, 1)]);
        assert!(a.or_assign(&PageBitmap::new(99)).is_err());
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let opts = crate::codec::options(u64::MAX);
        let mut bm = PageBitmap::new(130);
        bm.set_range(3, 100).unwrap();
        let bytes = bincode::Options::serialize(opts, &bm).unwrap();
        let back: PageBitmap = bincode::Options::deserialize(opts, &bytes).unwrap();
        assert_eq!(back, bm);

        // Wrong word count.
        let raw = (130u64, vec![0u64; 2]);
        let bytes = bincode::Options::serialize(opts, &raw).unwrap();
        assert!(bincode::Options::deserialize::<PageBitmap>(opts, &bytes).is_err());
        // Tail bit set.
        let raw = (130u64, vec![0u64, 0, 1 << 5]);
        let bytes = bincode::Options::serialize(opts, &raw).unwrap();
        assert!(bincode::Options::deserialize::<PageBitmap>(opts, &bytes).is_err());
    }
}

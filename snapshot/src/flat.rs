//! Flat offsets over memory given as several regions laid end to end.
//!
//! Guest memory may be several host ranges (RAM below and above the PCI
//! gap); the format numbers bytes and pages as if the regions were one
//! ("flat" offsets: region 0's bytes, then region 1's, ...). [`FlatLayout`]
//! cuts a flat byte range into the pieces that lie in each region.

use crate::error::{Error, Result};
use crate::PAGE_SIZE;

/// The region lengths of a memory, in flat order.
#[derive(Debug, Clone)]
pub(crate) struct FlatLayout {
    /// Flat offset just past each region (running sum of the lengths).
    ends: Vec<u64>,
}

/// The part of a flat range that lies in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Index of the region.
    pub(crate) region: usize,
    /// Offset of the piece inside that region.
    pub(crate) region_offset: u64,
    /// Flat offset of the piece.
    pub(crate) flat_offset: u64,
    /// Length of the piece in bytes.
    pub(crate) len: u64,
}

impl FlatLayout {
    /// The layout of regions of `lens` bytes; each must be a whole number of
    /// pages, so that no page straddles two regions.
    pub(crate) fn new(lens: impl IntoIterator<Item = u64>) -> Result<Self> {
        let mut ends = Vec::new();
        let mut total = 0u64;
        for (index, len) in lens.into_iter().enumerate() {
            if len % PAGE_SIZE != 0 {
                return Err(Error::invalid(format!(
                    "memory region {index} is {len} bytes, not a multiple of {PAGE_SIZE}"
                )));
            }
            total = total
                .checked_add(len)
                .ok_or_else(|| Error::invalid("memory regions exceed 2^64 bytes"))?;
            ends.push(total);
        }
        Ok(Self { ends })
    }

    /// Total length of all regions.
    pub(crate) fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// The pieces of the flat range `offset..offset + len`, in order; fails
    /// if the range reaches past the last region.
    pub(crate) fn pieces(&self, offset: u64, len: u64) -> Result<Pieces<'_>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "range {offset}+{len} outside memory of {} bytes",
                    self.len()
                ))
            })?;
        Ok(Pieces {
            ends: &self.ends,
            region: self.ends.partition_point(|&e| e <= offset),
            pos: offset,
            end,
        })
    }
}

/// Iterator over the [`Piece`]s of a flat range, see [`FlatLayout::pieces`].
#[derive(Debug, Clone)]
pub(crate) struct Pieces<'a> {
    ends: &'a [u64],
    region: usize,
    pos: u64,
    end: u64,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.pos >= self.end {
            return None;
        }
        // Empty regions have end == start and are skipped here.
        while *self.ends.get(self.region)? <= self.pos {
            self.region += 1;
        }
        let region_end = self.ends[self.region];
        let start = match self.region {
            0 => 0,
            r => self.ends[r - 1],
        };
        let len = region_end.min(self.end) - self.pos;
        let piece = Piece {
            region: self.region,
            region_offset: self.pos - start,
            flat_offset: self.pos,
            len,
        };
        self.pos += len;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn pieces(layout: &FlatLayout, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        layout
            .pieces(offset, len)
            .unwrap()
            .map(|p| (p.region, p.region_offset, p.len))
            .collect()
    }

    #[test]
    fn ranges_are_split_at_region_boundaries() {
        let layout = FlatLayout::new([2 * P, 0, 3 * P, P]).unwrap();
        assert_eq!(layout.len(), 6 * P);
        assert_eq!(pieces(&layout, 0, 2 * P), vec![(0, 0, 2 * P)]);
        assert_eq!(pieces(&layout, P, 2 * P), vec![(0, P, P), (2, 0, P)]);
        assert_eq!(
            pieces(&layout, P, 5 * P),
            vec![(0, P, P), (2, 0, 3 * P), (3, 0, P)]
        );
        assert_eq!(pieces(&layout, 2 * P, P), vec![(2, 0, P)]);
        assert_eq!(pieces(&layout, 5 * P, P), vec![(3, 0, P)]);
        assert!(pieces(&layout, 3 * P, 0).is_empty());
    }

    #[test]
    fn flat_offsets_are_kept() {
        let layout = FlatLayout::new([2 * P, 3 * P]).unwrap();
        let flat: Vec<u64> = layout
            .pieces(P, 3 * P)
            .unwrap()
            .map(|p| p.flat_offset)
            .collect();
        assert_eq!(flat, vec![P, 2 * P]);
    }

    #[test]
    fn bad_layouts_and_ranges_are_rejected() {
        assert!(FlatLayout::new([P, 100]).is_err());
        assert!(FlatLayout::new([u64::MAX - (P - 1), P]).is_err());
        let layout = FlatLayout::new([P, P]).unwrap();
        assert!(layout.pieces(P, 2 * P).is_err());
        assert!(layout.pieces(u64::MAX, 2).is_err());
        assert_eq!(FlatLayout::new([]).unwrap().len(), 0);
    }
}

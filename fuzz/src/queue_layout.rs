//! The `virtio_queue` target's input: the first bytes of a small guest memory that holds a
//! split virtqueue.
//!
//! The input is copied to guest address 0 (at most [`INPUT_MAX`] bytes). The descriptor
//! table is at [`DESC_TABLE`], the available ring at [`AVAIL_RING`], the used ring at
//! [`USED_RING`] (past the input, so the device's writes never feed back). The first four
//! bytes (which overlap descriptor 0's address) are also the [`Header`].

/// Guest memory size in bytes.
pub const MEM_SIZE: usize = 0x1_0000;
/// Most input bytes copied into guest memory.
pub const INPUT_MAX: usize = 0x2000;
/// Guest address of the descriptor table.
pub const DESC_TABLE: u64 = 0;
/// Guest address of the available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// Guest address of the used ring.
pub const USED_RING: u64 = 0x2000;
/// Bytes of the header at the start of the input.
pub const HEADER_LEN: usize = 4;

/// The queue parameters read from the input's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Queue size: `1 << (byte 0 % 9)`, so 1 to 256.
    pub size: u16,
    /// Byte limit of one chain (bytes 1 and 2, little-endian).
    pub max_bytes: u16,
    /// The device's starting position in the available ring (byte 3).
    pub next_avail: u8,
}

impl Header {
    /// Reads the header; `None` if the input is shorter than [`HEADER_LEN`].
    pub fn decode(data: &[u8]) -> Option<Header> {
        let h = data.get(..HEADER_LEN)?;
        Some(Header {
            size: 1u16 << (h[0] % 9),
            max_bytes: u16::from_le_bytes([h[1], h[2]]),
            next_avail: h[3],
        })
    }

    /// The header's bytes; `None` if `size` is not a power of two up to 256.
    pub fn encode(&self) -> Option<[u8; HEADER_LEN]> {
        if !self.size.is_power_of_two() || self.size > 256 {
            return None;
        }
        let [lo, hi] = self.max_bytes.to_le_bytes();
        Some([self.size.trailing_zeros() as u8, lo, hi, self.next_avail])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for size in [1, 2, 8, 256] {
            let h = Header {
                size,
                max_bytes: 0x1234,
                next_avail: 7,
            };
            assert_eq!(Header::decode(&h.encode().unwrap()), Some(h));
        }
        let bad = Header {
            size: 3,
            max_bytes: 0,
            next_avail: 0,
        };
        assert_eq!(bad.encode(), None);
        assert_eq!(Header::decode(&[1, 2, 3]), None);
    }
}

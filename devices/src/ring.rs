//! Bounded byte buffers: a log that drops its oldest bytes, and a FIFO that refuses new ones.

use std::collections::VecDeque;

/// A byte log of bounded size that keeps the newest bytes: when full, the oldest bytes are
/// dropped and counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogRing {
    bytes: VecDeque<u8>,
    capacity: usize,
    dropped: u64,
}

impl LogRing {
    /// An empty log keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            dropped: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        let keep = data.len().min(self.capacity);
        let skipped = data.len() - keep;
        let overflow = (self.bytes.len() + keep).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(&data[skipped..]);
        self.dropped += (skipped + overflow) as u64;
    }

    /// A copy of the bytes held, oldest first.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// How many bytes were dropped since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The most bytes the log keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rebuilds a log from saved contents (the newest `capacity` bytes are kept).
    pub fn from_parts(capacity: usize, bytes: &[u8], dropped: u64) -> Self {
        let mut ring = Self::new(capacity);
        ring.push(bytes);
        ring.dropped += dropped;
        ring
    }
}

/// A FIFO of at most `capacity` bytes that never drops: a push takes only what fits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundedFifo {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl BoundedFifo {
    /// An empty FIFO of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            capacity,
        }
    }

    /// Appends as much of `data` as fits; returns how many bytes were taken.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.bytes.extend(&data[..n]);
        n
    }

    /// Appends all of `data`, past the bound if need be ([`Self::room`] then reads 0 until
    /// the FIFO drains below it): for bytes that must not be lost, such as those a saved
    /// state carries.
    pub fn push_over_bound(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// The bound, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Free space in bytes.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.len())
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether no byte is held.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The oldest bytes, as up to two slices (the FIFO may wrap).
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        self.bytes.as_slices()
    }

    /// Removes the `n` oldest bytes (or all of them).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.bytes.len());
        self.bytes.drain(..n);
    }

    /// A copy of the bytes held, oldest first.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// Drops every byte held.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_the_newest_bytes_and_counts_the_rest() {
        let mut log = LogRing::new(4);
        log.push(b"ab");
        log.push(b"cde");
        assert_eq!(log.snapshot(), b"bcde");
        assert_eq!(log.dropped(), 1);
        log.push(b"0123456789");
        assert_eq!(log.snapshot(), b"6789");
        assert_eq!(log.dropped(), 11);
        let zero = {
            let mut z = LogRing::new(0);
            z.push(b"xyz");
            z
        };
        assert_eq!(zero.snapshot(), b"");
        assert_eq!(zero.dropped(), 3);
        assert_eq!(LogRing::from_parts(4, b"abcdef", 5), {
            let mut l = LogRing::new(4);
            l.push(b"cdef");
            l.dropped += 7;
            l
        });
    }

    #[test]
    fn fifo_takes_only_what_fits() {
        let mut fifo = BoundedFifo::new(5);
        assert_eq!(fifo.push(b"abc"), 3);
        assert_eq!(fifo.push(b"defg"), 2);
        assert_eq!(fifo.room(), 0);
        assert_eq!(fifo.to_vec(), b"abcde");
        fifo.consume(2);
        assert_eq!(fifo.push(b"xyz"), 2);
        assert_eq!(fifo.to_vec(), b"cdexy");
        fifo.consume(100);
        assert!(fifo.is_empty());
    }
}

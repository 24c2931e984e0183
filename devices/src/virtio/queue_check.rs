//! Validation of descriptor chains handed over by the guest.
//!
//! The device never trusts a chain: [`walk_chain`] reads the descriptor table itself
//! (instead of following virtio-queue's iterator, which silently truncates a chain whose
//! `next` is out of range and follows indirect tables we never offered) and accepts a chain
//! only when every rule below holds. What happens to a rejected chain is decided by the
//! caller ([`QueueContext::pop`](super::QueueContext::pop) returns it to the guest as used
//! with 0 bytes).
//!
//! | rule | error |
//! |---|---|
//! | every `next` index is below the queue size | [`ChainError::NextOutOfRange`] |
//! | at most queue-size descriptors (so a loop cannot spin) | [`ChainError::TooLong`] |
//! | no `VIRTQ_DESC_F_INDIRECT` (the feature is never offered) | [`ChainError::Indirect`] |
//! | the descriptor itself is readable guest memory | [`ChainError::TableUnreadable`] |
//! | each buffer lies entirely inside guest memory | [`ChainError::OutOfMemory`] |
//! | total bytes at most the device's limit | [`ChainError::TooLarge`] |
//! | buffers in the direction the device needs | [`ChainError::WrongDirection`] |
//! | device-readable buffers before device-writable ones | [`ChainError::ReadableAfterWritable`] |

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Size of one split-ring descriptor in bytes.
const DESCRIPTOR_SIZE: u64 = 16;

/// Which buffers a device accepts in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Only device-readable buffers (the driver sends data: console transmit).
    DeviceReads,
    /// Only device-writable buffers (the device fills them: rng, console receive).
    DeviceWrites,
    /// Device-readable buffers followed by device-writable ones (request/response devices).
    Both,
}

/// What a device accepts in one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainRules {
    /// Buffer directions allowed.
    pub direction: Direction,
    /// Most bytes the buffers of one chain may add up to.
    pub max_bytes: u32,
}

/// Why a descriptor chain was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A `next` field (or the head) points past the end of the descriptor table.
    #[error("descriptor index {index} is out of range for a queue of {size}")]
    NextOutOfRange {
        /// The offending index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the queue holds: a loop or a corrupt table.
    #[error("chain is longer than the queue size {size} (a loop?)")]
    TooLong {
        /// The queue size.
        size: u16,
    },
    /// An indirect descriptor, which this device never negotiates.
    #[error("indirect descriptors are not supported")]
    Indirect,
    /// The descriptor table entry could not be read.
    #[error("descriptor table entry {index} is not in guest memory")]
    TableUnreadable {
        /// The entry's index.
        index: u16,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The buffers add up to more than the device accepts.
    #[error("chain holds more than {max} bytes")]
    TooLarge {
        /// The device's limit.
        max: u32,
    },
    /// A buffer's direction is not one the device accepts.
    #[error("a {found} buffer where the device accepts only {expected:?}")]
    WrongDirection {
        /// "device-readable" or "device-writable".
        found: &'static str,
        /// What the device accepts.
        expected: Direction,
    },
    /// A device-readable buffer follows a device-writable one (virtio 1.1 §2.6.4.2).
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// Guest memory failed during a copy the checks allowed (should not happen).
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

/// One guest buffer of a validated chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0: empty buffers are dropped).
    pub len: u32,
}

/// A descriptor chain that passed every check of [`walk_chain`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidChain {
    /// Index of the head descriptor (what goes back in the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

impl ValidChain {
    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable.iter().map(|b| b.len).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|b| b.len).sum()
    }

    /// Copies the device-readable buffers out, in order.
    pub fn read_all<M: GuestMemoryBackend>(&self, mem: &M) -> Result<Vec<u8>, ChainError> {
        let mut out = vec![0u8; self.readable_len() as usize];
        let mut at = 0usize;
        for buf in &self.readable {
            let end = at + buf.len as usize;
            mem.read_slice(&mut out[at..end], buf.addr)
                .map_err(mem_err)?;
            at = end;
        }
        Ok(out)
    }

    /// Copies `data` into the device-writable buffers, in order, as far as they reach;
    /// returns how many bytes were written.
    pub fn write_all<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        data: &[u8],
    ) -> Result<usize, ChainError> {
        let mut at = 0usize;
        for buf in &self.writable {
            if at == data.len() {
                break;
            }
            let n = (buf.len as usize).min(data.len() - at);
            mem.write_slice(&data[at..at + n], buf.addr)
                .map_err(mem_err)?;
            at += n;
        }
        Ok(at)
    }
}

fn mem_err(e: GuestMemoryError) -> ChainError {
    ChainError::Memory(e.to_string())
}

/// Reads and checks the chain starting at `head` in the descriptor table at `desc_table` of a
/// queue of `queue_size` entries, against `rules`. Never panics, whatever the table holds.
pub fn walk_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    rules: ChainRules,
) -> Result<ValidChain, ChainError> {
    let mut chain = ValidChain {
        head,
        ..ValidChain::default()
    };
    let mut index = head;
    let mut total: u32 = 0;
    let mut count: u32 = 0;
    loop {
        if index >= queue_size {
            return Err(ChainError::NextOutOfRange {
                index,
                size: queue_size,
            });
        }
        count += 1;
        if count > u32::from(queue_size) {
            return Err(ChainError::TooLong { size: queue_size });
        }
        let desc = desc_table
            .0
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .and_then(|addr| mem.read_obj::<RawDescriptor>(GuestAddress(addr)).ok())
            .map(virtio_queue::desc::split::Descriptor::from)
            .ok_or(ChainError::TableUnreadable { index })?;
        let flags = u32::from(desc.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        let writable = flags & VRING_DESC_F_WRITE != 0;
        let len = desc.len();
        let addr = desc.addr();
        if len > 0 {
            let in_memory =
                addr.0.checked_add(u64::from(len)).is_some() && mem.check_range(addr, len as usize);
            if !in_memory {
                return Err(ChainError::OutOfMemory { addr: addr.0, len });
            }
            total = total
                .checked_add(len)
                .filter(|t| *t <= rules.max_bytes)
                .ok_or(ChainError::TooLarge {
                    max: rules.max_bytes,
                })?;
            match (rules.direction, writable) {
                (Direction::DeviceReads, true) => {
                    return Err(ChainError::WrongDirection {
                        found: "device-writable",
                        expected: rules.direction,
                    })
                }
                (Direction::DeviceWrites, false) => {
                    return Err(ChainError::WrongDirection {
                        found: "device-readable",
                        expected: rules.direction,
                    })
                }
                (_, false) if !chain.writable.is_empty() => {
                    return Err(ChainError::ReadableAfterWritable)
                }
                _ => {}
            }
            let buf = Buffer { addr, len };
            if writable {
                chain.writable.push(buf);
            } else {
                chain.readable.push(buf);
            }
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Address, GuestMemoryMmap};

    const TABLE: GuestAddress = GuestAddress(0x1000);
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap<()>, descs: &[(u64, u32, u16, u16)]) {
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(*addr, *len, *flags, *next));
            mem.write_obj(d, TABLE.unchecked_add(i as u64 * 16))
                .unwrap();
        }
    }

    fn rules(direction: Direction) -> ChainRules {
        ChainRules {
            direction,
            max_bytes: 0x1000,
        }
    }

    #[test]
    fn malformed_chains_are_rejected_with_the_documented_error() {
        type Case = (
            &'static str,
            Vec<(u64, u32, u16, u16)>,
            Direction,
            Result<(), ChainError>,
        );
        let cases: Vec<Case> = vec![
            (
                "ok writable",
                vec![(0x8000, 16, W, 0)],
                Direction::DeviceWrites,
                Ok(()),
            ),
            (
                "ok mixed",
                vec![(0x8000, 16, N, 1), (0x9000, 16, W, 0)],
                Direction::Both,
                Ok(()),
            ),
            (
                "next out of range",
                vec![(0x8000, 16, W | N, 9)],
                Direction::DeviceWrites,
                Err(ChainError::NextOutOfRange { index: 9, size: 8 }),
            ),
            (
                "self loop",
                vec![(0x8000, 16, W | N, 0)],
                Direction::DeviceWrites,
                Err(ChainError::TooLong { size: 8 }),
            ),
            (
                "two-step loop",
                vec![(0x8000, 16, W | N, 1), (0x8000, 16, W | N, 0)],
                Direction::DeviceWrites,
                Err(ChainError::TooLong { size: 8 }),
            ),
            (
                "indirect",
                vec![(0x8000, 32, VRING_DESC_F_INDIRECT as u16, 0)],
                Direction::DeviceWrites,
                Err(ChainError::Indirect),
            ),
            (
                "outside memory",
                vec![(0x10_0000, 1, W, 0)],
                Direction::DeviceWrites,
                Err(ChainError::OutOfMemory {
                    addr: 0x10_0000,
                    len: 1,
                }),
            ),
            (
                "straddles the end",
                vec![(0xf_fff0, 0x20, W, 0)],
                Direction::DeviceWrites,
                Err(ChainError::OutOfMemory {
                    addr: 0xf_fff0,
                    len: 0x20,
                }),
            ),
            (
                "address wraps",
                vec![(u64::MAX - 4, 16, W, 0)],
                Direction::DeviceWrites,
                Err(ChainError::OutOfMemory {
                    addr: u64::MAX - 4,
                    len: 16,
                }),
            ),
            (
                "oversized",
                vec![(0x8000, 0x800, W | N, 1), (0x9000, 0x801, W, 0)],
                Direction::DeviceWrites,
                Err(ChainError::TooLarge { max: 0x1000 }),
            ),
            (
                "u32 overflow",
                vec![(0x8000, u32::MAX, W | N, 1), (0x9000, 2, W, 0)],
                Direction::DeviceWrites,
                Err(ChainError::OutOfMemory {
                    addr: 0x8000,
                    len: u32::MAX,
                }),
            ),
            (
                "readable where writable needed",
                vec![(0x8000, 16, 0, 0)],
                Direction::DeviceWrites,
                Err(ChainError::WrongDirection {
                    found: "device-readable",
                    expected: Direction::DeviceWrites,
                }),
            ),
            (
                "writable where readable needed",
                vec![(0x8000, 16, N, 1), (0x9000, 16, W, 0)],
                Direction::DeviceReads,
                Err(ChainError::WrongDirection {
                    found: "device-writable",
                    expected: Direction::DeviceReads,
                }),
            ),
            (
                "readable after writable",
                vec![(0x8000, 16, W | N, 1), (0x9000, 16, 0, 0)],
                Direction::Both,
                Err(ChainError::ReadableAfterWritable),
            ),
        ];
        for (name, descs, direction, expected) in cases {
            let m = mem();
            put(&m, &descs);
            let got = walk_chain(&m, TABLE, 8, 0, rules(direction)).map(|_| ());
            assert_eq!(got, expected, "{name}");
        }
        // A head past the table, and a table outside guest memory.
        let m = mem();
        assert_eq!(
            walk_chain(&m, TABLE, 8, 8, rules(Direction::Both)),
            Err(ChainError::NextOutOfRange { index: 8, size: 8 })
        );
        assert_eq!(
            walk_chain(&m, GuestAddress(0xf_fff8), 8, 0, rules(Direction::Both)),
            Err(ChainError::TableUnreadable { index: 0 })
        );
    }

    #[test]
    fn copies_follow_the_buffers() {
        let m = mem();
        put(
            &m,
            &[
                (0x8000, 3, N, 1),
                (0x9000, 0, N, 2),
                (0xa000, 2, W | N, 3),
                (0xb000, 4, W, 0),
            ],
        );
        m.write_slice(b"abc", GuestAddress(0x8000)).unwrap();
        let chain = walk_chain(&m, TABLE, 8, 0, rules(Direction::Both)).unwrap();
        assert_eq!(chain.readable.len(), 1, "empty buffers are dropped");
        assert_eq!(chain.read_all(&m).unwrap(), b"abc");
        assert_eq!(chain.writable_len(), 6);
        assert_eq!(chain.write_all(&m, b"0123456789").unwrap(), 6);
        let mut out = [0u8; 4];
        m.read_slice(&mut out, GuestAddress(0xb000)).unwrap();
        assert_eq!(&out, b"2345");
        assert_eq!(chain.write_all(&m, b"x").unwrap(), 1);
    }
}

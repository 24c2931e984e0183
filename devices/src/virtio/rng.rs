//! virtio-rng (device id 4): fills the guest's buffers from the host's `getrandom(2)`.
//!
//! One queue (`requestq`, index 0). Each chain must be device-writable only and hold at most
//! [`MAX_REQUEST_BYTES`]; anything else is returned with 0 bytes (see
//! [`queue_check`](super::queue_check)). If `getrandom` fails, the chain is returned with 0
//! bytes and the failure logged (the guest driver simply asks again).

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use super::queue_check::{ChainRules, Direction};
use super::{ActivateError, QueueContext, QueueError, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest request served; Linux asks for at most a few dozen bytes at a time.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

const RULES: ChainRules = ChainRules {
    direction: Direction::DeviceWrites,
    max_bytes: MAX_REQUEST_BYTES,
};

/// What the entropy device saves (nothing but the fact that it exists).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Bytes served since creation (informational).
    pub bytes_served: u64,
}

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    bytes_served: u64,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Random bytes handed to the guest since creation.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// The device's state as plain data.
    pub fn save(&self) -> RngState {
        RngState {
            bytes_served: self.bytes_served,
        }
    }

    /// A device in `state`.
    pub fn restore(state: &RngState) -> Self {
        Self {
            bytes_served: state.bytes_served,
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate<M: GuestMemoryBackend>(
        &mut self,
        _features: u64,
        _ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }

    fn process_queue<M: GuestMemoryBackend>(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), QueueError> {
        if queue != 0 {
            return Err(QueueError::NoSuchQueue(queue));
        }
        let mut buf = Vec::new();
        while let Some(chain) = ctx.pop(0, RULES)? {
            buf.resize(chain.writable_len() as usize, 0);
            let written = match getrandom::fill(&mut buf) {
                Ok(()) => match chain.write_all(ctx.memory(), &buf) {
                    Ok(n) => n as u32,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-rng copy failed");
                        0
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "getrandom failed");
                    0
                }
            };
            self.bytes_served += u64::from(written);
            ctx.add_used(0, chain.head, written)?;
        }
        Ok(())
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn fills_writable_chains_and_rejects_the_rest() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(
            &[
                d(0x8000, 32, W | N, 1),
                d(0x9000, 32, W, 0),
                d(0xa000, 16, 0, 0), // device-readable: rejected
                d(0xb000, MAX_REQUEST_BYTES + 1, W, 0), // oversized: rejected
                d(0xc000, 8, W, 0),
            ],
            0,
        )
        .unwrap();
        // The mock's own used ring overlaps its available ring: use a separate one.
        let mut queue: Queue = mock.create_queue().unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(0x4000))
            .unwrap();
        let mut queues = vec![queue];
        let mut ctx = QueueContext::new(&mem, &mut queues);
        let mut rng = Rng::new();
        rng.process_queue(0, &mut ctx).unwrap();
        assert!(ctx.used_added());
        assert_eq!(ctx.rejected(), 2);
        assert_eq!(rng.bytes_served(), 72);
        let used_idx: u16 = mem.read_obj(GuestAddress(0x4002)).unwrap();
        assert_eq!(used_idx, 4);
        let lens: Vec<(u32, u32)> = (0..4u64)
            .map(|i| {
                let id: u32 = mem.read_obj(GuestAddress(0x4004 + 8 * i)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(0x4008 + 8 * i)).unwrap();
                (id, len)
            })
            .collect();
        assert_eq!(lens, vec![(0, 64), (2, 0), (3, 0), (4, 8)]);
        let mut buf = [0u8; 32];
        mem.read_slice(&mut buf, GuestAddress(0x9000)).unwrap();
        assert_ne!(buf, [0u8; 32], "random bytes written");
        assert!(rng.process_queue(1, &mut ctx).is_err());
        assert_eq!(Rng::restore(&rng.save()).bytes_served(), 72);
    }
}

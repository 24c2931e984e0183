//! A minimal virtio-mmio "driver" for tests: what Linux's virtio_mmio does, through the bus.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use capsule_devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use capsule_devices::virtio::{status, VirtioDevice};
use capsule_devices::{Bus, WriteOutcome};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const BASE: u64 = 0xd000_0000;
pub const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Queue `i` lives at `0x1_0000 * i`.
pub fn queue_base(i: usize) -> GuestAddress {
    GuestAddress(0x1_0000 * i as u64)
}

/// Where a queue's parts are. The descriptor table and available ring are
/// `MockSplitQueue::create(mem, queue_base(i), size)`'s; the used ring is 8 KiB further,
/// because the mock's own used ring overlaps the end of its available ring (its `end()`
/// counts elements, not bytes).
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueLayout {
    pub fn of<M: vm_memory::GuestMemory>(
        mock: &virtio_queue::mock::MockSplitQueue<'_, M>,
        size: u16,
    ) -> Self {
        Self {
            size,
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: mock.start().0 + 0x2000,
        }
    }

    pub fn used_idx<M: GuestMemoryBackend>(&self, mem: &M) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (head, len) of used element `i`.
    pub fn used_elem<M: GuestMemoryBackend>(&self, mem: &M, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

pub struct Driver {
    pub bus: Bus,
}

impl Driver {
    pub fn new<D, M>(transport: Arc<Mutex<MmioTransport<D, M>>>) -> Self
    where
        D: VirtioDevice + 'static,
        M: GuestMemoryBackend + Send + 'static,
    {
        let mut bus = Bus::new();
        bus.insert(transport, BASE, MMIO_SIZE).unwrap();
        Self { bus }
    }

    pub fn read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(BASE + offset, &mut b));
        u32::from_le_bytes(b)
    }

    pub fn write(&self, offset: u64, value: u32) {
        assert_eq!(
            self.bus.write(BASE + offset, &value.to_le_bytes()),
            Some(WriteOutcome::Handled)
        );
    }

    /// Negotiates VERSION_1 and sets up the queues, then DRIVER_OK.
    pub fn init(&self, queues: &[QueueLayout]) {
        self.write(0x70, 0);
        self.write(0x70, status::ACKNOWLEDGE);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.write(0x14, 1);
        assert_eq!(self.read(0x10) & 1, 1, "VERSION_1 offered");
        self.write(0x24, 1);
        self.write(0x20, 1);
        self.write(0x24, 0);
        self.write(0x20, 0);
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(self.read(0x70) & status::FEATURES_OK, 0);
        for (i, q) in queues.iter().enumerate() {
            self.write(0x30, i as u32);
            assert!(self.read(0x34) >= u32::from(q.size));
            self.write(0x38, u32::from(q.size));
            self.write(0x80, q.desc as u32);
            self.write(0x84, (q.desc >> 32) as u32);
            self.write(0x90, q.avail as u32);
            self.write(0x94, (q.avail >> 32) as u32);
            self.write(0xa0, q.used as u32);
            self.write(0xa4, (q.used >> 32) as u32);
            self.write(0x44, 1);
        }
        self.write(0x70, ALL);
        assert_eq!(self.read(0x70), ALL);
    }

    pub fn notify(&self, queue: u32) {
        self.write(0x50, queue);
    }
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

//! Virtio devices on the virtio-mmio transport.
//!
//! The [`mmio::MmioTransport`] owns what the driver configures (feature negotiation, queues,
//! status, interrupt status) and lends it to a [`VirtioDevice`] through a [`QueueContext`]
//! whenever the device has work: a queue notification, or an event on the device's host-side
//! file descriptor. Devices: [`rng::Rng`] (virtio-rng) and [`console::Console`]
//! (virtio-console).
//!
//! Nothing a guest writes can panic the host. Per-chain problems (see [`queue_check`]) return
//! the chain to the guest as used with 0 bytes; problems that make the queue itself unusable
//! ([`QueueError`]) put the device in the `DEVICE_NEEDS_RESET` state until the driver resets
//! it.

pub mod console;
pub mod mmio;
pub mod queue_check;
pub mod rng;

use std::os::unix::io::RawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use queue_check::{walk_chain, ChainRules, ValidChain};

/// Virtio device id of a console (virtio 1.1 §5).
pub const TYPE_CONSOLE: u32 = 3;
/// Virtio device id of an entropy source.
pub const TYPE_RNG: u32 = 4;

/// Feature bit: the device complies with virtio 1.0+ (required by the modern MMIO transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.1 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// A problem that makes a queue unusable; the device then needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring index moved by more than the queue size.
    #[error("queue {queue}: available ring index moved by more than the queue size")]
    AvailIndex {
        /// The queue.
        queue: usize,
    },
    /// A chain head in the available ring is past the descriptor table, so it cannot even be
    /// returned in the used ring.
    #[error("queue {queue}: chain head {head} is out of range")]
    HeadOutOfRange {
        /// The queue.
        queue: usize,
        /// The head index the guest published.
        head: u16,
    },
    /// The rings themselves could not be read or written.
    #[error("queue {queue}: ring access failed: {reason}")]
    Ring {
        /// The queue.
        queue: usize,
        /// What failed.
        reason: String,
    },
    /// A queue index the device does not have.
    #[error("no queue {0}")]
    NoSuchQueue(usize),
}

/// Why a device could not be activated (status `DRIVER_OK`).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// `DRIVER_OK` without `FEATURES_OK`.
    #[error("driver set DRIVER_OK before FEATURES_OK")]
    FeaturesNotNegotiated,
    /// A ready queue whose rings are not in guest memory or misaligned.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// A queue the device needs was not made ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device refused.
    #[error("device: {0}")]
    Device(String),
}

/// What a device wants to hear about its host-side file descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostInterest {
    /// Wake when it is readable.
    pub readable: bool,
    /// Wake when it is writable.
    pub writable: bool,
}

/// What happened on a device's host-side file descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEvent {
    /// It is readable.
    pub readable: bool,
    /// It is writable.
    pub writable: bool,
    /// The peer hung up or the descriptor failed.
    pub hangup: bool,
}

/// The device side of a virtio device: what the transport does not know.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`TYPE_RNG`], [`TYPE_CONSOLE`], ...).
    fn device_type(&self) -> u32;

    /// The largest size of each queue (powers of two); the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];

    /// The features offered, [`VIRTIO_F_VERSION_1`] included.
    fn device_features(&self) -> u64;

    /// Whether the driver's notification of `queue` is processed at once, on the vCPU that
    /// wrote it (the MMIO exit), rather than by the device thread: for a queue whose driver
    /// busy-waits for the buffer it just posted, so that the buffer is used before the
    /// driver looks. Such a queue gets no ioeventfd (see [`MmioTransport`]); the device
    /// thread is still woken, to re-arm what it watches on the host side. Default: none.
    fn notifies_inline(&self, queue: usize) -> bool {
        let _ = queue;
        false
    }

    /// A driver read of the device configuration space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to the device configuration space. Default: ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignored virtio config write");
    }

    /// The driver set `DRIVER_OK` with `features` negotiated and the queues in `ctx`
    /// validated. The device may start using the queues.
    fn activate<M: GuestMemoryBackend>(
        &mut self,
        features: u64,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), ActivateError>;

    /// The driver notified `queue` (an MMIO write or the queue's ioeventfd).
    fn process_queue<M: GuestMemoryBackend>(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), QueueError>;

    /// The driver reset the device (status 0): forget the negotiated state.
    fn reset(&mut self);

    /// A host-side descriptor the event loop should watch for this device, if any.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }

    /// What to watch the host descriptor for now; `None` stops watching (closed, or nothing
    /// can be done until the guest acts).
    fn host_interest(&self) -> Option<HostInterest> {
        None
    }

    /// Something happened on the host descriptor. `ctx` is `None` while the device is not
    /// active (the device may still buffer host data, within its bounds).
    fn process_host<M: GuestMemoryBackend>(
        &mut self,
        event: HostEvent,
        ctx: Option<&mut QueueContext<'_, M>>,
    ) -> Result<(), QueueError> {
        let _ = (event, ctx);
        Ok(())
    }
}

/// The queues and guest memory a device works on during one call, and what it did.
#[derive(Debug)]
pub struct QueueContext<'a, M> {
    mem: &'a M,
    queues: &'a mut [Queue],
    used_added: bool,
    rejected: u64,
}

impl<'a, M: GuestMemoryBackend> QueueContext<'a, M> {
    /// A context over `queues` in `mem`.
    pub fn new(mem: &'a M, queues: &'a mut [Queue]) -> Self {
        Self {
            mem,
            queues,
            used_added: false,
            rejected: 0,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &M {
        self.mem
    }

    /// Whether a used buffer was added since the context was made (the guest needs an
    /// interrupt).
    pub fn used_added(&self) -> bool {
        self.used_added
    }

    /// How many chains [`QueueContext::pop`] rejected and returned with 0 bytes.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn queue(&mut self, queue: usize) -> Result<&mut Queue, QueueError> {
        self.queues
            .get_mut(queue)
            .ok_or(QueueError::NoSuchQueue(queue))
    }

    /// Whether the driver has made chains available on `queue` that are not popped yet.
    pub fn has_available(&mut self, queue: usize) -> Result<bool, QueueError> {
        let mem = self.mem;
        let q = self.queue(queue)?;
        if !q.ready() {
            return Ok(false);
        }
        let avail = q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| QueueError::Ring {
                queue,
                reason: e.to_string(),
            })?;
        Ok(avail.0 != q.next_avail())
    }

    /// The next chain on `queue` that follows `rules`. Chains that break them are returned
    /// to the guest at once as used with 0 bytes (and logged); `Ok(None)` when no chain is
    /// left.
    pub fn pop(
        &mut self,
        queue: usize,
        rules: ChainRules,
    ) -> Result<Option<ValidChain>, QueueError> {
        loop {
            let mem = self.mem;
            let q = self.queue(queue)?;
            if !q.ready() {
                return Ok(None);
            }
            let (table, size) = (vm_memory::GuestAddress(q.desc_table()), q.size());
            let head = {
                let mut iter = q.iter(mem).map_err(|e| match e {
                    virtio_queue::Error::InvalidAvailRingIndex => QueueError::AvailIndex { queue },
                    other => QueueError::Ring {
                        queue,
                        reason: other.to_string(),
                    },
                })?;
                match iter.next() {
                    Some(chain) => chain.head_index(),
                    None => return Ok(None),
                }
            };
            if head >= size {
                return Err(QueueError::HeadOutOfRange { queue, head });
            }
            match walk_chain(mem, table, size, head, rules) {
                Ok(chain) => return Ok(Some(chain)),
                Err(e) => {
                    tracing::warn!(queue, head, error = %e, "rejected a virtio descriptor chain");
                    self.rejected += 1;
                    self.add_used(queue, head, 0)?;
                }
            }
        }
    }

    /// Puts back the chain the last [`QueueContext::pop`] on `queue` returned, so that the
    /// next pop returns it again (the device could not take it yet).
    pub fn unpop(&mut self, queue: usize) -> Result<(), QueueError> {
        self.queue(queue)?.go_to_previous_position();
        Ok(())
    }

    /// Returns chain `head` to the guest with `len` bytes written.
    pub fn add_used(&mut self, queue: usize, head: u16, len: u32) -> Result<(), QueueError> {
        let mem = self.mem;
        self.queue(queue)?
            .add_used(mem, head, len)
            .map_err(|e| QueueError::Ring {
                queue,
                reason: e.to_string(),
            })?;
        self.used_added = true;
        Ok(())
    }
}

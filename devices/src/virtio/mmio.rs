//! The virtio-mmio transport, version 2 ("modern"; virtio 1.1 §4.2.2), as a [`BusDevice`].
//!
//! Decisions where the guest misbehaves (each is logged and never panics):
//!
//! | guest action | outcome |
//! |---|---|
//! | register access that is not 4 bytes wide and aligned | read as 0, write ignored |
//! | write to a read-only register, read of a write-only one | ignored, read as 0 |
//! | `QueueSel` past the last queue | `QueueNumMax` reads 0 (no such queue); queue writes ignored |
//! | `QueueNum` 0, not a power of two, or above `QueueNumMax` | ignored (the size stays) |
//! | queue configuration written while `QueueReady` is 1 | ignored |
//! | features or queues written after `FEATURES_OK`/`DRIVER_OK` | ignored |
//! | `FEATURES_OK` with features not offered, or without `VERSION_1` | `FEATURES_OK` stays clear (the driver reads it back and fails) |
//! | `DRIVER_OK` before `FEATURES_OK` | refused: status becomes `DEVICE_NEEDS_RESET` |
//! | `DRIVER_OK` with a ready queue outside memory or misaligned | refused: `DEVICE_NEEDS_RESET` |
//! | status write that clears bits (other than 0) | ignored |
//! | `QueueNotify` for a missing or not-ready queue, or before `DRIVER_OK` | ignored |
//! | ring-level corruption at run time ([`QueueError`]) | `DEVICE_NEEDS_RESET` + config interrupt; queues are no longer processed |
//! | status 0 | full reset: queues, features, interrupt status, device |
//!
//! Queue notifications: a `QueueNotify` write signals that queue's [`EventFd`]
//! ([`MmioTransport::queue_evts`]), exactly what `KVM_IOEVENTFD` does when the VMM registers
//! the same eventfd for `base + 0x50` with the queue index as datamatch; either way the
//! device thread ([`crate::event_loop`]) processes the queue. Interrupts: the interrupt status
//! register plus [`MmioTransport::irq_evt`], for `KVM_IRQFD` (edge-triggered: describe the
//! line to the guest as edge, active high, as Firecracker does).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, ActivateError, HostEvent, QueueContext, QueueError, VirtioDevice, INT_CONFIG,
    INT_USED_RING, VIRTIO_F_VERSION_1,
};
use crate::bus::{BusDevice, WriteOutcome};

/// "virt", little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern transport's version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("CPSL").
pub const MMIO_VENDOR_ID: u32 = 0x4c53_5043;
/// Bytes of MMIO space one device takes (registers and configuration space).
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify`, for `KVM_IOEVENTFD` (4-byte write, datamatch = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Why a transport could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device declares a queue size virtio does not allow.
    #[error("queue {queue}: invalid maximum size {size}")]
    InvalidQueueMax {
        /// The queue.
        queue: usize,
        /// Its declared maximum.
        size: u16,
    },
    /// A saved state does not fit this device.
    #[error("invalid transport state: {0}")]
    InvalidState(String),
}

/// A queue's registers and ring positions, as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ("driver") ring address.
    pub avail_ring: u64,
    /// Used ("device") ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: false,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The transport's registers and queues, as plain data (the device saves its own state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Whether the device was activated (`DRIVER_OK` accepted).
    pub activated: bool,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device behind the virtio-mmio register layout. Put it on the MMIO bus at a
/// base address with [`MMIO_SIZE`] bytes, behind an `Arc<Mutex<_>>` it shares with the
/// device thread.
pub struct MmioTransport<D, M> {
    device: D,
    mem: M,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq_evt: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    rejected_chains: u64,
}

impl<D: std::fmt::Debug, M> std::fmt::Debug for MmioTransport<D, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .field("interrupt_status", &self.interrupt_status)
            .finish()
    }
}

fn new_eventfd() -> Result<EventFd, TransportError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)
}

impl<D: VirtioDevice, M: GuestMemoryBackend> MmioTransport<D, M> {
    /// A transport for `device` working on guest memory `mem`, with fresh (non-blocking)
    /// queue and interrupt eventfds.
    pub fn new(device: D, mem: M) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(queue, &size)| {
                Queue::new(size).map_err(|_| TransportError::InvalidQueueMax { queue, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| new_eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq_evt: new_eventfd()?,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            rejected_chains: 0,
        })
    }

    /// The interrupt eventfd, for `KVM_IRQFD`.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// One eventfd per queue, for `KVM_IOEVENTFD` at `base + NOTIFY_OFFSET` with datamatch
    /// equal to the queue index; the device thread waits on them.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Whether the driver activated the device (`DRIVER_OK` accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Whether the device stopped on an error until the driver resets it.
    pub fn needs_reset(&self) -> bool {
        self.status & status::DEVICE_NEEDS_RESET != 0
    }

    /// One line for diagnostics: the status and interrupt status, and for each ready queue
    /// the driver's `avail` index against the device's next available and used entries (a
    /// driver waiting on a queue the device never processed shows `avail` ahead of `next`).
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        let mut line = format!(
            "virtio device {}: status {:#x}{}, interrupt status {:#x}",
            self.device.device_type(),
            self.status,
            if self.activated { "" } else { " (inactive)" },
            self.interrupt_status
        );
        for (i, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let avail = q.avail_idx(&self.mem, Ordering::Acquire).map(|w| w.0);
            let used = q.used_idx(&self.mem, Ordering::Acquire).map(|w| w.0);
            let _ = write!(
                line,
                "; queue {i}: avail {} used {} (device next {}/{})",
                avail.map_or_else(|e| e.to_string(), |a| a.to_string()),
                used.map_or_else(|e| e.to_string(), |u| u.to_string()),
                q.next_avail(),
                q.next_used()
            );
        }
        line
    }

    /// Chains rejected by validation since creation (each returned with 0 bytes).
    pub fn rejected_chains(&self) -> u64 {
        self.rejected_chains
    }

    fn live(&self) -> bool {
        self.activated && !self.needs_reset()
    }

    fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq_evt.write(1) {
            tracing::warn!(error = %e, "virtio interrupt eventfd write failed");
        }
    }

    fn enter_needs_reset(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(device = self.device.device_type(), reason = %why, "virtio device needs reset");
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal(INT_CONFIG);
    }

    /// Runs `f` on the device with the queues lent, if the device is live; raises the
    /// interrupt when used buffers were added, and enters `DEVICE_NEEDS_RESET` on a
    /// [`QueueError`].
    fn with_queues(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueContext<'_, M>) -> Result<(), QueueError>,
    ) {
        let mut ctx = QueueContext::new(&self.mem, &mut self.queues);
        let result = f(&mut self.device, &mut ctx);
        let (used, rejected) = (ctx.used_added(), ctx.rejected());
        self.rejected_chains += rejected;
        if used {
            self.signal(INT_USED_RING);
        }
        if let Err(e) = result {
            self.enter_needs_reset(&e);
        }
    }

    /// Processes a notification of `queue` (the event loop calls this when the queue's
    /// eventfd fires). Ignored unless the device is live and the queue ready.
    pub fn process_queue(&mut self, queue: usize) {
        if !self.live() {
            tracing::debug!(queue, "notify ignored: device not live");
            return;
        }
        if !self.queues.get(queue).is_some_and(|q| q.ready()) {
            tracing::debug!(queue, "notify ignored: queue missing or not ready");
            return;
        }
        self.with_queues(|dev, ctx| dev.process_queue(queue, ctx));
    }

    /// Hands an event on the device's host descriptor to the device (with the queues when
    /// live).
    pub fn process_host(&mut self, event: HostEvent) {
        if self.live() {
            self.with_queues(|dev, ctx| dev.process_host(event, Some(ctx)));
        } else {
            let result = self
                .device
                .process_host::<M>(event, None::<&mut QueueContext<'_, M>>);
            if let Err(e) = result {
                tracing::warn!(error = %e, "host event on an inactive device failed");
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        tracing::debug!(device = self.device.device_type(), "virtio device reset");
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(ActivateError::FeaturesNotNegotiated);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        let features = self.driver_features;
        let mut ctx = QueueContext::new(&self.mem, &mut self.queues);
        self.device.activate(features, &mut ctx)?;
        let used = ctx.used_added();
        if used {
            self.signal(INT_USED_RING);
        }
        Ok(())
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            tracing::warn!(
                old = self.status,
                new = value,
                "status write clears bits; ignored"
            );
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let acked = self.driver_features;
            if acked & !offered != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    offered,
                    acked,
                    "driver features not offered or VERSION_1 missing; FEATURES_OK refused"
                );
                self.status = value & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && !self.activated && !self.needs_reset() {
            match self.activate() {
                Ok(()) => self.activated = true,
                Err(e) => self.enter_needs_reset(&e),
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "read of a write-only or unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_open = self.status & (status::FEATURES_OK | status::DRIVER_OK) == 0
            && self.status & status::DRIVER != 0;
        let queues_open = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                sel => tracing::debug!(sel, "driver features for an unknown word ignored"),
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if queues_open =>
            {
                self.write_queue_register(offset, value)
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            _ => tracing::debug!(
                offset,
                value,
                status = self.status,
                "virtio-mmio write ignored (read-only register or wrong state)"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            tracing::debug!(
                sel,
                offset,
                "write to a queue register with no queue selected"
            );
            return;
        };
        if offset == reg::QUEUE_READY {
            q.set_ready(value == 1);
            return;
        }
        if q.ready() {
            tracing::debug!(
                sel,
                offset,
                "queue register written while the queue is ready"
            );
            return;
        }
        match offset {
            reg::QUEUE_NUM => match u16::try_from(value).map(|n| q.try_set_size(n)) {
                Ok(Ok(())) => {}
                _ => tracing::warn!(sel, value, "invalid queue size ignored"),
            },
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        let index = value as usize;
        if !self.live() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            tracing::debug!(
                queue = value,
                "notify for a queue that is not live; ignored"
            );
            return;
        }
        if self.device.notifies_inline(index) {
            self.process_queue(index);
        }
        // Also for a queue processed inline: the device thread re-arms its host-side
        // interest after every event (a buffer taken here may wait for the host socket).
        if let Some(evt) = self.queue_evts.get(index) {
            if let Err(e) = evt.write(1) {
                tracing::warn!(error = %e, "queue eventfd write failed");
            }
        }
    }

    /// Whether the driver's notifications of `queue` should reach this transport through the
    /// MMIO bus (no ioeventfd): see [`VirtioDevice::notifies_inline`].
    pub fn notifies_inline(&self, queue: usize) -> bool {
        self.device.notifies_inline(queue)
    }

    /// The transport's state as plain data.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Rebuilds a transport around `device` (restored separately) on `mem` from `state`,
    /// checking that the queues fit the device and guest memory. The device is not
    /// re-activated: it must come back in the state it was saved in. A pending interrupt is
    /// signalled again.
    pub fn restore(device: D, mem: M, state: &MmioTransportState) -> Result<Self, TransportError> {
        let mut t = Self::new(device, mem)?;
        if state.queues.len() != t.queues.len() {
            return Err(TransportError::InvalidState(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (q, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(TransportError::InvalidState(format!(
                    "queue {i}: max size {} saved, the device has {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            let restored = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| TransportError::InvalidState(format!("queue {i}: {e}")))?;
            if state.activated && restored.ready() && !restored.is_valid(&t.mem) {
                return Err(TransportError::InvalidState(format!(
                    "queue {i}: rings outside guest memory"
                )));
            }
            *q = restored;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        t.activated = state.activated;
        if t.interrupt_status != 0 {
            t.signal(0);
        }
        Ok(t)
    }
}

impl<D: VirtioDevice, M: GuestMemoryBackend + Send> BusDevice for MmioTransport<D, M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "misaligned virtio-mmio register read"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        if offset >= CONFIG_OFFSET {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return WriteOutcome::Handled;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "misaligned virtio-mmio register write"
            ),
        }
        WriteOutcome::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::TYPE_RNG;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    fn transport() -> MmioTransport<Rng, Mem> {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        MmioTransport::new(Rng::new(), mem).unwrap()
    }

    fn r<D: VirtioDevice>(t: &mut MmioTransport<D, Mem>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w<D: VirtioDevice>(t: &mut MmioTransport<D, Mem>, off: u64, v: u32) {
        assert_eq!(t.write(off, &v.to_le_bytes()), WriteOutcome::Handled);
    }

    fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D, Mem>) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport<Rng, Mem>) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, 0x1000);
        w(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), TYPE_RNG);
        assert_eq!(r(&mut t, reg::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
        // Not 4 bytes, or misaligned: reads 0.
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        assert_eq!(r(&mut t, 0x002), 0);
        // Write-only registers read 0; read-only registers ignore writes.
        assert_eq!(r(&mut t, reg::QUEUE_NOTIFY), 0);
        w(&mut t, reg::MAGIC, 0);
        assert_eq!(r(&mut t, reg::MAGIC), MMIO_MAGIC);
    }

    #[test]
    fn feature_negotiation() {
        let mut t = transport();
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);

        // Features written before DRIVER are ignored.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        assert_eq!(t.save().driver_features, 0);

        // Without VERSION_1, FEATURES_OK does not stick.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);

        // A feature never offered: refused too.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.save().driver_features, VIRTIO_F_VERSION_1);
        // Frozen after FEATURES_OK.
        w(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.save().driver_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn queue_setup_and_activation() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        for bad in [0, 3, 100, 512, 0x1_0000] {
            w(&mut t, reg::QUEUE_NUM, bad);
            assert_eq!(t.save().queues[0].size, 256, "size {bad} refused");
        }
        setup_queue(&mut t);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        let q = t.save().queues[0];
        assert_eq!(
            (q.size, q.desc_table, q.avail_ring, q.used_ring),
            (16, 0x1000, 0x2000, 0x3000)
        );
        // Changing a ready queue is ignored.
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.save().queues[0].size, 16);
        // A queue that does not exist.
        w(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        w(&mut t, reg::QUEUE_NUM, 8);

        assert!(!t.is_activated());
        w(&mut t, reg::STATUS, ALL);
        assert!(t.is_activated());
        assert!(!t.needs_reset());
        // Queue configuration is frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn driver_ok_before_features_ok_needs_reset() {
        let mut t = transport();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert!(t.needs_reset());
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
        assert!(t.irq_evt().read().is_ok());
        // Notify is ignored in that state.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(t.queue_evts()[0].read().is_err());
        // Reset clears it.
        w(&mut t, reg::STATUS, 0);
        assert!(!t.needs_reset());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_outside_memory_refuses_activation() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, 0);
        w(&mut t, reg::QUEUE_DESC_HIGH, 1); // 4 GiB: beyond 1 MiB of memory
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, ALL);
        assert!(!t.is_activated());
        assert!(t.needs_reset());
    }

    #[test]
    fn a_console_transmit_buffer_is_used_before_the_notify_returns() {
        use crate::virtio::console::{Console, TX_QUEUE};
        use std::io::Read;
        use vm_memory::Bytes;

        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (console, mut host) = Console::new().unwrap();
        let mut t = MmioTransport::new(console, mem.clone()).unwrap();
        assert!(t.notifies_inline(TX_QUEUE));
        assert!(!t.notifies_inline(0));
        negotiate(&mut t);
        for (queue, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            w(&mut t, reg::QUEUE_SEL, queue);
            w(&mut t, reg::QUEUE_NUM, 16);
            w(&mut t, reg::QUEUE_DESC_LOW, base);
            w(&mut t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
            w(&mut t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, ALL);
        assert!(t.is_activated());

        // The driver posts one transmit buffer: descriptor 0, then avail ring entry 0.
        let (desc, avail, used) = (0x2_0000u64, 0x2_1000u64, 0x2_2000u64);
        let data = b"hello from the guest";
        mem.write_slice(data, GuestAddress(0x5_0000)).unwrap();
        mem.write_obj(0x5_0000u64, GuestAddress(desc)).unwrap();
        mem.write_obj(data.len() as u32, GuestAddress(desc + 8))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(desc + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        w(&mut t, reg::QUEUE_NOTIFY, TX_QUEUE as u32);

        // Used, and the interrupt raised, by the time the write returns: a driver polling
        // the used ring finds it at once.
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(
            r(&mut t, reg::INTERRUPT_STATUS) & INT_USED_RING,
            INT_USED_RING
        );
        let mut got = vec![0u8; data.len()];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, data);
        // The device thread is still told (it re-arms its host-side interest).
        assert_eq!(t.queue_evts()[TX_QUEUE].read().unwrap(), 1);
    }

    #[test]
    fn notify_interrupt_ack_and_reset() {
        let mut t = transport();
        // Notify before activation: ignored.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(t.queue_evts()[0].read().is_err());
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, reg::STATUS, ALL);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, u32::MAX);

        t.signal(INT_USED_RING | INT_CONFIG);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
        w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);

        // Clearing status bits other than by writing 0 is ignored.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), ALL);
        w(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(t.save(), {
            let mut fresh = transport().save();
            fresh.config_generation = 0;
            fresh
        });
    }

    #[test]
    fn save_restore_round_trip() {
        let mut t = transport();
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, reg::STATUS, ALL);
        t.signal(INT_USED_RING);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        let state = t.save();
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let restored = MmioTransport::restore(Rng::new(), mem, &state).unwrap();
        assert_eq!(restored.save(), state);
        assert!(restored.is_activated());
        assert_eq!(
            restored.irq_evt().read().unwrap(),
            1,
            "pending interrupt re-signalled"
        );

        // States that do not fit are refused.
        let small = Mem::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        assert!(MmioTransport::restore(Rng::new(), small, &state).is_err());
        let mut bad = state.clone();
        bad.queues.push(QueueSnapshot::default());
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(MmioTransport::restore(Rng::new(), mem.clone(), &bad).is_err());
        let mut bad = state.clone();
        bad.queues[0].size = 3;
        assert!(MmioTransport::restore(Rng::new(), mem.clone(), &bad).is_err());
        let mut bad = state;
        bad.queues[0].max_size = 128;
        assert!(MmioTransport::restore(Rng::new(), mem, &bad).is_err());
    }
}

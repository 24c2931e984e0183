//! virtio-console (device id 3) with a single port, the channel to the in-guest agent.
//!
//! **Port choice.** One port, `VIRTIO_CONSOLE_F_MULTIPORT` not offered: the guest sees it as
//! the tty `/dev/hvcN` (N counts virtio consoles in probe order, so `hvc0` when it is the
//! only one), with no control queue to emulate. The agent must put that tty in raw mode
//! (`cfmakeraw`), or the line discipline echoes and rewrites its binary frames, and the
//! kernel must not use it as its console (`console=ttyS0`). A VMM wanting a separate console
//! tty creates a second [`Console`].
//!
//! **Host side.** [`Console::new`] returns the other end of a Unix socket pair: bytes the
//! engine writes there reach the guest, bytes the guest writes come out of it.
//!
//! **Bounded buffering, no loss.** Host→guest bytes are read from the socket only while the
//! `to_guest` buffer has room ([`DEFAULT_BUFFER_BYTES`]); they wait there until the guest
//! posts receive buffers, so nothing is lost when its receive queue is empty (the socket
//! itself then applies back-pressure to the engine). Guest→host chains are taken only while
//! the `to_host` buffer can hold the whole chain; otherwise they stay in the ring (the guest
//! blocks) until the socket drains.
//!
//! **Closed host end.** After the engine closes its end, bytes already buffered for the
//! guest are still delivered; the guest's later output is consumed and discarded (counted
//! in [`Console::discarded_to_host`]) so that a guest writing to a dead channel does not hang.
//!
//! **Driver reset** keeps both buffers: a driver reload loses nothing in flight.
//!
//! Queues: 0 is `receiveq` (device-writable chains only), 1 is `transmitq` (device-readable
//! only); a chain breaking that, or longer than [`MAX_CHAIN_BYTES`], is returned with 0 bytes.

use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use super::queue_check::{ChainRules, Direction};
use super::{
    ActivateError, HostEvent, HostInterest, QueueContext, QueueError, VirtioDevice, TYPE_CONSOLE,
    VIRTIO_F_VERSION_1,
};
use crate::ring::BoundedFifo;

/// Index of the receive queue (host → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → host).
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Default bound of each direction's buffer.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Largest buffer bound a console takes (a restored state asking for more is refused).
pub const MAX_BUFFER_BYTES: usize = 16 << 20;
/// Largest chain accepted on either queue (Linux uses page-sized buffers).
pub const MAX_CHAIN_BYTES: u32 = 64 * 1024;
/// Size of `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr).
const CONFIG_SIZE: usize = 12;

const RX_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceWrites,
    max_bytes: MAX_CHAIN_BYTES,
};
const TX_RULES: ChainRules = ChainRules {
    direction: Direction::DeviceReads,
    max_bytes: MAX_CHAIN_BYTES,
};

/// Why a console could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The socket pair could not be created or configured.
    #[error("console socket: {0}")]
    Socket(#[source] io::Error),
    /// A saved state does not fit.
    #[error("invalid console state: {0}")]
    InvalidState(String),
}

/// What the console saves: the bytes in flight in each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Bound of each direction's buffer.
    pub buffer_bytes: usize,
    /// Host bytes not yet delivered to the guest.
    pub to_guest: Vec<u8>,
    /// Guest bytes not yet written to the host socket.
    pub to_host: Vec<u8>,
}

/// The virtio console device (one port).
#[derive(Debug)]
pub struct Console {
    host: UnixStream,
    to_guest: BoundedFifo,
    to_host: BoundedFifo,
    host_read_closed: bool,
    host_write_closed: bool,
    host_hangup: bool,
    discarded_to_host: u64,
    bytes_to_guest: u64,
    bytes_to_host: u64,
}

impl Console {
    /// A console with the default buffer bound; returns the engine's end of the channel.
    pub fn new() -> Result<(Self, UnixStream), ConsoleError> {
        Self::with_buffer(DEFAULT_BUFFER_BYTES)
    }

    /// A console whose buffers hold at most `buffer_bytes` each (at least one chain,
    /// [`MAX_CHAIN_BYTES`], is always accepted on transmit).
    pub fn with_buffer(buffer_bytes: usize) -> Result<(Self, UnixStream), ConsoleError> {
        let (device_end, host_end) = UnixStream::pair().map_err(ConsoleError::Socket)?;
        device_end
            .set_nonblocking(true)
            .map_err(ConsoleError::Socket)?;
        let console = Self {
            host: device_end,
            to_guest: BoundedFifo::new(buffer_bytes),
            to_host: BoundedFifo::new(buffer_bytes.max(MAX_CHAIN_BYTES as usize)),
            host_read_closed: false,
            host_write_closed: false,
            host_hangup: false,
            discarded_to_host: 0,
            bytes_to_guest: 0,
            bytes_to_host: 0,
        };
        Ok((console, host_end))
    }

    /// Host bytes waiting for guest receive buffers.
    pub fn pending_to_guest(&self) -> usize {
        self.to_guest.len()
    }

    /// Guest bytes waiting for the host socket.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Guest bytes discarded because the host end was closed.
    pub fn discarded_to_host(&self) -> u64 {
        self.discarded_to_host
    }

    /// Bytes delivered into guest buffers since creation.
    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest
    }

    /// Bytes written to the host socket since creation.
    pub fn bytes_to_host(&self) -> u64 {
        self.bytes_to_host
    }

    /// Moves every byte the engine has written into the socket pair so far into the
    /// device's buffer for the guest, past its bound if need be (nothing is lost; the device
    /// reads no more until the guest has taken them): so that a [`Self::save`] that follows
    /// holds them. Returns how many bytes were moved. Call it with the device thread paused.
    pub fn absorb_host_input(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let mut moved = 0;
        while !self.host_read_closed {
            match self.host.read(&mut chunk) {
                Ok(0) => self.host_read_closed = true,
                Ok(n) => {
                    self.to_guest.push_over_bound(&chunk[..n]);
                    moved += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: all read; other errors: read_host reports them
            }
        }
        moved
    }

    /// The device's state as plain data. Bytes still inside the socket pair are not part of
    /// it: quiesce the engine's side first (see [`Self::absorb_host_input`]).
    pub fn save(&self) -> ConsoleState {
        ConsoleState {
            buffer_bytes: self.to_guest.capacity(),
            to_guest: self.to_guest.to_vec(),
            to_host: self.to_host.to_vec(),
        }
    }

    /// A console holding the saved bytes in flight, with a fresh socket pair; returns the
    /// engine's end.
    pub fn restore(state: &ConsoleState) -> Result<(Self, UnixStream), ConsoleError> {
        // A state may hold more than the bound (see `absorb_host_input`), never more than
        // a few frames: anything larger is not a state this device wrote.
        let limit = state
            .buffer_bytes
            .max(MAX_CHAIN_BYTES as usize)
            .saturating_mul(64);
        if state.buffer_bytes == 0
            || state.buffer_bytes > MAX_BUFFER_BYTES
            || state.to_guest.len() > limit
            || state.to_host.len() > limit
        {
            return Err(ConsoleError::InvalidState(format!(
                "{} + {} bytes in flight for {}-byte buffers",
                state.to_guest.len(),
                state.to_host.len(),
                state.buffer_bytes
            )));
        }
        let (mut console, host) = Self::with_buffer(state.buffer_bytes)?;
        console.to_guest.push_over_bound(&state.to_guest);
        console.to_host.push_over_bound(&state.to_host);
        Ok((console, host))
    }

    /// Reads host bytes into `to_guest` while there is room.
    fn read_host(&mut self) {
        let mut chunk = [0u8; 4096];
        while !self.host_read_closed && self.to_guest.room() > 0 {
            let want = chunk.len().min(self.to_guest.room());
            match self.host.read(&mut chunk[..want]) {
                Ok(0) => {
                    tracing::debug!("console host end closed for reading");
                    self.host_read_closed = true;
                }
                Ok(n) => {
                    self.to_guest.push(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "console host read failed; closing");
                    self.host_read_closed = true;
                }
            }
        }
    }

    /// Writes `to_host` to the socket until it would block.
    fn flush_host(&mut self) {
        while !self.to_host.is_empty() {
            if self.host_write_closed {
                self.discarded_to_host += self.to_host.len() as u64;
                self.to_host.clear();
                return;
            }
            let (front, _) = self.to_host.as_slices();
            match self.host.write(front) {
                Ok(0) => self.host_write_closed = true,
                Ok(n) => {
                    self.to_host.consume(n);
                    self.bytes_to_host += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "console host end closed for writing");
                    self.host_write_closed = true;
                }
            }
        }
    }

    /// Moves `to_guest` bytes into the guest's receive buffers while both exist.
    fn fill_rx<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), QueueError> {
        let mut staging = Vec::new();
        while !self.to_guest.is_empty() {
            let Some(chain) = ctx.pop(RX_QUEUE, RX_RULES)? else {
                break;
            };
            let n = (chain.writable_len() as usize).min(self.to_guest.len());
            staging.clear();
            let (a, b) = self.to_guest.as_slices();
            staging.extend(a.iter().chain(b).take(n));
            let written = match chain.write_all(ctx.memory(), &staging) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "console receive copy failed");
                    0
                }
            };
            self.to_guest.consume(written);
            self.bytes_to_guest += written as u64;
            ctx.add_used(RX_QUEUE, chain.head, written as u32)?;
        }
        Ok(())
    }

    /// Takes transmit chains while `to_host` can hold them, flushing to the socket between.
    fn drain_tx<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), QueueError> {
        loop {
            self.flush_host();
            let mut took = false;
            while let Some(chain) = ctx.pop(TX_QUEUE, TX_RULES)? {
                if chain.readable_len() as usize > self.to_host.room() {
                    ctx.unpop(TX_QUEUE)?;
                    break;
                }
                match chain.read_all(ctx.memory()) {
                    Ok(bytes) => {
                        self.to_host.push(&bytes);
                    }
                    Err(e) => tracing::warn!(error = %e, "console transmit copy failed"),
                }
                ctx.add_used(TX_QUEUE, chain.head, 0)?;
                took = true;
            }
            if !took {
                return Ok(());
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// The transmit queue: Linux's hvc console driver (the agent's tty) spins, interrupts
    /// off, after each write until the device has used the buffer; taken in the vCPU's own
    /// exit, it is used before the driver first looks, and the vCPU never spins (under
    /// nested virtualization each spin iteration is a VM exit).
    fn notifies_inline(&self, queue: usize) -> bool {
        queue == TX_QUEUE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports and emerg_wr are all 0: none of their features is offered.
        let config = [0u8; CONFIG_SIZE];
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate<M: GuestMemoryBackend>(
        &mut self,
        _features: u64,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), ActivateError> {
        self.fill_rx(ctx)
            .and_then(|()| self.drain_tx(ctx))
            .map_err(|e| ActivateError::Device(e.to_string()))
    }

    fn process_queue<M: GuestMemoryBackend>(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_, M>,
    ) -> Result<(), QueueError> {
        match queue {
            RX_QUEUE => self.fill_rx(ctx),
            TX_QUEUE => self.drain_tx(ctx),
            other => Err(QueueError::NoSuchQueue(other)),
        }
    }

    fn reset(&mut self) {}

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.host.as_raw_fd())
    }

    fn host_interest(&self) -> Option<HostInterest> {
        let readable = !self.host_read_closed && self.to_guest.room() > 0;
        let writable = !self.host_write_closed && !self.to_host.is_empty();
        let done = self.host_read_closed && self.host_write_closed;
        // After a hang-up epoll reports the descriptor whatever we ask for: stop watching it
        // until there is room to read what is left (or for good once both directions closed).
        if done || (self.host_hangup && !readable) {
            return None;
        }
        Some(HostInterest { readable, writable })
    }

    fn process_host<M: GuestMemoryBackend>(
        &mut self,
        event: HostEvent,
        ctx: Option<&mut QueueContext<'_, M>>,
    ) -> Result<(), QueueError> {
        if event.hangup {
            self.host_hangup = true;
        }
        if event.readable || event.hangup {
            self.read_host();
        }
        self.flush_host();
        if let Some(ctx) = ctx {
            self.fill_rx(ctx)?;
            self.drain_tx(ctx)?;
            // Reading may have made room again after the guest took bytes.
            if event.readable || event.hangup {
                self.read_host();
                self.fill_rx(ctx)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const READ: HostEvent = HostEvent {
        readable: true,
        writable: false,
        hangup: false,
    };

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    struct Rig<'a> {
        mem: &'a Mem,
        rx: MockSplitQueue<'a, Mem>,
        tx: MockSplitQueue<'a, Mem>,
        queues: Vec<Queue>,
        rx_next: u16,
        tx_next: u16,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a Mem) -> Self {
            let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
            // MockSplitQueue puts its used ring over the end of its available ring (its
            // `end()` counts elements, not bytes), so the device gets a used ring of its own.
            let mut queues: Vec<Queue> =
                vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            for (q, base) in queues.iter_mut().zip([0x8000u64, 0x1_8000]) {
                q.try_set_used_ring_address(GuestAddress(base)).unwrap();
            }
            Self {
                mem,
                rx,
                tx,
                queues,
                rx_next: 0,
                tx_next: 0,
            }
        }

        fn ctx(&mut self) -> QueueContext<'_, Mem> {
            QueueContext::new(self.mem, &mut self.queues)
        }

        /// Posts a receive buffer of `len` bytes at `addr`.
        fn post_rx(&mut self, addr: u64, len: u32) {
            self.rx
                .add_desc_chains(&[d(addr, len, W)], self.rx_next % 16)
                .unwrap();
            self.rx_next += 1;
        }

        /// Posts a transmit buffer holding `data` at `addr`.
        fn post_tx(&mut self, addr: u64, data: &[u8]) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            self.tx
                .add_desc_chains(&[d(addr, data.len() as u32, 0)], self.tx_next % 16)
                .unwrap();
            self.tx_next += 1;
        }

        fn used_ring(&self, queue: usize) -> u64 {
            self.queues[queue].used_ring()
        }

        fn used(&self, queue: usize, i: usize) -> (u32, u32) {
            let at = self.used_ring(queue) + 4 + 8 * i as u64;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        }

        fn used_idx(&self, queue: usize) -> u16 {
            self.mem
                .read_obj(GuestAddress(self.used_ring(queue) + 2))
                .unwrap()
        }
    }

    fn read_guest(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn host_bytes_wait_for_guest_buffers() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let (mut dev, mut host) = Console::new().unwrap();
        host.write_all(b"hello").unwrap();
        dev.process_host(READ, Some(&mut rig.ctx())).unwrap();
        assert_eq!(dev.pending_to_guest(), 5, "no receive buffer yet: kept");
        rig.post_rx(0x10_0000, 3);
        rig.post_rx(0x10_1000, 64);
        let mut ctx = rig.ctx();
        dev.process_queue(RX_QUEUE, &mut ctx).unwrap();
        assert!(ctx.used_added());
        assert_eq!(dev.pending_to_guest(), 0);
        assert_eq!(rig.used(RX_QUEUE, 0), (0, 3));
        assert_eq!(rig.used(RX_QUEUE, 1), (1, 2));
        assert_eq!(read_guest(&m, 0x10_0000, 3), b"hel");
        assert_eq!(read_guest(&m, 0x10_1000, 2), b"lo");
        assert_eq!(dev.bytes_to_guest(), 5);
    }

    #[test]
    fn guest_bytes_reach_the_host() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let (mut dev, mut host) = Console::new().unwrap();
        rig.post_tx(0x20_0000, b"abc");
        rig.post_tx(0x20_1000, b"def");
        dev.process_queue(TX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used_idx(TX_QUEUE), 2);
        assert_eq!(rig.used(TX_QUEUE, 1), (1, 0));
        let mut got = [0u8; 6];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcdef");
        assert_eq!(dev.bytes_to_host(), 6);
    }

    #[test]
    fn host_to_guest_buffer_is_bounded() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let (mut dev, mut host) = Console::with_buffer(16).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        host.write_all(&data).unwrap();
        dev.process_host(READ, Some(&mut rig.ctx())).unwrap();
        assert_eq!(dev.pending_to_guest(), 16);
        assert_eq!(
            dev.host_interest(),
            Some(HostInterest {
                readable: false,
                writable: false
            }),
            "full: stop reading the socket"
        );
        let mut delivered = Vec::new();
        for i in 0..10u64 {
            rig.post_rx(0x10_0000 + i * 0x1000, 12);
            dev.process_queue(RX_QUEUE, &mut rig.ctx()).unwrap();
            assert!(dev.host_interest().is_some_and(|i| i.readable));
            dev.process_host(READ, Some(&mut rig.ctx())).unwrap();
            assert!(dev.pending_to_guest() <= 16);
        }
        for i in 0..10usize {
            let (_, len) = rig.used(RX_QUEUE, i);
            delivered.extend(read_guest(&m, 0x10_0000 + i as u64 * 0x1000, len as usize));
        }
        assert_eq!(delivered, data, "in order, nothing lost");
    }

    #[test]
    fn guest_to_host_back_pressure_loses_nothing() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let (mut dev, mut host) = Console::new().unwrap();
        let chunk = 60 * 1024;
        let mut sent: Vec<u8> = Vec::new();
        let mut posted = 0u64;
        // Post until the device stops taking chains: socket and buffer are full.
        loop {
            let data: Vec<u8> = (0..chunk).map(|i| (i as u64 * 7 + posted) as u8).collect();
            rig.post_tx(0x20_0000 + posted * 0x1_0000, &data);
            sent.extend(&data);
            posted += 1;
            dev.process_queue(TX_QUEUE, &mut rig.ctx()).unwrap();
            if u64::from(rig.used_idx(TX_QUEUE)) < posted || posted == 15 {
                break;
            }
        }
        assert!(posted < 15, "the socket should fill up");
        assert!(dev.host_interest().is_some_and(|i| i.writable));
        let reader = std::thread::spawn(move || {
            let mut got: Vec<u8> = Vec::new();
            let mut buf = [0u8; 65536];
            while let Ok(n) = host.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend(&buf[..n]);
            }
            got
        });
        let writable = HostEvent {
            readable: false,
            writable: true,
            hangup: false,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (u64::from(rig.used_idx(TX_QUEUE)) < posted || dev.pending_to_host() > 0)
            && std::time::Instant::now() < deadline
        {
            dev.process_host(writable, Some(&mut rig.ctx())).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(dev);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "in order, nothing lost");
    }

    #[test]
    fn closed_host_end_discards_guest_output_and_stops_watching() {
        let m = mem();
        let mut rig = Rig::new(&m);
        let (mut dev, mut host) = Console::new().unwrap();
        host.write_all(b"last words").unwrap();
        drop(host);
        let hup = HostEvent {
            readable: true,
            writable: false,
            hangup: true,
        };
        dev.process_host(hup, Some(&mut rig.ctx())).unwrap();
        assert_eq!(
            dev.pending_to_guest(),
            10,
            "bytes before the close are kept"
        );
        rig.post_tx(0x20_0000, b"nobody listens");
        dev.process_queue(TX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used_idx(TX_QUEUE), 1, "guest not blocked");
        assert_eq!(dev.discarded_to_host(), 14);
        assert_eq!(dev.host_interest(), None);
        rig.post_rx(0x10_0000, 64);
        dev.process_queue(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(read_guest(&m, 0x10_0000, 10), b"last words");
    }

    #[test]
    fn inactive_device_buffers_host_bytes_within_bounds() {
        let (mut dev, mut host) = Console::with_buffer(4).unwrap();
        host.write_all(b"0123456789").unwrap();
        dev.process_host::<Mem>(READ, None).unwrap();
        assert_eq!(dev.pending_to_guest(), 4);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut dev, mut host) = Console::with_buffer(8).unwrap();
        host.write_all(b"abc").unwrap();
        dev.process_host::<Mem>(READ, None).unwrap();
        dev.to_host.push(b"xy");
        let state = dev.save();
        assert_eq!(state.to_guest, b"abc");
        assert_eq!(state.buffer_bytes, 8);
        let (restored, _host) = Console::restore(&state).unwrap();
        assert_eq!(restored.save(), state);
        let mut bad = state;
        bad.to_guest = vec![0; MAX_CHAIN_BYTES as usize * 64 + 1];
        assert!(Console::restore(&bad).is_err());
        bad.to_guest.clear();
        bad.buffer_bytes = 0;
        assert!(Console::restore(&bad).is_err());
        // Found by the linux_devices fuzz target: a huge bound must not overflow.
        bad.buffer_bytes = usize::MAX;
        assert!(Console::restore(&bad).is_err());
    }

    #[test]
    fn absorbed_host_input_goes_past_the_bound_into_the_saved_state() {
        let (mut dev, mut host) = Console::with_buffer(4).unwrap();
        host.write_all(b"0123456789").unwrap();
        dev.process_host::<Mem>(READ, None).unwrap();
        assert_eq!(dev.pending_to_guest(), 4);
        assert_eq!(dev.absorb_host_input(), 6);
        let state = dev.save();
        assert_eq!(
            (state.to_guest.as_slice(), state.buffer_bytes),
            (&b"0123456789"[..], 4)
        );
        // The restored device holds them all too, and delivers them in order.
        let (restored, _host) = Console::restore(&state).unwrap();
        assert_eq!(restored.pending_to_guest(), 10);
        assert_eq!(restored.save(), state);
    }

    #[test]
    fn config_space_reads_zero_and_never_panics() {
        let (dev, _host) = Console::new().unwrap();
        let mut b = [0xffu8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(b, [0; 8]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
    }
}

//! `virtio_mmio` and `virtio_queue` seeds: a driver bringing devices up and exchanging
//! buffers with them, and valid split virtqueues, with descriptors encoded by `virtio-queue`;
//! `linux_devices` seeds: those devices saved as a Linux snapshot saves them.

use capsule_devices::serial::SerialDevice;
use capsule_devices::virtio::console::Console;
use capsule_devices::virtio::mmio::{MmioTransport, CONFIG_OFFSET, NOTIFY_OFFSET};
use capsule_devices::virtio::queue_check::{walk_chain, ChainRules, Direction};
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::{status, VirtioDevice, VIRTIO_F_VERSION_1};
use capsule_fuzz::mmio_program::{self, Op};
use capsule_snapshot::state_file::{decode_state_bytes, encode_state_bytes};
use capsule_vmm::machine::linux::LinuxDeviceState;
use capsule_fuzz::queue_layout::{self, Header, AVAIL_RING, DESC_TABLE, INPUT_MAX};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::Seed;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// virtio-mmio register offsets (virtio 1.1 §4.2.2).
mod reg {
    pub const MAGIC: u16 = 0x000;
    pub const VERSION: u16 = 0x004;
    pub const DEVICE_ID: u16 = 0x008;
    pub const DEVICE_FEATURES: u16 = 0x010;
    pub const DEVICE_FEATURES_SEL: u16 = 0x014;
    pub const DRIVER_FEATURES: u16 = 0x020;
    pub const DRIVER_FEATURES_SEL: u16 = 0x024;
    pub const QUEUE_SEL: u16 = 0x030;
    pub const QUEUE_NUM_MAX: u16 = 0x034;
    pub const QUEUE_NUM: u16 = 0x038;
    pub const QUEUE_READY: u16 = 0x044;
    pub const STATUS: u16 = 0x070;
    pub const QUEUE_DESC_LOW: u16 = 0x080;
    pub const QUEUE_DRIVER_LOW: u16 = 0x090;
    pub const QUEUE_DEVICE_LOW: u16 = 0x0a0;
    pub const CONFIG_GENERATION: u16 = 0x0fc;
}

/// Size the seeds give every queue.
const QUEUE_SIZE: u16 = 8;

/// Where queue `q`'s rings and buffers live in the `virtio_mmio` target's guest memory.
fn queue_base(q: u16) -> u32 {
    u32::from(q) * 0x4000
}

fn write(offset: u16, value: u32) -> Op {
    Op::Write { offset, value }
}

fn read(offset: u16) -> Op {
    Op::Read { offset, len: 4 }
}

/// The driver's bring-up of a device with `queues` queues (virtio 1.1 §3.1.1).
fn bring_up(queues: u16) -> Vec<Op> {
    let acked = status::ACKNOWLEDGE | status::DRIVER;
    let mut ops = vec![
        read(reg::MAGIC),
        read(reg::VERSION),
        read(reg::DEVICE_ID),
        write(reg::STATUS, status::ACKNOWLEDGE),
        write(reg::STATUS, acked),
        write(reg::DEVICE_FEATURES_SEL, 1),
        read(reg::DEVICE_FEATURES),
        write(reg::DRIVER_FEATURES_SEL, 1),
        write(reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32),
        write(reg::DRIVER_FEATURES_SEL, 0),
        write(reg::DRIVER_FEATURES, 0),
        write(reg::STATUS, acked | status::FEATURES_OK),
        read(reg::STATUS),
    ];
    for q in 0..queues {
        let base = queue_base(q);
        ops.extend([
            write(reg::QUEUE_SEL, u32::from(q)),
            read(reg::QUEUE_NUM_MAX),
            write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE)),
            write(reg::QUEUE_DESC_LOW, base),
            write(reg::QUEUE_DRIVER_LOW, base + 0x1000),
            write(reg::QUEUE_DEVICE_LOW, base + 0x2000),
            write(reg::QUEUE_READY, 1),
        ]);
    }
    ops.push(write(
        reg::STATUS,
        acked | status::FEATURES_OK | status::DRIVER_OK,
    ));
    ops.push(read(reg::CONFIG_GENERATION));
    ops
}

/// Guest memory writes that store `bytes` (padded to whole words) at `addr`.
fn store(addr: u32, bytes: &[u8]) -> Vec<Op> {
    bytes
        .chunks(4)
        .zip((addr..).step_by(4))
        .map(|(chunk, addr)| {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            Op::Memory {
                addr,
                value: u32::from_le_bytes(word),
            }
        })
        .collect()
}

/// Makes one buffer of `len` bytes at `buffer` available on queue `q` as its `nth` chain
/// (descriptor `nth`, ring slot `nth`), then notifies the device and lets it run.
fn offer(q: u16, nth: u16, buffer: u32, len: u32, flags: u16) -> Vec<Op> {
    let base = queue_base(q);
    let desc = Descriptor::new(u64::from(buffer), len, flags, 0);
    let mut ops = store(base + 16 * u32::from(nth), desc.as_slice());
    // The ring entry, then the index that publishes it.
    let slot = base + 0x1004 + 2 * u32::from(nth);
    ops.extend(store(slot & !3, &[0; 4]));
    ops.push(Op::Memory {
        addr: slot & !3,
        value: u32::from(nth) << (8 * (slot & 3)),
    });
    ops.push(Op::Memory {
        addr: base + 0x1000,
        value: u32::from(nth + 1) << 16,
    });
    ops.push(write(NOTIFY_OFFSET as u16, u32::from(q)));
    ops.push(Op::ProcessQueue { queue: q as u8 });
    ops.push(Op::AckInterrupts);
    ops
}

/// The console's host end sends (up to 7) bytes and reads what the guest sent.
fn host_sends(text: &[u8]) -> Op {
    let mut data = [0u8; 7];
    data[..text.len()].copy_from_slice(text);
    // Bytes 1 and 2 of the data double as the event flags and the close marker.
    data[1] = 0b011;
    data[2] = 0;
    Op::Host {
        data,
        readable: true,
        writable: true,
        hangup: false,
        close: false,
    }
}

fn program(pick: u8, ops: &[Op]) -> Result<Vec<u8>, String> {
    let mut out = vec![pick];
    for op in ops {
        out.extend(
            op.encode()
                .ok_or_else(|| format!("{op:?} does not encode"))?,
        );
    }
    Ok(out)
}

/// Seeds for `virtio_mmio`.
pub fn mmio_seeds() -> Result<Vec<Seed>, String> {
    let rng = [
        bring_up(1),
        offer(0, 0, 0x3000, 16, WRITE),
        offer(0, 1, 0x3100, 64, WRITE),
        vec![Op::Read {
            offset: CONFIG_OFFSET as u16,
            len: 4,
        }],
    ]
    .concat();
    let console = [
        bring_up(2),
        offer(0, 0, 0x3000, 32, WRITE),
        vec![host_sends(b"h?i!\n"), Op::ProcessQueue { queue: 0 }],
        store(0x7000, b"ping"),
        offer(1, 0, 0x7000, 4, 0),
        vec![host_sends(b"o"), Op::AckInterrupts],
    ]
    .concat();
    let hangup = [
        bring_up(2),
        offer(0, 0, 0x3000, 32, WRITE),
        vec![Op::Host {
            data: [b'x', 0b101, 0xff, 0, 0, 0, 0],
            readable: true,
            writable: false,
            hangup: true,
            close: true,
        }],
        store(0x7000, b"late"),
        offer(1, 0, 0x7000, 4, 0),
    ]
    .concat();
    Ok(vec![
        Seed::new("rng-bring-up-and-two-requests", program(0, &rng)?),
        // Odd picks are the console, with a buffer of 1 + pick * 64 bytes.
        Seed::new("console-receive-and-send", program(1, &console)?),
        Seed::new("console-host-hangs-up", program(3, &hangup)?),
    ])
}

/// Runs a `virtio_mmio` program on a real transport: a seed must leave the device live,
/// not needing a reset, with every chain it offered accepted.
pub fn check_mmio(data: &[u8]) -> Result<(), String> {
    let (&pick, ops) = data.split_first().ok_or("empty program")?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mmio_program::MEM_SIZE)])
        .map_err(|e| e.to_string())?;
    if pick % 2 == 0 {
        let t = MmioTransport::new(Rng::new(), mem.clone()).map_err(|e| e.to_string())?;
        run_and_judge(t, &mem, None, ops)
    } else {
        let (console, host) =
            Console::with_buffer(1 + usize::from(pick) * 64).map_err(|e| e.to_string())?;
        host.set_nonblocking(true).map_err(|e| e.to_string())?;
        let t = MmioTransport::new(console, mem.clone()).map_err(|e| e.to_string())?;
        run_and_judge(t, &mem, Some(host), ops)
    }
}

fn run_and_judge<D: VirtioDevice>(
    mut t: MmioTransport<D, GuestMemoryMmap<()>>,
    mem: &GuestMemoryMmap<()>,
    host: Option<std::os::unix::net::UnixStream>,
    ops: &[u8],
) -> Result<(), String> {
    mmio_program::run(&mut t, mem, host, ops);
    if !t.is_activated() || t.needs_reset() || t.rejected_chains() != 0 {
        return Err(format!("the device ends as {}", t.describe()));
    }
    Ok(())
}

/// A `virtio_queue` input: `header`, then `chains` (descriptor lists, the first of each at
/// the given index) made available in ring slots from `header.next_avail` on.
fn queue_input(header: Header, chains: &[(u16, &[(u16, Descriptor)])]) -> Result<Vec<u8>, String> {
    let size = usize::from(header.size);
    let avail_end = AVAIL_RING as usize + 4 + 2 * size;
    let mut m = vec![0u8; avail_end];
    let mut idx = u16::from(header.next_avail);
    for (head, descriptors) in chains {
        for (at, desc) in descriptors.iter() {
            let start = DESC_TABLE as usize + 16 * usize::from(*at);
            m[start..start + 16].copy_from_slice(desc.as_slice());
        }
        let slot = AVAIL_RING as usize + 4 + 2 * (usize::from(idx) % size);
        m[slot..slot + 2].copy_from_slice(&head.to_le_bytes());
        idx = idx.wrapping_add(1);
    }
    let ring_idx = AVAIL_RING as usize + 2;
    m[ring_idx..ring_idx + 2].copy_from_slice(&idx.to_le_bytes());
    let h = header.encode().ok_or("bad queue header")?;
    m[..h.len()].copy_from_slice(&h);
    if m.len() > INPUT_MAX {
        return Err("input too long".into());
    }
    Ok(m)
}

/// Seeds for `virtio_queue`: descriptor 0 is under the header, so chains start at 1.
pub fn queue_seeds() -> Result<Vec<Seed>, String> {
    let d = Descriptor::new;
    let writable = queue_input(
        Header {
            size: 8,
            max_bytes: 4096,
            next_avail: 0,
        },
        &[
            (1, &[(1, d(0x3000, 64, WRITE, 0))]),
            (
                2,
                &[
                    (2, d(0x3100, 32, WRITE | NEXT, 3)),
                    (3, d(0x3200, 32, WRITE, 0)),
                ],
            ),
        ],
    )?;
    let readable = queue_input(
        Header {
            size: 4,
            max_bytes: 64,
            next_avail: 0,
        },
        &[(1, &[(1, d(0x3000, 5, NEXT, 2)), (2, d(0x3100, 3, 0, 0))])],
    )?;
    let wrapping = queue_input(
        Header {
            size: 256,
            max_bytes: 0xffff,
            next_avail: 254,
        },
        &[
            (5, &[(5, d(0x4000, 512, WRITE, 0))]),
            (
                6,
                &[(6, d(0x5000, 8, NEXT, 7)), (7, d(0x5100, 8, WRITE, 0))],
            ),
            (8, &[(8, d(0xfff0, 16, WRITE, 0))]),
        ],
    )?;
    Ok(vec![
        Seed::new("writable-chains", writable),
        Seed::new("readable-chain", readable),
        Seed::new("ring-wraps-at-256", wrapping),
    ])
}

/// A `virtio_queue` seed: every chain it makes available passes `walk_chain`.
pub fn check_queue(data: &[u8]) -> Result<(), String> {
    let header = Header::decode(data).ok_or("shorter than the header")?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), queue_layout::MEM_SIZE)])
        .map_err(|e| e.to_string())?;
    mem.write_slice(&data[..data.len().min(INPUT_MAX)], GuestAddress(0))
        .map_err(|e| e.to_string())?;
    let word = |addr: u64| {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map_err(|e| e.to_string())
    };
    let end = word(AVAIL_RING + 2)?;
    let mut idx = u16::from(header.next_avail);
    if idx == end {
        return Err("no chain is available".into());
    }
    while idx != end {
        let slot = AVAIL_RING + 4 + 2 * u64::from(idx % header.size);
        let head = word(slot)?;
        let rules = ChainRules {
            direction: Direction::Both,
            max_bytes: u32::from(header.max_bytes),
        };
        walk_chain(&mem, GuestAddress(DESC_TABLE), header.size, head, rules)
            .map_err(|e| format!("chain at {head}: {e}"))?;
        idx = idx.wrapping_add(1);
    }
    Ok(())
}

/// A `linux_devices` input: `state` as a state-file image behind its `u16` length, then the
/// operations `ops`.
fn linux_devices_input(state: &LinuxDeviceState, ops: &[Op]) -> Result<Vec<u8>, String> {
    let image = encode_state_bytes(state).map_err(|e| e.to_string())?;
    let len = u16::try_from(image.len()).map_err(|_| "state image over 64 KiB".to_string())?;
    let mut out = len.to_le_bytes().to_vec();
    out.extend(image);
    out.extend(program(0, ops)?.into_iter().skip(1));
    Ok(out)
}

/// The devices of a Linux machine after a driver brought them up and exchanged buffers,
/// saved as a snapshot saves them.
fn live_linux_devices() -> Result<LinuxDeviceState, String> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mmio_program::MEM_SIZE)])
        .map_err(|e| e.to_string())?;
    let (console, host) = Console::with_buffer(4096).map_err(|e| e.to_string())?;
    host.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut console = MmioTransport::new(console, mem.clone()).map_err(|e| e.to_string())?;
    let ops = [
        bring_up(2),
        offer(0, 0, 0x3000, 32, WRITE),
        vec![host_sends(b"h?i!\n")],
        store(0x7000, b"ping"),
        offer(1, 0, 0x7000, 4, 0),
    ]
    .concat();
    mmio_program::run(&mut console, &mem, Some(host), &program(1, &ops)?[1..]);
    let mut rng = MmioTransport::new(Rng::new(), mem.clone()).map_err(|e| e.to_string())?;
    let ops = [bring_up(1), offer(0, 0, 0x3000, 16, WRITE)].concat();
    mmio_program::run(&mut rng, &mem, None, &program(0, &ops)?[1..]);
    let serial = SerialDevice::with_new_eventfd().map_err(|e| e.to_string())?;
    Ok(LinuxDeviceState {
        serial: serial.save(),
        console_transport: console.save(),
        console: console.device().save(),
        rng_transport: rng.save(),
        rng: rng.device().save(),
    })
}

/// Seeds for `linux_devices`.
pub fn linux_devices_seeds() -> Result<Vec<Seed>, String> {
    let live = live_linux_devices()?;
    let traffic = [
        offer(0, 1, 0x3100, 64, WRITE),
        vec![host_sends(b"more"), Op::AckInterrupts],
    ]
    .concat();
    Ok(vec![
        Seed::new(
            "fresh-devices",
            linux_devices_input(&LinuxDeviceState::default(), &[])?,
        ),
        Seed::new("live-devices", linux_devices_input(&live, &[])?),
        Seed::new(
            "live-devices-then-traffic",
            linux_devices_input(&live, &traffic)?,
        ),
    ])
}

/// Whether a `linux_devices` input's state image decodes.
pub fn check_linux_devices(input: &[u8]) -> Result<(), String> {
    let (len, rest) = input
        .split_first_chunk::<2>()
        .ok_or("no length prefix")?;
    let len = usize::from(u16::from_le_bytes(*len));
    let image = rest.get(..len).ok_or("shorter than its length prefix")?;
    decode_state_bytes::<LinuxDeviceState>(image)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

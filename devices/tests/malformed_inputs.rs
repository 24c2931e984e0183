//! Malformed guest input through the transport: each case's documented outcome, and a
//! deterministic random barrage that must never panic.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use capsule_devices::virtio::console::{Console, TX_QUEUE};
use capsule_devices::virtio::mmio::{MmioTransport, CONFIG_OFFSET};
use capsule_devices::virtio::rng::{Rng, MAX_REQUEST_BYTES};
use capsule_devices::virtio::{HostEvent, VirtioDevice, INT_CONFIG, INT_USED_RING};
use capsule_devices::BusDevice;
use common::{Driver, Prng, QueueLayout};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;
const MEM_SIZE: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const I: u16 = VRING_DESC_F_INDIRECT as u16;

/// Queue `q` of size 16: descriptors at `q * 0x1_0000`, avail ring 4 KiB above, used 8 KiB.
fn layout(q: u64) -> QueueLayout {
    QueueLayout {
        size: 16,
        desc: q * 0x1_0000,
        avail: q * 0x1_0000 + 0x1000,
        used: q * 0x1_0000 + 0x2000,
    }
}

/// Writes `descs` at table index 0.. and publishes `heads` in the available ring.
fn publish(mem: &Mem, l: &QueueLayout, descs: &[(u64, u32, u16, u16)], heads: &[u16]) {
    for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
        let at = l.desc + 16 * i as u64;
        mem.write_obj(*addr, GuestAddress(at)).unwrap();
        mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
    }
    let idx: u16 = mem.read_obj(GuestAddress(l.avail + 2)).unwrap();
    for (j, head) in heads.iter().enumerate() {
        let slot = (idx as usize + j) % l.size as usize;
        mem.write_obj(*head, GuestAddress(l.avail + 4 + 2 * slot as u64))
            .unwrap();
    }
    mem.write_obj(
        idx.wrapping_add(heads.len() as u16),
        GuestAddress(l.avail + 2),
    )
    .unwrap();
}

enum Expect {
    /// Every published chain is returned with these used lengths; the device stays live.
    Used(&'static [u32]),
    /// The device enters DEVICE_NEEDS_RESET and raises a config interrupt.
    NeedsReset,
}

#[test]
fn rng_malformed_chains_table() {
    let big = MAX_REQUEST_BYTES + 1;
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<(u64, u32, u16, u16)>, Vec<u16>, Expect)> = vec![
        (
            "valid",
            vec![(0x8_0000, 32, W, 0)],
            vec![0],
            Expect::Used(&[32]),
        ),
        (
            "address past memory",
            vec![(MEM_SIZE, 8, W, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "straddles the end",
            vec![(MEM_SIZE - 4, 8, W, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "address wraps",
            vec![(u64::MAX - 2, 8, W, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "self loop",
            vec![(0x8_0000, 8, W | N, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "longer loop",
            vec![
                (0x8_0000, 8, W | N, 1),
                (0x8_1000, 8, W | N, 2),
                (0x8_2000, 8, W | N, 0),
            ],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "next past the table",
            vec![(0x8_0000, 8, W | N, 16)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "oversized",
            vec![(0x8_0000, big, W, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "read-only buffer",
            vec![(0x8_0000, 8, 0, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "readable then writable",
            vec![(0x8_0000, 8, N, 1), (0x8_1000, 8, W, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "indirect",
            vec![(0x8_0000, 32, I, 0)],
            vec![0],
            Expect::Used(&[0]),
        ),
        (
            "bad chain does not block the next",
            vec![(MEM_SIZE, 8, W, 0), (0x8_0000, 16, W, 0)],
            vec![0, 1],
            Expect::Used(&[0, 16]),
        ),
        (
            "head past the table",
            vec![(0x8_0000, 8, W, 0)],
            vec![16],
            Expect::NeedsReset,
        ),
    ];
    for (name, descs, heads, expect) in cases {
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let t = Arc::new(Mutex::new(
            MmioTransport::new(Rng::new(), mem.clone()).unwrap(),
        ));
        let driver = Driver::new(t.clone());
        let l = layout(0);
        driver.init(&[l]);
        publish(&mem, &l, &descs, &heads);
        t.lock().unwrap().process_queue(0);
        let t = t.lock().unwrap();
        match expect {
            Expect::Used(lens) => {
                assert!(!t.needs_reset(), "{name}: still live");
                assert_eq!(
                    l.used_idx(&mem) as usize,
                    lens.len(),
                    "{name}: all returned"
                );
                for (i, len) in lens.iter().enumerate() {
                    assert_eq!(l.used_elem(&mem, i as u16).1, *len, "{name}: used len {i}");
                }
                assert_eq!(t.interrupt_status(), INT_USED_RING, "{name}");
            }
            Expect::NeedsReset => {
                assert!(t.needs_reset(), "{name}: needs reset");
                assert_ne!(t.interrupt_status() & INT_CONFIG, 0, "{name}");
                assert_eq!(l.used_idx(&mem), 0, "{name}: nothing returned");
            }
        }
    }
}

#[test]
fn ring_level_corruption_needs_reset_and_notify_rules() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let t = Arc::new(Mutex::new(
        MmioTransport::new(Rng::new(), mem.clone()).unwrap(),
    ));
    let driver = Driver::new(t.clone());
    let l = layout(0);

    // Notify before the queue is ready, and before DRIVER_OK: ignored.
    driver.notify(0);
    assert!(t.lock().unwrap().queue_evts()[0].read().is_err());
    driver.init(&[l]);

    // The available index jumps by more than the queue size.
    mem.write_obj(100u16, GuestAddress(l.avail + 2)).unwrap();
    t.lock().unwrap().process_queue(0);
    assert!(t.lock().unwrap().needs_reset());
    // Processing stops while the device needs a reset.
    driver.notify(0);
    assert!(t.lock().unwrap().queue_evts()[0].read().is_err());

    // The driver resets and sets the device up again: it works.
    mem.write_obj(0u16, GuestAddress(l.avail + 2)).unwrap();
    driver.init(&[l]);
    assert!(!t.lock().unwrap().needs_reset());
    publish(&mem, &l, &[(0x8_0000, 8, W, 0)], &[0]);
    t.lock().unwrap().process_queue(0);
    assert_eq!(l.used_idx(&mem), 1);
}

#[test]
fn console_transmit_with_a_writable_buffer_is_returned_and_not_forwarded() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let (console, mut host) = Console::new().unwrap();
    let t = Arc::new(Mutex::new(
        MmioTransport::new(console, mem.clone()).unwrap(),
    ));
    let driver = Driver::new(t.clone());
    let (rx, tx) = (layout(0), layout(1));
    driver.init(&[rx, tx]);
    mem.write_slice(b"secret", GuestAddress(0x8_0000)).unwrap();
    mem.write_slice(b"ok", GuestAddress(0x9_0000)).unwrap();
    publish(
        &mem,
        &tx,
        &[
            (0x8_0000, 6, N, 1),
            (0x8_1000, 8, W, 0),
            (0x9_0000, 2, 0, 0),
        ],
        &[0, 2],
    );
    t.lock().unwrap().process_queue(TX_QUEUE);
    assert_eq!(tx.used_idx(&mem), 2);
    assert_eq!(t.lock().unwrap().rejected_chains(), 1);
    host.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let n = host.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ok");
}

/// Throws random register accesses, random queue layouts, random descriptor tables and
/// random host traffic at the transport and both devices. Nothing may panic.
#[test]
fn random_barrage_never_panics() {
    let (mut live, mut rejected) = (0u64, 0u64);
    for seed in 0..24u64 {
        let mut rng = Prng::new(seed);
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        if seed % 2 == 0 {
            let t = MmioTransport::new(Rng::new(), mem.clone()).unwrap();
            let (l, r) = barrage(&mut rng, &mem, t, None);
            live += l;
            rejected += r;
        } else {
            let (console, host) = Console::with_buffer(1 + rng.below(8192) as usize).unwrap();
            host.set_nonblocking(true).unwrap();
            let t = MmioTransport::new(console, mem.clone()).unwrap();
            let (l, r) = barrage(&mut rng, &mem, t, Some(host));
            live += l;
            rejected += r;
        }
    }
    // The barrage must reach the interesting states, not just bounce off the registers.
    assert!(live > 1000, "queues processed while live: {live}");
    assert!(rejected > 100, "chains rejected: {rejected}");
}

fn barrage<D: VirtioDevice>(
    rng: &mut Prng,
    mem: &Mem,
    mut t: MmioTransport<D, Mem>,
    mut host: Option<std::os::unix::net::UnixStream>,
) -> (u64, u64) {
    let mut live = 0;
    let regs = [
        0x00u64, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60,
        0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc,
    ];
    let statuses = [0u32, 1, 3, 11, 15, 0x8f, 7, 0xff];
    let nq = t.save().queues.len() as u64;
    // Where the last proper setup put each queue: (base, size).
    let mut placed: Vec<(u64, u64)> = vec![(0, 1); nq as usize];
    for _ in 0..4000 {
        match rng.below(14) {
            0 | 1 => {
                let off = regs[rng.below(regs.len() as u64) as usize];
                let val = match off {
                    0x70 => statuses[rng.below(statuses.len() as u64) as usize],
                    0x30 | 0x50 => rng.below(nq + 1) as u32,
                    0x38 => 1 << rng.below(10),
                    0x80 | 0x90 | 0xa0 => (rng.below(0x4_0000) & !0xf) as u32,
                    0x84 | 0x94 | 0xa4 => (rng.below(4) == 0) as u32,
                    _ => rng.next() as u32,
                };
                t.write(off, &val.to_le_bytes());
            }
            2 => {
                // Any offset, any width.
                let off = rng.below(0x200);
                let len = 1 + rng.below(8) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                t.write(off, &data);
            }
            3 => {
                let off = rng.below(0x200) + if rng.below(8) == 0 { CONFIG_OFFSET } else { 0 };
                let mut data = vec![0u8; 1 + rng.below(8) as usize];
                t.read(off, &mut data);
            }
            4 => {
                // A proper setup of every queue at random places.
                for (off, val) in [
                    (0x70u64, 0u32),
                    (0x70, 1),
                    (0x70, 3),
                    (0x24, 1),
                    (0x20, 1),
                    (0x70, 11),
                ] {
                    t.write(off, &val.to_le_bytes());
                }
                for q in 0..nq {
                    let base = rng.below(0x3_c000) & !0xfff;
                    let size = 1u32 << rng.below(9);
                    placed[q as usize] = (base, u64::from(size));
                    let _ = mem.write_obj(0u32, GuestAddress(base + 0x1000));
                    for (off, val) in [
                        (0x30, q as u32),
                        (0x38, size),
                        (0x80, base as u32),
                        (0x90, base as u32 + 0x1000),
                        (0xa0, base as u32 + 0x2000),
                        (0x44, 1),
                    ] {
                        t.write(off, &val.to_le_bytes());
                    }
                }
                t.write(0x70, &15u32.to_le_bytes());
            }
            5 | 6 | 12 => {
                // Scribble descriptors (plausible ones, mostly) into a queue's table, or
                // anywhere.
                let (base, size) = placed[rng.below(nq) as usize];
                let at = if rng.below(4) == 0 {
                    rng.below(0x4_0000 - 16) & !0xf
                } else {
                    base + 16 * rng.below(size)
                };
                let addr = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    rng.below(0x4_0000)
                };
                let len = if rng.below(4) == 0 {
                    rng.next() as u32
                } else {
                    rng.below(0x2000) as u32
                };
                let flags = rng.below(8) as u16;
                let next = rng.below(size + 2) as u16;
                let _ = mem.write_obj(addr, GuestAddress(at));
                let _ = mem.write_obj(len, GuestAddress(at + 8));
                let _ = mem.write_obj(flags, GuestAddress(at + 12));
                let _ = mem.write_obj(next, GuestAddress(at + 14));
            }
            7 => {
                // Random bytes anywhere, avail indices included.
                let at = rng.below(0x4_0000 - 2);
                let _ = mem.write_obj(rng.next() as u16, GuestAddress(at));
            }
            13 => {
                // Publish a few heads (now and then one past the table).
                let (base, size) = placed[rng.below(nq) as usize];
                let avail = base + 0x1000;
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
                let n = 1 + rng.below(size.min(4));
                for j in 0..n {
                    let slot = (u64::from(idx) + j) % size;
                    let past = u64::from(rng.below(30) == 0);
                    let head = rng.below(size + past) as u16;
                    let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
                }
                let _ = mem.write_obj(idx.wrapping_add(n as u16), GuestAddress(avail + 2));
            }
            8 | 9 => {
                live += u64::from(t.is_activated() && !t.needs_reset());
                t.process_queue(rng.below(nq + 1) as usize)
            }
            10 => {
                if let Some(h) = host.as_mut() {
                    let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
                    let _ = h.write(&data);
                }
                t.process_host(HostEvent {
                    readable: rng.below(2) == 0,
                    writable: rng.below(2) == 0,
                    hangup: rng.below(50) == 0,
                });
            }
            _ => {
                if let Some(h) = host.as_mut() {
                    let mut buf = [0u8; 4096];
                    let _ = h.read(&mut buf);
                    if rng.below(400) == 0 {
                        host = None;
                    }
                }
                let _ = t.irq_evt().read();
                let status = t.interrupt_status();
                t.write(0x64, &status.to_le_bytes());
            }
        }
    }
    let rejected = t.rejected_chains();
    // Whatever happened, a reset brings the transport back to its initial registers.
    t.write(0x70, &0u32.to_le_bytes());
    assert!(!t.is_activated() && !t.needs_reset());
    assert_eq!(t.status(), 0);
    (live, rejected)
}

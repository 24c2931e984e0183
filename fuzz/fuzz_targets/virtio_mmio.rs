//! Fuzzes the virtio-mmio transport with virtio-rng and virtio-console behind it: every
//! register access, every byte of guest memory and every byte the host sends is input.
//!
//! The input is a program: the first byte picks the device, then 8-byte operations (register
//! write/read at any offset and width, a guest memory write, a queue notification, host
//! traffic, an interrupt acknowledgement). Property: nothing panics, and a reset (status 0)
//! always returns the transport to its initial state.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use capsule_devices::virtio::console::Console;
use capsule_devices::virtio::mmio::MmioTransport;
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::{HostEvent, VirtioDevice};
use capsule_devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x1_0000;

fn run<D: VirtioDevice>(
    t: &mut MmioTransport<D, GuestMemoryMmap<()>>,
    mem: &GuestMemoryMmap<()>,
    mut host: Option<UnixStream>,
    ops: &[u8],
) {
    for op in ops.chunks_exact(8) {
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1ff;
        match op[0] % 8 {
            0 | 1 => {
                // Aligned 32-bit register write (the common case).
                t.write(offset & !3, &value.to_le_bytes());
            }
            2 => {
                let len = 1 + usize::from(op[3] % 8);
                let bytes = u64::from(value).to_le_bytes();
                t.write(offset, &bytes[..len]);
            }
            3 => {
                let mut data = vec![0u8; 1 + usize::from(op[3] % 8)];
                t.read(offset, &mut data);
            }
            4 => {
                // Guest memory: 4 bytes at a 4-byte aligned address.
                let addr = (u64::from(u16::from_le_bytes([op[1], op[2]])) << 2) % MEM_SIZE as u64;
                let _ = mem.write_obj(value, GuestAddress(addr & !3));
            }
            5 => t.process_queue(usize::from(op[1] % 3)),
            6 => {
                if let Some(h) = host.as_mut() {
                    let _ = h.write(&op[1..]);
                    let mut buf = [0u8; 256];
                    let _ = h.read(&mut buf);
                    if op[3] == 0xff {
                        host = None;
                    }
                }
                t.process_host(HostEvent {
                    readable: op[2] & 1 != 0,
                    writable: op[2] & 2 != 0,
                    hangup: op[2] & 4 != 0,
                });
            }
            _ => {
                let _ = t.irq_evt().read();
                let status = t.interrupt_status();
                t.write(0x64, &status.to_le_bytes());
            }
        }
    }
    t.write(0x70, &0u32.to_le_bytes());
    assert_eq!(t.status(), 0);
    assert!(!t.is_activated() && !t.needs_reset());
    assert_eq!(t.interrupt_status(), 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, ops)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    if pick % 2 == 0 {
        if let Ok(mut t) = MmioTransport::new(Rng::new(), mem.clone()) {
            run(&mut t, &mem, None, ops);
        }
    } else if let Ok((console, host)) = Console::with_buffer(1 + usize::from(pick) * 64) {
        if host.set_nonblocking(true).is_ok() {
            if let Ok(mut t) = MmioTransport::new(console, mem.clone()) {
                run(&mut t, &mem, Some(host), ops);
            }
        }
    }
});

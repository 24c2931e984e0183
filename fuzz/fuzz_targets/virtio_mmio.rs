//! Fuzzes the virtio-mmio transport with virtio-rng and virtio-console behind it: every
//! register access, every byte of guest memory and every byte the host sends is input.
//!
//! The input is a program (`capsule_fuzz::mmio_program`): the first byte picks the device,
//! then 8-byte operations (register write/read at any offset and width, a guest memory
//! write, a queue notification, host traffic, an interrupt acknowledgement). Property: nothing panics, and a reset (status 0)
//! always returns the transport to its initial state.
#![no_main]

use capsule_devices::virtio::console::Console;
use capsule_devices::virtio::mmio::MmioTransport;
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::VirtioDevice;
use capsule_devices::BusDevice;
use capsule_fuzz::mmio_program::{self, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use std::os::unix::net::UnixStream;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn run<D: VirtioDevice>(
    t: &mut MmioTransport<D, GuestMemoryMmap<()>>,
    mem: &GuestMemoryMmap<()>,
    host: Option<UnixStream>,
    ops: &[u8],
) {
    mmio_program::run(t, mem, host, ops);
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

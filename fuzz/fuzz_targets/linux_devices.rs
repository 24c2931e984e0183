//! Fuzzes the restore of a Linux machine's devices from a snapshot: a `LinuxDeviceState`
//! (the UART, and virtio-console and virtio-rng with their virtio-mmio transports) decoded
//! from a state-file image, the devices rebuilt from it, then driven by a `virtio_mmio`
//! program. Property: decoding and restoring accept or refuse with a typed error, never
//! panic or allocate without bound; a restored device never panics whatever the guest and
//! host do next; a reset returns each transport to its initial state.
//!
//! Input: a little-endian `u16` length L, then L bytes of state-file image (decoded as it is
//! and with its header repaired), then the program's operations.
#![no_main]

use std::os::unix::net::UnixStream;

use capsule_devices::serial::SerialDevice;
use capsule_devices::virtio::console::Console;
use capsule_devices::virtio::mmio::MmioTransport;
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::VirtioDevice;
use capsule_devices::BusDevice;
use capsule_fuzz::mmio_program::{self, MEM_SIZE};
use capsule_fuzz::state_image::with_valid_header;
use capsule_snapshot::state_file::decode_state_bytes;
use capsule_vmm::machine::linux::LinuxDeviceState;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

type Mem = GuestMemoryMmap<()>;

fn drive<D: VirtioDevice>(
    mut t: MmioTransport<D, Mem>,
    mem: &Mem,
    host: Option<UnixStream>,
    ops: &[u8],
) {
    for queue in 0..3 {
        t.process_queue(queue);
    }
    mmio_program::run(&mut t, mem, host, ops);
    t.write(0x70, &0u32.to_le_bytes());
    assert_eq!(t.status(), 0);
    assert!(!t.is_activated() && !t.needs_reset());
    assert_eq!(t.interrupt_status(), 0);
}

fn restore(state: &LinuxDeviceState, ops: &[u8]) {
    if let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) {
        if let Ok(mut serial) = SerialDevice::restore(irq, &state.serial) {
            let mut byte = [0u8; 1];
            for port in 0..8 {
                serial.read(port, &mut byte);
            }
            serial.write(0, b"x");
        }
    }
    let Ok(mem) = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    if let Ok((console, host)) = Console::restore(&state.console) {
        if host.set_nonblocking(true).is_ok() {
            if let Ok(t) = MmioTransport::restore(console, mem.clone(), &state.console_transport) {
                drive(t, &mem, Some(host), ops);
            }
        }
    }
    if let Ok(t) = MmioTransport::restore(Rng::restore(&state.rng), mem.clone(), &state.rng_transport)
    {
        drive(t, &mem, None, ops);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (image, ops) = rest.split_at(len);
    if let Ok(state) = decode_state_bytes::<LinuxDeviceState>(image) {
        restore(&state, ops);
    }
    if let Some(repaired) = with_valid_header(image) {
        if let Ok(state) = decode_state_bytes::<LinuxDeviceState>(&repaired) {
            restore(&state, ops);
        }
    }
});

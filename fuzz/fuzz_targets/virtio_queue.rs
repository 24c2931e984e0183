//! Fuzzes descriptor-chain validation and the devices' queue processing: the input is the
//! guest memory holding a queue's descriptor table and available ring.
//!
//! Layout of the 64 KiB guest memory (`capsule_fuzz::queue_layout`): the input is copied to
//! address 0; the queue's descriptor table is at 0, its available ring at 0x1000, its used
//! ring at 0x2000 (its size, a chain byte limit and the starting ring position come from the
//! first bytes). Properties: nothing panics; every chain `walk_chain` accepts lies inside
//! guest memory and within the limit; the devices never return more used entries than the
//! driver made available.
#![no_main]

use std::io::Write;

use capsule_devices::virtio::console::Console;
use capsule_devices::virtio::queue_check::{walk_chain, ChainRules, Direction};
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::{HostEvent, QueueContext, VirtioDevice};
use capsule_fuzz::queue_layout::{Header, AVAIL_RING, DESC_TABLE, INPUT_MAX, MEM_SIZE, USED_RING};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Some(Header {
        size,
        max_bytes,
        next_avail,
    }) = Header::decode(data)
    else {
        return;
    };
    let max_bytes = u32::from(max_bytes);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(INPUT_MAX);
    let _ = mem.write_slice(&data[..n], GuestAddress(0));

    // The chain walker on every head.
    for head in 0..size.saturating_add(2) {
        for direction in [
            Direction::DeviceReads,
            Direction::DeviceWrites,
            Direction::Both,
        ] {
            let rules = ChainRules {
                direction,
                max_bytes,
            };
            if let Ok(chain) = walk_chain(&mem, GuestAddress(DESC_TABLE), size, head, rules) {
                let total: u64 = chain
                    .readable
                    .iter()
                    .chain(&chain.writable)
                    .map(|b| u64::from(b.len))
                    .sum();
                assert!(total <= u64::from(max_bytes));
                for b in chain.readable.iter().chain(&chain.writable) {
                    assert!(mem.check_range(b.addr, b.len as usize));
                }
            }
        }
    }

    // The devices on a queue over the same memory.
    let mut queue = match Queue::new(256) {
        Ok(q) => q,
        Err(_) => return,
    };
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_next_avail(u16::from(next_avail));
    queue.set_ready(true);
    let before = queue.next_used();

    let state = queue.state();
    let mut queues = vec![queue];
    let mut rng = Rng::new();
    let _ = rng.process_queue(0, &mut QueueContext::new(&mem, &mut queues));
    // One pass returns at most what the driver made available, which the transport caps
    // at the queue size.
    let used = queues[0].next_used().wrapping_sub(before);
    assert!(used <= size);

    // The console, with host bytes waiting, on the same ring as its receive queue and as
    // its transmit queue.
    let (Ok(rx), Ok(tx)) = (Queue::try_from(state), Queue::try_from(state)) else {
        return;
    };
    if let Ok((mut console, mut host)) = Console::with_buffer(4096) {
        let _ = host.set_nonblocking(true);
        let _ = host.write(&data[..n.min(512)]);
        let mut qs = vec![rx, tx];
        let mut ctx = QueueContext::new(&mem, &mut qs);
        let event = HostEvent {
            readable: true,
            writable: true,
            hangup: false,
        };
        let _ = console.process_host(event, Some(&mut ctx));
        let _ = console.process_queue(1, &mut ctx);
        let _ = console.process_queue(0, &mut ctx);
    }
});

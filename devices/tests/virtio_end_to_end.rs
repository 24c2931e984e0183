//! virtio devices driven through the MMIO bus and the device thread, as the VMM wires them.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule_devices::event_loop::DeviceThread;
use capsule_devices::virtio::console::{Console, RX_QUEUE, TX_QUEUE};
use capsule_devices::virtio::mmio::MmioTransport;
use capsule_devices::virtio::rng::Rng;
use capsule_devices::virtio::{VirtioDevice, INT_USED_RING};
use common::{queue_base, Driver, QueueLayout};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const W: u16 = VRING_DESC_F_WRITE as u16;

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn console_both_ways_through_the_device_thread() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, queue_base(RX_QUEUE), 16);
    let tx = MockSplitQueue::create(&mem, queue_base(TX_QUEUE), 16);
    let (console, mut host) = Console::new().unwrap();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(console, mem.clone()).unwrap(),
    ));
    let driver = Driver::new(transport.clone());
    let thread = DeviceThread::spawn("devices-test").unwrap();
    thread.register_transport(transport.clone()).unwrap();
    let (rxl, txl) = (QueueLayout::of(&rx, 16), QueueLayout::of(&tx, 16));
    driver.init(&[rxl, txl]);

    // Host speaks first; the guest has no receive buffer yet.
    host.write_all(b"ping from host").unwrap();
    wait_for("the console to buffer host bytes", || {
        transport.lock().unwrap().device().pending_to_guest() == 14
    });
    rx.add_desc_chains(&[common::desc(0x20_0000, 4096, W, 0)], 0)
        .unwrap();
    driver.notify(RX_QUEUE as u32);
    wait_for("the receive buffer to be used", || rxl.used_idx(&mem) == 1);
    assert_eq!(rxl.used_elem(&mem, 0), (0, 14));
    let mut got = [0u8; 14];
    mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&got, b"ping from host");
    assert_ne!(driver.read(0x60) & INT_USED_RING, 0);
    assert!(transport.lock().unwrap().irq_evt().read().unwrap() >= 1);
    driver.write(0x64, INT_USED_RING);
    assert_eq!(driver.read(0x60), 0);

    // The guest answers.
    mem.write_slice(b"pong from guest", GuestAddress(0x30_0000))
        .unwrap();
    tx.add_desc_chains(&[common::desc(0x30_0000, 15, 0, 0)], 0)
        .unwrap();
    driver.notify(TX_QUEUE as u32);
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = [0u8; 15];
    host.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong from guest");
    wait_for("the transmit buffer to be used", || txl.used_idx(&mem) == 1);

    // Host closes: the loop stops watching the socket instead of spinning.
    drop(host);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(transport.lock().unwrap().device().host_interest(), None);
    thread.stop().unwrap();
}

#[test]
fn rng_on_the_vmm_memory_type_marks_pages_dirty() {
    // capsule_vmm::GuestMemory is GuestMemoryMmap<AtomicBitmap>.
    let mem =
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let q = MockSplitQueue::create(&mem, queue_base(0), 16);
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(Rng::new(), mem.clone()).unwrap(),
    ));
    let driver = Driver::new(transport.clone());
    let thread = DeviceThread::spawn("rng-test").unwrap();
    thread.register_transport(transport.clone()).unwrap();
    let ql = QueueLayout::of(&q, 16);
    driver.init(&[ql]);
    q.add_desc_chains(&[common::desc(0x20_0000, 64, W, 0)], 0)
        .unwrap();
    // Simulate KVM's ioeventfd instead of an MMIO exit.
    transport.lock().unwrap().queue_evts()[0].write(1).unwrap();
    wait_for("entropy", || ql.used_idx(&mem) == 1);
    assert_eq!(ql.used_elem(&mem, 0), (0, 64));
    use vm_memory::bitmap::Bitmap;
    let region = vm_memory::GuestMemoryBackend::find_region(&mem, GuestAddress(0x20_0000)).unwrap();
    assert!(vm_memory::GuestMemoryRegion::bitmap(region).dirty_at(0x20_0000));
    assert_eq!(transport.lock().unwrap().device().bytes_served(), 64);
    drop(thread);
}

#[test]
fn device_state_survives_save_and_restore_mid_stream() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, queue_base(RX_QUEUE), 16);
    let (console, mut host) = Console::new().unwrap();
    let mut t = MmioTransport::new(console, mem.clone()).unwrap();
    let transport = Arc::new(Mutex::new(t));
    let driver = Driver::new(transport.clone());
    let rxl = QueueLayout::of(&rx, 16);
    let tx = MockSplitQueue::create(&mem, queue_base(TX_QUEUE), 16);
    driver.init(&[rxl, QueueLayout::of(&tx, 16)]);
    host.write_all(b"in flight").unwrap();
    transport
        .lock()
        .unwrap()
        .process_host(capsule_devices::virtio::HostEvent {
            readable: true,
            writable: false,
            hangup: false,
        });
    let (tstate, cstate) = {
        let t = transport.lock().unwrap();
        (t.save(), t.device().save())
    };
    drop(driver);
    drop(transport);
    let (console, _host2) = Console::restore(&cstate).unwrap();
    t = MmioTransport::restore(console, mem.clone(), &tstate).unwrap();
    assert_eq!(t.save(), tstate);
    rx.add_desc_chains(&[common::desc(0x20_0000, 64, W, 0)], 0)
        .unwrap();
    t.process_queue(RX_QUEUE);
    assert_eq!(rxl.used_idx(&mem), 1);
    let mut got = [0u8; 9];
    mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&got, b"in flight");
}

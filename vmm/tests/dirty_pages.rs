//! Dirty-page tracking of a VM whose memory has two regions, on the host's real /dev/kvm:
//! [`Vm::take_dirty_pages`] answers one bitmap per region (KVM's log of the guest's writes OR
//! the VMM's own writes), and [`memory::flatten_dirty`] joins them in flat order.

mod common;

use capsule_devices::Bus;
use capsule_vmm::arch::x86_64::user_mode;
use capsule_vmm::machine::probe as probe_machine;
use capsule_vmm::vm::VmOptions;
use capsule_vmm::{memory, VcpuEvent, Vm};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = memory::PAGE_SIZE as u64;
/// The high region: 1 MiB at 4 GiB (256 pages: four bitmap words).
const HIGH: u64 = 1 << 32;
const HIGH_LEN: usize = 1 << 20;

fn is_set(words: &[u64], page: u64) -> bool {
    words
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn set_pages(words: &[u64]) -> Vec<u64> {
    (0..words.len() as u64 * 64)
        .filter(|&p| is_set(words, p))
        .collect()
}

#[test]
fn dirty_pages_come_per_region_from_kvm_and_the_vmm() {
    let Some(hv) = common::hypervisor() else {
        return;
    };
    let mem_size = common::MEM as u64;
    let memory = memory::create_anonymous_regions(&[
        (GuestAddress(0), common::MEM),
        (GuestAddress(HIGH), HIGH_LEN),
    ])
    .unwrap();
    // The probe lives in the low region; it never touches the high one.
    user_mode::write_tables(&memory, &probe_machine::LAYOUT, mem_size).unwrap();
    memory
        .write_slice(probe_guest::IMAGE, GuestAddress(probe_abi::IMAGE_ADDR))
        .unwrap();
    let options = VmOptions {
        dirty_log: true,
        ..Default::default()
    };
    let vm = Vm::new(&hv, memory, options).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_sregs(&user_mode::sregs(
        vcpu.sregs().unwrap(),
        &probe_machine::LAYOUT,
    ))
    .unwrap();
    vcpu.set_regs(&user_mode::regs(
        probe_guest::ENTRY,
        probe_abi::stack_top(0),
        [0, mem_size],
    ))
    .unwrap();
    let (pio, mmio) = (common::pio_bus(), Bus::new());
    assert_eq!(
        vcpu.run(&pio, &mmio).unwrap(),
        VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_READY))
    );
    // Start from a clean slate: what loading and booting wrote.
    let first = vm.take_dirty_pages().unwrap();
    assert_eq!(first.len(), 2, "one bitmap per region");
    assert!(
        is_set(&first[0], probe_abi::IMAGE_ADDR / PAGE),
        "VMM-loaded image"
    );

    // The guest writes 3 pages of the low region; the VMM one page of each region.
    common::request(&vm, 1, "touch 3");
    vm.memory()
        .write_obj(0xabu8, GuestAddress(HIGH + 5 * PAGE))
        .unwrap();
    assert_eq!(
        vcpu.run(&pio, &mmio).unwrap(),
        VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_REPLY))
    );
    let dirty = vm.take_dirty_pages().unwrap();
    assert_eq!(dirty.len(), 2);
    assert_eq!(dirty[0].len(), common::MEM / memory::PAGE_SIZE / 64);
    assert_eq!(dirty[1].len(), HIGH_LEN / memory::PAGE_SIZE / 64);
    let touch = probe_abi::TOUCH_ADDR / PAGE;
    for page in touch..touch + 3 {
        assert!(is_set(&dirty[0], page), "guest write to page {page}");
    }
    assert!(
        is_set(&dirty[0], probe_abi::mailbox_addr(0) / PAGE),
        "mailbox"
    );
    assert_eq!(
        set_pages(&dirty[1]),
        [5],
        "the VMM's write, in region 1's own pages"
    );

    let flat = memory::flatten_dirty(vm.memory(), &dirty).unwrap();
    let low_pages = (common::MEM / memory::PAGE_SIZE) as u64;
    assert!(is_set(&flat, touch));
    assert!(is_set(&flat, low_pages + 5), "region 1 follows region 0");

    // Taking clears both sources.
    let again = vm.take_dirty_pages().unwrap();
    assert!(again.iter().flatten().all(|w| *w == 0), "{again:?}");
}

#[test]
fn dirty_pages_need_the_dirty_log() {
    let Some(hv) = common::hypervisor() else {
        return;
    };
    let memory = memory::create_anonymous(common::MEM).unwrap();
    let vm = Vm::new(&hv, memory, VmOptions::default()).unwrap();
    assert!(vm.take_dirty_pages().is_err());
}

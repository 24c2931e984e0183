//! Runs the probe guest on the host's real /dev/kvm at the VMM level: user-mode entry,
//! the doorbell exit, the mailbox, and a triple fault reported as shutdown.

use std::sync::{Arc, Mutex};

use capsule_devices::{Bus, Doorbell};
use capsule_vmm::arch::x86_64::user_mode::{self, UserModeLayout};
use capsule_vmm::vm::VmOptions;
use capsule_vmm::vm_memory::{Bytes, GuestAddress};
use capsule_vmm::{memory, Hypervisor, Vcpu, VcpuEvent, Vm};

const MEM: usize = 16 << 20;

fn layout() -> UserModeLayout {
    UserModeLayout {
        gdt: probe_abi::GDT_ADDR,
        tss: probe_abi::TSS_ADDR,
        pml4: probe_abi::PML4_ADDR,
        pdpt: probe_abi::PDPT_ADDR,
        pd: probe_abi::PD_ADDR,
        max_pd_pages: probe_abi::MAX_PD_PAGES,
    }
}

fn boot() -> Option<(Vm, Vcpu, Bus)> {
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => {
            eprintln!("skipping: {e}");
            return None;
        }
    };
    let mem = memory::create_anonymous(MEM).unwrap();
    user_mode::write_tables(&mem, &layout(), MEM as u64).unwrap();
    mem.write_slice(probe_guest::IMAGE, GuestAddress(probe_abi::IMAGE_ADDR))
        .unwrap();
    let vm = Vm::new(&hv, mem, VmOptions::default()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_sregs(&user_mode::sregs(vcpu.sregs().unwrap(), &layout()))
        .unwrap();
    vcpu.set_regs(&user_mode::regs(
        probe_guest::ENTRY,
        probe_abi::stack_top(0),
        [0, MEM as u64],
    ))
    .unwrap();
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(Mutex::new(Doorbell)),
        u64::from(probe_abi::DOORBELL_PORT),
        4,
    )
    .unwrap();
    Some((vm, vcpu, pio))
}

fn request(vm: &Vm, seq: u32, text: &str) {
    let mb = probe_abi::mailbox_addr(0);
    let header = probe_abi::encode_request_header(seq, text.len()).unwrap();
    vm.memory().write_slice(&header, GuestAddress(mb)).unwrap();
    vm.memory()
        .write_slice(
            text.as_bytes(),
            GuestAddress(mb + probe_abi::REQUEST_OFFSET as u64),
        )
        .unwrap();
}

fn reply(vm: &Vm) -> (i32, Vec<u8>) {
    let mut mailbox = vec![0u8; probe_abi::MAILBOX_SIZE as usize];
    vm.memory()
        .read_slice(&mut mailbox, GuestAddress(probe_abi::mailbox_addr(0)))
        .unwrap();
    let r = probe_abi::decode_reply(&mailbox).unwrap();
    (r.header.exit_code, r.stdout.to_vec())
}

#[test]
fn probe_boots_answers_and_crashes_cleanly() {
    let Some((vm, mut vcpu, pio)) = boot() else {
        return;
    };
    let mmio = Bus::new();
    assert_eq!(
        vcpu.run(&pio, &mmio).unwrap(),
        VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_READY))
    );
    request(&vm, 1, "echo hello");
    assert_eq!(
        vcpu.run(&pio, &mmio).unwrap(),
        VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_REPLY))
    );
    assert_eq!(reply(&vm), (0, b"hello\n".to_vec()));
    request(&vm, 2, "count");
    vcpu.run(&pio, &mmio).unwrap();
    assert_eq!(reply(&vm), (0, b"1\n".to_vec()));

    request(&vm, 3, "crash");
    assert_eq!(vcpu.run(&pio, &mmio).unwrap(), VcpuEvent::Shutdown);
}

#[test]
fn a_kick_interrupts_a_spinning_guest() {
    capsule_vmm::vcpu::install_kick_handler().unwrap();
    let Some((vm, mut vcpu, pio)) = boot() else {
        return;
    };
    let mmio = Bus::new();
    vcpu.run(&pio, &mmio).unwrap();
    request(&vm, 1, "spin 100000000000");
    let kicker = vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(vcpu.run(&pio, &mmio).unwrap(), VcpuEvent::Kicked);
    t.join().unwrap();
}

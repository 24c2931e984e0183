//! Runs the probe guest on the host's real /dev/kvm at the VMM level: user-mode entry,
//! the doorbell exit, the mailbox, and a triple fault reported as shutdown.

mod common;

use capsule_devices::Bus;
use capsule_vmm::VcpuEvent;
use common::{boot, reply, request};
use vm_memory::Bytes;

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

#[test]
fn probe_runs_with_the_in_kernel_irqchip_and_pit() {
    let Some(mut p) = common::boot_with(capsule_vmm::VmOptions {
        irqchip: true,
        ..Default::default()
    }) else {
        return;
    };
    p.start();
    assert_eq!(p.command(1, "echo with irqchip"), "with irqchip");
    assert_eq!(p.command(2, "count"), "1");
    // The in-kernel chips exist: KVM answers for the PICs, the IOAPIC and the PIT, and
    // takes an irqfd.
    let state = p.vm.save_state().unwrap();
    assert!(state.irqchip.is_some() && state.pit.is_some());
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    p.vm.register_irqfd(&evt, 4).unwrap();
}

#[test]
fn without_the_option_there_is_no_in_kernel_irqchip() {
    let Some((vm, _vcpu, _pio)) = boot() else {
        return;
    };
    assert!(!vm.options().irqchip);
    // KVM refuses an irqfd without an in-kernel irqchip.
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(vm.register_irqfd(&evt, 4).is_err());
}

#[test]
fn a_vcpus_context_shows_the_code_and_stack_it_stopped_at() {
    let Some((vm, mut vcpu, pio)) = boot() else {
        return;
    };
    let mmio = Bus::new();
    vcpu.run(&pio, &mmio).unwrap();
    let context = vcpu.context(vm.memory()).unwrap();
    let regs = vcpu.regs().unwrap();
    assert_eq!((context.rip, context.rsp), (regs.rip, regs.rsp));
    // The probe's page tables map its image and stacks one to one.
    let (code_gpa, code) = context.code.clone().expect("the code is mapped");
    assert_eq!(code_gpa, regs.rip);
    assert!(
        (probe_abi::IMAGE_ADDR..probe_abi::IMAGE_ADDR + probe_abi::IMAGE_MAX).contains(&code_gpa)
    );
    let mut expected = vec![0u8; code.len()];
    vm.memory()
        .read_slice(&mut expected, vm_memory::GuestAddress(code_gpa))
        .unwrap();
    assert_eq!(code, expected);
    assert!(!code.is_empty() && code.len() <= 16);
    let (stack_gpa, words) = context.stack.clone().expect("the stack is mapped");
    assert_eq!(stack_gpa, regs.rsp);
    assert!(!words.is_empty() && words.len() <= 8);
    let shown = context.to_string();
    assert!(shown.starts_with(&format!("code at rip (gpa {code_gpa:#x}): {:02x}", code[0])));

    // An address the guest does not map is said so.
    let mut lost = regs;
    lost.rip = 0x7fff_dead_0000;
    vcpu.set_regs(&lost).unwrap();
    let context = vcpu.context(vm.memory()).unwrap();
    assert_eq!(context.code, None);
    assert!(context
        .to_string()
        .starts_with("code at rip: not mapped; stack (gpa "));
}

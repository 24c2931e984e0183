//! Saving a running probe's VM and vCPU state and restoring it into a brand-new VM (over a copy
//! of its memory) on the host's real /dev/kvm: the copy continues exactly where the original
//! was, the original continues independently, the state survives serde, and bad state is a
//! typed error.

mod common;

use capsule_vmm::machine::probe;
use capsule_vmm::vm::VmOptions;
use capsule_vmm::{Error, Vcpu, VcpuState, Vm, VmState};
use common::{boot_with, copy_memory, pio_bus, Probe};
use kvm_bindings::{kvm_msr_entry, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress};

/// MSRs that count time on their own and so differ between two saves of an idle vCPU:
/// `MSR_IA32_TSC`, and on hardware KVM the Hyper-V reference time counter
/// (`HV_X64_MSR_TIME_REF_COUNT`) and virtual-processor run time (`HV_X64_MSR_VP_RUNTIME`).
const CLOCK_MSRS: [u32; 3] = [0x10, 0x4000_0020, 0x4000_0010];

/// Boots a probe, runs `count` twice and `touch 8`, completes the last exit and saves both
/// states. Returns the probe, the states and the checksum `touch` printed.
fn run_and_save(options: VmOptions) -> Option<(Probe, VcpuState, VmState, String)> {
    let mut p = boot_with(options)?;
    p.start();
    assert_eq!(p.command(1, "count"), "1");
    assert_eq!(p.command(2, "count"), "2");
    let checksum = p.command(3, "touch 8");
    assert_eq!(
        p.command(4, "sum"),
        checksum,
        "sum of the 8 pages just touched"
    );

    // The doorbell `out` is completed by KVM only on the next KVM_RUN.
    assert!(p.vcpu.exit_pending());
    let msrs = p.hv.msrs_to_save(options.irqchip).unwrap().to_vec();
    assert!(matches!(
        p.vcpu.save_state(&msrs),
        Err(Error::ExitNotCompleted)
    ));
    let rip_at_exit = p.vcpu.regs().unwrap().rip;
    p.vcpu.complete_pending_exit().unwrap();
    assert!(!p.vcpu.exit_pending());
    // Now rip is just past the doorbell's `out %eax,(%dx)` (0xef). Hardware KVM advances it
    // only here; PVM, which emulates the guest's `out`, already did at the exit.
    let rip = p.vcpu.regs().unwrap().rip;
    let mut opcode = [0u8];
    p.vm.memory()
        .read_slice(&mut opcode, GuestAddress(rip - 1))
        .unwrap();
    assert_eq!(
        opcode,
        [0xef],
        "rip {rip:#x} (at the exit: {rip_at_exit:#x})"
    );
    assert!(rip == rip_at_exit || rip == rip_at_exit + 1);
    p.vcpu.complete_pending_exit().unwrap(); // nothing pending: no-op

    let vcpu_state = p.vcpu.save_state(&msrs).unwrap();
    let vm_state = p.vm.save_state().unwrap();
    assert_eq!(vcpu_state.msrs.len(), msrs.len());
    assert_eq!(vcpu_state.lapic.is_some(), options.irqchip);
    assert_eq!(vm_state.irqchip.is_some(), options.irqchip);
    assert_eq!(vm_state.pit.is_some(), options.irqchip);
    Some((p, vcpu_state, vm_state, checksum))
}

/// A new VM over a copy of `original`'s memory, with both states restored into it.
fn restore_copy(original: &Probe, vcpu_state: &VcpuState, vm_state: &VmState) -> Probe {
    let options = original.vm.options();
    let vm = Vm::new(&original.hv, copy_memory(original.vm.memory()), options).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    probe::restore(
        &vm,
        std::slice::from_ref(&vcpu),
        vm_state,
        std::slice::from_ref(vcpu_state),
    )
    .unwrap();
    Probe {
        hv: original.hv.clone(),
        vm,
        vcpu,
        pio: pio_bus(),
        mmio: capsule_devices::Bus::new(),
    }
}

/// `a` and `b` are the same vCPU state, but for the clocks (which keep counting).
fn assert_same_vcpu_state(a: &VcpuState, b: &VcpuState) {
    let without_tsc = |s: &VcpuState| {
        let mut s = s.clone();
        s.msrs.retain(|m| !CLOCK_MSRS.contains(&m.index));
        s
    };
    assert_eq!(without_tsc(a), without_tsc(b));
}

fn continues_after_restore(options: VmOptions) {
    let Some((mut original, vcpu_state, vm_state, checksum)) = run_and_save(options) else {
        return;
    };
    let mut copy = restore_copy(&original, &vcpu_state, &vm_state);
    // Everything restored reads back as saved.
    let msrs = original.hv.msrs_to_save(options.irqchip).unwrap();
    assert_same_vcpu_state(&copy.vcpu.save_state(msrs).unwrap(), &vcpu_state);

    assert_eq!(copy.command(5, "count"), "3");
    assert_eq!(copy.command(6, "sum"), checksum);

    // The original continues on its own: same answers, then its own changes stay its own.
    assert_eq!(original.command(5, "count"), "3");
    assert_eq!(original.command(6, "sum"), checksum);
    let changed = original.command(7, "touch 1");
    assert_ne!(
        original.command(8, "sum"),
        checksum,
        "touch 1 changed page 8 ({changed})"
    );
    assert_eq!(copy.command(7, "sum"), checksum);
    assert_eq!(copy.command(8, "count"), "4");
    assert_eq!(original.command(9, "count"), "4");
}

#[test]
fn a_restored_copy_continues_where_the_original_left_off() {
    continues_after_restore(VmOptions::default());
}

#[test]
fn a_restored_copy_with_irqchip_continues_where_the_original_left_off() {
    continues_after_restore(VmOptions {
        irqchip: true,
        ..Default::default()
    });
}

#[test]
fn vcpu_state_round_trips_through_serde() {
    let Some((_p, vcpu_state, vm_state, _)) = run_and_save(VmOptions::default()) else {
        return;
    };
    let bytes = bincode::serialize(&vcpu_state).unwrap();
    let back: VcpuState = bincode::deserialize(&bytes).unwrap();
    assert_eq!(back, vcpu_state);
    eprintln!("VcpuState: {} bytes of bincode", bytes.len());
    let json = serde_json::to_string(&vcpu_state).unwrap();
    assert_eq!(
        serde_json::from_str::<VcpuState>(&json).unwrap(),
        vcpu_state
    );

    let bytes = bincode::serialize(&vm_state).unwrap();
    assert_eq!(bincode::deserialize::<VmState>(&bytes).unwrap(), vm_state);
}

#[test]
fn vm_state_with_irqchip_round_trips() {
    let options = VmOptions {
        irqchip: true,
        ..Default::default()
    };
    let Some((original, vcpu_state, vm_state, _)) = run_and_save(options) else {
        return;
    };
    let chips = vm_state.irqchip.as_ref().unwrap();
    assert_eq!(chips.pic_master.0.chip_id, 0);
    assert_eq!(chips.pic_slave.0.chip_id, 1);
    assert_eq!(chips.ioapic.0.chip_id, 2);

    // Through bincode, into a new VM, and read back.
    let bytes = bincode::serialize(&vm_state).unwrap();
    let decoded: VmState = bincode::deserialize(&bytes).unwrap();
    assert_eq!(decoded, vm_state);
    eprintln!("VmState with irqchip: {} bytes of bincode", bytes.len());
    let copy = restore_copy(&original, &vcpu_state, &decoded);
    let again = copy.vm.save_state().unwrap();
    assert_eq!(again.irqchip, vm_state.irqchip);
    let (pit, saved_pit) = (again.pit.unwrap(), vm_state.pit.unwrap());
    assert_eq!(pit.flags, saved_pit.flags);
    for (a, b) in pit.channels.iter().zip(saved_pit.channels.iter()) {
        // KVM reloads each counter on KVM_SET_PIT2, restarting its load time.
        let (mut a, mut b) = (*a, *b);
        a.count_load_time = 0;
        b.count_load_time = 0;
        assert_eq!(a, b);
    }
    if let (Some(clock), Some(saved)) = (again.clock, vm_state.clock) {
        assert!(clock.clock >= saved.clock, "kvmclock does not go back");
    }

    // Irqchip state only fits a VM with an irqchip, and the other way round.
    let plain = Vm::new(
        &original.hv,
        copy_memory(original.vm.memory()),
        VmOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        plain.restore_state(&vm_state),
        Err(Error::IncompatibleState(_))
    ));
    assert!(matches!(
        plain.create_vcpu(0).unwrap().restore_state(&vcpu_state),
        Err(Error::IncompatibleState(_))
    ));
    let mut no_chip = vm_state.clone();
    no_chip.irqchip = None;
    no_chip.pit = None;
    assert!(matches!(
        copy.vm.restore_state(&no_chip),
        Err(Error::IncompatibleState(_))
    ));
    // A chip's state in the wrong slot is refused before KVM sees it.
    let mut swapped = vm_state.clone();
    let chips = swapped.irqchip.as_mut().unwrap();
    std::mem::swap(&mut chips.pic_master, &mut chips.ioapic);
    assert!(matches!(
        copy.vm.restore_state(&swapped),
        Err(Error::IncompatibleState(_))
    ));
}

#[test]
fn corrupted_state_is_a_typed_error() {
    let Some((p, vcpu_state, _, _)) = run_and_save(VmOptions::default()) else {
        return;
    };
    let mut next_index = 1;
    let mut restore = |state: &VcpuState| -> Result<(), Error> {
        let vcpu: Vcpu = p.vm.create_vcpu(next_index).unwrap();
        next_index += 1;
        vcpu.restore_state(state)
    };
    restore(&vcpu_state).unwrap();

    // An MSR KVM does not know.
    let mut bad = vcpu_state.clone();
    bad.msrs.insert(
        3,
        kvm_msr_entry {
            index: 0xdead_beef,
            data: 1,
            ..Default::default()
        },
    );
    match restore(&bad) {
        Err(Error::MsrsIncomplete {
            op: "KVM_SET_MSRS",
            index: 0xdead_beef,
            done: 3,
            total,
        }) => assert_eq!(total, vcpu_state.msrs.len() + 1),
        other => panic!("unexpected {other:?}"),
    }

    // A reserved CR4 bit.
    let mut bad = vcpu_state.clone();
    bad.sregs.cr4 |= 1 << 63;
    match restore(&bad) {
        Err(Error::Kvm {
            op: "KVM_SET_SREGS",
            source,
        }) => assert_eq!(source.raw_os_error(), Some(libc::EINVAL)),
        other => panic!("unexpected {other:?}"),
    }

    // An MP state that needs a LAPIC this VM does not have.
    let mut bad = vcpu_state.clone();
    bad.mp_state.mp_state = KVM_MP_STATE_RUNNABLE + 1;
    assert!(matches!(
        restore(&bad),
        Err(Error::Kvm {
            op: "KVM_SET_MP_STATE",
            ..
        })
    ));

    // XCR0 without the x87 bit, which the architecture requires.
    if vcpu_state.xcrs.is_some() {
        let mut bad = vcpu_state.clone();
        bad.xcrs.as_mut().unwrap().xcrs[0].value = 0;
        assert!(matches!(
            restore(&bad),
            Err(Error::Kvm {
                op: "KVM_SET_XCRS",
                ..
            })
        ));
    }

    // A truncated XSAVE area.
    if vcpu_state.xsave.is_some() {
        let mut bad = vcpu_state.clone();
        bad.xsave.as_mut().unwrap().truncate(100);
        assert!(matches!(restore(&bad), Err(Error::IncompatibleState(_))));
    }

    // A LAPIC for a VM without irqchip.
    let mut bad = vcpu_state.clone();
    bad.lapic = Some(Default::default());
    assert!(matches!(restore(&bad), Err(Error::IncompatibleState(_))));

    // Garbage bytes do not deserialize into a state.
    assert!(bincode::deserialize::<VcpuState>(&[1, 2, 3]).is_err());
}

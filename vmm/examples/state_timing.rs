//! Measures how long saving and restoring VM and vCPU state takes on this host's KVM.
//!
//! ```text
//! cargo run --release -p capsule-vmm --example state_timing
//! ```
//!
//! Boots the probe guest (with and without an in-kernel irqchip), runs a command, then times
//! `Vcpu::save_state`, `Vcpu::restore_state` (into the same vCPU and into a fresh one),
//! `Vm::save_state` / `Vm::restore_state` and single ioctls of a save, printing medians and
//! 90th percentiles in microseconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use capsule_vmm::vm::VmOptions;
use capsule_vmm::Vm;

const ROUNDS: usize = 2000;
const FRESH_ROUNDS: usize = 200;

fn stats(name: &str, mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "  {name:<44} median {:>8.1} us   p90 {:>8.1} us   (n={})",
        at(0.5),
        at(0.9),
        samples.len()
    );
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64() * 1e6)
}

fn repeat(rounds: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..rounds).map(|_| time(&mut f).1).collect()
}

fn measure(irqchip: bool) {
    let options = VmOptions {
        irqchip,
        ..Default::default()
    };
    let Some(mut p) = common::boot_with(options) else {
        return;
    };
    println!("irqchip: {irqchip} ({})", p.hv.info().virtualization);
    let (msrs, first) = time(|| p.hv.msrs_to_save(irqchip).unwrap().to_vec());
    println!(
        "  Hypervisor::msrs_to_save, first call: {first:.0} us, {} MSRs",
        msrs.len()
    );
    p.start();
    p.command(1, "count");

    // Completing the doorbell exit: one KVM_RUN with immediate_exit.
    let mut complete = Vec::new();
    for seq in 2..2 + FRESH_ROUNDS as u32 {
        p.command(seq, "count");
        complete.push(time(|| p.vcpu.complete_pending_exit().unwrap()).1);
    }
    stats("Vcpu::complete_pending_exit", complete);

    let state = p.vcpu.save_state(&msrs).unwrap();
    stats(
        "Vcpu::save_state",
        repeat(ROUNDS, || {
            p.vcpu.save_state(&msrs).unwrap();
        }),
    );
    stats(
        "Vcpu::restore_state (same vCPU)",
        repeat(ROUNDS, || p.vcpu.restore_state(&state).unwrap()),
    );
    let vm_state = p.vm.save_state().unwrap();
    stats(
        "Vm::save_state",
        repeat(ROUNDS, || {
            p.vm.save_state().unwrap();
        }),
    );
    stats(
        "Vm::restore_state (same VM)",
        repeat(ROUNDS, || p.vm.restore_state(&vm_state).unwrap()),
    );

    // Into a fresh VM and vCPU each time, as a real restore does.
    let mut fresh_vm = Vec::new();
    let mut fresh_vcpu = Vec::new();
    let mut create_vm = Vec::new();
    for _ in 0..FRESH_ROUNDS {
        let mem = capsule_vmm::memory::create_anonymous(common::MEM).unwrap();
        let (vm, micros) = time(|| Vm::new(&p.hv, mem, options).unwrap());
        create_vm.push(micros);
        let vcpu = vm.create_vcpu(0).unwrap();
        fresh_vm.push(time(|| vm.restore_state(&vm_state).unwrap()).1);
        fresh_vcpu.push(time(|| vcpu.restore_state(&state).unwrap()).1);
    }
    stats("(Vm::new, 16 MiB, for comparison)", create_vm);
    stats("Vm::restore_state (fresh VM)", fresh_vm);
    stats("Vcpu::restore_state (fresh vCPU)", fresh_vcpu);

    // What a vCPU save is made of: the ioctls this crate exposes one by one (each of the
    // others costs about the same on a given host).
    stats(
        "  KVM_GET_MP_STATE",
        repeat(ROUNDS, || {
            let _ = p.vcpu.mp_state();
        }),
    );
    stats(
        "  KVM_GET_REGS",
        repeat(ROUNDS, || {
            let _ = p.vcpu.regs();
        }),
    );
    stats(
        "  KVM_GET_SREGS",
        repeat(ROUNDS, || {
            let _ = p.vcpu.sregs();
        }),
    );
    stats(
        &format!("  save_state with no MSRs (vs {} MSRs above)", msrs.len()),
        repeat(ROUNDS, || {
            let _ = p.vcpu.save_state(&[]);
        }),
    );
}

fn main() {
    measure(false);
    measure(true);
}

//! Helpers shared by the integration tests that boot the probe guest on the host's real KVM.
#![allow(dead_code)] // each test binary uses a different subset

use capsule_devices::Bus;
use capsule_vmm::machine::probe;
use capsule_vmm::vm::VmOptions;
use capsule_vmm::{memory, GuestMemory, Hypervisor, Vcpu, VcpuEvent, Vm};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of every test VM.
pub const MEM: usize = 16 << 20;

/// Opens /dev/kvm, or prints why the test is skipped and returns `None` when it does not exist.
/// Any other failure (no permission, not KVM) fails the test.
pub fn hypervisor() -> Option<Hypervisor> {
    if !std::path::Path::new(capsule_vmm::hypervisor::DEFAULT_KVM_PATH).exists() {
        eprintln!("skipping: /dev/kvm does not exist on this host");
        return None;
    }
    Some(Hypervisor::open().expect("/dev/kvm exists but cannot be used"))
}

/// The port I/O bus of a probe VM: just the doorbell.
pub fn pio_bus() -> Bus {
    probe::pio_bus().unwrap()
}

/// A booted probe: a VM with vCPU 0 set to enter the guest, not yet run.
pub struct Probe {
    pub hv: Hypervisor,
    pub vm: Vm,
    pub vcpu: Vcpu,
    pub pio: Bus,
    pub mmio: Bus,
}

/// Loads the probe into fresh memory and sets vCPU 0 up to enter it; `None` without /dev/kvm.
pub fn boot() -> Option<(Vm, Vcpu, Bus)> {
    boot_with(VmOptions::default()).map(|p| (p.vm, p.vcpu, p.pio))
}

/// Like [`boot`], with VM options.
pub fn boot_with(options: VmOptions) -> Option<Probe> {
    let hv = hypervisor()?;
    let mem = memory::create_anonymous(MEM).unwrap();
    let vm = Vm::new(&hv, mem, options).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    probe::boot(&vm, std::slice::from_ref(&vcpu), MEM as u64).unwrap();
    Some(Probe {
        hv,
        vm,
        vcpu,
        pio: pio_bus(),
        mmio: Bus::new(),
    })
}

/// Writes request `seq` with command `text` into vCPU 0's mailbox.
pub fn request(vm: &Vm, seq: u32, text: &str) {
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

/// The exit code and stdout of the reply in vCPU 0's mailbox.
pub fn reply(vm: &Vm) -> (i32, Vec<u8>) {
    let mut mailbox = vec![0u8; probe_abi::MAILBOX_SIZE as usize];
    vm.memory()
        .read_slice(&mut mailbox, GuestAddress(probe_abi::mailbox_addr(0)))
        .unwrap();
    let r = probe_abi::decode_reply(&mailbox).unwrap();
    (r.header.exit_code, r.stdout.to_vec())
}

impl Probe {
    /// Runs the guest up to its "ready" doorbell.
    pub fn start(&mut self) {
        assert_eq!(
            self.vcpu.run(&self.pio, &self.mmio).unwrap(),
            VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_READY))
        );
    }

    /// Sends command `text` as request `seq`, runs the guest to its reply and returns stdout
    /// (the exit code must be 0).
    pub fn command(&mut self, seq: u32, text: &str) -> String {
        request(&self.vm, seq, text);
        assert_eq!(
            self.vcpu.run(&self.pio, &self.mmio).unwrap(),
            VcpuEvent::Yield(u64::from(probe_abi::DOORBELL_REPLY)),
            "command {text:?}"
        );
        let (code, stdout) = reply(&self.vm);
        assert_eq!(code, 0, "command {text:?} failed");
        String::from_utf8(stdout).unwrap().trim_end().to_string()
    }
}

/// A copy of `memory`'s bytes in fresh anonymous memory of the same size.
pub fn copy_memory(memory: &GuestMemory) -> GuestMemory {
    let copy = capsule_vmm::memory::create_anonymous(MEM).unwrap();
    let mut bytes = vec![0u8; MEM];
    memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    copy
}

//! A KVM virtual machine, its guest memory slots and, optionally, KVM's in-kernel interrupt
//! controllers and timer ([`VmOptions::irqchip`]). Its state is saved by [`Vm::save_state`]
//! (see [`state`]).

pub mod state;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use state::VmState;

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::memory::{self, GuestMemory};
use crate::vcpu::state::VcpuCaps;
use crate::vcpu::Vcpu;

/// Where KVM may put the three pages Intel VMX needs for real-mode emulation (TSS), just below
/// the 4 GiB boundary where no guest RAM or MMIO of ours lives.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Options for [`Vm::new`].
#[derive(Debug, Clone, Copy, Default)]
pub struct VmOptions {
    /// Ask KVM to log pages the guest writes (needed for incremental snapshots).
    pub dirty_log: bool,
    /// Create KVM's in-kernel interrupt controllers (PIC pair, IOAPIC, a LAPIC per vCPU) and
    /// PIT, as a Linux guest needs. Off by default: the probe guest runs without interrupts.
    pub irqchip: bool,
}

/// A VM: the KVM VM file descriptor plus the guest memory registered with it.
///
/// Dropping it closes the VM; the memory is unmapped once no other clone of it is alive.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    memory: GuestMemory,
    options: VmOptions,
    vcpu_caps: VcpuCaps,
    /// `KVM_CAP_ADJUST_CLOCK`: kvmclock can be read and set.
    adjust_clock: bool,
    /// The KVM device the VM was created from.
    hypervisor: Hypervisor,
}

impl Vm {
    /// Creates a VM and registers every region of `memory` as a memory slot (slot i = region i).
    pub fn new(hypervisor: &Hypervisor, memory: GuestMemory, options: VmOptions) -> Result<Self> {
        let fd = hypervisor
            .kvm()
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
        let flags = if options.dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which this Vm keeps alive
            // for as long as the VM fd exists (fields drop in declaration order: fd first).
            unsafe { fd.set_user_memory_region(slot_region) }
                .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        if options.irqchip {
            // Both before any vCPU is created (KVM gives each vCPU a LAPIC at creation), and
            // after the memory slots: on PVM a KVM_SET_USER_MEMORY_REGION made once the
            // irqchip exists costs ~7.3 ms instead of ~35 us (measured, 16 MiB slot).
            fd.create_irq_chip()
                .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
            // The dummy speaker port (0x61) keeps the PC speaker from exiting to user space.
            fd.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
        }
        let vcpu_caps = VcpuCaps::query(&fd, options.irqchip);
        let adjust_clock = fd.check_extension(kvm_ioctls::Cap::AdjustClock);
        Ok(Vm {
            fd,
            memory,
            options,
            vcpu_caps,
            adjust_clock,
            hypervisor: hypervisor.clone(),
        })
    }

    /// Creates vCPU number `index`.
    pub fn create_vcpu(&self, index: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
        Ok(Vcpu::new(fd, index, self.vcpu_caps))
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM handle.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM device the VM was created from.
    pub fn hypervisor(&self) -> &Hypervisor {
        &self.hypervisor
    }

    /// The options the VM was created with.
    pub fn options(&self) -> VmOptions {
        self.options
    }

    /// KVM's dirty log for memory slot `slot` (one bit per page; reading it clears it).
    /// Requires [`VmOptions::dirty_log`].
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let region = self
            .memory
            .iter()
            .nth(slot as usize)
            .ok_or_else(|| Error::InvalidConfig(format!("no memory slot {slot}")))?;
        self.fd
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|e| Error::kvm("KVM_GET_DIRTY_LOG", e))
    }

    /// Takes (and clears) the pages written since the last call, per memory region (slot i =
    /// region i, in flat order): KVM's dirty log of the guest's writes OR the VMM's own
    /// writes ([`memory::take_vmm_dirty`]), each in KVM's dirty-log word format (bit i of
    /// word w = page 64w + i of that region). [`memory::flatten_dirty`] joins them into flat
    /// pages. Requires [`VmOptions::dirty_log`].
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>> {
        if !self.options.dirty_log {
            return Err(Error::InvalidConfig(
                "the VM does not log dirty pages (VmOptions::dirty_log)".into(),
            ));
        }
        let mut pages = memory::take_vmm_dirty(&self.memory);
        for (slot, words) in pages.iter_mut().enumerate() {
            let guest = self.dirty_log(slot as u32)?;
            memory::or_words(words, &guest);
        }
        Ok(pages)
    }

    /// Has KVM inject interrupt `gsi` whenever `evt` is written (`KVM_IRQFD`), so a device
    /// raises it without a VMM round trip. Requires [`VmOptions::irqchip`].
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| Error::kvm("KVM_IRQFD", e))
    }

    /// Has KVM signal `evt` instead of exiting to the VMM when the guest writes `datamatch`
    /// (4 bytes) to guest-physical `addr` (`KVM_IOEVENTFD`): how a virtio-mmio queue
    /// notification reaches a device thread without a vCPU exit.
    pub fn register_mmio_ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| Error::kvm("KVM_IOEVENTFD", e))
    }
}

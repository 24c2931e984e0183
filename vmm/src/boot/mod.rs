//! Booting a stock x86_64 Linux kernel: from a [`LinuxBootConfig`] to a VM whose vCPUs are
//! ready to enter the kernel.
//!
//! ```text
//! let memory = boot::create_memory(config.memory_mb)?;        // RAM laid out as arch::x86_64::layout
//! let vm = Vm::new(&hv, memory, VmOptions { irqchip: true, ..Default::default() })?;
//! let vcpus = (0..config.vcpus).map(|i| vm.create_vcpu(i)).collect::<Result<Vec<_>>>()?;
//! let info = boot::boot_linux(&vm, &vcpus, &config)?;         // then run every vCPU
//! ```
//!
//! [`boot_linux`] is [`load_into_memory`] (everything written into guest memory: kernel,
//! initramfs, command line, ACPI tables, `boot_params` or PVH start info, GDT, page tables;
//! no KVM needed, so it is unit-tested anywhere) followed by [`BootVcpu::apply`] on every
//! vCPU (CPUID, MSRs, registers, FPU, LAPIC, MP state).
//!
//! The guest's devices are described, not emulated, here: COM1 at `0x3f8`/IRQ 4, the
//! virtio-mmio devices of [`LinuxBootConfig::virtio_mmio`], the ACPI sleep and reset
//! registers (see [`crate::arch::x86_64::layout`] and [`crate::arch::x86_64::acpi`]). The
//! caller's run loop must serve them.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use crate::arch::x86_64::acpi::VirtioMmioDesc;
use crate::arch::x86_64::acpi::{self, AcpiTables};
use crate::arch::x86_64::layout::{
    self, CMDLINE_START, MIB, MIN_MEMORY, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::loader::{self, LoadedKernel};
pub use crate::arch::x86_64::loader::{InitrdPlacement, KernelFormat};
pub use crate::arch::x86_64::regs::BootProtocol;
use crate::arch::x86_64::{cpuid, interrupts, msrs, regs};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// Where a kernel or initramfs comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A file, read while booting.
    File(PathBuf),
    /// Bytes already in memory.
    Bytes(Arc<[u8]>),
}

impl From<PathBuf> for ImageSource {
    fn from(path: PathBuf) -> Self {
        ImageSource::File(path)
    }
}

impl From<Vec<u8>> for ImageSource {
    fn from(bytes: Vec<u8>) -> Self {
        ImageSource::Bytes(bytes.into())
    }
}

/// What to boot, and into what machine.
#[derive(Debug, Clone)]
pub struct LinuxBootConfig {
    /// The kernel: an ELF `vmlinux` (PVH entry when it has the note) or a bzImage.
    pub kernel: ImageSource,
    /// The initramfs (a cpio archive, compressed or not), if any.
    pub initrd: Option<ImageSource>,
    /// The kernel command line.
    pub cmdline: String,
    /// vCPUs (1–254); [`boot_linux`] must be given exactly this many.
    pub vcpus: u32,
    /// Guest RAM in MiB; the VM's memory must come from [`create_memory`] with this size.
    pub memory_mb: u64,
    /// virtio-mmio devices to describe in the DSDT (see [`VirtioMmioDesc::slot`]).
    pub virtio_mmio: Vec<VirtioMmioDesc>,
    /// Force an entry style; `None` picks PVH for an ELF with the PVH note, the 64-bit
    /// protocol otherwise.
    pub protocol: Option<BootProtocol>,
}

impl LinuxBootConfig {
    /// One vCPU, 256 MiB, `console=ttyS0`, no initramfs, no devices.
    pub fn new(kernel: impl Into<ImageSource>) -> Self {
        LinuxBootConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mb: 256,
            virtio_mmio: Vec::new(),
            protocol: None,
        }
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> Result<u64> {
        self.memory_mb
            .checked_mul(MIB)
            .filter(|bytes| *bytes >= MIN_MEMORY)
            .ok_or(Error::MemoryTooSmall {
                needed: MIN_MEMORY,
                available: self.memory_mb.saturating_mul(MIB),
            })
    }
}

/// What [`boot_linux`] set up: where everything is and how the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootInfo {
    /// The kernel file's format.
    pub format: KernelFormat,
    /// How the boot vCPU enters it.
    pub protocol: BootProtocol,
    /// Guest-physical entry point (the boot vCPU's `rip`).
    pub entry: u64,
    /// Lowest address the kernel was loaded at.
    pub kernel_load: u64,
    /// End (exclusive) of the memory the kernel needs early (its image, or a bzImage's
    /// decompression buffer).
    pub kernel_end: u64,
    /// Where the initramfs is.
    pub initrd: Option<InitrdPlacement>,
    /// The command line's address.
    pub cmdline_addr: u64,
    /// The command line's length, NUL excluded.
    pub cmdline_len: usize,
    /// The structure the kernel gets at entry: `boot_params` (in `rsi`) or `hvm_start_info`
    /// (in `rbx`).
    pub boot_params_addr: u64,
    /// Where the ACPI tables are.
    pub acpi: AcpiTables,
}

/// Creates the guest RAM of a Linux guest with `memory_mb` MiB, laid out as
/// [`layout::ram_regions`] (a second region above 4 GiB past [`layout::MMIO_GAP_START`]).
pub fn create_memory(memory_mb: u64) -> Result<GuestMemory> {
    memory::create_anonymous_regions(&memory_layout(memory_mb)?)
}

/// The regions of a Linux guest's RAM of `memory_mb` MiB (`(guest-physical start, bytes)`,
/// ascending), as [`create_memory`] lays them out: for mapping a snapshot of such a guest
/// with [`memory::map_private_file_regions`].
pub fn memory_layout(memory_mb: u64) -> Result<Vec<(GuestAddress, usize)>> {
    let size = LinuxBootConfig {
        memory_mb,
        ..LinuxBootConfig::new(Vec::new())
    }
    .memory_bytes()?;
    Ok(layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect())
}

fn check_memory(memory: &GuestMemory, config: &LinuxBootConfig) -> Result<u64> {
    let size = config.memory_bytes()?;
    let actual: Vec<_> = memory.iter().map(|r| (r.start_addr(), r.len())).collect();
    let expected = layout::ram_regions(size);
    if actual != expected {
        return Err(Error::InvalidConfig(format!(
            "guest memory regions {actual:x?} are not the Linux layout for {} MiB {expected:x?}: create it with boot::create_memory",
            config.memory_mb
        )));
    }
    Ok(size)
}

fn open(source: &PathBuf, what: &'static str) -> Result<std::fs::File> {
    std::fs::File::open(source).map_err(|e| Error::BootFile {
        what,
        path: source.clone(),
        source: e,
    })
}

fn load_kernel(memory: &GuestMemory, config: &LinuxBootConfig) -> Result<LoadedKernel> {
    match &config.kernel {
        ImageSource::File(path) => {
            let mut file = open(path, "kernel")?;
            loader::load_kernel(memory, &mut file, config.protocol)
        }
        ImageSource::Bytes(bytes) => {
            loader::load_kernel(memory, &mut Cursor::new(&bytes[..]), config.protocol)
        }
    }
}

fn load_initrd(
    memory: &GuestMemory,
    kernel: &LoadedKernel,
    source: &ImageSource,
) -> Result<InitrdPlacement> {
    match source {
        ImageSource::File(path) => {
            let mut file = open(path, "initramfs")?;
            let size = file
                .metadata()
                .map_err(|e| Error::BootFile {
                    what: "initramfs",
                    path: path.clone(),
                    source: e,
                })?
                .len();
            loader::load_initrd(memory, kernel, &mut file, size)
        }
        ImageSource::Bytes(bytes) => loader::load_initrd(
            memory,
            kernel,
            &mut Cursor::new(&bytes[..]),
            bytes.len() as u64,
        ),
    }
}

/// Writes everything the kernel finds in memory at entry: the kernel, the initramfs, the
/// command line, the ACPI tables, `boot_params` (64-bit protocol) or the PVH start info, the
/// GDT and (64-bit protocol) the page tables. `memory` must come from [`create_memory`] with
/// `config.memory_mb`. Needs no KVM.
pub fn load_into_memory(memory: &GuestMemory, config: &LinuxBootConfig) -> Result<BootInfo> {
    let mem_size = check_memory(memory, config)?;
    let kernel = load_kernel(memory, config)?;
    let cmdline_len = loader::write_cmdline(memory, &kernel, &config.cmdline)?;
    let initrd = config
        .initrd
        .as_ref()
        .map(|source| load_initrd(memory, &kernel, source))
        .transpose()?;
    let acpi = acpi::write_tables(memory, config.vcpus, &config.virtio_mmio)?;
    regs::write_gdt(memory)?;
    let boot_params_addr = match kernel.protocol {
        BootProtocol::Pvh => {
            let (info, map, module) = loader::pvh_start_info(initrd, acpi.rsdp, mem_size)?;
            loader::write_pvh_start_info(memory, &info, &map, module.as_ref())?;
            PVH_INFO_START
        }
        BootProtocol::Linux64 => {
            regs::write_page_tables(memory)?;
            let params = loader::boot_params(&kernel, cmdline_len, initrd, acpi.rsdp, mem_size)?;
            loader::write_boot_params(memory, &params)?;
            ZERO_PAGE_START
        }
    };
    let info = BootInfo {
        format: kernel.format,
        protocol: kernel.protocol,
        entry: kernel.entry,
        kernel_load: kernel.load_addr,
        kernel_end: kernel.end,
        initrd,
        cmdline_addr: CMDLINE_START,
        cmdline_len,
        boot_params_addr,
        acpi,
    };
    tracing::debug!(?info, "Linux kernel loaded");
    Ok(info)
}

/// Sets a vCPU up for a Linux boot: CPUID (KVM's supported set, [`cpuid::normalize`]d for
/// its APIC ID), boot MSRs, FPU, LAPIC `LINT0`/`LINT1`, and either the entry registers
/// (vCPU 0, the bootstrap processor: runnable) or nothing more (application processors:
/// `KVM_MP_STATE_UNINITIALIZED`, waiting for the INIT/SIPI the kernel sends).
#[derive(Debug, Clone)]
pub struct BootVcpu {
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    vcpu_count: u32,
    protocol: BootProtocol,
    entry: u64,
}

impl BootVcpu {
    /// For a VM of `vcpu_count` vCPUs booted as `boot` says, from KVM's supported CPUID.
    pub fn new(supported_cpuid: &[kvm_cpuid_entry2], vcpu_count: u32, boot: &BootInfo) -> Self {
        BootVcpu {
            supported_cpuid: supported_cpuid.to_vec(),
            vcpu_count,
            protocol: boot.protocol,
            entry: boot.entry,
        }
    }

    /// The CPUID of vCPU `index` (APIC ID = index).
    pub fn cpuid(&self, index: u32) -> Vec<kvm_cpuid_entry2> {
        let mut entries = self.supported_cpuid.clone();
        cpuid::normalize(&mut entries, index, self.vcpu_count);
        entries
    }

    /// Applies everything to `vcpu`, as the bootstrap processor when its index is 0.
    pub fn apply(&self, vcpu: &Vcpu) -> Result<()> {
        let index = vcpu.index();
        let cpuid = CpuId::from_entries(&self.cpuid(index))
            .map_err(|e| Error::InvalidConfig(format!("CPUID table: {e:?}")))?;
        vcpu.fd()
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
        msrs::set_boot_msrs(vcpu)?;
        let fpu = regs::fpu();
        vcpu.fd()
            .set_fpu(&fpu)
            .map_err(|e| Error::kvm("KVM_SET_FPU", e))?;
        vcpu.set_mxcsr(fpu.mxcsr)?;
        interrupts::configure_lapic(vcpu)?;
        let mp_state = if index == 0 {
            vcpu.set_regs(&regs::regs(self.entry, self.protocol))?;
            vcpu.set_sregs(&regs::sregs(vcpu.sregs()?, self.protocol))?;
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        vcpu.fd()
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(|e| Error::kvm("KVM_SET_MP_STATE", e))
    }
}

/// Boots `config`'s kernel into `vm` (created with [`crate::VmOptions::irqchip`] on memory
/// from [`create_memory`]) and sets up `vcpus` (exactly `config.vcpus` of them, indices
/// `0..n`): after it, running every vCPU runs Linux. Returns where everything was put.
/// [`load_into_memory`] then [`setup_vcpus`], for a caller that loads the memory earlier.
pub fn boot_linux(vm: &Vm, vcpus: &[Vcpu], config: &LinuxBootConfig) -> Result<BootInfo> {
    check_vm(vm, vcpus, config)?;
    let info = load_into_memory(vm.memory(), config)?;
    setup_vcpus(vm, vcpus, config, &info)?;
    Ok(info)
}

/// Sets up `vcpus` of `vm`, whose memory [`load_into_memory`] filled for `config` (returning
/// `info`): the bootstrap processor at the kernel's entry, the others waiting for INIT/SIPI.
/// Loading can so happen ahead of time, on a VM that has not run. The guest's kvm-clock is
/// set to 0 here, so a VM built ahead of time boots with the clock of a new one (KVM starts
/// it when the VM is created).
pub fn setup_vcpus(
    vm: &Vm,
    vcpus: &[Vcpu],
    config: &LinuxBootConfig,
    info: &BootInfo,
) -> Result<()> {
    check_vm(vm, vcpus, config)?;
    vm.fd()
        .set_clock(&kvm_bindings::kvm_clock_data::default())
        .map_err(|e| Error::kvm("KVM_SET_CLOCK", e))?;
    let setup = BootVcpu::new(vm.hypervisor().supported_cpuid()?, config.vcpus, info);
    for vcpu in vcpus {
        setup.apply(vcpu)?;
    }
    Ok(())
}

/// A Linux guest needs the in-kernel irqchip and vCPUs `0..config.vcpus` in order.
fn check_vm(vm: &Vm, vcpus: &[Vcpu], config: &LinuxBootConfig) -> Result<()> {
    if !vm.options().irqchip {
        return Err(Error::InvalidConfig(
            "a Linux guest needs the in-kernel irqchip (VmOptions::irqchip)".into(),
        ));
    }
    if vcpus.len() != config.vcpus as usize
        || vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.index() as usize != i)
    {
        return Err(Error::InvalidConfig(format!(
            "boot_linux needs vCPUs 0..{} in order, got {:?}",
            config.vcpus,
            vcpus.iter().map(Vcpu::index).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{GIB, HIGH_RAM_START, MMIO_GAP_START, PML4_START};
    use crate::arch::x86_64::loader::XLF_KERNEL_64;
    use crate::arch::x86_64::test_images::{bzimage, elf, ELF_PADDR, PVH_ENTRY};
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::hvm_start_info;
    use vm_memory::{Bytes, GuestAddress};

    fn config(kernel: Vec<u8>) -> LinuxBootConfig {
        LinuxBootConfig {
            initrd: Some(vec![7u8; 5000].into()),
            cmdline: "console=ttyS0 panic=-1".into(),
            vcpus: 2,
            memory_mb: 64,
            virtio_mmio: vec![VirtioMmioDesc::slot(0).unwrap()],
            ..LinuxBootConfig::new(kernel)
        }
    }

    #[test]
    fn bzimage_boot_fills_memory_for_the_64_bit_protocol() {
        let c = config(bzimage(XLF_KERNEL_64));
        let mem = create_memory(c.memory_mb).unwrap();
        let info = load_into_memory(&mem, &c).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.protocol, BootProtocol::Linux64);
        assert_eq!(info.entry, 0x10_0200);
        assert_eq!(info.boot_params_addr, ZERO_PAGE_START);
        assert_eq!(info.cmdline_len, c.cmdline.len());
        let initrd = info.initrd.unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.addr, (64 << 20) - 8192);

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, initrd.addr as u32);
        assert_eq!({ params.hdr.ramdisk_size }, 5000);
        assert_eq!({ params.acpi_rsdp_addr }, info.acpi.rsdp);
        assert_eq!(params.e820_entries, 3);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_ne!(pml4, 0, "page tables written");
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(info.acpi.rsdp))
            .unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
        let mut initrd_bytes = vec![0u8; 5000];
        mem.read_slice(&mut initrd_bytes, GuestAddress(initrd.addr))
            .unwrap();
        assert!(initrd_bytes.iter().all(|b| *b == 7));
    }

    #[test]
    fn pvh_boot_fills_memory_for_pvh() {
        let c = config(elf(true));
        let mem = create_memory(c.memory_mb).unwrap();
        let info = load_into_memory(&mem, &c).unwrap();
        assert_eq!(info.protocol, BootProtocol::Pvh);
        assert_eq!(info.entry, PVH_ENTRY);
        assert_eq!(info.kernel_load, ELF_PADDR);
        assert_eq!(info.boot_params_addr, PVH_INFO_START);
        let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(start.magic, loader::XEN_HVM_START_MAGIC);
        assert_eq!(start.rsdp_paddr, info.acpi.rsdp);
        assert_eq!(start.cmdline_paddr, CMDLINE_START);
        assert_eq!(start.nr_modules, 1);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0, "no page tables for PVH");
    }

    #[test]
    fn large_guests_get_ram_above_4_gib() {
        let c = LinuxBootConfig {
            memory_mb: 5 * 1024,
            initrd: None,
            ..config(bzimage(XLF_KERNEL_64))
        };
        let mem = create_memory(c.memory_mb).unwrap();
        assert_eq!(memory::size_of(&mem), 5 * GIB);
        let info = load_into_memory(&mem, &c).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 4);
        let table = params.e820_table;
        assert_eq!(({ table[2].addr } + { table[2].size }), MMIO_GAP_START);
        assert_eq!(
            ({ table[3].addr }, { table[3].size }),
            (HIGH_RAM_START, 2 * GIB)
        );
        assert_eq!(info.initrd, None);
    }

    #[test]
    fn configuration_errors_are_typed() {
        let c = config(bzimage(XLF_KERNEL_64));
        let mem = create_memory(c.memory_mb).unwrap();

        let missing = LinuxBootConfig {
            kernel: PathBuf::from("/nonexistent/vmlinuz").into(),
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &missing),
            Err(Error::BootFile { what: "kernel", .. })
        ));
        let missing_initrd = LinuxBootConfig {
            initrd: Some(PathBuf::from("/nonexistent/initrd").into()),
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &missing_initrd),
            Err(Error::BootFile {
                what: "initramfs",
                ..
            })
        ));
        let garbage = LinuxBootConfig {
            kernel: vec![0u8; 4096].into(),
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &garbage),
            Err(Error::InvalidKernel(_))
        ));
        let long = LinuxBootConfig {
            cmdline: "y".repeat(5000),
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &long),
            Err(Error::CmdlineTooLong { len: 5000, .. })
        ));
        let huge_initrd = LinuxBootConfig {
            initrd: Some(vec![0u8; 60 << 20].into()),
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &huge_initrd),
            Err(Error::InitrdTooLarge { .. })
        ));
        let wrong_size = LinuxBootConfig {
            memory_mb: 128,
            ..c.clone()
        };
        assert!(matches!(
            load_into_memory(&mem, &wrong_size),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            create_memory(4),
            Err(Error::MemoryTooSmall { .. })
        ));
        let small = LinuxBootConfig {
            memory_mb: 16,
            ..c.clone()
        };
        let small_mem = create_memory(16).unwrap();
        assert!(matches!(
            load_into_memory(&small_mem, &small),
            Err(Error::MemoryTooSmall { .. })
        ));
        let no_vcpus = LinuxBootConfig { vcpus: 0, ..c };
        assert!(load_into_memory(&mem, &no_vcpus).is_err());
    }

    #[test]
    fn boot_vcpu_gives_each_vcpu_its_apic_id() {
        let info =
            load_into_memory(&create_memory(64).unwrap(), &config(bzimage(XLF_KERNEL_64))).unwrap();
        let supported = vec![kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }];
        let setup = BootVcpu::new(&supported, 2, &info);
        for index in 0..2 {
            let table = setup.cpuid(index);
            let leaf1 = cpuid::find(&table, 1, 0).unwrap();
            assert_eq!(leaf1.ebx >> 24, index);
            assert!(cpuid::find(&table, cpuid::KVM_SIGNATURE_LEAF, 0).is_some());
        }
    }
}

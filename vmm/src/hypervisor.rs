//! Opening `/dev/kvm` and telling what kind of KVM the host has.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, KvmUnavailable, Result};

/// The default KVM device node.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

/// The only KVM API version there has ever been (`KVM_GET_API_VERSION`).
const KVM_API_VERSION: i32 = 12;

/// How the host's KVM runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Virtualization {
    /// Intel VT-x: hardware virtualization, any guest boots.
    HardwareVmx,
    /// AMD-V (SVM): hardware virtualization, any guest boots.
    HardwareSvm,
    /// PVM (pagetable-based virtual machine): a software KVM for hosts without nested
    /// virtualization. Guest user mode runs natively, guest kernel mode is emulated and very slow,
    /// so a stock Linux kernel cannot boot in useful time; the probe guest runs at full speed.
    Pvm,
    /// KVM works but its kind could not be determined.
    Unknown,
}

/// What the host's KVM is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// How guests are run.
    pub virtualization: Virtualization,
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// The most vCPUs KVM allows in one VM.
    pub max_vcpus: usize,
}

impl HostInfo {
    /// Whether a stock Linux kernel can boot on this host in useful time (hardware
    /// virtualization). Templates that boot Linux refuse to start when this is false.
    pub fn can_boot_linux(&self) -> bool {
        matches!(
            self.virtualization,
            Virtualization::HardwareVmx | Virtualization::HardwareSvm
        )
    }
}

impl std::fmt::Display for Virtualization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Virtualization::HardwareVmx => "hardware virtualization (Intel VT-x)",
            Virtualization::HardwareSvm => "hardware virtualization (AMD-V)",
            Virtualization::Pvm => "PVM (software KVM: guest kernel mode is emulated)",
            Virtualization::Unknown => "unknown KVM implementation",
        })
    }
}

/// `MSR_IA32_TSC_DEADLINE`: KVM accepts it only after `MSR_IA32_TSC` (Firecracker defers it).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// An open KVM device, shared by every VM an engine creates.
#[derive(Debug, Clone)]
pub struct Hypervisor {
    kvm: Arc<Kvm>,
    info: HostInfo,
    /// [`Hypervisor::msrs_to_save`], computed on first use and shared by clones.
    msrs: Arc<MsrLists>,
    /// [`Hypervisor::supported_cpuid`], read on first use and shared by clones.
    cpuid: Arc<OnceLock<Vec<kvm_cpuid_entry2>>>,
}

#[derive(Debug, Default)]
struct MsrLists {
    without_irqchip: OnceLock<Vec<u32>>,
    with_irqchip: OnceLock<Vec<u32>>,
}

impl Hypervisor {
    /// Opens [`DEFAULT_KVM_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(DEFAULT_KVM_PATH))
    }

    /// Opens the KVM device at `path`.
    pub fn open_path(path: &Path) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            Error::InvalidConfig(format!("KVM path {} contains a NUL byte", path.display()))
        })?;
        let kvm = Kvm::new_with_path(c_path.as_c_str()).map_err(|e| {
            let source = std::io::Error::from_raw_os_error(e.errno());
            let kind = match e.errno() {
                libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmUnavailable::Missing,
                libc::EACCES | libc::EPERM => KvmUnavailable::PermissionDenied,
                _ => KvmUnavailable::Other,
            };
            Error::KvmUnavailable {
                path: PathBuf::from(path),
                kind,
                source,
            }
        })?;
        let api_version = kvm.get_api_version();
        if api_version != KVM_API_VERSION {
            return Err(Error::KvmUnavailable {
                path: PathBuf::from(path),
                kind: KvmUnavailable::NotKvm,
                source: std::io::Error::other(format!(
                    "KVM_GET_API_VERSION answered {api_version}"
                )),
            });
        }
        let info = HostInfo {
            virtualization: detect_virtualization(),
            api_version,
            max_vcpus: kvm.get_max_vcpus(),
        };
        tracing::debug!(?info, path = %path.display(), "opened KVM");
        Ok(Hypervisor {
            kvm: Arc::new(kvm),
            info,
            msrs: Arc::default(),
            cpuid: Arc::default(),
        })
    }

    /// What this host's KVM is.
    pub fn info(&self) -> &HostInfo {
        &self.info
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The MSRs a [`VcpuState`](crate::vcpu::VcpuState) saves for vCPUs of VMs with or without
    /// an in-kernel irqchip ([`VmOptions::irqchip`](crate::vm::VmOptions::irqchip)): pass it to
    /// [`Vcpu::save_state`](crate::Vcpu::save_state).
    ///
    /// It is KVM's `KVM_GET_MSR_INDEX_LIST`, filtered to the MSRs a fresh vCPU of such a VM
    /// can both read (`KVM_GET_MSRS`) and write back (`KVM_SET_MSRS` with the value read): an
    /// MSR KVM refuses to write on that kind of VM can hold no state there, and saving it would
    /// make every restore fail (without an irqchip, KVM refuses `MSR_KVM_ASYNC_PF_INT`).
    /// `MSR_IA32_TSC_DEADLINE` is moved last, after `MSR_IA32_TSC`, which KVM needs first.
    ///
    /// Computed once per `Hypervisor` (and its clones) and kind of VM, with a throw-away VM and
    /// vCPU (two ioctls per MSR); call it at startup, off the spawn path. Measured on PVM:
    /// ~0.75 ms without irqchip, ~15 ms with one (nearly all of it closing the throw-away VM:
    /// tearing down an in-kernel irqchip is slow there).
    pub fn msrs_to_save(&self, irqchip: bool) -> Result<&[u32]> {
        let cell = if irqchip {
            &self.msrs.with_irqchip
        } else {
            &self.msrs.without_irqchip
        };
        if let Some(list) = cell.get() {
            return Ok(list);
        }
        let list = probe_msrs(&self.kvm, irqchip)?;
        Ok(cell.get_or_init(|| list))
    }
}

impl Hypervisor {
    /// `KVM_GET_SUPPORTED_CPUID`: every CPUID leaf KVM can give a guest on this host, the
    /// starting point of a guest's CPUID ([`crate::arch::x86_64::cpuid::normalize`]). Read
    /// once per `Hypervisor` (and its clones).
    pub fn supported_cpuid(&self) -> Result<&[kvm_cpuid_entry2]> {
        if let Some(entries) = self.cpuid.get() {
            return Ok(entries);
        }
        let entries = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?
            .as_slice()
            .to_vec();
        Ok(self.cpuid.get_or_init(|| entries))
    }
}

/// Builds [`Hypervisor::msrs_to_save`]'s list on a throw-away VM.
fn probe_msrs(kvm: &Kvm, irqchip: bool) -> Result<Vec<u32>> {
    let candidates = kvm
        .get_msr_index_list()
        .map_err(|e| Error::kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
    if irqchip {
        vm.create_irq_chip()
            .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
    }
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
    let mut list = Vec::with_capacity(candidates.as_slice().len());
    for &index in candidates.as_slice() {
        match msr_round_trip(&vcpu, index) {
            Ok(()) => list.push(index),
            Err(why) => tracing::debug!(
                index = format_args!("{index:#x}"),
                irqchip,
                why,
                "MSR not saved"
            ),
        }
    }
    // Stable: everything else keeps KVM's order.
    list.sort_by_key(|&index| index == MSR_IA32_TSC_DEADLINE);
    tracing::debug!(
        reported = candidates.as_slice().len(),
        saved = list.len(),
        irqchip,
        "MSR list for vCPU state"
    );
    Ok(list)
}

/// Reads MSR `index` from `vcpu` and writes the value back.
fn msr_round_trip(vcpu: &VcpuFd, index: u32) -> std::result::Result<(), &'static str> {
    let entry = kvm_msr_entry {
        index,
        ..Default::default()
    };
    let mut msrs = Msrs::from_entries(&[entry]).map_err(|_| "cannot build the MSR buffer")?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => {}
        _ => return Err("KVM_GET_MSRS refuses it"),
    }
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        _ => Err("KVM_SET_MSRS refuses the value KVM_GET_MSRS returned"),
    }
}

/// PVM provides /dev/kvm through the `kvm_pvm` module; otherwise the CPU flags tell VMX from SVM.
fn detect_virtualization() -> Virtualization {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Virtualization::Pvm;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify_cpu_flags(&cpuinfo)
}

fn classify_cpu_flags(cpuinfo: &str) -> Virtualization {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    if has("vmx") {
        Virtualization::HardwareVmx
    } else if has("svm") {
        Virtualization::HardwareSvm
    } else {
        Virtualization::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_are_classified() {
        assert_eq!(
            classify_cpu_flags("processor: 0\nflags\t: fpu vme vmx sse\n"),
            Virtualization::HardwareVmx
        );
        assert_eq!(
            classify_cpu_flags("flags\t: fpu svm sse\n"),
            Virtualization::HardwareSvm
        );
        assert_eq!(
            classify_cpu_flags("flags\t: fpu svmx\n"),
            Virtualization::Unknown
        );
        assert_eq!(classify_cpu_flags(""), Virtualization::Unknown);
    }

    #[test]
    fn a_missing_device_is_a_typed_error() {
        let err = Hypervisor::open_path(Path::new("/nonexistent/kvm")).unwrap_err();
        match err {
            Error::KvmUnavailable { kind, .. } => assert_eq!(kind, KvmUnavailable::Missing),
            other => panic!("unexpected error {other}"),
        }
    }
}

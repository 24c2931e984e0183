//! The MSR values a vCPU boots Linux with (as Firecracker and Cloud Hypervisor set them).
//!
//! | MSR | value | why |
//! |---|---|---|
//! | `IA32_SYSENTER_CS/ESP/EIP` | 0 | no fast system calls until the kernel sets them |
//! | `STAR`, `LSTAR`, `CSTAR`, `SYSCALL_MASK` | 0 | same, for `syscall` |
//! | `KERNEL_GS_BASE` | 0 | |
//! | `IA32_TSC` | 0 | every vCPU's TSC starts together |
//! | `IA32_MISC_ENABLE` | fast strings (bit 0) | `rep movs` may use fast strings |
//! | `MTRRdefType` | enabled, default type write-back (`(1 << 11) \| 6`) | all RAM cacheable; without it Linux sees uncached memory |

use kvm_bindings::{kvm_msr_entry, Msrs};

use crate::error::{Error, Result};
use crate::vcpu::Vcpu;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SYSCALL_MASK` (`FMASK`).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast-string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MTRRdefType` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 6;

/// The boot MSRs, in the order they are written.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Writes [`boot_msrs`] into `vcpu`; an MSR KVM refuses is an [`Error::MsrsIncomplete`].
pub fn set_boot_msrs(vcpu: &Vcpu) -> Result<()> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::InvalidConfig(format!("building the MSR list: {e:?}")))?;
    let done = vcpu
        .fd()
        .set_msrs(&msrs)
        .map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
    if done != entries.len() {
        return Err(Error::MsrsIncomplete {
            op: "KVM_SET_MSRS",
            index: entries.get(done).map_or(0, |e| e.index),
            done,
            total: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_values() {
        let msrs = boot_msrs();
        let value = |index| msrs.iter().find(|e| e.index == index).map(|e| e.data);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(value(MSR_IA32_MISC_ENABLE), Some(1));
        for index in [
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
            MSR_IA32_SYSENTER_CS,
        ] {
            assert_eq!(value(index), Some(0), "{index:#x}");
        }
    }
}

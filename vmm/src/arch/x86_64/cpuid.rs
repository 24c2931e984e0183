//! The CPUID a Linux guest sees: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), with the
//! topology made to describe this VM and a few leaves fixed so they do not confuse the guest.
//!
//! What [`normalize`] changes, per vCPU:
//!
//! | leaf | change | why |
//! |---|---|---|
//! | `0x1` | `EBX[31:24]` = APIC ID, `EBX[23:16]` = vCPU count, `EBX[15:8]` = 8 (64-byte `clflush`), `ECX.31` hypervisor = 1, `EDX.28` HTT = (vCPUs > 1) | KVM leaves the host's values or zeros |
//! | `0x4` | `EAX[31:26]` = vCPUs − 1, `EAX[25:14]` = 0 (no cache shared between threads) | one core per vCPU, one package |
//! | `0x6` | zeroed | no thermal/power management in a VM |
//! | `0xa` | zeroed | no virtual PMU (perf events would trap) |
//! | `0xb`, `0x1f` | subleaf 0: SMT level (1 thread), subleaf 1: core level (vCPU count), `EDX` = x2APIC ID | the guest's topology, not the host's |
//! | `0x4000_0000` | `EAX` ≥ `0x4000_0001`, signature `"KVMKVMKVM\0\0\0"` | the KVM paravirtual interface (kvmclock) |
//! | `0x4000_0001` | KVM's feature bits, added if missing | |
//! | `0x8000_0008` | `ECX[7:0]` = vCPUs − 1, `ECX[15:12]` = APIC ID bits | AMD core count |
//! | `0x8000_001e` | `EAX` = APIC ID, `EBX` = core ID, `ECX` = node 0 | AMD extended APIC ID |
//!
//! Everything else is KVM's.
//!
//! Open: with this CPUID a Linux guest keeps a periodic tick. Leaf 6 is zeroed, ARAT with it
//! (KVM offers `EAX.2`), and KVM does not list the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`
//! says it emulates one; QEMU and Firecracker set leaf 1 `ECX.24` themselves), so the kernel
//! finds no oneshot timer it may keep through idle: in the nested harness `/proc/timer_list`
//! shows the LAPIC in periodic mode (`tick_handle_periodic`), 250 timer interrupts a second
//! even when idle, and no high-resolution timers. Giving both was tried (2026-12-02) and
//! withdrawn: in the next full nested run three guests died (a boot reset 1.6 s in, two
//! capsules stopped mid-test), where the run before had none. Whether that is TCG's nested
//! timer emulation or a real fault needs a hardware-virtualization host to tell.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 `ECX` bit 31: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 `EDX` bit 28: more than one logical processor per package.
pub const EDX_HTT: u32 = 1 << 28;
/// The KVM paravirtual signature leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The KVM paravirtual feature leaf.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// `"KVMKVMKVM\0\0\0"` as `EBX`, `ECX`, `EDX`.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x4d];

/// Bits needed to hold APIC IDs `0..count` (at least 0).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn entry_mut(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    entries.iter_mut().filter(move |e| e.function == function)
}

/// Makes `entries` (from `KVM_GET_SUPPORTED_CPUID`) the CPUID of vCPU `apic_id` in a VM with
/// `vcpu_count` vCPUs. See the [module docs](self) for each change.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, apic_id: u32, vcpu_count: u32) {
    let count = vcpu_count.max(1);
    for e in entry_mut(entries, 0x1) {
        e.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
        e.ecx |= ECX_HYPERVISOR;
        if count > 1 {
            e.edx |= EDX_HTT;
        } else {
            e.edx &= !EDX_HTT;
        }
    }
    for e in entry_mut(entries, 0x4) {
        e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
    }
    for leaf in [0x6, 0xa] {
        for e in entry_mut(entries, leaf) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
    }
    let core_shift = id_bits(count);
    for leaf in [0xb, 0x1f] {
        for e in entry_mut(entries, leaf) {
            e.edx = apic_id;
            match e.index {
                // SMT level: one thread per core.
                0 => (e.eax, e.ebx, e.ecx) = (0, 1, 1 << 8),
                // Core level: every vCPU in one package.
                1 => (e.eax, e.ebx, e.ecx) = (core_shift, count, (2 << 8) | 1),
                index => (e.eax, e.ebx, e.ecx) = (0, 0, index),
            }
        }
    }
    for e in entry_mut(entries, 0x8000_0008) {
        e.ecx = (e.ecx & !0xf0ff) | (core_shift.max(1) << 12) | (count - 1);
    }
    for e in entry_mut(entries, 0x8000_001e) {
        e.eax = apic_id;
        e.ebx = apic_id & 0xff;
        e.ecx = 0;
    }
    ensure_kvm_leaves(entries);
}

/// Makes sure the KVM signature and feature leaves are present and correct (KVM reports them,
/// but a table built elsewhere might not have them).
fn ensure_kvm_leaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    let [ebx, ecx, edx] = KVM_SIGNATURE;
    match entries
        .iter_mut()
        .find(|e| e.function == KVM_SIGNATURE_LEAF)
    {
        Some(e) => {
            e.eax = e.eax.max(KVM_FEATURES_LEAF);
            (e.ebx, e.ecx, e.edx) = (ebx, ecx, edx);
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: KVM_FEATURES_LEAF,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }),
    }
    if !entries.iter().any(|e| e.function == KVM_FEATURES_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_FEATURES_LEAF,
            // kvmclock (both MSR sets), NOP io delay, clocksource stable.
            eax: (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24),
            ..Default::default()
        });
    }
}

/// Looks up `(function, index)`; `index` only matters for leaves KVM marks as indexed.
pub fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, indexed: bool) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: 0xdead,
            ebx: 0xbeef_0000,
            ecx: 0x1,
            edx: EDX_HTT,
            ..Default::default()
        }
    }

    fn synthetic() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x0, 0, false),
            entry(0x1, 0, false),
            entry(0x4, 0, true),
            entry(0x4, 1, true),
            entry(0xa, 0, false),
            entry(0xb, 0, true),
            entry(0xb, 1, true),
            entry(0xb, 2, true),
            entry(0x8000_0008, 0, false),
        ]
    }

    #[test]
    fn apic_ids_and_counts_describe_this_vm() {
        for (apic_id, count) in [(0, 1), (3, 4), (5, 6)] {
            let mut t = synthetic();
            normalize(&mut t, apic_id, count);
            let leaf1 = find(&t, 1, 0).unwrap();
            assert_eq!(leaf1.ebx >> 24, apic_id);
            assert_eq!((leaf1.ebx >> 16) & 0xff, count);
            assert_eq!(leaf1.ecx & ECX_HYPERVISOR, ECX_HYPERVISOR);
            assert_eq!(leaf1.ecx & 1, 1, "other feature bits are kept");
            assert_eq!(leaf1.edx & EDX_HTT != 0, count > 1);
            let smt = find(&t, 0xb, 0).unwrap();
            assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, apic_id));
            let core = find(&t, 0xb, 1).unwrap();
            assert_eq!((core.ebx, core.ecx >> 8, core.edx), (count, 2, apic_id));
            assert!(1u32 << core.eax >= count, "the shift covers every APIC ID");
            let end = find(&t, 0xb, 2).unwrap();
            assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0), "level 2 is invalid");
            for e in t.iter().filter(|e| e.function == 4) {
                assert_eq!(e.eax >> 26, count - 1);
                assert_eq!((e.eax >> 14) & 0xfff, 0);
            }
            assert_eq!(find(&t, 0x8000_0008, 0).unwrap().ecx & 0xff, count - 1);
        }
    }

    #[test]
    fn pmu_is_hidden() {
        let mut t = synthetic();
        normalize(&mut t, 0, 1);
        let pmu = find(&t, 0xa, 0).unwrap();
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }

    #[test]
    fn kvm_leaves_are_added_with_the_signature() {
        let mut t = synthetic();
        normalize(&mut t, 0, 2);
        let sig = find(&t, KVM_SIGNATURE_LEAF, 0).unwrap();
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert!(sig.eax >= KVM_FEATURES_LEAF);
        assert_ne!(
            find(&t, KVM_FEATURES_LEAF, 0).unwrap().eax & 1,
            0,
            "kvmclock"
        );
        // Idempotent.
        let before = t.clone();
        normalize(&mut t, 0, 2);
        assert_eq!(t, before);
    }

    #[test]
    fn id_bits_cover_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}

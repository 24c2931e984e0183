//! Saving and restoring everything KVM keeps about a vCPU, as a plain serde struct
//! ([`VcpuState`]) that a snapshotter can write anywhere and restore in another process.
//!
//! # What is saved
//!
//! | field | ioctl | present |
//! |---|---|---|
//! | [`VcpuState::cpuid`] | `KVM_GET_CPUID2` | always (empty when the VMM never set a CPUID, as for the probe) |
//! | [`VcpuState::mp_state`] | `KVM_GET_MP_STATE` | always |
//! | [`VcpuState::regs`] | `KVM_GET_REGS` | always |
//! | [`VcpuState::sregs`] | `KVM_GET_SREGS` | always |
//! | [`VcpuState::fpu`] | `KVM_GET_FPU` | always |
//! | [`VcpuState::xsave`] | `KVM_GET_XSAVE`, or `KVM_GET_XSAVE2` when `KVM_CAP_XSAVE2` is over 4 KiB | when the host has `KVM_CAP_XSAVE` |
//! | [`VcpuState::xcrs`] | `KVM_GET_XCRS` | when the host has `KVM_CAP_XCRS` |
//! | [`VcpuState::debug_regs`] | `KVM_GET_DEBUGREGS` | always |
//! | [`VcpuState::lapic`] | `KVM_GET_LAPIC` | when the VM has an in-kernel irqchip ([`crate::vm::VmOptions::irqchip`]) |
//! | [`VcpuState::msrs`] | `KVM_GET_MSRS` | the MSRs of [`crate::Hypervisor::msrs_to_save`] |
//! | [`VcpuState::vcpu_events`] | `KVM_GET_VCPU_EVENTS` | always |
//! | [`VcpuState::tsc_khz`] | `KVM_GET_TSC_KHZ` | when the host has `KVM_CAP_GET_TSC_KHZ` and a stable TSC |
//!
//! Not saved: nested virtualization state (capsule guests never run a hypervisor) and
//! `KVM_GET_SREGS2` (only the PDPTRs of 32-bit PAE paging differ from `KVM_GET_SREGS`; capsule
//! guests run in long mode).
//!
//! A field the host cannot provide is an `Option` recorded as `None`; an ioctl that fails for any
//! other reason is an [`Error::Kvm`]: state that exists is never dropped silently. Restoring a
//! state into a vCPU that cannot take it (a LAPIC into a VM without irqchip, or the other way
//! round; an XSAVE area on a host without XSAVE) is an [`Error::IncompatibleState`]; an MSR KVM
//! refuses is an [`Error::MsrsIncomplete`] naming it.
//!
//! # Save and restore order
//!
//! Saving follows Firecracker: `KVM_GET_MP_STATE` first, because it makes KVM accept pending
//! INIT/SIPI events into the vCPU and LAPIC state the later reads return; `KVM_GET_VCPU_EVENTS`
//! last, because the other reads may still change the pending-event state it reports.
//!
//! Restoring (see [`Vcpu::restore_state`] for each step's reason): TSC frequency, CPUID, MP
//! state, regs, sregs, FPU (only without XSAVE), XSAVE, XCRs, debug registers, LAPIC, MSRs, vCPU
//! events.
//!
//! # The vCPU must be quiescent
//!
//! Save only a vCPU that is not inside [`Vcpu::run`] (and restore only into one), and only
//! after its last exit is complete: KVM finishes a port I/O or MMIO exit (advancing `rip` past
//! the `out`) on the next `KVM_RUN`, so after a [`crate::VcpuEvent::Yield`] call
//! [`Vcpu::complete_pending_exit`] first ([`Vcpu::save_state`] refuses with
//! [`Error::ExitNotCompleted`] otherwise). `KVM_GET/SET_VCPU_EVENTS` are also unsafe while other
//! vCPUs of the VM run, so pause all of them before saving any.
//!
//! # PVM (measured on the development host, `kvm_pvm`)
//!
//! Every ioctl above works. `KVM_CAP_XSAVE2` is 4096 (so plain `KVM_GET_XSAVE` is used),
//! `KVM_CAP_TSC_CONTROL` is 0 (restoring a different TSC frequency fails, the same one works),
//! `KVM_GET_TSC_KHZ` works. `KVM_GET_MSR_INDEX_LIST` reports 40 MSRs and `KVM_GET_MSRS` reads
//! all of them; without an in-kernel irqchip `KVM_SET_MSRS` refuses `MSR_KVM_ASYNC_PF_INT`
//! (0x4b564d06) even with the value it just read (KVM requires an in-kernel LAPIC for it), so
//! [`crate::Hypervisor::msrs_to_save`] leaves it out for such VMs (it can hold no state there).
//! `KVM_GET_LAPIC` fails with `EINVAL` without an irqchip, as on hardware KVM. PVM emulates the
//! guest's `out`, so `rip` is already past it at the exit ([`Vcpu::complete_pending_exit`] is
//! then a cheap no-op `KVM_RUN`); hardware KVM advances it only on the next `KVM_RUN`.
//!
//! # Cost (measured on PVM, `cargo run --release --example state_timing`)
//!
//! Every vCPU ioctl costs ~5 us there (VM ioctls ~0.3 us). Medians per vCPU, without / with an
//! in-kernel irqchip: [`Vcpu::save_state`] 59 / 65 us (12 / 13 ioctls), [`Vcpu::restore_state`]
//! into a fresh vCPU 50 / 75 us (10 / 11 ioctls), [`Vcpu::complete_pending_exit`] 6 us;
//! [`crate::Vm::save_state`] 0.3 / 1.5 us and [`crate::Vm::restore_state`] 1 / 9 us.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, VmFd};
use serde::{Deserialize, Serialize};

use super::Vcpu;
use crate::error::{Error, Result};

/// Bytes in the legacy `struct kvm_xsave` (`KVM_GET_XSAVE`).
const LEGACY_XSAVE_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// 32-bit words in the legacy `struct kvm_xsave`.
const LEGACY_XSAVE_WORDS: usize = LEGACY_XSAVE_SIZE / 4;

/// Everything KVM keeps about one vCPU. See the [module docs](self) for what each field holds
/// and when an `Option` is `None`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VcpuState {
    /// The guest's CPUID table as the VMM set it (`KVM_GET_CPUID2`); empty if it never did.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, `rip` and `rflags`.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base and a pending
    /// interrupt.
    pub sregs: kvm_sregs,
    /// x87 and SSE state (`KVM_GET_FPU`). A subset of [`VcpuState::xsave`] when that is present.
    #[serde(with = "FpuDef")]
    pub fpu: kvm_fpu,
    /// The XSAVE area as 32-bit words: 1024 for `KVM_GET_XSAVE`, more when the host's
    /// `KVM_CAP_XSAVE2` size is larger (AMX). `None` when the host has no `KVM_CAP_XSAVE`.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (XCR0). `None` when the host has no `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers; present exactly when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// MSR values, in the order they are written back.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending and injected exceptions, interrupts, NMI and SMI, interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency in kHz. `None` when the host cannot report it (no
    /// `KVM_CAP_GET_TSC_KHZ`, or an unstable host TSC).
    pub tsc_khz: Option<u32>,
}

/// Serde mirror of `kvm_fpu`, which kvm-bindings does not make serializable.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct FpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// What the host's KVM offers for vCPU state, queried once per VM ([`VcpuCaps::query`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct VcpuCaps {
    /// Bytes of the XSAVE area `KVM_GET_XSAVE2` writes, at least 4096; `None` without
    /// `KVM_CAP_XSAVE`.
    pub xsave_size: Option<usize>,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub tsc_khz: bool,
    /// The VM has an in-kernel irqchip, so each vCPU has a LAPIC.
    pub irqchip: bool,
}

impl VcpuCaps {
    /// Asks the VM's KVM (three `KVM_CHECK_EXTENSION`s).
    pub(crate) fn query(fd: &VmFd, irqchip: bool) -> Self {
        let xsave_size = fd.check_extension(Cap::Xsave).then(|| {
            // KVM_CAP_XSAVE2 answers the whole area's size (0 on kernels before 5.17, which
            // only know the legacy 4 KiB struct).
            usize::try_from(fd.check_extension_int(Cap::Xsave2))
                .unwrap_or(0)
                .max(LEGACY_XSAVE_SIZE)
        });
        VcpuCaps {
            xsave_size,
            xcrs: fd.check_extension(Cap::Xcrs),
            tsc_khz: fd.check_extension(Cap::GetTscKhz),
            irqchip,
        }
    }
}

impl Vcpu {
    /// Reads every piece of this vCPU's state from KVM (about a dozen ioctls).
    ///
    /// `msrs` is the list of MSRs to save, normally
    /// [`Hypervisor::msrs_to_save`](crate::Hypervisor::msrs_to_save) for the VM's irqchip
    /// setting. The vCPU must not be running, and its last exit must be complete (see the
    /// [module docs](self)).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState> {
        if self.exit_pending {
            return Err(Error::ExitNotCompleted);
        }
        // KVM_GET_MP_STATE first: it lets KVM accept pending INIT/SIPI events, which changes
        // the vCPU and LAPIC state read below.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|e| Error::kvm("KVM_GET_MP_STATE", e))?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self
            .fd
            .get_fpu()
            .map_err(|e| Error::kvm("KVM_GET_FPU", e))?;
        let xsave = self.save_xsave()?;
        let xcrs = if self.caps.xcrs {
            Some(
                self.fd
                    .get_xcrs()
                    .map_err(|e| Error::kvm("KVM_GET_XCRS", e))?,
            )
        } else {
            None
        };
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(|e| Error::kvm("KVM_GET_DEBUGREGS", e))?;
        let lapic = if self.caps.irqchip {
            Some(
                self.fd
                    .get_lapic()
                    .map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?,
            )
        } else {
            None
        };
        let tsc_khz = self.save_tsc_khz();
        let cpuid = self.save_cpuid()?;
        let msrs = self.save_msrs(msrs)?;
        // KVM_GET_VCPU_EVENTS last: the reads above may still change pending-event state.
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| Error::kvm("KVM_GET_VCPU_EVENTS", e))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Writes `state` into this vCPU, which should be freshly created in a VM built like the
    /// saved one (same irqchip setting) and must not be running.
    ///
    /// On error the vCPU is left partly restored; discard it.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        // Refuse what cannot fit before changing anything.
        if state.lapic.is_some() != self.caps.irqchip {
            return Err(Error::IncompatibleState(format!(
                "the state {} a LAPIC but the VM {} an in-kernel irqchip",
                if state.lapic.is_some() {
                    "has"
                } else {
                    "lacks"
                },
                if self.caps.irqchip { "has" } else { "lacks" },
            )));
        }
        if state.xsave.is_some() && self.caps.xsave_size.is_none() {
            return Err(Error::IncompatibleState(
                "the state has an XSAVE area but this host has no KVM_CAP_XSAVE".into(),
            ));
        }
        if state.xcrs.is_some() && !self.caps.xcrs {
            return Err(Error::IncompatibleState(
                "the state has XCRs but this host has no KVM_CAP_XCRS".into(),
            ));
        }

        // The TSC frequency first: KVM converts the MSR_IA32_TSC value written below with it.
        if let Some(khz) = state.tsc_khz {
            self.fd
                .set_tsc_khz(khz)
                .map_err(|e| Error::kvm("KVM_SET_TSC_KHZ", e))?;
        }
        // CPUID before the rest: KVM checks XCR0, XSAVE features and some MSRs against it. An
        // empty table is what a fresh vCPU has already.
        if !state.cpuid.is_empty() {
            let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| {
                Error::IncompatibleState(format!("{} CPUID entries: {e:?}", state.cpuid.len()))
            })?;
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| Error::kvm("KVM_SET_MP_STATE", e))?;
        // KVM_SET_REGS clears pending exceptions, so it must precede KVM_SET_VCPU_EVENTS, which
        // restores them.
        self.set_regs(&state.regs)?;
        // KVM_SET_SREGS restores the APIC base, so it must precede KVM_SET_LAPIC.
        self.set_sregs(&state.sregs)?;
        match &state.xsave {
            // The XSAVE area holds the same x87/SSE state as kvm_fpu (its legacy region) and
            // KVM_SET_XSAVE overwrites all of it, so KVM_SET_FPU would be wasted.
            Some(words) => self.restore_xsave(words)?,
            None => self
                .fd
                .set_fpu(&state.fpu)
                .map_err(|e| Error::kvm("KVM_SET_FPU", e))?,
        }
        // XCR0 after XSAVE, as Firecracker and QEMU do.
        if let Some(xcrs) = &state.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(|e| Error::kvm("KVM_SET_XCRS", e))?;
        }
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(|e| Error::kvm("KVM_SET_DEBUGREGS", e))?;
        // KVM_SET_LAPIC before KVM_SET_MSRS: MSR_IA32_TSC_DEADLINE is only accepted once the
        // LAPIC is configured.
        if let Some(lapic) = &state.lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))?;
        }
        self.restore_msrs(&state.msrs)?;
        // Last: the ioctls above may clear or change pending events.
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(|e| Error::kvm("KVM_SET_VCPU_EVENTS", e))?;
        Ok(())
    }

    /// Sets the guest's MXCSR. `KVM_SET_FPU` does not carry MXCSR on every kernel (6.1 leaves
    /// it 0), so it goes through the XSAVE area's legacy region (word 6) where XSAVE exists.
    pub(crate) fn set_mxcsr(&self, mxcsr: u32) -> Result<()> {
        /// MXCSR's position in the legacy FXSAVE region, in 32-bit words (byte offset 24).
        const MXCSR_WORD: usize = 6;
        let Some(mut words) = self.save_xsave()? else {
            return Ok(());
        };
        if let Some(word) = words.get_mut(MXCSR_WORD) {
            *word = mxcsr;
        }
        self.restore_xsave(&words)
    }

    fn save_xsave(&self) -> Result<Option<Vec<u32>>> {
        let Some(size) = self.caps.xsave_size else {
            return Ok(None);
        };
        if size <= LEGACY_XSAVE_SIZE {
            let xsave = self
                .fd
                .get_xsave()
                .map_err(|e| Error::kvm("KVM_GET_XSAVE", e))?;
            return Ok(Some(xsave.region.to_vec()));
        }
        let mut xsave = xsave_buffer(size.div_ceil(4))?;
        // SAFETY: `xsave` holds `size` bytes, KVM_CAP_XSAVE2 as the VM reported it when this
        // vCPU was created, which is the most KVM_GET_XSAVE2 writes. (It could only grow if the
        // process asked for more XSTATE permission with arch_prctl afterwards; this crate never
        // does.)
        unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(|e| Error::kvm("KVM_GET_XSAVE2", e))?;
        let area = xsave.as_fam_struct_ref();
        let mut words = area.xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(Some(words))
    }

    fn restore_xsave(&self, words: &[u32]) -> Result<()> {
        let host_size = self.caps.xsave_size.unwrap_or(LEGACY_XSAVE_SIZE);
        if words.len() < LEGACY_XSAVE_WORDS {
            return Err(Error::IncompatibleState(format!(
                "XSAVE area of {} words, less than the {LEGACY_XSAVE_WORDS} of struct kvm_xsave",
                words.len()
            )));
        }
        // At least as large as KVM reads (the host's size) and as the saved area; KVM checks
        // the XSAVE header, so components this host does not have are refused, not dropped.
        let total_words = words.len().max(host_size.div_ceil(4));
        if total_words == LEGACY_XSAVE_WORDS {
            let mut xsave = kvm_xsave::default();
            xsave.region.copy_from_slice(words);
            // SAFETY: the host's XSAVE size (KVM_CAP_XSAVE2, see save_xsave) is 4096 bytes, the
            // size of `xsave`, so KVM_SET_XSAVE reads nothing beyond it.
            return unsafe { self.fd.set_xsave(&xsave) }
                .map_err(|e| Error::kvm("KVM_SET_XSAVE", e));
        }
        let mut xsave = xsave_buffer(total_words)?;
        let (region, extra) = words.split_at(LEGACY_XSAVE_WORDS);
        // SAFETY: only the fixed `region` is written, never the FAM length `len`.
        unsafe { xsave.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(region);
        xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
        // SAFETY: `xsave` holds `total_words` words, at least the host's KVM_CAP_XSAVE2 size,
        // the most KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(|e| Error::kvm("KVM_SET_XSAVE", e))
    }

    fn save_tsc_khz(&self) -> Option<u32> {
        if !self.caps.tsc_khz {
            return None;
        }
        match self.fd.get_tsc_khz() {
            Ok(khz) => Some(khz),
            Err(_) => {
                // KVM has no frequency to report (an unstable host TSC): nothing to save.
                // (kvm-ioctls loses the errno here, so it is not logged.)
                tracing::warn!(
                    vcpu = self.index,
                    "KVM_GET_TSC_KHZ failed: no TSC frequency saved; the state can only be \
                     restored on a host with the same TSC frequency"
                );
                None
            }
        }
    }

    fn save_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("KVM_GET_CPUID2", e))?;
        Ok(cpuid.as_slice().to_vec())
    }

    fn save_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
        let mut out = Vec::with_capacity(indices.len());
        for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = msr_buffer(&entries)?;
            let done = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| Error::kvm("KVM_GET_MSRS", e))?;
            if done != chunk.len() {
                return Err(Error::MsrsIncomplete {
                    op: "KVM_GET_MSRS",
                    index: chunk.get(done).copied().unwrap_or_default(),
                    done: out.len() + done,
                    total: indices.len(),
                });
            }
            out.extend_from_slice(msrs.as_slice());
        }
        Ok(out)
    }

    fn restore_msrs(&self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut written = 0;
        for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = msr_buffer(chunk)?;
            let done = self
                .fd
                .set_msrs(&msrs)
                .map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
            if done != chunk.len() {
                return Err(Error::MsrsIncomplete {
                    op: "KVM_SET_MSRS",
                    index: chunk.get(done).map(|m| m.index).unwrap_or_default(),
                    done: written + done,
                    total: entries.len(),
                });
            }
            written += done;
        }
        Ok(())
    }
}

fn msr_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries)
        .map_err(|e| Error::InvalidConfig(format!("{} MSR entries: {e:?}", entries.len())))
}

/// An `Xsave` buffer of `words` 32-bit words in all (the legacy struct plus the rest).
fn xsave_buffer(words: usize) -> Result<Xsave> {
    Xsave::new(words.saturating_sub(LEGACY_XSAVE_WORDS))
        .map_err(|e| Error::IncompatibleState(format!("XSAVE area of {words} words: {e:?}")))
}

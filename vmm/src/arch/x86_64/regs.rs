//! The boot CPU's registers for the two ways a Linux kernel is entered, and the GDT and page
//! tables they point at.
//!
//! | | PVH ([`BootProtocol::Pvh`]) | 64-bit Linux boot protocol ([`BootProtocol::Linux64`]) |
//! |---|---|---|
//! | mode | 32-bit protected mode, paging off | long mode, identity-mapped 0–4 GiB (2 MiB pages) |
//! | `cs` | flat 32-bit code, selector `0x08` | flat 64-bit code, selector `0x10` (`__BOOT_CS`) |
//! | `ds es fs gs ss` | flat data, `0x18` | flat data, `0x18` (`__BOOT_DS`) |
//! | `tr` | 32-bit TSS, base 0, limit `0x67`, selector `0x20` | same |
//! | `cr0` / `cr4` / `efer` | `PE ET` / 0 / 0 | `PE ET PG` / `PAE` / `LME LMA` |
//! | argument | `rbx` = `hvm_start_info` | `rsi` = `boot_params` |
//! | `rflags` | `0x2` (interrupts off) | `0x2` |
//!
//! The FPU starts as after `FNINIT` (`fcw` `0x37f`) with `mxcsr` `0x1f80`, for both.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_STACK_POINTER, GDT_ENTRIES, GDT_START, GIB, PDPT_START, PD_PAGES, PD_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BootProtocol {
    /// Xen's PVH direct boot, as used for an ELF `vmlinux` with the `XEN_ELFNOTE_PHYS32_ENTRY`
    /// note: 32-bit protected mode, `rbx` = `hvm_start_info`.
    Pvh,
    /// The Linux 64-bit boot protocol (`Documentation/arch/x86/boot.rst`): long mode,
    /// `rsi` = `boot_params`.
    Linux64,
}

/// The boot GDT, written at [`GDT_START`]: null, 32-bit code (`0x08`), 64-bit code (`0x10`),
/// data (`0x18`), 32-bit TSS (`0x20`). All flat (base 0, limit 4 GiB), DPL 0.
pub const GDT: [u64; GDT_ENTRIES] = [
    0,
    0x00cf_9b00_0000_ffff, // code 32: G, D, present, execute/read, accessed
    0x00af_9b00_0000_ffff, // code 64: G, L, present, execute/read, accessed
    0x00cf_9300_0000_ffff, // data: G, B, present, read/write, accessed
    0x0000_8b00_0000_0067, // TSS: present, busy 32-bit TSS, base 0, limit 0x67
];
/// Selector of the 32-bit code segment (PVH).
pub const CODE32_SELECTOR: u16 = 1 << 3;
/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const CODE64_SELECTOR: u16 = 2 << 3;
/// Selector of the data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 3 << 3;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 4 << 3;

use super::bits::{
    CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, PTE_HUGE, PTE_PRESENT, PTE_WRITABLE,
    RFLAGS_RESERVED,
};

const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

fn write(memory: &GuestMemory, bytes: &[u8], at: u64) -> Result<()> {
    memory
        .write_slice(bytes, GuestAddress(at))
        .map_err(|e| Error::Memory(format!("writing boot tables at {at:#x}: {e}")))
}

/// Writes [`GDT`] at [`GDT_START`].
pub fn write_gdt(memory: &GuestMemory) -> Result<()> {
    let bytes: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(memory, &bytes, GDT_START)
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages (PML4 at
/// [`PML4_START`], PDPT at [`PDPT_START`], [`PD_PAGES`] page directories at [`PD_START`]), as
/// the 64-bit boot protocol requires for the kernel, `boot_params`, command line and initramfs.
pub fn write_page_tables(memory: &GuestMemory) -> Result<()> {
    let table = PTE_PRESENT | PTE_WRITABLE;
    write(memory, &(PDPT_START | table).to_le_bytes(), PML4_START)?;
    let pdpt: Vec<u8> = (0..PD_PAGES)
        .flat_map(|i| ((PD_START + i * PAGE) | table).to_le_bytes())
        .collect();
    write(memory, &pdpt, PDPT_START)?;
    let pd: Vec<u8> = (0..PD_PAGES * GIB / HUGE_PAGE)
        .flat_map(|i| ((i * HUGE_PAGE) | table | PTE_HUGE).to_le_bytes())
        .collect();
    write(memory, &pd, PD_START)
}

/// The `kvm_segment` a GDT descriptor loads (what the CPU would cache after loading
/// `selector`).
pub fn segment_from_descriptor(descriptor: u64, selector: u16) -> kvm_segment {
    let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
    let raw_limit = (descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16);
    let g = ((descriptor >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((descriptor >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn gdt_segment(selector: u16) -> kvm_segment {
    segment_from_descriptor(GDT[usize::from(selector >> 3)], selector)
}

/// Segment, control and table registers to enter the kernel with `protocol`, starting from the
/// vCPU's current `sregs` (which keep KVM's APIC base and the like). Needs [`write_gdt`] (and,
/// for [`BootProtocol::Linux64`], [`write_page_tables`]) in guest memory.
pub fn sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let data = gdt_segment(DATA_SELECTOR);
    sregs.cs = gdt_segment(match protocol {
        BootProtocol::Pvh => CODE32_SELECTOR,
        BootProtocol::Linux64 => CODE64_SELECTOR,
    });
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt_segment(TSS_SELECTOR);
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers to enter the kernel at `entry` with `protocol`: `rbx` points at the
/// `hvm_start_info` ([`PVH_INFO_START`]) for PVH, `rsi` at `boot_params`
/// ([`ZERO_PAGE_START`]) for the 64-bit protocol; interrupts off.
pub fn regs(entry: u64, protocol: BootProtocol) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
        BootProtocol::Linux64 => {
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// The FPU as `FNINIT` leaves it, with SSE exceptions masked.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_anonymous;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let code32 = gdt_segment(CODE32_SELECTOR);
        assert_eq!((code32.base, code32.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code32.db, code32.l, code32.type_, code32.s),
            (1, 0, 0xb, 1)
        );
        let code64 = gdt_segment(CODE64_SELECTOR);
        assert_eq!((code64.db, code64.l, code64.present), (0, 1, 1));
        let data = gdt_segment(DATA_SELECTOR);
        assert_eq!((data.type_, data.db, data.limit), (0x3, 1, 0xffff_ffff));
        let tss = gdt_segment(TSS_SELECTOR);
        assert_eq!((tss.base, tss.limit, tss.type_, tss.s), (0, 0x67, 0xb, 0));
        assert_eq!(gdt_segment(0).unusable, 1);
    }

    #[test]
    fn pvh_enters_protected_mode_without_paging() {
        let s = sregs(kvm_sregs::default(), BootProtocol::Pvh);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(s.cs.selector, CODE32_SELECTOR);
        assert_eq!((s.cs.db, s.cs.l), (1, 0));
        for seg in [s.ds, s.es, s.ss] {
            assert_eq!(
                (seg.selector, seg.base, seg.limit),
                (DATA_SELECTOR, 0, 0xffff_ffff)
            );
        }
        assert_eq!((s.tr.base, s.tr.limit), (0, 0x67));
        assert_eq!(s.gdt.base, GDT_START);
        assert_eq!(s.gdt.limit, 39);
        let r = regs(0x100_0000, BootProtocol::Pvh);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
    }

    #[test]
    fn linux64_enters_long_mode_with_boot_params_in_rsi() {
        let current = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let s = sregs(current, BootProtocol::Linux64);
        assert_eq!(s.apic_base, 0xfee0_0900, "KVM's APIC base is kept");
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, 0x10, "__BOOT_CS");
        assert_eq!(s.ds.selector, 0x18, "__BOOT_DS");
        assert_eq!(s.cs.l, 1);
        let r = regs(0x10_0200, BootProtocol::Linux64);
        assert_eq!((r.rip, r.rsi), (0x10_0200, ZERO_PAGE_START));
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts off");
        assert_eq!(r.rsp, BOOT_STACK_POINTER);
    }

    #[test]
    fn fpu_is_reset() {
        let f = fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn tables_identity_map_4_gib() {
        let mem = create_anonymous(1 << 20).unwrap();
        write_gdt(&mem).unwrap();
        write_page_tables(&mem).unwrap();
        let d: u64 = mem
            .read_obj(GuestAddress(GDT_START + u64::from(CODE64_SELECTOR)))
            .unwrap();
        assert_eq!(d, GDT[2]);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        for i in 0..4 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_START + 8 * i)).unwrap();
            assert_eq!(pdpte, (PD_START + i * PAGE) | 3);
        }
        // The 2 MiB page holding 0xfee0_0000 maps to itself.
        let index = 0xfee0_0000 / HUGE_PAGE;
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 8 * index)).unwrap();
        assert_eq!(pde, 0xfee0_0000 | 0x83);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_START + PD_PAGES * PAGE - 8))
            .unwrap();
        assert_eq!(last, (4 * GIB - HUGE_PAGE) | 0x83);
    }
}

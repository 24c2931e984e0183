//! Entering a guest directly in 64-bit user mode.
//!
//! The host writes identity-mapped page tables (2 MiB pages, user-accessible), a GDT with
//! user-mode segments and a TSS into guest memory, then sets the vCPU's control and segment
//! registers so that its first instruction already runs at CPL 3 in long mode with IOPL 3
//! and an all-allowing TSS I/O bitmap (so `in`/`out` work) and interrupts off. No IDT: any fault the guest takes escalates to a
//! triple fault, which the run loop reports as [`crate::VcpuEvent::Shutdown`].

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;

use super::bits::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA,
    EFER_LME, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE, RFLAGS_RESERVED,
};

const RFLAGS_IOPL3: u64 = 3 << 12;
const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// GDT slots: 0 null, 1 kernel code, 2 kernel data, 3 user data, 4 user code 64, 5-6 TSS.
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // kernel code 64
    0x00cf_9300_0000_ffff, // kernel data
    0x00cf_f300_0000_ffff, // user data, DPL 3
    0x00af_fb00_0000_ffff, // user code 64, DPL 3
];
const USER_DATA_SELECTOR: u16 = (3 << 3) | 3;
const USER_CODE_SELECTOR: u16 = (4 << 3) | 3;
const TSS_SELECTOR: u16 = 5 << 3;
const GDT_BYTES: u64 = 7 * 8;
/// The TSS proper is 104 bytes; an I/O permission bitmap follows it (see [`write_tables`]).
const TSS_SIZE: usize = 104;
/// Ports `0..IO_BITMAP_PORTS` are allowed to user mode by the TSS I/O bitmap.
pub const IO_BITMAP_PORTS: usize = 0x1000;
/// The TSS limit covers the TSS, the bitmap and the all-ones byte that must end it.
const TSS_LIMIT: u32 = (TSS_SIZE + IO_BITMAP_PORTS / 8) as u32;

/// Where the host puts the structures it builds in guest memory. Each address must be
/// page-aligned and inside guest RAM; `pd` is followed by one page directory per GiB mapped.
#[derive(Debug, Clone, Copy)]
pub struct UserModeLayout {
    /// The GDT (56 bytes).
    pub gdt: u64,
    /// The TSS (104 bytes plus a 512-byte I/O bitmap).
    pub tss: u64,
    /// The PML4 table.
    pub pml4: u64,
    /// The page-directory-pointer table.
    pub pdpt: u64,
    /// The first page directory.
    pub pd: u64,
    /// How many page directories fit at `pd` (so the most GiB that can be mapped).
    pub max_pd_pages: u64,
}

/// Writes the page tables (identity map of `[0, mem_size)` rounded up to 2 MiB), the GDT and
/// the TSS into guest memory.
pub fn write_tables(memory: &GuestMemory, layout: &UserModeLayout, mem_size: u64) -> Result<()> {
    let huge_pages = mem_size.div_ceil(HUGE_PAGE);
    let pd_pages = mem_size.div_ceil(GIB);
    if pd_pages > layout.max_pd_pages || pd_pages > 512 {
        return Err(Error::InvalidConfig(format!(
            "{mem_size} bytes of guest memory need {pd_pages} page directories, the layout has room for {}",
            layout.max_pd_pages
        )));
    }
    let write = |bytes: &[u8], at: u64| {
        memory
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing boot tables at {at:#x}: {e}")))
    };
    let table_flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    write(&(layout.pdpt | table_flags).to_le_bytes(), layout.pml4)?;
    let pdpt: Vec<u8> = (0..pd_pages)
        .flat_map(|i| ((layout.pd + i * PAGE) | table_flags).to_le_bytes())
        .collect();
    write(&pdpt, layout.pdpt)?;
    let pd: Vec<u8> = (0..huge_pages)
        .flat_map(|i| ((i * HUGE_PAGE) | table_flags | PTE_HUGE).to_le_bytes())
        .collect();
    write(&pd, layout.pd)?;

    let mut gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    gdt.extend_from_slice(&tss_descriptor(layout.tss));
    write(&gdt, layout.gdt)?;
    // No stacks are needed (no interrupts). The I/O permission bitmap right after the TSS
    // allows user mode every port below IO_BITMAP_PORTS even where IOPL is not honoured (PVM
    // keeps IOPL 0 for guest user mode); its last byte must be all ones.
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    write(&tss, layout.tss)
}

/// The 16-byte system descriptor of an available 64-bit TSS at `base`.
fn tss_descriptor(base: u64) -> [u8; 16] {
    let limit = u64::from(TSS_LIMIT);
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, type 9: available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&low.to_le_bytes());
    out[8..].copy_from_slice(&high.to_le_bytes());
    out
}

fn segment(selector: u16, type_: u8, dpl: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Control, segment and table registers for 64-bit user mode, starting from the vCPU's
/// current `sregs` (which keep KVM's APIC base and the like).
pub fn sregs(mut sregs: kvm_sregs, layout: &UserModeLayout) -> kvm_sregs {
    let data = segment(USER_DATA_SELECTOR, 0x3, 3, false);
    sregs.cs = segment(USER_CODE_SELECTOR, 0xb, 3, true);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: layout.tss,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 0,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout.gdt;
    sregs.gdt.limit = (GDT_BYTES - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout.pml4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers to start at `entry` with stack `stack_top` and the first two System V
/// integer arguments (`rdi`, `rsi`).
pub fn regs(entry: u64, stack_top: u64, args: [u64; 2]) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: args[0],
        rsi: args[1],
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_anonymous;

    const LAYOUT: UserModeLayout = UserModeLayout {
        gdt: 0x1000,
        tss: 0x2000,
        pml4: 0x3000,
        pdpt: 0x4000,
        pd: 0x5000,
        max_pd_pages: 2,
    };

    #[test]
    fn tables_identity_map_memory() {
        let mem = create_anonymous(8 << 20).unwrap();
        write_tables(&mem, &LAYOUT, 8 << 20).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(pml4, 0x4000 | 7);
        let pdpt0: u64 = mem.read_obj(GuestAddress(0x4000)).unwrap();
        assert_eq!(pdpt0, 0x5000 | 7);
        for i in 0..4u64 {
            let pde: u64 = mem.read_obj(GuestAddress(0x5000 + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x87);
        }
        let unmapped: u64 = mem.read_obj(GuestAddress(0x5000 + 4 * 8)).unwrap();
        assert_eq!(unmapped, 0);
    }

    #[test]
    fn too_much_memory_for_the_layout_is_an_error() {
        let mem = create_anonymous(1 << 20).unwrap();
        assert!(write_tables(&mem, &LAYOUT, 3 * GIB).is_err());
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let d = tss_descriptor(0x1234_5678_9abc);
        let low = u64::from_le_bytes(d[..8].try_into().unwrap());
        assert_eq!(low & 0xffff, u64::from(TSS_LIMIT));
        assert_eq!((low >> 16) & 0xff_ffff, 0x78_9abc);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!(low >> 56, 0x56);
        assert_eq!(u64::from_le_bytes(d[8..].try_into().unwrap()), 0x1234);
    }

    #[test]
    fn registers_select_user_mode() {
        let s = sregs(kvm_sregs::default(), &LAYOUT);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector & 3, 3);
        assert_eq!(s.efer & EFER_LMA, EFER_LMA);
        let r = regs(0x100000, 0x184000, [1, 2]);
        assert_eq!((r.rflags >> 12) & 3, 3);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts stay off");
        assert_eq!((r.rdi, r.rsi), (1, 2));
    }
}

//! The guest-physical memory map of a Linux guest, and the port numbers the VMM's devices use.
//!
//! # Guest-physical memory
//!
//! | range | what | who writes it |
//! |---|---|---|
//! | `0x0000_0000..0x0000_0500` | real-mode IVT and BIOS data area: left zero | — |
//! | [`GDT_START`] `0x500` | boot GDT ([`GDT_ENTRIES`] 8-byte descriptors) | VMM ([`super::regs`]) |
//! | [`PVH_INFO_START`] `0x6000` | PVH `hvm_start_info` (56 bytes) | VMM ([`crate::boot`]) |
//! | [`PVH_MODLIST_START`] `0x6040` | PVH module list: one `hvm_modlist_entry` for the initramfs | VMM |
//! | [`PVH_MEMMAP_START`] `0x6100` | PVH memory map (`hvm_memmap_table_entry` × ≤ [`MAX_MEMMAP_ENTRIES`]) | VMM |
//! | [`ZERO_PAGE_START`] `0x7000` | Linux `boot_params` ("zero page", 4 KiB) | VMM |
//! | `0x8000..`[`BOOT_STACK_POINTER`] `0x8ff0` | boot stack (64-bit protocol) | guest |
//! | [`PML4_START`] `0x9000` | PML4 (64-bit protocol) | VMM |
//! | [`PDPT_START`] `0xa000` | PDPT | VMM |
//! | [`PD_START`] `0xb000..0xf000` | 4 page directories: identity map of 0–4 GiB with 2 MiB pages | VMM |
//! | [`CMDLINE_START`] `0x2_0000` | kernel command line, NUL-terminated (≤ [`CMDLINE_MAX_SIZE`]) | VMM |
//! | `0x2_0800..`[`EBDA_START`] `0x9_fc00` | free low RAM | guest |
//! | [`EBDA_START`] `0x9_fc00..0x10_0000` | not RAM (e820 reserved): EBDA, VGA hole, BIOS ROM area | — |
//! | [`ACPI_START`] `0xe_0000..0x10_0000` | ACPI: RSDP at [`RSDP_START`] (where a BIOS would put it), then XSDT, FADT, MADT, DSDT | VMM ([`super::acpi`]) |
//! | [`HIMEM_START`] `0x10_0000` | kernel: a bzImage's protected-mode part at `code32_start`; an ELF `vmlinux` at its `p_paddr` (16 MiB for Debian) | VMM (linux-loader) |
//! | `..`[`low_ram_end`] | RAM; the initramfs sits at its top, page-aligned | VMM |
//! | [`MMIO_GAP_START`] `0xc000_0000..4 GiB` | 32-bit MMIO gap: no RAM | — |
//! | [`VIRTIO_MMIO_START`] `0xd000_0000` | virtio-mmio devices, [`VIRTIO_MMIO_SLOT_SIZE`] each ([`virtio_mmio_slot`]) | device model |
//! | [`IOAPIC_START`] `0xfec0_0000` | IOAPIC (KVM in-kernel irqchip) | KVM |
//! | [`LAPIC_START`] `0xfee0_0000` | local APICs (KVM) | KVM |
//! | `0xfffb_d000..0xfffc_0000` | KVM's VMX real-mode TSS (`KVM_SET_TSS_ADDR`) | KVM |
//! | [`HIGH_RAM_START`] `4 GiB..` | RAM above the gap when the guest has more than [`MMIO_GAP_START`] bytes | guest |
//!
//! Everything the VMM writes below 1 MiB stays intact while Linux boots: Linux (since 5.13)
//! reserves the whole first megabyte.
//!
//! # Port I/O and interrupts
//!
//! | port | device | GSI |
//! |---|---|---|
//! | [`COM1_PORT`] `0x3f8..0x400` | 16550 UART (COM1), described in the DSDT as `PNP0501` | [`COM1_GSI`] 4 |
//! | [`ACPI_SLEEP_CONTROL_PORT`] `0x600` | ACPI sleep control register (FADT `SLEEP_CONTROL_REG`) | — |
//! | [`ACPI_SLEEP_STATUS_PORT`] `0x601` | ACPI sleep status register (FADT `SLEEP_STATUS_REG`) | — |
//! | [`RESET_PORT`] `0x64` | reset: write [`RESET_VALUE`] (FADT `RESET_REG`, also the i8042 pulse) | — |
//! | virtio-mmio slot *i* | `LNRO0005` in the DSDT | [`VIRTIO_MMIO_FIRST_GSI`] + *i* (5..=23) |

use vm_memory::GuestAddress;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// The boot GDT.
pub const GDT_START: u64 = 0x500;
/// Descriptors in the boot GDT (see [`super::regs::GDT`]).
pub const GDT_ENTRIES: usize = 5;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The most entries the PVH memory map (and the e820 table) may have here.
pub const MAX_MEMMAP_ENTRIES: usize = 32;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial `rsp` for the 64-bit boot protocol (the kernel switches to its own stack at once).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot page tables: page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// Boot page tables: the first of [`PD_PAGES`] page directories.
pub const PD_START: u64 = 0xb000;
/// Page directories at [`PD_START`]: each maps 1 GiB with 2 MiB pages.
pub const PD_PAGES: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Bytes reserved for the command line, NUL included (Linux x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: usable low RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the area holding the ACPI tables.
pub const ACPI_START: u64 = 0xe_0000;
/// The RSDP: in the BIOS read-only area Linux scans, 16-byte aligned.
pub const RSDP_START: u64 = ACPI_START;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of RAM above the legacy hole: the lowest address a kernel is loaded at.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: low RAM ends here at the latest.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// Where RAM continues above the gap.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;
/// The first virtio-mmio slot.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Bytes per virtio-mmio slot (the virtio-mmio register block is 0x200 bytes; a page keeps
/// each device on its own page).
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// The GSI of virtio-mmio slot 0; slot *i* gets `VIRTIO_MMIO_FIRST_GSI + i`.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// IOAPIC pins (KVM's in-kernel IOAPIC has 24): the last usable GSI is `IOAPIC_PINS - 1`.
pub const IOAPIC_PINS: u32 = 24;
/// How many virtio-mmio slots have a GSI of their own.
pub const VIRTIO_MMIO_SLOTS: u32 = IOAPIC_PINS - VIRTIO_MMIO_FIRST_GSI;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's GSI (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// ACPI sleep control register (one byte, write-only). On a hardware-reduced ACPI platform
/// Linux powers off by writing `(SLP_TYP << 2) | SLP_EN` here, where `SLP_EN` is bit 5
/// ([`ACPI_SLEEP_ENABLE`]) and `SLP_TYP` comes from the DSDT's `_S5_` object
/// ([`ACPI_S5_SLEEP_TYPE`]): so a write of [`ACPI_POWEROFF_VALUE`] means "power off".
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (one byte). Linux writes bit 7 (`WAK_STS`) to clear it before
/// sleeping and may poll it; reading 0 and ignoring writes is a correct implementation.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_EN` in the sleep control register.
pub const ACPI_SLEEP_ENABLE: u8 = 1 << 5;
/// The `SLP_TYP` the DSDT's `_S5_` (soft off) names.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// The byte Linux writes to [`ACPI_SLEEP_CONTROL_PORT`] to power off.
pub const ACPI_POWEROFF_VALUE: u8 = (ACPI_S5_SLEEP_TYPE << 2) | ACPI_SLEEP_ENABLE;
/// The FADT reset register: the i8042 command port, so one device serves both the ACPI reset
/// (`reboot=acpi`, Linux's default first try) and the keyboard-controller pulse (`reboot=kbd`).
pub const RESET_PORT: u16 = 0x64;
/// The value written to [`RESET_PORT`] to reset (the i8042 "pulse reset line" command).
pub const RESET_VALUE: u8 = 0xfe;

/// The smallest guest a Linux boot accepts; the kernel's own needs are checked when it is
/// loaded ([`crate::Error::MemoryTooSmall`]).
pub const MIN_MEMORY: u64 = 8 * MIB;

/// Base, size and GSI of virtio-mmio slot `index`, or `None` past the last slot with a GSI.
pub fn virtio_mmio_slot(index: u32) -> Option<(u64, u64, u32)> {
    (index < VIRTIO_MMIO_SLOTS).then(|| {
        (
            VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE,
            VIRTIO_MMIO_SLOT_SIZE,
            VIRTIO_MMIO_FIRST_GSI + index,
        )
    })
}

/// End (exclusive) of the RAM below the MMIO gap for a guest of `mem_size` bytes.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The guest RAM regions, `(start, length)`, for a guest of `mem_size` bytes: one from 0, and a
/// second from 4 GiB for what does not fit below the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let low = low_ram_end(mem_size);
    let mut regions = vec![(GuestAddress(0), low)];
    if mem_size > low {
        regions.push((GuestAddress(HIGH_RAM_START), mem_size - low));
    }
    regions
}

/// The kind of an [`E820Entry`] (values of the e820 and PVH memory-map `type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM the OS may use.
    Reserved = 2,
}

/// One entry of the memory map given to the kernel (boot_params e820 table or PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The memory map of a guest with `mem_size` bytes of RAM (at least [`HIMEM_START`]): low RAM
/// up to the EBDA, the reserved legacy/ACPI area, RAM from 1 MiB up to the MMIO gap, and RAM
/// above 4 GiB if any.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if mem_size > low_end {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_size - low_end,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_structures_do_not_overlap() {
        // (start, end) of everything the VMM writes below 1 MiB.
        let mut areas = [
            (GDT_START, GDT_START + 8 * GDT_ENTRIES as u64),
            (PVH_INFO_START, PVH_INFO_START + 56),
            (PVH_MODLIST_START, PVH_MODLIST_START + 32),
            (
                PVH_MEMMAP_START,
                PVH_MEMMAP_START + 24 * MAX_MEMMAP_ENTRIES as u64,
            ),
            (ZERO_PAGE_START, ZERO_PAGE_START + 4096),
            (0x8000, BOOT_STACK_POINTER + 0x10),
            (PML4_START, PML4_START + 4096),
            (PDPT_START, PDPT_START + 4096),
            (PD_START, PD_START + PD_PAGES * 4096),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        assert!(areas.iter().all(|a| a.1 <= HIMEM_START));
        assert!(CMDLINE_START + (CMDLINE_MAX_SIZE as u64) <= EBDA_START);
        assert_eq!(RSDP_START % 16, 0);
        for page in [PML4_START, PDPT_START, PD_START, ZERO_PAGE_START] {
            assert_eq!(page % 4096, 0);
        }
    }

    #[test]
    fn mmio_lives_in_the_gap() {
        const {
            assert!(MMIO_GAP_START <= VIRTIO_MMIO_START);
        }
        let (last, size, gsi) = virtio_mmio_slot(VIRTIO_MMIO_SLOTS - 1).unwrap();
        assert!(last + size <= IOAPIC_START);
        assert_eq!(gsi, IOAPIC_PINS - 1);
        assert!(virtio_mmio_slot(VIRTIO_MMIO_SLOTS).is_none());
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 0x1000, 5)));
        const {
            assert!(COM1_GSI < VIRTIO_MMIO_FIRST_GSI);
        }
        const {
            assert!(LAPIC_START > IOAPIC_START && LAPIC_START < MMIO_GAP_END);
        }
        // The four page directories identity-map exactly the first 4 GiB, gap included.
        assert_eq!(PD_PAGES * GIB, MMIO_GAP_END);
    }

    #[test]
    fn small_guests_have_one_region() {
        assert_eq!(ram_regions(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(
            ram_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_guests_continue_above_4_gib() {
        let regions = ram_regions(4 * GIB);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB),]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 * GIB);
    }

    #[test]
    fn e820_covers_ram_and_skips_the_holes() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x10_0000 - 0x9_fc00,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820Type::Ram
                },
            ]
        );
        let big = e820_map(6 * GIB);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_GAP_START);
        assert_eq!(
            big[3],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                kind: E820Type::Ram
            }
        );
        let ram: u64 = big
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 6 * GIB - (HIMEM_START - EBDA_START));
        // The ACPI tables are inside a reserved entry, never in RAM.
        assert!(map.iter().any(|e| e.kind == E820Type::Reserved
            && e.addr <= ACPI_START
            && e.addr + e.size >= ACPI_END));
    }
}

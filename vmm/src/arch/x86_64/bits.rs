//! Architectural bit definitions shared by the boot-time setups (control registers, EFER,
//! RFLAGS, page-table entries). Names follow the Intel SDM.

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1;
/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor write protection.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR: the OS uses FXSAVE/FXRSTOR (SSE allowed).
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: the OS handles SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page-directory entry: maps a 2 MiB page.
pub const PTE_HUGE: u64 = 1 << 7;

//! Tiny synthetic kernels for tests: an ELF with (or without) the PVH note and a bzImage
//! whose setup header is built field by field. Shared by the unit tests and (through
//! `#[path]`) the integration tests, so it uses nothing but `std`.

/// Where the synthetic ELF's one segment is loaded.
pub const ELF_PADDR: u64 = 0x100_0000;
/// The synthetic ELF's PVH entry (inside its segment).
pub const PVH_ENTRY: u64 = ELF_PADDR + 0x10;
/// Bytes of `hlt` before the PVH entry in the synthetic ELF's segment.
const ELF_PAD: usize = (PVH_ENTRY - ELF_PADDR) as usize;

/// The synthetic ELF segment's contents: `hlt`s up to [`PVH_ENTRY`], then `code`.
pub fn elf_segment(code: &[u8]) -> Vec<u8> {
    let mut seg = vec![0xf4u8; ELF_PAD];
    seg.extend_from_slice(code);
    seg.resize(seg.len().max(32), 0xf4);
    seg
}
/// The synthetic bzImage's `init_size`.
pub const BZ_INIT_SIZE: u32 = 4 << 20;
/// The synthetic bzImage's protected-mode payload.
pub const BZ_PAYLOAD_LEN: usize = 4096;

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// [`elf_with_code`] with no code.
pub fn elf(pvh_note: bool) -> Vec<u8> {
    elf_with_code(pvh_note, &[])
}

/// A 64-bit ELF "vmlinux": one PT_LOAD of [`elf_segment`]`(code)` at [`ELF_PADDR`], entry
/// [`ELF_PADDR`], and a PT_NOTE with `XEN_ELFNOTE_PHYS32_ENTRY` = [`PVH_ENTRY`] when
/// `pvh_note`.
pub fn elf_with_code(pvh_note: bool, code: &[u8]) -> Vec<u8> {
    let segment = elf_segment(code);
    let phnum: u16 = if pvh_note { 2 } else { 1 };
    let mut f = vec![0u8; 0x100 + segment.len()];
    put(&mut f, 0, b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    put(&mut f, 0x10, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 0x12, &62u16.to_le_bytes()); // x86-64
    put(&mut f, 0x14, &1u32.to_le_bytes());
    put(&mut f, 0x18, &ELF_PADDR.to_le_bytes()); // e_entry
    put(&mut f, 0x20, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 0x34, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 0x36, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 0x38, &phnum.to_le_bytes());
    // PT_LOAD
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut f, ph + 8, &0x100u64.to_le_bytes()); // p_offset
    put(
        &mut f,
        ph + 16,
        &(0xffff_ffff_8000_0000 + ELF_PADDR).to_le_bytes(),
    );
    put(&mut f, ph + 24, &ELF_PADDR.to_le_bytes());
    put(&mut f, ph + 32, &(segment.len() as u64).to_le_bytes());
    put(&mut f, ph + 40, &(segment.len() as u64).to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    if pvh_note {
        // PT_NOTE at 0xc0: one note "Xen" type 18 with a 4-byte descriptor.
        let ph = 64 + 56;
        let note_off = 0xc0u64;
        put(&mut f, ph, &4u32.to_le_bytes());
        put(&mut f, ph + 8, &note_off.to_le_bytes());
        put(&mut f, ph + 32, &20u64.to_le_bytes());
        put(&mut f, ph + 40, &20u64.to_le_bytes());
        put(&mut f, ph + 48, &4u64.to_le_bytes());
        let n = note_off as usize;
        put(&mut f, n, &4u32.to_le_bytes()); // namesz
        put(&mut f, n + 4, &4u32.to_le_bytes()); // descsz
        put(&mut f, n + 8, &18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        put(&mut f, n + 12, b"Xen\0");
        put(&mut f, n + 16, &(PVH_ENTRY as u32).to_le_bytes());
    }
    put(&mut f, 0x100, &segment);
    f
}

/// [`bzimage_with_code`] with no code.
pub fn bzimage(xloadflags: u16) -> Vec<u8> {
    bzimage_with_code(xloadflags, &[])
}

/// A bzImage: 4 setup sectors after the boot sector, then [`BZ_PAYLOAD_LEN`] bytes of
/// payload (byte i = i as u8, except `code` at the 64-bit entry, offset 0x200), with a boot
/// protocol 2.15 header (`xloadflags`, relocatable, `pref_address` 16 MiB, `init_size`
/// [`BZ_INIT_SIZE`]).
pub fn bzimage_with_code(xloadflags: u16, code: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let setup_len = (usize::from(setup_sects) + 1) * 512;
    let mut f = vec![0u8; setup_len + BZ_PAYLOAD_LEN];
    f[0x1f1] = setup_sects;
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    put(&mut f, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x234] = 1; // relocatable
    put(&mut f, 0x236, &xloadflags.to_le_bytes());
    put(&mut f, 0x238, &0x7ffu32.to_le_bytes()); // cmdline_size
    put(&mut f, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut f, 0x260, &BZ_INIT_SIZE.to_le_bytes());
    for (i, b) in f[setup_len..].iter_mut().enumerate() {
        *b = i as u8;
    }
    put(&mut f, setup_len + 0x200, code);
    f
}

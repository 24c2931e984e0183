//! Loading a Linux kernel and initramfs into guest memory and writing what the kernel is told
//! at entry: the `boot_params` zero page (64-bit Linux boot protocol) or the PVH
//! `hvm_start_info` with its memory map and module list.
//!
//! Kernel formats ([`load_kernel`], with `linux-loader`):
//! - an ELF `vmlinux` carrying the `XEN_ELFNOTE_PHYS32_ENTRY` note: loaded at its `p_paddr`s,
//!   entered through PVH (or through its 64-bit `startup_64` at `e_entry` when
//!   [`BootProtocol::Linux64`] is asked for);
//! - an ELF `vmlinux` without the note: 64-bit entry at `e_entry`;
//! - a bzImage (boot protocol ≥ 2.12 with `XLF_KERNEL_64`): its protected-mode part loaded at
//!   `code32_start` (1 MiB), entered at that address + `0x200` (`startup_64`). It decompresses
//!   itself to `pref_address` (16 MiB for distribution kernels) and needs `init_size` bytes
//!   there: the RAM check accounts for it.
//!
//! The initramfs goes at the top of the RAM below the MMIO gap (and below the kernel's
//! `initrd_addr_max`), page-aligned.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use super::layout::{
    e820_map, low_ram_end, E820Entry, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START,
    MAX_MEMMAP_ENTRIES, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::regs::BootProtocol;
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory};

/// `HdrS`: the setup header's magic.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector's `0xaa55` signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `loadflags` bit 0: the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 1;
/// `loadflags` bit 7: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point at `code32_start + 0x200`.
pub const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The PVH `hvm_start_info` magic.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol version this VMM speaks when it builds a header itself (for an ELF kernel):
/// 2.15, which has `acpi_rsdp_addr`.
const SYNTHETIC_PROTOCOL_VERSION: u16 = 0x020f;

/// What kind of file the kernel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelFormat {
    /// An ELF `vmlinux`.
    Elf,
    /// A bzImage (`vmlinuz`).
    BzImage,
}

/// A kernel in guest memory, and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The file's format.
    pub format: KernelFormat,
    /// How it is entered.
    pub protocol: BootProtocol,
    /// Guest-physical entry point.
    pub entry: u64,
    /// Lowest guest-physical address it was loaded at.
    pub load_addr: u64,
    /// End (exclusive) of all the memory the kernel needs before it has parsed its memory map
    /// (for a bzImage: its decompression buffer, `pref_address + init_size`).
    pub end: u64,
    /// The bzImage setup header (with `code32_start` set to where it was loaded); `None` for
    /// an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// The longest command line the kernel accepts, NUL included.
    pub cmdline_max: usize,
    /// The highest address the initramfs may end at (exclusive).
    pub initrd_limit: u64,
}

/// Where the initramfs was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitrdPlacement {
    /// Guest-physical start, page-aligned.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

fn read_at<R: Read + Seek>(image: &mut R, offset: u64, buf: &mut [u8]) -> Option<()> {
    image.seek(SeekFrom::Start(offset)).ok()?;
    image.read_exact(buf).ok()
}

fn invalid(why: impl Into<String>) -> Error {
    Error::InvalidKernel(why.into())
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> Result<KernelFormat> {
    let mut elf = [0u8; 4];
    if read_at(image, 0, &mut elf).is_some() && elf == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut hdrs = [0u8; 4];
    if read_at(image, 0x202, &mut hdrs).is_some() && u32::from_le_bytes(hdrs) == HDRS_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(invalid("neither an ELF vmlinux nor a bzImage"))
}

/// The guest-physical end (exclusive) of an ELF's loadable segments, read from its program
/// headers, so that a guest too small for the kernel is reported before anything is loaded.
fn elf_end<R: Read + Seek>(image: &mut R) -> Result<u64> {
    let mut ehdr = [0u8; 64];
    read_at(image, 0, &mut ehdr).ok_or_else(|| invalid("truncated ELF header"))?;
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(invalid("not a 64-bit little-endian ELF"));
    }
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]);
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]);
    if phentsize != 56 {
        return Err(invalid(format!("ELF program header size {phentsize}")));
    }
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        read_at(image, phoff + i * 56, &mut phdr)
            .ok_or_else(|| invalid("truncated ELF program headers"))?;
        let field = |at: usize| u64::from_le_bytes(phdr[at..at + 8].try_into().unwrap_or_default());
        let p_type = u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]);
        if p_type == 1 {
            let seg_end = field(24)
                .checked_add(field(40))
                .ok_or_else(|| invalid("ELF segment wraps around"))?;
            end = end.max(seg_end);
        }
    }
    if end == 0 {
        return Err(invalid("ELF without loadable segments"));
    }
    Ok(end)
}

fn loader_error(e: loader::Error) -> Error {
    invalid(e.to_string())
}

fn check_fits(end: u64, mem_size: u64) -> Result<()> {
    let available = low_ram_end(mem_size);
    if end > available {
        return Err(Error::MemoryTooSmall {
            needed: end,
            available,
        });
    }
    Ok(())
}

/// Loads the kernel `image` into `memory` (a guest of `mem_size` bytes laid out as
/// [`super::layout::ram_regions`]). `protocol` forces an entry style; `None` picks PVH for an
/// ELF with the PVH note and the 64-bit protocol otherwise.
pub fn load_kernel<R>(
    memory: &GuestMemory,
    image: &mut R,
    protocol: Option<BootProtocol>,
) -> Result<LoadedKernel>
where
    R: Read + ReadVolatile + Seek,
{
    let mem_size = memory::size_of(memory);
    match detect_format(image)? {
        KernelFormat::Elf => {
            check_fits(elf_end(image)?, mem_size)?;
            let result = loader::Elf::load(memory, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(loader_error)?;
            let pvh_entry = match result.pvh_boot_cap {
                loader::PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            let (protocol, entry) = match (protocol, pvh_entry) {
                (None | Some(BootProtocol::Pvh), Some(pvh)) => (BootProtocol::Pvh, pvh),
                (Some(BootProtocol::Pvh), None) => {
                    return Err(invalid("the ELF kernel has no PVH entry note"))
                }
                (None | Some(BootProtocol::Linux64), _) => {
                    (BootProtocol::Linux64, result.kernel_load.0)
                }
            };
            Ok(LoadedKernel {
                format: KernelFormat::Elf,
                protocol,
                entry,
                load_addr: result.kernel_load.0,
                end: result.kernel_end,
                setup_header: None,
                cmdline_max: CMDLINE_MAX_SIZE,
                initrd_limit: u64::MAX,
            })
        }
        KernelFormat::BzImage => {
            if protocol == Some(BootProtocol::Pvh) {
                return Err(invalid(
                    "a bzImage has no PVH entry point: boot its ELF vmlinux for PVH",
                ));
            }
            let mut header = setup_header::default();
            // Read the header first, to check it before anything is loaded.
            {
                use vm_memory::ByteValued;
                read_at(image, 0x1f1, header.as_mut_slice())
                    .ok_or_else(|| invalid("truncated bzImage setup header"))?;
            }
            let version = header.version;
            let xloadflags = header.xloadflags;
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(invalid(format!(
                    "bzImage boot protocol {version:#x} without a 64-bit entry point (needs 2.12+ and XLF_KERNEL_64)"
                )));
            }
            let image_len = image
                .seek(SeekFrom::End(0))
                .map_err(|e| invalid(format!("reading the kernel: {e}")))?;
            let setup_sects = match header.setup_sects {
                0 => 4,
                n => u64::from(n),
            };
            let setup_bytes = (setup_sects + 1) * 512;
            let load = u64::from(header.code32_start);
            let alignment = u64::from(header.kernel_alignment).max(0x20_0000);
            let decompress_at = if header.relocatable_kernel != 0 {
                load.next_multiple_of(alignment).max(header.pref_address)
            } else {
                header.pref_address.max(load)
            };
            let end = (load + image_len.saturating_sub(setup_bytes))
                .max(decompress_at + u64::from(header.init_size));
            check_fits(end, mem_size)?;
            let result =
                loader::BzImage::load(memory, None, image, Some(GuestAddress(HIMEM_START)))
                    .map_err(loader_error)?;
            let header = result
                .setup_header
                .ok_or_else(|| invalid("linux-loader returned no setup header"))?;
            let cmdline_max = if version >= 0x0206 {
                (header.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE)
            } else {
                256
            };
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                protocol: BootProtocol::Linux64,
                entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                load_addr: result.kernel_load.0,
                end: end.max(result.kernel_end),
                setup_header: Some(header),
                cmdline_max,
                initrd_limit: u64::from(header.initrd_addr_max) + 1,
            })
        }
    }
}

/// Checks `cmdline` against the kernel's limit and writes it, NUL-terminated, at
/// [`CMDLINE_START`]. Returns its length without the NUL.
pub fn write_cmdline(memory: &GuestMemory, kernel: &LoadedKernel, cmdline: &str) -> Result<usize> {
    if cmdline.contains('\0') {
        return Err(Error::InvalidConfig(
            "the command line contains a NUL byte".into(),
        ));
    }
    if cmdline.len() + 1 > kernel.cmdline_max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: kernel.cmdline_max - 1,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| Error::Memory(format!("writing the command line: {e}")))?;
    Ok(cmdline.len())
}

/// Where an initramfs of `size` bytes goes: the top of the RAM below the MMIO gap (and below
/// the kernel's limit), page-aligned, above everything the kernel needs.
pub fn place_initrd(kernel: &LoadedKernel, mem_size: u64, size: u64) -> Result<InitrdPlacement> {
    let top = low_ram_end(mem_size).min(kernel.initrd_limit);
    let floor = kernel.end.next_multiple_of(memory::PAGE_SIZE as u64);
    let available = top.saturating_sub(floor);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(memory::PAGE_SIZE as u64 - 1))
        .filter(|a| *a >= floor)
        .ok_or(Error::InitrdTooLarge { size, available })?;
    Ok(InitrdPlacement { addr, size })
}

/// Places the initramfs ([`place_initrd`]) and copies `size` bytes of `initrd` there.
pub fn load_initrd<R: ReadVolatile>(
    memory: &GuestMemory,
    kernel: &LoadedKernel,
    initrd: &mut R,
    size: u64,
) -> Result<InitrdPlacement> {
    let placement = place_initrd(kernel, memory::size_of(memory), size)?;
    memory
        .read_exact_volatile_from(GuestAddress(placement.addr), initrd, size as usize)
        .map_err(|e| Error::Memory(format!("loading the initramfs: {e}")))?;
    Ok(placement)
}

/// The `boot_params` for the 64-bit protocol: the kernel's setup header (or one built for an
/// ELF kernel) with the loader type, command line, initramfs and RSDP filled in, and the e820
/// map of a guest with `mem_size` bytes.
pub fn boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
    mem_size: u64,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    let mut hdr = kernel.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: SYNTHETIC_PROTOCOL_VERSION,
        kernel_alignment: 0x20_0000,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::InvalidConfig("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes a `boot_params` (from [`boot_params()`]) at [`ZERO_PAGE_START`].
pub fn write_boot_params(memory: &GuestMemory, params: &boot_params) -> Result<()> {
    memory
        .write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::Memory(format!("writing boot_params: {e}")))
}

/// The PVH start info, memory map and module list (the initramfs, if any).
pub fn pvh_start_info(
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
    mem_size: u64,
) -> Result<(
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Option<hvm_modlist_entry>,
)> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .iter()
        .map(|e: &E820Entry| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    if map.len() > MAX_MEMMAP_ENTRIES {
        return Err(Error::InvalidConfig("too many memory map entries".into()));
    }
    let module = initrd.map(|i| hvm_modlist_entry {
        paddr: i.addr,
        size: i.size,
        cmdline_paddr: 0,
        reserved: 0,
    });
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    Ok((info, map, module))
}

/// Writes [`pvh_start_info`]'s parts at [`PVH_INFO_START`], [`PVH_MEMMAP_START`] and
/// [`PVH_MODLIST_START`].
pub fn write_pvh_start_info(
    memory: &GuestMemory,
    info: &hvm_start_info,
    map: &[hvm_memmap_table_entry],
    module: Option<&hvm_modlist_entry>,
) -> Result<()> {
    let err =
        |e: vm_memory::GuestMemoryError| Error::Memory(format!("writing PVH start info: {e}"));
    memory
        .write_obj(*info, GuestAddress(PVH_INFO_START))
        .map_err(err)?;
    for (i, entry) in map.iter().enumerate() {
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        memory.write_obj(*entry, GuestAddress(at)).map_err(err)?;
    }
    if let Some(module) = module {
        memory
            .write_obj(*module, GuestAddress(PVH_MODLIST_START))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{E820Type, EBDA_START, MIB};
    use crate::arch::x86_64::test_images::*;
    use crate::memory::create_anonymous;
    use std::io::Cursor;

    const MEM: u64 = 64 * MIB;

    fn load(image: &[u8], protocol: Option<BootProtocol>) -> (GuestMemory, Result<LoadedKernel>) {
        let mem = create_anonymous(MEM as usize).unwrap();
        let r = load_kernel(&mem, &mut Cursor::new(image), protocol);
        (mem, r)
    }

    #[test]
    fn elf_with_pvh_note_is_entered_through_pvh() {
        let (mem, k) = load(&elf(true), None);
        let k = k.unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, PVH_ENTRY);
        assert_eq!(k.load_addr, ELF_PADDR);
        let segment = elf_segment(&[]);
        assert_eq!(k.end, ELF_PADDR + segment.len() as u64);
        let mut code = vec![0u8; segment.len()];
        mem.read_slice(&mut code, GuestAddress(ELF_PADDR)).unwrap();
        assert_eq!(code, segment);
    }

    #[test]
    fn elf_protocol_can_be_forced_or_is_64_bit_without_the_note() {
        let (_, k) = load(&elf(true), Some(BootProtocol::Linux64));
        let k = k.unwrap();
        assert_eq!((k.protocol, k.entry), (BootProtocol::Linux64, ELF_PADDR));
        let (_, k) = load(&elf(false), None);
        assert_eq!(k.unwrap().protocol, BootProtocol::Linux64);
        let (_, k) = load(&elf(false), Some(BootProtocol::Pvh));
        assert!(matches!(k, Err(Error::InvalidKernel(_))));
    }

    #[test]
    fn bzimage_is_loaded_at_1_mib_and_entered_at_startup_64() {
        let (mem, k) = load(&bzimage(XLF_KERNEL_64), None);
        let k = k.unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.load_addr, HIMEM_START);
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert_eq!(
            k.end,
            0x100_0000 + u64::from(BZ_INIT_SIZE),
            "decompression buffer"
        );
        assert_eq!(k.cmdline_max, 0x800);
        assert_eq!(k.initrd_limit, 0x8000_0000);
        let mut payload = vec![0u8; BZ_PAYLOAD_LEN];
        mem.read_slice(&mut payload, GuestAddress(HIMEM_START))
            .unwrap();
        assert!(payload.iter().enumerate().all(|(i, b)| *b == i as u8));
        let (mem, _) = load(&bzimage_with_code(XLF_KERNEL_64, &[0x90, 0xf4]), None);
        let mut entry = [0u8; 2];
        mem.read_slice(&mut entry, GuestAddress(HIMEM_START + 0x200))
            .unwrap();
        assert_eq!(entry, [0x90, 0xf4], "code at the 64-bit entry");
    }

    #[test]
    fn bad_kernels_are_typed_errors() {
        let (_, k) = load(&bzimage(0), None);
        assert!(matches!(k, Err(Error::InvalidKernel(_))), "no 64-bit entry");
        let (_, k) = load(&bzimage(XLF_KERNEL_64), Some(BootProtocol::Pvh));
        assert!(matches!(k, Err(Error::InvalidKernel(_))));
        let (_, k) = load(b"not a kernel at all", None);
        assert!(matches!(k, Err(Error::InvalidKernel(_))));
        let mut truncated = elf(true);
        truncated.truncate(100);
        let (_, k) = load(&truncated, None);
        assert!(matches!(k, Err(Error::InvalidKernel(_))));
        // A 16 MiB guest cannot hold a bzImage that decompresses to 16-20 MiB.
        let small = create_anonymous(16 << 20).unwrap();
        let k = load_kernel(&small, &mut Cursor::new(bzimage(XLF_KERNEL_64)), None);
        assert!(matches!(
            k,
            Err(Error::MemoryTooSmall {
                needed: 0x140_0000,
                available: 0x100_0000
            })
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated_and_bounded() {
        let (mem, k) = load(&bzimage(XLF_KERNEL_64), None);
        let k = k.unwrap();
        assert_eq!(write_cmdline(&mem, &k, "console=ttyS0 quiet").unwrap(), 19);
        let mut buf = [0xaau8; 20];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
        assert!(write_cmdline(&mem, &k, &"x".repeat(2047)).is_ok());
        assert!(matches!(
            write_cmdline(&mem, &k, &"x".repeat(2048)),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(write_cmdline(&mem, &k, "a\0b").is_err());
    }

    #[test]
    fn initrd_goes_page_aligned_at_the_top_of_low_ram() {
        let (mem, k) = load(&bzimage(XLF_KERNEL_64), None);
        let k = k.unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let p = load_initrd(&mem, &k, &mut Cursor::new(&data[..]), data.len() as u64).unwrap();
        assert_eq!(p.size, 10_000);
        assert_eq!(p.addr % 4096, 0);
        assert!(p.addr + p.size <= MEM && MEM - (p.addr + p.size) < 4096);
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(p.addr)).unwrap();
        assert_eq!(back, data);
        // Above the kernel's decompression buffer, or an error.
        let room = MEM - k.end;
        assert!(place_initrd(&k, MEM, room).is_ok());
        assert!(matches!(
            place_initrd(&k, MEM, room + 4096),
            Err(Error::InitrdTooLarge { .. })
        ));
        // Below initrd_addr_max even with RAM above it.
        let limited = LoadedKernel {
            initrd_limit: 32 * MIB,
            ..k
        };
        assert!(place_initrd(&limited, MEM, 4096).unwrap().addr < 32 * MIB);
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_e820_and_rsdp() {
        let (_, k) = load(&bzimage(XLF_KERNEL_64), None);
        let k = k.unwrap();
        let initrd = InitrdPlacement {
            addr: 0x3f0_0000,
            size: 0x1234,
        };
        let p = boot_params(&k, 13, Some(initrd), 0xe_0000, MEM).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x3f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 3);
        let table = p.e820_table;
        let e: Vec<(u64, u64, u32)> = table[..3]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            e,
            vec![
                (0, EBDA_START, E820Type::Ram as u32),
                (
                    EBDA_START,
                    HIMEM_START - EBDA_START,
                    E820Type::Reserved as u32
                ),
                (HIMEM_START, MEM - HIMEM_START, E820Type::Ram as u32),
            ]
        );
        // An ELF kernel gets a header built for it.
        let (_, k) = load(&elf(false), None);
        let p = boot_params(&k.unwrap(), 0, None, 0xe_0000, MEM).unwrap();
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert!({ p.hdr.version } >= 0x020e, "has acpi_rsdp_addr");
    }

    #[test]
    fn pvh_start_info_has_memmap_cmdline_rsdp_and_the_initrd_module() {
        let initrd = InitrdPlacement {
            addr: 0x3f0_0000,
            size: 0x1234,
        };
        let (info, map, module) = pvh_start_info(Some(initrd), 0xe_0000, MEM).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(
            (map[2].addr, map[2].size, map[2].type_),
            (HIMEM_START, MEM - HIMEM_START, 1)
        );
        assert_eq!(map[1].type_, 2);
        let module = module.unwrap();
        assert_eq!((module.paddr, module.size), (0x3f0_0000, 0x1234));

        let mem = create_anonymous(MEM as usize).unwrap();
        write_pvh_start_info(&mem, &info, &map, Some(&module)).unwrap();
        let back: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(back.magic, XEN_HVM_START_MAGIC);
        let entry: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!(entry.addr, HIMEM_START);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(m.paddr, 0x3f0_0000);

        let (info, _, module) = pvh_start_info(None, 0xe_0000, MEM).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(module.is_none());
    }
}

//! ACPI tables for a Linux guest on a hardware-reduced ACPI platform (no PM timer, no SCI, no
//! GPE blocks, no legacy PC devices), built with the `acpi_tables` crate and written at
//! [`ACPI_START`] (RSDP first, at [`RSDP_START`], where a BIOS would put it and where Linux
//! scans for it; its address is also passed in `boot_params.acpi_rsdp_addr` and the PVH
//! `rsdp_paddr`).
//!
//! | table | contents |
//! |---|---|
//! | RSDP (rev 2) | → XSDT |
//! | XSDT | → FADT, MADT |
//! | FADT (6.5) | `HW_REDUCED_ACPI`; power and sleep buttons absent; `IAPC_BOOT_ARCH`: no legacy devices, no 8042, no VGA, no MSI, no ASPM control, no CMOS RTC; `RESET_REG` = port [`RESET_PORT`] value [`RESET_VALUE`]; `SLEEP_CONTROL_REG` / `SLEEP_STATUS_REG` = ports [`ACPI_SLEEP_CONTROL_PORT`] / [`ACPI_SLEEP_STATUS_PORT`] (8-bit, byte access); `X_DSDT` → DSDT |
//! | MADT | local APIC address [`LAPIC_START`]; one enabled Processor Local APIC per vCPU (UID = APIC ID = vCPU index); the IOAPIC (ID 0 at [`IOAPIC_START`], GSI base 0) |
//! | DSDT | `\_SB_.COM1` (`PNP0501`, IO `0x3f8`–`0x3ff`, GSI 4); `\_SB_.Vnnn` per virtio-mmio device (`LNRO0005`, `_UID` n, `_CCA` 1, `Memory32Fixed(base, size)`, GSI); `\_S5_` = `Package { 5, 0 }` |
//!
//! No interrupt source override: KVM's default routing sends the PIT (ISA IRQ 0) to IOAPIC pin
//! 0, not 2, so the identity mapping Linux assumes without an override is the right one.
//! Interrupts of the serial port and of virtio-mmio devices are edge-triggered, active-high
//! (what KVM's irqfd / `KVM_IRQ_LINE` pulses deliver, and what QEMU's microvm and Firecracker
//! declare).
//!
//! # Power off (for the device model)
//!
//! On a hardware-reduced platform Linux's `poweroff` evaluates `\_S5_` (`SLP_TYP` =
//! [`ACPI_S5_SLEEP_TYPE`]), writes `WAK_STS` (bit 7) to [`ACPI_SLEEP_STATUS_PORT`] to clear
//! it, then writes `(SLP_TYP << 2) | SLP_EN` = [`ACPI_POWEROFF_VALUE`]
//! (`0x34`) to [`ACPI_SLEEP_CONTROL_PORT`]. A device there that stops the VM on that value
//! implements power off. Reboot writes [`RESET_VALUE`] to [`RESET_PORT`].

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    self, ACPI_END, ACPI_POWEROFF_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_START, COM1_GSI, COM1_PORT, IOAPIC_PINS, IOAPIC_START,
    LAPIC_START, RESET_PORT, RESET_VALUE, RSDP_START,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;

/// The OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"CAPSUL";
/// The FADT's hypervisor vendor identity.
pub const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"CAPSULE\0");

/// `IAPC_BOOT_ARCH` bit 2: VGA not present.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// `IAPC_BOOT_ARCH` bit 3: MSI not supported.
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// `IAPC_BOOT_ARCH` bit 4: the OS must not touch PCIe ASPM.
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// `IAPC_BOOT_ARCH` bit 5: no CMOS RTC.
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// A virtio-mmio device to describe in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioMmioDesc {
    /// Guest-physical base of its register block (below 4 GiB).
    pub base: u64,
    /// Bytes of the register block (at least 0x200).
    pub size: u64,
    /// The IOAPIC GSI it raises (edge-triggered, active high), below 24.
    pub gsi: u32,
}

impl VirtioMmioDesc {
    /// The device in virtio-mmio slot `index` of the [`layout`] (`None` past the last slot).
    pub fn slot(index: u32) -> Option<Self> {
        layout::virtio_mmio_slot(index).map(|(base, size, gsi)| VirtioMmioDesc { base, size, gsi })
    }
}

/// Where [`write_tables`] put each table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiTables {
    /// The RSDP (what the kernel is told).
    pub rsdp: u64,
    /// The XSDT.
    pub xsdt: u64,
    /// The FADT.
    pub fadt: u64,
    /// The MADT.
    pub madt: u64,
    /// The DSDT.
    pub dsdt: u64,
    /// End (exclusive) of the last table.
    pub end: u64,
}

fn check_devices(vcpus: u32, devices: &[VirtioMmioDesc]) -> Result<()> {
    if vcpus == 0 || vcpus > 254 {
        return Err(Error::InvalidConfig(format!(
            "{vcpus} vCPUs: the MADT describes 1 to 254 xAPIC vCPUs"
        )));
    }
    for (i, d) in devices.iter().enumerate() {
        let end = d.base.checked_add(d.size);
        if d.size == 0 || end.is_none_or(|end| end > 1 << 32) || d.size > u64::from(u32::MAX) {
            return Err(Error::InvalidConfig(format!(
                "virtio-mmio device {i} at {:#x}+{:#x} is not a 32-bit MMIO range",
                d.base, d.size
            )));
        }
        if d.gsi >= IOAPIC_PINS || d.gsi == COM1_GSI || d.gsi == 0 {
            return Err(Error::InvalidConfig(format!(
                "virtio-mmio device {i} has GSI {}: use 1-23, not 4 (COM1) or 0 (PIT)",
                d.gsi
            )));
        }
        for (j, other) in devices.iter().enumerate().skip(i + 1) {
            if d.base < other.base + other.size && other.base < d.base + d.size {
                return Err(Error::InvalidConfig(format!(
                    "virtio-mmio devices {i} and {j} overlap"
                )));
            }
        }
    }
    Ok(())
}

/// The DSDT's AML body (everything after the table header).
pub fn dsdt_aml(devices: &[VirtioMmioDesc]) -> Vec<u8> {
    let mut body = Vec::new();

    // Each object is built and serialized in one statement: the AML builder borrows its
    // children, which are temporaries.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_DDN".into(), &"COM1"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, d) in devices.iter().enumerate() {
        let uid = i as u32;
        let path = format!("_SB_.V{i:03}");
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
                        &aml::Interrupt::new(true, true, false, false, d.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    let s5_type = ACPI_S5_SLEEP_TYPE;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    body
}

fn table_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CAPSFACP", 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.reset_reg = io_byte(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();
    table_bytes(&fadt.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"CAPSMADT",
        1,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    table_bytes(&madt)
}

fn align8(addr: u64) -> u64 {
    addr.next_multiple_of(8)
}

/// Builds the tables for `vcpus` vCPUs and `devices` and writes them into `memory` from
/// [`RSDP_START`]. The [module docs](self) list what each table holds.
pub fn write_tables(
    memory: &GuestMemory,
    vcpus: u32,
    devices: &[VirtioMmioDesc],
) -> Result<AcpiTables> {
    check_devices(vcpus, devices)?;
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"CAPSDSDT", 1);
    dsdt.append_slice(&dsdt_aml(devices));
    let dsdt = dsdt.as_slice().to_vec();

    let rsdp_len = Rsdp::len() as u64;
    let dsdt_addr = align8(RSDP_START + rsdp_len);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"CAPSXSDT", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = table_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(Error::InvalidConfig(format!(
            "the ACPI tables need {} bytes, the layout has {}",
            end - ACPI_START,
            ACPI_END - ACPI_START
        )));
    }
    let rsdp = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (bytes, at) in [
        (&rsdp, RSDP_START),
        (&dsdt, dsdt_addr),
        (&fadt, fadt_addr),
        (&madt, madt_addr),
        (&xsdt, xsdt_addr),
    ] {
        memory
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing ACPI tables at {at:#x}: {e}")))?;
    }
    tracing::debug!(
        rsdp = RSDP_START,
        end,
        vcpus,
        devices = devices.len(),
        poweroff_value = ACPI_POWEROFF_VALUE,
        "ACPI tables written"
    );
    Ok(AcpiTables {
        rsdp: RSDP_START,
        xsdt: xsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        dsdt: dsdt_addr,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_anonymous;

    fn read(mem: &GuestMemory, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads a whole table at `at`, checking its signature and checksum.
    fn table(mem: &GuestMemory, at: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, at, 36);
        assert_eq!(&header[..4], signature);
        let bytes = read(mem, at, u32_at(&header, 4) as usize);
        assert_eq!(
            sum(&bytes),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        bytes
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn devices(n: u32) -> Vec<VirtioMmioDesc> {
        (0..n).map(|i| VirtioMmioDesc::slot(i).unwrap()).collect()
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let mem = create_anonymous(2 << 20).unwrap();
        let t = write_tables(&mem, 3, &devices(2)).unwrap();
        assert_eq!(t.rsdp, 0xe_0000);
        assert!(t.end <= ACPI_END);

        let rsdp = read(&mem, t.rsdp, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision 2");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(u32_at(&rsdp, 20), 36);
        assert_eq!(u64_at(&rsdp, 24), t.xsdt);

        let xsdt = table(&mem, t.xsdt, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(u64_at(&xsdt, 36), t.fadt);
        assert_eq!(u64_at(&xsdt, 44), t.madt);

        let fadt = table(&mem, t.fadt, b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc & 0b11, 0, "no legacy devices, no 8042");
        assert_ne!(iapc & IAPC_CMOS_RTC_NOT_PRESENT, 0);
        assert_eq!(u64_at(&fadt, 140), t.dsdt, "X_DSDT");
        // RESET_REG: GAS at 116 (space, width, offset, access, address), value at 128.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(&fadt[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 260), u64::from(ACPI_SLEEP_STATUS_PORT));
        assert_eq!(u64_at(&fadt, 268), HYPERVISOR_VENDOR);
    }

    #[test]
    fn madt_has_a_local_apic_per_vcpu_and_the_ioapic() {
        for vcpus in [1, 4, 32] {
            let mem = create_anonymous(2 << 20).unwrap();
            let t = write_tables(&mem, vcpus, &[]).unwrap();
            let madt = table(&mem, t.madt, b"APIC");
            assert_eq!(u32_at(&madt, 36), LAPIC_START as u32);
            let mut at = 44;
            let mut apic_ids = Vec::new();
            let mut ioapics = Vec::new();
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(madt[at + 2], madt[at + 3], "UID = APIC ID");
                        assert_eq!(u32_at(&madt, at + 4), 1, "enabled");
                        apic_ids.push(u32::from(madt[at + 3]));
                    }
                    1 => ioapics.push((madt[at + 2], u32_at(&madt, at + 4), u32_at(&madt, at + 8))),
                    other => panic!("unexpected MADT entry {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(0, IOAPIC_START as u32, 0)]);
        }
    }

    #[test]
    fn dsdt_names_serial_virtio_devices_and_s5() {
        let mem = create_anonymous(2 << 20).unwrap();
        let devs = devices(3);
        let t = write_tables(&mem, 1, &devs).unwrap();
        let dsdt = table(&mem, t.dsdt, b"DSDT");
        let aml = &dsdt[36..];
        assert_eq!(aml, dsdt_aml(&devs).as_slice());
        assert!(contains(aml, b"COM1"));
        // EISAID("PNP0501") encodes as 0x0105d041.
        assert!(contains(aml, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(aml, b"_S5_"));
        assert_eq!(
            aml.windows(9).filter(|w| w == b"LNRO0005\0").count(),
            3,
            "one LNRO0005 per device"
        );
        for (i, d) in devs.iter().enumerate() {
            assert!(contains(aml, format!("V{i:03}").as_bytes()));
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(d.base as u32).to_le_bytes());
            m.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert!(contains(aml, &m), "device {i} Memory32Fixed");
            // Extended interrupt: tag 0x89, length 6, consumer|edge, 1 interrupt, GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&d.gsi.to_le_bytes());
            assert!(contains(aml, &irq), "device {i} interrupt");
        }
        // COM1: IO descriptor for 0x3f8 length 8 and GSI 4.
        assert!(contains(aml, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        assert!(contains(aml, &[0x89, 6, 0, 0b11, 1, 4, 0, 0, 0]));
        // _S5_ = Package(2) { 5, 0 }.
        assert!(contains(
            aml,
            &[b'_', b'S', b'5', b'_', 0x12, 5, 2, 0x0a, 5, 0]
        ));
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let mem = create_anonymous(2 << 20).unwrap();
        assert!(write_tables(&mem, 0, &[]).is_err());
        assert!(write_tables(&mem, 255, &[]).is_err());
        let high = VirtioMmioDesc {
            base: 0xffff_f000,
            size: 0x2000,
            gsi: 5,
        };
        assert!(write_tables(&mem, 1, &[high]).is_err());
        let com1_irq = VirtioMmioDesc {
            gsi: 4,
            ..devices(1)[0]
        };
        assert!(write_tables(&mem, 1, &[com1_irq]).is_err());
        let d = devices(1)[0];
        assert!(write_tables(&mem, 1, &[d, d]).is_err(), "overlap");
    }

    #[test]
    fn every_slot_and_many_vcpus_fit() {
        let mem = create_anonymous(2 << 20).unwrap();
        let all = devices(layout::VIRTIO_MMIO_SLOTS);
        let t = write_tables(&mem, 254, &all).unwrap();
        assert!(t.end <= ACPI_END);
    }
}

//! Linux boot on real KVM.
//!
//! - `boot_state_reaches_kvm_and_the_entry_runs`: wherever `/dev/kvm` exists (PVM included):
//!   `boot_linux` on synthetic kernels, the vCPU state read back from KVM, and the first
//!   instructions at the entry point (a write to COM1) executed, for PVH and the 64-bit
//!   protocol.
//! - `real_kernel_loads`: with `CAPSULE_TEST_KERNEL` (a vmlinuz or vmlinux), the loader on the
//!   real kernel: parse, load, boot_params / PVH start info, and the vCPU state on KVM. Needs no
//!   hardware virtualization.
//! - `boots_linux_to_init`: with `CAPSULE_TEST_KERNEL` and hardware virtualization, boots the
//!   kernel with a tiny initramfs whose static `/init` writes a marker to `/dev/kmsg` and powers
//!   off; asserts the banner and the marker on the serial console.
//! - `the_linux_machine_is_assembled_and_its_devices_answer`: wherever `/dev/kvm` exists: the
//!   `LinuxMachine` on a synthetic kernel, its devices on their buses, its vCPUs set up, and
//!   the entry's writes reaching its serial console and i8042.

mod common;

#[allow(dead_code)]
#[path = "../src/arch/x86_64/test_images.rs"]
mod test_images;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_devices::{Bus, BusDevice, WriteOutcome};
use capsule_vmm::arch::x86_64::layout;
use capsule_vmm::boot::{self, BootProtocol, LinuxBootConfig, VirtioMmioDesc};
use capsule_vmm::machine::LinuxMachine;
use capsule_vmm::{Hypervisor, Vcpu, VcpuEvent, Vm, VmOptions};
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use vm_memory::{Bytes, GuestAddress};

/// What the test devices hand the run loop.
const YIELD_POWEROFF: u64 = 1;
const YIELD_RESET: u64 = 2;
const YIELD_BYTE: u64 = 3;

/// Just enough of a 16550 for Linux's 8250 driver to find it and print through it (polled):
/// THR collects bytes, IER/LCR/MCR/SCR read back, LSR is always "transmitter empty", loopback
/// mirrors MCR into MSR. Not the real UART (the devices crate has that).
#[derive(Default)]
struct SerialSink {
    out: Arc<Mutex<Vec<u8>>>,
    regs: [u8; 8],
    /// Return to the run loop after every byte (for the synthetic-kernel test).
    yield_each_byte: bool,
}

impl BusDevice for SerialSink {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let dlab = self.regs[3] & 0x80 != 0;
        let mcr = self.regs[4];
        let value = match offset {
            0 if !dlab => 0,
            2 => 0x01, // IIR: no interrupt pending, no FIFO
            5 => 0x60, // LSR: THR empty, transmitter empty
            6 if mcr & 0x10 != 0 => {
                ((mcr & 0x02) << 3)
                    | ((mcr & 0x01) << 5)
                    | ((mcr & 0x04) << 4)
                    | ((mcr & 0x08) << 4)
            }
            6 => 0xb0, // MSR: DCD, DSR, CTS
            o => self.regs[o as usize & 7],
        };
        data.fill(0);
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        let Some(&byte) = data.first() else {
            return WriteOutcome::Handled;
        };
        let dlab = self.regs[3] & 0x80 != 0;
        if offset == 0 && !dlab {
            self.out.lock().unwrap().push(byte);
            if self.yield_each_byte {
                return WriteOutcome::Yield(YIELD_BYTE);
            }
        } else if offset < 8 {
            self.regs[offset as usize] = byte;
        }
        WriteOutcome::Handled
    }
}

/// The ACPI sleep control register and the reset port, as the layout describes them.
struct PowerPorts;

impl BusDevice for PowerPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        match (offset, data.first()) {
            (0, Some(&v)) if v == layout::ACPI_POWEROFF_VALUE => {
                WriteOutcome::Yield(YIELD_POWEROFF)
            }
            _ => WriteOutcome::Handled,
        }
    }
}

struct ResetPort;

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> WriteOutcome {
        if data.first() == Some(&layout::RESET_VALUE) {
            WriteOutcome::Yield(YIELD_RESET)
        } else {
            WriteOutcome::Handled
        }
    }
}

fn pio_bus(out: Arc<Mutex<Vec<u8>>>, yield_each_byte: bool) -> Bus {
    let mut pio = Bus::new();
    let serial = SerialSink {
        out,
        yield_each_byte,
        ..Default::default()
    };
    pio.insert(
        Arc::new(Mutex::new(serial)),
        u64::from(layout::COM1_PORT),
        8,
    )
    .unwrap();
    pio.insert(
        Arc::new(Mutex::new(PowerPorts)),
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
        2,
    )
    .unwrap();
    pio.insert(
        Arc::new(Mutex::new(ResetPort)),
        u64::from(layout::RESET_PORT),
        1,
    )
    .unwrap();
    pio
}

/// A Linux VM (irqchip on) with its vCPUs, booted with `config`.
fn boot(hv: &Hypervisor, config: &LinuxBootConfig) -> (Vm, Vec<Vcpu>, boot::BootInfo) {
    let memory = boot::create_memory(config.memory_mb).unwrap();
    let vm = Vm::new(
        hv,
        memory,
        VmOptions {
            irqchip: true,
            ..Default::default()
        },
    )
    .unwrap();
    let vcpus: Vec<Vcpu> = (0..config.vcpus)
        .map(|i| vm.create_vcpu(i).unwrap())
        .collect();
    let info = boot::boot_linux(&vm, &vcpus, config).unwrap();
    (vm, vcpus, info)
}

/// Checks what every Linux boot leaves in the vCPUs, on KVM itself.
fn check_vcpu_state(vcpus: &[Vcpu], info: &boot::BootInfo) {
    let bsp = &vcpus[0];
    let regs = bsp.regs().unwrap();
    let sregs = bsp.sregs().unwrap();
    assert_eq!(regs.rip, info.entry);
    match info.protocol {
        BootProtocol::Pvh => {
            assert_eq!(regs.rbx, layout::PVH_INFO_START);
            assert_eq!(sregs.cr0 & 1, 1);
            assert_eq!(sregs.cr0 & (1 << 31), 0);
            assert_eq!(sregs.cs.db, 1);
        }
        BootProtocol::Linux64 => {
            assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
            assert_eq!(sregs.efer & (1 << 10), 1 << 10, "LMA");
            assert_eq!(sregs.cs.l, 1);
            assert_eq!(sregs.cr3, layout::PML4_START);
        }
    }
    let bsp_state = bsp.save_state(&[]).unwrap();
    assert_eq!(bsp_state.fpu.fcw, 0x37f);
    // KVM_GET_FPU does not report MXCSR (KVM leaves the field 0); it lives in the XSAVE
    // area's legacy region, word 6.
    if let Some(xsave) = bsp_state.xsave {
        assert_eq!(xsave[6], 0x1f80, "MXCSR");
    }
    for vcpu in vcpus {
        let i = vcpu.index();
        // KVM_GET_CPUID2, KVM_GET_MSRS (MTRRdefType), KVM_GET_LAPIC and KVM_GET_MP_STATE.
        let state = vcpu.save_state(&[0x2ff]).unwrap();
        let mp = vcpu.mp_state().unwrap();
        assert_eq!(mp, state.mp_state.mp_state);
        let expected = if i == 0 {
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        assert_eq!(mp, expected, "vCPU {i} MP state");
        let cpuid = &state.cpuid;
        let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, i, "APIC ID in CPUID");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let sig = cpuid.iter().find(|e| e.function == 0x4000_0000).unwrap();
        assert_eq!(sig.ebx, 0x4b4d_564b, "KVMK");
        assert_eq!(state.msrs.len(), 1);
        assert_eq!(state.msrs[0].data, 0x806, "MTRRdefType");
        let lapic = state.lapic.unwrap();
        let lvt = |at: usize| u32::from_le_bytes(std::array::from_fn(|k| lapic.regs[at + k] as u8));
        assert_eq!((lvt(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_eq!((lvt(0x360) >> 8) & 7, 4, "LINT1 NMI");
        assert_eq!(lvt(0x20) >> 24, i, "LAPIC ID");
    }
}

/// Runs the BSP until COM1 gets `expected.len()` bytes; returns them.
fn run_to_serial(vm_vcpu: &mut Vcpu, pio: &Bus, out: &Arc<Mutex<Vec<u8>>>, n: usize) -> Vec<u8> {
    let mmio = Bus::new();
    for _ in 0..n {
        match vm_vcpu.run(pio, &mmio).unwrap() {
            VcpuEvent::Yield(YIELD_BYTE) => {}
            other => panic!(
                "unexpected {other:?}; serial so far {:?}",
                out.lock().unwrap()
            ),
        }
    }
    out.lock().unwrap().clone()
}

#[test]
fn boot_state_reaches_kvm_and_the_entry_runs() {
    let Some(hv) = common::hypervisor() else {
        return;
    };
    // mov al, 'P'; mov edx, 0x3f8; out dx, al; mov al, 'V'; out dx, al; hlt  (32-bit)
    let pvh_code = [
        0xb0, b'P', 0xba, 0xf8, 0x03, 0, 0, 0xee, 0xb0, b'V', 0xee, 0xf4,
    ];
    // mov al, 'L'; mov edx, 0x3f8; out dx, al; mov al, '4'; out dx, al; hlt  (64-bit: same bytes)
    let l64_code = [
        0xb0, b'L', 0xba, 0xf8, 0x03, 0, 0, 0xee, 0xb0, b'4', 0xee, 0xf4,
    ];
    let cases = [
        (
            test_images::elf_with_code(true, &pvh_code),
            BootProtocol::Pvh,
            b"PV".to_vec(),
        ),
        (
            test_images::bzimage_with_code(1, &l64_code),
            BootProtocol::Linux64,
            b"L4".to_vec(),
        ),
    ];
    for (kernel, protocol, expected) in cases {
        let config = LinuxBootConfig {
            vcpus: 2,
            memory_mb: 64,
            initrd: Some(vec![1u8; 4096].into()),
            virtio_mmio: vec![
                VirtioMmioDesc::slot(0).unwrap(),
                VirtioMmioDesc::slot(1).unwrap(),
            ],
            ..LinuxBootConfig::new(kernel)
        };
        let (_vm, mut vcpus, info) = boot(&hv, &config);
        assert_eq!(info.protocol, protocol);
        check_vcpu_state(&vcpus, &info);
        let out = Arc::new(Mutex::new(Vec::new()));
        let pio = pio_bus(out.clone(), true);
        let got = run_to_serial(&mut vcpus[0], &pio, &out, expected.len());
        assert_eq!(got, expected, "{protocol:?} entry ran");
    }
}

fn test_kernel() -> Option<PathBuf> {
    let path = std::env::var_os("CAPSULE_TEST_KERNEL")?;
    Some(PathBuf::from(path))
}

#[test]
fn real_kernel_loads() {
    let Some(kernel) = test_kernel() else {
        eprintln!("SKIPPED: set CAPSULE_TEST_KERNEL to a vmlinuz or vmlinux");
        return;
    };
    let config = LinuxBootConfig {
        vcpus: 2,
        memory_mb: 512,
        initrd: Some(initramfs().into()),
        cmdline: "console=ttyS0 earlycon=uart,io,0x3f8 panic=-1".into(),
        virtio_mmio: vec![VirtioMmioDesc::slot(0).unwrap()],
        ..LinuxBootConfig::new(kernel.clone())
    };
    let memory = boot::create_memory(config.memory_mb).unwrap();
    let info = boot::load_into_memory(&memory, &config).unwrap();
    eprintln!("{}: {info:#x?}", kernel.display());
    let initrd = info.initrd.unwrap();
    assert!(initrd.addr >= info.kernel_end);
    assert!(initrd.addr + initrd.size <= 512 << 20);
    match info.format {
        boot::KernelFormat::BzImage => {
            assert_eq!(info.protocol, BootProtocol::Linux64);
            assert_eq!(info.entry, layout::HIMEM_START + 0x200);
            let params: linux_loader::loader::bootparam::boot_params = memory
                .read_obj(GuestAddress(layout::ZERO_PAGE_START))
                .unwrap();
            let hdr = params.hdr;
            assert_eq!({ hdr.header }, 0x5372_6448);
            assert!({ hdr.version } >= 0x020c);
            assert_ne!({ hdr.xloadflags } & 1, 0, "XLF_KERNEL_64");
            assert_eq!({ hdr.ramdisk_image }, initrd.addr as u32);
            assert_eq!({ hdr.ramdisk_size }, initrd.size as u32);
            assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
            assert_eq!(
                info.kernel_end,
                { hdr.pref_address } + u64::from(hdr.init_size)
            );
            assert_eq!(params.e820_entries, 3);
        }
        boot::KernelFormat::Elf => {
            assert_eq!(
                info.protocol,
                BootProtocol::Pvh,
                "Debian's vmlinux has the PVH note"
            );
            let start: linux_loader::loader::elf::start_info::hvm_start_info = memory
                .read_obj(GuestAddress(layout::PVH_INFO_START))
                .unwrap();
            assert_eq!(start.magic, 0x336e_c578);
            assert_eq!(start.nr_modules, 1);
        }
    }
    let mut cmdline = vec![0u8; config.cmdline.len() + 1];
    memory
        .read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline[..config.cmdline.len()], config.cmdline.as_bytes());

    // The whole boot, vCPU state included, on whatever KVM this host has (PVM too: nothing runs).
    if let Some(hv) = common::hypervisor() {
        let (_vm, vcpus, info) = boot(&hv, &config);
        check_vcpu_state(&vcpus, &info);
    }
}

/// One cpio member: path, mode (type and permissions), device (major, minor), contents.
type CpioEntry<'a> = (&'a str, u32, (u32, u32), &'a [u8]);

/// A cpio "newc" archive of `entries`.
fn cpio(entries: &[CpioEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8], ino: u32| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, rdev.0, rdev.1, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, rdev, data)) in entries.iter().enumerate() {
        push(name, *mode, *rdev, data, i as u32 + 1);
    }
    push("TRAILER!!!", 0, (0, 0), &[], 0);
    out
}

/// The marker `/init` writes to the kernel log.
const INIT_MARKER: &str = "CAPSULE-INIT-OK";

/// A static x86_64 ELF `/init`: `open("/dev/kmsg")`, write `<2>CAPSULE-INIT-OK\n` (level 2,
/// so it reaches the console even with `quiet`), `reboot(POWER_OFF)`, spin.
fn init_binary() -> Vec<u8> {
    let mut code = vec![
        0xb8, 0x02, 0, 0, 0, // mov eax, 2 (open)
        0x48, 0x8d, 0x3d, 52, 0, 0, 0, // lea rdi, [rip + path]
        0xbe, 0x01, 0, 0, 0, // mov esi, O_WRONLY
        0x0f, 0x05, // syscall
        0x89, 0xc7, // mov edi, eax
        0xb8, 0x01, 0, 0, 0, // mov eax, 1 (write)
        0x48, 0x8d, 0x35, 41, 0, 0, 0, // lea rsi, [rip + msg]
        0xba, 0, 0, 0, 0, // mov edx, len (patched below)
        0x0f, 0x05, // syscall
        0xb8, 0xa9, 0, 0, 0, // mov eax, 169 (reboot)
        0xbf, 0xad, 0xde, 0xe1, 0xfe, // mov edi, LINUX_REBOOT_MAGIC1
        0xbe, 0x69, 0x19, 0x12, 0x28, // mov esi, LINUX_REBOOT_MAGIC2
        0xba, 0xdc, 0xfe, 0x21, 0x43, // mov edx, LINUX_REBOOT_CMD_POWER_OFF
        0x0f, 0x05, // syscall
        0xeb, 0xfe, // jmp $
    ];
    assert_eq!(code.len(), 64);
    code.extend_from_slice(b"/dev/kmsg\0");
    let msg = format!("<2>{INIT_MARKER}\n");
    code[34] = msg.len() as u8;
    code.extend_from_slice(msg.as_bytes());

    let base = 0x40_0000u64;
    let header_len = 64 + 56;
    let mut elf = vec![0u8; header_len];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&(base + header_len as u64).to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let total = (header_len + code.len()) as u64;
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    elf[ph + 16..ph + 24].copy_from_slice(&base.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&base.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&total.to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&total.to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    elf
}

fn initramfs() -> Vec<u8> {
    let init = init_binary();
    cpio(&[
        ("dev", 0o040755, (0, 0), &[]),
        ("dev/console", 0o020600, (5, 1), &[]),
        ("dev/kmsg", 0o020644, (1, 11), &[]),
        ("init", 0o100755, (0, 0), &init),
    ])
}

#[test]
fn initramfs_is_newc_with_a_static_init() {
    let archive = initramfs();
    assert!(archive.starts_with(b"070701"));
    assert_eq!(archive.len() % 4, 0);
    let text = String::from_utf8_lossy(&archive);
    for name in ["dev/console", "dev/kmsg", "init", "TRAILER!!!"] {
        assert!(text.contains(name), "{name}");
    }
    let init = init_binary();
    assert!(init.starts_with(b"\x7fELF"));
    // The two rip-relative loads point at the path and the message.
    let code = &init[120..];
    assert_eq!(&code[12 + 52..12 + 52 + 10], b"/dev/kmsg\0");
    assert!(code[33 + 41..].starts_with(b"<2>CAPSULE-INIT-OK\n"));
}

#[test]
fn boots_linux_to_init() {
    let hv = match Hypervisor::open() {
        Ok(hv) if hv.info().can_boot_linux() => hv,
        _ => {
            println!("SKIPPED: needs hardware virtualization and CAPSULE_TEST_KERNEL");
            return;
        }
    };
    let Some(kernel) = test_kernel() else {
        println!("SKIPPED: needs hardware virtualization and CAPSULE_TEST_KERNEL");
        return;
    };
    capsule_vmm::vcpu::install_kick_handler().unwrap();
    let config = LinuxBootConfig {
        vcpus: 1,
        memory_mb: 256,
        initrd: Some(initramfs().into()),
        cmdline: "console=ttyS0 earlycon=uart,io,0x3f8 panic=-1 reboot=acpi".into(),
        ..LinuxBootConfig::new(kernel)
    };
    let (_vm, mut vcpus, info) = boot(&hv, &config);
    eprintln!("booting {:?} at {:#x}", info.protocol, info.entry);
    let out = Arc::new(Mutex::new(Vec::new()));
    let pio = pio_bus(out.clone(), false);
    let mmio = Bus::new();
    let mut vcpu = vcpus.remove(0);
    let kicker = vcpu.kicker();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            kicker.kick();
        }
    });
    let outcome = loop {
        match vcpu.run(&pio, &mmio) {
            Ok(VcpuEvent::Yield(YIELD_POWEROFF)) => break "poweroff",
            Ok(VcpuEvent::Yield(YIELD_RESET)) => break "reset",
            Ok(VcpuEvent::Yield(_)) => {}
            Ok(VcpuEvent::Kicked) => break "timeout",
            Ok(VcpuEvent::Shutdown) => break "shutdown",
            Ok(VcpuEvent::Halted) => break "halted",
            Ok(VcpuEvent::Failed(why)) => panic!("the vCPU failed: {why}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    };
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let serial = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    eprintln!("--- serial ({outcome}) ---\n{serial}\n---");
    assert!(serial.contains("Linux version"), "kernel banner missing");
    assert!(serial.contains(INIT_MARKER), "init marker missing");
    assert_eq!(outcome, "poweroff", "ACPI poweroff should reach the VMM");
}

#[test]
fn the_linux_machine_is_assembled_and_its_devices_answer() {
    let Some(hv) = common::hypervisor() else {
        return;
    };
    // mov al, 'O'; mov edx, 0x3f8; out dx, al; mov al, 'K'; out dx, al;
    // mov al, 0xfe; out 0x64, al (i8042: pulse reset); hlt
    let code = [
        0xb0, b'O', 0xba, 0xf8, 0x03, 0, 0, 0xee, 0xb0, b'K', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    let kernel = test_images::elf_with_code(true, &code);
    let config = LinuxMachine::boot_config(kernel, None, "console=ttyS0", 2, 64).unwrap();
    let build = |config: &LinuxBootConfig| {
        let memory = boot::create_memory(config.memory_mb).unwrap();
        let vm = Vm::new(&hv, memory, LinuxMachine::vm_options()).unwrap();
        let vcpus = (0..config.vcpus)
            .map(|i| vm.create_vcpu(i).unwrap())
            .collect();
        LinuxMachine::assemble("test", vm, vcpus, config, None, true)
    };
    // ACPI must describe exactly the machine's devices.
    let undescribed = LinuxBootConfig {
        virtio_mmio: Vec::new(),
        ..config.clone()
    };
    assert!(matches!(
        build(&undescribed),
        Err(capsule_vmm::Error::InvalidConfig(_))
    ));

    let mut machine = build(&config).unwrap();
    let info = *machine.boot_info().expect("a booted machine");
    assert_eq!(info.protocol, BootProtocol::Pvh);
    assert_eq!(machine.describe_devices().len(), 2);
    assert!(machine.take_agent_channel().is_some());
    assert!(machine.take_agent_channel().is_none());
    for desc in &config.virtio_mmio {
        let mut magic = [0u8; 4];
        assert!(machine.mmio().read(desc.base, &mut magic));
        assert_eq!(&magic, b"virt", "virtio-mmio magic at {:#x}", desc.base);
    }
    let mut vcpus = machine.take_vcpus();
    assert_eq!(vcpus.len(), 2);
    assert!(machine.take_vcpus().is_empty());
    let bsp = vcpus[0].position().unwrap();
    assert_eq!(bsp.rip, info.entry);
    assert_eq!(bsp.mp_state, KVM_MP_STATE_RUNNABLE);
    assert!(bsp.to_string().starts_with("vCPU0: rip 0x"), "{bsp}");
    let ap = vcpus[1].position().unwrap();
    assert_eq!(ap.mp_state, KVM_MP_STATE_UNINITIALIZED);

    // The entry prints to COM1 (an interrupt through the irqfd), then resets through the
    // i8042; on a thread with the vCPU filter, as the engine runs it.
    let (pio, mmio) = (machine.pio().clone(), machine.mmio().clone());
    let mut bsp = vcpus.remove(0);
    let ran = std::thread::spawn(move || {
        capsule_vmm::seccomp::confine_current_thread(capsule_vmm::seccomp::ThreadRole::Vcpu)
            .unwrap();
        bsp.run(&pio, &mmio).unwrap()
    });
    assert_eq!(ran.join().unwrap(), VcpuEvent::Shutdown);
    assert_eq!(machine.console_log().console_log(), b"OK");
    machine.stop_devices().unwrap();
    machine.stop_devices().unwrap();
}

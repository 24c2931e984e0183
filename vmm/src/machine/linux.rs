//! The Linux machine: a stock kernel booted by [`crate::boot`], with the devices its ACPI
//! tables describe, all defined here:
//!
//! - port I/O: an 8250 UART on COM1 (the console; IRQ 4 through an irqfd), the i8042 (reset)
//!   and the HW-reduced ACPI sleep registers (power-off);
//! - virtio-mmio: a virtio-console in slot [`CONSOLE_SLOT`] (the agent's channel, whose host
//!   end the machine hands out) and virtio-rng in slot [`RNG_SLOT`]. Queue notifications
//!   reach a [`DeviceThread`] through ioeventfds and interrupts leave through irqfds, so
//!   device work costs no vCPU exit; except the console's transmit queue, which the vCPU
//!   takes in its own MMIO exit: Linux's hvc driver spins, interrupts off, after each write
//!   until the buffer is used, and taken inline it is used before the driver looks (under
//!   nested virtualization every spin iteration was a VM exit, thousands per page of output).
//!
//! ```text
//! let config = LinuxMachine::boot_config(kernel, initrd, cmdline, vcpus, memory_mb)?;
//! let vm = Vm::new(&hv, boot::create_memory(memory_mb)?, LinuxMachine::vm_options())?;
//! let vcpus = ...;                                     // vm.create_vcpu(i), i in 0..vcpus
//! let mut machine = LinuxMachine::assemble("name", vm, vcpus, &config, None, true)?;
//! // run each of machine.take_vcpus() on machine.pio() / machine.mmio(), each on a thread
//! // that calls seccomp::confine_current_thread(ThreadRole::Vcpu) first
//! ```
//!
//! # Saving and restoring
//!
//! With every vCPU stopped (and its last exit completed), [`LinuxMachine::pause_devices`]
//! parks the device thread; [`LinuxMachine::absorb_agent_input`] then moves the bytes the
//! engine wrote into the agent's channel into the console's buffer, and
//! [`LinuxMachine::save_devices`] returns a [`LinuxDeviceState`]: the UART (registers, unread
//! input, console log) and each virtio-mmio transport (status, features, queues, interrupt
//! status, config generation) with its device (the console's bytes in flight both ways; rng
//! keeps only a counter). The i8042 (reset only) and the ACPI sleep registers (the status
//! register reads 0) keep no state. [`LinuxMachine::restore`] builds the same machine from
//! it, with the VM and vCPU states, over memory that already holds the snapshot.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use capsule_devices::event_loop::{DeviceThread, DevicesPaused};
use capsule_devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use capsule_devices::serial::{
    SerialDevice, SerialLog, SerialState, COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN,
};
use capsule_devices::virtio::console::{Console, ConsoleState};
use capsule_devices::virtio::mmio::{MmioTransport, MmioTransportState, MMIO_SIZE, NOTIFY_OFFSET};
use capsule_devices::virtio::rng::{Rng, RngState};
use capsule_devices::virtio::VirtioDevice;
use capsule_devices::{AcpiPm, Bus, BusDevice};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT};
use crate::boot::{self, BootInfo, ImageSource, LinuxBootConfig, VirtioMmioDesc};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::seccomp::{self, ThreadRole};
use crate::vcpu::{Vcpu, VcpuState};
use crate::vm::{Vm, VmOptions, VmState};

/// The virtio-mmio slot of the virtio-console (the agent's channel).
pub const CONSOLE_SLOT: u32 = 0;
/// The virtio-mmio slot of virtio-rng.
pub const RNG_SLOT: u32 = 1;
/// Ports the ACPI sleep registers span from [`ACPI_SLEEP_CONTROL_PORT`] (control, status).
const ACPI_PM_PORT_LEN: u64 = 2;

/// A virtio device on its virtio-mmio transport, over the machine's guest memory.
pub type Transport<D> = MmioTransport<D, GuestMemory>;

/// Every device of a Linux machine, shared with the buses and the device thread: the one
/// place to reach them (to save or restore their state).
#[derive(Debug)]
pub struct LinuxDevices {
    /// COM1, the console.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The reset-only keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI sleep registers.
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// The virtio-console in slot [`CONSOLE_SLOT`].
    pub console: Arc<Mutex<Transport<Console>>>,
    /// virtio-rng in slot [`RNG_SLOT`].
    pub rng: Arc<Mutex<Transport<Rng>>>,
}

/// The devices' state of a Linux machine (see the module docs for what each keeps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxDeviceState {
    /// COM1.
    pub serial: SerialState,
    /// The virtio-console's transport.
    pub console_transport: MmioTransportState,
    /// The virtio-console: the agent channel's bytes in flight.
    pub console: ConsoleState,
    /// virtio-rng's transport.
    pub rng_transport: MmioTransportState,
    /// virtio-rng.
    pub rng: RngState,
}

/// The devices of a machine before they are wired up.
struct DeviceParts {
    serial: SerialDevice,
    console: Transport<Console>,
    rng: Transport<Rng>,
    agent_channel: UnixStream,
}

/// A Linux machine ready to run: its VM, vCPUs set up to boot (or restored), devices on
/// their buses and the device thread serving the virtio queues. Dropping it stops the
/// device thread.
pub struct LinuxMachine {
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    console_log: SerialLog,
    devices: LinuxDevices,
    device_thread: Option<DeviceThread>,
    agent_channel: Option<UnixStream>,
    /// Where the kernel was loaded; `None` for a restored machine.
    boot: Option<BootInfo>,
}

impl std::fmt::Debug for LinuxMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxMachine")
            .field("vm", &self.vm)
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.devices)
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

impl LinuxMachine {
    /// The VM options a Linux machine needs: the in-kernel irqchip (and PIT); no dirty log.
    pub fn vm_options() -> VmOptions {
        VmOptions {
            irqchip: true,
            dirty_log: false,
        }
    }

    /// The boot configuration of a Linux machine, with its virtio-mmio devices described
    /// (the console in [`CONSOLE_SLOT`], rng in [`RNG_SLOT`]) as [`Self::assemble`] builds
    /// them.
    pub fn boot_config(
        kernel: impl Into<ImageSource>,
        initrd: Option<ImageSource>,
        cmdline: &str,
        vcpus: u32,
        memory_mb: u64,
    ) -> Result<LinuxBootConfig> {
        Ok(LinuxBootConfig {
            initrd,
            cmdline: cmdline.into(),
            vcpus,
            memory_mb,
            virtio_mmio: virtio_slots()?.to_vec(),
            ..LinuxBootConfig::new(kernel)
        })
    }

    /// Builds the machine on `vm` (created with [`Self::vm_options`] on
    /// [`boot::create_memory`]) and its `vcpus` (`0..config.vcpus`, in order): devices,
    /// buses, the device thread (named `{name}-devices`), the kernel loaded unless `loaded`
    /// says it already is (by [`boot::load_into_memory`] with the same `config`), and the
    /// vCPUs set up to boot. `config` must come from [`Self::boot_config`]. With `seccomp`,
    /// the device thread installs its filter ([`ThreadRole::Devices`]) before it serves the
    /// guest. Starts no vCPU.
    pub fn assemble(
        name: &str,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        config: &LinuxBootConfig,
        loaded: Option<BootInfo>,
        seccomp: bool,
    ) -> Result<LinuxMachine> {
        let [console_slot, rng_slot] = virtio_slots()?;
        if config.virtio_mmio != [console_slot, rng_slot] {
            return Err(Error::InvalidConfig(format!(
                "the Linux machine has a console and an rng on virtio-mmio {:x?}, the boot \
                 configuration describes {:x?}: build it with LinuxMachine::boot_config",
                [console_slot, rng_slot],
                config.virtio_mmio
            )));
        }

        let mem = vm.memory().clone();
        let serial =
            SerialDevice::with_new_eventfd().map_err(|e| os("creating the serial port", e))?;
        let (console, agent_channel) = Console::new().map_err(|e| os("creating the console", e))?;
        let parts = DeviceParts {
            serial,
            console: MmioTransport::new(console, mem.clone())
                .map_err(|e| os("creating the virtio console", e))?,
            rng: MmioTransport::new(Rng::new(), mem).map_err(|e| os("creating virtio-rng", e))?,
            agent_channel,
        };
        let boot = match loaded {
            Some(info) => info,
            None => boot::load_into_memory(vm.memory(), config)?,
        };
        boot::setup_vcpus(&vm, &vcpus, config, &boot)?;
        Self::wire(name, vm, vcpus, parts, seccomp, Some(boot))
    }

    /// Builds the machine saved as `devices`, `vm_state` and `vcpu_states` on a fresh `vm`
    /// (created with [`Self::vm_options`] over memory that already holds the snapshot's
    /// pages, in the layout of [`boot::create_memory`]) and its `vcpus` (never run, one per
    /// saved state, in order): the VM's and vCPUs' KVM state first, then the devices (a
    /// pending virtio interrupt is raised again). The agent's channel is a new socket pair
    /// holding the bytes that were in flight. Starts no vCPU.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        name: &str,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        devices: &LinuxDeviceState,
        vm_state: &VmState,
        vcpu_states: &[VcpuState],
        seccomp: bool,
    ) -> Result<LinuxMachine> {
        if vcpus.len() != vcpu_states.len() {
            return Err(Error::IncompatibleState(format!(
                "{} saved vCPUs for {} vCPUs",
                vcpu_states.len(),
                vcpus.len()
            )));
        }
        vm.restore_state(vm_state)?;
        for (vcpu, state) in vcpus.iter().zip(vcpu_states) {
            vcpu.restore_state(state)?;
        }
        let mem = vm.memory().clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| os("creating an eventfd", e))?;
        let serial = SerialDevice::restore(irq, &devices.serial).map_err(invalid)?;
        let (console, agent_channel) = Console::restore(&devices.console).map_err(invalid)?;
        let parts = DeviceParts {
            serial,
            console: MmioTransport::restore(console, mem.clone(), &devices.console_transport)
                .map_err(invalid)?,
            rng: MmioTransport::restore(Rng::restore(&devices.rng), mem, &devices.rng_transport)
                .map_err(invalid)?,
            agent_channel,
        };
        Self::wire(name, vm, vcpus, parts, seccomp, None)
    }

    /// Puts the devices on their buses, their interrupts and notifications on KVM, and the
    /// virtio transports on a new device thread.
    fn wire(
        name: &str,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        parts: DeviceParts,
        seccomp: bool,
        boot: Option<BootInfo>,
    ) -> Result<LinuxMachine> {
        let [console_slot, rng_slot] = virtio_slots()?;
        // Port I/O: console, reset, power-off.
        vm.register_irqfd(parts.serial.irq_evt(), COM1_IRQ)?;
        let console_log = parts.serial.log();
        let serial = Arc::new(Mutex::new(parts.serial));
        let i8042 = Arc::new(Mutex::new(I8042));
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(ACPI_S5_SLEEP_TYPE)));
        let mut pio = Bus::new();
        insert(
            &mut pio,
            serial.clone(),
            u64::from(COM1_PORT),
            SERIAL_PORT_LEN,
        )?;
        insert(
            &mut pio,
            i8042.clone(),
            u64::from(I8042_PORT),
            I8042_PORT_LEN,
        )?;
        insert(
            &mut pio,
            acpi_pm.clone(),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            ACPI_PM_PORT_LEN,
        )?;

        // virtio-mmio: the agent's console and entropy.
        let device_thread = DeviceThread::spawn_confined(&format!("{name}-devices"), move || {
            if seccomp {
                seccomp::confine_current_thread(ThreadRole::Devices).map_err(|e| e.to_string())
            } else {
                Ok(())
            }
        })
        .map_err(|e| os("starting the device thread", e))?;
        let mut mmio = Bus::new();
        let console = attach(&vm, &device_thread, &mut mmio, parts.console, console_slot)?;
        let rng = attach(&vm, &device_thread, &mut mmio, parts.rng, rng_slot)?;
        Ok(LinuxMachine {
            vm: Arc::new(vm),
            vcpus,
            pio,
            mmio,
            console_log,
            devices: LinuxDevices {
                serial,
                i8042,
                acpi_pm,
                console,
                rng,
            },
            device_thread: Some(device_thread),
            agent_channel: Some(parts.agent_channel),
            boot,
        })
    }

    /// Parks the device thread until the returned guard is dropped: no virtio queue or host
    /// byte is served meanwhile (see [`DeviceThread::pause`]). Stop the vCPUs first.
    pub fn pause_devices(&self) -> Result<DevicesPaused> {
        match &self.device_thread {
            Some(thread) => thread
                .pause()
                .map_err(|e| os("pausing the device thread", e)),
            None => Err(os(
                "pausing the device thread",
                "the device thread was stopped",
            )),
        }
    }

    /// Moves every byte written into the agent's channel so far into the console's buffer
    /// (see [`Console::absorb_host_input`]); returns how many. Only while the devices are
    /// paused.
    pub fn absorb_agent_input(&self) -> usize {
        lock(&self.devices.console).device_mut().absorb_host_input()
    }

    /// Bytes the console has written into the agent's channel since the machine was built
    /// (its engine end has them, read or not).
    pub fn agent_output_bytes(&self) -> u64 {
        lock(&self.devices.console).device().bytes_to_host()
    }

    /// Every device's state. Only while the devices are paused ([`Self::pause_devices`]) and
    /// the vCPUs stopped, or the state may not match guest memory.
    pub fn save_devices(&self) -> LinuxDeviceState {
        let (console_transport, console) = {
            let t = lock(&self.devices.console);
            (t.save(), t.device().save())
        };
        let (rng_transport, rng) = {
            let t = lock(&self.devices.rng);
            (t.save(), t.device().save())
        };
        LinuxDeviceState {
            serial: lock(&self.devices.serial).save(),
            console_transport,
            console,
            rng_transport,
            rng,
        }
    }

    /// The VM (shared with whoever runs its vCPUs: it must outlive them).
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Takes the vCPUs, to run each on its own thread; empty after the first call.
    pub fn take_vcpus(&mut self) -> Vec<Vcpu> {
        std::mem::take(&mut self.vcpus)
    }

    /// The port I/O bus (serial, i8042, ACPI sleep registers).
    pub fn pio(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus (the virtio-mmio transports).
    pub fn mmio(&self) -> &Bus {
        &self.mmio
    }

    /// What the guest wrote to its serial console.
    pub fn console_log(&self) -> &SerialLog {
        &self.console_log
    }

    /// Takes the host end of the agent's channel (the virtio-console); `None` after the
    /// first call.
    pub fn take_agent_channel(&mut self) -> Option<UnixStream> {
        self.agent_channel.take()
    }

    /// Every device.
    pub fn devices(&self) -> &LinuxDevices {
        &self.devices
    }

    /// Where the kernel and its boot structures are in guest memory; `None` for a
    /// restored machine.
    pub fn boot_info(&self) -> Option<&BootInfo> {
        self.boot.as_ref()
    }

    /// Each virtio transport and its queues, in words (for a boot that timed out).
    pub fn describe_devices(&self) -> Vec<String> {
        vec![
            lock(&self.devices.console).describe(),
            lock(&self.devices.rng).describe(),
        ]
    }

    /// Stops the device thread and waits for it (once; later calls do nothing). Virtio
    /// queues are no longer served after it.
    pub fn stop_devices(&mut self) -> Result<()> {
        match self.device_thread.take() {
            Some(thread) => thread
                .stop()
                .map_err(|e| os("stopping the device thread", e)),
            None => Ok(()),
        }
    }
}

/// The descriptors of the console's and rng's slots.
fn virtio_slots() -> Result<[VirtioMmioDesc; 2]> {
    let slot = |index: u32| {
        VirtioMmioDesc::slot(index)
            .ok_or_else(|| Error::InvalidConfig(format!("no virtio-mmio slot {index}")))
    };
    Ok([slot(CONSOLE_SLOT)?, slot(RNG_SLOT)?])
}

/// Puts a virtio device on the MMIO bus at `slot`, with its notifications as ioeventfds
/// (except those it takes inline, [`VirtioDevice::notifies_inline`]) and its interrupt as an
/// irqfd, and hands it to the device thread.
fn attach<D: VirtioDevice + 'static>(
    vm: &Vm,
    devices: &DeviceThread,
    mmio: &mut Bus,
    transport: Transport<D>,
    slot: VirtioMmioDesc,
) -> Result<Arc<Mutex<Transport<D>>>> {
    vm.register_irqfd(transport.irq_evt(), slot.gsi)?;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        // A queue the device takes in the vCPU's exit must exit to the bus.
        if !transport.notifies_inline(queue) {
            vm.register_mmio_ioeventfd(evt, slot.base + NOTIFY_OFFSET, queue as u32)?;
        }
    }
    let transport = Arc::new(Mutex::new(transport));
    insert(mmio, transport.clone(), slot.base, MMIO_SIZE)?;
    devices
        .register_transport(transport.clone())
        .map_err(|e| os("registering a virtio device", e))?;
    Ok(transport)
}

fn insert(bus: &mut Bus, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<()> {
    bus.insert(device, base, len)
        .map_err(|e| Error::InvalidConfig(e.to_string()))
}

/// A device-layer failure, as an OS error of the VMM.
fn os(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Os {
        op,
        source: std::io::Error::other(e.to_string()),
    }
}

/// A saved device state that does not fit.
fn invalid(e: impl std::fmt::Display) -> Error {
    Error::IncompatibleState(format!("device state: {e}"))
}

/// Devices stay usable after a thread panicked while holding one.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_config_describes_the_machines_devices() {
        let config = LinuxMachine::boot_config(Vec::new(), None, "console=ttyS0", 2, 256).unwrap();
        assert_eq!(config.virtio_mmio, virtio_slots().unwrap());
        assert_eq!(
            config.virtio_mmio[0],
            VirtioMmioDesc::slot(CONSOLE_SLOT).unwrap()
        );
        assert_eq!(
            config.virtio_mmio[1],
            VirtioMmioDesc::slot(RNG_SLOT).unwrap()
        );
        assert_eq!((config.vcpus, config.memory_mb), (2, 256));
        assert_eq!(config.cmdline, "console=ttyS0");
        assert!(LinuxMachine::vm_options().irqchip);
        assert!(!LinuxMachine::vm_options().dirty_log);
    }
}

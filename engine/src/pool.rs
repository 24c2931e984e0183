//! Pre-created VM shells, so that starting a capsule from a template, resuming one, or
//! booting one does not wait for KVM to build a VM.
//!
//! A shell is a fresh VM that has never run: `KVM_CREATE_VM`, its memory slot registered
//! over reserved anonymous memory, and its vCPUs created. On this kind of host those steps
//! dominate a start (hundreds of microseconds, growing with the memory size). A capsule takes
//! a shell and, for a snapshot or template, maps the snapshot's memory over the shell's
//! memory in place (`capsule_vmm::memory::replace_with_private_file`), which needs no new
//! memory slot. Shells are never reused: a capsule's VM is released when it stops or pauses.
//!
//! A Linux shell also has its guest memory loaded (kernel, initramfs, command line, ACPI
//! tables, boot structures): copying a distribution kernel into guest memory is most of a
//! Linux capsule's start-up cost on the host side, and it can be done before anyone asks.
//! Only the vCPU registers are set at boot.
//!
//! Shells are kept per shape (memory size, vCPU count, VM options, Linux image) for shapes
//! that were asked for, [`EngineConfig::shell_pool_size`](crate::EngineConfig::shell_pool_size)
//! of each (at most [`LINUX_SHELLS`] for a Linux shape, which holds its loaded kernel in
//! memory), by one background thread. An empty pool is not an error: the shell is then built
//! on the spot.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use capsule_vmm::boot::{self, BootInfo, LinuxBootConfig};
use capsule_vmm::vm::VmOptions;
use capsule_vmm::{memory, Hypervisor, Vcpu, Vm};

use crate::error::{Error, Result};
use crate::sync::{lock, wait};

/// Most distinct shapes kept warm at once; the least recently asked for is dropped.
const MAX_SHAPES: usize = 4;
/// Most shells kept per Linux shape: each holds a loaded kernel and initramfs in memory
/// (~50 MB resident for the minimal image).
pub(crate) const LINUX_SHELLS: usize = 1;

/// Identifies a template's base layer: the file (device and inode) and the template's
/// directory (its inode). Two templates can share a base file (a fork's template links the
/// layers of a paused capsule, which may be another template's), and each must get shells
/// that map the file through its own directory: deleting one template must leave nothing
/// mapped from its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BackingId {
    dev: u64,
    ino: u64,
    dir: u64,
}

impl BackingId {
    /// The id of `file`, a template's base layer, opened in the template's directory `dir`.
    pub(crate) fn of(file: &File, dir: &std::path::Path) -> Result<BackingId> {
        let meta = file
            .metadata()
            .map_err(|e| Error::os("reading a memory layer's metadata", e))?;
        let dir =
            std::fs::metadata(dir).map_err(Error::io("reading a template's directory", dir))?;
        Ok(BackingId {
            dev: meta.dev(),
            ino: meta.ino(),
            dir: dir.ino(),
        })
    }
}

/// A file's identity and version (device, inode, size, modification time): a Linux image
/// rebuilt in place is a different image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file at `path`.
    pub(crate) fn of(path: &std::path::Path) -> Result<FileStamp> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            op: "reading a Linux image's metadata",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// What a shell looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ShellShape {
    pub(crate) memory_mb: u64,
    pub(crate) vcpus: u32,
    pub(crate) dirty_log: bool,
    pub(crate) irqchip: bool,
    /// Memory already mapped copy-on-write from this file (a template's base layer) instead
    /// of anonymous: a capsule from that template then needs no re-mapping at all.
    pub(crate) backing: Option<BackingId>,
    /// For a Linux guest: its kernel and initramfs, loaded into the shell's memory (with the
    /// [`LinuxBootConfig`] given to [`ShellPool::take`]).
    pub(crate) linux: Option<(FileStamp, FileStamp)>,
    /// Memory in a Linux guest's layout ([`boot::memory_layout`]: around the 32-bit MMIO
    /// gap, in huge pages where anonymous) rather than one region at 0. Implied by `linux`.
    pub(crate) linux_layout: bool,
}

impl ShellShape {
    fn options(self) -> VmOptions {
        VmOptions {
            dirty_log: self.dirty_log,
            irqchip: self.irqchip,
        }
    }
}

/// A VM that has never run, with its memory and vCPUs.
pub(crate) struct Shell {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    /// The file its memory is mapped from, if not anonymous.
    pub(crate) backing: Option<BackingId>,
    /// For a Linux shape: what [`boot::load_into_memory`] put in its memory.
    pub(crate) loaded: Option<BootInfo>,
}

impl Shell {
    /// Builds a shell now; `backing` must be the file `shape.backing` names, and `linux` the
    /// boot configuration of a Linux shape.
    ///
    /// Every shell of a file shares its one descriptor (`Arc`): a descriptor per capsule
    /// would make `RLIMIT_NOFILE` the limit on capsules a third sooner (a probe needs two:
    /// its VM and its vCPU).
    pub(crate) fn build(
        hypervisor: &Hypervisor,
        shape: ShellShape,
        backing: Option<&Arc<File>>,
        linux: Option<&LinuxBootConfig>,
    ) -> Result<Shell> {
        let size = usize::try_from(shape.memory_mb << 20)
            .map_err(|_| Error::InvalidConfig("memory size too large".into()))?;
        let linux = linux.filter(|_| shape.linux.is_some());
        let linux_layout = shape.linux_layout || linux.is_some();
        let memory = match (linux, shape.backing, backing) {
            // Linux's layout: RAM around the 32-bit MMIO gap, in huge pages.
            (Some(_), _, _) => boot::create_memory(shape.memory_mb)?,
            (None, Some(_), Some(file)) if linux_layout => memory::map_private_file_regions(
                file.clone(),
                &boot::memory_layout(shape.memory_mb)?,
            )?,
            (None, Some(_), Some(file)) => memory::map_private_file(file.clone(), size)?,
            _ if linux_layout => boot::create_memory(shape.memory_mb)?,
            _ => memory::create_anonymous(size)?,
        };
        let vm = Vm::new(hypervisor, memory, shape.options())?;
        let vcpus = (0..shape.vcpus)
            .map(|index| vm.create_vcpu(index))
            .collect::<capsule_vmm::Result<Vec<_>>>()?;
        let loaded = linux
            .map(|config| boot::load_into_memory(vm.memory(), config))
            .transpose()?;
        Ok(Shell {
            vm,
            vcpus,
            backing: shape.backing.filter(|_| backing.is_some()),
            loaded,
        })
    }
}

#[derive(Default)]
struct PoolState {
    ready: HashMap<ShellShape, Vec<Shell>>,
    /// The files that backed shapes map, by id.
    files: HashMap<BackingId, Arc<File>>,
    /// How Linux shapes are loaded.
    boots: HashMap<ShellShape, Arc<LinuxBootConfig>>,
    /// Shapes asked for, with a use counter for eviction.
    wanted: HashMap<ShellShape, u64>,
    uses: u64,
    /// Takes served by a ready shell.
    served: u64,
}

/// The pool and its filler thread.
pub(crate) struct ShellPool {
    shared: Arc<PoolShared>,
    filler: Option<JoinHandle<()>>,
}

struct PoolShared {
    hypervisor: Hypervisor,
    target: usize,
    state: Mutex<PoolState>,
    wake: Condvar,
    stop: AtomicBool,
}

impl PoolShared {
    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// How many shells of `shape` to keep.
    fn target_for(&self, shape: &ShellShape) -> usize {
        if shape.linux.is_some() {
            self.target.min(LINUX_SHELLS)
        } else {
            self.target
        }
    }

    /// A shape that wants another shell, if any.
    fn next_to_fill(&self, state: &PoolState) -> Option<ShellShape> {
        state
            .wanted
            .keys()
            .find(|shape| state.ready.get(shape).map_or(0, Vec::len) < self.target_for(shape))
            .copied()
    }

    fn fill(self: Arc<Self>) {
        loop {
            let shape = {
                let mut state = self.state();
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(shape) = self.next_to_fill(&state) {
                        break shape;
                    }
                    state = wait(&self.wake, state);
                }
            };
            let file = shape
                .backing
                .and_then(|id| self.state().files.get(&id).cloned());
            let linux = self.state().boots.get(&shape).cloned();
            if (shape.backing.is_some() && file.is_none())
                || (shape.linux.is_some() && linux.is_none())
            {
                self.state().wanted.remove(&shape);
                continue;
            }
            match Shell::build(&self.hypervisor, shape, file.as_ref(), linux.as_deref()) {
                Ok(shell) => {
                    let mut state = self.state();
                    if state.wanted.contains_key(&shape) {
                        state.ready.entry(shape).or_default().push(shell);
                    }
                }
                Err(e) => {
                    // Do not spin on a shape that cannot be built: forget it until asked again.
                    tracing::warn!(?shape, error = %e, "could not pre-create a VM shell");
                    self.state().wanted.remove(&shape);
                }
            }
        }
    }
}

impl ShellPool {
    /// A pool keeping `target` shells per shape (0: none, every shell is built on demand).
    pub(crate) fn new(hypervisor: Hypervisor, target: usize) -> Result<Self> {
        let shared = Arc::new(PoolShared {
            hypervisor,
            target,
            state: Mutex::new(PoolState::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let filler = if target > 0 {
            let worker = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("capsule-vm-shells".into())
                    .spawn(move || worker.fill())
                    .map_err(|e| Error::os("spawning the VM shell thread", e))?,
            )
        } else {
            None
        };
        Ok(ShellPool { shared, filler })
    }

    /// A shell of `shape` (whose memory maps `backing` when `shape.backing` names it, or is
    /// loaded for `linux` when `shape.linux` is set): a pre-created one if ready, else one
    /// built now. Either way the pool then makes (more) shells of this shape ready for next
    /// time.
    pub(crate) fn take(
        &self,
        shape: ShellShape,
        backing: Option<&File>,
        linux: Option<&LinuxBootConfig>,
    ) -> Result<Shell> {
        let (ready, shared_file) = {
            let mut state = self.shared.state();
            if let (Some(_), Some(config)) = (shape.linux, linux) {
                state
                    .boots
                    .entry(shape)
                    .or_insert_with(|| Arc::new(config.clone()));
            }
            if let (Some(id), Some(file)) = (shape.backing, backing) {
                if let std::collections::hash_map::Entry::Vacant(slot) = state.files.entry(id) {
                    let file = file
                        .try_clone()
                        .map_err(|e| Error::os("duplicating a memory layer's descriptor", e))?;
                    slot.insert(Arc::new(file));
                }
            }
            state.uses += 1;
            let uses = state.uses;
            if self.shared.target > 0 {
                state.wanted.insert(shape, uses);
                if state.wanted.len() > MAX_SHAPES {
                    let oldest = state
                        .wanted
                        .iter()
                        .min_by_key(|(_, used)| **used)
                        .map(|(shape, _)| *shape);
                    if let Some(oldest) = oldest {
                        state.wanted.remove(&oldest);
                        state.ready.remove(&oldest);
                        state.forget_unused_files();
                    }
                }
                self.shared.wake.notify_one();
            }
            let ready = state.ready.get_mut(&shape).and_then(Vec::pop);
            state.served += u64::from(ready.is_some());
            let shared_file = shape.backing.and_then(|id| state.files.get(&id).cloned());
            (ready, shared_file)
        };
        match ready {
            Some(shell) => Ok(shell),
            None => {
                // The pool's shared descriptor of the file; without a pool (target 0, or the
                // shape just evicted) one for this shell alone.
                let file =
                    match (shared_file, backing) {
                        (Some(file), _) => Some(file),
                        (None, Some(file)) => Some(Arc::new(file.try_clone().map_err(|e| {
                            Error::os("duplicating a memory layer's descriptor", e)
                        })?)),
                        (None, None) => None,
                    };
                Shell::build(&self.shared.hypervisor, shape, file.as_ref(), linux)
            }
        }
    }

    /// Shells ready now (all shapes together), and how many takes were served by one.
    #[cfg(feature = "testing")]
    pub(crate) fn counts(&self) -> (usize, u64) {
        let state = self.shared.state();
        (state.ready.values().map(Vec::len).sum(), state.served)
    }

    /// Drops every shell mapping the file `id` and stops making them (its template is being
    /// deleted).
    pub(crate) fn forget_backing(&self, id: BackingId) {
        let mut state = self.shared.state();
        state.wanted.retain(|shape, _| shape.backing != Some(id));
        state.ready.retain(|shape, _| shape.backing != Some(id));
        state.files.remove(&id);
    }
}

impl PoolState {
    /// Closes files no wanted shape maps any more, and forgets boot configurations of shapes
    /// no longer wanted.
    fn forget_unused_files(&mut self) {
        let wanted = &self.wanted;
        self.files
            .retain(|id, _| wanted.keys().any(|shape| shape.backing == Some(*id)));
        self.boots.retain(|shape, _| wanted.contains_key(shape));
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(handle) = self.filler.take() {
            let _ = handle.join();
        }
    }
}

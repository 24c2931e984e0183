//! # capsule: embeddable KVM sandboxes
//!
//! A capsule is a KVM microVM whose vCPUs are threads of your program. Create one, run
//! commands in it, read its status, destroy it:
//!
//! ```no_run
//! use std::time::Duration;
//! use capsule::{CapsuleConfig, Engine, EngineConfig};
//!
//! # fn main() -> capsule::Result<()> {
//! let engine = Engine::new(EngineConfig::default())?;
//! let capsule = engine.create(CapsuleConfig::builder("probe").memory_mb(64))?;
//! let out = capsule.commands().run("echo hi")?;
//! assert_eq!((&*out.stdout_str(), out.exit_code), ("hi\n", Some(0)));
//! println!("{:?}", capsule.info().status); // Running
//! capsule.destroy()?;
//! # Ok(()) }
//! ```
//!
//! ## Lifecycle
//! [`Status`]: `Pending` (accepted, waiting for a start slot) → `Starting` (VM built, guest
//! booting) → `Running` (the guest said it is ready) ⇄ `Paused` (its whole state on disk, no
//! CPU, no memory) → `Stopped` (destroyed, or its process ended while it ran). `Error` means
//! an unrecoverable failure (triple fault, KVM error...) and carries the reason in
//! [`CapsuleInfo::error`]; the capsule's VM is released at once and other capsules are
//! unaffected.
//!
//! ## Pause, resume, templates
//! ```no_run
//! # use std::time::Duration;
//! # use capsule::{CapsuleConfig, Engine, EngineConfig};
//! # fn main() -> capsule::Result<()> {
//! # let engine = Engine::new(EngineConfig::default())?;
//! let capsule = engine.create(CapsuleConfig::builder("probe").timeout(Duration::from_secs(60)))?;
//! capsule.commands().run("touch 100")?;
//! capsule.pause()?;                  // state to disk, VM released
//! capsule.resume()?;                 // exactly where it was (also: engine.connect(&id))
//! capsule.snapshot("warm")?;         // a template; the capsule keeps running
//! let clone = engine.create(CapsuleConfig::new("warm"))?; // shares its pages copy-on-write
//! # Ok(()) }
//! ```
//! - A pause stops the vCPUs between commands (running commands finish first), writes the
//!   snapshot into the engine's data directory and releases the VM. A capsule's first pause
//!   writes the pages its guest ever wrote (a sparse file); later pauses write only pages
//!   dirtied since (KVM's dirty log OR the VMM's own writes), as a new layer; chains are
//!   merged after 8 layers, and pauses that dirtied at most 16 pages store them inside the
//!   state file. Every file is written under a temporary name, fsynced and renamed: a
//!   failed or interrupted pause leaves the previous snapshot valid and the capsule running.
//! - Resume maps the memory back `MAP_PRIVATE` (pages are read lazily, writes stay private)
//!   and restores every vCPU register, MSR, FPU/XSAVE state and the guest's own state.
//! - With [`CapsuleConfigBuilder::timeout`], a capsule is paused after that long without a
//!   command or [`Capsule::ping`]; zero (the default) never auto-pauses. A running command is
//!   activity until it ends, the idle clock starts when the capsule runs, and a command or
//!   ping that arrives while the watcher is pausing the capsule cancels that pause.
//! - Admission control: [`EngineConfigBuilder::max_capsules`] and
//!   [`EngineConfigBuilder::max_memory_mb`] bound the capsules holding a VM; a create, resume
//!   or connect past them is [`Error::ResourceExhausted`], as is running out of file
//!   descriptors, threads or host memory (the engine raises `RLIMIT_NOFILE` at start).
//! - A template is a self-contained snapshot; capsules started from it map its memory
//!   copy-on-write, so a hundred clones share its pages in the page cache. Each clone maps
//!   only the template pages its guest touches (the kernel's fault-around and whole-folio
//!   mapping are turned off for it through a write-protect registration with the
//!   template's userfaultfd, one descriptor per template opened with its first clone, that
//!   never protects a page, and `MADV_NOHUGEPAGE`), so its RSS grows by what it uses; on
//!   kernels that refuse that (regular files before Linux 6.7, shmem before 5.19, or a
//!   seccomp policy without `userfaultfd`) clones work the same with a larger RSS. Deleting a
//!   template that running capsules map is refused; paused capsules keep hard links to what
//!   they need.
//! - [`Capsule::fork`] starts n capsules in the exact state of a running or paused one,
//!   sharing its memory copy-on-write through an anonymous template that is removed with the
//!   last capsule mapping it.
//! - Both guest kinds have the whole lifecycle. A Linux capsule's snapshot holds every vCPU,
//!   the in-kernel irqchip, PIT and kvmclock, its devices (UART, virtio-mmio transports,
//!   virtio-console with the agent channel's bytes in flight, virtio-rng) and its memory, so
//!   its processes, open files and agent continue after a resume. It is frozen wherever it
//!   is (see [`Capsule::pause`] for commands running then); its monotonic clocks count only
//!   time it ran, and at every start (boot, resume, template spawn, fork) the engine sets its
//!   wall clock to the host's, reseeds its kernel's CRNG with host entropy (clones never
//!   share randomness) and tells it its capsule id (`CAPSULE_ID` in every command), through
//!   one `Sync` message of the agent protocol, before the capsule is running.
//! - Paused capsules survive the process: a new [`Engine`] on the same data directory lists
//!   them and can resume them. A resumed capsule's snapshot is retired (it runs on from it),
//!   so a capsule running when its process dies is reported stopped, never silently rolled
//!   back. One engine at a time may open a data directory.
//! - Fresh, never-run VMs are kept ready in the background
//!   ([`EngineConfig::shell_pool_size`]); a capsule never reuses another's VM.
//!
//! ## The probe template
//! `"probe"` is a tiny guest built into the engine: 64-bit code running in guest user mode,
//! so it starts in about a millisecond and runs at native speed on hardware KVM and on PVM.
//! It talks to the host through a shared-memory mailbox and one port-I/O exit per command.
//! Commands (output ends with a newline, as from a shell):
//!
//! | command | effect |
//! |---|---|
//! | `echo TEXT` | prints TEXT |
//! | `exit N` | exits with code N |
//! | `count` | increments a counter kept in guest memory and prints it |
//! | `touch N` | writes the next N distinct 4 KiB pages of guest memory, prints their checksum |
//! | `sum` | prints the checksum of every page touched so far |
//! | `spin N` | busy-loops N iterations |
//! | `crash` | faults on purpose: the capsule goes to `Error` |
//! | anything else | exit code 127, a message on stderr |
//!
//! A probe with N vCPUs runs up to N commands at once. It needs at least 8 MiB of memory.
//!
//! ## Linux capsules: the `"minimal"` template
//! `CapsuleConfig::new("minimal")` boots a real Linux kernel (Debian's cloud kernel) whose
//! PID 1 is capsule's agent; `commands().run(cmd)` runs `/bin/sh -c cmd` in it, with
//! [`RunOptions`] environment, working directory and a timeout that kills the command's
//! whole process group. Build the image once with `cargo xtask build-minimal` (from Debian
//! packages; see the README for other distributions). It needs hardware virtualization: on a
//! host whose KVM cannot boot Linux (PVM, see [`Engine::host`]) `create` fails at once with
//! [`Error::Unsupported`]. The guest's serial console is kept ([`Capsule::console_log`]);
//! `poweroff`/`reboot` inside stop the capsule; a kernel panic puts it in error with the
//! console's tail. A guest that dies while booting fails `create` at once
//! ([`Error::GuestCrashed`]); one that does not become ready in time fails with
//! [`Error::BootTimeout`], which says where each vCPU and virtio queue was. Linux capsules
//! pause, resume, become templates and fork like probe ones (see [`Capsule::pause`]).
//!
//! ## Talking to processes: background commands, streams, stdin, signals, terminals
//! ```no_run
//! # use std::time::Duration;
//! # use capsule::{CapsuleConfig, Command, Engine, EngineConfig, Output, PtySize, RunOptions, Signal};
//! # fn main() -> capsule::Result<()> {
//! # let engine = Engine::new(EngineConfig::default())?;
//! let capsule = engine.create(CapsuleConfig::new("minimal"))?;
//! let build = capsule.commands().spawn("make -j4", RunOptions::new().cwd("/src"))?;
//! for chunk in build.output() {                     // as it comes, stdout and stderr
//!     if let Output::Stderr(bytes) = chunk { eprint!("{}", String::from_utf8_lossy(&bytes)) }
//! }
//! let result = build.wait()?;                       // exit_code, or the signal that killed it
//! let cat = capsule.commands().spawn(Command::exec("cat", ["-n"]), RunOptions::new())?;
//! cat.write_stdin(b"hello\n")?;
//! cat.close_stdin()?;
//! let server = capsule.commands().spawn("python3 -m http.server", RunOptions::new())?;
//! server.signal(Signal::TERM)?;                     // or kill(): SIGKILL to the process group
//! for p in capsule.commands().list()? { println!("{} {}", p.pid, p.command) }
//! let shell = capsule.pty().create(PtySize::new(24, 80), RunOptions::new().user("app"))?;
//! shell.write(b"ls --color\n")?;
//! # Ok(()) }
//! ```
//! - [`Commands::spawn`] returns a [`CommandHandle`] once the command started (pid, stdin,
//!   signals, [`CommandHandle::kill`] of its whole process group, [`CommandHandle::wait`],
//!   its output as an [`OutputStream`] of [`Output`] chunks); [`RunOptions::on_stdout`] and
//!   [`RunOptions::on_stderr`] callbacks work for it and for [`Commands::run`]. Commands are
//!   shell scripts or argv ([`Command::exec`]); [`RunOptions`] also sets the guest user,
//!   stdin bytes, an empty environment and the output limit. Output is bytes
//!   ([`CommandOutput::stdout`]; [`CommandOutput::stdout_str`] for text), and a command
//!   killed by a signal reports [`CommandOutput::signal`], not `128 + n`.
//! - Memory stays bounded: a run to the end keeps at most its output limit; a streamed
//!   command's output crosses the agent channel under window flow control (the agent protocol
//!   crate documents it), so a handle buffers at most 1 MiB and a consumer that stops reading
//!   blocks the guest process, never the engine.
//! - [`Commands::list`], [`Commands::connect`] and [`Commands::kill`] reach every process the
//!   guest's agent started, from any handle or engine. Processes keep running across
//!   [`Capsule::pause`] and [`Capsule::resume`]; handles do not follow (they report
//!   [`Error::ProcessDetached`], which says to reconnect), and `connect(pid)` after the
//!   resume gets the rest of the output and the exit. [`Capsule::pty`] runs shells (or any
//!   command) on pseudo-terminals: [`PtyHandle::write`], [`PtyHandle::resize`].
//! - The probe runs its verbs through `spawn` too (their output arrives at the end; only a
//!   kill controls them); what it cannot do (environment, directory, user, stdin, argv,
//!   terminals, the process list) is [`Error::Unsupported`], never silently ignored.
//!
//! ## Files (Linux capsules)
//! ```no_run
//! # use capsule::{CapsuleConfig, Engine, EngineConfig, WriteOptions};
//! # fn main() -> capsule::Result<()> {
//! # let engine = Engine::new(EngineConfig::default())?;
//! let capsule = engine.create(CapsuleConfig::new("minimal"))?;
//! let files = capsule.files();
//! files.write("/work/in/data.txt", "hello")?;                 // parents are created
//! files.upload("build.tar", "/work/build.tar")?;               // streamed, any size
//! files.write_with("/work/run.sh", "#!/bin/sh\n", WriteOptions::new().mode(0o755))?;
//! let text = files.read_to_string("/work/in/data.txt")?;
//! for entry in files.list("/work", 2)? {                       // name, path, kind, size, mode...
//!     println!("{} {} {}", entry.path, entry.kind, entry.size);
//! }
//! files.download("/work/build.tar", "out.tar")?;
//! # Ok(()) }
//! ```
//! [`Capsule::files`] reads, writes, lists, stats, renames and removes files through the
//! guest's agent. Transfers stream in 1 MiB chunks, four in flight, so a file of any size
//! costs the host a few MiB ([`Files::read_into`], [`Files::write_from`],
//! [`Files::upload`], [`Files::download`]). Writes are atomic: a temporary file in the same
//! directory, renamed over the final name, so a capsule paused mid-write never shows a half
//! file (see [`Files`] for where a file is written in place instead). Errors are
//! [`Error::File`] with the guest path and a [`FileErrorKind`] (not found, is a directory,
//! permission denied, no space...). Files written before a pause are there after the resume,
//! and after an [`Engine`] reopen: the guest's file systems live in its memory. In the probe
//! every call is [`Error::Unsupported`].
//!
//! ## Choices worth knowing
//! - [`CapsuleConfig::wait`] defaults to `true`: `create` returns a running capsule.
//! - A command's timeout ([`RunOptions`], default 30 s for [`Commands::run`], none for
//!   [`Commands::spawn`] and terminals) kills the command, not the capsule.
//! - vCPU threads are interrupted with the real-time signal `SIGRTMIN` (+
//!   [`capsule_vmm::vcpu::KICK_SIGNAL_OFFSET`]); the engine installs its handler, so leave
//!   that signal to it.
//! - The threads that handle guest-controlled data (every vCPU thread; a Linux capsule's
//!   device thread) each install a seccomp filter on themselves, allowing only the system
//!   calls and KVM ioctls they need (the lists: [`capsule_vmm::seccomp`]). No other thread
//!   of your program is filtered. A call outside a list fails with `EPERM`: it kills neither
//!   the process nor the thread, and a capsule whose thread is refused a call it needs goes
//!   to [`Status::Error`] with the failed operation as its reason while the others carry on.
//!   Switch the filters off with [`EngineConfigBuilder::seccomp`]`(false)` when a debugger,
//!   profiler, sanitizer or `tracing` subscriber makes its own calls on those threads.
//! - Errors are one enum, [`Error`]; nothing in the API panics on bad input. One fact is one
//!   variant wherever it is seen: a capsule in error is [`Error::GuestCrashed`] (with its
//!   reason) for every call, a timeout is [`Error::Timeout`] with its [`TimeoutKind`] (a boot
//!   that runs out of time is [`Error::BootTimeout`]), a snapshot of another machine is
//!   [`Error::SnapshotMismatch`], a host that refuses a thread or descriptor is [`Error::Os`].
//! - Configuration: builders ([`EngineConfig::builder`], [`CapsuleConfig::builder`],
//!   [`RunOptions::new`]) and getters without `get_`; [`Engine::new`] and [`Engine::create`]
//!   take a config, its builder, or (for `create`) a template name.
//! - Words: a *snapshot* is the files of a frozen machine; a *pause* writes one into the
//!   capsule's own directory; [`Capsule::snapshot`] publishes one as a named *template*.
//! - Cargo features: `serde` (serialization of [`CapsuleInfo`], [`Status`], [`CapsuleId`],
//!   [`TemplateInfo`]); `testing` (hooks for this workspace's tests, benches and fuzz
//!   targets; not a stable API).
#![deny(missing_docs)]

// The modules, bottom to top: each imports only modules listed before it (`model` imports
// nothing of the crate, `api` may import everything; tests/layering.rs checks it).
//
// - model: plain data (ids, statuses, infos, command output, the capsule record)
// - error, config, sync: the error enum, configuration builders, lock helpers
// - store, snapshot_files, template, pool, limiter, periodic, pause_gate: the data directory,
//   snapshot files, templates, pre-built VM shells, the start limiter, a background-thread
//   helper, the inactivity watcher's test gate
// - guest: the guest kinds (probe, linux) and the contract a running guest fulfils
// - capsule_core, registry, admission, engine_core: one capsule's state and status machine,
//   the engine's capsules, its limits, its parts
// - host_limits: the process's limits (raising RLIMIT_NOFILE, naming what ran out)
// - lifecycle, command, recovery, idle_watch: the steps (create, pause, resume, snapshot,
//   destroy), running a command, start-up recovery, the inactivity watcher
// - api: the public handles, which only delegate
mod admission;
mod api;
mod capsule_core;
mod command;
mod config;
mod engine_core;
mod error;
mod guest;
mod host_limits;
mod idle_watch;
mod lifecycle;
mod limiter;
mod model;
mod pause_gate;
mod periodic;
mod pool;
mod recovery;
mod registry;
mod snapshot_files;
mod store;
mod sync;
mod template;

pub use crate::api::{
    Capsule, CommandHandle, Commands, Engine, Files, OutputStream, PtyHandle, Ptys,
};
pub use crate::config::{
    CapsuleConfig, CapsuleConfigBuilder, EngineConfig, EngineConfigBuilder, OutputCallback,
    RunOptions, DEFAULT_OUTPUT_LIMIT, DEFAULT_RUN_TIMEOUT,
};
pub use crate::error::{Error, KvmUnavailable, Resource, Result, TimeoutKind};
pub use crate::model::{
    CapsuleId, CapsuleInfo, Command, CommandOutput, InvalidId, Output, ParseStatusError,
    ProcessInfo, PtySize, Signal, Status, TemplateInfo,
};
pub use crate::model::{EntryInfo, EntryKind, FileErrorKind, WriteOptions};
pub use capsule_vmm::{HostInfo, Virtualization};

/// The kernel command line Linux capsules (the `"minimal"` template) boot with: console on
/// the UART (`ttyS0`), the agent's channel on the virtio-console (`/dev/hvc0`), and
/// `capsule.ready` so that the agent prints `capsule-agent: ready` on the console once its
/// `Hello` is sent.
pub const LINUX_KERNEL_CMDLINE: &str = guest::linux::CMDLINE;

/// Types of the test hooks (the `testing` feature); not part of the stable API.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::pause_gate::{AutoPauseHold, AutoPausePoint};
}

/// Entry points for the fuzz targets in `fuzz/` (the `testing` feature); not part of the
/// stable API.
#[cfg(feature = "testing")]
pub mod fuzzing {
    /// Decodes and validates a snapshot state file image (`state.bin`) the way `resume`
    /// does; `true` if it would be accepted. Never panics.
    pub fn decode_snapshot_state(bytes: &[u8]) -> bool {
        crate::snapshot_files::decode(bytes).is_ok()
    }
}

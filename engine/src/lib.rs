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
//! let capsule = engine.create(CapsuleConfig::new("probe").memory_mb(64))?;
//! let out = capsule.commands().run("echo hi")?;
//! assert_eq!((out.stdout.as_str(), out.exit_code), ("hi\n", 0));
//! println!("{:?}", capsule.info().status); // Running
//! capsule.destroy()?;
//! # Ok(()) }
//! ```
//!
//! ## Lifecycle
//! [`Status`]: `Pending` (accepted, waiting for a start slot) → `Starting` (VM built, guest
//! booting) → `Running` (the guest said it is ready) → `Stopped` (destroyed or exited).
//! `Error` means an unrecoverable failure (triple fault, KVM error...) and carries the reason
//! in [`CapsuleInfo::error`]; the capsule's VM is released at once and other capsules are
//! unaffected. `Paused` comes with snapshots.
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
//! ## Choices worth knowing
//! - [`CapsuleConfig::wait`] defaults to `true`: `create` returns a running capsule.
//! - A command's timeout ([`RunOptions`], default 30 s) kills the command, not the capsule.
//! - vCPU threads are interrupted with the real-time signal `SIGRTMIN` (+
//!   [`capsule_vmm::vcpu::KICK_SIGNAL_OFFSET`]); the engine installs its handler, so leave
//!   that signal to it.
//! - Errors are one enum, [`Error`]; nothing in the API panics on bad input.
#![deny(missing_docs)]

mod capsule;
mod config;
mod engine;
mod error;
mod guest;
mod id;
mod limiter;
mod persist;
mod pool;
mod status;
mod store;
mod template;

pub use crate::capsule::{Capsule, CommandOutput, Commands};
pub use crate::config::{CapsuleConfig, EngineConfig, RunOptions};
pub use crate::engine::Engine;
pub use crate::error::{Error, KvmUnavailable, Result};
pub use crate::id::CapsuleId;
pub use crate::status::{CapsuleInfo, Status};
pub use crate::template::TemplateInfo;
pub use capsule_vmm::{HostInfo, Virtualization};

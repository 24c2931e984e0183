//! The capsule in-guest agent.
//!
//! Inside a capsule microVM the agent is PID 1: it mounts the basic file
//! systems, loads kernel modules, reaps orphans, and serves the
//! [`capsule_agent_protocol`] on a byte stream to the host engine, running
//! commands on its behalf. Outside a VM it is an ordinary program that serves
//! one stream, which is how it is tested.
//!
//! The testable core is [`serve()`]: give it any reader and writer.
//!
//! Behaviour worth knowing:
//!
//! * Each command runs in its own process group (on a terminal: its own
//!   session, which is also a process group); timeouts, [`Message::Signal`]
//!   and a lost connection act on the whole group.
//! * Buffered output beyond a command's limit is read and discarded, so the
//!   command never blocks on a full pipe; the `truncated` flags say so.
//!   Streamed output is flow-controlled: the agent reads a command's pipes
//!   only while the host's window is open, so a host that stops taking
//!   output blocks the command, not the agent's memory.
//! * When the command's main process exits, output that background processes
//!   still hold open is read for at most [`ExecConfig::drain_grace`] (while
//!   the output can flow), then the pipes are closed and `Exit` is sent; such
//!   processes keep running.
//! * Stdin data is queued without bound while the command does not read it;
//!   the host is expected to pace large uploads.
//! * Every command is tracked in [`ServeConfig::processes`] until its `Exit`
//!   is sent: `ListProcesses` lists them, `Attach` moves a command's output
//!   and exit to a new request. A `Sync` (a new host side) detaches every
//!   command; with [`ServeConfig::keep_processes`] (PID 1) a connection's end
//!   detaches its commands instead of killing them. A detached command's
//!   output waits in its pipe and its exit is kept for an `Attach` (see the
//!   protocol crate's docs).
//! * `Run` with `user` looks the user up in [`ExecConfig::passwd`] and
//!   [`ExecConfig::group`] and switches to it in the child (groups, gid,
//!   uid); with `pty` the child leads a new session on a new terminal
//!   (`TERM` defaults to [`DEFAULT_TERM`]). As PID 1 the agent mounts
//!   `devpts` on `/dev/pts` for those terminals.
//! * `Hold` (sent before the host freezes the guest for a snapshot) stops
//!   every process's output and exit from being sent, with no send left half
//!   done, until `Release` (the guest runs on) or `Sync` (a restored guest:
//!   every process is detached, and exits that came meanwhile are kept for an
//!   `Attach`): a process that ends while a snapshot is resumed loses
//!   nothing.
//! * A [`Message::Sync`] is applied before the next frame is read: it sets
//!   the clock, feeds and reseeds the kernel CRNG, and sets variables
//!   ([`SyncEnv`]) for every later command, across reconnections with the
//!   same [`ServeConfig`].
//!
//! * File requests each run on their own thread, except `WriteFile`s, which
//!   one thread per connection carries out in arrival order (so the host may
//!   pipeline the chunks of a file); failures carry the `errno` family's
//!   error code (not found, is a directory, permission denied, no space...).
//!
//! [`Message::Signal`]: capsule_agent_protocol::Message::Signal
//! [`Message::Sync`]: capsule_agent_protocol::Message::Sync
#![warn(missing_docs)]

mod ctl;
pub mod exec;
mod files;
mod hold;
pub mod init;
mod pty;
pub mod reaper;
mod registry;
pub mod serve;
mod sync;
mod sys;
mod user;

pub use ctl::CmdCtl;
pub use exec::{ExecConfig, WaitMode, DEFAULT_PATH, DEFAULT_TERM};
pub use reaper::Reaper;
pub use registry::Processes;
pub use serve::{capabilities, serve, ServeConfig, ServeError, ServeOutcome, READY_LINE};
pub use sync::SyncEnv;

/// Whether process `pid` still exists (zombies included). Exposed for tests
/// and diagnostics.
pub fn process_exists(pid: i32) -> bool {
    sys::process_exists(pid)
}

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
//! * Each command runs in its own process group; timeouts, [`Message::Signal`]
//!   and a lost connection act on the whole group.
//! * Output beyond a command's limit is read and discarded, so the command
//!   never blocks on a full pipe; the `truncated` flags say so.
//! * When the command's main process exits, output that background processes
//!   still hold open is read for at most [`ExecConfig::drain_grace`], then the
//!   pipes are closed and `Exit` is sent; such processes keep running.
//! * Stdin data is queued without bound while the command does not read it;
//!   the host is expected to pace large uploads.
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

pub mod exec;
mod files;
pub mod init;
pub mod reaper;
pub mod serve;
mod sync;
mod sys;

pub use exec::{ExecConfig, WaitMode, DEFAULT_PATH};
pub use reaper::Reaper;
pub use serve::{capabilities, serve, ServeConfig, ServeError, ServeOutcome, READY_LINE};
pub use sync::SyncEnv;

/// Whether process `pid` still exists (zombies included). Exposed for tests
/// and diagnostics.
pub fn process_exists(pid: i32) -> bool {
    sys::process_exists(pid)
}

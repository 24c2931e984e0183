//! Pseudo-terminals for `Run` requests with `pty`: the master side stays
//! with the agent (output is read from it, stdin written to it), the slave
//! side becomes the command's stdin, stdout, stderr and controlling terminal.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use capsule_agent_protocol::WindowSize;

use crate::sys;

/// The master side of a command's terminal.
#[derive(Debug)]
pub(crate) struct Pty {
    /// Read for output, written for input (non-blocking).
    pub(crate) master: File,
}

impl Pty {
    /// Opens a terminal of `size` and sets `cmd` up to run on it: the slave
    /// side as its stdio, and the child as the leader of a new session with
    /// it as controlling terminal (`cmd` must not ask for a process group of
    /// its own; the session is one, with the child's pid as id).
    /// `owner` (uid, gid), if given, gets the terminal's device, as a login
    /// would (so the command may reopen it by name).
    pub(crate) fn open_for(
        cmd: &mut Command,
        size: WindowSize,
        owner: Option<(u32, u32)>,
    ) -> io::Result<Pty> {
        let (master, slave) = sys::open_pty()?;
        sys::set_window_size(&master, size.rows, size.cols)?;
        if let Some((uid, gid)) = owner {
            sys::chown_fd(&slave, uid, gid)?;
        }
        let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        cmd.stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(Stdio::from(slave));
        sys::leads_terminal_session(cmd);
        let master = File::from(master);
        sys::set_nonblocking(&master)?;
        Ok(Pty { master })
    }

    /// Sets the terminal's window size (its foreground processes get
    /// `SIGWINCH`).
    pub(crate) fn resize(&self, size: WindowSize) -> io::Result<()> {
        sys::set_window_size(&self.master, size.rows, size.cols)
    }
}

//! Child reaping for PID 1.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them
//! all, with `waitpid(-1)`. A plain per-command `waitpid(pid)` would race with
//! that: whichever call comes first takes the status. So in PID 1 mode one
//! [`Reaper`] owns all reaping and routes each status to the command that
//! waits for that pid; statuses of pids nobody waits for (orphans) are
//! dropped.
//!
//! Commands are spawned through [`Reaper`] *while it holds its table lock*,
//! and the reaper only calls `waitpid` under that lock, so a child can never
//! be reaped before it is registered (and std's own `waitpid` on a failed
//! `exec` cannot be robbed either).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::ctl::CmdCtl;
use crate::sys;

/// The single owner of `waitpid(-1)` in PID 1 mode. See the module docs.
#[derive(Debug)]
pub struct Reaper {
    table: Mutex<HashMap<i32, Arc<CmdCtl>>>,
    orphans: AtomicU64,
    interval: Duration,
}

impl Reaper {
    /// A reaper that, besides waking on SIGCHLD, polls every `interval`.
    ///
    /// SIGCHLD wake-ups only work when SIGCHLD is blocked in every thread of
    /// the process ([`Reaper::block_sigchld`] before any thread starts);
    /// otherwise the reaper falls back to polling every `interval`.
    pub fn new(interval: Duration) -> Arc<Reaper> {
        Arc::new(Reaper {
            table: Mutex::new(HashMap::new()),
            orphans: AtomicU64::new(0),
            interval,
        })
    }

    /// Blocks SIGCHLD in the calling thread; call from `main` before spawning
    /// any thread so that the whole process inherits the mask. Children
    /// spawned by std start with an empty signal mask.
    pub fn block_sigchld() -> io::Result<()> {
        sys::block_sigchld()
    }

    /// Makes this process a child subreaper, so that orphans of its commands
    /// come back to it (useful when the agent is not PID 1, and in tests).
    pub fn become_subreaper() -> io::Result<()> {
        sys::set_child_subreaper()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Arc<CmdCtl>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers its pid, atomically with respect to reaping.
    pub(crate) fn spawn(&self, cmd: &mut Command, ctl: &Arc<CmdCtl>) -> io::Result<Child> {
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let pid =
            i32::try_from(child.id()).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        table.insert(pid, Arc::clone(ctl));
        Ok(child)
    }

    /// Reaps every child that has exited, without blocking. Returns how many
    /// were reaped.
    pub fn reap_now(&self) -> usize {
        let mut table = self.lock();
        let mut n = 0;
        while let Some((pid, status)) = sys::reap_any() {
            n += 1;
            match table.remove(&pid) {
                Some(ctl) => ctl.set_exit(status),
                None => {
                    self.orphans.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        n
    }

    /// Number of reaped processes that no command was waiting for.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    /// Reaps forever: waits for SIGCHLD (or the poll interval), then
    /// [`Reaper::reap_now`]. Run it on a dedicated thread.
    pub fn run(&self) -> ! {
        loop {
            sys::wait_sigchld(self.interval);
            self.reap_now();
        }
    }
}

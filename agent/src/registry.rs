//! The processes the agent started and still tracks, by pid: what
//! `ListProcesses` lists and `Attach` finds. It lives in
//! [`crate::ServeConfig`], so it outlasts one connection.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use capsule_agent_protocol::{ProcessEntry, MAX_UNCLAIMED_EXITS};

use crate::ctl::{CmdCtl, Link};
use crate::hold::ReportGate;

/// The agent's processes (see the module docs). A cheap handle: clones share
/// one registry.
#[derive(Debug, Clone, Default)]
pub struct Processes {
    registry: Arc<Mutex<Registry>>,
    /// Whether their output and exits may be sent (`Hold`/`Release`).
    gate: ReportGate,
}

#[derive(Debug, Default)]
struct Registry {
    procs: BTreeMap<u32, Entry>,
    /// Pids of processes that ended while detached, oldest first.
    unclaimed: VecDeque<u32>,
}

#[derive(Debug)]
struct Entry {
    ctl: Arc<CmdCtl>,
    command: String,
    started_at_unix_ms: u64,
}

impl Processes {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The processes tracked now, by pid.
    pub fn list(&self) -> Vec<ProcessEntry> {
        self.lock()
            .procs
            .iter()
            .map(|(pid, e)| ProcessEntry {
                pid: *pid,
                command: e.command.clone(),
                started_at_unix_ms: e.started_at_unix_ms,
            })
            .collect()
    }

    /// How many processes are tracked.
    pub fn len(&self) -> usize {
        self.lock().procs.len()
    }

    /// Whether no process is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tracks a process that was just spawned. An entry already under `pid`
    /// can only be one that ended unclaimed (its pid was reused): it is
    /// forgotten.
    pub(crate) fn insert(&self, pid: u32, ctl: &Arc<CmdCtl>, command: String, started: u64) {
        let mut r = self.lock();
        let entry = Entry {
            ctl: Arc::clone(ctl),
            command,
            started_at_unix_ms: started,
        };
        if let Some(old) = r.procs.insert(pid, entry) {
            old.ctl.abandon();
        }
        r.unclaimed.retain(|p| *p != pid);
    }

    /// Stops tracking `pid`, if it is still `ctl`'s.
    pub(crate) fn remove(&self, pid: u32, ctl: &Arc<CmdCtl>) {
        let mut r = self.lock();
        if r.procs.get(&pid).is_some_and(|e| Arc::ptr_eq(&e.ctl, ctl)) {
            r.procs.remove(&pid);
            r.unclaimed.retain(|p| *p != pid);
        }
    }

    /// The process `pid`, taken off the unclaimed list (someone attaches).
    pub(crate) fn claim(&self, pid: u32) -> Option<Arc<CmdCtl>> {
        let mut r = self.lock();
        let ctl = r.procs.get(&pid).map(|e| Arc::clone(&e.ctl))?;
        r.unclaimed.retain(|p| *p != pid);
        Some(ctl)
    }

    /// Notes that `pid` ended while detached; beyond
    /// [`MAX_UNCLAIMED_EXITS`] such processes the oldest is forgotten.
    pub(crate) fn unclaimed(&self, pid: u32) {
        let mut r = self.lock();
        if !r.unclaimed.contains(&pid) {
            r.unclaimed.push_back(pid);
        }
        while r.unclaimed.len() > MAX_UNCLAIMED_EXITS {
            let Some(oldest) = r.unclaimed.pop_front() else {
                break;
            };
            if let Some(e) = r.procs.remove(&oldest) {
                e.ctl.abandon();
            }
        }
    }

    /// Detaches every process from the request receiving its output
    /// (`None`), or only those whose request is on `link`.
    pub(crate) fn detach(&self, link: Option<&Arc<Link>>) {
        let ctls: Vec<_> = self.lock().procs.values().map(|e| e.ctl.clone()).collect();
        for ctl in ctls {
            ctl.detach(link);
        }
    }

    /// The gate every report of a process (output, exit) passes.
    pub(crate) fn gate(&self) -> &ReportGate {
        &self.gate
    }

    /// Holds every process's reports once no send is in progress; `then`
    /// answers the `Hold` before any report may be sent again.
    pub(crate) fn hold(&self, then: impl FnOnce()) {
        self.gate.hold(then);
    }

    /// Ends a hold: processes report again (woken, for those that waited).
    pub(crate) fn release(&self) {
        if self.gate.release() {
            let ctls: Vec<_> = self.lock().procs.values().map(|e| e.ctl.clone()).collect();
            for ctl in ctls {
                ctl.wake();
            }
        }
    }
}

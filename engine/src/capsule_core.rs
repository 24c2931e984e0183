//! One capsule's shared state: what it was created as, its status (changed only through the
//! status machine, [`Status::after`]), its running guest and its console. Every handle to
//! the capsule and its guest's vCPU threads share one [`CapsuleCore`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use capsule_devices::serial::SerialLog;

use crate::error::{Error, Result, TimeoutKind};
use crate::guest::{GuestEvents, Runtime};
use crate::model::record::CapsuleRecord;
use crate::model::status::Transition;
use crate::model::{CapsuleId, CapsuleInfo, Status};
use crate::sync::{lock, wait_timeout};

/// State shared by every handle to one capsule and by its guest.
pub(crate) struct CapsuleCore {
    record: CapsuleRecord,
    /// Serialises lifecycle operations (start, pause, resume, snapshot, destroy); commands
    /// and status reads do not take it.
    ops: Mutex<()>,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    status: Status,
    error: Option<String>,
    /// How the guest ended, when it stopped by itself (see [`CapsuleInfo::ended`]).
    ended: Option<String>,
    /// When the capsule last started or finished a command or was pinged, or became
    /// running: the inactivity clock.
    last_activity: SystemTime,
    /// Commands running now: a capsule running one is never idle, however long it takes.
    running_commands: u32,
    /// Bumped by every activity, so that the inactivity watcher can tell whether any came
    /// while it was pausing the capsule.
    activity: u64,
    runtime: Option<Arc<dyn Runtime>>,
    /// The guest's console output; kept after the guest stops, for post-mortems.
    console: Option<SerialLog>,
}

/// A status change the status machine refused: the status the capsule was in, and the
/// guest the change would have installed (the caller shuts it down).
pub(crate) struct Refused {
    pub(crate) status: Status,
    pub(crate) runtime: Option<Arc<dyn Runtime>>,
}

impl CapsuleCore {
    pub(crate) fn new(record: CapsuleRecord, status: Status) -> Arc<Self> {
        Arc::new(CapsuleCore {
            record,
            ops: Mutex::new(()),
            state: Mutex::new(State {
                status,
                error: None,
                ended: None,
                last_activity: SystemTime::now(),
                running_commands: 0,
                activity: 0,
                runtime: None,
                console: None,
            }),
            changed: Condvar::new(),
        })
    }

    pub(crate) fn id(&self) -> &CapsuleId {
        &self.record.id
    }

    /// What the capsule was created as.
    pub(crate) fn record(&self) -> &CapsuleRecord {
        &self.record
    }

    /// Takes the capsule's lifecycle lock (see [`CapsuleCore::ops`]).
    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        lock(&self.ops)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The one place a capsule's status changes: `event` moves it as the status machine
    /// says, or is refused. `runtime` (for `Ready` and `Resume`) becomes its guest; any other
    /// event takes the guest off, and it is returned for the caller to shut down.
    /// `reason` (for `Crash`) is kept as the capsule's error.
    fn apply(
        &self,
        event: Transition,
        runtime: Option<Arc<dyn Runtime>>,
        reason: Option<String>,
    ) -> std::result::Result<Option<Arc<dyn Runtime>>, Refused> {
        let mut state = self.state();
        self.apply_locked(&mut state, event, runtime, reason)
    }

    /// [`CapsuleCore::apply`] with the state already locked.
    fn apply_locked(
        &self,
        state: &mut State,
        event: Transition,
        runtime: Option<Arc<dyn Runtime>>,
        reason: Option<String>,
    ) -> std::result::Result<Option<Arc<dyn Runtime>>, Refused> {
        let Some(next) = state.status.after(event) else {
            return Err(Refused {
                status: state.status,
                runtime,
            });
        };
        tracing::trace!(capsule = %self.record.id, from = %state.status, to = %next, ?event, "status");
        state.status = next;
        if reason.is_some() {
            state.error = reason;
        }
        let previous = match runtime {
            Some(runtime) => {
                if let Some(console) = runtime.console() {
                    state.console = Some(console);
                }
                // The idle clock starts when the capsule becomes able to work.
                note_activity(state);
                state.runtime.replace(runtime)
            }
            None => state.runtime.take(),
        };
        self.changed.notify_all();
        Ok(previous)
    }

    /// Pending → Starting. Errors with the state error if it was destroyed meanwhile.
    pub(crate) fn start(&self) -> Result<()> {
        self.apply(Transition::Start, None, None)
            .map(drop)
            .map_err(|refused| self.state_error_in(refused.status, "start"))
    }

    /// Starting → Running with its booted guest. If the capsule was destroyed while
    /// booting, the guest is shut down and the state error returned.
    pub(crate) fn ready(&self, runtime: Arc<dyn Runtime>) -> Result<()> {
        self.install(Transition::Ready, runtime, "start")
    }

    /// Paused → Running with its restored guest (or the guest is shut down and the state
    /// error returned).
    pub(crate) fn resumed(&self, runtime: Arc<dyn Runtime>) -> Result<()> {
        self.install(Transition::Resume, runtime, "resume")
    }

    fn install(
        &self,
        event: Transition,
        runtime: Arc<dyn Runtime>,
        operation: &'static str,
    ) -> Result<()> {
        match self.apply(event, Some(runtime), None) {
            Ok(previous) => {
                // Never two guests at once: the status machine only installs over none.
                if let Some(previous) = previous {
                    previous.shutdown();
                }
                Ok(())
            }
            Err(refused) => {
                if let Some(runtime) = refused.runtime {
                    runtime.shutdown();
                }
                Err(self.state_error_in(refused.status, operation))
            }
        }
    }

    /// Running → Paused; returns the guest to shut down (its state is on disk).
    pub(crate) fn paused(&self) -> Result<Option<Arc<dyn Runtime>>> {
        self.apply(Transition::Pause, None, None)
            .map_err(|refused| self.state_error_in(refused.status, "pause"))
    }

    /// Moves to Error with `reason`; the guest (if any) is released on another thread,
    /// since this may be called from one of its own vCPU threads. Does nothing if the
    /// capsule cannot crash (already stopped, in error, or paused).
    pub(crate) fn crash(&self, reason: String) {
        if let Ok(runtime) = self.apply(Transition::Crash, None, Some(reason)) {
            release_in_background(self.id(), runtime);
        }
    }

    /// Moves to Stopped and releases the guest, waiting for its threads. Irreversible.
    pub(crate) fn destroy(&self) {
        if let Ok(Some(runtime)) = self.apply(Transition::Destroy, None, None) {
            runtime.shutdown();
        }
    }

    pub(crate) fn status(&self) -> Status {
        self.state().status
    }

    pub(crate) fn info(&self) -> CapsuleInfo {
        let state = self.state();
        let r = &self.record;
        CapsuleInfo {
            id: r.id.clone(),
            status: state.status,
            template: r.template.clone(),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            timeout: r.timeout,
            created_at: r.created_at,
            last_activity: state.last_activity,
            error: state.error.clone(),
            ended: state.ended.clone(),
        }
    }

    /// Counts as activity if the capsule is running: resets the inactivity clock.
    pub(crate) fn ping(&self) -> Result<()> {
        let mut state = self.state();
        if state.status != Status::Running {
            return Err(self.error_for(state.status, state.error.clone(), "ping"));
        }
        note_activity(&mut state);
        Ok(())
    }

    /// The running guest for a command about to start, which counts as activity until the
    /// returned guard drops (the command ended). Status check and activity are one step, so
    /// an auto-pause either sees the command or the command sees the capsule paused.
    pub(crate) fn begin_command(&self) -> Result<(Arc<dyn Runtime>, CommandActivity<'_>)> {
        let runtime = self.start_command()?;
        Ok((runtime, CommandActivity { capsule: self }))
    }

    /// Counts a command as running, if the capsule is running; its guest.
    fn start_command(&self) -> Result<Arc<dyn Runtime>> {
        let mut state = self.state();
        match (&state.runtime, state.status) {
            (Some(runtime), Status::Running) => {
                let runtime = runtime.clone();
                state.running_commands += 1;
                note_activity(&mut state);
                Ok(runtime)
            }
            (_, status) => Err(self.error_for(status, state.error.clone(), "run a command")),
        }
    }

    /// As [`CapsuleCore::begin_command`], for a command whose handle outlives the call (a
    /// spawned command): the guard owns a reference to the capsule.
    pub(crate) fn begin_command_owned(
        self: &Arc<Self>,
    ) -> Result<(Arc<dyn Runtime>, OwnedActivity)> {
        let runtime = self.start_command()?;
        Ok((
            runtime,
            OwnedActivity {
                capsule: self.clone(),
            },
        ))
    }

    /// A command counted as running ended: that counts as activity too.
    fn end_command(&self) {
        let mut state = self.state();
        state.running_commands = state.running_commands.saturating_sub(1);
        note_activity(&mut state);
    }

    /// [`CapsuleCore::begin_command`] for a guest I/O request other than a command (a file
    /// transfer...), named `operation` in errors: it counts as a running command until the
    /// guard drops, so the capsule is never auto-paused in the middle of it.
    pub(crate) fn begin_io(
        &self,
        operation: &'static str,
    ) -> Result<(Arc<dyn Runtime>, CommandActivity<'_>)> {
        let mut state = self.state();
        match (&state.runtime, state.status) {
            (Some(runtime), Status::Running) => {
                let runtime = runtime.clone();
                state.running_commands += 1;
                note_activity(&mut state);
                Ok((runtime, CommandActivity { capsule: self }))
            }
            (_, status) => Err(self.error_for(status, state.error.clone(), operation)),
        }
    }

    /// [`CapsuleCore::interrupted_error`] for a guest I/O request named `operation`.
    pub(crate) fn interrupted_io(&self, operation: &'static str) -> Error {
        let state = self.state();
        let status = match state.status {
            Status::Running => Status::Paused,
            status => status,
        };
        self.error_for(status, state.error.clone(), operation)
    }

    /// If the capsule is running, runs no command and has been idle for at least its
    /// timeout at `now`: a stamp of its activity, to hand to
    /// [`CapsuleCore::pause_if_still_idle`].
    pub(crate) fn idle_stamp(&self, now: SystemTime) -> Option<IdleStamp> {
        let state = self.state();
        let timeout = self.record.timeout;
        let idle = !timeout.is_zero()
            && state.status == Status::Running
            && state.running_commands == 0
            && now
                .duration_since(state.last_activity)
                .is_ok_and(|idle| idle >= timeout);
        idle.then_some(IdleStamp(state.activity))
    }

    /// Whether nothing happened since `stamp` was taken.
    pub(crate) fn still_idle(&self, stamp: IdleStamp) -> bool {
        let state = self.state();
        state.activity == stamp.0 && state.running_commands == 0
    }

    /// Running → Paused, for the inactivity watcher: only if nothing happened since
    /// `stamp`, checked in the same step as the status change. `Ok(None)` when the capsule
    /// was used meanwhile (it stays running); otherwise the guest to shut down.
    pub(crate) fn pause_if_still_idle(
        &self,
        stamp: IdleStamp,
    ) -> Result<Option<Option<Arc<dyn Runtime>>>> {
        let mut state = self.state();
        if state.activity != stamp.0 || state.running_commands != 0 {
            return Ok(None);
        }
        self.apply_locked(&mut state, Transition::Pause, None, None)
            .map(Some)
            .map_err(|refused| self.error_for(refused.status, state.error.clone(), "pause"))
    }

    /// The guest's console output so far (empty for guests without a console).
    pub(crate) fn console_log(&self) -> String {
        self.state()
            .console
            .as_ref()
            .map(|log| String::from_utf8_lossy(&log.console_log()).into_owned())
            .unwrap_or_default()
    }

    /// The running guest, or the error that explains why there is none.
    pub(crate) fn runtime(&self, operation: &'static str) -> Result<Arc<dyn Runtime>> {
        let state = self.state();
        match (&state.runtime, state.status) {
            (Some(runtime), Status::Running) => Ok(runtime.clone()),
            (_, status) => Err(self.error_for(status, state.error.clone(), operation)),
        }
    }

    /// Why a command handed to a guest never finished: the guest crashed, was destroyed, or
    /// was paused (if it is running again now, it was paused and resumed meanwhile, so the
    /// answer is still "paused").
    pub(crate) fn interrupted_error(&self) -> Error {
        let state = self.state();
        let status = match state.status {
            Status::Running => Status::Paused,
            status => status,
        };
        self.error_for(status, state.error.clone(), "run a command")
    }

    /// The error explaining why `operation` cannot run in the capsule's current status.
    pub(crate) fn state_error(&self, operation: &'static str) -> Error {
        let state = self.state();
        self.error_for(state.status, state.error.clone(), operation)
    }

    fn state_error_in(&self, status: Status, operation: &'static str) -> Error {
        let error = self.state().error.clone();
        self.error_for(status, error, operation)
    }

    /// One fact, one variant: a capsule in error is reported as crashed, with its reason,
    /// whatever was attempted.
    fn error_for(&self, status: Status, error: Option<String>, operation: &'static str) -> Error {
        match (status, error) {
            (Status::Error, Some(reason)) => Error::GuestCrashed {
                id: self.id().clone(),
                reason,
            },
            (status, _) => Error::InvalidState {
                id: self.id().clone(),
                status,
                operation,
            },
        }
    }

    /// Blocks until the capsule is running, waking on every status change and at least
    /// every `interval`.
    pub(crate) fn wait_ready(&self, timeout: Duration, interval: Duration) -> Result<()> {
        // A timeout too long to add to the clock means no deadline.
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.state();
        loop {
            match state.status {
                Status::Running => return Ok(()),
                Status::Pending | Status::Starting => {}
                status => {
                    return Err(self.error_for(status, state.error.clone(), "wait until ready"))
                }
            }
            let now = Instant::now();
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
            if left.is_zero() {
                return Err(Error::Timeout {
                    kind: TimeoutKind::WaitReady,
                    after: timeout,
                });
            }
            let wait = left.min(interval.max(Duration::from_millis(1)));
            state = wait_timeout(&self.changed, state, wait);
        }
    }
}

impl GuestEvents for CapsuleCore {
    fn crashed(&self, reason: String) {
        self.crash(reason);
    }

    fn exited(&self, how: String) {
        let mut state = self.state();
        if let Ok(runtime) = self.apply_locked(&mut state, Transition::Exit, None, None) {
            state.ended = Some(how);
            drop(state);
            release_in_background(self.id(), runtime);
        }
    }
}

/// The activity stamp of an idle capsule (see [`CapsuleCore::idle_stamp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdleStamp(u64);

/// A command counted as running; its end counts as activity too.
pub(crate) struct CommandActivity<'a> {
    capsule: &'a CapsuleCore,
}

impl Drop for CommandActivity<'_> {
    fn drop(&mut self) {
        self.capsule.end_command();
    }
}

/// A command counted as running, for as long as this lives (see
/// [`CapsuleCore::begin_command_owned`]).
pub(crate) struct OwnedActivity {
    capsule: Arc<CapsuleCore>,
}

impl Drop for OwnedActivity {
    fn drop(&mut self) {
        self.capsule.end_command();
    }
}

/// Records one activity: the inactivity clock restarts.
fn note_activity(state: &mut State) {
    state.activity = state.activity.wrapping_add(1);
    state.last_activity = SystemTime::now();
}

/// Shuts a guest down on another thread (the caller may be one of its vCPU threads).
fn release_in_background(id: &CapsuleId, runtime: Option<Arc<dyn Runtime>>) {
    let Some(runtime) = runtime else { return };
    let spawned = std::thread::Builder::new()
        .name(format!("{id}-teardown"))
        .spawn(move || runtime.shutdown());
    if spawned.is_err() {
        // Cannot tear down now; the VM is released when its last reference drops.
        tracing::error!(capsule = %id, "could not spawn a teardown thread");
    }
}

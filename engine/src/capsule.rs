//! A capsule: its shared state, the handle users hold, and running commands in it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::config::RunOptions;
use crate::engine::EngineInner;
use crate::error::{Error, Result};
use crate::guest::{GuestEvents, GuestKind, Job, JobControl, Resources, Runtime};
use crate::id::CapsuleId;
use crate::status::{CapsuleInfo, Status};
use crate::store::{unix_ms, CapsuleMeta};
use crate::template::TemplateInfo;
use capsule_devices::serial::SerialLog;

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOutput {
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Exit code; 127 for an unknown command.
    pub exit_code: i32,
    /// Wall-clock time from sending the command to receiving its result.
    pub duration: Duration,
    /// Whether stdout was cut at the guest's output limit.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the guest's output limit.
    pub stderr_truncated: bool,
}

impl CommandOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// State shared by every handle to one capsule and by its guest.
pub(crate) struct CapsuleShared {
    pub(crate) id: CapsuleId,
    /// The template it was created from.
    pub(crate) template: String,
    /// The kind of guest it runs.
    pub(crate) kind: GuestKind,
    pub(crate) resources: Resources,
    /// Inactivity timeout (zero: never auto-pause).
    pub(crate) timeout: Duration,
    created_at: SystemTime,
    /// Serialises lifecycle operations (start, pause, resume, snapshot, destroy); commands
    /// and status reads do not take it.
    pub(crate) ops: Mutex<()>,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    status: Status,
    error: Option<String>,
    last_activity: SystemTime,
    runtime: Option<Arc<dyn Runtime>>,
    /// The guest's console output; kept after the guest stops, for post-mortems.
    console: Option<SerialLog>,
}

/// What a new [`CapsuleShared`] is made of.
pub(crate) struct CapsuleSpec {
    pub(crate) id: CapsuleId,
    pub(crate) template: String,
    pub(crate) kind: GuestKind,
    pub(crate) resources: Resources,
    pub(crate) timeout: Duration,
    pub(crate) created_at: SystemTime,
    pub(crate) status: Status,
}

impl CapsuleShared {
    pub(crate) fn new(spec: CapsuleSpec) -> Arc<Self> {
        Arc::new(CapsuleShared {
            id: spec.id,
            template: spec.template,
            kind: spec.kind,
            resources: spec.resources,
            timeout: spec.timeout,
            created_at: spec.created_at,
            ops: Mutex::new(()),
            state: Mutex::new(State {
                status: spec.status,
                error: None,
                last_activity: SystemTime::now(),
                runtime: None,
                console: None,
            }),
            changed: Condvar::new(),
        })
    }

    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the data directory describes this capsule.
    pub(crate) fn meta(&self) -> CapsuleMeta {
        CapsuleMeta {
            id: self.id.to_string(),
            template: self.template.clone(),
            kind: self.kind.name().to_owned(),
            vcpus: self.resources.vcpus,
            memory_mb: self.resources.memory_mb,
            timeout_ms: self.timeout.as_millis() as u64,
            created_at_ms: unix_ms(self.created_at),
        }
    }

    /// The running guest, if the capsule is running.
    pub(crate) fn running_runtime(&self) -> Option<Arc<dyn Runtime>> {
        let state = self.state();
        match state.status {
            Status::Running => state.runtime.clone(),
            _ => None,
        }
    }

    /// Running → Paused, handing back the guest to shut down.
    pub(crate) fn mark_paused(&self) -> Option<Arc<dyn Runtime>> {
        let mut state = self.state();
        state.status = Status::Paused;
        self.changed.notify_all();
        state.runtime.take()
    }

    /// Paused → Running with a restored guest.
    pub(crate) fn mark_resumed(&self, runtime: Arc<dyn Runtime>) {
        let mut state = self.state();
        state.status = Status::Running;
        state.runtime = Some(runtime);
        state.last_activity = SystemTime::now();
        self.changed.notify_all();
    }

    /// When the capsule last ran a command or was pinged.
    pub(crate) fn last_activity(&self) -> SystemTime {
        self.state().last_activity
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn status(&self) -> Status {
        self.state().status
    }

    pub(crate) fn info(&self) -> CapsuleInfo {
        let state = self.state();
        CapsuleInfo {
            id: self.id.clone(),
            status: state.status,
            template: self.template.clone(),
            vcpus: self.resources.vcpus,
            memory_mb: self.resources.memory_mb,
            timeout: self.timeout,
            created_at: self.created_at,
            last_activity: state.last_activity,
            error: state.error.clone(),
        }
    }

    /// Moves Pending → Starting; false if the capsule was destroyed meanwhile.
    pub(crate) fn mark_starting(&self) -> bool {
        let mut state = self.state();
        if state.status != Status::Pending {
            return false;
        }
        state.status = Status::Starting;
        self.changed.notify_all();
        true
    }

    /// Installs the booted guest and moves Starting → Running. If the capsule was destroyed
    /// while booting, the guest is shut down instead.
    pub(crate) fn mark_running(&self, runtime: Arc<dyn Runtime>) {
        let mut state = self.state();
        if state.status != Status::Starting {
            drop(state);
            runtime.shutdown();
            return;
        }
        state.status = Status::Running;
        state.console = runtime.console();
        state.runtime = Some(runtime);
        self.changed.notify_all();
    }

    /// The guest's console output so far (empty for guests without a console).
    pub(crate) fn console_log(&self) -> String {
        self.state()
            .console
            .as_ref()
            .map(|log| String::from_utf8_lossy(&log.console_log()).into_owned())
            .unwrap_or_default()
    }

    /// Moves to Error with `reason`. The guest (if any) is released on another thread, since
    /// this may be called from one of its own vCPU threads.
    pub(crate) fn fail(&self, reason: String) {
        let runtime = {
            let mut state = self.state();
            if state.status.is_terminal() {
                return;
            }
            state.status = Status::Error;
            state.error = Some(reason);
            self.changed.notify_all();
            state.runtime.take()
        };
        release_in_background(&self.id, runtime);
    }

    /// Moves to Stopped and releases the guest, waiting for its threads. Irreversible.
    pub(crate) fn stop(&self) {
        let runtime = {
            let mut state = self.state();
            // A crashed capsule that is destroyed is stopped too; its error stays readable.
            state.status = Status::Stopped;
            self.changed.notify_all();
            state.runtime.take()
        };
        if let Some(runtime) = runtime {
            runtime.shutdown();
        }
    }

    pub(crate) fn touch(&self) {
        self.state().last_activity = SystemTime::now();
    }

    /// The running guest, or the error that explains why there is none.
    fn runtime(&self, operation: &'static str) -> Result<Arc<dyn Runtime>> {
        let state = self.state();
        match (&state.runtime, state.status) {
            (Some(runtime), Status::Running) => Ok(runtime.clone()),
            (_, status) => Err(self.state_error(status, state.error.clone(), operation)),
        }
    }

    /// Why a command handed to a guest never ran: the guest crashed, was destroyed, or was
    /// paused before the command started (if it is running again now, it was paused and
    /// resumed meanwhile, so the answer is still "paused").
    fn interrupted_error(&self) -> Error {
        let state = self.state();
        let status = match state.status {
            Status::Running => Status::Paused,
            status => status,
        };
        self.state_error(status, state.error.clone(), "run a command")
    }

    /// The error explaining why `operation` cannot run in the capsule's current status.
    pub(crate) fn current_state_error(&self, operation: &'static str) -> Error {
        let state = self.state();
        self.state_error(state.status, state.error.clone(), operation)
    }

    pub(crate) fn state_error(
        &self,
        status: Status,
        error: Option<String>,
        operation: &'static str,
    ) -> Error {
        match (status, error) {
            (Status::Error, Some(reason)) => Error::GuestCrashed {
                id: self.id.clone(),
                reason,
            },
            (status, _) => Error::InvalidState {
                id: self.id.clone(),
                status,
                operation,
            },
        }
    }

    pub(crate) fn wait_ready(&self, timeout: Duration, interval: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            match state.status {
                Status::Running => return Ok(()),
                Status::Pending | Status::Starting => {}
                status => {
                    return Err(Error::InvalidState {
                        id: self.id.clone(),
                        status,
                        operation: "wait until ready",
                    })
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    operation: "wait until ready",
                    after: timeout,
                });
            }
            let wait = (deadline - now).min(interval.max(Duration::from_millis(1)));
            state = self
                .changed
                .wait_timeout(state, wait)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn run(&self, command: &str, options: &RunOptions) -> Result<CommandOutput> {
        let bytes = command.as_bytes();
        let runtime = self.runtime("run a command")?;
        if bytes.len() > runtime.max_command_len() {
            return Err(Error::InvalidArgument(format!(
                "the command is {} bytes; this guest accepts at most {}",
                bytes.len(),
                runtime.max_command_len()
            )));
        }
        self.touch();
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let control = Arc::new(JobControl::default());
        let job = Job {
            command: bytes.to_vec(),
            reply: reply_tx,
            control: control.clone(),
            options: options.clone(),
        };
        if runtime.submit(job).is_err() {
            return Err(self.interrupted_error());
        }
        drop(runtime);
        let result = match options.timeout {
            Some(limit) => reply_rx.recv_timeout(limit).map_err(|e| e.is_timeout()),
            None => reply_rx.recv().map_err(|_| false),
        };
        self.touch();
        match result {
            Ok(output) => output,
            Err(true) => {
                control.cancel();
                Err(Error::Timeout {
                    operation: "command",
                    after: options.timeout.unwrap_or_default(),
                })
            }
            Err(false) => Err(self.interrupted_error()),
        }
    }
}

impl GuestEvents for CapsuleShared {
    fn crashed(&self, reason: String) {
        self.fail(reason);
    }

    fn exited(&self) {
        let runtime = {
            let mut state = self.state();
            if state.status.is_terminal() {
                return;
            }
            state.status = Status::Stopped;
            self.changed.notify_all();
            state.runtime.take()
        };
        release_in_background(&self.id, runtime);
    }
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

/// A handle to a capsule. Cheap to clone; every clone refers to the same capsule, and all are
/// `Send + Sync`. Dropping handles does not destroy the capsule: call [`Capsule::destroy`].
#[derive(Clone)]
pub struct Capsule {
    pub(crate) shared: Arc<CapsuleShared>,
    pub(crate) engine: Arc<EngineInner>,
}

impl std::fmt::Debug for Capsule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capsule")
            .field("id", &self.shared.id)
            .field("status", &self.shared.status())
            .finish()
    }
}

impl Capsule {
    /// The capsule's id.
    pub fn id(&self) -> &CapsuleId {
        &self.shared.id
    }

    /// Blocks until the capsule is running. Wakes as soon as the status changes and
    /// re-checks at least every `interval`.
    ///
    /// Errors: [`Error::Timeout`] if it is not running within `timeout`;
    /// [`Error::InvalidState`] at once if it is (or becomes) error, stopped or paused.
    pub fn wait_ready(&self, timeout: Duration, interval: Duration) -> Result<()> {
        self.shared.wait_ready(timeout, interval)
    }

    /// Whether the capsule is running now.
    pub fn is_running(&self) -> bool {
        self.shared.status() == Status::Running
    }

    /// Current status.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Everything known about the capsule now.
    pub fn info(&self) -> CapsuleInfo {
        self.shared.info()
    }

    /// The guest's serial console output so far, newest 64 KiB at most (Linux capsules; the
    /// probe has no console and returns an empty string). Still readable after the capsule
    /// stopped or crashed.
    pub fn console_log(&self) -> String {
        self.shared.console_log()
    }

    /// Runs commands in the capsule.
    pub fn commands(&self) -> Commands<'_> {
        Commands { capsule: self }
    }

    /// Stops the capsule and releases everything it holds, its files on disk included.
    /// Irreversible: afterwards the id is unknown to the engine and this handle reports
    /// [`Status::Stopped`]. Works in every status.
    pub fn destroy(&self) -> Result<()> {
        self.engine.destroy(&self.shared.id).or_else(|e| match e {
            // Another handle destroyed it first: the outcome is the same.
            Error::NotFound(_) => Ok(()),
            e => Err(e),
        })
    }

    /// Pauses the capsule: stops its vCPUs between commands (waiting for running ones),
    /// writes its whole state to the engine's data directory, and releases its VM (CPU,
    /// memory, threads). A capsule that came from a snapshot or template writes only the
    /// memory pages changed since. Pausing a paused capsule does nothing.
    ///
    /// Errors: [`Error::InvalidState`] if stopped or in error; [`Error::Snapshot`] or
    /// [`Error::Io`] if the state cannot be written, in which case the capsule keeps running
    /// and any earlier snapshot is intact.
    pub fn pause(&self) -> Result<()> {
        self.engine.pause(&self.shared)
    }

    /// Resumes a paused capsule exactly where it was: memory is mapped back copy-on-write
    /// and every vCPU, device and guest state restored. Resuming a running capsule does
    /// nothing.
    ///
    /// Errors: [`Error::InvalidState`] if stopped or in error; [`Error::Snapshot`] if the
    /// snapshot is missing, corrupt or truncated (the capsule then stays paused).
    pub fn resume(&self) -> Result<()> {
        self.engine.resume(&self.shared)
    }

    /// Counts as activity: resets the inactivity timer. Errors with
    /// [`Error::InvalidState`] unless the capsule is running.
    pub fn ping(&self) -> Result<()> {
        if self.shared.status() != Status::Running {
            return Err(self.shared.current_state_error("ping"));
        }
        self.shared.touch();
        Ok(())
    }

    /// Creates a template named `name` from the capsule's current state; the capsule keeps
    /// running. New capsules start from it with `CapsuleConfig::new(name)`, sharing its
    /// memory copy-on-write.
    ///
    /// Errors: [`Error::InvalidArgument`] for a bad or taken name, [`Error::InvalidState`]
    /// unless running, [`Error::Snapshot`]/[`Error::Io`] if it cannot be written.
    pub fn snapshot(&self, name: &str) -> Result<TemplateInfo> {
        self.engine.snapshot(&self.shared, name)
    }
}

/// Runs commands in one capsule; see [`Capsule::commands`].
#[derive(Debug, Clone, Copy)]
pub struct Commands<'a> {
    capsule: &'a Capsule,
}

impl Commands<'_> {
    /// Runs `command` with the default [`RunOptions`] (30 s timeout).
    ///
    /// For the probe template the commands are `echo TEXT`, `exit N`, `count`, `touch N`,
    /// `sum`, `spin N` and `crash`; see the crate docs.
    pub fn run(&self, command: &str) -> Result<CommandOutput> {
        self.run_with(command, RunOptions::default())
    }

    /// Runs `command` with `options`. A command that outlives its timeout is killed and
    /// [`Error::Timeout`] returned; the capsule stays usable. If the guest crashes meanwhile
    /// the result is [`Error::GuestCrashed`].
    pub fn run_with(&self, command: &str, options: RunOptions) -> Result<CommandOutput> {
        self.capsule.shared.run(command, &options)
    }
}

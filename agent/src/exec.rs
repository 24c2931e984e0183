//! Running one process: spawn it (in its own process group, or as the
//! leader of a session on its own terminal; as the agent or as another
//! user), feed its stdin, collect or stream its output under the flow-control
//! window, enforce the timeout, and report the exit to whichever request
//! receives it by then (see the protocol crate's docs on detaching and
//! attaching).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_agent_protocol::{
    finish_output, Command, ErrorCode, ExitInfo, ExitStatus, Message, RunRequest,
    DATA_FRAME_PREFIX_LEN, MAX_BUFFERED_OUTPUT, STREAM_WINDOW,
};

use crate::ctl::{CmdCtl, Subscriber};
use crate::pty::Pty;
use crate::reaper::Reaper;
use crate::registry::Processes;
use crate::sys;
use crate::user::{self, Account};

/// `PATH` given to commands when neither the agent's environment nor the
/// request sets one (the kernel starts PID 1 without it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `TERM` given to commands on a terminal unless the request (or a `Sync`)
/// sets one.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// Most bytes of output read at once: a full read's frame is 64 KiB, whole pages of the
/// guest console's buffer (each partial page costs the guest one more transmit).
const READ_CHUNK: usize = 64 * 1024 - DATA_FRAME_PREFIX_LEN;

/// How the agent learns that a command's process exited.
#[derive(Debug, Clone, Default)]
pub enum WaitMode {
    /// Each command waits for its own pid (`waitpid(pid)`) on a helper
    /// thread. Right when the agent is not PID 1 and other code in the
    /// process may have children of its own.
    #[default]
    Direct,
    /// A process-wide [`Reaper`] owns `waitpid(-1)` and routes statuses
    /// (PID 1 mode).
    Global(Arc<Reaper>),
}

/// Knobs for running commands.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// How exits are collected.
    pub wait_mode: WaitMode,
    /// After the main process exits, how long to keep reading output that
    /// background processes still hold open before reporting the exit
    /// (counted while the output can be read: a streamed request whose
    /// window is shut, or that nobody receives, waits for the host).
    pub drain_grace: Duration,
    /// The passwd file users are looked up in (`/etc/passwd`).
    pub passwd: PathBuf,
    /// The group file supplementary groups are read from (`/etc/group`).
    pub group: PathBuf,
}

impl Default for ExecConfig {
    fn default() -> ExecConfig {
        ExecConfig {
            wait_mode: WaitMode::Direct,
            drain_grace: Duration::from_millis(100),
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
        }
    }
}

/// Output accounting for one of stdout/stderr: the limit, and what a
/// buffered request collected.
struct Sink {
    stderr: bool,
    limit: u64,
    taken: u64,
    buf: Vec<u8>,
    truncated: bool,
}

impl Sink {
    fn new(stderr: bool, stream: bool, limit: u32) -> Sink {
        let limit = match (stream, limit) {
            (true, u32::MAX) => u64::MAX,
            (true, l) => u64::from(l),
            (false, l) => u64::from(l.min(MAX_BUFFERED_OUTPUT)),
        };
        Sink {
            stderr,
            limit,
            taken: 0,
            buf: Vec::new(),
            truncated: false,
        }
    }

    /// The part of `data` within the limit; the rest is discarded.
    fn admit<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        let room = self.limit - self.taken;
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        if n < data.len() {
            self.truncated = true;
        }
        self.taken += n as u64;
        &data[..n]
    }

    fn chunk(&self, data: Vec<u8>) -> Message {
        if self.stderr {
            Message::Stderr(data)
        } else {
            Message::Stdout(data)
        }
    }
}

/// The command for `req`, without its stdio when it runs on a terminal (see
/// [`Pty::open_for`]). Its environment: the agent's (none if `clear_env`),
/// then the user's `HOME`, `USER` and `LOGNAME` (with `user`), then `TERM`
/// ([`DEFAULT_TERM`], on a terminal), then `sync_env` (from the last
/// `Sync`), then the request's `env`; later ones override earlier ones.
/// `PATH` is [`DEFAULT_PATH`] when none of them sets it.
fn build_command(
    req: &RunRequest,
    sync_env: &[(String, String)],
    account: Option<&Account>,
) -> StdCommand {
    let mut cmd = match &req.command {
        Command::Shell(script) => {
            let mut c = StdCommand::new("/bin/sh");
            c.arg("-c").arg(script);
            c
        }
        Command::Exec { program, args } => {
            let mut c = StdCommand::new(program);
            c.args(args);
            c
        }
    };
    if req.clear_env {
        cmd.env_clear();
    }
    let path_given = sync_env.iter().chain(&req.env).any(|(k, _)| k == "PATH");
    if !path_given && (req.clear_env || std::env::var_os("PATH").is_none()) {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(a) = account {
        cmd.env("HOME", &a.home)
            .env("USER", &a.name)
            .env("LOGNAME", &a.name);
    }
    if req.pty.is_some() {
        cmd.env("TERM", DEFAULT_TERM);
    }
    for (k, v) in sync_env.iter().chain(&req.env) {
        cmd.env(k, v);
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    if req.pty.is_none() {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    }
    cmd
}

/// What was run, as `ListProcesses` shows it.
fn command_text(command: &Command) -> String {
    match command {
        Command::Shell(script) => script.clone(),
        Command::Exec { program, args } => {
            let mut text = program.clone();
            for a in args {
                text.push(' ');
                text.push_str(a);
            }
            text
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn deadline_after(start: Instant, ms: u64) -> Option<Instant> {
    if ms == 0 {
        None
    } else {
        start.checked_add(Duration::from_millis(ms))
    }
}

/// Stdin side of the poll loop: a pipe, or the terminal's master side.
struct StdinFeed {
    pipe: Option<File>,
    /// On a terminal, closing stdin types Ctrl-D instead of closing.
    pty: bool,
    eof_typed: bool,
    current: Vec<u8>,
    offset: usize,
}

impl StdinFeed {
    /// Moves queued data in, closes the pipe when asked and drained.
    fn refill(&mut self, stdin: &mut VecDeque<Vec<u8>>, close: bool) {
        if self.pipe.is_none() {
            stdin.clear();
            return;
        }
        if self.offset < self.current.len() {
            return;
        }
        match stdin.pop_front() {
            Some(next) => {
                self.current = next;
                self.offset = 0;
            }
            None if close && self.pty && !self.eof_typed => {
                self.eof_typed = true;
                self.current = vec![0x04];
                self.offset = 0;
            }
            None if close && !self.pty => self.pipe = None,
            None => {}
        }
    }

    fn wants_write(&self) -> bool {
        self.pipe.is_some() && self.offset < self.current.len()
    }

    fn write_some(&mut self) {
        let Some(pipe) = &mut self.pipe else { return };
        match pipe.write(&self.current[self.offset..]) {
            Ok(n) => self.offset += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the reader is gone; drop everything still queued.
            Err(_) => {
                self.pipe = None;
                self.current.clear();
                self.offset = 0;
            }
        }
    }
}

/// A process to start, and everything its thread needs.
pub(crate) struct Job {
    pub(crate) req: RunRequest,
    /// Variables of the last `Sync`, taken when the `Run` arrived.
    pub(crate) sync_env: Vec<(String, String)>,
    pub(crate) ctl: Arc<CmdCtl>,
    /// The request that started it: first to receive its output.
    pub(crate) subscriber: Subscriber,
    pub(crate) processes: Processes,
    pub(crate) config: ExecConfig,
}

/// Why a command did not start: the code and message of the `Error` that
/// ends its request.
struct SpawnError(ErrorCode, String);

/// Spawns `job`'s command: looks its user up, opens its terminal, starts it.
fn spawn(job: &Job) -> Result<(Child, Option<Pty>), SpawnError> {
    let account = match &job.req.user {
        None => None,
        Some(name) => Some(
            user::lookup(name, &job.config.passwd, &job.config.group)
                .map_err(|e| SpawnError(ErrorCode::UNKNOWN_USER, e.to_string()))?,
        ),
    };
    let mut cmd = build_command(&job.req, &job.sync_env, account.as_ref());
    let pty = match job.req.pty {
        Some(size) => Some(
            Pty::open_for(&mut cmd, size, account.as_ref().map(|a| (a.uid, a.gid)))
                .map_err(|e| SpawnError(ErrorCode::SPAWN_FAILED, format!("terminal: {e}")))?,
        ),
        None => None,
    };
    if let Some(a) = &account {
        sys::runs_as(&mut cmd, a.uid, a.gid, a.groups.clone());
    }
    let spawned = match &job.config.wait_mode {
        WaitMode::Direct => cmd.spawn(),
        WaitMode::Global(reaper) => reaper.spawn(&mut cmd, &job.ctl),
    };
    // Closes the agent's copies of the terminal's slave side: the master
    // reads EOF once the command's processes have all closed theirs.
    drop(cmd);
    let child = spawned.map_err(|e| SpawnError(ErrorCode::SPAWN_FAILED, format!("spawn: {e}")))?;
    Ok((child, pty))
}

fn into_file(fd: impl Into<OwnedFd>) -> File {
    File::from(fd.into())
}

/// Runs `job` to its end on the calling thread: spawns it, sends `Started`
/// (or the `Error` that ends the request), serves it, and sends its `Exit` to
/// whichever request receives it by then (nothing if it was abandoned).
pub(crate) fn run_process(job: Job) {
    let (mut child, pty) = match spawn(&job) {
        Ok(spawned) => spawned,
        Err(SpawnError(code, why)) => {
            job.subscriber.finish(&job.ctl, &Message::error(code, why));
            return;
        }
    };
    let start = Instant::now();
    let pid = child.id();
    let pgid = i32::try_from(pid).unwrap_or(0);
    job.ctl.set_pgid(pgid);
    job.processes
        .insert(pid, &job.ctl, command_text(&job.req.command), unix_ms_now());
    job.subscriber.send(&Message::Started { pid });

    let (stdout, stderr, stdin) = match &pty {
        Some(p) => (p.master.try_clone().ok(), None, p.master.try_clone().ok()),
        None => (
            child.stdout.take().map(into_file),
            child.stderr.take().map(into_file),
            child.stdin.take().map(into_file),
        ),
    };
    let mut feed = StdinFeed {
        pipe: stdin,
        pty: pty.is_some(),
        eof_typed: false,
        current: Vec::new(),
        offset: 0,
    };
    if let Some(p) = &feed.pipe {
        if sys::set_nonblocking(p).is_err() {
            feed.pipe = None;
        }
    }

    // In direct mode a helper thread waits for this pid only.
    let waiter = match &job.config.wait_mode {
        WaitMode::Direct => {
            let ctl = Arc::clone(&job.ctl);
            let spawned = std::thread::Builder::new()
                .name(format!("wait-{pid}"))
                .spawn(move || {
                    let raw = match child.wait() {
                        Ok(st) => st.into_raw(),
                        // Cannot happen for our own child; report as killed.
                        Err(_) => libc::SIGKILL,
                    };
                    ctl.set_exit(raw);
                });
            match spawned {
                Ok(h) => Some(h),
                Err(e) => {
                    let _ = sys::kill_group(pgid, libc::SIGKILL);
                    job.processes.remove(pid, &job.ctl);
                    let m = Message::error(ErrorCode::INTERNAL, format!("thread: {e}"));
                    job.subscriber.finish(&job.ctl, &m);
                    return;
                }
            }
        }
        WaitMode::Global(_) => None,
    };

    let streamed = job.req.stream;
    let mut runner = Runner {
        pid,
        pgid,
        ctl: Arc::clone(&job.ctl),
        processes: job.processes.clone(),
        grace: job.config.drain_grace,
        start,
        deadline: deadline_after(start, job.req.timeout_ms),
        stdout,
        stderr,
        feed,
        pty,
        out_sink: Sink::new(false, streamed, job.req.stdout_limit),
        err_sink: Sink::new(true, streamed, job.req.stderr_limit),
        streamed,
        subscriber: Some(job.subscriber.clone()),
        generation: 0,
        credit: u64::from(STREAM_WINDOW),
        pending: VecDeque::new(),
        exit: None,
        drain_until: None,
        timed_out: false,
        killed: false,
        abandoned: false,
        unclaimed_noted: false,
        held: false,
        frame: vec![0u8; DATA_FRAME_PREFIX_LEN + READ_CHUNK],
    };
    runner.serve();
    if let Some(h) = waiter {
        let _ = h.join();
    }
}

/// One process's poll loop: its pipes (or terminal), where its output goes,
/// and the flow-control window.
struct Runner {
    pid: u32,
    pgid: i32,
    ctl: Arc<CmdCtl>,
    processes: Processes,
    grace: Duration,
    start: Instant,
    deadline: Option<Instant>,
    stdout: Option<File>,
    stderr: Option<File>,
    feed: StdinFeed,
    pty: Option<Pty>,
    out_sink: Sink,
    err_sink: Sink,
    /// Whether output goes out as chunks (a streamed request, or any request
    /// once its process was detached or attached) rather than in `Exit`.
    streamed: bool,
    /// Where output and exit go; `None` while detached.
    subscriber: Option<Subscriber>,
    /// The inbox generation `subscriber` is from.
    generation: u64,
    /// Bytes of output the subscriber may still be sent.
    credit: u64,
    /// Chunks to send before reading more: output a buffered request had
    /// collected when it became streamed. `true` = stderr.
    pending: VecDeque<(bool, Vec<u8>)>,
    /// The main process's raw wait status, once reaped.
    exit: Option<i32>,
    /// After the exit, while output can flow: read output held open by
    /// other processes until then (`None` while it cannot flow: the grace
    /// period starts again once it can).
    drain_until: Option<Instant>,
    timed_out: bool,
    killed: bool,
    abandoned: bool,
    unclaimed_noted: bool,
    /// Reports were held (`Hold`) when the inbox was last taken: read no
    /// output and send no exit until they are not.
    held: bool,
    /// Where output is read to: a frame's prefix, then the bytes read, so that a streamed
    /// chunk goes out as it was read, without a copy ([`finish_output`]).
    frame: Vec<u8>,
}

impl Runner {
    /// Serves the process until it has ended and its exit is reported (or,
    /// abandoned, nobody is to be told); it is no longer tracked then.
    fn serve(&mut self) {
        loop {
            self.take_inbox();
            self.flush_pending();
            if self.ending() {
                if self.abandoned {
                    self.processes.remove(self.pid, &self.ctl);
                    return;
                }
                let gate = self.processes.gate().clone();
                // Held since the inbox was taken: wait for the release.
                let Some(_open) = gate.open() else {
                    continue;
                };
                // Unless a new request attached meanwhile (then: once more,
                // to greet it), nobody can attach any more. The exit goes out
                // before a `Hold` can be answered.
                if let Some(last) = self.ctl.finish(self.generation) {
                    self.processes.remove(self.pid, &self.ctl);
                    if let Some(subscriber) = last {
                        let exit = self.exit_message();
                        subscriber.finish(&self.ctl, &exit);
                    }
                    return;
                }
                continue;
            }
            self.note_unclaimed();
            self.poll_once();
        }
    }

    /// Output cannot flow now: reports are held, or it is streamed and
    /// nobody receives it, its window is shut, or collected chunks wait to be
    /// sent first.
    fn blocked(&self) -> bool {
        self.held
            || (self.streamed
                && (self.subscriber.is_none() || self.credit == 0 || !self.pending.is_empty()))
    }

    fn pipes_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Whether everything is done but sending the exit.
    fn ending(&mut self) -> bool {
        if self.exit.is_none() {
            return false;
        }
        if self.abandoned {
            return true;
        }
        let now = Instant::now();
        if self.blocked() {
            // The grace period starts again once output can flow.
            self.drain_until = None;
        } else if self.drain_until.is_none() {
            self.drain_until = Some(now + self.grace);
        }
        if self.pipes_open() {
            if self.drain_until.is_none_or(|until| now < until) {
                return false;
            }
            // Held open by processes that outlive the command: let go.
            self.stdout = None;
            self.stderr = None;
        }
        if !self.pending.is_empty() || self.held {
            return false;
        }
        self.subscriber.is_some()
    }

    /// Takes what the connections and the reaper left in the inbox.
    fn take_inbox(&mut self) {
        let mut failures = Vec::new();
        let mut changed = None;
        self.held = self.processes.gate().is_held();
        {
            let mut inbox = self.ctl.lock();
            if self.exit.is_none() {
                if let Some(raw) = inbox.exit {
                    self.exit = Some(raw);
                }
            }
            for sig in inbox.signals.drain(..) {
                if let Err(e) = sys::kill_group(self.pgid, sig) {
                    failures.push(format!("signal {sig}: {e}"));
                }
            }
            if inbox.kill && !self.killed {
                let _ = sys::kill_group(self.pgid, libc::SIGKILL);
                self.killed = true;
            }
            self.abandoned |= inbox.abandon;
            if inbox.generation != self.generation {
                self.generation = inbox.generation;
                let old = std::mem::replace(&mut self.subscriber, inbox.subscriber.clone());
                changed = Some(old);
                self.credit = u64::from(STREAM_WINDOW);
            }
            self.credit = self
                .credit
                .saturating_add(std::mem::take(&mut inbox.credit));
            if let (Some(size), Some(pty)) = (inbox.resize.take(), &self.pty) {
                if let Err(e) = pty.resize(size) {
                    failures.push(format!("resize: {e}"));
                }
            }
            let close = inbox.close_stdin;
            self.feed.refill(&mut inbox.stdin, close);
        }
        if let Some(old) = changed {
            self.subscriber_changed(old);
        }
        if let Some(s) = &self.subscriber {
            for f in failures {
                s.send(&Message::error(ErrorCode::SIGNAL_FAILED, f));
            }
        }
    }

    /// The output now goes to `self.subscriber` instead of `old`: the old
    /// request ends (told so if it is replaced), the new one is greeted, and
    /// output is streamed from now on, without the request's limits.
    fn subscriber_changed(&mut self, old: Option<Subscriber>) {
        if !self.streamed {
            self.streamed = true;
            for (stderr, data) in [
                (false, std::mem::take(&mut self.out_sink.buf)),
                (true, std::mem::take(&mut self.err_sink.buf)),
            ] {
                for piece in data.chunks(READ_CHUNK) {
                    self.pending.push_back((stderr, piece.to_vec()));
                }
            }
        }
        self.out_sink.limit = u64::MAX;
        self.err_sink.limit = u64::MAX;
        let replaced = match (&old, &self.subscriber) {
            (Some(old), Some(new)) => !old.is(&new.link, new.id),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if let (true, Some(old)) = (replaced, &old) {
            if self.subscriber.is_some() {
                let why = format!("process {} was attached by another request", self.pid);
                old.finish(&self.ctl, &Message::error(ErrorCode::DETACHED, why));
            } else {
                // Detached: nobody listens to the old request any more.
                old.link.retire(old.id, &self.ctl);
            }
        }
        if let Some(new) = &self.subscriber {
            new.send(&Message::Started { pid: self.pid });
            self.unclaimed_noted = false;
        }
    }

    /// Sends collected chunks while the window allows.
    fn flush_pending(&mut self) {
        let Some(subscriber) = self.subscriber.clone() else {
            return;
        };
        let gate = self.processes.gate().clone();
        let Some(_open) = gate.open() else {
            return;
        };
        while self.credit > 0 {
            let Some((stderr, mut data)) = self.pending.pop_front() else {
                break;
            };
            if data.len() as u64 > self.credit {
                let rest = data.split_off(usize::try_from(self.credit).unwrap_or(usize::MAX));
                self.pending.push_front((stderr, rest));
            }
            self.credit -= data.len() as u64;
            let sink = if stderr {
                &self.err_sink
            } else {
                &self.out_sink
            };
            subscriber.send(&sink.chunk(data));
        }
    }

    /// A process that ended while nobody receives its exit counts against
    /// the agent's limit of such processes.
    fn note_unclaimed(&mut self) {
        if self.exit.is_some() && self.subscriber.is_none() && !self.unclaimed_noted {
            self.unclaimed_noted = true;
            self.processes.unclaimed(self.pid);
        }
    }

    /// Enforces the timeout, waits for something to do (a wake-up, output
    /// that may be read, stdin that may be written) and does it.
    fn poll_once(&mut self) {
        let now = Instant::now();
        if let Some(d) = self.deadline {
            if now >= d && self.exit.is_none() && !self.timed_out {
                let _ = sys::kill_group(self.pgid, libc::SIGKILL);
                self.timed_out = true;
                self.killed = true;
            }
        }
        let can_read = self.abandoned || !self.blocked();
        let mut timeout = None;
        if self.exit.is_some() {
            if can_read && self.pipes_open() {
                timeout = Some(
                    self.drain_until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                );
            }
        } else if let (Some(d), false) = (self.deadline, self.timed_out) {
            timeout = Some(d.saturating_duration_since(now));
        }

        let mut fds = Vec::with_capacity(4);
        fds.push(pollfd(self.ctl.wake_rx.as_raw_fd(), libc::POLLIN));
        let mut watch = |pipe: &Option<File>, events: i16, on: bool| match pipe {
            Some(p) if on => {
                fds.push(pollfd(p.as_raw_fd(), events));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let out_idx = watch(&self.stdout, libc::POLLIN, can_read);
        let err_idx = watch(&self.stderr, libc::POLLIN, can_read);
        let in_idx = watch(&self.feed.pipe, libc::POLLOUT, self.feed.wants_write());
        if sys::poll(&mut fds, timeout).is_err() {
            // Only EINVAL/ENOMEM are possible; avoid a hot loop.
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
        let ready = |i: Option<usize>| i.is_some_and(|i| fds[i].revents != 0);
        if fds[0].revents != 0 {
            self.ctl.clear_wake();
        }
        let (out_ready, err_ready, in_ready) = (ready(out_idx), ready(err_idx), ready(in_idx));
        if out_ready {
            self.read_once(false);
        }
        if err_ready {
            self.read_once(true);
        }
        if in_ready {
            self.feed.write_some();
        }
    }

    /// One read from a ready pipe (at most what the window allows); closes
    /// it at EOF or on error (a terminal whose every slave side is closed
    /// reads `EIO`).
    fn read_once(&mut self, stderr: bool) {
        let max = if self.streamed && !self.abandoned {
            usize::try_from(self.credit)
                .unwrap_or(usize::MAX)
                .min(READ_CHUNK)
        } else {
            READ_CHUNK
        };
        if max == 0 {
            return;
        }
        let pipe = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let Some(p) = pipe else { return };
        let data = &mut self.frame[DATA_FRAME_PREFIX_LEN..];
        let n = match p.read(&mut data[..max]) {
            Ok(0) => {
                *pipe = None;
                return;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(_) => {
                *pipe = None;
                return;
            }
        };
        if self.abandoned {
            return;
        }
        let sink = if stderr {
            &mut self.err_sink
        } else {
            &mut self.out_sink
        };
        let kept = sink.admit(&self.frame[DATA_FRAME_PREFIX_LEN..DATA_FRAME_PREFIX_LEN + n]);
        let kept_len = kept.len();
        if kept.is_empty() {
            return;
        }
        if !self.streamed {
            sink.buf.extend_from_slice(kept);
        } else if let Some(subscriber) = &self.subscriber {
            let gate = self.processes.gate().clone();
            let open = gate.open();
            if open.is_some() {
                self.credit = self.credit.saturating_sub(kept_len as u64);
                let frame = &mut self.frame[..DATA_FRAME_PREFIX_LEN + kept_len];
                match finish_output(frame, subscriber.id, stderr) {
                    Ok(()) => subscriber.send_encoded(frame),
                    // Not reachable: a read is at most READ_CHUNK bytes.
                    Err(_) => subscriber.send(&sink.chunk(frame[DATA_FRAME_PREFIX_LEN..].to_vec())),
                }
            } else {
                // Held since the pipe was polled: sent after the release.
                self.pending.push_back((stderr, kept.to_vec()));
            }
            drop(open);
        }
    }

    /// The request's last message.
    fn exit_message(&mut self) -> Message {
        let raw = self.exit.unwrap_or(libc::SIGKILL);
        let st = std::process::ExitStatus::from_raw(raw);
        let status = match (st.code(), st.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(s)) => ExitStatus::Signal(s),
            (None, None) => ExitStatus::Signal(libc::SIGKILL),
        };
        Message::Exit(ExitInfo {
            status,
            duration_us: u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
            timed_out: self.timed_out,
            stdout_truncated: self.out_sink.truncated,
            stderr_truncated: self.err_sink.truncated,
            stdout: std::mem::take(&mut self.out_sink.buf),
            stderr: std::mem::take(&mut self.err_sink.buf),
        })
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The variables `cmd` sets explicitly (after `env_clear`, all it has).
    fn set_vars(cmd: &StdCommand) -> Vec<(String, String)> {
        let mut v: Vec<_> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k, v?)))
            .map(|(k, v): (&OsStr, &OsStr)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn request_env_overrides_sync_env() {
        let mut req = RunRequest::shell("true");
        req.env = pairs(&[("B", "req"), ("C", "req")]);
        let sync_env = pairs(&[("A", "sync"), ("B", "sync")]);
        let vars = set_vars(&build_command(&req, &sync_env, None));
        assert!(vars.contains(&("A".into(), "sync".into())), "{vars:?}");
        assert!(vars.contains(&("B".into(), "req".into())), "{vars:?}");
        assert!(vars.contains(&("C".into(), "req".into())), "{vars:?}");
    }

    #[test]
    fn clear_env_keeps_sync_env() {
        let mut req = RunRequest::shell("true");
        req.clear_env = true;
        req.env = pairs(&[("ONLY", "me")]);
        let sync_env = pairs(&[("CAPSULE_ID", "c1")]);
        let vars = set_vars(&build_command(&req, &sync_env, None));
        assert_eq!(
            vars,
            pairs(&[("CAPSULE_ID", "c1"), ("ONLY", "me"), ("PATH", DEFAULT_PATH)])
        );
    }

    #[test]
    fn sync_env_path_counts_as_given() {
        let mut req = RunRequest::shell("true");
        req.clear_env = true;
        let vars = set_vars(&build_command(&req, &pairs(&[("PATH", "/opt/bin")]), None));
        assert_eq!(vars, pairs(&[("PATH", "/opt/bin")]));
        // The request's PATH still wins over the Sync one.
        req.env = pairs(&[("PATH", "/req/bin")]);
        let vars = set_vars(&build_command(&req, &pairs(&[("PATH", "/opt/bin")]), None));
        assert_eq!(vars, pairs(&[("PATH", "/req/bin")]));
    }
}

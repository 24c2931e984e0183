//! Running one command: spawn in its own process group, feed stdin, collect
//! or stream output, enforce the timeout, report the exit.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStdin, Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capsule_agent_protocol::{
    Command, ErrorCode, ExitInfo, ExitStatus, Message, RunRequest, MAX_BUFFERED_OUTPUT,
};

use crate::reaper::Reaper;
use crate::serve::Out;
use crate::sys;

/// `PATH` given to commands when neither the agent's environment nor the
/// request sets one (the kernel starts PID 1 without it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const READ_CHUNK: usize = 64 * 1024;

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

/// Messages from the connection to a running command.
#[derive(Debug, Default)]
struct Inbox {
    stdin: VecDeque<Vec<u8>>,
    close_stdin: bool,
    signals: Vec<i32>,
    exit: Option<i32>,
    cancel: bool,
}

/// Control block shared between the connection, the command's thread and
/// the reaper.
#[derive(Debug)]
pub struct CmdCtl {
    inbox: Mutex<Inbox>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    pgid: AtomicI32,
    stdin_enabled: bool,
}

impl CmdCtl {
    pub(crate) fn new(stdin_enabled: bool) -> io::Result<Arc<CmdCtl>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Arc::new(CmdCtl {
            inbox: Mutex::new(Inbox::default()),
            wake_tx,
            wake_rx,
            pgid: AtomicI32::new(0),
            stdin_enabled,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        // A full socket buffer already guarantees a pending wake-up.
        let _ = (&self.wake_tx).write(&[1]);
    }

    fn update(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.lock());
        self.wake();
    }

    /// Whether the request asked for a stdin pipe.
    pub(crate) fn stdin_enabled(&self) -> bool {
        self.stdin_enabled
    }

    pub(crate) fn push_stdin(&self, data: Vec<u8>) {
        self.update(|i| {
            if !i.close_stdin && !data.is_empty() {
                i.stdin.push_back(data);
            }
        });
    }

    pub(crate) fn close_stdin(&self) {
        self.update(|i| i.close_stdin = true);
    }

    pub(crate) fn push_signal(&self, sig: i32) {
        self.update(|i| i.signals.push(sig));
    }

    /// Kill the command (connection lost).
    pub(crate) fn cancel(&self) {
        self.update(|i| i.cancel = true);
    }

    /// Records the raw wait status of the command's main process.
    pub(crate) fn set_exit(&self, raw_status: i32) {
        self.update(|i| i.exit = Some(raw_status));
    }

    /// The command's process group id, 0 before it is spawned.
    pub fn pgid(&self) -> i32 {
        self.pgid.load(Ordering::Acquire)
    }
}

/// Knobs for running commands.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// How exits are collected.
    pub wait_mode: WaitMode,
    /// After the main process exits, how long to keep reading output that
    /// background processes still hold open before reporting the exit.
    pub drain_grace: Duration,
}

impl Default for ExecConfig {
    fn default() -> ExecConfig {
        ExecConfig {
            wait_mode: WaitMode::Direct,
            drain_grace: Duration::from_millis(100),
        }
    }
}

/// Output accounting for one of stdout/stderr.
struct Sink {
    stderr: bool,
    stream: bool,
    limit: usize,
    taken: usize,
    buf: Vec<u8>,
    truncated: bool,
}

impl Sink {
    fn new(stderr: bool, stream: bool, limit: u32) -> Sink {
        let limit = if stream {
            limit
        } else {
            limit.min(MAX_BUFFERED_OUTPUT)
        };
        Sink {
            stderr,
            stream,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            taken: 0,
            buf: Vec::new(),
            truncated: false,
        }
    }

    fn accept<W: Write>(&mut self, data: &[u8], out: &Out<W>, id: u32) {
        let take = (self.limit - self.taken).min(data.len());
        if take < data.len() {
            self.truncated = true;
        }
        if take == 0 {
            return;
        }
        self.taken += take;
        let chunk = &data[..take];
        if self.stream {
            let m = if self.stderr {
                Message::Stderr(chunk.to_vec())
            } else {
                Message::Stdout(chunk.to_vec())
            };
            // A dead connection is noticed by the reader; keep draining.
            let _ = out.send(id, &m);
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }
}

/// The command for `req`. Its environment: the agent's (none if
/// `clear_env`), then `sync_env` (from the last `Sync`), then the request's
/// `env`; later ones override earlier ones. `PATH` is [`DEFAULT_PATH`] when
/// none of them sets it.
fn build_command(req: &RunRequest, sync_env: &[(String, String)]) -> StdCommand {
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
    for (k, v) in sync_env.iter().chain(&req.env) {
        cmd.env(k, v);
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    cmd
}

fn deadline_after(start: Instant, ms: u64) -> Option<Instant> {
    if ms == 0 {
        None
    } else {
        start.checked_add(Duration::from_millis(ms))
    }
}

/// Stdin side of the poll loop.
struct StdinFeed {
    pipe: Option<ChildStdin>,
    current: Vec<u8>,
    offset: usize,
}

impl StdinFeed {
    /// Moves queued data in, closes the pipe when asked and drained.
    fn refill(&mut self, inbox: &mut Inbox) {
        if self.pipe.is_none() {
            inbox.stdin.clear();
            return;
        }
        if self.offset >= self.current.len() {
            match inbox.stdin.pop_front() {
                Some(next) => {
                    self.current = next;
                    self.offset = 0;
                }
                None if inbox.close_stdin => self.pipe = None,
                None => {}
            }
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

/// Runs `req` as request `id` with `sync_env` under its own environment (see
/// [`build_command`]), sending `Started` and output chunks to `out`.
/// Blocks until the command is done and returns the request's final message
/// (`Exit`, or `Error` if it could not start), which the caller sends once it
/// has retired the id.
pub(crate) fn run_command<W: Write>(
    req: &RunRequest,
    sync_env: &[(String, String)],
    id: u32,
    ctl: &Arc<CmdCtl>,
    out: &Out<W>,
    config: &ExecConfig,
) -> Message {
    let mut cmd = build_command(req, sync_env);
    let start = Instant::now();
    let spawned = match &config.wait_mode {
        WaitMode::Direct => cmd.spawn(),
        WaitMode::Global(reaper) => reaper.spawn(&mut cmd, ctl),
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Message::error(ErrorCode::SPAWN_FAILED, format!("spawn: {e}")),
    };
    let pid = i32::try_from(child.id()).unwrap_or(0);
    ctl.pgid.store(pid, Ordering::Release);
    let _ = out.send(id, &Message::Started { pid: child.id() });

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut feed = StdinFeed {
        pipe: child.stdin.take(),
        current: Vec::new(),
        offset: 0,
    };
    if let Some(p) = &feed.pipe {
        if sys::set_nonblocking(p).is_err() {
            feed.pipe = None;
        }
    }

    // In direct mode a helper thread waits for this pid only.
    let waiter = match &config.wait_mode {
        WaitMode::Direct => {
            let ctl2 = Arc::clone(ctl);
            let spawned = std::thread::Builder::new()
                .name(format!("wait-{pid}"))
                .spawn(move || {
                    let raw = match child.wait() {
                        Ok(st) => st.into_raw(),
                        // Cannot happen for our own child; report as killed.
                        Err(_) => libc::SIGKILL,
                    };
                    ctl2.set_exit(raw);
                });
            match spawned {
                Ok(h) => Some(h),
                Err(e) => {
                    let _ = sys::kill_group(pid, libc::SIGKILL);
                    return Message::error(ErrorCode::INTERNAL, format!("thread: {e}"));
                }
            }
        }
        WaitMode::Global(_) => None,
    };

    let deadline = deadline_after(start, req.timeout_ms);
    let mut out_sink = Sink::new(false, req.stream, req.stdout_limit);
    let mut err_sink = Sink::new(true, req.stream, req.stderr_limit);
    let mut timed_out = false;
    let mut killed = false;
    let mut exit: Option<(i32, Instant)> = None;
    let mut buf = vec![0u8; READ_CHUNK];

    loop {
        // Take what the connection and the reaper left for us.
        {
            let mut inbox = ctl.lock();
            if exit.is_none() {
                if let Some(raw) = inbox.exit {
                    exit = Some((raw, Instant::now()));
                }
            }
            for sig in inbox.signals.drain(..) {
                if let Err(e) = sys::kill_group(pid, sig) {
                    let _ = out.send(
                        id,
                        &Message::error(ErrorCode::SIGNAL_FAILED, format!("signal {sig}: {e}")),
                    );
                }
            }
            if inbox.cancel && !killed {
                let _ = sys::kill_group(pid, libc::SIGKILL);
                killed = true;
            }
            feed.refill(&mut inbox);
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d && exit.is_none() && !timed_out {
                let _ = sys::kill_group(pid, libc::SIGKILL);
                timed_out = true;
                killed = true;
            }
        }
        let pipes_open = stdout.is_some() || stderr.is_some();
        let mut timeout = None;
        if let Some((_, at)) = exit {
            let until = at + config.drain_grace;
            if !pipes_open || now >= until {
                break;
            }
            timeout = Some(until - now);
        } else if let (Some(d), false) = (deadline, timed_out) {
            timeout = Some(d.saturating_duration_since(now));
        }

        let mut fds = Vec::with_capacity(4);
        fds.push(pollfd(ctl.wake_rx.as_raw_fd(), libc::POLLIN));
        let out_idx = stdout.as_ref().map(|p| {
            fds.push(pollfd(p.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let err_idx = stderr.as_ref().map(|p| {
            fds.push(pollfd(p.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let in_idx = match (&feed.pipe, feed.wants_write()) {
            (Some(p), true) => {
                fds.push(pollfd(p.as_raw_fd(), libc::POLLOUT));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        if sys::poll(&mut fds, timeout).is_err() {
            // Only EINVAL/ENOMEM are possible; avoid a hot loop.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let ready = |i: Option<usize>| i.is_some_and(|i| fds[i].revents != 0);
        if fds[0].revents != 0 {
            let mut sink = [0u8; 64];
            while matches!((&ctl.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        }
        if ready(out_idx) {
            drain_once(&mut stdout, &mut buf, &mut out_sink, out, id);
        }
        if ready(err_idx) {
            drain_once(&mut stderr, &mut buf, &mut err_sink, out, id);
        }
        if ready(in_idx) {
            feed.write_some();
        }
    }

    if let Some(h) = waiter {
        let _ = h.join();
    }
    let raw = exit.map_or(libc::SIGKILL, |(raw, _)| raw);
    let st = std::process::ExitStatus::from_raw(raw);
    let status = match (st.code(), st.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        (None, None) => ExitStatus::Signal(libc::SIGKILL),
    };
    let info = ExitInfo {
        status,
        duration_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        timed_out,
        stdout_truncated: out_sink.truncated,
        stderr_truncated: err_sink.truncated,
        stdout: out_sink.buf,
        stderr: err_sink.buf,
    };
    Message::Exit(info)
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// One read from a ready pipe; closes it at EOF or on error.
fn drain_once<P: Read, W: Write>(
    pipe: &mut Option<P>,
    buf: &mut [u8],
    sink: &mut Sink,
    out: &Out<W>,
    id: u32,
) {
    let Some(p) = pipe else { return };
    match p.read(buf) {
        Ok(0) => *pipe = None,
        Ok(n) => sink.accept(&buf[..n], out, id),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(_) => *pipe = None,
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
        let vars = set_vars(&build_command(&req, &sync_env));
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
        let vars = set_vars(&build_command(&req, &sync_env));
        assert_eq!(
            vars,
            pairs(&[("CAPSULE_ID", "c1"), ("ONLY", "me"), ("PATH", DEFAULT_PATH)])
        );
    }

    #[test]
    fn sync_env_path_counts_as_given() {
        let mut req = RunRequest::shell("true");
        req.clear_env = true;
        let vars = set_vars(&build_command(&req, &pairs(&[("PATH", "/opt/bin")])));
        assert_eq!(vars, pairs(&[("PATH", "/opt/bin")]));
        // The request's PATH still wins over the Sync one.
        req.env = pairs(&[("PATH", "/req/bin")]);
        let vars = set_vars(&build_command(&req, &pairs(&[("PATH", "/opt/bin")])));
        assert_eq!(vars, pairs(&[("PATH", "/req/bin")]));
    }
}

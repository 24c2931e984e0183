//! What a running process shares with the connections that talk to it: its
//! control block ([`CmdCtl`]: stdin, signals, credit, exit...), and where its
//! output goes ([`Subscriber`]: one request of one connection, or none).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use capsule_agent_protocol::{Message, WindowSize};

/// Writes whole frames to a connection.
pub(crate) trait FrameSink: Send + Sync {
    /// Encodes and writes one frame of request `id`.
    fn send(&self, id: u32, message: &Message) -> io::Result<()>;
    /// Writes one frame of request `id`, then `len` raw bytes (a channel test), with no
    /// other frame in between.
    fn send_raw(&self, id: u32, message: &Message, len: u64) -> io::Result<()>;
    /// Writes one frame that is already encoded.
    fn send_encoded(&self, frame: &[u8]) -> io::Result<()>;
}

/// One connection as its processes see it: where frames go, and which
/// request ids name which process.
pub(crate) struct Link {
    out: Box<dyn FrameSink>,
    requests: Mutex<HashMap<u32, Arc<CmdCtl>>>,
}

impl Link {
    pub(crate) fn new(out: Box<dyn FrameSink>) -> Arc<Link> {
        Arc::new(Link {
            out,
            requests: Mutex::new(HashMap::new()),
        })
    }

    fn requests(&self) -> MutexGuard<'_, HashMap<u32, Arc<CmdCtl>>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one frame; a dead connection shows up as EOF on its reader.
    pub(crate) fn send(&self, id: u32, message: &Message) {
        let _ = self.out.send(id, message);
    }

    /// Writes one frame, then `len` raw bytes (see [`FrameSink::send_raw`]).
    pub(crate) fn send_raw(&self, id: u32, message: &Message, len: u64) -> io::Result<()> {
        self.out.send_raw(id, message, len)
    }

    /// Writes one frame that is already encoded; a dead connection shows up as EOF on its
    /// reader.
    pub(crate) fn send_encoded(&self, frame: &[u8]) {
        let _ = self.out.send_encoded(frame);
    }

    /// Writes one frame, reporting a failure.
    pub(crate) fn send_checked(&self, id: u32, message: &Message) -> io::Result<()> {
        self.out.send(id, message)
    }

    /// Makes `id` name `ctl`; `false` if `id` is taken.
    pub(crate) fn open(&self, id: u32, ctl: &Arc<CmdCtl>) -> bool {
        let mut requests = self.requests();
        if requests.contains_key(&id) {
            return false;
        }
        requests.insert(id, Arc::clone(ctl));
        true
    }

    /// The process request `id` names.
    pub(crate) fn get(&self, id: u32) -> Option<Arc<CmdCtl>> {
        self.requests().get(&id).cloned()
    }

    /// Whether `id` names a request.
    pub(crate) fn is_open(&self, id: u32) -> bool {
        self.requests().contains_key(&id)
    }

    /// Frees `id` (if it still names `ctl`), so the host may reuse it.
    pub(crate) fn retire(&self, id: u32, ctl: &Arc<CmdCtl>) {
        let mut requests = self.requests();
        if requests.get(&id).is_some_and(|c| Arc::ptr_eq(c, ctl)) {
            requests.remove(&id);
        }
    }
}

/// Where a process's output and exit go: request `id` of `link`.
#[derive(Clone)]
pub(crate) struct Subscriber {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u32,
}

impl Subscriber {
    /// Whether this is request `id` of `link`.
    pub(crate) fn is(&self, link: &Arc<Link>, id: u32) -> bool {
        Arc::ptr_eq(&self.link, link) && self.id == id
    }

    /// Sends a message of the request.
    pub(crate) fn send(&self, message: &Message) {
        self.link.send(self.id, message);
    }

    /// Sends a frame of the request that is already encoded.
    pub(crate) fn send_encoded(&self, frame: &[u8]) {
        self.link.send_encoded(frame);
    }

    /// Retires the request's id, then sends its last message.
    pub(crate) fn finish(&self, ctl: &Arc<CmdCtl>, message: &Message) {
        self.link.retire(self.id, ctl);
        self.link.send(self.id, message);
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscriber({})", self.id)
    }
}

/// Messages from connections (and the reaper) to a running process.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pub(crate) stdin: VecDeque<Vec<u8>>,
    pub(crate) close_stdin: bool,
    pub(crate) signals: Vec<i32>,
    /// The raw wait status of the main process, once reaped.
    pub(crate) exit: Option<i32>,
    /// SIGKILL the process group (once).
    pub(crate) kill: bool,
    /// Report nothing any more: end as soon as the process is gone.
    pub(crate) abandon: bool,
    /// Window growth ([`Message::Credit`]) not yet taken by the process's thread.
    pub(crate) credit: u64,
    /// Where output and exit go now; `None` while detached.
    pub(crate) subscriber: Option<Subscriber>,
    /// Bumped by every change of `subscriber`.
    pub(crate) generation: u64,
    /// A window size to set on the process's terminal.
    pub(crate) resize: Option<WindowSize>,
    /// The process's thread is sending its exit: nobody can attach any more.
    pub(crate) finished: bool,
}

/// Control block shared between the connections, the process's thread and
/// the reaper.
#[derive(Debug)]
pub struct CmdCtl {
    inbox: Mutex<Inbox>,
    wake_tx: UnixStream,
    pub(crate) wake_rx: UnixStream,
    pgid: AtomicI32,
    stdin_enabled: bool,
    pty: bool,
}

impl CmdCtl {
    /// A control block whose output goes to `subscriber` first.
    pub(crate) fn new(
        stdin_enabled: bool,
        pty: bool,
        subscriber: Subscriber,
    ) -> io::Result<Arc<CmdCtl>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Arc::new(CmdCtl {
            inbox: Mutex::new(Inbox {
                subscriber: Some(subscriber),
                ..Inbox::default()
            }),
            wake_tx,
            wake_rx,
            pgid: AtomicI32::new(0),
            stdin_enabled,
            pty,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the process's thread to look at its inbox and the gate again.
    pub(crate) fn wake(&self) {
        // A full socket buffer already guarantees a pending wake-up.
        let _ = (&self.wake_tx).write(&[1]);
    }

    fn update(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.lock());
        self.wake();
    }

    /// Whether the process has a stdin the host may write to (a pipe asked
    /// for by the request, or its terminal).
    pub(crate) fn stdin_enabled(&self) -> bool {
        self.stdin_enabled
    }

    /// Whether the process runs on a pseudo-terminal.
    pub(crate) fn is_pty(&self) -> bool {
        self.pty
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

    pub(crate) fn resize(&self, size: WindowSize) {
        self.update(|i| i.resize = Some(size));
    }

    /// Kills the process group and reports nothing (its connection is gone).
    pub(crate) fn cancel(&self) {
        self.update(|i| {
            i.kill = true;
            i.abandon = true;
        });
    }

    /// Reports nothing any more; the thread ends once the process is gone.
    pub(crate) fn abandon(&self) {
        self.update(|i| i.abandon = true);
    }

    /// Records the raw wait status of the command's main process.
    pub(crate) fn set_exit(&self, raw_status: i32) {
        self.update(|i| i.exit = Some(raw_status));
    }

    /// Grows the send window by `bytes`, if request `id` of `link` is the
    /// one receiving the output (a late credit of an earlier one is dropped).
    pub(crate) fn add_credit(&self, link: &Arc<Link>, id: u32, bytes: u32) {
        let mut inbox = self.lock();
        if inbox.subscriber.as_ref().is_some_and(|s| s.is(link, id)) {
            inbox.credit = inbox.credit.saturating_add(u64::from(bytes));
            drop(inbox);
            self.wake();
        }
    }

    /// Sends the output and exit to `subscriber` from now on; `false` if
    /// the process's exit is being sent already (too late to attach).
    pub(crate) fn attach(&self, subscriber: Subscriber) -> bool {
        let mut inbox = self.lock();
        if inbox.finished {
            return false;
        }
        inbox.subscriber = Some(subscriber);
        inbox.generation += 1;
        inbox.credit = 0;
        drop(inbox);
        self.wake();
        true
    }

    /// Called by the process's thread when only its exit is left to send:
    /// unless the subscriber changed since `generation` (then `None`), marks
    /// the process finished (no attach any more) and returns where the exit
    /// goes.
    pub(crate) fn finish(&self, generation: u64) -> Option<Option<Subscriber>> {
        let mut inbox = self.lock();
        if inbox.generation != generation {
            return None;
        }
        inbox.finished = true;
        Some(inbox.subscriber.clone())
    }

    /// Stops sending output, if `link` receives it (`None`: whoever does).
    pub(crate) fn detach(&self, link: Option<&Arc<Link>>) {
        self.update(|i| {
            let theirs = match (&i.subscriber, link) {
                (Some(s), Some(link)) => Arc::ptr_eq(&s.link, link),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if theirs {
                i.subscriber = None;
                i.generation += 1;
                i.credit = 0;
            }
        });
    }

    /// Drains pending wake-up bytes.
    pub(crate) fn clear_wake(&self) {
        let mut sink = [0u8; 64];
        while matches!(io::Read::read(&mut &self.wake_rx, &mut sink), Ok(n) if n > 0) {}
    }

    /// The command's process group id, 0 before it is spawned.
    pub fn pgid(&self) -> i32 {
        self.pgid.load(Ordering::Acquire)
    }

    pub(crate) fn set_pgid(&self, pgid: i32) {
        self.pgid.store(pgid, Ordering::Release);
    }
}

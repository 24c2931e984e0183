//! The protocol loop over one byte stream.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Scope};

use capsule_agent_protocol::{
    caps, try_encode, DecodeError, ErrorCode, ErrorInfo, Frame, FrameDecoder, Hello, Message,
    RunRequest, SyncRequest, WriteFile, CONTROL_ID, PROTOCOL_VERSION,
};

use crate::ctl::{CmdCtl, FrameSink, Link, Subscriber};
use crate::exec::{run_process, ExecConfig, Job};
use crate::files;
use crate::registry::Processes;
use crate::sync::{self, LiveKernel, SyncEnv};

/// The line printed to stderr after `Hello` when [`ServeConfig::ready_line`]
/// is set (boot-time measurement).
pub const READY_LINE: &str = "capsule-agent: ready";

/// Settings of one [`serve`] call.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Version string sent in `Hello`.
    pub agent_version: String,
    /// Whether to advertise [`caps::PID1`].
    pub pid1: bool,
    /// Print [`READY_LINE`] to stderr once `Hello` is sent.
    pub ready_line: bool,
    /// How commands are run.
    pub exec: ExecConfig,
    /// Variables set by the last `Sync`, for every later command. Shared by
    /// clones of this config, so it outlasts one [`serve`] call.
    pub sync_env: SyncEnv,
    /// The processes started through this config (`ListProcesses`,
    /// `Attach`). Shared by clones, so it outlasts one [`serve`] call.
    pub processes: Processes,
    /// What a connection's end does to the processes it started: `false`
    /// (the default, for serving one stream) kills them (SIGKILL to each
    /// process group) and waits for them before [`serve`] returns; `true`
    /// (PID 1, which reopens its channel) leaves them running, detached, for
    /// a later connection to attach.
    pub keep_processes: bool,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            pid1: false,
            ready_line: false,
            exec: ExecConfig::default(),
            sync_env: SyncEnv::default(),
            processes: Processes::default(),
            keep_processes: false,
        }
    }
}

/// How a [`serve`] call ended without an I/O error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeOutcome {
    /// The peer closed the stream.
    Closed,
    /// The host refused the agent with an `Error` on id 0.
    Refused(ErrorInfo),
    /// The stream lost framing (bad length field); an `Error` was sent on id
    /// 0 and the connection should be dropped.
    FramingLost(DecodeError),
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading the stream failed.
    #[error("reading the channel: {0}")]
    Read(#[source] io::Error),
    /// Sending `Hello` failed.
    #[error("sending hello: {0}")]
    Hello(#[source] io::Error),
}

/// The serialized writing half: one frame at a time, whole.
#[derive(Debug)]
pub(crate) struct Out<W> {
    writer: Mutex<W>,
    broken: AtomicBool,
}

impl<W: Write> Out<W> {
    fn new(writer: W) -> Out<W> {
        Out {
            writer: Mutex::new(writer),
            broken: AtomicBool::new(false),
        }
    }

    /// Encodes and writes one frame. Messages too large to encode are
    /// replaced by an `Error` so the peer is not left waiting.
    pub(crate) fn send(&self, id: u32, message: &Message) -> io::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let bytes = match try_encode(message, id) {
            Ok(b) => b,
            Err(e) => {
                let m = Message::error(ErrorCode::INTERNAL, format!("reply too large: {e}"));
                try_encode(&m, id).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?
            }
        };
        self.send_encoded(&bytes)
    }

    /// Writes one frame that is already encoded.
    fn send_encoded(&self, frame: &[u8]) -> io::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let r = w.write_all(frame).and_then(|()| w.flush());
        if r.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Writes one frame, then `len` raw zero bytes, holding the writer throughout so that no
    /// other frame comes in between (a channel test, see the protocol's docs).
    fn send_raw(&self, id: u32, message: &Message, len: u64) -> io::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let bytes = try_encode(message, id).map_err(|_| io::ErrorKind::InvalidData)?;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = w.write_all(&bytes);
        let mut left = len;
        while r.is_ok() && left > 0 {
            let n = left.min(RAW_ZEROS.len() as u64) as usize;
            r = w.write_all(&RAW_ZEROS[..n]);
            left -= n as u64;
        }
        let r = r.and_then(|()| w.flush());
        if r.is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<W: Write + Send> FrameSink for Out<W> {
    fn send(&self, id: u32, message: &Message) -> io::Result<()> {
        Out::send(self, id, message)
    }

    fn send_raw(&self, id: u32, message: &Message, len: u64) -> io::Result<()> {
        Out::send_raw(self, id, message, len)
    }

    fn send_encoded(&self, frame: &[u8]) -> io::Result<()> {
        Out::send_encoded(self, frame)
    }
}

/// Zeros, the raw bytes of a channel test: written this much at a time, as streamed output
/// is (a process's output is read 64 KiB at a time and sent as one frame).
static RAW_ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// State of one connection.
struct Conn<'c> {
    link: Arc<Link>,
    config: &'c ServeConfig,
    /// The processes this connection started, and their threads.
    started: Mutex<Vec<(Arc<CmdCtl>, JoinHandle<()>)>>,
    /// Where `WriteFile`s go, to be carried out one at a time in arrival order by one
    /// thread, started with the first of them; dropped when the connection ends.
    writes: Mutex<Option<mpsc::Sender<(u32, WriteFile)>>>,
}

impl Conn<'_> {
    fn started(&self) -> MutexGuard<'_, Vec<(Arc<CmdCtl>, JoinHandle<()>)>> {
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reply(&self, id: u32, m: &Message) {
        // A dead writer shows up as EOF on the reader; nothing to do here.
        self.link.send(id, m);
    }

    fn error(&self, id: u32, code: ErrorCode, msg: impl Into<String>) {
        self.reply(id, &Message::error(code, msg));
    }

    fn lookup(&self, id: u32) -> Option<Arc<CmdCtl>> {
        let found = self.link.get(id);
        if found.is_none() {
            self.error(
                id,
                ErrorCode::UNKNOWN_REQUEST,
                format!("no running command with id {id}"),
            );
        }
        found
    }

    /// Handles one frame; `Some` ends the connection.
    fn handle<'s>(&'s self, frame: Frame, scope: &'s Scope<'s, '_>) -> Option<ServeOutcome> {
        let id = frame.id;
        match frame.message {
            Message::Run(req) => self.start_run(id, req),
            Message::Stdin(data) => {
                if let Some(ctl) = self.lookup(id) {
                    if ctl.stdin_enabled() {
                        ctl.push_stdin(data);
                    } else {
                        self.error(
                            id,
                            ErrorCode::UNEXPECTED,
                            "command was started without stdin",
                        );
                    }
                }
            }
            Message::CloseStdin => {
                if let Some(ctl) = self.lookup(id) {
                    ctl.close_stdin();
                }
            }
            Message::Signal { sig } => {
                if !(1..=64).contains(&sig) {
                    self.error(id, ErrorCode::INVALID_ARGUMENT, format!("bad signal {sig}"));
                } else if let Some(ctl) = self.lookup(id) {
                    ctl.push_signal(sig);
                }
            }
            Message::Resize(size) => {
                if let Some(ctl) = self.lookup(id) {
                    if ctl.is_pty() {
                        ctl.resize(size);
                    } else {
                        self.error(id, ErrorCode::UNEXPECTED, "command is not on a terminal");
                    }
                }
            }
            // Silent: a credit may cross the request's end.
            Message::Credit { bytes } => {
                if let Some(ctl) = self.link.get(id) {
                    ctl.add_credit(&self.link, id, bytes);
                }
            }
            Message::ListProcesses => {
                self.reply(id, &Message::ProcessList(self.config.processes.list()))
            }
            Message::Attach { pid } => self.attach(id, pid),
            Message::ChannelTest {
                len,
                to_agent: false,
            } => self.channel_test(id, len, scope),
            // `read_loop` takes those (and their raw bytes) before they get here.
            Message::ChannelTest { to_agent: true, .. } => self.error(
                id,
                ErrorCode::INTERNAL,
                "a channel test reached the handler",
            ),
            Message::Hold => self.config.processes.hold(|| self.reply(id, &Message::Ack)),
            Message::Release => {
                self.config.processes.release();
                self.reply(id, &Message::Ack);
            }
            Message::Ping(data) => self.reply(id, &Message::Pong(data)),
            Message::Pong(_) => {}
            Message::Error(info) if id == CONTROL_ID => return Some(ServeOutcome::Refused(info)),
            // Errors about our replies need no answer.
            Message::Error(_) => {}
            Message::WriteFile(w) => self.write_in_order(id, w, scope),
            m @ (Message::ReadFile { .. }
            | Message::ListDir { .. }
            | Message::Stat { .. }
            | Message::Remove { .. }
            | Message::MakeDir { .. }
            | Message::Rename { .. }
            | Message::SetAttr(_)) => {
                let spawned = std::thread::Builder::new()
                    .name(format!("file-{id}"))
                    .spawn_scoped(scope, move || {
                        files::handle(id, m, &mut |r| match r {
                            files::Reply::Message(m) => self.reply(id, &m),
                            files::Reply::Encoded(frame) => self.link.send_encoded(&frame),
                        });
                    });
                if let Err(e) = spawned {
                    self.error(id, ErrorCode::INTERNAL, format!("thread: {e}"));
                }
            }
            // On the reading thread: it takes effect before the next frame.
            Message::Sync(req) => self.sync(id, req),
            m @ (Message::Hello(_)
            | Message::Ack
            | Message::Started { .. }
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exit(_)
            | Message::FileData { .. }
            | Message::DirListing { .. }
            | Message::ProcessList(_)
            | Message::Entries { .. }) => {
                self.error(
                    id,
                    ErrorCode::UNEXPECTED,
                    format!("{:?} is not a request", m.kind()),
                );
            }
        }
        None
    }

    /// Queues a `WriteFile` for the connection's writing thread (started here the first
    /// time), which answers each in turn: the chunks of one file sent back to back land in
    /// order.
    fn write_in_order<'s>(&'s self, id: u32, w: WriteFile, scope: &'s Scope<'s, '_>) {
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if writes.is_none() {
            let (tx, rx) = mpsc::channel::<(u32, WriteFile)>();
            let spawned = std::thread::Builder::new()
                .name("file-writes".into())
                .spawn_scoped(scope, move || {
                    for (id, w) in rx {
                        self.reply(id, &files::write(&w));
                    }
                });
            match spawned {
                Ok(_) => *writes = Some(tx),
                Err(e) => {
                    drop(writes);
                    self.error(id, ErrorCode::INTERNAL, format!("thread: {e}"));
                    return;
                }
            }
        }
        if let Some(tx) = writes.as_ref() {
            // The thread lives until the sender is dropped, so this cannot fail.
            let _ = tx.send((id, w));
        }
    }

    /// `ChannelTest { len, to_agent: false }`: the same frame back, then `len` raw bytes, on
    /// a thread of its own (the reading goes on meanwhile).
    fn channel_test<'s>(&'s self, id: u32, len: u64, scope: &'s Scope<'s, '_>) {
        if id == CONTROL_ID {
            self.error(id, ErrorCode::INVALID_ARGUMENT, "request id 0 is reserved");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name(format!("channel-test-{id}"))
            .spawn_scoped(scope, move || {
                let announce = Message::ChannelTest {
                    len,
                    to_agent: false,
                };
                // A dead writer shows up as EOF on the reader; nothing to do here.
                let _ = self.link.send_raw(id, &announce, len);
            });
        if let Err(e) = spawned {
            self.error(id, ErrorCode::INTERNAL, format!("thread: {e}"));
        }
    }

    fn sync(&self, id: u32, req: SyncRequest) {
        if id == CONTROL_ID {
            self.error(id, ErrorCode::INVALID_ARGUMENT, "request id 0 is reserved");
            return;
        }
        // Whoever received the output of earlier requests is gone; processes
        // held for the snapshot this guest was restored from report again,
        // to nobody: exits that came meanwhile wait for an `Attach`.
        self.config.processes.detach(None);
        self.config.processes.release();
        match sync::apply(req, &self.config.sync_env, &mut LiveKernel::default()) {
            Ok(()) => self.reply(id, &Message::Ack),
            Err(e) => self.error(id, ErrorCode::IO, e.to_string()),
        }
    }

    fn start_run(&self, id: u32, req: RunRequest) {
        if id == CONTROL_ID {
            self.error(id, ErrorCode::INVALID_ARGUMENT, "request id 0 is reserved");
            return;
        }
        let subscriber = Subscriber {
            link: Arc::clone(&self.link),
            id,
        };
        let pty = req.pty.is_some();
        let ctl = match CmdCtl::new(req.stdin || pty, pty, subscriber.clone()) {
            Ok(c) => c,
            Err(e) => {
                self.error(id, ErrorCode::INTERNAL, format!("control socket: {e}"));
                return;
            }
        };
        if !self.link.open(id, &ctl) {
            self.error(
                id,
                ErrorCode::DUPLICATE_REQUEST,
                format!("id {id} is already running"),
            );
            return;
        }
        let job = Job {
            req,
            // Taken here, on the reading thread, so a `Sync` sent before
            // this `Run` applies to it.
            sync_env: self.config.sync_env.get(),
            ctl: Arc::clone(&ctl),
            subscriber,
            processes: self.config.processes.clone(),
            config: self.config.exec.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("cmd-{id}"))
            .spawn(move || run_process(job));
        match spawned {
            Ok(thread) => {
                let mut started = self.started();
                started.retain(|(_, t)| !t.is_finished());
                started.push((ctl, thread));
            }
            Err(e) => {
                self.link.retire(id, &ctl);
                self.error(id, ErrorCode::INTERNAL, format!("thread: {e}"));
            }
        }
    }

    /// `Attach { pid }` on `id`: the process's output and exit come to `id`
    /// from now on.
    fn attach(&self, id: u32, pid: u32) {
        if id == CONTROL_ID {
            self.error(id, ErrorCode::INVALID_ARGUMENT, "request id 0 is reserved");
            return;
        }
        if self.link.is_open(id) {
            let why = format!("id {id} is already running");
            self.error(id, ErrorCode::DUPLICATE_REQUEST, why);
            return;
        }
        let no_such = || {
            let why = format!("no process {pid} started by the agent is left");
            self.error(id, ErrorCode::NO_SUCH_PROCESS, why);
        };
        let Some(ctl) = self.config.processes.claim(pid) else {
            return no_such();
        };
        self.link.open(id, &ctl);
        let subscriber = Subscriber {
            link: Arc::clone(&self.link),
            id,
        };
        if !ctl.attach(subscriber) {
            // Its exit is being sent to the request it went to.
            self.link.retire(id, &ctl);
            no_such();
        }
    }

    fn read_loop<'s, R: Read>(
        &'s self,
        reader: &mut R,
        scope: &'s Scope<'s, '_>,
    ) -> Result<ServeOutcome, ServeError> {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        // Bytes read on this connection, for the report of a framing loss: where in the
        // host's stream it happened tells a lost byte from a bad frame.
        let mut read_total: u64 = 0;
        // The raw bytes of a channel test (`to_agent`) still to come: its id, how many.
        let mut raw: Option<(u32, u64)> = None;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(ServeOutcome::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServeError::Read(e)),
            };
            read_total += n as u64;
            let mut bytes = &buf[..n];
            if let Some((id, left)) = raw.as_mut() {
                let taken = usize::try_from(*left).unwrap_or(usize::MAX).min(n);
                *left -= taken as u64;
                bytes = &bytes[taken..];
                if *left == 0 {
                    self.reply(*id, &Message::Ack);
                    raw = None;
                }
            }
            decoder.push(bytes);
            loop {
                // Where the next frame starts in this connection's stream.
                let frame_at = read_total - decoder.buffered_len() as u64;
                match decoder.next_frame() {
                    Ok(Some(Frame {
                        id,
                        message:
                            Message::ChannelTest {
                                len,
                                to_agent: true,
                            },
                    })) => {
                        // Its raw bytes follow the frame: those already here, then the
                        // next reads' (the decoder is empty until they are all read).
                        let buffered = decoder.discard(usize::try_from(len).unwrap_or(usize::MAX));
                        let left = len - buffered as u64;
                        if left == 0 {
                            self.reply(id, &Message::Ack);
                        } else {
                            raw = Some((id, left));
                            break;
                        }
                    }
                    Ok(Some(frame)) => {
                        if let Some(outcome) = self.handle(frame, scope) {
                            return Ok(outcome);
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => {
                        let report = format!(
                            "{e}, in the frame header at byte {frame_at} of this connection \
                             ({read_total} bytes read); the agent closes the connection"
                        );
                        eprintln!("capsule-agent: lost framing: {report}");
                        self.error(CONTROL_ID, e.error_code(), report);
                        return Ok(ServeOutcome::FramingLost(e));
                    }
                    Err(e) => self.error(
                        e.request_id().unwrap_or(CONTROL_ID),
                        e.error_code(),
                        e.to_string(),
                    ),
                }
            }
        }
    }
}

/// Capabilities this agent advertises.
pub fn capabilities(pid1: bool) -> u64 {
    let base = caps::RUN
        | caps::STREAM
        | caps::STDIN
        | caps::SIGNAL
        | caps::FILES
        | caps::SYNC
        | caps::USER
        | caps::PTY
        | caps::PROCESSES
        | caps::HOLD;
    if pid1 {
        base | caps::PID1
    } else {
        base
    }
}

/// Runs the agent protocol over one byte stream until it ends.
///
/// Sends `Hello`, then decodes requests from `reader` and answers on
/// `writer`; each command runs on its own thread and frames are written whole
/// and one at a time. When the stream ends (EOF, refusal, lost framing), the
/// processes whose output went to it are detached, and those it started are
/// killed (SIGKILL to each process group) and waited for before this returns
/// unless [`ServeConfig::keep_processes`] keeps them running.
pub fn serve<R: Read, W: Write + Send + 'static>(
    mut reader: R,
    writer: W,
    config: &ServeConfig,
) -> Result<ServeOutcome, ServeError> {
    let conn = Conn {
        link: Link::new(Box::new(Out::new(writer))),
        config,
        started: Mutex::new(Vec::new()),
        writes: Mutex::new(None),
    };
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: config.agent_version.clone(),
        capabilities: capabilities(config.pid1),
    });
    conn.link
        .send_checked(CONTROL_ID, &hello)
        .map_err(ServeError::Hello)?;
    if config.ready_line {
        eprintln!("{READY_LINE}");
    }
    let result = std::thread::scope(|scope| {
        let result = conn.read_loop(&mut reader, scope);
        // The writing thread finishes what it was given, then ends.
        drop(conn.writes.lock().unwrap_or_else(|p| p.into_inner()).take());
        result
    });
    config.processes.detach(Some(&conn.link));
    let started = std::mem::take(&mut *conn.started());
    if !config.keep_processes {
        for (ctl, _) in &started {
            ctl.cancel();
        }
        for (_, thread) in started {
            let _ = thread.join();
        }
    }
    result
}

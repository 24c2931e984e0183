//! The host end of the agent protocol (`capsule-agent-protocol`) over any byte stream: the
//! Linux guest's agent channel, or a socket in tests.
//!
//! One reader thread decodes frames and routes each to the request waiting for its id;
//! writes are serialised by a mutex. Many requests run at once. The link is ready once the
//! agent's `Hello` arrived with a protocol version we speak.
//!
//! **Freezing.** A guest's snapshot must hold the channel's bytes in flight, cut at a point
//! both ends agree on. [`AgentLink::hold_writes`] stops new frames from being written (a frame
//! being written is finished first), so every byte sent so far is in the socket or beyond;
//! [`AgentLink::received_bytes`] and [`AgentLink::undecoded`] tell what the reader has taken
//! out of the socket and what of it is not a whole frame yet (the start of a frame the agent
//! was sending). A link for the restored guest starts with [`AgentLink::restored`] (no second
//! `Hello`: the agent never restarted), with request ids continuing where the snapshot's link
//! was, so no id of a request still running in the guest is reused.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::sync::{lock, wait};
use capsule_agent_protocol::{
    caps, encode, ErrorCode, ErrorInfo, ExitInfo, Frame, FrameDecoder, Hello, Message,
    ProcessEntry, RunRequest, SyncRequest, CONTROL_ID, MAX_CHUNK_LEN, PROTOCOL_VERSION,
};

/// Why a request over the link failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkError {
    /// The stream closed or broke (the guest went away).
    Closed(String),
    /// No answer in time.
    Timeout,
    /// The agent refused or could not do the request.
    Agent(String),
    /// The agent ended the request with this error (its code says why).
    Refused(ErrorInfo),
    /// The agent broke the protocol.
    Protocol(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Closed(why) => write!(f, "the agent connection closed: {why}"),
            LinkError::Timeout => f.write_str("the agent did not answer in time"),
            LinkError::Agent(why) => write!(f, "the agent reported: {why}"),
            LinkError::Refused(e) => write!(f, "the agent reported: {}", e.message),
            LinkError::Protocol(why) => write!(f, "the agent broke the protocol: {why}"),
        }
    }
}

type Waiters = HashMap<u32, Sender<Message>>;

/// The writing side: the stream, and whether writes are held (see [`AgentLink::hold_writes`]).
struct Writer {
    stream: Box<dyn Write + Send>,
    held: bool,
}

/// What the reader thread shares: its decoder (with the bytes not yet whole frames) and how
/// many bytes it has taken from the stream.
#[derive(Default)]
struct ReaderState {
    decoder: FrameDecoder,
    received: u64,
    /// The request whose channel test ([`AgentLink::channel_test`]) may announce raw bytes
    /// from the agent: only then is such an announcement taken as one.
    raw_expected: Option<u32>,
    /// The agent's report that it lost the framing of the host's stream, once it came.
    lost: Option<String>,
    /// Called once when the reader ends (see [`AgentLink::on_end`]).
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

/// A connected agent.
pub(crate) struct AgentLink {
    writer: Mutex<Writer>,
    /// Signalled when writes are released or the link closes.
    writable: Condvar,
    waiters: Arc<Mutex<Waiters>>,
    reader: Arc<Mutex<ReaderState>>,
    next_id: AtomicU32,
    closed: Arc<AtomicBool>,
    hello: Hello,
    /// For each process whose output a request of this link receives: that request's id.
    receivers: Mutex<HashMap<u32, u32>>,
}

/// Holds an [`AgentLink`]'s writes until dropped.
pub(crate) struct WritesHeld {
    link: Arc<AgentLink>,
}

impl Drop for WritesHeld {
    fn drop(&mut self) {
        lock(&self.link.writer).held = false;
        self.link.writable.notify_all();
    }
}

impl AgentLink {
    /// Starts reading `reader` and waits up to `timeout` for the agent's `Hello`.
    pub(crate) fn connect(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        timeout: Duration,
    ) -> Result<Arc<AgentLink>, LinkError> {
        let waiters: Arc<Mutex<Waiters>> = Arc::default();
        let (hello_tx, hello_rx) = crossbeam_channel::bounded(1);
        lock(&waiters).insert(CONTROL_ID, hello_tx);
        let (state, closed) = start_reader(reader, waiters.clone())?;
        let hello = match hello_rx.recv_timeout(timeout) {
            Ok(Message::Hello(hello)) => hello,
            Ok(Message::Error(e)) => return Err(LinkError::Agent(e.message)),
            Ok(other) => {
                return Err(LinkError::Protocol(format!(
                    "expected Hello, got {:?}",
                    other.kind()
                )))
            }
            Err(RecvTimeoutError::Timeout) => return Err(LinkError::Timeout),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(LinkError::Closed("before the agent said hello".into()))
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(LinkError::Protocol(format!(
                "agent speaks protocol {}, the engine {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        lock(&waiters).remove(&CONTROL_ID);
        Ok(Self::with_parts(writer, waiters, state, closed, hello, 1))
    }

    /// A link to an agent that is already running (in a guest restored from a snapshot):
    /// `hello` is what it said when it started, `next_id` the first request id to use.
    pub(crate) fn restored(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        hello: Hello,
        next_id: u32,
    ) -> Result<Arc<AgentLink>, LinkError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(LinkError::Protocol(format!(
                "the snapshot's agent speaks protocol {}, the engine {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let waiters: Arc<Mutex<Waiters>> = Arc::default();
        let (state, closed) = start_reader(reader, waiters.clone())?;
        Ok(Self::with_parts(
            writer, waiters, state, closed, hello, next_id,
        ))
    }

    fn with_parts(
        writer: Box<dyn Write + Send>,
        waiters: Arc<Mutex<Waiters>>,
        reader: Arc<Mutex<ReaderState>>,
        closed: Arc<AtomicBool>,
        hello: Hello,
        next_id: u32,
    ) -> Arc<AgentLink> {
        Arc::new(AgentLink {
            writer: Mutex::new(Writer {
                stream: writer,
                held: false,
            }),
            writable: Condvar::new(),
            waiters,
            reader,
            next_id: AtomicU32::new(next_id.max(1)),
            closed,
            hello,
            receivers: Mutex::new(HashMap::new()),
        })
    }

    /// The agent's greeting.
    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The request id the next request would take (saved with a snapshot).
    pub(crate) fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::SeqCst)
    }

    /// Tries to hold writes: `Some` once no frame is being written and none will be until
    /// the guard is dropped; `None` if a write is in progress now (it may be blocked on a
    /// full stream: drain the other end and try again).
    pub(crate) fn try_hold_writes(self: &Arc<Self>) -> Option<WritesHeld> {
        let mut writer = self.writer.try_lock().ok()?;
        writer.held = true;
        Some(WritesHeld { link: self.clone() })
    }

    /// Bytes the reader has taken from the stream so far.
    pub(crate) fn received_bytes(&self) -> u64 {
        lock(&self.reader).received
    }

    /// The bytes received that are not whole frames yet (the start of a frame the agent is
    /// sending), oldest first.
    pub(crate) fn undecoded(&self) -> Vec<u8> {
        lock(&self.reader).decoder.pending().to_vec()
    }

    /// Writes one frame of request `id` (waits while writes are held).
    pub(crate) fn send(&self, message: &Message, id: u32) -> Result<(), LinkError> {
        let bytes = encode(message, id);
        let mut writer = lock(&self.writer);
        while writer.held && !self.closed.load(Ordering::SeqCst) {
            writer = wait(&self.writable, writer);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error("the agent is gone".into()));
        }
        writer
            .stream
            .write_all(&bytes)
            .and_then(|()| writer.stream.flush())
            .map_err(|e| self.closed_error(e.to_string()))
    }

    /// Why a request cannot go on over a closed link: the agent's own report when it lost
    /// the framing of the host's stream, else `why`.
    fn closed_error(&self, why: String) -> LinkError {
        match lock(&self.reader).lost.clone() {
            Some(report) => LinkError::Agent(report),
            None => LinkError::Closed(why),
        }
    }

    /// Has `f` called once the reader ends (the stream closed or the framing is lost), at
    /// once if it has already: the owner of the stream shuts it down there, so that a write
    /// blocked on a guest that no longer reads fails instead of waiting for ever.
    pub(crate) fn on_end(&self, f: impl FnOnce() + Send + 'static) {
        let mut state = lock(&self.reader);
        // The reader marks the link closed before it takes the callback, under this lock.
        if self.closed.load(Ordering::SeqCst) {
            drop(state);
            f();
        } else {
            state.on_end = Some(Box::new(f));
        }
    }

    /// A fresh request id and the channel its replies arrive on (until [`Self::close_request`]
    /// or the link closes).
    pub(crate) fn open_request(&self) -> Result<(u32, Receiver<Message>), LinkError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(LinkError::Closed("the agent is gone".into()));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut waiters = lock(&self.waiters);
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != CONTROL_ID && !waiters.contains_key(&id) {
                break id;
            }
        };
        waiters.insert(id, tx);
        Ok((id, rx))
    }

    /// Stops routing replies of request `id`.
    pub(crate) fn close_request(&self, id: u32) {
        lock(&self.waiters).remove(&id);
    }

    /// Waits for the next message of a request until `deadline`.
    pub(crate) fn next_reply(
        replies: &Receiver<Message>,
        deadline: Option<Instant>,
    ) -> Result<Message, LinkError> {
        match deadline {
            Some(deadline) => replies.recv_deadline(deadline).map_err(|e| match e {
                RecvTimeoutError::Timeout => LinkError::Timeout,
                RecvTimeoutError::Disconnected => LinkError::Closed("while a request ran".into()),
            }),
            None => replies
                .recv()
                .map_err(|_| LinkError::Closed("while a request ran".into())),
        }
    }

    /// Sends `data` as the stdin of request `id` (in frames of at most [`MAX_CHUNK_LEN`]
    /// bytes), then, if `close`, closes it.
    pub(crate) fn send_stdin(&self, id: u32, data: &[u8], close: bool) -> Result<(), LinkError> {
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            self.send(&Message::Stdin(chunk.to_vec()), id)?;
        }
        if close {
            self.send(&Message::CloseStdin, id)?;
        }
        Ok(())
    }

    /// Notes that request `id` receives the output of process `pid`.
    pub(crate) fn note_receiver(&self, pid: u32, id: u32) {
        lock(&self.receivers).insert(pid, id);
    }

    /// Forgets that request `id` receives the output of `pid` (if it still does).
    pub(crate) fn forget_receiver(&self, pid: u32, id: u32) {
        let mut receivers = lock(&self.receivers);
        if receivers.get(&pid) == Some(&id) {
            receivers.remove(&pid);
        }
    }

    /// The request of this link that receives the output of `pid`, if one does.
    pub(crate) fn receiver_of(&self, pid: u32) -> Option<u32> {
        lock(&self.receivers).get(&pid).copied()
    }

    /// The processes the agent tracks (`ListProcesses`), waiting up to `timeout`.
    pub(crate) fn list_processes(&self, timeout: Duration) -> Result<Vec<ProcessEntry>, LinkError> {
        let (id, replies) = self.open_request()?;
        let result = self.send(&Message::ListProcesses, id).and_then(|()| {
            let deadline = Instant::now().checked_add(timeout);
            loop {
                match Self::next_reply(&replies, deadline)? {
                    Message::ProcessList(list) => return Ok(list),
                    Message::Error(e) if e.code.ends_request() => {
                        return Err(LinkError::Refused(e))
                    }
                    _ => {}
                }
            }
        });
        self.close_request(id);
        result
    }

    /// Runs a command and waits for its exit, feeding it `stdin` (then closing it) if given.
    /// `timeout` bounds the wait on the host side; the agent enforces `request.timeout_ms`
    /// itself (killing the process group).
    pub(crate) fn run(
        &self,
        request: RunRequest,
        stdin: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<ExitInfo, LinkError> {
        let (id, replies) = self.open_request()?;
        let sent = self
            .send(&Message::Run(request), id)
            .and_then(|()| match stdin {
                Some(data) => self.send_stdin(id, data, true),
                None => Ok(()),
            });
        let result = sent.and_then(|()| {
            // A wait beyond what the clock can say is no deadline.
            let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
            loop {
                match Self::next_reply(&replies, deadline)? {
                    Message::Exit(exit) => return Ok(exit),
                    Message::Error(e) if e.code.ends_request() => {
                        return Err(LinkError::Refused(e))
                    }
                    // Started, advisory errors, streamed chunks (not requested): keep waiting.
                    _ => {}
                }
            }
        });
        if result == Err(LinkError::Timeout) {
            // Kill what is left in the guest; best effort.
            let _ = self.send(&Message::Signal { sig: 9 }, id);
        }
        self.close_request(id);
        result
    }

    /// Sends the agent a [`SyncRequest`] (wall clock, entropy, environment) and waits up to
    /// `timeout` for its `Ack`.
    pub(crate) fn sync(&self, request: SyncRequest, timeout: Duration) -> Result<(), LinkError> {
        self.acked(Message::Sync(request), timeout)
    }

    /// Asks the agent to hold its processes' output and exits for a snapshot (the protocol's
    /// `Hold`), waiting up to `timeout` for its answer: once this returns `Ok(true)`, the
    /// guest may be frozen with no report of a process half sent, and a restored copy sends
    /// none before its `Sync`. `Ok(false)`: the agent predates holding.
    pub(crate) fn hold_reports(&self, timeout: Duration) -> Result<bool, LinkError> {
        if self.hello.capabilities & caps::HOLD == 0 {
            return Ok(false);
        }
        self.acked(Message::Hold, timeout).map(|()| true)
    }

    /// Ends a hold (the protocol's `Release`; the guest runs on), without waiting for the
    /// answer: the agent applies it before any request sent after it.
    pub(crate) fn release_reports(&self) -> Result<(), LinkError> {
        let (id, _replies) = self.open_request()?;
        let sent = self.send(&Message::Release, id);
        // Its `Ack` is dropped on arrival; ids are not reused before they wrap.
        self.close_request(id);
        sent
    }

    /// Sends `message` on a fresh request id and waits up to `timeout` for its `Ack`.
    fn acked(&self, message: Message, timeout: Duration) -> Result<(), LinkError> {
        let (id, replies) = self.open_request()?;
        let result = self.send(&message, id).and_then(|()| {
            let deadline = Instant::now().checked_add(timeout);
            loop {
                match Self::next_reply(&replies, deadline)? {
                    Message::Ack => return Ok(()),
                    Message::Error(e) if e.code.ends_request() => {
                        return Err(LinkError::Agent(e.message))
                    }
                    _ => {}
                }
            }
        });
        self.close_request(id);
        result
    }

    /// A channel test (the protocol's `ChannelTest`, for benchmarks): `len` raw bytes through
    /// the stream, agent to host (`to_agent` false: the reader thread takes them out of the
    /// stream and drops them, decoding nothing) or host to agent (written here right after
    /// the request, under the writer's lock; the agent drops them). Returns the time from
    /// sending the request until the last byte was read by this side's reader, or, to the
    /// agent, until its `Ack` for the last byte arrived. Nothing else may use the link
    /// meanwhile without waiting (the raw bytes hold the writer, or the agent's), and the
    /// guest must not be paused during it.
    #[cfg(feature = "testing")]
    pub(crate) fn channel_test(
        &self,
        len: u64,
        to_agent: bool,
        timeout: Duration,
    ) -> Result<Duration, LinkError> {
        let (id, replies) = self.open_request()?;
        let request = encode(&Message::ChannelTest { len, to_agent }, id);
        let started = Instant::now();
        let sent = if to_agent {
            self.send_raw(&request, len)
        } else {
            lock(&self.reader).raw_expected = Some(id);
            self.send_raw(&request, 0)
        };
        let result = sent.and_then(|()| {
            let deadline = Instant::now().checked_add(timeout);
            match Self::next_reply(&replies, deadline)? {
                Message::Ack if to_agent => Ok(started.elapsed()),
                Message::ChannelTest { .. } if !to_agent => Ok(started.elapsed()),
                Message::Error(e) if e.code.ends_request() => Err(LinkError::Refused(e)),
                other => Err(LinkError::Protocol(format!(
                    "a channel test got {:?}",
                    other.kind()
                ))),
            }
        });
        let mut reader = lock(&self.reader);
        if reader.raw_expected == Some(id) {
            reader.raw_expected = None;
        }
        drop(reader);
        self.close_request(id);
        result
    }

    /// Writes the encoded `frame`, then `len` raw zero bytes, with no other frame in between.
    #[cfg(feature = "testing")]
    fn send_raw(&self, frame: &[u8], len: u64) -> Result<(), LinkError> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut writer = lock(&self.writer);
        while writer.held && !self.closed.load(Ordering::SeqCst) {
            writer = wait(&self.writable, writer);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(LinkError::Closed("the agent is gone".into()));
        }
        let mut result = writer.stream.write_all(frame);
        let mut left = len;
        while result.is_ok() && left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            result = writer.stream.write_all(&ZEROS[..n]);
            left -= n as u64;
        }
        result
            .and_then(|()| writer.stream.flush())
            .map_err(|e| LinkError::Closed(e.to_string()))
    }

    /// Whether the stream has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Marks the link closed: requests fail from now on, and a request waiting for held
    /// writes gives up. (The stream itself ends when its owner closes it.)
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _writer = lock(&self.writer);
        self.writable.notify_all();
    }
}

/// Starts the reader thread on `reader`, routing frames to `waiters`.
fn start_reader(
    reader: Box<dyn Read + Send>,
    waiters: Arc<Mutex<Waiters>>,
) -> Result<(Arc<Mutex<ReaderState>>, Arc<AtomicBool>), LinkError> {
    let state: Arc<Mutex<ReaderState>> = Arc::default();
    let closed = Arc::new(AtomicBool::new(false));
    let (thread_state, thread_closed) = (state.clone(), closed.clone());
    std::thread::Builder::new()
        .name("capsule-agent-reader".into())
        .spawn(move || read_loop(reader, waiters, thread_state, thread_closed))
        .map_err(|e| LinkError::Closed(format!("spawning the reader: {e}")))?;
    Ok((state, closed))
}

/// Decodes frames until the stream ends, routing each to its request.
fn read_loop(
    mut reader: Box<dyn Read + Send>,
    waiters: Arc<Mutex<Waiters>>,
    state: Arc<Mutex<ReaderState>>,
    closed: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // A channel test's raw bytes still to come: its announcement (delivered once they are
    // all read), how many.
    let mut raw: Option<(Frame, u64)> = None;
    'outer: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "agent stream read failed");
                break;
            }
        };
        // Decoding and counting under one lock: whoever reads `received` sees every frame
        // of those bytes routed, and `undecoded` is exactly what is left of them.
        let mut state = lock(&state);
        state.received += n as u64;
        let mut bytes = &buf[..n];
        if let Some((_, left)) = raw.as_mut() {
            let taken = usize::try_from(*left).unwrap_or(usize::MAX).min(n);
            *left -= taken as u64;
            bytes = &bytes[taken..];
            if *left == 0 {
                if let Some((frame, _)) = raw.take() {
                    route(&waiters, frame);
                }
            }
        }
        state.decoder.push(bytes);
        loop {
            match state.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Message::ChannelTest {
                        len,
                        to_agent: false,
                    } = frame.message
                    {
                        if state.raw_expected == Some(frame.id) {
                            // Its raw bytes follow: those already here, then the next
                            // reads' (the decoder stays empty until they are all read).
                            state.raw_expected = None;
                            let buffered = state
                                .decoder
                                .discard(usize::try_from(len).unwrap_or(usize::MAX));
                            let left = len - buffered as u64;
                            if left > 0 {
                                raw = Some((frame, left));
                                break;
                            }
                        } else {
                            tracing::warn!(id = frame.id, "unrequested channel test ignored");
                            continue;
                        }
                    }
                    if let Some(report) = framing_lost_by_agent(&frame) {
                        // The agent ends this connection: every request fails now with its
                        // report rather than waiting out a timeout.
                        tracing::warn!(
                            report = %report.message,
                            received = state.received,
                            "the agent lost the framing of the host's stream; closing the link"
                        );
                        let message = format!(
                            "the agent lost the framing of the host's stream: {}",
                            report.message
                        );
                        state.lost = Some(message.clone());
                        // Closed before anyone hears of it: a caller woken by the report
                        // finds the link closed.
                        closed.store(true, Ordering::SeqCst);
                        let report = Message::Error(ErrorInfo {
                            code: report.code,
                            message,
                        });
                        for tx in lock(&waiters).values() {
                            let _ = tx.send(report.clone());
                        }
                        break 'outer;
                    }
                    route(&waiters, frame);
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    tracing::warn!(error = %e, "agent stream lost framing");
                    break 'outer;
                }
                Err(e) => tracing::warn!(error = %e, "skipping a malformed agent frame"),
            }
        }
    }
    closed.store(true, Ordering::SeqCst);
    // Wake every waiter: their senders drop.
    lock(&waiters).clear();
    let on_end = lock(&state).on_end.take();
    if let Some(on_end) = on_end {
        on_end();
    }
}

/// The agent's report that it lost the framing of the host's stream (a `MALFORMED` error on
/// the control id, sent as it closes the connection), if `frame` is one.
fn framing_lost_by_agent(frame: &Frame) -> Option<&ErrorInfo> {
    match &frame.message {
        Message::Error(e) if frame.id == CONTROL_ID && e.code == ErrorCode::MALFORMED => Some(e),
        _ => None,
    }
}

/// Hands `frame` to the request waiting for it, if one is.
fn route(waiters: &Mutex<Waiters>, frame: Frame) {
    let waiters = lock(waiters);
    if let Some(tx) = waiters.get(&frame.id) {
        let _ = tx.send(frame.message);
    } else {
        tracing::trace!(id = frame.id, "frame for no waiting request");
    }
}

/// The real agent serving one end of a socket pair on a thread; a link on the other (for
/// tests of this module and of the Linux runtime).
#[cfg(test)]
pub(crate) fn real_agent() -> Arc<AgentLink> {
    real_agent_with(capsule_agent::ServeConfig::default()).0
}

/// [`real_agent`] with the agent's `config`; also returns the host's end of the socket, whose
/// shutdown ends the connection (as a paused guest's link ends).
#[cfg(test)]
pub(crate) fn real_agent_with(
    config: capsule_agent::ServeConfig,
) -> (Arc<AgentLink>, std::os::unix::net::UnixStream) {
    use std::os::unix::net::UnixStream;
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let reader = guest.try_clone().unwrap();
        let _ = capsule_agent::serve(reader, guest, &config);
    });
    let reader = host.try_clone().unwrap();
    let end = host.try_clone().unwrap();
    let link =
        AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5)).unwrap();
    (link, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn agent() -> Arc<AgentLink> {
        real_agent()
    }

    #[test]
    fn runs_commands_through_the_real_agent() {
        let link = agent();
        assert_eq!(link.hello().protocol_version, PROTOCOL_VERSION);
        let exit = link
            .run(RunRequest::shell("echo hi; exit 3"), None, None)
            .unwrap();
        assert_eq!(exit.stdout, b"hi\n");
        assert_eq!(exit.status, capsule_agent_protocol::ExitStatus::Code(3));
    }

    /// A held agent (before a snapshot) keeps a command's exit until the release.
    #[test]
    fn a_hold_keeps_an_exit_until_the_release() {
        let link = agent();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let runner = link.clone();
        std::thread::spawn(move || {
            let _ = tx.send(runner.run(
                RunRequest::shell("sleep 0.3; echo held; exit 4"),
                None,
                None,
            ));
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(link.hold_reports(Duration::from_secs(10)).unwrap());
        // The command ends meanwhile; its exit stays in the agent.
        assert!(rx.recv_timeout(Duration::from_millis(800)).is_err());
        link.release_reports().unwrap();
        let exit = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(exit.stdout, b"held\n");
        assert_eq!(exit.status, capsule_agent_protocol::ExitStatus::Code(4));
    }

    #[test]
    fn many_commands_at_once() {
        let link = agent();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let link = link.clone();
                std::thread::spawn(move || {
                    let exit = link
                        .run(
                            RunRequest::shell(format!("sleep 0.1; echo {i}")),
                            None,
                            None,
                        )
                        .unwrap();
                    assert_eq!(exit.stdout, format!("{i}\n").into_bytes());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_host_side_timeout_is_reported() {
        let link = agent();
        let started = Instant::now();
        assert_eq!(
            link.run(
                RunRequest::shell("sleep 5"),
                None,
                Some(Duration::from_millis(100))
            ),
            Err(LinkError::Timeout)
        );
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(
            link.run(RunRequest::shell("echo after"), None, None)
                .unwrap()
                .stdout,
            b"after\n"
        );
    }

    #[test]
    fn channel_tests_move_raw_bytes_both_ways_and_framing_resumes() {
        let link = agent();
        // Odd sizes: the raw bytes end inside a read and inside the agent's writes.
        for len in [0, 1, 100_003, 3 << 20] {
            for to_agent in [false, true] {
                link.channel_test(len, to_agent, Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("{len} bytes, to agent {to_agent}: {e}"));
                let exit = link
                    .run(RunRequest::shell("echo framed"), None, None)
                    .unwrap();
                assert_eq!(exit.stdout, b"framed\n");
            }
        }
        // Commands running meanwhile get their frames after the raw bytes.
        let busy = {
            let link = link.clone();
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        let out = link
                            .run(RunRequest::shell(format!("echo {i}")), None, None)
                            .unwrap();
                        String::from_utf8(out.stdout).unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        };
        for _ in 0..5 {
            link.channel_test(1 << 20, false, Duration::from_secs(30))
                .unwrap();
            link.channel_test(1 << 20, true, Duration::from_secs(30))
                .unwrap();
        }
        let outs = busy.join().unwrap();
        assert_eq!(outs, (0..20).map(|i| format!("{i}\n")).collect::<Vec<_>>());
    }

    /// A link whose agent is the returned stream, written by hand (its `Hello` is sent).
    fn linked_to_a_scripted_agent() -> (Arc<AgentLink>, UnixStream) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            capabilities: 0,
        });
        guest.write_all(&encode(&hello, CONTROL_ID)).unwrap();
        let reader = host.try_clone().unwrap();
        let link =
            AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5)).unwrap();
        (link, guest)
    }

    #[test]
    fn an_unrequested_channel_test_is_dropped_not_taken_as_raw() {
        let (link, mut guest) = linked_to_a_scripted_agent();
        let (id, replies) = link.open_request().unwrap();
        // Announces 4 raw bytes nobody asked for, then answers the request.
        let raw = Message::ChannelTest {
            len: 4,
            to_agent: false,
        };
        guest.write_all(&encode(&raw, id)).unwrap();
        guest.write_all(&encode(&Message::Ack, id)).unwrap();
        let got = AgentLink::next_reply(&replies, Some(Instant::now() + Duration::from_secs(5)));
        assert_eq!(got, Ok(Message::Ack));
    }

    #[test]
    fn the_agents_framing_loss_report_fails_every_request_at_once_with_it() {
        let (link, mut guest) = linked_to_a_scripted_agent();
        let (_, first) = link.open_request().unwrap();
        let (_, second) = link.open_request().unwrap();
        let report = Message::error(
            ErrorCode::MALFORMED,
            "frame length 117901063, in the frame header at byte 57 of this connection",
        );
        guest.write_all(&encode(&report, CONTROL_ID)).unwrap();
        for replies in [first, second] {
            // Long before any timeout a caller would give.
            let got =
                AgentLink::next_reply(&replies, Some(Instant::now() + Duration::from_secs(5)));
            match got {
                Ok(Message::Error(e)) => {
                    assert_eq!(e.code, ErrorCode::MALFORMED);
                    assert!(
                        e.message.starts_with("the agent lost the framing")
                            && e.message.contains("at byte 57"),
                        "{}",
                        e.message
                    );
                }
                other => panic!("expected the agent's report, got {other:?}"),
            }
        }
        assert!(matches!(link.open_request(), Err(LinkError::Closed(_))));
        // Writes fail with the report too, and the owner of the stream is told (it shuts
        // the stream down, so that a write blocked on a full stream fails as well).
        match link.send(&Message::Ack, 7) {
            Err(LinkError::Agent(report)) => assert!(report.contains("at byte 57"), "{report}"),
            other => panic!("expected the agent's report, got {other:?}"),
        }
        let (ended_tx, ended_rx) = crossbeam_channel::bounded(1);
        link.on_end(move || {
            let _ = ended_tx.send(());
        });
        assert!(ended_rx.recv_timeout(Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn a_closed_stream_ends_requests() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut guest_writer = guest.try_clone().unwrap();
        std::thread::spawn(move || {
            // Say hello, then hang up.
            let hello = Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "test".into(),
                capabilities: 0,
            });
            guest_writer.write_all(&encode(&hello, CONTROL_ID)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(guest);
        });
        let reader = host.try_clone().unwrap();
        let link =
            AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5)).unwrap();
        assert!(matches!(
            link.run(
                RunRequest::shell("true"),
                None,
                Some(Duration::from_secs(5))
            ),
            Err(LinkError::Closed(_))
        ));
        assert!(link.is_closed());
    }

    #[test]
    fn a_wrong_protocol_version_is_refused() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            agent_version: "future".into(),
            capabilities: 0,
        });
        guest.write_all(&encode(&hello, CONTROL_ID)).unwrap();
        let reader = host.try_clone().unwrap();
        assert!(matches!(
            AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5)),
            Err(LinkError::Protocol(_))
        ));
    }
}

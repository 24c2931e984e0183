//! Test harness: the agent's `serve` on one end of a socket pair, a minimal
//! host on the other.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use capsule_agent::{serve, ServeConfig, ServeError, ServeOutcome};
use capsule_agent_protocol::*;

pub struct Host {
    pub sock: UnixStream,
    dec: FrameDecoder,
    pub hello: Hello,
    agent: Option<JoinHandle<Result<ServeOutcome, ServeError>>>,
    /// Whether [`Host::collect`] gives back the window of every output chunk
    /// it takes (a host that keeps up); off, streamed output stops after
    /// [`STREAM_WINDOW`] bytes.
    pub auto_credit: bool,
}

/// Everything one request produced.
#[derive(Debug, Default)]
pub struct Reply {
    pub frames: Vec<Message>,
    pub started: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExitInfo>,
    pub error: Option<ErrorInfo>,
}

impl Reply {
    fn add(&mut self, m: Message) -> bool {
        self.frames.push(m.clone());
        match m {
            Message::Started { pid } => self.started = Some(pid),
            Message::Stdout(d) => self.stdout.extend(d),
            Message::Stderr(d) => self.stderr.extend(d),
            Message::Exit(x) => {
                self.stdout.extend(&x.stdout);
                self.stderr.extend(&x.stderr);
                self.exit = Some(x);
                return true;
            }
            Message::Error(e) => {
                let terminal = e.code.ends_request();
                self.error = Some(e);
                return terminal;
            }
            Message::Pong(_)
            | Message::Ack
            | Message::FileData { .. }
            | Message::DirListing { .. }
            | Message::ProcessList(_) => return true,
            Message::Entries { more, .. } => return !more,
            _ => {}
        }
        false
    }

    pub fn exit(&self) -> &ExitInfo {
        self.exit
            .as_ref()
            .unwrap_or_else(|| panic!("no exit: {:?}", self.frames))
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Host {
    pub fn start() -> Host {
        Host::start_with(ServeConfig::default())
    }

    pub fn start_with(config: ServeConfig) -> Host {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = agent.try_clone().unwrap();
        let handle = std::thread::spawn(move || serve(reader, agent, &config));
        let mut h = Host {
            sock: host,
            dec: FrameDecoder::new(),
            hello: Hello {
                protocol_version: 0,
                agent_version: String::new(),
                capabilities: 0,
            },
            agent: Some(handle),
            auto_credit: true,
        };
        let f = h.recv();
        assert_eq!(f.id, CONTROL_ID);
        match f.message {
            Message::Hello(hello) => h.hello = hello,
            other => panic!("expected hello, got {other:?}"),
        }
        h
    }

    pub fn send(&mut self, id: u32, m: &Message) {
        self.send_raw(&encode(m, id));
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    pub fn recv(&mut self) -> Frame {
        self.try_recv().expect("agent closed the stream")
    }

    /// Next frame, or `None` at EOF.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(f) = self.dec.next_frame().expect("agent sent a bad frame") {
                return Some(f);
            }
            // EINTR can happen: while the reaper sits in sigtimedwait, SIGCHLD
            // is not ignored and interrupts socket reads that have a timeout.
            let n = match self.sock.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read from agent (timeout?)"),
            };
            if n == 0 {
                return None;
            }
            self.dec.push(&buf[..n]);
        }
    }

    /// The next frame if one comes within `wait`.
    pub fn try_recv_within(&mut self, wait: Duration) -> Option<Frame> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 65536];
        let frame = loop {
            if let Some(f) = self.dec.next_frame().expect("agent sent a bad frame") {
                break Some(f);
            }
            match self.sock.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        self.sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        frame
    }

    /// Reads frames until every id in `ids` has finished.
    pub fn collect(&mut self, ids: &[u32]) -> HashMap<u32, Reply> {
        let mut replies: HashMap<u32, Reply> = HashMap::new();
        let mut open: Vec<u32> = ids.to_vec();
        while !open.is_empty() {
            let f = self.recv();
            if let (true, Message::Stdout(d) | Message::Stderr(d)) = (self.auto_credit, &f.message)
            {
                let bytes = d.len() as u32;
                self.send(f.id, &Message::Credit { bytes });
            }
            let done = replies.entry(f.id).or_default().add(f.message);
            if done {
                open.retain(|&i| i != f.id);
            }
        }
        replies
    }

    pub fn request(&mut self, id: u32, m: &Message) -> Reply {
        self.send(id, m);
        self.collect(&[id]).remove(&id).unwrap()
    }

    /// Sends `m` and returns the `Error` that must be the next frame, on `id`.
    pub fn expect_error(&mut self, id: u32, m: &Message) -> ErrorInfo {
        self.send(id, m);
        let f = self.recv();
        assert_eq!(f.id, id);
        match f.message {
            Message::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub fn run(&mut self, id: u32, req: RunRequest) -> Reply {
        self.request(id, &Message::Run(req))
    }

    /// The next frame of request `id`, skipping (and returning the window of)
    /// frames of other requests.
    pub fn recv_for(&mut self, id: u32) -> Message {
        loop {
            let f = self.recv();
            if f.id == id {
                return f.message;
            }
            if let (true, Message::Stdout(d) | Message::Stderr(d)) = (self.auto_credit, &f.message)
            {
                let bytes = d.len() as u32;
                self.send(f.id, &Message::Credit { bytes });
            }
        }
    }

    /// The processes the agent lists.
    pub fn list(&mut self, id: u32) -> Vec<ProcessEntry> {
        match self.request(id, &Message::ListProcesses).frames.pop() {
            Some(Message::ProcessList(list)) => list,
            other => panic!("expected a process list, got {other:?}"),
        }
    }

    /// Reads frames of `id` until `want` appears in its stdout; returns the
    /// stdout so far. Credits every chunk.
    pub fn read_until(&mut self, id: u32, want: &str) -> String {
        let mut out = Vec::new();
        loop {
            match self.recv_for(id) {
                Message::Stdout(d) => {
                    self.send(
                        id,
                        &Message::Credit {
                            bytes: d.len() as u32,
                        },
                    );
                    out.extend(d);
                    if String::from_utf8_lossy(&out).contains(want) {
                        return String::from_utf8_lossy(&out).into_owned();
                    }
                }
                Message::Stderr(_) | Message::Started { .. } => {}
                other => panic!(
                    "waiting for {want:?} in {:?}, got {other:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
    }

    /// Closes the host side and returns how `serve` ended.
    pub fn close(mut self) -> Result<ServeOutcome, ServeError> {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.join()
    }

    /// Waits for `serve` to return without closing first.
    pub fn join(&mut self) -> Result<ServeOutcome, ServeError> {
        self.agent.take().unwrap().join().unwrap()
    }
}

pub fn shell(script: &str) -> RunRequest {
    RunRequest::shell(script)
}

/// Whether `pid` is gone or a zombie (dead, waiting for its reaper).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to 5 s for `pid` to die.
pub fn wait_dead(pid: i32) -> bool {
    for _ in 0..500 {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

//! QEMU's microvm machine as a benchmark peer: boots of the "minimal" template's kernel and
//! initramfs with the same virtio devices as a capsule (a virtio-console for the agent's
//! channel, virtio-rng), and a save and restore through migration to a file (QMP `stop`,
//! `migrate` to `exec:cat > FILE`; a second QEMU with `-incoming exec:cat FILE`, then QMP
//! `cont`). The guest's serial console is QEMU's stdout, read by a [`LineWatch`].
//!
//! "Ready" for QEMU is what it is for a capsule: the agent answers a command. A boot is
//! ready when the agent prints `capsule-agent: ready` (after its `Hello`); a restored guest
//! is ready when a `true` sent through the agent's channel (a Unix socket chardev, speaking
//! capsule's agent protocol) has answered with its exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsule_agent_protocol::{encode, FrameDecoder, Message, RunRequest};

use crate::console::{LineWatch, MARKER, READY};
use crate::process::{connect_unix, stop};

/// How long QMP and the agent may take to answer (a migration of a large guest under TCG
/// takes seconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new QEMU may take to open its sockets.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start QEMU's microvm on one kernel and initramfs.
pub struct Qemu {
    program: String,
    /// Words from `CAPSULE_QEMU` after the program (the loader's options, `-L`).
    prefix: Vec<String>,
    machine: String,
    kernel: PathBuf,
    initrd: PathBuf,
    /// Where sockets and migration files go (L1's `/tmp`: a tmpfs).
    dir: PathBuf,
    next: AtomicU32,
}

/// What the agent's virtio-console is connected to on the host.
enum AgentChannel<'a> {
    /// Nothing (`-chardev null`): boots that only wait for the ready line.
    Null,
    /// A listening Unix socket that the report connects to.
    Socket(&'a Path),
}

impl Qemu {
    /// The command from `CAPSULE_QEMU` (split on whitespace; default `qemu-system-x86_64`),
    /// the machine from `CAPSULE_QEMU_MACHINE` (default `microvm,acpi=on`); checks that
    /// `-version` runs and that `/dev/kvm` exists.
    pub fn from_env(kernel: &Path, initrd: &Path, dir: &Path) -> Result<Qemu, String> {
        let words: Vec<String> = std::env::var("CAPSULE_QEMU")
            .unwrap_or_else(|_| "qemu-system-x86_64".into())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let (program, prefix) = words
            .split_first()
            .ok_or("CAPSULE_QEMU is empty".to_string())?;
        let version = Command::new(program)
            .args(prefix)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if !version.status.success() {
            return Err(format!(
                "`{} -version` failed ({}): {}",
                words.join(" "),
                version.status,
                String::from_utf8_lossy(&version.stderr).trim()
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("no /dev/kvm".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Qemu {
            program: program.clone(),
            prefix: prefix.to_vec(),
            machine: std::env::var("CAPSULE_QEMU_MACHINE")
                .unwrap_or_else(|_| "microvm,acpi=on".into()),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            dir: dir.to_path_buf(),
            next: AtomicU32::new(0),
        })
    }

    /// The arguments of one VM.
    fn args(
        &self,
        memory_mb: u64,
        cmdline: &str,
        agent: AgentChannel<'_>,
        extra: &[String],
    ) -> Vec<String> {
        let mut args: Vec<String> = self.prefix.clone();
        let chardev = match agent {
            AgentChannel::Null => "null,id=agent".to_string(),
            AgentChannel::Socket(path) => {
                format!("socket,id=agent,path={},server=on,wait=off", path.display())
            }
        };
        for a in [
            "-M",
            &self.machine,
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            &memory_mb.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-kernel",
            &self.kernel.to_string_lossy(),
            "-initrd",
            &self.initrd.to_string_lossy(),
            "-append",
            cmdline,
            // The agent's channel: a virtio-console (hvc0), as in a capsule.
            "-device",
            "virtio-serial-device",
            "-chardev",
            &chardev,
            "-device",
            "virtconsole,chardev=agent",
            "-device",
            "virtio-rng-device",
        ] {
            args.push(a.to_string());
        }
        args.extend(extra.iter().cloned());
        args
    }

    /// The boot command, for the report's header.
    pub fn describe(&self, memory_mb: u64, cmdline: &str) -> String {
        let quoted: Vec<String> = self
            .args(memory_mb, cmdline, AgentChannel::Null, &[])
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect();
        format!("{} {}", self.program, quoted.join(" "))
    }

    /// Median milliseconds of `n` runs of `QEMU -version`: loading QEMU and its libraries.
    pub fn version_ms(&self, n: usize) -> f64 {
        let mut samples: Vec<f64> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let _ = Command::new(&self.program)
                    .args(&self.prefix)
                    .arg("-version")
                    .stdin(Stdio::null())
                    .output();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        samples.sort_by(|a, b| a.total_cmp(b));
        samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn spawn(&self, args: Vec<String>, sockets: Vec<PathBuf>) -> Result<QemuVm, String> {
        for socket in &sockets {
            let _ = std::fs::remove_file(socket);
        }
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program))?;
        let stdout = child.stdout.take().ok_or("QEMU has no stdout pipe")?;
        let stderr = child.stderr.take().ok_or("QEMU has no stderr pipe")?;
        Ok(QemuVm {
            child,
            console: LineWatch::spawn(stdout),
            stderr: LineWatch::spawn(stderr),
            started,
            sockets,
        })
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (
            self.dir.join(format!("qemu-{n}-qmp.sock")),
            self.dir.join(format!("qemu-{n}-agent.sock")),
        )
    }

    /// Boots a VM (the agent's channel connected to nothing) until the agent's ready line;
    /// returns the times since the spawn of the boot marker (if seen) and of the ready line.
    /// QEMU is stopped afterwards (SIGTERM).
    pub fn boot_to_ready(
        &self,
        memory_mb: u64,
        cmdline: &str,
        timeout: Duration,
    ) -> Result<(Option<Duration>, Duration), String> {
        let mut vm = self.spawn(
            self.args(memory_mb, cmdline, AgentChannel::Null, &[]),
            Vec::new(),
        )?;
        let ready = vm.console.wait_for(timeout, |_, l| l.contains(READY));
        let Some(ready) = ready else {
            return Err(vm.failure(&format!("no `{READY}` within {} s", timeout.as_secs())));
        };
        let marker = vm
            .console
            .wait_for(Duration::ZERO, |_, l| l.contains(MARKER))
            .map(|at| at.duration_since(vm.started));
        Ok((marker, ready.duration_since(vm.started)))
    }

    /// Starts a VM with QMP and the agent's channel on Unix sockets, for a save.
    pub fn start(&self, memory_mb: u64, cmdline: &str) -> Result<QemuVm, String> {
        let (qmp, agent) = self.paths();
        let extra = vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ];
        let args = self.args(memory_mb, cmdline, AgentChannel::Socket(&agent), &extra);
        self.spawn(args, vec![qmp, agent])
    }

    /// A second QEMU, with the same machine, restoring `file` (`-incoming exec:cat FILE`);
    /// see [`QemuVm::resume_incoming`].
    pub fn restore(&self, memory_mb: u64, cmdline: &str, file: &Path) -> Result<QemuVm, String> {
        let (qmp, agent) = self.paths();
        let extra = vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-incoming".to_string(),
            format!("exec:cat {}", file.display()),
        ];
        let args = self.args(memory_mb, cmdline, AgentChannel::Socket(&agent), &extra);
        self.spawn(args, vec![qmp, agent])
    }

    /// A path for a migration file in the working directory.
    pub fn migration_file(&self) -> PathBuf {
        self.dir.join(format!(
            "qemu-{}.mig",
            self.next.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// A running QEMU. Dropping it stops QEMU (SIGTERM, then SIGKILL after 10 s).
pub struct QemuVm {
    child: Child,
    console: LineWatch,
    stderr: LineWatch,
    started: Instant,
    /// The QMP socket and the agent's socket, when the VM has them.
    sockets: Vec<PathBuf>,
}

impl QemuVm {
    /// The guest's serial console.
    pub fn console(&self) -> &LineWatch {
        &self.console
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// An error message: `what`, with QEMU's state, stderr and console tail.
    pub fn failure(&mut self, what: &str) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("QEMU exited: {status}"),
            _ => "QEMU still running".to_string(),
        };
        format!(
            "{what} ({state}); stderr: {}; console tail:\n{}",
            self.stderr.tail(5).trim(),
            self.console.tail(15)
        )
    }

    fn socket(&self, index: usize) -> Result<PathBuf, String> {
        self.sockets
            .get(index)
            .cloned()
            .ok_or_else(|| "this QEMU has no QMP or agent socket".to_string())
    }

    /// A QMP connection (capabilities negotiated).
    pub fn qmp(&mut self) -> Result<Qmp, String> {
        let path = self.socket(0)?;
        let child = &mut self.child;
        let stream = connect_unix(&path, SOCKET_TIMEOUT, || {
            matches!(child.try_wait(), Ok(None))
        })
        .map_err(|e| self.failure(&format!("QMP: {e}")))?;
        Qmp::new(stream).map_err(|e| self.failure(&format!("QMP: {e}")))
    }

    /// Saves the VM to `file` as a snapshot: QMP `stop`, then `migrate` to `exec:cat > FILE`
    /// without a bandwidth limit, until `query-migrate` says completed. Returns the time.
    pub fn save(&mut self, file: &Path) -> Result<Duration, String> {
        let t = Instant::now();
        let mut qmp = self.qmp()?;
        let result = (|| {
            qmp.execute("stop", None)?;
            qmp.execute(
                "migrate-set-parameters",
                Some("{\"max-bandwidth\": 1099511627776}"),
            )?;
            qmp.execute(
                "migrate",
                Some(&format!(
                    "{{\"uri\": {}}}",
                    crate::firecracker::json_string(&format!("exec:cat > {}", file.display()))
                )),
            )?;
            let deadline = Instant::now() + ANSWER_TIMEOUT;
            loop {
                let reply = qmp.execute("query-migrate", None)?;
                match json_field(&reply, "status").as_deref() {
                    Some("completed") => return Ok(t.elapsed()),
                    Some("failed") | Some("cancelled") => {
                        return Err(format!("migration to {} failed: {reply}", file.display()))
                    }
                    _ if Instant::now() > deadline => {
                        return Err(format!(
                            "migration not done after {} s: {reply}",
                            ANSWER_TIMEOUT.as_secs()
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })();
        result.map_err(|e| self.failure(&e))
    }

    /// For a QEMU started with `-incoming`: waits (QMP `query-status`) until the incoming
    /// migration is loaded, then starts the guest with `cont` when it is paused (it is when
    /// the saved VM was stopped, as [`QemuVm::save`] does). Returns when `cont` answered.
    pub fn resume_incoming(&mut self) -> Result<Instant, String> {
        let mut qmp = self.qmp()?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let result = (|| loop {
            let reply = qmp.execute("query-status", None)?;
            match json_field(&reply, "status").as_deref() {
                Some("inmigrate") | Some("prelaunch") => {}
                Some("running") => return Ok(Instant::now()),
                Some("paused") | Some("postmigrate") => {
                    qmp.execute("cont", None)?;
                    return Ok(Instant::now());
                }
                _ => return Err(format!("unexpected state after the migration: {reply}")),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the incoming migration did not finish in {} s: {reply}",
                    ANSWER_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        })();
        result.map_err(|e| self.failure(&e))
    }

    /// Connects to the agent's channel (a restore connects before it resumes the guest, so
    /// that only the request itself is timed after that).
    pub fn agent(&mut self) -> Result<AgentCall, String> {
        let path = self.socket(1)?;
        let child = &mut self.child;
        let stream = connect_unix(&path, SOCKET_TIMEOUT, || {
            matches!(child.try_wait(), Ok(None))
        })
        .map_err(|e| self.failure(&format!("agent channel: {e}")))?;
        Ok(AgentCall { stream })
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if stop(&mut self.child, Duration::from_secs(10)).is_none() {
            eprintln!("linux-report: QEMU could not be reaped");
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// A connection to the agent of a QEMU guest, speaking capsule's agent protocol.
pub struct AgentCall {
    stream: UnixStream,
}

impl AgentCall {
    const ID: u32 = 1;

    /// Sends `true` and waits for its `Exit` (up to `timeout`); when it arrived. An exit code
    /// other than 0 or an `Error` is an error. (The data is not sent before the guest runs:
    /// input that reaches a paused guest's virtio-console may wait for the `hvc` driver's
    /// poll timer.)
    pub fn run_true(mut self, timeout: Duration) -> Result<Instant, String> {
        let frame = encode(&Message::Run(RunRequest::shell("true")), Self::ID);
        self.stream
            .write_all(&frame)
            .map_err(|e| format!("agent channel: sending Run: {e}"))?;
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| format!("agent channel: bad frame: {e}"))?
            {
                if frame.id != Self::ID {
                    continue;
                }
                match frame.message {
                    Message::Exit(exit) => {
                        return match exit.status {
                            capsule_agent_protocol::ExitStatus::Code(0) => Ok(Instant::now()),
                            other => Err(format!("`true` ended with {other:?} in the guest")),
                        }
                    }
                    Message::Error(e) if e.code.ends_request() => {
                        return Err(format!("the agent refused `true`: {}", e.message))
                    }
                    _ => {}
                }
            }
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|e| format!("agent channel: no answer: {e}"))?;
            if n == 0 {
                return Err("agent channel: QEMU closed it".into());
            }
            decoder.push(&buf[..n]);
        }
    }
}

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities.
    fn new(stream: UnixStream) -> Result<Qmp, String> {
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `command` (with `arguments`, a JSON object); its `return` line. Events are
    /// skipped; an `error` reply is an error.
    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<String, String> {
        let request = match arguments {
            Some(args) => format!("{{\"execute\": \"{command}\", \"arguments\": {args}}}\n"),
            None => format!("{{\"execute\": \"{command}\"}}\n"),
        };
        self.writer
            .write_all(request.as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let line = self.line()?;
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(format!("QMP {command}: {line}"));
            }
        }
    }
}

/// The string value of the first `"name": "value"` in a JSON text (enough for QMP's flat
/// status replies).
pub fn json_field(json: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\"");
    let at = json.find(&key)? + key.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields() {
        let reply = r#"{"return": {"status": "paused", "singlestep": false, "running": false}}"#;
        assert_eq!(json_field(reply, "status").as_deref(), Some("paused"));
        assert_eq!(
            json_field(
                r#"{"return": {"status":"completed","total-time": 5}}"#,
                "status"
            )
            .as_deref(),
            Some("completed")
        );
        assert_eq!(json_field(reply, "running"), None);
        assert_eq!(json_field("{}", "status"), None);
    }

    #[test]
    fn qmp_skips_events() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            theirs
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            theirs.write_all(b"{\"return\": {}}\r\n").unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"));
            theirs
                .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n{\"return\": {\"status\": \"paused\"}}\r\n")
                .unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            theirs
                .write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n")
                .unwrap();
        });
        let mut qmp = Qmp::new(ours).unwrap();
        let reply = qmp.execute("query-status", None).unwrap();
        assert_eq!(json_field(&reply, "status").as_deref(), Some("paused"));
        assert!(qmp
            .execute("cont", None)
            .unwrap_err()
            .contains("GenericError"));
        server.join().unwrap();
    }
}

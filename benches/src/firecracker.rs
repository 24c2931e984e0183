//! Firecracker as a benchmark peer: boots of the "minimal" template's kernel and initramfs
//! (`--no-api --config-file`), and snapshots through its API socket (`PATCH /vm` Paused,
//! `PUT /snapshot/create` Full, and in a new process `PUT /snapshot/load` with
//! `resume_vm`). The guest's serial console is Firecracker's stdout, read by a
//! [`LineWatch`]; Firecracker's own log goes to a file beside the socket, so that stdout
//! holds only the guest's console.
//!
//! Firecracker has no virtio-console, so the agent never gets its channel there: it is timed
//! to the lines of [`crate::console`] (the boot marker, the heartbeat).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::console::{LineWatch, MARKER};
use crate::process::{connect_unix, stop};

/// How long an API request may take (a full snapshot of a large guest under TCG takes
/// seconds).
const API_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new Firecracker process may take to open its API socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// How to run Firecracker on one kernel and initramfs.
pub struct Firecracker {
    program: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    /// Where sockets, configuration, log and snapshot files go (L1's `/tmp`: a tmpfs).
    dir: PathBuf,
    version: String,
    next: AtomicU32,
}

impl Firecracker {
    /// Checks that `program --version` runs and that `/dev/kvm` exists.
    pub fn new(program: &Path, kernel: &Path, initrd: &Path, dir: &Path) -> Result<Self, String> {
        if !program.is_file() {
            return Err(format!("{} does not exist", program.display()));
        }
        let out = Command::new(program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.lines().next().unwrap_or("").trim().to_string();
        if !out.status.success() || !version.starts_with("Firecracker") {
            return Err(format!(
                "`{} --version` failed ({}): {}{}",
                program.display(),
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("no /dev/kvm".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Firecracker {
            program: program.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            dir: dir.to_path_buf(),
            version,
            next: AtomicU32::new(0),
        })
    }

    /// `Firecracker vX.Y.Z`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The program's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The `--config-file` contents: the kernel, initramfs and `cmdline`, 1 vCPU, no SMT,
    /// `memory_mb` MiB, no drives.
    pub fn config_json(&self, memory_mb: u64, cmdline: &str) -> String {
        format!(
            "{{\"boot-source\": {{\"kernel_image_path\": {}, \"initrd_path\": {}, \
             \"boot_args\": {}}}, \"machine-config\": {{\"vcpu_count\": 1, \
             \"mem_size_mib\": {memory_mb}, \"smt\": false}}, \"drives\": []}}",
            json_string(&self.kernel.to_string_lossy()),
            json_string(&self.initrd.to_string_lossy()),
            json_string(cmdline)
        )
    }

    /// Spawns Firecracker with `args` after its log options; the guest console is its stdout.
    fn spawn(&self, name: &str, args: &[&str]) -> Result<Process, String> {
        let log = self.dir.join(format!("{name}.log"));
        std::fs::write(&log, b"").map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new(&self.program);
        command
            .arg("--id")
            .arg(name)
            .arg("--log-path")
            .arg(&log)
            .arg("--level")
            .arg("Info")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("Firecracker has no stdout pipe")?;
        let stderr = child
            .stderr
            .take()
            .ok_or("Firecracker has no stderr pipe")?;
        Ok(Process {
            child,
            console: LineWatch::spawn(stdout),
            stderr: LineWatch::spawn(stderr),
            log,
            started,
        })
    }

    fn name(&self, what: &str) -> String {
        format!("fc-{what}-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Boots a VM (`--no-api --config-file`) until the boot marker appears on its console;
    /// the time since the process was spawned, and the guest's clock in the marker (seconds
    /// since the guest kernel's clock started; `None` if the line has none). The process is
    /// killed afterwards.
    pub fn boot_to_marker(
        &self,
        memory_mb: u64,
        cmdline: &str,
        timeout: Duration,
    ) -> Result<(Duration, Option<f64>), String> {
        let name = self.name("boot");
        let config = self.dir.join(format!("{name}.json"));
        std::fs::write(&config, self.config_json(memory_mb, cmdline))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let config_arg = config.to_string_lossy().into_owned();
        let mut process = self.spawn(&name, &["--no-api", "--config-file", &config_arg])?;
        let mut guest_clock = None;
        let seen = process.console.wait_for(timeout, |_, line| {
            let found = line.contains(MARKER);
            if found {
                guest_clock = crate::console::marker_clock(line);
            }
            found
        });
        let result = match seen {
            Some(at) => Ok((at.duration_since(process.started), guest_clock)),
            None => Err(process.failure(&format!("no `{MARKER}` within {} s", timeout.as_secs()))),
        };
        process.end();
        let _ = std::fs::remove_file(&config);
        result
    }

    /// Boots a VM with the API socket open (`--api-sock` and `--config-file`), for a snapshot.
    pub fn start(&self, memory_mb: u64, cmdline: &str) -> Result<FirecrackerVm, String> {
        let name = self.name("vm");
        let config = self.dir.join(format!("{name}.json"));
        std::fs::write(&config, self.config_json(memory_mb, cmdline))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let socket = self.dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let process = self.spawn(
            &name,
            &[
                "--api-sock",
                &socket.to_string_lossy(),
                "--config-file",
                &config.to_string_lossy(),
            ],
        )?;
        Ok(FirecrackerVm {
            process,
            socket,
            files: vec![config],
        })
    }

    /// A new Firecracker process (`--api-sock`) that loads `snapshot` with `resume_vm`.
    /// Returns the VM, whose [`FirecrackerVm::started`] is when the process was spawned, and
    /// the time from the spawn to the load's reply.
    pub fn restore(&self, snapshot: &Snapshot) -> Result<(FirecrackerVm, Duration), String> {
        let name = self.name("restore");
        let socket = self.dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let process = self.spawn(&name, &["--api-sock", &socket.to_string_lossy()])?;
        let mut vm = FirecrackerVm {
            process,
            socket,
            files: Vec::new(),
        };
        let body = format!(
            "{{\"snapshot_path\": {}, \"mem_backend\": {{\"backend_type\": \"File\", \
             \"backend_path\": {}}}, \"resume_vm\": true}}",
            json_string(&snapshot.state.to_string_lossy()),
            json_string(&snapshot.memory.to_string_lossy())
        );
        vm.api("PUT", "/snapshot/load", &body)?;
        let loaded = vm.process.started.elapsed();
        Ok((vm, loaded))
    }

    /// Paths for a snapshot's two files in the working directory (removed on drop).
    pub fn snapshot_paths(&self) -> Snapshot {
        let name = self.name("snap");
        Snapshot {
            state: self.dir.join(format!("{name}.state")),
            memory: self.dir.join(format!("{name}.mem")),
        }
    }
}

/// A Firecracker snapshot's files; removed when dropped.
pub struct Snapshot {
    /// The VM state file (`snapshot_path`).
    pub state: PathBuf,
    /// The guest memory file (`mem_file_path`, `backend_path`).
    pub memory: PathBuf,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.memory);
    }
}

struct Process {
    child: Child,
    console: LineWatch,
    stderr: LineWatch,
    log: PathBuf,
    started: Instant,
}

impl Process {
    /// `what`, with the process's state, stderr, log and console tails.
    fn failure(&mut self, what: &str) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("Firecracker exited: {status}"),
            _ => "Firecracker still running".to_string(),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let log: Vec<&str> = log.lines().rev().take(8).collect();
        let log: Vec<&str> = log.into_iter().rev().collect();
        format!(
            "{what} ({state}); stderr: {}; log: {}; console tail:\n{}",
            self.stderr.tail(5).trim(),
            log.join(" | "),
            self.console.tail(15)
        )
    }

    fn end(&mut self) {
        stop(&mut self.child, Duration::ZERO);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A running Firecracker process with its API socket.
pub struct FirecrackerVm {
    process: Process,
    socket: PathBuf,
    files: Vec<PathBuf>,
}

impl FirecrackerVm {
    /// The guest's serial console.
    pub fn console(&self) -> &LineWatch {
        &self.process.console
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.process.started
    }

    /// An error message: `what`, with the process's state, stderr, log and console tails.
    pub fn failure(&mut self, what: &str) -> String {
        self.process.failure(what)
    }

    /// One API request; its time. A status other than 2xx is an error with Firecracker's
    /// `fault_message`.
    pub fn api(&mut self, method: &str, path: &str, body: &str) -> Result<Duration, String> {
        let t = Instant::now();
        let child = &mut self.process.child;
        let mut stream = connect_unix(&self.socket, SOCKET_TIMEOUT, || {
            matches!(child.try_wait(), Ok(None))
        })
        .map_err(|e| self.process.failure(&e))?;
        let (status, reply) = http_request(&mut stream, method, path, body)
            .map_err(|e| self.process.failure(&format!("{method} {path}: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(self
                .process
                .failure(&format!("{method} {path}: HTTP {status}: {}", reply.trim())));
        }
        Ok(t.elapsed())
    }

    /// `PATCH /vm {"state": "Paused"}`; its time.
    pub fn pause(&mut self) -> Result<Duration, String> {
        self.api("PATCH", "/vm", "{\"state\": \"Paused\"}")
    }

    /// `PUT /snapshot/create` of a full snapshot into `snapshot`'s files; its time.
    pub fn snapshot(&mut self, snapshot: &Snapshot) -> Result<Duration, String> {
        let body = format!(
            "{{\"snapshot_type\": \"Full\", \"snapshot_path\": {}, \"mem_file_path\": {}}}",
            json_string(&snapshot.state.to_string_lossy()),
            json_string(&snapshot.memory.to_string_lossy())
        );
        self.api("PUT", "/snapshot/create", &body)
    }
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        self.process.end();
        let _ = std::fs::remove_file(&self.socket);
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One HTTP/1.1 request on `stream` (Firecracker's API: JSON bodies); the status code and
/// the reply's body.
pub fn http_request(
    stream: &mut UnixStream,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    stream
        .set_read_timeout(Some(API_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        if let Some(at) = find(&reply, b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("reading the reply: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the connection closed before a complete reply ({:?})",
                String::from_utf8_lossy(&reply)
            ));
        }
        reply.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&reply[..header_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP reply: {head:?}"))?;
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while reply.len() < header_end + length {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("reading the reply body: {e}"))?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let end = reply.len().min(header_end + length);
    Ok((
        status,
        String::from_utf8_lossy(&reply[header_end..end]).into_owned(),
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a b"), "\"a b\"");
        assert_eq!(json_string("q\"\\\n"), "\"q\\\"\\\\\\n\"");
        assert_eq!(json_string("\u{1}"), "\"\\u0001\"");
    }

    #[test]
    fn http_replies_are_parsed() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&request, b"{}").is_none() {
                let n = theirs.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            theirs
                .write_all(
                    b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Length: 19\r\n\r\n",
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(b"{\"fault_message\":1}").unwrap();
            String::from_utf8(request).unwrap()
        });
        let (status, body) = http_request(&mut ours, "PUT", "/x", "{}").unwrap();
        assert_eq!(status, 400);
        assert_eq!(body, "{\"fault_message\":1}");
        let request = server.join().unwrap();
        assert!(request.starts_with("PUT /x HTTP/1.1\r\n"));
        assert!(request.contains("Content-Length: 2\r\n"));

        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            let _ = theirs.read(&mut buf);
            theirs
                .write_all(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n")
                .unwrap();
            // Keep the connection open, as Firecracker does (keep-alive).
            std::thread::sleep(Duration::from_millis(200));
        });
        assert_eq!(
            http_request(&mut ours, "PATCH", "/vm", "{}").unwrap(),
            (204, String::new())
        );
    }

    #[test]
    fn config_names_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        // /bin/true stands in for the program: `new` only runs `--version`, which would
        // fail here, so build the value directly.
        let fc = Firecracker {
            program: PathBuf::from("/bin/true"),
            kernel: PathBuf::from("/k/vmlinux"),
            initrd: PathBuf::from("/k/initrd.img"),
            dir: dir.path().to_path_buf(),
            version: String::new(),
            next: AtomicU32::new(0),
        };
        let json = fc.config_json(512, "console=ttyS0 capsule.heartbeat=5");
        assert!(json.contains("\"kernel_image_path\": \"/k/vmlinux\""));
        assert!(json.contains("\"mem_size_mib\": 512"));
        assert!(json.contains("\"boot_args\": \"console=ttyS0 capsule.heartbeat=5\""));
        assert_ne!(fc.name("a"), fc.name("a"));
    }
}

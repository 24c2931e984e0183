//! Talking to a Linux capsule's processes (issue #9): spawned commands and their handles
//! (stdin, signals, kills of process trees, output as it comes, flow control), argv exec,
//! users, callbacks, the process list, reconnecting across pause and resume, and terminals.
//!
//! They need hardware virtualization and the "minimal" image: on this project's PVM hosts
//! they run in the nested harness (`cargo xtask nested-test -- linux_`) and print SKIPPED
//! elsewhere. Timeouts are generous: nested TCG is slow and shared.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule::{
    Capsule, Command, CommandHandle, Error, Output, PtyHandle, PtySize, RunOptions, Signal,
    TimeoutKind,
};
use common::linux::{linux_engine, minimal};

/// How long one step may take in the nested harness.
const STEP: Duration = Duration::from_secs(120);
/// How long 64 MiB of output may take to arrive in the nested harness (~100 s there).
const STREAM_PATIENCE: Duration = Duration::from_secs(200);

/// Runs `command`, which must exit 0; its stdout.
fn sh(c: &Capsule, command: &str) -> String {
    let out = c
        .commands()
        .run_with(command, RunOptions::new().timeout(STEP))
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert_eq!(out.exit_code, Some(0), "{command}: {out:?}");
    out.stdout_str().into_owned()
}

/// Whether process `pid` of the guest is gone (or a zombie).
fn gone(c: &Capsule, pid: u32) -> bool {
    let state = sh(
        c,
        &format!("cat /proc/{pid}/stat 2>/dev/null | sed 's/.*) //' | cut -c1"),
    );
    matches!(state.trim(), "" | "Z")
}

fn wait_gone(c: &Capsule, pid: u32) -> bool {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if gone(c, pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Takes output chunks until their text contains `want`; the text.
fn read_until(handle: &CommandHandle, want: &str) -> String {
    let mut text = String::new();
    let mut stream = handle.output();
    while !text.contains(want) {
        match stream.recv_timeout(STEP) {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(chunk.bytes())),
            other => panic!("waiting for {want:?} in {text:?}: {other:?}"),
        }
    }
    text
}

fn pty_read_until(pty: &PtyHandle, want: &str) -> String {
    read_until(pty.as_command(), want)
}

#[test]
fn linux_spawn_feeds_stdin_to_cat_and_reports_the_exit() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let cat = c
        .commands()
        .spawn(Command::exec("cat", [] as [&str; 0]), RunOptions::new())
        .unwrap();
    assert!(cat.pid() > 1);
    cat.write_stdin(b"hello ").unwrap();
    cat.write_stdin(b"capsule\n").unwrap();
    assert_eq!(read_until(&cat, "capsule"), "hello capsule\n");
    cat.write_stdin(b"tail").unwrap();
    cat.close_stdin().unwrap();
    let out = cat.wait_timeout(STEP).unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(0), None));
    assert_eq!(out.stdout, b"tail");
    // Stdin given up front, then closed.
    let out = c
        .commands()
        .run_with("tr a-z A-Z", RunOptions::new().stdin("loud").timeout(STEP))
        .unwrap();
    assert_eq!(out.stdout, b"LOUD");
    c.destroy().unwrap();
}

#[test]
fn linux_kill_ends_the_whole_process_tree() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let tree = c
        .commands()
        .spawn(
            "sleep 1000 & echo $! > /tmp/pids; (sleep 1000 & echo $! >> /tmp/pids; wait) & \
             echo $! >> /tmp/pids; echo up; wait",
            RunOptions::new(),
        )
        .unwrap();
    read_until(&tree, "up");
    let pids: Vec<u32> = sh(&c, "cat /tmp/pids")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    tree.kill().unwrap();
    let out = tree.wait_timeout(STEP).unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(Signal::KILL)));
    for pid in pids.iter().copied().chain([tree.pid()]) {
        assert!(wait_gone(&c, pid), "{pid} survived in /proc");
    }
    assert!(c.commands().list().unwrap().is_empty());
    c.destroy().unwrap();
}

/// POSIX `cksum`'s CRC (busybox's `cksum` prints it): CRC-32 polynomial 0x04C11DB7, MSB
/// first, over the data and then its length's bytes, complemented.
struct Cksum {
    crc: u32,
    len: u64,
    table: [u32; 256],
}

impl Cksum {
    fn new() -> Cksum {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut c = (i as u32) << 24;
            for _ in 0..8 {
                c = if c & 0x8000_0000 != 0 {
                    (c << 1) ^ 0x04C1_1DB7
                } else {
                    c << 1
                };
            }
            *slot = c;
        }
        Cksum {
            crc: 0,
            len: 0,
            table,
        }
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.crc = (self.crc << 8) ^ self.table[((self.crc >> 24) as u8 ^ b) as usize];
        }
        self.len += data.len() as u64;
    }

    fn finish(mut self) -> u32 {
        let mut n = self.len;
        while n != 0 {
            let b = n as u8;
            self.crc = (self.crc << 8) ^ self.table[((self.crc >> 24) as u8 ^ b) as usize];
            n >>= 8;
        }
        !self.crc
    }
}

/// The test process's resident memory (guest memory included: it is mapped here).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn linux_streams_a_hundred_mib_of_binary_output_byte_exact() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal().memory_mb(512)).unwrap();
    let size: u64 = 100 << 20;
    // Random bytes made here and put in the guest through the files API, so the stream is
    // checked against what the host knows (busybox has no `cksum`).
    let mut blob = vec![0u8; size as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want_crc = {
        let mut sum = Cksum::new();
        sum.update(&blob);
        sum.finish()
    };
    c.files().write("/tmp/blob", &blob).unwrap();
    drop(blob);
    let rss_before = rss_kib();
    let started = Instant::now();
    let cat = c
        .commands()
        .spawn("cat /tmp/blob", RunOptions::new())
        .unwrap();
    let mut sum = Cksum::new();
    let mut rss_peak = rss_before;
    for (i, chunk) in cat.output().enumerate() {
        let Output::Stdout(bytes) = chunk else {
            panic!("stderr: {chunk:?}")
        };
        sum.update(&bytes);
        if i % 256 == 0 {
            rss_peak = rss_peak.max(rss_kib());
        }
    }
    let took = started.elapsed();
    assert_eq!(sum.len, size);
    assert_eq!(sum.finish(), want_crc, "the bytes differ");
    assert_eq!(cat.wait_timeout(STEP).unwrap().exit_code, Some(0));
    let mb = size as f64 / (1 << 20) as f64;
    // The handle holds one window at most (checked by the engine's unit tests); the RSS of
    // this process also counts the guests of the tests running beside this one, so it is
    // only reported.
    eprintln!(
        "streamed {mb} MiB in {took:?} ({:.1} MiB/s); RSS grew by {} KiB meanwhile",
        mb / took.as_secs_f64(),
        rss_peak.saturating_sub(rss_before)
    );
    c.destroy().unwrap();
}

/// Every thread of this process with its state and the CPU ticks it used over `span`.
fn thread_cpu_over(span: Duration) -> Vec<(String, char, u64)> {
    // (tid, name, state, utime + stime)
    let sample = || -> Vec<(String, String, char, u64)> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1.to_string();
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let state = fields.first()?.chars().next()?;
                // utime and stime: fields 14 and 15 of stat, 11 and 12 after the name.
                let ticks =
                    fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
                Some((
                    t.file_name().to_string_lossy().into_owned(),
                    name,
                    state,
                    ticks,
                ))
            })
            .collect()
    };
    let before = sample();
    std::thread::sleep(span);
    sample()
        .into_iter()
        .map(|(tid, name, state, ticks)| {
            let was = before.iter().find(|b| b.0 == tid).map_or(ticks, |b| b.3);
            (name, state, ticks.saturating_sub(was))
        })
        .collect()
}

/// A consumer that stops reading: the guest process blocks on its next write (it neither
/// exits nor writes on), and once reading resumes everything arrives.
#[test]
fn linux_a_stalled_consumer_blocks_the_guest_process() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    // 16 times the agent's send window (1 MiB), which with the pipe (64 KiB) is all a
    // process may write ahead of its consumer.
    let total: u64 = 16 << 20;
    let writer = c
        .commands()
        .spawn(format!("exec head -c {total} /dev/zero"), RunOptions::new())
        .unwrap();
    let pid = writer.pid();
    let written = || -> u64 {
        sh(&c, &format!("grep wchar /proc/{pid}/io | cut -d' ' -f2"))
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let mut last = u64::MAX;
    let deadline = Instant::now() + STEP;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = written();
        if now == last {
            break;
        }
        assert!(Instant::now() < deadline, "it never stopped writing");
        last = now;
    }
    assert!(last < total / 4, "{last} bytes written with nobody reading");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(written(), last, "it went on writing");
    let state = sh(&c, &format!("sed 's/.*) //' /proc/{pid}/stat | cut -c1"));
    assert_eq!(state.trim(), "S", "blocked in its write");
    // Read on another thread, so that a stream that stops short of its end fails the test
    // (with how far it got) instead of hanging it: under TCG this stream has stalled
    // (twice) and ended early (once); 64 MiB took ~100 s there.
    let got = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let reader = {
        let (writer, got) = (writer.clone(), got.clone());
        std::thread::spawn(move || {
            for chunk in writer.output() {
                got.fetch_add(chunk.bytes().len() as u64, Ordering::Relaxed);
            }
            let _ = done_tx.send(());
        })
    };
    // Progress every 10 s, printed if the stream stalls: a crawl and a stop differ (under
    // TCG, with the host busy, this stream has crawled at 30-300 KB/s; alone ~650 KB/s).
    // It fails as stalled after 60 s without a byte, or past STREAM_PATIENCE in all.
    let mut progress = Vec::new();
    let started = Instant::now();
    let finished = loop {
        match done_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => break true,
            Err(_) => {
                progress.push(got.load(Ordering::Relaxed) >> 10);
                let still = progress.len() >= 6
                    && progress[progress.len() - 6] == progress[progress.len() - 1];
                if still || started.elapsed() >= STREAM_PATIENCE {
                    break false;
                }
            }
        }
    };
    if !finished {
        let stalled_at = got.load(Ordering::Relaxed);
        // What the guest says while the stream stands still (a command still answers?).
        let guest = c
            .commands()
            .run_with(
                format!(
                    "grep -i virtio /proc/interrupts; grep -E 'State|VmRSS' /proc/{pid}/status; \
                     grep -h -E '^(Name|State)' /proc/1/task/*/status | paste - -; \
                     cat /proc/{pid}/io | head -2"
                ),
                RunOptions::new().timeout(Duration::from_secs(60)),
            )
            .map(|o| o.stdout_str().into_owned());
        // Which of this process's threads (vCPUs, device thread, agent link) still use CPU:
        // a vCPU thread running all the time is a guest spinning, one asleep a guest halted.
        let threads = thread_cpu_over(Duration::from_secs(2));
        let _ = writer.kill();
        panic!(
            "the stream stalled: {stalled_at} of {total} bytes after {STREAM_PATIENCE:?}; \
             KiB received every 10 s: {progress:?}; the guest then: {guest:?} (capsule {:?}); \
             this process's threads (name, state, CPU ticks used in 2 s): {threads:?}",
            c.info()
        );
    }
    reader.join().unwrap();
    let got = got.load(Ordering::Relaxed);
    // The stream ends when the command does: say how it ended if bytes are missing.
    let ended = writer.wait_timeout(STEP);
    assert_eq!(
        got,
        total,
        "the stream ended early: {ended:?}; {:?}",
        c.info()
    );
    assert_eq!(ended.unwrap().exit_code, Some(0));
    c.destroy().unwrap();
}

#[test]
fn linux_exec_env_clear_env_signals_callbacks_and_limits() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let run = |command: Command, options: RunOptions| {
        c.commands()
            .run_with(command, options.timeout(STEP))
            .unwrap()
    };
    // argv exec: no shell, no expansion.
    let out = run(
        Command::exec("printf", ["%s|%s", "a b", "$HOME"]),
        RunOptions::new(),
    );
    assert_eq!(out.stdout, b"a b|$HOME");
    // An empty environment but for what is set (and the engine's own).
    let out = run(
        "env | sort".into(),
        RunOptions::new().clear_env().env("ONLY", "me"),
    );
    let env = out.stdout_str();
    let names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert!(
        names.contains(&"ONLY") && names.contains(&"CAPSULE_ID"),
        "{env}"
    );
    assert!(
        !names.contains(&"HOME") && !names.contains(&"TERM"),
        "{env}"
    );
    // A signal is reported as one, an exit code as one.
    let out = run("kill -TERM $$".into(), RunOptions::new());
    assert_eq!((out.exit_code, out.signal), (None, Some(Signal::TERM)));
    let out = run("exit 137".into(), RunOptions::new());
    assert_eq!((out.exit_code, out.signal), (Some(137), None));
    // Callbacks see the output as it comes; run keeps it too.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let out = run(
        "echo one; sleep 0.2; echo two".into(),
        RunOptions::new().on_stdout(move |b| s.lock().unwrap().push(b.to_vec())),
    );
    assert_eq!(out.stdout, b"one\ntwo\n");
    assert_eq!(seen.lock().unwrap().concat(), b"one\ntwo\n");
    assert!(seen.lock().unwrap().len() >= 2, "in two chunks at least");
    // Beyond the agent's 2 MiB buffer the output streams: all of it, exactly.
    let out = run(
        "head -c 5000000 /dev/zero | tr '\\0' z".into(),
        RunOptions::new().output_limit(8 << 20),
    );
    assert_eq!(out.stdout.len(), 5_000_000);
    assert!(out.stdout.iter().all(|b| *b == b'z') && !out.stdout_truncated);
    // And a small limit cuts it.
    let out = run("seq 1 10000".into(), RunOptions::new().output_limit(10));
    assert_eq!(
        (out.stdout.as_slice(), out.stdout_truncated),
        (&b"1\n2\n3\n4\n5\n"[..], true)
    );
    // Binary output is bytes, not lossy text.
    let out = run("printf '\\377\\000\\376'".into(), RunOptions::new());
    assert_eq!(out.stdout, [0xff, 0x00, 0xfe]);
    c.destroy().unwrap();
}

#[test]
fn linux_commands_run_as_another_user() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    sh(
        &c,
        "echo 'tester:x:1000:1000::/home/tester:/bin/sh' >> /etc/passwd; \
         echo 'tester:x:1000:' >> /etc/group; echo 'extra:x:2000:tester' >> /etc/group",
    );
    let out = c
        .commands()
        .run_with(
            "id -u; id -G; echo $HOME $USER",
            RunOptions::new().user("tester").timeout(STEP),
        )
        .unwrap();
    assert_eq!(out.stdout_str(), "1000\n1000 2000\n/home/tester tester\n");
    // Root is untouched, and an unknown user is a typed error.
    assert_eq!(sh(&c, "id -u"), "0\n");
    match c
        .commands()
        .run_with("true", RunOptions::new().user("nobody-here"))
    {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("nobody-here"), "{why}"),
        other => panic!("{other:?}"),
    }
    // On a terminal too, which is the user's.
    let pty = c
        .pty()
        .create_with(
            "id -u; stat -c %u $(tty); sleep 100",
            PtySize::default(),
            RunOptions::new().user("tester"),
        )
        .unwrap();
    pty_read_until(&pty, "1000\r\n1000");
    pty.kill().unwrap();
    c.destroy().unwrap();
}

#[test]
fn linux_list_connect_and_kill_processes() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let first = c
        .commands()
        .spawn(
            "echo ready; while read l; do echo \"got $l\"; done",
            RunOptions::new(),
        )
        .unwrap();
    read_until(&first, "ready");
    let list = c.commands().list().unwrap();
    let me = list.iter().find(|p| p.pid == first.pid()).expect("listed");
    assert!(me.command.starts_with("echo ready"), "{me:?}");
    let age = std::time::SystemTime::now()
        .duration_since(me.started_at)
        .unwrap_or_default();
    assert!(age < STEP, "started {age:?} ago by the guest's clock");

    // A new handle takes over; the first is detached.
    let second = c.commands().connect(first.pid()).unwrap();
    assert!(matches!(
        first.wait_timeout(STEP),
        Err(Error::ProcessDetached { .. })
    ));
    second.write_stdin(b"more\n").unwrap();
    read_until(&second, "got more");
    c.commands().kill(second.pid()).unwrap();
    assert_eq!(
        second.wait_timeout(STEP).unwrap().signal,
        Some(Signal::KILL)
    );

    // A dropped handle leaves the process running; kill(pid) ends it.
    let sleeper = c.commands().spawn("sleep 1000", RunOptions::new()).unwrap();
    let pid = sleeper.pid();
    drop(sleeper);
    assert!(c.commands().list().unwrap().iter().any(|p| p.pid == pid));
    c.commands().kill(pid).unwrap();
    assert!(wait_gone(&c, pid));
    let deadline = Instant::now() + STEP;
    while c.commands().list().unwrap().iter().any(|p| p.pid == pid) {
        assert!(Instant::now() < deadline, "still listed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(
        c.commands().connect(pid),
        Err(Error::ProcessNotFound { .. })
    ));
    assert!(matches!(
        c.commands().kill(pid),
        Err(Error::ProcessNotFound { .. })
    ));
    c.destroy().unwrap();
}

/// A spawned process keeps running across pause and resume; the old handle says to
/// reconnect, `list` shows the process and `connect` gets the rest of its output and its
/// exit code.
#[test]
fn linux_a_spawned_process_runs_on_across_pause_and_resume() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let p = c
        .commands()
        .spawn(
            "echo started; read x; echo \"got $x\"; sleep 0.5; echo done; exit 5",
            RunOptions::new(),
        )
        .unwrap();
    let pid = p.pid();
    read_until(&p, "started");
    c.pause().unwrap();
    match p.wait_timeout(STEP) {
        Err(e @ Error::ProcessDetached { .. }) => {
            assert!(e.to_string().contains(&format!("connect({pid})")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        p.write_stdin(b"x\n"),
        Err(Error::ProcessDetached { .. })
    ));
    c.resume().unwrap();
    assert!(matches!(
        p.wait_timeout(STEP),
        Err(Error::ProcessDetached { .. })
    ));
    let listed = c.commands().list().unwrap();
    assert!(listed.iter().any(|l| l.pid == pid), "{listed:?}");
    let again = c.commands().connect(pid).unwrap();
    again.write_stdin(b"hello\n").unwrap();
    let out = again.wait_timeout(STEP).unwrap();
    assert_eq!(out.stdout_str(), "got hello\ndone\n");
    assert_eq!(out.exit_code, Some(5));
    assert!(c.commands().list().unwrap().is_empty());
    c.destroy().unwrap();
}

/// A process that ends after a pause, while nobody is connected: its exit (and its
/// output) wait in the guest for a `connect`.
#[test]
fn linux_an_exit_while_detached_waits_for_connect() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let p = c
        .commands()
        .spawn("sleep 5; echo late; exit 6", RunOptions::new())
        .unwrap();
    let pid = p.pid();
    c.pause().unwrap();
    c.resume().unwrap();
    // The guest's clock ran on only after the resume: wait for the end there.
    let deadline = Instant::now() + STEP;
    while !gone(&c, pid) {
        assert!(Instant::now() < deadline, "it never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ended, but its exit is kept: listed, and connect gets it.
    assert!(c.commands().list().unwrap().iter().any(|l| l.pid == pid));
    let out = c
        .commands()
        .connect(pid)
        .unwrap()
        .wait_timeout(STEP)
        .unwrap();
    assert_eq!(
        (out.stdout_str().as_ref(), out.exit_code),
        ("late\n", Some(6))
    );
    assert!(c.commands().list().unwrap().is_empty());
    c.destroy().unwrap();
}

/// Processes that end all around pauses and resumes (before, while the snapshot is written,
/// in the instant the restored guest runs before the engine's sync reaches its agent): each
/// exit reaches either the handle from before the pause or, that handle detached, a
/// `connect` after the resume. None is lost.
#[test]
fn linux_every_exit_around_a_pause_reaches_its_handle_or_a_connect() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let (mut before, mut after) = (0, 0);
    for round in 0..5 {
        let handles: Vec<(i32, CommandHandle)> = (0..20)
            .map(|i| {
                let code = round * 20 + i;
                let script = format!("sleep 0.{:02}; echo p{code}; exit {code}", i * 3);
                (code, c.commands().spawn(script, RunOptions::new()).unwrap())
            })
            .collect();
        c.pause().unwrap();
        c.resume().unwrap();
        for (code, handle) in handles {
            let out = match handle.wait_timeout(STEP) {
                Ok(out) => {
                    before += 1;
                    out
                }
                Err(Error::ProcessDetached { .. }) => {
                    after += 1;
                    let again = c.commands().connect(handle.pid()).unwrap_or_else(|e| {
                        panic!("process {code} ({}) is lost: {e}", handle.pid())
                    });
                    again.wait_timeout(STEP).unwrap()
                }
                Err(e) => panic!("process {code}: {e}"),
            };
            assert_eq!(out.exit_code, Some(code), "{out:?}");
            // Output sent to the old handle in the instant before the pause went with it.
            let stdout = out.stdout_str();
            assert!(
                stdout == format!("p{code}\n") || stdout.is_empty(),
                "{code}: {stdout:?}"
            );
        }
    }
    println!("{before} exits reached their handle, {after} a connect after the resume");
    assert!(c.commands().list().unwrap().is_empty());
    c.destroy().unwrap();
}

#[test]
fn linux_a_terminal_shell_answers_reports_its_size_and_resizes() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let pty = c
        .pty()
        .create(PtySize { rows: 24, cols: 80 }, RunOptions::new())
        .unwrap();
    pty.write(b"echo typed-$((40+2))\n").unwrap();
    pty_read_until(&pty, "typed-42");
    pty.write(b"stty size\n").unwrap();
    pty_read_until(&pty, "24 80");
    pty.resize(PtySize {
        rows: 50,
        cols: 132,
    })
    .unwrap();
    pty.write(b"stty size; echo $TERM\n").unwrap();
    let text = pty_read_until(&pty, "xterm-256color");
    assert!(text.contains("50 132"), "{text:?}");
    // Ctrl-C interrupts the foreground command, not the shell.
    pty.write(b"sleep 1000\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    pty.write(b"\x03echo still-$((1+1))\n").unwrap();
    pty_read_until(&pty, "still-2");
    // Across a pause: the session runs on and connects again.
    let pid = pty.pid();
    c.pause().unwrap();
    c.resume().unwrap();
    assert!(matches!(
        pty.write(b"x"),
        Err(Error::ProcessDetached { .. })
    ));
    let pty = c.pty().connect(pid).unwrap();
    pty.write(b"stty size\n").unwrap();
    pty_read_until(&pty, "50 132");
    pty.resize(PtySize { rows: 10, cols: 20 }).unwrap();
    pty.write(b"stty size; exit 3\n").unwrap();
    let out = pty.wait_timeout(STEP).unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert!(out.stdout_str().contains("10 20"), "{:?}", out.stdout_str());
    c.destroy().unwrap();
}

#[test]
fn linux_timeouts_of_spawned_commands_and_waits() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    // No timeout by default for a spawned command.
    let p = c.commands().spawn("sleep 1000", RunOptions::new()).unwrap();
    match p.wait_timeout(Duration::from_millis(300)) {
        Err(Error::Timeout {
            kind: TimeoutKind::Wait,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    p.kill().unwrap();
    // Its own timeout kills it.
    let p = c
        .commands()
        .spawn(
            "sleep 1000",
            RunOptions::new().timeout(Duration::from_secs(1)),
        )
        .unwrap();
    match p.wait_timeout(STEP) {
        Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after,
        }) => assert_eq!(after, Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    assert!(wait_gone(&c, p.pid()));
    c.destroy().unwrap();
}

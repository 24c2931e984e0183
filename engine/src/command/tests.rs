//! Spawned commands against the real agent (in this process, over a socket pair): stdin,
//! kills of process trees, streams and their flow control, terminals, users, the process
//! list, reconnecting after the link is lost.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use capsule_agent_protocol::STREAM_WINDOW;

use super::agent::{self, Start};
use super::process::{Deadline, Process, CREDIT_BATCH};
use crate::capsule_core::CapsuleCore;
use crate::config::RunOptions;
use crate::error::{Error, TimeoutKind};
use crate::guest::agent_link::{real_agent, real_agent_with, AgentLink};
use crate::guest::linux::RunMode;
use crate::model::record::CapsuleRecord;
use crate::model::{Command, GuestKind, Output, PtySize, Signal, Status};

fn core() -> Arc<CapsuleCore> {
    let record = CapsuleRecord {
        id: "cl-test".parse().unwrap(),
        template: "minimal".into(),
        kind: GuestKind::Linux,
        vcpus: 1,
        memory_mb: 256,
        timeout: Duration::ZERO,
        created_at: SystemTime::now(),
    };
    CapsuleCore::new(record, Status::Running)
}

/// Spawns `command` as `Commands::spawn` does (a stdin pipe, streamed, no timeout).
fn spawn(link: &Arc<AgentLink>, command: impl Into<Command>, options: RunOptions) -> Arc<Process> {
    spawn_on(&core(), link, command, options, None)
}

fn spawn_on(
    capsule: &Arc<CapsuleCore>,
    link: &Arc<AgentLink>,
    command: impl Into<Command>,
    options: RunOptions,
    pty: Option<PtySize>,
) -> Arc<Process> {
    let mode = RunMode {
        timeout: options.spawn_timeout(),
        streamed: true,
        stdin_pipe: true,
        pty,
    };
    let start = Start::Run {
        command: command.into(),
        mode,
    };
    agent::start(capsule, link.clone(), start, &options, None).unwrap()
}

/// Takes output chunks until their text contains `want`; returns the text.
fn read_until(process: &Process, want: &str) -> String {
    let mut text = String::new();
    while !text.contains(want) {
        match process.next_chunk(Deadline::after(Duration::from_secs(20))) {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(chunk.bytes())),
            other => panic!("waiting for {want:?} in {text:?}: {other:?}"),
        }
    }
    text
}

fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_dead(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn stdin_is_echoed_through_cat() {
    let link = real_agent();
    let cat = spawn(
        &link,
        Command::exec("cat", [] as [&str; 0]),
        RunOptions::new(),
    );
    assert!(cat.pid() > 1);
    cat.write_stdin(b"hello ").unwrap();
    cat.write_stdin(b"world\n").unwrap();
    assert_eq!(read_until(&cat, "world"), "hello world\n");
    cat.write_stdin(b"again").unwrap();
    cat.close_stdin().unwrap();
    cat.close_stdin().unwrap(); // twice is fine
    let out = cat.wait(None).unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(0), None));
    assert_eq!(out.stdout, b"again", "wait keeps what no stream took");
    // Ended: stdin is refused, a signal is a no-op.
    assert!(matches!(
        cat.write_stdin(b"x"),
        Err(Error::InvalidArgument(_))
    ));
    cat.signal(Signal::TERM).unwrap();
    // Stdin bytes given up front are fed, then closed.
    let fed = spawn(&link, "tr a-z A-Z", RunOptions::new().stdin("shout"));
    assert_eq!(fed.wait(None).unwrap().stdout, b"SHOUT");
    assert!(matches!(
        fed.write_stdin(b"x"),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn kill_leaves_no_process_of_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let link = real_agent();
    let script = format!(
        // `up` only once all three pids are written: the subshell writes its own
        // child's pid asynchronously.
        "sleep 100 & echo $! >> {p}; (sleep 100 & echo $! >> {p}; wait) & echo $! >> {p}; \
         while [ $(wc -l < {p}) -lt 3 ]; do sleep 0.01; done; echo up; wait",
        p = pids.display()
    );
    let tree = spawn(&link, script, RunOptions::new());
    read_until(&tree, "up");
    tree.signal(Signal::KILL).unwrap();
    let out = tree.wait(None).unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(Signal::KILL)));
    let all: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(all.len(), 3);
    for pid in all.into_iter().chain([tree.pid() as i32]) {
        assert!(wait_dead(pid), "{pid} survived the kill");
    }
}

#[test]
fn a_signal_is_reported_as_such() {
    let link = real_agent();
    let p = spawn(&link, "kill -TERM $$", RunOptions::new());
    let out = p.wait(None).unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(Signal::TERM)));
    assert!(!out.success());
    let p = spawn(&link, "exit 143", RunOptions::new());
    let out = p.wait(None).unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(143), None));
}

/// A 64-bit xorshift: deterministic bytes, no dependency.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn a_hundred_mib_of_binary_output_streams_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let blob = pseudo_random(100 << 20);
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&blob)
        .unwrap();
    let link = real_agent();
    let cat = spawn(&link, format!("cat {}", file.display()), RunOptions::new());
    let mut at = 0;
    let mut most_buffered = 0;
    while let Some(chunk) = cat.next_chunk(None).unwrap() {
        let Output::Stdout(bytes) = chunk else {
            panic!("stderr output")
        };
        assert!(
            blob[at..].starts_with(&bytes),
            "the output differs at byte {at}"
        );
        at += bytes.len();
        most_buffered = most_buffered.max(cat.buffered());
    }
    assert_eq!(at, blob.len());
    assert!(most_buffered <= STREAM_WINDOW as usize, "{most_buffered}");
    let out = cat.wait(None).unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(out.stdout.is_empty(), "the stream took everything");
}

/// /proc/PID/io's `wchar`: bytes the process wrote so far.
fn written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A consumer that stops reading: the host keeps at most one window, the guest process
/// blocks (writes nothing more), and everything arrives once reading resumes.
#[test]
fn a_consumer_that_stops_reading_blocks_the_process_not_the_host() {
    let link = real_agent();
    let total: u64 = 64 << 20;
    // `exec` so that the pid is the writer's.
    let writer = spawn(
        &link,
        format!("exec head -c {total} /dev/zero"),
        RunOptions::new(),
    );
    let pid = writer.pid();
    // Let the window and the pipes fill up.
    let mut last = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = written(pid);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let stalled = written(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(written(pid), stalled, "the process went on writing");
    assert!(
        stalled < total / 4,
        "{stalled} bytes written before blocking"
    );
    assert!(
        writer.buffered() <= STREAM_WINDOW as usize,
        "the host holds {} bytes",
        writer.buffered()
    );
    assert!(!is_dead(pid as i32), "it is blocked, not gone");
    // Reading again: everything comes.
    let mut got = 0u64;
    while let Some(chunk) = writer.next_chunk(None).unwrap() {
        got += chunk.bytes().len() as u64;
    }
    assert_eq!(got, total);
    assert_eq!(writer.wait(None).unwrap().exit_code, Some(0));
}

#[test]
fn credits_are_batched() {
    // A quarter window per credit: the window never stays shut while the host keeps up.
    assert_eq!(CREDIT_BATCH * 4, u64::from(STREAM_WINDOW));
}

#[test]
fn callbacks_see_the_output_as_it_comes_and_run_keeps_it() {
    let link = real_agent();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let errs = Arc::new(Mutex::new(Vec::new()));
    let (s, e) = (seen.clone(), errs.clone());
    let options = RunOptions::new()
        .on_stdout(move |b| s.lock().unwrap().extend_from_slice(b))
        .on_stderr(move |b| e.lock().unwrap().extend_from_slice(b));
    let p = spawn(&link, "echo out; echo err >&2; echo more", options);
    let out = p.wait(None).unwrap();
    assert_eq!(*seen.lock().unwrap(), b"out\nmore\n");
    assert_eq!(*errs.lock().unwrap(), b"err\n");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\nmore\n"[..], &b"err\n"[..])
    );
    // Chunks given to a callback never reach the stream.
    assert!(p.next_chunk(None).unwrap().is_none());
}

#[test]
fn the_output_limit_cuts_what_wait_keeps() {
    let link = real_agent();
    let p = spawn(
        &link,
        "head -c 3000000 /dev/zero; echo e >&2",
        RunOptions::new().output_limit(1000),
    );
    let out = p.wait(None).unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated && !out.stderr_truncated);
    assert_eq!(out.stderr, b"e\n");
}

#[test]
fn a_terminal_answers_reports_its_size_and_resizes() {
    let link = real_agent();
    let size = PtySize { rows: 24, cols: 80 };
    let sh = spawn_on(
        &core(),
        &link,
        Command::exec("/bin/sh", ["-i"]),
        RunOptions::new(),
        Some(size),
    );
    sh.write_stdin(b"echo answer-$((40+2))\n").unwrap();
    read_until(&sh, "answer-42");
    sh.write_stdin(b"stty size\n").unwrap();
    read_until(&sh, "24 80");
    sh.resize(PtySize {
        rows: 50,
        cols: 132,
    })
    .unwrap();
    sh.write_stdin(b"stty size\n").unwrap();
    read_until(&sh, "50 132");
    sh.write_stdin(b"exit 3\n").unwrap();
    let out = sh.wait(Deadline::after(Duration::from_secs(20))).unwrap();
    assert_eq!(out.exit_code, Some(3));
    // Resizing a command without a terminal is refused at once.
    let plain = spawn(&link, "sleep 10", RunOptions::new());
    assert!(matches!(plain.resize(size), Err(Error::InvalidArgument(_))));
    plain.signal(Signal::KILL).unwrap();
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

#[test]
fn commands_run_as_another_user() {
    if !is_root() {
        eprintln!("SKIPPED: switching users needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
    std::fs::write(&passwd, "tester:x:65534:65533::/home/tester:/bin/sh\n").unwrap();
    std::fs::write(&group, "extra:x:4242:tester\n").unwrap();
    let mut config = capsule_agent::ServeConfig::default();
    config.exec.passwd = passwd;
    config.exec.group = group;
    let (link, _end) = real_agent_with(config);
    let p = spawn(
        &link,
        "id -u; id -G; echo $HOME",
        RunOptions::new().user("tester"),
    );
    let out = p.wait(None).unwrap();
    assert_eq!(out.stdout_str(), "65534\n65533 4242\n/home/tester\n");
    let start = Start::Run {
        command: "true".into(),
        mode: RunMode {
            timeout: None,
            streamed: true,
            stdin_pipe: true,
            pty: None,
        },
    };
    let options = RunOptions::new().user("nobody-here");
    match agent::start(&core(), link, start, &options, None) {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("nobody-here"), "{why}"),
        other => panic!("expected InvalidArgument, got {:?}", other.map(|p| p.pid())),
    }
}

#[test]
fn waits_and_timeouts() {
    let link = real_agent();
    let p = spawn(&link, "sleep 5", RunOptions::new());
    match p.wait(Deadline::after(Duration::from_millis(100))) {
        Err(Error::Timeout {
            kind: TimeoutKind::Wait,
            after,
        }) => assert_eq!(after, Duration::from_millis(100)),
        other => panic!("{other:?}"),
    }
    p.signal(Signal::KILL).unwrap();
    // The command's own timeout kills it.
    let started = Instant::now();
    let p = spawn(
        &link,
        "sleep 100",
        RunOptions::new().timeout(Duration::from_millis(200)),
    );
    match p.wait(None) {
        Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after,
        }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn processes_are_listed_connected_to_and_killed() {
    let capsule = core();
    let link = real_agent();
    let first = spawn_on(
        &capsule,
        &link,
        "echo ready; while read l; do echo \"got $l\"; done",
        RunOptions::new(),
        None,
    );
    read_until(&first, "ready");
    let listed = agent::list(&capsule, &link).unwrap();
    let me = listed.iter().find(|p| p.pid == first.pid()).unwrap();
    assert!(me.command.starts_with("echo ready;"), "{me:?}");
    let age = SystemTime::now().duration_since(me.started_at).unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");

    // A new handle takes the output over; the first one is detached.
    let start = Start::Attach {
        pid: first.pid(),
        pty: false,
    };
    let second = agent::start(&capsule, link.clone(), start, &RunOptions::new(), None).unwrap();
    assert_eq!(second.pid(), first.pid());
    match first.wait(None) {
        Err(Error::ProcessDetached { pid, reason, .. }) => {
            assert_eq!(pid, first.pid());
            assert!(reason.contains("another handle"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    second.write_stdin(b"line\n").unwrap();
    read_until(&second, "got line");

    // kill(pid) goes through the handle of this link that receives the output.
    agent::kill(&capsule, &link, second.pid()).unwrap();
    let out = second.wait(None).unwrap();
    assert_eq!(out.signal, Some(Signal::KILL));
    assert!(wait_dead(second.pid() as i32));
    assert!(agent::list(&capsule, &link).unwrap().is_empty());

    // A pid the agent does not track.
    assert!(matches!(
        agent::kill(&capsule, &link, 999_999),
        Err(Error::ProcessNotFound { pid: 999_999, .. })
    ));
}

/// `kill(pid)` from a link with no handle to the process (another engine, or after a
/// resume): by attaching to it; the handle elsewhere learns it was detached.
#[test]
fn kill_by_pid_without_a_handle_attaches() {
    let config = capsule_agent::ServeConfig {
        keep_processes: true,
        ..capsule_agent::ServeConfig::default()
    };
    let capsule = core();
    let (here, _end) = real_agent_with(config.clone());
    let (there, _end2) = real_agent_with(config);
    let lone = spawn_on(&capsule, &there, "sleep 100", RunOptions::new(), None);
    let pid = lone.pid();
    assert!(here.receiver_of(pid).is_none());
    agent::kill(&capsule, &here, pid).unwrap();
    assert!(wait_dead(pid as i32));
    assert!(agent::list(&capsule, &here).unwrap().is_empty());
    assert!(matches!(
        lone.wait(None),
        Err(Error::ProcessDetached { .. })
    ));
}

/// The last handle gone: the output is discarded (the process is not blocked by it) and
/// stdin closed (a process reading it ends).
#[test]
fn an_abandoned_command_runs_on_unblocked() {
    let link = real_agent();
    let capsule = core();
    let cat = spawn(
        &link,
        Command::exec("cat", [] as [&str; 0]),
        RunOptions::new(),
    );
    let cat_pid = cat.pid();
    cat.abandon();
    drop(cat);
    assert!(wait_dead(cat_pid as i32), "cat got its end of file");
    let chatty = spawn(
        &link,
        "head -c 8000000 /dev/zero; echo done",
        RunOptions::new(),
    );
    let pid = chatty.pid();
    chatty.abandon();
    drop(chatty);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent::list(&capsule, &link)
        .unwrap()
        .iter()
        .any(|p| p.pid == pid)
    {
        assert!(Instant::now() < deadline, "the abandoned writer is blocked");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a pause does to a handle, simulated: the link ends (the agent, which keeps its
/// processes, detaches it), the old handle reports `ProcessDetached`, and a new link lists
/// the process and connects to it: the rest of its output and its exit.
#[test]
fn after_the_link_is_lost_a_new_link_reconnects() {
    let config = capsule_agent::ServeConfig {
        keep_processes: true,
        ..capsule_agent::ServeConfig::default()
    };
    let capsule = core();
    let (old_link, end) = real_agent_with(config.clone());
    let p = spawn_on(
        &capsule,
        &old_link,
        "echo before; read x; echo \"after $x\"; exit 4",
        RunOptions::new(),
        None,
    );
    read_until(&p, "before");
    end.shutdown(std::net::Shutdown::Both).unwrap();
    match p.wait(Deadline::after(Duration::from_secs(10))) {
        Err(Error::ProcessDetached { pid, reason, .. }) => {
            assert_eq!(pid, p.pid());
            assert!(reason.contains("paused"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        p.write_stdin(b"x"),
        Err(Error::ProcessDetached { .. })
    ));

    let (link, _end) = real_agent_with(config);
    let listed = agent::list(&capsule, &link).unwrap();
    assert_eq!(
        listed.iter().map(|l| l.pid).collect::<Vec<_>>(),
        vec![p.pid()]
    );
    let start = Start::Attach {
        pid: p.pid(),
        pty: false,
    };
    let again = agent::start(&capsule, link.clone(), start, &RunOptions::new(), None).unwrap();
    again.write_stdin(b"resume\n").unwrap();
    let out = again.wait(None).unwrap();
    assert_eq!(out.stdout_str(), "after resume\n");
    assert_eq!(out.exit_code, Some(4));
    assert!(agent::list(&capsule, &link).unwrap().is_empty());
}

#[test]
fn waits_of_any_length_and_panicking_callbacks_do_not_panic() {
    let link = real_agent();
    let options = RunOptions::new()
        .timeout(Duration::MAX)
        .on_stderr(|_| panic!("a callback's bug"));
    let p = spawn(&link, "echo out; echo err >&2", options);
    let out = p.wait(Deadline::after(Duration::MAX)).unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert!(p
        .next_chunk(Deadline::after(Duration::MAX))
        .unwrap()
        .is_none());
}

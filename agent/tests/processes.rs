//! Protocol version 3 end to end: flow control of streamed output, PTY
//! commands, other users, the process registry (`ListProcesses`, `Attach`),
//! detaching by `Sync` and by a closed connection, holding reports for a
//! snapshot (`Hold`, `Release`).

mod common;

use std::time::{Duration, Instant};

use capsule_agent::{ExecConfig, ServeConfig};
use capsule_agent_protocol::*;
use common::*;

fn streamed(script: &str) -> RunRequest {
    RunRequest {
        stream: true,
        stdout_limit: u32::MAX,
        stderr_limit: u32::MAX,
        ..shell(script)
    }
}

fn with_stdin(mut req: RunRequest) -> RunRequest {
    req.stdin = true;
    req
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn hello_advertises_version_3_capabilities() {
    let h = Host::start();
    assert_eq!(h.hello.protocol_version, 3);
    let want = caps::USER | caps::PTY | caps::PROCESSES;
    assert_eq!(h.hello.capabilities & want, want);
}

/// A consumer that stops taking output: the agent sends one window and no
/// more, the process blocks on its full pipe (it neither exits nor runs
/// ahead), and credit lets the rest through byte for byte.
#[test]
fn streamed_output_stops_at_the_window_until_credit() {
    let mut h = Host::start();
    h.auto_credit = false;
    let total: usize = 8 << 20;
    h.send(
        1,
        &Message::Run(streamed(&format!("head -c {total} /dev/zero"))),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!("no Started");
    };
    let mut got = 0usize;
    while got < STREAM_WINDOW as usize {
        match h.recv_for(1) {
            Message::Stdout(d) => got += d.len(),
            other => panic!("{other:?} after {got} bytes"),
        }
    }
    assert_eq!(got, STREAM_WINDOW as usize, "the window is never overrun");
    // Nothing more comes while no credit is given, and `head` is blocked
    // (sleeping in its write), not gone.
    h.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let quiet = matches!(
        std::io::Read::read(&mut h.sock, &mut buf),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    assert!(quiet, "the agent sent beyond the window");
    h.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = h.list(2).into_iter().find(|p| p.pid != pid);
    assert!(head.is_none(), "one process is listed: {head:?}");
    assert!(!is_dead(pid as i32), "the shell is still there");
    // `sh -c 'head ...'` execs head: the pid is head's, blocked writing.
    assert_eq!(process_state(pid), Some('S'), "blocked, not running");

    // Credit as we go: the rest arrives exactly.
    h.auto_credit = true;
    h.send(1, &Message::Credit { bytes: got as u32 });
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(got + r.stdout.len(), total);
    assert!(r.stdout.iter().all(|b| *b == 0));
    assert_eq!(r.exit().status, ExitStatus::Code(0));
}

#[test]
fn credit_for_no_request_is_ignored_silently() {
    let mut h = Host::start();
    h.send(77, &Message::Credit { bytes: 5 });
    let r = h.request(78, &Message::Ping(b"x".to_vec()));
    assert_eq!(r.frames, vec![Message::Pong(b"x".to_vec())]);
}

#[test]
fn binary_output_streams_byte_exact_with_credit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let blob: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &blob).unwrap();
    let mut h = Host::start();
    let r = h.run(1, streamed(&format!("cat {}", file.display())));
    assert_eq!(r.exit().status, ExitStatus::Code(0));
    assert!(r.stdout == blob, "{} bytes differ", r.stdout.len());
}

#[test]
fn a_pty_shell_answers_reports_its_size_and_resizes() {
    let mut h = Host::start();
    let req = RunRequest {
        command: Command::Exec {
            program: "/bin/sh".into(),
            args: vec!["-i".into()],
        },
        pty: Some(WindowSize { rows: 24, cols: 80 }),
        ..streamed("")
    };
    h.send(1, &Message::Run(req));
    let Message::Started { pid } = h.recv_for(1) else {
        panic!("no Started");
    };
    h.send(1, &Message::Stdin(b"echo typed-$((6*7))\n".to_vec()));
    h.read_until(1, "typed-42");
    h.send(1, &Message::Stdin(b"stty size; tty\n".to_vec()));
    let out = h.read_until(1, "24 80");
    assert!(out.contains("24 80"), "{out}");
    h.send(
        1,
        &Message::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
    );
    h.send(1, &Message::Stdin(b"stty size\n".to_vec()));
    h.read_until(1, "50 132");
    // The shell leads its own session, with the terminal as its own.
    h.send(
        1,
        &Message::Stdin(b"test -t 0 && echo tty-yes-$((1+1))\n".to_vec()),
    );
    h.read_until(1, "tty-yes-2");
    // Ctrl-D (CloseStdin) ends the interactive shell.
    h.send(1, &Message::CloseStdin);
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Code(0), "{:?}", r.stdout_str());
    assert!(wait_dead(pid as i32));
}

#[test]
fn resize_of_a_command_without_a_terminal_is_refused() {
    let mut h = Host::start();
    h.send(1, &Message::Run(streamed("sleep 5")));
    assert!(matches!(h.recv_for(1), Message::Started { .. }));
    let e = h.expect_error(1, &Message::Resize(WindowSize { rows: 1, cols: 1 }));
    assert_eq!(e.code, ErrorCode::UNEXPECTED);
    assert!(!e.code.ends_request());
    h.send(1, &Message::Signal { sig: 9 });
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Signal(9));
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

#[test]
fn commands_run_as_a_user_of_the_passwd_file() {
    if !is_root() {
        eprintln!("SKIPPED: switching users needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\ntester:x:65534:65533:T:/home/tester:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        &group,
        "root:x:0:\nextra:x:4242:root,tester\nnone:x:4343:\n",
    )
    .unwrap();
    let config = ServeConfig {
        exec: ExecConfig {
            passwd,
            group,
            ..ExecConfig::default()
        },
        ..ServeConfig::default()
    };
    let mut h = Host::start_with(config);
    let req = RunRequest {
        user: Some("tester".into()),
        ..shell("id -u; id -g; id -G; echo $HOME $USER $LOGNAME")
    };
    let r = h.run(1, req);
    assert_eq!(r.exit().status, ExitStatus::Code(0), "{:?}", r);
    assert_eq!(
        r.stdout_str(),
        "65534\n65533\n65533 4242\n/home/tester tester tester\n"
    );
    // On a terminal too (the terminal is the user's).
    let req = RunRequest {
        user: Some("tester".into()),
        pty: Some(WindowSize { rows: 10, cols: 40 }),
        ..streamed("id -u; stat -c %u $(tty)")
    };
    let r = h.run(2, req);
    assert_eq!(r.stdout_str().replace('\r', ""), "65534\n65534\n");
    // An unknown user fails the request with its own code.
    let r = h.run(
        3,
        RunRequest {
            user: Some("nobody-here".into()),
            ..shell("true")
        },
    );
    let e = r.error.expect("an error");
    assert_eq!(e.code, ErrorCode::UNKNOWN_USER);
    assert!(e.message.contains("nobody-here"), "{}", e.message);
    assert!(r.started.is_none());
}

#[test]
fn processes_are_listed_until_they_end() {
    let mut h = Host::start();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    h.send(1, &Message::Run(streamed("sleep 30")));
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    h.send(2, &Message::Run(RunRequest::shell("sleep 30")));
    let Message::Started { pid: pid2 } = h.recv_for(2) else {
        panic!()
    };
    let list = h.list(3);
    assert_eq!(list.len(), 2, "{list:?}");
    let p = list.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(p.command, "sleep 30");
    assert!(p.started_at_unix_ms >= before && p.started_at_unix_ms < before + 10_000);
    assert!(list.iter().any(|p| p.pid == pid2));
    assert!(list.windows(2).all(|w| w[0].pid < w[1].pid), "ordered");
    h.send(1, &Message::Signal { sig: 9 });
    h.send(2, &Message::Signal { sig: 9 });
    h.collect(&[1, 2]);
    assert!(h.list(4).is_empty());
    // Attaching to a process that is gone (or never was) fails.
    let e = h.expect_error(5, &Message::Attach { pid });
    assert_eq!(e.code, ErrorCode::NO_SUCH_PROCESS);
}

/// `Attach` moves the output: the new request greets with `Started`, gets
/// what the process prints from then on, can write its stdin, and gets its
/// exit; the old request ends with `DETACHED`.
#[test]
fn attach_takes_the_output_and_the_exit() {
    let mut h = Host::start();
    h.send(
        1,
        &Message::Run(with_stdin(streamed(
            "echo first; while read l; do echo \"got $l\"; done; exit 5",
        ))),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    h.read_until(1, "first");
    h.send(2, &Message::Attach { pid });
    let e = match h.recv_for(1) {
        Message::Error(e) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(e.code, ErrorCode::DETACHED);
    assert_eq!(h.recv_for(2), Message::Started { pid });
    // The old id is free again; stdin goes through the new one.
    let e = h.expect_error(1, &Message::Stdin(b"x\n".to_vec()));
    assert_eq!(e.code, ErrorCode::UNKNOWN_REQUEST);
    h.send(2, &Message::Stdin(b"hello\n".to_vec()));
    h.read_until(2, "got hello");
    h.send(2, &Message::CloseStdin);
    let r = h.collect(&[2]).remove(&2).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Code(5));
    assert!(r.exit().stdout.is_empty());
}

/// A `Sync` detaches every process (its host side is new): a process that
/// ends meanwhile keeps its exit and its output, which an `Attach` gets.
#[test]
fn after_a_sync_an_attach_gets_the_rest_and_the_exit() {
    let mut h = Host::start();
    h.send(
        1,
        &Message::Run(streamed("echo before; sleep 0.3; echo after; exit 3")),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    h.read_until(1, "before");
    let ack = h.request(2, &Message::Sync(SyncRequest::default()));
    assert_eq!(ack.frames, vec![Message::Ack]);
    std::thread::sleep(Duration::from_millis(800));
    // Ended, but unclaimed: still listed.
    assert!(h.list(3).iter().any(|p| p.pid == pid));
    h.send(4, &Message::Attach { pid });
    let r = h.collect(&[4]).remove(&4).unwrap();
    assert_eq!(r.started, Some(pid));
    assert_eq!(r.stdout_str(), "after\n");
    assert_eq!(r.exit().status, ExitStatus::Code(3));
    assert!(h.list(5).is_empty());
    // Nothing came on the old id after the Sync.
    assert!(h.try_recv_within(Duration::from_millis(100)).is_none());
}

/// Reads frames until request `id` finished, failing on a frame of another.
fn only_for(h: &mut Host, id: u32) -> Vec<Message> {
    let mut frames = Vec::new();
    loop {
        let f = h.recv();
        assert_eq!(f.id, id, "a frame of another request: {f:?}");
        let last = !matches!(f.message, Message::Stdout(_) | Message::Stderr(_));
        frames.push(f.message);
        if last {
            return frames;
        }
    }
}

/// `Hold` (sent before a snapshot): from its `Ack` on, no process sends
/// anything, output or exit, while processes run and end; `Release` lets it
/// all through to their requests, nothing lost.
#[test]
fn a_hold_stops_every_report_until_the_release_lets_them_through() {
    let mut h = Host::start();
    assert_ne!(h.hello.capabilities & caps::HOLD, 0);
    h.send(
        1,
        &Message::Run(streamed("while true; do echo tick; sleep 0.01; done")),
    );
    h.read_until(1, "tick");
    h.send(
        2,
        &Message::Run(streamed("echo before; sleep 0.3; echo after; exit 3")),
    );
    let Message::Started { pid: pid2 } = h.recv_for(2) else {
        panic!()
    };
    h.read_until(2, "before");
    h.send(3, &Message::Run(shell("sleep 0.3; echo buffered; exit 2")));
    let Message::Started { pid: pid3 } = h.recv_for(3) else {
        panic!()
    };
    h.send(4, &Message::Hold);
    // Frames sent before the `Ack` are fine; none may follow it.
    assert_eq!(h.recv_for(4), Message::Ack);
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(800) {
        if let Some(f) = h.try_recv_within(Duration::from_millis(100)) {
            panic!("sent while held: {f:?}");
        }
    }
    // Both short ones ended meanwhile; their exits are kept, so they are
    // still listed (replies to the host's requests are not held).
    h.send(5, &Message::ListProcesses);
    let listed = match only_for(&mut h, 5).pop() {
        Some(Message::ProcessList(list)) => list,
        other => panic!("{other:?}"),
    };
    assert!(listed.iter().any(|p| p.pid == pid2), "{listed:?}");
    assert!(listed.iter().any(|p| p.pid == pid3), "{listed:?}");
    h.send(7, &Message::Release);
    h.send(1, &Message::Signal { sig: 9 });
    let r = h.collect(&[1, 2, 3, 7]);
    assert_eq!(r[&7].frames, vec![Message::Ack]);
    assert_eq!(r[&2].stdout_str(), "after\n");
    assert_eq!(r[&2].exit().status, ExitStatus::Code(3));
    assert_eq!(r[&3].exit().stdout, b"buffered\n");
    assert_eq!(r[&3].exit().status, ExitStatus::Code(2));
    assert_eq!(r[&1].exit().status, ExitStatus::Signal(9));
    assert!(h.list(8).is_empty());
}

/// What a restored guest does: processes held for the snapshot that ended
/// before the `Sync` lose nothing with the old host side's requests: nothing
/// is sent to those, the processes are listed, and an `Attach` gets the rest
/// of the output and the exit.
#[test]
fn after_a_hold_a_sync_keeps_the_exits_for_an_attach() {
    let mut h = Host::start();
    h.send(
        1,
        &Message::Run(streamed("echo before; sleep 0.3; echo after; exit 3")),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    h.read_until(1, "before");
    h.send(2, &Message::Hold);
    assert_eq!(only_for(&mut h, 2), vec![Message::Ack]);
    std::thread::sleep(Duration::from_millis(800));
    h.send(3, &Message::Sync(SyncRequest::default()));
    assert_eq!(only_for(&mut h, 3), vec![Message::Ack]);
    assert!(h.try_recv_within(Duration::from_millis(200)).is_none());
    assert!(h.list(4).iter().any(|p| p.pid == pid));
    h.send(5, &Message::Attach { pid });
    let r = h.collect(&[5]).remove(&5).unwrap();
    assert_eq!(r.started, Some(pid));
    assert_eq!(r.stdout_str(), "after\n");
    assert_eq!(r.exit().status, ExitStatus::Code(3));
    assert!(h.list(6).is_empty());
}

/// A buffered `Run` detached before it ended: its collected output comes to
/// the attaching request as chunks, then the exit.
#[test]
fn a_detached_buffered_run_is_streamed_to_its_attacher() {
    let mut h = Host::start();
    h.send(
        1,
        &Message::Run(shell("echo one; echo two >&2; sleep 0.3; echo three")),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(100));
    h.request(2, &Message::Sync(SyncRequest::default()));
    h.send(3, &Message::Attach { pid });
    let r = h.collect(&[3]).remove(&3).unwrap();
    assert_eq!(r.stdout_str(), "one\nthree\n");
    assert_eq!(r.stderr, b"two\n");
    assert!(r.exit().stdout.is_empty());
    assert_eq!(r.exit().status, ExitStatus::Code(0));
}

/// With `keep_processes`, a process outlives its connection; a later
/// connection (same config) lists it and attaches.
#[test]
fn kept_processes_outlive_their_connection() {
    let config = ServeConfig {
        keep_processes: true,
        ..ServeConfig::default()
    };
    let mut h = Host::start_with(config.clone());
    h.send(
        1,
        &Message::Run(with_stdin(streamed(
            "read line; echo \"late $line\"; exit 9",
        ))),
    );
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    let t = Instant::now();
    h.close().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "not waited for");
    assert!(!is_dead(pid as i32));
    let mut h = Host::start_with(config.clone());
    assert_eq!(
        h.list(1).iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![pid]
    );
    h.send(2, &Message::Attach { pid });
    assert_eq!(h.recv_for(2), Message::Started { pid });
    h.send(2, &Message::Stdin(b"bird\n".to_vec()));
    let r = h.collect(&[2]).remove(&2).unwrap();
    assert_eq!(r.stdout_str(), "late bird\n");
    assert_eq!(r.exit().status, ExitStatus::Code(9));
    assert!(config.processes.is_empty());
}

/// SIGKILL through the request reaches every process of the group: no
/// survivor.
#[test]
fn a_killed_process_tree_leaves_no_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let mut h = Host::start();
    let script = format!(
        "sleep 100 & echo $! >> {p}; (sleep 100 & echo $! >> {p}; wait) & echo $! >> {p}; echo up; wait",
        p = pids.display()
    );
    h.send(1, &Message::Run(streamed(&script)));
    let Message::Started { pid } = h.recv_for(1) else {
        panic!()
    };
    h.read_until(1, "up");
    std::thread::sleep(Duration::from_millis(100));
    h.send(1, &Message::Signal { sig: 9 });
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Signal(9));
    let tree: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(tree.len(), 3, "{tree:?}");
    for p in tree.into_iter().chain([pid as i32]) {
        assert!(wait_dead(p), "{p} survived");
    }
}

/// Beyond `MAX_UNCLAIMED_EXITS` processes that ended detached, the oldest
/// are forgotten.
#[test]
fn unclaimed_exits_are_bounded() {
    let mut h = Host::start();
    let n = MAX_UNCLAIMED_EXITS + 4;
    for i in 0..n as u32 {
        h.send(
            100 + i,
            &Message::Run(streamed(&format!("sleep 0.{}", 2 + i % 5))),
        );
        assert!(matches!(h.recv_for(100 + i), Message::Started { .. }));
    }
    h.request(1, &Message::Sync(SyncRequest::default()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = h.list(2).len();
        if listed == MAX_UNCLAIMED_EXITS {
            break;
        }
        assert!(listed > MAX_UNCLAIMED_EXITS, "{listed}");
        assert!(Instant::now() < deadline, "{listed} listed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! End-to-end tests of `serve` with real processes over a socket pair.

mod common;

use std::time::{Duration, Instant};

use capsule_agent::{ServeConfig, ServeOutcome};
use capsule_agent_protocol::*;
use common::*;

#[test]
fn hello_carries_version_and_capabilities() {
    let h = Host::start();
    assert_eq!(h.hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h.hello.agent_version, env!("CARGO_PKG_VERSION"));
    let want = caps::RUN | caps::STREAM | caps::STDIN | caps::SIGNAL | caps::FILES | caps::SYNC;
    assert_eq!(h.hello.capabilities & want, want);
    assert_eq!(h.hello.capabilities & caps::PID1, 0);
    assert_eq!(h.close().unwrap(), ServeOutcome::Closed);
}

#[test]
fn echo() {
    let mut h = Host::start();
    let r = h.run(1, shell("echo hello"));
    assert!(
        matches!(r.frames[0], Message::Started { .. }),
        "{:?}",
        r.frames
    );
    let x = r.exit();
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(x.stdout, b"hello\n");
    assert!(x.stderr.is_empty());
    assert!(!x.timed_out && !x.stdout_truncated && !x.stderr_truncated);
    assert!(x.duration_us > 0);
}

#[test]
fn exit_code_and_signal_status() {
    let mut h = Host::start();
    let r = h.run(1, shell("echo oops >&2; exit 3"));
    assert_eq!(r.exit().status, ExitStatus::Code(3));
    assert_eq!(r.exit().stderr, b"oops\n");
    let r = h.run(2, shell("kill -TERM $$"));
    assert_eq!(r.exit().status, ExitStatus::Signal(15));
}

#[test]
fn env_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start();
    let mut req = shell(r#"printf '%s|%s' "$FOO" "$(pwd -P)""#);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some(dir.path().to_str().unwrap().into());
    let r = h.run(1, req);
    let want = format!("bar baz|{}", dir.path().canonicalize().unwrap().display());
    assert_eq!(r.stdout_str(), want);

    let mut req = shell(r#"printf '%s|%s' "${HOME-unset}" "$ONLY""#);
    req.clear_env = true;
    req.env = vec![("ONLY".into(), "me".into())];
    assert_eq!(h.run(2, req).stdout_str(), "unset|me");

    let mut req = shell("true");
    req.cwd = Some("/nonexistent/dir".into());
    let r = h.run(3, req);
    assert_eq!(
        r.error.as_ref().map(|e| e.code),
        Some(ErrorCode::SPAWN_FAILED),
        "{:?}",
        r.frames
    );
}

#[test]
fn exec_without_shell() {
    let mut h = Host::start();
    let req = RunRequest {
        command: Command::Exec {
            program: "printf".into(),
            args: vec!["%s-%s".into(), "a b".into(), "$c".into()],
        },
        ..shell("")
    };
    assert_eq!(h.run(1, req).stdout_str(), "a b-$c");
    let req = RunRequest {
        command: Command::Exec {
            program: "/definitely/not/here".into(),
            args: vec![],
        },
        ..shell("")
    };
    let r = h.run(2, req);
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::SPAWN_FAILED));
    assert!(r.started.is_none());
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let mut h = Host::start();
    let mut req = shell(&format!(
        "sleep 100 & echo $! > {}; sleep 100",
        pidfile.display()
    ));
    req.timeout_ms = 300;
    let t = Instant::now();
    let r = h.run(1, req);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let x = r.exit();
    assert!(x.timed_out);
    assert_eq!(x.status, ExitStatus::Signal(9));
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_dead(bg), "background sleep {bg} survived the timeout");
    let leader = r.started.unwrap() as i32;
    assert!(wait_dead(leader));
}

fn seq_output(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn one_mib_of_stdout_arrives_intact_buffered_and_streamed() {
    let want = seq_output(200_000);
    assert!(want.len() > 1024 * 1024);
    let mut h = Host::start();
    let mut req = shell("seq 1 200000");
    req.stdout_limit = 2 * 1024 * 1024;
    let r = h.run(1, req.clone());
    assert!(!r.exit().stdout_truncated);
    assert!(
        r.stdout == want,
        "buffered output differs ({} bytes)",
        r.stdout.len()
    );

    req.stream = true;
    let r = h.run(2, req);
    assert!(r.exit().stdout.is_empty());
    assert!(r.frames.len() > 3);
    assert!(
        r.stdout == want,
        "streamed output differs ({} bytes)",
        r.stdout.len()
    );
}

#[test]
fn output_beyond_the_limit_is_truncated_and_drained() {
    let mut h = Host::start();
    let mut req = shell("head -c 300000 /dev/zero; head -c 5000 /dev/zero >&2; echo done >&2");
    req.stdout_limit = 1000;
    req.stderr_limit = 10;
    let r = h.run(1, req.clone());
    let x = r.exit();
    // `head` was never blocked or killed by a full pipe.
    assert_eq!(x.status, ExitStatus::Code(0));
    assert_eq!(x.stdout.len(), 1000);
    assert_eq!(x.stderr.len(), 10);
    assert!(x.stdout_truncated && x.stderr_truncated);

    req.stream = true;
    let r = h.run(2, req);
    assert_eq!(r.stdout.len(), 1000);
    assert_eq!(r.stderr.len(), 10);
    assert!(r.exit().stdout_truncated && r.exit().stderr_truncated);

    // Buffered limits are clamped to MAX_BUFFERED_OUTPUT.
    let mut req = shell("head -c 3000000 /dev/zero");
    req.stdout_limit = u32::MAX;
    let r = h.run(3, req);
    assert_eq!(r.exit().stdout.len(), MAX_BUFFERED_OUTPUT as usize);
    assert!(r.exit().stdout_truncated);
}

#[test]
fn eight_commands_at_once() {
    let mut h = Host::start();
    let ids: Vec<u32> = (10..18).collect();
    let t = Instant::now();
    for &id in &ids {
        h.send(
            id,
            &Message::Run(shell(&format!("sleep 0.4; echo id={id}"))),
        );
    }
    let replies = h.collect(&ids);
    let took = t.elapsed();
    for &id in &ids {
        assert_eq!(replies[&id].stdout_str(), format!("id={id}\n"));
    }
    let pids: std::collections::HashSet<_> = replies.values().map(|r| r.started.unwrap()).collect();
    assert_eq!(pids.len(), 8);
    assert!(
        took < Duration::from_millis(2500),
        "not concurrent: {took:?}"
    );
}

#[test]
fn streamed_output_keeps_order() {
    let mut h = Host::start();
    let mut req =
        shell("for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.05; done; exit 4");
    req.stream = true;
    let r = h.run(1, req);
    assert_eq!(r.stdout_str(), "out1\nout2\nout3\nout4\nout5\n");
    assert_eq!(
        String::from_utf8_lossy(&r.stderr),
        "err1\nerr2\nerr3\nerr4\nerr5\n"
    );
    // Started first, Exit last, chunks in between; out1 before err2 (50 ms apart).
    assert!(matches!(r.frames.first(), Some(Message::Started { .. })));
    assert!(matches!(r.frames.last(), Some(Message::Exit(_))));
    let pos = |needle: &[u8]| {
        r.frames
            .iter()
            .position(|m| match m {
                Message::Stdout(d) | Message::Stderr(d) => {
                    d.windows(needle.len()).any(|w| w == needle)
                }
                _ => false,
            })
            .unwrap()
    };
    assert!(pos(b"out1") < pos(b"err2"));
    assert!(pos(b"err2") < pos(b"out3"));
    assert_eq!(r.exit().status, ExitStatus::Code(4));
}

#[test]
fn stdin_reaches_cat() {
    let mut h = Host::start();
    let mut req = RunRequest {
        command: Command::Exec {
            program: "cat".into(),
            args: vec![],
        },
        ..shell("")
    };
    req.stdin = true;
    h.send(1, &Message::Run(req.clone()));
    h.send(1, &Message::Stdin(b"hello ".to_vec()));
    h.send(1, &Message::Stdin(b"world".to_vec()));
    h.send(1, &Message::CloseStdin);
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(r.stdout_str(), "hello world");
    assert_eq!(r.exit().status, ExitStatus::Code(0));

    // 2 MiB through cat and back, larger than any pipe buffer.
    let big: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    req.stdout_limit = 4 * 1024 * 1024;
    req.stream = true;
    h.send(2, &Message::Run(req));
    for chunk in big.chunks(100_000) {
        h.send(2, &Message::Stdin(chunk.to_vec()));
    }
    h.send(2, &Message::CloseStdin);
    let r = h.collect(&[2]).remove(&2).unwrap();
    assert!(r.stdout == big, "got {} bytes", r.stdout.len());

    // Stdin to a command started without it is refused.
    let mut req = shell("sleep 0.2");
    req.stdin = false;
    h.send(3, &Message::Run(req));
    h.send(3, &Message::Stdin(b"x".to_vec()));
    let r = h.collect(&[3]).remove(&3).unwrap();
    assert_eq!(
        r.error.as_ref().map(|e| e.code),
        Some(ErrorCode::UNEXPECTED)
    );
    assert_eq!(r.exit().status, ExitStatus::Code(0));
}

#[test]
fn signal_goes_to_the_process_group() {
    let mut h = Host::start();
    let mut req =
        shell("trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done");
    req.stream = true;
    h.send(1, &Message::Run(req));
    // Wait until the trap is installed.
    loop {
        let f = h.recv();
        if let Message::Stdout(d) = &f.message {
            assert_eq!(d, b"ready\n");
            break;
        }
    }
    h.send(1, &Message::Signal { sig: 15 });
    let r = h.collect(&[1]).remove(&1).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Code(7));
    assert_eq!(r.stdout_str(), "got-term\n");

    // SIGKILL to a plain sleep.
    h.send(2, &Message::Run(shell("sleep 100")));
    h.send(2, &Message::Signal { sig: 9 });
    let r = h.collect(&[2]).remove(&2).unwrap();
    assert_eq!(r.exit().status, ExitStatus::Signal(9));
    assert!(!r.exit().timed_out);

    // Bad signal numbers and unknown ids get errors.
    assert_eq!(
        h.expect_error(3, &Message::Signal { sig: 0 }).code,
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(
        h.expect_error(4, &Message::Signal { sig: 15 }).code,
        ErrorCode::UNKNOWN_REQUEST
    );
    assert_eq!(
        h.expect_error(4, &Message::Stdin(b"x".to_vec())).code,
        ErrorCode::UNKNOWN_REQUEST
    );
}

#[test]
fn malformed_frames_get_errors_and_the_agent_lives_on() {
    let mut h = Host::start();
    // Unknown kind.
    h.send_raw(&[5, 0, 0, 0, 0x7e, 9, 0, 0, 0]);
    let f = h.recv();
    assert_eq!(f.id, 9);
    assert!(matches!(
        f.message,
        Message::Error(ErrorInfo {
            code: ErrorCode::UNKNOWN_KIND,
            ..
        })
    ));
    // Run with a truncated payload.
    let mut bad = encode(&Message::Run(shell("echo x")), 10);
    bad.truncate(bad.len() - 3);
    let len = (bad.len() - 4) as u32;
    bad[..4].copy_from_slice(&len.to_le_bytes());
    h.send_raw(&bad);
    let f = h.recv();
    assert_eq!(f.id, 10);
    assert!(matches!(
        f.message,
        Message::Error(ErrorInfo {
            code: ErrorCode::MALFORMED,
            ..
        })
    ));
    // A message the agent never accepts.
    assert_eq!(
        h.expect_error(11, &Message::Stdout(b"x".to_vec())).code,
        ErrorCode::UNEXPECTED
    );
    // Reserved id 0 for Run.
    assert_eq!(
        h.expect_error(0, &Message::Run(shell("true"))).code,
        ErrorCode::INVALID_ARGUMENT
    );
    // Still alive.
    let r = h.request(12, &Message::Ping(b"still here".to_vec()));
    assert_eq!(r.frames, vec![Message::Pong(b"still here".to_vec())]);
    assert_eq!(h.run(13, shell("echo ok")).stdout_str(), "ok\n");

    // A bad length loses framing: error on id 0, saying where in the stream, then serve
    // returns cleanly.
    h.send_raw(&u32::MAX.to_le_bytes());
    let f = h.recv();
    assert_eq!(f.id, CONTROL_ID);
    let Message::Error(ErrorInfo {
        code: ErrorCode::MALFORMED,
        message,
    }) = f.message
    else {
        panic!("expected a MALFORMED error, got {:?}", f.message);
    };
    assert!(
        message.contains("in the frame header at byte ") && message.contains(" bytes read)"),
        "{message}"
    );
    assert!(matches!(
        h.join().unwrap(),
        ServeOutcome::FramingLost(DecodeError::BadLength { .. })
    ));
}

#[test]
fn duplicate_ids_are_refused_and_ids_are_reusable() {
    let mut h = Host::start();
    h.send(5, &Message::Run(shell("sleep 0.3; echo first")));
    h.send(5, &Message::Run(shell("echo second")));
    let r = h.collect(&[5]).remove(&5).unwrap();
    // The duplicate's error arrives while the first runs (after Started or before).
    let errs: Vec<_> = r
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Error(_)))
        .collect();
    assert_eq!(errs.len(), 1, "{:?}", r.frames);
    let r = if r.exit.is_none() {
        h.collect(&[5]).remove(&5).unwrap()
    } else {
        r
    };
    assert_eq!(r.stdout_str(), "first\n");
    // Reuse after Exit.
    assert_eq!(h.run(5, shell("echo again")).stdout_str(), "again\n");
}

#[test]
fn host_refusal_ends_serve() {
    let mut h = Host::start();
    h.send(
        CONTROL_ID,
        &Message::error(ErrorCode::VERSION_MISMATCH, "too old"),
    );
    match h.join().unwrap() {
        ServeOutcome::Refused(info) => assert_eq!(info.code, ErrorCode::VERSION_MISMATCH),
        other => panic!("{other:?}"),
    }
}

#[test]
fn disconnect_kills_running_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let mut h = Host::start();
    let script = format!(
        "sleep 100 & echo $! > {}; echo up; sleep 100",
        pidfile.display()
    );
    h.send(
        1,
        &Message::Run(RunRequest {
            stream: true,
            ..shell(&script)
        }),
    );
    loop {
        if let Message::Stdout(_) = h.recv().message {
            break;
        }
    }
    let t = Instant::now();
    assert_eq!(h.close().unwrap(), ServeOutcome::Closed);
    assert!(t.elapsed() < Duration::from_secs(5));
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_dead(bg));
}

#[test]
fn background_process_holding_the_pipe_does_not_hang_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let mut h = Host::start();
    let t = Instant::now();
    let r = h.run(
        1,
        shell(&format!(
            "sleep 3 & echo $! > {}; echo fg",
            pidfile.display()
        )),
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(r.stdout_str(), "fg\n");
    assert_eq!(r.exit().status, ExitStatus::Code(0));
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::process::Command::new("kill")
        .arg(bg.to_string())
        .status();
}

#[test]
fn ping_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.txt").to_str().unwrap().to_string();
    let mut h = Host::start();
    let r = h.request(
        1,
        &Message::WriteFile(WriteFile {
            path: path.clone(),
            mode: 0o600,
            truncate: true,
            append: false,
            data: b"hello ".to_vec(),
        }),
    );
    assert_eq!(r.frames, vec![Message::Ack]);
    let r = h.request(
        2,
        &Message::WriteFile(WriteFile {
            path: path.clone(),
            mode: 0o600,
            truncate: false,
            append: true,
            data: b"world".to_vec(),
        }),
    );
    assert_eq!(r.frames, vec![Message::Ack]);
    let r = h.request(
        3,
        &Message::ReadFile {
            path: path.clone(),
            offset: 0,
            len: 100,
        },
    );
    assert_eq!(
        r.frames,
        vec![Message::FileData {
            data: b"hello world".to_vec(),
            eof: true
        }]
    );
    let r = h.request(
        4,
        &Message::ReadFile {
            path: path.clone(),
            offset: 6,
            len: 5,
        },
    );
    assert_eq!(
        r.frames,
        vec![Message::FileData {
            data: b"world".to_vec(),
            eof: true
        }]
    );
    let r = h.request(
        5,
        &Message::ReadFile {
            path: path.clone(),
            offset: 0,
            len: 5,
        },
    );
    assert_eq!(
        r.frames,
        vec![Message::FileData {
            data: b"hello".to_vec(),
            eof: false
        }]
    );
    let r = h.request(
        6,
        &Message::ListDir {
            path: dir.path().to_str().unwrap().into(),
        },
    );
    match &r.frames[0] {
        Message::DirListing {
            entries,
            truncated: false,
        } => {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].name, "f.txt");
            assert_eq!(entries[0].file_type, FileType::File);
            assert_eq!(entries[0].size, 11);
            assert_eq!(entries[0].mode & 0o777, 0o600);
        }
        other => panic!("{other:?}"),
    }
    let r = h.request(
        7,
        &Message::ReadFile {
            path: "/no/such/file".into(),
            offset: 0,
            len: 5,
        },
    );
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::NOT_FOUND));
}

/// A `Sync` that only sets variables: the clock (`realtime_ns` 0) and the
/// kernel's entropy pool (no `entropy`) of the test machine stay untouched.
fn sync_env(pairs: &[(&str, &str)]) -> Message {
    Message::Sync(SyncRequest {
        realtime_ns: 0,
        entropy: Vec::new(),
        env: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

#[test]
fn sync_env_is_visible_in_later_commands() {
    let mut h = Host::start();
    // Before any Sync: unset.
    let r = h.run(1, shell(r#"echo "${CAPSULE_ID-unset}""#));
    assert_eq!(r.stdout_str(), "unset\n");

    let r = h.request(2, &sync_env(&[("CAPSULE_ID", "cap-123"), ("ZONE", "a")]));
    assert_eq!(r.frames, vec![Message::Ack]);
    assert_eq!(
        h.run(3, shell("echo $CAPSULE_ID")).stdout_str(),
        "cap-123\n"
    );

    // The request's own env overrides it; clear_env keeps it.
    let mut req = shell(r#"printf '%s|%s' "$CAPSULE_ID" "$ZONE""#);
    req.env = vec![("ZONE".into(), "b".into())];
    assert_eq!(h.run(4, req).stdout_str(), "cap-123|b");
    let mut req = shell(r#"printf '%s|%s' "$CAPSULE_ID" "${HOME-unset}""#);
    req.clear_env = true;
    assert_eq!(h.run(5, req).stdout_str(), "cap-123|unset");

    // Pipelined: a Run sent right after a Sync, without waiting for its Ack,
    // sees the new variables, which replace the old ones.
    h.send(6, &sync_env(&[("CAPSULE_ID", "cap-456")]));
    h.send(
        7,
        &Message::Run(shell(r#"echo "$CAPSULE_ID ${ZONE-unset}""#)),
    );
    let mut replies = h.collect(&[6, 7]);
    assert_eq!(replies.remove(&6).unwrap().frames, vec![Message::Ack]);
    assert_eq!(replies.remove(&7).unwrap().stdout_str(), "cap-456 unset\n");
}

#[test]
fn sync_env_outlasts_the_connection() {
    let config = ServeConfig::default();
    let mut h = Host::start_with(config.clone());
    assert_eq!(
        h.request(1, &sync_env(&[("CAPSULE_ID", "kept")])).frames,
        vec![Message::Ack]
    );
    assert_eq!(h.close().unwrap(), ServeOutcome::Closed);
    assert_eq!(
        config.sync_env.get(),
        vec![("CAPSULE_ID".into(), "kept".into())]
    );
    // PID 1 serves its next connection with the same config.
    let mut h = Host::start_with(config);
    assert_eq!(h.run(1, shell("echo $CAPSULE_ID")).stdout_str(), "kept\n");
}

#[test]
fn bad_syncs_are_refused() {
    let mut h = Host::start();
    // Reserved id 0.
    assert_eq!(
        h.expect_error(CONTROL_ID, &sync_env(&[("A", "1")])).code,
        ErrorCode::INVALID_ARGUMENT
    );
    // Too much entropy does not decode: nothing is applied.
    let over = Message::Sync(SyncRequest {
        realtime_ns: 0,
        entropy: vec![0; MAX_SYNC_ENTROPY + 1],
        env: vec![("A".into(), "2".into())],
    });
    let e = h.expect_error(3, &over);
    assert_eq!(e.code, ErrorCode::MALFORMED);
    assert!(e.code.ends_request());
    let r = h.run(4, shell(r#"echo "${A-unset}""#));
    assert_eq!(r.stdout_str(), "unset\n");
}

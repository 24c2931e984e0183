//! `agent_frame_host` and `agent_frame_guest` seeds: conversations in the agent protocol,
//! encoded by `capsule_agent_protocol::encode`.

use capsule_agent_protocol::{
    caps, decode_frame, encode, Command, DirEntry, ErrorCode, ExitInfo, ExitStatus, FileInfo,
    FileType, Hello, Message, ProcessEntry, RunRequest, SetAttr, SyncRequest, WindowSize,
    WriteFile, CONTROL_ID, PROTOCOL_VERSION, STREAM_WINDOW,
};

use crate::Seed;

/// The frames, each on its id, back to back.
fn frames(messages: &[(u32, Message)]) -> Vec<u8> {
    messages.iter().flat_map(|(id, m)| encode(m, *id)).collect()
}

fn exit(status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> ExitInfo {
    ExitInfo {
        status,
        duration_us: 1234,
        timed_out: false,
        stdout_truncated: false,
        stderr_truncated: false,
        stdout: stdout.to_vec(),
        stderr: stderr.to_vec(),
    }
}

/// What an agent sends the host.
pub fn host_seeds() -> Result<Vec<Seed>, String> {
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "capsule-agent 0.1.0".into(),
        capabilities: caps::RUN | caps::STREAM | caps::SYNC | caps::PTY | caps::PROCESSES,
    });
    let killed = ExitInfo {
        timed_out: true,
        stdout_truncated: true,
        ..exit(ExitStatus::Signal(9), b"", b"")
    };
    let listing = Message::DirListing {
        entries: vec![
            DirEntry {
                name: "bin".into(),
                file_type: FileType::Dir,
                size: 4096,
                mode: 0o40755,
            },
            DirEntry {
                name: "init".into(),
                file_type: FileType::File,
                size: 812_345,
                mode: 0o100755,
            },
            DirEntry {
                name: "sh".into(),
                file_type: FileType::Symlink,
                size: 7,
                mode: 0o120777,
            },
        ],
        truncated: false,
    };
    Ok(vec![
        Seed::new("hello", frames(&[(CONTROL_ID, hello)])),
        Seed::new(
            "buffered-run",
            frames(&[
                (1, Message::Started { pid: 42 }),
                (1, Message::Exit(exit(ExitStatus::Code(0), b"hello\n", b""))),
            ]),
        ),
        Seed::new(
            "streamed-run-killed",
            frames(&[
                (2, Message::Started { pid: 43 }),
                (2, Message::Stdout(b"partial out".to_vec())),
                (2, Message::Stderr(b"warning\n".to_vec())),
                (2, Message::Exit(killed)),
            ]),
        ),
        Seed::new(
            "pong-and-errors",
            frames(&[
                (3, Message::Pong(b"are you there".to_vec())),
                (4, Message::error(ErrorCode::SPAWN_FAILED, "no such file")),
                (
                    CONTROL_ID,
                    Message::error(ErrorCode::MALFORMED, "bad frame"),
                ),
            ]),
        ),
        Seed::new(
            "sync-ack-and-error",
            frames(&[
                (8, Message::Ack),
                (
                    9,
                    Message::error(
                        ErrorCode::IO,
                        "sync: setting CLOCK_REALTIME: Operation not permitted (os error 1)",
                    ),
                ),
            ]),
        ),
        Seed::new(
            "file-replies",
            frames(&[
                (5, Message::Ack),
                (
                    6,
                    Message::FileData {
                        data: b"root:x:0:0".to_vec(),
                        eof: true,
                    },
                ),
                (7, listing),
            ]),
        ),
        Seed::new(
            "process-list-and-attach",
            frames(&[
                (
                    10,
                    Message::ProcessList(vec![
                        ProcessEntry {
                            pid: 57,
                            command: "python3 -m http.server".into(),
                            started_at_unix_ms: 1_767_225_600_123,
                        },
                        ProcessEntry {
                            pid: 91,
                            command: "sleep 100".into(),
                            started_at_unix_ms: 1_767_225_601_000,
                        },
                    ]),
                ),
                (
                    4,
                    Message::error(ErrorCode::DETACHED, "process 57 was attached elsewhere"),
                ),
                (11, Message::Started { pid: 57 }),
                (11, Message::Stdout(b"GET / 200\n".to_vec())),
                (11, Message::Exit(exit(ExitStatus::Signal(15), b"", b""))),
                (
                    12,
                    Message::error(ErrorCode::NO_SUCH_PROCESS, "no process 4242"),
                ),
                (13, Message::error(ErrorCode::UNKNOWN_USER, "no user \"bob\"")),
            ]),
        ),
        Seed::new(
            "pty-session",
            frames(&[
                (14, Message::Started { pid: 120 }),
                (14, Message::Stdout(b"\x1b[1;32m# \x1b[0m".to_vec())),
                (14, Message::Stdout(b"stty size\r\n24 80\r\n".to_vec())),
                (14, Message::Exit(exit(ExitStatus::Code(0), b"", b""))),
            ]),
        ),
        Seed::new("stat-entries-and-file-errors", stat_replies()),
    ])
}

/// A `Stat` listing in two `Entries` frames, a `Stat` of one path, and the file errors.
fn stat_replies() -> Vec<u8> {
    let entry = |path: &str, file_type, size, mode, target: Option<&str>| FileInfo {
        path: path.into(),
        file_type,
        size,
        mode,
        uid: 0,
        gid: 0,
        modified_ms: 1_767_225_600_123,
        symlink_target: target.map(Into::into),
    };
    frames(&[
        (
            10,
            Message::Entries {
                entries: vec![
                    entry("bin", FileType::Dir, 4096, 0o40755, None),
                    entry("bin/sh", FileType::Symlink, 7, 0o120777, Some("busybox")),
                ],
                more: true,
            },
        ),
        (
            10,
            Message::Entries {
                entries: vec![entry("init", FileType::File, 812_345, 0o100755, None)],
                more: false,
            },
        ),
        (
            11,
            Message::Entries {
                entries: vec![FileInfo {
                    uid: 1000,
                    gid: 100,
                    modified_ms: -1,
                    ..entry("", FileType::File, 3, 0o100600, None)
                }],
                more: false,
            },
        ),
        (
            12,
            Message::error(
                ErrorCode::NOT_FOUND,
                "open: No such file or directory (os error 2)",
            ),
        ),
        (
            13,
            Message::error(
                ErrorCode::NO_SPACE,
                "write: No space left on device (os error 28)",
            ),
        ),
        (
            14,
            Message::error(
                ErrorCode::IS_A_DIRECTORY,
                "read: Is a directory (os error 21)",
            ),
        ),
        (15, Message::Ack),
    ])
}

/// What the host sends an agent; the first byte is the target's chunk size.
pub fn guest_seeds() -> Result<Vec<Seed>, String> {
    let exec = RunRequest {
        command: Command::Exec {
            program: "/bin/cat".into(),
            args: vec!["-n".into(), "-".into()],
        },
        env: vec![("LANG".into(), "C".into()), ("HOME".into(), "/root".into())],
        clear_env: true,
        cwd: Some("/tmp".into()),
        timeout_ms: 5000,
        stdout_limit: 4096,
        stderr_limit: 1024,
        stream: true,
        stdin: true,
        user: None,
        pty: None,
    };
    let pty = RunRequest {
        command: Command::Exec {
            program: "/bin/sh".into(),
            args: vec!["-i".into()],
        },
        stream: true,
        stdin: true,
        stdout_limit: u32::MAX,
        stderr_limit: u32::MAX,
        user: Some("app".into()),
        pty: Some(WindowSize { rows: 24, cols: 80 }),
        ..RunRequest::shell("")
    };
    // After a snapshot restore: set the clock, reseed, name the capsule, run.
    let sync = SyncRequest {
        realtime_ns: 1_767_225_600_123_456_789,
        entropy: (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect(),
        env: vec![
            ("CAPSULE_ID".into(), "cap-0123".into()),
            ("CAPSULE_CLONE".into(), "1".into()),
        ],
    };
    let chunked = |chunk: u8, bytes: Vec<u8>| [vec![chunk], bytes].concat();
    Ok(vec![
        Seed::new(
            "run-shell",
            chunked(
                7,
                frames(&[(1, Message::Run(RunRequest::shell("echo hello")))]),
            ),
        ),
        Seed::new(
            "run-exec-with-stdin",
            chunked(
                3,
                frames(&[
                    (2, Message::Run(exec)),
                    (2, Message::Stdin(b"line one\nline two\n".to_vec())),
                    (2, Message::CloseStdin),
                    (2, Message::Signal { sig: 15 }),
                ]),
            ),
        ),
        Seed::new(
            "sync-then-run",
            chunked(
                5,
                frames(&[
                    (7, Message::Sync(sync)),
                    (8, Message::Run(RunRequest::shell("echo $CAPSULE_ID"))),
                    (9, Message::Sync(SyncRequest::default())),
                ]),
            ),
        ),
        Seed::new(
            "pty-run-resize",
            chunked(
                9,
                frames(&[
                    (20, Message::Run(pty)),
                    (20, Message::Stdin(b"stty size\n".to_vec())),
                    (20, Message::Credit { bytes: 65536 }),
                    (20, Message::Resize(WindowSize { rows: 50, cols: 132 })),
                    (20, Message::CloseStdin),
                ]),
            ),
        ),
        Seed::new(
            "hold-release-sync",
            chunked(
                2,
                frames(&[
                    (23, Message::Hold),
                    (24, Message::ListProcesses),
                    (25, Message::Release),
                    (26, Message::Hold),
                    (27, Message::Sync(SyncRequest::default())),
                ]),
            ),
        ),
        Seed::new(
            "list-attach-credit",
            chunked(
                4,
                frames(&[
                    (21, Message::ListProcesses),
                    (22, Message::Attach { pid: 57 }),
                    (22, Message::Credit { bytes: STREAM_WINDOW }),
                    (22, Message::Signal { sig: 9 }),
                ]),
            ),
        ),
        Seed::new(
            "ping",
            chunked(31, frames(&[(3, Message::Ping(b"are you there".to_vec()))])),
        ),
        Seed::new(
            "file-requests",
            chunked(
                16,
                frames(&[
                    (
                        4,
                        Message::WriteFile(WriteFile {
                            path: "/tmp/x".into(),
                            mode: 0o644,
                            truncate: true,
                            append: false,
                            data: b"contents".to_vec(),
                        }),
                    ),
                    (
                        5,
                        Message::ReadFile {
                            path: "/etc/passwd".into(),
                            offset: 0,
                            len: 65536,
                        },
                    ),
                    (6, Message::ListDir { path: "/".into() }),
                ]),
            ),
        ),
        Seed::new(
            "file-tree-requests",
            chunked(
                12,
                frames(&[
                    (
                        10,
                        Message::Stat {
                            path: "/".into(),
                            depth: 2,
                        },
                    ),
                    (
                        11,
                        Message::MakeDir {
                            path: "/tmp/a/b".into(),
                            mode: 0o755,
                            parents: true,
                        },
                    ),
                    (
                        12,
                        Message::SetAttr(SetAttr {
                            path: "/tmp/.x.tmp".into(),
                            mode: Some(0o640),
                            uid: Some(1000),
                            gid: None,
                        }),
                    ),
                    (
                        13,
                        Message::Rename {
                            from: "/tmp/.x.tmp".into(),
                            to: "/tmp/x".into(),
                        },
                    ),
                    (
                        14,
                        Message::Remove {
                            path: "/tmp/a".into(),
                            recursive: true,
                        },
                    ),
                ]),
            ),
        ),
    ])
}

/// Every byte of `data` is consumed by frames that decode.
fn all_frames_decode(mut data: &[u8]) -> Result<(), String> {
    if data.is_empty() {
        return Err("no frames".into());
    }
    while !data.is_empty() {
        match decode_frame(data) {
            Ok(Some((_, used))) => data = &data[used..],
            Ok(None) => return Err(format!("{} bytes of an incomplete frame", data.len())),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// A host-target seed is a whole number of valid frames.
pub fn check_host(data: &[u8]) -> Result<(), String> {
    all_frames_decode(data)
}

/// A guest-target seed is a chunk-size byte, then a whole number of valid frames.
pub fn check_guest(data: &[u8]) -> Result<(), String> {
    all_frames_decode(data.get(1..).unwrap_or_default())
}

//! Encoding/decoding tests, including deterministic random-input robustness.

use capsule_agent_protocol::*;

fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            capabilities: caps::RUN | caps::STREAM,
        }),
        Message::Ping(b"abc".to_vec()),
        Message::Pong(vec![]),
        Message::error(ErrorCode::SPAWN_FAILED, "no such file"),
        Message::Ack,
        Message::Sync(SyncRequest {
            realtime_ns: 1_767_225_600_123_456_789,
            entropy: (0..=255).collect(),
            env: vec![
                ("CAPSULE_ID".into(), "cap-1".into()),
                ("EMPTY".into(), String::new()),
            ],
        }),
        Message::Sync(SyncRequest::default()),
        Message::Hold,
        Message::Release,
        Message::Sync(SyncRequest {
            realtime_ns: 0,
            entropy: vec![0xa5; MAX_SYNC_ENTROPY],
            env: vec![],
        }),
        Message::Run(RunRequest {
            command: Command::Exec {
                program: "ls".into(),
                args: vec!["-l".into(), "/".into()],
            },
            env: vec![("A".into(), "1".into()), ("B".into(), "ü".into())],
            clear_env: true,
            cwd: Some("/tmp".into()),
            timeout_ms: 1234,
            stdout_limit: 10,
            stderr_limit: 20,
            stream: true,
            stdin: true,
            user: Some("nobody".into()),
            pty: Some(WindowSize { rows: 24, cols: 80 }),
        }),
        Message::Run(RunRequest::shell("echo hi")),
        Message::Run(RunRequest {
            user: Some(String::new()),
            ..RunRequest::shell("")
        }),
        Message::Run(RunRequest {
            pty: Some(WindowSize {
                rows: u16::MAX,
                cols: 0,
            }),
            ..RunRequest::shell("sh")
        }),
        Message::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
        Message::ListProcesses,
        Message::Attach { pid: 4242 },
        Message::Credit { bytes: 262_144 },
        Message::ChannelTest {
            len: 100 << 20,
            to_agent: false,
        },
        Message::ChannelTest {
            len: u64::MAX,
            to_agent: true,
        },
        Message::ProcessList(vec![]),
        Message::ProcessList(vec![
            ProcessEntry {
                pid: 7,
                command: "sleep 100".into(),
                started_at_unix_ms: 1_767_225_600_123,
            },
            ProcessEntry {
                pid: 9,
                command: String::new(),
                started_at_unix_ms: 0,
            },
        ]),
        Message::Stdin(vec![0, 1, 2]),
        Message::CloseStdin,
        Message::Signal { sig: 15 },
        Message::Started { pid: 42 },
        Message::Stdout(b"out".to_vec()),
        Message::Stderr(b"err".to_vec()),
        Message::Exit(ExitInfo {
            status: ExitStatus::Signal(9),
            duration_us: 99,
            timed_out: true,
            stdout_truncated: false,
            stderr_truncated: true,
            stdout: b"o".to_vec(),
            stderr: b"e".to_vec(),
        }),
        Message::Exit(ExitInfo {
            status: ExitStatus::Code(-1),
            duration_us: 0,
            timed_out: false,
            stdout_truncated: false,
            stderr_truncated: false,
            stdout: vec![],
            stderr: vec![],
        }),
        Message::ReadFile {
            path: "/etc/hosts".into(),
            offset: 7,
            len: 4096,
        },
        Message::WriteFile(WriteFile {
            path: "/tmp/x".into(),
            mode: 0o644,
            truncate: true,
            append: false,
            data: b"data".to_vec(),
        }),
        Message::ListDir { path: "/".into() },
        Message::FileData {
            data: b"xyz".to_vec(),
            eof: true,
        },
        Message::DirListing {
            entries: vec![DirEntry {
                name: "a".into(),
                file_type: FileType::Symlink,
                size: 3,
                mode: 0o120777,
            }],
            truncated: false,
        },
        Message::Stat {
            path: "/tmp".into(),
            depth: 3,
        },
        Message::Remove {
            path: "/tmp/d".into(),
            recursive: true,
        },
        Message::MakeDir {
            path: "/tmp/a/b".into(),
            mode: 0o755,
            parents: true,
        },
        Message::Rename {
            from: "/tmp/.x.tmp".into(),
            to: "/tmp/x".into(),
        },
        Message::SetAttr(SetAttr {
            path: "/tmp/x".into(),
            mode: Some(0o4750),
            uid: None,
            gid: Some(100),
        }),
        Message::SetAttr(SetAttr {
            path: "/".into(),
            mode: None,
            uid: None,
            gid: None,
        }),
        Message::Entries {
            entries: vec![
                FileInfo {
                    path: "sub/link".into(),
                    file_type: FileType::Symlink,
                    size: 9,
                    mode: 0o120777,
                    uid: 1000,
                    gid: 1000,
                    modified_ms: 1_767_225_600_123,
                    symlink_target: Some("../target".into()),
                },
                FileInfo {
                    path: String::new(),
                    file_type: FileType::Dir,
                    size: 4096,
                    mode: 0o40755,
                    uid: 0,
                    gid: 0,
                    modified_ms: -1,
                    symlink_target: None,
                },
            ],
            more: true,
        },
        Message::Entries {
            entries: vec![],
            more: false,
        },
        Message::error(ErrorCode::NO_SPACE, "No space left on device (os error 28)"),
    ]
}

#[test]
fn roundtrip_every_message() {
    for (i, m) in samples().into_iter().enumerate() {
        let id = i as u32 * 7 + 1;
        let bytes = encode(&m, id);
        let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            frame,
            Frame {
                id,
                message: m.clone()
            }
        );
        assert_eq!(try_encode(&m, id).unwrap(), bytes);
        // Every proper prefix is incomplete, not an error.
        for cut in 0..bytes.len() {
            assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn hello_bytes_are_as_documented() {
    let m = Message::Hello(Hello {
        protocol_version: 1,
        agent_version: "v".into(),
        capabilities: 0x21,
    });
    let bytes = encode(&m, 0);
    let expected: Vec<u8> = [
        &[22, 0, 0, 0][..],           // len = 5 + 17
        &[0x01],                      // kind
        &[0, 0, 0, 0],                // id
        &[1, 0, 0, 0],                // protocol_version
        &[1, 0, 0, 0, b'v'],          // agent_version
        &[0x21, 0, 0, 0, 0, 0, 0, 0], // capabilities
    ]
    .concat();
    assert_eq!(bytes, expected);
}

#[test]
fn sync_bytes_are_as_documented() {
    let m = Message::Sync(SyncRequest {
        realtime_ns: 0x0102_0304_0506_0708,
        entropy: vec![0xaa, 0xbb],
        env: vec![("K".into(), "vw".into())],
    });
    let bytes = encode(&m, 3);
    let expected: Vec<u8> = [
        &[34, 0, 0, 0][..],                          // len = 5 + 29
        &[0x06],                                     // kind
        &[3, 0, 0, 0],                               // id
        &[8, 7, 6, 5, 4, 3, 2, 1],                   // realtime_ns
        &[2, 0, 0, 0, 0xaa, 0xbb],                   // entropy
        &[1, 0, 0, 0],                               // env: one pair
        &[1, 0, 0, 0, b'K', 2, 0, 0, 0, b'v', b'w'], // ("K", "vw")
    ]
    .concat();
    assert_eq!(bytes, expected);
    assert_eq!(Kind::Sync as u8, 0x06);
    assert_eq!(m.kind(), Kind::Sync);

    // Nothing to do: clock untouched, no entropy, no variables.
    let empty = encode(&Message::Sync(SyncRequest::default()), 1);
    let expected: Vec<u8> = [
        &[21, 0, 0, 0][..],        // len = 5 + 16
        &[0x06],                   // kind
        &[1, 0, 0, 0],             // id
        &[0, 0, 0, 0, 0, 0, 0, 0], // realtime_ns = 0
        &[0, 0, 0, 0],             // entropy: empty
        &[0, 0, 0, 0],             // env: empty
    ]
    .concat();
    assert_eq!(empty, expected);
}

#[test]
fn version_3_bytes_are_as_documented() {
    // Run: the version 2 payload, then `user: option<string>`, then
    // `pty: option<(rows: u16, cols: u16)>`.
    let run = RunRequest {
        user: Some("ab".into()),
        pty: Some(WindowSize { rows: 24, cols: 80 }),
        ..RunRequest::shell("x")
    };
    let bytes = encode(&Message::Run(run), 2);
    let expected: Vec<u8> = [
        &[47, 0, 0, 0][..],           // len = 5 + 42
        &[0x10],                      // kind
        &[2, 0, 0, 0],                // id
        &[0, 1, 0, 0, 0, b'x'],       // command: shell "x"
        &[0, 0, 0, 0],                // env: empty
        &[0],                         // clear_env
        &[0],                         // cwd: none
        &[0, 0, 0, 0, 0, 0, 0, 0],    // timeout_ms
        &[0, 0, 0x10, 0],             // stdout_limit = 1 MiB
        &[0, 0, 0x10, 0],             // stderr_limit
        &[0, 0],                      // stream, stdin
        &[1, 2, 0, 0, 0, b'a', b'b'], // user: some "ab"
        &[1, 24, 0, 80, 0],           // pty: some (24, 80)
    ]
    .concat();
    assert_eq!(bytes, expected);

    let frame = |kind: u8, id: u8, payload: &[u8]| -> Vec<u8> {
        let len = (5 + payload.len()) as u32;
        [&len.to_le_bytes()[..], &[kind, id, 0, 0, 0], payload].concat()
    };
    assert_eq!(
        encode(
            &Message::Resize(WindowSize {
                rows: 40,
                cols: 0x102
            }),
            3
        ),
        frame(0x14, 3, &[40, 0, 2, 1])
    );
    assert_eq!(encode(&Message::ListProcesses, 4), frame(0x15, 4, &[]));
    assert_eq!(
        encode(&Message::Attach { pid: 0x0102 }, 5),
        frame(0x16, 5, &[2, 1, 0, 0])
    );
    assert_eq!(
        encode(&Message::Credit { bytes: 65536 }, 6),
        frame(0x17, 6, &[0, 0, 1, 0])
    );
    let list = Message::ProcessList(vec![ProcessEntry {
        pid: 7,
        command: "sh".into(),
        started_at_unix_ms: 0x0102,
    }]);
    assert_eq!(
        encode(&list, 7),
        frame(
            0x1c,
            7,
            &[
                1, 0, 0, 0, // one entry
                7, 0, 0, 0, // pid
                2, 0, 0, 0, b's', b'h', // command
                2, 1, 0, 0, 0, 0, 0, 0, // started_at_unix_ms
            ]
        )
    );
    // New error codes end their request.
    for code in [
        ErrorCode::NO_SUCH_PROCESS,
        ErrorCode::DETACHED,
        ErrorCode::UNKNOWN_USER,
    ] {
        assert!(code.ends_request(), "{code:?}");
    }
    assert_eq!(PROTOCOL_VERSION, 3);
}

#[test]
fn a_lying_process_list_count_does_not_allocate() {
    // ProcessList claiming 1e9 entries in a 4-byte payload.
    let bytes = [9, 0, 0, 0, 0x1c, 1, 0, 0, 0, 0, 0xca, 0x9a, 0x3b];
    assert!(matches!(
        decode_frame(&bytes),
        Err(DecodeError::Malformed {
            kind: Kind::ProcessList,
            reason: PayloadError::Truncated,
            ..
        })
    ));
    // A pty tag other than 0 or 1 is refused.
    let mut run = encode(&Message::Run(RunRequest::shell("x")), 1);
    let last = run.len() - 1;
    run[last] = 2;
    assert!(matches!(
        decode_frame(&run),
        Err(DecodeError::Malformed {
            reason: PayloadError::InvalidTag(2),
            ..
        })
    ));
}

#[test]
fn file_request_bytes_are_as_documented() {
    let stat = encode(
        &Message::Stat {
            path: "/a".into(),
            depth: 2,
        },
        4,
    );
    let expected: Vec<u8> = [
        &[15, 0, 0, 0][..],        // len = 5 + 10
        &[0x23],                   // kind
        &[4, 0, 0, 0],             // id
        &[2, 0, 0, 0, b'/', b'a'], // path
        &[2, 0, 0, 0],             // depth
    ]
    .concat();
    assert_eq!(stat, expected);

    let set = encode(
        &Message::SetAttr(SetAttr {
            path: "/f".into(),
            mode: Some(0o640),
            uid: None,
            gid: Some(7),
        }),
        5,
    );
    let expected: Vec<u8> = [
        &[22, 0, 0, 0][..],        // len = 5 + 17
        &[0x27],                   // kind
        &[5, 0, 0, 0],             // id
        &[2, 0, 0, 0, b'/', b'f'], // path
        &[1, 0xa0, 0x01, 0, 0],    // mode: some(0o640)
        &[0],                      // uid: none
        &[1, 7, 0, 0, 0],          // gid: some(7)
    ]
    .concat();
    assert_eq!(set, expected);

    for (m, kind) in [
        (
            Message::Remove {
                path: "/x".into(),
                recursive: true,
            },
            0x24,
        ),
        (
            Message::MakeDir {
                path: "/x".into(),
                mode: 0o700,
                parents: false,
            },
            0x25,
        ),
        (
            Message::Rename {
                from: "/x".into(),
                to: "/y".into(),
            },
            0x26,
        ),
    ] {
        assert_eq!(encode(&m, 1)[4], kind);
    }
    assert_eq!(
        encode(
            &Message::Remove {
                path: "/x".into(),
                recursive: true
            },
            1
        )[9..],
        [2, 0, 0, 0, b'/', b'x', 1]
    );
    assert_eq!(
        encode(
            &Message::MakeDir {
                path: "/x".into(),
                mode: 0o700,
                parents: false
            },
            1
        )[9..],
        [2, 0, 0, 0, b'/', b'x', 0xc0, 0x01, 0, 0, 0]
    );
}

#[test]
fn entries_bytes_are_as_documented() {
    let m = Message::Entries {
        entries: vec![FileInfo {
            path: "l".into(),
            file_type: FileType::Symlink,
            size: 1,
            mode: 0o120777,
            uid: 2,
            gid: 3,
            modified_ms: -2,
            symlink_target: Some("t".into()),
        }],
        more: false,
    };
    let expected: Vec<u8> = [
        &[50, 0, 0, 0][..],                                // len = 5 + 45
        &[0x2a],                                           // kind
        &[6, 0, 0, 0],                                     // id
        &[1, 0, 0, 0],                                     // one entry
        &[1, 0, 0, 0, b'l'],                               // path
        &[2],                                              // symlink
        &[1, 0, 0, 0, 0, 0, 0, 0],                         // size
        &[0xff, 0xa1, 0, 0],                               // mode 0o120777
        &[2, 0, 0, 0],                                     // uid
        &[3, 0, 0, 0],                                     // gid
        &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // modified_ms = -2
        &[1, 1, 0, 0, 0, b't'],                            // symlink_target: some("t")
        &[0],                                              // more
    ]
    .concat();
    assert_eq!(encode(&m, 6), expected);

    // A count the payload cannot hold is refused before anything is allocated.
    let mut lying = vec![10, 0, 0, 0, 0x2a, 6, 0, 0, 0];
    lying.extend(1_000_000u32.to_le_bytes());
    lying.push(0);
    assert!(matches!(
        decode_frame(&lying),
        Err(DecodeError::Malformed {
            reason: PayloadError::Truncated,
            ..
        })
    ));
    // Bad option and type tags.
    let mut bad = expected.clone();
    let tag = bad.len() - 7;
    bad[tag] = 2;
    assert!(matches!(
        decode_frame(&bad),
        Err(DecodeError::Malformed {
            reason: PayloadError::InvalidTag(2),
            ..
        })
    ));
    let mut bad = expected;
    bad[18] = 4;
    assert!(matches!(
        decode_frame(&bad),
        Err(DecodeError::Malformed {
            reason: PayloadError::InvalidTag(4),
            ..
        })
    ));
}

#[test]
fn file_error_codes_end_their_request() {
    for code in [
        ErrorCode::NOT_FOUND,
        ErrorCode::IS_A_DIRECTORY,
        ErrorCode::NOT_A_DIRECTORY,
        ErrorCode::PERMISSION_DENIED,
        ErrorCode::NO_SPACE,
        ErrorCode::ALREADY_EXISTS,
        ErrorCode::DIRECTORY_NOT_EMPTY,
    ] {
        assert!((32..=47).contains(&code.0), "{code:?}");
        assert!(code.ends_request(), "{code:?}");
    }
}

#[test]
fn sync_entropy_over_the_limit_does_not_decode() {
    let frame = |n: usize| {
        encode(
            &Message::Sync(SyncRequest {
                realtime_ns: 1,
                entropy: vec![7; n],
                env: vec![("A".into(), "b".into())],
            }),
            9,
        )
    };
    let at_limit = frame(MAX_SYNC_ENTROPY);
    let (f, _) = decode_frame(&at_limit).unwrap().unwrap();
    assert!(matches!(f.message, Message::Sync(s) if s.entropy.len() == MAX_SYNC_ENTROPY));

    let over = frame(MAX_SYNC_ENTROPY + 1);
    let e = decode_frame(&over).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Malformed {
            kind: Kind::Sync,
            id: 9,
            reason: PayloadError::TooLong {
                len: MAX_SYNC_ENTROPY + 1,
                max: MAX_SYNC_ENTROPY
            }
        }
    );
    assert!(!e.is_fatal());
    assert_eq!(e.error_code(), ErrorCode::MALFORMED);

    // A huge length is refused as too long before the bytes are looked for,
    // and the streaming decoder skips just that frame.
    let mut lying = vec![17, 0, 0, 0, Kind::Sync as u8, 4, 0, 0, 0];
    lying.extend([0; 8]);
    lying.extend(u32::MAX.to_le_bytes());
    let mut dec = FrameDecoder::new();
    dec.push(&lying);
    dec.push(&over);
    dec.push(&encode(&Message::Ack, 5));
    assert!(matches!(
        dec.next_frame(),
        Err(DecodeError::Malformed {
            id: 4,
            reason: PayloadError::TooLong { .. },
            ..
        })
    ));
    assert!(matches!(
        dec.next_frame(),
        Err(DecodeError::Malformed { id: 9, .. })
    ));
    assert_eq!(
        dec.next_frame(),
        Ok(Some(Frame {
            id: 5,
            message: Message::Ack
        }))
    );
}

#[test]
fn kind_bytes_roundtrip() {
    let mut known = 0;
    for b in 0..=u8::MAX {
        if let Some(k) = Kind::from_u8(b) {
            assert_eq!(k as u8, b);
            known += 1;
        }
    }
    assert_eq!(known, 33);
    // The file kinds: requests 0x20..=0x27, replies from 0x28.
    assert_eq!(Kind::from_u8(0x23), Some(Kind::Stat));
    assert_eq!(Kind::from_u8(0x27), Some(Kind::SetAttr));
    assert_eq!(Kind::from_u8(0x2a), Some(Kind::Entries));
    assert!((0x2b..=0x2f).all(|b| Kind::from_u8(b).is_none()));
    assert_eq!(Kind::from_u8(0x06), Some(Kind::Sync));
    assert_eq!(Kind::from_u8(0x14), Some(Kind::Resize));
    assert_eq!(Kind::from_u8(0x15), Some(Kind::ListProcesses));
    assert_eq!(Kind::from_u8(0x16), Some(Kind::Attach));
    assert_eq!(Kind::from_u8(0x17), Some(Kind::Credit));
    assert_eq!(Kind::from_u8(0x1c), Some(Kind::ProcessList));
    // The rest of the process-event range, and the file range the other
    // requests will use, stay reserved.
    assert!((0x1d..=0x1f).all(|b| Kind::from_u8(b).is_none()));
    // Holding for a snapshot; the rest of the connection-control range stays reserved.
    assert_eq!(Kind::from_u8(0x07), Some(Kind::Hold));
    assert_eq!(Kind::from_u8(0x08), Some(Kind::Release));
    assert_eq!(encode(&Message::Hold, 2), [5, 0, 0, 0, 0x07, 2, 0, 0, 0]);
    assert!((0x09..=0x0f).all(|b| Kind::from_u8(b).is_none()));
    // The one experimental kind; the rest of that range stays reserved.
    assert_eq!(Kind::from_u8(0x80), Some(Kind::ChannelTest));
    assert!((0x81..=0xff).all(|b| Kind::from_u8(b).is_none()));
}

#[test]
fn streaming_decoder_byte_by_byte() {
    let msgs = samples();
    let mut stream = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        stream.extend(encode(m, i as u32));
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b));
        while let Some(f) = dec.next_frame().unwrap() {
            got.push(f.message);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered_len(), 0);
}

#[test]
fn raw_bytes_after_a_channel_test_frame_are_discarded() {
    // A channel test frame, 5 raw bytes (two with it, three later), then a frame again.
    let mut dec = FrameDecoder::new();
    let mut first = encode(
        &Message::ChannelTest {
            len: 5,
            to_agent: false,
        },
        3,
    );
    first.extend([0xff, 0xff]);
    dec.push(&first);
    assert!(matches!(
        dec.next_frame().unwrap().unwrap().message,
        Message::ChannelTest { len: 5, .. }
    ));
    assert_eq!(dec.discard(5), 2);
    assert_eq!(dec.buffered_len(), 0);
    // The other three raw bytes never reach the decoder; framing resumes.
    dec.push(&encode(&Message::Ack, 3));
    assert_eq!(dec.discard(0), 0);
    assert_eq!(dec.next_frame().unwrap().unwrap().message, Message::Ack);
}

#[test]
fn bad_length_is_fatal_and_poisons() {
    for len in [0u32, 4, (MAX_FRAME_LEN + 1) as u32, u32::MAX] {
        let mut dec = FrameDecoder::new();
        dec.push(&len.to_le_bytes());
        let e = dec.next_frame().unwrap_err();
        assert_eq!(e, DecodeError::BadLength { len });
        assert!(e.is_fatal());
        assert!(dec.is_poisoned());
        dec.push(&encode(&Message::Ack, 1));
        assert!(dec.next_frame().is_err());
        assert_eq!(dec.buffered_len(), 0);
    }
}

#[test]
fn max_length_header_does_not_allocate_up_front() {
    let mut dec = FrameDecoder::new();
    dec.push(&(MAX_FRAME_LEN as u32).to_le_bytes());
    dec.push(&[Kind::Ping as u8, 1, 0, 0, 0]);
    assert_eq!(dec.next_frame(), Ok(None));
    assert_eq!(dec.buffered_len(), 9);
}

#[test]
fn nonfatal_errors_skip_one_frame() {
    let mut stream = Vec::new();
    // Unknown kind 0x7e with a 3-byte payload.
    stream.extend([8, 0, 0, 0, 0x7e, 5, 0, 0, 0, 1, 2, 3]);
    // Ping with trailing garbage: bytes(len 0) + 1 extra byte.
    stream.extend([10, 0, 0, 0, Kind::Ping as u8, 6, 0, 0, 0, 0, 0, 0, 0, 9]);
    // Run with an invalid bool (`stdin`, before the `user` and `pty` tags).
    let mut run = encode(&Message::Run(RunRequest::shell("x")), 7);
    let stdin = run.len() - 3;
    run[stdin] = 2;
    stream.extend(run);
    // Error with invalid UTF-8.
    stream.extend([
        12,
        0,
        0,
        0,
        Kind::Error as u8,
        8,
        0,
        0,
        0,
        1,
        0,
        1,
        0,
        0,
        0,
        0xff,
    ]);
    // Exit with an invalid status tag.
    stream.extend([6, 0, 0, 0, Kind::Exit as u8, 9, 0, 0, 0, 5]);
    // DirListing claiming 1e9 entries.
    stream.extend([
        9,
        0,
        0,
        0,
        Kind::DirListing as u8,
        10,
        0,
        0,
        0,
        0,
        0xca,
        0x9a,
        0x3b,
    ]);
    stream.extend(encode(&Message::Ping(b"ok".to_vec()), 11));

    let mut dec = FrameDecoder::new();
    dec.push(&stream);
    let mut errors = Vec::new();
    let mut frames = Vec::new();
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => {
                assert!(!e.is_fatal());
                errors.push(e);
            }
        }
    }
    assert_eq!(errors.len(), 6, "{errors:?}");
    assert_eq!(errors[0], DecodeError::UnknownKind { kind: 0x7e, id: 5 });
    assert_eq!(errors[0].error_code(), ErrorCode::UNKNOWN_KIND);
    assert_eq!(
        errors[1],
        DecodeError::Malformed {
            kind: Kind::Ping,
            id: 6,
            reason: PayloadError::TrailingBytes(1)
        }
    );
    assert_eq!(errors[2].request_id(), Some(7));
    assert!(matches!(
        errors[2],
        DecodeError::Malformed {
            reason: PayloadError::InvalidBool(2),
            ..
        }
    ));
    assert!(matches!(
        errors[3],
        DecodeError::Malformed {
            reason: PayloadError::InvalidUtf8,
            ..
        }
    ));
    assert!(matches!(
        errors[4],
        DecodeError::Malformed {
            reason: PayloadError::InvalidTag(5),
            ..
        }
    ));
    assert!(matches!(
        errors[5],
        DecodeError::Malformed {
            reason: PayloadError::Truncated,
            ..
        }
    ));
    assert_eq!(
        frames,
        vec![Frame {
            id: 11,
            message: Message::Ping(b"ok".to_vec())
        }]
    );
}

#[test]
fn oversized_payload_is_refused_by_try_encode() {
    let m = Message::Stdout(vec![0; MAX_PAYLOAD_LEN]);
    assert!(matches!(
        try_encode(&m, 1),
        Err(EncodeError::TooLarge { .. })
    ));
    let mut out = vec![1, 2, 3];
    assert!(encode_into(&m, 1, &mut out).is_err());
    assert_eq!(out, vec![1, 2, 3]);
    // `encode` still produces it, and decoders reject it as fatal.
    let bytes = encode(&m, 1);
    assert!(decode_frame(&bytes).unwrap_err().is_fatal());
    // The largest legal payload is accepted.
    let m = Message::Stdout(vec![7; MAX_PAYLOAD_LEN - 4]);
    let bytes = try_encode(&m, 1).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0.message, m);
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes `bytes` in random chunks; checks that nothing panics and that any
/// frame that decodes re-encodes to the very same bytes (canonical form).
fn exercise(bytes: &[u8], rng: &mut Rng) {
    let mut dec = FrameDecoder::new();
    let mut i = 0;
    while i < bytes.len() {
        let n = 1 + rng.below(64);
        let end = (i + n).min(bytes.len());
        dec.push(&bytes[i..end]);
        i = end;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    let re = encode(&f.message, f.id);
                    assert_eq!(decode_frame(&re).unwrap().unwrap().0, f);
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
    }
    // The one-shot decoder must agree on the first frame.
    if let Ok(Some((f, used))) = decode_frame(bytes) {
        assert_eq!(encode(&f.message, f.id), bytes[..used]);
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = rng.below(200);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Make plausible headers common: small length and a known kind.
        if len >= 9 && rng.below(2) == 0 {
            let l = (len - 4) as u32;
            bytes[..4].copy_from_slice(&l.to_le_bytes());
            let kinds = [
                1u8, 2, 3, 4, 5, 6, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19,
                0x1a, 0x1b, 0x1c, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a,
            ];
            bytes[4] = kinds[rng.below(kinds.len())];
        }
        exercise(&bytes, &mut rng);
    }
}

#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = Rng(42);
    let frames: Vec<Vec<u8>> = samples().iter().map(|m| encode(m, 3)).collect();
    for _ in 0..20_000 {
        let mut bytes = frames[rng.below(frames.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] ^= 1 << rng.below(8),
                _ => {
                    bytes.truncate(at.max(1));
                }
            }
        }
        exercise(&bytes, &mut rng);
    }
}

#[test]
fn a_file_data_frame_finished_in_place_is_the_encoded_message() {
    for (data, eof) in [
        (Vec::new(), true),
        (b"hello".to_vec(), false),
        ((0..=255u8).cycle().take(MAX_CHUNK_LEN).collect(), true),
    ] {
        let mut frame = vec![0xee; DATA_FRAME_PREFIX_LEN];
        frame.extend_from_slice(&data);
        finish_file_data(&mut frame, 42, eof).unwrap();
        assert_eq!(frame, encode(&Message::FileData { data, eof }, 42));
    }
}

#[test]
fn an_output_frame_finished_in_place_is_the_encoded_message() {
    for (data, stderr) in [
        (Vec::new(), false),
        (b"out".to_vec(), false),
        ((0..=255u8).cycle().take(64 * 1024).collect(), true),
    ] {
        let mut frame = vec![0xee; DATA_FRAME_PREFIX_LEN];
        frame.extend_from_slice(&data);
        finish_output(&mut frame, 7, stderr).unwrap();
        let message = if stderr {
            Message::Stderr(data)
        } else {
            Message::Stdout(data)
        };
        assert_eq!(frame, encode(&message, 7));
    }
    let mut short = [3u8; 4];
    assert_eq!(
        finish_output(&mut short, 1, false),
        Err(EncodeError::NoPrefix { len: 4 })
    );
    assert_eq!(short, [3u8; 4]);
}

#[test]
fn a_file_data_frame_without_room_or_too_large_is_refused_and_left_alone() {
    let mut short = vec![1; DATA_FRAME_PREFIX_LEN - 1];
    assert_eq!(
        finish_file_data(&mut short, 1, true),
        Err(EncodeError::NoPrefix {
            len: DATA_FRAME_PREFIX_LEN - 1
        })
    );
    assert_eq!(short, vec![1; DATA_FRAME_PREFIX_LEN - 1]);
    let mut huge = vec![2; DATA_FRAME_PREFIX_LEN + MAX_PAYLOAD_LEN];
    assert!(matches!(
        finish_file_data(&mut huge, 1, true),
        Err(EncodeError::TooLarge { .. })
    ));
    assert_eq!(huge.len(), DATA_FRAME_PREFIX_LEN + MAX_PAYLOAD_LEN);
}

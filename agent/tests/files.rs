//! The file requests end to end: `serve` over a socket pair, real files in a temporary
//! directory. Tests that need root (a tiny tmpfs for "no space", a read-only mount for
//! "permission denied", chown to another user) say SKIPPED without it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use capsule_agent_protocol::*;
use common::*;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The entries of a `Stat` reply, checking that only the last frame says `more: false`.
fn entries(r: &Reply) -> Vec<FileInfo> {
    assert!(r.error.is_none(), "{:?}", r.error);
    let mut out = Vec::new();
    let n = r.frames.len();
    for (i, f) in r.frames.iter().enumerate() {
        match f {
            Message::Entries { entries, more } => {
                assert_eq!(*more, i + 1 < n, "frame {i} of {n}");
                out.extend(entries.iter().cloned());
            }
            other => panic!("expected Entries, got {other:?}"),
        }
    }
    out
}

fn code(r: &Reply) -> ErrorCode {
    r.error
        .as_ref()
        .unwrap_or_else(|| panic!("expected an error, got {:?}", r.frames))
        .code
}

fn stat(h: &mut Host, id: u32, path: &str, depth: u32) -> Reply {
    h.request(
        id,
        &Message::Stat {
            path: path.into(),
            depth,
        },
    )
}

fn write(path: &str, data: &[u8], truncate: bool, append: bool) -> Message {
    Message::WriteFile(WriteFile {
        path: path.into(),
        mode: 0o644,
        truncate,
        append,
        data: data.to_vec(),
    })
}

#[test]
fn stat_describes_files_directories_and_links_without_following_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"12345").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
    let mut h = Host::start();

    let e = entries(&stat(&mut h, 1, &s(&file), 0));
    assert_eq!(e.len(), 1);
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!(e[0].path, "");
    assert_eq!(e[0].file_type, FileType::File);
    assert_eq!(e[0].size, 5);
    assert_eq!(e[0].mode, 0o100640);
    assert_eq!((e[0].uid, e[0].gid), (md.uid(), md.gid()));
    let mtime_ms = md.mtime() * 1000 + md.mtime_nsec() / 1_000_000;
    assert_eq!(e[0].modified_ms, mtime_ms);
    assert_eq!(e[0].symlink_target, None);

    let e = entries(&stat(&mut h, 2, &s(&dir.path().join("l")), 0));
    assert_eq!(e[0].file_type, FileType::Symlink);
    assert_eq!(e[0].symlink_target.as_deref(), Some("f"));
    assert_eq!(e[0].size, 1);

    let e = entries(&stat(&mut h, 3, &s(dir.path()), 0));
    assert_eq!(e[0].file_type, FileType::Dir);

    let r = stat(&mut h, 4, &s(&dir.path().join("missing")), 0);
    assert_eq!(code(&r), ErrorCode::NOT_FOUND);
    let r = stat(&mut h, 5, &s(&file.join("below-a-file")), 0);
    assert_eq!(code(&r), ErrorCode::NOT_A_DIRECTORY);
}

#[test]
fn listings_go_down_to_their_depth_sorted_and_each_directory_before_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("b/c/d")).unwrap();
    std::fs::write(root.join("a"), b"a").unwrap();
    std::fs::write(root.join("b/x"), b"xx").unwrap();
    std::fs::write(root.join("b/c/y"), b"yyy").unwrap();
    std::fs::write(root.join("b/c/d/z"), b"zzzz").unwrap();
    // A link to a directory is listed, not entered (no loops).
    std::os::unix::fs::symlink(".", root.join("b/loop")).unwrap();
    let mut h = Host::start();

    let paths = |r: &Reply| -> Vec<String> { entries(r).into_iter().map(|e| e.path).collect() };
    assert_eq!(paths(&stat(&mut h, 1, &s(root), 1)), ["a", "b"]);
    assert_eq!(
        paths(&stat(&mut h, 2, &s(root), 2)),
        ["a", "b", "b/c", "b/loop", "b/x"]
    );
    assert_eq!(
        paths(&stat(&mut h, 3, &s(root), u32::MAX)),
        ["a", "b", "b/c", "b/c/d", "b/c/d/z", "b/c/y", "b/loop", "b/x"]
    );
    let all = entries(&stat(&mut h, 4, &s(root), 10));
    let z = all.iter().find(|e| e.path == "b/c/d/z").unwrap();
    assert_eq!((z.file_type, z.size), (FileType::File, 4));
    let lp = all.iter().find(|e| e.path == "b/loop").unwrap();
    assert_eq!(lp.symlink_target.as_deref(), Some("."));

    // An empty directory: one frame, no entries.
    std::fs::create_dir(root.join("empty")).unwrap();
    let r = stat(&mut h, 5, &s(&root.join("empty")), 3);
    assert_eq!(r.frames.len(), 1);
    assert!(entries(&r).is_empty());
    let r = stat(&mut h, 6, &s(&root.join("a")), 1);
    assert_eq!(code(&r), ErrorCode::NOT_A_DIRECTORY);
    let r = stat(&mut h, 7, &s(&root.join("nope")), 1);
    assert_eq!(code(&r), ErrorCode::NOT_FOUND);
}

#[test]
fn a_large_listing_comes_in_several_frames() {
    let dir = tempfile::tempdir().unwrap();
    // 5000 names of ~100 bytes: about 700 KiB of entries, three frames or more.
    for i in 0..5000 {
        std::fs::write(dir.path().join(format!("{i:05}-{}", "n".repeat(90))), b"").unwrap();
    }
    let mut h = Host::start();
    let r = stat(&mut h, 1, &s(dir.path()), 1);
    assert!(r.frames.len() >= 3, "{} frames", r.frames.len());
    let e = entries(&r);
    assert_eq!(e.len(), 5000);
    assert!(e.windows(2).all(|w| w[0].path < w[1].path));
    for f in &r.frames {
        assert!(encode(f, 1).len() < MAX_CHUNK_LEN);
    }
}

#[test]
fn make_dir_remove_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut h = Host::start();
    let mkdir = |path: &Path, parents: bool| Message::MakeDir {
        path: s(path),
        mode: 0o750,
        parents,
    };

    let deep = root.join("p/q/r");
    assert_eq!(
        code(&h.request(1, &mkdir(&deep, false))),
        ErrorCode::NOT_FOUND
    );
    assert_eq!(h.request(2, &mkdir(&deep, true)).frames, [Message::Ack]);
    assert!(deep.is_dir());
    // An existing directory: fine with parents, refused without.
    assert_eq!(h.request(3, &mkdir(&deep, true)).frames, [Message::Ack]);
    assert_eq!(
        code(&h.request(4, &mkdir(&deep, false))),
        ErrorCode::ALREADY_EXISTS
    );
    std::fs::write(root.join("file"), b"x").unwrap();
    assert_eq!(
        code(&h.request(5, &mkdir(&root.join("file"), true))),
        ErrorCode::ALREADY_EXISTS
    );
    assert_eq!(
        code(&h.request(6, &mkdir(&root.join("file/sub"), true))),
        ErrorCode::NOT_A_DIRECTORY
    );

    let remove = |path: &Path, recursive: bool| Message::Remove {
        path: s(path),
        recursive,
    };
    std::fs::write(deep.join("f"), b"f").unwrap();
    assert_eq!(
        code(&h.request(7, &remove(&root.join("p"), false))),
        ErrorCode::DIRECTORY_NOT_EMPTY
    );
    assert_eq!(
        h.request(8, &remove(&root.join("p"), true)).frames,
        [Message::Ack]
    );
    assert!(!root.join("p").exists());
    assert_eq!(
        code(&h.request(9, &remove(&root.join("p"), true))),
        ErrorCode::NOT_FOUND
    );
    // A link to a directory is removed, not what it points to.
    std::fs::create_dir(root.join("kept")).unwrap();
    std::fs::write(root.join("kept/inside"), b"i").unwrap();
    std::os::unix::fs::symlink(root.join("kept"), root.join("link")).unwrap();
    assert_eq!(
        h.request(10, &remove(&root.join("link"), true)).frames,
        [Message::Ack]
    );
    assert!(root.join("kept/inside").is_file());
    assert_eq!(
        h.request(11, &remove(&root.join("file"), false)).frames,
        [Message::Ack]
    );
    std::fs::create_dir(root.join("empty")).unwrap();
    assert_eq!(
        h.request(12, &remove(&root.join("empty"), false)).frames,
        [Message::Ack]
    );

    let rename = |from: &Path, to: &Path| Message::Rename {
        from: s(from),
        to: s(to),
    };
    std::fs::write(root.join("old"), b"content").unwrap();
    std::fs::write(root.join("target"), b"replaced").unwrap();
    assert_eq!(
        h.request(13, &rename(&root.join("old"), &root.join("target")))
            .frames,
        [Message::Ack]
    );
    assert_eq!(std::fs::read(root.join("target")).unwrap(), b"content");
    assert_eq!(
        code(&h.request(14, &rename(&root.join("old"), &root.join("x")))),
        ErrorCode::NOT_FOUND
    );
    assert_eq!(
        code(&h.request(15, &rename(&root.join("target"), &root.join("kept")))),
        ErrorCode::IS_A_DIRECTORY
    );
}

#[test]
fn set_attr_changes_mode_and_owner() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let mut h = Host::start();
    let set = |mode, uid, gid| {
        Message::SetAttr(SetAttr {
            path: s(&f),
            mode,
            uid,
            gid,
        })
    };
    assert_eq!(
        h.request(1, &set(Some(0o4711), None, None)).frames,
        [Message::Ack]
    );
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o4711);
    let (uid, gid) = if is_root() {
        (1234, 4321)
    } else {
        // SAFETY: no preconditions.
        unsafe { (libc::geteuid(), libc::getegid()) }
    };
    assert_eq!(
        h.request(2, &set(Some(0o600), Some(uid), Some(gid))).frames,
        [Message::Ack]
    );
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (uid, gid, 0o600));
    assert_eq!(h.request(3, &set(None, None, None)).frames, [Message::Ack]);
    let r = h.request(
        4,
        &Message::SetAttr(SetAttr {
            path: s(&dir.path().join("missing")),
            mode: Some(0o600),
            uid: None,
            gid: None,
        }),
    );
    assert_eq!(code(&r), ErrorCode::NOT_FOUND);
    if !is_root() {
        let r = h.request(5, &set(None, Some(0), None));
        assert_eq!(code(&r), ErrorCode::PERMISSION_DENIED);
    }
}

#[test]
fn read_and_write_errors_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start();
    let read = |path: &Path| Message::ReadFile {
        path: s(path),
        offset: 0,
        len: 10,
    };
    assert_eq!(
        code(&h.request(1, &read(dir.path()))),
        ErrorCode::IS_A_DIRECTORY
    );
    assert_eq!(
        code(&h.request(2, &read(&dir.path().join("missing")))),
        ErrorCode::NOT_FOUND
    );
    let r = h.request(3, &write(&s(dir.path()), b"x", true, false));
    assert_eq!(code(&r), ErrorCode::IS_A_DIRECTORY);
    let r = h.request(4, &write(&s(&dir.path().join("no/dir")), b"x", true, false));
    assert_eq!(code(&r), ErrorCode::NOT_FOUND);
    let msg = r.error.unwrap().message;
    assert!(msg.contains("No such file"), "{msg}");
}

#[test]
fn pipelined_writes_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("big"));
    let mut h = Host::start();
    // 64 chunks sent back to back without waiting: each on its own id.
    let chunks: Vec<Vec<u8>> = (0..64u8)
        .map(|i| vec![i; 10_000 + usize::from(i)])
        .collect();
    for (i, c) in chunks.iter().enumerate() {
        h.send(i as u32 + 1, &write(&path, c, i == 0, i > 0));
    }
    let ids: Vec<u32> = (1..=64).collect();
    let replies = h.collect(&ids);
    assert!(replies.values().all(|r| r.frames == [Message::Ack]));
    assert_eq!(std::fs::read(&path).unwrap(), chunks.concat());
}

#[test]
fn reads_at_offsets_report_eof_and_a_chunk_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data: Vec<u8> = (0..MAX_CHUNK_LEN + 100)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    let mut h = Host::start();
    let r = h.request(
        1,
        &Message::ReadFile {
            path: s(&path),
            offset: 0,
            len: u32::MAX,
        },
    );
    match &r.frames[0] {
        Message::FileData { data: d, eof } => {
            assert_eq!(d[..], data[..MAX_CHUNK_LEN]);
            assert!(!eof);
        }
        other => panic!("{other:?}"),
    }
    let r = h.request(
        2,
        &Message::ReadFile {
            path: s(&path),
            offset: MAX_CHUNK_LEN as u64,
            len: MAX_CHUNK_LEN as u32,
        },
    );
    assert_eq!(
        r.frames,
        [Message::FileData {
            data: data[MAX_CHUNK_LEN..].to_vec(),
            eof: true
        }]
    );
    // Past the end: nothing, and EOF.
    let r = h.request(
        3,
        &Message::ReadFile {
            path: s(&path),
            offset: 10 * MAX_CHUNK_LEN as u64,
            len: 10,
        },
    );
    assert_eq!(
        r.frames,
        [Message::FileData {
            data: vec![],
            eof: true
        }]
    );
}

/// Mounts a tmpfs of `size` with `options` on a fresh directory (root only); `None` says why
/// not. Unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_file_system_is_no_space() {
    let Some(fs) = Tmpfs::mount("size=64k") else {
        return;
    };
    let path = s(&fs.path().join("f"));
    let mut h = Host::start();
    let mut last = None;
    for i in 0..10u32 {
        let r = h.request(i + 1, &write(&path, &[7; 32 * 1024], i == 0, i > 0));
        if r.error.is_some() {
            last = Some(code(&r));
            break;
        }
    }
    assert_eq!(last, Some(ErrorCode::NO_SPACE));
}

#[test]
fn a_read_only_file_system_is_permission_denied() {
    let Some(fs) = Tmpfs::mount("size=64k,ro") else {
        return;
    };
    let mut h = Host::start();
    let r = h.request(1, &write(&s(&fs.path().join("f")), b"x", true, false));
    assert_eq!(code(&r), ErrorCode::PERMISSION_DENIED);
    let r = h.request(
        2,
        &Message::MakeDir {
            path: s(&fs.path().join("d")),
            mode: 0o755,
            parents: false,
        },
    );
    assert_eq!(code(&r), ErrorCode::PERMISSION_DENIED);
}

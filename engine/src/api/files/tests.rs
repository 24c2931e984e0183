//! [`Files`] end to end against the real agent, in this process: a capsule whose guest is
//! only an agent serving one end of a socket pair, so "guest" paths are this host's paths
//! (in temporary directories). What needs a real Linux capsule (pause and resume, an engine
//! reopen, the guest's own file systems) is in `tests/linux_files.rs`.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::error::TimeoutKind;
use crate::guest::agent_files::CHUNK;
use crate::guest::agent_link::AgentLink;
use crate::guest::{Frozen, Job, Runtime};
use crate::model::record::{CapsuleRecord, GuestKind};
use crate::model::{EntryKind, Status};

/// A guest that is only an agent link (or none, like the probe).
struct AgentOnly {
    link: Option<Arc<AgentLink>>,
}

impl Runtime for AgentOnly {
    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        Err(job)
    }
    fn max_command_len(&self) -> usize {
        0
    }
    fn freeze(&self) -> Result<Frozen> {
        Err(Error::Unsupported("a test guest".into()))
    }
    fn agent(&self) -> Option<Arc<AgentLink>> {
        self.link.clone()
    }
    fn shutdown(&self) {
        if let Some(link) = &self.link {
            link.close();
        }
    }
}

/// The real agent on one end of a socket pair, a link on the other, and a handle that cuts
/// the connection (as a pause or a crash does).
fn agent_pair() -> (Arc<AgentLink>, UnixStream) {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let reader = guest.try_clone().unwrap();
        let _ = capsule_agent::serve(reader, guest, &capsule_agent::ServeConfig::default());
    });
    let cut = host.try_clone().unwrap();
    let reader = host.try_clone().unwrap();
    let link = AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5))
        .expect("the agent says hello");
    (link, cut)
}

/// A running capsule of `kind` whose guest is `runtime`.
fn capsule_with(kind: GuestKind, runtime: AgentOnly) -> Arc<CapsuleCore> {
    let record = CapsuleRecord {
        id: "cl-files".parse().unwrap(),
        template: kind.template().into(),
        kind,
        vcpus: 1,
        memory_mb: 256,
        timeout: Duration::ZERO,
        created_at: SystemTime::now(),
    };
    let core = CapsuleCore::new(record, Status::Pending);
    core.start().unwrap();
    core.ready(Arc::new(runtime)).unwrap();
    core
}

/// A running "Linux" capsule over the real agent, and the cut handle of its connection.
fn capsule() -> (Arc<CapsuleCore>, UnixStream) {
    let (link, cut) = agent_pair();
    let core = capsule_with(GuestKind::Linux, AgentOnly { link: Some(link) });
    (core, cut)
}

fn s(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// xorshift64*: a deterministic stream of bytes, generated (and checked) without storing it.
struct Noise {
    state: u64,
    left: u64,
    word: [u8; 8],
    at: usize,
}

impl Noise {
    fn new(seed: u64, len: u64) -> Noise {
        Noise {
            state: seed | 1,
            left: len,
            word: [0; 8],
            at: 8,
        }
    }

    fn byte(&mut self) -> u8 {
        if self.at == 8 {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            self.at = 0;
        }
        self.at += 1;
        self.word[self.at - 1]
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut n = Noise::new(seed, len as u64);
        (0..len).map(|_| n.byte()).collect()
    }
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for b in &mut buf[..n] {
            *b = self.byte();
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A writer that checks what it is given against a [`Noise`] stream, byte for byte.
struct Expect {
    noise: Noise,
    seen: u64,
    mismatch: Option<u64>,
}

impl Expect {
    fn new(seed: u64) -> Expect {
        Expect {
            noise: Noise::new(seed, u64::MAX),
            seen: 0,
            mismatch: None,
        }
    }
}

impl Write for Expect {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            if *b != self.noise.byte() && self.mismatch.is_none() {
                self.mismatch = Some(self.seen);
            }
            self.seen += 1;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn file_kind(e: Error) -> FileErrorKind {
    match e {
        Error::File { kind, .. } => kind,
        other => panic!("expected a file error, got {other:?}"),
    }
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn small_files_round_trip_and_every_call_works() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let root = s(dir.path());

    // Parents are created.
    let file = format!("{root}/a/b/hello.txt");
    files.write(&file, "hello").unwrap();
    assert_eq!(files.read(&file).unwrap(), b"hello");
    assert_eq!(files.read_to_string(&file).unwrap(), "hello");
    assert!(files.exists(&file).unwrap());
    assert!(!files.exists(&format!("{root}/a/nope")).unwrap());
    assert!(!files.exists(&format!("{file}/below-a-file")).unwrap());
    assert_eq!(
        std::fs::metadata(dir.path().join("a/b")).unwrap().mode() & 0o777,
        0o755
    );

    let info = files.stat(&file).unwrap();
    assert_eq!(info.name, "hello.txt");
    assert_eq!(info.path, file);
    assert_eq!((info.kind, info.size), (EntryKind::File, 5));
    assert!(info.is_file() && !info.is_dir());
    assert_eq!(info.mode, 0o644 & !umask());
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!((info.uid, info.gid), (md.uid(), md.gid()));
    let age = SystemTime::now().duration_since(info.modified).unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");
    assert_eq!(files.stat("/").unwrap().name, "/");

    files.make_dir(&format!("{root}/a/c/d")).unwrap();
    files.make_dir(&format!("{root}/a/c/d")).unwrap();
    std::os::unix::fs::symlink("b/hello.txt", dir.path().join("a/link")).unwrap();
    let listed: Vec<(String, EntryKind)> = files
        .list(&format!("{root}/a"), 1)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.kind))
        .collect();
    assert_eq!(
        listed,
        [
            ("b".to_string(), EntryKind::Directory),
            ("c".to_string(), EntryKind::Directory),
            ("link".to_string(), EntryKind::Symlink),
        ]
    );
    let deep = files.list(&format!("{root}/"), 10).unwrap();
    let paths: Vec<&str> = deep.iter().map(|e| e.path.as_str()).collect();
    let p = |rel: &str| format!("{root}/{rel}");
    assert_eq!(
        paths,
        [
            p("a"),
            p("a/b"),
            p("a/b/hello.txt"),
            p("a/c"),
            p("a/c/d"),
            p("a/link")
        ]
    );
    let link = deep.iter().find(|e| e.name == "link").unwrap();
    assert_eq!(link.symlink_target.as_deref(), Some("b/hello.txt"));
    assert_eq!(files.stat(&p("a/link")).unwrap().kind, EntryKind::Symlink);

    files.rename(&file, &p("a/c/moved")).unwrap();
    assert!(!files.exists(&file).unwrap());
    assert_eq!(files.read(&p("a/c/moved")).unwrap(), b"hello");
    files.remove(&p("a/c/moved")).unwrap();
    files.remove(&p("a")).unwrap();
    assert!(names(dir.path()).is_empty());
}

fn umask() -> u32 {
    // SAFETY: umask has no preconditions; it is set straight back.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

#[test]
fn random_bytes_round_trip_byte_exact_at_chunk_boundaries() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("data.bin"));
    for (i, len) in [0, 1, 4095, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 123]
        .into_iter()
        .enumerate()
    {
        let data = Noise::bytes(i as u64 + 7, len);
        files.write(&path, &data).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes written");
        assert_eq!(files.read(&path).unwrap(), data, "{len} bytes read");

        let seed = i as u64 + 100;
        let n = files
            .write_from(&path, Noise::new(seed, len as u64))
            .unwrap();
        assert_eq!(n, len as u64);
        let mut expect = Expect::new(seed);
        assert_eq!(files.read_into(&path, &mut expect).unwrap(), len as u64);
        assert_eq!((expect.seen, expect.mismatch), (len as u64, None));
    }
    // No temporary file is left behind.
    assert_eq!(names(dir.path()), ["data.bin"]);
}

#[test]
fn errors_are_typed_and_name_the_guest_path() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let root = s(dir.path());
    std::fs::write(dir.path().join("file"), b"x").unwrap();

    let missing = format!("{root}/missing");
    match files.read(&missing) {
        Err(Error::File {
            path,
            kind: FileErrorKind::NotFound,
            message,
        }) => {
            assert_eq!(path, missing);
            assert!(message.contains("No such file"), "{message}");
            let shown = Error::File {
                path,
                kind: FileErrorKind::NotFound,
                message,
            }
            .to_string();
            assert!(
                shown.contains(&missing) && shown.contains("not found"),
                "{shown}"
            );
        }
        other => panic!("{other:?}"),
    }
    let kind = |r: Result<()>| file_kind(r.unwrap_err());
    assert_eq!(
        file_kind(files.read(&root).unwrap_err()),
        FileErrorKind::IsADirectory
    );
    assert_eq!(kind(files.write(&root, "x")), FileErrorKind::IsADirectory);
    assert_eq!(
        kind(files.write(&format!("{root}/file/x"), "x")),
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        file_kind(files.list(&format!("{root}/file"), 1).unwrap_err()),
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        file_kind(files.list(&missing, 1).unwrap_err()),
        FileErrorKind::NotFound
    );
    assert_eq!(
        file_kind(files.stat(&missing).unwrap_err()),
        FileErrorKind::NotFound
    );
    assert_eq!(kind(files.remove(&missing)), FileErrorKind::NotFound);
    assert_eq!(
        kind(files.rename(&missing, &format!("{root}/x"))),
        FileErrorKind::NotFound
    );
    assert_eq!(
        kind(files.make_dir(&format!("{root}/file"))),
        FileErrorKind::AlreadyExists
    );
    std::fs::create_dir_all(dir.path().join("full/sub")).unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    assert_eq!(
        kind(files.rename(&format!("{root}/empty"), &format!("{root}/full"))),
        FileErrorKind::DirectoryNotEmpty
    );
    std::fs::write(dir.path().join("binary"), [0xff, 0xfe]).unwrap();
    assert_eq!(
        file_kind(files.read_to_string(&format!("{root}/binary")).unwrap_err()),
        FileErrorKind::InvalidData
    );

    for bad in ["relative/path", "", "/with\0nul"] {
        assert!(
            matches!(files.read(bad), Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
    }
    for not_a_file in ["/", "/tmp/", "/tmp/.", "/tmp/.."] {
        assert!(
            matches!(files.write(not_a_file, "x"), Err(Error::InvalidArgument(_))),
            "{not_a_file:?}"
        );
    }
    assert!(matches!(
        files.list(&root, 0),
        Err(Error::InvalidArgument(_))
    ));
    // Nothing was left behind by the failed writes.
    assert_eq!(names(dir.path()), ["binary", "empty", "file", "full"]);
}

#[test]
fn a_replaced_file_keeps_its_mode_and_owner_unless_told_and_links_are_followed() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script");
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o751)).unwrap();
    let (uid, gid) = if is_root() {
        std::os::unix::fs::chown(&path, Some(1234), Some(4321)).unwrap();
        (1234, 4321)
    } else {
        let md = std::fs::metadata(&path).unwrap();
        (md.uid(), md.gid())
    };
    files.write(&s(&path), "new").unwrap();
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o751, uid, gid));
    assert_eq!(std::fs::read(&path).unwrap(), b"new");

    // Options win, and the umask does not apply to them.
    let (new_uid, new_gid) = if is_root() { (7, 8) } else { (uid, gid) };
    files
        .write_with(
            &s(&path),
            "newer",
            WriteOptions::new().mode(0o666).owner(new_uid, new_gid),
        )
        .unwrap();
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o666, new_uid, new_gid)
    );

    // Through a chain of links, relative and absolute: the target is replaced.
    std::os::unix::fs::symlink("script", dir.path().join("l1")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("l1"), dir.path().join("l2")).unwrap();
    files
        .write(&s(&dir.path().join("l2")), "via links")
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"via links");
    assert!(std::fs::symlink_metadata(dir.path().join("l2"))
        .unwrap()
        .file_type()
        .is_symlink());
    // A dangling link: its target is created.
    std::os::unix::fs::symlink("later", dir.path().join("dangling")).unwrap();
    files
        .write(&s(&dir.path().join("dangling")), "made")
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("later")).unwrap(), b"made");
    // A loop of links is refused.
    std::os::unix::fs::symlink("loop-b", dir.path().join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", dir.path().join("loop-b")).unwrap();
    assert_eq!(
        file_kind(
            files
                .write(&s(&dir.path().join("loop-a")), "x")
                .unwrap_err()
        ),
        FileErrorKind::Other
    );
}

#[test]
fn devices_and_fifos_are_written_in_place() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    files
        .write("/dev/null", Noise::bytes(1, 3 * CHUNK))
        .unwrap();
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(files.stat("/dev/null").unwrap().kind, EntryKind::Other);
}

#[test]
fn a_failed_transfer_leaves_the_old_file_whole_and_no_temporary_file() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"the old contents").unwrap();

    /// Gives 3 chunks and a half, then fails.
    struct Failing(Noise);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::other("the source broke")),
                n => Ok(n),
            }
        }
    }
    let err = files
        .write_from(&s(&path), Failing(Noise::new(3, 3 * CHUNK as u64 + 100)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Io { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"the old contents");
    assert_eq!(names(dir.path()), ["f"]);
}

#[test]
fn a_capsule_paused_mid_write_never_shows_a_half_file() {
    let (core, cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"before").unwrap();

    /// Pauses the capsule (status and connection) after 2 MiB, then goes on giving bytes.
    struct PausingAt {
        noise: Noise,
        given: usize,
        pause: Option<Box<dyn FnOnce()>>,
    }
    impl Read for PausingAt {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.given >= 2 * CHUNK {
                if let Some(pause) = self.pause.take() {
                    pause();
                }
            }
            let n = self.noise.read(buf)?;
            self.given += n;
            Ok(n)
        }
    }
    let core2 = core.clone();
    let reader = PausingAt {
        noise: Noise::new(5, 8 * CHUNK as u64),
        given: 0,
        pause: Some(Box::new(move || {
            // What a pause does to the capsule and its agent's channel.
            if let Ok(Some(runtime)) = core2.paused() {
                runtime.shutdown();
            }
            let _ = cut.shutdown(std::net::Shutdown::Both);
        })),
    };
    match files.write_from(&s(&path), reader) {
        Err(Error::InvalidState {
            status: Status::Paused,
            operation,
            ..
        }) => assert_eq!(operation, "write a file"),
        other => panic!("expected InvalidState(paused), got {other:?}"),
    }
    // The final name still has the old contents; the partial bytes are in a hidden
    // temporary file beside it.
    assert_eq!(std::fs::read(&path).unwrap(), b"before");
    let left = names(dir.path());
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left[0].starts_with(".f.capsule-") && left[0].ends_with(".tmp"),
        "{left:?}"
    );
    // A paused capsule takes no file operation.
    assert!(matches!(
        files.read(&s(&path)),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
}

#[test]
fn upload_and_download_copy_host_files() {
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let host = tempfile::tempdir().unwrap();
    let guest = tempfile::tempdir().unwrap();
    let data = Noise::bytes(9, 2 * CHUNK + 17);
    let src = host.path().join("tool");
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();

    let in_guest = guest.path().join("bin/tool");
    assert_eq!(
        files.upload(&src, &s(&in_guest)).unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&in_guest).unwrap(), data);
    assert_eq!(std::fs::metadata(&in_guest).unwrap().mode() & 0o777, 0o755);

    let back = host.path().join("back");
    std::fs::write(&back, b"to be replaced").unwrap();
    assert_eq!(
        files.download(&s(&in_guest), &back).unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // A failed download leaves the host file as it was, and no temporary file.
    let err = files
        .download(&s(&guest.path().join("missing")), &back)
        .unwrap_err();
    assert_eq!(file_kind(err), FileErrorKind::NotFound);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert_eq!(names(host.path()), ["back", "tool"]);

    // Host-side errors are the host's.
    assert!(matches!(
        files.upload(host.path().join("nope"), "/tmp/x"),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        files.upload(host.path(), "/tmp/x"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        files.download(&s(&in_guest), host.path().join("no/such/dir/file")),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        files.download(&s(&in_guest), "/"),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn the_probe_has_no_files() {
    let core = capsule_with(GuestKind::Probe, AgentOnly { link: None });
    let files = Files::new(&core);
    assert!(matches!(
        files.read("/etc/hostname"),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        files.write("/tmp/x", "x"),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(files.list("/", 1), Err(Error::Unsupported(_))));
}

#[test]
fn an_agent_that_does_not_answer_times_out() {
    // A peer that says hello and then reads everything, answering nothing.
    let (host, mut guest) = UnixStream::pair().unwrap();
    let hello = capsule_agent_protocol::Message::Hello(capsule_agent_protocol::Hello {
        protocol_version: capsule_agent_protocol::PROTOCOL_VERSION,
        agent_version: "silent".into(),
        capabilities: 0,
    });
    guest
        .write_all(&capsule_agent_protocol::encode(&hello, 0))
        .unwrap();
    std::thread::spawn(move || std::io::copy(&mut guest, &mut std::io::sink()));
    let reader = host.try_clone().unwrap();
    let link =
        AgentLink::connect(Box::new(reader), Box::new(host), Duration::from_secs(5)).unwrap();
    let core = capsule_with(GuestKind::Linux, AgentOnly { link: Some(link) });
    let files = Files::new(&core).timeout(Duration::from_millis(200));
    match files.read("/etc/hostname") {
        Err(Error::Timeout {
            kind: TimeoutKind::File,
            after,
        }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected a file timeout, got {other:?}"),
    }
}

/// Mounts a tmpfs with `options` on a fresh directory (root only), unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = is_root() && mount(&["-t", "tmpfs", "-o", options, "tmpfs", &s(dir.path())]);
        if !ok {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Bind mounts below first.
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.0.path())
            .status();
    }
}

fn mount(args: &[&str]) -> bool {
    std::process::Command::new("mount")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_full_file_system_is_no_space_and_the_old_file_stays() {
    let Some(fs) = Tmpfs::mount("size=1m") else {
        return;
    };
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let path = fs.0.path().join("f");
    std::fs::write(&path, b"old").unwrap();
    let err = files
        .write(&s(&path), Noise::bytes(2, 3 * CHUNK))
        .unwrap_err();
    match err {
        Error::File {
            path: p,
            kind: FileErrorKind::NoSpace,
            ..
        } => assert_eq!(p, s(&path)),
        other => panic!("expected no space, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(names(fs.0.path()), ["f"], "the temporary file is removed");
}

#[test]
fn a_read_only_file_system_is_permission_denied_and_a_file_mounted_there_is_written_in_place() {
    let Some(fs) = Tmpfs::mount("size=1m") else {
        return;
    };
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let root = fs.0.path();
    std::fs::write(root.join("mounted"), b"").unwrap();
    assert!(mount(&["-o", "remount,ro", &s(root)]));
    assert_eq!(
        file_kind(files.write(&s(&root.join("new")), "x").unwrap_err()),
        FileErrorKind::PermissionDenied
    );
    assert_eq!(
        file_kind(files.make_dir(&s(&root.join("d"))).unwrap_err()),
        FileErrorKind::PermissionDenied
    );
    // A writable file in a directory that takes no new file: written in place.
    let host = tempfile::tempdir().unwrap();
    let backing = host.path().join("backing");
    std::fs::write(&backing, b"old").unwrap();
    assert!(mount(&["--bind", &s(&backing), &s(&root.join("mounted"))]));
    files
        .write(&s(&root.join("mounted")), "written in place")
        .unwrap();
    assert_eq!(std::fs::read(&backing).unwrap(), b"written in place");
}

/// Set in the child process that [`a_256_mib_round_trip_grows_rss_by_less_than_16_mib`]
/// starts, where that test's body runs alone.
const RSS_CHILD: &str = "CAPSULE_FILES_RSS_CHILD";

/// The process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 256 MiB of random bytes through `write_from` and back through `read_into`, checked byte
/// for byte, while the process's RSS is sampled: it must grow by less than 16 MiB (the
/// agent, in this same process, included). Runs in a child process, alone, so that other
/// tests' memory does not count.
#[test]
fn a_256_mib_round_trip_grows_rss_by_less_than_16_mib() {
    if std::env::var_os(RSS_CHILD).is_some() {
        return rss_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "api::files::tests::a_256_mib_round_trip_grows_rss_by_less_than_16_mib",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RSS_CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("rss growth"),
        "the child did not run:\n{text}"
    );
    eprintln!("{text}");
}

fn rss_child() {
    const LEN: u64 = 256 << 20;
    let (core, _cut) = capsule();
    let files = Files::new(&core);
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("big"));
    // Warm up: allocator arenas and every thread of a transfer.
    files
        .write_from(&path, Noise::new(1, 8 * CHUNK as u64))
        .unwrap();
    files.read_into(&path, std::io::sink()).unwrap();

    let base = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = std::time::Instant::now();
    let written = files.write_from(&path, Noise::new(42, LEN)).unwrap();
    let write_time = started.elapsed();
    let started = std::time::Instant::now();
    let mut expect = Expect::new(42);
    let read = files.read_into(&path, &mut expect).unwrap();
    let read_time = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);

    assert_eq!((written, read), (LEN, LEN));
    assert_eq!((expect.seen, expect.mismatch), (LEN, None));
    let growth = peak.load(std::sync::atomic::Ordering::Relaxed) - base;
    println!(
        "rss growth {growth} KiB over {base} KiB; write {write_time:?}, read {read_time:?} \
         (debug build, random bytes generated and checked on the fly)"
    );
    assert!(growth < 16 * 1024, "RSS grew by {growth} KiB");
}

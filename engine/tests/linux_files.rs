//! Files in Linux capsules (`capsule.files()`): every call on "minimal" capsules, a 256 MiB
//! random file through upload and download with the host's RSS bounded, the errors (a
//! missing path, a directory read as a file, a full guest file system), files across pause,
//! resume and an engine reopen, and a write cut off by a pause.
//!
//! Like `linux.rs`, these need hardware virtualization and the "minimal" image: they run in
//! the nested harness (`cargo xtask nested-test -- linux_files`, or `-- linux_`) and on
//! hardware-virtualization hosts, and print SKIPPED elsewhere. Every test name starts with
//! `linux_`.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capsule::{
    Capsule, Engine, EngineConfig, EntryKind, Error, FileErrorKind, RunOptions, Status,
    WriteOptions,
};
use common::linux::{boot_timeout, images, linux_engine, minimal};

/// How long a file request may wait for the guest: in the nested harness a dozen guests
/// share two emulated CPUs.
const FILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `command`, which must succeed; returns its stdout.
fn sh(c: &Capsule, command: &str) -> String {
    let out = c
        .commands()
        .run_with(command, RunOptions::new().timeout(Duration::from_secs(120)))
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    let stdout: &[u8] = out.stdout.as_ref();
    let stdout = String::from_utf8_lossy(stdout).into_owned();
    assert_eq!(out.exit_code, Some(0), "{command}: {stdout}");
    stdout
}

fn file_kind(e: Error) -> FileErrorKind {
    match e {
        Error::File { kind, .. } => kind,
        other => panic!("expected a file error, got {other:?}"),
    }
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

/// Whether `reader` gives exactly the [`Noise`] stream of `seed` and `len`.
fn matches_noise(mut reader: impl Read, seed: u64, len: u64) -> bool {
    let mut noise = Noise::new(seed, len);
    let mut buf = vec![0u8; 1 << 20];
    let mut seen = 0u64;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            return seen == len;
        }
        if buf[..n].iter().any(|b| *b != noise.byte()) {
            return false;
        }
        seen += n as u64;
    }
}

#[test]
fn linux_every_file_call_works_on_a_minimal_capsule() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);

    // write (parents created), read, read_to_string, read_into
    files.write("/tmp/work/a/b/hello.txt", "hello\n").unwrap();
    assert_eq!(sh(&c, "cat /tmp/work/a/b/hello.txt"), "hello\n");
    assert_eq!(files.read("/tmp/work/a/b/hello.txt").unwrap(), b"hello\n");
    assert_eq!(
        files.read_to_string("/etc/passwd").unwrap(),
        sh(&c, "cat /etc/passwd")
    );
    let mut out = Vec::new();
    assert_eq!(
        files
            .read_into("/tmp/work/a/b/hello.txt", &mut out)
            .unwrap(),
        6
    );
    assert_eq!(out, b"hello\n");
    // Binary bytes, several chunks, byte-exact.
    let data = Noise::bytes(1, 3 * 1024 * 1024 + 5);
    assert_eq!(
        files.write_from("/tmp/work/bin", &data[..]).unwrap(),
        data.len() as u64
    );
    assert_eq!(files.read("/tmp/work/bin").unwrap(), data);
    assert_eq!(
        sh(&c, "wc -c < /tmp/work/bin").trim(),
        data.len().to_string()
    );

    // write_with: mode and owner, exactly.
    files
        .write_with(
            "/tmp/work/run.sh",
            "#!/bin/sh\necho ran\n",
            WriteOptions::new().mode(0o750).owner(1000, 1000),
        )
        .unwrap();
    assert_eq!(sh(&c, "/tmp/work/run.sh"), "ran\n");
    let info = files.stat("/tmp/work/run.sh").unwrap();
    assert_eq!((info.mode, info.uid, info.gid), (0o750, 1000, 1000));
    assert_eq!(info.kind, EntryKind::File);
    assert_eq!(info.name, "run.sh");
    let age = SystemTime::now()
        .duration_since(info.modified)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(120), "modified {age:?} ago");
    // A replaced file keeps its mode and owner.
    files
        .write("/tmp/work/run.sh", "#!/bin/sh\necho again\n")
        .unwrap();
    let info = files.stat("/tmp/work/run.sh").unwrap();
    assert_eq!((info.mode, info.uid, info.gid), (0o750, 1000, 1000));
    assert_eq!(sh(&c, "/tmp/work/run.sh"), "again\n");

    // exists, stat, list
    assert!(files.exists("/tmp/work/a").unwrap());
    assert!(!files.exists("/tmp/work/nope").unwrap());
    assert_eq!(
        files.stat("/tmp/work/a").unwrap().kind,
        EntryKind::Directory
    );
    sh(&c, "ln -s a/b/hello.txt /tmp/work/link");
    let link = files.stat("/tmp/work/link").unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some("a/b/hello.txt"));
    let names: Vec<String> = files
        .list("/tmp/work", 1)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["a", "bin", "link", "run.sh"]);
    let paths: Vec<String> = files
        .list("/tmp/work", 3)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        [
            "/tmp/work/a",
            "/tmp/work/a/b",
            "/tmp/work/a/b/hello.txt",
            "/tmp/work/bin",
            "/tmp/work/link",
            "/tmp/work/run.sh"
        ]
    );
    // The guest's own directories list too.
    assert!(files.list("/", 1).unwrap().iter().any(|e| e.name == "proc"));

    // make_dir, rename, remove
    files.make_dir("/tmp/work/x/y/z").unwrap();
    files.make_dir("/tmp/work/x/y/z").unwrap();
    assert_eq!(sh(&c, "test -d /tmp/work/x/y/z && echo dir"), "dir\n");
    files.rename("/tmp/work/bin", "/tmp/work/x/moved").unwrap();
    assert!(!files.exists("/tmp/work/bin").unwrap());
    assert_eq!(
        files.stat("/tmp/work/x/moved").unwrap().size,
        data.len() as u64
    );
    files.remove("/tmp/work/link").unwrap();
    assert_eq!(sh(&c, "cat /tmp/work/a/b/hello.txt"), "hello\n");
    files.remove("/tmp/work/x").unwrap();
    assert_eq!(sh(&c, "test -e /tmp/work/x || echo gone"), "gone\n");

    // upload, download
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("tool.sh");
    std::fs::write(&src, "#!/bin/sh\necho uploaded\n").unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert_eq!(
        files.upload(&src, "/usr/local/bin/tool.sh").unwrap(),
        std::fs::metadata(&src).unwrap().len()
    );
    assert_eq!(sh(&c, "/usr/local/bin/tool.sh"), "uploaded\n");
    let back = host.path().join("hostname");
    files.download("/etc/passwd", &back).unwrap();
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        sh(&c, "cat /etc/passwd")
    );

    // Writes leave no temporary files.
    assert_eq!(sh(&c, "ls -A /tmp/work"), "a\nrun.sh\n");
    c.destroy().unwrap();
}

#[test]
fn linux_errors_name_the_path_missing_directory_and_a_full_file_system() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);

    match files.read("/no/such/file") {
        Err(Error::File {
            path,
            kind: FileErrorKind::NotFound,
            ..
        }) => assert_eq!(path, "/no/such/file"),
        other => panic!("expected not found, got {other:?}"),
    }
    assert_eq!(
        file_kind(files.read("/etc").unwrap_err()),
        FileErrorKind::IsADirectory
    );
    assert_eq!(
        file_kind(files.write("/etc", "x").unwrap_err()),
        FileErrorKind::IsADirectory
    );
    assert_eq!(
        file_kind(files.list("/etc/passwd", 1).unwrap_err()),
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        file_kind(files.write("/etc/passwd/x", "x").unwrap_err()),
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        file_kind(files.remove("/no/such/file").unwrap_err()),
        FileErrorKind::NotFound
    );

    // A full file system: a 1 MiB tmpfs mounted in the guest.
    sh(
        &c,
        "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small",
    );
    files.write("/mnt/small/keep", "old").unwrap();
    match files.write_from("/mnt/small/keep", Noise::new(2, 4 << 20)) {
        Err(Error::File {
            path,
            kind: FileErrorKind::NoSpace,
            ..
        }) => assert_eq!(path, "/mnt/small/keep"),
        other => panic!("expected no space, got {other:?}"),
    }
    // The old file is whole and the temporary file gone.
    assert_eq!(files.read("/mnt/small/keep").unwrap(), b"old");
    assert_eq!(sh(&c, "ls -A /mnt/small"), "keep\n");

    // A read-only file system: permission denied.
    sh(
        &c,
        "mkdir -p /mnt/ro && mount -t tmpfs -o ro,size=1m tmpfs /mnt/ro",
    );
    assert_eq!(
        file_kind(files.write("/mnt/ro/f", "x").unwrap_err()),
        FileErrorKind::PermissionDenied
    );

    // A file written in place where no new file can be made: /proc.
    let before = sh(&c, "cat /proc/sys/kernel/hostname");
    files
        .write("/proc/sys/kernel/hostname", "renamed-by-files\n")
        .unwrap();
    assert_eq!(sh(&c, "hostname"), "renamed-by-files\n");
    files
        .write("/proc/sys/kernel/hostname", before.as_bytes())
        .unwrap();
    c.destroy().unwrap();
}

#[test]
fn linux_files_written_before_a_pause_are_there_after_resume_and_an_engine_reopen() {
    let Some((engine, dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let data = Noise::bytes(3, 2 * 1024 * 1024 + 77);
    c.files().write("/tmp/keep/data.bin", &data).unwrap();
    c.files()
        .write("/root/note.txt", "written before the pause")
        .unwrap();

    c.pause().unwrap();
    assert!(matches!(
        c.files().read("/tmp/keep/data.bin"),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
    c.resume().unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);
    assert_eq!(files.read("/tmp/keep/data.bin").unwrap(), data);
    assert_eq!(
        files.read_to_string("/root/note.txt").unwrap(),
        "written before the pause"
    );
    // And written after a resume, then paused again.
    files
        .write("/tmp/keep/after.txt", "after the resume")
        .unwrap();

    let id = c.id().clone();
    c.pause().unwrap();
    drop(c);
    drop(engine);
    let engine = Engine::new(
        EngineConfig::builder()
            .data_dir(dir.path())
            .linux_images(images())
            .boot_timeout(boot_timeout()),
    )
    .unwrap();
    let c = engine.connect(&id).unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);
    assert_eq!(files.read("/tmp/keep/data.bin").unwrap(), data);
    assert_eq!(
        files.read_to_string("/tmp/keep/after.txt").unwrap(),
        "after the resume"
    );
    assert_eq!(
        files.read_to_string("/root/note.txt").unwrap(),
        "written before the pause"
    );
    c.destroy().unwrap();
}

#[test]
fn linux_a_write_cut_off_by_a_pause_never_shows_a_half_file() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    c.files().write("/tmp/target", "the old contents").unwrap();

    /// Gives 8 MiB, says so, and waits until the capsule is paused before giving more.
    struct PausedMidway {
        noise: Noise,
        given: u64,
        reached: Option<crossbeam_channel::Sender<()>>,
        paused: crossbeam_channel::Receiver<()>,
    }
    impl Read for PausedMidway {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.given >= 8 << 20 {
                if let Some(reached) = self.reached.take() {
                    let _ = reached.send(());
                    let _ = self.paused.recv_timeout(Duration::from_secs(300));
                }
            }
            let n = self.noise.read(buf)?;
            self.given += n as u64;
            Ok(n)
        }
    }
    let (reached_tx, reached_rx) = crossbeam_channel::bounded(1);
    let (paused_tx, paused_rx) = crossbeam_channel::bounded(1);
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.files().timeout(FILE_TIMEOUT).write_from(
                "/tmp/target",
                PausedMidway {
                    noise: Noise::new(4, 64 << 20),
                    given: 0,
                    reached: Some(reached_tx),
                    paused: paused_rx,
                },
            )
        })
    };
    reached_rx
        .recv_timeout(Duration::from_secs(600))
        .expect("the write got under way");
    c.pause().unwrap();
    paused_tx.send(()).unwrap();
    match writer.join().unwrap() {
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        }) => {}
        other => panic!("expected InvalidState(paused), got {other:?}"),
    }
    c.resume().unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);
    // The final name has the old contents; the part written is in a hidden temporary file.
    assert_eq!(
        files.read_to_string("/tmp/target").unwrap(),
        "the old contents"
    );
    let left = sh(&c, "ls -A /tmp");
    assert!(
        left.lines()
            .any(|l| l.starts_with(".target.capsule-") && l.ends_with(".tmp")),
        "{left}"
    );
    // The next write goes through.
    files.write("/tmp/target", "the new contents").unwrap();
    assert_eq!(
        files.read_to_string("/tmp/target").unwrap(),
        "the new contents"
    );
    c.destroy().unwrap();
}

/// Set in the child process that the 256 MiB test starts, where its body runs alone.
const RSS_CHILD: &str = "CAPSULE_LINUX_FILES_RSS_CHILD";

/// The process's resident memory outside guest memory, in KiB: every mapping's `Rss` in
/// `/proc/self/smaps`, less that of mappings of 512 MiB or more (the 1 GiB capsule's
/// memory; nothing else this process maps is that large).
fn host_rss_kib() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut big = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                big = end - start >= 512 << 20;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if big {
                guest += kib;
            }
        }
    }
    total - guest
}

/// A 256 MiB file of random bytes from the host into a 1 GiB capsule's `/tmp` (a tmpfs)
/// through `upload`, and back through `download`, byte-exact, while the host process's
/// memory outside the guest's grows by less than 16 MiB. Runs in a child process, alone,
/// so that other tests' capsules and transfers do not count.
#[test]
fn linux_a_256_mib_random_file_round_trips_through_upload_and_download_in_bounded_memory() {
    if std::env::var_os(RSS_CHILD).is_none() {
        if linux_engine().is_none() {
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "linux_a_256_mib_random_file_round_trips_through_upload_and_download_in_bounded_memory",
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
        eprintln!("{text}");
        assert!(out.status.success(), "the child failed");
        assert!(text.contains("host rss growth"), "the child did not run");
        return;
    }

    const LEN: u64 = 256 << 20;
    const SEED: u64 = 0x5eed;
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal().memory_mb(1024)).unwrap();
    let files = c.files().timeout(FILE_TIMEOUT);
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("random.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        std::io::copy(&mut Noise::new(SEED, LEN), &mut f).unwrap();
        f.flush().unwrap();
    }
    // Warm up: every thread and buffer of a transfer.
    files
        .write_from("/tmp/warm", Noise::new(1, 8 << 20))
        .unwrap();
    files.read_into("/tmp/warm", std::io::sink()).unwrap();
    files.remove("/tmp/warm").unwrap();

    let base = host_rss_kib();
    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(host_rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    assert_eq!(files.upload(&src, "/tmp/random.bin").unwrap(), LEN);
    let upload = started.elapsed();
    // The host copy goes (L1's /tmp is memory too); the download is checked against the
    // same stream.
    std::fs::remove_file(&src).unwrap();
    let back = host.path().join("back.bin");
    let started = Instant::now();
    assert_eq!(files.download("/tmp/random.bin", &back).unwrap(), LEN);
    let download = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    peak.fetch_max(host_rss_kib(), Ordering::Relaxed);

    assert_eq!(files.stat("/tmp/random.bin").unwrap().size, LEN);
    assert!(
        matches_noise(std::fs::File::open(&back).unwrap(), SEED, LEN),
        "the download differs from what was uploaded"
    );
    let growth = peak.load(Ordering::Relaxed) - base;
    let mib = |d: Duration| LEN as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "host rss growth {growth} KiB over {base} KiB; upload {upload:?} ({:.1} MiB/s), \
         download {download:?} ({:.1} MiB/s)",
        mib(upload),
        mib(download)
    );
    assert!(growth < 16 * 1024, "host RSS grew by {growth} KiB");
    c.destroy().unwrap();
}

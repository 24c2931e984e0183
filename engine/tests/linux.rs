//! Linux capsules end to end: the "minimal" template (Debian cloud kernel + capsule's agent as
//! PID 1) booted by capsule's VMM.
//!
//! They need hardware virtualization and the template's image. On this project's PVM
//! development hosts they run inside the nested harness (`cargo xtask nested-test`), which
//! builds the image and packs it into L1; on a hardware-virtualization host, build the image
//! once with `cargo xtask build-minimal` and run `cargo test`. Elsewhere they print SKIPPED,
//! except the check that a PVM host refuses Linux capsules at once, which runs everywhere.

mod common;

use std::time::{Duration, Instant};

use capsule::{Error, RunOptions, Status};
use common::linux::{boot_timeout, images, linux_engine, minimal};

#[test]
fn a_host_that_cannot_boot_linux_refuses_at_once() {
    let Some((engine, _dir)) = common::engine() else {
        return;
    };
    if engine.host().can_boot_linux() {
        return; // covered by the tests below
    }
    let started = Instant::now();
    match engine.create(minimal()) {
        Err(Error::Unsupported(why)) => assert!(why.contains("hardware virtualization"), "{why}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "no hanging");
    assert!(engine.list().is_empty());
}

#[test]
fn boots_and_runs_commands() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let started = Instant::now();
    let c = engine.create(minimal()).unwrap();
    eprintln!("minimal booted to ready in {:?}", started.elapsed());
    assert!(c.is_running());
    let run = |cmd: &str| c.commands().run(cmd).unwrap();

    let out = run("echo hello from linux");
    assert_eq!(
        (&*out.stdout_str(), out.exit_code),
        ("hello from linux\n", Some(0))
    );
    let release = run("uname -r").stdout_str().into_owned();
    assert!(release.trim().ends_with("cloud-amd64"), "{release}");
    assert_eq!(run("exit 7").exit_code, Some(7));
    let missing = run("no-such-program");
    assert_eq!(missing.exit_code, Some(127));
    assert!(!missing.stderr.is_empty());

    let opts = RunOptions::new().env("GREETING", "hi there").cwd("/tmp");
    let out = c
        .commands()
        .run_with("echo \"$GREETING\"; pwd", opts)
        .unwrap();
    assert_eq!(out.stdout_str(), "hi there\n/tmp\n");

    let big = run("head -c 1048576 /dev/zero | tr '\\0' x");
    assert_eq!(big.stdout.len(), 1 << 20);
    assert!(big.stdout.iter().all(|b| *b == b'x'));

    let console = c.console_log();
    assert!(
        console.contains("capsule-agent: ready"),
        "the console is kept: {console}"
    );

    // virtio-rng feeds the kernel's hardware RNG.
    let rng = run("cat /sys/class/misc/hw_random/rng_current; head -c 64 /dev/hwrng | wc -c");
    assert_eq!(
        rng.stdout_str().split_whitespace().last(),
        Some("64"),
        "{rng:?}"
    );
    assert!(rng.stdout_str().starts_with("virtio_rng"), "{rng:?}");
    c.destroy().unwrap();
}

#[test]
fn several_vcpus_are_seen_by_the_guest() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal().vcpus(2)).unwrap();
    assert_eq!(
        c.commands().run("nproc").unwrap().stdout_str().into_owned(),
        "2\n"
    );
    assert_eq!(c.info().vcpus, 2);
}

#[test]
fn capsules_boot_from_shells_loaded_ahead_of_time() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    // The first boot loads its kernel on the spot; then the pool loads one for next time.
    let first = engine.create(minimal()).unwrap();
    for round in 0..2 {
        let deadline = Instant::now() + boot_timeout();
        while engine.shell_pool_counts().0 == 0 {
            assert!(Instant::now() < deadline, "no shell was pre-built");
            std::thread::sleep(Duration::from_millis(50));
        }
        let served = engine.shell_pool_counts().1;
        let c = engine.create(minimal()).unwrap();
        assert_eq!(
            engine.shell_pool_counts().1,
            served + 1,
            "round {round}: the pre-built shell was used"
        );
        let out = c
            .commands()
            .run("cat /proc/cmdline; nproc; grep MemTotal /proc/meminfo")
            .unwrap();
        assert!(
            out.stdout_str().starts_with(capsule::LINUX_KERNEL_CMDLINE),
            "{out:?}"
        );
        assert!(out.stdout_str().contains("\n1\n"), "{out:?}");
        c.destroy().unwrap();
    }
    // Each capsule has its own memory: a file written in one is not in another.
    first.commands().run("echo mine > /tmp/owner").unwrap();
    let other = engine.create(minimal()).unwrap();
    let seen = other.commands().run("cat /tmp/owner 2>&1 || true").unwrap();
    assert!(!seen.stdout_str().contains("mine"), "{seen:?}");
}

#[test]
fn a_timeout_kills_the_command_and_its_children() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let started = Instant::now();
    let result = c.commands().run_with(
        "sleep 100 & echo $! > /tmp/child; sleep 100",
        RunOptions::new().timeout(Duration::from_secs(2)),
    );
    assert!(
        matches!(
            result,
            Err(Error::Timeout {
                kind: capsule::TimeoutKind::Command,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let child = c
        .commands()
        .run("cat /tmp/child")
        .unwrap()
        .stdout_str()
        .into_owned();
    // Killed is dead even before the agent (PID 1, which inherits the orphan) has reaped
    // it: a zombie (state Z) counts as gone, as `kill -0` alone would not tell.
    let alive = c
        .commands()
        .run(format!(
            "read -r _ _ state _ 2>/dev/null < /proc/{}/stat; \
             case \"$state\" in ''|Z) echo gone ;; *) echo alive ;; esac",
            child.trim()
        ))
        .unwrap();
    assert_eq!(
        alive.stdout_str(),
        "gone\n",
        "the background child died with the group"
    );
    assert_eq!(
        c.commands().run("echo still usable").unwrap().exit_code,
        Some(0)
    );
}

#[test]
fn eight_commands_at_once_and_four_capsules() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let capsules: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || engine.create(minimal()).unwrap())
        })
        .map(|t| t.join().unwrap())
        .collect();
    let c = capsules[0].clone();
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || c.commands().run(format!("sleep 1; echo {i}")).unwrap())
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(
            t.join().unwrap().stdout_str().into_owned(),
            format!("{i}\n")
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "they ran concurrently"
    );
    for (i, other) in capsules.iter().enumerate() {
        let out = other.commands().run(format!("echo capsule {i}")).unwrap();
        assert_eq!(out.stdout_str(), format!("capsule {i}\n"));
    }
}

#[test]
fn poweroff_stops_the_capsule() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let _ = c.commands().run_with(
        "poweroff -f",
        RunOptions::new().timeout(Duration::from_secs(10)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status() == Status::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.status(), Status::Stopped);
    assert_eq!(c.info().error, None);
    let ended = c.info().ended.unwrap_or_default();
    assert!(
        ended.starts_with("shutdown exit") && ended.contains("vCPU0: rip"),
        "{ended}"
    );
    assert!(matches!(
        c.commands().run("true"),
        Err(Error::InvalidState { .. })
    ));
    c.destroy().unwrap();
}

#[test]
fn a_guest_panic_is_reported_with_the_console_tail_and_the_engine_carries_on() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let bystander = engine.create(minimal()).unwrap();
    let c = engine.create(minimal()).unwrap();
    let _ = c.commands().run_with(
        "echo c > /proc/sysrq-trigger",
        RunOptions::new().timeout(Duration::from_secs(10)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status() == Status::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = c.info();
    assert!(
        matches!(info.status, Status::Error | Status::Stopped),
        "{:?}",
        info.status
    );
    if info.status == Status::Error {
        assert!(info.error.unwrap().contains("panic"));
    }
    let console = c.console_log();
    assert!(
        console.contains("Kernel panic"),
        "the console tail is kept: {console}"
    );
    assert_eq!(
        bystander
            .commands()
            .run("echo fine")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "fine\n"
    );
}

#[test]
fn a_guest_that_dies_while_booting_fails_the_create_at_once() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    drop(engine);
    // The real kernel with an initramfs of garbage: no /init, no root device, a panic, and
    // with panic=-1 a reset through the i8042.
    let images = tempfile::tempdir().unwrap();
    let minimal_dir = images.path().join("minimal");
    std::fs::create_dir(&minimal_dir).unwrap();
    for kernel in ["vmlinux", "vmlinuz"] {
        let source = self::images().join("minimal").join(kernel);
        if source.is_file() {
            std::fs::copy(&source, minimal_dir.join(kernel)).unwrap();
        }
    }
    std::fs::write(minimal_dir.join("initrd.img"), vec![0x5a; 64 * 1024]).unwrap();
    let (engine, _dir) =
        common::engine_with(|c| c.linux_images(images.path()).boot_timeout(boot_timeout()))
            .unwrap();

    let started = Instant::now();
    let result = engine.create(minimal());
    let elapsed = started.elapsed();
    match result {
        Err(Error::GuestCrashed { reason, .. }) => {
            assert!(reason.contains("Kernel panic"), "{reason}");
            assert!(reason.contains("vCPU0: ended"), "{reason}");
        }
        other => panic!("expected GuestCrashed, got {other:?}"),
    }
    assert!(
        elapsed < boot_timeout() / 2,
        "the failure is reported when the guest dies, not at the boot timeout ({elapsed:?})"
    );
    assert!(engine.list().is_empty(), "nothing is left behind");
}

#[test]
fn destroy_while_a_command_runs() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let runner = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.commands()
                .run_with("sleep 100", RunOptions::new().no_timeout())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.destroy().unwrap();
    assert!(runner.join().unwrap().is_err());
    assert!(engine.list().is_empty());
}

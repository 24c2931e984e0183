//! The lifecycle on a real kernel: Linux capsules pause, resume, reopen, auto-pause, become
//! templates and fork, with their processes, files and clocks intact and each clone with its
//! own randomness and identity.
//!
//! Like `linux.rs`, these need hardware virtualization and the "minimal" image: they run in
//! the nested harness (`cargo xtask nested-test -- linux_`) and on hardware-virtualization
//! hosts, and print SKIPPED elsewhere. Every test name starts with `linux_`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule::{Capsule, Engine, EngineConfig, Error, RunOptions, Status};
use common::linux::{boot_timeout, images, linux_engine, linux_engine_with, minimal};

/// Runs `command`, which must succeed; returns its stdout. The timeout is generous: in the
/// nested harness a dozen guests share two emulated CPUs.
fn sh(c: &Capsule, command: &str) -> String {
    let out = c
        .commands()
        .run_with(command, RunOptions::new().timeout(Duration::from_secs(120)))
        .unwrap_or_else(|e| {
            let console = c.console_log();
            let tail: Vec<&str> = console.lines().rev().take(25).collect();
            panic!(
                "{command}: {e}\ninfo: {:?}\nconsole tail (newest first):\n{}",
                c.info(),
                tail.join("\n")
            )
        });
    assert_eq!(out.exit_code, Some(0), "{command}: {out:?}");
    out.stdout_str().into_owned()
}

/// Starts a loop that writes a rising counter to `/tmp/n` every 0.1 s, detached from the
/// command (its own session, no inherited descriptors); returns its pid.
fn start_counter(c: &Capsule) -> u32 {
    let pid = sh(
        c,
        "setsid sh -c 'i=0; exec 3>/tmp/held; while :; do echo $i > /tmp/n; i=$((i+1)); sleep 0.1; done' \
         </dev/null >/dev/null 2>&1 & echo $!",
    );
    let pid: u32 = pid.trim().parse().expect("a pid");
    // Wait for its first value.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sh(c, "cat /tmp/n 2>/dev/null || true").trim().is_empty() {
        assert!(Instant::now() < deadline, "the counter never wrote");
        std::thread::sleep(Duration::from_millis(100));
    }
    pid
}

/// Starts a process that only sleeps, detached like [`start_counter`]'s; returns its pid.
fn start_sleeper(c: &Capsule) -> u32 {
    let pid = sh(
        c,
        "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    pid.trim().parse().expect("a pid")
}

/// The counter's current value.
fn counter(c: &Capsule) -> u64 {
    // A read can race the loop's truncating write: retry an empty read.
    for _ in 0..20 {
        if let Ok(n) = sh(c, "cat /tmp/n").trim().parse() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the counter file stays unreadable");
}

/// Waits until the counter passes `above`.
fn counter_passes(c: &Capsule, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = counter(c);
        if n > above {
            return n;
        }
        assert!(Instant::now() < deadline, "the counter stopped at {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process's open descriptors and where they point.
fn fds(c: &Capsule, pid: u32) -> String {
    sh(
        c,
        &format!("cd /proc/{pid}/fd && for f in *; do echo $f $(readlink $f); done"),
    )
}

fn host_unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// How far the guest's wall clock is outside the host's, in seconds: the guest reads its
/// clock at some moment of the command's round trip, so a right clock reads between the host
/// times taken before and after it; the distance outside that window (0 inside it, negative
/// when behind). A round trip under a loaded nested harness can take seconds, so comparing
/// with its midpoint would blame the clock for the harness's slowness.
fn clock_skew(c: &Capsule) -> f64 {
    let before = host_unix_seconds();
    // busybox's `date` has no %N; adjtimex shows the clock to the microsecond.
    let guest = sh(
        c,
        "adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf \"%d.%06d\\n\", s, u}'",
    );
    let guest: f64 = guest
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{guest:?}: {e}"));
    let after = host_unix_seconds();
    if guest < before {
        guest - before
    } else if guest > after {
        guest - after
    } else {
        0.0
    }
}

fn uptime(c: &Capsule) -> f64 {
    sh(c, "cut -d' ' -f1 /proc/uptime").trim().parse().unwrap()
}

#[test]
fn linux_a_background_process_runs_on_across_twenty_pauses_and_an_engine_reopen() {
    let Some((engine, dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let pid = start_counter(&c);
    let fds_before = fds(&c, pid);
    assert!(fds_before.contains("/tmp/held"), "{fds_before}");
    let sum = sh(
        &c,
        "head -c 3000000 /dev/urandom > /tmp/data && md5sum /tmp/data",
    );

    let mut last = counter(&c);
    for cycle in 0..20 {
        c.pause().unwrap();
        assert_eq!(c.status(), Status::Paused);
        c.resume().unwrap();
        let n = counter_passes(&c, last);
        assert!(
            n > last,
            "cycle {cycle}: the counter went from {last} to {n}"
        );
        last = n;
    }
    assert_eq!(sh(&c, &format!("kill -0 {pid} && echo alive")), "alive\n");
    assert_eq!(fds(&c, pid), fds_before, "its descriptors are unchanged");
    assert_eq!(sh(&c, "md5sum /tmp/data"), sum);

    // Paused, the engine goes away; a new one on the same directory resumes it.
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
    assert_eq!(c.status(), Status::Running);
    assert_eq!(sh(&c, "md5sum /tmp/data"), sum);
    assert_eq!(sh(&c, &format!("kill -0 {pid} && echo alive")), "alive\n");
    counter_passes(&c, last);
    c.destroy().unwrap();
}

#[test]
fn linux_wall_clock_matches_the_host_after_boot_and_pause_and_uptime_never_decreases() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let skew = clock_skew(&c);
    assert!(skew.abs() < 1.0, "a fresh boot's clock is {skew:.3} s off");
    let up = uptime(&c);
    let between = Instant::now();

    c.pause().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    c.resume().unwrap();
    let skew = clock_skew(&c);
    assert!(
        skew.abs() < 1.0,
        "after a 3 s pause the clock is {skew:.3} s off"
    );
    let up_after = uptime(&c);
    let host_elapsed = between.elapsed().as_secs_f64();
    assert!(up_after >= up, "uptime went from {up} to {up_after}");
    // Monotonic time counts only time the guest ran: the 3 s paused are not in it (0.5 s
    // margin for /proc/uptime's hundredths and the reads' own timing).
    assert!(
        up_after - up < host_elapsed - 2.5,
        "uptime advanced {:.2} s while the host saw {host_elapsed:.2} s, 3 s of them paused",
        up_after - up
    );
    c.destroy().unwrap();
}

#[test]
fn linux_a_command_running_at_pause_is_reported_paused_and_its_timeout_counts_only_running_time() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let runner = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.commands().run_with(
                "sleep 3; echo finished > /tmp/result",
                RunOptions::new().timeout(Duration::from_secs(6)),
            )
        })
    };
    // The command is running (its sleep started) before the pause.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sh(&c, "ps -o args 2>/dev/null || ps").contains("sleep 3") {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.pause().unwrap();
    // The blocked run returns promptly, saying why (its reply channel closed with the
    // guest's link, inside the pause).
    let paused_at = Instant::now();
    match runner.join().unwrap() {
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        }) => {}
        other => panic!("expected InvalidState(paused), got {other:?}"),
    }
    assert!(paused_at.elapsed() < Duration::from_secs(10));
    // Paused for longer than the command's whole timeout: it must not count.
    std::thread::sleep(Duration::from_secs(7));
    c.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let result = sh(&c, "cat /tmp/result 2>/dev/null || true");
        if result == "finished\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the command did not finish after the resume"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.destroy().unwrap();
}

#[test]
fn linux_ten_capsules_from_a_template_continue_it_diverge_and_draw_their_own_randomness() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let source = engine.create(minimal()).unwrap();
    // A sleeping process, not the counter: eleven busy guests would starve the nested
    // harness's two emulated CPUs.
    let pid = start_sleeper(&source);
    sh(&source, "echo from-the-template > /tmp/a");
    let info = source.snapshot("linux-ten").unwrap();
    assert_eq!(info.name, "linux-ten");
    // The source keeps running.
    assert_eq!(
        sh(&source, &format!("kill -0 {pid} && echo alive")),
        "alive\n"
    );

    let clones: Vec<Capsule> = (0..10)
        .map(|_| {
            engine
                .create(capsule::CapsuleConfig::builder("linux-ten"))
                .unwrap()
        })
        .collect();
    let random = |c: &Capsule| {
        sh(
            c,
            "head -c 32 /dev/urandom | od -x; cat /proc/sys/kernel/random/uuid",
        )
    };
    let mut seen = HashSet::new();
    assert!(seen.insert(random(&source)));
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(sh(c, "cat /tmp/a"), "from-the-template\n");
        assert_eq!(sh(c, &format!("kill -0 {pid} && echo alive")), "alive\n");
        assert_eq!(sh(c, "echo $CAPSULE_ID").trim(), c.id().as_str());
        sh(c, &format!("echo clone-{i} > /tmp/own"));
        let drawn = random(c);
        assert!(seen.insert(drawn.clone()), "clone {i} repeats {drawn}");
    }
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(sh(c, "cat /tmp/own"), format!("clone-{i}\n"), "private");
    }
    assert_eq!(
        sh(&source, "cat /tmp/own 2>/dev/null || echo none"),
        "none\n"
    );
    assert_eq!(sh(&source, "echo $CAPSULE_ID").trim(), source.id().as_str());
    for c in clones {
        c.destroy().unwrap();
    }
    engine.delete_template("linux-ten").unwrap();
    source.destroy().unwrap();
}

#[test]
fn linux_four_forks_of_a_running_capsule_each_have_its_process() {
    let Some((engine, _dir)) = linux_engine() else {
        return;
    };
    let source = engine.create(minimal()).unwrap();
    let pid = start_counter(&source);
    sh(&source, "echo before-fork > /tmp/f");
    let forks = source.fork(4).unwrap();
    assert_eq!(forks.len(), 4);
    assert_eq!(engine.list().len(), 5);
    let mut ids = HashSet::new();
    for f in &forks {
        assert_eq!(sh(f, &format!("kill -0 {pid} && echo alive")), "alive\n");
        assert_eq!(sh(f, "cat /tmp/f"), "before-fork\n");
        let n = counter(f);
        counter_passes(f, n);
        assert!(ids.insert(sh(f, "echo $CAPSULE_ID")));
    }
    // The source ran on, and a paused one forks too.
    counter_passes(&source, counter(&source));
    source.pause().unwrap();
    let from_paused = source.fork(1).unwrap();
    assert_eq!(sh(&from_paused[0], "cat /tmp/f"), "before-fork\n");
    assert_eq!(source.status(), Status::Paused);
    for f in forks.into_iter().chain(from_paused) {
        f.destroy().unwrap();
    }
    source.destroy().unwrap();
}

#[test]
fn linux_inactivity_pauses_and_connect_resumes() {
    let Some((engine, _dir)) =
        linux_engine_with(|c| c.idle_check_interval(Duration::from_millis(50)))
    else {
        return;
    };
    let c = engine
        .create(minimal().timeout(Duration::from_secs(2)))
        .unwrap();
    let pid = start_counter(&c);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status() != Status::Paused {
        assert!(
            Instant::now() < deadline,
            "never auto-paused: {:?}",
            c.info()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = engine.connect(c.id()).unwrap();
    assert_eq!(c.status(), Status::Running);
    assert_eq!(sh(&c, &format!("kill -0 {pid} && echo alive")), "alive\n");
    c.destroy().unwrap();
}

#[test]
fn linux_a_corrupt_snapshot_is_a_typed_error_and_destroy_removes_a_paused_capsules_files() {
    let Some((engine, dir)) = linux_engine() else {
        return;
    };
    let c = engine.create(minimal()).unwrap();
    let other = engine.create(minimal()).unwrap();
    sh(&c, "echo kept > /tmp/k");
    c.pause().unwrap();
    let snapshot = dir
        .path()
        .join("capsules")
        .join(c.id().as_str())
        .join("snapshot");
    let state = snapshot.join("state.bin");
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    std::fs::write(&state, &flipped).unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    std::fs::write(&state, &good[..good.len() / 3]).unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Paused);
    assert_eq!(sh(&other, "echo fine"), "fine\n");

    std::fs::write(&state, &good).unwrap();
    c.resume().unwrap();
    assert_eq!(sh(&c, "cat /tmp/k"), "kept\n");
    c.pause().unwrap();
    assert!(snapshot.exists());
    c.destroy().unwrap();
    assert!(
        !snapshot.exists(),
        "destroy deletes a paused capsule's files"
    );
    other.destroy().unwrap();
}

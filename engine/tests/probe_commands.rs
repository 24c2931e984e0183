//! Every command of the probe guest, answered by real guest code.

mod common;

use std::time::Duration;

use capsule::{Error, RunOptions};
use common::{engine, probe};

#[test]
fn echo_exit_count_and_unknown() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let run = |cmd: &str| c.commands().run(cmd).unwrap();

    let out = run("echo hello world");
    assert_eq!(
        (&*out.stdout_str(), &*out.stderr_str(), out.exit_code),
        ("hello world\n", "", Some(0))
    );
    assert!(out.success());
    assert_eq!(run("echo").stdout_str().into_owned(), "\n");
    assert_eq!(
        run("  echo   padded  ").stdout_str().into_owned(),
        "padded\n"
    );

    assert_eq!(run("exit 0").exit_code, Some(0));
    assert_eq!(run("exit 42").exit_code, Some(42));
    assert_eq!(run("exit -1").exit_code, Some(-1));
    let bad = run("exit nope");
    assert_eq!(bad.exit_code, Some(2));
    assert!(bad.stderr_str().contains("not a number"));

    for expected in 1..=5 {
        assert_eq!(
            run("count").stdout_str().into_owned(),
            format!("{expected}\n")
        );
    }

    let unknown = run("frobnicate now");
    assert_eq!(unknown.exit_code, Some(127));
    assert_eq!(unknown.stdout_str(), "");
    assert_eq!(unknown.stderr_str(), "probe: unknown command: frobnicate\n");
    assert_eq!(run("").exit_code, Some(127));
}

#[test]
fn touch_and_sum_agree_and_depend_on_contents() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let run = |cmd: &str| c.commands().run(cmd).unwrap();

    assert_eq!(
        run("sum").stdout_str().into_owned(),
        "0\n",
        "nothing touched yet"
    );
    let first = run("touch 10").stdout_str().into_owned();
    assert_eq!(
        run("sum").stdout_str().into_owned(),
        first,
        "sum covers exactly the pages touched"
    );
    let second = run("touch 5").stdout_str().into_owned();
    assert_ne!(second, first);
    let total = run("sum").stdout_str().into_owned();
    assert_ne!(total, first, "sum now covers 15 pages");
    assert_eq!(run("sum").stdout_str().into_owned(), total, "sum is stable");

    // The same history on another capsule gives the same checksums: the guest computes them.
    let d = engine.create(probe()).unwrap();
    assert_eq!(
        d.commands()
            .run("touch 10")
            .unwrap()
            .stdout_str()
            .into_owned(),
        first
    );
    assert_eq!(
        d.commands()
            .run("touch 5")
            .unwrap()
            .stdout_str()
            .into_owned(),
        second
    );
    assert_eq!(
        d.commands().run("sum").unwrap().stdout_str().into_owned(),
        total
    );

    let too_many = run("touch 100000000");
    assert_eq!(too_many.exit_code, Some(1));
    assert!(too_many.stderr_str().contains("room for"));
    assert_eq!(run("touch x").exit_code, Some(2));
}

#[test]
fn spin_runs_and_returns() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let out = c.commands().run("spin 1000000").unwrap();
    assert_eq!((out.exit_code, &*out.stdout_str()), (Some(0), ""));
    assert_eq!(c.commands().run("spin -5").unwrap().exit_code, Some(2));
}

#[test]
fn crash_moves_the_capsule_to_error_with_a_reason() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "1\n"
    );
    match c.commands().run("crash") {
        Err(Error::GuestCrashed { id, reason }) => {
            assert_eq!(id, *c.id());
            assert!(reason.contains("triple fault"), "{reason}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    let info = c.info();
    assert_eq!(info.status, capsule::Status::Error);
    assert!(info.error.unwrap().contains("triple fault"));
    assert!(matches!(
        c.commands().run("echo x"),
        Err(Error::GuestCrashed { .. })
    ));
    // A crashed capsule is reported as crashed, with its reason, by wait_ready too.
    assert!(matches!(
        c.wait_ready(Duration::from_secs(1), Duration::from_millis(1)),
        Err(Error::GuestCrashed { reason, .. }) if reason.contains("triple fault")
    ));
    // Still listed (so the reason can be read) until destroyed.
    assert_eq!(engine.list().len(), 1);
    c.destroy().unwrap();
    assert!(engine.list().is_empty());
}

#[test]
fn long_echo_and_oversized_requests() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let long = "x".repeat(3000);
    let out = c.commands().run(format!("echo {long}")).unwrap();
    assert_eq!(out.stdout.len(), 3001);
    assert!(!out.stdout_truncated);
    let too_long = "y".repeat(probe_abi::REQUEST_MAX + 1);
    assert!(matches!(
        c.commands().run(&too_long),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_timed_out_command_is_killed_and_the_capsule_carries_on() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "1\n"
    );
    let limit = Duration::from_millis(100);
    match c
        .commands()
        .run_with("spin 100000000000000", RunOptions::new().timeout(limit))
    {
        Err(Error::Timeout {
            kind: capsule::TimeoutKind::Command,
            after,
        }) => assert_eq!(after, limit),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(c.is_running());
    assert_eq!(
        c.commands()
            .run("echo alive")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "alive\n"
    );
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n",
        "guest state survives"
    );
}

#[test]
fn killing_a_command_mid_touch_releases_its_lock() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe().memory_mb(512)).unwrap();
    // Long enough to be interrupted while it holds the guest's touch lock.
    let _ = c.commands().run_with(
        "touch 120000",
        RunOptions::new().timeout(Duration::from_millis(20)),
    );
    let out = c
        .commands()
        .run_with(
            "touch 1",
            RunOptions::new().timeout(Duration::from_secs(20)),
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(
        c.commands()
            .run("echo ok")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "ok\n"
    );
}

#[test]
fn commands_run_in_parallel_on_several_vcpus() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe().vcpus(4)).unwrap();
    // One vCPU spins; the others keep answering meanwhile.
    let spinner = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.commands().run_with(
                "spin 100000000000000",
                RunOptions::new().timeout(Duration::from_millis(500)),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..20 {
        assert_eq!(
            c.commands()
                .run("echo beside")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "beside\n"
        );
    }
    assert!(matches!(
        spinner.join().unwrap(),
        Err(Error::Timeout { .. })
    ));

    // The counter is shared by all vCPUs and increments atomically.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    assert_eq!(c.commands().run("count").unwrap().exit_code, Some(0));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "401\n"
    );
}

//! Spawned commands in the probe guest, and everything the probe cannot do refused with
//! `Unsupported` rather than done halfway.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule::{Command, Error, Output, PtySize, RunOptions, Signal, TimeoutKind};
use common::{engine, probe};

#[test]
fn spawn_runs_a_verb_and_its_output_arrives_at_the_end() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let handle = c
        .commands()
        .spawn("echo spawned", RunOptions::new())
        .unwrap();
    assert_eq!(handle.pid(), 0, "the probe has no processes");
    let chunks: Vec<Output> = handle.output().collect();
    assert_eq!(chunks, vec![Output::Stdout(b"spawned\n".to_vec())]);
    let out = handle.wait().unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(0), None));
    assert!(out.stdout.is_empty(), "the stream took it");

    // Without a stream, wait keeps the output; handles are clones of one command.
    let handle = c.commands().spawn("exit 7", RunOptions::new()).unwrap();
    let other = handle.clone();
    assert_eq!(handle.wait().unwrap().exit_code, Some(7));
    assert_eq!(other.wait().unwrap().exit_code, Some(7));
    let handle = c.commands().spawn("frobnicate", RunOptions::new()).unwrap();
    let out = handle.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(out.exit_code, Some(127));
    assert!(out.stderr_str().contains("unknown command"), "{out:?}");
    // Counted by the guest like any command.
    c.commands()
        .spawn("count", RunOptions::new())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(c.commands().run("count").unwrap().stdout_str(), "2\n");
}

#[test]
fn a_spawned_spin_is_killed_and_reported_killed() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let spin = c
        .commands()
        .spawn("spin 100000000000", RunOptions::new())
        .unwrap();
    match spin.wait_timeout(Duration::from_millis(100)) {
        Err(Error::Timeout {
            kind: TimeoutKind::Wait,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    spin.kill().unwrap();
    let out = spin.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(Signal::KILL)));
    // Only a kill: other signals, stdin and terminals are not the probe's.
    assert!(matches!(
        spin.signal(Signal::TERM),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(spin.write_stdin(b"x"), Err(Error::Unsupported(_))));
    assert!(matches!(spin.close_stdin(), Err(Error::Unsupported(_))));
    assert_eq!(
        c.commands().run("echo usable").unwrap().stdout_str(),
        "usable\n"
    );

    // A spawn timeout kills it too.
    let spin = c
        .commands()
        .spawn(
            "spin 100000000000",
            RunOptions::new().timeout(Duration::from_millis(100)),
        )
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        spin.wait(),
        Err(Error::Timeout {
            kind: TimeoutKind::Command,
            ..
        })
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn what_the_probe_cannot_do_is_unsupported() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let commands = c.commands();
    let refused = |options: RunOptions| {
        for result in [
            commands.run_with("echo x", options.clone()).map(drop),
            commands.spawn("echo x", options).map(drop),
        ] {
            match result {
                Err(Error::Unsupported(why)) => assert!(why.contains("probe"), "{why}"),
                other => panic!("expected Unsupported, got {other:?}"),
            }
        }
    };
    // Once silently ignored, now refused.
    refused(RunOptions::new().env("A", "1"));
    refused(RunOptions::new().cwd("/tmp"));
    refused(RunOptions::new().clear_env());
    refused(RunOptions::new().user("root"));
    refused(RunOptions::new().stdin("input"));
    assert!(matches!(
        commands.run(Command::exec("echo", ["x"])),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        c.pty().create(PtySize::default(), RunOptions::new()),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(commands.list(), Err(Error::Unsupported(_))));
    assert!(matches!(commands.connect(1), Err(Error::Unsupported(_))));
    assert!(matches!(commands.kill(1), Err(Error::Unsupported(_))));
    assert!(matches!(c.pty().connect(1), Err(Error::Unsupported(_))));
    // Nothing ran, nothing broke.
    assert_eq!(commands.run("count").unwrap().stdout_str(), "1\n");
}

#[test]
fn run_honours_callbacks_and_the_output_limit() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let options = RunOptions::new()
        .output_limit(4)
        .on_stdout(move |b| s.lock().unwrap().extend_from_slice(b));
    let out = c.commands().run_with("echo callback", options).unwrap();
    assert_eq!(*seen.lock().unwrap(), b"callback\n");
    assert_eq!(out.stdout, b"call");
    assert!(out.stdout_truncated);
}

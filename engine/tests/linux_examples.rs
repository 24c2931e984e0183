//! The examples of issue #9 (`engine/examples/streaming_build.rs`, `pty_session.rs`,
//! `files_in_and_out.rs`), run as written with the "minimal" Linux template in the nested
//! harness: CI only builds them, and they need hardware virtualization.
//!
//! `cargo xtask nested-test` builds them for x86_64-unknown-linux-musl (static, like the test
//! binaries) and packs them into L1 as `$CAPSULE_NESTED_EXTRA/examples/NAME` (`xtask/src/
//! main.rs`, `linux_examples`). This test runs each there in a fresh process, one after the
//! other, with `CAPSULE_MINIMAL_IMAGES` pointing at the packed image (the examples look for it
//! there, else where `cargo xtask build-minimal` puts it) and `TMPDIR` at a temporary
//! directory (each example keeps its data directory under the temporary directory), and
//! asserts that each exits 0 and prints the lines that show it did its work. Outside the
//! harness it prints SKIPPED: on a host with hardware virtualization, run the examples
//! themselves (`cargo run --release --example NAME`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long one example may take, end to end (a nested boot and a few seconds of work; the
/// file example moves 64 MiB each way).
const EXAMPLE_LIMIT: Duration = Duration::from_secs(600);

/// Runs the packed example `name` and returns its stdout, after checking that it exited 0.
fn run_example(extra: &Path, name: &str) -> String {
    let program = extra.join("examples").join(name);
    assert!(
        program.is_file(),
        "{} is missing: the nested harness packs the examples when it runs the capsule tests",
        program.display()
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(&program);
    cmd.env("CAPSULE_MINIMAL_IMAGES", common::linux::images())
        .env("TMPDIR", tmp.path())
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdout = common::run_to_success(name, &mut cmd, EXAMPLE_LIMIT);
    assert!(
        !stdout.contains("cannot boot Linux"),
        "{name} did not run a capsule:\n{stdout}"
    );
    stdout
}

/// Asserts that some line of `out` contains every one of `parts`.
fn has_line(name: &str, out: &str, parts: &[&str]) {
    assert!(
        out.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "{name}: no line with {parts:?} in:\n{out}"
    );
}

#[test]
fn linux_examples_run_in_the_nested_harness() {
    let Some(extra) = std::env::var_os("CAPSULE_NESTED_EXTRA") else {
        eprintln!(
            "SKIPPED: the examples run in the nested harness (`cargo xtask nested-test -p \
             capsule -- linux_examples`); on a host with hardware virtualization run them \
             with `cargo run --release --example NAME`"
        );
        return;
    };
    let extra = Path::new(&extra);
    // Hardware virtualization and the minimal image (the harness has both).
    let Some((engine, _dir)) = common::linux::linux_engine() else {
        return;
    };
    drop(engine);

    let name = "streaming_build";
    let out = run_example(extra, name);
    has_line(name, &out, &["capsule cl-", "is running"]);
    has_line(name, &out, &["build started as pid"]);
    for step in ["fetch", "compile", "link", "test"] {
        has_line(name, &out, &["s] == ", step]);
        has_line(name, &out, &["s] ", step, ": unit 2"]);
        has_line(name, &out, &["s] stderr: warning: ", step, " took a while"]);
    }
    has_line(name, &out, &["s] build finished"]);
    has_line(
        name,
        &out,
        &["build ended after", "exit code Some(0), signal None"],
    );
    for tick in 1..=3 {
        has_line(name, &out, &["callback: tick ", &tick.to_string()]);
    }
    has_line(name, &out, &["run kept 21 bytes of stdout"]);

    let name = "pty_session";
    let out = run_example(extra, name);
    has_line(name, &out, &["shell on a terminal, pid"]);
    // What the shell printed (not only what was typed and echoed).
    has_line(name, &out, &["/dev/pts/"]);
    assert!(
        out.lines()
            .any(|l| l.trim_end_matches('\r').trim() == "24 80"),
        "{name}: no `24 80` from stty:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim_end_matches('\r').trim() == "40 120"),
        "{name}: no `40 120` from stty after the resize:\n{out}"
    );
    has_line(name, &out, &["the shell exited with Some(7)"]);

    let name = "files_in_and_out";
    let out = run_example(extra, name);
    has_line(name, &out, &["the script exited with Some(0)"]);
    for (count, file) in [("4", "/work/in/a.txt"), ("6", "/work/in/b.txt")] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [count, file]),
            "{name}: no word count `{count} {file}`:\n{out}"
        );
    }
    has_line(name, &out, &["/work/secret.conf", "mode 600"]);
    has_line(name, &out, &["downloaded to ", "counts.txt"]);
    has_line(
        name,
        &out,
        &["64 MiB written in", "67108864 bytes read back in"],
    );
    has_line(name, &out, &["/work/missing.txt: not found"]);
}

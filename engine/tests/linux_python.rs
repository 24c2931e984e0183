//! The Python SDK's examples with the "minimal" Linux template, each in a fresh Python process
//! on the SDK's default engine:
//!
//! - `python/examples/lifecycle.py` (issue #11) as written: creates a capsule, runs a command,
//!   pauses it, reads its status, resumes it, runs another command and destroys it.
//! - `python/examples/guest_io.py` (the guest I/O of issue #9 from Python): background
//!   commands fed on stdin with output callbacks, a character cut by a chunk boundary, a
//!   signal, the process list, `connect` and kill by pid, a process across a pause, files in
//!   and out with their typed errors, files streamed from and into Python file objects (with
//!   a per-request timeout), another user, and a terminal; one checked line each.
//!
//! In the nested harness (`cargo xtask nested-test -- linux_python`) the Python is the host's
//! CPython packed into L1 with the installed `capsule` package and the example files
//! (`$CAPSULE_NESTED_EXTRA/python`, `xtask/src/l1python.rs`); it runs through the packed
//! dynamic loader with `PYTHONHOME` and `PYTHONPATH` pointing into that folder. On a host with
//! hardware virtualization and the minimal image it runs with the first Python that can
//! `import capsule`: `$CAPSULE_PYTHON`, `target/python-venv/bin/python` (what `.ci/run`
//! builds), `python3`. Elsewhere it prints SKIPPED.
//!
//! The default engine's data directory is `$XDG_DATA_HOME/capsule` and its Linux images are
//! in `images/` there (`EngineConfig::linux_images`): the test points `XDG_DATA_HOME` at a
//! temporary directory whose `capsule/images` links to the minimal image. The SDK's default
//! engine keeps the engine's 30 s boot timeout; a nested boot takes 5-16 s.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long an example may take, end to end (a nested boot, a pause and a resume under
/// TCG take well under a minute).
const EXAMPLE_LIMIT: Duration = Duration::from_secs(600);

/// How to run a Python script: the program and its leading arguments, and the environment.
struct Python {
    what: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    /// The folder of the examples.
    examples: PathBuf,
}

/// The Python packed into L1 under `extra/python` (see `xtask/src/l1python.rs`).
fn packed_python(extra: &Path) -> Python {
    let root = extra.join("python");
    let lib = root.join("lib");
    let loader = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}", lib.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ld-linux"))
        })
        .unwrap_or_else(|| panic!("no dynamic loader (ld-linux*) in {}", lib.display()));
    Python {
        what: format!("the Python packed into L1 ({})", root.display()),
        program: loader,
        args: vec![
            "--library-path".into(),
            lib.clone().into(),
            root.join("bin/python3").into(),
        ],
        env: vec![
            ("PYTHONHOME", root.clone().into()),
            ("PYTHONPATH", root.join("site-packages").into()),
        ],
        examples: root.join("examples"),
    }
}

/// A Python on this host that can `import capsule`, if there is one.
fn host_python() -> Option<Python> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("CAPSULE_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push(workspace.join("target/python-venv/bin/python"));
    candidates.push("python3".into());
    // Not from the workspace's python/ folder: its capsule/ has no compiled extension.
    let neutral = std::env::temp_dir();
    let program = candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import capsule"])
            .current_dir(&neutral)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })?;
    Some(Python {
        what: format!("{} (host)", program.display()),
        program,
        args: Vec::new(),
        env: Vec::new(),
        examples: workspace.join("python/examples"),
    })
}

/// What a run of an example left: its output, and the default engine's data directory
/// (whose temporary home is removed with it).
struct Ran {
    stdout: String,
    data_dir: PathBuf,
    _home: tempfile::TempDir,
}

/// Runs `python/examples/NAME` with "minimal", asserting that it exits 0; `None` (SKIPPED)
/// where Linux capsules cannot run or no Python can import `capsule` outside the harness.
fn run_example(name: &str) -> Option<Ran> {
    let nested = std::env::var_os("CAPSULE_NESTED").is_some();
    let packed = std::env::var_os("CAPSULE_NESTED_EXTRA")
        .map(PathBuf::from)
        .filter(|extra| extra.join("python").is_dir());
    // Hardware virtualization and the minimal image, or SKIPPED (the harness has both).
    let (engine, _dir) = common::linux::linux_engine()?;
    drop(engine);
    let python = match packed {
        Some(extra) => packed_python(&extra),
        None if nested => panic!(
            "the nested harness packs Python into L1 ($CAPSULE_NESTED_EXTRA/python) unless \
             --no-python, which skips these tests"
        ),
        None => match host_python() {
            Some(python) => python,
            None => {
                eprintln!(
                    "SKIPPED: no Python here can `import capsule` ($CAPSULE_PYTHON, \
                     target/python-venv/bin/python, python3): `pip install ./python`"
                );
                return None;
            }
        },
    };
    let example = python.examples.join(name);
    assert!(example.is_file(), "{} is missing", example.display());

    // The default engine's data directory, with the minimal image where it looks.
    let home = tempfile::tempdir().expect("temp dir");
    let data_dir = home.path().join("capsule");
    std::fs::create_dir(&data_dir).expect("data dir");
    std::os::unix::fs::symlink(common::linux::images(), data_dir.join("images"))
        .expect("images link");

    let mut cmd = Command::new(&python.program);
    cmd.args(&python.args)
        .arg(&example)
        .envs(python.env.iter().map(|(k, v)| (k, v)))
        .env("CAPSULE_TEST_TEMPLATE", "minimal")
        .env("XDG_DATA_HOME", home.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONNOUSERSITE", "1")
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("running {name} with {}: {cmd:?}", python.what);
    let stdout = common::run_to_success(name, &mut cmd, EXAMPLE_LIMIT);
    Some(Ran {
        stdout,
        data_dir,
        _home: home,
    })
}

/// The capsules left in the data directory of a run (none once the example destroyed its).
fn capsules_left(data_dir: &Path) -> Vec<OsString> {
    std::fs::read_dir(data_dir.join("capsules"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("cl-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn linux_python_lifecycle_example_runs_as_written() {
    let Some(Ran {
        stdout, data_dir, ..
    }) = run_example("lifecycle.py")
    else {
        return;
    };
    // What the example prints: the id, True, "paused".
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let id = lines[0];
    assert!(
        id.strip_prefix("cl-").is_some_and(|rest| !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())),
        "not a capsule id: {id:?}"
    );
    assert_eq!(lines[1..], ["True", "paused"], "{stdout}");
    // The capsule was destroyed: nothing of it is left in the data directory.
    let left = capsules_left(&data_dir);
    assert!(left.is_empty(), "left in the data directory: {left:?}");
}

/// What `guest_io.py` prints with "minimal": one line per part (see the example).
const GUEST_IO_LINES: &[&str] = &[
    "stdin: HELLO CAPSULE exit 0 own thread True",
    "callbacks: whole True stderr two kept True",
    "signal: exit 7 got TERM",
    "processes: listed ['sleep 300'] recent True detached True killed 9",
    "connect: ProcessNotFoundError True",
    "pause: detached True listed True reconnected exit 4 got hello",
    "files: roundtrip True size 1048576 mode 0o600 file recent True text True",
    "list: empty:directory in:directory in/data.bin:file note.txt:file",
    "transfer: up 3145733 down 3145733 same True",
    "stream: up 3145731 down 3145731 same True mode 0o640 raised RuntimeError:stop RuntimeError:stop kept True",
    "file errors: FileNotFoundError:not_found:True IsADirectoryError:is_a_directory:True \
     exists False",
    "user: 1000 /home/tester unknown refused",
    "pty: 24 80 then 50 132, exit 3",
    "done",
];

#[test]
fn linux_python_guest_io_example_runs() {
    let Some(Ran {
        stdout, data_dir, ..
    }) = run_example("guest_io.py")
    else {
        return;
    };
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, GUEST_IO_LINES, "{stdout}");
    let left = capsules_left(&data_dir);
    assert!(left.is_empty(), "left in the data directory: {left:?}");
}

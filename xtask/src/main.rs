//! Project automation for capsule, run as `cargo xtask COMMAND` (alias in .cargo/config.toml).
//!
//! `cargo xtask nested-test [OPTIONS] [-- LIBTEST-ARGS...]` runs the KVM test binaries inside
//! a Linux L1 booted under QEMU TCG (`-cpu max` emulates AMD SVM), where `/dev/kvm` is real
//! hardware-virtualization KVM, nested. `cargo xtask build-minimal` builds the "minimal" Linux
//! template's kernel and initramfs. `cargo xtask soak` runs probe capsules under a random mix of
//! lifecycle operations, checking the engine's invariants after every step. See `xtask/README.md`.

mod binaries;
mod cpio;
mod initramfs;
mod kernel;
mod l1python;
mod l2qemu;
mod minimal;
mod qemu;
mod report;
mod setup;
mod soak;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use initramfs::Extra;
use util::{Context, Error, Result};

const USAGE: &str = "\
usage: cargo xtask nested-test [OPTIONS] [-- LIBTEST-ARGS...]

Runs the KVM test binaries inside a Linux L1 booted under QEMU TCG, where /dev/kvm is
hardware virtualization (nested AMD SVM). LIBTEST-ARGS (a name filter, --skip NAME, --exact,
...) are passed to every test binary. Installs what it needs (apt-get, rustup).

options:
  --all                 run every test: do not add the default --skip list
  -p, --package NAME    test binaries of this package (repeatable; default: capsule and
                        capsule-vmm)
  --timeout SECS        overall limit for the L1 runs together (default 1200; env CAPSULE_NESTED_TIMEOUT)
  --test-threads N      libtest threads inside L1 (default 2)
  --smp N               L1 vCPUs (default 2)
  --memory MB           L1 memory (default 4096)
  --extra SRC[=DEST]    copy host file SRC into L1 at /nested/extra/DEST (repeatable;
                        also env CAPSULE_NESTED_EXTRA_FILES and xtask/nested-files.txt)
  --extra-test PATH     also run this static test executable in L1 (repeatable)
  --linux-report        after the tests, run benches' linux-report in L1: Linux capsule
                        boots, pause/resume, templates and forks vs QEMU microvm and
                        Firecracker (both packed into L1), as JSON lines, repeated in the
                        summary
  --report-only         run linux-report and no tests (implies --linux-report)
  --report-boots N      boots of each kind in linux-report (default 5)
  --firecracker PATH    the Firecracker binary linux-report measures against (default:
                        ../shared/peers/firecracker/firecracker beside the workspace, packed
                        when it exists; without one the report says Firecracker was not
                        measured)
  --no-install          fail instead of installing missing tools
  --no-python           do not pack Python and the capsule SDK into L1 (packed when the
                        capsule package's tests run, from target/python-venv) and skip the
                        test that runs the SDK's lifecycle example
  --no-retry            do not run failed tests a second time (by default a test that fails
                        runs once more, alone, and passing then counts as flaky, not failed;
                        an L1 that hangs (silent for 300 s; env CAPSULE_NESTED_STALL) or
                        crashes is booted again (five L1 runs at most,
                        each skipping the binaries earlier runs finished):
                        TCG's nested SVM now and then corrupts a guest or L1, see
                        xtask/README.md)
  --pack-only           build target/nested/l1.cpio.gz and stop (no boot)
  -h, --help            this text";

/// Packages whose test binaries run in L1 unless `-p` is given.
const DEFAULT_PACKAGES: &[&str] = &["capsule", "capsule-vmm"];

/// Test-name substrings passed as `--skip` unless `--all` (see xtask/README.md, "Default
/// selection"): the two bulk transfers through the agent's channel, which move 100 and 512
/// MiB at the 0.5–1 MB/s that virtio-console reaches under TCG (tens of minutes together, past
/// CI's budget). `cargo test` runs them on hardware-virtualization hosts.
const DEFAULT_SKIP: &[&str] = &[
    "linux_streams_a_hundred_mib_of_binary_output_byte_exact",
    "linux_a_256_mib_random_file_round_trips_through_upload_and_download_in_bounded_memory",
];

/// The host report program: the quickstart example prints `engine.host().virtualization`.
const HOST_REPORT: (&str, &str) = ("capsule", "quickstart");

#[derive(Debug)]
struct Options {
    all: bool,
    packages: Vec<String>,
    timeout: Duration,
    test_threads: u32,
    retry_failed: bool,
    smp: u32,
    memory_mb: u32,
    extra: Vec<Extra>,
    extra_tests: Vec<PathBuf>,
    install: bool,
    /// Whether Python and the SDK are packed for `engine/tests/linux_python.rs`.
    python: bool,
    pack_only: bool,
    linux_report: bool,
    report_only: bool,
    report_boots: u32,
    /// `--firecracker PATH`; `None`: [`DEFAULT_FIRECRACKER`] when it exists.
    firecracker: Option<PathBuf>,
    libtest_args: Vec<String>,
}

/// The Firecracker binary linux-report measures against, relative to the workspace root
/// (the shared peers directory beside the checkout).
const DEFAULT_FIRECRACKER: &str = "../shared/peers/firecracker/firecracker";
/// Where it goes in L1, under `/nested/extra`.
const FIRECRACKER_IN_L1: &str = "firecracker/firecracker";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("nested-test") => parse_options(&args[1..]).and_then(|o| match o {
            Some(options) => nested_test(&options),
            None => Ok(true),
        }),
        Some("build-minimal") => parse_minimal(&args[1..]).and_then(|o| match o {
            Some(options) => {
                let workspace = workspace_root();
                let cache = cache_dir(&workspace);
                fs::create_dir_all(&cache)
                    .context(|| format!("cannot create {}", cache.display()))?;
                minimal::build(&workspace, &cache, &options).map(|_| true)
            }
            None => Ok(true),
        }),
        Some("soak") => soak::parse(&args[1..]).and_then(|o| match o {
            Some(options) => soak::run(&options),
            None => Ok(true),
        }),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(true)
        }
        Some(other) => Err(Error::msg(format!("unknown command {other:?}\n\n{USAGE}"))),
        None => Err(Error::msg(USAGE.to_string())),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

const MINIMAL_USAGE: &str = "\
usage: cargo xtask build-minimal [OPTIONS]

Builds the \"minimal\" Linux template (kernel + initramfs with capsule's agent as PID 1) from
Debian packages: linux-image-cloud-amd64, busybox-static. Writes IMAGES/minimal/vmlinuz and
IMAGES/minimal/initrd.img.

options:
  --images DIR      where to put it (default: $XDG_DATA_HOME/capsule/images, else
                    ~/.local/share/capsule/images: the engine's default)
  --kernel PATH     use this bzImage instead of the Debian package (with --modules)
  --modules DIR     its lib/modules/<release> directory (with --kernel)
  --busybox PATH    use this static busybox instead of busybox-static's
  --no-install      fail instead of installing missing packages
  -h, --help        this text";

/// Parses `build-minimal`'s arguments; `None` when help was printed.
fn parse_minimal(args: &[String]) -> Result<Option<minimal::Options>> {
    let mut o = minimal::Options {
        install: true,
        ..Default::default()
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .context(|| format!("{name} needs a value\n\n{MINIMAL_USAGE}"))
        };
        match arg.as_str() {
            "--images" => o.images = Some(value(arg)?),
            "--kernel" => o.kernel = Some(value(arg)?),
            "--modules" => o.modules = Some(value(arg)?),
            "--busybox" => o.busybox = Some(value(arg)?),
            "--no-install" => o.install = false,
            "-h" | "--help" => {
                println!("{MINIMAL_USAGE}");
                return Ok(None);
            }
            other => {
                return Err(Error::msg(format!(
                    "unknown option {other:?}\n\n{MINIMAL_USAGE}"
                )))
            }
        }
    }
    Ok(Some(o))
}

/// Parses `nested-test`'s arguments; `None` when help was printed.
fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let timeout = match std::env::var("CAPSULE_NESTED_TIMEOUT") {
        Ok(v) => parse_num::<u64>("CAPSULE_NESTED_TIMEOUT", &v)?,
        Err(_) => 1200,
    };
    let mut o = Options {
        all: false,
        packages: Vec::new(),
        timeout: Duration::from_secs(timeout),
        test_threads: 2,
        retry_failed: true,
        smp: 2,
        memory_mb: 4096,
        extra: Vec::new(),
        extra_tests: Vec::new(),
        install: true,
        python: true,
        pack_only: false,
        linux_report: false,
        report_only: false,
        report_boots: 5,
        firecracker: None,
        libtest_args: Vec::new(),
    };
    if let Ok(list) = std::env::var("CAPSULE_NESTED_EXTRA_FILES") {
        for item in list.split_whitespace() {
            o.extra.push(parse_extra(item));
        }
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--" => {
                o.libtest_args.extend(it.by_ref().cloned());
                break;
            }
            "--all" => o.all = true,
            "-p" | "--package" => o.packages.push(value(arg)?),
            "--timeout" => o.timeout = Duration::from_secs(parse_num(arg, &value(arg)?)?),
            "--test-threads" => o.test_threads = parse_num(arg, &value(arg)?)?,
            "--smp" => o.smp = parse_num(arg, &value(arg)?)?,
            "--memory" => o.memory_mb = parse_num(arg, &value(arg)?)?,
            "--extra" => o.extra.push(parse_extra(&value(arg)?)),
            "--extra-test" => o.extra_tests.push(PathBuf::from(value(arg)?)),
            "--no-install" => o.install = false,
            "--no-python" => o.python = false,
            "--no-retry" => o.retry_failed = false,
            "--pack-only" => o.pack_only = true,
            "--linux-report" => o.linux_report = true,
            "--report-only" => {
                o.linux_report = true;
                o.report_only = true;
            }
            "--report-boots" => o.report_boots = parse_num(arg, &value(arg)?)?,
            "--firecracker" => o.firecracker = Some(PathBuf::from(value(arg)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => {
                return Err(Error::msg(format!(
                    "unknown option {other:?} (libtest arguments go after `--`)\n\n{USAGE}"
                )))
            }
        }
    }
    if o.packages.is_empty() {
        o.packages = DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect();
    }
    if o.test_threads == 0 || o.smp == 0 || o.report_boots == 0 {
        return Err(Error::msg(
            "--test-threads, --smp and --report-boots must be at least 1",
        ));
    }
    Ok(Some(o))
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .ok()
        .context(|| format!("{name}: {value:?} is not a valid number"))
}

/// `SRC=DEST`, or `SRC` (destination: its file name).
fn parse_extra(item: &str) -> Extra {
    match item.split_once('=') {
        Some((source, dest)) => Extra {
            source: PathBuf::from(source),
            dest: dest.to_string(),
        },
        None => Extra {
            source: PathBuf::from(item),
            dest: Path::new(item)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
    }
}

/// The workspace root (this crate's parent directory).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cache: `$CAPSULE_NESTED_CACHE`, else `<target dir>/nested`.
fn cache_dir(workspace: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSULE_NESTED_CACHE") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    workspace.join(target).join("nested")
}

/// Reads `xtask/nested-files.txt`: `file SRC [DEST]` and `test SRC [NAME]` lines, `#`
/// comments; `{kernel}` (unpacked kernel package), `{release}` and `{workspace}` expand.
fn read_manifest(
    path: &Path,
    workspace: &Path,
    kernel: &kernel::Kernel,
) -> Result<(Vec<Extra>, Vec<binaries::TestBinary>)> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut extra = Vec::new();
    let mut tests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let expand = |s: &str| {
            s.replace("{kernel}", &kernel.root.to_string_lossy())
                .replace("{release}", &kernel.release)
                .replace("{workspace}", &workspace.to_string_lossy())
        };
        let words: Vec<String> = line.split_whitespace().map(expand).collect();
        let where_ = || format!("{}:{}", path.display(), n + 1);
        let source = words
            .get(1)
            .map(|s| workspace.join(s))
            .context(|| format!("{}: missing SRC", where_()))?;
        let name = words.get(2).cloned().unwrap_or_else(|| {
            source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        match words[0].as_str() {
            "file" => extra.push(Extra { source, dest: name }),
            "test" => tests.push(binaries::TestBinary {
                name: format!("extra.{name}"),
                path: source,
            }),
            other => {
                return Err(Error::msg(format!(
                    "{}: unknown kind {other:?} (want `file` or `test`)",
                    where_()
                )))
            }
        }
    }
    Ok((extra, tests))
}

fn nested_test(o: &Options) -> Result<bool> {
    let started = Instant::now();
    let workspace = workspace_root();
    let cache = cache_dir(&workspace);
    fs::create_dir_all(&cache).context(|| format!("cannot create {}", cache.display()))?;
    println!("xtask: nested-test; cache in {}", cache.display());

    println!("xtask: [1/5] host tools");
    setup::ensure_host_tools(o.install)?;
    setup::ensure_musl_target(o.install)?;

    println!("xtask: [2/5] L1 kernel ({})", kernel::META_PACKAGE);
    let kernel = kernel::fetch(&cache, o.install)?;
    println!(
        "xtask: L1 kernel {} from {} ({}), modules: {}",
        kernel.release,
        kernel.package,
        kernel.vmlinuz.display(),
        kernel
            .modules
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let (mut extra, manifest_tests) = read_manifest(
        &workspace.join("xtask/nested-files.txt"),
        &workspace,
        &kernel,
    )?;
    extra.extend(o.extra.iter().cloned());
    // The "minimal" Linux template, for the Linux-guest tests (they find it in
    // $CAPSULE_NESTED_EXTRA/images).
    let images = cache.join("images");
    minimal::build(
        &workspace,
        &cache,
        &minimal::Options {
            images: Some(images.clone()),
            install: o.install,
            ..Default::default()
        },
    )?;
    for file in ["vmlinuz", "vmlinux", "initrd.img"] {
        if file == "vmlinux" && !images.join("minimal").join(file).is_file() {
            continue; // optional: the bzImage is booted instead
        }
        extra.push(Extra {
            source: images.join("minimal").join(file),
            dest: format!("images/minimal/{file}"),
        });
    }
    for e in &extra {
        initramfs::extra_dest(&e.dest)?;
        if !e.source.is_file() {
            return Err(Error::msg(format!(
                "extra file {} does not exist (from --extra, CAPSULE_NESTED_EXTRA_FILES or \
                 xtask/nested-files.txt)",
                e.source.display()
            )));
        }
    }
    // linux-report: the binary, and QEMU with its libraries and firmware as extra files.
    let linux_report = if o.linux_report {
        let qemu_cmd = match l2qemu::extras() {
            Ok(files) => {
                let cmd = l2qemu::command_in_l1(&files)?;
                extra.extend(files);
                cmd
            }
            Err(e) => {
                println!("xtask: WARNING: QEMU not packed for linux-report ({e}); it will say so");
                "qemu-system-x86_64".to_string()
            }
        };
        let mut env = vec![
            ("CAPSULE_QEMU".to_string(), qemu_cmd),
            (
                "CAPSULE_LINUX_REPORT_BOOTS".to_string(),
                o.report_boots.to_string(),
            ),
        ];
        match firecracker_for_l1(&workspace, o.firecracker.as_deref())? {
            Ok(source) => {
                extra.push(Extra {
                    source,
                    dest: FIRECRACKER_IN_L1.to_string(),
                });
                env.push((
                    "CAPSULE_FIRECRACKER".to_string(),
                    format!("/nested/extra/{FIRECRACKER_IN_L1}"),
                ));
            }
            Err(why) => {
                println!("xtask: WARNING: Firecracker not packed for linux-report: {why}");
                env.push(("CAPSULE_FIRECRACKER_ABSENT".to_string(), why));
            }
        }
        // Passed through from the host when set (see benches/src/bin/linux-report.rs).
        for name in [
            "CAPSULE_LINUX_REPORT_EXECS",
            "CAPSULE_LINUX_REPORT_FILES",
            "CAPSULE_LINUX_REPORT_STREAMS",
            "CAPSULE_LINUX_REPORT_LIFECYCLE",
            "CAPSULE_LINUX_REPORT_HEARTBEAT_MS",
            "CAPSULE_LINUX_REPORT_DMESG",
            "CAPSULE_LINUX_REPORT_PARTS",
            "CAPSULE_QEMU_MACHINE",
        ] {
            if let Ok(value) = std::env::var(name) {
                env.push((name.to_string(), value));
            }
        }
        Some(env)
    } else {
        None
    };
    // Python with the capsule SDK, for the test that runs the SDK's lifecycle example.
    let python = o.python && !o.report_only && o.packages.iter().any(|p| p == "capsule");
    if python {
        let packed = l1python::extras(&workspace, &cache)?;
        println!("xtask: packing {}", packed.summary);
        extra.extend(packed.extras);
    }
    extra.extend(linux_examples(&workspace, &cache, o)?);
    println!("xtask: [3/5] static test binaries ({})", setup::MUSL_TARGET);
    let mut tests = if o.report_only {
        Vec::new()
    } else {
        binaries::build_tests(&workspace, &o.packages)?
    };
    let linux_report = match linux_report {
        Some(env) => {
            let binary = binaries::build_binary(&workspace, "capsule-benches", "linux-report")?;
            println!("xtask:   linux-report  <-  {}", binary.display());
            Some((binary, env))
        }
        None => None,
    };
    let host_report = binaries::build_example(&workspace, HOST_REPORT.0, HOST_REPORT.1)?;
    let exit_helper = binaries::build_exit_helper(&workspace.join("xtask/l1/exit.rs"), &cache)?;
    if !o.report_only {
        tests.extend(manifest_tests);
    }
    for path in o.extra_tests.iter().filter(|_| !o.report_only) {
        tests.push(binaries::TestBinary {
            name: format!(
                "extra.{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            path: path.clone(),
        });
    }
    for test in &tests {
        let bytes =
            fs::read(&test.path).context(|| format!("test binary {}", test.path.display()))?;
        if !util::is_static_elf(&bytes) {
            return Err(Error::msg(format!(
                "{} is not a static x86_64 executable: it cannot run in L1",
                test.path.display()
            )));
        }
        println!("xtask:   {}  <-  {}", test.name, test.path.display());
    }
    let qemu_libs = extra
        .iter()
        .filter(|e| e.dest.starts_with("qemu/lib/"))
        .count();
    let quiet = |e: &&Extra| e.dest.starts_with("qemu/lib/") || e.dest.starts_with("python/");
    for e in extra.iter().filter(|e| !quiet(e)) {
        println!(
            "xtask:   extra /nested/extra/{}  <-  {}",
            e.dest,
            e.source.display()
        );
    }
    if qemu_libs > 0 {
        println!("xtask:   extra /nested/extra/qemu/lib/: QEMU's {qemu_libs} shared libraries and its loader (from ldd)");
    }

    let mut libtest_args = Vec::new();
    if !o.all {
        for name in DEFAULT_SKIP {
            libtest_args.push("--skip".to_string());
            libtest_args.push((*name).to_string());
        }
    }
    if !python && !o.report_only {
        libtest_args.push("--skip".to_string());
        libtest_args.push(l1python::TEST.to_string());
    }
    libtest_args.extend(o.libtest_args.iter().cloned());

    println!("xtask: [4/5] L1 initramfs");
    let initrd = cache.join("l1.cpio.gz");
    let contents = initramfs::Contents {
        busybox: PathBuf::from(setup::BUSYBOX),
        exit_helper,
        modules: kernel.modules.clone(),
        tests,
        host_report: Some(host_report),
        extra,
        args: libtest_args.clone(),
        test_threads: o.test_threads,
        retry_failed: o.retry_failed,
        linux_report,
    };
    let size = initramfs::pack(&contents, &cache.join("stage"), &initrd)?;
    println!(
        "xtask: {} ({:.1} MiB); libtest arguments in L1: --test-threads={} {}",
        initrd.display(),
        size as f64 / (1024.0 * 1024.0),
        o.test_threads,
        libtest_args.join(" ")
    );
    let prepared = started.elapsed();
    if o.pack_only {
        println!(
            "xtask: --pack-only: not booting L1 (kernel {})",
            kernel.vmlinuz.display()
        );
        return Ok(true);
    }

    println!("xtask: [5/5] boot L1 (QEMU TCG, -cpu max: nested SVM)");
    let log = cache.join("l1-console.log");
    let first_boot = Instant::now();
    let mut boot = qemu::Boot {
        kernel: kernel.vmlinuz.clone(),
        initrd: initrd.clone(),
        smp: o.smp,
        memory_mb: o.memory_mb,
        timeout: o.timeout,
        stall: l1_stall(),
    };
    let mut outcome = qemu::boot(&boot, &log)?;
    // An L1 that hung or died is the emulator failing, not a test (see xtask/README.md):
    // boot it again, up to L1_RUNS times in all and within the one --timeout, running only
    // what no earlier run saw end: binaries they finished are skipped, and so are the tests
    // they saw pass in the binary they were in; tests they saw fail run again (and count as
    // flaky if they pass). The summary says so and merges the runs.
    let mut broken_runs = Vec::new();
    let mut resume = Resume::default();
    // Why tests failed in runs that broke down, for the summary.
    let mut panics = Vec::new();
    while o.retry_failed && broken_runs.len() + 1 < L1_RUNS {
        let Some(why) = l1_broke(&outcome) else {
            break;
        };
        let Some(left) = o
            .timeout
            .checked_sub(first_boot.elapsed())
            .filter(|left| *left >= L1_RUN_AT_LEAST)
        else {
            println!(
                "xtask: L1 run {} {why}; too little of --timeout left to boot it again",
                broken_runs.len() + 1
            );
            break;
        };
        panics.append(&mut outcome.report.panics);
        resume.take(std::mem::take(&mut outcome.report.binaries));
        boot.initrd = cache.join("l1-resume.cpio.gz");
        initramfs::with_resume(&initrd, &boot.initrd, &resume.list())?;
        boot.timeout = left;
        let earlier_log = cache.join(format!("l1-console-run{}.log", broken_runs.len() + 1));
        let _ = std::fs::rename(&log, &earlier_log);
        println!(
            "xtask: L1 run {} {why}; booting L1 once more (its console: {}); {}",
            broken_runs.len() + 1,
            earlier_log.display(),
            resume.describe()
        );
        broken_runs.push(why);
        outcome = qemu::boot(&boot, &log)?;
    }
    resume.merge_into(&mut outcome.report.binaries);
    panics.append(&mut outcome.report.panics);
    outcome.report.panics = panics;
    for (i, why) in broken_runs.iter().enumerate() {
        println!(
            "xtask: NOTE: this is L1 run {}; run {} {why}",
            broken_runs.len() + 1,
            i + 1
        );
    }
    Ok(summarize(o, &outcome, prepared, started.elapsed(), &log))
}

/// Most L1 boots in one nested run: an L1 that breaks down (TCG's emulation of nested SVM
/// now and then corrupts L1's own state under load, see xtask/README.md) is booted again, at
/// most this many times in all, each running only what the earlier ones did not see end.
/// The Linux tests keep L1 busy for tens of minutes and TCG's fault comes with VM exits, so
/// a long run is exposed for longer: five breakdowns in one CI run were seen (QEMU 7.2 and
/// 10.0 alike).
const L1_RUNS: usize = 10;
/// The least time left of `--timeout` worth booting L1 again for.
const L1_RUN_AT_LEAST: Duration = Duration::from_secs(240);

/// What the L1 runs that broke down saw end, for the next run to skip and the summary to
/// merge (see [`report::Earlier`]).
#[derive(Default)]
struct Resume {
    /// Binaries that ran to their end, with their figures.
    finished: Vec<report::BinaryRun>,
    /// Per binary that an L1 run broke down in: the tests seen ending.
    partial: Vec<(String, report::Earlier)>,
}

impl Resume {
    /// Takes the binaries of an L1 run that broke down.
    fn take(&mut self, runs: Vec<report::BinaryRun>) {
        for run in runs {
            if self.finished.iter().any(|c| c.name == run.name) {
                continue;
            }
            if run.finished() {
                self.keep(run);
            } else {
                match self.partial.iter_mut().find(|(n, _)| *n == run.name) {
                    Some((_, earlier)) => earlier.add(&run),
                    None => {
                        let mut earlier = report::Earlier::default();
                        earlier.add(&run);
                        self.partial.push((run.name.clone(), earlier));
                    }
                }
            }
        }
    }

    /// `/nested/resume.list` (see [`initramfs::with_resume`]).
    fn list(&self) -> String {
        let mut list = String::new();
        for run in &self.finished {
            list.push_str(&format!("done {}\n", run.name));
        }
        for (name, earlier) in &self.partial {
            for test in earlier.skipped() {
                list.push_str(&format!("passed {name} {test}\n"));
            }
        }
        list
    }

    fn describe(&self) -> String {
        let tests: usize = self.partial.iter().map(|(_, e)| e.skipped().count()).sum();
        format!(
            "skipping {} finished test binaries and {tests} tests seen passing in an unfinished one",
            self.finished.len()
        )
    }

    /// Puts the earlier runs' figures in front of the last run's.
    fn merge_into(mut self, last: &mut Vec<report::BinaryRun>) {
        if self.finished.is_empty() && self.partial.is_empty() {
            return;
        }
        for run in std::mem::take(last) {
            if !self.finished.iter().any(|c| c.name == run.name) {
                self.keep(run);
            }
        }
        *last = self.finished;
    }

    /// Keeps `run` with what earlier runs that broke down in its binary saw folded in.
    fn keep(&mut self, mut run: report::BinaryRun) {
        if let Some(at) = self.partial.iter().position(|(n, _)| *n == run.name) {
            run.fold_earlier(self.partial.remove(at).1);
        }
        self.finished.push(run);
    }
}

/// The Firecracker binary to pack for linux-report: `--firecracker PATH` (which must exist),
/// else [`DEFAULT_FIRECRACKER`] under the workspace when it exists. `Ok(Err(why))`: none, and
/// why (the report prints it).
fn firecracker_for_l1(
    workspace: &Path,
    flag: Option<&Path>,
) -> Result<std::result::Result<PathBuf, String>> {
    let (path, given) = match flag {
        Some(path) => (path.to_path_buf(), true),
        None => (workspace.join(DEFAULT_FIRECRACKER), false),
    };
    if path.is_file() {
        let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
        if !util::is_static_elf(&bytes) {
            return Err(Error::msg(format!(
                "{} is not a static x86_64 executable: it cannot run in L1",
                path.display()
            )));
        }
        return Ok(Ok(path));
    }
    if given {
        return Err(Error::msg(format!(
            "--firecracker {}: no such file",
            path.display()
        )));
    }
    Ok(Err(format!(
        "no Firecracker binary at {} (pass --firecracker PATH)",
        path.display()
    )))
}

/// How long L1 may print nothing before it counts as hung (env `CAPSULE_NESTED_STALL`,
/// seconds, overrides it).
const L1_STALL: Duration = Duration::from_secs(300);

fn l1_stall() -> Duration {
    std::env::var("CAPSULE_NESTED_STALL")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(L1_STALL, Duration::from_secs)
}

/// Why an L1 run broke down by itself (hung, or stopped before `/init` finished), if it did.
fn l1_broke(outcome: &qemu::Outcome) -> Option<String> {
    if let Some(silence) = outcome.stalled {
        Some(format!(
            "{}, after {:.0} s",
            qemu::describe_silence(silence, outcome.test_stuck),
            outcome.wall.as_secs_f64()
        ))
    } else if let Some(stuck) = outcome.locked_up {
        Some(format!(
            "hung (a CPU stuck, soft lockup or RCU stall, for {} s, after {:.0} s)",
            stuck.as_secs(),
            outcome.wall.as_secs_f64()
        ))
    } else if outcome.report.done.is_none()
        && !outcome.timed_out
        && outcome.report.init_at.is_some()
    {
        Some(format!(
            "stopped after {:.0} s before /init finished (L1 crashed)",
            outcome.wall.as_secs_f64()
        ))
    } else {
        None
    }
}

/// Prints the summary and the final `N passed, M failed, K skipped` line; true on success.
fn summarize(
    o: &Options,
    outcome: &qemu::Outcome,
    prepared: Duration,
    total: Duration,
    log: &Path,
) -> bool {
    let r = &outcome.report;
    let secs = |d: Option<Duration>| {
        d.map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".to_string())
    };
    println!("xtask: ==== nested-test summary ====");
    println!(
        "xtask: host preparation {:.1} s; L1 run {:.1} s; total {:.1} s; console log {}",
        prepared.as_secs_f64(),
        outcome.wall.as_secs_f64(),
        total.as_secs_f64(),
        log.display()
    );
    println!(
        "xtask: L1 reached /init after {} ({}); /dev/kvm ready after {}",
        secs(r.init_at),
        r.kernel.as_deref().unwrap_or("-"),
        secs(r.kvm_ready_at)
    );
    println!(
        "xtask: KVM seen by the engine inside L1: {}",
        r.host_kvm.as_deref().unwrap_or("(not reported)")
    );
    for b in &r.binaries {
        let state = match (b.exit_code, b.failures(), b.flaky()) {
            (None, _, _) => "UNFINISHED".to_string(),
            (Some(_), 0, 0) => "ok".to_string(),
            (Some(_), 0, _) => "ok (flaky)".to_string(),
            (Some(code), _, _) => format!("FAILED (exit {code})"),
        };
        println!(
            "xtask:   {:<32} {:<18} {:>3} passed, {:>2} failed, {:>2} ignored, {:>2} filtered out  {}",
            b.name,
            state,
            b.counts.passed,
            b.failures(),
            b.counts.ignored,
            b.counts.filtered_out,
            secs(b.elapsed)
        );
    }
    for b in &r.binaries {
        if let Some(retry) = &b.retry {
            println!(
                "xtask:   {} run again: {} -> {}",
                b.name,
                retry.tests.join(" "),
                match (retry.exit_code, retry.counts.passed, retry.counts.failed) {
                    (None, _, _) => "did not finish".to_string(),
                    (Some(0), _, 0) => "all passed (counted as flaky)".to_string(),
                    (_, passed, failed) =>
                        format!("{passed} passed (flaky), {failed} failed again"),
                }
            );
        }
    }
    for b in &r.binaries {
        if let Some(earlier) = &b.earlier {
            println!(
                "xtask:   {} resumed after an L1 breakdown: {} test(s) that passed before it were \
                 not run again; failed before it and run again: {}",
                b.name,
                earlier.skipped().count(),
                if earlier.failed.is_empty() && earlier.recovered.is_empty() {
                    "none".to_string()
                } else {
                    earlier
                        .failed
                        .iter()
                        .chain(&earlier.recovered)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            );
        }
    }
    // Last, so the end of the output (all a CI log may keep) says why each test failed.
    for p in r.failure_panics() {
        println!(
            "xtask:   why {} {} failed{}: {} (at {})",
            p.binary,
            p.test,
            if p.retry { " again" } else { "" },
            p.message,
            p.location
        );
    }
    let totals = r.totals();
    println!(
        "xtask: test binaries took {:.1} s in L1; {} test(s) filtered out by the selection",
        r.tests_elapsed().as_secs_f64(),
        totals.filtered_out
    );

    let mut problems = Vec::new();
    if outcome.timed_out {
        problems.push("the L1 run timed out (raise --timeout or CAPSULE_NESTED_TIMEOUT)".into());
    }
    if r.init_at.is_none() {
        problems.push("L1 never ran /init".to_string());
    }
    for e in &r.errors {
        problems.push(format!("L1: {e}"));
    }
    if r.init_at.is_some() && r.kvm_ready_at.is_none() {
        problems.push("L1 did not get /dev/kvm".to_string());
    }
    if let Some(kvm) = &r.host_kvm {
        if !kvm.starts_with("hardware virtualization") {
            problems.push(format!(
                "KVM inside L1 is not hardware virtualization: {kvm}"
            ));
        }
    }
    match (
        r.done,
        outcome.status.and_then(|s| s.code()),
        outcome.stalled,
    ) {
        (Some(code), Some(status), _) if status != code * 2 + 1 => problems.push(format!(
            "/init finished with {code} but QEMU exited {status} (isa-debug-exit expects {})",
            code * 2 + 1
        )),
        (None, _, Some(silence)) => problems.push(format!(
            "L1 {}",
            qemu::describe_silence(silence, outcome.test_stuck)
        )),
        (None, _, None) if outcome.locked_up.is_some() => problems.push(format!(
            "L1 hung: a CPU stuck (soft lockup or RCU stall) for {} s",
            outcome.locked_up.map_or(0, |d| d.as_secs())
        )),
        (None, _, None) if !outcome.timed_out => {
            problems.push("L1 stopped before /init finished".to_string())
        }
        _ => {}
    }
    if totals.failed > 0 {
        problems.push(format!("{} test(s) failed", totals.failed));
    }
    if !o.report_only && r.kvm_ready_at.is_some() && totals.passed + totals.failed == 0 {
        problems.push("no test ran (check the filter)".to_string());
    }
    if o.linux_report {
        problems.extend(summarize_linux_report(
            &r.linux_report,
            r.kvm_ready_at.is_some(),
        ));
    }
    for p in &problems {
        println!("xtask: FAILURE: {p}");
    }
    println!(
        "{} passed, {} failed, {} flaky (failed, then passed alone), {} skipped",
        totals.passed, totals.failed, totals.flaky, totals.ignored
    );
    problems.is_empty()
}

/// Prints linux-report's JSON lines (unprefixed, so `grep '^{"metric"'` finds them) and
/// notes; returns its problems.
fn summarize_linux_report(lr: &report::LinuxReport, kvm_ready: bool) -> Vec<String> {
    let mut problems = Vec::new();
    println!(
        "xtask: linux-report (Linux capsule vs QEMU microvm and Firecracker, same L1 run; {}):",
        lr.elapsed.map_or("unfinished".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        ))
    );
    for line in &lr.metrics {
        println!("{line}");
    }
    for note in &lr.notes {
        println!("xtask:   {note}");
    }
    if !kvm_ready {
        return problems;
    }
    match lr.exit_code {
        None if lr.started => problems.push("linux-report did not finish".to_string()),
        None => problems.push("linux-report did not run".to_string()),
        Some(0) => {}
        Some(code) => problems.push(format!("linux-report failed (exit {code})")),
    }
    let skipped = lr.notes.iter().any(|n| n.contains("SKIPPED"));
    // A run of some parts only (`CAPSULE_LINUX_REPORT_PARTS`) has boots only when asked.
    let boots_asked = std::env::var("CAPSULE_LINUX_REPORT_PARTS")
        .map_or(true, |parts| parts.split(',').any(|p| p.trim() == "boot"));
    if lr.exit_code == Some(0)
        && !skipped
        && boots_asked
        && !lr
            .metrics
            .iter()
            .any(|m| m.contains("\"linux_boot_to_ready\""))
    {
        problems.push("linux-report printed no linux_boot_to_ready".to_string());
    }
    problems
}

/// The examples of Linux-capsule features that `engine/tests/linux_examples.rs` runs in L1.
const LINUX_EXAMPLES: &[&str] = &["streaming_build", "pty_session", "files_in_and_out"];

/// The [`LINUX_EXAMPLES`] of the `capsule` package, built for musl (static) and stripped
/// (copies in `CACHE/examples/`), as extra files `examples/NAME`, when the `capsule`
/// package's tests run (not with `--report-only`).
fn linux_examples(workspace: &Path, cache: &Path, o: &Options) -> Result<Vec<Extra>> {
    if o.report_only || !o.packages.iter().any(|p| p == "capsule") {
        return Ok(Vec::new());
    }
    let stage = cache.join("examples");
    fs::create_dir_all(&stage).context(|| format!("cannot create {}", stage.display()))?;
    let mut extras = Vec::new();
    for name in LINUX_EXAMPLES {
        let binary = binaries::build_example(workspace, "capsule", name)?;
        extras.push(Extra {
            source: initramfs::stripped(&binary, &stage.join(name))?,
            dest: format!("examples/{name}"),
        });
    }
    Ok(extras)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = parse_options(&args(&[
            "--all",
            "-p",
            "capsule-vmm",
            "--timeout",
            "60",
            "--extra",
            "a/b=c/d",
            "--",
            "lifecycle",
            "--exact",
        ]))
        .unwrap()
        .unwrap();
        assert!(o.all);
        assert_eq!(o.packages, ["capsule-vmm"]);
        assert_eq!(o.timeout, Duration::from_secs(60));
        assert_eq!(o.libtest_args, ["lifecycle", "--exact"]);
        assert!(o
            .extra
            .iter()
            .any(|e| e.source == Path::new("a/b") && e.dest == "c/d"));
        let o = parse_options(&[]).unwrap().unwrap();
        assert_eq!(o.packages, DEFAULT_PACKAGES);
        assert!(parse_options(&args(&["--bogus"])).is_err());
        assert!(parse_options(&args(&["--timeout"])).is_err());
    }

    #[test]
    fn firecracker_option() {
        let o = parse_options(&args(&["--report-only", "--firecracker", "/x/fc"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.firecracker.as_deref(), Some(Path::new("/x/fc")));
        assert!(o.report_only && o.linux_report);
        assert!(parse_options(&args(&["--firecracker"])).is_err());
        // A missing default is not an error (the report says so); a missing --firecracker is.
        let dir = std::env::temp_dir().join(format!("xtask-fc-{}", std::process::id()));
        let why = firecracker_for_l1(&dir, None).unwrap().unwrap_err();
        assert!(why.contains("no Firecracker binary"), "{why}");
        assert!(firecracker_for_l1(&dir, Some(&dir.join("fc"))).is_err());
        // Not static: refused.
        assert!(firecracker_for_l1(&dir, Some(Path::new("/bin/sh"))).is_err());
    }

    #[test]
    fn extra_without_destination_keeps_its_name() {
        let e = parse_extra("target/guest/vmlinux");
        assert_eq!(e.dest, "vmlinux");
    }
}

//! `capsule-agent`: the in-guest agent binary. See the library docs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use capsule_agent::init::{self, DEFAULT_CHANNEL, DEFAULT_MODULES_FILE};
use capsule_agent::{serve, ExecConfig, Reaper, ServeConfig, ServeOutcome, WaitMode};

const USAGE: &str = "usage: capsule-agent [--stdio | --channel PATH] [--ready] [--modules FILE]
       capsule-agent --heartbeat MS

As PID 1: mounts /proc, /sys, /dev, /tmp, /run, prints the boot marker on the
console (unless capsule.marker=0), starts the heartbeat (capsule.heartbeat=MS),
loads the modules listed in FILE (default /etc/capsule/modules), reaps orphans
and serves on PATH (default from capsule.channel= on the kernel command line,
else /dev/hvc1), reopening it whenever it closes. Otherwise serves once on PATH
or on stdin/stdout.

--heartbeat MS prints `capsule-hb N` on /dev/console every MS milliseconds,
forever (a benchmark's sign of life after a snapshot is restored).";

#[derive(Debug, Default)]
struct Args {
    stdio: bool,
    channel: Option<String>,
    ready: bool,
    modules: Option<PathBuf>,
    heartbeat: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--stdio" => args.stdio = true,
            "--ready" => args.ready = true,
            "--channel" => args.channel = Some(it.next().ok_or("--channel needs a path")?),
            "--modules" => args.modules = Some(it.next().ok_or("--modules needs a path")?.into()),
            "--heartbeat" => {
                let ms = it
                    .next()
                    .ok_or("--heartbeat needs a number of milliseconds")?;
                args.heartbeat = Some(
                    init::parse_heartbeat_ms(&ms)
                        .ok_or(format!("--heartbeat {ms:?}: want a positive number of ms"))?,
                );
            }
            "--version" | "-V" => {
                println!("capsule-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.stdio && args.channel.is_some() {
        return Err("--stdio and --channel exclude each other".into());
    }
    Ok(args)
}

fn log_outcome(r: &Result<ServeOutcome, capsule_agent::ServeError>) {
    match r {
        Ok(ServeOutcome::Closed) => eprintln!("capsule-agent: channel closed"),
        Ok(other) => eprintln!("capsule-agent: connection ended: {other:?}"),
        Err(e) => eprintln!("capsule-agent: {e}"),
    }
}

/// PID 1: set the guest up, then serve forever.
fn pid1_main(args: Args) -> ! {
    // Before any thread exists, so every thread inherits the mask and the
    // reaper is woken by SIGCHLD.
    if let Err(e) = Reaper::block_sigchld() {
        eprintln!("capsule-agent: cannot block SIGCHLD ({e}); reaping by polling");
    }
    for (target, e) in init::mount_basics() {
        eprintln!("capsule-agent: mount {target}: {e}");
    }
    // The boot options need /proc; the marker and the heartbeat come before the modules and
    // the channel, which some VMMs (Firecracker) never provide.
    let boot = init::parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if boot.marker {
        init::print_marker();
    }
    if let Some(interval) = boot.heartbeat {
        if let Err(e) = init::start_heartbeat(interval) {
            eprintln!("capsule-agent: cannot start the heartbeat thread: {e}");
        }
    }
    let modules = args
        .modules
        .clone()
        .unwrap_or_else(|| DEFAULT_MODULES_FILE.into());
    for m in init::load_modules(&modules) {
        if let Err(e) = m.result {
            eprintln!("capsule-agent: module {}: {e}", m.path);
        }
    }
    let channel = args
        .channel
        .or(boot.channel)
        .unwrap_or_else(|| DEFAULT_CHANNEL.into());
    let _ = std::env::set_current_dir("/");

    let reaper = Reaper::new(Duration::from_secs(1));
    let r2 = Arc::clone(&reaper);
    if let Err(e) = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || r2.run())
    {
        // Without a reaper thread, reap from the serving loop between connections.
        eprintln!("capsule-agent: cannot start reaper thread: {e}");
    }
    let mut config = ServeConfig {
        pid1: true,
        ready_line: args.ready || boot.ready,
        exec: ExecConfig {
            wait_mode: WaitMode::Global(Arc::clone(&reaper)),
            ..ExecConfig::default()
        },
        // The channel reopens: a later connection may attach to them.
        keep_processes: true,
        ..ServeConfig::default()
    };
    loop {
        let file = init::open_channel(&channel, Duration::from_millis(10));
        let result = file
            .try_clone()
            .map_err(capsule_agent::ServeError::Read)
            .and_then(|reader| serve(reader, file, &config));
        log_outcome(&result);
        // The ready line marks the first connection only.
        config.ready_line = false;
        reaper.reap_now();
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("capsule-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if std::process::id() == 1 {
        pid1_main(args);
    }
    if let Some(interval) = args.heartbeat {
        init::run_heartbeat(&mut init::console_writer(), interval);
    }
    let config = ServeConfig {
        ready_line: args.ready,
        ..ServeConfig::default()
    };
    let result = if args.stdio {
        serve(std::io::stdin(), std::io::stdout(), &config)
    } else if let Some(path) = &args.channel {
        let file = init::open_channel(path, Duration::from_millis(10));
        file.try_clone()
            .map_err(capsule_agent::ServeError::Read)
            .and_then(|reader| serve(reader, file, &config))
    } else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    log_outcome(&result);
    match result {
        Ok(ServeOutcome::Closed) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

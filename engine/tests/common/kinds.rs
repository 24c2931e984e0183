//! The lifecycle tests for both guest kinds: the built-in probe and the "minimal" Linux
//! capsule. [`Kind`] gives each kind's engine, capsule configuration and the commands for
//! what both guests can do (a counter kept across pauses, echo, memory written and
//! checksummed, a long command, a crash), so one test body runs for both.
//! [`for_both_kinds!`] turns a body `fn name(kind: Kind)` into the tests `name::probe` and
//! `name::linux` (the nested harness selects the latter with `-- linux`).
//!
//! Linux variants print SKIPPED where Linux cannot boot (see [`super::linux`]); inside the
//! nested harness a boot takes 5-16 s and a command 10-100 ms, so their waits are longer.
//! Keep at most about four Linux capsules alive per test: the nested L1 has 4 GiB and runs
//! two tests at once.

use std::path::Path;
use std::time::{Duration, Instant};

use capsule::{
    Capsule, CapsuleConfigBuilder, CommandOutput, Engine, EngineConfig, EngineConfigBuilder,
    Result, RunOptions, Status,
};

use super::linux::{boot_timeout, images, linux_engine_with, minimal};
use super::{engine_with, probe};

/// Generates, for each body `fn name(kind: Kind)`, a module `name` with the tests `probe`
/// and `linux`.
#[allow(unused_macros)] // not every test file has tests for both kinds
macro_rules! for_both_kinds {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[test]
            fn probe() {
                super::$body(crate::common::kinds::Kind::Probe)
            }

            #[test]
            fn linux() {
                super::$body(crate::common::kinds::Kind::Linux)
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use for_both_kinds;

/// A guest kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The built-in probe guest, on this host's /dev/kvm.
    Probe,
    /// A "minimal" Linux capsule (hardware virtualization and the image needed).
    Linux,
}

impl Kind {
    /// `probe` for the probe, `linux` for Linux: the kind's own value of a setting.
    pub fn pick<T>(self, probe: T, linux: T) -> T {
        match self {
            Kind::Probe => probe,
            Kind::Linux => linux,
        }
    }

    /// The built-in template's name.
    pub fn template(self) -> &'static str {
        self.pick("probe", "minimal")
    }

    /// An engine over a fresh data directory that can run this kind, or `None` (SKIPPED
    /// printed) where it cannot.
    pub fn engine(self) -> Option<(Engine, tempfile::TempDir)> {
        self.engine_with(|c| c)
    }

    /// Like [`Kind::engine`], with the configuration adjusted by `adjust`.
    pub fn engine_with(
        self,
        adjust: impl FnOnce(EngineConfigBuilder) -> EngineConfigBuilder,
    ) -> Option<(Engine, tempfile::TempDir)> {
        match self {
            Kind::Probe => engine_with(adjust),
            Kind::Linux => linux_engine_with(adjust),
        }
    }

    /// Another engine on the data directory `dir`, configured like [`Kind::engine`]'s.
    pub fn open(self, dir: &Path) -> Result<Engine> {
        let config = EngineConfig::builder().data_dir(dir);
        Engine::new(match self {
            Kind::Probe => config,
            Kind::Linux => config.linux_images(images()).boot_timeout(boot_timeout()),
        })
    }

    /// A small capsule of this kind: 32 MiB probe, 256 MiB Linux ([`Kind::memory_mb`]).
    pub fn config(self) -> CapsuleConfigBuilder {
        match self {
            Kind::Probe => probe(),
            Kind::Linux => minimal(),
        }
    }

    /// The memory of [`Kind::config`], in MiB.
    pub fn memory_mb(self) -> u64 {
        self.pick(32, 256)
    }

    /// How long a capsule may take to become running: a probe starts in milliseconds, a
    /// Linux boot inside the nested harness in up to 16 s (more with other tests running).
    pub fn start_patience(self) -> Duration {
        self.pick(
            Duration::from_secs(20),
            boot_timeout() + Duration::from_secs(30),
        )
    }

    /// Runs `command`: the probe with the default options, Linux with a 120 s timeout (in
    /// the nested harness two emulated CPUs carry several guests).
    pub fn run(self, c: &Capsule, command: &str) -> Result<CommandOutput> {
        match self {
            Kind::Probe => c.commands().run(command),
            Kind::Linux => c
                .commands()
                .run_with(command, RunOptions::new().timeout(Duration::from_secs(120))),
        }
    }

    /// Runs `command`, which must succeed with exit code 0; returns its stdout.
    pub fn out(self, c: &Capsule, command: &str) -> String {
        let out = self
            .run(c, command)
            .unwrap_or_else(|e| panic!("{command}: {e}; {:?}", c.info()));
        assert_eq!(out.exit_code, Some(0), "{command}: {out:?}");
        out.stdout_str().into_owned()
    }

    /// Increments a counter kept in the guest (memory for the probe, a file in tmpfs for
    /// Linux) and prints it: `1`, `2`, ... across pauses, resumes and forks.
    pub fn count(self) -> &'static str {
        self.pick(
            "count",
            "n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/count; echo $n",
        )
    }

    /// Prints `text` and a newline.
    pub fn echo(self, text: &str) -> String {
        format!("echo {text}")
    }

    /// Writes `pages` 4 KiB pages of new data into guest memory and prints a checksum: on
    /// the probe, of those pages (`touch`); on Linux, random bytes appended to a tmpfs file,
    /// of the whole file. Either way, right after the first `touch` it prints what
    /// [`Kind::sum`] prints, and any later `touch` changes what `sum` prints.
    pub fn touch(self, pages: u64) -> String {
        match self {
            Kind::Probe => format!("touch {pages}"),
            Kind::Linux => format!(
                "head -c {} /dev/urandom >> /tmp/m && md5sum /tmp/m",
                pages * 4096
            ),
        }
    }

    /// Prints the checksum of everything [`Kind::touch`] wrote so far.
    pub fn sum(self) -> &'static str {
        self.pick("sum", "md5sum /tmp/m")
    }

    /// A command that keeps the capsule busy for about `wanted` (run it without a timeout):
    /// a calibrated `spin` on the probe, `sleep` on Linux.
    pub fn long_command(self, c: &Capsule, wanted: Duration) -> String {
        match self {
            Kind::Probe => format!("spin {}", spin_for(c, wanted)),
            Kind::Linux => format!("sleep {:.3}", wanted.as_secs_f64()),
        }
    }

    /// Crashes the guest (the probe's `crash`; a Linux kernel panic through sysrq) and
    /// waits until the capsule is in error.
    pub fn crash(self, c: &Capsule) {
        let _ = match self {
            Kind::Probe => c.commands().run("crash"),
            Kind::Linux => c.commands().run_with(
                "echo c > /proc/sysrq-trigger",
                RunOptions::new().timeout(Duration::from_secs(10)),
            ),
        };
        let deadline = Instant::now() + self.pick(Duration::ZERO, Duration::from_secs(60));
        assert_eq!(
            wait_for_status(c, Status::Error, deadline),
            Status::Error,
            "{:?}",
            c.info()
        );
    }
}

/// Polls `c` until its status is `want` or `deadline` passes (it looks at least once);
/// returns the last status seen.
pub fn wait_for_status(c: &Capsule, want: Status, deadline: Instant) -> Status {
    loop {
        let status = c.status();
        if status == want || Instant::now() >= deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `spin` argument that keeps a probe vCPU busy for about `wanted` on this host: the
/// calibration spin grows until it takes at least 100 ms, so that a command's own cost (an
/// exit, milliseconds under nested TCG) does not count as spinning.
fn spin_for(capsule: &Capsule, wanted: Duration) -> u64 {
    let mut probe = 1_000_000u64;
    loop {
        let t = Instant::now();
        capsule
            .commands()
            .run_with(format!("spin {probe}"), RunOptions::new().no_timeout())
            .unwrap();
        let took = t.elapsed();
        if took >= Duration::from_millis(100) || probe >= 1 << 40 {
            return (wanted.as_secs_f64() / took.as_secs_f64() * probe as f64) as u64;
        }
        probe *= 4;
    }
}

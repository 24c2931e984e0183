//! Writes the fuzz targets' seed corpus (`fuzz/corpus/<target>/`) with the real encoders, or
//! checks that the checked-in seeds are still valid inputs.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus              # all targets
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus -- state_file # some
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus -- --check    # verify
//! ```
//!
//! Generating replaces each named target's corpus directory and checks every seed before
//! writing it; `snapshot_state` seeds come from real paused probe capsules, so they need
//! `/dev/kvm`. `--check` needs no KVM: it decodes every checked-in seed with its target's
//! decoder and fails if one is rejected (a format change that needs new seeds).

mod agent;
mod probe;
mod state;
mod virtio;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::{fs, io};

/// One seed input.
pub struct Seed {
    /// File name in the target's corpus directory.
    pub name: &'static str,
    /// The input.
    pub bytes: Vec<u8>,
}

impl Seed {
    /// A seed named `name`.
    pub fn new(name: &'static str, bytes: Vec<u8>) -> Seed {
        Seed { name, bytes }
    }
}

/// What the generator knows about one fuzz target.
struct Target {
    name: &'static str,
    /// Builds the seeds.
    seeds: fn() -> Result<Vec<Seed>, String>,
    /// Whether the target's decoder accepts an input (what a seed must be).
    check: fn(&[u8]) -> Result<(), String>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "probe_mailbox",
        seeds: probe::seeds,
        check: probe::check,
    },
    Target {
        name: "state_file",
        seeds: state::state_file_seeds,
        check: state::check_state_file,
    },
    Target {
        name: "snapshot_state",
        seeds: state::snapshot_seeds,
        check: state::check_snapshot,
    },
    Target {
        name: "virtio_mmio",
        seeds: virtio::mmio_seeds,
        check: virtio::check_mmio,
    },
    Target {
        name: "linux_devices",
        seeds: virtio::linux_devices_seeds,
        check: virtio::check_linux_devices,
    },
    Target {
        name: "virtio_queue",
        seeds: virtio::queue_seeds,
        check: virtio::check_queue,
    },
    Target {
        name: "agent_frame_host",
        seeds: agent::host_seeds,
        check: agent::check_host,
    },
    Target {
        name: "agent_frame_guest",
        seeds: agent::guest_seeds,
        check: agent::check_guest,
    },
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Replaces `target`'s corpus directory with freshly built, checked seeds.
fn generate(target: &Target) -> Result<usize, String> {
    let seeds = (target.seeds)()?;
    for seed in &seeds {
        (target.check)(&seed.bytes).map_err(|e| format!("seed {} is invalid: {e}", seed.name))?;
    }
    let dir = corpus_dir(target.name);
    let io_err = |what: &str, e: io::Error| format!("{what} {}: {e}", dir.display());
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("removing", e)),
        _ => {}
    }
    fs::create_dir_all(&dir).map_err(|e| io_err("creating", e))?;
    for seed in &seeds {
        fs::write(dir.join(seed.name), &seed.bytes).map_err(|e| io_err("writing into", e))?;
    }
    Ok(seeds.len())
}

/// Checks every file in `target`'s corpus directory; fails on an empty directory too.
fn check(target: &Target) -> Result<usize, String> {
    let dir = corpus_dir(target.name);
    let entries = fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut checked = 0;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        let bytes = fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        (target.check)(&bytes).map_err(|e| format!("{} is rejected: {e}", path.display()))?;
        checked += 1;
    }
    if checked == 0 {
        return Err(format!("{} holds no seeds", dir.display()));
    }
    Ok(checked)
}

fn main() -> ExitCode {
    let mut check_only = false;
    let mut names = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check_only = true,
            name if TARGETS.iter().any(|t| t.name == name) => names.push(arg),
            other => {
                eprintln!("gen_corpus: unknown target or option {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let mut failed = false;
    for target in TARGETS {
        if !names.is_empty() && !names.iter().any(|n| n == target.name) {
            continue;
        }
        let (verb, result) = if check_only {
            ("checked", check(target))
        } else {
            ("wrote", generate(target))
        };
        match result {
            Ok(n) => println!("{}: {verb} {n} seeds", target.name),
            Err(e) => {
                eprintln!("{}: {e}", target.name);
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

//! `cargo xtask soak`: many probe capsules under a random, seeded mix of lifecycle operations,
//! with the engine's invariants checked after every step. See `xtask/README.md`.
//!
//! The soak keeps a model of every capsule it made: its status as the operations left it,
//! and its guest exactly (the probe's counter, and which generation of `touch` last wrote each
//! page, from which the probe's checksums are computed here, bit for bit). After every step
//! it compares the engine with the model: statuses (through `Capsule::status` and
//! `Engine::list`, each change allowed by the engine's status table), the data directory's
//! files, and the process's descriptors, threads and mappings, attributed to the capsules,
//! templates and VM shells that should hold them. At every engine reopen, with nothing
//! running, the process must be back to what it held before the first engine, and its RSS
//! is sampled: after the warm-up it must stay flat.
//!
//! Operations are chosen from the seed and from the part of the model that does not depend
//! on timing, so `--seed S` replays the same sequence; what timing decides (whether the idle
//! watcher paused a capsule with a timeout before the soak used it) is absorbed inside a step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule::{
    Capsule, CapsuleConfig, CapsuleId, Engine, EngineConfig, Error as CapsuleError, Status,
};
use probe_abi::{touch_capacity, PAGE_SIZE};

use crate::util::{Context, Error, Result};

pub const USAGE: &str = "\
usage: cargo xtask soak [OPTIONS]

Runs many probe capsules under a random mix of create, run, pause, resume, snapshot (to a
template), spawn from a template, destroy, auto-pause and engine reopen, checking after every
step: counters and memory checksums continue exactly, statuses change only as the engine's
status table allows, no descriptor, thread, mapping or file outlives what the live capsules
and templates hold, and RSS stays flat after the warm-up. Stops at the first violation, with
a non-zero exit code. Needs /dev/kvm.

options:
  --minutes N       how long to run (default 2; fractions allowed)
  --steps N         stop after N steps instead (whichever comes first with --minutes)
  --seed S          the seed of the operation sequence (default: from the clock; printed)
  --max-capsules N  most live capsules at once (default 10)
  --data-dir DIR    where the engine's data directory goes (default: a fresh temporary one,
                    removed after a clean run)
  -v, --verbose     print every step
  -h, --help        this text";

/// Parsed options.
#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub steps: Option<u64>,
    pub seed: Option<u64>,
    pub max_capsules: usize,
    pub data_dir: Option<PathBuf>,
    pub verbose: bool,
}

/// Parses `soak`'s arguments; `None` when help was printed.
pub fn parse(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        duration: Duration::from_secs(120),
        steps: None,
        seed: None,
        max_capsules: 10,
        data_dir: None,
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--minutes" => {
                let v = value(arg)?;
                let minutes: f64 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|m: &f64| m.is_finite() && *m > 0.0)
                    .context(|| format!("--minutes: {v:?} is not a positive number"))?;
                o.duration = Duration::from_secs_f64(minutes * 60.0);
            }
            "--steps" => o.steps = Some(crate::parse_num(arg, &value(arg)?)?),
            "--seed" => o.seed = Some(crate::parse_num(arg, &value(arg)?)?),
            "--max-capsules" => o.max_capsules = crate::parse_num(arg, &value(arg)?)?,
            "--data-dir" => o.data_dir = Some(PathBuf::from(value(arg)?)),
            "-v" | "--verbose" => o.verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(Error::msg(format!("unknown option {other:?}\n\n{USAGE}"))),
        }
    }
    if o.max_capsules == 0 {
        return Err(Error::msg("--max-capsules must be at least 1"));
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------
// Tunables, with why.

/// The idle watcher's period: short, so auto-pauses happen often and promptly.
const IDLE_CHECK: Duration = Duration::from_millis(20);
/// Inactivity timeouts of the capsules that have one: long enough that most steps on them
/// run before they pause, short enough that many pause behind the soak's back.
const TIMEOUTS_MS: [u64; 3] = [150, 300, 600];
/// Most templates at once (a snapshot beyond it deletes the oldest first).
const MAX_TEMPLATES: usize = 3;
/// Most layer files a paused capsule's snapshot may hold: the snapshot crate's default
/// `SavePolicy::max_layers` (a longer chain is merged into a new base).
const MAX_LAYERS: usize = 8;
/// How long a resource count may take to settle (the shell pool's filler builds VMs in the
/// background; a boot thread ends just after its capsule is ready).
const SETTLE: Duration = Duration::from_secs(3);
/// How long the idle watcher gets, beyond a capsule's timeout, to pause it.
const AUTO_PAUSE_GRACE: Duration = Duration::from_secs(10);
/// RSS after the warm-up, with nothing running, may exceed the warm-up's largest sample by
/// this much (see `xtask/README.md`, "RSS tolerance").
const RSS_TOLERANCE_KIB: u64 = 4096;
/// The warm-up: this fraction of the run (at least `WARMUP_MIN`).
const WARMUP_FRACTION: f64 = 0.2;
const WARMUP_MIN: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// A small deterministic generator (SplitMix64): the sequence must not depend on a crate's
// version.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.below(items.len() as u64) as usize)
    }
}

// ---------------------------------------------------------------------------------------
// The probe guest, modelled: its checksums computed here exactly as guest/main.rs does.

fn mix(acc: u64, value: u64) -> u64 {
    (acc ^ value).wrapping_mul(0x100_0000_01b3).rotate_left(17)
}

/// The checksum of `page` after `touch` generation `generation` wrote it (0: never written,
/// all zeroes).
fn page_checksum(page: u64, generation: u64) -> u64 {
    let mut sum = page;
    let words = PAGE_SIZE / 8;
    if generation == 0 {
        for _ in 0..words {
            sum = mix(sum, 0);
        }
        return sum;
    }
    let seed =
        generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ page.wrapping_mul(0xff51_afd7_ed55_8ccd);
    for w in 0..words {
        sum = mix(sum, seed.wrapping_add(w));
    }
    sum
}

/// A probe guest's state, as its commands change it.
#[derive(Debug, Clone)]
struct GuestModel {
    counter: u64,
    cursor: u64,
    touched: u64,
    generation: u64,
    capacity: u64,
    /// The generation that last wrote each page (0: never).
    pages: Vec<u64>,
}

impl GuestModel {
    fn new(memory_mb: u64) -> Self {
        let capacity = touch_capacity(memory_mb << 20);
        GuestModel {
            counter: 0,
            cursor: 0,
            touched: 0,
            generation: 0,
            capacity,
            pages: vec![0; capacity as usize],
        }
    }

    fn count(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn touch(&mut self, n: u64) -> u64 {
        self.generation += 1;
        let mut sum = 0;
        for i in 0..n {
            let page = (self.cursor + i) % self.capacity.max(1);
            self.pages[page as usize] = self.generation;
            sum = mix(sum, page_checksum(page, self.generation));
        }
        self.cursor = (self.cursor + n) % self.capacity.max(1);
        self.touched = (self.touched + n).min(self.capacity);
        sum
    }

    fn sum(&self) -> u64 {
        (0..self.touched).fold(0, |acc, page| {
            mix(acc, page_checksum(page, self.pages[page as usize]))
        })
    }
}

/// The guest event relay thread (seccomp on: vCPU threads report crashes through it): one
/// per process, started with the first capsule and kept for the process's life.
const RELAY_THREAD: &str = "capsule-relay";

/// What that thread maps (its stack, guard page and signal stack).
const RELAY_MAPPINGS: usize = 3;

/// How the engine names the directories of forks' anonymous templates (`templates/.fork-…`).
const ANONYMOUS_PREFIX: &str = ".fork-";

/// The anonymous templates in the data directory `root`.
fn anonymous_templates(root: &Path) -> Result<BTreeSet<String>> {
    let dir = root.join("templates");
    Ok(std::fs::read_dir(&dir)
        .context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(ANONYMOUS_PREFIX))
        .collect())
}

// ---------------------------------------------------------------------------------------
// The model of the engine's capsules and templates.

/// A capsule's status as the soak's own operations left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Running; with a timeout it may also have been paused by the idle watcher.
    Running,
    Paused,
    /// Left by an engine that was dropped while it ran.
    Stopped,
}

struct Cap {
    handle: Capsule,
    id: CapsuleId,
    vcpus: u32,
    timeout: Option<Duration>,
    /// The template it was spawned from, while it may still map it (running since the spawn:
    /// a pause releases it).
    pinned: Option<String>,
    expect: Expect,
    /// The last status observed, to check each change against the status table.
    seen: Status,
    guest: GuestModel,
}

struct TemplateModel {
    name: String,
    guest: GuestModel,
    vcpus: u32,
    memory_mb: u64,
}

/// Operation kinds, for the mix and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    Run,
    Pause,
    Resume,
    Snapshot,
    Spawn,
    Destroy,
    DeleteTemplate,
    AutoPause,
    Reopen,
    /// Fork a running or paused capsule into 1 to 3 capsules: each continues from the
    /// parent's counter and pages, the parent continues unchanged, and the forks' anonymous
    /// template lives exactly as long as a fork maps it.
    Fork,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Run => "run",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Snapshot => "snapshot",
            Op::Spawn => "spawn",
            Op::Destroy => "destroy",
            Op::DeleteTemplate => "delete-template",
            Op::AutoPause => "auto-pause",
            Op::Reopen => "reopen",
            Op::Fork => "fork",
        }
    }
}

/// The mix: each operation's weight, when it applies.
const MIX: [(Op, u64); 11] = [
    (Op::Create, 8),
    (Op::Run, 30),
    (Op::Pause, 10),
    (Op::Resume, 10),
    (Op::Snapshot, 4),
    (Op::Spawn, 8),
    (Op::Destroy, 7),
    (Op::DeleteTemplate, 2),
    (Op::AutoPause, 2),
    (Op::Reopen, 1),
    (Op::Fork, 4),
];

/// Whether a capsule seen in `from` may be seen in `to` next: a path of the engine's status
/// table (`Status::can_change_to`, one event at a time) leads there. Between two looks a
/// capsule may pass through statuses the soak did not see (Pending, Starting, Running).
fn reachable(from: Status, to: Status) -> bool {
    let mut seen = vec![from];
    let mut i = 0;
    while i < seen.len() {
        let at = seen[i];
        for next in Status::ALL {
            if at.can_change_to(next) && !seen.contains(&next) {
                seen.push(next);
            }
        }
        i += 1;
    }
    seen.contains(&to)
}

fn violation(text: impl Into<String>) -> Error {
    Error::msg(text.into())
}

/// What the process holds, from /proc/self.
#[derive(Debug, Default, Clone)]
struct Resources {
    /// Descriptors by what they point at.
    fds: Vec<String>,
    /// Thread names.
    threads: Vec<String>,
    /// Mapping lines: the path column (empty for anonymous).
    maps: Vec<String>,
    rss_kib: u64,
}

fn read_resources() -> Result<Resources> {
    let mut r = Resources::default();
    let fd_dir = std::fs::read_dir("/proc/self/fd").context(|| "reading /proc/self/fd".into())?;
    for entry in fd_dir.flatten() {
        // The descriptor of the listing itself is gone by now; skip what cannot be read.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            r.fds.push(target.to_string_lossy().into_owned());
        }
    }
    let tasks =
        std::fs::read_dir("/proc/self/task").context(|| "reading /proc/self/task".into())?;
    for entry in tasks.flatten() {
        if let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) {
            r.threads.push(name.trim_end().to_owned());
        }
    }
    let maps =
        std::fs::read_to_string("/proc/self/maps").context(|| "reading /proc/self/maps".into())?;
    for line in maps.lines() {
        // address perms offset dev inode [path]
        let path = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        r.maps.push(path);
    }
    let status = std::fs::read_to_string("/proc/self/status")
        .context(|| "reading /proc/self/status".into())?;
    r.rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    // The /proc/self/fd listing's own descriptor was open while it was read.
    if let Some(i) = r
        .fds
        .iter()
        .position(|f| f.starts_with("/proc/") && f.ends_with("/fd"))
    {
        r.fds.remove(i);
    }
    Ok(r)
}

/// The descriptors and threads a process holds with no engine (and the anonymous mappings,
/// which may only grow by the allocator's arenas).
#[derive(Debug, Clone)]
struct Baseline {
    fds: BTreeMap<String, usize>,
    threads: BTreeMap<String, usize>,
    anon_maps: usize,
}

fn tally<'a>(items: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for item in items {
        *out.entry(item.clone()).or_insert(0) += 1;
    }
    out
}

/// Mapping lines glibc's allocator may add for its arenas (two lines each, at most 8 per
/// CPU) without anything leaking.
fn arena_slack() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    2 * 8 * cpus
}

/// Mapping lines glibc may keep for stacks of threads that ended (its stack cache, reused by
/// the next threads): at most one stack (and guard) per thread that ever ran at once: the
/// vCPUs of `max_capsules` capsules of up to 2 vCPUs, and a few engine and boot threads.
fn stack_cache_slack(max_capsules: usize) -> usize {
    2 * (2 * max_capsules + 8)
}

struct Stats {
    ops: BTreeMap<Op, u64>,
    checks: u64,
    auto_pauses_seen: u64,
    paused_answers: u64,
    rss_samples: Vec<(Duration, u64)>,
}

struct Soak {
    o: Options,
    seed: u64,
    rng: Rng,
    data_dir: PathBuf,
    engine: Option<Engine>,
    caps: Vec<Cap>,
    templates: Vec<TemplateModel>,
    next_template: u64,
    baseline: Option<Baseline>,
    started: Instant,
    step: u64,
    stats: Stats,
}

/// Runs the soak; `Ok(true)` when it ran clean.
pub fn run(o: &Options) -> Result<bool> {
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let (data_dir, temporary) = match &o.data_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("capsule-soak-{}-{seed}", std::process::id())),
            true,
        ),
    };
    if data_dir.exists() {
        let empty = std::fs::read_dir(&data_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(Error::msg(format!(
                "the data directory {} is not empty (the soak needs a fresh one)",
                data_dir.display()
            )));
        }
    }
    println!(
        "soak: seed {seed} (replay: cargo xtask soak --seed {seed}{}), {:.1} min{}, up to {} capsules, data in {}",
        o.steps.map(|s| format!(" --steps {s}")).unwrap_or_default(),
        o.duration.as_secs_f64() / 60.0,
        o.steps.map(|s| format!(" or {s} steps")).unwrap_or_default(),
        o.max_capsules,
        data_dir.display()
    );
    let mut soak = Soak {
        o: o.clone(),
        seed,
        rng: Rng(seed),
        data_dir: data_dir.clone(),
        engine: None,
        caps: Vec::new(),
        templates: Vec::new(),
        next_template: 0,
        baseline: None,
        started: Instant::now(),
        step: 0,
        stats: Stats {
            ops: BTreeMap::new(),
            checks: 0,
            auto_pauses_seen: 0,
            paused_answers: 0,
            rss_samples: Vec::new(),
        },
    };
    // Like the KVM tests: a host without /dev/kvm skips, any other KVM problem fails.
    if !Path::new("/dev/kvm").exists() {
        println!("soak: SKIPPED: /dev/kvm does not exist on this host");
        return Ok(true);
    }
    let outcome = soak.run();
    soak.summary(outcome.as_ref().err());
    match outcome {
        Ok(()) => {
            // Everything the soak made must go with the engine: destroy, then drop.
            soak.teardown()?;
            if temporary {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            println!("soak: PASSED");
            Ok(true)
        }
        Err(e) => {
            println!(
                "soak: FAILED at step {} after {:.1} s: {e}\nsoak: replay with: cargo xtask soak --seed {} --steps {}\nsoak: data directory kept: {}",
                soak.step,
                soak.started.elapsed().as_secs_f64(),
                soak.seed,
                soak.step,
                data_dir.display()
            );
            Ok(false)
        }
    }
}

impl Soak {
    fn engine(&self) -> Result<&Engine> {
        self.engine.as_ref().context(|| "no engine is open".into())
    }

    fn open_engine(&mut self) -> Result<()> {
        let config = EngineConfig::builder()
            .data_dir(&self.data_dir)
            .idle_check_interval(IDLE_CHECK);
        let engine =
            Engine::new(config).map_err(|e| Error::msg(format!("opening the engine: {e}")))?;
        self.engine = Some(engine);
        Ok(())
    }

    fn run(&mut self) -> Result<()> {
        // The process before any engine: what every reopen must come back to.
        let before = read_resources()?;
        self.baseline = Some(Baseline {
            fds: tally(before.fds.iter()),
            threads: tally(before.threads.iter()),
            anon_maps: before.maps.iter().filter(|p| p.is_empty()).count(),
        });
        self.open_engine()?;
        let deadline = self.started + self.o.duration;
        let mut last_report = Instant::now();
        loop {
            if Instant::now() >= deadline || self.o.steps.is_some_and(|s| self.step >= s) {
                break;
            }
            self.step += 1;
            let op = self.choose();
            *self.stats.ops.entry(op).or_insert(0) += 1;
            let started = Instant::now();
            self.apply(op, &before)
                .map_err(|e| Error::msg(format!("{} ({}): {e}", op.name(), self.describe())))?;
            self.check_all()
                .map_err(|e| Error::msg(format!("after {}: {e}", op.name())))?;
            if self.o.verbose {
                println!(
                    "soak: step {} {} in {:.1} ms; {}",
                    self.step,
                    op.name(),
                    started.elapsed().as_secs_f64() * 1e3,
                    self.describe()
                );
            } else if last_report.elapsed() >= Duration::from_secs(30) {
                last_report = Instant::now();
                println!(
                    "soak: {:.0} s, {} steps, {} checks; {}",
                    self.started.elapsed().as_secs_f64(),
                    self.step,
                    self.stats.checks,
                    self.describe()
                );
            }
        }
        Ok(())
    }

    /// A one-line picture of the model.
    fn describe(&self) -> String {
        let running = self
            .caps
            .iter()
            .filter(|c| c.expect == Expect::Running)
            .count();
        let paused = self
            .caps
            .iter()
            .filter(|c| c.expect == Expect::Paused)
            .count();
        format!(
            "{} capsules ({running} running, {paused} paused), {} templates",
            self.caps.len(),
            self.templates.len()
        )
    }

    /// The next operation, from the seed and the timing-independent model only.
    fn choose(&mut self) -> Op {
        let live = self.caps.len();
        let any = |e: Expect| self.caps.iter().any(|c| c.expect == e);
        let applies = |op: Op| match op {
            Op::Create => live < self.o.max_capsules,
            Op::Run => any(Expect::Running) || any(Expect::Paused),
            Op::Pause => any(Expect::Running),
            Op::Resume => any(Expect::Paused),
            Op::Snapshot => any(Expect::Running),
            Op::Spawn => !self.templates.is_empty() && live < self.o.max_capsules,
            Op::Destroy => live > 0,
            Op::DeleteTemplate => !self.templates.is_empty(),
            Op::AutoPause => self
                .caps
                .iter()
                .any(|c| c.timeout.is_some() && c.expect == Expect::Running),
            Op::Reopen => true,
            Op::Fork => live < self.o.max_capsules && (any(Expect::Running) || any(Expect::Paused)),
        };
        let choices: Vec<(Op, u64)> = MIX.iter().copied().filter(|(op, _)| applies(*op)).collect();
        let total: u64 = choices.iter().map(|(_, w)| w).sum();
        let mut at = self.rng.below(total);
        for (op, weight) in &choices {
            if at < *weight {
                return *op;
            }
            at -= weight;
        }
        Op::Reopen
    }

    /// Index of a capsule whose model status is `e`, chosen by the seed.
    fn pick_cap(&mut self, e: &[Expect]) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.caps.len())
            .filter(|&i| e.contains(&self.caps[i].expect))
            .collect();
        self.rng.pick(&candidates).copied()
    }

    fn apply(&mut self, op: Op, before: &Resources) -> Result<()> {
        match op {
            Op::Create => self.create(),
            Op::Run => self.run_command(),
            Op::Pause => self.pause(),
            Op::Resume => self.resume(),
            Op::Snapshot => self.snapshot(),
            Op::Spawn => self.spawn(),
            Op::Destroy => self.destroy(),
            Op::DeleteTemplate => {
                let i = self.rng.below(self.templates.len() as u64) as usize;
                self.delete_template(i)
            }
            Op::AutoPause => self.auto_pause(),
            Op::Reopen => self.reopen(before),
            Op::Fork => self.fork(),
        }
    }

    /// A timeout for a new capsule (30% get one), from the seed.
    fn draw_timeout(&mut self) -> Option<Duration> {
        if self.rng.chance(30) {
            self.rng
                .pick(&TIMEOUTS_MS)
                .map(|ms| Duration::from_millis(*ms))
        } else {
            None
        }
    }

    fn create(&mut self) -> Result<()> {
        let vcpus = 1 + self.rng.below(2) as u32;
        let memory_mb = [16u64, 32][self.rng.below(2) as usize];
        let timeout = self.draw_timeout();
        let wait = self.rng.chance(75);
        let mut config = CapsuleConfig::builder("probe")
            .vcpus(vcpus)
            .memory_mb(memory_mb)
            .wait(wait);
        if let Some(t) = timeout {
            config = config.timeout(t);
        }
        let handle = self
            .engine()?
            .create(config)
            .map_err(|e| violation(format!("create failed: {e}")))?;
        let first = handle.status();
        if !wait {
            if !matches!(first, Status::Pending | Status::Starting | Status::Running) {
                return Err(violation(format!(
                    "a capsule created without wait is {first} at once"
                )));
            }
            match handle.wait_ready(Duration::from_secs(30), Duration::from_millis(5)) {
                Ok(()) => {}
                Err(CapsuleError::InvalidState {
                    status: Status::Paused,
                    ..
                }) if timeout.is_some() => {
                    self.stats.paused_answers += 1;
                }
                Err(e) => return Err(violation(format!("wait_ready failed: {e}"))),
            }
        } else if first != Status::Running && !(timeout.is_some() && first == Status::Paused) {
            return Err(violation(format!("create returned a capsule in {first}")));
        }
        let id = handle.id().clone();
        self.caps.push(Cap {
            handle,
            id,
            vcpus,
            timeout,
            pinned: None,
            expect: Expect::Running,
            seen: first,
            guest: GuestModel::new(memory_mb),
        });
        let i = self.caps.len() - 1;
        self.verify_guest(i, "a new capsule")
    }

    /// Runs `command` in capsule `i`; a capsule with a timeout that the idle watcher paused
    /// meanwhile is connected (resumed) and asked again. Returns the output's first line.
    fn command(&mut self, i: usize, command: &str) -> Result<String> {
        for _ in 0..3 {
            let cap = &self.caps[i];
            match cap.handle.commands().run(command) {
                Ok(out) if out.success() => return Ok(out.stdout_str().trim_end().to_owned()),
                Ok(out) => {
                    return Err(violation(format!(
                        "{command:?} in {} exited {:?}: {}",
                        cap.id,
                        out.exit_code,
                        out.stderr_str()
                    )))
                }
                // Legal for a capsule with a timeout: auto-paused behind our back (or right
                // after a command longer than its timeout, the known engine bug).
                Err(CapsuleError::InvalidState {
                    status: Status::Paused,
                    ..
                }) if cap.timeout.is_some() => {
                    self.stats.paused_answers += 1;
                    self.connect(i)?;
                }
                Err(e) => return Err(violation(format!("{command:?} in {} failed: {e}", cap.id))),
            }
        }
        Err(violation(format!(
            "{command:?} in {} kept finding it paused",
            self.caps[i].id
        )))
    }

    /// `engine.connect` (resume if paused), for a capsule with a timeout.
    fn connect(&mut self, i: usize) -> Result<()> {
        let id = self.caps[i].id.clone();
        let handle = self
            .engine()?
            .connect(&id)
            .map_err(|e| violation(format!("connect {id} failed: {e}")))?;
        self.observe(i, handle.status())?;
        // A pause released any template mapping.
        self.caps[i].pinned = None;
        Ok(())
    }

    /// Checks that capsule `i`'s counter and memory continue exactly from the model.
    fn verify_guest(&mut self, i: usize, after: &str) -> Result<()> {
        let expected = self.caps[i].guest.count();
        let got = self.command(i, "count")?;
        if got != expected.to_string() {
            return Err(violation(format!(
                "counter of {} after {after}: got {got}, expected {expected} (it went back or jumped)",
                self.caps[i].id
            )));
        }
        let expected = self.caps[i].guest.sum();
        let got = self.command(i, "sum")?;
        if got != expected.to_string() {
            return Err(violation(format!(
                "memory checksum of {} after {after}: got {got}, expected {expected}",
                self.caps[i].id
            )));
        }
        self.stats.checks += 2;
        Ok(())
    }

    fn run_command(&mut self) -> Result<()> {
        let Some(i) = self.pick_cap(&[Expect::Running, Expect::Paused]) else {
            return Ok(());
        };
        let kind = self.rng.below(10);
        let n = 1 + self.rng.below(48);
        if self.caps[i].expect == Expect::Paused {
            // A paused capsule runs nothing, and says so.
            return match self.caps[i].handle.commands().run("count") {
                Err(CapsuleError::InvalidState {
                    status: Status::Paused,
                    ..
                }) => {
                    self.stats.checks += 1;
                    Ok(())
                }
                other => Err(violation(format!(
                    "a command in paused {} returned {other:?}, expected InvalidState(Paused)",
                    self.caps[i].id
                ))),
            };
        }
        match kind {
            0..=3 => {
                let expected = self.caps[i].guest.count();
                let got = self.command(i, "count")?;
                if got != expected.to_string() {
                    return Err(violation(format!(
                        "counter of {}: got {got}, expected {expected}",
                        self.caps[i].id
                    )));
                }
            }
            4..=6 => {
                let expected = self.caps[i].guest.touch(n);
                let got = self.command(i, &format!("touch {n}"))?;
                if got != expected.to_string() {
                    return Err(violation(format!(
                        "touch {n} in {}: checksum {got}, expected {expected}",
                        self.caps[i].id
                    )));
                }
            }
            7..=8 => {
                let expected = self.caps[i].guest.sum();
                let got = self.command(i, "sum")?;
                if got != expected.to_string() {
                    return Err(violation(format!(
                        "sum in {}: {got}, expected {expected}",
                        self.caps[i].id
                    )));
                }
            }
            _ => {
                let text = format!("soak-{}", self.step);
                let got = self.command(i, &format!("echo {text}"))?;
                if got != text {
                    return Err(violation(format!("echo in {}: {got:?}", self.caps[i].id)));
                }
            }
        }
        self.stats.checks += 1;
        Ok(())
    }

    fn pause(&mut self) -> Result<()> {
        let Some(i) = self.pick_cap(&[Expect::Running]) else {
            return Ok(());
        };
        let by_id = self.rng.chance(50);
        let id = self.caps[i].id.clone();
        let result = if by_id {
            self.engine()?.pause(&id)
        } else {
            self.caps[i].handle.pause()
        };
        result.map_err(|e| violation(format!("pause {id} failed: {e}")))?;
        let cap = &mut self.caps[i];
        cap.expect = Expect::Paused;
        cap.pinned = None;
        // Pausing again does nothing.
        cap.handle
            .pause()
            .map_err(|e| violation(format!("a second pause of {id} failed: {e}")))?;
        self.stats.checks += 1;
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        let Some(i) = self.pick_cap(&[Expect::Paused]) else {
            return Ok(());
        };
        let id = self.caps[i].id.clone();
        let result = match self.rng.below(3) {
            0 => self.caps[i].handle.resume(),
            1 => self.engine()?.resume(&id),
            _ => self.engine()?.connect(&id).map(drop),
        };
        result.map_err(|e| violation(format!("resume {id} failed: {e}")))?;
        self.caps[i].expect = Expect::Running;
        self.verify_guest(i, "resume")
    }

    fn snapshot(&mut self) -> Result<()> {
        // Room first: deleting a template pauses the clones that map it.
        if self.templates.len() >= MAX_TEMPLATES {
            self.delete_template(0)?;
        }
        let Some(i) = self.pick_cap(&[Expect::Running]) else {
            return Ok(());
        };
        self.next_template += 1;
        let name = format!("soak-t{}", self.next_template);
        // Mark the state the template freezes: the counter and pages as they are now.
        let mut attempts = 0;
        let info = loop {
            attempts += 1;
            match self.caps[i].handle.snapshot(&name) {
                Ok(info) => break info,
                Err(CapsuleError::InvalidState {
                    status: Status::Paused,
                    ..
                }) if self.caps[i].timeout.is_some() && attempts < 3 => {
                    self.stats.paused_answers += 1;
                    self.connect(i)?;
                }
                Err(e) => {
                    return Err(violation(format!(
                        "snapshot of {} as {name} failed: {e}",
                        self.caps[i].id
                    )))
                }
            }
        };
        if info.name != name {
            return Err(violation(format!(
                "snapshot returned template {:?}",
                info.name
            )));
        }
        let memory_mb = info.memory_mb;
        self.templates.push(TemplateModel {
            name,
            guest: self.caps[i].guest.clone(),
            vcpus: self.caps[i].vcpus,
            memory_mb,
        });
        // The source keeps running, exactly where it was.
        self.verify_guest(i, "snapshot")?;
        self.check_template_list()
    }

    fn check_template_list(&mut self) -> Result<()> {
        let listed: Vec<String> = self
            .engine()?
            .templates()
            .map_err(|e| violation(format!("templates() failed: {e}")))?
            .into_iter()
            .map(|t| t.name)
            .collect();
        let mut expected: Vec<String> = self.templates.iter().map(|t| t.name.clone()).collect();
        expected.sort();
        if listed != expected {
            return Err(violation(format!(
                "engine.templates() lists {listed:?}, expected {expected:?}"
            )));
        }
        self.stats.checks += 1;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let t = self.rng.below(self.templates.len() as u64) as usize;
        let timeout = self.draw_timeout();
        let (name, guest, vcpus, memory_mb) = {
            let t = &self.templates[t];
            (t.name.clone(), t.guest.clone(), t.vcpus, t.memory_mb)
        };
        let mut config = CapsuleConfig::builder(name.as_str());
        if let Some(t) = timeout {
            config = config.timeout(t);
        }
        let handle = self
            .engine()?
            .create(config)
            .map_err(|e| violation(format!("spawning from {name} failed: {e}")))?;
        let info = handle.info();
        if (info.vcpus, info.memory_mb) != (vcpus, memory_mb) {
            return Err(violation(format!(
                "a clone of {name} has {} vCPUs and {} MiB; the template {vcpus} and {memory_mb}",
                info.vcpus, info.memory_mb
            )));
        }
        let id = handle.id().clone();
        let first = handle.status();
        self.caps.push(Cap {
            handle,
            id,
            vcpus,
            timeout,
            pinned: Some(name.clone()),
            expect: Expect::Running,
            seen: first,
            guest,
        });
        let i = self.caps.len() - 1;
        self.observe(i, first)?;
        // A clone starts from the template's counter and pages.
        self.verify_guest(i, &format!("spawning from {name}"))
    }

    fn fork(&mut self) -> Result<()> {
        let Some(p) = self.pick_cap(&[Expect::Running, Expect::Paused]) else {
            return Ok(());
        };
        let room = self
            .o
            .max_capsules
            .saturating_sub(self.caps.len())
            .clamp(1, 3);
        let n = 1 + self.rng.below(room as u64) as usize;
        let before = anonymous_templates(&self.data_dir)?;
        let (parent_id, vcpus, timeout, guest) = {
            let c = &self.caps[p];
            (c.id.clone(), c.vcpus, c.timeout, c.guest.clone())
        };
        let forks = self.caps[p]
            .handle
            .fork(n)
            .map_err(|e| violation(format!("fork({n}) of {parent_id} failed: {e}")))?;
        if forks.len() != n {
            return Err(violation(format!(
                "fork({n}) of {parent_id} gave {} capsules",
                forks.len()
            )));
        }
        // Its anonymous template: there unless every fork (they inherit the parent's
        // timeout) was already paused by the watcher.
        let new: Vec<String> = anonymous_templates(&self.data_dir)?
            .difference(&before)
            .cloned()
            .collect();
        if new.len() > 1 {
            return Err(violation(format!(
                "one fork made {} anonymous templates: {new:?}",
                new.len()
            )));
        }
        let pinned = new.into_iter().next();
        for handle in forks {
            let id = handle.id().clone();
            let first = handle.status();
            self.caps.push(Cap {
                handle,
                id,
                vcpus,
                timeout,
                pinned: pinned.clone(),
                expect: Expect::Running,
                seen: first,
                guest: guest.clone(),
            });
            let i = self.caps.len() - 1;
            self.observe(i, first)?;
            self.verify_guest(i, &format!("forking {parent_id}"))?;
        }
        // The parent goes on from where it was (a paused one stays paused).
        if self.caps[p].expect == Expect::Running {
            self.verify_guest(p, "being forked")?;
        }
        Ok(())
    }

    fn destroy(&mut self) -> Result<()> {
        let i = self.rng.below(self.caps.len() as u64) as usize;
        let by_id = self.rng.chance(50);
        let cap = self.caps.remove(i);
        let result = if by_id {
            self.engine()?.destroy(&cap.id)
        } else {
            cap.handle.destroy()
        };
        result.map_err(|e| violation(format!("destroy {} failed: {e}", cap.id)))?;
        let after = cap.handle.status();
        if after != Status::Stopped {
            return Err(violation(format!(
                "a destroyed capsule's handle reports {after} (was {})",
                cap.seen
            )));
        }
        match self.engine()?.get(&cap.id) {
            Err(CapsuleError::NotFound(_)) => {}
            other => {
                return Err(violation(format!(
                    "engine.get of destroyed {} returned {:?}",
                    cap.id,
                    other.map(|c| c.status())
                )))
            }
        }
        match cap.handle.commands().run("count") {
            Err(CapsuleError::InvalidState {
                status: Status::Stopped,
                ..
            }) => {}
            other => {
                return Err(violation(format!(
                    "a command in destroyed {} returned {other:?}",
                    cap.id
                )))
            }
        }
        self.stats.checks += 3;
        Ok(())
    }

    /// Deletes template `t`: refused exactly while clones map it, then (after pausing them)
    /// done.
    fn delete_template(&mut self, t: usize) -> Result<()> {
        let name = self.templates[t].name.clone();
        let pinned: Vec<usize> = (0..self.caps.len())
            .filter(|&i| self.caps[i].pinned.as_deref() == Some(name.as_str()))
            .collect();
        // Clones without a timeout certainly map it; ones with a timeout may have been paused.
        let certain = pinned
            .iter()
            .filter(|&&i| self.caps[i].timeout.is_none())
            .count();
        // A capsule the watcher has paused no longer holds the template: the engine lets
        // such pauses finish before it counts the users.
        let first = self.engine()?.delete_template(&name);
        match first {
            Ok(()) if certain == 0 => {}
            Ok(()) => {
                return Err(violation(format!(
                    "template {name} was deleted while {certain} running clone(s) map it"
                )))
            }
            Err(CapsuleError::TemplateInUse { capsules, .. })
                if capsules >= certain.max(1) && capsules <= pinned.len() =>
            {
                for &i in &pinned {
                    let id = self.caps[i].id.clone();
                    self.caps[i]
                        .handle
                        .pause()
                        .map_err(|e| violation(format!("pause {id} failed: {e}")))?;
                    self.caps[i].expect = Expect::Paused;
                    self.caps[i].pinned = None;
                }
                // `pause` returns once the VM is released: nothing maps the template now.
                self.engine()?.delete_template(&name).map_err(|e| {
                    violation(format!("deleting {name} with its clones paused: {e}"))
                })?;
            }
            Err(e) => {
                return Err(violation(format!(
                    "deleting {name} ({} clone(s) may map it, {certain} certainly): {e}",
                    pinned.len()
                )))
            }
        }
        self.templates.remove(t);
        self.stats.checks += 1;
        self.check_template_list()
    }

    /// Waits until the idle watcher has paused every running capsule with a timeout.
    fn auto_pause(&mut self) -> Result<()> {
        let waiting: Vec<usize> = (0..self.caps.len())
            .filter(|&i| self.caps[i].timeout.is_some() && self.caps[i].expect == Expect::Running)
            .collect();
        let longest = waiting
            .iter()
            .filter_map(|&i| self.caps[i].timeout)
            .max()
            .unwrap_or_default();
        let deadline = Instant::now() + longest + AUTO_PAUSE_GRACE;
        for &i in &waiting {
            loop {
                let status = self.caps[i].handle.status();
                self.observe(i, status)?;
                if status == Status::Paused {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(violation(format!(
                        "{} (timeout {:?}) is still {status} {:?} after its timeout",
                        self.caps[i].id,
                        self.caps[i].timeout.unwrap_or_default(),
                        longest + AUTO_PAUSE_GRACE
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            self.caps[i].expect = Expect::Paused;
            self.caps[i].pinned = None;
            self.stats.auto_pauses_seen += 1;
        }
        self.stats.checks += waiting.len() as u64;
        Ok(())
    }

    /// Drops the engine and every handle, checks the process is back to where it was before
    /// the first engine, and opens a new engine on the same data directory.
    fn reopen(&mut self, before: &Resources) -> Result<()> {
        let expected: Vec<(CapsuleId, Expect, Option<Duration>, Status, u32, GuestModel)> = self
            .caps
            .drain(..)
            .map(|c| (c.id, c.expect, c.timeout, c.seen, c.vcpus, c.guest))
            .collect();
        self.engine = None;
        self.check_released(before)?;
        self.open_engine()?;
        let listed: HashMap<CapsuleId, Status> = self
            .engine()?
            .list()
            .into_iter()
            .map(|info| (info.id, info.status))
            .collect();
        if listed.len() != expected.len() {
            return Err(violation(format!(
                "the new engine lists {} capsules, the old one had {}",
                listed.len(),
                expected.len()
            )));
        }
        for (id, expect, timeout, seen, vcpus, guest) in expected {
            let settle = timeout.is_some() && expect == Expect::Running;
            let Some(&status) = listed.get(&id) else {
                return Err(violation(format!("{id} is missing after reopen")));
            };
            let legal = match expect {
                Expect::Paused => status == Status::Paused,
                Expect::Running if timeout.is_some() => {
                    matches!(status, Status::Paused | Status::Stopped)
                }
                Expect::Running => status == Status::Stopped,
                Expect::Stopped => status == Status::Stopped,
            };
            if !legal || !reachable(seen, status) {
                return Err(violation(format!(
                    "{id} was {seen} (expected {expect:?}) and came back {status}"
                )));
            }
            let handle = self
                .engine()?
                .get(&id)
                .map_err(|e| violation(format!("get {id} after reopen: {e}")))?;
            self.caps.push(Cap {
                handle,
                id,
                vcpus,
                timeout,
                pinned: None,
                expect: match status {
                    Status::Paused => Expect::Paused,
                    _ => Expect::Stopped,
                },
                seen: status,
                guest,
            });
            if settle && status == Status::Paused {
                let i = self.caps.len() - 1;
                self.caps[i].handle.resume().map_err(|e| {
                    violation(format!("resume {} after reopen: {e}", self.caps[i].id))
                })?;
                self.caps[i].expect = Expect::Running;
                self.verify_guest(i, "reopen")?;
                self.caps[i].expect = Expect::Stopped;
                self.caps[i].seen = Status::Stopped;
                let cap = self.caps.remove(i);
                cap.handle
                    .destroy()
                    .map_err(|e| violation(format!("destroy {}: {e}", cap.id)))?;
            }
            self.stats.checks += 1;
        }
        // Stopped capsules refuse to run and resume; then they go. A capsule with a timeout
        // that was running is settled now (verified if it came back paused, then destroyed),
        // so that what timing decided does not change the rest of the sequence.
        self.settle_after_reopen()?;
        self.check_template_list()
    }

    fn settle_after_reopen(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.caps.len() {
            if self.caps[i].expect != Expect::Stopped {
                i += 1;
                continue;
            }
            let cap = self.caps.remove(i);
            for (what, result) in [
                ("run", cap.handle.commands().run("count").map(drop)),
                ("resume", cap.handle.resume()),
            ] {
                match result {
                    Err(CapsuleError::InvalidState {
                        status: Status::Stopped,
                        ..
                    }) => {}
                    other => {
                        return Err(violation(format!(
                            "{what} in stopped {} returned {other:?}",
                            cap.id
                        )))
                    }
                }
            }
            self.engine()?
                .destroy(&cap.id)
                .map_err(|e| violation(format!("destroy stopped {}: {e}", cap.id)))?;
            self.stats.checks += 3;
        }
        Ok(())
    }

    /// With the engine and every handle dropped, the process holds what it held before the
    /// first engine; its RSS is sampled.
    fn check_released(&mut self, before: &Resources) -> Result<()> {
        let _ = before;
        let baseline = self.baseline_or_empty();
        let deadline = Instant::now() + SETTLE;
        let now = loop {
            let now = read_resources()?;
            let fds = tally(now.fds.iter());
            let mut threads = tally(now.threads.iter());
            // The guest event relay outlives engines: one per process, once started.
            if threads.get(RELAY_THREAD) == Some(&1) && !baseline.threads.contains_key(RELAY_THREAD)
            {
                threads.remove(RELAY_THREAD);
            }
            let anon = now.maps.iter().filter(|p| p.is_empty()).count();
            let problem = if fds != baseline.fds {
                Some(format!(
                    "descriptors differ from before the first engine: now {fds:?}, before {:?}",
                    baseline.fds
                ))
            } else if threads != baseline.threads {
                Some(format!(
                    "threads differ from before the first engine: now {threads:?}, before {:?}",
                    baseline.threads
                ))
            } else if let Some(path) = now.maps.iter().find(|p| {
                p.starts_with(&*self.data_dir.to_string_lossy()) || p.starts_with("anon_inode:kvm")
            }) {
                Some(format!("a mapping of {path} outlived the engine"))
            } else if anon
                > baseline.anon_maps
                    + arena_slack()
                    + stack_cache_slack(self.o.max_capsules)
                    + RELAY_MAPPINGS
            {
                Some(format!(
                    "{anon} anonymous mappings with no engine; {} before the first (+{} allowed for the allocator's arenas, +{} for its cache of thread stacks)",
                    baseline.anon_maps,
                    arena_slack(),
                    stack_cache_slack(self.o.max_capsules)
                ))
            } else {
                None
            };
            match problem {
                None => break now,
                Some(p) if Instant::now() >= deadline => {
                    return Err(violation(format!("with the engine dropped: {p}")))
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.stats.checks += 4;
        let at = self.started.elapsed();
        self.stats.rss_samples.push((at, now.rss_kib));
        let warmup = self.o.duration.mul_f64(WARMUP_FRACTION).max(WARMUP_MIN);
        if at > warmup {
            let reference = self
                .stats
                .rss_samples
                .iter()
                .filter(|(t, _)| *t <= warmup)
                .map(|(_, r)| *r)
                .max();
            match reference {
                Some(reference) if now.rss_kib > reference + RSS_TOLERANCE_KIB => {
                    return Err(violation(format!(
                        "RSS with nothing running grew to {} KiB; the warm-up's largest was {reference} KiB (tolerance {RSS_TOLERANCE_KIB} KiB)",
                        now.rss_kib
                    )))
                }
                Some(_) => self.stats.checks += 1,
                // No sample in the warm-up: this one becomes the reference.
                None => {
                    if let Some(sample) = self.stats.rss_samples.last_mut() {
                        sample.0 = Duration::ZERO;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records that capsule `i` was seen in `status`: legal from the last status seen, and
    /// one its model allows.
    fn observe(&mut self, i: usize, status: Status) -> Result<()> {
        let cap = &mut self.caps[i];
        if !reachable(cap.seen, status) {
            return Err(violation(format!(
                "{} went from {} to {status}: no path of the status table leads there",
                cap.id, cap.seen
            )));
        }
        let allowed = match cap.expect {
            Expect::Running if cap.timeout.is_some() => {
                matches!(status, Status::Running | Status::Paused)
            }
            Expect::Running => status == Status::Running,
            Expect::Paused => status == Status::Paused,
            Expect::Stopped => status == Status::Stopped,
        };
        if !allowed {
            return Err(violation(format!(
                "{} is {status}; the soak's operations left it {:?}{}",
                cap.id,
                cap.expect,
                if cap.timeout.is_some() {
                    " (it has a timeout)"
                } else {
                    ""
                }
            )));
        }
        if cap.seen == Status::Running && status == Status::Paused && cap.expect == Expect::Running
        {
            self.stats.auto_pauses_seen += 1;
            // The idle watcher paused it: it no longer maps its template.
            cap.pinned = None;
        }
        cap.seen = status;
        self.stats.checks += 1;
        Ok(())
    }

    /// The checks after every step.
    fn check_all(&mut self) -> Result<()> {
        // Statuses, through each handle and through the engine's list.
        for i in 0..self.caps.len() {
            let status = self.caps[i].handle.status();
            self.observe(i, status)?;
        }
        let listed: HashMap<CapsuleId, Status> = self
            .engine()?
            .list()
            .into_iter()
            .map(|info| (info.id, info.status))
            .collect();
        if listed.len() != self.caps.len() {
            return Err(violation(format!(
                "engine.list() has {} capsules, the soak {}",
                listed.len(),
                self.caps.len()
            )));
        }
        for i in 0..self.caps.len() {
            let Some(&status) = listed.get(&self.caps[i].id) else {
                return Err(violation(format!(
                    "{} is missing from engine.list()",
                    self.caps[i].id
                )));
            };
            self.observe(i, status)?;
        }
        // The idle watcher may be writing a pause right now: a file check that fails is
        // retried until it passes or the files stay wrong.
        let deadline = Instant::now() + SETTLE;
        while let Err(e) = self.check_files() {
            if Instant::now() >= deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.check_process()
    }

    /// The data directory holds the live capsules' and templates' files and nothing else.
    /// Forks' anonymous templates: those that must exist (a fork without a timeout maps it,
    /// running since the fork) and those that may (any fork that may still map it; a fork
    /// with a timeout may have been paused by the watcher, releasing it).
    fn fork_templates(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut required = BTreeSet::new();
        let mut allowed = BTreeSet::new();
        for cap in &self.caps {
            let Some(name) = cap
                .pinned
                .as_ref()
                .filter(|n| n.starts_with(ANONYMOUS_PREFIX))
            else {
                continue;
            };
            allowed.insert(name.clone());
            if cap.timeout.is_none() && cap.expect == Expect::Running {
                required.insert(name.clone());
            }
        }
        (required, allowed)
    }

    fn check_files(&mut self) -> Result<()> {
        let root = &self.data_dir;
        let names = |dir: &Path| -> Result<Vec<String>> {
            let mut out: Vec<String> = std::fs::read_dir(dir)
                .context(|| format!("reading {}", dir.display()))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            out.sort();
            Ok(out)
        };
        for name in names(root)? {
            if !["lock", "capsules.journal", "capsules", "templates"].contains(&name.as_str()) {
                return Err(violation(format!(
                    "unexpected file {name} in the data directory"
                )));
            }
        }
        let live: HashMap<String, &Cap> = self.caps.iter().map(|c| (c.id.to_string(), c)).collect();
        for name in names(&root.join("capsules"))? {
            let Some(cap) = live.get(&name) else {
                return Err(violation(format!(
                    "capsules/{name} is in the data directory but no such capsule is live"
                )));
            };
            let dir = root.join("capsules").join(&name);
            let top = names(&dir)?;
            if top.iter().any(|n| n != "snapshot") {
                return Err(violation(format!("capsules/{name} holds {top:?}")));
            }
            if top.is_empty() {
                continue;
            }
            let files = names(&dir.join("snapshot"))?;
            let layers = files.iter().filter(|f| f.ends_with(".layer")).count();
            let state = files.iter().any(|f| f == "state.bin");
            let others: Vec<&String> = files
                .iter()
                .filter(|f| !f.ends_with(".layer") && *f != "state.bin")
                .collect();
            if !others.is_empty() || layers > MAX_LAYERS {
                return Err(violation(format!(
                    "capsules/{name}/snapshot holds {files:?} (at most {MAX_LAYERS} layers and state.bin)"
                )));
            }
            let ok = match cap.expect {
                Expect::Paused => state && layers >= 1,
                // Retired on resume; a capsule with a timeout may be paused by the watcher.
                Expect::Running => !state || cap.timeout.is_some(),
                // Left by a dead engine: its files stay until it is destroyed.
                Expect::Stopped => true,
            };
            if !ok {
                return Err(violation(format!(
                    "capsules/{name}/snapshot holds {files:?} for a capsule the soak left {:?}",
                    cap.expect
                )));
            }
        }
        let expected: BTreeSet<String> = self.templates.iter().map(|t| t.name.clone()).collect();
        let (anonymous, found): (BTreeSet<String>, BTreeSet<String>) =
            names(&root.join("templates"))?
                .into_iter()
                .partition(|n| n.starts_with(ANONYMOUS_PREFIX));
        if expected != found {
            return Err(violation(format!(
                "templates/ holds {found:?}, the live templates are {expected:?}"
            )));
        }
        let (required, allowed) = self.fork_templates();
        if !required.is_subset(&anonymous) || !anonymous.is_subset(&allowed) {
            return Err(violation(format!(
                "templates/ holds the fork templates {anonymous:?}; forks running certainly map {required:?}, possibly {allowed:?}"
            )));
        }
        for name in found.iter().chain(&anonymous) {
            let files = names(&root.join("templates").join(name))?;
            let layers = files.iter().filter(|f| f.ends_with(".layer")).count();
            // A named template or a running capsule's fork has one layer; a paused one's fork
            // links its whole chain (at most 8 layers).
            let max_layers = if anonymous.contains(name) { 8 } else { 1 };
            if !(1..=max_layers).contains(&layers)
                || files.len() != layers + 1
                || !files.iter().any(|f| f == "state.bin")
            {
                return Err(violation(format!(
                    "templates/{name} holds {files:?} (expected state.bin and 1 to {max_layers} layers)"
                )));
            }
        }
        self.stats.checks += 1;
        Ok(())
    }

    /// Descriptors, threads and mappings, attributed to the running capsules, the templates
    /// and the engine's VM shells; retried while the shell pool's filler is busy.
    fn check_process(&mut self) -> Result<()> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let problem = self.process_problem()?;
            match problem {
                None => {
                    self.stats.checks += 1;
                    return Ok(());
                }
                Some(p) if Instant::now() >= deadline => return Err(violation(p)),
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn process_problem(&self) -> Result<Option<String>> {
        let engine = self.engine()?;
        let (shells, _) = engine.shell_pool_counts();
        let r = read_resources()?;
        let (shells_after, _) = engine.shell_pool_counts();
        if shells != shells_after {
            return Ok(Some("the shell pool changed while it was counted".into()));
        }
        // Which capsules run now (a capsule with a timeout may have just been paused: read
        // statuses around the scan and accept either reading).
        let running: Vec<&Cap> = self
            .caps
            .iter()
            .filter(|c| c.handle.status() == Status::Running)
            .collect();
        let run_vcpus: usize = running.iter().map(|c| c.vcpus as usize).sum();
        let vms = r.fds.iter().filter(|f| *f == "anon_inode:kvm-vm").count();
        let vcpu_fds = r
            .fds
            .iter()
            .filter(|f| f.starts_with("anon_inode:kvm-vcpu"))
            .count();
        let vcpu_maps = r
            .maps
            .iter()
            .filter(|m| m.starts_with("anon_inode:kvm-vcpu"))
            .count();
        let mut out = String::new();
        if vms != running.len() + shells {
            let _ = write!(
                out,
                "{vms} KVM VM descriptors for {} running capsules and {shells} ready shells; ",
                running.len()
            );
        }
        if vcpu_fds < run_vcpus + shells || vcpu_fds > run_vcpus + 2 * shells {
            let _ = write!(
                out,
                "{vcpu_fds} vCPU descriptors for {run_vcpus} running vCPUs and {shells} shells of 1 or 2; "
            );
        }
        if vcpu_maps != vcpu_fds {
            let _ = write!(
                out,
                "{vcpu_maps} vCPU mappings for {vcpu_fds} vCPU descriptors; "
            );
        }
        // Threads: the baseline's, the engine's two, KVM's per-VM workers, and exactly each
        // running capsule's vCPUs (named after its id).
        let baseline = self.baseline_or_empty();
        let mut threads = tally(r.threads.iter());
        for (name, n) in &baseline.threads {
            if let Some(have) = threads.get_mut(name) {
                *have = have.saturating_sub(*n);
            }
        }
        for cap in &running {
            let name: String = format!("{}", cap.id).chars().take(15).collect();
            let have = threads.remove(&name).unwrap_or(0);
            if have != cap.vcpus as usize {
                let _ = write!(
                    out,
                    "{have} threads named {name} for its {} vCPUs; ",
                    cap.vcpus
                );
            }
        }
        for (name, n) in threads {
            let ok = match name.as_str() {
                "capsule-vm-shel" | "capsule-idle-wa" => n <= 1,
                // The guest event relay (seccomp on): one per process, kept once started.
                RELAY_THREAD => n <= 1,
                // KVM's huge-page recovery worker, at most one per VM.
                "kvm-nx-lpage-re" => n <= vms,
                _ => n == 0,
            };
            if !ok {
                let _ = write!(out, "{n} stray thread(s) named {name:?}; ");
            }
        }
        // Descriptors: what the baseline had, /dev/kvm, the store's two, KVM's, a userfaultfd
        // per template, and template layers (each template's open base, the pool's copy, one per shell or clone).
        let data = self.data_dir.to_string_lossy().into_owned();
        let mut fds = tally(r.fds.iter());
        for (name, n) in &baseline.fds {
            if let Some(have) = fds.get_mut(name) {
                *have = have.saturating_sub(*n);
            }
        }
        let (_, forks_allowed) = self.fork_templates();
        let live_templates: BTreeSet<&str> = self
            .templates
            .iter()
            .map(|t| t.name.as_str())
            .chain(forks_allowed.iter().map(String::as_str))
            .collect();
        let mut template_fds = 0;
        for (target, n) in fds {
            if n == 0 || target.starts_with("anon_inode:kvm-v") {
                continue;
            }
            // A template's userfaultfd (its clones map only the pages they touch;
            // capsule_vmm::memory::TouchedOnly), opened with its first clone.
            if target == "anon_inode:[userfaultfd]" {
                let templates = self.templates.len() + forks_allowed.len();
                if n > templates {
                    let _ = write!(out, "{n} userfaultfds for {templates} templates; ");
                }
                continue;
            }
            if target == "/dev/kvm"
                || target == format!("{data}/lock")
                || target == format!("{data}/capsules.journal")
            {
                if n > 1 {
                    let _ = write!(out, "{n} descriptors of {target}; ");
                }
                continue;
            }
            if let Some(rest) = target.strip_prefix(&format!("{data}/templates/")) {
                let name = rest.split('/').next().unwrap_or("");
                if live_templates.contains(name) && !target.ends_with(" (deleted)") {
                    template_fds += n;
                    continue;
                }
            }
            let _ = write!(out, "{n} stray descriptor(s) of {target}; ");
        }
        let template_allowance =
            2 * (self.templates.len() + forks_allowed.len()) + shells + running.len();
        if template_fds > template_allowance {
            let _ = write!(
                out,
                "{template_fds} template descriptors (allowed: 2 per template, 1 per shell or running capsule: {template_allowance}); "
            );
        }
        // Mappings of the data directory: a running capsule's own snapshot layers, or a live
        // template's (mapped by a clone or a pre-built shell). Paused capsules map nothing.
        let running_ids: BTreeSet<String> = running.iter().map(|c| c.id.to_string()).collect();
        for path in r.maps.iter().filter(|p| p.starts_with(&data)) {
            let rest = &path[data.len()..];
            let ok = !path.ends_with(" (deleted)")
                && match rest
                    .trim_start_matches('/')
                    .split('/')
                    .collect::<Vec<_>>()
                    .as_slice()
                {
                    ["templates", name, _] => live_templates.contains(name),
                    ["capsules", id, "snapshot", _] => running_ids.contains(*id),
                    _ => false,
                };
            if !ok {
                let _ = write!(out, "a stray mapping of {path}; ");
                break;
            }
        }
        // Anonymous mappings: per running vCPU its stack and guard, per capsule or shell its
        // memory, and the allocator's arenas.
        let anon = r.maps.iter().filter(|p| p.is_empty()).count();
        let allowance = baseline.anon_maps
            + arena_slack()
            + stack_cache_slack(self.o.max_capsules)
            + 2 * run_vcpus
            + 2 * running.len()
            + 2 * shells
            + RELAY_MAPPINGS
            + 8;
        if anon > allowance {
            let _ = write!(
                out,
                "{anon} anonymous mappings (allowed {allowance}: {} with no engine, {} arenas, {} cached stacks, {run_vcpus} vCPU stacks, {} capsules, {shells} shells); ",
                baseline.anon_maps,
                arena_slack(),
                stack_cache_slack(self.o.max_capsules),
                running.len()
            );
        }
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    fn baseline_or_empty(&self) -> Baseline {
        self.baseline.clone().unwrap_or(Baseline {
            fds: BTreeMap::new(),
            threads: BTreeMap::new(),
            anon_maps: 0,
        })
    }

    /// After a clean run: destroys every capsule and template, drops the engine.
    fn teardown(&mut self) -> Result<()> {
        for cap in self.caps.drain(..) {
            cap.handle
                .destroy()
                .map_err(|e| Error::msg(format!("destroy {} at the end: {e}", cap.id)))?;
        }
        if let Some(engine) = &self.engine {
            for t in self.templates.drain(..) {
                engine.delete_template(&t.name).map_err(|e| {
                    Error::msg(format!("delete template {} at the end: {e}", t.name))
                })?;
            }
        }
        self.engine = None;
        Ok(())
    }

    fn summary(&self, failed: Option<&Error>) {
        let ops: Vec<String> = self
            .stats
            .ops
            .iter()
            .map(|(op, n)| format!("{} {n}", op.name()))
            .collect();
        let total: u64 = self.stats.ops.values().sum();
        println!("soak: ==== summary (seed {}) ====", self.seed);
        println!(
            "soak: {} in {:.1} s: {total} operations: {}",
            if failed.is_some() {
                "FAILED"
            } else {
                "ran clean"
            },
            self.started.elapsed().as_secs_f64(),
            ops.join(", ")
        );
        println!(
            "soak: {} checks; auto-pauses seen {}; Paused answers to capsules with a timeout {}",
            self.stats.checks, self.stats.auto_pauses_seen, self.stats.paused_answers
        );
        if let (Some(first), Some(last)) = (
            self.stats.rss_samples.first(),
            self.stats.rss_samples.last(),
        ) {
            let max = self
                .stats
                .rss_samples
                .iter()
                .map(|s| s.1)
                .max()
                .unwrap_or(0);
            let warmup = self.o.duration.mul_f64(WARMUP_FRACTION).max(WARMUP_MIN);
            let top = |in_warmup: bool| {
                self.stats
                    .rss_samples
                    .iter()
                    .filter(|(t, _)| (*t <= warmup) == in_warmup)
                    .map(|(_, r)| *r)
                    .max()
                    .map_or_else(|| "-".to_string(), |r| r.to_string())
            };
            println!(
                "soak: RSS with nothing running ({} samples, one per reopen): first {} KiB, last {} KiB, max {max} KiB; largest in the warm-up {} KiB, after it {} KiB (allowed: +{RSS_TOLERANCE_KIB} KiB)",
                self.stats.rss_samples.len(),
                first.1,
                last.1,
                top(true),
                top(false)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = parse(&args(&["--minutes", "0.5", "--seed", "7", "--steps", "10"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.duration, Duration::from_secs(30));
        assert_eq!((o.seed, o.steps), (Some(7), Some(10)));
        assert!(parse(&args(&["--minutes", "-1"])).is_err());
        assert!(parse(&args(&["--max-capsules", "0"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn a_seed_gives_one_sequence() {
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..100).map(|_| rng.below(1000)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn observed_changes_follow_the_status_table() {
        use Status::*;
        // Statuses the soak may not have seen in between.
        assert!(reachable(Pending, Running));
        assert!(reachable(Running, Paused) && reachable(Paused, Running));
        assert!(reachable(Paused, Stopped));
        // Nothing leaves a terminal status, nothing goes back to booting.
        for to in [Pending, Starting, Running, Paused, Error] {
            assert!(!reachable(Stopped, to), "stopped -> {to}");
        }
        assert!(!reachable(Running, Pending) && !reachable(Paused, Starting));
        assert!(!reachable(Error, Running));
    }

    #[test]
    fn the_guest_model_tracks_touched_pages() {
        let mut guest = GuestModel::new(16);
        assert!(guest.capacity > 0);
        assert_eq!(guest.sum(), 0);
        let first = guest.touch(3);
        // Three pages written by generation 1, summed in order: what `sum` reads back.
        assert_eq!(first, guest.sum());
        // Rewriting a page changes the sum; touching wraps at the capacity.
        let before = guest.sum();
        guest.touch(guest.capacity);
        assert_eq!(guest.touched, guest.capacity);
        assert_eq!(guest.cursor, 3);
        assert_ne!(guest.sum(), before);
        assert_eq!((guest.count(), guest.count()), (1, 2));
    }
}

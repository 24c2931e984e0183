//! Engine, capsule and command configuration: builders with sane defaults, read back through
//! getters.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How an [`crate::Engine`] is set up: [`EngineConfig::default`], or
/// [`EngineConfig::builder`] to change some settings.
///
/// ```
/// use std::time::Duration;
/// let config = capsule::EngineConfig::builder()
///     .data_dir("/tmp/capsule-doc")
///     .max_concurrent_starts(8)
///     .boot_timeout(Duration::from_secs(5))
///     .build();
/// assert_eq!(config.max_concurrent_starts(), 8);
/// assert_eq!(config.data_dir(), std::path::Path::new("/tmp/capsule-doc"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    data_dir: PathBuf,
    kvm_path: PathBuf,
    max_concurrent_starts: usize,
    boot_timeout: Duration,
    idle_check_interval: Duration,
    shell_pool_size: usize,
    linux_images: Option<PathBuf>,
    max_capsules: Option<usize>,
    max_memory_mb: Option<u64>,
    seccomp: bool,
}

impl Default for EngineConfig {
    /// Data under `$XDG_DATA_HOME/capsule` (or `~/.local/share/capsule`, or a per-user
    /// folder in the temp dir when neither is set), `/dev/kvm`, at most twice the CPU count of
    /// capsules booting at once, 30 s for a guest to become ready, an inactivity check every
    /// 100 ms, two ready VM shells per recent shape, Linux images under `DATA_DIR/images`,
    /// seccomp filters on the vCPU and device threads.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        EngineConfig {
            data_dir: default_data_dir(),
            kvm_path: PathBuf::from(capsule_vmm::hypervisor::DEFAULT_KVM_PATH),
            max_concurrent_starts: cpus * 2,
            boot_timeout: Duration::from_secs(30),
            idle_check_interval: Duration::from_millis(100),
            shell_pool_size: 2,
            linux_images: None,
            max_capsules: None,
            max_memory_mb: None,
            seccomp: true,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("capsule");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/capsule");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("capsule-{uid}"))
}

impl EngineConfig {
    /// A builder starting from [`EngineConfig::default`].
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: EngineConfig::default(),
        }
    }

    /// Where capsule records, paused capsules and templates live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The KVM device the engine opens.
    pub fn kvm_path(&self) -> &Path {
        &self.kvm_path
    }

    /// How many capsules may boot at the same time.
    pub fn max_concurrent_starts(&self) -> usize {
        self.max_concurrent_starts
    }

    /// How long a guest may take to become ready.
    pub fn boot_timeout(&self) -> Duration {
        self.boot_timeout
    }

    /// How often capsules are checked for inactivity.
    pub fn idle_check_interval(&self) -> Duration {
        self.idle_check_interval
    }

    /// How many ready VM shells are kept per recent capsule shape.
    pub fn shell_pool_size(&self) -> usize {
        self.shell_pool_size
    }

    /// The most capsules that may hold a VM at once (pending, starting or running; paused
    /// ones hold none), if limited.
    pub fn max_capsules(&self) -> Option<usize> {
        self.max_capsules
    }

    /// The most guest memory, in MiB, that capsules holding a VM may have together, if
    /// limited.
    pub fn max_memory_mb(&self) -> Option<u64> {
        self.max_memory_mb
    }

    /// The Linux images directory in effect (the one set, or `DATA_DIR/images`).
    pub fn linux_images(&self) -> PathBuf {
        self.linux_images
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    /// Whether vCPU threads and device threads run under their seccomp filters (see
    /// [`EngineConfigBuilder::seccomp`]).
    pub fn seccomp(&self) -> bool {
        self.seccomp
    }
}

/// Builds an [`EngineConfig`]; see [`EngineConfig::builder`]. [`crate::Engine::new`] also
/// takes the builder itself.
#[derive(Debug, Clone)]
#[must_use]
pub struct EngineConfigBuilder {
    config: EngineConfig,
}

impl EngineConfigBuilder {
    /// Where capsule records, paused capsules and templates live.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = dir.into();
        self
    }

    /// The KVM device to open (default `/dev/kvm`).
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kvm_path = path.into();
        self
    }

    /// How many capsules may boot at the same time; the rest wait in [`crate::Status::Pending`].
    /// Values below 1 are treated as 1.
    pub fn max_concurrent_starts(mut self, n: usize) -> Self {
        self.config.max_concurrent_starts = n.max(1);
        self
    }

    /// How long a guest may take to become ready before its capsule goes to error
    /// ([`crate::Error::BootTimeout`], with the end of its console). Default 30 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.config.boot_timeout = timeout;
        self
    }

    /// How often capsules are checked for inactivity (auto-pause), default 100 ms, at least
    /// 1 ms. An idle capsule is paused within its timeout plus this interval.
    pub fn idle_check_interval(mut self, interval: Duration) -> Self {
        self.config.idle_check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many fresh, never-run VMs ("shells") to keep ready for each capsule shape
    /// (memory size and vCPU count) the engine has started recently, default 2. A shell
    /// takes KVM's slowest steps off the path of `create` and `resume`; it costs a little
    /// kernel memory and no guest memory until used. A Linux shape keeps at most one shell,
    /// and that one has the kernel and initramfs already loaded: it holds their memory
    /// (about 50 MB for the `minimal` image) and saves copying them at boot. 0 builds every
    /// VM on demand.
    pub fn shell_pool_size(mut self, n: usize) -> Self {
        self.config.shell_pool_size = n;
        self
    }

    /// Where the Linux templates' images are (`minimal/vmlinuz`, `minimal/initrd.img`);
    /// default `DATA_DIR/images`, where `cargo xtask build-minimal` puts them.
    pub fn linux_images(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.linux_images = Some(dir.into());
        self
    }

    /// Admission control: at most `n` capsules holding a VM at once (pending, starting or
    /// running; paused ones hold none). A `create`, `resume` or `connect` that would exceed
    /// it fails with [`crate::Error::ResourceExhausted`] ([`crate::Resource::Capsules`]) and
    /// leaves nothing behind. Default: no limit.
    pub fn max_capsules(mut self, n: usize) -> Self {
        self.config.max_capsules = Some(n);
        self
    }

    /// Admission control: at most `mb` MiB of guest memory for the capsules holding a VM
    /// together (each counts its full memory size, though only touched pages are
    /// resident). Exceeding it fails as [`EngineConfigBuilder::max_capsules`] does, with
    /// [`crate::Resource::MemoryMb`]. Default: no limit.
    pub fn max_memory_mb(mut self, mb: u64) -> Self {
        self.config.max_memory_mb = Some(mb);
        self
    }

    /// Whether each thread that handles guest-controlled data (every vCPU thread, and a
    /// Linux capsule's device thread) installs a seccomp filter on itself, allowing only the
    /// system calls and KVM ioctls it needs; anything else fails with `EPERM` (a capsule
    /// whose thread is refused a call it needs goes to [`crate::Status::Error`] with the
    /// failed operation as its reason). Default `true`; no other thread of the program is
    /// filtered. Switch it off when something else makes system calls on those threads: a
    /// debugger, profiler or sanitizer, or a `tracing` subscriber that opens files or sockets
    /// (writing to an open descriptor is allowed). The lists: `capsule_vmm::seccomp`.
    pub fn seccomp(mut self, on: bool) -> Self {
        self.config.seccomp = on;
        self
    }

    /// The configuration.
    pub fn build(self) -> EngineConfig {
        self.config
    }
}

impl From<EngineConfigBuilder> for EngineConfig {
    fn from(builder: EngineConfigBuilder) -> Self {
        builder.build()
    }
}

/// What capsule to create: a template name plus resources. For the built-in `"probe"` the
/// defaults are Wrenn's: 1 vCPU and 512 MiB; a template you created defaults to (and must
/// keep) the vCPUs and memory it was snapshotted with. No inactivity timeout, and
/// [`CapsuleConfig::wait`] on, by default.
///
/// ```
/// use std::time::Duration;
/// let config = capsule::CapsuleConfig::builder("probe")
///     .vcpus(2)
///     .memory_mb(64)
///     .timeout(Duration::from_secs(300))
///     .wait(true)
///     .build();
/// assert_eq!(config.vcpus(), Some(2));
/// assert_eq!(capsule::CapsuleConfig::new("probe").memory_mb(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleConfig {
    template: String,
    vcpus: Option<u32>,
    memory_mb: Option<u64>,
    timeout: Duration,
    wait: bool,
}

impl CapsuleConfig {
    /// A capsule from `template` (the built-in `"probe"` or `"minimal"`, or a template you
    /// created), with every default.
    pub fn new(template: impl Into<String>) -> Self {
        CapsuleConfig {
            template: template.into(),
            vcpus: None,
            memory_mb: None,
            timeout: Duration::ZERO,
            wait: true,
        }
    }

    /// A builder for a capsule from `template`.
    pub fn builder(template: impl Into<String>) -> CapsuleConfigBuilder {
        CapsuleConfigBuilder {
            config: CapsuleConfig::new(template),
        }
    }

    /// The template name.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The vCPU count, if set (otherwise the template's).
    pub fn vcpus(&self) -> Option<u32> {
        self.vcpus
    }

    /// The memory size in MiB, if set (otherwise the template's).
    pub fn memory_mb(&self) -> Option<u64> {
        self.memory_mb
    }

    /// The inactivity timeout (zero: never auto-pause).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether [`crate::Engine::create`] blocks until the capsule is running.
    pub fn wait(&self) -> bool {
        self.wait
    }
}

impl From<&str> for CapsuleConfig {
    /// A capsule from this template with every default.
    fn from(template: &str) -> Self {
        CapsuleConfig::new(template)
    }
}

/// Builds a [`CapsuleConfig`]; see [`CapsuleConfig::builder`]. [`crate::Engine::create`]
/// also takes the builder itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct CapsuleConfigBuilder {
    config: CapsuleConfig,
}

impl CapsuleConfigBuilder {
    /// Number of vCPUs (at least 1).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.config.vcpus = Some(n);
        self
    }

    /// Guest memory in MiB. It is reserved, not populated: only what the guest touches uses
    /// host memory.
    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.config.memory_mb = Some(mb);
        self
    }

    /// Inactivity timeout after which the capsule is paused automatically; zero disables it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Whether [`crate::Engine::create`] blocks until the capsule is running (default `true`).
    /// With `false` it returns at once and the capsule boots in the background; use
    /// [`crate::Capsule::wait_ready`].
    pub fn wait(mut self, wait: bool) -> Self {
        self.config.wait = wait;
        self
    }

    /// The configuration.
    pub fn build(self) -> CapsuleConfig {
        self.config
    }
}

impl From<CapsuleConfigBuilder> for CapsuleConfig {
    fn from(builder: CapsuleConfigBuilder) -> Self {
        builder.build()
    }
}

/// Called with each chunk of a command's output as it arrives (see
/// [`RunOptions::on_stdout`]).
pub type OutputCallback = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The default most bytes of stdout (and of stderr) kept for a command's result: 1 MiB.
pub const DEFAULT_OUTPUT_LIMIT: usize = 1024 * 1024;

/// How long a command run with [`crate::Commands::run`] may take unless told: 30 s.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A command's timeout as set (or not) by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommandTimeout {
    /// 30 s for `run`, none for `spawn` and terminals.
    Default,
    After(Duration),
    Never,
}

/// How to run one command ([`crate::Commands::run_with`], [`crate::Commands::spawn`],
/// [`crate::Ptys::create`]): a builder.
///
/// ```
/// use std::time::Duration;
/// let options = capsule::RunOptions::new()
///     .timeout(Duration::from_secs(5))
///     .env("LANG", "C")
///     .env("LANG", "C.UTF-8") // a key set twice keeps the last value
///     .cwd("/tmp")
///     .user("app")
///     .stdin("answer\n")
///     .output_limit(64 * 1024)
///     .on_stdout(|chunk| print!("{}", String::from_utf8_lossy(chunk)));
/// ```
///
/// The probe guest has no environment, directories, users or stdin: a command with any of
/// those set fails there with [`crate::Error::Unsupported`] (rather than running without
/// them).
#[derive(Clone)]
#[must_use]
pub struct RunOptions {
    timeout: CommandTimeout,
    pub(crate) envs: Vec<(String, String)>,
    pub(crate) cwd: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) stdin: Option<Vec<u8>>,
    pub(crate) clear_env: bool,
    pub(crate) output_limit: usize,
    pub(crate) on_stdout: Option<OutputCallback>,
    pub(crate) on_stderr: Option<OutputCallback>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: CommandTimeout::Default,
            envs: Vec::new(),
            cwd: None,
            user: None,
            stdin: None,
            clear_env: false,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            on_stdout: None,
            on_stderr: None,
        }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("timeout", &self.timeout)
            .field("envs", &self.envs)
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("stdin", &self.stdin.as_ref().map(Vec::len))
            .field("clear_env", &self.clear_env)
            .field("output_limit", &self.output_limit)
            .field("on_stdout", &self.on_stdout.is_some())
            .field("on_stderr", &self.on_stderr.is_some())
            .finish()
    }
}

impl RunOptions {
    /// The defaults: a 30 s timeout for [`crate::Commands::run`] (none for
    /// [`crate::Commands::spawn`] and terminals), the guest's environment and directory, as
    /// root, no stdin, output kept up to [`DEFAULT_OUTPUT_LIMIT`], no callbacks.
    pub fn new() -> Self {
        RunOptions::default()
    }

    /// How long the command may run. When it expires the command is killed (in a Linux
    /// capsule, its whole process group) and the call ([`crate::Commands::run`], or
    /// [`crate::CommandHandle::wait`] for a spawned command) returns
    /// [`crate::Error::Timeout`] with [`crate::TimeoutKind::Command`]; the capsule stays
    /// usable. Default: 30 s for `run`, none for `spawn` and terminals.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = CommandTimeout::After(timeout);
        self
    }

    /// No timeout: the command runs however long it takes.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = CommandTimeout::Never;
        self
    }

    /// Sets the environment variable `key` to `value` for the command (Linux capsules).
    /// Setting a key again replaces its value.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        match self.envs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.envs.push((key, value)),
        }
        self
    }

    /// Starts from an empty environment instead of the guest's (Linux capsules): only the
    /// variables set with [`RunOptions::env`], the capsule's `CAPSULE_ID`, `PATH` (a default
    /// one unless set) and, with [`RunOptions::user`], `HOME`, `USER` and `LOGNAME`.
    pub fn clear_env(mut self) -> Self {
        self.clear_env = true;
        self
    }

    /// Working directory (Linux capsules).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs the command as this user of the guest (a name in its `/etc/passwd`): its uid,
    /// primary group and supplementary groups (from `/etc/group`), with `HOME`, `USER` and
    /// `LOGNAME` from its passwd entry. A user the guest does not know fails the command
    /// with [`crate::Error::InvalidArgument`]. Default: root. Linux capsules.
    pub fn user(mut self, name: impl Into<String>) -> Self {
        self.user = Some(name.into());
        self
    }

    /// Feeds `bytes` to the command's stdin, then closes it (end of file). Without it a
    /// command run with [`crate::Commands::run`] reads `/dev/null`, and a spawned one reads
    /// what [`crate::CommandHandle::write_stdin`] sends. Linux capsules.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// The most bytes of stdout, and of stderr, kept in the command's
    /// [`crate::CommandOutput`] (default [`DEFAULT_OUTPUT_LIMIT`]); the rest is discarded
    /// and the `*_truncated` flag set. Up to 2 MiB the guest collects the output and sends
    /// it at the end; above, the output is streamed to the host, which keeps this much.
    /// Output taken through [`crate::CommandHandle::output`] does not count.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// Calls `f` with every chunk of the command's stdout as it arrives, on a thread of the
    /// command's own, in order (for [`crate::Commands::run`] too, which then streams the
    /// output; the probe calls it once, at the end). A chunk given to `f` is still kept in
    /// the command's result (up to the output limit) but never appears in
    /// [`crate::CommandHandle::output`]. A slow `f` slows the command down (it blocks once
    /// the guest's pipe is full), never the engine.
    pub fn on_stdout(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        self.on_stdout = Some(Arc::new(f));
        self
    }

    /// As [`RunOptions::on_stdout`], for stderr.
    pub fn on_stderr(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        self.on_stderr = Some(Arc::new(f));
        self
    }

    /// The timeout of a command run to its end (`run`).
    pub(crate) fn run_timeout(&self) -> Option<Duration> {
        match self.timeout {
            CommandTimeout::Default => Some(DEFAULT_RUN_TIMEOUT),
            CommandTimeout::After(d) => Some(d),
            CommandTimeout::Never => None,
        }
    }

    /// The timeout of a spawned command or a terminal.
    pub(crate) fn spawn_timeout(&self) -> Option<Duration> {
        match self.timeout {
            CommandTimeout::After(d) => Some(d),
            CommandTimeout::Default | CommandTimeout::Never => None,
        }
    }

    /// Whether a callback wants the output as it comes.
    pub(crate) fn has_callbacks(&self) -> bool {
        self.on_stdout.is_some() || self.on_stderr.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_options_keep_each_environment_key_once() {
        let options = RunOptions::new()
            .env("A", "1")
            .env("B", "2")
            .env("A", "3")
            .no_timeout();
        assert_eq!(
            options.envs,
            [
                ("A".to_owned(), "3".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(options.run_timeout(), None);
        assert_eq!(options.spawn_timeout(), None);
        let two = RunOptions::new().timeout(Duration::from_secs(2));
        assert_eq!(two.run_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(two.spawn_timeout(), Some(Duration::from_secs(2)));
        // The default: 30 s to run, none to spawn.
        assert_eq!(RunOptions::new().run_timeout(), Some(DEFAULT_RUN_TIMEOUT));
        assert_eq!(RunOptions::new().spawn_timeout(), None);
        let with = RunOptions::new().on_stderr(|_| {}).stdin("x").user("u");
        assert!(with.has_callbacks() && !RunOptions::new().has_callbacks());
        let shown = format!("{with:?}");
        assert!(shown.contains("on_stderr: true") && shown.contains("stdin: Some(1)"));
    }

    #[test]
    fn builders_and_getters_agree() {
        let config = EngineConfig::builder()
            .data_dir("/d")
            .max_concurrent_starts(0)
            .idle_check_interval(Duration::ZERO)
            .build();
        assert_eq!(config.data_dir(), Path::new("/d"));
        assert_eq!(config.max_concurrent_starts(), 1);
        assert_eq!(config.idle_check_interval(), Duration::from_millis(1));
        assert_eq!(config.linux_images(), Path::new("/d/images"));
        assert!(config.seccomp());
        assert!(!EngineConfig::builder().seccomp(false).build().seccomp());
        let capsule: CapsuleConfig = CapsuleConfig::builder("t").memory_mb(64).wait(false).into();
        assert_eq!(
            (capsule.template(), capsule.memory_mb(), capsule.wait()),
            ("t", Some(64), false)
        );
    }
}

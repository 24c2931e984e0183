//! Engine, capsule and command configuration: builders with sane defaults, read back through
//! getters.

use std::path::{Path, PathBuf};
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

/// How to run one command ([`crate::Commands::run_with`]): a builder.
///
/// ```
/// use std::time::Duration;
/// let options = capsule::RunOptions::new()
///     .timeout(Duration::from_secs(5))
///     .env("LANG", "C")
///     .env("LANG", "C.UTF-8") // a key set twice keeps the last value
///     .cwd("/tmp");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct RunOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) envs: Vec<(String, String)>,
    pub(crate) cwd: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Some(Duration::from_secs(30)),
            envs: Vec::new(),
            cwd: None,
        }
    }
}

impl RunOptions {
    /// The defaults: a 30 s timeout, no extra environment, the guest's default directory.
    pub fn new() -> Self {
        RunOptions::default()
    }

    /// How long the command may run. When it expires the command is killed (in a Linux
    /// capsule, its whole process group), the call returns [`crate::Error::Timeout`] with
    /// [`crate::TimeoutKind::Command`], and the capsule stays usable. Default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No timeout: wait for the command however long it runs.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Sets the environment variable `key` to `value` for the command (Linux capsules; the
    /// probe has no environment and ignores it). Setting a key again replaces its value.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        match self.envs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.envs.push((key, value)),
        }
        self
    }

    /// Working directory (Linux capsules; ignored by the probe).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
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
        assert_eq!(options.timeout, None);
        assert_eq!(
            RunOptions::new().timeout(Duration::from_secs(2)).timeout,
            Some(Duration::from_secs(2))
        );
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

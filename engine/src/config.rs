//! Engine, capsule and command configuration (builders with sane defaults).

use std::path::PathBuf;
use std::time::Duration;

/// How an [`crate::Engine`] is set up. Start from [`EngineConfig::default`] and adjust.
///
/// ```
/// use std::time::Duration;
/// let config = capsule::EngineConfig::default()
///     .data_dir("/tmp/capsule-doc")
///     .max_concurrent_starts(8)
///     .boot_timeout(Duration::from_secs(5));
/// assert_eq!(config.get_max_concurrent_starts(), 8);
/// ```
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub(crate) data_dir: PathBuf,
    pub(crate) kvm_path: PathBuf,
    pub(crate) max_concurrent_starts: usize,
    pub(crate) boot_timeout: Duration,
    pub(crate) idle_check_interval: Duration,
    pub(crate) shell_pool_size: usize,
    pub(crate) linux_images: Option<PathBuf>,
}

impl Default for EngineConfig {
    /// Data under `$XDG_DATA_HOME/capsule` (or `~/.local/share/capsule`, or a per-user
    /// folder in the temp dir when neither is set), `/dev/kvm`, at most twice the CPU count of
    /// capsules booting at once, and 30 s for a guest to become ready.
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
    /// Where capsule metadata and snapshots live.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// The KVM device to open (default `/dev/kvm`).
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// How many capsules may boot at the same time; the rest wait in [`crate::Status::Pending`].
    /// Values below 1 are treated as 1.
    pub fn max_concurrent_starts(mut self, n: usize) -> Self {
        self.max_concurrent_starts = n.max(1);
        self
    }

    /// How long a guest may take to become ready before its capsule goes to error
    /// ([`crate::Error::BootTimeout`], with the end of its console). Default 30 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// How often capsules are checked for inactivity (auto-pause), default 100 ms. An idle
    /// capsule is paused within its timeout plus this interval.
    pub fn idle_check_interval(mut self, interval: Duration) -> Self {
        self.idle_check_interval = interval.max(Duration::from_millis(1));
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
        self.shell_pool_size = n;
        self
    }

    /// Where the Linux templates' images are (`minimal/vmlinuz`, `minimal/initrd.img`);
    /// default `DATA_DIR/images`, where `cargo xtask build-minimal` puts them.
    pub fn linux_images(mut self, dir: impl Into<PathBuf>) -> Self {
        self.linux_images = Some(dir.into());
        self
    }

    /// The Linux images directory in effect.
    pub fn get_linux_images(&self) -> PathBuf {
        self.linux_images
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    /// The data directory.
    pub fn get_data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The concurrent-start limit.
    pub fn get_max_concurrent_starts(&self) -> usize {
        self.max_concurrent_starts
    }

    /// How long a guest may take to become ready.
    pub fn get_boot_timeout(&self) -> Duration {
        self.boot_timeout
    }
}

/// What capsule to create: a template name plus resources. For the built-in `"probe"` the
/// defaults are Wrenn's: 1 vCPU and 512 MiB; a template you created defaults to (and must
/// keep) the vCPUs and memory it was snapshotted with. No inactivity timeout and
/// [`CapsuleConfig::wait`] on by default.
///
/// ```
/// use std::time::Duration;
/// let config = capsule::CapsuleConfig::new("probe")
///     .vcpus(2)
///     .memory_mb(64)
///     .timeout(Duration::from_secs(300))
///     .wait(true);
/// assert_eq!(config.get_vcpus(), Some(2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleConfig {
    pub(crate) template: String,
    pub(crate) vcpus: Option<u32>,
    pub(crate) memory_mb: Option<u64>,
    pub(crate) timeout: Duration,
    pub(crate) wait: bool,
}

impl CapsuleConfig {
    /// A capsule from `template` (the built-in `"probe"`, or a template you created).
    pub fn new(template: impl Into<String>) -> Self {
        CapsuleConfig {
            template: template.into(),
            vcpus: None,
            memory_mb: None,
            timeout: Duration::ZERO,
            wait: true,
        }
    }

    /// Number of vCPUs (at least 1).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// Guest memory in MiB. It is reserved, not populated: only what the guest touches uses
    /// host memory.
    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.memory_mb = Some(mb);
        self
    }

    /// Inactivity timeout after which the capsule is paused automatically; zero disables it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether [`crate::Engine::create`] blocks until the capsule is running (default `true`).
    /// With `false` it returns at once and the capsule boots in the background; use
    /// [`crate::Capsule::wait_ready`].
    pub fn wait(mut self, wait: bool) -> Self {
        self.wait = wait;
        self
    }

    /// The template name.
    pub fn get_template(&self) -> &str {
        &self.template
    }

    /// The vCPU count, if set (otherwise the template's).
    pub fn get_vcpus(&self) -> Option<u32> {
        self.vcpus
    }

    /// The memory size in MiB, if set (otherwise the template's).
    pub fn get_memory_mb(&self) -> Option<u64> {
        self.memory_mb
    }
}

/// Options for [`crate::Commands::run_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOptions {
    /// How long the command may run; `None` waits forever. When it expires the command is
    /// killed (in a Linux capsule, its whole process group), the call returns
    /// [`crate::Error::Timeout`], and the capsule stays usable. Default 30 s.
    pub timeout: Option<Duration>,
    /// Environment variables to set for the command (Linux capsules; the probe has no
    /// environment and ignores them).
    pub envs: Vec<(String, String)>,
    /// Working directory (Linux capsules; ignored by the probe).
    pub cwd: Option<String>,
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
    /// Default options with this timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        RunOptions {
            timeout: Some(timeout),
            ..RunOptions::default()
        }
    }

    /// Default options with no timeout.
    pub fn no_timeout() -> Self {
        RunOptions {
            timeout: None,
            ..RunOptions::default()
        }
    }

    /// These options with the environment variable `key=value` added.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// These options with the working directory `dir`.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
}

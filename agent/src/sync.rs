//! The `Sync` request: after a boot or a snapshot restore, set the guest
//! clock, reseed the kernel CRNG and set the environment of later commands.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::sync::{Arc, Mutex};

use capsule_agent_protocol::SyncRequest;

use crate::sys;

/// Variables the last `Sync` set for every later command: applied after a
/// request's `clear_env` and before its own `env`.
///
/// A cheap handle to state shared by its clones; it lives in
/// [`crate::ServeConfig`], so it outlasts one connection (PID 1 reopens its
/// channel with the same config).
#[derive(Debug, Clone, Default)]
pub struct SyncEnv(Arc<Mutex<Vec<(String, String)>>>);

impl SyncEnv {
    /// The variables now in force (empty before the first `Sync`).
    pub fn get(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the variables.
    pub fn set(&self, env: Vec<(String, String)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = env;
    }
}

/// A step of [`apply`] that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    SetClock,
    AddEntropy,
    ReseedCrng,
}

/// Why a `Sync` failed: the step, and the error of its syscall.
#[derive(Debug)]
pub(crate) struct SyncError {
    pub(crate) step: Step,
    pub(crate) source: io::Error,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = match self.step {
            Step::SetClock => "setting CLOCK_REALTIME",
            Step::AddEntropy => "adding entropy (RNDADDENTROPY)",
            Step::ReseedCrng => "reseeding the CRNG (RNDRESEEDCRNG)",
        };
        write!(f, "sync: {step}: {}", self.source)
    }
}

/// What [`apply`] asks of the kernel; a fake in tests, which must never set
/// the clock of the machine they run on.
pub(crate) trait Kernel {
    fn set_realtime(&mut self, ns: u64) -> io::Result<()>;
    fn add_entropy(&mut self, data: &[u8]) -> io::Result<()>;
    fn reseed_crng(&mut self) -> io::Result<()>;
}

/// The running kernel, through `clock_settime` and `/dev/urandom`.
#[derive(Debug, Default)]
pub(crate) struct LiveKernel {
    urandom: Option<File>,
}

impl LiveKernel {
    /// `/dev/urandom`, opened write-only on first use.
    fn urandom(&mut self) -> io::Result<&File> {
        let f = match self.urandom.take() {
            Some(f) => f,
            None => OpenOptions::new()
                .write(true)
                .open("/dev/urandom")
                .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/urandom: {e}")))?,
        };
        Ok(self.urandom.insert(f))
    }
}

impl Kernel for LiveKernel {
    fn set_realtime(&mut self, ns: u64) -> io::Result<()> {
        sys::set_realtime(ns)
    }

    fn add_entropy(&mut self, data: &[u8]) -> io::Result<()> {
        sys::add_entropy(self.urandom()?, data)
    }

    fn reseed_crng(&mut self) -> io::Result<()> {
        sys::reseed_crng(self.urandom()?)
    }
}

/// Applies `req` in order, stopping at the first step that fails (later
/// steps are then not applied): the clock (unless `realtime_ns` is 0), the
/// entropy and a CRNG reseed (unless `entropy` is empty), then `env`, which
/// replaces the variables in `env_state`.
pub(crate) fn apply(
    req: SyncRequest,
    env_state: &SyncEnv,
    kernel: &mut impl Kernel,
) -> Result<(), SyncError> {
    let fail = |step| move |source| SyncError { step, source };
    if req.realtime_ns != 0 {
        kernel
            .set_realtime(req.realtime_ns)
            .map_err(fail(Step::SetClock))?;
    }
    if !req.entropy.is_empty() {
        kernel
            .add_entropy(&req.entropy)
            .map_err(fail(Step::AddEntropy))?;
        kernel.reseed_crng().map_err(fail(Step::ReseedCrng))?;
    }
    env_state.set(req.env);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Clock(u64),
        Entropy(Vec<u8>),
        Reseed,
    }

    /// Records calls; fails the call of `fail_at`, if any.
    #[derive(Default)]
    struct FakeKernel {
        calls: Vec<Call>,
        fail_at: Option<Step>,
    }

    impl FakeKernel {
        fn call(&mut self, call: Call, step: Step) -> io::Result<()> {
            self.calls.push(call);
            if self.fail_at == Some(step) {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            } else {
                Ok(())
            }
        }
    }

    impl Kernel for FakeKernel {
        fn set_realtime(&mut self, ns: u64) -> io::Result<()> {
            self.call(Call::Clock(ns), Step::SetClock)
        }
        fn add_entropy(&mut self, data: &[u8]) -> io::Result<()> {
            self.call(Call::Entropy(data.to_vec()), Step::AddEntropy)
        }
        fn reseed_crng(&mut self) -> io::Result<()> {
            self.call(Call::Reseed, Step::ReseedCrng)
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn full() -> SyncRequest {
        SyncRequest {
            realtime_ns: 1_700_000_000_000_000_001,
            entropy: vec![1, 2, 3],
            env: env(&[("CAPSULE_ID", "c1")]),
        }
    }

    #[test]
    fn steps_run_in_order_then_env_is_set() {
        let state = SyncEnv::default();
        let mut k = FakeKernel::default();
        apply(full(), &state, &mut k).unwrap();
        assert_eq!(
            k.calls,
            vec![
                Call::Clock(1_700_000_000_000_000_001),
                Call::Entropy(vec![1, 2, 3]),
                Call::Reseed
            ]
        );
        assert_eq!(state.get(), env(&[("CAPSULE_ID", "c1")]));
    }

    #[test]
    fn zero_clock_and_no_entropy_only_set_env() {
        let state = SyncEnv::default();
        let mut k = FakeKernel::default();
        let req = SyncRequest {
            env: env(&[("A", "1")]),
            ..SyncRequest::default()
        };
        apply(req, &state, &mut k).unwrap();
        assert!(k.calls.is_empty(), "{:?}", k.calls);
        assert_eq!(state.get(), env(&[("A", "1")]));
    }

    #[test]
    fn a_later_sync_replaces_the_env() {
        let state = SyncEnv::default();
        let shared = state.clone();
        let mut k = FakeKernel::default();
        apply(full(), &state, &mut k).unwrap();
        let req = SyncRequest {
            env: env(&[("B", "2")]),
            ..SyncRequest::default()
        };
        apply(req, &state, &mut k).unwrap();
        assert_eq!(shared.get(), env(&[("B", "2")]));
        apply(SyncRequest::default(), &state, &mut k).unwrap();
        assert!(shared.get().is_empty());
    }

    #[test]
    fn a_failing_step_stops_the_later_ones() {
        for (fail_at, calls) in [
            (Step::SetClock, 1),
            (Step::AddEntropy, 2),
            (Step::ReseedCrng, 3),
        ] {
            let state = SyncEnv::default();
            state.set(env(&[("OLD", "x")]));
            let mut k = FakeKernel {
                fail_at: Some(fail_at),
                ..FakeKernel::default()
            };
            let e = apply(full(), &state, &mut k).unwrap_err();
            assert_eq!(e.step, fail_at);
            assert_eq!(k.calls.len(), calls, "{:?}", k.calls);
            // The env of the failed Sync is not applied.
            assert_eq!(state.get(), env(&[("OLD", "x")]));
        }
    }

    /// Feeds the real kernel of the machine the tests run on (never its
    /// clock): needs root, so it only runs when asked for, with
    /// `cargo test -p capsule-agent -- --ignored live_entropy`.
    #[test]
    #[ignore = "adds entropy to this machine's kernel; needs CAP_SYS_ADMIN"]
    fn live_entropy_and_reseed() {
        let mut k = LiveKernel::default();
        k.add_entropy(&[0x5a; 64]).unwrap();
        k.reseed_crng().unwrap();
    }

    #[test]
    fn error_names_the_step() {
        let mut k = FakeKernel {
            fail_at: Some(Step::ReseedCrng),
            ..FakeKernel::default()
        };
        let msg = apply(full(), &SyncEnv::default(), &mut k)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("sync: reseeding the CRNG"), "{msg}");
        assert!(msg.contains("not permitted"), "{msg}");
    }
}

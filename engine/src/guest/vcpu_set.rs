//! The vCPU threads of one running guest, as both guest kinds keep them: started together
//! (each under its seccomp filter unless the engine's config turns filters off), told to stop
//! through one flag, interrupted and joined together, and stopped when the set is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use capsule_vmm::seccomp::{self, ThreadRole};
use capsule_vmm::Kicker;

use super::vcpu_thread::{self, VcpuJoinHandle};
use crate::error::{Error, Result};
use crate::sync::lock;

/// A guest's vCPU threads and their shared stop flag.
pub(crate) struct VcpuSet {
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<(Kicker, VcpuJoinHandle)>>,
}

impl VcpuSet {
    pub(crate) fn new() -> Self {
        VcpuSet {
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// The stop flag, for the threads' loops to check after each interruption.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    /// Whether [`VcpuSet::stop`] (or [`VcpuSet::mark_stopping`]) was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Raises the stop flag without waiting for anything.
    pub(crate) fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Starts a vCPU thread named `name` running `body`; `kicker` interrupts its vCPU. With
    /// `seccomp`, the thread first installs the vCPU filter on itself and `body` runs only
    /// once it is in place (this waits for that; a thread that cannot install it ends, and
    /// so does the start, with the error).
    pub(crate) fn spawn(
        &self,
        name: &str,
        stack_size: usize,
        kicker: Kicker,
        seccomp: bool,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        if !seccomp {
            let handle = vcpu_thread::spawn(name, stack_size, body)
                .map_err(|e| Error::os("spawning a vCPU thread", e))?;
            lock(&self.threads).push((kicker, handle));
            return Ok(());
        }
        let (confined_tx, confined_rx) = crossbeam_channel::bounded(1);
        let handle = vcpu_thread::spawn(name, stack_size, move || {
            let confined = seccomp::confine_current_thread(ThreadRole::Vcpu);
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if ok {
                body();
            }
        })
        .map_err(|e| Error::os("spawning a vCPU thread", e))?;
        match confined_rx.recv() {
            Ok(Ok(())) => {
                lock(&self.threads).push((kicker, handle));
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(Error::Hypervisor(e))
            }
            Err(_) => {
                let _ = handle.join();
                Err(Error::os(
                    "starting a vCPU thread",
                    std::io::Error::other("the thread ended before installing its filter"),
                ))
            }
        }
    }

    /// Raises the stop flag, interrupts every vCPU and waits for every thread. Idempotent.
    /// Must not be called from one of these threads.
    pub(crate) fn stop(&self) {
        self.mark_stopping();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for (kicker, _) in &threads {
            kicker.kick();
        }
        for (_, handle) in threads {
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A background thread that runs a task at a fixed interval until it is dropped.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::error::{Error, Result};

/// Stops (and joins) its thread when dropped.
pub(crate) struct Periodic {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Starts a thread named `name` running `tick` every `interval`, until this is dropped or
    /// `tick` returns `false`.
    pub(crate) fn start(
        name: &str,
        interval: Duration,
        mut tick: impl FnMut() -> bool + Send + 'static,
    ) -> Result<Periodic> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || loop {
                match stop_rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if !tick() {
                    return;
                }
            })
            .map_err(|e| Error::os("spawning a background thread", e))?;
        Ok(Periodic {
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(handle) = self.handle.take() {
            // The task itself may be what drops us; never join a thread from itself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

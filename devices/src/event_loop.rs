//! The device thread: one event loop (event-manager's `EventManager`) that runs device work
//! off the vCPU threads.
//!
//! Each virtio transport is one [`TransportSubscriber`]: it waits on the transport's queue
//! eventfds (which KVM signals through `KVM_IOEVENTFD`, or the transport itself on an MMIO
//! `QueueNotify` write) and on the device's host-side descriptor (the console's socket), and
//! after every event re-arms that descriptor for exactly what the device can take, so a full
//! buffer or a closed peer never makes the loop spin.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::mmio::MmioTransport;
use crate::virtio::{HostEvent, HostInterest, VirtioDevice};

/// A subscriber the device thread can own.
pub type BoxedSubscriber = Box<dyn MutEventSubscriber + Send>;

/// Why the device thread failed.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The event manager or an eventfd could not be created.
    #[error("event loop setup: {0}")]
    Setup(String),
    /// The thread could not be started.
    #[error("device thread spawn: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread is gone (it stopped or panicked).
    #[error("device thread is not running")]
    Stopped,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connects one [`MmioTransport`] to the event loop.
pub struct TransportSubscriber<D, M> {
    transport: Arc<Mutex<MmioTransport<D, M>>>,
    queue_fds: Vec<RawFd>,
    host_fd: Option<RawFd>,
    host_registered: Option<EventSet>,
}

impl<D, M> std::fmt::Debug for TransportSubscriber<D, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportSubscriber")
            .field("queue_fds", &self.queue_fds)
            .field("host_fd", &self.host_fd)
            .finish()
    }
}

impl<D: VirtioDevice, M: GuestMemoryBackend> TransportSubscriber<D, M> {
    /// A subscriber for `transport` (shared with the MMIO bus).
    pub fn new(transport: Arc<Mutex<MmioTransport<D, M>>>) -> Self {
        let (queue_fds, host_fd) = {
            let t = lock(&transport);
            let fds = t.queue_evts().iter().map(AsRawFd::as_raw_fd).collect();
            (fds, t.device().host_fd())
        };
        Self {
            transport,
            queue_fds,
            host_fd,
            host_registered: None,
        }
    }

    fn rearm_host(&mut self, ops: &mut EventOps, interest: Option<HostInterest>) {
        let Some(fd) = self.host_fd else { return };
        let wanted = interest.map(|i| {
            let mut set = EventSet::empty();
            if i.readable {
                set |= EventSet::IN;
            }
            if i.writable {
                set |= EventSet::OUT;
            }
            set
        });
        let result = match (self.host_registered, wanted) {
            (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
            (Some(old), Some(set)) if old != set => ops.modify(Events::new_raw(fd, set)),
            (Some(_), None) => ops.remove(Events::empty_raw(fd)),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.host_registered = wanted,
            Err(e) => tracing::warn!(error = %e, fd, "could not re-arm a device host descriptor"),
        }
    }
}

impl<D: VirtioDevice, M: GuestMemoryBackend> MutEventSubscriber for TransportSubscriber<D, M> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.queue_fds.iter().enumerate() {
            let data = u32::try_from(i).unwrap_or(u32::MAX);
            if let Err(e) = ops.add(Events::with_data_raw(*fd, data, EventSet::IN)) {
                tracing::warn!(error = %e, queue = i, "could not watch a queue eventfd");
            }
        }
        let interest = lock(&self.transport).device().host_interest();
        self.rearm_host(ops, interest);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let transport = self.transport.clone();
        let mut t = lock(&transport);
        if let Some(queue) = self.queue_fds.iter().position(|q| *q == fd) {
            if let Some(evt) = t.queue_evts().get(queue) {
                // Resets the counter; EAGAIN only means someone else drained it.
                let _ = evt.read();
            }
            t.process_queue(queue);
        } else if Some(fd) == self.host_fd {
            t.process_host(HostEvent {
                readable: set.contains(EventSet::IN),
                writable: set.contains(EventSet::OUT),
                hangup: set.intersects(EventSet::HANG_UP | EventSet::ERROR),
            });
        } else {
            tracing::warn!(fd, "event for an unknown descriptor");
        }
        let interest = t.device().host_interest();
        drop(t);
        self.rearm_host(ops, interest);
    }
}

/// Drains the wake-up eventfd of the device thread.
struct Waker(Arc<EventFd>);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            tracing::error!(error = %e, "device thread cannot watch its wake-up eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// A thread running an event loop for device work. Dropping it stops the thread.
#[derive(Debug)]
pub struct DeviceThread {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    tx: Sender<BoxedSubscriber>,
}

impl DeviceThread {
    /// Starts the thread (named `name`).
    pub fn spawn(name: &str) -> Result<Self, EventLoopError> {
        Self::spawn_confined(name, || Ok(()))
    }

    /// Starts the thread (named `name`), which calls `confine` on itself once its event loop
    /// is set up and before it serves any event (the VMM installs its seccomp filter there).
    /// If `confine` fails, the thread ends and so does this call, with
    /// [`EventLoopError::Setup`].
    pub fn spawn_confined(
        name: &str,
        confine: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<Self, EventLoopError> {
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| EventLoopError::Setup(e.to_string()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<BoxedSubscriber>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let (thread_wake, thread_stop) = (wake.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(thread_wake, thread_stop, rx, ready_tx, confine))
            .map_err(EventLoopError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EventLoopError::Setup(e)),
            Err(_) => return Err(EventLoopError::Stopped),
        }
        Ok(Self {
            handle: Some(handle),
            stop,
            wake,
            tx,
        })
    }

    /// Hands `subscriber` to the thread; it is registered before the loop waits again.
    pub fn register(&self, subscriber: BoxedSubscriber) -> Result<(), EventLoopError> {
        self.tx
            .send(subscriber)
            .map_err(|_| EventLoopError::Stopped)?;
        self.wake.write(1).map_err(|_| EventLoopError::Stopped)
    }

    /// Registers a virtio transport (its queue eventfds and host descriptor).
    pub fn register_transport<D, M>(
        &self,
        transport: Arc<Mutex<MmioTransport<D, M>>>,
    ) -> Result<(), EventLoopError>
    where
        D: VirtioDevice + 'static,
        M: GuestMemoryBackend + Send + 'static,
    {
        self.register(Box::new(TransportSubscriber::new(transport)))
    }

    /// Stops the loop and waits for the thread.
    pub fn stop(mut self) -> Result<(), EventLoopError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), EventLoopError> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| EventLoopError::Stopped),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn run(
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    rx: Receiver<BoxedSubscriber>,
    ready: mpsc::SyncSender<Result<(), String>>,
    confine: impl FnOnce() -> Result<(), String>,
) {
    let mut manager = match EventManager::<BoxedSubscriber>::new() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    manager.add_subscriber(Box::new(Waker(wake)));
    // After the setup (which creates descriptors), before the first event.
    if let Err(e) = confine() {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::SeqCst) {
        while let Ok(subscriber) = rx.try_recv() {
            manager.add_subscriber(subscriber);
        }
        if let Err(e) = manager.run() {
            tracing::error!(error = %e, "device event loop failed; stopping");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_runs_on_the_device_thread_and_its_failure_fails_the_spawn() {
        let (tx, rx) = mpsc::channel();
        let thread = DeviceThread::spawn_confined("confined-test", move || {
            let name = std::thread::current().name().map(str::to_owned);
            tx.send(name).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("confined-test"));
        thread.stop().unwrap();

        match DeviceThread::spawn_confined("refused-test", || Err("no filter".into())) {
            Err(EventLoopError::Setup(reason)) => assert_eq!(reason, "no filter"),
            other => panic!("expected a setup error, got {other:?}"),
        }
    }
}

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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    pausing: Arc<Pausing>,
}

/// Pause requests to the device thread: how many holders want it parked, and whether it is.
#[derive(Debug, Default)]
struct Pausing {
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    /// Live [`DevicesPaused`] guards.
    holders: u32,
    /// The thread is parked and serves nothing.
    parked: bool,
}

impl Pausing {
    /// Called by the device thread between events: parks it while a pause is held (or
    /// until the loop stops).
    fn park_while_held(&self, stop: &AtomicBool) {
        let mut state = lock(&self.state);
        if state.holders == 0 {
            return;
        }
        state.parked = true;
        self.changed.notify_all();
        while state.holders > 0 && !stop.load(Ordering::SeqCst) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked = false;
    }
}

/// The device thread parked: while this lives it serves no queue and no host descriptor,
/// so device state and guest memory stay as they are (a VMM saves them then). Notifications
/// and host bytes that arrive meanwhile wait in their eventfds and sockets and are served
/// once it is dropped.
#[derive(Debug)]
pub struct DevicesPaused {
    pausing: Arc<Pausing>,
}

impl Drop for DevicesPaused {
    fn drop(&mut self) {
        let mut state = lock(&self.pausing.state);
        state.holders = state.holders.saturating_sub(1);
        self.pausing.changed.notify_all();
    }
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
        let pausing = Arc::new(Pausing::default());
        let (thread_wake, thread_stop, thread_pausing) =
            (wake.clone(), stop.clone(), pausing.clone());
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                run(
                    thread_wake,
                    thread_stop,
                    thread_pausing,
                    rx,
                    ready_tx,
                    confine,
                )
            })
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
            pausing,
        })
    }

    /// Parks the thread between two events and returns once it is parked; it stays parked
    /// until the returned guard is dropped (or the thread is stopped). Fails if the thread
    /// has ended.
    pub fn pause(&self) -> Result<DevicesPaused, EventLoopError> {
        let guard = {
            let mut state = lock(&self.pausing.state);
            state.holders += 1;
            DevicesPaused {
                pausing: self.pausing.clone(),
            }
        };
        self.wake.write(1).map_err(|_| EventLoopError::Stopped)?;
        let mut state = lock(&self.pausing.state);
        while !state.parked {
            if self.handle.as_ref().is_none_or(JoinHandle::is_finished) {
                return Err(EventLoopError::Stopped);
            }
            // A timeout so that a thread that ended meanwhile is noticed.
            state = self
                .pausing
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(state);
        Ok(guard)
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
        // A parked thread wakes for the stop even while a pause guard lives.
        {
            let _state = lock(&self.pausing.state);
            self.pausing.changed.notify_all();
        }
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
    pausing: Arc<Pausing>,
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
        pausing.park_while_held(&stop);
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

    /// Counts the events of one eventfd.
    struct Counter {
        evt: Arc<EventFd>,
        seen: Arc<std::sync::atomic::AtomicU32>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(self.evt.as_ref(), EventSet::IN))
                .unwrap();
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_paused_thread_serves_nothing_until_resumed_and_still_stops() {
        let thread = DeviceThread::spawn("pause-test").unwrap();
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        thread
            .register(Box::new(Counter {
                evt: evt.clone(),
                seen: seen.clone(),
            }))
            .unwrap();
        let wait_for = |n: u32| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while seen.load(Ordering::SeqCst) < n {
                assert!(std::time::Instant::now() < deadline, "event {n} not served");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        evt.write(1).unwrap();
        wait_for(1);

        let paused = thread.pause().unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(seen.load(Ordering::SeqCst), 1, "served while paused");
        drop(paused);
        wait_for(2);

        // A thread parked by a live guard still stops.
        let _held = thread.pause().unwrap();
        thread.stop().unwrap();
    }

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

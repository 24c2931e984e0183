//! A counting semaphore bounding how many capsules boot at once.

use std::sync::{Arc, Condvar, Mutex};

use crate::sync::{lock, wait};

/// At most `limit` permits are out at any time; `acquire` blocks for one.
#[derive(Debug)]
pub(crate) struct StartLimiter {
    available: Mutex<usize>,
    freed: Condvar,
}

impl StartLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        StartLimiter {
            available: Mutex::new(limit.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Blocks until a permit is free; the permit returns when the guard drops.
    pub(crate) fn acquire(self: &Arc<Self>) -> Permit {
        let mut available = lock(&self.available);
        while *available == 0 {
            available = wait(&self.freed, available);
        }
        *available -= 1;
        Permit {
            limiter: self.clone(),
        }
    }
}

/// One boot slot; released on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<StartLimiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut available = lock(&self.limiter.available);
        *available += 1;
        self.limiter.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_more_than_the_limit_at_once() {
        let limiter = Arc::new(StartLimiter::new(3));
        let inside = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (limiter, inside, peak) = (limiter.clone(), inside.clone(), peak.clone());
                std::thread::spawn(move || {
                    let _permit = limiter.acquire();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 1);
    }
}

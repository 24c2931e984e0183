//! The lines a "minimal" guest prints on its serial console for benchmarks, and a reader that
//! timestamps a child process's console lines as they arrive.
//!
//! The guest's `/init` (capsule's agent) prints the boot marker `capsule-init: marker T` (T:
//! the guest's `CLOCK_MONOTONIC` in seconds) early at every boot, before it loads modules or
//! opens its channel, and with `capsule.heartbeat=MS` on the kernel command line (or
//! `capsule-agent --heartbeat MS` run in the guest) a line `capsule-hb N` every MS
//! milliseconds (N = 1, 2, ...). Every system is timed to these lines: the marker for a
//! boot, the next heartbeat for a restore ("live").

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The start of the boot marker line.
pub const MARKER: &str = "capsule-init: marker";
/// The start of a heartbeat line (`capsule-hb N`).
pub const HEARTBEAT: &str = "capsule-hb";
/// What the agent prints once its `Hello` is sent (`capsule.ready`).
pub const READY: &str = "capsule-agent: ready";

/// The guest clock (seconds) in the first marker line of `text`.
pub fn marker_clock(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.find(MARKER).map(|at| &l[at + MARKER.len()..]))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

/// The number of a heartbeat line (`capsule-hb N`; other output before it on the line is
/// allowed, since another writer may have left a line unfinished).
pub fn heartbeat_seq(line: &str) -> Option<u64> {
    let at = line.rfind(HEARTBEAT)?;
    let rest = line[at + HEARTBEAT.len()..].strip_prefix(' ')?.trim_end();
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// The largest heartbeat number among the complete lines of `text` (a last line without
/// its newline does not count: the guest may still be printing it).
pub fn last_heartbeat(text: &str) -> Option<u64> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return None,
    };
    complete.lines().filter_map(heartbeat_seq).max()
}

/// Whether `fragment`, the text before the first newline of a console stream that may have
/// started in the middle of a line (a restored guest's, printed by a new process), is the
/// end of a heartbeat line: `7`, `hb 12`, `capsule-hb 3`. Such a line was started before the
/// snapshot and finished after the restore, so its newline is the guest's first sign of life.
pub fn is_heartbeat_tail(fragment: &str) -> bool {
    let fragment = fragment.trim_end_matches('\r');
    let head = fragment.trim_end_matches(|c: char| c.is_ascii_digit());
    head.len() < fragment.len() && format!("{HEARTBEAT} ").ends_with(head)
}

/// Whether line `index` of a console stream that began after a restore shows the guest
/// alive: a heartbeat line, or (the first line only) the end of one.
pub fn is_life_after_restore(index: usize, line: &str) -> bool {
    heartbeat_seq(line).is_some() || (index == 0 && is_heartbeat_tail(line))
}

#[derive(Default)]
struct Lines {
    /// Complete lines (without `\n` or `\r`) and when their newline arrived.
    lines: Vec<(Instant, String)>,
    /// Bytes after the last newline.
    partial: Vec<u8>,
    closed: bool,
}

/// A thread reading a console stream (a child's stdout), timestamping each line as it
/// arrives; [`LineWatch::wait_for`] returns when a line matching a predicate arrived.
/// The thread ends when the stream closes (the child exited or was killed).
pub struct LineWatch {
    shared: Arc<(Mutex<Lines>, Condvar)>,
}

impl LineWatch {
    /// Starts reading `stream`.
    pub fn spawn(mut stream: impl Read + Send + 'static) -> LineWatch {
        let shared: Arc<(Mutex<Lines>, Condvar)> = Arc::default();
        let writer = Arc::clone(&shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let at = Instant::now();
                let (lock, changed) = &*writer;
                let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                for &byte in &buf[..n] {
                    if byte == b'\n' {
                        let line = std::mem::take(&mut state.partial);
                        let text = String::from_utf8_lossy(&line)
                            .trim_end_matches('\r')
                            .to_string();
                        state.lines.push((at, text));
                    } else {
                        state.partial.push(byte);
                    }
                }
                changed.notify_all();
            }
            let (lock, changed) = &*writer;
            lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            changed.notify_all();
        });
        LineWatch { shared }
    }

    fn state(&self) -> MutexGuard<'_, Lines> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for a line for which `matches(index, line)` is true (index:
    /// the line's position in the stream, from 0); returns when it arrived. `None` on timeout
    /// or once the stream closed without one.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(usize, &str) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut next = 0;
        let mut state = self.state();
        loop {
            while next < state.lines.len() {
                let (at, line) = &state.lines[next];
                if matches(next, line) {
                    return Some(*at);
                }
                next += 1;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self
                .shared
                .1
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The last `n` lines and any unfinished one, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let state = self.state();
        let from = state.lines.len().saturating_sub(n);
        let mut text: Vec<String> = state.lines[from..].iter().map(|(_, l)| l.clone()).collect();
        if !state.partial.is_empty() {
            text.push(String::from_utf8_lossy(&state.partial).into_owned());
        }
        text.join("\n")
    }

    /// Whether the stream has closed.
    pub fn closed(&self) -> bool {
        self.state().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_clock_is_read() {
        let console = "[    0.1] x\ncapsule-init: marker 1.234567\ncapsule-agent: ready\n";
        assert_eq!(marker_clock(console), Some(1.234567));
        assert_eq!(marker_clock("junk capsule-init: marker 0.5\n"), Some(0.5));
        assert_eq!(marker_clock("capsule-agent: ready\n"), None);
        assert_eq!(marker_clock("capsule-init: marker\n"), None);
    }

    #[test]
    fn heartbeat_lines() {
        assert_eq!(heartbeat_seq("capsule-hb 12"), Some(12));
        assert_eq!(heartbeat_seq("capsule-hb 12\r"), Some(12));
        assert_eq!(heartbeat_seq("[ 3.0] random: crng capsule-hb 7"), Some(7));
        assert_eq!(heartbeat_seq("capsule-hb "), None);
        assert_eq!(heartbeat_seq("capsule-hb 1x"), None);
        assert_eq!(heartbeat_seq("capsule-hb12"), None);
        assert_eq!(heartbeat_seq("capsule-init: marker 1.0"), None);

        assert_eq!(
            last_heartbeat("capsule-hb 1\ncapsule-hb 2\ncapsule-hb 3"),
            Some(2)
        );
        assert_eq!(last_heartbeat("capsule-hb 1\ncapsule-hb 2\n"), Some(2));
        assert_eq!(last_heartbeat("capsule-hb 9\nx\ncapsule-hb 2\n"), Some(9));
        assert_eq!(last_heartbeat("capsule-hb 1"), None);
        assert_eq!(last_heartbeat(""), None);
    }

    #[test]
    fn heartbeat_tails() {
        for tail in ["7", "12", " 12", "hb 3", "-hb 3", "capsule-hb 3", "e-hb 40"] {
            assert!(is_heartbeat_tail(tail), "{tail:?}");
        }
        for other in [
            "",
            "capsule-hb ",
            "x 3",
            "ready",
            "capsule-init: marker 1",
            "hb",
        ] {
            assert!(!is_heartbeat_tail(other), "{other:?}");
        }
        assert!(is_life_after_restore(0, "3"));
        assert!(!is_life_after_restore(1, "3"));
        assert!(is_life_after_restore(1, "capsule-hb 4"));
        assert!(!is_life_after_restore(0, "[firecracker] log line"));
    }

    #[test]
    fn line_watch_timestamps_lines() {
        let data = b"boot\r\ncapsule-init: marker 1.0\ncapsule-hb 1\npartial".to_vec();
        let watch = LineWatch::spawn(std::io::Cursor::new(data));
        let at = watch.wait_for(Duration::from_secs(5), |_, l| l.starts_with(MARKER));
        assert!(at.is_some());
        assert!(watch
            .wait_for(Duration::from_secs(5), |i, l| i == 0 && l == "boot")
            .is_some());
        assert!(watch
            .wait_for(Duration::from_secs(5), |_, l| heartbeat_seq(l) == Some(1))
            .is_some());
        // Never printed: the stream closes, so this returns before its timeout.
        let t = Instant::now();
        assert!(watch
            .wait_for(Duration::from_secs(30), |_, l| l == "never")
            .is_none());
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(watch.closed());
        assert!(watch.tail(2).ends_with("capsule-hb 1\npartial"));
    }
}

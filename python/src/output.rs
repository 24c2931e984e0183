//! What commands and terminals send back to Python while they run: output callbacks, the
//! waits and chunk reads of background handles, and the arguments they take (data, signals).
//!
//! **Callbacks.** The engine calls a command's `on_stdout`/`on_stderr` on a thread of the
//! command's own (its pump thread, which feeds that one command; for a probe `run`, the caller's
//! thread, once, at the end), never on the agent link's reader thread and never with an engine
//! lock held (`capsule::RunOptions::on_stdout`). The Rust closure made here attaches to the
//! interpreter there (`Python::try_attach`: nothing is called while the interpreter shuts
//! down) and calls the Python callable with the GIL held. A slow callable slows its command
//! down (its output waits in the guest), never the engine or other commands.
//!
//! Text callbacks get `str`: the chunks are decoded incrementally, so a UTF-8 sequence that a
//! chunk boundary cuts is completed by the next chunk rather than replaced; invalid bytes
//! become U+FFFD. An incomplete sequence at the very end of the output is delivered (as
//! U+FFFD) when `run` returns or `wait` first returns the result.
//!
//! **Exceptions in callbacks.** The first exception a callable raises is kept, the callable is
//! not called again for that command, and `run()` (or the handle's `wait()`) raises it once
//! the command ended; the command itself is not stopped.
//!
//! **Waits.** A handle's `wait()` and chunk reads release the GIL and wake every
//! [`POLL`] to let Python handle signals (Ctrl-C raises `KeyboardInterrupt` in the waiting
//! thread; the command runs on).

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::errors::to_py;

/// How often a blocking wait of a handle wakes to let Python handle signals.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// Decodes UTF-8 that arrives in chunks: what a chunk boundary cuts waits for the next chunk.
#[derive(Default)]
pub(crate) struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// The text of `chunk` (after what the previous chunks left pending); invalid bytes are
    /// U+FFFD, an incomplete sequence at the end is kept for the next chunk.
    pub(crate) fn decode(&mut self, chunk: &[u8]) -> String {
        let joined: Cow<'_, [u8]> = if self.pending.is_empty() {
            Cow::Borrowed(chunk)
        } else {
            let mut bytes = std::mem::take(&mut self.pending);
            bytes.extend_from_slice(chunk);
            Cow::Owned(bytes)
        };
        let mut text = String::with_capacity(joined.len());
        let mut rest: &[u8] = &joined;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        text
    }

    /// What is left at the end of the output: an incomplete sequence, as U+FFFD.
    pub(crate) fn finish(&mut self) -> Option<String> {
        let pending = std::mem::take(&mut self.pending);
        (!pending.is_empty()).then(|| String::from_utf8_lossy(&pending).into_owned())
    }
}

struct CallbackState {
    decoder: Option<Utf8Decoder>,
    /// The first exception the callable raised; it is not called again after one.
    error: Option<PyErr>,
    finished: bool,
}

/// A Python callable that receives one stream's output chunks, as `str` (decoded
/// incrementally) or as `bytes`.
pub(crate) struct Callback {
    callable: Py<PyAny>,
    state: Mutex<CallbackState>,
}

impl Callback {
    /// `callable`, receiving `str` chunks if `text`, else `bytes`. A `TypeError` if it is not
    /// callable.
    pub(crate) fn new(what: &str, callable: &Bound<'_, PyAny>, text: bool) -> PyResult<Arc<Self>> {
        if !callable.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be callable, not {}",
                callable.get_type().name()?
            )));
        }
        Ok(Arc::new(Callback {
            callable: callable.clone().unbind(),
            state: Mutex::new(CallbackState {
                decoder: text.then(Utf8Decoder::default),
                error: None,
                finished: false,
            }),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CallbackState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the engine with a chunk, on the command's thread. The lock is never held
    /// while Python code runs (a callable that releases the GIL cannot deadlock a thread that
    /// holds the GIL and waits for the lock).
    fn deliver(&self, chunk: &[u8]) {
        // Nothing is called once the interpreter is shutting down.
        let _ = Python::try_attach(|py| {
            let text = {
                let mut state = self.state();
                if state.error.is_some() || state.finished {
                    return;
                }
                state.decoder.as_mut().map(|decoder| decoder.decode(chunk))
            };
            let arg = match text {
                Some(text) if text.is_empty() => return,
                Some(text) => PyString::new(py, &text).into_any(),
                None => PyBytes::new(py, chunk).into_any(),
            };
            if let Err(e) = self.callable.bind(py).call1((arg,)) {
                let mut state = self.state();
                if state.error.is_none() {
                    state.error = Some(e);
                }
            }
        });
    }

    /// The command ended: delivers what the decoder kept (once), and returns the first
    /// exception the callable raised, if any.
    fn finish(&self, py: Python<'_>) -> Option<PyErr> {
        let rest = {
            let mut state = self.state();
            if let Some(e) = &state.error {
                return Some(e.clone_ref(py));
            }
            if std::mem::replace(&mut state.finished, true) {
                return None;
            }
            state.decoder.as_mut().and_then(Utf8Decoder::finish)
        };
        if let Some(rest) = rest {
            if let Err(e) = self.callable.bind(py).call1((rest,)) {
                self.state().error = Some(e.clone_ref(py));
                return Some(e);
            }
        }
        None
    }

    /// The engine's callback: each chunk to this callable.
    fn engine_callback(self: &Arc<Self>) -> impl Fn(&[u8]) + Send + Sync + 'static {
        let callback = self.clone();
        move |chunk: &[u8]| callback.deliver(chunk)
    }
}

/// The output callbacks of one command (either may be absent).
#[derive(Default, Clone)]
pub(crate) struct Callbacks {
    stdout: Option<Arc<Callback>>,
    stderr: Option<Arc<Callback>>,
}

impl Callbacks {
    /// The callbacks from Python arguments (None: none). `text`: chunks as `str`.
    pub(crate) fn new(
        stdout: Option<&Bound<'_, PyAny>>,
        stdout_name: &str,
        stderr: Option<&Bound<'_, PyAny>>,
        text: bool,
    ) -> PyResult<Self> {
        let make = |what: &str, f: Option<&Bound<'_, PyAny>>| {
            f.filter(|f| !f.is_none())
                .map(|f| Callback::new(what, f, text))
                .transpose()
        };
        Ok(Callbacks {
            stdout: make(stdout_name, stdout)?,
            stderr: make("on_stderr", stderr)?,
        })
    }

    /// Whether there is none.
    pub(crate) fn is_empty(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none()
    }

    /// `options` with these callbacks set.
    pub(crate) fn install(&self, mut options: capsule::RunOptions) -> capsule::RunOptions {
        if let Some(cb) = &self.stdout {
            options = options.on_stdout(cb.engine_callback());
        }
        if let Some(cb) = &self.stderr {
            options = options.on_stderr(cb.engine_callback());
        }
        options
    }

    /// The command ended: the decoders' rests delivered; the first exception a callable
    /// raised, if any.
    pub(crate) fn finish(&self, py: Python<'_>) -> Option<PyErr> {
        let out = self.stdout.as_ref().and_then(|cb| cb.finish(py));
        let err = self.stderr.as_ref().and_then(|cb| cb.finish(py));
        out.or(err)
    }

    /// `result` of the command, unless a callback raised: then its exception.
    pub(crate) fn settle<T>(&self, py: Python<'_>, result: capsule::Result<T>) -> PyResult<T> {
        if self.is_empty() {
            return result.map_err(|e| to_py(py, e));
        }
        // The rests of the decoders only once the output is complete.
        let raised = match &result {
            Ok(_) => self.finish(py),
            Err(_) => self.errors(py),
        };
        match (raised, result) {
            (Some(e), _) => Err(e),
            (None, result) => result.map_err(|e| to_py(py, e)),
        }
    }

    /// The first exception a callable raised so far, without finishing.
    fn errors(&self, py: Python<'_>) -> Option<PyErr> {
        [&self.stdout, &self.stderr]
            .into_iter()
            .flatten()
            .find_map(|cb| cb.state().error.as_ref().map(|e| e.clone_ref(py)))
    }
}

/// Calls `step` (with the GIL released) with slices of at most [`POLL`] until it returns
/// something other than a `Wait` timeout, handling Python signals between slices (their
/// exception is the outer error); `timeout` (None: none) bounds the whole, after which the
/// result is the engine's `Wait` timeout error.
pub(crate) fn poll<T: Send>(
    py: Python<'_>,
    timeout: Option<Duration>,
    step: impl Fn(Duration) -> capsule::Result<T> + Send + Sync,
) -> PyResult<capsule::Result<T>> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let slice = match deadline {
            Some(at) => at.saturating_duration_since(Instant::now()).min(POLL),
            None => POLL,
        };
        match py.detach(|| step(slice)) {
            Err(capsule::Error::Timeout {
                kind: capsule::TimeoutKind::Wait,
                ..
            }) => {}
            other => return Ok(other),
        }
        py.check_signals()?;
        if deadline.is_some_and(|at| Instant::now() >= at) {
            return Ok(Err(capsule::Error::Timeout {
                kind: capsule::TimeoutKind::Wait,
                after: timeout.unwrap_or_default(),
            }));
        }
    }
}

/// Data for a command's stdin or a file: `bytes`, `bytearray` or `str` (written as UTF-8).
pub(crate) fn data_arg<'a>(what: &str, value: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(bytes.as_bytes()));
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(Cow::Owned(text.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(array) = value.cast::<PyByteArray>() {
        return Ok(Cow::Owned(array.to_vec()));
    }
    Err(PyTypeError::new_err(format!(
        "{what} must be bytes, bytearray or str, not {}",
        value.get_type().name()?
    )))
}

/// A signal by its number (an `int` or a `signal.Signals`), or a `ValueError`.
pub(crate) fn signal_arg(number: i32) -> PyResult<capsule::Signal> {
    capsule::Signal::new(number)
        .ok_or_else(|| PyValueError::new_err(format!("{number} is not a signal number (1 to 64)")))
}

/// Private, for the tests: the `str` chunks a text callback receives for these chunks of
/// bytes (the last one what the end of the output delivers, if anything is left).
#[pyfunction(name = "_decode_utf8_chunks")]
pub(crate) fn decode_utf8_chunks(chunks: Vec<Vec<u8>>) -> Vec<String> {
    let mut decoder = Utf8Decoder::default();
    let mut out: Vec<String> = chunks.iter().map(|c| decoder.decode(c)).collect();
    out.extend(decoder.finish());
    out
}

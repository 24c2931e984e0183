//! `capsule._native`: the Python bindings of the capsule engine, a PyO3 extension module.
//!
//! The Python package `capsule` (in `python/capsule/`) re-exports what is here and adds the
//! thin Python layer of the SDK: the `Capsule` and `Engine` classes (whose lifecycle methods
//! also work on the class with an id) and the process-wide default engine. Every call that
//! can block releases the GIL, so Python threads use capsules in parallel. Output callbacks
//! are the only calls back into Python: on a thread of their command, with the GIL taken
//! there, never inside an engine lock (`output`).
//!
//! Modules: `engine` (the engine), `capsule` (a capsule handle), `commands` (running
//! commands, in the foreground or the background, and their results), `output` (output
//! callbacks, waits and chunk reads of background handles), `files` (guest files), `pty`
//! (terminals), `info` (capsule, template and host information), `errors` (the engine's
//! errors as Python exceptions), `bench` (Rust-side timings for `bench.py`).

use pyo3::prelude::*;

mod bench;
mod capsule;
mod commands;
mod engine;
mod errors;
mod files;
mod info;
mod output;
mod pty;

/// Native half of the capsule SDK; import `capsule` instead.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<capsule::Capsule>()?;
    m.add_class::<commands::Commands>()?;
    m.add_class::<commands::CommandResult>()?;
    m.add_class::<commands::CommandHandle>()?;
    m.add_class::<commands::ProcessInfo>()?;
    m.add_class::<files::Files>()?;
    m.add_class::<files::EntryInfo>()?;
    m.add_class::<pty::Pty>()?;
    m.add_class::<pty::PtyHandle>()?;
    m.add_class::<info::CapsuleInfo>()?;
    m.add_class::<info::TemplateInfo>()?;
    m.add_class::<info::HostInfo>()?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(bench::bench_echo, m)?)?;
    m.add_function(wrap_pyfunction!(bench::bench_create, m)?)?;
    m.add_function(wrap_pyfunction!(output::decode_utf8_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(files::copy_file_objects, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

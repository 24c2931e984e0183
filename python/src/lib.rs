//! `capsule._native`: the Python bindings of the capsule engine, a PyO3 extension module.
//!
//! The Python package `capsule` (in `python/capsule/`) re-exports what is here and adds the
//! thin Python layer of the SDK: the `Capsule` and `Engine` classes (whose lifecycle methods
//! also work on the class with an id) and the process-wide default engine. Every call that
//! can block releases the GIL, so Python threads use capsules in parallel; nothing here calls
//! back into Python.
//!
//! Modules: `engine` (the engine), `capsule` (a capsule handle), `commands` (running
//! commands and their results), `info` (capsule, template and host information), `errors`
//! (the engine's errors as Python exceptions), `bench` (Rust-side timings for `bench.py`).

use pyo3::prelude::*;

mod bench;
mod capsule;
mod commands;
mod engine;
mod errors;
mod info;

/// Native half of the capsule SDK; import `capsule` instead.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<capsule::Capsule>()?;
    m.add_class::<commands::Commands>()?;
    m.add_class::<commands::CommandResult>()?;
    m.add_class::<info::CapsuleInfo>()?;
    m.add_class::<info::TemplateInfo>()?;
    m.add_class::<info::HostInfo>()?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(bench::bench_echo, m)?)?;
    m.add_function(wrap_pyfunction!(bench::bench_create, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! Timings taken by Rust inside this process, for `python/bench.py`: the same operations as
//! its Python loops, on the same engine and capsules, so that the difference is what the
//! binding adds. Private (underscore names); not part of the SDK.

use std::time::Instant;

use pyo3::prelude::*;

use crate::capsule::Capsule;
use crate::engine::Engine;
use crate::errors::IntoPy;

/// Runs `echo hi` `n` times on `capsule` from Rust; the microseconds of each.
#[pyfunction(name = "_bench_echo")]
pub(crate) fn bench_echo(py: Python<'_>, capsule: &Capsule, n: usize) -> PyResult<Vec<f64>> {
    let inner = &capsule.inner;
    py.detach(|| {
        let commands = inner.commands();
        (0..n)
            .map(|_| {
                let t = Instant::now();
                commands.run("echo hi")?;
                Ok(t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<capsule::Result<Vec<f64>>>()
    })
    .into_py(py)
}

/// Creates `n` capsules from `template` one after another from Rust (waiting until each
/// runs, and with `echo` until it answers `echo hi`), destroying each; the microseconds from
/// create to ready (or to the answer) of each.
#[pyfunction(name = "_bench_create")]
#[pyo3(signature = (engine, template, n, memory_mb=None, echo=false))]
pub(crate) fn bench_create(
    py: Python<'_>,
    engine: &Engine,
    template: &str,
    n: usize,
    memory_mb: Option<u64>,
    echo: bool,
) -> PyResult<Vec<f64>> {
    let inner = &engine.inner;
    py.detach(|| {
        (0..n)
            .map(|_| {
                let mut config = capsule::CapsuleConfig::builder(template);
                if let Some(mb) = memory_mb {
                    config = config.memory_mb(mb);
                }
                let t = Instant::now();
                let capsule = inner.create(config)?;
                if echo {
                    capsule.commands().run("echo hi")?;
                }
                let took = t.elapsed().as_secs_f64() * 1e6;
                capsule.destroy()?;
                Ok(took)
            })
            .collect::<capsule::Result<Vec<f64>>>()
    })
    .into_py(py)
}

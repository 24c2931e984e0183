//! The lifecycle steps, in one place: create and boot, pause, resume, snapshot to a
//! template, destroy. Each takes the engine's parts and one capsule; the public handles
//! only call these.
//!
//! A pause, from the handle to the disk: [`pause`] takes the capsule's lifecycle lock,
//! freezes its guest ([`crate::guest::Runtime::freeze`]), writes the snapshot
//! ([`snapshot_files::write_paused`], which uses `capsule_snapshot`'s save policy), moves the
//! capsule to Paused ([`CapsuleCore::paused`]) and shuts the guest down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use capsule_snapshot::memory::WriteOptions;

use crate::capsule_core::CapsuleCore;
use crate::config::CapsuleConfig;
use crate::engine_core::EngineCore;
use crate::error::{Error, Result};
use crate::guest::start_phases::StartPhases;
use crate::guest::MemoryImage;
use crate::guest::{self, BootContext, Frozen, GuestEvents, MemoryOrigin, Resources};
use crate::host_limits;
use crate::model::record::CapsuleRecord;
use crate::model::{CapsuleId, GuestKind, Status, TemplateInfo};
use crate::pause_gate::AutoPausePoint;
use crate::snapshot_files;
use crate::template::{validate_name, Template};

/// What a capsule config resolves to: the record of the new capsule and, for a template
/// made with `snapshot`, that template.
fn resolve(
    engine: &EngineCore,
    config: &CapsuleConfig,
) -> Result<(CapsuleRecord, Option<Arc<Template>>)> {
    let (kind, resources, template) = match GuestKind::builtin(config.template()) {
        Some(kind) => {
            let (vcpus, memory_mb) = kind.defaults();
            let resources = Resources {
                vcpus: config.vcpus().unwrap_or(vcpus),
                memory_mb: config.memory_mb().unwrap_or(memory_mb),
            };
            (kind, resources, None)
        }
        None => {
            let Some(template) = engine.templates.get(config.template())? else {
                return Err(Error::InvalidConfig(format!(
                    "unknown template {:?}",
                    config.template()
                )));
            };
            let resources = template.resources();
            if config.vcpus().is_some_and(|v| v != resources.vcpus)
                || config.memory_mb().is_some_and(|m| m != resources.memory_mb)
            {
                return Err(Error::InvalidConfig(format!(
                    "template {:?} has {} vCPUs and {} MiB; a capsule started from it cannot change them",
                    config.template(),
                    resources.vcpus,
                    resources.memory_mb
                )));
            }
            (template.kind(), resources, Some(template))
        }
    };
    guest::validate(kind, &resources, engine.hypervisor.info())?;
    let record = CapsuleRecord {
        id: CapsuleId::generate(),
        template: config.template().to_owned(),
        kind,
        vcpus: resources.vcpus,
        memory_mb: resources.memory_mb,
        timeout: config.timeout(),
        created_at: SystemTime::now(),
    };
    Ok((record, template))
}

/// Records a new capsule and boots it: before returning with [`CapsuleConfig::wait`], or on
/// a background thread. A failed boot with `wait` leaves nothing behind; in the background
/// it leaves the capsule in error.
pub(crate) fn create(engine: &Arc<EngineCore>, config: &CapsuleConfig) -> Result<Arc<CapsuleCore>> {
    let (record, template) = resolve(engine, config)?;
    let capsule = admit(engine, record)?;
    if config.wait() {
        boot_or_destroy(engine, &capsule, template)?;
        return Ok(capsule);
    }
    let (background, booting) = (engine.clone(), capsule.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("{}-boot", capsule.id()))
        .spawn(move || {
            if let Err(e) = boot(&background, &booting, template) {
                tracing::warn!(capsule = %booting.id(), error = %e, "background boot failed");
                booting.crash(host_limits::classify(e).to_string());
            }
        });
    if let Err(e) = spawned {
        let _ = destroy(engine, capsule.id());
        return Err(host_limits::classify(Error::os(
            "spawning a boot thread",
            e,
        )));
    }
    Ok(capsule)
}

/// A new pending capsule for `record`, within the engine's limits, registered and recorded
/// in the data directory (or nothing is left behind).
fn admit(engine: &EngineCore, record: CapsuleRecord) -> Result<Arc<CapsuleCore>> {
    let capsule = CapsuleCore::new(record, Status::Pending);
    engine
        .admission
        .admit_new(engine.admission_parts(), &capsule)?;
    if let Err(e) = engine.store.record(capsule.record()) {
        let _ = engine.registry.remove(capsule.id());
        return Err(host_limits::classify(e));
    }
    Ok(capsule)
}

/// Boots an admitted capsule; if that fails, destroys it, so nothing is left behind.
fn boot_or_destroy(
    engine: &EngineCore,
    capsule: &Arc<CapsuleCore>,
    template: Option<Arc<Template>>,
) -> Result<()> {
    boot(engine, capsule, template)
        .inspect_err(|_| {
            let _ = destroy(engine, capsule.id());
        })
        .map_err(host_limits::classify)
}

/// What a guest of `capsule` needs to boot or be restored.
fn boot_context(engine: &EngineCore, capsule: &Arc<CapsuleCore>) -> BootContext {
    let events: Arc<dyn GuestEvents> = capsule.clone();
    let record = capsule.record();
    BootContext {
        id: record.id.clone(),
        hypervisor: engine.hypervisor.clone(),
        config: Resources {
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
        },
        boot_timeout: engine.config.boot_timeout(),
        events,
        shells: engine.shells.clone(),
        linux_images: engine.config.linux_images(),
        seccomp: engine.config.seccomp(),
    }
}

/// Pending → Starting → Running, within the concurrent-start limit.
fn boot(
    engine: &EngineCore,
    capsule: &Arc<CapsuleCore>,
    template: Option<Arc<Template>>,
) -> Result<()> {
    let _permit = engine.starts.acquire();
    let _ops = capsule.lock_ops();
    capsule.start()?;
    let ctx = boot_context(engine, capsule);
    let kind = capsule.record().kind;
    let runtime = match template {
        None => guest::boot(kind, ctx)?,
        Some(template) => {
            let (image, origin) = template.memory()?;
            guest::restore(kind, ctx, template.machine(), &image, origin)?
        }
    };
    capsule.ready(runtime)?;
    tracing::debug!(capsule = %capsule.id(), "running");
    Ok(())
}

/// Forgets the capsule `id`, stops it and deletes its files.
pub(crate) fn destroy(engine: &EngineCore, id: &CapsuleId) -> Result<()> {
    let capsule = engine.registry.remove(id)?;
    let _ops = capsule.lock_ops();
    capsule.destroy();
    engine.store.remove_capsule(id)
}

/// How the next pause writes its memory: `O_DIRECT` from the snapshot crate's threshold, and
/// the injected fault a test asked for.
fn write_options(engine: &EngineCore) -> WriteOptions {
    match engine.take_write_fault() {
        Some(bytes) => WriteOptions::failing_after(bytes),
        None => WriteOptions::default(),
    }
}

/// Writes the snapshot of the frozen `capsule` into its snapshot directory (the pause of
/// [`pause`] and of [`pause_if_idle`]); returns that directory.
fn write_pause_snapshot(
    engine: &EngineCore,
    capsule: &CapsuleCore,
    frozen: &Frozen,
    phases: &mut StartPhases,
) -> Result<PathBuf> {
    let dir = engine.store.snapshot_dir(capsule.id());
    snapshot_files::write_paused(
        &dir,
        frozen,
        capsule.record(),
        &write_options(engine),
        phases,
    )?;
    Ok(dir)
}

/// Freezes the capsule, writes its snapshot and releases its VM. Pausing a paused capsule
/// does nothing.
pub(crate) fn pause(engine: &EngineCore, capsule: &CapsuleCore) -> Result<()> {
    let _ops = capsule.lock_ops();
    if capsule.status() == Status::Paused {
        return Ok(());
    }
    let mut phases = StartPhases::begin("pause");
    let runtime = capsule.runtime("pause")?;
    let frozen = runtime.freeze()?;
    phases.mark("freeze");
    write_pause_snapshot(engine, capsule, &frozen, &mut phases)?;
    // Committed: release the VM. Frozen vCPU threads end on shutdown.
    if let Some(runtime) = capsule.paused()? {
        runtime.shutdown();
    }
    drop(frozen);
    phases.mark("release");
    phases.log_pause(capsule.id());
    tracing::debug!(capsule = %capsule.id(), "paused");
    Ok(())
}

/// Restores a paused capsule from its snapshot, within the engine's limits. Resuming a
/// running capsule does nothing.
pub(crate) fn resume(engine: &EngineCore, capsule: &Arc<CapsuleCore>) -> Result<()> {
    let _ops = capsule.lock_ops();
    match capsule.status() {
        Status::Running => return Ok(()),
        Status::Paused => {}
        _ => return Err(capsule.state_error("resume")),
    }
    let _ticket = engine
        .admission
        .admit_resume(engine.admission_parts(), capsule)?;
    restore_paused(engine, capsule).map_err(host_limits::classify)
}

/// The restore of [`resume`], once admitted.
fn restore_paused(engine: &EngineCore, capsule: &Arc<CapsuleCore>) -> Result<()> {
    let dir = engine.store.snapshot_dir(capsule.id());
    let state = snapshot_files::load(&dir)?;
    let record = capsule.record();
    let (kind, vcpus, memory_mb) = state.of.shape();
    if (kind, vcpus, memory_mb) != (record.kind, record.vcpus, record.memory_mb) {
        return Err(Error::SnapshotMismatch(format!(
            "the snapshot in {} is of a {} guest with {} vCPUs and {} MiB; the capsule is a {} guest with {} vCPUs and {} MiB",
            dir.display(),
            kind,
            vcpus,
            memory_mb,
            record.kind,
            record.vcpus,
            record.memory_mb
        )));
    }
    let origin = MemoryOrigin::Chain {
        dir: dir.clone(),
        chain: state.memory.chain.clone(),
        _pin: None,
    };
    let image = MemoryImage {
        dir: dir.clone(),
        memory: state.memory,
        base: None,
        base_id: None,
        touched_only: None,
    };
    let runtime = guest::restore(
        record.kind,
        boot_context(engine, capsule),
        &state.machine,
        &image,
        origin,
    )?;
    capsule.resumed(runtime)?;
    // The snapshot no longer describes the capsule, which runs on from it: if this process
    // dies now, a new engine must report it stopped, not roll it back to this state. Its
    // layers stay: the running capsule maps them and its next pause builds on them.
    snapshot_files::retire(&dir);
    tracing::debug!(capsule = %capsule.id(), "resumed");
    Ok(())
}

/// The inactivity watcher's pause: like [`pause`], but only of a capsule that is still idle
/// at every step. Under the capsule's lifecycle lock it checks the capsule is idle, freezes
/// it, checks again, writes the snapshot, and commits the pause only if no command started
/// or ended and no ping came since the first check, in the same step as the status change;
/// otherwise the snapshot is retired and the capsule thawed, running as before (a command
/// that arrived meanwhile runs once it is thawed). `Ok(true)` if it paused.
pub(crate) fn pause_if_idle(
    engine: &EngineCore,
    capsule: &CapsuleCore,
    now: SystemTime,
) -> Result<bool> {
    let _ops = capsule.lock_ops();
    let Some(stamp) = capsule.idle_stamp(now) else {
        return Ok(false);
    };
    engine.pause_gate.pass(AutoPausePoint::Decided);
    let mut phases = StartPhases::begin("pause");
    let runtime = capsule.runtime("pause")?;
    let frozen = runtime.freeze()?;
    phases.mark("freeze");
    engine.pause_gate.pass(AutoPausePoint::Frozen);
    if !capsule.still_idle(stamp) {
        return Ok(false); // dropping `frozen` thaws the guest
    }
    let dir = write_pause_snapshot(engine, capsule, &frozen, &mut phases)?;
    engine.pause_gate.pass(AutoPausePoint::Written);
    match capsule.pause_if_still_idle(stamp)? {
        Some(runtime) => {
            engine.pause_gate.pass(AutoPausePoint::Committed);
            if let Some(runtime) = runtime {
                runtime.shutdown();
            }
            drop(frozen);
            phases.mark("release");
            phases.log_pause(capsule.id());
            tracing::debug!(capsule = %capsule.id(), "paused after inactivity");
            Ok(true)
        }
        None => {
            // Used while its snapshot was being written: it runs on, so that snapshot must
            // not be taken for its state later.
            snapshot_files::retire(&dir);
            Ok(false)
        }
    }
}

/// `n` new running capsules in the exact state of `source` (running or paused), through an
/// anonymous template that goes when the last capsule mapping it does. The source is not
/// changed (a running one is frozen while its state is written). All or nothing: if one
/// fork cannot start (a limit, an error), those already started are destroyed.
pub(crate) fn fork(
    engine: &Arc<EngineCore>,
    source: &CapsuleCore,
    n: usize,
) -> Result<Vec<Arc<CapsuleCore>>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let dir = engine.templates.anonymous_dir();
    let record = source.record().clone();
    {
        let _ops = source.lock_ops();
        match source.status() {
            Status::Running => {
                let frozen = source.runtime("fork")?.freeze()?;
                snapshot_files::write_template(
                    &dir,
                    &frozen,
                    record.kind,
                    record.vcpus,
                    record.memory_mb,
                )?;
            }
            Status::Paused => {
                snapshot_files::write_template_from_paused(
                    &engine.store.snapshot_dir(source.id()),
                    &dir,
                )?;
            }
            _ => return Err(source.state_error("fork")),
        }
    }
    let template = engine.templates.load_anonymous(dir)?;
    let mut forks = Vec::with_capacity(n);
    for _ in 0..n {
        match start_fork(engine, &record, &template) {
            Ok(capsule) => forks.push(capsule),
            Err(e) => {
                engine.shells.forget_backing(template.base_id());
                for capsule in forks {
                    let _ = destroy(engine, capsule.id());
                }
                return Err(e);
            }
        }
    }
    // Every fork has started: VM shells kept ready for this template would only hold its
    // files open.
    engine.shells.forget_backing(template.base_id());
    tracing::debug!(capsule = %source.id(), n, "forked");
    Ok(forks)
}

/// One fork: a capsule like `source` started from its anonymous template.
fn start_fork(
    engine: &EngineCore,
    source: &CapsuleRecord,
    template: &Arc<Template>,
) -> Result<Arc<CapsuleCore>> {
    let record = CapsuleRecord {
        id: CapsuleId::generate(),
        created_at: SystemTime::now(),
        ..source.clone()
    };
    let capsule = admit(engine, record)?;
    boot_or_destroy(engine, &capsule, Some(template.clone()))?;
    Ok(capsule)
}

/// Writes a running capsule's current state as the template `name`; the capsule keeps
/// running. Returns the template as [`crate::Engine::templates`] lists it.
pub(crate) fn snapshot(
    engine: &EngineCore,
    capsule: &CapsuleCore,
    name: &str,
) -> Result<TemplateInfo> {
    validate_name(name)?;
    let _ops = capsule.lock_ops();
    let runtime = capsule.runtime("snapshot")?;
    let _writer = engine.templates.lock_writer();
    let dir = engine.templates.dir(name);
    if dir.exists() {
        return Err(Error::InvalidArgument(format!(
            "a template named {name:?} already exists"
        )));
    }
    let frozen = runtime.freeze()?;
    let record = capsule.record();
    snapshot_files::write_template(&dir, &frozen, record.kind, record.vcpus, record.memory_mb)?;
    drop(frozen);
    engine.templates.info(name)
}

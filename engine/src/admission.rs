//! Admission control: the engine's limits on capsules holding a VM and on their guest
//! memory ([`crate::EngineConfigBuilder::max_capsules`],
//! [`crate::EngineConfigBuilder::max_memory_mb`]), checked when a capsule is about to take a
//! VM: at create and at resume. Use is counted from the registry (pending, starting and
//! running capsules) plus the resumes under way, under one lock, so two admissions never
//! both take the last place.

use std::sync::{Arc, Mutex};

use crate::capsule_core::CapsuleCore;
use crate::config::EngineConfig;
use crate::error::{Error, Resource, Result};
use crate::model::{CapsuleId, Status};
use crate::registry::Registry;
use crate::sync::lock;

/// Resumes admitted and not finished yet: their capsules are still paused in the registry.
#[derive(Default)]
pub(crate) struct Admission {
    resuming: Mutex<Vec<(CapsuleId, u64)>>,
}

/// A resume's place, given back when it is dropped (by then the capsule is running and
/// counted by the registry, or its resume failed).
pub(crate) struct ResumeTicket<'a> {
    admission: &'a Admission,
    id: CapsuleId,
}

impl Drop for ResumeTicket<'_> {
    fn drop(&mut self) {
        let mut resuming = lock(&self.admission.resuming);
        if let Some(at) = resuming.iter().position(|(id, _)| *id == self.id) {
            resuming.swap_remove(at);
        }
    }
}

/// Capsules holding a VM and their memory (MiB), `resuming` included.
fn usage(registry: &Registry, resuming: &[(CapsuleId, u64)]) -> (u64, u64) {
    let mut count = resuming.len() as u64;
    let mut memory: u64 = resuming.iter().map(|(_, mb)| mb).sum();
    for capsule in registry.all() {
        if matches!(
            capsule.status(),
            Status::Pending | Status::Starting | Status::Running
        ) {
            count += 1;
            memory += capsule.record().memory_mb;
        }
    }
    (count, memory)
}

/// Refuses one more capsule of `memory_mb` if it would pass a limit.
fn check(
    (config, registry): Parts<'_>,
    resuming: &[(CapsuleId, u64)],
    memory_mb: u64,
) -> Result<()> {
    let (count, memory) = usage(registry, resuming);
    let exhausted = |resource, in_use, limit| Error::ResourceExhausted {
        resource,
        in_use,
        limit: Some(limit),
        cause: None,
    };
    if let Some(max) = config.max_capsules() {
        if count + 1 > max as u64 {
            return Err(exhausted(Resource::Capsules, count, max as u64));
        }
    }
    if let Some(max) = config.max_memory_mb() {
        if memory + memory_mb > max {
            return Err(exhausted(Resource::MemoryMb, memory, max));
        }
    }
    Ok(())
}

/// The engine's limits and its capsules.
pub(crate) type Parts<'a> = (&'a EngineConfig, &'a Registry);

impl Admission {
    /// Admits `capsule` (pending, not registered yet) and registers it, in one step.
    pub(crate) fn admit_new(&self, parts: Parts<'_>, capsule: &Arc<CapsuleCore>) -> Result<()> {
        let resuming = lock(&self.resuming);
        check(parts, &resuming, capsule.record().memory_mb)?;
        parts.1.insert(capsule.clone());
        Ok(())
    }

    /// Admits the resume of `capsule` (paused); its place is held until the ticket drops.
    pub(crate) fn admit_resume(
        &self,
        parts: Parts<'_>,
        capsule: &CapsuleCore,
    ) -> Result<ResumeTicket<'_>> {
        let mut resuming = lock(&self.resuming);
        check(parts, &resuming, capsule.record().memory_mb)?;
        resuming.push((capsule.id().clone(), capsule.record().memory_mb));
        Ok(ResumeTicket {
            admission: self,
            id: capsule.id().clone(),
        })
    }
}

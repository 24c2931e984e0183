//! The engine's capsules, by id. It only keeps them: the lifecycle steps live in the
//! `lifecycle` module.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::capsule_core::CapsuleCore;
use crate::error::{Error, Result};
use crate::model::CapsuleId;
use crate::sync::{read, write};

/// Every capsule the engine knows, in any status.
#[derive(Default)]
pub(crate) struct Registry {
    capsules: RwLock<HashMap<CapsuleId, Arc<CapsuleCore>>>,
}

impl Registry {
    pub(crate) fn new(capsules: impl IntoIterator<Item = Arc<CapsuleCore>>) -> Self {
        Registry {
            capsules: RwLock::new(capsules.into_iter().map(|c| (c.id().clone(), c)).collect()),
        }
    }

    pub(crate) fn insert(&self, capsule: Arc<CapsuleCore>) {
        write(&self.capsules).insert(capsule.id().clone(), capsule);
    }

    /// The capsule `id`, or [`Error::NotFound`].
    pub(crate) fn find(&self, id: &CapsuleId) -> Result<Arc<CapsuleCore>> {
        read(&self.capsules)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// Forgets the capsule `id` and hands it back, or [`Error::NotFound`].
    pub(crate) fn remove(&self, id: &CapsuleId) -> Result<Arc<CapsuleCore>> {
        write(&self.capsules)
            .remove(id)
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// Every capsule now.
    pub(crate) fn all(&self) -> Vec<Arc<CapsuleCore>> {
        read(&self.capsules).values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        read(&self.capsules).len()
    }

    /// Forgets every capsule and hands them back.
    pub(crate) fn drain(&self) -> Vec<Arc<CapsuleCore>> {
        write(&self.capsules).drain().map(|(_, c)| c).collect()
    }
}

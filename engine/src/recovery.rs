//! Start-up recovery: what a new engine finds in its data directory. Paused capsules come
//! back paused (resumable); capsules that were running when their process ended come back
//! stopped (never silently rolled back to an older snapshot); leftovers of a crash are
//! removed and the journal is compacted.

use std::sync::Arc;

use crate::capsule_core::CapsuleCore;
use crate::error::Result;
use crate::model::Status;
use crate::snapshot_files;
use crate::store::Store;

/// The capsules `store` describes, each in the status it is really in.
pub(crate) fn recover(store: &Store) -> Result<Vec<Arc<CapsuleCore>>> {
    let mut loaded = store.load()?;
    let mut found = Vec::new();
    for id in &loaded.snapshots {
        let record = match loaded.journal.remove(id) {
            Some(record) => Some(record),
            // Not in the journal (its line was lost): the snapshot describes it.
            None => snapshot_files::load(&store.snapshot_dir(id))
                .ok()
                .and_then(|state| state.of.capsule().cloned()),
        };
        match record {
            Some(record) => found.push((record, Status::Paused)),
            None => tracing::warn!(capsule = %id, "skipping a snapshot without a description"),
        }
    }
    // In the journal without a snapshot: it was running when its process ended.
    found.extend(
        loaded
            .journal
            .into_values()
            .map(|record| (record, Status::Stopped)),
    );
    store.compact(found.iter().map(|(record, _)| record))?;
    Ok(found
        .into_iter()
        .map(|(record, status)| CapsuleCore::new(record, status))
        .collect())
}

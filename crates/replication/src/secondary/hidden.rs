//! The hidden overlay: the old content of every cluster the primary changed in this epoch.
//!
//! Copy-before-write fills it, one whole cluster at a time, before the primary's write lands
//! on the secondary disk; an entry never changes until the next checkpoint (first old version
//! wins). Membership is also the epoch's "already copied" set (QEMU's copy bitmap, inverted):
//! a cluster is copied iff it has an entry. Clusters that were zero are recorded as zero
//! without storing anything.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::RwLock;

use super::overlay::Overlay;

/// Marks a cluster preserved as zeroes (no slot).
const ZERO: u32 = u32::MAX;

/// What the hidden overlay holds for a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preserved {
    /// The old content is in this slot of the store.
    Data(u32),
    /// The old content was all zeroes.
    Zero,
}

/// The hidden overlay: cluster map plus store.
pub(crate) struct Hidden {
    pub store: Arc<dyn Overlay>,
    map: RwLock<HashMap<u64, u32>>,
}

impl Hidden {
    pub fn new(store: Arc<dyn Overlay>) -> Self {
        Hidden {
            store,
            map: RwLock::new(HashMap::new()),
        }
    }

    pub fn get(&self, c: u64) -> Option<Preserved> {
        self.map.read().get(&c).map(|&s| {
            if s == ZERO {
                Preserved::Zero
            } else {
                Preserved::Data(s)
            }
        })
    }

    pub fn contains(&self, c: u64) -> bool {
        self.map.read().contains_key(&c)
    }

    /// Records the old content of cluster `c`. An existing entry is kept (first wins).
    pub fn insert(&self, c: u64, p: Preserved) {
        let v = match p {
            Preserved::Data(s) => s,
            Preserved::Zero => ZERO,
        };
        self.map.write().entry(c).or_insert(v);
    }

    pub fn remove(&self, c: u64) {
        self.map.write().remove(&c);
    }

    /// Preserved clusters, unordered.
    pub fn clusters(&self) -> Vec<u64> {
        self.map.read().keys().copied().collect()
    }

    /// Every entry as the merge record stores it (slot `u32::MAX`: zero).
    pub fn entries(&self) -> Vec<(u64, u32)> {
        self.map.read().iter().map(|(&c, &s)| (c, s)).collect()
    }

    /// Puts back an entry of the merge record.
    pub fn restore(&self, c: u64, raw: u32) {
        self.map.write().insert(c, raw);
    }

    pub fn count(&self) -> usize {
        self.map.read().len()
    }

    /// Forgets every entry; returns the store positions that held data (for the store's
    /// emptying hint).
    pub fn clear(&self, cluster: u64) -> Vec<Range<u64>> {
        let map = std::mem::take(&mut *self.map.write());
        map.into_values()
            .filter(|&s| s != ZERO)
            .map(|s| u64::from(s) * cluster..(u64::from(s) + 1) * cluster)
            .collect()
    }
}

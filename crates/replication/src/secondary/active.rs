//! The active overlay: what the speculative VM wrote since the last checkpoint.
//!
//! Allocation is tracked per block (see [`geometry`](super::geometry)): a VM write of whole
//! blocks lands as is, with no read of the layers below; only a write that covers part of a
//! block reads that block's current view first (read-modify-write of at most two blocks per
//! request). Reads are therefore byte-exact, as the formal model (`A` is a byte map) requires.
//! Blocks zeroed or discarded by the VM are recorded as zero without storing anything.
//!
//! Each cluster with an entry owns one slot in the store (reserved on its first data write);
//! the entry is 40 bytes, so the map costs well under 64 bytes per dirty cluster.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use blockdev::Result;
use parking_lot::RwLock;

use super::cluster_lock::ClusterLocks;
use super::geometry::Blocks;
use super::overlay::Overlay;

/// No slot reserved yet (the cluster only has zero blocks).
const NO_SLOT: u32 = u32::MAX;

/// One cluster's state in the active overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ActiveCluster {
    /// Blocks the VM wrote (data or zeroes).
    pub alloc: Blocks,
    /// Of those, the blocks that read as zero and have no data in the store.
    pub zero: Blocks,
    slot: u32,
}

impl ActiveCluster {
    /// Blocks whose bytes are in the store.
    pub fn data(&self) -> Blocks {
        self.alloc.minus(self.zero)
    }

    pub fn slot(&self) -> Option<u32> {
        (self.slot != NO_SLOT).then_some(self.slot)
    }
}

/// The active overlay: block map, store, and the lock table that orders VM writes against
/// each other and against the failover merge.
pub(crate) struct Active {
    pub store: Arc<dyn Overlay>,
    pub locks: ClusterLocks,
    map: RwLock<HashMap<u64, ActiveCluster>>,
}

impl Active {
    pub fn new(store: Arc<dyn Overlay>) -> Self {
        Active {
            store,
            locks: ClusterLocks::default(),
            map: RwLock::new(HashMap::new()),
        }
    }

    pub fn get(&self, c: u64) -> Option<ActiveCluster> {
        self.map.read().get(&c).copied()
    }

    /// Whether the VM wrote anything to cluster `c` in this epoch.
    pub fn is_allocated(&self, c: u64) -> bool {
        self.map.read().get(&c).is_some_and(|e| !e.alloc.is_empty())
    }

    /// Returns each cluster's slot, reserving slots where missing; runs of consecutive
    /// clusters that all need one get consecutive slots, so their data is one store write.
    pub fn slots(&self, clusters: &[u64]) -> Result<Vec<u32>> {
        let mut map = self.map.write();
        let mut out = Vec::with_capacity(clusters.len());
        let mut i = 0;
        while i < clusters.len() {
            if let Some(s) = map.get(&clusters[i]).and_then(ActiveCluster::slot) {
                out.push(s);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < clusters.len()
                && clusters[j] == clusters[j - 1] + 1
                && map
                    .get(&clusters[j])
                    .and_then(ActiveCluster::slot)
                    .is_none()
            {
                j += 1;
            }
            let first = self.store.place(clusters[i], (j - i) as u64)?;
            for (k, &c) in clusters[i..j].iter().enumerate() {
                // The geometry keeps cluster counts (hence slots) below u32::MAX.
                let slot = (first + k as u64) as u32;
                map.entry(c)
                    .or_insert(ActiveCluster {
                        alloc: Blocks::EMPTY,
                        zero: Blocks::EMPTY,
                        slot,
                    })
                    .slot = slot;
                out.push(slot);
            }
            i = j;
        }
        Ok(out)
    }

    /// Records that `data` blocks of cluster `c` now hold data in the store and `zero` blocks
    /// read as zero.
    pub fn record(&self, c: u64, data: Blocks, zero: Blocks) {
        let mut map = self.map.write();
        let e = map.entry(c).or_insert(ActiveCluster {
            alloc: Blocks::EMPTY,
            zero: Blocks::EMPTY,
            slot: NO_SLOT,
        });
        e.alloc = e.alloc.union(data).union(zero);
        e.zero = e.zero.minus(data).union(zero);
    }

    /// Every entry as the merge record stores it: cluster, slot (`u32::MAX`: none),
    /// allocated and zero blocks.
    pub fn entries(&self) -> Vec<(u64, u32, u128, u128)> {
        self.map
            .read()
            .iter()
            .map(|(&c, e)| (c, e.slot, e.alloc.bits(), e.zero.bits()))
            .collect()
    }

    /// Puts back an entry of the merge record.
    pub fn restore(&self, (c, slot, alloc, zero): (u64, u32, u128, u128)) {
        self.map.write().insert(
            c,
            ActiveCluster {
                alloc: Blocks::from_bits(alloc),
                zero: Blocks::from_bits(zero),
                slot,
            },
        );
    }

    pub fn remove(&self, c: u64) {
        self.map.write().remove(&c);
    }

    /// Clusters with at least one allocated block, unordered.
    pub fn clusters(&self) -> Vec<u64> {
        self.map
            .read()
            .iter()
            .filter(|(_, e)| !e.alloc.is_empty())
            .map(|(&c, _)| c)
            .collect()
    }

    /// Clusters with at least one allocated block.
    pub fn count(&self) -> usize {
        self.map
            .read()
            .values()
            .filter(|e| !e.alloc.is_empty())
            .count()
    }

    /// Forgets every entry; returns the store positions that may hold data.
    pub fn clear(&self, cluster: u64) -> Vec<Range<u64>> {
        let map = std::mem::take(&mut *self.map.write());
        map.into_values()
            .filter_map(|e| e.slot())
            .map(|s| u64::from(s) * cluster..(u64::from(s) + 1) * cluster)
            .collect()
    }
}
